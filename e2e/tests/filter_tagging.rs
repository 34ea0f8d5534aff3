//! The filter's canary tagging and subset detection on a real Envoy with the built `.wasm`:
//! sticky users across weight changes, forced canaries (token and source network) with spoofed
//! headers stripped, the response subset header, and — with both modules — subsets from Istio
//! endpoint metadata or an upstream header and the duration buckets (counters in Prometheus'
//! histogram shape, configurable bounds).

use crate::support;

use anyhow::{ensure, Context, Result};
use fledge_core::contract;
use fledge_core::filter_config::FilterModule;
use fledge_e2e::envoy::{CANARY_CLUSTER, STABLE_CLUSTER};
use fledge_e2e::{init_tracing, Envoy, EnvoyOptions, RouteWeights, WasmFilter};
use serde_json::{json, Value};
use std::path::Path;
use support::*;

const SECRET: &str = "e2e-secret-0123456789abcdef";

fn clusters() -> Value {
    json!({
        STABLE_CLUSTER: {"service": "app", "subset": "stable"},
        CANARY_CLUSTER: {"service": "app", "subset": "canary"},
    })
}

fn filter(wasm: &Path, config: Value) -> WasmFilter {
    WasmFilter {
        wasm: wasm.to_path_buf(),
        plugin_config: config.to_string(),
    }
}

/// Options with the filter, the forced-canary route and the sticky `header_name`.
fn tagging_envoy(wasm: &Path, config: Value, stable: u16, canary: u16) -> EnvoyOptions {
    EnvoyOptions::new(stable, canary)
        .with_filter(filter(wasm, config))
        .with_header_route_to_canary(
            contract::DEFAULT_ROUTE_HEADER,
            contract::FORCED_CANARY_ROUTE_VALUE,
        )
        .with_weighted_header_name(contract::DEFAULT_ROUTE_HEADER)
}

/// A forced-canary token, made with openssl like a tester would.
fn token(expiry: u64) -> Result<String> {
    let output = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "printf %s {expiry} | openssl dgst -sha256 -hmac '{SECRET}'"
        ))
        .output()
        .context("running openssl")?;
    let text = String::from_utf8(output.stdout)?;
    let hex = text.split_whitespace().last().unwrap_or_default();
    ensure!(hex.len() == 64, "openssl printed {text:?}");
    Ok(format!("{expiry}.{hex}"))
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[test]
fn sticky_users_only_move_from_stable_to_canary_as_weights_climb() -> Result<()> {
    init_tracing();
    let Some(wasm) = filter_wasm_or_skip("sticky users")? else {
        return Ok(());
    };
    let (stable, canary) = (RawUpstream::start("v1")?, RawUpstream::start("v2")?);
    let config = json!({
        "clusters": clusters(),
        "sticky": {"header": "x-user-id"},
        "responseHeader": "x-fledge-subset",
    });
    let envoy = Envoy::start(tagging_envoy(&wasm, config, stable.port(), canary.port()))?;
    let url = envoy.listener_url();
    const USERS: usize = 400;
    let mut on_canary = vec![Vec::new(); USERS];
    for weight in [10u32, 30, 60] {
        envoy.apply_route_weights(RouteWeights::canary_percent(weight))?;
        let mut canary_users = 0;
        for (user, history) in on_canary.iter_mut().enumerate() {
            let key = format!("user-{user}");
            let reply = get(&url, &[("x-user-id", key.as_bytes())])?;
            ensure!(reply.status == 200, "{reply:?}");
            let is_canary = reply.version() == "v2";
            let tagged = if is_canary { "canary" } else { "stable" };
            ensure!(
                reply.header("x-fledge-subset") == Some(tagged),
                "response header disagrees with the upstream: {reply:?}"
            );
            ensure!(
                !reply.upstream_saw("x-user-id")
                    || reply.upstream_saw(contract::DEFAULT_ROUTE_HEADER),
                "sticky request without route header upstream: {}",
                reply.body
            );
            canary_users += usize::from(is_canary);
            history.push(is_canary);
        }
        let share = canary_users as f64 / USERS as f64;
        eprintln!(
            "weight {weight}%: {canary_users}/{USERS} users on canary ({:.1}%)",
            100.0 * share
        );
        ensure!(
            (share - f64::from(weight) / 100.0).abs() <= 0.07,
            "canary share {share:.3} at weight {weight}%"
        );
        // The same user asked again lands on the same version.
        for (user, history) in on_canary.iter().enumerate().take(50) {
            let key = format!("user-{user}");
            let reply = get(&url, &[("x-user-id", key.as_bytes())])?;
            ensure!(
                (reply.version() == "v2") == history.last().copied().unwrap_or(false),
                "user {user} flipped within one weight"
            );
        }
    }
    expect_users_only_moved_to_canary(&on_canary, "")?;
    expect_keyless_requests_picked_at_random(&url)?;
    // A client cannot pick its own bucket: a spoofed route header is replaced.
    let mut spoofed_canary = 0;
    for _ in 0..50 {
        let reply = get(&url, &[(contract::DEFAULT_ROUTE_HEADER, b"9999")])?;
        spoofed_canary += usize::from(reply.version() == "v2");
        ensure!(
            !reply.upstream_saw(contract::DEFAULT_ROUTE_HEADER),
            "{}",
            reply.body
        );
    }
    ensure!(
        spoofed_canary < 50,
        "a spoofed bucket pinned every request to the canary"
    );
    Ok(())
}

