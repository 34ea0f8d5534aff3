//! The `Canary` custom resource (`fledge.dev/v1alpha1`), generated from the same Rust spec that
//! `fledge run` reads (`fledge_core::spec::CanarySpec`), and its status.
//!
//! The spec schema comes from `schemars` derives on the core types (feature `schema`) and is
//! rewritten by kube into a *structural* schema. The status is declared loosely
//! (`x-kubernetes-preserve-unknown-fields`) with the fields printer columns and conditions need:
//! it holds the core `CanaryStatus` (the state machine's memory) plus Kubernetes bookkeeping.
//! `fledge crd` prints [`crd_yaml`]; `manifests/crd.yaml` is that output, and a test fails when
//! they drift.

use super::clock::{from_k8s_timestamp, to_k8s_timestamp};
use chrono::{DateTime, Utc};
use fledge_core::rollout::{CanaryStatus, Command, Phase};
use fledge_core::spec::CanarySpec;
use fledge_core::workload::WorkloadStatus;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::ops::Deref;

/// Operator commands as annotations: setting (or changing) the value of one asks for that
/// command once, e.g. `kubectl annotate canary app fledge.dev/promote="$(date +%s)" --overwrite`.
/// Listed in the order they win when several are new at once (one is acted on per reconcile).
pub const COMMAND_ANNOTATIONS: [(&str, Command); 6] = [
    ("fledge.dev/abort", Command::Abort),
    ("fledge.dev/retry", Command::Retry),
    ("fledge.dev/pause", Command::Pause),
    ("fledge.dev/resume", Command::Resume),
    ("fledge.dev/promote-full", Command::PromoteFull),
    ("fledge.dev/promote", Command::Promote),
];

/// A canary release of one service: the spec is exactly what `fledge run` reads from YAML.
#[derive(CustomResource, Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[kube(
    group = "fledge.dev",
    version = "v1alpha1",
    kind = "Canary",
    // The root type is `CanaryResource`: `Canary` is the spec as `fledge run` reads it
    // (`fledge_core::spec::Canary`).
    root = "CanaryResource",
    namespaced,
    status = "CanaryResourceStatus",
    category = "fledge",
    doc = "An automated, metrics-driven canary release of one service (Fledge).",
    printcolumn = r#"{"name": "Phase", "type": "string", "jsonPath": ".status.phase"}"#,
    printcolumn = r#"{"name": "Weight", "type": "integer", "description": "Percent of traffic on the canary", "jsonPath": ".status.canaryWeight"}"#,
    printcolumn = r#"{"name": "Failed", "type": "integer", "description": "Failed analysis intervals so far", "jsonPath": ".status.failedChecks", "priority": 1}"#,
    printcolumn = r#"{"name": "Workload", "type": "string", "description": "With targetRef: the workload phase (ScalingUp, Promoting, Succeeded, ...)", "jsonPath": ".status.workload.phase"}"#,
    printcolumn = r#"{"name": "Image", "type": "string", "description": "With targetRef: the images of the revision being (or last) rolled out", "jsonPath": ".status.workload.image"}"#,
    printcolumn = r#"{"name": "Primary", "type": "integer", "description": "With targetRef: available replicas of the primary (stable)", "jsonPath": ".status.workload.primary.available"}"#,
    printcolumn = r#"{"name": "Target", "type": "integer", "description": "With targetRef: replicas of the target (canary); 0 at rest", "jsonPath": ".status.workload.target.desired"}"#,
    printcolumn = r#"{"name": "Revision", "type": "string", "description": "With targetRef: the target's pod template hash", "jsonPath": ".status.workload.revision", "priority": 1}"#,
    printcolumn = r#"{"name": "Reason", "type": "string", "description": "The latest reason, in one line", "jsonPath": ".status.message"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
pub struct CanaryResourceSpec {
    #[serde(flatten)]
    pub canary: CanarySpec,
}

impl Deref for CanaryResourceSpec {
    type Target = CanarySpec;

    fn deref(&self) -> &CanarySpec {
        &self.canary
    }
}

