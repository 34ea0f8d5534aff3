//! A running `fledge-testbackend`: an HTTP server that names its version in every response and
//! counts what it served.

use crate::paths;
use crate::process::{abort_if_exited, free_port, wait_until, Proc, ScratchDir};
use anyhow::{Context, Result};
use serde::Deserialize;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

/// How the backend behaves. `Default` is a healthy, fast backend on a free port.
#[derive(Debug, Clone, Default)]
pub struct BackendOptions {
    /// Port to listen on; `None` picks a free one. Give the old port to restart "in place".
    pub port: Option<u16>,
    /// Fraction of requests answered with 500.
    pub error_rate: f64,
    /// Latency added to every request.
    pub latency_ms: u64,
    /// Fraction of requests that take `slow_ms` instead of `latency_ms`.
    pub slow_fraction: f64,
    pub slow_ms: u64,
    /// Seed for the error/slow draws (same seed, same sequence).
    pub seed: u64,
    /// Directory for the log; `None` uses a temporary directory.
    pub work_dir: Option<PathBuf>,
    /// The pod this process plays (`x-backend-pod`).
    pub pod: Option<String>,
    /// Its readiness probe (`/__backend/ready`) never succeeds.
    pub never_ready: bool,
    /// Its readiness probe succeeds only this long after start.
    pub ready_after_ms: u64,
}

/// What `GET /__backend/stats` returns.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct BackendStats {
    pub version: String,
    /// Requests answered (any status), excluding `/__backend/*`.
    pub served: u64,
    /// Of those, how many were answered with 500 on purpose.
    #[serde(default)]
    pub errors: u64,
    /// Unix time (ms, the backend's clock) of the last request served; 0 before the first.
    #[serde(default, rename = "lastServedUnixMs")]
    pub last_served_unix_ms: u64,
    /// Unix time (ms) of the first injected error since start or since the error rate last
    /// changed ([`Backend::set_error_rate`]); 0 if none yet.
    #[serde(default, rename = "firstErrorUnixMs")]
    pub first_error_unix_ms: u64,
}

/// A running test backend; stopped on drop.
#[derive(Debug)]
pub struct Backend {
    // Field order matters: the process is stopped before its directory is removed.
    proc: Proc,
    version: String,
    port: u16,
    _dir: ScratchDir,
}

impl Backend {
    /// Start a backend answering as `version` and wait until it serves.
    pub fn start(version: &str, options: BackendOptions) -> Result<Backend> {
        let binary = paths::testbackend_binary()?;
        let dir = ScratchDir::at_or_temp(options.work_dir.as_deref(), "backend")?;
        let port = match options.port {
            Some(port) => port,
            None => free_port()?,
        };
        let mut command = Command::new(binary);
        command
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--version")
            .arg(version)
            .arg("--error-rate")
            .arg(options.error_rate.to_string())
            .arg("--latency-ms")
            .arg(options.latency_ms.to_string())
            .arg("--slow-fraction")
            .arg(options.slow_fraction.to_string())
            .arg("--slow-ms")
            .arg(options.slow_ms.to_string())
            .arg("--seed")
            .arg(options.seed.to_string())
            .arg("--ready-after-ms")
            .arg(options.ready_after_ms.to_string())
            .env("RUST_LOG", "info");
        if let Some(pod) = &options.pod {
            command.arg("--pod").arg(pod);
        }
        if options.never_ready {
            command.arg("--never-ready");
        }
        let log_path = dir.path().join(format!("backend-{version}-{port}.log"));
        let mut proc = Proc::spawn(&format!("backend {version}"), command, &log_path)?;
        let stats_url = format!("http://127.0.0.1:{port}/__backend/stats");
        wait_until(
            &format!("backend {version} on port {port}"),
            Duration::from_secs(10),
            || {
                abort_if_exited(&mut proc)?;
                let body = crate::http::get_ok(&stats_url, Duration::from_secs(1))?;
                let stats: BackendStats = serde_json::from_str(&body)?;
                Ok((stats.version == version).then_some(()))
            },
        )?;
        tracing::info!(version, port, "backend ready");
        Ok(Backend {
            proc,
            version: version.to_string(),
            port,
            _dir: dir,
        })
    }

    pub fn version(&self) -> &str {
        &self.version
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The backend's own counters.
    pub fn stats(&self) -> Result<BackendStats> {
        let url = format!("{}/__backend/stats", self.url());
        let body = crate::http::get_ok(&url, Duration::from_secs(2))?;
        serde_json::from_str(&body).with_context(|| format!("parsing {url}"))
    }

    /// Fail a fraction `rate` of requests from now on; returns the backend's Unix time (ms) of
    /// the change.
    pub fn set_error_rate(&self, rate: f64) -> Result<u64> {
        let url = format!("{}/__backend/error-rate?rate={rate}", self.url());
        let body = crate::http::post_ok(&url, Duration::from_secs(2))?;
        let value: serde_json::Value =
            serde_json::from_str(&body).with_context(|| format!("parsing answer of {url}"))?;
        value["changedAtUnixMs"]
            .as_u64()
            .with_context(|| format!("{url} answered without changedAtUnixMs: {body}"))
    }

    /// Whether its readiness probe (`/__backend/ready`) succeeds.
    pub fn ready(&self) -> bool {
        let url = format!("{}/__backend/ready", self.url());
        matches!(
            crate::http::get(&url, Duration::from_millis(500)),
            Ok((200, _))
        )
    }

    /// Requests served so far (excluding `/__backend/*`).
    pub fn served(&self) -> Result<u64> {
        Ok(self.stats()?.served)
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    pub fn log_text(&self) -> String {
        self.proc.log_text()
    }

    /// Stop now (SIGTERM, then SIGKILL after a grace). Its port is free when this returns.
    pub fn stop(mut self) {
        self.proc.stop();
    }
}
