//! Calling a canary's webhooks (`spec.webhooks`) and turning their answers into
//! [`Gates`] for the pure state machine.
//!
//! Every call is an HTTP `POST` of JSON with a per-attempt `timeout`. A 2xx answer is success;
//! a 4xx answer is final (no retry); a timeout, a connection error or a 5xx is tried again up to
//! `retries` times with a short backoff. Each hook's last call (when, outcome, attempts, time)
//! is kept for the status API, so a failing hook is visible next to the canary.
//!
//! How answers are used (the hook points of Flagger):
//! - `pre-rollout` (while Initializing) and `rollout` (every interval while the rollout runs):
//!   a failure counts as one failed check ([`Gates::hook_failure`]).
//! - `confirm-promotion`: asked when a decision would promote; anything but 2xx holds the
//!   promotion ([`Gates::promotion_held`]; see [`crate::tick`], which asks). `promote --full`
//!   is an operator override and is not held.
//! - `rollback`: asked every interval while the rollout runs; a 2xx answer rolls back
//!   ([`Gates::rollback_requested`]).
//! - `confirm-rollout` (with `targetRef`): asked while a new revision waits to be scaled up;
//!   anything but 2xx keeps it waiting.
//! - `post-rollout`: called once after Promoted or RolledBack (with `targetRef`: once the
//!   release is over, Succeeded or Failed, the target back at 0 replicas).
//! - `event`: every event of the state machine, sent in the background (generic JSON, or a
//!   Slack incoming-webhook message with `payload: slack`).

use crate::telemetry::Telemetry;
use chrono::{DateTime, Utc};
use fledge_core::rollout::{Action, CanaryStatus, EventReason, Gates, Phase};
use fledge_core::spec::Canary;
use fledge_core::webhook::{WebhookPayload, WebhookSpec, WebhookType};
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::task::JoinSet;

/// The result of one webhook call, all attempts included.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CallRecord {
    pub at: DateTime<Utc>,
    /// The hook answered 2xx.
    pub ok: bool,
    /// The last HTTP status, if any answer came.
    pub status_code: Option<u16>,
    pub attempts: u32,
    pub duration_ms: u64,
    /// One line: `answered 200 OK`, `answered 403 Forbidden (final)`, `timed out after 2s`, ...
    pub detail: String,
}

/// A webhook and its last call, as the status API shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WebhookStatus {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub url: String,
    pub last_call: Option<CallRecord>,
    /// Calls in a row that did not answer 2xx.
    pub failures_in_a_row: u32,
}

/// Everything sent to a hook.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HookContext {
    pub name: String,
    pub namespace: String,
    pub service: String,
    pub phase: Phase,
    pub canary_weight: u8,
    /// 0-based index of the current step, and the number of steps.
    pub step: usize,
    pub steps: usize,
    pub failed_checks: u32,
    pub message: String,
}

impl HookContext {
    pub fn new(canary: &Canary, status: &CanaryStatus) -> Self {
        HookContext {
            name: canary.name().to_string(),
            namespace: canary.metadata.namespace.clone().unwrap_or_default(),
            service: canary.spec.service.clone(),
            phase: status.phase,
            canary_weight: status.canary_weight,
            step: status.step,
            steps: canary.spec.analysis.plan().len(),
            failed_checks: status.failed_checks,
            message: status.message.clone(),
        }
    }
}

/// The JSON body of a call: the context, the hook's type and metadata, and the event if any.
pub fn generic_body(
    hook: &WebhookSpec,
    context: &HookContext,
    event: Option<(EventReason, bool, &str)>,
) -> Value {
    let mut body = json!({
        "type": hook.kind.as_str(),
        "webhook": hook.name,
        "canary": context,
        "metadata": hook.metadata,
    });
    if let Some((reason, warning, message)) = event {
        body["event"] = json!({
            "reason": reason,
            "warning": warning,
            "message": message,
        });
    }
    body
}

