//! Strict parsing of the plugin configuration JSON, field by field: unknown keys and wrong
//! types are errors that name the field and say what to write instead.

use super::*;
use crate::contract;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// Why a plugin configuration was rejected. Every message names the field (a path such as
/// `clusters.app_canary.subset`) and says what to write instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterConfigError {
    #[error("plugin configuration is not valid JSON ({0}); write a JSON object such as {EXAMPLE}")]
    Syntax(String),
    #[error("{field}: expected {expected}, found {found}")]
    WrongType {
        field: String,
        expected: &'static str,
        found: &'static str,
    },
    #[error("{field}: missing; write {expected}")]
    Missing {
        field: String,
        expected: &'static str,
    },
    #[error("{field}: must not be empty; write {expected}")]
    Empty {
        field: String,
        expected: &'static str,
    },
    #[error("{field}: unknown key{hint}; allowed keys are {allowed}")]
    UnknownKey {
        field: String,
        /// ` (did you mean "x"?)` or empty.
        hint: String,
        allowed: &'static str,
    },
    #[error("{field}: {problem}")]
    Invalid { field: String, problem: String },
}

impl FilterConfigError {
    /// The offending field's path (`(root)` for the document itself, empty for syntax errors).
    pub fn field(&self) -> &str {
        match self {
            FilterConfigError::Syntax(_) => "",
            FilterConfigError::WrongType { field, .. }
            | FilterConfigError::Missing { field, .. }
            | FilterConfigError::Empty { field, .. }
            | FilterConfigError::UnknownKey { field, .. }
            | FilterConfigError::Invalid { field, .. } => field,
        }
    }

    fn invalid(field: &str, problem: impl Into<String>) -> Self {
        FilterConfigError::Invalid {
            field: field.to_string(),
            problem: problem.into(),
        }
    }
}

const EXAMPLE: &str = r#"{"clusters": {"app_canary": {"service": "app", "subset": "canary"}}, "istioClusterNames": true}"#;
const ROOT_KEYS: [&str; 12] = [
    "clusters",
    "istioClusterNames",
    "endpointMetadata",
    "subsetHeader",
    "clusterHeader",
    "responseHeader",
    "routeHeader",
    "clearRouteCache",
    "forceCanary",
    "sticky",
    "guard",
    "durationBucketsMs",
];
pub(super) const ROOT_ALLOWED: &str = "clusters, istioClusterNames, endpointMetadata, subsetHeader, clusterHeader, responseHeader, routeHeader, clearRouteCache, forceCanary, sticky, guard, durationBucketsMs";
const GUARD_KEYS: [&str; 2] = ["header", "services"];
const GUARD_SERVICE_KEYS: [&str; 5] = [
    "canarySubset",
    "maxErrorRatio",
    "minRequests",
    "windowSeconds",
    "rearmSeconds",
];
const GUARD_SERVICE_ALLOWED: &str =
    "canarySubset, maxErrorRatio, minRequests, windowSeconds, rearmSeconds";
const CLUSTER_KEYS: [&str; 2] = ["service", "subset"];
const FORCE_KEYS: [&str; 5] = [
    "header",
    "value",
    "secret",
    "sourceCidrs",
    "maxTokenLifetimeSeconds",
];
const FORCE_ALLOWED: &str = "header, value, secret, sourceCidrs, maxTokenLifetimeSeconds";
const STICKY_KEYS: [&str; 4] = ["cookie", "header", "salt", "buckets"];
const STICKY_ALLOWED: &str = "cookie, header, salt, buckets";
const HEADER_NAME: &str = "a lowercase HTTP header name such as \"x-fledge-subset\"";

impl FilterConfig {
    /// Parse the plugin configuration as Envoy hands it over (raw bytes). Empty or
    /// whitespace-only input, or JSON `null`, means the defaults.
    pub fn parse_bytes(raw: &[u8]) -> Result<Self, FilterConfigError> {
        let text = std::str::from_utf8(raw).map_err(|e| {
            FilterConfigError::Syntax(format!("not UTF-8 at byte {}", e.valid_up_to()))
        })?;
        Self::parse(text)
    }

