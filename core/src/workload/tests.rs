//! The lifecycle driven through whole releases against a simulated cluster: a kubelet that
//! makes Deployments available (or not), a router that applies the weights, and the real
//! rollout state machine judging scripted observations. Every step checks the invariant.

use super::*;
use crate::contract::ResponseClass;
use crate::duration::HumanDuration;
use crate::observe::{LatencyHistogram, Observation, SubsetTraffic};
use crate::spec::tests::example;
use crate::spec::{IstioRouterSpec, RouterSpec, StepSpec};
use chrono::TimeZone;
use serde_json::json;

fn t(secs: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_700_000_000 + secs, 0).unwrap()
}

const TRACK: &str = DEFAULT_TRACK_LABEL;

fn spec() -> CanarySpec {
    let mut spec = example().spec;
    spec.router = RouterSpec {
        envoy_rds: None,
        istio: Some(IstioRouterSpec {
            virtual_service: "app".into(),
            route: "primary".into(),
            stable_host: None,
            canary_host: None,
            destination_rule: None,
            header_route: None,
            mirror_percentage: None,
        }),
        gateway_api: None,
    };
    spec.analysis.steps = Some(vec![StepSpec::set_weight(20), StepSpec::set_weight(50)]);
    spec.analysis.interval = HumanDuration::from_secs(10);
    spec.target_ref = Some(TargetRef::deployment("app"));
    spec.progress_deadline = Some(HumanDuration::from_secs(60));
    spec.scale_down_delay = Some(HumanDuration::from_secs(5));
    spec
}

fn deployment(name: &str, image: &str, replicas: i64) -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": name, "namespace": "shop", "generation": 1,
            "labels": {"app": "app", TRACK: "canary", "app.kubernetes.io/instance": "shop-app"},
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"}
        },
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": "app", TRACK: "canary"}},
            "strategy": {"type": "RollingUpdate"},
            "template": {
                "metadata": {"labels": {"app": "app", TRACK: "canary"}},
                "spec": {"containers": [{"name": "app", "image": image}]}
            }
        },
        "status": {}
    })
}

