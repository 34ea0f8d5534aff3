//! The workload lifecycle through the reconciler (`spec.targetRef`), against the in-process
//! fake API server under tokio's paused clock; `settle_deployments` plays the Deployment
//! controller and the kubelet.

use super::clock::TokioClock;
use super::crd::{condition, CanaryResourceStatus};
use super::reconciler_tests::{
    event_reasons, instance, reconcile_now, status, stored_canary, t0, virtual_service, Instance,
    FLEDGE, ISTIO, NS,
};
use crate::router::factory::weights_in;
use crate::router::Weights;
use fledge_core::rollout::Phase;
use fledge_core::workload::WorkloadPhase;
use fledge_testkit::fake_api::FakeApiServer;
use serde_json::{json, Value};
use std::time::Duration;

pub(super) const TRACK: &str = "fledge.dev/track";

pub(super) fn deployment(namespace: &str, image: &str, replicas: u32) -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "app", "namespace": namespace, "labels": {"app": "app"}},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": "app", TRACK: "canary"}},
            "template": {
                "metadata": {"labels": {"app": "app", TRACK: "canary"}},
                "spec": {"containers": [{"name": "app", "image": image}]}
            }
        }
    })
}

pub(super) fn track_rule(namespace: &str) -> Value {
    json!({
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {"name": "app", "namespace": namespace},
        "spec": {"host": "app", "subsets": [
            {"name": "stable", "labels": {TRACK: "stable"}},
            {"name": "canary", "labels": {TRACK: "canary"}}
        ]}
    })
}

pub(super) fn workload_canary(namespace: &str, extra: Value) -> Value {
    let mut spec = json!({
        "service": "app",
        "stable": {"subset": "stable"},
        "canary": {"subset": "canary"},
        "metricsSource": {"envoyAdmin": {"urls": ["http://127.0.0.1:15000"]}},
        "router": {"istio": {"virtualService": "app", "route": "primary"}},
        "analysis": {
            "interval": "10s",
            "threshold": 2,
            "minCanaryRequests": 10,
            "stepWeights": [20, 50],
            "metrics": [{"name": "request-success-rate", "thresholdRange": {"min": 99}}]
        },
        "targetRef": {"name": "app"},
        "scaleDownDelay": "3s",
        "progressDeadline": "1m"
    });
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
        spec.extend(extra.clone());
    }
    json!({
        "apiVersion": "fledge.dev/v1alpha1",
        "kind": "Canary",
        "metadata": {"name": "app", "namespace": namespace},
        "spec": spec
    })
}

/// The app as kept in Git, in `namespace`: Deployment `app` (2 replicas, serving), the
/// VirtualService at stable 100 / canary 0, a DestinationRule by track label, and a Canary.
pub(super) fn seed_workload(server: &FakeApiServer, namespace: &str, extra: Value) {
    let mut vs = virtual_service();
    vs["metadata"]["namespace"] = json!(namespace);
    server.create(ISTIO, "virtualservices", vs);
    server.create(ISTIO, "destinationrules", track_rule(namespace));
    server.create("apps", "deployments", deployment(namespace, "app:v1", 2));
    server.settle_deployments(|_| true);
    server.create(FLEDGE, "canaries", workload_canary(namespace, extra));
}

fn seeded(extra: Value) -> FakeApiServer {
    let server = FakeApiServer::new();
    seed_workload(&server, NS, extra);
    server
}

fn workload_of(server: &FakeApiServer) -> fledge_core::workload::WorkloadStatus {
    status(server).workload.expect("a workload status")
}

fn weights(server: &FakeApiServer) -> Weights {
    let vs = server.get(ISTIO, "virtualservices", NS, "app").unwrap();
    weights_in(&stored_canary(server).spec.canary, NS, &vs).unwrap()
}

fn deployment_of(server: &FakeApiServer, name: &str) -> Option<Value> {
    server.get("apps", "deployments", NS, name)
}

