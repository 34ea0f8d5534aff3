//! A running Envoy configured the way Fledge uses it standalone.
//!
//! [`Envoy::start`] writes into its directory:
//! - `bootstrap.json`: admin and one listener on free 127.0.0.1 ports; HCM → (optional Fledge
//!   Wasm filter) → router; static clusters `app_stable` / `app_canary`; `stats_tags` for every
//!   tag of the metric contract; RDS from a file.
//! - `rds/routes.json`: a `DiscoveryResponse` with route configuration `fledge_route`, virtual
//!   host `app`, route `primary` splitting between the two clusters by weight.
//!
//! Envoy watches `rds/` and reloads `routes.json` when a file is renamed over it
//! ([`Envoy::set_route_weights`] does exactly that). Facts checked by hand with Envoy 1.40:
//! a weight of 0 for one cluster is accepted (and shown as `"weight": 0` in `/config_dump`); all
//! weights 0 is rejected ("Sum of weights in the weighted_cluster must be greater than 0"),
//! visible only as `rds.fledge_route.update_rejected` and a warning in the log; a renamed file is
//! live in a few milliseconds.

use crate::http;
use crate::paths;
use crate::process::{abort_if_exited, free_port, port_accepts, wait_until, Proc, ScratchDir};
use anyhow::{anyhow, bail, Context, Result};
use fledge_core::contract;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Names used in the generated configuration.
pub const ROUTE_CONFIG_NAME: &str = "fledge_route";
pub const VIRTUAL_HOST_NAME: &str = "app";
pub const ROUTE_NAME: &str = "primary";
pub const STABLE_CLUSTER: &str = "app_stable";
pub const CANARY_CLUSTER: &str = "app_canary";

/// Weights of the two clusters of the `primary` route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteWeights {
    pub stable: u32,
    pub canary: u32,
}

impl RouteWeights {
    pub const ALL_STABLE: RouteWeights = RouteWeights {
        stable: 100,
        canary: 0,
    };
    pub const ALL_CANARY: RouteWeights = RouteWeights {
        stable: 0,
        canary: 100,
    };

    /// `canary` percent to the canary, the rest to stable.
    pub fn canary_percent(canary: u32) -> RouteWeights {
        let canary = canary.min(100);
        RouteWeights {
            stable: 100 - canary,
            canary,
        }
    }
}

impl std::fmt::Display for RouteWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "stable {} / canary {}", self.stable, self.canary)
    }
}

/// The Fledge Wasm filter and its plugin configuration.
#[derive(Debug, Clone)]
pub struct WasmFilter {
    pub wasm: PathBuf,
    /// Plugin configuration as JSON text (passed to the filter as a `StringValue`).
    pub plugin_config: String,
}

impl WasmFilter {
    /// The HCM entry `name` (raw Envoy JSON) running this filter as plugin `plugin_name` in VM
    /// `vm_id`: Envoy shares a VM between filters with the same VM id and code.
    pub fn http_filter(&self, name: &str, plugin_name: &str, vm_id: &str) -> Value {
        json!({
            "name": name,
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
                "config": {
                    "name": plugin_name,
                    "root_id": "fledge",
                    "failure_policy": "FAIL_OPEN",
                    "configuration": {
                        "@type": "type.googleapis.com/google.protobuf.StringValue",
                        "value": self.plugin_config,
                    },
                    "vm_config": {
                        "vm_id": vm_id,
                        "runtime": "envoy.wasm.runtime.v8",
                        "code": {"local": {"filename": self.wasm.display().to_string()}}
                    }
                }
            }
        })
    }

    /// The release build of the filter (errors with "run make build-filter" if missing).
    pub fn built(plugin_config: &str) -> Result<WasmFilter> {
        Ok(WasmFilter {
            wasm: paths::filter_wasm()?,
            plugin_config: plugin_config.to_string(),
        })
    }

    /// The plugin configuration mapping `app_stable` / `app_canary` to service `service` and
    /// subsets `stable` / `canary`.
    pub fn default_plugin_config(service: &str) -> String {
        json!({
            "clusters": {
                STABLE_CLUSTER: {"service": service, "subset": "stable"},
                CANARY_CLUSTER: {"service": service, "subset": "canary"},
            }
        })
        .to_string()
    }
}

