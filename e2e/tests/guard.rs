//! The data-plane guard on a real Envoy (2 workers sharing the guard's window) with the real
//! controller: a canary held at 50% starts failing every request at a known instant.
//!
//! - With the guard, the canary backend serves its last request within 1 s of its first
//!   failure, and `fledge run` (spec defaults plus `guard: {}`) reports `RolledBack` with 0%
//!   canary live in Envoy within 10 s.
//! - A client cannot set or take off the guard's internal header.

use anyhow::{ensure, Result};
use fledge_core::contract;
use fledge_e2e::rollback::{self, RollbackOptions};
use fledge_e2e::{
    init_tracing, Backend, BackendOptions, Envoy, EnvoyOptions, RouteWeights, WasmFilter,
};
use std::time::Duration;

#[test]
fn guard_stops_a_failing_canary_within_a_second_and_the_controller_rolls_back() -> Result<()> {
    init_tracing();
    let times = rollback::run(&RollbackOptions::default())?;
    eprintln!("{times:?}");
    ensure!(
        times.guard_ms <= 1000,
        "the canary kept receiving requests for {} ms after its first failure ({} failed requests)",
        times.guard_ms,
        times.canary_failures
    );
    let controller_ms = times.controller_ms.unwrap_or(u64::MAX);
    ensure!(
        controller_ms <= 10_000,
        "the controller's rollback took {controller_ms} ms"
    );
    ensure!(
        times.reason.contains("data-plane guard tripped"),
        "rolled back for another reason: {}",
        times.reason
    );
    ensure!(times.guard_gauge > 0, "fledge_guard_tripped stayed 0");
    Ok(())
}

#[test]
fn the_guard_alone_stops_a_failing_canary_without_a_controller() -> Result<()> {
    init_tracing();
    let times = rollback::run(&RollbackOptions {
        controller: false,
        ..RollbackOptions::default()
    })?;
    eprintln!("{times:?}");
    ensure!(
        times.guard_ms <= 1000,
        "the canary kept receiving requests for {} ms ({} failed)",
        times.guard_ms,
        times.canary_failures
    );
    ensure!(times.guard_gauge > 0, "fledge_guard_tripped stayed 0");
    Ok(())
}

#[test]
fn clients_cannot_use_the_guard_header() -> Result<()> {
    init_tracing();
    let stable = Backend::start("v1", BackendOptions::default())?;
    let canary = Backend::start("v2", BackendOptions::default())?;
    let envoy = |filter: bool| -> Result<Envoy> {
        let mut options = EnvoyOptions::new(stable.port(), canary.port())
            .with_route_before_primary(rollback::guard_route());
        options.initial_weights = RouteWeights::ALL_CANARY;
        if filter {
            options = options.with_filter(WasmFilter::built(&rollback::plugin_config(true))?);
        }
        Envoy::start(options)
    };
    let agent = fledge_e2e::http::agent(Duration::from_secs(5));
    let versions = |envoy: &Envoy| -> Result<Vec<String>> {
        (0..10)
            .map(|_| {
                let response = agent
                    .get(envoy.listener_url())
                    .header(contract::DEFAULT_GUARD_HEADER, "app")
                    .call()?;
                Ok(response
                    .headers()
                    .get("x-backend-version")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-")
                    .to_string())
            })
            .collect()
    };
    // Without the filter the guard route obeys the client: the header reaches stable.
    let plain = envoy(false)?;
    ensure!(
        versions(&plain)?.iter().all(|v| v == "v1"),
        "the guard route did not match"
    );
    // With the filter the header is stripped (the guard is armed): all traffic to the canary.
    let filtered = envoy(true)?;
    let seen = versions(&filtered)?;
    ensure!(
        seen.iter().all(|v| v == "v2"),
        "a client-sent guard header steered requests: {seen:?}"
    );
    Ok(())
}
