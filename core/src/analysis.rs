//! Judging one analysis interval.
//!
//! Three kinds of checks, all optional and combinable:
//!
//! - **thresholds** (`metrics`, Flagger style): this interval's canary value against a fixed
//!   range. If the stable version is outside the same range too, the canary is not blamed.
//! - **canary vs stable** (`compareWithStable`): anytime-valid sequential tests on everything
//!   seen so far (see [`crate::sequential`]); a rejection rolls back at once, because the test
//!   already controls its false-rollback rate however often it looks.
//! - **error-budget burn rate** (`sloBurnRate`): multi-window, SRE-workbook style.
//!
//! The tests' running state lives in [`AnalysisState`], saved in the canary status. Every
//! check carries its numbers and a one-line human reason.

use crate::contract::ResponseClass;
use crate::observe::{LatencyHistogram, Observation};
use crate::sequential::{log_sum_exp, RatioTest};
use crate::spec::{
    format_number, AnalysisSpec, BurnRateSpec, CompareSpec, ComparedSignal, MetricKind,
    ThresholdRange,
};
use crate::warning::{code, Warning};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    /// Every check passed.
    Pass,
    /// At least one check failed: counts towards the rollback threshold (or rolls back at
    /// once for a decisive check).
    Fail,
    /// Not enough data to judge, or canary and stable degrade together: the rollout halts;
    /// never a reason to promote.
    NoData,
}

/// The outcome of one check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MetricCheck {
    pub name: String,
    /// The canary's value (percent for success rate, milliseconds for duration, the canary's
    /// rate ÷ the stable's for comparisons, a burn rate for the SLO gate), in `unit`.
    pub value: Option<f64>,
    /// The stable version's value over the same data, for comparison.
    pub stable_value: Option<f64>,
    /// The passing range of `value`. Comparisons have none: their verdict rests on the evidence
    /// in `comparison`, not on the ratio.
    pub threshold: ThresholdRange,
    /// The unit written after `value` and the bounds: `%`, ` ms`, `×`, or empty.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub unit: String,
    pub verdict: Verdict,
    /// A failure of a decisive check rolls back at once instead of counting one failed check.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub decisive: bool,
    pub reason: String,
    /// For canary-vs-stable tests: what the verdict rests on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comparison: Option<Comparison>,
}

/// The basis of a canary-vs-stable verdict: the ratio of rates is what the test estimates, the
/// evidence (an e-value) is what it decides on. The canary is rolled back when the evidence
/// that it is worse than `tolerance` reaches `evidenceNeeded` (1 / falseRollbackRate).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Comparison {
    /// The canary's rate of the event ÷ the stable's (the most likely ratio so far); `None`
    /// before any event.
    pub ratio: Option<f64>,
    /// The ratio still accepted (`compareWithStable.tolerance`).
    pub tolerance: f64,
    /// Evidence that the canary is worse than the tolerance, all comparisons of the rollout
    /// combined (errors and each latency boundary): 1 = none either way.
    pub evidence: f64,
    /// The evidence that rolls back: 1 / falseRollbackRate.
    pub evidence_needed: f64,
    /// This test's anytime-valid p-value for "no worse than the tolerance".
    pub p_value: f64,
    pub canary_events: u64,
    pub canary_requests: u64,
    pub stable_events: u64,
    pub stable_requests: u64,
}

impl MetricCheck {
    /// One line that states the verdict and what it rests on, e.g.
    /// `request-success-rate 96.72% (>= 99%), stable 100%: Fail` or
    /// `errors-vs-stable: canary ≈1.41× stable (tolerance 1×), evidence 1.9 of 33.3 needed to roll back, p=0.53: Pass`.
    pub fn summary(&self) -> String {
        let verdict = format!("{:?}", self.verdict);
        if let Some(c) = &self.comparison {
            return format!("{}: {}: {verdict}", self.name, c.basis());
        }
        let number = |v: Option<f64>| {
            v.map_or("n/a".to_string(), |v| {
                format!("{}{}", format_number(round3(v)), self.unit)
            })
        };
        let stable = match self.stable_value {
            Some(_) => format!(", stable {}", number(self.stable_value)),
            None => String::new(),
        };
        format!(
            "{} {} ({}){stable}: {verdict}",
            self.name,
            number(self.value),
            self.threshold.with_unit(&self.unit)
        )
    }
}

impl Comparison {
    /// `canary ≈1.41× stable (tolerance 1×), evidence 1.9 of 33.3 needed to roll back, p=0.53`.
    pub fn basis(&self) -> String {
        let ratio = match self.ratio {
            Some(r) => format!("canary ≈{}× stable", format_number(round2(r))),
            None => "no events on either version yet".to_string(),
        };
        let reached = if self.evidence >= self.evidence_needed {
            "reached"
        } else {
            "of"
        };
        format!(
            "{ratio} (tolerance {}×), evidence {} {reached} {} needed to roll back, {}",
            format_number(self.tolerance),
            format_evidence(self.evidence),
            format_evidence(self.evidence_needed),
            format_p(self.p_value)
        )
    }
}

/// An e-value for people: three significant digits (`1.94`, `33.3`), whole numbers up to a
/// million (`1234`), then `8.2e7`.
fn format_evidence(e: f64) -> String {
    if !e.is_finite() {
        return e.to_string();
    }
    if e >= 1e6 {
        return format!("{e:.1e}");
    }
    let digits = if e >= 100.0 {
        0
    } else if e >= 10.0 {
        1
    } else {
        2
    };
    let scale = 10f64.powi(digits);
    format_number((e * scale).round() / scale)
}

/// The judgement of one interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AnalysisReport {
    pub verdict: Verdict,
    pub canary_requests: u64,
    pub stable_requests: u64,
    pub checks: Vec<MetricCheck>,
    pub reason: String,
    /// Set when the interval passed but promotion evidence is still missing: the step holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold: Option<String>,
    /// Checks (or parts of them) that could not run in this interval, with the field and the
    /// fix, e.g. latency not compared for lack of stable traffic.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<Warning>,
}

impl AnalysisReport {
    /// The failed decisive check, if any: reason to roll back now.
    pub fn decisive_failure(&self) -> Option<&MetricCheck> {
        self.checks
            .iter()
            .find(|c| c.decisive && c.verdict == Verdict::Fail)
    }
}

/// One latency comparison at a histogram bucket boundary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LatencyTest {
    pub boundary_ms: f64,
    pub test: RatioTest,
}

