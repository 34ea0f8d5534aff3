//! The standalone runner: one task per canary, level-triggered.
//!
//! Each loop iteration first makes the router match `status.canary_weight` (and checks the
//! proxy really serves it), then waits for the next analysis tick or an operator command, asks
//! the pure state machine what to do, persists the new status, and prints what happened.
//! Metrics are never judged while the live weights are unknown or wrong.

use crate::dashboard::series::{IntervalPoint, Series};
use crate::metrics::MetricsSource;
use crate::progress;
use crate::router::{TrafficRouter, Weights};
use crate::state::{fingerprint, SavedState, StateStore};
use crate::telemetry::{ErrorKind, Telemetry};
use crate::webhooks::{WebhookCaller, WebhookStatus};
use chrono::Utc;
use fledge_core::observe::ObservationError;
use fledge_core::rollout::{CanaryStatus, Command, Gates, Input, Phase};
use fledge_core::spec::Canary;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Instant;
use tokio::sync::{mpsc, watch};
use tokio::time::MissedTickBehavior;

/// What the status API shows for one canary.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CanaryView {
    pub name: String,
    pub service: String,
    /// Number of steps in the plan; promotion follows the last one.
    pub steps: usize,
    pub threshold: u32,
    #[serde(flatten)]
    pub status: CanaryStatus,
    /// Set while the router cannot apply or confirm the wanted weights (or, for a standby
    /// process, why it is waiting).
    pub router_error: Option<String>,
    /// The latest change of this canary's weights made outside fledge, if any.
    pub conflict: Option<String>,
    /// The last observed intervals (bounded), for the dashboard's charts. Only in the
    /// one-canary answer (`GET /api/v1/canaries/{name}`), not in the list.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub series: Vec<IntervalPoint>,
    /// The spec's webhooks and their last calls.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub webhooks: Vec<WebhookStatus>,
}

/// What the runner keeps per canary besides the persisted status: the dashboard's time
/// series and the webhooks with their last calls.
struct OperatorState {
    series: Series,
    webhooks: WebhookCaller,
}

struct Entry {
    view: CanaryView,
    /// `None` for a canary steered elsewhere (in Kubernetes mode: annotations on the Canary).
    commands: Option<mpsc::Sender<Command>>,
}

/// Shared, read-mostly view of all canaries, plus a way to send them commands. `fledge run`
/// fills it from its canary tasks, `fledge controller` from its reconciles; the API and the
/// dashboard read it.
#[derive(Clone, Default)]
pub struct Registry {
    inner: Arc<RwLock<BTreeMap<String, Entry>>>,
    telemetry: Telemetry,
    /// Why this process shows no canaries although some may exist (a standby controller).
    role_note: Arc<RwLock<Option<String>>>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum CommandError {
    NotFound,
    /// The rollout is Promoted or RolledBack.
    Finished,
    /// `Retry` is only for a rolled-back rollout.
    NotRolledBack,
    Busy,
    /// The canary is not steered through this server (Kubernetes mode: annotations).
    NotHere,
}

impl Registry {
    pub fn list(&self) -> Vec<CanaryView> {
        match self.inner.read() {
            Ok(map) => map.values().map(|e| e.view.clone()).collect(),
            Err(poisoned) => poisoned
                .get_ref()
                .values()
                .map(|e| e.view.clone())
                .collect(),
        }
    }

    pub fn get(&self, name: &str) -> Option<CanaryView> {
        self.list().into_iter().find(|v| v.name == name)
    }

    /// The controller's self-metrics, shared by every canary task.
    pub fn telemetry(&self) -> &Telemetry {
        &self.telemetry
    }

    fn publish(&self, view: CanaryView, commands: &mpsc::Sender<Command>) {
        self.insert(view, Some(commands.clone()));
    }

    /// Show a canary whose commands go elsewhere (`fledge controller`: annotations).
    pub fn publish_view(&self, view: CanaryView) {
        self.insert(view, None);
    }

    fn insert(&self, view: CanaryView, commands: Option<mpsc::Sender<Command>>) {
        let mut map = match self.inner.write() {
            Ok(map) => map,
            Err(poisoned) => poisoned.into_inner(),
        };
        map.insert(view.name.clone(), Entry { view, commands });
    }

