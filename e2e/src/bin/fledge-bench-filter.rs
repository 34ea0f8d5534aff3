//! `fledge-bench-filter` — what the Fledge filter costs Envoy, measured side by side (`make
//! bench-filter`).
//!
//! One run starts a fast upstream (an Envoy answering `200 ok` with `direct_response`) and one
//! Envoy per variant, identical except for the HTTP filter, all with `--concurrency 1` on
//! loopback:
//!
//! - `none`: no filter;
//! - `cluster-stats`: no filter either — what `metricsSource.envoyClusterStats` runs — as a
//!   process of its own, so its ratio to `none` shows how much two identical Envoys differ here;
//! - `native-floor`: no filter; `filter/native-floor`, an Envoy dynamic module (a native shared
//!   object, no Wasm VM) as an access logger, makes the observer's four reads per request:
//!   what these metrics cost without proxy-wasm;
//! - `empty`: an empty Rust proxy-wasm SDK filter (`fledge-empty-filter`), the Wasm floor;
//! - `floor`: `fledge-floor-filter`, only `on_log` and the four reads per-subset classes and
//!   durations need (cluster, code, code details, duration): what any proxy-wasm filter with
//!   these metrics pays on this host, so the table shows how far each module is above it;
//! - `observer`: the metrics-only module (`fledge_observer.wasm`), default configuration plus
//!   the two clusters' names;
//! - `tagging`: the full module (`fledge_filter.wasm`) with `responseHeader`, `sticky` and
//!   `forceCanary` (the bench sends a sticky key on every request);
//! - `guard`: the full module with a data-plane guard configured;
//! - `floor-tagging`, `floor-guard`: `fledge-floor-tagging-filter` (the floor's source with its
//!   header callbacks) making the four reads plus exactly the hostcalls the `tagging` and `guard`
//!   configurations ask of Envoy (sticky key read, route header write, absent header lookups, a
//!   response header write): what any proxy-wasm filter doing that work pays here. When a floor
//!   misses its configuration's target too, the verdict says so;
//! - `observer-named`, `guard-named` (and their floors `floor-named`, `floor-guard-named`): the
//!   same on routes whose weighted clusters name their cluster in `x-fledge-cluster`,
//!   with the filter's `clusterHeader`, so the log phase reads the cluster and the status in
//!   one `proxy_get_header_map_pairs`;
//! - `tagging-native`, `tagging-lean` (and `floor-tagging-native`, `floor-lean`): sticky users
//!   and the subset header from Envoy's route; `tagging-lean` runs the observer (with
//!   `clusterHeader`) on every request and the full module only on token routes.
//!
//! The measure is Envoy's **CPU time per request**: utime + stime of the measured Envoy process
//! (`/proc/<pid>/stat`) across a measurement ÷ the requests it served meanwhile (closed loop,
//! `wrk -t2 -c16`). CPU per request is far steadier than throughput on a shared machine: time
//! the process does not get the core is not counted. Each measurement loads a variant and the
//! empty filter **at the same time**, both Envoys pinned to the same CPU (the load generators,
//! the upstream and the bench on the others; [`fledge_e2e::cpus`]), so whatever the machine
//! does during those seconds hits both, and the variant's ratio is taken against the empty
//! filter of the same window. Each round measures every variant once, in an order that rotates
//! from round to round; the table shows the median over rounds. `empty-again`, a second Envoy
//! running the empty filter, shows the method's own error (it should read 1). Every round
//! after the first runs on fresh Envoy
//! processes (same configuration and ports, warmed up again): two processes running the same
//! module differ by a few µs per request for their whole life, so one process per variant
//! would bias the whole run (`--same-envoys` keeps them). A ratio "÷ empty" is CPU(empty) ÷ CPU(variant): 1.0 = as
//! cheap as the empty filter, 0.97 = 3% more CPU per request.
//!
//! Then latency, one Envoy at a time: open loop at a fixed rate below the knee (`--rate`,
//! default a quarter of the slowest median throughput alone, from the warm-ups) from this
//! process over 4 keep-alive connections, each variant between two measurements of the empty
//! filter; the p99 each variant adds over the empty filter measured around it (median of the
//! per-round differences).
//!
//! Finally each Fledge variant's own metrics are checked against the requests sent, so a variant
//! cannot look cheap by not counting.
//!
//! `--reads` adds `filter/floor` with 0 to 3 of its 4 reads, and with the 4 plus hostcalls that
//! return no value, and prints what each step costs in µs per request: where the gap between a
//! metrics filter and the empty filter comes from.

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use fledge_core::contract;
use fledge_e2e::cpus::Placement;
use fledge_e2e::envoy::{NativeAccessLog, CANARY_CLUSTER, STABLE_CLUSTER};
use fledge_e2e::process::{free_port, port_accepts, wait_until, Proc, ScratchDir};
use fledge_e2e::stats::{max, median, min};
use fledge_e2e::{paths, Envoy, EnvoyOptions, RouteWeights, WasmFilter};
use serde_json::json;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

#[derive(Debug, Parser)]
#[command(
    name = "fledge-bench-filter",
    about = "Envoy CPU per request: no filter, an empty Wasm filter and the Fledge modules, side by side"
)]
struct Args {
    /// Rounds; each measures every variant once, in rotated order.
    #[arg(long, default_value_t = 7)]
    rounds: usize,
    /// Seconds of closed-loop load per measurement (the CPU-per-request measurement), each of
    /// a variant and the empty filter at the same time.
    #[arg(long, default_value_t = 4)]
    seconds: u64,
    /// Seconds per fixed-rate latency measurement.
    #[arg(long, default_value_t = 4)]
    latency_seconds: u64,
    /// Fixed request rate for latency (req/s); 0 = a quarter of the slowest median throughput.
    #[arg(long, default_value_t = 0)]
    rate: u32,
    /// wrk connections and threads.
    #[arg(long, default_value_t = 16)]
    connections: u32,
    #[arg(long, default_value_t = 2)]
    threads: u32,
    /// Only these built-in variants (comma-separated: none, cluster-stats, empty, empty-again,
    /// floor, observer, tagging, tagging-native, tagging-lean, guard, floor-tagging,
    /// floor-tagging-native, floor-lean, floor-guard); `empty` is always kept (the ratios need
    /// it).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// More variants measured alongside, as NAME=JSON (the full module with that
    /// configuration) or NAME@/path/x.wasm=JSON (another module, e.g. a throwaway build that
    /// isolates one cost).
    #[arg(long = "variant")]
    variants: Vec<String>,
    /// Skip the fixed-rate latency phase.
    #[arg(long)]
    no_latency: bool,
    /// Keep one Envoy per variant for the whole run instead of starting fresh ones every
    /// round. Each Envoy process keeps an offset of its own (measured here: 4–6 µs per request
    /// between two Envoys running the same module), which one process per variant turns into
    /// a bias of the whole run; fresh processes every round turn it into per-round noise that
    /// the median averages out.
    #[arg(long)]
    same_envoys: bool,
    /// Also measure what each read of the metrics costs: `filter/floor` with 0, 1, 2 and 3 of
    /// its 4 reads, and with the 4 plus the observer's hostcalls that return no value (two clock
    /// reads, an absent header) — the per-read cost table of docs/filter-performance.md.
    #[arg(long)]
    reads: bool,
    /// Pairs of variants to compare round by round, as A:B (comma-separated): the median over
    /// rounds of A's CPU per request above the empty filter around it minus B's, and in how
    /// many rounds A was cheaper. The difference of two variants' medians mixes rounds and
    /// carries both spreads; a paired difference does not. Each Fledge variant is paired with
    /// `observer` anyway when both run.
    #[arg(long, value_delimiter = ',')]
    paired: Vec<String>,
    /// Leave the processes' CPUs to the scheduler instead of sharing one CPU between the two
    /// Envoys measured together (the others for wrk, the upstream and the bench).
    #[arg(long)]
    no_pin: bool,
}

