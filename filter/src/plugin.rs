//! The filter's state and behaviour, free of hostcalls: configuration with fail-open, request
//! tagging (forced canary, sticky buckets, stripping internal headers), response tagging, and
//! what to record for a finished request. `host.rs` implements [`StreamHost`] and
//! [`MetricHost`] with hostcalls; the tests implement them with fakes and count the calls.

use crate::guard::{self, Counts, Settings, SharedData, Window};
use crate::header_pairs;
use crate::metrics::{MetricCache, MetricHost, MetricKind, UpstreamSubset};
use crate::tagging;
use fledge_core::contract::{self, ResponseClass};
use fledge_core::filter_config::{
    istio_workload_revision, FilterConfig, FilterConfigError, FilterModule, ForceCanary, StickyKey,
};

/// `response.code_details` when the upstream produced the response headers.
pub const VIA_UPSTREAM: &[u8] = b"via_upstream";

/// The header maps the filter reads or writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Headers {
    Request,
    Response,
    ResponseTrailers,
}

/// The Envoy properties the filter reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Property {
    /// `xds.cluster_name`
    ClusterName,
    /// `xds.upstream_host_metadata.filter_metadata.istio.workload`
    UpstreamWorkload,
    /// `source.address`
    SourceAddress,
    /// `response.code_details`
    ResponseCodeDetails,
    /// `response.flags`
    ResponseFlags,
    /// `request.duration`
    RequestDuration,
}

/// The per-request hostcalls. Implementations swallow failures: an absent or unreadable value is
/// `None`, a failed write is ignored. Traffic must never break because of the filter.
pub trait StreamHost {
    fn header(&mut self, map: Headers, name: &str) -> Option<Vec<u8>>;
    /// Replace (or add) a header.
    fn set_header(&mut self, map: Headers, name: &str, value: &[u8]);
    fn remove_header(&mut self, map: Headers, name: &str);
    fn property(&mut self, property: Property) -> Option<Vec<u8>>;
    /// All response headers in one read, serialized as the ABI does (see [`crate::header_pairs`]);
    /// `None` when the host has none to give.
    fn response_headers(&mut self) -> Option<Vec<u8>>;
    /// Wall-clock time in nanoseconds since the Unix epoch.
    fn now_nanos(&mut self) -> Option<u64>;
    /// Make Envoy pick the route again (after a routing header changed).
    fn clear_route_cache(&mut self);
}

/// Per-root-context state (one per plugin configuration in a VM): the active configuration
/// and the metric ids.
#[derive(Debug, Default)]
pub struct Plugin {
    /// Which build runs this plugin; it decides which settings are valid.
    module: FilterModule,
    config: FilterConfig,
    cache: MetricCache,
    /// `None` until first configured; then the (possibly refused) id of the error counter.
    config_errors: Option<Option<u32>>,
    /// Forced-canary counters (accepted, rejected), defined when first configured.
    forced: Option<(Option<u32>, Option<u32>)>,
    /// The data-plane guards of the configured services (see [`crate::guard`]).
    guards: Vec<GuardSlot>,
    /// `fledge_guard_tripped{service}` ids, kept across reconfigurations (ids live as long as
    /// the VM; defining a name again would allocate another).
    guard_gauges: std::collections::BTreeMap<String, Option<u32>>,
}

/// One guarded service, per VM.
#[derive(Debug)]
struct GuardSlot {
    /// `fledge_service` and the canary's `fledge_subset` label values.
    service: String,
    canary_subset: String,
    settings: Settings,
    /// Shared-data key of the window.
    key: String,
    /// Outcomes counted by this VM and not merged into the shared window yet.
    pending: Counts,
    /// The shared window as this VM last read or wrote it.
    known: Window,
    gauge: Option<u32>,
    /// The value last set on the gauge.
    gauge_value: Option<u64>,
}

