//! Reconciler, finalizer, restart and leader-election tests: kube-rs against the in-process
//! fake API server, under tokio's paused clock, asserting the exact requests the controller
//! makes (like controller-rs's `ApiServerVerifier`).

use super::clock::TokioClock;
use super::crd::{condition, CanaryResource, CanaryResourceStatus};
use super::factory::Backends;
use super::lease::LeaseSettings;
use super::rbac;
use super::reconciler::{reconcile, run, Clients, Context, ControllerOptions};
use crate::metrics::MetricsSource;
use crate::router::factory::weights_in;
use crate::router::Weights;
use crate::runner::Registry;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use fledge_core::contract::ResponseClass;
use fledge_core::observe::{LatencyHistogram, Observation, ObservationError, SubsetTraffic};
use fledge_core::rollout::Phase;
use fledge_testkit::fake_api::{FakeApiServer, RecordedRequest};
use fledge_testkit::fixtures;
use fledge_testkit::http::{FakeEndpoint, Reply};
use kube::runtime::controller::Action;
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

pub(super) const NS: &str = "shop";
pub(super) const ISTIO: &str = "networking.istio.io";
pub(super) const FLEDGE: &str = "fledge.dev";
const CANARY_PATH: &str = "/apis/fledge.dev/v1alpha1/namespaces/shop/canaries/app";
pub(super) const VS_PATH: &str = "/apis/networking.istio.io/v1/namespaces/shop/virtualservices/app";
const DR_LIST: &str = "/apis/networking.istio.io/v1/namespaces/shop/destinationrules";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/shop/events";

pub(super) fn t0() -> DateTime<Utc> {
    DateTime::from_timestamp(1_700_000_000, 0).unwrap()
}

fn canary_object(analysis: Value, istio: Value) -> Value {
    let mut router = json!({"virtualService": "app", "route": "primary"});
    if let (Some(router), Some(extra)) = (router.as_object_mut(), istio.as_object()) {
        router.extend(extra.clone());
    }
    let mut analysis_spec = json!({
        "interval": "30s",
        "threshold": 2,
        "minCanaryRequests": 10,
        "stepWeights": [20, 50],
        "metrics": [{"name": "request-success-rate", "thresholdRange": {"min": 99}}]
    });
    if let (Some(spec), Some(extra)) = (analysis_spec.as_object_mut(), analysis.as_object()) {
        for (key, value) in extra {
            if value.is_null() {
                spec.remove(key);
            } else {
                spec.insert(key.clone(), value.clone());
            }
        }
    }
    json!({
        "apiVersion": "fledge.dev/v1alpha1",
        "kind": "Canary",
        "metadata": {"name": "app", "namespace": NS},
        "spec": {
            "service": "app",
            "stable": {"subset": "stable"},
            "canary": {"subset": "canary"},
            "metricsSource": {"envoyAdmin": {"urls": ["http://127.0.0.1:15000"]}},
            "router": {"istio": router},
            "analysis": analysis_spec
        }
    })
}

pub(super) fn virtual_service() -> Value {
    fixtures::virtual_service(NS)
}

fn destination_rule() -> Value {
    fixtures::destination_rule(NS)
}

/// Observations handed out by every source the test backends build. Like the Envoy admin
/// source, a new source's first call only takes a baseline.
#[derive(Default)]
struct Script {
    unhealthy: bool,
    /// Building a metrics source fails (e.g. a bad Prometheus address).
    source_broken: bool,
    /// What the data-plane guard gauge says (`None`: never tripped).
    guard_tripped_at: Option<DateTime<Utc>>,
    sources_built: usize,
    observations: usize,
}

#[derive(Clone, Default)]
pub(super) struct ScriptedBackends {
    script: Arc<Mutex<Script>>,
}

impl ScriptedBackends {
    pub(super) fn trip_guard(&self, at: DateTime<Utc>) {
        self.script.lock().unwrap().guard_tripped_at = Some(at);
    }
    pub(super) fn set_unhealthy(&self, unhealthy: bool) {
        self.script.lock().unwrap().unhealthy = unhealthy;
    }
    fn sources_built(&self) -> usize {
        self.script.lock().unwrap().sources_built
    }
    fn observations(&self) -> usize {
        self.script.lock().unwrap().observations
    }
}

struct ScriptedSource {
    script: Arc<Mutex<Script>>,
    baseline_taken: bool,
}

fn traffic(ok: u64, errors: u64) -> SubsetTraffic {
    let total = ok + errors;
    let mut traffic = SubsetTraffic {
        latency: LatencyHistogram {
            bounds_ms: vec![50.0, 500.0],
            cumulative: vec![total, total],
            count: total,
            sum_ms: 10.0 * total as f64,
        },
        ..SubsetTraffic::default()
    };
    traffic.add(ResponseClass::Success, ok);
    traffic.add(ResponseClass::ServerError, errors);
    traffic
}

#[async_trait]
impl MetricsSource for ScriptedSource {
    async fn observe(&mut self) -> Result<Observation, ObservationError> {
        if !self.baseline_taken {
            self.baseline_taken = true;
            return Err(ObservationError::Baseline);
        }
        let mut script = self.script.lock().unwrap();
        script.observations += 1;
        let canary = if script.unhealthy {
            traffic(80, 20)
        } else {
            traffic(100, 0)
        };
        Ok(Observation {
            stable: traffic(400, 0),
            canary,
            ..Observation::default()
        })
    }

    async fn guard_tripped_at(&mut self) -> Result<Option<DateTime<Utc>>, ObservationError> {
        Ok(self.script.lock().unwrap().guard_tripped_at)
    }
}

impl Backends for ScriptedBackends {
    fn metrics_source(
        &self,
        _canary: &fledge_core::spec::Canary,
    ) -> Result<Box<dyn MetricsSource>, String> {
        let mut script = self.script.lock().unwrap();
        if script.source_broken {
            return Err("cannot build the metrics source: scripted failure".into());
        }
        script.sources_built += 1;
        Ok(Box::new(ScriptedSource {
            script: self.script.clone(),
            baseline_taken: false,
        }))
    }

    /// Ticks aligned on `t0`, so the tests' times read as whole intervals after the start.
    fn tick_phase(&self, canary: &fledge_core::spec::Canary) -> std::time::Duration {
        let interval_ms = canary.spec.analysis.interval.0.as_millis().max(1) as i64;
        std::time::Duration::from_millis(t0().timestamp_millis().rem_euclid(interval_ms) as u64)
    }
}

/// One controller instance's reconcile context (always leading), as a direct-call harness.
pub(super) struct Instance {
    pub(super) ctx: Arc<Context>,
    pub(super) backends: ScriptedBackends,
    _leader: watch::Sender<bool>,
}

pub(super) fn instance(server: &FakeApiServer, identity: &str, clock: &TokioClock) -> Instance {
    let backends = ScriptedBackends::default();
    let (leader_tx, leader_rx) = watch::channel(true);
    let ctx = Context::new(
        server.client(identity),
        Arc::new(backends.clone()),
        Arc::new(*clock),
        leader_rx,
        identity,
    );
    Instance {
        ctx: Arc::new(ctx),
        backends,
        _leader: leader_tx,
    }
}

fn seeded(canary: Value) -> FakeApiServer {
    let server = FakeApiServer::new();
    server.create(ISTIO, "virtualservices", virtual_service());
    server.create(ISTIO, "destinationrules", destination_rule());
    server.create(FLEDGE, "canaries", canary);
    server
}

pub(super) fn stored_canary(server: &FakeApiServer) -> CanaryResource {
    serde_json::from_value(
        server
            .get(FLEDGE, "canaries", NS, "app")
            .expect("canary exists"),
    )
    .expect("a valid Canary")
}

pub(super) fn status(server: &FakeApiServer) -> CanaryResourceStatus {
    stored_canary(server).status.unwrap_or_default()
}

/// The status of Canary `app` in `namespace`.
fn status_in(server: &FakeApiServer, namespace: &str) -> CanaryResourceStatus {
    let object = server
        .get(FLEDGE, "canaries", namespace, "app")
        .expect("canary exists");
    serde_json::from_value::<CanaryResource>(object)
        .expect("a valid Canary")
        .status
        .unwrap_or_default()
}

/// The status of Canary `name` (not `app`).
fn status_of(server: &FakeApiServer, name: &str) -> CanaryResourceStatus {
    let object = server
        .get(FLEDGE, "canaries", NS, name)
        .expect("canary exists");
    serde_json::from_value::<CanaryResource>(object)
        .expect("a valid Canary")
        .status
        .unwrap_or_default()
}

fn vs_weights(server: &FakeApiServer) -> Weights {
    let vs = server.get(ISTIO, "virtualservices", NS, "app").unwrap();
    let canary = stored_canary_or_default_spec(server);
    weights_in(&canary, NS, &vs).unwrap()
}

