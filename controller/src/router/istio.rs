//! The Istio router: shifts traffic by changing the weights of two destinations of one HTTP
//! route in the user's own VirtualService — and nothing else, so GitOps and Fledge don't fight
//! over the rest of the object.
//!
//! ```text
//!  GET VirtualService (DynamicObject: unknown fields survive)
//!     │ plan_patch(vs, settings, desired)            pure: finds spec.http[name == route], its
//!     │                                              stable/canary destinations (by subset or
//!     ▼                                              host), computes JSON Patch ops
//!  nothing to change? ──yes──▶ done (no write)
//!     │ no
//!  check the DestinationRule defines the subsets (subset mode)
//!  PATCH application/json-patch+json:  test name/destination/current weight, then add weight
//!     │ 422/409 (a `test` failed: someone changed those fields) ──▶ re-read and re-plan (bounded)
//!     ▼
//!  read back: plan must now be empty (verification)
//! ```
//!
//! While a rollout runs it can also keep a testers-first route (requests with given headers
//! always reach the canary) just before the weighted route, and mirror a percentage of the
//! route's traffic to the canary; both are removed when the rollout ends or the Canary is
//! deleted. Every write is guarded by JSON Patch `test` operations on exactly the values it
//! replaces, so a concurrent edit of any other field is preserved, and a concurrent edit of
//! these fields makes the write fail and be recomputed instead of being overwritten blindly.

use crate::router::{
    DesiredRoutes, Ensured, RouteKey, RouteObject, RouterError, TrafficRouter, Weights,
};
use async_trait::async_trait;
use fledge_core::router_spec::{HeaderMatcher, TesterCondition};
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::Client;
use serde_json::{json, Map, Value};

/// Istio's VirtualService API (served as `v1` since Istio 1.22).
pub fn virtual_service_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("networking.istio.io", "v1", "VirtualService"),
        "virtualservices",
    )
}

/// Istio's DestinationRule API.
pub fn destination_rule_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("networking.istio.io", "v1", "DestinationRule"),
        "destinationrules",
    )
}

/// Field manager recorded by the API server for Fledge's writes.
pub const FIELD_MANAGER: &str = "fledge";

/// How a destination of the weighted route is recognised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DestinationMatch {
    /// `destination.subset` (a DestinationRule subset), e.g. `stable`.
    Subset(String),
    /// `destination.host` (two-Service setups); a short name matches its FQDN.
    Host(String),
}

impl DestinationMatch {
    fn matches(&self, destination: &Value) -> bool {
        match self {
            DestinationMatch::Subset(subset) => {
                destination.get("subset").and_then(Value::as_str) == Some(subset.as_str())
            }
            DestinationMatch::Host(host) => destination
                .get("host")
                .and_then(Value::as_str)
                .is_some_and(|h| hosts_match(h, host)),
        }
    }

    fn describe(&self) -> String {
        match self {
            DestinationMatch::Subset(subset) => format!("subset {subset:?}"),
            DestinationMatch::Host(host) => format!("host {host:?}"),
        }
    }
}

/// `app` matches `app.shop.svc.cluster.local` and vice versa.
fn hosts_match(a: &str, b: &str) -> bool {
    a == b
        || a.strip_prefix(b).is_some_and(|rest| rest.starts_with('.'))
        || b.strip_prefix(a).is_some_and(|rest| rest.starts_with('.'))
}

/// A route Fledge inserts before the weighted route while a rollout runs: the testers route
/// (to the canary) or the guard route (to stable).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderRoute {
    pub name: String,
    /// What a request must carry (ANDed with each of the weighted route's matches).
    pub conditions: Vec<TesterCondition>,
}

/// Everything the router needs to know about one canary's routes.
#[derive(Debug, Clone, PartialEq)]
pub struct IstioSettings {
    pub namespace: String,
    pub virtual_service: String,
    pub route: String,
    pub stable: DestinationMatch,
    pub canary: DestinationMatch,
    pub destination_rule: Option<String>,
    pub header_route: Option<HeaderRoute>,
    /// With `analysis.guard`: requests the filter's guard marks (`x-fledge-guard` naming the
    /// service) go to stable.
    pub guard_route: Option<HeaderRoute>,
    pub mirror_percentage: Option<f64>,
}

impl IstioSettings {
    /// The settings a Canary's `spec.router.istio` describes, in `namespace`; `None` if the
    /// spec uses another router.
    pub fn from_spec(spec: &fledge_core::spec::CanarySpec, namespace: &str) -> Option<Self> {
        let istio = spec.router.istio.as_ref()?;
        let (stable, canary) = match (&istio.stable_host, &istio.canary_host) {
            (Some(stable), Some(canary)) => (
                DestinationMatch::Host(stable.clone()),
                DestinationMatch::Host(canary.clone()),
            ),
            _ => (
                DestinationMatch::Subset(spec.stable.subset.clone()),
                DestinationMatch::Subset(spec.canary.subset.clone()),
            ),
        };
        Some(IstioSettings {
            namespace: namespace.to_string(),
            virtual_service: istio.virtual_service.clone(),
            route: istio.route.clone(),
            stable,
            canary,
            destination_rule: istio.destination_rule.clone(),
            header_route: istio
                .header_route
                .as_ref()
                .zip(istio.header_route_name())
                .map(|(h, name)| HeaderRoute {
                    name,
                    conditions: h.conditions(),
                }),
            guard_route: spec.analysis.guard.as_ref().map(|_| HeaderRoute {
                name: format!("{}-fledge-guard", istio.route),
                conditions: vec![TesterCondition {
                    header: fledge_core::contract::DEFAULT_GUARD_HEADER.to_string(),
                    matcher: HeaderMatcher::Regex(fledge_core::filter_config::Guard::route_regex(
                        &spec.service,
                    )),
                }],
            }),
            mirror_percentage: istio.mirror_percentage,
        })
    }

    fn vs_name(&self) -> String {
        format!("{}/{}", self.namespace, self.virtual_service)
    }

    /// The route these settings steer.
    pub fn route_key(&self) -> RouteKey {
        key(&self.namespace, &self.virtual_service, &self.route)
    }
}

fn key(namespace: &str, virtual_service: &str, route: &str) -> RouteKey {
    RouteKey {
        object: RouteObject {
            kind: "VirtualService",
            namespace: namespace.to_string(),
            name: virtual_service.to_string(),
        },
        route: route.to_string(),
    }
}

/// The route `spec.router.istio` steers in `namespace`.
pub fn route_key(spec: &fledge_core::spec::IstioRouterSpec, namespace: &str) -> RouteKey {
    key(namespace, &spec.virtual_service, &spec.route)
}

/// What the weighted route currently looks like.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RouteState {
    pub weights: Weights,
    pub header_route_present: bool,
    pub guard_route_present: bool,
    pub mirror_present: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum IstioError {
    #[error("{0}")]
    NotFound(String),
    #[error("VirtualService {vs}: {problem}; {fix}")]
    Invalid {
        vs: String,
        problem: String,
        fix: String,
    },
    #[error("DestinationRule check failed: {0}")]
    DestinationRule(String),
    #[error("Kubernetes API error on {what}: {source}")]
    Api {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("VirtualService {vs}: the routes still differ from the wanted ones after {attempts} writes (last problem: {last}); is another controller or a webhook changing them?")]
    NotConverged {
        vs: String,
        attempts: u32,
        last: String,
    },
}

