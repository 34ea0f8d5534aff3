//! The filter's plugin configuration: its schema, its validation, and the pure functions that
//! turn an Envoy upstream cluster name (plus, when the name says nothing about the version, what
//! the upstream tells) into the `(service, subset)` label values the filter writes.
//!
//! The filter (Wasm) parses it in `on_configure`; the controller and the e2e tests build it and
//! serialize it with [`FilterConfig::to_json`] to generate Envoy or Istio configuration.
//!
//! ```json
//! {"clusters": {"app_stable": {"service": "app", "subset": "stable"},
//!               "app_canary": {"service": "app", "subset": "canary"}},
//!  "istioClusterNames": true,
//!  "responseHeader": "x-fledge-subset",
//!  "sticky": {"cookie": "session"},
//!  "forceCanary": {"header": "x-fledge-stage", "secret": "<32+ random bytes>"}}
//! ```
//!
//! Subset detection, in order (see [`FilterConfig::classify_cluster`]):
//! - `clusters` maps an Envoy upstream cluster name to the service and subset it serves; an entry
//!   without `subset` takes the subset from the upstream (below).
//! - `istioClusterNames` (default `true`) understands Istio's cluster names
//!   `outbound|<port>|<subset>|<host>`: service = the first DNS label of the host (`reviews` for
//!   `reviews.default.svc.cluster.local`), subset = the third field. With an empty subset field
//!   (one Service per version, Gateway API backends) the subset comes from the upstream, and
//!   failing that is the service label.
//! - From the upstream: `endpointMetadata` (default `true`) reads the canonical revision from the
//!   endpoint's `filter_metadata.istio.workload`
//!   (`workload;namespace;canonical-service;canonical-revision;cluster`, set by Istio on every
//!   endpoint); else `subsetHeader`, an upstream response header naming the version.
//! - Anything else is labelled `(other, other)` ([`contract::OTHER`]).
//!
//! Data-plane guard (optional): `guard` sets, per service, a hard ceiling on the canary's error
//! ratio over a short sliding window; when it is crossed the filter sends new requests of that
//! service to stable at once (see [`Guard`]).
//!
//! Canary tagging (all optional): `responseHeader` names the serving subset in the response;
//! `forceCanary` lets trusted testers send `x-fledge-stage: canary` (secret token and/or source
//! networks); `sticky` hashes a user key into a bucket for `weighted_clusters.header_name`. Both
//! write the internal `routeHeader`, which the filter strips from every client request.
//!
//! Empty or absent configuration means the defaults. Parsing is strict: unknown keys and wrong
//! types are errors that name the field and say what to write instead, so typos are visible
//! (the filter then fails open and keeps its previous configuration).
//!
//! Every label value goes through [`contract::sanitize_label_value`].

use crate::contract;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::net::IpAddr;
use std::str::FromStr;

/// The filter's plugin configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", try_from = "serde_json::Value")]
pub struct FilterConfig {
    /// Envoy upstream cluster name → the service and subset behind it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub clusters: BTreeMap<String, ClusterSubset>,
    /// Understand Istio cluster names `outbound|<port>|<subset>|<host>` (default `true`).
    pub istio_cluster_names: bool,
    /// When the cluster name gives no subset, take the canonical revision from the endpoint's
    /// `filter_metadata.istio.workload` (default `true`).
    pub endpoint_metadata: bool,
    /// When neither the name nor the endpoint metadata gives a subset, take it from this upstream
    /// response header (lowercase). Off by default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subset_header: Option<String>,
    /// Response header naming the subset that served the request. Off by default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_header: Option<String>,
    /// Internal request header for routing (default [`contract::DEFAULT_ROUTE_HEADER`]). Always
    /// stripped from client requests; written only by the filter.
    pub route_header: String,
    /// Also call Envoy's `clear_route_cache` after changing a routing header (default `false`).
    /// Envoy's Wasm host already clears the route cache on every request-header change (verified
    /// with Envoy 1.40, also behind a filter that resolved the route first); turn this on only
    /// for a host that does not, at about 1–2 µs of CPU per tagged request.
    pub clear_route_cache: bool,
    /// Let trusted testers force the canary.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub force_canary: Option<ForceCanary>,
    /// Keep each user on one version while the weights change.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sticky: Option<Sticky>,
    /// Send new requests to stable at once when a canary fails hard.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guard: Option<Guard>,
    /// Upper bounds (ms) of the `fledge_request_duration_ms` buckets, strictly increasing
    /// (default [`contract::DEFAULT_DURATION_BUCKETS_MS`]; `+Inf` is always added).
    #[serde(skip_serializing_if = "is_default_buckets")]
    pub duration_buckets_ms: Vec<u32>,
}

fn is_default_buckets(buckets: &[u32]) -> bool {
    buckets == contract::DEFAULT_DURATION_BUCKETS_MS
}

/// The data-plane guard. For each guarded service the filter keeps a sliding window of the
/// canary's outcomes (10 time buckets across `windowSeconds`, shared by all Envoy worker
/// threads through proxy-wasm shared data). When the window holds at least `minRequests`
/// canary requests and at least `maxErrorRatio` of them failed (5xx or no response), the guard
/// *trips*: every new request gets `header: <service>` (several tripped services:
/// comma-separated) and Envoy picks the route again, so a header-match route placed before the
/// weighted route (match [`Guard::route_regex`]) sends it to stable. The gauge
/// [`contract::GUARD_TRIPPED`] shows the trip (its Unix time) and the controller rolls back.
///
/// The guard re-arms by itself `rearmSeconds` after it tripped, with an empty window: by then
/// the controller has set the canary's weight to 0, and a canary that is still failing (no
/// controller) trips it again after at most `minRequests` more requests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Guard {
    /// Internal request header (default [`contract::DEFAULT_GUARD_HEADER`]); always stripped
    /// from client requests.
    pub header: String,
    /// `fledge_service` label value → its guard.
    pub services: BTreeMap<String, GuardedService>,
}

