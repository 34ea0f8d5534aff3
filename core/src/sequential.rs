//! Anytime-valid sequential comparison of canary and stable.
//!
//! Question: is the canary's rate of some bad event (an error, a request slower than a bucket
//! boundary) more than `tolerance` times the stable's? Each interval gives event and request
//! counts for both versions. Conditional on the total number of events in an interval, the
//! number that hit the canary is binomial with success probability
//!
//! ```text
//! θ(r) = ρ·r / (ρ·r + 1 − ρ)      r = p_canary / p_stable,  ρ = observed canary share of requests
//! ```
//!
//! so the unknown shared event rate (daily swings, a flaky dependency) cancels out, and the
//! *observed* share ρ of each interval absorbs weight steps. We keep, for a fixed grid of ratios
//! r, the running log-likelihood `L(r) = Σ e_c·ln θ(r) + e_b·ln(1 − θ(r))`. Then
//!
//! - the mixture likelihood ratio of "r > tolerance" against "r = tolerance" is an e-process:
//!   under the null it exceeds `1/α` with probability at most α *however often it is looked
//!   at* (Ville's inequality) — that is the rollback rule, valid at every interval;
//! - `{r : mixture(L) / L(r) < 1/α}` is a confidence sequence for r; its upper end below a
//!   margin is evidence that the canary is *not worse*, usable to gate promotion.
//!
//! The likelihood ratio is monotone in r, so the composite null r ≤ tolerance is covered too.

use serde::{Deserialize, Serialize};

/// The largest regression the rollback mixture puts prior mass on, relative to the tolerance.
/// Bigger regressions are still caught (the likelihood at 8× is then overwhelming); mass spent
/// on them would only slow the detection of small ones.
const MAX_ALTERNATIVE: f64 = 8.0;

/// Ratios considered by the mixture: log-spaced from 1/32 to 32, six points per doubling,
/// so 1, 2, 4 … are exact grid points.
pub fn ratio_grid() -> Vec<f64> {
    (-30..=30).map(|i| 2f64.powf(f64::from(i) / 6.0)).collect()
}

/// `ln(Σ exp(v))` without overflow: the largest value is factored out first.
pub(crate) fn log_sum_exp(values: impl Iterator<Item = f64>) -> f64 {
    let values: Vec<f64> = values.collect();
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if !max.is_finite() {
        return max;
    }
    max + values.iter().map(|v| (v - max).exp()).sum::<f64>().ln()
}

fn theta(share: f64, ratio: f64) -> f64 {
    share * ratio / (share * ratio + 1.0 - share)
}

/// The running state of one canary-vs-stable ratio test. Plain numbers, so it can be saved in
/// the canary status and a restarted controller continues the same test.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RatioTest {
    /// The null boundary: the canary may be up to this many times worse.
    pub tolerance: f64,
    /// `L(r)` for every point of [`ratio_grid`].
    pub log_likelihood: Vec<f64>,
    /// `L(tolerance)`.
    pub log_likelihood_at_tolerance: f64,
    pub canary_events: u64,
    pub canary_requests: u64,
    pub stable_events: u64,
    pub stable_requests: u64,
    /// Largest `ln E` seen so far (for the anytime p-value).
    pub max_log_evidence: f64,
}

impl RatioTest {
    pub fn new(tolerance: f64) -> Self {
        RatioTest {
            tolerance,
            log_likelihood: vec![0.0; ratio_grid().len()],
            log_likelihood_at_tolerance: 0.0,
            canary_events: 0,
            canary_requests: 0,
            stable_events: 0,
            stable_requests: 0,
            max_log_evidence: 0.0,
        }
    }