/// A Slack incoming-webhook message for one event.
pub fn slack_body(
    context: &HookContext,
    reason: EventReason,
    warning: bool,
    message: &str,
) -> Value {
    let (icon, color) = match reason {
        EventReason::Promoted => (":white_check_mark:", "good"),
        EventReason::RollbackTriggered => (":rotating_light:", "danger"),
        _ if warning => (":warning:", "warning"),
        _ => (":arrow_forward:", "#439FE0"),
    };
    let canary = if context.namespace.is_empty() {
        context.name.clone()
    } else {
        format!("{}/{}", context.namespace, context.name)
    };
    json!({
        "text": format!("{icon} *{canary}* {:?}: {message}", context.phase),
        "attachments": [{
            "color": color,
            "fields": [
                {"title": "Phase", "value": format!("{:?}", context.phase), "short": true},
                {"title": "Canary weight", "value": format!("{}%", context.canary_weight), "short": true},
                {"title": "Step", "value": format!("{}/{}", (context.step + 1).min(context.steps), context.steps), "short": true},
                {"title": "Failed checks", "value": context.failed_checks.to_string(), "short": true},
            ],
        }],
    })
}

/// POST `body` to `url` with the hook's timeout and retries; never panics, never errors:
/// the outcome says what happened.
pub async fn call(client: &reqwest::Client, hook: &WebhookSpec, body: &Value) -> CallRecord {
    let started = Instant::now();
    let at = Utc::now();
    let mut attempts = 0;
    let mut status_code = None;
    let detail = loop {
        attempts += 1;
        let result = client
            .post(&hook.url)
            .timeout(hook.timeout.0)
            .json(body)
            .send()
            .await;
        let (retryable, detail) = match result {
            Ok(response) => {
                let status = response.status();
                status_code = Some(status.as_u16());
                if status.is_success() {
                    break format!("answered {status}");
                }
                if status.is_client_error() {
                    break format!("answered {status} (final)");
                }
                (true, format!("answered {status}"))
            }
            Err(e) if e.is_timeout() => (true, format!("timed out after {}", hook.timeout)),
            Err(e) if e.is_connect() => (true, format!("cannot connect to {}", hook.url)),
            Err(e) => (true, format!("request failed: {e}")),
        };
        if !retryable || attempts > hook.retries {
            break detail;
        }
        let backoff = Duration::from_millis(200u64 << attempts.min(4));
        tokio::time::sleep(backoff).await;
    };
    let ok =
        status_code.is_some_and(|c| (200..300).contains(&c)) && detail.starts_with("answered 2");
    CallRecord {
        at,
        ok,
        status_code,
        attempts,
        duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        detail: if attempts > 1 {
            format!("{detail} ({attempts} attempts)")
        } else {
            detail
        },
    }
}

/// Calls one canary's webhooks and remembers their outcomes.
pub struct WebhookCaller {
    canary: Canary,
    /// The canary's name in self-metrics and logs (`namespace/name` in Kubernetes mode).
    label: String,
    client: reqwest::Client,
    telemetry: Telemetry,
    statuses: Arc<Mutex<BTreeMap<String, WebhookStatus>>>,
    background: JoinSet<()>,
}

fn remember(
    statuses: &Mutex<BTreeMap<String, WebhookStatus>>,
    telemetry: &Telemetry,
    canary: &str,
    hook: &WebhookSpec,
    record: &CallRecord,
) {
    telemetry.record_webhook(
        canary,
        &hook.name,
        hook.kind.as_str(),
        record.ok,
        Duration::from_millis(record.duration_ms),
    );
    if record.ok {
        tracing::debug!(canary, webhook = %hook.name, detail = %record.detail, "webhook call");
    } else {
        tracing::warn!(canary, webhook = %hook.name, kind = hook.kind.as_str(), detail = %record.detail, "webhook call did not answer 2xx");
    }
    let mut map = match statuses.lock() {
        Ok(map) => map,
        Err(poisoned) => poisoned.into_inner(),
    };
    if let Some(status) = map.get_mut(&hook.name) {
        status.failures_in_a_row = if record.ok {
            0
        } else {
            status.failures_in_a_row + 1
        };
        status.last_call = Some(record.clone());
    }
}

