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

/// One line per judged interval, with every metric's value against its threshold.
pub fn analysis(name: &str, report: &TimedReport) {
    let checks: Vec<String> = report
        .report
        .checks
        .iter()
        .map(|c| {
            let value = c.value.map_or("n/a".to_string(), |v| v.to_string());
            format!("{} {value} ({}) {:?}", c.name, c.threshold, c.verdict)
        })
        .collect();
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
    emit(&format!(
        "{} {name:<14} analysis {verdict}: {} canary / {} stable requests{}{enforced}",
        now(),
        report.report.canary_requests,
        report.report.stable_requests,
        if checks.is_empty() {
            String::new()
        } else {
            format!("; {}", checks.join("; "))
        },
    ));
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