/// How to start Envoy.
#[derive(Debug, Clone)]
pub struct EnvoyOptions {
    /// Port of the stable backend (cluster `app_stable`).
    pub stable_port: u16,
    /// Port of the canary backend (cluster `app_canary`).
    pub canary_port: u16,
    /// The Fledge filter, or `None` for a plain proxy.
    pub filter: Option<WasmFilter>,
    /// A second Fledge filter (the full module, for forced canaries) that Envoy runs only on the
    /// routes of requests carrying the forced-canary or the route header; `filter` is turned off
    /// there, so each request is counted once (see [`ForcedCanaryRoutes`]).
    pub forced_canary: Option<ForcedCanaryRoutes>,
    /// Worker threads (`--concurrency`).
    pub concurrency: u32,
    pub initial_weights: RouteWeights,
    /// Envoy log level (`-l`).
    pub log_level: String,
    /// Directory for bootstrap, RDS and log; `None` uses a temporary directory.
    pub work_dir: Option<PathBuf>,
    /// Routes placed before `primary` in the RDS route configuration (e.g. a header-match route
    /// for forced canaries). Kept when the weights are rewritten.
    pub routes_before_primary: Vec<Value>,
    /// `weighted_clusters.header_name` of `primary`: the pick is `header value mod total weight`
    /// (sticky canaries). `None`: random picks.
    pub weighted_header_name: Option<String>,
    /// Sticky users without the filter: `primary` picks from Envoy's hash of a request header.
    pub native_sticky: Option<NativeSticky>,
    /// Every route to one cluster (and each of `primary`'s weighted clusters) adds this response
    /// header naming its subset, without the filter.
    pub native_subset_header: Option<String>,
    /// Each weighted cluster and each route to one cluster adds this response header naming
    /// its cluster (the filter's `clusterHeader`).
    pub cluster_header: Option<String>,
    /// More static clusters (raw Envoy JSON), e.g. one with endpoint metadata.
    pub extra_clusters: Vec<Value>,
    /// `stats_config.histogram_bucket_settings` entries (raw Envoy JSON).
    pub histogram_bucket_settings: Vec<Value>,
    /// HTTP filters (raw Envoy JSON) placed before the Wasm filter, e.g. one that resolves the
    /// route early.
    pub http_filters_before_wasm: Vec<Value>,
    /// The two clusters take their endpoints from files (EDS, `eds/<cluster>/endpoints.json`,
    /// initially empty) instead of the two ports: a stand-in for istiod writes them.
    pub file_eds: bool,
    /// A native access logger (an Envoy dynamic module) on the listener.
    pub native_access_log: Option<NativeAccessLog>,
}

/// An Envoy dynamic module loaded as an access logger: `lib<name>.so` in `dir`.
#[derive(Debug, Clone)]
pub struct NativeAccessLog {
    pub dir: PathBuf,
    pub name: String,
}

impl NativeAccessLog {
    /// `filter/native-floor`, built by `make build-filter`.
    pub fn built_floor() -> Result<NativeAccessLog> {
        let path = paths::native_floor_module();
        let dir = path
            .parent()
            .filter(|_| path.exists())
            .with_context(|| format!("{} is not built: run `make build-filter`", path.display()))?;
        Ok(NativeAccessLog {
            dir: dir.to_path_buf(),
            name: paths::NATIVE_FLOOR_NAME.into(),
        })
    }

    fn access_log(&self) -> Value {
        json!({
            "name": "envoy.access_loggers.dynamic_modules",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.dynamic_modules.v3.DynamicModuleAccessLog",
                "dynamic_module_config": {"name": self.name}
            }
        })
    }
}

impl EnvoyOptions {
    /// A plain proxy (no filter), one worker, all traffic to stable.
    pub fn new(stable_port: u16, canary_port: u16) -> EnvoyOptions {
        EnvoyOptions {
            stable_port,
            canary_port,
            filter: None,
            forced_canary: None,
            concurrency: 1,
            initial_weights: RouteWeights::ALL_STABLE,
            log_level: "info".into(),
            work_dir: None,
            routes_before_primary: Vec::new(),
            weighted_header_name: None,
            native_sticky: None,
            native_subset_header: None,
            cluster_header: None,
            extra_clusters: Vec::new(),
            histogram_bucket_settings: Vec::new(),
            http_filters_before_wasm: Vec::new(),
            file_eds: false,
            native_access_log: None,
        }
    }

    /// Endpoints of `app_stable` and `app_canary` from files (see [`Envoy::eds_path`]), written
    /// by a stand-in for istiod; both start empty.
    pub fn with_file_eds(mut self) -> EnvoyOptions {
        self.file_eds = true;
        self
    }

    /// Add an HTTP filter (raw Envoy JSON) before the Wasm filter.
    pub fn with_http_filter_before_wasm(mut self, filter: Value) -> EnvoyOptions {
        self.http_filters_before_wasm.push(filter);
        self
    }

    /// A route before `primary` sending requests whose `header` is exactly `value` to the canary
    /// cluster (the filter's forced-canary route: `x-fledge-route: canary`).
    pub fn with_header_route_to_canary(mut self, header: &str, value: &str) -> EnvoyOptions {
        self.routes_before_primary.push(json!({
            "name": FORCED_CANARY_ROUTE_NAME,
            "match": {"prefix": "/", "headers": [{"name": header, "string_match": {"exact": value}}]},
            "route": {"cluster": CANARY_CLUSTER}
        }));
        self
    }

