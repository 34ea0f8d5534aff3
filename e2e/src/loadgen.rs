//! Bounded, fixed-rate HTTP load with live counters.
//!
//! Request `k` is scheduled at `start + k / rps` (an open-loop schedule) and taken by the next
//! free worker; each worker keeps its connection alive. With enough workers the rate holds even
//! when a backend is slow; when all workers are busy the schedule falls behind and catches up.
//! Load ends at the first of: `duration` elapsed, `max_requests` sent, [`LoadGen::stop`] or drop.

use anyhow::{bail, Result};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The response header that names the backend version.
pub const VERSION_HEADER: &str = "x-backend-version";

/// How much load, for how long.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Requests per second (all workers together).
    pub rps: u32,
    /// Concurrent keep-alive connections.
    pub workers: usize,
    /// Upper bound on how long the load runs.
    pub duration: Duration,
    /// Upper bound on how many requests are sent.
    pub max_requests: u64,
    /// Per-request timeout.
    pub request_timeout: Duration,
    /// Request headers sent with every request (e.g. a testers header).
    pub headers: Vec<(String, String)>,
}

impl LoadOptions {
    /// `rps` requests per second for `duration` (so at most `rps * duration` requests), four
    /// workers, 5 s request timeout.
    pub fn new(rps: u32, duration: Duration) -> LoadOptions {
        let max_requests = (f64::from(rps) * duration.as_secs_f64()).ceil() as u64;
        LoadOptions {
            rps,
            workers: 4,
            duration,
            max_requests,
            request_timeout: Duration::from_secs(5),
            headers: Vec::new(),
        }
    }

    /// Send `name: value` with every request.
    pub fn with_header(mut self, name: &str, value: &str) -> LoadOptions {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }
}

/// Counts of what came back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Responses by HTTP status.
    pub by_status: BTreeMap<u16, u64>,
    /// Responses by `x-backend-version` (`"-"` when the header is missing, e.g. Envoy's own
    /// 503).
    pub by_version: BTreeMap<String, u64>,
    /// Requests that got no HTTP response (connect error, reset, timeout).
    pub connection_errors: u64,
    /// Time since the load started.
    pub elapsed: Duration,
}

impl LoadReport {
    /// Responses received (any status).
    pub fn responses(&self) -> u64 {
        self.by_status.values().sum()
    }

    /// Responses plus connection errors.
    pub fn attempts(&self) -> u64 {
        self.responses() + self.connection_errors
    }

    pub fn status_count(&self, status: u16) -> u64 {
        self.by_status.get(&status).copied().unwrap_or(0)
    }

    /// Responses with status 500..=599.
    pub fn server_errors(&self) -> u64 {
        self.by_status.range(500..=599).map(|(_, n)| n).sum()
    }

    pub fn version_count(&self, version: &str) -> u64 {
        self.by_version.get(version).copied().unwrap_or(0)
    }

    /// Fraction (0..=1) of responses that came from `version`; 0 when there were none.
    pub fn version_share(&self, version: &str) -> f64 {
        let responses = self.responses();
        if responses == 0 {
            0.0
        } else {
            self.version_count(version) as f64 / responses as f64
        }
    }

    /// What happened between `earlier` (a snapshot of the same load) and `self`.
    pub fn since(&self, earlier: &LoadReport) -> LoadReport {
        let by_status = self
            .by_status
            .iter()
            .map(|(k, v)| (*k, v.saturating_sub(earlier.status_count(*k))))
            .filter(|(_, v)| *v > 0)
            .collect();
        let by_version = self
            .by_version
            .iter()
            .map(|(k, v)| (k.clone(), v.saturating_sub(earlier.version_count(k))))
            .filter(|(_, v)| *v > 0)
            .collect();
        LoadReport {
            by_status,
            by_version,
            connection_errors: self
                .connection_errors
                .saturating_sub(earlier.connection_errors),
            elapsed: self.elapsed.saturating_sub(earlier.elapsed),
        }
    }

    /// One line: `n=200 rps=99.5 v1=80% v2=20% 5xx=0 conn_err=0`.
    pub fn summary(&self) -> String {
        let responses = self.responses();
        let seconds = self.elapsed.as_secs_f64();
        let rate = if seconds > 0.0 {
            self.attempts() as f64 / seconds
        } else {
            0.0
        };
        let mut line = format!("n={responses} rps={rate:.0}");
        for (version, count) in &self.by_version {
            let percent = 100.0 * *count as f64 / responses.max(1) as f64;
            line.push_str(&format!(" {version}={percent:.1}%"));
        }
        line.push_str(&format!(
            " 5xx={} conn_err={}",
            self.server_errors(),
            self.connection_errors
        ));
        line
    }
}

struct Shared {
    report: Mutex<LoadReport>,
    stop: AtomicBool,
    next_ticket: AtomicU64,
}

/// Load running in background threads; stopped on drop.
pub struct LoadGen {
    shared: Arc<Shared>,
    started: Instant,
    workers: Vec<JoinHandle<()>>,
}