fn owner() -> Owner {
    Owner {
        namespace: "shop".into(),
        name: "app".into(),
        uid: "uid-canary".into(),
    }
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

#[derive(Clone, Copy, PartialEq)]
enum Canary {
    Healthy,
    Failing,
    Idle,
}

/// A cluster in memory: the objects, a kubelet, the route, and what happened.
#[derive(Clone)]
struct World {
    spec: CanarySpec,
    status: WorkloadStatus,
    rollout: CanaryStatus,
    target: Option<Value>,
    primary: Option<Value>,
    autoscaler: Option<Value>,
    primary_autoscaler: Option<Value>,
    routed: u8,
    /// The kubelet makes these Deployments' pods ready.
    target_ready: bool,
    primary_ready: bool,
    confirmed: Option<Result<(), String>>,
    retry: bool,
    now: i64,
    /// Every action performed, in order.
    log: Vec<Action>,
    /// A controller that dies right after persisting: the actions are not performed.
    drop_actions: bool,
    problems: Vec<SpecError>,
    analysis_runs: u32,
}

impl World {
    fn new(spec: CanarySpec, target: Value) -> World {
        World {
            spec,
            status: WorkloadStatus::default(),
            rollout: CanaryStatus::default(),
            target: Some(target),
            primary: None,
            autoscaler: None,
            primary_autoscaler: None,
            routed: 0,
            target_ready: true,
            primary_ready: true,
            confirmed: None,
            retry: false,
            now: 0,
            log: Vec::new(),
            drop_actions: false,
            problems: Vec::new(),
            analysis_runs: 0,
        }
    }

    /// An app that serves: the target's pods are up, the route says stable 100 (Git).
    fn serving(replicas: i64) -> World {
        let mut world = World::new(spec(), deployment("app", "app:v1", replicas));
        world.kubelet();
        world
    }

    fn facts(&self) -> Facts {
        Facts {
            owner: owner(),
            target: self.target.clone(),
            primary: self.primary.clone(),
            autoscaler: self.autoscaler.clone(),
            primary_autoscaler: self.primary_autoscaler.clone(),
            routed: Some(self.routed),
            subsets: None,
            rollout_confirmed: self.confirmed.clone(),
            retry: self.retry,
        }
    }

    fn available(d: &Option<Value>) -> i32 {
        d.as_ref().map_or(0, |d| Deployment(d).available())
    }

    /// One reconcile: the analysis tick if the persisted phase is Progressing, then the
    /// lifecycle; then the actions and the route, then the kubelet. Time moves by 1 s.
    fn step(&mut self, canary: Canary) -> Decision {
        self.now += 1;
        let now = t(self.now);
        if self.status.phase == WorkloadPhase::Progressing {
            self.analysis_runs += 1;
            let observation = match canary {
                Canary::Healthy => traffic(100, 0),
                Canary::Failing => traffic(70, 30),
                Canary::Idle => traffic(1, 0),
            };
            let input = Input {
                observation: Some(Ok(Observation {
                    stable: traffic(500, 0),
                    canary: observation,
                    ..Default::default()
                })),
                command: None,
            };
            self.rollout = rollout::step(&self.spec, &self.rollout, &input, now).status;
        }
        let decision = step(&self.spec, &self.status, &self.rollout, &self.facts(), now);
        self.check_invariant(&decision);
        self.status = decision.status.clone();
        if let Some(rollout) = &decision.rollout {
            self.rollout = rollout.clone();
        }
        self.problems = decision.problems.clone();
        if self.drop_actions {
            return decision;
        }
        for action in &decision.actions {
            self.perform(action);
        }
        if let Some(weight) = decision.canary_weight {
            self.routed = weight;
        }
        self.kubelet();
        decision
    }

    fn check_invariant(&self, decision: &Decision) {
        let (stable, canary) = (
            Self::available(&self.primary),
            Self::available(&self.target),
        );
        if let Some(weight) = decision.canary_weight {
            assert!(
                !(weight > 0 && canary == 0 && stable > 0),
                "t={} {:?}: canary {weight}% but the canary has no available pods",
                self.now,
                decision.status.phase
            );
            assert!(
                !(weight < 100 && stable == 0 && canary > 0),
                "t={} {:?}: stable {}% but the stable subset has no available pods",
                self.now,
                decision.status.phase,
                100 - weight
            );
        }
    }

    fn perform(&mut self, action: &Action) {
        self.log.push(action.clone());
        match action {
            Action::CreatePrimary(object) => {
                assert!(self.primary.is_none(), "the primary is created once");
                let mut object = object.clone();
                object["metadata"]["generation"] = json!(1);
                object["status"] = json!({});
                self.primary = Some(object);
            }
            Action::UpdatePrimary(spec) => {
                let primary = self.primary.as_mut().expect("a primary to update");
                let before = primary["spec"].clone();
                for (key, value) in spec.as_object().unwrap() {
                    primary["spec"][key] = value.clone();
                }
                if primary["spec"] != before {
                    bump(primary);
                }
            }
            Action::ScaleTarget(replicas) => {
                let target = self.target.as_mut().unwrap();
                if target["spec"]["replicas"] != json!(replicas) {
                    target["spec"]["replicas"] = json!(replicas);
                }
            }
            Action::ApplyPrimaryAutoscaler(object) => {
                self.primary_autoscaler = Some(object.clone())
            }
            Action::DeletePrimaryAutoscaler(_) => self.primary_autoscaler = None,
            Action::RevertTarget(template) => {
                let target = self.target.as_mut().unwrap();
                target["spec"]["template"] = template.clone();
                bump(target);
            }
            Action::ReleaseOwned { .. } | Action::Event { .. } | Action::PostRollout => {}
        }
    }

    /// The Deployment controller and kubelet: a Deployment's pods become ready (or not).
    fn kubelet(&mut self) {
        for (deployment, ready) in [
            (&mut self.target, self.target_ready),
            (&mut self.primary, self.primary_ready),
        ] {
            let Some(d) = deployment.as_mut() else {
                continue;
            };
            let replicas = d["spec"]["replicas"].as_i64().unwrap_or(1);
            let old_available = d["status"]["availableReplicas"].as_i64().unwrap_or(0);
            let generation = d["metadata"]["generation"].clone();
            d["status"] = if ready {
                json!({"observedGeneration": generation, "replicas": replicas,
                       "updatedReplicas": replicas, "readyReplicas": replicas, "availableReplicas": replicas})
            } else {
                // New pods never become ready; the old ones keep serving (a stuck rollout).
                let old = old_available.min(replicas);
                json!({"observedGeneration": generation, "replicas": replicas + old,
                       "updatedReplicas": replicas, "readyReplicas": old, "availableReplicas": old})
            };
        }
    }

    fn set_image(&mut self, image: &str) {
        let target = self.target.as_mut().unwrap();
        target["spec"]["template"]["spec"]["containers"][0]["image"] = json!(image);
        // The Deployment controller sees the new generation after the next reconcile.
        bump(target);
    }

    fn run_until(&mut self, canary: Canary, limit: usize, done: impl Fn(&World) -> bool) {
        for _ in 0..limit {
            if done(self) {
                return;
            }
            self.step(canary);
        }
        assert!(
            done(self),
            "not reached within {limit} steps: {:?} {:?} / rollout {:?}: {}",
            self.status.phase,
            self.status.message,
            self.rollout.phase,
            self.rollout.message
        );
    }

    fn adopted(mut self) -> World {
        self.run_until(Canary::Healthy, 20, |w| {
            w.status.phase == WorkloadPhase::Initialized
        });
        self.log.clear();
        self
    }

    fn count(&self, f: impl Fn(&Action) -> bool) -> usize {
        self.log.iter().filter(|a| f(a)).count()
    }

    fn events(&self, reason: &str) -> usize {
        self.count(|a| matches!(a, Action::Event { reason: r, .. } if *r == reason))
    }

    fn image_of(d: &Option<Value>) -> String {
        d.as_ref().map(images).unwrap_or_default()
    }

    fn replicas_of(d: &Option<Value>) -> i32 {
        d.as_ref().map_or(-1, |d| Deployment(d).replicas())
    }
}

fn bump(object: &mut Value) {
    let generation = object["metadata"]["generation"].as_i64().unwrap_or(1);
    object["metadata"]["generation"] = json!(generation + 1);
}

#[test]
fn adoption_moves_traffic_to_the_pods_first_then_to_the_primary_and_retires_the_target() {
    // The Deployment serves live traffic and Git's route already says stable 100 / canary 0,
    // before any primary pod exists: the first decision sends the traffic to where pods are.
    let mut world = World::serving(2);
    world.primary_ready = false;
    let first = world.step(Canary::Healthy);
    assert_eq!(first.canary_weight, Some(100));
    assert!(first
        .status
        .weights_held
        .as_deref()
        .unwrap()
        .contains("stable subset"));
    let created = match &first.actions[0] {
        Action::CreatePrimary(object) => object.clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!(created["metadata"]["name"], "app-primary");
    assert_eq!(
        created["metadata"]["ownerReferences"][0]["uid"],
        "uid-canary"
    );
    assert_eq!(created["metadata"]["ownerReferences"][0]["kind"], "Canary");
    assert_eq!(created["spec"]["replicas"], 2);
    assert_eq!(created["spec"]["selector"]["matchLabels"][TRACK], "stable");
    assert_eq!(
        created["spec"]["template"]["metadata"]["labels"][TRACK],
        "stable"
    );
    assert_eq!(
        created["spec"]["template"]["metadata"]["labels"]["app"],
        "app"
    );
    assert_eq!(created["spec"]["strategy"]["type"], "RollingUpdate");
    let labels = &created["metadata"]["labels"];
    assert_eq!(labels[TRACK], "stable");
    assert!(
        labels.get("app.kubernetes.io/instance").is_none(),
        "no GitOps tracking label: {labels}"
    );
    assert!(created["metadata"]["annotations"]
        .get("kubectl.kubernetes.io/last-applied-configuration")
        .is_none());

    // The primary's pods are not ready yet: traffic stays on the target.
    for _ in 0..3 {
        let d = world.step(Canary::Healthy);
        assert_eq!(d.canary_weight, Some(100));
        assert_eq!(d.status.phase, WorkloadPhase::Initializing);
        assert!(!d
            .actions
            .iter()
            .any(|a| matches!(a, Action::ScaleTarget(_))));
    }
    world.primary_ready = true;
    world.kubelet();
    let moved = world.step(Canary::Healthy);
    assert_eq!(moved.canary_weight, Some(0), "{:?}", moved.status);
    assert_eq!(moved.status.weights_held, None);
    // The target goes to 0 only scaleDownDelay (5 s) after the route is at stable 100.
    world.run_until(Canary::Healthy, 10, |w| {
        Deployment(w.target.as_ref().unwrap()).replicas() == 0
    });
    let scaled_at = world.now;
    assert!(scaled_at - moved.status.phase_since.unwrap().timestamp() + 1_700_000_000 >= 5);
    let done = world.step(Canary::Healthy);
    assert_eq!(done.status.phase, WorkloadPhase::Initialized);
    assert_eq!(done.status.stable_image.as_deref(), Some("app:v1"));
    assert_eq!(done.status.revision, done.status.stable_revision);
    assert_eq!(world.routed, 0);
    assert_eq!(world.count(|a| matches!(a, Action::CreatePrimary(_))), 1);
    assert_eq!(world.count(|a| matches!(a, Action::ScaleTarget(_))), 1);
    // At rest nothing more happens.
    world.log.clear();
    for _ in 0..5 {
        let d = world.step(Canary::Healthy);
        assert!(d.actions.is_empty(), "{:?}", d.actions);
        assert_eq!(d.canary_weight, Some(0));
        assert!(!d.analysis);
    }
}

#[test]
fn adopting_an_app_with_no_pods_yet_keeps_the_weights_as_git_says() {
    let mut world = World::new(spec(), deployment("app", "app:v1", 1));
    world.target_ready = false;
    world.primary_ready = false;
    let d = world.step(Canary::Healthy);
    assert_eq!(
        d.canary_weight,
        Some(0),
        "neither subset has pods: nothing to move to"
    );
    world.primary_ready = true;
    world.target_ready = true;
    let world = world.adopted();
    assert_eq!(world.status.phase, WorkloadPhase::Initialized);
}

#[test]
fn the_revision_is_the_pod_template_hash_and_replicas_are_not_revisions() {
    let target = deployment("app", "app:v1", 2);
    let revision = target_revision(&target);
    assert_eq!(revision.len(), 16);
    let mut scaled = target.clone();
    scaled["spec"]["replicas"] = json!(7);
    scaled["metadata"]["labels"]["team"] = json!("x");
    assert_eq!(target_revision(&scaled), revision);
    // Key order and explicit nulls do not matter.
    let mut reordered = target.clone();
    reordered["spec"]["template"] = serde_json::from_str(
        r#"{"spec": {"containers": [{"image": "app:v1", "name": "app"}]}, "metadata": {"labels": {"fledge.dev/track": "canary", "app": "app"}, "creationTimestamp": null}}"#,
    )
    .unwrap();
    assert_eq!(target_revision(&reordered), revision);
    let mut changed = target.clone();
    changed["spec"]["template"]["spec"]["containers"][0]["image"] = json!("app:v2");
    assert_ne!(target_revision(&changed), revision);
    // The primary's revision is read back in the target's terms.
    let primary = primary_object(&target, TRACK, 2, &owner());
    assert_eq!(primary_revision(&primary, TRACK), revision);
    assert_eq!(images(&changed), "app:v2");

    // Scaling the target or changing its HPA at rest starts nothing.
    let mut world = World::serving(2).adopted();
    world.target.as_mut().unwrap()["spec"]["replicas"] = json!(3);
    world.kubelet();
    world.run_until(Canary::Healthy, 10, |w| World::replicas_of(&w.target) == 0);
    assert_eq!(world.status.phase, WorkloadPhase::Initialized);
    assert_eq!(world.events(reason::NEW_REVISION), 0);
}

#[test]
fn a_healthy_revision_is_scaled_up_analysed_copied_into_the_primary_and_the_target_retired() {
    let mut world = World::serving(3).adopted();
    let primary_generation = world.primary.as_ref().unwrap()["metadata"]["generation"].clone();
    world.set_image("app:v2");
    let d = world.step(Canary::Healthy);
    assert_eq!(d.status.phase, WorkloadPhase::ScalingUp);
    assert_eq!(
        d.actions
            .iter()
            .filter(|a| matches!(a, Action::ScaleTarget(3)))
            .count(),
        1,
        "{:?}",
        d.actions
    );
    assert_eq!(d.status.image.as_deref(), Some("app:v2"));
    assert_eq!(d.canary_weight, Some(0));
    let restarted = d.rollout.expect("the rollout restarts");
    assert_eq!(restarted.phase, Phase::Initializing);
    assert!(restarted
        .history
        .last()
        .unwrap()
        .reason
        .contains("new revision"));

    world.run_until(Canary::Healthy, 5, |w| {
        w.status.phase == WorkloadPhase::Progressing
    });
    assert_eq!(
        world.primary.as_ref().unwrap()["metadata"]["generation"],
        primary_generation,
        "the primary is untouched during the analysis"
    );
    let mut weights = Vec::new();
    while world.status.phase == WorkloadPhase::Progressing {
        world.step(Canary::Healthy);
        weights.push(world.routed);
        assert!(weights.len() < 50);
    }
    assert!(
        weights.contains(&20) && weights.contains(&50),
        "{weights:?}"
    );
    assert_eq!(world.rollout.phase, Phase::Promoted);
    assert_eq!(world.status.phase, WorkloadPhase::Promoting);
    // The copy: the new template with the track label rewritten, the primary's selector kept.
    let primary = world.primary.clone().unwrap();
    assert_eq!(World::image_of(&world.primary), "app:v2");
    assert_eq!(
        primary["spec"]["template"]["metadata"]["labels"][TRACK],
        "stable"
    );
    assert_eq!(primary["spec"]["selector"]["matchLabels"][TRACK], "stable");
    world.run_until(Canary::Healthy, 20, |w| {
        w.status.phase == WorkloadPhase::Succeeded
    });
    assert_eq!(World::replicas_of(&world.target), 0);
    assert_eq!(world.routed, 0);
    assert_eq!(world.status.stable_image.as_deref(), Some("app:v2"));
    assert_eq!(world.status.revision, world.status.stable_revision);
    assert_eq!(world.count(|a| matches!(a, Action::PostRollout)), 1);
    assert_eq!(world.events(reason::SUCCEEDED), 1);
    assert_eq!(
        world.rollout.canary_weight, 0,
        "the history records the weights going back"
    );
    assert!(world
        .rollout
        .history
        .last()
        .unwrap()
        .reason
        .contains("promotion completed"));
    // The primary's template was written once.
    assert_eq!(
        world.primary.as_ref().unwrap()["metadata"]["generation"].as_i64(),
        primary_generation.as_i64().map(|g| g + 1)
    );
    world.log.clear();
    for _ in 0..5 {
        assert!(world.step(Canary::Healthy).actions.is_empty());
    }
}

#[test]
fn a_failing_revision_is_rolled_back_and_nothing_happens_until_the_template_changes() {
    let mut world = World::serving(2).adopted();
    let primary = world.primary.clone();
    world.set_image("app:v2-bad");
    world.run_until(Canary::Failing, 30, |w| {
        w.status.phase == WorkloadPhase::Failed
    });
    assert_eq!(world.primary, primary, "the primary is untouched");
    assert_eq!(World::replicas_of(&world.target), 0);
    assert_eq!(world.routed, 0);
    let failure = world.status.failure.clone().unwrap();
    assert!(failure.contains("success rate"), "{failure}");
    assert_eq!(world.status.image.as_deref(), Some("app:v2-bad"));
    assert!(
        world.status.message.contains("rolled back"),
        "{}",
        world.status.message
    );
    assert_eq!(world.count(|a| matches!(a, Action::PostRollout)), 1);
    world.log.clear();
    for _ in 0..10 {
        let d = world.step(Canary::Healthy);
        assert!(d.actions.is_empty(), "{:?}", d.actions);
        assert_eq!(d.status.phase, WorkloadPhase::Failed);
    }

    // `fledge retry` reruns the same revision.
    let mut retried = world.clone();
    retried.rollout = rollout::step(
        &retried.spec,
        &retried.rollout,
        &Input {
            observation: None,
            command: Some(rollout::Command::Retry),
        },
        t(retried.now),
    )
    .status;
    retried.retry = true;
    let d = retried.step(Canary::Healthy);
    retried.retry = false;
    assert_eq!(d.status.phase, WorkloadPhase::ScalingUp);
    assert!(d.actions.contains(&Action::ScaleTarget(2)));
    retried.run_until(Canary::Healthy, 40, |w| {
        w.status.phase == WorkloadPhase::Succeeded
    });
    assert_eq!(World::image_of(&retried.primary), "app:v2-bad");

    // A revert in Git is a new revision: the template the primary runs, nothing to roll out.
    world.set_image("app:v1");
    let d = world.step(Canary::Healthy);
    assert_eq!(d.status.phase, WorkloadPhase::Initialized);
    assert_eq!(d.status.failure, None);
    assert!(!d
        .actions
        .iter()
        .any(|a| matches!(a, Action::ScaleTarget(_))));
    assert!(d.status.message.contains("nothing to roll out"));
}

#[test]
fn a_new_revision_mid_rollout_sends_traffic_to_stable_and_restarts_the_analysis() {
    let mut world = World::serving(2).adopted();
    world.set_image("app:v2");
    world.run_until(Canary::Healthy, 10, |w| w.routed == 20);
    let analysed = world.analysis_runs;
    world.set_image("app:v3");
    let d = world.step(Canary::Healthy);
    assert_eq!(
        d.canary_weight,
        Some(0),
        "all traffic back on stable at once"
    );
    assert_eq!(d.status.phase, WorkloadPhase::ScalingUp);
    assert_eq!(d.status.image.as_deref(), Some("app:v3"));
    let rollout = d.rollout.unwrap();
    assert_eq!(
        (rollout.phase, rollout.step, rollout.canary_weight),
        (Phase::Initializing, 0, 0)
    );
    assert!(
        rollout.history.iter().any(|h| h.canary_weight == 20),
        "history kept"
    );
    world.run_until(Canary::Healthy, 40, |w| {
        w.status.phase == WorkloadPhase::Succeeded
    });
    assert!(world.analysis_runs > analysed + 2);
    assert_eq!(World::image_of(&world.primary), "app:v3");
    assert_eq!(world.events(reason::NEW_REVISION), 2, "v2, then v3");
    assert_eq!(world.events(reason::SUCCEEDED), 1, "v2 was never promoted");
}

#[test]
fn a_revision_that_never_becomes_ready_is_rolled_back_at_the_progress_deadline() {
    let mut world = World::serving(2).adopted();
    world.target_ready = false;
    world.set_image("app:v2-never-ready");
    world.run_until(Canary::Healthy, 80, |w| {
        w.status.phase == WorkloadPhase::Failed
    });
    let failure = world.status.failure.clone().unwrap();
    assert!(
        failure.starts_with("progress deadline exceeded: the target app did not become available"),
        "{failure}"
    );
    assert!(
        failure.contains("0 of 2 updated replicas available"),
        "{failure}"
    );
    assert_eq!(world.rollout.phase, Phase::RolledBack);
    assert!(world.rollout.message.contains("progress deadline"));
    assert_eq!(world.routed, 0);
    assert_eq!(World::replicas_of(&world.target), 0);
    assert_eq!(world.analysis_runs, 0, "nothing was analysed");
    assert_eq!(world.events(reason::DEADLINE), 1);
}

#[test]
fn a_rollout_halted_longer_than_the_deadline_is_rolled_back_with_that_reason() {
    let mut world = World::serving(2).adopted();
    world.set_image("app:v2");
    world.run_until(Canary::Idle, 80, |w| {
        w.status.phase == WorkloadPhase::Failed
    });
    let failure = world.status.failure.clone().unwrap();
    assert!(failure.contains("Halted for longer than 1m"), "{failure}");
    assert!(
        failure.contains("no data") || failure.contains("requests"),
        "{failure}"
    );
}

#[test]
fn confirm_rollout_gates_the_scale_up() {
    let mut spec = spec();
    spec.webhooks =
        serde_yaml::from_str("[{name: gate, type: confirm-rollout, url: http://t/gate}]").unwrap();
    let mut world = World::new(spec, deployment("app", "app:v1", 2));
    world.kubelet();
    let mut world = world.adopted();
    world.set_image("app:v2");
    world.confirmed = Some(Err("answered 403 Forbidden".into()));
    for _ in 0..5 {
        let d = world.step(Canary::Healthy);
        assert_eq!(d.status.phase, WorkloadPhase::Waiting);
        assert!(!d
            .actions
            .iter()
            .any(|a| matches!(a, Action::ScaleTarget(_))));
    }
    assert!(
        world.status.message.contains("403"),
        "{}",
        world.status.message
    );
    world.confirmed = Some(Ok(()));
    let d = world.step(Canary::Healthy);
    assert_eq!(d.status.phase, WorkloadPhase::ScalingUp);
    assert!(d.actions.contains(&Action::ScaleTarget(2)));
}

#[test]
fn the_primary_gets_a_copy_of_the_hpa_and_hpa_changes_are_not_revisions() {
    let mut spec = spec();
    spec.autoscaler_ref = Some(AutoscalerRef::named("app"));
    let mut world = World::new(spec, deployment("app", "app:v1", 1));
    world.autoscaler = Some(json!({
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "app", "namespace": "shop"},
        "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "app"},
                 "minReplicas": 2, "maxReplicas": 4}
    }));
    world.kubelet();
    let mut world = world.adopted();
    assert_eq!(World::replicas_of(&world.primary), 2, "the HPA's minimum");
    let hpa = world.primary_autoscaler.clone().unwrap();
    assert_eq!(hpa["metadata"]["name"], "app-primary");
    assert_eq!(hpa["spec"]["scaleTargetRef"]["name"], "app-primary");
    assert_eq!(hpa["metadata"]["ownerReferences"][0]["uid"], "uid-canary");
    // The primary's HPA scales it to 4; a new revision scales the target to 4 too (≤ max).
    world.primary.as_mut().unwrap()["spec"]["replicas"] = json!(4);
    world.kubelet();
    world.autoscaler.as_mut().unwrap()["spec"]["maxReplicas"] = json!(6);
    let d = world.step(Canary::Healthy);
    assert!(
        matches!(&d.actions[..], [Action::ApplyPrimaryAutoscaler(h)] if h["spec"]["maxReplicas"] == 6),
        "{:?}",
        d.actions
    );
    assert_eq!(
        d.status.phase,
        WorkloadPhase::Initialized,
        "an HPA change is not a revision"
    );
    world.set_image("app:v2");
    let d = world.step(Canary::Healthy);
    assert!(d.actions.contains(&Action::ScaleTarget(4)));
    world.run_until(Canary::Healthy, 40, |w| {
        w.status.phase == WorkloadPhase::Succeeded
    });
    assert_eq!(
        World::replicas_of(&world.primary),
        4,
        "the copy leaves the HPA's replicas alone"
    );
    // autoscalerRef removed: the copy goes.
    world.spec.autoscaler_ref = None;
    let d = world.step(Canary::Healthy);
    assert_eq!(
        d.actions,
        vec![Action::DeletePrimaryAutoscaler("app-primary".into())]
    );
}

