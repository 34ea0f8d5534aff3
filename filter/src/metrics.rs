//! Metric ids: define each encoded stat name once, cache the ids, bound the cache.
//!
//! Envoy's `define_metric` allocates a new id on every call, so ids are defined once and kept:
//! configured clusters are defined in `on_configure`; other clusters (Istio names, unknown
//! names) on first sight. The cache maps the cluster name *bytes* (as read from the
//! `xds.cluster_name` property) to an entry of ids, so a request costs one map lookup and no
//! allocation. Growth is bounded: at most [`MAX_DYNAMIC_PAIRS`] lazily defined
//! `(service, subset)` pairs (beyond that, new pairs are recorded as `(other, other)`) and at most
//! [`MAX_CLUSTER_NAMES`] remembered cluster names (beyond that, new names are resolved on each
//! request but never define new metrics).
//!
//! Everything here talks to the host through [`MetricHost`], which `host.rs` implements with
//! proxy-wasm hostcalls and the tests implement with a fake.

use fledge_core::contract::{self, ResponseClass};
use fledge_core::filter_config::{ClusterResolution, FilterConfig, SubsetLabels};
use std::collections::BTreeMap;

/// Lazily defined `(service, subset)` pairs allowed per VM (configured pairs do not count).
pub const MAX_DYNAMIC_PAIRS: usize = 128;
/// Cluster names remembered per VM (configured names do not count).
pub const MAX_CLUSTER_NAMES: usize = 1024;

/// The kinds of metric the filter defines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    /// Set with [`MetricHost::record`] (the guard's trip time).
    Gauge,
}

/// The three metric hostcalls the filter needs. Failures are swallowed by the implementation
/// (a metric that cannot be defined is simply not recorded): metrics must never break traffic.
pub trait MetricHost {
    /// Define a metric; `None` if the host refused.
    fn define(&mut self, kind: MetricKind, name: &str) -> Option<u32>;
    /// Add `delta` (> 0) to a counter.
    fn increment(&mut self, id: u32, delta: i64);
    /// Set a gauge.
    fn record(&mut self, id: u32, value: u64);
}

/// The metric ids for one `(service, subset)` pair: one request counter per response class
/// (indexed by [`ResponseClass::index`]) and the duration counters in Prometheus' histogram
/// shape: one per bucket bound (cumulative; the last is `+Inf`), the sum and the count.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubsetIds {
    requests: [Option<u32>; ResponseClass::ALL.len()],
    /// `fledge_request_duration_ms_bucket{le}`, the configured bounds then `+Inf`.
    buckets: Vec<Option<u32>>,
    duration_sum: Option<u32>,
    duration_count: Option<u32>,
}

impl SubsetIds {
    /// Define all metrics of a pair: 6 class counters, a bucket counter per bound plus `+Inf`,
    /// the duration sum and count.
    pub fn define(host: &mut impl MetricHost, labels: &SubsetLabels, bounds_ms: &[u32]) -> Self {
        let mut ids = SubsetIds::default();
        for class in ResponseClass::ALL {
            let name = contract::encode_stat_name(
                contract::REQUESTS_TOTAL,
                &[
                    (contract::TAG_SERVICE, &labels.service),
                    (contract::TAG_SUBSET, &labels.subset),
                    (contract::TAG_CLASS, class.label()),
                ],
            );
            if let Some(slot) = ids.requests.get_mut(class.index()) {
                *slot = host.define(MetricKind::Counter, &name);
            }
        }
        let pair = [
            (contract::TAG_SERVICE, labels.service.as_str()),
            (contract::TAG_SUBSET, labels.subset.as_str()),
        ];
        let bounds = bounds_ms.iter().map(|bound| Some(*bound)).chain([None]);
        ids.buckets = bounds
            .map(|bound| {
                let le = contract::le_label(bound);
                let name = contract::encode_stat_name(
                    &format!("{}_bucket", contract::REQUEST_DURATION_MS),
                    &[pair[0], pair[1], (contract::TAG_LE, &le)],
                );
                host.define(MetricKind::Counter, &name)
            })
            .collect();
        let name = |suffix: &str| {
            contract::encode_stat_name(&format!("{}{suffix}", contract::REQUEST_DURATION_MS), &pair)
        };
        ids.duration_sum = host.define(MetricKind::Counter, &name("_sum"));
        ids.duration_count = host.define(MetricKind::Counter, &name("_count"));
        ids
    }

