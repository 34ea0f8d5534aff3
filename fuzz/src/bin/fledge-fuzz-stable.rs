//! `fledge-fuzz-stable` — bounded mutation fuzzing of the same targets on the stable toolchain.
//!
//! libFuzzer (`cargo fuzz`) needs a nightly compiler for its sanitizer and coverage flags. This
//! runner needs nothing: for each target it starts from the seed corpus (`seeds/<target>/`),
//! mutates inputs with byte-level edits and target-specific dictionary tokens (seeded, so a run
//! is reproducible), runs the target under `catch_unwind`, and keeps an input in its pool when
//! it produced an outcome signature not seen before (which error, which fields were set) — a
//! poor man's feedback in place of coverage.
//!
//! Every panic is a finding: the input is written to `artifacts/<target>/crash-<hash>` and the
//! run exits non-zero at the end. So is running out of memory: the global allocator refuses
//! to hold more than `--memory-limit-mb` (default 2048, like libFuzzer's `-rss_limit_mb`) at
//! once; the input that asked for more is written to `artifacts/<target>/oom-input` before the
//! process aborts. Replay one with `--replay <file> --target <name>`.
//!
//! ```text
//! fledge-fuzz-stable [--target NAME|all] [--seconds N] [--max-runs N] [--seed N]
//!                    [--seeds DIR] [--artifacts DIR] [--replay FILE] [--memory-limit-mb N]
//! ```

use anyhow::{bail, Context, Result};
use fledge_fuzz::{Target, TARGETS};
use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Bytes the process may hold at once (see [`MemoryLimit`]).
static MEMORY_LIMIT: AtomicUsize = AtomicUsize::new(2048 << 20);
static ALLOCATED: AtomicUsize = AtomicUsize::new(0);
/// The input being run (pointer and length), saved to [`OOM_FILE`] when memory runs out.
static CURRENT_INPUT: AtomicPtr<u8> = AtomicPtr::new(std::ptr::null_mut());
static CURRENT_LEN: AtomicUsize = AtomicUsize::new(0);
static OOM_FILE: Mutex<Option<File>> = Mutex::new(None);

/// The system allocator with a cap on live bytes. Over the cap it saves the current input
/// (with calls that do not allocate: a pre-opened file, `pwrite`, `ftruncate`) and returns
/// null, which makes Rust abort with "memory allocation of N bytes failed".
struct MemoryLimit;

impl MemoryLimit {
    fn reserve(size: usize) -> bool {
        let before = ALLOCATED.fetch_add(size, Ordering::Relaxed);
        if before.saturating_add(size) <= MEMORY_LIMIT.load(Ordering::Relaxed) {
            return true;
        }
        ALLOCATED.fetch_sub(size, Ordering::Relaxed);
        save_current_input();
        false
    }
}

fn save_current_input() {
    let pointer = CURRENT_INPUT.load(Ordering::Relaxed);
    let len = CURRENT_LEN.load(Ordering::Relaxed);
    if pointer.is_null() {
        return;
    }
    // SAFETY: the runner publishes a live input buffer for exactly the duration of a run.
    let input = unsafe { std::slice::from_raw_parts(pointer, len) };
    if let Ok(guard) = OOM_FILE.try_lock() {
        if let Some(file) = guard.as_ref() {
            let _ = file.set_len(0);
            let _ = file.write_all_at(input, 0);
        }
    }
}

// SAFETY: every call forwards to `System` with the same layout; only the byte count is tracked.
unsafe impl GlobalAlloc for MemoryLimit {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !Self::reserve(layout.size()) {
            return std::ptr::null_mut();
        }
        let pointer = System.alloc(layout);
        if pointer.is_null() {
            ALLOCATED.fetch_sub(layout.size(), Ordering::Relaxed);
        }
        pointer
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !Self::reserve(layout.size()) {
            return std::ptr::null_mut();
        }
        let pointer = System.alloc_zeroed(layout);
        if pointer.is_null() {
            ALLOCATED.fetch_sub(layout.size(), Ordering::Relaxed);
        }
        pointer
    }

    unsafe fn dealloc(&self, pointer: *mut u8, layout: Layout) {
        System.dealloc(pointer, layout);
        ALLOCATED.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, pointer: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let old_size = layout.size();
        if new_size > old_size && !Self::reserve(new_size - old_size) {
            return std::ptr::null_mut();
        }
        let new_pointer = System.realloc(pointer, layout, new_size);
        if new_pointer.is_null() {
            if new_size > old_size {
                ALLOCATED.fetch_sub(new_size - old_size, Ordering::Relaxed);
            }
        } else if new_size < old_size {
            ALLOCATED.fetch_sub(old_size - new_size, Ordering::Relaxed);
        }
        new_pointer
    }
}

#[global_allocator]
static GLOBAL: MemoryLimit = MemoryLimit;