/// Counts of one interval, kept for the burn-rate windows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IntervalCounts {
    pub at: DateTime<Utc>,
    pub canary_requests: u64,
    pub canary_errors: u64,
    pub stable_requests: u64,
    pub stable_errors: u64,
}

/// Everything the analysis accumulates across intervals (saved in the status).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AnalysisState {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errors: Option<RatioTest>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub latency: Vec<LatencyTest>,
    /// Whether latency boundaries have been fixed (they are chosen once).
    #[serde(default)]
    pub latency_boundaries_chosen: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recent: Vec<IntervalCounts>,
}

/// Most latency boundaries compared (the false-rollback budget is split across them).
const MAX_LATENCY_BOUNDARIES: usize = 4;
/// Stable requests needed in an interval to choose latency boundaries automatically.
const MIN_STABLE_FOR_BOUNDARIES: u64 = 50;

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// `p=0.012`, or `p<0.001` for tiny values (a rounded `p=0` would overstate the certainty).
fn format_p(p: f64) -> String {
    if p < 0.001 {
        "p<0.001".to_string()
    } else {
        format!("p={}", round3(p))
    }
}

fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        100.0 * part as f64 / whole as f64
    }
}

/// Judge one interval's observation against `spec`, updating the accumulated `state`.
pub fn evaluate(
    spec: &AnalysisSpec,
    state: &mut AnalysisState,
    obs: &Observation,
    now: DateTime<Utc>,
) -> AnalysisReport {
    let canary_requests = obs.canary.requests();
    let stable_requests = obs.stable.requests();
    let mut warnings = Vec::new();

    // Accumulating checks see every interval, including quiet ones: evidence adds up.
    let mut checks = Vec::new();
    if let Some(compare) = &spec.compare_with_stable {
        checks.extend(compare_with_stable(compare, spec, state, obs));
        warnings.extend(comparison_warnings(compare, state, obs));
    }
    if let Some(burn) = &spec.slo_burn_rate {
        checks.extend(burn_rate(burn, &spec.error_statuses, state, obs, now));
    }
    let report = |verdict, checks, reason, hold, warnings| AnalysisReport {
        verdict,
        canary_requests,
        stable_requests,
        checks,
        reason,
        hold,
        warnings,
    };
    let decisive = checks
        .iter()
        .find(|c: &&MetricCheck| c.decisive && c.verdict == Verdict::Fail)
        .map(|c| c.reason.clone());
    if let Some(reason) = decisive {
        return report(Verdict::Fail, checks, reason, None, warnings);
    }
    if canary_requests < spec.min_canary_requests {
        let reason = too_few_requests(spec, obs);
        return report(Verdict::NoData, checks, reason, None, warnings);
    }
    checks.extend(threshold_checks(spec, obs));

    let failed: Vec<&str> = checks
        .iter()
        .filter(|c| c.verdict == Verdict::Fail)
        .map(|c| c.reason.as_str())
        .collect();
    let missing: Vec<&str> = checks
        .iter()
        .filter(|c| c.verdict == Verdict::NoData)
        .map(|c| c.reason.as_str())
        .collect();
    let (verdict, reason) = if !failed.is_empty() {
        (Verdict::Fail, failed.join("; "))
    } else if !missing.is_empty() {
        (Verdict::NoData, missing.join("; "))
    } else if checks.is_empty() && !spec.has_checks() {
        (
            Verdict::Pass,
            format!("no checks (unchecked: true): {canary_requests} canary requests served"),
        )
    } else if checks.is_empty() {
        (
            Verdict::Pass,
            format!("no check could run in this interval (see the warnings); {canary_requests} canary requests served"),
        )
    } else {
        (
            Verdict::Pass,
            format!("all checks passed over {canary_requests} canary requests"),
        )
    };
    let hold = match (&spec.compare_with_stable, verdict) {
        (Some(compare), Verdict::Pass) => promotion_hold(compare, state),
        _ => None,
    };
    report(verdict, checks, reason, hold, warnings)
}

/// Why an interval with fewer than `minCanaryRequests` canary requests is not judged, naming
/// the cause: a counter reset (the interval is partial), no traffic at all, or none for the
/// canary.
fn too_few_requests(spec: &AnalysisSpec, obs: &Observation) -> String {
    let (canary, stable) = (obs.canary.requests(), obs.stable.requests());
    let min = spec.min_canary_requests;
    match &obs.counter_reset {
        Some(what) => format!(
            "counter reset: {what}, so this interval only counts requests since then ({canary} canary, {stable} stable; minCanaryRequests {min}); waiting for a full interval"
        ),
        None if canary == 0 && stable == 0 => format!(
            "no traffic: neither version served a request in the last interval (minCanaryRequests {min}); is the service receiving requests?"
        ),
        None => format!(
            "canary receives no traffic: {canary} canary requests in the last interval, below minCanaryRequests {min} (stable got {stable})"
        ),
    }
}

/// Flagger-style fixed ranges on this interval's values.
fn threshold_checks(spec: &AnalysisSpec, obs: &Observation) -> Vec<MetricCheck> {
    spec.metrics
        .iter()
        .filter_map(|metric| {
            let kind = metric.kind()?;
            let statuses = &spec.error_statuses;
            let (value, stable_value, what) = match kind {
                MetricKind::Custom => (
                    obs.custom
                        .get(&metric.name)
                        .copied()
                        .filter(|v| v.is_finite()),
                    None,
                    metric.name.clone(),
                ),
                MetricKind::SuccessRate => (
                    obs.canary.success_percent(statuses),
                    obs.stable.success_percent(statuses),
                    "success rate".to_string(),
                ),
                MetricKind::Duration { quantile } => (
                    obs.canary.latency.quantile(quantile),
                    obs.stable.latency.quantile(quantile),
                    format!("p{} latency", round2(quantile * 100.0)),
                ),
            };
            let unit = kind.unit();
            let range = metric.threshold_range;
            let bounds = range.with_unit(unit);
            let stable_text = stable_value
                .map(|s| format!(" (stable {}{unit})", round2(s)))
                .unwrap_or_default();
            let (verdict, reason) = match value {
                None => (Verdict::NoData, no_data_reason(&metric.name, kind, obs)),
                Some(v) if range.contains(v) => (
                    Verdict::Pass,
                    format!("canary {what} {}{unit} within {bounds}", round2(v)),
                ),
                // A shared dependency or overload hurts both versions: not the canary's fault.
                Some(v) if stable_value.is_some_and(|s| !range.contains(s)) => (
                    Verdict::NoData,
                    format!(
                        "canary and stable both degraded: canary {what} {}{unit}{stable_text} outside {bounds}; not blaming the canary",
                        round2(v)
                    ),
                ),
                Some(v) => (
                    Verdict::Fail,
                    format!("canary {what} {}{unit} outside {bounds}{stable_text}", round2(v)),
                ),
            };
            Some(MetricCheck {
                name: metric.name.clone(),
                value: value.map(round2),
                stable_value: stable_value.map(round2),
                threshold: range,
                unit: unit.to_string(),
                verdict,
                decisive: false,
                reason,
                comparison: None,
            })
        })
        .collect()
}

