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

/// One interval as kept in memory: 56 bytes where an [`IntervalPoint`] takes 160, for up to
/// [`SERIES_LIMIT`] points per canary (10,000 canaries × 720 points: 400 MB instead of 1.15 GB).
/// Rates are derived when read; success rates and latency quantiles are kept as `f32` (7
/// significant digits, read back as the shortest decimal that `f32` holds) with NaN for none;
/// times to the millisecond.
#[derive(Debug, Clone, Copy)]
struct StoredPoint {
    at_ms: i64,
    /// Requests of the stable and the canary subset.
    requests: [u64; 2],
    /// Length of the interval.
    millis: u32,
    /// Success rate, p50 and p99 of the stable and the canary subset.
    measures: [[f32; 3]; 2],
    canary_weight: u8,
    phase: Phase,
    verdict: Option<Verdict>,
}

fn narrow(value: Option<f64>) -> f32 {
    value.map_or(f32::NAN, |v| v as f32)
}

/// The `f64` a reader expects from a stored `f32`: the shortest decimal that rounds to it
/// (`99.95`, not `99.94999694824219`).
fn widen(value: f32) -> Option<f64> {
    if value.is_nan() {
        return None;
    }
    Some(value.to_string().parse().unwrap_or(f64::from(value)))
}

impl StoredPoint {
    fn subset(traffic: &SubsetTraffic) -> (u64, [f32; 3]) {
        (
            traffic.requests(),
            [
                narrow(traffic.success_rate_percent()),
                narrow(traffic.latency.quantile(0.5)),
                narrow(traffic.latency.quantile(0.99)),
            ],
        )
    }

    fn subset_point(&self, subset: usize) -> SubsetPoint {
        let requests = self.requests[subset];
        let seconds = self.seconds();
        let [success_rate, p50_ms, p99_ms] = self.measures[subset].map(widen);
        SubsetPoint {
            requests,
            rps: if seconds > 0.0 {
                requests as f64 / seconds
            } else {
                0.0
            },
            success_rate,
            p50_ms,
            p99_ms,
        }
    }

    fn seconds(&self) -> f64 {
        f64::from(self.millis) / 1000.0
    }

    fn point(&self) -> IntervalPoint {
        IntervalPoint {
            at: DateTime::from_timestamp_millis(self.at_ms).unwrap_or_default(),
            seconds: self.seconds(),
            canary_weight: self.canary_weight,
            phase: self.phase,
            stable: self.subset_point(0),
            canary: self.subset_point(1),
            verdict: self.verdict,
        }
    }
}

/// The last [`SERIES_LIMIT`] intervals of one canary. Its buffer grows with the points (a
/// canary that has run a few intervals holds a few points) and never beyond the limit.
#[derive(Debug, Clone, Default)]
pub struct Series {
    points: VecDeque<StoredPoint>,
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
        let millis = self
            .last_at
            .map(|last| (at - last).num_milliseconds())
            .filter(|ms| *ms > 0)
            .unwrap_or((nominal_seconds * 1000.0).round() as i64);
        self.last_at = Some(at);
        let (stable_requests, stable) = StoredPoint::subset(&observation.stable);
        let (canary_requests, canary) = StoredPoint::subset(&observation.canary);
        if self.points.len() >= SERIES_LIMIT {
            self.points.pop_front();
        } else if self.points.len() == self.points.capacity() {
            // Double, but never past the limit (a VecDeque alone would reach 1,024 slots).
            let wanted = (self.points.capacity() * 2).clamp(4, SERIES_LIMIT);
            self.points.reserve_exact(wanted - self.points.len());
        }
        self.points.push_back(StoredPoint {
            at_ms: at.timestamp_millis(),
            requests: [stable_requests, canary_requests],
            millis: u32::try_from(millis.max(0)).unwrap_or(u32::MAX),
            measures: [stable, canary],
            canary_weight,
            phase,
            verdict,
        });
    }

    /// Note that time passed without an observation (e.g. metrics unreachable), so the next
    /// point's rate is computed over its own interval only.
    pub fn skip(&mut self, at: DateTime<Utc>) {
        self.last_at = Some(at);
    }

    pub fn points(&self) -> Vec<IntervalPoint> {
        self.points.iter().map(StoredPoint::point).collect()
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
        assert_eq!(
            series.points()[SERIES_LIMIT - 1].at,
            at(SERIES_LIMIT as i64 + 9)
        );
        assert!(
            series.points.capacity() <= SERIES_LIMIT + 8,
            "the buffer stops at the limit: {}",
            series.points.capacity()
        );
    }

    #[test]
    fn a_young_series_holds_only_its_points() {
        let mut series = Series::default();
        for i in 0..10 {
            series.record(
                at(i),
                1.0,
                5,
                Phase::Progressing,
                &Observation::default(),
                None,
            );
        }
        assert!(
            series.points.capacity() < 32,
            "{}",
            series.points.capacity()
        );
    }

    #[test]
    fn a_stored_point_is_small_and_reads_back_as_recorded() {
        assert!(std::mem::size_of::<StoredPoint>() <= 56);
        let mut series = Series::default();
        let observation = Observation {
            stable: traffic(1_999_000, 1_000),
            canary: traffic(0, 0),
            ..Default::default()
        };
        series.record(
            at(0),
            7.5,
            1,
            Phase::Paused,
            &observation,
            Some(Verdict::NoData),
        );
        let point = &series.points()[0];
        assert_eq!(point.seconds, 7.5);
        assert_eq!(point.stable.requests, 2_000_000);
        assert_eq!(
            point.stable.success_rate,
            Some(99.95),
            "not 99.94999694824219"
        );
        assert_eq!(point.stable.rps, 2_000_000.0 / 7.5);
        assert_eq!((point.canary.requests, point.canary.rps), (0, 0.0));
        assert_eq!(point.canary.success_rate, None);
        assert_eq!(point.canary.p50_ms, None);
        assert_eq!(
            (point.phase, point.verdict),
            (Phase::Paused, Some(Verdict::NoData))
        );
    }
}