fn stored_canary_or_default_spec(server: &FakeApiServer) -> fledge_core::spec::CanarySpec {
    match server.get(FLEDGE, "canaries", NS, "app") {
        Some(object) => {
            serde_json::from_value::<CanaryResource>(object)
                .unwrap()
                .spec
                .canary
        }
        None => {
            serde_json::from_value::<CanaryResource>(canary_object(json!({}), json!({})))
                .unwrap()
                .spec
                .canary
        }
    }
}

pub(super) async fn reconcile_now(server: &FakeApiServer, instance: &Instance) -> Action {
    reconcile(Arc::new(stored_canary(server)), instance.ctx.clone())
        .await
        .expect("reconcile succeeds")
}

pub(super) fn lines(requests: &[RecordedRequest]) -> Vec<String> {
    requests
        .iter()
        .map(|r| format!("{} {}", r.line(), r.status))
        .collect()
}

pub(super) fn event_reasons(server: &FakeApiServer) -> Vec<(String, String, i64)> {
    let mut events: Vec<Value> = server.list("events.k8s.io", "events", NS);
    events.sort_by_key(|e| {
        e["metadata"]["resourceVersion"]
            .as_str()
            .unwrap_or_default()
            .parse::<u64>()
            .unwrap_or(0)
    });
    events
        .iter()
        .map(|e| {
            (
                e["reason"].as_str().unwrap_or_default().to_string(),
                e["type"].as_str().unwrap_or_default().to_string(),
                e["series"]["count"].as_i64().unwrap_or(1),
            )
        })
        .collect()
}

#[tokio::test(start_paused = true)]
async fn first_reconciles_add_the_finalizer_then_start_and_set_the_first_weight() {
    let server = seeded(canary_object(json!({}), json!({})));
    let clock = TokioClock::starting_at(t0());
    let a = instance(&server, "a", &clock);

    // 1. The finalizer comes first, guarded by a `test`.
    assert_eq!(reconcile_now(&server, &a).await, Action::await_change());
    let requests = server.take_requests();
    assert_eq!(lines(&requests), [format!("PATCH {CANARY_PATH} 200")]);
    assert_eq!(
        requests[0].body,
        Some(json!([
            {"op": "test", "path": "/metadata/finalizers", "value": null},
            {"op": "add", "path": "/metadata/finalizers", "value": ["fledge.dev/traffic"]}
        ]))
    );

    // 2. Routes checked (already 0%), baseline taken, step 0 entered: status persisted first,
    //    then Events, then the weight moved with a guarded patch (its answer checked).
    let action = reconcile_now(&server, &a).await;
    assert_eq!(action, Action::requeue(Duration::from_secs(30)));
    let requests = server.take_requests();
    assert_eq!(
        lines(&requests),
        [
            format!("GET {VS_PATH} 200"),
            format!("PUT {CANARY_PATH}/status 200"),
            format!("POST {EVENTS} 201"),
            format!("POST {EVENTS} 201"),
            format!("GET {VS_PATH} 200"),
            format!("GET {DR_LIST} 200"),
            format!("PATCH {VS_PATH}?fieldManager=fledge 200"),
        ]
    );
    let put = &requests[1];
    assert!(
        put.body.as_ref().unwrap()["metadata"]["resourceVersion"].is_string(),
        "status write carries the resourceVersion read"
    );
    let st = status(&server);
    assert_eq!(
        (st.rollout.phase, st.rollout.canary_weight, st.rollout.step),
        (Phase::Progressing, 20, 0)
    );
    assert_eq!(st.last_tick_at, Some(t0()));
    assert_eq!(st.observed_generation, Some(1));
    assert!(st.is_ready());
    assert_eq!(vs_weights(&server), Weights::canary_percent(20));
    assert_eq!(
        event_reasons(&server),
        [
            ("Started".to_string(), "Normal".to_string(), 1),
            ("CanaryAdvanced".to_string(), "Normal".to_string(), 1)
        ]
    );

    // 3. Reconciling again (our own status write triggers it) does nothing but look.
    let action = reconcile_now(&server, &a).await;
    assert_eq!(action, Action::requeue(Duration::from_secs(30)));
    assert_eq!(
        lines(&server.take_requests()),
        [format!("GET {VS_PATH} 200")]
    );
    assert_eq!(status(&server), st);
}

#[tokio::test(start_paused = true)]
async fn analysis_runs_only_once_the_interval_has_passed() {
    let server = seeded(canary_object(json!({}), json!({})));
    let clock = TokioClock::starting_at(t0());
    let a = instance(&server, "a", &clock);
    reconcile_now(&server, &a).await;
    reconcile_now(&server, &a).await;
    server.take_requests();

    tokio::time::advance(Duration::from_secs(10)).await;
    assert_eq!(
        reconcile_now(&server, &a).await,
        Action::requeue(Duration::from_secs(20))
    );
    assert_eq!(
        lines(&server.take_requests()),
        [format!("GET {VS_PATH} 200")]
    );
    assert_eq!(a.backends.observations(), 0);

    tokio::time::advance(Duration::from_secs(20)).await;
    assert_eq!(
        reconcile_now(&server, &a).await,
        Action::requeue(Duration::from_secs(30))
    );
    let requests = server.take_requests();
    let event_patch = requests
        .iter()
        .find(|r| r.method == "PATCH" && r.path.starts_with(EVENTS))
        .expect("a repeated event becomes a series");
    assert_eq!(
        event_patch.content_type.as_deref(),
        Some("application/merge-patch+json")
    );
    let st = status(&server);
    assert_eq!((st.rollout.canary_weight, st.rollout.step), (50, 1));
    assert_eq!(st.last_tick_at, Some(t0() + chrono::Duration::seconds(30)));
    assert_eq!(a.backends.observations(), 1);
    assert_eq!(vs_weights(&server), Weights::canary_percent(50));
}

#[tokio::test(start_paused = true)]
async fn a_restarted_controller_continues_at_the_same_step_with_no_double_step() {
    let server = seeded(canary_object(json!({}), json!({})));
    let clock = TokioClock::starting_at(t0());
    {
        let a = instance(&server, "a", &clock);
        reconcile_now(&server, &a).await;
        reconcile_now(&server, &a).await; // step 0: 20%
    } // instance a is gone (its metrics baseline with it)
    let at_crash = status(&server);
    assert_eq!(at_crash.rollout.canary_weight, 20);
    server.take_requests();

    // A new process, same API server state, 5 s later: nothing is due, nothing is written.
    // b has no previous reading: it takes one (a baseline) at the last moment that still lets
    // it judge at the next aligned tick (t0 + 30 s, half an interval and a tenth more away):
    // at t0 + 12 s.
    tokio::time::advance(Duration::from_secs(5)).await;
    let b = instance(&server, "b", &clock);
    assert_eq!(
        reconcile_now(&server, &b).await,
        Action::requeue(Duration::from_secs(7))
    );
    assert_eq!(
        lines(&server.take_requests()),
        [format!("GET {VS_PATH} 200")]
    );
    assert_eq!(status(&server), at_crash);

    // The baseline is no verdict. Same step, same weight, no route write.
    tokio::time::advance(Duration::from_secs(7)).await;
    assert_eq!(
        reconcile_now(&server, &b).await,
        Action::requeue(Duration::from_secs(18))
    );
    let requests = server.take_requests();
    assert_eq!(
        lines(&requests),
        [
            format!("GET {VS_PATH} 200"),
            format!("PUT {CANARY_PATH}/status 200")
        ]
    );
    let st = status(&server);
    assert_eq!((st.rollout.step, st.rollout.canary_weight), (0, 20));
    assert_eq!(
        st.rollout.history, at_crash.rollout.history,
        "no new transition"
    );
    assert_eq!(st.last_tick_at, Some(t0() + chrono::Duration::seconds(12)));
    assert_eq!(
        (b.backends.sources_built(), b.backends.observations()),
        (1, 0)
    );

    // At the aligned tick (one interval after the crashed instance's last) it judges and
    // advances exactly one step.
    tokio::time::advance(Duration::from_secs(18)).await;
    reconcile_now(&server, &b).await;
    let st = status(&server);
    assert_eq!((st.rollout.step, st.rollout.canary_weight), (1, 50));
    let weights: Vec<u8> = st.rollout.history.iter().map(|t| t.canary_weight).collect();
    assert_eq!(weights, [20, 50], "each step entered once");
    assert_eq!(vs_weights(&server), Weights::canary_percent(50));
}

