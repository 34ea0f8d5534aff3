//! What the analysis sees: per-subset traffic counts and latency histograms.
//!
//! Metrics sources read *cumulative* counters (Envoy's counters only grow until the process
//! restarts). The analysis works on *per-interval deltas*. [`SubsetTraffic::delta_since`] turns
//! two cumulative readings into a delta and treats any decrease as a counter reset (the proxy
//! restarted), so a restart never produces a negative or inflated interval.

use crate::contract::ResponseClass;
use serde::{Deserialize, Serialize};

/// A Prometheus-style cumulative histogram of request durations in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LatencyHistogram {
    /// Finite upper bounds (`le`) in ascending order; the implicit `+Inf` bucket is `count`.
    pub bounds_ms: Vec<f64>,
    /// `cumulative[i]` = requests with duration ≤ `bounds_ms[i]`.
    pub cumulative: Vec<u64>,
    /// All recorded requests (the `+Inf` bucket).
    pub count: u64,
    /// Sum of all durations in milliseconds.
    pub sum_ms: f64,
}

impl LatencyHistogram {
    /// A histogram from one scrape of bucket counters (`cumulative` in the order of the
    /// ascending `bounds_ms`). The Fledge filter publishes its duration buckets as separate
    /// counters, and Envoy's admin reads them one by one while workers may be adding to them, so
    /// a scrape can catch a flush halfway: a bucket ahead of the one above it, or of the count.
    /// Each bucket is clipped to the one above it and to the count (PromQL's
    /// `histogram_quantile` likewise repairs non-monotonic buckets); what was clipped shows up
    /// in the next scrape, since the counters only grow.
    pub fn from_scrape(
        bounds_ms: Vec<f64>,
        mut cumulative: Vec<u64>,
        count: u64,
        sum_ms: f64,
    ) -> Self {
        let mut ceiling = count;
        for bucket in cumulative.iter_mut().rev() {
            *bucket = (*bucket).min(ceiling);
            ceiling = *bucket;
        }
        LatencyHistogram {
            bounds_ms,
            cumulative,
            count,
            sum_ms,
        }
    }

    /// Requests slower than `bound_ms` (strictly above the bucket boundary). `None` if the
    /// boundary is not one of the histogram's buckets.
    pub fn slower_than(&self, bound_ms: f64) -> Option<u64> {
        let i = self
            .bounds_ms
            .iter()
            .position(|b| (b - bound_ms).abs() < 1e-9)?;
        Some(self.count.saturating_sub(self.cumulative[i]))
    }

    /// Estimate the `q` quantile (0 < q ≤ 1) by linear interpolation inside the bucket that
    /// holds it, as Prometheus' `histogram_quantile` does. If the quantile falls in the `+Inf`
    /// bucket the highest finite bound is returned (a lower bound on the truth). `None` when the
    /// histogram is empty.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count == 0 || self.bounds_ms.is_empty() || !(q > 0.0 && q <= 1.0) {
            return None;
        }
        let rank = q * self.count as f64;
        let mut lower_bound = 0.0;
        let mut lower_count = 0u64;
        for (bound, &cum) in self.bounds_ms.iter().zip(&self.cumulative) {
            if cum as f64 >= rank {
                let in_bucket = cum.saturating_sub(lower_count) as f64;
                if in_bucket <= 0.0 {
                    return Some(*bound);
                }
                let fraction = (rank - lower_count as f64) / in_bucket;
                return Some(lower_bound + (bound - lower_bound) * fraction.clamp(0.0, 1.0));
            }
            lower_bound = *bound;
            lower_count = cum;
        }
        self.bounds_ms.last().copied()
    }

    fn is_reset_relative_to(&self, prev: &Self) -> bool {
        self.count < prev.count
            || self.bounds_ms != prev.bounds_ms
            || self
                .cumulative
                .iter()
                .zip(&prev.cumulative)
                .any(|(now, before)| now < before)
    }

    fn minus(&self, prev: &Self) -> Self {
        LatencyHistogram {
            bounds_ms: self.bounds_ms.clone(),
            cumulative: self
                .cumulative
                .iter()
                .zip(&prev.cumulative)
                .map(|(now, before)| now - before)
                .collect(),
            count: self.count - prev.count,
            sum_ms: (self.sum_ms - prev.sum_ms).max(0.0),
        }
    }

    /// Add another histogram with the same buckets (e.g. from a second gateway replica).
    /// Histograms with different buckets cannot be merged; the caller gets `false`.
    pub fn merge(&mut self, other: &Self) -> bool {
        if self.bounds_ms.is_empty() && self.count == 0 {
            *self = other.clone();
            return true;
        }
        if other.bounds_ms.is_empty() && other.count == 0 {
            return true;
        }
        if self.bounds_ms != other.bounds_ms {
            return false;
        }
        for (mine, theirs) in self.cumulative.iter_mut().zip(&other.cumulative) {
            *mine += theirs;
        }
        self.count += other.count;
        self.sum_ms += other.sum_ms;
        true
    }
}

