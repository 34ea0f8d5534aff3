//! The controller under test: a running `fledge run` and the Canary manifest it reads.
//!
//! CLI contract: `fledge run -f <canary.yaml> --listen 127.0.0.1:PORT --state-dir DIR`, serving
//! `GET /api/v1/canaries` (a JSON array of canaries with `name`, `phase`, `canaryWeight`,
//! `step`, `message`) and printing progress lines on stdout.

use crate::envoy::{
    CANARY_CLUSTER, ROUTE_CONFIG_NAME, ROUTE_NAME, STABLE_CLUSTER, VIRTUAL_HOST_NAME,
};
use crate::http;
use crate::paths;
use crate::process::{abort_if_exited, free_port, wait_until, LogFollower, Proc};
use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Phases a canary can be in.
pub const PHASE_PROMOTED: &str = "Promoted";
pub const PHASE_ROLLED_BACK: &str = "RolledBack";
pub const PHASE_HALTED: &str = "Halted";
pub const PHASE_PROGRESSING: &str = "Progressing";
pub const PHASE_INITIALIZING: &str = "Initializing";

/// Phases after which the controller changes nothing more by itself.
pub const TERMINAL_PHASES: [&str; 3] = [PHASE_PROMOTED, PHASE_ROLLED_BACK, PHASE_HALTED];

/// Values for a `Canary` manifest aimed at one harness [`crate::Envoy`].
#[derive(Debug, Clone)]
pub struct CanaryManifest {
    pub name: String,
    /// `fledge_service` label value.
    pub service: String,
    pub stable_subset: String,
    pub canary_subset: String,
    /// Envoy admin base URL (metrics source and route verification).
    pub envoy_admin_url: String,
    /// The watched RDS file.
    pub rds_path: PathBuf,
    /// YAML of `spec.analysis` (indented by the renderer).
    pub analysis_yaml: String,
    /// When set, metrics come from this Prometheus API base URL (`metricsSource.prometheus`,
    /// which custom metric `query` templates need) instead of the Envoy admin. The Envoy admin
    /// is still used to verify route weights.
    pub prometheus_address: Option<String>,
    /// When set (and no Prometheus), metrics are Envoy's own per-cluster stats of the
    /// harness's stable and canary clusters (`metricsSource.envoyClusterStats`): no filter
    /// needed.
    pub cluster_stats: bool,
    /// The release this rollout is for (`metadata.annotations["fledge.dev/rollout"]`); a
    /// running `fledge run` starts a new rollout when it changes.
    pub rollout: Option<String>,
}

impl CanaryManifest {
    /// The demo's rollout: 3 s intervals, 2 failed checks to roll back, at least 10 canary
    /// requests per check, steps 20 → 40 → pause 3 s → 60 → 80, success rate ≥ 99 % and
    /// p99 ≤ 500 ms.
    pub fn demo_analysis() -> String {
        "interval: 3s
threshold: 2
minCanaryRequests: 10
steps: [{setWeight: 20}, {setWeight: 40}, {pause: {duration: 3s}}, {setWeight: 60}, {setWeight: 80}]
metrics:
  - {name: request-success-rate, thresholdRange: {min: 99}}
  - {name: request-duration, quantile: 0.99, thresholdRange: {max: 500}}
"
        .to_string()
    }

    /// A manifest for canary `name` of service `service` (subsets `stable` and `canary`) behind
    /// the Envoy with admin `envoy_admin_url` and RDS file `rds_path`, with the demo analysis.
    pub fn new(name: &str, service: &str, envoy_admin_url: &str, rds_path: &Path) -> Self {
        CanaryManifest {
            name: name.to_string(),
            service: service.to_string(),
            stable_subset: "stable".into(),
            canary_subset: "canary".into(),
            envoy_admin_url: envoy_admin_url.to_string(),
            rds_path: rds_path.to_path_buf(),
            analysis_yaml: Self::demo_analysis(),
            prometheus_address: None,
            cluster_stats: false,
            rollout: None,
        }
    }

