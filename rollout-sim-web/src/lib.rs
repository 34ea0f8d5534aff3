//! # fledge-rollout-sim-web — `fledge-rollout-sim` in the browser: "what would Fledge decide?"
//!
//! Runs a pasted Canary spec through `fledge_core::rollout::step` — the exact function the
//! controller calls every interval — over seeded, generated traffic from `fledge_rollout_sim::World`
//! (Poisson request counts, binomial canary share and errors, log-normal latency in Envoy's
//! default buckets, volume and error rate swinging ±50% over a compressed day of 720
//! intervals). Compiled to WebAssembly with `wasm-bindgen` (`make simulator`), it is served by
//! the controller at `/simulator`; natively the same [`run`] backs the tests.
//!
//! ```text
//! spec YAML + Scenario ──▶ World::interval(i, weight) ──▶ Observation ──▶ rollout::step ──▶ …
//!                                                                         (until Promoted,
//!                                                                          RolledBack or horizon)
//! ```

#![forbid(unsafe_code)]

use chrono::{DateTime, TimeZone, Utc};
use fledge_core::observe::{Observation, SubsetTraffic};
use fledge_core::rollout::{self, CanaryStatus, Command, Input, Phase};
use fledge_core::spec::{Canary, SpecError};
use fledge_rollout_sim::{TrafficModel, World};
use serde::{Deserialize, Serialize};
use wasm_bindgen::prelude::wasm_bindgen;

/// Most intervals one simulation runs.
pub const MAX_INTERVALS: usize = 20_000;

/// The simulated world: traffic, error rates and latency of stable and canary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Scenario {
    /// Requests per minute to the service (stable + canary), before the daily swing.
    pub requests_per_minute: f64,
    /// Stable's error rate in percent (5xx / no response).
    pub stable_error_percent: f64,
    /// Canary error rate ÷ stable error rate (2 = twice as many errors).
    pub canary_error_ratio: f64,
    /// Canary latency ÷ stable latency (1.2 = 20% slower).
    pub canary_latency_factor: f64,
    /// Stable's median latency in ms, and the log-normal σ.
    pub median_ms: f64,
    pub latency_sigma: f64,
    /// The canary behaves like stable for this many minutes, then as configured above.
    pub degrade_after_minutes: f64,
    /// Seed of the random traffic: the same seed gives the same decisions.
    pub seed: u64,
    /// Stop here if nothing was decided.
    pub max_minutes: f64,
    /// A simulated operator sends `promote` at every `pause: {}` step.
    pub promote_at_pauses: bool,
}

impl Default for Scenario {
    fn default() -> Self {
        Scenario {
            requests_per_minute: 600.0,
            stable_error_percent: 1.0,
            canary_error_ratio: 1.0,
            canary_latency_factor: 1.0,
            median_ms: 100.0,
            latency_sigma: 0.6,
            degrade_after_minutes: 0.0,
            seed: 1,
            max_minutes: 720.0,
            promote_at_pauses: true,
        }
    }
}

/// One simulated interval.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SimPoint {
    pub minutes: f64,
    /// The canary weight the interval was served at.
    pub weight: u8,
    /// The phase after the decision.
    pub phase: Phase,
    pub canary_requests: u64,
    pub stable_requests: u64,
    pub canary_error_percent: Option<f64>,
    pub stable_error_percent: Option<f64>,
    pub canary_p99_ms: Option<f64>,
    pub stable_p99_ms: Option<f64>,
    /// The analysis verdict, when the interval was judged.
    pub verdict: Option<fledge_core::analysis::Verdict>,
}

