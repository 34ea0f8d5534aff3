//! Proves the harness itself on real processes: the test backend, Envoy with file-based RDS,
//! the load generator, cleanup on drop, and (when built) the Fledge filter's labelled metrics.

use anyhow::{ensure, Result};
use fledge_e2e::envoy::{CANARY_CLUSTER, STABLE_CLUSTER};
use fledge_e2e::http::prometheus_samples;
use fledge_e2e::{
    init_tracing, paths, wait_until, Backend, BackendOptions, Envoy, EnvoyOptions, LoadGen,
    LoadOptions, RouteWeights, WasmFilter,
};
use std::time::{Duration, Instant};

fn two_backends() -> Result<(Backend, Backend)> {
    Ok((
        Backend::start("v1", BackendOptions::default())?,
        Backend::start("v2", BackendOptions::default())?,
    ))
}

fn process_exists(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Send `count` requests at 200 rps and wait for all of them.
fn send(url: &str, count: u64) -> fledge_e2e::LoadReport {
    let mut options = LoadOptions::new(200, Duration::from_secs(20));
    options.max_requests = count;
    LoadGen::start(url, options).expect("start load").wait()
}

#[test]
fn backend_answers_with_its_version_and_counts() -> Result<()> {
    init_tracing();
    let backend = Backend::start(
        "v9",
        BackendOptions {
            error_rate: 0.5,
            seed: 3,
            ..BackendOptions::default()
        },
    )?;
    let (status, body) = fledge_e2e::http::get(&backend.url(), Duration::from_secs(2))?;
    ensure!(body.contains("v9"), "body {body:?} should name the version");
    ensure!(status == 200 || status == 500, "status {status}");
    let report = send(&format!("{}/anything", backend.url()), 199);
    ensure!(report.responses() == 199, "{report:?}");
    ensure!(report.version_count("v9") == 199, "{report:?}");
    let errors = report.status_count(500);
    ensure!(
        (60..=140).contains(&errors),
        "error rate 0.5 gave {errors}/199"
    );
    let stats = backend.stats()?;
    ensure!(
        stats.served == 200,
        "served {} (stats requests must not count)",
        stats.served
    );
    let expected_errors = errors + u64::from(status == 500);
    ensure!(
        stats.errors == expected_errors,
        "errors {} vs {expected_errors}",
        stats.errors
    );
    Ok(())
}

#[test]
fn slow_fraction_makes_some_requests_slow() -> Result<()> {
    init_tracing();
    let backend = Backend::start(
        "slow",
        BackendOptions {
            slow_fraction: 1.0,
            slow_ms: 300,
            ..BackendOptions::default()
        },
    )?;
    let started = Instant::now();
    fledge_e2e::http::get_ok(&backend.url(), Duration::from_secs(5))?;
    ensure!(started.elapsed() >= Duration::from_millis(300));
    Ok(())
}

#[test]
fn envoy_proxies_to_the_stable_backend() -> Result<()> {
    init_tracing();
    let (stable, canary) = two_backends()?;
    let envoy = Envoy::start(EnvoyOptions::new(stable.port(), canary.port()))?;
    let (weights, version) = envoy.live_route_weights()?;
    ensure!(weights == RouteWeights::ALL_STABLE, "{weights}");
    ensure!(version == "1", "version {version}");

    let report = send(&envoy.listener_url(), 150);
    ensure!(report.status_count(200) == 150, "{}", report.summary());
    ensure!(report.version_count("v1") == 150, "{}", report.summary());
    ensure!(stable.served()? == 150);
    ensure!(canary.served()? == 0);
    Ok(())
}

#[test]
fn rewriting_the_rds_file_moves_traffic_to_the_canary() -> Result<()> {
    init_tracing();
    let (stable, canary) = two_backends()?;
    let envoy = Envoy::start(EnvoyOptions::new(stable.port(), canary.port()))?;
    send(&envoy.listener_url(), 20);
    let stable_before = stable.served()?;

    let reload = envoy.apply_route_weights(RouteWeights::ALL_CANARY)?;
    eprintln!(
        "weights 0/100 live {} ms after the rename",
        reload.as_millis()
    );
    let (weights, version) = envoy.live_route_weights()?;
    ensure!(weights == RouteWeights::ALL_CANARY, "{weights}");
    ensure!(version == "2", "version {version}");
    // The config dump shows the explicit zero weight.
    let dump = envoy.admin_get("/config_dump?resource=dynamic_route_configs")?;
    ensure!(dump.contains(STABLE_CLUSTER) && dump.contains(CANARY_CLUSTER));

    let report = send(&envoy.listener_url(), 100);
    ensure!(report.version_count("v2") == 100, "{}", report.summary());
    ensure!(canary.served()? == 100);
    ensure!(
        stable.served()? == stable_before,
        "stable got traffic after 0/100"
    );

    // A split is honoured too (loosely: 50/50 over 400 requests).
    envoy.apply_route_weights(RouteWeights::canary_percent(50))?;
    let report = send(&envoy.listener_url(), 400);
    let share = report.version_share("v2");
    ensure!((0.35..=0.65).contains(&share), "{}", report.summary());
    Ok(())
}

#[test]
fn a_rejected_rds_update_keeps_the_last_good_weights() -> Result<()> {
    init_tracing();
    let (stable, canary) = two_backends()?;
    let envoy = Envoy::start(EnvoyOptions::new(stable.port(), canary.port()))?;
    envoy.set_route_weights(RouteWeights {
        stable: 0,
        canary: 0,
    })?;
    wait_until("the update to be rejected", Duration::from_secs(5), || {
        let stats = envoy.admin_get("/stats?filter=rds.fledge_route.update_rejected")?;
        Ok(stats.contains("update_rejected: 1").then_some(()))
    })?;
    let (weights, _) = envoy.live_route_weights()?;
    ensure!(weights == RouteWeights::ALL_STABLE, "{weights}");
    Ok(())
}

#[test]
fn processes_are_gone_after_drop() -> Result<()> {
    init_tracing();
    let (stable, canary) = two_backends()?;
    let envoy = Envoy::start(EnvoyOptions::new(stable.port(), canary.port()))?;
    let load = LoadGen::start(
        &envoy.listener_url(),
        LoadOptions::new(100, Duration::from_secs(30)),
    )?;
    std::thread::sleep(Duration::from_millis(300));
    let pids = [stable.pid(), canary.pid(), envoy.pid()];
    let ports = [
        stable.port(),
        canary.port(),
        envoy.listener_port(),
        envoy.admin_port(),
    ];
    ensure!(pids.iter().all(|p| process_exists(*p)));
    let started = Instant::now();
    drop(load);
    drop(envoy);
    drop(stable);
    drop(canary);
    ensure!(
        started.elapsed() < Duration::from_secs(10),
        "stopping took {:?}",
        started.elapsed()
    );
    for pid in pids {
        ensure!(!process_exists(pid), "process {pid} still exists");
    }
    for port in ports {
        ensure!(
            !fledge_e2e::process::port_accepts(port),
            "port {port} still open"
        );
    }
    Ok(())
}

#[test]
fn load_is_bounded_in_count_and_time() -> Result<()> {
    init_tracing();
    let backend = Backend::start("v1", BackendOptions::default())?;
    let started = Instant::now();
    let report = LoadGen::start(
        &backend.url(),
        LoadOptions::new(100, Duration::from_secs(1)),
    )?
    .wait();
    let took = started.elapsed();
    ensure!(report.attempts() <= 100, "{}", report.summary());
    ensure!(report.attempts() >= 90, "{}", report.summary());
    ensure!(took < Duration::from_secs(3), "took {took:?}");
    Ok(())
}

/// The filter's counters appear at `/stats/prometheus` with the contract's labels.
#[test]
fn filter_metrics_appear_with_labels() -> Result<()> {
    init_tracing();
    let require = std::env::var("FLEDGE_REQUIRE_WASM").is_ok_and(|v| v == "1");
    let wasm = match paths::filter_wasm() {
        Ok(wasm) => wasm,
        Err(error) if !require => {
            eprintln!("SKIPPED filter_metrics_appear_with_labels: {error:#} (set FLEDGE_REQUIRE_WASM=1 to fail instead)");
            return Ok(());
        }
        Err(error) => return Err(error),
    };
    let (stable, canary) = two_backends()?;
    let filter = WasmFilter {
        wasm,
        plugin_config: WasmFilter::default_plugin_config("app"),
    };
    let envoy = Envoy::start(EnvoyOptions::new(stable.port(), canary.port()).with_filter(filter))?;
    envoy.apply_route_weights(RouteWeights::canary_percent(50))?;
    let report = send(&envoy.listener_url(), 100);
    ensure!(report.status_count(200) == 100, "{}", report.summary());

    let samples = wait_until(
        "fledge_requests_total for both subsets",
        Duration::from_secs(10),
        || {
            let samples = prometheus_samples(&envoy.stats_prometheus()?, "fledge_requests_total");
            let total: f64 = samples
                .iter()
                .filter(|s| s.label("fledge_service") == Some("app"))
                .map(|s| s.value)
                .sum();
            Ok((total >= 100.0).then_some(samples))
        },
    )
    .map_err(|e| e.context(format!("Envoy log tail:\n{}", envoy.log_tail(30))))?;
    let count_of = |subset: &str| -> f64 {
        samples
            .iter()
            .filter(|s| {
                s.label("fledge_service") == Some("app")
                    && s.label("fledge_subset") == Some(subset)
                    && s.label("fledge_class") == Some("2xx")
            })
            .map(|s| s.value)
            .sum()
    };
    ensure!(
        count_of("stable") as u64 == stable.served()?,
        "stable: metric {} vs served {}; samples {samples:?}",
        count_of("stable"),
        stable.served()?
    );
    ensure!(count_of("canary") as u64 == canary.served()?, "{samples:?}");
    Ok(())
}