    /// Name the release (see [`CanaryManifest::rollout`]).
    pub fn with_rollout(mut self, rollout: &str) -> Self {
        self.rollout = Some(rollout.to_string());
        self
    }

    /// Read metrics from the Prometheus at `address` (see [`CanaryManifest::prometheus_address`]).
    pub fn with_prometheus(mut self, address: &str) -> Self {
        self.prometheus_address = Some(address.to_string());
        self
    }

    /// The manifest as YAML.
    pub fn to_yaml(&self) -> String {
        let quote = |s: &str| serde_json::Value::String(s.to_string()).to_string();
        let analysis: String = self
            .analysis_yaml
            .lines()
            .map(|line| format!("    {line}\n"))
            .collect();
        let metrics_source = match &self.prometheus_address {
            Some(address) => format!("prometheus: {{address: {}}}", quote(address)),
            None if self.cluster_stats => format!(
                "envoyClusterStats: {{urls: [{}], stableCluster: {}, canaryCluster: {}}}",
                quote(&self.envoy_admin_url),
                quote(STABLE_CLUSTER),
                quote(CANARY_CLUSTER)
            ),
            None => format!("envoyAdmin: {{urls: [{}]}}", quote(&self.envoy_admin_url)),
        };
        let annotations = match &self.rollout {
            Some(rollout) => format!(", annotations: {{fledge.dev/rollout: {}}}", quote(rollout)),
            None => String::new(),
        };
        format!(
            "apiVersion: fledge.dev/v1alpha1
kind: Canary
metadata: {{name: {name}{annotations}}}
spec:
  service: {service}
  stable: {{subset: {stable}}}
  canary: {{subset: {canary}}}
  metricsSource:
    {metrics_source}
  router:
    envoyRds:
      path: {rds}
      routeConfiguration: {route_config}
      virtualHost: {virtual_host}
      route: {route}
      stableCluster: {stable_cluster}
      canaryCluster: {canary_cluster}
      adminUrl: {admin}
  analysis:
{analysis}",
            name = quote(&self.name),
            service = quote(&self.service),
            stable = quote(&self.stable_subset),
            canary = quote(&self.canary_subset),
            admin = quote(&self.envoy_admin_url),
            rds = quote(&self.rds_path.display().to_string()),
            route_config = quote(ROUTE_CONFIG_NAME),
            virtual_host = quote(VIRTUAL_HOST_NAME),
            route = quote(ROUTE_NAME),
            stable_cluster = quote(STABLE_CLUSTER),
            canary_cluster = quote(CANARY_CLUSTER),
        )
    }

    /// Write the YAML to `path` atomically (a running `fledge run` reads it again when it
    /// changes, and must never see half a file).
    pub fn write(&self, path: &Path) -> Result<()> {
        let temp = path.with_extension("yaml.tmp");
        std::fs::write(&temp, self.to_yaml())
            .with_context(|| format!("writing {}", temp.display()))?;
        std::fs::rename(&temp, path).with_context(|| format!("renaming to {}", path.display()))
    }
}

/// One canary as the status API reports it. Unknown or missing fields are tolerated so a
/// richer API does not break the harness; `raw` has everything.
#[derive(Debug, Clone, PartialEq)]
pub struct CanaryView {
    pub name: String,
    pub phase: String,
    pub canary_weight: Option<u64>,
    /// Index of the current step (0-based).
    pub step: Option<u64>,
    /// Number of steps in the plan.
    pub steps: Option<u64>,
    pub message: String,
    pub raw: Value,
}

impl CanaryView {
    pub fn from_json(value: &Value) -> CanaryView {
        let text = |key: &str| value[key].as_str().unwrap_or_default().to_string();
        CanaryView {
            name: text("name"),
            phase: text("phase"),
            canary_weight: value["canaryWeight"].as_u64(),
            step: value["step"].as_u64(),
            steps: value["steps"].as_u64(),
            message: text("message"),
            raw: value.clone(),
        }
    }