    /// The request counter for `class`, if it could be defined.
    pub fn requests(&self, class: ResponseClass) -> Option<u32> {
        self.requests.get(class.index()).copied().flatten()
    }

    /// The `_count` counter of the durations, if it could be defined.
    pub fn duration_count(&self) -> Option<u32> {
        self.duration_count
    }
}

/// What one pair counted since the last flush: requests by class, durations by bucket (not
/// cumulative; the last slot is above every bound), and the durations' sum.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Pending {
    classes: [i64; ResponseClass::ALL.len()],
    buckets: Vec<i64>,
    duration_sum: i64,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.classes.iter().all(|n| *n == 0) && self.buckets.iter().all(|n| *n == 0)
    }
}

/// Where a request's subset comes from when its cluster name does not say: the endpoint's
/// metadata or an upstream response header, read only when needed (`plugin.rs` implements it).
pub trait UpstreamSubset {
    /// The raw subset the upstream reports for the current request, if any.
    fn upstream_subset(&mut self) -> Option<Vec<u8>>;
}

/// Distinct upstream-reported subsets remembered per cluster name (beyond that, the pair is
/// still found, only with one more label sanitization per request).
pub const MAX_SUBSETS_PER_CLUSTER: usize = 16;

/// What a remembered cluster name resolves to.
#[derive(Debug)]
enum NameEntry {
    /// Always the same pair.
    Fixed(usize),
    /// The service is known; the subset comes from the upstream per request.
    FromUpstream {
        resolution: ClusterResolution,
        /// Raw upstream subset → pair, bounded by [`MAX_SUBSETS_PER_CLUSTER`].
        seen: Vec<(Box<[u8]>, usize)>,
    },
}

/// One defined `(service, subset)` pair, and its counts waiting for the next flush.
#[derive(Debug)]
struct Pair {
    ids: SubsetIds,
    labels: SubsetLabels,
    pending: Pending,
}

/// Cluster name → metric ids, defined once and bounded. Held by the root context and kept
/// across reconfigurations (an id stays valid for the VM's lifetime, and re-defining a name would
/// allocate another one).
#[derive(Debug)]
pub struct MetricCache {
    /// Defined pairs; ids never change once defined, so an index stays valid.
    pairs: Vec<Pair>,
    /// Labels → index into `pairs`.
    by_labels: BTreeMap<SubsetLabels, usize>,
    /// Cluster name bytes → how it resolves. Rebuilt on reconfiguration.
    by_name: BTreeMap<Box<[u8]>, NameEntry>,
    /// Names in `by_name` that came from traffic rather than configuration.
    dynamic_names: usize,
    /// Pairs defined on first sight rather than from configuration.
    dynamic_pairs: usize,
    max_dynamic_pairs: usize,
    max_names: usize,
    /// Duration bucket bounds (ms) the pairs' ids were defined with.
    bounds_ms: Vec<u32>,
}

impl Default for MetricCache {
    fn default() -> Self {
        Self::with_limits(MAX_DYNAMIC_PAIRS, MAX_CLUSTER_NAMES)
    }
}

impl MetricCache {
    pub fn with_limits(max_dynamic_pairs: usize, max_names: usize) -> Self {
        MetricCache {
            pairs: Vec::new(),
            by_labels: BTreeMap::new(),
            by_name: BTreeMap::new(),
            dynamic_names: 0,
            dynamic_pairs: 0,
            max_dynamic_pairs,
            max_names,
            bounds_ms: contract::DEFAULT_DURATION_BUCKETS_MS.to_vec(),
        }
    }