/// Traffic of one subset of one service: requests by response class and their latency.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SubsetTraffic {
    /// Requests per class, indexed by [`ResponseClass::index`].
    pub by_class: [u64; 6],
    pub latency: LatencyHistogram,
}

impl SubsetTraffic {
    pub fn requests(&self) -> u64 {
        self.by_class.iter().sum()
    }

    pub fn count(&self, class: ResponseClass) -> u64 {
        self.by_class[class.index()]
    }

    pub fn add(&mut self, class: ResponseClass, n: u64) {
        self.by_class[class.index()] += n;
    }

    /// Requests counted as failures by default (5xx and no upstream response).
    pub fn failures(&self) -> u64 {
        ResponseClass::ALL
            .into_iter()
            .filter(|c| c.is_failure())
            .map(|c| self.count(c))
            .sum()
    }

    /// Requests counted as errors when `error_statuses` are the classes the spec calls bad
    /// (`analysis.errorStatuses`). No response from the upstream is always an error.
    pub fn errors(&self, error_statuses: &[ResponseClass]) -> u64 {
        ResponseClass::ALL
            .into_iter()
            .filter(|c| *c == ResponseClass::NoResponse || error_statuses.contains(c))
            .map(|c| self.count(c))
            .sum()
    }

    /// Percentage of requests that were not errors by `error_statuses`; `None` without
    /// requests.
    pub fn success_percent(&self, error_statuses: &[ResponseClass]) -> Option<f64> {
        let total = self.requests();
        (total > 0).then(|| 100.0 * (total - self.errors(error_statuses)) as f64 / total as f64)
    }

    /// Percentage of requests that did not fail; `None` without requests.
    pub fn success_rate_percent(&self) -> Option<f64> {
        let total = self.requests();
        (total > 0).then(|| 100.0 * (total - self.failures()) as f64 / total as f64)
    }

    /// The traffic between an earlier cumulative reading `prev` and this one. Any counter that
    /// went down means the proxy restarted: then everything counted since the restart (this
    /// reading) is the delta.
    ///
    /// A histogram that did not exist in the earlier reading is *not* a reset: Envoy publishes
    /// histograms at its stats flush, after the counters, so the histogram simply starts from
    /// zero while the counters are subtracted as usual (treating it as a reset would count the
    /// previous interval's requests again).
    pub fn delta_since(&self, prev: &SubsetTraffic) -> SubsetTraffic {
        if self.is_reset_since(prev) {
            return self.clone();
        }
        let prev_latency_absent = prev.latency.bounds_ms.is_empty() && prev.latency.count == 0;
        let mut by_class = [0u64; 6];
        for (i, slot) in by_class.iter_mut().enumerate() {
            *slot = self.by_class[i] - prev.by_class[i];
        }
        SubsetTraffic {
            by_class,
            latency: if prev_latency_absent {
                self.latency.clone()
            } else {
                self.latency.minus(&prev.latency)
            },
        }
    }

