//! Webhooks in a Canary spec (`spec.webhooks`): Flagger's hook points, and their validation.
//!
//! The state machine never calls out. The controller calls the hooks and hands their answers
//! to [`crate::rollout::step_with_gates`] as [`crate::rollout::Gates`]:
//!
//! | type | when the controller calls it | what its answer does |
//! | --- | --- | --- |
//! | `confirm-rollout` | with `targetRef`: before the target is scaled up for a new revision | not 2xx → the new revision waits (nothing scaled, no traffic) |
//! | `pre-rollout` | before the first step (Initializing) | not 2xx → one failed check, the rollout waits |
//! | `rollout` | every interval while the rollout runs (e.g. a load test) | not 2xx → one failed check |
//! | `confirm-promotion` | when the last step passed and promotion is next | not 2xx → promotion held |
//! | `post-rollout` | once, after Promoted or RolledBack | recorded only |
//! | `rollback` | every interval while the rollout runs | 2xx → roll back now |
//! | `event` | every event (advance, pause, halt, failure, promotion, rollback) | recorded only |

use crate::duration::HumanDuration;
use crate::names::is_dns_label;
use crate::spec::SpecError;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// Where in a rollout a webhook is called.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "kebab-case")]
pub enum WebhookType {
    ConfirmRollout,
    PreRollout,
    Rollout,
    ConfirmPromotion,
    PostRollout,
    Rollback,
    Event,
}

impl WebhookType {
    pub const ALL: [WebhookType; 7] = [
        WebhookType::ConfirmRollout,
        WebhookType::PreRollout,
        WebhookType::Rollout,
        WebhookType::ConfirmPromotion,
        WebhookType::PostRollout,
        WebhookType::Rollback,
        WebhookType::Event,
    ];

    /// The name used in specs, metrics and the API (`pre-rollout`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            WebhookType::ConfirmRollout => "confirm-rollout",
            WebhookType::PreRollout => "pre-rollout",
            WebhookType::Rollout => "rollout",
            WebhookType::ConfirmPromotion => "confirm-promotion",
            WebhookType::PostRollout => "post-rollout",
            WebhookType::Rollback => "rollback",
            WebhookType::Event => "event",
        }
    }
}

/// The body sent to an `event` webhook.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum WebhookPayload {
    /// Fledge's JSON (canary, phase, weight, step, event, message, metadata).
    #[default]
    Generic,
    /// A Slack incoming-webhook message (`{"text": ..., "attachments": [...]}`).
    Slack,
}

fn is_generic(payload: &WebhookPayload) -> bool {
    *payload == WebhookPayload::Generic
}

/// One webhook of a Canary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WebhookSpec {
    /// A name unique within the canary; shown in status, logs and metrics.
    pub name: String,
    #[serde(rename = "type")]
    pub kind: WebhookType,
    /// The URL POSTed to (http or https).
    pub url: String,
    /// Per-attempt timeout (a duration, above 0 and at most 300s). Default 10s.
    #[serde(default = "default_timeout")]
    pub timeout: HumanDuration,
    /// Further attempts (a count, at most 10) after a timeout, connection error or 5xx (a 4xx
    /// answer is final).
    /// Default 2.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Sent as `metadata` in the JSON body (e.g. the load test command).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    /// `event` hooks only: `generic` (default) or `slack`.
    #[serde(default, skip_serializing_if = "is_generic")]
    pub payload: WebhookPayload,
}

fn default_timeout() -> HumanDuration {
    HumanDuration::from_secs(10)
}

fn default_retries() -> u32 {
    2
}

/// Most retries a webhook may ask for.
pub const MAX_RETRIES: u32 = 10;
/// Longest per-attempt timeout.
pub const MAX_TIMEOUT_SECS: u64 = 300;

