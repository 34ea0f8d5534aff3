//! The Prometheus metrics source on real processes: a real Prometheus (Debian's `prometheus`
//! package, our own child process on a free port with its own TSDB) scrapes a real Envoy with
//! the Fledge filter every second.
//!
//! - The source's observation equals, request for request, what each backend served.
//! - `fledge run` with `metricsSource.prometheus` and a custom PromQL metric (the canary's 5xx
//!   ratio) rolls back a canary answering 20% 5xx and promotes a healthy one, asserted on the
//!   traffic that really reaches each backend.
//!
//! Windows: the built-in counts need none (the source subtracts raw counters between calls).
//! The custom query below uses `[{{ interval }}]` with `interval: 4s` and `scrape_interval:
//! 1s`, so every `increase()` window holds about four samples (it needs at least two); in
//! general keep the analysis interval at least 2× (better 4×) the scrape interval, or write a
//! longer window into the template.

use anyhow::{ensure, Context, Result};
use fledge_controller::metrics::prometheus::{CustomQuery, PrometheusSource};
use fledge_controller::metrics::{MetricsSource, SubsetSelector};
use fledge_core::contract::ResponseClass;
use fledge_core::observe::ObservationError;
use fledge_e2e::{AppStack, BackendOptions, CanaryView, LoadGen, LoadOptions, RouteWeights};
use std::time::Duration;

/// Steps 20 → 40 → 60 → 80 with 4 s intervals, judged only by a custom PromQL metric: the
/// canary's share of failed requests (5xx or no response) over the interval.
const CUSTOM_METRIC_ANALYSIS: &str = r#"interval: 4s
threshold: 2
minCanaryRequests: 10
steps: [{setWeight: 20}, {setWeight: 40}, {setWeight: 60}, {setWeight: 80}]
metrics:
  - name: canary-failure-ratio
    thresholdRange: {max: 0.05}
    query: 'sum(increase(fledge_requests_total{fledge_service="{{ service }}",fledge_subset="{{ canary }}",fledge_class=~"5xx|none"}[{{ interval }}])) / sum(increase(fledge_requests_total{fledge_service="{{ service }}",fledge_subset="{{ canary }}"}[{{ interval }}]))'
"#;

fn selector() -> SubsetSelector {
    SubsetSelector {
        service: "app".to_string(),
        stable_subset: "stable".to_string(),
        canary_subset: "canary".to_string(),
    }
}

#[test]
fn prometheus_source_counts_exactly_what_each_backend_served() -> Result<()> {
    let stack = AppStack::builder("prom-counts")
        .canary(BackendOptions {
            error_rate: 0.1,
            seed: 5,
            ..BackendOptions::default()
        })
        .prometheus()
        .start()?;
    stack
        .envoy
        .apply_route_weights(RouteWeights::canary_percent(30))?;
    // The filter defines the configured subsets' counters at start (6 classes × 2 subsets).
    stack.prometheus()?.wait_for_value(
        r#"count(fledge_requests_total{fledge_service="app"})"#,
        12.0,
        Duration::from_secs(20),
    )?;

    let failure_ratio = r#"sum(increase(fledge_requests_total{fledge_service="app",fledge_subset="canary",fledge_class=~"5xx|none"}[5m])) / sum(increase(fledge_requests_total{fledge_service="app",fledge_subset="canary"}[5m]))"#;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut source = PrometheusSource::new(
        &stack.prometheus()?.url(),
        selector(),
        vec![
            CustomQuery {
                metric: "canary-failure-ratio".to_string(),
                promql: failure_ratio.to_string(),
            },
            CustomQuery {
                metric: "nothing-matches".to_string(),
                promql: r#"sum(fledge_requests_total{fledge_service="no-such-service"})"#
                    .to_string(),
            },
        ],
        Duration::from_secs(5),
    )?;
    ensure!(
        runtime.block_on(source.observe()) == Err(ObservationError::Baseline),
        "the first call takes a baseline"
    );

    let stable_before = stack.stable.stats()?;
    let canary_before = stack.canary.stats()?;
    let mut options = LoadOptions::new(100, Duration::from_secs(30));
    options.max_requests = 600;
    let report = LoadGen::start(&stack.envoy.listener_url(), options)?.wait();
    ensure!(report.responses() == 600, "{}", report.summary());
    let stable_after = stack.stable.stats()?;
    let canary_after = stack.canary.stats()?;
    let stable_served = stable_after.served - stable_before.served;
    let canary_served = canary_after.served - canary_before.served;
    let canary_errors = canary_after.errors - canary_before.errors;
    ensure!(stable_served + canary_served == 600);

    // Wait until Prometheus has scraped every request: the counters, and the histogram, which
    // Envoy publishes on its next stats flush.
    let served_ever = (stable_after.served + canary_after.served) as f64;
    for promql in [
        r#"sum(fledge_requests_total{fledge_service="app"})"#,
        r#"sum(fledge_request_duration_ms_count{fledge_service="app"})"#,
    ] {
        stack
            .prometheus()?
            .wait_for_value(promql, served_ever, Duration::from_secs(15))?;
    }

    let observation = runtime.block_on(source.observe())?;
    let (stable, canary) = (&observation.stable, &observation.canary);
    ensure!(
        stable.requests() == stable_served && stable.failures() == 0,
        "stable: observed {stable:?}, backend served {stable_served}"
    );
    ensure!(
        canary.requests() == canary_served
            && canary.count(ResponseClass::ServerError) == canary_errors
            && canary.count(ResponseClass::Success) == canary_served - canary_errors,
        "canary: observed {canary:?}, backend served {canary_served} with {canary_errors} errors"
    );
    ensure!(
        stable.latency.count == stable_served && canary.latency.count == canary_served,
        "histogram counts {} / {}",
        stable.latency.count,
        canary.latency.count
    );
    ensure!(
        stable.latency.bounds_ms.len() > 5 && canary.latency.quantile(0.5).is_some(),
        "latency histogram: {:?}",
        canary.latency
    );
    let share = observation.canary_share().unwrap_or(0.0);
    ensure!((0.2..=0.4).contains(&share), "canary share {share}");

    let expected_ratio = canary_errors as f64 / canary_served as f64;
    let ratio = observation
        .custom
        .get("canary-failure-ratio")
        .copied()
        .context("custom metric canary-failure-ratio missing")?;
    ensure!(
        (ratio - expected_ratio).abs() < 0.02,
        "custom failure ratio {ratio}, backend says {expected_ratio}"
    );
    ensure!(
        !observation.custom.contains_key("nothing-matches"),
        "an empty answer must be absent (no data), not zero: {:?}",
        observation.custom
    );

    // Nothing new since: an empty interval, not an error and not the same requests again.
    let observation = runtime.block_on(source.observe())?;
    ensure!(
        observation.stable.requests() == 0 && observation.canary.requests() == 0,
        "{observation:?}"
    );
    Ok(())
}

