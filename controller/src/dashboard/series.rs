//! A bounded time series of per-interval observations for one canary, for the dashboard's
//! charts (request rate, success rate, latency per subset, weight). Kept in memory by the
//! runner only: it is not part of the persisted rollout status.

use super::latency_code;
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
    /// Latency quantiles from the histogram, in ms to 4 significant digits; `None` without
    /// requests.
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

/// One interval as the series encodes it (64 bytes decoded; about 14 encoded, see [`Series`]).
/// Rates are derived when read, and so are success rates, from the requests and failures
/// (exactly as [`SubsetTraffic::success_rate_percent`]); latency quantiles are kept to 4
/// significant digits ([`latency_code`]); times to the millisecond. The default is what a
/// chunk's first point is encoded against.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct StoredPoint {
    at_ms: i64,
    /// Requests of the stable and the canary subset.
    requests: [u64; 2],
    /// Of those, the failures (never more than the requests).
    failures: [u64; 2],
    /// Length of the interval.
    millis: u32,
    /// p50 and p99 of the stable and the canary subset, as [`latency_code`]s.
    quantiles: [[i32; 2]; 2],
    canary_weight: u8,
    phase: Phase,
    verdict: Option<Verdict>,
}

impl StoredPoint {
    fn subset(traffic: &SubsetTraffic) -> (u64, u64, [i32; 2]) {
        (
            traffic.requests(),
            traffic.failures(),
            [0.5, 0.99].map(|q| latency_code::encode(traffic.latency.quantile(q))),
        )
    }

