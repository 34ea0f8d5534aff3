//! The reconciler with a Gateway API router: the same seam as the Istio tests above, against
//! HTTPRoutes and GRPCRoutes on the fake API server, with a stand-in Gateway controller that
//! writes `status.parents` after every change (as Istio, Envoy Gateway or any other
//! implementation would).

use super::*;

const GATEWAY: &str = "gateway.networking.k8s.io";
const ROUTE_PATH: &str = "/apis/gateway.networking.k8s.io/v1/namespaces/shop/httproutes/app";

fn gateway_canary(analysis: Value, router: Value) -> Value {
    let mut canary = canary_object(analysis, json!({}));
    let mut gateway = json!({
        "httpRoute": "app",
        "rule": "primary",
        "stableBackend": {"name": "app-stable", "port": 80},
        "canaryBackend": {"name": "app-canary", "port": 80}
    });
    if let (Some(gateway), Some(extra)) = (gateway.as_object_mut(), router.as_object()) {
        for (key, value) in extra {
            if value.is_null() {
                gateway.remove(key);
            } else {
                gateway.insert(key.clone(), value.clone());
            }
        }
    }
    canary["spec"]["router"] = json!({"gatewayApi": gateway});
    canary
}

/// The user's HTTPRoute: a health rule and the weighted rule, with a filter and a timeout.
fn http_route(name: &str) -> Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "parentRefs": [{"name": "public", "namespace": "gateways"}],
            "hostnames": ["app.example.com"],
            "rules": [
                {"name": "health",
                 "matches": [{"path": {"type": "Exact", "value": "/healthz"}}],
                 "backendRefs": [{"name": "app-stable", "port": 80}]},
                {"name": "primary",
                 "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                 "filters": [{"type": "RequestHeaderModifier",
                              "requestHeaderModifier": {"add": [{"name": "x-env", "value": "prod"}]}}],
                 "timeouts": {"request": "5s"},
                 "backendRefs": [
                    {"name": "app-stable", "port": 80, "weight": 100},
                    {"name": "app-canary", "port": 80, "weight": 0}
                 ]}
            ]
        }
    })
}

/// How the stand-in Gateway answers.
#[derive(Clone, Copy, PartialEq)]
enum Gateway {
    /// Accepted and ResolvedRefs True for every generation, at once.
    Accepts,
    /// Accepted False (no listener allows the route's namespace).
    Refuses,
    /// Never writes a status (no Gateway controller runs).
    Absent,
}

/// A Gateway controller stand-in for `plural`: after every change of a route it writes
/// `status.parents` for that route's generation.
fn gateway_controller(server: &FakeApiServer, plural: &str, gateway: Arc<Mutex<Gateway>>) {
    let plural_name = plural.to_string();
    server.on_write(GATEWAY, plural, move |server, route| {
        let behaviour = *gateway.lock().unwrap();
        if behaviour == Gateway::Absent {
            return;
        }
        let generation = route["metadata"]["generation"].as_i64().unwrap_or(1);
        let accepted = if behaviour == Gateway::Accepts {
            json!({"type": "Accepted", "status": "True", "reason": "Accepted", "message": "", "observedGeneration": generation})
        } else {
            json!({"type": "Accepted", "status": "False", "reason": "NotAllowedByListeners",
                   "message": "no listener of gateways/public allows routes from shop", "observedGeneration": generation})
        };
        let name = route["metadata"]["name"].as_str().unwrap_or_default().to_string();
        server.edit_status(GATEWAY, &plural_name, NS, &name, |r| {
            r["status"] = json!({"parents": [{
                "parentRef": {"group": GATEWAY, "kind": "Gateway", "name": "public", "namespace": "gateways"},
                "controllerName": "example.com/gateway-controller",
                "conditions": [accepted, {"type": "ResolvedRefs", "status": "True", "reason": "ResolvedRefs", "message": "", "observedGeneration": generation}]
            }]});
        });
    });
}