/// `.status` of a Canary: the state machine's status plus Kubernetes bookkeeping.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CanaryResourceStatus {
    /// Phase, weight, step, failed checks, last analysis, history: see `fledge_core::rollout`.
    #[serde(flatten)]
    pub rollout: CanaryStatus,
    /// The `metadata.generation` this status was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Progressing`, `Promoted`, `Failed`.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Fingerprint of the spec this rollout belongs to; a changed spec starts a new rollout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec_fingerprint: Option<String>,
    /// When the state machine last ran an analysis tick. The next one is due one interval
    /// later, whichever controller instance is running then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_tick_at: Option<DateTime<Utc>>,
    /// The rollout finished and its final routes were applied; from then on the controller
    /// leaves the routes alone.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub final_routes_applied: bool,
    /// Command annotations already acted on (annotation → value), so each is acted on once.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub handled_commands: BTreeMap<String, String>,
    /// With `spec.targetRef`: the workload lifecycle (phase, revisions, replicas; see
    /// `fledge_core::workload`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<WorkloadStatus>,
}

impl JsonSchema for CanaryResourceStatus {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "CanaryResourceStatus".into()
    }

    fn json_schema(_generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "Rollout state written by the controller (see fledge_core::rollout::CanaryStatus).",
            "type": "object",
            "x-kubernetes-preserve-unknown-fields": true,
            "properties": {
                "phase": {"type": "string"},
                "canaryWeight": {"type": "integer", "minimum": 0, "maximum": 100},
                "step": {"type": "integer", "minimum": 0},
                "failedChecks": {"type": "integer", "minimum": 0},
                "message": {"type": "string"},
                "observedGeneration": {"type": "integer", "format": "int64"},
                "workload": {
                    "type": "object",
                    "x-kubernetes-preserve-unknown-fields": true,
                    "properties": {
                        "phase": {"type": "string"},
                        "revision": {"type": "string"},
                        "image": {"type": "string"},
                        "canaryWeight": {"type": "integer", "minimum": 0, "maximum": 100},
                        "primary": {"type": "object", "properties": {"desired": {"type": "integer"}, "available": {"type": "integer"}}},
                        "target": {"type": "object", "properties": {"desired": {"type": "integer"}, "available": {"type": "integer"}}}
                    }
                },
                "conditions": {
                    "type": "array",
                    "x-kubernetes-list-type": "map",
                    "x-kubernetes-list-map-keys": ["type"],
                    "items": {
                        "type": "object",
                        "required": ["type", "status", "lastTransitionTime", "reason", "message"],
                        "properties": {
                            "type": {"type": "string"},
                            "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
                            "observedGeneration": {"type": "integer", "format": "int64"},
                            "lastTransitionTime": {"type": "string", "format": "date-time"},
                            "reason": {"type": "string"},
                            "message": {"type": "string"}
                        }
                    }
                }
            }
        })
    }
}

/// Condition types, Kubernetes style.
pub mod condition {
    /// The spec is valid and the router serves the wanted weights.
    pub const READY: &str = "Ready";
    /// A rollout is under way (reason: its phase).
    pub const PROGRESSING: &str = "Progressing";
    /// The canary was promoted (100% canary).
    pub const PROMOTED: &str = "Promoted";
    /// The canary was rolled back (0% canary).
    pub const FAILED: &str = "Failed";
}

/// Why `Ready` is false (also used as Event reasons).
pub mod reason {
    pub const RECONCILED: &str = "Reconciled";
    pub const INVALID_SPEC: &str = "InvalidSpec";
    pub const ROUTER_ERROR: &str = "RouterError";
    pub const METRICS_SOURCE_ERROR: &str = "MetricsSourceError";
    pub const TRAFFIC_RESTORED: &str = "TrafficRestored";
    /// Another Canary already steers the same VirtualService route.
    pub const ROUTE_CONFLICT: &str = "RouteConflict";
    /// The workload (`targetRef`, its Deployment, HPA or subsets) cannot be released as it is.
    pub const INVALID_WORKLOAD: &str = "InvalidWorkload";
}

/// What `Ready` should say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    pub ready: bool,
    pub reason: String,
    pub message: String,
}

impl Readiness {
    pub fn ok() -> Self {
        Readiness {
            ready: true,
            reason: reason::RECONCILED.into(),
            message: "spec is valid and the router serves the wanted weights".into(),
        }
    }

    pub fn not_ready(reason: &str, message: impl Into<String>) -> Self {
        Readiness {
            ready: false,
            reason: reason.into(),
            message: message.into(),
        }
    }
}

fn bool_status(value: bool) -> String {
    if value { "True" } else { "False" }.to_string()
}

fn phase_name(phase: Phase) -> String {
    format!("{phase:?}")
}

