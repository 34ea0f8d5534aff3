//! The rollout state machine: `step(spec, status, input, now) -> (new status, actions)`.
//!
//! It never sleeps, never does I/O and takes the clock as an argument, so the controller, the
//! tests and simulations run the same decisions. The caller (the controller) is level-triggered:
//! it makes the traffic router match `status.canary_weight`, persists the status, and calls
//! [`step`] again once per analysis interval with a fresh observation (or with only a command
//! when an operator asks for something).
//!
//! ```text
//! Initializing ─▶ Progressing ⇄ Halted (no data / metrics down: never promotes)
//!                    │   ⇅
//!                    │ Paused (indefinite pause, waits for a promote request)
//!                    ├─▶ Promoted   (last step passed: 100% canary)
//!                    └─▶ RolledBack (failed checks reached the threshold, or aborted: 0% canary)
//! ```

use crate::analysis::{evaluate, AnalysisReport, AnalysisState, Verdict};
use crate::observe::{Observation, ObservationError};
use crate::spec::{CanarySpec, Step};
use crate::warning::Warning;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Most recent transitions kept in the status.
pub const HISTORY_LIMIT: usize = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Phase {
    #[default]
    Initializing,
    Progressing,
    /// Waiting at an indefinite pause for a promote request.
    Paused,
    /// No usable data (no canary traffic, metrics unavailable): nothing advances until data
    /// returns.
    Halted,
    Promoted,
    RolledBack,
}

impl Phase {
    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Promoted | Phase::RolledBack)
    }
}

/// One entry of the status history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Transition {
    pub at: DateTime<Utc>,
    pub phase: Phase,
    pub canary_weight: u8,
    pub step: usize,
    pub reason: String,
}

/// The last analysis and when it ran.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TimedReport {
    pub at: DateTime<Utc>,
    /// False when the step is before `startingStep`: shown, but not acted on.
    pub enforced: bool,
    #[serde(flatten)]
    pub report: AnalysisReport,
}

/// Everything needed to continue a rollout after a restart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
// Every field has a default when read: a status written by an older version (without a newer
// field) must stay readable, or one old Canary object would stop the controller's watch.
#[serde(rename_all = "camelCase", default)]
pub struct CanaryStatus {
    pub phase: Phase,
    /// The weight (percent) the canary should receive; the controller makes the router match.
    pub canary_weight: u8,
    /// Index of the current step in the plan (`AnalysisSpec::plan`).
    pub step: usize,
    pub step_started_at: Option<DateTime<Utc>>,
    /// Passing analyses at the current step.
    pub step_passed_checks: u32,
    /// Failed analyses since the rollout started.
    pub failed_checks: u32,
    pub started_at: Option<DateTime<Utc>>,
    /// The latest reason, in one line.
    pub message: String,
    pub last_analysis: Option<TimedReport>,
    pub history: Vec<Transition>,
    /// Accumulated evidence of the sequential tests and burn-rate windows.
    #[serde(default)]
    pub analysis_state: AnalysisState,
    /// Consecutive intervals whose metrics could not be read.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub metrics_failures: u32,
    /// Set by a `Pause` command until `Resume`: nothing advances.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused_by_operator: bool,
    /// What is not checked right now, each with the field and the fix: the spec's own
    /// (`unchecked: true`, ...) and the last analysis' (latency not compared for lack of
    /// traffic, ...). Each is announced by an event when it appears.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<Warning>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl CanaryStatus {
    /// The status a new rollout of the same canary starts from (a changed spec, or a new
    /// release named by the rollout annotation): everything starts afresh except the decision
    /// history, which keeps the earlier rollouts and records why this one started.
    pub fn next_rollout(&self, now: DateTime<Utc>, reason: String) -> CanaryStatus {
        let mut history = self.history.clone();
        history.push(Transition {
            at: now,
            phase: Phase::Initializing,
            canary_weight: 0,
            step: 0,
            reason: reason.clone(),
        });
        let excess = history.len().saturating_sub(HISTORY_LIMIT);
        history.drain(..excess);
        CanaryStatus {
            message: reason,
            history,
            ..CanaryStatus::default()
        }
    }
}

/// A request from an operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Command {
    /// Continue past an indefinite pause.
    Promote,
    /// Skip the remaining steps and promote now (an operator override: no analysis).
    PromoteFull,
    /// Roll back now.
    Abort,
    /// Hold at the current step until resumed (analysis keeps running and can still roll back).
    Pause,
    /// Undo a pause.
    Resume,
    /// Start a rolled-back rollout again from its first step (fresh evidence, history kept).
    Retry,
    /// Not from an operator: the controller saw the filter's data-plane guard tripped at
    /// `tripped_at` (the gateway's clock). Rolls back a running rollout whose canary gets
    /// traffic; a trip from before this rollout started is ignored.
    GuardTripped { tripped_at: DateTime<Utc> },
}

/// What one call of [`step`] is given besides the spec, status and time.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Input {
    /// `None` for a call that carries only a command (no analysis happens).
    pub observation: Option<Result<Observation, ObservationError>>,
    pub command: Option<Command>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventReason {
    Started,
    CanaryAdvanced,
    Paused,
    Resumed,
    Halted,
    AnalysisFailed,
    Promoted,
    RollbackTriggered,
    /// A warning appeared: a check does not run (see [`CanaryStatus::warnings`]).
    Warning,
}

/// Side effects the caller performs after persisting the new status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Action {
    /// Route this percentage to the canary (the rest to stable).
    SetWeight { canary: u8 },
    /// Tell humans (log line, Kubernetes Event, webhook).
    Event {
        reason: EventReason,
        warning: bool,
        message: String,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub status: CanaryStatus,
    pub actions: Vec<Action>,
}

/// How this call's observation was judged, as far as advancing is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Judgement {
    /// No observation in this call (command only, or only a baseline so far).
    None,
    /// Metrics judged and passed — or the step is before `startingStep` (nothing to enforce).
    Pass,
    /// Passed, but the evidence the spec asks for before advancing is not there yet.
    Hold,
    Fail,
    NoData,
}

