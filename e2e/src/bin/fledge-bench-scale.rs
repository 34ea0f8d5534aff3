//! `fledge-bench-scale` (`make bench-scale`): one `fledge controller` process with 1,000 and
//! then 10,000 Canaries mid-rollout, against the fake API server over HTTP, fake gateways whose
//! `/stats/prometheus` pages hold every service's fledge series, and a fake Prometheus.
//!
//! ```text
//! this process: FakeApiServer (HTTP) · FakeGateway × G · FakePrometheus · observer (watch)
//!      ▲ list/watch, status, VirtualServices, Events, Lease      ▲ scrapes / queries
//!      └──────────────────── fledge controller (the process measured) ──┘
//! ```
//!
//! Per size it warms up, then measures a window of `--intervals` analysis intervals:
//! - `rss_mib`: the controller's resident memory at the end of the window (`/proc/PID/status`);
//! - `cpu_ms_per_canary_interval`: utime + stime (`/proc/PID/stat`) over the window, divided by
//!   canaries × intervals in the window;
//! - `lag_p99_ms`: from an analysis being due (the canary's schedule) to its decision being
//!   recorded — the controller's `fledge_analysis_lag_seconds` histogram when it has one, else
//!   seen from here: a status write carrying a new `lastTickAt`, compared with the previous
//!   `lastTickAt` plus the interval;
//! - `scrapes_per_interval`: `/stats/prometheus` traffic scrapes per gateway per tick (scrapes
//!   grouped into ticks by their instants: one more than half an interval after the previous
//!   starts a tick), so a window that holds 11 ticks of 10 intervals still reads 1.00;
//! - `api_requests_per_s`: every request the API server served during the window.
//!
//! The bench process' own CPU is printed next to the controller's, to show the measuring side
//! is not the bottleneck.
//!
//! Besides the sizes (in this order): standalone `fledge run` with `--standalone` canaries (one
//! RDS file each, verified through a fake Envoy admin); at the largest size, after its window, a
//! restart (SIGKILL, the same identity again) and a leader handoff (a standby takes over from a
//! leader stopped gracefully), each measured from the fault to every Canary's first judged
//! analysis under the new leader (its own `lastAnalysis.at`, read from the status API) and its
//! step there against the step persisted at the fault, and the steps taken over the whole run
//! (from a watch: a step entered twice is one seen again with another start); then the memory
//! part: `--memory-canaries` at `--memory-interval`, RSS after 10 and after 100 intervals, each
//! the median (and the peak) of samples every 100 ms over the 2 intervals up to that point: RSS
//! swings by tens of MiB within each tick, so a single instant would mostly say where in the
//! tick it fell.
//!
//! It ends with one line per size:
//! `scale: canaries=N rss_mib=… cpu_ms_per_canary_interval=… lag_p99_ms=… scrapes_per_interval=… api_requests_per_s=…`
//! and `scale (fledge run): …`, `faults: …` and `memory: …` lines.

use anyhow::{bail, Context, Result};
use chrono::{DateTime, Utc};
use clap::Parser;
use fledge_controller::k8s::crd::{CanaryResource, CanaryResourceStatus, Readiness};
use fledge_controller::router::istio::{plan_patch, IstioSettings};
use fledge_controller::router::DesiredRoutes;
use fledge_e2e::kubernetes::controller_command;
use fledge_e2e::process::{free_port, wait_until, Proc, ScratchDir};
use fledge_e2e::scale::{
    load_average, quantile, reads_per_tick, FakeGateway, FakePrometheus, FakeRdsAdmin, Fleet,
    Member, ProcSample, ReadsInTicks,
};
use fledge_e2e::{http, paths, stats};
use fledge_testkit::fake_api::{apply_json_patch, FakeApiServer};
use futures::StreamExt;
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Parser)]
#[command(
    name = "fledge-bench-scale",
    about = "One fledge controller with thousands of Canaries: memory, CPU, decision lag, scrapes and API load"
)]
struct Args {
    /// Fleet sizes for `fledge controller`, in order.
    #[arg(long, value_delimiter = ',', default_values_t = [1000, 10000])]
    sizes: Vec<usize>,
    /// Analysis interval of every Canary, seconds.
    #[arg(long, default_value_t = 10)]
    interval: u64,
    /// Analysis intervals measured per size (after the warm-up).
    #[arg(long, default_value_t = 10)]
    intervals: u32,
    /// Services per fake gateway (the Envoy-admin canaries are spread over gateways of this size).
    #[arg(long, default_value_t = 1000)]
    services_per_gateway: usize,
    /// Length of each pause step, seconds (pauses end at spread times, so some canaries step).
    #[arg(long, default_value_t = 1800)]
    pause: u64,
    /// Where logs and files go (default: a temporary directory, removed at the end).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Canaries of the standalone `fledge run` part (0: skip it).
    #[arg(long, default_value_t = 1000)]
    standalone: usize,
    /// Skip the restart and leader-handoff figures (taken at the largest size).
    #[arg(long)]
    no_faults: bool,
    /// Canaries of the memory part: RSS after 10 and after 100 intervals (0: skip it).
    #[arg(long, default_value_t = 1000)]
    memory_canaries: usize,
    /// Analysis interval of the memory part, seconds (100 intervals at 2 s: 200 s).
    #[arg(long, default_value_t = 2)]
    memory_interval: u64,
}

/// What one size measured.
struct Summary {
    canaries: usize,
    rss_mib: f64,
    cpu_ms_per_canary_interval: f64,
    lag_p99_ms: f64,
    scrapes_per_interval: f64,
    api_requests_per_s: f64,
}

impl Summary {
    fn line(&self) -> String {
        format!(
            "scale: canaries={} rss_mib={:.0} cpu_ms_per_canary_interval={:.3} lag_p99_ms={:.0} scrapes_per_interval={:.2} api_requests_per_s={:.1}",
            self.canaries,
            self.rss_mib,
            self.cpu_ms_per_canary_interval,
            self.lag_p99_ms,
            self.scrapes_per_interval,
            self.api_requests_per_s
        )
    }

