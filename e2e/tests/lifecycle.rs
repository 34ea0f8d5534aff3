//! Automatic in-mesh promotion end to end (`spec.targetRef`), on real processes: the real
//! `fledge controller` binary over HTTP against the fake API server, the kubelet stand-in
//! running each Deployment's pods as real backends, the istiod stand-in routing each
//! DestinationRule subset to the pods whose labels match, in a real Envoy with the Fledge
//! filter whose metrics the controller reads (see `fledge_e2e::workload`). Nothing is done by
//! hand between a change "in Git" (an API write, as Argo CD or Flux would make it) and the end
//! of the release.
//!
//! The flows of the seed articles: Flagger's primary/canary with an HPA, analysis, promotion by
//! copying into `-primary` and the canary scaled to zero (`a_healthy_revision_...`, seed 003);
//! Gloo's two-phase rollout — testers by header first, then weights — with v1 retired at the
//! end (`testers_first_then_weights_...`, seed 004).

use anyhow::{bail, ensure, Context, Result};
use fledge_e2e::kubernetes::{require, KubeController};
use fledge_e2e::workload::{deployment, routing_and_canary, template, StackOptions, WorkloadStack};
use fledge_e2e::{
    browser, init_tracing, paths, LoadGen, LoadOptions, LoadReport, RouteWeights, ScratchDir,
};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const NS: &str = "shop";
const CANARY: &str = "/apis/fledge.dev/v1alpha1/namespaces/shop/canaries/app";
const TARGET: &str = "/apis/apps/v1/namespaces/shop/deployments/app";
const PRIMARY: &str = "/apis/apps/v1/namespaces/shop/deployments/app-primary";
const VS: &str = "/apis/networking.istio.io/v1/namespaces/shop/virtualservices/app";
const STEP: Duration = Duration::from_secs(60);
/// The spec pasted into the dashboard's simulator page (any valid spec will do).
const SIMULATED_SPEC: &str = "apiVersion: fledge.dev/v1alpha1
kind: Canary
metadata: {name: app, namespace: shop}
spec:
  service: app
  stable: {subset: stable}
  canary: {subset: canary}
  metricsSource: {prometheus: {address: \"http://prometheus:9090\"}}
  router: {istio: {virtualService: app, route: primary}}
  analysis: {interval: 30s, stepWeights: [10, 30, 60], compareWithStable: {}}
";

/// The analysis of every test unless it says otherwise: 1 s intervals, two steps.
fn analysis() -> Value {
    json!({
        "interval": "1s",
        "threshold": 2,
        "minCanaryRequests": 5,
        "stepWeights": [20, 50],
        "metrics": [{"name": "request-success-rate", "thresholdRange": {"min": 99}}]
    })
}

/// A running release: the stack, a controller, a load.
struct Release {
    // Field order: the load and controller stop before the stack.
    load: Option<LoadGen>,
    controller: KubeController,
    stack: WorkloadStack,
    dir: ScratchDir,
}

impl Release {
    /// Deployment `app` (2 replicas of `app:v1`), routing and a Canary (`analysis`, `extra`
    /// spec fields), the stack, then the controller.
    fn start(name: &str, analysis: Value, extra: Value, options: StackOptions) -> Result<Release> {
        init_tracing();
        let dir = ScratchDir::temp(name)?;
        let stack = WorkloadStack::start_with(dir.path(), NS, options, |admin| {
            let mut objects = vec![deployment(NS, "app", "app:v1", 2, &[])];
            objects.extend(routing_and_canary(NS, admin, analysis, extra));
            objects
        })?;
        let controller = KubeController::start_with(
            &stack.cluster,
            "fledge-e2e-0",
            &dir.path().join("controller-0.log"),
            &["--lease-duration", "3s"],
        )?;
        Ok(Release {
            load: None,
            controller,
            stack,
            dir,
        })
    }

    fn status(&self) -> Result<Value> {
        Ok(self.stack.cluster.get(CANARY)?["status"].clone())
    }

    fn workload(&self) -> Result<Value> {
        Ok(self.status()?["workload"].clone())
    }

    fn wait_for(&self, phase: &str) -> Result<Value> {
        require(&format!("workload phase {phase}"), STEP, || {
            Ok(self.workload()?["phase"] == phase)
        })
        .with_context(|| format!("status: {:#}", self.status().unwrap_or_default()))?;
        self.status()
    }

    /// Steady load on the gateway (80 requests per second).
    fn start_load(&mut self) -> Result<()> {
        self.start_load_with(LoadOptions::new(80, Duration::from_secs(240)))
    }

    /// Start the load once the gateway answers 2xx (ten in a row), so every request of the
    /// load is one the release must not lose.
    fn start_load_with(&mut self, options: LoadOptions) -> Result<()> {
        let url = self.stack.envoy.listener_url();
        require("the gateway serving", STEP, || {
            Ok((0..10).all(|_| {
                matches!(
                    fledge_e2e::http::get(&url, Duration::from_secs(2)),
                    Ok((200, _))
                )
            }))
        })?;
        self.load = Some(LoadGen::start(&url, options)?);
        Ok(())
    }

    fn snapshot(&self) -> LoadReport {
        self.load
            .as_ref()
            .map(LoadGen::snapshot)
            .unwrap_or_default()
    }

    /// What the load saw during the next `seconds`.
    fn window(&self, seconds: u64) -> LoadReport {
        let before = self.snapshot();
        std::thread::sleep(Duration::from_secs(seconds));
        self.snapshot().since(&before)
    }

    /// Every response so far was a 2xx (and every request got a response).
    fn only_2xx(&self) -> Result<()> {
        let report = self.snapshot();
        let ok: u64 = report
            .by_status
            .iter()
            .filter(|(code, _)| (200..300).contains(*code))
            .map(|(_, n)| n)
            .sum();
        ensure!(
            report.responses() > 100 && ok == report.responses() && report.connection_errors == 0,
            "the clients saw more than 2xx: {}",
            report.summary()
        );
        Ok(())
    }

    /// A new pod template for `app`, applied through the API as a GitOps tool would apply the
    /// changed manifest.
    fn apply(&self, image: &str, env: &[(&str, &str)]) -> Result<()> {
        self.stack
            .cluster
            .patch(TARGET, &json!({"spec": {"template": template(image, env)}}))
    }

    fn deployment(&self, path: &str) -> Result<Value> {
        self.stack.cluster.get(path)
    }

    /// Requests served per pod during `seconds` (pods' own counters).
    fn served_during(&self, seconds: u64) -> BTreeMap<String, u64> {
        let before = self.stack.kubelet.served();
        std::thread::sleep(Duration::from_secs(seconds));
        let after = self.stack.kubelet.served();
        after
            .into_iter()
            .map(|(pod, n)| {
                let delta = n.saturating_sub(before.get(&pod).copied().unwrap_or(0));
                (pod, delta)
            })
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    fn weights(&self) -> Result<RouteWeights> {
        self.stack.cluster.route_weights(NS, "app", "primary")
    }

    /// The target has 0 replicas and none of its pods is left.
    fn target_retired(&self) -> Result<()> {
        require("the target's pods gone", Duration::from_secs(15), || {
            Ok(self.deployment(TARGET)?["spec"]["replicas"] == 0
                && self
                    .stack
                    .kubelet
                    .pods()
                    .iter()
                    .all(|p| p.deployment != "app"))
        })
    }

    /// Only the primary's pods, running `version`, serve: checked on the pods and on the load.
    fn only_primary_serves(&self, version: &str) -> Result<()> {
        let served = self.served_during(2);
        ensure!(
            !served.is_empty() && served.keys().all(|pod| pod.starts_with("app-primary-")),
            "requests reached pods other than the primary's: {served:?}"
        );
        let seen = self.window(2);
        ensure!(
            seen.version_share(version) == 1.0,
            "not only {version}: {}",
            seen.summary()
        );
        Ok(())
    }

    /// `fledge status --kubernetes` and the controller's dashboard (in headless chromium) show
    /// the workload: its phase, the revision's image, the primary and target replicas.
    fn shows_the_workload(&self, phase: &str, image: &str) -> Result<()> {
        let kubeconfig = self.stack.cluster.kubeconfig().to_path_buf();
        let (code, out, err) = browser::run_bounded_with_env(
            &paths::fledge_binary()?,
            &["status", "app", "--kubernetes", "-n", NS],
            &[("KUBECONFIG", kubeconfig.as_path())],
            Duration::from_secs(30),
        )?;
        ensure!(code == 0, "fledge status exit {code}: {out}{err}");
        let primary = "primary 2/2   target 0/0";
        ensure!(
            out.contains(&format!("workload  {phase}   {primary}"))
                && out.contains(&format!("revision  {image}")),
            "fledge status:\n{out}"
        );
        let page = browser::drive_dashboard(
            &self.controller.base_url(),
            "shop/app",
            self.dir.path(),
            SIMULATED_SPEC,
            r#"{"requestsPerMinute": 300, "seed": 5}"#,
            "lifecycle",
        )?;
        let row = page["list"][0]["text"].as_str().unwrap_or_default();
        ensure!(
            row.contains(&format!("workload {phase}"))
                && row.contains(image)
                && row.contains("primary 2/2 · target 0/0"),
            "dashboard row: {row:?}"
        );
        Ok(())
    }

    fn fail_with_logs(&self, error: anyhow::Error) -> anyhow::Error {
        error.context(format!(
            "controller log tail:\n{}\nload: {}\nscratch: {}",
            self.controller.log_tail(40),
            self.snapshot().summary(),
            self.dir.path().display()
        ))
    }
}

/// Run `body` on a started release; attach the logs to a failure; stop the load.
fn run(release: &mut Release, body: impl FnOnce(&mut Release) -> Result<()>) -> Result<()> {
    let result = body(release).map_err(|e| release.fail_with_logs(e));
    if let Some(load) = release.load.take() {
        load.stop();
    }
    result
}

/// Case 1: Adoption. The Deployment serves live traffic, and Git's VirtualService already says
/// stable 100 / canary 0 although no primary pod exists yet. The gateway still serves the last
/// route istiod pushed before that sync (everything to the Deployment's pods); the stand-in
/// holds the sync's route until Fledge has acted, as a control plane that has not pushed it
/// yet. Fledge's first act is to send the traffic where the pods are; it then creates the
/// primary, moves the traffic to it once it serves, and retires the target. The clients see
/// only 2xx throughout.
#[test]
fn adoption_creates_the_primary_and_retires_the_target_with_only_2xx() -> Result<()> {
    let options = StackOptions {
        initial_weights: RouteWeights::ALL_CANARY,
        routes_held: true,
    };
    let mut release = Release::start(
        "lifecycle-adoption",
        analysis(),
        json!({"scaleDownDelay": "2s"}),
        options,
    )?;
    run(&mut release, |r| {
        require("the Deployment serving", STEP, || {
            Ok(r.stack.kubelet.serving("app").len() == 2)
        })?;
        r.start_load()?;
        // Fledge's first write to the route: all traffic to the pods that exist. Then the
        // control plane pushes.
        let first_route_write = || -> Result<Option<Value>> {
            Ok(r.stack.cluster.requests()?.into_iter().find(|q| {
                q["method"] == "PATCH"
                    && q["path"] == VS
                    && q["status"].as_u64().is_some_and(|s| s < 300)
            }))
        };
        require("Fledge's first route change", STEP, || {
            Ok(first_route_write()?.is_some())
        })?;
        r.stack.mesh.hold_routes(false);
        let first = first_route_write()?.unwrap_or_default();
        let sets_canary_100 = first["body"].as_array().into_iter().flatten().any(|op| {
            op["op"] == "add"
                && op["path"]
                    .as_str()
                    .is_some_and(|p| p.ends_with("/route/1/weight"))
                && op["value"] == 100
        });
        ensure!(
            sets_canary_100,
            "the first route change was not to canary 100: {first:#}"
        );
        let status = r.wait_for("Initialized")?;
        let primary = r.deployment(PRIMARY)?;
        ensure!(
            primary["metadata"]["ownerReferences"][0]["kind"] == "Canary"
                && primary["spec"]["template"]["metadata"]["labels"]["fledge.dev/track"]
                    == "stable",
            "{primary:#}"
        );
        ensure!(status["workload"]["stableImage"] == "app:v1", "{status:#}");
        ensure!(r.weights()? == RouteWeights::ALL_STABLE);
        r.target_retired()?;
        r.only_primary_serves("v1")?;
        r.only_2xx()
    })
}

fn hpa() -> Value {
    json!({
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "app", "namespace": NS},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "app"},
            "minReplicas": 2,
            "maxReplicas": 4,
            "metrics": [{"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 80}}}]
        }
    })
}

/// Case 2: Seed 003 (Flagger's primary/canary): a healthy revision applied through the API as Argo
/// CD would apply it is scaled up (as the HPA allows), analysed step by step (stepWeight /
/// maxWeight), copied into the primary, and the target goes back to 0. Afterwards Envoy serves
/// only primary pods running the new revision, the weights are stable 100 / canary 0 (what
/// Git holds) and `.status` says Succeeded.
#[test]
fn a_healthy_revision_is_promoted_into_the_primary_and_the_target_scaled_to_zero() -> Result<()> {
    let analysis = json!({
        "interval": "1s",
        "threshold": 2,
        "minCanaryRequests": 5,
        "stepWeight": 20,
        "maxWeight": 60,
        "metrics": [
            {"name": "request-success-rate", "thresholdRange": {"min": 99}},
            {"name": "request-duration", "thresholdRange": {"max": 500}}
        ]
    });
    let extra = json!({"autoscalerRef": {"name": "app"}, "scaleDownDelay": "1s"});
    let mut release = Release::start(
        "lifecycle-promotion",
        analysis,
        extra,
        StackOptions::default(),
    )?;
    run(&mut release, |r| {
        r.stack.cluster.post(
            "/apis/autoscaling/v2/namespaces/shop/horizontalpodautoscalers",
            &hpa(),
        )?;
        r.wait_for("Initialized")?;
        let hpa_copy = r
            .stack
            .cluster
            .get("/apis/autoscaling/v2/namespaces/shop/horizontalpodautoscalers/app-primary")?;
        ensure!(
            hpa_copy["spec"]["scaleTargetRef"]["name"] == "app-primary",
            "{hpa_copy:#}"
        );
        r.start_load()?;
        r.apply("app:v2", &[])?;
        let status = r.wait_for("Succeeded")?;
        let walked = fledge_e2e::controller::weights_walked(&status);
        for step in [20, 40, 60, 100] {
            ensure!(walked.contains(&step), "weights walked {walked:?}");
        }
        ensure!(
            status["phase"] == "Promoted" && status["canaryWeight"] == 0,
            "{status:#}"
        );
        ensure!(status["workload"]["stableImage"] == "app:v2", "{status:#}");
        ensure!(r.weights()? == RouteWeights::ALL_STABLE);
        let primary = r.deployment(PRIMARY)?;
        ensure!(primary["spec"]["template"]["spec"]["containers"][0]["image"] == "app:v2");
        r.target_retired()?;
        r.only_primary_serves("v2")?;
        r.shows_the_workload("Succeeded", "app:v2")?;
        r.only_2xx()
    })
}

/// Case 3: A failing revision (30% 5xx) is rolled back: the primary is untouched, the target goes
/// to 0, and afterwards no request reaches the bad pods.
#[test]
fn a_failing_revision_is_rolled_back_and_no_request_reaches_the_bad_pods() -> Result<()> {
    let mut release = Release::start(
        "lifecycle-rollback",
        analysis(),
        json!({"scaleDownDelay": "1s"}),
        StackOptions::default(),
    )?;
    run(&mut release, |r| {
        r.wait_for("Initialized")?;
        let primary = r.deployment(PRIMARY)?;
        r.start_load()?;
        r.apply("app:v2-bad", &[("ERROR_RATE", "0.3")])?;
        let status = r.wait_for("Failed")?;
        let failure = status["workload"]["failure"].as_str().unwrap_or_default();
        ensure!(failure.contains("success rate"), "{status:#}");
        ensure!(status["phase"] == "RolledBack");
        let now = r.deployment(PRIMARY)?;
        ensure!(
            now["spec"] == primary["spec"]
                && now["metadata"]["generation"] == primary["metadata"]["generation"],
            "the primary was touched"
        );
        ensure!(r.weights()? == RouteWeights::ALL_STABLE);
        r.target_retired()?;
        let seen = r.window(3);
        ensure!(
            seen.version_count("v2-bad") == 0
                && seen.server_errors() == 0
                && seen.responses() > 100,
            "{}",
            seen.summary()
        );
        r.only_primary_serves("v1")
    })
}

/// Case 4: A revision that never becomes ready is rolled back at `progressDeadline`, with that
/// reason; it never got traffic.
#[test]
fn a_revision_that_never_becomes_ready_is_rolled_back_at_the_progress_deadline() -> Result<()> {
    let extra = json!({"scaleDownDelay": "1s", "progressDeadline": "5s"});
    let mut release = Release::start(
        "lifecycle-deadline",
        analysis(),
        extra,
        StackOptions::default(),
    )?;
    run(&mut release, |r| {
        r.wait_for("Initialized")?;
        r.start_load()?;
        r.apply("app:v2-stuck", &[("NEVER_READY", "true")])?;
        let status = r.wait_for("Failed")?;
        let failure = status["workload"]["failure"].as_str().unwrap_or_default();
        ensure!(
            failure.starts_with(
                "progress deadline exceeded: the target app did not become available with revision"
            ),
            "{status:#}"
        );
        ensure!(
            fledge_e2e::controller::weights_walked(&status)
                .iter()
                .all(|w| *w == 0),
            "the never-ready revision got traffic: {status:#}"
        );
        r.target_retired()?;
        ensure!(r.snapshot().version_count("v2-stuck") == 0);
        r.only_2xx()
    })
}

/// Case 5: A new revision arriving mid-rollout first sends all traffic back to stable, then the
/// analysis starts again on it; the one it replaced is never promoted.
#[test]
fn a_new_revision_mid_rollout_restarts_the_analysis() -> Result<()> {
    let analysis = json!({
        "interval": "1s",
        "threshold": 2,
        "minCanaryRequests": 5,
        "stepWeights": [20, 40, 60],
        "metrics": [{"name": "request-success-rate", "thresholdRange": {"min": 99}}]
    });
    let mut release = Release::start(
        "lifecycle-new-revision",
        analysis,
        json!({"scaleDownDelay": "1s"}),
        StackOptions::default(),
    )?;
    run(&mut release, |r| {
        r.wait_for("Initialized")?;
        r.start_load()?;
        r.apply("app:v2", &[])?;
        require("v2 getting traffic", STEP, || {
            let w = r.workload()?;
            Ok(w["phase"] == "Progressing" && w["canaryWeight"].as_u64().unwrap_or(0) >= 20)
        })?;
        r.apply("app:v3", &[])?;
        require(
            "all traffic back on stable, v3 under test",
            Duration::from_secs(10),
            || {
                let w = r.workload()?;
                Ok(w["image"] == "app:v3" && r.weights()? == RouteWeights::ALL_STABLE)
            },
        )?;
        let status = r.wait_for("Succeeded")?;
        let history: Vec<&str> = status["history"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| t["reason"].as_str())
            .collect();
        let new_revisions = history
            .iter()
            .filter(|h| h.starts_with("new revision"))
            .count();
        ensure!(new_revisions == 2, "{history:#?}");
        let v3_start = history
            .iter()
            .rposition(|h| h.starts_with("new revision"))
            .unwrap_or(0);
        ensure!(
            history[v3_start..]
                .iter()
                .any(|h| h.contains("advance canary weight to 20%")),
            "the analysis started again from the first step: {history:#?}"
        );
        ensure!(status["workload"]["stableImage"] == "app:v3");
        let events = r
            .stack
            .cluster
            .get("/apis/events.k8s.io/v1/namespaces/shop/events")?;
        let promoted_v2 = events["items"].as_array().into_iter().flatten().any(|e| {
            e["reason"] == "Succeeded" && e["note"].as_str().is_some_and(|n| n.contains("app:v2"))
        });
        ensure!(!promoted_v2, "v2 was promoted");
        r.target_retired()?;
        r.only_primary_serves("v3")?;
        r.only_2xx()
    })
}

/// Counts the POSTs a webhook URL receives (by path); answers 200.
struct HookCounter {
    port: u16,
    calls: Arc<Mutex<BTreeMap<String, u32>>>,
}

impl HookCounter {
    fn start() -> Result<HookCounter> {
        let calls = Arc::new(Mutex::new(BTreeMap::new()));
        let log = calls.clone();
        let port = fledge_e2e::http::serve_hooks(move |path, _| {
            if let Ok(mut calls) = log.lock() {
                *calls.entry(path.to_string()).or_insert(0) += 1;
            }
            200
        })?;
        Ok(HookCounter { port, calls })
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn count(&self, path: &str) -> u32 {
        self.calls
            .lock()
            .map(|c| c.get(path).copied().unwrap_or(0))
            .unwrap_or(0)
    }
}

fn writes_to(requests: &[Value], method: &str, path: &str) -> usize {
    requests
        .iter()
        .filter(|r| {
            r["method"] == method
                && r["path"] == path
                && r["status"].as_u64().is_some_and(|s| s < 300)
        })
        .count()
}

/// Case 6: The controller is killed (SIGKILL) during a promotion, after the copy into the primary
/// and before the target's scale-down; the standby becomes leader and finishes the promotion
/// exactly once: one copy, one scale-down, one Succeeded, one post-rollout call.
#[test]
fn a_controller_killed_mid_promotion_is_succeeded_by_one_that_finishes_it_once() -> Result<()> {
    let hooks = HookCounter::start()?;
    let extra = json!({
        "scaleDownDelay": "5s",
        "webhooks": [{"name": "done", "type": "post-rollout", "url": hooks.url("/done")}]
    });
    let mut release = Release::start(
        "lifecycle-leader",
        analysis(),
        extra,
        StackOptions::default(),
    )?;
    let dir = release.dir.path().to_path_buf();
    let standby = KubeController::start_with(
        &release.stack.cluster,
        "fledge-e2e-1",
        &dir.join("controller-1.log"),
        &["--lease-duration", "3s"],
    )?;
    let result = run(&mut release, |r| {
        ensure!(r.controller.is_leader()? && !standby.is_leader()?);
        r.wait_for("Initialized")?;
        r.start_load()?;
        // The new revision's pods take 2 s to become ready: the primary's rollout after the
        // copy is a window to stop in.
        r.apply("app:v2", &[("READY_AFTER_MS", "2000")])?;
        require("the template copied into the primary", STEP, || {
            let primary = r.deployment(PRIMARY)?;
            Ok(primary["spec"]["template"]["spec"]["containers"][0]["image"] == "app:v2")
        })?;
        ensure!(
            r.deployment(TARGET)?["spec"]["replicas"] == 2,
            "the target was already scaled down"
        );
        r.controller.kill();
        require("the standby leads", Duration::from_secs(20), || {
            standby.is_leader()
        })?;
        let status = r.wait_for("Succeeded")?;
        ensure!(status["workload"]["stableImage"] == "app:v2");
        r.target_retired()?;
        let requests = r.stack.cluster.requests()?;
        ensure!(
            writes_to(&requests, "PATCH", PRIMARY) == 1,
            "the template was copied more than once"
        );
        // Scale writes: adoption's scale-down, the revision's scale-up, its scale-down.
        ensure!(writes_to(&requests, "PATCH", &format!("{TARGET}/scale")) == 3);
        let events = r
            .stack
            .cluster
            .get("/apis/events.k8s.io/v1/namespaces/shop/events")?;
        let succeeded: i64 = events["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["reason"] == "Succeeded")
            .map(|e| e["series"]["count"].as_i64().unwrap_or(1))
            .sum();
        ensure!(succeeded == 1, "Succeeded announced {succeeded} times");
        require(
            "the post-rollout hook called",
            Duration::from_secs(5),
            || Ok(hooks.count("/done") >= 1),
        )?;
        std::thread::sleep(Duration::from_secs(1));
        ensure!(
            hooks.count("/done") == 1,
            "post-rollout called {} times",
            hooks.count("/done")
        );
        r.only_primary_serves("v2")?;
        r.only_2xx()
    });
    result.map_err(|e| e.context(format!("standby log tail:\n{}", standby.log_tail(30))))
}

/// Seed 004 (Gloo's two-phase rollout). Phase 1: only requests carrying `stage: canary`
/// reach v2 (the testers route), everyone else stays on v1. Phase 2: weighted traffic to v2,
/// judged by the metrics. At the end v1 is retired: the primary runs v2, no v1 pod is left,
/// and the testers route is gone.
#[test]
fn testers_first_then_weights_and_v1_retired_at_the_end() -> Result<()> {
    let analysis = json!({
        "interval": "1s",
        "threshold": 2,
        "minCanaryRequests": 5,
        "startingStep": 2,
        "steps": [{"setWeight": 0}, {"pause": {"duration": "6s"}}, {"setWeight": 50}, {"pause": {"duration": "3s"}}],
        "metrics": [{"name": "request-success-rate", "thresholdRange": {"min": 99}}]
    });
    let extra = json!({"scaleDownDelay": "1s"});
    let mut release = Release::start(
        "lifecycle-two-phase",
        analysis,
        extra,
        StackOptions::default(),
    )?;
    release.stack.cluster.patch(
        CANARY,
        &json!({"spec": {"router": {"istio": {"headerRoute": {"headers": {"stage": "canary"}}}}}}),
    )?;
    let mut testers: Option<LoadGen> = None;
    let result = run(&mut release, |r| {
        r.wait_for("Initialized")?;
        r.start_load()?;
        r.apply("app:v2", &[])?;
        require(
            "phase 1: the testers route in place at weight 0",
            STEP,
            || {
                let w = r.workload()?;
                let vs = r
                    .stack
                    .cluster
                    .get("/apis/networking.istio.io/v1/namespaces/shop/virtualservices/app")?;
                Ok(w["phase"] == "Progressing"
                    && r.weights()? == RouteWeights::ALL_STABLE
                    && vs["spec"]["http"]
                        .as_array()
                        .is_some_and(|routes| routes.len() == 2))
            },
        )?;
        let tester = LoadGen::start(
            &r.stack.envoy.listener_url(),
            LoadOptions::new(20, Duration::from_secs(120)).with_header("stage", "canary"),
        )?;
        // The testers route reaches the gateway with istiod's next push.
        require(
            "the testers route live in the gateway",
            Duration::from_secs(5),
            || {
                let before = tester.snapshot();
                std::thread::sleep(Duration::from_millis(500));
                let seen = tester.snapshot().since(&before);
                Ok(seen.responses() > 0 && seen.version_share("v2") == 1.0)
            },
        )?;
        let before = tester.snapshot();
        let everyone = r.window(2);
        let testers_seen = tester.snapshot().since(&before);
        testers = Some(tester);
        ensure!(
            testers_seen.version_share("v2") == 1.0 && testers_seen.responses() > 15,
            "testers: {}",
            testers_seen.summary()
        );
        ensure!(
            everyone.version_share("v1") == 1.0,
            "everyone else: {}",
            everyone.summary()
        );
        require("phase 2: weighted traffic to v2", STEP, || {
            Ok(r.weights()?.canary == 50)
        })?;
        let status = r.wait_for("Succeeded")?;
        ensure!(status["workload"]["stableImage"] == "app:v2");
        r.target_retired()?;
        let vs = r
            .stack
            .cluster
            .get("/apis/networking.istio.io/v1/namespaces/shop/virtualservices/app")?;
        ensure!(
            vs["spec"]["http"].as_array().map(Vec::len) == Some(1),
            "the testers route is gone: {vs:#}"
        );
        require("no v1 pod left", Duration::from_secs(15), || {
            Ok(r.stack.kubelet.pods().iter().all(|p| p.image != "app:v1"))
        })?;
        r.only_primary_serves("v2")?;
        r.only_2xx()
    });
    if let Some(tester) = testers {
        let report = tester.stop();
        if result.is_ok() && report.server_errors() > 0 {
            bail!("the testers saw errors: {}", report.summary());
        }
    }
    result
}