/// What the caller learnt from webhooks before this call. Pure data: the state machine never
/// calls out; the controller asks the hooks and passes the answers in. `Gates::default()` means
/// "no webhooks" (every gate open).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Gates {
    /// A pre-rollout (before the first step) or rollout (each interval) webhook failed: the
    /// call counts one failed check (at most one per call) and nothing advances.
    pub hook_failure: Option<String>,
    /// A confirm-promotion webhook did not approve: the rollout holds at its last step instead
    /// of promoting; analysis continues. `PromoteFull` (an operator override) is not held.
    pub promotion_held: Option<String>,
    /// A rollback webhook asked for a rollback.
    pub rollback_requested: Option<String>,
}

/// The cause of a failed metrics read, first: `metrics source unreachable (down or too slow): ...`.
fn source_problem(err: &ObservationError) -> String {
    match err {
        ObservationError::Unreachable(detail) => {
            format!("metrics source unreachable (down or too slow): {detail}")
        }
        ObservationError::Malformed(detail) => {
            format!("metrics source returned malformed data: {detail}")
        }
        ObservationError::Baseline => err.to_string(),
    }
}

/// Advance the rollout by one call. Pure: the same arguments always give the same decision.
pub fn step(
    spec: &CanarySpec,
    status: &CanaryStatus,
    input: &Input,
    now: DateTime<Utc>,
) -> Decision {
    step_with_gates(spec, status, input, &Gates::default(), now)
}

/// [`step`] with the answers of the spec's webhooks. Pure like [`step`].
pub fn step_with_gates(
    spec: &CanarySpec,
    status: &CanaryStatus,
    input: &Input,
    gates: &Gates,
    now: DateTime<Utc>,
) -> Decision {
    let mut machine = Machine {
        spec,
        plan: spec.analysis.plan(),
        status: status.clone(),
        actions: Vec::new(),
        now,
        gates,
    };
    machine.run(input);
    machine.refresh_warnings();
    Decision {
        status: machine.status,
        actions: machine.actions,
    }
}

struct Machine<'a> {
    spec: &'a CanarySpec,
    plan: Vec<Step>,
    status: CanaryStatus,
    actions: Vec<Action>,
    now: DateTime<Utc>,
    gates: &'a Gates,
}

