//! `make demo` is the main job: run the demo binary itself (real Envoy, backends, load, one
//! `fledge run` through two rollouts) and require what it promises — v2 promoted, v3 rolled
//! back, one dashboard URL that shows both, every process stopped — so CI notices when the demo
//! breaks, not the first user.

use anyhow::{ensure, Result};
use fledge_e2e::{browser, init_tracing, paths, ScratchDir};
use std::time::Duration;

#[test]
fn the_demo_promotes_v2_and_rolls_back_v3() -> Result<()> {
    init_tracing();
    let dir = ScratchDir::temp("demo")?;
    let (code, out, err) = browser::run_bounded(
        &paths::cargo_binary("fledge-demo")?,
        &["--work-dir", dir.path().to_str().unwrap_or_default()],
        Duration::from_secs(400),
    )?;
    let tail = |text: &str| {
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    };
    ensure!(
        code == 0,
        "fledge-demo exit {code}\nstdout tail:\n{}\nstderr tail:\n{}",
        tail(&out),
        tail(&err)
    );
    for promise in [
        "rollout-1: Promoted after",
        "≥ 99% of new requests reach v2",
        "fledge leaves the route alone after a finished rollout",
        "rollout-2: RolledBack after",
        "no request reaches v3",
        "dashboard:  http://127.0.0.1:",
        "one dashboard for the whole demo: http://127.0.0.1:",
        "$ fledge status app",
        "demo passed: v2 promoted, v3 rolled back; every process stopped",
    ] {
        ensure!(
            out.contains(promise),
            "the demo did not print {promise:?}\n{}",
            tail(&out)
        );
    }
    // One controller, one URL: the dashboard printed at the start is the one that shows both
    // outcomes at the end.
    let urls = |marker: &str| -> Vec<String> {
        out.lines()
            .filter_map(|line| line.split(marker).nth(1))
            .filter_map(|rest| rest.split_whitespace().next())
            .map(str::to_string)
            .collect()
    };
    let printed = urls("dashboard:  ");
    let checked = urls("one dashboard for the whole demo: ");
    ensure!(
        printed.len() == 1 && checked == printed,
        "one dashboard URL expected for the whole demo: printed {printed:?}, checked {checked:?}"
    );
    ensure!(
        out.matches("fledge: status API on").count() <= 1,
        "more than one fledge run started:\n{}",
        tail(&out)
    );
    Ok(())
}
