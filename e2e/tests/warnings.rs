//! A check that cannot run is said out loud, end to end: at 20 requests/s the stable version
//! serves far fewer than the 50 requests an interval `compareWithStable` needs to choose its
//! latency boundaries, so latency is not compared. The real `fledge run` (steering a real Envoy
//! with the filter) keeps that warning — with the field and the fix — in its API, `fledge status`
//! prints it, the dashboard lists it, the log announces it once and has no colour codes; with
//! enough traffic the comparison runs and the warning is gone.

use anyhow::{ensure, Context, Result};
use fledge_e2e::{browser, init_tracing, paths, wait_until, AppStack, LoadGen, LoadOptions};
use serde_json::Value;
use std::time::Duration;

/// 1 s intervals; the timed pause holds the rollout at 20% while the test looks.
const ANALYSIS: &str = "interval: 1s
threshold: 3
minCanaryRequests: 1
steps: [{setWeight: 20}, {pause: {duration: 120s}}, {setWeight: 50}]
compareWithStable: {}
";

const FIELD: &str = "spec.analysis.compareWithStable.latencyBoundariesMs";
const FIX: &str = "set latencyBoundariesMs or a longer interval";

/// For the dashboard's simulator page (the browser helper runs it too).
const SIMULATED_SPEC: &str = "apiVersion: fledge.dev/v1alpha1
kind: Canary
metadata: {name: app}
spec:
  service: app
  stable: {subset: stable}
  canary: {subset: canary}
  metricsSource: {envoyAdmin: {urls: [\"http://127.0.0.1:9901\"]}}
  router: {istio: {virtualService: app, route: primary}}
  analysis: {interval: 30s, stepWeights: [10, 50], compareWithStable: {}}
";

fn fledge(args: &[&str]) -> Result<(i32, String, String)> {
    browser::run_bounded(&paths::fledge_binary()?, args, Duration::from_secs(20))
}

fn latency_warning(view: &Value) -> Option<Value> {
    view["warnings"]
        .as_array()?
        .iter()
        .find(|w| w["code"] == "latencyNotCompared")
        .cloned()
}

#[test]
fn too_little_traffic_to_compare_latency_is_a_warning_in_the_api_status_and_dashboard() -> Result<()>
{
    init_tracing();
    let mut stack = AppStack::builder("warnings")
        .canary_named("app")
        .load(LoadOptions::new(20, Duration::from_secs(90)))
        .controller(ANALYSIS)
        .start()?;
    let dir = stack.path().to_path_buf();
    let envoy = &stack.envoy;
    let controller = stack.controller.as_mut().context("the controller")?;
    let server = controller.base_url();
    let result = (|| -> Result<()> {
        // A judged (passing) interval that could not compare latency; at this rate an interval
        // without any canary request (a halt) happens too, and says so itself.
        let warned = wait_until(
            "a passing analysis with the latency warning in the API",
            Duration::from_secs(30),
            || {
                let view = controller.canary("app")?;
                let passed = view.raw["lastAnalysis"]["verdict"] == "Pass";
                Ok(latency_warning(&view.raw)
                    .filter(|_| passed)
                    .map(|w| (view, w)))
            },
        )?;
        let (view, warning) = warned;
        ensure!(view.canary_weight == Some(20), "{:?}", view);
        ensure!(warning["field"] == FIELD, "{warning}");
        ensure!(warning["fix"] == FIX, "{warning}");
        let message = warning["message"].as_str().unwrap_or_default();
        let stable: u64 = message
            .strip_prefix("latency not compared: ")
            .and_then(|rest| rest.strip_suffix(" stable requests per interval, 50 needed"))
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("unexpected message {message:?}"))?;
        ensure!(stable < 50, "{message}");

        let (code, text, err) = fledge(&["status", "app", "--server", &server])?;
        ensure!(code == 0, "status exit {code}: {err}");
        let line = format!("  warnings\n    ! {FIELD}: latency not compared: ");
        ensure!(text.contains(&line), "missing {line:?} in\n{text}");
        ensure!(
            text.contains(&format!(
                " stable requests per interval, 50 needed; {FIX}\n"
            )),
            "{text}"
        );
        ensure!(
            !text.contains('\x1b'),
            "colour codes in piped output:\n{text:?}"
        );
        let (code, table, _) = fledge(&["status", "--server", &server])?;
        ensure!(code == 0 && table.contains("! 1 warning"), "{table}");

        let page = browser::drive_dashboard(
            &server,
            "app",
            dir.as_path(),
            SIMULATED_SPEC,
            r#"{"requestsPerMinute": 600}"#,
            "warnings",
        )?;
        let shown = page["detail"]["warnings"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        ensure!(
            shown.iter().any(|w| w["code"] == "latencyNotCompared"
                && w["text"]
                    .as_str()
                    .is_some_and(|t| t.starts_with(FIELD) && t.ends_with(FIX))),
            "dashboard warnings: {shown:?}"
        );
        ensure!(
            page["list"][0]["text"]
                .as_str()
                .is_some_and(|t| t.contains("! 1 warning")),
            "{}",
            page["list"]
        );

        // Enough stable traffic: the boundaries are chosen and the warning goes away.
        let busy = LoadGen::start(
            &envoy.listener_url(),
            LoadOptions::new(150, Duration::from_secs(30)),
        )?;
        let compared = wait_until("latency to be compared", Duration::from_secs(20), || {
            let view = controller.canary("app")?;
            Ok(latency_warning(&view.raw).is_none().then_some(view))
        });
        busy.stop();
        let view = compared?;
        let checks: Vec<&str> = view.raw["lastAnalysis"]["checks"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c["name"].as_str())
            .collect();
        ensure!(checks.contains(&"latency-vs-stable"), "{checks:?}");

        // The log announced it once, as it appeared, and has no colour codes.
        let log = controller.log_text();
        let announced = log
            .matches(&format!("warning: {FIELD}: latency not compared"))
            .count();
        ensure!(announced >= 1, "not announced in the log:\n{log}");
        ensure!(!log.contains('\x1b'), "colour codes in the log file");
        Ok(())
    })();
    let result = result.with_context(|| format!("fledge log tail:\n{}", controller.log_tail(30)));
    if let Some(quiet) = stack.load.take() {
        quiet.stop();
    }
    if let Some(controller) = stack.controller.take() {
        controller.stop();
    }
    result
}
