//! A canary that starts failing hard, on real processes: how fast the data-plane guard stops its
//! traffic and how fast the controller rolls it back. Used by `e2e/tests/guard.rs` and
//! `make bench-rollback` (`fledge-bench-rollback`).
//!
//! ```text
//!  LoadGen ─▶ Envoy (2 workers, filter with guard) ─▶ route "fledge-guard" (x-fledge-guard ~ app) ─▶ stable v1
//!                                                   └▶ route "primary" 50/50 ─▶ stable v1 / canary v2
//!  fledge run (spec defaults + `guard: {}`) holds the canary at 50%
//!  t0: canary v2 answers 500 to everything (POST /__backend/error-rate?rate=1)
//! ```
//!
//! Both times are measured from the canary's **first failed request** (the backend's own clock):
//! - *guard*: to the **last request the canary backend served** (its own clock too);
//! - *controller*: to the moment the status API says `RolledBack` **and** Envoy serves 0% canary
//!   (`/config_dump`), observed by polling every 20 ms.

use crate::controller::{CanaryManifest, Controller, PHASE_ROLLED_BACK};
use crate::envoy::{Envoy, EnvoyOptions, RouteWeights, WasmFilter, CANARY_CLUSTER, STABLE_CLUSTER};
use crate::loadgen::{LoadGen, LoadOptions};
use crate::process::{wait_until, ScratchDir};
use crate::{Backend, BackendOptions};
use anyhow::{bail, ensure, Context, Result};
use fledge_core::contract;
use fledge_core::filter_config::Guard;
use serde_json::json;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How the scenario runs.
#[derive(Debug, Clone)]
pub struct RollbackOptions {
    /// Requests per second through Envoy (both versions together).
    pub rps: u32,
    /// Canary weight the rollout holds at when the canary starts failing.
    pub canary_weight: u8,
    /// Put the guard in the filter configuration (and `guard: {}` in the spec).
    pub guard: bool,
    /// Run `fledge run` (otherwise the weights are fixed and only the guard acts).
    pub controller: bool,
    /// Envoy worker threads (the guard's window is shared across them).
    pub concurrency: u32,
    /// Healthy traffic before the canary starts failing.
    pub warmup: Duration,
}

impl Default for RollbackOptions {
    fn default() -> Self {
        RollbackOptions {
            rps: 200,
            canary_weight: 50,
            guard: true,
            controller: true,
            concurrency: 2,
            warmup: Duration::from_secs(2),
        }
    }
}