#[tokio::test(start_paused = true)]
async fn a_status_write_on_a_stale_version_conflicts_and_nothing_is_acted_on() {
    let server = seeded(canary_object(json!({}), json!({})));
    let clock = TokioClock::starting_at(t0());
    let a = instance(&server, "a", &clock);
    reconcile_now(&server, &a).await; // finalizer
    let stale = stored_canary(&server);
    // Someone else changes the Canary (a label) after we read it.
    server.edit(FLEDGE, "canaries", NS, "app", |c| {
        c["metadata"]["labels"] = json!({"team": "shop"});
    });
    server.take_requests();
    let err = reconcile(Arc::new(stale), a.ctx.clone()).await.unwrap_err();
    assert!(
        err.to_string().contains("changed while it was reconciled"),
        "{err}"
    );
    assert_eq!(
        lines(&server.take_requests()),
        [
            format!("GET {VS_PATH} 200"),
            format!("PUT {CANARY_PATH}/status 409")
        ]
    );
    assert_eq!(
        vs_weights(&server),
        Weights::canary_percent(0),
        "no weight moved"
    );
    assert!(event_reasons(&server).is_empty(), "no event published");
    // The next reconcile (with the fresh object) does the step once.
    reconcile_now(&server, &a).await;
    assert_eq!(status(&server).rollout.canary_weight, 20);
}

#[tokio::test(start_paused = true)]
async fn deleting_a_canary_mid_rollout_returns_all_traffic_to_stable() {
    let istio = json!({"headerRoute": {"headers": {"stage": "canary"}}, "mirrorPercentage": 10});
    let server = seeded(canary_object(json!({}), istio));
    let original_vs = server.get(ISTIO, "virtualservices", NS, "app").unwrap();
    let clock = TokioClock::starting_at(t0());
    let a = instance(&server, "a", &clock);
    reconcile_now(&server, &a).await;
    reconcile_now(&server, &a).await;
    let vs = server.get(ISTIO, "virtualservices", NS, "app").unwrap();
    let names: Vec<&str> = vs["spec"]["http"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["primary-canary-testers", "primary"],
        "testers route while the rollout runs"
    );
    assert_eq!(
        vs["spec"]["http"][1]["mirrorPercentage"],
        json!({"value": 10.0})
    );
    assert_eq!(vs_weights(&server), Weights::canary_percent(20));

    server.delete(FLEDGE, "canaries", NS, "app");
    assert!(
        server.get(FLEDGE, "canaries", NS, "app").is_some(),
        "held by the finalizer"
    );
    server.take_requests();
    assert_eq!(reconcile_now(&server, &a).await, Action::await_change());
    let requests = server.take_requests();
    assert_eq!(
        lines(&requests),
        [
            format!("GET {VS_PATH} 200"),
            format!("GET {DR_LIST} 200"),
            format!("PATCH {VS_PATH}?fieldManager=fledge 200"),
            format!("POST {EVENTS} 201"),
            format!("PATCH {CANARY_PATH} 200"),
        ]
    );
    assert_eq!(
        requests[4].body,
        Some(json!([
            {"op": "test", "path": "/metadata/finalizers/0", "value": "fledge.dev/traffic"},
            {"op": "remove", "path": "/metadata/finalizers/0"}
        ]))
    );
    assert!(
        server.get(FLEDGE, "canaries", NS, "app").is_none(),
        "gone once the finalizer is removed"
    );
    let vs = server.get(ISTIO, "virtualservices", NS, "app").unwrap();
    assert_eq!(
        vs["spec"], original_vs["spec"],
        "the VirtualService is as it was before the rollout"
    );
    assert!(event_reasons(&server)
        .iter()
        .any(|(reason, _, _)| reason == "TrafficRestored"));
}

#[tokio::test(start_paused = true)]
async fn failing_analysis_rolls_back_to_stable_with_a_warning_event() {
    let server = seeded(canary_object(json!({}), json!({})));
    let clock = TokioClock::starting_at(t0());
    let a = instance(&server, "a", &clock);
    reconcile_now(&server, &a).await;
    reconcile_now(&server, &a).await;
    a.backends.set_unhealthy(true);
    for _ in 0..2 {
        tokio::time::advance(Duration::from_secs(30)).await;
        reconcile_now(&server, &a).await;
    }
    let st = status(&server);
    assert_eq!(
        (
            st.rollout.phase,
            st.rollout.canary_weight,
            st.rollout.failed_checks
        ),
        (Phase::RolledBack, 0, 2)
    );
    assert_eq!(vs_weights(&server), Weights::canary_percent(0));
    let failed = st.condition(condition::FAILED).unwrap();
    assert_eq!(
        (failed.status.as_str(), failed.reason.as_str()),
        ("True", "RolledBack")
    );
    assert_eq!(
        st.condition(condition::PROGRESSING).unwrap().status,
        "False"
    );
    let reasons = event_reasons(&server);
    assert!(
        reasons.contains(&("AnalysisFailed".into(), "Warning".into(), 1)),
        "{reasons:?}"
    );
    assert!(
        reasons.contains(&("RollbackTriggered".into(), "Warning".into(), 1)),
        "{reasons:?}"
    );
    assert!(st.final_routes_applied);
    // Finished: no more analysis and no more route checks.
    server.take_requests();
    tokio::time::advance(Duration::from_secs(30)).await;
    assert_eq!(reconcile_now(&server, &a).await, Action::await_change());
    assert!(server.take_requests().is_empty());
}

#[tokio::test(start_paused = true)]
async fn the_retry_annotation_restarts_a_rolled_back_canary_and_abort_wins_over_promote() {
    let server = seeded(canary_object(json!({}), json!({})));
    let clock = TokioClock::starting_at(t0());
    let a = instance(&server, "a", &clock);
    reconcile_now(&server, &a).await;
    reconcile_now(&server, &a).await;
    // Abort and promote asked at once: abort wins, promote stays pending (and is moot).
    server.edit(FLEDGE, "canaries", NS, "app", |c| {
        c["metadata"]["annotations"] =
            json!({"fledge.dev/abort": "a1", "fledge.dev/promote": "p1"});
    });
    reconcile_now(&server, &a).await;
    let st = status(&server);
    assert_eq!(
        (st.rollout.phase, st.final_routes_applied),
        (Phase::RolledBack, true)
    );
    assert_eq!(vs_weights(&server), Weights::canary_percent(0));
    reconcile_now(&server, &a).await; // promote on a finished rollout: marked handled, no effect
    assert_eq!(status(&server).rollout.phase, Phase::RolledBack);
    assert_eq!(reconcile_now(&server, &a).await, Action::await_change());

    server.edit(FLEDGE, "canaries", NS, "app", |c| {
        c["metadata"]["annotations"]["fledge.dev/retry"] = json!("r1");
    });
    reconcile_now(&server, &a).await;
    let st = status(&server);
    assert_eq!(
        (st.rollout.phase, st.final_routes_applied),
        (Phase::Initializing, false)
    );
    reconcile_now(&server, &a).await; // the tick is due: step 0 again
    let st = status(&server);
    assert_eq!(
        (st.rollout.phase, st.rollout.canary_weight),
        (Phase::Progressing, 20)
    );
    assert_eq!(vs_weights(&server), Weights::canary_percent(20));
}

#[tokio::test(start_paused = true)]
async fn a_spec_change_starts_a_new_rollout_and_a_metadata_change_does_not() {
    let server = seeded(canary_object(json!({}), json!({})));
    let clock = TokioClock::starting_at(t0());
    let a = instance(&server, "a", &clock);
    reconcile_now(&server, &a).await;
    reconcile_now(&server, &a).await;
    tokio::time::advance(Duration::from_secs(30)).await;
    reconcile_now(&server, &a).await;
    assert_eq!(status(&server).rollout.canary_weight, 50);

    server.edit(FLEDGE, "canaries", NS, "app", |c| {
        c["metadata"]["labels"] = json!({"team": "shop"});
    });
    reconcile_now(&server, &a).await;
    assert_eq!(
        status(&server).rollout.canary_weight,
        50,
        "labels are not the spec"
    );

    server.edit(FLEDGE, "canaries", NS, "app", |c| {
        c["spec"]["analysis"]["stepWeights"] = json!([30, 60]);
    });
    reconcile_now(&server, &a).await;
    let st = status(&server);
    assert_eq!(
        (st.rollout.step, st.rollout.canary_weight),
        (0, 30),
        "started again from the first step"
    );
    assert_eq!(st.spec_fingerprint.as_deref(), Some("generation-2"));
    assert_eq!(st.rollout.history.len(), 1);
    assert_eq!(vs_weights(&server), Weights::canary_percent(30));

    server.edit(FLEDGE, "canaries", NS, "app", |c| {
        c["metadata"]["annotations"] = json!({"fledge.dev/rollout": "v3"});
    });
    reconcile_now(&server, &a).await;
    assert_eq!(
        status(&server).spec_fingerprint.as_deref(),
        Some("generation-2/v3")
    );
    assert_eq!(
        status(&server).rollout.history.len(),
        1,
        "a new rollout again"
    );
}

