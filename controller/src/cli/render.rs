//! Text rendering of canary status for `fledge status` (pure functions, unit-tested).

use fledge_core::analysis::{MetricCheck, Verdict};
use fledge_core::rollout::{CanaryStatus, Phase};
use fledge_core::workload::{short, WorkloadPhase, WorkloadStatus};
use serde::Deserialize;

/// One webhook's last call, as the API reports it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WebhookDoc {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub last_call: Option<CallDoc>,
    #[serde(default)]
    pub failures_in_a_row: u32,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CallDoc {
    pub at: chrono::DateTime<chrono::Utc>,
    pub ok: bool,
    #[serde(default)]
    pub duration_ms: u64,
    #[serde(default)]
    pub detail: String,
}

/// One canary as `GET /api/v1/canaries[/{name}]` reports it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CanaryDoc {
    pub name: String,
    #[serde(default)]
    pub service: String,
    #[serde(default)]
    pub steps: usize,
    #[serde(default)]
    pub threshold: u32,
    #[serde(flatten)]
    pub status: CanaryStatus,
    #[serde(default)]
    pub router_error: Option<String>,
    #[serde(default)]
    pub conflict: Option<String>,
    #[serde(default)]
    pub webhooks: Vec<WebhookDoc>,
    /// With `targetRef` (Kubernetes mode): the workload.
    #[serde(default)]
    pub workload: Option<WorkloadStatus>,
}

/// How to draw: with ANSI colours (a terminal without `NO_COLOR`) or plain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Style {
    pub color: bool,
}

impl Style {
    pub const PLAIN: Style = Style { color: false };

    fn paint(self, code: &str, text: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_string()
        }
    }

    fn green(self, text: &str) -> String {
        self.paint("32", text)
    }
    fn red(self, text: &str) -> String {
        self.paint("31", text)
    }
    fn yellow(self, text: &str) -> String {
        self.paint("33", text)
    }
    fn bold(self, text: &str) -> String {
        self.paint("1", text)
    }
    fn dim(self, text: &str) -> String {
        self.paint("2", text)
    }
}

/// `[████░░░░░░]  40%`: ten cells, one per 10%, rounded to the nearest cell.
pub fn weight_bar(weight: u8) -> String {
    let weight = weight.min(100);
    let filled = (usize::from(weight) + 5) / 10;
    format!(
        "[{}{}] {weight:>3}%",
        "█".repeat(filled),
        "░".repeat(10 - filled)
    )
}

/// `2/5` (1-based; `5/5` once past the last step); `-` for a plan without steps.
pub fn step_label(step: usize, steps: usize) -> String {
    if steps == 0 {
        "-".to_string()
    } else {
        format!("{}/{steps}", (step + 1).min(steps))
    }
}

fn phase_text(style: Style, phase: Phase, paused_by_operator: bool) -> String {
    let name = if paused_by_operator && phase != Phase::Paused {
        format!("{phase:?} (paused)")
    } else {
        format!("{phase:?}")
    };
    match phase {
        Phase::Promoted => style.green(&name),
        Phase::RolledBack => style.red(&name),
        Phase::Halted | Phase::Paused => style.yellow(&name),
        Phase::Initializing | Phase::Progressing => name,
    }
}

fn workload_phase_text(style: Style, phase: WorkloadPhase) -> String {
    let name = format!("{phase:?}");
    match phase {
        WorkloadPhase::Succeeded | WorkloadPhase::Initialized => style.green(&name),
        WorkloadPhase::Failed | WorkloadPhase::RollingBack => style.red(&name),
        WorkloadPhase::Waiting => style.yellow(&name),
        _ => name,
    }
}

/// `2/3`: available of desired replicas.
fn replicas(r: fledge_core::workload::Replicas) -> String {
    format!("{}/{}", r.available, r.desired)
}