    /// Add one interval: bad events and requests of each version.
    pub fn update(
        &mut self,
        canary_events: u64,
        canary_requests: u64,
        stable_events: u64,
        stable_requests: u64,
    ) {
        // Events can't exceed requests; clamp defensively against inconsistent scrapes.
        let canary_events = canary_events.min(canary_requests);
        let stable_events = stable_events.min(stable_requests);
        self.canary_events += canary_events;
        self.canary_requests += canary_requests;
        self.stable_events += stable_events;
        self.stable_requests += stable_requests;
        let total = canary_requests + stable_requests;
        if total == 0 || canary_requests == 0 || stable_requests == 0 {
            // With only one version serving, the split of events says nothing about r.
            return;
        }
        if canary_events + stable_events == 0 {
            return;
        }
        let share = canary_requests as f64 / total as f64;
        let (ec, eb) = (canary_events as f64, stable_events as f64);
        let log_lik = |r: f64| {
            let t = theta(share, r);
            ec * t.ln() + eb * (1.0 - t).ln()
        };
        for (slot, r) in self.log_likelihood.iter_mut().zip(ratio_grid()) {
            *slot += log_lik(r);
        }
        self.log_likelihood_at_tolerance += log_lik(self.tolerance);
        self.max_log_evidence = self.max_log_evidence.max(self.log_evidence());
    }

    /// `ln E`: the mixture likelihood ratio of the grid ratios above the tolerance (up to
    /// [`MAX_ALTERNATIVE`]× it) against the tolerance. The j-th ratio above the tolerance gets weight ∝ 1/j: small regressions are
    /// the hard ones to catch, so they get the most prior mass; large ones win anyway.
    pub fn log_evidence(&self) -> f64 {
        let alternatives: Vec<f64> = ratio_grid()
            .into_iter()
            .zip(&self.log_likelihood)
            .filter(|(r, _)| *r > self.tolerance && *r <= self.tolerance * MAX_ALTERNATIVE)
            .map(|(_, l)| *l)
            .collect();
        if alternatives.is_empty() {
            return 0.0;
        }
        let harmonic: f64 = (1..=alternatives.len()).map(|j| 1.0 / j as f64).sum();
        let weighted = alternatives
            .into_iter()
            .enumerate()
            .map(|(j, l)| l - ((j + 1) as f64 * harmonic).ln());
        log_sum_exp(weighted) - self.log_likelihood_at_tolerance
    }

    /// Anytime-valid p-value for "the canary is no more than `tolerance` times worse".
    pub fn p_value(&self) -> f64 {
        (-self.max_log_evidence).exp().min(1.0)
    }

    /// True once the evidence that the canary is worse than the tolerance reaches `1/alpha`.
    pub fn rejects(&self, alpha: f64) -> bool {
        self.max_log_evidence >= (1.0 / alpha).ln()
    }