#[tokio::test(start_paused = true)]
async fn an_invalid_spec_is_reported_with_the_field_and_the_fix_and_nothing_moves() {
    let server = seeded(canary_object(json!({"stepWeights": [120]}), json!({})));
    let clock = TokioClock::starting_at(t0());
    let a = instance(&server, "a", &clock);
    reconcile_now(&server, &a).await;
    server.take_requests();
    assert_eq!(reconcile_now(&server, &a).await, Action::await_change());
    assert_eq!(
        lines(&server.take_requests()),
        [
            format!("PUT {CANARY_PATH}/status 200"),
            format!("POST {EVENTS} 201")
        ]
    );
    let st = status(&server);
    let ready = st.condition(condition::READY).unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "InvalidSpec")
    );
    assert!(
        ready
            .message
            .contains("spec.analysis.stepWeights[0]: 120 % is above 100; write a whole percentage"),
        "{}",
        ready.message
    );
    // Reconciling again writes nothing new (no event spam).
    reconcile_now(&server, &a).await;
    assert!(server.take_requests().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_router_problem_is_reported_in_ready_and_nothing_is_judged() {
    let server = seeded(canary_object(json!({}), json!({"route": "main"})));
    let clock = TokioClock::starting_at(t0());
    let a = instance(&server, "a", &clock);
    reconcile_now(&server, &a).await;
    assert_eq!(
        reconcile_now(&server, &a).await,
        Action::requeue(Duration::from_secs(10))
    );
    let st = status(&server);
    let ready = st.condition(condition::READY).unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "RouterError")
    );
    assert!(
        ready.message.contains("has no HTTP route named \"main\""),
        "{}",
        ready.message
    );
    assert_eq!(
        st.last_tick_at, None,
        "no analysis while routes are unknown"
    );
    assert_eq!(a.backends.sources_built(), 0);
}

#[tokio::test(start_paused = true)]
async fn the_promote_annotation_passes_an_indefinite_pause_exactly_once() {
    let steps = json!({"stepWeights": null, "steps": [{"setWeight": 20}, {"pause": {}}, {"setWeight": 60}, {"pause": {}}]});
    let server = seeded(canary_object(steps, json!({})));
    let clock = TokioClock::starting_at(t0());
    let a = instance(&server, "a", &clock);
    reconcile_now(&server, &a).await;
    reconcile_now(&server, &a).await; // 20%
    tokio::time::advance(Duration::from_secs(30)).await;
    reconcile_now(&server, &a).await; // baseline... then pause
    tokio::time::advance(Duration::from_secs(30)).await;
    reconcile_now(&server, &a).await;
    assert_eq!(status(&server).rollout.phase, Phase::Paused);

    server.edit(FLEDGE, "canaries", NS, "app", |c| {
        c["metadata"]["annotations"] = json!({"fledge.dev/promote": "1"});
    });
    reconcile_now(&server, &a).await;
    let st = status(&server);
    assert_eq!(
        (st.rollout.phase, st.rollout.canary_weight),
        (Phase::Progressing, 60)
    );
    assert_eq!(
        st.handled_commands
            .get("fledge.dev/promote")
            .map(String::as_str),
        Some("1")
    );
    // At the next pause the same annotation value does not promote again.
    tokio::time::advance(Duration::from_secs(30)).await;
    reconcile_now(&server, &a).await;
    tokio::time::advance(Duration::from_secs(30)).await;
    reconcile_now(&server, &a).await;
    assert_eq!(status(&server).rollout.phase, Phase::Paused);
    assert_eq!(status(&server).rollout.canary_weight, 60);
}

// ---- the whole controller: watches, requeues, leader election --------------------------------

fn options(identity: &str) -> ControllerOptions {
    ControllerOptions {
        namespace: None,
        lease: LeaseSettings::new("fledge-system", "fledge-controller", identity),
        retry_delay: Duration::from_secs(10),
        status_checkpoint: Duration::ZERO,
        shard: None,
        selector: None,
        shutdown_grace: super::reconciler::SHUTDOWN_GRACE,
    }
}

pub(super) struct Running {
    shutdown: watch::Sender<bool>,
    leader: watch::Receiver<bool>,
    /// What this instance's dashboard, status API and `/metrics` show.
    registry: Registry,
    task: tokio::task::JoinHandle<super::Result<()>>,
}

pub(super) fn start(
    server: &FakeApiServer,
    identity: &str,
    backends: ScriptedBackends,
    clock: TokioClock,
) -> Running {
    start_with(server, options(identity), backends, clock)
}

fn start_with(
    server: &FakeApiServer,
    options: ControllerOptions,
    backends: ScriptedBackends,
    clock: TokioClock,
) -> Running {
    start_with_budget(server, options, backends, clock, None)
}

/// [`start_with`], the API budget (the client-side limit's bucket) given.
fn start_with_budget(
    server: &FakeApiServer,
    options: ControllerOptions,
    backends: ScriptedBackends,
    clock: TokioClock,
    budget: Option<super::throttle::TokenBucket>,
) -> Running {
    let (shutdown, shutdown_rx) = watch::channel(false);
    let (leader_tx, leader) = watch::channel(false);
    let registry = Registry::default();
    let identity = options.lease.identity.clone();
    let clients = Clients {
        budget,
        ..Clients::single(server.client(&identity))
    };
    let task = tokio::spawn(run(
        clients,
        options,
        Arc::new(backends),
        Arc::new(clock),
        registry.clone(),
        leader_tx,
        shutdown_rx,
    ));
    Running {
        shutdown,
        leader,
        registry,
        task,
    }
}

impl Running {
    pub(super) async fn stop(self) {
        self.shutdown.send_replace(true);
        self.task.await.unwrap().unwrap();
    }
}

fn writes_by(requests: &[RecordedRequest], client: &str) -> Vec<String> {
    requests
        .iter()
        .filter(|r| r.client == client && r.method != "GET" && !r.path.contains("/leases"))
        .map(|r| r.line())
        .collect()
}

#[tokio::test(start_paused = true)]
async fn the_controller_promotes_a_healthy_canary_end_to_end() {
    let server = seeded(canary_object(json!({}), json!({})));
    let clock = TokioClock::starting_at(t0());
    let controller = start(&server, "a", ScriptedBackends::default(), clock);
    tokio::time::sleep(Duration::from_secs(100)).await;

    let st = status(&server);
    assert_eq!(
        (st.rollout.phase, st.rollout.canary_weight),
        (Phase::Promoted, 100)
    );
    assert_eq!(vs_weights(&server), Weights::canary_percent(100));
    // Ticks at 0 s (baseline + step 0), 30 s (pass → 50%), 60 s (pass → promoted).
    let at: Vec<i64> = st
        .rollout
        .history
        .iter()
        .map(|t| (t.at - t0()).num_seconds())
        .collect();
    assert_eq!(at, [0, 30, 60]);
    let requests = server.requests();
    let vs_patch = format!("PATCH {VS_PATH}?fieldManager=fledge");
    let status_put = format!("PUT {CANARY_PATH}/status");
    let event_post = format!("POST {EVENTS}");
    assert_eq!(
        writes_by(&requests, "a")
            .into_iter()
            .map(|l| if l.starts_with(&format!("PATCH {EVENTS}/")) {
                "PATCH event".to_string()
            } else {
                l
            })
            .collect::<Vec<_>>(),
        [
            format!("PATCH {CANARY_PATH}"),
            status_put.clone(),
            event_post.clone(),
            event_post.clone(),
            vs_patch.clone(),
            status_put.clone(),
            "PATCH event".to_string(),
            vs_patch.clone(),
            status_put.clone(),
            event_post.clone(),
            vs_patch.clone(),
            // The final routes are recorded as applied: from now on, hands off.
            status_put.clone(),
        ]
    );
    assert!(status(&server).final_routes_applied);
    controller.stop().await;
    // The lease was released on shutdown.
    let lease = server
        .get(
            "coordination.k8s.io",
            "leases",
            "fledge-system",
            "fledge-controller",
        )
        .unwrap();
    assert!(lease["spec"]["holderIdentity"].is_null(), "{lease}");
}

