//! The metric contract shared by the filter (which writes the metrics) and the controller
//! (which reads them). Names, label keys and response classes are defined here once so the two
//! sides cannot drift apart.
//!
//! Proxy-wasm can only name a metric; it cannot attach labels. We therefore encode labels into
//! the stat name in Istio's `key=.=value;.;` convention, e.g.
//!
//! ```text
//! fledge_service=.=app;.;fledge_subset=.=canary;.;fledge_class=.=5xx;.;fledge_requests_total
//! ```
//!
//! and Envoy's `stats_config.stats_tags` (or Istio's `extraStatTags`) turn each `key=.=value;.;`
//! group into a real Prometheus label, so `/stats/prometheus` shows
//! `fledge_requests_total{fledge_service="app",fledge_subset="canary",fledge_class="5xx"}`.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Counter: requests by (service, subset, response class).
pub const REQUESTS_TOTAL: &str = "fledge_requests_total";
/// Request duration in milliseconds by (service, subset), exposed in Prometheus' histogram
/// shape: the filter counts durations into buckets in the VM and publishes them as counters
/// `fledge_request_duration_ms_bucket{le}` (cumulative, `le="+Inf"` = all),
/// `fledge_request_duration_ms_sum` and `fledge_request_duration_ms_count` — no hostcall per
/// request, and the same series a histogram would give.
pub const REQUEST_DURATION_MS: &str = "fledge_request_duration_ms";
/// Counter: plugin configurations the filter rejected (it then fails open).
pub const CONFIG_ERRORS_TOTAL: &str = "fledge_config_errors_total";

/// Counter: forced-canary requests the filter honoured (trusted token and/or source address).
pub const FORCED_CANARY_ACCEPTED_TOTAL: &str = "fledge_forced_canary_accepted_total";
/// Counter: forced-canary requests the filter refused (header stripped, request routed normally).
/// A rise means someone sends the header without the secret or from outside the allowed networks.
pub const FORCED_CANARY_REJECTED_TOTAL: &str = "fledge_forced_canary_rejected_total";

/// Gauge: the data-plane guard of a service (`fledge_service`). 0 while armed; while tripped (the
/// canary's error ratio crossed the guard's ceiling and the filter sends new requests of the
/// service to stable), the Unix time in seconds at which it tripped. The controller rolls the
/// canary back when it sees a trip newer than the rollout; alert on `> 0`.
pub const GUARD_TRIPPED: &str = "fledge_guard_tripped";

/// Default name of the internal request header the filter sets on new requests while a guard is
/// tripped (value: the tripped services, comma-separated, e.g. `app` or `app,cart`) and strips
/// from every client request. A header-match route before the weighted route sends matching
/// requests to the stable cluster (see [`crate::filter_config::Guard::route_regex`]).
pub const DEFAULT_GUARD_HEADER: &str = "x-fledge-guard";

/// Default name of the internal request header the filter writes for routing and strips from
/// every client request: `canary` (a trusted forced-canary request) or a decimal sticky bucket.
/// A header-match route on `canary` placed before the weighted route, and the weighted route's
/// `weighted_clusters.header_name`, read it.
pub const DEFAULT_ROUTE_HEADER: &str = "x-fledge-route";
/// Value of the route header for a trusted forced-canary request.
pub const FORCED_CANARY_ROUTE_VALUE: &str = "canary";

/// Label key for the service (the thing being canaried).
pub const TAG_SERVICE: &str = "fledge_service";
/// Label key for the subset that served the request (e.g. `stable`, `canary`, `v2`).
pub const TAG_SUBSET: &str = "fledge_subset";
/// Label key for the response class (`2xx`, `5xx`, `none`, ...).
pub const TAG_CLASS: &str = "fledge_class";
/// Label key of a duration bucket's upper bound (Prometheus' histogram convention).
pub const TAG_LE: &str = "le";
/// Every tag the filter emits; the Envoy bootstrap needs one `stats_tags` entry for each.
pub const ALL_TAGS: [&str; 4] = [TAG_SERVICE, TAG_SUBSET, TAG_CLASS, TAG_LE];

/// Upper bounds (ms) of the duration buckets unless the filter configuration sets
/// `durationBucketsMs`; `+Inf` is always added.
pub const DEFAULT_DURATION_BUCKETS_MS: [u32; 13] =
    [1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000];

