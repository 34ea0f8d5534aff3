use super::parse::ROOT_ALLOWED;
use super::*;
use crate::contract::{self, OTHER};

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
    let c =
        FilterConfig::parse(r#"{"clusters": {"x": {"service": "a;.;b", "subset": "ca=.=nary"}}}"#)
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
    assert_eq!(c.cluster_header, None);
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
            r#"{"clusterHeader": "x-fledge-subset", "responseHeader": "X-Fledge-Subset"}"#,
            "clusterHeader",
            "must differ from responseHeader",
        ),
        (
            r#"{"clusterHeader": "x-version", "subsetHeader": "x-version"}"#,
            "clusterHeader",
            "must differ from subsetHeader",
        ),
        (
            r#"{"clusterHeader": "x-fledge-route"}"#,
            "clusterHeader",
            "must differ from routeHeader",
        ),
        (
            r#"{"clusterHeader": ":status"}"#,
            "clusterHeader",
            "is not an HTTP header name",
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

#[test]
fn cluster_header_parses_lowercase_round_trips_and_is_valid_for_the_observer() {
    let c = FilterConfig::parse(r#"{"clusterHeader": "X-Fledge-Cluster"}"#).unwrap();
    assert_eq!(c.cluster_header.as_deref(), Some("x-fledge-cluster"));
    assert!(c
        .to_json()
        .contains(r#""clusterHeader":"x-fledge-cluster""#));
    assert_eq!(FilterConfig::parse(&c.to_json()).unwrap(), c);
    c.check_module(FilterModule::Observer).unwrap();
}
