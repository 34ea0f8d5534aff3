//! Building a Canary's backends in Kubernetes mode.
//!
//! Metrics sources come from the same place `fledge run` gets them ([`crate::backends`]), so
//! every source the standalone mode knows (Envoy admin — the gateway-sidecar mode, pointed at
//! `http://127.0.0.1:15000` — and Prometheus) works here too. The router is the Istio
//! VirtualService router, built over the controller's Kubernetes client. Tests replace the
//! metrics side with scripted observations through [`Backends`].

use crate::metrics::MetricsSource;
use crate::router::istio::{IstioRouter, IstioSettings};
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
    ) -> Result<IstioRouter, String> {
        IstioSettings::from_spec(&canary.spec, namespace)
            .map(|settings| IstioRouter::new(client.clone(), settings))
            .ok_or_else(|| {
                "spec.router has no `istio` router; in Kubernetes mode write `router: {istio: {virtualService: ..., route: ...}}` (envoyRds is for `fledge run`)".to_string()
            })
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
