//! Metrics sources: where the controller reads per-subset traffic from.
//!
//! A source is built for one canary and returns, on each call, the traffic of that canary's
//! stable and canary subsets *since the previous call* (a per-interval delta), or a typed
//! error — never a silent zero. New backends are new files implementing [`MetricsSource`].

pub mod envoy_admin;
pub mod prometheus;
pub mod promtext;

pub use envoy_admin::{EnvoyAdminSource, EnvoyAdminSourceError};
pub use prometheus::{PrometheusSource, PrometheusSourceError};

use async_trait::async_trait;
use fledge_core::observe::{Observation, ObservationError};

/// Which series of the filter's metrics belong to one canary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubsetSelector {
    /// Value of the `fledge_service` label.
    pub service: String,
    /// Value of the `fledge_subset` label for the stable version.
    pub stable_subset: String,
    /// Value of the `fledge_subset` label for the canary version.
    pub canary_subset: String,
}

/// `Sync` (like [`crate::router::TrafficRouter`]) so a task owning a boxed source can hold
/// `&self` across an await point and still be spawned.
#[async_trait]
pub trait MetricsSource: Send + Sync {
    /// Traffic since the previous call. The first call only records a baseline and returns
    /// `Err(ObservationError::Baseline)`. After any other error the previous reading is kept,
    /// so the next `Ok` covers everything since the last successful call.
    async fn observe(&mut self) -> Result<Observation, ObservationError>;

    /// When the filter's data-plane guard for this canary's service tripped
    /// (`fledge_guard_tripped`, the newest trip across gateways); `None` while it is armed.
    /// Cheap: the controller asks every `guard.checkInterval` between analysis intervals.
    /// Sources that cannot tell answer `Ok(None)`.
    async fn guard_tripped_at(
        &mut self,
    ) -> Result<Option<chrono::DateTime<chrono::Utc>>, ObservationError> {
        Ok(None)
    }
}
