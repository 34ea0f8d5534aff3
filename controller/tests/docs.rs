//! Docs that cannot rot.
//!
//! - Every ```yaml and ```json block in the repository's Markdown files is checked with the real
//!   parsers: Canary objects with the spec loader (`config::parse_canaries`) and the Kubernetes
//!   CRD type, spec fragments merged into a valid Canary, the filter's configuration parser,
//!   Istio objects against the Istio router, and Envoy configuration (bootstraps, RDS files,
//!   route lists) with the real Envoy in `--mode validate`, and Deployments and HPAs against the
//!   Canary whose `targetRef`/`autoscalerRef` names them. A block of no known kind fails.
//! - The field reference in docs/spec.md is generated from the CRD schema, i.e. the spec's doc
//!   comments; every field must have one. `make docs` regenerates the table.
//! - Every relative link between Markdown files points at a file and heading that exist.
//!
//! Envoy validation needs Envoy (scripts/setup.sh) and the built filter (make build-filter).
//! Without them it is skipped with a note, unless `FLEDGE_REQUIRE_WASM=1` (as in `make test`).

#[allow(dead_code)]
#[path = "../../e2e/src/paths.rs"]
mod paths;

use fledge_controller::config::parse_canaries;
use fledge_controller::k8s::crd::{crd_json, CanaryResource};
use fledge_controller::router::istio::{read_routes, IstioSettings};
use fledge_core::filter_config::{FilterConfig, FilterModule};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

/// How a block that is YAML for some other tool is marked: ```yaml external
const EXTERNAL_TAG: &str = "external";

const HOW_TO_TAG: &str = "make it a complete document of a kind the docs test knows (a Canary or \
    other Kubernetes object, a fragment of a Canary spec such as `analysis: ...`, a filter \
    configuration in a ```json block, an Envoy bootstrap, an RDS DiscoveryResponse, or a list of \
    Envoy routes), tag it ```yaml external when it is YAML for another tool (then it is only \
    parsed), or use ```text when it is deliberately not a complete document";

// ---------------------------------------------------------------------------------------------
// Markdown

/// A fenced code block: where it starts, its info string, and its text (fence indentation
/// removed).
struct Block {
    file: String,
    line: usize,
    lang: String,
    tags: Vec<String>,
    text: String,
}

impl Block {
    fn at(&self) -> String {
        format!("{}:{} (```{})", self.file, self.line, self.lang)
    }
}

fn markdown_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().to_string();
            if name.starts_with('.')
                || ["target", "node_modules", "corpus", "pkg"].contains(&&*name)
            {
                continue;
            }
            if path.is_dir() {
                walk(&path, out);
            } else if name.ends_with(".md") {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(&paths::workspace_root(), &mut files);
    files.sort();
    files
}

fn relative(path: &Path) -> String {
    path.strip_prefix(paths::workspace_root())
        .unwrap_or(path)
        .display()
        .to_string()
}

fn code_blocks(file: &str, text: &str) -> Vec<Block> {
    let mut blocks = Vec::new();
    let mut open: Option<(usize, usize, String, Vec<String>)> = None;
    let mut lines: Vec<&str> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let indent = line.len() - line.trim_start().len();
        let trimmed = line.trim();
        match &open {
            None => {
                if let Some(info) = trimmed.strip_prefix("```") {
                    let mut words = info.split_whitespace().map(str::to_string);
                    let lang = words.next().unwrap_or_default();
                    open = Some((i + 1, indent, lang, words.collect()));
                    lines.clear();
                }
            }
            Some((start, fence_indent, lang, tags)) => {
                if trimmed == "```" {
                    blocks.push(Block {
                        file: file.to_string(),
                        line: *start,
                        lang: lang.clone(),
                        tags: tags.clone(),
                        text: lines.join("\n"),
                    });
                    open = None;
                } else {
                    let cut = indent.min(*fence_indent);
                    lines.push(&line[cut..]);
                }
            }
        }
    }
    blocks
}

// ---------------------------------------------------------------------------------------------
// Checking one block

/// Envoy configurations to validate, collected while checking blocks.
struct EnvoyCheck {
    at: String,
    bootstrap: Value,
}

#[derive(Default)]
struct Outcome {
    failures: Vec<String>,
    envoy: Vec<EnvoyCheck>,
    checked: BTreeMap<&'static str, usize>,
}

impl Outcome {
    fn fail(&mut self, block: &Block, message: impl std::fmt::Display) {
        self.failures.push(format!("{}: {message}", block.at()));
    }