/// A metric with no value this interval: say which metric and why it has none.
fn no_data_reason(name: &str, kind: MetricKind, obs: &Observation) -> String {
    match kind {
        MetricKind::Custom => format!(
            "metric {name} has no data: its query returned no value for this interval (an empty result or NaN)"
        ),
        MetricKind::SuccessRate => {
            format!("metric {name} has no data: the canary served no request in this interval")
        }
        MetricKind::Duration { .. } => format!(
            "metric {name} has no data: the canary's {} requests came without a latency histogram in this interval",
            obs.canary.requests()
        ),
    }
}

/// Prior weight of each signal in the combined e-value: half each when both are compared.
fn signal_weights(compare: &CompareSpec) -> (f64, f64) {
    let errors = compare.signals.contains(&ComparedSignal::Errors);
    let latency = compare.signals.contains(&ComparedSignal::Latency);
    match (errors, latency) {
        (true, true) => (0.5, 0.5),
        (true, false) => (1.0, 0.0),
        (false, true) => (0.0, 1.0),
        (false, false) => (0.0, 0.0),
    }
}

/// The combined evidence of all comparisons and what rolls back: inputs to each check.
struct Evidence {
    /// ln of the combined e-value.
    log_combined: f64,
    /// ln(1/α).
    log_needed: f64,
}

impl Evidence {
    fn rejected(&self) -> bool {
        self.log_combined >= self.log_needed
    }
}

/// A comparison check. `fails` when the combined evidence crossed `1/α` and this test carried
/// most of it.
fn ratio_check(
    name: String,
    what: &str,
    test: &RatioTest,
    evidence: &Evidence,
    fails: bool,
) -> MetricCheck {
    let estimate = test.estimate();
    let comparison = Comparison {
        ratio: estimate.map(round2),
        tolerance: test.tolerance,
        evidence: evidence.log_combined.exp().min(1e15),
        evidence_needed: evidence.log_needed.exp(),
        p_value: if fails {
            (-evidence.log_combined).exp().min(1.0)
        } else {
            test.p_value()
        },
        canary_events: test.canary_events,
        canary_requests: test.canary_requests,
        stable_events: test.stable_events,
        stable_requests: test.stable_requests,
    };
    let numbers = format!(
        "canary {}% of {}, stable {}% of {}",
        round3(percent(test.canary_events, test.canary_requests)),
        test.canary_requests,
        round3(percent(test.stable_events, test.stable_requests)),
        test.stable_requests
    );
    let reason = match estimate {
        None => format!("no {what} events yet on either version ({numbers})"),
        Some(r) => format!(
            "canary {what} {}{}× stable (tolerance {}×): evidence {} {} {} needed to roll back, {}; {numbers}",
            if fails { "" } else { "≈" },
            format_number(round2(r)),
            format_number(test.tolerance),
            format_evidence(comparison.evidence),
            if fails { "reached" } else { "of" },
            format_evidence(comparison.evidence_needed),
            format_p(comparison.p_value),
        ),
    };
    MetricCheck {
        name,
        value: estimate.map(round2),
        stable_value: None,
        threshold: ThresholdRange::default(),
        unit: "×".to_string(),
        verdict: if fails { Verdict::Fail } else { Verdict::Pass },
        decisive: true,
        reason,
        comparison: Some(comparison),
    }
}

/// Pick latency boundaries once: the spec's, or the buckets nearest the stable's p50/p90/p99
/// (ignoring buckets nobody is slower than) plus the `request-duration` limit.
fn choose_latency_boundaries(
    spec: &AnalysisSpec,
    compare: &CompareSpec,
    obs: &Observation,
) -> Option<Vec<f64>> {
    if let Some(bounds) = &compare.latency_boundaries_ms {
        return Some(
            bounds
                .iter()
                .copied()
                .take(MAX_LATENCY_BOUNDARIES)
                .collect(),
        );
    }
    let stable = &obs.stable.latency;
    if stable.count < MIN_STABLE_FOR_BOUNDARIES || stable.bounds_ms.is_empty() {
        return None;
    }
    let mut chosen: Vec<f64> = Vec::new();
    // The bucket boundary whose stable CDF is nearest each quantile.
    for quantile in [0.5, 0.9, 0.99] {
        let nearest = stable
            .bounds_ms
            .iter()
            .zip(&stable.cumulative)
            .filter(|(_, cum)| **cum < stable.count)
            .min_by(|a, b| {
                let distance = |cum: u64| (cum as f64 / stable.count as f64 - quantile).abs();
                distance(*a.1).total_cmp(&distance(*b.1))
            })
            .map(|(b, _)| *b);
        if let Some(b) = nearest {
            if !chosen.contains(&b) {
                chosen.push(b);
            }
        }
    }
    // Every stable request faster than every quantile's bucket (a fast service, an idle
    // machine): compare at the stable's slowest bucket, so a canary slower than anything the
    // stable served still shows — never "boundaries chosen" with nothing to compare.
    if chosen.is_empty() {
        let stable_max = stable
            .bounds_ms
            .iter()
            .zip(&stable.cumulative)
            .find(|(_, cum)| **cum >= stable.count)
            .map(|(b, _)| *b);
        chosen.extend(stable_max);
    }
    let limit = spec.metrics.iter().find_map(|m| match m.kind() {
        Some(MetricKind::Duration { .. }) => m.threshold_range.max,
        _ => None,
    });
    if let Some(limit) = limit {
        if let Some(b) = stable.bounds_ms.iter().find(|b| **b >= limit) {
            if !chosen.contains(b) {
                chosen.push(*b);
            }
        }
    }
    chosen.sort_by(f64::total_cmp);
    chosen.truncate(MAX_LATENCY_BOUNDARIES);
    Some(chosen)
}