#[test]
fn forced_canary_needs_a_valid_token_and_spoofed_headers_are_stripped() -> Result<()> {
    init_tracing();
    let Some(wasm) = filter_wasm_or_skip("forced canary")? else {
        return Ok(());
    };
    let (stable, canary) = (RawUpstream::start("v1")?, RawUpstream::start("v2")?);
    let config = json!({
        "clusters": clusters(),
        "forceCanary": {"header": "stage", "secret": SECRET},
        "responseHeader": "x-fledge-subset",
    });
    // All traffic to stable: the "send me to canary" phase before any weight moves.
    let envoy = Envoy::start(tagging_envoy(&wasm, config, stable.port(), canary.port()))?;
    let url = envoy.listener_url();
    let valid = token(unix_now() + 600)?;

    let reply = get(&url, &[("stage", valid.as_bytes())])?;
    ensure!(
        reply.version() == "v2",
        "valid token not routed to canary: {reply:?}"
    );
    ensure!(
        reply.header("x-fledge-subset") == Some("canary"),
        "{reply:?}"
    );
    ensure!(
        !reply.upstream_saw("stage"),
        "token reached the upstream: {}",
        reply.body
    );

    let expired = token(unix_now() - 1)?;
    let forged = format!("{}.{}", unix_now() + 600, "0".repeat(64));
    let mut ask = |headers: &[(&str, &[u8])]| get(&url, headers);
    expect_untrusted_tokens_on_stable(&mut ask, &["canary", &expired, &forged])?;
    expect_spoofed_route_headers_stripped(&mut ask)?;
    wait_for_total(&envoy, 6.0)?;
    let accepted = metric_sum(&envoy, contract::FORCED_CANARY_ACCEPTED_TOTAL, &[])?;
    let rejected = metric_sum(&envoy, contract::FORCED_CANARY_REJECTED_TOTAL, &[])?;
    ensure!(
        accepted == 1.0 && rejected == 3.0,
        "accepted {accepted}, rejected {rejected}"
    );
    ensure!(
        requests_total(
            &envoy,
            &[("fledge_subset", "canary"), ("fledge_class", "2xx")]
        )? == 1.0,
        "canary metric"
    );
    Ok(())
}

