//! Router spec parts beyond the basics in [`crate::spec`]: the Gateway API router
//! (`spec.router.gatewayApi`), and the testers' match conditions shared by the Istio and Gateway
//! API routers (`headerRoute`), with their validation. Every problem names its field and fix.

use crate::names::{is_object_name, is_section_name};
use crate::spec::{HeaderRouteSpec, SpecError};
use serde::{Deserialize, Serialize};

/// The Gateway API router: Fledge changes only the weights of the stable and canary backendRefs
/// of one rule in an HTTPRoute (or GRPCRoute) you own, and while a rollout runs it adds — and
/// afterwards removes — a testers rule, a guard rule and a mirror filter. Your filters and
/// other rules are kept. Metrics are judged only once every parent Gateway reports the route
/// `Accepted` and `ResolvedRefs` for the written generation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewayApiRouterSpec {
    /// Name of the HTTPRoute (gateway.networking.k8s.io/v1), in the Canary's namespace. Set
    /// this or `grpcRoute`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_route: Option<String>,
    /// Name of the GRPCRoute (gateway.networking.k8s.io/v1), in the Canary's namespace. Set
    /// this or `httpRoute`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_route: Option<String>,
    /// The rule whose two backendRefs are weighted: its `name` (Gateway API v1.2+), or its
    /// index in `spec.rules` (0 is the first).
    pub rule: RuleRef,
    /// The backendRef of the stable version in that rule, e.g. `{name: app-stable, port: 80}`.
    pub stable_backend: BackendRefSpec,
    /// The backendRef of the canary version in that rule, e.g. `{name: app-canary, port: 80}`.
    pub canary_backend: BackendRefSpec,
    /// Testers first: while the rollout runs, matching requests always go to the canary,
    /// through a rule Fledge adds to the route (it has more header matches than `rule`, so it
    /// takes precedence).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header_route: Option<HeaderRouteSpec>,
    /// While the rollout runs, copy this percentage of the rule's traffic to the canary (a
    /// `RequestMirror` filter Fledge adds to the rule; mirrored responses are discarded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror_percentage: Option<f64>,
}

/// A rule of a route: by `name`, or by its index in `spec.rules`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RuleRef {
    Index(u32),
    Name(String),
}

#[cfg(feature = "schema")]
impl schemars::JsonSchema for RuleRef {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "RuleRef".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({"x-kubernetes-int-or-string": true})
    }

    fn inline_schema() -> bool {
        true
    }
}

impl std::fmt::Display for RuleRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RuleRef::Index(index) => write!(f, "rules[{index}]"),
            RuleRef::Name(name) => write!(f, "rule {name:?}"),
        }
    }
}

/// A backendRef of the weighted rule (a Gateway API `BackendObjectReference`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendRefSpec {
    /// The backend's name, e.g. the Service `app-canary`.
    pub name: String,
    /// Its port; when unset, a backendRef of this name with any port matches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Its namespace. Default: the route's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Its kind. Default: `Service`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Its API group. Default: `""` (core).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

impl BackendRefSpec {
    pub fn kind(&self) -> &str {
        self.kind.as_deref().unwrap_or("Service")
    }

    pub fn group(&self) -> &str {
        self.group.as_deref().unwrap_or("")
    }
}

impl GatewayApiRouterSpec {
    /// The route's kind and name (`HTTPRoute` or `GRPCRoute`), if exactly one is set.
    pub fn route(&self) -> Option<(&'static str, &str)> {
        match (&self.http_route, &self.grpc_route) {
            (Some(http), None) => Some(("HTTPRoute", http.as_str())),
            (None, Some(grpc)) => Some(("GRPCRoute", grpc.as_str())),
            _ => None,
        }
    }

    /// How the weighted rule is named in the rules Fledge adds: its name, or `rule-<index>`.
    pub fn rule_label(&self) -> String {
        match &self.rule {
            RuleRef::Name(name) => name.clone(),
            RuleRef::Index(index) => format!("rule-{index}"),
        }
    }