    fn subset_point(&self, subset: usize) -> SubsetPoint {
        let requests = self.requests[subset];
        // Not more than the requests (see `decode`); saturating all the same.
        let succeeded = requests.saturating_sub(self.failures[subset]);
        let seconds = self.seconds();
        let [p50_ms, p99_ms] = self.quantiles[subset].map(latency_code::decode);
        SubsetPoint {
            requests,
            rps: if seconds > 0.0 {
                requests as f64 / seconds
            } else {
                0.0
            },
            success_rate: (requests > 0).then(|| 100.0 * succeeded as f64 / requests as f64),
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

/// Points per chunk of a [`Series`].
const CHUNK_POINTS: usize = 16;

/// The open chunk's first allocation: 16 bench-like points take about 225 bytes (see the
/// size test), so most chunks fill it without growing.
const OPEN_CHUNK_BYTES: usize = 256;

/// The last [`SERIES_LIMIT`] intervals of one canary, encoded in chunks of [`CHUNK_POINTS`]
/// points. Consecutive points are alike (time advances by about one interval; weight, phase
/// and verdict seldom change; request and failure counts are small; latency quantiles move
/// within a few milliseconds), so each point is stored as its difference from the one before
/// (`encode`): about 14 bytes for a bench-like point (28 when the six measures were `f32`s,
/// 56 decoded). A chunk's first point is encoded against the default point, so each chunk
/// decodes on its own and the oldest one can be dropped. Chunks, not one buffer, because
/// every Canary with the same interval records on the same tick: a doubling buffer
/// reallocated and copied 1,000 series at once. A full chunk is sealed into an allocation of
/// its exact size.
#[derive(Debug, Clone, Default)]
pub struct Series {
    /// Full chunks, oldest first, each of [`CHUNK_POINTS`] points.
    sealed: VecDeque<Box<[u8]>>,
    /// The chunk being filled (its buffer is reused for the next one).
    open: Vec<u8>,
    open_points: usize,
    /// The newest point: the next point of the open chunk is encoded against it.
    newest: StoredPoint,
    /// Points at the front of the oldest chunk that are past the limit (fewer than a chunk).
    dropped: usize,
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
        let (stable_requests, stable_failures, stable) = StoredPoint::subset(&observation.stable);
        let (canary_requests, canary_failures, canary) = StoredPoint::subset(&observation.canary);
        self.push(StoredPoint {
            at_ms: at.timestamp_millis(),
            requests: [stable_requests, canary_requests],
            failures: [stable_failures, canary_failures],
            millis: u32::try_from(millis.max(0)).unwrap_or(u32::MAX),
            quantiles: [stable, canary],
            canary_weight,
            phase,
            verdict,
        });
    }

    fn push(&mut self, point: StoredPoint) {
        let previous = if self.open_points == 0 {
            StoredPoint::default()
        } else {
            self.newest
        };
        if self.open.capacity() == 0 {
            self.open.reserve_exact(OPEN_CHUNK_BYTES);
        }
        encode(&point, &previous, &mut self.open);
        self.newest = point;
        self.open_points += 1;
        self.len += 1;
        if self.open_points == CHUNK_POINTS {
            self.seal();
        }
        if self.len > SERIES_LIMIT {
            self.drop_oldest();
        }
    }

    fn seal(&mut self) {
        self.sealed.push_back(Box::from(self.open.as_slice()));
        self.open.clear();
        self.open_points = 0;
        // A chunk of unusual points grew the buffer: do not keep that for every later chunk.
        if self.open.capacity() > OPEN_CHUNK_BYTES {
            self.open.shrink_to(OPEN_CHUNK_BYTES);
        }
    }

    /// Past the limit (so the oldest chunk is sealed): skip its oldest point, and drop the
    /// chunk once all of its points are skipped. At most `SERIES_LIMIT + 15` points are held.
    fn drop_oldest(&mut self) {
        self.len -= 1;
        self.dropped += 1;
        if self.dropped == CHUNK_POINTS {
            self.sealed.pop_front();
            self.dropped = 0;
        }
    }

    /// Note that time passed without an observation (e.g. metrics unreachable), so the next
    /// point's rate is computed over its own interval only.
    pub fn skip(&mut self, at: DateTime<Utc>) {
        self.last_at = Some(at);
    }

    /// The kept points as stored, oldest first.
    fn stored_points(&self) -> impl Iterator<Item = StoredPoint> + '_ {
        self.sealed
            .iter()
            .map(|chunk| &chunk[..])
            .chain(std::iter::once(self.open.as_slice()))
            .flat_map(decode_chunk)
            .skip(self.dropped)
    }

    pub fn points(&self) -> Vec<IntervalPoint> {
        let mut points = Vec::with_capacity(self.len);
        points.extend(self.stored_points().map(|point| point.point()));
        points
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Flag bits of an encoded point: bit `i` (0–3) set when latency quantile `i` (stable p50,
/// p99, then the canary's) has the previous point's code; then one bit per subset without
/// failures; then the weight, and the phase with the verdict, equal to the previous point's.
const NO_FAILURES: [u8; 2] = [1 << 4, 1 << 5];
const SAME_WEIGHT: u8 = 1 << 6;
const SAME_STATE: u8 = 1 << 7;

/// Appends `point` as its difference from `previous`: the flags byte; the interval's length as
/// a zigzag varint delta; the time as what its delta differs from that length by (usually
/// 0); the two request counts as varints, and the failure counts that are not 0; the weight
/// and the packed phase and verdict only when changed; each changed quantile code as a zigzag
/// varint delta.
fn encode(point: &StoredPoint, previous: &StoredPoint, out: &mut Vec<u8>) {
    let quantiles = point.quantiles.as_flattened();
    let mut flags = 0;
    for (index, (now, before)) in quantiles
        .iter()
        .zip(previous.quantiles.as_flattened())
        .enumerate()
    {
        if now == before {
            flags |= 1 << index;
        }
    }
    for (failures, flag) in point.failures.iter().zip(NO_FAILURES) {
        if *failures == 0 {
            flags |= flag;
        }
    }
    if point.canary_weight == previous.canary_weight {
        flags |= SAME_WEIGHT;
    }
    let state = pack_state(point.phase, point.verdict);
    if state == pack_state(previous.phase, previous.verdict) {
        flags |= SAME_STATE;
    }
    out.push(flags);
    let millis = i64::from(point.millis);
    put_signed(out, millis - i64::from(previous.millis));
    put_signed(
        out,
        point
            .at_ms
            .wrapping_sub(previous.at_ms)
            .wrapping_sub(millis),
    );
    for requests in point.requests {
        put_varint(out, requests);
    }
    for (failures, flag) in point.failures.into_iter().zip(NO_FAILURES) {
        if flags & flag == 0 {
            put_varint(out, failures);
        }
    }
    if flags & SAME_WEIGHT == 0 {
        out.push(point.canary_weight);
    }
    if flags & SAME_STATE == 0 {
        out.push(state);
    }
    for (index, (now, before)) in quantiles
        .iter()
        .zip(previous.quantiles.as_flattened())
        .enumerate()
    {
        if flags & (1 << index) == 0 {
            put_signed(out, i64::from(*now) - i64::from(*before));
        }
    }
}

/// The point that [`encode`] wrote after `previous`, or `None` where the bytes end or make no
/// sense.
fn decode(reader: &mut Reader<'_>, previous: &StoredPoint) -> Option<StoredPoint> {
    let flags = reader.byte()?;
    let millis = i64::from(previous.millis).checked_add(reader.signed()?)?;
    let at_ms = previous
        .at_ms
        .wrapping_add(reader.signed()?)
        .wrapping_add(millis);
    let requests = [reader.varint()?, reader.varint()?];
    let mut failures = [0; 2];
    for ((failures, flag), requests) in failures.iter_mut().zip(NO_FAILURES).zip(requests) {
        if flags & flag == 0 {
            *failures = reader.varint()?;
        }
        if *failures > requests {
            return None;
        }
    }
    let canary_weight = match flags & SAME_WEIGHT {
        0 => reader.byte()?,
        _ => previous.canary_weight,
    };
    let (phase, verdict) = match flags & SAME_STATE {
        0 => unpack_state(reader.byte()?)?,
        _ => (previous.phase, previous.verdict),
    };
    let mut quantiles = previous.quantiles;
    for (index, code) in quantiles.as_flattened_mut().iter_mut().enumerate() {
        if flags & (1 << index) == 0 {
            *code = latency_code::checked(i64::from(*code).checked_add(reader.signed()?)?)?;
        }
    }
    Some(StoredPoint {
        at_ms,
        requests,
        failures,
        millis: u32::try_from(millis).ok()?,
        quantiles,
        canary_weight,
        phase,
        verdict,
    })
}

/// The points of one chunk; stops at the first that does not decode.
fn decode_chunk(bytes: &[u8]) -> impl Iterator<Item = StoredPoint> + '_ {
    let mut reader = Reader { bytes };
    let mut previous = StoredPoint::default();
    std::iter::from_fn(move || {
        if reader.bytes.is_empty() {
            return None;
        }
        let point = decode(&mut reader, &previous)?;
        previous = point;
        Some(point)
    })
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value & 0x7f) as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Zigzag: small differences of either sign take one byte.
fn put_signed(out: &mut Vec<u8>, value: i64) {
    put_varint(out, ((value << 1) ^ (value >> 63)) as u64);
}

/// Checked reads of what [`encode`] wrote.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl Reader<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&first, rest) = self.bytes.split_first()?;
        self.bytes = rest;
        Some(first)
    }

    fn varint(&mut self) -> Option<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.byte()?;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(value);
            }
        }
        None
    }

    fn signed(&mut self) -> Option<i64> {
        let zigzag = self.varint()?;
        Some((zigzag >> 1) as i64 ^ -((zigzag & 1) as i64))
    }
}

