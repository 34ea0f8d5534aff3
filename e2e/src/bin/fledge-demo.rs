//! `fledge-demo` — a live, local canary release on real processes (`make demo`).
//!
//! ```text
//!  load 100 rps ──▶ Envoy :listener ──[fledge filter]──▶ app_stable ──▶ backend (v1, later v2)
//!                     │  admin /stats/prometheus         app_canary ──▶ backend (v2, later v3)
//!                     ▼                 ▲ rds/routes.json (rewritten by fledge)
//!                fledge run ────────────┘  status API /api/v1/canaries
//! ```
//!
//! One `fledge run`, and one dashboard URL, for the whole demo:
//! Act 1: v1 is stable, v2 is a healthy canary (`fledge.dev/rollout: v2`); `fledge run` moves
//! traffic 20 → 40 → pause → 60 → 80 and promotes; the demo checks that ≥ 99 % of later
//! requests reach v2.
//! Act 2: the operator finalizes (stable backend restarted as v2, weights reset to 100/0, which
//! `fledge run` leaves alone after a finished rollout), a v3 canary answers 20 % of requests
//! with 500, and the spec file names the new release (`fledge.dev/rollout: v3`); the same
//! `fledge run` starts a new rollout and must roll it back, after which no request may reach v3.
//! Finally the demo checks that the dashboard's API, at the URL printed at the start, tells
//! both stories.
//!
//! Every process runs in its own process group and is stopped on exit, on error and on Ctrl-C.
//! The exit code is non-zero when an expectation fails.

#![forbid(unsafe_code)]

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use fledge_e2e::controller::{CanaryManifest, Controller, PHASE_PROMOTED, PHASE_ROLLED_BACK};
use fledge_e2e::process::kill_all_process_groups;
use fledge_e2e::{
    paths, wait_until, Backend, BackendOptions, Envoy, EnvoyOptions, LoadGen, LoadOptions,
    LoadReport, RouteWeights, WasmFilter,
};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// Canary name, and the `fledge_service` label value the filter writes.
const APP: &str = "app";
/// How the filter maps Envoy clusters to service and subset labels.
const PLUGIN_CONFIG: &str = r#"{"clusters":{"app_stable":{"service":"app","subset":"stable"},"app_canary":{"service":"app","subset":"canary"}}}"#;

