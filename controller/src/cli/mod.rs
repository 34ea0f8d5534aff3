//! The operator CLI: `fledge status`, `promote`, `abort`, `pause`, `resume`, `retry` against
//! the JSON API of a running `fledge run --listen ADDR`, or (`--kubernetes`) against `Canary`
//! objects that `fledge controller` reconciles ([`kube`]), and `validate --output json`.
//!
//! Exit codes (the same for every client command):
//!
//! | code | meaning |
//! | --- | --- |
//! | 0 | done: the command was accepted, or the status was shown (no shown canary is RolledBack) |
//! | 1 | a shown canary is RolledBack (`status`; with `--watch`, the final state) |
//! | 2 | usage error, or an invalid spec (`validate`) |
//! | 3 | the server cannot be reached (or is not a fledge server) |
//! | 4 | the server refused: no such canary, the rollout has finished, commands are disabled |
//!
//! `--output json` prints the API's JSON answer (or `{"error": ..., "exitCode": n}`) on stdout
//! instead of text, with the same exit codes.

pub mod kube;
pub mod render;

use crate::config::spec_warnings;
use fledge_core::warning::Warning;
use render::{CanaryDoc, Style};
use serde_json::{json, Value};
use std::io::{IsTerminal, Write};
use std::time::Duration;

/// Exit code: success.
pub const EXIT_OK: u8 = 0;
/// Exit code: a shown canary is rolled back.
pub const EXIT_ROLLED_BACK: u8 = 1;
/// Exit code: usage or validation error.
pub const EXIT_USAGE: u8 = 2;
/// Exit code: the server cannot be reached.
pub const EXIT_UNREACHABLE: u8 = 3;
/// Exit code: the server refused the request.
pub const EXIT_REFUSED: u8 = 4;

/// Default server when neither `--server` nor `FLEDGE_SERVER` is given.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:9090";

/// Output format of client commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Text,
    Json,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the fledge server at {url}: {reason}; is `fledge run --listen ...` running there? (set --server or FLEDGE_SERVER)")]
    Unreachable { url: String, reason: String },
    #[error("cannot reach the Kubernetes API: {0}")]
    KubernetesUnreachable(String),
    #[error("{message}")]
    Refused { status: u16, message: String },
    #[error("unexpected answer from {url}: {reason}")]
    BadAnswer { url: String, reason: String },
}

impl ClientError {
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::Unreachable { .. }
            | ClientError::KubernetesUnreachable(_)
            | ClientError::BadAnswer { .. } => EXIT_UNREACHABLE,
            ClientError::Refused { .. } => EXIT_REFUSED,
        }
    }
}

/// An operator command sent to one canary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Promote { full: bool },
    Abort,
    Pause,
    Resume,
    Retry,
}

impl Verb {
    fn path(self) -> &'static str {
        match self {
            Verb::Promote { full: false } => "promote",
            Verb::Promote { full: true } => "promote?full=true",
            Verb::Abort => "abort",
            Verb::Pause => "pause",
            Verb::Resume => "resume",
            Verb::Retry => "retry",
        }
    }

    fn done(self) -> &'static str {
        match self {
            Verb::Promote { full: false } => {
                "promote requested (continues past the pause once the analysis allows)"
            }
            Verb::Promote { full: true } => "full promotion requested (remaining steps skipped)",
            Verb::Abort => "abort requested (rolling back to stable)",
            Verb::Pause => "pause requested (holds at the current step; analysis continues)",
            Verb::Resume => "resume requested",
            Verb::Retry => "retry requested (starting again from the first step)",
        }
    }
}

/// A client of one fledge server.
pub struct Client {
    base: String,
    http: reqwest::Client,
}

impl Client {
    pub fn new(server: &str) -> Self {
        let base = server.trim_end_matches('/').to_string();
        let base = if base.starts_with("http://") || base.starts_with("https://") {
            base
        } else {
            format!("http://{base}")
        };
        Client {
            base,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .unwrap_or_default(),
        }
    }