fn compare_with_stable(
    compare: &CompareSpec,
    spec: &AnalysisSpec,
    state: &mut AnalysisState,
    obs: &Observation,
) -> Vec<MetricCheck> {
    let (errors_weight, latency_weight) = signal_weights(compare);
    if compare.signals.contains(&ComparedSignal::Errors) {
        let statuses = &spec.error_statuses;
        state
            .errors
            .get_or_insert_with(|| RatioTest::new(compare.tolerance))
            .update(
                obs.canary.errors(statuses),
                obs.canary.requests(),
                obs.stable.errors(statuses),
                obs.stable.requests(),
            );
    }
    if compare.signals.contains(&ComparedSignal::Latency) {
        if !state.latency_boundaries_chosen {
            if let Some(bounds) = choose_latency_boundaries(spec, compare, obs) {
                state.latency = bounds
                    .into_iter()
                    .map(|boundary_ms| LatencyTest {
                        boundary_ms,
                        test: RatioTest::new(compare.tolerance),
                    })
                    .collect();
                state.latency_boundaries_chosen = true;
            }
        }
        let (canary, stable) = (&obs.canary.latency, &obs.stable.latency);
        for latency in &mut state.latency {
            let slow = |h: &crate::observe::LatencyHistogram| {
                h.slower_than(latency.boundary_ms).unwrap_or(0)
            };
            latency
                .test
                .update(slow(canary), canary.count, slow(stable), stable.count);
        }
    }

    // One e-process for the whole comparison: the prior-weighted average of every test's
    // e-value (errors, and each latency boundary). An average of test supermartingales is one
    // too, so Ville's inequality bounds false rollbacks by α — and it is never weaker than
    // splitting α (Bonferroni), since a sum is at least its largest term.
    let boundaries = state.latency.len().max(1) as f64;
    let mut parts: Vec<(Option<usize>, f64)> = Vec::new();
    if let Some(test) = &state.errors {
        parts.push((None, errors_weight.ln() + test.log_evidence()));
    }
    for (i, latency) in state.latency.iter().enumerate() {
        parts.push((
            Some(i),
            (latency_weight / boundaries).ln() + latency.test.log_evidence(),
        ));
    }
    let evidence = Evidence {
        log_combined: log_sum_exp(parts.iter().map(|(_, e)| *e)),
        log_needed: (1.0 / compare.false_rollback_rate).ln(),
    };
    let rejected = evidence.rejected();
    let leader = parts
        .iter()
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(who, _)| *who);

    let mut checks = Vec::new();
    if let Some(test) = &state.errors {
        let fails = rejected && leader == Some(None);
        checks.push(ratio_check(
            "errors-vs-stable".into(),
            "error rate",
            test,
            &evidence,
            fails,
        ));
    }
    // Show the latency boundary with the strongest evidence against the canary.
    let strongest = state
        .latency
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.test.log_evidence().total_cmp(&b.1.test.log_evidence()));
    if let Some((i, latency)) = strongest {
        let fails = rejected && leader == Some(Some(i));
        checks.push(ratio_check(
            "latency-vs-stable".into(),
            &format!(
                "share of requests slower than {} ms",
                format_number(latency.boundary_ms)
            ),
            &latency.test,
            &evidence,
            fails,
        ));
    }
    checks
}

/// What the comparison could not look at in this interval, with the field and the fix.
fn comparison_warnings(
    compare: &CompareSpec,
    state: &AnalysisState,
    obs: &Observation,
) -> Vec<Warning> {
    let field = "spec.analysis.compareWithStable";
    let (canary, stable) = (obs.canary.requests(), obs.stable.requests());
    let mut warnings = Vec::new();
    // (A canary without requests is a halt, whose reason says so already.)
    if stable == 0 && canary > 0 {
        warnings.push(Warning::new(
            code::NOT_COMPARED_ONE_VERSION,
            field,
            format!(
                "not compared this interval: the stable version served no request (the canary served {canary}); a comparison needs both versions in the same interval"
            ),
            "check that the stable version receives traffic at this weight",
        ));
    }
    if compare.signals.contains(&ComparedSignal::Latency) {
        warnings.extend(latency_warnings(state, obs));
    }
    warnings
}

/// Why the latency comparison learns nothing, if it does not.
fn latency_warnings(state: &AnalysisState, obs: &Observation) -> Vec<Warning> {
    let field = "spec.analysis.compareWithStable.latencyBoundariesMs";
    let without_histogram = [("canary", &obs.canary), ("stable", &obs.stable)]
        .into_iter()
        .filter(|(_, t)| t.requests() > 0 && t.latency.count == 0)
        .map(|(who, t)| format!("{who} ({} requests)", t.requests()))
        .collect::<Vec<_>>();
    if !without_histogram.is_empty() {
        return vec![Warning::new(
            code::NO_LATENCY_HISTOGRAM,
            field,
            format!(
                "latency not compared: requests came without a latency histogram: {}",
                without_histogram.join(", ")
            ),
            "use a metrics source that reports request durations (the filter's fledge_request_duration_ms, or Envoy's upstream_rq_time), or write `signals: [errors]`",
        )];
    }
    if !state.latency_boundaries_chosen {
        return vec![Warning::new(
            code::LATENCY_NOT_COMPARED,
            field,
            format!(
                "latency not compared: {} stable requests per interval, {MIN_STABLE_FOR_BOUNDARIES} needed",
                obs.stable.latency.count
            ),
            "set latencyBoundariesMs or a longer interval",
        )];
    }
    let mut missing: Vec<String> = Vec::new();
    for latency in &state.latency {
        let absent =
            |h: &LatencyHistogram| h.count > 0 && h.slower_than(latency.boundary_ms).is_none();
        if absent(&obs.canary.latency) || absent(&obs.stable.latency) {
            missing.push(format_number(latency.boundary_ms));
        }
    }
    if missing.is_empty() {
        return Vec::new();
    }
    let buckets: Vec<String> = [&obs.stable.latency, &obs.canary.latency]
        .into_iter()
        .find(|h| !h.bounds_ms.is_empty())
        .map(|h| h.bounds_ms.iter().map(|b| format_number(*b)).collect())
        .unwrap_or_default();
    vec![Warning::new(
        code::LATENCY_BOUNDARY_NOT_A_BUCKET,
        field,
        format!(
            "latency not compared at {} ms: not a bucket boundary of the latency histogram (its buckets: {} ms)",
            missing.join(", "),
            buckets.join(", ")
        ),
        "list bucket boundaries only, e.g. `latencyBoundariesMs: [250, 500]`",
    )]
}