#[derive(Debug, Parser)]
#[command(
    name = "fledge-demo",
    about = "A live local canary release: promote a healthy v2, roll back a failing v3"
)]
struct Args {
    /// Where configuration, state and logs go (default: <target>/fledge-demo/run-<time>).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Client load on the gateway, in requests per second.
    #[arg(long, default_value_t = 100)]
    rps: u32,
    /// Upper bound for each rollout to finish, in seconds.
    #[arg(long, default_value_t = 150)]
    rollout_timeout_secs: u64,
    /// Seconds between status lines.
    #[arg(long, default_value_t = 2)]
    status_every_secs: u64,
    /// Keep everything running this many seconds at the end (to look at the API), then clean up.
    #[arg(long, default_value_t = 0)]
    hold_secs: u64,
}

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none(),
        )
        .init();
    let args = Args::parse();
    if let Err(error) = ctrlc::set_handler(|| {
        eprintln!("\ninterrupted: stopping every process the demo started");
        kill_all_process_groups();
        std::process::exit(130);
    }) {
        eprintln!("warning: cannot install the Ctrl-C handler ({error}); processes are still stopped on normal exit");
    }
    match run(&args) {
        Ok(()) => {
            println!("\n✔ demo passed: v2 promoted, v3 rolled back; every process stopped.");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("\n✘ demo FAILED: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn banner(text: &str) {
    println!("\n━━ {text}");
}

fn note(text: &str) {
    println!("   {text}");
}

/// Everything the rollouts act on, and the one controller.
struct Stage {
    controller: Controller,
    envoy: Envoy,
    load: LoadGen,
    rollout_timeout: Duration,
    status_every: Duration,
}

fn run(args: &Args) -> Result<()> {
    let work_dir = match &args.work_dir {
        Some(dir) => dir.clone(),
        None => {
            let stamp = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            paths::target_dir()
                .join("fledge-demo")
                .join(format!("run-{stamp}"))
        }
    };
    std::fs::create_dir_all(&work_dir)
        .with_context(|| format!("creating {}", work_dir.display()))?;

    banner("Fledge demo: an automated canary release on a real Envoy");
    let envoy_binary = paths::envoy_binary()?;
    let wasm = paths::filter_wasm()?;
    let fledge = paths::fledge_binary()?;
    note(&format!("envoy:  {}", envoy_binary.display()));
    note(&format!("filter: {}", wasm.display()));
    note(&format!("fledge: {}", fledge.display()));
    note(&format!("files and logs: {}", work_dir.display()));

    banner("Starting v1 (stable) and v2 (canary) backends, Envoy with the fledge filter, and load");
    let backend_options = |port: Option<u16>, error_rate: f64| BackendOptions {
        port,
        error_rate,
        latency_ms: 5,
        slow_fraction: 0.01,
        slow_ms: 40,
        seed: 7,
        work_dir: Some(work_dir.join("backends")),
        ..BackendOptions::default()
    };
    let stable = Backend::start("v1", backend_options(None, 0.0))?;
    let canary = Backend::start("v2", backend_options(None, 0.0))?;
    let envoy = Envoy::start(
        EnvoyOptions::new(stable.port(), canary.port())
            .with_filter(WasmFilter {
                wasm,
                plugin_config: PLUGIN_CONFIG.to_string(),
            })
            .in_dir(&work_dir.join("envoy")),
    )?;
    note(&format!(
        "backends: stable v1 on :{}, canary v2 on :{}",
        stable.port(),
        canary.port()
    ));
    note(&format!(
        "envoy: listener {}  admin {}  routes {}",
        envoy.listener_url(),
        envoy.admin_url(),
        envoy.rds_path().display()
    ));
    let load_bound = Duration::from_secs(2 * args.rollout_timeout_secs + 120 + args.hold_secs);
    let mut load_options = LoadOptions::new(args.rps, load_bound);
    load_options.workers = 8;
    let load = LoadGen::start(&envoy.listener_url(), load_options)?;
    note(&format!(
        "load: {} rps of GET {} (stops by itself after {}s at most)",
        args.rps,
        envoy.listener_url(),
        load_bound.as_secs()
    ));
    std::thread::sleep(Duration::from_secs(2));
    let warmup = load.snapshot();
    note(&format!("warm-up: {}", warmup.summary()));
    ensure!(
        warmup.version_share("v1") > 0.99,
        "before any rollout all traffic should reach v1: {}",
        warmup.summary()
    );

    let manifest_path = work_dir.join("canary.yaml");
    let manifest = CanaryManifest::new(APP, APP, &envoy.admin_url(), envoy.rds_path());
    manifest.clone().with_rollout("v2").write(&manifest_path)?;
    let controller = start_controller(&work_dir, &manifest_path)?;
    // Its output, as it comes, for the whole demo.
    let _follower = controller.follow_log("   │ fledge: ");
    let mut stage = Stage {
        controller,
        envoy,
        load,
        rollout_timeout: Duration::from_secs(args.rollout_timeout_secs),
        status_every: Duration::from_secs(args.status_every_secs.max(1)),
    };
    let dashboard = format!("{}/", stage.controller.base_url());

    // ── Act 1: a healthy canary is promoted.
    banner("Act 1: rolling out v2 (healthy). Expect: Promoted");
    let first = stage.rollout("rollout-1", PHASE_PROMOTED)?;
    let (weights, _) = stage.envoy.live_route_weights()?;
    note(&format!("envoy now serves: {weights}"));
    std::thread::sleep(Duration::from_millis(500));
    let after = stage.measure(Duration::from_secs(3));
    note(&format!("last 3 s after promotion: {}", after.summary()));
    ensure!(
        after.responses() >= u64::from(args.rps),
        "too few responses after promotion: {}",
        after.summary()
    );
    ensure!(
        after.version_share("v2") >= 0.99,
        "after promotion ≥ 99% of requests should reach v2: {}",
        after.summary()
    );
    note("✔ ≥ 99% of new requests reach v2");

    // ── The operator finalizes: stable becomes v2, all traffic back on stable.
    banner("The operator finalizes: stable backend restarted as v2, route reset to 100/0");
    let stable_port = stable.port();
    stable.stop();
    let stable = start_with_retry("v2", || backend_options(Some(stable_port), 0.0))?;
    let reload = stage.envoy.apply_route_weights(RouteWeights::ALL_STABLE)?;
    note(&format!(
        "stable :{} now runs {}; weights 100/0 live after {} ms",
        stable.port(),
        stable.version(),
        reload.as_millis()
    ));
    // Longer than one analysis interval: fledge's loop runs at least once meanwhile.
    let settled = stage.measure(Duration::from_secs(4));
    note(&format!("last 4 s: {}", settled.summary()));
    ensure!(
        settled.version_share("v2") >= 0.99,
        "after finalizing, traffic should be on stable v2: {}",
        settled.summary()
    );
    let (weights, _) = stage.envoy.live_route_weights()?;
    ensure!(
        weights == RouteWeights::ALL_STABLE,
        "fledge run should leave the route to the operator after a finished rollout, but envoy serves {weights}"
    );
    note("✔ fledge leaves the route alone after a finished rollout");

    banner("Replacing the canary with v3, which answers 20% of requests with 500");
    let canary_port = canary.port();
    canary.stop();
    let canary = start_with_retry("v3", || backend_options(Some(canary_port), 0.2))?;
    note(&format!(
        "canary :{} now runs {}",
        canary.port(),
        canary.version()
    ));

    // ── Act 2: a failing canary is rolled back.
    banner("Act 2: rolling out v3 (20% errors). Expect: RolledBack");
    manifest.with_rollout("v3").write(&manifest_path)?;
    note(&format!(
        "{} now says fledge.dev/rollout: v3; the same fledge run starts a new rollout",
        display(&manifest_path)
    ));
    stage.wait_for_new_rollout()?;
    let before_second = stage.load.snapshot();
    let second = stage.rollout("rollout-2", PHASE_ROLLED_BACK)?;
    let during = stage.load.snapshot().since(&before_second);
    let (weights, _) = stage.envoy.live_route_weights()?;
    note(&format!("envoy now serves: {weights}"));
    std::thread::sleep(Duration::from_millis(500));
    let served_by_v3_before = canary.served()?;
    let after = stage.measure(Duration::from_secs(3));
    let served_by_v3_after = canary.served()?;
    note(&format!("last 3 s after rollback: {}", after.summary()));
    ensure!(
        after.responses() >= u64::from(args.rps),
        "too few responses after rollback: {}",
        after.summary()
    );
    ensure!(
        after.version_count("v3") == 0 && served_by_v3_after == served_by_v3_before,
        "after rollback no request may reach v3: client saw {} from v3, backend served {} more",
        after.version_count("v3"),
        served_by_v3_after - served_by_v3_before
    );
    note("✔ no request reaches v3");
    note(&format!(
        "blast radius of v3 during its rollout ({:.0} s): {} of {} client requests reached v3, {} got a 5xx",
        during.elapsed.as_secs_f64(),
        during.version_count("v3"),
        during.responses(),
        during.server_errors()
    ));

    stage.check_the_dashboard_tells_both_stories(&dashboard)?;

    banner("Summary");
    note(&format!(
        "v2 promoted in {:.0} s; v3 rolled back in {:.0} s",
        first.took.as_secs_f64(),
        second.took.as_secs_f64()
    ));
    note(&format!(
        "load overall: {}",
        stage.load.snapshot().summary()
    ));
    note(&format!("files and logs: {}", work_dir.display()));
    if args.hold_secs > 0 {
        note(&format!(
            "holding for {} s: dashboard {dashboard} (Ctrl-C to stop early)",
            args.hold_secs
        ));
        std::thread::sleep(Duration::from_secs(args.hold_secs));
    }
    stage.controller.stop();
    drop(canary);
    drop(stable);
    Ok(())
}

/// A finished rollout: how long it took.
struct Rollout {
    took: Duration,
}

/// Start the one `fledge run` of the demo and print where to watch it.
fn start_controller(work_dir: &Path, manifest_path: &Path) -> Result<Controller> {
    let state_dir = work_dir.join("state");
    let log_path = work_dir.join("fledge.log");
    note(&format!(
        "fledge run -f {} --state-dir {}",
        display(manifest_path),
        display(&state_dir)
    ));
    // Its progress lines are the story; its info-level logs would repeat them.
    let controller_log_level = std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into());
    let controller = Controller::start_with_env(
        manifest_path,
        &state_dir,
        &log_path,
        &[("RUST_LOG", controller_log_level.as_str())],
    )?;
    note(&format!("status API: {}", controller.api_url()));
    let dashboard = format!("{}/", controller.base_url());
    if matches!(
        fledge_e2e::http::get(&dashboard, Duration::from_secs(2)),
        Ok((200, _))
    ) {
        note(&format!(
            "dashboard:  {dashboard}   (open it now: it follows the whole demo; decision simulator: {dashboard}simulator)"
        ));
    }
    note(&format!(
        "watch it:   fledge status {APP} --watch --server {}",
        controller.base_url()
    ));
    Ok(controller)
}

impl Stage {
    /// Counts of what the clients got during the next `window`.
    fn measure(&self, window: Duration) -> LoadReport {
        let start = self.load.snapshot();
        std::thread::sleep(window);
        self.load.snapshot().since(&start)
    }

    /// After the spec file names a new release: wait (bounded) until `fledge run` has started
    /// its new rollout.
    fn wait_for_new_rollout(&mut self) -> Result<()> {
        let controller = &mut self.controller;
        wait_until(
            "fledge run to start the new rollout",
            Duration::from_secs(20),
            || {
                let view = controller.canary(APP)?;
                Ok((!view.is_terminal()).then_some(()))
            },
        )
        .with_context(|| format!("fledge log tail:\n{}", self.controller.log_tail(20)))
    }

    /// The dashboard's API, at the URL printed at the start, holds both rollouts: the
    /// decision log shows v2 promoted, then the v3 rollout started and rolled back.
    fn check_the_dashboard_tells_both_stories(&self, dashboard: &str) -> Result<()> {
        let (code, _) = fledge_e2e::http::get(dashboard, Duration::from_secs(3))?;
        ensure!(code == 200, "the dashboard {dashboard} answered {code}");
        let url = format!("{}/{APP}", self.controller.api_url());
        let canary = fledge_e2e::http::get_json(&url, Duration::from_secs(3))?;
        let history = canary["history"].as_array().cloned().unwrap_or_default();
        let position = |what: &dyn Fn(&serde_json::Value) -> bool| history.iter().position(what);
        let promoted = position(&|t| t["phase"] == PHASE_PROMOTED);
        let v3_started = position(&|t| {
            t["reason"]
                .as_str()
                .is_some_and(|r| r.contains("new rollout of v3"))
        });
        let rolled_back = position(&|t| t["phase"] == PHASE_ROLLED_BACK);
        match (promoted, v3_started, rolled_back) {
            (Some(p), Some(s), Some(r)) if p < s && s < r => {}
            _ => bail!(
                "the dashboard's decision log should show v2 promoted, then v3 started and rolled back: {}",
                serde_json::Value::Array(history)
            ),
        }
        note(&format!(
            "✔ one dashboard for the whole demo: {dashboard} shows v2 promoted, then v3 rolled back"
        ));
        Ok(())
    }

    /// Print the controller's output and a status line every few seconds, and wait (bounded)
    /// until the canary reaches a final phase, which must be `expected`.
    fn rollout(&mut self, label: &str, expected: &str) -> Result<Rollout> {
        let started = Instant::now();
        let mut previous = self.load.snapshot();
        let mut shown: Option<(String, Option<u64>)> = None;
        let outcome = loop {
            std::thread::sleep(self.status_every);
            let view = self.controller.canary(APP).with_context(|| {
                format!(
                    "reading canary status; fledge log tail:\n{}",
                    self.controller.log_tail(20)
                )
            })?;
            let now = self.load.snapshot();
            let window = now.since(&previous);
            previous = now;
            let live = self
                .envoy
                .live_route_weights()
                .map(|(w, _)| format!("{}/{}", w.stable, w.canary))
                .unwrap_or_else(|_| "?".into());
            println!(
                "   [{:>3}s] {:<12} weight {:>3}%  step {:<4} envoy {:<7} | last {:.0}s: {} | {}",
                started.elapsed().as_secs(),
                view.phase,
                view.canary_weight
                    .map(|w| w.to_string())
                    .unwrap_or_else(|| "?".into()),
                view.step_label(),
                live,
                window.elapsed.as_secs_f64(),
                window.summary(),
                view.message
            );
            // The operator's view (`fledge status`) each time the phase or weight changes.
            let now_showing = (view.phase.clone(), view.canary_weight);
            if shown.as_ref() != Some(&now_showing) {
                shown = Some(now_showing);
                print_cli_view(&self.controller.base_url());
            }
            if view.is_terminal() {
                break view;
            }
            if started.elapsed() > self.rollout_timeout {
                bail!(
                    "{label}: no final phase after {:?} (phase {}); fledge log tail:\n{}",
                    self.rollout_timeout,
                    view.phase,
                    self.controller.log_tail(30)
                );
            }
        };
        let took = started.elapsed();
        if outcome.phase != expected {
            bail!(
                "{label}: expected {expected}, got {} ({}); fledge log tail:\n{}",
                outcome.phase,
                outcome.message,
                self.controller.log_tail(30)
            );
        }
        note(&format!(
            "✔ {label}: {} after {:.0} s",
            outcome.phase,
            took.as_secs_f64()
        ));
        Ok(Rollout { took })
    }
}

/// Print `fledge status app` (the operator's CLI view), framed, under the status lines.
fn print_cli_view(server: &str) {
    let Ok(fledge) = paths::fledge_binary() else {
        return;
    };
    let output = std::process::Command::new(fledge)
        .args(["status", APP, "--server", server])
        .env("NO_COLOR", "1")
        .output();
    if let Ok(output) = output {
        println!("   ┏━ $ fledge status {APP}");
        for line in String::from_utf8_lossy(&output.stdout).lines() {
            println!("   ┃ {line}");
        }
        println!("   ┗━");
    }
}

/// Restart a backend on a port that was just released (a retry covers a slow release).
fn start_with_retry(version: &str, options: impl Fn() -> BackendOptions) -> Result<Backend> {
    let mut last_error = None;
    for _ in 0..3 {
        match Backend::start(version, options()) {
            Ok(backend) => return Ok(backend),
            Err(error) => {
                last_error = Some(error);
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }
    match last_error {
        Some(error) => Err(error.context(format!("starting backend {version}"))),
        None => bail!("starting backend {version}"),
    }
}

fn display(path: &Path) -> String {
    path.display().to_string()
}
