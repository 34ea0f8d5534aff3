//! The operator's tools end to end: the real `fledge` CLI (`status`, `pause`, `resume`,
//! `promote`, `abort`, `validate`) against a real `fledge run` steering a real Envoy with the
//! filter, webhooks answered by a local HTTP receiver (a confirm-promotion gate that holds the
//! promotion until it opens, a rollout hook, Slack-style event notifications, post-rollout),
//! and the controller's `/metrics`.

use anyhow::{bail, ensure, Context, Result};
use fledge_e2e::{
    free_port, http, paths, wait_until, AppStack, CanaryManifest, Controller, LoadOptions,
    ScratchDir,
};
use serde_json::Value;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const ANALYSIS: &str = "interval: 1s
threshold: 3
minCanaryRequests: 5
steps: [{setWeight: 20}, {pause: {}}, {setWeight: 60}]
metrics:
  - {name: request-success-rate, thresholdRange: {min: 99}}
";

/// A tiny HTTP receiver for webhooks: `/gate` answers 403 until opened, everything else 200.
/// Every request's path and JSON body are recorded. Its thread ends with the test process.
struct Receiver {
    port: u16,
    gate_open: Arc<AtomicBool>,
    calls: Arc<Mutex<Vec<(String, Value)>>>,
}

impl Receiver {
    fn start() -> Result<Receiver> {
        let gate_open = Arc::new(AtomicBool::new(false));
        let calls = Arc::new(Mutex::new(Vec::new()));
        let (gate, log) = (gate_open.clone(), calls.clone());
        let port = fledge_e2e::http::serve_hooks(move |path, body| {
            let json = serde_json::from_slice(body).unwrap_or(Value::Null);
            log.lock().unwrap().push((path.to_string(), json));
            if path == "/gate" && !gate.load(Ordering::SeqCst) {
                403
            } else {
                200
            }
        })?;
        Ok(Receiver {
            port,
            gate_open,
            calls,
        })
    }

    fn calls_to(&self, path: &str) -> Vec<Value> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _)| p == path)
            .map(|(_, body)| body.clone())
            .collect()
    }
}

/// Run the fledge CLI; `(exit code, stdout, stderr)`. Bounded: killed after 20 s.
fn fledge(args: &[&str]) -> Result<(i32, String, String)> {
    let mut child = Command::new(paths::fledge_binary()?)
        .args(args)
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting fledge")?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("fledge {args:?} did not finish within 20 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let output = child.wait_with_output()?;
    Ok((
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    ))
}

fn status_json(server: &str, name: &str) -> Result<Value> {
    let (code, out, err) = fledge(&["status", name, "--server", server, "-o", "json"])?;
    ensure!(
        code == 0 || code == 1,
        "fledge status exit {code}: {out}{err}"
    );
    Ok(serde_json::from_str(out.trim())?)
}

fn wait_for(
    server: &str,
    what: &str,
    timeout: Duration,
    done: impl Fn(&Value) -> bool,
) -> Result<Value> {
    wait_until(what, timeout, || {
        let view = status_json(server, "app")?;
        Ok(done(&view).then_some(view))
    })
}

