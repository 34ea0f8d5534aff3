//! Kubernetes mode end to end on real processes, without a cluster (see
//! `fledge_e2e::kubernetes`): the real `fledge controller` binary, against the fake API
//! server served over HTTP, moves the weights of a VirtualService; a stand-in for istiod copies
//! them into a real Envoy running the Fledge filter, whose per-subset metrics the controller
//! reads. Shown: a healthy canary paused, seen in the controller's dashboard in headless
//! chromium and in `fledge status --kubernetes`, promoted by `fledge promote --kubernetes`; a
//! failing canary rolled back with no canary traffic afterwards; a graceful SIGTERM releasing
//! the Lease.

use anyhow::{ensure, Context, Result};
use fledge_e2e::controller::weights_walked;
use fledge_e2e::kubernetes::{
    app_objects, exited_cleanly, require, FakeCluster, KubeController, MeshSync,
};
use fledge_e2e::{
    browser, http, init_tracing, paths, AppStack, LoadGen, LoadOptions, RouteWeights,
};
use serde_json::{json, Value};
use std::path::Path;
use std::time::Duration;

const NS: &str = "shop";

/// The spec pasted into the simulator page (any valid spec; the page is shared with
/// `fledge run`).
const SIMULATED_SPEC: &str = "apiVersion: fledge.dev/v1alpha1
kind: Canary
metadata: {name: checkout, namespace: shop}
spec:
  service: checkout
  stable: {subset: stable}
  canary: {subset: canary}
  metricsSource: {prometheus: {address: \"http://prometheus:9090\"}}
  router: {istio: {virtualService: checkout, route: primary}}
  analysis:
    interval: 30s
    stepWeights: [10, 30, 60]
    compareWithStable: {}
";
const SCENARIO: &str = r#"{"requestsPerMinute": 300, "canaryErrorRatio": 3, "seed": 5}"#;

fn fledge(kubeconfig: &Path, args: &[&str]) -> Result<(i32, String, String)> {
    browser::run_bounded_with_env(
        &paths::fledge_binary()?,
        args,
        &[("KUBECONFIG", kubeconfig)],
        Duration::from_secs(30),
    )
}

fn v2_share_over(load: &LoadGen, window: Duration) -> (f64, u64) {
    let before = load.snapshot();
    std::thread::sleep(window);
    let during = load.snapshot().since(&before);
    (during.version_share("v2"), during.responses())
}

#[test]
fn kubernetes_mode_steers_real_traffic_through_a_virtual_service() -> Result<()> {
    init_tracing();
    browser::dashboard_script()?;
    let stack = AppStack::builder("kubernetes").start()?;
    let (dir, canary, envoy) = (stack.path(), &stack.canary, &stack.envoy);
    let analysis = json!({
        "interval": "1s",
        "threshold": 3,
        "minCanaryRequests": 5,
        "steps": [{"setWeight": 20}, {"pause": {}}, {"setWeight": 50}],
        "metrics": [
            {"name": "request-success-rate", "thresholdRange": {"min": 99}},
            {"name": "request-duration", "quantile": 0.99, "thresholdRange": {"max": 500}}
        ]
    });
    let cluster = FakeCluster::start(
        &dir.join("api"),
        NS,
        &app_objects(NS, &envoy.admin_url(), analysis),
    )?;
    let mesh = MeshSync::start(&cluster, NS, "app", "primary", envoy.rds_path())?;
    let load = LoadGen::start(
        &envoy.listener_url(),
        LoadOptions::new(100, Duration::from_secs(170)),
    )?;
    let mut controller =
        KubeController::start(&cluster, "fledge-e2e-0", &dir.join("controller.log"))?;
    let base = controller.base_url();
    let kubeconfig = cluster.kubeconfig().to_path_buf();
    let canary_status = || -> Result<Value> { Ok(cluster.canary(NS, "app")?["status"].clone()) };

    let result = (|| -> Result<()> {
        require("a lone controller to lead", Duration::from_secs(10), || {
            controller.is_leader()
        })?;
        // 1. The first step reaches Envoy through the VirtualService; the rollout waits at the
        //    indefinite pause.
        require(
            "the rollout to pause at 20%",
            Duration::from_secs(40),
            || {
                let status = canary_status()?;
                Ok(status["phase"] == "Paused" && status["canaryWeight"] == 20)
            },
        )?;
        // The status is written before the routes follow it: wait for the VirtualService.
        require(
            "the VirtualService's weights",
            Duration::from_secs(10),
            || Ok(cluster.route_weights(NS, "app", "primary")? == RouteWeights::canary_percent(20)),
        )?;
        envoy.wait_for_route_weights(RouteWeights::canary_percent(20), Duration::from_secs(10))?;
        let (share, responses) = v2_share_over(&load, Duration::from_secs(2));
        ensure!(
            (0.08..0.35).contains(&share),
            "{:.1}% of {responses} responses from v2 at 20%",
            share * 100.0
        );

        // 2. The controller's dashboard in a real browser, and the CLI in Kubernetes mode.
        require(
            "four observed intervals on the dashboard API",
            Duration::from_secs(30),
            || {
                let view = http::get_json(
                    &format!("{base}/api/v1/canaries/{NS}%2Fapp"),
                    Duration::from_secs(3),
                )?;
                Ok(view["series"].as_array().map_or(0, Vec::len) >= 4)
            },
        )?;
        let page = browser::drive_dashboard(
            &base,
            "shop/app",
            dir,
            SIMULATED_SPEC,
            SCENARIO,
            "kubernetes",
        )?;
        ensure!(page["list"][0]["phase"] == "Paused", "{}", page["list"][0]);
        let detail = &page["detail"];
        for chart in ["rps", "success", "latency"] {
            ensure!(
                detail["charts"][chart].as_u64().unwrap_or(0) >= 3,
                "chart {chart}: {}",
                detail["charts"]
            );
        }
        ensure!(
            page["simulator"]["outcome"].is_string(),
            "the simulator page decided: {}",
            page["simulator"]
        );

        let (code, out, err) = fledge(
            &kubeconfig,
            &["status", "app", "--kubernetes", "-n", NS, "-o", "json"],
        )?;
        ensure!(code == 0, "fledge status exit {code}: {out}{err}");
        let shown: Value = serde_json::from_str(out.trim()).context(out.clone())?;
        let shown = if shown.is_array() {
            shown[0].clone()
        } else {
            shown
        };
        ensure!(
            shown["phase"] == "Paused" && shown["canaryWeight"] == 20,
            "{shown}"
        );
        let (code, out, err) = fledge(&kubeconfig, &["promote", "app", "--kubernetes", "-n", NS])?;
        ensure!(code == 0, "fledge promote exit {code}: {out}{err}");

        // 3. Promoted: the VirtualService and Envoy send everything to the canary.
        require("Promoted", Duration::from_secs(60), || {
            Ok(canary_status()?["phase"] == "Promoted")
        })?;
        // The status is written before the routes move (persist, then act): wait for them.
        require(
            "the VirtualService at 100% canary",
            Duration::from_secs(10),
            || Ok(cluster.route_weights(NS, "app", "primary")? == RouteWeights::ALL_CANARY),
        )?;
        envoy.wait_for_route_weights(RouteWeights::ALL_CANARY, Duration::from_secs(10))?;
        let metrics = http::get_ok(&format!("{base}/metrics"), Duration::from_secs(3))?;
        let weight = http::prometheus_samples(&metrics, "fledge_canary_weight");
        ensure!(
            weight
                .iter()
                .any(|s| s.label("canary") == Some("shop/app") && s.value == 100.0),
            "{weight:?}"
        );
        let history = weights_walked(&canary_status()?);
        ensure!(
            history.starts_with(&[20]) && history.contains(&50),
            "{history:?}"
        );

        // 4. The canary subset now runs a failing build (30% 5xx). GitOps puts the route back
        //    on stable and a new rollout is started; it is rolled back.
        canary.set_error_rate(0.3)?;
        http::patch_merge(
            &format!(
                "{}/apis/networking.istio.io/v1/namespaces/{NS}/virtualservices/app",
                cluster.url()
            ),
            &json!({"spec": {"http": [{"name": "primary", "route": [
                {"destination": {"host": "app", "subset": "stable"}, "weight": 100},
                {"destination": {"host": "app", "subset": "canary"}, "weight": 0}
            ]}]}}),
            Duration::from_secs(3),
        )?;
        http::patch_merge(
            &format!(
                "{}/apis/fledge.dev/v1alpha1/namespaces/{NS}/canaries/app",
                cluster.url()
            ),
            &json!({"metadata": {"annotations": {"fledge.dev/rollout": "v3"}}}),
            Duration::from_secs(3),
        )?;
        require("RolledBack", Duration::from_secs(60), || {
            Ok(canary_status()?["phase"] == "RolledBack")
        })?;
        let status = canary_status()?;
        ensure!(
            status["message"]
                .as_str()
                .is_some_and(|m| m.contains("success rate")),
            "{}",
            status["message"]
        );
        require(
            "the VirtualService at 100% stable",
            Duration::from_secs(10),
            || Ok(cluster.route_weights(NS, "app", "primary")? == RouteWeights::ALL_STABLE),
        )?;
        envoy.wait_for_route_weights(RouteWeights::ALL_STABLE, Duration::from_secs(10))?;
        let (share, responses) = v2_share_over(&load, Duration::from_secs(2));
        ensure!(
            share == 0.0 && responses > 50,
            "{:.1}% of {responses} responses from the rolled-back canary",
            share * 100.0
        );
        ensure!(mesh.pushes() >= 4, "{} weight pushes", mesh.pushes());

        // 5. SIGTERM: a clean exit that releases the Lease for the next controller.
        exited_cleanly(controller.stop())?;
        let lease = cluster.get(
            "/apis/coordination.k8s.io/v1/namespaces/fledge-system/leases/fledge-controller",
        )?;
        ensure!(lease["spec"]["holderIdentity"].is_null(), "{lease}");
        Ok(())
    })();
    let result = result.with_context(|| {
        format!(
            "controller log tail:\n{}\nfake API server log tail:\n{}",
            controller.log_tail(40),
            cluster.log_tail(10)
        )
    });
    load.stop();
    result
}
