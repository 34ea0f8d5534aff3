//! An in-process fake Kubernetes API server for tests, reached through a real `kube::Client`.
//!
//! It is a `tower` service (no sockets), so it runs under tokio's paused clock. It implements
//! the semantics the controller relies on, the way the real API server does:
//!
//! - a global, increasing `resourceVersion`; `PUT` with a stale one → 409 Conflict, and so does
//!   a `PATCH` whose body names a stale `metadata.resourceVersion`; custom resources must name
//!   one on `PUT`;
//! - JSON Patch (RFC 6902, with Kubernetes' rule that `test` of a missing path against `null`
//!   passes) — a failed `test` → 422; JSON merge patch (RFC 7386); other patch types → 415;
//! - the status subresource: `/status` writes change only `.status`, main-resource writes
//!   never change `.status`; `metadata.generation` is bumped only when `.spec` changes (or
//!   deletion starts);
//! - `DELETE` of an object with finalizers only sets `deletionTimestamp`; it is removed when
//!   the last finalizer goes; `POST` of an existing name → 409 AlreadyExists; an object that
//!   is removed takes its dependents (ownerReferences) with it, as the garbage collector's
//!   background propagation does;
//! - apps/v1 Deployments: `spec.replicas` defaults to 1, the selector must match the template's
//!   labels and cannot change (422), and the `scale` subresource reads and writes
//!   `spec.replicas` (autoscaling/v1 `Scale`, resourceVersion precondition); autoscaling/v2
//!   HorizontalPodAutoscalers. Nothing runs pods: [`FakeApiServer::settle_deployments`] plays the
//!   Deployment controller and kubelet in unit tests (status, observedGeneration, conditions);
//!   the e2e tests' kubelet stand-in writes the same status over HTTP;
//! - list (with the collection's resourceVersion, `limit` + `continue` pages and
//!   `labelSelector`) and watch (every event after a resourceVersion, then live events, until
//!   `timeoutSeconds`; `labelSelector` too). Like the real watch cache, only the newest events
//!   are kept (see [`FakeApiServer::with_history_limit`]): a watch from an older
//!   resourceVersion gets an `ERROR` event with `410 Expired`, and the client lists again;
//! - every request is recorded (client identity, method, path, query, content type, body and
//!   response code), like controller-rs's `ApiServerVerifier`, so tests assert exact requests;
//!   a long-running server (benchmarks) bounds that log and keeps per-kind tallies instead
//!   ([`FakeApiServer::with_request_log_limit`], [`FakeApiServer::request_tallies`]).
//!
//! It copes with tens of thousands of objects and watchers: each change is serialized once for
//! every watcher, and list pages are cut at `limit`.

use axum::body::Body as ResponseBody;
use axum::http::{Method, Request, Response, StatusCode};
use chrono::Utc;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::broadcast;

fn meta_field(object: &Value, field: &str) -> Option<String> {
    object
        .get(field)
        .and_then(Value::as_str)
        .map(str::to_string)
}

/// One request as the server saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedRequest {
    /// Which client sent it (see [`FakeApiServer::client`]).
    pub client: String,
    pub method: String,
    pub path: String,
    pub query: BTreeMap<String, String>,
    pub content_type: Option<String>,
    pub body: Option<Value>,
    /// The response's status code.
    pub status: u16,
}

impl RecordedRequest {
    /// `METHOD /path` plus `?fieldManager=...` when set — the shape tests compare.
    pub fn line(&self) -> String {
        match self.query.get("fieldManager") {
            Some(manager) => format!("{} {}?fieldManager={manager}", self.method, self.path),
            None => format!("{} {}", self.method, self.path),
        }
    }

    pub fn is_watch(&self) -> bool {
        self.query.get("watch").map(String::as_str) == Some("true")
    }

    /// What the request was, for tallies: `GET canaries list`, `GET canaries watch`,
    /// `GET virtualservices one`, `PUT canaries/status`, `POST events`, ...
    pub fn kind(&self) -> String {
        let Some((_, resource, named)) = self.target() else {
            return format!("{} other", self.method);
        };
        let what = match (self.method.as_str(), named) {
            ("GET", true) => " one",
            ("GET", false) if self.is_watch() => " watch",
            ("GET", false) => " list",
            _ => "",
        };
        format!("{} {resource}{what}", self.method)
    }

    /// Parsed path: (api group, resource[/subresource], has a name).
    pub fn target(&self) -> Option<(String, String, bool)> {
        let path = parse_path(&self.path).ok()?;
        let resource = match &path.subresource {
            Some(sub) => format!("{}/{sub}", path.plural),
            None => path.plural.clone(),
        };
        Some((path.group, resource, path.name.is_some()))
    }
}

#[derive(Debug, Clone)]
struct ResourceInfo {
    group: String,
    version: String,
    plural: String,
    kind: String,
    status_subresource: bool,
    /// Has the `scale` subresource (`spec.replicas`).
    scale_subresource: bool,
    /// Custom resources need `metadata.resourceVersion` on PUT; some built-ins don't.
    requires_version_on_update: bool,
}

/// A change, as the write paths describe it.
struct WatchEvent {
    resource_version: u64,
    group: String,
    plural: String,
    namespace: Option<String>,
    kind: &'static str,
    object: Value,
}

/// A change as watchers get it: serialized once, whatever the number of watchers.
#[derive(Debug)]
struct RecordedEvent {
    resource_version: u64,
    group: String,
    plural: String,
    namespace: Option<String>,
    labels: BTreeMap<String, String>,
    /// `{"type": ..., "object": ...}` and a newline.
    line: bytes::Bytes,
}

impl RecordedEvent {
    fn new(event: WatchEvent) -> Self {
        let line = format!("{}\n", json!({"type": event.kind, "object": &event.object}));
        RecordedEvent {
            resource_version: event.resource_version,
            labels: labels_of(&event.object),
            group: event.group,
            plural: event.plural,
            namespace: event.namespace,
            line: bytes::Bytes::from(line),
        }
    }
}

