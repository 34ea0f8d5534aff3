//! `fledge run`'s canaries, kept in step with the spec files.
//!
//! One task per canary (see [`crate::runner`]). The files are read again every second; when
//! they change and load:
//! - a canary whose spec or `fledge.dev/rollout` annotation changed is restarted: its task
//!   stops, and a new one starts a new rollout from 0% canary (the decision history is kept);
//! - a new canary starts, and a removed one stops (its route is left as it is).
//!
//! Files that do not load are reported and the running canaries go on unchanged: a bad edit
//! never stops or restarts a rollout.

use crate::backends;
use crate::config;
use crate::metrics::ReadHub;
use crate::runner::{CanaryTask, Registry};
use crate::state::{rollout_fingerprint, StateStore};
use fledge_core::rollout::{CanaryStatus, Phase};
use fledge_core::spec::Canary;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

/// How often the spec files are read again.
const RELOAD_EVERY: Duration = Duration::from_secs(1);

struct Running {
    /// Tells this task's result from a restarted successor's.
    id: u64,
    fingerprint: String,
    stop: watch::Sender<bool>,
    handle: JoinHandle<()>,
}

/// A finished task: its canary, its id and its last status (or why it failed).
type Finished = (String, u64, Result<Box<CanaryStatus>, String>);

/// A canary task panicked: a bug, reported rather than hidden.
#[derive(Debug, thiserror::Error)]
#[error("the task of canary {name} failed: {reason}")]
pub struct TaskFailed {
    pub name: String,
    pub reason: String,
}

enum Event {
    Finished(Finished),
    Reload,
    Shutdown,
}

pub struct Supervisor {
    files: Vec<PathBuf>,
    store: StateStore,
    registry: Registry,
    /// Every canary's metrics reads go through it (one read per endpoint per tick).
    reads: Arc<ReadHub>,
    exit_when_done: bool,
    running: BTreeMap<String, Running>,
    next_id: u64,
    done_tx: mpsc::UnboundedSender<Finished>,
    done_rx: mpsc::UnboundedReceiver<Finished>,
    /// The files' contents when last loaded (or reported as not loading).
    seen: Vec<Option<Vec<u8>>>,
    rolled_back: bool,
}

impl Supervisor {
    pub fn new(
        files: Vec<PathBuf>,
        store: StateStore,
        registry: Registry,
        reads: Arc<ReadHub>,
        exit_when_done: bool,
    ) -> Self {
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let seen = read_all(&files);
        Supervisor {
            files,
            store,
            registry,
            reads,
            exit_when_done,
            running: BTreeMap::new(),
            next_id: 0,
            done_tx,
            done_rx,
            seen,
            rolled_back: false,
        }
    }

    /// Start the canaries loaded at startup. Unlike a reload, a canary whose metrics source
    /// or router cannot be built stops `fledge run` here.
    pub fn start(&mut self, canaries: Vec<Canary>) -> Result<(), backends::BackendError> {
        for canary in canaries {
            announce_warnings(&canary);
            let task = self.task(canary)?;
            self.spawn(task);
        }
        Ok(())
    }

