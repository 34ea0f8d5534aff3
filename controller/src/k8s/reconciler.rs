//! The Canary reconciler: idempotent and level-triggered; all rollout state is in `.status`.
//!
//! One call of [`reconcile`] for a Canary:
//!
//! 1. **Finalizer** (kube's helper): a new Canary first gets `fledge.dev/traffic`; a deleted one
//!    runs [`cleanup`] (all traffic back to stable unless it was promoted) before it goes away.
//! 2. **Validate** the spec (`fledge_core`'s validation: every problem names the field and fix);
//!    an invalid spec sets `Ready=False/InvalidSpec` and waits for an edit.
//! 3. **Routes follow the status**: the VirtualService is made to serve `status.canaryWeight`
//!    (plus the testers route / mirror while the rollout runs). Nothing is judged while the
//!    routes are not as wanted.
//! 4. **Analysis tick, only when due**: `status.lastTickAt + interval <= now` (or an operator
//!    command annotation is new). Then the metrics source is read and the pure
//!    `fledge_core::rollout::step` decides. Reconciles triggered by anything else (our own status
//!    write, a VirtualService edit, a resync) find no tick due and change nothing — which is
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
use super::crd::{reason, Canary, CanaryResourceStatus, Readiness, COMMAND_ANNOTATIONS};
use super::factory::Backends;
use super::lease::{run_election, LeaseLock, LeaseSettings};
use super::{api_status_code, Error, Result, CONTROLLER_NAME, FINALIZER};
use crate::dashboard::series::Series;
use crate::metrics::MetricsSource;
use crate::router::istio::{virtual_service_resource, DesiredRoutes, IstioError};
use crate::router::Weights;
use crate::runner::{guard_watched, CanaryView, Registry};
use crate::telemetry::ErrorKind;
use crate::webhooks::WebhookCaller;
use chrono::{DateTime, Utc};
use fledge_core::observe::{Observation, ObservationError};
use fledge_core::rollout::{Action as RolloutAction, CanaryStatus, Command, Gates, Input, Phase};
use futures::channel::mpsc::UnboundedSender;
use futures::StreamExt;
use kube::api::{Api, DynamicObject, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{finalizer, Event as FinalizerEvent};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// Annotation whose value, when changed, starts a new rollout of the same spec (e.g. set it to
/// the version being released: `fledge.dev/rollout: v3`).
pub const ROLLOUT_ANNOTATION: &str = "fledge.dev/rollout";
/// Event `action` field.
const EVENT_ACTION: &str = "Rollout";

/// A metrics source, built on first use (building can fail; it is tried again next time).
type SharedSource = Arc<tokio::sync::Mutex<Option<Box<dyn MetricsSource>>>>;

/// What one Canary keeps in memory for one rollout during one leadership term: the metrics
/// source (it holds the previous cumulative reading), the webhooks (their last calls and the
/// notifications in flight), the dashboard's time series and, while it runs, the guard watch.
/// None of it is needed to continue a rollout correctly: a new leader starts without it.
struct CanaryRuntime {
    fingerprint: String,
    source: SharedSource,
    webhooks: tokio::sync::Mutex<WebhookCaller>,
    series: Mutex<Series>,
    guard_watch: Mutex<Option<GuardWatch>>,
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
    /// Every Canary the controller watches (to find two naming the same route).
    pub canaries: Option<Store<Canary>>,
    runtimes: Mutex<HashMap<String, Arc<CanaryRuntime>>>,
    guard_trips: PendingTrips,
    /// resourceVersions this instance has replaced with a status write: an object still at one
    /// of them is a stale cache entry (our own write's watch event has not arrived yet).
    superseded: Mutex<HashMap<String, String>>,
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
            client,
            backends,
            clock,
            leader,
            retry_delay: Duration::from_secs(10),
            registry: Registry::default(),
            guard_trigger: None,
            canaries: None,
            runtimes: Mutex::new(HashMap::new()),
            guard_trips: Arc::new(Mutex::new(HashMap::new())),
            superseded: Mutex::new(HashMap::new()),
        }
    }

    /// Forget a Canary's in-memory state (its rollout changed, or it was deleted).
    fn forget(&self, key: &str) {
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
        let runtime = Arc::new(CanaryRuntime {
            fingerprint: fingerprint.to_string(),
            source: Arc::new(tokio::sync::Mutex::new(None)),
            webhooks: tokio::sync::Mutex::new(
                WebhookCaller::new(canary, self.registry.telemetry().clone()).labelled(key),
            ),
            series: Mutex::new(Series::default()),
            guard_watch: Mutex::new(None),
        });
        runtimes.insert(key.to_string(), runtime.clone());
        runtime
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
        status: &CanaryStatus,
        problem: Option<String>,
    ) {
        let runtime = self.cached_runtime(key);
        let series = runtime
            .as_ref()
            .map(|r| lock(&r.series).points())
            .unwrap_or_default();
        let webhooks = runtime
            .as_ref()
            .and_then(|r| r.webhooks.try_lock().ok().map(|w| w.statuses()))
            .or_else(|| {
                // A reconcile is calling the hooks right now: keep the last shown statuses.
                self.registry.get(key).map(|view| view.webhooks)
            })
            .unwrap_or_default();
        self.registry.publish_view(CanaryView {
            name: key.to_string(),
            service: canary.spec.service.clone(),
            steps: canary.spec.analysis.plan().len(),
            threshold: canary.spec.analysis.threshold,
            status: status.clone(),
            router_error: problem,
            conflict: None,
            series,
            webhooks,
        });
        self.registry.telemetry().observe_status(key, status);
    }

    async fn publish(&self, canary: &Canary, warning: bool, reason: &str, message: &str) {
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

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match mutex.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

fn key_of(canary: &Canary) -> String {
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
fn rollout_fingerprint(canary: &Canary) -> String {
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
    canary: &Canary,
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

/// The Canary that already steers `canary`'s VirtualService route, if another one does: the
/// oldest (then the first by name) of those naming it wins, and a finished one whose final
/// routes are applied steers nothing any more. Two Canaries moving one route's weights would
/// undo each other's steps and judge traffic neither of them set.
fn route_taken_by(store: &Store<Canary>, canary: &Canary) -> Option<String> {
    let mine = canary.spec.router.istio.as_ref()?;
    let rank = |c: &Canary| (c.metadata.creation_timestamp.clone(), c.name_any());
    store
        .state()
        .iter()
        .filter(|other| {
            other.namespace() == canary.namespace() && other.name_any() != canary.name_any()
        })
        .filter(|other| {
            other.spec.router.istio.as_ref().is_some_and(|theirs| {
                theirs.virtual_service == mine.virtual_service && theirs.route == mine.route
            })
        })
        .filter(|other| {
            !other.status.as_ref().is_some_and(|status| {
                status.rollout.phase.is_terminal() && status.final_routes_applied
            })
        })
        .filter(|other| rank(other) < rank(canary))
        .map(|other| key_of(other))
        .next()
}

fn desired_routes(status: &CanaryResourceStatus) -> DesiredRoutes {
    DesiredRoutes {
        weights: Weights::canary_percent(status.rollout.canary_weight),
        rollout_active: Some(!status.rollout.phase.is_terminal()),
    }
}

/// Write `status` with the resourceVersion `canary` was read at (409 → [`Error::Conflict`]);
/// returns the Canary as written.
async fn write_status(
    canary: &Canary,
    status: &CanaryResourceStatus,
    ctx: &Context,
) -> Result<Canary> {
    let namespace = canary
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let name = canary.name_any();
    let api: Api<Canary> = Api::namespaced(ctx.client.clone(), &namespace);
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

/// Entry point for kube-runtime's `Controller`.
pub async fn reconcile(canary: Arc<Canary>, ctx: Arc<Context>) -> Result<Action> {
    if !*ctx.leader.borrow() {
        return Ok(Action::requeue(ctx.retry_delay));
    }
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
    let api: Api<Canary> = Api::namespaced(ctx.client.clone(), &namespace);
    finalizer(&api, FINALIZER, canary, |event| async {
        match event {
            FinalizerEvent::Apply(canary) => apply(canary, &ctx).await,
            FinalizerEvent::Cleanup(canary) => cleanup(canary, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

/// What to do after an error: conflicts are retried at once (with the fresh object), anything
/// else after `retry_delay`.
pub fn error_policy(canary: Arc<Canary>, error: &Error, ctx: Arc<Context>) -> Action {
    let conflict = match error {
        Error::Conflict(_) => true,
        Error::Finalizer(inner) => matches!(
            inner.as_ref(),
            kube::runtime::finalizer::Error::ApplyFailed(Error::Conflict(_))
                | kube::runtime::finalizer::Error::CleanupFailed(Error::Conflict(_))
        ),
        _ => false,
    };
    if conflict {
        tracing::debug!(canary = %key_of(&canary), "status write conflicted; reconciling the new version");
        Action::requeue(Duration::from_millis(500))
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

/// Until the workload lifecycle is wired into this reconciler (issue 11), a `targetRef` must
/// not be accepted and silently ignored.
fn workloads_not_managed_yet(
    canary: &fledge_core::spec::Canary,
) -> std::result::Result<(), fledge_core::spec::SpecErrors> {
    match canary.spec.target_ref {
        None => Ok(()),
        Some(_) => Err(fledge_core::spec::SpecErrors(vec![fledge_core::spec::SpecError {
            field: "spec.targetRef".into(),
            problem: "this fledge controller does not manage workloads yet".into(),
            fix: "remove targetRef (and the fields that need it) until a controller that releases Deployments is deployed".into(),
        }])),
    }
}

/// A live Canary (not being deleted).
async fn apply(canary: Arc<Canary>, ctx: &Context) -> Result<Action> {
    let now = ctx.clock.now();
    let key = key_of(&canary);
    let namespace = canary
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let generation = canary.metadata.generation;
    let core = canary.to_core();
    let previous = canary.status.clone().unwrap_or_default();

    if let Err(errors) = core
        .validate()
        .and_then(|()| workloads_not_managed_yet(&core))
    {
        let mut status = previous.clone();
        status.observed_generation = generation;
        let readiness = Readiness::not_ready(reason::INVALID_SPEC, errors.to_string());
        status.set_conditions(&readiness, generation, now);
        if status != previous {
            write_status(&canary, &status, ctx).await?;
            ctx.publish(&canary, true, reason::INVALID_SPEC, &errors.to_string())
                .await;
        }
        ctx.show(&key, &core, &status.rollout, Some(errors.to_string()));
        return Ok(Action::await_change());
    }

    let fingerprint = rollout_fingerprint(&canary);
    let mut status = previous.clone();
    if status.spec_fingerprint.as_deref() != Some(fingerprint.as_str()) {
        if previous.spec_fingerprint.is_some() {
            tracing::info!(canary = %key, "spec or rollout annotation changed: starting a new rollout");
        }
        status = CanaryResourceStatus {
            spec_fingerprint: Some(fingerprint.clone()),
            // Commands written before this rollout started are not meant for it.
            handled_commands: canary.command_annotations(),
            conditions: previous.conditions.clone(),
            ..CanaryResourceStatus::default()
        };
        ctx.forget(&key);
    }
    let pending = pending_command(&canary, &status);
    let mut command = pending.as_ref().map(|(_, _, command)| *command);
    if status.rollout.phase.is_terminal() {
        // A trip seen just as the rollout finished changes nothing.
        ctx.take_guard_trip(&key);
    } else if command.is_none() {
        command = ctx
            .take_guard_trip(&key)
            .map(|tripped_at| Command::GuardTripped { tripped_at });
    }
    if status.rollout.phase.is_terminal() && status.final_routes_applied && command.is_none() {
        // Finished, and the final routes are in place: hands off. From here the routes are
        // yours (or GitOps') again, e.g. to make the promoted version the new stable.
        ctx.watch_guard(&key, &core, &fingerprint, &status.rollout);
        ctx.show(&key, &core, &status.rollout, None);
        return Ok(Action::await_change());
    }

    if let Some(owner) = ctx
        .canaries
        .as_ref()
        .and_then(|store| route_taken_by(store, &canary))
    {
        let route = canary
            .spec
            .router
            .istio
            .as_ref()
            .map(|r| format!("{} route {:?}", r.virtual_service, r.route))
            .unwrap_or_default();
        not_ready(
            &canary,
            previous,
            status,
            reason::ROUTE_CONFLICT,
            format!("VirtualService {route} is steered by Canary {owner}; this Canary waits until that one finishes or is deleted (one Canary per route)"),
            ctx,
        )
        .await?;
        return Ok(Action::requeue(ctx.retry_delay));
    }
    let router = match ctx.backends.router(&ctx.client, &core, &namespace) {
        Ok(router) => router,
        Err(message) => {
            return not_ready(
                &canary,
                previous,
                status,
                reason::ROUTER_ERROR,
                message,
                ctx,
            )
            .await
            .map(|()| Action::await_change())
        }
    };
    // Level-triggered: the routes follow the persisted status before anything is judged.
    if let Err(e) = router.ensure(&desired_routes(&status)).await {
        ctx.registry
            .telemetry()
            .record_error(&key, ErrorKind::Router);
        not_ready(
            &canary,
            previous,
            status,
            reason::ROUTER_ERROR,
            e.to_string(),
            ctx,
        )
        .await?;
        return Ok(Action::requeue(ctx.retry_delay));
    }
    if status.rollout.phase.is_terminal() {
        status.final_routes_applied = true;
    }

    let interval = core.spec.analysis.interval;
    let tick_due = !status.rollout.phase.is_terminal()
        && status
            .last_tick_at
            .is_none_or(|last| now - last >= interval.to_chrono());
    // A command goes first, on its own: it needs no metrics (an abort must work while the
    // metrics source is down). A tick due meanwhile runs in the next reconcile, at once.
    let tick_deferred = tick_due && command.is_some();
    let tick_due = tick_due && command.is_none();
    let mut actions = Vec::new();
    let before = status.rollout.clone();
    let runtime = ctx.runtime(&key, &core, &fingerprint);
    if let Some((annotation, value, _)) = &pending {
        status
            .handled_commands
            .insert(annotation.to_string(), value.clone());
    }
    if tick_due || command.is_some() {
        let webhooks = runtime.webhooks.lock().await;
        let started = std::time::Instant::now();
        let (gates, observation) = if tick_due {
            // Hooks first (a load test starts before the interval is read), as in `fledge run`.
            let gates = webhooks.before_interval(&status.rollout).await;
            match ctx.observe(&runtime, &core).await {
                Ok(observation) => (gates, Some(observation)),
                Err(message) => {
                    drop(webhooks);
                    ctx.registry
                        .telemetry()
                        .record_error(&key, ErrorKind::Metrics);
                    not_ready(
                        &canary,
                        previous,
                        status,
                        reason::METRICS_SOURCE_ERROR,
                        message,
                        ctx,
                    )
                    .await?;
                    return Ok(Action::requeue(ctx.retry_delay));
                }
            }
        } else {
            (Gates::default(), None)
        };
        if matches!(&observation, Some(Err(e)) if *e != ObservationError::Baseline) {
            ctx.registry
                .telemetry()
                .record_error(&key, ErrorKind::Metrics);
        }
        let observed = observation.as_ref().and_then(|o| o.as_ref().ok().cloned());
        let input = Input {
            observation,
            command,
        };
        let decision = webhooks.decide(&status.rollout, &input, gates, now).await;
        drop(webhooks);
        let report = decision
            .status
            .last_analysis
            .as_ref()
            .filter(|r| tick_due && r.at >= now);
        if let Some(report) = report {
            ctx.registry
                .telemetry()
                .record_analysis(&key, report, started.elapsed());
        }
        if tick_due {
            let mut series = lock(&runtime.series);
            match &observed {
                Some(o) => series.record(
                    now,
                    interval.0.as_secs_f64(),
                    before.canary_weight,
                    before.phase,
                    o,
                    report.map(|r| r.report.verdict),
                ),
                None => series.skip(now),
            }
        }
        ctx.registry
            .telemetry()
            .record_decisions(&key, &decision.actions);
        status.rollout = decision.status;
        if !status.rollout.phase.is_terminal() {
            // e.g. a retried rollback: its end will need its final routes applied again.
            status.final_routes_applied = false;
        }
        if tick_due {
            status.last_tick_at = Some(now);
        }
        if status.rollout.phase == Phase::Initializing {
            // A retried rollout starts at once, like a new one.
            status.last_tick_at = None;
        }
        actions = decision.actions;
    }
    status.observed_generation = generation;
    status.set_conditions(&Readiness::ok(), generation, now);
    let mut current = (*canary).clone();
    if status != previous {
        // Persist first: if this fails (e.g. 409), nothing below happens.
        current = write_status(&current, &status, ctx).await?;
    }

    let mut move_routes = false;
    for action in &actions {
        match action {
            RolloutAction::SetWeight { .. } => move_routes = true,
            RolloutAction::Event {
                reason,
                warning,
                message,
            } => {
                tracing::info!(canary = %key, reason = ?reason, "{message}");
                ctx.publish(&canary, *warning, &format!("{reason:?}"), message)
                    .await;
            }
        }
    }
    runtime
        .webhooks
        .lock()
        .await
        .notify(&status.rollout, &actions);
    let just_finished = status.rollout.phase.is_terminal() && !before.phase.is_terminal();
    let finished = status.rollout.phase.is_terminal() && !status.final_routes_applied;
    let mut routes_moved = true;
    if move_routes || finished {
        if let Err(e) = router.ensure(&desired_routes(&status)).await {
            // The status already says where traffic should be; the next reconcile retries.
            tracing::warn!(canary = %key, error = %e, "could not move traffic yet");
            ctx.registry
                .telemetry()
                .record_error(&key, ErrorKind::Router);
            routes_moved = false;
        }
    }
    if just_finished {
        // Once per rollout (the transition happens in one reconcile only), after the routes
        // were moved (or tried: the hook is told the outcome, not the routes' state).
        runtime
            .webhooks
            .lock()
            .await
            .post_rollout(&status.rollout)
            .await;
    }
    if !routes_moved {
        ctx.show(
            &key,
            &core,
            &status.rollout,
            Some("the VirtualService does not serve the wanted weights yet; retrying".into()),
        );
        return Ok(Action::requeue(ctx.retry_delay));
    }
    if finished {
        status.final_routes_applied = true;
        write_status(&current, &status, ctx).await?;
    }
    ctx.watch_guard(&key, &core, &fingerprint, &status.rollout);
    ctx.show(&key, &core, &status.rollout, None);

    if status.rollout.phase.is_terminal() {
        return Ok(Action::await_change());
    }
    if ctx.guard_trip_pending(&key) || tick_deferred {
        // A trip arrived while an operator command was handled, or a tick waits: next.
        return Ok(Action::requeue(Duration::from_millis(100)));
    }
    let next_tick = status.last_tick_at.unwrap_or(now) + interval.to_chrono();
    let wait = (next_tick - now)
        .to_std()
        .unwrap_or(Duration::ZERO)
        .max(Duration::from_millis(100));
    Ok(Action::requeue(wait))
}

/// Record that the Canary is not ready (one Warning Event per change of reason or message).
async fn not_ready(
    canary: &Canary,
    previous: CanaryResourceStatus,
    mut status: CanaryResourceStatus,
    why: &str,
    message: String,
    ctx: &Context,
) -> Result<()> {
    let key = key_of(canary);
    tracing::warn!(canary = %key, reason = why, "{message}");
    ctx.show(
        &key,
        &canary.to_core(),
        &status.rollout,
        Some(message.clone()),
    );
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

/// A deleted Canary: mid-rollout, all traffic goes back to stable and the testers route and
/// mirror are removed; a finished rollout's routes are left alone. Then it may go.
async fn cleanup(canary: Arc<Canary>, ctx: &Context) -> Result<Action> {
    let key = key_of(&canary);
    if let Some(runtime) = ctx.cached_runtime(&key) {
        // Event notifications in flight get a moment (each is bounded by its own timeout).
        let mut webhooks = runtime.webhooks.lock().await;
        let _ = tokio::time::timeout(Duration::from_secs(5), webhooks.drain()).await;
    }
    ctx.forget(&key);
    ctx.registry.remove(&key);
    ctx.registry.telemetry().forget(&key);
    let namespace = canary
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
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
            tracing::warn!(canary = %key, "deleted; no Istio route to restore: {message}");
            return Ok(Action::await_change());
        }
    };
    let desired = DesiredRoutes {
        weights,
        rollout_active: Some(false),
    };
    match router.ensure(&desired).await {
        Ok(_) => {
            let message = format!(
                "Canary deleted: VirtualService {} route {:?} sends {}% to stable, {}% to canary",
                router.settings().virtual_service,
                router.settings().route,
                weights.stable,
                weights.canary
            );
            tracing::info!(canary = %key, "{message}");
            ctx.publish(&canary, false, reason::TRAFFIC_RESTORED, &message)
                .await;
            Ok(Action::await_change())
        }
        Err(e @ (IstioError::NotFound(_) | IstioError::Invalid { .. })) => {
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

/// How `fledge controller` runs.
#[derive(Debug, Clone)]
pub struct ControllerOptions {
    /// Watch Canaries in this namespace only (`None`: all namespaces).
    pub namespace: Option<String>,
    pub lease: LeaseSettings,
    pub retry_delay: Duration,
}

/// Canaries whose router names this VirtualService.
fn canaries_using(
    store: &kube::runtime::reflector::Store<Canary>,
    virtual_service: &DynamicObject,
) -> Vec<ObjectRef<Canary>> {
    let namespace = virtual_service.namespace();
    let name = virtual_service.name_any();
    store
        .state()
        .iter()
        .filter(|c| c.namespace() == namespace)
        .filter(|c| {
            c.spec
                .router
                .istio
                .as_ref()
                .is_some_and(|istio| istio.virtual_service == name)
        })
        .map(|c| ObjectRef::from_obj(c.as_ref()))
        .collect()
}

/// Run the controller until `shutdown` turns true: elect a leader; while leading, reconcile
/// Canaries (and re-check one whenever its VirtualService changes, or at once when a guard
/// watch sees a trip). `registry` shows the leader's canaries (the dashboard, the status API,
/// `/metrics`); a standby shows none and says why. On shutdown the in-flight reconciles
/// finish, then the lease is released.
pub async fn run(
    client: Client,
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
    let lock = LeaseLock::new(client.clone(), options.lease.clone(), clock.clone());
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
        let (canaries, virtual_services): (Api<Canary>, Api<DynamicObject>) =
            match &options.namespace {
                Some(ns) => (
                    Api::namespaced(client.clone(), ns),
                    Api::namespaced_with(client.clone(), ns, &virtual_service_resource()),
                ),
                None => (
                    Api::all(client.clone()),
                    Api::all_with(client.clone(), &virtual_service_resource()),
                ),
            };
        let controller = Controller::new(canaries, watcher::Config::default());
        let store = controller.store();
        let ctx = Arc::new(Context {
            retry_delay: options.retry_delay,
            registry: registry.clone(),
            guard_trigger: Some(guard_trigger),
            canaries: Some(store.clone()),
            ..Context::new(
                client.clone(),
                backends.clone(),
                clock.clone(),
                leader.clone(),
                &options.lease.identity,
            )
        });
        let mut term_leader = leader.clone();
        let mut term_shutdown = shutdown.clone();
        controller
            .watches_with(
                virtual_services,
                virtual_service_resource(),
                watcher::Config::default(),
                move |vs| canaries_using(&store, &vs),
            )
            .reconcile_all_on(guard_trips)
            .graceful_shutdown_on(async move {
                tokio::select! {
                    _ = term_leader.wait_for(|l| !*l) => {}
                    _ = term_shutdown.wait_for(|s| *s) => {}
                }
            })
            .run(reconcile, error_policy, ctx)
            .for_each(|result| async move {
                match result {
                    Ok((canary, _)) => tracing::debug!(canary = %canary, "reconciled"),
                    Err(e) => tracing::debug!(error = %e, "reconcile error"),
                }
            })
            .await;
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
