//! When a canary's next analysis is due: on shared, aligned ticks.
//!
//! Canaries with the same interval tick together, so one scrape of a gateway (or one
//! Prometheus query) serves all of them ([`crate::metrics::shared`]). Ticks fall on
//! `k × interval + phase` since the Unix epoch. The phase comes from where the canary reads its
//! metrics: canaries reading the same endpoint tick at the same instant, canaries reading
//! different gateways are spread over the interval, so a controller with many gateways does not
//! judge every canary at once.
//!
//! A rollout's first tick runs at once (it only takes a metrics baseline); from then on each
//! tick is the first aligned instant at least half an interval after the previous one, so the
//! first interval lasts between half and one and a half intervals and every later one exactly
//! one. Pure: no clock, no I/O.

use chrono::{DateTime, Utc};
use std::time::Duration;

/// The phase of ticks of canaries reading `key` (an endpoint or a set of endpoints) every
/// `interval`: a stable hash of the key, in whole milliseconds below the interval.
pub fn phase_of(key: &str, interval: Duration) -> Duration {
    let interval_ms = interval.as_millis().max(1) as u64;
    Duration::from_millis(fnv1a(key.as_bytes()) % interval_ms)
}

/// The next tick after a tick at `last` (`None`: no tick yet, due now).
pub fn next_tick(
    last: Option<DateTime<Utc>>,
    interval: Duration,
    phase: Duration,
) -> Option<DateTime<Utc>> {
    let last = last?;
    let interval_ms = i64::try_from(interval.as_millis())
        .unwrap_or(i64::MAX)
        .max(1);
    let phase_ms = i64::try_from(phase.as_millis()).unwrap_or(0) % interval_ms;
    let earliest = last.timestamp_millis().saturating_add(interval_ms / 2);
    // The first k with k × interval + phase >= earliest.
    let slots = (earliest - phase_ms).div_euclid(interval_ms);
    let mut due = slots.saturating_mul(interval_ms).saturating_add(phase_ms);
    if due < earliest {
        due = due.saturating_add(interval_ms);
    }
    DateTime::from_timestamp_millis(due)
}

/// When a leadership term that began at `start` takes its first reading of a canary already
/// under way (a restarted controller or a new leader: its metrics sources have no previous
/// reading, so that tick is only a baseline). Not at once for all of them — 10,000 baselines
/// at one instant would starve each other — but each endpoint's canaries at the last moment
/// that still lets their first judged tick be the earliest aligned tick at least half an
/// interval plus `lead` after `start`: `lead` (a tenth of the interval) is the time their
/// baseline passes may take to begin (a tick counts from its pass' start, not from when its
/// read returns). So the first judgement comes at most one and a half intervals plus `lead`
/// after the term began, and the baselines of different endpoints are spread over the
/// interval like their ticks.
pub fn first_reading(start: DateTime<Utc>, interval: Duration, phase: Duration) -> DateTime<Utc> {
    let lead = first_reading_lead(interval);
    let half = interval / 2;
    let Ok(before_judged) = chrono::Duration::from_std(half + lead) else {
        return start;
    };
    // The first aligned tick at least `half + lead` after `start`, found like any tick after
    // a reading at `start + lead` (which needs half an interval).
    let judged = next_tick(
        start.checked_add_signed(chrono::Duration::from_std(lead).unwrap_or_default()),
        interval,
        phase,
    );
    judged
        .and_then(|judged| judged.checked_sub_signed(before_judged))
        .map_or(start, |reading| reading.max(start))
}

/// How long before the last possible moment a new term's first reading is taken (see
/// [`first_reading`]): a tenth of the interval (1 s at 10 s).
pub fn first_reading_lead(interval: Duration) -> Duration {
    interval / 10
}

/// Whether an analysis is due at `now` after a tick at `last`.
pub fn is_due(
    last: Option<DateTime<Utc>>,
    interval: Duration,
    phase: Duration,
    now: DateTime<Utc>,
) -> bool {
    next_tick(last, interval, phase).is_none_or(|due| now >= due)
}

