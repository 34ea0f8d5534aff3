//! Kubernetes mode on real processes, without a cluster:
//!
//! ```text
//!  fledge-fake-apiserver (the unit tests' fake API server, over HTTP)
//!     ▲  Canary, Lease, Events, VirtualService          │ VirtualService weights
//!     │                                                  ▼
//!  fledge controller ◀── Envoy admin /stats ──┐    MeshSync (stand-in for istiod)
//!     │ dashboard, /metrics                   │          │ writes the route file
//!     ▼                                       │          ▼
//!  browser / CLI                           Envoy + Wasm filter ──▶ backends v1 / v2
//! ```
//!
//! - [`FakeCluster`]: a running `fledge-fake-apiserver` seeded with objects, and its kubeconfig.
//! - [`KubeController`]: a running `fledge controller` using that kubeconfig.
//! - [`MeshSync`]: copies one VirtualService route's weights into Envoy's file RDS every
//!   200 ms, as istiod would push them to the gateway; with [`SubsetEndpoints`] it also gives
//!   each DestinationRule subset's Envoy cluster (file EDS) the pods whose labels match the
//!   subset's, ready and not terminating (the pods of [`crate::kubelet::Kubelet`]). It is a
//!   stand-in: nothing else of Istio (propagation delays, xDS) is modelled.

use crate::envoy::{
    write_eds_file, write_rds_file_with, RouteShape, RouteWeights, CANARY_CLUSTER, STABLE_CLUSTER,
};
use crate::kubelet::Pods;
use crate::process::{abort_if_exited, free_port, wait_until, Proc};
use crate::{http, paths};
use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// The Istio API group and version the controller writes.
const ISTIO_V1: &str = "/apis/networking.istio.io/v1";

/// A running `fledge-fake-apiserver`.
pub struct FakeCluster {
    proc: Proc,
    url: String,
    kubeconfig: PathBuf,
}