impl LoadGen {
    /// Start sending GET `url` according to `options`.
    pub fn start(url: &str, options: LoadOptions) -> Result<LoadGen> {
        if options.rps == 0 || options.workers == 0 {
            bail!("load needs rps > 0 and workers > 0, got {options:?}");
        }
        let shared = Arc::new(Shared {
            report: Mutex::new(LoadReport::default()),
            stop: AtomicBool::new(false),
            next_ticket: AtomicU64::new(0),
        });
        let started = Instant::now();
        let interval = Duration::from_secs_f64(1.0 / f64::from(options.rps));
        let mut workers = Vec::with_capacity(options.workers);
        for worker in 0..options.workers {
            let shared = Arc::clone(&shared);
            let url = url.to_string();
            let options = options.clone();
            let handle = std::thread::Builder::new()
                .name(format!("loadgen-{worker}"))
                .spawn(move || run_worker(&url, &options, &shared, started, interval))?;
            workers.push(handle);
        }
        tracing::info!(url, rps = options.rps, workers = options.workers, duration = ?options.duration, "load started");
        Ok(LoadGen {
            shared,
            started,
            workers,
        })
    }

    /// Counts so far (the load keeps running).
    pub fn snapshot(&self) -> LoadReport {
        let mut report = match self.shared.report.lock() {
            Ok(report) => report.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        report.elapsed = self.started.elapsed();
        report
    }

    /// Whether the load has ended on its own (duration or count reached).
    pub fn is_finished(&self) -> bool {
        self.workers.iter().all(JoinHandle::is_finished)
    }

    /// Stop (waiting for in-flight requests, bounded by the request timeout) and return the
    /// final counts.
    pub fn stop(mut self) -> LoadReport {
        self.stop_and_join();
        self.snapshot()
    }

    /// Wait until the load ends on its own, then return the final counts.
    pub fn wait(mut self) -> LoadReport {
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
        self.snapshot()
    }

    fn stop_and_join(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

impl Drop for LoadGen {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

fn run_worker(
    url: &str,
    options: &LoadOptions,
    shared: &Shared,
    started: Instant,
    interval: Duration,
) {
    let agent = crate::http::agent(options.request_timeout);
    let deadline = started + options.duration;
    loop {
        if shared.stop.load(Ordering::Relaxed) {
            return;
        }
        let ticket = shared.next_ticket.fetch_add(1, Ordering::Relaxed);
        if ticket >= options.max_requests {
            return;
        }
        let due = started + interval.mul_f64(ticket as f64);
        if due >= deadline {
            return;
        }
        // Sleep until due in short slices so stop() is honoured promptly.
        loop {
            let now = Instant::now();
            if now >= due {
                break;
            }
            if shared.stop.load(Ordering::Relaxed) {
                return;
            }
            std::thread::sleep((due - now).min(Duration::from_millis(50)));
        }
        let outcome = send_one(&agent, url, &options.headers);
        let mut report = match shared.report.lock() {
            Ok(report) => report,
            Err(poisoned) => poisoned.into_inner(),
        };
        match outcome {
            Some((status, version)) => {
                *report.by_status.entry(status).or_default() += 1;
                *report.by_version.entry(version).or_default() += 1;
            }
            None => report.connection_errors += 1,
        }
    }
}

/// Status and version header of one GET, or `None` if no HTTP response came back.
fn send_one(agent: &ureq::Agent, url: &str, headers: &[(String, String)]) -> Option<(u16, String)> {
    let mut request = agent.get(url);
    for (name, value) in headers {
        request = request.header(name, value);
    }
    match request.call() {
        Ok(mut response) => {
            let status = response.status().as_u16();
            let version = response
                .headers()
                .get(VERSION_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_string();
            // Drain the body so the connection can be reused.
            let _ = response.body_mut().read_to_vec();
            Some((status, version))
        }
        Err(error) => {
            tracing::debug!(%error, url, "request failed without a response");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_subtracts_and_share_divides() {
        let mut earlier = LoadReport::default();
        earlier.by_status.insert(200, 10);
        earlier.by_version.insert("v1".into(), 10);
        earlier.elapsed = Duration::from_secs(1);
        let mut later = earlier.clone();
        later.by_status.insert(200, 40);
        later.by_status.insert(500, 10);
        later.by_version.insert("v1".into(), 20);
        later.by_version.insert("v2".into(), 30);
        later.connection_errors = 2;
        later.elapsed = Duration::from_secs(3);
        let window = later.since(&earlier);
        assert_eq!(window.responses(), 40);
        assert_eq!(window.server_errors(), 10);
        assert_eq!(window.version_count("v1"), 10);
        assert_eq!(window.version_share("v2"), 0.75);
        assert_eq!(window.connection_errors, 2);
        assert_eq!(window.elapsed, Duration::from_secs(2));
        assert_eq!(LoadReport::default().version_share("v1"), 0.0);
    }
}
