//! `fledge-bench-filter` — what the Fledge filter costs Envoy, measured side by side (`make
//! bench-filter`).
//!
//! One run starts a fast upstream (an Envoy answering `200 ok` with `direct_response`) and three
//! Envoys with the same configuration except the HTTP filter: none, an empty Rust proxy-wasm
//! filter (`fledge-empty-filter`, the Wasm dispatch floor), and the Fledge filter with a
//! realistic configuration (sticky header, response subset header, forced-canary token check,
//! route header, metrics). All use `--concurrency 1` on loopback. Rounds alternate the three
//! (order rotated each round) so drift on a shared machine hits all of them alike:
//!
//! 1. throughput: closed loop, `wrk -t2 -c16` for `--seconds` per config per round; plus the
//!    Envoy process's CPU time per request from `/proc/<pid>/stat`;
//! 2. latency: open loop at a fixed rate below the knee (`--rate`, default a quarter of the
//!    slowest config's median throughput) from this process over 4 keep-alive connections.
//!    A request's latency is counted from its scheduled time when the connection was still busy
//!    with the previous one (queueing the server caused), else from when it was sent.
//!
//! Prints medians over rounds with their spread, the ratios Fledge ÷ none and Fledge ÷ empty
//! (per round, then the median), p50/p99 per config, the p99 Fledge adds over the empty filter,
//! the `.wasm` sizes and the machine.

use anyhow::{bail, Context, Result};
use clap::Parser;
use fledge_core::contract;
use fledge_e2e::envoy::{CANARY_CLUSTER, STABLE_CLUSTER};
use fledge_e2e::process::{free_port, port_accepts, wait_until, Proc, ScratchDir};
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
    about = "Envoy with no filter vs an empty Wasm filter vs the Fledge filter"
)]
struct Args {
    /// Rounds; each measures every config once, in rotated order.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Seconds per closed-loop throughput measurement.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Seconds per fixed-rate latency measurement.
    #[arg(long, default_value_t = 10)]
    latency_seconds: u64,
    /// Fixed request rate for latency (req/s); 0 = a quarter of the slowest median throughput.
    #[arg(long, default_value_t = 0)]
    rate: u32,
    /// wrk connections and threads.
    #[arg(long, default_value_t = 16)]
    connections: u32,
    #[arg(long, default_value_t = 2)]
    threads: u32,
    /// Extra Fledge-filter configs measured alongside, as NAME=JSON (e.g. to see what one
    /// feature costs): `--variant observe='{"clusters":{...}}'`; `NAME@/path/x.wasm=JSON` uses
    /// another build of the filter.
    #[arg(long = "variant")]
    variants: Vec<String>,
    /// Skip the fixed-rate latency phase.
    #[arg(long)]
    no_latency: bool,
}

const USER_HEADER: &str = "x-user-id";
const SECRET: &str = "bench-secret-0123456789abcdef";

struct Config {
    name: &'static str,
    envoy: Envoy,
}

