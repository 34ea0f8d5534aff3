//! # Kubernetes mode: the `Canary` custom resource and its controller
//!
//! In a cluster, Fledge watches `Canary` objects (group `fledge.dev`, version `v1alpha1`) and
//! moves the weights of the user's own route object (an Istio VirtualService) through the
//! same [`crate::router::TrafficRouter`] and [`crate::tick`] as `fledge run`. The rollout state
//! lives in the Canary's `.status`, so any controller instance (a restarted pod, a new leader)
//! continues exactly where the last one stopped.
//!
//! ```text
//!   Lease (coordination.k8s.io) ──▶ lease::LeaderElector ── only the leader runs ──┐
//!                                                                                   ▼
//!   watch Canary, route objects ──▶ kube-runtime Controller ──▶ reconcile(canary, ctx)
//!                                                  │ 1. finalizer (cleanup = all traffic to stable)
//!                                                  │ 2. TrafficRouter::ensure(status.canaryWeight)
//!                                                  │ 3. analysis due? (status.lastTickAt + interval)
//!                                                  │      tick: hooks → observe → decide → record
//!                                                  │ 4. PUT .status (resourceVersion precondition)
//!                                                  │ 5. notify (Events, webhooks), TrafficRouter::ensure
//!                                                  ▼
//!                                        requeue at the next analysis tick
//! ```
//!
//! - [`crd`]: the `Canary` resource (spec = `fledge_core::spec::CanarySpec`), its status,
//!   conditions and the generated CRD YAML (`fledge crd`).
//! - [`reconciler`]: `Context`, `reconcile`, `cleanup`, `error_policy` and [`run`].
//! - [`routes`]: route objects as watched, routes confirmed, which Canary names which route.
//! - [`lease`]: leader election with a `Lease` and resourceVersion preconditions.
//! - [`factory`]: builds a canary's metrics source and router (the seam tests replace).
//! - [`clock`]: wall clock, replaceable in tests.
//! - [`serve`]: the `fledge controller` process (probes, graceful shutdown).
//! - [`throttle`]: the client-side API request limit (QPS with a burst).
//! - [`shard`]: which Canaries one controller instance owns (`--shard N/M`, `--selector`).
//! - [`rbac`]: the API permissions the controller needs (checked against `manifests/`).
//! - [`workload`]: with `spec.targetRef`, the objects the workload lifecycle reads and writes
//!   (the target and primary Deployments, their HPAs) and the watches that wake a Canary.
//!
//! The tests run against the fake Kubernetes API server of `fledge-testkit`
//! (`testkit/src/fake_api.rs`), which keeps the semantics the controller relies on and records
//! every request; the e2e tests serve it over HTTP to a real `fledge controller` process.

pub mod clock;
pub mod crd;
pub mod factory;
pub mod lease;
pub mod rbac;
pub mod reconciler;
pub mod routes;
pub mod serve;
pub mod shard;
pub mod throttle;
pub mod workload;

#[cfg(test)]
mod manifest_tests;
#[cfg(test)]
mod reconciler_tests;
#[cfg(test)]
mod workload_tests;

pub use reconciler::{run, Clients, ControllerOptions};

/// Finalizer put on every Canary: deleting one mid-rollout first returns all traffic to stable.
pub const FINALIZER: &str = "fledge.dev/traffic";
/// Field manager / controller name in Events and Leases.
pub const CONTROLLER_NAME: &str = "fledge";

/// Everything that can go wrong in Kubernetes mode.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API error: {0}")]
    Kube(#[source] kube::Error),
    /// A status write lost a race (another writer changed the Canary first); the next
    /// reconcile re-reads it.
    #[error("Canary {0} changed while it was reconciled; retrying with the new version")]
    Conflict(String),
    #[error("Canary {name}: {message}")]
    Router { name: String, message: String },
    #[error("Canary {name}: cannot build its backends: {message}")]
    Backend { name: String, message: String },
    #[error("Canary object has no {0}")]
    MissingField(&'static str),
    /// Reading or writing a workload object (Deployment, HPA) failed; retried.
    #[error("workload: {0}")]
    Workload(String),
    /// Deleting a Canary waits for its workload (traffic moved, target reverted); not a
    /// failure: looked at again shortly.
    #[error("{0}")]
    Waiting(String),
    #[error("cannot (de)serialize: {0}")]
    Serde(#[from] serde_json::Error),
    // NB: boxed because finalizer::Error embeds this error type.
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("leader election: {0}")]
    Lease(String),
    #[error("{0}")]
    Startup(String),
    /// A reconcile's task panicked (a bug) or was cancelled.
    #[error("reconcile task failed: {0}")]
    Task(String),
}

impl Error {
    /// A short label for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Conflict(_) => "conflict",
            Error::Router { .. } => "router",
            Error::Backend { .. } => "backend",
            Error::MissingField(_) => "missing_field",
            Error::Workload(_) => "workload",
            Error::Waiting(_) => "waiting",
            Error::Serde(_) => "serde",
            Error::Finalizer(_) => "finalizer",
            Error::Lease(_) => "lease",
            Error::Startup(_) => "startup",
            Error::Task(_) => "task",
        }
    }
}

impl From<kube::Error> for Error {
    fn from(error: kube::Error) -> Self {
        Error::Kube(error)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The HTTP status code of an API error, if `error` is one.
pub fn api_status_code(error: &kube::Error) -> Option<u16> {
    match error {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}