const USER_HEADER: &str = "x-user-id";
const SECRET: &str = "bench-secret-0123456789abcdef";

/// Targets from the issue: CPU(empty) ÷ CPU(variant), medians of the per-round ratios.
fn target_vs_empty(name: &str) -> Option<f64> {
    match name {
        "observer" | "observer-named" => Some(0.97),
        "tagging" | "tagging-native" | "tagging-lean" | "guard" | "guard-named" => Some(0.93),
        _ => None,
    }
}
const TARGET_ADDED_P99_MICROS: f64 = 50.0;
const TARGET_WASM_KIB: f64 = 300.0;

/// The floor variant measured for a Fledge variant's configuration: the same hostcalls with
/// nothing else (see [`floor_variants`]).
fn floor_of(name: &str) -> Option<&'static str> {
    match name {
        "observer" => Some("floor"),
        "tagging" => Some("floor-tagging"),
        "tagging-native" => Some("floor-tagging-native"),
        "tagging-lean" => Some("floor-lean"),
        "guard" => Some("floor-guard"),
        "observer-named" => Some("floor-named"),
        "guard-named" => Some("floor-guard-named"),
        _ => None,
    }
}

/// The verdict's note when the floor of the variant's hostcalls also misses the target: then
/// no proxy-wasm filter doing that work met it in this run.
fn out_of_reach(value: f64, target: f64, floor_vs_empty: Option<f64>) -> String {
    match floor_vs_empty {
        Some(floor) if value < target && floor < target => format!(
            " (its floor, the same hostcalls and nothing else, measured {floor:.3}: also below the target)"
        ),
        _ => String::new(),
    }
}

/// One Envoy under test.
struct Variant {
    name: String,
    /// What it is, for the table.
    about: String,
    filter: Option<WasmFilter>,
    /// Whether it emits Fledge metrics (checked at the end).
    fledge_metrics: bool,
    /// Whether Envoy's route does the sticky pick and the subset response header itself.
    native_route: bool,
    /// A second filter Envoy runs instead of `filter` only for requests carrying the
    /// forced-canary token or the route header (none of the bench's requests do).
    forced_canary_filter: Option<WasmFilter>,
    /// Whether Envoy's route names the upstream cluster in [`CLUSTER_HEADER`] (what the
    /// filter's `clusterHeader` reads).
    cluster_header: bool,
    /// A native (dynamic-module) access logger instead of a Wasm filter.
    native_access_log: Option<NativeAccessLog>,
}

impl Variant {
    /// A variant on the bench's plain routes (the sticky pick from the filter's bucket).
    fn new(name: &str, about: &str, filter: Option<WasmFilter>, fledge_metrics: bool) -> Variant {
        Variant {
            name: name.into(),
            about: about.into(),
            filter,
            fledge_metrics,
            native_route: false,
            forced_canary_filter: None,
            cluster_header: false,
            native_access_log: None,
        }
    }

    /// On routes that name the upstream cluster in [`CLUSTER_HEADER`].
    fn with_cluster_header(mut self) -> Variant {
        self.cluster_header = true;
        self
    }

    /// With a native access logger (no Wasm filter).
    fn with_native_access_log(mut self, log: NativeAccessLog) -> Variant {
        self.native_access_log = Some(log);
        self
    }

    /// On routes that do the sticky pick and the subset header themselves.
    fn on_native_route(mut self) -> Variant {
        self.native_route = true;
        self
    }

    /// With `filter` run instead of the main one for requests carrying a token or the route
    /// header.
    fn with_forced_canary_filter(mut self, filter: Option<WasmFilter>) -> Variant {
        self.forced_canary_filter = filter;
        self
    }
}

struct Running {
    variant: Variant,
    envoy: Envoy,
    /// Requests sent to it (all phases), for the metrics check.
    sent: u64,
    /// Requests wrk may have left in flight when it stopped (one per connection per run):
    /// Envoy finishes and counts them, wrk does not.
    in_flight: u64,
}

impl Running {
    /// A wrk run against it served `requests` (and may have left one per connection in flight).
    fn served_wrk(&mut self, requests: u64, connections: u32) {
        self.sent += requests;
        self.in_flight += u64::from(connections);
    }
}

fn clusters_config() -> serde_json::Value {
    json!({
        STABLE_CLUSTER: {"service": "app", "subset": "stable"},
        CANARY_CLUSTER: {"service": "app", "subset": "canary"},
    })
}

/// Where the wasm files of a run are.
struct Modules {
    full: PathBuf,
    observer: PathBuf,
    empty: PathBuf,
    floor: PathBuf,
    floor_tagging: PathBuf,
    native_floor: NativeAccessLog,
}

/// The floor's four reads, as its configuration lists them (an empty configuration means the
/// same four).
const FLOOR_READS: &str = "xds.cluster_name,response.code,response.code_details,request.duration";

/// The response header Envoy's route names the upstream cluster in, for `clusterHeader`.
const CLUSTER_HEADER: &str = "x-fledge-cluster";

/// The floor's reads when the route names the cluster: the response headers in one read (the
/// cluster and the code), the details, the duration.
const FLOOR_NAMED_READS: &str = "pairs:x-fledge-cluster,response.code_details,request.duration";

/// `floor-tagging` and `floor-guard`: the floor's reads plus the hostcalls the `tagging` and
/// `guard` configurations make per request on the bench's traffic (the requests carry the
/// sticky key and none of the forced-canary, guard or route headers).
fn floor_variants(floor_tagging: &Path) -> Vec<Variant> {
    let variant = |name: &str, work: &str, about: &str| {
        let filter = WasmFilter {
            wasm: floor_tagging.to_path_buf(),
            plugin_config: format!("{FLOOR_READS},{work}"),
        };
        Variant::new(name, about, Some(filter), false)
    };
    vec![
        variant(
            "floor-tagging",
            "req:x-fledge-canary,sticky,resp-set",
            "the 4 reads + tagging's hostcalls: forced-canary lookup, sticky key read, route header write, response header write",
        ),
        variant(
            "floor-tagging-native",
            "req:x-fledge-stage,req:x-fledge-route",
            "the 4 reads + tagging-native's hostcalls: forced-canary and route header lookups; the route does sticky and the header",
        )
        .on_native_route(),
        variant(
            "floor-guard",
            "req:x-fledge-guard,req:x-fledge-route",
            "the 4 reads + the guard's hostcalls: header callbacks, guard and route header lookups",
        ),
        Variant::new(
            "floor-guard-named",
            "floor-guard, the cluster and code from the response headers in one read",
            Some(WasmFilter {
                wasm: floor_tagging.to_path_buf(),
                plugin_config: format!("{FLOOR_NAMED_READS},req:x-fledge-guard,req:x-fledge-route"),
            }),
            false,
        )
        .with_cluster_header(),
    ]
}

