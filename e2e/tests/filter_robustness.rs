//! The filter under less friendly traffic, on a real Envoy with both built modules
//! (`fledge_filter.wasm` and the metrics-only `fledge_observer.wasm`): HTTP/2 (h2c), gRPC
//! statuses in trailers and trailers-only responses, upstream resets and Envoy's local replies
//! (`none`), a bad plugin configuration (fail open + error counter), oversized or odd headers,
//! two configurations sharing a VM, and each module's export list (what Envoy calls into).

use crate::support;

use anyhow::{ensure, Context, Result};
use fledge_core::contract;
use fledge_core::filter_config::FilterModule;
use fledge_e2e::envoy::{CANARY_CLUSTER, MAIN_VM_ID, STABLE_CLUSTER};
use fledge_e2e::{init_tracing, Envoy, EnvoyOptions, WasmFilter};
use fledge_filter::module::{exports, Callback};
use serde_json::{json, Value};
use std::path::Path;
use support::*;

fn clusters() -> Value {
    json!({
        STABLE_CLUSTER: {"service": "app", "subset": "stable"},
        CANARY_CLUSTER: {"service": "app", "subset": "canary"},
        "grpc_upstream": {"service": "grpcapp", "subset": "stable"},
    })
}

fn filter(wasm: &Path, config: &str) -> WasmFilter {
    WasmFilter {
        wasm: wasm.to_path_buf(),
        plugin_config: config.to_string(),
    }
}

/// A cluster that forwards HTTP/1.1 trailers (a gRPC status arrives in them).
fn grpc_cluster(port: u16) -> Value {
    let mut cluster = cluster_with_endpoints("grpc_upstream", &[(port, None)]);
    cluster["typed_extension_protocol_options"] = json!({
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http_protocol_options": {"enable_trailers": true}}
        }
    });
    cluster
}

fn no_panics(envoy: &Envoy) -> Result<()> {
    let log = envoy.log_text();
    ensure!(
        !log.contains("panicked") && !log.contains("failed: Uncaught"),
        "filter failed in Envoy:\n{}",
        envoy.log_tail(40)
    );
    Ok(())
}

#[test]
fn http2_and_grpc_statuses_are_classed() -> Result<()> {
    init_tracing();
    for (module, wasm) in modules_or_skip("http2 and grpc")? {
        for named in [false, true] {
            http2_and_grpc_statuses_are_classed_by(module, &wasm, named)
                .with_context(|| format!("{module:?}, cluster named by the route: {named}"))?;
        }
    }
    Ok(())
}

/// The header Envoy's route names the upstream cluster in, for `clusterHeader`.
const CLUSTER_HEADER: &str = "x-fledge-cluster";

/// Options for a filter configured with `config`, plus, when `named`, Envoy naming the
/// cluster in a response header and the filter reading it from there (`clusterHeader`).
fn options_with_filter(
    options: EnvoyOptions,
    wasm: &Path,
    mut config: Value,
    named: bool,
) -> EnvoyOptions {
    if !named {
        return options.with_filter(filter(wasm, &config.to_string()));
    }
    config["clusterHeader"] = json!(CLUSTER_HEADER);
    options
        .with_cluster_header(CLUSTER_HEADER)
        .with_filter(filter(wasm, &config.to_string()))
}

