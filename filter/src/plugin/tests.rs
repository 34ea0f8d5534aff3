//! The plugin against fake hosts: behaviour, fail-open, and the hostcalls each callback makes.

use super::*;
use crate::fake::{FakeStream, NOW};
use crate::metrics::fake::*;

const APP: &str = r#"{"clusters": {"app_stable": {"service": "app", "subset": "stable"},
                                       "app_canary": {"service": "app", "subset": "canary"}}}"#;
const SECRET: &str = "0123456789abcdef0123456789abcdef";

fn int(v: i64) -> [u8; 8] {
    v.to_le_bytes()
}

fn plugin(config: &str, stream: &mut FakeStream) -> Plugin {
    let mut plugin = Plugin::default();
    let outcome = plugin.configure(Some(config.as_bytes()), stream);
    assert!(matches!(outcome, Configured::Applied { .. }), "{outcome:?}");
    stream.calls.clear();
    plugin
}

/// Run a request with the shared metric store `metrics`; returns the stream for inspection.
fn send(
    plugin: &mut Plugin,
    metrics: &mut FakeHost,
    mut s: FakeStream,
    bodiless: bool,
) -> FakeStream {
    s.metrics = std::mem::take(metrics);
    run(plugin, &mut s, bodiless);
    plugin.flush(&mut s);
    *metrics = std::mem::take(&mut s.metrics);
    s
}

/// Run a whole request through the plugin in the full module's callbacks (see
/// `module.rs`); returns the routing decision.
fn run(plugin: &mut Plugin, stream: &mut FakeStream, bodiless: bool) -> Routing {
    let mut state = StreamState::started_at(stream.now_nanos());
    let routing = plugin.on_request_headers(&mut state, stream);
    plugin.on_response_headers(&mut state, bodiless, stream);
    // Envoy calls this only when the response has trailers.
    if !stream.trailers.is_empty() {
        plugin.on_response_trailers(&mut state, stream);
    }
    plugin.on_log(&mut state, stream);
    routing
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
    assert_eq!(parse_grpc_status(b"14"), Some(14));
    assert_eq!(parse_grpc_status(b" 0 "), Some(0));
    assert_eq!(parse_grpc_status(b"-1"), None);
    assert_eq!(parse_grpc_status(b"99999999999"), None);
    assert_eq!(parse_grpc_status(b""), None);
}

#[test]
fn classification_from_properties() {
    let d = int(12_345_678);
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
            code.as_ref().map(|c| c.as_slice()),
            *details,
            None,
            Some(&d),
        );
        assert_eq!(f.class(), *want, "{code:?} {details:?}");
        assert_eq!(f.duration_ms, Some(12));
    }
    let f = Finished::from_properties(None, None, None, Some(b"bad"));
    assert_eq!(f.duration_ms, None);
}

#[test]
fn grpc_status_decides_the_class_of_http_200() {
    let ok = int(200);
    let f = |grpc: Option<u32>, status: &[u8; 8], details: &[u8]| Finished {
        grpc_status: grpc,
        ..Finished::from_properties(Some(status), Some(details), None, None)
    };
    assert_eq!(
        f(Some(0), &ok, VIA_UPSTREAM).class(),
        ResponseClass::Success
    );
    assert_eq!(
        f(Some(14), &ok, VIA_UPSTREAM).class(),
        ResponseClass::ServerError
    );
    assert_eq!(
        f(Some(13), &ok, VIA_UPSTREAM).class(),
        ResponseClass::ServerError
    );
    assert_eq!(
        f(Some(5), &ok, VIA_UPSTREAM).class(),
        ResponseClass::ClientError
    );
    // Envoy's own gRPC local reply (200 + grpc-status 14) is still "no response".
    assert_eq!(
        f(Some(14), &ok, b"no_healthy_upstream").class(),
        ResponseClass::NoResponse
    );
    // A non-200 HTTP status wins over grpc-status.
    assert_eq!(
        f(Some(0), &int(503), VIA_UPSTREAM).class(),
        ResponseClass::ServerError
    );
}