    /// Name of the testers rule, if one is configured. Default: `<rule>-canary-testers`.
    pub fn header_route_name(&self) -> Option<String> {
        self.header_route.as_ref().map(|h| {
            h.name
                .clone()
                .unwrap_or_else(|| format!("{}-canary-testers", self.rule_label()))
        })
    }

    /// Name of the guard rule (present while a rollout with `analysis.guard` runs).
    pub fn guard_rule_name(&self) -> String {
        format!("{}-fledge-guard", self.rule_label())
    }
}

/// More conditions a testers' request must meet (ANDed with `headers` and `cookie`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderMatchSpec {
    /// The request header (lowercase name), e.g. `user-agent`.
    pub name: String,
    /// The header equals this value. Set exactly one of `exact`, `prefix` and `regex`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    /// The header starts with this value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// The whole header value matches this RE2 regular expression, e.g. `.*Firefox.*`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
}

/// A cookie that selects the testers' requests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CookieMatchSpec {
    /// The cookie's name, e.g. `canary`.
    pub name: String,
    /// Its value, e.g. `always`.
    pub value: String,
}

/// How one request header is matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderMatcher {
    Exact(String),
    Prefix(String),
    /// RE2, matching the whole value.
    Regex(String),
}

impl HeaderMatcher {
    /// As a whole-value RE2 regular expression (for APIs without prefix matches).
    pub fn to_regex(&self) -> String {
        match self {
            HeaderMatcher::Exact(value) => regex_escape(value),
            HeaderMatcher::Prefix(prefix) => format!("{}.*", regex_escape(prefix)),
            HeaderMatcher::Regex(regex) => regex.clone(),
        }
    }
}

/// One condition of the testers route: a request header and how it is matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TesterCondition {
    /// Lowercase header name.
    pub header: String,
    pub matcher: HeaderMatcher,
}

impl HeaderRouteSpec {
    /// Every condition a testers' request meets, in a stable order: `headers` (exact, by
    /// name), then `headerMatches`, then the cookie (a regex on the `cookie` header).
    pub fn conditions(&self) -> Vec<TesterCondition> {
        let mut conditions: Vec<TesterCondition> = self
            .headers
            .iter()
            .map(|(name, value)| TesterCondition {
                header: name.clone(),
                matcher: HeaderMatcher::Exact(value.clone()),
            })
            .collect();
        for m in &self.header_matches {
            let matcher = match (&m.exact, &m.prefix, &m.regex) {
                (Some(exact), _, _) => HeaderMatcher::Exact(exact.clone()),
                (None, Some(prefix), _) => HeaderMatcher::Prefix(prefix.clone()),
                (None, None, Some(regex)) => HeaderMatcher::Regex(regex.clone()),
                (None, None, None) => continue, // rejected by validation
            };
            conditions.push(TesterCondition {
                header: m.name.clone(),
                matcher,
            });
        }
        if let Some(cookie) = &self.cookie {
            conditions.push(TesterCondition {
                header: "cookie".into(),
                matcher: HeaderMatcher::Regex(cookie_regex(&cookie.name, &cookie.value)),
            });
        }
        conditions
    }
}

/// The RE2 expression matching a `cookie` request header that carries `name=value`.
pub fn cookie_regex(name: &str, value: &str) -> String {
    format!(
        r"^(.*;\s*)?{}={}(;.*)?$",
        regex_escape(name),
        regex_escape(value)
    )
}

/// `text` as an RE2 literal.
pub fn regex_escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

fn problem(field: String, problem: impl Into<String>, fix: impl Into<String>) -> SpecError {
    SpecError {
        field,
        problem: problem.into(),
        fix: fix.into(),
    }
}

