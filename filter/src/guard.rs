//! The data-plane guard: a sliding window of one service's canary outcomes, shared by every
//! Envoy worker thread, that trips when the canary's error ratio crosses a hard ceiling.
//!
//! Each worker runs its own VM, so the window lives in proxy-wasm *shared data* (one key per
//! service, visible to all VMs with the same `vm_id`). Workers count canary outcomes locally
//! ([`Counts`]) and merge them into the shared [`Window`] with compare-and-swap
//! ([`merge`]): on every tick (100 ms), and at once when the local counts would cross the
//! ceiling, so the worker that sees the failures trips the guard without waiting. A CAS
//! mismatch (another worker wrote first) is retried a bounded number of times; counts that
//! could not be merged stay local for the next tick.
//!
//! The window is [`BUCKETS`] time buckets across `windowSeconds` (250 ms each for 10 s); each
//! bucket remembers which time slot it holds, so stale buckets are ignored without a sweeper.
//! The ceiling is checked on every *recent stretch* of the window — the current bucket, the
//! last two, ..., all of them: the guard trips when some stretch ending now holds at least
//! `minRequests` canary requests of which at least `maxErrorRatio` failed. Checking only the
//! whole window would let healthy history hide a sudden total failure (with 10 s of successes
//! behind it, a canary failing every request would need 10 s to reach 50%); checking recent
//! stretches trips within about `minRequests` failed requests. Once tripped, the window records
//! the trip time and ignores further outcomes (stragglers in flight) until it re-arms,
//! `rearmSeconds` after the trip, with an empty window.
//!
//! Everything here is plain Rust; `host.rs` implements [`SharedData`] with the
//! `proxy_get_shared_data` / `proxy_set_shared_data` hostcalls.

use fledge_core::filter_config::GuardedService;

/// Time buckets per window.
pub const BUCKETS: usize = 40;
/// Attempts at a compare-and-swap write before the counts wait for the next tick.
pub const MAX_CAS_ATTEMPTS: u32 = 8;
/// First byte of the encoded window; a different value is treated as an empty window.
const FORMAT_VERSION: u8 = 1;
/// Encoded size: version, trip time, then per bucket its slot, requests and failures.
pub const ENCODED_LEN: usize = 1 + 8 + BUCKETS * (8 + 4 + 4);

/// Canary outcomes: requests and how many of them failed (5xx or no response).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub requests: u32,
    pub failures: u32,
}

impl Counts {
    pub fn add(&mut self, other: Counts) {
        self.requests = self.requests.saturating_add(other.requests);
        self.failures = self.failures.saturating_add(other.failures);
    }

    pub fn is_empty(&self) -> bool {
        self.requests == 0
    }
}

/// One guard's thresholds, in the units the window uses.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settings {
    pub max_error_ratio: f64,
    pub min_requests: u32,
    pub window_ms: u64,
    pub rearm_ms: u64,
}

impl From<&GuardedService> for Settings {
    fn from(guard: &GuardedService) -> Self {
        Settings {
            max_error_ratio: guard.max_error_ratio,
            min_requests: guard.min_requests.max(1),
            window_ms: u64::from(guard.window_seconds.max(1)) * 1000,
            rearm_ms: u64::from(guard.rearm_seconds.max(1)) * 1000,
        }
    }
}

impl Settings {
    fn bucket_ms(&self) -> u64 {
        (self.window_ms / BUCKETS as u64).max(1)
    }

    fn slot(&self, now_ms: u64) -> u64 {
        now_ms / self.bucket_ms()
    }

    /// Whether `counts` crosses the ceiling.
    pub fn crossed(&self, counts: Counts) -> bool {
        counts.requests >= self.min_requests
            && f64::from(counts.failures) >= self.max_error_ratio * f64::from(counts.requests)
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Bucket {
    /// `now_ms / bucket_ms` of the time this bucket counts (0: never used).
    slot: u64,
    counts: Counts,
}

/// The shared state of one service's guard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// Unix ms of the trip; 0 while armed.
    pub tripped_at_ms: u64,
    buckets: [Bucket; BUCKETS],
}

impl Default for Window {
    fn default() -> Self {
        Window {
            tripped_at_ms: 0,
            buckets: [Bucket::default(); BUCKETS],
        }
    }
}

impl Window {
    /// Decode shared data; anything malformed (other version, wrong length) reads as a fresh
    /// window, never as a trip.
    pub fn decode(bytes: &[u8]) -> Window {
        Self::try_decode(bytes).unwrap_or_default()
    }