fn image_of(deployment: &Value) -> &str {
    deployment["spec"]["template"]["spec"]["containers"][0]["image"]
        .as_str()
        .unwrap_or_default()
}

/// Reconcile, let the Deployments settle (pods ready unless `never_ready` names their
/// image), advance the clock 1 s; until `done`. Returns the weights seen after each pass.
async fn drive(
    server: &FakeApiServer,
    instance: &Instance,
    never_ready: &str,
    done: impl Fn(&CanaryResourceStatus) -> bool,
) -> Vec<Weights> {
    let mut seen = Vec::new();
    for _ in 0..300 {
        reconcile_now(server, instance).await;
        seen.push(weights(server));
        server.settle_deployments(|d| never_ready.is_empty() || image_of(d) != never_ready);
        if done(&status(server)) {
            return seen;
        }
        tokio::time::advance(Duration::from_secs(1)).await;
    }
    panic!("not reached: {:#?}", status(server));
}

fn phase(status: &CanaryResourceStatus) -> Option<WorkloadPhase> {
    status.workload.as_ref().map(|w| w.phase)
}

async fn adopted(server: &FakeApiServer, a: &Instance) {
    reconcile_now(server, a).await; // the finalizer
    drive(server, a, "", |s| {
        phase(s) == Some(WorkloadPhase::Initialized)
    })
    .await;
}

fn set_image(server: &FakeApiServer, image: &str) {
    server.edit("apps", "deployments", NS, "app", |d| {
        d["spec"]["template"]["spec"]["containers"][0]["image"] = json!(image);
    });
}

#[tokio::test(start_paused = true)]
async fn adoption_routes_to_the_pods_first_creates_the_primary_and_retires_the_target() {
    let server = seeded(json!({}));
    let clock = TokioClock::starting_at(t0());
    let a = instance(&server, "a", &clock);
    reconcile_now(&server, &a).await; // the finalizer
                                      // Git's route says stable 100 before any primary pod exists: the first pass sends the
                                      // traffic to where the pods are, then creates the primary.
    reconcile_now(&server, &a).await;
    assert_eq!(weights(&server), Weights::canary_percent(100));
    let primary = deployment_of(&server, "app-primary").expect("the primary");
    let canary_uid = stored_canary(&server).metadata.uid.unwrap();
    assert_eq!(primary["metadata"]["ownerReferences"][0]["uid"], canary_uid);
    assert_eq!(primary["spec"]["selector"]["matchLabels"][TRACK], "stable");
    assert_eq!(
        primary["spec"]["template"]["metadata"]["labels"][TRACK],
        "stable"
    );
    assert_eq!(primary["spec"]["replicas"], 2);
    let w = workload_of(&server);
    assert_eq!(w.phase, WorkloadPhase::Initializing);
    assert!(w.weights_held.unwrap().contains("stable subset"));

    let seen = drive(&server, &a, "", |s| {
        phase(s) == Some(WorkloadPhase::Initialized)
    })
    .await;
    assert_eq!(weights(&server), Weights::canary_percent(0));
    assert!(seen.contains(&Weights::canary_percent(100)));
    let target = deployment_of(&server, "app").unwrap();
    assert_eq!(target["spec"]["replicas"], 0, "the target is retired");
    let requests = server.requests();
    let scaled = requests
        .iter()
        .filter(|r| r.method == "PATCH" && r.path.ends_with("/deployments/app/scale"))
        .count();
    assert_eq!(scaled, 1);
    let w = workload_of(&server);
    assert_eq!(w.stable_image.as_deref(), Some("app:v1"));
    assert_eq!((w.primary.available, w.target.desired), (2, 0));
    let reasons: Vec<String> = event_reasons(&server).into_iter().map(|e| e.0).collect();
    assert!(
        reasons.contains(&"CreatingPrimary".to_string())
            && reasons.contains(&"Initialized".to_string()),
        "{reasons:?}"
    );
    let st = status(&server);
    assert!(st.is_ready());
    // At rest: a pass does nothing but look.
    server.take_requests();
    tokio::time::advance(Duration::from_secs(30)).await;
    reconcile_now(&server, &a).await;
    assert!(server.take_requests().iter().all(|r| r.method == "GET"));
}

