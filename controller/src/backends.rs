//! Building the metrics source and traffic router a Canary spec names. This is the only place
//! that knows every backend; adding one means a new file plus one arm here.

use crate::metrics::envoy_admin::EnvoyAdminSource;
use crate::metrics::envoy_cluster_stats::ClusterStats;
use crate::metrics::prometheus::PrometheusSource;
use crate::metrics::{MetricsSource, SubsetSelector};
use crate::router::envoy_rds::{EnvoyRdsRouter, EnvoyRdsSettings};
use crate::router::TrafficRouter;
use fledge_core::spec::Canary;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("Canary {0:?}: spec.metricsSource names no source; add `envoyAdmin: {{urls: [...]}}`, `prometheus: {{address: ...}}` or `envoyClusterStats: {{urls: [...], stableCluster: ..., canaryCluster: ...}}`")]
    NoSource(String),
    #[error("Canary {0:?}: spec.router names no router; add `envoyRds: {{...}}`")]
    NoRouter(String),
    #[error("Canary {0:?}: spec.router.istio moves an Istio VirtualService and runs in Kubernetes mode (`fledge controller`); standalone `fledge run` needs `spec.router.envoyRds`")]
    IstioNeedsKubernetes(String),
    #[error("Canary {name:?}: cannot build {what}: {message}")]
    Build {
        name: String,
        what: &'static str,
        message: String,
    },
}

pub fn metrics_source(canary: &Canary) -> Result<Box<dyn MetricsSource>, BackendError> {
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
        .map(|s| Box::new(s) as Box<dyn MetricsSource>)
        .map_err(|e| BackendError::Build {
            name: canary.name().to_string(),
            what: "the Envoy cluster stats metrics source",
            message: e.to_string(),
        });
    }
    match (&sources.envoy_admin, &sources.prometheus) {
        (Some(admin), _) => EnvoyAdminSource::new(admin.urls.clone(), selector, admin.timeout.0)
            .map(|s| Box::new(s) as Box<dyn MetricsSource>)
            .map_err(|e| BackendError::Build {
                name: canary.name().to_string(),
                what: "the Envoy admin metrics source",
                message: e.to_string(),
            }),
        (None, Some(prometheus)) => PrometheusSource::for_canary(canary, prometheus)
            .map(|s| Box::new(s) as Box<dyn MetricsSource>)
            .map_err(|e| BackendError::Build {
                name: canary.name().to_string(),
                what: "the Prometheus metrics source",
                message: e.to_string(),
            }),
        (None, None) => Err(BackendError::NoSource(canary.name().to_string())),
    }
}

pub fn traffic_router(canary: &Canary) -> Result<Box<dyn TrafficRouter>, BackendError> {
    match &canary.spec.router.envoy_rds {
        Some(rds) => EnvoyRdsRouter::new(EnvoyRdsSettings {
            path: rds.path.clone().into(),
            route_configuration: rds.route_configuration.clone(),
            virtual_host: rds.virtual_host.clone(),
            route: rds.route.clone(),
            stable_cluster: rds.stable_cluster.clone(),
            canary_cluster: rds.canary_cluster.clone(),
            admin_url: rds.admin_url.clone(),
            verify_timeout: rds.verify_timeout.0,
        })
        .map(|r| Box::new(r) as Box<dyn TrafficRouter>)
        .map_err(|e| BackendError::Build {
            name: canary.name().to_string(),
            what: "the Envoy RDS router",
            message: e.to_string(),
        }),
        None if canary.spec.router.istio.is_some() => Err(BackendError::IstioNeedsKubernetes(
            canary.name().to_string(),
        )),
        None => Err(BackendError::NoRouter(canary.name().to_string())),
    }
}
