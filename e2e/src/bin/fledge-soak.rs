//! `fledge-soak` — the Fledge filter under sustained load: Envoy's memory stays flat and no
//! request is dropped or altered (`make soak`).
//!
//! Two Envoys with the same bootstrap, one with the filter and one without, proxy to the same
//! two backends (stable `v1`, canary `v2`) through the same weighted route. The route's pick
//! comes from a client header (`weighted_clusters.header_name`), so one request goes to the same
//! backend through either Envoy. Workers send every request of one deterministic sequence to
//! both Envoys — GETs and POSTs with bodies, statuses 200–503, bodies from 0 bytes to 256 KiB,
//! long and many headers — to the backends' `/__backend/echo`, whose answer depends only on
//! the request it received (method, path, headers, body hash). The two answers must be equal:
//! same status, byte-identical body. Every request must get an answer.
//!
//! Memory: the resident set (`VmRSS` of `/proc/<pid>/status`) of both Envoys is sampled every
//! `--sample-secs`. After `--warmup-secs`, the samples are split in thirds: the filter Envoy's
//! last-third median must be within `--max-growth-percent` (default 10%) of its first-third
//! median. The filter's own request counters must also add up to the requests sent. The
//! filter runs with a guard whose ceiling this traffic never reaches (so its per-request and
//! per-tick work is soaked too) and it must not trip.
//!
//! Exits non-zero when a criterion fails. Every process is on 127.0.0.1 and stopped at the end;
//! the load is bounded by `--duration-secs` and `--rps`.

#![forbid(unsafe_code)]

use anyhow::{bail, Context, Result};
use clap::Parser;
use fledge_core::contract;
use fledge_e2e::envoy::{CANARY_CLUSTER, STABLE_CLUSTER};
use fledge_e2e::{
    init_tracing, Backend, BackendOptions, Envoy, EnvoyOptions, RouteWeights, WasmFilter,
};
use serde_json::json;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Parser)]
#[command(
    name = "fledge-soak",
    about = "Soak the Fledge filter: flat memory, nothing dropped or altered"
)]
struct Args {
    /// How long the load runs.
    #[arg(long, default_value_t = 180)]
    duration_secs: u64,
    /// Request pairs per second (each pair is one request to each Envoy).
    #[arg(long, default_value_t = 150)]
    rps: u32,
    /// Concurrent workers (each with keep-alive connections to both Envoys).
    #[arg(long, default_value_t = 6)]
    workers: usize,
    /// Envoy worker threads.
    #[arg(long, default_value_t = 2)]
    concurrency: u32,
    /// Memory samples before this are not judged (VM warm-up, connection pools, stats).
    #[arg(long, default_value_t = 30)]
    warmup_secs: u64,
    #[arg(long, default_value_t = 2)]
    sample_secs: u64,
    /// Largest allowed growth of the last-third median RSS over the first-third median.
    #[arg(long, default_value_t = 10.0)]
    max_growth_percent: f64,
}

/// Header the route's weighted pick reads (`value mod 100`, stable listed first).
const PICK_HEADER: &str = "x-soak-pick";

/// One request of the sequence, a pure function of its number.
#[derive(Debug, Clone)]
struct Request {
    post: bool,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn request(k: u64) -> Request {
    let r = mix(k);
    const STATUSES: [u16; 10] = [200, 200, 200, 200, 201, 204, 302, 404, 500, 503];
    let status = STATUSES[(r % STATUSES.len() as u64) as usize];
    let bytes = match (r >> 8) % 100 {
        0 => 256 * 1024,
        1..=5 => 32 * 1024,
        6..=30 => 1024 + (r >> 16) % 4096,
        31..=40 => 0,
        _ => (r >> 16) % 512,
    };
    // Envoy answers 204 without a body; the backend's must be empty too.
    let bytes = if status == 204 { 0 } else { bytes };
    let post = (r >> 24).is_multiple_of(10);
    let mut headers = vec![(PICK_HEADER.to_string(), ((r >> 32) % 100).to_string())];
    match (r >> 40) % 50 {
        0 => headers.push(("x-soak-long".into(), "v".repeat(8 * 1024))),
        1 => headers.extend((0..40).map(|i| (format!("x-soak-many-{i}"), format!("value-{i}")))),
        2 => headers.push(("x-soak-odd".into(), " spaced\tvalue ;=,\"quoted\" ".into())),
        3 => headers.push(("cookie".into(), "session=abc; theme=dark".into())),
        _ => {}
    }
    let body = if post {
        (0..(r >> 48) % 20_000).map(|i| mix(k ^ i) as u8).collect()
    } else {
        Vec::new()
    };
    Request {
        post,
        path: format!("/__backend/echo?status={status}&bytes={bytes}&seed={k}"),
        headers,
        body,
    }
}

/// Keep-alive, statuses as responses, redirects not followed (a 302 is compared as is).
fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .http_status_as_error(false)
        .max_redirects(0)
        .build()
        .into()
}