fn http2_and_grpc_statuses_are_classed_by(
    module: FilterModule,
    wasm: &Path,
    named: bool,
) -> Result<()> {
    let (stable, canary, grpc) = (
        RawUpstream::start("v1")?,
        RawUpstream::start("v2")?,
        RawUpstream::start("g1")?,
    );
    let tagging = module == FilterModule::Full;
    let mut config = json!({"clusters": clusters()});
    if tagging {
        config["responseHeader"] = json!("x-fledge-subset");
    }
    let envoy = Envoy::start(
        options_with_filter(
            EnvoyOptions::new(stable.port(), canary.port()),
            wasm,
            config,
            named,
        )
        .with_cluster(grpc_cluster(grpc.port()))
        .with_route_before_primary(prefix_route("/grpc", "grpc_upstream")),
    )?;
    let url = envoy.listener_url();

    // Plain HTTP/2 (h2c, prior knowledge: the listener's codec is AUTO).
    for _ in 0..3 {
        let (status, headers, version) = curl_h2(&url, &[])?;
        ensure!(
            status == 200 && version == "2",
            "{status} {version} {headers}"
        );
        ensure!(
            headers.contains("x-fledge-subset: stable") == tagging,
            "{headers}"
        );
        ensure!(
            headers.contains(&format!("{CLUSTER_HEADER}: {STABLE_CLUSTER}")) == named,
            "{headers}"
        );
    }
    // gRPC over HTTP/2: 200 with grpc-status in trailers, or trailers-only.
    let grpc_call = |path: &str| -> Result<String> {
        let (status, headers, version) = curl_h2(
            &format!("{url}{path}"),
            &[
                "-X",
                "POST",
                "-H",
                "content-type: application/grpc",
                "-H",
                "te: trailers",
                "--data-binary",
                "@/dev/null",
            ],
        )?;
        ensure!(
            status == 200 && version == "2",
            "{path}: {status} {headers}"
        );
        Ok(headers)
    };
    let cases = [
        ("/grpc/0", "2xx"),
        ("/grpc/14", "5xx"),     // UNAVAILABLE
        ("/grpc/13", "5xx"),     // INTERNAL
        ("/grpc/5", "4xx"),      // NOT_FOUND
        ("/grpc-only/2", "5xx"), // UNKNOWN, trailers-only
        ("/grpc-only/0", "2xx"),
    ];
    for (path, _) in cases {
        let headers = grpc_call(path)?;
        let code = path.rsplit('/').next().unwrap_or_default();
        ensure!(
            headers.contains(&format!("grpc-status: {code}")),
            "{path}: grpc-status not passed through: {headers}"
        );
    }
    wait_for_total(&envoy, 3.0 + cases.len() as f64)?;
    for class in ["2xx", "4xx", "5xx"] {
        let want = cases.iter().filter(|(_, c)| *c == class).count() as f64;
        let got = requests_total(
            &envoy,
            &[("fledge_service", "grpcapp"), ("fledge_class", class)],
        )?;
        ensure!(got == want, "grpc {class}: {got}, want {want}");
    }
    ensure!(
        requests_total(
            &envoy,
            &[("fledge_subset", "stable"), ("fledge_service", "app")]
        )? == 3.0
    );
    no_panics(&envoy)
}

#[test]
fn resets_and_local_replies_are_none() -> Result<()> {
    init_tracing();
    for (module, wasm) in modules_or_skip("resets and local replies")? {
        for named in [false, true] {
            resets_and_local_replies_are_none_for(&wasm, named)
                .with_context(|| format!("{module:?}, cluster named by the route: {named}"))?;
        }
    }
    Ok(())
}