impl WebhookCaller {
    pub fn new(canary: &Canary, telemetry: Telemetry) -> Self {
        let statuses = canary
            .spec
            .webhooks
            .iter()
            .map(|hook| {
                (
                    hook.name.clone(),
                    WebhookStatus {
                        name: hook.name.clone(),
                        kind: hook.kind.as_str(),
                        url: hook.url.clone(),
                        last_call: None,
                        failures_in_a_row: 0,
                    },
                )
            })
            .collect();
        WebhookCaller {
            label: canary.name().to_string(),
            canary: canary.clone(),
            client: crate::http::client(),
            telemetry,
            statuses: Arc::new(Mutex::new(statuses)),
            background: JoinSet::new(),
        }
    }

    /// Name the canary `label` in self-metrics and logs (default: its name).
    pub fn labelled(mut self, label: &str) -> Self {
        self.label = label.to_string();
        self
    }

    fn hooks(&self, kind: WebhookType) -> Vec<WebhookSpec> {
        self.canary
            .spec
            .webhooks
            .iter()
            .filter(|h| h.kind == kind)
            .cloned()
            .collect()
    }

    pub fn has(&self, kind: WebhookType) -> bool {
        self.canary.spec.webhooks.iter().any(|h| h.kind == kind)
    }

    /// Every webhook in spec order with its last call.
    pub fn statuses(&self) -> Vec<WebhookStatus> {
        let map = match self.statuses.lock() {
            Ok(map) => map,
            Err(poisoned) => poisoned.into_inner(),
        };
        self.canary
            .spec
            .webhooks
            .iter()
            .filter_map(|h| map.get(&h.name).cloned())
            .collect()
    }

    async fn call_and_remember(&self, hook: &WebhookSpec, body: &Value) -> CallRecord {
        let record = call(&self.client, hook, body).await;
        remember(&self.statuses, &self.telemetry, &self.label, hook, &record);
        record
    }

    /// Ask the hooks that run before an analysis interval: `rollback` (while running), then
    /// `pre-rollout` (while Initializing) or `rollout` (while running).
    pub async fn before_interval(&self, status: &CanaryStatus) -> Gates {
        let mut gates = Gates::default();
        if status.phase.is_terminal() {
            return gates;
        }
        let context = HookContext::new(&self.canary, status);
        if status.phase != Phase::Initializing {
            for hook in self.hooks(WebhookType::Rollback) {
                let record = self
                    .call_and_remember(&hook, &generic_body(&hook, &context, None))
                    .await;
                if record.ok {
                    gates.rollback_requested = Some(format!(
                        "rollback webhook {:?} asked for a rollback ({})",
                        hook.name, record.detail
                    ));
                    return gates;
                }
            }
        }
        let kind = if status.phase == Phase::Initializing {
            WebhookType::PreRollout
        } else {
            WebhookType::Rollout
        };
        for hook in self.hooks(kind) {
            let record = self
                .call_and_remember(&hook, &generic_body(&hook, &context, None))
                .await;
            if !record.ok {
                gates.hook_failure = Some(format!(
                    "{} webhook {:?} failed: {}",
                    kind.as_str(),
                    hook.name,
                    record.detail
                ));
                break;
            }
        }
        gates
    }

    /// Ask every `confirm-rollout` hook (with `targetRef`, before a new revision is scaled
    /// up); `Err(reason)` when one does not approve.
    pub async fn confirm_rollout(&self, status: &CanaryStatus) -> Result<(), String> {
        let context = HookContext::new(&self.canary, status);
        for hook in self.hooks(WebhookType::ConfirmRollout) {
            let record = self
                .call_and_remember(&hook, &generic_body(&hook, &context, None))
                .await;
            if !record.ok {
                return Err(format!(
                    "confirm-rollout webhook {:?} did not approve ({})",
                    hook.name, record.detail
                ));
            }
        }
        Ok(())
    }

    /// Ask every `confirm-promotion` hook; `Some(reason)` when one does not approve.
    pub async fn confirm_promotion(&self, status: &CanaryStatus) -> Option<String> {
        let context = HookContext::new(&self.canary, status);
        for hook in self.hooks(WebhookType::ConfirmPromotion) {
            let record = self
                .call_and_remember(&hook, &generic_body(&hook, &context, None))
                .await;
            if !record.ok {
                return Some(format!(
                    "waiting for confirm-promotion webhook {:?} ({})",
                    hook.name, record.detail
                ));
            }
        }
        None
    }

