//! The controller's notion of "now", passed in so tests can drive time.
//!
//! Production uses the system clock. Tests use [`TokioClock`], which follows tokio's clock: with
//! `tokio::time::pause()` the whole controller (requeues, lease renewals, analysis ticks and the
//! timestamps written to `.status`) moves together and deterministically.

use chrono::{DateTime, Utc};

pub trait Clock: Send + Sync {
    fn now(&self) -> DateTime<Utc>;
}

/// The real wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// Wall-clock time that advances with tokio's (pausable) clock from a fixed start.
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    start_utc: DateTime<Utc>,
    start: tokio::time::Instant,
}

impl TokioClock {
    pub fn starting_at(start_utc: DateTime<Utc>) -> Self {
        TokioClock {
            start_utc,
            start: tokio::time::Instant::now(),
        }
    }
}

impl Clock for TokioClock {
    fn now(&self) -> DateTime<Utc> {
        let elapsed = tokio::time::Instant::now().duration_since(self.start);
        self.start_utc + chrono::Duration::from_std(elapsed).unwrap_or(chrono::Duration::MAX)
    }
}

/// Convert to the timestamp type `k8s-openapi` uses (`jiff`).
pub fn to_k8s_timestamp(time: DateTime<Utc>) -> k8s_openapi::jiff::Timestamp {
    k8s_openapi::jiff::Timestamp::from_microsecond(time.timestamp_micros())
        .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH)
}

/// Convert from the timestamp type `k8s-openapi` uses (`jiff`).
pub fn from_k8s_timestamp(time: k8s_openapi::jiff::Timestamp) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(time.as_microsecond()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn tokio_clock_follows_paused_time() {
        let start = DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        let clock = TokioClock::starting_at(start);
        assert_eq!(clock.now(), start);
        tokio::time::sleep(std::time::Duration::from_secs(90)).await;
        assert_eq!(clock.now(), start + chrono::Duration::seconds(90));
    }

    #[test]
    fn k8s_timestamps_round_trip_to_the_microsecond() {
        let time = DateTime::from_timestamp(1_700_000_000, 123_456_000).unwrap();
        assert_eq!(from_k8s_timestamp(to_k8s_timestamp(time)), time);
    }
}
