//! Workloads in Kubernetes mode (`spec.targetRef`): reading what the pure lifecycle
//! (`fledge_core::workload`) needs, performing what it decides, and watching the objects that
//! should wake a Canary.
//!
//! Objects are read as untyped JSON (`DynamicObject`) so the pod template is hashed exactly as
//! the API server stores it. Every write is idempotent and names its precondition: a copy into
//! the primary tests the primary's uid, a scale goes through the `scale` subresource, a
//! create that finds the object already there is not an error (the next pass checks whose it
//! is).

use super::crd::CanaryResource;
use super::{api_status_code, Error, Result};
use crate::router::Weights;
use fledge_core::workload::{self, Action as WorkloadAction, Facts, Owner};
use futures::{Stream, StreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::core::ApiResource;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, ResourceExt};
use serde_json::{json, Value};

/// Field manager of every workload write.
const FIELD_MANAGER: &str = "fledge";

fn deployments_resource() -> ApiResource {
    ApiResource::erase::<Deployment>(&())
}

fn autoscalers_resource() -> ApiResource {
    ApiResource::erase::<HorizontalPodAutoscaler>(&())
}

fn destination_rules_resource() -> ApiResource {
    crate::router::istio::destination_rule_resource()
}

/// The Kubernetes API of one Canary's workload objects.
pub struct WorkloadApi {
    namespace: String,
    deployments: Api<DynamicObject>,
    scales: Api<Deployment>,
    autoscalers: Api<DynamicObject>,
    destination_rules: Api<DynamicObject>,
}

fn api_error(what: &str, error: kube::Error) -> Error {
    Error::Workload(format!("{what}: {error}"))
}

impl WorkloadApi {
    pub fn new(client: &Client, namespace: &str) -> Self {
        WorkloadApi {
            namespace: namespace.to_string(),
            deployments: Api::namespaced_with(client.clone(), namespace, &deployments_resource()),
            scales: Api::namespaced(client.clone(), namespace),
            autoscalers: Api::namespaced_with(client.clone(), namespace, &autoscalers_resource()),
            destination_rules: Api::namespaced_with(
                client.clone(),
                namespace,
                &destination_rules_resource(),
            ),
        }
    }

    async fn get(&self, api: &Api<DynamicObject>, kind: &str, name: &str) -> Result<Option<Value>> {
        match api.get_opt(name).await {
            Ok(object) => Ok(object.map(|o| serde_json::to_value(o).unwrap_or(Value::Null))),
            Err(e) => Err(api_error(
                &format!("reading {kind} {}/{name}", self.namespace),
                e,
            )),
        }
    }

    /// Everything the lifecycle looks at for `canary`. `routed` is the canary weight the route
    /// was last confirmed at, if known.
    pub async fn facts(&self, canary: &CanaryResource, routed: Option<u8>) -> Result<Facts> {
        let spec = &canary.spec.canary;
        let mut facts = Facts {
            owner: owner_of(canary),
            routed,
            ..Facts::default()
        };
        let Some(target) = &spec.target_ref else {
            return Ok(facts);
        };
        facts.target = self
            .get(&self.deployments, "Deployment", &target.name)
            .await?;
        facts.primary = self
            .get(&self.deployments, "Deployment", &target.primary_name())
            .await?;
        if let Some(hpa) = &spec.autoscaler_ref {
            facts.autoscaler = self
                .get(&self.autoscalers, "HorizontalPodAutoscaler", &hpa.name)
                .await?;
            facts.primary_autoscaler = self
                .get(
                    &self.autoscalers,
                    "HorizontalPodAutoscaler",
                    &hpa.primary_name(),
                )
                .await?;
        } else if let Some(name) = canary
            .status
            .as_ref()
            .and_then(|s| s.workload.as_ref())
            .and_then(|w| w.primary_autoscaler.clone())
        {
            facts.primary_autoscaler = self
                .get(&self.autoscalers, "HorizontalPodAutoscaler", &name)
                .await?;
        }
        facts.subsets = self.subsets(spec).await?;
        Ok(facts)
    }