    /// Adopt a (new) configuration: forget which name maps to which pair (the mapping may have
    /// changed) and define every configured cluster's pair up front, so its series exist (at 0)
    /// before the first request and no request pays for defining them.
    pub fn reconfigure(&mut self, config: &FilterConfig, host: &mut impl MetricHost) {
        if config.duration_buckets_ms != self.bounds_ms {
            // Other buckets: publish what is counted, then define every pair anew.
            self.flush(host);
            self.pairs.clear();
            self.by_labels.clear();
            self.dynamic_pairs = 0;
            self.bounds_ms = config.duration_buckets_ms.clone();
        }
        self.by_name.clear();
        self.dynamic_names = 0;
        for name in config.clusters.keys() {
            let entry = match config.classify_cluster(Some(name)) {
                resolution @ ClusterResolution::SubsetFromUpstream { .. } => {
                    NameEntry::FromUpstream {
                        resolution,
                        seen: Vec::new(),
                    }
                }
                resolution => match self.pair_index(resolution.labels(None), false, host) {
                    Some(index) => NameEntry::Fixed(index),
                    None => continue,
                },
            };
            self.by_name.insert(name.as_bytes().into(), entry);
        }
    }

    /// The pair to record a request to `cluster` under (`None`: no cluster, e.g. no route).
    /// Asks `host` for the upstream's subset only when the cluster name does not give one.
    pub fn pair_for<H: MetricHost + UpstreamSubset>(
        &mut self,
        cluster: Option<&[u8]>,
        config: &FilterConfig,
        host: &mut H,
    ) -> Option<usize> {
        let Some(name) = cluster else {
            return self.pair_index(SubsetLabels::other(), false, host);
        };
        match self.by_name.get(name) {
            Some(NameEntry::Fixed(index)) => Some(*index),
            Some(NameEntry::FromUpstream { .. }) => self.upstream_pair(name, host),
            None => self.miss(name, config, host),
        }
    }

    /// The ids to record a request to `cluster` under; see [`MetricCache::pair_for`].
    pub fn ids_for<H: MetricHost + UpstreamSubset>(
        &mut self,
        cluster: Option<&[u8]>,
        config: &FilterConfig,
        host: &mut H,
    ) -> SubsetIds {
        self.pair_for(cluster, config, host)
            .map(|index| self.ids(index))
            .unwrap_or_default()
    }

    /// The ids of a pair (empty if the index is unknown).
    pub fn ids(&self, index: usize) -> SubsetIds {
        self.pairs
            .get(index)
            .map(|p| p.ids.clone())
            .unwrap_or_default()
    }

    /// Count a finished request of pair `index` in the VM (no hostcall): its class and, if
    /// known, its duration. [`MetricCache::flush`] publishes the counts.
    pub fn count(&mut self, index: usize, class: ResponseClass, duration_ms: Option<u64>) {
        let bucket = duration_ms.map(|ms| {
            self.bounds_ms
                .partition_point(|bound| u64::from(*bound) < ms)
        });
        let Some(pending) = self.pairs.get_mut(index).map(|pair| &mut pair.pending) else {
            return;
        };
        if let Some(count) = pending.classes.get_mut(class.index()) {
            *count += 1;
        }
        if let (Some(bucket), Some(ms)) = (bucket, duration_ms) {
            if pending.buckets.len() <= bucket {
                pending.buckets.resize(self.bounds_ms.len() + 1, 0);
            }
            if let Some(count) = pending.buckets.get_mut(bucket) {
                *count += 1;
            }
            pending.duration_sum = pending
                .duration_sum
                .saturating_add(i64::try_from(ms).unwrap_or(i64::MAX));
        }
    }

    /// Add the counts since the last flush to Envoy's counters: one `increment` per non-zero
    /// counter. Per pair the duration counters go in the order `_count`, `+Inf`, the largest
    /// bound down to the smallest, `_sum`, so that a reader going up the bounds while a flush
    /// runs never sees a bucket above the one after it.
    pub fn flush(&mut self, host: &mut impl MetricHost) {
        for pair in &mut self.pairs {
            if pair.pending.is_empty() {
                continue;
            }
            let pending = std::mem::take(&mut pair.pending);
            for class in ResponseClass::ALL {
                let count = pending.classes.get(class.index()).copied().unwrap_or(0);
                if let (Some(id), true) = (pair.ids.requests(class), count > 0) {
                    host.increment(id, count);
                }
            }
            let total: i64 = pending.buckets.iter().sum();
            if total == 0 {
                continue;
            }
            if let Some(id) = pair.ids.duration_count {
                host.increment(id, total);
            }
            // Cumulative from the top: +Inf holds all, each bound what is at or below it.
            let mut above = 0;
            for (index, count) in pending.buckets.iter().enumerate().rev() {
                let cumulative = total - above;
                above += count;
                if let (Some(Some(id)), true) = (pair.ids.buckets.get(index), cumulative > 0) {
                    host.increment(*id, cumulative);
                }
            }
            if let (Some(id), true) = (pair.ids.duration_sum, pending.duration_sum > 0) {
                host.increment(id, pending.duration_sum);
            }
        }
    }