    /// Make `primary`'s weighted pick deterministic from `header` (sticky canaries).
    pub fn with_weighted_header_name(mut self, header: &str) -> EnvoyOptions {
        self.weighted_header_name = Some(header.to_string());
        self
    }

    /// Make `primary`'s weighted pick Envoy's own hash of the request header `header`, salted
    /// (sticky canaries without the filter; see [`NativeSticky`]).
    pub fn with_native_sticky(mut self, header: &str, salt: &str) -> EnvoyOptions {
        self.native_sticky = Some(NativeSticky {
            header: header.to_string(),
            salt: salt.to_string(),
        });
        self
    }

    /// Have the routes add `header: <subset>` to their responses (no filter needed).
    pub fn with_native_subset_header(mut self, header: &str) -> EnvoyOptions {
        self.native_subset_header = Some(header.to_string());
        self
    }

    /// Have each route name its upstream cluster in a response header, for the filter's
    /// `clusterHeader`.
    pub fn with_cluster_header(mut self, header: &str) -> EnvoyOptions {
        self.cluster_header = Some(header.to_string());
        self
    }

    /// Run `filter` (the full module with `forceCanary`) only for requests carrying `header`
    /// (the forced-canary token) or the route header; see [`ForcedCanaryRoutes`].
    pub fn with_forced_canary_routes(mut self, filter: WasmFilter, header: &str) -> EnvoyOptions {
        self.forced_canary = Some(ForcedCanaryRoutes {
            filter,
            header: header.to_string(),
        });
        self
    }

    /// Add a route (raw Envoy JSON) before `primary`.
    pub fn with_route_before_primary(mut self, route: Value) -> EnvoyOptions {
        self.routes_before_primary.push(route);
        self
    }

    /// Add a static cluster (raw Envoy JSON).
    pub fn with_cluster(mut self, cluster: Value) -> EnvoyOptions {
        self.extra_clusters.push(cluster);
        self
    }

    /// Set histogram buckets for stats whose name ends with `suffix` (or starts with it, when
    /// `prefix` is true — the shape Istio generates from `sidecar.istio.io/statsHistogramBuckets`).
    pub fn with_histogram_buckets(
        mut self,
        name: &str,
        prefix: bool,
        buckets: &[f64],
    ) -> EnvoyOptions {
        let matcher = if prefix {
            json!({"prefix": name})
        } else {
            json!({"suffix": name})
        };
        self.histogram_bucket_settings
            .push(json!({"match": matcher, "buckets": buckets}));
        self
    }

    /// The shape of the RDS route configuration these options ask for.
    pub fn route_shape(&self) -> RouteShape {
        RouteShape {
            routes_before_primary: self.routes_before_primary.clone(),
            weighted_header_name: self.weighted_header_name.clone(),
            native_sticky: self.native_sticky.clone(),
            native_subset_header: self.native_subset_header.clone(),
            cluster_header: self.cluster_header.clone(),
            forced_canary_header: self.forced_canary.as_ref().map(|f| f.header.clone()),
        }
    }

    pub fn with_filter(mut self, filter: WasmFilter) -> EnvoyOptions {
        self.filter = Some(filter);
        self
    }

    pub fn in_dir(mut self, dir: &Path) -> EnvoyOptions {
        self.work_dir = Some(dir.to_path_buf());
        self
    }
}

/// What the RDS route configuration holds besides the weights (see [`route_configuration_with`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RouteShape {
    pub routes_before_primary: Vec<Value>,
    pub weighted_header_name: Option<String>,
    pub native_sticky: Option<NativeSticky>,
    pub native_subset_header: Option<String>,
    /// See [`EnvoyOptions::cluster_header`].
    pub cluster_header: Option<String>,
    /// The forced-canary header of [`ForcedCanaryRoutes`], when the forced-canary filter runs
    /// only on its routes.
    pub forced_canary_header: Option<String>,
}

/// Forced canaries without a request-phase hostcall on everyone else's requests.
///
/// Two Fledge filters: the main one (the observer) and, disabled by default
/// (`HttpFilter.disabled`), the full module with `forceCanary`. Envoy picks a request's filters
/// from the route it matches when the stream starts, so routes that match the token header or
/// the route header, placed before all others, turn the full module on and the main filter off
/// (`typed_per_filter_config`); every other request runs the main filter alone. The full module
/// always removes both headers, which makes Envoy pick the route again: a valid token lands on
/// the forced route (`x-fledge-route: canary`), anything else on the weighted route. The checking
/// routes themselves send to stable, which only a failed filter would leave in place.
#[derive(Debug, Clone)]
pub struct ForcedCanaryRoutes {
    pub filter: WasmFilter,
    /// The header testers send their token in (`forceCanary.header`).
    pub header: String,
}

