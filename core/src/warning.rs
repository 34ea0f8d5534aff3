//! Warnings: what a valid spec or a running rollout does not do, said out loud.
//!
//! An *error* stops a spec from being used. A *warning* leaves it valid but names something the
//! operator would otherwise not see: a check that cannot run (too little traffic to compare
//! latency, a boundary that is not a histogram bucket), a rollout promoted on traffic alone
//! (`unchecked: true`), a plan that waits for a person (`pause: {}`). Each names the field and
//! the fix, like a [`crate::spec::SpecError`].
//!
//! Two sources:
//! - the spec alone ([`spec_warnings`]: `fledge validate`, and at `fledge run` start);
//! - the running analysis ([`crate::analysis::AnalysisReport::warnings`]), kept in the status
//!   while they hold ([`crate::rollout::CanaryStatus::warnings`]) together with the spec's
//!   warnings about checks ([`check_warnings`]).

use crate::spec::{AnalysisSpec, Canary, Step};
use serde::{Deserialize, Serialize};
use std::fmt;

/// Identifiers of the kinds of warning (the `code` of a [`Warning`]): stable across intervals
/// while the numbers in the message change, so a warning is announced once when it appears.
pub mod code {
    /// `unchecked: true`: promoted on traffic alone.
    pub const UNCHECKED: &str = "unchecked";
    /// `unchecked: true` next to checks: it changes nothing.
    pub const UNCHECKED_WITH_CHECKS: &str = "uncheckedWithChecks";
    /// `minCanaryRequests: 0`: an interval without canary traffic can pass.
    pub const NO_MIN_CANARY_REQUESTS: &str = "noMinCanaryRequests";
    /// A `pause: {}` step waits for a person.
    pub const INDEFINITE_PAUSE: &str = "indefinitePause";
    /// Steps before `startingStep` are judged but not acted on.
    pub const NOT_ENFORCED: &str = "notEnforced";
    /// compareWithStable could not choose latency boundaries yet.
    pub const LATENCY_NOT_COMPARED: &str = "latencyNotCompared";
    /// A latency boundary is not a bucket of the histogram the source reports.
    pub const LATENCY_BOUNDARY_NOT_A_BUCKET: &str = "latencyBoundaryNotABucket";
    /// Requests came without a latency histogram.
    pub const NO_LATENCY_HISTOGRAM: &str = "noLatencyHistogram";
    /// One version served no requests: the comparison learns nothing this interval.
    pub const NOT_COMPARED_ONE_VERSION: &str = "notComparedOneVersion";
}

/// One warning: where, what, and what to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Warning {
    /// The kind of warning (see [`code`]).
    pub code: String,
    /// The spec field concerned, e.g. `spec.analysis.compareWithStable.latencyBoundariesMs`.
    pub field: String,
    pub message: String,
    pub fix: String,
}

impl Warning {
    pub fn new(
        code: &str,
        field: impl Into<String>,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Warning {
            code: code.to_string(),
            field: field.into(),
            message: message.into(),
            fix: fix.into(),
        }
    }
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}; {}", self.field, self.message, self.fix)
    }
}

/// Every warning about a spec, for `fledge validate` and the start of `fledge run`: the
/// [`check_warnings`] plus the plan's pauses that wait for a person.
pub fn spec_warnings(canary: &Canary) -> Vec<Warning> {
    let analysis = &canary.spec.analysis;
    let mut warnings = check_warnings(analysis);
    if analysis.starting_step > 0 {
        warnings.push(not_enforced(analysis.starting_step));
    }
    warnings.extend(pause_warnings(canary));
    warnings
}

/// Checks before `startingStep` are judged and shown but not acted on.
pub fn not_enforced(starting_step: usize) -> Warning {
    Warning::new(
        code::NOT_ENFORCED,
        "spec.analysis.startingStep",
        format!(
            "checks are judged but not acted on before step {}: a failing canary advances through the earlier steps",
            starting_step + 1
        ),
        "write `startingStep: 0` to enforce checks from the first step",
    )
}

/// The spec's warnings about checks that do not run: kept in the status for as long as the
/// rollout runs, next to the analysis' own.
pub fn check_warnings(analysis: &AnalysisSpec) -> Vec<Warning> {
    let mut warnings = Vec::new();
    let base = "spec.analysis";
    if analysis.unchecked {
        if analysis.has_checks() {
            warnings.push(Warning::new(
                code::UNCHECKED_WITH_CHECKS,
                format!("{base}.unchecked"),
                "is true, but the analysis has checks: they run and are enforced as usual",
                "remove `unchecked: true`",
            ));
        } else {
            warnings.push(Warning::new(
                code::UNCHECKED,
                format!("{base}.unchecked"),
                "no checks: the canary is promoted on traffic alone, whatever its errors or latency",
                "add `compareWithStable: {}`, `metrics` or `sloBurnRate`, then remove `unchecked: true`",
            ));
        }
    }
    if analysis.min_canary_requests == 0 {
        warnings.push(Warning::new(
            code::NO_MIN_CANARY_REQUESTS,
            format!("{base}.minCanaryRequests"),
            "is 0: an interval in which the canary served no request can pass, and a step can advance without evidence",
            "write the canary requests an interval needs to be judged, e.g. `minCanaryRequests: 20`",
        ));
    }
    warnings
}

/// `pause: {}` steps: the rollout stops there until someone promotes it.
fn pause_warnings(canary: &Canary) -> Vec<Warning> {
    let Some(steps) = &canary.spec.analysis.steps else {
        return Vec::new();
    };
    steps
        .iter()
        .enumerate()
        .filter(|(_, step)| matches!(step.to_step(), Some(Step::Pause(p)) if p.duration.is_none()))
        .map(|(i, _)| {
            Warning::new(
                code::INDEFINITE_PAUSE,
                format!("spec.analysis.steps[{i}].pause"),
                format!(
                    "waits until someone runs `fledge promote {name}` (Kubernetes: the `fledge.dev/promote` annotation): an unattended rollout stops here",
                    name = canary.name()
                ),
                "for automation write a timed pause, e.g. `pause: {duration: 5m}`; keep `pause: {}` only where a person approves",
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::tests::example;

    #[test]
    fn the_example_warns_only_about_its_indefinite_pause() {
        let warnings = spec_warnings(&example());
        let codes: Vec<&str> = warnings.iter().map(|w| w.code.as_str()).collect();
        assert_eq!(codes, [code::INDEFINITE_PAUSE]);
        assert_eq!(
            warnings[0].to_string(),
            "spec.analysis.steps[3].pause: waits until someone runs `fledge promote app` (Kubernetes: the `fledge.dev/promote` annotation): an unattended rollout stops here; for automation write a timed pause, e.g. `pause: {duration: 5m}`; keep `pause: {}` only where a person approves"
        );
        assert!(check_warnings(&example().spec.analysis).is_empty());
    }

    #[test]
    fn unchecked_is_a_warning_and_says_so_when_it_changes_nothing() {
        let mut c = example();
        c.spec.analysis.unchecked = true;
        let codes: Vec<String> = check_warnings(&c.spec.analysis)
            .into_iter()
            .map(|w| w.code)
            .collect();
        assert_eq!(codes, [code::UNCHECKED_WITH_CHECKS]);
        c.spec.analysis.metrics.clear();
        let warnings = check_warnings(&c.spec.analysis);
        assert_eq!(warnings[0].code, code::UNCHECKED);
        assert_eq!(warnings[0].field, "spec.analysis.unchecked");
    }
}
