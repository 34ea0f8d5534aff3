//! The Gateway API router: shifts traffic by changing the weights of the stable and canary
//! backendRefs of one rule in the user's own HTTPRoute (or GRPCRoute) — and, while a rollout
//! runs, adds the rules and filter it manages — leaving everything else as it is.
//!
//! ```text
//!  GET route (DynamicObject: unknown fields survive)
//!     │ plan_patch(route, settings, desired)   pure: finds spec.rules[rule], its two backendRefs,
//!     │                                        the managed rules and mirror filter; JSON Patch ops
//!     ▼
//!  nothing to change? ──no──▶ PATCH application/json-patch+json (each replaced value `test`ed)
//!     │ yes                      │ 409/422 (someone changed those fields) ──▶ re-read, re-plan
//!     ▼                          ▼ (bounded)
//!  status.parents: Accepted and ResolvedRefs True for this generation, on every parent?
//!     │ yes ──▶ done        not yet ──▶ re-read every 250 ms, up to 3 s, then "not accepted"
//! ```
//!
//! Managed while a rollout runs, removed when it ends or the Canary is deleted:
//! - **testers rule** `<rule>-canary-testers`: the weighted rule's matches, each with the
//!   testers' header conditions added (Exact or RegularExpression; a prefix becomes a regex),
//!   to the canary backend. More header matches than the weighted rule, so it takes precedence;
//! - **guard rule** `<rule>-fledge-guard` (with `analysis.guard`): the same, matching the
//!   filter's `x-fledge-guard` header against the service, to the stable backend; listed before
//!   the testers rule, so it wins their ties;
//! - **mirror**: a `RequestMirror` filter to the canary backend on the weighted rule.
//!
//! The added rules are appended to `spec.rules` (an index named in `rule` keeps pointing at the
//! same rule) and found again by `name` (Gateway API v1.2+; older CRDs drop rule names, which
//! is reported). The user's filters, timeouts and other rules are kept; the added rules copy
//! the weighted rule's filters (other than the mirror), timeouts and retries.

use crate::router::{
    DesiredRoutes, Ensured, RouteKey, RouteObject, RouterError, TrafficRouter, Weights,
};
use async_trait::async_trait;
use fledge_core::router_spec::{HeaderMatcher, RuleRef, TesterCondition};
use fledge_core::spec::{BackendRefSpec, CanarySpec, GatewayApiRouterSpec};
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::Client;
use serde_json::{json, Map, Value};
use std::time::Duration;

/// Field manager recorded by the API server for Fledge's writes.
const FIELD_MANAGER: &str = "fledge";
/// How long `ensure` waits for the Gateway to accept a route before reporting it.
const ACCEPTANCE_TIMEOUT: Duration = Duration::from_secs(3);
const ACCEPTANCE_POLL: Duration = Duration::from_millis(250);
const GROUP: &str = "gateway.networking.k8s.io";

/// The two route kinds this router steers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteKind {
    Http,
    Grpc,
}

impl RouteKind {
    pub fn name(self) -> &'static str {
        match self {
            RouteKind::Http => "HTTPRoute",
            RouteKind::Grpc => "GRPCRoute",
        }
    }

    pub fn resource(self) -> ApiResource {
        let plural = match self {
            RouteKind::Http => "httproutes",
            RouteKind::Grpc => "grpcroutes",
        };
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(GROUP, "v1", self.name()), plural)
    }

    /// What a rule without `matches` matches (everything), as the API server defaults it.
    fn default_match(self) -> Value {
        match self {
            RouteKind::Http => json!({"path": {"type": "PathPrefix", "value": "/"}}),
            RouteKind::Grpc => json!({}),
        }
    }
}

/// A managed rule: its name and the header conditions it adds to the weighted rule's matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagedRule {
    pub name: String,
    pub conditions: Vec<TesterCondition>,
}

/// Everything the router needs to know about one canary's route.
#[derive(Debug, Clone, PartialEq)]
pub struct GatewayApiSettings {
    pub kind: RouteKind,
    pub namespace: String,
    /// The route object's name.
    pub route: String,
    pub rule: RuleRef,
    pub stable: BackendRefSpec,
    pub canary: BackendRefSpec,
    pub testers: Option<ManagedRule>,
    pub guard: Option<ManagedRule>,
    pub mirror_percentage: Option<f64>,
}

impl GatewayApiSettings {
    /// The settings `spec.router.gatewayApi` describes, in `namespace`; `None` if the spec uses
    /// another router (or names no route).
    pub fn from_spec(spec: &CanarySpec, namespace: &str) -> Option<Self> {
        let gateway = spec.router.gateway_api.as_ref()?;
        let (kind, route) = match gateway.route()? {
            ("GRPCRoute", name) => (RouteKind::Grpc, name),
            (_, name) => (RouteKind::Http, name),
        };
        let testers = gateway
            .header_route
            .as_ref()
            .zip(gateway.header_route_name())
            .map(|(h, name)| ManagedRule {
                name,
                conditions: h.conditions(),
            });
        let guard = spec.analysis.guard.as_ref().map(|_| ManagedRule {
            name: gateway.guard_rule_name(),
            conditions: vec![TesterCondition {
                header: fledge_core::contract::DEFAULT_GUARD_HEADER.to_string(),
                matcher: HeaderMatcher::Regex(fledge_core::filter_config::Guard::route_regex(
                    &spec.service,
                )),
            }],
        });
        Some(GatewayApiSettings {
            kind,
            namespace: namespace.to_string(),
            route: route.to_string(),
            rule: gateway.rule.clone(),
            stable: gateway.stable_backend.clone(),
            canary: gateway.canary_backend.clone(),
            testers,
            guard,
            mirror_percentage: gateway.mirror_percentage,
        })
    }

    /// The route these settings steer.
    pub fn route_key(&self) -> RouteKey {
        key(self.kind.name(), &self.namespace, &self.route, &self.rule)
    }