    /// Grid ratio with the highest likelihood (a point estimate); `None` before any event.
    pub fn estimate(&self) -> Option<f64> {
        if self.canary_events + self.stable_events == 0 {
            return None;
        }
        ratio_grid()
            .into_iter()
            .zip(&self.log_likelihood)
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(r, _)| r)
    }

    /// Upper end of the `1 − alpha` confidence sequence for r, at grid resolution (rounded
    /// up, so conservative). `None` when no grid ratio is excluded from above (too little data).
    pub fn upper_bound(&self, alpha: f64) -> Option<f64> {
        let grid = ratio_grid();
        let n = grid.len() as f64;
        let mixture = log_sum_exp(self.log_likelihood.iter().copied()) - n.ln();
        let threshold = (1.0 / alpha).ln();
        // Walk down from the top: the first ratio still inside the set bounds it; report the
        // grid point above it so the bound stays conservative between grid points.
        let mut previous: Option<f64> = None;
        for (r, l) in grid.iter().zip(&self.log_likelihood).rev() {
            if mixture - l < threshold {
                return previous;
            }
            previous = Some(*r);
        }
        previous
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic "expected counts" intervals: both arms at `base` event rate, canary at
    /// `ratio × base`, `n` requests per interval split by `share`.
    fn feed(test: &mut RatioTest, intervals: usize, n: u64, share: f64, base: f64, ratio: f64) {
        for _ in 0..intervals {
            let nc = (n as f64 * share).round() as u64;
            let nb = n - nc;
            let ec = (nc as f64 * base * ratio).round() as u64;
            let eb = (nb as f64 * base).round() as u64;
            test.update(ec, nc, eb, nb);
        }
    }

    #[test]
    fn grid_is_symmetric_and_contains_one_and_two() {
        let grid = ratio_grid();
        assert_eq!(grid.len(), 61);
        assert!(grid.iter().any(|r| (r - 1.0).abs() < 1e-12));
        assert!(grid.iter().any(|r| (r - 2.0).abs() < 1e-12));
        assert!((grid[0] * grid[60] - 1.0).abs() < 1e-12);
    }

    #[test]
    fn equal_rates_give_no_evidence() {
        let mut t = RatioTest::new(1.2);
        feed(&mut t, 50, 1000, 0.2, 0.01, 1.0);
        assert!(t.log_evidence() < 0.0, "{}", t.log_evidence());
        assert!(!t.rejects(0.05));
        assert!(t.p_value() > 0.5);
        let estimate = t.estimate().unwrap();
        assert!((0.8..1.3).contains(&estimate), "{estimate}");
    }

    #[test]
    fn a_doubled_error_rate_is_rejected_and_estimated() {
        let mut t = RatioTest::new(1.2);
        feed(&mut t, 20, 1000, 0.2, 0.01, 2.0);
        assert!(t.rejects(0.05), "ln E = {}", t.log_evidence());
        assert!(t.p_value() < 0.05);
        assert!((1.7..2.4).contains(&t.estimate().unwrap()));
    }

    #[test]
    fn weight_steps_do_not_bias_the_test() {
        // Equal rates, canary share moving 5% → 20% → 50% and a traffic swing.
        let mut t = RatioTest::new(1.2);
        for (share, n) in [(0.05, 500), (0.2, 3000), (0.5, 800), (0.5, 5000)] {
            feed(&mut t, 10, n, share, 0.01, 1.0);
        }
        assert!(!t.rejects(0.05));
        let estimate = t.estimate().unwrap();
        assert!((0.8..1.3).contains(&estimate), "{estimate}");
    }

    #[test]
    fn confidence_upper_bound_shrinks_with_data() {
        let mut t = RatioTest::new(1.2);
        assert_eq!(t.upper_bound(0.05), None);
        feed(&mut t, 5, 1000, 0.5, 0.02, 1.0);
        let early = t.upper_bound(0.05).unwrap();
        feed(&mut t, 100, 1000, 0.5, 0.02, 1.0);
        let late = t.upper_bound(0.05).unwrap();
        assert!(late < early, "{late} !< {early}");
        assert!((1.0..1.5).contains(&late), "{late}");
    }

    #[test]
    fn intervals_with_one_version_or_no_events_carry_no_information() {
        let mut t = RatioTest::new(1.2);
        t.update(5, 100, 0, 0);
        t.update(0, 0, 5, 100);
        t.update(0, 100, 0, 100);
        assert_eq!(t.log_likelihood, vec![0.0; 61]);
        assert_eq!(t.canary_requests, 200);
        t.update(500, 100, 0, 100); // inconsistent counts are clamped, not trusted
        assert_eq!(t.canary_events, 5 + 100);
    }

    #[test]
    fn max_evidence_makes_the_p_value_anytime_valid() {
        let mut t = RatioTest::new(1.0);
        feed(&mut t, 5, 1000, 0.5, 0.01, 3.0);
        let peak = t.max_log_evidence;
        feed(&mut t, 50, 1000, 0.5, 0.01, 0.5);
        assert!(t.log_evidence() < peak);
        assert_eq!(t.max_log_evidence, peak);
    }
}