    fn count(&mut self, kind: &'static str) {
        *self.checked.entry(kind).or_default() += 1;
    }
}

fn check_block(block: &Block, spec_keys: &BTreeSet<String>, out: &mut Outcome) {
    let documents = match parse_documents(&block.text) {
        Ok(documents) => documents,
        Err(e) => return out.fail(block, format!("does not parse as {}: {e}", block.lang)),
    };
    if block.tags.iter().any(|t| t == EXTERNAL_TAG) {
        return out.count("external (parsed only)");
    }
    if documents.is_empty() {
        return out.fail(block, format!("is empty; {HOW_TO_TAG}"));
    }
    if documents.iter().all(is_kubernetes_object) {
        return check_kubernetes(block, &documents, out);
    }
    let [document] = documents.as_slice() else {
        return out.fail(
            block,
            format!("holds several documents that are not all Kubernetes objects; {HOW_TO_TAG}"),
        );
    };
    match document {
        Value::Object(map) if is_envoy_bootstrap(map) => {
            check_envoy_bootstrap(block, document, out);
        }
        Value::Object(map) if map.contains_key("resources") && map.contains_key("version_info") => {
            check_rds_response(block, document, out);
        }
        Value::Object(map) if block.lang == "yaml" && map.keys().all(|k| spec_keys.contains(k)) => {
            check_spec_fragment(block, map, out);
        }
        Value::Object(_) if block.lang == "json" => match FilterConfig::parse(&block.text) {
            Ok(_) => out.count("filter configuration"),
            Err(e) => out.fail(
                block,
                format!(
                    "a ```json object is read as a filter configuration, and the filter's \
                     parser rejects it: {e}. If it is something else, {HOW_TO_TAG}"
                ),
            ),
        },
        Value::Array(routes) if !routes.is_empty() && routes.iter().all(is_envoy_route) => {
            let route_config = json!({"name": "docs", "virtual_hosts": [
                {"name": "docs", "domains": ["*"], "routes": routes}
            ]});
            out.envoy.push(EnvoyCheck {
                at: block.at(),
                bootstrap: bootstrap_with_routes(&route_config),
            });
            out.count("Envoy routes");
        }
        other => out.fail(
            block,
            format!(
                "is not a kind the docs test knows (top level: {}); {HOW_TO_TAG}",
                describe_top_level(other)
            ),
        ),
    }
}

fn parse_documents(text: &str) -> Result<Vec<Value>, String> {
    use serde::Deserialize;
    let mut documents = Vec::new();
    for document in serde_yaml::Deserializer::from_str(text) {
        let value = serde_yaml::Value::deserialize(document).map_err(|e| e.to_string())?;
        if value.is_null() {
            continue;
        }
        documents.push(serde_json::to_value(value).map_err(|e| e.to_string())?);
    }
    Ok(documents)
}

fn describe_top_level(value: &Value) -> String {
    match value {
        Value::Object(map) => map.keys().cloned().collect::<Vec<_>>().join(", "),
        Value::Array(_) => "a list".to_string(),
        other => format!("a scalar {other}"),
    }
}

fn is_kubernetes_object(value: &Value) -> bool {
    value.get("apiVersion").is_some_and(Value::is_string)
        && value.get("kind").is_some_and(Value::is_string)
}

fn is_envoy_bootstrap(map: &Map<String, Value>) -> bool {
    ["static_resources", "dynamic_resources", "admin", "node"]
        .iter()
        .any(|k| map.contains_key(*k))
}

fn is_envoy_route(value: &Value) -> bool {
    value.get("match").is_some()
        && ["route", "redirect", "direct_response"]
            .iter()
            .any(|k| value.get(*k).is_some())
}

// ---------------------------------------------------------------------------------------------
// Canary specs and Kubernetes objects

fn check_kubernetes(block: &Block, documents: &[Value], out: &mut Outcome) {
    let mut canaries = Vec::new();
    for (i, document) in documents.iter().enumerate() {
        let kind = document["kind"].as_str().unwrap_or_default();
        let api_version = document["apiVersion"].as_str().unwrap_or_default();
        match (api_version.split('/').next().unwrap_or_default(), kind) {
            ("fledge.dev", "Canary") => match check_canary(block, i + 1, document) {
                Ok(canary) => {
                    canaries.push(canary);
                    out.count("Canary");
                }
                Err(e) => out.fail(block, e),
            },
            ("networking.istio.io", "VirtualService" | "DestinationRule") => {
                out.count("Istio object (checked against the Canary)");
            }
            ("apps", "Deployment") | ("autoscaling", "HorizontalPodAutoscaler") => {
                out.count("workload object (checked against the Canary's targetRef)");
            }
            _ => out.fail(
                block,
                format!(
                    "document {}: the docs test has no parser for {api_version} {kind}; {HOW_TO_TAG}",
                    i + 1
                ),
            ),
        }
    }
    for canary in &canaries {
        if let Err(e) = check_istio_objects(canary, documents) {
            out.fail(block, e);
        }
    }
    for e in check_workload_objects(&canaries, documents) {
        out.fail(block, e);
    }
}

