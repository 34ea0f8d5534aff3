//! The Canary reconciler: idempotent and level-triggered; all rollout state is in `.status`.
//!
//! One call of [`reconcile`] for a Canary:
//!
//! 1. **Finalizer** (kube's helper): a new Canary first gets `fledge.dev/traffic`; a deleted one
//!    runs [`cleanup`] (all traffic back to stable unless it was promoted) before it goes away.
//! 2. **Validate** the spec (`fledge_core`'s validation: every problem names the field and fix);
//!    an invalid spec sets `Ready=False/InvalidSpec` and waits for an edit.
//! 3. **Routes follow the status**: the router makes the route serve `status.canaryWeight`
//!    (plus the managed routes — testers, mirror, guard — while the rollout runs). Nothing is
//!    judged while the routes are not as wanted (or, for the Gateway API, not accepted).
//! 4. **Analysis tick, only when due**: at the first aligned tick half an interval or more after
//!    `status.lastTickAt` (see [`crate::schedule`]; or an operator
//!    command annotation is new). Then the metrics source is read and the pure
//!    `fledge_core::rollout::step` decides. Reconciles triggered by anything else (our own status
//!    write, a route edit, a resync) find no tick due and change nothing — which is
//!    why a restarted controller or a new leader never repeats a step.
//! 5. **Persist, then act**: the new status is written with the resourceVersion that was read
//!    (`PUT .../status`: a concurrent writer makes it a 409 and nothing is acted on); then the
//!    routes are moved and Kubernetes Events are published.
//! 6. **Requeue** at the next analysis tick.
//! 7. **Finished** (Promoted or RolledBack): the final routes are applied once (100% canary or
//!    100% stable, testers route and mirror removed) and recorded in
//!    `.status.finalRoutesApplied`; after that the controller leaves the routes alone, so you or
//!    GitOps can make the promoted version the new stable without a fight.
//!
//! Metrics sources that keep cumulative readings in memory (Envoy admin) are cached per Canary
//! for the current leadership term. A new process or a new leader starts without a previous
//! reading: its first tick only records a baseline, which the state machine treats as "no
//! verdict" — the current step simply holds for one more interval.

use super::clock::Clock;
use super::crd::{reason, CanaryResource, CanaryResourceStatus, Readiness, COMMAND_ANNOTATIONS};
use super::factory::Backends;
use super::lease::{run_election, LeaseLock, LeaseSettings};
use super::routes::{self, route_of, ConfirmedRoutes, RouteIndex, RouteObjects};
use super::shard::Shard;
use super::throttle::{RoomClaim, TokenBucket};
use super::workload::WorkloadApi;
use super::{api_status_code, Error, Result, CONTROLLER_NAME, FINALIZER};
use crate::dashboard::series::SharedSeries;
use crate::metrics::MetricsSource;
use crate::router::{DesiredRoutes, RouterError, TrafficRouter, Weights};
use crate::runner::{guard_watched, CanaryView, Registry};
use crate::schedule;
use crate::telemetry::ErrorKind;
use crate::tick::{Announce, CanaryAnalysis, Decided, Trigger};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use fledge_core::observe::{Observation, ObservationError};
use fledge_core::rollout::{Action as RolloutAction, CanaryStatus, Command, Phase};
use fledge_core::workload::{self, Action as WorkloadAction, WorkloadPhase};
use futures::channel::mpsc::UnboundedSender;
use futures::StreamExt;
use kube::api::{Api, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{finalizer, Event as FinalizerEvent};
use kube::runtime::reflector::Store;
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, Resource, ResourceExt};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::sync::watch;

/// Annotation whose value, when changed, starts a new rollout of the same spec (e.g. set it to
/// the version being released: `fledge.dev/rollout: v3`).
pub const ROLLOUT_ANNOTATION: &str = fledge_core::spec::ROLLOUT_ANNOTATION;
/// Event `action` field.
const EVENT_ACTION: &str = "Rollout";

/// A metrics source, built on first use (building can fail; it is tried again next time).
type SharedSource = Arc<tokio::sync::Mutex<Option<Box<dyn MetricsSource>>>>;

/// What one Canary keeps in memory for one rollout during one leadership term: the metrics
/// source (it holds the previous cumulative reading), the analysis (the webhooks' last calls
/// and notifications in flight, the dashboard's time series) and, while it runs, the guard
/// watch. None of it is needed to continue a rollout correctly: a new leader starts without it.
struct CanaryRuntime {
    fingerprint: String,
    source: SharedSource,
    analysis: tokio::sync::Mutex<CanaryAnalysis>,
    /// The analysis' series, readable while a reconcile holds the analysis.
    series: SharedSeries,
    /// Status decided but not written yet (analysis progress between checkpoints).
    unpersisted: Mutex<Option<Unpersisted>>,
    guard_watch: Mutex<Option<GuardWatch>>,
    /// An analysis interval ran in this term (its metrics source has read at least once).
    ticked: AtomicBool,
}

/// A status decided after the Canary's last write, and the resourceVersion it builds on: it
/// is used only while the Canary is still at that version (any other write, e.g. by another
/// controller instance, wins).
struct Unpersisted {
    base_version: Option<String>,
    status: CanaryResourceStatus,
}

/// The task reading a Canary's data-plane guard gauge; stopped when dropped.
struct GuardWatch(tokio::task::JoinHandle<()>);

impl Drop for GuardWatch {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Guard trips seen by the watches and not yet handed to the state machine, by Canary key.
type PendingTrips = Arc<Mutex<HashMap<String, DateTime<Utc>>>>;

/// The route watches' knowledge, shared by every reconcile of a leadership term.
#[derive(Clone)]
pub struct RouteState {
    pub objects: RouteObjects,
    pub confirmed: Arc<ConfirmedRoutes>,
    pub index: Arc<RouteIndex>,
}

/// Shared state of all reconciles in one leadership term.
pub struct Context {
    pub client: Client,
    pub backends: Arc<dyn Backends>,
    pub clock: Arc<dyn Clock>,
    pub recorder: Recorder,
    /// Whether this instance leads; reconciles do nothing when it does not.
    pub leader: watch::Receiver<bool>,
    /// Delay before retrying after a router or API error.
    pub retry_delay: Duration,
    /// What the dashboard, the status API and `/metrics` show (canaries named `namespace/name`).
    pub registry: Registry,
    /// Wakes the controller (every Canary is reconciled) when a guard watch sees a trip.
    pub guard_trigger: Option<UnboundedSender<()>>,
    /// What the route watches know: route objects, confirmed routes, which Canary names
    /// which route (set by [`run`]; without it every pass asks the router).
    pub routes: Option<RouteState>,
    runtimes: Mutex<HashMap<String, Arc<CanaryRuntime>>>,
    guard_trips: PendingTrips,
    /// resourceVersions this instance has replaced with a status write: an object still at one
    /// of them is a stale cache entry (our own write's watch event has not arrived yet).
    superseded: Mutex<HashMap<String, String>>,
    /// When this context (this leadership term) began.
    pub started: DateTime<Utc>,
    /// When its first reconcile ran (see [`Context::term_ready`]).
    first_pass: OnceLock<DateTime<Utc>>,
    /// How often analysis progress alone is written to `.status` (see [`must_persist`]);
    /// zero: with every change.
    pub status_checkpoint: Duration,
    /// The client-side API limit: a checkpoint that finds it without room waits for a later
    /// tick, so decisions never queue behind checkpoints (`None`: unlimited).
    pub api_budget: Option<TokenBucket>,
}

impl Context {
    pub fn new(
        client: Client,
        backends: Arc<dyn Backends>,
        clock: Arc<dyn Clock>,
        leader: watch::Receiver<bool>,
        reporter_instance: &str,
    ) -> Self {
        let reporter = Reporter {
            controller: CONTROLLER_NAME.to_string(),
            instance: Some(reporter_instance.to_string()),
        };
        Context {
            recorder: Recorder::new(client.clone(), reporter),
            started: clock.now(),
            first_pass: OnceLock::new(),
            status_checkpoint: Duration::ZERO,
            api_budget: None,
            client,
            backends,
            clock,
            leader,
            retry_delay: Duration::from_secs(10),
            registry: Registry::default(),
            guard_trigger: None,
            routes: None,
            runtimes: Mutex::new(HashMap::new()),
            guard_trips: Arc::new(Mutex::new(HashMap::new())),
            superseded: Mutex::new(HashMap::new()),
        }
    }