#[test]
fn forced_canary_by_source_network() -> Result<()> {
    init_tracing();
    let Some(wasm) = filter_wasm_or_skip("forced canary by network")? else {
        return Ok(());
    };
    let (stable, canary) = (RawUpstream::start("v1")?, RawUpstream::start("v2")?);
    for (cidr, expected) in [("127.0.0.0/8", "v2"), ("10.0.0.0/8", "v1")] {
        let config = json!({"clusters": clusters(), "forceCanary": {"sourceCidrs": [cidr]}});
        let envoy = Envoy::start(tagging_envoy(&wasm, config, stable.port(), canary.port()))?;
        let reply = get(&envoy.listener_url(), &[("x-fledge-stage", b"canary")])?;
        ensure!(
            reply.version() == expected,
            "from 127.0.0.1 with sourceCidrs {cidr}: {reply:?}"
        );
        ensure!(!reply.upstream_saw("x-fledge-stage"), "{}", reply.body);
    }
    Ok(())
}

/// Measured with Envoy 1.40: the route header the filter writes is honoured even when RBAC (what
/// Istio's AuthorizationPolicy becomes, and which resolves the route for its per-route config)
/// runs before the Wasm filter, with or without the filter's `clear_route_cache` call. The call
/// stays on by default (`clearRouteCache: true`) for hosts that do keep a stale route.
#[test]
fn forced_route_holds_behind_a_filter_that_resolved_the_route_first() -> Result<()> {
    init_tracing();
    let Some(wasm) = filter_wasm_or_skip("route cache")? else {
        return Ok(());
    };
    let (stable, canary) = (RawUpstream::start("v1")?, RawUpstream::start("v2")?);
    // RBAC (what Istio's AuthorizationPolicy becomes) looks up per-route config, which resolves
    // and caches the route before the Wasm filter runs.
    let rbac = json!({"name": "envoy.filters.http.rbac", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
        "rules": {"action": "ALLOW", "policies": {"all": {
            "permissions": [{"any": true}], "principals": [{"any": true}]}}}}});
    let mut seen = Vec::new();
    for (rbac_first, clear, expected) in [
        (false, false, "v2"),
        (true, false, "v2"),
        (true, true, "v2"),
    ] {
        let config = json!({
            "clusters": clusters(),
            "forceCanary": {"sourceCidrs": ["127.0.0.1"]},
            "clearRouteCache": clear,
        });
        let mut options = tagging_envoy(&wasm, config, stable.port(), canary.port());
        if rbac_first {
            options = options.with_http_filter_before_wasm(rbac.clone());
        }
        let envoy = Envoy::start(options)?;
        let reply = get(&envoy.listener_url(), &[("x-fledge-stage", b"canary")])?;
        seen.push(format!(
            "rbac first {rbac_first}, clearRouteCache {clear}: {}",
            reply.version()
        ));
        ensure!(reply.version() == expected, "{seen:?}");
    }
    eprintln!("{}", seen.join("\n"));
    Ok(())
}

#[test]
fn subsets_from_istio_endpoint_metadata_upstream_header_or_other() -> Result<()> {
    init_tracing();
    for (module, wasm) in modules_or_skip("subset fallbacks")? {
        subsets_by(module, &wasm).with_context(|| format!("{module:?}"))?;
    }
    Ok(())
}

