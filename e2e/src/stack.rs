//! The stack most end-to-end tests start with: backends v1 (stable) and v2 (canary) and a real
//! Envoy running the Fledge filter for service `app` in front of them, in a scratch directory;
//! optionally load, a Prometheus scraping Envoy and a `fledge run` controller.
//!
//! ```text
//! let mut stack = AppStack::builder("faults")
//!     .canary(BackendOptions { error_rate: 0.5, ..BackendOptions::default() })
//!     .load(LoadOptions::new(100, Duration::from_secs(60)))
//!     .controller(ANALYSIS)
//!     .start()?;
//! let view = stack.controller()?.canary("faults")?;
//! ```

use crate::prometheus::{Prometheus, PrometheusOptions};
use crate::{
    init_tracing, Backend, BackendOptions, CanaryManifest, Controller, Envoy, EnvoyOptions,
    LoadGen, LoadOptions, ScratchDir, WasmFilter,
};
use anyhow::{Context, Result};
use std::path::Path;
use std::time::Duration;

type ManifestFor = Box<dyn FnOnce(&AppStack) -> CanaryManifest>;

/// What [`AppStack::builder`] starts besides the backends and Envoy.
pub struct AppStackBuilder {
    name: String,
    canary_name: Option<String>,
    stable: BackendOptions,
    canary: BackendOptions,
    load: Option<LoadOptions>,
    prometheus: bool,
    controller: Option<ManifestFor>,
}

impl AppStackBuilder {
    /// The stable backend's behaviour (errors, latency); healthy by default.
    pub fn stable(mut self, options: BackendOptions) -> Self {
        self.stable = options;
        self
    }

    /// The canary backend's behaviour; healthy by default.
    pub fn canary(mut self, options: BackendOptions) -> Self {
        self.canary = options;
        self
    }

    /// Load on Envoy's listener, started once Envoy (and Prometheus) are up.
    pub fn load(mut self, options: LoadOptions) -> Self {
        self.load = Some(options);
        self
    }

    /// A Prometheus scraping Envoy's admin, waited for until its target is up.
    pub fn prometheus(mut self) -> Self {
        self.prometheus = true;
        self
    }

    /// The name of [`AppStackBuilder::controller`]'s Canary (default: the stack's name).
    pub fn canary_named(mut self, name: &str) -> Self {
        self.canary_name = Some(name.to_string());
        self
    }

    /// A `fledge run` for a Canary with `analysis` (YAML) as its `spec.analysis` (see
    /// [`AppStack::manifest_for`]), started last.
    pub fn controller(self, analysis: &str) -> Self {
        let analysis = analysis.to_string();
        let name = self
            .canary_name
            .clone()
            .unwrap_or_else(|| self.name.clone());
        self.controller_with(move |stack| {
            let mut manifest = stack.manifest_for(&name);
            manifest.analysis_yaml = analysis;
            manifest
        })
    }

    /// A `fledge run` for the Canary `manifest` makes from the started stack (e.g. one that
    /// reads the stack's Prometheus), started last.
    pub fn controller_with(
        mut self,
        manifest: impl FnOnce(&AppStack) -> CanaryManifest + 'static,
    ) -> Self {
        self.controller = Some(Box::new(manifest));
        self
    }

    /// Start everything in a new scratch directory named after the stack.
    pub fn start(self) -> Result<AppStack> {
        init_tracing();
        let dir = ScratchDir::temp(&self.name)?;
        let stable = Backend::start("v1", self.stable)?;
        let canary = Backend::start("v2", self.canary)?;
        let envoy = Envoy::start(
            EnvoyOptions::new(stable.port(), canary.port())
                .with_filter(WasmFilter::built(&WasmFilter::default_plugin_config(
                    "app",
                ))?)
                .in_dir(&dir.path().join("envoy")),
        )?;
        let mut stack = AppStack {
            controller: None,
            load: None,
            prometheus: None,
            envoy,
            stable,
            canary,
            manifest: None,
            dir,
        };
        if self.prometheus {
            let prometheus = Prometheus::start(
                PrometheusOptions::envoy(&stack.envoy.admin_url())
                    .in_dir(&stack.path().join("prometheus")),
            )?;
            prometheus.wait_for_targets_up(Duration::from_secs(20))?;
            stack.prometheus = Some(prometheus);
        }
        if let Some(options) = self.load {
            stack.load = Some(LoadGen::start(&stack.envoy.listener_url(), options)?);
        }
        if let Some(manifest_for) = self.controller {
            let manifest = manifest_for(&stack);
            stack.controller = Some(Controller::start_in(stack.path(), &manifest)?);
            stack.manifest = Some(manifest);
        }
        Ok(stack)
    }
}

/// A running stack; each process stops when its field is dropped. Fields drop in order: the
/// controller and the load first, then Prometheus, Envoy and the backends, then the directory.
pub struct AppStack {
    pub controller: Option<Controller>,
    pub load: Option<LoadGen>,
    pub prometheus: Option<Prometheus>,
    pub envoy: Envoy,
    pub stable: Backend,
    pub canary: Backend,
    /// What the controller runs, as written to `canary.yaml` in [`AppStack::path`].
    pub manifest: Option<CanaryManifest>,
    dir: ScratchDir,
}

impl AppStack {
    /// A stack named `name` (its scratch directory, and the Canary of
    /// [`AppStackBuilder::controller`]): healthy backends, all traffic to stable at first.
    pub fn builder(name: &str) -> AppStackBuilder {
        AppStackBuilder {
            name: name.to_string(),
            canary_name: None,
            stable: BackendOptions::default(),
            canary: BackendOptions::default(),
            load: None,
            prometheus: false,
            controller: None,
        }
    }

    /// The stack's scratch directory (Envoy's files in `envoy/`, the controller's in
    /// `canary.yaml`, `state/`, `fledge.log`).
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A Canary `name` for service `app` on this stack's Envoy (metrics from its admin, weights
    /// through its RDS file); set `analysis_yaml` and more before writing it.
    pub fn manifest_for(&self, name: &str) -> CanaryManifest {
        CanaryManifest::new(name, "app", &self.envoy.admin_url(), self.envoy.rds_path())
    }

    /// The controller of [`AppStackBuilder::controller`].
    pub fn controller(&mut self) -> Result<&mut Controller> {
        self.controller
            .as_mut()
            .context("this AppStack was built without .controller(...)")
    }

    /// The load of [`AppStackBuilder::load`].
    pub fn load(&self) -> Result<&LoadGen> {
        self.load
            .as_ref()
            .context("this AppStack was built without .load(...)")
    }

    /// The Prometheus of [`AppStackBuilder::prometheus`].
    pub fn prometheus(&self) -> Result<&Prometheus> {
        self.prometheus
            .as_ref()
            .context("this AppStack was built without .prometheus()")
    }

    /// Requests each backend (stable, canary) serves during `window`.
    pub fn served_during(&self, window: Duration) -> Result<(u64, u64)> {
        let (stable, canary) = (self.stable.served()?, self.canary.served()?);
        std::thread::sleep(window);
        Ok((
            self.stable.served()? - stable,
            self.canary.served()? - canary,
        ))
    }
}