/// The guard of one service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GuardedService {
    /// `fledge_subset` label value of the canary (default `canary`).
    pub canary_subset: String,
    /// Trip when at least this share of the canary's requests in the window failed (0 < r ≤ 1,
    /// default 0.5).
    pub max_error_ratio: f64,
    /// ... over at least this many canary requests in the window (default 20).
    pub min_requests: u32,
    /// Length of the sliding window (1..=3600, default 10).
    pub window_seconds: u32,
    /// Seconds after a trip at which the guard re-arms with an empty window (1..=86400, at
    /// least `windowSeconds`; default 30).
    pub rearm_seconds: u32,
}

// `max_error_ratio` is validated finite, so equality is reflexive.
impl Eq for GuardedService {}

/// Default guard ceiling: half of the canary's requests failing.
pub const DEFAULT_GUARD_MAX_ERROR_RATIO: f64 = 0.5;
/// Default guard minimum sample.
pub const DEFAULT_GUARD_MIN_REQUESTS: u32 = 20;
/// Default guard window.
pub const DEFAULT_GUARD_WINDOW_SECONDS: u32 = 10;
/// Default time from a trip to re-arming.
pub const DEFAULT_GUARD_REARM_SECONDS: u32 = 30;

impl Default for GuardedService {
    fn default() -> Self {
        GuardedService {
            canary_subset: "canary".to_string(),
            max_error_ratio: DEFAULT_GUARD_MAX_ERROR_RATIO,
            min_requests: DEFAULT_GUARD_MIN_REQUESTS,
            window_seconds: DEFAULT_GUARD_WINDOW_SECONDS,
            rearm_seconds: DEFAULT_GUARD_REARM_SECONDS,
        }
    }
}

impl Guard {
    /// The regular expression (RE2, whole value) a route's header matcher uses on
    /// [`Guard::header`] to catch requests the guard of `service` steers to stable. It matches
    /// `app`, `app,cart` and `cart,app`, but not `myapp`.
    pub fn route_regex(service: &str) -> String {
        format!("(.*,)?{}(,.*)?", contract::sanitize_label_value(service))
    }
}

/// What one configured cluster serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterSubset {
    /// The service being canaried, e.g. `app`.
    pub service: String,
    /// The version of it behind this cluster, e.g. `stable` or `canary`; `None` takes it from the
    /// upstream (endpoint metadata or `subsetHeader`), else `other`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subset: Option<String>,
}

impl ClusterSubset {
    pub fn new(service: impl Into<String>, subset: impl Into<String>) -> Self {
        ClusterSubset {
            service: service.into(),
            subset: Some(subset.into()),
        }
    }

    /// A cluster whose subset the upstream tells (several versions behind one cluster).
    pub fn service_only(service: impl Into<String>) -> Self {
        ClusterSubset {
            service: service.into(),
            subset: None,
        }
    }
}

/// A forced-canary header for testers, honoured only when trusted. Every configured check must
/// pass: with `secret`, the header value must be a valid unexpired token
/// `<unix-expiry>.<hex HMAC-SHA256(secret, "<unix-expiry>")>`; with `sourceCidrs`, the client
/// address must be in one of them (and without `secret` the value must equal `value`).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ForceCanary {
    /// Request header testers send (lowercase), default `x-fledge-stage`. Stripped from every
    /// request before it goes upstream.
    pub header: String,
    /// Value that asks for the canary when no `secret` is configured (default `canary`).
    pub value: String,
    /// Shared HMAC secret (at least 16 bytes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// Client networks allowed to force the canary (`source.address`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub source_cidrs: Vec<Cidr>,
    /// Tokens expiring further in the future than this are refused (default 7 days).
    pub max_token_lifetime_seconds: u64,
}

impl fmt::Debug for ForceCanary {
    // Never print the secret (configs end up in logs).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ForceCanary")
            .field("header", &self.header)
            .field("value", &self.value)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("source_cidrs", &self.source_cidrs)
            .field(
                "max_token_lifetime_seconds",
                &self.max_token_lifetime_seconds,
            )
            .finish()
    }
}

/// Default forced-canary request header.
pub const DEFAULT_FORCE_HEADER: &str = "x-fledge-stage";
/// Default forced-canary value (without a secret).
pub const DEFAULT_FORCE_VALUE: &str = "canary";
/// Default longest token lifetime: 7 days.
pub const DEFAULT_MAX_TOKEN_LIFETIME_SECONDS: u64 = 7 * 24 * 3600;
/// Shortest accepted HMAC secret.
pub const MIN_SECRET_BYTES: usize = 16;

/// Sticky assignment: a user key hashed into a bucket that Envoy's
/// `weighted_clusters.header_name` turns into a cluster pick (`bucket mod total weight`, clusters
/// in list order). With stable listed first, a user only ever moves stable → canary as the
/// canary's weight grows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Sticky {
    #[serde(flatten)]
    pub key: StickyKey,
    /// Mixed into the hash; change it to give a new rollout a different first set of users.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub salt: String,
    /// Buckets `0..buckets`; keep it a multiple of the route's total weight (Fledge writes 100).
    pub buckets: u64,
}