    /// `3/5` (1-based) when the step and the plan length are known, else what is known.
    pub fn step_label(&self) -> String {
        match (self.step, self.steps) {
            (Some(step), Some(steps)) => format!("{}/{steps}", (step + 1).min(steps)),
            (Some(step), None) => format!("#{step}"),
            _ => "-".into(),
        }
    }

    pub fn is_terminal(&self) -> bool {
        TERMINAL_PHASES.contains(&self.phase.as_str())
    }

    /// The canary weight of every transition in the history, in order.
    pub fn weights_walked(&self) -> Vec<u64> {
        weights_walked(&self.raw)
    }
}

/// The canary weight of every transition in a status's `history`, in order (a status from the
/// API of `fledge run` or the `.status` of a Canary object).
pub fn weights_walked(status: &Value) -> Vec<u64> {
    status["history"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["canaryWeight"].as_u64())
        .collect()
}

/// A running `fledge run`; stopped on drop.
#[derive(Debug)]
pub struct Controller {
    proc: Proc,
    api_port: u16,
}

impl Controller {
    /// Run `fledge run -f manifest --listen 127.0.0.1:<free port> --state-dir state_dir`,
    /// logging to `log_path`, and wait until its API answers.
    pub fn start(manifest: &Path, state_dir: &Path, log_path: &Path) -> Result<Controller> {
        Self::start_with_env(manifest, state_dir, log_path, &[])
    }

    /// Write `manifest` to `<dir>/canary.yaml` and run `fledge run` on it with its state in
    /// `<dir>/state` and its log in `<dir>/fledge.log` (the layout every test uses).
    pub fn start_in(dir: &Path, manifest: &CanaryManifest) -> Result<Controller> {
        let path = dir.join("canary.yaml");
        manifest.write(&path)?;
        Self::start(&path, &dir.join("state"), &dir.join("fledge.log"))
    }

    /// [`Controller::start`] with extra environment variables (e.g. `RUST_LOG`).
    pub fn start_with_env(
        manifest: &Path,
        state_dir: &Path,
        log_path: &Path,
        env: &[(&str, &str)],
    ) -> Result<Controller> {
        let binary = paths::fledge_binary()?;
        std::fs::create_dir_all(state_dir)
            .with_context(|| format!("creating {}", state_dir.display()))?;
        let api_port = free_port()?;
        let mut command = Command::new(binary);
        command
            .arg("run")
            .arg("-f")
            .arg(manifest)
            .arg("--listen")
            .arg(format!("127.0.0.1:{api_port}"))
            .arg("--state-dir")
            .arg(state_dir)
            .envs(env.iter().copied());
        let mut proc = Proc::spawn("fledge", command, log_path)?;
        let url = format!("http://127.0.0.1:{api_port}/api/v1/canaries");
        wait_until("the fledge API to answer", Duration::from_secs(20), || {
            abort_if_exited(&mut proc)?;
            http::get_json(&url, Duration::from_secs(1)).map(Some)
        })?;
        tracing::info!(api_port, "fledge controller ready");
        Ok(Controller { proc, api_port })
    }

