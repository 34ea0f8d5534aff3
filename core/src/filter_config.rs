//! The filter's plugin configuration: its schema, its validation, and the pure function that
//! turns an Envoy upstream cluster name into the `(service, subset)` label values the filter
//! writes.
//!
//! The filter (Wasm) parses it in `on_configure`; the controller and the e2e tests build it and
//! serialize it with [`FilterConfig::to_json`] to generate Envoy or Istio configuration.
//!
//! ```json
//! {"clusters": {"app_stable": {"service": "app", "subset": "stable"},
//!               "app_canary": {"service": "app", "subset": "canary"}},
//!  "istioClusterNames": true}
//! ```
//!
//! - `clusters` maps an Envoy upstream cluster name to the service and subset it serves.
//! - `istioClusterNames` (default `true`) also understands Istio's cluster names
//!   `outbound|<port>|<subset>|<host>` without configuration: subset = the third field, service =
//!   the first DNS label of the host (`reviews` for `reviews.default.svc.cluster.local`). With an
//!   empty subset field (one Service per version) the subset is that service label.
//! - Anything else is labelled `(other, other)` ([`contract::OTHER`]).
//!
//! Empty or absent configuration means the defaults. Parsing is strict: unknown keys and wrong
//! types are errors that name the field and say what to write instead, so typos are visible
//! (the filter then fails open and keeps its previous configuration).
//!
//! Every label value goes through [`contract::sanitize_label_value`].

use crate::contract;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// The filter's plugin configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", try_from = "serde_json::Value")]
pub struct FilterConfig {
    /// Envoy upstream cluster name → the service and subset behind it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub clusters: BTreeMap<String, ClusterSubset>,
    /// Understand Istio cluster names `outbound|<port>|<subset>|<host>` (default `true`).
    pub istio_cluster_names: bool,
}

/// What one configured cluster serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterSubset {
    /// The service being canaried, e.g. `app`.
    pub service: String,
    /// The version of it behind this cluster, e.g. `stable` or `canary`.
    pub subset: String,
}

impl ClusterSubset {
    pub fn new(service: impl Into<String>, subset: impl Into<String>) -> Self {
        ClusterSubset {
            service: service.into(),
            subset: subset.into(),
        }
    }
}

/// Sanitized label values for one request: `fledge_service` and `fledge_subset`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SubsetLabels {
    pub service: String,
    pub subset: String,
}

impl SubsetLabels {
    /// Sanitizes both values with [`contract::sanitize_label_value`].
    pub fn new(service: &str, subset: &str) -> Self {
        SubsetLabels {
            service: contract::sanitize_label_value(service),
            subset: contract::sanitize_label_value(subset),
        }
    }

    /// `(other, other)`: traffic whose service and subset are unknown.
    pub fn other() -> Self {
        SubsetLabels {
            service: contract::OTHER.to_string(),
            subset: contract::OTHER.to_string(),
        }
    }

    pub fn is_other(&self) -> bool {
        self.service == contract::OTHER && self.subset == contract::OTHER
    }
}

/// Why a plugin configuration was rejected. Every message names the field (a path such as
/// `clusters.app_canary.subset`) and says what to write instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterConfigError {
    #[error("plugin configuration is not valid JSON ({0}); write a JSON object such as {EXAMPLE}")]
    Syntax(String),
    #[error("{field}: expected {expected}, found {found}")]
    WrongType {
        field: String,
        expected: &'static str,
        found: &'static str,
    },
    #[error("{field}: missing; write {expected}")]
    Missing {
        field: String,
        expected: &'static str,
    },
    #[error("{field}: must not be empty; write {expected}")]
    Empty {
        field: String,
        expected: &'static str,
    },
    #[error("{field}: unknown key{hint}; allowed keys are {allowed}")]
    UnknownKey {
        field: String,
        /// ` (did you mean "x"?)` or empty.
        hint: String,
        allowed: &'static str,
    },
}

impl FilterConfigError {
    /// The offending field's path (`(root)` for the document itself, empty for syntax errors).
    pub fn field(&self) -> &str {
        match self {
            FilterConfigError::Syntax(_) => "",
            FilterConfigError::WrongType { field, .. }
            | FilterConfigError::Missing { field, .. }
            | FilterConfigError::Empty { field, .. }
            | FilterConfigError::UnknownKey { field, .. } => field,
        }
    }
}

