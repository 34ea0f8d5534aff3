//! A stand-in for the Deployment controller and the kubelet: for each apps/v1 Deployment in a
//! namespace of a [`FakeCluster`], real `fledge-testbackend` processes play its pods.
//!
//! - Every 100 ms it lists the Deployments (over HTTP, like any client). A Deployment with
//!   `spec.replicas` N gets N pods of its current pod template (a *revision*, hashed as Fledge
//!   hashes it); each pod is a process configured from the template: the image's tag is the
//!   version it answers with (`x-backend-version`), and the env vars `ERROR_RATE` (fraction of
//!   500s), `LATENCY_MS`, `NEVER_READY` (`true`: the readiness probe never succeeds) and
//!   `READY_AFTER_MS` set its behaviour.
//! - A pod is ready when its readiness probe (`/__backend/ready`) answers 200.
//! - A template change is a rolling update without unavailability: the new revision's pods
//!   all start at once, and an old pod goes only when a new one is ready (new pods that never
//!   become ready leave the old ones serving).
//! - Scaling down or replacing a pod first marks it terminating (not ready: the istiod stand-in
//!   drops it from the endpoints), then stops it after a grace period — what a `preStop` sleep
//!   gives a real pod.
//! - It writes the Deployment's status through the status subresource: `observedGeneration`,
//!   `replicas`, `updatedReplicas`, `readyReplicas`, `availableReplicas` and the `Available` /
//!   `Progressing` conditions, as the Deployment controller does.
//!
//! The pods are visible to tests and to the istiod stand-in ([`crate::kubernetes::MeshSync`])
//! through [`Kubelet::pods`].

use crate::backend::{Backend, BackendOptions};
use crate::http;
use crate::kubernetes::FakeCluster;
use anyhow::{Context, Result};
use fledge_core::workload::{images, template_hash};
use fledge_testkit::fake_api::deployment_status;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a terminating pod keeps running (out of the endpoints) before it is stopped.
pub const TERMINATION_GRACE: Duration = Duration::from_millis(1500);
const PERIOD: Duration = Duration::from_millis(100);

/// One pod as tests and the istiod stand-in see it.
#[derive(Debug, Clone, PartialEq)]
pub struct PodView {
    pub name: String,
    pub deployment: String,
    /// The pod template hash of the revision it runs.
    pub revision: String,
    pub image: String,
    pub labels: BTreeMap<String, String>,
    pub port: u16,
    pub ready: bool,
    pub terminating: bool,
}

impl PodView {
    /// Whether every `selector` label is on this pod.
    pub fn matches(&self, selector: &BTreeMap<String, String>) -> bool {
        selector.iter().all(|(k, v)| self.labels.get(k) == Some(v))
    }

    /// In service: ready and not terminating.
    pub fn serving(&self) -> bool {
        self.ready && !self.terminating
    }
}

/// The pods of all Deployments, shared with the istiod stand-in.
pub type Pods = Arc<Mutex<Vec<PodView>>>;

struct Pod {
    view: PodView,
    backend: Backend,
    stop_at: Option<Instant>,
}

/// A running kubelet stand-in; stops every pod when dropped.
pub struct Kubelet {
    stop: Arc<AtomicBool>,
    pods: Pods,
    thread: Option<JoinHandle<()>>,
}

