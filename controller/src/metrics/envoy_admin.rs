//! [`EnvoyAdminSource`]: per-subset traffic scraped from the `/stats/prometheus` endpoint of one
//! or more Envoy admin APIs (e.g. the replicas of one gateway).
//!
//! Each scrape gives *cumulative* counters per Envoy. The source keeps the last reading of each
//! endpoint and reports, per call, the sum over endpoints of `current.delta_since(previous)`,
//! so one Envoy restarting (its counters reset) never yields a negative or inflated interval.
//!
//! What a scrape is read for is a [`StatsReader`]: by default [`FilterMetrics`], the Fledge
//! filter's `fledge_*` series of one service; `metricsSource.envoyClusterStats` uses Envoy's own
//! per-cluster statistics instead (`super::envoy_cluster_stats`). Everything else here — the
//! endpoints, restarts, all-or-nothing commits, the guard gauge — is the same for both.
//!
//! Scrapes are shared ([`super::shared`]): a gateway's page holds every service's series, so it
//! is fetched and indexed ([`PageIndex`]) once per tick for every canary behind that gateway;
//! each canary then picks its own series out of the index. Only the fetch is shared: previous
//! readings, deltas and commits stay per canary.
//!
//! Readings are committed all-or-nothing: if any endpoint fails, the call errors and *every*
//! endpoint keeps its previous reading. A partial view must not produce a verdict, and the next
//! full scrape then yields, for every endpoint, the traffic since the same earlier instant — so
//! the stable/canary comparison still covers one common window and nothing is lost or counted
//! twice.

use super::promtext::{self, SampleRef};
use super::shared::{within, SharedReads};
use super::traffic_parts::TrafficParts;
use super::{describe_request_error, MergedSubset, MetricsSource, SubsetSelector};
use async_trait::async_trait;
use fledge_core::contract::{
    ResponseClass, GUARD_TRIPPED, REQUESTS_TOTAL, REQUEST_DURATION_MS, TAG_CLASS, TAG_SERVICE,
    TAG_SUBSET,
};
use fledge_core::observe::{Observation, ObservationError, SubsetTraffic};
use futures::FutureExt;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// The `filter` query parameter sent to `/stats/prometheus`. Envoy matches this regex against
/// the full stat name *before* tag extraction (verified with Envoy 1.40: `^cluster\.app_stable\.`
/// matches `envoy_cluster_upstream_rq_total{envoy_cluster_name="app_stable"}`, the tag-extracted
/// `^cluster\.upstream_rq_total` matches nothing). The filter's full names look like
/// `fledge_service=.=app;.;...;fledge_requests_total`, so the pattern is left unanchored.
/// `server.uptime` lets us see restarts that counters alone would hide. Samples are filtered
/// again here, so an Envoy that ignored the parameter would still be read correctly. It names
/// no service: one scrape serves every canary behind the gateway.
const STATS_FILTER: &str = r"fledge_request|^server\.uptime$";

/// Envoy's uptime gauge in seconds, as `/stats/prometheus` names it.
pub(super) const UPTIME_GAUGE: &str = "envoy_server_uptime";

/// What one scrape of an Envoy's `/stats/prometheus` is read for.
pub trait StatsReader: std::fmt::Debug + Send + Sync {
    /// The `filter` regex sent with the scrape. Envoy matches it against full stat names
    /// before tag extraction (see [`STATS_FILTER`]); it should keep `^server\.uptime$`. Readers
    /// of one kind send the same filter, so their canaries share the scrape.
    fn stats_filter(&self) -> String;
    /// A new index of every group of series this kind of reader tells apart in a page (the
    /// filter's service/subset pairs, Envoy's clusters), summed. Built once per scrape for
    /// every canary, fed sample by sample as the page arrives and is parsed (a page is
    /// megabytes: neither it nor its samples are ever held whole).
    fn indexer(&self) -> Box<dyn SampleIndexer>;
    /// This canary's cumulative traffic in an indexed page.
    fn read(&self, page: &PageIndex) -> Result<EndpointReading, String>;
}

/// Indexes one page, one sample at a time, for a [`StatsReader`].
pub trait SampleIndexer: Send {
    fn add(&mut self, sample: &SampleRef<'_>);
    fn finish(self: Box<Self>) -> PageIndex;
}

/// A whole `page` indexed by `reader` (what a scrape does chunk by chunk).
#[cfg(test)]
pub(super) fn index_page(
    reader: &dyn StatsReader,
    page: &str,
) -> Result<PageIndex, promtext::ParseError> {
    let mut indexer = reader.indexer();
    promtext::parse_each(page, |sample| indexer.add(sample))?;
    Ok(indexer.finish())
}

/// One scrape, indexed: each group's cumulative traffic (or why it cannot be read).
#[derive(Debug, Default)]
pub struct PageIndex {
    pub uptime_seconds: Option<f64>,
    /// Samples that look like ours but whose labels were not extracted (see `warn_untagged`).
    pub untagged_series: usize,
    groups: HashMap<String, Result<SubsetTraffic, String>>,
}

impl PageIndex {
    /// A group's traffic; a group without series has seen no request yet and counts as zero.
    pub fn traffic(&self, group: &str) -> Result<SubsetTraffic, String> {
        match self.groups.get(group) {
            Some(traffic) => traffic.clone(),
            None => Ok(SubsetTraffic::default()),
        }
    }

    /// How many groups the page holds.
    pub fn len(&self) -> usize {
        self.groups.len()
    }

    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }
}

/// Builds a [`PageIndex`]: one accumulator per group; a group's first problem sticks to it
/// (other groups, i.e. other canaries, are not affected).
#[derive(Default)]
pub(super) struct PageIndexer {
    pub(super) uptime_seconds: Option<f64>,
    pub(super) untagged_series: usize,
    /// group → its series so far
    groups: HashMap<String, Result<SubsetAccumulator, String>>,
}