const EXAMPLE: &str = r#"{"clusters": {"app_canary": {"service": "app", "subset": "canary"}}, "istioClusterNames": true}"#;
const ROOT_KEYS: [&str; 2] = ["clusters", "istioClusterNames"];
const CLUSTER_KEYS: [&str; 2] = ["service", "subset"];

impl Default for FilterConfig {
    fn default() -> Self {
        FilterConfig {
            clusters: BTreeMap::new(),
            istio_cluster_names: true,
        }
    }
}

impl FilterConfig {
    /// Parse the plugin configuration as Envoy hands it over (raw bytes). Empty or
    /// whitespace-only input, or JSON `null`, means the defaults.
    pub fn parse_bytes(raw: &[u8]) -> Result<Self, FilterConfigError> {
        let text = std::str::from_utf8(raw).map_err(|e| {
            FilterConfigError::Syntax(format!("not UTF-8 at byte {}", e.valid_up_to()))
        })?;
        Self::parse(text)
    }

    /// Parse the plugin configuration JSON. Empty or whitespace-only input, or JSON `null`,
    /// means the defaults.
    pub fn parse(text: &str) -> Result<Self, FilterConfigError> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        let value: Value =
            serde_json::from_str(text).map_err(|e| FilterConfigError::Syntax(e.to_string()))?;
        Self::from_value(&value)
    }

    /// Validate an already-parsed JSON value (e.g. a `pluginConfig` struct embedded elsewhere).
    pub fn from_value(value: &Value) -> Result<Self, FilterConfigError> {
        let root =
            match value {
                Value::Null => return Ok(Self::default()),
                Value::Object(map) => map,
                other => return Err(FilterConfigError::WrongType {
                    field: "(root)".to_string(),
                    expected:
                        "a JSON object such as {\"clusters\": {...}, \"istioClusterNames\": true}",
                    found: kind(other),
                }),
            };
        reject_unknown(root, "", &ROOT_KEYS, "clusters, istioClusterNames")?;

        let mut config = Self::default();
        match root.get("istioClusterNames") {
            None | Some(Value::Null) => {}
            Some(Value::Bool(b)) => config.istio_cluster_names = *b,
            Some(other) => {
                return Err(FilterConfigError::WrongType {
                    field: "istioClusterNames".to_string(),
                    expected: "true or false",
                    found: kind(other),
                })
            }
        }
        match root.get("clusters") {
            None | Some(Value::Null) => {}
            Some(Value::Object(clusters)) => {
                for (name, entry) in clusters {
                    let path = format!("clusters{}", path_segment(name));
                    config
                        .clusters
                        .insert(name.clone(), parse_cluster(entry, &path)?);
                }
            }
            Some(other) => {
                return Err(FilterConfigError::WrongType {
                    field: "clusters".to_string(),
                    expected: "an object mapping Envoy cluster names to subsets, such as {\"app_canary\": {\"service\": \"app\", \"subset\": \"canary\"}}",
                    found: kind(other),
                })
            }
        }
        Ok(config)
    }

    /// The JSON the filter accepts (camelCase), for generating Envoy/Istio configuration.
    pub fn to_json(&self) -> String {
        // Serializing a map of strings cannot fail; fall back to the defaults' JSON anyway.
        serde_json::to_string(self).unwrap_or_else(|_| "{}".to_string())
    }

    /// The `(service, subset)` label values for a request that went to `cluster` (`None` when no
    /// cluster was picked, e.g. no route matched). Configured clusters win; then Istio names if
    /// enabled; everything else is `(other, other)`.
    pub fn resolve(&self, cluster: Option<&str>) -> SubsetLabels {
        let Some(cluster) = cluster else {
            return SubsetLabels::other();
        };
        if let Some(entry) = self.clusters.get(cluster) {
            return SubsetLabels::new(&entry.service, &entry.subset);
        }
        if self.istio_cluster_names {
            if let Some(istio) = IstioCluster::parse(cluster) {
                return SubsetLabels::new(istio.service, istio.subset);
            }
        }
        SubsetLabels::other()
    }
}

impl TryFrom<Value> for FilterConfig {
    type Error = FilterConfigError;
    fn try_from(value: Value) -> Result<Self, Self::Error> {
        Self::from_value(&value)
    }
}