    /// Call the `post-rollout` hooks (once the rollout is Promoted or RolledBack).
    pub async fn post_rollout(&self, status: &CanaryStatus) {
        let context = HookContext::new(&self.canary, status);
        for hook in self.hooks(WebhookType::PostRollout) {
            self.call_and_remember(&hook, &generic_body(&hook, &context, None))
                .await;
        }
    }

    /// Send the events of a decision to the `event` hooks, in the background.
    pub fn notify(&mut self, status: &CanaryStatus, actions: &[Action]) {
        let hooks = self.hooks(WebhookType::Event);
        if hooks.is_empty() {
            return;
        }
        let context = HookContext::new(&self.canary, status);
        for action in actions {
            let Action::Event {
                reason,
                warning,
                message,
            } = action
            else {
                continue;
            };
            for hook in &hooks {
                let body = match hook.payload {
                    WebhookPayload::Generic => {
                        generic_body(hook, &context, Some((*reason, *warning, message)))
                    }
                    WebhookPayload::Slack => slack_body(&context, *reason, *warning, message),
                };
                let client = self.client.clone();
                let hook = hook.clone();
                let statuses = self.statuses.clone();
                let telemetry = self.telemetry.clone();
                let canary = self.label.clone();
                self.background.spawn(async move {
                    let record = call(&client, &hook, &body).await;
                    remember(&statuses, &telemetry, &canary, &hook, &record);
                });
            }
        }
        // Reap finished notifications so the set does not grow.
        while self.background.try_join_next().is_some() {}
    }