    /// Whether a counter went down since the earlier cumulative reading `prev`: the proxy
    /// restarted, and [`SubsetTraffic::delta_since`] counts only what came after the restart.
    pub fn is_reset_since(&self, prev: &SubsetTraffic) -> bool {
        let prev_latency_absent = prev.latency.bounds_ms.is_empty() && prev.latency.count == 0;
        self.by_class
            .iter()
            .zip(&prev.by_class)
            .any(|(now, before)| now < before)
            || (!prev_latency_absent && self.latency.is_reset_relative_to(&prev.latency))
    }

    /// Sum two readings (e.g. the same subset seen by two gateway replicas).
    pub fn merge(&mut self, other: &SubsetTraffic) -> bool {
        for (mine, theirs) in self.by_class.iter_mut().zip(&other.by_class) {
            *mine += theirs;
        }
        self.latency.merge(&other.latency)
    }
}

/// One analysis interval of one canary: what stable and canary served since the last reading.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Observation {
    pub stable: SubsetTraffic,
    pub canary: SubsetTraffic,
    /// Values of custom metric queries (by metric name) for this interval. A metric missing
    /// here had no data.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub custom: std::collections::BTreeMap<String, f64>,
    /// Set when counters went back to zero during the interval (a proxy restarted): the
    /// interval then covers only the time since the restart. Names what reset, e.g.
    /// `Envoy http://10.0.0.7:15000 restarted`, so a short interval is reported as such and
    /// not as missing traffic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counter_reset: Option<String>,
}

impl Observation {
    /// Observed share of requests that went to the canary in this interval.
    pub fn canary_share(&self) -> Option<f64> {
        let total = self.stable.requests() + self.canary.requests();
        (total > 0).then(|| self.canary.requests() as f64 / total as f64)
    }
}

/// Why a metrics source could not produce an observation. The state machine treats every one
/// of these as "no data": it halts and never promotes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "kind", content = "message", rename_all = "camelCase")]
pub enum ObservationError {
    #[error("metrics source unreachable: {0}")]
    Unreachable(String),
    #[error("metrics source returned malformed data: {0}")]
    Malformed(String),
    /// First reading after start (or after an outage): there is no previous reading yet to
    /// subtract from, so no interval can be formed.
    #[error("baseline taken, waiting for the next interval")]
    Baseline,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scrape_caught_mid_flush_is_clipped_to_a_histogram() {
        // The 10 ms bucket was read after a flush, the 25 ms one and the count before it.
        let h = LatencyHistogram::from_scrape(vec![5.0, 10.0, 25.0], vec![3, 9, 7], 8, 40.0);
        assert_eq!(h.cumulative, vec![3, 7, 7]);
        assert_eq!(h.count, 8);
        let h = LatencyHistogram::from_scrape(vec![5.0, 10.0], vec![3, 9], 6, 0.0);
        assert_eq!(h.cumulative, vec![3, 6]);
        // A consistent scrape is unchanged.
        let h = LatencyHistogram::from_scrape(vec![5.0, 10.0], vec![3, 4], 6, 1.0);
        assert_eq!(h.cumulative, vec![3, 4]);
    }

    fn hist(bounds: &[f64], cumulative: &[u64], count: u64, sum: f64) -> LatencyHistogram {
        LatencyHistogram {
            bounds_ms: bounds.to_vec(),
            cumulative: cumulative.to_vec(),
            count,
            sum_ms: sum,
        }
    }

    fn traffic(ok: u64, err5: u64, latency: LatencyHistogram) -> SubsetTraffic {
        let mut t = SubsetTraffic {
            latency,
            ..Default::default()
        };
        t.add(ResponseClass::Success, ok);
        t.add(ResponseClass::ServerError, err5);
        t
    }

    #[test]
    fn quantile_interpolates_like_prometheus() {
        // 100 requests: 50 ≤ 10ms, 90 ≤ 100ms, 100 ≤ 1000ms.
        let h = hist(&[10.0, 100.0, 1000.0], &[50, 90, 100], 100, 0.0);
        let cases = [
            (0.5, 10.0),
            (0.25, 5.0),
            (0.9, 100.0),
            (0.7, 55.0),
            (0.99, 910.0),
            (1.0, 1000.0),
        ];
        for (q, want) in cases {
            let got = h.quantile(q).unwrap();
            assert!((got - want).abs() < 1e-6, "q={q}: got {got}, want {want}");
        }
    }