/// The workload lines of `fledge status NAME`.
fn render_workload(w: &WorkloadStatus, style: Style) -> String {
    let mut out = format!(
        "  workload  {}   primary {}   target {}\n",
        workload_phase_text(style, w.phase),
        replicas(w.primary),
        replicas(w.target)
    );
    if let Some(image) = &w.image {
        let revision = w.revision.as_deref().map(short).unwrap_or_default();
        out.push_str(&format!("  revision  {image} ({revision})\n"));
    }
    if let Some(stable) = &w.stable_image {
        out.push_str(&format!("  stable    {stable} on the primary\n"));
    }
    out.push_str(&format!("  doing     {}\n", w.message));
    if let Some(held) = &w.weights_held {
        out.push_str(&format!("  held      {} {held}\n", style.yellow("!")));
    }
    if let Some(failure) = &w.failure {
        out.push_str(&format!("  failure   {} {failure}\n", style.red("✘")));
    }
    out
}

fn verdict_mark(style: Style, verdict: Verdict) -> String {
    match verdict {
        Verdict::Pass => style.green("✔"),
        Verdict::Fail => style.red("✘"),
        Verdict::NoData => style.yellow("?"),
    }
}

fn verdict_word(style: Style, verdict: Verdict) -> String {
    match verdict {
        Verdict::Pass => style.green("Pass"),
        Verdict::Fail => style.red("Fail"),
        Verdict::NoData => style.yellow("NoData"),
    }
}

/// A value with at most 3 significant decimals, `n/a` when missing.
pub fn number(value: Option<f64>) -> String {
    match value {
        None => "n/a".into(),
        Some(v) if !v.is_finite() => format!("{v}"),
        Some(v) => {
            let rounded = (v * 1000.0).round() / 1000.0;
            format!("{rounded}")
        }
    }
}

fn truncate(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        text.to_string()
    } else {
        let cut: String = text.chars().take(width.saturating_sub(1)).collect();
        format!("{cut}…")
    }
}

/// The table of `fledge status` without a name: one line per canary.
pub fn render_list(canaries: &[CanaryDoc], style: Style) -> String {
    if canaries.is_empty() {
        return "no canaries\n".to_string();
    }
    let name_width = canaries
        .iter()
        .map(|c| c.name.chars().count())
        .max()
        .unwrap_or(4)
        .max(4);
    let workloads = canaries.iter().any(|c| c.workload.is_some());
    let workload_header = if workloads {
        format!("{:<12}  {:<7}  {:<7}  ", "WORKLOAD", "PRIMARY", "TARGET")
    } else {
        String::new()
    };
    let mut out = format!(
        "{}\n",
        style.bold(&format!(
            "{:<name_width$}  {:<12}  {:<17}  {:<5}  {:<6}  {workload_header}{}",
            "NAME", "PHASE", "WEIGHT", "STEP", "FAILED", "MESSAGE"
        ))
    );
    for c in canaries {
        let workload = match (&c.workload, workloads) {
            (Some(w), _) => {
                let phase = format!("{:?}", w.phase);
                let pad = 12usize.saturating_sub(phase.chars().count());
                format!(
                    "{}{}  {:<7}  {:<7}  ",
                    workload_phase_text(style, w.phase),
                    " ".repeat(pad),
                    replicas(w.primary),
                    replicas(w.target)
                )
            }
            (None, true) => format!("{:<12}  {:<7}  {:<7}  ", "-", "", ""),
            (None, false) => String::new(),
        };
        let message = c
            .workload
            .as_ref()
            .map(|w| w.message.clone())
            .filter(|m| !m.is_empty())
            .unwrap_or_else(|| list_message(c));
        let phase_plain = format!("{:?}", c.status.phase);
        let pad = 12usize.saturating_sub(phase_plain.chars().count());
        let warnings = match c.status.warnings.len() {
            0 => String::new(),
            1 => format!("  {}", style.yellow("! 1 warning")),
            n => format!("  {}", style.yellow(&format!("! {n} warnings"))),
        };
        out.push_str(&format!(
            "{:<name_width$}  {}{}  {}  {:<5}  {:<6}  {workload}{}{warnings}\n",
            c.name,
            phase_text(style, c.status.phase, false),
            " ".repeat(pad),
            weight_bar(c.status.canary_weight),
            step_label(c.status.step, c.steps),
            format!("{}/{}", c.status.failed_checks, c.threshold),
            truncate(&message, 100),
        ));
    }
    out
}