fn builtin_variants(modules: &Modules) -> Vec<Variant> {
    let Modules {
        full,
        observer,
        empty,
        floor,
        ..
    } = modules;
    let tagging = json!({
        "clusters": clusters_config(),
        "sticky": {"header": USER_HEADER},
        "responseHeader": "x-fledge-subset",
        "forceCanary": {"secret": SECRET},
    });
    // Sticky users and the subset header from Envoy's route (`native_route`); the filter keeps
    // what needs code: the metrics and the forced-canary token.
    let tagging_native = json!({
        "clusters": clusters_config(),
        "forceCanary": {"secret": SECRET},
    });
    let guard = json!({
        "clusters": clusters_config(),
        "guard": {"services": {"app": {}}},
    });
    let filter = |wasm: &Path, config: String| {
        Some(WasmFilter {
            wasm: wasm.to_path_buf(),
            plugin_config: config,
        })
    };
    let observer_config = json!({"clusters": clusters_config()}).to_string();
    let named = |mut config: serde_json::Value| {
        config["clusterHeader"] = json!(CLUSTER_HEADER);
        config.to_string()
    };
    let observer_named = named(json!({"clusters": clusters_config()}));
    let mut variants = vec![
        Variant::new("none", "no filter", None, false),
        Variant::new(
            "cluster-stats",
            "envoyClusterStats: no filter (a second identical Envoy)",
            None,
            false,
        ),
        Variant::new(
            "native-floor",
            "no filter; a native access logger (Envoy dynamic module) making the 4 reads",
            None,
            false,
        )
        .with_native_access_log(modules.native_floor.clone()),
        Variant::new(
            "empty",
            "empty Rust proxy-wasm SDK filter",
            filter(empty, String::new()),
            false,
        ),
        Variant::new(
            "empty-again",
            "the empty filter again (a second Envoy): the method's own error",
            filter(empty, String::new()),
            false,
        ),
        Variant::new(
            "floor",
            "on_log + the 4 reads metrics need (cluster, code, details, duration)",
            filter(floor, String::new()),
            false,
        ),
        Variant::new(
            "observer",
            "fledge_observer.wasm: metrics only",
            filter(observer, observer_config),
            true,
        ),
        Variant::new(
            "tagging",
            "fledge_filter.wasm: responseHeader + sticky + forceCanary",
            filter(full, tagging.to_string()),
            true,
        ),
        Variant::new(
            "tagging-native",
            "fledge_filter.wasm: forceCanary; the route: sticky (hash_policy) + the subset header",
            filter(full, tagging_native.to_string()),
            true,
        )
        .on_native_route(),
        Variant::new(
            "guard",
            "fledge_filter.wasm: guard configured",
            filter(full, guard.to_string()),
            true,
        ),
        Variant::new(
            "floor-named",
            "on_log + the reads metrics need when the route names the cluster (response headers, details, duration)",
            filter(floor, FLOOR_NAMED_READS.to_string()),
            false,
        )
        .with_cluster_header(),
        Variant::new(
            "observer-named",
            "fledge_observer.wasm, clusterHeader: the route names the cluster",
            filter(observer, observer_named.clone()),
            true,
        )
        .with_cluster_header(),
        Variant::new(
            "guard-named",
            "fledge_filter.wasm: guard configured, clusterHeader",
            filter(full, named(guard.clone())),
            true,
        )
        .with_cluster_header(),
    ];
    variants.extend(floor_variants(&modules.floor_tagging));
    // The observer on every request; the full module, with `forceCanary`, only on the routes of
    // requests carrying the token or the route header; sticky users and the subset header
    // from the route. Its floor: `floor` in both places, on the same routes.
    // The routes also name the cluster, so the observer reads it with the status at once.
    variants.push(
        Variant::new(
            "tagging-lean",
            "fledge_observer.wasm (clusterHeader); fledge_filter.wasm (forceCanary) only on token/route-header routes; the route: sticky + the subset header + the cluster header",
            filter(observer, observer_named),
            true,
        )
        .on_native_route()
        .with_cluster_header()
        .with_forced_canary_filter(filter(full, named(tagging_native.clone()))),
    );
    variants.push(
        Variant::new(
            "floor-lean",
            "floor-named, on tagging-lean's routes (floor also as its route-scoped filter)",
            filter(floor, FLOOR_NAMED_READS.to_string()),
            false,
        )
        .on_native_route()
        .with_cluster_header()
        .with_forced_canary_filter(filter(floor, FLOOR_NAMED_READS.to_string())),
    );
    variants
}

/// `filter/floor` variants for `--reads`: (name, the reads its configuration lists, what).
/// The builtin `floor` makes all four reads.
const READ_LADDER: [(&str, &str, &str); 5] = [
    ("floor-0", "none", "on_log only, no hostcall"),
    ("floor-1", "xds.cluster_name", "on_log + 1 read: cluster"),
    (
        "floor-2",
        "xds.cluster_name,response.code",
        "on_log + 2 reads: cluster, code",
    ),
    (
        "floor-3",
        "xds.cluster_name,response.code,response.code_details",
        "on_log + 3 reads: cluster, code, details",
    ),
    (
        "floor+calls",
        "xds.cluster_name,response.code,response.code_details,request.duration,now,now,hdr:grpc-status",
        "the 4 reads + 2 clock reads + an absent header (hostcalls returning no value)",
    ),
];

fn read_ladder(floor: &Path) -> Vec<Variant> {
    READ_LADDER
        .iter()
        .map(|(name, reads, about)| {
            let filter = WasmFilter {
                wasm: floor.to_path_buf(),
                plugin_config: (*reads).to_string(),
            };
            Variant::new(name, about, Some(filter), false)
        })
        .collect()
}

/// `NAME=JSON` or `NAME@/path/x.wasm=JSON`.
fn extra_variant(spec: &str, full: &Path) -> Result<Variant> {
    let (name, config) = spec
        .split_once('=')
        .context("--variant wants NAME=JSON or NAME@/path/x.wasm=JSON")?;
    let (name, wasm) = match name.split_once('@') {
        Some((name, path)) => (name, PathBuf::from(path)),
        None => (name, full.to_path_buf()),
    };
    // A shell that ate the quotes (e.g. JSON passed through `make BENCH_ARGS=...` unquoted)
    // leaves `{clusters:...}`: the filter would fail open to its defaults and the variant
    // would measure something else.
    if config.trim_start().starts_with('{') {
        if let Err(error) = serde_json::from_str::<serde_json::Value>(config) {
            bail!(
                "--variant {name}: the configuration is not JSON ({error}): {config}; quote it \
                 for the shell, e.g. make bench-filter BENCH_ARGS=\"--variant '{name}={{...}}'\" \
                 (make hands BENCH_ARGS to a shell, which drops the double quotes otherwise)"
            );
        }
    }
    let about = format!("{} {config}", file_name(&wasm));
    let filter = WasmFilter {
        wasm,
        plugin_config: config.to_string(),
    };
    Ok(Variant::new(name, &about, Some(filter), false))
}

/// An Envoy for `variant` that answers 200, on the measured CPU.
fn answering_envoy(
    variant: &Variant,
    upstream_port: u16,
    dir: &Path,
    placement: Option<&Placement>,
) -> Result<Envoy> {
    let envoy = start_envoy(variant, upstream_port, dir)?;
    if let Some(placement) = placement {
        placement.measure(envoy.pid())?;
    }
    expect_200(&variant.name, &envoy)?;
    Ok(envoy)
}

fn expect_200(name: &str, envoy: &Envoy) -> Result<()> {
    let reply = http_get_once(envoy.listener_port())?;
    if !reply.starts_with("HTTP/1.1 200") {
        bail!("{name} does not answer 200: {reply}");
    }
    Ok(())
}

/// Replace every variant's Envoy process with a fresh one, same configuration and ports (see
/// `--same-envoys`); the metrics check then counts the requests sent to the last one.
fn restart_envoys(running: &mut [Running], placement: Option<&Placement>) -> Result<()> {
    for r in running {
        r.envoy.restart()?;
        if let Some(placement) = placement {
            placement.measure(r.envoy.pid())?;
        }
        expect_200(&r.variant.name, &r.envoy)?;
        r.sent = 1;
        r.in_flight = 0;
    }
    Ok(())
}

/// Warm up every Envoy (VM start and compilation, connection pools) before it is measured,
/// one at a time; returns each one's throughput alone (requests per second).
fn warm_up(wrk: &Path, running: &mut [Running], args: &Args) -> Result<Vec<f64>> {
    let mut throughput = Vec::new();
    for r in running {
        let result = run_wrk(wrk, r, 2, args)?;
        r.served_wrk(result.requests, args.connections);
        throughput.push(result.rps);
    }
    Ok(throughput)
}

