//! The filter's state and behaviour, free of hostcalls: configuration with fail-open, and what
//! to record for a finished request. `host.rs` feeds it raw bytes read from Envoy.

use crate::metrics::{MetricCache, MetricHost, MetricKind};
use fledge_core::contract::{self, ResponseClass};
use fledge_core::filter_config::{FilterConfig, FilterConfigError};

/// `response.code_details` when the upstream produced the response headers.
pub const VIA_UPSTREAM: &[u8] = b"via_upstream";

/// Per-VM state, owned by the root context: the active configuration and the metric ids.
#[derive(Debug, Default)]
pub struct Plugin {
    config: FilterConfig,
    cache: MetricCache,
    /// `None` until first configured; then the (possibly refused) id of the error counter.
    config_errors: Option<Option<u32>>,
}

/// What the filter learned about a finished request, already decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finished<'a> {
    /// `xds.cluster_name`; `None` if no upstream cluster was picked (e.g. no route matched).
    pub cluster: Option<&'a [u8]>,
    /// `response.code`; `None` if no response was sent.
    pub status: Option<u16>,
    /// Whether the upstream produced the response: `response.code_details == "via_upstream"`
    /// (or, only if a host lacks that property, `response.flags == 0`).
    pub upstream_responded: bool,
    /// `request.duration` in whole milliseconds.
    pub duration_ms: Option<u64>,
}

impl<'a> Finished<'a> {
    /// Decode the raw property values as Envoy returns them (`None` = property absent):
    /// `xds.cluster_name`, `response.code`, `response.code_details`, `response.flags` (only
    /// consulted when `code_details` is absent) and `request.duration`.
    ///
    /// Measured in Envoy 1.40: `code_details` is `via_upstream` for any upstream response (also an
    /// upstream 5xx), `no_healthy_upstream`, `upstream_reset_before_response_started{...}` or
    /// `route_not_found` for local replies; `response.flags` is 0 exactly when no Envoy response
    /// flag (UH, UF, NR, ...) was set.
    pub fn from_properties(
        cluster: Option<&'a [u8]>,
        response_code: Option<&[u8]>,
        code_details: Option<&[u8]>,
        response_flags: Option<&[u8]>,
        duration: Option<&[u8]>,
    ) -> Self {
        let status = response_code
            .and_then(decode_i64)
            .and_then(|code| u16::try_from(code).ok())
            .filter(|code| *code != 0);
        let upstream_responded = match code_details {
            Some(details) => details == VIA_UPSTREAM,
            None => response_flags.and_then(decode_i64) == Some(0),
        };
        Finished {
            cluster: cluster.filter(|c| !c.is_empty()),
            status,
            upstream_responded,
            duration_ms: duration.and_then(decode_i64).and_then(nanos_to_whole_ms),
        }
    }

    pub fn class(&self) -> ResponseClass {
        ResponseClass::classify(self.status, self.upstream_responded)
    }
}

/// Envoy returns integer properties (`response.code`, `request.duration`) as 8 bytes,
/// little-endian int64. Anything else is treated as absent.
pub fn decode_i64(bytes: &[u8]) -> Option<i64> {
    let bytes: [u8; 8] = bytes.try_into().ok()?;
    Some(i64::from_le_bytes(bytes))
}

/// Nanoseconds → whole milliseconds (rounded down); negative durations are absent.
pub fn nanos_to_whole_ms(nanos: i64) -> Option<u64> {
    u64::try_from(nanos).ok().map(|n| n / 1_000_000)
}

/// Outcome of [`Plugin::configure`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Configured {
    /// The new configuration is active.
    Applied {
        clusters: usize,
        istio_cluster_names: bool,
    },
    /// The configuration was rejected; the previous one (or the defaults) stays active.
    Rejected(FilterConfigError),
}

impl Plugin {
    /// Apply a plugin configuration (`None` when Envoy has none). Never fails: a bad
    /// configuration bumps `fledge_config_errors_total` and keeps the previous configuration, or
    /// the defaults if there was none — traffic and metrics continue either way.
    pub fn configure(&mut self, raw: Option<&[u8]>, host: &mut impl MetricHost) -> Configured {
        let first = self.config_errors.is_none();
        let errors_id = *self
            .config_errors
            .get_or_insert_with(|| host.define(MetricKind::Counter, contract::CONFIG_ERRORS_TOTAL));
        match FilterConfig::parse_bytes(raw.unwrap_or_default()) {
            Ok(config) => {
                self.config = config;
                self.cache.reconfigure(&self.config, host);
                Configured::Applied {
                    clusters: self.config.clusters.len(),
                    istio_cluster_names: self.config.istio_cluster_names,
                }
            }
            Err(err) => {
                if let Some(id) = errors_id {
                    host.increment(id, 1);
                }
                if first {
                    self.cache.reconfigure(&self.config, host);
                }
                Configured::Rejected(err)
            }
        }
    }