impl From<IstioError> for RouterError {
    fn from(error: IstioError) -> Self {
        match error {
            IstioError::NotFound(message) => RouterError::NotFound(message),
            invalid @ IstioError::Invalid { .. } => RouterError::Invalid(invalid.to_string()),
            unready @ IstioError::DestinationRule(_) => RouterError::Unready(unready.to_string()),
            IstioError::Api { what, source } => RouterError::Api { what, source },
            other @ IstioError::NotConverged { .. } => RouterError::NotConverged(other.to_string()),
        }
    }
}

/// Where the weighted route and its destinations are in a VirtualService.
struct Located<'a> {
    index: usize,
    route: &'a Value,
    destinations: &'a [Value],
    stable: usize,
    canary: usize,
}

fn invalid(settings: &IstioSettings, problem: String, fix: String) -> IstioError {
    IstioError::Invalid {
        vs: settings.vs_name(),
        problem,
        fix,
    }
}

fn locate<'a>(vs: &'a Value, settings: &IstioSettings) -> Result<Located<'a>, IstioError> {
    let http = vs
        .pointer("/spec/http")
        .and_then(Value::as_array)
        .ok_or_else(|| {
            invalid(
                settings,
                "has no spec.http routes".into(),
                format!(
                    "add an HTTP route named {:?} with the stable and canary destinations",
                    settings.route
                ),
            )
        })?;
    let index = http
        .iter()
        .position(|r| r.get("name").and_then(Value::as_str) == Some(settings.route.as_str()))
        .ok_or_else(|| {
            invalid(
                settings,
                format!("has no HTTP route named {:?}", settings.route),
                format!(
                    "name the weighted route (`http: [{{name: {}, route: [...]}}]`) or fix spec.router.istio.route",
                    settings.route
                ),
            )
        })?;
    let route = &http[index];
    let destinations = route
        .get("route")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let find = |which: &str, matcher: &DestinationMatch| -> Result<usize, IstioError> {
        let found: Vec<usize> = destinations
            .iter()
            .enumerate()
            .filter(|(_, d)| d.get("destination").is_some_and(|d| matcher.matches(d)))
            .map(|(i, _)| i)
            .collect();
        match found.as_slice() {
            [one] => Ok(*one),
            [] => Err(invalid(
                settings,
                format!(
                    "route {:?} has no {which} destination with {}",
                    settings.route,
                    matcher.describe()
                ),
                format!(
                    "add `{{destination: {{host: ..., {}}}, weight: ...}}` to its `route` list",
                    match matcher {
                        DestinationMatch::Subset(s) => format!("subset: {s}"),
                        DestinationMatch::Host(h) => format!("host: {h}"),
                    }
                ),
            )),
            _ => Err(invalid(
                settings,
                format!(
                    "route {:?} has {} destinations with {}",
                    settings.route,
                    found.len(),
                    matcher.describe()
                ),
                "keep exactly one stable and one canary destination".into(),
            )),
        }
    };
    let stable = find("stable", &settings.stable)?;
    let canary = find("canary", &settings.canary)?;
    if stable == canary || destinations.len() != 2 {
        return Err(invalid(
            settings,
            format!(
                "route {:?} has {} destinations",
                settings.route,
                destinations.len()
            ),
            "Fledge weighs exactly two destinations, stable and canary; move others to their own route".into(),
        ));
    }
    Ok(Located {
        index,
        route,
        destinations,
        stable,
        canary,
    })
}

fn weight_of(destination: &Value) -> u32 {
    destination
        .get("weight")
        .and_then(Value::as_u64)
        .and_then(|w| u32::try_from(w).ok())
        .unwrap_or(0)
}

fn header_route_index(vs: &Value, name: &str) -> Option<usize> {
    vs.pointer("/spec/http")?
        .as_array()?
        .iter()
        .position(|r| r.get("name").and_then(Value::as_str) == Some(name))
}

/// The current weights and extras of the weighted route.
pub fn read_routes(vs: &Value, settings: &IstioSettings) -> Result<RouteState, IstioError> {
    let located = locate(vs, settings)?;
    let canary_destination = located.destinations[located.canary].get("destination");
    Ok(RouteState {
        weights: Weights {
            stable: weight_of(&located.destinations[located.stable]),
            canary: weight_of(&located.destinations[located.canary]),
        },
        header_route_present: settings
            .header_route
            .as_ref()
            .is_some_and(|h| header_route_index(vs, &h.name).is_some()),
        guard_route_present: settings
            .guard_route
            .as_ref()
            .is_some_and(|h| header_route_index(vs, &h.name).is_some()),
        mirror_present: settings.mirror_percentage.is_some()
            && located.route.get("mirror").is_some()
            && located.route.get("mirror") == canary_destination,
    })
}

/// An Istio `StringMatch` for one condition.
fn string_match(matcher: &HeaderMatcher) -> Value {
    match matcher {
        HeaderMatcher::Exact(value) => json!({"exact": value}),
        HeaderMatcher::Prefix(prefix) => json!({"prefix": prefix}),
        HeaderMatcher::Regex(regex) => json!({"regex": regex}),
    }
}

/// One of the weighted route's destinations as the only one of an inserted route: its
/// `destination` and its own `headers` (e.g. a response header naming the subset), no weight.
fn unweighted(route_destination: &Value) -> Value {
    let mut copy = route_destination.as_object().cloned().unwrap_or_default();
    copy.remove("weight");
    Value::Object(copy)
}

/// A route Fledge inserts for the weighted route `route`: a copy of it (so rewrites, timeouts
/// and retries match) whose every match also requires `header_route`'s conditions, sending
/// everything to `route_destination` (a destination with its headers, no weight).
fn desired_header_route(
    header_route: &HeaderRoute,
    route: &Value,
    route_destination: &Value,
) -> Value {
    let mut copy = route.as_object().cloned().unwrap_or_default();
    for owned_elsewhere in [
        "name",
        "match",
        "route",
        "mirror",
        "mirrorPercentage",
        "mirror_percent",
        "mirrors",
    ] {
        copy.remove(owned_elsewhere);
    }
    let header_matches: Map<String, Value> = header_route
        .conditions
        .iter()
        .map(|c| (c.header.clone(), string_match(&c.matcher)))
        .collect();
    let matches: Vec<Value> = match route.get("match").and_then(Value::as_array) {
        Some(existing) if !existing.is_empty() => existing
            .iter()
            .map(|m| {
                let mut m = m.as_object().cloned().unwrap_or_default();
                let mut headers = m
                    .get("headers")
                    .and_then(Value::as_object)
                    .cloned()
                    .unwrap_or_default();
                headers.extend(header_matches.clone());
                m.insert("headers".into(), Value::Object(headers));
                Value::Object(m)
            })
            .collect(),
        _ => vec![json!({"headers": header_matches})],
    };
    copy.insert("name".into(), json!(header_route.name));
    copy.insert("match".into(), Value::Array(matches));
    copy.insert("route".into(), json!([route_destination]));
    Value::Object(copy)
}