/// Load the Envoys `a` and `b` at the same time for `args.seconds` (one wrk each); their CPU
/// time per request, in µs.
fn measure_together(
    wrk: &Path,
    running: &mut [Running],
    (a, b): (usize, usize),
    args: &Args,
) -> Result<(f64, f64)> {
    let pids = [running[a].envoy.pid(), running[b].envoy.pid()];
    let before = [cpu_seconds(pids[0])?, cpu_seconds(pids[1])?];
    let (result_a, result_b) = std::thread::scope(|scope| {
        let (ra, rb) = (&running[a], &running[b]);
        let other = scope.spawn(move || run_wrk(wrk, rb, args.seconds, args));
        let first = run_wrk(wrk, ra, args.seconds, args);
        (first, other.join())
    });
    let result_b = result_b.map_err(|_| anyhow::anyhow!("the wrk thread panicked"))?;
    let (result_a, result_b) = (result_a?, result_b?);
    let after = [cpu_seconds(pids[0])?, cpu_seconds(pids[1])?];
    let mut per_request = [0.0; 2];
    for (k, (i, result)) in [(a, &result_a), (b, &result_b)].into_iter().enumerate() {
        running[i].served_wrk(result.requests, args.connections);
        per_request[k] = (after[k] - before[k]) * 1e6 / result.requests.max(1) as f64;
    }
    Ok((per_request[0], per_request[1]))
}

