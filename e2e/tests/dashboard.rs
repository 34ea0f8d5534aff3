//! The dashboard and the decision simulator in a real headless browser (Debian's chromium
//! driven by playwright-core, `e2e/browser/dashboard.mjs`) against a real `fledge run` steering
//! a real Envoy: the canary list, one canary's charts filled with live data, the decision log,
//! and the WebAssembly simulator deciding a spec exactly as `fledge simulate` (native) does.
//! Screenshots are kept under `target/dashboard-screenshots/`.

use anyhow::{ensure, Context, Result};
use fledge_e2e::{browser, http, init_tracing, paths, wait_until, AppStack, LoadOptions};
use serde_json::Value;
use std::time::Duration;

/// Holds at 20% for a minute, so the browser sees a live, progressing canary.
const ANALYSIS: &str = "interval: 1s
threshold: 3
minCanaryRequests: 5
steps: [{setWeight: 20}, {pause: {duration: 60s}}, {setWeight: 50}]
metrics:
  - {name: request-success-rate, thresholdRange: {min: 99}}
  - {name: request-duration, quantile: 0.99, thresholdRange: {max: 500}}
";

/// The spec pasted into the simulator page.
const SIMULATED_SPEC: &str = "apiVersion: fledge.dev/v1alpha1
kind: Canary
metadata: {name: checkout}
spec:
  service: checkout
  stable: {subset: stable}
  canary: {subset: canary}
  metricsSource: {envoyAdmin: {urls: [\"http://127.0.0.1:9901\"]}}
  router:
    envoyRds: {path: /etc/envoy/rds/routes.json, routeConfiguration: r, virtualHost: v, route: r,
               stableCluster: s, canaryCluster: c, adminUrl: \"http://127.0.0.1:9901\"}
  analysis:
    interval: 30s
    threshold: 5
    steps: [{setWeight: 10}, {pause: {duration: 5m}}, {setWeight: 30}, {pause: {duration: 5m}}, {setWeight: 60}]
    compareWithStable: {}
";
const SCENARIO: &str = r#"{"requestsPerMinute": 300, "canaryErrorRatio": 3, "seed": 11}"#;

#[test]
fn dashboard_and_simulator_in_headless_chromium() -> Result<()> {
    init_tracing();
    browser::dashboard_script()?;
    let mut stack = AppStack::builder("dashboard")
        .canary_named("app")
        .load(LoadOptions::new(100, Duration::from_secs(150)))
        .controller(ANALYSIS)
        .start()?;
    let dir = stack.path().to_path_buf();
    let controller = stack.controller.as_mut().context("the controller")?;
    let base = controller.base_url();
    let result = (|| -> Result<()> {
        let info = http::get_json(&format!("{base}/api/v1/info"), Duration::from_secs(3))?;
        ensure!(
            info["simulator"] == true,
            "this fledge binary has no embedded simulator: run `make simulator` before building it ({info})"
        );
        wait_until("four observed intervals", Duration::from_secs(30), || {
            let view = http::get_json(
                &format!("{base}/api/v1/canaries/app"),
                Duration::from_secs(3),
            )?;
            Ok((view["series"].as_array().map_or(0, Vec::len) >= 4).then_some(()))
        })?;
        // No script errors in the pages; the list shows the canary, live.
        let page = browser::drive_dashboard(
            &base,
            "app",
            dir.as_path(),
            SIMULATED_SPEC,
            SCENARIO,
            "standalone",
        )?;
        let list = page["list"].as_array().context("list")?;
        let phase = list[0]["phase"].as_str().unwrap_or_default();
        ensure!(["Progressing", "Paused"].contains(&phase), "phase {phase}");
        ensure!(
            list[0]["text"].as_str().unwrap_or_default().contains("20%"),
            "{}",
            list[0]
        );
        // One canary: every chart has points from the live series, and the decision log.
        let detail = &page["detail"];
        for chart in ["rps", "success", "latency"] {
            ensure!(
                detail["charts"][chart].as_u64().unwrap_or(0) >= 6,
                "chart {chart}: {}",
                detail["charts"]
            );
        }
        ensure!(
            detail["charts"]["weight"].as_u64().unwrap_or(0) >= 2,
            "{detail}"
        );
        let log: Vec<&str> = detail["decisionLog"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        ensure!(
            log.iter()
                .any(|row| row.contains("advance canary weight to 20% (step 1/3)")),
            "decision log: {log:#?}"
        );
        ensure!(
            detail["checks"].as_array().is_some_and(|c| c.len() == 2),
            "checks: {}",
            detail["checks"]
        );

        // The simulator page decides exactly as the native simulator (`fledge simulate`) on the
        // spec the page was given.
        let spec_path = dir.as_path().join("simulated.yaml");
        let (code, native, err) = browser::run_bounded(
            &paths::fledge_binary()?,
            &[
                "simulate",
                "-f",
                spec_path.to_str().unwrap_or_default(),
                "--scenario",
                SCENARIO,
                "-o",
                "json",
            ],
            Duration::from_secs(60),
        )?;
        ensure!(code == 0 || code == 1, "fledge simulate exit {code}: {err}");
        let native: Value = serde_json::from_str(native.trim())?;
        let browser = &page["simulator"];
        ensure!(
            browser["outcome"] == native["outcome"]
                && browser["intervals"] == native["intervals"]
                && browser["canaryRequests"] == native["canaryRequests"]
                && browser["reason"] == native["reason"],
            "browser {browser}\nnative outcome {} after {} intervals, {} canary requests: {}",
            native["outcome"],
            native["intervals"],
            native["canaryRequests"],
            native["reason"]
        );
        ensure!(
            native["outcome"] == "RolledBack",
            "3× errors must roll back: {native}"
        );
        ensure!(
            browser["weightPoints"].as_u64().unwrap_or(0) >= 3,
            "{browser}"
        );
        ensure!(browser["decisions"].as_u64().unwrap_or(0) >= 2, "{browser}");
        Ok(())
    })();
    let result = result.with_context(|| format!("fledge log tail:\n{}", controller.log_tail(30)));
    if let Some(load) = stack.load.take() {
        load.stop();
    }
    result
}