/// How a sample adds to a subset's series.
pub(super) type AddSample = fn(&mut SubsetAccumulator, &SampleRef<'_>) -> Result<(), String>;

/// The three series of one histogram family (`_bucket`, `_sum`, `_count`), named once per page.
pub(super) struct HistogramNames {
    bucket: String,
    sum: String,
    count: String,
}

impl HistogramNames {
    pub(super) fn of(family: &str) -> Self {
        HistogramNames {
            bucket: format!("{family}_bucket"),
            sum: format!("{family}_sum"),
            count: format!("{family}_count"),
        }
    }

    /// How a sample named `name` adds to a subset's series, if it is one of the three.
    pub(super) fn adder(&self, name: &str) -> Option<AddSample> {
        if name == self.bucket {
            Some(SubsetAccumulator::add_bucket)
        } else if name == self.sum {
            Some(SubsetAccumulator::add_sum)
        } else if name == self.count {
            Some(SubsetAccumulator::add_count)
        } else {
            None
        }
    }
}

impl PageIndexer {
    /// Note Envoy's uptime if `sample` is its gauge; true when it was.
    pub(super) fn take_uptime(&mut self, sample: &SampleRef<'_>) -> bool {
        if sample.name != UPTIME_GAUGE {
            return false;
        }
        self.uptime_seconds = Some(sample.value).filter(|v| v.is_finite());
        true
    }

    /// Add a sample to `group` with `add` (the group's name is copied only the first time).
    pub(super) fn add(
        &mut self,
        group: &str,
        add: impl FnOnce(&mut SubsetAccumulator) -> Result<(), String>,
    ) {
        if !self.groups.contains_key(group) {
            self.groups
                .insert(group.to_string(), Ok(SubsetAccumulator::default()));
        }
        let Some(accumulator) = self.groups.get_mut(group) else {
            return;
        };
        if let Ok(series) = accumulator {
            if let Err(problem) = add(series) {
                *accumulator = Err(problem);
            }
        }
    }

    /// The index. Buckets caught mid-flush are clipped ([`SubsetAccumulator::finish`]).
    pub(super) fn finish(self) -> PageIndex {
        PageIndex {
            uptime_seconds: self.uptime_seconds,
            untagged_series: self.untagged_series,
            groups: self
                .groups
                .into_iter()
                .map(|(group, series)| (group, series.map(SubsetAccumulator::finish)))
                .collect(),
        }
    }
}

/// The Fledge filter's metrics of one service: `fledge_requests_total` by subset and class,
/// `fledge_request_duration_ms` by subset.
#[derive(Debug, Clone)]
pub struct FilterMetrics {
    pub selector: SubsetSelector,
}

/// The index group of a service's subset.
fn filter_group(service: &str, subset: &str) -> String {
    let mut group = String::new();
    write_filter_group(&mut group, service, subset);
    group
}

/// [`filter_group`] into a reused buffer.
fn write_filter_group(group: &mut String, service: &str, subset: &str) {
    group.clear();
    group.push_str(service);
    group.push('\u{1f}');
    group.push_str(subset);
}

impl StatsReader for FilterMetrics {
    fn stats_filter(&self) -> String {
        STATS_FILTER.to_string()
    }

    fn indexer(&self) -> Box<dyn SampleIndexer> {
        Box::new(FilterPageIndexer::default())
    }

    fn read(&self, page: &PageIndex) -> Result<EndpointReading, String> {
        let selector = &self.selector;
        Ok(EndpointReading {
            stable: page.traffic(&filter_group(&selector.service, &selector.stable_subset))?,
            canary: page.traffic(&filter_group(&selector.service, &selector.canary_subset))?,
            uptime_seconds: page.uptime_seconds,
            untagged_series: page.untagged_series,
        })
    }
}

/// Why an [`EnvoyAdminSource`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum EnvoyAdminSourceError {
    #[error("no Envoy admin URL given; at least one is needed")]
    NoEndpoints,
    #[error("invalid Envoy admin URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("stable and canary subsets are both {0:?}; they must differ")]
    SameSubsets(String),
}

/// Reads one canary's traffic from one or more Envoy admin APIs.
#[derive(Debug)]
pub struct EnvoyAdminSource {
    selector: SubsetSelector,
    reader: Arc<dyn StatsReader>,
    endpoints: Vec<Endpoint>,
    reads: SharedReads,
    request_timeout: Duration,
}

#[derive(Debug)]
struct Endpoint {
    /// As configured, for messages.
    base_url: String,
    stats_url: reqwest::Url,
    /// `/stats/prometheus` filtered to the guard's gauge only.
    guard_url: reqwest::Url,
    /// Last reading that was part of a fully successful scrape, and which shared read it was.
    previous: Option<(u64, EndpointReading)>,
}

/// One Envoy's cumulative counters for the selected canary.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EndpointReading {
    pub stable: SubsetTraffic,
    pub canary: SubsetTraffic,
    pub uptime_seconds: Option<f64>,
    /// Samples that look like ours but whose labels were not extracted (see `warn_untagged`).
    pub untagged_series: usize,
}

impl EnvoyAdminSource {
    /// A source reading every URL in `admin_urls` (Envoy admin base URLs such as
    /// `http://127.0.0.1:9901`) for the canary described by `selector`. Each request is bounded
    /// by `request_timeout`. It reads on its own; [`EnvoyAdminSource::sharing`] makes it share.
    pub fn new(
        admin_urls: Vec<String>,
        selector: SubsetSelector,
        request_timeout: Duration,
    ) -> Result<Self, EnvoyAdminSourceError> {
        let reader = Arc::new(FilterMetrics {
            selector: selector.clone(),
        });
        Self::with_reader(admin_urls, selector, reader, request_timeout)
    }

    /// [`EnvoyAdminSource::new`] reading each scrape with `reader`.
    pub fn with_reader(
        admin_urls: Vec<String>,
        selector: SubsetSelector,
        reader: Arc<dyn StatsReader>,
        request_timeout: Duration,
    ) -> Result<Self, EnvoyAdminSourceError> {
        if admin_urls.is_empty() {
            return Err(EnvoyAdminSourceError::NoEndpoints);
        }
        if selector.stable_subset == selector.canary_subset {
            return Err(EnvoyAdminSourceError::SameSubsets(selector.stable_subset));
        }
        let endpoints = admin_urls
            .into_iter()
            .map(|base_url| {
                let stats_url = stats_url(&base_url, &reader.stats_filter())?;
                let mut guard_url = stats_url.clone();
                guard_url
                    .query_pairs_mut()
                    .clear()
                    .append_pair("filter", GUARD_TRIPPED);
                Ok(Endpoint {
                    base_url,
                    stats_url,
                    guard_url,
                    previous: None,
                })
            })
            .collect::<Result<Vec<_>, EnvoyAdminSourceError>>()?;
        let reads = SharedReads::unshared();
        Ok(EnvoyAdminSource {
            selector,
            reader,
            endpoints,
            reads,
            request_timeout,
        })
    }

