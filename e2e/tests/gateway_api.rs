//! The Gateway API router end to end on real processes (see `fledge_e2e::gateway`): the real
//! `fledge controller` binary moves the weights of an HTTPRoute on the fake API server; a
//! stand-in Gateway controller programs a real Envoy running the Fledge filter from that
//! HTTPRoute (rules and header matches in Gateway API precedence) and reports it accepted.
//! Shown: a healthy canary promoted; a failing one rolled back with no canary request
//! afterwards; the testers' header reaching the canary at 0%; a guard trip steering to stable
//! through the guard rule Fledge adds.

use anyhow::{ensure, Context, Result};
use fledge_e2e::gateway::{app_objects, rule_weights, GatewaySync, GATEWAY_V1};
use fledge_e2e::kubernetes::{require, FakeCluster, KubeController};
use fledge_e2e::loadgen::VERSION_HEADER;
use fledge_e2e::rollback::plugin_config;
use fledge_e2e::{
    http, init_tracing, Backend, BackendOptions, Envoy, EnvoyOptions, LoadGen, LoadOptions,
    RouteWeights, ScratchDir, WasmFilter,
};
use serde_json::{json, Value};
use std::time::Duration;

const NS: &str = "shop";

/// Backends v1/v2 behind an Envoy whose filter has the data-plane guard for `app`.
struct Stack {
    stable: Backend,
    canary: Backend,
    envoy: Envoy,
}

fn stack(dir: &std::path::Path) -> Result<Stack> {
    let stable = Backend::start("v1", BackendOptions::default())?;
    let canary = Backend::start("v2", BackendOptions::default())?;
    let mut options = EnvoyOptions::new(stable.port(), canary.port())
        .with_filter(WasmFilter::built(&plugin_config(true))?)
        .in_dir(&dir.join("envoy"));
    options.concurrency = 2;
    let envoy = Envoy::start(options)?;
    Ok(Stack {
        stable,
        canary,
        envoy,
    })
}

fn canary_status(cluster: &FakeCluster) -> Result<Value> {
    Ok(cluster.canary(NS, "app")?["status"].clone())
}

fn annotate(cluster: &FakeCluster, key: &str, value: &str) -> Result<()> {
    http::patch_merge(
        &format!(
            "{}/apis/fledge.dev/v1alpha1/namespaces/{NS}/canaries/app",
            cluster.url()
        ),
        &json!({"metadata": {"annotations": {key: value}}}),
        Duration::from_secs(3),
    )?;
    Ok(())
}