    fn try_decode(bytes: &[u8]) -> Option<Window> {
        let (&version, rest) = bytes.split_first()?;
        if version != FORMAT_VERSION || bytes.len() != ENCODED_LEN {
            return None;
        }
        let (tripped, mut rest) = rest.split_first_chunk::<8>()?;
        let mut window = Window {
            tripped_at_ms: u64::from_le_bytes(*tripped),
            ..Window::default()
        };
        for bucket in &mut window.buckets {
            let (slot, after) = rest.split_first_chunk::<8>()?;
            let (requests, after) = after.split_first_chunk::<4>()?;
            let (failures, after) = after.split_first_chunk::<4>()?;
            *bucket = Bucket {
                slot: u64::from_le_bytes(*slot),
                counts: Counts {
                    requests: u32::from_le_bytes(*requests),
                    failures: u32::from_le_bytes(*failures),
                },
            };
            rest = after;
        }
        Some(window)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(ENCODED_LEN);
        out.push(FORMAT_VERSION);
        out.extend_from_slice(&self.tripped_at_ms.to_le_bytes());
        for bucket in &self.buckets {
            out.extend_from_slice(&bucket.slot.to_le_bytes());
            out.extend_from_slice(&bucket.counts.requests.to_le_bytes());
            out.extend_from_slice(&bucket.counts.failures.to_le_bytes());
        }
        out
    }

    /// Whether the guard holds the canary's traffic back at `now_ms`.
    pub fn is_tripped(&self, now_ms: u64, settings: &Settings) -> bool {
        self.tripped_at_ms != 0 && now_ms < self.tripped_at_ms.saturating_add(settings.rearm_ms)
    }

    /// The counts of the first recent stretch ending at `now_ms` (plus `extra`, counted in the
    /// current bucket) that crosses the ceiling, if any (see the module docs).
    pub fn crossing(&self, now_ms: u64, extra: Counts, settings: &Settings) -> Option<Counts> {
        let current = settings.slot(now_ms);
        let mut stretch = extra;
        for age in 0..BUCKETS as u64 {
            let Some(slot) = current.checked_sub(age) else {
                break;
            };
            let index = (slot % BUCKETS as u64) as usize;
            if let Some(bucket) = self
                .buckets
                .get(index)
                .filter(|b| b.slot == slot && slot != 0)
            {
                stretch.add(bucket.counts);
            }
            if settings.crossed(stretch) {
                return Some(stretch);
            }
        }
        None
    }

    /// Outcomes in the window ending at `now_ms` (the current bucket and the `BUCKETS - 1`
    /// before it).
    pub fn totals(&self, now_ms: u64, settings: &Settings) -> Counts {
        let current = settings.slot(now_ms);
        let oldest = current.saturating_sub(BUCKETS as u64 - 1);
        let mut totals = Counts::default();
        for bucket in &self.buckets {
            if bucket.slot != 0 && (oldest..=current).contains(&bucket.slot) {
                totals.add(bucket.counts);
            }
        }
        totals
    }

    /// Whether adding `extra` at `now_ms` would trip the guard (read-only: the quick local
    /// check before a write).
    pub fn would_trip(&self, now_ms: u64, extra: Counts, settings: &Settings) -> bool {
        if self.is_tripped(now_ms, settings) || extra.is_empty() {
            return false;
        }
        if self.tripped_at_ms == 0 {
            self.crossing(now_ms, extra, settings).is_some()
        } else {
            // Due to re-arm: the window starts empty.
            settings.crossed(extra)
        }
    }

    /// Add `counts` observed at `now_ms`: re-arm first if due, ignore outcomes while tripped,
    /// trip when the ceiling is crossed. Returns the stretch that tripped the guard when this
    /// call did.
    pub fn record(&mut self, now_ms: u64, counts: Counts, settings: &Settings) -> Option<Counts> {
        if self.tripped_at_ms != 0 && !self.is_tripped(now_ms, settings) {
            *self = Window::default();
        }
        if self.tripped_at_ms != 0 || counts.is_empty() {
            return None;
        }
        let slot = settings.slot(now_ms).max(1);
        let index = (slot % BUCKETS as u64) as usize;
        if let Some(bucket) = self.buckets.get_mut(index) {
            if bucket.slot != slot {
                *bucket = Bucket {
                    slot,
                    counts: Counts::default(),
                };
            }
            bucket.counts.add(counts);
        }
        let crossing = self.crossing(now_ms, Counts::default(), settings);
        if crossing.is_some() {
            self.tripped_at_ms = now_ms.max(1);
        }
        crossing
    }
}

/// Result of a shared-data write with a compare-and-swap token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CasWrite {
    Stored,
    /// Someone else wrote since our read: read again and retry.
    Mismatch,
    /// Any other failure (the write is abandoned).
    Failed,
}