/// The message of the list view: the latest reason, else why the canary is blocked, else `-`
/// (a column is never blank).
fn list_message(c: &CanaryDoc) -> String {
    if !c.status.message.is_empty() {
        c.status.message.clone()
    } else if let Some(error) = &c.router_error {
        format!("blocked: {error}")
    } else {
        "-".to_string()
    }
}

/// One check of the last analysis: its verdict mark, and what the verdict rests on.
fn check_line(check: &MetricCheck, width: usize, style: Style) -> String {
    let mark = verdict_mark(style, check.verdict);
    if let Some(comparison) = &check.comparison {
        return format!(
            "    {mark} {:<width$}  {}\n",
            check.name,
            comparison.basis()
        );
    }
    let with_unit = |v: Option<f64>| match v {
        Some(_) => format!("{}{}", number(v), check.unit),
        None => "n/a".to_string(),
    };
    let stable = match check.stable_value {
        Some(_) => format!("  stable {}", with_unit(check.stable_value)),
        None => String::new(),
    };
    format!(
        "    {mark} {:<width$}  {:>9}  ({}){stable}\n",
        check.name,
        with_unit(check.value),
        check.threshold.with_unit(&check.unit),
    )
}

/// The detailed view of one canary.
pub fn render_canary(c: &CanaryDoc, style: Style) -> String {
    let s = &c.status;
    let mut out = String::new();
    let title = if c.service.is_empty() || c.service == c.name {
        c.name.clone()
    } else {
        format!("{} (service {})", c.name, c.service)
    };
    out.push_str(&format!(
        "{}  {}\n",
        style.bold(&title),
        phase_text(style, s.phase, s.paused_by_operator)
    ));
    out.push_str(&format!(
        "  weight    {}   step {}   failed checks {}/{}\n",
        weight_bar(s.canary_weight),
        step_label(s.step, c.steps),
        s.failed_checks,
        c.threshold
    ));
    if !s.message.is_empty() {
        out.push_str(&format!("  reason    {}\n", s.message));
    }
    if let Some(workload) = &c.workload {
        out.push_str(&render_workload(workload, style));
    }
    if let Some(error) = &c.router_error {
        out.push_str(&format!("  blocked   {} {error}\n", style.red("✘")));
    }
    if let Some(conflict) = &c.conflict {
        out.push_str(&format!("  conflict  {} {conflict}\n", style.yellow("!")));
    }
    if !s.warnings.is_empty() {
        out.push_str("  warnings\n");
        for warning in &s.warnings {
            out.push_str(&format!("    {} {warning}\n", style.yellow("!")));
        }
    }
    match &s.last_analysis {
        None => out.push_str("  analysis  none yet\n"),
        Some(report) => {
            let enforced = if report.enforced {
                ""
            } else {
                " (before startingStep: not enforced)"
            };
            out.push_str(&format!(
                "  analysis  {} {} — {} canary / {} stable requests{enforced}\n",
                report.at.format("%H:%M:%S"),
                verdict_word(style, report.report.verdict),
                report.report.canary_requests,
                report.report.stable_requests,
            ));
            let width = report
                .report
                .checks
                .iter()
                .map(|check| check.name.chars().count())
                .max()
                .unwrap_or(0);
            for check in &report.report.checks {
                out.push_str(&check_line(check, width, style));
                if check.verdict != Verdict::Pass && !check.reason.is_empty() {
                    out.push_str(&format!("      {}\n", style.dim(&check.reason)));
                }
            }
            if let Some(hold) = &report.report.hold {
                out.push_str(&format!("    holding: {hold}\n"));
            }
        }
    }
    if !c.webhooks.is_empty() {
        out.push_str("  webhooks\n");
        for hook in &c.webhooks {
            let line = match &hook.last_call {
                None => format!("    · {} ({}) not called yet", hook.name, hook.kind),
                Some(call) => format!(
                    "    {} {} ({}) {}in {} ms at {}{}",
                    if call.ok {
                        style.green("✔")
                    } else {
                        style.red("✘")
                    },
                    hook.name,
                    hook.kind,
                    if call.detail.is_empty() {
                        String::new()
                    } else {
                        format!("{} ", call.detail)
                    },
                    call.duration_ms,
                    call.at.format("%H:%M:%S"),
                    if hook.failures_in_a_row > 1 {
                        format!(", {} failures in a row", hook.failures_in_a_row)
                    } else {
                        String::new()
                    }
                ),
            };
            out.push_str(&line);
            out.push('\n');
        }
    }
    if !s.history.is_empty() {
        out.push_str("  history\n");
        let skip = s.history.len().saturating_sub(8);
        for t in &s.history[skip..] {
            out.push_str(&format!(
                "    {}  {:<12} {:>3}%  step {:<5} {}\n",
                t.at.format("%H:%M:%S"),
                format!("{:?}", t.phase),
                t.canary_weight,
                step_label(t.step, c.steps),
                t.reason
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use fledge_core::analysis::{AnalysisReport, MetricCheck};
    use fledge_core::rollout::{TimedReport, Transition};
    use fledge_core::spec::ThresholdRange;

    fn at(secs: i64) -> chrono::DateTime<chrono::Utc> {
        chrono::Utc.with_ymd_and_hms(2026, 1, 2, 10, 2, 0).unwrap()
            + chrono::Duration::seconds(secs)
    }

    fn doc() -> CanaryDoc {
        CanaryDoc {
            name: "app".into(),
            service: "app".into(),
            steps: 5,
            threshold: 2,
            status: CanaryStatus {
                phase: Phase::Progressing,
                canary_weight: 40,
                step: 1,
                failed_checks: 1,
                message: "advance canary weight to 40% (step 2/5)".into(),
                last_analysis: Some(TimedReport {
                    at: at(14),
                    enforced: true,
                    report: AnalysisReport {
                        verdict: Verdict::Fail,
                        canary_requests: 61,
                        stable_requests: 243,
                        checks: vec![
                            MetricCheck {
                                name: "request-success-rate".into(),
                                value: Some(96.72131147),
                                stable_value: Some(100.0),
                                threshold: ThresholdRange {
                                    min: Some(99.0),
                                    max: None,
                                    ..ThresholdRange::default()
                                },
                                verdict: Verdict::Fail,
                                decisive: false,
                                reason: "success rate 96.721% below 99".into(),
                                unit: "%".into(),
                                comparison: None,
                            },
                            MetricCheck {
                                name: "errors-vs-stable".into(),
                                value: Some(1.41),
                                stable_value: None,
                                threshold: ThresholdRange::default(),
                                verdict: Verdict::Pass,
                                decisive: true,
                                reason: String::new(),
                                unit: "×".into(),
                                comparison: Some(fledge_core::analysis::Comparison {
                                    ratio: Some(1.41),
                                    tolerance: 1.0,
                                    evidence: 1.94,
                                    evidence_needed: 33.33,
                                    p_value: 0.53,
                                    canary_events: 3,
                                    canary_requests: 61,
                                    stable_events: 7,
                                    stable_requests: 243,
                                }),
                            },
                            MetricCheck {
                                name: "request-duration".into(),
                                value: Some(4.9),
                                stable_value: None,
                                threshold: ThresholdRange {
                                    min: None,
                                    max: Some(500.0),
                                    ..ThresholdRange::default()
                                },
                                verdict: Verdict::Pass,
                                decisive: false,
                                reason: String::new(),
                                unit: " ms".into(),
                                comparison: None,
                            },
                        ],
                        reason: String::new(),
                        hold: None,
                        warnings: Vec::new(),
                    },
                }),
                warnings: vec![fledge_core::warning::Warning::new(
                    fledge_core::warning::code::LATENCY_NOT_COMPARED,
                    "spec.analysis.compareWithStable.latencyBoundariesMs",
                    "latency not compared: 12 stable requests per interval, 50 needed",
                    "set latencyBoundariesMs or a longer interval",
                )],
                history: vec![Transition {
                    at: at(0),
                    phase: Phase::Progressing,
                    canary_weight: 20,
                    step: 0,
                    reason: "advance canary weight to 20% (step 1/5)".into(),
                }],
                ..Default::default()
            },
            router_error: None,
            conflict: None,
            webhooks: vec![WebhookDoc {
                name: "load-test".into(),
                kind: "rollout".into(),
                last_call: Some(CallDoc {
                    at: at(13),
                    ok: false,
                    duration_ms: 2003,
                    detail: "timed out after 1s (2 attempts)".into(),
                }),
                failures_in_a_row: 2,
            }],
            workload: None,
        }
    }

    #[test]
    fn weight_bar_has_ten_cells_and_the_percentage() {
        assert_eq!(weight_bar(0), "[░░░░░░░░░░]   0%");
        assert_eq!(weight_bar(40), "[████░░░░░░]  40%");
        assert_eq!(weight_bar(45), "[█████░░░░░]  45%");
        assert_eq!(weight_bar(100), "[██████████] 100%");
        assert_eq!(weight_bar(250), "[██████████] 100%");
    }

    #[test]
    fn step_labels_are_one_based_and_capped() {
        assert_eq!(step_label(0, 5), "1/5");
        assert_eq!(step_label(5, 5), "5/5");
        assert_eq!(step_label(0, 0), "-");
    }

    #[test]
    fn one_canary_shows_phase_weight_step_checks_webhooks_and_history() {
        let text = render_canary(&doc(), Style::PLAIN);
        let expected = "\
app  Progressing
  weight    [████░░░░░░]  40%   step 2/5   failed checks 1/2
  reason    advance canary weight to 40% (step 2/5)
  warnings
    ! spec.analysis.compareWithStable.latencyBoundariesMs: latency not compared: 12 stable requests per interval, 50 needed; set latencyBoundariesMs or a longer interval
  analysis  10:02:14 Fail — 61 canary / 243 stable requests
    ✘ request-success-rate    96.721%  (>= 99%)  stable 100%
      success rate 96.721% below 99
    ✔ errors-vs-stable      canary ≈1.41× stable (tolerance 1×), evidence 1.94 of 33.3 needed to roll back, p=0.53
    ✔ request-duration         4.9 ms  (<= 500 ms)
  webhooks
    ✘ load-test (rollout) timed out after 1s (2 attempts) in 2003 ms at 10:02:13, 2 failures in a row
  history
    10:02:00  Progressing   20%  step 1/5   advance canary weight to 20% (step 1/5)
";
        assert_eq!(text, expected, "got:\n{text}");
    }

    #[test]
    fn list_is_a_table_with_bars_and_colours_only_when_asked() {
        let mut promoted = doc();
        promoted.name = "checkout".into();
        promoted.status.phase = Phase::Promoted;
        promoted.status.canary_weight = 100;
        promoted.status.step = 5;
        promoted.status.message = "promotion completed".into();
        promoted.status.warnings.clear();
        let text = render_list(&[doc(), promoted.clone()], Style::PLAIN);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "NAME      PHASE         WEIGHT             STEP   FAILED  MESSAGE"
        );
        assert_eq!(
            lines[1],
            "app       Progressing   [████░░░░░░]  40%  2/5    1/2     advance canary weight to 40% (step 2/5)  ! 1 warning"
        );
        assert_eq!(
            lines[2],
            "checkout  Promoted      [██████████] 100%  5/5    1/2     promotion completed"
        );
        assert!(!text.contains('\x1b'));
        let coloured = render_list(&[promoted], Style { color: true });
        assert!(coloured.contains("\x1b[32mPromoted\x1b[0m"), "{coloured:?}");
        assert_eq!(render_list(&[], Style::PLAIN), "no canaries\n");
    }

    #[test]
    fn no_field_is_shown_empty() {
        let mut blocked = doc();
        blocked.status = CanaryStatus::default();
        blocked.router_error = Some(
            r#"route "primary" not found in virtual host "app" of route configuration "fledge_route" in /tmp/r.json (its 1 route has no "name")"#.into(),
        );
        blocked.webhooks[0]
            .last_call
            .as_mut()
            .unwrap()
            .detail
            .clear();
        let text = render_canary(&blocked, Style::PLAIN);
        assert!(!text.contains("  reason "), "{text}");
        for line in text.lines() {
            assert!(
                !line
                    .trim_end()
                    .ends_with(|c: char| c == ':' || c.is_whitespace())
                    && !line.contains("  )")
                    && !line.contains("()")
                    && !line.contains(")  in"),
                "a blank field in {line:?}"
            );
        }
        assert!(
            text.contains("    ✘ load-test (rollout) in 2003 ms at 10:02:13"),
            "{text}"
        );
        let list = render_list(&[blocked], Style::PLAIN);
        assert!(
            list.lines().nth(1).unwrap().ends_with(
                r#"0/2     blocked: route "primary" not found in virtual host "app" of route configuration "fledge_route" in /…"#
            ),
            "{list}"
        );
    }

    #[test]
    fn the_api_answer_parses_into_a_doc() {
        let json = serde_json::json!({
            "name": "app", "service": "app", "steps": 3, "threshold": 2,
            "phase": "Halted", "canaryWeight": 20, "step": 0, "stepStartedAt": null,
            "stepPassedChecks": 0, "failedChecks": 0, "startedAt": null,
            "message": "halt advancement: canary receives no traffic", "lastAnalysis": null,
            "history": [], "routerError": "envoy admin unreachable", "conflict": null,
            "series": [{"ignored": true}],
            "webhooks": [{"name": "gate", "type": "confirm-promotion", "url": "http://x", "lastCall": null, "failuresInARow": 0}]
        });
        let doc: CanaryDoc = serde_json::from_value(json).unwrap();
        assert_eq!(doc.status.phase, Phase::Halted);
        let text = render_canary(&doc, Style::PLAIN);
        assert!(text.contains("app  Halted\n"), "{text}");
        assert!(
            text.contains("  blocked   ✘ envoy admin unreachable\n"),
            "{text}"
        );
        assert!(
            text.contains("    · gate (confirm-promotion) not called yet\n"),
            "{text}"
        );
        assert!(text.contains("  analysis  none yet\n"), "{text}");
    }

    #[test]
    fn a_workload_shows_its_phase_revision_replicas_and_why_weights_are_held() {
        let mut app = doc();
        app.workload = Some(WorkloadStatus {
            phase: WorkloadPhase::Progressing,
            revision: Some("4b78f6377011aa00".into()),
            image: Some("app:v2".into()),
            stable_image: Some("app:v1".into()),
            primary: fledge_core::workload::Replicas {
                desired: 3,
                available: 3,
            },
            target: fledge_core::workload::Replicas {
                desired: 3,
                available: 0,
            },
            message: "analysing revision 4b78f63770 (app:v2)".into(),
            weights_held: Some(
                "the canary subset (app) has no available pods: all traffic stays on stable".into(),
            ),
            ..Default::default()
        });
        let text = render_canary(&app, Style::PLAIN);
        for line in [
            "  workload  Progressing   primary 3/3   target 0/3\n",
            "  revision  app:v2 (4b78f63770)\n",
            "  stable    app:v1 on the primary\n",
            "  doing     analysing revision 4b78f63770 (app:v2)\n",
            "  held      ! the canary subset (app) has no available pods: all traffic stays on stable\n",
        ] {
            assert!(text.contains(line), "{line:?} in:\n{text}");
        }
        let list = render_list(&[app, doc()], Style::PLAIN);
        let lines: Vec<&str> = list.lines().collect();
        assert!(
            lines[0].contains("WORKLOAD      PRIMARY  TARGET   MESSAGE"),
            "{list}"
        );
        assert!(
            lines[1].contains("Progressing   3/3      0/3      analysing revision"),
            "{list}"
        );
        assert!(
            lines[2].contains("-                               advance canary"),
            "{list}"
        );
    }
}