#[tokio::test(start_paused = true)]
async fn a_new_revision_is_analysed_promoted_into_the_primary_and_the_target_goes_to_zero() {
    let server = seeded(json!({}));
    let clock = TokioClock::starting_at(t0());
    let a = instance(&server, "a", &clock);
    adopted(&server, &a).await;
    set_image(&server, "app:v2");
    let seen = drive(&server, &a, "", |s| {
        phase(s) == Some(WorkloadPhase::Succeeded)
    })
    .await;
    for step in [20, 50, 100] {
        assert!(
            seen.contains(&Weights::canary_percent(step)),
            "{step}: {seen:?}"
        );
    }
    assert_eq!(weights(&server), Weights::canary_percent(0));
    assert_eq!(
        image_of(&deployment_of(&server, "app-primary").unwrap()),
        "app:v2"
    );
    assert_eq!(
        deployment_of(&server, "app").unwrap()["spec"]["replicas"],
        0
    );
    let st = status(&server);
    assert_eq!(st.rollout.phase, Phase::Promoted);
    assert_eq!(
        st.rollout.canary_weight, 0,
        "the recorded weight went back with the traffic"
    );
    let w = st.workload.unwrap();
    assert_eq!(
        (w.image.as_deref(), w.stable_image.as_deref()),
        (Some("app:v2"), Some("app:v2"))
    );
    assert!(st
        .conditions
        .iter()
        .any(|c| c.type_ == condition::PROMOTED && c.status == "True"));
}

#[tokio::test(start_paused = true)]
async fn a_failing_revision_is_rolled_back_and_the_primary_is_untouched() {
    let server = seeded(json!({}));
    let clock = TokioClock::starting_at(t0());
    let a = instance(&server, "a", &clock);
    adopted(&server, &a).await;
    let primary = deployment_of(&server, "app-primary").unwrap();
    a.backends.set_unhealthy(true);
    set_image(&server, "app:v2-bad");
    drive(&server, &a, "", |s| phase(s) == Some(WorkloadPhase::Failed)).await;
    assert_eq!(
        deployment_of(&server, "app-primary").unwrap()["spec"],
        primary["spec"]
    );
    assert_eq!(
        deployment_of(&server, "app").unwrap()["spec"]["replicas"],
        0
    );
    assert_eq!(weights(&server), Weights::canary_percent(0));
    let w = workload_of(&server);
    assert!(w.failure.unwrap().contains("success rate"));
    // Nothing more until the template changes.
    server.take_requests();
    for _ in 0..5 {
        tokio::time::advance(Duration::from_secs(10)).await;
        reconcile_now(&server, &a).await;
    }
    assert!(server.take_requests().iter().all(|r| r.method == "GET"));
}

#[tokio::test(start_paused = true)]
async fn a_revision_that_never_becomes_ready_is_rolled_back_at_the_deadline() {
    let server = seeded(json!({"progressDeadline": "20s"}));
    let clock = TokioClock::starting_at(t0());
    let a = instance(&server, "a", &clock);
    adopted(&server, &a).await;
    set_image(&server, "app:never");
    drive(&server, &a, "app:never", |s| {
        phase(s) == Some(WorkloadPhase::Failed)
    })
    .await;
    let st = status(&server);
    assert_eq!(st.rollout.phase, Phase::RolledBack);
    let failure = st.workload.unwrap().failure.unwrap();
    assert!(
        failure.contains("progress deadline exceeded: the target app did not become available"),
        "{failure}"
    );
    let reasons: Vec<String> = event_reasons(&server).into_iter().map(|e| e.0).collect();
    assert!(
        reasons.contains(&"ProgressDeadlineExceeded".to_string()),
        "{reasons:?}"
    );
}

