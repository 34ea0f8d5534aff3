//! The objects of a two-subset app `app` as Kubernetes holds them (JSON), for the controller's
//! Kubernetes tests and the e2e tests: its Istio VirtualService and DestinationRule, and a
//! Canary that shifts its traffic.

use serde_json::{json, Value};

/// The VirtualService `app`: hosts `app.example.com` through gateway `istio-system/public`,
/// one HTTP route `primary` sending 100% to subset `stable` and 0% to `canary`.
pub fn virtual_service(namespace: &str) -> Value {
    json!({
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "app", "namespace": namespace},
        "spec": {
            "hosts": ["app.example.com"],
            "gateways": ["istio-system/public"],
            "http": [{
                "name": "primary",
                "route": [
                    {"destination": {"host": "app", "subset": "stable"}, "weight": 100},
                    {"destination": {"host": "app", "subset": "canary"}, "weight": 0}
                ]
            }]
        }
    })
}

/// The DestinationRule `app`: subset `stable` is pods labelled `version: v1`, `canary` is
/// `version: v2`.
pub fn destination_rule(namespace: &str) -> Value {
    json!({
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {"name": "app", "namespace": namespace},
        "spec": {
            "host": "app",
            "subsets": [
                {"name": "stable", "labels": {"version": "v1"}},
                {"name": "canary", "labels": {"version": "v2"}}
            ]
        }
    })
}

/// The Canary `app` for [`virtual_service`]'s route `primary` (its `spec.router.istio`),
/// reading the gateway Envoy's admin at `envoy_admin_url`, with `analysis` as
/// `spec.analysis`.
pub fn canary(namespace: &str, envoy_admin_url: &str, analysis: Value) -> Value {
    json!({
        "apiVersion": "fledge.dev/v1alpha1",
        "kind": "Canary",
        "metadata": {"name": "app", "namespace": namespace},
        "spec": {
            "service": "app",
            "stable": {"subset": "stable"},
            "canary": {"subset": "canary"},
            "metricsSource": {"envoyAdmin": {"urls": [envoy_admin_url]}},
            "router": {"istio": {"virtualService": "app", "route": "primary"}},
            "analysis": analysis
        }
    })
}

/// The three objects above, in the order they are created.
pub fn app_objects(namespace: &str, envoy_admin_url: &str, analysis: Value) -> Vec<Value> {
    vec![
        virtual_service(namespace),
        destination_rule(namespace),
        canary(namespace, envoy_admin_url, analysis),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_canary_routes_the_virtual_service_subsets_the_destination_rule_defines() {
        let objects = app_objects("shop", "http://127.0.0.1:15000", json!({"interval": "10s"}));
        let [vs, dr, canary] = &objects[..] else {
            panic!("three objects")
        };
        assert!(objects.iter().all(|o| o["metadata"]["namespace"] == "shop"));
        let route = &vs["spec"]["http"][0];
        assert_eq!(route["name"], canary["spec"]["router"]["istio"]["route"]);
        let subsets: Vec<&Value> = dr["spec"]["subsets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| &s["name"])
            .collect();
        assert_eq!(
            subsets,
            [
                &canary["spec"]["stable"]["subset"],
                &canary["spec"]["canary"]["subset"]
            ]
        );
        assert_eq!(canary["spec"]["analysis"]["interval"], "10s");
    }
}