/// Problems with a testers route at `base` (e.g. `spec.router.istio.headerRoute`) of a router
/// whose weighted route is called `weighted`.
pub fn validate_header_route(
    base: &str,
    route: &HeaderRouteSpec,
    weighted: &str,
) -> Vec<SpecError> {
    let mut problems = Vec::new();
    if route.headers.is_empty() && route.header_matches.is_empty() && route.cookie.is_none() {
        problems.push(problem(
            format!("{base}.headers"),
            "is empty, and there are no headerMatches or cookie",
            "list what selects the testers, e.g. `headers: {stage: canary}`, `headerMatches: [{name: user-agent, regex: \".*Firefox.*\"}]` or `cookie: {name: canary, value: always}`",
        ));
    }
    let lowercase = |name: &str| {
        !name.is_empty()
            && !name
                .chars()
                .any(|c| c.is_ascii_uppercase() || c.is_whitespace())
    };
    for name in route.headers.keys() {
        if !lowercase(name) {
            problems.push(problem(
                format!("{base}.headers.{name}"),
                "is not a lowercase header name (Istio matches lowercase names only)",
                format!("write `{}`", name.to_ascii_lowercase().trim()),
            ));
        }
    }
    for (i, m) in route.header_matches.iter().enumerate() {
        let field = format!("{base}.headerMatches[{i}]");
        if !lowercase(&m.name) {
            problems.push(problem(
                format!("{field}.name"),
                format!("{:?} is not a lowercase header name", m.name),
                format!("write `name: {}`", m.name.to_ascii_lowercase().trim()),
            ));
        }
        let set = [&m.exact, &m.prefix, &m.regex]
            .iter()
            .filter(|v| v.is_some())
            .count();
        if set != 1 {
            problems.push(problem(
                field.clone(),
                format!("sets {set} of exact, prefix and regex"),
                "set exactly one, e.g. `{name: user-agent, prefix: \"Mozilla/\"}`",
            ));
        }
        for (kind, value) in [
            ("exact", &m.exact),
            ("prefix", &m.prefix),
            ("regex", &m.regex),
        ] {
            if value.as_deref() == Some("") {
                problems.push(problem(
                    format!("{field}.{kind}"),
                    "is empty",
                    "write the value to match, or drop the match",
                ));
            }
        }
    }
    if let Some(cookie) = &route.cookie {
        let token = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_graphic() && !";,=\"\\".contains(c))
        };
        if !token(&cookie.name) {
            problems.push(problem(
                format!("{base}.cookie.name"),
                format!("{:?} is not a cookie name", cookie.name),
                "write e.g. `name: canary`",
            ));
        }
        if !token(&cookie.value) {
            problems.push(problem(
                format!("{base}.cookie.value"),
                format!("{:?} is not a plain cookie value", cookie.value),
                "write e.g. `value: always` (no spaces, `;`, `,`, `=` or quotes)",
            ));
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    for condition in route.conditions() {
        if !seen.insert(condition.header.to_ascii_lowercase()) {
            problems.push(problem(
                format!("{base}.headerMatches"),
                format!(
                    "matches header {:?} twice (a cookie is matched in the `cookie` header)",
                    condition.header
                ),
                "keep one condition per header",
            ));
        }
    }
    if route.name.as_deref() == Some(weighted) {
        problems.push(problem(
            format!("{base}.name"),
            "is the same as the weighted route",
            "give the inserted route its own name, or drop `name` for the default",
        ));
    }
    problems
}

