//! Judging one analysis interval: the canary's traffic against the spec's metric thresholds.
//!
//! The result is a [`AnalysisReport`] that carries every number it was based on and a one-line
//! human reason, so the status API, the logs and the tests can all say *why*.

use crate::observe::Observation;
use crate::spec::{AnalysisSpec, MetricKind, ThresholdRange};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    /// Every check passed.
    Pass,
    /// At least one check failed: counts towards the rollback threshold.
    Fail,
    /// Not enough data to judge: the rollout halts; never a reason to promote.
    NoData,
}

/// The outcome of one metric check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MetricCheck {
    pub name: String,
    /// The canary's value (percent for success rate, milliseconds for duration).
    pub value: Option<f64>,
    /// The stable version's value over the same interval, for comparison.
    pub stable_value: Option<f64>,
    pub threshold: ThresholdRange,
    pub verdict: Verdict,
    pub reason: String,
}

/// The judgement of one interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AnalysisReport {
    pub verdict: Verdict,
    pub canary_requests: u64,
    pub stable_requests: u64,
    pub checks: Vec<MetricCheck>,
    pub reason: String,
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Judge one interval's observation against `spec`.
pub fn evaluate(spec: &AnalysisSpec, obs: &Observation) -> AnalysisReport {
    let canary_requests = obs.canary.requests();
    let stable_requests = obs.stable.requests();
    if canary_requests < spec.min_canary_requests {
        return AnalysisReport {
            verdict: Verdict::NoData,
            canary_requests,
            stable_requests,
            checks: Vec::new(),
            reason: format!(
                "canary receives no traffic: {canary_requests} canary requests in the last interval, below minCanaryRequests {} (stable got {stable_requests})",
                spec.min_canary_requests
            ),
        };
    }
    let checks: Vec<MetricCheck> = spec
        .metrics
        .iter()
        .filter_map(|metric| {
            let kind = metric.kind()?;
            let (value, stable_value, what) = match kind {
                MetricKind::Custom => (
                    obs.custom
                        .get(&metric.name)
                        .copied()
                        .filter(|v| v.is_finite()),
                    None,
                    metric.name.clone(),
                ),
                MetricKind::SuccessRate => (
                    obs.canary.success_rate_percent(),
                    obs.stable.success_rate_percent(),
                    "success rate".to_string(),
                ),
                MetricKind::Duration { quantile } => (
                    obs.canary.latency.quantile(quantile),
                    obs.stable.latency.quantile(quantile),
                    format!("p{} latency", round2(quantile * 100.0)),
                ),
            };
            let unit = match kind {
                MetricKind::SuccessRate => "%",
                MetricKind::Duration { .. } => " ms",
                MetricKind::Custom => "",
            };
            let range = metric.threshold_range;
            let (verdict, reason) = match value {
                None => (
                    Verdict::NoData,
                    format!("no canary {what} data in this interval"),
                ),
                Some(v) if range.contains(v) => (
                    Verdict::Pass,
                    format!("canary {what} {}{unit} within {range}", round2(v)),
                ),
                Some(v) => (
                    Verdict::Fail,
                    format!(
                        "canary {what} {}{unit} outside {range}{}",
                        round2(v),
                        stable_value
                            .map(|s| format!(" (stable {}{unit})", round2(s)))
                            .unwrap_or_default()
                    ),
                ),
            };
            Some(MetricCheck {
                name: metric.name.clone(),
                value: value.map(round2),
                stable_value: stable_value.map(round2),
                threshold: range,
                verdict,
                reason,
            })
        })
        .collect();

    let failed: Vec<&str> = checks
        .iter()
        .filter(|c| c.verdict == Verdict::Fail)
        .map(|c| c.reason.as_str())
        .collect();
    let missing: Vec<&str> = checks
        .iter()
        .filter(|c| c.verdict == Verdict::NoData)
        .map(|c| c.reason.as_str())
        .collect();
    let (verdict, reason) = if !failed.is_empty() {
        (Verdict::Fail, failed.join("; "))
    } else if !missing.is_empty() {
        (Verdict::NoData, missing.join("; "))
    } else {
        (
            Verdict::Pass,
            format!("all checks passed over {canary_requests} canary requests"),
        )
    };
    AnalysisReport {
        verdict,
        canary_requests,
        stable_requests,
        checks,
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::ResponseClass;
    use crate::observe::{LatencyHistogram, SubsetTraffic};
    use crate::spec::tests::example;

    /// Traffic with `ok` 2xx, `err` 5xx and `slow` of all requests above 500 ms (rest ≤ 50 ms).
    fn traffic(ok: u64, err: u64, slow: u64) -> SubsetTraffic {
        let total = ok + err;
        let mut t = SubsetTraffic {
            latency: LatencyHistogram {
                bounds_ms: vec![50.0, 500.0, 1000.0],
                cumulative: vec![total - slow, total - slow, total],
                count: total,
                sum_ms: 0.0,
            },
            ..Default::default()
        };
        t.add(ResponseClass::Success, ok);
        t.add(ResponseClass::ServerError, err);
        t
    }

    fn obs(canary: SubsetTraffic) -> Observation {
        Observation {
            stable: traffic(1000, 0, 0),
            canary,
            custom: Default::default(),
        }
    }

    #[test]
    fn verdict_table() {
        let spec = example().spec.analysis; // min 10 requests, success >= 99, p99 <= 500 ms
        let cases: &[(&str, SubsetTraffic, Verdict, &str)] = &[
            (
                "healthy",
                traffic(200, 0, 0),
                Verdict::Pass,
                "all checks passed over 200",
            ),
            (
                "exactly 99%",
                traffic(99, 1, 0),
                Verdict::Pass,
                "all checks passed",
            ),
            (
                "errors",
                traffic(80, 20, 0),
                Verdict::Fail,
                "canary success rate 80% outside >= 99",
            ),
            (
                "slow tail",
                traffic(100, 0, 5),
                Verdict::Fail,
                "canary p99 latency",
            ),
            (
                "no traffic",
                traffic(3, 0, 0),
                Verdict::NoData,
                "canary receives no traffic: 3 canary requests",
            ),
            (
                "zero",
                SubsetTraffic::default(),
                Verdict::NoData,
                "canary receives no traffic",
            ),
        ];
        for (name, canary, verdict, reason) in cases {
            let report = evaluate(&spec, &obs(canary.clone()));
            assert_eq!(report.verdict, *verdict, "{name}: {report:?}");
            assert!(report.reason.contains(reason), "{name}: {}", report.reason);
        }
    }

    #[test]
    fn failed_check_reports_value_threshold_and_stable() {
        let spec = example().spec.analysis;
        let report = evaluate(&spec, &obs(traffic(80, 20, 0)));
        let check = &report.checks[0];
        assert_eq!(check.name, "request-success-rate");
        assert_eq!(check.value, Some(80.0));
        assert_eq!(check.stable_value, Some(100.0));
        assert_eq!(check.threshold.min, Some(99.0));
        assert_eq!(check.verdict, Verdict::Fail);
        assert_eq!(report.checks[1].verdict, Verdict::Pass);
    }

    #[test]
    fn missing_latency_data_is_no_data_not_a_pass() {
        let spec = example().spec.analysis;
        let mut canary = traffic(100, 0, 0);
        canary.latency = LatencyHistogram::default();
        let report = evaluate(&spec, &obs(canary));
        assert_eq!(report.verdict, Verdict::NoData);
        assert!(
            report.reason.contains("no canary p99 latency data"),
            "{}",
            report.reason
        );
    }

    #[test]
    fn failure_wins_over_missing_data() {
        let spec = example().spec.analysis;
        let mut canary = traffic(50, 50, 0);
        canary.latency = LatencyHistogram::default();
        assert_eq!(evaluate(&spec, &obs(canary)).verdict, Verdict::Fail);
    }

    #[test]
    fn custom_metric_values_are_judged_and_missing_ones_are_no_data() {
        let mut spec = example().spec.analysis;
        spec.metrics = vec![crate::spec::MetricSpec {
            name: "burn".into(),
            threshold_range: ThresholdRange {
                min: None,
                max: Some(1.0),
            },
            quantile: None,
            query: Some("x".into()),
        }];
        let mut o = obs(traffic(100, 0, 0));
        assert_eq!(evaluate(&spec, &o).verdict, Verdict::NoData);
        o.custom.insert("burn".into(), 0.4);
        assert_eq!(evaluate(&spec, &o).verdict, Verdict::Pass);
        o.custom.insert("burn".into(), 2.5);
        let report = evaluate(&spec, &o);
        assert_eq!(report.verdict, Verdict::Fail);
        assert!(
            report.reason.contains("canary burn 2.5 outside <= 1"),
            "{}",
            report.reason
        );
        o.custom.insert("burn".into(), f64::NAN);
        assert_eq!(evaluate(&spec, &o).verdict, Verdict::NoData);
    }

    #[test]
    fn no_metrics_means_traffic_check_only() {
        let mut spec = example().spec.analysis;
        spec.metrics.clear();
        assert_eq!(
            evaluate(&spec, &obs(traffic(50, 50, 0))).verdict,
            Verdict::Pass
        );
        assert_eq!(
            evaluate(&spec, &obs(traffic(1, 0, 0))).verdict,
            Verdict::NoData
        );
    }
}