    /// Parse the plugin configuration JSON. Empty or whitespace-only input, or JSON `null`,
    /// means the defaults.
    pub fn parse(text: &str) -> Result<Self, FilterConfigError> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        let value: Value =
            serde_json::from_str(text).map_err(|e| FilterConfigError::Syntax(e.to_string()))?;
        Self::from_value(&value)
    }

    /// Validate an already-parsed JSON value (e.g. a `pluginConfig` struct embedded elsewhere).
    pub fn from_value(value: &Value) -> Result<Self, FilterConfigError> {
        let root =
            match value {
                Value::Null => return Ok(Self::default()),
                Value::Object(map) => map,
                other => return Err(FilterConfigError::WrongType {
                    field: "(root)".to_string(),
                    expected:
                        "a JSON object such as {\"clusters\": {...}, \"istioClusterNames\": true}",
                    found: kind(other),
                }),
            };
        reject_unknown(root, "", &ROOT_KEYS, ROOT_ALLOWED)?;

        let mut config = Self::default();
        if let Some(b) = opt_bool(root, "", "istioClusterNames")? {
            config.istio_cluster_names = b;
        }
        if let Some(b) = opt_bool(root, "", "endpointMetadata")? {
            config.endpoint_metadata = b;
        }
        if let Some(b) = opt_bool(root, "", "clearRouteCache")? {
            config.clear_route_cache = b;
        }
        config.subset_header = opt_header_name(root, "", "subsetHeader")?;
        config.response_header = opt_header_name(root, "", "responseHeader")?;
        config.cluster_header = opt_header_name(root, "", "clusterHeader")?;
        if let Some(name) = opt_header_name(root, "", "routeHeader")? {
            config.route_header = name;
        }
        match root.get("clusters") {
            None | Some(Value::Null) => {}
            Some(Value::Object(clusters)) => {
                for (name, entry) in clusters {
                    let path = format!("clusters{}", path_segment(name));
                    config
                        .clusters
                        .insert(name.clone(), parse_cluster(entry, &path)?);
                }
            }
            Some(other) => {
                return Err(FilterConfigError::WrongType {
                    field: "clusters".to_string(),
                    expected: "an object mapping Envoy cluster names to subsets, such as {\"app_canary\": {\"service\": \"app\", \"subset\": \"canary\"}}",
                    found: kind(other),
                })
            }
        }
        config.force_canary = match root.get("forceCanary") {
            None | Some(Value::Null) => None,
            Some(value) => Some(parse_force_canary(value)?),
        };
        config.sticky = match root.get("sticky") {
            None | Some(Value::Null) => None,
            Some(value) => Some(parse_sticky(value)?),
        };
        config.guard = match root.get("guard") {
            None | Some(Value::Null) => None,
            Some(value) => Some(parse_guard(value)?),
        };
        if let Some(value) = root.get("durationBucketsMs").filter(|v| !v.is_null()) {
            config.duration_buckets_ms = parse_duration_buckets(value)?;
        }
        config.check_header_clashes()?;
        Ok(config)
    }

    /// The routing header must be the filter's alone: a client-supplied key or force header with
    /// the same name would let clients write it.
    fn check_header_clashes(&self) -> Result<(), FilterConfigError> {
        let route = self.route_header.as_str();
        self.check_cluster_header()?;
        if let Some(guard) = &self.guard {
            let clash = if guard.header == route {
                Some("routeHeader")
            } else if self
                .force_canary
                .as_ref()
                .is_some_and(|f| f.header == guard.header)
            {
                Some("forceCanary.header")
            } else if matches!(&self.sticky, Some(Sticky { key: StickyKey::Header(h), .. }) if *h == guard.header)
            {
                Some("sticky.header")
            } else {
                None
            };
            if let Some(other) = clash {
                return Err(FilterConfigError::invalid(
                    "guard.header",
                    format!(
                        "must differ from {other} ({:?}); the filter strips and writes it itself",
                        guard.header
                    ),
                ));
            }
        }
        if let Some(force) = &self.force_canary {
            if force.header == route {
                return Err(FilterConfigError::invalid(
                    "forceCanary.header",
                    format!("must differ from routeHeader {route:?}, which the filter strips and writes itself"),
                ));
            }
        }
        if let Some(Sticky {
            key: StickyKey::Header(name),
            ..
        }) = &self.sticky
        {
            if name == route {
                return Err(FilterConfigError::invalid(
                    "sticky.header",
                    format!("must differ from routeHeader {route:?}, which the filter strips and writes itself"),
                ));
            }
            if self
                .force_canary
                .as_ref()
                .is_some_and(|f| &f.header == name)
            {
                return Err(FilterConfigError::invalid(
                    "sticky.header",
                    "must differ from forceCanary.header, which is stripped from every request",
                ));
            }
        }
        Ok(())
    }
}

