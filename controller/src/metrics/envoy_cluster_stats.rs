//! [`ClusterStats`]: a canary's traffic from Envoy's *own* per-cluster statistics, for
//! `metricsSource.envoyClusterStats` — no Wasm filter needed for metrics.
//!
//! Each scrape of an Envoy admin's `/stats/prometheus` (through
//! [`super::envoy_admin::EnvoyAdminSource`], which handles endpoints, deltas, restarts and
//! all-or-nothing commits) is read for the two named clusters:
//!
//! ```text
//! envoy_cluster_upstream_rq_xx{envoy_response_code_class="5",envoy_cluster_name="app_canary"} 23
//! envoy_cluster_upstream_rq_time_bucket{envoy_cluster_name="app_canary",le="25"} 17
//! envoy_cluster_upstream_rq_time_sum / _count{envoy_cluster_name="app_canary"}
//! ```
//!
//! Response classes come from `envoy_response_code_class` (1–5 → 1xx..5xx). What Envoy counts
//! there, checked against Envoy 1.40 (`e2e/tests/cluster_stats.rs`): upstream answers, and also
//! its own replies on the cluster's behalf — a refused connection or no healthy host is a 503, an
//! upstream timeout a 504 — so a canary that is down reads as failing, not as idle. Unlike the
//! filter's metrics: every upstream *attempt* is counted (with retries configured, a retried 503
//! counts too); gRPC errors inside a 200 are invisible; `upstream_rq_time` holds the time to the
//! upstream's response, and requests without one (timeouts, connect failures) are left out of
//! the latency histogram; there is no forced-canary tagging and no data-plane guard.
//!
//! Envoy must have these stats: plain Envoy does by default (tag extraction of
//! `envoy_cluster_name` and `envoy_response_code_class` is built in); Istio trims proxy stats,
//! so the gateway needs `proxyStatsMatcher: {inclusionRegexps: [".*upstream_rq_.*"]}`
//! (docs/kubernetes.md). A cluster that has served no request yet has no series and counts as
//! zero, like a subset the filter has not seen.

use super::envoy_admin::{
    AddSample, EndpointReading, HistogramNames, PageIndex, PageIndexer, SampleIndexer, StatsReader,
    SubsetAccumulator,
};
use super::promtext::SampleRef;
use fledge_core::contract::ResponseClass;

/// `upstream_rq_<N>xx` of a cluster, tag-extracted.
const CLASS_COUNTER: &str = "envoy_cluster_upstream_rq_xx";
/// `upstream_rq_time` of a cluster (milliseconds), tag-extracted.
const LATENCY_HISTOGRAM: &str = "envoy_cluster_upstream_rq_time";
const CLUSTER_LABEL: &str = "envoy_cluster_name";
const CLASS_LABEL: &str = "envoy_response_code_class";

/// Reads the stable and canary clusters' request classes and latency from each scrape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterStats {
    pub stable_cluster: String,
    pub canary_cluster: String,
}

impl StatsReader for ClusterStats {
    /// `^cluster\..*\.upstream_rq_([1-5]xx|time)$` and the uptime gauge: every cluster's
    /// classes and latency, so one scrape serves every canary reading this Envoy.
    fn stats_filter(&self) -> String {
        r"^cluster\..*\.upstream_rq_([1-5]xx|time)$|^server\.uptime$".to_string()
    }

    /// Every cluster's classes and latency, by cluster name.
    fn indexer(&self) -> Box<dyn SampleIndexer> {
        Box::new(ClusterPageIndexer::default())
    }

    fn read(&self, page: &PageIndex) -> Result<EndpointReading, String> {
        Ok(EndpointReading {
            stable: page.traffic(&self.stable_cluster)?,
            canary: page.traffic(&self.canary_cluster)?,
            uptime_seconds: page.uptime_seconds,
            untagged_series: 0,
        })
    }
}

/// Indexes a page's clusters: each one's classes and latency.
struct ClusterPageIndexer {
    histogram: HistogramNames,
    index: PageIndexer,
}

impl Default for ClusterPageIndexer {
    fn default() -> Self {
        ClusterPageIndexer {
            histogram: HistogramNames::of(LATENCY_HISTOGRAM),
            index: PageIndexer::default(),
        }
    }
}

impl SampleIndexer for ClusterPageIndexer {
    fn add(&mut self, sample: &SampleRef<'_>) {
        if self.index.take_uptime(sample) {
            return;
        }
        let Some(cluster) = sample.label(CLUSTER_LABEL) else {
            return;
        };
        let add: AddSample = if sample.name == CLASS_COUNTER {
            add_class
        } else if let Some(add) = self.histogram.adder(sample.name) {
            add
        } else {
            return;
        };
        self.index.add(cluster, |series| add(series, sample));
    }

