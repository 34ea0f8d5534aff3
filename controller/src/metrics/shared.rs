//! Shared reads: one scrape of an Envoy admin, or one Prometheus query, per endpoint per tick,
//! fanned out to every canary that reads that endpoint.
//!
//! ```text
//!  canary A ─┐                       ┌─ GET gw:15000/stats/prometheus ─▶ PageIndex (by service, subset)
//!  canary B ─┼─▶ ReadHub::read(key) ─┤   started once; later callers within `max_age` share it
//!  canary C ─┘    (single flight)    └─ (a slow or failing endpoint only delays its own callers)
//! ```
//!
//! A gateway's page holds every service's series, so reading it once per tick and indexing it
//! once serves every canary behind that gateway. Canaries with the same interval tick together
//! (see [`crate::schedule`]): the first caller of a tick starts the read, the others join it.
//!
//! What is shared is the *reading*: each canary still keeps its own previous reading and
//! computes its own delta, so baselines, counter resets and all-or-nothing commits are exactly
//! as they were per canary. A caller never gets the read it already used (`seen`): two ticks of
//! one canary always read two different instants, so an interval is never empty by accident.
//!
//! A read may cover only some callers: a Prometheus query names the services registered when it
//! is sent. Such a read carries a [`Coverage`]: callers that registered later start a new read,
//! but a read that has not been sent yet (it waits for its endpoint's previous answer) covers
//! whoever joins it. So a thousand canaries starting at once send two queries, not a thousand
//! growing ones.

use super::envoy_admin::PageIndex;
use super::prometheus::{PrometheusRegistry, TrafficIndex};
use fledge_core::observe::ObservationError;
use futures::future::{BoxFuture, FutureExt, Shared};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};
use tokio::runtime::Handle;

/// Reads not asked for this long are forgotten (their endpoint is no longer read).
const FORGET_AFTER: Duration = Duration::from_secs(600);

/// A read in flight or done; every caller gets the same `Arc`.
pub type SharedRead<V> = Shared<BoxFuture<'static, Arc<V>>>;

struct Slot<V> {
    seq: u64,
    started: Instant,
    used: Instant,
    coverage: Arc<Coverage>,
    read: SharedRead<V>,
}

/// Up to which registration a read covers (see the module docs): every one until the read
/// [`settles`](Coverage::settle) what it asks for, then those up to what it settled on.
#[derive(Debug)]
pub struct Coverage(AtomicU64);

impl Coverage {
    fn open() -> Self {
        Coverage(AtomicU64::new(u64::MAX))
    }

    /// The read now asks for registrations up to `version` (and no later ones).
    pub fn settle(&self, version: u64) {
        self.0.store(version, Ordering::SeqCst);
    }

    fn covers(&self, needs: u64) -> bool {
        self.0.load(Ordering::SeqCst) >= needs
    }
}

/// Single-flight reads by key.
pub struct SingleFlight<V> {
    slots: Mutex<HashMap<String, Slot<V>>>,
    next_seq: AtomicU64,
    /// Reads started (not joined), for tests and self-metrics.
    started: AtomicU64,
    /// Where reads run (`None`: on the caller's runtime).
    runtime: Option<Handle>,
}

impl<V> Default for SingleFlight<V> {
    fn default() -> Self {
        Self::on(None)
    }
}

impl<V> SingleFlight<V> {
    /// Reads run on `runtime` (`None`: on the caller's).
    fn on(runtime: Option<Handle>) -> Self {
        SingleFlight {
            slots: Mutex::new(HashMap::new()),
            next_seq: AtomicU64::new(1),
            started: AtomicU64::new(0),
            runtime,
        }
    }
}