    /// Run until `shutdown` (or, with `exit_when_done`, until every rollout finished), then
    /// stop every task. True when a canary ended RolledBack.
    pub async fn run(
        mut self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<bool, TaskFailed> {
        tokio::pin!(shutdown);
        let mut reload = tokio::time::interval(RELOAD_EVERY);
        reload.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !(self.exit_when_done && self.running.is_empty()) {
            let event = tokio::select! {
                Some(done) = self.done_rx.recv() => Event::Finished(done),
                _ = reload.tick() => Event::Reload,
                _ = &mut shutdown => Event::Shutdown,
            };
            match event {
                Event::Finished((name, id, status)) => self.finished(&name, id, status)?,
                Event::Reload => self.reload().await,
                Event::Shutdown => {
                    println!("fledge: shutting down (state is saved; run again to continue)");
                    break;
                }
            }
        }
        for (_, running) in std::mem::take(&mut self.running) {
            let _ = running.stop.send(true);
            let _ = running.handle.await;
        }
        while let Ok((name, _, status)) = self.done_rx.try_recv() {
            let status = status.map_err(|reason| TaskFailed { name, reason })?;
            self.rolled_back |= status.phase == Phase::RolledBack;
        }
        Ok(self.rolled_back)
    }

    /// A task ended: by itself (`exit_when_done`), or because it was stopped (then a
    /// successor with another id may already run under the same name).
    fn finished(
        &mut self,
        name: &str,
        id: u64,
        status: Result<Box<CanaryStatus>, String>,
    ) -> Result<(), TaskFailed> {
        let status = status.map_err(|reason| TaskFailed {
            name: name.to_string(),
            reason,
        })?;
        if self.running.get(name).is_some_and(|r| r.id == id) {
            self.running.remove(name);
            self.rolled_back |= status.phase == Phase::RolledBack;
        }
        Ok(())
    }

    fn task(&self, canary: Canary) -> Result<CanaryTask, backends::BackendError> {
        Ok(CanaryTask {
            source: backends::metrics_source(&canary, &self.reads)?,
            router: backends::traffic_router(&canary)?,
            canary,
            store: self.store.clone(),
            registry: self.registry.clone(),
            exit_when_done: self.exit_when_done,
            last_written: None,
            last_conflict: None,
        })
    }

    fn spawn(&mut self, task: CanaryTask) {
        let name = task.canary.name().to_string();
        let fingerprint = rollout_fingerprint(&task.canary);
        let (stop, stopped) = watch::channel(false);
        self.next_id += 1;
        let id = self.next_id;
        let done = self.done_tx.clone();
        let task_name = name.clone();
        let handle = tokio::spawn(async move {
            let status = tokio::spawn(task.run(stopped))
                .await
                .map(Box::new)
                .map_err(|e| e.to_string());
            let _ = done.send((task_name, id, status));
        });
        self.running.insert(
            name,
            Running {
                id,
                fingerprint,
                stop,
                handle,
            },
        );
    }

    /// Stop a canary's task and wait until it has let go of the canary (its lock and state).
    async fn stop(&mut self, name: &str) {
        if let Some(running) = self.running.remove(name) {
            let _ = running.stop.send(true);
            let _ = running.handle.await;
        }
    }

    async fn reload(&mut self) {
        let now = read_all(&self.files);
        if now == self.seen {
            return;
        }
        self.seen = now;
        match config::load_files(&self.files) {
            Ok(canaries) => self.apply(canaries).await,
            Err(errors) => {
                let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
                tracing::error!(problems = %text.join("; "), "the spec files changed but do not load; the running canaries go on unchanged");
                println!(
                    "fledge: the spec files changed but do not load; the running canaries go on unchanged:\n  {}",
                    text.join("\n  ")
                );
            }
        }
    }

    async fn apply(&mut self, canaries: Vec<Canary>) {
        let wanted: BTreeMap<String, Canary> = canaries
            .into_iter()
            .map(|c| (c.name().to_string(), c))
            .collect();
        let removed: Vec<String> = self
            .running
            .keys()
            .filter(|name| !wanted.contains_key(*name))
            .cloned()
            .collect();
        for name in removed {
            self.stop(&name).await;
            self.registry.remove(&name);
            self.registry.telemetry().forget(&name);
            println!("fledge: {name} is no longer in the spec files: stopped (its route is left as it is)");
        }
        for (name, canary) in wanted {
            let fingerprint = rollout_fingerprint(&canary);
            let change = match self.running.get(&name) {
                Some(running) if running.fingerprint == fingerprint => continue,
                Some(_) => "changed: starting a new rollout",
                None => "added: starting",
            };
            let task = match self.task(canary) {
                Ok(task) => task,
                Err(e) => {
                    tracing::error!(canary = %name, error = %e, "cannot start the changed canary; the running one goes on");
                    println!("fledge: {name}: {e}; the running canary (if any) goes on unchanged");
                    continue;
                }
            };
            println!("fledge: {name} {change}");
            announce_warnings(&task.canary);
            self.stop(&name).await;
            self.spawn(task);
        }
    }
}

/// Warnings about checks are announced by the rollout itself (and kept in its status); the
/// plan's own (pauses that wait for a person) are said once here.
fn announce_warnings(canary: &Canary) {
    let announced = fledge_core::warning::check_warnings(&canary.spec.analysis);
    for warning in config::spec_warnings(canary) {
        if !announced.contains(&warning) {
            println!("fledge: {}: warning: {warning}", canary.name());
        }
    }
}

/// Each file's bytes (`None` when it cannot be read).
fn read_all(files: &[PathBuf]) -> Vec<Option<Vec<u8>>> {
    files.iter().map(|f| std::fs::read(f).ok()).collect()
}
