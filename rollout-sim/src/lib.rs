//! # fledge-rollout-sim — seeded rollout simulations
//!
//! Simulates canary rollouts with a known truth and runs them through the *same* pure code the
//! controller runs (`fledge_core::rollout::step`), one analysis interval at a time:
//!
//! ```text
//! TrafficModel (rate, daily swing, error rates, log-normal latency)
//!     │ seeded draws per interval: requests ~ Poisson, canary share ~ Binomial(weight),
//!     │ errors ~ Binomial, latency → Envoy's default histogram buckets
//!     ▼
//! Observation ──▶ policy (core state machine with a spec, or a baseline test) ──▶ weight / verdict
//! ```
//!
//! Used by the `fledge-bench-decisions` benchmark (`make bench-decisions`) to compare Fledge's
//! sequential policy with a Flagger-style per-interval threshold policy and a repeated
//! fixed-sample test.

#![forbid(unsafe_code)]

use chrono::{DateTime, TimeZone, Utc};
use fledge_core::contract::ResponseClass;
use fledge_core::observe::{LatencyHistogram, Observation, SubsetTraffic};
use fledge_core::rollout::{self, CanaryStatus, Input, Phase};
use fledge_core::spec::Canary;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Binomial, Distribution, Poisson};

/// Analysis interval of every simulated rollout, in seconds (Fledge's default).
pub const INTERVAL_SECONDS: i64 = 30;
/// Minutes each weight (5%, 20%, 50%) is held before promotion.
pub const MINUTES_PER_STEP: i64 = 120;
/// Weights of the simulated schedule.
pub const WEIGHTS: [u8; 3] = [5, 20, 50];
/// Simulations stop here (a little past the schedule, so halts can catch up).
pub const HORIZON_MINUTES: i64 = 420;
const INTERVALS: i64 = HORIZON_MINUTES * 60 / INTERVAL_SECONDS;

fn minutes_of(interval: i64) -> f64 {
    (interval * INTERVAL_SECONDS) as f64 / 60.0
}
/// Period of the simulated daily swing, compressed so one rollout sees a whole cycle.
pub const SWING_PERIOD_MINUTES: f64 = 360.0;
/// Envoy's default histogram buckets (ms).
pub const ENVOY_BUCKETS_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// The truth of one simulated world.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrafficModel {
    /// Mean requests per minute (stable + canary) before the swing.
    pub requests_per_minute: f64,
    /// Stable error rate before the swing.
    pub base_error_rate: f64,
    /// Canary error rate ÷ stable error rate.
    pub error_ratio: f64,
    /// Canary latency ÷ stable latency (log-normal scale factor).
    pub latency_factor: f64,
    /// Median latency of stable (ms) and the log-normal σ.
    pub median_ms: f64,
    pub sigma: f64,
}

impl TrafficModel {
    pub fn healthy(requests_per_minute: f64) -> Self {
        TrafficModel {
            requests_per_minute,
            base_error_rate: 0.01,
            error_ratio: 1.0,
            latency_factor: 1.0,
            median_ms: 100.0,
            sigma: 0.6,
        }
    }
}