/// Largest input the mutator produces.
const MAX_INPUT: usize = 16 * 1024;
/// Inputs kept in the pool per target.
const MAX_POOL: usize = 4096;

struct Options {
    targets: Vec<(&'static str, Target)>,
    seconds: u64,
    max_runs: u64,
    seed: u64,
    seeds: PathBuf,
    artifacts: PathBuf,
    replay: Option<PathBuf>,
    memory_limit_mb: usize,
}

fn parse_args() -> Result<Options> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut options = Options {
        targets: TARGETS.to_vec(),
        seconds: 60,
        max_runs: u64::MAX,
        seed: 1,
        seeds: root.join("seeds"),
        artifacts: root.join("artifacts"),
        replay: None,
        memory_limit_mb: 2048,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--target" => {
                let name = value()?;
                if name != "all" {
                    options.targets = TARGETS
                        .iter()
                        .copied()
                        .filter(|(n, _)| *n == name)
                        .collect();
                    if options.targets.is_empty() {
                        let names: Vec<&str> = TARGETS.iter().map(|(n, _)| *n).collect();
                        bail!("unknown target {name:?}; targets are {names:?} or all");
                    }
                }
            }
            "--seconds" => options.seconds = value()?.parse().context("--seconds")?,
            "--max-runs" => options.max_runs = value()?.parse().context("--max-runs")?,
            "--seed" => options.seed = value()?.parse().context("--seed")?,
            "--seeds" => options.seeds = PathBuf::from(value()?),
            "--artifacts" => options.artifacts = PathBuf::from(value()?),
            "--replay" => options.replay = Some(PathBuf::from(value()?)),
            "--memory-limit-mb" => {
                options.memory_limit_mb = value()?.parse().context("--memory-limit-mb")?
            }
            "-h" | "--help" => {
                println!("usage: fledge-fuzz-stable [--target NAME|all] [--seconds N] [--max-runs N] [--seed N] [--seeds DIR] [--artifacts DIR] [--replay FILE] [--memory-limit-mb N]");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    Ok(options)
}

/// xorshift64*: small, fast, reproducible.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        items.get(self.below(items.len()))
    }
}

/// Tokens worth splicing into inputs of one target.
fn dictionary(target: &str) -> Vec<&'static str> {
    const COMMON: &[&str] = &[
        "\"",
        "\\",
        "{",
        "}",
        "[",
        "]",
        ",",
        ":",
        "\n",
        "\r\n",
        " ",
        "\t",
        "null",
        "true",
        "false",
        "0",
        "-1",
        "1e309",
        "-0",
        "18446744073709551616",
        "4294967296",
        "NaN",
        "+Inf",
        "-Inf",
        "\u{0}",
        "\u{fffd}",
        "é",
        "\u{200b}",
        "💥",
    ];
    let specific: &[&str] = match target {
        "filter_config" => &[
            "{\"clusters\": {\"a\": {\"service\": \"app\", \"subset\": \"canary\"}}}",
            "\"clusters\"",
            "\"service\"",
            "\"subset\"",
            "\"istioClusterNames\"",
            "\"endpointMetadata\"",
            "\"subsetHeader\"",
            "\"responseHeader\"",
            "\"routeHeader\"",
            "\"clearRouteCache\"",
            "\"forceCanary\"",
            "\"header\"",
            "\"value\"",
            "\"secret\"",
            "\"sourceCidrs\"",
            "\"maxTokenLifetimeSeconds\"",
            "\"sticky\"",
            "\"cookie\"",
            "\"salt\"",
            "\"buckets\"",
            "\"guard\"",
            "\"services\"",
            "\"canary\"",
            "\"maxErrorRatio\"",
            "\"minRequests\"",
            "\"windowSeconds\"",
            "\"rearmSeconds\"",
            "\"10.0.0.0/8\"",
            "\"::1/128\"",
            "\"0.0.0.0/0\"",
            "\"fe80::/129\"",
            "\"x-fledge-route\"",
            "\"0123456789abcdef0123456789abcdef\"",
            "outbound|80|canary|app.default.svc.cluster.local",
            "a;b;c;v2;d",
            "0.5",
            "1.5",
            "20",
            "0",
            "-3",
        ],
        "prometheus_text" => &[
            "# TYPE ",
            "# HELP ",
            " counter",
            " gauge",
            " histogram",
            " summary",
            " untyped",
            "fledge_requests_total",
            "_bucket",
            "_sum",
            "_count",
            "{",
            "}",
            "=\"",
            "\",",
            "le=\"+Inf\"",
            "fledge_service=\"app\"",
            "fledge_subset=\"canary\"",
            "fledge_class=\"5xx\"",
            "\\n",
            "\\\"",
            "\\\\",
            "\\x",
            " 1700000000000",
            " 1.5e3",
            " -9223372036854775809",
            ":",
            "envoy_server_uptime{} 7",
        ],
        "canary_spec" => &[
            "\n---\n",
            "apiVersion: fledge.dev/v1alpha1\n",
            "kind: Canary\n",
            "metadata: {name: app}\n",
            "spec:\n",
            "  analysis:\n",
            "    interval: ",
            "30s",
            "0s",
            "1ms",
            "999999999h",
            "-5s",
            "1.5m",
            "threshold: ",
            "failureLimit: ",
            "unchecked: true",
            "errorStatuses: [5xx, 4xx]",
            "setWeight: 0.2",
            "setWeight: -5",
            "thresholdRange: {above: 90, below: 100}",
            "objective: 0.8",
            "minCanaryRequests: ",
            "startingStep: ",
            "metricsFailureLimit: ",
            "steps: [{setWeight: 20}, {pause: {}}]",
            "stepWeight: ",
            "maxWeight: ",
            "stepWeights: [5, 20, 50]",
            "setWeight: 255",
            "pause: {duration: 1s}",
            "metrics: [{name: request-success-rate, thresholdRange: {min: 99}}]",
            "{name: request-duration, quantile: 0.99, thresholdRange: {max: 500}}",
            "{name: x, query: 'sum({{ service }})', thresholdRange: {max: 1}}",
            "{{ interval }}",
            "{{ nope }}",
            "compareWithStable: {}",
            "falseRollbackRate: ",
            "tolerance: ",
            "signals: [errors, latency]",
            "latencyBoundariesMs: [250, 500]",
            "promotionMargin: ",
            "sloBurnRate: {objective: 99.9}",
            "maxBurnRate: ",
            "longWindow: ",
            "shortWindow: ",
            "guard: {maxErrorRatio: 0.5}",
            "minRequests: ",
            "window: ",
            "checkInterval: ",
            "webhooks: [{name: a, type: rollout, url: 'http://x'}]",
            "type: confirm-promotion",
            "timeout: ",
            "envoyAdmin: {urls: ['http://127.0.0.1:9901']}",
            "prometheus: {address: 'http://p:9090'}",
            "istio: {virtualService: app, route: primary}",
            "&a ",
            "*a",
            "!!binary ",
            "~",
            ".nan",
            ".inf",
            "-.inf",
            "0x10",
            "1e400",
            "'",
            "|\n",
            "? ",
            "- ",
        ],
        _ => &[],
    };
    specific.iter().chain(COMMON).copied().collect()
}