/// Phase and verdict in one byte: the phase's code times 4 plus the verdict's.
fn pack_state(phase: Phase, verdict: Option<Verdict>) -> u8 {
    phase_code(phase) * 4 + verdict_code(verdict)
}

fn unpack_state(byte: u8) -> Option<(Phase, Option<Verdict>)> {
    Some((phase_of(byte / 4)?, verdict_of(byte % 4)?))
}

fn phase_code(phase: Phase) -> u8 {
    match phase {
        Phase::Initializing => 0,
        Phase::Progressing => 1,
        Phase::Paused => 2,
        Phase::Halted => 3,
        Phase::Promoted => 4,
        Phase::RolledBack => 5,
    }
}

fn phase_of(code: u8) -> Option<Phase> {
    match code {
        0 => Some(Phase::Initializing),
        1 => Some(Phase::Progressing),
        2 => Some(Phase::Paused),
        3 => Some(Phase::Halted),
        4 => Some(Phase::Promoted),
        5 => Some(Phase::RolledBack),
        _ => None,
    }
}

fn verdict_code(verdict: Option<Verdict>) -> u8 {
    match verdict {
        None => 0,
        Some(Verdict::Pass) => 1,
        Some(Verdict::Fail) => 2,
        Some(Verdict::NoData) => 3,
    }
}