    /// Forget a Canary's in-memory state (its rollout changed, or it was deleted).
    fn forget(&self, key: &str) {
        if let Some(routes) = &self.routes {
            routes.confirmed.forget(key);
        }
        lock(&self.runtimes).remove(key);
        lock(&self.guard_trips).remove(key);
    }

    /// The in-memory state of `key`'s current rollout (`fingerprint`), made on first use.
    fn runtime(
        &self,
        key: &str,
        canary: &fledge_core::spec::Canary,
        fingerprint: &str,
    ) -> Arc<CanaryRuntime> {
        let mut runtimes = lock(&self.runtimes);
        if let Some(runtime) = runtimes.get(key).filter(|r| r.fingerprint == fingerprint) {
            return runtime.clone();
        }
        let analysis = CanaryAnalysis::new(canary, key, self.registry.telemetry().clone());
        let runtime = Arc::new(CanaryRuntime {
            fingerprint: fingerprint.to_string(),
            source: Arc::new(tokio::sync::Mutex::new(None)),
            series: analysis.series_handle(),
            unpersisted: Mutex::new(None),
            analysis: tokio::sync::Mutex::new(analysis),
            guard_watch: Mutex::new(None),
            ticked: AtomicBool::new(false),
        });
        runtimes.insert(key.to_string(), runtime.clone());
        runtime
    }

    /// The status decided for `canary` since its last write, if it builds on the version read.
    fn unpersisted(
        &self,
        key: &str,
        fingerprint: &str,
        canary: &CanaryResource,
    ) -> Option<CanaryResourceStatus> {
        let runtime = self
            .cached_runtime(key)
            .filter(|r| r.fingerprint == fingerprint)?;
        let unpersisted = lock(&runtime.unpersisted);
        unpersisted
            .as_ref()
            .filter(|u| u.base_version == canary.resource_version())
            .map(|u| u.status.clone())
    }

    fn keep_unpersisted(&self, key: &str, unpersisted: Option<Unpersisted>) {
        if let Some(runtime) = self.cached_runtime(key) {
            *lock(&runtime.unpersisted) = unpersisted;
        }
    }

    /// Whether `key`'s rollout (`fingerprint`) ran an analysis interval in this term.
    fn ticked(&self, key: &str, fingerprint: &str) -> bool {
        self.cached_runtime(key)
            .is_some_and(|r| r.fingerprint == fingerprint && r.ticked.load(Ordering::Relaxed))
    }

    /// When this term's reconciles began (its Canary cache filled): where a restarted
    /// controller's or a new leader's first readings are scheduled from.
    fn term_ready(&self) -> DateTime<Utc> {
        *self.first_pass.get_or_init(|| self.clock.now())
    }

    fn cached_runtime(&self, key: &str) -> Option<Arc<CanaryRuntime>> {
        lock(&self.runtimes).get(key).cloned()
    }

    /// This interval's observation from the rollout's source (built on first use).
    async fn observe(
        &self,
        runtime: &CanaryRuntime,
        canary: &fledge_core::spec::Canary,
    ) -> std::result::Result<std::result::Result<Observation, ObservationError>, String> {
        let mut source = runtime.source.lock().await;
        if source.is_none() {
            *source = Some(self.backends.metrics_source(canary)?);
        }
        match source.as_mut() {
            Some(source) => Ok(source.observe().await),
            None => Err("the metrics source could not be built".to_string()),
        }
    }

    /// A guard trip seen since the last reconcile, if any (handed over once).
    fn take_guard_trip(&self, key: &str) -> Option<DateTime<Utc>> {
        lock(&self.guard_trips).remove(key)
    }

    fn guard_trip_pending(&self, key: &str) -> bool {
        lock(&self.guard_trips).contains_key(key)
    }

    /// Run the guard watch of `key` while its rollout needs one; stop it otherwise.
    fn watch_guard(
        &self,
        key: &str,
        canary: &fledge_core::spec::Canary,
        fingerprint: &str,
        status: &CanaryStatus,
    ) {
        let every = canary
            .spec
            .analysis
            .guard
            .as_ref()
            .map(|guard| guard.check_interval.0)
            .filter(|_| guard_watched(status));
        let Some(every) = every else {
            if let Some(runtime) = self.cached_runtime(key) {
                lock(&runtime.guard_watch).take();
            }
            return;
        };
        let runtime = self.runtime(key, canary, fingerprint);
        let mut watch = lock(&runtime.guard_watch);
        if watch.as_ref().is_some_and(|w| !w.0.is_finished()) {
            return;
        }
        *watch = Some(GuardWatch(tokio::spawn(guard_watch(
            key.to_string(),
            runtime.source.clone(),
            every,
            self.guard_trips.clone(),
            self.guard_trigger.clone(),
        ))));
    }

    /// Show the Canary on the dashboard and in `/metrics` as it now stands.
    fn show(
        &self,
        key: &str,
        canary: &fledge_core::spec::Canary,
        resource_status: &CanaryResourceStatus,
        problem: Option<String>,
    ) {
        let mut status = resource_status.rollout.clone();
        if let Some(weight) = resource_status
            .workload
            .as_ref()
            .and_then(|w| w.canary_weight)
        {
            // With a workload, the weight shown is the one routed (its lifecycle's).
            status.canary_weight = weight;
        }
        let status = &status;
        let runtime = self.cached_runtime(key);
        // A reconcile may be calling the hooks right now: then keep what was last shown.
        let webhooks = runtime
            .as_ref()
            .and_then(|r| r.analysis.try_lock().ok().map(|a| a.webhooks()))
            .or_else(|| self.registry.get(key).map(|view| view.webhooks))
            .unwrap_or_default();
        let series = runtime.map(|r| r.series.clone());
        let view = CanaryView {
            name: key.to_string(),
            service: canary.spec.service.clone(),
            steps: canary.spec.analysis.plan().len(),
            threshold: canary.spec.analysis.rollback_threshold(),
            status: status.clone(),
            router_error: problem,
            conflict: None,
            series: Vec::new(),
            webhooks,
            workload: resource_status.workload.clone(),
        };
        self.registry.publish_view(view, series);
        self.registry.telemetry().observe_status(key, status);
    }