    /// Base URL of the controller's HTTP server (dashboard and API).
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.api_port)
    }

    pub fn api_url(&self) -> String {
        format!("{}/api/v1/canaries", self.base_url())
    }

    /// All canaries, as the API reports them.
    pub fn canaries(&mut self) -> Result<Vec<CanaryView>> {
        self.proc.ensure_running()?;
        let value = http::get_json(&self.api_url(), Duration::from_secs(3))?;
        let list = match &value {
            Value::Array(items) => items.clone(),
            Value::Object(map) => map
                .get("canaries")
                .or_else(|| map.get("items"))
                .and_then(Value::as_array)
                .cloned()
                .ok_or_else(|| anyhow!("unexpected API answer: {value}"))?,
            _ => bail!("unexpected API answer: {value}"),
        };
        Ok(list.iter().map(CanaryView::from_json).collect())
    }

    /// One canary by name.
    pub fn canary(&mut self, name: &str) -> Result<CanaryView> {
        self.canaries()?
            .into_iter()
            .find(|c| c.name == name)
            .ok_or_else(|| anyhow!("canary {name:?} not in the API answer"))
    }

    /// Wait until canary `name` reaches `phase`; fail at once if it ends (Promoted or
    /// RolledBack) otherwise, with the controller's last output.
    pub fn wait_for_phase(
        &mut self,
        name: &str,
        phase: &str,
        timeout: Duration,
    ) -> Result<CanaryView> {
        let waited = wait_until(&format!("canary {name} to be {phase}"), timeout, || {
            let view = self.canary(name)?;
            if view.phase == phase {
                return Ok(Some(view));
            }
            if ["Promoted", "RolledBack"].contains(&view.phase.as_str()) {
                bail!(
                    "canary ended {} instead of {phase}: {}",
                    view.phase,
                    view.message
                );
            }
            Ok(None)
        });
        waited.with_context(|| format!("controller output:\n{}", self.log_tail(40)))
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    pub fn log_text(&self) -> String {
        self.proc.log_text()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        self.proc.log_tail(lines)
    }

    /// Print the controller's output as it comes, each line prefixed.
    pub fn follow_log(&self, prefix: &str) -> LogFollower {
        self.proc.follow_log(prefix)
    }

    /// Kill it with SIGKILL (a crash: no chance to save anything or clean up).
    pub fn kill(&mut self) {
        self.proc.kill_now();
    }

    /// Send an operator command (`promote`, `abort`, ...) through the API.
    pub fn command(&self, name: &str, command: &str) -> Result<String> {
        http::post_ok(
            &format!("{}/{name}/{command}", self.api_url()),
            Duration::from_secs(3),
        )
    }

    /// Stop it now (it is also stopped on drop).
    pub fn stop(mut self) {
        self.proc.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_yaml_has_every_field_the_controller_needs() {
        let manifest = CanaryManifest::new(
            "app",
            "app",
            "http://127.0.0.1:9901",
            Path::new("/tmp/x/rds/routes.json"),
        );
        let yaml = manifest.to_yaml();
        for needle in [
            "kind: Canary",
            "metadata: {name: \"app\"}",
            "envoyAdmin: {urls: [\"http://127.0.0.1:9901\"]}",
            "path: \"/tmp/x/rds/routes.json\"",
            "routeConfiguration: \"fledge_route\"",
            "stableCluster: \"app_stable\"",
            "    interval: 3s\n",
            "    minCanaryRequests: 10\n",
        ] {
            assert!(yaml.contains(needle), "missing {needle:?} in\n{yaml}");
        }
    }

    #[test]
    fn canary_view_tolerates_missing_fields() {
        let view = CanaryView::from_json(&serde_json::json!({"name": "app", "phase": "Promoted"}));
        assert_eq!(view.name, "app");
        assert!(view.is_terminal());
        assert_eq!(view.canary_weight, None);
    }

    #[test]
    fn manifest_can_read_metrics_from_prometheus() {
        let manifest = CanaryManifest::new(
            "app",
            "app",
            "http://127.0.0.1:9901",
            Path::new("/tmp/x/rds/routes.json"),
        )
        .with_prometheus("http://127.0.0.1:9090");
        let yaml = manifest.to_yaml();
        assert!(
            yaml.contains(
                "  metricsSource:\n    prometheus: {address: \"http://127.0.0.1:9090\"}\n"
            ),
            "{yaml}"
        );
        assert!(!yaml.contains("envoyAdmin"), "{yaml}");
        assert!(
            yaml.contains("adminUrl: \"http://127.0.0.1:9901\""),
            "{yaml}"
        );
    }
}
