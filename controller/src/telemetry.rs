//! The controller's own metrics (`GET /metrics`, OpenMetrics text via `prometheus-client`).
//!
//! | metric | type | labels | what |
//! | --- | --- | --- | --- |
//! | `fledge_info` | gauge | `version` | always 1 |
//! | `fledge_canary_weight` | gauge | `canary` | percent of traffic the canary should get |
//! | `fledge_canary_phase` | gauge | `canary`, `phase` | 1 for the current phase, 0 for the others |
//! | `fledge_canary_step` | gauge | `canary` | 0-based index of the current step |
//! | `fledge_canary_failed_checks` | gauge | `canary` | failed checks so far (rollback at the threshold) |
//! | `fledge_analysis_total` | counter | `canary`, `verdict` | judged intervals by verdict (`Pass`, `Fail`, `NoData`) |
//! | `fledge_analysis_duration_seconds` | histogram | `canary` | reading metrics + deciding, per interval |
//! | `fledge_analysis_lag_seconds` | histogram | — | from an analysis being due (its aligned tick) to its decision being recorded |
//! | `fledge_analysis_metric_value` | gauge | `canary`, `metric` | latest value of each check |
//! | `fledge_analysis_checks_total` | counter | `canary`, `metric`, `verdict` | check results |
//! | `fledge_decisions_total` | counter | `canary`, `reason` | events of the state machine (`CanaryAdvanced`, `Promoted`, `RollbackTriggered`, ...) |
//! | `fledge_webhook_calls_total` | counter | `canary`, `webhook`, `type`, `outcome` | webhook calls (`ok` / `failed`) |
//! | `fledge_webhook_duration_seconds` | histogram | `canary`, `webhook`, `type` | time per call, retries included |
//! | `fledge_reconcile_errors_total` | counter | `canary`, `kind` | `router` (weights not applied/confirmed), `metrics` (source unreadable), `persist` (state not saved) |
//! | `fledge_canaries` | gauge | `phase` | canaries in each phase (all of them, whatever the limit below) |
//!
//! Label cardinality is capped: only the first [`DEFAULT_CANARY_SERIES_LIMIT`] canaries (or
//! [`Telemetry::with_canary_limit`]) get series of their own. Beyond that a canary's state
//! gauges are not exported (it counts in `fledge_canaries`) and its counters and histograms are
//! summed under `canary="_other"`. A deleted canary's gauges go at once; its counters stay
//! until a new canary needs its place.

use fledge_core::analysis::Verdict;
use fledge_core::rollout::{Action, CanaryStatus, Phase, TimedReport};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

/// Every phase, for the `fledge_canary_phase` gauge (one series per phase).
pub const PHASES: [Phase; 6] = [
    Phase::Initializing,
    Phase::Progressing,
    Phase::Paused,
    Phase::Halted,
    Phase::Promoted,
    Phase::RolledBack,
];

/// Every metric family and its type. A family appears in the exposition once it has a sample;
/// this list is the contract (checked against the encoding by a test), e.g. for dashboards.
pub const FAMILIES: [(&str, &str); 15] = [
    ("fledge_info", "gauge"),
    ("fledge_canary_weight", "gauge"),
    ("fledge_canary_phase", "gauge"),
    ("fledge_canary_step", "gauge"),
    ("fledge_canary_failed_checks", "gauge"),
    ("fledge_analysis", "counter"),
    ("fledge_analysis_duration_seconds", "histogram"),
    ("fledge_analysis_lag_seconds", "histogram"),
    ("fledge_analysis_metric_value", "gauge"),
    ("fledge_analysis_checks", "counter"),
    ("fledge_decisions", "counter"),
    ("fledge_webhook_calls", "counter"),
    ("fledge_webhook_duration_seconds", "histogram"),
    ("fledge_reconcile_errors", "counter"),
    ("fledge_canaries", "gauge"),
];

/// Canaries with series of their own (see the module docs); the others are summed.
pub const DEFAULT_CANARY_SERIES_LIMIT: usize = 500;

/// The `canary` label of the canaries beyond the limit.
pub const OTHER_CANARIES: &str = "_other";

/// Every sample name the controller can expose: counters with `_total`, histograms with
/// `_bucket`, `_sum` and `_count`.
pub fn exposed_names() -> Vec<String> {
    let mut names = Vec::new();
    for (name, kind) in FAMILIES {
        match kind {
            "counter" => names.push(format!("{name}_total")),
            "histogram" => {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.push(format!("{name}{suffix}"));
                }
            }
            _ => names.push(name.to_string()),
        }
    }
    names
}