/// The route [`EnvoyOptions::with_header_route_to_canary`] adds.
pub const FORCED_CANARY_ROUTE_NAME: &str = "forced-canary";
/// The HCM filter names, which per-route configuration refers to.
pub const MAIN_FILTER_NAME: &str = "envoy.filters.http.wasm";
/// The VM id (and plugin name) of the main filter: another filter with this VM id and the same
/// code shares its VM.
pub const MAIN_VM_ID: &str = "fledge";
pub const FORCED_CANARY_FILTER_NAME: &str = "fledge-forced-canary";

/// `typed_per_filter_config` of a route where the forced-canary filter runs instead of the main
/// one.
fn forced_canary_filters_on() -> Value {
    const FILTER_CONFIG: &str = "type.googleapis.com/envoy.config.route.v3.FilterConfig";
    // An empty `config` turns on a filter that is disabled by default.
    json!({
        MAIN_FILTER_NAME: {"@type": FILTER_CONFIG, "disabled": true},
        FORCED_CANARY_FILTER_NAME: {"@type": FILTER_CONFIG, "config": {}},
    })
}

/// The routes placed first that hand a request carrying `header` or the route header to the
/// forced-canary filter.
fn forced_canary_check_routes(header: &str) -> Vec<Value> {
    [header, contract::DEFAULT_ROUTE_HEADER]
        .iter()
        .map(|name| {
            json!({
                "name": format!("fledge-check-{name}"),
                "match": {"prefix": "/", "headers": [{"name": name, "present_match": true}]},
                "route": {"cluster": STABLE_CLUSTER},
                "typed_per_filter_config": forced_canary_filters_on(),
            })
        })
        .collect()
}

/// Envoy's own sticky pick: the route's `hash_policy` hashes the request header (its value
/// prefixed with `salt` by `regex_rewrite`) and `weighted_clusters.use_hash_policy` picks
/// `hash mod total weight` in list order, as `header_name` does with the filter's bucket.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NativeSticky {
    pub header: String,
    pub salt: String,
}

impl NativeSticky {
    /// The route's `hash_policy` entry (no rewrite without a salt).
    pub fn hash_policy(&self) -> Value {
        let mut header = json!({"header_name": self.header});
        if !self.salt.is_empty() {
            header["regex_rewrite"] = json!({
                "pattern": {"regex": "^(.*)$"},
                "substitution": format!("{}\\1", self.salt),
            });
        }
        json!({"header": header})
    }
}

/// The subset Fledge's e2e clusters serve.
fn subset_of(cluster: &str) -> Option<&'static str> {
    match cluster {
        STABLE_CLUSTER => Some("stable"),
        CANARY_CLUSTER => Some("canary"),
        _ => None,
    }
}

/// `response_headers_to_add` naming `cluster`'s subset, replacing what the upstream sent.
fn subset_header_to_add(header: &str, cluster: &str) -> Option<Value> {
    Some(header_to_add(header, subset_of(cluster)?))
}

/// One `response_headers_to_add` entry, replacing an upstream's own copy.
fn header_to_add(header: &str, value: &str) -> Value {
    json!({
        "header": {"key": header, "value": value},
        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
    })
}

/// A running Envoy; stopped on drop.
#[derive(Debug)]
pub struct Envoy {
    // Field order matters: the process is stopped before its directory is removed.
    proc: Proc,
    admin_port: u16,
    listener_port: u16,
    rds_path: PathBuf,
    rds_version: AtomicU64,
    route_shape: RouteShape,
    /// How to start this Envoy again in place (same bootstrap, ports and RDS file).
    relaunch: (PathBuf, Vec<String>, Vec<(String, PathBuf)>),
    restarts: u32,
    _dir: ScratchDir,
}

impl Envoy {
    /// Write the configuration, start Envoy and wait until it is LIVE and its listener accepts.
    pub fn start(options: EnvoyOptions) -> Result<Envoy> {
        let binary = paths::envoy_binary()?;
        let dir = ScratchDir::at_or_temp(options.work_dir.as_deref(), "envoy")?;
        let rds_dir = dir.path().join("rds");
        std::fs::create_dir_all(&rds_dir)
            .with_context(|| format!("creating {}", rds_dir.display()))?;
        let rds_path = rds_dir.join("routes.json");
        let route_shape = options.route_shape();
        write_rds_file_with(&rds_path, &route_shape, options.initial_weights, 1)?;

        if options.file_eds {
            for cluster in [STABLE_CLUSTER, CANARY_CLUSTER] {
                let path = eds_file(dir.path(), cluster);
                std::fs::create_dir_all(path.parent().unwrap_or(dir.path()))?;
                write_eds_file(&path, cluster, &[], 1)?;
            }
        }
        let admin_port = free_port()?;
        let listener_port = free_port()?;
        let bootstrap = bootstrap_config(&options, admin_port, listener_port, &rds_path)?;
        let bootstrap_path = dir.path().join("bootstrap.json");
        std::fs::write(&bootstrap_path, serde_json::to_vec_pretty(&bootstrap)?)
            .with_context(|| format!("writing {}", bootstrap_path.display()))?;

        let args = vec![
            "-c".to_string(),
            bootstrap_path.display().to_string(),
            "--concurrency".to_string(),
            options.concurrency.to_string(),
            // No shared memory, so parallel Envoys never clash on a base id.
            "--disable-hot-restart".to_string(),
            "-l".to_string(),
            options.log_level.clone(),
        ];
        let log_path = dir.path().join("envoy.log");
        // Envoy finds a dynamic module by name in this directory.
        let env: Vec<(String, PathBuf)> = options
            .native_access_log
            .iter()
            .map(|log| {
                (
                    "ENVOY_DYNAMIC_MODULES_SEARCH_PATH".to_string(),
                    log.dir.clone(),
                )
            })
            .collect();
        let proc = launch(&binary, &args, &env, &log_path, admin_port, listener_port)?;
        tracing::info!(
            admin_port,
            listener_port,
            filter = options.filter.is_some(),
            "envoy ready"
        );
        Ok(Envoy {
            proc,
            admin_port,
            listener_port,
            rds_path,
            rds_version: AtomicU64::new(1),
            route_shape,
            relaunch: (binary, args, env),
            restarts: 0,
            _dir: dir,
        })
    }

