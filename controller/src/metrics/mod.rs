//! Metrics sources: where the controller reads per-subset traffic from.
//!
//! A source is built for one canary and returns, on each call, the traffic of that canary's
//! stable and canary subsets *since the previous call* (a per-interval delta), or a typed
//! error — never a silent zero. New backends are new files implementing [`MetricsSource`].
//!
//! Reads are shared ([`shared`]): one scrape or query per endpoint per tick serves every canary
//! reading that endpoint; each source keeps its own previous reading and delta.

pub mod envoy_admin;
pub mod envoy_cluster_stats;
pub mod prometheus;
pub mod promtext;
pub mod shared;
pub(crate) mod traffic_parts;

pub use envoy_admin::{EnvoyAdminSource, EnvoyAdminSourceError};
pub use prometheus::{PrometheusSource, PrometheusSourceError};
pub use shared::{ReadHub, SharedReads};

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

/// Sum of one subset's interval over several origins (Envoy admin endpoints, or gateway
/// replicas seen through Prometheus), remembering which origin set the bucket layout so a
/// mismatch can name both sides.
pub(crate) struct MergedSubset<'a> {
    subset: &'a str,
    pub(crate) traffic: fledge_core::observe::SubsetTraffic,
    buckets_from: Option<String>,
}

impl<'a> MergedSubset<'a> {
    pub(crate) fn new(subset: &'a str) -> Self {
        MergedSubset {
            subset,
            traffic: Default::default(),
            buckets_from: None,
        }
    }

    /// Add `origin`'s interval; `Err` names both origins and the fix when buckets differ.
    pub(crate) fn add(
        &mut self,
        origin: &str,
        delta: &fledge_core::observe::SubsetTraffic,
    ) -> Result<(), String> {
        let before = self.traffic.latency.bounds_ms.clone();
        if !self.traffic.merge(delta) {
            return Err(format!(
                "latency histogram buckets of subset {:?} differ between gateways: {} has {:?}, \
                 {origin} has {:?}; give every Envoy the same stats_config histogram bucket settings",
                self.subset,
                self.buckets_from.as_deref().unwrap_or("another gateway"),
                before,
                delta.latency.bounds_ms
            ));
        }
        if self.buckets_from.is_none() && !delta.latency.bounds_ms.is_empty() {
            self.buckets_from = Some(origin.to_string());
        }
        Ok(())
    }
}

/// reqwest's top-level message hides the cause ("error sending request"); include the chain.
pub(crate) fn describe_request_error(error: &reqwest::Error) -> String {
    let mut message = if error.is_timeout() {
        format!("timed out: {error}")
    } else {
        error.to_string()
    };
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

/// The chunks of one body (an Envoy page, a Prometheus answer): how they came and how long the slowest took to parse.
#[derive(Default)]
pub(crate) struct ChunkStats {
    pub(crate) bytes: usize,
    pub(crate) count: usize,
    pub(crate) largest: usize,
    pub(crate) slowest: std::time::Duration,
}

impl ChunkStats {
    pub(crate) fn add(&mut self, bytes: usize, parsed_in: std::time::Duration) {
        self.bytes += bytes;
        self.count += 1;
        self.largest = self.largest.max(bytes);
        self.slowest = self.slowest.max(parsed_in);
    }
}
