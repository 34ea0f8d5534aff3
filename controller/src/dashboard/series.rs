//! A bounded time series of per-interval observations for one canary, for the dashboard's
//! charts (request rate, success rate, latency per subset, weight). Kept in memory by the
//! runner only: it is not part of the persisted rollout status.

use chrono::{DateTime, Utc};
use fledge_core::analysis::Verdict;
use fledge_core::observe::{Observation, SubsetTraffic};
use fledge_core::rollout::Phase;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// Most points kept per canary (at a 30 s interval: 6 hours; at 3 s: 36 minutes).
pub const SERIES_LIMIT: usize = 720;

/// One subset's traffic in one interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SubsetPoint {
    pub requests: u64,
    /// Requests per second over the interval.
    pub rps: f64,
    /// Percent of requests that were not 5xx / no response; `None` without requests.
    pub success_rate: Option<f64>,
    /// Latency quantiles from the histogram, in ms; `None` without requests.
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

impl SubsetPoint {
    fn from_traffic(traffic: &SubsetTraffic, seconds: f64) -> Self {
        let requests = traffic.requests();
        SubsetPoint {
            requests,
            rps: if seconds > 0.0 {
                requests as f64 / seconds
            } else {
                0.0
            },
            success_rate: traffic.success_rate_percent(),
            p50_ms: traffic.latency.quantile(0.5),
            p99_ms: traffic.latency.quantile(0.99),
        }
    }
}

/// One analysis interval: what each subset served and the weight it was served at.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IntervalPoint {
    /// End of the interval.
    pub at: DateTime<Utc>,
    /// Length of the interval in seconds.
    pub seconds: f64,
    /// The canary weight during the interval.
    pub canary_weight: u8,
    pub phase: Phase,
    pub stable: SubsetPoint,
    pub canary: SubsetPoint,
    /// The analysis verdict of this interval, when it was judged.
    pub verdict: Option<Verdict>,
}

/// One canary's series, shared between its analysis (which records) and the registry (which
/// reads it only when the dashboard asks for that canary), so it is never copied per interval.
#[derive(Debug, Clone, Default)]
pub struct SharedSeries(std::sync::Arc<std::sync::Mutex<Series>>);

impl SharedSeries {
    fn lock(&self) -> std::sync::MutexGuard<'_, Series> {
        match self.0.lock() {
            Ok(series) => series,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// See [`Series::record`].
    pub fn record(
        &self,
        at: DateTime<Utc>,
        nominal_seconds: f64,
        canary_weight: u8,
        phase: Phase,
        observation: &Observation,
        verdict: Option<Verdict>,
    ) {
        self.lock().record(
            at,
            nominal_seconds,
            canary_weight,
            phase,
            observation,
            verdict,
        );
    }

    /// See [`Series::skip`].
    pub fn skip(&self, at: DateTime<Utc>) {
        self.lock().skip(at);
    }

    pub fn points(&self) -> Vec<IntervalPoint> {
        self.lock().points()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

/// The last [`SERIES_LIMIT`] intervals of one canary.
#[derive(Debug, Clone, Default)]
pub struct Series {
    points: VecDeque<IntervalPoint>,
    last_at: Option<DateTime<Utc>>,
}

impl Series {
    /// Record one observed interval ending at `at`. `nominal_seconds` (the analysis interval)
    /// is used for the first point, whose start is unknown.
    pub fn record(
        &mut self,
        at: DateTime<Utc>,
        nominal_seconds: f64,
        canary_weight: u8,
        phase: Phase,
        observation: &Observation,
        verdict: Option<Verdict>,
    ) {
        let seconds = self
            .last_at
            .map(|last| (at - last).num_milliseconds() as f64 / 1000.0)
            .filter(|s| *s > 0.0)
            .unwrap_or(nominal_seconds);
        self.last_at = Some(at);
        self.points.push_back(IntervalPoint {
            at,
            seconds,
            canary_weight,
            phase,
            stable: SubsetPoint::from_traffic(&observation.stable, seconds),
            canary: SubsetPoint::from_traffic(&observation.canary, seconds),
            verdict,
        });
        while self.points.len() > SERIES_LIMIT {
            self.points.pop_front();
        }
    }

    /// Note that time passed without an observation (e.g. metrics unreachable), so the next
    /// point's rate is computed over its own interval only.
    pub fn skip(&mut self, at: DateTime<Utc>) {
        self.last_at = Some(at);
    }

    pub fn points(&self) -> Vec<IntervalPoint> {
        self.points.iter().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.points.len()
    }

    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use fledge_core::contract::ResponseClass;
    use fledge_core::observe::LatencyHistogram;

    fn traffic(ok: u64, errors: u64) -> SubsetTraffic {
        let total = ok + errors;
        let mut t = SubsetTraffic {
            latency: LatencyHistogram {
                bounds_ms: vec![10.0, 100.0],
                cumulative: vec![total / 2, total],
                count: total,
                sum_ms: 0.0,
            },
            ..Default::default()
        };
        t.add(ResponseClass::Success, ok);
        t.add(ResponseClass::ServerError, errors);
        t
    }

    fn at(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_700_000_000 + secs, 0).unwrap()
    }

    #[test]
    fn records_rates_success_and_latency_per_subset() {
        let mut series = Series::default();
        let observation = Observation {
            stable: traffic(300, 0),
            canary: traffic(95, 5),
            ..Default::default()
        };
        series.record(
            at(10),
            10.0,
            20,
            Phase::Progressing,
            &observation,
            Some(Verdict::Pass),
        );
        series.record(at(15), 10.0, 20, Phase::Progressing, &observation, None);
        let points = series.points();
        assert_eq!(points.len(), 2);
        assert_eq!(points[0].seconds, 10.0);
        assert_eq!(points[0].stable.rps, 30.0);
        assert_eq!(points[1].seconds, 5.0, "measured from the previous point");
        assert_eq!(points[1].canary.rps, 20.0);
        assert_eq!(points[0].canary.success_rate, Some(95.0));
        assert_eq!(points[0].canary.p50_ms, Some(10.0));
        assert_eq!(points[0].verdict, Some(Verdict::Pass));
        let empty = Observation::default();
        series.record(at(20), 10.0, 20, Phase::Halted, &empty, None);
        assert_eq!(series.points()[2].canary.success_rate, None);
        assert_eq!(series.points()[2].canary.p99_ms, None);
    }

    #[test]
    fn keeps_only_the_last_points() {
        let mut series = Series::default();
        for i in 0..(SERIES_LIMIT as i64 + 10) {
            series.record(
                at(i),
                1.0,
                5,
                Phase::Progressing,
                &Observation::default(),
                None,
            );
        }
        assert_eq!(series.len(), SERIES_LIMIT);
        assert_eq!(series.points()[0].at, at(10));
    }
}