/// A Deployment or HPA in a block must be the target (or autoscaler) of a Canary in the same
/// block, and pass the checks the lifecycle makes before it releases anything: the track label
/// on the pods and in the selector, an HPA that scales the target.
fn check_workload_objects(canaries: &[CanaryResource], documents: &[Value]) -> Vec<String> {
    use fledge_core::workload::{check_autoscaler, check_target};
    let mut failures = Vec::new();
    for document in documents {
        let kind = document["kind"].as_str().unwrap_or_default();
        if kind != "Deployment" && kind != "HorizontalPodAutoscaler" {
            continue;
        }
        let name = document["metadata"]["name"].as_str().unwrap_or_default();
        let releasing = canaries.iter().map(|c| c.to_core()).find(|c| {
            let spec = &c.spec;
            match kind {
                "Deployment" => spec.target_ref.as_ref().is_some_and(|t| t.name == name),
                _ => spec.autoscaler_ref.as_ref().is_some_and(|a| a.name == name),
            }
        });
        let Some(canary) = releasing else {
            failures.push(format!(
                "{kind} {name}: no Canary in this block names it in targetRef/autoscalerRef; \
                 show it next to that Canary, or tag the block ```yaml external"
            ));
            continue;
        };
        let spec = &canary.spec;
        let problems = match (kind, &spec.target_ref) {
            ("Deployment", _) => check_target(document, spec.track_label()),
            (_, Some(target)) => check_autoscaler(document, &target.name)
                .into_iter()
                .collect(),
            _ => Vec::new(),
        };
        failures.extend(problems.iter().map(|p| format!("{kind} {name}: {p}")));
    }
    failures
}

/// The spec loader `fledge run` and `fledge validate` use, and the CRD type `fledge controller`
/// reads, must both accept the document.
fn check_canary(block: &Block, doc: usize, document: &Value) -> Result<CanaryResource, String> {
    let text = serde_yaml::to_string(document).map_err(|e| e.to_string())?;
    let label = format!("{}:{}", block.file, block.line);
    if let Err(errors) = parse_canaries(&label, &text) {
        let errors: Vec<String> = errors.iter().map(ToString::to_string).collect();
        return Err(format!(
            "document {doc}: the spec loader rejects it: {}",
            errors.join("; ")
        ));
    }
    let resource: CanaryResource = serde_json::from_value(document.clone())
        .map_err(|e| format!("document {doc}: not a Canary object for `fledge controller`: {e}"))?;
    resource
        .to_core()
        .validate()
        .map_err(|e| format!("document {doc}: invalid as a Kubernetes Canary: {e}"))?;
    Ok(resource)
}

/// A VirtualService or DestinationRule next to a Canary with an Istio router must be the one
/// it names, with the route, destinations and subsets the Istio router needs.
fn check_istio_objects(canary: &CanaryResource, documents: &[Value]) -> Result<(), String> {
    let namespace = canary.metadata.namespace.as_deref().unwrap_or("default");
    let core = canary.to_core();
    let Some(settings) = IstioSettings::from_spec(&core.spec, namespace) else {
        return Ok(());
    };
    let named = |kind: &str, name: &str| {
        documents
            .iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
    };
    if let Some(vs) = named("VirtualService", &settings.virtual_service) {
        read_routes(vs, &settings).map_err(|e| {
            format!(
                "Canary {}: the Istio router cannot use VirtualService {}: {e}",
                core.metadata.name, settings.virtual_service
            )
        })?;
    } else if documents.iter().any(|d| d["kind"] == "VirtualService") {
        return Err(format!(
            "Canary {} names VirtualService {:?}, which is not the one in this block",
            core.metadata.name, settings.virtual_service
        ));
    }
    let rule_name = settings
        .destination_rule
        .clone()
        .unwrap_or_else(|| settings.virtual_service.clone());
    if let Some(rule) = named("DestinationRule", &rule_name) {
        let subsets: Vec<&str> = rule["spec"]["subsets"]
            .as_array()
            .map(|s| s.iter().filter_map(|s| s["name"].as_str()).collect())
            .unwrap_or_default();
        for subset in [&core.spec.stable.subset, &core.spec.canary.subset] {
            if !subsets.contains(&subset.as_str()) {
                return Err(format!(
                    "Canary {}: subset {subset:?} is not in DestinationRule {rule_name} \
                     (subsets {subsets:?})",
                    core.metadata.name
                ));
            }
        }
    }
    Ok(())
}

