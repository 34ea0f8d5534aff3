//! The install manifests in `manifests/filter/` say what Istio and Envoy expect, and every
//! plugin configuration in them is accepted by the filter's own parser.
// Test helpers may fail loudly; the no-panic lints guard the filter's runtime code.
#![allow(
    clippy::panic,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing
)]

use fledge_core::contract;
use fledge_core::filter_config::{FilterConfig, FilterModule};
use serde::Deserialize;
use serde_json::{json, Value};
use std::path::PathBuf;

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../manifests/filter")
}

fn read(name: &str) -> String {
    let path = manifest_dir().join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every YAML document in a file, as JSON values.
fn documents(name: &str) -> Vec<Value> {
    let text = read(name);
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{name}: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

fn at<'a>(value: &'a Value, path: &str) -> &'a Value {
    path.split('.')
        .fold(value, |v, key| match key.parse::<usize>() {
            Ok(i) => &v[i],
            Err(_) => &v[key],
        })
}

fn str_at<'a>(value: &'a Value, path: &str) -> &'a str {
    at(value, path)
        .as_str()
        .unwrap_or_else(|| panic!("{path} is not a string in {value}"))
}

/// The module a manifest loads, from its URL or file name: the observer's image or file says
/// "observer", anything else is the full module.
fn module_of(location: &str) -> FilterModule {
    if location.contains("fledge-observer") || location.contains("fledge_observer") {
        FilterModule::Observer
    } else {
        FilterModule::Full
    }
}

fn parses(config: &Value, module: FilterModule, what: &str) -> FilterConfig {
    let config = FilterConfig::from_value(config)
        .unwrap_or_else(|e| panic!("{what}: pluginConfig rejected: {e}"));
    config
        .check_module(module)
        .unwrap_or_else(|e| panic!("{what}: pluginConfig rejected by {module:?}: {e}"));
    config
}

#[test]
fn wasm_plugins_target_the_gateway_fail_open_and_carry_a_valid_config() {
    for (file, scheme, module) in [
        ("wasmplugin.yaml", "oci://", FilterModule::Full),
        ("wasmplugin-file.yaml", "file://", FilterModule::Full),
        ("wasmplugin-observer.yaml", "oci://", FilterModule::Observer),
    ] {
        let docs = documents(file);
        assert_eq!(docs.len(), 1, "{file}");
        let plugin = &docs[0];
        assert_eq!(str_at(plugin, "apiVersion"), "extensions.istio.io/v1alpha1");
        assert_eq!(str_at(plugin, "kind"), "WasmPlugin");
        assert_eq!(
            str_at(plugin, "spec.selector.matchLabels.istio"),
            "ingressgateway"
        );
        let url = str_at(plugin, "spec.url");
        assert!(url.starts_with(scheme), "{file}");
        assert_eq!(module_of(url), module, "{file}: {url}");
        assert_eq!(str_at(plugin, "spec.failStrategy"), "FAIL_OPEN");
        assert!(
            ["UNSPECIFIED_PHASE", "STATS"].contains(&str_at(plugin, "spec.phase")),
            "{file}: phase must be before the router and after authz"
        );
        assert!(at(plugin, "spec.priority").is_i64(), "{file}: priority");
        assert_eq!(str_at(plugin, "spec.match.0.mode"), "CLIENT");
        let config = parses(at(plugin, "spec.pluginConfig"), module, file);
        if module == FilterModule::Full {
            // The full module's manifests show tagging; metrics alone belong in the observer.
            assert!(config.response_header.is_some() && config.sticky.is_some());
            assert!(config.force_canary.is_some(), "{file}");
        }
    }
}