impl Kubelet {
    /// Run the Deployments of `namespace` in `cluster`; pod logs go under `dir`.
    pub fn start(cluster: &FakeCluster, namespace: &str, dir: &Path) -> Result<Kubelet> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let pods: Pods = Arc::new(Mutex::new(Vec::new()));
        let mut node = Node {
            api: format!(
                "{}/apis/apps/v1/namespaces/{namespace}/deployments",
                cluster.url()
            ),
            dir: dir.to_path_buf(),
            pods: Vec::new(),
            started: 0,
            shared: pods.clone(),
        };
        let stop_flag = stop.clone();
        // The pods are spawned by this thread, which lives as long as the Kubelet (children
        // die with the thread that spawned them).
        let thread = std::thread::Builder::new()
            .name("kubelet".into())
            .spawn(move || {
                while !stop_flag.load(Ordering::SeqCst) {
                    if let Err(error) = node.sync() {
                        tracing::debug!(error = %format!("{error:#}"), "kubelet: sync failed; retrying");
                    }
                    std::thread::sleep(PERIOD);
                }
                node.stop_all();
            })
            .context("starting the kubelet thread")?;
        Ok(Kubelet {
            stop,
            pods,
            thread: Some(thread),
        })
    }

    /// Every pod now (including terminating ones).
    pub fn pods(&self) -> Vec<PodView> {
        lock(&self.pods).clone()
    }

    /// The shared pod list (for [`crate::kubernetes::MeshSync`]).
    pub fn pods_handle(&self) -> Pods {
        self.pods.clone()
    }

    /// The pods of one Deployment that are serving.
    pub fn serving(&self, deployment: &str) -> Vec<PodView> {
        self.pods()
            .into_iter()
            .filter(|p| p.deployment == deployment && p.serving())
            .collect()
    }

    /// Requests each live pod has served (by pod name), from its own counters.
    pub fn served(&self) -> BTreeMap<String, u64> {
        self.pods()
            .into_iter()
            .filter_map(|pod| {
                let url = format!("http://127.0.0.1:{}/__backend/stats", pod.port);
                let stats = http::get_json(&url, Duration::from_secs(2)).ok()?;
                Some((pod.name, stats["served"].as_u64()?))
            })
            .collect()
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match mutex.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// What the kubelet thread owns.
struct Node {
    api: String,
    dir: PathBuf,
    pods: Vec<Pod>,
    started: u64,
    shared: Pods,
}

fn env_of(template: &Value) -> BTreeMap<String, String> {
    template
        .pointer("/spec/containers/0/env")
        .and_then(Value::as_array)
        .map(|vars| {
            vars.iter()
                .filter_map(|var| {
                    Some((
                        var.get("name")?.as_str()?.to_string(),
                        var.get("value")?.as_str()?.to_string(),
                    ))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn labels_of(template: &Value) -> BTreeMap<String, String> {
    template
        .pointer("/metadata/labels")
        .and_then(Value::as_object)
        .map(|labels| {
            labels
                .iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

impl Node {
    fn sync(&mut self) -> Result<()> {
        let list = http::get_json(&self.api, Duration::from_secs(2))?;
        let deployments: Vec<Value> = list["items"].as_array().cloned().unwrap_or_default();
        for deployment in &deployments {
            self.run(deployment);
        }
        // Pods of Deployments that are gone.
        let names: Vec<&str> = deployments
            .iter()
            .filter_map(|d| d.pointer("/metadata/name").and_then(Value::as_str))
            .collect();
        for pod in &mut self.pods {
            if !names.contains(&pod.view.deployment.as_str()) {
                terminate(pod);
            }
        }
        self.probe();
        self.reap();
        *lock(&self.shared) = self.pods.iter().map(|p| p.view.clone()).collect();
        for deployment in &deployments {
            self.write_status(deployment)?;
        }
        Ok(())
    }

    /// Start, replace and stop pods so `deployment` converges.
    fn run(&mut self, deployment: &Value) {
        let name = deployment["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let replicas = deployment["spec"]["replicas"].as_u64().unwrap_or(1) as usize;
        let template = &deployment["spec"]["template"];
        let revision = template_hash(template);
        let live = |p: &Pod| p.view.deployment == name && !p.view.terminating;
        let current = self
            .pods
            .iter()
            .filter(|p| live(p) && p.view.revision == revision)
            .count();
        for _ in current..replicas {
            match self.start_pod(&name, deployment, &revision) {
                Ok(pod) => self.pods.push(pod),
                Err(error) => {
                    tracing::warn!(deployment = %name, error = %format!("{error:#}"), "kubelet: cannot start a pod");
                    break;
                }
            }
        }
        let ready_current = self
            .pods
            .iter()
            .filter(|p| live(p) && p.view.revision == revision && p.view.ready)
            .count();
        // Too many of the current revision: the not-ready ones go first.
        let mut excess = current.saturating_sub(replicas);
        // Old revisions: one goes for each new pod that is ready.
        let mut old_excess = self
            .pods
            .iter()
            .filter(|p| live(p) && p.view.revision != revision)
            .count()
            .saturating_sub(replicas.saturating_sub(ready_current));
        for ready in [false, true] {
            for pod in self.pods.iter_mut().rev() {
                if !live(pod) || pod.view.ready != ready {
                    continue;
                }
                if pod.view.revision == revision && excess > 0 {
                    excess -= 1;
                    terminate(pod);
                } else if pod.view.revision != revision && old_excess > 0 {
                    old_excess -= 1;
                    terminate(pod);
                }
            }
        }
    }

    fn start_pod(&mut self, deployment: &str, object: &Value, revision: &str) -> Result<Pod> {
        let template = &object["spec"]["template"];
        let env = env_of(template);
        let image = images(object);
        let version = image.rsplit(':').next().unwrap_or(&image).to_string();
        self.started += 1;
        let name = format!(
            "{deployment}-{}-{}",
            &revision[..6.min(revision.len())],
            self.started
        );
        let number = |key: &str| env.get(key).and_then(|v| v.parse::<f64>().ok());
        let options = BackendOptions {
            error_rate: number("ERROR_RATE").unwrap_or(0.0),
            latency_ms: number("LATENCY_MS").unwrap_or(0.0) as u64,
            never_ready: env.get("NEVER_READY").is_some_and(|v| v == "true"),
            ready_after_ms: number("READY_AFTER_MS").unwrap_or(0.0) as u64,
            pod: Some(name.clone()),
            seed: self.started,
            work_dir: Some(self.dir.clone()),
            ..BackendOptions::default()
        };
        let backend = Backend::start(&version, options)?;
        tracing::info!(pod = %name, %image, port = backend.port(), "kubelet: pod started");
        Ok(Pod {
            view: PodView {
                name,
                deployment: deployment.to_string(),
                revision: revision.to_string(),
                image,
                labels: labels_of(template),
                port: backend.port(),
                ready: false,
                terminating: false,
            },
            backend,
            stop_at: None,
        })
    }

    /// Readiness probes of the pods not ready yet.
    fn probe(&mut self) {
        for pod in self
            .pods
            .iter_mut()
            .filter(|p| !p.view.ready && !p.view.terminating)
        {
            if pod.backend.ready() {
                pod.view.ready = true;
                tracing::info!(pod = %pod.view.name, "kubelet: pod ready");
            }
        }
    }

    /// Stop the terminating pods whose grace period is over.
    fn reap(&mut self) {
        let now = Instant::now();
        let (done, kept): (Vec<Pod>, Vec<Pod>) = std::mem::take(&mut self.pods)
            .into_iter()
            .partition(|p| p.stop_at.is_some_and(|at| now >= at));
        self.pods = kept;
        for pod in done {
            tracing::info!(pod = %pod.view.name, "kubelet: pod stopped");
            pod.backend.stop();
        }
    }

    fn write_status(&self, deployment: &Value) -> Result<()> {
        let name = deployment["metadata"]["name"].as_str().unwrap_or_default();
        let revision = template_hash(&deployment["spec"]["template"]);
        let live: Vec<&PodView> = self
            .pods
            .iter()
            .map(|p| &p.view)
            .filter(|p| p.deployment == name && !p.terminating)
            .collect();
        let updated = live.iter().filter(|p| p.revision == revision).count() as i64;
        let available = live.iter().filter(|p| p.ready).count() as i64;
        let status = deployment_status(deployment, live.len() as i64, updated, available);
        if deployment.get("status") == Some(&status) {
            return Ok(());
        }
        let mut object = deployment.clone();
        object["status"] = status;
        http::put_json(
            &format!("{}/{name}/status", self.api),
            &object,
            Duration::from_secs(2),
        )
        .map(|_| ())
    }

    fn stop_all(&mut self) {
        for pod in std::mem::take(&mut self.pods) {
            pod.backend.stop();
        }
        lock(&self.shared).clear();
    }
}

fn terminate(pod: &mut Pod) {
    if !pod.view.terminating {
        tracing::info!(pod = %pod.view.name, "kubelet: pod terminating");
        pod.view.terminating = true;
        pod.view.ready = false;
        pod.stop_at = Some(Instant::now() + TERMINATION_GRACE);
    }
}
