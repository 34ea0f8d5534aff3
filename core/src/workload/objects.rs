//! Reading and writing the Kubernetes objects of a workload, as JSON: the target and primary
//! Deployments (apps/v1) and their HorizontalPodAutoscalers (autoscaling/v2). Pure functions:
//! the controller reads the objects, these decide what they mean and what to write.

use super::spec::{TRACK_CANARY, TRACK_STABLE};
use crate::spec::SpecError;
use serde_json::{json, Map, Value};

/// The Canary that owns the primary (for ownerReferences).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Owner {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

impl Owner {
    fn reference(&self) -> Value {
        json!({
            "apiVersion": crate::spec::API_VERSION,
            "kind": crate::spec::KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": true,
            "blockOwnerDeletion": true,
        })
    }
}

/// Whether `object` names `owner` (by uid) in its ownerReferences.
pub fn is_owned_by(object: &Value, owner: &Owner) -> bool {
    object
        .pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .is_some_and(|refs| refs.iter().any(|r| r["uid"] == owner.uid.as_str()))
}

/// `object` without its ownerReference to `owner` (a merge patch body keeping the others).
pub fn without_owner(object: &Value, owner: &Owner) -> Value {
    let kept: Vec<Value> = object
        .pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .map(|refs| {
            refs.iter()
                .filter(|r| r["uid"] != owner.uid.as_str())
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    json!({"metadata": {"ownerReferences": kept}})
}

fn int(value: &Value, pointer: &str) -> Option<i64> {
    value.pointer(pointer).and_then(Value::as_i64)
}

fn count(value: &Value, pointer: &str) -> i32 {
    int(value, pointer)
        .and_then(|n| i32::try_from(n).ok())
        .unwrap_or(0)
}

/// A Deployment as the lifecycle sees it.
#[derive(Debug, Clone, Copy)]
pub struct Deployment<'a>(pub &'a Value);

impl<'a> Deployment<'a> {
    pub fn name(&self) -> &'a str {
        self.0
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default()
    }

    /// `spec.replicas` (Kubernetes defaults a missing one to 1).
    pub fn replicas(&self) -> i32 {
        int(self.0, "/spec/replicas")
            .and_then(|n| i32::try_from(n).ok())
            .unwrap_or(1)
    }

    pub fn available(&self) -> i32 {
        count(self.0, "/status/availableReplicas")
    }

    pub fn updated(&self) -> i32 {
        count(self.0, "/status/updatedReplicas")
    }

    /// Pods of every revision (`status.replicas`).
    pub fn pods(&self) -> i32 {
        count(self.0, "/status/replicas")
    }

    pub fn template(&self) -> &'a Value {
        self.0.pointer("/spec/template").unwrap_or(&Value::Null)
    }

    /// The Deployment controller has seen the current spec.
    pub fn observed(&self) -> bool {
        let generation = int(self.0, "/metadata/generation").unwrap_or(0);
        int(self.0, "/status/observedGeneration").unwrap_or(0) >= generation
    }

    /// What `kubectl rollout status` waits for: the current spec observed, every replica
    /// updated to it and available, and no pod of an older revision left.
    pub fn rollout_complete(&self) -> bool {
        let replicas = self.replicas();
        self.observed()
            && self.updated() == replicas
            && self.available() >= replicas
            && self.pods() == self.updated()
    }

    /// One line: `2 of 3 updated replicas available`.
    pub fn progress(&self) -> String {
        if !self.observed() {
            return "the Deployment controller has not seen the latest spec yet".to_string();
        }
        format!(
            "{} of {} updated replicas available ({} pods in all)",
            self.available().min(self.updated()),
            self.replicas(),
            self.pods()
        )
    }

    /// The pod label `key`'s value in the template.
    pub fn template_label(&self, key: &str) -> Option<&'a str> {
        self.template()
            .pointer("/metadata/labels")
            .and_then(|labels| labels.get(key))
            .and_then(Value::as_str)
    }
}

