//! [`EnvoyRdsRouter`]: moves traffic by rewriting the stable/canary weights of one route in an
//! Envoy file-based RDS resource (`rds.config_source.path_config_source`).
//!
//! The file is a `DiscoveryResponse` (`{"version_info": ..., "resources": [RouteConfiguration,
//! ...]}`) in JSON (`.json`) or YAML (`.yaml`/`.yml`), the two text formats Envoy tells apart by
//! extension. Writing:
//!
//! - only the two `weight`s of the configured route change, plus `version_info`; everything
//!   else (other routes and virtual hosts, unknown fields) is kept as parsed. Not kept: JSON key
//!   order (keys are written sorted), YAML comments and formatting, and a symlink at `path` (it is
//!   replaced by a regular file);
//! - the new text goes to a temporary file in the same directory that is then renamed over the
//!   path: Envoy reloads on moves into the watched directory and ignores in-place edits;
//! - nothing is written when the file already has the wanted split;
//! - writers in this process are serialised per file, so canaries sharing one RDS file do not
//!   lose each other's updates. Other processes must not write the file concurrently.
//!
//! Weights are relative in Envoy. Fledge speaks percent, so it reads a split only when it is a
//! whole-percent split: 90/10 as is, 900/100 as 90/10, 1/0 as 100/0; 1/2 is refused rather than
//! rounded, since reporting a split that is not the one in force would be a lie. Other clusters
//! in the same `weighted_clusters` must have weight 0. Fledge always writes weights summing to
//! 100.
//!
//! Verification reads `GET {admin_url}/config_dump?resource=dynamic_route_configs`. Envoy 1.40
//! answers `{"configs": [{"@type": "...RoutesConfigDump.DynamicRouteConfig", "version_info":
//! "1", "route_config": {RouteConfiguration}, "last_updated": "..."}]}` (verified); without the
//! `resource` parameter the same entries sit under `configs[].dynamic_route_configs[]`. Both
//! shapes are accepted, and weights are read whether printed as numbers or strings.

use super::{DesiredRoutes, Ensured, RouteKey, RouteObject, RouterError, TrafficRouter, Weights};
use async_trait::async_trait;
use std::collections::HashMap;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

/// How often `verify` asks Envoy whether the new weights are live.
const VERIFY_POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Where one canary's route lives and how to check it is live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvoyRdsSettings {
    /// The RDS file Envoy watches (`path_config_source.path`), `.json`, `.yaml` or `.yml`.
    pub path: PathBuf,
    /// `name` of the RouteConfiguration resource in that file (the HCM's `route_config_name`).
    pub route_configuration: String,
    /// `name` of the virtual host holding the route.
    pub virtual_host: String,
    /// `name` of the route whose `route.weighted_clusters` splits the traffic.
    pub route: String,
    /// Cluster in `weighted_clusters.clusters` that serves the stable version.
    pub stable_cluster: String,
    /// Cluster in `weighted_clusters.clusters` that serves the canary.
    pub canary_cluster: String,
    /// Envoy admin base URL, e.g. `http://127.0.0.1:9901`, for [`EnvoyRdsRouter::verify`].
    pub admin_url: String,
    /// How long `verify` waits for new weights to show up in Envoy's live config.
    pub verify_timeout: Duration,
}

/// A [`TrafficRouter`] over an Envoy file-based RDS resource; see the module docs.
#[derive(Debug)]
pub struct EnvoyRdsRouter {
    settings: Arc<EnvoyRdsSettings>,
    key: RouteKey,
    format: FileFormat,
    config_dump_url: reqwest::Url,
    client: reqwest::Client,
}

impl EnvoyRdsRouter {
    /// Checks the settings (file extension, distinct clusters, admin URL) without touching the
    /// file; the file is read on every call so external edits are seen.
    pub fn new(settings: EnvoyRdsSettings) -> Result<Self, RouterError> {
        let format = FileFormat::from_path(&settings.path)?;
        if settings.stable_cluster == settings.canary_cluster {
            return Err(RouterError::Invalid(format!(
                "stable and canary cluster are both {:?}; they must differ",
                settings.stable_cluster
            )));
        }
        let config_dump_url = config_dump_url(&settings.admin_url)?;
        // The process' client; each request carries its own timeout.
        let client = crate::http::client();
        Ok(EnvoyRdsRouter {
            key: route_key(&settings),
            settings: Arc::new(settings),
            format,
            config_dump_url,
            client,
        })
    }

    /// Run blocking file work off the async runtime.
    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&EnvoyRdsSettings, FileFormat) -> Result<T, RouterError> + Send + 'static,
    ) -> Result<T, RouterError> {
        let settings = Arc::clone(&self.settings);
        let format = self.format;
        tokio::task::spawn_blocking(move || work(&settings, format))
            .await
            .map_err(|join_error| RouterError::Io {
                path: self.settings.path.display().to_string(),
                source: std::io::Error::other(join_error.to_string()),
            })?
    }

    /// The weights Envoy serves now, or why they cannot be told.
    async fn live_weights(&self, remaining: Duration) -> Result<Weights, LiveProblem> {
        let response = self
            .client
            .get(self.config_dump_url.clone())
            .timeout(remaining.max(Duration::from_millis(50)))
            .send()
            .await
            .map_err(|error| LiveProblem::Admin(format!("{}: {error}", self.config_dump_url)))?;
        let status = response.status();
        let body = response
            .text()
            .await
            .map_err(|error| LiveProblem::Admin(format!("{}: {error}", self.config_dump_url)))?;
        if !status.is_success() {
            return Err(LiveProblem::Admin(format!(
                "{}: HTTP {status}: {}",
                self.config_dump_url,
                body.chars().take(200).collect::<String>().trim()
            )));
        }
        let dump: serde_json::Value = serde_json::from_str(&body).map_err(|error| {
            LiveProblem::Admin(format!("{}: not JSON: {error}", self.config_dump_url))
        })?;
        let origin = format!("the live config of {}", self.settings.admin_url);
        let route_config = live_route_configuration(&dump, &self.settings.route_configuration)
            .ok_or_else(|| {
                LiveProblem::NotThere(format!(
                    "route configuration {:?} not in {origin}",
                    self.settings.route_configuration
                ))
            })?;
        let located = locate_route(route_config, &self.settings, &origin)
            .map_err(|error| LiveProblem::NotThere(error.to_string()))?;
        located
            .percent(&self.settings, &origin)
            .map_err(|error| LiveProblem::NotThere(error.to_string()))
    }
}

/// The route `settings` name: route configuration / virtual host / route in the RDS file.
pub fn route_key(settings: &EnvoyRdsSettings) -> RouteKey {
    RouteKey {
        object: RouteObject {
            kind: "RDS file",
            namespace: String::new(),
            name: settings.path.display().to_string(),
        },
        route: format!(
            "{}/{}/{}",
            settings.route_configuration, settings.virtual_host, settings.route
        ),
    }
}