    /// Standalone `fledge run` has no API server: the same figures without that one.
    fn standalone_line(&self) -> String {
        format!(
            "scale (fledge run): canaries={} rss_mib={:.0} cpu_ms_per_canary_interval={:.3} lag_p99_ms={:.0} scrapes_per_interval={:.2}",
            self.canaries,
            self.rss_mib,
            self.cpu_ms_per_canary_interval,
            self.lag_p99_ms,
            self.scrapes_per_interval,
        )
    }
}

/// A new leader taking over mid-rollout: how soon each Canary was judged again, at which step.
struct Resumption {
    canaries: usize,
    /// Canaries judged (a new `lastAnalysis`) within 2 intervals of the fault.
    within_two: usize,
    /// Canaries judged at all before the bench stopped looking (4 intervals).
    resumed: usize,
    /// Seconds from the fault to each Canary's first judged analysis: p99 and the slowest.
    p99_s: f64,
    slowest_s: f64,
    /// Canaries judged at a step other than the one persisted at the fault (or the next one,
    /// when its pause ended meanwhile).
    wrong_step: usize,
}

impl Resumption {
    fn figures(&self, interval: Duration) -> String {
        let i = interval.as_secs_f64();
        format!(
            "resumed={}/{} within_2_intervals={} p99_intervals={:.2} slowest_intervals={:.2} at_another_step={}",
            self.resumed,
            self.canaries,
            self.within_two,
            self.p99_s / i,
            self.slowest_s / i,
            self.wrong_step
        )
    }
}

/// The fault figures of the largest size.
struct Faults {
    canaries: usize,
    interval: Duration,
    restart: Resumption,
    handoff: Resumption,
    steps_taken: u64,
    taken_twice: usize,
}

impl Faults {
    fn lines(&self) -> String {
        format!(
            "faults: canaries={} restart {}\nfaults: canaries={} handoff {}\nfaults: canaries={} steps_taken={} steps_taken_twice={}",
            self.canaries,
            self.restart.figures(self.interval),
            self.canaries,
            self.handoff.figures(self.interval),
            self.canaries,
            self.steps_taken,
            self.taken_twice
        )
    }
}

/// Memory of one controller after 10 and after 100 intervals.
struct MemoryGrowth {
    canaries: usize,
    interval: Duration,
    after_10: RssWindow,
    after_100: RssWindow,
}

impl MemoryGrowth {
    fn line(&self) -> String {
        let change = |at_10: f64, at_100: f64| (at_100 / at_10 - 1.0) * 100.0;
        format!(
            "memory: canaries={} interval_s={} rss_mib_after_10_intervals={:.0} rss_mib_after_100_intervals={:.0} change_pct={:+.1} peak_mib={:.0}/{:.0} peak_change_pct={:+.1}",
            self.canaries,
            self.interval.as_secs(),
            self.after_10.median_mib,
            self.after_100.median_mib,
            change(self.after_10.median_mib, self.after_100.median_mib),
            self.after_10.peak_mib,
            self.after_100.peak_mib,
            change(self.after_10.peak_mib, self.after_100.peak_mib),
        )
    }
}

/// RSS over the last [`RSS_WINDOW_INTERVALS`] intervals up to a point: within each tick RSS
/// swings by tens of MiB (a gateway page indexed, every Canary's reconcile), so one instant
/// says more about where in the tick it fell than about the memory held.
struct RssWindow {
    median_mib: f64,
    peak_mib: f64,
    samples: usize,
}

/// Intervals sampled for one memory reading, and how often.
const RSS_WINDOW_INTERVALS: u32 = 2;
const RSS_SAMPLE_EVERY: Duration = Duration::from_millis(100);

impl RssWindow {
    fn of(samples_mib: &[f64]) -> Result<Self> {
        if samples_mib.is_empty() {
            bail!("no RSS sample in the window");
        }
        Ok(RssWindow {
            median_mib: stats::median(samples_mib),
            peak_mib: stats::max(samples_mib),
            samples: samples_mib.len(),
        })
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let scratch = ScratchDir::at_or_temp(args.dir.as_deref(), "fledge-bench-scale")?;
    let started = Instant::now();
    let mut standalone = None;
    if args.standalone > 0 {
        let dir = scratch.path().join(format!("run-{}", args.standalone));
        let summary = runtime.block_on(standalone_run(&args, args.standalone, &dir))?;
        println!("{}", summary.standalone_line());
        standalone = Some(summary);
    }
    let mut summaries = Vec::new();
    let mut faults = None;
    let largest = args.sizes.iter().copied().max().unwrap_or(0);
    for &size in &args.sizes {
        let dir = scratch.path().join(format!("controller-{size}"));
        let with_faults = !args.no_faults && size == largest && faults.is_none();
        let (summary, fault_figures) =
            runtime.block_on(kubernetes_run(&args, size, &dir, with_faults))?;
        println!("{}", summary.line());
        if let Some(figures) = &fault_figures {
            println!("{}", figures.lines());
        }
        summaries.push(summary);
        faults = faults.or(fault_figures);
    }
    let mut memory = None;
    if args.memory_canaries > 0 {
        let dir = scratch
            .path()
            .join(format!("memory-{}", args.memory_canaries));
        let growth = runtime.block_on(memory_run(&args, &dir))?;
        println!("{}", growth.line());
        memory = Some(growth);
    }
    println!();
    println!(
        "== fledge-bench-scale done in {:.0}s; load average {}",
        started.elapsed().as_secs_f64(),
        load_average()
    );
    if let Some(summary) = &standalone {
        println!("{}", summary.standalone_line());
    }
    for summary in &summaries {
        println!("{}", summary.line());
    }
    if let Some(faults) = &faults {
        println!("{}", faults.lines());
    }
    if let Some(memory) = &memory {
        println!("{}", memory.line());
    }
    Ok(())
}

/// Everything served from this process for one run.
struct Cluster {
    server: FakeApiServer,
    kubeconfig: PathBuf,
    gateways: Vec<FakeGateway>,
    prometheus: FakePrometheus,
    shutdown: tokio::sync::watch::Sender<bool>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.shutdown.send_replace(true);
    }
}

