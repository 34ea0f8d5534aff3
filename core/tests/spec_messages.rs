//! Bad specs and the exact message each gets: the field, the problem with its unit, and the
//! fix. One table for every rule of docs/spec.md ("Units", "Checks", "Thresholds", "Weights"),
//! and one for the warnings a valid spec gets.

use fledge_core::spec::Canary;
use fledge_core::warning::spec_warnings;

/// A valid spec with every kind of check; each case edits one line of it.
const BASE: &str = r#"
apiVersion: fledge.dev/v1alpha1
kind: Canary
metadata: {name: checkout}
spec:
  service: checkout
  stable: {subset: stable}
  canary: {subset: canary}
  metricsSource:
    envoyAdmin: {urls: ["http://127.0.0.1:9901"]}
  router:
    istio: {virtualService: checkout, route: primary, mirrorPercentage: 10}
  analysis:
    interval: 30s
    threshold: 5
    steps:
      - setWeight: 20
      - pause: {duration: 5m}
      - setWeight: 40
    compareWithStable: {}
    sloBurnRate: {objective: 99.5}
    guard: {maxErrorRatio: 0.5}
    metrics:
      - {name: request-success-rate, thresholdRange: {min: 99}}
      - {name: request-duration, quantile: 0.99, thresholdRange: {max: 500}}
"#;

fn edited(from: &str, to: &str) -> String {
    assert!(BASE.contains(from), "the base spec has no {from:?}");
    BASE.replace(from, to)
}

/// Every message of one spec: parse errors (YAML/serde, with the field's path in front) or
/// validation errors, one per line.
fn messages(yaml: &str) -> Vec<String> {
    match serde_yaml::from_str::<Canary>(yaml) {
        Err(e) => vec![e.to_string()],
        Ok(canary) => match canary.validate() {
            Ok(()) => vec![],
            Err(errors) => errors.0.iter().map(|e| e.to_string()).collect(),
        },
    }
}

#[test]
fn the_base_spec_is_valid_without_warnings() {
    assert_eq!(messages(BASE), Vec::<String>::new());
    let canary: Canary = serde_yaml::from_str(BASE).unwrap();
    assert_eq!(spec_warnings(&canary), vec![]);
}

