//! One analysis tick, the same in `fledge run` and `fledge controller`.
//!
//! ```text
//!  CanaryAnalysis::decide
//!    hooks     rollback, then pre-rollout / rollout webhooks   ┐ only when an analysis
//!    observe   the metrics source's interval                   ┘ interval is due
//!    decide    fledge_core::rollout::step_with_gates (pure); a decision that would promote
//!              asks the confirm-promotion hooks first and is decided again if one holds it
//!    record    self-metrics (analysis, decisions, errors) and the dashboard's series
//!  ── the mode persists the new status: state file (`fledge run`), Canary .status (Kubernetes)
//!  CanaryAnalysis::notify    the mode's Announce (progress lines / Kubernetes Events) and the
//!                            event webhooks
//!  ── the mode moves the routes (TrafficRouter::ensure)
//!  CanaryAnalysis::finish    post-rollout webhooks, once, when the rollout just ended
//! ```
//!
//! The modes only schedule ticks (an interval, an operator command, a guard trip), persist the
//! status between deciding and acting, and move the routes.

use crate::dashboard::series::{IntervalPoint, SharedSeries};
use crate::telemetry::{ErrorKind, Telemetry};
use crate::webhooks::{WebhookCaller, WebhookStatus};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use fledge_core::observe::{Observation, ObservationError};
use fledge_core::rollout::{self, Action, CanaryStatus, Command, Gates, Input, Phase, TimedReport};
use fledge_core::spec::Canary;
use futures::future::BoxFuture;
use std::time::Instant;

/// This interval's observation, read only once the hooks have answered (a load-test hook runs
/// before the interval is read). The outer `Err` says the metrics source cannot be built.
pub type Observe<'a> = BoxFuture<'a, Result<Result<Observation, ObservationError>, String>>;

/// Why a tick runs.
pub enum Trigger<'a> {
    /// The analysis interval is due: ask the hooks, read the metrics, judge.
    Interval(Observe<'a>),
    /// An operator command or a guard trip: no hooks, no metrics.
    Command(Command),
}

/// What a tick decided.
#[derive(Debug, Clone)]
pub struct Decided {
    /// The status before the tick.
    pub before: CanaryStatus,
    /// The new status, to persist before anything is acted on.
    pub status: CanaryStatus,
    /// What to do once it is persisted (move the weights, tell people).
    pub actions: Vec<Action>,
    /// The analysis judged in this tick, if metrics were judged.
    pub judged: Option<TimedReport>,
}

impl Decided {
    /// Whether the decision moves the weights.
    pub fn moves_weights(&self) -> bool {
        self.actions
            .iter()
            .any(|a| matches!(a, Action::SetWeight { .. }))
    }

    /// Whether the rollout ended (Promoted or RolledBack) in this tick.
    pub fn finished(&self) -> bool {
        self.status.phase.is_terminal() && !self.before.phase.is_terminal()
    }
}

/// How a mode tells people what a tick decided: progress lines on stdout (`fledge run`),
/// Kubernetes Events (`fledge controller`).
#[async_trait]
pub trait Announce: Send + Sync {
    async fn announce(&self, decided: &Decided);
}

/// One canary's rollout as the tick sees it: its spec, its webhooks with their last calls, the
/// dashboard's series and the self-metrics. Kept in memory for one rollout; none of it is
/// needed to continue a rollout correctly after a restart.
pub struct CanaryAnalysis {
    canary: Canary,
    /// The canary's name in self-metrics and logs (`namespace/name` in Kubernetes mode).
    label: String,
    webhooks: WebhookCaller,
    series: SharedSeries,
    telemetry: Telemetry,
}

