//! # fledge-controller
//!
//! The I/O shell around `fledge-core`. For each canary it loops:
//!
//! ```text
//! MetricsSource::observe ──▶ core::rollout::step ──▶ TrafficRouter::set_weights + verify ──▶ state file
//!   (Envoy admin scrape)       (pure decision)          (Envoy file RDS)                     + HTTP status API
//! ```

pub mod metrics;
pub mod router;