/// This router manages nothing but the weights: a testers, mirror or guard route in the RDS
/// file is yours to write (see filter/README.md), so `desired`'s managed routes are not used.
#[async_trait]
impl TrafficRouter for EnvoyRdsRouter {
    fn route(&self) -> &RouteKey {
        &self.key
    }

    /// Read the file, write the weights when they differ, then wait until Envoy serves them.
    async fn ensure(&self, desired: &DesiredRoutes) -> Result<Ensured, RouterError> {
        let found = self.get_weights().await?;
        let wrote = found != desired.weights;
        if wrote {
            self.set_weights(desired.weights).await?;
        }
        self.verify(desired.weights).await?;
        Ok(Ensured { found, wrote })
    }
}

impl EnvoyRdsRouter {
    /// The weights in the file now.
    pub async fn get_weights(&self) -> Result<Weights, RouterError> {
        self.blocking(|settings, format| {
            let document = Document::read(&settings.path, format)?;
            let origin = settings.path.display().to_string();
            document.locate(settings)?.percent(settings, &origin)
        })
        .await
    }

    /// Change only the two weights (and the version) in the file; no write when they match.
    pub async fn set_weights(&self, weights: Weights) -> Result<(), RouterError> {
        if weights.stable.checked_add(weights.canary) != Some(100) {
            return Err(RouterError::Invalid(format!(
                "weights must sum to 100, got stable {} + canary {}",
                weights.stable, weights.canary
            )));
        }
        let outcome = self
            .blocking(move |settings, format| write_weights(settings, format, weights))
            .await?;
        match outcome {
            WriteOutcome::Unchanged => {
                tracing::debug!(path = %self.settings.path.display(), ?weights, "weights already set; file left alone");
            }
            WriteOutcome::Written { version } => {
                tracing::info!(
                    path = %self.settings.path.display(),
                    route = %self.settings.route,
                    stable = weights.stable,
                    canary = weights.canary,
                    version = %version,
                    "wrote new route weights"
                );
            }
        }
        Ok(())
    }

    /// Wait (bounded by `verify_timeout`) until Envoy itself serves `weights`.
    pub async fn verify(&self, weights: Weights) -> Result<(), RouterError> {
        let started = Instant::now();
        let deadline = started + self.settings.verify_timeout;
        let mut live = None;
        let mut last_problem: Option<String>;
        let mut admin_answered = false;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            match self.live_weights(remaining).await {
                Ok(current) if current == weights => {
                    tracing::debug!(
                        ?weights,
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "weights live in Envoy"
                    );
                    return Ok(());
                }
                Ok(current) => {
                    admin_answered = true;
                    live = Some(current);
                    last_problem = None;
                }
                Err(LiveProblem::NotThere(problem)) => {
                    admin_answered = true;
                    live = None;
                    last_problem = Some(problem);
                }
                Err(LiveProblem::Admin(problem)) => last_problem = Some(problem),
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                break;
            }
            tokio::time::sleep(remaining.min(VERIFY_POLL_INTERVAL)).await;
        }
        let waited_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        if !admin_answered {
            return Err(RouterError::Admin(format!(
                "no usable answer from Envoy admin within {waited_ms} ms: {}",
                last_problem.unwrap_or_default()
            )));
        }
        if let Some(problem) = &last_problem {
            tracing::warn!(%problem, "cannot read live weights");
        }
        Err(RouterError::NotLive {
            want: weights,
            live,
            waited_ms,
        })
    }
}

enum LiveProblem {
    /// The admin API could not be asked or gave no usable answer.
    Admin(String),
    /// Envoy answered, but the route is not (or not usably) in its live config.
    NotThere(String),
}

enum WriteOutcome {
    Unchanged,
    Written { version: String },
}

fn write_weights(
    settings: &EnvoyRdsSettings,
    format: FileFormat,
    weights: Weights,
) -> Result<WriteOutcome, RouterError> {
    let lock = file_lock(&settings.path);
    let _serialised = lock.lock().unwrap_or_else(PoisonError::into_inner);

    let mut document = Document::read(&settings.path, format)?;
    let located = document.locate(settings)?;
    let origin = settings.path.display().to_string();
    // A file whose split is not readable as percent (e.g. 1/2, or 0/0) is simply overwritten.
    if located.percent(settings, &origin).ok() == Some(weights) {
        return Ok(WriteOutcome::Unchanged);
    }
    let version = document.apply(&located, weights, &origin)?;
    let text = document.render(&origin)?;
    replace_atomically(&settings.path, text.as_bytes())?;
    Ok(WriteOutcome::Written { version })
}

/// One lock per RDS file for the whole process.
fn file_lock(path: &Path) -> Arc<Mutex<()>> {
    static LOCKS: OnceLock<Mutex<HashMap<PathBuf, Arc<Mutex<()>>>>> = OnceLock::new();
    let key = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut locks = LOCKS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    Arc::clone(locks.entry(key).or_default())
}

/// Write `contents` to a temporary file next to `path`, then rename it over `path`.
fn replace_atomically(path: &Path, contents: &[u8]) -> Result<(), RouterError> {
    static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);
    let io_error = |source| RouterError::Io {
        path: path.display().to_string(),
        source,
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| RouterError::Invalid(format!("{} names no file", path.display())))?;
    let directory = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let temp_path = directory.join(format!(
        ".{}.fledge-{}-{}.tmp",
        file_name.to_string_lossy(),
        std::process::id(),
        TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let written = (|| {
        let mut temp = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp_path)?;
        temp.write_all(contents)?;
        temp.sync_all()?;
        // Keep the original's mode so Envoy can still read the file.
        if let Ok(metadata) = fs::metadata(path) {
            fs::set_permissions(&temp_path, metadata.permissions())?;
        }
        fs::rename(&temp_path, path)
    })();
    if let Err(error) = written {
        if let Err(cleanup) = fs::remove_file(&temp_path) {
            if cleanup.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(temp = %temp_path.display(), error = %cleanup, "cannot remove temporary file");
            }
        }
        return Err(io_error(error));
    }
    // Make the rename durable; a failure here does not undo the update.
    if let Err(error) = fs::File::open(directory).and_then(|dir| dir.sync_all()) {
        tracing::debug!(directory = %directory.display(), %error, "cannot fsync directory");
    }
    Ok(())
}

fn config_dump_url(admin_url: &str) -> Result<reqwest::Url, RouterError> {
    let mut url = reqwest::Url::parse(admin_url.trim_end_matches('/')).map_err(|error| {
        RouterError::Invalid(format!("invalid Envoy admin URL {admin_url:?}: {error}"))
    })?;
    if url.scheme() != "http" && url.scheme() != "https" {
        return Err(RouterError::Invalid(format!(
            "invalid Envoy admin URL {admin_url:?}: only http:// and https:// are supported"
        )));
    }
    let path = format!("{}/config_dump", url.path().trim_end_matches('/'));
    url.set_path(&path);
    url.set_query(Some("resource=dynamic_route_configs"));
    Ok(url)
}