    fn describe(&self) -> String {
        format!("{} {}/{}", self.kind.name(), self.namespace, self.route)
    }

    fn invalid(&self, problem: impl std::fmt::Display, fix: impl std::fmt::Display) -> RouterError {
        RouterError::Invalid(format!("{}: {problem}; {fix}", self.describe()))
    }

    /// The managed rules in the order they are listed (the guard rule first: it wins ties),
    /// each with whether `desired` wants it and the backend it sends to.
    fn managed_rules(&self, desired: &DesiredRoutes) -> Vec<(&ManagedRule, bool, Side)> {
        let mut rules = Vec::new();
        if let Some(guard) = &self.guard {
            rules.push((guard, desired.guard, Side::Stable));
        }
        if let Some(testers) = &self.testers {
            rules.push((testers, desired.testers, Side::Canary));
        }
        rules
    }
}

/// Which of the two backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Stable,
    Canary,
}

fn key(kind: &'static str, namespace: &str, route: &str, rule: &RuleRef) -> RouteKey {
    RouteKey {
        object: RouteObject {
            kind,
            namespace: namespace.to_string(),
            name: route.to_string(),
        },
        route: match rule {
            RuleRef::Name(name) => name.clone(),
            RuleRef::Index(index) => index.to_string(),
        },
    }
}

/// The route `spec.router.gatewayApi` steers in `namespace`, if it names exactly one route.
pub fn route_key(spec: &GatewayApiRouterSpec, namespace: &str) -> Option<RouteKey> {
    let (kind, route) = spec.route()?;
    let kind = match kind {
        "GRPCRoute" => RouteKind::Grpc.name(),
        _ => RouteKind::Http.name(),
    };
    Some(key(kind, namespace, route, &spec.rule))
}

/// Whether `backend_ref` (JSON) is the backend `spec` names, with the API's defaults.
fn backend_matches(spec: &BackendRefSpec, backend_ref: &Value, route_namespace: &str) -> bool {
    let text = |key: &str| backend_ref.get(key).and_then(Value::as_str);
    text("name") == Some(spec.name.as_str())
        && text("kind").unwrap_or("Service") == spec.kind()
        && text("group").unwrap_or("") == spec.group()
        && text("namespace").unwrap_or(route_namespace)
            == spec.namespace.as_deref().unwrap_or(route_namespace)
        && spec.port.is_none_or(|port| {
            backend_ref.get("port").and_then(Value::as_u64) == Some(u64::from(port))
        })
}

fn describe_backend(spec: &BackendRefSpec) -> String {
    match spec.port {
        Some(port) => format!("{} {}:{port}", spec.kind(), spec.name),
        None => format!("{} {}", spec.kind(), spec.name),
    }
}

/// Where the weighted rule and its backendRefs are.
struct Located<'a> {
    index: usize,
    rule: &'a Value,
    backend_refs: &'a [Value],
    stable: usize,
    canary: usize,
}

fn rules_of(route: &Value) -> &[Value] {
    route
        .pointer("/spec/rules")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
}

fn rule_name(rule: &Value) -> Option<&str> {
    rule.get("name").and_then(Value::as_str)
}

fn locate<'a>(route: &'a Value, settings: &GatewayApiSettings) -> Result<Located<'a>, RouterError> {
    let rules = rules_of(route);
    let index = match &settings.rule {
        RuleRef::Name(name) => rules
            .iter()
            .position(|r| rule_name(r) == Some(name.as_str()))
            .ok_or_else(|| {
                settings.invalid(
                    format!("has no rule named {name:?} (rules: {})", rule_names(rules)),
                    format!("name the weighted rule (`rules: [{{name: {name}, backendRefs: [...]}}]`, Gateway API v1.2+) or set spec.router.gatewayApi.rule to its index"),
                )
            })?,
        RuleRef::Index(index) => {
            let index = usize::try_from(*index).unwrap_or(usize::MAX);
            if index >= rules.len() {
                return Err(settings.invalid(
                    format!("has {} rules, so no rules[{index}]", rules.len()),
                    "fix spec.router.gatewayApi.rule (0 is the first rule)",
                ));
            }
            index
        }
    };
    let rule = &rules[index];
    let backend_refs = rule
        .get("backendRefs")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let find = |which: &str, spec: &BackendRefSpec| -> Result<usize, RouterError> {
        let found: Vec<usize> = backend_refs
            .iter()
            .enumerate()
            .filter(|(_, b)| backend_matches(spec, b, &settings.namespace))
            .map(|(i, _)| i)
            .collect();
        match found.as_slice() {
            [one] => Ok(*one),
            [] => Err(settings.invalid(
                format!("{} has no {which} backendRef {}", settings.rule, describe_backend(spec)),
                format!("add `{{name: {}, port: ..., weight: ...}}` to its backendRefs, or fix spec.router.gatewayApi.{which}Backend", spec.name),
            )),
            more => Err(settings.invalid(
                format!("{} has {} backendRefs matching {}", settings.rule, more.len(), describe_backend(spec)),
                format!("keep one, or set spec.router.gatewayApi.{which}Backend.port to tell them apart"),
            )),
        }
    };
    let stable = find("stable", &settings.stable)?;
    let canary = find("canary", &settings.canary)?;
    if backend_refs.len() != 2 {
        return Err(settings.invalid(
            format!("{} has {} backendRefs", settings.rule, backend_refs.len()),
            "Fledge weighs exactly two backends, stable and canary; move others to their own rule",
        ));
    }
    Ok(Located {
        index,
        rule,
        backend_refs,
        stable,
        canary,
    })
}