/// A valid Canary that fragments such as `analysis: {...}` or `webhooks: [...]` are merged
/// into before they are loaded.
const FRAGMENT_BASE: &str = r#"
apiVersion: fledge.dev/v1alpha1
kind: Canary
metadata: {name: app}
spec:
  service: app
  stable: {subset: stable}
  canary: {subset: canary}
  metricsSource: {envoyAdmin: {urls: ["http://127.0.0.1:9901"]}}
  router:
    envoyRds: {path: /etc/envoy/rds/routes.json, routeConfiguration: fledge_route, virtualHost: app,
               route: primary, stableCluster: app_stable, canaryCluster: app_canary,
               adminUrl: "http://127.0.0.1:9901"}
  analysis:
    interval: 30s
    stepWeights: [20, 50]
    metrics:
      - {name: request-success-rate, thresholdRange: {min: 99}}
"#;

const STEP_KEYS: [&str; 4] = ["steps", "stepWeight", "stepWeights", "maxWeight"];

fn check_spec_fragment(block: &Block, fragment: &Map<String, Value>, out: &mut Outcome) {
    let mut canary = parse_documents(FRAGMENT_BASE).expect("the base parses")[0].clone();
    let spec = canary["spec"].as_object_mut().expect("spec");
    for (key, value) in fragment {
        match (key.as_str(), value, spec.get_mut(key)) {
            ("analysis", Value::Object(analysis), Some(Value::Object(base))) => {
                if analysis.keys().any(|k| STEP_KEYS.contains(&k.as_str())) {
                    base.retain(|k, _| !STEP_KEYS.contains(&k.as_str()));
                }
                base.extend(analysis.clone());
            }
            _ => {
                spec.insert(key.clone(), value.clone());
            }
        }
    }
    match check_canary(block, 1, &canary) {
        Ok(_) => out.count("Canary spec fragment"),
        Err(e) => out.fail(
            block,
            format!("merged into a valid Canary (controller/tests/docs.rs FRAGMENT_BASE): {e}"),
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// Envoy

fn check_envoy_bootstrap(block: &Block, bootstrap: &Value, out: &mut Outcome) {
    let mut bootstrap = bootstrap.clone();
    for (module, config) in fledge_plugin_configurations(&bootstrap) {
        if let Err(e) = FilterConfig::parse_for(module, config.as_bytes()) {
            out.fail(
                block,
                format!(
                    "the Fledge filter's configuration is rejected by its parser ({}): {e}",
                    module.file_name()
                ),
            );
        }
    }
    rewrite_local_paths(&mut bootstrap);
    out.envoy.push(EnvoyCheck {
        at: block.at(),
        bootstrap,
    });
    out.count("Envoy bootstrap");
}

fn check_rds_response(block: &Block, response: &Value, out: &mut Outcome) {
    let resources = response["resources"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if resources.is_empty() {
        return out.fail(block, "an RDS DiscoveryResponse without resources");
    }
    for resource in resources {
        let mut route_config = resource.clone();
        let kind = route_config
            .as_object_mut()
            .and_then(|m| m.remove("@type"))
            .unwrap_or_default();
        if kind != "type.googleapis.com/envoy.config.route.v3.RouteConfiguration" {
            return out.fail(
                block,
                format!("an RDS resource of @type {kind}; expected a RouteConfiguration"),
            );
        }
        out.envoy.push(EnvoyCheck {
            at: block.at(),
            bootstrap: bootstrap_with_routes(&route_config),
        });
    }
    out.count("RDS DiscoveryResponse");
}

/// The Fledge module a `vm_config.code.local.filename` loads, if any.
fn fledge_module(filename: &str) -> Option<FilterModule> {
    [FilterModule::Full, FilterModule::Observer]
        .into_iter()
        .find(|module| filename.ends_with(module.file_name()))
}

/// The module and `configuration` string of every Wasm filter that loads a Fledge module.
fn fledge_plugin_configurations(value: &Value) -> Vec<(FilterModule, String)> {
    let mut found = Vec::new();
    visit(value, &mut |node| {
        let code = node.pointer("/vm_config/code/local/filename");
        if let Some(module) = code.and_then(Value::as_str).and_then(fledge_module) {
            if let Some(text) = node.pointer("/configuration/value").and_then(Value::as_str) {
                found.push((module, text.to_string()));
            }
        }
    });
    found
}

fn visit(value: &Value, f: &mut dyn FnMut(&Value)) {
    f(value);
    match value {
        Value::Object(map) => map.values().for_each(|v| visit(v, f)),
        Value::Array(items) => items.iter().for_each(|v| visit(v, f)),
        _ => {}
    }
}

fn visit_mut(value: &mut Value, f: &mut dyn FnMut(&mut Value)) {
    f(value);
    match value {
        Value::Object(map) => map.values_mut().for_each(|v| visit_mut(v, f)),
        Value::Array(items) => items.iter_mut().for_each(|v| visit_mut(v, f)),
        _ => {}
    }
}

const RDS_PLACEHOLDER: &str = "@RDS_FILE@";
const RDS_DIR_PLACEHOLDER: &str = "@RDS_DIR@";
const WASM_PLACEHOLDER: &str = "@FLEDGE_FILTER_WASM@";
const OBSERVER_PLACEHOLDER: &str = "@FLEDGE_OBSERVER_WASM@";

/// Paths on the documented machine (the `.wasm`, the RDS file) become placeholders that the
/// Envoy run fills with this machine's paths.
fn rewrite_local_paths(bootstrap: &mut Value) {
    visit_mut(bootstrap, &mut |node| {
        if let Some(source) = node.get_mut("path_config_source") {
            *source = json!({"path": RDS_PLACEHOLDER, "watched_directory": {"path": RDS_DIR_PLACEHOLDER}});
        }
        if let Some(filename) = node.pointer_mut("/vm_config/code/local/filename") {
            match filename.as_str().and_then(fledge_module) {
                Some(FilterModule::Full) => *filename = json!(WASM_PLACEHOLDER),
                Some(FilterModule::Observer) => *filename = json!(OBSERVER_PLACEHOLDER),
                None => {}
            }
        }
    });
}

/// A bootstrap serving `route_config` statically, with an empty cluster for every cluster it
/// routes to (Envoy checks that they exist).
fn bootstrap_with_routes(route_config: &Value) -> Value {
    let mut clusters = BTreeSet::new();
    visit(route_config, &mut |node| {
        if let Some(name) = node.pointer("/route/cluster").and_then(Value::as_str) {
            clusters.insert(name.to_string());
        }
        if let Some(weighted) = node
            .pointer("/route/weighted_clusters/clusters")
            .and_then(Value::as_array)
        {
            for cluster in weighted {
                if let Some(name) = cluster["name"].as_str() {
                    clusters.insert(name.to_string());
                }
            }
        }
    });
    let clusters: Vec<Value> = clusters
        .iter()
        .map(|name| json!({"name": name, "type": "STATIC", "load_assignment": {"cluster_name": name}}))
        .collect();
    json!({
        "node": {"id": "docs", "cluster": "docs"},
        "static_resources": {
            "listeners": [{
                "name": "docs",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": 10000}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "docs",
                        "route_config": route_config,
                        "http_filters": [{
                            "name": "envoy.filters.http.router",
                            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}
                        }]
                    }
                }]}]
            }],
            "clusters": clusters
        }
    })
}