impl<V: Send + Sync + 'static> SingleFlight<V> {
    /// The read of `key` to use now: the latest one if it started at most `max_age` ago and is
    /// not `seen` (the read this caller used last time), else a new one made by `start`.
    /// Returns its sequence number (to pass as `seen` next time) and the read to await.
    pub fn read(
        &self,
        key: &str,
        max_age: Duration,
        seen: Option<u64>,
        start: impl FnOnce() -> BoxFuture<'static, V>,
    ) -> (u64, SharedRead<V>) {
        self.read_covering(key, max_age, seen, 0, |_| start())
    }

    /// [`SingleFlight::read`] for a caller that needs a read covering its registration
    /// `needs`: a read settled on an earlier one is not joined. `start` gets the new read's
    /// [`Coverage`] to settle once it knows what it asks for. A new read replaces the key's
    /// previous one (callers of that one keep it until they are done).
    pub fn read_covering(
        &self,
        key: &str,
        max_age: Duration,
        seen: Option<u64>,
        needs: u64,
        start: impl FnOnce(Arc<Coverage>) -> BoxFuture<'static, V>,
    ) -> (u64, SharedRead<V>) {
        let now = Instant::now();
        let mut slots = self.lock();
        if let Some(slot) = slots.get_mut(key) {
            let fresh = now.saturating_duration_since(slot.started) <= max_age;
            if fresh && Some(slot.seq) != seen && slot.coverage.covers(needs) {
                slot.used = now;
                return (slot.seq, slot.read.clone());
            }
        }
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        self.started.fetch_add(1, Ordering::Relaxed);
        let coverage = Arc::new(Coverage::open());
        let timed = timed(key.to_string(), start(coverage.clone()));
        let read = run_apart(timed.map(Arc::new), self.runtime.as_ref())
            .boxed()
            .shared();
        if !slots.contains_key(key) {
            slots.retain(|_, slot| now.saturating_duration_since(slot.used) < FORGET_AFTER);
        }
        slots.insert(
            key.to_string(),
            Slot {
                seq,
                started: now,
                used: now,
                coverage,
                read: read.clone(),
            },
        );
        (seq, read)
    }

    /// How many reads were started so far.
    pub fn started(&self) -> u64 {
        self.started.load(Ordering::Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Slot<V>>> {
        match self.slots.lock() {
            Ok(slots) => slots,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

/// `read`, logging how long it took (target `fledge::reads`, debug level).
async fn timed<V>(key: String, read: impl std::future::Future<Output = V>) -> V {
    let started = Instant::now();
    let value = read.await;
    tracing::debug!(target: "fledge::reads", key = %key.lines().next().unwrap_or_default(), elapsed_ms = started.elapsed().as_millis() as u64, "shared read done");
    value
}

/// Run `read` as a task of its own on `runtime` (else the current Tokio runtime; inline when
/// there is none): its callers only wait for it. Polled by its callers instead, a scrape would
/// progress only when one of them is polled — reconciles, 10,000 of which become due at once
/// when a new leader starts — and time out behind them. Dropping the returned future (every
/// caller gone) cancels the task.
fn run_apart<V: Send + 'static>(
    read: impl std::future::Future<Output = V> + Send + 'static,
    runtime: Option<&Handle>,
) -> BoxFuture<'static, V> {
    match runtime.cloned().or_else(|| Handle::try_current().ok()) {
        Some(runtime) => {
            let (task, result) = read.remote_handle();
            runtime.spawn(task);
            result.boxed()
        }
        None => read.boxed(),
    }
}

/// The runtime of [`ReadHub::on_own_threads`]: two threads that only read metrics endpoints
/// (and index what they read), made on first use and kept for the life of the process.
fn reads_runtime() -> Option<Handle> {
    static RUNTIME: OnceLock<Option<tokio::runtime::Runtime>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("fledge-reads")
                .enable_all()
                .build()
                .inspect_err(|error| {
                    tracing::warn!(%error, "cannot start the metrics-read threads; reads share the main runtime")
                })
                .ok()
        })
        .as_ref()
        .map(|runtime| runtime.handle().clone())
}

/// The reads of one process: every canary's metrics source reads through it.
pub struct ReadHub {
    /// The process' HTTP client (one connection pool) for every endpoint.
    pub(crate) http: reqwest::Client,
    /// Envoy `/stats/prometheus` traffic pages, indexed, by URL and reader.
    pub(crate) stats_pages: SingleFlight<Result<PageIndex, ObservationError>>,
    /// Envoy `/stats/prometheus` guard pages: each service's newest trip.
    pub(crate) guard_pages: SingleFlight<Result<HashMap<String, u64>, ObservationError>>,
    /// Prometheus traffic queries, by address and query.
    pub(crate) prometheus_traffic: SingleFlight<Result<TrafficIndex, ObservationError>>,
    /// Prometheus guard queries: each service's newest trip.
    pub(crate) prometheus_guard: SingleFlight<Result<HashMap<String, f64>, ObservationError>>,
    /// Which canaries read each Prometheus (their series are asked for together).
    pub(crate) prometheus: Arc<PrometheusRegistry>,
}