/// Something the guard did that is worth a log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuardEvent {
    /// This VM tripped the guard of `service`: `window` is the recent stretch of canary
    /// outcomes that crossed the ceiling.
    Tripped { service: String, window: Counts },
    /// This VM learnt that the guard of `service` re-armed.
    Rearmed { service: String },
    /// Counts could not be merged (shared data busy or failing); they are kept for the next
    /// tick.
    MergeFailed { service: String, attempts: u32 },
}

/// Per-request state, kept by the module between Envoy's callbacks: what the filter learns on
/// the way (from the clock, cheap header reads and end-of-stream flags) so `on_log` needs few
/// property reads. Each hostcall costs Envoy CPU on every request; a property read costs the
/// most (a CEL lookup plus a copy into the VM), a header or clock read much less.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamState {
    /// Whether `pair` is already resolved (in the response-headers phase).
    resolved: bool,
    /// The `(service, subset)` pair (index into the metric cache) the request is recorded under.
    pair: Option<usize>,
    /// `grpc-status` from the trailers, or from the headers of a trailers-only response.
    grpc_status: Option<u32>,
    /// When the stream reached the filter (ns since the epoch); `None`: unknown, `on_log` asks
    /// Envoy for `request.duration` instead.
    started_nanos: Option<u64>,
    /// The response headers went through the filter's response phase (full module): a
    /// bodiless response's `grpc-status` was read there.
    saw_response_headers: bool,
    /// A non-empty response body went through the filter: the response is not trailers-only.
    saw_body: bool,
    /// The response ended normally: end of stream seen in the headers, in a body that carried
    /// data, or the trailers. A response the upstream cut off mid-body never gets one (Envoy
    /// resets the stream instead).
    complete: bool,
    /// An upstream cluster was picked (no cluster: no route, `direct_response`, redirect).
    has_cluster: bool,
    /// The module followed this stream from its start. `false` (the default) when it lost
    /// track (see `module.rs`): `on_log` then reads what the earlier callbacks would have seen.
    tracked: bool,
}

impl StreamState {
    /// The state of a stream that reached the filter at `now_nanos` (the clock, read when
    /// Envoy creates the stream's context).
    pub fn started_at(now_nanos: Option<u64>) -> Self {
        StreamState {
            started_nanos: now_nanos,
            tracked: true,
            ..StreamState::default()
        }
    }

    /// A chunk of the response body went through the filter (`body_size`: the body bytes Envoy
    /// holds for it; `end_of_stream`: the last chunk). Envoy calls this for every chunk, so it
    /// makes no hostcall. The end of a body that carried data marks the response complete,
    /// which spares `on_log` the `response.code_details` read for a 2xx/3xx; an empty body
    /// ending the stream does not (a trailers-only gRPC response could look like that), so it
    /// falls back to the reads.
    pub fn response_body(&mut self, body_size: usize, end_of_stream: bool) {
        if body_size > 0 {
            self.saw_body = true;
        }
        if end_of_stream && self.saw_body {
            self.complete = true;
        }
    }
}

/// What the filter did to a request's routing headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routing {
    /// Nothing to do.
    Untouched,
    /// A client-sent routing header was removed; Envoy picks at random by weight.
    Stripped,
    /// Trusted forced-canary request: route header set to `canary`.
    Forced,
    /// Forced-canary header without trust: stripped, routed as if it were absent (possibly
    /// sticky).
    Rejected { sticky_bucket: Option<u64> },
    /// Route header set to the user's sticky bucket.
    Sticky(u64),
    /// A guard is tripped: the guard header names the tripped services, so the guard route
    /// sends the request to stable (a sticky bucket, if any, is still written).
    Guarded,
}

/// What the filter learned about a finished request, already decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finished {
    /// `response.code`; `None` if no response was sent.
    pub status: Option<u16>,
    /// Whether the upstream produced the response: `response.code_details == "via_upstream"`
    /// (or, only if a host lacks that property, `response.flags == 0`).
    pub upstream_responded: bool,
    /// `request.duration` in whole milliseconds.
    pub duration_ms: Option<u64>,
    /// `grpc-status` of a gRPC response.
    pub grpc_status: Option<u32>,
}