/// proxy-wasm shared data: a key/value store shared by all VMs with the same `vm_id`.
pub trait SharedData {
    /// The value and its CAS token; `None` if the key is absent or unreadable.
    fn get_shared(&mut self, key: &str) -> Option<(Vec<u8>, u32)>;
    /// Store `value` if the key's token is still `cas` (0: no check, as Envoy does; used only
    /// for a key that did not exist, where two first writers may overwrite each other once).
    fn set_shared(&mut self, key: &str, value: &[u8], cas: u32) -> CasWrite;
}

/// What [`merge`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Merged {
    /// The shared window as last read or written.
    pub window: Window,
    /// Whether the counts are in the shared window now (false: keep them for the next try).
    pub merged: bool,
    /// The recent stretch of outcomes with which this merge tripped the guard.
    pub tripped: Option<Counts>,
    /// Reads (and writes) needed.
    pub attempts: u32,
}

/// Merge locally counted outcomes into the shared window of `key` (re-arming and tripping as
/// [`Window::record`] decides). With nothing to add and nothing due, this is one read.
pub fn merge(
    store: &mut impl SharedData,
    key: &str,
    now_ms: u64,
    counts: Counts,
    settings: &Settings,
) -> Merged {
    let mut last = Window::default();
    for attempt in 1..=MAX_CAS_ATTEMPTS {
        let (window, cas) = match store.get_shared(key) {
            Some((bytes, cas)) => (Window::decode(&bytes), cas),
            None => (Window::default(), 0),
        };
        let mut next = window.clone();
        let tripped = next.record(now_ms, counts, settings);
        if next == window {
            // Nothing to write (no counts, or tripped and ignoring them, and no re-arm due).
            return Merged {
                window,
                merged: true,
                tripped: None,
                attempts: attempt,
            };
        }
        match store.set_shared(key, &next.encode(), cas) {
            CasWrite::Stored => {
                return Merged {
                    window: next,
                    merged: true,
                    tripped,
                    attempts: attempt,
                }
            }
            CasWrite::Mismatch => last = window,
            CasWrite::Failed => {
                return Merged {
                    window,
                    merged: false,
                    tripped: None,
                    attempts: attempt,
                }
            }
        }
    }
    Merged {
        window: last,
        merged: false,
        tripped: None,
        attempts: MAX_CAS_ATTEMPTS,
    }
}

/// The shared-data key of a service's guard.
pub fn shared_key(service: &str) -> String {
    format!("fledge.guard.{service}")
}

#[cfg(test)]
pub(crate) mod fake {
    use super::*;
    use std::collections::BTreeMap;

    /// Shared data as Envoy keeps it: a value and a CAS token that changes on every write.
    #[derive(Debug, Default)]
    pub struct FakeShared {
        pub values: BTreeMap<String, (Vec<u8>, u32)>,
        pub next_cas: u32,
        /// Writes that fail with a CAS mismatch (after changing the value, as a racing worker).
        pub race_next_writes: u32,
        /// A racing worker's outcomes, added on each forced mismatch.
        pub racer_counts: Counts,
        pub racer_now_ms: u64,
        pub racer_settings: Option<Settings>,
        pub fail_writes: bool,
        pub reads: u32,
        pub writes: u32,
    }

    impl SharedData for FakeShared {
        fn get_shared(&mut self, key: &str) -> Option<(Vec<u8>, u32)> {
            self.reads += 1;
            self.values.get(key).cloned()
        }

