//! Fault survival on real processes: the controller killed mid-rollout, two controllers on the
//! same canary, Envoy restarted (counters reset), the metrics source down / slow / returning
//! garbage, and the RDS file edited by someone else mid-rollout.

use anyhow::{bail, ensure, Context, Result};
use fledge_e2e::{wait_until, AppStack, CanaryView, Controller, LoadOptions, RouteWeights};
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Backends, Envoy with the filter and 100 req/s of load (8 connections).
fn start_stack(name: &str) -> Result<AppStack> {
    let mut load = LoadOptions::new(100, Duration::from_secs(150));
    load.workers = 8;
    AppStack::builder(name).load(load).start()
}

/// Write the Canary manifest (optionally reading metrics from `metrics_url`).
fn write_manifest(
    stack: &AppStack,
    name: &str,
    analysis: &str,
    metrics_url: Option<&str>,
) -> Result<PathBuf> {
    let mut manifest = stack.manifest_for(name);
    manifest.analysis_yaml = analysis.to_string();
    let mut yaml = manifest.to_yaml();
    if let Some(url) = metrics_url {
        let admin = format!("envoyAdmin: {{urls: [\"{}\"]}}", stack.envoy.admin_url());
        ensure!(yaml.contains(&admin), "unexpected manifest shape:\n{yaml}");
        yaml = yaml.replace(
            &admin,
            &format!("envoyAdmin: {{urls: [\"{url}\"], timeout: 1s}}"),
        );
    }
    let path = stack.path().join(format!("{name}.yaml"));
    std::fs::write(&path, yaml)?;
    Ok(path)
}

/// A `fledge run` on `manifest` with the stack's state directory, logging to `log`.
fn start_controller(stack: &AppStack, manifest: &Path, log: &str) -> Result<Controller> {
    Controller::start(
        manifest,
        &stack.path().join("state"),
        &stack.path().join(log),
    )
}

fn wait_for(
    controller: &mut Controller,
    name: &str,
    what: &str,
    timeout: Duration,
    done: impl Fn(&CanaryView) -> bool,
) -> Result<CanaryView> {
    let result = wait_until(what, timeout, || {
        let view = controller.canary(name)?;
        if done(&view) {
            return Ok(Some(view));
        }
        if view.phase == "RolledBack" {
            bail!("canary rolled back: {}", view.message);
        }
        Ok(None)
    });
    result.with_context(|| format!("controller output:\n{}", controller.log_tail(40)))
}

fn history(view: &CanaryView) -> Vec<Value> {
    view.raw["history"].as_array().cloned().unwrap_or_default()
}

/// Weights of every "advance canary weight" transition, in order.
fn advances(view: &CanaryView) -> Vec<u64> {
    history(view)
        .iter()
        .filter(|t| {
            t["reason"]
                .as_str()
                .is_some_and(|r| r.starts_with("advance canary weight"))
        })
        .filter_map(|t| t["canaryWeight"].as_u64())
        .collect()
}

const STEPPED: &str = "interval: 2s
threshold: 2
minCanaryRequests: 5
steps: [{setWeight: 20}, {pause: {duration: 4s}}, {setWeight: 40}, {pause: {duration: 4s}}, {setWeight: 60}, {setWeight: 80}]
metrics:
  - {name: request-success-rate, thresholdRange: {min: 99}}
";

#[test]
fn controller_killed_mid_rollout_continues_at_the_same_step() -> Result<()> {
    let world = start_stack("killed")?;
    let manifest = write_manifest(&world, "killed", STEPPED, None)?;
    let mut first = start_controller(&world, &manifest, "fledge-1.log")?;
    let before = wait_for(
        &mut first,
        "killed",
        "weight 40",
        Duration::from_secs(40),
        |v| v.canary_weight == Some(40),
    )?;
    first.kill();
    let (live, _) = world.envoy.live_route_weights()?;
    ensure!(live == RouteWeights::canary_percent(40), "live {live}");

    let mut second = start_controller(&world, &manifest, "fledge-2.log")?;
    let resumed = wait_for(
        &mut second,
        "killed",
        "the canary in the API",
        Duration::from_secs(10),
        |_| true,
    )?;
    ensure!(
        resumed.step >= before.step && resumed.canary_weight >= Some(40),
        "restarted at step {:?} weight {:?}, was step {:?}",
        resumed.step,
        resumed.canary_weight,
        before.step
    );
    ensure!(
        history(&resumed)[..history(&before).len()] == history(&before)[..],
        "history before the kill must be kept"
    );
    ensure!(
        second.log_text().contains("resuming from saved state"),
        "{}",
        second.log_tail(20)
    );
    let done = wait_for(
        &mut second,
        "killed",
        "Promoted",
        Duration::from_secs(60),
        |v| v.phase == "Promoted",
    )?;
    ensure!(
        advances(&done) == [20, 40, 60, 80],
        "each step exactly once: {:?}",
        advances(&done)
    );
    Ok(())
}

