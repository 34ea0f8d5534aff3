//! The YAML under `manifests/` parsed and checked against the code: the CRD is the generated one,
//! RBAC grants exactly the rules in `rbac.rs`, the Deployment is hardened and its probes match the
//! controller's, the kustomizations list files that exist, and the examples are valid and fit
//! each other (the Canary's route exists in the VirtualService, the DestinationRule has the
//! subsets).

use super::crd::{crd_yaml, CanaryResource};
use super::rbac::{Permission, CLUSTER_PERMISSIONS, LEASE_PERMISSIONS};
use crate::router::factory::weights_in;
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn manifests() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests")
}

fn read(relative: &str) -> String {
    let path = manifests().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// All documents of a multi-document YAML file, as JSON.
fn documents(relative: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(&read(relative))
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{relative}: {e}")))
        .filter(|doc| !doc.is_null())
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

type Rule = (String, String, String);

fn rules_of(role: &Value) -> BTreeSet<Rule> {
    let mut rules = BTreeSet::new();
    for rule in role["rules"].as_array().expect("rules") {
        assert!(rule.get("resourceNames").is_none());
        for group in rule["apiGroups"].as_array().unwrap() {
            for resource in rule["resources"].as_array().unwrap() {
                for verb in rule["verbs"].as_array().unwrap() {
                    assert_ne!(verb, "*", "no wildcards");
                    rules.insert((
                        group.as_str().unwrap().to_string(),
                        resource.as_str().unwrap().to_string(),
                        verb.as_str().unwrap().to_string(),
                    ));
                }
            }
        }
    }
    rules
}

fn table(permissions: &[Permission]) -> BTreeSet<Rule> {
    permissions
        .iter()
        .flat_map(|p| {
            p.verbs.iter().map(|v| {
                (
                    p.api_group.to_string(),
                    p.resource.to_string(),
                    v.to_string(),
                )
            })
        })
        .collect()
}

/// Every rule `manifests/rbac.yaml` grants the controller (ClusterRole + lease Role).
pub(super) fn granted_rules() -> BTreeSet<Rule> {
    let docs = documents("rbac.yaml");
    let mut rules = rules_of(find(&docs, "ClusterRole", "fledge"));
    rules.extend(rules_of(find(&docs, "Role", "fledge-leader-election")));
    rules
}

#[test]
fn crd_yaml_is_the_generated_one() {
    let generated = crd_yaml().unwrap();
    assert!(
        read("crd.yaml") == generated,
        "manifests/crd.yaml is stale; regenerate it with `make crd` (fledge crd > manifests/crd.yaml)"
    );
}

#[test]
fn rbac_grants_exactly_the_permissions_the_code_declares() {
    for file in ["rbac.yaml", "gateway-sidecar/rbac.yaml"] {
        let docs = documents(file);
        assert_eq!(
            rules_of(find(&docs, "ClusterRole", "fledge")),
            table(CLUSTER_PERMISSIONS),
            "{file}"
        );
        let lease_role = find(&docs, "Role", "fledge-leader-election");
        assert_eq!(rules_of(lease_role), table(LEASE_PERMISSIONS), "{file}");
        // Bindings point the roles at one ServiceAccount, leases only in its namespace.
        let binding = docs
            .iter()
            .find(|d| d["kind"] == "ClusterRoleBinding" && d["roleRef"]["name"] == "fledge")
            .expect("a ClusterRoleBinding");
        let subject = &binding["subjects"][0];
        let role_binding = find(&docs, "RoleBinding", "fledge-leader-election");
        assert_eq!(role_binding["subjects"][0], *subject, "{file}");
        assert_eq!(
            role_binding["metadata"]["namespace"], subject["namespace"],
            "{file}"
        );
        assert_eq!(
            lease_role["metadata"]["namespace"], subject["namespace"],
            "{file}"
        );
    }
    let docs = documents("rbac.yaml");
    let account = find(&docs, "ServiceAccount", "fledge");
    assert_eq!(account["metadata"]["namespace"], "fledge-system");
}

fn assert_hardened(container: &Value, what: &str) {
    let security = &container["securityContext"];
    assert_eq!(security["allowPrivilegeEscalation"], false, "{what}");
    assert_eq!(security["readOnlyRootFilesystem"], true, "{what}");
    assert_eq!(
        security["capabilities"]["drop"],
        serde_json::json!(["ALL"]),
        "{what}"
    );
    assert!(
        container["resources"]["requests"]["memory"].is_string(),
        "{what}"
    );
    assert!(
        container["resources"]["limits"]["memory"].is_string(),
        "{what}"
    );
    assert_eq!(container["args"][0], "controller", "{what}");
    let env: Vec<&str> = container["env"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["valueFrom"]["fieldRef"].is_object())
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        env,
        ["POD_NAME", "POD_NAMESPACE"],
        "{what}: identity and lease namespace"
    );
    assert_eq!(
        container["livenessProbe"]["httpGet"]["path"], "/healthz",
        "{what}"
    );
}

fn listen_port(container: &Value) -> u16 {
    container["args"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a.as_str()?.strip_prefix("--listen="))
        .filter_map(|addr| addr.parse::<std::net::SocketAddr>().ok())
        .map(|addr| addr.port())
        .next()
        .expect("--listen")
}

#[test]
fn controller_deployment_is_hardened_and_probes_what_it_serves() {
    let docs = documents("controller.yaml");
    let deployment = find(&docs, "Deployment", "fledge-controller");
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "fledge");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let container = &pod["containers"][0];
    assert_hardened(container, "controller.yaml");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    let port = container["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == container["livenessProbe"]["httpGet"]["port"])
        .expect("the probe port is declared")["containerPort"]
        .as_u64();
    assert_eq!(port, Some(u64::from(listen_port(container))));
    assert!(
        deployment["spec"]["replicas"].as_u64().unwrap() >= 2,
        "a standby replica"
    );
    // Prometheus scrapes the port the controller serves /metrics on; the Service reaches it.
    let annotations = &deployment["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/path"], "/metrics");
    assert_eq!(
        annotations["prometheus.io/port"].as_str(),
        Some(listen_port(container).to_string().as_str())
    );
    let service = find(&docs, "Service", "fledge-controller");
    assert_eq!(
        service["spec"]["selector"],
        deployment["spec"]["template"]["metadata"]["labels"]
    );
    assert_eq!(
        service["spec"]["ports"][0]["targetPort"],
        container["livenessProbe"]["httpGet"]["port"]
    );
}