    /// Stop showing a canary (deleted).
    pub fn remove(&self, name: &str) {
        let mut map = match self.inner.write() {
            Ok(map) => map,
            Err(poisoned) => poisoned.into_inner(),
        };
        map.remove(name);
    }

    /// Stop showing every canary — in the list and in the self-metrics' state gauges, so a
    /// standby controller's `/metrics` does not repeat a former term's weights — and say why
    /// (`None`: clear the note).
    pub fn clear(&self, note: Option<String>) {
        let names: Vec<String> = {
            let mut map = match self.inner.write() {
                Ok(map) => map,
                Err(poisoned) => poisoned.into_inner(),
            };
            std::mem::take(&mut *map).into_keys().collect()
        };
        for name in names {
            self.telemetry.forget(&name);
        }
        self.set_note(note);
    }

    /// Say why this process shows no canaries (or `None` once it does).
    pub fn set_note(&self, note: Option<String>) {
        match self.role_note.write() {
            Ok(mut current) => *current = note,
            Err(poisoned) => *poisoned.into_inner() = note,
        }
    }

    /// Why this process shows no canaries, if it says so.
    pub fn note(&self) -> Option<String> {
        match self.role_note.read() {
            Ok(note) => note.clone(),
            Err(poisoned) => (*poisoned.get_ref()).clone(),
        }
    }

    /// Queue an operator command for a canary.
    pub fn send(&self, name: &str, command: Command) -> Result<(), CommandError> {
        let map = match self.inner.read() {
            Ok(map) => map,
            Err(poisoned) => poisoned.into_inner(),
        };
        let entry = map.get(name).ok_or(CommandError::NotFound)?;
        let commands = entry.commands.as_ref().ok_or(CommandError::NotHere)?;
        let phase = entry.view.status.phase;
        match command {
            Command::Retry if phase != fledge_core::rollout::Phase::RolledBack => {
                return Err(CommandError::NotRolledBack)
            }
            Command::Retry => {}
            _ if phase.is_terminal() => return Err(CommandError::Finished),
            _ => {}
        }
        commands.try_send(command).map_err(|_| CommandError::Busy)
    }
}

/// Whether the guard watch runs: a rollout past Initializing, not finished, whose canary gets
/// traffic.
pub fn guard_watched(status: &CanaryStatus) -> bool {
    !status.phase.is_terminal() && status.phase != Phase::Initializing && status.canary_weight > 0
}

/// Everything one canary task needs.
pub struct CanaryTask {
    pub canary: Canary,
    pub source: Box<dyn MetricsSource>,
    pub router: Box<dyn TrafficRouter>,
    pub store: StateStore,
    pub registry: Registry,
    /// Return once the rollout is Promoted or RolledBack (and the weights are live).
    pub exit_when_done: bool,
    /// Weights this process last wrote (to tell our changes from someone else's).
    pub last_written: Option<Weights>,
    /// The latest edit of our weights by someone else, as reported.
    pub last_conflict: Option<String>,
}

impl CanaryTask {
    fn view(
        &self,
        status: &CanaryStatus,
        router_error: Option<String>,
        operator: &OperatorState,
    ) -> CanaryView {
        CanaryView {
            series: operator.series.points(),
            webhooks: operator.webhooks.statuses(),
            name: self.canary.name().to_string(),
            service: self.canary.spec.service.clone(),
            steps: self.canary.spec.analysis.plan().len(),
            threshold: self.canary.spec.analysis.threshold,
            status: status.clone(),
            router_error,
            conflict: self.last_conflict.clone(),
        }
    }

    /// Load a saved status for this spec, or start afresh.
    fn initial_status(&self, fingerprint: &str) -> CanaryStatus {
        let name = self.canary.name();
        match self.store.load(name) {
            Ok(Some(saved)) if saved.spec_fingerprint == fingerprint => {
                progress::line(
                    name,
                    &saved.status,
                    self.canary.spec.analysis.plan().len(),
                    "resuming from saved state",
                );
                saved.status
            }
            Ok(Some(_)) => {
                tracing::info!(
                    canary = name,
                    "spec changed since the saved state: starting a new rollout"
                );
                CanaryStatus::default()
            }
            Ok(None) => CanaryStatus::default(),
            Err(e) => {
                // Refusing to start is safer than guessing where a rollout stood.
                tracing::error!(canary = name, error = %e, "cannot read saved state; starting a new rollout from 0% canary");
                CanaryStatus::default()
            }
        }
    }