/// What one run measured.
#[derive(Debug, Clone, Default)]
pub struct RollbackTimes {
    /// First failed canary request → last request the canary served.
    pub guard_ms: u64,
    /// First failed canary request → `RolledBack` in the API and 0% canary live in Envoy.
    pub controller_ms: Option<u64>,
    /// Requests the canary answered with 500 (all of its requests after the switch).
    pub canary_failures: u64,
    /// 5xx answers the clients saw during the whole run.
    pub client_errors: u64,
    /// `fledge_guard_tripped{fledge_service="app"}` at the end (Unix seconds; 0 = armed).
    pub guard_gauge: u64,
    /// The controller's rollback reason.
    pub reason: String,
    /// Envoy's log lines about the guard (each worker that tripped it logs once).
    pub envoy_guard_log: Vec<String>,
    /// The canary's first failure and last served request (Unix ms, the backend's clock).
    pub first_failure_unix_ms: u64,
    pub last_canary_unix_ms: u64,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The plugin configuration: the two clusters of service `app`, and the default guard.
pub fn plugin_config(guard: bool) -> String {
    let mut config = json!({
        "clusters": {
            STABLE_CLUSTER: {"service": "app", "subset": "stable"},
            CANARY_CLUSTER: {"service": "app", "subset": "canary"},
        }
    });
    if guard {
        config["guard"] = json!({"services": {"app": {}}});
    }
    config.to_string()
}

/// The route placed before the weighted route: requests the guard of `app` steers go to stable.
pub fn guard_route() -> serde_json::Value {
    json!({
        "name": "fledge-guard",
        "match": {"prefix": "/", "headers": [{
            "name": contract::DEFAULT_GUARD_HEADER,
            "string_match": {"safe_regex": {"regex": Guard::route_regex("app")}}
        }]},
        "route": {"cluster": STABLE_CLUSTER}
    })
}

/// `spec.analysis` at the defaults (interval 30s, threshold 5, ...), holding at `weight`.
fn analysis(weight: u8, guard: bool) -> String {
    let mut yaml = format!(
        "steps: [{{setWeight: {weight}}}, {{pause: {{}}}}]
metrics:
  - {{name: request-success-rate, thresholdRange: {{min: 99}}}}
"
    );
    if guard {
        yaml.push_str("guard: {}\n");
    }
    yaml
}

/// Run the scenario once (see the module docs).
pub fn run(options: &RollbackOptions) -> Result<RollbackTimes> {
    let dir = ScratchDir::temp("rollback")?;
    let stable = Backend::start("v1", BackendOptions::default())?;
    let canary = Backend::start("v2", BackendOptions::default())?;
    let mut envoy_options = EnvoyOptions::new(stable.port(), canary.port())
        .with_filter(WasmFilter::built(&plugin_config(options.guard))?)
        .with_route_before_primary(guard_route())
        .in_dir(&dir.path().join("envoy"));
    envoy_options.concurrency = options.concurrency;
    envoy_options.log_level = "warning".into();
    if !options.controller {
        envoy_options.initial_weights =
            RouteWeights::canary_percent(u32::from(options.canary_weight));
    }
    let envoy = Envoy::start(envoy_options)?;
    let mut load_options = LoadOptions::new(options.rps, Duration::from_secs(90));
    load_options.workers = 8;
    load_options.request_timeout = Duration::from_secs(2);
    let load = LoadGen::start(&envoy.listener_url(), load_options)?;

    let mut controller = None;
    if options.controller {
        let mut manifest = CanaryManifest::new("app", "app", &envoy.admin_url(), envoy.rds_path());
        manifest.analysis_yaml = analysis(options.canary_weight, options.guard);
        let path = dir.path().join("app.yaml");
        manifest.write(&path)?;
        let mut running = Controller::start(
            &path,
            &dir.path().join("state"),
            &dir.path().join("fledge.log"),
        )?;
        let weight = u64::from(options.canary_weight);
        wait_until(
            "the rollout to hold the canary at its weight",
            Duration::from_secs(30),
            || {
                let view = running.canary("app")?;
                Ok(
                    (view.canary_weight == Some(weight) && view.phase == "Progressing")
                        .then_some(()),
                )
            },
        )
        .with_context(|| format!("controller log:\n{}", running.log_tail(30)))?;
        envoy.wait_for_route_weights(
            RouteWeights::canary_percent(u32::from(options.canary_weight)),
            Duration::from_secs(10),
        )?;
        controller = Some(running);
    }
    std::thread::sleep(options.warmup);
    ensure!(
        canary.served()? > 0,
        "the canary got no traffic before failing"
    );

    canary.set_error_rate(1.0)?;
    let switched = Instant::now();
    let mut rolled_back_at = None;
    let mut reason = String::new();
    if let Some(running) = controller.as_mut() {
        let deadline = Duration::from_secs(45);
        while switched.elapsed() < deadline {
            let view = running.canary("app")?;
            if view.phase == PHASE_ROLLED_BACK {
                let (live, _) = envoy.live_route_weights()?;
                if live.canary == 0 {
                    rolled_back_at = Some(unix_ms());
                    reason = view.message.clone();
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if rolled_back_at.is_none() {
            bail!(
                "no rollback within 45 s; controller log:\n{}",
                running.log_tail(30)
            );
        }
    } else {
        // Guard only: give it time to act, then look.
        std::thread::sleep(Duration::from_secs(4));
    }
    // Requests in flight when the traffic stopped have finished by now.
    std::thread::sleep(Duration::from_millis(1500));
    let report = load.stop();
    let stats = canary.stats()?;
    ensure!(
        stats.first_error_unix_ms > 0,
        "the canary never failed a request after the switch"
    );
    let guard_gauge =
        crate::http::prometheus_samples(&envoy.stats_prometheus()?, contract::GUARD_TRIPPED)
            .iter()
            .filter(|s| s.label(contract::TAG_SERVICE) == Some("app"))
            .map(|s| s.value as u64)
            .max()
            .unwrap_or(0);
    Ok(RollbackTimes {
        guard_ms: stats
            .last_served_unix_ms
            .saturating_sub(stats.first_error_unix_ms),
        controller_ms: rolled_back_at.map(|at| at.saturating_sub(stats.first_error_unix_ms)),
        canary_failures: stats.errors,
        client_errors: report.server_errors(),
        guard_gauge,
        reason,
        envoy_guard_log: envoy
            .log_text()
            .lines()
            .filter(|line| line.contains("guard"))
            .map(str::to_string)
            .collect(),
        first_failure_unix_ms: stats.first_error_unix_ms,
        last_canary_unix_ms: stats.last_served_unix_ms,
    })
}
