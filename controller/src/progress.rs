//! Readable progress lines on stdout, one per decision, for operators watching `fledge run`.

use fledge_core::analysis::Verdict;
use fledge_core::rollout::{Action, CanaryStatus, TimedReport};
use std::io::Write;

fn emit(text: &str) {
    let mut out = std::io::stdout().lock();
    // A closed stdout must not stop the controller.
    let _ = writeln!(out, "{text}");
    let _ = out.flush();
}

fn now() -> String {
    chrono::Utc::now().format("%H:%M:%S").to_string()
}

/// A state line: time, canary, phase, weight, step, message.
pub fn line(name: &str, status: &CanaryStatus, steps: usize, message: &str) {
    emit(&format!(
        "{} {name:<14} {:<11} weight {:>3}%  step {}/{}  {message}",
        now(),
        format!("{:?}", status.phase),
        status.canary_weight,
        (status.step + 1).min(steps),
        steps,
    ));
}

/// One line per judged interval, with every check's verdict and what it rests on: a value
/// against its range, or a comparison's ratio, tolerance and evidence.
pub fn analysis(name: &str, report: &TimedReport) {
    emit(&analysis_line(&now(), name, report));
}

fn analysis_line(time: &str, name: &str, report: &TimedReport) -> String {
    let checks: Vec<String> = report.report.checks.iter().map(|c| c.summary()).collect();
    let enforced = if report.enforced {
        ""
    } else {
        " [not enforced before startingStep]"
    };
    let verdict = match report.report.verdict {
        Verdict::Pass => "pass",
        Verdict::Fail => "FAIL",
        Verdict::NoData => "no data",
    };
    format!(
        "{time} {name:<14} analysis {verdict}: {} canary / {} stable requests{}{enforced}",
        report.report.canary_requests,
        report.report.stable_requests,
        if checks.is_empty() {
            String::new()
        } else {
            format!("; {}", checks.join("; "))
        },
    )
}

/// A free-form note about a canary (e.g. a conflict with another writer).
pub fn note(name: &str, text: &str) {
    emit(&format!("{} {name:<14} {text}", now()));
}

/// Print the events a decision produced.
pub fn actions(name: &str, status: &CanaryStatus, steps: usize, actions: &[Action]) {
    for action in actions {
        if let Action::Event { message, .. } = action {
            line(name, status, steps, message);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fledge_core::analysis::{evaluate, AnalysisState};
    use fledge_core::contract::ResponseClass;
    use fledge_core::observe::{LatencyHistogram, Observation, SubsetTraffic};

    fn traffic(ok: u64, errors: u64) -> SubsetTraffic {
        let mut t = SubsetTraffic {
            latency: LatencyHistogram {
                bounds_ms: vec![50.0, 500.0],
                cumulative: vec![ok + errors, ok + errors],
                count: ok + errors,
                sum_ms: 0.0,
            },
            ..Default::default()
        };
        t.add(ResponseClass::Success, ok);
        t.add(ResponseClass::ServerError, errors);
        t
    }

    /// The line names the comparison's statistic, tolerance and evidence: never a ratio above
    /// the tolerance next to "Pass" as if it were a bound.
    #[test]
    fn a_comparison_line_states_its_basis() {
        let yaml = r#"
apiVersion: fledge.dev/v1alpha1
kind: Canary
metadata: {name: app}
spec:
  service: app
  stable: {subset: stable}
  canary: {subset: canary}
  metricsSource: {envoyAdmin: {urls: ["http://127.0.0.1:9901"]}}
  router: {envoyRds: {path: /tmp/r, routeConfiguration: r, virtualHost: v, route: r, stableCluster: s, canaryCluster: c, adminUrl: "http://127.0.0.1:9901"}}
  analysis:
    stepWeights: [50]
    compareWithStable: {signals: [errors]}
    metrics: [{name: request-success-rate, thresholdRange: {min: 90}}]
"#;
        let canary: fledge_core::spec::Canary = serde_yaml::from_str(yaml).unwrap();
        assert_eq!(canary.validate(), Ok(()));
        let observation = Observation {
            stable: traffic(198, 2),
            canary: traffic(97, 3),
            ..Default::default()
        };
        let at = chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        let report = TimedReport {
            at,
            enforced: true,
            report: evaluate(
                &canary.spec.analysis,
                &mut AnalysisState::default(),
                &observation,
                at,
            ),
        };
        assert_eq!(
            analysis_line("10:00:00", "app", &report),
            "10:00:00 app            analysis pass: 100 canary / 200 stable requests; errors-vs-stable: canary ≈3.17× stable (tolerance 1×), evidence 1.54 of 33.3 needed to roll back, p=0.651: Pass; request-success-rate 97% (>= 90%), stable 99%: Pass"
        );
    }
}
