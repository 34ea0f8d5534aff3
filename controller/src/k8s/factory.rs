//! Building a Canary's backends in Kubernetes mode.
//!
//! Metrics sources come from the same place `fledge run` gets them ([`crate::backends`]), so
//! every source the standalone mode knows (Envoy admin — the gateway-sidecar mode, pointed at
//! `http://127.0.0.1:15000` — and Prometheus) works here too. The router comes from
//! [`crate::router::factory`] (the one place naming concrete routers), built over the
//! controller's Kubernetes client. Tests replace the metrics side with scripted observations
//! through [`Backends`].

use crate::metrics::MetricsSource;
use crate::router::factory::{self, Mode};
use crate::router::TrafficRouter;
use kube::Client;

/// Builds the per-canary backends.
pub trait Backends: Send + Sync {
    /// A fresh metrics source for `canary` (its first `observe` may only record a baseline).
    fn metrics_source(
        &self,
        canary: &fledge_core::spec::Canary,
    ) -> Result<Box<dyn MetricsSource>, String>;

    /// The router for `canary` in `namespace`.
    fn router(
        &self,
        client: &Client,
        canary: &fledge_core::spec::Canary,
        namespace: &str,
    ) -> Result<Box<dyn TrafficRouter>, String> {
        factory::build(canary, Mode::Kubernetes { client, namespace })
    }
}

/// The real backends: metrics sources exactly as `fledge run` builds them.
#[derive(Debug, Clone, Copy, Default)]
pub struct DefaultBackends;

impl Backends for DefaultBackends {
    fn metrics_source(
        &self,
        canary: &fledge_core::spec::Canary,
    ) -> Result<Box<dyn MetricsSource>, String> {
        crate::backends::metrics_source(canary).map_err(|e| e.to_string())
    }
}