fn main() -> Result<()> {
    let args = Args::parse();
    fledge_e2e::init_tracing();
    let full = paths::filter_wasm()?;
    let modules = Modules {
        observer: full.with_file_name("fledge_observer.wasm"),
        empty: full.with_file_name("fledge_empty_filter.wasm"),
        floor: full.with_file_name("fledge_floor_filter.wasm"),
        floor_tagging: full.with_file_name("fledge_floor_tagging_filter.wasm"),
        native_floor: NativeAccessLog::built_floor()?,
        full,
    };
    let mut variants: Vec<Variant> = builtin_variants(&modules)
        .into_iter()
        .filter(|v| args.only.is_empty() || v.name == "empty" || args.only.contains(&v.name))
        .collect();
    if args.reads {
        variants.extend(read_ladder(&modules.floor));
    }
    for spec in &args.variants {
        variants.push(extra_variant(spec, &modules.full)?);
    }
    let names: Vec<&str> = variants.iter().map(|v| v.name.as_str()).collect();
    let pairs = pairs_to_compare(&args.paired, &variants)?;
    for (a, b) in &pairs {
        ensure!(
            names.contains(&a.as_str()) && names.contains(&b.as_str()),
            "--paired {a}:{b}: both must be variants of this run ({})",
            names.join(", ")
        );
    }
    for variant in &variants {
        if let Some(filter) = &variant.filter {
            ensure!(
                filter.wasm.is_file(),
                "{} missing; run make build-filter and cargo build -p fledge-empty-filter -p fledge-floor-filter -p fledge-floor-tagging-filter --target wasm32-wasip1 --release",
                filter.wasm.display()
            );
        }
    }
    let wrk = which("wrk").context("wrk not found; apt-get install -y wrk")?;
    let machine = machine_line();
    let placement = if args.no_pin {
        None
    } else {
        Placement::detect()
    };
    // The upstream and wrk are started by this process and inherit its CPUs.
    if let Some(placement) = &placement {
        placement.keep_off(std::process::id())?;
    }
    let dir = ScratchDir::temp("bench")?;
    let (upstream_port, _upstream) = start_upstream(dir.path())?;

    let mut running = Vec::new();
    for variant in variants {
        let envoy = answering_envoy(&variant, upstream_port, dir.path(), placement.as_ref())?;
        running.push(Running {
            variant,
            envoy,
            sent: 1,
            in_flight: 0,
        });
    }

    println!("{machine}");
    println!(
        "CPUs: {}",
        placement.as_ref().map_or_else(
            || "not pinned (--no-pin, one CPU, or no taskset)".to_string(),
            Placement::describe
        )
    );
    let load_before = load_average();
    let n = running.len();
    println!(
        "plan: {} rounds x {n} variants; CPU per request under closed-loop wrk -t{} -c{} {}s, each variant and the empty filter at the same time; latency open loop {}s; Envoy --concurrency 1, upstream = Envoy direct_response",
        args.rounds, args.threads, args.connections, args.seconds, args.latency_seconds
    );

    let empty_index = running
        .iter()
        .position(|r| r.variant.name == "empty")
        .context("the empty variant is required")?;
    // Per variant and round: its value, and the empty filter's, measured at the same time, so
    // the machine's drift cancels out of every ratio.
    let mut cpu_us = vec![Vec::new(); n];
    let mut cpu_ref = vec![Vec::new(); n];
    let mut throughput = vec![Vec::new(); n];
    for round in 0..args.rounds {
        if round > 0 && !args.same_envoys {
            restart_envoys(&mut running, placement.as_ref())?;
        }
        for (i, rps) in warm_up(&wrk, &mut running, &args)?.into_iter().enumerate() {
            throughput[i].push(rps);
        }
        let mut line = format!(
            "round {}/{} CPU µs/req variant/empty:",
            round + 1,
            args.rounds
        );
        let mut empties = Vec::new();
        for i in rotation(round, n, empty_index) {
            let (value, empty) = measure_together(&wrk, &mut running, (i, empty_index), &args)?;
            line.push_str(&format!(
                " {}={value:.1}/{empty:.1}",
                running[i].variant.name
            ));
            cpu_us[i].push(value);
            cpu_ref[i].push(empty);
            empties.push(empty);
        }
        let empty_mean = empties.iter().sum::<f64>() / empties.len().max(1) as f64;
        cpu_us[empty_index].push(empty_mean);
        cpu_ref[empty_index].push(empty_mean);
        println!("{line} (load {})", load_average());
    }
    let rate = if args.rate > 0 {
        args.rate
    } else {
        let slowest = throughput
            .iter()
            .map(|v| median(v))
            .fold(f64::INFINITY, f64::min);
        ((slowest / 4.0 / 100.0).floor() * 100.0).max(100.0) as u32
    };

    let mut p50 = vec![Vec::new(); n];
    let mut p99 = vec![Vec::new(); n];
    let mut p99_ref = vec![Vec::new(); n];
    // Per round: how far apart the empty filter's own p99s were (the noise floor of the verdict).
    let mut empty_p99_spread = Vec::new();
    let latency_rounds = if args.no_latency { 0 } else { args.rounds };
    for round in 0..latency_rounds {
        let mut line = format!(
            "round {}/{} latency at {rate}/s p50/p99 µs:",
            round + 1,
            args.rounds
        );
        let mut percentiles = Vec::new();
        let mut empty_p99 = Vec::new();
        let mut measure = |i: usize, line: &mut String| -> Result<f64> {
            let r = &mut running[i];
            let mut samples = open_loop(
                r.envoy.listener_port(),
                rate,
                Duration::from_secs(args.latency_seconds),
            )?;
            r.sent += samples.len() as u64;
            samples.sort_unstable_by(f64::total_cmp);
            let (a, b) = (percentile(&samples, 0.50), percentile(&samples, 0.99));
            percentiles.push((i, a));
            if i == empty_index {
                empty_p99.push(b);
            }
            line.push_str(&format!(" {}={a:.0}/{b:.0}", r.variant.name));
            Ok(b)
        };
        let bracketed = bracket(&schedule(round, n, empty_index), empty_index, |i| {
            measure(i, &mut line)
        })?;
        for (i, a) in percentiles {
            p50[i].push(a);
        }
        empty_p99_spread.push(max(&empty_p99) - min(&empty_p99));
        for (i, value, reference) in bracketed {
            p99[i].push(value);
            p99_ref[i].push(reference);
        }
        println!("{line}");
    }

    let none_index = running.iter().position(|r| r.variant.name == "none");
    // CPU(empty) ÷ CPU(variant), per round, against the empty filter measured around it.
    let vs_empty = |i: usize| -> Vec<f64> {
        cpu_ref[i]
            .iter()
            .zip(&cpu_us[i])
            .map(|(e, v)| e / v)
            .collect()
    };
    // CPU(none) ÷ CPU(variant), per round: both ratios to the empty filter of the same round.
    let vs_none = |none: usize, i: usize| -> Vec<f64> {
        vs_empty(i)
            .iter()
            .zip(vs_empty(none))
            .map(|(v, none)| v / none)
            .collect()
    };
    println!();
    println!(
        "== Envoy CPU per request (utime+stime ÷ requests served), medians of {} rounds [min..max of the per-round values]; \
         ÷ empty: against the empty filter loaded at the same time on the same CPU; +µs: CPU per request above it; req/s: alone ==",
        args.rounds
    );
    // CPU(variant) − CPU(empty) in µs per request, per round, against the same empty
    // measurements as the ratio.
    let added_us = |i: usize| -> Vec<f64> {
        cpu_us[i]
            .iter()
            .zip(&cpu_ref[i])
            .map(|(v, e)| v - e)
            .collect()
    };
    println!(
        "{:<14} {:>12}  {:>24}  {:>8}  {:>9}  {:>11}  {:>22}  what",
        "variant",
        "CPU µs/req",
        "÷ empty [min..max]",
        "+µs",
        "÷ none",
        "req/s",
        format!("p50/p99 µs at {rate}/s")
    );
    let index_of = |name: &str| running.iter().position(|r| r.variant.name == name);
    // A Fledge variant's floor ÷ empty (median), when its floor ran.
    let floor_vs_empty =
        |name: &str| -> Option<f64> { Some(median(&vs_empty(index_of(floor_of(name)?)?))) };
    let mut verdicts = Vec::new();
    for (i, r) in running.iter().enumerate() {
        let vs_empty = vs_empty(i);
        let vs_none = none_index.map(|none| median(&vs_none(none, i)));
        let target = target_vs_empty(&r.variant.name);
        let vs_empty_text = if i == empty_index {
            "1".to_string()
        } else {
            format!(
                "{:.3} [{:.3}..{:.3}]",
                median(&vs_empty),
                min(&vs_empty),
                max(&vs_empty)
            )
        };
        let latency = if p99[i].is_empty() {
            "-".to_string()
        } else {
            format!("{:.0}/{:.0}", median(&p50[i]), median(&p99[i]))
        };
        let added = if i == empty_index {
            "0".to_string()
        } else {
            format!("{:+.2}", median(&added_us(i)))
        };
        println!(
            "{:<14} {:>12.2}  {:>24}  {:>8}  {:>9}  {:>11.0}  {:>22}  {}",
            r.variant.name,
            median(&cpu_us[i]),
            vs_empty_text,
            added,
            vs_none.map_or("-".into(), |v| format!("{v:.3}")),
            median(&throughput[i]),
            latency,
            r.variant.about,
        );
        if let Some(target) = target {
            let value = median(&vs_empty);
            let floor = floor_vs_empty(&r.variant.name);
            verdicts.push(format!(
                "{} ÷ empty = {value:.3} (target >= {target}): {}{}",
                r.variant.name,
                if value >= target { "met" } else { "MISSED" },
                out_of_reach(value, target, floor),
            ));
        }
    }
    if args.reads {
        let names: Vec<&str> = running.iter().map(|r| r.variant.name.as_str()).collect();
        verdicts.extend(read_costs(&names, |i| median(&added_us(i))));
    }
    for (a, b) in &pairs {
        if let (Some(ia), Some(ib)) = (index_of(a), index_of(b)) {
            let diff = Paired::of(&added_us(ia), &added_us(ib));
            verdicts.push(format!(
                "paired {a} - {b} = {:+.2} µs per request [{:+.1}..{:+.1}] ({a} cheaper in {}/{} rounds)",
                diff.median, diff.min, diff.max, diff.cheaper, diff.rounds
            ));
        }
    }
    // Each Fledge module against the floor of its configuration's hostcalls, per round (both
    // against the same round's empty filter): how much of the gap to the empty filter is the
    // module's own, and how much any proxy-wasm filter doing the same work pays here.
    for (i, r) in running.iter().enumerate() {
        let Some(floor_name) = floor_of(&r.variant.name) else {
            continue;
        };
        let Some(floor) = index_of(floor_name) else {
            continue;
        };
        let vs_floor: Vec<f64> = vs_empty(i)
            .iter()
            .zip(vs_empty(floor))
            .map(|(v, f)| v / f)
            .collect();
        verdicts.push(format!(
            "{} ÷ {floor_name} = {:.3} [{:.3}..{:.3}] ({floor_name} ÷ empty = {:.3}: {})",
            r.variant.name,
            median(&vs_floor),
            min(&vs_floor),
            max(&vs_floor),
            median(&vs_empty(floor)),
            if floor_name == "floor" {
                "the reads every metrics filter makes"
            } else {
                "what any proxy-wasm filter making this configuration's hostcalls pays here"
            },
        ));
    }
    if !args.no_latency {
        // The same Envoy measured a few seconds apart differs this much: a difference below it
        // is noise, so the verdict then says the machine is too busy rather than met/MISSED.
        let noise = median(&empty_p99_spread);
        for (i, r) in running.iter().enumerate() {
            if !r.variant.fledge_metrics {
                continue;
            }
            let added: Vec<f64> = p99[i].iter().zip(&p99_ref[i]).map(|(v, e)| v - e).collect();
            let value = median(&added);
            verdicts.push(format!(
                "{} added p99 vs empty at {rate}/s = {value:+.0} µs [{:+.0}..{:+.0}] (target <= {TARGET_ADDED_P99_MICROS} µs): {}",
                r.variant.name,
                min(&added),
                max(&added),
                latency_verdict(value, noise)
            ));
        }
    }
    let mut modules: Vec<&Path> = running
        .iter()
        .filter_map(|r| r.variant.filter.as_ref().map(|f| f.wasm.as_path()))
        .collect();
    modules.sort_by_key(|path| file_name(path));
    modules.dedup_by_key(|path| file_name(path));
    for wasm in modules {
        let kib = file_kib(wasm);
        verdicts.push(format!(
            "{} = {kib:.1} KiB (target <= {TARGET_WASM_KIB} KiB): {}",
            file_name(wasm),
            if kib <= TARGET_WASM_KIB {
                "met"
            } else {
                "MISSED"
            }
        ));
    }
    println!();
    for verdict in &verdicts {
        println!("{verdict}");
    }
    // Wait for the filters' 1 s counter flush and Envoy's stats flush, then check the counts.
    std::thread::sleep(Duration::from_millis(2500));
    for r in &running {
        if r.variant.fledge_metrics {
            println!("{}", metrics_check(r)?);
        }
        if r.variant.native_access_log.is_some() {
            println!("{}", native_floor_check(r)?);
        }
    }
    println!(
        "load average before {load_before}, after {} (other work on this machine shares the cores)",
        load_average()
    );
    Ok(())
}

/// `--reads`: what each step of the floor's read ladder adds, from the medians of +µs.
/// `names` are the variants in measurement order; `added(i)` is variant i's median +µs.
fn read_costs(names: &[&str], added: impl Fn(usize) -> f64) -> Vec<String> {
    let index = |name: &str| names.iter().position(|n| *n == name);
    let steps = [
        (
            "floor-0",
            "empty",
            "on_log only instead of the SDK's 7 callbacks",
        ),
        ("floor-1", "floor-0", "1st read (xds.cluster_name)"),
        ("floor-2", "floor-1", "2nd read (response.code)"),
        ("floor-3", "floor-2", "3rd read (response.code_details)"),
        ("floor", "floor-3", "4th read (request.duration)"),
        (
            "floor+calls",
            "floor",
            "2 clock reads + 1 absent header (no value returned)",
        ),
    ];
    steps
        .iter()
        .filter_map(|(to, from, what)| {
            let to_value = added(index(to)?);
            let from_value = added(index(from)?);
            Some(format!(
                "read cost: {what}: {:+.2} µs per request ({to} {to_value:+.2} vs {from} {from_value:+.2})",
                to_value - from_value
            ))
        })
        .collect()
}