impl FilterConfig {
    /// `clusterHeader` must name a header only Envoy's route writes: the subset or version
    /// headers carry other values, and the route header is the client's to try.
    fn check_cluster_header(&self) -> Result<(), FilterConfigError> {
        let Some(name) = self.cluster_header.as_deref() else {
            return Ok(());
        };
        let clash = [
            ("responseHeader", self.response_header.as_deref()),
            ("subsetHeader", self.subset_header.as_deref()),
            ("routeHeader", Some(self.route_header.as_str())),
        ]
        .into_iter()
        .find(|(_, other)| *other == Some(name));
        match clash {
            Some((other, _)) => Err(FilterConfigError::invalid(
                "clusterHeader",
                format!(
                    "must differ from {other} ({name:?}): it names the upstream cluster, which \
                     Envoy's route writes; use another name such as \"x-fledge-cluster\""
                ),
            )),
            None => Ok(()),
        }
    }

    /// Parse a plugin configuration for `module`: [`FilterConfig::parse_bytes`], then
    /// [`FilterConfig::check_module`].
    pub fn parse_for(module: FilterModule, raw: &[u8]) -> Result<Self, FilterConfigError> {
        let config = Self::parse_bytes(raw)?;
        config.check_module(module)?;
        Ok(config)
    }

    /// Whether `module` can do everything this configuration asks for. The observer cannot
    /// write headers, so a setting that writes or strips one is an error naming the setting and
    /// the module that has it (a configuration that would silently do nothing is not valid).
    pub fn check_module(&self, module: FilterModule) -> Result<(), FilterConfigError> {
        if module == FilterModule::Full {
            return Ok(());
        }
        let needs_full = [
            ("responseHeader", self.response_header.is_some()),
            ("forceCanary", self.force_canary.is_some()),
            ("sticky", self.sticky.is_some()),
            ("guard", self.guard.is_some()),
            (
                "routeHeader",
                self.route_header != contract::DEFAULT_ROUTE_HEADER,
            ),
            ("clearRouteCache", self.clear_route_cache),
        ];
        match needs_full.iter().find(|(_, set)| *set) {
            Some((field, _)) => Err(FilterConfigError::invalid(
                field,
                format!(
                    "needs {}, which can change headers; {} only records metrics (remove \
                     {field}, or load {})",
                    FilterModule::Full.file_name(),
                    FilterModule::Observer.file_name(),
                    FilterModule::Full.file_name(),
                ),
            )),
            None => Ok(()),
        }
    }
}

impl TryFrom<Value> for FilterConfig {
    type Error = FilterConfigError;
    fn try_from(value: Value) -> Result<Self, Self::Error> {
        Self::from_value(&value)
    }
}

fn parse_cluster(entry: &Value, path: &str) -> Result<ClusterSubset, FilterConfigError> {
    const ENTRY: &str = "an object such as {\"service\": \"app\", \"subset\": \"canary\"}";
    let Value::Object(map) = entry else {
        return Err(FilterConfigError::WrongType {
            field: path.to_string(),
            expected: ENTRY,
            found: kind(entry),
        });
    };
    reject_unknown(map, path, &CLUSTER_KEYS, "service, subset")?;
    let service = string_field(map, path, "service", "a string like \"app\"")?;
    let subset = match map.get("subset") {
        None | Some(Value::Null) => None,
        Some(_) => Some(string_field(
            map,
            path,
            "subset",
            "a string like \"canary\"",
        )?),
    };
    Ok(ClusterSubset { service, subset })
}