    /// The stable and canary subsets' pod labels: from the DestinationRule named in the spec,
    /// else from the one DestinationRule of the namespace defining both subsets (none or
    /// several: not checked here; the router checks the subsets exist).
    async fn subsets(
        &self,
        spec: &fledge_core::spec::CanarySpec,
    ) -> Result<Option<(Value, Value)>> {
        let Some(istio) = &spec.router.istio else {
            return Ok(None);
        };
        let (stable, canary) = (&spec.stable.subset, &spec.canary.subset);
        let rules: Vec<Value> = match &istio.destination_rule {
            Some(name) => self
                .get(&self.destination_rules, "DestinationRule", name)
                .await?
                .into_iter()
                .collect(),
            None => self
                .destination_rules
                .list(&ListParams::default())
                .await
                .map_err(|e| {
                    api_error(
                        &format!("listing DestinationRules in {}", self.namespace),
                        e,
                    )
                })?
                .items
                .into_iter()
                .filter_map(|r| serde_json::to_value(r).ok())
                .collect(),
        };
        let labels_of = |rule: &Value, subset: &str| {
            rule.pointer("/spec/subsets")
                .and_then(Value::as_array)?
                .iter()
                .find(|s| s["name"] == subset)
                .map(|s| s.get("labels").cloned().unwrap_or_else(|| json!({})))
        };
        let found: Vec<(Value, Value)> = rules
            .iter()
            .filter_map(|rule| Some((labels_of(rule, stable)?, labels_of(rule, canary)?)))
            .collect();
        Ok(match found.len() {
            1 => found.into_iter().next(),
            _ => None,
        })
    }

    /// Perform the lifecycle's object actions (events and hooks are the reconciler's).
    pub async fn perform(&self, actions: &[WorkloadAction], facts: &Facts) -> Result<()> {
        for action in actions {
            self.perform_one(action, facts).await?;
        }
        Ok(())
    }

    async fn perform_one(&self, action: &WorkloadAction, facts: &Facts) -> Result<()> {
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.to_string()),
            ..PatchParams::default()
        };
        let post = PostParams {
            field_manager: Some(FIELD_MANAGER.to_string()),
            ..PostParams::default()
        };
        match action {
            WorkloadAction::CreatePrimary(object) => {
                self.create(&self.deployments, "Deployment", object, &post)
                    .await
            }
            WorkloadAction::UpdatePrimary(spec) => {
                let primary = facts.primary.as_ref().ok_or_else(|| {
                    Error::Workload(
                        "the primary to update is gone; the next pass re-creates it".into(),
                    )
                })?;
                let name = primary
                    .pointer("/metadata/name")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                let mut ops = vec![
                    json!({"op": "test", "path": "/metadata/uid", "value": primary["metadata"]["uid"]}),
                ];
                ops.extend(spec_ops(spec));
                self.json_patch(&self.deployments, "Deployment", name, ops, &params)
                    .await
            }
            WorkloadAction::ScaleTarget(replicas) => {
                let name = facts
                    .target
                    .as_ref()
                    .and_then(|t| t.pointer("/metadata/name"))
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                let scale = Patch::Merge(json!({"spec": {"replicas": replicas}}));
                self.scales
                    .patch_scale(name, &params, &scale)
                    .await
                    .map(|_| ())
                    .map_err(|e| {
                        api_error(
                            &format!("scaling Deployment {}/{name} to {replicas}", self.namespace),
                            e,
                        )
                    })
            }
            WorkloadAction::ApplyPrimaryAutoscaler(object) => {
                let name = object
                    .pointer("/metadata/name")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                if facts.primary_autoscaler.is_some() {
                    let ops = vec![json!({"op": "add", "path": "/spec", "value": object["spec"]})];
                    self.json_patch(
                        &self.autoscalers,
                        "HorizontalPodAutoscaler",
                        name,
                        ops,
                        &params,
                    )
                    .await
                } else {
                    self.create(&self.autoscalers, "HorizontalPodAutoscaler", object, &post)
                        .await
                }
            }
            WorkloadAction::DeletePrimaryAutoscaler(name) => {
                match self
                    .autoscalers
                    .delete(name, &DeleteParams::default())
                    .await
                {
                    Ok(_) => Ok(()),
                    Err(e) if api_status_code(&e) == Some(404) => Ok(()),
                    Err(e) => Err(api_error(
                        &format!("deleting HorizontalPodAutoscaler {}/{name}", self.namespace),
                        e,
                    )),
                }
            }
            WorkloadAction::RevertTarget(template) => {
                let target = facts
                    .target
                    .as_ref()
                    .ok_or_else(|| Error::Workload("the target is gone".into()))?;
                let name = target
                    .pointer("/metadata/name")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                let ops = vec![
                    json!({"op": "test", "path": "/metadata/uid", "value": target["metadata"]["uid"]}),
                    json!({"op": "add", "path": "/spec/template", "value": template}),
                ];
                self.json_patch(&self.deployments, "Deployment", name, ops, &params)
                    .await
            }
            WorkloadAction::ReleaseOwned {
                deployment,
                autoscaler,
            } => {
                let released = [
                    (
                        &self.deployments,
                        "Deployment",
                        Some(deployment),
                        facts.primary.as_ref(),
                    ),
                    (
                        &self.autoscalers,
                        "HorizontalPodAutoscaler",
                        autoscaler.as_ref(),
                        facts.primary_autoscaler.as_ref(),
                    ),
                ];
                for (api, kind, name, object) in released {
                    let (Some(name), Some(object)) = (name, object) else {
                        continue;
                    };
                    let patch = Patch::Merge(workload::without_owner(object, &facts.owner));
                    api.patch(name, &params, &patch).await.map_err(|e| {
                        api_error(&format!("releasing {kind} {}/{name}", self.namespace), e)
                    })?;
                }
                Ok(())
            }
            WorkloadAction::Event { .. } | WorkloadAction::PostRollout => Ok(()),
        }
    }

    async fn create(
        &self,
        api: &Api<DynamicObject>,
        kind: &str,
        object: &Value,
        params: &PostParams,
    ) -> Result<()> {
        let name = object
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let object: DynamicObject = serde_json::from_value(object.clone())?;
        match api.create(params, &object).await {
            Ok(_) => Ok(()),
            // Someone (an earlier pass) was first; the next pass checks whose it is.
            Err(e) if api_status_code(&e) == Some(409) => Ok(()),
            Err(e) => Err(api_error(
                &format!("creating {kind} {}/{name}", self.namespace),
                e,
            )),
        }
    }

    async fn json_patch(
        &self,
        api: &Api<DynamicObject>,
        kind: &str,
        name: &str,
        ops: Vec<Value>,
        params: &PatchParams,
    ) -> Result<()> {
        let patch: json_patch::Patch = serde_json::from_value(Value::Array(ops))?;
        api.patch(name, params, &Patch::Json::<()>(patch))
            .await
            .map(|_| ())
            .map_err(|e| api_error(&format!("updating {kind} {}/{name}", self.namespace), e))
    }
}