#[test]
fn traffic_extension_matches_the_wasm_plugin_and_guards_the_service() {
    let docs = documents("trafficextension.yaml");
    assert_eq!(docs.len(), 1);
    let extension = &docs[0];
    assert_eq!(
        str_at(extension, "apiVersion"),
        "extensions.istio.io/v1alpha1"
    );
    assert_eq!(str_at(extension, "kind"), "TrafficExtension");
    assert_eq!(
        str_at(extension, "spec.selector.matchLabels.istio"),
        "ingressgateway"
    );
    assert!(
        extension["spec"].get("phase").is_none(),
        "unset phase: just before the router"
    );
    assert!(at(extension, "spec.priority").is_i64());
    assert_eq!(str_at(extension, "spec.match.0.mode"), "CLIENT");
    let wasm = at(extension, "spec.wasm");
    let url = str_at(wasm, "url");
    assert!(url.starts_with("oci://"));
    assert_eq!(str_at(wasm, "failStrategy"), "FAIL_OPEN");
    assert_eq!(str_at(wasm, "pluginName"), "fledge");
    // Tagging and the guard: the full module.
    assert_eq!(module_of(url), FilterModule::Full, "{url}");
    let config = parses(
        at(wasm, "pluginConfig"),
        FilterModule::Full,
        "trafficextension.yaml",
    );
    assert!(config.force_canary.is_some() && config.sticky.is_some());
    let guard = config.guard.expect("the guard is configured");
    assert_eq!(guard.header, contract::DEFAULT_GUARD_HEADER);
    assert!(guard.services.contains_key("app"));
    // The same plugin configuration as the WasmPlugin, plus the guard.
    let plugin = &documents("wasmplugin.yaml")[0];
    let mut expected = at(plugin, "spec.pluginConfig").clone();
    expected["guard"] = at(wasm, "pluginConfig.guard").clone();
    assert_eq!(at(wasm, "pluginConfig"), &expected);
}

#[test]
fn envoy_filter_inserts_the_wasm_filter_before_the_router() {
    let docs = documents("envoyfilter.yaml");
    let filter = &docs[0];
    assert_eq!(str_at(filter, "kind"), "EnvoyFilter");
    assert_eq!(
        str_at(filter, "spec.workloadSelector.labels.istio"),
        "ingressgateway"
    );
    let patch = at(filter, "spec.configPatches.0");
    assert_eq!(str_at(patch, "applyTo"), "HTTP_FILTER");
    assert_eq!(str_at(patch, "match.context"), "GATEWAY");
    assert_eq!(
        str_at(patch, "match.listener.filterChain.filter.subFilter.name"),
        "envoy.filters.http.router"
    );
    assert_eq!(str_at(patch, "patch.operation"), "INSERT_BEFORE");
    let config = at(patch, "patch.value.typed_config.config");
    assert_eq!(str_at(config, "failure_policy"), "FAIL_OPEN");
    assert_eq!(str_at(config, "vm_config.runtime"), "envoy.wasm.runtime.v8");
    assert_eq!(
        str_at(config, "configuration.@type"),
        "type.googleapis.com/google.protobuf.StringValue"
    );
    let module = module_of(str_at(config, "vm_config.code.local.filename"));
    let plugin = FilterConfig::parse_for(module, str_at(config, "configuration.value").as_bytes())
        .unwrap_or_else(|e| panic!("envoyfilter.yaml configuration rejected: {e}"));
    assert!(plugin.sticky.is_some());
}

#[test]
fn plain_envoy_example_has_labels_routes_and_a_valid_config() {
    let docs = documents("envoy.yaml");
    let envoy = &docs[0];
    let tags = at(envoy, "stats_config.stats_tags")
        .as_array()
        .expect("stats_tags");
    for tag in contract::ALL_TAGS {
        assert!(
            tags.iter().any(|t| t["tag_name"] == tag
                && t["regex"].as_str() == Some(contract::stats_tag_regex(tag).as_str())),
            "stats_tags lacks {tag}"
        );
    }
    let hcm = at(
        envoy,
        "static_resources.listeners.0.filter_chains.0.filters.0.typed_config",
    );
    let wasm = &hcm["http_filters"][0];
    assert_eq!(wasm["name"], "envoy.filters.http.wasm");
    assert_eq!(hcm["http_filters"][1]["name"], "envoy.filters.http.router");
    let module = module_of(str_at(
        wasm,
        "typed_config.config.vm_config.code.local.filename",
    ));
    let config = FilterConfig::parse_for(
        module,
        str_at(wasm, "typed_config.config.configuration.value").as_bytes(),
    )
    .unwrap_or_else(|e| panic!("envoy.yaml configuration rejected: {e}"));
    let routes = at(hcm, "route_config.virtual_hosts.0.routes")
        .as_array()
        .expect("routes");
    // The forced-canary route comes first and matches the filter's route header.
    let forced = &routes[0]["match"]["headers"][0];
    assert_eq!(forced["name"].as_str(), Some(config.route_header.as_str()));
    assert_eq!(
        forced["string_match"]["exact"].as_str(),
        Some(contract::FORCED_CANARY_ROUTE_VALUE)
    );
    // The weighted route picks by the same header, stable first.
    let weighted = &routes[1]["route"]["weighted_clusters"];
    assert_eq!(
        weighted["header_name"].as_str(),
        Some(config.route_header.as_str())
    );
    assert_eq!(weighted["clusters"][0]["name"], "app_stable");
    assert!(config.clusters.contains_key("app_canary"));
}

