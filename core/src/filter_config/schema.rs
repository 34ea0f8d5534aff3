//! The configuration's types and defaults, as the filter and the controller hold them.

use crate::contract;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

use super::Cidr;

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
    /// Response header that Envoy's route sets to the upstream cluster's name (a fixed
    /// `response_headers_to_add` value per weighted cluster, resolved like a cluster name).
    /// When set, the log phase reads the response headers in one hostcall (the cluster,
    /// `:status` and `grpc-status` together) instead of the `xds.cluster_name` property and the
    /// status header, which costs Envoy less per request; a response without it falls back to
    /// the property. Off by default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_header: Option<String>,
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

impl Default for FilterConfig {
    fn default() -> Self {
        FilterConfig {
            clusters: BTreeMap::new(),
            istio_cluster_names: true,
            endpoint_metadata: true,
            subset_header: None,
            cluster_header: None,
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
    /// The JSON the filter accepts (camelCase), for generating Envoy/Istio configuration.
    pub fn to_json(&self) -> String {
        // Serializing strings, numbers and maps cannot fail; fall back to the defaults anyway.
        serde_json::to_string(self).unwrap_or_else(|_| "{}".to_string())
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