#[test]
fn two_controllers_only_one_acts_and_the_standby_takes_over() -> Result<()> {
    let world = start_stack("standby")?;
    let manifest = write_manifest(&world, "standby", STEPPED, None)?;
    let mut active = start_controller(&world, &manifest, "fledge-a.log")?;
    wait_for(
        &mut active,
        "standby",
        "weight 20",
        Duration::from_secs(20),
        |v| v.canary_weight == Some(20),
    )?;
    let mut standby = start_controller(&world, &manifest, "fledge-b.log")?;
    let waiting = wait_for(
        &mut standby,
        "standby",
        "standby view",
        Duration::from_secs(10),
        |v| {
            v.raw["routerError"]
                .as_str()
                .is_some_and(|e| e.starts_with("standby"))
        },
    )?;
    ensure!(waiting.raw["routerError"]
        .as_str()
        .unwrap_or_default()
        .contains(".lock"));
    std::thread::sleep(Duration::from_secs(4));
    ensure!(
        !standby.log_text().contains("advance canary weight"),
        "the standby must not act:\n{}",
        standby.log_tail(20)
    );
    active.kill();
    let done = wait_for(
        &mut standby,
        "standby",
        "Promoted",
        Duration::from_secs(60),
        |v| v.phase == "Promoted",
    )?;
    ensure!(
        advances(&done) == [20, 40, 60, 80],
        "each step exactly once across both controllers: {:?}",
        advances(&done)
    );
    ensure!(standby.log_text().contains("advance canary weight"));
    Ok(())
}

#[test]
fn envoy_restart_resets_counters_without_a_false_verdict() -> Result<()> {
    let mut world = start_stack("restart")?;
    let manifest = write_manifest(&world, "restart", STEPPED, None)?;
    let mut controller = start_controller(&world, &manifest, "fledge.log")?;
    wait_for(
        &mut controller,
        "restart",
        "weight 40",
        Duration::from_secs(40),
        |v| v.canary_weight == Some(40),
    )?;
    let requests_before = world.envoy.stats_prometheus()?;
    ensure!(requests_before.contains("fledge_requests_total"));
    world.envoy.restart()?;
    let done = wait_for(
        &mut controller,
        "restart",
        "Promoted",
        Duration::from_secs(60),
        |v| v.phase == "Promoted",
    )?;
    ensure!(
        done.raw["failedChecks"] == 0,
        "a counter reset must not produce a failed check: {}",
        done.raw
    );
    ensure!(advances(&done) == [20, 40, 60, 80], "{:?}", advances(&done));
    // A halt on the partial interval after the restart names the reset, not missing traffic.
    let transitions = history(&done);
    let halts: Vec<&str> = transitions
        .iter()
        .filter(|t| t["phase"] == "Halted")
        .filter_map(|t| t["reason"].as_str())
        .collect();
    eprintln!("halts around the restart: {halts:#?}");
    ensure!(
        halts
            .iter()
            .all(|r| !r.contains("canary receives no traffic")),
        "a restart was reported as missing traffic: {halts:#?}"
    );
    Ok(())
}

/// An HTTP proxy in front of Envoy's admin API whose behaviour the test switches.
struct FaultyAdmin {
    url: String,
    mode: Arc<AtomicU8>,
    stop: Arc<AtomicBool>,
}

const UP: u8 = 0;
const DOWN: u8 = 1;
const GARBAGE: u8 = 2;
const SLOW: u8 = 3;