impl Finished {
    /// Decode the raw property values as Envoy returns them (`None` = property absent):
    /// `response.code`, `response.code_details`, `response.flags` (only consulted when
    /// `code_details` is absent) and `request.duration`.
    ///
    /// Measured in Envoy 1.40: `code_details` is `via_upstream` for any upstream response (also an
    /// upstream 5xx), `no_healthy_upstream`, `upstream_reset_before_response_started{...}` or
    /// `route_not_found` for local replies; `response.flags` is 0 exactly when no Envoy response
    /// flag (UH, UF, NR, ...) was set.
    pub fn from_properties(
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
            status,
            upstream_responded,
            duration_ms: duration.and_then(decode_i64).and_then(nanos_to_whole_ms),
            grpc_status: None,
        }
    }

    /// Decode a finished stream from what the filter saw on the way and, for the rest, cheap
    /// reads in the log phase (Envoy keeps the response headers and trailers readable there):
    ///
    /// - no cluster (`direct_response`, redirects, no route): nothing came from an upstream, no
    ///   read at all;
    /// - the status from `:status` (absent: no response was sent);
    /// - for an HTTP 200, `grpc-status` from the trailers (seen in their own callback) or, for
    ///   a trailers-only response, from the headers; a stream whose response headers the filter
    ///   saw with a body following, or whose body it saw, cannot be trailers-only;
    /// - whether the upstream produced it: a complete response below 400 (and no gRPC error;
    ///   complete = end of stream seen in its headers, body or trailers) is the upstream's;
    ///   otherwise (a status of 400 or more, a gRPC error, or an end of
    ///   stream the filter did not see) `response.code_details` says (`via_upstream`;
    ///   `response.flags == 0` only on a host without that property). Envoy's own 2xx/3xx
    ///   replies on a route with a cluster (a CORS preflight) would count as the upstream's;
    ///   they are rare and not failures;
    /// - the duration from the clock, or `request.duration` when the start is unknown.
    ///
    /// `seen`: the response headers already read in one hostcall (`clusterHeader`); their
    /// `:status` and `grpc-status` then replace the single header reads.
    pub fn from_stream(
        stream: &StreamState,
        seen: Option<&ResponseHeaders>,
        host: &mut impl StreamHost,
    ) -> Self {
        let duration_ms = match stream.started_nanos {
            Some(start) => host
                .now_nanos()
                .map(|end| end.saturating_sub(start) / 1_000_000),
            None => host
                .property(Property::RequestDuration)
                .as_deref()
                .and_then(decode_i64)
                .and_then(nanos_to_whole_ms),
        };
        if !stream.has_cluster {
            return Finished {
                status: None,
                upstream_responded: false,
                duration_ms,
                grpc_status: None,
            };
        }
        let status = match seen {
            Some(seen) => seen.status,
            None => host
                .header(Headers::Response, ":status")
                .as_deref()
                .and_then(parse_status),
        };
        let grpc_status = match (status, stream.grpc_status) {
            (Some(200), None) => grpc_status_in_log(stream, seen, host),
            (_, grpc_status) => grpc_status,
        };
        // Envoy's own gRPC replies (200 + an error grpc-status, no body) look complete too.
        let grpc_ok = grpc_status.is_none_or(|code| code == 0);
        let upstream_responded = match status {
            None => false,
            Some(status) if status < 400 && stream.complete && grpc_ok => true,
            Some(_) => match host.property(Property::ResponseCodeDetails) {
                Some(details) => details == VIA_UPSTREAM,
                // Fallback signal, only if a host lacks `response.code_details`.
                None => {
                    host.property(Property::ResponseFlags)
                        .as_deref()
                        .and_then(decode_i64)
                        == Some(0)
                }
            },
        };
        Finished {
            status,
            upstream_responded,
            duration_ms,
            grpc_status,
        }
    }

    /// The class; a gRPC response (HTTP 200 with `grpc-status`) is classed by the HTTP status
    /// Envoy maps its gRPC status to ([`contract::grpc_status_to_http`]), so UNAVAILABLE,
    /// INTERNAL, UNKNOWN, DEADLINE_EXCEEDED, DATA_LOSS and UNIMPLEMENTED count as `5xx`.
    pub fn class(&self) -> ResponseClass {
        let status = match (self.status, self.grpc_status) {
            (Some(200), Some(grpc)) => Some(contract::grpc_status_to_http(grpc)),
            (status, _) => status,
        };
        ResponseClass::classify(status, self.upstream_responded)
    }
}