fn main() -> Result<()> {
    let args = Args::parse();
    fledge_e2e::init_tracing();
    let wasm = paths::filter_wasm()?;
    let empty_wasm = wasm.with_file_name("fledge_empty_filter.wasm");
    if !empty_wasm.is_file() {
        bail!(
            "{} missing; run cargo build -p fledge-empty-filter --target wasm32-wasip1 --release",
            empty_wasm.display()
        );
    }
    let wrk = which("wrk").context("wrk not found; apt-get install -y wrk")?;
    let dir = ScratchDir::temp("bench")?;
    let (upstream_port, _upstream) = start_upstream(dir.path())?;

    let fledge_config = json!({
        "clusters": {
            STABLE_CLUSTER: {"service": "app", "subset": "stable"},
            CANARY_CLUSTER: {"service": "app", "subset": "canary"},
        },
        "sticky": {"header": USER_HEADER},
        "responseHeader": "x-fledge-subset",
        "forceCanary": {"secret": SECRET},
    })
    .to_string();
    let variants: [(&'static str, Option<WasmFilter>); 3] = [
        ("none", None),
        (
            "empty",
            Some(WasmFilter {
                wasm: empty_wasm.clone(),
                plugin_config: String::new(),
            }),
        ),
        (
            "fledge",
            Some(WasmFilter {
                wasm: wasm.clone(),
                plugin_config: fledge_config,
            }),
        ),
    ];
    let mut configs = Vec::new();
    for (name, filter) in variants {
        // Identical routes everywhere (forced-canary route, sticky header_name, 90/10).
        let mut options = EnvoyOptions::new(upstream_port, upstream_port)
            .with_header_route_to_canary(
                contract::DEFAULT_ROUTE_HEADER,
                contract::FORCED_CANARY_ROUTE_VALUE,
            )
            .with_weighted_header_name(contract::DEFAULT_ROUTE_HEADER)
            .in_dir(&dir.path().join(name));
        options.initial_weights = RouteWeights::canary_percent(10);
        options.log_level = "warn".into();
        if let Some(filter) = filter {
            options = options.with_filter(filter);
        }
        configs.push(Config {
            name,
            envoy: Envoy::start(options)?,
        });
    }
    for variant in &args.variants {
        let (name, config) = variant
            .split_once('=')
            .context("--variant wants NAME=JSON")?;
        // NAME@/path/to/other.wasm compares another build of the filter.
        let (name, variant_wasm) = match name.split_once('@') {
            Some((name, path)) => (name, PathBuf::from(path)),
            None => (name, wasm.clone()),
        };
        let name: &'static str = Box::leak(name.to_string().into_boxed_str());
        let mut options = EnvoyOptions::new(upstream_port, upstream_port)
            .with_header_route_to_canary(
                contract::DEFAULT_ROUTE_HEADER,
                contract::FORCED_CANARY_ROUTE_VALUE,
            )
            .with_weighted_header_name(contract::DEFAULT_ROUTE_HEADER)
            .in_dir(&dir.path().join(name))
            .with_filter(WasmFilter {
                wasm: variant_wasm,
                plugin_config: config.to_string(),
            });
        options.initial_weights = RouteWeights::canary_percent(10);
        options.log_level = "warn".into();
        configs.push(Config {
            name,
            envoy: Envoy::start(options)?,
        });
    }
    for config in &configs {
        let reply = http_get_once(config.envoy.listener_port())?;
        if !reply.starts_with("HTTP/1.1 200") {
            bail!("{} does not answer 200: {reply}", config.name);
        }
    }

    println!("{}", machine_line());
    let load_before = load_average();
    println!(
        "plan: {} rounds x 3 configs; throughput wrk -t{} -c{} {}s; latency open loop {}s; Envoy --concurrency 1, upstream = Envoy direct_response",
        args.rounds, args.threads, args.connections, args.seconds, args.latency_seconds
    );
    // Warm up every Envoy (VM start, connection pools).
    for config in &configs {
        run_wrk(&wrk, config, 2, &args)?;
    }

    let n = configs.len();
    let mut throughput = vec![Vec::new(); n];
    let mut cpu_us = vec![Vec::new(); n];
    for round in 0..args.rounds {
        let mut line = format!("round {}/{} throughput:", round + 1, args.rounds);
        for k in 0..n {
            let i = (k + round) % n;
            let before = cpu_seconds(configs[i].envoy.pid())?;
            let result = run_wrk(&wrk, &configs[i], args.seconds, &args)?;
            let after = cpu_seconds(configs[i].envoy.pid())?;
            throughput[i].push(result.rps);
            cpu_us[i].push((after - before) * 1e6 / result.requests.max(1) as f64);
            line.push_str(&format!(" {}={:.0}", configs[i].name, result.rps));
        }
        println!("{line}");
    }
    let medians: Vec<f64> = throughput.iter().map(|v| median(v)).collect();
    let rate = if args.rate > 0 {
        args.rate
    } else {
        let slowest = medians.iter().copied().fold(f64::INFINITY, f64::min);
        ((slowest / 4.0 / 100.0).floor() * 100.0).max(100.0) as u32
    };

    let mut p50 = vec![Vec::new(); n];
    let mut p99 = vec![Vec::new(); n];
    let mut p999 = vec![Vec::new(); n];
    let latency_rounds = if args.no_latency { 0 } else { args.rounds };
    for round in 0..latency_rounds {
        let mut line = format!(
            "round {}/{} latency at {rate}/s p50/p99 µs:",
            round + 1,
            args.rounds
        );
        for k in 0..n {
            let i = (k + round) % n;
            let mut samples = open_loop(
                configs[i].envoy.listener_port(),
                rate,
                Duration::from_secs(args.latency_seconds),
            )?;
            samples.sort_unstable_by(f64::total_cmp);
            p50[i].push(percentile(&samples, 0.50));
            p99[i].push(percentile(&samples, 0.99));
            p999[i].push(percentile(&samples, 0.999));
            line.push_str(&format!(
                " {}={:.0}/{:.0}",
                configs[i].name,
                percentile(&samples, 0.50),
                percentile(&samples, 0.99)
            ));
        }
        println!("{line}");
    }

    // Report.
    let (none, empty, fledge) = (0, 1, 2);
    let per_round = |a: usize, b: usize| -> Vec<f64> {
        throughput[a]
            .iter()
            .zip(&throughput[b])
            .map(|(x, y)| x / y)
            .collect()
    };
    let fledge_none = per_round(fledge, none);
    let fledge_empty = per_round(fledge, empty);
    let empty_none = per_round(empty, none);
    println!();
    println!(
        "== results (median over {} rounds, [min..max]) ==",
        args.rounds
    );
    for i in 0..n {
        println!(
            "{:<7} throughput {:>7.0} req/s [{:.0}..{:.0}]  Envoy CPU {:>5.1} µs/req  latency at {rate}/s: p50 {:>4.0} µs  p99 {:>5.0} µs [{:.0}..{:.0}]  p99.9 {:>5.0} µs",
            configs[i].name,
            medians[i],
            min(&throughput[i]),
            max(&throughput[i]),
            median(&cpu_us[i]),
            median(&p50[i]),
            median(&p99[i]),
            min(&p99[i]),
            max(&p99[i]),
            median(&p999[i]),
        );
    }
    println!(
        "throughput fledge/none  = {:.3} [{:.3}..{:.3}]",
        median(&fledge_none),
        min(&fledge_none),
        max(&fledge_none)
    );
    println!(
        "throughput fledge/empty = {:.3} [{:.3}..{:.3}]   (target >= 0.97)",
        median(&fledge_empty),
        min(&fledge_empty),
        max(&fledge_empty)
    );
    println!(
        "throughput empty/none   = {:.3} [{:.3}..{:.3}]   (the Wasm dispatch floor)",
        median(&empty_none),
        min(&empty_none),
        max(&empty_none)
    );
    let added_p99: Vec<f64> = p99[fledge]
        .iter()
        .zip(&p99[empty])
        .map(|(f, e)| f - e)
        .collect();
    let added_p50: Vec<f64> = p50[fledge]
        .iter()
        .zip(&p50[empty])
        .map(|(f, e)| f - e)
        .collect();
    println!(
        "added latency fledge vs empty at {rate}/s: p50 {:+.0} µs, p99 {:+.0} µs [{:+.0}..{:+.0}]   (target p99 <= 50 µs)",
        median(&added_p50),
        median(&added_p99),
        min(&added_p99),
        max(&added_p99)
    );
    println!(
        "Envoy CPU per request: fledge - empty = {:+.2} µs, empty - none = {:+.2} µs",
        median(&cpu_us[fledge]) - median(&cpu_us[empty]),
        median(&cpu_us[empty]) - median(&cpu_us[none]),
    );
    println!(
        "wasm: fledge_filter.wasm {:.1} KiB (target <= 300 KiB), fledge_empty_filter.wasm {:.1} KiB",
        file_kib(&wasm),
        file_kib(&empty_wasm)
    );
    println!(
        "load average before {load_before}, after {} (other work on this machine shares the cores)",
        load_average()
    );
    Ok(())
}

struct WrkResult {
    rps: f64,
    requests: u64,
}

fn run_wrk(wrk: &Path, config: &Config, seconds: u64, args: &Args) -> Result<WrkResult> {
    let output = Command::new(wrk)
        .arg(format!("-t{}", args.threads))
        .arg(format!("-c{}", args.connections))
        .arg(format!("-d{seconds}s"))
        .arg("-H")
        .arg(format!("{USER_HEADER}: bench-user-42"))
        .arg(format!("{}/", config.envoy.listener_url()))
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
        bail!("{}: errors under load:\n{text}", config.name);
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
    format!("machine: nproc={cores}, CPU: {cpu}; {envoy}")
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

fn file_kib(path: &Path) -> f64 {
    std::fs::metadata(path)
        .map(|m| m.len() as f64 / 1024.0)
        .unwrap_or(0.0)
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

fn min(values: &[f64]) -> f64 {
    values.iter().copied().fold(f64::INFINITY, f64::min)
}

fn max(values: &[f64]) -> f64 {
    values.iter().copied().fold(f64::NEG_INFINITY, f64::max)
}

/// `q`-quantile of sorted samples (nearest rank).
fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}