/// Canonical JSON: keys sorted, `null` members dropped (a missing field and a `null` one mean
/// the same to the API server), so the hash does not depend on how a client wrote the object.
fn canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map
                .iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, _)| k)
                .collect();
            keys.sort();
            out.push('{');
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String((*key).clone()).to_string());
                out.push(':');
                canonical(&map[*key], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical(item, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// FNV-1a, 64 bits: small, stable across versions and platforms.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The revision of a pod template: a hash of its canonical JSON, 16 hex digits.
pub fn template_hash(template: &Value) -> String {
    let mut text = String::new();
    canonical(template, &mut text);
    format!("{:016x}", fnv1a(text.as_bytes()))
}

/// `template` with the track label set to `value` in its pod labels.
fn with_track(template: &Value, track_label: &str, value: &str) -> Value {
    let mut template = template.clone();
    if let Some(object) = template.as_object_mut() {
        let metadata = object.entry("metadata").or_insert_with(|| json!({}));
        if let Some(metadata) = metadata.as_object_mut() {
            let labels = metadata.entry("labels").or_insert_with(|| json!({}));
            if let Some(labels) = labels.as_object_mut() {
                labels.insert(track_label.to_string(), json!(value));
            }
        }
    }
    template
}

/// The revision the target's Deployment runs (a hash of its pod template).
pub fn target_revision(target: &Value) -> String {
    template_hash(Deployment(target).template())
}

/// The revision the primary runs, in the target's terms: its template with the track label
/// back to `canary`, hashed. Equal to [`target_revision`] exactly when the primary is a copy
/// of that template.
pub fn primary_revision(primary: &Value, track_label: &str) -> String {
    template_hash(&with_track(
        Deployment(primary).template(),
        track_label,
        TRACK_CANARY,
    ))
}

/// The container images of a Deployment's pod template, `, `-separated (the revision as
/// people know it).
pub fn images(deployment: &Value) -> String {
    Deployment(deployment)
        .template()
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .map(|containers| {
            containers
                .iter()
                .filter_map(|c| c.get("image").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
}

fn deployment_field(target: &Value, field: &str) -> String {
    format!("deployments/{}: {field}", Deployment(target).name())
}

/// What makes a target impossible to release: no track label on its pods, or a selector the
/// primary cannot copy (one that does not select the track label would select the primary's
/// pods too). Each names the Deployment's field and the fix.
pub fn check_target(target: &Value, track_label: &str) -> Vec<SpecError> {
    let mut problems = Vec::new();
    let deployment = Deployment(target);
    let add_label = format!("add `{track_label}: {TRACK_CANARY}`");
    match deployment.template_label(track_label) {
        Some(TRACK_CANARY) => {}
        other => problems.push(SpecError {
            field: deployment_field(target, "spec.template.metadata.labels"),
            problem: match other {
                Some(value) => format!("the pod label {track_label} is {value:?}, not {TRACK_CANARY:?}"),
                None => format!("the pods have no {track_label} label"),
            },
            fix: format!(
                "{add_label} to the Deployment's pod template labels (and to spec.selector.matchLabels) in Git; the primary copy's pods get `{track_label}: {TRACK_STABLE}`"
            ),
        }),
    }
    let selector = target.pointer("/spec/selector").unwrap_or(&Value::Null);
    let selects_track = selector
        .pointer("/matchLabels")
        .and_then(|labels| labels.get(track_label))
        .and_then(Value::as_str)
        == Some(TRACK_CANARY);
    let expressions_on_track = selector
        .pointer("/matchExpressions")
        .and_then(Value::as_array)
        .is_some_and(|exprs| exprs.iter().any(|e| e["key"] == track_label));
    if !selects_track || expressions_on_track {
        problems.push(SpecError {
            field: deployment_field(target, "spec.selector"),
            problem: if expressions_on_track {
                format!("a matchExpression on {track_label} cannot be rewritten for the primary copy")
            } else {
                format!("does not select `{track_label}: {TRACK_CANARY}`, so a primary copy would select the target's pods too (two Deployments fighting over the same pods)")
            },
            fix: format!(
                "{add_label} to spec.selector.matchLabels and use no matchExpression on {track_label}; a selector cannot change, so delete and re-create the Deployment"
            ),
        });
    }
    problems
}

/// Labels of the target's metadata that must not be copied to the primary: GitOps tools track
/// (and prune) what carries them, and the primary is not in Git.
fn is_tracking_label(key: &str) -> bool {
    key == "app.kubernetes.io/instance"
        || key.starts_with("argocd.argoproj.io/")
        || key.starts_with("kustomize.toolkit.fluxcd.io/")
        || key.starts_with("helm.toolkit.fluxcd.io/")
}

/// The primary's metadata.labels: the target's, minus GitOps tracking labels, with the track
/// label (if there) set to `stable`.
fn primary_labels(target: &Value, track_label: &str) -> Value {
    let mut labels: Map<String, Value> = target
        .pointer("/metadata/labels")
        .and_then(Value::as_object)
        .map(|labels| {
            labels
                .iter()
                .filter(|(k, _)| !is_tracking_label(k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        })
        .unwrap_or_default();
    if labels.contains_key(track_label) {
        labels.insert(track_label.to_string(), json!(TRACK_STABLE));
    }
    labels.insert("app.kubernetes.io/managed-by".into(), json!("fledge"));
    Value::Object(labels)
}

/// The spec fields of the target a copy takes over, besides the template and replicas.
const COPIED_SPEC_FIELDS: [&str; 4] = [
    "strategy",
    "minReadySeconds",
    "revisionHistoryLimit",
    "progressDeadlineSeconds",
];

/// The primary's spec: the target's template (and rollout settings) with the track label set
/// to `stable` in the pod labels and the selector, and `replicas` replicas.
pub fn primary_spec(target: &Value, track_label: &str, replicas: i32) -> Value {
    let template = with_track(Deployment(target).template(), track_label, TRACK_STABLE);
    let mut selector = target
        .pointer("/spec/selector")
        .cloned()
        .unwrap_or_else(|| json!({}));
    selector["matchLabels"][track_label] = json!(TRACK_STABLE);
    let mut spec = json!({
        "replicas": replicas,
        "selector": selector,
        "template": template,
    });
    for field in COPIED_SPEC_FIELDS {
        if let Some(value) = target.pointer(&format!("/spec/{field}")) {
            spec[field] = value.clone();
        }
    }
    spec
}

/// A new primary Deployment for `target`, owned by the Canary.
pub fn primary_object(target: &Value, track_label: &str, replicas: i32, owner: &Owner) -> Value {
    let name = format!(
        "{}{}",
        Deployment(target).name(),
        super::spec::PRIMARY_SUFFIX
    );
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": name,
            "namespace": owner.namespace,
            "labels": primary_labels(target, track_label),
            "annotations": {"fledge.dev/primary-of": Deployment(target).name()},
            "ownerReferences": [owner.reference()],
        },
        "spec": primary_spec(target, track_label, replicas),
    })
}

/// The selector the primary must have for `target` (the target's, track label `stable`).
pub fn primary_selector(target: &Value, track_label: &str) -> Value {
    primary_spec(target, track_label, 0)["selector"].clone()
}

/// The target's pod template as the primary's, for a revert: the primary's template with the
/// track label back to `canary`.
pub fn target_template_from_primary(primary: &Value, track_label: &str) -> Value {
    with_track(Deployment(primary).template(), track_label, TRACK_CANARY)
}

/// A HorizontalPodAutoscaler as the lifecycle sees it.
#[derive(Debug, Clone, Copy)]
pub struct Autoscaler<'a>(pub &'a Value);

impl Autoscaler<'_> {
    pub fn min_replicas(&self) -> i32 {
        int(self.0, "/spec/minReplicas")
            .and_then(|n| i32::try_from(n).ok())
            .unwrap_or(1)
            .max(1)
    }

    pub fn max_replicas(&self) -> i32 {
        int(self.0, "/spec/maxReplicas")
            .and_then(|n| i32::try_from(n).ok())
            .unwrap_or(i32::MAX)
            .max(self.min_replicas())
    }

    /// `replicas` within the HPA's bounds.
    pub fn clamp(&self, replicas: i32) -> i32 {
        replicas.clamp(self.min_replicas(), self.max_replicas())
    }
}

/// Whether `hpa` scales the Deployment `target`; otherwise the problem, naming the field.
pub fn check_autoscaler(hpa: &Value, target: &str) -> Option<SpecError> {
    let scale_ref = hpa.pointer("/spec/scaleTargetRef").unwrap_or(&Value::Null);
    let kind = scale_ref["kind"].as_str().unwrap_or_default();
    let name = scale_ref["name"].as_str().unwrap_or_default();
    let group = scale_ref["apiVersion"]
        .as_str()
        .unwrap_or_default()
        .split('/')
        .next()
        .unwrap_or_default();
    if kind == "Deployment" && name == target && group == "apps" {
        return None;
    }
    let hpa_name = hpa
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    Some(SpecError {
        field: "spec.autoscalerRef".into(),
        problem: format!(
            "HorizontalPodAutoscaler {hpa_name} scales {kind} {name:?}, not the target Deployment {target:?}"
        ),
        fix: format!(
            "name the HPA whose scaleTargetRef is `{{apiVersion: apps/v1, kind: Deployment, name: {target}}}`, or fix that HPA's scaleTargetRef"
        ),
    })
}

/// The primary's HPA: a copy of `hpa`'s spec scaling `primary`, owned by the Canary.
pub fn primary_autoscaler(hpa: &Value, primary: &str, owner: &Owner) -> Value {
    let name = format!(
        "{}{}",
        hpa.pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default(),
        super::spec::PRIMARY_SUFFIX
    );
    let mut spec = hpa.get("spec").cloned().unwrap_or_else(|| json!({}));
    spec["scaleTargetRef"] =
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "name": primary});
    json!({
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {
            "name": name,
            "namespace": owner.namespace,
            "labels": {"app.kubernetes.io/managed-by": "fledge"},
            "ownerReferences": [owner.reference()],
        },
        "spec": spec,
    })
}