#[test]
fn the_cli_steers_a_real_rollout_through_a_webhook_gate() -> Result<()> {
    let receiver = Receiver::start()?;
    let stack = AppStack::builder("operator-cli")
        .load(LoadOptions::new(100, Duration::from_secs(90)))
        .start()?;
    let dir = stack.path();
    let mut manifest = stack.manifest_for("app");
    manifest.analysis_yaml = ANALYSIS.to_string();
    let hooks = format!(
        "  webhooks:
    - {{name: approve, type: confirm-promotion, url: \"http://127.0.0.1:{p}/gate\", timeout: 1s, retries: 0}}
    - {{name: load-test, type: rollout, url: \"http://127.0.0.1:{p}/load\", timeout: 1s, metadata: {{cmd: \"hey -z 1m\"}}}}
    - {{name: chat, type: event, url: \"http://127.0.0.1:{p}/events\", payload: slack}}
    - {{name: done, type: post-rollout, url: \"http://127.0.0.1:{p}/done\"}}
",
        p = receiver.port
    );
    let manifest_path = dir.join("canary.yaml");
    std::fs::write(&manifest_path, manifest.to_yaml() + &hooks)?;
    let (code, out, err) = fledge(&["validate", "-f", manifest_path.to_str().unwrap_or_default()])?;
    ensure!(code == 0, "the manifest must be valid: {out}{err}");

    let controller =
        Controller::start(&manifest_path, &dir.join("state"), &dir.join("fledge.log"))?;
    let server = controller.base_url();
    let server = server.as_str();
    let result = (|| -> Result<()> {
        // Waits at `pause: {}` (step 2/3) at 20%.
        wait_for(
            server,
            "the canary to pause at 20%",
            Duration::from_secs(40),
            |v| v["phase"] == "Paused" && v["canaryWeight"] == 20,
        )?;
        wait_for(
            server,
            "an analysis and a rollout hook call",
            Duration::from_secs(10),
            |v| v["lastAnalysis"]["verdict"] == "Pass" && !v["webhooks"][1]["lastCall"].is_null(),
        )?;
        let (code, text, _) = fledge(&["status", "app", "--server", server])?;
        ensure!(code == 0, "status exit {code}");
        for expected in [
            "app  Paused\n",
            "  weight    [██░░░░░░░░]  20%   step 2/3   failed checks 0/3\n",
            "paused at 20% until promoted",
            "✔ request-success-rate",
            "(>= 99%)",
            "✔ load-test (rollout) answered 200 OK",
            "· approve (confirm-promotion) not called yet",
        ] {
            ensure!(text.contains(expected), "missing {expected:?} in\n{text}");
        }
        let (code, table, _) = fledge(&["status", "--server", server])?;
        ensure!(
            code == 0 && table.starts_with("NAME") && table.contains("\napp "),
            "{table}"
        );

        // pause → resume, each visible in the status.
        let (code, out, _) = fledge(&["pause", "app", "--server", server])?;
        ensure!(code == 0 && out.contains("pause requested"), "{code} {out}");
        wait_for(server, "pausedByOperator", Duration::from_secs(10), |v| {
            v["pausedByOperator"] == true
        })?;
        let (code, _, _) = fledge(&["resume", "app", "--server", server])?;
        ensure!(code == 0);
        wait_for(server, "the resume", Duration::from_secs(10), |v| {
            v.get("pausedByOperator").is_none_or(|p| p == false)
        })?;

        // promote → 60% → the closed confirm-promotion gate holds the promotion.
        let (code, out, _) = fledge(&["promote", "app", "--server", server, "-o", "json"])?;
        ensure!(code == 0, "{out}");
        ensure!(
            serde_json::from_str::<Value>(out.trim())?["command"] == "promote",
            "{out}"
        );
        let held = wait_for(
            server,
            "the promotion to be held",
            Duration::from_secs(30),
            |v| {
                v["message"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("promotion held at 60%")
            },
        )?;
        ensure!(
            held["phase"] == "Progressing" && held["canaryWeight"] == 60,
            "{held}"
        );
        let (_, text, _) = fledge(&["status", "app", "--server", server])?;
        ensure!(
            text.contains("✘ approve (confirm-promotion) answered 403 Forbidden (final)"),
            "{text}"
        );
        std::thread::sleep(Duration::from_secs(2));
        ensure!(
            status_json(server, "app")?["phase"] == "Progressing",
            "still held while the gate is closed"
        );

        // Open the gate: `status --watch` follows the rollout to Promoted and exits 0.
        receiver.gate_open.store(true, Ordering::SeqCst);
        let (code, frames, err) = fledge(&[
            "status",
            "app",
            "--watch",
            "--interval",
            "0.5",
            "--server",
            server,
        ])?;
        ensure!(code == 0, "watch exit {code}: {err}");
        ensure!(
            frames.contains("app  Promoted\n") && frames.contains("[██████████] 100%"),
            "{frames}"
        );

        // Finished: commands are refused (exit 4), unknown canaries too, a dead server is 3.
        let (code, out, _) = fledge(&["abort", "app", "--server", server, "-o", "json"])?;
        let answer: Value = serde_json::from_str(out.trim())?;
        ensure!(code == 4 && answer["exitCode"] == 4, "{code} {out}");
        ensure!(
            answer["error"]
                .as_str()
                .unwrap_or_default()
                .contains("already finished"),
            "{out}"
        );
        let (code, _, err) = fledge(&["retry", "app", "--server", server])?;
        ensure!(code == 4 && err.contains("not rolled back"), "{code} {err}");
        let (code, _, err) = fledge(&["status", "nosuch", "--server", server])?;
        ensure!(code == 4 && err.contains("no canary named"), "{code} {err}");
        let dead = format!("http://127.0.0.1:{}", free_port()?);
        let (code, _, err) = fledge(&["status", "--server", &dead])?;
        ensure!(
            code == 3 && err.contains("cannot reach the fledge server"),
            "{code} {err}"
        );

        // Webhooks: Slack-style events, one post-rollout call, the load test every interval.
        let events: Vec<String> = receiver
            .calls_to("/events")
            .iter()
            .filter_map(|b| b["text"].as_str().map(str::to_string))
            .collect();
        ensure!(
            events
                .iter()
                .any(|t| t.contains("*app* Promoted: promotion completed")),
            "events: {events:#?}"
        );
        ensure!(
            events.iter().any(|t| t.contains("promotion held at 60%")),
            "{events:#?}"
        );
        wait_until("the post-rollout hook", Duration::from_secs(5), || {
            Ok((receiver.calls_to("/done").len() == 1).then_some(()))
        })?;
        let loads = receiver.calls_to("/load");
        ensure!(loads.len() >= 3, "rollout hook calls: {}", loads.len());
        ensure!(loads[0]["metadata"]["cmd"] == "hey -z 1m", "{}", loads[0]);
        ensure!(loads[0]["canary"]["name"] == "app", "{}", loads[0]);

        // Self-metrics.
        let metrics = http::get_ok(&format!("{server}/metrics"), Duration::from_secs(3))?;
        for expected in [
            "fledge_canary_weight{canary=\"app\"} 100",
            "fledge_canary_phase{canary=\"app\",phase=\"Promoted\"} 1",
            "fledge_decisions_total{canary=\"app\",reason=\"Promoted\"} 1",
            "fledge_webhook_calls_total{canary=\"app\",webhook=\"approve\",type=\"confirm-promotion\",outcome=\"failed\"}",
            "fledge_webhook_calls_total{canary=\"app\",webhook=\"approve\",type=\"confirm-promotion\",outcome=\"ok\"} 1",
            "fledge_analysis_total{canary=\"app\",verdict=\"Pass\"}",
        ] {
            ensure!(metrics.contains(expected), "missing {expected:?} in\n{metrics}");
        }
        Ok(())
    })();
    result.with_context(|| format!("fledge log tail:\n{}", controller.log_tail(40)))
}

#[test]
fn validate_reports_field_and_fix_as_json_with_exit_code_2() -> Result<()> {
    let dir = ScratchDir::temp("operator-validate")?;
    let path = dir.path().join("bad.yaml");
    let mut manifest = CanaryManifest::new(
        "app",
        "app",
        "http://127.0.0.1:9901",
        &dir.path().join("routes.json"),
    );
    manifest.analysis_yaml =
        "threshold: 0\nsteps: [{setWeight: 50}]\ncompareWithStable: {}\n".into();
    std::fs::write(
        &path,
        manifest.to_yaml()
            + "  webhooks: [{name: gate, type: confirm-promotion, url: \"ftp://x\"}]\n",
    )?;
    let file = path.to_str().unwrap_or_default();
    let (code, out, _) = fledge(&["validate", "-f", file, "-o", "json"])?;
    ensure!(code == 2, "exit {code}: {out}");
    let answer: Value = serde_json::from_str(out.trim())?;
    let fields: Vec<&str> = answer[0]["errors"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["field"].as_str())
        .collect();
    ensure!(
        fields == ["spec.analysis.threshold", "spec.webhooks[0].url"],
        "{answer:#}"
    );
    let (code, _, err) = fledge(&["validate", "-f", file])?;
    ensure!(
        code == 2 && err.contains("spec.webhooks[0].url"),
        "{code} {err}"
    );
    Ok(())
}