impl FaultyAdmin {
    fn start(upstream: String) -> Result<FaultyAdmin> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let url = format!("http://{}", listener.local_addr()?);
        let mode = Arc::new(AtomicU8::new(DOWN));
        let stop = Arc::new(AtomicBool::new(false));
        let (mode2, stop2) = (mode.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let (upstream, mode) = (upstream.clone(), mode2.load(Ordering::Relaxed));
                        std::thread::spawn(move || {
                            let _ = serve(stream, &upstream, mode);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Ok(FaultyAdmin { url, mode, stop })
    }

    fn set(&self, mode: u8) {
        self.mode.store(mode, Ordering::Relaxed);
    }
}

impl Drop for FaultyAdmin {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn serve(stream: TcpStream, upstream: &str, mode: u8) -> Result<()> {
    stream.set_nonblocking(false)?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header == "\r\n" {
            break;
        }
    }
    let path = request_line.split_whitespace().nth(1).unwrap_or("/");
    let (status, body) = match mode {
        UP => fledge_e2e::http::get(&format!("{upstream}{path}"), Duration::from_secs(2))?,
        DOWN => (503, "admin unavailable".to_string()),
        GARBAGE => (
            200,
            "fledge_requests_total{{{ this is not prometheus\n".to_string(),
        ),
        _ => {
            std::thread::sleep(Duration::from_secs(3));
            (200, String::new())
        }
    };
    let mut stream = stream;
    write!(
        stream,
        "HTTP/1.1 {status} X\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )?;
    Ok(())
}

#[test]
fn metrics_outage_never_promotes_halts_at_the_limit_and_resumes() -> Result<()> {
    let world = start_stack("outage")?;
    let admin = FaultyAdmin::start(world.envoy.admin_url())?;
    let quick = "interval: 2s
threshold: 2
minCanaryRequests: 5
metricsFailureLimit: 2
steps: [{setWeight: 20}, {setWeight: 40}]
metrics:
  - {name: request-success-rate, thresholdRange: {min: 99}}
";
    let manifest = write_manifest(&world, "outage", quick, Some(&admin.url))?;
    let mut controller = start_controller(&world, &manifest, "fledge.log")?;
    let mut seen = Vec::new();
    for (mode, expect, secs) in [
        (DOWN, "unreachable", 8),
        (GARBAGE, "malformed", 6),
        (SLOW, "unreachable", 6),
    ] {
        admin.set(mode);
        let halted = wait_for(
            &mut controller,
            "outage",
            &format!("halted with {expect}"),
            Duration::from_secs(secs + 10),
            |v| v.phase == "Halted" && v.message.contains(expect),
        )?;
        ensure!(
            halted
                .message
                .contains("intervals in a row (metricsFailureLimit 2)"),
            "{}",
            halted.message
        );
        seen.push(halted.message.clone());
        std::thread::sleep(Duration::from_secs(secs));
        let view = controller.canary("outage")?;
        ensure!(
            view.phase == "Halted" && view.canary_weight == Some(20),
            "still halted at 20% while metrics are bad: {view:?}"
        );
    }
    admin.set(UP);
    let done = wait_for(
        &mut controller,
        "outage",
        "Promoted",
        Duration::from_secs(40),
        |v| v.phase == "Promoted",
    )?;
    ensure!(done.raw["failedChecks"] == 0, "{}", done.raw);
    ensure!(
        history(&done)
            .iter()
            .any(|t| t["reason"].as_str().is_some_and(|r| r.contains("resuming"))),
        "{:?}",
        history(&done)
    );
    eprintln!("halt reasons seen: {seen:#?}");
    Ok(())
}

#[test]
fn rds_weights_edited_by_someone_else_are_reported_and_their_other_changes_survive() -> Result<()> {
    let world = start_stack("edited")?;
    let holding = "interval: 2s
threshold: 2
minCanaryRequests: 5
steps: [{setWeight: 30}, {pause: {duration: 60s}}]
metrics:
  - {name: request-success-rate, thresholdRange: {min: 99}}
";
    let manifest = write_manifest(&world, "edited", holding, None)?;
    let mut controller = start_controller(&world, &manifest, "fledge.log")?;
    wait_for(
        &mut controller,
        "edited",
        "weight 30",
        Duration::from_secs(20),
        |v| v.canary_weight == Some(30) && v.raw["routerError"].is_null(),
    )?;

    // Someone edits the file by hand: other weights, and a new route of their own.
    let path = world.envoy.rds_path();
    let mut doc: Value = serde_json::from_str(&std::fs::read_to_string(path)?)?;
    let routes = doc["resources"][0]["virtual_hosts"][0]["routes"]
        .as_array_mut()
        .context("routes")?;
    for route in routes.iter_mut() {
        if route["name"] == "primary" {
            for cluster in route["route"]["weighted_clusters"]["clusters"]
                .as_array_mut()
                .context("clusters")?
            {
                cluster["weight"] = Value::from(50);
            }
        }
    }
    routes.insert(
        0,
        serde_json::json!({"name": "added-by-operator", "match": {"prefix": "/operator-only"},
                           "route": {"cluster": "app_stable"}}),
    );
    doc["version_info"] = Value::from("999");
    let tmp = path.with_extension("tmp-edit");
    std::fs::write(&tmp, serde_json::to_vec(&doc)?)?;
    std::fs::rename(&tmp, path)?;

    let view = wait_for(
        &mut controller,
        "edited",
        "conflict reported",
        Duration::from_secs(15),
        |v| v.raw["conflict"].is_string(),
    )?;
    let conflict = view.raw["conflict"].as_str().unwrap_or_default();
    ensure!(
        conflict.contains("changed outside fledge: found stable 50 / canary 50")
            && conflict.contains("restored stable 70 / canary 30"),
        "{conflict}"
    );
    world
        .envoy
        .wait_for_route_weights(RouteWeights::canary_percent(30), Duration::from_secs(10))?;
    let text = std::fs::read_to_string(path)?;
    ensure!(
        text.contains("added-by-operator"),
        "their route must survive: {text}"
    );
    ensure!(controller.log_text().contains("changed outside fledge"));
    Ok(())
}