impl std::fmt::Debug for ReadHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadHub")
            .field("reads", &self.reads_started())
            .finish()
    }
}

impl Default for ReadHub {
    fn default() -> Self {
        Self::new()
    }
}

impl ReadHub {
    /// Reads run as tasks of their own on the caller's runtime.
    pub fn new() -> Self {
        Self::on(None)
    }

    /// Reads run on threads of their own (the binaries): a new leader's first reconciles,
    /// thousands at once, keep the main runtime's threads busy for seconds, and a scrape
    /// queued behind them would time out.
    pub fn on_own_threads() -> Self {
        Self::on(reads_runtime())
    }

    fn on(runtime: Option<Handle>) -> Self {
        ReadHub {
            http: crate::http::client(),
            stats_pages: SingleFlight::on(runtime.clone()),
            guard_pages: SingleFlight::on(runtime.clone()),
            prometheus_traffic: SingleFlight::on(runtime.clone()),
            prometheus_guard: SingleFlight::on(runtime),
            prometheus: Arc::default(),
        }
    }

    /// Reads started so far (scrapes and queries; joined reads not counted).
    pub fn reads_started(&self) -> u64 {
        self.stats_pages.started()
            + self.guard_pages.started()
            + self.prometheus_traffic.started()
            + self.prometheus_guard.started()
    }
}

/// How one metrics source reads: through which hub, and how fresh a shared read must be.
#[derive(Debug, Clone)]
pub struct SharedReads {
    pub hub: Arc<ReadHub>,
    /// A traffic read started at most this long ago is shared (see [`max_age_for`]).
    pub max_age: Duration,
    /// The same for guard reads.
    pub guard_max_age: Duration,
}

impl SharedReads {
    /// A source reading alone: its own hub, and every call reads anew.
    pub fn unshared() -> Self {
        SharedReads {
            hub: Arc::new(ReadHub::new()),
            max_age: Duration::ZERO,
            guard_max_age: Duration::ZERO,
        }
    }

    /// Reads through `hub` for a canary analysed every `interval` whose guard (if any) is read
    /// every `guard_interval`.
    pub fn through(hub: Arc<ReadHub>, interval: Duration, guard_interval: Duration) -> Self {
        SharedReads {
            hub,
            max_age: max_age_for(interval),
            guard_max_age: max_age_for(guard_interval),
        }
    }
}

/// Await `read` for at most `timeout` (the caller's own bound: a read started by another
/// canary may have a longer one).
pub async fn within<V>(read: SharedRead<V>, timeout: Duration) -> Option<Arc<V>> {
    tokio::time::timeout(timeout, read).await.ok()
}