/// Standard normal CDF (Abramowitz–Stegun 7.1.26 erf, |error| < 1.5e-7).
fn normal_cdf(x: f64) -> f64 {
    let z = x / std::f64::consts::SQRT_2;
    let t = 1.0 / (1.0 + 0.327_591_1 * z.abs());
    let poly = t
        * (0.254_829_592
            + t * (-0.284_496_736
                + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
    let erf = 1.0 - poly * (-z * z).exp();
    let erf = if z >= 0.0 { erf } else { -erf };
    0.5 * (1.0 + erf)
}

/// P(latency ≤ bound) for each Envoy bucket of a log-normal latency.
fn bucket_cdf(median_ms: f64, sigma: f64) -> Vec<f64> {
    ENVOY_BUCKETS_MS
        .iter()
        .map(|b| normal_cdf((b / median_ms).ln() / sigma))
        .collect()
}

fn binomial(rng: &mut ChaCha8Rng, n: u64, p: f64) -> u64 {
    if n == 0 || p <= 0.0 {
        return 0;
    }
    if p >= 1.0 {
        return n;
    }
    Binomial::new(n, p).map(|d| d.sample(rng)).unwrap_or(0)
}

fn poisson(rng: &mut ChaCha8Rng, mean: f64) -> u64 {
    if mean <= 0.0 {
        return 0;
    }
    Poisson::new(mean)
        .map(|d| d.sample(rng) as u64)
        .unwrap_or(0)
}

/// `n` requests spread over the buckets (a multinomial drawn as successive binomials).
fn histogram(rng: &mut ChaCha8Rng, n: u64, cdf: &[f64], median_ms: f64) -> LatencyHistogram {
    let mut cumulative = Vec::with_capacity(cdf.len());
    let mut below = 0u64;
    let mut previous = 0.0;
    for p in cdf {
        let remaining = n - below;
        let conditional = if previous >= 1.0 {
            0.0
        } else {
            ((p - previous) / (1.0 - previous)).clamp(0.0, 1.0)
        };
        below += binomial(rng, remaining, conditional);
        cumulative.push(below);
        previous = *p;
    }
    LatencyHistogram {
        bounds_ms: ENVOY_BUCKETS_MS.to_vec(),
        cumulative,
        count: n,
        sum_ms: n as f64 * median_ms,
    }
}

fn subset(
    rng: &mut ChaCha8Rng,
    requests: u64,
    error_rate: f64,
    cdf: &[f64],
    median_ms: f64,
) -> SubsetTraffic {
    let errors = binomial(rng, requests, error_rate.min(1.0));
    let mut traffic = SubsetTraffic {
        latency: histogram(rng, requests, cdf, median_ms),
        ..Default::default()
    };
    traffic.add(ResponseClass::Success, requests - errors);
    traffic.add(ResponseClass::ServerError, errors);
    traffic
}

/// Draws the traffic of successive intervals of one simulated rollout.
pub struct World {
    model: TrafficModel,
    rng: ChaCha8Rng,
    stable_cdf: Vec<f64>,
    canary_cdf: Vec<f64>,
}

impl World {
    pub fn new(model: TrafficModel, seed: u64) -> Self {
        World {
            model,
            rng: ChaCha8Rng::seed_from_u64(seed),
            stable_cdf: bucket_cdf(model.median_ms, model.sigma),
            canary_cdf: bucket_cdf(model.median_ms * model.latency_factor, model.sigma),
        }
    }

    /// Traffic of the `index`-th interval with `canary_weight` percent to the canary.
    /// Volume swings ±50% and the error rate ±50% (out of phase) over a compressed "day".
    pub fn interval(&mut self, index: i64, canary_weight: u8) -> Observation {
        let phase = 2.0 * std::f64::consts::PI * minutes_of(index) / SWING_PERIOD_MINUTES;
        let volume = self.model.requests_per_minute * INTERVAL_SECONDS as f64 / 60.0
            * (1.0 + 0.5 * phase.sin());
        let error_rate = self.model.base_error_rate * (1.0 + 0.5 * (phase + 1.0).sin());
        let total = poisson(&mut self.rng, volume);
        let canary_requests = binomial(&mut self.rng, total, f64::from(canary_weight) / 100.0);
        let median = self.model.median_ms;
        let stable = subset(
            &mut self.rng,
            total - canary_requests,
            error_rate,
            &self.stable_cdf,
            median,
        );
        let canary = subset(
            &mut self.rng,
            canary_requests,
            error_rate * self.model.error_ratio,
            &self.canary_cdf,
            median * self.model.latency_factor,
        );
        Observation {
            stable,
            canary,
            ..Default::default()
        }
    }
}

/// How one simulated rollout ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub rolled_back: bool,
    pub promoted: bool,
    /// Canary requests served until the decision (or the horizon).
    pub canary_requests: u64,
    /// Minutes until the decision (or the horizon).
    pub minutes: f64,
    /// The rollback reason, if any.
    pub reason: String,
}

/// A way of deciding a rollout.
pub trait Policy: Sync {
    fn name(&self) -> &str;
    fn run(&self, model: TrafficModel, seed: u64) -> Outcome;
}

fn at_interval(i: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_700_000_000 + i * INTERVAL_SECONDS, 0)
        .single()
        .unwrap_or_default()
}

/// Any Canary spec, run through `fledge_core::rollout::step` — the controller's code.
pub struct CorePolicy {
    pub name: String,
    pub canary: Canary,
}

