//! Traffic routers: the only code that changes where requests go.
//!
//! A router is built for one canary by [`factory::build`] — the one place that names concrete
//! routers — and driven through [`TrafficRouter`] alone, the same way by `fledge run` and by
//! `fledge controller`. It changes only what it manages in the canary's route:
//!
//! - the two **weights** (stable / canary), set and then confirmed live;
//! - while a rollout runs, the **managed routes** the spec configures: the testers route
//!   (matching requests always reach the canary), the mirror (a share of the traffic copied to
//!   the canary) and the guard route (requests the filter's data-plane guard marks go to
//!   stable); all of them are removed when the rollout ends or its Canary is deleted.
//!
//! Everything else in the route belongs to its owner (a person, GitOps) and is kept as it is.
//!
//! Adding a router: a new file here implementing [`TrafficRouter`], a variant in
//! `fledge_core::spec::RouterSpec`, and one arm in each function of [`factory`] (see
//! docs/routers.md).

pub mod envoy_rds;
pub mod factory;
pub mod gateway_api;
pub mod istio;
#[cfg(test)]
mod real_envoy_tests;

use async_trait::async_trait;
use std::fmt;

/// Traffic split in percent; `stable + canary == 100`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Weights {
    pub stable: u32,
    pub canary: u32,
}

impl Weights {
    /// The split that sends `canary_percent` (clamped to 0..=100) to the canary.
    pub fn canary_percent(canary_percent: u8) -> Self {
        let canary = u32::from(canary_percent.min(100));
        Weights {
            stable: 100 - canary,
            canary,
        }
    }
}

/// What a canary's routes should look like. A router leaves out the managed routes its spec
/// does not configure (e.g. no `headerRoute`: no testers route).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DesiredRoutes {
    pub weights: Weights,
    /// The testers route: requests matching the spec's testers always reach the canary.
    pub testers: bool,
    /// The mirror: a share of the route's traffic is copied to the canary.
    pub mirror: bool,
    /// The guard route: requests the filter's data-plane guard marks go to stable.
    pub guard: bool,
}

impl DesiredRoutes {
    /// While a rollout runs: `weights` and every managed route the spec configures.
    pub fn during_rollout(weights: Weights) -> Self {
        DesiredRoutes {
            weights,
            testers: true,
            mirror: true,
            guard: true,
        }
    }

    /// When no rollout runs (finished, or its Canary deleted): `weights`, and every route the
    /// router manages besides them removed.
    pub fn weights_only(weights: Weights) -> Self {
        DesiredRoutes {
            weights,
            testers: false,
            mirror: false,
            guard: false,
        }
    }

    /// The routes for a rollout at `canary_weight` percent that is running or not.
    pub fn for_rollout(canary_weight: u8, running: bool) -> Self {
        let weights = Weights::canary_percent(canary_weight);
        if running {
            Self::during_rollout(weights)
        } else {
            Self::weights_only(weights)
        }
    }
}

/// What [`TrafficRouter::ensure`] found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ensured {
    /// The weights the route had before any write (to tell someone else's edit from ours).
    pub found: Weights,
    /// Whether anything was written.
    pub wrote: bool,
}

/// The object that holds a canary's route, e.g. VirtualService `shop/app`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RouteObject {
    /// Its kind: a Kubernetes kind (`VirtualService`, `HTTPRoute`) — the one the controller
    /// watches to re-check a canary when it changes — or `RDS file` for `fledge run`.
    pub kind: &'static str,
    /// Its namespace (empty for a file).
    pub namespace: String,
    /// Its name (for a file: its path).
    pub name: String,
}

/// The one route a router steers. Two canaries with the same key would undo each other's
/// steps, so only one may steer it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RouteKey {
    pub object: RouteObject,
    /// The route inside the object (a route name, a rule name or index).
    pub route: String,
}

impl fmt::Display for RouteKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let object = &self.object;
        if object.namespace.is_empty() {
            write!(f, "{} {}", object.kind, object.name)?;
        } else {
            write!(f, "{} {}/{}", object.kind, object.namespace, object.name)?;
        }
        write!(f, " route {:?}", self.route)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    /// The route (or the object holding it) does not exist: nothing to steer or restore.
    #[error("{0}")]
    NotFound(String),
    /// The route exists but cannot be used as it is (the message names the fix).
    #[error("{0}")]
    Invalid(String),
    /// Something the route depends on is not ready yet (e.g. a DestinationRule lacks a subset,
    /// a Gateway has not accepted the route); tried again later.
    #[error("{0}")]
    Unready(String),
    #[error("I/O error on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Kubernetes API error on {what}: {source}")]
    Api {
        what: String,
        #[source]
        source: kube::Error,
    },
    /// Writes kept being undone or refused (someone else changes the same fields).
    #[error("{0}")]
    NotConverged(String),
    /// The route is written as wanted, but its Gateway has not accepted it (yet): not live.
    #[error("{0}")]
    NotAccepted(String),
    #[error("proxy admin API error: {0}")]
    Admin(String),
    #[error("weights {want:?} not live in the proxy after {waited_ms} ms (live: {live:?})")]
    NotLive {
        want: Weights,
        live: Option<Weights>,
        waited_ms: u64,
    },
}

impl RouterError {
    /// True when there is no route to restore (gone, or unusable as it is): a deleted Canary
    /// may go without waiting for it.
    pub fn nothing_to_restore(&self) -> bool {
        matches!(self, RouterError::NotFound(_) | RouterError::Invalid(_))
    }
}

/// One canary's route, driven the same way in both modes.
#[async_trait]
pub trait TrafficRouter: Send + Sync {
    /// The route this router steers (ownership and conflict checks, messages).
    fn route(&self) -> &RouteKey;

    /// Make the route what `desired` says — set the weights and add or remove the managed
    /// routes, changing nothing else, guarded against concurrent edits — then confirm it is
    /// live as far as this router can tell (Envoy RDS: Envoy's own config; Kubernetes: read
    /// back, and for the Gateway API the Gateway's acceptance). No write when it already is.
    /// `Ok` means traffic can be judged at these weights.
    async fn ensure(&self, desired: &DesiredRoutes) -> Result<Ensured, RouterError>;
}
