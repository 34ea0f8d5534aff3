//! The Grafana dashboard (`manifests/grafana/fledge-dashboard.json`) against real data: a real
//! Prometheus scrapes the Envoy with the Fledge filter (per-subset traffic) and another scrapes
//! the `/metrics` of a real `fledge run` that promotes a canary. Every query of the dashboard
//! must be valid PromQL, and the main panels must return the rollout's real numbers.

use anyhow::{ensure, Context, Result};
use fledge_e2e::prometheus::{Prometheus, PrometheusOptions};
use fledge_e2e::{init_tracing, paths, wait_until, AppStack, LoadOptions};
use serde_json::Value;
use std::time::Duration;

const ANALYSIS: &str = "interval: 1s
threshold: 3
minCanaryRequests: 5
steps: [{setWeight: 20}, {setWeight: 50}]
metrics:
  - {name: request-success-rate, thresholdRange: {min: 99}}
  - {name: request-duration, quantile: 0.99, thresholdRange: {max: 500}}
";

/// `(panel title, PromQL)` of every panel target, with the dashboard variables filled in.
fn panel_queries(dashboard: &Value) -> Vec<(String, String)> {
    dashboard["panels"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|panel| {
            let title = panel["title"].as_str().unwrap_or_default().to_string();
            panel["targets"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|t| t["expr"].as_str())
                .map(|expr| {
                    let filled = expr
                        .replace("$canary", "app")
                        .replace("$service", "app")
                        .replace("$__rate_interval", "1m");
                    (title.clone(), filled)
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Queries of filter metrics go to the Envoy-scraping Prometheus, the rest to the other.
fn is_filter_query(expr: &str) -> bool {
    expr.contains("fledge_requests_total") || expr.contains("fledge_request_duration_ms")
}

#[test]
fn every_grafana_query_is_valid_and_the_main_panels_show_the_rollout() -> Result<()> {
    init_tracing();
    let dashboard_path = paths::workspace_root().join("manifests/grafana/fledge-dashboard.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(&dashboard_path)?)?;
    let mut stack = AppStack::builder("grafana")
        .canary_named("app")
        .load(LoadOptions::new(100, Duration::from_secs(90)))
        .controller(ANALYSIS)
        .start()?;
    let dir = stack.path().to_path_buf();
    let envoy = &stack.envoy;
    let controller = stack.controller.as_mut().context("the controller")?;
    let traffic = Prometheus::start(
        PrometheusOptions::envoy(&envoy.admin_url()).in_dir(&dir.as_path().join("prom-envoy")),
    )?;
    let mut fledge_options =
        PrometheusOptions::envoy(&controller.base_url()).in_dir(&dir.as_path().join("prom-fledge"));
    fledge_options.metrics_path = "/metrics".to_string();
    let decisions = Prometheus::start(fledge_options)?;
    let result = (|| -> Result<()> {
        traffic.wait_for_targets_up(Duration::from_secs(20))?;
        decisions.wait_for_targets_up(Duration::from_secs(20))?;
        wait_until("the canary to be promoted", Duration::from_secs(40), || {
            Ok((controller.canary("app")?.phase == "Promoted").then_some(()))
        })?;
        // A few scrapes after the promotion, so rates over 1m have two samples of everything.
        decisions.wait_for_value(
            "fledge_canary_weight{canary=\"app\"}",
            100.0,
            Duration::from_secs(15),
        )?;
        std::thread::sleep(Duration::from_secs(3));

        let queries = panel_queries(&dashboard);
        ensure!(queries.len() >= 17, "{queries:?}");
        let mut results = std::collections::BTreeMap::new();
        for (title, expr) in &queries {
            let prometheus = if is_filter_query(expr) {
                &traffic
            } else {
                &decisions
            };
            let result = prometheus
                .query(expr)
                .with_context(|| format!("panel {title:?}"))?;
            results
                .entry(title.clone())
                .or_insert_with(Vec::new)
                .extend(result.as_array().cloned().unwrap_or_default());
        }
        let series = |title: &str| results.get(title).cloned().unwrap_or_default();
        let label_values = |title: &str, label: &str| -> Vec<String> {
            series(title)
                .iter()
                .filter_map(|s| s["metric"][label].as_str().map(str::to_string))
                .collect()
        };
        // Controller panels: the rollout as it happened.
        let weight = series("Canary weight");
        ensure!(
            weight.len() == 1 && weight[0]["value"][1] == "100",
            "{weight:?}"
        );
        ensure!(
            label_values("Phase", "phase") == ["Promoted"],
            "{:?}",
            series("Phase")
        );
        let reasons = label_values("Decisions by reason", "reason");
        for reason in ["CanaryAdvanced", "Promoted"] {
            ensure!(
                reasons.iter().any(|r| r == reason),
                "decisions: {reasons:?}"
            );
        }
        ensure!(label_values("Analysis verdicts", "verdict").contains(&"Pass".to_string()));
        let checks = label_values("Analysis check values", "metric");
        ensure!(checks.len() == 2, "check values: {checks:?}");
        ensure!(!series("Analysis duration (p99)").is_empty());
        // Filter panels: both subsets served traffic.
        for title in [
            "Requests per second",
            "Success rate",
            "Latency p99 / p50",
            "Responses by class",
            "Mean latency",
        ] {
            let subsets = label_values(title, "fledge_subset");
            for subset in ["stable", "canary"] {
                ensure!(subsets.iter().any(|s| s == subset), "{title}: {subsets:?}");
            }
        }
        // After the promotion stable serves nothing: its rate is 0/0 (NaN, drawn as a gap).
        let mut numbers = 0;
        for sample in series("Success rate") {
            let value: f64 = sample["value"][1].as_str().unwrap_or("0").parse()?;
            if !value.is_nan() {
                ensure!(value > 99.0, "success rate {sample}");
                numbers += 1;
            }
        }
        ensure!(
            numbers >= 1,
            "no success rate: {:?}",
            series("Success rate")
        );
        Ok(())
    })();
    let result = result.with_context(|| format!("fledge log tail:\n{}", controller.log_tail(30)));
    if let Some(load) = stack.load.take() {
        load.stop();
    }
    result
}