#[test]
fn bad_specs_get_the_field_the_unit_and_the_fix() {
    let cases: &[(&str, &str, &str)] = &[
        // -- One rule for fractions: percent fields refuse 0 < v <= 1 ...
        (
            "thresholdRange: {min: 99}",
            "thresholdRange: {min: 0.9}",
            "spec.analysis.metrics[0].thresholdRange.min: 0.9 looks like a fraction, but request-success-rate (the share of requests that are not errors) is in percent (0-100); did you mean 90 (%)? write `min: 90`",
        ),
        (
            "thresholdRange: {min: 99}",
            "thresholdRange: {above: 0.9}",
            "spec.analysis.metrics[0].thresholdRange.above: 0.9 looks like a fraction, but request-success-rate (the share of requests that are not errors) is in percent (0-100); did you mean 90 (%)? write `above: 90`",
        ),
        (
            "sloBurnRate: {objective: 99.5}",
            "sloBurnRate: {objective: 0.8}",
            "spec.analysis.sloBurnRate.objective: 0.8 looks like a fraction, but the objective is in percent (0-100); did you mean 80 (%)? write `objective: 80`",
        ),
        (
            "sloBurnRate: {objective: 99.5}",
            "sloBurnRate: {objective: 0.999}",
            "spec.analysis.sloBurnRate.objective: 0.999 looks like a fraction, but the objective is in percent (0-100); did you mean 99.9 (%)? write `objective: 99.9`",
        ),
        (
            "mirrorPercentage: 10",
            "mirrorPercentage: 0.1",
            "spec.router.istio.mirrorPercentage: 0.1 looks like a fraction, but mirrorPercentage is in percent (0-100); did you mean 10 (%)? write `mirrorPercentage: 10`",
        ),
        (
            "thresholdRange: {min: 99}",
            "thresholdRange: {min: 990}",
            "spec.analysis.metrics[0].thresholdRange.min: 990 % is not a percentage from 0 to 100; write request-success-rate (the share of requests that are not errors) in percent, e.g. `min: 99`",
        ),
        // ... and fraction fields refuse what looks like a percentage.
        (
            "quantile: 0.99",
            "quantile: 99",
            "spec.analysis.metrics[1].quantile: 99 looks like a percentage, but quantile is a fraction (above 0, below 1); did you mean 0.99? write `quantile: 0.99`",
        ),
        (
            "compareWithStable: {}",
            "compareWithStable: {falseRollbackRate: 3}",
            "spec.analysis.compareWithStable.falseRollbackRate: 3 looks like a percentage, but falseRollbackRate (a probability) is a fraction (above 0, below 0.5); did you mean 0.03? write `falseRollbackRate: 0.03`",
        ),
        (
            "guard: {maxErrorRatio: 0.5}",
            "guard: {maxErrorRatio: 50}",
            "spec.analysis.guard.maxErrorRatio: 50 looks like a percentage, but maxErrorRatio (the share of failed canary requests that trips the guard) is a fraction (above 0, at most 1); did you mean 0.5? write `maxErrorRatio: 0.5`",
        ),
        (
            "guard: {maxErrorRatio: 0.5}",
            "guard: {maxErrorRatio: -1}",
            "spec.analysis.guard.maxErrorRatio: -1 is not a fraction above 0, at most 1; write maxErrorRatio (the share of failed canary requests that trips the guard) as a fraction, e.g. `maxErrorRatio: 0.5`",
        ),
        // Latencies are milliseconds.
        (
            "thresholdRange: {max: 500}",
            "thresholdRange: {max: 0.5}",
            "spec.analysis.metrics[1].thresholdRange.max: 0.5 ms is below the 1 ms resolution of Envoy's latency histograms; request-duration is in milliseconds; did you mean 500 (ms)? write `max: 500`",
        ),
        // Multipliers say so.
        (
            "compareWithStable: {}",
            "compareWithStable: {tolerance: 0.5}",
            "spec.analysis.compareWithStable.tolerance: 0.5× is not a multiplier between 1 and 10; write how many times the stable's rate is acceptable, e.g. `tolerance: 1.2` (up to 20% worse)",
        ),
        // -- A spec with no enforced check is an error (unless `unchecked: true`).
        (
            "    compareWithStable: {}\n    sloBurnRate: {objective: 99.5}\n    guard: {maxErrorRatio: 0.5}\n    metrics:\n      - {name: request-success-rate, thresholdRange: {min: 99}}\n      - {name: request-duration, quantile: 0.99, thresholdRange: {max: 500}}\n",
            "    guard: {maxErrorRatio: 0.5}\n",
            "spec.analysis: has no checks: nothing would stop a failing canary from being promoted (the guard and webhooks alone do not judge it); add `compareWithStable: {}` (canary vs stable), `metrics: [{name: request-success-rate, thresholdRange: {min: 99}}]` or `sloBurnRate: {objective: 99.9}`; or write `unchecked: true` to promote on traffic alone",
        ),
        // -- Built-in metrics count the statuses the operator calls bad.
        (
            "interval: 30s",
            "interval: 30s\n    errorStatuses: [4xx]",
            "spec.analysis.errorStatuses: does not list 5xx: server errors would count as good requests; list 5xx and what else is bad, e.g. `errorStatuses: [5xx, 4xx]`",
        ),
        (
            "interval: 30s",
            "interval: 30s\n    errorStatuses: [5xx, 2xx]",
            "spec.analysis.errorStatuses[1]: 2xx cannot be an error status; list only 3xx, 4xx and 5xx (no response always counts), e.g. `errorStatuses: [5xx, 4xx]`",
        ),
        // -- Thresholds: strict bounds, Argo's failureLimit next to threshold.
        (
            "thresholdRange: {min: 99}",
            "thresholdRange: {min: 99, above: 98}",
            "spec.analysis.metrics[0].thresholdRange.above: is set together with min; keep one: `min` is inclusive, `above` is strict",
        ),
        (
            "thresholdRange: {max: 500}",
            "thresholdRange: {above: 500, below: 500}",
            "spec.analysis.metrics[1].thresholdRange: no value passes: > 500 ms and < 500 ms; swap the bounds or drop one",
        ),
        (
            "thresholdRange: {min: 99}",
            "thresholdRange: {}",
            "spec.analysis.metrics[0].thresholdRange: has no bound; set one, e.g. `thresholdRange: {min: 99}` (inclusive) or `{above: 99}` (strict)",
        ),
        (
            "threshold: 5",
            "threshold: 5\n    failureLimit: 3",
            "spec.analysis.failureLimit: is set together with threshold (5 failed intervals); keep one: `failureLimit: 3` (Argo: failures tolerated) is `threshold: 4` (Flagger: failures that roll back)",
        ),
        (
            "threshold: 5",
            "threshold: 0",
            "spec.analysis.threshold: must be at least 1 (failed intervals that roll back); write the number of failed intervals that triggers a rollback, e.g. `threshold: 5` (or Argo's `failureLimit: 0` to roll back at the first failure)",
        ),
        // -- Weights: whole percentages from 0 to 100.
        (
            "- setWeight: 20",
            "- setWeight: -5",
            "spec.analysis.steps[0].setWeight: -5 is not a whole percentage of traffic from 0 to 100; write e.g. `20` for 20% of requests to the canary at line 17 column 20",
        ),
        (
            "- setWeight: 20",
            "- setWeight: 0.2",
            "spec.analysis.steps[0].setWeight: 0.2 looks like a fraction, but weights are whole percentages of traffic (0-100): did you mean 20 (%)? at line 17 column 20",
        ),
        (
            "- setWeight: 20",
            "- setWeight: 120",
            "spec.analysis.steps[0].setWeight: 120 % is above 100; write a whole percentage of traffic from 0 to 100, e.g. `setWeight: 20`",
        ),
        (
            "    steps:\n      - setWeight: 20\n      - pause: {duration: 5m}\n      - setWeight: 40\n",
            "    stepWeights: [10, 150]\n",
            "spec.analysis.stepWeights[1]: 150 % is above 100; write a whole percentage of traffic from 0 to 100",
        ),
        (
            "    steps:\n      - setWeight: 20\n      - pause: {duration: 5m}\n      - setWeight: 40\n",
            "    stepWeights: [10, -20]\n",
            "spec.analysis.stepWeights[1]: -20 is not a whole percentage of traffic from 0 to 100; write e.g. `20` for 20% of requests to the canary at line 16 column 23",
        ),
        (
            "    steps:\n      - setWeight: 20\n      - pause: {duration: 5m}\n      - setWeight: 40\n",
            "    stepWeight: 50\n    maxWeight: 40\n",
            "spec.analysis.maxWeight: 40 % is not between stepWeight (50 %) and 100 %; write the last weight before promotion in percent, at least stepWeight, e.g. `maxWeight: 50`",
        ),
        (
            "    steps:\n      - setWeight: 20\n      - pause: {duration: 5m}\n      - setWeight: 40\n",
            "    stepWeight: 0\n",
            "spec.analysis.stepWeight: 0 % is not between 1 and 100; write the weight increase per step in percent, e.g. `stepWeight: 10`",
        ),
        // -- Durations and counts carry their unit.
        (
            "interval: 30s",
            "interval: 500ms",
            "spec.analysis.interval: 500ms is shorter than 1s; write a duration of at least 1s, e.g. `interval: 30s` (metrics need time to accumulate)",
        ),
        (
            "threshold: 5",
            "threshold: 5\n    metricsFailureLimit: 0",
            "spec.analysis.metricsFailureLimit: must be at least 1 (failed metric reads in a row); write how many failed metric reads in a row halt the rollout, e.g. `metricsFailureLimit: 2`",
        ),
        (
            "threshold: 5",
            "threshold: 5\n    startingStep: 3",
            "spec.analysis.startingStep: 3 is past the last step (a 0-based index; there are 3 steps); write a step index from 0 to 2",
        ),
    ];
    for (from, to, expected) in cases {
        let got = messages(&edited(from, to));
        assert_eq!(got, vec![expected.to_string()], "{from:?} -> {to:?}");
    }
}