impl FakeCluster {
    /// Start it in `dir` with `objects` created first; its kubeconfig's context uses
    /// `namespace`.
    pub fn start(dir: &Path, namespace: &str, objects: &[Value]) -> Result<FakeCluster> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let seed = dir.join("seed.json");
        std::fs::write(&seed, serde_json::to_vec_pretty(objects)?)?;
        let kubeconfig = dir.join("kubeconfig");
        let _ = std::fs::remove_file(&kubeconfig);
        let port = free_port()?;
        let mut command = Command::new(paths::cargo_binary("fledge-fake-apiserver")?);
        command
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .arg("--namespace")
            .arg(namespace)
            .arg("--seed")
            .arg(&seed);
        let mut proc = Proc::spawn("fake-apiserver", command, &dir.join("apiserver.log"))?;
        let url = format!("http://127.0.0.1:{port}");
        wait_until(
            "the fake API server to answer",
            Duration::from_secs(20),
            || {
                abort_if_exited(&mut proc)?;
                Ok((kubeconfig.is_file()
                    && http::get(&format!("{url}/version"), Duration::from_secs(1)).is_ok())
                .then_some(()))
            },
        )
        .with_context(|| format!("fake API server log:\n{}", proc.log_tail(20)))?;
        Ok(FakeCluster {
            proc,
            url,
            kubeconfig,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// `GET path` as JSON (2xx required).
    pub fn get(&self, path: &str) -> Result<Value> {
        http::get_json(&format!("{}{path}", self.url), Duration::from_secs(3))
    }

    /// A Canary object.
    pub fn canary(&self, namespace: &str, name: &str) -> Result<Value> {
        self.get(&format!(
            "/apis/fledge.dev/v1alpha1/namespaces/{namespace}/canaries/{name}"
        ))
    }

    /// The weights of `route` in a VirtualService whose first destination is stable and
    /// second is the canary.
    pub fn route_weights(&self, namespace: &str, name: &str, route: &str) -> Result<RouteWeights> {
        let vs = self.get(&format!(
            "{ISTIO_V1}/namespaces/{namespace}/virtualservices/{name}"
        ))?;
        weights_of(&vs, route)
    }

    pub fn log_tail(&self, lines: usize) -> String {
        self.proc.log_tail(lines)
    }

    /// Every request the server recorded so far (`client`, `method`, `path`, `status`).
    pub fn requests(&self) -> Result<Vec<Value>> {
        Ok(self
            .get("/__fake/requests")?
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// `POST path` of a new object (as `kubectl create` would).
    pub fn post(&self, path: &str, object: &Value) -> Result<()> {
        http::post_json(
            &format!("{}{path}", self.url),
            object,
            Duration::from_secs(3),
        )
        .map(|_| ())
    }

    /// `PATCH path` with a JSON merge patch (as `kubectl patch --type merge`, or a GitOps tool
    /// applying a changed manifest, would).
    pub fn patch(&self, path: &str, patch: &Value) -> Result<()> {
        http::patch_merge(
            &format!("{}{path}", self.url),
            patch,
            Duration::from_secs(3),
        )
        .map(|_| ())
    }
}

fn weights_of(virtual_service: &Value, route: &str) -> Result<RouteWeights> {
    let http_routes = virtual_service["spec"]["http"]
        .as_array()
        .ok_or_else(|| anyhow!("the VirtualService has no spec.http"))?;
    let found = http_routes
        .iter()
        .find(|r| r["name"] == route)
        .ok_or_else(|| anyhow!("the VirtualService has no route {route:?}"))?;
    let weight = |i: usize| {
        found["route"][i]["weight"]
            .as_u64()
            .map(|w| w as u32)
            .unwrap_or(0)
    };
    Ok(RouteWeights {
        stable: weight(0),
        canary: weight(1),
    })
}

/// A running `fledge controller` (Kubernetes mode) against a [`FakeCluster`].
pub struct KubeController {
    proc: Proc,
    port: u16,
}

/// `fledge controller` on 127.0.0.1:`port` as `identity`, with `kubeconfig` and the Lease in
/// `fledge-system`; without the in-cluster variables, so it never takes a test's pod for its own.
pub fn controller_command(kubeconfig: &Path, identity: &str, port: u16) -> Result<Command> {
    let mut command = Command::new(paths::fledge_binary()?);
    command
        .arg("controller")
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--lease-namespace")
        .arg("fledge-system")
        .arg("--identity")
        .arg(identity)
        .env("KUBECONFIG", kubeconfig)
        .env_remove("POD_NAME")
        .env_remove("POD_NAMESPACE");
    Ok(command)
}

impl KubeController {
    /// Start `fledge controller --identity IDENTITY` with the cluster's kubeconfig and wait
    /// until its `/readyz` answers.
    pub fn start(cluster: &FakeCluster, identity: &str, log_path: &Path) -> Result<KubeController> {
        Self::start_with(cluster, identity, log_path, &[])
    }

    /// [`KubeController::start`] with more arguments (e.g. `--lease-duration 3s`).
    pub fn start_with(
        cluster: &FakeCluster,
        identity: &str,
        log_path: &Path,
        args: &[&str],
    ) -> Result<KubeController> {
        let port = free_port()?;
        let mut command = controller_command(cluster.kubeconfig(), identity, port)?;
        command.args(args);
        let mut proc = Proc::spawn("fledge controller", command, log_path)?;
        let url = format!("http://127.0.0.1:{port}/readyz");
        wait_until("fledge controller /readyz", Duration::from_secs(20), || {
            abort_if_exited(&mut proc)?;
            Ok(http::get(&url, Duration::from_secs(1))
                .ok()
                .filter(|(code, _)| *code == 200)
                .map(|_| ()))
        })
        .with_context(|| format!("fledge controller log:\n{}", proc.log_tail(20)))?;
        Ok(KubeController { proc, port })
    }

    /// Base URL of its HTTP server (probes, dashboard, API, `/metrics`).
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Whether it leads (`/readyz` says `ok: leader`).
    pub fn is_leader(&self) -> Result<bool> {
        let (_, body) = http::get(
            &format!("{}/readyz", self.base_url()),
            Duration::from_secs(2),
        )?;
        Ok(body.trim() == "ok: leader")
    }

    /// SIGTERM, wait for a graceful exit (SIGKILL after the grace period).
    pub fn stop(&mut self) -> Option<ExitStatus> {
        self.proc.stop()
    }

    /// SIGKILL now: a crash (the Lease is not released).
    pub fn kill(&mut self) {
        self.proc.kill_now();
    }

    pub fn log_tail(&self, lines: usize) -> String {
        self.proc.log_tail(lines)
    }

    pub fn log_text(&self) -> String {
        self.proc.log_text()
    }
}

/// A stand-in for istiod: copies one VirtualService route's weights (and the header-match
/// routes before it, such as Fledge's testers route) into Envoy's RDS file.
pub struct MeshSync {
    stop: Arc<AtomicBool>,
    pushes: Arc<AtomicU64>,
    /// While set, route changes are not pushed (a control plane that has not pushed yet).
    routes_held: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// How the istiod stand-in fills the clusters of DestinationRule subsets with pods.
pub struct SubsetEndpoints {
    /// The DestinationRule (in the VirtualService's namespace) whose subsets select the pods.
    pub destination_rule: String,
    /// (subset name, Envoy cluster, its EDS file), e.g. `("stable", "app_stable", path)`.
    pub subsets: Vec<(String, String, PathBuf)>,
    pub pods: Pods,
}

impl MeshSync {
    /// Every 200 ms, read `route` of VirtualService `namespace/name` and, when its weights
    /// changed, write them to `rds_path` (which the Envoy in `crate::envoy` watches).
    pub fn start(
        cluster: &FakeCluster,
        namespace: &str,
        name: &str,
        route: &str,
        rds_path: &Path,
    ) -> Result<MeshSync> {
        Self::start_with(cluster, namespace, name, route, rds_path, None)
    }

    /// [`MeshSync::start`], and the subsets' endpoints: each subset's cluster gets the pods
    /// whose labels include the subset's labels (ready, not terminating) — none, if none.
    pub fn start_with_endpoints(
        cluster: &FakeCluster,
        namespace: &str,
        name: &str,
        route: &str,
        rds_path: &Path,
        endpoints: SubsetEndpoints,
    ) -> Result<MeshSync> {
        Self::start_with(cluster, namespace, name, route, rds_path, Some(endpoints))
    }

    fn start_with(
        cluster: &FakeCluster,
        namespace: &str,
        name: &str,
        route: &str,
        rds_path: &Path,
        endpoints: Option<SubsetEndpoints>,
    ) -> Result<MeshSync> {
        let url = format!(
            "{}{ISTIO_V1}/namespaces/{namespace}/virtualservices/{name}",
            cluster.url()
        );
        let rule_url = endpoints.as_ref().map(|e| {
            format!(
                "{}{ISTIO_V1}/namespaces/{namespace}/destinationrules/{}",
                cluster.url(),
                e.destination_rule
            )
        });
        let route = route.to_string();
        let rds_path = rds_path.to_path_buf();
        let stop = Arc::new(AtomicBool::new(false));
        let pushes = Arc::new(AtomicU64::new(0));
        let routes_held = Arc::new(AtomicBool::new(false));
        let (stop_flag, push_count, held) = (stop.clone(), pushes.clone(), routes_held.clone());
        let thread = std::thread::Builder::new()
            .name("mesh-sync".into())
            .spawn(move || {
                // Versions above anything the Envoy harness wrote itself.
                let mut version = 1_000_000u64;
                let mut pushed: Option<(RouteWeights, Vec<Value>)> = None;
                let mut pushed_endpoints: BTreeMap<String, Vec<u16>> = BTreeMap::new();
                while !stop_flag.load(Ordering::SeqCst) {
                    if let (Some(endpoints), Some(rule_url)) = (&endpoints, &rule_url) {
                        version += 1;
                        push_endpoints(endpoints, rule_url, &mut pushed_endpoints, version);
                    }
                    let state = http::get_json(&url, Duration::from_secs(2))
                        .and_then(|vs| Ok((weights_of(&vs, &route)?, routes_before(&vs, &route))));
                    match state {
                        Ok(state) if pushed.as_ref() != Some(&state) && !held.load(Ordering::SeqCst) => {
                            version += 1;
                            let shape = RouteShape {
                                routes_before_primary: state.1.clone(),
                                ..RouteShape::default()
                            };
                            match write_rds_file_with(&rds_path, &shape, state.0, version) {
                                Ok(()) => {
                                    tracing::info!(weights = %state.0, routes = state.1.len(), "mesh-sync: pushed the VirtualService's route to Envoy");
                                    pushed = Some(state);
                                    push_count.fetch_add(1, Ordering::SeqCst);
                                }
                                Err(e) => tracing::warn!(error = %e, "mesh-sync: cannot write the route file"),
                            }
                        }
                        Ok(_) => {}
                        Err(e) => tracing::debug!(error = %e, "mesh-sync: cannot read the VirtualService"),
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
            })
            .context("starting the mesh-sync thread")?;
        Ok(MeshSync {
            stop,
            pushes,
            routes_held,
            thread: Some(thread),
        })
    }

    /// Stop (or resume) pushing route changes, as a control plane that has not pushed the
    /// latest VirtualService yet; endpoints are still pushed.
    pub fn hold_routes(&self, held: bool) {
        self.routes_held.store(held, Ordering::SeqCst);
    }

    /// How many weight changes were pushed to Envoy so far.
    pub fn pushes(&self) -> u64 {
        self.pushes.load(Ordering::SeqCst)
    }
}

impl Drop for MeshSync {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The header-match routes before `route` in a VirtualService (e.g. Fledge's testers route),
/// as Envoy routes to the subset's cluster (`stable` → `app_stable`, `canary` →
/// `app_canary`); only exact header matches are translated.
fn routes_before(vs: &Value, route: &str) -> Vec<Value> {
    let routes = vs["spec"]["http"].as_array().cloned().unwrap_or_default();
    routes
        .iter()
        .take_while(|r| r["name"] != route)
        .filter_map(|r| {
            let cluster = match r["route"][0]["destination"]["subset"].as_str()? {
                "stable" => STABLE_CLUSTER,
                "canary" => CANARY_CLUSTER,
                _ => return None,
            };
            let headers: Vec<Value> = r["match"][0]["headers"]
                .as_object()?
                .iter()
                .filter_map(|(name, m)| {
                    Some(serde_json::json!({"name": name, "string_match": {"exact": m.get("exact")?}}))
                })
                .collect();
            Some(serde_json::json!({
                "name": r["name"].as_str().unwrap_or("header-route"),
                "match": {"prefix": "/", "headers": headers},
                "route": {"cluster": cluster}
            }))
        })
        .collect()
}

/// The labels each subset of a DestinationRule selects, by subset name.
fn subset_labels(rule: &Value) -> BTreeMap<String, BTreeMap<String, String>> {
    rule.pointer("/spec/subsets")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|subset| {
            let name = subset.get("name")?.as_str()?.to_string();
            let labels = subset
                .get("labels")
                .and_then(Value::as_object)
                .map(|labels| {
                    labels
                        .iter()
                        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                        .collect()
                })
                .unwrap_or_default();
            Some((name, labels))
        })
        .collect()
}

/// Write each subset's cluster's endpoints when they changed.
fn push_endpoints(
    endpoints: &SubsetEndpoints,
    rule_url: &str,
    pushed: &mut BTreeMap<String, Vec<u16>>,
    version: u64,
) {
    let rule = match http::get_json(rule_url, Duration::from_secs(2)) {
        Ok(rule) => rule,
        Err(e) => {
            tracing::debug!(error = %e, "mesh-sync: cannot read the DestinationRule");
            return;
        }
    };
    let subsets = subset_labels(&rule);
    let pods = match endpoints.pods.lock() {
        Ok(pods) => pods.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    };
    for (subset, cluster, path) in &endpoints.subsets {
        let mut ports: Vec<u16> = match subsets.get(subset) {
            Some(labels) => pods
                .iter()
                .filter(|pod| pod.serving() && pod.matches(labels))
                .map(|pod| pod.port)
                .collect(),
            None => Vec::new(),
        };
        ports.sort_unstable();
        if pushed.get(cluster) == Some(&ports) {
            continue;
        }
        match write_eds_file(path, cluster, &ports, version) {
            Ok(()) => {
                tracing::info!(%cluster, ?ports, "mesh-sync: pushed the subset's endpoints to Envoy");
                pushed.insert(cluster.clone(), ports);
            }
            Err(e) => tracing::warn!(error = %e, "mesh-sync: cannot write the endpoints file"),
        }
    }
}

/// The objects of a two-subset app in namespace `namespace`: the VirtualService (route
/// `primary`: stable 100 / canary 0), the DestinationRule and a Canary whose metrics come from
/// the gateway Envoy's admin at `envoy_admin_url`, with `analysis` as its `spec.analysis`.
pub fn app_objects(namespace: &str, envoy_admin_url: &str, analysis: Value) -> Vec<Value> {
    fledge_testkit::fixtures::app_objects(namespace, envoy_admin_url, analysis)
}

/// Fail with `what` and the logs when `probe` does not hold within `timeout`.
pub fn require(what: &str, timeout: Duration, probe: impl FnMut() -> Result<bool>) -> Result<()> {
    let mut probe = probe;
    wait_until(what, timeout, || Ok(probe()?.then_some(())))
}

/// Error unless `status` is a clean exit.
pub fn exited_cleanly(status: Option<ExitStatus>) -> Result<()> {
    match status {
        Some(status) if status.success() => Ok(()),
        other => bail!("fledge controller did not exit cleanly on SIGTERM: {other:?}"),
    }
}
