//! A running Prometheus (Debian's `prometheus` package, see `scripts/setup.sh`) that scrapes
//! harness Envoys' `/stats/prometheus`.
//!
//! It is our own child process, never the system service: its configuration, its TSDB
//! (`--storage.tsdb.path`) and its log live in a scratch directory, it listens on a free
//! 127.0.0.1 port, and it is stopped on drop like every [`Proc`].
//!
//! The binary is `$FLEDGE_PROMETHEUS` if set, else `prometheus` on `PATH`, else
//! `/usr/bin/prometheus`.

use crate::process::{abort_if_exited, free_port, wait_until, Proc, ScratchDir};
use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The scrape job name in the generated configuration (Prometheus adds it as label `job`).
pub const SCRAPE_JOB: &str = "envoy";

/// Where Debian's package puts the binary.
const DEBIAN_BINARY: &str = "/usr/bin/prometheus";

/// What Prometheus scrapes, and how often.
#[derive(Debug, Clone)]
pub struct PrometheusOptions {
    /// `host:port` of each target, e.g. an Envoy admin `127.0.0.1:9901`.
    pub targets: Vec<String>,
    /// Path scraped on every target.
    pub metrics_path: String,
    /// `scrape_interval` (the scrape timeout is the same).
    pub scrape_interval: Duration,
    /// Directory for configuration, data and log; `None` uses a temporary directory.
    pub work_dir: Option<PathBuf>,
}

impl PrometheusOptions {
    /// Scrape the Envoy admin `admin_url` (`http://127.0.0.1:PORT`) at `/stats/prometheus`
    /// every second.
    pub fn envoy(admin_url: &str) -> PrometheusOptions {
        let target = admin_url
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        PrometheusOptions {
            targets: vec![target],
            metrics_path: "/stats/prometheus".to_string(),
            scrape_interval: Duration::from_secs(1),
            work_dir: None,
        }
    }

    pub fn in_dir(mut self, dir: &Path) -> PrometheusOptions {
        self.work_dir = Some(dir.to_path_buf());
        self
    }
}

/// A running Prometheus; stopped on drop.
#[derive(Debug)]
pub struct Prometheus {
    // Field order matters: the process is stopped before its directory is removed.
    proc: Proc,
    port: u16,
    scrape_interval: Duration,
    _dir: ScratchDir,
}

impl Prometheus {
    /// Write the configuration, start Prometheus and wait until it is ready.
    pub fn start(options: PrometheusOptions) -> Result<Prometheus> {
        if options.targets.is_empty() {
            bail!("Prometheus needs at least one scrape target");
        }
        let binary = prometheus_binary()?;
        let dir = ScratchDir::at_or_temp(options.work_dir.as_deref(), "prometheus")?;
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, scrape_config(&options))
            .with_context(|| format!("writing {}", config_path.display()))?;
        let data_dir = dir.path().join("data");
        let port = free_port()?;

        let mut command = Command::new(&binary);
        command
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!("--storage.tsdb.path={}", data_dir.display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--storage.tsdb.retention.time=1h")
            .arg("--log.level=info");
        let log_path = dir.path().join("prometheus.log");
        let mut proc = Proc::spawn("prometheus", command, &log_path)?;

        let ready_url = format!("http://127.0.0.1:{port}/-/ready");
        let started = Instant::now();
        wait_until("Prometheus /-/ready", Duration::from_secs(30), || {
            abort_if_exited(&mut proc)?;
            let (status, _) = crate::http::get(&ready_url, Duration::from_secs(1))?;
            Ok((status == 200).then_some(()))
        })
        .with_context(|| format!("Prometheus log tail:\n{}", proc.log_tail(20)))?;
        tracing::info!(
            port,
            targets = ?options.targets,
            startup_ms = started.elapsed().as_millis() as u64,
            "prometheus ready"
        );
        Ok(Prometheus {
            proc,
            port,
            scrape_interval: options.scrape_interval,
            _dir: dir,
        })
    }

    /// Base URL of the HTTP API, e.g. `http://127.0.0.1:41234` (what `metricsSource.prometheus
    /// .address` takes).
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn scrape_interval(&self) -> Duration {
        self.scrape_interval
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        self.proc.log_tail(lines)
    }

    /// Evaluate an instant query; returns `data.result` (an array for vectors).
    pub fn query(&self, promql: &str) -> Result<Value> {
        let url = format!("{}/api/v1/query", self.url());
        let mut response = crate::http::agent(Duration::from_secs(5))
            .get(&url)
            .query("query", promql)
            .call()
            .with_context(|| format!("GET {url} query={promql}"))?;
        let status = response.status().as_u16();
        let body = response
            .body_mut()
            .read_to_string()
            .with_context(|| format!("reading the answer to {promql}"))?;
        let answer: Value = serde_json::from_str(&body)
            .with_context(|| format!("Prometheus answered {status} with non-JSON: {body}"))?;
        if answer["status"] != "success" {
            bail!("query {promql} failed ({status}): {}", answer);
        }
        Ok(answer["data"]["result"].clone())
    }