fn start_envoy(variant: &Variant, upstream_port: u16, dir: &Path) -> Result<Envoy> {
    // The same forced-canary route and 90/10 everywhere; the sticky pick from the filter's
    // bucket (`header_name`), or, for a native route, from Envoy's own hash of the user key,
    // with the subset header added by the route.
    let mut options = EnvoyOptions::new(upstream_port, upstream_port)
        .with_header_route_to_canary(
            contract::DEFAULT_ROUTE_HEADER,
            contract::FORCED_CANARY_ROUTE_VALUE,
        )
        .in_dir(&dir.join(&variant.name));
    if let Some(forced) = &variant.forced_canary_filter {
        options = options.with_forced_canary_routes(forced.clone(), "x-fledge-stage");
    }
    // Unsalted, as `tagging`'s `sticky` (the filter's default salt is empty); a salt adds a
    // `regex_rewrite` of the key per request.
    options = if variant.native_route {
        options
            .with_native_sticky(USER_HEADER, "")
            .with_native_subset_header("x-fledge-subset")
    } else {
        options.with_weighted_header_name(contract::DEFAULT_ROUTE_HEADER)
    };
    if variant.cluster_header {
        options = options.with_cluster_header(CLUSTER_HEADER);
    }
    options.initial_weights = RouteWeights::canary_percent(10);
    options.log_level = "warn".into();
    if let Some(filter) = &variant.filter {
        options = options.with_filter(filter.clone());
    }
    options.native_access_log = variant.native_access_log.clone();
    Envoy::start(options).with_context(|| format!("starting variant {}", variant.name))
}

/// `native-floor`'s counts against the requests sent to it. It publishes when a request comes
/// a second after its last publication: one more request (not counted yet) publishes the rest.
fn native_floor_check(r: &Running) -> Result<String> {
    expect_200(&r.variant.name, &r.envoy)?;
    let counted = r.envoy.counter_sum("fledge_native_floor_requests_total.")?;
    let (low, high) = (r.sent, r.sent + r.in_flight);
    ensure!(
        (low..=high).contains(&counted),
        "{}: the native access logger counted {counted} requests; sent {} (plus up to {} left in flight)",
        r.variant.name,
        r.sent,
        r.in_flight
    );
    Ok(format!(
        "metrics check {}: fledge_native_floor_requests_total {counted}, requests answered {} (+ up to {} in flight when wrk stopped): met",
        r.variant.name, r.sent, r.in_flight
    ))
}

/// The variant's `fledge_requests_total` against the requests sent to it.
fn metrics_check(r: &Running) -> Result<String> {
    let text = r.envoy.stats_prometheus()?;
    let counted: f64 = text
        .lines()
        .filter(|l| l.starts_with(&format!("{}{{", contract::REQUESTS_TOTAL)))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum();
    let duration_count: f64 = text
        .lines()
        .filter(|l| l.starts_with(&format!("{}_count{{", contract::REQUEST_DURATION_MS)))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum();
    // At least every request wrk saw answered, at most those plus the ones it left in flight.
    let (low, high) = (r.sent as f64, (r.sent + r.in_flight) as f64);
    ensure!(
        (low..=high).contains(&counted) && (low..=high).contains(&duration_count),
        "{}: the filter counted {counted} requests and {duration_count} durations; sent {} (plus up to {} left in flight)",
        r.variant.name,
        r.sent,
        r.in_flight
    );
    Ok(format!(
        "metrics check {}: fledge_requests_total {counted:.0}, {}_count {duration_count:.0}, requests answered {} (+ up to {} in flight when wrk stopped): met",
        r.variant.name,
        contract::REQUEST_DURATION_MS,
        r.sent,
        r.in_flight
    ))
}

struct WrkResult {
    rps: f64,
    requests: u64,
}

fn run_wrk(wrk: &Path, r: &Running, seconds: u64, args: &Args) -> Result<WrkResult> {
    let output = Command::new(wrk)
        .arg(format!("-t{}", args.threads))
        .arg(format!("-c{}", args.connections))
        .arg(format!("-d{seconds}s"))
        .arg("-H")
        .arg(format!("{USER_HEADER}: bench-user-42"))
        .arg(format!("{}/", r.envoy.listener_url()))
        .output()
        .context("running wrk")?;
    let text = String::from_utf8_lossy(&output.stdout).to_string();
    let rps = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .with_context(|| format!("no Requests/sec in wrk output:\n{text}"))?;
    let requests = text
        .lines()
        .find(|l| l.contains(" requests in "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .with_context(|| format!("no request count in wrk output:\n{text}"))?;
    if text.contains("Non-2xx") || text.contains("Socket errors") {
        bail!("{}: errors under load:\n{text}", r.variant.name);
    }
    Ok(WrkResult { rps, requests })
}

/// Send GET / at `rate` req/s for `duration` over 4 keep-alive connections; latencies in µs.
fn open_loop(port: u16, rate: u32, duration: Duration) -> Result<Vec<f64>> {
    const CONNECTIONS: u32 = 4;
    let interval = Duration::from_secs_f64(f64::from(CONNECTIONS) / f64::from(rate));
    let start = Instant::now() + Duration::from_millis(50);
    let handles: Vec<_> = (0..CONNECTIONS)
        .map(|c| {
            std::thread::spawn(move || -> Result<Vec<f64>> {
                let mut stream = TcpStream::connect(("127.0.0.1", port))?;
                stream.set_nodelay(true)?;
                stream.set_read_timeout(Some(Duration::from_secs(5)))?;
                let request = format!(
                    "GET / HTTP/1.1\r\nhost: bench\r\n{USER_HEADER}: bench-user-{c}\r\n\r\n"
                );
                let mut buffer = vec![0u8; 4096];
                let mut samples = Vec::new();
                // Stagger the connections evenly over one interval.
                let offset = interval.mul_f64(f64::from(c) / f64::from(CONNECTIONS));
                let mut k = 0u32;
                let mut previous_done = start;
                loop {
                    let due = start + offset + interval * k;
                    if due >= start + duration {
                        break;
                    }
                    let now = Instant::now();
                    if due > now {
                        std::thread::sleep(due - now);
                    }
                    let sent = Instant::now();
                    stream.write_all(request.as_bytes())?;
                    read_response(&mut stream, &mut buffer)?;
                    let done = Instant::now();
                    // Queueing the server caused counts; our own wake-up jitter does not.
                    let from = if previous_done > due { due } else { sent };
                    samples.push(done.duration_since(from).as_secs_f64() * 1e6);
                    previous_done = done;
                    k += 1;
                }
                Ok(samples)
            })
        })
        .collect();
    let mut all = Vec::new();
    for handle in handles {
        match handle.join() {
            Ok(samples) => all.extend(samples?),
            Err(_) => bail!("latency thread panicked"),
        }
    }
    Ok(all)
}

/// Read one HTTP/1.1 response with a `content-length` body.
fn read_response(stream: &mut TcpStream, buffer: &mut [u8]) -> Result<()> {
    let mut filled = 0;
    loop {
        let n = stream.read(&mut buffer[filled..])?;
        if n == 0 {
            bail!("connection closed");
        }
        filled += n;
        let data = &buffer[..filled];
        if let Some(end) = find(data, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&data[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if filled >= end + 4 + length {
                return Ok(());
            }
        }
        if filled == buffer.len() {
            bail!("response larger than {} bytes", buffer.len());
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn http_get_once(port: u16) -> Result<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(b"GET / HTTP/1.1\r\nhost: bench\r\nconnection: close\r\n\r\n")?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    Ok(text)
}

/// An Envoy answering every request with `200 ok` itself (fast, no Wasm).
fn start_upstream(dir: &Path) -> Result<(u16, Proc)> {
    let (port, admin) = (free_port()?, free_port()?);
    let bootstrap = json!({
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {"listeners": [{
            "name": "upstream",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                    "stat_prefix": "upstream",
                    "generate_request_id": false,
                    "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [{
                        "match": {"prefix": "/"},
                        "direct_response": {"status": 200, "body": {"inline_string": "ok"}}
                    }]}]},
                    "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]
                }
            }]}]
        }]}
    });
    let path = dir.join("upstream.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&bootstrap)?)?;
    let mut command = Command::new(paths::envoy_binary()?);
    command
        .arg("-c")
        .arg(&path)
        .arg("--concurrency")
        .arg("1")
        .arg("--disable-hot-restart")
        .arg("-l")
        .arg("warn");
    let proc = Proc::spawn("upstream envoy", command, &dir.join("upstream.log"))?;
    wait_until("upstream Envoy to listen", Duration::from_secs(30), || {
        Ok(port_accepts(port).then_some(()))
    })?;
    Ok((port, proc))
}