/// Default number of sticky buckets (a multiple of 100 and of 1000).
pub const DEFAULT_STICKY_BUCKETS: u64 = 10_000;

/// Where the sticky user key comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum StickyKey {
    /// A cookie by name.
    Cookie(String),
    /// A request header by (lowercase) name.
    Header(String),
}

/// An IP network such as `10.0.0.0/8` or `fd00::/8`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Whether `ip` is in this network. IPv4-mapped IPv6 addresses (`::ffff:10.1.2.3`) match
    /// IPv4 networks.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.network, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = prefix_mask_32(self.prefix);
                u32::from(ip) & mask == u32::from(net) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = prefix_mask_128(self.prefix);
                u128::from(ip) & mask == u128::from(net) & mask
            }
            _ => false,
        }
    }
}

fn prefix_mask_32(prefix: u8) -> u32 {
    u32::MAX
        .checked_shl(32 - u32::from(prefix.min(32)))
        .unwrap_or(0)
}

fn prefix_mask_128(prefix: u8) -> u128 {
    u128::MAX
        .checked_shl(128 - u32::from(prefix.min(128)))
        .unwrap_or(0)
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl FromStr for Cidr {
    type Err = String;
    /// `a.b.c.d/n`, `x::y/n`, or a bare address (a single host). Host bits must be zero.
    fn from_str(text: &str) -> Result<Self, String> {
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let network: IpAddr = address
            .trim()
            .parse()
            .map_err(|_| format!("{address:?} is not an IP address"))?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("prefix length {p:?} must be 0..={max}"))?,
        };
        let cidr = Cidr { network, prefix };
        let masked = match network {
            IpAddr::V4(v4) => IpAddr::V4((u32::from(v4) & prefix_mask_32(prefix)).into()),
            IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & prefix_mask_128(prefix)).into()),
        };
        if masked != network {
            return Err(format!(
                "{text:?} has host bits set; write \"{masked}/{prefix}\""
            ));
        }
        Ok(cidr)
    }
}

impl Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Sanitized label values for one request: `fledge_service` and `fledge_subset`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SubsetLabels {
    pub service: String,
    pub subset: String,
}

impl SubsetLabels {
    /// Sanitizes both values with [`contract::sanitize_label_value`].
    pub fn new(service: &str, subset: &str) -> Self {
        SubsetLabels {
            service: contract::sanitize_label_value(service),
            subset: contract::sanitize_label_value(subset),
        }
    }

    /// `(other, other)`: traffic whose service and subset are unknown.
    pub fn other() -> Self {
        SubsetLabels {
            service: contract::OTHER.to_string(),
            subset: contract::OTHER.to_string(),
        }
    }

    pub fn is_other(&self) -> bool {
        self.service == contract::OTHER && self.subset == contract::OTHER
    }
}

/// What the cluster name (and configuration) says about a request's labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterResolution {
    /// Service and subset are known.
    Known(SubsetLabels),
    /// The service is known; the subset comes from the upstream (endpoint metadata or response
    /// header), and is `fallback` when the upstream does not say.
    SubsetFromUpstream {
        /// Sanitized service label.
        service: String,
        /// Sanitized subset label used when the upstream gives none.
        fallback: String,
    },
    /// Unknown cluster, or none (no route): `(other, other)`.
    Other,
}

impl ClusterResolution {
    /// The labels, given what the upstream said about its subset (raw, unsanitized; `None` or
    /// empty when it said nothing).
    pub fn labels(&self, upstream_subset: Option<&str>) -> SubsetLabels {
        match self {
            ClusterResolution::Known(labels) => labels.clone(),
            ClusterResolution::SubsetFromUpstream { service, fallback } => SubsetLabels {
                service: service.clone(),
                subset: match upstream_subset.map(str::trim).filter(|s| !s.is_empty()) {
                    Some(subset) => contract::sanitize_label_value(subset),
                    None => fallback.clone(),
                },
            },
            ClusterResolution::Other => SubsetLabels::other(),
        }
    }

    pub fn needs_upstream_subset(&self) -> bool {
        matches!(self, ClusterResolution::SubsetFromUpstream { .. })
    }
}

/// The canonical revision in Istio's endpoint metadata
/// `workload;namespace;canonical-service;canonical-revision;cluster-id` (the fourth field), if
/// present and non-empty.
pub fn istio_workload_revision(workload: &str) -> Option<&str> {
    workload
        .split(';')
        .nth(3)
        .map(str::trim)
        .filter(|revision| !revision.is_empty())
}

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
const ROOT_KEYS: [&str; 11] = [
    "clusters",
    "istioClusterNames",
    "endpointMetadata",
    "subsetHeader",
    "responseHeader",
    "routeHeader",
    "clearRouteCache",
    "forceCanary",
    "sticky",
    "guard",
    "durationBucketsMs",
];
const ROOT_ALLOWED: &str = "clusters, istioClusterNames, endpointMetadata, subsetHeader, responseHeader, routeHeader, clearRouteCache, forceCanary, sticky, guard, durationBucketsMs";
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