impl CanaryAnalysis {
    /// The analysis of `canary`, named `label` in self-metrics and logs.
    pub fn new(canary: &Canary, label: &str, telemetry: Telemetry) -> Self {
        CanaryAnalysis {
            canary: canary.clone(),
            label: label.to_string(),
            webhooks: WebhookCaller::new(canary, telemetry.clone()).labelled(label),
            series: SharedSeries::default(),
            telemetry,
        }
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn telemetry(&self) -> &Telemetry {
        &self.telemetry
    }

    /// The observed intervals, for the dashboard.
    pub fn series(&self) -> Vec<IntervalPoint> {
        self.series.points()
    }

    /// The series itself, for the registry to read when the dashboard asks.
    pub fn series_handle(&self) -> SharedSeries {
        self.series.clone()
    }

    /// The spec's webhooks and their last calls.
    pub fn webhooks(&self) -> Vec<WebhookStatus> {
        self.webhooks.statuses()
    }

    /// Hooks → observe → decide → record. `Err` (already counted as a metrics error) when the
    /// metrics source cannot be built: nothing was decided.
    pub async fn decide(
        &mut self,
        status: &CanaryStatus,
        trigger: Trigger<'_>,
        now: DateTime<Utc>,
    ) -> Result<Decided, String> {
        let started = Instant::now();
        let (input, gates) = match trigger {
            Trigger::Interval(observe) => {
                let gates = self.webhooks.before_interval(status).await;
                let observation = match observe.await {
                    Ok(observation) => observation,
                    Err(message) => {
                        self.telemetry.record_error(&self.label, ErrorKind::Metrics);
                        return Err(message);
                    }
                };
                if matches!(&observation, Err(e) if *e != ObservationError::Baseline) {
                    self.telemetry.record_error(&self.label, ErrorKind::Metrics);
                }
                let input = Input {
                    observation: Some(observation),
                    command: None,
                };
                (input, gates)
            }
            Trigger::Command(command) => {
                let input = Input {
                    observation: None,
                    command: Some(command),
                };
                (input, Gates::default())
            }
        };
        let decided = self.step(status, &input, gates, now).await;
        self.record(&input, &decided, now, started);
        Ok(decided)
    }

    /// The state machine with the hooks' answers: a decision that would promote asks the
    /// confirm-promotion hooks first and, when one does not approve, is decided again with the
    /// promotion held (the machine stays pure). `promote --full` is an operator override and
    /// is never held.
    async fn step(
        &self,
        status: &CanaryStatus,
        input: &Input,
        gates: Gates,
        now: DateTime<Utc>,
    ) -> Decided {
        let spec = &self.canary.spec;
        let mut decision = rollout::step_with_gates(spec, status, input, &gates, now);
        let promoting = decision.status.phase == Phase::Promoted
            && status.phase != Phase::Promoted
            && input.command != Some(Command::PromoteFull);
        if promoting {
            if let Some(reason) = self.webhooks.confirm_promotion(status).await {
                let held = Gates {
                    promotion_held: Some(reason),
                    ..gates
                };
                decision = rollout::step_with_gates(spec, status, input, &held, now);
            }
        }
        let judged = match &input.observation {
            Some(Ok(_)) => decision
                .status
                .last_analysis
                .clone()
                .filter(|report| report.at >= now),
            _ => None,
        };
        Decided {
            before: status.clone(),
            status: decision.status,
            actions: decision.actions,
            judged,
        }
    }

    /// Self-metrics and the dashboard's series.
    fn record(&mut self, input: &Input, decided: &Decided, now: DateTime<Utc>, started: Instant) {
        if let Some(report) = &decided.judged {
            self.telemetry
                .record_analysis(&self.label, report, started.elapsed());
        }
        if let Some(observation) = &input.observation {
            match observation {
                Ok(observed) => self.series.record(
                    now,
                    self.canary.spec.analysis.interval.0.as_secs_f64(),
                    decided.before.canary_weight,
                    decided.before.phase,
                    observed,
                    decided.judged.as_ref().map(|r| r.report.verdict),
                ),
                Err(_) => self.series.skip(now),
            }
        }
        self.telemetry
            .record_decisions(&self.label, &decided.actions);
        self.telemetry.observe_status(&self.label, &decided.status);
    }

    /// Tell people (the mode's `announce`) and the event webhooks (in the background) what was
    /// decided. Called once the new status is persisted.
    pub async fn notify(&mut self, decided: &Decided, announce: &dyn Announce) {
        announce.announce(decided).await;
        self.webhooks.notify(&decided.status, &decided.actions);
    }

    /// The post-rollout webhooks, once the rollout just ended and its final routes were
    /// applied (or tried: the hooks are told the outcome, not the routes' state).
    pub async fn finish(&self, decided: &Decided) {
        if decided.finished() {
            self.webhooks.post_rollout(&decided.status).await;
        }
    }

    /// Wait for event notifications still in flight (each is bounded by its own timeout).
    /// Ask the `confirm-rollout` hooks (a new revision of a workload waits for them).
    pub async fn confirm_rollout(&self, status: &CanaryStatus) -> Result<(), String> {
        self.webhooks.confirm_rollout(status).await
    }

    /// Call the `post-rollout` hooks now: for a workload the release ends when the target is
    /// back at 0 replicas, not when the state machine finishes, so its reconciler calls this
    /// instead of relying on [`CanaryAnalysis::finish`].
    pub async fn post_rollout(&self, status: &CanaryStatus) {
        self.webhooks.post_rollout(status).await;
    }

    pub async fn drain(&mut self) {
        self.webhooks.drain().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fledge_core::contract::ResponseClass;
    use fledge_core::observe::{LatencyHistogram, SubsetTraffic};
    use fledge_core::rollout::EventReason;
    use fledge_testkit::http::{FakeEndpoint, Reply};
    use std::sync::Mutex;

    fn canary(webhooks: &str) -> Canary {
        let yaml = format!(
            "apiVersion: fledge.dev/v1alpha1
kind: Canary
metadata: {{name: app}}
spec:
  service: app
  stable: {{subset: stable}}
  canary: {{subset: canary}}
  metricsSource: {{envoyAdmin: {{urls: [\"http://127.0.0.1:9901\"]}}}}
  router:
    envoyRds: {{path: /tmp/r.json, routeConfiguration: r, virtualHost: v, route: r, stableCluster: s, canaryCluster: c, adminUrl: \"http://127.0.0.1:9901\"}}
  analysis:
    interval: 10s
    minCanaryRequests: 10
    stepWeights: [50]
    metrics: [{{name: request-success-rate, thresholdRange: {{min: 99}}}}]
{webhooks}"
        );
        let canary: Canary = serde_yaml::from_str(&yaml).unwrap();
        canary.validate().unwrap();
        canary
    }

    fn traffic(ok: u64) -> SubsetTraffic {
        let mut traffic = SubsetTraffic {
            latency: LatencyHistogram {
                bounds_ms: vec![50.0],
                cumulative: vec![ok],
                count: ok,
                sum_ms: ok as f64,
            },
            ..SubsetTraffic::default()
        };
        traffic.add(ResponseClass::Success, ok);
        traffic
    }

    fn healthy() -> Result<Result<Observation, ObservationError>, String> {
        Ok(Ok(Observation {
            stable: traffic(400),
            canary: traffic(100),
            ..Observation::default()
        }))
    }

    fn at_last_step() -> CanaryStatus {
        CanaryStatus {
            phase: Phase::Progressing,
            canary_weight: 50,
            ..CanaryStatus::default()
        }
    }

    fn now() -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000, 0).unwrap()
    }

    fn metrics_errors(analysis: &CanaryAnalysis) -> Option<String> {
        analysis
            .telemetry()
            .encode()
            .unwrap()
            .lines()
            .find(|l| l.starts_with("fledge_reconcile_errors_total{") && l.contains("metrics"))
            .map(str::to_string)
    }

    #[tokio::test]
    async fn an_interval_judges_and_records_a_baseline_only_advances_time() {
        let mut analysis = CanaryAnalysis::new(&canary(""), "shop/app", Telemetry::new());
        let baseline = Trigger::Interval(Box::pin(async { Ok(Err(ObservationError::Baseline)) }));
        let decided = analysis
            .decide(&at_last_step(), baseline, now())
            .await
            .unwrap();
        assert_eq!(decided.judged, None);
        assert!(analysis.series().is_empty());
        assert_eq!(metrics_errors(&analysis), None, "a baseline is no error");

        let interval = Trigger::Interval(Box::pin(async { healthy() }));
        let decided = analysis
            .decide(&at_last_step(), interval, now())
            .await
            .unwrap();
        let judged = decided.judged.clone().expect("judged");
        assert_eq!(judged.report.canary_requests, 100);
        assert_eq!(decided.status.phase, Phase::Promoted);
        assert!(decided.finished() && decided.moves_weights());
        assert_eq!(analysis.series().len(), 1);
        assert_eq!(analysis.series()[0].canary_weight, 50);
    }

    #[tokio::test]
    async fn a_source_that_cannot_be_built_decides_nothing_and_counts_an_error() {
        let mut analysis = CanaryAnalysis::new(&canary(""), "shop/app", Telemetry::new());
        let broken = Trigger::Interval(Box::pin(async { Err("no such host".to_string()) }));
        let error = analysis
            .decide(&at_last_step(), broken, now())
            .await
            .unwrap_err();
        assert_eq!(error, "no such host");
        assert!(metrics_errors(&analysis).is_some_and(|l| l.ends_with(" 1")));
    }

    #[tokio::test]
    async fn a_command_needs_no_hooks_and_no_metrics() {
        // A hook that would fail every call: a command does not ask it.
        let hooks = "  webhooks: [{name: load, type: rollout, url: \"http://127.0.0.1:9/x\"}]\n";
        let mut analysis = CanaryAnalysis::new(&canary(hooks), "app", Telemetry::new());
        let decided = analysis
            .decide(&at_last_step(), Trigger::Command(Command::Abort), now())
            .await
            .unwrap();
        assert_eq!(decided.status.phase, Phase::RolledBack);
        assert!(decided.actions.iter().any(|a| matches!(
            a,
            Action::Event {
                reason: EventReason::RollbackTriggered,
                ..
            }
        )));
        assert!(analysis.webhooks()[0].last_call.is_none());
    }

    /// Announces into a list, like progress lines or Events would.
    #[derive(Default)]
    struct Recorded(Mutex<Vec<String>>);

    #[async_trait]
    impl Announce for Recorded {
        async fn announce(&self, decided: &Decided) {
            self.0
                .lock()
                .unwrap()
                .push(format!("{:?}", decided.status.phase));
        }
    }

    #[tokio::test]
    async fn a_confirm_promotion_hook_that_says_no_holds_the_promotion() {
        let approver = FakeEndpoint::start_with_fallback(|_| Reply::status(403))
            .await
            .unwrap();
        let address = approver.url();
        let hooks = format!(
            "  webhooks: [{{name: approve, type: confirm-promotion, url: \"{address}/\"}}]\n"
        );
        let mut analysis = CanaryAnalysis::new(&canary(&hooks), "app", Telemetry::new());

        let interval = Trigger::Interval(Box::pin(async { healthy() }));
        let decided = analysis
            .decide(&at_last_step(), interval, now())
            .await
            .unwrap();
        assert_ne!(
            decided.status.phase,
            Phase::Promoted,
            "{:?}",
            decided.status
        );
        assert!(
            decided.status.message.contains("confirm-promotion"),
            "{}",
            decided.status.message
        );
        assert_eq!(approver.requests().len(), 1);
        let announced = Recorded::default();
        analysis.notify(&decided, &announced).await;
        assert_eq!(announced.0.lock().unwrap().len(), 1);

        // `promote --full` is an operator override: not held, and the hook is not asked.
        let decided = analysis
            .decide(
                &at_last_step(),
                Trigger::Command(Command::PromoteFull),
                now(),
            )
            .await
            .unwrap();
        assert_eq!(decided.status.phase, Phase::Promoted);
        assert_eq!(approver.requests().len(), 1);
    }
}
