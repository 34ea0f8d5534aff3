//! `fledge-bench-rollback` — how fast a canary that starts failing every request is stopped
//! (`make bench-rollback`).
//!
//! Each round runs [`fledge_e2e::rollback`] on fresh real processes: Envoy (2 workers) with the
//! filter and its guard, `fledge run` at the spec's defaults plus `guard: {}` holding the canary
//! at 50%, 200 requests/s; then the canary answers 500 to everything. Per round it prints
//! - **guard**: first failed canary request → last request the canary served (backend clock);
//! - **controller**: first failed canary request → `RolledBack` in the API with 0% canary live
//!   in Envoy;
//!
//! then the median and maximum of each. Exits non-zero if a maximum misses its target (guard
//! ≤ 1 s, controller ≤ 10 s).

#![forbid(unsafe_code)]

use anyhow::{bail, Result};
use clap::Parser;
use fledge_e2e::rollback::{self, RollbackOptions};

#[derive(Debug, Parser)]
#[command(
    name = "fledge-bench-rollback",
    about = "Time from a canary's first failure to its traffic stopping (guard) and to its rollback (controller)"
)]
struct Args {
    /// Rounds, each on fresh processes.
    #[arg(long, default_value_t = 5)]
    rounds: u32,
    /// Requests per second (stable and canary together; the canary gets half).
    #[arg(long, default_value_t = 200)]
    rps: u32,
}

fn median(values: &[u64]) -> u64 {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    match sorted.len() {
        0 => 0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2,
    }
}

fn main() -> Result<()> {
    fledge_e2e::init_tracing();
    let args = Args::parse();
    if args.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    let options = RollbackOptions {
        rps: args.rps,
        ..RollbackOptions::default()
    };
    println!(
        "bench-rollback: {} rounds; Envoy {} workers, {} requests/s, canary held at {}%, fledge run with spec defaults + guard: {{}}",
        args.rounds, options.concurrency, options.rps, options.canary_weight
    );
    let (mut guard, mut controller) = (Vec::new(), Vec::new());
    for round in 1..=args.rounds {
        let times = rollback::run(&options)?;
        let controller_ms = times
            .controller_ms
            .ok_or_else(|| anyhow::anyhow!("round {round}: no controller rollback measured"))?;
        println!(
            "  round {round}: guard {:>5} ms ({} failed canary requests), controller {:>5} ms",
            times.guard_ms, times.canary_failures, controller_ms
        );
        guard.push(times.guard_ms);
        controller.push(controller_ms);
    }
    let max = |v: &[u64]| v.iter().copied().max().unwrap_or(0);
    println!(
        "guard      (first failure → last request reaching the canary): median {} ms, max {} ms (target ≤ 1000 ms)",
        median(&guard),
        max(&guard)
    );
    println!(
        "controller (first failure → RolledBack, 0% canary live):       median {} ms, max {} ms (target ≤ 10000 ms)",
        median(&controller),
        max(&controller)
    );
    if max(&guard) > 1000 || max(&controller) > 10_000 {
        bail!("a target was missed");
    }
    Ok(())
}