    /// The labels of a pair.
    pub fn labels(&self, index: usize) -> Option<&SubsetLabels> {
        self.pairs.get(index).map(|p| &p.labels)
    }

    fn miss<H: MetricHost + UpstreamSubset>(
        &mut self,
        name: &[u8],
        config: &FilterConfig,
        host: &mut H,
    ) -> Option<usize> {
        let resolution = match std::str::from_utf8(name) {
            Ok(name) => config.classify_cluster(Some(name)),
            Err(_) => ClusterResolution::Other,
        };
        if self.dynamic_names >= self.max_names {
            // Name cache full: still label correctly if the pair is known, but define nothing.
            let upstream = if resolution.needs_upstream_subset() {
                host.upstream_subset()
            } else {
                None
            };
            let labels = resolution.labels(upstream.as_deref().and_then(utf8));
            return match self.by_labels.get(&labels) {
                Some(&index) => Some(index),
                None => self.pair_index(SubsetLabels::other(), false, host),
            };
        }
        self.dynamic_names += 1;
        if resolution.needs_upstream_subset() {
            self.by_name.insert(
                name.into(),
                NameEntry::FromUpstream {
                    resolution,
                    seen: Vec::new(),
                },
            );
            return self.upstream_pair(name, host);
        }
        let index = self.pair_index(resolution.labels(None), true, host)?;
        self.by_name.insert(name.into(), NameEntry::Fixed(index));
        Some(index)
    }

    /// The pair of a cluster whose subset the upstream reports.
    fn upstream_pair<H: MetricHost + UpstreamSubset>(
        &mut self,
        name: &[u8],
        host: &mut H,
    ) -> Option<usize> {
        let raw = host.upstream_subset().unwrap_or_default();
        let Some(NameEntry::FromUpstream { resolution, seen }) = self.by_name.get(name) else {
            return self.pair_index(SubsetLabels::other(), false, host);
        };
        if let Some((_, index)) = seen.iter().find(|(seen_raw, _)| **seen_raw == *raw) {
            return Some(*index);
        }
        let labels = resolution.labels(utf8(&raw));
        let index = self.pair_index(labels, true, host)?;
        if let Some(NameEntry::FromUpstream { seen, .. }) = self.by_name.get_mut(name) {
            if seen.len() < MAX_SUBSETS_PER_CLUSTER {
                seen.push((raw.into_boxed_slice(), index));
            }
        }
        Some(index)
    }

    /// The index of `labels`' pair, defining it if new. A new dynamic pair beyond the bound
    /// becomes `(other, other)`, which is always allowed.
    fn pair_index(
        &mut self,
        labels: SubsetLabels,
        dynamic: bool,
        host: &mut impl MetricHost,
    ) -> Option<usize> {
        if let Some(&index) = self.by_labels.get(&labels) {
            return Some(index);
        }
        if dynamic && !labels.is_other() {
            if self.dynamic_pairs >= self.max_dynamic_pairs {
                return self.pair_index(SubsetLabels::other(), false, host);
            }
            self.dynamic_pairs += 1;
        }
        let ids = SubsetIds::define(host, &labels, &self.bounds_ms);
        let index = self.pairs.len();
        self.pairs.push(Pair {
            ids,
            labels: labels.clone(),
            pending: Pending::default(),
        });
        self.by_labels.insert(labels, index);
        Some(index)
    }

    /// Number of defined `(service, subset)` pairs.
    pub fn defined_pairs(&self) -> usize {
        self.pairs.len()
    }

    /// Number of remembered cluster names.
    pub fn known_names(&self) -> usize {
        self.by_name.len()
    }
}

fn utf8(bytes: &[u8]) -> Option<&str> {
    std::str::from_utf8(bytes).ok()
}

#[cfg(test)]
pub(crate) mod fake {
    use super::*;