/// The `le` label value of a duration bucket: its bound in ms, or `+Inf`.
pub fn le_label(bound_ms: Option<u32>) -> String {
    match bound_ms {
        Some(bound) => bound.to_string(),
        None => "+Inf".to_string(),
    }
}

/// Label value used for traffic whose service or subset cannot be determined. Cardinality must
/// never grow with request content, so everything unknown collapses into this one value.
pub const OTHER: &str = "other";

/// Longest label value we emit; longer values are truncated so a misconfiguration cannot create
/// huge stat names.
pub const MAX_LABEL_LEN: usize = 64;

/// The class of a response as seen at the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum ResponseClass {
    #[serde(rename = "1xx")]
    Informational,
    #[serde(rename = "2xx")]
    Success,
    #[serde(rename = "3xx")]
    Redirection,
    #[serde(rename = "4xx")]
    ClientError,
    #[serde(rename = "5xx")]
    ServerError,
    /// No response came from the upstream (connect failure, reset, timeout, or a local reply
    /// such as "no healthy upstream"). Counted as a failure by the analysis.
    #[serde(rename = "none")]
    NoResponse,
}

impl ResponseClass {
    pub const ALL: [ResponseClass; 6] = [
        ResponseClass::Informational,
        ResponseClass::Success,
        ResponseClass::Redirection,
        ResponseClass::ClientError,
        ResponseClass::ServerError,
        ResponseClass::NoResponse,
    ];

    /// The label value written into metrics.
    pub const fn label(self) -> &'static str {
        match self {
            ResponseClass::Informational => "1xx",
            ResponseClass::Success => "2xx",
            ResponseClass::Redirection => "3xx",
            ResponseClass::ClientError => "4xx",
            ResponseClass::ServerError => "5xx",
            ResponseClass::NoResponse => "none",
        }
    }

    pub fn from_label(label: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.label() == label)
    }

    /// Position in [`ResponseClass::ALL`]; handy for fixed-size per-class arrays.
    pub const fn index(self) -> usize {
        self as usize
    }

    /// Whether the analysis counts this class against the version that served it.
    /// 4xx are the client's doing, so only 5xx and missing responses count.
    pub const fn is_failure(self) -> bool {
        matches!(self, ResponseClass::ServerError | ResponseClass::NoResponse)
    }

    /// Classify a finished request.
    ///
    /// `status` is the HTTP status sent downstream (None or 0 if nothing was sent);
    /// `upstream_responded` is false when the response was produced locally by the proxy
    /// (no upstream headers were received), in which case the request is `NoResponse` whatever
    /// status the proxy chose for its local reply.
    pub fn classify(status: Option<u16>, upstream_responded: bool) -> Self {
        if !upstream_responded {
            return ResponseClass::NoResponse;
        }
        match status {
            Some(100..=199) => ResponseClass::Informational,
            Some(200..=299) => ResponseClass::Success,
            Some(300..=399) => ResponseClass::Redirection,
            Some(400..=499) => ResponseClass::ClientError,
            Some(500..=599) => ResponseClass::ServerError,
            _ => ResponseClass::NoResponse,
        }
    }
}

/// The HTTP status Envoy maps a gRPC status to (`Grpc::Utility::grpcToHttpStatus`), so a gRPC
/// error answered as HTTP 200 + `grpc-status` is classed like its HTTP equivalent: UNKNOWN (2),
/// DEADLINE_EXCEEDED (4), UNIMPLEMENTED (12), INTERNAL (13), UNAVAILABLE (14) and DATA_LOSS (15)
/// are 5xx; OK (0) is 2xx; the rest are 4xx; codes beyond 16 are 500.
pub const fn grpc_status_to_http(grpc_status: u32) -> u16 {
    match grpc_status {
        0 => 200,
        1 => 499,
        2 => 500,
        3 => 400,
        4 => 504,
        5 => 404,
        6 => 409,
        7 => 403,
        8 => 429,
        9 => 400,
        10 => 409,
        11 => 400,
        12 => 501,
        13 => 500,
        14 => 503,
        15 => 500,
        16 => 401,
        _ => 500,
    }
}

impl fmt::Display for ResponseClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// Make a label value safe for an Envoy stat name and a Prometheus label: keep
/// `[A-Za-z0-9_-]`, map everything else (including `.`, which Envoy treats as a stat-name
/// separator, and `;`/`=`, which delimit tags) to `_`, and bound the length. An empty value
/// becomes [`OTHER`].
pub fn sanitize_label_value(raw: &str) -> String {
    let cleaned: String = raw
        .chars()
        .take(MAX_LABEL_LEN)
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if cleaned.is_empty() {
        OTHER.to_string()
    } else {
        cleaned
    }
}