#[test]
fn gateway_sidecar_patch_is_hardened_and_never_gates_gateway_readiness() {
    let docs = documents("gateway-sidecar/gateway-patch.yaml");
    let container = &docs[0]["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["name"], "fledge");
    assert_hardened(container, "gateway-patch.yaml");
    assert!(container.get("readinessProbe").is_none());
    assert_eq!(
        container["livenessProbe"]["httpGet"]["port"].as_u64(),
        Some(u64::from(listen_port(container)))
    );
    assert!(!(15000..15100).contains(&listen_port(container)) && listen_port(container) != 8080);
}

#[test]
fn kustomizations_list_files_that_exist() {
    for dir in ["", "gateway-sidecar/", "examples/"] {
        let kustomization = documents(&format!("{dir}kustomization.yaml"));
        for resource in kustomization[0]["resources"].as_array().unwrap() {
            let path = manifests().join(dir).join(resource.as_str().unwrap());
            assert!(
                path.is_file(),
                "{dir}kustomization.yaml lists missing {}",
                path.display()
            );
        }
    }
}

#[test]
fn examples_are_valid_and_fit_together() {
    let istio = documents("examples/istio.yaml");
    let vs = find(&istio, "VirtualService", "app");
    let rule = find(&istio, "DestinationRule", "app");
    let subsets: Vec<&str> = rule["spec"]["subsets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    for file in [
        "examples/canary.yaml",
        "examples/canary-gateway-sidecar.yaml",
    ] {
        let canary: CanaryResource =
            serde_yaml::from_str(&read(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        let core = canary.to_core();
        core.validate().unwrap_or_else(|e| panic!("{file}: {e}"));
        let weights = weights_in(&core.spec, "shop", vs).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!((weights.stable, weights.canary), (100, 0));
        assert!(subsets.contains(&core.spec.stable.subset.as_str()));
        assert!(subsets.contains(&core.spec.canary.subset.as_str()));
    }
    let app = documents("examples/app.yaml");
    for (deployment, version) in [("app-v1", "v1"), ("app-v2", "v2")] {
        let labels =
            &find(&app, "Deployment", deployment)["spec"]["template"]["metadata"]["labels"];
        assert_eq!(labels["version"], version);
    }
    assert_eq!(rule["spec"]["subsets"][0]["labels"]["version"], "v1");
    assert_eq!(rule["spec"]["subsets"][1]["labels"]["version"], "v2");
}

/// The workload example (`spec.targetRef`): the Canary is valid and its route starts at 100/0,
/// the Deployment carries the track label where the lifecycle needs it, the HPA scales it, the
/// DestinationRule's subsets select the primary copy's pods and the target's by the track
/// label, and the Service selects both.
#[test]
fn workload_example_is_valid_and_fits_together() {
    use fledge_core::workload::{check_autoscaler, check_target, primary_object, Owner};
    let file = "examples/workload.yaml";
    let docs = documents(file);
    let canary: CanaryResource = serde_json::from_value(find(&docs, "Canary", "app").clone())
        .unwrap_or_else(|e| panic!("{file}: {e}"));
    let core = canary.to_core();
    core.validate().unwrap_or_else(|e| panic!("{file}: {e}"));
    let spec = &core.spec;
    let target_ref = spec.target_ref.as_ref().expect("targetRef");
    let hpa_ref = spec.autoscaler_ref.as_ref().expect("autoscalerRef");
    let track = spec.track_label();

    let vs = find(&docs, "VirtualService", "app");
    let weights = weights_in(spec, "shop", vs).unwrap_or_else(|e| panic!("{file}: {e}"));
    assert_eq!((weights.stable, weights.canary), (100, 0));

    let target = find(&docs, "Deployment", &target_ref.name);
    let problems = check_target(target, track);
    assert!(problems.is_empty(), "{file}: {problems:?}");
    let hpa = find(&docs, "HorizontalPodAutoscaler", &hpa_ref.name);
    assert_eq!(check_autoscaler(hpa, &target_ref.name), None);

    let owner = Owner {
        namespace: "shop".into(),
        name: "app".into(),
        uid: "uid".into(),
    };
    let primary = primary_object(target, track, 2, &owner);
    let rule = find(&docs, "DestinationRule", "app");
    let subset_labels = |name: &str| {
        rule["spec"]["subsets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .unwrap_or_else(|| panic!("{file}: no subset {name}"))["labels"]
            .clone()
    };
    let selects = |labels: &Value, pod: &Value| {
        labels
            .as_object()
            .unwrap()
            .iter()
            .all(|(k, v)| &pod[k] == v)
    };
    let pods = |deployment: &Value| deployment["spec"]["template"]["metadata"]["labels"].clone();
    let (stable, canary_subset) = (
        subset_labels(&spec.stable.subset),
        subset_labels(&spec.canary.subset),
    );
    assert!(selects(&stable, &pods(&primary)) && !selects(&stable, &pods(target)));
    assert!(selects(&canary_subset, &pods(target)) && !selects(&canary_subset, &pods(&primary)));
    let service = find(&docs, "Service", &spec.service);
    let selector = &service["spec"]["selector"];
    assert!(
        selector.get(track).is_none(),
        "the Service selects both tracks"
    );
    assert!(selects(selector, &pods(target)) && selects(selector, &pods(&primary)));
    assert!(
        target["spec"].get("replicas").is_none(),
        "{file}: the HPA and Fledge own the target's replicas"
    );
}

/// The Gateway API examples: each Canary is valid, its HTTPRoute rule starts at 100/0 with the
/// backends it names, and the filter it installs (TrafficExtension in a waypoint, Envoy
/// Gateway's EnvoyExtensionPolicy) parses, names the Canary's service and subsets, and guards
/// the service when the Canary has `analysis.guard`.
#[test]
fn gateway_api_examples_are_valid_and_fit_together() {
    use fledge_core::filter_config::FilterConfig;
    for (file, filter_kind, config_path) in [
        (
            "examples/ambient.yaml",
            "TrafficExtension",
            "/spec/wasm/pluginConfig",
        ),
        (
            "examples/envoy-gateway.yaml",
            "EnvoyExtensionPolicy",
            "/spec/wasm/0/config",
        ),
    ] {
        let docs = documents(file);
        let canary: CanaryResource = serde_json::from_value(find(&docs, "Canary", "app").clone())
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        let core = canary.to_core();
        core.validate().unwrap_or_else(|e| panic!("{file}: {e}"));
        let route = find(&docs, "HTTPRoute", "app");
        let weights =
            weights_in(&core.spec, "shop", route).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!((weights.stable, weights.canary), (100, 0), "{file}");
        let filter = find(&docs, filter_kind, "fledge");
        let config = FilterConfig::from_value(filter.pointer(config_path).expect("config"))
            .unwrap_or_else(|e| panic!("{file}: filter config rejected: {e}"));
        assert!(
            config
                .clusters
                .values()
                .all(|c| c.service == core.spec.service),
            "{file}: every cluster is the Canary's service"
        );
        let subsets: Vec<String> = config
            .clusters
            .values()
            .filter_map(|c| c.subset.clone())
            .collect();
        for subset in &subsets {
            assert!(
                [&core.spec.stable.subset, &core.spec.canary.subset].contains(&subset),
                "{file}: subset {subset}"
            );
        }
        assert_eq!(
            core.spec.analysis.guard.is_some(),
            config
                .guard
                .as_ref()
                .is_some_and(|g| g.services.contains_key(&core.spec.service)),
            "{file}: the filter guards the service exactly when the Canary watches the guard"
        );
    }
}
