//! `make bench-decisions`: seeded simulations of thousands of rollouts with a known truth,
//! decided by Fledge's sequential policy, a Flagger-style threshold policy and a repeated
//! fixed-sample test — the first two through the controller's own state machine.
//!
//! Usage: `fledge-bench-decisions [RUNS_PER_CELL] [SEED]` (defaults 1000 and 42).

#![forbid(unsafe_code)]

use fledge_rollout_sim::{
    flagger_policy, fledge_policy, simulate, Policy, RepeatedZTest, Summary, TrafficModel,
    HORIZON_MINUTES, INTERVAL_SECONDS, MINUTES_PER_STEP, SWING_PERIOD_MINUTES, WEIGHTS,
};
use std::process::ExitCode;
use std::time::Instant;

struct World {
    name: &'static str,
    traffic: &'static str,
    model: TrafficModel,
    healthy: bool,
}

fn worlds() -> Vec<World> {
    let mut out = Vec::new();
    for (traffic, rpm) in [("low 100/min", 100.0), ("high 5000/min", 5000.0)] {
        let base = TrafficModel::healthy(rpm);
        out.push(World {
            name: "healthy",
            traffic,
            model: base,
            healthy: true,
        });
        out.push(World {
            name: "errors 2x",
            traffic,
            model: TrafficModel {
                error_ratio: 2.0,
                ..base
            },
            healthy: false,
        });
        out.push(World {
            name: "errors 5x",
            traffic,
            model: TrafficModel {
                error_ratio: 5.0,
                ..base
            },
            healthy: false,
        });
        out.push(World {
            name: "latency 1.2x",
            traffic,
            model: TrafficModel {
                latency_factor: 1.2,
                ..base
            },
            healthy: false,
        });
    }
    out
}

fn pct(part: usize, whole: usize) -> f64 {
    100.0 * part as f64 / whole.max(1) as f64
}

fn or_never<T: ToString>(v: Option<T>) -> String {
    v.map_or("never (<50%)".to_string(), |v| v.to_string())
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let runs: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1000);
    let seed: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(42);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let fledge = fledge_policy();
    let flagger = flagger_policy();
    let ztest = RepeatedZTest { critical_z: 1.645 };
    let policies: [&dyn Policy; 3] = [&fledge, &flagger, &ztest];

    println!("Fledge decision benchmark — {runs} seeded rollouts per cell, seed {seed}, {threads} threads");
    println!(
        "World: {INTERVAL_SECONDS}-second analysis intervals; weights {:?}% held {MINUTES_PER_STEP} min each, then promotion; horizon {HORIZON_MINUTES} min;",
        WEIGHTS
    );
    println!(
        "stable error rate 1% and traffic both swinging ±50% over a compressed {SWING_PERIOD_MINUTES}-min 'day'; latency log-normal (median 100 ms, σ 0.6) in Envoy's default buckets."
    );
    println!("Policies: fledge = compareWithStable {{}} (defaults: false-rollback rate 0.03 over the whole rollout, tolerance 1.0×); flagger-style = success ≥ 99% and p99 ≤ 500 ms per interval, threshold 5; repeated z-test = one-sided 5% test on all data so far, every interval.\n");
    println!(
        "{:<13} {:<14} {:<25} {:>10} {:>10} {:>9} {:>18} {:>14}",
        "world",
        "traffic",
        "policy",
        "rollbacks",
        "promoted",
        "latency",
        "median canary req",
        "median minutes"
    );
    let started = Instant::now();
    let mut failures = Vec::new();
    let mut check = |ok: bool, what: String| {
        println!("  target {}: {what}", if ok { "met" } else { "MISSED" });
        if !ok {
            failures.push(what);
        }
    };
    let mut fledge_latency_false_alarms: Vec<(String, f64)> = Vec::new();
    for world in worlds() {
        let mut fledge_summary: Option<Summary> = None;
        for policy in policies {
            let s = simulate(policy, world.model, runs, seed, threads);
            println!(
                "{:<13} {:<14} {:<25} {:>9.1}% {:>9.1}% {:>8.1}% {:>18} {:>14}",
                world.name,
                world.traffic,
                policy.name(),
                pct(s.rolled_back, s.runs),
                pct(s.promoted, s.runs),
                pct(s.latency_rollbacks, s.runs),
                or_never(s.median_requests_to_rollback),
                or_never(s.median_minutes_to_rollback.map(|m| format!("{m:.1}"))),
            );
            if std::ptr::eq(
                policy as *const dyn Policy as *const u8,
                &fledge as *const _ as *const u8,
            ) {
                fledge_summary = Some(s);
            }
        }
        let Some(s) = fledge_summary else { continue };
        if world.healthy {
            check(
                pct(s.rolled_back, s.runs) <= 2.0,
                format!(
                    "fledge false rollbacks ≤ 2% ({}, {:.1}%)",
                    world.traffic,
                    pct(s.rolled_back, s.runs)
                ),
            );
            fledge_latency_false_alarms
                .push((world.traffic.to_string(), pct(s.latency_rollbacks, s.runs)));
        } else {
            let limit = match world.name {
                "errors 2x" => 1500,
                "errors 5x" => 300,
                _ => 500,
            };
            check(
                s.median_requests_to_rollback.is_some_and(|m| m <= limit),
                format!(
                    "fledge catches {} at a median ≤ {limit} canary requests ({}, {})",
                    world.name,
                    world.traffic,
                    or_never(s.median_requests_to_rollback)
                ),
            );
        }
    }
    for (traffic, rate) in fledge_latency_false_alarms {
        check(
            rate <= 2.0,
            format!("fledge latency false alarms ≤ 2% ({traffic}, {rate:.1}%)"),
        );
    }
    println!(
        "\n{} simulated rollouts in {:.1} s",
        runs * 8 * 3,
        started.elapsed().as_secs_f64()
    );
    if failures.is_empty() {
        println!("all targets met");
        ExitCode::SUCCESS
    } else {
        println!("{} target(s) missed", failures.len());
        ExitCode::from(1)
    }
}
