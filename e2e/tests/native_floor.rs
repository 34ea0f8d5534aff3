//! `filter/native-floor` (the bench's `native-floor`: the observer's four reads made by an
//! Envoy dynamic module, with no Wasm VM) on a real Envoy: Envoy loads it, and it reads and
//! classes every request the way the observer does, so what the bench measures is that work.

use crate::support::*;

use anyhow::{ensure, Result};
use fledge_e2e::envoy::NativeAccessLog;
use fledge_e2e::{init_tracing, Envoy, EnvoyOptions};
use std::time::Duration;

#[test]
fn the_native_floor_reads_and_classes_every_request() -> Result<()> {
    init_tracing();
    let Some(log) = built_or_skip("native floor", NativeAccessLog::built_floor())? else {
        return Ok(());
    };
    let (stable, canary) = (RawUpstream::start("v1")?, RawUpstream::start("v2")?);
    let mut options = EnvoyOptions::new(stable.port(), canary.port());
    options.native_access_log = Some(log);
    let envoy = Envoy::start(options)?;
    let url = envoy.listener_url();
    // (path, the status the client sees, how many): answered, an upstream 4xx and 5xx, a
    // reset before the response (Envoy's own 503) and a reset after it started (a cut-off 200).
    let traffic = [
        ("/", 200, 10),
        ("/status/404", 404, 3),
        ("/status/503", 503, 2),
        ("/reset", 503, 2),
        ("/reset-mid", 200, 2),
    ];
    for (path, status, times) in traffic {
        for _ in 0..times {
            let reply = get(&format!("{url}{path}"), &[])?;
            ensure!(reply.status == status, "{path}: {reply:?}");
        }
    }
    // It publishes when a request comes a second after its last publication.
    std::thread::sleep(Duration::from_millis(1100));
    ensure!(get(&format!("{url}/"), &[])?.status == 200);
    for (class, want) in [("2xx", 10), ("3xx", 0), ("4xx", 3), ("5xx", 2), ("none", 4)] {
        let counted = envoy.counter_sum(&format!("fledge_native_floor_requests_total.{class}"))?;
        ensure!(counted == want, "{class}: counted {counted}, want {want}");
    }
    ensure!(
        envoy.log_text().contains("fledge-native-floor"),
        "Envoy did not log loading the module:\n{}",
        envoy.log_tail(20)
    );
    Ok(())
}