    /// Kill this Envoy (SIGKILL: counters are lost, as in a crash) and start it again with
    /// the same bootstrap, ports and the current RDS file; wait until it is ready.
    pub fn restart(&mut self) -> Result<()> {
        self.proc.kill_now();
        self.restarts += 1;
        let log_path = self
            ._dir
            .path()
            .join(format!("envoy-restart-{}.log", self.restarts));
        let (binary, args, env) = &self.relaunch;
        self.proc = launch(
            binary,
            args,
            env,
            &log_path,
            self.admin_port,
            self.listener_port,
        )?;
        Ok(())
    }
}

/// Start Envoy and wait until its admin says LIVE and its listener accepts.
fn launch(
    binary: &Path,
    args: &[String],
    env: &[(String, PathBuf)],
    log_path: &Path,
    admin_port: u16,
    listener_port: u16,
) -> Result<Proc> {
    {
        let mut command = Command::new(binary);
        command.args(args);
        command.envs(env.iter().cloned());
        let mut proc = Proc::spawn("envoy", command, log_path)?;
        let admin_url = format!("http://127.0.0.1:{admin_port}");
        let started = Instant::now();
        wait_until(
            "Envoy admin /ready to say LIVE and the listener to accept",
            Duration::from_secs(30),
            || {
                abort_if_exited(&mut proc)?;
                let (status, body) =
                    http::get(&format!("{admin_url}/ready"), Duration::from_secs(1))?;
                Ok(
                    (status == 200 && body.trim() == "LIVE" && port_accepts(listener_port))
                        .then_some(()),
                )
            },
        )
        .with_context(|| format!("Envoy log tail:\n{}", proc.log_tail(30)))?;
        tracing::debug!(
            startup_ms = started.elapsed().as_millis() as u64,
            "envoy live"
        );
        Ok(proc)
    }
}

impl Envoy {
    pub fn admin_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.admin_port)
    }

    pub fn listener_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.listener_port)
    }

    pub fn admin_port(&self) -> u16 {
        self.admin_port
    }

    pub fn listener_port(&self) -> u16 {
        self.listener_port
    }

    /// The watched RDS file (`<dir>/rds/routes.json`).
    pub fn rds_path(&self) -> &Path {
        &self.rds_path
    }

    /// The watched EDS file of `cluster` (with [`EnvoyOptions::with_file_eds`]).
    pub fn eds_path(&self, cluster: &str) -> PathBuf {
        eds_file(self._dir.path(), cluster)
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

    /// GET an admin path such as `/stats?filter=rds` (status must be 2xx).
    pub fn admin_get(&self, path_and_query: &str) -> Result<String> {
        http::get_ok(
            &format!("{}{path_and_query}", self.admin_url()),
            Duration::from_secs(5),
        )
    }

    /// `/stats/prometheus` text.
    pub fn stats_prometheus(&self) -> Result<String> {
        self.admin_get("/stats/prometheus")
    }

    /// The sum of the counters whose names contain `part` (admin `/stats`, text).
    pub fn counter_sum(&self, part: &str) -> Result<u64> {
        let text = self.admin_get("/stats?usedonly")?;
        let mut sum = 0u64;
        for (name, value) in text.lines().filter_map(|l| l.split_once(": ")) {
            if name.contains(part) {
                sum += value
                    .trim()
                    .parse::<u64>()
                    .with_context(|| format!("counter {name}: {value:?} is not a count"))?;
            }
        }
        Ok(sum)
    }

    /// Rewrite the RDS file with new weights (temp file + rename in the watched directory).
    /// Does not wait; see [`Envoy::wait_for_route_weights`].
    pub fn set_route_weights(&self, weights: RouteWeights) -> Result<()> {
        let current = read_rds_version(&self.rds_path).unwrap_or(0);
        let previous = self.rds_version.load(Ordering::SeqCst);
        let version = current.max(previous) + 1;
        self.rds_version.store(version, Ordering::SeqCst);
        write_rds_file_with(&self.rds_path, &self.route_shape, weights, version)
    }

    /// The weights and `version_info` Envoy is serving now, from
    /// `/config_dump?resource=dynamic_route_configs`.
    pub fn live_route_weights(&self) -> Result<(RouteWeights, String)> {
        let dump: Value =
            serde_json::from_str(&self.admin_get("/config_dump?resource=dynamic_route_configs")?)
                .context("parsing config_dump")?;
        live_weights_from_config_dump(&dump)
    }

    /// Wait until Envoy serves `weights`; returns how long that took.
    pub fn wait_for_route_weights(
        &self,
        weights: RouteWeights,
        timeout: Duration,
    ) -> Result<Duration> {
        let started = Instant::now();
        wait_until(
            &format!("Envoy to serve route weights {weights}"),
            timeout,
            || {
                let (live, _) = self.live_route_weights()?;
                Ok((live == weights).then_some(()))
            },
        )
        .with_context(|| {
            format!(
                "RDS file {} not applied; Envoy log tail:\n{}",
                self.rds_path.display(),
                self.log_tail(10)
            )
        })?;
        Ok(started.elapsed())
    }

    /// [`Envoy::set_route_weights`] then [`Envoy::wait_for_route_weights`] (10 s).
    pub fn apply_route_weights(&self, weights: RouteWeights) -> Result<Duration> {
        self.set_route_weights(weights)?;
        self.wait_for_route_weights(weights, Duration::from_secs(10))
    }

    /// Stop Envoy now (it is also stopped on drop).
    pub fn stop(mut self) {
        self.proc.stop();
    }
}

