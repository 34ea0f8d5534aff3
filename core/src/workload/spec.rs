//! The workload fields of a Canary spec (`targetRef`, `autoscalerRef`, `progressDeadline`,
//! `trackLabel`, `scaleDownDelay`, `revertOnDeletion`) and their validation.

use crate::duration::HumanDuration;
use crate::names::is_object_name;
use crate::spec::{CanarySpec, Problems, SpecError};
use crate::webhook::WebhookType;
use serde::{Deserialize, Serialize};

/// The pod label telling the primary's pods (`stable`) from the target's (`canary`).
pub const DEFAULT_TRACK_LABEL: &str = "fledge.dev/track";
/// Track label value on the primary's pods.
pub const TRACK_STABLE: &str = "stable";
/// Track label value on the target's pods (written in Git).
pub const TRACK_CANARY: &str = "canary";
/// Suffix of the primary Deployment's (and HPA's) name.
pub const PRIMARY_SUFFIX: &str = "-primary";
pub const DEFAULT_PROGRESS_DEADLINE: HumanDuration = HumanDuration::from_secs(600);
pub const DEFAULT_SCALE_DOWN_DELAY: HumanDuration = HumanDuration::from_secs(30);

fn apps_v1() -> String {
    "apps/v1".to_string()
}
fn deployment() -> String {
    "Deployment".to_string()
}
fn autoscaling_v2() -> String {
    "autoscaling/v2".to_string()
}
fn horizontal_pod_autoscaler() -> String {
    "HorizontalPodAutoscaler".to_string()
}

/// `spec.targetRef`: the Deployment whose pod template changes are released.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TargetRef {
    /// Only `apps/v1`.
    #[serde(default = "apps_v1")]
    pub api_version: String,
    /// Only `Deployment`.
    #[serde(default = "deployment")]
    pub kind: String,
    /// The Deployment's name, in the Canary's namespace.
    pub name: String,
}

impl TargetRef {
    pub fn deployment(name: &str) -> Self {
        TargetRef {
            api_version: apps_v1(),
            kind: deployment(),
            name: name.to_string(),
        }
    }

    /// The name of the primary copy: `<name>-primary`.
    pub fn primary_name(&self) -> String {
        format!("{}{PRIMARY_SUFFIX}", self.name)
    }
}

/// `spec.autoscalerRef`: the target's HorizontalPodAutoscaler.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AutoscalerRef {
    /// Only `autoscaling/v2`.
    #[serde(default = "autoscaling_v2")]
    pub api_version: String,
    /// Only `HorizontalPodAutoscaler`.
    #[serde(default = "horizontal_pod_autoscaler")]
    pub kind: String,
    /// The HPA's name, in the Canary's namespace; it must scale the target.
    pub name: String,
}

impl AutoscalerRef {
    pub fn named(name: &str) -> Self {
        AutoscalerRef {
            api_version: autoscaling_v2(),
            kind: horizontal_pod_autoscaler(),
            name: name.to_string(),
        }
    }

    /// The name of the primary's copy: `<name>-primary`.
    pub fn primary_name(&self) -> String {
        format!("{}{PRIMARY_SUFFIX}", self.name)
    }
}

impl CanarySpec {
    /// The track label (`trackLabel`, default [`DEFAULT_TRACK_LABEL`]).
    pub fn track_label(&self) -> &str {
        self.track_label.as_deref().unwrap_or(DEFAULT_TRACK_LABEL)
    }

    /// `progressDeadline`, default [`DEFAULT_PROGRESS_DEADLINE`].
    pub fn progress_deadline(&self) -> HumanDuration {
        self.progress_deadline.unwrap_or(DEFAULT_PROGRESS_DEADLINE)
    }

    /// `scaleDownDelay`, default [`DEFAULT_SCALE_DOWN_DELAY`].
    pub fn scale_down_delay(&self) -> HumanDuration {
        self.scale_down_delay.unwrap_or(DEFAULT_SCALE_DOWN_DELAY)
    }
}

/// A Kubernetes label key: an optional DNS-subdomain prefix and `/`, then a name of 1-63
/// letters, digits, `-`, `_` or `.`, starting and ending with a letter or digit.
pub fn is_label_key(key: &str) -> bool {
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    let name_ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    name_ok && prefix.is_none_or(is_object_name)
}

/// Every problem with the workload fields of `spec`. Each field but `targetRef` only means
/// something with `targetRef`; set without it, it would silently do nothing, so it is an error.
pub fn validate_spec(spec: &CanarySpec) -> Vec<SpecError> {
    let mut p = Problems(Vec::new());
    match &spec.target_ref {
        Some(target) => validate_target(&mut p, spec, target),
        None => without_target(&mut p, spec),
    }
    p.0
}