    /// Record a finished request: +1 on its class counter, duration into its histogram.
    pub fn record(&mut self, request: &Finished<'_>, host: &mut impl MetricHost) {
        let ids = self.cache.ids_for(request.cluster, &self.config, host);
        if let Some(id) = ids.requests(request.class()) {
            host.increment(id, 1);
        }
        if let (Some(id), Some(ms)) = (ids.duration(), request.duration_ms) {
            host.record(id, ms);
        }
    }

    /// The active configuration.
    pub fn config(&self) -> &FilterConfig {
        &self.config
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::fake::*;

    const APP: &str = r#"{"clusters": {"app_stable": {"service": "app", "subset": "stable"},
                                       "app_canary": {"service": "app", "subset": "canary"}}}"#;

    fn int(v: i64) -> [u8; 8] {
        v.to_le_bytes()
    }

    #[test]
    fn decodes_envoy_property_encodings() {
        assert_eq!(decode_i64(&int(503)), Some(503));
        assert_eq!(decode_i64(&int(-1)), Some(-1));
        assert_eq!(decode_i64(b"503"), None);
        assert_eq!(decode_i64(&[]), None);
        assert_eq!(decode_i64(&[0; 9]), None);
        assert_eq!(nanos_to_whole_ms(2_999_999), Some(2));
        assert_eq!(nanos_to_whole_ms(0), Some(0));
        assert_eq!(nanos_to_whole_ms(-5), None);
    }

    #[test]
    fn classification_from_properties() {
        let d = int(12_345_678);
        // (code, code_details, expected class)
        type Case = (Option<i64>, Option<&'static [u8]>, ResponseClass);
        let cases: &[Case] = &[
            (Some(200), Some(b"via_upstream"), ResponseClass::Success),
            (Some(404), Some(b"via_upstream"), ResponseClass::ClientError),
            (Some(503), Some(b"via_upstream"), ResponseClass::ServerError),
            (Some(302), Some(b"via_upstream"), ResponseClass::Redirection),
            // Local replies and resets: the upstream never answered.
            (
                Some(503),
                Some(b"no_healthy_upstream"),
                ResponseClass::NoResponse,
            ),
            (
                Some(503),
                Some(b"upstream_reset_before_response_started{connection_failure}"),
                ResponseClass::NoResponse,
            ),
            (
                Some(504),
                Some(b"response_timeout"),
                ResponseClass::NoResponse,
            ),
            (
                Some(404),
                Some(b"route_not_found"),
                ResponseClass::NoResponse,
            ),
            // No code_details and no flags: nothing says the upstream answered.
            (Some(200), None, ResponseClass::NoResponse),
            (None, Some(b"via_upstream"), ResponseClass::NoResponse),
            (Some(0), Some(b"via_upstream"), ResponseClass::NoResponse),
            (
                Some(70_000),
                Some(b"via_upstream"),
                ResponseClass::NoResponse,
            ),
        ];
        for (code, details, want) in cases {
            let code = code.map(int);
            let f = Finished::from_properties(
                Some(b"app_canary"),
                code.as_ref().map(|c| c.as_slice()),
                *details,
                None,
                Some(&d),
            );
            assert_eq!(f.class(), *want, "{code:?} {details:?}");
            assert_eq!(f.duration_ms, Some(12));
        }
        let f = Finished::from_properties(Some(b""), None, None, None, Some(b"bad"));
        assert_eq!(f.cluster, None);
        assert_eq!(f.duration_ms, None);
    }

    #[test]
    fn response_flags_are_the_fallback_without_code_details() {
        let (ok, unavailable, none_set, uh) = (int(200), int(503), int(0), int(2));
        let f = Finished::from_properties(None, Some(&ok), None, Some(&none_set), None);
        assert_eq!(f.class(), ResponseClass::Success);
        let f = Finished::from_properties(None, Some(&unavailable), None, Some(&uh), None);
        assert_eq!(f.class(), ResponseClass::NoResponse);
        // code_details, when present, wins over flags.
        let f = Finished::from_properties(
            None,
            Some(&ok),
            Some(b"no_healthy_upstream"),
            Some(&none_set),
            None,
        );
        assert_eq!(f.class(), ResponseClass::NoResponse);
    }

    #[test]
    fn records_class_counter_and_duration() {
        let mut host = FakeHost::default();
        let mut plugin = Plugin::default();
        assert_eq!(
            plugin.configure(Some(APP.as_bytes()), &mut host),
            Configured::Applied {
                clusters: 2,
                istio_cluster_names: true
            }
        );
        let ok = int(200);
        let bad = int(503);
        let dur = int(7_500_000);
        let defined = host.defined.len();
        for _ in 0..3 {
            let f = Finished::from_properties(
                Some(b"app_canary"),
                Some(&ok),
                Some(VIA_UPSTREAM),
                None,
                Some(&dur),
            );
            plugin.record(&f, &mut host);
        }
        let f = Finished::from_properties(
            Some(b"app_canary"),
            Some(&bad),
            Some(b"no_healthy_upstream"),
            None,
            Some(&dur),
        );
        plugin.record(&f, &mut host);
        let f = Finished::from_properties(
            Some(b"app_stable"),
            Some(&bad),
            Some(VIA_UPSTREAM),
            None,
            None,
        );
        plugin.record(&f, &mut host);
        assert_eq!(
            host.defined.len(),
            defined,
            "no defines on the request path"
        );

        assert_eq!(host.counter(&requests_name("app", "canary", "2xx")), 3);
        assert_eq!(host.counter(&requests_name("app", "canary", "none")), 1);
        assert_eq!(host.counter(&requests_name("app", "stable", "5xx")), 1);
        assert_eq!(host.counter(&requests_name("app", "stable", "2xx")), 0);
        assert_eq!(
            host.samples(&duration_name("app", "canary")),
            vec![7, 7, 7, 7]
        );
        assert!(host.samples(&duration_name("app", "stable")).is_empty());

        // No route → (other, other, none).
        let nf = int(404);
        let f =
            Finished::from_properties(None, Some(&nf), Some(b"route_not_found"), None, Some(&dur));
        plugin.record(&f, &mut host);
        assert_eq!(host.counter(&requests_name("other", "other", "none")), 1);
        // Istio cluster without configuration.
        let f = Finished::from_properties(
            Some(b"outbound|80|v2|reviews.default.svc.cluster.local"),
            Some(&ok),
            Some(VIA_UPSTREAM),
            None,
            Some(&dur),
        );
        plugin.record(&f, &mut host);
        assert_eq!(host.counter(&requests_name("reviews", "v2", "2xx")), 1);
    }

    #[test]
    fn bad_config_fails_open_and_counts() {
        let mut host = FakeHost::default();
        let mut plugin = Plugin::default();

        // First configuration bad: defaults (Istio names on, no clusters), error counted.
        let r = plugin.configure(Some(br#"{"clusters": 5}"#), &mut host);
        let Configured::Rejected(err) = r else {
            panic!("accepted {r:?}")
        };
        assert_eq!(err.field(), "clusters");
        assert_eq!(host.counter(contract::CONFIG_ERRORS_TOTAL), 1);
        assert_eq!(plugin.config(), &FilterConfig::default());

        // Good configuration, then a bad one: the good one stays.
        plugin.configure(Some(APP.as_bytes()), &mut host);
        let r = plugin.configure(Some(br#"{"clusterz": {}}"#), &mut host);
        assert!(matches!(r, Configured::Rejected(_)));
        assert_eq!(host.counter(contract::CONFIG_ERRORS_TOTAL), 2);
        assert_eq!(plugin.config().clusters.len(), 2);
        let (ok, dur) = (int(200), int(1_000_000));
        let f = Finished::from_properties(
            Some(b"app_canary"),
            Some(&ok),
            Some(VIA_UPSTREAM),
            None,
            Some(&dur),
        );
        plugin.record(&f, &mut host);
        assert_eq!(host.counter(&requests_name("app", "canary", "2xx")), 1);

        // Absent and empty configuration = defaults; the error counter is defined only once.
        assert!(matches!(
            plugin.configure(None, &mut host),
            Configured::Applied { clusters: 0, .. }
        ));
        assert!(matches!(
            plugin.configure(Some(b""), &mut host),
            Configured::Applied { .. }
        ));
        host.id(contract::CONFIG_ERRORS_TOTAL);
    }

    #[test]
    fn error_counter_exists_at_zero_after_good_config() {
        let mut host = FakeHost::default();
        let mut plugin = Plugin::default();
        plugin.configure(Some(APP.as_bytes()), &mut host);
        assert_eq!(host.counter(contract::CONFIG_ERRORS_TOTAL), 0);
        host.id(contract::CONFIG_ERRORS_TOTAL);
    }
}