    async fn answer(
        &self,
        url: String,
        request: reqwest::RequestBuilder,
    ) -> Result<Value, ClientError> {
        let response = request.send().await.map_err(|e| ClientError::Unreachable {
            url: self.base.clone(),
            reason: if e.is_timeout() {
                "timed out".to_string()
            } else if e.is_connect() {
                "connection refused".to_string()
            } else {
                e.to_string()
            },
        })?;
        let status = response.status();
        let text = response.text().await.map_err(|e| ClientError::BadAnswer {
            url: url.clone(),
            reason: e.to_string(),
        })?;
        let value: Value = serde_json::from_str(&text).map_err(|e| ClientError::BadAnswer {
            url: url.clone(),
            reason: format!(
                "not JSON ({e}): {}",
                text.chars().take(120).collect::<String>()
            ),
        })?;
        if status.is_success() {
            Ok(value)
        } else {
            Err(ClientError::Refused {
                status: status.as_u16(),
                message: value["error"]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("{status}: {value}")),
            })
        }
    }

    /// `GET /api/v1/canaries` or `GET /api/v1/canaries/{name}`, as JSON.
    pub async fn status(&self, name: Option<&str>) -> Result<Value, ClientError> {
        let url = match name {
            Some(name) => format!("{}/api/v1/canaries/{name}", self.base),
            None => format!("{}/api/v1/canaries", self.base),
        };
        self.answer(url.clone(), self.http.get(&url)).await
    }

    /// `POST /api/v1/canaries/{name}/<verb>`.
    pub async fn send(&self, name: &str, verb: Verb) -> Result<Value, ClientError> {
        let url = format!("{}/api/v1/canaries/{name}/{}", self.base, verb.path());
        self.answer(url.clone(), self.http.post(&url)).await
    }
}

/// Where client commands go.
pub enum Target {
    /// The JSON API of `fledge run --listen`.
    Server(Client),
    /// `Canary` objects in a Kubernetes namespace (`fledge controller`).
    Kubernetes(Box<kube::KubeTarget>),
}

impl Target {
    fn describe(&self) -> String {
        match self {
            Target::Server(client) => client.base.clone(),
            Target::Kubernetes(kube) => kube.describe(),
        }
    }

    pub async fn status(&self, name: Option<&str>) -> Result<Value, ClientError> {
        match self {
            Target::Server(client) => client.status(name).await,
            Target::Kubernetes(kube) => kube.status(name).await,
        }
    }

    pub async fn send(&self, name: &str, verb: Verb) -> Result<Value, ClientError> {
        match self {
            Target::Server(client) => client.send(name, verb).await,
            Target::Kubernetes(kube) => kube.send(name, verb).await,
        }
    }
}

fn docs_of(value: &Value, url: &str) -> Result<Vec<CanaryDoc>, ClientError> {
    let items = match value {
        Value::Array(items) => items.clone(),
        single => vec![single.clone()],
    };
    items
        .into_iter()
        .map(|item| {
            serde_json::from_value::<CanaryDoc>(item).map_err(|e| ClientError::BadAnswer {
                url: url.to_string(),
                reason: format!("not a canary status: {e}"),
            })
        })
        .collect()
}

fn style_for_stdout() -> Style {
    Style {
        color: std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
    }
}

/// The text of one frame of `fledge status`.
pub fn render_frame(docs: &[CanaryDoc], single: bool, style: Style) -> String {
    if single {
        docs.iter()
            .map(|d| render::render_canary(d, style))
            .collect::<Vec<_>>()
            .join("\n")
    } else {
        render::render_list(docs, style)
    }
}

fn exit_for(docs: &[CanaryDoc]) -> u8 {
    if docs
        .iter()
        .any(|d| d.status.phase == fledge_core::rollout::Phase::RolledBack)
    {
        EXIT_ROLLED_BACK
    } else {
        EXIT_OK
    }
}

/// Print a client error as text (stderr) or JSON (stdout); returns its exit code.
pub fn report_error(output: Output, error: &ClientError) -> u8 {
    print_error(output, error)
}

