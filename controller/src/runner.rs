//! The standalone runner: one task per canary, level-triggered.
//!
//! Each loop iteration first makes the router match `status.canary_weight` (and checks the
//! proxy really serves it), then waits for the next analysis tick or an operator command, asks
//! the pure state machine what to do, persists the new status, and prints what happened.
//! Metrics are never judged while the live weights are unknown or wrong. Once a rollout has
//! finished and its final weights are live, the route is left alone, so the operator can
//! finalize (make the promoted version stable, set the weights back), as in Kubernetes mode.
//! [`crate::supervisor`] starts, restarts and stops these tasks as the spec files change.

use crate::dashboard::series::{IntervalPoint, SharedSeries};
use crate::metrics::MetricsSource;
use crate::progress;
use crate::router::{DesiredRoutes, TrafficRouter, Weights};
use crate::schedule;
use crate::state::{rollout_fingerprint, SavedState, StateStore};
use crate::telemetry::{ErrorKind, Telemetry};
use crate::tick::{Announce, CanaryAnalysis, Decided, Trigger};
use crate::webhooks::WebhookStatus;
use async_trait::async_trait;
use chrono::Utc;
use fledge_core::rollout::{CanaryStatus, Command, Phase};
use fledge_core::spec::Canary;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
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
    /// Kubernetes mode with `targetRef`: the workload (phase, revision and image, primary and
    /// target replicas, held weights).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workload: Option<fledge_core::workload::WorkloadStatus>,
}

struct Entry {
    /// Without its series (see `series`).
    view: CanaryView,
    /// The canary's series, read only when one canary is asked for.
    series: Option<SharedSeries>,
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
    /// A registry whose self-metrics are `telemetry` (e.g. with a series limit).
    pub fn with_telemetry(telemetry: Telemetry) -> Self {
        Registry {
            telemetry,
            ..Registry::default()
        }
    }

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

    /// One canary, with its series.
    pub fn get(&self, name: &str) -> Option<CanaryView> {
        let map = match self.inner.read() {
            Ok(map) => map,
            Err(poisoned) => poisoned.into_inner(),
        };
        let entry = map.get(name)?;
        let mut view = entry.view.clone();
        if let Some(series) = &entry.series {
            view.series = series.points();
        }
        Some(view)
    }

    /// The controller's self-metrics, shared by every canary task.
    pub fn telemetry(&self) -> &Telemetry {
        &self.telemetry
    }

    fn publish(&self, view: CanaryView, series: SharedSeries, commands: &mpsc::Sender<Command>) {
        self.insert(view, Some(series), Some(commands.clone()));
    }

    /// Show a canary whose commands go elsewhere (`fledge controller`: annotations), with
    /// its series if it has one (read when the dashboard asks for this canary).
    pub fn publish_view(&self, view: CanaryView, series: Option<SharedSeries>) {
        self.insert(view, series, None);
    }

    fn insert(
        &self,
        mut view: CanaryView,
        series: Option<SharedSeries>,
        commands: Option<mpsc::Sender<Command>>,
    ) {
        if series.is_some() {
            view.series = Vec::new();
        }
        let mut map = match self.inner.write() {
            Ok(map) => map,
            Err(poisoned) => poisoned.into_inner(),
        };
        map.insert(
            view.name.clone(),
            Entry {
                view,
                series,
                commands,
            },
        );
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

/// What the state file holds besides the status.
struct Persisted {
    /// The rollout the status belongs to ([`rollout_fingerprint`]).
    fingerprint: String,
    /// The finished rollout's final weights are live: the route is the operator's again.
    final_routes_applied: bool,
}

impl Persisted {
    /// Write `status` with this record; false (logged) when it could not be written.
    fn save(&self, store: &StateStore, name: &str, status: &CanaryStatus) -> bool {
        let state = SavedState {
            spec_fingerprint: self.fingerprint.clone(),
            status: status.clone(),
            final_routes_applied: self.final_routes_applied,
        };
        match store.save(name, &state) {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(canary = name, error = %e, "could not persist status; a restart would repeat this step");
                false
            }
        }
    }
}

/// `fledge run` tells people on stdout: one line per judged interval and per event.
struct ProgressLines<'a> {
    canary: &'a Canary,
}

#[async_trait]
impl Announce for ProgressLines<'_> {
    async fn announce(&self, decided: &Decided) {
        let name = self.canary.name();
        if let Some(report) = &decided.judged {
            progress::analysis(name, report);
        }
        let steps = self.canary.spec.analysis.plan().len();
        progress::actions(name, &decided.status, steps, &decided.actions);
    }
}