#[tokio::test(start_paused = true)]
async fn only_the_lease_holder_reconciles_and_a_successor_continues_without_double_steps() {
    let server = seeded(canary_object(
        json!({"stepWeights": [10, 20, 30, 40]}),
        json!({}),
    ));
    let clock = TokioClock::starting_at(t0());
    let a = start(&server, "a", ScriptedBackends::default(), clock);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let b = start(&server, "b", ScriptedBackends::default(), clock);
    tokio::time::sleep(Duration::from_secs(44)).await; // ticks at 0 and 30 s
    assert!(*a.leader.borrow() && !*b.leader.borrow());
    // The leader's dashboard shows the canary; the standby's shows none and says why.
    assert_eq!(
        a.registry.get("shop/app").map(|v| v.status.canary_weight),
        Some(20)
    );
    assert!(a.registry.note().is_none());
    assert!(b.registry.list().is_empty());
    let note = b.registry.note().unwrap_or_default();
    assert!(
        note.contains("standby") && note.contains("fledge-system/fledge-controller"),
        "{note}"
    );
    let requests = server.requests();
    assert!(!writes_by(&requests, "a").is_empty());
    assert!(
        writes_by(&requests, "b").is_empty(),
        "the follower wrote: {:?}",
        writes_by(&requests, "b")
    );
    assert!(
        requests
            .iter()
            .filter(|r| r.client == "b")
            .all(|r| r.path.contains("/leases")),
        "the follower only looks at the lease"
    );
    let at_handover = status(&server);
    assert_eq!(
        (at_handover.rollout.step, at_handover.rollout.canary_weight),
        (1, 20)
    );

    // a shuts down gracefully (releases the lease); b takes over and continues from .status.
    let a_registry = a.registry.clone();
    a.stop().await;
    server.take_requests();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(*b.leader.borrow(), "b leads after a released the lease");
    assert!(b.registry.note().is_none());
    // a, stopped, no longer shows the canary, not even in its self-metrics' gauges.
    assert!(a_registry.list().is_empty());
    let text = a_registry.telemetry().encode().unwrap();
    assert!(
        metric_line(&text, &["fledge_canary_weight", "shop/app"]).is_none(),
        "{text}"
    );
    let lease = server
        .get(
            "coordination.k8s.io",
            "leases",
            "fledge-system",
            "fledge-controller",
        )
        .unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], "b");
    assert_eq!(lease["spec"]["leaseTransitions"], 1);
    // b leads from about 46 s. Its first reading (a baseline: no verdict) comes at 72 s, the
    // last moment that still lets it judge at the aligned tick of 90 s (half an interval and a
    // tenth before it); at 90 s it advances one step.
    tokio::time::sleep(Duration::from_secs(23)).await; // t ≈ 71 s
    assert_eq!(status(&server).last_tick_at, at_handover.last_tick_at);
    tokio::time::sleep(Duration::from_secs(4)).await; // t ≈ 75 s
    let st = status(&server);
    assert_eq!(
        (st.rollout.step, st.rollout.canary_weight),
        (1, 20),
        "a baseline tick does not advance"
    );
    assert_eq!(st.last_tick_at, Some(t0() + chrono::Duration::seconds(72)));
    tokio::time::sleep(Duration::from_secs(23)).await; // t ≈ 98 s
    let st = status(&server);
    assert_eq!((st.rollout.step, st.rollout.canary_weight), (2, 30));
    let weights: Vec<u8> = st.rollout.history.iter().map(|t| t.canary_weight).collect();
    assert_eq!(
        weights,
        [10, 20, 30],
        "every step entered exactly once across the handover"
    );
    assert!(
        writes_by(&server.requests(), "a").is_empty(),
        "a stopped acting"
    );
    b.stop().await;
}

#[tokio::test(start_paused = true)]
async fn after_promotion_the_routes_are_left_to_gitops() {
    let server = seeded(canary_object(json!({}), json!({})));
    let clock = TokioClock::starting_at(t0());
    let controller = start(&server, "a", ScriptedBackends::default(), clock);
    tokio::time::sleep(Duration::from_secs(100)).await;
    assert_eq!(status(&server).rollout.phase, Phase::Promoted);
    server.take_requests();
    // GitOps makes v2 the new stable: the stable subset now selects v2 and the weights go
    // back to 100/0. The controller must not fight that.
    server.edit(ISTIO, "virtualservices", NS, "app", |vs| {
        vs["spec"]["http"][0]["route"][0]["weight"] = json!(100);
        vs["spec"]["http"][0]["route"][1]["weight"] = json!(0);
    });
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert_eq!(vs_weights(&server), Weights::canary_percent(0));
    assert!(writes_by(&server.requests(), "a").is_empty());
    // Deleting the finished Canary leaves the routes alone too.
    server.delete(FLEDGE, "canaries", NS, "app");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(server.get(FLEDGE, "canaries", NS, "app").is_none());
    assert_eq!(vs_weights(&server), Weights::canary_percent(0));
    controller.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_virtual_service_edit_is_repaired_at_once_by_the_watch() {
    let server = seeded(canary_object(json!({}), json!({})));
    let clock = TokioClock::starting_at(t0());
    let controller = start(&server, "a", ScriptedBackends::default(), clock);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(vs_weights(&server), Weights::canary_percent(20));
    // GitOps (self-heal) puts the weights from Git back: 100/0.
    server.edit(ISTIO, "virtualservices", NS, "app", |vs| {
        vs["spec"]["http"][0]["route"][0]["weight"] = json!(100);
        vs["spec"]["http"][0]["route"][1]["weight"] = json!(0);
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        vs_weights(&server),
        Weights::canary_percent(20),
        "weights follow .status again"
    );
    assert_eq!(
        status(&server).rollout.step,
        0,
        "no analysis was triggered by the edit"
    );
    controller.stop().await;
}

/// Every request the controller makes in a full lifecycle (two Istio canaries, one with a
/// named DestinationRule, an HTTPRoute and a GRPCRoute canary, promotion, deletion, two
/// replicas) is allowed by `manifests/rbac.yaml`, and every rule there is used.
#[tokio::test(start_paused = true)]
async fn rbac_in_the_manifests_covers_exactly_what_the_controller_calls() {
    let server = seeded(canary_object(json!({}), json!({})));
    let mut second_vs = virtual_service();
    second_vs["metadata"]["name"] = json!("app2");
    server.create(ISTIO, "virtualservices", second_vs);
    let mut second = canary_object(
        json!({}),
        json!({"virtualService": "app2", "destinationRule": "app"}),
    );
    second["metadata"]["name"] = json!("app2");
    server.create(FLEDGE, "canaries", second);
    gateway_api::add_gateway_canaries(&server);
    // A workload (targetRef, autoscalerRef) in another namespace: adopted, a revision promoted,
    // its HPA edited, then autoscalerRef removed.
    let web = "web";
    super::workload_tests::seed_workload(&server, web, json!({"autoscalerRef": {"name": "app"}}));
    server.create("autoscaling", "horizontalpodautoscalers", json!({
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "app", "namespace": web},
        "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "app"},
                 "minReplicas": 1, "maxReplicas": 4}
    }));
    let kubelet = {
        let server = server.clone();
        tokio::spawn(async move {
            loop {
                server.settle_deployments(|_| true);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };
    let clock = TokioClock::starting_at(t0());
    let a = start(&server, "a", ScriptedBackends::default(), clock);
    let b = start(&server, "b", ScriptedBackends::default(), clock);
    tokio::time::sleep(Duration::from_secs(100)).await;
    server.delete(FLEDGE, "canaries", NS, "app");
    server.edit("apps", "deployments", web, "app", |d| {
        d["spec"]["template"]["spec"]["containers"][0]["image"] = json!("app:v2");
    });
    tokio::time::sleep(Duration::from_secs(100)).await;
    server.edit("autoscaling", "horizontalpodautoscalers", web, "app", |h| {
        h["spec"]["maxReplicas"] = json!(6);
    });
    tokio::time::sleep(Duration::from_secs(10)).await;
    server.edit(FLEDGE, "canaries", web, "app", |c| {
        c["spec"].as_object_mut().unwrap().remove("autoscalerRef");
    });
    tokio::time::sleep(Duration::from_secs(10)).await;
    a.stop().await;
    b.stop().await;
    kubelet.abort();
    let workload = status_in(&server, web).workload.expect("a workload");
    assert_eq!(
        (workload.phase, workload.stable_image.as_deref()),
        (
            fledge_core::workload::WorkloadPhase::Succeeded,
            Some("app:v2")
        )
    );
    assert!(server
        .get(
            "autoscaling",
            "horizontalpodautoscalers",
            web,
            "app-primary"
        )
        .is_none());

    let granted = super::manifest_tests::granted_rules();
    let mut used = std::collections::BTreeSet::new();
    for request in server.requests() {
        let (group, resource, has_name) = request.target().expect("an API path");
        let verb = rbac::verb_of(&request.method, has_name, request.is_watch());
        assert!(
            granted.contains(&(group.clone(), resource.clone(), verb.to_string())),
            "manifests/rbac.yaml does not allow {verb} {resource}.{group} ({})",
            request.line()
        );
        used.insert((group, resource, verb.to_string()));
    }
    let unused: Vec<_> = granted
        .iter()
        .filter(|(_, resource, verb)| {
            !rbac::NOT_CALLED_DIRECTLY.contains(&(resource.as_str(), verb.as_str()))
        })
        .filter(|rule| !used.contains(*rule))
        .collect();
    assert!(unused.is_empty(), "granted but never used: {unused:?}");
}

// ---- operator experience in Kubernetes mode: webhooks, dashboard, self-metrics, guard ---------

/// A wall clock moved by hand, for tests that talk to a real local HTTP server (tokio's
/// paused clock would fire the webhook timeouts while the server answers).
#[derive(Clone)]
struct ManualClock(Arc<Mutex<DateTime<Utc>>>);

impl ManualClock {
    fn starting_at(at: DateTime<Utc>) -> Self {
        ManualClock(Arc::new(Mutex::new(at)))
    }
    fn advance(&self, seconds: i64) {
        *self.0.lock().unwrap() += chrono::Duration::seconds(seconds);
    }
}

impl super::clock::Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.0.lock().unwrap()
    }
}

fn instance_with_clock(server: &FakeApiServer, clock: ManualClock) -> Instance {
    let backends = ScriptedBackends::default();
    let (leader_tx, leader_rx) = watch::channel(true);
    let ctx = Context::new(
        server.client("a"),
        Arc::new(backends.clone()),
        Arc::new(clock),
        leader_rx,
        "a",
    );
    Instance {
        ctx: Arc::new(ctx),
        backends,
        _leader: leader_tx,
    }
}

/// A webhook receiver on 127.0.0.1 (testkit's endpoint): `POST /{hook}` answers the status
/// set for that hook (200 unless set) and records the body.
struct HookReceiver(FakeEndpoint);

impl HookReceiver {
    async fn start() -> (String, HookReceiver) {
        let endpoint = FakeEndpoint::start_with_fallback(|_| Reply::status(200))
            .await
            .unwrap();
        (endpoint.url().to_string(), HookReceiver(endpoint))
    }
    fn answer(&self, hook: &str, code: u16) {
        self.0.reply(&format!("/{hook}"), Reply::status(code));
    }
    fn calls(&self, hook: &str) -> Vec<Value> {
        let path = format!("/{hook}");
        self.0
            .requests()
            .into_iter()
            .filter(|r| r.path == path)
            .map(|r| serde_json::from_str(&r.body).unwrap_or(Value::Null))
            .collect()
    }
}

fn hook(name: &str, kind: &str, base: &str) -> Value {
    json!({"name": name, "type": kind, "url": format!("{base}/{name}"), "retries": 0, "timeout": "2s"})
}

/// The line of an OpenMetrics text that has every one of `parts`, if any.
fn metric_line<'a>(text: &'a str, parts: &[&str]) -> Option<&'a str> {
    text.lines()
        .find(|line| !line.starts_with('#') && parts.iter().all(|p| line.contains(p)))
}