/// What the log phase takes from the response headers in `clusterHeader` mode.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResponseHeaders {
    /// The value of `clusterHeader` (the upstream cluster's name), if the route set it.
    pub cluster: Option<Vec<u8>>,
    /// `:status`; `None`: no response was sent.
    pub status: Option<u16>,
    /// `grpc-status` (a trailers-only gRPC response carries it here).
    pub grpc_status: Option<u32>,
}

impl ResponseHeaders {
    /// Pick `cluster_header` (lowercase, as Envoy stores names), `:status` and `grpc-status`
    /// from a serialized response header map.
    pub fn from_map(map: &[u8], cluster_header: &str) -> Self {
        let mut found = ResponseHeaders::default();
        for (name, value) in header_pairs::pairs(map) {
            match name {
                b":status" => found.status = parse_status(value),
                b"grpc-status" => found.grpc_status = parse_grpc_status(value),
                _ if name == cluster_header.as_bytes() && !value.is_empty() => {
                    found.cluster = Some(value.to_vec());
                }
                _ => {}
            }
        }
        found
    }
}

/// The `grpc-status` of an HTTP 200 the callbacks did not report: a trailers-only response
/// carries it in the headers (only possible when the filter saw neither a body-carrying response
/// header phase, nor a body, nor trailers); a stream the module lost track of may also have it
/// in trailers.
fn grpc_status_in_log(
    stream: &StreamState,
    seen: Option<&ResponseHeaders>,
    host: &mut impl StreamHost,
) -> Option<u32> {
    let mut read = |map: Headers| match (map, seen) {
        (Headers::Response, Some(seen)) => seen.grpc_status,
        _ => host
            .header(map, "grpc-status")
            .as_deref()
            .and_then(parse_grpc_status),
    };
    if !stream.tracked {
        return read(Headers::ResponseTrailers).or_else(|| read(Headers::Response));
    }
    if stream.saw_response_headers || stream.saw_body || stream.complete {
        return None;
    }
    read(Headers::Response)
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

/// A `:status` header value: three ASCII digits, 100..=999.
pub fn parse_status(value: &[u8]) -> Option<u16> {
    match value.trim_ascii() {
        [a, b, c] if a.is_ascii_digit() && b.is_ascii_digit() && c.is_ascii_digit() => {
            let status = u16::from(a - b'0') * 100 + u16::from(b - b'0') * 10 + u16::from(c - b'0');
            (status >= 100).then_some(status)
        }
        _ => None,
    }
}

/// A `grpc-status` header value: ASCII digits, at most 10.
pub fn parse_grpc_status(value: &[u8]) -> Option<u32> {
    let value = value.trim_ascii();
    if value.is_empty() || value.len() > 10 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    value.iter().try_fold(0u32, |acc, d| {
        acc.checked_mul(10)?.checked_add(u32::from(d - b'0'))
    })
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

/// The upstream's subset for one request: Istio endpoint metadata first (set by the mesh, not
/// the app), then the configured response header.
struct Upstream<'a, H> {
    host: &'a mut H,
    endpoint_metadata: bool,
    subset_header: Option<&'a str>,
}

impl<H: MetricHost> MetricHost for Upstream<'_, H> {
    fn define(&mut self, kind: MetricKind, name: &str) -> Option<u32> {
        self.host.define(kind, name)
    }
    fn increment(&mut self, id: u32, delta: i64) {
        self.host.increment(id, delta);
    }
    fn record(&mut self, id: u32, value: u64) {
        self.host.record(id, value);
    }
}