fn labels_of(object: &Value) -> BTreeMap<String, String> {
    object
        .pointer("/metadata/labels")
        .and_then(Value::as_object)
        .map(|labels| {
            labels
                .iter()
                .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

/// One requirement of a `labelSelector` (equality- and set-based, as in Kubernetes).
#[derive(Debug, Clone, PartialEq)]
enum LabelRequirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

impl LabelRequirement {
    fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        match self {
            LabelRequirement::Equals(k, v) => labels.get(k) == Some(v),
            LabelRequirement::NotEquals(k, v) => labels.get(k) != Some(v),
            LabelRequirement::In(k, values) => labels.get(k).is_some_and(|v| values.contains(v)),
            LabelRequirement::NotIn(k, values) => {
                !labels.get(k).is_some_and(|v| values.contains(v))
            }
            LabelRequirement::Exists(k) => labels.contains_key(k),
            LabelRequirement::NotExists(k) => !labels.contains_key(k),
        }
    }
}

/// Parse `a=b,c!=d,e in (f,g),h notin (i),j,!k`.
fn parse_label_selector(text: &str) -> Result<Vec<LabelRequirement>, String> {
    let mut parts = Vec::new();
    let mut depth = 0usize;
    let mut current = String::new();
    for c in text.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push(std::mem::take(&mut current));
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    parts.push(current);
    let set = |values: &str| -> Result<Vec<String>, String> {
        let inner = values
            .trim()
            .strip_prefix('(')
            .and_then(|v| v.strip_suffix(')'))
            .ok_or_else(|| format!("invalid label selector set {values:?}"))?;
        Ok(inner.split(',').map(|v| v.trim().to_string()).collect())
    };
    parts
        .iter()
        .map(|part| part.trim())
        .filter(|part| !part.is_empty())
        .map(|part| {
            if let Some((key, values)) = part.split_once(" notin ") {
                return Ok(LabelRequirement::NotIn(key.trim().into(), set(values)?));
            }
            if let Some((key, values)) = part.split_once(" in ") {
                return Ok(LabelRequirement::In(key.trim().into(), set(values)?));
            }
            if let Some((key, value)) = part.split_once("!=") {
                return Ok(LabelRequirement::NotEquals(
                    key.trim().into(),
                    value.trim().into(),
                ));
            }
            if let Some((key, value)) = part.split_once("==").or_else(|| part.split_once('=')) {
                return Ok(LabelRequirement::Equals(
                    key.trim().into(),
                    value.trim().into(),
                ));
            }
            if let Some(key) = part.strip_prefix('!') {
                return Ok(LabelRequirement::NotExists(key.trim().into()));
            }
            if part.contains(char::is_whitespace) {
                return Err(format!("invalid label selector requirement {part:?}"));
            }
            Ok(LabelRequirement::Exists(part.into()))
        })
        .collect()
}

fn selected(selector: &[LabelRequirement], labels: &BTreeMap<String, String>) -> bool {
    selector
        .iter()
        .all(|requirement| requirement.matches(labels))
}

type Hook = Box<dyn FnOnce(&FakeApiServer) + Send>;

/// What another controller does when an object it watches changes (see
/// [`FakeApiServer::on_write`]).
type Reaction = Arc<dyn Fn(&FakeApiServer, &Value) + Send + Sync>;

struct Reactor {
    group: String,
    plural: String,
    reaction: Reaction,
}

struct PendingHook {
    method: String,
    path_contains: String,
    hook: Hook,
}

/// Events kept for watches that resume from a resourceVersion (see
/// [`FakeApiServer::with_history_limit`]).
pub const DEFAULT_HISTORY_LIMIT: usize = 100_000;

#[derive(Default)]
struct State {
    last_version: u64,
    next_uid: u64,
    /// (group, plural, namespace, name) → object
    objects: BTreeMap<(String, String, String, String), Value>,
    /// The newest events, oldest first.
    history: VecDeque<Arc<RecordedEvent>>,
    history_limit: usize,
    /// The resourceVersion of the newest event dropped from `history`: a watch from an older
    /// version would miss events (410 Expired).
    compacted: u64,
    requests: VecDeque<RecordedRequest>,
    /// `None`: keep every request.
    request_log_limit: Option<usize>,
    /// Requests by [`RecordedRequest::kind`].
    tallies: BTreeMap<String, u64>,
    hooks: VecDeque<PendingHook>,
    reactors: Vec<Reactor>,
}

/// The fake API server; cheap to clone (shared state).
#[derive(Clone)]
pub struct FakeApiServer {
    state: Arc<Mutex<State>>,
    resources: Arc<Vec<ResourceInfo>>,
    events: broadcast::Sender<Arc<RecordedEvent>>,
}

/// A failed request: status code, Kubernetes reason, message.
struct Failure(StatusCode, &'static str, String);

impl Failure {
    fn not_found(what: &str) -> Self {
        Failure(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("{what} not found"),
        )
    }
    fn conflict(message: String) -> Self {
        Failure(StatusCode::CONFLICT, "Conflict", message)
    }
    fn invalid(message: String) -> Self {
        Failure(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", message)
    }
    fn bad_request(message: String) -> Self {
        Failure(StatusCode::BAD_REQUEST, "BadRequest", message)
    }
}

#[derive(Debug, Clone, PartialEq)]
struct ApiPath {
    group: String,
    namespace: Option<String>,
    plural: String,
    name: Option<String>,
    subresource: Option<String>,
}

fn parse_path(path: &str) -> Result<ApiPath, String> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = match parts.as_slice() {
        ["api", _version, rest @ ..] => (String::new(), rest),
        ["apis", group, _version, rest @ ..] => (group.to_string(), rest),
        _ => return Err(format!("not an API path: {path}")),
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
        rest => (None, rest),
    };
    let (plural, name, subresource) = match rest {
        [plural] => (plural, None, None),
        [plural, name] => (plural, Some(name.to_string()), None),
        [plural, name, sub] => (plural, Some(name.to_string()), Some(sub.to_string())),
        _ => return Err(format!("unsupported API path: {path}")),
    };
    Ok(ApiPath {
        group,
        namespace,
        plural: plural.to_string(),
        name,
        subresource,
    })
}

fn parse_query(query: Option<&str>) -> BTreeMap<String, String> {
    query
        .unwrap_or_default()
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

/// `application/x-www-form-urlencoded` decoding (`+` is a space); bad escapes stay as they are.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        let escaped = (b == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match (b, escaped) {
            (_, Some(decoded)) => {
                out.push(decoded);
                i += 3;
            }
            (b'+', None) => {
                out.push(b' ');
                i += 1;
            }
            (b, None) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A list page's `continue` token: the first page's resourceVersion, and where the next page
/// starts (after this namespace and name).
fn continue_token(list_version: &str, namespace: &str, name: &str) -> String {
    format!("{list_version}/{namespace}/{name}")
        .bytes()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// (list resourceVersion, namespace, name)
fn parse_continue_token(token: &str) -> Option<(String, String, String)> {
    let bytes: Option<Vec<u8>> = (0..token.len())
        .step_by(2)
        .map(|i| {
            token
                .get(i..i + 2)
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
        })
        .collect();
    let text = String::from_utf8(bytes?).ok()?;
    let (version, rest) = text.split_once('/')?;
    let (namespace, name) = rest.split_once('/')?;
    Some((version.to_string(), namespace.to_string(), name.to_string()))
}

/// RFC 6902 with Kubernetes' `test` rule (a missing path equals `null`).
pub fn apply_json_patch(doc: &mut Value, ops: &Value) -> Result<(), String> {
    let ops = ops.as_array().ok_or("a JSON Patch must be an array")?;
    for op in ops {
        let path = op.get("path").and_then(Value::as_str).unwrap_or_default();
        if op.get("op").and_then(Value::as_str) == Some("test") {
            let actual = doc.pointer(path).unwrap_or(&Value::Null);
            let expected = op.get("value").unwrap_or(&Value::Null);
            if actual != expected {
                return Err(format!(
                    "the server rejected our request due to an error in our request: test failed at {path}: is {actual}, not {expected}"
                ));
            }
            continue;
        }
        let single: json_patch::Patch =
            serde_json::from_value(json!([op])).map_err(|e| format!("invalid operation: {e}"))?;
        json_patch::patch(doc, &single.0).map_err(|e| format!("cannot apply {op}: {e}"))?;
    }
    Ok(())
}

fn status_body(code: StatusCode, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code.as_u16(),
    })
}

fn json_response(code: StatusCode, body: &Value) -> Response<ResponseBody> {
    let mut response = Response::new(ResponseBody::from(body.to_string()));
    *response.status_mut() = code;
    response
}

fn meta<'a>(object: &'a Value, field: &str) -> Option<&'a str> {
    object.get("metadata")?.get(field)?.as_str()
}

fn finalizers_of(object: &Value) -> usize {
    object
        .pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .map_or(0, Vec::len)
}

/// What the real API server defaults on write (only what the controller relies on).
fn default_object(info: &ResourceInfo, object: &mut Value) {
    if info.group == "apps" && info.plural == "deployments" {
        if let Some(spec) = object.get_mut("spec").and_then(Value::as_object_mut) {
            spec.entry("replicas").or_insert(json!(1));
        }
    }
}

/// The API server's validation of what the controller writes: a Deployment's selector must
/// select its template's labels and cannot change.
fn validate_object(info: &ResourceInfo, old: Option<&Value>, new: &Value) -> Result<(), Failure> {
    if !(info.group == "apps" && info.plural == "deployments") {
        return Ok(());
    }
    let selector = new.pointer("/spec/selector").unwrap_or(&Value::Null);
    if let Some(old) = old {
        if old.pointer("/spec/selector").unwrap_or(&Value::Null) != selector {
            return Err(Failure::invalid(format!(
                "Deployment.apps {:?} is invalid: spec.selector: Invalid value: {selector}: field is immutable",
                meta(new, "name").unwrap_or_default()
            )));
        }
    }
    let labels = new
        .pointer("/spec/template/metadata/labels")
        .and_then(Value::as_object);
    let matches = selector
        .get("matchLabels")
        .and_then(Value::as_object)
        .is_some_and(|wanted| {
            !wanted.is_empty()
                && wanted
                    .iter()
                    .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
        });
    if !matches {
        return Err(Failure::invalid(format!(
            "Deployment.apps {:?} is invalid: spec.template.metadata.labels: Invalid value: `selector` does not match template `labels`",
            meta(new, "name").unwrap_or_default()
        )));
    }
    Ok(())
}

/// A Deployment's status as the Deployment controller writes it: `pods` pods, `updated` of the
/// current template, `available` of them ready, with the `Available` and `Progressing`
/// conditions.
pub fn deployment_status(deployment: &Value, pods: i64, updated: i64, available: i64) -> Value {
    let replicas = deployment
        .pointer("/spec/replicas")
        .and_then(Value::as_i64)
        .unwrap_or(1);
    let generation = deployment
        .pointer("/metadata/generation")
        .cloned()
        .unwrap_or(json!(1));
    let complete = updated == replicas && available >= replicas && pods == updated;
    let condition = |type_: &str, status: bool, reason: &str, message: String| json!({"type": type_, "status": if status { "True" } else { "False" }, "reason": reason, "message": message});
    json!({
        "observedGeneration": generation,
        "replicas": pods,
        "updatedReplicas": updated,
        "readyReplicas": available,
        "availableReplicas": available,
        "unavailableReplicas": (pods - available).max(0),
        "conditions": [
            condition(
                "Available",
                available >= replicas,
                if available >= replicas { "MinimumReplicasAvailable" } else { "MinimumReplicasUnavailable" },
                format!("{available} of {replicas} replicas available"),
            ),
            condition(
                "Progressing",
                true,
                if complete { "NewReplicaSetAvailable" } else { "ReplicaSetUpdated" },
                format!("{updated} of {replicas} replicas updated"),
            ),
        ],
    })
}

/// A Deployment's label selector as the `Scale` status shows it: `k=v,k2=v2`.
fn selector_string(deployment: &Value) -> String {
    deployment
        .pointer("/spec/selector/matchLabels")
        .and_then(Value::as_object)
        .map(|labels| {
            labels
                .iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default()
}

fn scale_of(deployment: &Value) -> Value {
    let metadata = &deployment["metadata"];
    json!({
        "apiVersion": "autoscaling/v1",
        "kind": "Scale",
        "metadata": {
            "name": metadata["name"],
            "namespace": metadata["namespace"],
            "uid": metadata["uid"],
            "resourceVersion": metadata["resourceVersion"],
            "creationTimestamp": metadata["creationTimestamp"],
        },
        "spec": {"replicas": deployment.pointer("/spec/replicas").cloned().unwrap_or(json!(1))},
        "status": {
            "replicas": deployment.pointer("/status/replicas").cloned().unwrap_or(json!(0)),
            "selector": selector_string(deployment),
        },
    })
}

impl Default for FakeApiServer {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeApiServer {
    /// A server that knows Canaries, VirtualServices, DestinationRules, HTTPRoutes,
    /// GRPCRoutes, Deployments, HorizontalPodAutoscalers, Leases and Events.
    pub fn new() -> Self {
        let resource =
            |api_version: &str, plural: &str, kind: &str, status: bool, versioned: bool| {
                let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
                ResourceInfo {
                    group: group.into(),
                    version: version.into(),
                    plural: plural.into(),
                    kind: kind.into(),
                    status_subresource: status,
                    scale_subresource: plural == "deployments",
                    requires_version_on_update: versioned,
                }
            };
        let resources = vec![
            resource("fledge.dev/v1alpha1", "canaries", "Canary", true, true),
            resource(
                "networking.istio.io/v1",
                "virtualservices",
                "VirtualService",
                true,
                true,
            ),
            resource(
                "networking.istio.io/v1",
                "destinationrules",
                "DestinationRule",
                true,
                true,
            ),
            resource(
                "gateway.networking.k8s.io/v1",
                "httproutes",
                "HTTPRoute",
                true,
                true,
            ),
            resource(
                "gateway.networking.k8s.io/v1",
                "grpcroutes",
                "GRPCRoute",
                true,
                true,
            ),
            resource("apps/v1", "deployments", "Deployment", true, false),
            resource(
                "autoscaling/v2",
                "horizontalpodautoscalers",
                "HorizontalPodAutoscaler",
                true,
                false,
            ),
            resource("coordination.k8s.io/v1", "leases", "Lease", false, false),
            resource("events.k8s.io/v1", "events", "Event", false, false),
        ];
        let (events, _) = broadcast::channel(16_384);
        FakeApiServer {
            state: Arc::new(Mutex::new(State {
                history_limit: DEFAULT_HISTORY_LIMIT,
                ..State::default()
            })),
            resources: Arc::new(resources),
            events,
        }
    }

    /// Keep only the newest `limit` events for resuming watches, as the API server's watch
    /// cache does; a watch from an older resourceVersion gets `410 Expired`.
    pub fn with_history_limit(self, limit: usize) -> Self {
        self.lock().history_limit = limit.max(1);
        self
    }

    /// Keep only the newest `limit` requests in [`FakeApiServer::requests`] (the tallies count
    /// them all). For long-running servers.
    pub fn with_request_log_limit(self, limit: usize) -> Self {
        self.lock().request_log_limit = Some(limit);
        self
    }

    /// How many requests of each [`RecordedRequest::kind`] were served so far.
    pub fn request_tallies(&self) -> BTreeMap<String, u64> {
        self.lock().tallies.clone()
    }

    /// Write an object's `.status` as another client would (e.g. to seed a Canary that is
    /// mid-rollout); not recorded.
    pub fn set_status(
        &self,
        group: &str,
        plural: &str,
        namespace: &str,
        name: &str,
        status: Value,
    ) -> Result<Value, String> {
        let mut object = self
            .get(group, plural, namespace, name)
            .ok_or_else(|| format!("{plural} {namespace}/{name} does not exist"))?;
        object["status"] = status;
        self.update_object(group, plural, namespace, name, object, true)
            .map_err(|Failure(_, _, message)| message)
    }
    fn lock(&self) -> MutexGuard<'_, State> {
        match self.state.lock() {
            Ok(state) => state,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// A kube client whose requests are recorded as coming from `identity`.
    pub fn client(&self, identity: &str) -> kube::Client {
        let server = self.clone();
        let identity = identity.to_string();
        let service = tower::service_fn(move |request: Request<kube::client::Body>| {
            let server = server.clone();
            let identity = identity.clone();
            async move { Ok::<_, Infallible>(server.handle(&identity, request).await) }
        });
        kube::Client::new(service, "default")
    }

    /// Serve this API server over HTTP on `listener` (for a real `fledge controller` process in
    /// e2e tests; plain HTTP, no authentication). A request's client identity is its bearer
    /// token (a kubeconfig `token:`), else `anonymous`. `GET /__fake/requests` answers every
    /// recorded request so far (`client`, `method`, `path`, `status`, `body`; see
    /// [`FakeApiServer::with_request_log_limit`]) and `GET /__fake/request-tallies` the
    /// [`FakeApiServer::request_tallies`]; neither is recorded itself. Runs until `shutdown`
    /// completes.
    pub async fn serve_http(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let log = self.clone();
        let requests = move || {
            let log = log.clone();
            async move {
                let lines: Vec<Value> = log
                    .requests()
                    .iter()
                    .map(|r| json!({"client": r.client, "method": r.method, "path": r.path, "status": r.status, "body": r.body}))
                    .collect();
                json_response(StatusCode::OK, &Value::Array(lines))
            }
        };
        let tallies = self.clone();
        let app = axum::Router::new()
            .route("/__fake/requests", axum::routing::get(requests))
            .route(
                "/__fake/request-tallies",
                axum::routing::get(move || {
                    let tallies = tallies.request_tallies();
                    async move { axum::Json(tallies) }
                }),
            )
            .fallback(move |request: Request<axum::body::Body>| {
                let server = self.clone();
                async move {
                    let identity = request
                        .headers()
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.strip_prefix("Bearer "))
                        .unwrap_or("anonymous")
                        .to_string();
                    let (parts, body) = request.into_parts();
                    let bytes = match body.collect().await {
                        Ok(collected) => collected.to_bytes(),
                        Err(_) => Default::default(),
                    };
                    let request =
                        Request::from_parts(parts, kube::client::Body::from(bytes.to_vec()));
                    server.handle(&identity, request).await
                }
            });
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
    }

    /// Create an object as another client would (kubectl apply of a new object); not recorded.
    /// `apiVersion` names the group (`networking.istio.io/v1` → `networking.istio.io`); the
    /// resource is found by `kind`.
    pub fn try_create(&self, object: Value) -> Result<Value, String> {
        let kind = meta_field(&object, "kind").ok_or("the object has no kind")?;
        let group = meta_field(&object, "apiVersion")
            .ok_or("the object has no apiVersion")?
            .rsplit_once('/')
            .map(|(group, _)| group.to_string())
            .unwrap_or_default();
        let plural = self
            .resources
            .iter()
            .find(|r| r.group == group && r.kind == kind)
            .map(|r| r.plural.clone())
            .ok_or_else(|| format!("this fake API server does not serve {group} {kind}"))?;
        let namespace = meta(&object, "namespace").unwrap_or("default").to_string();
        self.create_object(&group, &plural, &namespace, object)
            .map_err(|Failure(_, _, message)| message)
    }

    /// Every request so far, in order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.lock().requests.iter().cloned().collect()
    }

    /// Every request so far, forgetting them.
    pub fn take_requests(&self) -> Vec<RecordedRequest> {
        std::mem::take(&mut self.lock().requests).into()
    }

    /// Run `hook` just before the next request whose method is `method` and whose path
    /// contains `path_contains` is handled (e.g. to make a concurrent edit between a read and
    /// a write).
    pub fn before_next(
        &self,
        method: &str,
        path_contains: &str,
        hook: impl FnOnce(&FakeApiServer) + Send + 'static,
    ) {
        self.lock().hooks.push_back(PendingHook {
            method: method.to_string(),
            path_contains: path_contains.to_string(),
            hook: Box::new(hook),
        });
    }

    fn info(&self, group: &str, plural: &str) -> Option<&ResourceInfo> {
        self.resources
            .iter()
            .find(|r| r.group == group && r.plural == plural)
    }

    /// The stored object, if any.
    pub fn get(&self, group: &str, plural: &str, namespace: &str, name: &str) -> Option<Value> {
        self.lock()
            .objects
            .get(&(group.into(), plural.into(), namespace.into(), name.into()))
            .cloned()
    }

    /// All stored objects of one resource in a namespace.
    pub fn list(&self, group: &str, plural: &str, namespace: &str) -> Vec<Value> {
        self.lock()
            .objects
            .iter()
            .filter(|((g, p, ns, _), _)| g == group && p == plural && ns == namespace)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Create an object as another client (kubectl, GitOps) would; not recorded.
    pub fn create(&self, group: &str, plural: &str, object: Value) -> Value {
        let namespace = meta(&object, "namespace").unwrap_or("default").to_string();
        match self.create_object(group, plural, &namespace, object) {
            Ok(stored) => {
                let name = meta(&stored, "name").unwrap_or_default().to_string();
                self.react(group, plural, &namespace, &name);
                stored
            }
            Err(Failure(_, _, message)) => panic!("fake API server: create failed: {message}"),
        }
    }

    /// Change a stored object as another client would (main-resource rules apply); not
    /// recorded.
    pub fn edit(
        &self,
        group: &str,
        plural: &str,
        namespace: &str,
        name: &str,
        change: impl FnOnce(&mut Value),
    ) {
        self.change_stored(group, plural, namespace, name, false, change);
        self.react(group, plural, namespace, name);
    }

    /// Change a stored object's status as its controller would (status rules apply); not
    /// recorded.
    pub fn edit_status(
        &self,
        group: &str,
        plural: &str,
        namespace: &str,
        name: &str,
        change: impl FnOnce(&mut Value),
    ) {
        self.change_stored(group, plural, namespace, name, true, change);
    }

    /// Read, change and write back one stored object, with the main-resource or the status
    /// rules; a test that edits what is not there, or what the rules refuse, fails here.
    fn change_stored(
        &self,
        group: &str,
        plural: &str,
        namespace: &str,
        name: &str,
        status: bool,
        change: impl FnOnce(&mut Value),
    ) {
        let Some(mut object) = self.get(group, plural, namespace, name) else {
            panic!("fake API server: {plural} {namespace}/{name} does not exist");
        };
        change(&mut object);
        if let Err(Failure(_, _, message)) =
            self.update_object(group, plural, namespace, name, object, status)
        {
            let what = if status { "status edit" } else { "edit" };
            panic!("fake API server: {what} failed: {message}");
        }
    }

    /// After every change of a `group`/`plural` object other than a status write — by a client
    /// or by a test's `create`/`edit` — run `reaction` with the stored object, as a controller
    /// watching it would (e.g. a Gateway controller writing the route's `status.parents`).
    pub fn on_write(
        &self,
        group: &str,
        plural: &str,
        reaction: impl Fn(&FakeApiServer, &Value) + Send + Sync + 'static,
    ) {
        self.lock().reactors.push(Reactor {
            group: group.into(),
            plural: plural.into(),
            reaction: Arc::new(reaction),
        });
    }

    fn react(&self, group: &str, plural: &str, namespace: &str, name: &str) {
        let reactions: Vec<Reaction> = self
            .lock()
            .reactors
            .iter()
            .filter(|r| r.group == group && r.plural == plural)
            .map(|r| r.reaction.clone())
            .collect();
        for reaction in reactions {
            if let Some(object) = self.get(group, plural, namespace, name) {
                reaction(self, &object);
            }
        }
    }

    /// Delete an object as another client would (finalizers respected); not recorded.
    pub fn delete(&self, group: &str, plural: &str, namespace: &str, name: &str) {
        if let Err(Failure(_, _, message)) = self.delete_object(group, plural, namespace, name) {
            panic!("fake API server: delete failed: {message}");
        }
    }

    fn record(&self, state: &mut State, event: WatchEvent) {
        let event = Arc::new(RecordedEvent::new(event));
        state.history.push_back(event.clone());
        while state.history.len() > state.history_limit {
            if let Some(dropped) = state.history.pop_front() {
                state.compacted = dropped.resource_version;
            }
        }
        let _ = self.events.send(event);
    }

    fn next_version(state: &mut State) -> u64 {
        state.last_version += 1;
        state.last_version
    }

    fn create_object(
        &self,
        group: &str,
        plural: &str,
        namespace: &str,
        mut object: Value,
    ) -> Result<Value, Failure> {
        let info = self
            .info(group, plural)
            .ok_or_else(|| Failure::not_found(&format!("resource {plural}.{group}")))?
            .clone();
        let name = meta(&object, "name")
            .map(str::to_string)
            .ok_or_else(|| Failure::invalid("metadata.name: Required value".into()))?;
        let mut state = self.lock();
        let key = (
            group.to_string(),
            plural.to_string(),
            namespace.to_string(),
            name.clone(),
        );
        if state.objects.contains_key(&key) {
            return Err(Failure(
                StatusCode::CONFLICT,
                "AlreadyExists",
                format!("{plural}.{group} \"{name}\" already exists"),
            ));
        }
        let version = Self::next_version(&mut state);
        state.next_uid += 1;
        let uid = format!("00000000-0000-0000-0000-{:012}", state.next_uid);
        let metadata = object
            .as_object_mut()
            .ok_or_else(|| Failure::bad_request("not an object".into()))?
            .entry("metadata")
            .or_insert_with(|| json!({}));
        metadata["namespace"] = json!(namespace);
        metadata["uid"] = json!(uid);
        metadata["resourceVersion"] = json!(version.to_string());
        metadata["generation"] = json!(1);
        metadata["creationTimestamp"] = json!(Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string());
        if info.status_subresource {
            if let Some(map) = object.as_object_mut() {
                map.remove("status");
            }
        }
        default_object(&info, &mut object);
        validate_object(&info, None, &object)?;
        state.objects.insert(key, object.clone());
        self.record(
            &mut state,
            WatchEvent {
                resource_version: version,
                group: group.into(),
                plural: plural.into(),
                namespace: Some(namespace.into()),
                kind: "ADDED",
                object: object.clone(),
            },
        );
        Ok(object)
    }

    /// Store `new` as the next version of an object, applying the main-resource or status
    /// rules and the resourceVersion precondition (if `new` names one).
    fn update_object(
        &self,
        group: &str,
        plural: &str,
        namespace: &str,
        name: &str,
        new: Value,
        status_subresource: bool,
    ) -> Result<Value, Failure> {
        let info = self
            .info(group, plural)
            .ok_or_else(|| Failure::not_found(&format!("resource {plural}.{group}")))?
            .clone();
        let mut state = self.lock();
        let key = (
            group.to_string(),
            plural.to_string(),
            namespace.to_string(),
            name.to_string(),
        );
        let old = state
            .objects
            .get(&key)
            .cloned()
            .ok_or_else(|| Failure::not_found(&format!("{plural}.{group} \"{name}\"")))?;
        let current_version = meta(&old, "resourceVersion")
            .unwrap_or_default()
            .to_string();
        match meta(&new, "resourceVersion") {
            Some(version) if version != current_version => {
                return Err(Failure::conflict(format!(
                    "Operation cannot be fulfilled on {plural}.{group} \"{name}\": the object has been modified; please apply your changes to the latest version and try again"
                )))
            }
            Some(_) => {}
            None if info.requires_version_on_update => {
                return Err(Failure::invalid(
                    "metadata.resourceVersion: Invalid value: 0x0: must be specified for an update".into(),
                ))
            }
            None => {}
        }
        let mut stored = if status_subresource {
            let mut stored = old.clone();
            match new.get("status") {
                Some(status) => stored["status"] = status.clone(),
                None => {
                    if let Some(map) = stored.as_object_mut() {
                        map.remove("status");
                    }
                }
            }
            stored
        } else {
            let mut stored = new.clone();
            if info.status_subresource {
                match old.get("status") {
                    Some(status) => stored["status"] = status.clone(),
                    None => {
                        if let Some(map) = stored.as_object_mut() {
                            map.remove("status");
                        }
                    }
                }
            }
            // Server-owned metadata.
            for field in [
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "generation",
                "namespace",
                "name",
            ] {
                match old.pointer(&format!("/metadata/{field}")) {
                    Some(value) => stored["metadata"][field] = value.clone(),
                    None => {
                        if let Some(map) = stored.get_mut("metadata").and_then(Value::as_object_mut)
                        {
                            map.remove(field);
                        }
                    }
                }
            }
            default_object(&info, &mut stored);
            validate_object(&info, Some(&old), &stored)?;
            if old.get("spec") != stored.get("spec") {
                let generation = old
                    .pointer("/metadata/generation")
                    .and_then(Value::as_i64)
                    .unwrap_or(1);
                stored["metadata"]["generation"] = json!(generation + 1);
            }
            stored
        };
        if stored == old {
            // A no-op write does not change the resourceVersion (as in Kubernetes).
            return Ok(old);
        }
        let version = Self::next_version(&mut state);
        stored["metadata"]["resourceVersion"] = json!(version.to_string());
        let deleting = stored.pointer("/metadata/deletionTimestamp").is_some();
        let event_kind = if deleting && finalizers_of(&stored) == 0 {
            state.objects.remove(&key);
            self.collect_garbage(&mut state, &stored);
            "DELETED"
        } else {
            state.objects.insert(key, stored.clone());
            "MODIFIED"
        };
        self.record(
            &mut state,
            WatchEvent {
                resource_version: version,
                group: group.into(),
                plural: plural.into(),
                namespace: Some(namespace.into()),
                kind: event_kind,
                object: stored.clone(),
            },
        );
        Ok(stored)
    }

    fn delete_object(
        &self,
        group: &str,
        plural: &str,
        namespace: &str,
        name: &str,
    ) -> Result<Value, Failure> {
        let mut state = self.lock();
        let key = (
            group.to_string(),
            plural.to_string(),
            namespace.to_string(),
            name.to_string(),
        );
        let mut object = state
            .objects
            .get(&key)
            .cloned()
            .ok_or_else(|| Failure::not_found(&format!("{plural}.{group} \"{name}\"")))?;
        let version = Self::next_version(&mut state);
        object["metadata"]["resourceVersion"] = json!(version.to_string());
        let kind = if finalizers_of(&object) > 0 {
            if object.pointer("/metadata/deletionTimestamp").is_some() {
                return Ok(object);
            }
            object["metadata"]["deletionTimestamp"] =
                json!(Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string());
            let generation = object
                .pointer("/metadata/generation")
                .and_then(Value::as_i64)
                .unwrap_or(1);
            object["metadata"]["generation"] = json!(generation + 1);
            state.objects.insert(key, object.clone());
            "MODIFIED"
        } else {
            state.objects.remove(&key);
            "DELETED"
        };
        self.record(
            &mut state,
            WatchEvent {
                resource_version: version,
                group: group.into(),
                plural: plural.into(),
                namespace: Some(namespace.into()),
                kind,
                object: object.clone(),
            },
        );
        if kind == "DELETED" {
            self.collect_garbage(&mut state, &object);
        }
        Ok(object)
    }

    /// The garbage collector (background propagation): delete what names `removed` as an
    /// owner, in its namespace; dependents with finalizers only get a deletionTimestamp.
    fn collect_garbage(&self, state: &mut State, removed: &Value) {
        let Some(uid) = removed.pointer("/metadata/uid").and_then(Value::as_str) else {
            return;
        };
        let dependents: Vec<(String, String, String, String)> = state
            .objects
            .iter()
            .filter(|(_, object)| {
                object
                    .pointer("/metadata/ownerReferences")
                    .and_then(Value::as_array)
                    .is_some_and(|refs| refs.iter().any(|r| r["uid"] == uid))
            })
            .map(|(key, _)| key.clone())
            .collect();
        for (group, plural, namespace, name) in dependents {
            let key = (group.clone(), plural.clone(), namespace.clone(), name);
            let Some(mut object) = state.objects.get(&key).cloned() else {
                continue;
            };
            if object.pointer("/metadata/deletionTimestamp").is_some() {
                continue;
            }
            let version = Self::next_version(state);
            object["metadata"]["resourceVersion"] = json!(version.to_string());
            let kind = if finalizers_of(&object) > 0 {
                object["metadata"]["deletionTimestamp"] =
                    json!(Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string());
                state.objects.insert(key, object.clone());
                "MODIFIED"
            } else {
                state.objects.remove(&key);
                "DELETED"
            };
            self.record(
                state,
                WatchEvent {
                    resource_version: version,
                    group,
                    plural,
                    namespace: Some(namespace),
                    kind,
                    object: object.clone(),
                },
            );
            if kind == "DELETED" {
                self.collect_garbage(state, &object);
            }
        }
    }

    async fn handle(
        &self,
        identity: &str,
        request: Request<kube::client::Body>,
    ) -> Response<ResponseBody> {
        let method = request.method().clone();
        let path = request.uri().path().to_string();
        let query = parse_query(request.uri().query());
        let content_type = request
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body_bytes = match request.into_body().collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(_) => Default::default(),
        };
        let body: Option<Value> = if body_bytes.is_empty() {
            None
        } else {
            serde_json::from_slice(&body_bytes).ok()
        };
        let hook = {
            let mut state = self.lock();
            let position = state
                .hooks
                .iter()
                .position(|h| h.method == method.as_str() && path.contains(&h.path_contains));
            position.and_then(|i| state.hooks.remove(i))
        };
        if let Some(pending) = hook {
            (pending.hook)(self);
        }
        let (code, response) = match self.dispatch(
            &method,
            &path,
            &query,
            content_type.as_deref(),
            body.clone(),
        ) {
            Ok(Reply::Object(code, object)) => (code, json_response(code, &object)),
            Ok(Reply::Watch(response)) => (StatusCode::OK, response),
            Err(Failure(code, reason, message)) => (
                code,
                json_response(code, &status_body(code, reason, &message)),
            ),
        };
        let changed = code.is_success() && matches!(method.as_str(), "POST" | "PUT" | "PATCH");
        let recorded = RecordedRequest {
            client: identity.to_string(),
            method: method.to_string(),
            path: path.clone(),
            query,
            content_type,
            body: body.clone(),
            status: code.as_u16(),
        };
        {
            let mut state = self.lock();
            *state.tallies.entry(recorded.kind()).or_default() += 1;
            if state.request_log_limit != Some(0) {
                state.requests.push_back(recorded);
            }
            while state
                .request_log_limit
                .is_some_and(|limit| state.requests.len() > limit)
            {
                state.requests.pop_front();
            }
        }
        if changed {
            if let Ok(api) = parse_path(&path) {
                let name = api.name.clone().or_else(|| {
                    body.as_ref()
                        .and_then(|b| meta(b, "name"))
                        .map(str::to_string)
                });
                if let (None, Some(namespace), Some(name)) =
                    (&api.subresource, &api.namespace, name)
                {
                    self.react(&api.group, &api.plural, namespace, &name);
                }
            }
        }
        response
    }

    fn dispatch(
        &self,
        method: &Method,
        path: &str,
        query: &BTreeMap<String, String>,
        content_type: Option<&str>,
        body: Option<Value>,
    ) -> Result<Reply, Failure> {
        let api = parse_path(path).map_err(|e| Failure(StatusCode::NOT_FOUND, "NotFound", e))?;
        let info = self
            .info(&api.group, &api.plural)
            .ok_or_else(|| {
                Failure::not_found(&format!(
                    "the server could not find the requested resource ({path})"
                ))
            })?
            .clone();
        match api.subresource.as_deref() {
            None => {}
            Some("status") if info.status_subresource => {}
            Some("scale") if info.scale_subresource => {
                return self.scale(method, &api, query, content_type, body);
            }
            Some(sub) => {
                return Err(Failure::not_found(&format!(
                    "subresource {sub} of {}",
                    api.plural
                )))
            }
        }
        let on_status = api.subresource.is_some();
        let namespace = api.namespace.clone().unwrap_or_default();
        match (method.as_str(), &api.name) {
            ("GET", Some(name)) => self
                .get(&api.group, &api.plural, &namespace, name)
                .map(|o| Reply::Object(StatusCode::OK, o))
                .ok_or_else(|| {
                    Failure::not_found(&format!("{}.{} \"{name}\"", api.plural, api.group))
                }),
            ("GET", None) if query.get("watch").map(String::as_str) == Some("true") => {
                Ok(Reply::Watch(self.watch(&api, query)))
            }
            ("GET", None) => self
                .list_page(&api, &info, query)
                .map(|list| Reply::Object(StatusCode::OK, list)),
            ("POST", None) => {
                let object = body.ok_or_else(|| Failure::bad_request("empty body".into()))?;
                self.create_object(&api.group, &api.plural, &namespace, object)
                    .map(|o| Reply::Object(StatusCode::CREATED, o))
            }
            ("PUT", Some(name)) => {
                let object = body.ok_or_else(|| Failure::bad_request("empty body".into()))?;
                if meta(&object, "name").is_some_and(|n| n != name) {
                    return Err(Failure::bad_request(
                        "the name of the object does not match the name on the URL".into(),
                    ));
                }
                self.update_object(&api.group, &api.plural, &namespace, name, object, on_status)
                    .map(|o| Reply::Object(StatusCode::OK, o))
            }
            ("PATCH", Some(name)) => {
                let patch = body.ok_or_else(|| Failure::bad_request("empty patch".into()))?;
                let mut object = self
                    .get(&api.group, &api.plural, &namespace, name)
                    .ok_or_else(|| {
                        Failure::not_found(&format!("{}.{} \"{name}\"", api.plural, api.group))
                    })?;
                let current_version = meta(&object, "resourceVersion").map(str::to_string);
                match content_type {
                    Some("application/json-patch+json") => {
                        apply_json_patch(&mut object, &patch).map_err(Failure::invalid)?;
                    }
                    Some("application/merge-patch+json") => json_patch::merge(&mut object, &patch),
                    other => {
                        return Err(Failure(
                            StatusCode::UNSUPPORTED_MEDIA_TYPE,
                            "UnsupportedMediaType",
                            format!("the fake API server does not support patch type {other:?}"),
                        ))
                    }
                }
                // A resourceVersion named by the patch is a precondition; otherwise the patch
                // applies to the version it was applied to.
                if meta(&object, "resourceVersion").is_none() {
                    object["metadata"]["resourceVersion"] = json!(current_version);
                }
                self.update_object(&api.group, &api.plural, &namespace, name, object, on_status)
                    .map(|o| Reply::Object(StatusCode::OK, o))
            }
            ("DELETE", Some(name)) => self
                .delete_object(&api.group, &api.plural, &namespace, name)
                .map(|o| Reply::Object(StatusCode::OK, o)),
            _ => Err(Failure(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                format!("{method} {path} is not supported"),
            )),
        }
    }

    /// The `scale` subresource: `GET` reads `spec.replicas` as a `Scale`; `PUT` (with an
    /// optional resourceVersion precondition) and `PATCH` (merge or JSON patch of the `Scale`)
    /// write it into the object's `spec.replicas` (a spec change: the generation moves).
    fn scale(
        &self,
        method: &Method,
        api: &ApiPath,
        query: &BTreeMap<String, String>,
        content_type: Option<&str>,
        body: Option<Value>,
    ) -> Result<Reply, Failure> {
        let _ = query;
        let namespace = api.namespace.clone().unwrap_or_default();
        let name = api
            .name
            .as_deref()
            .ok_or_else(|| Failure::not_found("a scale without a name"))?;
        let current = self
            .get(&api.group, &api.plural, &namespace, name)
            .ok_or_else(|| {
                Failure::not_found(&format!("{}.{} \"{name}\"", api.plural, api.group))
            })?;
        let wanted = match method.as_str() {
            "GET" => return Ok(Reply::Object(StatusCode::OK, scale_of(&current))),
            "PUT" => body.ok_or_else(|| Failure::bad_request("empty body".into()))?,
            "PATCH" => {
                let patch = body.ok_or_else(|| Failure::bad_request("empty patch".into()))?;
                let mut scale = scale_of(&current);
                match content_type {
                    Some("application/json-patch+json") => {
                        apply_json_patch(&mut scale, &patch).map_err(Failure::invalid)?
                    }
                    Some("application/merge-patch+json") => json_patch::merge(&mut scale, &patch),
                    other => {
                        return Err(Failure(
                            StatusCode::UNSUPPORTED_MEDIA_TYPE,
                            "UnsupportedMediaType",
                            format!("the fake API server does not support patch type {other:?}"),
                        ))
                    }
                }
                scale
            }
            _ => {
                return Err(Failure(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "MethodNotAllowed",
                    format!("{method} of a scale is not supported"),
                ))
            }
        };
        let replicas = wanted
            .pointer("/spec/replicas")
            .and_then(Value::as_i64)
            .filter(|r| *r >= 0)
            .ok_or_else(|| {
                Failure::invalid(
                    "spec.replicas: Invalid value: must be a non-negative integer".into(),
                )
            })?;
        let mut object = current.clone();
        object["spec"]["replicas"] = json!(replicas);
        match meta(&wanted, "resourceVersion") {
            Some(version) => object["metadata"]["resourceVersion"] = json!(version),
            None => {
                if let Some(map) = object["metadata"].as_object_mut() {
                    map.remove("resourceVersion");
                }
            }
        }
        let updated =
            self.update_object(&api.group, &api.plural, &namespace, name, object, false)?;
        Ok(Reply::Object(StatusCode::OK, scale_of(&updated)))
    }

    /// Play the Deployment controller and the kubelet for every Deployment: its status says the
    /// current spec was observed and every replica is updated — and available when `ready`
    /// says so (a Deployment whose pods never become ready keeps none available). Written
    /// through the status subresource, only when it changes; not recorded as requests.
    pub fn settle_deployments(&self, ready: impl Fn(&Value) -> bool) {
        let deployments: Vec<Value> = self
            .lock()
            .objects
            .iter()
            .filter(|((g, p, _, _), _)| g == "apps" && p == "deployments")
            .map(|(_, v)| v.clone())
            .collect();
        for deployment in deployments {
            let replicas = deployment
                .pointer("/spec/replicas")
                .and_then(Value::as_i64)
                .unwrap_or(1);
            let available = if ready(&deployment) { replicas } else { 0 };
            let mut object = deployment.clone();
            object["status"] = deployment_status(&deployment, replicas, replicas, available);
            if object == deployment {
                continue;
            }
            let namespace = meta(&deployment, "namespace")
                .unwrap_or_default()
                .to_string();
            let name = meta(&deployment, "name").unwrap_or_default().to_string();
            if let Some(map) = object["metadata"].as_object_mut() {
                map.remove("resourceVersion");
            }
            let _ = self.update_object("apps", "deployments", &namespace, &name, object, true);
        }
    }

    /// One page of a list: `limit` objects at most (all without it) after the `continue`
    /// token's object, those matching `labelSelector`. Later pages show objects as they are
    /// when asked (not at the first page's resourceVersion, which is what they report): a
    /// watch from that version then delivers any change twice at worst, which clients accept.
    fn list_page(
        &self,
        api: &ApiPath,
        info: &ResourceInfo,
        query: &BTreeMap<String, String>,
    ) -> Result<Value, Failure> {
        let selector = match query.get("labelSelector") {
            Some(text) => parse_label_selector(text).map_err(Failure::bad_request)?,
            None => Vec::new(),
        };
        let limit = query
            .get("limit")
            .and_then(|l| l.parse::<usize>().ok())
            .filter(|l| *l > 0);
        let after = match query.get("continue").filter(|t| !t.is_empty()) {
            Some(token) => Some(parse_continue_token(token).ok_or_else(|| {
                Failure::bad_request(format!("invalid continue token {token:?}"))
            })?),
            None => None,
        };
        let state = self.lock();
        let list_version = after
            .as_ref()
            .map(|(version, _, _)| version.clone())
            .unwrap_or_else(|| state.last_version.to_string());
        let mut items = Vec::new();
        let mut next = None;
        let matching = state.objects.iter().filter(|((g, p, ns, name), object)| {
            *g == api.group
                && *p == api.plural
                && api.namespace.as_ref().is_none_or(|want| want == ns)
                && after
                    .as_ref()
                    .is_none_or(|(_, after_ns, after_name)| (ns, name) > (after_ns, after_name))
                && (selector.is_empty() || selected(&selector, &labels_of(object)))
        });
        for ((_, _, ns, name), object) in matching {
            if limit.is_some_and(|limit| items.len() >= limit) {
                let _ = (ns, name);
                next = items.last().map(|last: &Value| {
                    continue_token(
                        &list_version,
                        meta(last, "namespace").unwrap_or_default(),
                        meta(last, "name").unwrap_or_default(),
                    )
                });
                break;
            }
            items.push(object.clone());
        }
        let mut metadata = json!({ "resourceVersion": list_version });
        if let Some(token) = next {
            metadata["continue"] = json!(token);
        }
        Ok(json!({
            "apiVersion": if api.group.is_empty() { info.version.clone() } else { format!("{}/{}", api.group, info.version) },
            "kind": format!("{}List", info.kind),
            "metadata": metadata,
            "items": items,
        }))
    }

    fn watch(&self, api: &ApiPath, query: &BTreeMap<String, String>) -> Response<ResponseBody> {
        let timeout = query
            .get("timeoutSeconds")
            .and_then(|s| s.parse().ok())
            .unwrap_or(290);
        let selector = match query.get("labelSelector") {
            Some(text) => match parse_label_selector(text) {
                Ok(selector) => selector,
                Err(problem) => {
                    let code = StatusCode::BAD_REQUEST;
                    return json_response(code, &status_body(code, "BadRequest", &problem));
                }
            },
            None => Vec::new(),
        };
        let matches = {
            let api = api.clone();
            move |event: &RecordedEvent| {
                event.group == api.group
                    && event.plural == api.plural
                    && api
                        .namespace
                        .as_ref()
                        .is_none_or(|ns| event.namespace.as_ref() == Some(ns))
                    && (selector.is_empty() || selected(&selector, &event.labels))
            }
        };
        let (backlog, live, after) = {
            let state = self.lock();
            let live = self.events.subscribe();
            match query
                .get("resourceVersion")
                .and_then(|v| v.parse::<u64>().ok())
                .filter(|v| *v > 0)
            {
                Some(after) if after < state.compacted => {
                    // Events after `after` were dropped: the client must list again.
                    let code = StatusCode::GONE;
                    let message = format!(
                        "too old resource version: {after} ({})",
                        state.compacted + 1
                    );
                    let line = format!(
                        "{}\n",
                        json!({"type": "ERROR", "object": status_body(code, "Expired", &message)})
                    );
                    return Response::new(ResponseBody::from(line));
                }
                Some(after) => (
                    state
                        .history
                        .iter()
                        .filter(|e| e.resource_version > after && matches(e))
                        .cloned()
                        .collect::<VecDeque<_>>(),
                    live,
                    state.last_version,
                ),
                None => (
                    // No resourceVersion: synthetic ADDED events for what exists now.
                    state
                        .objects
                        .iter()
                        .filter(|((g, p, ns, _), _)| {
                            *g == api.group
                                && *p == api.plural
                                && api.namespace.as_ref().is_none_or(|want| want == ns)
                        })
                        .map(|((g, p, ns, _), object)| {
                            Arc::new(RecordedEvent::new(WatchEvent {
                                resource_version: 0,
                                group: g.clone(),
                                plural: p.clone(),
                                namespace: Some(ns.clone()),
                                kind: "ADDED",
                                object: object.clone(),
                            }))
                        })
                        .filter(|e| matches(e))
                        .collect(),
                    live,
                    state.last_version,
                ),
            }
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
        let stream = futures::stream::unfold(
            (backlog, live, after, matches),
            move |(mut backlog, mut live, after, matches)| async move {
                loop {
                    if let Some(event) = backlog.pop_front() {
                        let line = event.line.clone();
                        return Some((Ok::<_, Infallible>(line), (backlog, live, after, matches)));
                    }
                    tokio::select! {
                        _ = tokio::time::sleep_until(deadline) => return None,
                        received = live.recv() => match received {
                            Ok(event) if event.resource_version > after && matches(&event) => backlog.push_back(event),
                            Ok(_) => {}
                            // The client resumes from its last resourceVersion.
                            Err(broadcast::error::RecvError::Lagged(_)) => return None,
                            Err(broadcast::error::RecvError::Closed) => return None,
                        },
                    }
                }
            },
        );
        Response::new(ResponseBody::from_stream(stream))
    }
}

enum Reply {
    Object(StatusCode, Value),
    Watch(Response<ResponseBody>),
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
    use kube::core::{ApiResource, GroupVersionKind};

    fn resource() -> ApiResource {
        ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("networking.istio.io", "v1", "VirtualService"),
            "virtualservices",
        )
    }

    fn vs() -> Value {
        json!({
            "apiVersion": "networking.istio.io/v1",
            "kind": "VirtualService",
            "metadata": {"name": "app", "namespace": "shop"},
            "spec": {"hosts": ["app"], "http": [{"name": "primary", "route": [{"destination": {"host": "app"}, "weight": 100}]}]},
            "status": {"note": "from the user"}
        })
    }

    fn api(server: &FakeApiServer) -> Api<DynamicObject> {
        Api::namespaced_with(server.client("test"), "shop", &resource())
    }

    fn error_code(result: kube::Result<DynamicObject>) -> u16 {
        match result {
            Err(kube::Error::Api(status)) => status.code,
            other => panic!("expected an API error, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn stale_resource_version_conflicts_and_generation_follows_spec() {
        let server = FakeApiServer::new();
        let created = server.create("networking.istio.io", "virtualservices", vs());
        assert_eq!(created["metadata"]["generation"], 1);
        assert!(
            created.get("status").is_none(),
            "status is ignored on create"
        );
        let api = api(&server);
        let mut object = api.get("app").await.unwrap();
        object.data["spec"]["hosts"] = json!(["app", "app.example.com"]);
        let replaced = api
            .replace("app", &PostParams::default(), &object)
            .await
            .unwrap();
        assert_eq!(replaced.metadata.generation, Some(2));
        // The same (now stale) version again → 409.
        assert_eq!(
            error_code(api.replace("app", &PostParams::default(), &object).await),
            409
        );
        // Metadata-only change: generation stays.
        let mut fresh = api.get("app").await.unwrap();
        fresh.metadata.labels = Some([("a".to_string(), "b".to_string())].into());
        let relabelled = api
            .replace("app", &PostParams::default(), &fresh)
            .await
            .unwrap();
        assert_eq!(relabelled.metadata.generation, Some(2));
        // Custom resources need a resourceVersion on PUT.
        fresh.metadata.resource_version = None;
        assert_eq!(
            error_code(api.replace("app", &PostParams::default(), &fresh).await),
            422
        );
    }

    #[tokio::test]
    async fn json_patch_test_failure_is_422_and_merge_patch_precondition_is_409() {
        let server = FakeApiServer::new();
        server.create("networking.istio.io", "virtualservices", vs());
        let api = api(&server);
        let patch = |ops: Value| Patch::Json::<()>(serde_json::from_value(ops).unwrap());
        let stale = patch(json!([
            {"op": "test", "path": "/spec/http/0/route/0/weight", "value": 90},
            {"op": "replace", "path": "/spec/http/0/route/0/weight", "value": 80}
        ]));
        assert_eq!(
            error_code(api.patch("app", &PatchParams::default(), &stale).await),
            422
        );
        let missing_is_null = patch(json!([
            {"op": "test", "path": "/metadata/finalizers", "value": null},
            {"op": "add", "path": "/metadata/finalizers", "value": ["x"]}
        ]));
        let patched = api
            .patch("app", &PatchParams::default(), &missing_is_null)
            .await
            .unwrap();
        assert_eq!(patched.metadata.finalizers, Some(vec!["x".to_string()]));
        let merge =
            Patch::Merge(json!({"metadata": {"resourceVersion": "1"}, "spec": {"hosts": ["b"]}}));
        assert_eq!(
            error_code(api.patch("app", &PatchParams::default(), &merge).await),
            409
        );
        let merge = Patch::Merge(json!({"spec": {"gateways": ["g"]}}));
        let merged = api
            .patch("app", &PatchParams::default(), &merge)
            .await
            .unwrap();
        assert_eq!(merged.data["spec"]["gateways"], json!(["g"]));
        assert_eq!(
            merged.data["spec"]["hosts"],
            json!(["app"]),
            "merge keeps other fields"
        );
        let apply = Patch::Apply(json!({}));
        assert_eq!(
            error_code(api.patch("app", &PatchParams::apply("x"), &apply).await),
            415
        );
    }

    #[tokio::test]
    async fn status_subresource_separates_spec_and_status() {
        let server = FakeApiServer::new();
        server.create("networking.istio.io", "virtualservices", vs());
        let api = api(&server);
        let mut object = api.get("app").await.unwrap();
        object.data["status"] = json!({"phase": "x"});
        object.data["spec"]["hosts"] = json!(["ignored"]);
        let after = api
            .replace_status("app", &PostParams::default(), &object)
            .await
            .unwrap();
        assert_eq!(after.data["status"], json!({"phase": "x"}));
        assert_eq!(after.data["spec"]["hosts"], json!(["app"]));
        assert_eq!(after.metadata.generation, Some(1));
        let mut object = api.get("app").await.unwrap();
        object.data["status"] = json!({"phase": "ignored"});
        let after = api
            .replace("app", &PostParams::default(), &object)
            .await
            .unwrap();
        assert_eq!(after.data["status"], json!({"phase": "x"}));
    }

    #[tokio::test]
    async fn delete_waits_for_finalizers_and_watch_replays_from_a_version() {
        let server = FakeApiServer::new();
        let mut object = vs();
        object["metadata"]["finalizers"] = json!(["fledge.dev/traffic"]);
        let created = server.create("networking.istio.io", "virtualservices", object);
        let since: u64 = created["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        let api = api(&server);
        api.delete("app", &Default::default()).await.unwrap();
        let deleting = server
            .get("networking.istio.io", "virtualservices", "shop", "app")
            .unwrap();
        assert!(deleting["metadata"]["deletionTimestamp"].is_string());
        let remove = Patch::Json::<()>(
            serde_json::from_value(json!([
                {"op": "remove", "path": "/metadata/finalizers/0"}
            ]))
            .unwrap(),
        );
        api.patch("app", &PatchParams::default(), &remove)
            .await
            .unwrap();
        assert!(server
            .get("networking.istio.io", "virtualservices", "shop", "app")
            .is_none());

        let params = kube::api::WatchParams::default().timeout(1);
        let stream = api.watch(&params, &since.to_string()).await.unwrap();
        let events: Vec<String> = stream
            .map(|e| {
                match e.unwrap() {
                    kube::api::WatchEvent::Added(_) => "ADDED",
                    kube::api::WatchEvent::Modified(_) => "MODIFIED",
                    kube::api::WatchEvent::Deleted(_) => "DELETED",
                    _ => "OTHER",
                }
                .to_string()
            })
            .collect()
            .await;
        assert_eq!(events, ["MODIFIED", "DELETED"]);
    }

    #[tokio::test]
    async fn requests_are_recorded_exactly() {
        let server = FakeApiServer::new();
        server.create("networking.istio.io", "virtualservices", vs());
        let api = api(&server);
        api.get("app").await.unwrap();
        let _ = api.get("missing").await;
        let lines: Vec<(String, u16)> = server
            .requests()
            .iter()
            .map(|r| (r.line(), r.status))
            .collect();
        assert_eq!(
            lines,
            [
                (
                    "GET /apis/networking.istio.io/v1/namespaces/shop/virtualservices/app"
                        .to_string(),
                    200
                ),
                (
                    "GET /apis/networking.istio.io/v1/namespaces/shop/virtualservices/missing"
                        .to_string(),
                    404
                ),
            ]
        );
        assert_eq!(
            server.requests()[0].target(),
            Some((
                "networking.istio.io".to_string(),
                "virtualservices".to_string(),
                true
            ))
        );
    }

    fn deployment(name: &str) -> Value {
        json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name, "namespace": "shop"},
            "spec": {
                "selector": {"matchLabels": {"app": "app"}},
                "template": {"metadata": {"labels": {"app": "app"}},
                             "spec": {"containers": [{"name": "app", "image": "app:v1"}]}}
            }
        })
    }

    #[tokio::test]
    async fn deployments_default_replicas_validate_selectors_and_scale_through_the_subresource() {
        use k8s_openapi::api::apps::v1::Deployment;
        let server = FakeApiServer::new();
        let created = server.create("apps", "deployments", deployment("app"));
        assert_eq!(created["spec"]["replicas"], 1, "defaulted");
        let api: Api<Deployment> = Api::namespaced(server.client("test"), "shop");
        // A selector that does not select the template's labels is refused.
        let mut bad: Deployment = serde_json::from_value(deployment("bad")).unwrap();
        bad.spec.as_mut().unwrap().selector.match_labels =
            Some([("app".to_string(), "other".to_string())].into());
        let refused = api.create(&PostParams::default(), &bad).await;
        assert!(matches!(refused, Err(kube::Error::Api(s)) if s.code == 422));
        // The selector cannot change.
        let mut changed = api.get("app").await.unwrap();
        let spec = changed.spec.as_mut().unwrap();
        spec.selector.match_labels =
            Some([("app".into(), "app".into()), ("x".into(), "y".into())].into());
        spec.template
            .metadata
            .as_mut()
            .unwrap()
            .labels
            .as_mut()
            .unwrap()
            .insert("x".into(), "y".into());
        let refused = api.replace("app", &PostParams::default(), &changed).await;
        match refused {
            Err(kube::Error::Api(status)) => {
                assert_eq!(status.code, 422);
                assert!(
                    status.message.contains("field is immutable"),
                    "{}",
                    status.message
                );
            }
            other => panic!("{other:?}"),
        }
        // Scale: read, merge-patch, and a PUT with a stale resourceVersion.
        let scale = api.get_scale("app").await.unwrap();
        assert_eq!(scale.spec.as_ref().unwrap().replicas, Some(1));
        assert_eq!(
            scale.status.as_ref().unwrap().selector.as_deref(),
            Some("app=app")
        );
        let patched = api
            .patch_scale(
                "app",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"replicas": 0}})),
            )
            .await
            .unwrap();
        assert_eq!(patched.spec.unwrap().replicas, Some(0));
        let stored = server.get("apps", "deployments", "shop", "app").unwrap();
        assert_eq!(stored["spec"]["replicas"], 0);
        assert_eq!(
            stored["metadata"]["generation"], 2,
            "scaling changes the spec"
        );
        let mut stale = scale.clone();
        stale.spec.as_mut().unwrap().replicas = Some(3);
        let refused = api
            .replace_scale("app", &PostParams::default(), &stale)
            .await;
        assert!(matches!(refused, Err(kube::Error::Api(s)) if s.code == 409));
        assert!(api.get_scale("missing").await.is_err());
        // The status: only the "Deployment controller" (here settle_deployments) writes it.
        server.edit("apps", "deployments", "shop", "app", |d| {
            d["spec"]["replicas"] = json!(2)
        });
        server.settle_deployments(|_| true);
        let settled = api.get("app").await.unwrap();
        let status = settled.status.unwrap();
        assert_eq!(status.observed_generation, Some(3));
        assert_eq!(
            (
                status.replicas,
                status.updated_replicas,
                status.available_replicas
            ),
            (Some(2), Some(2), Some(2))
        );
        let available = status
            .conditions
            .unwrap()
            .into_iter()
            .find(|c| c.type_ == "Available")
            .unwrap();
        assert_eq!(available.status, "True");
        server.edit("apps", "deployments", "shop", "app", |d| {
            d["spec"]["template"]["spec"]["containers"][0]["image"] = json!("app:v2")
        });
        server.settle_deployments(|_| false);
        let status = api.get("app").await.unwrap().status.unwrap();
        assert_eq!(
            (status.observed_generation, status.available_replicas),
            (Some(4), Some(0))
        );
    }

    #[tokio::test]
    async fn owner_references_are_kept_and_removing_the_owner_collects_its_dependents() {
        let server = FakeApiServer::new();
        let owner = server.create("networking.istio.io", "virtualservices", vs());
        let owner_ref = json!([{"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "name": "app", "uid": owner["metadata"]["uid"], "controller": true}]);
        let mut dependent = deployment("app-primary");
        dependent["metadata"]["ownerReferences"] = owner_ref.clone();
        let created = server.create("apps", "deployments", dependent);
        assert_eq!(created["metadata"]["ownerReferences"], owner_ref);
        let mut hpa = json!({"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": "app-primary", "namespace": "shop", "ownerReferences": owner_ref},
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "app-primary"}, "maxReplicas": 3}});
        hpa = server.try_create(hpa).unwrap();
        assert_eq!(hpa["metadata"]["generation"], 1);
        server.create("apps", "deployments", deployment("unrelated"));
        server.delete("networking.istio.io", "virtualservices", "shop", "app");
        assert!(server
            .get("apps", "deployments", "shop", "app-primary")
            .is_none());
        assert!(server
            .get(
                "autoscaling",
                "horizontalpodautoscalers",
                "shop",
                "app-primary"
            )
            .is_none());
        assert!(server
            .get("apps", "deployments", "shop", "unrelated")
            .is_some());
    }

    fn named_vs(name: &str, labels: Value) -> Value {
        let mut object = vs();
        object["metadata"]["name"] = json!(name);
        object["metadata"]["labels"] = labels;
        object
    }

    #[tokio::test]
    async fn lists_come_in_pages_and_filter_by_label() {
        let server = FakeApiServer::new();
        for i in 0..7 {
            let shard = if i % 2 == 0 { "a" } else { "b" };
            server.create(
                "networking.istio.io",
                "virtualservices",
                named_vs(&format!("vs-{i}"), json!({"shard": shard, "tier": "web"})),
            );
        }
        let api = api(&server);
        let mut names = Vec::new();
        let mut params = kube::api::ListParams::default().limit(3);
        let mut pages = 0;
        let mut versions = std::collections::BTreeSet::new();
        loop {
            let page = api.list(&params).await.unwrap();
            pages += 1;
            versions.insert(page.metadata.resource_version.clone());
            names.extend(page.items.iter().map(|o| o.metadata.name.clone().unwrap()));
            match page.metadata.continue_ {
                Some(token) if !token.is_empty() => params = params.continue_token(&token),
                _ => break,
            }
        }
        assert_eq!(pages, 3);
        assert_eq!(
            versions.len(),
            1,
            "every page reports the first page's version"
        );
        assert_eq!(names, (0..7).map(|i| format!("vs-{i}")).collect::<Vec<_>>());

        let select = |selector: &str| {
            let api = api.clone();
            let params = kube::api::ListParams::default().labels(selector);
            async move {
                api.list(&params)
                    .await
                    .unwrap()
                    .items
                    .iter()
                    .map(|o| o.metadata.name.clone().unwrap())
                    .collect::<Vec<_>>()
            }
        };
        assert_eq!(select("shard=a").await, ["vs-0", "vs-2", "vs-4", "vs-6"]);
        assert_eq!(select("shard!=a,tier").await, ["vs-1", "vs-3", "vs-5"]);
        assert_eq!(select("shard in (b),tier notin (db)").await.len(), 3);
        assert!(select("!tier").await.is_empty());
        assert!(select("shard=c").await.is_empty());
    }

    #[tokio::test]
    async fn watches_filter_by_label_and_too_old_versions_expire() {
        let server = FakeApiServer::new().with_history_limit(2);
        let first = server.create(
            "networking.istio.io",
            "virtualservices",
            named_vs("a", json!({"shard": "a"})),
        );
        let since: u64 = first["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        server.create(
            "networking.istio.io",
            "virtualservices",
            named_vs("b", json!({"shard": "b"})),
        );
        server.create(
            "networking.istio.io",
            "virtualservices",
            named_vs("c", json!({"shard": "a"})),
        );
        let api = api(&server);
        // The history holds the last two events (b, c): a watch from `a` still sees both.
        let params = kube::api::WatchParams::default()
            .timeout(1)
            .labels("shard=a");
        let names: Vec<String> = api
            .watch(&params, &since.to_string())
            .await
            .unwrap()
            .map(|e| match e.unwrap() {
                kube::api::WatchEvent::Added(o) => o.metadata.name.unwrap(),
                other => panic!("unexpected {other:?}"),
            })
            .collect()
            .await;
        assert_eq!(names, ["c"]);
        // One more event drops `b`: from `a` on, an event is missing — 410 Expired, as the
        // real watch cache says.
        server.create(
            "networking.istio.io",
            "virtualservices",
            named_vs("d", json!({"shard": "b"})),
        );
        let events: Vec<_> = api
            .watch(
                &kube::api::WatchParams::default().timeout(1),
                &since.to_string(),
            )
            .await
            .unwrap()
            .collect()
            .await;
        match events.as_slice() {
            [Ok(kube::api::WatchEvent::Error(status))] => {
                assert_eq!(status.code, 410);
                assert_eq!(status.reason, "Expired");
            }
            other => panic!("expected one 410 error event, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_bounded_request_log_still_tallies_every_request() {
        let server = FakeApiServer::new().with_request_log_limit(1);
        server.create("networking.istio.io", "virtualservices", vs());
        let api = api(&server);
        api.get("app").await.unwrap();
        api.get("app").await.unwrap();
        api.list(&Default::default()).await.unwrap();
        assert_eq!(server.requests().len(), 1);
        let tallies = server.request_tallies();
        assert_eq!(tallies.get("GET virtualservices one"), Some(&2));
        assert_eq!(tallies.get("GET virtualservices list"), Some(&1));
    }

    #[test]
    fn query_strings_are_percent_decoded() {
        let query = parse_query(Some("labelSelector=shard%20in%20%28a%2Cb%29&x=a+b&bad=%zz"));
        assert_eq!(query["labelSelector"], "shard in (a,b)");
        assert_eq!(query["x"], "a b");
        assert_eq!(query["bad"], "%zz");
    }
}