impl Default for FilterConfig {
    fn default() -> Self {
        FilterConfig {
            clusters: BTreeMap::new(),
            istio_cluster_names: true,
            endpoint_metadata: true,
            subset_header: None,
            response_header: None,
            route_header: contract::DEFAULT_ROUTE_HEADER.to_string(),
            clear_route_cache: false,
            force_canary: None,
            sticky: None,
            guard: None,
            duration_buckets_ms: contract::DEFAULT_DURATION_BUCKETS_MS.to_vec(),
        }
    }
}

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

    /// The JSON the filter accepts (camelCase), for generating Envoy/Istio configuration.
    pub fn to_json(&self) -> String {
        // Serializing strings, numbers and maps cannot fail; fall back to the defaults anyway.
        serde_json::to_string(self).unwrap_or_else(|_| "{}".to_string())
    }

    /// What the cluster name says about a request that went to `cluster` (`None` when no cluster
    /// was picked, e.g. no route matched). Configured clusters win; then Istio names if enabled;
    /// everything else is [`ClusterResolution::Other`].
    pub fn classify_cluster(&self, cluster: Option<&str>) -> ClusterResolution {
        let Some(cluster) = cluster else {
            return ClusterResolution::Other;
        };
        if let Some(entry) = self.clusters.get(cluster) {
            return match &entry.subset {
                Some(subset) => ClusterResolution::Known(SubsetLabels::new(&entry.service, subset)),
                None => ClusterResolution::SubsetFromUpstream {
                    service: contract::sanitize_label_value(&entry.service),
                    fallback: contract::OTHER.to_string(),
                },
            };
        }
        if self.istio_cluster_names {
            if let Some(istio) = IstioCluster::parse(cluster) {
                return match istio.subset {
                    Some(subset) => {
                        ClusterResolution::Known(SubsetLabels::new(istio.service, subset))
                    }
                    None => {
                        let service = contract::sanitize_label_value(istio.service);
                        ClusterResolution::SubsetFromUpstream {
                            fallback: service.clone(),
                            service,
                        }
                    }
                };
            }
        }
        ClusterResolution::Other
    }

    /// The `(service, subset)` labels for `cluster` when the upstream says nothing about its
    /// subset. See [`FilterConfig::classify_cluster`] and [`ClusterResolution::labels`].
    pub fn resolve(&self, cluster: Option<&str>) -> SubsetLabels {
        self.classify_cluster(cluster).labels(None)
    }

    /// Whether any cluster may need the upstream's subset from a response header, so the filter
    /// must look at the cluster while response headers are still available.
    pub fn uses_subset_header(&self) -> bool {
        self.subset_header.is_some()
    }
}

/// The two builds of the filter. Envoy calls into a Wasm module only for the callbacks it
/// exports, so each build exports only what it needs: the observer costs Envoy no more CPU per
/// request than an empty filter, and in exchange never sees request or response headers while
/// they can still be changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum FilterModule {
    /// `fledge_filter.wasm`: metrics, canary tagging, the data-plane guard.
    #[default]
    Full,
    /// `fledge_observer.wasm`: metrics only.
    Observer,
}

impl FilterModule {
    /// The file `make build-filter` writes.
    pub const fn file_name(self) -> &'static str {
        match self {
            FilterModule::Full => "fledge_filter.wasm",
            FilterModule::Observer => "fledge_observer.wasm",
        }
    }
}

impl FilterConfig {
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

/// An Istio outbound cluster name, `outbound|<port>|<subset>|<host>`, split into the raw
/// (unsanitized) service and subset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IstioCluster<'a> {
    /// First DNS label of the host.
    pub service: &'a str,
    /// The subset field; `None` when empty (one Service per version).
    pub subset: Option<&'a str>,
}