/// `fledge run` with the Prometheus source and [`CUSTOM_METRIC_ANALYSIS`], plus load.
fn start_scenario(name: &str, canary: BackendOptions) -> Result<AppStack> {
    let mut load = LoadOptions::new(100, Duration::from_secs(150));
    load.workers = 8;
    let name = name.to_string();
    AppStack::builder(&name)
        .canary(canary)
        .prometheus()
        .load(load)
        .controller_with(move |stack| {
            let prometheus = stack
                .prometheus
                .as_ref()
                .map(|p| p.url())
                .unwrap_or_default();
            let mut manifest = stack.manifest_for(&name).with_prometheus(&prometheus);
            manifest.analysis_yaml = CUSTOM_METRIC_ANALYSIS.to_string();
            manifest
        })
        .start()
}

/// The custom metric's check in the last analysis.
fn custom_check(view: &CanaryView) -> Result<serde_json::Value> {
    view.raw["lastAnalysis"]["checks"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["name"] == "canary-failure-ratio")
        .cloned()
        .with_context(|| {
            format!(
                "no canary-failure-ratio check in lastAnalysis: {}",
                view.raw["lastAnalysis"]
            )
        })
}

#[test]
fn custom_prometheus_metric_rolls_back_a_canary_answering_20_percent_5xx() -> Result<()> {
    let mut scenario = start_scenario(
        "prom-errors",
        BackendOptions {
            error_rate: 0.2,
            seed: 7,
            ..BackendOptions::default()
        },
    )?;
    let view = scenario.controller()?.wait_for_phase(
        "prom-errors",
        "RolledBack",
        Duration::from_secs(90),
    )?;
    ensure!(view.canary_weight == Some(0), "{view:?}");
    ensure!(
        view.message.contains("canary-failure-ratio"),
        "rollback reason: {}",
        view.message
    );
    let check = custom_check(&view)?;
    ensure!(check["verdict"] == "Fail", "{check}");
    let ratio = check["value"].as_f64().unwrap_or(0.0);
    ensure!((0.1..=0.3).contains(&ratio), "5xx ratio {ratio}: {check}");
    // The canary really received traffic (it was judged on real requests) ...
    let canary_served = scenario.canary.served()?;
    ensure!(canary_served > 20, "canary served {canary_served}");
    // ... and none after the rollback.
    let (stable, canary) = scenario.served_during(Duration::from_secs(3))?;
    ensure!(
        canary == 0 && stable > 100,
        "after rollback canary served {canary}, stable {stable}"
    );
    Ok(())
}

#[test]
fn custom_prometheus_metric_promotes_a_healthy_canary() -> Result<()> {
    let mut scenario = start_scenario("prom-healthy", BackendOptions::default())?;
    let view = scenario.controller()?.wait_for_phase(
        "prom-healthy",
        "Promoted",
        Duration::from_secs(90),
    )?;
    ensure!(view.canary_weight == Some(100), "{view:?}");
    let weights = view.weights_walked();
    ensure!(
        weights == [20, 40, 60, 80, 100],
        "weights walked {weights:?}"
    );
    let check = custom_check(&view)?;
    ensure!(
        check["verdict"] == "Pass" && check["value"].as_f64() == Some(0.0),
        "{check}"
    );
    let (stable, canary) = scenario.served_during(Duration::from_secs(3))?;
    let share = canary as f64 / (stable + canary).max(1) as f64;
    ensure!(
        canary > 100 && share >= 0.99,
        "after promotion canary served {canary}, stable {stable} ({:.1}% canary)",
        share * 100.0
    );
    Ok(())
}
