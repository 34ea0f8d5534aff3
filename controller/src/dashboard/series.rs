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

/// Points per chunk of a [`Series`]: 896 bytes, one allocation.
const CHUNK_POINTS: usize = 16;

// A full series is whole chunks, so it holds exactly the limit.
const _: () = assert!(SERIES_LIMIT.is_multiple_of(CHUNK_POINTS));

/// The last [`SERIES_LIMIT`] intervals of one canary, in chunks of [`CHUNK_POINTS`] points:
/// the series grows a chunk at a time (a canary that has run a few intervals holds one chunk)
/// up to the limit. Not one buffer that doubles, because every Canary with the same interval
/// records on the same tick: at 1,000 Canaries one tick reallocated and copied 1,000 buffers
/// (3.5 KB to 7 KB at the 65th point), freeing 1,000 of the smaller size, and a 100-point
/// series held 128 slots (112 now). A full series is a ring over its chunks: each new point
/// takes the oldest one's slot, so it allocates nothing more.
#[derive(Debug, Clone, Default)]
pub struct Series {
    chunks: VecDeque<Vec<StoredPoint>>,
    /// Where the oldest point is, once the series is full (0 until then).
    head: usize,
    len: usize,
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
        self.push(StoredPoint {
            at_ms: at.timestamp_millis(),
            requests: [stable_requests, canary_requests],
            millis: u32::try_from(millis.max(0)).unwrap_or(u32::MAX),
            measures: [stable, canary],
            canary_weight,
            phase,
            verdict,
        });
    }

    fn push(&mut self, point: StoredPoint) {
        if self.len >= SERIES_LIMIT {
            self.replace_oldest(point);
            return;
        }
        let newest_full = self
            .chunks
            .back()
            .is_none_or(|newest| newest.len() >= CHUNK_POINTS);
        if newest_full {
            self.chunks.push_back(Vec::with_capacity(CHUNK_POINTS));
        }
        if let Some(newest) = self.chunks.back_mut() {
            newest.push(point);
            self.len += 1;
        }
    }

    /// A full series: the newest point takes the oldest one's slot (in the first chunk); once
    /// the first chunk holds only newer points than the others, it becomes the last.
    fn replace_oldest(&mut self, point: StoredPoint) {
        if let Some(slot) = self
            .chunks
            .front_mut()
            .and_then(|oldest| oldest.get_mut(self.head))
        {
            *slot = point;
        }
        self.head += 1;
        if self.head == CHUNK_POINTS {
            self.head = 0;
            self.chunks.rotate_left(1);
        }
    }

    /// Note that time passed without an observation (e.g. metrics unreachable), so the next
    /// point's rate is computed over its own interval only.
    pub fn skip(&mut self, at: DateTime<Utc>) {
        self.last_at = Some(at);
    }

    pub fn points(&self) -> Vec<IntervalPoint> {
        // Oldest first: from the head to the end, then the newest points before the head.
        let slots = || self.chunks.iter().flatten();
        let mut points = Vec::with_capacity(self.len);
        points.extend(
            slots()
                .skip(self.head)
                .chain(slots().take(self.head))
                .map(StoredPoint::point),
        );
        points
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Points the series has room for without allocating.
    #[cfg(test)]
    fn slots(&self) -> usize {
        self.chunks.iter().map(Vec::capacity).sum()
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
            series.slots() <= SERIES_LIMIT,
            "the buffer stops at the limit: {}",
            series.slots()
        );
    }

    #[test]
    fn chunks_keep_the_last_points_in_order_at_every_edge() {
        // (points recorded, slots held): a chunk at a time, never past the limit.
        let table = [
            (0, 0),
            (1, 16),
            (15, 16),
            (16, 16),
            (17, 32),
            (100, 112),
            (719, 720),
            (720, 720),
            (721, 720),
            (735, 720),
            (736, 720),
            (737, 720),
            (2 * SERIES_LIMIT, 720),
            (2 * SERIES_LIMIT + 3, 720),
        ];
        for (recorded, slots) in table {
            let mut series = Series::default();
            for i in 0..recorded as i64 {
                series.record(
                    at(i),
                    1.0,
                    (i % 100) as u8,
                    Phase::Progressing,
                    &Observation::default(),
                    None,
                );
            }
            let kept = recorded.min(SERIES_LIMIT);
            let first = (recorded - kept) as i64;
            let expected: Vec<DateTime<Utc>> = (first..recorded as i64).map(at).collect();
            let points = series.points();
            let times: Vec<DateTime<Utc>> = points.iter().map(|p| p.at).collect();
            assert_eq!(times, expected, "{recorded} recorded");
            assert!(points
                .iter()
                .zip(first..)
                .all(|(p, i)| i64::from(p.canary_weight) == i % 100));
            assert_eq!(series.len(), kept, "{recorded} recorded");
            assert_eq!(series.is_empty(), kept == 0);
            assert_eq!(series.slots(), slots, "{recorded} recorded");
        }
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
        assert_eq!(series.slots(), CHUNK_POINTS);
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