    /// A host that hands out ids like Envoy (a new id per define, even for a known name) and
    /// records what the filter did.
    #[derive(Debug, Default)]
    pub struct FakeHost {
        pub defined: Vec<(MetricKind, String)>,
        pub counters: BTreeMap<u32, i64>,
        pub gauges: BTreeMap<u32, u64>,
        /// Refuse every define (host out of memory, bad name, ...).
        pub refuse: bool,
        /// What the "upstream" reports as its subset, and how often it was asked.
        pub upstream: Option<Vec<u8>>,
        pub upstream_asked: usize,
    }

    impl UpstreamSubset for FakeHost {
        fn upstream_subset(&mut self) -> Option<Vec<u8>> {
            self.upstream_asked += 1;
            self.upstream.clone()
        }
    }

    impl FakeHost {
        pub fn name(&self, id: u32) -> &str {
            &self.defined[id as usize].1
        }

        pub fn id(&self, name: &str) -> u32 {
            let matches: Vec<usize> = self
                .defined
                .iter()
                .enumerate()
                .filter(|(_, (_, n))| n == name)
                .map(|(i, _)| i)
                .collect();
            assert_eq!(matches.len(), 1, "{name} defined {} times", matches.len());
            matches[0] as u32
        }

        /// Counter value by encoded name (0 if never incremented).
        pub fn counter(&self, name: &str) -> i64 {
            self.counters.get(&self.id(name)).copied().unwrap_or(0)
        }

        /// Counter value by encoded name summed over every definition (each root context of a
        /// VM defines its own ids for the same stat; Envoy adds them up).
        pub fn counter_sum(&self, name: &str) -> i64 {
            (0..self.defined.len() as u32)
                .filter(|id| self.name(*id) == name)
                .map(|id| self.counters.get(&id).copied().unwrap_or(0))
                .sum()
        }

        /// Gauge values of every definition of `name` (one per worker VM sharing this store).
        pub fn gauge_per_definition(&self, name: &str) -> Vec<Option<u64>> {
            (0..self.defined.len() as u32)
                .filter(|id| self.name(*id) == name)
                .map(|id| self.gauges.get(&id).copied())
                .collect()
        }

        /// Gauge value by encoded name (`None` if never set).
        pub fn gauge(&self, name: &str) -> Option<u64> {
            self.gauges.get(&self.id(name)).copied()
        }

        /// A pair's duration counters: `(count, sum, cumulative count per bound then +Inf)`.
        pub fn durations(&self, service: &str, subset: &str) -> (i64, i64, Vec<i64>) {
            let sum = contract::encode_stat_name(
                &format!("{}_sum", contract::REQUEST_DURATION_MS),
                &[
                    (contract::TAG_SERVICE, service),
                    (contract::TAG_SUBSET, subset),
                ],
            );
            let buckets = contract::DEFAULT_DURATION_BUCKETS_MS
                .map(Some)
                .into_iter()
                .chain([None])
                .map(|le| self.counter(&bucket_name(service, subset, le)))
                .collect();
            (
                self.counter(&duration_name(service, subset)),
                self.counter(&sum),
                buckets,
            )
        }
    }

    impl MetricHost for FakeHost {
        fn define(&mut self, kind: MetricKind, name: &str) -> Option<u32> {
            if self.refuse {
                return None;
            }
            self.defined.push((kind, name.to_string()));
            Some(self.defined.len() as u32 - 1)
        }
        fn increment(&mut self, id: u32, delta: i64) {
            assert!(delta > 0, "Envoy rejects counter increments <= 0");
            assert_eq!(self.defined[id as usize].0, MetricKind::Counter);
            *self.counters.entry(id).or_default() += delta;
        }
        fn record(&mut self, id: u32, value: u64) {
            match self.defined[id as usize].0 {
                MetricKind::Gauge => {
                    self.gauges.insert(id, value);
                }
                MetricKind::Counter => panic!("record on counter {}", self.name(id)),
            }
        }
    }

    pub fn requests_name(service: &str, subset: &str, class: &str) -> String {
        contract::encode_stat_name(
            contract::REQUESTS_TOTAL,
            &[
                (contract::TAG_SERVICE, service),
                (contract::TAG_SUBSET, subset),
                (contract::TAG_CLASS, class),
            ],
        )
    }

