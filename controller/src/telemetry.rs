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
pub const FAMILIES: [(&str, &str); 14] = [
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
];

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
        Telemetry {
            metrics: Arc::new(Metrics {
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

    /// An analysis tick's decision was recorded `lag` after the tick was due.
    pub fn record_lag(&self, lag: Duration) {
        self.metrics.analysis_lag.observe(lag.as_secs_f64());
    }

    /// Publish a canary's current state (weight, phase, step, failed checks).
    pub fn observe_status(&self, canary: &str, status: &CanaryStatus) {
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
    /// Its counters stay: they are totals a rate() over a window still needs.
    pub fn forget(&self, canary: &str) {
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
            if let Some(value) = check.value.filter(|v| v.is_finite()) {
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
        for action in actions {
            if let Action::Event { reason, .. } = action {
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
}
