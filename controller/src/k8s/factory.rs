//! Building a Canary's backends in Kubernetes mode.
//!
//! Metrics sources come from the same place `fledge run` gets them ([`crate::backends`]), so
//! every source the standalone mode knows (Envoy admin — the gateway-sidecar mode, pointed at
//! `http://127.0.0.1:15000` — and Prometheus) works here too. The router comes from
//! [`crate::router::factory`] (the one place naming concrete routers), built over the
//! controller's Kubernetes client. Tests replace the metrics side with scripted observations
//! through [`Backends`].

use crate::metrics::{MetricsSource, ReadHub};
use crate::router::factory::{self, Mode};
use crate::router::TrafficRouter;
use kube::Client;
use std::sync::Arc;

/// Builds the per-canary backends.
pub trait Backends: Send + Sync {
    /// A fresh metrics source for `canary` (its first `observe` may only record a baseline).
    fn metrics_source(
        &self,
        canary: &fledge_core::spec::Canary,
    ) -> Result<Box<dyn MetricsSource>, String>;

    /// The phase of `canary`'s aligned analysis ticks ([`crate::schedule`]): by default from
    /// its metrics endpoints, so canaries reading one endpoint are judged together.
    fn tick_phase(&self, canary: &fledge_core::spec::Canary) -> std::time::Duration {
        crate::backends::tick_phase(canary)
    }

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

/// The real backends: metrics sources exactly as `fledge run` builds them, all reading through
/// one [`ReadHub`] (one scrape or query per endpoint per tick).
#[derive(Debug, Clone)]
pub struct DefaultBackends {
    pub reads: Arc<ReadHub>,
}

impl Default for DefaultBackends {
    /// Reads on threads of their own (see [`ReadHub::on_own_threads`]).
    fn default() -> Self {
        DefaultBackends {
            reads: Arc::new(ReadHub::on_own_threads()),
        }
    }
}

impl Backends for DefaultBackends {
    fn metrics_source(
        &self,
        canary: &fledge_core::spec::Canary,
    ) -> Result<Box<dyn MetricsSource>, String> {
        crate::backends::metrics_source(canary, &self.reads).map_err(|e| e.to_string())
    }
}