    /// Make the router serve `canary_weight`; `Err` carries a readable reason. Weights that
    /// differ from what this process last wrote were changed by someone else: that is
    /// reported (log line and `conflict` in the view) before our weights are restored, since
    /// the rollout's analysis is only valid at the weights it decided.
    async fn ensure_weights(&mut self, canary_weight: u8) -> Result<(), String> {
        let want = Weights::canary_percent(canary_weight);
        let current = self.router.get_weights().await.map_err(|e| e.to_string())?;
        if current != want {
            if let Some(written) = self.last_written.filter(|w| *w != current) {
                let conflict = format!(
                    "weights were changed outside fledge: found stable {} / canary {}, expected stable {} / canary {}; restoring stable {} / canary {}",
                    current.stable,
                    current.canary,
                    written.stable,
                    written.canary,
                    want.stable,
                    want.canary
                );
                tracing::warn!(canary = self.canary.name(), "{conflict}");
                progress::note(self.canary.name(), &conflict);
                self.last_conflict = Some(format!("{}: {conflict}", Utc::now().to_rfc3339()));
            }
            self.router
                .set_weights(want)
                .await
                .map_err(|e| e.to_string())?;
        }
        self.last_written = Some(want);
        self.router.verify(want).await.map_err(|e| e.to_string())
    }

    /// Decide with the webhooks' answers (`gates`); a decision that would promote asks the
    /// confirm-promotion hooks first and, if one does not approve, is decided again with the
    /// promotion held (the state machine stays pure; `promote --full` is not held).
    async fn decide(
        &self,
        status: &mut CanaryStatus,
        input: Input,
        gates: Gates,
        fingerprint: &str,
        operator: &mut OperatorState,
    ) {
        let name = self.canary.name();
        let telemetry = self.registry.telemetry();
        let decision = operator
            .webhooks
            .decide(status, &input, gates, Utc::now())
            .await;
        if let Err(e) = self.store.save(
            name,
            &SavedState {
                spec_fingerprint: fingerprint.to_string(),
                status: decision.status.clone(),
            },
        ) {
            tracing::error!(canary = name, error = %e, "could not persist status; a restart would repeat this step");
            telemetry.record_error(name, ErrorKind::Persist);
        }
        let judged = input.observation.as_ref().is_some_and(|o| o.is_ok());
        if judged {
            if let Some(report) = &decision.status.last_analysis {
                progress::analysis(name, report);
            }
        }
        progress::actions(
            name,
            &decision.status,
            self.canary.spec.analysis.plan().len(),
            &decision.actions,
        );
        telemetry.observe_status(name, &decision.status);
        telemetry.record_decisions(name, &decision.actions);
        operator
            .webhooks
            .notify(&decision.status, &decision.actions);
        let finished = decision.status.phase.is_terminal() && !status.phase.is_terminal();
        *status = decision.status;
        if finished {
            operator.webhooks.post_rollout(status).await;
        }
    }

    /// A guard trip the state machine has not been told about yet, if the metrics source
    /// reports one (each trip is handed over once; the machine ignores trips older than the
    /// rollout).
    async fn new_guard_trip(
        &mut self,
        last: &mut Option<chrono::DateTime<Utc>>,
    ) -> Option<chrono::DateTime<Utc>> {
        match self.source.guard_tripped_at().await {
            Ok(Some(tripped_at)) if *last != Some(tripped_at) => {
                *last = Some(tripped_at);
                tracing::warn!(canary = self.canary.name(), %tripped_at, "data-plane guard tripped");
                Some(tripped_at)
            }
            Ok(_) => None,
            Err(error) => {
                tracing::debug!(canary = self.canary.name(), %error, "cannot read the guard; the analysis still runs");
                None
            }
        }
    }