    /// `fledge_request_duration_ms_count` of a pair.
    pub fn duration_name(service: &str, subset: &str) -> String {
        contract::encode_stat_name(
            &format!("{}_count", contract::REQUEST_DURATION_MS),
            &[
                (contract::TAG_SERVICE, service),
                (contract::TAG_SUBSET, subset),
            ],
        )
    }

    /// `fledge_request_duration_ms_bucket{le}` of a pair (`None`: `+Inf`).
    pub fn bucket_name(service: &str, subset: &str, le: Option<u32>) -> String {
        contract::encode_stat_name(
            &format!("{}_bucket", contract::REQUEST_DURATION_MS),
            &[
                (contract::TAG_SERVICE, service),
                (contract::TAG_SUBSET, subset),
                (contract::TAG_LE, &contract::le_label(le)),
            ],
        )
    }

    /// Metrics defined per `(service, subset)` pair with the default buckets: 6 classes, 13
    /// bounds + `+Inf`, sum, count.
    pub const PER_PAIR: usize = 6 + contract::DEFAULT_DURATION_BUCKETS_MS.len() + 1 + 2;
}

#[cfg(test)]
mod tests {
    use super::fake::*;
    use super::*;

    fn app_config() -> FilterConfig {
        FilterConfig::parse(
            r#"{"clusters": {"app_stable": {"service": "app", "subset": "stable"},
                             "app_canary": {"service": "app", "subset": "canary"}}}"#,
        )
        .unwrap()
    }

    #[test]
    fn configured_pairs_are_defined_up_front_with_all_classes() {
        let (config, mut host, mut cache) =
            (app_config(), FakeHost::default(), MetricCache::default());
        cache.reconfigure(&config, &mut host);
        assert_eq!(host.defined.len(), 2 * PER_PAIR);
        assert_eq!(cache.defined_pairs(), 2);
        for subset in ["stable", "canary"] {
            for class in ResponseClass::ALL {
                host.id(&requests_name("app", subset, class.label()));
            }
            for le in contract::DEFAULT_DURATION_BUCKETS_MS
                .map(Some)
                .into_iter()
                .chain([None])
            {
                host.id(&bucket_name("app", subset, le));
            }
            assert_eq!(
                host.defined[host.id(&duration_name("app", subset)) as usize].0,
                MetricKind::Counter
            );
        }
        assert_eq!(
            host.name(0),
            "fledge_service=.=app;.;fledge_subset=.=canary;.;fledge_class=.=1xx;.;fledge_requests_total"
        );

        // Requests to configured clusters define nothing more.
        let ids = cache.ids_for(Some(b"app_canary"), &config, &mut host);
        assert_eq!(host.defined.len(), 2 * PER_PAIR);
        let id = ids.requests(ResponseClass::ServerError).unwrap();
        assert_eq!(host.name(id), requests_name("app", "canary", "5xx"));
        assert_eq!(
            host.name(ids.duration_count().unwrap()),
            duration_name("app", "canary")
        );
    }

    #[test]
    fn lazily_defined_once_per_pair() {
        let (config, mut host, mut cache) =
            (app_config(), FakeHost::default(), MetricCache::default());
        cache.reconfigure(&config, &mut host);
        let istio_a = b"outbound|80|v2|reviews.default.svc.cluster.local".as_slice();
        let istio_b = b"outbound|9080|v2|reviews.default.svc.cluster.local".as_slice();
        let first = cache.ids_for(Some(istio_a), &config, &mut host);
        assert_eq!(host.defined.len(), 3 * PER_PAIR);
        for _ in 0..10 {
            assert_eq!(cache.ids_for(Some(istio_a), &config, &mut host), first);
        }
        // Another cluster name with the same labels shares the pair's ids.
        assert_eq!(cache.ids_for(Some(istio_b), &config, &mut host), first);
        assert_eq!(host.defined.len(), 3 * PER_PAIR);
        // Unknown clusters and "no cluster" share (other, other), defined once.
        let other = cache.ids_for(Some(b"BlackHoleCluster"), &config, &mut host);
        assert_eq!(cache.ids_for(None, &config, &mut host), other);
        assert_eq!(cache.ids_for(Some(b"\xff\xfe"), &config, &mut host), other);
        assert_eq!(host.defined.len(), 4 * PER_PAIR);
        let id = other.requests(ResponseClass::NoResponse).unwrap();
        assert_eq!(host.name(id), requests_name("other", "other", "none"));
    }

    #[test]
    fn reconfigure_reuses_ids_and_remaps_names() {
        let (config, mut host, mut cache) =
            (app_config(), FakeHost::default(), MetricCache::default());
        cache.reconfigure(&config, &mut host);
        cache.reconfigure(&config, &mut host);
        assert_eq!(
            host.defined.len(),
            2 * PER_PAIR,
            "same config again defines nothing"
        );

        // app_canary now serves subset v3: new pair defined, app_stable's ids reused.
        let mut changed = config.clone();
        changed.clusters.get_mut("app_canary").unwrap().subset = Some("v3".to_string());
        let stable_before = cache.ids_for(Some(b"app_stable"), &config, &mut host);
        cache.reconfigure(&changed, &mut host);
        assert_eq!(host.defined.len(), 3 * PER_PAIR);
        assert_eq!(
            cache.ids_for(Some(b"app_stable"), &changed, &mut host),
            stable_before
        );
        let canary = cache.ids_for(Some(b"app_canary"), &changed, &mut host);
        assert_eq!(
            host.name(canary.requests(ResponseClass::Success).unwrap()),
            requests_name("app", "v3", "2xx")
        );
    }

    #[test]
    fn dynamic_pairs_are_bounded() {
        let config = FilterConfig::default();
        let mut host = FakeHost::default();
        let mut cache = MetricCache::with_limits(3, 100);
        for i in 0..10 {
            let name = format!("outbound|80|v{i}|svc.ns.svc.cluster.local");
            cache.ids_for(Some(name.as_bytes()), &config, &mut host);
        }
        // 3 real pairs + (other, other), whatever the traffic.
        assert_eq!(cache.defined_pairs(), 4);
        assert_eq!(host.defined.len(), 4 * PER_PAIR);
        let late = cache.ids_for(
            Some(b"outbound|80|v9|svc.ns.svc.cluster.local"),
            &config,
            &mut host,
        );
        assert_eq!(
            host.name(late.requests(ResponseClass::Success).unwrap()),
            requests_name("other", "other", "2xx")
        );
        let early = cache.ids_for(
            Some(b"outbound|80|v1|svc.ns.svc.cluster.local"),
            &config,
            &mut host,
        );
        assert_eq!(
            host.name(early.requests(ResponseClass::Success).unwrap()),
            requests_name("svc", "v1", "2xx")
        );
    }

    #[test]
    fn cluster_names_are_bounded_but_known_pairs_still_label() {
        let config = FilterConfig::default();
        let mut host = FakeHost::default();
        let mut cache = MetricCache::with_limits(100, 2);
        cache.ids_for(Some(b"outbound|80|v1|svc"), &config, &mut host);
        cache.ids_for(Some(b"unknown-1"), &config, &mut host);
        assert_eq!(cache.known_names(), 2);
        // Full: a new name for a known pair still gets that pair; a new pair becomes other.
        let same_pair = cache.ids_for(Some(b"outbound|81|v1|svc"), &config, &mut host);
        assert_eq!(
            host.name(same_pair.duration_count().unwrap()),
            duration_name("svc", "v1")
        );
        let new_pair = cache.ids_for(Some(b"outbound|80|v2|svc"), &config, &mut host);
        assert_eq!(
            host.name(new_pair.duration_count().unwrap()),
            duration_name("other", "other")
        );
        assert_eq!(cache.known_names(), 2);
        assert_eq!(cache.defined_pairs(), 2);
    }

    #[test]
    fn refused_defines_yield_empty_ids_not_panics() {
        let mut host = FakeHost {
            refuse: true,
            ..FakeHost::default()
        };
        let mut cache = MetricCache::default();
        let config = app_config();
        cache.reconfigure(&config, &mut host);
        let ids = cache.ids_for(Some(b"app_canary"), &config, &mut host);
        assert_eq!(ids.requests(ResponseClass::Success), None);
        assert_eq!(ids.duration_count(), None);
    }
}