struct Seeded {
    server: FakeApiServer,
    gateway: Arc<Mutex<Gateway>>,
}

fn seeded_gateway(canary: Value, gateway: Gateway) -> Seeded {
    let server = FakeApiServer::new();
    let gateway = Arc::new(Mutex::new(gateway));
    gateway_controller(&server, "httproutes", gateway.clone());
    gateway_controller(&server, "grpcroutes", gateway.clone());
    server.create(GATEWAY, "httproutes", http_route("app"));
    server.create(FLEDGE, "canaries", canary);
    Seeded { server, gateway }
}

fn stored_route(server: &FakeApiServer) -> Value {
    server.get(GATEWAY, "httproutes", NS, "app").unwrap()
}

fn route_weights(server: &FakeApiServer) -> Weights {
    let spec = stored_canary(server).spec.canary;
    weights_in(&spec, NS, &stored_route(server)).unwrap()
}

fn rule_names(route: &Value) -> Vec<String> {
    route["spec"]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap_or("").to_string())
        .collect()
}

fn ready_reason(server: &FakeApiServer) -> Option<(String, String, String)> {
    status(server)
        .condition(condition::READY)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

#[tokio::test(start_paused = true)]
async fn a_gateway_api_canary_moves_only_the_two_backend_weights_of_the_rule() {
    let Seeded { server, .. } =
        seeded_gateway(gateway_canary(json!({}), json!({})), Gateway::Accepts);
    let original = stored_route(&server);
    let clock = TokioClock::starting_at(t0());
    let a = instance(&server, "a", &clock);
    reconcile_now(&server, &a).await; // the finalizer
    server.take_requests();

    // Routes checked (0%, accepted), baseline taken, step 0 entered: status first, Events,
    // then one guarded patch of the two weights, read back with the Gateway's acceptance.
    let action = reconcile_now(&server, &a).await;
    assert_eq!(action, Action::requeue(Duration::from_secs(30)));
    let requests = server.take_requests();
    assert_eq!(
        lines(&requests),
        [
            format!("GET {ROUTE_PATH} 200"),
            format!("PUT {CANARY_PATH}/status 200"),
            format!("POST {EVENTS} 201"),
            format!("POST {EVENTS} 201"),
            format!("GET {ROUTE_PATH} 200"),
            format!("PATCH {ROUTE_PATH}?fieldManager=fledge 200"),
            format!("GET {ROUTE_PATH} 200"),
        ]
    );
    assert_eq!(
        requests[5].body,
        Some(json!([
            {"op": "test", "path": "/spec/rules/1/name", "value": "primary"},
            {"op": "test", "path": "/spec/rules/1/backendRefs/0/name", "value": "app-stable"},
            {"op": "test", "path": "/spec/rules/1/backendRefs/0/weight", "value": 100},
            {"op": "add", "path": "/spec/rules/1/backendRefs/0/weight", "value": 80},
            {"op": "test", "path": "/spec/rules/1/backendRefs/1/name", "value": "app-canary"},
            {"op": "test", "path": "/spec/rules/1/backendRefs/1/weight", "value": 0},
            {"op": "add", "path": "/spec/rules/1/backendRefs/1/weight", "value": 20}
        ]))
    );
    assert_eq!(
        requests[5].content_type.as_deref(),
        Some("application/json-patch+json")
    );
    let after = stored_route(&server);
    let mut expected = original.clone();
    expected["spec"]["rules"][1]["backendRefs"][0]["weight"] = json!(80);
    expected["spec"]["rules"][1]["backendRefs"][1]["weight"] = json!(20);
    assert_eq!(
        after["spec"], expected["spec"],
        "filters, timeouts and other rules kept"
    );
    let st = status(&server);
    assert_eq!(
        (st.rollout.phase, st.rollout.canary_weight),
        (Phase::Progressing, 20)
    );
    assert!(st.is_ready());

    // Reconciling again does nothing but look.
    reconcile_now(&server, &a).await;
    assert_eq!(
        lines(&server.take_requests()),
        [format!("GET {ROUTE_PATH} 200")]
    );
}

#[tokio::test(start_paused = true)]
async fn nothing_is_judged_until_the_gateway_accepts_the_route() {
    let Seeded { server, gateway } =
        seeded_gateway(gateway_canary(json!({}), json!({})), Gateway::Absent);
    let clock = TokioClock::starting_at(t0());
    let a = instance(&server, "a", &clock);
    reconcile_now(&server, &a).await;
    let action = reconcile_now(&server, &a).await;
    assert_eq!(action, Action::requeue(Duration::from_secs(10)));
    let (ready, reason, message) = ready_reason(&server).unwrap();
    assert_eq!((ready.as_str(), reason.as_str()), ("False", "RouterError"));
    assert!(
        message.contains("HTTPRoute shop/app is not accepted after 3 s"),
        "{message}"
    );
    assert!(message.contains("status.parents is empty"), "{message}");
    assert_eq!(a.backends.sources_built(), 0, "no metrics read");
    assert_eq!(status(&server).rollout.phase, Phase::Initializing);

    // A Gateway that refuses the route: its reason is shown, still nothing judged.
    *gateway.lock().unwrap() = Gateway::Refuses;
    server.edit(GATEWAY, "httproutes", NS, "app", |r| {
        r["spec"]["hostnames"] = json!(["app.example.com", "www.example.com"]);
    });
    reconcile_now(&server, &a).await;
    let (_, reason, message) = ready_reason(&server).unwrap();
    assert_eq!(reason, "RouterError");
    assert!(
        message.contains("Gateway gateways/public: Accepted is False (NotAllowedByListeners: no listener of gateways/public allows routes from shop)"),
        "{message}"
    );
    assert_eq!(a.backends.sources_built(), 0);

    // Accepted: the rollout starts.
    *gateway.lock().unwrap() = Gateway::Accepts;
    server.edit(GATEWAY, "httproutes", NS, "app", |r| {
        r["spec"]["hostnames"] = json!(["app.example.com"]);
    });
    reconcile_now(&server, &a).await;
    assert!(status(&server).is_ready());
    assert_eq!(status(&server).rollout.canary_weight, 20);
    assert_eq!(route_weights(&server), Weights::canary_percent(20));
}

#[tokio::test(start_paused = true)]
async fn testers_guard_and_mirror_live_only_while_the_rollout_runs() {
    let router = json!({
        "headerRoute": {"headers": {"stage": "canary"}, "cookie": {"name": "canary", "value": "always"}},
        "mirrorPercentage": 10
    });
    let Seeded { server, .. } = seeded_gateway(
        gateway_canary(json!({"guard": {}}), router),
        Gateway::Accepts,
    );
    let original = stored_route(&server);
    let clock = TokioClock::starting_at(t0());
    let a = instance(&server, "a", &clock);
    reconcile_now(&server, &a).await;
    reconcile_now(&server, &a).await;
    let route = stored_route(&server);
    assert_eq!(
        rule_names(&route),
        [
            "health",
            "primary",
            "primary-fledge-guard",
            "primary-canary-testers"
        ]
    );
    let testers = &route["spec"]["rules"][3];
    assert_eq!(
        testers["matches"][0]["headers"],
        json!([
            {"type": "Exact", "name": "stage", "value": "canary"},
            {"type": "RegularExpression", "name": "cookie", "value": r"^(.*;\s*)?canary=always(;.*)?$"}
        ])
    );
    assert_eq!(
        testers["backendRefs"],
        json!([{"name": "app-canary", "port": 80, "weight": 1}])
    );
    let guard = &route["spec"]["rules"][2];
    assert_eq!(
        guard["matches"][0]["headers"],
        json!([{"type": "RegularExpression", "name": "x-fledge-guard", "value": "(.*,)?app(,.*)?"}])
    );
    assert_eq!(guard["backendRefs"][0]["name"], "app-stable");
    let filters = &route["spec"]["rules"][1]["filters"];
    assert_eq!(
        filters[0]["type"], "RequestHeaderModifier",
        "the user's filter is kept"
    );
    assert_eq!(filters[1]["requestMirror"]["percent"], 10);

    // Deleted mid-rollout: 100% stable and every added rule and filter gone.
    server.delete(FLEDGE, "canaries", NS, "app");
    assert_eq!(reconcile_now(&server, &a).await, Action::await_change());
    assert!(server.get(FLEDGE, "canaries", NS, "app").is_none());
    assert_eq!(
        stored_route(&server)["spec"],
        original["spec"],
        "the route is as it was before the rollout"
    );
    assert!(event_reasons(&server)
        .iter()
        .any(|(reason, _, _)| reason == "TrafficRestored"));
}

#[tokio::test(start_paused = true)]
async fn a_concurrent_weight_edit_fails_the_test_and_is_retried_on_fresh_data() {
    let Seeded { server, .. } =
        seeded_gateway(gateway_canary(json!({}), json!({})), Gateway::Accepts);
    let clock = TokioClock::starting_at(t0());
    let a = instance(&server, "a", &clock);
    reconcile_now(&server, &a).await;
    server.before_next("PATCH", "httproutes/app", |s| {
        s.edit(GATEWAY, "httproutes", NS, "app", |r| {
            r["spec"]["rules"][1]["backendRefs"][0]["weight"] = json!(90);
            r["spec"]["rules"][1]["backendRefs"][1]["weight"] = json!(10);
            r["spec"]["rules"][1]["timeouts"] = json!({"request": "9s"});
        })
    });
    server.take_requests();
    reconcile_now(&server, &a).await;
    let patches: Vec<u16> = server
        .requests()
        .iter()
        .filter(|r| r.method == "PATCH" && r.path == ROUTE_PATH)
        .map(|r| r.status)
        .collect();
    assert_eq!(patches, [422, 200]);
    let route = stored_route(&server);
    assert_eq!(route_weights(&server), Weights::canary_percent(20));
    assert_eq!(
        route["spec"]["rules"][1]["timeouts"],
        json!({"request": "9s"}),
        "the edit is kept"
    );
}

#[tokio::test(start_paused = true)]
async fn the_controller_promotes_through_an_http_route_and_repairs_edits_at_once() {
    let Seeded { server, .. } =
        seeded_gateway(gateway_canary(json!({}), json!({})), Gateway::Accepts);
    let clock = TokioClock::starting_at(t0());
    let controller = start(&server, "a", ScriptedBackends::default(), clock);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(route_weights(&server), Weights::canary_percent(20));
    // GitOps puts the weights from Git back: the HTTPRoute watch repairs it at once.
    server.edit(GATEWAY, "httproutes", NS, "app", |r| {
        r["spec"]["rules"][1]["backendRefs"][0]["weight"] = json!(100);
        r["spec"]["rules"][1]["backendRefs"][1]["weight"] = json!(0);
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(route_weights(&server), Weights::canary_percent(20));
    assert_eq!(
        status(&server).rollout.step,
        0,
        "no analysis triggered by the edit"
    );
    tokio::time::sleep(Duration::from_secs(100)).await;
    let st = status(&server);
    assert_eq!(
        (st.rollout.phase, st.rollout.canary_weight),
        (Phase::Promoted, 100)
    );
    assert!(st.final_routes_applied);
    assert_eq!(route_weights(&server), Weights::canary_percent(100));
    controller.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_second_canary_on_the_same_rule_waits_and_another_rule_does_not() {
    let Seeded { server, .. } =
        seeded_gateway(gateway_canary(json!({}), json!({})), Gateway::Accepts);
    let mut same = gateway_canary(json!({}), json!({}));
    same["metadata"]["name"] = json!("app-b");
    server.create(FLEDGE, "canaries", same);
    let mut route2 = http_route("app2");
    route2["spec"]["rules"][1]["name"] = json!("primary");
    server.create(GATEWAY, "httproutes", route2);
    let mut other = gateway_canary(json!({}), json!({"httpRoute": "app2"}));
    other["metadata"]["name"] = json!("app-c");
    server.create(FLEDGE, "canaries", other);
    let clock = TokioClock::starting_at(t0());
    let controller = start(&server, "a", ScriptedBackends::default(), clock);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let b = status_of(&server, "app-b");
    let ready = b.condition(condition::READY).unwrap();
    assert_eq!(ready.reason, "RouteConflict");
    assert!(
        ready
            .message
            .starts_with("HTTPRoute shop/app route \"primary\" is steered by Canary shop/app"),
        "{}",
        ready.message
    );
    let c = status_of(&server, "app-c");
    assert_eq!(c.rollout.canary_weight, 20, "another route is free");
    controller.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_grpc_route_rule_by_index_is_steered_the_same_way() {
    let router = json!({
        "httpRoute": null,
        "grpcRoute": "app",
        "rule": 0,
        "stableBackend": {"name": "app-stable"},
        "canaryBackend": {"name": "app-canary"},
        "headerRoute": {"headers": {"stage": "canary"}}
    });
    let Seeded { server, .. } = seeded_gateway(gateway_canary(json!({}), router), Gateway::Accepts);
    server.create(
        GATEWAY,
        "grpcroutes",
        json!({
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "GRPCRoute",
            "metadata": {"name": "app", "namespace": NS},
            "spec": {"parentRefs": [{"name": "public", "namespace": "gateways"}],
                     "rules": [{"matches": [{"method": {"service": "shop.Cart"}}],
                                "backendRefs": [{"name": "app-stable", "port": 9000, "weight": 100},
                                                {"name": "app-canary", "port": 9000, "weight": 0}]}]}
        }),
    );
    let clock = TokioClock::starting_at(t0());
    let a = instance(&server, "a", &clock);
    reconcile_now(&server, &a).await;
    reconcile_now(&server, &a).await;
    let route = server.get(GATEWAY, "grpcroutes", NS, "app").unwrap();
    assert_eq!(route["spec"]["rules"][0]["backendRefs"][1]["weight"], 20);
    assert_eq!(
        route["spec"]["rules"][1]["matches"],
        json!([{"method": {"service": "shop.Cart"}, "headers": [{"type": "Exact", "name": "stage", "value": "canary"}]}])
    );
    assert_eq!(route["spec"]["rules"][1]["name"], "rule-0-canary-testers");
    assert!(status(&server).is_ready());
}

/// An HTTPRoute Canary `app3` and a GRPCRoute Canary `app4` (with an accepting Gateway), for
/// tests that need every router kind in one cluster.
pub(super) fn add_gateway_canaries(server: &FakeApiServer) {
    let accepts = Arc::new(Mutex::new(Gateway::Accepts));
    gateway_controller(server, "httproutes", accepts.clone());
    gateway_controller(server, "grpcroutes", accepts);
    server.create(GATEWAY, "httproutes", http_route("app3"));
    let mut http = gateway_canary(json!({}), json!({"httpRoute": "app3"}));
    http["metadata"]["name"] = json!("app3");
    server.create(FLEDGE, "canaries", http);
    let mut grpc_route = http_route("app4");
    grpc_route["kind"] = json!("GRPCRoute");
    grpc_route["spec"] = json!({"rules": [{"name": "primary", "backendRefs": [
        {"name": "app-stable", "port": 80, "weight": 100},
        {"name": "app-canary", "port": 80, "weight": 0}]}]});
    server.create(GATEWAY, "grpcroutes", grpc_route);
    let mut grpc = gateway_canary(json!({}), json!({"httpRoute": null, "grpcRoute": "app4"}));
    grpc["metadata"]["name"] = json!("app4");
    server.create(FLEDGE, "canaries", grpc);
}
