//! The stack most end-to-end tests start with: backends v1 (stable) and v2 (canary) and a real
//! Envoy running the Fledge filter for service `app` in front of them.

use crate::{Backend, BackendOptions, Envoy, EnvoyOptions, WasmFilter};
use anyhow::Result;
use std::path::Path;

/// Backends and Envoy; each process stops when its field is dropped.
pub struct AppStack {
    pub stable: Backend,
    pub canary: Backend,
    pub envoy: Envoy,
}

impl AppStack {
    /// Healthy backends; Envoy's files in `<dir>/envoy`; all traffic to stable at first.
    pub fn start(dir: &Path) -> Result<AppStack> {
        Self::start_with(dir, BackendOptions::default(), BackendOptions::default())
    }

    /// [`AppStack::start`] with the backends' behaviour (errors, latency) given.
    pub fn start_with(
        dir: &Path,
        stable: BackendOptions,
        canary: BackendOptions,
    ) -> Result<AppStack> {
        let stable = Backend::start("v1", stable)?;
        let canary = Backend::start("v2", canary)?;
        let envoy = Envoy::start(
            EnvoyOptions::new(stable.port(), canary.port())
                .with_filter(WasmFilter::built(&WasmFilter::default_plugin_config(
                    "app",
                ))?)
                .in_dir(&dir.join("envoy")),
        )?;
        Ok(AppStack {
            stable,
            canary,
            envoy,
        })
    }
}