impl<'a> IstioCluster<'a> {
    /// `None` unless the name is exactly `outbound|<digits>|<subset>|<host>` with a non-empty
    /// host. Inbound clusters (`inbound|8080||`) describe the local workload, not a subset.
    pub fn parse(name: &'a str) -> Option<Self> {
        let mut fields = name.split('|');
        let direction = fields.next()?;
        let port = fields.next()?;
        let subset = fields.next()?;
        let host = fields.next()?;
        if fields.next().is_some()
            || direction != "outbound"
            || port.is_empty()
            || !port.bytes().all(|b| b.is_ascii_digit())
        {
            return None;
        }
        let service = host.split('.').next().filter(|s| !s.is_empty())?;
        let subset = Some(subset).filter(|s| !s.is_empty());
        Some(IstioCluster { service, subset })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::OTHER;

    fn labels(service: &str, subset: &str) -> SubsetLabels {
        SubsetLabels {
            service: service.to_string(),
            subset: subset.to_string(),
        }
    }

    fn app_config() -> FilterConfig {
        FilterConfig::parse(
            r#"{"clusters": {"app_stable": {"service": "app", "subset": "stable"},
                             "app_canary": {"service": "app", "subset": "canary"}},
                "istioClusterNames": true}"#,
        )
        .unwrap()
    }

    #[test]
    fn guard_defaults_round_trip_and_errors() {
        let c = FilterConfig::parse(r#"{"guard": {"services": {"app": {}}}}"#).unwrap();
        let guard = c.guard.clone().unwrap();
        assert_eq!(guard.header, contract::DEFAULT_GUARD_HEADER);
        assert_eq!(guard.services["app"], GuardedService::default());
        assert_eq!(FilterConfig::parse(&c.to_json()).unwrap(), c);
        let c = FilterConfig::parse(
            r#"{"guard": {"header": "X-Guard", "services": {"app": {"canarySubset": "v2",
                "maxErrorRatio": 0.25, "minRequests": 5, "windowSeconds": 4, "rearmSeconds": 8}}}}"#,
        )
        .unwrap();
        let guard = c.guard.clone().unwrap();
        assert_eq!(guard.header, "x-guard");
        assert_eq!(
            guard.services["app"],
            GuardedService {
                canary_subset: "v2".into(),
                max_error_ratio: 0.25,
                min_requests: 5,
                window_seconds: 4,
                rearm_seconds: 8
            }
        );
        assert_eq!(FilterConfig::parse(&c.to_json()).unwrap(), c);

        let cases: &[(&str, &str, &str)] = &[
            (r#"{"guard": 1}"#, "guard", "found a number"),
            (r#"{"guard": {}}"#, "guard.services", "at least one service"),
            (
                r#"{"guard": {"services": {}}}"#,
                "guard.services",
                "missing",
            ),
            (
                r#"{"guard": {"servces": {}}}"#,
                "guard.servces",
                "did you mean \"services\"",
            ),
            (
                r#"{"guard": {"services": {"app": {"maxErrorRatio": 1.5}}}}"#,
                "guard.services.app.maxErrorRatio",
                "1.5 is out of range",
            ),
            (
                r#"{"guard": {"services": {"app": {"maxErrorRatio": "half"}}}}"#,
                "guard.services.app.maxErrorRatio",
                "found a string",
            ),
            (
                r#"{"guard": {"services": {"app": {"minRequests": 0}}}}"#,
                "guard.services.app.minRequests",
                "0 is out of range",
            ),
            (
                r#"{"guard": {"services": {"app": {"windowSeconds": 40}}}}"#,
                "guard.services.app.rearmSeconds",
                "shorter than windowSeconds",
            ),
            (
                r#"{"guard": {"services": {"app": {"minRequest": 3}}}}"#,
                "guard.services.app.minRequest",
                "did you mean \"minRequests\"",
            ),
            (
                r#"{"guard": {"services": {"my.app": {}}}}"#,
                "guard.services[\"my.app\"]",
                "\"my_app\"",
            ),
            (
                r#"{"guard": {"header": "x-fledge-route", "services": {"app": {}}}}"#,
                "guard.header",
                "routeHeader",
            ),
        ];
        for (text, field, message) in cases {
            let err = FilterConfig::parse(text).unwrap_err();
            assert_eq!(err.field(), *field, "{text}: {err}");
            assert!(err.to_string().contains(message), "{text}: {err}");
        }
    }

    #[test]
    fn duration_buckets_default_or_increasing_bounds() {
        let config = FilterConfig::parse("{}").unwrap();
        assert_eq!(
            config.duration_buckets_ms,
            contract::DEFAULT_DURATION_BUCKETS_MS.to_vec()
        );
        assert!(!config.to_json().contains("durationBucketsMs"));
        let config = FilterConfig::parse(r#"{"durationBucketsMs": [3, 7, 42]}"#).unwrap();
        assert_eq!(config.duration_buckets_ms, vec![3, 7, 42]);
        assert_eq!(FilterConfig::parse(&config.to_json()).unwrap(), config);
        let cases = [
            (
                r#"{"durationBucketsMs": 5}"#,
                "durationBucketsMs",
                "expected an array",
            ),
            (
                r#"{"durationBucketsMs": []}"#,
                "durationBucketsMs",
                "has 0 bounds",
            ),
            (
                r#"{"durationBucketsMs": [5, 0]}"#,
                "durationBucketsMs[1]",
                "1..=86400000",
            ),
            (
                r#"{"durationBucketsMs": [5, "x"]}"#,
                "durationBucketsMs[1]",
                "found a string",
            ),
            (
                r#"{"durationBucketsMs": [5, 5]}"#,
                "durationBucketsMs[1]",
                "increasing order",
            ),
            (
                r#"{"durationBucketsMs": [1.5]}"#,
                "durationBucketsMs[0]",
                "whole number",
            ),
        ];
        for (text, field, message) in cases {
            let err = FilterConfig::parse(text).unwrap_err();
            assert_eq!(err.field(), field, "{text}: {err}");
            assert!(err.to_string().contains(message), "{text}: {err}");
        }
        let many: Vec<u32> = (1..=31).collect();
        let err = FilterConfig::parse(&format!("{{\"durationBucketsMs\": {many:?}}}")).unwrap_err();
        assert!(err.to_string().contains("has 31 bounds"), "{err}");
    }

    #[test]
    fn the_observer_module_refuses_what_needs_headers() {
        let metrics_only = r#"{"clusters": {"a": {"service": "app", "subset": "canary"}},
                              "istioClusterNames": false, "endpointMetadata": false,
                              "subsetHeader": "x-version"}"#;
        for module in [FilterModule::Full, FilterModule::Observer] {
            FilterConfig::parse_for(module, metrics_only.as_bytes()).unwrap();
            FilterConfig::parse_for(module, b"").unwrap();
        }
        let cases = [
            (r#"{"responseHeader": "x-fledge-subset"}"#, "responseHeader"),
            (
                r#"{"forceCanary": {"sourceCidrs": ["10.0.0.0/8"]}}"#,
                "forceCanary",
            ),
            (r#"{"sticky": {"cookie": "session"}}"#, "sticky"),
            (r#"{"guard": {"services": {"app": {}}}}"#, "guard"),
            (r#"{"routeHeader": "x-route"}"#, "routeHeader"),
            (r#"{"clearRouteCache": true}"#, "clearRouteCache"),
        ];
        for (text, field) in cases {
            FilterConfig::parse_for(FilterModule::Full, text.as_bytes()).unwrap();
            let err = FilterConfig::parse_for(FilterModule::Observer, text.as_bytes()).unwrap_err();
            assert_eq!(err.field(), field, "{text}");
            assert_eq!(
                err.to_string(),
                format!(
                    "{field}: needs fledge_filter.wasm, which can change headers; \
                     fledge_observer.wasm only records metrics (remove {field}, or load \
                     fledge_filter.wasm)"
                )
            );
        }
        // Syntax errors come first, as for the full module.
        let err = FilterConfig::parse_for(FilterModule::Observer, b"nope").unwrap_err();
        assert!(matches!(err, FilterConfigError::Syntax(_)), "{err}");
    }

    #[test]
    fn guard_route_regex_matches_whole_service_names() {
        assert_eq!(Guard::route_regex("app"), "(.*,)?app(,.*)?");
        assert_eq!(Guard::route_regex("my.app"), "(.*,)?my_app(,.*)?");
    }

    #[test]
    fn parses_the_documented_example() {
        let c = app_config();
        assert!(c.istio_cluster_names);
        assert_eq!(c.clusters.len(), 2);
        assert_eq!(
            c.clusters["app_canary"],
            ClusterSubset::new("app", "canary")
        );
    }

    #[test]
    fn empty_and_absent_mean_defaults() {
        for text in [
            "",
            "   \n",
            "{}",
            "null",
            r#"{"clusters": null}"#,
            r#"{"clusters": {}}"#,
        ] {
            assert_eq!(
                FilterConfig::parse(text).unwrap(),
                FilterConfig::default(),
                "{text:?}"
            );
        }
        assert!(FilterConfig::default().istio_cluster_names);
        assert_eq!(
            FilterConfig::parse(r#"{"istioClusterNames": false}"#).unwrap(),
            FilterConfig {
                istio_cluster_names: false,
                ..FilterConfig::default()
            }
        );
    }

    #[test]
    fn bad_configs_name_the_field_and_the_fix() {
        let cases: &[(&str, &str, &str)] = &[
            (
                r#"{"clusters": 5}"#,
                "clusters",
                "clusters: expected an object mapping Envoy cluster names to subsets",
            ),
            (
                r#"{"clusters": {"app_canary": {"service": "app", "subset": 5}}}"#,
                "clusters.app_canary.subset",
                r#"clusters.app_canary.subset: expected a string like "canary", found a number"#,
            ),
            (
                r#"{"clusters": {"app_canary": {"subset": "canary"}}}"#,
                "clusters.app_canary.service",
                r#"clusters.app_canary.service: missing; write a string like "app""#,
            ),
            (
                r#"{"clusters": {"app_canary": {"service": " ", "subset": "canary"}}}"#,
                "clusters.app_canary.service",
                r#"clusters.app_canary.service: must not be empty; write a string like "app""#,
            ),
            (
                r#"{"clusters": {"app_canary": "canary"}}"#,
                "clusters.app_canary",
                "clusters.app_canary: expected an object such as",
            ),
            (
                r#"{"clusters": {"outbound|80|v2|reviews.default.svc": {"service": "reviews", "subset": []}}}"#,
                r#"clusters["outbound|80|v2|reviews.default.svc"].subset"#,
                "found an array",
            ),
            (
                r#"{"istioClusterNames": "yes"}"#,
                "istioClusterNames",
                "istioClusterNames: expected true or false, found a string",
            ),
            (r#"[1, 2]"#, "(root)", "(root): expected a JSON object"),
        ];
        for (text, field, message) in cases {
            let err = FilterConfig::parse(text).unwrap_err();
            assert_eq!(err.field(), *field, "{text}");
            assert!(
                err.to_string().contains(message),
                "{text}: {err} does not contain {message}"
            );
        }
    }

    #[test]
    fn unknown_keys_are_rejected_by_name() {
        let err = FilterConfig::parse(r#"{"istioClusterName": true}"#).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                r#"istioClusterName: unknown key (did you mean "istioClusterNames"?); allowed keys are {ROOT_ALLOWED}"#
            )
        );
        let err = FilterConfig::parse(r#"{"istio_cluster_names": true}"#).unwrap_err();
        assert!(
            err.to_string()
                .contains(r#"did you mean "istioClusterNames"?"#),
            "{err}"
        );
        let err = FilterConfig::parse(r#"{"routes": {}}"#).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("routes: unknown key; allowed keys are {ROOT_ALLOWED}")
        );
        let err = FilterConfig::parse(
            r#"{"clusters": {"c": {"service": "a", "subset": "b", "subsets": "x"}}}"#,
        )
        .unwrap_err();
        assert_eq!(err.field(), "clusters.c.subsets");
        assert!(
            err.to_string().contains(r#"did you mean "subset"?"#),
            "{err}"
        );
    }

    #[test]
    fn syntax_errors_and_non_utf8() {
        let err = FilterConfig::parse(r#"{"clusters": "#).unwrap_err();
        assert!(matches!(err, FilterConfigError::Syntax(_)));
        assert!(err.to_string().contains("not valid JSON"), "{err}");
        let err = FilterConfig::parse_bytes(&[b'{', 0xff, b'}']).unwrap_err();
        assert!(err.to_string().contains("not UTF-8"), "{err}");
    }

    #[test]
    fn round_trips_through_json_and_serde() {
        let c = app_config();
        let json = c.to_json();
        assert!(json.contains(r#""istioClusterNames":true"#), "{json}");
        assert_eq!(FilterConfig::parse(&json).unwrap(), c);
        // Usable inside other serde documents; validation still applies.
        let via_serde: FilterConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(via_serde, c);
        assert!(serde_json::from_str::<FilterConfig>(r#"{"clusterz": {}}"#).is_err());
    }

    #[test]
    fn resolve_table() {
        let c = app_config();
        let cases: &[(Option<&str>, SubsetLabels)] = &[
            (Some("app_stable"), labels("app", "stable")),
            (Some("app_canary"), labels("app", "canary")),
            (
                Some("outbound|9080|v2|reviews.default.svc.cluster.local"),
                labels("reviews", "v2"),
            ),
            // Two-Service setups: empty subset field → the service label.
            (
                Some("outbound|80||reviews-canary.default.svc.cluster.local"),
                labels("reviews-canary", "reviews-canary"),
            ),
            (Some("outbound|80|v1|reviews"), labels("reviews", "v1")),
            // Subset names are sanitized.
            (
                Some("outbound|80|v1.2|reviews.default"),
                labels("reviews", "v1_2"),
            ),
            // Malformed or non-outbound Istio names.
            (Some("outbound||"), SubsetLabels::other()),
            (Some("outbound|80||"), SubsetLabels::other()),
            (Some("outbound||v1|reviews"), SubsetLabels::other()),
            (Some("outbound|http|v1|reviews"), SubsetLabels::other()),
            (Some("outbound|80|v1|.reviews"), SubsetLabels::other()),
            (Some("outbound|80|v1|reviews|x"), SubsetLabels::other()),
            (Some("inbound|8080||"), SubsetLabels::other()),
            (
                Some("inbound|9080|http|reviews.default.svc.cluster.local"),
                SubsetLabels::other(),
            ),
            (Some("BlackHoleCluster"), SubsetLabels::other()),
            (Some(""), SubsetLabels::other()),
            (None, SubsetLabels::other()),
        ];
        for (cluster, want) in cases {
            assert_eq!(&c.resolve(*cluster), want, "{cluster:?}");
        }
        assert!(SubsetLabels::other().is_other());
        assert_eq!(SubsetLabels::other().service, OTHER);
    }

    #[test]
    fn configured_clusters_win_and_istio_names_can_be_disabled() {
        let istio = "outbound|80|v2|reviews.default.svc.cluster.local";
        let mut c = FilterConfig::default();
        c.clusters.insert(
            istio.to_string(),
            ClusterSubset::new("Reviews App", "canary"),
        );
        assert_eq!(c.resolve(Some(istio)), labels("Reviews_App", "canary"));

        let off = FilterConfig {
            istio_cluster_names: false,
            ..FilterConfig::default()
        };
        assert_eq!(off.resolve(Some(istio)), SubsetLabels::other());
    }

    #[test]
    fn configured_label_values_are_sanitized() {
        let c = FilterConfig::parse(
            r#"{"clusters": {"x": {"service": "a;.;b", "subset": "ca=.=nary"}}}"#,
        )
        .unwrap();
        assert_eq!(c.resolve(Some("x")), labels("a___b", "ca___nary"));
        let long = "s".repeat(200);
        let c = FilterConfig::parse(&format!(
            r#"{{"clusters": {{"x": {{"service": "{long}", "subset": "v"}}}}}}"#
        ))
        .unwrap();
        assert_eq!(c.resolve(Some("x")).service.len(), contract::MAX_LABEL_LEN);
    }

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn tagging_options_parse_with_defaults() {
        let c = FilterConfig::parse(&format!(
            r#"{{"responseHeader": "X-Fledge-Subset", "subsetHeader": "x-version",
                "sticky": {{"cookie": "session"}},
                "forceCanary": {{"secret": "{SECRET}", "sourceCidrs": ["10.0.0.0/8", "::1"]}}}}"#
        ))
        .unwrap();
        assert_eq!(c.response_header.as_deref(), Some("x-fledge-subset"));
        assert_eq!(c.subset_header.as_deref(), Some("x-version"));
        assert_eq!(c.route_header, contract::DEFAULT_ROUTE_HEADER);
        assert!(!c.clear_route_cache && c.endpoint_metadata);
        let sticky = c.sticky.clone().unwrap();
        assert_eq!(sticky.key, StickyKey::Cookie("session".into()));
        assert_eq!(sticky.buckets, DEFAULT_STICKY_BUCKETS);
        let force = c.force_canary.clone().unwrap();
        assert_eq!(force.header, DEFAULT_FORCE_HEADER);
        assert_eq!(force.value, DEFAULT_FORCE_VALUE);
        assert_eq!(force.source_cidrs.len(), 2);
        assert_eq!(
            force.max_token_lifetime_seconds,
            DEFAULT_MAX_TOKEN_LIFETIME_SECONDS
        );
        // The secret never shows in Debug output.
        assert!(!format!("{c:?}").contains(SECRET));
        // Round trip.
        assert_eq!(FilterConfig::parse(&c.to_json()).unwrap(), c);
        let c = FilterConfig::parse(
            r#"{"sticky": {"header": "x-user-id", "salt": "r2", "buckets": 1000}, "responseHeader": null}"#,
        )
        .unwrap();
        assert_eq!(
            c.sticky.clone().unwrap(),
            Sticky {
                key: StickyKey::Header("x-user-id".into()),
                salt: "r2".into(),
                buckets: 1000
            }
        );
        assert_eq!(c.response_header, None);
        assert_eq!(FilterConfig::parse(&c.to_json()).unwrap(), c);
    }

    #[test]
    fn tagging_mistakes_name_the_field() {
        let cases: &[(&str, &str, &str)] = &[
            (
                r#"{"forceCanary": {"header": "stage"}}"#,
                "forceCanary",
                "without either anyone could force the canary",
            ),
            (
                r#"{"forceCanary": {"secret": "short"}}"#,
                "forceCanary.secret",
                "at least 16 random bytes",
            ),
            (
                r#"{"forceCanary": {"sourceCidrs": ["10.1.2.3/8"]}}"#,
                "forceCanary.sourceCidrs[0]",
                r#"has host bits set; write "10.0.0.0/8""#,
            ),
            (
                r#"{"forceCanary": {"sourceCidrs": ["10.0.0.0/33"]}}"#,
                "forceCanary.sourceCidrs[0]",
                "prefix length",
            ),
            (
                r#"{"forceCanary": {"sourceCidrs": "10.0.0.0/8"}}"#,
                "forceCanary.sourceCidrs",
                "a list of networks",
            ),
            (
                r#"{"forceCanary": {"sourceCidrs": ["10.0.0.0/8"], "header": "x-fledge-route"}}"#,
                "forceCanary.header",
                "must differ from routeHeader",
            ),
            (
                r#"{"forceCanary": {"sourceCidrs": ["10.0.0.0/8"], "maxTokenLifetimeSeconds": 0}}"#,
                "forceCanary.maxTokenLifetimeSeconds",
                "> 0",
            ),
            (
                r#"{"forceCanary": {"sourceCidrs": ["::1"], "secrets": "x"}}"#,
                "forceCanary.secrets",
                r#"did you mean "secret"?"#,
            ),
            (r#"{"sticky": {}}"#, "sticky.cookie", "missing"),
            (
                r#"{"sticky": {"cookie": "a", "header": "b"}}"#,
                "sticky",
                "not both",
            ),
            (
                r#"{"sticky": {"cookie": "a;b"}}"#,
                "sticky.cookie",
                "is not a cookie name",
            ),
            (
                r#"{"sticky": {"header": "x-user", "buckets": 0}}"#,
                "sticky.buckets",
                "1..=1000000000",
            ),
            (
                r#"{"sticky": {"header": "x-fledge-route"}}"#,
                "sticky.header",
                "must differ from routeHeader",
            ),
            (
                r#"{"responseHeader": "x subset"}"#,
                "responseHeader",
                "is not an HTTP header name",
            ),
            (
                r#"{"routeHeader": ":authority"}"#,
                "routeHeader",
                "is not an HTTP header name",
            ),
            (
                r#"{"subsetHeader": ""}"#,
                "subsetHeader",
                "must not be empty",
            ),
            (
                r#"{"clearRouteCache": "yes"}"#,
                "clearRouteCache",
                "true or false",
            ),
        ];
        for (text, field, message) in cases {
            let err = FilterConfig::parse(text).unwrap_err();
            assert_eq!(err.field(), *field, "{text}: {err}");
            assert!(
                err.to_string().contains(message),
                "{text}: {err} does not contain {message}"
            );
        }
    }

    #[test]
    fn cidrs_match_v4_v6_and_mapped() {
        let net: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(net.contains("10.255.1.2".parse().unwrap()));
        assert!(!net.contains("11.0.0.1".parse().unwrap()));
        assert!(net.contains("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!net.contains("::1".parse().unwrap()));
        let host: Cidr = "127.0.0.1".parse().unwrap();
        assert_eq!(host.to_string(), "127.0.0.1/32");
        assert!(host.contains("127.0.0.1".parse().unwrap()));
        assert!(!host.contains("127.0.0.2".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
        let v6: Cidr = "fd00::/8".parse().unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()));
        assert!(!v6.contains("fe80::1".parse().unwrap()));
        assert!("fd00::1/8".parse::<Cidr>().is_err());
        assert!("nonsense/8".parse::<Cidr>().is_err());
    }

    #[test]
    fn subset_from_upstream_when_the_name_has_none() {
        let c = FilterConfig::parse(r#"{"clusters": {"app_all": {"service": "app"}}}"#).unwrap();
        let configured = c.classify_cluster(Some("app_all"));
        assert!(configured.needs_upstream_subset());
        assert_eq!(configured.labels(Some("v2")), labels("app", "v2"));
        assert_eq!(configured.labels(Some(" ")), labels("app", OTHER));
        assert_eq!(configured.labels(None), labels("app", OTHER));
        assert_eq!(configured.labels(Some("v2.1;x")), labels("app", "v2_1_x"));

        let istio = c.classify_cluster(Some("outbound|80||reviews.default.svc.cluster.local"));
        assert!(istio.needs_upstream_subset());
        assert_eq!(istio.labels(Some("v3")), labels("reviews", "v3"));
        assert_eq!(istio.labels(None), labels("reviews", "reviews"));

        let named = c.classify_cluster(Some("outbound|80|v1|reviews.default.svc.cluster.local"));
        assert!(!named.needs_upstream_subset());
        assert_eq!(named.labels(Some("v9")), labels("reviews", "v1"));
        assert_eq!(
            c.classify_cluster(Some("unknown")),
            ClusterResolution::Other
        );
        assert_eq!(
            c.classify_cluster(None).labels(Some("v2")),
            SubsetLabels::other()
        );

        assert_eq!(
            istio_workload_revision("reviews-v2;default;reviews;v2;Kubernetes"),
            Some("v2")
        );
        assert_eq!(
            istio_workload_revision("reviews-v2;default;reviews;;Kubernetes"),
            None
        );
        assert_eq!(istio_workload_revision("reviews-v2;default"), None);
        assert_eq!(istio_workload_revision(""), None);
    }
}