/// utime + stime of a process, in seconds.
#[allow(unsafe_code)] // sysconf(3)
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the ")" that ends the command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> f64 { fields.get(i).and_then(|v| v.parse().ok()).unwrap_or(0.0) };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok((ticks(11) + ticks(12)) / hz.max(1.0))
}

fn machine_line() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let envoy = paths::envoy_binary()
        .ok()
        .and_then(|p| Command::new(p).arg("--version").output().ok())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    // Field 19 of /proc/self/stat: the niceness the Envoys and wrk inherit (`make bench-filter`
    // asks for -10 where allowed, so other work on a shared machine preempts them less).
    let nice = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|stat| {
            let rest = stat.rsplit_once(')').map(|(_, r)| r.to_string())?;
            rest.split_whitespace().nth(16).map(str::to_string)
        })
        .unwrap_or_else(|| "?".into());
    format!("machine: nproc={cores}, CPU: {cpu}; nice {nice}; {envoy}")
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|t| t.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|path| path.is_file())
    })
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn file_kib(path: &Path) -> f64 {
    std::fs::metadata(path)
        .map(|m| m.len() as f64 / 1024.0)
        .unwrap_or(0.0)
}

/// The added-p99 verdict; `noise` is the median spread of the empty filter's own p99 within a
/// round.
fn latency_verdict(added: f64, noise: f64) -> String {
    if noise > TARGET_ADDED_P99_MICROS {
        format!(
            "NOT MEASURABLE here: the empty filter's own p99 varied by {noise:.0} µs within a round \
             (median); run on an idle machine"
        )
    } else if added <= TARGET_ADDED_P99_MICROS {
        "met".into()
    } else {
        "MISSED".into()
    }
}

/// One round's order: the empty filter first, last and between every two other variants, whose
/// order rotates from round to round (E, A, E, B, E, C, E).
/// The variants other than the empty filter, in the order of round `round` (rotated by one
/// each round).
fn rotation(round: usize, n: usize, empty_index: usize) -> Vec<usize> {
    let others: Vec<usize> = (0..n).filter(|i| *i != empty_index).collect();
    (0..others.len())
        .filter_map(|k| others.get((k + round) % others.len()).copied())
        .collect()
}

/// The latency phase's order: the empty filter first, last and between every two others.
fn schedule(round: usize, n: usize, empty_index: usize) -> Vec<usize> {
    let mut order = vec![empty_index];
    for i in rotation(round, n, empty_index) {
        order.push(i);
        order.push(empty_index);
    }
    order
}

/// Measure every entry of `order` once; return per variant (value, reference): the reference is
/// the mean of the empty filter's measurements right before and after it. The empty filter's
/// own row is the mean of its measurements, against itself.
fn bracket(
    order: &[usize],
    empty_index: usize,
    mut measure: impl FnMut(usize) -> Result<f64>,
) -> Result<Vec<(usize, f64, f64)>> {
    let values = order
        .iter()
        .map(|i| measure(*i))
        .collect::<Result<Vec<f64>>>()?;
    let empties: Vec<f64> = order
        .iter()
        .zip(&values)
        .filter(|(i, _)| **i == empty_index)
        .map(|(_, v)| *v)
        .collect();
    let empty_mean = empties.iter().sum::<f64>() / empties.len().max(1) as f64;
    let mut out = vec![(empty_index, empty_mean, empty_mean)];
    for (k, i) in order.iter().enumerate() {
        if *i == empty_index {
            continue;
        }
        let neighbour = |k: Option<usize>| k.and_then(|k| values.get(k)).copied();
        let around: Vec<f64> = [neighbour(k.checked_sub(1)), neighbour(k.checked_add(1))]
            .into_iter()
            .flatten()
            .collect();
        let reference = around.iter().sum::<f64>() / around.len().max(1) as f64;
        if let Some(value) = values.get(k) {
            out.push((*i, *value, reference));
        }
    }
    Ok(out)
}

/// `--paired` as (A, B), plus each Fledge variant against `observer` when it runs.
fn pairs_to_compare(specs: &[String], variants: &[Variant]) -> Result<Vec<(String, String)>> {
    let mut pairs = Vec::new();
    let runs = |name: &str| variants.iter().any(|v| v.name == name);
    if runs("observer") {
        for v in variants {
            if v.fledge_metrics && v.name != "observer" {
                pairs.push((v.name.clone(), "observer".to_string()));
            }
        }
    }
    // What the route naming the cluster saves: each `-named` variant against its base.
    for v in variants {
        if let Some(base) = v.name.strip_suffix("-named").filter(|base| runs(base)) {
            let pair = (v.name.clone(), base.to_string());
            if !pairs.contains(&pair) {
                pairs.push(pair);
            }
        }
    }
    for spec in specs {
        let (a, b) = spec
            .split_once(':')
            .with_context(|| format!("--paired wants A:B, got {spec}"))?;
        let pair = (a.to_string(), b.to_string());
        if !pairs.contains(&pair) {
            pairs.push(pair);
        }
    }
    Ok(pairs)
}

/// Two variants compared round by round: per-round differences of their CPU per request above
/// the empty filter measured around each.
#[derive(Debug, PartialEq)]
struct Paired {
    median: f64,
    min: f64,
    max: f64,
    /// Rounds where the first variant cost less than the second.
    cheaper: usize,
    rounds: usize,
}

impl Paired {
    fn of(a: &[f64], b: &[f64]) -> Paired {
        let diffs: Vec<f64> = a.iter().zip(b).map(|(a, b)| a - b).collect();
        Paired {
            median: median(&diffs),
            min: min(&diffs),
            max: max(&diffs),
            cheaper: diffs.iter().filter(|d| **d < 0.0).count(),
            rounds: diffs.len(),
        }
    }
}

