//! A stand-in for a Gateway API implementation (Envoy Gateway, Istio, ...), for Kubernetes mode
//! on real processes:
//!
//! ```text
//!  fledge controller ──PATCH HTTPRoute──▶ fledge-fake-apiserver
//!                                              │ GET every 100 ms
//!                                              ▼
//!                                  GatewaySync: translate rules ──▶ Envoy RDS file (rename)
//!                                              │ wait until Envoy serves that version
//!                                              ▼
//!                    PUT .../status: parents[0] Accepted + ResolvedRefs True (observedGeneration)
//! ```
//!
//! What it translates, as the Gateway API says a data plane must behave: every rule and each of
//! its matches becomes an Envoy route (path `PathPrefix`/`Exact`/`RegularExpression`, headers
//! `Exact`/`RegularExpression`), its backendRefs a cluster or weighted clusters (weight default
//! 1), and routes are ordered by the API's precedence — exact path, longest prefix, method,
//! most header matches, most query matches, then list order. A backendRef naming no known
//! backend makes `ResolvedRefs` False. It is a stand-in: filters (mirror, header modifiers),
//! hostnames, parentRefs and Gateways' listeners are not modelled.

use crate::envoy::{CANARY_CLUSTER, ROUTE_CONFIG_NAME, STABLE_CLUSTER, VIRTUAL_HOST_NAME};
use crate::http;
use crate::kubernetes::FakeCluster;
use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use std::cmp::Reverse;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The Gateway API group and version.
pub const GATEWAY_V1: &str = "/apis/gateway.networking.k8s.io/v1";

/// The Envoy cluster of a backendRef's name (`app-stable`, `app-canary`), if it is one.
pub fn cluster_of(backend: &str) -> Option<&'static str> {
    match backend {
        "app-stable" => Some(STABLE_CLUSTER),
        "app-canary" => Some(CANARY_CLUSTER),
        _ => None,
    }
}

/// An Envoy route for one match of one rule, with the keys that order it.
struct Translated {
    precedence: (
        u8,
        Reverse<usize>,
        u8,
        Reverse<usize>,
        Reverse<usize>,
        usize,
        usize,
    ),
    route: Value,
}