fn rule_names(rules: &[Value]) -> String {
    let names: Vec<String> = rules
        .iter()
        .enumerate()
        .map(|(i, r)| match rule_name(r) {
            Some(name) => format!("{name:?}"),
            None => format!("#{i} unnamed"),
        })
        .collect();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

/// A backendRef's weight; absent means 1, as the Gateway API defaults it.
fn weight_of(backend_ref: &Value) -> u32 {
    backend_ref
        .get("weight")
        .and_then(Value::as_u64)
        .and_then(|w| u32::try_from(w).ok())
        .unwrap_or(1)
}

/// The stable and canary weights of the weighted rule.
pub fn read_weights(route: &Value, settings: &GatewayApiSettings) -> Result<Weights, RouterError> {
    let located = locate(route, settings)?;
    Ok(Weights {
        stable: weight_of(&located.backend_refs[located.stable]),
        canary: weight_of(&located.backend_refs[located.canary]),
    })
}

fn test(path: String, value: Value) -> Value {
    json!({"op": "test", "path": path, "value": value})
}

/// The matches of a rule as the API server stores them (defaults filled in), for comparing
/// what Fledge wrote with what it reads back.
fn normalized_matches(kind: RouteKind, matches: Option<&Value>) -> Vec<Value> {
    let matches = match matches.and_then(Value::as_array) {
        Some(list) if !list.is_empty() => list.clone(),
        _ => vec![kind.default_match()],
    };
    matches
        .into_iter()
        .map(|mut m| {
            if kind == RouteKind::Http {
                let path = m
                    .get("path")
                    .cloned()
                    .unwrap_or_else(|| json!({"type": "PathPrefix", "value": "/"}));
                let mut path = path.as_object().cloned().unwrap_or_default();
                path.entry("type").or_insert(json!("PathPrefix"));
                path.entry("value").or_insert(json!("/"));
                m["path"] = Value::Object(path);
            }
            for list in ["headers", "queryParams"] {
                if let Some(entries) = m.get_mut(list).and_then(Value::as_array_mut) {
                    for entry in entries {
                        if entry.get("type").is_none() {
                            entry["type"] = json!("Exact");
                        }
                    }
                }
            }
            m
        })
        .collect()
}

/// A header match of the Gateway API for one condition.
fn header_match(condition: &TesterCondition) -> Value {
    match &condition.matcher {
        HeaderMatcher::Exact(value) => {
            json!({"type": "Exact", "name": condition.header, "value": value})
        }
        other => {
            json!({"type": "RegularExpression", "name": condition.header, "value": other.to_regex()})
        }
    }
}

/// The backendRef a managed rule sends everything to: a copy of the weighted rule's, weight 1.
fn single_backend(backend_ref: &Value) -> Value {
    let mut copy = backend_ref.clone();
    copy["weight"] = json!(1);
    json!([copy])
}

/// The rule Fledge adds: the weighted rule's matches each with `managed`'s header conditions
/// added, its filters (but the mirror), timeouts and retries, to `backend_ref`.
fn desired_rule(
    settings: &GatewayApiSettings,
    managed: &ManagedRule,
    weighted: &Value,
    backend_ref: &Value,
) -> Result<Value, RouterError> {
    let mut copy = weighted.as_object().cloned().unwrap_or_default();
    for owned_elsewhere in ["name", "matches", "backendRefs"] {
        copy.remove(owned_elsewhere);
    }
    if let Some(filters) = copy.get_mut("filters").and_then(Value::as_array_mut) {
        filters.retain(|f| !is_our_mirror(settings, f));
        if filters.is_empty() {
            copy.remove("filters");
        }
    }
    let mut matches = Vec::new();
    for m in normalized_matches(settings.kind, weighted.get("matches")) {
        let mut m = m.as_object().cloned().unwrap_or_default();
        let mut headers = m
            .get("headers")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        for condition in &managed.conditions {
            let taken = headers.iter().any(|h| {
                h.get("name")
                    .and_then(Value::as_str)
                    .is_some_and(|n| n.eq_ignore_ascii_case(&condition.header))
            });
            if taken {
                return Err(settings.invalid(
                    format!(
                        "{} already matches header {:?}, so the rule {:?} cannot add a condition on it",
                        settings.rule, condition.header, managed.name
                    ),
                    "match the testers by another header",
                ));
            }
            headers.push(header_match(condition));
        }
        m.insert("headers".into(), Value::Array(headers));
        matches.push(Value::Object(m));
    }
    copy.insert("name".into(), json!(managed.name));
    copy.insert("matches".into(), Value::Array(matches));
    copy.insert("backendRefs".into(), single_backend(backend_ref));
    Ok(Value::Object(copy))
}

/// Whether `current` is the managed rule `wanted` (only what Fledge decides is compared; the
/// API server may add defaults).
fn same_rule(kind: RouteKind, current: &Value, wanted: &Value) -> bool {
    let backends = |rule: &Value| -> Vec<(Option<String>, Option<u64>)> {
        rule.get("backendRefs")
            .and_then(Value::as_array)
            .map(|refs| {
                refs.iter()
                    .map(|b| {
                        (
                            b.get("name").and_then(Value::as_str).map(str::to_string),
                            b.get("port").and_then(Value::as_u64),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    normalized_matches(kind, current.get("matches"))
        == normalized_matches(kind, wanted.get("matches"))
        && backends(current) == backends(wanted)
}

fn is_our_mirror(settings: &GatewayApiSettings, filter: &Value) -> bool {
    filter.get("type").and_then(Value::as_str) == Some("RequestMirror")
        && filter
            .pointer("/requestMirror/backendRef")
            .is_some_and(|b| backend_matches(&settings.canary, b, &settings.namespace))
}

/// The RequestMirror filter for `percentage`, to the canary backend.
fn mirror_filter(backend_ref: &Value, percentage: f64) -> Value {
    let mut target = Map::new();
    for key in ["group", "kind", "name", "namespace", "port"] {
        if let Some(value) = backend_ref.get(key) {
            target.insert(key.into(), value.clone());
        }
    }
    let mut mirror = json!({"backendRef": target});
    if percentage.fract() == 0.0 {
        mirror["percent"] = json!(percentage as u32);
    } else {
        mirror["fraction"] =
            json!({"numerator": (percentage * 10_000.0).round() as u32, "denominator": 1_000_000});
    }
    json!({"type": "RequestMirror", "requestMirror": mirror})
}

/// The JSON Patch operations that make `route` match `desired`, or `None` when it already does.
/// Every replaced value is first `test`ed, so the patch fails (422) if it changed meanwhile.
pub fn plan_patch(
    route: &Value,
    settings: &GatewayApiSettings,
    desired: &DesiredRoutes,
) -> Result<Option<Vec<Value>>, RouterError> {
    let located = locate(route, settings)?;
    let rule_path = format!("/spec/rules/{}", located.index);
    let mut ops = Vec::new();
    for (j, want) in [
        (located.stable, desired.weights.stable),
        (located.canary, desired.weights.canary),
    ] {
        let backend_ref = &located.backend_refs[j];
        let current = backend_ref.get("weight").cloned().unwrap_or(Value::Null);
        if current.as_u64() != Some(u64::from(want)) {
            let path = format!("{rule_path}/backendRefs/{j}");
            ops.push(test(
                format!("{path}/name"),
                backend_ref.get("name").cloned().unwrap_or(Value::Null),
            ));
            ops.push(test(format!("{path}/weight"), current));
            ops.push(json!({"op": "add", "path": format!("{path}/weight"), "value": want}));
        }
    }
    plan_mirror(&located, settings, desired, &rule_path, &mut ops);
    // Removals shift indexes, so they come last.
    plan_managed_rules(route, &located, settings, desired, &mut ops)?;
    if ops.is_empty() {
        return Ok(None);
    }
    // Pin the rule so an index that moved (a rule inserted above) fails the patch.
    let pin = match &settings.rule {
        RuleRef::Name(name) => test(format!("{rule_path}/name"), json!(name)),
        RuleRef::Index(_) => test(
            format!("{rule_path}/backendRefs/{}/name", located.canary),
            json!(settings.canary.name),
        ),
    };
    ops.insert(0, pin);
    ops.dedup();
    Ok(Some(ops))
}

fn plan_mirror(
    located: &Located<'_>,
    settings: &GatewayApiSettings,
    desired: &DesiredRoutes,
    rule_path: &str,
    ops: &mut Vec<Value>,
) {
    let Some(percentage) = settings.mirror_percentage else {
        return;
    };
    let filters = located
        .rule
        .get("filters")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let ours = filters.iter().position(|f| is_our_mirror(settings, f));
    let wanted = mirror_filter(&located.backend_refs[located.canary], percentage);
    match (desired.mirror, ours) {
        (true, Some(i))
            if filters[i]
                .get("requestMirror")
                .map(|m| (m.get("percent"), m.get("fraction")))
                == wanted
                    .get("requestMirror")
                    .map(|m| (m.get("percent"), m.get("fraction"))) => {}
        (true, Some(i)) => {
            let path = format!("{rule_path}/filters/{i}");
            ops.push(test(path.clone(), filters[i].clone()));
            ops.push(json!({"op": "replace", "path": path, "value": wanted}));
        }
        (true, None) if filters.is_empty() => {
            ops.push(test(
                format!("{rule_path}/filters"),
                located.rule.get("filters").cloned().unwrap_or(Value::Null),
            ));
            ops.push(
                json!({"op": "add", "path": format!("{rule_path}/filters"), "value": [wanted]}),
            );
        }
        (true, None) => {
            ops.push(
                json!({"op": "add", "path": format!("{rule_path}/filters/-"), "value": wanted}),
            );
        }
        (false, Some(i)) => {
            let path = format!("{rule_path}/filters/{i}");
            ops.push(test(path.clone(), filters[i].clone()));
            if filters.len() == 1 {
                ops.push(json!({"op": "remove", "path": format!("{rule_path}/filters")}));
            } else {
                ops.push(json!({"op": "remove", "path": path}));
            }
        }
        (false, None) => {}
    }
}

/// The managed rules as wanted: present, as wanted and in order, or absent. When they are
/// not, every managed rule is removed and the wanted ones are appended again, in order.
fn plan_managed_rules(
    route: &Value,
    located: &Located<'_>,
    settings: &GatewayApiSettings,
    desired: &DesiredRoutes,
    ops: &mut Vec<Value>,
) -> Result<(), RouterError> {
    let rules = rules_of(route);
    let mut existing = Vec::new();
    let mut wanted = Vec::new();
    for (managed, wanted_now, side) in settings.managed_rules(desired) {
        let index = rules
            .iter()
            .position(|r| rule_name(r) == Some(managed.name.as_str()));
        if index == Some(located.index) {
            return Err(settings.invalid(
                format!(
                    "the managed rule name {:?} is the weighted rule's name",
                    managed.name
                ),
                "give the testers route another name (spec.router.gatewayApi.headerRoute.name)",
            ));
        }
        existing.extend(index);
        if !wanted_now {
            continue;
        }
        let backend_ref = match side {
            Side::Stable => &located.backend_refs[located.stable],
            Side::Canary => &located.backend_refs[located.canary],
        };
        let rule = desired_rule(settings, managed, located.rule, backend_ref)?;
        if index.is_none() {
            if let Some(nameless) = rules
                .iter()
                .position(|r| rule_name(r).is_none() && same_rule(settings.kind, r, &rule))
            {
                return Err(settings.invalid(
                    format!("rules[{nameless}] is the rule {:?} Fledge added, without its name", managed.name),
                    "the installed Gateway API CRDs drop `rules[].name`; install Gateway API v1.2 or later, or drop headerRoute and analysis.guard",
                ));
            }
        }
        wanted.push((index, rule));
    }
    let in_place = existing.len() == wanted.len()
        && wanted
            .iter()
            .all(|(index, rule)| index.is_some_and(|i| same_rule(settings.kind, &rules[i], rule)))
        && wanted.windows(2).all(|pair| pair[0].0 < pair[1].0);
    if in_place {
        return Ok(());
    }
    existing.sort_unstable_by(|a, b| b.cmp(a));
    for i in existing {
        let path = format!("/spec/rules/{i}");
        ops.push(test(
            format!("{path}/name"),
            rules[i].get("name").cloned().unwrap_or(Value::Null),
        ));
        ops.push(json!({"op": "remove", "path": path}));
    }
    for (_, rule) in wanted {
        ops.push(json!({"op": "add", "path": "/spec/rules/-", "value": rule}));
    }
    Ok(())
}

/// What the route's parent Gateways say about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acceptance {
    /// Every parent reports Accepted and ResolvedRefs True for the current generation.
    Accepted,
    /// A parent has not reported on the current generation yet.
    Pending(String),
    /// A parent refused it (the message names the parent, condition, reason and message).
    Rejected(String),
}

/// Read `status.parents` of a route object.
pub fn acceptance(route: &Value) -> Acceptance {
    let generation = route
        .pointer("/metadata/generation")
        .and_then(Value::as_i64)
        .unwrap_or(0);
    let parents = route
        .pointer("/status/parents")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    if parents.is_empty() {
        return Acceptance::Pending(
            "no Gateway has reported on it yet (status.parents is empty): check that spec.parentRefs names a Gateway and that its controller runs".into(),
        );
    }
    let mut pending = None;
    for parent in parents {
        let reference = &parent["parentRef"];
        let name = reference.get("name").and_then(Value::as_str).unwrap_or("?");
        let who = match reference.get("namespace").and_then(Value::as_str) {
            Some(namespace) => format!("{} {namespace}/{name}", parent_kind(reference)),
            None => format!("{} {name}", parent_kind(reference)),
        };
        let conditions = parent
            .get("conditions")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default();
        for wanted in ["Accepted", "ResolvedRefs"] {
            let condition = conditions
                .iter()
                .find(|c| c.get("type").and_then(Value::as_str) == Some(wanted));
            let Some(condition) = condition else {
                pending.get_or_insert(format!("{who} reports no {wanted} condition yet"));
                continue;
            };
            let observed = condition
                .get("observedGeneration")
                .and_then(Value::as_i64)
                .unwrap_or(generation);
            if observed < generation {
                pending.get_or_insert(format!(
                    "{who} has not processed generation {generation} yet ({wanted} is for generation {observed})"
                ));
                continue;
            }
            if condition.get("status").and_then(Value::as_str) != Some("True") {
                let text = |key: &str| condition.get(key).and_then(Value::as_str).unwrap_or("");
                return Acceptance::Rejected(format!(
                    "{who}: {wanted} is {} ({}: {})",
                    text("status"),
                    text("reason"),
                    text("message")
                ));
            }
        }
    }
    match pending {
        Some(reason) => Acceptance::Pending(reason),
        None => Acceptance::Accepted,
    }
}

fn parent_kind(reference: &Value) -> &str {
    reference
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or("Gateway")
}

/// A router for one canary's HTTPRoute or GRPCRoute.
pub struct GatewayApiRouter {
    settings: GatewayApiSettings,
    key: RouteKey,
    routes: Api<DynamicObject>,
    max_writes: u32,
}

impl GatewayApiRouter {
    pub fn new(client: Client, settings: GatewayApiSettings) -> Self {
        let routes = Api::namespaced_with(client, &settings.namespace, &settings.kind.resource());
        GatewayApiRouter {
            key: settings.route_key(),
            settings,
            routes,
            max_writes: 5,
        }
    }

    async fn read(&self) -> Result<Value, RouterError> {
        let api_error = |source| RouterError::Api {
            what: self.settings.describe(),
            source,
        };
        match self.routes.get_opt(&self.settings.route).await {
            Ok(Some(route)) => {
                serde_json::to_value(route).map_err(|e| api_error(kube::Error::SerdeError(e)))
            }
            Ok(None) => Err(RouterError::NotFound(format!(
                "{} not found; create it (with the rule and the two backendRefs) or fix spec.router.gatewayApi",
                self.settings.describe()
            ))),
            Err(source) => Err(api_error(source)),
        }
    }

    async fn patch(&self, ops: Vec<Value>) -> Result<Option<String>, RouterError> {
        let patch: json_patch::Patch =
            serde_json::from_value(Value::Array(ops)).map_err(|e| RouterError::Api {
                what: "a JSON Patch".into(),
                source: kube::Error::SerdeError(e),
            })?;
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.to_string()),
            ..PatchParams::default()
        };
        match self
            .routes
            .patch(&self.settings.route, &params, &Patch::Json::<()>(patch))
            .await
        {
            Ok(_) => Ok(None),
            Err(kube::Error::Api(status)) if status.code == 409 || status.code == 422 => {
                tracing::info!(route = %self.settings.describe(), reason = %status.message, "route changed concurrently; re-reading");
                Ok(Some(status.message))
            }
            Err(source) => Err(RouterError::Api {
                what: self.settings.describe(),
                source,
            }),
        }
    }
}

#[async_trait]
impl TrafficRouter for GatewayApiRouter {
    fn route(&self) -> &RouteKey {
        &self.key
    }

    /// Read, plan, write (guarded, retried on a concurrent change), and once nothing is left to
    /// write, wait (bounded) until every parent Gateway accepts this generation.
    async fn ensure(&self, desired: &DesiredRoutes) -> Result<Ensured, RouterError> {
        let mut found = None;
        let mut writes = 0;
        let mut last_problem = String::new();
        let waiting_since = tokio::time::Instant::now();
        loop {
            let route = self.read().await?;
            let weights = read_weights(&route, &self.settings)?;
            let found = *found.get_or_insert(weights);
            match plan_patch(&route, &self.settings, desired)? {
                Some(ops) if writes < self.max_writes => {
                    writes += 1;
                    match self.patch(ops).await? {
                        None => {
                            tracing::info!(route = %self.settings.describe(), rule = %self.settings.rule, weights = ?desired.weights, "route updated")
                        }
                        Some(problem) => last_problem = problem,
                    }
                }
                Some(_) => {
                    return Err(RouterError::NotConverged(format!(
                        "{}: the rules still differ from the wanted ones after {writes} writes (last problem: {}); is another controller changing them?",
                        self.settings.describe(),
                        if last_problem.is_empty() { "the written values did not read back" } else { &last_problem }
                    )))
                }
                None => match acceptance(&route) {
                    Acceptance::Accepted => {
                        return Ok(Ensured {
                            found,
                            wrote: writes > 0,
                        })
                    }
                    Acceptance::Rejected(reason) => {
                        return Err(RouterError::NotAccepted(format!(
                            "{} is not accepted: {reason}",
                            self.settings.describe()
                        )))
                    }
                    Acceptance::Pending(reason) if waiting_since.elapsed() >= ACCEPTANCE_TIMEOUT => {
                        return Err(RouterError::NotAccepted(format!(
                            "{} is not accepted after {} s: {reason}",
                            self.settings.describe(),
                            ACCEPTANCE_TIMEOUT.as_secs()
                        )))
                    }
                    Acceptance::Pending(_) => tokio::time::sleep(ACCEPTANCE_POLL).await,
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(name: &str) -> BackendRefSpec {
        BackendRefSpec {
            name: name.into(),
            port: Some(80),
            namespace: None,
            kind: None,
            group: None,
        }
    }

    pub(crate) fn settings() -> GatewayApiSettings {
        GatewayApiSettings {
            kind: RouteKind::Http,
            namespace: "shop".into(),
            route: "app".into(),
            rule: RuleRef::Name("primary".into()),
            stable: backend("app-stable"),
            canary: backend("app-canary"),
            testers: None,
            guard: None,
            mirror_percentage: None,
        }
    }

    fn testers() -> ManagedRule {
        ManagedRule {
            name: "primary-canary-testers".into(),
            conditions: vec![TesterCondition {
                header: "stage".into(),
                matcher: HeaderMatcher::Exact("canary".into()),
            }],
        }
    }

    fn guard() -> ManagedRule {
        ManagedRule {
            name: "primary-fledge-guard".into(),
            conditions: vec![TesterCondition {
                header: "x-fledge-guard".into(),
                matcher: HeaderMatcher::Regex("(.*,)?app(,.*)?".into()),
            }],
        }
    }

    /// A user's HTTPRoute: a health rule, the weighted rule with a filter and a timeout.
    pub(crate) fn http_route() -> Value {
        json!({
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "HTTPRoute",
            "metadata": {"name": "app", "namespace": "shop", "generation": 1},
            "spec": {
                "parentRefs": [{"name": "public", "namespace": "gateways"}],
                "hostnames": ["app.example.com"],
                "rules": [
                    {"name": "health",
                     "matches": [{"path": {"type": "Exact", "value": "/healthz"}}],
                     "backendRefs": [{"name": "app-stable", "port": 80}]},
                    {"name": "primary",
                     "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                     "filters": [{"type": "RequestHeaderModifier",
                                  "requestHeaderModifier": {"add": [{"name": "x-env", "value": "prod"}]}}],
                     "timeouts": {"request": "5s"},
                     "backendRefs": [
                        {"name": "app-stable", "port": 80, "weight": 100},
                        {"name": "app-canary", "port": 80, "weight": 0}
                     ]}
                ]
            }
        })
    }

    fn apply(doc: &Value, ops: &[Value]) -> Value {
        let mut doc = doc.clone();
        fledge_testkit::fake_api::apply_json_patch(&mut doc, &Value::Array(ops.to_vec())).unwrap();
        doc
    }

    fn during(canary: u8) -> DesiredRoutes {
        DesiredRoutes::during_rollout(Weights::canary_percent(canary))
    }

    #[test]
    fn the_weight_patch_tests_exactly_what_it_replaces() {
        let ops = plan_patch(&http_route(), &settings(), &during(20))
            .unwrap()
            .unwrap();
        assert_eq!(
            ops,
            vec![
                json!({"op": "test", "path": "/spec/rules/1/name", "value": "primary"}),
                json!({"op": "test", "path": "/spec/rules/1/backendRefs/0/name", "value": "app-stable"}),
                json!({"op": "test", "path": "/spec/rules/1/backendRefs/0/weight", "value": 100}),
                json!({"op": "add", "path": "/spec/rules/1/backendRefs/0/weight", "value": 80}),
                json!({"op": "test", "path": "/spec/rules/1/backendRefs/1/name", "value": "app-canary"}),
                json!({"op": "test", "path": "/spec/rules/1/backendRefs/1/weight", "value": 0}),
                json!({"op": "add", "path": "/spec/rules/1/backendRefs/1/weight", "value": 20}),
            ]
        );
        let after = apply(&http_route(), &ops);
        let mut expected = http_route();
        expected["spec"]["rules"][1]["backendRefs"][0]["weight"] = json!(80);
        expected["spec"]["rules"][1]["backendRefs"][1]["weight"] = json!(20);
        assert_eq!(after, expected, "only the two weights changed");
        assert_eq!(plan_patch(&after, &settings(), &during(20)).unwrap(), None);
    }

    #[test]
    fn absent_weights_read_as_one_and_a_rule_is_found_by_index() {
        let mut route = http_route();
        for backend in route["spec"]["rules"][1]["backendRefs"]
            .as_array_mut()
            .unwrap()
        {
            backend.as_object_mut().unwrap().remove("weight");
        }
        let mut s = settings();
        s.rule = RuleRef::Index(1);
        assert_eq!(
            read_weights(&route, &s).unwrap(),
            Weights {
                stable: 1,
                canary: 1
            }
        );
        let ops = plan_patch(&route, &s, &during(0)).unwrap().unwrap();
        assert_eq!(
            ops[0],
            json!({"op": "test", "path": "/spec/rules/1/backendRefs/1/name", "value": "app-canary"}),
            "a rule named by index is pinned by its canary backend"
        );
        assert_eq!(
            read_weights(&apply(&route, &ops), &s).unwrap(),
            Weights::canary_percent(0)
        );
    }

    #[test]
    fn unusable_routes_are_explained() {
        type Mutation = Box<dyn Fn(&mut Value, &mut GatewayApiSettings)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (
                Box::new(|r, _| r["spec"]["rules"][1]["name"] = json!("main")),
                "has no rule named \"primary\" (rules: \"health\", \"main\")",
            ),
            (
                Box::new(|_, s| s.rule = RuleRef::Index(5)),
                "has 2 rules, so no rules[5]",
            ),
            (
                Box::new(|_, s| s.canary.port = Some(8080)),
                "rule \"primary\" has no canary backendRef Service app-canary:8080",
            ),
            (
                Box::new(|r, _| {
                    r["spec"]["rules"][1]["backendRefs"]
                        .as_array_mut()
                        .unwrap()
                        .push(json!({"name": "other", "port": 80, "weight": 0}))
                }),
                "has 3 backendRefs",
            ),
            (
                Box::new(|r, _| {
                    r["spec"]["rules"][1]["backendRefs"][1]["namespace"] = json!("elsewhere")
                }),
                "no canary backendRef",
            ),
        ];
        for (mutate, expected) in cases {
            let (mut route, mut s) = (http_route(), settings());
            mutate(&mut route, &mut s);
            let err = plan_patch(&route, &s, &during(10)).unwrap_err().to_string();
            assert!(err.contains(expected), "{err}");
            assert!(err.starts_with("HTTPRoute shop/app: "), "{err}");
        }
    }

    #[test]
    fn managed_rules_are_appended_in_order_and_removed_after() {
        let mut s = settings();
        s.testers = Some(testers());
        s.guard = Some(guard());
        let ops = plan_patch(&http_route(), &s, &during(10)).unwrap().unwrap();
        let after = apply(&http_route(), &ops);
        let rules = after["spec"]["rules"].as_array().unwrap();
        let names: Vec<&str> = rules.iter().map(|r| r["name"].as_str().unwrap()).collect();
        assert_eq!(
            names,
            [
                "health",
                "primary",
                "primary-fledge-guard",
                "primary-canary-testers"
            ]
        );
        assert_eq!(
            rules[3],
            json!({
                "name": "primary-canary-testers",
                "matches": [{"path": {"type": "PathPrefix", "value": "/"},
                             "headers": [{"type": "Exact", "name": "stage", "value": "canary"}]}],
                "filters": [{"type": "RequestHeaderModifier",
                             "requestHeaderModifier": {"add": [{"name": "x-env", "value": "prod"}]}}],
                "timeouts": {"request": "5s"},
                "backendRefs": [{"name": "app-canary", "port": 80, "weight": 1}]
            })
        );
        assert_eq!(
            rules[2]["matches"][0]["headers"],
            json!([{"type": "RegularExpression", "name": "x-fledge-guard", "value": "(.*,)?app(,.*)?"}])
        );
        assert_eq!(rules[2]["backendRefs"][0]["name"], "app-stable");
        // Idempotent, also once the API server has added its defaults.
        assert_eq!(plan_patch(&after, &s, &during(10)).unwrap(), None);
        let mut defaulted = after.clone();
        defaulted["spec"]["rules"][3]["backendRefs"][0]["kind"] = json!("Service");
        defaulted["spec"]["rules"][3]["backendRefs"][0]["group"] = json!("");
        assert_eq!(plan_patch(&defaulted, &s, &during(10)).unwrap(), None);
        // Listed out of order (someone moved them): put back in order.
        let mut swapped = after.clone();
        swapped["spec"]["rules"].as_array_mut().unwrap().swap(2, 3);
        let fixed = apply(
            &swapped,
            &plan_patch(&swapped, &s, &during(10)).unwrap().unwrap(),
        );
        assert_eq!(fixed["spec"]["rules"], after["spec"]["rules"]);
        // Finished: both removed, and weights aside the route is as it was.
        let done = DesiredRoutes::weights_only(Weights::canary_percent(0));
        let restored = apply(&after, &plan_patch(&after, &s, &done).unwrap().unwrap());
        assert_eq!(restored, http_route());
    }

    #[test]
    fn testers_by_prefix_regex_or_cookie_become_regular_expressions() {
        let spec: fledge_core::spec::HeaderRouteSpec = serde_json::from_value(json!({
            "headerMatches": [{"name": "x-team", "prefix": "qa."}],
            "cookie": {"name": "canary", "value": "always"}
        }))
        .unwrap();
        let mut s = settings();
        s.testers = Some(ManagedRule {
            name: "testers".into(),
            conditions: spec.conditions(),
        });
        let after = apply(
            &http_route(),
            &plan_patch(&http_route(), &s, &during(0)).unwrap().unwrap(),
        );
        assert_eq!(
            after["spec"]["rules"][2]["matches"][0]["headers"],
            json!([
                {"type": "RegularExpression", "name": "x-team", "value": r"qa\..*"},
                {"type": "RegularExpression", "name": "cookie", "value": r"^(.*;\s*)?canary=always(;.*)?$"}
            ])
        );
    }

    #[test]
    fn a_header_the_rule_already_matches_cannot_be_a_testers_condition() {
        let mut route = http_route();
        route["spec"]["rules"][1]["matches"][0]["headers"] =
            json!([{"type": "Exact", "name": "Stage", "value": "x"}]);
        let mut s = settings();
        s.testers = Some(testers());
        let err = plan_patch(&route, &s, &during(0)).unwrap_err().to_string();
        assert!(err.contains("already matches header \"stage\""), "{err}");
    }

    #[test]
    fn a_crd_that_drops_rule_names_is_reported() {
        let mut s = settings();
        s.testers = Some(testers());
        let mut after = apply(
            &http_route(),
            &plan_patch(&http_route(), &s, &during(0)).unwrap().unwrap(),
        );
        after["spec"]["rules"][2]
            .as_object_mut()
            .unwrap()
            .remove("name");
        let err = plan_patch(&after, &s, &during(0)).unwrap_err().to_string();
        assert!(err.contains("drop `rules[].name`"), "{err}");
    }

    #[test]
    fn the_mirror_filter_is_added_next_to_the_users_filters_and_removed_after() {
        let mut s = settings();
        s.mirror_percentage = Some(10.0);
        let after = apply(
            &http_route(),
            &plan_patch(&http_route(), &s, &during(0)).unwrap().unwrap(),
        );
        let filters = &after["spec"]["rules"][1]["filters"];
        assert_eq!(filters[0]["type"], "RequestHeaderModifier", "kept");
        assert_eq!(
            filters[1],
            json!({"type": "RequestMirror", "requestMirror": {
                "backendRef": {"name": "app-canary", "port": 80}, "percent": 10}})
        );
        assert_eq!(plan_patch(&after, &s, &during(0)).unwrap(), None);
        s.mirror_percentage = Some(2.5);
        let finer = apply(
            &after,
            &plan_patch(&after, &s, &during(0)).unwrap().unwrap(),
        );
        assert_eq!(
            finer["spec"]["rules"][1]["filters"][1]["requestMirror"]["fraction"],
            json!({"numerator": 25000, "denominator": 1_000_000})
        );
        let done = DesiredRoutes::weights_only(Weights::canary_percent(0));
        assert_eq!(
            apply(&finer, &plan_patch(&finer, &s, &done).unwrap().unwrap()),
            http_route()
        );
    }

    #[test]
    fn a_grpc_rule_without_matches_gets_header_only_matches() {
        let route = json!({
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "GRPCRoute",
            "metadata": {"name": "app", "namespace": "shop", "generation": 1},
            "spec": {"rules": [{"backendRefs": [
                {"name": "app-stable", "port": 9000, "weight": 100},
                {"name": "app-canary", "port": 9000, "weight": 0}]}]}
        });
        let mut s = settings();
        s.kind = RouteKind::Grpc;
        s.rule = RuleRef::Index(0);
        s.stable.port = None;
        s.canary.port = None;
        s.testers = Some(testers());
        let after = apply(
            &route,
            &plan_patch(&route, &s, &during(50)).unwrap().unwrap(),
        );
        assert_eq!(
            after["spec"]["rules"][1]["matches"],
            json!([{"headers": [{"type": "Exact", "name": "stage", "value": "canary"}]}])
        );
        assert_eq!(
            read_weights(&after, &s).unwrap(),
            Weights::canary_percent(50)
        );
    }

    fn with_parents(generation: i64, parents: Value) -> Value {
        let mut route = http_route();
        route["metadata"]["generation"] = json!(generation);
        route["status"] = json!({"parents": parents});
        route
    }

    fn parent(accepted: (&str, i64), resolved: (&str, i64)) -> Value {
        json!({
            "parentRef": {"name": "public", "namespace": "gateways"},
            "controllerName": "example.com/gateway",
            "conditions": [
                {"type": "Accepted", "status": accepted.0, "reason": "NotAllowedByListeners",
                 "message": "no listener allows shop", "observedGeneration": accepted.1},
                {"type": "ResolvedRefs", "status": resolved.0, "reason": "BackendNotFound",
                 "message": "service app-canary not found", "observedGeneration": resolved.1}
            ]
        })
    }

    #[test]
    fn acceptance_needs_both_conditions_true_for_this_generation_on_every_parent() {
        assert!(
            matches!(acceptance(&http_route()), Acceptance::Pending(m) if m.contains("status.parents is empty"))
        );
        let ok = with_parents(3, json!([parent(("True", 3), ("True", 3))]));
        assert_eq!(acceptance(&ok), Acceptance::Accepted);
        let stale = with_parents(4, json!([parent(("True", 3), ("True", 3))]));
        assert!(
            matches!(acceptance(&stale), Acceptance::Pending(m) if m.contains("Gateway gateways/public has not processed generation 4"))
        );
        let refused = with_parents(3, json!([parent(("False", 3), ("True", 3))]));
        assert_eq!(
            acceptance(&refused),
            Acceptance::Rejected(
                "Gateway gateways/public: Accepted is False (NotAllowedByListeners: no listener allows shop)".into()
            )
        );
        let unresolved = with_parents(3, json!([parent(("True", 3), ("False", 3))]));
        assert!(
            matches!(acceptance(&unresolved), Acceptance::Rejected(m) if m.contains("ResolvedRefs is False (BackendNotFound"))
        );
        let second_refuses = with_parents(
            3,
            json!([
                parent(("True", 3), ("True", 3)),
                parent(("False", 3), ("True", 3))
            ]),
        );
        assert!(matches!(
            acceptance(&second_refuses),
            Acceptance::Rejected(_)
        ));
    }

    #[test]
    fn settings_from_spec_name_the_managed_rules() {
        let yaml = r#"
service: app
stable: {subset: stable}
canary: {subset: canary}
metricsSource: {envoyAdmin: {urls: ["http://127.0.0.1:15000"]}}
router:
  gatewayApi:
    grpcRoute: app
    rule: 0
    stableBackend: {name: app-stable}
    canaryBackend: {name: app-canary}
    headerRoute: {headers: {stage: canary}}
analysis: {stepWeights: [10], guard: {}}
"#;
        let spec: CanarySpec = serde_yaml::from_str(yaml).unwrap();
        let s = GatewayApiSettings::from_spec(&spec, "shop").unwrap();
        assert_eq!(s.kind, RouteKind::Grpc);
        assert_eq!(s.testers.unwrap().name, "rule-0-canary-testers");
        assert_eq!(s.guard.unwrap().name, "rule-0-fledge-guard");
        assert_eq!(
            GatewayApiSettings::from_spec(&spec, "shop")
                .unwrap()
                .route_key()
                .to_string(),
            "GRPCRoute shop/app route \"0\""
        );
    }
}
