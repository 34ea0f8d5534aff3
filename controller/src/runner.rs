//! The standalone runner: one task per canary, level-triggered.
//!
//! Each loop iteration first makes the router match `status.canary_weight` (and checks the
//! proxy really serves it), then waits for the next analysis tick or an operator command, asks
//! the pure state machine what to do, persists the new status, and prints what happened.
//! Metrics are never judged while the live weights are unknown or wrong.

use crate::metrics::MetricsSource;
use crate::progress;
use crate::router::{TrafficRouter, Weights};
use crate::state::{fingerprint, SavedState, StateStore};
use chrono::Utc;
use fledge_core::rollout::{self, CanaryStatus, Command, Input};
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
}

struct Entry {
    view: CanaryView,
    commands: mpsc::Sender<Command>,
}

/// Shared, read-mostly view of all canaries, plus a way to send them commands.
#[derive(Clone, Default)]
pub struct Registry {
    inner: Arc<RwLock<BTreeMap<String, Entry>>>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum CommandError {
    NotFound,
    /// The rollout is Promoted or RolledBack.
    Finished,
    /// `Retry` is only for a rolled-back rollout.
    NotRolledBack,
    Busy,
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

    fn publish(&self, view: CanaryView, commands: &mpsc::Sender<Command>) {
        let mut map = match self.inner.write() {
            Ok(map) => map,
            Err(poisoned) => poisoned.into_inner(),
        };
        map.insert(
            view.name.clone(),
            Entry {
                view,
                commands: commands.clone(),
            },
        );
    }

    /// Queue an operator command for a canary.
    pub fn send(&self, name: &str, command: Command) -> Result<(), CommandError> {
        let map = match self.inner.read() {
            Ok(map) => map,
            Err(poisoned) => poisoned.into_inner(),
        };
        let entry = map.get(name).ok_or(CommandError::NotFound)?;
        let phase = entry.view.status.phase;
        match command {
            Command::Retry if phase != fledge_core::rollout::Phase::RolledBack => {
                return Err(CommandError::NotRolledBack)
            }
            Command::Retry => {}
            _ if phase.is_terminal() => return Err(CommandError::Finished),
            _ => {}
        }
        entry
            .commands
            .try_send(command)
            .map_err(|_| CommandError::Busy)
    }
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
    fn view(&self, status: &CanaryStatus, router_error: Option<String>) -> CanaryView {
        CanaryView {
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

    fn decide(&self, status: &mut CanaryStatus, input: Input, fingerprint: &str) {
        let name = self.canary.name();
        let decision = rollout::step(&self.canary.spec, status, &input, Utc::now());
        if let Err(e) = self.store.save(
            name,
            &SavedState {
                spec_fingerprint: fingerprint.to_string(),
                status: decision.status.clone(),
            },
        ) {
            tracing::error!(canary = name, error = %e, "could not persist status; a restart would repeat this step");
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
        *status = decision.status;
    }

    /// Drive this canary until shutdown (or until done, with `exit_when_done`).
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) -> CanaryStatus {
        let fingerprint = fingerprint(&self.canary.spec);
        let (commands_tx, mut commands) = mpsc::channel(16);
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
                .publish(self.view(&saved, Some(standby)), &commands_tx);
            tokio::select! {
                _ = tokio::time::sleep(self.canary.spec.analysis.interval.0.min(std::time::Duration::from_secs(2))) => {}
                _ = shutdown.changed() => return saved,
            }
        };
        let mut status = self.initial_status(&fingerprint);
        let mut ticker = tokio::time::interval(self.canary.spec.analysis.interval.0);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            let weights = self.ensure_weights(status.canary_weight).await;
            if let Err(e) = &weights {
                tracing::warn!(canary = self.canary.name(), error = %e, "weights not applied yet; will retry");
            }
            self.registry
                .publish(self.view(&status, weights.clone().err()), &commands_tx);
            if self.exit_when_done && status.phase.is_terminal() && weights.is_ok() {
                return status;
            }
            tokio::select! {
                _ = ticker.tick() => {
                    if status.phase.is_terminal() || weights.is_err() {
                        continue;
                    }
                    let observation = self.source.observe().await;
                    self.decide(&mut status, Input { observation: Some(observation), command: None }, &fingerprint);
                }
                Some(command) = commands.recv() => {
                    self.decide(&mut status, Input { observation: None, command: Some(command) }, &fingerprint);
                }
                _ = shutdown.changed() => return status,
            }
        }
    }
}