/// The route configuration resource for `weights`.
pub fn route_configuration(weights: RouteWeights) -> Value {
    route_configuration_with(&RouteShape::default(), weights)
}

/// Adds `response_headers_to_add` naming the subset to each weighted cluster and to each
/// route sending to one cluster.
fn add_subset_headers(header: &str, clusters: &mut [Value], routes: &mut [Value]) {
    add_per_cluster(clusters, routes, |cluster| {
        subset_header_to_add(header, cluster)
    });
}

/// Each weighted cluster and each route to one cluster names its cluster in `header` (what the
/// filter's `clusterHeader` reads; the route's own value, so Envoy's local replies for that
/// cluster carry it too).
fn add_cluster_headers(header: &str, clusters: &mut [Value], routes: &mut [Value]) {
    add_per_cluster(clusters, routes, |cluster| {
        Some(header_to_add(header, cluster))
    });
}

/// Append `entry(cluster name)` to the `response_headers_to_add` of each weighted cluster and
/// of each route to one cluster.
fn add_per_cluster(
    clusters: &mut [Value],
    routes: &mut [Value],
    entry: impl Fn(&str) -> Option<Value>,
) {
    let add = |target: &mut Value, cluster: &str| {
        if let Some(entry) = entry(cluster) {
            match target["response_headers_to_add"].as_array_mut() {
                Some(list) => list.push(entry),
                None => target["response_headers_to_add"] = json!([entry]),
            }
        }
    };
    for cluster in clusters {
        let name = cluster["name"].as_str().unwrap_or_default().to_string();
        add(cluster, &name);
    }
    for route in routes {
        if let Some(name) = route["route"]["cluster"].as_str().map(str::to_string) {
            add(route, &name);
        }
    }
}

/// The route configuration resource for `weights`, with `shape`'s extra routes before `primary`
/// and its `header_name` on `primary`'s weighted clusters, or its native sticky pick, subset
/// header and forced-canary checking routes.
pub fn route_configuration_with(shape: &RouteShape, weights: RouteWeights) -> Value {
    let mut clusters = [
        json!({"name": STABLE_CLUSTER, "weight": weights.stable}),
        json!({"name": CANARY_CLUSTER, "weight": weights.canary}),
    ];
    let mut routes = shape.routes_before_primary.clone();
    if let Some(header) = &shape.forced_canary_header {
        for route in routes
            .iter_mut()
            .filter(|r| r["name"] == FORCED_CANARY_ROUTE_NAME)
        {
            route["typed_per_filter_config"] = forced_canary_filters_on();
        }
        routes.extend(forced_canary_check_routes(header));
    }
    if let Some(header) = &shape.native_subset_header {
        add_subset_headers(header, &mut clusters, &mut routes);
    }
    if let Some(header) = &shape.cluster_header {
        add_cluster_headers(header, &mut clusters, &mut routes);
    }
    let mut weighted = json!({"clusters": clusters});
    if let Some(header) = &shape.weighted_header_name {
        weighted["header_name"] = json!(header);
    }
    let mut action = json!({});
    if let Some(sticky) = &shape.native_sticky {
        weighted["use_hash_policy"] = json!(true);
        action["hash_policy"] = json!([sticky.hash_policy()]);
    }
    action["weighted_clusters"] = weighted;
    routes.push(json!({
        "name": ROUTE_NAME,
        "match": {"prefix": "/"},
        "route": action
    }));
    json!({
        "@type": "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
        "name": ROUTE_CONFIG_NAME,
        "virtual_hosts": [{
            "name": VIRTUAL_HOST_NAME,
            "domains": ["*"],
            "routes": routes
        }]
    })
}

