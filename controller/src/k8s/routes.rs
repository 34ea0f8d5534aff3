//! What the controller knows about route objects without asking the API server.
//!
//! - [`RouteObjects`]: every route object (VirtualService, ...) as the watch delivered it, so
//!   "do the routes already serve the persisted status?" is answered from memory. Only a route
//!   that does not is read and written through the router.
//! - [`ConfirmedRoutes`]: the routes each Canary's router last confirmed; a change of the route
//!   object (seen by the watch: someone's edit, our own write, a re-list) un-confirms it.
//! - [`RouteIndex`]: which Canaries name each route, rebuilt from the Canary cache at most once
//!   a second instead of scanning every Canary on every reconcile.
//!
//! With 10,000 Canaries the difference is 10,000 VirtualService reads per interval (one per
//! reconcile) against none while nothing changes.

use super::crd::CanaryResource;
use crate::router::factory::{route_key, route_kinds};
use crate::router::{DesiredRoutes, RouteKey};
use futures::{Stream, StreamExt};
use kube::api::{Api, DynamicObject};
use kube::core::ApiResource;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, ResourceExt};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
// Tokio's clock, so tests with a paused clock see the index age.
use tokio::time::Instant;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    match mutex.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// The route of `canary` (its spec's router, in its namespace).
pub fn route_of(canary: &CanaryResource) -> Option<RouteKey> {
    route_key(&canary.spec.canary, &canary.namespace()?)
}

/// Every route object of every route kind, as last delivered by the watches.
#[derive(Clone, Default)]
pub struct RouteObjects {
    by_kind: HashMap<String, (ApiResource, Store<DynamicObject>)>,
}

impl RouteObjects {
    /// The object holding `route`, if the watch has delivered it.
    pub fn get(&self, route: &RouteKey) -> Option<Arc<DynamicObject>> {
        let (resource, store) = self.by_kind.get(route.object.kind)?;
        let key = ObjectRef::new_with(&route.object.name, resource.clone())
            .within(&route.object.namespace);
        store.get(&key)
    }
}

/// The routes each Canary's router last confirmed, and a change counter per Canary that the
/// route watches bump: a confirmation made before the latest change does not count.
#[derive(Default)]
pub struct ConfirmedRoutes {
    changes: Mutex<HashMap<String, u64>>,
    confirmed: Mutex<HashMap<String, (DesiredRoutes, u64)>>,
}

impl ConfirmedRoutes {
    /// The change count of `canary`'s route now: pass it to [`ConfirmedRoutes::confirm`] after
    /// the router has confirmed the routes.
    pub fn epoch(&self, canary: &str) -> u64 {
        lock(&self.changes).get(canary).copied().unwrap_or(0)
    }

    /// The router confirmed `desired` for `canary`, from a read begun at `epoch`.
    pub fn confirm(&self, canary: &str, desired: DesiredRoutes, epoch: u64) {
        lock(&self.confirmed).insert(canary.to_string(), (desired, epoch));
    }

    /// Whether `desired` is confirmed for `canary` and its route has not changed since.
    pub fn holds(&self, canary: &str, desired: &DesiredRoutes) -> bool {
        let epoch = self.epoch(canary);
        lock(&self.confirmed)
            .get(canary)
            .is_some_and(|(confirmed, at)| confirmed == desired && *at == epoch)
    }

    /// `canary`'s route object changed.
    pub fn changed(&self, canary: &str) {
        *lock(&self.changes).entry(canary.to_string()).or_default() += 1;
    }

    /// Forget `canary` (deleted, or a new rollout).
    pub fn forget(&self, canary: &str) {
        lock(&self.confirmed).remove(canary);
    }
}

/// One Canary naming a route.
#[derive(Clone)]
struct RouteUser {
    key: String,
    object: ObjectRef<CanaryResource>,
    /// Oldest first, then by name: the oldest steers.
    rank: (Option<String>, String),
    /// Finished with its final routes applied: it steers nothing any more.
    done: bool,
}

/// Which of two Canaries naming one route keeps it: the older, then the first by name.
fn rank_of(canary: &CanaryResource) -> (Option<String>, String) {
    let created = canary.metadata.creation_timestamp.as_ref();
    (created.map(|t| t.0.to_string()), canary.name_any())
}

#[derive(Default)]
struct Indexed {
    built: Option<Instant>,
    by_route: HashMap<RouteKey, Vec<RouteUser>>,
    /// route object (kind, namespace, name) → the routes in it that Canaries name
    by_object: HashMap<(String, String, String), Vec<RouteKey>>,
    known: HashSet<String>,
}

/// Which Canaries name each route: rebuilt from the Canary cache at most once per
/// [`RouteIndex::FRESH_FOR`], and at once when a Canary it does not know yet asks.
pub struct RouteIndex {
    canaries: Store<CanaryResource>,
    indexed: Mutex<Indexed>,
}

fn key_of(canary: &CanaryResource) -> String {
    format!(
        "{}/{}",
        canary.namespace().unwrap_or_default(),
        canary.name_any()
    )
}

impl RouteIndex {
    /// How long an index is used before it is rebuilt.
    pub const FRESH_FOR: Duration = Duration::from_secs(1);