fn test(path: String, value: Value) -> Value {
    json!({"op": "test", "path": path, "value": value})
}

/// The JSON Patch operations that make `vs` match `desired`, or `None` when it already does.
/// Every replaced value is first `test`ed, so the patch fails (422) if it changed meanwhile.
pub fn plan_patch(
    vs: &Value,
    settings: &IstioSettings,
    desired: &DesiredRoutes,
) -> Result<Option<Vec<Value>>, IstioError> {
    let located = locate(vs, settings)?;
    let i = located.index;
    let route_path = format!("/spec/http/{i}");
    let mut ops = Vec::new();
    for (j, want) in [
        (located.stable, desired.weights.stable),
        (located.canary, desired.weights.canary),
    ] {
        let destination = &located.destinations[j];
        let current = destination.get("weight").cloned().unwrap_or(Value::Null);
        if current.as_u64() != Some(u64::from(want)) {
            let path = format!("{route_path}/route/{j}");
            ops.push(test(
                format!("{path}/destination"),
                destination
                    .get("destination")
                    .cloned()
                    .unwrap_or(Value::Null),
            ));
            ops.push(test(format!("{path}/weight"), current));
            ops.push(json!({"op": "add", "path": format!("{path}/weight"), "value": want}));
        }
    }
    let canary_destination = located.destinations[located.canary]
        .get("destination")
        .cloned()
        .unwrap_or(Value::Null);

    if let Some(percentage) = settings.mirror_percentage {
        let active = desired.mirror;
        let current_mirror = located.route.get("mirror").cloned().unwrap_or(Value::Null);
        let current_percentage = located
            .route
            .get("mirrorPercentage")
            .cloned()
            .unwrap_or(Value::Null);
        let ours = current_mirror == canary_destination;
        let wanted_percentage = json!({"value": percentage});
        // Compared as numbers: the API server may write 10.0 back as 10.
        let percentage_is_set = current_percentage
            .get("value")
            .and_then(Value::as_f64)
            .is_some_and(|v| (v - percentage).abs() < 1e-9);
        if active && (!ours || !percentage_is_set) {
            if !current_mirror.is_null() && !ours {
                return Err(invalid(
                    settings,
                    format!(
                        "route {:?} already mirrors to {current_mirror}",
                        settings.route
                    ),
                    "remove that mirror, or drop spec.router.istio.mirrorPercentage".into(),
                ));
            }
            ops.push(test(format!("{route_path}/mirror"), current_mirror));
            ops.push(test(
                format!("{route_path}/mirrorPercentage"),
                current_percentage,
            ));
            ops.push(json!({"op": "add", "path": format!("{route_path}/mirror"), "value": canary_destination}));
            ops.push(json!({"op": "add", "path": format!("{route_path}/mirrorPercentage"), "value": wanted_percentage}));
        } else if !active && ours {
            ops.push(test(format!("{route_path}/mirror"), current_mirror));
            ops.push(json!({"op": "remove", "path": format!("{route_path}/mirror")}));
            if !current_percentage.is_null() {
                ops.push(test(
                    format!("{route_path}/mirrorPercentage"),
                    current_percentage,
                ));
                ops.push(json!({"op": "remove", "path": format!("{route_path}/mirrorPercentage")}));
            }
        }
    }

    // Route insertions and removals shift indexes, so they come last.
    plan_header_routes(
        vs,
        settings,
        desired,
        &located,
        [
            &unweighted(&located.destinations[located.stable]),
            &unweighted(&located.destinations[located.canary]),
        ],
        &mut ops,
    )?;

    if ops.is_empty() {
        return Ok(None);
    }
    // Pin the route by name so an index that moved (a route inserted above) fails the patch.
    ops.insert(0, test(format!("{route_path}/name"), json!(settings.route)));
    ops.dedup();
    Ok(Some(ops))
}

/// The inserted routes as wanted: each wanted one present (as wanted) directly before the
/// weighted route, the guard route first (it must win over the testers route), and the others
/// absent. When they are not, every inserted route is removed and the wanted ones are inserted
/// again before the weighted route. `destinations` are the stable and the canary one.
fn plan_header_routes(
    vs: &Value,
    settings: &IstioSettings,
    desired: &DesiredRoutes,
    located: &Located<'_>,
    [stable, canary]: [&Value; 2],
    ops: &mut Vec<Value>,
) -> Result<(), IstioError> {
    let i = located.index;
    let http = vs
        .pointer("/spec/http")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let managed = [
        (&settings.guard_route, desired.guard, stable),
        (&settings.header_route, desired.testers, canary),
    ];
    let mut existing = Vec::new();
    let mut wanted = Vec::new();
    for (route, wanted_now, destination) in managed {
        let Some(route) = route else { continue };
        let index = header_route_index(vs, &route.name);
        if index == Some(i) {
            return Err(invalid(
                settings,
                format!(
                    "the inserted route name {:?} is the weighted route's name",
                    route.name
                ),
                "set spec.router.istio.headerRoute.name to another name".into(),
            ));
        }
        existing.extend(index);
        if wanted_now {
            wanted.push((
                index,
                desired_header_route(route, located.route, destination),
            ));
        }
    }
    // Only what Fledge decides is compared (the rest may be defaulted by the server).
    let same = |current: &Value, wanted: &Value| {
        ["match", "route"]
            .iter()
            .all(|k| current.get(k) == wanted.get(k))
    };
    let first = i.saturating_sub(wanted.len());
    let in_place = existing.len() == wanted.len()
        && wanted.iter().enumerate().all(|(k, (index, route))| {
            *index == Some(first + k) && http.get(first + k).is_some_and(|c| same(c, route))
        });
    if in_place {
        return Ok(());
    }
    existing.sort_unstable_by(|a, b| b.cmp(a));
    let removed_before = existing.iter().filter(|h| **h < i).count();
    for h in existing {
        let current = http.get(h).cloned().unwrap_or(Value::Null);
        ops.push(test(format!("/spec/http/{h}"), current));
        ops.push(json!({"op": "remove", "path": format!("/spec/http/{h}")}));
    }
    let insert_at = i - removed_before;
    for (k, (_, route)) in wanted.into_iter().enumerate() {
        ops.push(
            json!({"op": "add", "path": format!("/spec/http/{}", insert_at + k), "value": route}),
        );
    }
    Ok(())
}