/// The content type of [`Telemetry::encode`].
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CanaryLabels {
    canary: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    canary: String,
    phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabels {
    canary: String,
    verdict: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MetricLabels {
    canary: String,
    metric: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CheckLabels {
    canary: String,
    metric: String,
    verdict: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    canary: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WebhookLabels {
    canary: String,
    webhook: String,
    r#type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WebhookOutcomeLabels {
    canary: String,
    webhook: String,
    r#type: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    canary: String,
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FleetPhaseLabels {
    phase: String,
}

/// The label values one canary has used, so all of its series can be removed when its place
/// is given to another canary.
#[derive(Default)]
struct UsedLabels {
    metrics: std::collections::BTreeSet<String>,
    reasons: std::collections::BTreeSet<String>,
    webhooks: std::collections::BTreeSet<(String, String)>,
    /// Deleted: its gauges are gone, its counters may be removed to make room.
    forgotten: bool,
}

/// Which canaries have series of their own, and each canary's phase (for `fledge_canaries`).
#[derive(Default)]
struct Admission {
    limit: usize,
    admitted: std::collections::HashMap<String, UsedLabels>,
    /// Deleted canaries still holding a place, oldest first.
    forgotten: std::collections::VecDeque<String>,
    phases: std::collections::HashMap<String, Phase>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    version: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;
type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Decision lag: finer around the one second an operator cares about.
fn lag_histogram() -> Histogram {
    Histogram::new([
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0, 60.0,
    ])
}

fn seconds_histogram() -> Histogram {
    Histogram::new([
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    ])
}

/// What kind of reconcile error happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The router could not apply or confirm the wanted weights.
    Router,
    /// The metrics source could not be read.
    Metrics,
    /// The state file could not be written.
    Persist,
    /// A Kubernetes API call failed (Kubernetes mode).
    Api,
}

impl ErrorKind {
    fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Router => "router",
            ErrorKind::Metrics => "metrics",
            ErrorKind::Persist => "persist",
            ErrorKind::Api => "api",
        }
    }
}

struct Metrics {
    registry: Registry,
    weight: Family<CanaryLabels, Gauge>,
    phase: Family<PhaseLabels, Gauge>,
    step: Family<CanaryLabels, Gauge>,
    failed_checks: Family<CanaryLabels, Gauge>,
    analyses: Family<VerdictLabels, Counter>,
    analysis_duration: HistogramFamily<CanaryLabels>,
    analysis_lag: Histogram,
    metric_value: Family<MetricLabels, FloatGauge>,
    checks: Family<CheckLabels, Counter>,
    decisions: Family<ReasonLabels, Counter>,
    webhook_calls: Family<WebhookOutcomeLabels, Counter>,
    webhook_duration: HistogramFamily<WebhookLabels>,
    errors: Family<ErrorLabels, Counter>,
    fleet: Family<FleetPhaseLabels, Gauge>,
    admission: std::sync::Mutex<Admission>,
}

/// The controller's metrics registry. Cheap to clone; all clones share the same metrics.
#[derive(Clone)]
pub struct Telemetry {
    metrics: Arc<Metrics>,
}

impl Default for Telemetry {
    fn default() -> Self {
        Telemetry::new()
    }
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Telemetry")
    }
}

fn verdict_name(verdict: Verdict) -> &'static str {
    match verdict {
        Verdict::Pass => "Pass",
        Verdict::Fail => "Fail",
        Verdict::NoData => "NoData",
    }
}

fn phase_name(phase: Phase) -> String {
    format!("{phase:?}")
}

impl Telemetry {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let info = Family::<VersionLabels, Gauge>::default();
        info.get_or_create(&VersionLabels {
            version: env!("CARGO_PKG_VERSION").to_string(),
        })
        .set(1);
        registry.register("fledge_info", "Fledge controller build information", info);
        let weight = Family::default();
        registry.register(
            "fledge_canary_weight",
            "Percent of traffic the canary should receive",
            weight.clone(),
        );
        let phase = Family::default();
        registry.register(
            "fledge_canary_phase",
            "1 for the canary's current phase, 0 for the others",
            phase.clone(),
        );
        let step = Family::default();
        registry.register(
            "fledge_canary_step",
            "0-based index of the canary's current step",
            step.clone(),
        );
        let failed_checks = Family::default();
        registry.register(
            "fledge_canary_failed_checks",
            "Failed checks of the current rollout (rollback at the threshold)",
            failed_checks.clone(),
        );
        let analyses = Family::default();
        registry.register(
            "fledge_analysis",
            "Judged analysis intervals by verdict",
            analyses.clone(),
        );
        let analysis_duration: HistogramFamily<CanaryLabels> =
            Family::new_with_constructor(seconds_histogram);
        registry.register(
            "fledge_analysis_duration_seconds",
            "Time to read the metrics and decide, per analysis interval",
            analysis_duration.clone(),
        );
        let analysis_lag = lag_histogram();
        registry.register(
            "fledge_analysis_lag_seconds",
            "From an analysis being due to its decision being recorded (all canaries)",
            analysis_lag.clone(),
        );
        let metric_value = Family::default();
        registry.register(
            "fledge_analysis_metric_value",
            "Latest value of each analysis check",
            metric_value.clone(),
        );
        let checks = Family::default();
        registry.register(
            "fledge_analysis_checks",
            "Analysis check results by metric and verdict",
            checks.clone(),
        );
        let decisions = Family::default();
        registry.register(
            "fledge_decisions",
            "Decisions of the rollout state machine by reason",
            decisions.clone(),
        );
        let webhook_calls = Family::default();
        registry.register(
            "fledge_webhook_calls",
            "Webhook calls by outcome (ok or failed)",
            webhook_calls.clone(),
        );
        let webhook_duration: HistogramFamily<WebhookLabels> =
            Family::new_with_constructor(seconds_histogram);
        registry.register(
            "fledge_webhook_duration_seconds",
            "Time per webhook call, retries included",
            webhook_duration.clone(),
        );
        let errors = Family::default();
        registry.register(
            "fledge_reconcile_errors",
            "Reconcile errors by kind (router, metrics, persist, api)",
            errors.clone(),
        );
        let fleet = Family::default();
        registry.register(
            "fledge_canaries",
            "Canaries in each phase (every canary, also those beyond the per-canary series limit)",
            fleet.clone(),
        );
        Telemetry {
            metrics: Arc::new(Metrics {
                fleet,
                admission: std::sync::Mutex::new(Admission {
                    limit: DEFAULT_CANARY_SERIES_LIMIT,
                    ..Admission::default()
                }),
                registry,
                weight,
                phase,
                step,
                failed_checks,
                analyses,
                analysis_duration,
                analysis_lag,
                metric_value,
                checks,
                decisions,
                webhook_calls,
                webhook_duration,
                errors,
            }),
        }
    }

    /// At most `limit` canaries get series of their own (see the module docs).
    pub fn with_canary_limit(self, limit: usize) -> Self {
        self.admission().limit = limit;
        self
    }

    fn admission(&self) -> std::sync::MutexGuard<'_, Admission> {
        match self.metrics.admission.lock() {
            Ok(admission) => admission,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Whether `canary` has series of its own: it has a place, or one is free, or a deleted
    /// canary's place is taken over (its remaining series are removed).
    fn admit(&self, canary: &str) -> bool {
        let mut admission = self.admission();
        if let Some(used) = admission.admitted.get_mut(canary) {
            if used.forgotten {
                used.forgotten = false;
                admission.forgotten.retain(|c| c != canary);
            }
            return true;
        }
        if admission.admitted.len() >= admission.limit {
            let Some(evicted) = admission.forgotten.pop_front() else {
                return false;
            };
            if let Some(used) = admission.admitted.remove(&evicted) {
                self.remove_series(&evicted, &used);
            }
        }
        admission
            .admitted
            .insert(canary.to_string(), UsedLabels::default());
        true
    }

    /// The `canary` label for counters and histograms: the canary, or [`OTHER_CANARIES`].
    fn counted_as(&self, canary: &str) -> String {
        if self.admit(canary) {
            canary.to_string()
        } else {
            OTHER_CANARIES.to_string()
        }
    }

    /// Remember a label value `canary` used, to remove its series later.
    fn used(&self, canary: &str, record: impl FnOnce(&mut UsedLabels)) {
        if let Some(used) = self.admission().admitted.get_mut(canary) {
            record(used);
        }
    }

    fn remove_series(&self, canary: &str, used: &UsedLabels) {
        let m = &self.metrics;
        let canary = canary.to_string();
        for verdict in ["Pass", "Fail", "NoData"] {
            m.analyses.remove(&VerdictLabels {
                canary: canary.clone(),
                verdict: verdict.to_string(),
            });
            for metric in &used.metrics {
                m.checks.remove(&CheckLabels {
                    canary: canary.clone(),
                    metric: metric.clone(),
                    verdict: verdict.to_string(),
                });
            }
        }
        for metric in &used.metrics {
            m.metric_value.remove(&MetricLabels {
                canary: canary.clone(),
                metric: metric.clone(),
            });
        }
        m.analysis_duration.remove(&CanaryLabels {
            canary: canary.clone(),
        });
        for reason in &used.reasons {
            m.decisions.remove(&ReasonLabels {
                canary: canary.clone(),
                reason: reason.clone(),
            });
        }
        for (webhook, kind) in &used.webhooks {
            for outcome in ["ok", "failed"] {
                m.webhook_calls.remove(&WebhookOutcomeLabels {
                    canary: canary.clone(),
                    webhook: webhook.clone(),
                    r#type: kind.clone(),
                    outcome: outcome.to_string(),
                });
            }
            m.webhook_duration.remove(&WebhookLabels {
                canary: canary.clone(),
                webhook: webhook.clone(),
                r#type: kind.clone(),
            });
        }
        for kind in [
            ErrorKind::Router,
            ErrorKind::Metrics,
            ErrorKind::Persist,
            ErrorKind::Api,
        ] {
            m.errors.remove(&ErrorLabels {
                canary: canary.clone(),
                kind: kind.as_str().to_string(),
            });
        }
    }

    /// Count `canary` in `fledge_canaries` under `phase` (`None`: no more).
    fn count_phase(&self, canary: &str, phase: Option<Phase>) {
        let previous = {
            let mut admission = self.admission();
            match phase {
                Some(phase) => admission.phases.insert(canary.to_string(), phase),
                None => admission.phases.remove(canary),
            }
        };
        if previous == phase {
            return;
        }
        let fleet = &self.metrics.fleet;
        if let Some(previous) = previous {
            fleet
                .get_or_create(&FleetPhaseLabels {
                    phase: phase_name(previous),
                })
                .dec();
        }
        if let Some(phase) = phase {
            fleet
                .get_or_create(&FleetPhaseLabels {
                    phase: phase_name(phase),
                })
                .inc();
        }
    }

    /// An analysis tick's decision was recorded `lag` after the tick was due.
    pub fn record_lag(&self, lag: Duration) {
        self.metrics.analysis_lag.observe(lag.as_secs_f64());
    }

    /// Publish a canary's current state (weight, phase, step, failed checks).
    pub fn observe_status(&self, canary: &str, status: &CanaryStatus) {
        self.count_phase(canary, Some(status.phase));
        if !self.admit(canary) {
            return;
        }
        let m = &self.metrics;
        let labels = CanaryLabels {
            canary: canary.to_string(),
        };
        m.weight
            .get_or_create(&labels)
            .set(i64::from(status.canary_weight));
        m.step
            .get_or_create(&labels)
            .set(i64::try_from(status.step).unwrap_or(i64::MAX));
        m.failed_checks
            .get_or_create(&labels)
            .set(i64::from(status.failed_checks));
        for phase in PHASES {
            m.phase
                .get_or_create(&PhaseLabels {
                    canary: canary.to_string(),
                    phase: phase_name(phase),
                })
                .set(i64::from(phase == status.phase));
        }
    }

    /// Stop publishing a deleted canary's state gauges (weight, phase, step, failed checks).
    /// Its counters stay — they are totals a rate() over a window still needs — until a new
    /// canary needs its place (see the module docs).
    pub fn forget(&self, canary: &str) {
        self.count_phase(canary, None);
        {
            let mut admission = self.admission();
            let newly_forgotten = admission
                .admitted
                .get_mut(canary)
                .is_some_and(|used| !std::mem::replace(&mut used.forgotten, true));
            if newly_forgotten {
                admission.forgotten.push_back(canary.to_string());
            }
        }
        let m = &self.metrics;
        let labels = CanaryLabels {
            canary: canary.to_string(),
        };
        m.weight.remove(&labels);
        m.step.remove(&labels);
        m.failed_checks.remove(&labels);
        for phase in PHASES {
            m.phase.remove(&PhaseLabels {
                canary: canary.to_string(),
                phase: phase_name(phase),
            });
        }
    }

    /// Count one judged interval and publish its checks; `took` is read + decide time.
    pub fn record_analysis(&self, canary: &str, report: &TimedReport, took: Duration) {
        let m = &self.metrics;
        let own = self.admit(canary);
        let canary = &self.counted_as(canary);
        if own {
            self.used(canary, |used| {
                used.metrics
                    .extend(report.report.checks.iter().map(|c| c.name.clone()))
            });
        }
        m.analyses
            .get_or_create(&VerdictLabels {
                canary: canary.to_string(),
                verdict: verdict_name(report.report.verdict).to_string(),
            })
            .inc();
        m.analysis_duration
            .get_or_create(&CanaryLabels {
                canary: canary.to_string(),
            })
            .observe(took.as_secs_f64());
        for check in &report.report.checks {
            if let Some(value) = check.value.filter(|v| v.is_finite() && own) {
                m.metric_value
                    .get_or_create(&MetricLabels {
                        canary: canary.to_string(),
                        metric: check.name.clone(),
                    })
                    .set(value);
            }
            m.checks
                .get_or_create(&CheckLabels {
                    canary: canary.to_string(),
                    metric: check.name.clone(),
                    verdict: verdict_name(check.verdict).to_string(),
                })
                .inc();
        }
    }

    /// Count the events of one decision by reason.
    pub fn record_decisions(&self, canary: &str, actions: &[Action]) {
        let canary = &self.counted_as(canary);
        for action in actions {
            if let Action::Event { reason, .. } = action {
                self.used(canary, |used| {
                    used.reasons.insert(format!("{reason:?}"));
                });
                self.metrics
                    .decisions
                    .get_or_create(&ReasonLabels {
                        canary: canary.to_string(),
                        reason: format!("{reason:?}"),
                    })
                    .inc();
            }
        }
    }

    /// Count one webhook call (all its attempts).
    pub fn record_webhook(
        &self,
        canary: &str,
        webhook: &str,
        kind: &str,
        ok: bool,
        took: Duration,
    ) {
        let m = &self.metrics;
        let canary = &self.counted_as(canary);
        self.used(canary, |used| {
            used.webhooks
                .insert((webhook.to_string(), kind.to_string()));
        });
        m.webhook_calls
            .get_or_create(&WebhookOutcomeLabels {
                canary: canary.to_string(),
                webhook: webhook.to_string(),
                r#type: kind.to_string(),
                outcome: if ok { "ok" } else { "failed" }.to_string(),
            })
            .inc();
        m.webhook_duration
            .get_or_create(&WebhookLabels {
                canary: canary.to_string(),
                webhook: webhook.to_string(),
                r#type: kind.to_string(),
            })
            .observe(took.as_secs_f64());
    }

    pub fn record_error(&self, canary: &str, kind: ErrorKind) {
        let canary = &self.counted_as(canary);
        self.metrics
            .errors
            .get_or_create(&ErrorLabels {
                canary: canary.to_string(),
                kind: kind.as_str().to_string(),
            })
            .inc();
    }

    /// The OpenMetrics text exposition (see [`CONTENT_TYPE`]).
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.metrics.registry)?;
        Ok(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fledge_core::analysis::{AnalysisReport, MetricCheck};
    use fledge_core::rollout::EventReason;
    use fledge_core::spec::ThresholdRange;

    fn sample_line<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
        text.lines().find(|l| l.starts_with(prefix))
    }

    fn populated() -> Telemetry {
        let telemetry = Telemetry::new();
        let status = CanaryStatus {
            phase: Phase::Progressing,
            canary_weight: 40,
            step: 1,
            failed_checks: 2,
            ..Default::default()
        };
        telemetry.observe_status("app", &status);
        let report = TimedReport {
            at: chrono::Utc::now(),
            enforced: true,
            report: AnalysisReport {
                verdict: Verdict::Pass,
                canary_requests: 60,
                stable_requests: 240,
                checks: vec![MetricCheck {
                    name: "request-success-rate".into(),
                    value: Some(99.5),
                    stable_value: Some(100.0),
                    threshold: ThresholdRange {
                        min: Some(99.0),
                        max: None,
                        ..ThresholdRange::default()
                    },
                    verdict: Verdict::Pass,
                    decisive: false,
                    reason: String::new(),
                    unit: String::new(),
                    comparison: None,
                }],
                reason: String::new(),
                hold: None,
                warnings: Vec::new(),
            },
        };
        telemetry.record_analysis("app", &report, Duration::from_millis(30));
        telemetry.record_decisions(
            "app",
            &[
                Action::SetWeight { canary: 40 },
                Action::Event {
                    reason: EventReason::CanaryAdvanced,
                    warning: false,
                    message: String::new(),
                },
            ],
        );
        telemetry.record_webhook(
            "app",
            "load-test",
            "rollout",
            false,
            Duration::from_millis(5),
        );
        telemetry.record_error("app", ErrorKind::Router);
        telemetry
    }

    #[test]
    fn exposes_state_analysis_decisions_webhooks_and_errors() {
        let telemetry = populated();
        let text = telemetry.encode().unwrap();
        for expected in [
            "fledge_canary_weight{canary=\"app\"} 40",
            "fledge_canary_phase{canary=\"app\",phase=\"Progressing\"} 1",
            "fledge_canary_phase{canary=\"app\",phase=\"Promoted\"} 0",
            "fledge_canary_step{canary=\"app\"} 1",
            "fledge_canary_failed_checks{canary=\"app\"} 2",
            "fledge_analysis_total{canary=\"app\",verdict=\"Pass\"} 1",
            "fledge_analysis_duration_seconds_count{canary=\"app\"} 1",
            "fledge_analysis_metric_value{canary=\"app\",metric=\"request-success-rate\"} 99.5",
            "fledge_analysis_checks_total{canary=\"app\",metric=\"request-success-rate\",verdict=\"Pass\"} 1",
            "fledge_decisions_total{canary=\"app\",reason=\"CanaryAdvanced\"} 1",
            "fledge_webhook_calls_total{canary=\"app\",webhook=\"load-test\",type=\"rollout\",outcome=\"failed\"} 1",
            "fledge_webhook_duration_seconds_count{canary=\"app\",webhook=\"load-test\",type=\"rollout\"} 1",
            "fledge_reconcile_errors_total{canary=\"app\",kind=\"router\"} 1",
            "fledge_info{version=",
        ] {
            assert!(
                sample_line(&text, expected).is_some(),
                "missing {expected:?} in\n{text}"
            );
        }
    }

    /// Every query string of a Grafana dashboard (`expr`, variable `query`/`definition`).
    fn queries(value: &serde_json::Value, out: &mut Vec<String>) {
        match value {
            // The datasource variable's `query` is a plugin type, not PromQL.
            serde_json::Value::Object(map) if map.get("type") == Some(&"datasource".into()) => {}
            serde_json::Value::Object(map) => {
                for (key, inner) in map {
                    match (key.as_str(), inner) {
                        ("expr" | "query" | "definition", serde_json::Value::String(text)) => {
                            out.push(text.clone())
                        }
                        _ => queries(inner, out),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|i| queries(i, out)),
            _ => {}
        }
    }

    #[test]
    fn grafana_dashboard_uses_only_metrics_that_exist() {
        use fledge_core::contract;
        let dashboard: serde_json::Value = serde_json::from_str(include_str!(
            "../../manifests/grafana/fledge-dashboard.json"
        ))
        .expect("manifests/grafana/fledge-dashboard.json is JSON");
        let mut exprs = Vec::new();
        queries(&dashboard, &mut exprs);
        assert!(exprs.len() >= 15, "{exprs:?}");
        let mut known: Vec<String> = exposed_names();
        for name in [
            contract::CONFIG_ERRORS_TOTAL,
            contract::FORCED_CANARY_ACCEPTED_TOTAL,
            contract::FORCED_CANARY_REJECTED_TOTAL,
            contract::REQUESTS_TOTAL,
        ] {
            known.push(name.to_string());
        }
        for suffix in ["_bucket", "_sum", "_count"] {
            known.push(format!("{}{suffix}", contract::REQUEST_DURATION_MS));
        }
        let mut used = std::collections::BTreeSet::new();
        for expr in &exprs {
            let identifiers = expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
                .filter(|word| word.starts_with("fledge_"));
            let mut metrics_in_expr = 0;
            for word in identifiers {
                if contract::ALL_TAGS.contains(&word) {
                    continue; // a label key, e.g. fledge_subset
                }
                assert!(
                    known.iter().any(|k| k == word),
                    "{word} (in {expr:?}) is neither a filter metric nor a controller metric"
                );
                metrics_in_expr += 1;
                used.insert(word.to_string());
            }
            assert!(metrics_in_expr > 0, "no fledge metric in {expr:?}");
        }
        // Response classes in regexes are real class labels.
        for expr in exprs.iter().filter(|e| e.contains("fledge_class=~")) {
            let classes = expr
                .split("fledge_class=~\"")
                .nth(1)
                .and_then(|r| r.split('"').next());
            for class in classes.unwrap_or_default().split('|') {
                assert!(
                    contract::ResponseClass::from_label(class).is_some_and(|c| c.is_failure()),
                    "{class} is not a failure class label"
                );
            }
        }
        // Both halves are on the dashboard.
        for needed in [
            contract::REQUESTS_TOTAL.to_string(),
            format!("{}_bucket", contract::REQUEST_DURATION_MS),
            "fledge_canary_weight".to_string(),
            "fledge_canary_phase".to_string(),
            "fledge_decisions_total".to_string(),
            "fledge_webhook_calls_total".to_string(),
            "fledge_reconcile_errors_total".to_string(),
        ] {
            assert!(used.contains(&needed), "{needed} is not charted: {used:?}");
        }
    }

    #[test]
    fn families_list_matches_the_encoding_once_every_family_has_a_sample() {
        let telemetry = populated();
        let text = telemetry.encode().unwrap();
        let mut typed: Vec<(String, String)> = text
            .lines()
            .filter_map(|line| {
                let mut words = line.strip_prefix("# TYPE ")?.split_whitespace();
                Some((words.next()?.to_string(), words.next()?.to_string()))
            })
            .collect();
        typed.sort();
        let mut expected: Vec<(String, String)> = FAMILIES
            .iter()
            .map(|(n, k)| (n.to_string(), k.to_string()))
            .collect();
        expected.sort();
        assert_eq!(typed, expected);
        let names = exposed_names();
        for sample in text.lines().filter(|l| !l.starts_with('#')) {
            let name = sample.split(['{', ' ']).next().unwrap();
            assert!(names.iter().any(|n| n == name), "{name} not in {names:?}");
        }
    }

    #[test]
    fn canaries_beyond_the_limit_are_summed_and_a_deleted_canarys_place_is_reused() {
        let telemetry = Telemetry::new().with_canary_limit(2);
        let status = |phase| CanaryStatus {
            phase,
            canary_weight: 10,
            ..Default::default()
        };
        for name in ["a", "b", "c", "d"] {
            telemetry.observe_status(name, &status(Phase::Progressing));
            telemetry.record_error(name, ErrorKind::Metrics);
        }
        let text = telemetry.encode().unwrap();
        assert!(sample_line(&text, "fledge_canary_weight{canary=\"a\"} 10").is_some());
        assert!(sample_line(&text, "fledge_canary_weight{canary=\"b\"} 10").is_some());
        assert!(sample_line(&text, "fledge_canary_weight{canary=\"c\"}").is_none());
        assert!(sample_line(
            &text,
            "fledge_reconcile_errors_total{canary=\"_other\",kind=\"metrics\"} 2"
        )
        .is_some());
        assert!(sample_line(&text, "fledge_canaries{phase=\"Progressing\"} 4").is_some());

        // `a` is deleted: its gauges go, its counter stays until `e` takes its place.
        telemetry.forget("a");
        let text = telemetry.encode().unwrap();
        assert!(sample_line(&text, "fledge_canary_weight{canary=\"a\"}").is_none());
        assert!(sample_line(&text, "fledge_reconcile_errors_total{canary=\"a\"").is_some());
        assert!(sample_line(&text, "fledge_canaries{phase=\"Progressing\"} 3").is_some());
        telemetry.observe_status("e", &status(Phase::Paused));
        let text = telemetry.encode().unwrap();
        assert!(sample_line(&text, "fledge_reconcile_errors_total{canary=\"a\"").is_none());
        assert!(sample_line(&text, "fledge_canary_weight{canary=\"e\"} 10").is_some());
        assert!(sample_line(&text, "fledge_canaries{phase=\"Paused\"} 1").is_some());
        // Two canaries' own series (4 gauges, 6 phases) and the summed counter: bounded.
        let per_canary = text.lines().filter(|l| l.contains("canary=\"")).count();
        assert_eq!(per_canary, 2 * 9 + 2, "{text}");
    }
}