/// One tick of `canary` (see [`crate::tick`]): decide, persist to the state file, notify. The
/// routes follow at the top of the runner's next loop; the post-rollout hooks are called once
/// the rollout just ended.
async fn tick(
    canary: &Canary,
    store: &StateStore,
    analysis: &mut CanaryAnalysis,
    status: &mut CanaryStatus,
    trigger: Trigger<'_>,
    persisted: &mut Persisted,
) {
    let name = canary.name();
    let decided = match analysis.decide(status, trigger, Utc::now()).await {
        Ok(decided) => decided,
        Err(message) => {
            tracing::warn!(canary = name, "{message}");
            return;
        }
    };
    // A finished rollout stays hands-off; anything else (e.g. a retry) needs its weights.
    persisted.final_routes_applied &= decided.status.phase.is_terminal();
    if !persisted.save(store, name, &decided.status) {
        analysis
            .telemetry()
            .record_error(analysis.label(), ErrorKind::Persist);
    }
    analysis.notify(&decided, &ProgressLines { canary }).await;
    *status = decided.status.clone();
    analysis.finish(&decided).await;
}

impl CanaryTask {
    fn view(
        &self,
        status: &CanaryStatus,
        router_error: Option<String>,
        analysis: &CanaryAnalysis,
    ) -> CanaryView {
        CanaryView {
            series: Vec::new(),
            webhooks: analysis.webhooks(),
            name: self.canary.name().to_string(),
            service: self.canary.spec.service.clone(),
            steps: self.canary.spec.analysis.plan().len(),
            threshold: self.canary.spec.analysis.rollback_threshold(),
            status: status.clone(),
            router_error,
            conflict: self.last_conflict.clone(),
            workload: None,
        }
    }

    /// Load the saved state of this rollout, or start a new one (keeping the decision history
    /// of the canary's earlier rollouts).
    fn initial_state(&self, fingerprint: &str) -> (CanaryStatus, Persisted) {
        let name = self.canary.name();
        let persisted = |final_routes_applied| Persisted {
            fingerprint: fingerprint.to_string(),
            final_routes_applied,
        };
        match self.store.load(name) {
            Ok(Some(saved)) if saved.spec_fingerprint == fingerprint => {
                progress::line(
                    name,
                    &saved.status,
                    self.canary.spec.analysis.plan().len(),
                    "resuming from saved state",
                );
                (saved.status, persisted(saved.final_routes_applied))
            }
            Ok(Some(saved)) => {
                let reason = match self.canary.rollout_marker() {
                    Some(rollout) => format!(
                        "new rollout of {rollout}: the spec or its fledge.dev/rollout annotation changed"
                    ),
                    None => "new rollout: the spec changed".to_string(),
                };
                tracing::info!(canary = name, "{reason}");
                (
                    saved.status.next_rollout(Utc::now(), reason),
                    persisted(false),
                )
            }
            Ok(None) => (CanaryStatus::default(), persisted(false)),
            Err(e) => {
                // Refusing to start is safer than guessing where a rollout stood.
                tracing::error!(canary = name, error = %e, "cannot read saved state; starting a new rollout from 0% canary");
                (CanaryStatus::default(), persisted(false))
            }
        }
    }

    /// [`Self::ensure_routes`], except after a finished rollout whose final weights are live:
    /// then the route is the operator's, and left alone.
    async fn reconcile_routes(
        &mut self,
        status: &CanaryStatus,
        persisted: &mut Persisted,
    ) -> Result<(), String> {
        let finished = status.phase.is_terminal();
        if finished && persisted.final_routes_applied {
            return Ok(());
        }
        self.ensure_routes(status).await?;
        if finished {
            persisted.final_routes_applied = true;
            let name = self.canary.name();
            if !persisted.save(&self.store, name, status) {
                self.registry
                    .telemetry()
                    .record_error(name, ErrorKind::Persist);
            }
            progress::note(
                name,
                "final weights are live; the route is left alone until the next rollout",
            );
        }
        Ok(())
    }