fn parse_force_canary(value: &Value) -> Result<ForceCanary, FilterConfigError> {
    const PATH: &str = "forceCanary";
    let Value::Object(map) = value else {
        return Err(FilterConfigError::WrongType {
            field: PATH.to_string(),
            expected: "an object such as {\"header\": \"x-fledge-stage\", \"secret\": \"...\"}",
            found: kind(value),
        });
    };
    reject_unknown(map, PATH, &FORCE_KEYS, FORCE_ALLOWED)?;
    let header =
        opt_header_name(map, PATH, "header")?.unwrap_or_else(|| DEFAULT_FORCE_HEADER.to_string());
    let value = match map.get("value") {
        None | Some(Value::Null) => DEFAULT_FORCE_VALUE.to_string(),
        Some(_) => string_field(map, PATH, "value", "a string like \"canary\"")?
            .trim()
            .to_string(),
    };
    let secret = match map.get("secret") {
        None | Some(Value::Null) => None,
        Some(_) => {
            let secret = string_field(
                map,
                PATH,
                "secret",
                "a random string of at least 16 bytes, e.g. from `openssl rand -hex 32`",
            )?;
            if secret.len() < MIN_SECRET_BYTES {
                return Err(FilterConfigError::invalid(
                    "forceCanary.secret",
                    format!(
                        "is {} bytes; use at least {MIN_SECRET_BYTES} random bytes, e.g. `openssl rand -hex 32`",
                        secret.len()
                    ),
                ));
            }
            Some(secret)
        }
    };
    let mut source_cidrs = Vec::new();
    match map.get("sourceCidrs") {
        None | Some(Value::Null) => {}
        Some(Value::Array(items)) => {
            for (index, item) in items.iter().enumerate() {
                let field = format!("forceCanary.sourceCidrs[{index}]");
                let Value::String(text) = item else {
                    return Err(FilterConfigError::WrongType {
                        field,
                        expected: "a network such as \"10.0.0.0/8\"",
                        found: kind(item),
                    });
                };
                source_cidrs.push(
                    text.parse::<Cidr>()
                        .map_err(|problem| FilterConfigError::invalid(&field, problem))?,
                );
            }
        }
        Some(other) => {
            return Err(FilterConfigError::WrongType {
                field: "forceCanary.sourceCidrs".to_string(),
                expected: "a list of networks such as [\"10.0.0.0/8\"]",
                found: kind(other),
            })
        }
    }
    let max_token_lifetime_seconds = match map.get("maxTokenLifetimeSeconds") {
        None | Some(Value::Null) => DEFAULT_MAX_TOKEN_LIFETIME_SECONDS,
        Some(v) => v
            .as_u64()
            .filter(|n| *n > 0)
            .ok_or_else(|| FilterConfigError::WrongType {
                field: "forceCanary.maxTokenLifetimeSeconds".to_string(),
                expected: "a whole number of seconds > 0, such as 86400",
                found: kind(v),
            })?,
    };
    if secret.is_none() && source_cidrs.is_empty() {
        return Err(FilterConfigError::invalid(
            PATH,
            "needs \"secret\" and/or \"sourceCidrs\"; without either anyone could force the canary",
        ));
    }
    Ok(ForceCanary {
        header,
        value,
        secret,
        source_cidrs,
        max_token_lifetime_seconds,
    })
}

/// Most duration buckets a configuration may ask for (each is a counter per subset).
pub const MAX_DURATION_BUCKETS: usize = 30;