/// Write the RDS `DiscoveryResponse` atomically: a temp file in the same (watched) directory,
/// then `rename(2)` over `path`.
pub fn write_rds_file(path: &Path, weights: RouteWeights, version: u64) -> Result<()> {
    write_rds_file_with(path, &RouteShape::default(), weights, version)
}

/// [`write_rds_file`] with extra routes and a `header_name` (see [`route_configuration_with`]).
pub fn write_rds_file_with(
    path: &Path,
    shape: &RouteShape,
    weights: RouteWeights,
    version: u64,
) -> Result<()> {
    let response = json!({
        "version_info": version.to_string(),
        "resources": [route_configuration_with(shape, weights)],
    });
    let dir = path
        .parent()
        .ok_or_else(|| anyhow!("RDS path {} has no directory", path.display()))?;
    let temp_path = dir.join(format!(".routes.json.tmp-{}-{version}", std::process::id()));
    std::fs::write(&temp_path, serde_json::to_vec_pretty(&response)?)
        .with_context(|| format!("writing {}", temp_path.display()))?;
    std::fs::rename(&temp_path, path)
        .with_context(|| format!("renaming {} to {}", temp_path.display(), path.display()))?;
    Ok(())
}

fn eds_file(dir: &Path, cluster: &str) -> PathBuf {
    dir.join("eds").join(cluster).join("endpoints.json")
}

/// Write an EDS `DiscoveryResponse` for `cluster` with one endpoint per port on 127.0.0.1,
/// atomically (temp file + rename in the watched directory).
pub fn write_eds_file(path: &Path, cluster: &str, ports: &[u16], version: u64) -> Result<()> {
    let endpoints: Vec<Value> = ports
        .iter()
        .map(|port| {
            json!({"endpoint": {"address": {"socket_address": {
                "address": "127.0.0.1", "port_value": port
            }}}})
        })
        .collect();
    let response = json!({
        "version_info": version.to_string(),
        "resources": [{
            "@type": "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
            "cluster_name": cluster,
            "endpoints": [{"lb_endpoints": endpoints}],
        }],
    });
    let dir = path
        .parent()
        .ok_or_else(|| anyhow!("EDS path {} has no directory", path.display()))?;
    let temp_path = dir.join(format!(
        ".endpoints.json.tmp-{}-{version}",
        std::process::id()
    ));
    std::fs::write(&temp_path, serde_json::to_vec_pretty(&response)?)
        .with_context(|| format!("writing {}", temp_path.display()))?;
    std::fs::rename(&temp_path, path)
        .with_context(|| format!("renaming {} to {}", temp_path.display(), path.display()))?;
    Ok(())
}

fn file_eds_cluster(name: &str, path: &Path) -> Value {
    let dir = path.parent().unwrap_or(path);
    json!({
        "name": name,
        "type": "EDS",
        "connect_timeout": "0.25s",
        "eds_cluster_config": {"eds_config": {
            "resource_api_version": "V3",
            "path_config_source": {
                "path": path.display().to_string(),
                "watched_directory": {"path": dir.display().to_string()}
            }
        }}
    })
}

fn read_rds_version(path: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    let value: Value = serde_json::from_str(&text).ok()?;
    value.get("version_info")?.as_str()?.parse().ok()
}

/// Extract the `primary` route's weights and the `version_info` from a config dump of
/// `dynamic_route_configs`.
pub fn live_weights_from_config_dump(dump: &Value) -> Result<(RouteWeights, String)> {
    let configs = dump
        .get("configs")
        .and_then(Value::as_array)
        .ok_or_else(|| anyhow!("config_dump has no dynamic route configs yet"))?;
    let config = configs
        .iter()
        .find(|c| c["route_config"]["name"] == ROUTE_CONFIG_NAME)
        .ok_or_else(|| anyhow!("route configuration {ROUTE_CONFIG_NAME} is not live"))?;
    let version = config["version_info"].as_str().unwrap_or("").to_string();
    let route = config["route_config"]["virtual_hosts"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|host| host["routes"].as_array().into_iter().flatten())
        .find(|route| route["name"] == ROUTE_NAME)
        .ok_or_else(|| {
            anyhow!("route {ROUTE_NAME} not found in live route configuration {ROUTE_CONFIG_NAME}")
        })?;
    let clusters = route["route"]["weighted_clusters"]["clusters"]
        .as_array()
        .ok_or_else(|| anyhow!("route {ROUTE_NAME} has no weighted_clusters"))?;
    let weight_of = |cluster: &str| -> u32 {
        clusters
            .iter()
            .find(|c| c["name"] == cluster)
            // A missing weight is the proto default 0.
            .and_then(|c| c["weight"].as_u64())
            .and_then(|w| u32::try_from(w).ok())
            .unwrap_or(0)
    };
    Ok((
        RouteWeights {
            stable: weight_of(STABLE_CLUSTER),
            canary: weight_of(CANARY_CLUSTER),
        },
        version,
    ))
}