/// `q`-quantile of sorted samples (nearest rank).
fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_is_judged_only_above_the_noise() {
        assert_eq!(latency_verdict(20.0, 30.0), "met");
        assert_eq!(latency_verdict(80.0, 30.0), "MISSED");
        assert!(latency_verdict(-4000.0, 9000.0).starts_with("NOT MEASURABLE"));
    }

    #[test]
    fn a_variant_whose_json_lost_its_quotes_is_refused() {
        let full = Path::new("/m/full.wasm");
        let good = extra_variant(r#"g@/m/x.wasm={"clusters": {}}"#, full).unwrap();
        assert_eq!(good.name, "g");
        // What a shell leaves of `{"clusters": {}}` passed through make unquoted.
        let Err(error) = extra_variant("g={clusters: {}}", full) else {
            panic!("accepted a configuration that is not JSON");
        };
        let error = error.to_string();
        assert!(
            error.contains("not JSON") && error.contains("quote it"),
            "{error}"
        );
        // Other modules' configurations need not be JSON (the floor's read lists).
        assert!(extra_variant("r@/m/floor.wasm=xds.cluster_name,now", full).is_ok());
    }

    #[test]
    fn a_target_above_its_floor_is_called_out_of_reach() {
        assert!(out_of_reach(0.84, 0.93, Some(0.87)).contains("measured 0.870"));
        // The floor reaches the target: the module's own cost is the gap, no excuse printed.
        assert_eq!(out_of_reach(0.90, 0.93, Some(0.95)), "");
        assert_eq!(out_of_reach(0.95, 0.93, Some(0.87)), "");
        assert_eq!(out_of_reach(0.84, 0.93, None), "");
    }

    #[test]
    fn each_fledge_variant_has_a_floor_doing_its_hostcalls() {
        let modules = Modules {
            full: "/m/full.wasm".into(),
            observer: "/m/observer.wasm".into(),
            empty: "/m/empty.wasm".into(),
            floor: "/m/floor.wasm".into(),
            floor_tagging: "/m/floor-tagging.wasm".into(),
            native_floor: NativeAccessLog {
                dir: "/m".into(),
                name: "native".into(),
            },
        };
        let variants = builtin_variants(&modules);
        for variant in variants.iter().filter(|v| v.fledge_metrics) {
            let floor = floor_of(&variant.name).expect("a floor");
            let floor = variants.iter().find(|v| v.name == floor).expect("built in");
            assert!(floor.filter.is_some() && !floor.fledge_metrics);
        }
        let config = |name: &str| {
            let variant = variants.iter().find(|v| v.name == name).expect(name);
            variant
                .filter
                .as_ref()
                .expect("a filter")
                .plugin_config
                .clone()
        };
        // The floors make the metrics' four reads and the configuration's request work.
        assert!(config("floor-tagging").starts_with(FLOOR_READS));
        assert!(config("floor-tagging").contains("sticky"));
        assert!(config("floor-guard").contains("req:x-fledge-guard"));
        // A floor runs on its variant's route.
        for variant in variants.iter().filter(|v| v.fledge_metrics) {
            let floor = floor_of(&variant.name).expect("a floor");
            let floor = variants.iter().find(|v| v.name == floor).expect("built in");
            assert_eq!(floor.native_route, variant.native_route, "{}", variant.name);
            assert_eq!(
                floor.cluster_header, variant.cluster_header,
                "{}",
                variant.name
            );
            // A variant reading the cluster from the route's header has a floor doing so.
            let reads_header = config(&variant.name).contains("clusterHeader");
            assert_eq!(variant.cluster_header, reads_header, "{}", variant.name);
            assert_eq!(
                config(&floor.name).contains("pairs:x-fledge-cluster"),
                reads_header,
                "{}",
                variant.name
            );
            assert_eq!(
                floor.forced_canary_filter.is_some(),
                variant.forced_canary_filter.is_some(),
                "{}",
                variant.name
            );
        }
        assert!(!config("tagging-native").contains("sticky"));
    }

    #[test]
    fn read_costs_are_the_steps_of_the_ladder() {
        let names = ["empty", "floor", "floor-0", "floor-1", "floor-3"];
        let added = [0.0, 4.0, -1.5, 1.0, 2.5];
        let costs = read_costs(&names, |i| added[i]);
        // floor-2 was not measured: the steps from and to it are left out.
        assert_eq!(costs.len(), 3, "{costs:?}");
        assert!(costs[0].contains("-1.50 µs"), "{}", costs[0]);
        assert!(costs[1].starts_with("read cost: 1st read"), "{}", costs[1]);
        assert!(costs[1].contains("+2.50 µs"), "{}", costs[1]);
        assert!(costs[2].starts_with("read cost: 4th read"), "{}", costs[2]);
        assert!(costs[2].contains("+1.50 µs"), "{}", costs[2]);
    }

    #[test]
    fn paired_differences_are_taken_round_by_round() {
        // Round noise moves both variants together: a is 1 µs dearer than b in every round but
        // one, although b's median (3.0) is above a's (2.5) when the medians mix rounds.
        let a = [1.0, 2.0, 3.0, 9.0];
        let b = [0.0, 1.0, 5.0, 8.0];
        assert_eq!(
            Paired::of(&a, &b),
            Paired {
                median: 1.0,
                min: -2.0,
                max: 1.0,
                cheaper: 1,
                rounds: 4
            }
        );
        assert_eq!(Paired::of(&[], &[]).rounds, 0);
    }

    #[test]
    fn fledge_variants_are_paired_with_the_observer() {
        let variant = |name: &str, fledge_metrics| Variant::new(name, "", None, fledge_metrics);
        let variants = [
            variant("empty", false),
            variant("observer", true),
            variant("guard", true),
            variant("x", false),
        ];
        let asked = ["x:guard".to_string(), "guard:observer".to_string()];
        let pairs = pairs_to_compare(&asked, &variants).unwrap();
        assert_eq!(
            pairs,
            [
                ("guard".to_string(), "observer".to_string()),
                ("x".to_string(), "guard".to_string())
            ]
        );
        assert!(pairs_to_compare(&["x-guard".to_string()], &variants).is_err());
        assert!(pairs_to_compare(&[], &variants[2..]).unwrap().is_empty());
        // A `-named` variant is also paired with its base, when that runs.
        let variants = [
            variant("observer", true),
            variant("guard", true),
            variant("guard-named", true),
            variant("floor-named", false),
        ];
        let pairs = pairs_to_compare(&[], &variants).unwrap();
        assert!(pairs.contains(&("guard-named".to_string(), "guard".to_string())));
        assert!(!pairs.iter().any(|(a, _)| a == "floor-named"));
    }

    #[test]
    fn each_round_measures_every_other_variant_once_in_rotated_order() {
        assert_eq!(rotation(0, 4, 2), [0, 1, 3]);
        assert_eq!(rotation(1, 4, 2), [1, 3, 0]);
        assert_eq!(rotation(3, 4, 2), [0, 1, 3]);
        assert!(rotation(2, 1, 0).is_empty());
    }

    #[test]
    fn every_latency_round_brackets_each_variant_with_the_empty_filter() {
        // Variants 0..4, the empty filter is 2; the others rotate from round to round.
        assert_eq!(schedule(0, 4, 2), [2, 0, 2, 1, 2, 3, 2]);
        assert_eq!(schedule(1, 4, 2), [2, 1, 2, 3, 2, 0, 2]);
        assert_eq!(schedule(3, 4, 2), [2, 0, 2, 1, 2, 3, 2]);
        assert_eq!(schedule(5, 1, 0), [0]);
    }

    #[test]
    fn each_variant_is_compared_with_the_empty_filter_around_it() {
        // The machine drifts: the empty filter (1) costs 10, 12, 14 in turn; variants 0 and 2
        // cost 12 and 14, each 1.0 above the mean of the empty filter right around it.
        let order = [1, 0, 1, 2, 1];
        let values = [10.0, 12.0, 12.0, 14.0, 14.0];
        let mut next = values.iter();
        let got = bracket(&order, 1, |_| Ok(*next.next().unwrap())).unwrap();
        assert_eq!(got, [(1, 12.0, 12.0), (0, 12.0, 11.0), (2, 14.0, 13.0)]);
        let failing = bracket(&order, 1, |i| {
            if i == 2 {
                bail!("wrk failed")
            } else {
                Ok(1.0)
            }
        });
        assert!(failing.is_err());
    }
}