    fn finish(self: Box<Self>) -> PageIndex {
        self.index.finish()
    }
}

/// A class counter of a cluster, by its `envoy_response_code_class`.
fn add_class(series: &mut SubsetAccumulator, sample: &SampleRef<'_>) -> Result<(), String> {
    let cluster = sample.label(CLUSTER_LABEL).unwrap_or_default();
    let class = sample
        .label(CLASS_LABEL)
        .and_then(class_of)
        .ok_or_else(|| {
            format!(
                "{CLASS_COUNTER} of cluster {cluster:?} has no {CLASS_LABEL} of 1 to 5: {:?}",
                sample.labels
            )
        })?;
    series.add_class(class, sample)
}

fn class_of(label: &str) -> Option<ResponseClass> {
    Some(match label {
        "1" => ResponseClass::Informational,
        "2" => ResponseClass::Success,
        "3" => ResponseClass::Redirection,
        "4" => ResponseClass::ClientError,
        "5" => ResponseClass::ServerError,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ISTIO_CANARY: &str = "outbound|80|canary|app.shop.svc.cluster.local";

    fn reader() -> ClusterStats {
        ClusterStats {
            stable_cluster: "outbound|80|stable|app.shop.svc.cluster.local".into(),
            canary_cluster: ISTIO_CANARY.into(),
        }
    }

    #[test]
    fn the_filter_names_no_cluster_so_one_scrape_serves_every_canary() {
        let other = ClusterStats {
            stable_cluster: "a".into(),
            canary_cluster: "b".into(),
        };
        assert_eq!(reader().stats_filter(), other.stats_filter());
        assert_eq!(
            reader().stats_filter(),
            r"^cluster\..*\.upstream_rq_([1-5]xx|time)$|^server\.uptime$"
        );
    }

    fn read(text: &str) -> Result<EndpointReading, String> {
        let reader = reader();
        reader.read(&super::super::envoy_admin::index_page(&reader, text).unwrap())
    }

    #[test]
    fn classes_and_latency_per_cluster() {
        let text = format!(
            r#"# TYPE envoy_cluster_upstream_rq_xx counter
envoy_cluster_upstream_rq_xx{{envoy_response_code_class="2",envoy_cluster_name="{c}"}} 90
envoy_cluster_upstream_rq_xx{{envoy_response_code_class="5",envoy_cluster_name="{c}"}} 10
envoy_cluster_upstream_rq_xx{{envoy_response_code_class="4",envoy_cluster_name="{c}"}} 3
envoy_cluster_upstream_rq_xx{{envoy_response_code_class="2",envoy_cluster_name="other"}} 1000
envoy_server_uptime{{}} 42
# TYPE envoy_cluster_upstream_rq_time histogram
envoy_cluster_upstream_rq_time_bucket{{envoy_cluster_name="{c}",le="5"}} 80
envoy_cluster_upstream_rq_time_bucket{{envoy_cluster_name="{c}",le="25"}} 99
envoy_cluster_upstream_rq_time_bucket{{envoy_cluster_name="{c}",le="+Inf"}} 100
envoy_cluster_upstream_rq_time_sum{{envoy_cluster_name="{c}"}} 640.5
envoy_cluster_upstream_rq_time_count{{envoy_cluster_name="{c}"}} 100
"#,
            c = ISTIO_CANARY
        );
        let reading = read(&text).unwrap();
        let canary = &reading.canary;
        assert_eq!(canary.count(ResponseClass::Success), 90);
        assert_eq!(canary.count(ResponseClass::ServerError), 10);
        assert_eq!(canary.count(ResponseClass::ClientError), 3);
        assert_eq!(canary.requests(), 103);
        assert_eq!(canary.latency.bounds_ms, [5.0, 25.0]);
        assert_eq!(canary.latency.cumulative, [80, 99]);
        assert_eq!(canary.latency.count, 100);
        assert_eq!(reading.stable.requests(), 0, "no series yet: zero");
        assert_eq!(reading.uptime_seconds, Some(42.0));
    }

    #[test]
    fn an_unknown_class_is_an_error_naming_the_cluster() {
        let text = format!(
            "envoy_cluster_upstream_rq_xx{{envoy_response_code_class=\"9\",envoy_cluster_name=\"{ISTIO_CANARY}\"}} 1\n"
        );
        let error = read(&text).unwrap_err();
        assert!(error.contains(ISTIO_CANARY), "{error}");
    }
}