async fn http_get(app: axum::Router, uri: &str) -> (u16, Value) {
    use tower::ServiceExt;
    let response = app
        .oneshot(
            axum::http::Request::get(uri)
                .body(axum::body::Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let code = response.status().as_u16();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 22)
        .await
        .unwrap();
    (code, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

#[tokio::test]
async fn webhooks_gate_a_kubernetes_rollout_and_the_dashboard_and_metrics_show_it() {
    let (base, hooks) = HookReceiver::start().await;
    hooks.answer("pre", 503);
    hooks.answer("confirm", 403);
    let mut object = canary_object(json!({}), json!({}));
    object["spec"]["webhooks"] = json!([
        hook("pre", "pre-rollout", &base),
        hook("load", "rollout", &base),
        hook("confirm", "confirm-promotion", &base),
        hook("post", "post-rollout", &base),
        hook("notify", "event", &base),
    ]);
    let server = seeded(object);
    let clock = ManualClock::starting_at(t0());
    let a = instance_with_clock(&server, clock.clone());
    reconcile_now(&server, &a).await; // the finalizer

    // A failing pre-rollout hook: one failed check, nothing starts.
    reconcile_now(&server, &a).await;
    let st = status(&server);
    assert_eq!(
        (
            st.rollout.phase,
            st.rollout.failed_checks,
            vs_weights(&server)
        ),
        (Phase::Initializing, 1, Weights::canary_percent(0))
    );
    assert!(
        st.rollout
            .message
            .contains("pre-rollout webhook \"pre\" failed"),
        "{}",
        st.rollout.message
    );

    // It answers 200 now: the rollout starts and steps while `load` is called every interval.
    hooks.answer("pre", 200);
    for _ in 0..2 {
        clock.advance(30);
        reconcile_now(&server, &a).await;
    }
    let st = status(&server);
    assert_eq!(
        (st.rollout.phase, st.rollout.canary_weight),
        (Phase::Progressing, 50),
        "{}",
        st.rollout.message
    );

    // The promotion waits for `confirm`; the analysis goes on meanwhile.
    clock.advance(30);
    reconcile_now(&server, &a).await;
    let st = status(&server);
    assert_eq!(
        (st.rollout.phase, st.rollout.canary_weight),
        (Phase::Progressing, 50)
    );
    assert!(
        st.rollout
            .message
            .contains("confirm-promotion webhook \"confirm\""),
        "{}",
        st.rollout.message
    );
    assert_eq!(vs_weights(&server), Weights::canary_percent(50));
    hooks.answer("confirm", 200);
    clock.advance(30);
    reconcile_now(&server, &a).await;
    assert_eq!(status(&server).rollout.phase, Phase::Promoted);
    assert_eq!(vs_weights(&server), Weights::canary_percent(100));
    clock.advance(30);
    reconcile_now(&server, &a).await; // finished: hands off, no hook is called again

    assert_eq!(hooks.calls("pre").len(), 2);
    assert!(hooks.calls("load").len() >= 3, "{:?}", hooks.calls("load"));
    assert_eq!(hooks.calls("confirm").len(), 2);
    let post = hooks.calls("post");
    assert_eq!(post.len(), 1, "post-rollout is called once: {post:?}");
    assert_eq!(post[0]["canary"]["phase"], "Promoted");
    assert_eq!(post[0]["canary"]["namespace"], NS);
    // Events are sent in the background: wait for the promotion's.
    let mut reasons = Vec::new();
    for _ in 0..50 {
        reasons = hooks
            .calls("notify")
            .iter()
            .filter_map(|b| b["event"]["reason"].as_str().map(str::to_string))
            .collect();
        if reasons.iter().any(|r| r == "Promoted") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        reasons.iter().any(|r| r == "Started") && reasons.iter().any(|r| r == "Promoted"),
        "{reasons:?}"
    );

    // The dashboard's API: the canary as `namespace/name`, its hooks and its traffic series.
    let app = crate::api::router(a.ctx.registry.clone());
    let (code, list) = http_get(app.clone(), "/api/v1/canaries").await;
    assert_eq!(code, 200);
    assert_eq!(list[0]["name"], "shop/app");
    let (code, view) = http_get(app.clone(), "/api/v1/canaries/shop%2Fapp").await;
    assert_eq!(code, 200, "{view}");
    assert_eq!(view["phase"], "Promoted");
    let webhooks = view["webhooks"].as_array().unwrap();
    assert_eq!(webhooks.len(), 5);
    assert_eq!(webhooks[2]["name"], "confirm");
    assert_eq!(webhooks[2]["lastCall"]["ok"], true);
    let series = view["series"].as_array().unwrap();
    assert!(series.len() >= 3, "{series:?}");
    assert_eq!(series.last().unwrap()["canaryWeight"], 50);
    assert!(series.last().unwrap()["canary"]["requests"].as_u64() > Some(0));
    // Commands are annotations in Kubernetes mode, not HTTP calls.
    let refused = {
        use tower::ServiceExt;
        app.oneshot(
            axum::http::Request::post("/api/v1/canaries/shop%2Fapp/abort")
                .body(axum::body::Body::empty())
                .unwrap(),
        )
        .await
        .unwrap()
    };
    assert_eq!(refused.status().as_u16(), 403);

    // Self-metrics.
    let text = a.ctx.registry.telemetry().encode().unwrap();
    for parts in [
        &["fledge_canary_weight", "canary=\"shop/app\"", "} 100"][..],
        &[
            "fledge_canary_phase",
            "canary=\"shop/app\"",
            "phase=\"Promoted\"",
            "} 1",
        ],
        &[
            "fledge_webhook_calls_total",
            "webhook=\"confirm\"",
            "outcome=\"failed\"",
            "} 1",
        ],
        &[
            "fledge_webhook_calls_total",
            "webhook=\"pre\"",
            "outcome=\"ok\"",
            "} 1",
        ],
        &[
            "fledge_decisions_total",
            "canary=\"shop/app\"",
            "reason=\"Promoted\"",
            "} 1",
        ],
        &[
            "fledge_analysis_total",
            "canary=\"shop/app\"",
            "verdict=\"Pass\"",
        ],
    ] {
        assert!(
            metric_line(&text, parts).is_some(),
            "no {parts:?} in\n{text}"
        );
    }
}

#[tokio::test]
async fn a_rollback_webhook_rolls_a_kubernetes_rollout_back() {
    let (base, hooks) = HookReceiver::start().await;
    hooks.answer("stop", 404); // "no objection" until it answers 2xx
    let mut object = canary_object(json!({}), json!({}));
    object["spec"]["webhooks"] = json!([hook("stop", "rollback", &base)]);
    let server = seeded(object);
    let clock = ManualClock::starting_at(t0());
    let a = instance_with_clock(&server, clock.clone());
    reconcile_now(&server, &a).await;
    reconcile_now(&server, &a).await;
    clock.advance(30);
    reconcile_now(&server, &a).await;
    assert_eq!(status(&server).rollout.phase, Phase::Progressing);
    hooks.answer("stop", 200);
    clock.advance(30);
    reconcile_now(&server, &a).await;
    let st = status(&server);
    assert_eq!(st.rollout.phase, Phase::RolledBack);
    assert!(
        st.rollout.message.contains("rollback webhook \"stop\""),
        "{}",
        st.rollout.message
    );
    assert_eq!(vs_weights(&server), Weights::canary_percent(0));
}

#[tokio::test(start_paused = true)]
async fn a_guard_trip_rolls_back_at_once_without_waiting_for_the_analysis_tick() {
    let server = seeded(canary_object(
        json!({"guard": {"checkInterval": "1s"}}),
        json!({}),
    ));
    let clock = TokioClock::starting_at(t0());
    let backends = ScriptedBackends::default();
    let controller = start(&server, "a", backends.clone(), clock);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let st = status(&server);
    assert_eq!(
        (st.rollout.phase, st.rollout.canary_weight),
        (Phase::Progressing, 20)
    );

    // The filter trips at 5 s; the controller reads the gauge every second.
    backends.trip_guard(t0() + chrono::Duration::seconds(5));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let st = status(&server);
    assert_eq!(
        st.rollout.phase,
        Phase::RolledBack,
        "{}",
        st.rollout.message
    );
    assert!(
        st.rollout.message.contains("data-plane guard tripped"),
        "{}",
        st.rollout.message
    );
    let rolled_back_at = st
        .rollout
        .history
        .last()
        .map(|t| (t.at - t0()).num_seconds());
    assert!(
        matches!(rolled_back_at, Some(5..=8)),
        "rolled back at {rolled_back_at:?} s, not at the next analysis tick (30 s)"
    );
    assert_eq!(st.last_tick_at, Some(t0()), "no analysis tick was needed");
    assert_eq!(vs_weights(&server), Weights::canary_percent(0));
    assert_eq!(
        controller
            .registry
            .get("shop/app")
            .map(|view| view.status.phase),
        Some(Phase::RolledBack)
    );
    let text = controller.registry.telemetry().encode().unwrap();
    assert!(
        metric_line(
            &text,
            &["fledge_decisions_total", "reason=\"RollbackTriggered\""]
        )
        .is_some()
            || metric_line(&text, &["fledge_decisions_total", "reason=\"RolledBack\""]).is_some(),
        "{text}"
    );
    controller.stop().await;
}

#[tokio::test]
async fn fledge_controller_serves_probes_the_dashboard_and_metrics_over_http() {
    use super::serve::{serve, ServeOptions};
    let server = seeded(canary_object(json!({"interval": "1s"}), json!({})));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let options = ServeOptions::from_args(
        None,
        Some("fledge-system".into()),
        "fledge-controller".into(),
        Some("a".into()),
        addr,
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(serve(
        Clients::single(server.client("a")),
        listener,
        options,
        Arc::new(ScriptedBackends::default()),
        Arc::new(super::clock::SystemClock),
        async move {
            let _ = stopped.await;
        },
    ));
    let http = reqwest::Client::new();
    let base = format!("http://{addr}");
    let get = |path: &str| {
        let request = http.get(format!("{base}{path}"));
        async move {
            let response = request.send().await.unwrap();
            let code = response.status().as_u16();
            (code, response.text().await.unwrap())
        }
    };

    // Leading, then the canary on the dashboard's API once it has advanced a step.
    let mut view = Value::Null;
    for _ in 0..100 {
        let (_, ready) = get("/readyz").await;
        let (_, list) = get("/api/v1/canaries").await;
        view = serde_json::from_str::<Value>(&list).unwrap_or(Value::Null)[0].clone();
        if ready == "ok: leader" && view["canaryWeight"].as_u64() >= Some(50) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(view["name"], "shop/app", "{view}");
    assert!(view["canaryWeight"].as_u64() >= Some(50), "{view}");
    let (code, one) = get("/api/v1/canaries/shop%2Fapp").await;
    assert_eq!(code, 200, "{one}");
    let one: Value = serde_json::from_str(&one).unwrap();
    assert!(!one["series"].as_array().unwrap().is_empty(), "{one}");
    let (code, page) = get("/").await;
    assert_eq!(code, 200);
    assert!(page.contains("<title>Fledge"), "{page}");
    let (code, text) = get("/metrics").await;
    assert_eq!(code, 200);
    assert!(
        metric_line(&text, &["fledge_canary_weight", "canary=\"shop/app\""]).is_some(),
        "{text}"
    );
    let (_, info) = get("/api/v1/info").await;
    let info: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["commands"], false);
    assert!(
        info["commandsDisabledReason"]
            .as_str()
            .is_some_and(|r| r.contains("annotations")),
        "{info}"
    );
    let refused = http
        .post(format!("{base}/api/v1/canaries/shop%2Fapp/abort"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status().as_u16(), 403);

    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("stops on the signal")
        .unwrap()
        .unwrap();
    assert!(
        reqwest::get(format!("{base}/healthz")).await.is_err(),
        "the HTTP server stopped"
    );
}

#[tokio::test(start_paused = true)]
async fn a_second_canary_on_the_same_route_waits_for_the_first() {
    let server = seeded(canary_object(
        json!({"stepWeights": [20, 40, 60]}),
        json!({}),
    ));
    let mut second = canary_object(json!({}), json!({}));
    second["metadata"]["name"] = json!("app-b");
    server.create(FLEDGE, "canaries", second);
    let clock = TokioClock::starting_at(t0());
    let controller = start(&server, "a", ScriptedBackends::default(), clock);
    tokio::time::sleep(Duration::from_secs(45)).await;

    // `app` steers the route; `app-b` is not ready, says who does, and moves nothing.
    let first = status(&server);
    assert_eq!(
        (first.rollout.phase, first.rollout.canary_weight),
        (Phase::Progressing, 40)
    );
    assert_eq!(vs_weights(&server), Weights::canary_percent(40));
    let b_status = status_of(&server, "app-b");
    assert_eq!(b_status.rollout.phase, Phase::Initializing);
    let ready = b_status
        .condition(condition::READY)
        .expect("a Ready condition");
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "RouteConflict")
    );
    assert!(ready.message.contains("shop/app"), "{}", ready.message);
    assert!(event_reasons(&server)
        .iter()
        .any(|(reason, kind, _)| reason == "RouteConflict" && kind == "Warning"));

    // Once `app` is deleted (its traffic returned to stable), `app-b` starts.
    server.delete(FLEDGE, "canaries", NS, "app");
    tokio::time::sleep(Duration::from_secs(15)).await;
    assert!(server.get(FLEDGE, "canaries", NS, "app").is_none());
    let b_status = status_of(&server, "app-b");
    assert_eq!(
        (b_status.rollout.phase, b_status.rollout.canary_weight),
        (Phase::Progressing, 20),
        "{}",
        b_status.rollout.message
    );
    assert_eq!(vs_weights(&server), Weights::canary_percent(20));
    controller.stop().await;
}

#[tokio::test(start_paused = true)]
async fn commands_wait_out_a_blocked_router_and_need_no_metrics() {
    let server = seeded(canary_object(json!({}), json!({})));
    let clock = TokioClock::starting_at(t0());
    let a = instance(&server, "a", &clock);
    a.backends.script.lock().unwrap().source_broken = true;
    reconcile_now(&server, &a).await; // the finalizer
    reconcile_now(&server, &a).await; // the tick cannot read metrics
    let st = status(&server);
    assert_eq!(
        st.condition(condition::READY).map(|c| c.reason.clone()),
        Some("MetricsSourceError".to_string())
    );

    // The router is blocked too (the VirtualService is gone): `abort` waits, it is not lost.
    let vs = server.get(ISTIO, "virtualservices", NS, "app").unwrap();
    server.delete(ISTIO, "virtualservices", NS, "app");
    server.edit(FLEDGE, "canaries", NS, "app", |c| {
        c["metadata"]["annotations"] = json!({"fledge.dev/abort": "a1"});
    });
    reconcile_now(&server, &a).await;
    let st = status(&server);
    assert_eq!(
        st.condition(condition::READY).map(|c| c.reason.clone()),
        Some("RouterError".to_string())
    );
    assert!(!st.handled_commands.contains_key("fledge.dev/abort"));
    assert_eq!(st.rollout.phase, Phase::Initializing);

    // The route is back; the metrics are still down: the abort is acted on all the same.
    server.create(ISTIO, "virtualservices", vs);
    reconcile_now(&server, &a).await;
    let st = status(&server);
    assert_eq!(
        st.rollout.phase,
        Phase::RolledBack,
        "{}",
        st.rollout.message
    );
    assert_eq!(
        st.handled_commands
            .get("fledge.dev/abort")
            .map(String::as_str),
        Some("a1")
    );
    assert_eq!(vs_weights(&server), Weights::canary_percent(0));
}

mod gateway_api;

/// Requests of `client` of one kind (`RecordedRequest::kind`), leases aside.
fn count_kind(requests: &[RecordedRequest], client: &str, kind: &str) -> usize {
    requests
        .iter()
        .filter(|r| r.client == client && r.kind() == kind)
        .count()
}

#[tokio::test(start_paused = true)]
async fn analysis_progress_is_checkpointed_steps_are_written_at_once_and_routes_are_not_polled() {
    let server = seeded(canary_object(
        json!({
            "interval": "10s",
            "stepWeights": null,
            "steps": [{"setWeight": 20}, {"pause": {"duration": "10m"}}, {"setWeight": 50}]
        }),
        json!({}),
    ));
    let backends = ScriptedBackends::default();
    let checkpoint = Duration::from_secs(60);
    let first = ControllerOptions {
        status_checkpoint: checkpoint,
        ..options("a")
    };
    let controller = start_with(
        &server,
        first,
        backends.clone(),
        TokioClock::starting_at(t0()),
    );
    tokio::time::sleep(Duration::from_secs(25)).await;
    // Baseline at 0 s (step 0: 20 %), a pass at 10 s (→ the pause), both written at once.
    let st = status(&server);
    assert_eq!((st.rollout.step, st.rollout.canary_weight), (1, 20));
    assert_eq!(vs_weights(&server), Weights::canary_percent(20));
    let requests = server.take_requests();
    assert!(count_kind(&requests, "a", "PUT canaries/status") >= 2);

    // In the pause: judged every 10 s, but nothing is written and no route is read.
    let judged = backends.observations();
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(backends.observations() >= judged + 3);
    let requests = server.take_requests();
    for kind in [
        "PUT canaries/status",
        "GET virtualservices one",
        "PATCH virtualservices",
    ] {
        assert_eq!(count_kind(&requests, "a", kind), 0, "{kind}: {requests:?}");
    }
    let shown = controller
        .registry
        .get("shop/app")
        .and_then(|v| v.status.last_analysis)
        .map(|a| a.at);
    let persisted = status(&server).rollout.last_analysis.map(|a| a.at);
    assert!(
        shown > persisted,
        "the dashboard shows progress not written yet"
    );

    // The checkpoint writes the progress within two checkpoint periods of the last write.
    tokio::time::sleep(Duration::from_secs(95)).await;
    let writes = count_kind(&server.take_requests(), "a", "PUT canaries/status");
    assert!((1..=2).contains(&writes), "{writes} checkpoint writes");
    let persisted = status(&server);
    assert_eq!(persisted.rollout.step, 1);
    assert!(persisted.last_tick_at >= Some(t0() + chrono::Duration::seconds(60)));
    controller.stop().await;

    // A new controller continues at the persisted step: nothing is stepped again.
    let successor = start_with(
        &server,
        ControllerOptions {
            status_checkpoint: checkpoint,
            ..options("b")
        },
        backends.clone(),
        TokioClock::starting_at(t0() + chrono::Duration::seconds(150)),
    );
    tokio::time::sleep(Duration::from_secs(30)).await;
    let st = status(&server);
    assert_eq!((st.rollout.step, st.rollout.canary_weight), (1, 20));
    let steps: Vec<usize> = st.rollout.history.iter().map(|t| t.step).collect();
    assert_eq!(
        steps,
        [0, 1],
        "each step entered once: {:?}",
        st.rollout.history
    );
    successor.stop().await;
}

#[tokio::test(start_paused = true)]
async fn without_room_in_the_api_budget_checkpoints_and_events_wait_but_steps_do_not() {
    let server = seeded(canary_object(
        json!({
            "interval": "10s",
            "stepWeights": null,
            "steps": [{"setWeight": 20}, {"pause": {"duration": "40s"}}, {"setWeight": 50}]
        }),
        json!({}),
    ));
    let backends = ScriptedBackends::default();
    // A bucket that never refills enough: 5 of 10 tokens, never the 6 that mean room.
    let budget = super::throttle::TokenBucket::new(0.000_001, 10);
    for _ in 0..5 {
        budget.try_take().unwrap();
    }
    let controller = start_with_budget(
        &server,
        ControllerOptions {
            status_checkpoint: Duration::from_secs(10),
            ..options("a")
        },
        backends.clone(),
        TokioClock::starting_at(t0()),
        Some(budget),
    );
    tokio::time::sleep(Duration::from_secs(55)).await;
    // Every step written at once (20 %, the pause, 50 %), each entered once; no checkpoint
    // in between, although one was due every 10–20 s; no Event.
    let st = status(&server);
    assert_eq!((st.rollout.step, st.rollout.canary_weight), (2, 50));
    assert_eq!(vs_weights(&server), Weights::canary_percent(50));
    let steps: Vec<usize> = st.rollout.history.iter().map(|t| t.step).collect();
    assert_eq!(steps, [0, 1, 2], "{:?}", st.rollout.history);
    let requests = server.take_requests();
    let writes = count_kind(&requests, "a", "PUT canaries/status");
    assert!(
        (3..=4).contains(&writes),
        "{writes} status writes: {requests:?}"
    );
    assert_eq!(count_kind(&requests, "a", "POST events"), 0);
    controller.stop().await;
}

#[tokio::test(start_paused = true)]
async fn shards_each_lead_their_own_lease_and_act_only_on_their_namespaces() {
    use super::shard::{lease_name, Shard};
    let shards = [Shard { index: 0, count: 2 }, Shard { index: 1, count: 2 }];
    let owner = |namespace: &str| shards.iter().position(|s| s.owns(namespace)).unwrap();
    let other = (0..100)
        .map(|i| format!("team-{i}"))
        .find(|ns| owner(ns) != owner(NS))
        .unwrap();
    let server = seeded(canary_object(json!({}), json!({})));
    let in_other = |mut object: Value| {
        object["metadata"]["namespace"] = json!(other);
        object
    };
    server.create(ISTIO, "virtualservices", in_other(virtual_service()));
    server.create(ISTIO, "destinationrules", in_other(destination_rule()));
    server.create(
        FLEDGE,
        "canaries",
        in_other(canary_object(json!({}), json!({}))),
    );
    let running: Vec<Running> = shards
        .iter()
        .map(|shard| {
            let identity = format!("shard-{}", shard.index);
            let mut options = options(&identity);
            options.lease.name = lease_name(&options.lease.name, Some(*shard), None);
            options.shard = Some(*shard);
            start_with(
                &server,
                options,
                ScriptedBackends::default(),
                TokioClock::starting_at(t0()),
            )
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(45)).await;

    assert!(
        running.iter().all(|r| *r.leader.borrow()),
        "each shard leads its own Lease"
    );
    let leases = server.list("coordination.k8s.io", "leases", "fledge-system");
    assert_eq!(leases.len(), 2);
    for (namespace, name) in [(NS.to_string(), "app"), (other.clone(), "app")] {
        let st: CanaryResourceStatus = serde_json::from_value(
            server.get(FLEDGE, "canaries", &namespace, name).unwrap()["status"].clone(),
        )
        .unwrap();
        assert_eq!(
            st.rollout.canary_weight, 50,
            "{namespace}: {}",
            st.rollout.message
        );
        let path =
            format!("/apis/fledge.dev/v1alpha1/namespaces/{namespace}/canaries/{name}/status");
        let writers: std::collections::BTreeSet<String> = server
            .requests()
            .iter()
            .filter(|r| r.method == "PUT" && r.path == path)
            .map(|r| r.client.clone())
            .collect();
        let expected = format!("shard-{}", owner(&namespace));
        assert_eq!(writers.into_iter().collect::<Vec<_>>(), [expected]);
    }
    for r in running {
        r.stop().await;
    }
}