fn parse_duration_buckets(value: &Value) -> Result<Vec<u32>, FilterConfigError> {
    const PATH: &str = "durationBucketsMs";
    const EXPECTED: &str =
        "an array of bucket bounds in whole milliseconds, increasing, such as [5, 25, 100, 500, 2500]";
    let Value::Array(items) = value else {
        return Err(FilterConfigError::WrongType {
            field: PATH.to_string(),
            expected: EXPECTED,
            found: kind(value),
        });
    };
    if items.is_empty() || items.len() > MAX_DURATION_BUCKETS {
        return Err(FilterConfigError::invalid(
            PATH,
            format!(
                "has {} bounds; give 1 to {MAX_DURATION_BUCKETS} (+Inf is added)",
                items.len()
            ),
        ));
    }
    let mut bounds = Vec::with_capacity(items.len());
    for (index, item) in items.iter().enumerate() {
        let bound = item
            .as_u64()
            .filter(|n| (1..=86_400_000).contains(n))
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| FilterConfigError::WrongType {
                field: format!("{PATH}[{index}]"),
                expected: "a whole number of milliseconds, 1..=86400000",
                found: kind(item),
            })?;
        if bounds.last().is_some_and(|previous| *previous >= bound) {
            return Err(FilterConfigError::invalid(
                &format!("{PATH}[{index}]"),
                format!(
                    "{bound} does not exceed the bound before it; list bounds in increasing order"
                ),
            ));
        }
        bounds.push(bound);
    }
    Ok(bounds)
}

fn parse_sticky(value: &Value) -> Result<Sticky, FilterConfigError> {
    const PATH: &str = "sticky";
    let Value::Object(map) = value else {
        return Err(FilterConfigError::WrongType {
            field: PATH.to_string(),
            expected: "an object such as {\"cookie\": \"session\"} or {\"header\": \"x-user-id\"}",
            found: kind(value),
        });
    };
    reject_unknown(map, PATH, &STICKY_KEYS, STICKY_ALLOWED)?;
    let cookie = match map.get("cookie") {
        None | Some(Value::Null) => None,
        Some(_) => Some(cookie_name(map)?),
    };
    let header = opt_header_name(map, PATH, "header")?;
    let key = match (cookie, header) {
        (Some(cookie), None) => StickyKey::Cookie(cookie),
        (None, Some(header)) => StickyKey::Header(header),
        (Some(_), Some(_)) => {
            return Err(FilterConfigError::invalid(
                PATH,
                "set either \"cookie\" or \"header\", not both",
            ))
        }
        (None, None) => {
            return Err(FilterConfigError::Missing {
                field: "sticky.cookie".to_string(),
                expected: "\"cookie\": \"<cookie name>\" or \"header\": \"<header name>\"",
            })
        }
    };
    let salt = match map.get("salt") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => {
            return Err(FilterConfigError::WrongType {
                field: "sticky.salt".to_string(),
                expected: "a string such as \"rollout-42\"",
                found: kind(other),
            })
        }
    };
    let buckets = match map.get("buckets") {
        None | Some(Value::Null) => DEFAULT_STICKY_BUCKETS,
        Some(v) => v
            .as_u64()
            .filter(|n| (1..=1_000_000_000).contains(n))
            .ok_or_else(|| FilterConfigError::WrongType {
                field: "sticky.buckets".to_string(),
                expected: "a whole number 1..=1000000000, a multiple of the route's total weight such as 10000",
                found: kind(v),
            })?,
    };
    Ok(Sticky { key, salt, buckets })
}

fn parse_guard(value: &Value) -> Result<Guard, FilterConfigError> {
    const PATH: &str = "guard";
    const EXAMPLE: &str = "an object such as {\"services\": {\"app\": {\"maxErrorRatio\": 0.5, \"minRequests\": 20}}}";
    let Value::Object(map) = value else {
        return Err(FilterConfigError::WrongType {
            field: PATH.to_string(),
            expected: EXAMPLE,
            found: kind(value),
        });
    };
    reject_unknown(map, PATH, &GUARD_KEYS, "header, services")?;
    let header = opt_header_name(map, PATH, "header")?
        .unwrap_or_else(|| contract::DEFAULT_GUARD_HEADER.to_string());
    let mut services = BTreeMap::new();
    match map.get("services") {
        Some(Value::Object(entries)) if !entries.is_empty() => {
            for (name, entry) in entries {
                let path = format!("guard.services{}", path_segment(name));
                if contract::sanitize_label_value(name) != *name {
                    return Err(FilterConfigError::invalid(
                        &path,
                        format!(
                            "{name:?} is not a fledge_service label value; write it as the filter records it, e.g. {:?}",
                            contract::sanitize_label_value(name)
                        ),
                    ));
                }
                services.insert(name.clone(), parse_guarded_service(entry, &path)?);
            }
        }
        Some(Value::Object(_)) | None | Some(Value::Null) => {
            return Err(FilterConfigError::Missing {
                field: "guard.services".to_string(),
                expected: "at least one service, e.g. \"services\": {\"app\": {}}",
            })
        }
        Some(other) => {
            return Err(FilterConfigError::WrongType {
                field: "guard.services".to_string(),
                expected: "an object mapping fledge_service values to guards, such as {\"app\": {\"maxErrorRatio\": 0.5}}",
                found: kind(other),
            })
        }
    }
    Ok(Guard { header, services })
}