/// JSON Patch operations setting each field of `spec` (whole values: a field removed from the
/// target's template must go from the primary's too).
fn spec_ops(spec: &Value) -> Vec<Value> {
    spec.as_object()
        .into_iter()
        .flatten()
        .map(
            |(field, value)| json!({"op": "add", "path": format!("/spec/{field}"), "value": value}),
        )
        .collect()
}

/// The Canary as an owner.
pub fn owner_of(canary: &CanaryResource) -> Owner {
    Owner {
        namespace: canary.namespace().unwrap_or_default(),
        name: canary.name_any(),
        uid: canary.uid().unwrap_or_default(),
    }
}

/// The weights for a canary weight.
pub fn weights(canary_weight: u8) -> Weights {
    Weights::canary_percent(canary_weight)
}

/// Canaries whose workload includes `object` (of kind `kind`): their target, its primary, or
/// one of their HPAs.
fn canaries_of(
    store: &Store<CanaryResource>,
    kind: &str,
    object: &DynamicObject,
) -> Vec<ObjectRef<CanaryResource>> {
    let namespace = object.namespace();
    let name = object.name_any();
    store
        .state()
        .iter()
        .filter(|c| c.namespace() == namespace)
        .filter(|c| {
            let spec = &c.spec.canary;
            match kind {
                "Deployment" => spec
                    .target_ref
                    .as_ref()
                    .is_some_and(|t| t.name == name || t.primary_name() == name),
                _ => spec
                    .autoscaler_ref
                    .as_ref()
                    .is_some_and(|h| h.name == name || h.primary_name() == name),
            }
        })
        .map(|c| ObjectRef::from_obj(c.as_ref()))
        .collect()
}

/// The Canaries to re-check whenever a Deployment or an HPA changes (a new revision, a pod
/// becoming ready, an HPA edit): one watch per kind, each with its own backoff.
pub fn workload_changes(
    client: &Client,
    namespace: Option<&str>,
    store: Store<CanaryResource>,
) -> impl Stream<Item = ObjectRef<CanaryResource>> + Send + 'static {
    let watches = [deployments_resource(), autoscalers_resource()]
        .into_iter()
        .map(move |resource| {
            let api: Api<DynamicObject> = match namespace {
                Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
                None => Api::all_with(client.clone(), &resource),
            };
            let store = store.clone();
            let kind = resource.kind.clone();
            watcher(api, watcher::Config::default())
                .default_backoff()
                .touched_objects()
                .filter_map(move |event| {
                    let canaries = match event {
                        Ok(object) => canaries_of(&store, &kind, &object),
                        Err(error) => {
                            tracing::debug!(kind = %kind, %error, "cannot watch this workload kind; retrying");
                            Vec::new()
                        }
                    };
                    futures::future::ready(Some(futures::stream::iter(canaries)))
                })
                .flatten()
                .boxed()
        });
    futures::stream::select_all(watches)
}