#[test]
fn lean_envoy_example_counts_each_request_once_and_tags_from_the_route() {
    let docs = documents("envoy-lean.yaml");
    let hcm = at(
        &docs[0],
        "static_resources.listeners.0.filter_chains.0.filters.0.typed_config",
    );
    let filters = hcm["http_filters"].as_array().expect("http_filters");
    let names: Vec<&str> = filters.iter().filter_map(|f| f["name"].as_str()).collect();
    assert_eq!(
        names,
        [
            "fledge-observer",
            "fledge-forced-canary",
            "envoy.filters.http.router"
        ]
    );
    let config_of = |filter: &Value| {
        let module = module_of(str_at(
            filter,
            "typed_config.config.vm_config.code.local.filename",
        ));
        FilterConfig::parse_for(
            module,
            str_at(filter, "typed_config.config.configuration.value").as_bytes(),
        )
        .unwrap_or_else(|e| panic!("envoy-lean.yaml configuration rejected: {e}"))
    };
    let observer = config_of(&filters[0]);
    assert!(
        filters[0].get("disabled").is_none(),
        "the observer runs by default"
    );
    assert_eq!(
        filters[1]["disabled"], true,
        "the token checker is off by default"
    );
    let checker = config_of(&filters[1]);
    let token_header = checker
        .force_canary
        .as_ref()
        .expect("forceCanary")
        .header
        .clone();
    assert!(checker.sticky.is_none() && checker.response_header.is_none());

    let routes = at(hcm, "route_config.virtual_hosts.0.routes")
        .as_array()
        .expect("routes");
    // Every route but the weighted one runs the checker instead of the observer, and matches
    // the token or the route header.
    let (primary, checked) = routes.split_last().expect("routes");
    let mut matched = Vec::new();
    for route in checked {
        let per_filter = &route["typed_per_filter_config"];
        assert_eq!(per_filter["fledge-observer"]["disabled"], true, "{route}");
        assert!(
            per_filter["fledge-forced-canary"]["config"].is_object(),
            "{route}"
        );
        let header = &route["match"]["headers"][0];
        matched.push((
            header["name"].as_str().expect("header").to_string(),
            header["string_match"]["exact"].as_str().map(str::to_string),
        ));
    }
    assert_eq!(
        matched,
        [
            (
                checker.route_header.clone(),
                Some(contract::FORCED_CANARY_ROUTE_VALUE.to_string())
            ),
            (token_header, None),
            (checker.route_header.clone(), None),
        ]
    );
    assert_eq!(str_at(&routes[0], "route.cluster"), "app_canary");
    // Sticky from Envoy's hash; the subset header per cluster, as the filter would name it.
    assert_eq!(
        primary["route"]["weighted_clusters"]["use_hash_policy"],
        true
    );
    assert!(primary["route"]["hash_policy"][0]["cookie"]["name"].is_string());
    let clusters = primary["route"]["weighted_clusters"]["clusters"]
        .as_array()
        .expect("clusters");
    assert_eq!(clusters[0]["name"], "app_stable");
    for cluster in clusters {
        let name = cluster["name"].as_str().expect("name");
        let subset = observer.clusters[name].subset.as_deref();
        let added = &cluster["response_headers_to_add"][0];
        assert_eq!(added["header"]["value"].as_str(), subset, "{name}");
        assert_eq!(added["append_action"], "OVERWRITE_IF_EXISTS_OR_ADD");
    }
    // Each route names its cluster in the header both filters read it from (clusterHeader).
    let cluster_header = observer.cluster_header.clone().expect("clusterHeader");
    assert_eq!(checker.cluster_header.as_ref(), Some(&cluster_header));
    let named = |target: &Value| {
        target["response_headers_to_add"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|added| added["header"]["key"] == cluster_header.as_str())
            .map(|added| added["header"]["value"].clone())
    };
    for cluster in clusters {
        assert_eq!(named(cluster).as_ref(), Some(&cluster["name"]), "{cluster}");
    }
    assert_eq!(named(&routes[0]), Some(json!("app_canary")));
}