/// One decision (a transition of the state machine).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SimDecision {
    pub minutes: f64,
    pub phase: Phase,
    pub weight: u8,
    /// 1-based step.
    pub step: usize,
    pub reason: String,
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SimulationReport {
    pub canary: String,
    /// The final phase: `Promoted`, `RolledBack`, or where it stood at the horizon.
    pub outcome: Phase,
    /// Promoted or RolledBack before the horizon.
    pub decided: bool,
    pub intervals: usize,
    pub minutes: f64,
    pub canary_requests: u64,
    pub canary_errors: u64,
    pub stable_requests: u64,
    pub stable_errors: u64,
    pub failed_checks: u32,
    pub steps: usize,
    /// The final status message (the rollback reason, the promotion, or why it is stuck).
    pub reason: String,
    pub timeline: Vec<SimPoint>,
    pub decisions: Vec<SimDecision>,
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SimError {
    #[error("the spec is not a Canary: {0}")]
    Parse(String),
    #[error("the spec is invalid")]
    Invalid(Vec<SpecError>),
    #[error("the scenario is invalid: {0}")]
    Scenario(String),
}

impl SimError {
    fn to_json(&self) -> serde_json::Value {
        let problems: Vec<serde_json::Value> = match self {
            SimError::Invalid(errors) => errors
                .iter()
                .map(|e| serde_json::json!({"field": e.field, "problem": e.problem, "fix": e.fix}))
                .collect(),
            _ => Vec::new(),
        };
        serde_json::json!({ "error": self.to_string(), "problems": problems })
    }
}

fn check_scenario(s: &Scenario) -> Result<(), SimError> {
    let finite = [
        s.requests_per_minute,
        s.stable_error_percent,
        s.canary_error_ratio,
        s.canary_latency_factor,
        s.median_ms,
        s.latency_sigma,
        s.degrade_after_minutes,
        s.max_minutes,
    ];
    if finite.iter().any(|v| !v.is_finite() || *v < 0.0) {
        return Err(SimError::Scenario(
            "every number must be finite and not negative".into(),
        ));
    }
    if !(0.0..=100.0).contains(&s.stable_error_percent) {
        return Err(SimError::Scenario(
            "stableErrorPercent must be between 0 and 100".into(),
        ));
    }
    if s.median_ms <= 0.0 || s.latency_sigma <= 0.0 || s.canary_latency_factor <= 0.0 {
        return Err(SimError::Scenario(
            "medianMs, latencySigma and canaryLatencyFactor must be above 0".into(),
        ));
    }
    if s.requests_per_minute > 10_000_000.0 {
        return Err(SimError::Scenario(
            "requestsPerMinute above 10,000,000 is not simulated".into(),
        ));
    }
    Ok(())
}

/// Parse and validate a Canary spec (YAML or JSON).
pub fn parse_spec(spec_yaml: &str) -> Result<Canary, SimError> {
    let canary: Canary =
        serde_yaml::from_str(spec_yaml).map_err(|e| SimError::Parse(e.to_string()))?;
    canary
        .validate()
        .map_err(|errors| SimError::Invalid(errors.0))?;
    Ok(canary)
}

fn error_percent(traffic: &SubsetTraffic) -> Option<f64> {
    traffic.success_rate_percent().map(|s| 100.0 - s)
}

/// Simulate `spec_yaml` in `scenario`. Deterministic: the same arguments give the same report
/// on every platform the float operations agree on (natively and in WebAssembly).
pub fn run(spec_yaml: &str, scenario: &Scenario) -> Result<SimulationReport, SimError> {
    let canary = parse_spec(spec_yaml)?;
    check_scenario(scenario)?;
    let spec = &canary.spec;
    let interval_seconds = spec.analysis.interval.0.as_secs_f64().max(1.0);
    // World draws 30-second intervals; scale the rate so one draw is one spec interval.
    let per_interval = scenario.requests_per_minute * interval_seconds / 30.0;
    let degraded = TrafficModel {
        requests_per_minute: per_interval,
        base_error_rate: scenario.stable_error_percent / 100.0,
        error_ratio: scenario.canary_error_ratio,
        latency_factor: scenario.canary_latency_factor,
        median_ms: scenario.median_ms,
        sigma: scenario.latency_sigma,
    };
    let healthy = TrafficModel {
        error_ratio: 1.0,
        latency_factor: 1.0,
        ..degraded
    };
    let mut healthy_world = World::new(healthy, scenario.seed);
    let mut degraded_world = World::new(degraded, scenario.seed);
    let mut warnings = Vec::new();
    if !spec.webhooks.is_empty() {
        warnings.push("webhooks are not called in the simulator: every gate is open".to_string());
    }
    if spec.analysis.metrics.iter().any(|m| m.query.is_some()) {
        warnings.push(
            "custom PromQL metrics have no data in the simulator: the rollout halts on them"
                .to_string(),
        );
    }

    let start: DateTime<Utc> = Utc
        .timestamp_opt(1_700_000_000, 0)
        .single()
        .unwrap_or_default();
    let at = |i: usize| {
        start + chrono::Duration::milliseconds((i as f64 * interval_seconds * 1000.0) as i64)
    };
    let minutes = |i: usize| i as f64 * interval_seconds / 60.0;
    let horizon =
        ((scenario.max_minutes * 60.0 / interval_seconds).ceil() as usize).clamp(1, MAX_INTERVALS);
    if (scenario.max_minutes * 60.0 / interval_seconds).ceil() as usize > MAX_INTERVALS {
        warnings.push(format!(
            "stopped after {MAX_INTERVALS} intervals ({:.0} minutes)",
            minutes(MAX_INTERVALS)
        ));
    }

    // The first call only initializes, like the controller's baseline tick.
    let mut status: CanaryStatus =
        rollout::step(spec, &CanaryStatus::default(), &Input::default(), at(0)).status;
    let mut timeline = Vec::new();
    let (mut canary_requests, mut canary_errors, mut stable_requests, mut stable_errors) =
        (0u64, 0u64, 0u64, 0u64);
    let mut intervals = 0;
    for i in 1..=horizon {
        if status.phase.is_terminal() {
            break;
        }
        let weight = status.canary_weight;
        // Both worlds advance every interval, so the traffic before the onset is the same
        // whatever the onset.
        let before = healthy_world.interval(i as i64, weight);
        let after = degraded_world.interval(i as i64, weight);
        let observation: Observation = if minutes(i) > scenario.degrade_after_minutes {
            after
        } else {
            before
        };
        canary_requests += observation.canary.requests();
        canary_errors += observation.canary.failures();
        stable_requests += observation.stable.requests();
        stable_errors += observation.stable.failures();
        let command = (scenario.promote_at_pauses
            && status.phase == Phase::Paused
            && !status.paused_by_operator)
            .then_some(Command::Promote);
        let point = SimPoint {
            minutes: minutes(i),
            weight,
            phase: status.phase,
            canary_requests: observation.canary.requests(),
            stable_requests: observation.stable.requests(),
            canary_error_percent: error_percent(&observation.canary),
            stable_error_percent: error_percent(&observation.stable),
            canary_p99_ms: observation.canary.latency.quantile(0.99),
            stable_p99_ms: observation.stable.latency.quantile(0.99),
            verdict: None,
        };
        let input = Input {
            observation: Some(Ok(observation)),
            command,
        };
        status = rollout::step(spec, &status, &input, at(i)).status;
        intervals = i;
        let verdict = status
            .last_analysis
            .as_ref()
            .filter(|r| r.at == at(i))
            .map(|r| r.report.verdict);
        timeline.push(SimPoint {
            phase: status.phase,
            verdict,
            ..point
        });
    }
    // What the spec and the analysis did not check, as `fledge validate` and the status say it.
    for warning in fledge_core::warning::spec_warnings(&canary)
        .iter()
        .chain(&status.warnings)
    {
        let text = format!("{warning}");
        if !warnings.contains(&text) {
            warnings.push(text);
        }
    }
    let steps = spec.analysis.plan().len();
    let decisions = status
        .history
        .iter()
        .map(|t| SimDecision {
            minutes: (t.at - start).num_milliseconds() as f64 / 60_000.0,
            phase: t.phase,
            weight: t.canary_weight,
            step: (t.step + 1).min(steps.max(1)),
            reason: t.reason.clone(),
        })
        .collect();
    Ok(SimulationReport {
        canary: canary.name().to_string(),
        outcome: status.phase,
        decided: status.phase.is_terminal(),
        intervals,
        minutes: minutes(intervals),
        canary_requests,
        canary_errors,
        stable_requests,
        stable_errors,
        failed_checks: status.failed_checks,
        steps,
        reason: status.message,
        timeline,
        decisions,
        warnings,
    })
}

/// The browser entry point: `simulate(specYaml, scenarioJson)` → the report as JSON, or
/// `{"error": ..., "problems": [{field, problem, fix}]}`.
#[wasm_bindgen]
pub fn simulate(spec_yaml: &str, scenario_json: &str) -> String {
    let scenario = if scenario_json.trim().is_empty() {
        Ok(Scenario::default())
    } else {
        serde_json::from_str::<Scenario>(scenario_json)
            .map_err(|e| SimError::Scenario(e.to_string()))
    };
    let result = scenario.and_then(|scenario| run(spec_yaml, &scenario));
    let value = match result {
        Ok(report) => serde_json::to_value(&report)
            .unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() })),
        Err(error) => error.to_json(),
    };
    value.to_string()
}