fn path_match(path: Option<&Value>) -> (Value, u8, usize) {
    let kind = path
        .and_then(|p| p.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("PathPrefix");
    let value = path
        .and_then(|p| p.get("value"))
        .and_then(Value::as_str)
        .unwrap_or("/");
    match kind {
        "Exact" => (json!({"path": value}), 0, value.len()),
        "RegularExpression" => (json!({"safe_regex": {"regex": value}}), 2, 0),
        _ => (json!({"prefix": value}), 1, value.len()),
    }
}

fn header_matchers(headers: Option<&Value>) -> Vec<Value> {
    headers
        .and_then(Value::as_array)
        .map(|list| {
            list.iter()
                .map(|h| {
                    let name = h.get("name").and_then(Value::as_str).unwrap_or_default();
                    let value = h.get("value").and_then(Value::as_str).unwrap_or_default();
                    let string_match =
                        if h.get("type").and_then(Value::as_str) == Some("RegularExpression") {
                            json!({"safe_regex": {"regex": value}})
                        } else {
                            json!({"exact": value})
                        };
                    json!({"name": name.to_ascii_lowercase(), "string_match": string_match})
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The route action of a rule's backendRefs; `Err` names a backendRef that resolves to nothing.
fn action(backend_refs: &[Value]) -> Result<Value, String> {
    let mut clusters = Vec::new();
    for backend in backend_refs {
        let name = backend.get("name").and_then(Value::as_str).unwrap_or("");
        let cluster = cluster_of(name).ok_or_else(|| format!("backendRef {name:?} not found"))?;
        let weight = backend.get("weight").and_then(Value::as_u64).unwrap_or(1);
        clusters.push(json!({"name": cluster, "weight": weight}));
    }
    match clusters.as_slice() {
        [] => Err("a rule has no backendRefs".into()),
        [one] => Ok(json!({"cluster": one["name"]})),
        _ => Ok(json!({"weighted_clusters": {"clusters": clusters}})),
    }
}

/// The Envoy RouteConfiguration for an HTTPRoute; `Err` is the `ResolvedRefs` problem.
pub fn route_configuration(route: &Value) -> Result<Value, String> {
    let rules = route
        .pointer("/spec/rules")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut translated = Vec::new();
    for (r, rule) in rules.iter().enumerate() {
        let name = rule
            .get("name")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| format!("rule-{r}"));
        let backend_refs = rule
            .get("backendRefs")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let action = action(&backend_refs)?;
        let matches = match rule.get("matches").and_then(Value::as_array) {
            Some(list) if !list.is_empty() => list.clone(),
            _ => vec![json!({})],
        };
        for (m, matched) in matches.iter().enumerate() {
            let (mut envoy_match, path_kind, path_len) = path_match(matched.get("path"));
            let headers = header_matchers(matched.get("headers"));
            let header_count = headers.len();
            if !headers.is_empty() {
                envoy_match["headers"] = json!(headers);
            }
            let method = matched.get("method").and_then(Value::as_str);
            if let Some(method) = method {
                let mut with_method = envoy_match["headers"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                with_method.push(json!({"name": ":method", "string_match": {"exact": method}}));
                envoy_match["headers"] = json!(with_method);
            }
            let queries = matched
                .get("queryParams")
                .and_then(Value::as_array)
                .map_or(0, Vec::len);
            translated.push(Translated {
                precedence: (
                    path_kind,
                    Reverse(path_len),
                    u8::from(method.is_none()),
                    Reverse(header_count),
                    Reverse(queries),
                    r,
                    m,
                ),
                route: json!({
                    "name": if m == 0 { name.clone() } else { format!("{name}-{m}") },
                    "match": envoy_match,
                    "route": action,
                }),
            });
        }
    }
    translated.sort_by_key(|t| t.precedence);
    Ok(json!({
        "@type": "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
        "name": ROUTE_CONFIG_NAME,
        "virtual_hosts": [{
            "name": VIRTUAL_HOST_NAME,
            "domains": ["*"],
            "routes": translated.into_iter().map(|t| t.route).collect::<Vec<_>>()
        }]
    }))
}

fn write_rds(path: &Path, configuration: &Value, version: u64) -> Result<()> {
    let response = json!({"version_info": version.to_string(), "resources": [configuration]});
    let dir = path
        .parent()
        .ok_or_else(|| anyhow!("{} has no directory", path.display()))?;
    let temp = dir.join(format!(".gateway-sync-{version}"));
    std::fs::write(&temp, serde_json::to_vec_pretty(&response)?)?;
    std::fs::rename(&temp, path).context("renaming the RDS file")?;
    Ok(())
}

fn live_version(admin_url: &str) -> Option<String> {
    let dump = http::get_json(
        &format!("{admin_url}/config_dump?resource=dynamic_route_configs"),
        Duration::from_secs(2),
    )
    .ok()?;
    dump["configs"]
        .as_array()?
        .iter()
        .find(|c| c["route_config"]["name"] == ROUTE_CONFIG_NAME)?["version_info"]
        .as_str()
        .map(str::to_string)
}

fn condition(kind: &str, ok: bool, reason: &str, message: &str, generation: i64) -> Value {
    json!({
        "type": kind,
        "status": if ok { "True" } else { "False" },
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
        "lastTransitionTime": "2026-01-01T00:00:00Z"
    })
}

/// One pass: program Envoy with the route (when it changed), then report on it.
struct Sync {
    url: String,
    rds_path: PathBuf,
    admin_url: String,
    version: u64,
    programmed: Option<Value>,
    reported_generation: Option<i64>,
    pushes: Arc<Mutex<Vec<(Instant, Value)>>>,
}

impl Sync {
    fn pass(&mut self) -> Result<()> {
        let route = http::get_json(&self.url, Duration::from_secs(2))?;
        let generation = route["metadata"]["generation"].as_i64().unwrap_or(0);
        let resolved = route_configuration(&route);
        if let Ok(configuration) = &resolved {
            if self.programmed.as_ref() != Some(configuration) {
                self.version += 1;
                write_rds(&self.rds_path, configuration, self.version)?;
                let started = Instant::now();
                while live_version(&self.admin_url).as_deref() != Some(&self.version.to_string()) {
                    if started.elapsed() > Duration::from_secs(5) {
                        bail!("Envoy did not load route version {}", self.version);
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                tracing::info!(
                    version = self.version,
                    "gateway-sync: programmed Envoy from the HTTPRoute"
                );
                self.pushes
                    .lock()
                    .map_err(|_| anyhow!("poisoned"))?
                    .push((Instant::now(), configuration.clone()));
                self.programmed = Some(configuration.clone());
            }
        }
        if self.reported_generation == Some(generation) {
            return Ok(());
        }
        let (resolved_ok, message) = match &resolved {
            Ok(_) => (true, String::new()),
            Err(problem) => (false, problem.clone()),
        };
        let mut reported = route.clone();
        reported["status"] = json!({"parents": [{
            "parentRef": {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "public", "namespace": "gateways"},
            "controllerName": "fledge.dev/e2e-gateway-sync",
            "conditions": [
                condition("Accepted", true, "Accepted", "", generation),
                condition("ResolvedRefs", resolved_ok, if resolved_ok { "ResolvedRefs" } else { "BackendNotFound" }, &message, generation),
            ]
        }]});
        let response = http::agent(Duration::from_secs(2))
            .put(&format!("{}/status", self.url))
            .header("content-type", "application/json")
            .send(serde_json::to_vec(&reported)?.as_slice())?;
        if response.status().is_success() {
            self.reported_generation = Some(generation);
        }
        Ok(())
    }
}

/// A running stand-in Gateway controller for one HTTPRoute.
pub struct GatewaySync {
    stop: Arc<AtomicBool>,
    pushes: Arc<Mutex<Vec<(Instant, Value)>>>,
    thread: Option<JoinHandle<()>>,
}

impl GatewaySync {
    /// Every 100 ms, translate HTTPRoute `namespace/name` into the RDS file `rds_path` of the
    /// Envoy whose admin is `envoy_admin_url`, then report the route accepted.
    pub fn start(
        cluster: &FakeCluster,
        namespace: &str,
        name: &str,
        rds_path: &Path,
        envoy_admin_url: &str,
    ) -> Result<GatewaySync> {
        let pushes = Arc::new(Mutex::new(Vec::new()));
        let mut sync = Sync {
            url: format!(
                "{}{GATEWAY_V1}/namespaces/{namespace}/httproutes/{name}",
                cluster.url()
            ),
            rds_path: rds_path.to_path_buf(),
            admin_url: envoy_admin_url.to_string(),
            // Versions above anything the Envoy harness wrote itself.
            version: 1_000_000,
            programmed: None,
            reported_generation: None,
            pushes: pushes.clone(),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let stop_flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("gateway-sync".into())
            .spawn(move || {
                while !stop_flag.load(Ordering::SeqCst) {
                    if let Err(e) = sync.pass() {
                        tracing::debug!(error = %e, "gateway-sync: pass failed; retrying");
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
            .context("starting the gateway-sync thread")?;
        Ok(GatewaySync {
            stop,
            pushes,
            thread: Some(thread),
        })
    }

    /// The Envoy route configurations pushed so far, with when each was live.
    pub fn pushes(&self) -> Vec<(Instant, Value)> {
        self.pushes.lock().map(|p| p.clone()).unwrap_or_default()
    }

    /// The names of the Envoy routes last pushed, in the order Envoy matches them.
    pub fn live_route_names(&self) -> Vec<String> {
        self.pushes()
            .last()
            .and_then(|(_, c)| c["virtual_hosts"][0]["routes"].as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter_map(|r| r["name"].as_str().map(str::to_string))
            .collect()
    }
}

impl Drop for GatewaySync {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The objects of a two-backend app in `namespace`: the HTTPRoute `app` (rule `primary`:
/// `app-stable` 100 / `app-canary` 0, and a health rule) and a Canary steering it, whose
/// metrics come from the gateway Envoy's admin at `envoy_admin_url`, with `analysis` as its
/// `spec.analysis` and `router` merged into its `spec.router.gatewayApi`.
pub fn app_objects(
    namespace: &str,
    envoy_admin_url: &str,
    analysis: Value,
    router: Value,
) -> Vec<Value> {
    let mut gateway = json!({
        "httpRoute": "app",
        "rule": "primary",
        "stableBackend": {"name": "app-stable", "port": 80},
        "canaryBackend": {"name": "app-canary", "port": 80}
    });
    if let (Some(gateway), Some(extra)) = (gateway.as_object_mut(), router.as_object()) {
        gateway.extend(extra.clone());
    }
    vec![
        json!({
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "HTTPRoute",
            "metadata": {"name": "app", "namespace": namespace},
            "spec": {
                "parentRefs": [{"name": "public", "namespace": "gateways"}],
                "rules": [
                    {"name": "health", "matches": [{"path": {"type": "Exact", "value": "/healthz"}}],
                     "backendRefs": [{"name": "app-stable", "port": 80}]},
                    {"name": "primary", "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                     "backendRefs": [
                        {"name": "app-stable", "port": 80, "weight": 100},
                        {"name": "app-canary", "port": 80, "weight": 0}
                     ]}
                ]
            }
        }),
        json!({
            "apiVersion": "fledge.dev/v1alpha1",
            "kind": "Canary",
            "metadata": {"name": "app", "namespace": namespace},
            "spec": {
                "service": "app",
                "stable": {"subset": "stable"},
                "canary": {"subset": "canary"},
                "metricsSource": {"envoyAdmin": {"urls": [envoy_admin_url]}},
                "router": {"gatewayApi": gateway},
                "analysis": analysis
            }
        }),
    ]
}

/// The stable and canary weights of rule `rule` of HTTPRoute `namespace/name`.
pub fn rule_weights(
    cluster: &FakeCluster,
    namespace: &str,
    name: &str,
    rule: &str,
) -> Result<crate::RouteWeights> {
    let route = cluster.get(&format!(
        "{GATEWAY_V1}/namespaces/{namespace}/httproutes/{name}"
    ))?;
    let rules = route["spec"]["rules"]
        .as_array()
        .ok_or_else(|| anyhow!("the HTTPRoute has no rules"))?;
    let found = rules
        .iter()
        .find(|r| r["name"] == rule)
        .ok_or_else(|| anyhow!("the HTTPRoute has no rule {rule:?}"))?;
    let weight = |backend: &str| {
        found["backendRefs"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|b| b["name"] == backend)
            .map(|b| b["weight"].as_u64().unwrap_or(1) as u32)
            .unwrap_or(0)
    };
    Ok(crate::RouteWeights {
        stable: weight("app-stable"),
        canary: weight("app-canary"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_become_envoy_routes_in_gateway_api_precedence() {
        let route = json!({"spec": {"rules": [
            {"name": "primary", "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
             "backendRefs": [{"name": "app-stable", "weight": 80}, {"name": "app-canary", "weight": 20}]},
            {"name": "health", "matches": [{"path": {"type": "Exact", "value": "/healthz"}}],
             "backendRefs": [{"name": "app-stable"}]},
            {"name": "primary-fledge-guard", "matches": [{"path": {"type": "PathPrefix", "value": "/"},
              "headers": [{"type": "RegularExpression", "name": "x-fledge-guard", "value": "(.*,)?app(,.*)?"}]}],
             "backendRefs": [{"name": "app-stable", "weight": 1}]},
            {"name": "primary-canary-testers", "matches": [{"path": {"type": "PathPrefix", "value": "/"},
              "headers": [{"type": "Exact", "name": "Stage", "value": "canary"}]}],
             "backendRefs": [{"name": "app-canary", "weight": 1}]}
        ]}});
        let configuration = route_configuration(&route).unwrap();
        let routes = configuration["virtual_hosts"][0]["routes"]
            .as_array()
            .unwrap();
        let names: Vec<&str> = routes.iter().map(|r| r["name"].as_str().unwrap()).collect();
        assert_eq!(
            names,
            [
                "health",
                "primary-fledge-guard",
                "primary-canary-testers",
                "primary"
            ]
        );
        assert_eq!(
            routes[2]["match"]["headers"],
            json!([{"name": "stage", "string_match": {"exact": "canary"}}])
        );
        assert_eq!(
            routes[3]["route"]["weighted_clusters"]["clusters"],
            json!([{"name": STABLE_CLUSTER, "weight": 80}, {"name": CANARY_CLUSTER, "weight": 20}])
        );
        let mut unknown = route.clone();
        unknown["spec"]["rules"][1]["backendRefs"][0]["name"] = json!("nope");
        assert_eq!(
            route_configuration(&unknown).unwrap_err(),
            "backendRef \"nope\" not found"
        );
    }
}
