//! The CLI in Kubernetes mode (`--kubernetes`): status from `Canary` objects' `.status`, and
//! commands as the annotations `fledge controller` acts on (`fledge.dev/promote`, ...; see
//! [`crate::k8s::crd::COMMAND_ANNOTATIONS`]), with the same JSON shapes and exit codes as
//! against `fledge run`.

use super::{ClientError, Verb};
use crate::k8s::crd::{CanaryResource, COMMAND_ANNOTATIONS};
use fledge_core::rollout::{Command, Phase};
use kube::api::{Api, Patch, PatchParams};
use serde_json::{json, Value};

/// Canaries of one namespace of a Kubernetes cluster.
pub struct KubeTarget {
    api: Api<CanaryResource>,
    namespace: String,
}

fn unreachable(reason: impl std::fmt::Display) -> ClientError {
    ClientError::KubernetesUnreachable(reason.to_string())
}

fn from_kube(error: kube::Error, name: &str, namespace: &str) -> ClientError {
    match error {
        kube::Error::Api(status) if status.code == 404 => ClientError::Refused {
            status: 404,
            message: format!("no canary named {name:?} in namespace {namespace:?}"),
        },
        kube::Error::Api(status) => ClientError::Refused {
            status: status.code,
            message: format!("the Kubernetes API refused: {}", status.message),
        },
        other => unreachable(other),
    }
}

/// The API's view of one canary (`GET /api/v1/canaries/{name}` shape) from a Canary object.
pub fn view_of(canary: &CanaryResource) -> Value {
    let status = canary
        .status
        .as_ref()
        .map(|s| s.rollout.clone())
        .unwrap_or_default();
    let mut view = serde_json::to_value(&status).unwrap_or_else(|_| json!({}));
    if let Some(map) = view.as_object_mut() {
        map.insert(
            "name".into(),
            json!(canary.metadata.name.clone().unwrap_or_default()),
        );
        map.insert(
            "namespace".into(),
            json!(canary.metadata.namespace.clone().unwrap_or_default()),
        );
        map.insert("service".into(), json!(canary.spec.service));
        map.insert("steps".into(), json!(canary.spec.analysis.plan().len()));
        map.insert(
            "threshold".into(),
            json!(canary.spec.analysis.rollback_threshold()),
        );
        // Why the controller cannot go on (invalid spec, router, metrics source, route taken
        // by another Canary), as `fledge run` reports a router problem.
        let blocked = canary
            .status
            .as_ref()
            .and_then(|s| s.condition(crate::k8s::crd::condition::READY))
            .filter(|ready| ready.status == "False")
            .map(|ready| format!("{}: {}", ready.reason, ready.message));
        map.insert("routerError".into(), json!(blocked));
        if let Some(workload) = canary.status.as_ref().and_then(|s| s.workload.as_ref()) {
            // With a workload, the weight shown is the one routed (its lifecycle's).
            if let Some(weight) = workload.canary_weight {
                map.insert("canaryWeight".into(), json!(weight));
            }
            map.insert(
                "workload".into(),
                serde_json::to_value(workload).unwrap_or_default(),
            );
        }
    }
    view
}

fn annotation_for(verb: Verb) -> (&'static str, Command) {
    let command = match verb {
        Verb::Promote { full: false } => Command::Promote,
        Verb::Promote { full: true } => Command::PromoteFull,
        Verb::Abort => Command::Abort,
        Verb::Pause => Command::Pause,
        Verb::Resume => Command::Resume,
        Verb::Retry => Command::Retry,
    };
    let key = COMMAND_ANNOTATIONS
        .iter()
        .find(|(_, c)| *c == command)
        .map(|(key, _)| *key)
        .unwrap_or("fledge.dev/promote");
    (key, command)
}

impl KubeTarget {
    /// From the local kubeconfig (or the in-cluster config), in `namespace` or the context's.
    pub async fn connect(namespace: Option<&str>) -> Result<Self, ClientError> {
        let client = kube::Client::try_default()
            .await
            .map_err(|e| unreachable(format!("no usable Kubernetes configuration: {e}")))?;
        Ok(Self::with_client(client, namespace))
    }

    pub fn with_client(client: kube::Client, namespace: Option<&str>) -> Self {
        let namespace = namespace
            .map(str::to_string)
            .unwrap_or_else(|| client.default_namespace().to_string());
        KubeTarget {
            api: Api::namespaced(client, &namespace),
            namespace,
        }
    }

    pub fn describe(&self) -> String {
        format!("Kubernetes namespace {}", self.namespace)
    }

    pub async fn status(&self, name: Option<&str>) -> Result<Value, ClientError> {
        match name {
            Some(name) => {
                let canary = self
                    .api
                    .get(name)
                    .await
                    .map_err(|e| from_kube(e, name, &self.namespace))?;
                Ok(view_of(&canary))
            }
            None => {
                let list = self
                    .api
                    .list(&Default::default())
                    .await
                    .map_err(|e| from_kube(e, "", &self.namespace))?;
                Ok(Value::Array(list.items.iter().map(view_of).collect()))
            }
        }
    }