impl CanaryResourceStatus {
    /// Recompute the conditions from the rollout phase and `readiness`. A condition's
    /// `lastTransitionTime` only moves when its status changes.
    pub fn set_conditions(
        &mut self,
        readiness: &Readiness,
        generation: Option<i64>,
        now: DateTime<Utc>,
    ) {
        let phase = self.rollout.phase;
        let message = self.rollout.message.clone();
        let progressing = !phase.is_terminal();
        let wanted = [
            (
                condition::READY,
                readiness.ready,
                readiness.reason.clone(),
                readiness.message.clone(),
            ),
            (
                condition::PROGRESSING,
                progressing,
                phase_name(phase),
                message.clone(),
            ),
            (
                condition::PROMOTED,
                phase == Phase::Promoted,
                phase_name(phase),
                message.clone(),
            ),
            (
                condition::FAILED,
                phase == Phase::RolledBack,
                phase_name(phase),
                message,
            ),
        ];
        let previous = std::mem::take(&mut self.conditions);
        for (type_, value, reason, message) in wanted {
            let status = bool_status(value);
            let last_transition_time = previous
                .iter()
                .find(|c| c.type_ == type_ && c.status == status)
                .map(|c| c.last_transition_time.clone())
                // Whole seconds: that is what a `Time` keeps when it is written and read back.
                .unwrap_or(Time(to_k8s_timestamp(
                    DateTime::from_timestamp(now.timestamp(), 0).unwrap_or(now),
                )));
            self.conditions.push(Condition {
                type_: type_.to_string(),
                status,
                reason,
                message,
                observed_generation: generation,
                last_transition_time,
            });
        }
    }

    /// The condition of this type, if set.
    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.type_ == type_)
    }

    /// Whether `Ready` is currently true.
    pub fn is_ready(&self) -> bool {
        self.condition(condition::READY)
            .is_some_and(|c| c.status == "True")
    }

    /// When `Ready` last changed, if ever.
    pub fn ready_since(&self) -> Option<DateTime<Utc>> {
        self.condition(condition::READY)
            .map(|c| from_k8s_timestamp(c.last_transition_time.0))
    }
}

impl CanaryResource {
    /// The core view of this object (what `fledge run` would read), for validation, backends and
    /// query templates.
    pub fn to_core(&self) -> fledge_core::spec::Canary {
        fledge_core::spec::Canary {
            api_version: fledge_core::spec::API_VERSION.to_string(),
            kind: fledge_core::spec::KIND.to_string(),
            metadata: fledge_core::spec::Metadata {
                name: self.metadata.name.clone().unwrap_or_default(),
                namespace: self.metadata.namespace.clone(),
                annotations: self.metadata.annotations.clone().unwrap_or_default(),
            },
            spec: self.spec.canary.clone(),
        }
    }

    /// The current values of the command annotations that are set.
    pub fn command_annotations(&self) -> BTreeMap<String, String> {
        COMMAND_ANNOTATIONS
            .iter()
            .filter_map(|(key, _)| Some((key.to_string(), self.annotation(key)?.to_string())))
            .collect()
    }

    /// The value of an annotation, if set.
    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(key))
            .map(String::as_str)
    }
}

/// Formats Kubernetes accepts in CRD schemas; others are dropped from the generated schema.
const KNOWN_FORMATS: [&str; 8] = [
    "int32",
    "int64",
    "float",
    "double",
    "byte",
    "date",
    "date-time",
    "uri",
];