fn mutate(input: &mut Vec<u8>, pool: &[Vec<u8>], tokens: &[&str], rng: &mut Rng) {
    let edits = 1 + rng.below(6);
    for _ in 0..edits {
        let len = input.len();
        match rng.below(10) {
            0 if len > 0 => {
                let at = rng.below(len);
                if let Some(byte) = input.get_mut(at) {
                    *byte ^= 1 << rng.below(8);
                }
            }
            1 if len > 0 => {
                let at = rng.below(len);
                if let Some(byte) = input.get_mut(at) {
                    *byte = rng.next() as u8;
                }
            }
            2 | 3 => {
                let token = rng.pick(tokens).copied().unwrap_or("\"");
                let at = rng.below(len + 1);
                input.splice(at..at, token.bytes());
            }
            4 if len > 0 => {
                let start = rng.below(len);
                let end = (start + 1 + rng.below(16)).min(len);
                input.drain(start..end);
            }
            5 if len > 0 => {
                let start = rng.below(len);
                let end = (start + 1 + rng.below(64)).min(len);
                let chunk: Vec<u8> = input.get(start..end).unwrap_or_default().to_vec();
                let at = rng.below(len + 1);
                input.splice(at..at, chunk);
            }
            6 => {
                if let Some(other) = rng.pick(pool) {
                    let from = rng.below(other.len() + 1);
                    let to = (from + rng.below(256)).min(other.len());
                    let at = rng.below(len + 1);
                    let cut = (at + rng.below(64)).min(len);
                    input.splice(
                        at..cut,
                        other.get(from..to).unwrap_or_default().iter().copied(),
                    );
                }
            }
            7 if len > 0 => {
                // Replace the token at a random position (up to a delimiter) with a dictionary one.
                let start = rng.below(len);
                let end = input
                    .iter()
                    .skip(start)
                    .position(|b| b" ,:{}[]\n\"".contains(b))
                    .map_or(len, |p| start + p);
                let token = rng.pick(tokens).copied().unwrap_or("0");
                input.splice(start..end, token.bytes());
            }
            8 if len > 0 => input.truncate(rng.below(len)),
            _ => {
                let at = rng.below(len + 1);
                let byte = rng.next() as u8;
                input.insert(at.min(input.len()), byte);
            }
        }
        input.truncate(MAX_INPUT);
    }
}

fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Run one input; `Err(message)` if it panicked.
fn run_one(target: Target, data: &[u8]) -> Result<u64, String> {
    CURRENT_LEN.store(data.len(), Ordering::Relaxed);
    CURRENT_INPUT.store(data.as_ptr().cast_mut(), Ordering::Relaxed);
    let outcome = std::panic::catch_unwind(|| target(data));
    CURRENT_INPUT.store(std::ptr::null_mut(), Ordering::Relaxed);
    outcome.map_err(|payload| {
        payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panic with a non-string payload".to_string())
    })
}

struct Summary {
    runs: u64,
    outcomes: usize,
    pool: usize,
    crashes: Vec<PathBuf>,
    elapsed: Duration,
}

fn fuzz_target(name: &str, target: Target, options: &Options, seed: u64) -> Result<Summary> {
    let seed_dir = options.seeds.join(name);
    let mut pool: Vec<Vec<u8>> = Vec::new();
    for entry in std::fs::read_dir(&seed_dir)
        .with_context(|| format!("reading seeds {}", seed_dir.display()))?
    {
        pool.push(std::fs::read(entry?.path())?);
    }
    pool.push(Vec::new());
    let seeds = pool.len().min(MAX_POOL / 2);
    let dir = options.artifacts.join(name);
    std::fs::create_dir_all(&dir)?;
    let oom_path = dir.join("oom-input");
    let oom_file =
        File::create(&oom_path).with_context(|| format!("creating {}", oom_path.display()))?;
    if let Ok(mut slot) = OOM_FILE.lock() {
        *slot = Some(oom_file);
    }
    let tokens = dictionary(name);
    let mut rng = Rng::new(seed ^ fnv(name.as_bytes()));
    let mut seen: HashSet<u64> = HashSet::new();
    let mut crashes = Vec::new();
    let mut crash_messages: HashSet<String> = HashSet::new();
    let started = Instant::now();
    let deadline = Duration::from_secs(options.seconds);
    let mut runs = 0u64;
    for input in pool.clone() {
        if let Ok(signature) = run_one(target, &input) {
            seen.insert(signature);
        }
    }
    while runs < options.max_runs && started.elapsed() < deadline {
        let mut input = rng.pick(&pool).cloned().unwrap_or_default();
        mutate(&mut input, &pool, &tokens, &mut rng);
        runs += 1;
        match run_one(target, &input) {
            Ok(signature) => {
                if seen.insert(signature) {
                    if pool.len() < MAX_POOL {
                        pool.push(input);
                    } else {
                        // Full: a new outcome replaces a random input (seeds stay).
                        let slot = seeds + rng.below(MAX_POOL - seeds);
                        if let Some(old) = pool.get_mut(slot) {
                            *old = input;
                        }
                    }
                }
            }
            Err(message) => {
                let path = dir.join(format!("crash-{:016x}", fnv(&input)));
                std::fs::write(&path, &input)?;
                if crash_messages.insert(message.lines().next().unwrap_or("").to_string()) {
                    eprintln!("{name}: CRASH ({}): {message}", path.display());
                }
                crashes.push(path);
            }
        }
    }
    Ok(Summary {
        runs,
        outcomes: seen.len(),
        pool: pool.len(),
        crashes,
        elapsed: started.elapsed(),
    })
    .inspect(|_| {
        // No out-of-memory input: remove the empty placeholder.
        if let Ok(mut slot) = OOM_FILE.lock() {
            *slot = None;
        }
        let _ = std::fs::remove_file(&oom_path);
    })
}

fn main() -> Result<()> {
    let options = parse_args()?;
    MEMORY_LIMIT.store(options.memory_limit_mb << 20, Ordering::Relaxed);
    // Panics are reported by the runner, once per distinct message.
    std::panic::set_hook(Box::new(|_| {}));
    if let Some(path) = &options.replay {
        let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let _ = std::panic::take_hook();
        for (name, target) in &options.targets {
            println!("{name}: replaying {}", path.display());
            target(&data);
            println!("{name}: no panic");
        }
        return Ok(());
    }
    let mut failed = false;
    for (index, (name, target)) in options.targets.iter().enumerate() {
        let summary = fuzz_target(name, *target, &options, options.seed + index as u64)?;
        println!(
            "fuzz {name}: {} runs in {:.1}s ({:.0}/s), {} distinct outcomes, pool {}, {} crashing inputs",
            summary.runs,
            summary.elapsed.as_secs_f64(),
            summary.runs as f64 / summary.elapsed.as_secs_f64().max(1e-9),
            summary.outcomes,
            summary.pool,
            summary.crashes.len()
        );
        failed |= !summary.crashes.is_empty();
    }
    if failed {
        bail!(
            "crashes found; inputs are under {}",
            options.artifacts.display()
        );
    }
    Ok(())
}