    /// Set the command's annotation to a new value; `fledge controller` acts on it once.
    pub async fn send(&self, name: &str, verb: Verb) -> Result<Value, ClientError> {
        let canary = self
            .api
            .get(name)
            .await
            .map_err(|e| from_kube(e, name, &self.namespace))?;
        let phase = canary
            .status
            .as_ref()
            .map(|s| s.rollout.phase)
            .unwrap_or_default();
        let (key, command) = annotation_for(verb);
        match command {
            Command::Retry if phase != Phase::RolledBack => {
                return Err(ClientError::Refused {
                    status: 409,
                    message: format!(
                    "canary {name:?} is not rolled back; only a rolled-back rollout can be retried"
                ),
                })
            }
            Command::Retry => {}
            _ if phase.is_terminal() => {
                return Err(ClientError::Refused {
                    status: 409,
                    message: format!(
                        "canary {name:?} has already finished (Promoted or RolledBack)"
                    ),
                })
            }
            _ => {}
        }
        let stamp = chrono::Utc::now()
            .timestamp_nanos_opt()
            .unwrap_or_default()
            .to_string();
        let patch = json!({"metadata": {"annotations": {key: stamp}}});
        self.api
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|e| from_kube(e, name, &self.namespace))?;
        Ok(json!({
            "accepted": true,
            "canary": name,
            "namespace": self.namespace,
            "command": command,
            "annotation": key,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::render::{render_canary, CanaryDoc, Style};
    use fledge_testkit::fake_api::FakeApiServer;

    fn canary_object(name: &str) -> Value {
        json!({
            "apiVersion": "fledge.dev/v1alpha1",
            "kind": "Canary",
            "metadata": {"name": name, "namespace": "shop"},
            "spec": {
                "service": "app",
                "stable": {"subset": "stable"},
                "canary": {"subset": "canary"},
                "metricsSource": {"envoyAdmin": {"urls": ["http://127.0.0.1:15000"]}},
                "router": {"istio": {"virtualService": "app", "route": "primary"}},
                "analysis": {"interval": "30s", "threshold": 2, "stepWeights": [20, 50]}
            }
        })
    }

    #[test]
    fn a_canary_that_is_not_ready_shows_why_it_is_blocked() {
        let mut object = canary_object("app-b");
        object["status"] = json!({
            "phase": "Initializing",
            "conditions": [{
                "type": "Ready", "status": "False", "reason": "RouteConflict",
                "message": "VirtualService app route \"primary\" is steered by Canary shop/app",
                "lastTransitionTime": "2026-11-29T10:00:00Z"
            }]
        });
        let canary: CanaryResource = serde_json::from_value(object).unwrap();
        let view = view_of(&canary);
        assert_eq!(
            view["routerError"],
            "RouteConflict: VirtualService app route \"primary\" is steered by Canary shop/app"
        );
        let doc: CanaryDoc = serde_json::from_value(view).unwrap();
        let text = render_canary(&doc, Style::PLAIN);
        assert!(text.contains("blocked   ✘ RouteConflict"), "{text}");

        let ready: CanaryResource = serde_json::from_value(canary_object("app")).unwrap();
        assert!(view_of(&ready)["routerError"].is_null());
    }

    async fn set_status(server: &FakeApiServer, name: &str, status: Value) {
        let api: Api<CanaryResource> = Api::namespaced(server.client("test"), "shop");
        api.patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(&json!({ "status": status })),
        )
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn status_and_commands_through_the_kubernetes_api() {
        let server = FakeApiServer::new();
        server.create("fledge.dev", "canaries", canary_object("app"));
        server.create("fledge.dev", "canaries", canary_object("done"));
        set_status(
            &server,
            "app",
            json!({"phase": "Progressing", "canaryWeight": 20, "step": 0, "failedChecks": 1, "stepPassedChecks": 0,
                   "message": "advance canary weight to 20% (step 1/2)", "history": []}),
        )
        .await;
        set_status(
            &server,
            "done",
            json!({"phase": "Promoted", "canaryWeight": 100, "step": 2, "stepPassedChecks": 0, "failedChecks": 0,
                   "message": "promotion completed", "history": []}),
        )
        .await;
        let target = KubeTarget::with_client(server.client("fledge-cli"), Some("shop"));

        let list = target.status(None).await.unwrap();
        assert_eq!(list.as_array().unwrap().len(), 2);
        let one = target.status(Some("app")).await.unwrap();
        let doc: CanaryDoc = serde_json::from_value(one).unwrap();
        let text = render_canary(&doc, Style::PLAIN);
        assert!(
            text.contains("  weight    [██░░░░░░░░]  20%   step 1/2   failed checks 1/2\n"),
            "{text}"
        );

        let answer = target
            .send("app", Verb::Promote { full: true })
            .await
            .unwrap();
        assert_eq!(answer["annotation"], "fledge.dev/promote-full");
        let stored = server.get("fledge.dev", "canaries", "shop", "app").unwrap();
        assert!(stored["metadata"]["annotations"]["fledge.dev/promote-full"].is_string());

        let refused = target.send("done", Verb::Abort).await.unwrap_err();
        assert_eq!(refused.exit_code(), crate::cli::EXIT_REFUSED);
        assert!(refused.to_string().contains("already finished"));
        let missing = target.status(Some("nosuch")).await.unwrap_err();
        assert_eq!(missing.exit_code(), crate::cli::EXIT_REFUSED);
        assert!(missing
            .to_string()
            .contains("no canary named \"nosuch\" in namespace \"shop\""));
    }

    #[test]
    fn every_verb_has_the_controllers_annotation() {
        for verb in [
            Verb::Promote { full: false },
            Verb::Promote { full: true },
            Verb::Abort,
            Verb::Pause,
            Verb::Resume,
            Verb::Retry,
        ] {
            let (key, command) = annotation_for(verb);
            assert!(COMMAND_ANNOTATIONS.contains(&(key, command)), "{verb:?}");
        }
    }
}