    /// Share scrapes through `reads` with every other canary reading the same endpoints.
    pub fn sharing(mut self, reads: SharedReads) -> Self {
        self.reads = reads;
        self
    }

    /// Scrape every endpoint concurrently (or join a scrape of this tick another canary
    /// started); results in endpoint order, with the shared read each came from.
    async fn scrape_all(&self) -> Vec<Result<(u64, EndpointReading), ObservationError>> {
        let reads = self.endpoints.iter().map(|endpoint| async move {
            let seen = endpoint.previous.as_ref().map(|(seq, _)| *seq);
            let key = format!(
                "{}#{}",
                endpoint.stats_url,
                std::any::type_name_of_val(&*self.reader)
            );
            let (seq, read) =
                self.reads
                    .hub
                    .stats_pages
                    .read(&key, self.reads.max_age, seen, || {
                        let client = self.reads.hub.http.clone();
                        let url = endpoint.stats_url.clone();
                        let base_url = endpoint.base_url.clone();
                        let reader = self.reader.clone();
                        let timeout = self.request_timeout;
                        async move { scrape(&client, url, &base_url, reader, timeout).await }
                            .boxed()
                    });
            let page = within(read, self.request_timeout).await.ok_or_else(|| {
                ObservationError::Unreachable(format!(
                    "{}: timed out after {:?}",
                    endpoint.base_url, self.request_timeout
                ))
            })?;
            let page = page.as_ref().as_ref().map_err(Clone::clone)?;
            self.reader
                .read(page)
                .map(|reading| (seq, reading))
                .map_err(|problem| {
                    ObservationError::Malformed(format!("{}: {problem}", endpoint.base_url))
                })
        });
        futures::future::join_all(reads).await
    }
}

#[async_trait]
impl MetricsSource for EnvoyAdminSource {
    /// The newest trip any endpoint reports. A trip seen on one gateway counts even when
    /// another cannot be read; with no trip, the first read error is returned.
    async fn guard_tripped_at(
        &mut self,
    ) -> Result<Option<chrono::DateTime<chrono::Utc>>, ObservationError> {
        let mut newest: Option<u64> = None;
        let mut first_error = None;
        for endpoint in &self.endpoints {
            let (_, read) = self.reads.hub.guard_pages.read(
                endpoint.guard_url.as_str(),
                self.reads.guard_max_age,
                None,
                || {
                    let client = self.reads.hub.http.clone();
                    let url = endpoint.guard_url.clone();
                    let base_url = endpoint.base_url.clone();
                    let timeout = self.request_timeout;
                    async move { read_guards(&client, url, &base_url, timeout).await }.boxed()
                },
            );
            let guards = within(read, self.request_timeout).await;
            let value = match guards.as_deref() {
                Some(Ok(guards)) => Ok(guards.get(&self.selector.service).copied()),
                Some(Err(error)) => Err(error.clone()),
                None => Err(ObservationError::Unreachable(format!(
                    "{}: timed out after {:?}",
                    endpoint.base_url, self.request_timeout
                ))),
            };
            match value {
                Ok(value) => newest = newest.max(value),
                Err(error) => {
                    first_error.get_or_insert(error);
                }
            }
        }
        match (newest.filter(|seconds| *seconds > 0), first_error) {
            (Some(seconds), _) => Ok(i64::try_from(seconds)
                .ok()
                .and_then(|s| chrono::DateTime::from_timestamp(s, 0))),
            (None, Some(error)) => Err(error),
            (None, None) => Ok(None),
        }
    }

    async fn observe(&mut self) -> Result<Observation, ObservationError> {
        let results = self.scrape_all().await;

        let mut readings = Vec::with_capacity(results.len());
        let mut unreachable = Vec::new();
        let mut malformed = Vec::new();
        for result in results {
            match result {
                Ok(reading) => readings.push(reading),
                Err(ObservationError::Unreachable(message)) => unreachable.push(message),
                Err(ObservationError::Malformed(message)) => malformed.push(message),
                // A scrape never returns this; if it did, the readings must not go out of step.
                Err(other @ ObservationError::Baseline) => malformed.push(other.to_string()),
            }
        }
        if !unreachable.is_empty() || !malformed.is_empty() {
            // Previous readings stay as they are: see the module docs.
            let all: Vec<String> = unreachable.iter().chain(&malformed).cloned().collect();
            tracing::warn!(
                service = %self.selector.service,
                failed = all.len(),
                endpoints = self.endpoints.len(),
                problems = %all.join("; "),
                "metrics scrape incomplete; no observation this interval"
            );
            return Err(if unreachable.is_empty() {
                ObservationError::Malformed(malformed.join("; "))
            } else {
                ObservationError::Unreachable(all.join("; "))
            });
        }

        for (endpoint, (_, reading)) in self.endpoints.iter().zip(&readings) {
            if reading.untagged_series > 0 {
                warn_untagged(&endpoint.base_url, reading.untagged_series);
            }
        }

        if self.endpoints.iter().any(|e| e.previous.is_none()) {
            for (endpoint, reading) in self.endpoints.iter_mut().zip(readings) {
                endpoint.previous = Some(reading);
            }
            tracing::debug!(service = %self.selector.service, "metrics baseline taken");
            return Err(ObservationError::Baseline);
        }

        let mut stable = MergedSubset::new(&self.selector.stable_subset);
        let mut canary = MergedSubset::new(&self.selector.canary_subset);
        let mut reset = Vec::new();
        for (endpoint, (_, reading)) in self.endpoints.iter().zip(&readings) {
            let Some((_, previous)) = endpoint.previous.as_ref() else {
                continue;
            };
            let (stable_delta, canary_delta) = interval_since(previous, reading);
            if counters_reset(previous, reading) {
                tracing::info!(
                    endpoint = %endpoint.base_url,
                    "Envoy restarted since the previous scrape; counting from its restart"
                );
                reset.push(endpoint.base_url.clone());
            }
            stable
                .add(&endpoint.base_url, &stable_delta)
                .map_err(ObservationError::Malformed)?;
            canary
                .add(&endpoint.base_url, &canary_delta)
                .map_err(ObservationError::Malformed)?;
        }
        for (endpoint, reading) in self.endpoints.iter_mut().zip(readings) {
            endpoint.previous = Some(reading);
        }
        Ok(Observation {
            stable: stable.traffic,
            canary: canary.traffic,
            counter_reset: (!reset.is_empty()).then(|| {
                format!(
                    "Envoy {} restarted (its counters went back to zero)",
                    reset.join(", ")
                )
            }),
            ..Default::default()
        })
    }
}