#[test]
fn canary_pods_failing_mid_rollout_hold_the_weights_on_stable_and_say_so() {
    let mut world = World::serving(2).adopted();
    world.set_image("app:v2");
    world.run_until(Canary::Healthy, 10, |w| w.routed == 20);
    // Every canary pod crashes.
    world.target.as_mut().unwrap()["status"]["availableReplicas"] = json!(0);
    world.target_ready = false;
    let d = world.step(Canary::Healthy);
    assert_eq!(d.canary_weight, Some(0));
    assert!(
        world.rollout.canary_weight >= 20,
        "the rollout still wants traffic on the canary"
    );
    assert!(d
        .status
        .weights_held
        .as_deref()
        .unwrap()
        .contains("canary subset (app) has no available pods"));
    assert_eq!(world.events(reason::WEIGHTS_HELD), 1);
}

/// The controller dies at every point of a promotion, either after the actions that followed
/// a status write or between the write and its actions; a new one continues from the status
/// (read back from JSON) and the objects: the copy and the scale-down happen once, the
/// post-rollout hook is called once.
#[test]
fn a_new_leader_finishes_a_promotion_exactly_once_wherever_the_last_one_stopped() {
    let mut base = World::serving(2).adopted();
    base.set_image("app:v2");
    base.run_until(Canary::Healthy, 20, |w| w.rollout.phase == Phase::Promoted);
    let mut crash_points = 0;
    loop {
        let mut lost_actions = base.clone();
        lost_actions.drop_actions = true;
        lost_actions.step(Canary::Healthy);
        lost_actions.drop_actions = false;
        lost_actions.log.clear();
        for mut world in [base.clone(), lost_actions] {
            world.status =
                serde_json::from_str(&serde_json::to_string(&world.status).unwrap()).unwrap();
            world.rollout =
                serde_json::from_str(&serde_json::to_string(&world.rollout).unwrap()).unwrap();
            let generation = world.primary.as_ref().unwrap()["metadata"]["generation"].as_i64();
            world.run_until(Canary::Healthy, 30, |w| {
                w.status.phase == WorkloadPhase::Succeeded
            });
            let copies = world.count(|a| matches!(a, Action::UpdatePrimary(_)));
            assert!(copies <= 1, "copies {copies}");
            let copied_generation =
                world.primary.as_ref().unwrap()["metadata"]["generation"].as_i64();
            assert!(
                copied_generation <= generation.map(|g| g + 1),
                "the template is written once"
            );
            assert_eq!(World::image_of(&world.primary), "app:v2");
            assert_eq!(World::replicas_of(&world.target), 0);
            assert_eq!(world.routed, 0);
            assert!(
                world.count(|a| matches!(a, Action::PostRollout)) <= 1,
                "post-rollout once"
            );
            assert!(world.events(reason::SUCCEEDED) <= 1);
        }
        if base.status.phase == WorkloadPhase::Succeeded {
            break;
        }
        base.log.clear();
        base.step(Canary::Healthy);
        crash_points += 1;
        assert!(crash_points < 30);
    }
    assert!(crash_points >= 3, "crashed at {crash_points} points");
    // Specifically: killed after the copy and before the scale-down (Finalising, target up).
    let mut world = World::serving(2).adopted();
    world.set_image("app:v2");
    world.run_until(Canary::Healthy, 30, |w| {
        w.status.phase == WorkloadPhase::Finalising
    });
    assert_eq!(World::replicas_of(&world.target), 2);
    let generation = world.primary.as_ref().unwrap()["metadata"]["generation"].clone();
    world.log.clear();
    world.run_until(Canary::Healthy, 30, |w| {
        w.status.phase == WorkloadPhase::Succeeded
    });
    assert_eq!(
        world.count(|a| matches!(a, Action::UpdatePrimary(_))),
        0,
        "no second copy"
    );
    assert_eq!(
        world.primary.as_ref().unwrap()["metadata"]["generation"],
        generation
    );
    assert_eq!(world.count(|a| matches!(a, Action::ScaleTarget(0))), 1);
}