        fn set_shared(&mut self, key: &str, value: &[u8], cas: u32) -> CasWrite {
            self.writes += 1;
            if self.fail_writes {
                return CasWrite::Failed;
            }
            if self.race_next_writes > 0 {
                self.race_next_writes -= 1;
                // Another worker writes first.
                let mut theirs = self
                    .values
                    .get(key)
                    .map(|(v, _)| Window::decode(v))
                    .unwrap_or_default();
                if let Some(settings) = self.racer_settings {
                    theirs.record(self.racer_now_ms, self.racer_counts, &settings);
                }
                self.next_cas += 1;
                self.values
                    .insert(key.to_string(), (theirs.encode(), self.next_cas));
                return CasWrite::Mismatch;
            }
            // As Envoy: token 0 writes unconditionally, any other must match.
            match self.values.get(key) {
                Some((_, current)) if cas != 0 && cas != *current => return CasWrite::Mismatch,
                _ => {}
            }
            self.next_cas += 1;
            self.values
                .insert(key.to_string(), (value.to_vec(), self.next_cas));
            CasWrite::Stored
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::FakeShared;
    use super::*;

    fn settings() -> Settings {
        Settings::from(&GuardedService::default()) // 0.5 over >= 20, 10 s window, re-arm 30 s
    }

    const T0: u64 = 1_700_000_000_000;

    fn counts(requests: u32, failures: u32) -> Counts {
        Counts { requests, failures }
    }

    #[test]
    fn trips_at_the_ceiling_with_the_minimum_sample() {
        let s = settings();
        let mut w = Window::default();
        // 19 failures: not enough requests yet.
        assert!(w.record(T0, counts(19, 19), &s).is_none());
        assert!(!w.is_tripped(T0, &s));
        // The 20th request, a success: 19/20 = 95% ≥ 50%.
        assert!(w.record(T0 + 10, counts(1, 0), &s).is_some());
        assert!(w.is_tripped(T0 + 10, &s));
        assert_eq!(w.tripped_at_ms, T0 + 10);
        // Exactly at the ratio trips; below does not.
        let mut w = Window::default();
        assert!(w.record(T0, counts(20, 9), &s).is_none());
        assert!(w.record(T0, counts(2, 2), &s).is_some()); // 11/22 = 50%
        let mut w = Window::default();
        assert!(w.record(T0, counts(1000, 499), &s).is_none());
    }

    #[test]
    fn old_buckets_leave_the_window() {
        let s = settings();
        let mut w = Window::default();
        w.record(T0, counts(15, 15), &s);
        assert_eq!(w.totals(T0 + 9_000, &s), counts(15, 15));
        // 10 s later those 15 failures are out of the window: 10 more do not trip.
        assert!(w.record(T0 + 10_500, counts(10, 10), &s).is_none());
        assert_eq!(w.totals(T0 + 10_500, &s), counts(10, 10));
        // Within the window they add up.
        assert!(w.record(T0 + 11_000, counts(10, 10), &s).is_some());
    }

    #[test]
    fn healthy_history_does_not_hide_a_sudden_total_failure() {
        let s = settings();
        let mut w = Window::default();
        // 10 s of a healthy canary at 100 requests/s, one request every 10 ms.
        let mut t = T0;
        for _ in 0..1000 {
            assert!(w.record(t, counts(1, 0), &s).is_none());
            t += 10;
        }
        // Then every request fails: the guard trips within 0.5 s (here: 25 requests).
        let failing_since = t;
        while w.record(t, counts(1, 1), &s).is_none() {
            t += 10;
            assert!(
                t - failing_since <= 500,
                "not tripped after {} ms",
                t - failing_since
            );
        }
        assert!(
            t - failing_since <= 250,
            "tripped after {} ms",
            t - failing_since
        );
    }

    #[test]
    fn a_canary_failing_5_percent_never_trips() {
        let s = settings();
        let mut w = Window::default();
        let mut x = 7u64;
        for i in 0..200_000u64 {
            // 5% failures, pseudo-random, 200 requests/s for 1000 s.
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let failed = (x >> 33) % 100 < 5;
            let tripped = w.record(T0 + i * 5, counts(1, u32::from(failed)), &s);
            assert!(tripped.is_none(), "tripped at request {i}: {tripped:?}");
        }
    }

    #[test]
    fn healthy_traffic_dilutes_failures() {
        let s = settings();
        let mut w = Window::default();
        for i in 0..100 {
            assert!(
                w.record(T0 + i * 100, counts(10, 4), &s).is_none(),
                "step {i}"
            );
        }
    }

    #[test]
    fn rearms_after_the_hold_with_an_empty_window() {
        let s = settings();
        let mut w = Window::default();
        assert!(w.record(T0, counts(20, 20), &s).is_some());
        // Stragglers while tripped are ignored.
        assert!(w.record(T0 + 1_000, counts(5, 5), &s).is_none());
        assert!(w.is_tripped(T0 + 29_999, &s));
        assert!(!w.is_tripped(T0 + 30_000, &s));
        // After re-arming: fresh window, a failing canary trips it again after min requests.
        assert!(!w.would_trip(T0 + 30_000, counts(19, 19), &s));
        assert!(w.would_trip(T0 + 30_000, counts(20, 20), &s));
        assert!(w.record(T0 + 30_000, counts(19, 19), &s).is_none());
        assert_eq!(w.tripped_at_ms, 0);
        assert!(w.record(T0 + 30_100, counts(1, 1), &s).is_some());
    }

    #[test]
    fn encoding_round_trips_and_garbage_reads_as_armed() {
        let s = settings();
        let mut w = Window::default();
        w.record(T0, counts(7, 3), &s);
        w.record(T0 + 2_500, counts(30, 30), &s);
        let bytes = w.encode();
        assert_eq!(bytes.len(), ENCODED_LEN);
        assert_eq!(Window::decode(&bytes), w);
        for garbage in [
            &[][..],
            &[FORMAT_VERSION][..],
            &bytes[..ENCODED_LEN - 1],
            &[2u8; ENCODED_LEN][..],
        ] {
            assert_eq!(Window::decode(garbage), Window::default());
        }
    }

    #[test]
    fn merge_creates_adds_and_trips() {
        let s = settings();
        let mut store = FakeShared::default();
        let key = shared_key("app");
        let m = merge(&mut store, &key, T0, counts(10, 10), &s);
        assert!(m.merged && m.tripped.is_none());
        let m = merge(&mut store, &key, T0 + 100, counts(10, 10), &s);
        assert!(m.merged && m.tripped.is_some(), "{m:?}");
        assert_eq!(m.window.tripped_at_ms, T0 + 100);
        // Nothing to add: a read only.
        let writes = store.writes;
        let m = merge(&mut store, &key, T0 + 200, Counts::default(), &s);
        assert!(m.window.is_tripped(T0 + 200, &s));
        assert_eq!(store.writes, writes);
    }

    #[test]
    fn merge_retries_after_a_racing_worker_and_keeps_both_counts() {
        let s = settings();
        let mut store = FakeShared {
            race_next_writes: 3,
            racer_counts: counts(4, 4),
            racer_now_ms: T0,
            racer_settings: Some(s),
            ..FakeShared::default()
        };
        let key = shared_key("app");
        let m = merge(&mut store, &key, T0, counts(10, 10), &s);
        assert!(m.merged);
        assert_eq!(m.attempts, 4);
        // 3 racing writes of 4 each, plus ours: 22 failed requests → tripped.
        assert_eq!(m.window.totals(T0, &s), counts(22, 22));
        assert!(m.tripped.is_some());
    }

    #[test]
    fn merge_gives_up_after_bounded_attempts_and_on_failure() {
        let s = settings();
        let key = shared_key("app");
        let mut store = FakeShared {
            race_next_writes: u32::MAX,
            racer_settings: None,
            ..FakeShared::default()
        };
        let m = merge(&mut store, &key, T0, counts(1, 1), &s);
        assert!(!m.merged);
        assert_eq!(m.attempts, MAX_CAS_ATTEMPTS);
        assert_eq!(store.writes, MAX_CAS_ATTEMPTS);
        let mut store = FakeShared {
            fail_writes: true,
            ..FakeShared::default()
        };
        let m = merge(&mut store, &key, T0, counts(1, 1), &s);
        assert!(!m.merged);
        assert_eq!(store.writes, 1);
    }

    #[test]
    fn workers_merging_in_turns_see_one_window() {
        // Two workers, each counting half of a failing canary's requests, merge on their ticks.
        let s = settings();
        let key = shared_key("app");
        let mut store = FakeShared::default();
        let mut tripped_by = None;
        for tick in 0..10u64 {
            for worker in 0..2 {
                let m = merge(&mut store, &key, T0 + tick * 100, counts(3, 3), &s);
                if m.tripped.is_some() {
                    tripped_by = Some((tick, worker));
                }
            }
        }
        // 6 per tick: 18 after three ticks, so worker 0's merge in tick 3 (21 ≥ 20) trips it.
        assert_eq!(tripped_by, Some((3, 0)));
    }
}
