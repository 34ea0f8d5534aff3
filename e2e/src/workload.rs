//! A whole app the way Fledge releases Deployments (`spec.targetRef`), on real processes:
//!
//! ```text
//!  fake API server ◀── kubelet stand-in (Deployments → fledge-testbackend pods, status)
//!     ▲    │ VirtualService weights, DestinationRule subsets
//!     │    ▼
//!     │  MeshSync (istiod stand-in) ── RDS weights + EDS: subset → pods whose labels match
//!     │                                  ▼
//!  fledge controller ◀── /stats ── Envoy + Wasm filter ──▶ pods of app-primary (stable) / app (canary)
//! ```
//!
//! The objects are what a user keeps in Git: a Deployment `app` whose pods carry
//! `fledge.dev/track: canary`, a DestinationRule whose subsets select by that label, a
//! VirtualService at stable 100 / canary 0, and a Canary naming the Deployment.

use crate::envoy::{CANARY_CLUSTER, STABLE_CLUSTER};
use crate::kubelet::Kubelet;
use crate::kubernetes::{FakeCluster, MeshSync, SubsetEndpoints};
use crate::{Envoy, EnvoyOptions, RouteWeights, WasmFilter};
use anyhow::Result;
use serde_json::{json, Value};
use std::path::Path;

pub const TRACK: &str = "fledge.dev/track";

/// The Deployment `name` as kept in Git: `replicas` pods of `image` (its tag is the version
/// the pods answer with), labelled `app: app` and `fledge.dev/track: canary`, with `env`
/// (`ERROR_RATE`, `LATENCY_MS`, `NEVER_READY`, `READY_AFTER_MS`).
pub fn deployment(
    namespace: &str,
    name: &str,
    image: &str,
    replicas: u32,
    env: &[(&str, &str)],
) -> Value {
    let env: Vec<Value> = env
        .iter()
        .map(|(name, value)| json!({"name": name, "value": value}))
        .collect();
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": "app"}},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": "app", TRACK: "canary"}},
            "template": {
                "metadata": {"labels": {"app": "app", TRACK: "canary"}},
                "spec": {"containers": [{"name": "app", "image": image, "env": env}]}
            }
        }
    })
}

/// The pod template of [`deployment`] for `image` and `env` (what a Git change replaces).
pub fn template(image: &str, env: &[(&str, &str)]) -> Value {
    deployment("", "", image, 1, env)["spec"]["template"].clone()
}

/// VirtualService `app` (route `primary`: stable 100 / canary 0), DestinationRule `app`
/// (subsets by the track label) and Canary `app` (`targetRef: app`, metrics from the gateway
/// Envoy's admin; `analysis` and `extra` spec fields as given).
pub fn routing_and_canary(
    namespace: &str,
    envoy_admin_url: &str,
    analysis: Value,
    extra: Value,
) -> Vec<Value> {
    let mut spec = json!({
        "service": "app",
        "stable": {"subset": "stable"},
        "canary": {"subset": "canary"},
        "metricsSource": {"envoyAdmin": {"urls": [envoy_admin_url]}},
        "router": {"istio": {"virtualService": "app", "route": "primary"}},
        "analysis": analysis,
        "targetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "app"},
    });
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
        spec.extend(extra.clone());
    }
    vec![
        fledge_testkit::fixtures::virtual_service(namespace),
        json!({
            "apiVersion": "networking.istio.io/v1",
            "kind": "DestinationRule",
            "metadata": {"name": "app", "namespace": namespace},
            "spec": {
                "host": "app",
                "subsets": [
                    {"name": "stable", "labels": {TRACK: "stable"}},
                    {"name": "canary", "labels": {TRACK: "canary"}}
                ]
            }
        }),
        json!({
            "apiVersion": "fledge.dev/v1alpha1",
            "kind": "Canary",
            "metadata": {"name": "app", "namespace": namespace},
            "spec": spec
        }),
    ]
}

/// Envoy with the filter (subset clusters from EDS files), the fake API server seeded with
/// `objects(envoy admin URL)`, the kubelet and the istiod stand-in.
pub struct WorkloadStack {
    // Field order: the mesh and the kubelet stop before the cluster and Envoy.
    pub mesh: MeshSync,
    pub kubelet: Kubelet,
    pub cluster: FakeCluster,
    pub envoy: Envoy,
}

/// How a [`WorkloadStack`] starts.
#[derive(Debug, Clone)]
pub struct StackOptions {
    /// The route weights the gateway serves before the istiod stand-in pushes anything.
    pub initial_weights: RouteWeights,
    /// Start with the stand-in holding route changes (see [`MeshSync::hold_routes`]).
    pub routes_held: bool,
}

impl Default for StackOptions {
    fn default() -> Self {
        StackOptions {
            initial_weights: RouteWeights::ALL_STABLE,
            routes_held: false,
        }
    }
}

impl WorkloadStack {
    pub fn start(
        dir: &Path,
        namespace: &str,
        objects: impl FnOnce(&str) -> Vec<Value>,
    ) -> Result<WorkloadStack> {
        Self::start_with(dir, namespace, StackOptions::default(), objects)
    }

    pub fn start_with(
        dir: &Path,
        namespace: &str,
        options: StackOptions,
        objects: impl FnOnce(&str) -> Vec<Value>,
    ) -> Result<WorkloadStack> {
        let mut envoy_options = EnvoyOptions::new(0, 0);
        envoy_options.initial_weights = options.initial_weights;
        let envoy = Envoy::start(
            envoy_options
                .with_file_eds()
                .with_filter(WasmFilter::built(&WasmFilter::default_plugin_config(
                    "app",
                ))?)
                .in_dir(&dir.join("envoy")),
        )?;
        let cluster =
            FakeCluster::start(&dir.join("api"), namespace, &objects(&envoy.admin_url()))?;
        let kubelet = Kubelet::start(&cluster, namespace, &dir.join("pods"))?;
        let mesh = Self::mesh(&cluster, namespace, &envoy, &kubelet)?;
        mesh.hold_routes(options.routes_held);
        Ok(WorkloadStack {
            mesh,
            kubelet,
            cluster,
            envoy,
        })
    }

    /// The istiod stand-in for this stack (started by [`WorkloadStack::start`]; tests that
    /// model a slow control plane start another after stopping it).
    pub fn mesh(
        cluster: &FakeCluster,
        namespace: &str,
        envoy: &Envoy,
        kubelet: &Kubelet,
    ) -> Result<MeshSync> {
        MeshSync::start_with_endpoints(
            cluster,
            namespace,
            "app",
            "primary",
            envoy.rds_path(),
            SubsetEndpoints {
                destination_rule: "app".into(),
                subsets: vec![
                    (
                        "stable".into(),
                        STABLE_CLUSTER.into(),
                        envoy.eds_path(STABLE_CLUSTER),
                    ),
                    (
                        "canary".into(),
                        CANARY_CLUSTER.into(),
                        envoy.eds_path(CANARY_CLUSTER),
                    ),
                ],
                pods: kubelet.pods_handle(),
            },
        )
    }

    /// `/apis/apps/v1/namespaces/NS/deployments/NAME` (full URL).
    pub fn deployment_url(&self, namespace: &str, name: &str) -> String {
        format!(
            "{}/apis/apps/v1/namespaces/{namespace}/deployments/{name}",
            self.cluster.url()
        )
    }

    /// A Deployment as stored (`None` if it does not exist).
    pub fn deployment(&self, namespace: &str, name: &str) -> Option<Value> {
        crate::http::get_json(
            &self.deployment_url(namespace, name),
            std::time::Duration::from_secs(3),
        )
        .ok()
    }
}