/// Problems with `spec.router.gatewayApi`.
pub fn validate_gateway_api(spec: &GatewayApiRouterSpec) -> Vec<SpecError> {
    let base = "spec.router.gatewayApi";
    let mut problems = Vec::new();
    match (&spec.http_route, &spec.grpc_route) {
        (None, None) => problems.push(problem(
            format!("{base}.httpRoute"),
            "names no route",
            "write the name of your HTTPRoute, e.g. `httpRoute: app` (or `grpcRoute: app`)",
        )),
        (Some(_), Some(_)) => problems.push(problem(
            format!("{base}.grpcRoute"),
            "is set together with httpRoute",
            "keep exactly one of httpRoute and grpcRoute",
        )),
        (Some(name), None) | (None, Some(name)) if !is_object_name(name) => {
            let field = if spec.http_route.is_some() {
                "httpRoute"
            } else {
                "grpcRoute"
            };
            problems.push(problem(
                format!("{base}.{field}"),
                format!("{name:?} is not a Kubernetes object name"),
                "write the route's name in the Canary's namespace, e.g. `httpRoute: app`",
            ));
        }
        _ => {}
    }
    match &spec.rule {
        RuleRef::Name(name) if !is_section_name(name) => problems.push(problem(
            format!("{base}.rule"),
            format!("{name:?} is not a rule name"),
            "write the rule's `name` (lowercase letters, digits and `-`), or its index, e.g. `rule: 0`",
        )),
        RuleRef::Index(index) if *index >= 16 => problems.push(problem(
            format!("{base}.rule"),
            format!("index {index} is past the 16 rules a route may have"),
            "write the rule's index from 0, or its `name`",
        )),
        _ => {}
    }
    for (field, backend) in [
        ("stableBackend", &spec.stable_backend),
        ("canaryBackend", &spec.canary_backend),
    ] {
        if !is_object_name(&backend.name) {
            problems.push(problem(
                format!("{base}.{field}.name"),
                format!("{:?} is not a Kubernetes object name", backend.name),
                "write the backend's (Service's) name, e.g. `name: app-canary`",
            ));
        }
        if backend.port == Some(0) {
            problems.push(problem(
                format!("{base}.{field}.port"),
                "is 0",
                "write the backendRef's port, e.g. `port: 80`, or drop it",
            ));
        }
        if let Some(namespace) = &backend.namespace {
            if !is_object_name(namespace) {
                problems.push(problem(
                    format!("{base}.{field}.namespace"),
                    format!("{namespace:?} is not a namespace name"),
                    "write the backend's namespace, or drop it for the route's",
                ));
            }
        }
    }
    if spec.stable_backend == spec.canary_backend {
        problems.push(problem(
            format!("{base}.canaryBackend"),
            "is the same as stableBackend",
            "name the two different backendRefs of the rule, e.g. `app-stable` and `app-canary`",
        ));
    }
    if let Some(percentage) = spec.mirror_percentage {
        if !(percentage > 0.0 && percentage <= 100.0) {
            problems.push(problem(
                format!("{base}.mirrorPercentage"),
                format!("{percentage} is not above 0 and at most 100"),
                "write e.g. `mirrorPercentage: 10`, or drop it to mirror nothing",
            ));
        }
    }
    if let Some(header_route) = &spec.header_route {
        let field = format!("{base}.headerRoute");
        problems.extend(validate_header_route(
            &field,
            header_route,
            &spec.rule_label(),
        ));
        if let Some(name) = &header_route.name {
            if !is_section_name(name) {
                problems.push(problem(
                    format!("{field}.name"),
                    format!("{name:?} is not a rule name"),
                    "write lowercase letters, digits and `-`, or drop `name` for the default",
                ));
            }
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn testers_conditions_cover_headers_matches_and_the_cookie() {
        let route = HeaderRouteSpec {
            name: None,
            headers: BTreeMap::from([("stage".to_string(), "canary".to_string())]),
            header_matches: vec![
                HeaderMatchSpec {
                    name: "x-team".into(),
                    exact: None,
                    prefix: Some("qa.".into()),
                    regex: None,
                },
                HeaderMatchSpec {
                    name: "user-agent".into(),
                    exact: None,
                    prefix: None,
                    regex: Some(".*Firefox.*".into()),
                },
            ],
            cookie: Some(CookieMatchSpec {
                name: "canary".into(),
                value: "always".into(),
            }),
        };
        let conditions = route.conditions();
        assert_eq!(conditions.len(), 4);
        assert_eq!(conditions[0].matcher, HeaderMatcher::Exact("canary".into()));
        assert_eq!(conditions[1].matcher.to_regex(), r"qa\..*");
        assert_eq!(conditions[2].matcher.to_regex(), ".*Firefox.*");
        assert_eq!(conditions[3].header, "cookie");
        assert_eq!(
            conditions[3].matcher.to_regex(),
            r"^(.*;\s*)?canary=always(;.*)?$"
        );
        assert_eq!(regex_escape("a.b*(c)"), r"a\.b\*\(c\)");
    }

    fn gateway(yaml: &str) -> GatewayApiRouterSpec {
        serde_yaml::from_str(yaml).unwrap()
    }

    const VALID: &str = "{httpRoute: app, rule: primary, stableBackend: {name: app-stable, port: 80}, canaryBackend: {name: app-canary, port: 80}}";

    #[test]
    fn gateway_api_spec_errors_name_the_field_and_the_fix() {
        assert_eq!(validate_gateway_api(&gateway(VALID)), vec![]);
        type Mutate = fn(&mut GatewayApiRouterSpec);
        let cases: &[(Mutate, &str, &str)] = &[
            (
                |g| g.http_route = None,
                "spec.router.gatewayApi.httpRoute",
                "(or `grpcRoute: app`)",
            ),
            (
                |g| g.grpc_route = Some("app".into()),
                "spec.router.gatewayApi.grpcRoute",
                "keep exactly one",
            ),
            (
                |g| g.http_route = Some("App".into()),
                "spec.router.gatewayApi.httpRoute",
                "e.g. `httpRoute: app`",
            ),
            (
                |g| g.rule = RuleRef::Name("Primary Rule".into()),
                "spec.router.gatewayApi.rule",
                "or its index",
            ),
            (
                |g| g.rule = RuleRef::Index(16),
                "spec.router.gatewayApi.rule",
                "from 0",
            ),
            (
                |g| g.canary_backend = g.stable_backend.clone(),
                "spec.router.gatewayApi.canaryBackend",
                "two different backendRefs",
            ),
            (
                |g| g.stable_backend.port = Some(0),
                "spec.router.gatewayApi.stableBackend.port",
                "e.g. `port: 80`",
            ),
            (
                |g| g.canary_backend.name = String::new(),
                "spec.router.gatewayApi.canaryBackend.name",
                "e.g. `name: app-canary`",
            ),
            (
                |g| g.mirror_percentage = Some(0.0),
                "spec.router.gatewayApi.mirrorPercentage",
                "e.g. `mirrorPercentage: 10`",
            ),
            (
                |g| {
                    g.header_route = Some(HeaderRouteSpec {
                        name: Some("primary".into()),
                        headers: [("stage".to_string(), "canary".to_string())].into(),
                        header_matches: vec![],
                        cookie: None,
                    })
                },
                "spec.router.gatewayApi.headerRoute.name",
                "its own name",
            ),
            (
                |g| {
                    g.header_route = Some(HeaderRouteSpec {
                        name: None,
                        headers: BTreeMap::new(),
                        header_matches: vec![HeaderMatchSpec {
                            name: "x-team".into(),
                            exact: Some("a".into()),
                            prefix: Some("b".into()),
                            regex: None,
                        }],
                        cookie: None,
                    })
                },
                "spec.router.gatewayApi.headerRoute.headerMatches[0]",
                "set exactly one",
            ),
            (
                |g| {
                    g.header_route = Some(HeaderRouteSpec {
                        name: None,
                        headers: BTreeMap::new(),
                        header_matches: vec![],
                        cookie: Some(CookieMatchSpec {
                            name: "canary".into(),
                            value: "a b".into(),
                        }),
                    })
                },
                "spec.router.gatewayApi.headerRoute.cookie.value",
                "no spaces",
            ),
            (
                |g| {
                    g.header_route = Some(HeaderRouteSpec {
                        name: None,
                        headers: BTreeMap::new(),
                        header_matches: vec![],
                        cookie: None,
                    })
                },
                "spec.router.gatewayApi.headerRoute.headers",
                "cookie: {name: canary, value: always}",
            ),
        ];
        for (mutate, field, fix) in cases {
            let mut spec = gateway(VALID);
            mutate(&mut spec);
            let errors = validate_gateway_api(&spec);
            let error = errors
                .iter()
                .find(|e| e.field == *field)
                .unwrap_or_else(|| panic!("no error on {field}: {errors:?}"));
            assert!(error.to_string().contains(fix), "{error}");
        }
    }

    #[test]
    fn rule_refs_read_as_a_name_or_an_index() {
        let by_index: RuleRef = serde_yaml::from_str("0").unwrap();
        assert_eq!(by_index, RuleRef::Index(0));
        let by_name: RuleRef = serde_yaml::from_str("primary").unwrap();
        assert_eq!(by_name, RuleRef::Name("primary".into()));
        assert_eq!(serde_json::to_string(&by_index).unwrap(), "0");
    }
}