/// Status and body, or why no response came.
fn send(agent: &ureq::Agent, base: &str, request: &Request) -> Result<(u16, Vec<u8>), String> {
    let url = format!("{base}{}", request.path);
    let response = if request.post {
        let mut builder = agent.post(&url);
        for (name, value) in &request.headers {
            builder = builder.header(name, value);
        }
        builder.send(&request.body[..])
    } else {
        let mut builder = agent.get(&url);
        for (name, value) in &request.headers {
            builder = builder.header(name, value);
        }
        builder.call()
    };
    let mut response = response.map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let body = response
        .body_mut()
        .with_config()
        .limit(16 << 20)
        .read_to_vec()
        .map_err(|e| format!("reading body: {e}"))?;
    Ok((status, body))
}

#[derive(Debug, Default)]
struct Tally {
    pairs: u64,
    identical: u64,
    status_mismatches: u64,
    body_mismatches: u64,
    /// Requests without a response, per side (filter, plain).
    failed_with_filter: u64,
    failed_without_filter: u64,
    by_status: std::collections::BTreeMap<u16, u64>,
    first_problems: Vec<String>,
}

impl Tally {
    fn problem(&mut self, text: String) {
        if self.first_problems.len() < 10 {
            self.first_problems.push(text);
        }
    }
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

fn median(values: &[u64]) -> u64 {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    sorted.get(sorted.len() / 2).copied().unwrap_or(0)
}

/// First-third and last-third medians of the samples after warm-up.
fn thirds(samples: &[(f64, u64)], warmup: f64) -> Option<(u64, u64, usize)> {
    let judged: Vec<u64> = samples
        .iter()
        .filter(|(t, _)| *t >= warmup)
        .map(|(_, rss)| *rss)
        .collect();
    if judged.len() < 6 {
        return None;
    }
    let third = judged.len() / 3;
    let first = judged.get(..third)?;
    let last = judged.get(judged.len() - third..)?;
    Some((median(first), median(last), judged.len()))
}

fn filter_requests_recorded(envoy: &Envoy) -> Result<u64> {
    let text = envoy.stats_prometheus()?;
    Ok(
        fledge_e2e::http::prometheus_samples(&text, contract::REQUESTS_TOTAL)
            .iter()
            .map(|s| s.value as u64)
            .sum(),
    )
}

fn main() -> Result<()> {
    init_tracing();
    let args = Args::parse();
    if args.rps == 0 || args.workers == 0 || args.duration_secs == 0 {
        bail!("--rps, --workers and --duration-secs must be above 0");
    }
    let stable = Backend::start("v1", BackendOptions::default())?;
    let canary = Backend::start("v2", BackendOptions::default())?;
    let plugin_config = json!({
        "clusters": {
            STABLE_CLUSTER: {"service": "app", "subset": "stable"},
            CANARY_CLUSTER: {"service": "app", "subset": "canary"},
        },
        "responseHeader": "x-fledge-subset",
        // The guard runs (counting, shared-window merges every 100 ms, header stripping) with
        // a ceiling this traffic (20% 5xx by design) never reaches: a trip would rightly
        // change routing, which this comparison would report as altered responses.
        "guard": {"services": {"app": {"maxErrorRatio": 0.95, "minRequests": 100}}},
    })
    .to_string();
    let options = |filter: Option<WasmFilter>| {
        let mut options =
            EnvoyOptions::new(stable.port(), canary.port()).with_weighted_header_name(PICK_HEADER);
        options.initial_weights = RouteWeights::canary_percent(50);
        options.concurrency = args.concurrency;
        options.log_level = "warning".into();
        options.filter = filter;
        options
    };
    let with_filter = Envoy::start(options(Some(WasmFilter::built(&plugin_config)?)))?;
    let without_filter = Envoy::start(options(None))?;
    println!(
        "soak: {} s at {} request pairs/s, {} workers; Envoy with filter pid {}, without pid {}",
        args.duration_secs,
        args.rps,
        args.workers,
        with_filter.pid(),
        without_filter.pid()
    );

    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.duration_secs);
    let total = u64::from(args.rps) * args.duration_secs;
    let interval = Duration::from_secs_f64(1.0 / f64::from(args.rps));
    let next = Arc::new(AtomicU64::new(0));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let bases = (with_filter.listener_url(), without_filter.listener_url());
    let mut workers = Vec::new();
    for worker in 0..args.workers {
        let (next, tally, stop, bases) = (
            Arc::clone(&next),
            Arc::clone(&tally),
            Arc::clone(&stop),
            bases.clone(),
        );
        workers.push(
            std::thread::Builder::new()
                .name(format!("soak-{worker}"))
                .spawn(move || {
                    let (filtered, plain) = (agent(), agent());
                    loop {
                        let k = next.fetch_add(1, Ordering::Relaxed);
                        let due = started + interval.mul_f64(k as f64);
                        if k >= total || due >= deadline || stop.load(Ordering::Relaxed) {
                            return;
                        }
                        if let Some(wait) = due.checked_duration_since(Instant::now()) {
                            std::thread::sleep(wait);
                        }
                        let request = request(k);
                        let a = send(&filtered, &bases.0, &request);
                        let b = send(&plain, &bases.1, &request);
                        let mut t = match tally.lock() {
                            Ok(t) => t,
                            Err(poisoned) => poisoned.into_inner(),
                        };
                        t.pairs += 1;
                        match (a, b) {
                            (Ok((sa, ba)), Ok((sb, bb))) => {
                                *t.by_status.entry(sa).or_default() += 1;
                                if sa != sb {
                                    t.status_mismatches += 1;
                                    t.problem(format!(
                                        "request {k}: status {sa} with filter, {sb} without"
                                    ));
                                } else if ba != bb {
                                    t.body_mismatches += 1;
                                    t.problem(format!(
                                        "request {k}: bodies differ ({} vs {} bytes)",
                                        ba.len(),
                                        bb.len()
                                    ));
                                } else {
                                    t.identical += 1;
                                }
                            }
                            (a, b) => {
                                if let Err(e) = &a {
                                    t.failed_with_filter += 1;
                                    t.problem(format!("request {k} with filter: {e}"));
                                }
                                if let Err(e) = &b {
                                    t.failed_without_filter += 1;
                                    t.problem(format!("request {k} without filter: {e}"));
                                }
                            }
                        }
                    }
                })
                .context("starting a worker")?,
        );
    }