fn run_envoy_checks(checks: &[EnvoyCheck]) -> Vec<String> {
    let required = std::env::var("FLEDGE_REQUIRE_WASM").is_ok_and(|v| v == "1");
    let tools = paths::envoy_binary()
        .and_then(|envoy| Ok((envoy, (paths::filter_wasm()?, paths::observer_wasm()?))));
    let (envoy, (wasm, observer)) = match tools {
        Ok(tools) => tools,
        Err(e) if required => return vec![format!("cannot validate Envoy examples: {e:#}")],
        Err(e) => {
            eprintln!(
                "note: {} Envoy examples not validated ({e:#}); FLEDGE_REQUIRE_WASM=1 makes this an error",
                checks.len()
            );
            return Vec::new();
        }
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let rds_dir = dir.path().join("rds");
    std::fs::create_dir_all(&rds_dir).expect("rds dir");
    let rds_file = rds_dir.join("routes.json");
    std::fs::write(&rds_file, r#"{"version_info": "0", "resources": []}"#).expect("rds file");
    let mut failures = Vec::new();
    for (i, check) in checks.iter().enumerate() {
        let text = check
            .bootstrap
            .to_string()
            .replace(RDS_PLACEHOLDER, &rds_file.display().to_string())
            .replace(RDS_DIR_PLACEHOLDER, &rds_dir.display().to_string())
            .replace(WASM_PLACEHOLDER, &wasm.display().to_string())
            .replace(OBSERVER_PLACEHOLDER, &observer.display().to_string());
        let path = dir.path().join(format!("bootstrap-{i}.json"));
        std::fs::write(&path, text).expect("write bootstrap");
        let output = Command::new(&envoy)
            .args(["--mode", "validate", "--log-level", "error", "-c"])
            .arg(&path)
            .output()
            .expect("run envoy --mode validate");
        if !output.status.success() {
            let log = String::from_utf8_lossy(&output.stderr);
            let last = log.lines().last().unwrap_or_default();
            failures.push(format!(
                "{}: Envoy --mode validate rejects it: {last}",
                check.at
            ));
        }
    }
    failures
}

// ---------------------------------------------------------------------------------------------
// The tests

fn spec_keys() -> BTreeSet<String> {
    let crd = crd_json().expect("CRD");
    spec_schema(&crd)["properties"]
        .as_object()
        .expect("spec properties")
        .keys()
        .cloned()
        .collect()
}

fn spec_schema(crd: &Value) -> &Value {
    &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
}

#[test]
fn every_yaml_and_json_example_in_the_docs_is_accepted_by_the_real_parsers() {
    let spec_keys = spec_keys();
    let mut outcome = Outcome::default();
    let mut blocks = 0;
    for path in markdown_files() {
        let text = std::fs::read_to_string(&path).expect("read markdown");
        for block in code_blocks(&relative(&path), &text) {
            if matches!(block.lang.as_str(), "yaml" | "yml" | "json") {
                blocks += 1;
                check_block(&block, &spec_keys, &mut outcome);
            }
        }
    }
    let envoy_failures = run_envoy_checks(&outcome.envoy);
    outcome.failures.extend(envoy_failures);
    eprintln!("checked {blocks} blocks: {:?}", outcome.checked);
    assert!(
        outcome.failures.is_empty(),
        "{} docs example(s) are wrong:\n- {}",
        outcome.failures.len(),
        outcome.failures.join("\n- ")
    );
    // The docs hold at least these kinds; a parser that silently matched nothing would fail here.
    for kind in [
        "Canary",
        "Canary spec fragment",
        "workload object (checked against the Canary's targetRef)",
        "filter configuration",
        "Envoy bootstrap",
        "Envoy routes",
        "RDS DiscoveryResponse",
    ] {
        assert!(
            outcome.checked.contains_key(kind),
            "no {kind} example was found in the docs: {:?}",
            outcome.checked
        );
    }
}

#[test]
fn a_block_of_unknown_kind_or_an_invalid_example_fails_with_the_fix() {
    let spec_keys = spec_keys();
    let block = |lang: &str, tags: &[&str], text: &str| Block {
        file: "x.md".to_string(),
        line: 7,
        lang: lang.to_string(),
        tags: tags.iter().map(|t| t.to_string()).collect(),
        text: text.to_string(),
    };
    let failures = |b: Block| {
        let mut outcome = Outcome::default();
        check_block(&b, &spec_keys, &mut outcome);
        outcome.failures
    };
    let unknown = failures(block("yaml", &[], "ignoreDifferences: []\n"));
    assert_eq!(unknown.len(), 1, "{unknown:?}");
    assert!(
        unknown[0].starts_with("x.md:7 (```yaml): is not a kind"),
        "{unknown:?}"
    );
    assert!(unknown[0].contains("```yaml external"), "{unknown:?}");
    assert!(failures(block("yaml", &["external"], "ignoreDifferences: []\n")).is_empty());
    let bad_fragment = failures(block("yaml", &[], "analysis:\n  threshold: -1\n"));
    assert_eq!(bad_fragment.len(), 1, "{bad_fragment:?}");
    let bad_filter = failures(block("json", &[], r#"{"istioClusterName": true}"#));
    assert!(bad_filter[0].contains("did you mean"), "{bad_filter:?}");
    let bad_canary = failures(block(
        "yaml",
        &[],
        "apiVersion: fledge.dev/v1alpha1\nkind: Canary\nmetadata: {name: app}\nspec: {service: app}\n",
    ));
    assert!(
        bad_canary[0].contains("spec loader rejects"),
        "{bad_canary:?}"
    );
    let unknown_object = failures(block("yaml", &[], "apiVersion: v1\nkind: Pod\n"));
    assert!(
        unknown_object[0].contains("no parser for v1 Pod"),
        "{unknown_object:?}"
    );
    let workload = |pod_labels: &str| {
        format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: app}}\nspec:\n  \
             selector: {{matchLabels: {{app: app, fledge.dev/track: canary}}}}\n  \
             template: {{metadata: {{labels: {pod_labels}}}}}\n---\n\
             apiVersion: fledge.dev/v1alpha1\nkind: Canary\nmetadata: {{name: app}}\nspec:\n  \
             targetRef: {{name: app}}\n  service: app\n  stable: {{subset: stable}}\n  \
             canary: {{subset: canary}}\n  \
             metricsSource: {{prometheus: {{address: \"http://prometheus:9090\"}}}}\n  \
             router: {{istio: {{virtualService: app, route: primary}}}}\n  \
             analysis: {{stepWeights: [10, 50], metrics: [{{name: request-success-rate, thresholdRange: {{min: 99}}}}]}}\n"
        )
    };
    assert_eq!(
        failures(block(
            "yaml",
            &[],
            &workload("{app: app, fledge.dev/track: canary}")
        )),
        Vec::<String>::new()
    );
    let untracked = failures(block("yaml", &[], &workload("{app: app}")));
    assert!(
        untracked[0].contains("have no fledge.dev/track label")
            && untracked[0].contains("add `fledge.dev/track: canary`"),
        "{untracked:?}"
    );
    let alone = failures(block(
        "yaml",
        &[],
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: other}\n",
    ));
    assert!(alone[0].contains("no Canary in this block"), "{alone:?}");
    let syntax = failures(block("yaml", &[], "a: [1, 2\n"));
    assert!(syntax[0].contains("does not parse"), "{syntax:?}");
}

#[test]
fn code_blocks_are_found_with_their_tags_and_list_indentation() {
    let text =
        "intro\n\n- item\n\n  ```yaml external\n  a: 1\n    b: 2\n  ```\n\n```json\n{}\n```\n";
    let blocks = code_blocks("f.md", text);
    assert_eq!(blocks.len(), 2);
    assert_eq!((blocks[0].line, blocks[0].lang.as_str()), (5, "yaml"));
    assert_eq!(blocks[0].tags, vec!["external".to_string()]);
    assert_eq!(blocks[0].text, "a: 1\n  b: 2");
    assert_eq!((blocks[1].line, blocks[1].text.as_str()), (10, "{}"));
}

// ---------------------------------------------------------------------------------------------
// The spec reference

const REFERENCE_BEGIN: &str = "<!-- BEGIN field reference: generated by `make docs` from the \
    spec's doc comments (core/src/spec/types.rs); edit those, not this table -->";
const REFERENCE_END: &str = "<!-- END field reference -->";

/// One row per field of the CRD's `spec` schema: path, type, required or default, meaning.
fn field_reference(crd: &Value) -> Result<String, Vec<String>> {
    let mut rows = Vec::new();
    let mut missing = Vec::new();
    reference_rows(spec_schema(crd), "", &mut rows, &mut missing);
    if !missing.is_empty() {
        return Err(missing);
    }
    let mut table =
        String::from("| field | type | default | meaning |\n| --- | --- | --- | --- |\n");
    for row in rows {
        table.push_str(&row);
        table.push('\n');
    }
    Ok(table)
}

fn reference_rows(schema: &Value, prefix: &str, rows: &mut Vec<String>, missing: &mut Vec<String>) {
    let Some(properties) = schema["properties"].as_object() else {
        return;
    };
    let required: BTreeSet<&str> = schema["required"]
        .as_array()
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    for (name, field) in properties {
        let path = format!("{prefix}{name}");
        let description = field["description"].as_str().unwrap_or_default();
        if description.trim().is_empty() {
            missing.push(path.clone());
        }
        let default = match (&field["default"], required.contains(name.as_str())) {
            (_, true) => "required".to_string(),
            (Value::Null, false) => "—".to_string(),
            (value, false) => format!("`{}`", value.to_string().trim_matches('"')),
        };
        rows.push(format!(
            "| `{path}` | {} | {default} | {} |",
            type_of(field),
            one_line(description)
        ));
        reference_rows(field, &format!("{path}."), rows, missing);
        if field["type"] == "array" {
            reference_rows(&field["items"], &format!("{path}[]."), rows, missing);
        }
    }
}

fn type_of(field: &Value) -> String {
    if let Some(values) = field["enum"].as_array() {
        let values: Vec<String> = values
            .iter()
            .map(|v| format!("`{}`", v.as_str().unwrap_or_default()))
            .collect();
        return format!("one of {}", values.join(", "));
    }
    if field["pattern"]
        .as_str()
        .is_some_and(|p| p.contains("ms|s|m|h"))
    {
        return "duration".to_string();
    }
    match field["type"].as_str().unwrap_or_default() {
        "array" => format!("list of {}", type_of(&field["items"])),
        "object" if field["additionalProperties"].is_object() => {
            format!("map of {}", type_of(&field["additionalProperties"]))
        }
        other => other.to_string(),
    }
}

/// A doc comment as one table cell: lines joined, rustdoc links unwrapped, pipes escaped.
fn one_line(text: &str) -> String {
    let joined = text.split_whitespace().collect::<Vec<_>>().join(" ");
    joined
        .replace("[`", "`")
        .replace("`]", "`")
        .replace('|', "\\|")
}

#[test]
fn the_spec_reference_in_docs_is_generated_from_the_schema_doc_comments() {
    let crd = crd_json().expect("CRD");
    let table = field_reference(&crd).unwrap_or_else(|missing| {
        panic!(
            "these spec fields have no doc comment, so docs/spec.md cannot explain them: {}. \
             Add a /// comment to each field in core/src/spec/types.rs (or the type it uses), then \
             run `make crd docs`.",
            missing.join(", ")
        )
    });
    let path = paths::workspace_root().join("docs/spec.md");
    let text = std::fs::read_to_string(&path).expect("read docs/spec.md");
    let (Some(begin), Some(end)) = (text.find(REFERENCE_BEGIN), text.find(REFERENCE_END)) else {
        panic!("docs/spec.md lacks the markers\n{REFERENCE_BEGIN}\n{REFERENCE_END}");
    };
    let generated = format!("{REFERENCE_BEGIN}\n\n{table}\n{REFERENCE_END}");
    let current = &text[begin..end + REFERENCE_END.len()];
    if current == generated {
        return;
    }
    if std::env::var("FLEDGE_UPDATE_DOCS").is_ok_and(|v| v == "1") {
        let updated = text.replacen(current, &generated, 1);
        std::fs::write(&path, updated).expect("write docs/spec.md");
        eprintln!("updated the field reference in docs/spec.md");
        return;
    }
    let old: BTreeSet<&str> = current.lines().filter(|l| l.starts_with("| `")).collect();
    let new: BTreeSet<&str> = generated.lines().filter(|l| l.starts_with("| `")).collect();
    panic!(
        "docs/spec.md's field reference is stale; run `make docs` to regenerate it from the doc \
         comments.\nonly in docs/spec.md:\n{}\nonly in the schema:\n{}",
        old.difference(&new).cloned().collect::<Vec<_>>().join("\n"),
        new.difference(&old).cloned().collect::<Vec<_>>().join("\n"),
    );
}

// ---------------------------------------------------------------------------------------------
// Links

/// GitHub's anchor for a heading: lowercase, punctuation dropped, spaces to hyphens.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == '-' || *c == ' ' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

fn headings(text: &str) -> BTreeSet<String> {
    let mut in_code = false;
    let mut found = BTreeSet::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
        } else if !in_code && line.starts_with('#') {
            found.insert(anchor(line.trim_start_matches('#')));
        }
    }
    found
}

#[test]
fn relative_links_in_the_docs_point_at_files_and_headings_that_exist() {
    let mut broken = Vec::new();
    for path in markdown_files() {
        let text = std::fs::read_to_string(&path).expect("read markdown");
        for target in link_targets(&text) {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let (file, fragment) = target.split_once('#').unwrap_or((target.as_str(), ""));
            let resolved = if file.is_empty() {
                path.clone()
            } else {
                path.parent().expect("parent").join(file)
            };
            if !resolved.exists() {
                broken.push(format!("{}: {target}: no such file", relative(&path)));
                continue;
            }
            if !fragment.is_empty() && resolved.extension().is_some_and(|e| e == "md") {
                let text = std::fs::read_to_string(&resolved).expect("read target");
                if !headings(&text).contains(fragment) {
                    broken.push(format!("{}: {target}: no such heading", relative(&path)));
                }
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

/// The targets of `[text](target)` links outside code.
fn link_targets(text: &str) -> Vec<String> {
    let mut targets = Vec::new();
    let mut in_code = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
            continue;
        }
        if in_code {
            continue;
        }
        let mut rest = line;
        while let Some(start) = rest.find("](") {
            let after = &rest[start + 2..];
            let Some(end) = after.find(')') else { break };
            targets.push(after[..end].to_string());
            rest = &after[end..];
        }
    }
    targets
}
