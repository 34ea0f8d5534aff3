//! One subset's traffic as its series arrive, in any order — shared by every metrics source
//! that reads the fledge series sample by sample (Envoy pages, Prometheus answers). Each source
//! parses and checks its own samples; this only adds them up and builds the histogram.

use fledge_core::contract::ResponseClass;
use fledge_core::observe::{LatencyHistogram, SubsetTraffic};

#[derive(Default)]
pub(crate) struct TrafficParts {
    by_class: [u64; 6],
    /// `(le, cumulative count)` for finite bounds, unordered.
    finite_buckets: Vec<(f64, u64)>,
    infinite_bucket: Option<u64>,
    pub(crate) sum_ms: Option<f64>,
    pub(crate) count: Option<u64>,
}

impl TrafficParts {
    /// `n` more requests of `class`.
    pub(crate) fn add_class(&mut self, class: ResponseClass, n: u64) {
        if let Some(slot) = self.by_class.get_mut(class.index()) {
            *slot = slot.saturating_add(n);
        }
    }

    /// `n` more in the bucket bounded by `le` (`1` and `1.0` are one bound).
    pub(crate) fn add_bucket(&mut self, le: f64, n: u64) {
        if le == f64::INFINITY {
            self.infinite_bucket = Some(self.infinite_bucket.unwrap_or(0).saturating_add(n));
        } else if let Some(bucket) = self.finite_buckets.iter_mut().find(|(b, _)| *b == le) {
            bucket.1 = bucket.1.saturating_add(n);
        } else {
            self.finite_buckets.push((le, n));
        }
    }

    /// The subset's traffic. Buckets caught mid-flush are clipped
    /// ([`LatencyHistogram::from_scrape`]).
    pub(crate) fn finish(mut self) -> SubsetTraffic {
        self.finite_buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        let bounds_ms: Vec<f64> = self.finite_buckets.iter().map(|(le, _)| *le).collect();
        let cumulative: Vec<u64> = self.finite_buckets.iter().map(|(_, n)| *n).collect();
        let highest_finite = cumulative.last().copied().unwrap_or(0);
        let count = self
            .count
            .or(self.infinite_bucket)
            .unwrap_or(highest_finite);
        SubsetTraffic {
            by_class: self.by_class,
            latency: LatencyHistogram::from_scrape(
                bounds_ms,
                cumulative,
                count,
                self.sum_ms.unwrap_or(0.0),
            ),
        }
    }
}
