//! [`PrometheusSource`]: one canary's traffic, and its custom metrics, from the Prometheus HTTP
//! API (`POST /api/v1/query`, instant queries at Prometheus' own "now").
//!
//! # Built-in traffic: exact deltas of the raw counters
//!
//! Each call sends one query for the *raw cumulative* series of the filter's metrics of this
//! service's two subsets, e.g.
//!
//! ```text
//! {__name__=~"fledge_requests_total|fledge_request_duration_ms_bucket|fledge_request_duration_ms_sum|fledge_request_duration_ms_count",fledge_service="app",fledge_subset=~"stable|canary"}
//! ```
//!
//! — shared ([`super::shared`]): the query names every service whose canaries read this
//! Prometheus (`fledge_service=~"app|cart|..."`, their subsets likewise), is sent once per tick
//! and its answer indexed once by origin; each canary picks its own origins out of it. A canary
//! whose service is not in a read (it just started) starts a new one that includes it.
//!
//! and, per *origin* (one subset as exported by one scraped gateway replica: every label except
//! `__name__`, `le` and `fledge_class`), subtracts the origin's reading of the previous call
//! with [`SubsetTraffic::delta_since`], which treats any decrease as a counter reset (the
//! replica restarted) and then counts everything since the restart. The deltas of all origins
//! are summed per subset: many gateway replicas, replicas that come and go, and restarts are all
//! handled, and the counts are exact whole numbers.
//!
//! Why not `sum by (fledge_subset, fledge_class) (increase(...[<interval>]))`, as Flagger does:
//! `increase()` extrapolates to the edges of its window, so it returns fractional and biased
//! counts (a burst inside a 10 s window scraped every second reads about 10 % high); it needs two
//! samples in the window, so an interval shorter than two scrape intervals would read as "no
//! traffic"; and a window longer than the interval would make consecutive intervals overlap, so
//! the same requests would be judged twice — which a sequential test must never do. Deltas of
//! the raw counters tile time exactly, whatever the scrape interval. The price, as with the Envoy
//! admin source, is that the first call only takes a baseline (counting from "now" also keeps a
//! previous rollout's requests of the same subset out of this one). Counts lag real time by up to
//! one scrape interval (histograms by one Envoy stats flush more); such requests are never lost,
//! they are counted in the next interval.
//!
//! # Custom metrics
//!
//! Every custom metric's query (its template rendered with
//! [`fledge_core::spec::render_query`]) is sent as is, on every call after the baseline. It must
//! return one number: a scalar, or a vector with exactly one sample. An empty vector, NaN or
//! ±Inf (e.g. `0/0` when the canary had no requests) leaves the metric out of
//! [`Observation::custom`], which the analysis treats as "no data" — never as zero. Several
//! series are an error that names the metric and asks for an aggregation such as `sum(...)`.
//!
//! # Failures
//!
//! Transport errors, timeouts, non-API HTTP errors and the API error types `timeout`,
//! `canceled` and `unavailable` are [`ObservationError::Unreachable`] naming the address;
//! other API errors (`bad_data`, `execution`, ...) and answers that do not fit are
//! [`ObservationError::Malformed`] with Prometheus' message and the query. After any error no
//! reading is committed, so the next successful call covers everything since the last one.

use super::shared::{within, Coverage, SharedRead, SharedReads};
use super::{describe_request_error, MergedSubset, MetricsSource, SubsetSelector};
use async_trait::async_trait;
use fledge_core::contract::{REQUESTS_TOTAL, REQUEST_DURATION_MS, TAG_SERVICE, TAG_SUBSET};
use fledge_core::observe::{Observation, ObservationError, SubsetTraffic};
use fledge_core::spec::{render_query, Canary, MetricKind, PrometheusSpec, QueryVariables};
use futures::future::BoxFuture;
use futures::FutureExt;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::task::JoinSet;

mod answer;
mod traffic_answer;
use answer::{AnswerData, AnswerReader, BorrowedSample, QueryContext, Samples};
use traffic_answer::TrafficIndexer;

/// The Prometheus instant-query endpoint, relative to the configured address.
const QUERY_PATH: &str = "/api/v1/query";

/// An origin (a replica's subset) that has not been seen for this long is forgotten. Until then
/// its last reading is kept, so a replica whose scrapes failed for a while is counted from where
/// it left off rather than from zero.
const FORGET_VANISHED_ORIGIN_AFTER: Duration = Duration::from_secs(3600);

/// Longest part of an unexpected response body quoted in an error message.
const BODY_EXCERPT_CHARS: usize = 200;

/// Longest part of a query quoted in an error message (a shared query names many services).
const QUERY_EXCERPT_CHARS: usize = 400;

/// A custom metric's query, already rendered from its template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomQuery {
    /// The metric's `name` in the spec; its value is reported under this key.
    pub metric: String,
    /// The PromQL sent to Prometheus.
    pub promql: String,
}

/// Why a [`PrometheusSource`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum PrometheusSourceError {
    #[error("invalid Prometheus address {address:?}: {reason}; write e.g. http://prometheus.istio-system:9090")]
    InvalidAddress { address: String, reason: String },
    #[error("stable and canary subsets are both {0:?}; they must differ")]
    SameSubsets(String),
    #[error("custom metric {metric:?}: {source}")]
    Template {
        metric: String,
        #[source]
        source: fledge_core::spec::TemplateError,
    },
}

/// Reads one canary's traffic and custom metrics from a Prometheus that scrapes the gateways.
#[derive(Debug)]
pub struct PrometheusSource {
    /// As configured, for messages.
    address: String,
    query_url: reqwest::Url,
    selector: SubsetSelector,
    /// This canary's own traffic query (what the shared one asks for this canary).
    traffic_query: String,
    custom_queries: Vec<CustomQuery>,
    request_timeout: Duration,
    reads: SharedReads,
    /// This canary's place in the shared queries; it leaves them when dropped.
    registration: Registration,
    /// Last committed reading of every origin; `None` until the baseline is taken.
    previous: Option<BTreeMap<OriginKey, RememberedOrigin>>,
    /// Which shared read `previous` came from.
    previous_read: Option<u64>,
    /// Set once we have warned that Prometheus has no series for this canary, so the warning is
    /// not repeated every interval.
    warned_no_series: bool,
}

/// Every label of a series except `__name__`, `le` and `fledge_class`: one subset of one
/// scraped replica.
type OriginKey = BTreeMap<String, String>;

#[derive(Debug, Clone)]
struct RememberedOrigin {
    traffic: SubsetTraffic,
    last_seen: Instant,
}

/// Which of the canary's two subsets a series belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Stable,
    Canary,
}

impl PrometheusSource {
    /// A source querying the Prometheus API at `address` (e.g. `http://127.0.0.1:9090`, a path
    /// prefix such as `http://thanos/prometheus` is kept) for the canary described by
    /// `selector`, evaluating `custom_queries` on every call. Each request is bounded by
    /// `request_timeout`.
    pub fn new(
        address: &str,
        selector: SubsetSelector,
        custom_queries: Vec<CustomQuery>,
        request_timeout: Duration,
    ) -> Result<Self, PrometheusSourceError> {
        if selector.stable_subset == selector.canary_subset {
            return Err(PrometheusSourceError::SameSubsets(selector.stable_subset));
        }
        let query_url = query_url(address)?;
        let reads = SharedReads::unshared();
        let address = address.trim_end_matches('/').to_string();
        let registration = Registration::new(&reads, &address, &selector);
        Ok(PrometheusSource {
            traffic_query: traffic_query(std::slice::from_ref(&selector)),
            registration,
            address,
            query_url,
            selector,
            custom_queries,
            request_timeout,
            reads,
            previous: None,
            previous_read: None,
            warned_no_series: false,
        })
    }

    /// Share the traffic and guard queries through `reads` with every other canary reading the
    /// same Prometheus (custom queries stay this canary's own).
    pub fn sharing(mut self, reads: SharedReads) -> Self {
        self.registration = Registration::new(&reads, &self.address, &self.selector);
        self.reads = reads;
        self
    }