async fn start_cluster(fleet: &Fleet, dir: &Path) -> Result<Cluster> {
    std::fs::create_dir_all(dir)?;
    let (shutdown, stopped) = tokio::sync::watch::channel(false);
    let started = Instant::now();
    let mut gateways = Vec::new();
    for g in 0..fleet.gateways {
        gateways.push(FakeGateway::start(&fleet.on_gateway(g), started, stopped.clone()).await?);
    }
    let prometheus =
        FakePrometheus::start(&fleet.on_prometheus(), started, stopped.clone()).await?;
    let gateway_urls: Vec<String> = gateways.iter().map(|g| g.url.clone()).collect();

    let server = FakeApiServer::new()
        .with_history_limit(50_000)
        .with_request_log_limit(0);
    let now = Utc::now();
    for member in &fleet.members {
        seed(&server, fleet, member, &gateway_urls, &prometheus.url, now)?;
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = format!("http://{}", listener.local_addr()?);
    let mut stop = stopped.clone();
    tokio::spawn(server.clone().serve_http(listener, async move {
        let _ = stop.wait_for(|s| *s).await;
    }));
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(&kubeconfig, kubeconfig_text(&address))?;
    Ok(Cluster {
        server,
        kubeconfig,
        gateways,
        prometheus,
        shutdown,
    })
}

fn kubeconfig_text(server: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n  - name: fake\n    cluster: {{server: \"{server}\"}}\n\
         users:\n  - name: fake\n    user: {{token: \"fledge\"}}\ncontexts:\n  - name: fake\n    \
         context: {{cluster: fake, user: fake, namespace: default}}\ncurrent-context: fake\n"
    )
}

/// The VirtualService (at the seeded status' weight) and the Canary (with its finalizer and a
/// mid-rollout status) of `member`.
fn seed(
    server: &FakeApiServer,
    fleet: &Fleet,
    member: &Member,
    gateway_urls: &[String],
    prometheus_url: &str,
    now: DateTime<Utc>,
) -> Result<()> {
    let spec_json = fleet.spec(member, gateway_urls, prometheus_url);
    let spec: fledge_core::spec::CanarySpec =
        serde_json::from_value(spec_json.clone()).context("the fleet's spec")?;
    let rollout = fleet.mid_rollout_status(member, &spec, now);
    let weight = rollout.canary_weight;
    // As a controller that checkpoints every 5 minutes leaves it: written within the last 5.
    let checkpointed = chrono::Duration::milliseconds(
        ((member.index as f64 * 0.754_877_666).fract() * 300_000.0) as i64,
    );
    let last_tick_at = Some(now - checkpointed);
    let mut status = CanaryResourceStatus {
        rollout,
        observed_generation: Some(1),
        spec_fingerprint: Some("generation-1".to_string()),
        last_tick_at,
        ..CanaryResourceStatus::default()
    };
    status.set_conditions(&Readiness::ok(), Some(1), now);
    let mut virtual_service = json!({
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": member.name, "namespace": member.namespace},
        "spec": {
            "hosts": [format!("{}.example.com", member.name)],
            "gateways": ["istio-system/public"],
            "http": [{
                "name": "primary",
                "route": [
                    {"destination": {"host": member.name, "subset": "stable"}, "weight": 100 - weight},
                    {"destination": {"host": member.name, "subset": "canary"}, "weight": weight}
                ]
            }]
        }
    });
    // The routes as Fledge wrote them for this step (the guard route too, where there is one).
    let settings = IstioSettings::from_spec(&spec, &member.namespace)
        .context("the fleet's spec names an Istio route")?;
    let desired = DesiredRoutes::for_rollout(weight, true);
    if let Some(ops) =
        plan_patch(&virtual_service, &settings, &desired).map_err(|e| anyhow::anyhow!("{e}"))?
    {
        apply_json_patch(&mut virtual_service, &serde_json::Value::Array(ops))
            .map_err(anyhow::Error::msg)?;
    }
    server
        .try_create(virtual_service)
        .map_err(anyhow::Error::msg)?;
    server
        .try_create(json!({
            "apiVersion": "networking.istio.io/v1",
            "kind": "DestinationRule",
            "metadata": {"name": member.name, "namespace": member.namespace},
            "spec": {
                "host": member.name,
                "subsets": [
                    {"name": "stable", "labels": {"version": "v1"}},
                    {"name": "canary", "labels": {"version": "v2"}}
                ]
            }
        }))
        .map_err(anyhow::Error::msg)?;
    server
        .try_create(json!({
            "apiVersion": "fledge.dev/v1alpha1",
            "kind": "Canary",
            "metadata": {
                "name": member.name,
                "namespace": member.namespace,
                "finalizers": ["fledge.dev/traffic"],
            },
            "spec": spec_json,
        }))
        .map_err(anyhow::Error::msg)?;
    server
        .set_status(
            "fledge.dev",
            "canaries",
            &member.namespace,
            &member.name,
            serde_json::to_value(&status)?,
        )
        .map_err(anyhow::Error::msg)?;
    Ok(())
}

/// A running `fledge controller`.
struct ControllerProc {
    proc: Proc,
    port: u16,
}

impl ControllerProc {
    fn start(kubeconfig: &Path, identity: &str, log: &Path) -> Result<ControllerProc> {
        let port = free_port()?;
        let command = controller_command(kubeconfig, identity, port)?;
        let proc = Proc::spawn("fledge controller", command, log)?;
        Ok(ControllerProc { proc, port })
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn wait_leading(&mut self, timeout: Duration) -> Result<Duration> {
        let started = Instant::now();
        let url = self.url("/readyz");
        let proc = &mut self.proc;
        wait_until("fledge controller to lead", timeout, || {
            fledge_e2e::process::abort_if_exited(proc)?;
            Ok(http::get(&url, Duration::from_secs(2))
                .ok()
                .filter(|(code, body)| *code == 200 && body.trim() == "ok: leader")
                .map(|_| ()))
        })
        .with_context(|| format!("fledge controller log:\n{}", self.proc.log_tail(20)))?;
        Ok(started.elapsed())
    }

    /// The controller's `fledge_analysis_lag_seconds` histogram: (upper bound, cumulative count).
    fn lag_histogram(&self) -> Option<Vec<(f64, f64)>> {
        metrics_lag_histogram(&self.url("/metrics"))
    }
}

/// The `fledge_analysis_lag_seconds` buckets of a `/metrics` page.
fn parse_lag_histogram(text: &str) -> Option<Vec<(f64, f64)>> {
    let buckets: Vec<(f64, f64)> = text
        .lines()
        .filter(|l| l.starts_with("fledge_analysis_lag_seconds_bucket"))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            let value = l.rsplit(' ').next()?.parse().ok()?;
            Some((le, value))
        })
        .collect();
    (!buckets.is_empty()).then_some(buckets)
}

/// Status writes that carried a new `lastTickAt`, seen through a watch: (seen at, lag in ms);
/// and every step each Canary entered, to find a step taken twice.
#[derive(Default)]
struct Observed {
    last_tick: HashMap<String, DateTime<Utc>>,
    lags: Vec<(Instant, f64)>,
    /// Canary → step → when that step began, as first written.
    steps: HashMap<String, HashMap<usize, Option<DateTime<Utc>>>>,
    /// Steps entered (a status with a step not seen before for that Canary).
    steps_taken: u64,
    /// Canaries that entered a step again (the same step with another start).
    taken_twice: std::collections::BTreeSet<String>,
}

impl Observed {
    fn saw_step(&mut self, key: &str, step: usize, started: Option<DateTime<Utc>>, initial: bool) {
        let steps = self.steps.entry(key.to_string()).or_default();
        match steps.get(&step) {
            None => {
                steps.insert(step, started);
                if !initial {
                    self.steps_taken += 1;
                }
            }
            Some(first) if *first != started => {
                self.taken_twice.insert(key.to_string());
            }
            Some(_) => {}
        }
    }
}

fn observe(server: &FakeApiServer, interval: Duration) -> Arc<Mutex<Observed>> {
    let observed = Arc::new(Mutex::new(Observed::default()));
    let api: kube::Api<CanaryResource> = kube::Api::all(server.client("bench-observer"));
    let sink = observed.clone();
    let interval = chrono::Duration::from_std(interval).unwrap_or_default();
    tokio::spawn(async move {
        let mut events =
            kube::runtime::watcher(api, kube::runtime::watcher::Config::default()).boxed();
        while let Some(event) = events.next().await {
            let (canary, initial) = match event {
                Ok(kube::runtime::watcher::Event::Apply(canary)) => (canary, false),
                Ok(kube::runtime::watcher::Event::InitApply(canary)) => (canary, true),
                _ => continue,
            };
            let Some(status) = canary.status.as_ref() else {
                continue;
            };
            let key = format!(
                "{}/{}",
                canary.metadata.namespace.clone().unwrap_or_default(),
                canary.metadata.name.clone().unwrap_or_default()
            );
            let now = Utc::now();
            let mut observed = match sink.lock() {
                Ok(o) => o,
                Err(p) => p.into_inner(),
            };
            observed.saw_step(
                &key,
                status.rollout.step,
                status.rollout.step_started_at,
                initial,
            );
            let Some(tick) = status.last_tick_at else {
                continue;
            };
            if let Some(previous) = observed.last_tick.insert(key, tick) {
                if tick > previous {
                    let due = previous + interval;
                    let lag = (now - due).num_microseconds().unwrap_or(0) as f64 / 1000.0;
                    observed.lags.push((Instant::now(), lag.max(0.0)));
                }
            }
        }
    });
    observed
}

/// `q` of a cumulative histogram's increase between two readings, interpolated in the bucket
/// like PromQL's `histogram_quantile`.
fn histogram_quantile(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> Option<(f64, f64)> {
    let earlier: BTreeMap<String, f64> =
        before.iter().map(|(le, v)| (le.to_string(), *v)).collect();
    let delta: Vec<(f64, f64)> = after
        .iter()
        .map(|(le, v)| {
            (
                *le,
                v - earlier.get(&le.to_string()).copied().unwrap_or(0.0),
            )
        })
        .collect();
    let total = delta.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for (le, count) in &delta {
        if *count >= rank {
            if le.is_infinite() {
                return Some((lower.0, total));
            }
            let share = if count - lower.1 > 0.0 {
                (rank - lower.1) / (count - lower.1)
            } else {
                1.0
            };
            return Some((lower.0 + (le - lower.0) * share, total));
        }
        lower = (*le, *count);
    }
    None
}

/// Wait until the start-up (first reads, writes queued behind the client-side limit) is over:
/// an interval whose API requests run below 90% of the controller's default limit and within
/// 25% of the interval before (a steady state: steps and checkpoints go on); false on `limit`.
async fn settle(
    controller: &ControllerProc,
    cluster: &Cluster,
    interval: Duration,
    limit: Duration,
) -> Result<bool> {
    let started = Instant::now();
    let total = |tallies: &BTreeMap<String, u64>| tallies.values().sum::<u64>();
    let below_limit = 0.9 * fledge_controller::k8s::serve::DEFAULT_API_QPS * interval.as_secs_f64();
    let mut previous: Option<f64> = None;
    loop {
        let before = total(&cluster.server.request_tallies());
        tokio::time::sleep(interval).await;
        let requests = (total(&cluster.server.request_tallies()) - before) as f64;
        if ProcSample::read(controller.proc.pid()).is_err() {
            bail!(
                "fledge controller exited:\n{}",
                controller.proc.log_tail(30)
            );
        }
        let steady = previous.is_some_and(|p| (requests - p).abs() <= 0.25 * p.max(requests));
        if requests < below_limit && steady {
            return Ok(true);
        }
        if started.elapsed() >= limit {
            return Ok(false);
        }
        previous = Some(requests);
    }
}

struct Reading {
    proc: ProcSample,
    tallies: BTreeMap<String, u64>,
    gateway_hits: Vec<(u64, u64, u64)>,
    prometheus_hits: (u64, u64, u64),
    lag_histogram: Option<Vec<(f64, f64)>>,
}

fn read(controller: &ControllerProc, cluster: &Cluster) -> Result<Reading> {
    Ok(Reading {
        lag_histogram: controller.lag_histogram(),
        proc: ProcSample::read(controller.proc.pid())?,
        tallies: cluster.server.request_tallies(),
        gateway_hits: cluster.gateways.iter().map(|g| g.hits.snapshot()).collect(),
        prometheus_hits: cluster.prometheus.hits.snapshot(),
    })
}

/// Each gateway's traffic scrapes between two samples and the ticks they came in: a scrape
/// more than half an interval after the one before it starts a tick.
fn gateway_ticks(
    gateways: &[FakeGateway],
    from: &ProcSample,
    to: &ProcSample,
    interval: Duration,
) -> Vec<ReadsInTicks> {
    gateways
        .iter()
        .map(|g| g.hits.traffic_ticks(from.at, to.at, interval / 2))
        .collect()
}

fn hits_delta(before: &(u64, u64, u64), after: &(u64, u64, u64)) -> (u64, u64, u64) {
    (after.0 - before.0, after.1 - before.1, after.2 - before.2)
}

/// The bench's fleet of `size` Canaries at `interval`, spread over gateways as `args` say.
fn fleet_of(args: &Args, size: usize, interval: Duration) -> Fleet {
    Fleet::new(
        size,
        args.services_per_gateway,
        interval,
        Duration::from_secs(args.pause),
    )
}

async fn kubernetes_run(
    args: &Args,
    size: usize,
    dir: &Path,
    with_faults: bool,
) -> Result<(Summary, Option<Faults>)> {
    let interval = Duration::from_secs(args.interval);
    let fleet = fleet_of(args, size, interval);
    println!(
        "== fledge controller, {size} canaries: {} gateways × ≤{} services (Envoy admin), {} via Prometheus (2 gateway replicas), interval {}s, {} intervals measured",
        fleet.gateways,
        args.services_per_gateway,
        fleet.on_prometheus().len(),
        args.interval,
        args.intervals
    );
    let seeding = Instant::now();
    let cluster = start_cluster(&fleet, dir).await?;
    println!(
        "   seeded {size} Canaries mid-rollout and their VirtualServices in {:.1}s",
        seeding.elapsed().as_secs_f64()
    );
    let observed = observe(&cluster.server, interval);
    let mut controller =
        ControllerProc::start(&cluster.kubeconfig, "bench-a", &dir.join("controller.log"))?;
    let leading = tokio::task::block_in_place(|| controller.wait_leading(Duration::from_secs(60)))?;
    println!("   leading after {:.1}s", leading.as_secs_f64());

    // Warm-up: every canary's first tick (a baseline) and its first judged interval, and
    // until the start-up requests are done (at most 18 intervals more: the bench must end in
    // reasonable time; a size that has not settled by then is measured as it is, and says so).
    let warm_up = (interval * 3).max(Duration::from_secs(20));
    tokio::time::sleep(warm_up).await;
    let settling = Instant::now();
    let settled = settle(&controller, &cluster, interval, interval * 18).await?;
    println!(
        "   warm-up {:.0}s (start-up requests done: {settled})",
        warm_up.as_secs_f64() + settling.elapsed().as_secs_f64()
    );
    let summary = measure_window(args, size, &controller, &cluster, &observed).await?;
    let faults = if with_faults {
        Some(faults(args, size, dir, &fleet, controller, &cluster, &observed).await?)
    } else {
        let _ = controller.proc.stop();
        None
    };
    Ok((summary, faults))
}

/// The measured window of one size: `--intervals` intervals of the controller at work.
async fn measure_window(
    args: &Args,
    size: usize,
    controller: &ControllerProc,
    cluster: &Cluster,
    observed: &Arc<Mutex<Observed>>,
) -> Result<Summary> {
    let interval = Duration::from_secs(args.interval);
    let bench_before = ProcSample::read(std::process::id())?;
    let before = tokio::task::block_in_place(|| read(controller, cluster))?;
    let window = interval * args.intervals;
    let mut peak_rss = before.proc.rss_kib;
    let window_started = Instant::now();
    while window_started.elapsed() < window {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if let Ok(sample) = ProcSample::read(controller.proc.pid()) {
            peak_rss = peak_rss.max(sample.rss_kib);
        }
    }
    let after = tokio::task::block_in_place(|| read(controller, cluster))?;
    let bench_after = ProcSample::read(std::process::id())?;
    let seconds = after.proc.at.duration_since(before.proc.at).as_secs_f64();
    let intervals = seconds / interval.as_secs_f64();

    let cpu_ms = after.proc.cpu_ms - before.proc.cpu_ms;
    let canary_intervals = size as f64 * intervals;
    let requests: BTreeMap<String, u64> = after
        .tallies
        .iter()
        .map(|(kind, n)| {
            (
                kind.clone(),
                n - before.tallies.get(kind).copied().unwrap_or(0),
            )
        })
        .filter(|(_, n)| *n > 0)
        .collect();
    let api_total: u64 = requests.values().sum();
    let gateway: Vec<(u64, u64, u64)> = before
        .gateway_hits
        .iter()
        .zip(&after.gateway_hits)
        .map(|(b, a)| hits_delta(b, a))
        .collect();
    let scrapes: u64 = gateway.iter().map(|h| h.0).sum();
    let guard_reads: u64 = gateway.iter().map(|h| h.1).sum();
    let scraped_bytes: u64 = gateway.iter().map(|h| h.2).sum();
    let prometheus = hits_delta(&before.prometheus_hits, &after.prometheus_hits);
    let in_ticks = gateway_ticks(&cluster.gateways, &before.proc, &after.proc, interval);
    let ticks: u64 = in_ticks.iter().map(|g| g.ticks).sum();
    let scrapes_per_interval = reads_per_tick(&in_ticks);

    let observed_lags: Vec<f64> = {
        let observed = observed
            .lock()
            .map_err(|_| anyhow::anyhow!("observer lock"))?;
        observed
            .lags
            .iter()
            .filter(|(at, _)| *at >= before.proc.at && *at <= after.proc.at)
            .map(|(_, lag)| *lag)
            .collect()
    };
    let observed_count = observed_lags.len();
    let observed_p99 = quantile(&mut observed_lags.clone(), 0.99);
    let self_reported = lag_quantile(&before.lag_histogram, &after.lag_histogram);
    let lag_p99_ms = match self_reported {
        Some((seconds, _)) => seconds * 1000.0,
        None => observed_p99,
    };

    println!(
        "   window {seconds:.0}s = {intervals:.1} intervals; load average {}",
        load_average()
    );
    println!(
        "   controller: rss {:.0} MiB at the end (peak {:.0}); cpu {:.0} ms = {:.1}% of a core",
        after.proc.rss_mib(),
        peak_rss as f64 / 1024.0,
        cpu_ms,
        cpu_ms / seconds / 10.0
    );
    println!(
        "   this bench process (fake API server, gateways, Prometheus, observer): cpu {:.1}% of a core",
        (bench_after.cpu_ms - bench_before.cpu_ms) / seconds / 10.0
    );
    match self_reported {
        Some((p99, count)) => println!(
            "   decisions: {count:.0} in the window ({:.2} per canary-interval); lag p99 {:.0} ms (fledge_analysis_lag_seconds); status writes carrying analysis progress (checkpoints, or with a step) seen: {observed_count}",
            count / canary_intervals,
            p99 * 1000.0
        ),
        None => println!(
            "   decisions seen as status writes with a new lastTickAt: {observed_count} ({:.2} per canary-interval); lag p99 {observed_p99:.0} ms",
            observed_count as f64 / canary_intervals
        ),
    }
    println!(
        "   gateways: {scrapes} traffic scrapes in {ticks} gateway ticks ({scrapes_per_interval:.2} per gateway per tick, {:.1} MB/s), {guard_reads} guard reads ({:.1}/s); Prometheus: {} traffic queries ({:.2} per interval), {} guard queries",
        scraped_bytes as f64 / seconds / 1e6,
        guard_reads as f64 / seconds,
        prometheus.0,
        prometheus.0 as f64 / intervals,
        prometheus.1
    );
    let mut breakdown: Vec<(&String, &u64)> = requests.iter().collect();
    breakdown.sort_by(|a, b| b.1.cmp(a.1));
    println!(
        "   API server: {api_total} requests = {:.1}/s: {}",
        api_total as f64 / seconds,
        breakdown
            .iter()
            .take(8)
            .map(|(kind, n)| format!("{kind} {:.1}/s", **n as f64 / seconds))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(Summary {
        canaries: size,
        rss_mib: after.proc.rss_mib(),
        cpu_ms_per_canary_interval: cpu_ms / canary_intervals,
        lag_p99_ms,
        scrapes_per_interval,
        api_requests_per_s: api_total as f64 / seconds,
    })
}

/// p99 of the lag histogram's increase between two readings, and the number of decisions.
fn lag_quantile(
    before: &Option<Vec<(f64, f64)>>,
    after: &Option<Vec<(f64, f64)>>,
) -> Option<(f64, f64)> {
    match (before, after) {
        (Some(b), Some(a)) => histogram_quantile(b, a, 0.99),
        (None, Some(a)) => histogram_quantile(&[], a, 0.99),
        _ => None,
    }
}

/// Each Canary's persisted step, as the API server holds it now.
fn persisted_steps(server: &FakeApiServer, fleet: &Fleet) -> HashMap<String, usize> {
    fleet
        .members
        .iter()
        .filter_map(|m| server.get("fledge.dev", "canaries", &m.namespace, &m.name))
        .filter_map(|object| {
            let canary: CanaryResource = serde_json::from_value(object).ok()?;
            let key = format!(
                "{}/{}",
                canary.metadata.namespace.clone()?,
                canary.metadata.name.clone()?
            );
            Some((key, canary.status?.rollout.step))
        })
        .collect()
}

/// Watch a new leader's status API until every Canary has been judged after `fault` (a new
/// `lastAnalysis`), for at most 4 intervals: when (from the analysis' own time) and at which
/// step, against the steps persisted at the fault.
async fn resumption(
    controller: &ControllerProc,
    steps: &HashMap<String, usize>,
    fault: DateTime<Utc>,
    interval: Duration,
) -> Result<Resumption> {
    let mut judged: HashMap<String, (f64, usize)> = HashMap::new();
    let started = Instant::now();
    let url = controller.url("/api/v1/canaries");
    while judged.len() < steps.len() && started.elapsed() < interval * 4 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let Ok(views) =
            tokio::task::block_in_place(|| http::get_json(&url, Duration::from_secs(30)))
        else {
            continue;
        };
        for view in views.as_array().into_iter().flatten() {
            let (Some(name), Some(step)) = (view["name"].as_str(), view["step"].as_u64()) else {
                continue;
            };
            let at = view["lastAnalysis"]["at"]
                .as_str()
                .and_then(|at| DateTime::parse_from_rfc3339(at).ok())
                .map(|at| at.with_timezone(&Utc));
            if let Some(at) = at.filter(|at| *at > fault) {
                let after_s = (at - fault).num_milliseconds() as f64 / 1000.0;
                judged
                    .entry(name.to_string())
                    .or_insert((after_s, step as usize));
            }
        }
    }
    let mut times: Vec<f64> = judged.values().map(|(t, _)| *t).collect();
    let wrong_step = judged
        .iter()
        .filter(|(name, (_, step))| {
            steps
                .get(*name)
                .is_none_or(|before| *step != *before && *step != before + 1)
        })
        .count();
    let two = 2.0 * interval.as_secs_f64();
    Ok(Resumption {
        canaries: steps.len(),
        within_two: times.iter().filter(|t| **t <= two).count(),
        resumed: judged.len(),
        p99_s: quantile(&mut times, 0.99),
        slowest_s: times.iter().copied().fold(0.0, f64::max),
        wrong_step,
    })
}

/// Send SIGTERM (a graceful shutdown: in-flight reconciles finish, the Lease is released) and
/// wait up to `grace` for the process to exit.
fn terminate(proc: &mut Proc, grace: Duration) -> Result<()> {
    Command::new("kill")
        .arg("-TERM")
        .arg(proc.pid().to_string())
        .status()
        .context("kill -TERM")?;
    let deadline = Instant::now() + grace;
    while proc.is_running() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    if proc.is_running() {
        bail!("{} did not exit within {grace:?} of SIGTERM", proc.name());
    }
    Ok(())
}

/// Restart (SIGKILL, then the same identity again, as a restarted pod) and leader handoff (a
/// standby takes over from a leader shut down gracefully), each measured by [`resumption`];
/// steps taken twice over the whole run from the observer.
async fn faults(
    args: &Args,
    size: usize,
    dir: &Path,
    fleet: &Fleet,
    mut leader: ControllerProc,
    cluster: &Cluster,
    observed: &Arc<Mutex<Observed>>,
) -> Result<Faults> {
    let interval = Duration::from_secs(args.interval);
    // Restart: the process dies mid-rollout and comes back under the same name.
    let steps = persisted_steps(&cluster.server, fleet);
    let fault = Utc::now();
    leader.proc.kill_now();
    let mut restarted =
        ControllerProc::start(&cluster.kubeconfig, "bench-a", &dir.join("restarted.log"))?;
    let leading = tokio::task::block_in_place(|| restarted.wait_leading(Duration::from_secs(60)))?;
    let restart = resumption(&restarted, &steps, fault, interval).await?;
    println!(
        "   restart (SIGKILL, same identity): leading after {:.1}s; {}; load average {}",
        leading.as_secs_f64(),
        restart.figures(interval),
        load_average()
    );

    // Handoff: a standby is ready; the leader shuts down; the standby takes over.
    let mut standby =
        ControllerProc::start(&cluster.kubeconfig, "bench-b", &dir.join("standby.log"))?;
    let standby_url = standby.url("/readyz");
    tokio::task::block_in_place(|| {
        wait_until("the standby to answer", Duration::from_secs(60), || {
            Ok(http::get(&standby_url, Duration::from_secs(2))
                .ok()
                .filter(|(code, _)| *code == 200)
                .map(|_| ()))
        })
    })?;
    tokio::time::sleep(interval).await;
    let steps = persisted_steps(&cluster.server, fleet);
    let fault = Utc::now();
    tokio::task::block_in_place(|| terminate(&mut restarted.proc, Duration::from_secs(180)))?;
    let stopped = (Utc::now() - fault).num_milliseconds() as f64 / 1000.0;
    let taking_over =
        tokio::task::block_in_place(|| standby.wait_leading(Duration::from_secs(60)))?;
    let handoff = resumption(&standby, &steps, fault, interval).await?;
    println!(
        "   handoff (leader stopped in {stopped:.1}s, standby leading {:.1}s later): {}; load average {}",
        taking_over.as_secs_f64(),
        handoff.figures(interval),
        load_average()
    );
    let _ = standby.proc.stop();
    let observed = observed
        .lock()
        .map_err(|_| anyhow::anyhow!("observer lock"))?;
    Ok(Faults {
        canaries: size,
        interval,
        restart,
        handoff,
        steps_taken: observed.steps_taken,
        taken_twice: observed.taken_twice.len(),
    })
}

/// Standalone `fledge run` with `size` canaries from one multi-document spec file, each with
/// its own RDS file (verified through a [`FakeRdsAdmin`]), reading the same fake gateways and
/// Prometheus. They start from the beginning (a baseline, then the first weight step).
async fn standalone_run(args: &Args, size: usize, dir: &Path) -> Result<Summary> {
    let interval = Duration::from_secs(args.interval);
    let fleet = fleet_of(args, size, interval);
    println!(
        "== fledge run (standalone), {size} canaries: {} gateways, {} via Prometheus, router envoyRds (one file each), interval {}s, {} intervals measured",
        fleet.gateways,
        fleet.on_prometheus().len(),
        args.interval,
        args.intervals
    );
    std::fs::create_dir_all(dir)?;
    let rds_dir = dir.join("rds");
    std::fs::create_dir_all(&rds_dir)?;
    let (shutdown, stopped) = tokio::sync::watch::channel(false);
    let _stop_on_drop = scopeguard_send(shutdown);
    let started = Instant::now();
    let mut gateways = Vec::new();
    for g in 0..fleet.gateways {
        gateways.push(FakeGateway::start(&fleet.on_gateway(g), started, stopped.clone()).await?);
    }
    let prometheus =
        FakePrometheus::start(&fleet.on_prometheus(), started, stopped.clone()).await?;
    let rds_admin = FakeRdsAdmin::start(&rds_dir, stopped.clone()).await?;
    let gateway_urls: Vec<String> = gateways.iter().map(|g| g.url.clone()).collect();
    let mut documents = String::new();
    for member in &fleet.members {
        std::fs::write(
            rds_dir.join(format!("{}.json", member.service())),
            serde_json::to_vec(&fledge_e2e::scale::rds_file(member))?,
        )?;
        let document = fleet.standalone_document(
            member,
            &gateway_urls,
            &prometheus.url,
            &rds_dir,
            &rds_admin.url,
        );
        documents.push_str("---\n");
        documents.push_str(&serde_json::to_string(&document)?);
        documents.push('\n');
    }
    let specs = dir.join("canaries.yaml");
    std::fs::write(&specs, documents)?;
    let port = free_port()?;
    let mut command = Command::new(paths::fledge_binary()?);
    command
        .arg("run")
        .arg("-f")
        .arg(&specs)
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--state-dir")
        .arg(dir.join("state"));
    let mut proc = Proc::spawn("fledge run", command, &dir.join("run.log"))?;
    let base = format!("http://127.0.0.1:{port}");
    let canaries_url = format!("{base}/api/v1/canaries");
    // Warm-up: every canary has taken its baseline and its first step (setWeight 10).
    let warm = Instant::now();
    tokio::task::block_in_place(|| {
        wait_until(
            "every canary at its first weight",
            Duration::from_secs(600),
            || {
                fledge_e2e::process::abort_if_exited(&mut proc)?;
                let views = http::get_json(&canaries_url, Duration::from_secs(30)).ok();
                let at_weight = views
                    .as_ref()
                    .and_then(|v| v.as_array())
                    .map(|v| {
                        v.iter()
                            .filter(|c| c["canaryWeight"].as_u64() == Some(10))
                            .count()
                    })
                    .unwrap_or(0);
                Ok((at_weight == size).then_some(()))
            },
        )
    })
    .with_context(|| format!("fledge run log:\n{}", proc.log_tail(20)))?;
    tokio::time::sleep(interval * 2).await;
    println!(
        "   warm-up {:.0}s (every canary at weight 10, then 2 intervals)",
        warm.elapsed().as_secs_f64()
    );
    let lag_histogram = || metrics_lag_histogram(&format!("{base}/metrics"));
    let bench_before = ProcSample::read(std::process::id())?;
    let before = ProcSample::read(proc.pid())?;
    let lag_before = tokio::task::block_in_place(lag_histogram);
    let prometheus_before = prometheus.hits.snapshot();
    tokio::time::sleep(interval * args.intervals).await;
    let lag_after = tokio::task::block_in_place(lag_histogram);
    let after = ProcSample::read(proc.pid())?;
    let bench_after = ProcSample::read(std::process::id())?;
    let seconds = after.at.duration_since(before.at).as_secs_f64();
    let intervals = seconds / interval.as_secs_f64();
    let in_ticks = gateway_ticks(&gateways, &before, &after, interval);
    let prometheus_queries = hits_delta(&prometheus_before, &prometheus.hits.snapshot()).0;
    let cpu_ms = after.cpu_ms - before.cpu_ms;
    let lag = lag_quantile(&lag_before, &lag_after);
    let summary = Summary {
        canaries: size,
        rss_mib: after.rss_mib(),
        cpu_ms_per_canary_interval: cpu_ms / (size as f64 * intervals),
        lag_p99_ms: lag.map_or(f64::NAN, |(p99, _)| p99 * 1000.0),
        scrapes_per_interval: reads_per_tick(&in_ticks),
        api_requests_per_s: 0.0,
    };
    println!(
        "   window {seconds:.0}s = {intervals:.1} intervals; load average {}",
        load_average()
    );
    println!(
        "   fledge run: rss {:.0} MiB; cpu {cpu_ms:.0} ms = {:.1}% of a core; decisions {:.0} ({:.2} per canary-interval); Prometheus: {prometheus_queries} traffic queries ({:.2} per interval); route checks {}",
        after.rss_mib(),
        cpu_ms / seconds / 10.0,
        lag.map_or(0.0, |(_, n)| n),
        lag.map_or(0.0, |(_, n)| n) / (size as f64 * intervals),
        prometheus_queries as f64 / intervals,
        rds_admin.hits.snapshot().0
    );
    println!(
        "   this bench process (gateways, Prometheus, RDS admin): cpu {:.1}% of a core",
        (bench_after.cpu_ms - bench_before.cpu_ms) / seconds / 10.0
    );
    let _ = proc.stop();
    Ok(summary)
}

/// Sends `true` when dropped (stops the fake endpoints of a part on every exit path).
fn scopeguard_send(sender: tokio::sync::watch::Sender<bool>) -> impl Drop {
    struct StopOnDrop(tokio::sync::watch::Sender<bool>);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            self.0.send_replace(true);
        }
    }
    StopOnDrop(sender)
}