#[test]
fn valid_specs_get_warnings_with_the_field_and_the_fix() {
    let no_checks = "    compareWithStable: {}\n    sloBurnRate: {objective: 99.5}\n    guard: {maxErrorRatio: 0.5}\n    metrics:\n      - {name: request-success-rate, thresholdRange: {min: 99}}\n      - {name: request-duration, quantile: 0.99, thresholdRange: {max: 500}}\n";
    let cases: &[(&str, &str, &str)] = &[
        (
            no_checks,
            "    unchecked: true\n",
            "spec.analysis.unchecked: no checks: the canary is promoted on traffic alone, whatever its errors or latency; add `compareWithStable: {}`, `metrics` or `sloBurnRate`, then remove `unchecked: true`",
        ),
        (
            "threshold: 5",
            "threshold: 5\n    unchecked: true",
            "spec.analysis.unchecked: is true, but the analysis has checks: they run and are enforced as usual; remove `unchecked: true`",
        ),
        // A spec meant for automation that waits for a person.
        (
            "      - pause: {duration: 5m}",
            "      - pause: {}",
            "spec.analysis.steps[1].pause: waits until someone runs `fledge promote checkout` (Kubernetes: the `fledge.dev/promote` annotation): an unattended rollout stops here; for automation write a timed pause, e.g. `pause: {duration: 5m}`; keep `pause: {}` only where a person approves",
        ),
        (
            "threshold: 5",
            "threshold: 5\n    minCanaryRequests: 0",
            "spec.analysis.minCanaryRequests: is 0: an interval in which the canary served no request can pass, and a step can advance without evidence; write the canary requests an interval needs to be judged, e.g. `minCanaryRequests: 20`",
        ),
        (
            "threshold: 5",
            "threshold: 5\n    startingStep: 2",
            "spec.analysis.startingStep: checks are judged but not acted on before step 3: a failing canary advances through the earlier steps; write `startingStep: 0` to enforce checks from the first step",
        ),
    ];
    for (from, to, expected) in cases {
        let yaml = edited(from, to);
        assert_eq!(
            messages(&yaml),
            Vec::<String>::new(),
            "{to:?} must stay valid"
        );
        let canary: Canary = serde_yaml::from_str(&yaml).unwrap();
        let warnings: Vec<String> = spec_warnings(&canary)
            .iter()
            .map(|w| w.to_string())
            .collect();
        assert_eq!(warnings, vec![expected.to_string()], "{from:?} -> {to:?}");
    }
}

/// Argo's `failureLimit: 3` (a 4th failure aborts) is Flagger's `threshold: 4`.
#[test]
fn failure_limit_has_argos_meaning() {
    let argo: Canary = serde_yaml::from_str(&edited("threshold: 5", "failureLimit: 3")).unwrap();
    assert_eq!(argo.validate(), Ok(()));
    assert_eq!(argo.spec.analysis.rollback_threshold(), 4);
    let first: Canary = serde_yaml::from_str(&edited("threshold: 5", "failureLimit: 0")).unwrap();
    assert_eq!(first.spec.analysis.rollback_threshold(), 1);
    let default: Canary = serde_yaml::from_str(&edited("    threshold: 5\n", "")).unwrap();
    assert_eq!(default.spec.analysis.rollback_threshold(), 5);
}