fn print_error(output: Output, error: &ClientError) -> u8 {
    let code = error.exit_code();
    match output {
        Output::Json => println!(
            "{}",
            json!({ "error": error.to_string(), "exitCode": code })
        ),
        Output::Text => eprintln!("fledge: {error}"),
    }
    code
}

/// `fledge status [NAME] [--watch]`. With `--watch` the view is redrawn every `every` until
/// every shown canary is Promoted or RolledBack, or until Ctrl-C.
pub async fn status(
    target: &Target,
    name: Option<&str>,
    watch: bool,
    every: Duration,
    output: Output,
) -> u8 {
    let style = style_for_stdout();
    let tty = std::io::stdout().is_terminal();
    let url = target.describe();
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        let docs = match target.status(name).await {
            Ok(value) => match docs_of(&value, &url) {
                Ok(docs) => {
                    let mut out = std::io::stdout().lock();
                    let _ = match output {
                        Output::Json => writeln!(out, "{value}"),
                        Output::Text => {
                            let clear = if watch && tty { "\x1b[H\x1b[2J" } else { "" };
                            let stamp = if watch {
                                format!(
                                    "{}\n",
                                    style.dim_line(&format!(
                                        "fledge status — {} — every {}s, Ctrl-C to stop",
                                        chrono::Local::now().format("%H:%M:%S"),
                                        every.as_secs_f64()
                                    ))
                                )
                            } else {
                                String::new()
                            };
                            write!(
                                out,
                                "{clear}{stamp}{}{}",
                                render_frame(&docs, name.is_some(), style),
                                if watch && !tty { "\n" } else { "" }
                            )
                        }
                    };
                    let _ = out.flush();
                    docs
                }
                Err(e) => return print_error(output, &e),
            },
            Err(e) => return print_error(output, &e),
        };
        let done = !docs.is_empty() && docs.iter().all(|d| d.status.phase.is_terminal());
        if !watch || done {
            return exit_for(&docs);
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = &mut ctrl_c => return exit_for(&docs),
        }
    }
}

/// `fledge promote|abort|pause|resume|retry NAME`.
pub async fn command(target: &Target, name: &str, verb: Verb, output: Output) -> u8 {
    match target.send(name, verb).await {
        Ok(value) => {
            match output {
                Output::Json => println!("{value}"),
                Output::Text => println!("{name}: {}", verb.done()),
            }
            EXIT_OK
        }
        Err(e) => print_error(output, &e),
    }
}

impl Style {
    fn dim_line(self, text: &str) -> String {
        if self.color {
            format!("\x1b[2m{text}\x1b[0m")
        } else {
            text.to_string()
        }
    }
}

/// A warning of `fledge validate` as JSON: where it is, and the warning itself.
fn warning_json(doc: usize, canary: &str, warning: &Warning) -> Value {
    json!({
        "document": doc,
        "canary": canary,
        "code": warning.code,
        "field": warning.field,
        "message": warning.message,
        "fix": warning.fix,
    })
}

/// The `--output json` document of `fledge validate`: one entry per file, each with its
/// canaries, `errors` (exit code 2) and `warnings` (exit code 0), every one with field and fix.
pub fn validation_json(files: &[std::path::PathBuf]) -> (Value, u8) {
    let mut entries = Vec::new();
    let mut code = EXIT_OK;
    for file in files {
        let path = file.display().to_string();
        match crate::config::load_files(std::slice::from_ref(file)) {
            Ok(canaries) => {
                let warnings: Vec<Value> = canaries
                    .iter()
                    .enumerate()
                    .flat_map(|(i, c)| {
                        spec_warnings(c)
                            .iter()
                            .map(|w| warning_json(i + 1, c.name(), w))
                            .collect::<Vec<_>>()
                    })
                    .collect();
                entries.push(json!({
                    "file": path,
                    "valid": true,
                    "canaries": canaries
                        .iter()
                        .map(|c| json!({"name": c.name(), "steps": c.spec.analysis.plan().len()}))
                        .collect::<Vec<_>>(),
                    "errors": [],
                    "warnings": warnings,
                }))
            }
            Err(errors) => {
                code = EXIT_USAGE;
                let mut warnings = Vec::new();
                let errors: Vec<Value> = errors
                    .iter()
                    .flat_map(|error| match error {
                        crate::config::ConfigError::Invalid {
                            doc,
                            name,
                            errors,
                            warnings: found,
                            ..
                        } => {
                            warnings.extend(found.iter().map(|w| warning_json(*doc, name, w)));
                            errors
                                .0
                                .iter()
                                .map(|e| {
                                    json!({
                                        "document": doc,
                                        "canary": name,
                                        "field": e.field,
                                        "problem": e.problem,
                                        "fix": e.fix,
                                    })
                                })
                                .collect::<Vec<_>>()
                        }
                        other => vec![json!({ "problem": other.to_string() })],
                    })
                    .collect();
                entries.push(json!({
                    "file": path,
                    "valid": false,
                    "canaries": [],
                    "errors": errors,
                    "warnings": warnings,
                }));
            }
        }
    }
    (Value::Array(entries), code)
}