/// The endpoint restarted (its uptime went down) or one of the canary's counters did.
fn counters_reset(previous: &EndpointReading, current: &EndpointReading) -> bool {
    restarted(previous, current)
        || current.stable.is_reset_since(&previous.stable)
        || current.canary.is_reset_since(&previous.canary)
}

fn restarted(previous: &EndpointReading, current: &EndpointReading) -> bool {
    matches!(
        (previous.uptime_seconds, current.uptime_seconds),
        (Some(before), Some(now)) if now < before
    )
}

/// One endpoint's (stable, canary) traffic between two cumulative readings.
fn interval_since(
    previous: &EndpointReading,
    current: &EndpointReading,
) -> (SubsetTraffic, SubsetTraffic) {
    if restarted(previous, current) {
        // Everything counted now happened since the restart, even if some counters already
        // grew past their old values (which `delta_since` could not tell from growth).
        return (current.stable.clone(), current.canary.clone());
    }
    (
        current.stable.delta_since(&previous.stable),
        current.canary.delta_since(&previous.canary),
    )
}

fn warn_untagged(endpoint: &str, count: usize) {
    tracing::warn!(
        endpoint,
        series = count,
        "found fledge series without fledge_service/fledge_subset labels; Envoy needs a \
         stats_config.stats_tags entry per fledge tag (see fledge_core::contract::stats_tag_regex)"
    );
}

fn stats_url(base_url: &str, filter: &str) -> Result<reqwest::Url, EnvoyAdminSourceError> {
    let invalid = |reason: String| EnvoyAdminSourceError::InvalidUrl {
        url: base_url.to_string(),
        reason,
    };
    let base = reqwest::Url::parse(base_url.trim_end_matches('/'))
        .map_err(|error| invalid(error.to_string()))?;
    if base.scheme() != "http" && base.scheme() != "https" {
        return Err(invalid(
            "only http:// and https:// are supported".to_string(),
        ));
    }
    let mut url = base.clone();
    url.set_path(&format!(
        "{}/stats/prometheus",
        base.path().trim_end_matches('/')
    ));
    url.set_query(None);
    url.query_pairs_mut().append_pair("filter", filter);
    Ok(url)
}

/// Fetch `url` and index the page with `reader` (shared by every canary reading it).
async fn scrape(
    client: &reqwest::Client,
    url: reqwest::Url,
    base_url: &str,
    reader: Arc<dyn StatsReader>,
    timeout: Duration,
) -> Result<PageIndex, ObservationError> {
    let mut indexer = reader.indexer();
    read_samples(client, url, base_url, timeout, |sample| indexer.add(sample)).await?;
    Ok(indexer.finish())
}