fn verdict_of(code: u8) -> Option<Option<Verdict>> {
    match code {
        0 => Some(None),
        1 => Some(Some(Verdict::Pass)),
        2 => Some(Some(Verdict::Fail)),
        3 => Some(Some(Verdict::NoData)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::PHASES;
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
            series.held_points() < SERIES_LIMIT + CHUNK_POINTS,
            "the chunks stop at the limit: {}",
            series.held_points()
        );
    }

    #[test]
    fn chunks_keep_the_last_points_in_order_at_every_edge() {
        // (points recorded, points held): the oldest chunk is dropped once all of its points
        // are past the limit, so never more than 15 points past it.
        let table = [
            (0, 0),
            (1, 1),
            (15, 15),
            (16, 16),
            (17, 17),
            (100, 100),
            (719, 719),
            (720, 720),
            (721, 721),
            (735, 735),
            (736, 720),
            (737, 721),
            (720 + 16, 720),
            (2 * SERIES_LIMIT, 720),
            (2 * SERIES_LIMIT + 3, 723),
            (2000, 720),
            (2005, 725),
        ];
        for (recorded, held) in table {
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
            assert_eq!(series.held_points(), held, "{recorded} recorded");
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
        assert_eq!(series.held_points(), 10);
        assert_eq!(
            series.held_bytes(),
            OPEN_CHUNK_BYTES,
            "one buffer, not grown"
        );
    }

    #[test]
    fn a_point_reads_back_as_recorded() {
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

    /// Success rates read back exactly as `success_rate_percent`, latency quantiles as the
    /// histogram's to 4 significant digits.
    #[test]
    fn measures_read_back_within_the_stated_precision() {
        let table = [
            (0, 0),
            (1, 0),
            (0, 1),
            (59, 1),
            (61, 3),
            (1, 2),
            (1_999_000, 1_000),
            (u64::MAX / 4, u64::MAX / 4),
            (123_456_789, 987),
        ];
        for (ok, errors) in table {
            let subset = traffic(ok, errors);
            let mut series = Series::default();
            let observation = Observation {
                stable: subset.clone(),
                canary: subset.clone(),
                ..Default::default()
            };
            series.record(at(0), 2.0, 10, Phase::Progressing, &observation, None);
            let point = &series.points()[0];
            for read in [&point.stable, &point.canary] {
                let context = format!("{ok} ok, {errors} errors: {read:?}");
                assert_eq!(
                    read.success_rate.map(f64::to_bits),
                    subset.success_rate_percent().map(f64::to_bits),
                    "{context}"
                );
                for (got, q) in [(read.p50_ms, 0.5), (read.p99_ms, 0.99)] {
                    let expected = subset.latency.quantile(q);
                    assert_eq!(got.is_some(), expected.is_some(), "{context}");
                    if let (Some(got), Some(expected)) = (got, expected) {
                        assert!(
                            (got - expected).abs() <= expected.abs() * 5e-4,
                            "{context}: {expected}"
                        );
                    }
                }
            }
        }
    }

    impl Series {
        /// Points encoded, kept or past the limit.
        fn held_points(&self) -> usize {
            self.sealed.len() * CHUNK_POINTS + self.open_points
        }

        /// Bytes the chunks hold (the open one's whole buffer).
        fn held_bytes(&self) -> usize {
            self.sealed.iter().map(|chunk| chunk.len()).sum::<usize>() + self.open.capacity()
        }
    }

    /// The series before it was encoded: every point stored whole, the newest
    /// [`SERIES_LIMIT`] kept.
    #[derive(Default)]
    struct Reference {
        points: VecDeque<StoredPoint>,
    }

    impl Reference {
        fn push(&mut self, point: StoredPoint) {
            if self.points.len() == SERIES_LIMIT {
                self.points.pop_front();
            }
            self.points.push_back(point);
        }

        fn points(&self) -> Vec<IntervalPoint> {
            self.points.iter().map(StoredPoint::point).collect()
        }
    }

    fn assert_same(series: &Series, reference: &Reference, context: &str) {
        let stored: Vec<_> = series.stored_points().collect();
        assert!(stored.iter().eq(reference.points.iter()), "{context}");
        // Debug, not `==`: it tells -0.0 from 0.0, and NaN equals NaN.
        assert_eq!(
            format!("{:?}", series.points()),
            format!("{:?}", reference.points()),
            "{context}"
        );
        assert_eq!(series.len(), reference.points.len(), "{context}");
    }

    /// SplitMix64: deterministic sequences without a dependency.
    struct Random(u64);

    impl Random {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }

        fn pick<T: Copy>(&mut self, values: &[T]) -> T {
            values[self.below(values.len() as u64) as usize]
        }
    }

    const VERDICTS: [Option<Verdict>; 4] = [
        None,
        Some(Verdict::Pass),
        Some(Verdict::Fail),
        Some(Verdict::NoData),
    ];
    /// Quantile codes at the ends of their range and of values at the ends of theirs.
    fn edge_quantiles() -> Vec<i32> {
        let values = [
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            -0.0,
            0.0,
            f64::from_bits(1), // the smallest subnormal
            f64::MAX,
            f64::MIN,
            1e-6,
            9.999e12,
            -9.999e12,
            100.0,
            98.36066,
        ];
        let codes = [
            latency_code::NONE,
            latency_code::INFINITY,
            -latency_code::INFINITY,
            0,
            1,
            -1,
        ];
        (values.into_iter().map(|v| latency_code::encode(Some(v))))
            .chain(codes)
            .collect()
    }

    fn code(value: f64) -> i32 {
        latency_code::encode(Some(value))
    }

    fn point_at(at_ms: i64) -> StoredPoint {
        StoredPoint {
            at_ms,
            requests: [60, 61],
            failures: [0, 1],
            millis: 2_000,
            quantiles: [[code(3.5), code(9.25)], [code(3.75), code(9.5)]],
            canary_weight: 10,
            phase: Phase::Progressing,
            verdict: Some(Verdict::Pass),
        }
    }

    #[test]
    fn edge_values_round_trip() {
        let base = point_at(1_700_000_000_000);
        let mut table: Vec<(&str, StoredPoint)> = vec![
            ("default", StoredPoint::default()),
            ("bench-like", base),
            (
                "time at i64::MIN",
                StoredPoint {
                    at_ms: i64::MIN,
                    ..base
                },
            ),
            (
                "time at i64::MAX",
                StoredPoint {
                    at_ms: i64::MAX,
                    ..base
                },
            ),
            ("before the epoch", StoredPoint { at_ms: -1, ..base }),
            (
                "backwards",
                StoredPoint {
                    at_ms: base.at_ms - 3_600_000,
                    ..base
                },
            ),
            (
                "huge jump",
                StoredPoint {
                    at_ms: base.at_ms + (1 << 50),
                    ..base
                },
            ),
            (
                "back to i64::MIN",
                StoredPoint {
                    at_ms: i64::MIN,
                    ..base
                },
            ),
            (
                "u32::MAX millis",
                StoredPoint {
                    millis: u32::MAX,
                    ..base
                },
            ),
            ("zero millis", StoredPoint { millis: 0, ..base }),
            (
                "u32::MAX millis again",
                StoredPoint {
                    millis: u32::MAX,
                    ..base
                },
            ),
            (
                "u64::MAX requests",
                StoredPoint {
                    requests: [u64::MAX, u64::MAX],
                    ..base
                },
            ),
            (
                "u64::MAX failures",
                StoredPoint {
                    requests: [u64::MAX, u64::MAX],
                    failures: [u64::MAX, u64::MAX - 1],
                    ..base
                },
            ),
            (
                "all failed",
                StoredPoint {
                    failures: base.requests,
                    ..base
                },
            ),
            (
                "no requests",
                StoredPoint {
                    requests: [0, 0],
                    failures: [0, 0],
                    quantiles: [[latency_code::NONE; 2]; 2],
                    ..base
                },
            ),
            (
                "weight 255",
                StoredPoint {
                    canary_weight: 255,
                    ..base
                },
            ),
            (
                "weight 0",
                StoredPoint {
                    canary_weight: 0,
                    ..base
                },
            ),
        ];
        for quantile in edge_quantiles() {
            table.push((
                "every quantile",
                StoredPoint {
                    quantiles: [[quantile; 2]; 2],
                    ..base
                },
            ));
            table.push((
                "one quantile",
                StoredPoint {
                    quantiles: [[code(1.0), quantile], [quantile, code(6.0)]],
                    ..base
                },
            ));
        }
        for phase in PHASES {
            for verdict in VERDICTS {
                table.push((
                    "phase and verdict",
                    StoredPoint {
                        phase,
                        verdict,
                        ..base
                    },
                ));
            }
        }
        // Each alone (against the chunk's default start), and all in sequence (each against
        // the one before), across several chunks.
        for (name, point) in &table {
            let mut series = Series::default();
            let mut reference = Reference::default();
            series.push(*point);
            reference.push(*point);
            assert_same(&series, &reference, name);
        }
        let mut series = Series::default();
        let mut reference = Reference::default();
        for (name, point) in &table {
            series.push(*point);
            reference.push(*point);
            assert_same(&series, &reference, name);
        }
        assert!(table.len() > 3 * CHUNK_POINTS);
    }

    /// A point like `previous` in some fields (as in a real series) and an edge or random
    /// value in the others.
    fn random_point(random: &mut Random, previous: &StoredPoint) -> StoredPoint {
        let mut point = *previous;
        if random.below(4) > 0 {
            point.at_ms = match random.below(10) {
                0 => random.next() as i64,
                1 => random.pick(&[i64::MIN, i64::MAX, 0, -1]),
                2 => previous.at_ms.wrapping_sub(random.below(100_000) as i64),
                _ => previous.at_ms.wrapping_add(1_990 + random.below(20) as i64),
            };
        }
        if random.below(3) == 0 {
            point.millis = match random.below(4) {
                0 => random.next() as u32,
                1 => random.pick(&[0, 1, u32::MAX]),
                _ => 1_990 + random.below(20) as u32,
            };
        }
        for (requests, failures) in point.requests.iter_mut().zip(&mut point.failures) {
            *requests = match random.below(6) {
                0 => random.next(),
                1 => random.pick(&[0, u64::MAX, 127, 128]),
                _ => 50 + random.below(20),
            };
            *failures = match random.below(6) {
                0 => *requests,
                1 => random.next() % requests.saturating_add(1),
                2 => (*requests).min(random.below(3)),
                _ => 0,
            };
        }
        let edges = edge_quantiles();
        let codes = 2 * latency_code::INFINITY as u64 + 1;
        for quantile in point.quantiles.as_flattened_mut() {
            *quantile = match random.below(6) {
                0 => random.pick(&edges),
                1 => (random.below(codes) as i64 - i64::from(latency_code::INFINITY)) as i32,
                2 => code(random.below(10_000) as f64 / 100.0),
                _ => *quantile,
            };
        }
        if random.below(8) == 0 {
            point.canary_weight = random.next() as u8;
        }
        if random.below(8) == 0 {
            point.phase = random.pick(&PHASES);
            point.verdict = random.pick(&VERDICTS);
        }
        point
    }

    #[test]
    fn random_sequences_read_back_as_the_reference() {
        // (seed, points): short, across chunks, and past the limit.
        let table = [
            (1, 5),
            (2, 16),
            (3, 17),
            (4, 100),
            (5, 721),
            (6, 1_000),
            (7, 2_000),
        ];
        for (seed, count) in table {
            let mut random = Random(seed);
            let mut series = Series::default();
            let mut reference = Reference::default();
            let mut previous = StoredPoint::default();
            for i in 0..count {
                let point = random_point(&mut random, &previous);
                series.push(point);
                reference.push(point);
                previous = point;
                if i % 97 == 0 || i + 1 == count {
                    assert_same(&series, &reference, &format!("seed {seed}, point {i}"));
                }
            }
        }
    }

    #[test]
    fn the_limit_keeps_exactly_the_newest_points() {
        for count in [719, 720, 721, 720 + 16, 2_000] {
            let mut series = Series::default();
            let mut reference = Reference::default();
            for i in 0..count {
                let point = point_at(i64::from(i) * 2_000);
                series.push(point);
                reference.push(point);
            }
            assert_same(&series, &reference, &format!("{count} points"));
            assert!(series.held_points() < SERIES_LIMIT + CHUNK_POINTS);
        }
    }

    #[test]
    fn any_bytes_decode_without_panicking() {
        let mut series = Series::default();
        let mut random = Random(11);
        let mut previous = point_at(1_700_000_000_000);
        for _ in 0..CHUNK_POINTS {
            previous = random_point(&mut random, &previous);
            series.push(previous);
        }
        let chunk = series.sealed[0].clone();
        let whole: Vec<_> = decode_chunk(&chunk).collect();
        assert_eq!(whole.len(), CHUNK_POINTS);
        // A cut chunk decodes to a prefix of its points.
        for end in 0..chunk.len() {
            let cut: Vec<_> = decode_chunk(&chunk[..end]).collect();
            assert!(cut.len() < CHUNK_POINTS);
            assert_eq!(cut[..], whole[..cut.len()], "cut at {end}");
        }
        // Flipped bits and random bytes decode to something or stop.
        for flip in 0..chunk.len() * 8 {
            let mut bytes = chunk.to_vec();
            bytes[flip / 8] ^= 1 << (flip % 8);
            assert!(decode_chunk(&bytes).count() <= bytes.len());
        }
        for length in 0..200 {
            let bytes: Vec<u8> = (0..length).map(|_| random.next() as u8).collect();
            assert!(decode_chunk(&bytes).count() <= bytes.len());
        }
        let endless = [0xff_u8; 40];
        assert_eq!(
            decode_chunk(&endless).count(),
            0,
            "a varint longer than 10 bytes"
        );
    }

    /// 100 intervals as the memory part of `fledge-bench-scale` records them: 2 s apart
    /// (a few ms late), about 60 requests per subset, success 100 % or one 5xx, latency
    /// quantiles that vary, a steady weight.
    fn bench_like(count: usize) -> Vec<StoredPoint> {
        let mut random = Random(42);
        let mut at_ms = 1_700_000_000_000_i64;
        (0..count)
            .map(|_| {
                let late = random.below(30) as i64;
                let millis = 2_000 + late;
                at_ms += millis;
                let mut subset = || {
                    let requests = 55 + random.below(11);
                    let errors = u64::from(random.below(10) == 0);
                    let p50 = 2.0 + random.below(1_000) as f64 / 500.0;
                    let p99 = 8.0 + random.below(1_000) as f64 / 100.0;
                    (requests, errors, [p50, p99].map(code))
                };
                let (stable_requests, stable_errors, stable) = subset();
                let (canary_requests, canary_errors, canary) = subset();
                StoredPoint {
                    at_ms,
                    requests: [stable_requests, canary_requests],
                    failures: [stable_errors, canary_errors],
                    millis: millis as u32,
                    quantiles: [stable, canary],
                    canary_weight: 10,
                    phase: Phase::Progressing,
                    verdict: Some(Verdict::Pass),
                }
            })
            .collect()
    }

    #[test]
    fn a_bench_like_series_takes_about_16_bytes_a_point() {
        let mut series = Series::default();
        let mut reference = Reference::default();
        for point in bench_like(100) {
            series.push(point);
            reference.push(point);
        }
        assert_same(&series, &reference, "bench-like");
        assert!(
            series
                .sealed
                .iter()
                .all(|chunk| chunk.len() <= OPEN_CHUNK_BYTES),
            "the open chunk's first allocation holds 16 bench-like points"
        );
        assert_eq!(std::mem::size_of::<StoredPoint>(), 64, "decoded");
        let bytes = series.held_bytes();
        let per_point = bytes as f64 / 100.0;
        // 1,586 bytes (with the open chunk's 256-byte buffer); 2,778 with the six measures
        // as `f32`s, 6,272 as 112 slots of 56 bytes.
        println!("100 bench-like points: {bytes} bytes, {per_point:.1} per point");
        assert!(per_point <= 16.0, "{per_point} bytes per point");
        let full: usize = {
            let mut full = Series::default();
            bench_like(SERIES_LIMIT)
                .into_iter()
                .for_each(|p| full.push(p));
            full.held_bytes()
        };
        // 10,073 bytes (14.0 per point); 17,863 with `f32` measures, 40,320 as slots.
        println!("{SERIES_LIMIT} bench-like points: {full} bytes");
        assert!(full <= SERIES_LIMIT * 14 + 256, "{full} bytes");
    }
}