/// How fresh a shared read must be for a canary to use it, from its interval: reads of the
/// same tick start within a fraction of a second of each other, the next tick's a whole
/// interval later, so half an interval tells them apart with room for lag.
pub fn max_age_for(interval: Duration) -> Duration {
    interval / 2
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn counting(counter: &Arc<AtomicUsize>) -> impl FnOnce() -> BoxFuture<'static, usize> {
        let counter = counter.clone();
        move || {
            async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                counter.fetch_add(1, Ordering::SeqCst) + 1
            }
            .boxed()
        }
    }

    #[tokio::test]
    async fn callers_within_max_age_share_one_read_and_never_get_theirs_again() {
        let flight = SingleFlight::<usize>::default();
        let reads = Arc::new(AtomicUsize::new(0));
        let max_age = Duration::from_secs(5);
        let (seq_a, a) = flight.read("gw", max_age, None, counting(&reads));
        let (seq_b, b) = flight.read("gw", max_age, None, counting(&reads));
        assert_eq!(seq_a, seq_b);
        assert_eq!((*a.await, *b.await), (1, 1));
        assert_eq!(reads.load(Ordering::SeqCst), 1);
        // The same caller again: it already used read `seq_a`, so a new one starts.
        let (seq_c, c) = flight.read("gw", max_age, Some(seq_a), counting(&reads));
        assert_ne!(seq_c, seq_a);
        assert_eq!(*c.await, 2);
        // Another key is read on its own.
        let (_, d) = flight.read("other", max_age, None, counting(&reads));
        assert_eq!(*d.await, 3);
        assert_eq!(flight.started(), 3);
    }

    #[tokio::test]
    async fn a_read_runs_without_its_callers_polling_it() {
        let flight = SingleFlight::<usize>::default();
        let reads = Arc::new(AtomicUsize::new(0));
        let (_, read) = flight.read("gw", Duration::from_secs(5), None, counting(&reads));
        // No caller awaits it (they may all be busy): it is done anyway.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(reads.load(Ordering::SeqCst), 1);
        assert_eq!(*read.await, 1);
    }

    #[tokio::test]
    async fn reads_can_run_on_threads_of_their_own() {
        let hub = ReadHub::on_own_threads();
        let here = std::thread::current().id();
        let (_, read) = hub
            .stats_pages
            .read("gw", Duration::from_secs(5), None, || {
                async {
                    Err(ObservationError::Unreachable(format!(
                        "{:?}",
                        std::thread::current().name()
                    )))
                }
                .boxed()
            });
        let answer = read.await;
        let Err(ObservationError::Unreachable(thread)) = answer.as_ref() else {
            panic!("the read's own answer");
        };
        assert_eq!(thread, "Some(\"fledge-reads\")");
        assert_eq!(std::thread::current().id(), here);
    }

    #[tokio::test]
    async fn a_read_covers_who_joined_before_it_settled_and_no_one_later() {
        let flight = SingleFlight::<usize>::default();
        let reads = Arc::new(AtomicUsize::new(0));
        let max_age = Duration::from_secs(5);
        let settled = Arc::new(std::sync::Mutex::new(None));
        let start = |counter: &Arc<AtomicUsize>| {
            let start = counting(counter);
            let settled = settled.clone();
            move |coverage: Arc<Coverage>| {
                *settled.lock().unwrap() = Some(coverage);
                start()
            }
        };
        let (first, _) = flight.read_covering("prom", max_age, None, 3, start(&reads));
        // Not settled yet: it covers any registration.
        let (joined, _) = flight.read_covering("prom", max_age, None, 7, start(&reads));
        assert_eq!(joined, first);
        settled.lock().unwrap().take().unwrap().settle(7);
        let (covered, _) = flight.read_covering("prom", max_age, None, 7, start(&reads));
        assert_eq!(covered, first);
        // Registered after it settled: a new read, which replaces it for later callers.
        let (later, read) = flight.read_covering("prom", max_age, None, 8, start(&reads));
        assert_ne!(later, first);
        let (again, _) = flight.read_covering("prom", max_age, None, 1, start(&reads));
        assert_eq!(again, later);
        read.await;
        assert_eq!(flight.started(), 2);
    }

    #[tokio::test]
    async fn an_old_read_is_not_reused() {
        let flight = SingleFlight::<usize>::default();
        let reads = Arc::new(AtomicUsize::new(0));
        let (_, first) = flight.read("gw", Duration::ZERO, None, counting(&reads));
        first.await;
        tokio::time::sleep(Duration::from_millis(5)).await;
        let (_, second) = flight.read("gw", Duration::ZERO, None, counting(&reads));
        assert_eq!(*second.await, 2);
    }

    #[tokio::test]
    async fn a_slow_key_does_not_hold_up_another() {
        let flight = SingleFlight::<&'static str>::default();
        let (_, slow) = flight.read("slow", Duration::from_secs(5), None, || {
            async {
                tokio::time::sleep(Duration::from_secs(30)).await;
                "slow"
            }
            .boxed()
        });
        let (_, fast) = flight.read("fast", Duration::from_secs(5), None, || {
            async { "fast" }.boxed()
        });
        assert_eq!(
            within(fast, Duration::from_secs(1)).await.as_deref(),
            Some(&"fast")
        );
        assert!(within(slow, Duration::from_millis(50)).await.is_none());
    }
}