    /// Make the routes follow `status` (and check the proxy really serves them); `Err`
    /// carries a readable reason. Weights found that differ from what this process last wrote
    /// were changed by someone else: that is reported (log line and `conflict` in the view),
    /// since the rollout's analysis is only valid at the weights it decided, and they are
    /// restored.
    async fn ensure_routes(&mut self, status: &CanaryStatus) -> Result<(), String> {
        let desired = DesiredRoutes::for_rollout(status.canary_weight, !status.phase.is_terminal());
        let want = desired.weights;
        let ensured = self
            .router
            .ensure(&desired)
            .await
            .map_err(|e| e.to_string())?;
        let found = ensured.found;
        if let Some(written) = self.last_written.filter(|w| found != want && *w != found) {
            let conflict = format!(
                "weights were changed outside fledge: found stable {} / canary {}, expected stable {} / canary {}; restored stable {} / canary {}",
                found.stable,
                found.canary,
                written.stable,
                written.canary,
                want.stable,
                want.canary
            );
            tracing::warn!(canary = self.canary.name(), "{conflict}");
            progress::note(self.canary.name(), &conflict);
            self.last_conflict = Some(format!("{}: {conflict}", Utc::now().to_rfc3339()));
        }
        self.last_written = Some(want);
        Ok(())
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
        let fingerprint = rollout_fingerprint(&self.canary);
        let (commands_tx, mut commands) = mpsc::channel(16);
        let mut analysis = CanaryAnalysis::new(
            &self.canary,
            self.canary.name(),
            self.registry.telemetry().clone(),
        );
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
            self.registry.publish(
                self.view(&saved, Some(standby), &analysis),
                analysis.series_handle(),
                &commands_tx,
            );
            tokio::select! {
                _ = tokio::time::sleep(self.canary.spec.analysis.interval.0.min(std::time::Duration::from_secs(2))) => {}
                _ = shutdown.changed() => return saved,
            }
        };
        let (mut status, mut persisted) = self.initial_state(&fingerprint);
        // Show where the rollout stands right away, before the first (possibly slow) weight check.
        self.registry.publish(
            self.view(&status, None, &analysis),
            analysis.series_handle(),
            &commands_tx,
        );
        // Aligned ticks: canaries reading the same metrics endpoint are judged together, so one
        // read serves them all (see `crate::schedule`).
        let interval = self.canary.spec.analysis.interval.0;
        let phase = crate::backends::tick_phase(&self.canary);
        let mut last_tick: Option<chrono::DateTime<Utc>> = None;
        let started_at = Utc::now();
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
            let routes = self.reconcile_routes(&status, &mut persisted).await;
            if let Err(e) = &routes {
                tracing::warn!(canary = self.canary.name(), error = %e, "weights not applied yet; will retry");
                self.registry
                    .telemetry()
                    .record_error(self.canary.name(), ErrorKind::Router);
            }
            self.registry
                .telemetry()
                .observe_status(self.canary.name(), &status);
            self.registry.publish(
                self.view(&status, routes.clone().err(), &analysis),
                analysis.series_handle(),
                &commands_tx,
            );
            if self.exit_when_done && status.phase.is_terminal() && routes.is_ok() {
                analysis.drain().await;
                return status;
            }
            let due = schedule::next_tick(last_tick, interval, phase);
            let until_due = due
                .and_then(|due| (due - Utc::now()).to_std().ok())
                .unwrap_or_default();
            tokio::select! {
                _ = tokio::time::sleep(until_due) => {
                    let tick_at = Utc::now();
                    last_tick = Some(tick_at);
                    if status.phase.is_terminal() || routes.is_err() {
                        continue;
                    }
                    let source = &mut self.source;
                    let observe = Box::pin(async move { Ok(source.observe().await) });
                    tick(&self.canary, &self.store, &mut analysis, &mut status, Trigger::Interval(observe), &mut persisted).await;
                    // Late from its aligned instant (or from this process' start) to recorded.
                    let due = due.unwrap_or(tick_at).max(started_at);
                    self.registry.telemetry().record_lag((Utc::now() - due).to_std().unwrap_or_default());
                }
                Some(command) = commands.recv() => {
                    tick(&self.canary, &self.store, &mut analysis, &mut status, Trigger::Command(command), &mut persisted).await;
                }
                _ = guard_ticker.tick(), if guard_every.is_some() && routes.is_ok() && guard_watched(&status) => {
                    if let Some(tripped_at) = self.new_guard_trip(&mut last_guard_trip).await {
                        let command = Command::GuardTripped { tripped_at };
                        tick(&self.canary, &self.store, &mut analysis, &mut status, Trigger::Command(command), &mut persisted).await;
                    }
                }
                _ = shutdown.changed() => {
                    // Notifications in flight get a moment; each is bounded by its own timeout.
                    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), analysis.drain()).await;
                    return status;
                }
            }
        }
    }
}