/// A controller stops after copying the template into the primary and before scaling the
/// target down; a new one (no memory of the first) finishes the promotion once.
#[tokio::test(start_paused = true)]
async fn a_new_leader_finishes_a_promotion_exactly_once() {
    let server = seeded(json!({}));
    let clock = TokioClock::starting_at(t0());
    let a = instance(&server, "a", &clock);
    adopted(&server, &a).await;
    set_image(&server, "app:v2");
    drive(&server, &a, "", |s| {
        phase(s) == Some(WorkloadPhase::Finalising) || phase(s) == Some(WorkloadPhase::Promoting)
    })
    .await;
    assert_eq!(
        image_of(&deployment_of(&server, "app-primary").unwrap()),
        "app:v2"
    );
    assert_eq!(
        deployment_of(&server, "app").unwrap()["spec"]["replicas"],
        2
    );
    let copies = |server: &FakeApiServer| {
        server
            .requests()
            .iter()
            .filter(|r| {
                r.method == "PATCH"
                    && r.path.ends_with("/deployments/app-primary")
                    && r.status == 200
            })
            .count()
    };
    assert_eq!(copies(&server), 1);
    drop(a);
    let b = instance(&server, "b", &clock);
    drive(&server, &b, "", |s| {
        phase(s) == Some(WorkloadPhase::Succeeded)
    })
    .await;
    assert_eq!(copies(&server), 1, "no second copy");
    let scale_downs = server
        .requests()
        .iter()
        .filter(|r| r.client == "b" && r.path.ends_with("/deployments/app/scale"))
        .count();
    assert_eq!(scale_downs, 1);
    let succeeded = event_reasons(&server)
        .into_iter()
        .filter(|e| e.0 == "Succeeded")
        .count();
    assert_eq!(succeeded, 1);
}

#[tokio::test(start_paused = true)]
async fn bad_workload_input_is_ready_false_with_the_field_and_fix_and_nothing_moves() {
    type BreakIt = Box<dyn Fn(&FakeApiServer)>;
    let cases: Vec<(&str, BreakIt, &str)> = vec![
        (
            "missing target",
            Box::new(|s: &FakeApiServer| s.delete("apps", "deployments", NS, "app")),
            "spec.targetRef.name",
        ),
        (
            "no track label",
            Box::new(|s: &FakeApiServer| {
                s.delete("apps", "deployments", NS, "app");
                let mut d = deployment(NS, "app:v1", 2);
                d["spec"]["selector"]["matchLabels"] = json!({"app": "app"});
                d["spec"]["template"]["metadata"]["labels"] = json!({"app": "app"});
                s.create("apps", "deployments", d);
            }),
            "deployments/app: spec.template.metadata.labels",
        ),
        (
            "HPA for another workload",
            Box::new(|s: &FakeApiServer| {
                s.edit(FLEDGE, "canaries", NS, "app", |c| {
                    c["spec"]["autoscalerRef"] = json!({"name": "other"})
                });
                s.create("autoscaling", "horizontalpodautoscalers", json!({
                    "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
                    "metadata": {"name": "other", "namespace": NS},
                    "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "checkout"}, "maxReplicas": 4}
                }));
            }),
            "spec.autoscalerRef",
        ),
        (
            "subsets not by the track label",
            Box::new(|s: &FakeApiServer| {
                s.edit(ISTIO, "destinationrules", NS, "app", |r| {
                    r["spec"]["subsets"][0]["labels"] = json!({"version": "v1"});
                });
            }),
            "destinationrule subset stable: labels",
        ),
    ];
    for (case, break_it, field) in cases {
        let server = seeded(json!({}));
        break_it(&server);
        let clock = TokioClock::starting_at(t0());
        let a = instance(&server, "a", &clock);
        reconcile_now(&server, &a).await;
        server.take_requests();
        for _ in 0..3 {
            reconcile_now(&server, &a).await;
            tokio::time::advance(Duration::from_secs(5)).await;
        }
        let st = status(&server);
        let ready = st.condition(condition::READY).expect("Ready");
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "InvalidWorkload"),
            "{case}"
        );
        assert!(ready.message.contains(field), "{case}: {}", ready.message);
        let writes: Vec<String> = server
            .take_requests()
            .iter()
            .filter(|r| {
                r.method != "GET" && !r.path.contains("/events") && !r.path.contains("/canaries/")
            })
            .map(|r| r.line())
            .collect();
        assert!(
            writes.is_empty(),
            "{case}: nothing scaled or routed: {writes:?}"
        );
        assert!(deployment_of(&server, "app-primary").is_none(), "{case}");
    }
}