impl Machine<'_> {
    fn run(&mut self, input: &Input) {
        if input.command == Some(Command::Retry) {
            if self.status.phase == Phase::RolledBack {
                self.retry();
            }
            return;
        }
        if self.status.phase.is_terminal() {
            return;
        }
        match input.command {
            Some(Command::GuardTripped { tripped_at }) => {
                self.guard_tripped(tripped_at);
                return;
            }
            Some(Command::Abort) => {
                self.roll_back("aborted by operator".to_string());
                return;
            }
            Some(Command::PromoteFull) => {
                self.promote(
                    "promoted by operator: remaining steps skipped, all traffic goes to the canary",
                );
                return;
            }
            Some(Command::Pause) if self.status.phase != Phase::Initializing => self.pause(),
            Some(Command::Resume) => self.resume(),
            _ => {}
        }
        if let Some(reason) = &self.gates.rollback_requested {
            self.roll_back(format!("rolling back: {reason}"));
            return;
        }
        if self.status.phase == Phase::Initializing {
            if let Some(reason) = &self.gates.hook_failure {
                self.count_failure("check", reason);
                return;
            }
            self.status.started_at = Some(self.now);
            self.event(EventReason::Started, false, "rollout started".into());
            self.enter_step(0);
            return;
        }

        let judgement = match &input.observation {
            None | Some(Err(ObservationError::Baseline)) => Judgement::None,
            Some(Err(err)) => {
                self.status.metrics_failures += 1;
                let (failures, limit) = (
                    self.status.metrics_failures,
                    self.spec.analysis.metrics_failure_limit,
                );
                let cause = source_problem(err);
                if failures >= limit {
                    self.halt(format!(
                        "{cause}; no metrics for {failures} intervals in a row (metricsFailureLimit {limit})"
                    ));
                } else {
                    // A blip: wait, but never advance on missing data.
                    self.status.message = format!(
                        "{cause}; not judging this interval ({failures} of {limit} failed reads before halting)"
                    );
                }
                Judgement::NoData
            }
            Some(Ok(observation)) => {
                self.status.metrics_failures = 0;
                self.judge(observation)
            }
        };
        if self.status.phase.is_terminal() {
            return;
        }
        let judgement = match &self.gates.hook_failure {
            // One failed check per call: a failed interval already counted one.
            Some(reason) if judgement != Judgement::Fail => {
                self.count_failure("check", reason);
                if self.status.phase.is_terminal() {
                    return;
                }
                Judgement::Fail
            }
            _ => judgement,
        };
        if matches!(judgement, Judgement::Pass | Judgement::Hold)
            && self.status.phase == Phase::Halted
        {
            let phase = self.phase_for_current_step();
            self.transition(phase, "data is back, resuming".into());
            self.event(EventReason::Resumed, false, self.status.message.clone());
        }
        if self.ready_to_advance(judgement, input.command == Some(Command::Promote)) {
            let next = self.status.step + 1;
            match &self.gates.promotion_held {
                Some(reason) if next >= self.plan.len() => self.hold_promotion(reason),
                _ => self.enter_step(next),
            }
        }
    }

    /// The data-plane guard tripped: roll back at once (the filter already sends the canary's
    /// traffic to stable), unless the canary gets no traffic from this rollout or the trip is
    /// older than the rollout.
    fn guard_tripped(&mut self, tripped_at: DateTime<Utc>) {
        let started = match self.status.started_at {
            Some(started) if self.status.phase != Phase::Initializing => started,
            _ => return,
        };
        if self.status.canary_weight == 0 || tripped_at < started {
            return;
        }
        let ceiling = match &self.spec.analysis.guard {
            Some(guard) => format!(
                " ({:.0}% or more of at least {} canary requests failed within {})",
                guard.max_error_ratio * 100.0,
                guard.min_requests,
                guard.window
            ),
            None => String::new(),
        };
        self.status.failed_checks += 1;
        self.roll_back(format!(
            "rolling back: the data-plane guard tripped at {}{ceiling}; the gateway has sent the canary's traffic to stable since then",
            tripped_at.format("%H:%M:%S UTC")
        ));
    }

    /// One more failed check (`what`: "check" for a failed pre-rollout / rollout webhook,
    /// "analysis" for a failed interval): roll back once the threshold is reached, otherwise say
    /// how close it is.
    fn count_failure(&mut self, what: &str, reason: &str) {
        self.status.failed_checks += 1;
        let threshold = self.spec.analysis.rollback_threshold();
        let failed = self.status.failed_checks;
        if failed >= threshold {
            self.roll_back(format!(
                "rolling back: failed checks threshold reached {failed}/{threshold}: {reason}"
            ));
        } else {
            self.status.message = format!("{what} failed ({failed}/{threshold}): {reason}");
            self.event(
                EventReason::AnalysisFailed,
                true,
                self.status.message.clone(),
            );
        }
    }

    /// Ready to promote, but a confirm-promotion gate is closed: stay at the last step.
    fn hold_promotion(&mut self, reason: &str) {
        let message = format!("promotion held at {}%: {reason}", self.status.canary_weight);
        if self.status.message != message {
            self.status.message = message;
            self.event(EventReason::Paused, false, self.status.message.clone());
        }
    }

    fn judge(&mut self, observation: &Observation) -> Judgement {
        let report = evaluate(
            &self.spec.analysis,
            &mut self.status.analysis_state,
            observation,
            self.now,
        );
        let enforced = self.status.step >= self.spec.analysis.starting_step;
        let verdict = report.verdict;
        let reason = report.reason.clone();
        let decisive = report.decisive_failure().map(|c| c.reason.clone());
        let hold = report.hold.clone();
        self.status.last_analysis = Some(TimedReport {
            at: self.now,
            enforced,
            report,
        });
        if !enforced {
            return Judgement::Pass;
        }
        if let Some(reason) = decisive {
            // A sequential test controls its own false-rollback rate: no need to wait for
            // `threshold` failed intervals.
            self.status.failed_checks += 1;
            self.roll_back(format!("rolling back: {reason}"));
            return Judgement::Fail;
        }
        match verdict {
            Verdict::Pass => {
                self.status.step_passed_checks += 1;
                match hold {
                    Some(why) => {
                        self.status.message =
                            format!("holding at {}%: {why}", self.status.canary_weight);
                        Judgement::Hold
                    }
                    None => Judgement::Pass,
                }
            }
            Verdict::NoData => {
                self.halt(reason);
                Judgement::NoData
            }
            Verdict::Fail => {
                self.count_failure("analysis", &reason);
                Judgement::Fail
            }
        }
    }

    fn ready_to_advance(&self, judgement: Judgement, promote_requested: bool) -> bool {
        if self.status.paused_by_operator {
            return false;
        }
        if self.status.phase == Phase::Halted && !promote_requested {
            return false;
        }
        match self.plan.get(self.status.step) {
            // Hold each weight for at least one judged interval.
            Some(Step::SetWeight(_)) => judgement == Judgement::Pass,
            Some(Step::Pause(pause)) => match pause.duration {
                Some(duration) => {
                    let started = self.status.step_started_at.unwrap_or(self.now);
                    judgement == Judgement::Pass && self.now - started >= duration.to_chrono()
                }
                // A human decides; a failing interval still blocks the move.
                None => promote_requested && judgement != Judgement::Fail,
            },
            None => judgement == Judgement::Pass,
        }
    }

    fn enter_step(&mut self, index: usize) {
        self.status.step = index;
        self.status.step_started_at = Some(self.now);
        self.status.step_passed_checks = 0;
        match self.plan.get(index).cloned() {
            None => self.promote("promotion completed: all traffic goes to the canary"),
            Some(Step::SetWeight(weight)) => {
                self.set_weight(weight);
                self.transition(
                    Phase::Progressing,
                    format!(
                        "advance canary weight to {weight}% (step {}/{})",
                        index + 1,
                        self.plan.len()
                    ),
                );
                self.event(
                    EventReason::CanaryAdvanced,
                    false,
                    self.status.message.clone(),
                );
            }
            Some(Step::Pause(pause)) => {
                let weight = self.status.canary_weight;
                match pause.duration {
                    Some(duration) => self.transition(
                        Phase::Progressing,
                        format!("pausing {duration} at {weight}% (step {}/{})", index + 1, self.plan.len()),
                    ),
                    None => self.transition(
                        Phase::Paused,
                        format!(
                            "paused at {weight}% until promoted (step {}/{}); `fledge promote NAME` continues (add `--kubernetes` for a Canary object)",
                            index + 1,
                            self.plan.len()
                        ),
                    ),
                }
                self.event(EventReason::Paused, false, self.status.message.clone());
            }
        }
    }

    fn phase_for_current_step(&self) -> Phase {
        if self.status.paused_by_operator {
            return Phase::Paused;
        }
        match self.plan.get(self.status.step) {
            Some(Step::Pause(pause)) if pause.duration.is_none() => Phase::Paused,
            _ => Phase::Progressing,
        }
    }

    fn promote(&mut self, reason: &str) {
        self.set_weight(100);
        self.transition(Phase::Promoted, reason.into());
        self.event(EventReason::Promoted, false, self.status.message.clone());
    }

    fn pause(&mut self) {
        if self.status.paused_by_operator {
            return;
        }
        self.status.paused_by_operator = true;
        if self.status.phase != Phase::Halted {
            self.transition(
                Phase::Paused,
                format!("paused by operator at {}%", self.status.canary_weight),
            );
        }
        self.event(EventReason::Paused, false, "paused by operator".into());
    }

    fn resume(&mut self) {
        if !self.status.paused_by_operator {
            return;
        }
        self.status.paused_by_operator = false;
        if self.status.phase != Phase::Halted {
            let phase = self.phase_for_current_step();
            self.transition(phase, "resumed by operator".into());
        }
        self.event(EventReason::Resumed, false, "resumed by operator".into());
    }

    fn retry(&mut self) {
        let history = std::mem::take(&mut self.status.history);
        self.status = CanaryStatus {
            history,
            ..CanaryStatus::default()
        };
        self.transition(
            Phase::Initializing,
            "retry requested by operator: starting again from the first step".into(),
        );
        self.event(EventReason::Started, false, self.status.message.clone());
    }

    fn roll_back(&mut self, reason: String) {
        self.set_weight(0);
        self.transition(Phase::RolledBack, reason);
        self.event(
            EventReason::RollbackTriggered,
            true,
            self.status.message.clone(),
        );
    }

    fn halt(&mut self, reason: String) {
        let first = self.status.phase != Phase::Halted;
        if first {
            self.transition(Phase::Halted, format!("halt advancement: {reason}"));
            self.event(EventReason::Halted, true, self.status.message.clone());
        } else {
            self.status.message = format!("halt advancement: {reason}");
        }
    }

    /// Recompute the active warnings (the spec's, the last analysis', and checks not enforced
    /// before `startingStep`) and announce each one that was not active before.
    fn refresh_warnings(&mut self) {
        let mut warnings = crate::warning::check_warnings(&self.spec.analysis);
        let starting_step = self.spec.analysis.starting_step;
        if self.status.step < starting_step && !self.status.phase.is_terminal() {
            warnings.push(crate::warning::not_enforced(starting_step));
        }
        if let Some(report) = &self.status.last_analysis {
            for warning in &report.report.warnings {
                if !warnings.contains(warning) {
                    warnings.push(warning.clone());
                }
            }
        }
        let new: Vec<String> = warnings
            .iter()
            .filter(|w| {
                !self
                    .status
                    .warnings
                    .iter()
                    .any(|old| old.code == w.code && old.field == w.field)
            })
            .map(|w| format!("warning: {w}"))
            .collect();
        self.status.warnings = warnings;
        for message in new {
            self.event(EventReason::Warning, true, message);
        }
    }

    fn set_weight(&mut self, weight: u8) {
        if self.status.canary_weight != weight || self.actions.is_empty() {
            self.status.canary_weight = weight;
            self.actions.push(Action::SetWeight { canary: weight });
        }
    }

    fn transition(&mut self, phase: Phase, reason: String) {
        self.status.phase = phase;
        self.status.message = reason.clone();
        self.status.history.push(Transition {
            at: self.now,
            phase,
            canary_weight: self.status.canary_weight,
            step: self.status.step,
            reason,
        });
        let excess = self.status.history.len().saturating_sub(HISTORY_LIMIT);
        self.status.history.drain(..excess);
    }

    fn event(&mut self, reason: EventReason, warning: bool, message: String) {
        self.actions.push(Action::Event {
            reason,
            warning,
            message,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::ResponseClass;
    use crate::duration::HumanDuration;
    use crate::observe::{LatencyHistogram, SubsetTraffic};
    use crate::spec::tests::example;
    use crate::spec::StepSpec;
    use chrono::TimeZone;

    fn t(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_700_000_000 + secs, 0).unwrap()
    }

    fn traffic(ok: u64, err: u64) -> SubsetTraffic {
        let total = ok + err;
        let mut tr = SubsetTraffic {
            latency: LatencyHistogram {
                bounds_ms: vec![50.0, 500.0],
                cumulative: vec![total, total],
                count: total,
                sum_ms: 0.0,
            },
            ..Default::default()
        };
        tr.add(ResponseClass::Success, ok);
        tr.add(ResponseClass::ServerError, err);
        tr
    }

    fn healthy() -> Input {
        Input {
            observation: Some(Ok(Observation {
                stable: traffic(500, 0),
                canary: traffic(100, 0),
                ..Default::default()
            })),
            command: None,
        }
    }
    fn failing() -> Input {
        Input {
            observation: Some(Ok(Observation {
                stable: traffic(500, 0),
                canary: traffic(80, 20),
                ..Default::default()
            })),
            command: None,
        }
    }
    fn idle() -> Input {
        Input {
            observation: Some(Ok(Observation {
                stable: traffic(500, 0),
                canary: traffic(2, 0),
                ..Default::default()
            })),
            command: None,
        }
    }
    fn outage() -> Input {
        Input {
            observation: Some(Err(ObservationError::Unreachable(
                "http://127.0.0.1:1: refused".into(),
            ))),
            command: None,
        }
    }
    fn baseline() -> Input {
        Input {
            observation: Some(Err(ObservationError::Baseline)),
            command: None,
        }
    }
    fn command(c: Command) -> Input {
        Input {
            observation: None,
            command: Some(c),
        }
    }

    /// A spec with steps 20%, 40%, 60% (threshold 2, interval 10s, min 10 canary requests).
    fn simple_spec() -> CanarySpec {
        let mut spec = example().spec;
        spec.analysis.steps = Some(vec![
            StepSpec::set_weight(20),
            StepSpec::set_weight(40),
            StepSpec::set_weight(60),
        ]);
        spec
    }

    /// Run inputs one per 10 s, returning (phase, weight, step) after each.
    fn drive(spec: &CanarySpec, inputs: &[Input]) -> (CanaryStatus, Vec<(Phase, u8, usize)>) {
        let mut status = CanaryStatus::default();
        let mut trace = Vec::new();
        for (i, input) in inputs.iter().enumerate() {
            status = step(spec, &status, input, t(10 * i as i64)).status;
            trace.push((status.phase, status.canary_weight, status.step));
        }
        (status, trace)
    }

    use Phase::*;

    #[test]
    fn healthy_canary_walks_the_steps_and_promotes() {
        let spec = simple_spec();
        let (status, trace) = drive(&spec, &[baseline(), healthy(), healthy(), healthy()]);
        assert_eq!(
            trace,
            vec![
                (Progressing, 20, 0),
                (Progressing, 40, 1),
                (Progressing, 60, 2),
                (Promoted, 100, 3),
            ]
        );
        assert_eq!(status.failed_checks, 0);
        let phases: Vec<Phase> = status.history.iter().map(|h| h.phase).collect();
        assert_eq!(
            phases,
            vec![Progressing, Progressing, Progressing, Promoted]
        );
    }

    #[test]
    fn a_baseline_tick_does_not_advance() {
        let spec = simple_spec();
        let (_, trace) = drive(&spec, &[baseline(), baseline(), healthy()]);
        assert_eq!(
            trace,
            vec![
                (Progressing, 20, 0),
                (Progressing, 20, 0),
                (Progressing, 40, 1)
            ]
        );
    }

    #[test]
    fn failed_checks_reach_threshold_and_roll_back() {
        let spec = simple_spec(); // threshold 2
        let (status, trace) = drive(
            &spec,
            &[baseline(), healthy(), failing(), healthy(), failing()],
        );
        assert_eq!(
            trace,
            vec![
                (Progressing, 20, 0),
                (Progressing, 40, 1),
                (Progressing, 40, 1),
                (Progressing, 60, 2),
                (RolledBack, 0, 2),
            ]
        );
        assert_eq!(status.failed_checks, 2);
        assert!(
            status
                .message
                .contains("failed checks threshold reached 2/2"),
            "{}",
            status.message
        );
        assert!(
            status.message.contains("success rate 80%"),
            "{}",
            status.message
        );
    }

    #[test]
    fn a_failed_interval_holds_the_weight() {
        let mut spec = simple_spec();
        spec.analysis.threshold = Some(5);
        let (status, trace) = drive(&spec, &[baseline(), failing(), failing(), healthy()]);
        assert_eq!(
            trace[1..],
            [
                (Progressing, 20, 0),
                (Progressing, 20, 0),
                (Progressing, 40, 1)
            ]
        );
        assert_eq!(status.failed_checks, 2);
    }

    #[test]
    fn no_traffic_halts_and_never_promotes() {
        let spec = simple_spec();
        let inputs: Vec<Input> = std::iter::once(baseline())
            .chain((0..20).map(|_| idle()))
            .collect();
        let (status, trace) = drive(&spec, &inputs);
        assert!(
            trace[1..].iter().all(|s| *s == (Halted, 20, 0)),
            "{trace:?}"
        );
        assert!(
            status.message.contains("canary receives no traffic"),
            "{}",
            status.message
        );
        assert_eq!(status.failed_checks, 0);
        // One Halted transition, not twenty.
        assert_eq!(
            status.history.iter().filter(|h| h.phase == Halted).count(),
            1
        );
    }

    #[test]
    fn metrics_outage_waits_then_halts_at_the_limit_then_resumes() {
        let spec = simple_spec(); // metricsFailureLimit 2 (default)
        let (status, trace) = drive(
            &spec,
            &[
                baseline(),
                outage(),
                healthy(),
                outage(),
                outage(),
                outage(),
                healthy(),
                healthy(),
            ],
        );
        assert_eq!(
            trace,
            vec![
                (Progressing, 20, 0),
                (Progressing, 20, 0), // a blip: no verdict, no advance
                (Progressing, 40, 1), // good data resets the count
                (Progressing, 40, 1),
                (Halted, 40, 1), // the second failure in a row halts
                (Halted, 40, 1),
                (Progressing, 60, 2),
                (Promoted, 100, 3),
            ]
        );
        assert!(status
            .history
            .iter()
            .any(|h| h.reason.contains("metrics source unreachable (down or too slow): http://127.0.0.1:1: refused; no metrics for 2 intervals in a row (metricsFailureLimit 2)")));
        assert!(status.history.iter().any(|h| h.reason.contains("resuming")));
    }

    #[test]
    fn analysis_before_starting_step_is_shown_but_not_enforced() {
        let mut spec = simple_spec();
        spec.analysis.starting_step = 2;
        let (status, trace) = drive(
            &spec,
            &[baseline(), failing(), idle(), failing(), failing()],
        );
        assert_eq!(
            trace,
            vec![
                (Progressing, 20, 0),
                (Progressing, 40, 1),
                (Progressing, 60, 2),
                (Progressing, 60, 2),
                (RolledBack, 0, 2),
            ]
        );
        assert_eq!(status.failed_checks, 2);
    }

    #[test]
    fn timed_pause_waits_for_its_duration() {
        let mut spec = simple_spec();
        spec.analysis.steps = Some(vec![
            StepSpec::set_weight(20),
            StepSpec::pause(Some(HumanDuration::from_secs(25))),
            StepSpec::set_weight(50),
        ]);
        // Entered the pause at t=10; 25 s later is t=35, so the tick at t=40 leaves it.
        let (_, trace) = drive(
            &spec,
            &[
                baseline(),
                healthy(),
                healthy(),
                healthy(),
                healthy(),
                healthy(),
            ],
        );
        assert_eq!(
            trace,
            vec![
                (Progressing, 20, 0),
                (Progressing, 20, 1),
                (Progressing, 20, 1),
                (Progressing, 20, 1),
                (Progressing, 50, 2),
                (Promoted, 100, 3),
            ]
        );
    }

    #[test]
    fn indefinite_pause_waits_for_promote_and_failures_still_count() {
        let mut spec = simple_spec();
        spec.analysis.steps = Some(vec![
            StepSpec::set_weight(20),
            StepSpec::pause(None),
            StepSpec::set_weight(50),
        ]);
        let (status, trace) = drive(
            &spec,
            &[
                baseline(),
                healthy(),
                healthy(),
                healthy(),
                failing(),
                command(Command::Promote),
                healthy(),
                healthy(),
            ],
        );
        assert_eq!(
            trace,
            vec![
                (Progressing, 20, 0),
                (Paused, 20, 1),
                (Paused, 20, 1),
                (Paused, 20, 1),
                (Paused, 20, 1),
                (Progressing, 50, 2),
                (Promoted, 100, 3),
                (Promoted, 100, 3),
            ]
        );
        assert_eq!(status.failed_checks, 1);
    }

    #[test]
    fn promote_does_not_skip_a_weight_step() {
        let spec = simple_spec();
        let (_, trace) = drive(&spec, &[baseline(), command(Command::Promote)]);
        assert_eq!(trace[1], (Progressing, 20, 0));
    }

    #[test]
    fn abort_rolls_back_from_any_live_phase() {
        let spec = simple_spec();
        let (status, trace) = drive(
            &spec,
            &[baseline(), idle(), command(Command::Abort), healthy()],
        );
        assert_eq!(trace[2..], [(RolledBack, 0, 0), (RolledBack, 0, 0)]);
        assert_eq!(status.message, "aborted by operator");
    }

    #[test]
    fn terminal_phases_ignore_everything() {
        let spec = simple_spec();
        for phase in [Promoted, RolledBack] {
            let status = CanaryStatus {
                phase,
                canary_weight: 55,
                ..Default::default()
            };
            for input in [healthy(), failing(), outage(), command(Command::Abort)] {
                let d = step(&spec, &status, &input, t(0));
                assert_eq!(d.status, status);
                assert!(d.actions.is_empty());
            }
        }
    }

    #[test]
    fn actions_carry_weights_and_events() {
        let spec = simple_spec();
        let d = step(&spec, &CanaryStatus::default(), &baseline(), t(0));
        assert!(d.actions.contains(&Action::SetWeight { canary: 20 }));
        assert!(d.actions.iter().any(|a| matches!(
            a,
            Action::Event {
                reason: EventReason::CanaryAdvanced,
                ..
            }
        )));
        let d2 = step(&spec, &d.status, &failing(), t(10));
        assert!(d2.actions.iter().any(|a| matches!(
            a,
            Action::Event {
                reason: EventReason::AnalysisFailed,
                warning: true,
                ..
            }
        )));
        assert!(!d2
            .actions
            .iter()
            .any(|a| matches!(a, Action::SetWeight { .. })));
    }

    #[test]
    fn step_is_deterministic_and_history_bounded() {
        let spec = simple_spec();
        let mut status = CanaryStatus::default();
        status = step(&spec, &status, &baseline(), t(0)).status;
        for i in 0..300 {
            let input = if i % 2 == 0 { idle() } else { outage() };
            let a = step(&spec, &status, &input, t(i));
            let b = step(&spec, &status, &input, t(i));
            assert_eq!(a, b);
            status = a.status;
            // Alternate halt reasons without data coming back: still one halt.
        }
        assert!(status.history.len() <= HISTORY_LIMIT);
        assert_eq!(status.phase, Halted);
    }

    #[test]
    fn a_sequential_rejection_rolls_back_without_waiting_for_the_threshold() {
        let mut spec = simple_spec();
        spec.analysis.metrics.clear();
        spec.analysis.threshold = Some(100);
        spec.analysis.compare_with_stable = Some(crate::spec::CompareSpec::default());
        let bad = Input {
            observation: Some(Ok(Observation {
                stable: traffic(495, 5),
                canary: traffic(80, 20),
                ..Default::default()
            })),
            command: None,
        };
        let mut inputs = vec![baseline()];
        inputs.extend((0..10).map(|_| bad.clone()));
        let (status, trace) = drive(&spec, &inputs);
        assert_eq!(status.phase, RolledBack, "{trace:?}");
        assert!(status.failed_checks < 10, "{}", status.failed_checks);
        assert!(
            status.message.contains("× stable (tolerance 1×): evidence"),
            "{}",
            status.message
        );
    }

    #[test]
    fn promotion_evidence_holds_the_weight_then_lets_it_advance() {
        let mut spec = simple_spec();
        spec.analysis.metrics.clear();
        spec.analysis.compare_with_stable = Some(crate::spec::CompareSpec {
            promotion_margin: Some(3.0),
            promotion_min_canary_requests: 1000,
            ..Default::default()
        });
        let even = Input {
            observation: Some(Ok(Observation {
                stable: traffic(490, 10),
                canary: traffic(490, 10),
                ..Default::default()
            })),
            command: None,
        };
        let mut status = step(&spec, &CanaryStatus::default(), &baseline(), t(0)).status;
        status = step(&spec, &status, &even, t(10)).status;
        assert_eq!((status.phase, status.canary_weight), (Progressing, 20));
        assert!(
            status
                .message
                .contains("holding at 20%: waiting for promotion evidence"),
            "{}",
            status.message
        );
        let mut advanced_at = None;
        for i in 2..40 {
            status = step(&spec, &status, &even, t(10 * i)).status;
            if status.canary_weight > 20 {
                advanced_at = Some(i);
                break;
            }
        }
        assert!(advanced_at.is_some(), "never advanced: {}", status.message);
    }

    #[test]
    fn analysis_state_survives_a_restart_through_serde() {
        let mut spec = simple_spec();
        spec.analysis.compare_with_stable = Some(crate::spec::CompareSpec::default());
        let mut status = step(&spec, &CanaryStatus::default(), &baseline(), t(0)).status;
        status = step(&spec, &status, &healthy(), t(10)).status;
        let saved = serde_json::to_string(&status).unwrap();
        let restored: CanaryStatus = serde_json::from_str(&saved).unwrap();
        assert_eq!(restored, status);
        assert_eq!(
            restored
                .analysis_state
                .errors
                .as_ref()
                .unwrap()
                .canary_requests,
            100
        );
    }

    #[test]
    fn operator_pause_resume_promote_full_and_retry() {
        let spec = simple_spec();
        let (mut status, _) = drive(&spec, &[baseline(), healthy()]);
        assert_eq!((status.phase, status.canary_weight), (Progressing, 40));
        status = step(&spec, &status, &command(Command::Pause), t(100)).status;
        assert_eq!(status.phase, Paused);
        assert!(status.paused_by_operator);
        for i in 0..3 {
            status = step(&spec, &status, &healthy(), t(110 + i)).status;
        }
        assert_eq!(
            (status.phase, status.canary_weight),
            (Paused, 40),
            "paused: no advance"
        );
        status = step(&spec, &status, &command(Command::Resume), t(120)).status;
        assert_eq!(status.phase, Progressing);
        status = step(&spec, &status, &healthy(), t(130)).status;
        assert_eq!(status.canary_weight, 60);
        status = step(&spec, &status, &command(Command::PromoteFull), t(140)).status;
        assert_eq!((status.phase, status.canary_weight), (Promoted, 100));
        assert!(status.message.contains("promoted by operator"));
        // Retry only restarts a rolled-back rollout.
        let same = step(&spec, &status, &command(Command::Retry), t(150)).status;
        assert_eq!(same, status);
        let (rolled, _) = drive(&spec, &[baseline(), command(Command::Abort)]);
        let retried = step(&spec, &rolled, &command(Command::Retry), t(200)).status;
        assert_eq!(
            (retried.phase, retried.canary_weight, retried.failed_checks),
            (Initializing, 0, 0)
        );
        assert!(retried.history.len() > rolled.history.len());
        let again = step(&spec, &retried, &baseline(), t(210)).status;
        assert_eq!((again.phase, again.canary_weight), (Progressing, 20));
    }

    #[test]
    fn a_next_rollout_starts_afresh_but_keeps_the_decision_history() {
        let spec = simple_spec();
        let (promoted, _) = drive(&spec, &[baseline(), command(Command::PromoteFull)]);
        assert_eq!(promoted.phase, Promoted);
        let next = promoted.next_rollout(t(300), "new rollout: v3".into());
        assert_eq!(
            (
                next.phase,
                next.canary_weight,
                next.step,
                next.failed_checks
            ),
            (Initializing, 0, 0, 0)
        );
        assert_eq!(
            (next.started_at, next.last_analysis.is_none()),
            (None, true)
        );
        assert_eq!(next.history.len(), promoted.history.len() + 1);
        assert_eq!(next.history[..promoted.history.len()], promoted.history[..]);
        let last = next.history.last().expect("an entry");
        assert_eq!(
            (last.at, last.phase, last.reason.as_str()),
            (t(300), Initializing, "new rollout: v3")
        );
        let started = step(&spec, &next, &baseline(), t(310)).status;
        assert_eq!((started.phase, started.canary_weight), (Progressing, 20));
        let mut long = promoted.clone();
        long.history = vec![promoted.history[0].clone(); HISTORY_LIMIT];
        assert_eq!(
            long.next_rollout(t(1), "x".into()).history.len(),
            HISTORY_LIMIT
        );
    }

    #[test]
    fn a_paused_rollout_still_rolls_back_on_failures() {
        let spec = simple_spec(); // threshold 2
        let (mut status, _) = drive(&spec, &[baseline()]);
        status = step(&spec, &status, &command(Command::Pause), t(5)).status;
        status = step(&spec, &status, &failing(), t(10)).status;
        status = step(&spec, &status, &failing(), t(20)).status;
        assert_eq!(status.phase, RolledBack);
    }

    /// Drive with one gate set per input.
    fn drive_gated(spec: &CanarySpec, inputs: &[(Input, Gates)]) -> Vec<(Phase, u8, usize, u32)> {
        let mut status = CanaryStatus::default();
        let mut trace = Vec::new();
        for (i, (input, gates)) in inputs.iter().enumerate() {
            status = step_with_gates(spec, &status, input, gates, t(10 * i as i64)).status;
            trace.push((
                status.phase,
                status.canary_weight,
                status.step,
                status.failed_checks,
            ));
        }
        trace
    }

    fn open() -> Gates {
        Gates::default()
    }
    fn held() -> Gates {
        Gates {
            promotion_held: Some("confirm-promotion webhook \"approve\" answered 403".into()),
            ..Gates::default()
        }
    }
    fn hook_failed() -> Gates {
        Gates {
            hook_failure: Some("rollout webhook \"load-test\" failed: timed out".into()),
            ..Gates::default()
        }
    }

    #[test]
    fn webhook_gates_as_a_table() {
        let spec = simple_spec(); // 20 → 40 → 60, threshold 2
        type Case = (
            &'static str,
            Vec<(Input, Gates)>,
            Vec<(Phase, u8, usize, u32)>,
        );
        let cases: Vec<Case> = vec![
            (
                "a closed confirm-promotion gate holds at the last step; opening it promotes",
                vec![
                    (baseline(), open()),
                    (healthy(), held()),
                    (healthy(), held()),
                    (healthy(), held()),
                    (healthy(), held()),
                    (healthy(), open()),
                ],
                vec![
                    (Progressing, 20, 0, 0),
                    (Progressing, 40, 1, 0),
                    (Progressing, 60, 2, 0),
                    (Progressing, 60, 2, 0),
                    (Progressing, 60, 2, 0),
                    (Promoted, 100, 3, 0),
                ],
            ),
            (
                "a closed gate still lets failing analysis roll back",
                vec![
                    (baseline(), open()),
                    (healthy(), held()),
                    (healthy(), held()),
                    (failing(), held()),
                    (failing(), held()),
                ],
                vec![
                    (Progressing, 20, 0, 0),
                    (Progressing, 40, 1, 0),
                    (Progressing, 60, 2, 0),
                    (Progressing, 60, 2, 1),
                    (RolledBack, 0, 2, 2),
                ],
            ),
            (
                "a failing pre-rollout hook keeps Initializing and counts towards the threshold",
                vec![
                    (baseline(), hook_failed()),
                    (baseline(), open()),
                    (healthy(), open()),
                ],
                vec![
                    (Initializing, 0, 0, 1),
                    (Progressing, 20, 0, 1),
                    (Progressing, 40, 1, 1),
                ],
            ),
            (
                "a failing rollout hook holds the weight and rolls back at the threshold",
                vec![
                    (baseline(), open()),
                    (healthy(), hook_failed()),
                    (healthy(), open()),
                    (healthy(), hook_failed()),
                ],
                vec![
                    (Progressing, 20, 0, 0),
                    (Progressing, 20, 0, 1),
                    (Progressing, 40, 1, 1),
                    (RolledBack, 0, 1, 2),
                ],
            ),
            (
                "a hook failure and a failed interval count one failed check, not two",
                vec![(baseline(), open()), (failing(), hook_failed())],
                vec![(Progressing, 20, 0, 0), (Progressing, 20, 0, 1)],
            ),
            (
                "a rollback hook rolls back at once",
                vec![
                    (baseline(), open()),
                    (
                        healthy(),
                        Gates {
                            rollback_requested: Some(
                                "rollback webhook \"pager\" asked for a rollback".into(),
                            ),
                            ..Gates::default()
                        },
                    ),
                ],
                vec![(Progressing, 20, 0, 0), (RolledBack, 0, 0, 0)],
            ),
        ];
        for (name, inputs, expected) in cases {
            assert_eq!(drive_gated(&spec, &inputs), expected, "{name}");
        }
    }

    #[test]
    fn a_held_promotion_says_why_once_and_promote_full_overrides_it() {
        let spec = simple_spec();
        let mut status = CanaryStatus::default();
        let mut events = 0;
        let inputs = [baseline(), healthy(), healthy(), healthy(), healthy()];
        for (i, input) in inputs.iter().enumerate() {
            let decision = step_with_gates(&spec, &status, input, &held(), t(10 * i as i64));
            events += decision
                .actions
                .iter()
                .filter(|a| matches!(a, Action::Event { message, .. } if message.contains("promotion held")))
                .count();
            status = decision.status;
        }
        assert_eq!(events, 1, "one event, not one per interval");
        assert!(
            status
                .message
                .contains("promotion held at 60%: confirm-promotion webhook"),
            "{}",
            status.message
        );
        let promoted = step_with_gates(
            &spec,
            &status,
            &command(Command::PromoteFull),
            &held(),
            t(60),
        )
        .status;
        assert_eq!((promoted.phase, promoted.canary_weight), (Promoted, 100));
        // Without gates, `step` and `step_with_gates` agree.
        let plain = step(&spec, &status, &healthy(), t(70));
        assert_eq!(
            plain,
            step_with_gates(&spec, &status, &healthy(), &open(), t(70))
        );
    }

    #[test]
    fn a_status_missing_fields_is_read_with_defaults() {
        // e.g. written by an older version that did not know `stepPassedChecks` yet
        let status: CanaryStatus =
            serde_json::from_str(r#"{"phase": "Progressing", "canaryWeight": 20, "step": 1}"#)
                .unwrap();
        assert_eq!(
            (
                status.phase,
                status.canary_weight,
                status.step,
                status.failed_checks
            ),
            (Progressing, 20, 1, 0)
        );
        assert!(status.history.is_empty());
    }

    #[test]
    fn a_guard_trip_rolls_back_at_once_but_not_a_stale_or_idle_one() {
        let spec = simple_spec();
        let trip = |at: i64| command(Command::GuardTripped { tripped_at: t(at) });
        // Progressing at 20% since t(0): a trip at t(15) rolls back immediately.
        let (status, _) = drive(&spec, &[baseline(), healthy()]);
        assert_eq!((status.phase, status.canary_weight), (Progressing, 40));
        let decision = step(&spec, &status, &trip(15), t(16));
        assert_eq!(decision.status.phase, RolledBack);
        assert_eq!(decision.status.canary_weight, 0);
        assert!(decision.actions.contains(&Action::SetWeight { canary: 0 }));
        assert!(
            decision
                .status
                .message
                .contains("data-plane guard tripped at"),
            "{}",
            decision.status.message
        );
        // A trip older than the rollout (left over from the previous one) is ignored.
        let decision = step(&spec, &status, &trip(-5), t(16));
        assert_eq!(decision.status, status);
        assert!(decision.actions.is_empty());
        // Initializing (no traffic to the canary yet), and finished rollouts: ignored.
        let fresh = CanaryStatus::default();
        assert_eq!(step(&spec, &fresh, &trip(1), t(2)).status, fresh);
        let rolled_back = step(&spec, &status, &trip(15), t(16)).status;
        let again = step(&spec, &rolled_back, &trip(20), t(21));
        assert_eq!(again.status, rolled_back);
        assert!(again.actions.is_empty());
    }

    fn warning_events(actions: &[Action]) -> Vec<String> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Event {
                    reason: EventReason::Warning,
                    warning: true,
                    message,
                } => Some(message.clone()),
                _ => None,
            })
            .collect()
    }

    fn observed(stable: SubsetTraffic, canary: SubsetTraffic) -> Input {
        Input {
            observation: Some(Ok(Observation {
                stable,
                canary,
                ..Default::default()
            })),
            command: None,
        }
    }

    /// A runtime warning is kept in the status while it holds, announced once when it appears,
    /// and gone when the check runs again.
    #[test]
    fn warnings_live_in_the_status_and_are_announced_once() {
        let mut spec = simple_spec();
        spec.analysis.compare_with_stable = Some(crate::spec::CompareSpec::default());
        let quiet = || observed(traffic(12, 0), traffic(30, 0));
        let mut status = CanaryStatus::default();
        let mut announced = Vec::new();
        for (i, input) in [baseline(), quiet(), quiet()].iter().enumerate() {
            let decision = step(&spec, &status, input, t(10 * i as i64));
            announced.extend(warning_events(&decision.actions));
            status = decision.status;
        }
        assert_eq!(
            announced,
            ["warning: spec.analysis.compareWithStable.latencyBoundariesMs: latency not compared: 12 stable requests per interval, 50 needed; set latencyBoundariesMs or a longer interval"]
        );
        assert_eq!(status.warnings.len(), 1);
        assert_eq!(
            status.warnings[0].code,
            crate::warning::code::LATENCY_NOT_COMPARED
        );
        // A command carries no observation: the warning stays.
        status = step(&spec, &status, &command(Command::Pause), t(40)).status;
        assert_eq!(status.warnings.len(), 1);
        status = step(&spec, &status, &command(Command::Resume), t(45)).status;
        let busy = observed(traffic(200, 0), traffic(50, 0));
        status = step(&spec, &status, &busy, t(50)).status;
        assert_eq!(status.warnings, vec![], "latency is compared now");
    }

    #[test]
    fn an_unchecked_rollout_carries_its_warning_from_the_start() {
        let mut spec = simple_spec();
        spec.analysis.metrics.clear();
        spec.analysis.unchecked = true;
        let decision = step(&spec, &CanaryStatus::default(), &baseline(), t(0));
        assert_eq!(decision.status.warnings.len(), 1);
        assert_eq!(
            warning_events(&decision.actions),
            ["warning: spec.analysis.unchecked: no checks: the canary is promoted on traffic alone, whatever its errors or latency; add `compareWithStable: {}`, `metrics` or `sloBurnRate`, then remove `unchecked: true`"]
        );
        let (status, trace) = drive(&spec, &[baseline(), failing(), failing(), failing()]);
        assert_eq!(trace.last(), Some(&(Promoted, 100, 3)));
        assert_eq!(status.warnings.len(), 1, "still said after promotion");
    }

    #[test]
    fn checks_before_starting_step_are_a_warning_until_it_is_reached() {
        let mut spec = simple_spec();
        spec.analysis.starting_step = 1;
        let (status, _) = drive(&spec, &[baseline()]);
        assert_eq!(status.warnings[0].code, crate::warning::code::NOT_ENFORCED);
        let (status, _) = drive(&spec, &[baseline(), healthy()]);
        assert_eq!(status.step, 1);
        assert!(status.warnings.is_empty(), "{:?}", status.warnings);
    }

    #[test]
    fn failure_limit_tolerates_that_many_failures() {
        let mut spec = simple_spec();
        spec.analysis.threshold = None;
        spec.analysis.failure_limit = Some(1);
        let (status, trace) = drive(&spec, &[baseline(), failing(), failing()]);
        assert_eq!(trace[1].0, Progressing, "one failure is tolerated");
        assert_eq!(trace[2].0, RolledBack);
        assert!(
            status
                .message
                .contains("failed checks threshold reached 2/2"),
            "{}",
            status.message
        );
    }
}