fn parse_guarded_service(entry: &Value, path: &str) -> Result<GuardedService, FilterConfigError> {
    let Value::Object(map) = entry else {
        return Err(FilterConfigError::WrongType {
            field: path.to_string(),
            expected: "an object such as {\"canarySubset\": \"canary\", \"maxErrorRatio\": 0.5, \"minRequests\": 20}",
            found: kind(entry),
        });
    };
    reject_unknown(map, path, &GUARD_SERVICE_KEYS, GUARD_SERVICE_ALLOWED)?;
    let mut guard = GuardedService::default();
    if map.get("canarySubset").is_some_and(|v| !v.is_null()) {
        let subset = string_field(map, path, "canarySubset", "a string like \"canary\"")?;
        guard.canary_subset = contract::sanitize_label_value(subset.trim());
    }
    // A number of the wrong kind or out of range: name the field, the value and the range.
    let out_of_range = |key: &str, v: &Value, expected: &'static str| match v {
        Value::Number(n) => FilterConfigError::invalid(
            &join_path(path, key),
            format!("{n} is out of range; write {expected}"),
        ),
        other => FilterConfigError::WrongType {
            field: join_path(path, key),
            expected,
            found: kind(other),
        },
    };
    match map.get("maxErrorRatio") {
        None | Some(Value::Null) => {}
        Some(v) => {
            guard.max_error_ratio = v
                .as_f64()
                .filter(|r| r.is_finite() && *r > 0.0 && *r <= 1.0)
                .ok_or_else(|| {
                    out_of_range(
                        "maxErrorRatio",
                        v,
                        "a number above 0 and at most 1, such as 0.5",
                    )
                })?
        }
    }
    let whole = |key: &str, range: std::ops::RangeInclusive<u64>, expected: &'static str| match map
        .get(key)
    {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .filter(|n| range.contains(n))
            .and_then(|n| u32::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| out_of_range(key, v, expected)),
    };
    if let Some(n) = whole(
        "minRequests",
        1..=1_000_000,
        "a whole number 1..=1000000, such as 20",
    )? {
        guard.min_requests = n;
    }
    if let Some(n) = whole(
        "windowSeconds",
        1..=3600,
        "a whole number of seconds 1..=3600, such as 10",
    )? {
        guard.window_seconds = n;
    }
    if let Some(n) = whole(
        "rearmSeconds",
        1..=86_400,
        "a whole number of seconds 1..=86400, such as 30",
    )? {
        guard.rearm_seconds = n;
    }
    if guard.rearm_seconds < guard.window_seconds {
        return Err(FilterConfigError::invalid(
            &join_path(path, "rearmSeconds"),
            format!(
                "{} is shorter than windowSeconds ({}); write at least {}",
                guard.rearm_seconds, guard.window_seconds, guard.window_seconds
            ),
        ));
    }
    Ok(guard)
}

fn cookie_name(map: &Map<String, Value>) -> Result<String, FilterConfigError> {
    let name = string_field(map, "sticky", "cookie", "a cookie name such as \"session\"")?;
    let valid = name
        .bytes()
        .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b));
    if !valid {
        return Err(FilterConfigError::invalid(
            "sticky.cookie",
            format!("{name:?} is not a cookie name (letters, digits and !#$%&'*+-.^_`|~ only)"),
        ));
    }
    Ok(name)
}

