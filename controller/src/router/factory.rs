//! The one place that names concrete routers: which router a spec asks for, built for the mode
//! it runs in, the route it steers, and the Kubernetes kinds that hold routes.
//!
//! Adding a router means one arm in each function below (and its file next to this one).

use super::envoy_rds::{self, EnvoyRdsRouter, EnvoyRdsSettings};
use super::gateway_api::{self, GatewayApiRouter, GatewayApiSettings, RouteKind};
use super::istio::{self, IstioRouter, IstioSettings};
use super::{DesiredRoutes, RouteKey, RouterError, TrafficRouter, Weights};
use fledge_core::spec::{Canary, CanarySpec, EnvoyRdsSpec};
use kube::core::ApiResource;
use kube::Client;
use serde_json::Value;

/// Where a router runs.
#[derive(Clone, Copy)]
pub enum Mode<'a> {
    /// `fledge run`: routes in files and proxies on this machine.
    Standalone,
    /// `fledge controller`: routes in Kubernetes objects of `namespace` (the Canary's).
    Kubernetes {
        client: &'a Client,
        namespace: &'a str,
    },
}

/// The router `canary.spec.router` names, for `mode`; the error says what to write instead.
pub fn build(canary: &Canary, mode: Mode<'_>) -> Result<Box<dyn TrafficRouter>, String> {
    let router = &canary.spec.router;
    match mode {
        Mode::Standalone => match &router.envoy_rds {
            Some(rds) => EnvoyRdsRouter::new(rds_settings(rds))
            .map(|r| Box::new(r) as Box<dyn TrafficRouter>)
            .map_err(|e| format!("cannot build the Envoy RDS router: {e}")),
            None if router.istio.is_some() => Err(
                "spec.router.istio moves an Istio VirtualService and runs in Kubernetes mode (`fledge controller`); standalone `fledge run` needs `spec.router.envoyRds`".to_string(),
            ),
            None if router.gateway_api.is_some() => Err(
                "spec.router.gatewayApi moves a Gateway API route and runs in Kubernetes mode (`fledge controller`); standalone `fledge run` needs `spec.router.envoyRds`".to_string(),
            ),
            None => Err("spec.router names no router; add `envoyRds: {...}`".to_string()),
        },
        Mode::Kubernetes { client, namespace } => {
            if let Some(settings) = IstioSettings::from_spec(&canary.spec, namespace) {
                return Ok(Box::new(IstioRouter::new(client.clone(), settings)));
            }
            if let Some(settings) = GatewayApiSettings::from_spec(&canary.spec, namespace) {
                return Ok(Box::new(GatewayApiRouter::new(client.clone(), settings)));
            }
            Err("spec.router has no Kubernetes router; in Kubernetes mode write `router: {istio: {virtualService: ..., route: ...}}` or `router: {gatewayApi: {httpRoute: ..., rule: ..., stableBackend: {name: ...}, canaryBackend: {name: ...}}}` (envoyRds is for `fledge run`)".to_string())
        }
    }
}

/// The route `spec` steers when its Canary lives in `namespace` (Kubernetes routers), from
/// the spec alone: to find two Canaries steering one route without building their routers.
pub fn route_key(spec: &CanarySpec, namespace: &str) -> Option<RouteKey> {
    // Called for every Canary of a namespace on every reconcile: read the spec, build nothing.
    if let Some(istio) = &spec.router.istio {
        return Some(istio::route_key(istio, namespace));
    }
    if let Some(gateway) = &spec.router.gateway_api {
        return gateway_api::route_key(gateway, namespace);
    }
    let rds = spec.router.envoy_rds.as_ref()?;
    Some(envoy_rds::route_key(&rds_settings(rds)))
}

/// The Kubernetes kinds whose objects hold routes: `fledge controller` watches each and
/// re-checks the Canaries whose [`route_key`] names a changed object.
pub fn route_kinds() -> Vec<ApiResource> {
    vec![
        istio::virtual_service_resource(),
        RouteKind::Http.resource(),
        RouteKind::Grpc.resource(),
    ]
}

/// The weights `spec`'s router would read from `object` (a route object of a Kubernetes
/// router, as JSON), without a cluster: for checking examples and test fixtures.
pub fn weights_in(
    spec: &CanarySpec,
    namespace: &str,
    object: &Value,
) -> Result<Weights, RouterError> {
    if let Some(settings) = IstioSettings::from_spec(spec, namespace) {
        return Ok(istio::read_routes(object, &settings)?.weights);
    }
    if let Some(settings) = GatewayApiSettings::from_spec(spec, namespace) {
        return gateway_api::read_weights(object, &settings);
    }
    Err(RouterError::Invalid(
        "spec.router names no Kubernetes router".to_string(),
    ))
}

/// Whether `object` — a route object of `spec`'s Kubernetes router, as a watch delivered it —
/// already serves `desired` (weights and managed routes): then the router has nothing to write
/// and nothing to read back, and `fledge controller` skips the API call.
pub fn serves(
    spec: &CanarySpec,
    namespace: &str,
    object: &Value,
    desired: &DesiredRoutes,
) -> Result<bool, RouterError> {
    match IstioSettings::from_spec(spec, namespace) {
        Some(settings) => Ok(istio::plan_patch(object, &settings, desired)?.is_none()),
        None => Err(RouterError::Invalid(
            "spec.router names no Kubernetes router".to_string(),
        )),
    }
}

fn rds_settings(rds: &EnvoyRdsSpec) -> EnvoyRdsSettings {
    EnvoyRdsSettings {
        path: rds.path.clone().into(),
        route_configuration: rds.route_configuration.clone(),
        virtual_host: rds.virtual_host.clone(),
        route: rds.route.clone(),
        stable_cluster: rds.stable_cluster.clone(),
        canary_cluster: rds.canary_cluster.clone(),
        admin_url: rds.admin_url.clone(),
        verify_timeout: rds.verify_timeout.0,
    }
}