/// Hold the step until the canary is shown not to be worse than the margin.
fn promotion_hold(compare: &CompareSpec, state: &AnalysisState) -> Option<String> {
    let margin = compare.promotion_margin?;
    let test = state.errors.as_ref()?;
    if test.canary_requests < compare.promotion_min_canary_requests {
        return Some(format!(
            "waiting for promotion evidence: {} of {} canary requests",
            test.canary_requests, compare.promotion_min_canary_requests
        ));
    }
    match test.upper_bound(compare.false_rollback_rate) {
        Some(upper) if upper < margin => None,
        Some(upper) => Some(format!(
            "waiting for promotion evidence: canary error rate could still be up to {}× stable (margin {margin}×)",
            round2(upper)
        )),
        None => Some(format!(
            "waiting for promotion evidence: not enough errors observed yet to bound the canary below {margin}× stable"
        )),
    }
}

/// Multi-window burn rate of the canary's error budget; the stable's burn is the control.
fn burn_rate(
    burn: &BurnRateSpec,
    error_statuses: &[ResponseClass],
    state: &mut AnalysisState,
    obs: &Observation,
    now: DateTime<Utc>,
) -> Vec<MetricCheck> {
    state.recent.push(IntervalCounts {
        at: now,
        canary_requests: obs.canary.requests(),
        canary_errors: obs.canary.errors(error_statuses),
        stable_requests: obs.stable.requests(),
        stable_errors: obs.stable.errors(error_statuses),
    });
    let long_start = now - burn.long_window.to_chrono();
    state.recent.retain(|c| c.at > long_start);
    let budget = 1.0 - burn.objective / 100.0;
    let window = |start: DateTime<Utc>| {
        let mut sums = (0u64, 0u64, 0u64, 0u64);
        for c in state.recent.iter().filter(|c| c.at > start) {
            sums.0 += c.canary_requests;
            sums.1 += c.canary_errors;
            sums.2 += c.stable_requests;
            sums.3 += c.stable_errors;
        }
        let rate = |errors: u64, requests: u64| {
            (requests > 0).then(|| errors as f64 / requests as f64 / budget)
        };
        (rate(sums.1, sums.0), rate(sums.3, sums.2))
    };
    let (canary_long, stable_long) = window(long_start);
    let (canary_short, stable_short) = window(now - burn.short_window().to_chrono());
    let max = burn.max_burn_rate;
    let over =
        |a: Option<f64>, b: Option<f64>| a.is_some_and(|a| a > max) && b.is_some_and(|b| b > max);
    let text = |v: Option<f64>| v.map_or("n/a".to_string(), |v| round2(v).to_string());
    let windows = format!(
        "canary burn {}× over {}, {}× over {} (stable {}×, {}×)",
        text(canary_long),
        burn.long_window,
        text(canary_short),
        burn.short_window(),
        text(stable_long),
        text(stable_short)
    );
    let (verdict, reason) = if !over(canary_long, canary_short) {
        (Verdict::Pass, format!("{windows} within {max}×"))
    } else if over(stable_long, stable_short) {
        (
            Verdict::NoData,
            format!("canary and stable both burn the error budget too fast: {windows}; not blaming the canary"),
        )
    } else {
        (
            Verdict::Fail,
            format!("{windows} above {max}× (objective {}%)", burn.objective),
        )
    };
    vec![MetricCheck {
        name: "slo-burn-rate".into(),
        value: canary_long.map(round2),
        stable_value: stable_long.map(round2),
        threshold: ThresholdRange {
            max: Some(max),
            ..ThresholdRange::default()
        },
        unit: "×".to_string(),
        verdict,
        decisive: false,
        reason,
        comparison: None,
    }]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::ResponseClass;
    use crate::observe::{LatencyHistogram, SubsetTraffic};
    use crate::spec::tests::example;
    use crate::spec::CompareSpec;

    /// Traffic with `ok` 2xx, `err` 5xx and `slow` of all requests above 500 ms (rest ≤ 50 ms).
    fn traffic(ok: u64, err: u64, slow: u64) -> SubsetTraffic {
        let total = ok + err;
        let mut t = SubsetTraffic {
            latency: LatencyHistogram {
                bounds_ms: vec![50.0, 500.0, 1000.0],
                cumulative: vec![total - slow, total - slow, total],
                count: total,
                sum_ms: 0.0,
            },
            ..Default::default()
        };
        t.add(ResponseClass::Success, ok);
        t.add(ResponseClass::ServerError, err);
        t
    }

    fn judge(spec: &AnalysisSpec, obs: &Observation) -> AnalysisReport {
        evaluate(spec, &mut AnalysisState::default(), obs, t(0))
    }

    fn t(secs: i64) -> DateTime<Utc> {
        use chrono::TimeZone;
        Utc.timestamp_opt(1_700_000_000 + secs, 0).unwrap()
    }

    fn obs(canary: SubsetTraffic) -> Observation {
        Observation {
            stable: traffic(1000, 0, 0),
            canary,
            ..Default::default()
        }
    }

    #[test]
    fn verdict_table() {
        let spec = example().spec.analysis; // min 10 requests, success >= 99, p99 <= 500 ms
        let cases: &[(&str, SubsetTraffic, Verdict, &str)] = &[
            (
                "healthy",
                traffic(200, 0, 0),
                Verdict::Pass,
                "all checks passed over 200",
            ),
            (
                "exactly 99%",
                traffic(99, 1, 0),
                Verdict::Pass,
                "all checks passed",
            ),
            (
                "errors",
                traffic(80, 20, 0),
                Verdict::Fail,
                "canary success rate 80% outside >= 99",
            ),
            (
                "slow tail",
                traffic(100, 0, 5),
                Verdict::Fail,
                "canary p99 latency",
            ),
            (
                "no traffic",
                traffic(3, 0, 0),
                Verdict::NoData,
                "canary receives no traffic: 3 canary requests",
            ),
            (
                "zero",
                SubsetTraffic::default(),
                Verdict::NoData,
                "canary receives no traffic",
            ),
        ];
        for (name, canary, verdict, reason) in cases {
            let report = judge(&spec, &obs(canary.clone()));
            assert_eq!(report.verdict, *verdict, "{name}: {report:?}");
            assert!(report.reason.contains(reason), "{name}: {}", report.reason);
        }
    }

    #[test]
    fn failed_check_reports_value_threshold_and_stable() {
        let spec = example().spec.analysis;
        let report = judge(&spec, &obs(traffic(80, 20, 0)));
        let check = &report.checks[0];
        assert_eq!(check.name, "request-success-rate");
        assert_eq!(check.value, Some(80.0));
        assert_eq!(check.stable_value, Some(100.0));
        assert_eq!(check.threshold.min, Some(99.0));
        assert_eq!(check.verdict, Verdict::Fail);
        assert_eq!(report.checks[1].verdict, Verdict::Pass);
    }

    #[test]
    fn missing_latency_data_is_no_data_not_a_pass() {
        let spec = example().spec.analysis;
        let mut canary = traffic(100, 0, 0);
        canary.latency = LatencyHistogram::default();
        let report = judge(&spec, &obs(canary));
        assert_eq!(report.verdict, Verdict::NoData);
        assert!(
            report.reason.contains("metric request-duration has no data: the canary's 100 requests came without a latency histogram"),
            "{}",
            report.reason
        );
    }

    #[test]
    fn failure_wins_over_missing_data() {
        let spec = example().spec.analysis;
        let mut canary = traffic(50, 50, 0);
        canary.latency = LatencyHistogram::default();
        assert_eq!(judge(&spec, &obs(canary)).verdict, Verdict::Fail);
    }

    #[test]
    fn custom_metric_values_are_judged_and_missing_ones_are_no_data() {
        let mut spec = example().spec.analysis;
        spec.metrics = vec![crate::spec::MetricSpec {
            name: "burn".into(),
            threshold_range: ThresholdRange {
                min: None,
                max: Some(1.0),
                ..ThresholdRange::default()
            },
            quantile: None,
            query: Some("x".into()),
        }];
        let mut o = obs(traffic(100, 0, 0));
        assert_eq!(judge(&spec, &o).verdict, Verdict::NoData);
        o.custom.insert("burn".into(), 0.4);
        assert_eq!(judge(&spec, &o).verdict, Verdict::Pass);
        o.custom.insert("burn".into(), 2.5);
        let report = judge(&spec, &o);
        assert_eq!(report.verdict, Verdict::Fail);
        assert!(
            report.reason.contains("canary burn 2.5 outside <= 1"),
            "{}",
            report.reason
        );
        o.custom.insert("burn".into(), f64::NAN);
        assert_eq!(judge(&spec, &o).verdict, Verdict::NoData);
    }

    #[test]
    fn no_metrics_means_traffic_check_only() {
        let mut spec = example().spec.analysis;
        spec.metrics.clear();
        assert_eq!(
            judge(&spec, &obs(traffic(50, 50, 0))).verdict,
            Verdict::Pass
        );
        assert_eq!(
            judge(&spec, &obs(traffic(1, 0, 0))).verdict,
            Verdict::NoData
        );
    }

    fn compare_spec() -> AnalysisSpec {
        let mut spec = example().spec.analysis;
        spec.metrics.clear();
        spec.compare_with_stable = Some(CompareSpec::default());
        spec
    }

    #[test]
    fn thresholds_do_not_blame_the_canary_when_stable_degrades_too() {
        let spec = example().spec.analysis;
        let o = Observation {
            stable: traffic(900, 100, 0),
            canary: traffic(90, 10, 0),
            ..Default::default()
        };
        let report = judge(&spec, &o);
        assert_eq!(report.verdict, Verdict::NoData);
        assert!(report.reason.contains("both degraded"), "{}", report.reason);
        assert!(
            report.reason.contains("not blaming the canary"),
            "{}",
            report.reason
        );
    }

    #[test]
    fn sequential_error_test_rolls_back_a_bad_canary_decisively() {
        let spec = compare_spec();
        let mut state = AnalysisState::default();
        let mut decided_at = None;
        for i in 0..30 {
            // canary: 5% errors of 100; stable: 1% errors of 400.
            let o = Observation {
                stable: traffic(396, 4, 0),
                canary: traffic(95, 5, 0),
                ..Default::default()
            };
            let report = evaluate(&spec, &mut state, &o, t(i));
            if report.decisive_failure().is_some() {
                decided_at = Some(i);
                assert_eq!(report.verdict, Verdict::Fail);
                assert!(
                    report.reason.contains("canary error rate"),
                    "{}",
                    report.reason
                );
                assert!(
                    report.reason.contains("× stable (tolerance 1×): evidence"),
                    "{}",
                    report.reason
                );
                assert!(
                    report.reason.contains("needed to roll back, p="),
                    "{}",
                    report.reason
                );
                break;
            }
        }
        let at = decided_at.expect("a 5x error rate must be detected");
        assert!(at < 10, "detected after {at} intervals");
    }

    #[test]
    fn sequential_tests_pass_a_healthy_canary_and_keep_state() {
        let spec = compare_spec();
        let mut state = AnalysisState::default();
        for i in 0..50 {
            let o = Observation {
                stable: traffic(396, 4, 2),
                canary: traffic(99, 1, 0),
                ..Default::default()
            };
            let report = evaluate(&spec, &mut state, &o, t(i));
            assert_eq!(report.verdict, Verdict::Pass, "{}", report.reason);
        }
        assert_eq!(state.errors.as_ref().unwrap().canary_requests, 5000);
        assert!(state.latency_boundaries_chosen);
        assert!(!state.latency.is_empty());
    }

    #[test]
    fn sequential_latency_test_detects_a_slow_canary() {
        let spec = compare_spec();
        let mut state = AnalysisState::default();
        let mut detected = false;
        for i in 0..30 {
            // 2% of stable requests and 10% of canary requests above 500 ms.
            let o = Observation {
                stable: traffic(400, 0, 8),
                canary: traffic(100, 0, 10),
                ..Default::default()
            };
            let report = evaluate(&spec, &mut state, &o, t(i));
            if let Some(check) = report.decisive_failure() {
                assert_eq!(check.name, "latency-vs-stable");
                assert!(check.reason.contains("slower than"), "{}", check.reason);
                detected = true;
                break;
            }
        }
        assert!(detected);
    }

    #[test]
    fn a_decisive_failure_wins_even_in_a_quiet_interval() {
        let spec = compare_spec();
        let mut state = AnalysisState::default();
        let bad = Observation {
            stable: traffic(396, 4, 0),
            canary: traffic(80, 20, 0),
            ..Default::default()
        };
        for i in 0..20 {
            evaluate(&spec, &mut state, &bad, t(i));
        }
        let quiet = obs(traffic(1, 0, 0));
        assert!(evaluate(&spec, &mut state, &quiet, t(21))
            .decisive_failure()
            .is_some());
    }

    #[test]
    fn promotion_margin_holds_until_the_evidence_is_there() {
        let mut spec = compare_spec();
        let compare = spec.compare_with_stable.as_mut().unwrap();
        compare.promotion_margin = Some(2.0);
        compare.promotion_min_canary_requests = 500;
        let mut state = AnalysisState::default();
        let healthy = Observation {
            stable: traffic(980, 20, 0),
            canary: traffic(980, 20, 0),
            ..Default::default()
        };
        let first = evaluate(&spec, &mut state, &obs(traffic(100, 0, 0)), t(0));
        assert!(
            first.hold.as_deref().unwrap().contains("100 of 500"),
            "{:?}",
            first.hold
        );
        let mut released = None;
        for i in 1..60 {
            let report = evaluate(&spec, &mut state, &healthy, t(i));
            assert_eq!(report.verdict, Verdict::Pass);
            if report.hold.is_none() {
                released = Some(i);
                break;
            }
        }
        assert!(released.is_some(), "evidence never reached");
    }

    #[test]
    fn burn_rate_needs_both_windows_and_spares_a_shared_outage() {
        let mut spec = example().spec.analysis;
        spec.metrics.clear();
        spec.slo_burn_rate = Some(crate::spec::BurnRateSpec {
            objective: 99.0,
            max_burn_rate: 5.0,
            long_window: crate::duration::HumanDuration::from_secs(120),
            short_window: Some(crate::duration::HumanDuration::from_secs(20)),
        });
        let mut state = AnalysisState::default();
        // A long healthy stretch, then one bad 10 s interval: short window burns, long does not.
        for i in 0..11 {
            let report = evaluate(&spec, &mut state, &obs(traffic(1000, 0, 0)), t(i * 10));
            assert_eq!(report.verdict, Verdict::Pass);
        }
        let spike = evaluate(&spec, &mut state, &obs(traffic(900, 100, 0)), t(110));
        assert_eq!(spike.verdict, Verdict::Pass, "{}", spike.reason);
        // Sustained 10% errors (burn 10× > 5×) over both windows.
        let mut failed = false;
        for i in 12..30 {
            let report = evaluate(&spec, &mut state, &obs(traffic(900, 100, 0)), t(i * 10));
            if report.verdict == Verdict::Fail {
                assert!(report.reason.contains("above 5×"), "{}", report.reason);
                failed = true;
                break;
            }
        }
        assert!(failed);
        // Both versions burning: halt, do not blame the canary.
        let both = Observation {
            stable: traffic(900, 100, 0),
            canary: traffic(900, 100, 0),
            ..Default::default()
        };
        let mut state = AnalysisState::default();
        let mut last = None;
        for i in 0..15 {
            last = Some(evaluate(&spec, &mut state, &both, t(i * 10)));
        }
        let last = last.unwrap();
        assert_eq!(last.verdict, Verdict::NoData, "{}", last.reason);
        assert!(last.reason.contains("both burn"), "{}", last.reason);
        assert!(
            state.recent.len() <= 13,
            "window pruned: {}",
            state.recent.len()
        );
    }

    /// Halts name their cause: a counter reset (partial interval), no traffic at all, too
    /// little canary traffic, a metric without data.
    #[test]
    fn too_little_data_names_its_cause() {
        let spec = example().spec.analysis; // minCanaryRequests 10
        let reset = Observation {
            stable: traffic(40, 0, 0),
            canary: traffic(6, 0, 0),
            counter_reset: Some(
                "Envoy http://127.0.0.1:9901 restarted (its counters went back to zero)".into(),
            ),
            ..Default::default()
        };
        let cases: &[(Observation, &str)] = &[
            (
                reset,
                "counter reset: Envoy http://127.0.0.1:9901 restarted (its counters went back to zero), so this interval only counts requests since then (6 canary, 40 stable; minCanaryRequests 10); waiting for a full interval",
            ),
            (
                Observation::default(),
                "no traffic: neither version served a request in the last interval (minCanaryRequests 10); is the service receiving requests?",
            ),
            (
                obs(traffic(3, 0, 0)),
                "canary receives no traffic: 3 canary requests in the last interval, below minCanaryRequests 10 (stable got 1000)",
            ),
        ];
        for (observation, reason) in cases {
            let report = judge(&spec, observation);
            assert_eq!(report.verdict, Verdict::NoData);
            assert_eq!(report.reason, *reason);
        }
        let mut custom = example().spec.analysis;
        custom.metrics = vec![crate::spec::MetricSpec {
            name: "error-burn".into(),
            threshold_range: ThresholdRange {
                max: Some(1.0),
                ..ThresholdRange::default()
            },
            quantile: None,
            query: Some("x".into()),
        }];
        let report = judge(&custom, &obs(traffic(100, 0, 0)));
        assert_eq!(
            report.reason,
            "metric error-burn has no data: its query returned no value for this interval (an empty result or NaN)"
        );
    }

    #[test]
    fn error_statuses_decide_what_counts_as_bad() {
        let mut spec = example().spec.analysis; // success rate >= 99%
        let mut canary = traffic(90, 0, 0);
        canary.add(ResponseClass::ClientError, 10);
        assert_eq!(judge(&spec, &obs(canary.clone())).verdict, Verdict::Pass);
        spec.error_statuses = vec![ResponseClass::ServerError, ResponseClass::ClientError];
        let report = judge(&spec, &obs(canary));
        assert_eq!(report.verdict, Verdict::Fail);
        assert_eq!(
            report.checks[0].summary(),
            "request-success-rate 90% (>= 99%), stable 100%: Fail"
        );
    }

    #[test]
    fn strict_bounds_fail_at_the_bound() {
        let mut spec = example().spec.analysis;
        spec.metrics[0].threshold_range = ThresholdRange {
            above: Some(90.0),
            ..ThresholdRange::default()
        };
        assert_eq!(judge(&spec, &obs(traffic(91, 9, 0))).verdict, Verdict::Pass);
        let report = judge(&spec, &obs(traffic(90, 10, 0)));
        assert_eq!(report.verdict, Verdict::Fail);
        assert!(
            report
                .reason
                .contains("canary success rate 90% outside > 90%"),
            "{}",
            report.reason
        );
    }

    /// "errors-vs-stable 1.41 (<= 1) Pass" is gone: a comparison shows its ratio, the
    /// tolerance, and the evidence its verdict rests on.
    #[test]
    fn a_comparison_states_ratio_tolerance_and_evidence() {
        let spec = compare_spec();
        let o = Observation {
            stable: traffic(990, 10, 0),
            canary: traffic(140, 2, 0),
            ..Default::default()
        };
        let report = judge(&spec, &o);
        let check = &report.checks[0];
        assert_eq!(check.name, "errors-vs-stable");
        assert_eq!(check.verdict, Verdict::Pass);
        assert_eq!(
            check.threshold,
            ThresholdRange::default(),
            "no bound for the ratio"
        );
        let c = check.comparison.as_ref().unwrap();
        assert_eq!(
            (c.tolerance, c.canary_events, c.stable_events),
            (1.0, 2, 10)
        );
        assert!((c.evidence_needed - 1.0 / 0.03).abs() < 1e-9);
        assert!(c.evidence < c.evidence_needed);
        let summary = check.summary();
        assert!(
            summary.starts_with("errors-vs-stable: canary ≈1.41× stable (tolerance 1×), evidence "),
            "{summary}"
        );
        assert!(
            summary.ends_with(" of 33.3 needed to roll back, p=1: Pass"),
            "{summary}"
        );
    }

    #[test]
    fn low_stable_traffic_warns_that_latency_is_not_compared() {
        let spec = compare_spec();
        let mut state = AnalysisState::default();
        let quiet = Observation {
            stable: traffic(12, 0, 0),
            canary: traffic(30, 0, 0),
            ..Default::default()
        };
        let report = evaluate(&spec, &mut state, &quiet, t(0));
        assert_eq!(report.verdict, Verdict::Pass);
        let warnings: Vec<String> = report.warnings.iter().map(|w| w.to_string()).collect();
        assert_eq!(
            warnings,
            ["spec.analysis.compareWithStable.latencyBoundariesMs: latency not compared: 12 stable requests per interval, 50 needed; set latencyBoundariesMs or a longer interval"]
        );
        assert_eq!(report.warnings[0].code, code::LATENCY_NOT_COMPARED);
        // Enough stable traffic once: boundaries are chosen, and the warning is gone.
        let busy = obs(traffic(100, 0, 0));
        let report = evaluate(&spec, &mut state, &busy, t(1));
        assert!(report.warnings.is_empty(), "{:?}", report.warnings);
        assert!(state.latency_boundaries_chosen);
    }

    /// A stable version faster than every bucket still gets a boundary: its slowest bucket.
    /// (Choosing none marked the boundaries chosen, cleared the warning, and then compared
    /// no latency at all for the rest of the rollout.)
    #[test]
    fn a_stable_faster_than_every_bucket_still_has_its_latency_compared() {
        let spec = compare_spec();
        let mut state = AnalysisState::default();
        let mut detected = false;
        for i in 0..30 {
            // No stable request slower than 50 ms; 10% of canary requests slower than 500 ms.
            let o = Observation {
                stable: traffic(400, 0, 0),
                canary: traffic(100, 0, 10),
                ..Default::default()
            };
            let report = evaluate(&spec, &mut state, &o, t(i));
            assert!(report.warnings.is_empty(), "{:?}", report.warnings);
            assert!(
                report.checks.iter().any(|c| c.name == "latency-vs-stable"),
                "{:?}",
                report.checks
            );
            if let Some(check) = report.decisive_failure() {
                assert_eq!(check.name, "latency-vs-stable");
                assert!(
                    check.reason.contains("slower than 50 ms"),
                    "{}",
                    check.reason
                );
                detected = true;
                break;
            }
        }
        assert_eq!(
            state
                .latency
                .iter()
                .map(|l| l.boundary_ms)
                .collect::<Vec<_>>(),
            [50.0]
        );
        assert!(
            detected,
            "a canary slower than all of the stable was not caught"
        );
    }

    #[test]
    fn a_boundary_that_is_not_a_bucket_and_a_missing_histogram_are_warnings() {
        let mut spec = compare_spec();
        spec.compare_with_stable
            .as_mut()
            .unwrap()
            .latency_boundaries_ms = Some(vec![300.0, 500.0]);
        let report = judge(&spec, &obs(traffic(100, 0, 0)));
        assert_eq!(
            report.warnings[0].to_string(),
            "spec.analysis.compareWithStable.latencyBoundariesMs: latency not compared at 300 ms: not a bucket boundary of the latency histogram (its buckets: 50, 500, 1000 ms); list bucket boundaries only, e.g. `latencyBoundariesMs: [250, 500]`"
        );
        let mut canary = traffic(100, 0, 0);
        canary.latency = LatencyHistogram::default();
        let report = judge(&spec, &obs(canary));
        assert_eq!(report.warnings[0].code, code::NO_LATENCY_HISTOGRAM);
        assert!(
            report.warnings[0]
                .message
                .ends_with("canary (100 requests)"),
            "{}",
            report.warnings[0]
        );
    }

    #[test]
    fn a_comparison_without_stable_traffic_says_so() {
        let mut spec = compare_spec();
        spec.compare_with_stable.as_mut().unwrap().signals = vec![ComparedSignal::Errors];
        let o = Observation {
            canary: traffic(50, 0, 0),
            ..Default::default()
        };
        let report = judge(&spec, &o);
        assert_eq!(
            report.warnings[0].to_string(),
            "spec.analysis.compareWithStable: not compared this interval: the stable version served no request (the canary served 50); a comparison needs both versions in the same interval; check that the stable version receives traffic at this weight"
        );
    }

    #[test]
    fn an_unchecked_spec_passes_on_traffic_and_says_so() {
        let mut spec = example().spec.analysis;
        spec.metrics.clear();
        spec.unchecked = true;
        let report = judge(&spec, &obs(traffic(50, 50, 0)));
        assert_eq!(report.verdict, Verdict::Pass);
        assert_eq!(
            report.reason,
            "no checks (unchecked: true): 100 canary requests served"
        );
    }
}