/// 64-bit FNV-1a: stable across processes and releases (unlike `std`'s hasher), so every
/// controller instance ticks a canary at the same instants.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: i64) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(ms).unwrap()
    }

    const TEN_S: Duration = Duration::from_secs(10);

    #[test]
    fn ticks_fall_on_aligned_instants_one_interval_apart() {
        let phase = Duration::from_millis(2_500);
        // First tick at an arbitrary instant; the next aligned one at least 5 s later.
        assert_eq!(next_tick(None, TEN_S, phase), None);
        assert_eq!(
            next_tick(Some(at(1_000_000_300)), TEN_S, phase),
            Some(at(1_000_012_500))
        );
        assert_eq!(
            next_tick(Some(at(1_000_008_000)), TEN_S, phase),
            Some(at(1_000_022_500))
        );
        // From an aligned tick (or one a little late): exactly one interval later.
        assert_eq!(
            next_tick(Some(at(1_000_012_500)), TEN_S, phase),
            Some(at(1_000_022_500))
        );
        assert_eq!(
            next_tick(Some(at(1_000_013_900)), TEN_S, phase),
            Some(at(1_000_022_500))
        );
        // Two canaries of different start times meet on the same ticks.
        let a = next_tick(Some(at(1_000_001_000)), TEN_S, phase);
        let b = next_tick(Some(at(1_000_006_000)), TEN_S, phase);
        assert_eq!(next_tick(a, TEN_S, phase), next_tick(b, TEN_S, phase));
    }

    #[test]
    fn consecutive_ticks_are_between_half_and_one_and_a_half_intervals_apart() {
        for phase_ms in [0, 1, 4_999, 9_999] {
            let phase = Duration::from_millis(phase_ms);
            for start in (0..20_000).step_by(37) {
                let last = at(1_700_000_000_000 + start);
                let next = next_tick(Some(last), TEN_S, phase).unwrap();
                let gap = (next - last).num_milliseconds();
                assert!((5_000..15_000).contains(&gap), "{start} {phase_ms}: {gap}");
                let aligned = next.timestamp_millis() - phase_ms as i64;
                assert_eq!(aligned.rem_euclid(10_000), 0);
                let after = next_tick(Some(next), TEN_S, phase).unwrap();
                assert_eq!((after - next).num_milliseconds(), 10_000);
            }
        }
    }

    #[test]
    fn a_tick_is_due_from_its_instant_on() {
        let phase = phase_of("http://gw-1:15000", TEN_S);
        assert!(is_due(None, TEN_S, phase, at(5)));
        let last = at(1_700_000_000_000);
        let due = next_tick(Some(last), TEN_S, phase).unwrap();
        assert!(!is_due(
            Some(last),
            TEN_S,
            phase,
            due - chrono::Duration::milliseconds(1)
        ));
        assert!(is_due(Some(last), TEN_S, phase, due));
    }

    #[test]
    fn a_new_term_reads_each_endpoint_at_the_last_moment_that_keeps_its_first_judgement_early() {
        // Term start 1_000_000_000 ms, interval 10 s (lead 1 s): (phase ms) → (first reading,
        // first judged tick), both in ms after the start.
        let start = 1_000_000_000_i64;
        let cases = [
            // Aligned ticks at …000: the first one ≥ 6 s after the start is at +10 s.
            (0, 4_000, 10_000),
            // Ticks at …6000: +6 s is far enough; read at once.
            (6_000, 0, 6_000),
            // Ticks at …5999: +5.999 s is too soon; the next is +15.999 s.
            (5_999, 9_999, 15_999),
            (9_999, 3_999, 9_999),
            (2_500, 6_500, 12_500),
        ];
        for (phase_ms, reading_ms, judged_ms) in cases {
            let phase = Duration::from_millis(phase_ms);
            let reading = first_reading(at(start), TEN_S, phase);
            assert_eq!(reading, at(start + reading_ms), "phase {phase_ms}");
            // The tick after that reading is the judged one, as the reconciler schedules it.
            let judged = next_tick(Some(reading), TEN_S, phase).unwrap();
            assert_eq!(judged, at(start + judged_ms), "phase {phase_ms}");
        }
    }

    #[test]
    fn a_new_terms_first_judgements_come_within_one_and_a_half_intervals_and_the_lead() {
        let start = at(1_700_000_000_123);
        let mut readings = std::collections::BTreeSet::new();
        for phase_ms in (0..10_000).step_by(7) {
            let phase = Duration::from_millis(phase_ms);
            let reading = first_reading(start, TEN_S, phase);
            // Even if their passes begin as late as the lead, the judged tick stays the same.
            let late = reading + chrono::Duration::seconds(1);
            let judged = next_tick(Some(late), TEN_S, phase).unwrap();
            assert_eq!(judged, next_tick(Some(reading), TEN_S, phase).unwrap());
            let after = (judged - start).num_milliseconds();
            assert!((6_000..16_000).contains(&after), "{phase_ms}: {after}");
            assert!(reading >= start && reading < start + chrono::Duration::seconds(10));
            readings.insert((reading - start).num_seconds());
        }
        assert_eq!(readings.len(), 10, "spread over the interval: {readings:?}");
    }

    #[test]
    fn phases_are_stable_and_spread() {
        assert_eq!(
            phase_of("http://gw-1:15000", TEN_S),
            phase_of("http://gw-1:15000", TEN_S)
        );
        assert!(phase_of("x", TEN_S) < TEN_S);
        let phases: std::collections::BTreeSet<u128> = (0..50)
            .map(|i| phase_of(&format!("http://gw-{i}:15000"), TEN_S).as_millis() / 1000)
            .collect();
        assert!(
            phases.len() >= 7,
            "50 gateways spread over the interval: {phases:?}"
        );
    }
}