/// `fledge validate` as text: (stdout, stderr, exit code). Each valid canary gets a line and
/// its warnings below it on stdout (exit code 0); errors go to stderr (exit code 2).
pub fn validation_text(files: &[std::path::PathBuf]) -> (String, String, u8) {
    let warning_lines = |warnings: &[Warning]| -> String {
        warnings
            .iter()
            .map(|w| format!("  warning: {w}\n"))
            .collect()
    };
    match crate::config::load_files(files) {
        Ok(canaries) => {
            let mut out = String::new();
            for c in &canaries {
                let warnings = spec_warnings(c);
                let noted = match warnings.len() {
                    0 => String::new(),
                    1 => ", 1 warning".to_string(),
                    n => format!(", {n} warnings"),
                };
                out.push_str(&format!(
                    "{}: valid ({} steps){noted}\n",
                    c.name(),
                    c.spec.analysis.plan().len()
                ));
                out.push_str(&warning_lines(&warnings));
            }
            (out, String::new(), EXIT_OK)
        }
        Err(errors) => {
            let mut out = String::new();
            let mut err = String::from("fledge: invalid canary spec:\n");
            for error in &errors {
                err.push_str(&format!("{error}\n"));
                if let crate::config::ConfigError::Invalid { name, warnings, .. } = error {
                    if !warnings.is_empty() {
                        out.push_str(&format!("{name}: invalid (see the errors)\n"));
                        out.push_str(&warning_lines(warnings));
                    }
                }
            }
            (out, err, EXIT_USAGE)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verbs_map_to_api_paths() {
        assert_eq!(Verb::Promote { full: true }.path(), "promote?full=true");
        assert_eq!(Verb::Retry.path(), "retry");
    }

    #[test]
    fn client_errors_have_distinct_exit_codes() {
        let unreachable = ClientError::Unreachable {
            url: "http://127.0.0.1:1".into(),
            reason: "connection refused".into(),
        };
        assert_eq!(unreachable.exit_code(), EXIT_UNREACHABLE);
        assert!(unreachable.to_string().contains("FLEDGE_SERVER"));
        let refused = ClientError::Refused {
            status: 409,
            message: "finished".into(),
        };
        assert_eq!(refused.exit_code(), EXIT_REFUSED);
    }

    #[test]
    fn status_exits_1_when_a_shown_canary_is_rolled_back() {
        let doc = |phase: &str| -> CanaryDoc {
            serde_json::from_value(json!({
                "name": "app", "phase": phase, "canaryWeight": 0, "step": 0,
                "stepPassedChecks": 0, "failedChecks": 0, "message": "", "history": []
            }))
            .unwrap()
        };
        assert_eq!(exit_for(&[doc("Promoted"), doc("Progressing")]), EXIT_OK);
        assert_eq!(
            exit_for(&[doc("Promoted"), doc("RolledBack")]),
            EXIT_ROLLED_BACK
        );
        let frame = render_frame(&[doc("RolledBack")], true, Style::PLAIN);
        assert!(frame.starts_with("app  RolledBack\n"), "{frame}");
    }

    #[test]
    fn a_server_without_scheme_gets_http() {
        assert_eq!(Client::new("127.0.0.1:9090/").base, "http://127.0.0.1:9090");
    }

    #[test]
    fn validation_json_names_field_and_fix() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad.yaml");
        std::fs::write(
            &bad,
            "apiVersion: fledge.dev/v1alpha1\nkind: Canary\nmetadata: {name: app}\nspec:\n  service: app\n  stable: {subset: stable}\n  canary: {subset: canary}\n  metricsSource: {envoyAdmin: {urls: [\"http://127.0.0.1:9901\"]}}\n  router: {envoyRds: {path: /tmp/r, routeConfiguration: r, virtualHost: v, route: r, stableCluster: s, canaryCluster: c, adminUrl: \"http://127.0.0.1:9901\"}}\n  analysis: {threshold: 0, steps: [{setWeight: 50}, {pause: {}}], compareWithStable: {}}\n  webhooks: [{name: gate, type: confirm-promotion, url: ftp://x}]\n",
        )
        .unwrap();
        let (value, code) = validation_json(&[bad]);
        assert_eq!(code, EXIT_USAGE);
        let fields: Vec<&str> = value[0]["errors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["field"].as_str().unwrap())
            .collect();
        assert_eq!(
            fields,
            vec!["spec.analysis.threshold", "spec.webhooks[0].url"]
        );
        assert!(value[0]["errors"][0]["fix"]
            .as_str()
            .unwrap()
            .contains("threshold: 5"));
        let warnings = value[0]["warnings"].as_array().unwrap();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert_eq!(warnings[0]["field"], "spec.analysis.steps[1].pause");
        assert_eq!(warnings[0]["code"], "indefinitePause");
        assert!(warnings[0]["fix"]
            .as_str()
            .unwrap()
            .contains("pause: {duration: 5m}"));
    }

    #[test]
    fn validate_prints_warnings_with_exit_0_and_errors_with_exit_2() {
        let dir = tempfile::tempdir().unwrap();
        let spec = |analysis: &str| {
            format!(
                "apiVersion: fledge.dev/v1alpha1\nkind: Canary\nmetadata: {{name: app}}\nspec:\n  service: app\n  stable: {{subset: stable}}\n  canary: {{subset: canary}}\n  metricsSource: {{envoyAdmin: {{urls: [\"http://127.0.0.1:9901\"]}}}}\n  router: {{envoyRds: {{path: /tmp/r, routeConfiguration: r, virtualHost: v, route: r, stableCluster: s, canaryCluster: c, adminUrl: \"http://127.0.0.1:9901\"}}}}\n  analysis: {analysis}\n"
            )
        };
        let unchecked = dir.path().join("unchecked.yaml");
        std::fs::write(&unchecked, spec("{unchecked: true, stepWeights: [50]}")).unwrap();
        let (out, err, code) = validation_text(std::slice::from_ref(&unchecked));
        assert_eq!(code, EXIT_OK, "{err}");
        assert_eq!(err, "");
        assert_eq!(
            out,
            "app: valid (1 steps), 1 warning\n  warning: spec.analysis.unchecked: no checks: the canary is promoted on traffic alone, whatever its errors or latency; add `compareWithStable: {}`, `metrics` or `sloBurnRate`, then remove `unchecked: true`\n"
        );
        let (json, code) = validation_json(std::slice::from_ref(&unchecked));
        assert_eq!(code, EXIT_OK);
        assert_eq!(json[0]["valid"], true);
        assert_eq!(json[0]["warnings"][0]["code"], "unchecked");

        let none = dir.path().join("none.yaml");
        std::fs::write(&none, spec("{stepWeights: [50]}")).unwrap();
        let (out, err, code) = validation_text(std::slice::from_ref(&none));
        assert_eq!(code, EXIT_USAGE);
        assert_eq!(out, "");
        assert!(
            err.contains("spec.analysis: has no checks: nothing would stop a failing canary from being promoted"),
            "{err}"
        );
        assert!(
            err.contains("or write `unchecked: true` to promote on traffic alone"),
            "{err}"
        );
    }
}
