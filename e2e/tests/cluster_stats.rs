//! `metricsSource.envoyClusterStats` on a real Envoy **without the Fledge filter**: the
//! controller reads Envoy's own `upstream_rq_<N>xx` and `upstream_rq_time` of the stable and
//! canary clusters. A healthy canary is promoted; one answering 20% 5xx is rolled back; one
//! that is down (connections refused: Envoy answers 503 on its behalf) is rolled back too, not
//! mistaken for an idle canary.

use anyhow::{bail, ensure, Context, Result};
use fledge_e2e::{
    init_tracing, wait_until, Backend, BackendOptions, CanaryManifest, CanaryView, Controller,
    Envoy, EnvoyOptions, LoadGen, LoadOptions, ScratchDir,
};
use std::time::Duration;

const ANALYSIS: &str = "interval: 2s
threshold: 2
minCanaryRequests: 10
steps: [{setWeight: 20}, {setWeight: 50}]
metrics:
  - {name: request-success-rate, thresholdRange: {min: 99}}
  - {name: request-duration, quantile: 0.99, thresholdRange: {max: 500}}
";

struct Run {
    stable: Backend,
    canary: Option<Backend>,
    envoy: Envoy,
    load: Option<LoadGen>,
    controller: Controller,
    _dir: ScratchDir,
}

/// Backends, a filter-less Envoy, load, and `fledge run` reading cluster stats. `canary_down`
/// stops the canary backend before the rollout starts.
fn start(name: &str, canary: BackendOptions, canary_down: bool) -> Result<Run> {
    init_tracing();
    let dir = ScratchDir::temp(name)?;
    let stable = Backend::start("v1", BackendOptions::default())?;
    let canary = Backend::start("v2", canary)?;
    let envoy = Envoy::start(
        EnvoyOptions::new(stable.port(), canary.port()).in_dir(&dir.path().join("envoy")),
    )?;
    let canary = if canary_down {
        canary.stop();
        None
    } else {
        Some(canary)
    };
    let mut options = LoadOptions::new(100, Duration::from_secs(90));
    options.workers = 8;
    let load = LoadGen::start(&envoy.listener_url(), options)?;
    let mut manifest = CanaryManifest::new(name, "app", &envoy.admin_url(), envoy.rds_path());
    manifest.analysis_yaml = ANALYSIS.to_string();
    manifest.cluster_stats = true;
    let controller = Controller::start_in(dir.path(), &manifest)?;
    Ok(Run {
        stable,
        canary,
        envoy,
        load: Some(load),
        controller,
        _dir: dir,
    })
}

impl Run {
    fn wait_for(&mut self, name: &str, phase: &str) -> Result<CanaryView> {
        let controller = &mut self.controller;
        wait_until(
            &format!("{name} to be {phase}"),
            Duration::from_secs(60),
            || {
                let view = controller.canary(name)?;
                if view.phase == phase {
                    return Ok(Some(view));
                }
                if ["Promoted", "RolledBack", "Halted"].contains(&view.phase.as_str()) {
                    bail!("{name} ended {}: {}", view.phase, view.message);
                }
                Ok(None)
            },
        )
        .with_context(|| format!("fledge log:\n{}", self.controller.log_tail(30)))
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        if let Some(load) = self.load.take() {
            load.stop();
        }
    }
}

#[test]
fn a_healthy_canary_is_promoted_from_envoys_own_cluster_stats() -> Result<()> {
    let mut run = start("native-healthy", BackendOptions::default(), false)?;
    let view = run.wait_for("native-healthy", "Promoted")?;
    let analysis = &view.raw["lastAnalysis"];
    ensure!(analysis["verdict"] == "Pass", "{analysis}");
    ensure!(
        analysis["canaryRequests"].as_u64() > Some(10),
        "the canary's requests were counted: {analysis}"
    );
    let p99 = analysis["checks"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["name"] == "request-duration")
        .and_then(|c| c["value"].as_f64());
    ensure!(
        p99.is_some_and(|ms| ms <= 500.0),
        "a latency from upstream_rq_time: {analysis}"
    );
    let served_by_canary = run.canary.as_ref().map(|c| c.served()).transpose()?;
    ensure!(served_by_canary > Some(0));
    ensure!(run.stable.served()? > 0);
    Ok(())
}

#[test]
fn a_canary_answering_errors_is_rolled_back_from_cluster_stats() -> Result<()> {
    let canary = BackendOptions {
        error_rate: 0.2,
        ..BackendOptions::default()
    };
    let mut run = start("native-errors", canary, false)?;
    let view = run.wait_for("native-errors", "RolledBack")?;
    ensure!(
        view.message.contains("success rate"),
        "rolled back for its errors: {}",
        view.message
    );
    let canary = run.canary.as_ref().context("the canary backend")?;
    let before = canary.served()?;
    std::thread::sleep(Duration::from_secs(2));
    ensure!(
        canary.served()? == before,
        "the rolled-back canary still gets traffic"
    );
    Ok(())
}

#[test]
fn a_canary_that_is_down_is_rolled_back_not_taken_for_idle() -> Result<()> {
    let mut run = start("native-down", BackendOptions::default(), true)?;
    let view = run.wait_for("native-down", "RolledBack")?;
    let analysis = &view.raw["lastAnalysis"];
    ensure!(
        analysis["canaryRequests"].as_u64() > Some(0),
        "Envoy's 503s for the refused connections count as canary requests: {analysis}"
    );
    ensure!(
        view.message.contains("canary success rate 0%"),
        "{}",
        view.message
    );
    let (weights, _) = run.envoy.live_route_weights()?;
    ensure!(weights.canary == 0, "Envoy serves {weights}");
    Ok(())
}