/// The live RouteConfiguration named `name` in a config dump, in either shape (see module docs).
fn live_route_configuration<'a>(
    dump: &'a serde_json::Value,
    name: &str,
) -> Option<&'a serde_json::Value> {
    let entries = dump.get("configs")?.as_array()?;
    let mut candidates = entries.iter().flat_map(|entry| {
        let nested = entry
            .get("dynamic_route_configs")
            .and_then(|v| v.as_array())
            .map(|configs| configs.iter().collect::<Vec<_>>())
            .unwrap_or_default();
        std::iter::once(entry).chain(nested)
    });
    candidates.find_map(|entry| {
        let route_config = entry.get("route_config")?;
        (route_config.get("name")?.as_str()? == name).then_some(route_config)
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FileFormat {
    Json,
    Yaml,
}

impl FileFormat {
    fn from_path(path: &Path) -> Result<Self, RouterError> {
        match path.extension().and_then(|e| e.to_str()) {
            Some("json") => Ok(FileFormat::Json),
            Some("yaml" | "yml") => Ok(FileFormat::Yaml),
            _ => Err(RouterError::Invalid(format!(
                "{}: fledge edits RDS files ending in .json, .yaml or .yml (Envoy picks the \
                 format by extension)",
                path.display()
            ))),
        }
    }
}

/// A parsed RDS file; edited in place, then rendered in its own format.
enum Document {
    Json {
        value: serde_json::Value,
        pretty: bool,
        trailing_newline: bool,
    },
    Yaml(serde_yaml::Value),
}

impl Document {
    fn read(path: &Path, format: FileFormat) -> Result<Self, RouterError> {
        let text = fs::read_to_string(path).map_err(|source| RouterError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let invalid = |error: String| {
            RouterError::Invalid(format!(
                "{} is not valid {format:?}: {error}",
                path.display()
            ))
        };
        match format {
            FileFormat::Json => Ok(Document::Json {
                value: serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?,
                pretty: text.trim().contains('\n'),
                trailing_newline: text.ends_with('\n'),
            }),
            FileFormat::Yaml => Ok(Document::Yaml(
                serde_yaml::from_str(&text).map_err(|e| invalid(e.to_string()))?,
            )),
        }
    }

    fn locate(&self, settings: &EnvoyRdsSettings) -> Result<LocatedRoute, RouterError> {
        match self {
            Document::Json { value, .. } => locate_in_file(value, settings),
            Document::Yaml(value) => locate_in_file(value, settings),
        }
    }

    /// Set the two weights at `located` and bump `version_info`; returns the new version.
    fn apply(
        &mut self,
        located: &LocatedRoute,
        weights: Weights,
        origin: &str,
    ) -> Result<String, RouterError> {
        match self {
            Document::Json { value, .. } => apply_weights(value, located, weights, origin),
            Document::Yaml(value) => apply_weights(value, located, weights, origin),
        }
    }

    fn render(&self, origin: &str) -> Result<String, RouterError> {
        let cannot =
            |error: String| RouterError::Invalid(format!("cannot render {origin}: {error}"));
        match self {
            Document::Json {
                value,
                pretty,
                trailing_newline,
            } => {
                let mut text = if *pretty {
                    serde_json::to_string_pretty(value)
                } else {
                    serde_json::to_string(value)
                }
                .map_err(|e| cannot(e.to_string()))?;
                if *trailing_newline {
                    text.push('\n');
                }
                Ok(text)
            }
            Document::Yaml(value) => {
                serde_yaml::to_string(value).map_err(|e| cannot(e.to_string()))
            }
        }
    }
}

/// The little a route lookup needs from a document tree, for JSON and YAML alike.
trait Node: Sized {
    fn field(&self, key: &str) -> Option<&Self>;
    fn field_mut(&mut self, key: &str) -> Option<&mut Self>;
    fn elements(&self) -> Option<&[Self]>;
    fn elements_mut(&mut self) -> Option<&mut [Self]>;
    fn text(&self) -> Option<&str>;
    /// A non-negative integer, written as a number or (protobuf JSON style) a string.
    fn unsigned(&self) -> Option<u64>;
    /// Insert or replace `key` in a mapping; false if this is not a mapping.
    fn set_unsigned(&mut self, key: &str, value: u64) -> bool;
    fn set_text(&mut self, key: &str, value: &str) -> bool;

    fn name(&self) -> Option<&str> {
        self.field("name").and_then(Node::text)
    }

    fn element_mut(&mut self, key: &str, index: usize) -> Option<&mut Self> {
        self.field_mut(key)?.elements_mut()?.get_mut(index)
    }
}

fn unsigned_from_text_or_float(text: Option<&str>, float: Option<f64>) -> Option<u64> {
    if let Some(parsed) = text.and_then(|t| t.trim().parse::<u64>().ok()) {
        return Some(parsed);
    }
    // 2^64: the first value that does not fit.
    float
        .filter(|f| {
            f.is_finite() && *f >= 0.0 && f.fract() == 0.0 && *f < 18_446_744_073_709_551_616.0
        })
        .map(|f| f as u64)
}

impl Node for serde_json::Value {
    fn field(&self, key: &str) -> Option<&Self> {
        self.as_object()?.get(key)
    }
    fn field_mut(&mut self, key: &str) -> Option<&mut Self> {
        self.as_object_mut()?.get_mut(key)
    }
    fn elements(&self) -> Option<&[Self]> {
        self.as_array().map(Vec::as_slice)
    }
    fn elements_mut(&mut self) -> Option<&mut [Self]> {
        self.as_array_mut().map(Vec::as_mut_slice)
    }
    fn text(&self) -> Option<&str> {
        self.as_str()
    }
    fn unsigned(&self) -> Option<u64> {
        self.as_u64()
            .or_else(|| unsigned_from_text_or_float(self.as_str(), self.as_f64()))
    }
    fn set_unsigned(&mut self, key: &str, value: u64) -> bool {
        self.as_object_mut()
            .map(|object| object.insert(key.to_string(), value.into()))
            .is_some()
    }
    fn set_text(&mut self, key: &str, value: &str) -> bool {
        self.as_object_mut()
            .map(|object| object.insert(key.to_string(), value.into()))
            .is_some()
    }
}

impl Node for serde_yaml::Value {
    fn field(&self, key: &str) -> Option<&Self> {
        self.as_mapping()?.get(key)
    }
    fn field_mut(&mut self, key: &str) -> Option<&mut Self> {
        self.as_mapping_mut()?.get_mut(key)
    }
    fn elements(&self) -> Option<&[Self]> {
        self.as_sequence().map(Vec::as_slice)
    }
    fn elements_mut(&mut self) -> Option<&mut [Self]> {
        self.as_sequence_mut().map(Vec::as_mut_slice)
    }
    fn text(&self) -> Option<&str> {
        self.as_str()
    }
    fn unsigned(&self) -> Option<u64> {
        self.as_u64()
            .or_else(|| unsigned_from_text_or_float(self.as_str(), self.as_f64()))
    }
    fn set_unsigned(&mut self, key: &str, value: u64) -> bool {
        self.as_mapping_mut()
            .map(|mapping| mapping.insert(key.into(), value.into()))
            .is_some()
    }
    fn set_text(&mut self, key: &str, value: &str) -> bool {
        self.as_mapping_mut()
            .map(|mapping| mapping.insert(key.into(), value.into()))
            .is_some()
    }
}

/// Where the canary's route is in a document, and its current raw weights.
#[derive(Debug, Clone, PartialEq)]
struct LocatedRoute {
    /// Index in the file's `resources`; `None` when the route configuration is the root (live).
    resource: Option<usize>,
    virtual_host: usize,
    route: usize,
    stable_cluster: usize,
    canary_cluster: usize,
    stable_weight: u64,
    canary_weight: u64,
}

impl LocatedRoute {
    /// The split in percent, if it is a whole-percent split (see module docs).
    fn percent(&self, settings: &EnvoyRdsSettings, origin: &str) -> Result<Weights, RouterError> {
        let (stable, canary) = (self.stable_weight, self.canary_weight);
        let total = stable + canary;
        let whole_percent = total > 0 && (stable * 100) % total == 0;
        if !whole_percent {
            return Err(RouterError::Invalid(format!(
                "{} weights {:?}={stable} and {:?}={canary} in {} are not a whole-percent split; \
                 set weights that sum to 100",
                describe_route(settings),
                settings.stable_cluster,
                settings.canary_cluster,
                origin
            )));
        }
        // Both fit in u32 because they are at most 100.
        let stable_percent = u32::try_from(stable * 100 / total).unwrap_or(100);
        Ok(Weights {
            stable: stable_percent,
            canary: 100 - stable_percent.min(100),
        })
    }
}

fn describe_route(settings: &EnvoyRdsSettings) -> String {
    format!(
        "route {:?} in virtual host {:?} of route configuration {:?}",
        settings.route, settings.virtual_host, settings.route_configuration
    )
}

/// What a list holds, to help fix a typo or a missing name: `it has "a", "b"`,
/// `its 1 route has no "name"`, `it has "a" and 2 routes without a "name"`, `it has none`.
/// Also the fix: add an entry called `wanted`, or name the unnamed one.
fn not_found_help<'a>(
    names: impl Iterator<Item = Option<&'a str>>,
    noun: &str,
    wanted: &str,
) -> (String, String) {
    let mut named = Vec::new();
    let mut unnamed = 0usize;
    for name in names {
        match name {
            Some(name) => named.push(format!("{name:?}")),
            None => unnamed += 1,
        }
    }
    if named.len() > 10 {
        named.truncate(10);
        named.push("...".to_string());
    }
    let plural = |n: usize| {
        if n == 1 {
            noun.to_string()
        } else {
            format!("{noun}s")
        }
    };
    let present = match (named.is_empty(), unnamed) {
        (true, 0) => format!("it has no {noun}s"),
        (true, 1) => format!("its 1 {noun} has no \"name\""),
        (true, n) => format!("its {n} {noun}s have no \"name\""),
        (false, 0) => format!("it has {}", named.join(", ")),
        (false, n) => format!(
            "it has {} and {n} {} without a \"name\"",
            named.join(", "),
            plural(n)
        ),
    };
    let fix = if unnamed > 0 {
        format!("give the {noun} fledge should use \"name\": {wanted:?}")
    } else {
        format!("add a {noun} with \"name\": {wanted:?}")
    };
    (present, fix)
}

/// The one element of `items` called `name`; an error if there are several.
fn find_unique<'a, N: Node>(
    items: &'a [N],
    name: &str,
    what: &str,
    origin: &str,
) -> Result<Option<(usize, &'a N)>, RouterError> {
    let mut matches = items
        .iter()
        .enumerate()
        .filter(|(_, item)| item.name() == Some(name));
    let first = matches.next();
    if matches.next().is_some() {
        return Err(RouterError::Invalid(format!(
            "{what} {name:?} appears more than once in {origin}; names must be unique"
        )));
    }
    Ok(first)
}

fn locate_in_file<N: Node>(
    root: &N,
    settings: &EnvoyRdsSettings,
) -> Result<LocatedRoute, RouterError> {
    let origin = settings.path.display().to_string();
    let resources = root
        .field("resources")
        .and_then(Node::elements)
        .ok_or_else(|| {
            RouterError::Invalid(format!(
                "{origin} has no \"resources\" list; Envoy's path_config_source expects a \
             DiscoveryResponse: {{\"version_info\": \"1\", \"resources\": [{{\"@type\": \
             \"type.googleapis.com/envoy.config.route.v3.RouteConfiguration\", ...}}]}}"
            ))
        })?;
    let name = &settings.route_configuration;
    let (index, route_configuration) =
        find_unique(resources, name, "route configuration", &origin)?.ok_or_else(|| {
            let (present, fix) = not_found_help(resources.iter().map(Node::name), "resource", name);
            RouterError::NotFound(format!(
                "route configuration {name:?} not found in {origin} ({present}): {fix}"
            ))
        })?;
    let mut located = locate_route(route_configuration, settings, &origin)?;
    located.resource = Some(index);
    Ok(located)
}

/// Find the route and its two clusters inside one RouteConfiguration.
fn locate_route<N: Node>(
    route_configuration: &N,
    settings: &EnvoyRdsSettings,
    origin: &str,
) -> Result<LocatedRoute, RouterError> {
    let rc_name = &settings.route_configuration;
    let vh_name = &settings.virtual_host;
    let route_name = &settings.route;
    let virtual_hosts = route_configuration
        .field("virtual_hosts")
        .and_then(Node::elements)
        .unwrap_or_default();
    let (vh_index, virtual_host) = find_unique(virtual_hosts, vh_name, "virtual host", origin)?
        .ok_or_else(|| {
            let (present, fix) = not_found_help(
                virtual_hosts.iter().map(Node::name),
                "virtual host",
                vh_name,
            );
            RouterError::NotFound(format!(
                "virtual host {vh_name:?} not found in route configuration {rc_name:?} in \
                 {origin} ({present}): {fix}"
            ))
        })?;
    let routes = virtual_host
        .field("routes")
        .and_then(Node::elements)
        .unwrap_or_default();
    let (route_index, route) =
        find_unique(routes, route_name, "route", origin)?.ok_or_else(|| {
            let (present, fix) = not_found_help(routes.iter().map(Node::name), "route", route_name);
            RouterError::NotFound(format!(
                "route {route_name:?} not found in virtual host {vh_name:?} of route \
                 configuration {rc_name:?} in {origin} ({present}): {fix}"
            ))
        })?;
    let clusters = route
        .field("route")
        .and_then(|r| r.field("weighted_clusters"))
        .and_then(|w| w.field("clusters"))
        .and_then(Node::elements)
        .ok_or_else(|| {
            RouterError::Invalid(format!(
                "{} in {origin} has no route.weighted_clusters.clusters: give it \
                 \"weighted_clusters\": {{\"clusters\": [{{\"name\": {:?}, \"weight\": 100}}, \
                 {{\"name\": {:?}, \"weight\": 0}}]}}",
                describe_route(settings),
                settings.stable_cluster,
                settings.canary_cluster
            ))
        })?;

    let cluster = |name: &str| -> Result<(usize, u64), RouterError> {
        let (index, entry) =
            find_unique(clusters, name, "weighted cluster", origin)?.ok_or_else(|| {
                let (present, _) = not_found_help(clusters.iter().map(Node::name), "cluster", name);
                RouterError::NotFound(format!(
                    "cluster {name:?} not found in weighted_clusters of {} in {origin} \
                     ({present}): add {{\"name\": {name:?}, \"weight\": 0}}",
                    describe_route(settings),
                ))
            })?;
        Ok((index, cluster_weight(entry, name, settings, origin)?))
    };
    let (stable_cluster, stable_weight) = cluster(&settings.stable_cluster)?;
    let (canary_cluster, canary_weight) = cluster(&settings.canary_cluster)?;

    for (index, entry) in clusters.iter().enumerate() {
        if index == stable_cluster || index == canary_cluster {
            continue;
        }
        let name = entry.name().unwrap_or("(without a name)");
        let weight = cluster_weight(entry, name, settings, origin)?;
        if weight != 0 {
            return Err(RouterError::Invalid(format!(
                "cluster {name:?} has weight {weight} in {} in {origin}; fledge splits traffic \
                 only between {:?} and {:?}, so other clusters must have weight 0 or be removed",
                describe_route(settings),
                settings.stable_cluster,
                settings.canary_cluster
            )));
        }
    }

    Ok(LocatedRoute {
        resource: None,
        virtual_host: vh_index,
        route: route_index,
        stable_cluster,
        canary_cluster,
        stable_weight,
        canary_weight,
    })
}

/// A cluster's weight; absent means 0, as in Envoy.
fn cluster_weight<N: Node>(
    entry: &N,
    name: &str,
    settings: &EnvoyRdsSettings,
    origin: &str,
) -> Result<u64, RouterError> {
    let Some(weight) = entry.field("weight") else {
        return Ok(0);
    };
    weight
        .unsigned()
        .filter(|w| *w <= u64::from(u32::MAX))
        .ok_or_else(|| {
            RouterError::Invalid(format!(
                "weight of cluster {name:?} in {} in {origin} is not a whole number from 0 to \
                 4294967295",
                describe_route(settings)
            ))
        })
}

fn apply_weights<N: Node>(
    root: &mut N,
    located: &LocatedRoute,
    weights: Weights,
    origin: &str,
) -> Result<String, RouterError> {
    let moved = || RouterError::Invalid(format!("{origin}: route moved while editing"));
    let resource = located.resource.ok_or_else(moved)?;
    let clusters = root
        .element_mut("resources", resource)
        .and_then(|rc| rc.element_mut("virtual_hosts", located.virtual_host))
        .and_then(|vh| vh.element_mut("routes", located.route))
        .and_then(|route| route.field_mut("route"))
        .and_then(|action| action.field_mut("weighted_clusters"))
        .and_then(|weighted| weighted.field_mut("clusters"))
        .and_then(Node::elements_mut)
        .ok_or_else(moved)?;
    for (index, weight) in [
        (located.stable_cluster, weights.stable),
        (located.canary_cluster, weights.canary),
    ] {
        let updated = clusters
            .get_mut(index)
            .is_some_and(|cluster| cluster.set_unsigned("weight", u64::from(weight)));
        if !updated {
            return Err(moved());
        }
    }
    let version = next_version(root.field("version_info").and_then(|v| {
        v.text()
            .map(str::to_string)
            .or_else(|| v.unsigned().map(|n| n.to_string()))
    }));
    if !root.set_text("version_info", &version) {
        return Err(RouterError::Invalid(format!(
            "{origin}: the document is not a mapping"
        )));
    }
    Ok(version)
}

/// The version after `current`: its trailing number plus one (`"41"` → `"42"`, `"v9"` →
/// `"v10"`), `"<current>-1"` if it does not end in a digit, `"1"` if there is none. Envoy does
/// not order versions; a change just makes updates easy to tell apart in `config_dump`.
fn next_version(current: Option<String>) -> String {
    let Some(current) = current.filter(|v| !v.is_empty()) else {
        return "1".to_string();
    };
    let prefix = current.trim_end_matches(|c: char| c.is_ascii_digit());
    let digits = current.get(prefix.len()..).unwrap_or_default();
    if digits.is_empty() {
        return format!("{current}-1");
    }
    // Decimal increment on the text, so any length works.
    let mut incremented: Vec<char> = digits.chars().collect();
    let mut carry = true;
    for digit in incremented.iter_mut().rev() {
        if !carry {
            break;
        }
        if *digit == '9' {
            *digit = '0';
        } else {
            *digit = char::from_digit(digit.to_digit(10).unwrap_or(0) + 1, 10).unwrap_or('1');
            carry = false;
        }
    }
    let mut next = prefix.to_string();
    if carry {
        next.push('1');
    }
    next.extend(incremented);
    next
}

#[cfg(test)]
mod tests {
    use super::*;
    use fledge_testkit::http::{closed_port_url, FakeEndpoint, Reply};
    use serde_json::json;

    const EXAMPLE_JSON: &str = r#"{"version_info":"1","resources":[{"@type":"type.googleapis.com/envoy.config.route.v3.RouteConfiguration","name":"fledge_route","virtual_hosts":[{"name":"app","domains":["*"],"routes":[{"name":"primary","match":{"prefix":"/"},"route":{"weighted_clusters":{"clusters":[{"name":"app_stable","weight":100},{"name":"app_canary","weight":0}]}}}]}]}]}"#;

    fn settings(path: &Path, admin_url: &str) -> EnvoyRdsSettings {
        EnvoyRdsSettings {
            path: path.to_path_buf(),
            route_configuration: "fledge_route".to_string(),
            virtual_host: "app".to_string(),
            route: "primary".to_string(),
            stable_cluster: "app_stable".to_string(),
            canary_cluster: "app_canary".to_string(),
            admin_url: admin_url.to_string(),
            verify_timeout: Duration::from_millis(500),
        }
    }

    fn router_for(
        dir: &tempfile::TempDir,
        file_name: &str,
        contents: &str,
    ) -> (EnvoyRdsRouter, PathBuf) {
        let path = dir.path().join(file_name);
        fs::write(&path, contents).unwrap();
        let router = EnvoyRdsRouter::new(settings(&path, "http://127.0.0.1:9")).unwrap();
        (router, path)
    }

    fn files_in(dir: &tempfile::TempDir) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn weights(stable: u32, canary: u32) -> Weights {
        Weights { stable, canary }
    }

    /// A richer document: unknown fields, another route, another vhost, another resource.
    fn rich_document() -> serde_json::Value {
        json!({
            "version_info": "41",
            "x_unknown_top": {"keep": [1, 2, 3]},
            "resources": [
                {"@type": "type.googleapis.com/envoy.config.route.v3.RouteConfiguration", "name": "other_route",
                 "virtual_hosts": [{"name": "app", "domains": ["other"], "routes": [
                    {"name": "primary", "match": {"prefix": "/"}, "route": {"weighted_clusters": {"clusters": [
                        {"name": "app_stable", "weight": 50}, {"name": "app_canary", "weight": 50}]}}}]}]},
                {"@type": "type.googleapis.com/envoy.config.route.v3.RouteConfiguration", "name": "fledge_route",
                 "request_headers_to_add": [{"header": {"key": "x-a", "value": "b"}}],
                 "virtual_hosts": [
                    {"name": "admin", "domains": ["admin.local"], "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "admin"}}]},
                    {"name": "app", "domains": ["*"], "routes": [
                        {"name": "pinned", "match": {"prefix": "/", "headers": [{"name": "x-canary", "string_match": {"exact": "true"}}]},
                         "route": {"cluster": "app_canary"}},
                        {"name": "primary", "match": {"prefix": "/"}, "typed_per_filter_config": {"x": {"y": "z"}},
                         "route": {"timeout": "3s", "weighted_clusters": {"runtime_key_prefix": "rk", "clusters": [
                            {"name": "app_stable", "weight": "90", "request_headers_to_add": [{"header": {"key": "x-subset", "value": "stable"}}]},
                            {"name": "app_canary", "weight": 10, "future_field": true},
                            {"name": "app_shadow", "weight": 0}]}}}]}]}
            ]
        })
    }

    #[tokio::test]
    async fn reads_the_example_file() {
        let dir = tempfile::tempdir().unwrap();
        let (router, _) = router_for(&dir, "routes.json", EXAMPLE_JSON);
        assert_eq!(router.get_weights().await.unwrap(), weights(100, 0));
    }

    #[tokio::test]
    async fn set_weights_changes_only_the_two_weights_and_the_version() {
        let dir = tempfile::tempdir().unwrap();
        let original = rich_document();
        let (router, path) = router_for(
            &dir,
            "routes.json",
            &serde_json::to_string_pretty(&original).unwrap(),
        );
        assert_eq!(router.get_weights().await.unwrap(), weights(90, 10));

        router.set_weights(weights(75, 25)).await.unwrap();
        let written: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
        let mut expected = original;
        let clusters = &mut expected["resources"][1]["virtual_hosts"][1]["routes"][1]["route"]
            ["weighted_clusters"]["clusters"];
        clusters[0]["weight"] = json!(75);
        clusters[1]["weight"] = json!(25);
        expected["version_info"] = json!("42");
        assert_eq!(written, expected);
        assert_eq!(router.get_weights().await.unwrap(), weights(75, 25));
        assert_eq!(files_in(&dir), vec!["routes.json"]);
    }

    #[tokio::test]
    async fn compact_json_stays_compact_and_pretty_stays_pretty() {
        let dir = tempfile::tempdir().unwrap();
        let (router, path) = router_for(&dir, "routes.json", EXAMPLE_JSON);
        router.set_weights(weights(90, 10)).await.unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert!(!text.contains('\n'), "{text}");
        assert!(text.contains(r#""version_info":"2""#), "{text}");

        let pretty = format!(
            "{}\n",
            serde_json::to_string_pretty(&rich_document()).unwrap()
        );
        let (router, path) = router_for(&dir, "pretty.json", &pretty);
        router.set_weights(weights(80, 20)).await.unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.contains("\n  ") && text.ends_with("}\n"), "{text}");
    }

    #[tokio::test]
    async fn yaml_round_trip_keeps_yaml() {
        let yaml = r#"version_info: "7"
resources:
- "@type": type.googleapis.com/envoy.config.route.v3.RouteConfiguration
  name: fledge_route
  virtual_hosts:
  - name: app
    domains: ["*"]
    routes:
    - name: primary
      match: {prefix: "/"}
      route:
        weighted_clusters:
          clusters:
          - {name: app_stable, weight: 100, request_headers_to_add: [{header: {key: x-subset, value: stable}}]}
          - {name: app_canary, weight: 0}
      x_unknown: [a, b]
"#;
        for file_name in ["routes.yaml", "routes.yml"] {
            let dir = tempfile::tempdir().unwrap();
            let (router, path) = router_for(&dir, file_name, yaml);
            assert_eq!(router.get_weights().await.unwrap(), weights(100, 0));
            router.set_weights(weights(95, 5)).await.unwrap();
            let text = fs::read_to_string(&path).unwrap();
            assert!(
                serde_json::from_str::<serde_json::Value>(&text).is_err(),
                "still YAML: {text}"
            );
            let written: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
            let mut expected: serde_yaml::Value = serde_yaml::from_str(yaml).unwrap();
            let clusters = &mut expected["resources"][0]["virtual_hosts"][0]["routes"][0]["route"]
                ["weighted_clusters"]["clusters"];
            clusters[0]["weight"] = 95.into();
            clusters[1]["weight"] = 5.into();
            expected["version_info"] = "8".into();
            assert_eq!(written, expected);
            assert_eq!(router.get_weights().await.unwrap(), weights(95, 5));
            assert_eq!(files_in(&dir), vec![file_name.to_string()]);
        }
    }

    #[tokio::test]
    async fn no_write_when_weights_already_match() {
        let dir = tempfile::tempdir().unwrap();
        let scaled = EXAMPLE_JSON
            .replace(r#""weight":100"#, r#""weight":900"#)
            .replace(r#""weight":0"#, r#""weight":100"#);
        let (router, path) = router_for(&dir, "routes.json", &scaled);
        let before = fs::metadata(&path).unwrap();
        let inode = std::os::unix::fs::MetadataExt::ino(&before);
        router.set_weights(weights(90, 10)).await.unwrap();
        let after = fs::metadata(&path).unwrap();
        assert_eq!(
            std::os::unix::fs::MetadataExt::ino(&after),
            inode,
            "the file was replaced"
        );
        assert_eq!(fs::read_to_string(&path).unwrap(), scaled);
    }

    #[tokio::test]
    async fn percent_normalisation() {
        let cases: &[(&str, &str, Option<Weights>)] = &[
            ("100", "0", Some(weights(100, 0))),
            ("1", "0", Some(weights(100, 0))),
            ("900", "100", Some(weights(90, 10))),
            ("1", "1", Some(weights(50, 50))),
            ("\"30\"", "\"70\"", Some(weights(30, 70))),
            ("1", "2", None),
            ("0", "0", None),
            ("-1", "1", None),
            ("1.5", "1", None),
        ];
        let dir = tempfile::tempdir().unwrap();
        for (stable, canary, want) in cases {
            let text = EXAMPLE_JSON
                .replace(r#""weight":100"#, &format!(r#""weight":{stable}"#))
                .replace(r#""weight":0"#, &format!(r#""weight":{canary}"#));
            let (router, _) = router_for(&dir, "routes.json", &text);
            let got = router.get_weights().await;
            match want {
                Some(want) => assert_eq!(got.unwrap(), *want, "{stable}/{canary}"),
                None => assert!(
                    matches!(got, Err(RouterError::Invalid(_))),
                    "{stable}/{canary}: {got:?}"
                ),
            }
        }
    }

    #[tokio::test]
    async fn a_split_that_is_not_whole_percent_can_still_be_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let text = EXAMPLE_JSON
            .replace(r#""weight":100"#, r#""weight":1"#)
            .replace(r#""weight":0"#, r#""weight":2"#);
        let (router, _) = router_for(&dir, "routes.json", &text);
        router.set_weights(weights(100, 0)).await.unwrap();
        assert_eq!(router.get_weights().await.unwrap(), weights(100, 0));
    }

    #[tokio::test]
    async fn lookup_errors_say_what_is_missing() {
        let cases: &[(&str, &str, &str)] = &[
            (
                r#""name":"fledge_route""#,
                r#""name":"other""#,
                r#"route configuration "fledge_route" not found in {path} (it has "other"): add a resource with "name": "fledge_route""#,
            ),
            (
                r#""routes":[{"name":"primary","#,
                r#""routes":[{"#,
                r#"route "primary" not found in virtual host "app" of route configuration "fledge_route" in {path} (its 1 route has no "name"): give the route fledge should use "name": "primary""#,
            ),
            (
                r#""name":"app""#,
                r#""name":"web""#,
                r#"virtual host "app" not found in route configuration "fledge_route" in {path} (it has "web"): add a virtual host with "name": "app""#,
            ),
            (
                r#""name":"primary""#,
                r#""name":"main""#,
                r#"route "primary" not found in virtual host "app" of route configuration "fledge_route" in {path} (it has "main"): add a route with "name": "primary""#,
            ),
            (
                r#""name":"app_canary""#,
                r#""name":"app_v2""#,
                r#"cluster "app_canary" not found in weighted_clusters of route "primary" in virtual host "app" of route configuration "fledge_route" in {path} (it has "app_stable", "app_v2"): add {"name": "app_canary", "weight": 0}"#,
            ),
            (
                r#""weighted_clusters":{"clusters""#,
                r#""weighted_clusters":{"clusterz""#,
                r#"has no route.weighted_clusters.clusters"#,
            ),
            (
                r#""resources""#,
                r#""resourcez""#,
                r#"has no "resources" list"#,
            ),
            (
                r#"{"name":"app_canary","weight":0}"#,
                r#"{"name":"app_canary","weight":0},{"name":"app_x","weight":3}"#,
                r#"cluster "app_x" has weight 3"#,
            ),
            (
                r#"{"name":"app_canary","weight":0}"#,
                r#"{"name":"app_canary","weight":0},{"name":"app_canary","weight":0}"#,
                r#"weighted cluster "app_canary" appears more than once"#,
            ),
            (EXAMPLE_JSON, "{not json", "is not valid Json"),
        ];
        let dir = tempfile::tempdir().unwrap();
        for (from, to, fragment) in cases {
            let text = EXAMPLE_JSON.replace(from, to);
            assert_ne!(text, EXAMPLE_JSON, "case {from} did not apply");
            let (router, path) = router_for(&dir, "routes.json", &text);
            let fragment = fragment.replace("{path}", &path.display().to_string());
            let error = router.get_weights().await.unwrap_err();
            assert!(
                error.to_string().contains(&fragment),
                "{error}\nshould contain\n{fragment}"
            );
            if let RouterError::NotFound(_) = error {
                // Exactly what was not found, nothing that was found.
                assert_eq!(error.to_string(), fragment);
            }
            let write_error = router.set_weights(weights(50, 50)).await.unwrap_err();
            assert_eq!(write_error.to_string(), error.to_string());
            assert_eq!(
                fs::read_to_string(&path).unwrap(),
                text,
                "untouched on error"
            );
        }
        let missing = EnvoyRdsRouter::new(settings(
            &dir.path().join("absent.json"),
            "http://127.0.0.1:9",
        ))
        .unwrap();
        assert!(matches!(
            missing.get_weights().await,
            Err(RouterError::Io { .. })
        ));
    }

    #[tokio::test]
    async fn invalid_settings_and_weights_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            EnvoyRdsRouter::new(settings(
                &dir.path().join("routes.pb"),
                "http://127.0.0.1:9"
            )),
            Err(RouterError::Invalid(_))
        ));
        assert!(matches!(
            EnvoyRdsRouter::new(settings(&dir.path().join("routes.json"), "not a url")),
            Err(RouterError::Invalid(_))
        ));
        let mut same = settings(&dir.path().join("routes.json"), "http://127.0.0.1:9");
        same.canary_cluster = same.stable_cluster.clone();
        assert!(matches!(
            EnvoyRdsRouter::new(same),
            Err(RouterError::Invalid(_))
        ));

        let (router, path) = router_for(&dir, "routes.json", EXAMPLE_JSON);
        assert!(matches!(
            router.set_weights(weights(50, 60)).await,
            Err(RouterError::Invalid(_))
        ));
        assert_eq!(fs::read_to_string(path).unwrap(), EXAMPLE_JSON);
    }

    #[tokio::test]
    async fn concurrent_writers_of_one_file_do_not_lose_updates() {
        let dir = tempfile::tempdir().unwrap();
        let two_routes = EXAMPLE_JSON.replace(
            r#"]}}}]}]}]}"#,
            r#"]}}},{"name":"second","match":{"prefix":"/b"},"route":{"weighted_clusters":{"clusters":[{"name":"app_stable","weight":100},{"name":"app_canary","weight":0}]}}}]}]}]}"#,
        );
        let (first, path) = router_for(&dir, "routes.json", &two_routes);
        let mut second_settings = settings(&path, "http://127.0.0.1:9");
        second_settings.route = "second".to_string();
        let second = EnvoyRdsRouter::new(second_settings).unwrap();
        for percent in 1..=20u8 {
            let (a, b) = tokio::join!(
                first.set_weights(Weights::canary_percent(percent)),
                second.set_weights(Weights::canary_percent(percent + 50))
            );
            a.unwrap();
            b.unwrap();
            assert_eq!(
                first.get_weights().await.unwrap(),
                Weights::canary_percent(percent)
            );
            assert_eq!(
                second.get_weights().await.unwrap(),
                Weights::canary_percent(percent + 50)
            );
        }
        assert_eq!(files_in(&dir), vec!["routes.json"]);
    }

    #[test]
    fn version_bumps() {
        let cases = [
            (None, "1"),
            (Some(""), "1"),
            (Some("1"), "2"),
            (Some("41"), "42"),
            (Some("99"), "100"),
            (Some("v9"), "v10"),
            (Some("2024-01-01T00:00:09"), "2024-01-01T00:00:10"),
            (Some("abc"), "abc-1"),
            (Some("99999999999999999999999"), "100000000000000000000000"),
        ];
        for (current, want) in cases {
            assert_eq!(
                next_version(current.map(str::to_string)),
                want,
                "{current:?}"
            );
        }
    }

    #[test]
    fn numeric_version_becomes_a_string() {
        let mut doc: serde_json::Value = serde_json::from_str(
            &EXAMPLE_JSON.replace(r#""version_info":"1""#, r#""version_info":5"#),
        )
        .unwrap();
        let settings = settings(Path::new("/x/routes.json"), "http://127.0.0.1:9");
        let located = locate_in_file(&doc, &settings).unwrap();
        assert_eq!(
            apply_weights(&mut doc, &located, weights(1, 99), "x").unwrap(),
            "6"
        );
        assert_eq!(doc["version_info"], json!("6"));
    }

    /// A fake Envoy admin serving `dump` at `/config_dump`; stopped when dropped.
    async fn fake_admin(dump: serde_json::Value) -> FakeEndpoint {
        let admin = FakeEndpoint::start().await.unwrap();
        set_dump(&admin, &dump);
        admin
    }

    fn set_dump(admin: &FakeEndpoint, dump: &serde_json::Value) {
        admin.reply("/config_dump", Reply::json(200, dump));
    }

    /// The shape Envoy 1.40 returns for `?resource=dynamic_route_configs`.
    fn live_dump(stable: serde_json::Value, canary: serde_json::Value) -> serde_json::Value {
        json!({"configs": [{
            "@type": "type.googleapis.com/envoy.admin.v3.RoutesConfigDump.DynamicRouteConfig",
            "version_info": "3",
            "route_config": {
                "@type": "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
                "name": "fledge_route",
                "virtual_hosts": [{"name": "app", "domains": ["*"], "routes": [{
                    "match": {"prefix": "/"},
                    "route": {"weighted_clusters": {"clusters": [
                        {"name": "app_stable", "weight": stable},
                        {"name": "app_canary", "weight": canary}]}},
                    "name": "primary"}]}]},
            "last_updated": "2026-11-24T07:35:25.679Z"}]})
    }

    fn verifying_router(admin: &FakeEndpoint, timeout: Duration) -> EnvoyRdsRouter {
        let mut settings = settings(Path::new("/unused/routes.json"), admin.url());
        settings.verify_timeout = timeout;
        EnvoyRdsRouter::new(settings).unwrap()
    }

    #[tokio::test]
    async fn ensure_through_the_trait_writes_only_what_differs_then_waits_for_envoy() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routes.json");
        fs::write(&path, EXAMPLE_JSON).unwrap();
        let admin = fake_admin(live_dump(json!(80), json!(20))).await;
        let mut settings = settings(&path, admin.url());
        settings.verify_timeout = Duration::from_millis(300);
        let router: Box<dyn TrafficRouter> = Box::new(EnvoyRdsRouter::new(settings).unwrap());
        assert_eq!(
            router.route().to_string(),
            format!(
                "RDS file {} route \"fledge_route/app/primary\"",
                path.display()
            )
        );
        let desired = DesiredRoutes::during_rollout(weights(80, 20));
        let ensured = router.ensure(&desired).await.unwrap();
        assert_eq!(
            ensured,
            Ensured {
                found: weights(100, 0),
                wrote: true
            }
        );
        let again = router.ensure(&desired).await.unwrap();
        assert_eq!(
            again,
            Ensured {
                found: weights(80, 20),
                wrote: false
            }
        );
        // Written but not live: not ensured.
        let err = router
            .ensure(&DesiredRoutes::weights_only(weights(100, 0)))
            .await
            .unwrap_err();
        assert!(matches!(err, RouterError::NotLive { .. }), "{err}");
    }

    #[tokio::test]
    async fn verify_accepts_live_weights_as_numbers_or_strings() {
        let admin = fake_admin(live_dump(json!(90), json!(10))).await;
        let router = verifying_router(&admin, Duration::from_millis(300));
        router.verify(weights(90, 10)).await.unwrap();
        assert_eq!(
            admin.requests()[0].query.as_deref(),
            Some("resource=dynamic_route_configs")
        );

        set_dump(&admin, &live_dump(json!("80"), json!("20")));
        router.verify(weights(80, 20)).await.unwrap();

        // Without ?resource= Envoy nests the same entries one level deeper.
        let nested = json!({"configs": [{"@type": "type.googleapis.com/envoy.admin.v3.RoutesConfigDump",
            "dynamic_route_configs": live_dump(json!(70), json!(30))["configs"].clone()}]});
        set_dump(&admin, &nested);
        router.verify(weights(70, 30)).await.unwrap();
    }

    #[tokio::test]
    async fn verify_waits_for_the_weights_to_go_live() {
        let admin = Arc::new(fake_admin(live_dump(json!(100), json!(0))).await);
        let router = verifying_router(&admin, Duration::from_secs(3));
        let flipped = Arc::clone(&admin);
        let flip = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(250)).await;
            set_dump(&flipped, &live_dump(json!(50), json!(50)));
        });
        let started = Instant::now();
        router.verify(weights(50, 50)).await.unwrap();
        assert!(started.elapsed() >= Duration::from_millis(250));
        assert!(admin.requests().len() >= 2);
        flip.await.unwrap();
    }

    #[tokio::test]
    async fn verify_reports_what_is_live() {
        let admin = fake_admin(live_dump(json!(100), json!(0))).await;
        let router = verifying_router(&admin, Duration::from_millis(250));
        let started = Instant::now();
        match router.verify(weights(90, 10)).await {
            Err(RouterError::NotLive {
                want,
                live,
                waited_ms,
            }) => {
                assert_eq!(want, weights(90, 10));
                assert_eq!(live, Some(weights(100, 0)));
                assert!((250..2000).contains(&waited_ms), "{waited_ms}");
            }
            other => panic!("expected NotLive, got {other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(2));

        set_dump(&admin, &json!({"configs": []}));
        assert!(matches!(
            router.verify(weights(90, 10)).await,
            Err(RouterError::NotLive { live: None, .. })
        ));
    }

    #[tokio::test]
    async fn verify_without_an_admin_is_an_admin_error() {
        let closed_port_url = closed_port_url().unwrap();
        let mut settings = settings(Path::new("/unused/routes.json"), &closed_port_url);
        settings.verify_timeout = Duration::from_millis(200);
        let router = EnvoyRdsRouter::new(settings).unwrap();
        match router.verify(weights(90, 10)).await {
            Err(RouterError::Admin(message)) => {
                assert!(message.contains(&closed_port_url), "{message}")
            }
            other => panic!("expected Admin, got {other:?}"),
        }
    }
}