    pub fn new(canaries: Store<CanaryResource>) -> Self {
        RouteIndex {
            canaries,
            indexed: Mutex::new(Indexed::default()),
        }
    }

    fn current(&self, must_know: Option<&str>) -> MutexGuard<'_, Indexed> {
        let mut indexed = lock(&self.indexed);
        let stale = indexed
            .built
            .is_none_or(|built| built.elapsed() >= Self::FRESH_FOR);
        let unknown = must_know.is_some_and(|key| !indexed.known.contains(key));
        if stale || unknown {
            *indexed = Self::build(&self.canaries);
        }
        indexed
    }

    fn build(canaries: &Store<CanaryResource>) -> Indexed {
        let mut indexed = Indexed {
            built: Some(Instant::now()),
            ..Indexed::default()
        };
        for canary in canaries.state() {
            let key = key_of(&canary);
            indexed.known.insert(key.clone());
            let Some(route) = route_of(&canary) else {
                continue;
            };
            // A Canary with a workload keeps its route at rest (stable 100); one without lets
            // go once its final routes are applied.
            let done = canary.spec.target_ref.is_none()
                && canary.status.as_ref().is_some_and(|status| {
                    status.rollout.phase.is_terminal() && status.final_routes_applied
                });
            let user = RouteUser {
                key,
                object: ObjectRef::from_obj(canary.as_ref()),
                rank: rank_of(&canary),
                done,
            };
            let object = (
                route.object.kind.to_string(),
                route.object.namespace.clone(),
                route.object.name.clone(),
            );
            let routes = indexed.by_object.entry(object).or_default();
            if !routes.contains(&route) {
                routes.push(route.clone());
            }
            indexed.by_route.entry(route).or_default().push(user);
        }
        indexed
    }

    /// The Canary that already steers `route` for `canary`, if another one does: the oldest
    /// (then the first by name) of those naming it that has not finished and handed its routes
    /// back (a Canary with a workload never hands its route back). Two Canaries moving one
    /// route's weights would undo each other's steps and judge traffic neither of them set.
    pub fn taken_by(&self, canary: &CanaryResource, route: &RouteKey) -> Option<String> {
        let key = key_of(canary);
        let indexed = self.current(Some(&key));
        let rank = rank_of(canary);
        indexed
            .by_route
            .get(route)?
            .iter()
            .filter(|user| user.key != key && !user.done && user.rank < rank)
            .min_by(|a, b| a.rank.cmp(&b.rank))
            .map(|user| user.key.clone())
    }

    /// The Canaries (key and reference) whose route is held by `object` of `kind`.
    pub fn users_of(
        &self,
        kind: &str,
        object: &DynamicObject,
    ) -> Vec<(String, ObjectRef<CanaryResource>)> {
        let indexed = self.current(None);
        let object_key = (
            kind.to_string(),
            object.namespace().unwrap_or_default(),
            object.name_any(),
        );
        indexed
            .by_object
            .get(&object_key)
            .into_iter()
            .flatten()
            .flat_map(|route| indexed.by_route.get(route).into_iter().flatten())
            .map(|user| (user.key.clone(), user.object.clone()))
            .collect()
    }
}

/// Watch every route kind (each with its own backoff, so a kind whose CRD is not installed —
/// e.g. no Gateway API — only keeps retrying its own watch), keep the objects in
/// [`RouteObjects`], un-confirm the routes of the Canaries using a changed object and yield
/// those Canaries to re-check.
pub fn watch(
    client: &Client,
    namespace: Option<&str>,
    index: Arc<RouteIndex>,
    confirmed: Arc<ConfirmedRoutes>,
) -> (
    RouteObjects,
    impl Stream<Item = ObjectRef<CanaryResource>> + Send + 'static,
) {
    let mut objects = RouteObjects::default();
    let mut watches = Vec::new();
    for resource in route_kinds() {
        let api: Api<DynamicObject> = match namespace {
            Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
            None => Api::all_with(client.clone(), &resource),
        };
        let writer = reflector::store::Writer::new(resource.clone());
        objects.by_kind.insert(
            resource.kind.clone(),
            (resource.clone(), writer.as_reader()),
        );
        let kind = resource.kind.clone();
        let index = index.clone();
        let confirmed = confirmed.clone();
        let stream = watcher(api, watcher::Config::default())
            .default_backoff()
            .map(|event| {
                // Managed fields are not needed to tell which routes an object serves.
                event.map(|event| event.modify(|object| object.managed_fields_mut().clear()))
            });
        let changes = reflector::reflector(writer, stream)
            .touched_objects()
            .filter_map(move |event| {
                let canaries = match event {
                    Ok(object) => index
                        .users_of(&kind, &object)
                        .into_iter()
                        .map(|(key, canary)| {
                            confirmed.changed(&key);
                            canary
                        })
                        .collect(),
                    Err(error) => {
                        tracing::debug!(kind = %kind, %error, "cannot watch this route kind (not installed, or no permission); retrying");
                        Vec::new()
                    }
                };
                futures::future::ready(Some(futures::stream::iter(canaries)))
            })
            .flatten()
            .boxed();
        watches.push(changes);
    }
    (objects, futures::stream::select_all(watches))
}
