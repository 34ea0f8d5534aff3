//! Building the metrics source and traffic router a Canary spec names for `fledge run`. This is
//! the only place that knows every metrics source (adding one means a new file plus one arm
//! here); routers come from [`crate::router::factory`].

use crate::metrics::envoy_admin::EnvoyAdminSource;
use crate::metrics::envoy_cluster_stats::ClusterStats;
use crate::metrics::prometheus::PrometheusSource;
use crate::metrics::{MetricsSource, ReadHub, SharedReads, SubsetSelector};
use crate::router::factory::{self, Mode};
use crate::router::TrafficRouter;
use fledge_core::spec::Canary;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("Canary {0:?}: spec.metricsSource names no source; add `envoyAdmin: {{urls: [...]}}`, `prometheus: {{address: ...}}` or `envoyClusterStats: {{urls: [...], stableCluster: ..., canaryCluster: ...}}`")]
    NoSource(String),
    #[error("Canary {name:?}: {message}")]
    Router { name: String, message: String },
    #[error("Canary {name:?}: cannot build {what}: {message}")]
    Build {
        name: String,
        what: &'static str,
        message: String,
    },
}

/// The phase of `canary`'s analysis ticks ([`crate::schedule`]): canaries reading the same
/// metrics endpoints tick together, so one read serves them all.
pub fn tick_phase(canary: &Canary) -> std::time::Duration {
    let sources = &canary.spec.metrics_source;
    let mut endpoints: Vec<&str> = match (
        &sources.envoy_cluster_stats,
        &sources.envoy_admin,
        &sources.prometheus,
    ) {
        (Some(stats), _, _) => stats.urls.iter().map(String::as_str).collect(),
        (None, Some(admin), _) => admin.urls.iter().map(String::as_str).collect(),
        (None, None, Some(prometheus)) => vec![prometheus.address.as_str()],
        (None, None, None) => Vec::new(),
    };
    endpoints.sort_unstable();
    crate::schedule::phase_of(&endpoints.join(" "), canary.spec.analysis.interval.0)
}

/// The metrics source `canary` names, reading through `hub` (shared with every other canary
/// reading the same endpoints).
pub fn metrics_source(
    canary: &Canary,
    hub: &Arc<ReadHub>,
) -> Result<Box<dyn MetricsSource>, BackendError> {
    let analysis = &canary.spec.analysis;
    let guard_every = analysis
        .guard
        .as_ref()
        .map_or(analysis.interval.0, |guard| guard.check_interval.0);
    let reads = SharedReads::through(hub.clone(), analysis.interval.0, guard_every);
    let selector = SubsetSelector {
        service: canary.spec.service.clone(),
        stable_subset: canary.spec.stable.subset.clone(),
        canary_subset: canary.spec.canary.subset.clone(),
    };
    let sources = &canary.spec.metrics_source;
    if let Some(stats) = &sources.envoy_cluster_stats {
        let reader = Arc::new(ClusterStats {
            stable_cluster: stats.stable_cluster.clone(),
            canary_cluster: stats.canary_cluster.clone(),
        });
        return EnvoyAdminSource::with_reader(
            stats.urls.clone(),
            selector,
            reader,
            stats.timeout.0,
        )
        .map(|s| Box::new(s.sharing(reads)) as Box<dyn MetricsSource>)
        .map_err(|e| BackendError::Build {
            name: canary.name().to_string(),
            what: "the Envoy cluster stats metrics source",
            message: e.to_string(),
        });
    }
    match (&sources.envoy_admin, &sources.prometheus) {
        (Some(admin), _) => EnvoyAdminSource::new(admin.urls.clone(), selector, admin.timeout.0)
            .map(|s| Box::new(s.sharing(reads)) as Box<dyn MetricsSource>)
            .map_err(|e| BackendError::Build {
                name: canary.name().to_string(),
                what: "the Envoy admin metrics source",
                message: e.to_string(),
            }),
        (None, Some(prometheus)) => PrometheusSource::for_canary(canary, prometheus)
            .map(|s| Box::new(s.sharing(reads)) as Box<dyn MetricsSource>)
            .map_err(|e| BackendError::Build {
                name: canary.name().to_string(),
                what: "the Prometheus metrics source",
                message: e.to_string(),
            }),
        (None, None) => Err(BackendError::NoSource(canary.name().to_string())),
    }
}

pub fn traffic_router(canary: &Canary) -> Result<Box<dyn TrafficRouter>, BackendError> {
    factory::build(canary, Mode::Standalone).map_err(|message| BackendError::Router {
        name: canary.name().to_string(),
        message,
    })
}