    /// The source for `canary` with its `metricsSource.prometheus` settings: the canary's
    /// service and subsets, and every custom metric's template rendered with the canary's
    /// [`QueryVariables`].
    pub fn for_canary(
        canary: &Canary,
        prometheus: &PrometheusSpec,
    ) -> Result<Self, PrometheusSourceError> {
        let selector = SubsetSelector {
            service: canary.spec.service.clone(),
            stable_subset: canary.spec.stable.subset.clone(),
            canary_subset: canary.spec.canary.subset.clone(),
        };
        let variables = QueryVariables::for_canary(canary);
        let custom_queries = canary
            .spec
            .analysis
            .metrics
            .iter()
            .filter(|metric| metric.kind() == Some(MetricKind::Custom))
            .filter_map(|metric| metric.query.as_deref().map(|template| (metric, template)))
            .map(|(metric, template)| {
                render_query(template, &variables)
                    .map(|promql| CustomQuery {
                        metric: metric.name.clone(),
                        promql,
                    })
                    .map_err(|source| PrometheusSourceError::Template {
                        metric: metric.name.clone(),
                        source,
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Self::new(
            &prometheus.address,
            selector,
            custom_queries,
            prometheus.timeout.0,
        )
    }

    /// The PromQL sent for the built-in traffic counts.
    pub fn traffic_query(&self) -> &str {
        &self.traffic_query
    }

    /// The rendered custom queries, in spec order.
    pub fn custom_queries(&self) -> &[CustomQuery] {
        &self.custom_queries
    }

    /// The current cumulative reading of every origin of this canary, and the shared read it
    /// came from.
    async fn read_origins(&self) -> Result<(u64, BTreeMap<OriginKey, Origin>), ObservationError> {
        let hub = &self.reads.hub;
        // One read per Prometheus in flight, asking for every canary registered when it is
        // sent; a canary joins a read sent after it registered, or one still waiting to be
        // sent (keyed by its query instead, 1,000 canaries registering one by one made as
        // many queries).
        let (seq, read) = hub.prometheus_traffic.read_covering(
            &self.address,
            self.reads.max_age,
            self.previous_read,
            self.registration.version,
            |coverage| {
                let client = hub.http.clone();
                let url = self.query_url.clone();
                let address = self.address.clone();
                let timeout = self.request_timeout;
                let registry = hub.prometheus.clone();
                registry
                    .send(address.clone(), QueryKind::Traffic, coverage, move |promql| {
                        async move { read_traffic(&client, &url, &address, &promql, timeout).await }
                            .boxed()
                    })
                    .boxed()
            },
        );
        let index = self.await_query(read, "traffic query").await?;
        let index = index.as_ref().as_ref().map_err(Clone::clone)?;
        let origins = index.origins(&self.selector).map_err(|problem| {
            ObservationError::Malformed(format!(
                "Prometheus {}: {problem}; query: {}",
                self.address, self.traffic_query
            ))
        })?;
        Ok((seq, origins))
    }

    /// Wait for a shared query (started by whichever canary asked first) for at most this
    /// canary's request timeout.
    async fn await_query<V>(
        &self,
        read: SharedRead<V>,
        what: &str,
    ) -> Result<Arc<V>, ObservationError> {
        within(read, self.request_timeout).await.ok_or_else(|| {
            ObservationError::Unreachable(format!(
                "Prometheus {}: {what}: timed out after {:?}",
                self.address, self.request_timeout
            ))
        })
    }

    /// Evaluate every custom query concurrently. Metrics without a finite value are left out.
    async fn read_custom(&self) -> Result<BTreeMap<String, f64>, ObservationError> {
        let mut tasks = JoinSet::new();
        for (index, custom) in self.custom_queries.iter().enumerate() {
            let client = self.reads.hub.http.clone();
            let url = self.query_url.clone();
            let address = self.address.clone();
            let custom = custom.clone();
            let timeout = self.request_timeout;
            tasks.spawn(async move {
                let result = evaluate_custom(&client, &url, &address, &custom, timeout).await;
                (index, result)
            });
        }
        let mut results: Vec<Option<Result<Option<f64>, ObservationError>>> =
            self.custom_queries.iter().map(|_| None).collect();
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok((index, result)) => {
                    if let Some(slot) = results.get_mut(index) {
                        *slot = Some(result);
                    }
                }
                Err(join_error) => {
                    tracing::error!(error = %join_error, "custom metric query task failed");
                }
            }
        }

        let mut values = BTreeMap::new();
        let mut unreachable = Vec::new();
        let mut malformed = Vec::new();
        for (custom, result) in self.custom_queries.iter().zip(results) {
            match result {
                Some(Ok(Some(value))) => {
                    values.insert(custom.metric.clone(), value);
                }
                Some(Ok(None)) => {
                    tracing::debug!(metric = %custom.metric, "custom metric has no data this interval");
                }
                Some(Err(ObservationError::Unreachable(message))) => unreachable.push(message),
                Some(Err(other)) => malformed.push(other_message(other)),
                None => unreachable.push(format!(
                    "Prometheus {}: custom metric {:?}: query task did not finish",
                    self.address, custom.metric
                )),
            }
        }
        if unreachable.is_empty() && malformed.is_empty() {
            return Ok(values);
        }
        Err(if unreachable.is_empty() {
            ObservationError::Malformed(malformed.join("; "))
        } else {
            unreachable.extend(malformed);
            ObservationError::Unreachable(unreachable.join("; "))
        })
    }

    fn warn_if_no_series(&mut self, origins: &BTreeMap<OriginKey, Origin>) {
        if !origins.is_empty() {
            self.warned_no_series = false;
            return;
        }
        if !self.warned_no_series {
            self.warned_no_series = true;
            tracing::warn!(
                prometheus = %self.address,
                service = %self.selector.service,
                stable = %self.selector.stable_subset,
                canary = %self.selector.canary_subset,
                "Prometheus has no fledge series for this canary yet (counted as no traffic); \
                 check that it scrapes the gateways' /stats/prometheus and that the filter labels \
                 this service and these subsets"
            );
        }
    }

    /// Remember `origins` (from shared read `read`) as the committed reading; forget origins
    /// unseen for too long.
    fn commit(&mut self, read: u64, origins: BTreeMap<OriginKey, Origin>, now: Instant) {
        self.previous_read = Some(read);
        let remembered = self.previous.get_or_insert_with(BTreeMap::new);
        for (key, origin) in origins {
            remembered.insert(
                key,
                RememberedOrigin {
                    traffic: origin.traffic,
                    last_seen: now,
                },
            );
        }
        remembered.retain(|_, origin| {
            now.saturating_duration_since(origin.last_seen) < FORGET_VANISHED_ORIGIN_AFTER
        });
    }
}

#[async_trait]
impl MetricsSource for PrometheusSource {
    /// `max by (fledge_service) (fledge_guard_tripped{fledge_service=~"<services>"})`, shared
    /// like the traffic query: the newest trip over every scraped gateway; no series or 0 means
    /// armed. Lags by up to one scrape interval.
    async fn guard_tripped_at(
        &mut self,
    ) -> Result<Option<chrono::DateTime<chrono::Utc>>, ObservationError> {
        let hub = &self.reads.hub;
        let (_, read) = hub.prometheus_guard.read_covering(
            &self.address,
            self.reads.guard_max_age,
            None,
            self.registration.version,
            |coverage| {
                let client = hub.http.clone();
                let url = self.query_url.clone();
                let address = self.address.clone();
                let timeout = self.request_timeout;
                let registry = hub.prometheus.clone();
                registry
                    .send(address.clone(), QueryKind::Guard, coverage, move |promql| {
                        async move { read_guards(&client, &url, &address, &promql, timeout).await }
                            .boxed()
                    })
                    .boxed()
            },
        );
        let guards = self.await_query(read, "guard query").await?;
        let guards = guards.as_ref().as_ref().map_err(Clone::clone)?;
        Ok(guards
            .get(&self.selector.service)
            .copied()
            .filter(|s| *s >= 1.0 && *s < 1e12)
            .and_then(|s| chrono::DateTime::from_timestamp(s as i64, 0)))
    }

    async fn observe(&mut self) -> Result<Observation, ObservationError> {
        if self.previous.is_none() {
            let (read, origins) = self.read_origins().await.inspect_err(|error| {
                tracing::warn!(prometheus = %self.address, %error, "metrics baseline not taken");
            })?;
            self.warn_if_no_series(&origins);
            self.commit(read, origins, Instant::now());
            tracing::debug!(service = %self.selector.service, "metrics baseline taken");
            return Err(ObservationError::Baseline);
        }

        let (origins, custom) = tokio::join!(self.read_origins(), self.read_custom());
        let ((read, origins), custom) = match (origins, custom) {
            (Ok(origins), Ok(custom)) => (origins, custom),
            (origins, custom) => {
                let error = combine_errors(origins.err(), custom.err());
                tracing::warn!(
                    prometheus = %self.address,
                    service = %self.selector.service,
                    %error,
                    "metrics query failed; no observation this interval"
                );
                return Err(error);
            }
        };
        self.warn_if_no_series(&origins);

        let previous = self.previous.as_ref();
        let mut stable = MergedSubset::new(&self.selector.stable_subset);
        let mut canary = MergedSubset::new(&self.selector.canary_subset);
        let mut reset = Vec::new();
        for (key, origin) in &origins {
            // The key holds the subset label, so a remembered origin is always the same side.
            let delta = match previous.and_then(|p| p.get(key)) {
                Some(before) => {
                    if origin.traffic.is_reset_since(&before.traffic) {
                        reset.push(format_labels(key));
                    }
                    origin.traffic.delta_since(&before.traffic)
                }
                // Not seen before: a new replica or a subset's first requests, counted from 0.
                None => origin.traffic.clone(),
            };
            let merged = match origin.side {
                Side::Stable => &mut stable,
                Side::Canary => &mut canary,
            };
            merged.add(&format_labels(key), &delta).map_err(|problem| {
                ObservationError::Malformed(format!("Prometheus {}: {problem}", self.address))
            })?;
        }
        let (stable, canary) = (stable.traffic, canary.traffic);
        self.commit(read, origins, Instant::now());
        tracing::debug!(
            service = %self.selector.service,
            stable_requests = stable.requests(),
            canary_requests = canary.requests(),
            custom_metrics = custom.len(),
            "metrics read from Prometheus"
        );
        Ok(Observation {
            stable,
            canary,
            custom,
            counter_reset: (!reset.is_empty()).then(|| {
                format!(
                    "the counters of {} went back to zero (a gateway restarted)",
                    reset.join(", ")
                )
            }),
        })
    }
}

/// One error out of the traffic and custom query results: `Unreachable` if either was.
fn combine_errors(
    traffic: Option<ObservationError>,
    custom: Option<ObservationError>,
) -> ObservationError {
    let errors: Vec<ObservationError> = traffic.into_iter().chain(custom).collect();
    let any_unreachable = errors
        .iter()
        .any(|e| matches!(e, ObservationError::Unreachable(_)));
    let message = errors
        .into_iter()
        .map(other_message)
        .collect::<Vec<_>>()
        .join("; ");
    if any_unreachable {
        ObservationError::Unreachable(message)
    } else {
        ObservationError::Malformed(message)
    }
}

/// The message inside an error, without the variant's prefix.
fn other_message(error: ObservationError) -> String {
    match error {
        ObservationError::Unreachable(message) | ObservationError::Malformed(message) => message,
        ObservationError::Baseline => ObservationError::Baseline.to_string(),
    }
}

/// The traffic query for the canaries of `selectors` (see the module docs): their services'
/// series of their subsets, `=` for one value, a regex of alternatives for several.
fn traffic_query(selectors: &[SubsetSelector]) -> String {
    let names = [
        REQUESTS_TOTAL.to_string(),
        format!("{REQUEST_DURATION_MS}_bucket"),
        format!("{REQUEST_DURATION_MS}_sum"),
        format!("{REQUEST_DURATION_MS}_count"),
    ]
    .map(|name| regex_escape(&name))
    .join("|");
    let services = distinct(selectors.iter().map(|s| s.service.as_str()));
    let subsets = distinct(
        selectors
            .iter()
            .flat_map(|s| [s.stable_subset.as_str(), s.canary_subset.as_str()]),
    );
    format!(
        "{{__name__=~{names},{TAG_SERVICE}{services},{TAG_SUBSET}=~{subsets}}}",
        names = promql_string(&names),
        services = matcher(&services),
        subsets = promql_string(&alternatives(&subsets)),
    )
}

/// The guard query for `services`: each one's newest trip over every scraped gateway.
fn guard_query(services: &[&str]) -> String {
    format!(
        "max by ({TAG_SERVICE}) ({}{{{TAG_SERVICE}{}}})",
        fledge_core::contract::GUARD_TRIPPED,
        matcher(services)
    )
}

/// `="x"` for one value, `=~"a|b"` for several.
fn matcher(values: &[&str]) -> String {
    match values {
        [one] => format!("={}", promql_string(one)),
        several => format!("=~{}", promql_string(&alternatives(several))),
    }
}

fn alternatives(values: &[&str]) -> String {
    values
        .iter()
        .map(|v| regex_escape(v))
        .collect::<Vec<_>>()
        .join("|")
}

/// `values` without repeats, in first-seen order.
fn distinct<'a>(values: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    let mut seen = std::collections::HashSet::new();
    values.filter(|v| seen.insert(*v)).collect()
}

/// (service, stable subset, canary subset) of a registered canary.
type SelectorKey = (String, String, String);

/// The canaries reading one Prometheus, and its turns (one answer of each kind in flight).
#[derive(Debug, Default)]
struct AddressRegistrations {
    /// Registered canaries → how many sources read for each.
    selectors: BTreeMap<SelectorKey, usize>,
    traffic_turn: Arc<tokio::sync::Mutex<()>>,
    guard_turn: Arc<tokio::sync::Mutex<()>>,
}

#[derive(Debug, Default)]
struct Registered {
    by_address: HashMap<String, AddressRegistrations>,
    /// Bumped by every registration (at any address): a read settled on version `v`
    /// ([`Coverage`]) asks for every canary registered at `v` or before.
    version: u64,
}

/// The canaries reading each Prometheus: the shared queries ask for all of their series.
#[derive(Debug, Default)]
pub struct PrometheusRegistry {
    registered: Mutex<Registered>,
}

/// Which shared query of an address.
#[derive(Debug, Clone, Copy)]
enum QueryKind {
    Traffic,
    Guard,
}

impl PrometheusRegistry {
    fn lock(&self) -> std::sync::MutexGuard<'_, Registered> {
        match self.registered.lock() {
            Ok(map) => map,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    fn selectors(&self, address: &str) -> (u64, Vec<SubsetSelector>) {
        let registered = self.lock();
        let selectors = registered
            .by_address
            .get(address)
            .map(|registrations| {
                registrations
                    .selectors
                    .keys()
                    .map(|(service, stable, canary)| SubsetSelector {
                        service: service.clone(),
                        stable_subset: stable.clone(),
                        canary_subset: canary.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        (registered.version, selectors)
    }

    /// The query of `kind` for every canary registered now at `address`, and the registration
    /// version it covers.
    fn query_now(&self, address: &str, kind: QueryKind) -> (u64, String) {
        let (version, selectors) = self.selectors(address);
        let promql = match kind {
            QueryKind::Traffic => traffic_query(&selectors),
            QueryKind::Guard => {
                guard_query(&distinct(selectors.iter().map(|s| s.service.as_str())))
            }
        };
        (version, promql)
    }

    /// The lock one query of `kind` at `address` holds while in flight: one answer at a time
    /// (each can be megabytes), and the next read asks for everyone who registered meanwhile.
    fn turn(&self, address: &str, kind: QueryKind) -> Arc<tokio::sync::Mutex<()>> {
        let mut registered = self.lock();
        let registrations = registered
            .by_address
            .entry(address.to_string())
            .or_default();
        match kind {
            QueryKind::Traffic => registrations.traffic_turn.clone(),
            QueryKind::Guard => registrations.guard_turn.clone(),
        }
    }

    /// Add one source of `key` at `address`; the registration version it needs a read to cover.
    fn register(&self, address: &str, key: &SelectorKey) -> u64 {
        let mut registered = self.lock();
        registered.version += 1;
        *registered
            .by_address
            .entry(address.to_string())
            .or_default()
            .selectors
            .entry(key.clone())
            .or_default() += 1;
        registered.version
    }

    fn unregister(&self, address: &str, key: &SelectorKey) {
        let mut registered = self.lock();
        if let Some(registrations) = registered.by_address.get_mut(address) {
            if let Some(count) = registrations.selectors.get_mut(key) {
                *count -= 1;
                if *count == 0 {
                    registrations.selectors.remove(key);
                }
            }
            if registrations.selectors.is_empty() {
                registered.by_address.remove(address);
            }
        }
    }

    /// Send the shared query of `kind` for `address` once it is its turn, asking for every
    /// canary registered by then (settling `coverage` on it).
    async fn send<V>(
        self: Arc<Self>,
        address: String,
        kind: QueryKind,
        coverage: Arc<Coverage>,
        send: impl FnOnce(String) -> BoxFuture<'static, V>,
    ) -> V {
        let turn = self.turn(&address, kind);
        let _turn = turn.lock().await;
        let (version, promql) = self.query_now(&address, kind);
        coverage.settle(version);
        send(promql).await
    }
}

/// A source's place in its Prometheus' shared queries, left when dropped.
#[derive(Debug)]
struct Registration {
    registry: Arc<PrometheusRegistry>,
    address: String,
    key: SelectorKey,
    /// The registration version a shared read must cover to include this source.
    version: u64,
}

impl Registration {
    fn new(reads: &SharedReads, address: &str, selector: &SubsetSelector) -> Self {
        let key = (
            selector.service.clone(),
            selector.stable_subset.clone(),
            selector.canary_subset.clone(),
        );
        let registry = reads.hub.prometheus.clone();
        let version = registry.register(address, &key);
        Registration {
            registry,
            address: address.to_string(),
            key,
            version,
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.unregister(&self.address, &self.key);
    }
}

/// One origin of a shared traffic answer: its key, its subset, its traffic (or why it cannot
/// be read).
type IndexedOrigin = (OriginKey, String, Result<SubsetTraffic, String>);

/// The answer to a shared traffic query: every origin's cumulative traffic, by service.
#[derive(Debug, Default)]
pub struct TrafficIndex {
    by_service: HashMap<String, Vec<IndexedOrigin>>,
}

impl TrafficIndex {
    /// The origins of `selector`'s two subsets; the first problem of one of them fails it.
    fn origins(&self, selector: &SubsetSelector) -> Result<BTreeMap<OriginKey, Origin>, String> {
        let Some(origins) = self.by_service.get(&selector.service) else {
            return Ok(BTreeMap::new());
        };
        let mut selected = BTreeMap::new();
        for (key, subset, traffic) in origins {
            let side = if *subset == selector.stable_subset {
                Side::Stable
            } else if *subset == selector.canary_subset {
                Side::Canary
            } else {
                continue;
            };
            let traffic = traffic.clone()?;
            selected.insert(key.clone(), Origin { side, traffic });
        }
        Ok(selected)
    }
}

/// Send the shared traffic query and index its answer as it arrives.
async fn read_traffic(
    client: &reqwest::Client,
    url: &reqwest::Url,
    address: &str,
    promql: &str,
    timeout: Duration,
) -> Result<TrafficIndex, ObservationError> {
    let query = QueryContext {
        address,
        what: "traffic query",
        promql,
    };
    match read_answer(client, url, &query, timeout, TrafficIndexer::default()).await? {
        AnswerData::Vector(indexer) => Ok(indexer.finish()),
        other => Err(ObservationError::Malformed(format!(
            "Prometheus {address}: traffic query returned a {} instead of a vector; query: {}",
            other.type_name(),
            excerpt(promql)
        ))),
    }
}

/// Send the shared guard query: each service's newest trip (Unix seconds).
async fn read_guards(
    client: &reqwest::Client,
    url: &reqwest::Url,
    address: &str,
    promql: &str,
    timeout: Duration,
) -> Result<HashMap<String, f64>, ObservationError> {
    let query = QueryContext {
        address,
        what: "guard query",
        promql,
    };
    let guards = match read_answer(client, url, &query, timeout, GuardSamples::default()).await? {
        AnswerData::Vector(guards) => guards,
        other => {
            return Err(ObservationError::Malformed(format!(
                "Prometheus {address}: guard query returned a {} instead of a vector; query: {}",
                other.type_name(),
                excerpt(promql)
            )))
        }
    };
    match guards.problem {
        Some(problem) => Err(ObservationError::Malformed(format!(
            "Prometheus {address}: guard query: {problem}; query: {}",
            excerpt(promql)
        ))),
        None => Ok(guards.trips),
    }
}

/// What the guard query keeps: each service's value; the first value that is not a number.
#[derive(Debug, Default)]
struct GuardSamples {
    trips: HashMap<String, f64>,
    problem: Option<String>,
}

impl Samples for GuardSamples {
    fn add(&mut self, sample: &[u8]) -> Result<(), serde_json::Error> {
        let sample: BorrowedSample<'_> = serde_json::from_slice(sample)?;
        let (Some(service), Some(value)) = (sample.metric.get(TAG_SERVICE), sample.value) else {
            return Ok(());
        };
        match parse_prometheus_float(&value.1) {
            Ok(value) => {
                self.trips.insert(service.to_string(), value);
            }
            Err(problem) => {
                self.problem.get_or_insert(problem);
            }
        }
        Ok(())
    }
}

/// A query for an error message: whole when short, else its start and its length.
fn excerpt(promql: &str) -> String {
    if promql.chars().count() <= QUERY_EXCERPT_CHARS {
        return promql.to_string();
    }
    let start: String = promql.chars().take(QUERY_EXCERPT_CHARS).collect();
    format!("{start}... ({} characters)", promql.len())
}

/// `value` as a PromQL double-quoted string literal (quotes included): backslash, double quote
/// and control characters are escaped, so any label value selects exactly itself.
pub fn promql_string(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// `value` as an RE2 regular expression matching exactly `value` (Prometheus anchors `=~`
/// matchers itself). Still needs [`promql_string`] to become a literal.
pub fn regex_escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn query_url(address: &str) -> Result<reqwest::Url, PrometheusSourceError> {
    let invalid = |reason: String| PrometheusSourceError::InvalidAddress {
        address: address.to_string(),
        reason,
    };
    let base = reqwest::Url::parse(address.trim_end_matches('/'))
        .map_err(|error| invalid(error.to_string()))?;
    if base.scheme() != "http" && base.scheme() != "https" {
        return Err(invalid(
            "only http:// and https:// are supported".to_string(),
        ));
    }
    if base.query().is_some() || base.fragment().is_some() {
        return Err(invalid(
            "a query string or fragment is not supported".to_string(),
        ));
    }
    let mut url = base.clone();
    url.set_path(&format!(
        "{}{QUERY_PATH}",
        base.path().trim_end_matches('/')
    ));
    Ok(url)
}

/// Prometheus writes floats as Go does: digits, `NaN`, `+Inf`, `-Inf`.
fn parse_prometheus_float(text: &str) -> Result<f64, String> {
    match text {
        "NaN" => Ok(f64::NAN),
        "+Inf" | "Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        _ => text
            .parse::<f64>()
            .map_err(|_| format!("{text:?} is not a number")),
    }
}

/// Send `promql` and read the answer as it arrives, its vector's samples into `samples`.
/// Only a chunk and the sample cut at its end are held, never the body; each chunk's parse is
/// short (at most hyper's read buffer, a few hundred KB), so it runs on the reading task.
async fn read_answer<S: Samples>(
    client: &reqwest::Client,
    url: &reqwest::Url,
    query: &QueryContext<'_>,
    timeout: Duration,
    samples: S,
) -> Result<AnswerData<S>, ObservationError> {
    let unreachable = |problem: String| {
        ObservationError::Unreachable(format!(
            "Prometheus {}: {}: {problem}",
            query.address, query.what
        ))
    };
    let mut response = client
        .post(url.clone())
        .timeout(timeout)
        .form(&[("query", query.promql)])
        .send()
        .await
        .map_err(|error| unreachable(describe_request_error(&error)))?;
    let status = response.status();
    let mut reader = AnswerReader::new(samples);
    let mut chunks = super::ChunkStats::default();
    while let Some(chunk) = response.chunk().await.map_err(|error| {
        unreachable(format!(
            "reading the response: {}",
            describe_request_error(&error)
        ))
    })? {
        let started = Instant::now();
        let wants_more = reader.feed(&chunk);
        chunks.add(chunk.len(), started.elapsed());
        if !wants_more {
            // Not an API answer, and its start (for the message) is read.
            break;
        }
    }
    tracing::debug!(
        target: "fledge::reads",
        prometheus = query.address,
        query = query.what,
        bytes = chunks.bytes,
        chunks = chunks.count,
        largest_chunk = chunks.largest,
        slowest_parse_us = chunks.slowest.as_micros() as u64,
        "answer parsed"
    );
    reader.finish(query, status)
}

/// The value of one custom metric: `Ok(None)` when it has no data (empty, NaN, ±Inf).
async fn evaluate_custom(
    client: &reqwest::Client,
    url: &reqwest::Url,
    address: &str,
    custom: &CustomQuery,
    timeout: Duration,
) -> Result<Option<f64>, ObservationError> {
    let what = format!("custom metric {:?}", custom.metric);
    let query = QueryContext {
        address,
        what: &what,
        promql: &custom.promql,
    };
    let data = read_answer(client, url, &query, timeout, CustomSamples::default()).await?;
    custom_value(&data).map_err(|problem| {
        ObservationError::Malformed(format!(
            "Prometheus {address}: {what} {problem}; query: {}",
            custom.promql
        ))
    })
}

/// What a custom query keeps of a vector: how many samples, the first one's value (`None`
/// for a native histogram), and the labels of the first few for a message.
#[derive(Debug, Default)]
struct CustomSamples {
    count: usize,
    first_value: Option<String>,
    shown: Vec<String>,
}

/// How many series of an answer with several a message names.
const SERIES_SHOWN: usize = 3;

impl Samples for CustomSamples {
    fn add(&mut self, sample: &[u8]) -> Result<(), serde_json::Error> {
        let mut sample: BorrowedSample<'_> = serde_json::from_slice(sample)?;
        self.count += 1;
        if self.count == 1 {
            self.first_value = sample.value.map(|value| value.1.to_string());
        }
        if self.shown.len() < SERIES_SHOWN {
            // In label order, as a map of them would print (the answer's order is not promised).
            sample.metric.0.sort_by(|a, b| a.0.cmp(&b.0));
            self.shown.push(sample.metric.describe());
        }
        Ok(())
    }
}

/// One number out of a custom query's answer (see the module docs).
fn custom_value(data: &AnswerData<CustomSamples>) -> Result<Option<f64>, String> {
    let value = match data {
        AnswerData::Scalar(value) => &value.1,
        AnswerData::Vector(samples) => match samples.count {
            0 => return Ok(None),
            1 => samples.first_value.as_ref().ok_or_else(|| {
                "returned a native histogram; a custom query must return one number, e.g. \
                 histogram_quantile(0.99, ...)"
                    .to_string()
            })?,
            several => {
                return Err(format!(
                    "returned {several} series ({}{}); a custom query must return one number: \
                     aggregate it, e.g. sum(...) or max(...)",
                    samples.shown.join(", "),
                    if several > SERIES_SHOWN { ", ..." } else { "" }
                ));
            }
        },
        other => {
            return Err(format!(
                "returned a {}; a custom query must return one number (a scalar or a \
                 one-sample instant vector), e.g. sum(rate(...[{{{{ interval }}}}]))",
                other.type_name()
            ))
        }
    };
    let number = parse_prometheus_float(value)?;
    Ok(number.is_finite().then_some(number))
}

fn format_labels(labels: &BTreeMap<String, String>) -> String {
    let pairs: Vec<(&str, &str)> = labels
        .iter()
        .map(|(key, value)| (key.as_str(), value.as_str()))
        .collect();
    format_label_pairs(&pairs)
}

/// `name{label="value",...}` out of a series' labels (`__name__` among them, in any place).
fn format_label_pairs(labels: &[(&str, &str)]) -> String {
    let name = labels
        .iter()
        .find(|(key, _)| *key == "__name__")
        .map(|(_, value)| *value)
        .unwrap_or("");
    let pairs: Vec<String> = labels
        .iter()
        .filter(|(key, _)| *key != "__name__")
        .map(|(key, value)| format!("{key}={}", promql_string(value)))
        .collect();
    format!("{name}{{{}}}", pairs.join(","))
}

/// One origin's cumulative reading.
#[derive(Debug, Clone, PartialEq)]
struct Origin {
    side: Side,
    traffic: SubsetTraffic,
}

#[cfg(test)]
mod tests {
    use super::*;
    use fledge_core::contract::ResponseClass;
    use fledge_testkit::http::{closed_port_url, FakeEndpoint, Reply};
    use serde_json::{json, Value};

    /// A custom query's value out of a successful answer with `data` (read whole and in
    /// 1-byte pieces, which must agree).
    fn custom_value_of(data: &str) -> Result<Option<f64>, String> {
        let body = format!(r#"{{"status": "success", "data": {data}}}"#);
        let read = |cuts: &[usize]| {
            answer::read_in_pieces(body.as_bytes(), cuts, CustomSamples::default(), 200)
                .map_err(|error| error.to_string())
                .and_then(|data| custom_value(&data))
        };
        let bytes: Vec<usize> = (1..body.len()).collect();
        let whole = read(&[]);
        assert_eq!(
            format!("{:?}", read(&bytes)),
            format!("{whole:?}"),
            "{body}"
        );
        whole
    }

    #[test]
    fn a_custom_value_with_its_type_before_or_after_it() {
        let sample = r#"{"metric": {"job": "a", "__name__": "up"}, "value": [1.5, "2"]}"#;
        let nan = r#"{"metric": {}, "value": [1.5, "NaN"]}"#;
        for (data, value) in [
            (
                format!(r#"{{"resultType": "vector", "result": [{sample}]}}"#),
                Some(2.0),
            ),
            (
                format!(r#"{{"result": [{sample}], "resultType": "vector"}}"#),
                Some(2.0),
            ),
            (
                format!(r#"{{"resultType": "vector", "result": [{nan}]}}"#),
                None,
            ),
            (
                r#"{"resultType": "vector", "result": []}"#.to_string(),
                None,
            ),
            (
                r#"{"result": [1, "-Inf"], "resultType": "scalar"}"#.to_string(),
                None,
            ),
            (
                r#"{"resultType": "scalar", "result": [1, "0.25"]}"#.to_string(),
                Some(0.25),
            ),
        ] {
            assert_eq!(custom_value_of(&data), Ok(value), "{data}");
        }
        for (data, problem) in [
            (
                format!(r#"{{"resultType": "vector", "result": [{sample}, {sample}]}}"#),
                r#"returned 2 series (up{job="a"}, up{job="a"})"#,
            ),
            (
                format!(
                    r#"{{"result": [{sample}, {sample}, {sample}, {sample}], "resultType": "vector"}}"#
                ),
                r#"returned 4 series (up{job="a"}, up{job="a"}, up{job="a"}, ...)"#,
            ),
            (
                r#"{"resultType": "vector", "result": [{"metric": {}, "histogram": [1, {}]}]}"#
                    .to_string(),
                "returned a native histogram",
            ),
            (
                r#"{"resultType": "matrix", "result": [{"values": []}]}"#.to_string(),
                "returned a range vector (matrix)",
            ),
            (
                r#"{"result": [1, "x"], "resultType": "string", "stats": {}}"#.to_string(),
                "returned a string",
            ),
            (
                r#"{"resultType": "histogram", "result": []}"#.to_string(),
                "returned a result of an unknown type",
            ),
            (
                r#"{"result": []}"#.to_string(),
                "missing field `resultType`",
            ),
            (
                r#"{"resultType": "vector"}"#.to_string(),
                "missing field `result`",
            ),
            (
                r#"{"result": {}, "resultType": "vector"}"#.to_string(),
                "invalid type",
            ),
            (
                r#"{"resultType": "scalar", "result": [1]}"#.to_string(),
                "invalid length",
            ),
        ] {
            let error = custom_value_of(&data).unwrap_err();
            assert!(error.contains(problem), "{data}: {error}");
        }
    }

    /// A fake Prometheus query API; stopped when dropped. It answers each PromQL set with
    /// [`set_reply`] / [`reply_ok`]; any other query gets a `bad_data` error.
    async fn fake_prometheus() -> FakeEndpoint {
        FakeEndpoint::start_with_fallback(|request| {
            let query = request.param("query").unwrap_or_default();
            Reply::json(
                400,
                &json!({"status": "error", "errorType": "bad_data", "error": format!("fake: unexpected query {query}")}),
            )
        })
        .await
        .unwrap()
    }

    fn set_reply(prometheus: &FakeEndpoint, promql: &str, reply: Reply) {
        prometheus.reply_when(QUERY_PATH, "query", promql, reply);
    }

    fn reply_ok(prometheus: &FakeEndpoint, promql: &str, data: Value) {
        let body = json!({"status": "success", "data": data});
        set_reply(prometheus, promql, Reply::json(200, &body));
    }

    /// Every PromQL the fake received, in order.
    fn queries_sent(prometheus: &FakeEndpoint) -> Vec<String> {
        prometheus.params("query")
    }

    fn selector() -> SubsetSelector {
        SubsetSelector {
            service: "app".to_string(),
            stable_subset: "stable".to_string(),
            canary_subset: "canary".to_string(),
        }
    }

    const TRAFFIC_QUERY: &str = r#"{__name__=~"fledge_requests_total|fledge_request_duration_ms_bucket|fledge_request_duration_ms_sum|fledge_request_duration_ms_count",fledge_service="app",fledge_subset=~"stable|canary"}"#;

    fn source(prometheus: &FakeEndpoint, custom: &[(&str, &str)]) -> PrometheusSource {
        PrometheusSource::new(
            prometheus.url(),
            selector(),
            custom
                .iter()
                .map(|(metric, promql)| CustomQuery {
                    metric: metric.to_string(),
                    promql: promql.to_string(),
                })
                .collect(),
            Duration::from_millis(500),
        )
        .unwrap()
    }

    fn vector(samples: Vec<Value>) -> Value {
        json!({"resultType": "vector", "result": samples})
    }

    fn sample(labels: Value, value: &str) -> Value {
        json!({"metric": labels, "value": [1_700_000_000.5, value]})
    }

    /// The cumulative series one scraped Envoy (`instance`) exports for one subset of `app`:
    /// 2xx and 5xx counters and a histogram with buckets le=10, le=100.
    struct Series<'a> {
        instance: &'a str,
        subset: &'a str,
        ok: u64,
        failed: u64,
        buckets: [u64; 2],
        count: u64,
    }

    impl Series<'_> {
        fn samples(&self) -> Vec<Value> {
            let labels = |name: &str, extra: &[(&str, &str)]| {
                let mut labels = json!({
                    "__name__": name,
                    "instance": self.instance,
                    "job": "envoy",
                    "fledge_service": "app",
                    "fledge_subset": self.subset,
                });
                for (key, value) in extra {
                    labels[*key] = json!(value);
                }
                labels
            };
            vec![
                sample(
                    labels("fledge_requests_total", &[("fledge_class", "2xx")]),
                    &self.ok.to_string(),
                ),
                sample(
                    labels("fledge_requests_total", &[("fledge_class", "5xx")]),
                    &self.failed.to_string(),
                ),
                sample(
                    labels("fledge_request_duration_ms_bucket", &[("le", "10")]),
                    &self.buckets[0].to_string(),
                ),
                sample(
                    labels("fledge_request_duration_ms_bucket", &[("le", "100")]),
                    &self.buckets[1].to_string(),
                ),
                sample(
                    labels("fledge_request_duration_ms_bucket", &[("le", "+Inf")]),
                    &self.count.to_string(),
                ),
                sample(
                    labels("fledge_request_duration_ms_sum", &[]),
                    &format!("{}.5", self.count * 10),
                ),
                sample(
                    labels("fledge_request_duration_ms_count", &[]),
                    &self.count.to_string(),
                ),
            ]
        }
    }

    fn traffic(series: &[Series<'_>]) -> Value {
        vector(series.iter().flat_map(Series::samples).collect())
    }

    fn series<'a>(instance: &'a str, subset: &'a str, ok: u64, failed: u64) -> Series<'a> {
        let total = ok + failed;
        Series {
            instance,
            subset,
            ok,
            failed,
            buckets: [total / 2, total],
            count: total,
        }
    }

    fn requests(traffic: &SubsetTraffic) -> (u64, u64) {
        (
            traffic.count(ResponseClass::Success),
            traffic.count(ResponseClass::ServerError),
        )
    }

    #[test]
    fn traffic_query_is_exactly_this_promql() {
        assert_eq!(traffic_query(&[selector()]), TRAFFIC_QUERY);
    }

    #[test]
    fn label_values_are_escaped_in_string_literals_and_regexes() {
        let selector = SubsetSelector {
            service: "a\"b\\c".to_string(),
            stable_subset: "v1.2".to_string(),
            canary_subset: "can|ary(x)".to_string(),
        };
        assert_eq!(
            traffic_query(std::slice::from_ref(&selector)),
            r#"{__name__=~"fledge_requests_total|fledge_request_duration_ms_bucket|fledge_request_duration_ms_sum|fledge_request_duration_ms_count",fledge_service="a\"b\\c",fledge_subset=~"v1\\.2|can\\|ary\\(x\\)"}"#
        );
        let cases = [
            ("plain", r#""plain""#),
            ("quo\"te", r#""quo\"te""#),
            ("back\\slash", r#""back\\slash""#),
            ("new\nline\ttab", r#""new\nline\ttab""#),
            ("bell\u{7}", r#""bell\u0007""#),
            ("ünïcode", r#""ünïcode""#),
        ];
        for (value, want) in cases {
            assert_eq!(promql_string(value), want, "{value:?}");
        }
        assert_eq!(
            regex_escape("a.b*c+d?e^f$g[h]i{j}k(l)m|n\\o"),
            r"a\.b\*c\+d\?e\^f\$g\[h\]i\{j\}k\(l\)m\|n\\o"
        );
    }

    #[tokio::test]
    async fn first_call_is_a_baseline_then_exact_deltas_summed_over_replicas() {
        let prometheus = fake_prometheus().await;
        reply_ok(
            &prometheus,
            TRAFFIC_QUERY,
            traffic(&[
                series("gw-a:9901", "stable", 100, 1),
                series("gw-b:9901", "stable", 200, 2),
                series("gw-a:9901", "canary", 10, 0),
            ]),
        );
        let mut source = source(&prometheus, &[]);
        assert_eq!(source.observe().await, Err(ObservationError::Baseline));
        assert_eq!(queries_sent(&prometheus), vec![TRAFFIC_QUERY.to_string()]);

        reply_ok(
            &prometheus,
            TRAFFIC_QUERY,
            traffic(&[
                series("gw-a:9901", "stable", 150, 2),
                series("gw-b:9901", "stable", 230, 4),
                series("gw-a:9901", "canary", 25, 3),
            ]),
        );
        let observation = source.observe().await.unwrap();
        assert_eq!(requests(&observation.stable), (50 + 30, 1 + 2));
        assert_eq!(requests(&observation.canary), (15, 3));
        // Histograms: [total/2, total] per replica, so the deltas are (76-50)+(117-101) etc.
        assert_eq!(observation.stable.latency.bounds_ms, vec![10.0, 100.0]);
        assert_eq!(
            observation.stable.latency.cumulative,
            vec![(76 - 50) + (117 - 101), 83]
        );
        assert_eq!(observation.stable.latency.count, 83);
        assert!((observation.stable.latency.sum_ms - 830.0).abs() < 1e-9);
        assert_eq!(observation.canary.latency.count, 18);
        assert!(observation.custom.is_empty());

        // Nothing new: an empty interval, not an error.
        let observation = source.observe().await.unwrap();
        assert_eq!(observation.stable.requests(), 0);
        assert_eq!(observation.canary.requests(), 0);
        assert_eq!(queries_sent(&prometheus).len(), 3);
    }

    #[tokio::test]
    async fn restarted_new_and_vanished_replicas() {
        let prometheus = fake_prometheus().await;
        reply_ok(
            &prometheus,
            TRAFFIC_QUERY,
            traffic(&[
                series("a", "stable", 1000, 0),
                series("b", "stable", 500, 0),
            ]),
        );
        let mut source = source(&prometheus, &[]);
        assert_eq!(source.observe().await, Err(ObservationError::Baseline));

        // a restarted (its counters went down to 7), c is a new replica, b was not scraped.
        reply_ok(
            &prometheus,
            TRAFFIC_QUERY,
            traffic(&[series("a", "stable", 7, 1), series("c", "stable", 40, 0)]),
        );
        let observation = source.observe().await.unwrap();
        assert_eq!(requests(&observation.stable), (7 + 40, 1));

        // b is back: it is counted from where it left off, not from zero.
        reply_ok(
            &prometheus,
            TRAFFIC_QUERY,
            traffic(&[
                series("a", "stable", 10, 1),
                series("b", "stable", 520, 0),
                series("c", "stable", 40, 0),
            ]),
        );
        let observation = source.observe().await.unwrap();
        assert_eq!(requests(&observation.stable), (3 + 20, 0));
    }

    #[tokio::test]
    async fn histogram_appearing_after_counters_is_not_counted_twice() {
        let prometheus = fake_prometheus().await;
        let counters_only = vector(vec![sample(
            json!({"__name__": "fledge_requests_total", "instance": "a", "fledge_service": "app",
                   "fledge_subset": "canary", "fledge_class": "2xx"}),
            "5",
        )]);
        reply_ok(&prometheus, TRAFFIC_QUERY, counters_only);
        let mut source = source(&prometheus, &[]);
        assert_eq!(source.observe().await, Err(ObservationError::Baseline));
        let mut with_histogram = series("a", "canary", 8, 0);
        with_histogram.buckets = [8, 8];
        let mut samples = with_histogram.samples();
        for s in &mut samples {
            s["metric"].as_object_mut().unwrap().remove("job");
        }
        reply_ok(&prometheus, TRAFFIC_QUERY, vector(samples));
        let observation = source.observe().await.unwrap();
        assert_eq!(requests(&observation.canary), (3, 0));
        assert_eq!(observation.canary.latency.count, 8);
    }

    #[tokio::test]
    async fn custom_queries_are_sent_as_rendered_and_judged_by_their_answer() {
        let prometheus = fake_prometheus().await;
        reply_ok(
            &prometheus,
            TRAFFIC_QUERY,
            traffic(&[series("a", "canary", 1, 0)]),
        );
        let one_sample = vector(vec![sample(json!({}), "0.25")]);
        let cases: Vec<(&str, Value, Option<f64>)> = vec![
            ("vector", one_sample, Some(0.25)),
            (
                "scalar",
                json!({"resultType": "scalar", "result": [1_700_000_000.0, "3"]}),
                Some(3.0),
            ),
            ("empty", vector(vec![]), None),
            ("nan", vector(vec![sample(json!({}), "NaN")]), None),
            ("inf", vector(vec![sample(json!({}), "+Inf")]), None),
            (
                "neg-inf",
                json!({"resultType": "scalar", "result": [1.0, "-Inf"]}),
                None,
            ),
            (
                "negative",
                vector(vec![sample(json!({}), "-1.5e-3")]),
                Some(-0.0015),
            ),
        ];
        let queries: Vec<(String, String)> = cases
            .iter()
            .map(|(metric, _, _)| {
                (
                    metric.to_string(),
                    format!("sum(rate(x{{m=\"{metric}\"}}[30s]))"),
                )
            })
            .collect();
        for ((_, promql), (_, data, _)) in queries.iter().zip(&cases) {
            reply_ok(&prometheus, promql, data.clone());
        }
        let custom: Vec<(&str, &str)> = queries
            .iter()
            .map(|(metric, promql)| (metric.as_str(), promql.as_str()))
            .collect();
        let mut source = source(&prometheus, &custom);
        assert_eq!(source.observe().await, Err(ObservationError::Baseline));
        assert_eq!(
            queries_sent(&prometheus),
            vec![TRAFFIC_QUERY.to_string()],
            "the baseline does not evaluate custom queries"
        );
        let observation = source.observe().await.unwrap();
        for (metric, _, want) in &cases {
            assert_eq!(observation.custom.get(*metric).copied(), *want, "{metric}");
        }
        let mut sent = queries_sent(&prometheus);
        sent.sort();
        let mut expected: Vec<String> = queries.iter().map(|(_, q)| q.clone()).collect();
        expected.push(TRAFFIC_QUERY.to_string());
        expected.push(TRAFFIC_QUERY.to_string());
        expected.sort();
        assert_eq!(sent, expected);
    }

    /// Observe once after the baseline with one custom query answered by `reply`.
    async fn observe_custom(reply: Reply) -> (Result<Observation, ObservationError>, String) {
        let prometheus = fake_prometheus().await;
        reply_ok(
            &prometheus,
            TRAFFIC_QUERY,
            traffic(&[series("a", "canary", 1, 0)]),
        );
        let promql = "sum by (pod) (errors)";
        set_reply(&prometheus, promql, reply);
        let mut source = source(&prometheus, &[("error-count", promql)]);
        assert_eq!(source.observe().await, Err(ObservationError::Baseline));
        (source.observe().await, prometheus.url().to_string())
    }

    #[tokio::test]
    async fn custom_query_with_several_series_is_malformed_and_asks_for_an_aggregation() {
        let data = vector(vec![
            sample(json!({"pod": "p1"}), "1"),
            sample(json!({"pod": "p2"}), "2"),
        ]);
        let (result, _) = observe_custom(Reply::json(
            200,
            &json!({"status": "success", "data": data}),
        ))
        .await;
        let Err(ObservationError::Malformed(message)) = result else {
            panic!("expected Malformed, got {result:?}");
        };
        for needle in [
            "custom metric \"error-count\"",
            "returned 2 series",
            "pod=\"p1\"",
            "sum(...)",
            "query: sum by (pod) (errors)",
        ] {
            assert!(message.contains(needle), "missing {needle:?}: {message}");
        }
    }

    #[tokio::test]
    async fn custom_query_returning_a_range_vector_is_malformed() {
        let data = json!({"resultType": "matrix", "result": []});
        let (result, _) = observe_custom(Reply::json(
            200,
            &json!({"status": "success", "data": data}),
        ))
        .await;
        let Err(ObservationError::Malformed(message)) = result else {
            panic!("expected Malformed, got {result:?}");
        };
        assert!(message.contains("range vector"), "{message}");
    }

    #[tokio::test]
    async fn prometheus_errors_carry_their_text_and_the_query() {
        let (result, _) = observe_custom(Reply::json(
            400,
            &json!({"status": "error", "errorType": "bad_data",
                   "error": "1:8: parse error: unexpected \")\""}),
        ))
        .await;
        let Err(ObservationError::Malformed(message)) = result else {
            panic!("expected Malformed, got {result:?}");
        };
        for needle in [
            "bad_data",
            "parse error: unexpected \")\"",
            "query: sum by (pod) (errors)",
            "custom metric \"error-count\"",
        ] {
            assert!(message.contains(needle), "missing {needle:?}: {message}");
        }

        // A query Prometheus could not finish in time says nothing about the query itself.
        let (result, url) = observe_custom(Reply::json(503, &json!({"status": "error", "errorType": "timeout", "error": "query timed out in expression evaluation"}),
        ))
        .await;
        let Err(ObservationError::Unreachable(message)) = result else {
            panic!("expected Unreachable, got {result:?}");
        };
        assert!(
            message.contains(&url) && message.contains("timed out"),
            "{message}"
        );
    }

    #[tokio::test]
    async fn http_errors_and_timeouts_are_unreachable_and_name_the_address() {
        let (result, url) =
            observe_custom(Reply::Body(502, "<html>bad gateway</html>".to_string())).await;
        let Err(ObservationError::Unreachable(message)) = result else {
            panic!("expected Unreachable, got {result:?}");
        };
        assert!(message.contains(&url), "{message}");
        assert!(message.contains("502"), "{message}");

        let (result, url) = observe_custom(Reply::Slow(Duration::from_secs(5))).await;
        let Err(ObservationError::Unreachable(message)) = result else {
            panic!("expected Unreachable, got {result:?}");
        };
        assert!(message.contains(&url), "{message}");
        assert!(message.contains("timed out"), "{message}");

        let closed_port_url = closed_port_url().unwrap();
        let mut closed = PrometheusSource::new(
            &closed_port_url,
            selector(),
            Vec::new(),
            Duration::from_millis(500),
        )
        .unwrap();
        match closed.observe().await {
            Err(ObservationError::Unreachable(message)) => {
                assert!(message.contains(&closed_port_url), "{message}")
            }
            other => panic!("expected Unreachable, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_failed_call_keeps_the_previous_reading() {
        let prometheus = fake_prometheus().await;
        reply_ok(
            &prometheus,
            TRAFFIC_QUERY,
            traffic(&[series("a", "canary", 10, 0)]),
        );
        let mut source = source(&prometheus, &[("ratio", "vector(1)")]);
        assert_eq!(source.observe().await, Err(ObservationError::Baseline));

        // Traffic moved on, but the custom query fails: no observation, nothing committed.
        reply_ok(
            &prometheus,
            TRAFFIC_QUERY,
            traffic(&[series("a", "canary", 15, 0)]),
        );
        assert!(matches!(
            source.observe().await,
            Err(ObservationError::Malformed(message)) if message.contains("unexpected query vector(1)")
        ));

        reply_ok(
            &prometheus,
            "vector(1)",
            vector(vec![sample(json!({}), "1")]),
        );
        reply_ok(
            &prometheus,
            TRAFFIC_QUERY,
            traffic(&[series("a", "canary", 17, 0)]),
        );
        let observation = source.observe().await.unwrap();
        assert_eq!(requests(&observation.canary), (7, 0));
        assert_eq!(observation.custom.get("ratio"), Some(&1.0));
    }

    #[tokio::test]
    async fn canaries_starting_together_send_two_queries_not_one_each() {
        let prometheus = fake_prometheus().await;
        let hub = Arc::new(super::super::ReadHub::new());
        let reads = SharedReads::through(hub, Duration::from_secs(10), Duration::from_secs(10));
        let selectors: Vec<SubsetSelector> = (0..50)
            .map(|i| SubsetSelector {
                service: format!("svc-{i:02}"),
                ..selector()
            })
            .collect();
        reply_ok(&prometheus, &traffic_query(&selectors), vector(vec![]));
        let first = &selectors[..1];
        set_reply(
            &prometheus,
            &traffic_query(first),
            Reply::Slow(Duration::from_millis(300)),
        );
        let start = |selector: SubsetSelector| {
            let (url, reads) = (prometheus.url().to_string(), reads.clone());
            async move {
                let timeout = Duration::from_secs(5);
                let source = PrometheusSource::new(&url, selector, vec![], timeout);
                let mut source = source.unwrap().sharing(reads);
                let result = source.observe().await;
                (source, result)
            }
        };
        // The first canary's query is in flight (slow) when the other 49 start their sources
        // and read at once, as a burst of reconciles does: each of them registers after that
        // read was sent, and all of them join the one read waiting for its turn, which then
        // names them all.
        let alone = tokio::spawn(start(selectors[0].clone()));
        while queries_sent(&prometheus).is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let burst = selectors[1..].iter().cloned().map(start);
        let (_sources, results): (Vec<_>, Vec<_>) =
            futures::future::join_all(burst).await.into_iter().unzip();
        let _first_source = alone.await.unwrap();
        let sent = queries_sent(&prometheus);
        assert_eq!(sent.len(), 2, "{sent:#?}");
        assert_eq!(sent[0], traffic_query(first));
        assert_eq!(sent[1], traffic_query(&selectors));
        let baselines = results
            .iter()
            .filter(|r| matches!(r, Err(ObservationError::Baseline)))
            .count();
        assert_eq!(baselines, 49, "{results:?}");
    }

    #[tokio::test]
    async fn malformed_traffic_answers() {
        let labels = |name: &str, extra: Value| {
            let mut labels = json!({"__name__": name, "instance": "a", "fledge_service": "app", "fledge_subset": "canary"});
            for (key, value) in extra.as_object().unwrap() {
                labels[key] = value.clone();
            }
            labels
        };
        let cases: Vec<(&str, Reply, &str)> = vec![
            (
                "scalar",
                Reply::json(
                    200,
                    &json!({"status": "success", "data": {"resultType": "scalar", "result": [1.0, "1"]}}),
                ),
                "returned a scalar instead of a vector",
            ),
            (
                "not json",
                Reply::Body(200, "<html>login</html>".to_string()),
                "not a Prometheus API answer",
            ),
            (
                "unknown class",
                Reply::json(
                    200,
                    &json!({"status": "success", "data": vector(vec![
                    sample(labels("fledge_requests_total", json!({"fledge_class": "6xx"})), "1")])}),
                ),
                "unknown fledge_class \"6xx\"",
            ),
            (
                "negative counter",
                Reply::json(
                    200,
                    &json!({"status": "success", "data": vector(vec![
                    sample(labels("fledge_requests_total", json!({"fledge_class": "2xx"})), "-3")])}),
                ),
                "expected a non-negative count",
            ),
        ];
        for (what, reply, needle) in cases {
            let prometheus = fake_prometheus().await;
            set_reply(&prometheus, TRAFFIC_QUERY, reply);
            let mut source = source(&prometheus, &[]);
            match source.observe().await {
                Err(ObservationError::Malformed(message)) => {
                    assert!(message.contains(needle), "{what}: {message}");
                    assert!(message.contains(prometheus.url()), "{what}: {message}");
                    assert!(message.contains(TRAFFIC_QUERY), "{what}: {message}");
                }
                other => panic!("{what}: expected Malformed, got {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn other_services_and_subsets_are_ignored_and_missing_subsets_count_as_zero() {
        let prometheus = fake_prometheus().await;
        let mut foreign = series("a", "v3", 99, 99).samples();
        foreign.extend(
            series("a", "canary", 99, 99)
                .samples()
                .into_iter()
                .map(|mut s| {
                    s["metric"]["fledge_service"] = json!("other");
                    s
                }),
        );
        let mut samples = foreign.clone();
        samples.extend(series("a", "stable", 10, 0).samples());
        reply_ok(&prometheus, TRAFFIC_QUERY, vector(samples));
        let mut source = source(&prometheus, &[]);
        assert_eq!(source.observe().await, Err(ObservationError::Baseline));
        let mut samples = foreign;
        samples.extend(series("a", "stable", 12, 0).samples());
        reply_ok(&prometheus, TRAFFIC_QUERY, vector(samples));
        let observation = source.observe().await.unwrap();
        assert_eq!(requests(&observation.stable), (2, 0));
        assert_eq!(observation.canary, SubsetTraffic::default());
    }

    #[test]
    fn for_canary_renders_the_custom_templates() {
        let yaml = r#"
apiVersion: fledge.dev/v1alpha1
kind: Canary
metadata: {name: web, namespace: shop}
spec:
  service: web
  stable: {subset: v1}
  canary: {subset: v2}
  metricsSource:
    prometheus: {address: "http://127.0.0.1:9090/", timeout: 2s}
  router:
    envoyRds:
      path: /tmp/rds/routes.json
      routeConfiguration: r
      virtualHost: v
      route: primary
      stableCluster: s
      canaryCluster: c
      adminUrl: http://127.0.0.1:9901
  analysis:
    interval: 15s
    steps: [{setWeight: 50}]
    metrics:
      - {name: request-success-rate, thresholdRange: {min: 99}}
      - name: error-ratio
        thresholdRange: {max: 0.01}
        query: sum(rate(errors{ns="{{ namespace }}",app="{{ service }}",v="{{ canary }}"}[{{ interval }}]))
"#;
        let canary: Canary = serde_yaml::from_str(yaml).unwrap();
        let prometheus = canary.spec.metrics_source.prometheus.clone().unwrap();
        let source = PrometheusSource::for_canary(&canary, &prometheus).unwrap();
        assert_eq!(
            source.custom_queries(),
            &[CustomQuery {
                metric: "error-ratio".to_string(),
                promql: r#"sum(rate(errors{ns="shop",app="web",v="v2"}[15s]))"#.to_string(),
            }]
        );
        assert!(
            source
                .traffic_query()
                .ends_with(r#"fledge_service="web",fledge_subset=~"v1|v2"}"#),
            "{}",
            source.traffic_query()
        );
        assert_eq!(
            source.query_url.as_str(),
            "http://127.0.0.1:9090/api/v1/query"
        );
    }

    #[test]
    fn construction_errors_and_address_prefixes() {
        let build = |address: &str, selector: SubsetSelector| {
            PrometheusSource::new(address, selector, Vec::new(), Duration::from_secs(1))
        };
        for bad in ["not a url", "ftp://prom:9090", "http://prom:9090/?x=1"] {
            assert!(
                matches!(
                    build(bad, selector()),
                    Err(PrometheusSourceError::InvalidAddress { .. })
                ),
                "{bad}"
            );
        }
        let mut same = selector();
        same.canary_subset = same.stable_subset.clone();
        assert!(matches!(
            build("http://prom:9090", same),
            Err(PrometheusSourceError::SameSubsets(_))
        ));
        let with_prefix = build("http://thanos:9090/prometheus/", selector()).unwrap();
        assert_eq!(
            with_prefix.query_url.as_str(),
            "http://thanos:9090/prometheus/api/v1/query"
        );
    }

    #[test]
    fn prometheus_floats_parse() {
        assert!(parse_prometheus_float("NaN").unwrap().is_nan());
        assert_eq!(parse_prometheus_float("+Inf"), Ok(f64::INFINITY));
        assert_eq!(parse_prometheus_float("-Inf"), Ok(f64::NEG_INFINITY));
        assert_eq!(parse_prometheus_float("1e+06"), Ok(1_000_000.0));
        assert_eq!(parse_prometheus_float("0.25"), Ok(0.25));
        assert!(parse_prometheus_float("x").is_err());
    }
}