/// An Istio outbound cluster name, `outbound|<port>|<subset>|<host>`, split into the raw
/// (unsanitized) service and subset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IstioCluster<'a> {
    /// First DNS label of the host.
    pub service: &'a str,
    /// The subset field, or the service when that field is empty (one Service per version).
    pub subset: &'a str,
}

impl<'a> IstioCluster<'a> {
    /// `None` unless the name is exactly `outbound|<digits>|<subset>|<host>` with a non-empty
    /// host. Inbound clusters (`inbound|8080||`) describe the local workload, not a subset.
    pub fn parse(name: &'a str) -> Option<Self> {
        let mut fields = name.split('|');
        let direction = fields.next()?;
        let port = fields.next()?;
        let subset = fields.next()?;
        let host = fields.next()?;
        if fields.next().is_some()
            || direction != "outbound"
            || port.is_empty()
            || !port.bytes().all(|b| b.is_ascii_digit())
        {
            return None;
        }
        let service = host.split('.').next().filter(|s| !s.is_empty())?;
        let subset = if subset.is_empty() { service } else { subset };
        Some(IstioCluster { service, subset })
    }
}

fn parse_cluster(entry: &Value, path: &str) -> Result<ClusterSubset, FilterConfigError> {
    const ENTRY: &str = "an object such as {\"service\": \"app\", \"subset\": \"canary\"}";
    let Value::Object(map) = entry else {
        return Err(FilterConfigError::WrongType {
            field: path.to_string(),
            expected: ENTRY,
            found: kind(entry),
        });
    };
    reject_unknown(map, path, &CLUSTER_KEYS, "service, subset")?;
    let service = string_field(map, path, "service", "a string like \"app\"")?;
    let subset = string_field(map, path, "subset", "a string like \"canary\"")?;
    Ok(ClusterSubset { service, subset })
}

fn string_field(
    map: &Map<String, Value>,
    path: &str,
    key: &str,
    expected: &'static str,
) -> Result<String, FilterConfigError> {
    let field = || format!("{path}.{key}");
    match map.get(key) {
        None | Some(Value::Null) => Err(FilterConfigError::Missing {
            field: field(),
            expected,
        }),
        Some(Value::String(s)) if s.trim().is_empty() => Err(FilterConfigError::Empty {
            field: field(),
            expected,
        }),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(FilterConfigError::WrongType {
            field: field(),
            expected,
            found: kind(other),
        }),
    }
}

fn reject_unknown(
    map: &Map<String, Value>,
    path: &str,
    known: &[&str],
    allowed: &'static str,
) -> Result<(), FilterConfigError> {
    for key in map.keys() {
        if known.contains(&key.as_str()) {
            continue;
        }
        let hint = known
            .iter()
            .find(|k| looks_like(key, k))
            .map(|k| format!(" (did you mean \"{k}\"?)"))
            .unwrap_or_default();
        let field = if path.is_empty() {
            key.clone()
        } else {
            format!("{path}{}", path_segment(key))
        };
        return Err(FilterConfigError::UnknownKey {
            field,
            hint,
            allowed,
        });
    }
    Ok(())
}

/// `.name` for plain names, `["name"]` for names with dots, bars and such (Istio cluster names).
fn path_segment(key: &str) -> String {
    let plain = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    let mut out = String::with_capacity(key.len() + 4);
    if plain {
        out.push('.');
        out.push_str(key);
    } else {
        let _ = write!(out, "[{}]", Value::String(key.to_string()));
    }
    out
}

/// A typo of `known`: same ignoring case, `_`/`-`, or within edit distance 2.
fn looks_like(key: &str, known: &str) -> bool {
    let norm = |s: &str| -> Vec<char> {
        s.chars()
            .filter(|c| *c != '_' && *c != '-')
            .flat_map(char::to_lowercase)
            .collect()
    };
    let (a, b) = (norm(key), norm(known));
    a == b || edit_distance(&a, &b) <= 2
}