/// `GET url` (2xx), its body parsed chunk by chunk as it arrives: every sample goes to `each`.
/// Only a chunk and the unfinished line before it are held, never the page; each chunk's parse
/// is short (at most hyper's read buffer, a few hundred KB), so it runs on the reading task.
async fn read_samples(
    client: &reqwest::Client,
    url: reqwest::Url,
    base_url: &str,
    timeout: Duration,
    mut each: impl FnMut(&SampleRef<'_>) + Send,
) -> Result<(), ObservationError> {
    let unreachable = |what: String| ObservationError::Unreachable(format!("{base_url}: {what}"));
    let mut response = client
        .get(url)
        .timeout(timeout)
        .send()
        .await
        .map_err(|error| unreachable(describe_request_error(&error)))?;
    let status = response.status();
    if !status.is_success() {
        let excerpt = body_excerpt(&mut response).await;
        return Err(unreachable(format!(
            "HTTP {status} from /stats/prometheus: {excerpt}"
        )));
    }
    let malformed = |error: promtext::ParseError| {
        ObservationError::Malformed(format!("{base_url}/stats/prometheus: {error}"))
    };
    let mut parser = promtext::LineParser::new();
    let mut chunks = super::ChunkStats::default();
    while let Some(chunk) = response.chunk().await.map_err(|error| {
        unreachable(format!(
            "reading the response: {}",
            describe_request_error(&error)
        ))
    })? {
        let started = std::time::Instant::now();
        parser.feed(&chunk, &mut each).map_err(malformed)?;
        chunks.add(chunk.len(), started.elapsed());
    }
    parser.finish(&mut each).map_err(malformed)?;
    tracing::debug!(
        target: "fledge::reads",
        endpoint = base_url,
        bytes = chunks.bytes,
        chunks = chunks.count,
        largest_chunk = chunks.largest,
        slowest_parse_us = chunks.slowest.as_micros() as u64,
        "page parsed"
    );
    Ok(())
}

/// The start of an error answer's body, for its message (the rest is not read).
async fn body_excerpt(response: &mut reqwest::Response) -> String {
    const EXCERPT_CHARS: usize = 200;
    let mut start = Vec::new();
    while start.len() < EXCERPT_CHARS * 4 {
        match response.chunk().await {
            Ok(Some(chunk)) => start.extend_from_slice(&chunk),
            Ok(None) | Err(_) => break,
        }
    }
    let text = String::from_utf8_lossy(&start);
    text.chars()
        .take(EXCERPT_CHARS)
        .collect::<String>()
        .trim()
        .to_string()
}

/// Every service's guard gauge at one endpoint (Unix seconds of the trip, 0 while armed); a
/// service whose filter defines no guard is absent.
async fn read_guards(
    client: &reqwest::Client,
    url: reqwest::Url,
    base_url: &str,
    timeout: Duration,
) -> Result<HashMap<String, u64>, ObservationError> {
    let mut guards: HashMap<String, u64> = HashMap::new();
    read_samples(client, url, base_url, timeout, |sample| {
        if sample.name != GUARD_TRIPPED || !(sample.value.is_finite() && sample.value >= 0.0) {
            return;
        }
        if let Some(service) = sample.label(TAG_SERVICE) {
            let value = guards.entry(service.to_string()).or_default();
            *value = (*value).max(sample.value as u64);
        }
    })
    .await?;
    Ok(guards)
}

/// Accumulates one subset's series. Series that differ in labels other than ours (e.g. extra
/// tags) are summed.
#[derive(Default)]
pub(super) struct SubsetAccumulator(TrafficParts);

impl SubsetAccumulator {
    /// Count `sample` (a whole number) as requests of `class`.
    pub(super) fn add_class(
        &mut self,
        class: ResponseClass,
        sample: &SampleRef<'_>,
    ) -> Result<(), String> {
        self.0.add_class(class, whole_count(sample)?);
        Ok(())
    }

    fn add_requests(&mut self, sample: &SampleRef<'_>) -> Result<(), String> {
        let class_label = sample
            .label(TAG_CLASS)
            .ok_or_else(|| format!("{} sample without a {TAG_CLASS} label", sample.name))?;
        let class = ResponseClass::from_label(class_label).ok_or_else(|| {
            format!(
                "{} has unknown {TAG_CLASS} {class_label:?}; this controller knows {}",
                sample.name,
                ResponseClass::ALL.map(ResponseClass::label).join(", ")
            )
        })?;
        self.add_class(class, sample)
    }

    pub(super) fn add_bucket(&mut self, sample: &SampleRef<'_>) -> Result<(), String> {
        let le_text = sample
            .label("le")
            .ok_or_else(|| format!("{} sample without an le label", sample.name))?;
        let le = le_text
            .parse::<f64>()
            .ok()
            .filter(|le| !le.is_nan())
            .ok_or_else(|| format!("{} has an invalid le {le_text:?}", sample.name))?;
        self.0.add_bucket(le, whole_count(sample)?);
        Ok(())
    }

    pub(super) fn add_sum(&mut self, sample: &SampleRef<'_>) -> Result<(), String> {
        if !sample.value.is_finite() || sample.value < 0.0 {
            return Err(format!(
                "{} is {}, expected a non-negative number",
                sample.name, sample.value
            ));
        }
        self.0.sum_ms = Some(self.0.sum_ms.unwrap_or(0.0) + sample.value);
        Ok(())
    }

    pub(super) fn add_count(&mut self, sample: &SampleRef<'_>) -> Result<(), String> {
        let n = whole_count(sample)?;
        self.0.count = Some(self.0.count.unwrap_or(0).saturating_add(n));
        Ok(())
    }

    /// The subset's traffic ([`TrafficParts::finish`]).
    pub(super) fn finish(self) -> SubsetTraffic {
        self.0.finish()
    }
}

/// A counter value as an integer; Envoy prints counters as whole numbers.
fn whole_count(sample: &SampleRef<'_>) -> Result<u64, String> {
    let value = sample.value;
    // 2^64: the first value that does not fit.
    if value.is_finite()
        && value >= 0.0
        && value.fract() == 0.0
        && value < 18_446_744_073_709_551_616.0
    {
        Ok(value as u64)
    } else {
        Err(format!(
            "{} is {value}, expected a whole non-negative count",
            sample.name
        ))
    }
}

/// Every service's subsets in one scrape of the filter's metrics, by [`filter_group`]. A subset
/// without series has seen no request yet (the filter creates a series on the first request)
/// and counts as zero.
struct FilterPageIndexer {
    histogram: HistogramNames,
    index: PageIndexer,
    /// The current sample's group, in a reused buffer.
    group: String,
}

impl Default for FilterPageIndexer {
    fn default() -> Self {
        FilterPageIndexer {
            histogram: HistogramNames::of(REQUEST_DURATION_MS),
            index: PageIndexer::default(),
            group: String::new(),
        }
    }
}

impl SampleIndexer for FilterPageIndexer {
    fn add(&mut self, sample: &SampleRef<'_>) {
        if self.index.take_uptime(sample) {
            return;
        }
        let name = sample.name;
        let add: AddSample = if name == REQUESTS_TOTAL {
            SubsetAccumulator::add_requests
        } else if let Some(add) = self.histogram.adder(name) {
            add
        } else {
            // Without stats_tags Envoy folds the tags into the name instead.
            if name.contains(REQUESTS_TOTAL) && name.contains(TAG_SUBSET) {
                self.index.untagged_series += 1;
            }
            return;
        };
        let (Some(service), Some(subset)) = (sample.label(TAG_SERVICE), sample.label(TAG_SUBSET))
        else {
            return;
        };
        write_filter_group(&mut self.group, service, subset);
        self.index.add(&self.group, |series| add(series, sample));
    }

    fn finish(self: Box<Self>) -> PageIndex {
        self.index.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fledge_testkit::http::{closed_port_url, FakeEndpoint, Reply};

    const STATS: &str = "/stats/prometheus";

    /// A fake Envoy admin answering `text` on `/stats/prometheus`; stopped when dropped.
    async fn fake_admin(text: &str) -> FakeEndpoint {
        let admin = FakeEndpoint::start().await.unwrap();
        admin.reply(STATS, Reply::text(text));
        admin
    }

    /// The query string of the last request the fake admin received.
    fn last_query(admin: &FakeEndpoint) -> Option<String> {
        admin.requests().last().and_then(|r| r.query.clone())
    }

    fn selector() -> SubsetSelector {
        SubsetSelector {
            service: "app".to_string(),
            stable_subset: "stable".to_string(),
            canary_subset: "canary".to_string(),
        }
    }

    fn source(urls: &[&str]) -> EnvoyAdminSource {
        EnvoyAdminSource::new(
            urls.iter().map(|u| u.to_string()).collect(),
            selector(),
            Duration::from_millis(500),
        )
        .unwrap()
    }

    /// Envoy-shaped text for service `app`: per subset (name, 2xx, 5xx, bucket counts for
    /// le=10,100 and the total), with an optional uptime.
    fn envoy_text(subsets: &[(&str, u64, u64, [u64; 2], u64)], uptime: Option<u64>) -> String {
        let mut text = String::new();
        if let Some(uptime) = uptime {
            text.push_str(&format!(
                "# TYPE envoy_server_uptime gauge\nenvoy_server_uptime{{}} {uptime}\n"
            ));
        }
        text.push_str("# TYPE fledge_requests_total counter\n");
        for (subset, ok, failed, _, _) in subsets {
            text.push_str(&format!(
                "fledge_requests_total{{fledge_service=\"app\",fledge_subset=\"{subset}\",fledge_class=\"2xx\"}} {ok}\n\
                 fledge_requests_total{{fledge_service=\"app\",fledge_subset=\"{subset}\",fledge_class=\"5xx\"}} {failed}\n"
            ));
        }
        text.push_str("# TYPE fledge_request_duration_ms histogram\n");
        for (subset, _, _, [le10, le100], total) in subsets {
            let series = format!("fledge_service=\"app\",fledge_subset=\"{subset}\"");
            text.push_str(&format!(
                "fledge_request_duration_ms_bucket{{{series},le=\"10\"}} {le10}\n\
                 fledge_request_duration_ms_bucket{{{series},le=\"100\"}} {le100}\n\
                 fledge_request_duration_ms_bucket{{{series},le=\"+Inf\"}} {total}\n\
                 fledge_request_duration_ms_sum{{{series}}} {}.5\n\
                 fledge_request_duration_ms_count{{{series}}} {total}\n",
                total * 10
            ));
        }
        text
    }

    fn requests(traffic: &SubsetTraffic) -> (u64, u64) {
        (
            traffic.count(ResponseClass::Success),
            traffic.count(ResponseClass::ServerError),
        )
    }

    #[tokio::test]
    async fn first_call_is_baseline_then_deltas() {
        let admin = fake_admin(&envoy_text(
            &[
                ("stable", 100, 1, [90, 100], 101),
                ("canary", 10, 0, [9, 10], 10),
            ],
            Some(50),
        ))
        .await;
        let mut source = source(&[admin.url()]);
        assert_eq!(source.observe().await, Err(ObservationError::Baseline));
        assert_eq!(
            last_query(&admin).as_deref(),
            Some("filter=fledge_request%7C%5Eserver%5C.uptime%24")
        );

        admin.reply(
            STATS,
            Reply::text(envoy_text(
                &[
                    ("stable", 150, 2, [135, 150], 152),
                    ("canary", 20, 3, [15, 22], 23),
                ],
                Some(60),
            )),
        );
        let observation = source.observe().await.unwrap();
        assert_eq!(requests(&observation.stable), (50, 1));
        assert_eq!(requests(&observation.canary), (10, 3));
        assert_eq!(observation.stable.latency.bounds_ms, vec![10.0, 100.0]);
        assert_eq!(observation.stable.latency.cumulative, vec![45, 50]);
        assert_eq!(observation.stable.latency.count, 51);
        assert_eq!(observation.canary.latency.cumulative, vec![6, 12]);
        assert_eq!(observation.canary.latency.count, 13);
        assert!((observation.canary.latency.sum_ms - 130.0).abs() < 1e-9);

        // Nothing new: an empty interval, not an error.
        let observation = source.observe().await.unwrap();
        assert_eq!(observation.stable.requests(), 0);
        assert_eq!(observation.canary.requests(), 0);
    }

    #[tokio::test]
    async fn two_endpoints_are_summed_and_a_restart_of_one_counts_from_its_restart() {
        let a = fake_admin(&envoy_text(
            &[("stable", 100, 0, [100, 100], 100)],
            Some(500),
        ))
        .await;
        let b = fake_admin(&envoy_text(
            &[("stable", 200, 0, [200, 200], 200)],
            Some(500),
        ))
        .await;
        let mut source = source(&[a.url(), b.url()]);
        assert_eq!(source.observe().await, Err(ObservationError::Baseline));

        a.reply(
            STATS,
            Reply::text(envoy_text(
                &[("stable", 110, 0, [110, 110], 110)],
                Some(510),
            )),
        );
        b.reply(
            STATS,
            Reply::text(envoy_text(
                &[("stable", 205, 0, [205, 205], 205)],
                Some(510),
            )),
        );
        let observation = source.observe().await.unwrap();
        assert_eq!(requests(&observation.stable), (15, 0));
        assert_eq!(observation.stable.latency.count, 15);

        // b restarted: its counters went down to 7.
        a.reply(
            STATS,
            Reply::text(envoy_text(
                &[("stable", 120, 0, [120, 120], 120)],
                Some(520),
            )),
        );
        b.reply(
            STATS,
            Reply::text(envoy_text(&[("stable", 7, 1, [8, 8], 8)], Some(3))),
        );
        let observation = source.observe().await.unwrap();
        assert_eq!(requests(&observation.stable), (10 + 7, 1));
        assert_eq!(observation.stable.latency.cumulative, vec![18, 18]);

        // b restarted again and already counted more than before; only uptime reveals it.
        a.reply(
            STATS,
            Reply::text(envoy_text(
                &[("stable", 120, 0, [120, 120], 120)],
                Some(530),
            )),
        );
        b.reply(
            STATS,
            Reply::text(envoy_text(&[("stable", 30, 1, [31, 31], 31)], Some(2))),
        );
        let observation = source.observe().await.unwrap();
        assert_eq!(requests(&observation.stable), (30, 1));
    }

    #[tokio::test]
    async fn a_failed_endpoint_fails_the_interval_and_keeps_every_previous_reading() {
        let a = fake_admin(&envoy_text(&[("canary", 10, 0, [10, 10], 10)], None)).await;
        let b = fake_admin(&envoy_text(&[("canary", 20, 0, [20, 20], 20)], None)).await;
        let mut source = source(&[a.url(), b.url()]);
        assert_eq!(source.observe().await, Err(ObservationError::Baseline));

        a.reply(
            STATS,
            Reply::text(envoy_text(&[("canary", 15, 0, [15, 15], 15)], None)),
        );
        b.reply(STATS, Reply::status(503));
        match source.observe().await {
            Err(ObservationError::Unreachable(message)) => {
                assert!(message.contains(b.url()), "{message}");
                assert!(message.contains("503"), "{message}");
                assert!(!message.contains(a.url()), "{message}");
            }
            other => panic!("expected Unreachable, got {other:?}"),
        }

        // Both back: each endpoint's delta runs from the last full scrape (10 and 20).
        a.reply(
            STATS,
            Reply::text(envoy_text(&[("canary", 17, 0, [17, 17], 17)], None)),
        );
        b.reply(
            STATS,
            Reply::text(envoy_text(&[("canary", 26, 0, [26, 26], 26)], None)),
        );
        let observation = source.observe().await.unwrap();
        assert_eq!(requests(&observation.canary), (7 + 6, 0));
    }

    #[tokio::test]
    async fn unreachable_and_slow_endpoints_are_named() {
        let good = fake_admin(&envoy_text(&[], None)).await;
        let closed_port_url = closed_port_url().unwrap();
        let mut closed = source(&[good.url(), &closed_port_url]);
        match closed.observe().await {
            Err(ObservationError::Unreachable(message)) => {
                assert!(message.contains(&closed_port_url), "{message}")
            }
            other => panic!("expected Unreachable, got {other:?}"),
        }

        let slow = fake_admin("").await;
        slow.reply(STATS, Reply::Slow(Duration::from_secs(5)));
        let mut timing_out = EnvoyAdminSource::new(
            vec![slow.url().to_string()],
            selector(),
            Duration::from_millis(100),
        )
        .unwrap();
        let started = std::time::Instant::now();
        match timing_out.observe().await {
            Err(ObservationError::Unreachable(message)) => {
                assert!(message.contains(slow.url()), "{message}");
                assert!(message.contains("timed out"), "{message}");
            }
            other => panic!("expected Unreachable, got {other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn malformed_bodies() {
        let cases: &[(&str, &str)] = &[
            ("garbage", "<html>oops</html>"),
            ("bad escape", "fledge_requests_total{fledge_service=\"a\\q\"} 1"),
            (
                "fractional counter",
                "fledge_requests_total{fledge_service=\"app\",fledge_subset=\"canary\",fledge_class=\"2xx\"} 1.5",
            ),
            (
                "unknown class",
                "fledge_requests_total{fledge_service=\"app\",fledge_subset=\"canary\",fledge_class=\"6xx\"} 1",
            ),
            (
                "bucket without le",
                "fledge_request_duration_ms_bucket{fledge_service=\"app\",fledge_subset=\"canary\"} 1",
            ),
        ];
        let admin = fake_admin("").await;
        for (what, body) in cases {
            admin.reply(STATS, Reply::text(*body));
            let mut source = source(&[admin.url()]);
            match source.observe().await {
                Err(ObservationError::Malformed(message)) => {
                    assert!(message.contains(admin.url()), "{what}: {message}")
                }
                other => panic!("{what}: expected Malformed, got {other:?}"),
            }
        }
        admin.reply(STATS, Reply::text("<html>oops</html>"));
        let mut source = source(&[admin.url()]);
        let Err(ObservationError::Malformed(message)) = source.observe().await else {
            panic!("expected Malformed");
        };
        assert!(message.contains("line 1"), "{message}");
    }

    /// A page is parsed as it arrives: an over-long line or one that is not UTF-8 fails the
    /// scrape naming the endpoint and the line (nothing is decoded lossily).
    #[tokio::test]
    async fn over_long_and_non_utf8_lines_are_malformed_naming_the_line() {
        let good = envoy_text(&[("canary", 1, 0, [1, 1], 1)], Some(5));
        let good_lines = good.lines().count();
        let long_line = format!("a{{x=\"{}\"}} 1\n", "y".repeat(promtext::MAX_LINE_BYTES));
        let not_utf8 = [good.as_bytes(), b"a{x=\"\xC3\x28\"} 1\n"].concat();
        let cases: [(&str, Reply, &str); 2] = [
            (
                "over-long",
                Reply::text(format!("{good}{long_line}")),
                "longer than 65536 bytes",
            ),
            ("not UTF-8", Reply::Bytes(200, not_utf8), "invalid UTF-8"),
        ];
        let admin = fake_admin("").await;
        for (what, reply, words) in cases {
            admin.reply(STATS, reply);
            let Err(ObservationError::Malformed(message)) = source(&[admin.url()]).observe().await
            else {
                panic!("{what}: expected Malformed");
            };
            let line = format!("line {}:", good_lines + 1);
            assert!(message.contains(admin.url()), "{what}: {message}");
            assert!(message.contains(&line), "{what}: {message}");
            assert!(message.contains(words), "{what}: {message}");
        }
    }

    /// A page of megabytes comes in many chunks; lines cut between them are read whole.
    #[tokio::test]
    async fn a_page_of_many_chunks_is_read_whole() {
        let others: String = (0..20_000)
            .map(|n| {
                format!("fledge_requests_total{{fledge_service=\"other-{n}\",fledge_subset=\"canary\",fledge_class=\"2xx\"}} {n}\n")
            })
            .collect();
        let page = |ok: u64| {
            format!(
                "{others}{}",
                envoy_text(&[("canary", ok, 1, [3, 4], 5)], Some(9))
            )
        };
        assert!(page(0).len() > 1_000_000);
        let admin = fake_admin(&page(10)).await;
        // Debug builds parse slowly: more than the other tests' 500 ms.
        let mut source = EnvoyAdminSource::new(
            vec![admin.url().to_string()],
            selector(),
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(source.observe().await, Err(ObservationError::Baseline));
        admin.reply(STATS, Reply::text(page(17)));
        let observation = source.observe().await.unwrap();
        assert_eq!(requests(&observation.canary), (7, 0));
    }

    /// The filter's bucket counters are published one by one: a scrape during a flush may see
    /// a bucket ahead of the one above it. That is read as the earlier state, not as an error.
    #[tokio::test]
    async fn a_scrape_caught_mid_flush_is_clipped_not_malformed() {
        let series = "fledge_service=\"app\",fledge_subset=\"canary\"";
        let torn = format!(
            "fledge_request_duration_ms_bucket{{{series},le=\"1\"}} 5\n\
             fledge_request_duration_ms_bucket{{{series},le=\"2\"}} 4\n\
             fledge_request_duration_ms_bucket{{{series},le=\"+Inf\"}} 4\n\
             fledge_request_duration_ms_count{{{series}}} 4\n"
        );
        let admin = fake_admin(&torn).await;
        let mut source = source(&[admin.url()]);
        assert!(matches!(
            source.observe().await,
            Err(ObservationError::Baseline)
        ));
        admin.reply(
            STATS,
            Reply::text(torn.replace("} 5", "} 6").replace("} 4", "} 6")),
        );
        let observation = source.observe().await.expect("an observation");
        assert_eq!(observation.canary.latency.count, 2);
        assert_eq!(observation.canary.latency.cumulative, vec![2, 2]);
    }

    #[tokio::test]
    async fn missing_subsets_and_other_services_count_as_zero() {
        let other_service = "fledge_requests_total{fledge_service=\"other\",fledge_subset=\"canary\",fledge_class=\"5xx\"} 99\n\
                             fledge_requests_total{fledge_service=\"app\",fledge_subset=\"v3\",fledge_class=\"5xx\"} 99\n";
        let admin = fake_admin(&format!(
            "{other_service}{}",
            envoy_text(&[("stable", 10, 0, [10, 10], 10)], None)
        ))
        .await;
        let mut source = source(&[admin.url()]);
        assert_eq!(source.observe().await, Err(ObservationError::Baseline));
        admin.reply(
            STATS,
            Reply::text(format!(
                "{other_service}{}",
                envoy_text(&[("stable", 12, 0, [12, 12], 12)], None)
            )),
        );
        let observation = source.observe().await.unwrap();
        assert_eq!(requests(&observation.stable), (2, 0));
        assert_eq!(observation.canary, SubsetTraffic::default());

        // The canary's first requests: everything it has counted is the interval.
        admin.reply(
            STATS,
            Reply::text(envoy_text(
                &[("stable", 12, 0, [12, 12], 12), ("canary", 3, 1, [4, 4], 4)],
                None,
            )),
        );
        let observation = source.observe().await.unwrap();
        assert_eq!(requests(&observation.canary), (3, 1));
        assert_eq!(observation.canary.latency.count, 4);
    }

    #[tokio::test]
    async fn histogram_appearing_after_counters_is_not_counted_twice() {
        let counters_only = "fledge_requests_total{fledge_service=\"app\",fledge_subset=\"canary\",fledge_class=\"2xx\"} 5\n";
        let admin = fake_admin(counters_only).await;
        let mut source = source(&[admin.url()]);
        assert_eq!(source.observe().await, Err(ObservationError::Baseline));
        admin.reply(
            STATS,
            Reply::text(envoy_text(&[("canary", 8, 0, [8, 8], 8)], None)),
        );
        let observation = source.observe().await.unwrap();
        assert_eq!(requests(&observation.canary), (3, 0));
        assert_eq!(observation.canary.latency.count, 8);
    }

    #[tokio::test]
    async fn different_buckets_across_endpoints_are_malformed() {
        let a = fake_admin(&envoy_text(&[("canary", 0, 0, [0, 0], 0)], None)).await;
        let b_text = |n: u64| {
            format!(
                "fledge_request_duration_ms_bucket{{fledge_service=\"app\",fledge_subset=\"canary\",le=\"5\"}} {n}\n\
                 fledge_request_duration_ms_count{{fledge_service=\"app\",fledge_subset=\"canary\"}} {n}\n"
            )
        };
        let b = fake_admin(&b_text(0)).await;
        let mut source = source(&[a.url(), b.url()]);
        assert_eq!(source.observe().await, Err(ObservationError::Baseline));
        a.reply(
            STATS,
            Reply::text(envoy_text(&[("canary", 1, 0, [1, 1], 1)], None)),
        );
        b.reply(STATS, Reply::text(b_text(1)));
        match source.observe().await {
            Err(ObservationError::Malformed(message)) => {
                assert!(
                    message.contains("buckets of subset \"canary\" differ"),
                    "{message}"
                );
                assert!(
                    message.contains(a.url()) && message.contains(b.url()),
                    "{message}"
                );
            }
            other => panic!("expected Malformed, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn escaped_label_values_select_series() {
        let text = "fledge_requests_total{fledge_service=\"app\",fledge_subset=\"can\\\"ary\\\\x\",fledge_class=\"2xx\"} 4\n";
        let admin = fake_admin(text).await;
        let mut source = EnvoyAdminSource::new(
            vec![admin.url().to_string()],
            SubsetSelector {
                service: "app".to_string(),
                stable_subset: "stable".to_string(),
                canary_subset: "can\"ary\\x".to_string(),
            },
            Duration::from_millis(500),
        )
        .unwrap();
        assert_eq!(source.observe().await, Err(ObservationError::Baseline));
        admin.reply(STATS, Reply::text(text.replace("} 4", "} 9")));
        let observation = source.observe().await.unwrap();
        assert_eq!(requests(&observation.canary), (5, 0));
    }

    #[test]
    fn construction_errors() {
        let build = |urls: &[&str], selector: SubsetSelector| {
            EnvoyAdminSource::new(
                urls.iter().map(|u| u.to_string()).collect(),
                selector,
                Duration::from_secs(1),
            )
        };
        assert!(matches!(
            build(&[], selector()),
            Err(EnvoyAdminSourceError::NoEndpoints)
        ));
        assert!(matches!(
            build(&["not a url"], selector()),
            Err(EnvoyAdminSourceError::InvalidUrl { .. })
        ));
        assert!(matches!(
            build(&["ftp://127.0.0.1:9901"], selector()),
            Err(EnvoyAdminSourceError::InvalidUrl { .. })
        ));
        let mut same = selector();
        same.canary_subset = same.stable_subset.clone();
        assert!(matches!(
            build(&["http://127.0.0.1:9901"], same),
            Err(EnvoyAdminSourceError::SameSubsets(_))
        ));
    }

    #[test]
    fn stats_url_keeps_a_path_prefix() {
        let cases = [
            (
                "http://127.0.0.1:9901",
                "http://127.0.0.1:9901/stats/prometheus?",
            ),
            (
                "http://127.0.0.1:9901/",
                "http://127.0.0.1:9901/stats/prometheus?",
            ),
            (
                "http://gw:9901/admin/",
                "http://gw:9901/admin/stats/prometheus?",
            ),
        ];
        for (base, want_prefix) in cases {
            let url = stats_url(base, STATS_FILTER).unwrap().to_string();
            assert!(url.starts_with(want_prefix), "{base}: {url}");
        }
    }

    #[tokio::test]
    async fn guard_trip_is_the_newest_over_gateways_and_survives_one_being_down() {
        let gauge = |service: &str, value: u64| {
            format!("# TYPE fledge_guard_tripped gauge\nfledge_guard_tripped{{fledge_service=\"{service}\"}} {value}\n")
        };
        let a = fake_admin(&gauge("app", 0)).await;
        let b = fake_admin(&(gauge("app", 0) + &gauge("other", 1_700_000_500))).await;
        let mut src = source(&[a.url(), b.url()]);
        assert_eq!(src.guard_tripped_at().await, Ok(None));
        assert_eq!(
            last_query(&a).as_deref(),
            Some("filter=fledge_guard_tripped")
        );
        b.reply(STATS, Reply::text(gauge("app", 1_700_000_100)));
        a.reply(STATS, Reply::text(gauge("app", 1_700_000_050)));
        let newest = chrono::DateTime::from_timestamp(1_700_000_100, 0);
        assert_eq!(src.guard_tripped_at().await, Ok(newest));
        // One gateway down: the trip seen on the other still counts; with no trip, the error.
        a.reply(STATS, Reply::status(503));
        assert_eq!(src.guard_tripped_at().await, Ok(newest));
        b.reply(STATS, Reply::text(gauge("app", 0)));
        assert!(matches!(
            src.guard_tripped_at().await,
            Err(ObservationError::Unreachable(_))
        ));
        // A filter without a guard for this service: no series, armed.
        a.reply(STATS, Reply::text(""));
        b.reply(STATS, Reply::text(""));
        assert_eq!(src.guard_tripped_at().await, Ok(None));
    }
}