fn resets_and_local_replies_are_none_for(wasm: &Path, named: bool) -> Result<()> {
    let (stable, canary) = (RawUpstream::start("v1")?, RawUpstream::start("v2")?);
    let config = json!({"clusters": clusters()});
    let envoy = Envoy::start(
        options_with_filter(
            EnvoyOptions::new(stable.port(), canary.port()),
            wasm,
            config,
            named,
        )
        .with_route_before_primary(json!({
            "match": {"prefix": "/local"},
            "direct_response": {"status": 200, "body": {"inline_string": "local"}}
        })),
    )?;
    let url = envoy.listener_url();
    let reset = get(&format!("{url}/reset"), &[])?;
    ensure!(reset.status == 503, "{reset:?}");
    // Envoy's own reply names the cluster too, so the filter reads it from the header.
    ensure!(
        (reset.header(CLUSTER_HEADER) == Some(STABLE_CLUSTER)) == named,
        "{reset:?}"
    );
    // Headers went out, then the upstream vanished: the client sees a cut-off 200.
    let mid = get(&format!("{url}/reset-mid"), &[])?;
    ensure!(mid.status == 200 && mid.body.len() < 1000, "{mid:?}");
    let upstream_error = get(&format!("{url}/status/503"), &[])?;
    ensure!(upstream_error.status == 503 && upstream_error.version() == "v1");
    let local = get(&format!("{url}/local"), &[])?;
    ensure!(local.status == 200 && local.body == "local", "{local:?}");
    wait_for_total(&envoy, 4.0)?;
    let stable_none = requests_total(
        &envoy,
        &[("fledge_subset", "stable"), ("fledge_class", "none")],
    )?;
    ensure!(stable_none == 2.0, "resets: {stable_none}");
    ensure!(
        requests_total(
            &envoy,
            &[("fledge_subset", "stable"), ("fledge_class", "5xx")]
        )? == 1.0,
        "the upstream's own 503 is 5xx"
    );
    ensure!(
        requests_total(
            &envoy,
            &[
                ("fledge_service", "other"),
                ("fledge_subset", "other"),
                ("fledge_class", "none")
            ]
        )? == 1.0,
        "a direct response has no upstream"
    );
    no_panics(&envoy)
}

/// Two configurations of one module in one Envoy share a VM (the same `vm_config`): the VM has
/// two root contexts, and each stream is counted by the root of the filter running it (context
/// create names it). Both filters see every request; each counts it under its own labels.
#[test]
fn two_configurations_sharing_a_vm_count_their_own_streams() -> Result<()> {
    init_tracing();
    for (module, wasm) in modules_or_skip("two configurations in one VM")? {
        two_configurations_sharing_a_vm_for(&wasm).with_context(|| format!("{module:?}"))?;
    }
    Ok(())
}

fn two_configurations_sharing_a_vm_for(wasm: &Path) -> Result<()> {
    let (stable, canary) = (RawUpstream::start("v1")?, RawUpstream::start("v2")?);
    let config = |service: &str| {
        json!({"clusters": {
            STABLE_CLUSTER: {"service": service, "subset": "stable"},
            CANARY_CLUSTER: {"service": service, "subset": "canary"},
        }})
        .to_string()
    };
    // In the main filter's VM (its id, this code), as another plugin with another
    // configuration.
    let second =
        filter(wasm, &config("web")).http_filter("fledge.second", "fledge-second", MAIN_VM_ID);
    let options =
        EnvoyOptions::new(stable.port(), canary.port()).with_filter(filter(wasm, &config("app")));
    let alone = Envoy::start(options.clone())?;
    let vms_alone = active_vms(&alone)?;
    drop(alone);
    let envoy = Envoy::start(options.with_http_filter_before_wasm(second))?;
    // No more VMs than with one filter: the two configurations share them.
    let vms = active_vms(&envoy)?;
    ensure!(
        vms == vms_alone,
        "{vms} VMs with two filters, {vms_alone} with one"
    );
    for _ in 0..10 {
        let reply = get(&envoy.listener_url(), &[])?;
        ensure!(reply.status == 200 && reply.version() == "v1", "{reply:?}");
    }
    wait_for_total(&envoy, 20.0)?;
    for service in ["app", "web"] {
        let counted = requests_total(
            &envoy,
            &[("fledge_service", service), ("fledge_class", "2xx")],
        )?;
        ensure!(counted == 10.0, "{service}: {counted} of 10 requests");
    }
    no_panics(&envoy)
}

/// Envoy's count of live Wasm VMs.
fn active_vms(envoy: &Envoy) -> Result<u64> {
    let stats = envoy.admin_get("/stats?filter=wasm.envoy.wasm.runtime.v8.active")?;
    stats
        .split(':')
        .nth(1)
        .and_then(|value| value.trim().parse().ok())
        .with_context(|| format!("no active VM count in {stats:?}"))
}