fn static_cluster(name: &str, port: u16) -> Value {
    json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "0.25s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                "address": "127.0.0.1", "port_value": port
            }}}}]}]
        }
    })
}

fn bootstrap_config(
    options: &EnvoyOptions,
    admin_port: u16,
    listener_port: u16,
    rds_path: &Path,
) -> Result<Value> {
    let rds_dir = rds_path
        .parent()
        .ok_or_else(|| anyhow!("RDS path {} has no directory", rds_path.display()))?;
    let mut http_filters = options.http_filters_before_wasm.clone();
    if let Some(filter) = &options.filter {
        if !filter.wasm.is_file() {
            bail!("filter {} does not exist", filter.wasm.display());
        }
        http_filters.push(filter.http_filter(MAIN_FILTER_NAME, MAIN_VM_ID, MAIN_VM_ID));
    }
    if let Some(forced) = &options.forced_canary {
        let mut filter = forced.filter.http_filter(
            FORCED_CANARY_FILTER_NAME,
            FORCED_CANARY_FILTER_NAME,
            FORCED_CANARY_FILTER_NAME,
        );
        filter["disabled"] = json!(true);
        http_filters.push(filter);
    }
    http_filters.push(json!({
        "name": "envoy.filters.http.router",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}
    }));
    let stats_tags: Vec<Value> = contract::ALL_TAGS
        .iter()
        .map(|tag| json!({"tag_name": tag, "regex": contract::stats_tag_regex(tag)}))
        .collect();
    let mut stats_config = json!({"stats_tags": stats_tags});
    if !options.histogram_bucket_settings.is_empty() {
        stats_config["histogram_bucket_settings"] = json!(options.histogram_bucket_settings);
    }
    let mut clusters = if options.file_eds {
        let dir = rds_dir.parent().unwrap_or(rds_dir);
        vec![
            file_eds_cluster(STABLE_CLUSTER, &eds_file(dir, STABLE_CLUSTER)),
            file_eds_cluster(CANARY_CLUSTER, &eds_file(dir, CANARY_CLUSTER)),
        ]
    } else {
        vec![
            static_cluster(STABLE_CLUSTER, options.stable_port),
            static_cluster(CANARY_CLUSTER, options.canary_port),
        ]
    };
    clusters.extend(options.extra_clusters.iter().cloned());
    Ok(json!({
        "node": {"id": format!("fledge-e2e-{listener_port}"), "cluster": "fledge-e2e"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "stats_flush_interval": "1s",
        "stats_config": stats_config,
        "static_resources": {
            "listeners": [{
                "name": "ingress",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": listener_port}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "ingress",
                        "generate_request_id": false,
                        "rds": {
                            "route_config_name": ROUTE_CONFIG_NAME,
                            "config_source": {
                                "resource_api_version": "V3",
                                "path_config_source": {
                                    "path": rds_path.display().to_string(),
                                    "watched_directory": {"path": rds_dir.display().to_string()}
                                }
                            }
                        },
                        "http_filters": http_filters,
                        "access_log": options.native_access_log.iter().map(NativeAccessLog::access_log).collect::<Vec<_>>()
                    }
                }]}]
            }],
            "clusters": clusters
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_weights_back_from_a_config_dump() {
        let dump = json!({"configs": [{
            "version_info": "7",
            "route_config": route_configuration(RouteWeights::canary_percent(40)),
        }]});
        let (weights, version) = live_weights_from_config_dump(&dump).expect("weights");
        assert_eq!(
            weights,
            RouteWeights {
                stable: 60,
                canary: 40
            }
        );
        assert_eq!(version, "7");
        assert!(live_weights_from_config_dump(&json!({})).is_err());
    }

    #[test]
    fn bootstrap_has_a_stats_tag_per_contract_tag() {
        let options = EnvoyOptions::new(1, 2);
        let config =
            bootstrap_config(&options, 3, 4, Path::new("/x/rds/routes.json")).expect("config");
        let tags = config["stats_config"]["stats_tags"]
            .as_array()
            .expect("tags");
        assert_eq!(tags.len(), contract::ALL_TAGS.len());
        assert_eq!(
            tags[0]["regex"].as_str(),
            Some(r"(fledge_service=\.=(.*?);\.;)")
        );
    }
}