    /// Drive this canary until shutdown (or until done, with `exit_when_done`).
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) -> CanaryStatus {
        let fingerprint = fingerprint(&self.canary.spec);
        let (commands_tx, mut commands) = mpsc::channel(16);
        let mut operator = OperatorState {
            series: Series::default(),
            webhooks: WebhookCaller::new(&self.canary, self.registry.telemetry().clone()),
        };
        // Only one process acts on a canary: the others wait as standbys.
        let _lock = loop {
            match self.store.try_lock(self.canary.name()) {
                Ok(Some(lock)) => break lock,
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(canary = self.canary.name(), error = %e, "cannot take the canary lock")
                }
            }
            let saved = self
                .store
                .load(self.canary.name())
                .ok()
                .flatten()
                .map(|s| s.status)
                .unwrap_or_default();
            let standby = format!(
                "standby: another fledge process holds {}; this one takes over when it stops",
                self.store.lock_path(self.canary.name()).display()
            );
            self.registry
                .publish(self.view(&saved, Some(standby), &operator), &commands_tx);
            tokio::select! {
                _ = tokio::time::sleep(self.canary.spec.analysis.interval.0.min(std::time::Duration::from_secs(2))) => {}
                _ = shutdown.changed() => return saved,
            }
        };
        let mut status = self.initial_status(&fingerprint);
        // Show where the rollout stands right away, before the first (possibly slow) weight check.
        self.registry
            .publish(self.view(&status, None, &operator), &commands_tx);
        let mut ticker = tokio::time::interval(self.canary.spec.analysis.interval.0);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let interval_secs = self.canary.spec.analysis.interval.0.as_secs_f64();
        // The data-plane guard watch: between analysis intervals, read the guard's gauge.
        let guard_every = self
            .canary
            .spec
            .analysis
            .guard
            .as_ref()
            .map(|guard| guard.check_interval.0);
        let mut guard_ticker =
            tokio::time::interval(guard_every.unwrap_or(std::time::Duration::from_secs(3600)));
        guard_ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut last_guard_trip = None;
        loop {
            let weights = self.ensure_weights(status.canary_weight).await;
            if let Err(e) = &weights {
                tracing::warn!(canary = self.canary.name(), error = %e, "weights not applied yet; will retry");
                self.registry
                    .telemetry()
                    .record_error(self.canary.name(), ErrorKind::Router);
            }
            self.registry
                .telemetry()
                .observe_status(self.canary.name(), &status);
            self.registry.publish(
                self.view(&status, weights.clone().err(), &operator),
                &commands_tx,
            );
            if self.exit_when_done && status.phase.is_terminal() && weights.is_ok() {
                operator.webhooks.drain().await;
                return status;
            }
            tokio::select! {
                _ = ticker.tick() => {
                    if status.phase.is_terminal() || weights.is_err() {
                        continue;
                    }
                    let started = Instant::now();
                    let tick_at = Utc::now();
                    let gates = operator.webhooks.before_interval(&status).await;
                    let observation = self.source.observe().await;
                    if matches!(&observation, Err(e) if *e != ObservationError::Baseline) {
                        self.registry.telemetry().record_error(self.canary.name(), ErrorKind::Metrics);
                    }
                    let (weight, phase) = (status.canary_weight, status.phase);
                    let observed = observation.as_ref().ok().cloned();
                    self.decide(&mut status, Input { observation: Some(observation), command: None }, gates, &fingerprint, &mut operator).await;
                    let report = status.last_analysis.as_ref().filter(|r| r.at >= tick_at);
                    if let Some(report) = report {
                        self.registry.telemetry().record_analysis(self.canary.name(), report, started.elapsed());
                    }
                    match observed {
                        Some(o) => operator.series.record(Utc::now(), interval_secs, weight, phase, &o, report.map(|r| r.report.verdict)),
                        None => operator.series.skip(Utc::now()),
                    }
                }
                Some(command) = commands.recv() => {
                    self.decide(&mut status, Input { observation: None, command: Some(command) }, Gates::default(), &fingerprint, &mut operator).await;
                }
                _ = guard_ticker.tick(), if guard_every.is_some() && weights.is_ok() && guard_watched(&status) => {
                    if let Some(tripped_at) = self.new_guard_trip(&mut last_guard_trip).await {
                        let command = Command::GuardTripped { tripped_at };
                        self.decide(&mut status, Input { observation: None, command: Some(command) }, Gates::default(), &fingerprint, &mut operator).await;
                    }
                }
                _ = shutdown.changed() => {
                    // Notifications in flight get a moment; each is bounded by its own timeout.
                    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), operator.webhooks.drain()).await;
                    return status;
                }
            }
        }
    }
}