fn drop_unknown_formats(schema: &mut Value) {
    match schema {
        Value::Object(map) => {
            if let Some(Value::String(format)) = map.get("format") {
                if !KNOWN_FORMATS.contains(&format.as_str()) {
                    map.remove("format");
                }
            }
            for value in map.values_mut() {
                drop_unknown_formats(value);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(drop_unknown_formats),
        _ => {}
    }
}

/// The CustomResourceDefinition as JSON, with formats Kubernetes does not know removed
/// (schemars writes e.g. `uint8`; the bounds stay as `minimum`/`maximum`).
pub fn crd_json() -> Result<Value, serde_json::Error> {
    let mut crd = serde_json::to_value(CanaryResource::crd())?;
    drop_unknown_formats(&mut crd);
    // The schema's title is the kind users write, not the Rust type's name.
    if let Some(versions) = crd["spec"]["versions"].as_array_mut() {
        for version in versions {
            version["schema"]["openAPIV3Schema"]["title"] = Value::from("Canary");
        }
    }
    Ok(crd)
}

/// The CRD as YAML, exactly as `manifests/crd.yaml` holds it.
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    let crd = crd_json().map_err(<serde_yaml::Error as serde::ser::Error>::custom)?;
    Ok(format!(
        "# Generated by `fledge crd` from fledge_core::spec::CanarySpec; do not edit.\n{}",
        serde_yaml::to_string(&crd)?
    ))
}

/// Violations of Kubernetes' structural-schema rules (empty when the schema is structural):
/// every node has a `type` (or preserves unknown fields / is int-or-string), no `$ref`, no
/// `properties` together with `additionalProperties`, nothing but value validations inside
/// `anyOf`/`oneOf`/`allOf`/`not`, and no `uniqueItems: true`.
pub fn structural_problems(schema: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    check_node(schema, "", false, &mut problems);
    problems
}

fn check_node(node: &Value, path: &str, in_junctor: bool, problems: &mut Vec<String>) {
    let Some(map) = node.as_object() else {
        problems.push(format!("{path}: is not an object"));
        return;
    };
    for forbidden in ["$ref", "$schema", "definitions", "$defs", "dependencies"] {
        if map.contains_key(forbidden) {
            problems.push(format!("{path}: has {forbidden}"));
        }
    }
    let preserves = map.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
    let int_or_string = map.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true));
    if in_junctor {
        for forbidden in [
            "type",
            "description",
            "default",
            "additionalProperties",
            "nullable",
        ] {
            if map.contains_key(forbidden) {
                problems.push(format!(
                    "{path}: sets {forbidden} inside anyOf/oneOf/allOf/not"
                ));
            }
        }
    } else if !preserves && !int_or_string {
        match map.get("type").and_then(Value::as_str) {
            Some(t) if !t.is_empty() => {}
            _ => problems.push(format!("{path}: has no type")),
        }
    }
    if map.contains_key("properties") && map.contains_key("additionalProperties") {
        problems.push(format!(
            "{path}: sets both properties and additionalProperties"
        ));
    }
    if map.get("uniqueItems") == Some(&Value::Bool(true)) {
        problems.push(format!("{path}: sets uniqueItems: true"));
    }
    if let Some(Value::Object(properties)) = map.get("properties") {
        for (name, child) in properties {
            check_node(child, &format!("{path}.{name}"), in_junctor, problems);
        }
    }
    if let Some(items) = map.get("items") {
        check_node(items, &format!("{path}[]"), in_junctor, problems);
    }
    if let Some(additional @ Value::Object(_)) = map.get("additionalProperties") {
        check_node(additional, &format!("{path}{{*}}"), in_junctor, problems);
    }
    for junctor in ["anyOf", "oneOf", "allOf"] {
        if let Some(Value::Array(branches)) = map.get(junctor) {
            for (i, branch) in branches.iter().enumerate() {
                check_node(branch, &format!("{path}<{junctor}[{i}]>"), true, problems);
            }
        }
    }
    if let Some(not) = map.get("not") {
        check_node(not, &format!("{path}<not>"), true, problems);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn openapi_schema() -> Value {
        let crd = crd_json().unwrap();
        crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
    }

    #[test]
    fn crd_identity_subresources_and_columns() {
        let crd = crd_json().unwrap();
        assert_eq!(crd["spec"]["group"], "fledge.dev");
        assert_eq!(crd["spec"]["scope"], "Namespaced");
        assert_eq!(crd["spec"]["names"]["kind"], "Canary");
        assert_eq!(crd["spec"]["names"]["plural"], "canaries");
        let version = &crd["spec"]["versions"][0];
        assert_eq!(version["name"], "v1alpha1");
        assert_eq!(version["subresources"]["status"], serde_json::json!({}));
        let columns: Vec<&str> = version["additionalPrinterColumns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["jsonPath"].as_str().unwrap())
            .collect();
        assert_eq!(
            columns,
            [
                ".status.phase",
                ".status.canaryWeight",
                ".status.failedChecks",
                ".status.workload.phase",
                ".status.workload.image",
                ".status.workload.primary.available",
                ".status.workload.target.desired",
                ".status.workload.revision",
                ".status.message",
                ".metadata.creationTimestamp"
            ]
        );
    }

    #[test]
    fn generated_schema_is_structural() {
        let schema = openapi_schema();
        assert_eq!(structural_problems(&schema), Vec::<String>::new());
    }

    #[test]
    fn structural_checker_catches_violations() {
        let bad = serde_json::json!({
            "type": "object",
            "properties": {
                "a": {"$ref": "#/definitions/A"},
                "b": {"type": "object", "properties": {"x": {"type": "string"}}, "additionalProperties": false},
                "c": {"type": "string", "oneOf": [{"type": "string"}]},
                "d": {"description": "no type"}
            }
        });
        let problems = structural_problems(&bad);
        assert_eq!(problems.len(), 5, "{problems:#?}");
    }

    #[test]
    fn spec_schema_is_the_core_spec() {
        let schema = openapi_schema();
        let spec = &schema["properties"]["spec"];
        let fields: Vec<&String> = spec["properties"].as_object().unwrap().keys().collect();
        let core = schemars::schema_for!(CanarySpec);
        let core_fields: Vec<&String> = core
            .get("properties")
            .and_then(Value::as_object)
            .unwrap()
            .keys()
            .collect();
        assert_eq!(
            fields, core_fields,
            "the CRD spec is the core spec, field for field"
        );
        assert!(fields.len() >= 6);
        let istio = &spec["properties"]["router"]["properties"]["istio"];
        assert!(istio["properties"]["virtualService"].is_object(), "{istio}");
        let interval = &spec["properties"]["analysis"]["properties"]["interval"];
        assert_eq!(interval["type"], "string");
        assert_eq!(interval["default"], "30s");
        // Formats Kubernetes does not know are gone.
        let text = schema.to_string();
        assert!(
            !text.contains("\"uint8\"") && !text.contains("\"uint\""),
            "{text}"
        );
    }

    #[test]
    fn canary_parses_from_kubernetes_yaml_and_converts_to_core() {
        let yaml = r#"
apiVersion: fledge.dev/v1alpha1
kind: Canary
metadata: {name: app, namespace: shop, generation: 3}
spec:
  service: app
  stable: {subset: stable}
  canary: {subset: canary}
  metricsSource:
    envoyAdmin: {urls: ["http://127.0.0.1:15000"]}
  router:
    istio: {virtualService: app, route: primary}
  analysis:
    interval: 30s
    stepWeights: [10, 50]
    compareWithStable: {}
"#;
        let canary: CanaryResource = serde_yaml::from_str(yaml).unwrap();
        assert_eq!(canary.spec.service, "app");
        let core = canary.to_core();
        assert_eq!(core.validate(), Ok(()));
        assert_eq!(core.metadata.namespace.as_deref(), Some("shop"));
        assert!(canary.status.is_none());
    }

    #[test]
    fn status_round_trips_with_core_status_flattened() {
        let mut status = CanaryResourceStatus {
            observed_generation: Some(2),
            spec_fingerprint: Some("abc".into()),
            ..Default::default()
        };
        status.rollout.canary_weight = 20;
        status.rollout.phase = Phase::Progressing;
        let now = DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        status.set_conditions(&Readiness::ok(), Some(2), now);
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(json["canaryWeight"], 20);
        assert_eq!(json["phase"], "Progressing");
        assert_eq!(json["observedGeneration"], 2);
        assert_eq!(json["conditions"][0]["type"], "Ready");
        let back: CanaryResourceStatus = serde_json::from_value(json).unwrap();
        assert_eq!(back, status);
    }

    #[test]
    fn conditions_survive_a_round_trip_unchanged_with_sub_second_clocks() {
        let now = DateTime::from_timestamp(1_700_000_000, 123_456_789).unwrap();
        let mut status = CanaryResourceStatus::default();
        status.rollout.phase = Phase::Progressing;
        status.last_tick_at = Some(now);
        status.set_conditions(&Readiness::ok(), Some(1), now);
        let stored: CanaryResourceStatus =
            serde_json::from_value(serde_json::to_value(&status).unwrap()).unwrap();
        assert_eq!(
            stored, status,
            "what is written reads back equal: no write loop"
        );
        let mut again = stored.clone();
        again.set_conditions(
            &Readiness::ok(),
            Some(1),
            now + chrono::Duration::seconds(1),
        );
        assert_eq!(again, stored);
    }

    #[test]
    fn condition_transition_time_moves_only_on_change() {
        let t0 = DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        let t1 = t0 + chrono::Duration::seconds(60);
        let mut status = CanaryResourceStatus::default();
        status.rollout.phase = Phase::Progressing;
        status.set_conditions(&Readiness::ok(), Some(1), t0);
        status.set_conditions(&Readiness::ok(), Some(1), t1);
        assert_eq!(status.ready_since(), Some(t0));
        status.set_conditions(
            &Readiness::not_ready(reason::ROUTER_ERROR, "boom"),
            Some(1),
            t1,
        );
        assert_eq!(status.ready_since(), Some(t1));
        assert!(!status.is_ready());
        status.rollout.phase = Phase::RolledBack;
        status.set_conditions(&Readiness::ok(), Some(1), t1);
        let failed = status.condition(condition::FAILED).unwrap();
        assert_eq!(
            (failed.status.as_str(), failed.reason.as_str()),
            ("True", "RolledBack")
        );
    }
}