#[tokio::test(start_paused = true)]
async fn deleting_the_canary_keeps_the_primary_serving_at_stable_100() {
    let server = seeded(json!({}));
    let clock = TokioClock::starting_at(t0());
    let a = instance(&server, "a", &clock);
    adopted(&server, &a).await;
    server.delete(FLEDGE, "canaries", NS, "app");
    for _ in 0..5 {
        if server.get(FLEDGE, "canaries", NS, "app").is_none() {
            break;
        }
        let _ = super::reconciler::reconcile(
            std::sync::Arc::new(stored_canary(&server)),
            a.ctx.clone(),
        )
        .await;
        tokio::time::advance(Duration::from_secs(1)).await;
    }
    assert!(
        server.get(FLEDGE, "canaries", NS, "app").is_none(),
        "the Canary went"
    );
    let primary = deployment_of(&server, "app-primary").expect("the primary keeps serving");
    assert_eq!(primary["metadata"]["ownerReferences"], json!([]));
    let vs = server.get(ISTIO, "virtualservices", NS, "app").unwrap();
    assert_eq!(vs["spec"]["http"][0]["route"][0]["weight"], 100);
}

#[tokio::test(start_paused = true)]
async fn revert_on_deletion_gives_the_target_the_primary_template_and_the_traffic() {
    let server = seeded(json!({"revertOnDeletion": true}));
    let clock = TokioClock::starting_at(t0());
    let a = instance(&server, "a", &clock);
    adopted(&server, &a).await;
    set_image(&server, "app:v2");
    drive(&server, &a, "", |s| {
        phase(s) == Some(WorkloadPhase::Succeeded)
    })
    .await;
    set_image(&server, "app:v3"); // Git moved on; the Canary is deleted before v3 is analysed
    server.delete(FLEDGE, "canaries", NS, "app");
    for _ in 0..30 {
        if server.get(FLEDGE, "canaries", NS, "app").is_none() {
            break;
        }
        let _ = super::reconciler::reconcile(
            std::sync::Arc::new(stored_canary(&server)),
            a.ctx.clone(),
        )
        .await;
        server.settle_deployments(|_| true);
        tokio::time::advance(Duration::from_secs(1)).await;
    }
    assert!(
        server.get(FLEDGE, "canaries", NS, "app").is_none(),
        "the Canary went"
    );
    let target = deployment_of(&server, "app").unwrap();
    assert_eq!(
        image_of(&target),
        "app:v2",
        "the primary's (promoted) template"
    );
    assert_eq!(
        target["spec"]["template"]["metadata"]["labels"][TRACK],
        "canary"
    );
    assert_eq!(target["spec"]["replicas"], 2);
    let vs = server.get(ISTIO, "virtualservices", NS, "app").unwrap();
    assert_eq!(
        vs["spec"]["http"][0]["route"][1]["weight"], 100,
        "all traffic to the target"
    );
    assert!(
        deployment_of(&server, "app-primary").is_none(),
        "the primary went with the Canary"
    );
}