impl<H: StreamHost> UpstreamSubset for Upstream<'_, H> {
    fn upstream_subset(&mut self) -> Option<Vec<u8>> {
        if self.endpoint_metadata {
            let workload = self.host.property(Property::UpstreamWorkload);
            let revision = workload
                .as_deref()
                .and_then(|w| std::str::from_utf8(w).ok())
                .and_then(istio_workload_revision);
            if let Some(revision) = revision {
                return Some(revision.as_bytes().to_vec());
            }
        }
        let name = self.subset_header?;
        self.host.header(Headers::Response, name)
    }
}

impl Plugin {
    /// A plugin of `module`, with the default configuration until configured.
    pub fn new(module: FilterModule) -> Self {
        Plugin {
            module,
            ..Plugin::default()
        }
    }

    /// Apply a plugin configuration (`None` when Envoy has none). Never fails: a bad
    /// configuration bumps `fledge_config_errors_total` and keeps the previous configuration, or
    /// the defaults if there was none — traffic and metrics continue either way.
    pub fn configure(&mut self, raw: Option<&[u8]>, host: &mut impl MetricHost) -> Configured {
        let first = self.config_errors.is_none();
        let errors_id = *self
            .config_errors
            .get_or_insert_with(|| host.define(MetricKind::Counter, contract::CONFIG_ERRORS_TOTAL));
        match FilterConfig::parse_for(self.module, raw.unwrap_or_default()) {
            Ok(config) => {
                self.config = config;
                self.cache.reconfigure(&self.config, host);
                if self.config.force_canary.is_some() && self.forced.is_none() {
                    self.forced = Some((
                        host.define(MetricKind::Counter, contract::FORCED_CANARY_ACCEPTED_TOTAL),
                        host.define(MetricKind::Counter, contract::FORCED_CANARY_REJECTED_TOTAL),
                    ));
                }
                self.configure_guards(host);
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

    /// Request headers: honour or strip the forced-canary header, write the sticky bucket, strip
    /// any routing header the client sent, and make Envoy re-pick the route if anything changed.
    ///
    /// Hostcalls: 1 (`routeHeader` absent) with neither feature; sticky with a key: key read,
    /// route header set, plus 1 read per feature (the full module only: the observer has no
    /// request phase).
    pub fn on_request_headers<H: StreamHost + MetricHost>(
        &mut self,
        stream: &mut StreamState,
        host: &mut H,
    ) -> Routing {
        let mut changed = false;
        let mut forced = None;
        if let Some(force) = &self.config.force_canary {
            if let Some(value) = host.header(Headers::Request, &force.header) {
                // Consumed here: the upstream never sees it, trusted or not.
                host.remove_header(Headers::Request, &force.header);
                changed = true;
                let trusted = is_trusted(force, &value, host);
                forced = Some(trusted);
                if let Some((accepted, rejected)) = self.forced {
                    if let Some(id) = if trusted { accepted } else { rejected } {
                        host.increment(id, 1);
                    }
                }
            }
        }
        // The guard: steer every request while a guard is tripped (trusted forced-canary
        // requests excepted); otherwise a client's copy of the guard header is removed.
        let mut steered = false;
        if let Some(guard) = &self.config.guard {
            let tripped = match (forced, stream.started_nanos) {
                (Some(true), _) | (_, None) => None,
                (_, Some(nanos)) => self.tripped_services(nanos / 1_000_000),
            };
            match tripped {
                Some(value) => {
                    host.set_header(Headers::Request, &guard.header, &value);
                    steered = true;
                }
                None => {
                    if host.header(Headers::Request, &guard.header).is_some() {
                        host.remove_header(Headers::Request, &guard.header);
                        changed = true;
                    }
                }
            }
        }
        let route = self.config.route_header.as_str();
        let routing = if forced == Some(true) {
            host.set_header(
                Headers::Request,
                route,
                contract::FORCED_CANARY_ROUTE_VALUE.as_bytes(),
            );
            Routing::Forced
        } else {
            let bucket = self.sticky_bucket(host);
            if let Some(bucket) = bucket {
                let mut digits = [0u8; 20];
                host.set_header(
                    Headers::Request,
                    route,
                    tagging::decimal(bucket, &mut digits),
                );
            } else if host.header(Headers::Request, route).is_some() {
                host.remove_header(Headers::Request, route);
                changed = true;
            }
            match (forced, bucket) {
                (Some(_), _) => Routing::Rejected {
                    sticky_bucket: bucket,
                },
                (None, Some(bucket)) => Routing::Sticky(bucket),
                (None, None) if changed => Routing::Stripped,
                (None, None) => Routing::Untouched,
            }
        };
        // Steering must re-pick the route on any host, so the cache is always cleared then.
        if steered || ((changed || routing != Routing::Untouched) && self.config.clear_route_cache)
        {
            host.clear_route_cache();
        }
        if steered {
            return Routing::Guarded;
        }
        routing
    }

    /// The guard header's value at `now_ms`: the tripped services, comma-separated; `None`
    /// when no guard is tripped (no allocation then).
    fn tripped_services(&self, now_ms: u64) -> Option<Vec<u8>> {
        let mut value: Option<Vec<u8>> = None;
        for slot in &self.guards {
            if slot.known.is_tripped(now_ms, &slot.settings) {
                let value = value.get_or_insert_with(Vec::new);
                if !value.is_empty() {
                    value.push(b',');
                }
                value.extend_from_slice(slot.service.as_bytes());
            }
        }
        value
    }

    /// Build the guards of the active configuration, keeping what this VM knew about services
    /// that stay guarded.
    fn configure_guards(&mut self, host: &mut impl MetricHost) {
        let previous = std::mem::take(&mut self.guards);
        let Some(config) = self.config.guard.clone() else {
            return;
        };
        for (service, guarded) in &config.services {
            let gauge = *self.guard_gauges.entry(service.clone()).or_insert_with(|| {
                let name = contract::encode_stat_name(
                    contract::GUARD_TRIPPED,
                    &[(contract::TAG_SERVICE, service)],
                );
                host.define(MetricKind::Gauge, &name)
            });
            let kept = previous.iter().find(|slot| slot.service == *service);
            self.guards.push(GuardSlot {
                service: service.clone(),
                canary_subset: guarded.canary_subset.clone(),
                settings: Settings::from(guarded),
                key: guard::shared_key(service),
                pending: kept.map(|slot| slot.pending).unwrap_or_default(),
                known: kept.map(|slot| slot.known.clone()).unwrap_or_default(),
                gauge,
                gauge_value: kept.and_then(|slot| slot.gauge_value),
            });
        }
    }

    /// Whether any guard is configured (the host then ticks every 100 ms).
    pub fn has_guards(&self) -> bool {
        !self.guards.is_empty()
    }

    /// The guard counting requests of `pair` (its service's canary), if any.
    fn guard_of(&self, pair: Option<usize>) -> Option<usize> {
        if self.guards.is_empty() {
            return None;
        }
        let labels = self.cache.labels(pair?)?;
        self.guards
            .iter()
            .position(|slot| slot.service == labels.service && slot.canary_subset == labels.subset)
    }

    /// Merge guard `index`'s local counts into the shared window at `now_ms`, adopt what the
    /// shared window says, and keep the gauge in step.
    fn merge_guard<H: MetricHost + SharedData>(
        &mut self,
        index: usize,
        now_ms: u64,
        host: &mut H,
    ) -> Option<GuardEvent> {
        let slot = self.guards.get_mut(index)?;
        let was_tripped = slot.known.tripped_at_ms != 0;
        let merged = guard::merge(host, &slot.key, now_ms, slot.pending, &slot.settings);
        if merged.merged {
            slot.pending = Counts::default();
        }
        slot.known = merged.window;
        let tripped = slot.known.is_tripped(now_ms, &slot.settings);
        let gauge_value = if tripped {
            (slot.known.tripped_at_ms / 1000).max(1)
        } else {
            0
        };
        if let Some(id) = slot.gauge {
            if slot.gauge_value != Some(gauge_value) {
                host.record(id, gauge_value);
                slot.gauge_value = Some(gauge_value);
            }
        }
        if let Some(stretch) = merged.tripped {
            Some(GuardEvent::Tripped {
                service: slot.service.clone(),
                window: stretch,
            })
        } else if !merged.merged {
            Some(GuardEvent::MergeFailed {
                service: slot.service.clone(),
                attempts: merged.attempts,
            })
        } else if was_tripped && !tripped {
            Some(GuardEvent::Rearmed {
                service: slot.service.clone(),
            })
        } else {
            None
        }
    }

    /// The guards' tick (every 100 ms when any is configured): merge every guard's counts and
    /// learn what other workers did.
    pub fn guard_tick<H: StreamHost + MetricHost + SharedData>(
        &mut self,
        host: &mut H,
    ) -> Vec<GuardEvent> {
        let Some(now_ms) = host.now_nanos().map(|n| n / 1_000_000) else {
            return Vec::new();
        };
        (0..self.guards.len())
            .filter_map(|index| self.merge_guard(index, now_ms, host))
            .collect()
    }

    fn sticky_bucket(&self, host: &mut impl StreamHost) -> Option<u64> {
        let sticky = self.config.sticky.as_ref()?;
        let bucket =
            |key: &[u8]| tagging::sticky_bucket(sticky.salt.as_bytes(), key, sticky.buckets);
        match &sticky.key {
            StickyKey::Header(name) => {
                let value = host.header(Headers::Request, name)?;
                tagging::header_key(&value).map(bucket)
            }
            StickyKey::Cookie(name) => {
                let cookies = host.header(Headers::Request, "cookie")?;
                tagging::cookie_value(&cookies, name.as_bytes()).map(bucket)
            }
        }
    }

    /// Response headers (full module): note a bodiless response (and the gRPC status of a
    /// trailers-only one), and (if configured) name the serving subset in `responseHeader`,
    /// resolving the subset now rather than in `on_log`.
    pub fn on_response_headers<H: StreamHost + MetricHost>(
        &mut self,
        stream: &mut StreamState,
        end_of_stream: bool,
        host: &mut H,
    ) {
        stream.saw_response_headers = true;
        if end_of_stream {
            stream.complete = true;
            // Trailers-only gRPC responses carry grpc-status in the headers. Only bodiless
            // responses are checked, so plain HTTP traffic pays nothing.
            stream.grpc_status = host
                .header(Headers::Response, "grpc-status")
                .as_deref()
                .and_then(parse_grpc_status);
        }
        if self.config.response_header.is_none() {
            return;
        }
        let cluster = host.property(Property::ClusterName);
        let cluster = cluster.as_deref().filter(|c| !c.is_empty());
        stream.pair = self.resolve_pair(cluster, host);
        stream.resolved = true;
        stream.has_cluster = cluster.is_some();
        if cluster.is_none() {
            return;
        }
        let labels = stream.pair.and_then(|pair| self.cache.labels(pair));
        if let (Some(name), Some(labels)) = (self.config.response_header.as_deref(), labels) {
            host.set_header(Headers::Response, name, labels.subset.as_bytes());
        }
    }

    /// Response trailers (both modules; Envoy calls this only for responses that have
    /// trailers): the gRPC status of a normal gRPC response.
    pub fn on_response_trailers(&mut self, stream: &mut StreamState, host: &mut impl StreamHost) {
        stream.complete = true;
        if let Some(status) = host
            .header(Headers::ResponseTrailers, "grpc-status")
            .as_deref()
            .and_then(parse_grpc_status)
        {
            stream.grpc_status = Some(status);
        }
    }

    /// The request is done: +1 on its class counter, duration into its histogram; a guarded
    /// canary's outcome into its guard (merged at once if it would trip the guard). Returns
    /// what the guard did, if anything.
    pub fn on_log<H: StreamHost + MetricHost + SharedData>(
        &mut self,
        stream: &mut StreamState,
        host: &mut H,
    ) -> Option<GuardEvent> {
        // `clusterHeader`: the cluster, the status and `grpc-status` in one read; a response
        // the route did not name (or no response) falls back to the property.
        let mut seen = self.config.cluster_header.as_deref().and_then(|name| {
            host.response_headers()
                .map(|map| ResponseHeaders::from_map(&map, name))
        });
        if !stream.resolved {
            let named = seen.as_mut().and_then(|seen| seen.cluster.take());
            let cluster = named.or_else(|| host.property(Property::ClusterName));
            let cluster = cluster.as_deref().filter(|c| !c.is_empty());
            stream.pair = self.resolve_pair(cluster, host);
            stream.resolved = true;
            stream.has_cluster = cluster.is_some();
        }
        let finished = Finished::from_stream(stream, seen.as_ref(), host);
        self.record(stream.pair, &finished);
        let index = self.guard_of(stream.pair)?;
        let slot = self.guards.get_mut(index)?;
        slot.pending.add(Counts {
            requests: 1,
            failures: u32::from(finished.class().is_failure()),
        });
        // Now, without another clock read: the request's start plus its duration.
        let now_ms = (stream.started_nanos? / 1_000_000).saturating_add(finished.duration_ms?);
        if slot.known.would_trip(now_ms, slot.pending, &slot.settings) {
            return self.merge_guard(index, now_ms, host);
        }
        None
    }

    fn resolve_pair<H: StreamHost + MetricHost>(
        &mut self,
        cluster: Option<&[u8]>,
        host: &mut H,
    ) -> Option<usize> {
        let mut upstream = Upstream {
            host,
            endpoint_metadata: self.config.endpoint_metadata,
            subset_header: self.config.subset_header.as_deref(),
        };
        self.cache.pair_for(cluster, &self.config, &mut upstream)
    }

    /// Record a finished request under `pair`: its class and duration are counted in the VM
    /// and reach Envoy's counters at the next [`Plugin::flush`] (no hostcall per request).
    pub fn record(&mut self, pair: Option<usize>, request: &Finished) {
        if let Some(pair) = pair {
            self.cache.count(pair, request.class(), request.duration_ms);
        }
    }

    /// Add the counts since the last flush to Envoy's counters (one hostcall per non-zero
    /// counter; every second, from the tick).
    pub fn flush(&mut self, host: &mut impl MetricHost) {
        self.cache.flush(host);
    }

    /// The active configuration.
    pub fn config(&self) -> &FilterConfig {
        &self.config
    }
}

/// Whether a forced-canary header value is trusted: every configured check must pass.
fn is_trusted(force: &ForceCanary, value: &[u8], host: &mut impl StreamHost) -> bool {
    if !force.source_cidrs.is_empty() {
        let ip = host
            .property(Property::SourceAddress)
            .as_deref()
            .and_then(tagging::source_ip);
        let allowed = ip.is_some_and(|ip| force.source_cidrs.iter().any(|net| net.contains(ip)));
        if !allowed {
            return false;
        }
    }
    match &force.secret {
        Some(secret) => tagging::verify_token(
            value,
            secret.as_bytes(),
            host.now_nanos().map(|n| n / 1_000_000_000),
            force.max_token_lifetime_seconds,
        )
        .is_ok(),
        None => value
            .trim_ascii()
            .eq_ignore_ascii_case(force.value.as_bytes()),
    }
}

#[cfg(test)]
mod tests;