    let mut samples_filter: Vec<(f64, u64)> = Vec::new();
    let mut samples_plain: Vec<(f64, u64)> = Vec::new();
    let mut last_print = Instant::now();
    while Instant::now() < deadline && !workers.iter().all(|w| w.is_finished()) {
        let t = started.elapsed().as_secs_f64();
        if let (Some(a), Some(b)) = (rss_kib(with_filter.pid()), rss_kib(without_filter.pid())) {
            samples_filter.push((t, a));
            samples_plain.push((t, b));
        }
        if last_print.elapsed() >= Duration::from_secs(30) {
            last_print = Instant::now();
            let pairs = tally.lock().map(|t| t.pairs).unwrap_or(0);
            println!(
                "  t={t:>5.0}s pairs={pairs} rss with filter {} KiB, without {} KiB",
                samples_filter.last().map_or(0, |s| s.1),
                samples_plain.last().map_or(0, |s| s.1)
            );
        }
        std::thread::sleep(Duration::from_secs(args.sample_secs));
    }
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        let _ = worker.join();
    }
    let elapsed = started.elapsed();
    // Stats reach /stats/prometheus within a flush (1 s).
    std::thread::sleep(Duration::from_millis(2500));
    let recorded = filter_requests_recorded(&with_filter)?;
    let guard_tripped = fledge_e2e::http::prometheus_samples(
        &with_filter.stats_prometheus()?,
        contract::GUARD_TRIPPED,
    )
    .iter()
    .any(|s| s.value > 0.0);

    let tally = match Arc::try_unwrap(tally) {
        Ok(mutex) => mutex.into_inner().unwrap_or_else(|p| p.into_inner()),
        Err(_) => bail!("a worker is still running"),
    };
    let warmup = args.warmup_secs as f64;
    let memory = thirds(&samples_filter, warmup);
    let memory_plain = thirds(&samples_plain, warmup);
    let sent_with_filter = tally.pairs;
    println!("soak summary ({:.0} s):", elapsed.as_secs_f64());
    println!(
        "  requests: {} pairs, {} identical (status and body), {} status mismatches, {} body mismatches",
        tally.pairs, tally.identical, tally.status_mismatches, tally.body_mismatches
    );
    println!(
        "  no response: {} with filter, {} without",
        tally.failed_with_filter, tally.failed_without_filter
    );
    println!("  statuses (with filter): {:?}", tally.by_status);
    println!(
        "  filter counted {recorded} requests in fledge_requests_total; {sent_with_filter} were sent"
    );
    for problem in &tally.first_problems {
        println!("  problem: {problem}");
    }
    let mut failures = Vec::new();
    match (memory, memory_plain) {
        (Some((first, last, n)), Some((plain_first, plain_last, _))) => {
            let growth = 100.0 * (last as f64 - first as f64) / first.max(1) as f64;
            let plain_growth =
                100.0 * (plain_last as f64 - plain_first as f64) / plain_first.max(1) as f64;
            println!(
                "  memory (VmRSS, {n} samples after {warmup:.0} s warm-up): with filter first-third median {first} KiB, last-third median {last} KiB ({growth:+.1}%); without filter {plain_first} → {plain_last} KiB ({plain_growth:+.1}%)"
            );
            println!(
                "  memory criterion: last-third median within {:.0}% of first-third median → {}",
                args.max_growth_percent,
                if growth <= args.max_growth_percent {
                    "flat"
                } else {
                    "GROWING"
                }
            );
            if growth > args.max_growth_percent {
                failures.push(format!("Envoy with the filter grew {growth:.1}%"));
            }
        }
        _ => failures.push("too few memory samples after warm-up; run longer".to_string()),
    }
    if tally.identical != tally.pairs {
        failures.push(format!(
            "{} of {} request pairs differed or failed",
            tally.pairs - tally.identical,
            tally.pairs
        ));
    }
    if recorded != sent_with_filter {
        failures.push(format!(
            "the filter recorded {recorded} requests, {sent_with_filter} were sent"
        ));
    }
    if guard_tripped {
        failures.push("the guard tripped (it must not at this error rate)".to_string());
    }
    if tally.pairs == 0 {
        failures.push("no requests were sent".to_string());
    }
    drop(with_filter);
    drop(without_filter);
    drop(stable);
    drop(canary);
    if failures.is_empty() {
        println!("soak: PASS");
        Ok(())
    } else {
        bail!("soak: FAIL: {}", failures.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sequence_is_deterministic_and_varied() {
        let a: Vec<String> = (0..500).map(|k| request(k).path).collect();
        let b: Vec<String> = (0..500).map(|k| request(k).path).collect();
        assert_eq!(a, b);
        assert!((0..500).any(|k| request(k).post));
        assert!((0..500).any(|k| request(k).headers.len() > 10));
        assert!(a.iter().any(|p| p.contains("status=503")));
        assert!(a.iter().any(|p| p.contains("bytes=0&")));
    }

    #[test]
    fn thirds_skip_warmup() {
        let samples: Vec<(f64, u64)> = (0..30)
            .map(|i| (i as f64, if i < 10 { 1 } else { 100 }))
            .collect();
        assert_eq!(thirds(&samples, 10.0), Some((100, 100, 20)));
        assert_eq!(thirds(&samples[..3], 0.0), None);
    }
}