#[test]
fn the_target_is_scaled_down_only_once_the_route_is_at_stable() {
    let mut world = World::serving(2).adopted();
    world.set_image("app:v2");
    world.run_until(Canary::Failing, 30, |w| {
        w.status.phase == WorkloadPhase::RollingBack
    });
    // The router cannot write the route (e.g. an API outage): the route stays at 20%.
    for _ in 0..10 {
        world.routed = 20;
        let d = step(
            &world.spec,
            &world.status,
            &world.rollout,
            &world.facts(),
            t(world.now + 100),
        );
        assert!(
            !d.actions
                .iter()
                .any(|a| matches!(a, Action::ScaleTarget(0))),
            "{:?}",
            d.actions
        );
        assert_eq!(d.canary_weight, Some(0));
        world.now += 1;
    }
}

#[test]
fn a_newer_revision_during_the_promotion_is_not_given_traffic_and_gets_a_rollout_of_its_own() {
    let mut world = World::serving(2).adopted();
    world.set_image("app:v2");
    // Up to the call that decides to promote v2.
    loop {
        let mut next = world.clone();
        next.step(Canary::Healthy);
        if next.rollout.phase == Phase::Promoted {
            break;
        }
        world = next;
        assert!(world.now < 100);
    }
    // v3 arrives after the decision to promote v2 was persisted but before the copy was
    // written (the controller died in between).
    let mut early = world.clone();
    early.drop_actions = true;
    early.step(Canary::Healthy);
    assert_eq!(early.status.phase, WorkloadPhase::Promoting);
    early.drop_actions = false;
    let before = early.primary.clone();
    early.set_image("app:v3");
    let d = early.step(Canary::Healthy);
    assert_eq!(
        d.status.phase,
        WorkloadPhase::ScalingUp,
        "{:?}",
        d.status.message
    );
    assert_eq!(d.canary_weight, Some(0));
    assert_eq!(
        early.primary, before,
        "v2's template is gone: the primary keeps the stable version"
    );
    assert_eq!(World::image_of(&early.primary), "app:v1");
    // v3 arrives after the copy: the promotion of v2 completes, then v3 is rolled out.
    world.run_until(Canary::Healthy, 5, |w| {
        World::image_of(&w.primary) == "app:v2"
    });
    world.set_image("app:v3");
    let d = world.step(Canary::Healthy);
    assert_eq!(d.canary_weight, Some(0), "v3's pods get no traffic");
    world.run_until(Canary::Healthy, 60, |w| {
        w.status.phase == WorkloadPhase::Succeeded
            && w.status.stable_image.as_deref() == Some("app:v3")
    });
    // v2's promotion completed first (and at once the next rollout began).
    let succeeded: Vec<String> = world
        .log
        .iter()
        .filter_map(|a| match a {
            Action::Event {
                reason: reason::SUCCEEDED,
                message,
                ..
            } => Some(message.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(succeeded.len(), 2, "{succeeded:?}");
    assert!(
        succeeded[0].contains("app:v2") && succeeded[1].contains("app:v3"),
        "{succeeded:?}"
    );
    assert_eq!(world.count(|a| matches!(a, Action::PostRollout)), 2);
}

fn problems_of(world: &World) -> Vec<String> {
    world.problems.iter().map(|p| p.field.clone()).collect()
}

#[test]
fn bad_input_names_the_field_and_the_fix_and_nothing_is_scaled_or_routed() {
    type BreakIt = Box<dyn Fn(&mut World)>;
    let cases: Vec<(&str, BreakIt, &str)> = vec![
        (
            "missing target",
            Box::new(|w| w.target = None),
            "spec.targetRef.name",
        ),
        (
            "no track label",
            Box::new(|w| {
                let t = w.target.as_mut().unwrap();
                t["spec"]["template"]["metadata"]["labels"] = json!({"app": "app"});
            }),
            "deployments/app: spec.template.metadata.labels",
        ),
        (
            "selector the primary cannot copy",
            Box::new(|w| {
                let t = w.target.as_mut().unwrap();
                t["spec"]["selector"] = json!({"matchLabels": {"app": "app"}});
            }),
            "deployments/app: spec.selector",
        ),
        (
            "HPA for another workload",
            Box::new(|w| {
                w.spec.autoscaler_ref = Some(AutoscalerRef::named("other"));
                w.autoscaler = Some(json!({"metadata": {"name": "other"}, "spec": {
                    "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "checkout"}}}));
            }),
            "spec.autoscalerRef",
        ),
        (
            "missing HPA",
            Box::new(|w| w.spec.autoscaler_ref = Some(AutoscalerRef::named("app"))),
            "spec.autoscalerRef.name",
        ),
        (
            "a primary that is not ours",
            Box::new(|w| w.primary = Some(deployment("app-primary", "other:v1", 1))),
            "spec.targetRef.name",
        ),
    ];
    for (case, break_it, field) in cases {
        let mut world = World::serving(2);
        break_it(&mut world);
        let d = world.step(Canary::Healthy);
        assert_eq!(problems_of(&world), vec![field.to_string()], "{case}");
        let problem = &world.problems[0];
        assert!(
            !problem.fix.is_empty() && !problem.problem.is_empty(),
            "{case}"
        );
        assert!(
            d.actions.iter().all(|a| matches!(a, Action::Event { .. })),
            "{case}: {:?}",
            d.actions
        );
        assert_eq!(d.canary_weight, None, "{case}: nothing routed");
        assert!(!d.analysis);
    }
    let mut world = World::serving(2);
    world.target.as_mut().unwrap()["spec"]["template"]["metadata"]["labels"] =
        json!({"app": "app"});
    world.step(Canary::Healthy);
    let problem = world.problems[0].to_string();
    assert!(
        problem.contains("add `fledge.dev/track: canary`"),
        "{problem}"
    );

    // Subsets that do not select by the track label.
    let mut world = World::serving(2);
    let mut facts = world.facts();
    facts.subsets = Some((json!({"version": "v1"}), json!({TRACK: "canary"})));
    let d = step(&world.spec, &world.status, &world.rollout, &facts, t(1));
    assert_eq!(d.problems.len(), 1);
    assert!(
        d.problems[0].fix.contains("fledge.dev/track: stable"),
        "{}",
        d.problems[0]
    );
    world.status = d.status;

    // After adoption, bad input still keeps the traffic where pods are (and scales nothing).
    let mut world = World::serving(2).adopted();
    world.set_image("app:v2");
    world.run_until(Canary::Healthy, 10, |w| w.routed == 20);
    world.target.as_mut().unwrap()["spec"]["selector"] = json!({"matchLabels": {"app": "app"}});
    let d = world.step(Canary::Healthy);
    assert_eq!(d.canary_weight, Some(0));
    assert!(!d
        .actions
        .iter()
        .any(|a| matches!(a, Action::ScaleTarget(_))));
}

#[test]
fn deleting_the_canary_keeps_the_primary_serving_or_reverts_the_target() {
    let world = World::serving(2).adopted();
    let mut facts = world.facts();
    let c = on_deletion(&world.spec, &world.status, &facts, t(100));
    assert_eq!(c.canary_weight, Some(0));
    assert!(c.done);
    assert_eq!(
        c.actions,
        vec![Action::ReleaseOwned {
            deployment: "app-primary".into(),
            autoscaler: None
        }]
    );
    assert_eq!(c.status.phase, WorkloadPhase::Terminating);
    // Mid-rollout at 20%: all traffic to stable first.
    facts.routed = Some(20);
    let c = on_deletion(&world.spec, &world.status, &facts, t(100));
    assert!(!c.done && c.actions.is_empty());
    assert_eq!(c.canary_weight, Some(0));

    // revertOnDeletion: the primary's template back into the target, scaled up, all traffic.
    let mut world = World::serving(2).adopted();
    world.spec.revert_on_deletion = true;
    world.set_image("app:v2-bad"); // Git holds a revision that was rolled back, say
    let mut status = world.status.clone();
    let mut done = false;
    for i in 0..30 {
        let c = on_deletion(&world.spec, &status, &world.facts(), t(200 + i));
        status = c.status;
        for action in &c.actions {
            world.perform(action);
        }
        world.routed = c.canary_weight.unwrap();
        world.kubelet();
        if c.done {
            done = true;
            break;
        }
    }
    assert!(done);
    assert_eq!(World::image_of(&world.target), "app:v1");
    let template = &world.target.as_ref().unwrap()["spec"]["template"];
    assert_eq!(template["metadata"]["labels"][TRACK], "canary");
    assert_eq!(World::replicas_of(&world.target), 2);
    assert_eq!(world.routed, 100);
}

#[test]
fn without_a_target_the_lifecycle_does_nothing() {
    let mut spec = spec();
    spec.target_ref = None;
    let d = step(
        &spec,
        &WorkloadStatus::default(),
        &CanaryStatus::default(),
        &Facts::default(),
        t(0),
    );
    assert_eq!(d.canary_weight, None);
    assert!(d.actions.is_empty() && d.problems.is_empty() && d.rollout.is_none());
}

mod spec_validation {
    use super::*;
    use crate::spec::Canary;

    fn fields(canary: &Canary) -> Vec<String> {
        match canary.validate() {
            Ok(()) => vec![],
            Err(errors) => errors.0.into_iter().map(|e| e.field).collect(),
        }
    }

    fn kubernetes_canary(extra: &str) -> Canary {
        let yaml = format!(
            "
apiVersion: fledge.dev/v1alpha1
kind: Canary
metadata: {{name: app, namespace: shop}}
spec:
  service: app
  stable: {{subset: stable}}
  canary: {{subset: canary}}
  metricsSource: {{envoyAdmin: {{urls: [\"http://127.0.0.1:15000\"]}}}}
  router: {{istio: {{virtualService: app, route: primary}}}}
  analysis: {{interval: 30s, stepWeights: [10, 50], compareWithStable: {{}}}}
{extra}"
        );
        serde_yaml::from_str(&yaml).unwrap()
    }

    #[test]
    fn target_ref_with_defaults_is_valid() {
        let canary = kubernetes_canary(
            "  targetRef: {name: podinfo}\n  autoscalerRef: {name: podinfo}\n  revertOnDeletion: true\n",
        );
        assert_eq!(canary.validate(), Ok(()));
        let spec = &canary.spec;
        let target = spec.target_ref.as_ref().unwrap();
        assert_eq!(
            (target.api_version.as_str(), target.kind.as_str()),
            ("apps/v1", "Deployment")
        );
        assert_eq!(target.primary_name(), "podinfo-primary");
        assert_eq!(
            spec.autoscaler_ref.as_ref().unwrap().api_version,
            "autoscaling/v2"
        );
        assert_eq!(spec.track_label(), "fledge.dev/track");
        assert_eq!(spec.progress_deadline(), HumanDuration::from_secs(600));
        assert_eq!(spec.scale_down_delay(), HumanDuration::from_secs(30));
        // Flagger's spelling of the reference parses as is.
        let flagger = kubernetes_canary(
            "  targetRef: {apiVersion: apps/v1, kind: Deployment, name: podinfo}\n",
        );
        assert_eq!(flagger.validate(), Ok(()));
    }

    #[test]
    fn workload_fields_without_a_target_are_errors_not_silent_no_ops() {
        let canary = kubernetes_canary(
            "  autoscalerRef: {name: app}\n  progressDeadline: 5m\n  trackLabel: track\n  scaleDownDelay: 1s\n  revertOnDeletion: true\n  webhooks: [{name: gate, type: confirm-rollout, url: http://t/gate}]\n",
        );
        assert_eq!(
            fields(&canary),
            [
                "spec.autoscalerRef",
                "spec.progressDeadline",
                "spec.trackLabel",
                "spec.scaleDownDelay",
                "spec.revertOnDeletion",
                "spec.webhooks[0].type"
            ]
        );
        let errors = canary.validate().unwrap_err().to_string();
        assert!(
            errors.contains("has no effect without spec.targetRef"),
            "{errors}"
        );
    }

    #[test]
    fn bad_workload_fields_are_named_with_a_fix() {
        let canary = kubernetes_canary(
            "  targetRef: {apiVersion: apps/v1beta1, kind: StatefulSet, name: App_1}\n  autoscalerRef: {apiVersion: autoscaling/v2beta1, kind: HPA, name: x}\n  trackLabel: \"bad key!\"\n  progressDeadline: 10s\n  scaleDownDelay: 2h\n",
        );
        assert_eq!(
            fields(&canary),
            [
                "spec.targetRef.apiVersion",
                "spec.targetRef.kind",
                "spec.targetRef.name",
                "spec.autoscalerRef.apiVersion",
                "spec.autoscalerRef.kind",
                "spec.trackLabel",
                "spec.progressDeadline",
                "spec.scaleDownDelay"
            ]
        );
        let primary_suffix = kubernetes_canary("  targetRef: {name: app-primary}\n");
        assert_eq!(fields(&primary_suffix), ["spec.targetRef.name"]);
        // Standalone (`fledge run`) is traffic-only.
        let mut standalone = example();
        standalone.spec.target_ref = Some(TargetRef::deployment("app"));
        assert_eq!(fields(&standalone), ["spec.targetRef"]);
        let two_services = kubernetes_canary("  targetRef: {name: app}\n");
        let mut two_services = two_services;
        let istio = two_services.spec.router.istio.as_mut().unwrap();
        istio.stable_host = Some("a".into());
        istio.canary_host = Some("b".into());
        assert_eq!(fields(&two_services), ["spec.router.istio.stableHost"]);
    }

    #[test]
    fn label_keys() {
        for good in ["fledge.dev/track", "track", "a.b-c/x_y.z", "x"] {
            assert!(is_label_key(good), "{good}");
        }
        for bad in [
            "",
            "/x",
            "x/",
            "-x",
            "x-",
            "UPPER.dev/x",
            "a/b/c",
            "bad key",
        ] {
            assert!(!is_label_key(bad), "{bad}");
        }
    }
}