fn edit_distance(a: &[char], b: &[char]) -> usize {
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, ca) in a.iter().enumerate() {
        if let Some(first) = cur.first_mut() {
            *first = i + 1;
        }
        for (j, cb) in b.iter().enumerate() {
            let sub = prev
                .get(j)
                .copied()
                .unwrap_or(usize::MAX)
                .saturating_add(usize::from(ca != cb));
            let del = prev
                .get(j + 1)
                .copied()
                .unwrap_or(usize::MAX)
                .saturating_add(1);
            let ins = cur.get(j).copied().unwrap_or(usize::MAX).saturating_add(1);
            if let Some(slot) = cur.get_mut(j + 1) {
                *slot = sub.min(del).min(ins);
            }
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev.last().copied().unwrap_or(usize::MAX)
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::OTHER;

    fn labels(service: &str, subset: &str) -> SubsetLabels {
        SubsetLabels {
            service: service.to_string(),
            subset: subset.to_string(),
        }
    }

    fn app_config() -> FilterConfig {
        FilterConfig::parse(
            r#"{"clusters": {"app_stable": {"service": "app", "subset": "stable"},
                             "app_canary": {"service": "app", "subset": "canary"}},
                "istioClusterNames": true}"#,
        )
        .unwrap()
    }

    #[test]
    fn parses_the_documented_example() {
        let c = app_config();
        assert!(c.istio_cluster_names);
        assert_eq!(c.clusters.len(), 2);
        assert_eq!(
            c.clusters["app_canary"],
            ClusterSubset::new("app", "canary")
        );
    }

    #[test]
    fn empty_and_absent_mean_defaults() {
        for text in [
            "",
            "   \n",
            "{}",
            "null",
            r#"{"clusters": null}"#,
            r#"{"clusters": {}}"#,
        ] {
            assert_eq!(
                FilterConfig::parse(text).unwrap(),
                FilterConfig::default(),
                "{text:?}"
            );
        }
        assert!(FilterConfig::default().istio_cluster_names);
        assert_eq!(
            FilterConfig::parse(r#"{"istioClusterNames": false}"#).unwrap(),
            FilterConfig {
                clusters: BTreeMap::new(),
                istio_cluster_names: false
            }
        );
    }

    #[test]
    fn bad_configs_name_the_field_and_the_fix() {
        let cases: &[(&str, &str, &str)] = &[
            (
                r#"{"clusters": 5}"#,
                "clusters",
                "clusters: expected an object mapping Envoy cluster names to subsets",
            ),
            (
                r#"{"clusters": {"app_canary": {"service": "app", "subset": 5}}}"#,
                "clusters.app_canary.subset",
                r#"clusters.app_canary.subset: expected a string like "canary", found a number"#,
            ),
            (
                r#"{"clusters": {"app_canary": {"service": "app"}}}"#,
                "clusters.app_canary.subset",
                r#"clusters.app_canary.subset: missing; write a string like "canary""#,
            ),
            (
                r#"{"clusters": {"app_canary": {"service": " ", "subset": "canary"}}}"#,
                "clusters.app_canary.service",
                r#"clusters.app_canary.service: must not be empty; write a string like "app""#,
            ),
            (
                r#"{"clusters": {"app_canary": "canary"}}"#,
                "clusters.app_canary",
                "clusters.app_canary: expected an object such as",
            ),
            (
                r#"{"clusters": {"outbound|80|v2|reviews.default.svc": {"service": "reviews", "subset": []}}}"#,
                r#"clusters["outbound|80|v2|reviews.default.svc"].subset"#,
                "found an array",
            ),
            (
                r#"{"istioClusterNames": "yes"}"#,
                "istioClusterNames",
                "istioClusterNames: expected true or false, found a string",
            ),
            (r#"[1, 2]"#, "(root)", "(root): expected a JSON object"),
        ];
        for (text, field, message) in cases {
            let err = FilterConfig::parse(text).unwrap_err();
            assert_eq!(err.field(), *field, "{text}");
            assert!(
                err.to_string().contains(message),
                "{text}: {err} does not contain {message}"
            );
        }
    }

    #[test]
    fn unknown_keys_are_rejected_by_name() {
        let err = FilterConfig::parse(r#"{"istioClusterName": true}"#).unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"istioClusterName: unknown key (did you mean "istioClusterNames"?); allowed keys are clusters, istioClusterNames"#
        );
        let err = FilterConfig::parse(r#"{"istio_cluster_names": true}"#).unwrap_err();
        assert!(
            err.to_string()
                .contains(r#"did you mean "istioClusterNames"?"#),
            "{err}"
        );
        let err = FilterConfig::parse(r#"{"routes": {}}"#).unwrap_err();
        assert_eq!(
            err.to_string(),
            "routes: unknown key; allowed keys are clusters, istioClusterNames"
        );
        let err = FilterConfig::parse(
            r#"{"clusters": {"c": {"service": "a", "subset": "b", "subsets": "x"}}}"#,
        )
        .unwrap_err();
        assert_eq!(err.field(), "clusters.c.subsets");
        assert!(
            err.to_string().contains(r#"did you mean "subset"?"#),
            "{err}"
        );
    }

    #[test]
    fn syntax_errors_and_non_utf8() {
        let err = FilterConfig::parse(r#"{"clusters": "#).unwrap_err();
        assert!(matches!(err, FilterConfigError::Syntax(_)));
        assert!(err.to_string().contains("not valid JSON"), "{err}");
        let err = FilterConfig::parse_bytes(&[b'{', 0xff, b'}']).unwrap_err();
        assert!(err.to_string().contains("not UTF-8"), "{err}");
    }

    #[test]
    fn round_trips_through_json_and_serde() {
        let c = app_config();
        let json = c.to_json();
        assert!(json.contains(r#""istioClusterNames":true"#), "{json}");
        assert_eq!(FilterConfig::parse(&json).unwrap(), c);
        // Usable inside other serde documents; validation still applies.
        let via_serde: FilterConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(via_serde, c);
        assert!(serde_json::from_str::<FilterConfig>(r#"{"clusterz": {}}"#).is_err());
    }

    #[test]
    fn resolve_table() {
        let c = app_config();
        let cases: &[(Option<&str>, SubsetLabels)] = &[
            (Some("app_stable"), labels("app", "stable")),
            (Some("app_canary"), labels("app", "canary")),
            (
                Some("outbound|9080|v2|reviews.default.svc.cluster.local"),
                labels("reviews", "v2"),
            ),
            // Two-Service setups: empty subset field → the service label.
            (
                Some("outbound|80||reviews-canary.default.svc.cluster.local"),
                labels("reviews-canary", "reviews-canary"),
            ),
            (Some("outbound|80|v1|reviews"), labels("reviews", "v1")),
            // Subset names are sanitized.
            (
                Some("outbound|80|v1.2|reviews.default"),
                labels("reviews", "v1_2"),
            ),
            // Malformed or non-outbound Istio names.
            (Some("outbound||"), SubsetLabels::other()),
            (Some("outbound|80||"), SubsetLabels::other()),
            (Some("outbound||v1|reviews"), SubsetLabels::other()),
            (Some("outbound|http|v1|reviews"), SubsetLabels::other()),
            (Some("outbound|80|v1|.reviews"), SubsetLabels::other()),
            (Some("outbound|80|v1|reviews|x"), SubsetLabels::other()),
            (Some("inbound|8080||"), SubsetLabels::other()),
            (
                Some("inbound|9080|http|reviews.default.svc.cluster.local"),
                SubsetLabels::other(),
            ),
            (Some("BlackHoleCluster"), SubsetLabels::other()),
            (Some(""), SubsetLabels::other()),
            (None, SubsetLabels::other()),
        ];
        for (cluster, want) in cases {
            assert_eq!(&c.resolve(*cluster), want, "{cluster:?}");
        }
        assert!(SubsetLabels::other().is_other());
        assert_eq!(SubsetLabels::other().service, OTHER);
    }

    #[test]
    fn configured_clusters_win_and_istio_names_can_be_disabled() {
        let istio = "outbound|80|v2|reviews.default.svc.cluster.local";
        let mut c = FilterConfig::default();
        c.clusters.insert(
            istio.to_string(),
            ClusterSubset::new("Reviews App", "canary"),
        );
        assert_eq!(c.resolve(Some(istio)), labels("Reviews_App", "canary"));

        let off = FilterConfig {
            clusters: BTreeMap::new(),
            istio_cluster_names: false,
        };
        assert_eq!(off.resolve(Some(istio)), SubsetLabels::other());
    }

    #[test]
    fn configured_label_values_are_sanitized() {
        let c = FilterConfig::parse(
            r#"{"clusters": {"x": {"service": "a;.;b", "subset": "ca=.=nary"}}}"#,
        )
        .unwrap();
        assert_eq!(c.resolve(Some("x")), labels("a___b", "ca___nary"));
        let long = "s".repeat(200);
        let c = FilterConfig::parse(&format!(
            r#"{{"clusters": {{"x": {{"service": "{long}", "subset": "v"}}}}}}"#
        ))
        .unwrap();
        assert_eq!(c.resolve(Some("x")).service.len(), contract::MAX_LABEL_LEN);
    }
}