    /// The value of a query that returns one sample (e.g. a `sum(...)`); `None` when it
    /// returns no sample.
    pub fn query_number(&self, promql: &str) -> Result<Option<f64>> {
        let result = self.query(promql)?;
        let samples = result
            .as_array()
            .ok_or_else(|| anyhow!("{promql} did not return a vector: {result}"))?;
        match samples.as_slice() {
            [] => Ok(None),
            [sample] => {
                let text = sample["value"][1]
                    .as_str()
                    .ok_or_else(|| anyhow!("{promql}: sample without a value: {sample}"))?;
                Ok(Some(text.parse().with_context(|| {
                    format!("{promql}: value {text:?} is not a number")
                })?))
            }
            several => bail!("{promql} returned {} samples: {result}", several.len()),
        }
    }

    /// Wait until every target has been scraped successfully (`up == 1`).
    pub fn wait_for_targets_up(&self, timeout: Duration) -> Result<()> {
        let promql = format!("up{{job=\"{SCRAPE_JOB}\"}}");
        wait_until("every Prometheus target to be up", timeout, || {
            let result = self.query(&promql)?;
            let samples = result.as_array().cloned().unwrap_or_default();
            Ok((!samples.is_empty() && samples.iter().all(|s| s["value"][1] == "1")).then_some(()))
        })
        .with_context(|| format!("Prometheus log tail:\n{}", self.log_tail(20)))
    }

    /// Wait until `promql` (one sample) evaluates to `want`, e.g. until Prometheus has scraped
    /// every request a test sent.
    pub fn wait_for_value(&self, promql: &str, want: f64, timeout: Duration) -> Result<()> {
        let mut last = None;
        wait_until(
            &format!("{promql} to be {want} in Prometheus"),
            timeout,
            || {
                last = self.query_number(promql)?;
                Ok((last == Some(want)).then_some(()))
            },
        )
        .with_context(|| format!("last value: {last:?}"))
    }
}

/// `prometheus.yml` for `options`.
pub fn scrape_config(options: &PrometheusOptions) -> String {
    let interval_ms = options.scrape_interval.as_millis().max(1);
    let targets: Vec<String> = options
        .targets
        .iter()
        .map(|t| serde_json::Value::String(t.clone()).to_string())
        .collect();
    format!(
        "global:
  scrape_interval: {interval_ms}ms
  scrape_timeout: {interval_ms}ms
  evaluation_interval: {interval_ms}ms
scrape_configs:
  - job_name: {SCRAPE_JOB}
    metrics_path: {path}
    static_configs:
      - targets: [{targets}]
",
        path = serde_json::Value::String(options.metrics_path.clone()),
        targets = targets.join(", "),
    )
}

/// The Prometheus binary. Errors (with the fix) if it is not there.
pub fn prometheus_binary() -> Result<PathBuf> {
    if let Some(explicit) = std::env::var_os("FLEDGE_PROMETHEUS").filter(|v| !v.is_empty()) {
        let path = PathBuf::from(explicit);
        if is_executable(&path) {
            return Ok(path);
        }
        bail!(
            "FLEDGE_PROMETHEUS={} is not an executable file; unset it or point it at a Prometheus binary",
            path.display()
        );
    }
    let on_path = std::env::var_os("PATH")
        .map(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("prometheus"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain(std::iter::once(PathBuf::from(DEBIAN_BINARY)))
        .find(|candidate| is_executable(candidate))
        .ok_or_else(|| {
            anyhow!(
                "prometheus not found on PATH or at {DEBIAN_BINARY}; run scripts/setup.sh \
                 (apt-get install prometheus) or set FLEDGE_PROMETHEUS"
            )
        })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrape_config_targets_the_envoy_admin_every_second() {
        let options = PrometheusOptions::envoy("http://127.0.0.1:9901/");
        assert_eq!(options.targets, vec!["127.0.0.1:9901".to_string()]);
        let config = scrape_config(&options);
        for needle in [
            "scrape_interval: 1000ms",
            "scrape_timeout: 1000ms",
            "job_name: envoy",
            "metrics_path: \"/stats/prometheus\"",
            "targets: [\"127.0.0.1:9901\"]",
        ] {
            assert!(config.contains(needle), "missing {needle:?} in\n{config}");
        }
    }
}
