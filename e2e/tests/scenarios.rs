//! The main job end to end on real processes: the Fledge filter in a real Envoy, real backends,
//! bounded load, and `fledge run` moving the weights through file-based RDS. Every scenario
//! asserts on the traffic that really reaches each backend, not only on the controller's status.

use anyhow::{ensure, Context, Result};
use fledge_e2e::{
    init_tracing, wait_until, AppStack, Backend, BackendOptions, CanaryView, Envoy, EnvoyOptions,
    LoadGen, LoadOptions, RouteWeights, ScratchDir, WasmFilter,
};
use std::time::Duration;

/// Steps 20 → 40 → 60 → 80 with 2 s intervals: a healthy canary is promoted in ~10 s.
const FAST_ANALYSIS: &str = "interval: 2s
threshold: 2
minCanaryRequests: 10
steps: [{setWeight: 20}, {setWeight: 40}, {setWeight: 60}, {setWeight: 80}]
metrics:
  - {name: request-success-rate, thresholdRange: {min: 99}}
  - {name: request-duration, quantile: 0.99, thresholdRange: {max: 500}}
";

/// Sequential canary-vs-stable comparison only (no fixed thresholds), with long pauses so only
/// the test can end the rollout early. Stable itself answers 5% errors.
const SEQUENTIAL_ANALYSIS: &str = "interval: 2s
threshold: 3
minCanaryRequests: 10
steps: [{setWeight: 30}, {pause: {duration: 20s}}, {setWeight: 50}, {pause: {duration: 5s}}]
compareWithStable: {falseRollbackRate: 0.001}
";

struct Scenario {
    name: &'static str,
    stable: BackendOptions,
    canary: BackendOptions,
    rps: u32,
    analysis: &'static str,
}

impl Scenario {
    fn start(self) -> Result<AppStack> {
        let mut load = LoadOptions::new(self.rps, Duration::from_secs(120));
        // Enough connections that a slow canary does not throttle the offered load.
        load.workers = 8;
        AppStack::builder(self.name)
            .stable(self.stable)
            .canary(self.canary)
            .load(load)
            .controller(self.analysis)
            .start()
    }
}