#[test]
fn response_flags_are_the_fallback_without_code_details() {
    let (ok, unavailable, none_set, uh) = (int(200), int(503), int(0), int(2));
    let f = Finished::from_properties(Some(&ok), None, Some(&none_set), None);
    assert_eq!(f.class(), ResponseClass::Success);
    let f = Finished::from_properties(Some(&unavailable), None, Some(&uh), None);
    assert_eq!(f.class(), ResponseClass::NoResponse);
    let f = Finished::from_properties(
        Some(&ok),
        Some(b"no_healthy_upstream"),
        Some(&none_set),
        None,
    );
    assert_eq!(f.class(), ResponseClass::NoResponse);
}

#[test]
fn records_class_counter_and_duration() {
    let mut setup = FakeStream::new();
    let mut plugin = plugin(APP, &mut setup);
    let mut total = std::mem::take(&mut setup.metrics);
    for _ in 0..3 {
        let mut s = FakeStream::finished("app_canary", 200);
        s.metrics = std::mem::take(&mut total);
        run(&mut plugin, &mut s, false);
        // The count waits for the next flush (each module's whole per-request list is
        // pinned in module.rs).
        assert!(!s.calls.contains(&"increment".to_string()), "{:?}", s.calls);
        total = std::mem::take(&mut s.metrics);
    }
    assert_eq!(total.counter(&requests_name("app", "canary", "2xx")), 0);
    // One flush adds the three requests to each counter in one call.
    let mut s = FakeStream::new();
    s.metrics = std::mem::take(&mut total);
    plugin.flush(&mut s);
    assert!(s.calls.iter().all(|c| c == "increment"), "{:?}", s.calls);
    total = std::mem::take(&mut s.metrics);
    assert_eq!(total.counter(&requests_name("app", "canary", "2xx")), 3);
    let s =
        FakeStream::finished("app_canary", 503).with_property("details", b"no_healthy_upstream");
    send(&mut plugin, &mut total, s, false);
    let mut s = FakeStream::finished("app_stable", 503);
    s.clock = None;
    send(&mut plugin, &mut total, s, false);
    assert_eq!(total.counter(&requests_name("app", "canary", "2xx")), 3);
    assert_eq!(total.counter(&requests_name("app", "canary", "none")), 1);
    assert_eq!(total.counter(&requests_name("app", "stable", "5xx")), 1);
    assert_eq!(total.counter(&requests_name("app", "stable", "2xx")), 0);
    // Durations: the canary's four took 7 ms each; the stable one without a clock has none.
    assert_eq!(total.durations("app", "canary").0, 4);
    assert_eq!(total.durations("app", "canary").1, 28);
    assert_eq!(total.durations("app", "stable").0, 0);

    // No route → (other, other, none); Istio cluster without configuration.
    let s = FakeStream::new()
        .with_status(404)
        .with_property("details", b"route_not_found");
    send(&mut plugin, &mut total, s, false);
    assert_eq!(total.counter(&requests_name("other", "other", "none")), 1);
    // A direct response (200, no cluster) did not come from an upstream.
    let s = FakeStream::new().with_status(200);
    let s = send(&mut plugin, &mut total, s, false);
    assert!(!s.calls.contains(&"property details".to_string()));
    assert_eq!(total.counter(&requests_name("other", "other", "none")), 2);
    // An upstream 200 cut off mid-body is none; a client that hung up is still 2xx.
    let mut s = FakeStream::finished("app_stable", 200).with_property(
        "details",
        b"upstream_reset_after_response_started{remote_reset}",
    );
    s.trailers.clear();
    send(&mut plugin, &mut total, s, false);
    assert_eq!(total.counter(&requests_name("app", "stable", "none")), 1);
    let s = FakeStream::finished("outbound|80|v2|reviews.default.svc.cluster.local", 200);
    send(&mut plugin, &mut total, s, false);
    assert_eq!(total.counter(&requests_name("reviews", "v2", "2xx")), 1);
}