impl CorePolicy {
    /// A policy from the `analysis:` part of a spec (the rest is filled in).
    pub fn from_analysis_yaml(name: &str, analysis: &str) -> Result<Self, String> {
        let indented: String = analysis.lines().map(|l| format!("    {l}\n")).collect();
        let yaml = format!(
            "apiVersion: fledge.dev/v1alpha1
kind: Canary
metadata: {{name: sim}}
spec:
  service: app
  stable: {{subset: stable}}
  canary: {{subset: canary}}
  metricsSource: {{envoyAdmin: {{urls: [\"http://127.0.0.1:9901\"]}}}}
  router:
    envoyRds: {{path: /dev/null, routeConfiguration: r, virtualHost: v, route: r,
               stableCluster: s, canaryCluster: c, adminUrl: \"http://127.0.0.1:9901\"}}
  analysis:
{indented}"
        );
        let canary: Canary = serde_yaml::from_str(&yaml).map_err(|e| e.to_string())?;
        canary.validate().map_err(|e| e.to_string())?;
        Ok(CorePolicy {
            name: name.to_string(),
            canary,
        })
    }
}

/// The simulated schedule as spec steps: each weight held for [`MINUTES_PER_STEP`].
pub fn schedule_yaml() -> String {
    let steps: Vec<String> = WEIGHTS
        .iter()
        .map(|w| {
            format!(
                "{{setWeight: {w}}}, {{pause: {{duration: {}s}}}}",
                MINUTES_PER_STEP * 60 - INTERVAL_SECONDS
            )
        })
        .collect();
    format!(
        "interval: {INTERVAL_SECONDS}s\nsteps: [{}]\n",
        steps.join(", ")
    )
}

impl Policy for CorePolicy {
    fn name(&self) -> &str {
        &self.name
    }

    fn run(&self, model: TrafficModel, seed: u64) -> Outcome {
        let mut world = World::new(model, seed);
        let spec = &self.canary.spec;
        let mut status = CanaryStatus::default();
        let mut canary_requests = 0u64;
        // The first call only initializes (the controller's baseline tick).
        status = rollout::step(spec, &status, &Input::default(), at_interval(0)).status;
        for i in 1..=INTERVALS {
            let observation = world.interval(i, status.canary_weight);
            canary_requests += observation.canary.requests();
            let input = Input {
                observation: Some(Ok(observation)),
                command: None,
            };
            status = rollout::step(spec, &status, &input, at_interval(i)).status;
            if status.phase.is_terminal() {
                return Outcome {
                    rolled_back: status.phase == Phase::RolledBack,
                    promoted: status.phase == Phase::Promoted,
                    canary_requests,
                    minutes: minutes_of(i),
                    reason: status.message,
                };
            }
        }
        Outcome {
            rolled_back: false,
            promoted: false,
            canary_requests,
            minutes: HORIZON_MINUTES as f64,
            reason: status.message,
        }
    }
}

/// The classic mistake: a one-sided two-proportion z-test on all data so far, repeated every
/// interval ("peeking"), on errors and on the share of requests slower than 250 ms.
pub struct RepeatedZTest {
    /// One-sided critical value (1.645 for 5%).
    pub critical_z: f64,
}

fn z_greater(events_c: u64, n_c: u64, events_b: u64, n_b: u64) -> f64 {
    if n_c == 0 || n_b == 0 {
        return 0.0;
    }
    let (nc, nb) = (n_c as f64, n_b as f64);
    let pooled = (events_c + events_b) as f64 / (nc + nb);
    let se = (pooled * (1.0 - pooled) * (1.0 / nc + 1.0 / nb)).sqrt();
    if se == 0.0 {
        return 0.0;
    }
    (events_c as f64 / nc - events_b as f64 / nb) / se
}

impl Policy for RepeatedZTest {
    fn name(&self) -> &str {
        "repeated z-test"
    }

    fn run(&self, model: TrafficModel, seed: u64) -> Outcome {
        let mut world = World::new(model, seed);
        let mut totals = [0u64; 6]; // canary n, canary err, canary slow, stable n, err, slow
        for i in 1..=INTERVALS {
            let step = ((i - 1) * INTERVAL_SECONDS / 60 / MINUTES_PER_STEP) as usize;
            let Some(weight) = WEIGHTS.get(step) else {
                return Outcome {
                    rolled_back: false,
                    promoted: true,
                    canary_requests: totals[0],
                    minutes: minutes_of(i),
                    reason: String::new(),
                };
            };
            let o = world.interval(i, *weight);
            totals[0] += o.canary.requests();
            totals[1] += o.canary.failures();
            totals[2] += o.canary.latency.slower_than(250.0).unwrap_or(0);
            totals[3] += o.stable.requests();
            totals[4] += o.stable.failures();
            totals[5] += o.stable.latency.slower_than(250.0).unwrap_or(0);
            let errors = z_greater(totals[1], totals[0], totals[4], totals[3]);
            let slow = z_greater(totals[2], totals[0], totals[5], totals[3]);
            if errors > self.critical_z || slow > self.critical_z {
                return Outcome {
                    rolled_back: true,
                    promoted: false,
                    canary_requests: totals[0],
                    minutes: minutes_of(i),
                    reason: if errors > self.critical_z {
                        "errors".into()
                    } else {
                        "latency".into()
                    },
                };
            }
        }
        Outcome {
            rolled_back: false,
            promoted: false,
            canary_requests: totals[0],
            minutes: HORIZON_MINUTES as f64,
            reason: String::new(),
        }
    }
}

/// Summary of many runs of one policy in one world.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub runs: usize,
    pub rolled_back: usize,
    pub promoted: usize,
    /// Rollbacks whose reason mentions latency.
    pub latency_rollbacks: usize,
    /// Median canary requests / minutes to a rollback, counting runs without one as never
    /// (`None` when fewer than half the runs rolled back).
    pub median_requests_to_rollback: Option<u64>,
    pub median_minutes_to_rollback: Option<f64>,
}

fn median_or_never<T: Copy + PartialOrd>(mut detected: Vec<T>, runs: usize) -> Option<T> {
    detected.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    // Runs without a rollback sort last ("never"); the median exists only if it is detected.
    let middle = runs / 2;
    detected.get(middle).copied()
}

/// Run `runs` seeded simulations on `threads` threads; deterministic for given seeds.
pub fn simulate(
    policy: &dyn Policy,
    model: TrafficModel,
    runs: usize,
    seed: u64,
    threads: usize,
) -> Summary {
    let threads = threads.max(1);
    let outcomes: Vec<Outcome> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                scope.spawn(move || {
                    (t..runs)
                        .step_by(threads)
                        .map(|i| {
                            policy.run(model, seed.wrapping_mul(1_000_003).wrapping_add(i as u64))
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    });
    let rolled: Vec<&Outcome> = outcomes.iter().filter(|o| o.rolled_back).collect();
    Summary {
        runs: outcomes.len(),
        rolled_back: rolled.len(),
        promoted: outcomes.iter().filter(|o| o.promoted).count(),
        latency_rollbacks: rolled
            .iter()
            .filter(|o| o.reason.contains("latency") || o.reason.contains("slower than"))
            .count(),
        median_requests_to_rollback: median_or_never(
            rolled.iter().map(|o| o.canary_requests).collect(),
            outcomes.len(),
        ),
        median_minutes_to_rollback: median_or_never(
            rolled.iter().map(|o| o.minutes).collect(),
            outcomes.len(),
        ),
    }
}

/// Fledge's recommended policy: sequential canary-vs-stable tests only.
pub fn fledge_policy() -> CorePolicy {
    let analysis = format!(
        "{}threshold: 5\nminCanaryRequests: 0\ncompareWithStable: {{}}\n",
        schedule_yaml()
    );
    CorePolicy::from_analysis_yaml("fledge (sequential)", &analysis)
        .unwrap_or_else(|e| panic!("built-in spec: {e}"))
}

/// Flagger's defaults: success rate ≥ 99% and p99 ≤ 500 ms per interval, 5 failed checks.
pub fn flagger_policy() -> CorePolicy {
    let analysis = format!(
        "{}threshold: 5\nminCanaryRequests: 0\nmetrics:\n  - {{name: request-success-rate, thresholdRange: {{min: 99}}}}\n  - {{name: request-duration, quantile: 0.99, thresholdRange: {{max: 500}}}}\n",
        schedule_yaml()
    );
    CorePolicy::from_analysis_yaml("flagger-style thresholds", &analysis)
        .unwrap_or_else(|e| panic!("built-in spec: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_cdf_matches_known_values() {
        for (x, want) in [
            (0.0, 0.5),
            (1.0, 0.841_344_7),
            (-1.96, 0.024_997_9),
            (2.326, 0.989_99),
        ] {
            assert!((normal_cdf(x) - want).abs() < 1e-4, "{x}");
        }
    }

    #[test]
    fn world_draws_are_seeded_and_plausible() {
        let model = TrafficModel::healthy(10_000.0);
        let a = World::new(model, 1).interval(10, 20);
        let b = World::new(model, 1).interval(10, 20);
        assert_eq!(a, b);
        let share = a.canary_share().unwrap();
        assert!((0.18..0.22).contains(&share), "{share}");
        // Median 100 ms: about half the requests are slower than 100 ms.
        let slow =
            a.stable.latency.slower_than(100.0).unwrap() as f64 / a.stable.latency.count as f64;
        assert!((0.45..0.55).contains(&slow), "{slow}");
        let errors = a.stable.failures() as f64 / a.stable.requests() as f64;
        assert!((0.003..0.03).contains(&errors), "{errors}");
    }

    #[test]
    fn fledge_catches_a_5x_regression_and_spares_healthy_canaries() {
        let fledge = fledge_policy();
        let bad = TrafficModel {
            error_ratio: 5.0,
            ..TrafficModel::healthy(1000.0)
        };
        let s = simulate(&fledge, bad, 20, 7, 2);
        assert!(s.rolled_back >= 19, "{s:?}");
        let healthy = simulate(&fledge, TrafficModel::healthy(1000.0), 20, 7, 2);
        assert!(healthy.rolled_back <= 1, "{healthy:?}");
        assert!(healthy.promoted >= 19, "{healthy:?}");
    }

    #[test]
    fn median_counts_misses_as_never() {
        assert_eq!(median_or_never(vec![5, 1, 3], 3), Some(3));
        assert_eq!(median_or_never(vec![5, 1], 4), None);
        assert_eq!(median_or_never(vec![5, 1, 9], 4), None.or(Some(9)));
    }
}