/// `fledge_analysis_lag_seconds` of a `/metrics` page: (upper bound, cumulative count).
fn metrics_lag_histogram(url: &str) -> Option<Vec<(f64, f64)>> {
    let (_, text) = http::get(url, Duration::from_secs(30)).ok()?;
    parse_lag_histogram(&text)
}

/// The memory part: one controller with `--memory-canaries` at `--memory-interval`, its RSS
/// after 10 and after 100 intervals (from its start).
async fn memory_run(args: &Args, dir: &Path) -> Result<MemoryGrowth> {
    let size = args.memory_canaries;
    let interval = Duration::from_secs(args.memory_interval);
    let fleet = fleet_of(args, size, interval);
    println!(
        "== memory: fledge controller, {size} canaries, interval {}s, RSS after 10 and 100 intervals",
        args.memory_interval
    );
    let cluster = start_cluster(&fleet, dir).await?;
    let mut controller =
        ControllerProc::start(&cluster.kubeconfig, "bench-m", &dir.join("controller.log"))?;
    tokio::task::block_in_place(|| controller.wait_leading(Duration::from_secs(60)))?;
    let started = Instant::now();
    let pid = controller.proc.pid();
    let after_10 = rss_window(pid, started, interval, 10).await?;
    let after_100 = rss_window(pid, started, interval, 100).await?;
    let _ = controller.proc.stop();
    Ok(MemoryGrowth {
        canaries: size,
        interval,
        after_10,
        after_100,
    })
}

/// The controller's RSS sampled every [`RSS_SAMPLE_EVERY`] over the [`RSS_WINDOW_INTERVALS`]
/// intervals that end `n` intervals after `started`.
async fn rss_window(pid: u32, started: Instant, interval: Duration, n: u32) -> Result<RssWindow> {
    let from = interval * n.saturating_sub(RSS_WINDOW_INTERVALS);
    let to = interval * n;
    tokio::time::sleep(from.saturating_sub(started.elapsed())).await;
    let mut samples = Vec::new();
    while started.elapsed() < to {
        samples.push(ProcSample::read(pid)?.rss_mib());
        tokio::time::sleep(RSS_SAMPLE_EVERY).await;
    }
    let window = RssWindow::of(&samples)?;
    println!(
        "   after {n} intervals: rss median {:.0} MiB, peak {:.0} MiB ({} samples over the last {RSS_WINDOW_INTERVALS} intervals); load average {}",
        window.median_mib,
        window.peak_mib,
        window.samples,
        load_average()
    );
    Ok(window)
}
