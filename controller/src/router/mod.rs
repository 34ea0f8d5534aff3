//! Traffic routers: the only code that changes where requests go.
//!
//! A router is built for one canary. It reads and writes the stable/canary weights of that
//! canary's route — and nothing else of the route — and checks that new weights are live in the
//! proxy. New backends are new files implementing [`TrafficRouter`].

pub mod envoy_rds;
pub mod istio;
#[cfg(test)]
mod real_envoy_tests;

pub use envoy_rds::{EnvoyRdsRouter, EnvoyRdsSettings};

use async_trait::async_trait;

/// Traffic split in percent; `stable + canary == 100`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Weights {
    pub stable: u32,
    pub canary: u32,
}

impl Weights {
    /// The split that sends `canary_percent` (clamped to 0..=100) to the canary.
    pub fn canary_percent(canary_percent: u8) -> Self {
        let canary = u32::from(canary_percent.min(100));
        Weights {
            stable: 100 - canary,
            canary,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("route configuration not found: {0}")]
    NotFound(String),
    #[error("route configuration is invalid: {0}")]
    Invalid(String),
    #[error("I/O error on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("proxy admin API error: {0}")]
    Admin(String),
    #[error("weights {want:?} not live in the proxy after {waited_ms} ms (live: {live:?})")]
    NotLive {
        want: Weights,
        live: Option<Weights>,
        waited_ms: u64,
    },
}

#[async_trait]
pub trait TrafficRouter: Send + Sync {
    /// Current weights as configured (the desired state the proxy is given).
    async fn get_weights(&self) -> Result<Weights, RouterError>;
    /// Change only the stable/canary weights of the canary's route. A no-op when they are
    /// already set.
    async fn set_weights(&self, weights: Weights) -> Result<(), RouterError>;
    /// Wait (bounded) until the proxy itself serves `weights`; error if it does not.
    async fn verify(&self, weights: Weights) -> Result<(), RouterError>;
}