fn subsets_by(module: FilterModule, wasm: &Path) -> Result<()> {
    let (v1, v2) = (RawUpstream::start("v1")?, RawUpstream::start("v2")?);
    // One Istio Service in front of both versions (no subsets); Istio puts the revision in
    // each endpoint's metadata.
    let istio = "outbound|80||reviews.default.svc.cluster.local";
    let tagging = module == FilterModule::Full;
    let mut config = json!({
        "clusters": {STABLE_CLUSTER: {"service": "app", "subset": "stable"},
                     "app_all": {"service": "app"}},
        "subsetHeader": "x-version",
        "durationBucketsMs": [3, 7, 42],
    });
    if tagging {
        config["responseHeader"] = json!("x-fledge-subset");
    }
    let options = EnvoyOptions::new(v1.port(), v2.port())
        .with_filter(filter(wasm, config))
        .with_cluster(cluster_with_endpoints(
            istio,
            &[
                (v1.port(), Some("reviews-v1;default;reviews;v1;Kubernetes")),
                (v2.port(), Some("reviews-v2;default;reviews;v2;Kubernetes")),
            ],
        ))
        .with_cluster(cluster_with_endpoints(
            "app_all",
            &[(v1.port(), None), (v2.port(), None)],
        ))
        .with_cluster(cluster_with_endpoints("mystery", &[(v1.port(), None)]))
        .with_route_before_primary(prefix_route("/istio", istio))
        .with_route_before_primary(prefix_route("/byheader", "app_all"))
        .with_route_before_primary(prefix_route("/mystery", "mystery"));
    let envoy = Envoy::start(options)?;
    let url = envoy.listener_url();
    let mut by_version = std::collections::BTreeMap::<String, u32>::new();
    for path in ["/istio", "/byheader"] {
        for _ in 0..20 {
            let reply = get(&format!("{url}{path}"), &[])?;
            ensure!(reply.status == 200, "{reply:?}");
            // The response header names what the metadata / upstream header said.
            let named = reply.header("x-fledge-subset");
            ensure!(
                named == tagging.then_some(reply.version()),
                "{path}: {reply:?}"
            );
            *by_version
                .entry(format!("{path} {}", reply.version()))
                .or_default() += 1;
        }
    }
    for _ in 0..5 {
        get(&format!("{url}/mystery"), &[])?;
    }
    wait_for_total(&envoy, 45.0)?;
    for (key, count) in &by_version {
        let (path, version) = key.split_once(' ').unwrap_or_default();
        let service = if path == "/istio" { "reviews" } else { "app" };
        let metric = requests_total(
            &envoy,
            &[
                ("fledge_service", service),
                ("fledge_subset", version),
                ("fledge_class", "2xx"),
            ],
        )?;
        ensure!(
            metric == f64::from(*count),
            "{key}: metric {metric}, served {count}"
        );
    }
    ensure!(
        by_version.len() == 4,
        "round robin should reach both versions: {by_version:?}"
    );
    ensure!(
        requests_total(
            &envoy,
            &[("fledge_service", "other"), ("fledge_subset", "other")]
        )? == 5.0
    );

    // Buckets from durationBucketsMs, in the histogram shape, consistent with the count.
    let text = envoy.stats_prometheus()?;
    let samples = fledge_e2e::http::parse_prometheus(&text);
    let series = |name: &str| {
        samples
            .iter()
            .filter(|s| {
                s.name == name
                    && s.labels.get("fledge_service").map(String::as_str) == Some("reviews")
                    && s.labels.get("fledge_subset").map(String::as_str) == Some("v1")
            })
            .collect::<Vec<_>>()
    };
    let mut buckets: Vec<(f64, f64)> = series("fledge_request_duration_ms_bucket")
        .iter()
        .map(|s| {
            let le = s.labels.get("le").map(String::as_str).unwrap_or("?");
            (le.parse::<f64>().unwrap_or(f64::NAN), s.value)
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let bounds: Vec<f64> = buckets.iter().map(|(le, _)| *le).collect();
    ensure!(
        bounds == [3.0, 7.0, 42.0, f64::INFINITY],
        "bucket bounds {bounds:?}"
    );
    let served = by_version.get("/istio v1").copied().map(f64::from);
    let count = series("fledge_request_duration_ms_count")
        .first()
        .map(|s| s.value);
    ensure!(count == served, "count {count:?}, served {served:?}");
    ensure!(
        buckets.windows(2).all(|w| w[0].1 <= w[1].1) && buckets.last().map(|b| b.1) == served,
        "buckets not cumulative up to the count: {buckets:?}"
    );
    ensure!(
        text.contains("# TYPE fledge_request_duration_ms_bucket counter"),
        "bucket series are not counters"
    );
    ensure!(!series("fledge_request_duration_ms_sum").is_empty());
    Ok(())
}

/// Sticky users and the subset response header done by Envoy's route, with the filter left to
/// what needs code (metrics and the forced-canary token): the lean way to tag on Envoy.
#[test]
fn sticky_users_and_subset_header_from_the_route_alone() -> Result<()> {
    init_tracing();
    let Some(wasm) = filter_wasm_or_skip("native sticky users")? else {
        return Ok(());
    };
    let (stable, canary) = (RawUpstream::start("v1")?, RawUpstream::start("v2")?);
    let native = |salt: &str, subset_header: &str| {
        let config =
            json!({"clusters": clusters(), "forceCanary": {"header": "stage", "secret": SECRET}});
        EnvoyOptions::new(stable.port(), canary.port())
            .with_filter(filter(&wasm, config))
            .with_header_route_to_canary(
                contract::DEFAULT_ROUTE_HEADER,
                contract::FORCED_CANARY_ROUTE_VALUE,
            )
            .with_native_sticky("x-user-id", salt)
            .with_native_subset_header(subset_header)
    };
    let envoy = Envoy::start(native("rollout-1:", "x-fledge-subset"))?;
    let url = envoy.listener_url();
    const USERS: usize = 400;
    let mut on_canary = vec![Vec::new(); USERS];
    for weight in [10u32, 30, 60] {
        envoy.apply_route_weights(RouteWeights::canary_percent(weight))?;
        let canary_users = ask_every_user(&url, &mut on_canary, "x-fledge-subset")?;
        let share = canary_users as f64 / USERS as f64;
        eprintln!(
            "native sticky, weight {weight}%: {canary_users}/{USERS} users on canary ({:.1}%)",
            100.0 * share
        );
        ensure!(
            (share - f64::from(weight) / 100.0).abs() <= 0.07,
            "canary share {share:.3} at weight {weight}%"
        );
        let before: Vec<bool> = on_canary.iter().map(|h| h.last() == Some(&true)).collect();
        ask_every_user(&url, &mut on_canary, "x-fledge-subset")?;
        let flipped = on_canary
            .iter()
            .zip(&before)
            .filter(|(history, was)| history.last() != Some(*was))
            .count();
        ensure!(flipped == 0, "{flipped} users flipped within one weight");
    }
    expect_users_only_moved_to_canary(&on_canary, "native sticky: ")?;
    expect_keyless_requests_picked_at_random(&url)?;
    // The forced route carries the header too, and a valid token still wins at any weight.
    envoy.apply_route_weights(RouteWeights::ALL_STABLE)?;
    let valid = token(unix_now() + 600)?;
    let reply = get(
        &url,
        &[("stage", valid.as_bytes()), ("x-user-id", b"user-1")],
    )?;
    ensure!(
        reply.version() == "v2" && reply.header("x-fledge-subset") == Some("canary"),
        "forced canary: {reply:?}"
    );
    envoy.stop();

    // Another salt picks other users first; the header replaces the upstream's own value.
    let envoy = Envoy::start(native("rollout-2:", "x-version"))?;
    envoy.apply_route_weights(RouteWeights::canary_percent(30))?;
    let mut salted = vec![Vec::new(); USERS];
    ask_every_user(&envoy.listener_url(), &mut salted, "x-version")?;
    let both = on_canary
        .iter()
        .zip(&salted)
        .filter(|(a, b)| a.get(2) == Some(&true) && b.first() == Some(&true))
        .count();
    eprintln!("native sticky: users on canary at 30% under both salts: {both}");
    ensure!(
        both < 80,
        "{both} users on canary at 30% under both salts: the salt does not change the pick"
    );
    envoy.stop();

    // Envoy's own 503 for an unreachable canary names the subset as well.
    let dead = fledge_e2e::process::free_port()?;
    let mut options = native("rollout-1:", "x-fledge-subset");
    options.canary_port = dead;
    options.initial_weights = RouteWeights::canary_percent(100);
    let envoy = Envoy::start(options)?;
    let reply = get(&envoy.listener_url(), &[("x-user-id", b"user-1")])?;
    ensure!(
        reply.status == 503 && reply.header("x-fledge-subset") == Some("canary"),
        "unreachable canary: {reply:?}"
    );
    Ok(())
}

/// Each user asks once; appends where they landed, checking the subset header agrees with the
/// upstream that answered. Returns how many landed on the canary.
fn ask_every_user(url: &str, on_canary: &mut [Vec<bool>], subset_header: &str) -> Result<usize> {
    let mut canary_users = 0;
    for (user, history) in on_canary.iter_mut().enumerate() {
        let key = format!("user-{user}");
        let reply = get(url, &[("x-user-id", key.as_bytes())])?;
        ensure!(reply.status == 200, "{reply:?}");
        let is_canary = reply.version() == "v2";
        let tagged = if is_canary { "canary" } else { "stable" };
        ensure!(
            reply.header(subset_header) == Some(tagged),
            "{subset_header} disagrees with the upstream: {reply:?}"
        );
        canary_users += usize::from(is_canary);
        history.push(is_canary);
    }
    Ok(canary_users)
}

/// The leanest tagging on Envoy: the observer on every request, the full module only on the
/// routes of requests that carry the token or the route header, sticky users and the subset
/// header from the route. Each request is still counted exactly once.
#[test]
fn forced_canary_filter_runs_only_where_a_token_or_route_header_is() -> Result<()> {
    init_tracing();
    let Some(full) = filter_wasm_or_skip("route-scoped forced canary")? else {
        return Ok(());
    };
    let observer = full.with_file_name("fledge_observer.wasm");
    let (stable, canary) = (RawUpstream::start("v1")?, RawUpstream::start("v2")?);
    let forced =
        json!({"clusters": clusters(), "forceCanary": {"header": "stage", "secret": SECRET}});
    let envoy = Envoy::start(
        EnvoyOptions::new(stable.port(), canary.port())
            .with_filter(filter(&observer, json!({"clusters": clusters()})))
            .with_forced_canary_routes(filter(&full, forced), "stage")
            .with_header_route_to_canary(
                contract::DEFAULT_ROUTE_HEADER,
                contract::FORCED_CANARY_ROUTE_VALUE,
            )
            .with_native_sticky("x-user-id", "rollout-1:")
            .with_native_subset_header("x-fledge-subset"),
    )?;
    let url = envoy.listener_url();
    let mut sent = 0.0;
    let mut ask = |headers: &[(&str, &[u8])]| -> Result<Reply> {
        sent += 1.0;
        get(&url, headers)
    };
    let valid = token(unix_now() + 600)?;
    let reply = ask(&[("stage", valid.as_bytes())])?;
    ensure!(
        reply.version() == "v2" && reply.header("x-fledge-subset") == Some("canary"),
        "valid token at 0% canary: {reply:?}\n{}",
        envoy.log_tail(15)
    );
    ensure!(
        !reply.upstream_saw("stage"),
        "token upstream: {}",
        reply.body
    );

    let expired = token(unix_now() - 1)?;
    expect_untrusted_tokens_on_stable(&mut ask, &["canary", &expired])?;
    // Whatever its value, a client-sent route header turns the full module on, which strips it.
    expect_spoofed_route_headers_stripped(&mut ask)?;
    // Everyone else: the weighted route, the observer alone.
    envoy.apply_route_weights(RouteWeights::canary_percent(50))?;
    let mut canary_users = 0;
    for user in 0..100 {
        let key = format!("user-{user}");
        let reply = ask(&[("x-user-id", key.as_bytes())])?;
        let is_canary = reply.version() == "v2";
        canary_users += usize::from(is_canary);
        ensure!(
            reply.header("x-fledge-subset") == Some(if is_canary { "canary" } else { "stable" }),
            "{reply:?}"
        );
    }
    ensure!(
        (30..=70).contains(&canary_users),
        "{canary_users}/100 on canary at 50%"
    );

    wait_for_total(&envoy, sent)?;
    let accepted = metric_sum(&envoy, contract::FORCED_CANARY_ACCEPTED_TOTAL, &[])?;
    let rejected = metric_sum(&envoy, contract::FORCED_CANARY_REJECTED_TOTAL, &[])?;
    ensure!(
        accepted == 1.0 && rejected == 2.0,
        "accepted {accepted}, rejected {rejected}"
    );
    let canary_2xx = requests_total(
        &envoy,
        &[("fledge_subset", "canary"), ("fledge_class", "2xx")],
    )?;
    ensure!(
        canary_2xx == 1.0 + canary_users as f64,
        "canary requests counted {canary_2xx}, served {}",
        1 + canary_users
    );
    // Counted once each: nothing beyond what was sent shows up a moment later.
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let total = requests_total(&envoy, &[])?;
    ensure!(total == sent, "{total} requests counted, {sent} sent");
    Ok(())
}

/// Sends one request with the given headers.
type Ask<'a> = dyn FnMut(&[(&str, &[u8])]) -> Result<Reply> + 'a;

/// Untrusted tokens (in header `stage`) reach stable, tagged so, and never the upstream.
fn expect_untrusted_tokens_on_stable(ask: &mut Ask, values: &[&str]) -> Result<()> {
    for value in values {
        let reply = ask(&[("stage", value.as_bytes())])?;
        ensure!(
            reply.version() == "v1" && reply.header("x-fledge-subset") == Some("stable"),
            "untrusted {value:?}: {reply:?}"
        );
        ensure!(
            !reply.upstream_saw("stage"),
            "untrusted header passed: {}",
            reply.body
        );
    }
    Ok(())
}

/// The internal routing header from a client never routes and never reaches the upstream.
fn expect_spoofed_route_headers_stripped(ask: &mut Ask) -> Result<()> {
    for value in ["canary", "99"] {
        let reply = ask(&[(contract::DEFAULT_ROUTE_HEADER, value.as_bytes())])?;
        ensure!(
            reply.version() == "v1",
            "spoofed route header {value:?} routed: {reply:?}"
        );
        ensure!(
            !reply.upstream_saw(contract::DEFAULT_ROUTE_HEADER),
            "{}",
            reply.body
        );
    }
    Ok(())
}

/// Across the steps (each user's landings, in order), some users moved stable → canary and
/// none back.
fn expect_users_only_moved_to_canary(on_canary: &[Vec<bool>], label: &str) -> Result<()> {
    let went_back: Vec<usize> = on_canary
        .iter()
        .enumerate()
        .filter(|(_, steps)| steps.windows(2).any(|w| w[0] && !w[1]))
        .map(|(user, _)| user)
        .collect();
    let moved_forward = on_canary
        .iter()
        .filter(|steps| steps.windows(2).any(|w| !w[0] && w[1]))
        .count();
    eprintln!(
        "{label}users moved stable→canary: {moved_forward}; canary→stable: {}",
        went_back.len()
    );
    ensure!(
        went_back.is_empty(),
        "users moved back to stable: {went_back:?}"
    );
    ensure!(moved_forward > 0, "no user moved to the canary");
    Ok(())
}

/// Requests without a key keep random picks (the caller set 60% canary).
fn expect_keyless_requests_picked_at_random(url: &str) -> Result<()> {
    let mut canary_count = 0;
    for _ in 0..200 {
        canary_count += usize::from(get(url, &[])?.version() == "v2");
    }
    ensure!(
        (90..=150).contains(&canary_count),
        "anonymous canary picks {canary_count}/200"
    );
    Ok(())
}