/// Which version answered a GET with `headers` (the backend's `x-backend-version`).
fn version_of(url: &str, headers: &[(&str, &str)]) -> Result<String> {
    let mut request = http::agent(Duration::from_secs(3)).get(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.call().with_context(|| format!("GET {url}"))?;
    ensure!(
        response.status().is_success(),
        "GET {url}: {}",
        response.status()
    );
    Ok(response
        .headers()
        .get(VERSION_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_string())
}

fn v2_share_over(load: &LoadGen, window: Duration) -> (f64, u64) {
    let before = load.snapshot();
    std::thread::sleep(window);
    let during = load.snapshot().since(&before);
    (during.version_share("v2"), during.responses())
}

#[test]
fn a_healthy_canary_is_promoted_and_a_failing_one_rolled_back_through_an_http_route() -> Result<()>
{
    init_tracing();
    let dir = ScratchDir::temp("gateway-api")?;
    let Stack {
        stable: _stable,
        canary,
        envoy,
    } = stack(dir.path())?;
    let analysis = json!({
        "interval": "1s",
        "threshold": 2,
        "minCanaryRequests": 5,
        "steps": [{"setWeight": 20}, {"setWeight": 50}],
        "metrics": [{"name": "request-success-rate", "thresholdRange": {"min": 99}}]
    });
    let objects = app_objects(NS, &envoy.admin_url(), analysis, json!({}));
    let cluster = FakeCluster::start(&dir.path().join("api"), NS, &objects)?;
    let gateway = GatewaySync::start(&cluster, NS, "app", envoy.rds_path(), &envoy.admin_url())?;
    let load = LoadGen::start(
        &envoy.listener_url(),
        LoadOptions::new(100, Duration::from_secs(120)),
    )?;
    let mut controller = KubeController::start(
        &cluster,
        "fledge-e2e-gw",
        &dir.path().join("controller.log"),
    )?;

    let result = (|| -> Result<()> {
        // 1. Healthy: promoted step by step; Envoy sends everything to v2.
        require("Promoted", Duration::from_secs(60), || {
            Ok(canary_status(&cluster)?["phase"] == "Promoted")
        })?;
        // The status is written before the routes move (persist, then act): wait for them.
        require("the rule at 100% canary", Duration::from_secs(10), || {
            Ok(rule_weights(&cluster, NS, "app", "primary")? == RouteWeights::ALL_CANARY)
        })?;
        envoy.wait_for_route_weights(RouteWeights::ALL_CANARY, Duration::from_secs(10))?;
        let (share, responses) = v2_share_over(&load, Duration::from_secs(1));
        ensure!(
            share == 1.0 && responses > 30,
            "{:.1}% of {responses} responses from v2 after promotion",
            share * 100.0
        );
        let walked: Vec<u32> = gateway
            .pushes()
            .iter()
            .filter_map(|(_, c)| {
                c["virtual_hosts"][0]["routes"]
                    .as_array()?
                    .iter()
                    .find(|r| r["name"] == "primary")?["route"]["weighted_clusters"]["clusters"][1]
                    ["weight"]
                    .as_u64()
                    .map(|w| w as u32)
            })
            .collect();
        ensure!(
            walked.contains(&20) && walked.contains(&50) && walked.last() == Some(&100),
            "the weights Envoy was given: {walked:?}"
        );

        // 2. The canary now runs a failing build (30% 5xx). GitOps puts the rule back on
        //    stable and starts a new rollout: it is rolled back.
        canary.set_error_rate(0.3)?;
        http::patch_merge(
            &format!(
                "{}{GATEWAY_V1}/namespaces/{NS}/httproutes/app",
                cluster.url()
            ),
            &json!({"spec": {"rules": objects[0]["spec"]["rules"].clone()}}),
            Duration::from_secs(3),
        )?;
        annotate(&cluster, "fledge.dev/rollout", "v3")?;
        require("RolledBack", Duration::from_secs(60), || {
            Ok(canary_status(&cluster)?["phase"] == "RolledBack")
        })?;
        let status = canary_status(&cluster)?;
        ensure!(
            status["message"]
                .as_str()
                .is_some_and(|m| m.contains("success rate")),
            "{}",
            status["message"]
        );
        require("the rule at 100% stable", Duration::from_secs(10), || {
            Ok(rule_weights(&cluster, NS, "app", "primary")? == RouteWeights::ALL_STABLE)
        })?;
        envoy.wait_for_route_weights(RouteWeights::ALL_STABLE, Duration::from_secs(10))?;
        // No request reaches the canary afterwards.
        std::thread::sleep(Duration::from_millis(300));
        let served = canary.served()?;
        let (share, responses) = v2_share_over(&load, Duration::from_secs(2));
        ensure!(
            share == 0.0 && responses > 50 && canary.served()? == served,
            "{:.1}% of {responses} responses from the rolled-back canary",
            share * 100.0
        );
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
    controller.stop();
    result
}

#[test]
fn testers_reach_the_canary_at_0_percent_and_a_guard_trip_steers_to_stable() -> Result<()> {
    init_tracing();
    let dir = ScratchDir::temp("gateway-api-guard")?;
    let Stack {
        stable,
        canary,
        envoy,
    } = stack(dir.path())?;
    // Held at 0% until promoted, then at 50%. No analysis tick and no guard check of the
    // controller's falls in the test's window: what steers traffic is the data plane alone.
    let analysis = json!({
        "interval": "1m",
        "steps": [{"pause": {}}, {"setWeight": 50}, {"pause": {}}],
        "metrics": [{"name": "request-success-rate", "thresholdRange": {"min": 99}}],
        "guard": {"checkInterval": "1m"}
    });
    let router = json!({"headerRoute": {"headers": {"x-canary": "always"}}});
    let objects = app_objects(NS, &envoy.admin_url(), analysis, router);
    let cluster = FakeCluster::start(&dir.path().join("api"), NS, &objects)?;
    let gateway = GatewaySync::start(&cluster, NS, "app", envoy.rds_path(), &envoy.admin_url())?;
    let mut controller = KubeController::start(
        &cluster,
        "fledge-e2e-gw-guard",
        &dir.path().join("controller.log"),
    )?;
    let listener = envoy.listener_url();

    let result = (|| -> Result<()> {
        // 1. At 0%, the testers rule and the guard rule are live, in Gateway API precedence.
        require("the rollout paused at 0%", Duration::from_secs(30), || {
            Ok(canary_status(&cluster)?["phase"] == "Paused")
        })?;
        require(
            "the testers and guard rules live in Envoy",
            Duration::from_secs(10),
            || {
                Ok(gateway.live_route_names()
                    == [
                        "health",
                        "primary-fledge-guard",
                        "primary-canary-testers",
                        "primary",
                    ])
            },
        )?;
        envoy.wait_for_route_weights(RouteWeights::ALL_STABLE, Duration::from_secs(10))?;
        for _ in 0..20 {
            ensure!(version_of(&listener, &[("x-canary", "always")])? == "v2");
            ensure!(version_of(&listener, &[])? == "v1");
        }

        // 2. Promoted past the pause: 50%, under load.
        let load = LoadGen::start(&listener, LoadOptions::new(100, Duration::from_secs(60)))?;
        annotate(&cluster, "fledge.dev/promote", "1")?;
        envoy.wait_for_route_weights(RouteWeights::canary_percent(50), Duration::from_secs(20))?;
        std::thread::sleep(Duration::from_secs(1));
        ensure!(canary.served()? > 20, "the canary gets traffic at 50%");

        // 3. The canary fails hard: the filter's guard trips and its rule sends every request
        //    to stable, while the HTTPRoute and Envoy still say 50/50.
        canary.set_error_rate(1.0)?;
        let mut quiet = false;
        for _ in 0..20 {
            std::thread::sleep(Duration::from_millis(500));
            let before = canary.served()?;
            std::thread::sleep(Duration::from_secs(1));
            if canary.served()? == before {
                quiet = true;
                break;
            }
        }
        ensure!(quiet, "the canary kept getting requests after failing");
        let (live, _) = envoy.live_route_weights()?;
        ensure!(
            live == RouteWeights::canary_percent(50),
            "Envoy's weights moved ({live}): this was not the guard"
        );
        ensure!(rule_weights(&cluster, NS, "app", "primary")? == RouteWeights::canary_percent(50));
        let stable_before = stable.served()?;
        let (share, responses) = v2_share_over(&load, Duration::from_secs(1));
        ensure!(
            share == 0.0 && responses > 50 && stable.served()? > stable_before + 50,
            "{:.1}% of {responses} responses from the failing canary",
            share * 100.0
        );
        let tripped = http::prometheus_samples(
            &envoy.stats_prometheus()?,
            fledge_core::contract::GUARD_TRIPPED,
        );
        ensure!(
            tripped.iter().any(|s| s.value > 0.0),
            "the guard reports a trip: {tripped:?}"
        );
        load.stop();
        Ok(())
    })();
    let result = result.with_context(|| {
        format!(
            "controller log tail:\n{}\nfake API server log tail:\n{}\nEnvoy log tail:\n{}",
            controller.log_tail(40),
            cluster.log_tail(10),
            envoy.log_tail(20)
        )
    });
    controller.stop();
    result
}
