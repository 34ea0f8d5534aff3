//! The stand-ins the workload tests rely on, without a controller: the kubelet runs each
//! Deployment's pods as real processes and writes their readiness into its status; the istiod
//! stand-in routes each DestinationRule subset to the pods whose labels match, in a real Envoy
//! with the Fledge filter. A subset without pods fails requests, as in a mesh.

use anyhow::{ensure, Result};
use fledge_e2e::kubernetes::require;
use fledge_e2e::workload::{deployment, routing_and_canary, template, WorkloadStack};
use fledge_e2e::{http, init_tracing, LoadGen, LoadOptions, ScratchDir};
use serde_json::{json, Value};
use std::time::Duration;

const NS: &str = "shop";

fn primary() -> Value {
    let mut primary = deployment(NS, "app-primary", "app:v1", 1, &[]);
    primary["spec"]["selector"]["matchLabels"]["fledge.dev/track"] = json!("stable");
    primary["spec"]["template"]["metadata"]["labels"]["fledge.dev/track"] = json!("stable");
    primary
}

fn set_weights(stack: &WorkloadStack, stable: u32, canary: u32) -> Result<()> {
    http::patch_merge(
        &format!(
            "{}/apis/networking.istio.io/v1/namespaces/{NS}/virtualservices/app",
            stack.cluster.url()
        ),
        &json!({"spec": {"http": [{"name": "primary", "route": [
            {"destination": {"host": "app", "subset": "stable"}, "weight": stable},
            {"destination": {"host": "app", "subset": "canary"}, "weight": canary}
        ]}]}}),
        Duration::from_secs(3),
    )?;
    Ok(())
}

fn status(stack: &WorkloadStack, name: &str) -> Value {
    stack
        .deployment(NS, name)
        .map(|d| d["status"].clone())
        .unwrap_or_default()
}

#[test]
fn pods_run_as_processes_and_subsets_route_to_the_pods_whose_labels_match() -> Result<()> {
    init_tracing();
    let dir = ScratchDir::temp("workload-standins")?;
    let stack = WorkloadStack::start(dir.path(), NS, |admin| {
        let mut objects = vec![deployment(NS, "app", "app:v2", 2, &[]), primary()];
        // The VirtualService and DestinationRule only (no Canary: nothing but the stand-ins).
        objects.extend(
            routing_and_canary(NS, admin, json!({}), json!({}))
                .into_iter()
                .take(2),
        );
        objects
    })?;
    require(
        "both Deployments available",
        Duration::from_secs(30),
        || {
            Ok(status(&stack, "app")["availableReplicas"] == 2
                && status(&stack, "app-primary")["availableReplicas"] == 1)
        },
    )?;
    let app = status(&stack, "app");
    ensure!(
        app["observedGeneration"] == 1 && app["updatedReplicas"] == 2,
        "{app}"
    );
    ensure!(
        app["conditions"][0]["type"] == "Available" && app["conditions"][0]["status"] == "True",
        "{app}"
    );
    let load = LoadGen::start(
        &stack.envoy.listener_url(),
        LoadOptions::new(80, Duration::from_secs(60)),
    )?;
    let window = |seconds: u64| {
        let before = load.snapshot();
        std::thread::sleep(Duration::from_secs(seconds));
        load.snapshot().since(&before)
    };
    let result = (|| -> Result<()> {
        // Stable 100: only the primary's pods (v1) answer.
        require("v1 served", Duration::from_secs(10), || {
            Ok(window(1).version_count("v1") > 10)
        })?;
        let seen = window(2);
        ensure!(
            seen.version_share("v1") == 1.0 && seen.server_errors() == 0,
            "{}",
            seen.summary()
        );
        // Canary 100: the target's pods (v2), both of them.
        set_weights(&stack, 0, 100)?;
        require("v2 served", Duration::from_secs(10), || {
            Ok(window(1).version_share("v2") == 1.0)
        })?;
        let before = stack.kubelet.served();
        let seen = window(2);
        ensure!(seen.server_errors() == 0, "{}", seen.summary());
        let after = stack.kubelet.served();
        let busy: Vec<&String> = after
            .iter()
            .filter(|(pod, n)| {
                pod.starts_with("app-")
                    && !pod.starts_with("app-primary")
                    && **n > before.get(*pod).copied().unwrap_or(0)
            })
            .map(|(pod, _)| pod)
            .collect();
        ensure!(busy.len() == 2, "both v2 pods serve: {after:?}");

        // A revision that never becomes ready: the old pods keep serving, the status says so.
        http::patch_merge(
            &stack.deployment_url(NS, "app"),
            &json!({"spec": {"template": template("app:v3", &[("NEVER_READY", "true")])}}),
            Duration::from_secs(3),
        )?;
        require("the v3 pods started", Duration::from_secs(15), || {
            let s = status(&stack, "app");
            Ok(s["observedGeneration"] == 2 && s["updatedReplicas"] == 2 && s["replicas"] == 4)
        })?;
        let seen = window(2);
        ensure!(
            seen.version_share("v2") == 1.0 && seen.server_errors() == 0,
            "only the ready (old) pods get requests: {}",
            seen.summary()
        );
        ensure!(status(&stack, "app")["availableReplicas"] == 2);

        // Back to stable, scale the target to 0 through the scale subresource: its pods go.
        set_weights(&stack, 100, 0)?;
        require("v1 again", Duration::from_secs(10), || {
            Ok(window(1).version_share("v1") == 1.0)
        })?;
        http::patch_merge(
            &format!("{}/scale", stack.deployment_url(NS, "app")),
            &json!({"spec": {"replicas": 0}}),
            Duration::from_secs(3),
        )?;
        require("the target's pods gone", Duration::from_secs(15), || {
            Ok(stack.kubelet.pods().iter().all(|p| p.deployment != "app")
                && status(&stack, "app")["replicas"] == 0)
        })?;
        let seen = window(1);
        ensure!(seen.server_errors() == 0, "{}", seen.summary());

        // A subset without pods fails requests (no healthy upstream): what Fledge must avoid.
        set_weights(&stack, 0, 100)?;
        require(
            "503s from the empty subset",
            Duration::from_secs(10),
            || Ok(window(1).status_count(503) > 10),
        )?;
        Ok(())
    })();
    let report = load.stop();
    result.map_err(|e| e.context(report.summary()))
}