/// The subsets a DestinationRule defines.
fn subset_names(destination_rule: &Value) -> Vec<String> {
    destination_rule
        .pointer("/spec/subsets")
        .and_then(Value::as_array)
        .map(|subsets| {
            subsets
                .iter()
                .filter_map(|s| s.get("name").and_then(Value::as_str).map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// A router for one canary's VirtualService.
pub struct IstioRouter {
    settings: IstioSettings,
    key: RouteKey,
    virtual_services: Api<DynamicObject>,
    destination_rules: Api<DynamicObject>,
    max_writes: u32,
}

impl IstioRouter {
    pub fn new(client: Client, settings: IstioSettings) -> Self {
        let virtual_services = Api::namespaced_with(
            client.clone(),
            &settings.namespace,
            &virtual_service_resource(),
        );
        let destination_rules =
            Api::namespaced_with(client, &settings.namespace, &destination_rule_resource());
        IstioRouter {
            key: settings.route_key(),
            settings,
            virtual_services,
            destination_rules,
            max_writes: 5,
        }
    }

    pub fn settings(&self) -> &IstioSettings {
        &self.settings
    }

    async fn read_virtual_service(&self) -> Result<Value, IstioError> {
        let name = &self.settings.virtual_service;
        match self.virtual_services.get_opt(name).await {
            Ok(Some(vs)) => serde_json::to_value(vs).map_err(|e| IstioError::Api {
                what: format!("VirtualService {}", self.settings.vs_name()),
                source: kube::Error::SerdeError(e),
            }),
            Ok(None) => Err(IstioError::NotFound(format!(
                "VirtualService {} not found; create it (with an HTTP route named {:?}) or fix spec.router.istio.virtualService",
                self.settings.vs_name(),
                self.settings.route
            ))),
            Err(source) => Err(IstioError::Api {
                what: format!("VirtualService {}", self.settings.vs_name()),
                source,
            }),
        }
    }

    /// The current weights and extras.
    pub async fn routes(&self) -> Result<RouteState, IstioError> {
        read_routes(&self.read_virtual_service().await?, &self.settings)
    }

    /// Subset mode: the DestinationRule for the route's host defines both subsets.
    async fn check_destination_rule(&self, vs: &Value) -> Result<(), IstioError> {
        let wanted: Vec<&str> = [&self.settings.stable, &self.settings.canary]
            .into_iter()
            .filter_map(|m| match m {
                DestinationMatch::Subset(s) => Some(s.as_str()),
                DestinationMatch::Host(_) => None,
            })
            .collect();
        if wanted.is_empty() {
            return Ok(());
        }
        let located = locate(vs, &self.settings)?;
        let host = located.destinations[located.stable]
            .pointer("/destination/host")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let api_error = |source| IstioError::Api {
            what: format!("DestinationRules in {}", self.settings.namespace),
            source,
        };
        let (described, defined): (String, Vec<String>) = match &self.settings.destination_rule {
            Some(name) => match self.destination_rules.get_opt(name).await.map_err(api_error)? {
                Some(rule) => (
                    format!("DestinationRule {}/{name}", self.settings.namespace),
                    subset_names(&serde_json::to_value(rule).unwrap_or_default()),
                ),
                None => {
                    return Err(IstioError::DestinationRule(format!(
                        "DestinationRule {}/{name} (spec.router.istio.destinationRule) not found; create it with subsets {}",
                        self.settings.namespace,
                        wanted.join(" and ")
                    )))
                }
            },
            None => {
                let rules = self
                    .destination_rules
                    .list(&ListParams::default())
                    .await
                    .map_err(api_error)?;
                let matching: Vec<Value> = rules
                    .items
                    .into_iter()
                    .filter_map(|r| serde_json::to_value(r).ok())
                    .filter(|r| {
                        r.pointer("/spec/host")
                            .and_then(Value::as_str)
                            .is_some_and(|h| hosts_match(h, &host))
                    })
                    .collect();
                if matching.is_empty() {
                    return Err(IstioError::DestinationRule(format!(
                        "no DestinationRule in namespace {} has host {host:?}; create one with subsets {}, or name it in spec.router.istio.destinationRule",
                        self.settings.namespace,
                        wanted.join(" and ")
                    )));
                }
                (
                    format!("the DestinationRules for host {host:?}"),
                    matching.iter().flat_map(subset_names).collect(),
                )
            }
        };
        let missing: Vec<&str> = wanted
            .into_iter()
            .filter(|w| !defined.iter().any(|d| d == w))
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(IstioError::DestinationRule(format!(
                "{described} define no subset {}; add `subsets: [{{name: {}, labels: {{...}}}}]`",
                missing.join(", "),
                missing[0]
            )))
        }
    }

    /// Make the VirtualService match `desired`: no write when it already does; otherwise a
    /// guarded JSON Patch, retried (re-read, re-planned) when a concurrent change makes a `test`
    /// fail, then verified by reading back.
    pub async fn ensure(&self, desired: &DesiredRoutes) -> Result<Ensured, IstioError> {
        let mut wrote = false;
        let mut first_read = None;
        let mut destination_rule_checked = false;
        let mut last_problem = String::new();
        let mut vs = self.read_virtual_service().await?;
        for _ in 0..=self.max_writes {
            let weights = read_routes(&vs, &self.settings)?.weights;
            let found = *first_read.get_or_insert(weights);
            let Some(ops) = plan_patch(&vs, &self.settings, desired)? else {
                return Ok(Ensured { found, wrote });
            };
            if wrote || !last_problem.is_empty() {
                tracing::debug!(vs = %self.settings.vs_name(), "routes changed since the last read; writing again");
            }
            if !destination_rule_checked {
                self.check_destination_rule(&vs).await?;
                destination_rule_checked = true;
            }
            let patch: json_patch::Patch =
                serde_json::from_value(Value::Array(ops)).map_err(|e| IstioError::Api {
                    what: "a JSON Patch".into(),
                    source: kube::Error::SerdeError(e),
                })?;
            let params = PatchParams {
                field_manager: Some(FIELD_MANAGER.to_string()),
                ..PatchParams::default()
            };
            match self
                .virtual_services
                .patch(
                    &self.settings.virtual_service,
                    &params,
                    &Patch::Json::<()>(patch),
                )
                .await
            {
                Ok(written) => {
                    wrote = true;
                    tracing::info!(vs = %self.settings.vs_name(), route = %self.settings.route, weights = ?desired.weights, "VirtualService updated");
                    // The object as stored after the patch: checked like a fresh read (and
                    // patched again if it does not serve `desired`), one GET fewer per step.
                    vs = serde_json::to_value(written).map_err(|e| IstioError::Api {
                        what: format!("VirtualService {}", self.settings.vs_name()),
                        source: kube::Error::SerdeError(e),
                    })?;
                }
                Err(kube::Error::Api(status)) if status.code == 409 || status.code == 422 => {
                    tracing::info!(vs = %self.settings.vs_name(), reason = %status.message, "VirtualService changed concurrently; re-reading");
                    last_problem = status.message.clone();
                    vs = self.read_virtual_service().await?;
                }
                Err(source) => {
                    return Err(IstioError::Api {
                        what: format!("VirtualService {}", self.settings.vs_name()),
                        source,
                    })
                }
            }
        }
        Err(IstioError::NotConverged {
            vs: self.settings.vs_name(),
            attempts: self.max_writes,
            last: if last_problem.is_empty() {
                "the written values did not read back".into()
            } else {
                last_problem
            },
        })
    }
}

/// Confirmation is the read-back in [`IstioRouter::ensure`]: Istio gives no per-proxy
/// confirmation through the Kubernetes API; istiod pushes the change to every gateway within
/// seconds.
#[async_trait]
impl TrafficRouter for IstioRouter {
    fn route(&self) -> &RouteKey {
        &self.key
    }

    async fn ensure(&self, desired: &DesiredRoutes) -> Result<Ensured, RouterError> {
        Ok(IstioRouter::ensure(self, desired).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn exact(header: &str, value: &str) -> Vec<TesterCondition> {
        vec![TesterCondition {
            header: header.into(),
            matcher: HeaderMatcher::Exact(value.into()),
        }]
    }

    pub(crate) fn settings() -> IstioSettings {
        IstioSettings {
            namespace: "shop".into(),
            virtual_service: "app".into(),
            route: "primary".into(),
            stable: DestinationMatch::Subset("stable".into()),
            canary: DestinationMatch::Subset("canary".into()),
            destination_rule: None,
            header_route: None,
            guard_route: None,
            mirror_percentage: None,
        }
    }

    fn vs() -> Value {
        json!({
            "apiVersion": "networking.istio.io/v1",
            "kind": "VirtualService",
            "metadata": {"name": "app", "namespace": "shop"},
            "spec": {
                "hosts": ["app.example.com"],
                "gateways": ["istio-system/public"],
                "http": [
                    {"name": "health", "match": [{"uri": {"exact": "/healthz"}}],
                     "route": [{"destination": {"host": "app", "subset": "stable"}}]},
                    {"name": "primary",
                     "match": [{"uri": {"prefix": "/"}}],
                     "timeout": "5s",
                     "route": [
                        {"destination": {"host": "app", "subset": "stable", "port": {"number": 80}}, "weight": 100},
                        {"destination": {"host": "app", "subset": "canary", "port": {"number": 80}}, "weight": 0}
                     ]}
                ]
            }
        })
    }

    /// Apply with Kubernetes' JSON Patch semantics (`test` of a missing path against null
    /// passes), as the fake API server does.
    fn apply(doc: &Value, ops: &[Value]) -> Value {
        let mut doc = doc.clone();
        fledge_testkit::fake_api::apply_json_patch(&mut doc, &Value::Array(ops.to_vec())).unwrap();
        doc
    }

    fn weights(canary: u8) -> DesiredRoutes {
        DesiredRoutes::during_rollout(Weights::canary_percent(canary))
    }

    #[test]
    fn reads_weights_by_subset_and_by_host() {
        let state = read_routes(&vs(), &settings()).unwrap();
        assert_eq!(state.weights, Weights::canary_percent(0));
        let mut doc = vs();
        doc["spec"]["http"][1]["route"] = json!([
            {"destination": {"host": "app-canary.shop.svc.cluster.local"}, "weight": 30},
            {"destination": {"host": "app-stable"}, "weight": 70}
        ]);
        let mut by_host = settings();
        by_host.stable = DestinationMatch::Host("app-stable".into());
        by_host.canary = DestinationMatch::Host("app-canary".into());
        assert_eq!(
            read_routes(&doc, &by_host).unwrap().weights,
            Weights::canary_percent(30)
        );
    }

    #[test]
    fn weight_patch_tests_exactly_what_it_replaces() {
        let ops = plan_patch(&vs(), &settings(), &weights(20))
            .unwrap()
            .unwrap();
        assert_eq!(
            ops,
            vec![
                json!({"op": "test", "path": "/spec/http/1/name", "value": "primary"}),
                json!({"op": "test", "path": "/spec/http/1/route/0/destination", "value": {"host": "app", "subset": "stable", "port": {"number": 80}}}),
                json!({"op": "test", "path": "/spec/http/1/route/0/weight", "value": 100}),
                json!({"op": "add", "path": "/spec/http/1/route/0/weight", "value": 80}),
                json!({"op": "test", "path": "/spec/http/1/route/1/destination", "value": {"host": "app", "subset": "canary", "port": {"number": 80}}}),
                json!({"op": "test", "path": "/spec/http/1/route/1/weight", "value": 0}),
                json!({"op": "add", "path": "/spec/http/1/route/1/weight", "value": 20}),
            ]
        );
        let after = apply(&vs(), &ops);
        assert_eq!(
            read_routes(&after, &settings()).unwrap().weights,
            Weights::canary_percent(20)
        );
        // Only the weights changed.
        let mut expected = vs();
        expected["spec"]["http"][1]["route"][0]["weight"] = json!(80);
        expected["spec"]["http"][1]["route"][1]["weight"] = json!(20);
        assert_eq!(after, expected);
        // And now there is nothing to do.
        assert_eq!(plan_patch(&after, &settings(), &weights(20)).unwrap(), None);
    }

    #[test]
    fn missing_weights_are_tested_as_null_and_added() {
        let mut doc = vs();
        doc["spec"]["http"][1]["route"][1]
            .as_object_mut()
            .unwrap()
            .remove("weight");
        let ops = plan_patch(&doc, &settings(), &weights(0)).unwrap().unwrap();
        assert!(ops.contains(
            &json!({"op": "test", "path": "/spec/http/1/route/1/weight", "value": null})
        ));
        assert!(
            ops.contains(&json!({"op": "add", "path": "/spec/http/1/route/1/weight", "value": 0}))
        );
    }

    #[test]
    fn unusable_virtual_services_are_explained() {
        type Mutation = Box<dyn Fn(&mut Value)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (
                Box::new(|d| d["spec"]["http"][1]["name"] = json!("main")),
                "has no HTTP route named \"primary\"",
            ),
            (
                Box::new(|d| d["spec"].as_object_mut().unwrap().clear()),
                "has no spec.http routes",
            ),
            (
                Box::new(|d| {
                    d["spec"]["http"][1]["route"][1]["destination"]["subset"] = json!("v2")
                }),
                "no canary destination with subset \"canary\"",
            ),
            (
                Box::new(|d| {
                    let extra = json!({"destination": {"host": "other"}, "weight": 0});
                    d["spec"]["http"][1]["route"]
                        .as_array_mut()
                        .unwrap()
                        .push(extra);
                }),
                "has 3 destinations",
            ),
        ];
        for (mutate, expected) in cases {
            let mut doc = vs();
            mutate(&mut doc);
            let err = plan_patch(&doc, &settings(), &weights(10))
                .unwrap_err()
                .to_string();
            assert!(err.contains(expected), "{err}");
            assert!(err.starts_with("VirtualService shop/app: "), "{err}");
        }
    }

    #[test]
    fn header_route_is_inserted_before_the_route_with_its_matches_and_removed_after() {
        let mut s = settings();
        s.header_route = Some(HeaderRoute {
            name: "primary-canary-testers".into(),
            conditions: exact("stage", "canary"),
        });
        let ops = plan_patch(&vs(), &s, &weights(0)).unwrap().unwrap();
        let after = apply(&vs(), &ops);
        let http = after["spec"]["http"].as_array().unwrap();
        assert_eq!(http.len(), 3);
        assert_eq!(
            http[1],
            json!({
                "name": "primary-canary-testers",
                "match": [{"uri": {"prefix": "/"}, "headers": {"stage": {"exact": "canary"}}}],
                "timeout": "5s",
                "route": [{"destination": {"host": "app", "subset": "canary", "port": {"number": 80}}}]
            })
        );
        assert_eq!(http[2]["name"], "primary");
        assert!(read_routes(&after, &s).unwrap().header_route_present);
        assert_eq!(plan_patch(&after, &s, &weights(0)).unwrap(), None);
        // Rollout over: removed, and the VirtualService is as before.
        let done = DesiredRoutes::weights_only(Weights::canary_percent(0));
        let ops = plan_patch(&after, &s, &done).unwrap().unwrap();
        assert_eq!(apply(&after, &ops), vs());
    }

    #[test]
    fn inserted_routes_keep_their_destinations_own_headers() {
        // A response header naming the subset, set per destination by the operator (the lean
        // way to tag responses), must also be on the testers and guard routes.
        let mut doc = vs();
        for (i, subset) in [(0, "stable"), (1, "canary")] {
            doc["spec"]["http"][1]["route"][i]["headers"] =
                json!({"response": {"set": {"x-fledge-subset": subset}}});
        }
        let mut s = settings();
        s.header_route = Some(HeaderRoute {
            name: "testers".into(),
            conditions: exact("stage", "canary"),
        });
        let ops = plan_patch(&doc, &s, &weights(0)).unwrap().unwrap();
        let after = apply(&doc, &ops);
        assert_eq!(
            after["spec"]["http"][1]["route"],
            json!([{
                "destination": {"host": "app", "subset": "canary", "port": {"number": 80}},
                "headers": {"response": {"set": {"x-fledge-subset": "canary"}}}
            }])
        );
        assert_eq!(plan_patch(&after, &s, &weights(0)).unwrap(), None);
    }

    #[test]
    fn header_route_after_the_weighted_route_is_moved_before_it() {
        let mut s = settings();
        s.header_route = Some(HeaderRoute {
            name: "testers".into(),
            conditions: exact("stage", "canary"),
        });
        let mut doc = vs();
        let stray = json!({"name": "testers", "route": [{"destination": {"host": "app", "subset": "canary"}}]});
        doc["spec"]["http"].as_array_mut().unwrap().push(stray);
        let after = apply(&doc, &plan_patch(&doc, &s, &weights(0)).unwrap().unwrap());
        let names: Vec<&str> = after["spec"]["http"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["health", "testers", "primary"]);
    }

    #[test]
    fn testers_match_by_prefix_regex_and_cookie() {
        let spec: fledge_core::spec::HeaderRouteSpec = serde_yaml::from_str(
            "{headerMatches: [{name: x-team, prefix: qa-}, {name: user-agent, regex: '.*Firefox.*'}], cookie: {name: canary, value: always}}",
        )
        .unwrap();
        let mut s = settings();
        s.header_route = Some(HeaderRoute {
            name: "testers".into(),
            conditions: spec.conditions(),
        });
        let after = apply(&vs(), &plan_patch(&vs(), &s, &weights(0)).unwrap().unwrap());
        assert_eq!(
            after["spec"]["http"][1]["match"],
            json!([{"uri": {"prefix": "/"}, "headers": {
                "x-team": {"prefix": "qa-"},
                "user-agent": {"regex": ".*Firefox.*"},
                "cookie": {"regex": r"^(.*;\s*)?canary=always(;.*)?$"}
            }}])
        );
    }

    #[test]
    fn the_guard_route_goes_first_to_stable_while_the_rollout_runs() {
        let spec: fledge_core::spec::CanarySpec = serde_yaml::from_str(
            r#"
service: app
stable: {subset: stable}
canary: {subset: canary}
metricsSource: {envoyAdmin: {urls: ["http://127.0.0.1:15000"]}}
router: {istio: {virtualService: app, route: primary, headerRoute: {headers: {stage: canary}}}}
analysis: {stepWeights: [10], guard: {}}
"#,
        )
        .unwrap();
        let s = IstioSettings::from_spec(&spec, "shop").unwrap();
        let after = apply(
            &vs(),
            &plan_patch(&vs(), &s, &weights(10)).unwrap().unwrap(),
        );
        let http = after["spec"]["http"].as_array().unwrap();
        let names: Vec<&str> = http.iter().map(|r| r["name"].as_str().unwrap()).collect();
        assert_eq!(
            names,
            [
                "health",
                "primary-fledge-guard",
                "primary-canary-testers",
                "primary"
            ]
        );
        assert_eq!(
            http[1]["match"],
            json!([{"uri": {"prefix": "/"}, "headers": {"x-fledge-guard": {"regex": "(.*,)?app(,.*)?"}}}])
        );
        assert_eq!(
            http[1]["route"],
            json!([{"destination": {"host": "app", "subset": "stable", "port": {"number": 80}}}])
        );
        let state = read_routes(&after, &s).unwrap();
        assert!(state.guard_route_present && state.header_route_present);
        assert_eq!(plan_patch(&after, &s, &weights(10)).unwrap(), None);
        // Testers off, guard still on: only the testers route goes.
        let guard_only = DesiredRoutes {
            testers: false,
            ..weights(10)
        };
        let fewer = apply(
            &after,
            &plan_patch(&after, &s, &guard_only).unwrap().unwrap(),
        );
        assert_eq!(fewer["spec"]["http"].as_array().unwrap().len(), 3);
        assert_eq!(fewer["spec"]["http"][1]["name"], "primary-fledge-guard");
        // Finished: both removed, weights aside the VirtualService is as before.
        let done = DesiredRoutes::weights_only(Weights::canary_percent(0));
        assert_eq!(
            apply(&after, &plan_patch(&after, &s, &done).unwrap().unwrap()),
            vs()
        );
    }

    #[test]
    fn mirror_is_set_while_active_and_removed_after() {
        let mut s = settings();
        s.mirror_percentage = Some(10.0);
        let after = apply(&vs(), &plan_patch(&vs(), &s, &weights(0)).unwrap().unwrap());
        assert_eq!(
            after["spec"]["http"][1]["mirror"],
            json!({"host": "app", "subset": "canary", "port": {"number": 80}})
        );
        assert_eq!(
            after["spec"]["http"][1]["mirrorPercentage"],
            json!({"value": 10.0})
        );
        assert!(read_routes(&after, &s).unwrap().mirror_present);
        let done = DesiredRoutes::weights_only(Weights::canary_percent(0));
        assert_eq!(
            apply(&after, &plan_patch(&after, &s, &done).unwrap().unwrap()),
            vs()
        );
        // Someone else's mirror is never overwritten.
        let mut doc = vs();
        doc["spec"]["http"][1]["mirror"] = json!({"host": "shadow"});
        let err = plan_patch(&doc, &s, &weights(0)).unwrap_err().to_string();
        assert!(err.contains("already mirrors"), "{err}");
    }

    #[test]
    fn settings_from_spec() {
        let yaml = r#"
service: app
stable: {subset: stable}
canary: {subset: canary}
metricsSource: {envoyAdmin: {urls: ["http://127.0.0.1:15000"]}}
router:
  istio:
    virtualService: app
    route: primary
    headerRoute: {headers: {stage: canary}}
    mirrorPercentage: 5
analysis: {stepWeights: [10]}
"#;
        let spec: fledge_core::spec::CanarySpec = serde_yaml::from_str(yaml).unwrap();
        let s = IstioSettings::from_spec(&spec, "shop").unwrap();
        assert_eq!(s.stable, DestinationMatch::Subset("stable".into()));
        assert_eq!(s.header_route.unwrap().name, "primary-canary-testers");
        assert_eq!(s.mirror_percentage, Some(5.0));
        assert!(hosts_match("app", "app.shop.svc.cluster.local"));
        assert!(!hosts_match("app", "app2"));
    }

    #[test]
    fn istio_router_spec_errors_name_the_field_and_the_fix() {
        let valid = r#"
apiVersion: fledge.dev/v1alpha1
kind: Canary
metadata: {name: app, namespace: shop}
spec:
  service: app
  stable: {subset: stable}
  canary: {subset: canary}
  metricsSource: {envoyAdmin: {urls: ["http://127.0.0.1:15000"]}}
  router: {istio: {virtualService: app, route: primary}}
  analysis: {stepWeights: [10], compareWithStable: {}}
"#;
        let canary: fledge_core::spec::Canary = serde_yaml::from_str(valid).unwrap();
        assert_eq!(canary.validate(), Ok(()));
        type Mutate = fn(&mut fledge_core::spec::IstioRouterSpec);
        let cases: &[(Mutate, &str, &str)] = &[
            (
                |i| i.virtual_service = "App_1".into(),
                "spec.router.istio.virtualService",
                "write the name of the VirtualService",
            ),
            (
                |i| i.route = " ".into(),
                "spec.router.istio.route",
                "e.g. `route: primary`",
            ),
            (
                |i| i.stable_host = Some("app-stable".into()),
                "spec.router.istio.canaryHost",
                "set both",
            ),
            (
                |i| {
                    i.stable_host = Some("app".into());
                    i.canary_host = Some("app".into());
                },
                "spec.router.istio.canaryHost",
                "two different Services",
            ),
            (
                |i| i.destination_rule = Some("-x".into()),
                "spec.router.istio.destinationRule",
                "e.g. `destinationRule: app`",
            ),
            (
                |i| i.mirror_percentage = Some(0.0),
                "spec.router.istio.mirrorPercentage",
                "e.g. `mirrorPercentage: 10`",
            ),
            (
                |i| i.mirror_percentage = Some(150.0),
                "spec.router.istio.mirrorPercentage",
                "150 % is not a percentage from 0 to 100; write mirrorPercentage in percent, e.g. `mirrorPercentage: 10`",
            ),
            (
                |i| {
                    i.header_route = Some(fledge_core::spec::HeaderRouteSpec {
                        name: None,
                        headers: BTreeMap::new(),
                        header_matches: Vec::new(),
                        cookie: None,
                    })
                },
                "spec.router.istio.headerRoute.headers",
                "e.g. `headers: {stage: canary}`",
            ),
            (
                |i| {
                    i.header_route = Some(fledge_core::spec::HeaderRouteSpec {
                        name: None,
                        headers: BTreeMap::from([("Stage".to_string(), "canary".to_string())]),
                        header_matches: Vec::new(),
                        cookie: None,
                    })
                },
                "spec.router.istio.headerRoute.headers.Stage",
                "write `stage`",
            ),
            (
                |i| {
                    i.header_route = Some(fledge_core::spec::HeaderRouteSpec {
                        name: Some("primary".into()),
                        headers: BTreeMap::from([("stage".to_string(), "canary".to_string())]),
                        header_matches: Vec::new(),
                        cookie: None,
                    })
                },
                "spec.router.istio.headerRoute.name",
                "its own name",
            ),
        ];
        for (mutate, field, fix) in cases {
            let mut c = canary.clone();
            mutate(c.spec.router.istio.as_mut().unwrap());
            let errors = c.validate().unwrap_err();
            let error = errors
                .0
                .iter()
                .find(|e| e.field == *field)
                .unwrap_or_else(|| panic!("no error on {field}: {errors}"));
            assert!(error.to_string().contains(fix), "{error}");
        }
        let mut both = canary.clone();
        both.spec.router.envoy_rds = serde_yaml::from_str(
            "{path: /tmp/r.json, routeConfiguration: r, virtualHost: v, route: p, stableCluster: s, canaryCluster: c, adminUrl: 'http://127.0.0.1:9901'}",
        )
        .unwrap();
        let errors = both.validate().unwrap_err().to_string();
        assert!(
            errors.contains("spec.router: sets envoyRds and istio; keep exactly one"),
            "{errors}"
        );
        let mut neither = canary;
        neither.spec.router.istio = None;
        let errors = neither.validate().unwrap_err().to_string();
        assert!(
            errors.contains("add `istio: {virtualService: ..., route: ...}` or `gatewayApi: "),
            "{errors}"
        );
    }

    /// Through kube-rs against the fake API server, asserting the exact requests.
    mod against_api_server {
        use super::*;
        use fledge_testkit::fake_api::FakeApiServer;

        const GROUP: &str = "networking.istio.io";

        fn destination_rule(subsets: &[&str]) -> Value {
            json!({
                "apiVersion": "networking.istio.io/v1",
                "kind": "DestinationRule",
                "metadata": {"name": "app", "namespace": "shop"},
                "spec": {
                    "host": "app.shop.svc.cluster.local",
                    "subsets": subsets.iter().map(|s| json!({"name": s, "labels": {"version": s}})).collect::<Vec<_>>()
                }
            })
        }

        fn server() -> FakeApiServer {
            let server = FakeApiServer::new();
            server.create(GROUP, "virtualservices", vs());
            server.create(
                GROUP,
                "destinationrules",
                destination_rule(&["stable", "canary"]),
            );
            server
        }

        fn router(server: &FakeApiServer, settings: IstioSettings) -> IstioRouter {
            IstioRouter::new(server.client("fledge"), settings)
        }

        fn stored_vs(server: &FakeApiServer) -> Value {
            server.get(GROUP, "virtualservices", "shop", "app").unwrap()
        }

        fn lines(server: &FakeApiServer) -> Vec<String> {
            server
                .take_requests()
                .iter()
                .map(|r| format!("{} {}", r.line(), r.status))
                .collect()
        }

        const VS_PATH: &str = "/apis/networking.istio.io/v1/namespaces/shop/virtualservices/app";
        const DR_LIST: &str = "/apis/networking.istio.io/v1/namespaces/shop/destinationrules";

        #[tokio::test]
        async fn ensure_patches_only_the_weights_and_checks_the_object_it_gets_back() {
            let server = server();
            let before = stored_vs(&server);
            let ensured = router(&server, settings())
                .ensure(&weights(20))
                .await
                .unwrap();
            assert_eq!(
                ensured,
                Ensured {
                    found: Weights::canary_percent(0),
                    wrote: true
                }
            );
            assert_eq!(
                lines(&server),
                [
                    format!("GET {VS_PATH} 200"),
                    format!("GET {DR_LIST} 200"),
                    format!("PATCH {VS_PATH}?fieldManager=fledge 200"),
                ]
            );
            let after = stored_vs(&server);
            let mut expected = before.clone();
            expected["spec"]["http"][1]["route"][0]["weight"] = json!(80);
            expected["spec"]["http"][1]["route"][1]["weight"] = json!(20);
            assert_eq!(
                after["spec"], expected["spec"],
                "only the two weights changed"
            );
            assert_eq!(after["metadata"]["generation"], 2);
        }

        #[tokio::test]
        async fn ensure_skips_no_op_writes() {
            let server = server();
            let ensured = router(&server, settings())
                .ensure(&weights(0))
                .await
                .unwrap();
            assert!(!ensured.wrote);
            assert_eq!(lines(&server), [format!("GET {VS_PATH} 200")]);
        }

        #[tokio::test]
        async fn a_concurrent_edit_of_another_field_is_preserved() {
            let server = server();
            // Between our read and our write, GitOps changes the route's timeout and the hosts.
            server.before_next("PATCH", "virtualservices/app", |s| {
                s.edit(GROUP, "virtualservices", "shop", "app", |vs| {
                    vs["spec"]["http"][1]["timeout"] = json!("9s");
                    vs["spec"]["hosts"] = json!(["app.example.com", "app.example.org"]);
                })
            });
            router(&server, settings())
                .ensure(&weights(20))
                .await
                .unwrap();
            let after = stored_vs(&server);
            assert_eq!(after["spec"]["http"][1]["timeout"], "9s");
            assert_eq!(
                after["spec"]["hosts"],
                json!(["app.example.com", "app.example.org"])
            );
            assert_eq!(
                read_routes(&after, &settings()).unwrap().weights,
                Weights::canary_percent(20)
            );
            // The guarded patch did not need a retry: the edit touched nothing it tests.
            assert_eq!(lines(&server).len(), 3);
        }

        #[tokio::test]
        async fn a_concurrent_weight_edit_fails_the_test_and_is_retried_on_fresh_data() {
            let server = server();
            server.before_next("PATCH", "virtualservices/app", |s| {
                s.edit(GROUP, "virtualservices", "shop", "app", |vs| {
                    vs["spec"]["http"][1]["route"][0]["weight"] = json!(90);
                    vs["spec"]["http"][1]["route"][1]["weight"] = json!(10);
                })
            });
            router(&server, settings())
                .ensure(&weights(20))
                .await
                .unwrap();
            assert_eq!(
                lines(&server),
                [
                    format!("GET {VS_PATH} 200"),
                    format!("GET {DR_LIST} 200"),
                    format!("PATCH {VS_PATH}?fieldManager=fledge 422"),
                    format!("GET {VS_PATH} 200"),
                    format!("PATCH {VS_PATH}?fieldManager=fledge 200"),
                ]
            );
            let after = stored_vs(&server);
            assert_eq!(
                read_routes(&after, &settings()).unwrap().weights,
                Weights::canary_percent(20)
            );
        }

        #[tokio::test]
        async fn the_second_patch_tests_the_values_it_read_again() {
            let server = server();
            server.before_next("PATCH", "virtualservices/app", |s| {
                s.edit(GROUP, "virtualservices", "shop", "app", |vs| {
                    vs["spec"]["http"][1]["route"][1]["weight"] = json!(5);
                    vs["spec"]["http"][1]["route"][0]["weight"] = json!(95);
                })
            });
            router(&server, settings())
                .ensure(&weights(20))
                .await
                .unwrap();
            let patches: Vec<Value> = server
                .requests()
                .into_iter()
                .filter(|r| r.method == "PATCH")
                .map(|r| r.body.unwrap())
                .collect();
            assert_eq!(patches.len(), 2);
            assert!(patches[1].as_array().unwrap().contains(
                &json!({"op": "test", "path": "/spec/http/1/route/1/weight", "value": 5})
            ));
            assert!(server
                .requests()
                .iter()
                .all(|r| r.content_type.as_deref() != Some("application/merge-patch+json")));
        }

        #[tokio::test]
        async fn a_missing_subset_blocks_the_write() {
            let server = FakeApiServer::new();
            server.create(GROUP, "virtualservices", vs());
            server.create(GROUP, "destinationrules", destination_rule(&["stable"]));
            let err = router(&server, settings())
                .ensure(&weights(20))
                .await
                .unwrap_err()
                .to_string();
            assert!(err.contains("define no subset canary"), "{err}");
            assert!(
                server.requests().iter().all(|r| r.method == "GET"),
                "nothing written"
            );
            // A named DestinationRule is read directly.
            let mut named = settings();
            named.destination_rule = Some("other".into());
            server.take_requests();
            let err = router(&server, named)
                .ensure(&weights(20))
                .await
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(
                    "DestinationRule shop/other (spec.router.istio.destinationRule) not found"
                ),
                "{err}"
            );
            assert_eq!(
                lines(&server),
                [
                    format!("GET {VS_PATH} 200"),
                    "GET /apis/networking.istio.io/v1/namespaces/shop/destinationrules/other 404"
                        .to_string(),
                ]
            );
        }

        #[tokio::test]
        async fn unknown_fields_of_the_virtual_service_survive() {
            let server = FakeApiServer::new();
            let mut doc = vs();
            doc["spec"]["exportTo"] = json!(["."]);
            doc["spec"]["http"][1]["someFutureIstioField"] = json!({"x": 1});
            doc["metadata"]["annotations"] = json!({"argocd.argoproj.io/tracking-id": "shop:networking.istio.io/VirtualService:shop/app"});
            server.create(GROUP, "virtualservices", doc);
            server.create(
                GROUP,
                "destinationrules",
                destination_rule(&["stable", "canary"]),
            );
            router(&server, settings())
                .ensure(&weights(50))
                .await
                .unwrap();
            let after = stored_vs(&server);
            assert_eq!(after["spec"]["exportTo"], json!(["."]));
            assert_eq!(
                after["spec"]["http"][1]["someFutureIstioField"],
                json!({"x": 1})
            );
            assert!(after["metadata"]["annotations"]["argocd.argoproj.io/tracking-id"].is_string());
        }

        #[tokio::test]
        async fn the_traffic_router_trait_sets_and_confirms_and_names_the_route() {
            let server = server();
            let router = router(&server, settings());
            let router: &dyn TrafficRouter = &router;
            assert_eq!(
                router.route().to_string(),
                "VirtualService shop/app route \"primary\""
            );
            let ensured = router
                .ensure(&DesiredRoutes::during_rollout(Weights::canary_percent(30)))
                .await
                .unwrap();
            assert_eq!(ensured.found, Weights::canary_percent(0));
            assert_eq!(
                read_routes(&stored_vs(&server), &settings())
                    .unwrap()
                    .weights,
                Weights::canary_percent(30)
            );
            server.delete(GROUP, "virtualservices", "shop", "app");
            let err = router
                .ensure(&DesiredRoutes::weights_only(Weights::canary_percent(0)))
                .await
                .unwrap_err();
            assert!(err.nothing_to_restore(), "{err}");
            assert!(matches!(err, RouterError::NotFound(_)), "{err}");
        }
    }
}