    /// Wait for notifications still in flight (each is bounded by its timeout and retries).
    pub async fn drain(&mut self) {
        while self.background.join_next().await.is_some() {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fledge_testkit::http::{FakeEndpoint, Reply};
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A local receiver: `/ok` answers 200, `/deny` 403, `/flaky` 503 twice then 200,
    /// `/slow` 200 after 2 s, anything else 404. Every request is recorded.
    async fn start_receiver() -> (String, FakeEndpoint) {
        let flaky = AtomicU32::new(0);
        let receiver =
            FakeEndpoint::start_with_fallback(move |request| match request.path.as_str() {
                "/flaky" if flaky.fetch_add(1, Ordering::SeqCst) < 2 => Reply::status(503),
                "/ok" | "/flaky" => Reply::status(200),
                "/deny" => Reply::status(403),
                "/slow" => Reply::Slow(Duration::from_secs(2)),
                _ => Reply::status(404),
            })
            .await
            .unwrap();
        (receiver.url().to_string(), receiver)
    }

    /// The JSON bodies the receiver got, in order, with their paths.
    fn bodies(receiver: &FakeEndpoint) -> Vec<(String, Value)> {
        receiver
            .requests()
            .into_iter()
            .map(|r| (r.path, serde_json::from_str(&r.body).unwrap_or(Value::Null)))
            .collect()
    }

    fn canary_with(hooks: &str) -> Canary {
        let yaml = format!(
            "apiVersion: fledge.dev/v1alpha1
kind: Canary
metadata: {{name: app}}
spec:
  service: app
  stable: {{subset: stable}}
  canary: {{subset: canary}}
  metricsSource: {{envoyAdmin: {{urls: [\"http://127.0.0.1:9901\"]}}}}
  router:
    envoyRds: {{path: /tmp/r.json, routeConfiguration: r, virtualHost: v, route: r, stableCluster: s, canaryCluster: c, adminUrl: \"http://127.0.0.1:9901\"}}
  analysis: {{interval: 10s, steps: [{{setWeight: 50}}], compareWithStable: {{}}}}
  webhooks:
{hooks}"
        );
        let canary: Canary = serde_yaml::from_str(&yaml).unwrap();
        canary.validate().unwrap();
        canary
    }

    fn running() -> CanaryStatus {
        CanaryStatus {
            phase: Phase::Progressing,
            canary_weight: 50,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn gates_from_answers_with_retries_timeouts_and_final_4xx() {
        let (base, receiver) = start_receiver().await;
        let canary = canary_with(&format!(
            "    - {{name: load, type: rollout, url: \"{base}/flaky\", retries: 2}}
    - {{name: approve, type: confirm-promotion, url: \"{base}/deny\", retries: 3}}
    - {{name: pager, type: rollback, url: \"{base}/missing\"}}
    - {{name: smoke, type: pre-rollout, url: \"{base}/slow\", timeout: 200ms, retries: 1}}
"
        ));
        let caller = WebhookCaller::new(&canary, Telemetry::new());

        // rollout: 503, 503, 200 → passes on the third attempt; rollback answers 404 → no rollback.
        let gates = caller.before_interval(&running()).await;
        assert_eq!(gates, Gates::default());
        let statuses = caller.statuses();
        let load = statuses.iter().find(|s| s.name == "load").unwrap();
        let call = load.last_call.as_ref().unwrap();
        assert!(call.ok && call.attempts == 3, "{call:?}");
        let pager = statuses.iter().find(|s| s.name == "pager").unwrap();
        assert_eq!(pager.last_call.as_ref().unwrap().status_code, Some(404));

        // confirm-promotion: 403 is final (one attempt despite retries: 3).
        let held = caller.confirm_promotion(&running()).await.unwrap();
        assert!(
            held.contains("\"approve\"") && held.contains("403"),
            "{held}"
        );
        let approve = caller
            .statuses()
            .into_iter()
            .find(|s| s.name == "approve")
            .unwrap();
        assert_eq!(approve.last_call.unwrap().attempts, 1);
        assert_eq!(approve.failures_in_a_row, 1);

        // pre-rollout: times out twice → a hook failure that says so.
        let gates = caller.before_interval(&CanaryStatus::default()).await;
        let failure = gates.hook_failure.unwrap();
        assert!(
            failure.contains(
                "pre-rollout webhook \"smoke\" failed: timed out after 200ms (2 attempts)"
            ),
            "{failure}"
        );

        let bodies = bodies(&receiver);
        let (_, first) = &bodies[0];
        assert_eq!(first["type"], "rollback");
        assert_eq!(first["canary"]["name"], "app");
        assert_eq!(first["canary"]["canaryWeight"], 50);
    }

    #[tokio::test]
    async fn a_2xx_rollback_hook_asks_for_a_rollback() {
        let (base, _receiver) = start_receiver().await;
        let canary = canary_with(&format!(
            "    - {{name: pager, type: rollback, url: \"{base}/ok\"}}\n"
        ));
        let caller = WebhookCaller::new(&canary, Telemetry::new());
        let gates = caller.before_interval(&running()).await;
        assert!(gates
            .rollback_requested
            .unwrap()
            .contains("rollback webhook \"pager\" asked for a rollback"));
        // Not asked before the rollout starts.
        let gates = caller.before_interval(&CanaryStatus::default()).await;
        assert_eq!(gates, Gates::default());
    }

    #[tokio::test]
    async fn events_go_out_as_generic_json_or_slack_messages() {
        let (base, receiver) = start_receiver().await;
        let canary = canary_with(&format!(
            "    - {{name: audit, type: event, url: \"{base}/ok\", metadata: {{team: payments}}}}
    - {{name: chat, type: event, url: \"{base}/ok\", payload: slack}}
"
        ));
        let mut caller = WebhookCaller::new(&canary, Telemetry::new());
        let status = CanaryStatus {
            phase: Phase::RolledBack,
            ..Default::default()
        };
        caller.notify(
            &status,
            &[
                Action::SetWeight { canary: 0 },
                Action::Event {
                    reason: EventReason::RollbackTriggered,
                    warning: true,
                    message: "rolling back: success rate 80%".into(),
                },
            ],
        );
        caller.drain().await;
        let bodies = bodies(&receiver);
        assert_eq!(bodies.len(), 2);
        let generic = bodies.iter().find(|(_, b)| b["type"] == "event").unwrap();
        assert_eq!(generic.1["event"]["reason"], "RollbackTriggered");
        assert_eq!(generic.1["metadata"]["team"], "payments");
        let slack = bodies
            .iter()
            .find(|(_, b)| b.get("text").is_some())
            .unwrap();
        let text = slack.1["text"].as_str().unwrap();
        assert!(
            text.starts_with(":rotating_light: *app* RolledBack: rolling back"),
            "{text}"
        );
        assert_eq!(slack.1["attachments"][0]["color"], "danger");
        assert!(caller
            .statuses()
            .iter()
            .all(|s| s.last_call.as_ref().unwrap().ok));
    }
}