/// The version of fledge-core this simulator was built from.
#[wasm_bindgen]
pub fn version() -> String {
    env!("CARGO_PKG_VERSION").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    pub const SPEC: &str = "apiVersion: fledge.dev/v1alpha1
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
    steps: [{setWeight: 10}, {pause: {duration: 5m}}, {setWeight: 30}, {pause: {}}, {setWeight: 60}]
    compareWithStable: {}
";

    #[test]
    fn a_healthy_canary_is_promoted_and_the_pause_is_passed_by_the_simulated_operator() {
        let report = run(SPEC, &Scenario::default()).unwrap();
        assert_eq!(report.outcome, Phase::Promoted, "{}", report.reason);
        assert!(report.decided);
        assert!(
            report.minutes >= 5.0,
            "held the 5m pause: {}",
            report.minutes
        );
        assert_eq!(report.timeline.len(), report.intervals);
        assert!(report.decisions.iter().any(|d| d.phase == Phase::Paused));
        assert_eq!(report.decisions.last().unwrap().weight, 100);
    }

    #[test]
    fn five_times_the_errors_are_rolled_back_and_it_is_deterministic() {
        let scenario = Scenario {
            canary_error_ratio: 5.0,
            ..Scenario::default()
        };
        let report = run(SPEC, &scenario).unwrap();
        assert_eq!(report.outcome, Phase::RolledBack, "{}", report.reason);
        assert!(report.reason.contains("error rate"), "{}", report.reason);
        assert_eq!(report, run(SPEC, &scenario).unwrap());
        let json = simulate(SPEC, &serde_json::to_string(&scenario).unwrap());
        let value: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(value["outcome"], "RolledBack");
        assert_eq!(value["intervals"], report.intervals);
    }

    #[test]
    fn a_late_regression_is_caught_after_its_onset() {
        let scenario = Scenario {
            canary_error_ratio: 5.0,
            degrade_after_minutes: 4.0,
            ..Scenario::default()
        };
        let report = run(SPEC, &scenario).unwrap();
        assert_eq!(report.outcome, Phase::RolledBack);
        assert!(report.minutes > 4.0);
    }

    #[test]
    fn without_promote_at_pauses_it_waits_at_the_pause() {
        let scenario = Scenario {
            promote_at_pauses: false,
            max_minutes: 60.0,
            ..Scenario::default()
        };
        let report = run(SPEC, &scenario).unwrap();
        assert_eq!(report.outcome, Phase::Paused);
        assert!(!report.decided);
        assert_eq!(report.intervals, 120);
    }

    #[test]
    fn spec_and_scenario_errors_name_the_problem() {
        let broken = SPEC.replace("threshold: 5", "threshold: 0");
        let value: serde_json::Value = serde_json::from_str(&simulate(&broken, "")).unwrap();
        assert_eq!(value["problems"][0]["field"], "spec.analysis.threshold");
        let value: serde_json::Value =
            serde_json::from_str(&simulate(SPEC, "{\"requestsPerMinute\": -1}")).unwrap();
        assert!(
            value["error"].as_str().unwrap().contains("scenario"),
            "{value}"
        );
        let value: serde_json::Value = serde_json::from_str(&simulate("kind: [", "")).unwrap();
        assert!(
            value["error"].as_str().unwrap().contains("not a Canary"),
            "{value}"
        );
    }
}
