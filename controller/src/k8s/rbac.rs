//! The Kubernetes API permissions the controller needs — and no more.
//!
//! `manifests/rbac.yaml` grants exactly [`CLUSTER_PERMISSIONS`] (ClusterRole) and
//! [`LEASE_PERMISSIONS`] (Role in the controller's namespace); tests check both that the file
//! matches this table and that every request the controller makes against the fake API server
//! is covered by it.

/// One RBAC rule: an API group, a resource (or `resource/subresource`) and verbs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Permission {
    pub api_group: &'static str,
    pub resource: &'static str,
    pub verbs: &'static [&'static str],
    /// Why the controller needs it.
    pub why: &'static str,
}

/// Granted in every watched namespace (a ClusterRole, or a Role per namespace).
pub const CLUSTER_PERMISSIONS: &[Permission] = &[
    Permission {
        api_group: "fledge.dev",
        resource: "canaries",
        verbs: &["list", "watch", "patch"],
        why: "watch Canaries; add/remove the finalizer (JSON Patch)",
    },
    Permission {
        api_group: "fledge.dev",
        resource: "canaries/status",
        verbs: &["update"],
        why: "persist rollout state (PUT with resourceVersion)",
    },
    Permission {
        api_group: "fledge.dev",
        resource: "canaries/finalizers",
        verbs: &["update"],
        why: "set finalizers where OwnerReferencesPermissionEnforcement is on (e.g. OpenShift)",
    },
    Permission {
        api_group: "networking.istio.io",
        resource: "virtualservices",
        verbs: &["get", "list", "watch", "patch"],
        why: "read and re-check routes on change; change only the weights (JSON Patch)",
    },
    Permission {
        api_group: "networking.istio.io",
        resource: "destinationrules",
        verbs: &["get", "list"],
        why: "check the stable and canary subsets exist",
    },
    Permission {
        api_group: "gateway.networking.k8s.io",
        resource: "httproutes",
        verbs: &["get", "list", "watch", "patch"],
        why: "read and re-check Gateway API routes on change; change only the two weights and the rules Fledge adds (JSON Patch)",
    },
    Permission {
        api_group: "gateway.networking.k8s.io",
        resource: "grpcroutes",
        verbs: &["get", "list", "watch", "patch"],
        why: "the same for GRPCRoutes",
    },
    Permission {
        api_group: "apps",
        resource: "deployments",
        verbs: &["get", "list", "watch", "create", "patch"],
        why: "with targetRef: read the target, create the primary copy, copy a promoted template into it (JSON Patch), re-check a Canary when either changes",
    },
    Permission {
        api_group: "apps",
        resource: "deployments/scale",
        verbs: &["patch"],
        why: "with targetRef: scale the target up for a new revision and back to 0",
    },
    Permission {
        api_group: "autoscaling",
        resource: "horizontalpodautoscalers",
        verbs: &["get", "list", "watch", "create", "patch", "delete"],
        why: "with autoscalerRef: read the target's HPA, keep the primary's copy in step (delete it when autoscalerRef goes)",
    },
    Permission {
        api_group: "events.k8s.io",
        resource: "events",
        verbs: &["create", "patch"],
        why: "Kubernetes Events on Canaries (patch: repeated events become a series)",
    },
];

/// Granted only in the controller's own namespace.
pub const LEASE_PERMISSIONS: &[Permission] = &[Permission {
    api_group: "coordination.k8s.io",
    resource: "leases",
    verbs: &["get", "create", "update"],
    why: "leader election",
}];

/// Permissions granted for reasons the controller's own requests do not show.
pub const NOT_CALLED_DIRECTLY: &[(&str, &str)] = &[("canaries/finalizers", "update")];

/// The RBAC verb of an HTTP request (`GET` of a collection is `list`, or `watch` with
/// `watch=true`).
pub fn verb_of(method: &str, has_name: bool, watch: bool) -> &'static str {
    match (method, has_name, watch) {
        ("GET", _, true) => "watch",
        ("GET", true, false) => "get",
        ("GET", false, false) => "list",
        ("POST", _, _) => "create",
        ("PUT", _, _) => "update",
        ("PATCH", _, _) => "patch",
        ("DELETE", true, _) => "delete",
        ("DELETE", false, _) => "deletecollection",
        _ => "unknown",
    }
}

/// Whether the permissions allow `verb` on `resource` in `api_group`.
pub fn allows(permissions: &[Permission], api_group: &str, resource: &str, verb: &str) -> bool {
    permissions
        .iter()
        .any(|p| p.api_group == api_group && p.resource == resource && p.verbs.contains(&verb))
}