fn validate_target(p: &mut Problems, spec: &CanarySpec, target: &TargetRef) {
    if target.api_version != "apps/v1" {
        p.add(
            "spec.targetRef.apiVersion",
            format!("{:?} is not supported", target.api_version),
            "write `apiVersion: apps/v1` (Fledge releases Deployments)",
        );
    }
    if target.kind != "Deployment" {
        p.add(
            "spec.targetRef.kind",
            format!("{:?} is not supported", target.kind),
            "write `kind: Deployment`",
        );
    }
    // The primary's name must be an object name too.
    if !is_object_name(&target.name) || target.primary_name().len() > 253 {
        p.add(
            "spec.targetRef.name",
            format!("{:?} is not a Deployment name", target.name),
            "write the name of the Deployment in the Canary's namespace, e.g. `name: podinfo`",
        );
    } else if target.name.ends_with(PRIMARY_SUFFIX) {
        p.add(
            "spec.targetRef.name",
            format!(
                "{:?} ends with {PRIMARY_SUFFIX:?}, the suffix of the copy Fledge makes",
                target.name
            ),
            "name the Deployment you keep in Git (Fledge creates `<name>-primary` itself)",
        );
    }
    if spec.router.istio.is_none() {
        p.add(
            "spec.targetRef",
            "needs the Istio router: workloads are released in Kubernetes mode (`fledge run` only moves traffic)",
            "add `router: {istio: {virtualService: ..., route: ...}}` and run `fledge controller`, or remove targetRef",
        );
    }
    if let Some(istio) = &spec.router.istio {
        if istio.stable_host.is_some() || istio.canary_host.is_some() {
            p.add(
                "spec.router.istio.stableHost",
                "with targetRef, the two versions are DestinationRule subsets selected by the track label, not two Services",
                "drop stableHost and canaryHost, and select the subsets by the track label in the DestinationRule",
            );
        }
    }
    if let Some(hpa) = &spec.autoscaler_ref {
        if hpa.api_version != "autoscaling/v2" {
            p.add(
                "spec.autoscalerRef.apiVersion",
                format!("{:?} is not supported", hpa.api_version),
                "write `apiVersion: autoscaling/v2`",
            );
        }
        if hpa.kind != "HorizontalPodAutoscaler" {
            p.add(
                "spec.autoscalerRef.kind",
                format!("{:?} is not supported", hpa.kind),
                "write `kind: HorizontalPodAutoscaler`",
            );
        }
        if !is_object_name(&hpa.name) || hpa.primary_name().len() > 253 {
            p.add(
                "spec.autoscalerRef.name",
                format!("{:?} is not an object name", hpa.name),
                "write the name of the target's HorizontalPodAutoscaler, e.g. `name: podinfo`",
            );
        }
    }
    if let Some(label) = &spec.track_label {
        if !is_label_key(label) {
            p.add(
                "spec.trackLabel",
                format!("{label:?} is not a label key"),
                format!("write e.g. `trackLabel: {DEFAULT_TRACK_LABEL}`"),
            );
        }
    }
    let deadline = spec.progress_deadline();
    if deadline.as_millis() < 1000 || deadline < spec.analysis.interval {
        p.add(
            "spec.progressDeadline",
            format!(
                "{deadline} is shorter than 1s or than the analysis interval ({})",
                spec.analysis.interval
            ),
            "write how long pods may take to become available, e.g. `progressDeadline: 10m`",
        );
    }
    if spec.scale_down_delay().as_millis() > 3_600_000 {
        p.add(
            "spec.scaleDownDelay",
            format!("{} is longer than 1h", spec.scale_down_delay()),
            "write how long the mesh needs to push new weights, e.g. `scaleDownDelay: 30s`",
        );
    }
}

fn without_target(p: &mut Problems, spec: &CanarySpec) {
    let fix = "add `targetRef: {apiVersion: apps/v1, kind: Deployment, name: ...}` (Kubernetes mode), or remove it";
    let set = [
        ("spec.autoscalerRef", spec.autoscaler_ref.is_some()),
        ("spec.progressDeadline", spec.progress_deadline.is_some()),
        ("spec.trackLabel", spec.track_label.is_some()),
        ("spec.scaleDownDelay", spec.scale_down_delay.is_some()),
        ("spec.revertOnDeletion", spec.revert_on_deletion),
    ];
    for (field, _) in set.iter().filter(|(_, set)| *set) {
        p.add(
            *field,
            "has no effect without spec.targetRef (there is no workload to manage)",
            fix,
        );
    }
    for (i, hook) in spec.webhooks.iter().enumerate() {
        if hook.kind == WebhookType::ConfirmRollout {
            p.add(
                format!("spec.webhooks[{i}].type"),
                "confirm-rollout gates scaling up a new revision of spec.targetRef, and there is none",
                "add spec.targetRef, or use `type: pre-rollout` to gate the start of a rollout",
            );
        }
    }
}