    #[test]
    fn quantile_in_inf_bucket_returns_highest_bound() {
        let h = hist(&[10.0, 100.0], &[10, 20], 100, 0.0);
        assert_eq!(h.quantile(0.99), Some(100.0));
    }

    #[test]
    fn quantile_of_empty_is_none() {
        assert_eq!(LatencyHistogram::default().quantile(0.99), None);
        assert_eq!(hist(&[10.0], &[0], 0, 0.0).quantile(0.5), None);
    }

    #[test]
    fn slower_than_counts_above_boundary() {
        let h = hist(&[10.0, 100.0], &[5, 8], 10, 0.0);
        assert_eq!(h.slower_than(10.0), Some(5));
        assert_eq!(h.slower_than(100.0), Some(2));
        assert_eq!(h.slower_than(50.0), None);
    }

    #[test]
    fn delta_subtracts_cumulative_readings() {
        let before = traffic(100, 1, hist(&[10.0], &[90], 101, 500.0));
        let after = traffic(150, 4, hist(&[10.0], &[130], 154, 900.0));
        let delta = after.delta_since(&before);
        assert_eq!(delta.count(ResponseClass::Success), 50);
        assert_eq!(delta.count(ResponseClass::ServerError), 3);
        assert_eq!(delta.latency.cumulative, vec![40]);
        assert_eq!(delta.latency.count, 53);
        assert!((delta.latency.sum_ms - 400.0).abs() < 1e-9);
    }

    #[test]
    fn delta_after_counter_reset_is_the_new_reading() {
        let before = traffic(1000, 10, hist(&[10.0], &[900], 1010, 5000.0));
        let after = traffic(20, 1, hist(&[10.0], &[19], 21, 60.0));
        assert_eq!(after.delta_since(&before), after);
    }

    #[test]
    fn delta_with_changed_buckets_is_a_reset() {
        let before = traffic(10, 0, hist(&[10.0], &[10], 10, 1.0));
        let after = traffic(20, 0, hist(&[5.0, 10.0], &[15, 20], 20, 2.0));
        assert_eq!(after.delta_since(&before), after);
    }

    #[test]
    fn a_histogram_appearing_after_its_counters_is_not_a_reset() {
        let before = traffic(100, 1, LatencyHistogram::default());
        let after = traffic(150, 1, hist(&[10.0], &[140], 151, 700.0));
        let delta = after.delta_since(&before);
        assert_eq!(
            delta.count(ResponseClass::Success),
            50,
            "counters still subtracted"
        );
        assert_eq!(
            delta.latency, after.latency,
            "the new histogram starts from zero"
        );
    }

    #[test]
    fn success_rate_ignores_4xx() {
        let mut t = traffic(90, 5, LatencyHistogram::default());
        t.add(ResponseClass::ClientError, 5);
        t.add(ResponseClass::NoResponse, 5);
        assert_eq!(t.requests(), 105);
        assert_eq!(t.failures(), 10);
        let rate = t.success_rate_percent().unwrap();
        assert!((rate - 100.0 * 95.0 / 105.0).abs() < 1e-9);
        assert_eq!(SubsetTraffic::default().success_rate_percent(), None);
    }

    #[test]
    fn merge_adds_replicas_and_refuses_mismatched_buckets() {
        let mut a = traffic(10, 1, hist(&[10.0], &[8], 11, 50.0));
        let b = traffic(5, 0, hist(&[10.0], &[5], 5, 10.0));
        assert!(a.merge(&b));
        assert_eq!(a.requests(), 16);
        assert_eq!(a.latency.count, 16);
        let c = traffic(5, 0, hist(&[20.0], &[5], 5, 10.0));
        assert!(!a.merge(&c));
    }
}