#[test]
fn bad_config_fails_open_and_counts() {
    let mut host = FakeStream::new();
    let mut plugin = Plugin::default();
    let r = plugin.configure(Some(br#"{"clusters": 5}"#), &mut host);
    let Configured::Rejected(err) = r else {
        panic!("accepted {r:?}")
    };
    assert_eq!(err.field(), "clusters");
    assert_eq!(host.metrics.counter(contract::CONFIG_ERRORS_TOTAL), 1);
    assert_eq!(plugin.config(), &FilterConfig::default());

    // Good configuration, then a bad one: the good one stays.
    plugin.configure(Some(APP.as_bytes()), &mut host);
    let r = plugin.configure(Some(br#"{"clusterz": {}}"#), &mut host);
    assert!(matches!(r, Configured::Rejected(_)));
    assert_eq!(host.metrics.counter(contract::CONFIG_ERRORS_TOTAL), 2);
    assert_eq!(plugin.config().clusters.len(), 2);
    let mut s = FakeStream::finished("app_canary", 200);
    s.metrics = std::mem::take(&mut host.metrics);
    run(&mut plugin, &mut s, false);
    plugin.flush(&mut s);
    assert_eq!(s.metrics.counter(&requests_name("app", "canary", "2xx")), 1);
    host.metrics = std::mem::take(&mut s.metrics);

    // Absent and empty configuration = defaults; the error counter is defined only once.
    assert!(matches!(
        plugin.configure(None, &mut host),
        Configured::Applied { clusters: 0, .. }
    ));
    assert!(matches!(
        plugin.configure(Some(b""), &mut host),
        Configured::Applied { .. }
    ));
    host.metrics.id(contract::CONFIG_ERRORS_TOTAL);
}

#[test]
fn error_counter_exists_at_zero_after_good_config() {
    let mut host = FakeStream::new();
    let mut plugin = Plugin::default();
    plugin.configure(Some(APP.as_bytes()), &mut host);
    assert_eq!(host.metrics.counter(contract::CONFIG_ERRORS_TOTAL), 0);
    host.metrics.id(contract::CONFIG_ERRORS_TOTAL);
}

#[test]
fn internal_route_header_is_always_stripped() {
    let mut setup = FakeStream::new();
    let mut plugin = plugin(APP, &mut setup);
    let mut s = FakeStream::new().with_request("x-fledge-route", "canary");
    assert_eq!(request(&mut plugin, &mut s), Routing::Stripped);
    assert!(!s.request.contains_key("x-fledge-route"));
    // Envoy clears its route cache on the removal itself.
    assert!(!s.calls.contains(&"clear_route_cache".to_string()));
    let mut s = FakeStream::new();
    assert_eq!(request(&mut plugin, &mut s), Routing::Untouched);
    assert_eq!(s.calls, vec!["get Request x-fledge-route"]);
    // Explicit clearing is opt-in, for hosts that keep a stale route.
    let mut plugin = plugin_with(r#"{"clearRouteCache": true}"#);
    let mut s = FakeStream::new().with_request("x-fledge-route", "canary");
    assert_eq!(request(&mut plugin, &mut s), Routing::Stripped);
    assert!(s.calls.contains(&"clear_route_cache".to_string()));
}

#[test]
fn sticky_bucket_from_header_or_cookie() {
    let mut setup = FakeStream::new();
    let mut plugin = plugin(r#"{"sticky": {"header": "x-user-id"}}"#, &mut setup);
    let want = tagging::sticky_bucket(b"", b"alice", 10_000);
    let mut s = FakeStream::new()
        .with_request("x-user-id", " alice ")
        .with_request("x-fledge-route", "canary");
    assert_eq!(request(&mut plugin, &mut s), Routing::Sticky(want));
    assert_eq!(s.request["x-fledge-route"], want.to_string().into_bytes());
    assert_eq!(
        s.calls,
        vec!["get Request x-user-id", "set Request x-fledge-route"]
    );
    // No key: random pick; an attacker's bucket is removed.
    let mut s = FakeStream::new().with_request("x-fledge-route", "9999");
    assert_eq!(request(&mut plugin, &mut s), Routing::Stripped);
    assert!(!s.request.contains_key("x-fledge-route"));
    let mut s = FakeStream::new().with_request("x-user-id", "  ");
    assert_eq!(request(&mut plugin, &mut s), Routing::Untouched);

    let mut plugin = plugin_with(
        r#"{"sticky": {"cookie": "session", "salt": "r2", "buckets": 100}, "clearRouteCache": true}"#,
    );
    let mut s = FakeStream::new().with_request("cookie", "a=1; session=alice; b=2");
    let want = tagging::sticky_bucket(b"r2", b"alice", 100);
    assert_eq!(request(&mut plugin, &mut s), Routing::Sticky(want));
    assert!(s.calls.contains(&"clear_route_cache".to_string()));
    let mut s = FakeStream::new().with_request("cookie", "a=1");
    assert_eq!(request(&mut plugin, &mut s), Routing::Untouched);
}

fn request(plugin: &mut Plugin, stream: &mut FakeStream) -> Routing {
    plugin.on_request_headers(&mut StreamState::default(), stream)
}

fn plugin_with(config: &str) -> Plugin {
    plugin(config, &mut FakeStream::new())
}

#[test]
fn forced_canary_needs_a_valid_token() {
    let config = format!(
        r#"{{"forceCanary": {{"header": "stage", "secret": "{SECRET}", "maxTokenLifetimeSeconds": 3600}},
                 "sticky": {{"header": "x-user-id"}}}}"#
    );
    let mut setup = FakeStream::new();
    let mut plugin = plugin(&config, &mut setup);
    let mut metrics = std::mem::take(&mut setup.metrics);
    let mut attempt = |value: &str, user: Option<&str>| {
        let mut s = FakeStream::new().with_request("stage", value);
        if let Some(user) = user {
            s = s.with_request("x-user-id", user);
        }
        s.metrics = std::mem::take(&mut metrics);
        let routing = request(&mut plugin, &mut s);
        metrics = std::mem::take(&mut s.metrics);
        assert!(
            !s.request.contains_key("stage"),
            "force header reaches upstream"
        );
        (routing, s.request.get("x-fledge-route").cloned())
    };
    let token = tagging::mint_token(SECRET.as_bytes(), NOW + 600);
    assert_eq!(
        attempt(&token, None),
        (Routing::Forced, Some(b"canary".to_vec()))
    );
    // Forced beats sticky.
    assert_eq!(attempt(&token, Some("alice")).0, Routing::Forced);
    // Plain "canary", stale, too long-lived or foreign tokens: stripped, routed normally.
    let bucket = tagging::sticky_bucket(b"", b"alice", 10_000);
    for bad in [
        "canary".to_string(),
        tagging::mint_token(SECRET.as_bytes(), NOW - 1),
        tagging::mint_token(SECRET.as_bytes(), NOW + 3601),
        tagging::mint_token(b"not-the-secret-not-the-secret-xx", NOW + 600),
    ] {
        assert_eq!(
            attempt(&bad, None),
            (
                Routing::Rejected {
                    sticky_bucket: None
                },
                None
            )
        );
        assert_eq!(
            attempt(&bad, Some("alice")).0,
            Routing::Rejected {
                sticky_bucket: Some(bucket)
            }
        );
    }
    assert_eq!(metrics.counter(contract::FORCED_CANARY_ACCEPTED_TOTAL), 2);
    assert_eq!(metrics.counter(contract::FORCED_CANARY_REJECTED_TOTAL), 8);
}

#[test]
fn forced_canary_by_source_network() {
    let mut plugin = plugin_with(r#"{"forceCanary": {"sourceCidrs": ["10.0.0.0/8", "::1/128"]}}"#);
    let mut from = |address: &str, value: &str| {
        let mut s = FakeStream::new()
            .with_request("x-fledge-stage", value)
            .with_property("source", address.as_bytes());
        request(&mut plugin, &mut s)
    };
    assert_eq!(from("10.1.2.3:5555", "canary"), Routing::Forced);
    assert_eq!(from("10.1.2.3:5555", " Canary "), Routing::Forced);
    assert_eq!(from("[::1]:5555", "canary"), Routing::Forced);
    assert_eq!(
        from("10.1.2.3:5555", "stable"),
        Routing::Rejected {
            sticky_bucket: None
        }
    );
    assert_eq!(
        from("192.168.1.1:5555", "canary"),
        Routing::Rejected {
            sticky_bucket: None
        }
    );
    assert_eq!(
        from("garbage", "canary"),
        Routing::Rejected {
            sticky_bucket: None
        }
    );

    // Both checks configured: both must pass.
    let mut plugin = plugin_with(&format!(
        r#"{{"forceCanary": {{"sourceCidrs": ["10.0.0.0/8"], "secret": "{SECRET}"}}}}"#
    ));
    let token = tagging::mint_token(SECRET.as_bytes(), NOW + 60);
    let mut from = |address: &str, value: &str| {
        let mut s = FakeStream::new()
            .with_request("x-fledge-stage", value)
            .with_property("source", address.as_bytes());
        request(&mut plugin, &mut s)
    };
    assert_eq!(from("10.0.0.1:1", &token), Routing::Forced);
    assert_eq!(
        from("10.0.0.1:1", "canary"),
        Routing::Rejected {
            sticky_bucket: None
        }
    );
    assert_eq!(
        from("11.0.0.1:1", &token),
        Routing::Rejected {
            sticky_bucket: None
        }
    );
}

#[test]
fn response_header_names_the_subset() {
    let config = r#"{"clusters": {"app_stable": {"service": "app", "subset": "stable"}},
                         "responseHeader": "x-fledge-subset"}"#;
    let mut plugin = plugin_with(config);
    let mut s = FakeStream::finished("app_stable", 200);
    run(&mut plugin, &mut s, false);
    assert_eq!(s.response["x-fledge-subset"], b"stable");
    // The cluster is read once, in the response phase, not again in on_log.
    let reads = s.calls.iter().filter(|c| *c == "property cluster").count();
    assert_eq!(reads, 1, "{:?}", s.calls);
    // No cluster (no route): no header.
    let mut s = FakeStream::new().with_status(404);
    run(&mut plugin, &mut s, false);
    assert!(!s.response.contains_key("x-fledge-subset"));
}

#[test]
fn subset_from_endpoint_metadata_then_response_header() {
    let config = r#"{"clusters": {"app": {"service": "app"}}, "subsetHeader": "x-version"}"#;
    let mut setup = FakeStream::new();
    let mut plugin = plugin(config, &mut setup);
    let mut metrics = std::mem::take(&mut setup.metrics);
    let mut request = |s: FakeStream| send(&mut plugin, &mut metrics, s, false);
    request(
        FakeStream::finished("app", 200)
            .with_property("workload", b"app-v2;default;app;v2;Kubernetes"),
    );
    let mut s = FakeStream::finished("app", 500);
    s.response.insert("x-version".into(), b"v3".to_vec());
    let s = request(s);
    assert!(s.calls.contains(&"get Response x-version".to_string()));
    request(FakeStream::finished("app", 200));
    // Istio cluster without subset: metadata, else the service label.
    let istio = "outbound|80||reviews.default.svc.cluster.local";
    request(
        FakeStream::finished(istio, 200)
            .with_property("workload", b"reviews-v9;default;reviews;v9;Kubernetes"),
    );
    request(FakeStream::finished(istio, 200));
    assert_eq!(metrics.counter(&requests_name("app", "v2", "2xx")), 1);
    assert_eq!(metrics.counter(&requests_name("app", "v3", "5xx")), 1);
    assert_eq!(metrics.counter(&requests_name("app", "other", "2xx")), 1);
    assert_eq!(metrics.counter(&requests_name("reviews", "v9", "2xx")), 1);
    assert_eq!(
        metrics.counter(&requests_name("reviews", "reviews", "2xx")),
        1
    );
    // Configured clusters with a subset never ask the upstream.
    let mut plugin = plugin_with(APP);
    let mut s = FakeStream::finished("app_canary", 200).with_property("workload", b"x;y;z;v7;c");
    run(&mut plugin, &mut s, false);
    assert!(!s.calls.contains(&"property workload".to_string()));
}

#[test]
fn upstream_subsets_are_bounded() {
    let mut setup = FakeStream::new();
    let mut plugin = plugin(
        r#"{"clusters": {"app": {"service": "app"}}, "subsetHeader": "x-version"}"#,
        &mut setup,
    );
    let mut metrics = std::mem::take(&mut setup.metrics);
    for i in 0..500 {
        let mut s = FakeStream::finished("app", 200);
        s.response
            .insert("x-version".into(), format!("v{i}").into_bytes());
        s.metrics = std::mem::take(&mut metrics);
        run(&mut plugin, &mut s, false);
        plugin.flush(&mut s);
        metrics = std::mem::take(&mut s.metrics);
    }
    // 128 dynamic pairs + (other, other), 7 metrics each, + the error counter.
    assert_eq!(metrics.defined.len(), (128 + 1) * PER_PAIR + 1);
    assert_eq!(
        metrics.counter(&requests_name("other", "other", "2xx")),
        500 - 128
    );
}

#[test]
fn grpc_status_from_trailers_or_trailers_only_headers() {
    let mut setup = FakeStream::new();
    let mut plugin = plugin(APP, &mut setup);
    let mut metrics = std::mem::take(&mut setup.metrics);
    let mut request = |s: FakeStream, bodiless: bool| send(&mut plugin, &mut metrics, s, bodiless);
    let mut s = FakeStream::finished("app_canary", 200);
    s.trailers.insert("grpc-status".into(), b"14".to_vec());
    request(s, false);
    let mut s = FakeStream::finished("app_canary", 200);
    s.response.insert("grpc-status".into(), b"13".to_vec());
    request(s, true);
    let mut s = FakeStream::finished("app_canary", 200);
    s.trailers.insert("grpc-status".into(), b"0".to_vec());
    request(s, false);
    let mut s = FakeStream::finished("app_canary", 200);
    s.trailers.insert("grpc-status".into(), b"5".to_vec());
    request(s, false);
    // A body-carrying plain response is never asked for grpc-status in its headers.
    let s = request(FakeStream::finished("app_canary", 200), false);
    assert!(!s.calls.iter().any(|c| c == "get Response grpc-status"));
    assert_eq!(metrics.counter(&requests_name("app", "canary", "5xx")), 2);
    assert_eq!(metrics.counter(&requests_name("app", "canary", "2xx")), 2);
    assert_eq!(metrics.counter(&requests_name("app", "canary", "4xx")), 1);
}

const GUARDED: &str = r#"{"clusters": {"app_stable": {"service": "app", "subset": "stable"},
                                           "app_canary": {"service": "app", "subset": "canary"}},
                              "guard": {"services": {"app": {"minRequests": 4}}}}"#;

fn guard_gauge() -> String {
    contract::encode_stat_name(contract::GUARD_TRIPPED, &[(contract::TAG_SERVICE, "app")])
}

/// What several requests (and workers) share: Envoy's stats and the shared data.
#[derive(Default)]
struct Gateway {
    metrics: FakeHost,
    shared: crate::guard::fake::FakeShared,
}

impl Gateway {
    /// One whole request; returns its routing, what the guard did in `on_log`, the stream.
    fn request(
        &mut self,
        plugin: &mut Plugin,
        mut s: FakeStream,
    ) -> (Routing, Option<GuardEvent>, FakeStream) {
        s.metrics = std::mem::take(&mut self.metrics);
        s.shared = std::mem::take(&mut self.shared);
        let mut state = StreamState::started_at(s.now_nanos());
        let routing = plugin.on_request_headers(&mut state, &mut s);
        plugin.on_response_headers(&mut state, false, &mut s);
        let event = plugin.on_log(&mut state, &mut s);
        self.metrics = std::mem::take(&mut s.metrics);
        self.shared = std::mem::take(&mut s.shared);
        (routing, event, s)
    }

    fn tick(&mut self, plugin: &mut Plugin, at_secs: u64) -> Vec<GuardEvent> {
        let mut s = FakeStream::new();
        s.clock = Some(at_secs * 1_000_000_000);
        s.metrics = std::mem::take(&mut self.metrics);
        s.shared = std::mem::take(&mut self.shared);
        let events = plugin.guard_tick(&mut s);
        self.metrics = std::mem::take(&mut s.metrics);
        self.shared = std::mem::take(&mut s.shared);
        events
    }

    fn configure(&mut self, config: &str) -> Plugin {
        let mut s = FakeStream::new();
        s.metrics = std::mem::take(&mut self.metrics);
        let plugin = plugin(config, &mut s);
        self.metrics = std::mem::take(&mut s.metrics);
        plugin
    }
}

#[test]
fn guard_trips_on_a_failing_canary_and_steers_new_requests_to_stable() {
    let mut gateway = Gateway::default();
    let mut plugin = gateway.configure(GUARDED);
    assert_eq!(gateway.metrics.gauge(&guard_gauge()), None);
    // Armed: one extra hostcall per request (the strip check), no shared data.
    let (routing, _, s) = gateway.request(&mut plugin, FakeStream::finished("app_stable", 200));
    assert_eq!(routing, Routing::Untouched);
    assert!(s.calls.contains(&"get Request x-fledge-guard".to_string()));
    assert!(
        !s.calls.iter().any(|c| c.starts_with("shared")),
        "{:?}",
        s.calls
    );
    // Stable failures do not count; 3 canary failures are below minRequests 4.
    for _ in 0..10 {
        gateway.request(&mut plugin, FakeStream::finished("app_stable", 503));
    }
    for _ in 0..3 {
        let (routing, event, _) =
            gateway.request(&mut plugin, FakeStream::finished("app_canary", 503));
        assert_eq!((routing, event), (Routing::Untouched, None));
    }
    // The 4th trips it at once, in on_log.
    let (_, event, s) = gateway.request(&mut plugin, FakeStream::finished("app_canary", 503));
    assert_eq!(
        event,
        Some(GuardEvent::Tripped {
            service: "app".into(),
            window: Counts {
                requests: 4,
                failures: 4
            }
        })
    );
    assert!(s.calls.contains(&"shared set fledge.guard.app".to_string()));
    assert_eq!(gateway.metrics.gauge(&guard_gauge()), Some(NOW));
    // Every new request now carries the guard header and the route is picked again.
    let (routing, _, s) = gateway.request(&mut plugin, FakeStream::finished("app_stable", 200));
    assert_eq!(routing, Routing::Guarded);
    assert_eq!(s.request["x-fledge-guard"], b"app");
    assert!(s.calls.contains(&"clear_route_cache".to_string()));
    // A client cannot take the header off: it is replaced.
    let s = FakeStream::finished("app_stable", 200).with_request("x-fledge-guard", "none");
    let (_, _, s) = gateway.request(&mut plugin, s);
    assert_eq!(s.request["x-fledge-guard"], b"app");
}

#[test]
fn a_client_copy_of_the_guard_header_is_stripped_while_armed() {
    let mut gateway = Gateway::default();
    let mut plugin = gateway.configure(GUARDED);
    let s = FakeStream::finished("app_stable", 200).with_request("x-fledge-guard", "app");
    let (routing, _, s) = gateway.request(&mut plugin, s);
    assert_eq!(routing, Routing::Stripped);
    assert!(!s.request.contains_key("x-fledge-guard"));
}

#[test]
fn trusted_testers_still_reach_a_tripped_canary() {
    let config = r#"{"clusters": {"app_canary": {"service": "app", "subset": "canary"}},
                         "forceCanary": {"sourceCidrs": ["10.0.0.0/8"]},
                         "guard": {"services": {"app": {"minRequests": 1}}}}"#;
    let mut gateway = Gateway::default();
    let mut plugin = gateway.configure(config);
    gateway.request(&mut plugin, FakeStream::finished("app_canary", 500));
    let tester = FakeStream::finished("app_canary", 200)
        .with_request("x-fledge-stage", "canary")
        .with_property("source", b"10.1.1.1:4000");
    let (routing, _, s) = gateway.request(&mut plugin, tester);
    assert_eq!(routing, Routing::Forced);
    assert!(!s.request.contains_key("x-fledge-guard"));
    let (routing, _, _) = gateway.request(&mut plugin, FakeStream::finished("app_canary", 200));
    assert_eq!(routing, Routing::Guarded);
}

#[test]
fn other_workers_learn_the_trip_on_their_tick_and_everyone_rearms() {
    let mut gateway = Gateway::default();
    let mut worker_a = gateway.configure(GUARDED);
    let mut worker_b = gateway.configure(GUARDED);
    // Worker B counts 2 failures locally; its tick merges them into the shared window.
    for _ in 0..2 {
        gateway.request(&mut worker_b, FakeStream::finished("app_canary", 503));
    }
    assert_eq!(gateway.tick(&mut worker_b, NOW), vec![]);
    // Worker A sees 2 more: 4 in the shared window → A trips it.
    worker_a.guard_tick(&mut FakeStream::new());
    gateway.tick(&mut worker_a, NOW);
    gateway.request(&mut worker_a, FakeStream::finished("app_canary", 503));
    let (_, event, _) = gateway.request(&mut worker_a, FakeStream::finished("app_canary", 503));
    assert!(
        matches!(event, Some(GuardEvent::Tripped { .. })),
        "{event:?}"
    );
    // B does not know until its next tick.
    let (routing, _, _) = gateway.request(&mut worker_b, FakeStream::finished("app_stable", 200));
    assert_eq!(routing, Routing::Untouched);
    assert_eq!(gateway.tick(&mut worker_b, NOW), vec![]);
    let (routing, _, _) = gateway.request(&mut worker_b, FakeStream::finished("app_stable", 200));
    assert_eq!(routing, Routing::Guarded);
    // 30 s after the trip both re-arm; the gauge goes back to 0.
    let later = NOW + 31;
    assert_eq!(
        gateway.tick(&mut worker_b, later),
        vec![GuardEvent::Rearmed {
            service: "app".into()
        }]
    );
    // Worker A set its gauge when it tripped; B set its own on learning, then back to 0.
    assert_eq!(
        gateway.metrics.gauge_per_definition(&guard_gauge()),
        vec![Some(NOW), Some(0)]
    );
    let mut s = FakeStream::finished("app_stable", 200);
    s.clock = Some(later * 1_000_000_000);
    let (routing, _, _) = gateway.request(&mut worker_a, s);
    assert_eq!(routing, Routing::Untouched);
}

#[test]
fn reconfiguring_keeps_the_guard_gauge_and_state() {
    let mut gateway = Gateway::default();
    let mut plugin = gateway.configure(GUARDED);
    for _ in 0..4 {
        gateway.request(&mut plugin, FakeStream::finished("app_canary", 503));
    }
    let mut s = FakeStream::new();
    s.metrics = std::mem::take(&mut gateway.metrics);
    plugin.configure(Some(GUARDED.as_bytes()), &mut s);
    gateway.metrics = std::mem::take(&mut s.metrics);
    // Defined once (the fake asserts a single definition).
    assert_eq!(gateway.metrics.gauge(&guard_gauge()), Some(NOW));
    let (routing, _, _) = gateway.request(&mut plugin, FakeStream::finished("app_stable", 200));
    assert_eq!(routing, Routing::Guarded);
    // Without a guard in the configuration, nothing is steered or stripped.
    let mut s = FakeStream::new();
    s.metrics = std::mem::take(&mut gateway.metrics);
    plugin.configure(Some(APP.as_bytes()), &mut s);
    gateway.metrics = std::mem::take(&mut s.metrics);
    assert!(!plugin.has_guards());
    let (routing, _, s) = gateway.request(&mut plugin, FakeStream::finished("app_stable", 200));
    assert_eq!(routing, Routing::Untouched);
    assert!(
        !s.calls.iter().any(|c| c.contains("guard")),
        "{:?}",
        s.calls
    );
}

#[test]
fn picks_the_cluster_status_and_grpc_status() {
    let found =
        ResponseHeaders::from_map(&header_pairs::example_response_map(), "x-fledge-cluster");
    assert_eq!(
        found,
        ResponseHeaders {
            cluster: Some(b"outbound|80|canary|app.ns.svc.cluster.local".to_vec()),
            status: Some(503),
            grpc_status: Some(14),
        }
    );
    let other = ResponseHeaders::from_map(&header_pairs::example_response_map(), "x-other");
    assert_eq!(other.cluster, None);
    assert_eq!(other.status, Some(503));
}

#[test]
fn an_empty_cluster_value_is_absent() {
    let map = header_pairs::serialize([(":status", b"200".as_slice()), ("x-fledge-cluster", b"")]);
    assert_eq!(
        ResponseHeaders::from_map(&map, "x-fledge-cluster").cluster,
        None
    );
}

#[test]
fn no_headers_at_all_is_no_response() {
    for map in [Vec::new(), header_pairs::serialize([])] {
        assert_eq!(
            ResponseHeaders::from_map(&map, "x-fledge-cluster"),
            ResponseHeaders::default()
        );
    }
}