    /// Publish a Kubernetes Event, if the client-side API limit has room: Events tell people
    /// what the status already records, so under load they give way to the status writes and
    /// route changes decisions need (a gateway going down makes one Event per Canary behind
    /// it; queued, they would hold every decision of the fleet). A dropped Event is logged.
    async fn publish(&self, canary: &CanaryResource, warning: bool, reason: &str, message: &str) {
        let Some(_room) = self.deferrable_room() else {
            tracing::debug!(canary = %key_of(canary), reason, "Kubernetes Event not published: the API request budget (--kube-api-qps) is in use by status writes");
            return;
        };
        let mut note = message.to_string();
        if note.len() > 1000 {
            let cut = (0..=1000)
                .rev()
                .find(|i| note.is_char_boundary(*i))
                .unwrap_or(0);
            note.truncate(cut);
        }
        let event = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.to_string(),
            note: Some(note),
            action: EVENT_ACTION.to_string(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &canary.object_ref(&())).await {
            tracing::warn!(canary = %canary.name_any(), reason, error = %e, "could not publish a Kubernetes Event");
        }
    }
}

impl Context {
    /// Room in the client-side API budget for one deferrable request (see
    /// [`TokenBucket::claim_room`]); hold it until the request is done. `None`: no room now.
    fn deferrable_room(&self) -> Option<Option<RoomClaim>> {
        match &self.api_budget {
            None => Some(None),
            Some(budget) => budget.claim_room().map(Some),
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match mutex.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

fn key_of(canary: &CanaryResource) -> String {
    format!(
        "{}/{}",
        canary.namespace().unwrap_or_default(),
        canary.name_any()
    )
}

/// Which rollout the Canary asks for: its `metadata.generation` (bumped by the API server on
/// every spec change, and only then) plus the rollout annotation. Unlike a hash of the parsed
/// spec, this does not change when a newer controller knows more (defaulted) spec fields, so
/// upgrading the controller never restarts running rollouts.
fn rollout_fingerprint(canary: &CanaryResource) -> String {
    let spec = match canary.metadata.generation {
        Some(generation) => format!("generation-{generation}"),
        None => crate::state::fingerprint(&canary.spec.canary),
    };
    match canary.annotation(ROLLOUT_ANNOTATION) {
        Some(rollout) => format!("{spec}/{rollout}"),
        None => spec,
    }
}

/// A command annotation not acted on yet: the first new or changed one in
/// [`COMMAND_ANNOTATIONS`] order, as (annotation, value, command). Others stay pending for the
/// next reconcile. It is marked handled only when the state machine is given it, so a command
/// that arrives while the routes or the route ownership block the rollout waits, not vanishes.
fn pending_command(
    canary: &CanaryResource,
    status: &CanaryResourceStatus,
) -> Option<(&'static str, String, Command)> {
    COMMAND_ANNOTATIONS.iter().find_map(|(key, command)| {
        let value = canary.annotation(key)?;
        if status.handled_commands.get(*key).map(String::as_str) == Some(value) {
            return None;
        }
        Some((*key, value.to_string(), *command))
    })
}

/// Whether `new` differs from the persisted `previous` in something a reader needs now or a
/// restarted controller needs to continue correctly: phase, weight, step and when it began,
/// failed checks (a rollback threshold must survive restarts), a pause by the operator, the
/// history, commands handled, conditions, final routes, the rollout's fingerprint and
/// generation. Written at once, before any traffic moves, whatever else waits for the API.
///
/// Not: the sequential tests' evidence, the last analysis report and message, the passing
/// checks of the step and `lastTickAt` — progress within a step that a restart may re-gather
/// (ticks are aligned, so `lastTickAt` is not needed to schedule them), written with the next
/// change or at the next checkpoint; and the count of intervals without metrics, written as
/// soon as the API budget has room (see [`progress_due`]).
fn must_persist(previous: &CanaryResourceStatus, new: &CanaryResourceStatus) -> bool {
    durable(previous) != durable(new)
}

/// Whether the progress in `new` (everything [`must_persist`] leaves out) is due for a write
/// when the API budget has room: at the checkpoint, or when the count of intervals without
/// metrics changed. That count is not urgent: one metrics endpoint serves many Canaries, so
/// when it fails they all count at once (1,000 Canaries behind one gateway: 1,000 writes, and
/// as many again when it recovers) — written at once, that would hold every decision of the
/// fleet behind the queue it makes. A restart may lose the part of the count not written yet,
/// which delays a rollback for missing metrics by at most that many intervals.
fn progress_due(
    previous: &CanaryResourceStatus,
    new: &CanaryResourceStatus,
    now: DateTime<Utc>,
    checkpoint: Duration,
    key: &str,
) -> bool {
    previous.rollout.metrics_failures != new.rollout.metrics_failures
        || checkpoint_due(previous, now, checkpoint, key)
}

/// `status` without the fields that are only checkpointed (see [`must_persist`]).
fn durable(status: &CanaryResourceStatus) -> CanaryResourceStatus {
    let mut durable = status.clone();
    durable.rollout.last_analysis = None;
    durable.rollout.analysis_state = Default::default();
    durable.rollout.step_passed_checks = 0;
    durable.rollout.metrics_failures = 0;
    durable.rollout.message.clear();
    durable.last_tick_at = None;
    for condition in &mut durable.conditions {
        if condition.type_ != super::crd::condition::READY {
            condition.message.clear();
        }
    }
    durable
}

/// Whether the checkpointed fields are due for a write: `checkpoint` (plus a spread of up to
/// one more `checkpoint` per Canary, so thousands of Canaries do not write at once) after the
/// persisted `lastTickAt`. `Duration::ZERO`: every change is written.
fn checkpoint_due(
    previous: &CanaryResourceStatus,
    now: DateTime<Utc>,
    checkpoint: Duration,
    key: &str,
) -> bool {
    if checkpoint.is_zero() {
        return true;
    }
    let spread = schedule::phase_of(key, checkpoint);
    let every = chrono::Duration::from_std(checkpoint + spread).unwrap_or(chrono::Duration::MAX);
    previous
        .last_tick_at
        .is_none_or(|written| now - written >= every)
}

/// The routes the persisted status asks for: with a workload, the weight its lifecycle
/// decided (the managed routes only while the analysis runs); otherwise the rollout's.
fn desired_routes(status: &CanaryResourceStatus) -> Option<DesiredRoutes> {
    match &status.workload {
        Some(workload) => workload
            .canary_weight
            .map(|weight| DesiredRoutes::for_rollout(weight, workload.phase.analysing())),
        None => Some(DesiredRoutes::for_rollout(
            status.rollout.canary_weight,
            !status.rollout.phase.is_terminal(),
        )),
    }
}

/// Write `status` with the resourceVersion `canary` was read at (409 → [`Error::Conflict`]);
/// returns the Canary as written.
async fn write_status(
    canary: &CanaryResource,
    status: &CanaryResourceStatus,
    ctx: &Context,
) -> Result<CanaryResource> {
    let namespace = canary
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let name = canary.name_any();
    let api: Api<CanaryResource> = Api::namespaced(ctx.client.clone(), &namespace);
    let mut object = canary.clone();
    object.status = Some(status.clone());
    object.metadata.managed_fields = None;
    match api
        .replace_status(&name, &PostParams::default(), &object)
        .await
    {
        Ok(written) => {
            if let Some(version) = canary.resource_version() {
                lock(&ctx.superseded).insert(key_of(canary), version);
            }
            Ok(written)
        }
        Err(e) if api_status_code(&e) == Some(409) => Err(Error::Conflict(key_of(canary))),
        Err(e) => Err(e.into()),
    }
}

/// Entry point for kube-runtime's `Controller`: each pass runs as a task of its own. The
/// controller polls every reconcile in flight from one task, so the 1,000 Canaries behind one
/// gateway, judged at one tick, would otherwise be decided one after another on one core (and
/// a new leader's 10,000 first passes likewise). Kube still runs at most one pass per Canary at
/// a time: it waits for the task. A pass dropped by the controller (the term ended and its
/// grace passed) is aborted with it.
pub async fn reconcile(canary: Arc<CanaryResource>, ctx: Arc<Context>) -> Result<Action> {
    use tracing::Instrument;
    let task = tokio::spawn(reconcile_pass(canary, ctx).in_current_span());
    let _abort_with_caller = AbortOnDrop(task.abort_handle());
    task.await.map_err(|e| Error::Task(e.to_string()))?
}

/// Aborts a task when its caller goes away.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One pass of [`reconcile`].
async fn reconcile_pass(canary: Arc<CanaryResource>, ctx: Arc<Context>) -> Result<Action> {
    if !*ctx.leader.borrow() {
        return Ok(Action::requeue(ctx.retry_delay));
    }
    ctx.term_ready();
    let stale = {
        let superseded = lock(&ctx.superseded);
        canary
            .resource_version()
            .is_some_and(|v| superseded.get(&key_of(&canary)) == Some(&v))
    };
    if stale {
        // Our own status write has not reached the cache yet; its watch event will trigger us.
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    let namespace = canary
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let api: Api<CanaryResource> = Api::namespaced(ctx.client.clone(), &namespace);
    finalizer(&api, FINALIZER, canary, |event| async {
        match event {
            // Boxed: a reconcile waiting in the queue holds a pointer, not the whole pass.
            FinalizerEvent::Apply(canary) => Box::pin(apply(canary, &ctx)).await,
            FinalizerEvent::Cleanup(canary) => Box::pin(cleanup(canary, &ctx)).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

/// What to do after an error: conflicts are retried at once (with the fresh object), anything
/// else after `retry_delay`.
pub fn error_policy(canary: Arc<CanaryResource>, error: &Error, ctx: Arc<Context>) -> Action {
    let conflict = match error {
        Error::Conflict(_) => true,
        Error::Finalizer(inner) => matches!(
            inner.as_ref(),
            kube::runtime::finalizer::Error::ApplyFailed(Error::Conflict(_))
                | kube::runtime::finalizer::Error::CleanupFailed(Error::Conflict(_))
        ),
        _ => false,
    };
    let waiting = matches!(
        error,
        Error::Finalizer(inner)
            if matches!(inner.as_ref(), kube::runtime::finalizer::Error::CleanupFailed(Error::Waiting(_)))
    );
    if conflict {
        tracing::debug!(canary = %key_of(&canary), "status write conflicted; reconciling the new version");
        Action::requeue(Duration::from_millis(500))
    } else if waiting {
        tracing::debug!(canary = %key_of(&canary), error = %error, "deletion waits for the workload");
        Action::requeue(Duration::from_secs(1).min(ctx.retry_delay))
    } else {
        tracing::warn!(canary = %key_of(&canary), error = %error, kind = error.label(), "reconcile failed; retrying");
        let kind = match error {
            Error::Router { .. } => ErrorKind::Router,
            Error::Backend { .. } => ErrorKind::Metrics,
            _ => ErrorKind::Api,
        };
        ctx.registry
            .telemetry()
            .record_error(&key_of(&canary), kind);
        Action::requeue(ctx.retry_delay)
    }
}

/// Read a Canary's data-plane guard gauge every `every`; a trip not seen before is left in
/// `trips` and wakes the controller, whose next reconcile hands it to the state machine (the
/// analysis tick is not waited for: this is the fast path of a rollback).
async fn guard_watch(
    key: String,
    source: SharedSource,
    every: Duration,
    trips: PendingTrips,
    trigger: Option<UnboundedSender<()>>,
) {
    let mut last_seen = None;
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let reading = {
            let mut source = source.lock().await;
            match source.as_mut() {
                Some(source) => source.guard_tripped_at().await,
                None => continue, // no analysis has built it yet
            }
        };
        match reading {
            Ok(Some(tripped_at)) if last_seen != Some(tripped_at) => {
                last_seen = Some(tripped_at);
                tracing::warn!(canary = %key, %tripped_at, "data-plane guard tripped");
                lock(&trips).insert(key.clone(), tripped_at);
                if let Some(trigger) = &trigger {
                    let _ = trigger.unbounded_send(());
                }
            }
            Ok(_) => {}
            Err(error) => {
                tracing::debug!(canary = %key, %error, "cannot read the guard; the analysis still runs")
            }
        }
    }
}

/// A live Canary (not being deleted): one pass of short, named steps. Each step either lets
/// the pass go on or ends it with the action to take.
async fn apply(canary: Arc<CanaryResource>, ctx: &Context) -> Result<Action> {
    let now = ctx.clock.now();
    let core = canary.to_core();
    if let Err(errors) = core.validate() {
        return Box::pin(invalid_spec(&canary, &core, errors.to_string(), now, ctx)).await;
    }
    let mut pass = Pass::begin(&canary, core, now, ctx);
    if pass.handed_off() {
        return Ok(pass.stay_handed_off());
    }
    if let Some(conflict) = pass.route_conflict() {
        return Box::pin(pass.blocked(reason::ROUTE_CONFLICT, conflict, true)).await;
    }
    let router = match pass.router() {
        Ok(router) => router,
        Err(message) => return Box::pin(pass.blocked(reason::ROUTER_ERROR, message, false)).await,
    };
    // Level-triggered: the routes follow the persisted status before anything is judged.
    if let Err(message) = Box::pin(pass.routes_follow_status(router.as_ref())).await {
        return Box::pin(pass.blocked(reason::ROUTER_ERROR, message, true)).await;
    }
    // Each step's future is boxed: the 10,000 reconciles of one aligned tick all wait in
    // `tick` at once, and each should hold only the frames of that step (about 30 KB each
    // when the pass held every step's state inline).
    let decided = match Box::pin(pass.tick()).await {
        Ok(decided) => decided,
        Err(message) => {
            return Box::pin(pass.blocked(reason::METRICS_SOURCE_ERROR, message, true)).await
        }
    };
    let workload = Box::pin(pass.workload(decided.as_ref())).await?;
    if let Some(problems) = workload.as_ref().and_then(WorkloadPass::problems) {
        return Box::pin(pass.workload_blocked(problems, router.as_ref())).await;
    }
    let written = Box::pin(pass.persist()).await?;
    Box::pin(pass.act(written, decided, workload, router.as_ref())).await
}

/// An invalid spec: `Ready=False/InvalidSpec` (every problem names its field and fix), one
/// Warning Event, and nothing moves until the spec is edited.
async fn invalid_spec(
    canary: &CanaryResource,
    core: &fledge_core::spec::Canary,
    errors: String,
    now: DateTime<Utc>,
    ctx: &Context,
) -> Result<Action> {
    let generation = canary.metadata.generation;
    let previous = canary.status.clone().unwrap_or_default();
    let mut status = previous.clone();
    status.observed_generation = generation;
    let readiness = Readiness::not_ready(reason::INVALID_SPEC, errors.clone());
    status.set_conditions(&readiness, generation, now);
    if status != previous {
        write_status(canary, &status, ctx).await?;
        ctx.publish(canary, true, reason::INVALID_SPEC, &errors)
            .await;
    }
    ctx.show(&key_of(canary), core, &status, Some(errors));
    Ok(Action::await_change())
}

/// One reconcile of a valid, live Canary: what it read and what it has decided so far.
struct Pass<'a> {
    ctx: &'a Context,
    canary: &'a CanaryResource,
    core: fledge_core::spec::Canary,
    key: String,
    now: DateTime<Utc>,
    /// Which rollout the Canary asks for (see [`rollout_fingerprint`]).
    fingerprint: String,
    /// The status as read.
    previous: CanaryResourceStatus,
    /// The status as this pass will write it.
    status: CanaryResourceStatus,
    /// The command annotation to act on, if any, as (annotation, value, command).
    pending: Option<(&'static str, String, Command)>,
    /// What the state machine is told in this pass besides an interval: the pending command,
    /// or a guard trip.
    command: Option<Command>,
    /// An interval was due but the command went first: the next reconcile runs it at once.
    interval_deferred: bool,
    /// With a workload: the canary weight the route was confirmed at in this pass.
    routed: Option<u8>,
    /// The phase of this Canary's aligned ticks ([`schedule`]).
    phase: Duration,
    /// When the interval judged in this pass was due.
    judged_due: Option<DateTime<Utc>>,
}

/// What the workload lifecycle read and decided in one pass.
struct WorkloadPass {
    facts: workload::Facts,
    decision: workload::Decision,
}

impl WorkloadPass {
    /// Bad input (`Ready=False`), each problem naming its field and fix.
    fn problems(&self) -> Option<String> {
        let problems = &self.decision.problems;
        (!problems.is_empty()).then(|| fledge_core::spec::SpecErrors(problems.clone()).to_string())
    }
}

impl<'a> Pass<'a> {
    /// Read where the rollout stands: a changed spec or rollout annotation starts a new
    /// rollout; a pending command (or else a guard trip) is what this pass acts on.
    fn begin(
        canary: &'a CanaryResource,
        core: fledge_core::spec::Canary,
        now: DateTime<Utc>,
        ctx: &'a Context,
    ) -> Self {
        let key = key_of(canary);
        let fingerprint = rollout_fingerprint(canary);
        let previous = canary.status.clone().unwrap_or_default();
        let mut status = previous.clone();
        if status.spec_fingerprint.as_deref() != Some(fingerprint.as_str()) {
            if previous.spec_fingerprint.is_some() {
                tracing::info!(canary = %key, "spec or rollout annotation changed: starting a new rollout");
            }
            // A workload's state is its objects' and outlives a spec change; its analysis
            // restarts only while it runs (at rest, nothing is rolled out again).
            let workload = previous
                .workload
                .clone()
                .filter(|_| core.spec.target_ref.is_some());
            let keep_rollout = workload.as_ref().is_some_and(|w| !w.phase.analysing());
            status = CanaryResourceStatus {
                spec_fingerprint: Some(fingerprint.clone()),
                // Commands written before this rollout started are not meant for it.
                handled_commands: canary.command_annotations(),
                conditions: previous.conditions.clone(),
                rollout: if keep_rollout {
                    previous.rollout.clone()
                } else {
                    CanaryStatus::default()
                },
                workload,
                ..CanaryResourceStatus::default()
            };
            ctx.forget(&key);
        } else if let Some(unpersisted) = ctx.unpersisted(&key, &fingerprint, canary) {
            // Analysis progress decided since the last write (see `persist`).
            status = unpersisted;
        }
        if core.spec.target_ref.is_none() {
            status.workload = None;
        }
        let pending = pending_command(canary, &status);
        let mut command = pending.as_ref().map(|(_, _, command)| *command);
        if status.rollout.phase.is_terminal() {
            // A trip seen just as the rollout finished changes nothing.
            ctx.take_guard_trip(&key);
        } else if command.is_none() {
            command = ctx
                .take_guard_trip(&key)
                .map(|tripped_at| Command::GuardTripped { tripped_at });
        }
        Pass {
            ctx,
            canary,
            key,
            now,
            fingerprint,
            previous,
            status,
            pending,
            command,
            interval_deferred: false,
            routed: None,
            phase: ctx.backends.tick_phase(&core),
            judged_due: None,
            core,
        }
    }

    /// Finished, the final routes are in place, and no command asks for more: from here the
    /// routes are yours (or GitOps') again, e.g. to make the promoted version the new stable.
    fn handed_off(&self) -> bool {
        // A workload is never handed off: at rest its route stays at stable 100.
        self.core.spec.target_ref.is_none()
            && self.status.rollout.phase.is_terminal()
            && self.status.final_routes_applied
            && self.command.is_none()
    }

    fn stay_handed_off(self) -> Action {
        self.ctx.watch_guard(
            &self.key,
            &self.core,
            &self.fingerprint,
            &self.status.rollout,
        );
        self.ctx.show(&self.key, &self.core, &self.status, None);
        Action::await_change()
    }

    /// Why this Canary must wait: another one already steers its route.
    fn route_conflict(&self) -> Option<String> {
        let route = route_of(self.canary)?;
        let routes = self.ctx.routes.as_ref()?;
        let owner = routes.index.taken_by(self.canary, &route)?;
        Some(format!("{route} is steered by Canary {owner}; this Canary waits until that one finishes or is deleted (one Canary per route)"))
    }

    fn router(&self) -> std::result::Result<Box<dyn TrafficRouter>, String> {
        let namespace = self.canary.namespace().unwrap_or_default();
        self.ctx
            .backends
            .router(&self.ctx.client, &self.core, &namespace)
    }

    /// Make the routes serve what the persisted status says.
    async fn routes_follow_status(
        &mut self,
        router: &dyn TrafficRouter,
    ) -> std::result::Result<(), String> {
        // A workload routes nothing until its lifecycle has decided a weight.
        let Some(desired) = desired_routes(&self.status) else {
            return Ok(());
        };
        if !self.routes_known_to_serve(&desired) {
            let epoch = self.route_epoch();
            if let Err(e) = router.ensure(&desired).await {
                self.ctx
                    .registry
                    .telemetry()
                    .record_error(&self.key, ErrorKind::Router);
                return Err(e.to_string());
            }
            self.routes_confirmed(desired, epoch);
        }
        if let Some(workload) = &self.status.workload {
            self.routed = workload.canary_weight;
        } else if self.status.rollout.phase.is_terminal() {
            self.status.final_routes_applied = true;
        }
        Ok(())
    }

    /// Whether the routes already serve `desired` without asking the API server: confirmed
    /// by the router and unchanged since, or so in the object the route watch delivered.
    fn routes_known_to_serve(&self, desired: &DesiredRoutes) -> bool {
        let Some(routes) = &self.ctx.routes else {
            return false;
        };
        if routes.confirmed.holds(&self.key, desired) {
            return true;
        }
        let epoch = routes.confirmed.epoch(&self.key);
        let namespace = self.canary.namespace().unwrap_or_default();
        let serves = route_of(self.canary)
            .and_then(|route| routes.objects.get(&route))
            .and_then(|object| serde_json::to_value(object.as_ref()).ok())
            .is_some_and(|object| {
                crate::router::factory::serves(&self.core.spec, &namespace, &object, desired)
                    .unwrap_or(false)
            });
        if serves {
            routes.confirmed.confirm(&self.key, *desired, epoch);
        }
        serves
    }

    /// The route's change count before asking the router (see [`ConfirmedRoutes`]).
    fn route_epoch(&self) -> u64 {
        self.ctx
            .routes
            .as_ref()
            .map_or(0, |routes| routes.confirmed.epoch(&self.key))
    }

    fn routes_confirmed(&self, desired: DesiredRoutes, epoch: u64) {
        if let Some(routes) = &self.ctx.routes {
            routes.confirmed.confirm(&self.key, desired, epoch);
        }
    }

    /// When the next analysis is due: the first aligned tick half an interval or more after
    /// `lastTickAt` ([`schedule`]: every Canary reading one metrics endpoint is judged at the
    /// same instants, so one read serves them all); `None`: at once.
    ///
    /// A rollout under way that this term has not read yet (a restarted controller, a new
    /// leader) is read first at [`schedule::first_reading`]: the baselines of a whole fleet
    /// are spread by endpoint instead of all due at once, and each Canary's first judgement
    /// still comes as early as the aligned ticks allow.
    fn next_tick(&self) -> Option<DateTime<Utc>> {
        let interval = self.core.spec.analysis.interval.0;
        if self.status.last_tick_at.is_some() && !self.ctx.ticked(&self.key, &self.fingerprint) {
            let start = self.ctx.term_ready();
            return Some(schedule::first_reading(start, interval, self.phase));
        }
        schedule::next_tick(self.status.last_tick_at, interval, self.phase)
    }

    /// Whether an analysis interval is due.
    fn interval_due(&self) -> bool {
        // A workload is analysed only while the target serves the revision under test.
        let analysing = self
            .status
            .workload
            .as_ref()
            .is_none_or(|w| w.phase.analysing())
            && (self.core.spec.target_ref.is_none() || self.status.workload.is_some());
        analysing
            && !self.status.rollout.phase.is_terminal()
            && self.next_tick().is_none_or(|due| self.now >= due)
    }

    /// The analysis tick, if one is due (see [`crate::tick`]). A command goes first, on its
    /// own: it needs no metrics (an abort must work while the metrics source is down); an
    /// interval due meanwhile runs in the next reconcile, at once. `Err`: the metrics source
    /// cannot be built.
    async fn tick(&mut self) -> std::result::Result<Option<Decided>, String> {
        if let Some((annotation, value, _)) = &self.pending {
            self.status
                .handled_commands
                .insert(annotation.to_string(), value.clone());
        }
        self.interval_deferred = self.interval_due() && self.command.is_some();
        let interval_due = self.interval_due() && self.command.is_none();
        if !interval_due && self.command.is_none() {
            self.prepare_source().await;
            return Ok(None);
        }
        let runtime = self.ctx.runtime(&self.key, &self.core, &self.fingerprint);
        let trigger = match self.command {
            Some(command) => Trigger::Command(command),
            None => Trigger::Interval(Box::pin(self.ctx.observe(&runtime, &self.core))),
        };
        let decided = runtime
            .analysis
            .lock()
            .await
            .decide(&self.status.rollout, trigger, self.now)
            .await?;
        self.status.rollout = decided.status.clone();
        if !self.status.rollout.phase.is_terminal() {
            // e.g. a retried rollback: its end will need its final routes applied again.
            self.status.final_routes_applied = false;
        }
        if interval_due {
            self.judged_due = Some(self.next_tick().unwrap_or(self.now));
            runtime.ticked.store(true, Ordering::Relaxed);
            self.status.last_tick_at = Some(self.now);
        }
        if self.status.rollout.phase == Phase::Initializing {
            // A retried rollout starts at once, like a new one.
            self.status.last_tick_at = None;
        }
        Ok(Some(decided))
    }

    /// Build the metrics source of a rollout that will be analysed before its first tick is
    /// due (a new term's first pass: see [`schedule::first_reading`]): a source joins its
    /// endpoint's shared reads when built, and when 1,000 Canaries of one Prometheus joined
    /// while their first reads were under way, each read asked for a different set of series
    /// (one query each instead of one for all). Failing here is left for the tick to report.
    async fn prepare_source(&self) {
        let resting = self
            .status
            .workload
            .as_ref()
            .is_some_and(|w| !w.phase.analysing());
        if resting || self.status.rollout.phase.is_terminal() || self.status.last_tick_at.is_none()
        {
            return;
        }
        let runtime = self.ctx.runtime(&self.key, &self.core, &self.fingerprint);
        let mut source = runtime.source.lock().await;
        if source.is_none() {
            *source = self.ctx.backends.metrics_source(&self.core).ok();
        }
    }

    /// With `targetRef`: read the workload and let the lifecycle (`fledge_core::workload`)
    /// decide — after the tick, so a promotion or rollback the tick decided is acted on in this
    /// pass. A new revision restarts the rollout; the analysis starts as soon as the target
    /// serves it. `Err`: the workload objects could not be read (retried).
    async fn workload(&mut self, decided: Option<&Decided>) -> Result<Option<WorkloadPass>> {
        if self.core.spec.target_ref.is_none() {
            return Ok(None);
        }
        let namespace = self.canary.namespace().unwrap_or_default();
        let api = WorkloadApi::new(&self.ctx.client, &namespace);
        let mut facts = api.facts(self.canary, self.routed).await?;
        facts.retry = decided.is_some_and(|d| {
            d.before.phase == Phase::RolledBack && d.status.phase == Phase::Initializing
        });
        let current = self.status.workload.clone().unwrap_or_default();
        if current.phase == WorkloadPhase::Waiting && self.confirmation_due() {
            let runtime = self.ctx.runtime(&self.key, &self.core, &self.fingerprint);
            let answer = runtime
                .analysis
                .lock()
                .await
                .confirm_rollout(&self.status.rollout)
                .await;
            facts.rollout_confirmed = Some(answer);
            self.status.last_tick_at = Some(self.now);
        }
        let decision = workload::step(
            &self.core.spec,
            &current,
            &self.status.rollout,
            &facts,
            self.now,
        );
        if let Some(rollout) = &decision.rollout {
            self.status.rollout = rollout.clone();
        }
        if decision.status.phase.analysing() != current.phase.analysing()
            || decision.rollout.is_some()
        {
            // The analysis starts (or restarts) at once, not an interval later.
            self.status.last_tick_at = None;
        }
        self.status.workload = Some(decision.status.clone());
        Ok(Some(WorkloadPass { facts, decision }))
    }

    /// Whether the confirm-rollout hooks are due again (at most once per interval).
    fn confirmation_due(&self) -> bool {
        let interval = self.core.spec.analysis.interval.to_chrono();
        self.status
            .last_tick_at
            .is_none_or(|last| self.now - last >= interval)
    }

    /// Bad workload input: `Ready=False` naming the fields and fixes. Nothing is scaled; once
    /// adopted, the weights still go where pods are (the lifecycle said which).
    async fn workload_blocked(
        self,
        problems: String,
        router: &dyn TrafficRouter,
    ) -> Result<Action> {
        let desired = desired_routes(&self.status);
        let retry = self.ctx.retry_delay;
        not_ready(
            self.canary,
            self.previous,
            self.status,
            reason::INVALID_WORKLOAD,
            problems,
            self.ctx,
        )
        .await?;
        if let Some(desired) = desired {
            if let Err(e) = router.ensure(&desired).await {
                tracing::warn!(canary = %self.key, error = %e, "could not move traffic to where pods are");
            }
        }
        Ok(Action::requeue(retry))
    }

    /// Persist the new status (Ready) before anything is acted on: a write that loses a race
    /// (409) ends the pass and nothing below happens. Returns the Canary as written.
    ///
    /// Only what a reader needs is written at once (see [`must_persist`]); analysis progress
    /// alone (evidence, the last report, `lastTickAt`, metrics failures) is kept in memory and
    /// written when due ([`progress_due`]) and the client-side API limit has room: it never
    /// makes a decision wait for a token, and waits for a later tick instead.
    async fn persist(&mut self) -> Result<CanaryResource> {
        let generation = self.canary.metadata.generation;
        self.status.observed_generation = generation;
        self.status
            .set_conditions(&Readiness::ok(), generation, self.now);
        let unchanged = self.status == self.previous;
        let must = !unchanged && must_persist(&self.previous, &self.status);
        let progress_due = !unchanged
            && !must
            && progress_due(
                &self.previous,
                &self.status,
                self.now,
                self.ctx.status_checkpoint,
                &self.key,
            );
        // Held until the write is done: see `TokenBucket::claim_room`.
        let room = progress_due.then(|| self.ctx.deferrable_room()).flatten();
        let written = if unchanged {
            self.ctx.keep_unpersisted(&self.key, None);
            self.canary.clone()
        } else if must || room.is_some() {
            let written = write_status(self.canary, &self.status, self.ctx).await?;
            self.ctx.keep_unpersisted(&self.key, None);
            written
        } else {
            let unpersisted = Unpersisted {
                base_version: self.canary.resource_version(),
                status: self.status.clone(),
            };
            self.ctx.keep_unpersisted(&self.key, Some(unpersisted));
            self.canary.clone()
        };
        if let Some(due) = self.judged_due {
            // Late from its aligned tick (or from this leadership term's start: a new leader's
            // first ticks are not late for the time no one led) to the decision recorded.
            let due = due.max(self.ctx.started);
            let lag = (self.ctx.clock.now() - due).to_std().unwrap_or_default();
            self.ctx.registry.telemetry().record_lag(lag);
            if lag > Duration::from_secs(1) {
                tracing::debug!(target: "fledge::lag", canary = %self.key, lag_ms = lag.as_millis() as u64, %due, "analysis decided late");
            }
        }
        Ok(written)
    }

    /// Act on what was persisted: tell people (Events, event webhooks), move the routes
    /// (and apply a finished rollout's final routes once), call the post-rollout hooks, and
    /// requeue for the next interval.
    async fn act(
        mut self,
        written: CanaryResource,
        decided: Option<Decided>,
        workload: Option<WorkloadPass>,
        router: &dyn TrafficRouter,
    ) -> Result<Action> {
        let ctx = self.ctx;
        let runtime = ctx.runtime(&self.key, &self.core, &self.fingerprint);
        let events = KubernetesEvents {
            ctx,
            canary: self.canary,
            key: &self.key,
        };
        if let Some(decided) = &decided {
            runtime.analysis.lock().await.notify(decided, &events).await;
        }
        if let Some(workload) = &workload {
            events.workload(&workload.decision).await;
        }
        let moves = decided.as_ref().is_some_and(Decided::moves_weights);
        let finished = self.status.rollout.phase.is_terminal() && !self.status.final_routes_applied;
        let mut routes_moved = true;
        // A workload's routes follow its lifecycle every pass (no write when they already do).
        let desired =
            desired_routes(&self.status).filter(|_| moves || finished || workload.is_some());
        if let Some(desired) = desired {
            let epoch = self.route_epoch();
            if let Err(e) = router.ensure(&desired).await {
                // The status already says where traffic should be; the next reconcile retries.
                tracing::warn!(canary = %self.key, error = %e, "could not move traffic yet");
                ctx.registry
                    .telemetry()
                    .record_error(&self.key, ErrorKind::Router);
                routes_moved = false;
            } else {
                self.routes_confirmed(desired, epoch);
            }
        }
        if let (Some(decided), None) = (&decided, &workload) {
            // Once per rollout (it ends in one reconcile only), after the routes were moved.
            runtime.analysis.lock().await.finish(decided).await;
        }
        if let (Some(workload), true) = (&workload, routes_moved) {
            // The objects after the routes: a scale-down only ever follows confirmed weights.
            let namespace = self.canary.namespace().unwrap_or_default();
            WorkloadApi::new(&ctx.client, &namespace)
                .perform(&workload.decision.actions, &workload.facts)
                .await?;
            if workload
                .decision
                .actions
                .contains(&WorkloadAction::PostRollout)
            {
                // The release is over (Succeeded or Failed): once, as it ends in one pass.
                let analysis = runtime.analysis.lock().await;
                analysis.post_rollout(&self.status.rollout).await;
            }
        }
        if !routes_moved {
            let problem = format!(
                "{} does not serve the wanted weights yet; retrying",
                router.route()
            );
            ctx.show(&self.key, &self.core, &self.status, Some(problem));
            return Ok(Action::requeue(ctx.retry_delay));
        }
        if finished && workload.is_none() {
            self.status.final_routes_applied = true;
            write_status(&written, &self.status, ctx).await?;
        }
        ctx.watch_guard(
            &self.key,
            &self.core,
            &self.fingerprint,
            &self.status.rollout,
        );
        ctx.show(&self.key, &self.core, &self.status, None);
        Ok(self.requeue())
    }

    /// When to look again: a finished rollout waits for a change; a pending guard trip or an
    /// interval deferred by a command runs at once; otherwise at the next interval.
    fn requeue(&self) -> Action {
        if let Some(workload) = &self.status.workload {
            if let Some(action) = self.workload_requeue(workload) {
                return action;
            }
        } else if self.status.rollout.phase.is_terminal() {
            return Action::await_change();
        }
        if self.ctx.guard_trip_pending(&self.key) || self.interval_deferred {
            return Action::requeue(Duration::from_millis(100));
        }
        let next_tick = self.next_tick().unwrap_or(self.now);
        let wait = (next_tick - self.now)
            .to_std()
            .unwrap_or(Duration::ZERO)
            .max(Duration::from_millis(100));
        Action::requeue(wait)
    }

    /// When to look at a workload again, unless its analysis runs (then: the next interval).
    /// Changes of its Deployments and HPAs wake it anyway; this covers the clocks (deadlines,
    /// the scale-down delay) and the confirm-rollout hooks.
    fn workload_requeue(&self, workload: &workload::WorkloadStatus) -> Option<Action> {
        const POLL: Duration = Duration::from_secs(1);
        let settled = workload.phase.at_rest()
            && workload.target.desired == 0
            && workload.weights_held.is_none();
        match workload.phase {
            WorkloadPhase::Progressing => None,
            WorkloadPhase::Waiting => Some(Action::requeue(self.core.spec.analysis.interval.0)),
            _ if settled => Some(Action::await_change()),
            _ => Some(Action::requeue(POLL.min(self.ctx.retry_delay))),
        }
    }

    /// The rollout cannot go on in this pass: record why (`Ready=False` and one Warning Event
    /// per change of reason or message) and look again after the retry delay, or once the
    /// Canary changes.
    async fn blocked(self, why: &str, message: String, retry: bool) -> Result<Action> {
        not_ready(
            self.canary,
            self.previous,
            self.status,
            why,
            message,
            self.ctx,
        )
        .await?;
        Ok(if retry {
            Action::requeue(self.ctx.retry_delay)
        } else {
            Action::await_change()
        })
    }
}

/// `fledge controller` tells people through Kubernetes Events on the Canary.
struct KubernetesEvents<'a> {
    ctx: &'a Context,
    canary: &'a CanaryResource,
    key: &'a str,
}

#[async_trait]
impl Announce for KubernetesEvents<'_> {
    async fn announce(&self, decided: &Decided) {
        for action in &decided.actions {
            if let RolloutAction::Event {
                reason,
                warning,
                message,
            } = action
            {
                tracing::info!(canary = %self.key, reason = ?reason, "{message}");
                self.ctx
                    .publish(self.canary, *warning, &format!("{reason:?}"), message)
                    .await;
            }
        }
    }
}

impl KubernetesEvents<'_> {
    /// The workload lifecycle's events, and those of a rollout it rolled back (a deadline).
    async fn workload(&self, decision: &workload::Decision) {
        for action in &decision.actions {
            if let WorkloadAction::Event {
                reason,
                warning,
                message,
            } = action
            {
                tracing::info!(canary = %self.key, reason, "{message}");
                self.ctx
                    .publish(self.canary, *warning, reason, message)
                    .await;
            }
        }
        let decided = Decided {
            before: CanaryStatus::default(),
            status: decision.rollout.clone().unwrap_or_default(),
            actions: decision.rollout_actions.clone(),
            judged: None,
        };
        self.announce(&decided).await;
    }
}

/// Record that the Canary is not ready (one Warning Event per change of reason or message).
async fn not_ready(
    canary: &CanaryResource,
    previous: CanaryResourceStatus,
    mut status: CanaryResourceStatus,
    why: &str,
    message: String,
    ctx: &Context,
) -> Result<()> {
    let key = key_of(canary);
    tracing::warn!(canary = %key, reason = why, "{message}");
    ctx.show(&key, &canary.to_core(), &status, Some(message.clone()));
    let generation = canary.metadata.generation;
    status.observed_generation = generation;
    status.set_conditions(
        &Readiness::not_ready(why, message.clone()),
        generation,
        ctx.clock.now(),
    );
    let was = previous.condition(super::crd::condition::READY);
    let is = status.condition(super::crd::condition::READY);
    let changed = was.map(|c| (&c.reason, &c.message)) != is.map(|c| (&c.reason, &c.message));
    if status != previous {
        write_status(canary, &status, ctx).await?;
    }
    if changed {
        ctx.publish(canary, true, why, &message).await;
    }
    Ok(())
}

/// A deleted Canary: mid-rollout, all traffic goes back to stable and every route the router
/// manages besides the weights (testers route, mirror, guard route) is removed; a finished
/// rollout's routes are left alone. Then it may go.
async fn cleanup(canary: Arc<CanaryResource>, ctx: &Context) -> Result<Action> {
    let key = key_of(&canary);
    if let Some(runtime) = ctx.cached_runtime(&key) {
        // Event notifications in flight get a moment (each is bounded by its own timeout).
        let mut analysis = runtime.analysis.lock().await;
        let _ = tokio::time::timeout(Duration::from_secs(5), analysis.drain()).await;
    }
    ctx.forget(&key);
    ctx.registry.remove(&key);
    ctx.registry.telemetry().forget(&key);
    let namespace = canary
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    if canary.spec.target_ref.is_some() {
        return cleanup_workload(&canary, &namespace, ctx).await;
    }
    let status = canary.status.clone().unwrap_or_default();
    let phase = status.rollout.phase;
    if phase.is_terminal() && status.final_routes_applied {
        tracing::info!(canary = %key, "deleted after it finished; the routes are left as they are");
        return Ok(Action::await_change());
    }
    let weights = if phase == Phase::Promoted {
        Weights::canary_percent(100)
    } else {
        Weights::canary_percent(0)
    };
    let router = match ctx
        .backends
        .router(&ctx.client, &canary.to_core(), &namespace)
    {
        Ok(router) => router,
        Err(message) => {
            tracing::warn!(canary = %key, "deleted; no route to restore: {message}");
            return Ok(Action::await_change());
        }
    };
    match router.ensure(&DesiredRoutes::weights_only(weights)).await {
        // Not confirmed live (e.g. the Gateway has not accepted it yet): the route object says
        // where traffic goes, which is all a deleted Canary can do.
        Ok(_) | Err(RouterError::NotAccepted(_)) => {
            let message = format!(
                "Canary deleted: {} sends {}% to stable, {}% to canary",
                router.route(),
                weights.stable,
                weights.canary
            );
            tracing::info!(canary = %key, "{message}");
            ctx.publish(&canary, false, reason::TRAFFIC_RESTORED, &message)
                .await;
            Ok(Action::await_change())
        }
        Err(e) if e.nothing_to_restore() => {
            let message = format!("Canary deleted; no route to restore: {e}");
            tracing::warn!(canary = %key, "{message}");
            ctx.publish(&canary, true, reason::ROUTER_ERROR, &message)
                .await;
            Ok(Action::await_change())
        }
        Err(e) => Err(Error::Router {
            name: key,
            message: format!("cannot restore traffic before deletion (will retry): {e}"),
        }),
    }
}

/// A deleted Canary with a workload (see `fledge_core::workload::on_deletion`): all traffic to
/// the primary, which is released to keep serving — or, with `revertOnDeletion`, the target
/// gets the primary's template back, is scaled up and given all traffic, and the primary goes
/// with the Canary. Until that is done the Canary stays (`Error::Waiting` looks again soon).
async fn cleanup_workload(
    canary: &CanaryResource,
    namespace: &str,
    ctx: &Context,
) -> Result<Action> {
    let key = key_of(canary);
    let now = ctx.clock.now();
    let mut status = canary.status.clone().unwrap_or_default();
    let router = ctx
        .backends
        .router(&ctx.client, &canary.to_core(), namespace);
    let current = status.workload.clone().unwrap_or_default();
    // The route as it is now (confirmed by re-applying what the status last asked for).
    let mut routed = None;
    if let (Ok(router), Some(weight)) = (&router, current.canary_weight) {
        let desired = DesiredRoutes::weights_only(Weights::canary_percent(weight));
        if router.ensure(&desired).await.is_ok() {
            routed = Some(weight);
        }
    }
    let api = WorkloadApi::new(&ctx.client, namespace);
    let facts = api.facts(canary, routed).await?;
    let cleanup = workload::on_deletion(&canary.spec.canary, &current, &facts, now);
    if let (Ok(router), Some(weight)) = (&router, cleanup.canary_weight) {
        let desired = DesiredRoutes::weights_only(Weights::canary_percent(weight));
        if let Err(e) = router.ensure(&desired).await {
            if !e.nothing_to_restore() {
                return Err(Error::Router {
                    name: key,
                    message: format!("cannot move traffic before deletion (will retry): {e}"),
                });
            }
        }
    }
    let message = cleanup.status.message.clone();
    if status.workload.as_ref() != Some(&cleanup.status) {
        status.workload = Some(cleanup.status.clone());
        write_status(canary, &status, ctx).await?;
    }
    api.perform(&cleanup.actions, &facts).await?;
    if !cleanup.done {
        return Err(Error::Waiting(message));
    }
    tracing::info!(canary = %key, "{message}");
    ctx.publish(canary, false, reason::TRAFFIC_RESTORED, &message)
        .await;
    Ok(Action::await_change())
}

/// How `fledge controller` runs.
#[derive(Debug, Clone)]
pub struct ControllerOptions {
    /// Watch Canaries in this namespace only (`None`: all namespaces).
    pub namespace: Option<String>,
    pub lease: LeaseSettings,
    pub retry_delay: Duration,
    /// How often analysis progress alone is written to `.status` (see [`must_persist`]).
    pub status_checkpoint: Duration,
    /// Only the Canaries of these namespaces (`--shard N/M`).
    pub shard: Option<Shard>,
    /// Only the Canaries with these labels (`--selector`, a Kubernetes label selector).
    pub selector: Option<String>,
    /// How long in-flight reconciles may take to finish when a term ends (shutdown, or the
    /// Lease lost) before they are abandoned and the Lease released (see [`SHUTDOWN_GRACE`]).
    pub shutdown_grace: Duration,
}

/// How long in-flight reconciles get to finish when a leadership term ends. A reconcile
/// writes the status before it acts, so one abandoned later (say, queued behind the client-side
/// API limit) loses no step: the next leader continues from the status, and its routes follow
/// it. Bounded so that a successor takes over within seconds (and well inside Kubernetes'
/// 30 s termination grace, after which the process would be killed without releasing the
/// Lease, and the successor would wait for it to expire).
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The Kubernetes clients of a controller: `api` for everything but leader election, which
/// has its own (unthrottled) client so that queued requests never delay a Lease renewal.
#[derive(Clone)]
pub struct Clients {
    pub api: Client,
    pub election: Client,
    /// The client-side limit `api` is held to, if any: checkpoints are written only while it
    /// has room (see [`Context::api_budget`]).
    pub budget: Option<TokenBucket>,
}

impl Clients {
    /// One unthrottled client for both (tests).
    pub fn single(client: Client) -> Self {
        Clients {
            api: client.clone(),
            election: client,
            budget: None,
        }
    }
}

/// The Canaries this instance owns, from a watch of those matching `selector`, filtered to
/// `shard`'s namespaces before they are cached (other shards' Canaries cost no memory here),
/// without managed fields (not needed, and a large part of each object).
fn owned_canaries(
    api: Api<CanaryResource>,
    selector: Option<&str>,
    shard: Option<Shard>,
) -> (
    Store<CanaryResource>,
    impl futures::Stream<Item = std::result::Result<CanaryResource, watcher::Error>> + Send + 'static,
) {
    let mut config = watcher::Config::default();
    if let Some(selector) = selector {
        config = config.labels(selector);
    }
    let writer = kube::runtime::reflector::store::Writer::default();
    let store = writer.as_reader();
    let owned = move |canary: &CanaryResource| {
        shard.is_none_or(|shard| shard.owns(&canary.namespace().unwrap_or_default()))
    };
    let events = watcher(api, config)
        .default_backoff()
        .filter_map(move |event| {
            let event = match event {
                Ok(
                    watcher::Event::Apply(canary)
                    | watcher::Event::InitApply(canary)
                    | watcher::Event::Delete(canary),
                ) if !owned(&canary) => None,
                other => Some(
                    other.map(|event| event.modify(|canary| canary.managed_fields_mut().clear())),
                ),
            };
            futures::future::ready(event)
        });
    let stream = kube::runtime::reflector(writer, events).applied_objects();
    (store, stream)
}

/// Resolves when a leadership term ends: leadership lost or shutdown asked for.
fn term_end(
    mut leader: watch::Receiver<bool>,
    mut shutdown: watch::Receiver<bool>,
) -> futures::future::Shared<futures::future::BoxFuture<'static, ()>> {
    use futures::FutureExt;
    async move {
        tokio::select! {
            _ = leader.wait_for(|l| !*l) => {}
            _ = shutdown.wait_for(|s| *s) => {}
        }
    }
    .boxed()
    .shared()
}

/// Run the controller until `shutdown` turns true: elect a leader; while leading, reconcile
/// Canaries (and re-check one whenever the object holding its route changes, or at once when a guard
/// watch sees a trip). `registry` shows the leader's canaries (the dashboard, the status API,
/// `/metrics`); a standby shows none and says why. On shutdown the in-flight reconciles
/// finish, then the lease is released.
pub async fn run(
    clients: Clients,
    options: ControllerOptions,
    backends: Arc<dyn Backends>,
    clock: Arc<dyn Clock>,
    registry: Registry,
    is_leader: watch::Sender<bool>,
    shutdown: watch::Receiver<bool>,
) -> Result<()> {
    let standby_note = format!(
        "standby: this fledge controller ({}) does not hold the Lease {}/{}; the leader's dashboard shows the canaries",
        options.lease.identity, options.lease.namespace, options.lease.name
    );
    registry.clear(Some(standby_note.clone()));
    let leader = is_leader.subscribe();
    let (stop_election, election_stopped) = watch::channel(false);
    let client = clients.api;
    let api_budget = clients.budget;
    let lock = LeaseLock::new(clients.election, options.lease.clone(), clock.clone());
    let election = tokio::spawn(run_election(lock, is_leader, election_stopped));

    loop {
        let mut leading = leader.clone();
        let mut stopping = shutdown.clone();
        tokio::select! {
            changed = leading.wait_for(|l| *l) => if changed.is_err() { break },
            _ = stopping.wait_for(|s| *s) => break,
        }
        tracing::info!(identity = %options.lease.identity, "leading: starting the Canary controller");
        registry.set_note(None);
        let (guard_trigger, guard_trips) = futures::channel::mpsc::unbounded();
        let canaries: Api<CanaryResource> = match &options.namespace {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        };
        let (store, owned) = owned_canaries(canaries, options.selector.as_deref(), options.shard);
        let controller = Controller::for_stream(owned, store.clone());
        let workload_changes =
            super::workload::workload_changes(&client, options.namespace.as_deref(), store.clone());
        let index = Arc::new(RouteIndex::new(store));
        let confirmed = Arc::new(ConfirmedRoutes::default());
        let (objects, route_changes) = routes::watch(
            &client,
            options.namespace.as_deref(),
            index.clone(),
            confirmed.clone(),
        );
        let ctx = Arc::new(Context {
            retry_delay: options.retry_delay,
            status_checkpoint: options.status_checkpoint,
            api_budget: api_budget.clone(),
            registry: registry.clone(),
            guard_trigger: Some(guard_trigger),
            routes: Some(RouteState {
                objects,
                confirmed,
                index,
            }),
            ..Context::new(
                client.clone(),
                backends.clone(),
                clock.clone(),
                leader.clone(),
                &options.lease.identity,
            )
        });
        let term_ends = term_end(leader.clone(), shutdown.clone());
        let term = controller
            .reconcile_on(route_changes)
            .reconcile_on(workload_changes)
            .reconcile_all_on(guard_trips)
            .graceful_shutdown_on(term_ends.clone())
            .run(reconcile, error_policy, ctx)
            .for_each(|result| async move {
                match result {
                    Ok((canary, _)) => tracing::debug!(canary = %canary, "reconciled"),
                    Err(e) => tracing::debug!(error = %e, "reconcile error"),
                }
            });
        tokio::select! {
            _ = term => {}
            _ = async { term_ends.await; tokio::time::sleep(options.shutdown_grace).await } => {
                tracing::warn!(grace = ?options.shutdown_grace, "in-flight reconciles did not finish in time after the term ended; abandoning them (each wrote its status before acting: the next leader continues from it)");
            }
        }
        tracing::info!("Canary controller stopped");
        // What this term showed is no longer kept up to date.
        registry.clear(Some(standby_note.clone()));
        if *shutdown.borrow() {
            break;
        }
    }
    stop_election.send_replace(true);
    election
        .await
        .map_err(|e| Error::Lease(format!("election task failed: {e}")))
}