#[test]
fn bad_config_fails_open_and_counts_the_error() -> Result<()> {
    init_tracing();
    for (module, wasm) in modules_or_skip("bad config")? {
        bad_config_fails_open_for(module, &wasm).with_context(|| format!("{module:?}"))?;
    }
    Ok(())
}

fn bad_config_fails_open_for(module: FilterModule, wasm: &Path) -> Result<()> {
    let (stable, canary) = (RawUpstream::start("v1")?, RawUpstream::start("v2")?);
    let mut bad = vec![
        r#"{"sticky": {"cookie": "a;b"}}"#,
        r#"{"forceCanary": {"header": "stage"}}"#,
        "not json",
    ];
    if module == FilterModule::Observer {
        // Valid for the full module, but the observer cannot write headers.
        bad.push(r#"{"responseHeader": "x-fledge-subset"}"#);
    }
    for bad in bad {
        let envoy = Envoy::start(
            EnvoyOptions::new(stable.port(), canary.port())
                .with_header_route_to_canary(
                    contract::DEFAULT_ROUTE_HEADER,
                    contract::FORCED_CANARY_ROUTE_VALUE,
                )
                .with_filter(filter(wasm, bad)),
        )?;
        for _ in 0..10 {
            let reply = get(&envoy.listener_url(), &[("stage", b"canary")])?;
            ensure!(
                reply.status == 200 && reply.version() == "v1",
                "{bad}: {reply:?}"
            );
        }
        // Even with the defaults, the full module strips the internal route header (the
        // observer never sees request headers: its manifests keep routes off that header).
        let reply = get(
            &envoy.listener_url(),
            &[(contract::DEFAULT_ROUTE_HEADER, b"canary")],
        )?;
        if module == FilterModule::Full {
            ensure!(
                reply.version() == "v1",
                "{bad}: spoofed route header routed"
            );
        }
        wait_for_total(&envoy, 11.0)?;
        let errors = metric_sum(&envoy, contract::CONFIG_ERRORS_TOTAL, &[])?;
        ensure!(errors >= 1.0, "{bad}: fledge_config_errors_total {errors}");
        ensure!(
            envoy.log_text().contains("invalid plugin configuration"),
            "{bad}: error not logged"
        );
        no_panics(&envoy)?;
    }
    Ok(())
}

/// What Envoy can call: each module exports exactly the callbacks `module.rs` lists for it (a
/// build with cargo features unified across both crates would export more, and cost more).
#[test]
fn each_module_exports_only_its_callbacks() -> Result<()> {
    for (module, wasm) in modules_or_skip("module exports")? {
        let bytes = std::fs::read(&wasm)?;
        let mut exported: Vec<String> = wasm_exports(&bytes)?
            .into_iter()
            .filter(|name| name.starts_with("proxy_on_"))
            .collect();
        exported.sort();
        let mut want: Vec<String> = exports(module)
            .iter()
            .map(|callback| callback.export_name().to_string())
            .chain(
                [
                    "proxy_on_configure",
                    "proxy_on_memory_allocate",
                    "proxy_on_vm_start",
                ]
                .map(String::from),
            )
            .collect();
        want.sort();
        ensure!(
            exported == want,
            "{module:?}: exports {exported:?}, want {want:?}"
        );
        ensure!(
            module == FilterModule::Full || !exports(module).contains(&Callback::RequestHeaders)
        );
    }
    Ok(())
}

/// The names in a Wasm module's export section.
fn wasm_exports(bytes: &[u8]) -> Result<Vec<String>> {
    fn leb(bytes: &[u8], at: &mut usize) -> Result<usize> {
        let (mut value, mut shift) = (0usize, 0);
        loop {
            let byte = *bytes.get(*at).context("truncated LEB128")?;
            *at += 1;
            value |= usize::from(byte & 0x7f) << shift;
            if byte < 0x80 {
                return Ok(value);
            }
            shift += 7;
            ensure!(shift < 35, "LEB128 too long");
        }
    }
    ensure!(bytes.starts_with(b"\0asm"), "not a Wasm module");
    let mut at = 8;
    while at < bytes.len() {
        let id = bytes[at];
        at += 1;
        let size = leb(bytes, &mut at)?;
        let end = at + size;
        if id == 7 {
            let mut names = Vec::new();
            for _ in 0..leb(bytes, &mut at)? {
                let len = leb(bytes, &mut at)?;
                let name = bytes.get(at..at + len).context("truncated export name")?;
                names.push(String::from_utf8_lossy(name).into_owned());
                at += len + 1; // the name, then the export kind
                leb(bytes, &mut at)?; // the index
            }
            return Ok(names);
        }
        at = end;
    }
    Ok(Vec::new())
}

#[test]
fn oversized_and_odd_headers_keep_serving() -> Result<()> {
    init_tracing();
    let Some(wasm) = filter_wasm_or_skip("odd headers")? else {
        return Ok(());
    };
    let (stable, canary) = (RawUpstream::start("v1")?, RawUpstream::start("v2")?);
    let config = json!({
        "clusters": clusters(),
        "sticky": {"cookie": "session"},
        "forceCanary": {"secret": "odd-headers-secret-0123456789", "sourceCidrs": ["127.0.0.0/8"]},
        "responseHeader": "x-fledge-subset",
        "subsetHeader": "x-version",
    });
    let envoy = Envoy::start(
        EnvoyOptions::new(stable.port(), canary.port())
            .with_filter(filter(&wasm, &config.to_string()))
            .with_weighted_header_name(contract::DEFAULT_ROUTE_HEADER),
    )?;
    let url = envoy.listener_url();
    let big_cookie = format!("session={}; other=1", "s".repeat(40_000));
    let big_token = "9".repeat(8_000);
    let cases: Vec<Vec<(&str, Vec<u8>)>> = vec![
        vec![("cookie", big_cookie.into_bytes())],
        vec![("cookie", b"session=\xff\xfe\x80; a".to_vec())],
        vec![("cookie", b";;;=;session=;session".to_vec())],
        vec![
            ("cookie", b"a=1".to_vec()),
            ("cookie", b"session=u2".to_vec()),
        ],
        vec![("x-fledge-stage", big_token.into_bytes())],
        vec![("x-fledge-stage", b"\xff.\xfe".to_vec())],
        vec![("x-fledge-stage", b"18446744073709551616.00".to_vec())],
        vec![("x-fledge-stage", Vec::new())],
        vec![(contract::DEFAULT_ROUTE_HEADER, b"\xff".to_vec())],
        vec![(contract::DEFAULT_ROUTE_HEADER, b"-5".to_vec())],
    ];
    let mut served = 0.0;
    for headers in &cases {
        let borrowed: Vec<(&str, &[u8])> =
            headers.iter().map(|(k, v)| (*k, v.as_slice())).collect();
        let reply = get(&url, &borrowed)?;
        // Envoy itself may refuse a malformed header (400, no upstream); otherwise the request
        // is served normally and none of the odd values reaches the upstream as routing input.
        ensure!(
            reply.status == 200 || reply.status == 400,
            "{:?}: {reply:?}",
            headers.iter().map(|(k, _)| *k).collect::<Vec<_>>()
        );
        if reply.status == 200 {
            ensure!(!reply.upstream_saw("x-fledge-stage"), "{}", reply.body);
        }
        served += 1.0;
    }
    // The VM is alive and still counting.
    let reply = get(&url, &[("cookie", b"session=alice".as_slice())])?;
    ensure!(
        reply.status == 200 && reply.header("x-fledge-subset").is_some(),
        "{reply:?}"
    );
    wait_for_total(&envoy, served + 1.0)?;
    no_panics(&envoy)
}