fn opt_bool(
    map: &Map<String, Value>,
    path: &str,
    key: &str,
) -> Result<Option<bool>, FilterConfigError> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(FilterConfigError::WrongType {
            field: join_path(path, key),
            expected: "true or false",
            found: kind(other),
        }),
    }
}

/// An optional header name: lowercased, RFC 7230 token characters, not a pseudo-header.
fn opt_header_name(
    map: &Map<String, Value>,
    path: &str,
    key: &str,
) -> Result<Option<String>, FilterConfigError> {
    let field = join_path(path, key);
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(name)) => {
            let name = name.trim().to_ascii_lowercase();
            if name.is_empty() {
                return Err(FilterConfigError::Empty {
                    field,
                    expected: HEADER_NAME,
                });
            }
            let valid = name.len() <= 256
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
            if !valid {
                return Err(FilterConfigError::invalid(
                    &field,
                    format!("{name:?} is not an HTTP header name; write {HEADER_NAME}"),
                ));
            }
            Ok(Some(name))
        }
        Some(other) => Err(FilterConfigError::WrongType {
            field,
            expected: HEADER_NAME,
            found: kind(other),
        }),
    }
}

fn join_path(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn string_field(
    map: &Map<String, Value>,
    path: &str,
    key: &str,
    expected: &'static str,
) -> Result<String, FilterConfigError> {
    let field = || join_path(path, key);
    match map.get(key) {
        None | Some(Value::Null) => Err(FilterConfigError::Missing {
            field: field(),
            expected,
        }),
        Some(Value::String(s)) if s.trim().is_empty() => Err(FilterConfigError::Empty {
            field: field(),
            expected,
        }),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(FilterConfigError::WrongType {
            field: field(),
            expected,
            found: kind(other),
        }),
    }
}

fn reject_unknown(
    map: &Map<String, Value>,
    path: &str,
    known: &[&str],
    allowed: &'static str,
) -> Result<(), FilterConfigError> {
    for key in map.keys() {
        if known.contains(&key.as_str()) {
            continue;
        }
        let hint = known
            .iter()
            .find(|k| looks_like(key, k))
            .map(|k| format!(" (did you mean \"{k}\"?)"))
            .unwrap_or_default();
        let field = if path.is_empty() {
            key.clone()
        } else {
            format!("{path}{}", path_segment(key))
        };
        return Err(FilterConfigError::UnknownKey {
            field,
            hint,
            allowed,
        });
    }
    Ok(())
}

/// `.name` for plain names, `["name"]` for names with dots, bars and such (Istio cluster names).
fn path_segment(key: &str) -> String {
    let plain = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    let mut out = String::with_capacity(key.len() + 4);
    if plain {
        out.push('.');
        out.push_str(key);
    } else {
        let _ = write!(out, "[{}]", Value::String(key.to_string()));
    }
    out
}

/// A typo of `known`: same ignoring case, `_`/`-`, or within edit distance 2.
fn looks_like(key: &str, known: &str) -> bool {
    let norm = |s: &str| -> Vec<char> {
        s.chars()
            .filter(|c| *c != '_' && *c != '-')
            .flat_map(char::to_lowercase)
            .collect()
    };
    let (a, b) = (norm(key), norm(known));
    a == b || edit_distance(&a, &b) <= 2
}

fn edit_distance(a: &[char], b: &[char]) -> usize {
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, ca) in a.iter().enumerate() {
        if let Some(first) = cur.first_mut() {
            *first = i + 1;
        }
        for (j, cb) in b.iter().enumerate() {
            let sub = prev
                .get(j)
                .copied()
                .unwrap_or(usize::MAX)
                .saturating_add(usize::from(ca != cb));
            let del = prev
                .get(j + 1)
                .copied()
                .unwrap_or(usize::MAX)
                .saturating_add(1);
            let ins = cur.get(j).copied().unwrap_or(usize::MAX).saturating_add(1);
            if let Some(slot) = cur.get_mut(j + 1) {
                *slot = sub.min(del).min(ins);
            }
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev.last().copied().unwrap_or(usize::MAX)
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