#[test]
fn istio_routing_uses_the_route_header() {
    let docs = documents("routing.yaml");
    let virtual_service = docs
        .iter()
        .find(|d| d["kind"] == "VirtualService")
        .expect("VirtualService");
    let forced = at(virtual_service, "spec.http.0.match.0.headers");
    assert_eq!(
        forced[contract::DEFAULT_ROUTE_HEADER]["exact"].as_str(),
        Some(contract::FORCED_CANARY_ROUTE_VALUE)
    );
    assert_eq!(
        str_at(virtual_service, "spec.http.1.route.0.destination.subset"),
        "stable"
    );
    let sticky = docs
        .iter()
        .find(|d| d["kind"] == "EnvoyFilter")
        .expect("EnvoyFilter");
    assert_eq!(
        str_at(
            sticky,
            "spec.configPatches.0.patch.value.route.weighted_clusters.header_name"
        ),
        contract::DEFAULT_ROUTE_HEADER
    );
}

#[test]
fn istio_native_routing_hashes_the_user_and_names_each_subset() {
    let docs = documents("routing-native.yaml");
    let virtual_service = docs
        .iter()
        .find(|d| d["kind"] == "VirtualService")
        .expect("VirtualService");
    for route in at(virtual_service, "spec.http").as_array().expect("http") {
        for destination in route["route"].as_array().expect("route") {
            assert_eq!(
                at(destination, "headers.response.set.x-fledge-subset"),
                at(destination, "destination.subset"),
                "{destination}"
            );
            // The Istio cluster name of the destination, for clusterHeader.
            let named = str_at(destination, "headers.response.set.x-fledge-cluster");
            let config =
                FilterConfig::parse(r#"{"clusterHeader": "x-fledge-cluster"}"#).expect("config");
            let labels = config.resolve(Some(named));
            assert_eq!(labels.service, "app", "{named}");
            assert_eq!(
                Some(labels.subset.as_str()),
                destination["destination"]["subset"].as_str(),
                "{named}"
            );
        }
    }
    let sticky = docs
        .iter()
        .find(|d| d["kind"] == "EnvoyFilter")
        .expect("EnvoyFilter");
    let route = at(sticky, "spec.configPatches.0.patch.value.route");
    assert_eq!(route["weighted_clusters"]["use_hash_policy"], true);
    assert!(route["weighted_clusters"].get("header_name").is_none());
    assert!(route["hash_policy"][0]["header"]["header_name"].is_string());
    assert_eq!(
        str_at(
            sticky,
            "spec.configPatches.0.match.routeConfiguration.vhost.route.name"
        ),
        str_at(virtual_service, "spec.http.1.name")
    );
}

#[test]
fn gateway_patch_and_image_follow_istio_conventions() {
    let docs = documents("gateway-patch.yaml");
    let annotations = at(&docs[0], "spec.template.metadata.annotations");
    let tags = annotations["sidecar.istio.io/extraStatTags"]
        .as_str()
        .expect("extraStatTags");
    for tag in contract::ALL_TAGS {
        assert!(
            tags.split(',').any(|t| t.trim() == tag),
            "extraStatTags lacks {tag}"
        );
    }
    // The filter counts duration buckets itself: no Envoy histogram settings needed.
    assert!(annotations
        .get("sidecar.istio.io/statsHistogramBuckets")
        .is_none());
    for key in [
        "sidecar.istio.io/userVolume",
        "sidecar.istio.io/userVolumeMount",
    ] {
        let json = annotations[key].as_str().unwrap_or_else(|| panic!("{key}"));
        serde_json::from_str::<Value>(json).unwrap_or_else(|e| panic!("{key}: {e}"));
    }
    let dockerfile = read("Dockerfile");
    let instructions: Vec<&str> = dockerfile
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert_eq!(instructions, vec!["FROM scratch", "COPY plugin.wasm ./"]);
}