/// Encode a metric name with labels in the `key=.=value;.;` convention. Values must already be
/// sanitized (see [`sanitize_label_value`]).
pub fn encode_stat_name(metric: &str, tags: &[(&str, &str)]) -> String {
    let mut name = String::with_capacity(metric.len() + tags.len() * 32);
    for (key, value) in tags {
        name.push_str(key);
        name.push_str("=.=");
        name.push_str(value);
        name.push_str(";.;");
    }
    name.push_str(metric);
    name
}

/// The `stats_tags` regex that extracts `tag` from an encoded stat name (first capture group is
/// removed from the name, the second is the value). Identical to what Istio generates for
/// `extraStatTags`.
pub fn stats_tag_regex(tag: &str) -> String {
    format!(r"({tag}=\.=(.*?);\.;)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_table() {
        let cases: &[(Option<u16>, bool, ResponseClass)] = &[
            (Some(200), true, ResponseClass::Success),
            (Some(204), true, ResponseClass::Success),
            (Some(101), true, ResponseClass::Informational),
            (Some(302), true, ResponseClass::Redirection),
            (Some(404), true, ResponseClass::ClientError),
            (Some(500), true, ResponseClass::ServerError),
            (Some(503), true, ResponseClass::ServerError),
            (Some(503), false, ResponseClass::NoResponse),
            (Some(200), false, ResponseClass::NoResponse),
            (None, true, ResponseClass::NoResponse),
            (Some(0), true, ResponseClass::NoResponse),
            (Some(999), true, ResponseClass::NoResponse),
        ];
        for (status, upstream, want) in cases {
            assert_eq!(
                ResponseClass::classify(*status, *upstream),
                *want,
                "status {status:?} upstream {upstream}"
            );
        }
    }

    #[test]
    fn failures_are_5xx_and_none_only() {
        let failing: Vec<_> = ResponseClass::ALL
            .into_iter()
            .filter(|c| c.is_failure())
            .collect();
        assert_eq!(
            failing,
            vec![ResponseClass::ServerError, ResponseClass::NoResponse]
        );
    }

    #[test]
    fn labels_round_trip() {
        for class in ResponseClass::ALL {
            assert_eq!(ResponseClass::from_label(class.label()), Some(class));
            assert_eq!(ResponseClass::ALL[class.index()], class);
        }
        assert_eq!(ResponseClass::from_label("6xx"), None);
    }

    #[test]
    fn grpc_statuses_map_like_envoy() {
        let server_errors: Vec<u32> = (0..=20)
            .filter(|code| {
                ResponseClass::classify(Some(grpc_status_to_http(*code)), true)
                    == ResponseClass::ServerError
            })
            .collect();
        assert_eq!(server_errors, vec![2, 4, 12, 13, 14, 15, 17, 18, 19, 20]);
        assert_eq!(grpc_status_to_http(0), 200);
        assert_eq!(grpc_status_to_http(5), 404);
        assert_eq!(grpc_status_to_http(16), 401);
    }

    #[test]
    fn sanitize_bounds_and_replaces() {
        assert_eq!(sanitize_label_value("reviews"), "reviews");
        assert_eq!(sanitize_label_value("reviews.default"), "reviews_default");
        assert_eq!(sanitize_label_value("a;.;b=.=c"), "a___b___c");
        assert_eq!(sanitize_label_value(""), OTHER);
        assert_eq!(sanitize_label_value(&"x".repeat(500)).len(), MAX_LABEL_LEN);
    }

    #[test]
    fn stat_name_encoding_matches_istio_convention() {
        let name = encode_stat_name(
            REQUESTS_TOTAL,
            &[
                (TAG_SERVICE, "app"),
                (TAG_SUBSET, "canary"),
                (TAG_CLASS, "5xx"),
            ],
        );
        assert_eq!(
            name,
            "fledge_service=.=app;.;fledge_subset=.=canary;.;fledge_class=.=5xx;.;fledge_requests_total"
        );
        assert_eq!(stats_tag_regex(TAG_SUBSET), r"(fledge_subset=\.=(.*?);\.;)");
    }
}