fn history_phases(view: &CanaryView) -> Vec<String> {
    view.raw["history"]
        .as_array()
        .map(|h| {
            h.iter()
                .filter_map(|t| t["phase"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn healthy_canary_is_promoted_and_then_gets_the_traffic() -> Result<()> {
    let mut stack = Scenario {
        name: "healthy",
        stable: BackendOptions::default(),
        canary: BackendOptions::default(),
        rps: 100,
        analysis: FAST_ANALYSIS,
    }
    .start()?;
    let view =
        stack
            .controller()?
            .wait_for_phase("healthy", "Promoted", Duration::from_secs(60))?;
    ensure!(view.canary_weight == Some(100), "{view:?}");
    let phases = history_phases(&view);
    ensure!(
        phases.iter().filter(|p| *p == "Progressing").count() == 4,
        "four weight steps expected in history: {phases:?}"
    );
    let weights = view.weights_walked();
    ensure!(
        weights == [20, 40, 60, 80, 100],
        "weights walked {weights:?}"
    );
    ensure!(
        view.raw["lastAnalysis"]["verdict"] == "Pass",
        "last analysis: {}",
        view.raw["lastAnalysis"]
    );

    let (stable, canary) = stack.served_during(Duration::from_secs(3))?;
    let share = canary as f64 / (stable + canary).max(1) as f64;
    ensure!(
        canary > 100 && share >= 0.99,
        "after promotion canary served {canary}, stable {stable} ({:.1}% canary)",
        share * 100.0
    );
    Ok(())
}

/// One step at 50% with 1 s intervals: promoted a few seconds after it starts.
const ONE_STEP_ANALYSIS: &str = "interval: 1s
threshold: 2
minCanaryRequests: 5
stepWeights: [50]
metrics:
  - {name: request-success-rate, thresholdRange: {min: 99}}
";

#[test]
fn one_fledge_run_hands_the_route_back_after_a_rollout_and_rolls_out_the_next_release() -> Result<()>
{
    let mut stack = Scenario {
        name: "releases",
        stable: BackendOptions::default(),
        canary: BackendOptions::default(),
        rps: 100,
        analysis: ONE_STEP_ANALYSIS,
    }
    .start()?;
    let releases = |stack: &AppStack, rollout: &str| -> Result<()> {
        let manifest = stack
            .manifest
            .clone()
            .context("the controller's manifest")?;
        manifest
            .with_rollout(rollout)
            .write(&stack.path().join("canary.yaml"))
    };
    let view =
        stack
            .controller()?
            .wait_for_phase("releases", "Promoted", Duration::from_secs(30))?;
    ensure!(view.canary_weight == Some(100), "{view:?}");

    // The operator finalizes: all traffic back on the stable slot. fledge leaves it so.
    stack.envoy.apply_route_weights(RouteWeights::ALL_STABLE)?;
    let (_, canary_served) = stack.served_during(Duration::from_secs(3))?;
    let (weights, _) = stack.envoy.live_route_weights()?;
    ensure!(
        weights == RouteWeights::ALL_STABLE && canary_served == 0,
        "after a finished rollout the route is the operator's: live {weights}, canary served {canary_served}"
    );

    // A spec file that does not load changes nothing.
    std::fs::write(
        stack.path().join("canary.yaml"),
        "kind: Canary
spec: [
",
    )?;
    std::thread::sleep(Duration::from_secs(2));
    let view = stack.controller()?.canary("releases")?;
    ensure!(
        view.phase == "Promoted",
        "a bad edit changed the canary: {view:?}"
    );

    // The next release: the same spec, a new fledge.dev/rollout.
    releases(&stack, "v3")?;
    wait_until("the v3 rollout to start", Duration::from_secs(10), || {
        let view = stack.controller()?.canary("releases")?;
        Ok((!view.is_terminal()).then_some(()))
    })?;
    let view =
        stack
            .controller()?
            .wait_for_phase("releases", "Promoted", Duration::from_secs(30))?;
    let phases = history_phases(&view);
    ensure!(
        phases.iter().filter(|p| *p == "Promoted").count() == 2,
        "one history with both rollouts expected: {phases:?}"
    );
    let history = view.raw["history"].to_string();
    ensure!(history.contains("new rollout of v3"), "{history}");
    let log = stack.controller()?.log_text();
    ensure!(
        log.contains("do not load") && log.contains("releases changed: starting a new rollout"),
        "controller output:\n{}",
        stack.controller()?.log_tail(40)
    );
    Ok(())
}

#[test]
fn canary_answering_20_percent_5xx_is_rolled_back_and_gets_no_traffic() -> Result<()> {
    let mut stack = Scenario {
        name: "errors",
        stable: BackendOptions::default(),
        canary: BackendOptions {
            error_rate: 0.2,
            seed: 7,
            ..BackendOptions::default()
        },
        rps: 100,
        analysis: FAST_ANALYSIS,
    }
    .start()?;
    let view =
        stack
            .controller()?
            .wait_for_phase("errors", "RolledBack", Duration::from_secs(60))?;
    ensure!(view.canary_weight == Some(0), "{view:?}");
    ensure!(
        view.message.contains("failed checks threshold reached 2/2")
            && view.message.contains("request-success-rate")
            || view.message.contains("success rate"),
        "rollback reason: {}",
        view.message
    );
    ensure!(
        !history_phases(&view).contains(&"Promoted".to_string()),
        "{view:?}"
    );
    // The canary really received traffic before (it is judged on real requests) ...
    ensure!(
        stack.canary.served()? > 20,
        "canary served {}",
        stack.canary.served()?
    );
    // ... and none after the rollback.
    let (stable, canary) = stack.served_during(Duration::from_secs(3))?;
    ensure!(
        canary == 0 && stable > 100,
        "after rollback canary served {canary}, stable {stable}"
    );
    Ok(())
}

#[test]
fn canary_with_p99_over_the_limit_is_rolled_back() -> Result<()> {
    let mut stack = Scenario {
        name: "slow",
        stable: BackendOptions::default(),
        // 5% of requests take 800 ms: p99 ≈ 800 ms > 500 ms, success rate stays 100%.
        canary: BackendOptions {
            slow_fraction: 0.05,
            slow_ms: 800,
            seed: 11,
            ..BackendOptions::default()
        },
        rps: 100,
        analysis: FAST_ANALYSIS,
    }
    .start()?;
    let view = stack
        .controller()?
        .wait_for_phase("slow", "RolledBack", Duration::from_secs(60))?;
    ensure!(view.canary_weight == Some(0), "{view:?}");
    ensure!(
        view.message.contains("p99 latency"),
        "rollback reason: {}",
        view.message
    );
    let checks = view.raw["lastAnalysis"]["checks"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let duration = checks
        .iter()
        .find(|c| c["name"] == "request-duration")
        .context("no request-duration check in lastAnalysis")?;
    ensure!(duration["verdict"] == "Fail", "{duration}");
    ensure!(
        duration["value"].as_f64().unwrap_or(0.0) > 500.0,
        "{duration}"
    );
    let (_, canary) = stack.served_during(Duration::from_secs(2))?;
    ensure!(canary == 0, "after rollback canary served {canary}");
    Ok(())
}

#[test]
fn canary_without_traffic_halts_and_is_never_promoted() -> Result<()> {
    // 2 rps in total: at 20% the canary sees ~1 request per 2 s interval, below 10.
    let mut stack = Scenario {
        name: "idle",
        stable: BackendOptions::default(),
        canary: BackendOptions::default(),
        rps: 2,
        analysis: FAST_ANALYSIS,
    }
    .start()?;
    let view = stack
        .controller()?
        .wait_for_phase("idle", "Halted", Duration::from_secs(30))?;
    ensure!(
        view.message.contains("canary receives no traffic"),
        "halt reason: {}",
        view.message
    );
    // It stays halted at its first step for several more intervals, and never promotes.
    std::thread::sleep(Duration::from_secs(8));
    let view = stack.controller()?.canary("idle")?;
    ensure!(view.phase == "Halted", "{view:?}");
    ensure!(view.canary_weight == Some(20), "{view:?}");
    ensure!(
        !history_phases(&view).contains(&"Promoted".to_string()),
        "{view:?}"
    );
    ensure!(
        view.raw["failedChecks"] == 0,
        "no data must not count as a failure: {view:?}"
    );
    Ok(())
}

#[test]
fn canary_with_twice_the_stable_error_rate_is_rolled_back_by_the_sequential_test() -> Result<()> {
    let mut stack = Scenario {
        name: "twice",
        stable: BackendOptions {
            error_rate: 0.05,
            seed: 3,
            ..BackendOptions::default()
        },
        canary: BackendOptions {
            error_rate: 0.10,
            seed: 5,
            ..BackendOptions::default()
        },
        rps: 150,
        analysis: SEQUENTIAL_ANALYSIS,
    }
    .start()?;
    let view =
        stack
            .controller()?
            .wait_for_phase("twice", "RolledBack", Duration::from_secs(90))?;
    eprintln!("rollback reason: {}", view.message);
    ensure!(view.canary_weight == Some(0), "{view:?}");
    ensure!(
        view.message.contains("error rate")
            && view.message.contains("× stable (tolerance 1×): evidence")
            && view.message.contains("needed to roll back"),
        "the sequential test must be the reason: {}",
        view.message
    );
    let errors = view.raw["lastAnalysis"]["checks"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["name"] == "errors-vs-stable")
        .cloned()
        .context("no errors-vs-stable check")?;
    ensure!(errors["verdict"] == "Fail", "{errors}");
    ensure!(
        errors["value"].as_f64().is_some_and(|r| r > 1.3),
        "estimated ratio: {errors}"
    );
    let (stable, canary) = stack.served_during(Duration::from_secs(3))?;
    ensure!(
        canary == 0 && stable > 100,
        "after rollback canary served {canary}, stable {stable}"
    );
    Ok(())
}

#[test]
fn canary_as_good_as_a_flaky_stable_is_promoted_by_the_sequential_test() -> Result<()> {
    // Both versions answer 5% errors: a fixed "success rate ≥ 99%" rule would roll this back;
    // comparing with stable finds nothing against the canary.
    let mut stack = Scenario {
        name: "flaky",
        stable: BackendOptions {
            error_rate: 0.05,
            seed: 3,
            ..BackendOptions::default()
        },
        canary: BackendOptions {
            error_rate: 0.05,
            seed: 5,
            ..BackendOptions::default()
        },
        rps: 150,
        analysis: SEQUENTIAL_ANALYSIS,
    }
    .start()?;
    let view = stack
        .controller()?
        .wait_for_phase("flaky", "Promoted", Duration::from_secs(90))?;
    ensure!(view.canary_weight == Some(100), "{view:?}");
    let (stable, canary) = stack.served_during(Duration::from_secs(3))?;
    ensure!(
        canary > 100 && stable * 100 <= canary,
        "after promotion canary served {canary}, stable {stable}"
    );
    Ok(())
}

#[test]
fn malformed_filter_config_never_drops_traffic() -> Result<()> {
    init_tracing();
    let dir = ScratchDir::temp("badconfig")?;
    let stable = Backend::start("v1", BackendOptions::default())?;
    let canary = Backend::start("v2", BackendOptions::default())?;
    let envoy = Envoy::start(
        EnvoyOptions::new(stable.port(), canary.port())
            .with_filter(WasmFilter::built(r#"{"clusters": 5, "bogus": true}"#)?)
            .in_dir(&dir.path().join("envoy")),
    )?;
    let mut options = LoadOptions::new(100, Duration::from_secs(20));
    options.max_requests = 300;
    let report = LoadGen::start(&envoy.listener_url(), options)?.wait();
    ensure!(
        report.responses() == 300 && report.status_count(200) == 300,
        "every request must be served: {}",
        report.summary()
    );
    ensure!(
        stable.served()? == 300,
        "stable served {}",
        stable.served()?
    );
    let log = envoy.log_text();
    ensure!(
        log.contains("clusters") && log.to_lowercase().contains("error"),
        "the bad configuration must be logged:\n{}",
        envoy.log_tail(30)
    );
    let stats = envoy.stats_prometheus()?;
    let errors_line = stats
        .lines()
        .find(|l| l.starts_with("fledge_config_errors_total"))
        .context("fledge_config_errors_total missing")?;
    let errors: f64 = errors_line
        .rsplit(' ')
        .next()
        .unwrap_or("0")
        .parse()
        .unwrap_or(0.0);
    ensure!(errors >= 1.0, "{errors_line}");
    Ok(())
}