/// Every problem in `spec.webhooks`, each naming the field and the fix.
pub fn validate(webhooks: &[WebhookSpec]) -> Vec<SpecError> {
    let mut problems = Vec::new();
    let mut add = |field: String, problem: String, fix: &str| {
        problems.push(SpecError {
            field,
            problem,
            fix: fix.to_string(),
        })
    };
    let mut seen = BTreeSet::new();
    for (i, hook) in webhooks.iter().enumerate() {
        let base = format!("spec.webhooks[{i}]");
        if !is_dns_label(&hook.name) {
            add(
                format!("{base}.name"),
                format!("{:?} is not a valid name", hook.name),
                "use 1-63 lowercase letters, digits or '-', e.g. `name: load-test`",
            );
        } else if !seen.insert(hook.name.as_str()) {
            add(
                format!("{base}.name"),
                format!("{:?} is used by another webhook", hook.name),
                "give every webhook its own name",
            );
        }
        let url_ok = (hook.url.starts_with("http://") && hook.url.len() > 7)
            || (hook.url.starts_with("https://") && hook.url.len() > 8);
        if !url_ok {
            add(
                format!("{base}.url"),
                format!("{:?} is not an http(s) URL", hook.url),
                "write the URL to POST to, e.g. `url: http://loadtester.test/gate/approve`",
            );
        }
        let millis = hook.timeout.as_millis();
        if millis == 0 || millis > MAX_TIMEOUT_SECS * 1000 {
            add(
                format!("{base}.timeout"),
                format!(
                    "{} is not above 0 and at most {MAX_TIMEOUT_SECS}s",
                    hook.timeout
                ),
                "write e.g. `timeout: 10s`",
            );
        }
        if hook.retries > MAX_RETRIES {
            add(
                format!("{base}.retries"),
                format!("{} retries is above {MAX_RETRIES}", hook.retries),
                "write how many times a failed call is tried again, e.g. `retries: 2`",
            );
        }
        if hook.payload == WebhookPayload::Slack && hook.kind != WebhookType::Event {
            add(
                format!("{base}.payload"),
                format!(
                    "`slack` is only for `type: event` (this is `{}`)",
                    hook.kind.as_str()
                ),
                "drop `payload`, or use `type: event` for a Slack notification",
            );
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Vec<WebhookSpec> {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn parses_every_type_with_defaults() {
        let hooks = parse(
            "
- {name: approve-release, type: confirm-rollout, url: http://t/gate/rollout}
- {name: smoke, type: pre-rollout, url: http://t/smoke}
- {name: load-test, type: rollout, url: http://t/load, timeout: 5s, retries: 0, metadata: {cmd: hey}}
- {name: approve, type: confirm-promotion, url: http://t/gate}
- {name: cleanup, type: post-rollout, url: http://t/done}
- {name: pager, type: rollback, url: http://t/rollback}
- {name: slack, type: event, url: https://hooks.slack.test/x, payload: slack}
",
        );
        let kinds: Vec<WebhookType> = hooks.iter().map(|h| h.kind).collect();
        assert_eq!(kinds, WebhookType::ALL.to_vec());
        assert_eq!(hooks[0].timeout, HumanDuration::from_secs(10));
        assert_eq!(hooks[0].retries, 2);
        assert_eq!(hooks[2].metadata["cmd"], "hey");
        assert_eq!(hooks[6].payload, WebhookPayload::Slack);
        assert_eq!(validate(&hooks), vec![]);
        for kind in WebhookType::ALL {
            let text = serde_json::to_string(&kind).unwrap();
            assert_eq!(text, format!("\"{}\"", kind.as_str()));
        }
    }

    #[test]
    fn unknown_types_and_fields_are_rejected_at_parse_time() {
        assert!(serde_yaml::from_str::<Vec<WebhookSpec>>(
            "[{name: a, type: confirm-traffic-increase, url: http://t}]"
        )
        .is_err());
        assert!(serde_yaml::from_str::<Vec<WebhookSpec>>(
            "[{name: a, type: event, url: http://t, retry: 3}]"
        )
        .is_err());
    }

    #[test]
    fn every_problem_names_its_field() {
        let hooks = parse(
            "
- {name: Load_Test, type: rollout, url: ftp://x}
- {name: gate, type: confirm-promotion, url: http://t, timeout: 0s, retries: 11}
- {name: gate, type: rollout, url: http://t, payload: slack}
",
        );
        let fields: Vec<String> = validate(&hooks).into_iter().map(|e| e.field).collect();
        assert_eq!(
            fields,
            vec![
                "spec.webhooks[0].name",
                "spec.webhooks[0].url",
                "spec.webhooks[1].timeout",
                "spec.webhooks[1].retries",
                "spec.webhooks[2].name",
                "spec.webhooks[2].payload",
            ]
        );
    }
}
