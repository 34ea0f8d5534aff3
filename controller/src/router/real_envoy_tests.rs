//! Checks against a real Envoy, off by default. Run with
//!
//! ```text
//! FLEDGE_ENVOY_BIN=/work/main/.venv/bin/envoy \
//!   cargo test -p fledge-controller --lib real_envoy -- --ignored --nocapture
//! ```
//!
//! Optional: `FLEDGE_FILTER_WASM=<path to fledge_filter.wasm>` adds the filter, so the metrics
//! check sees real `fledge_*` series. The team's e2e suite covers the full path.

use super::envoy_rds::{EnvoyRdsRouter, EnvoyRdsSettings};
use super::Weights;
use crate::metrics::{promtext, EnvoyAdminSource, MetricsSource, SubsetSelector};
use fledge_core::observe::ObservationError;
use fledge_testkit::http::{FakeEndpoint, Reply};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// An upstream answering every request with its own name; stopped when dropped.
async fn upstream(name: &'static str) -> FakeEndpoint {
    FakeEndpoint::start_with_fallback(move |_| Reply::text(name))
        .await
        .unwrap()
}

/// A running Envoy; killed when dropped.
struct Envoy {
    child: tokio::process::Child,
    admin_url: String,
    listener_url: String,
}

impl Envoy {
    async fn start(binary: &str, dir: &Path, rds_file: &Path, stable: u16, canary: u16) -> Envoy {
        let wasm_filter = std::env::var("FLEDGE_FILTER_WASM").ok().map(|path| {
            let config = r#"{"clusters":{"app_stable":{"service":"app","subset":"stable"},"app_canary":{"service":"app","subset":"canary"}}}"#;
            format!(
                r#"{{"name":"envoy.filters.http.wasm","typed_config":{{"@type":"type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm","config":{{"name":"fledge","root_id":"fledge","configuration":{{"@type":"type.googleapis.com/google.protobuf.StringValue","value":{}}},"vm_config":{{"runtime":"envoy.wasm.runtime.v8","code":{{"local":{{"filename":{:?}}}}}}}}}}}}},"#,
                serde_json::to_string(config).unwrap(),
                path
            )
        });
        let stats_tags: Vec<String> = fledge_core::contract::ALL_TAGS
            .iter()
            .map(|tag| {
                format!(
                    r#"{{"tag_name":"{tag}","regex":{}}}"#,
                    serde_json::to_string(&fledge_core::contract::stats_tag_regex(tag)).unwrap()
                )
            })
            .collect();
        let cluster = |name: &str, port: u16| {
            format!(
                r#"{{"name":"{name}","type":"STATIC","load_assignment":{{"cluster_name":"{name}","endpoints":[{{"lb_endpoints":[{{"endpoint":{{"address":{{"socket_address":{{"address":"127.0.0.1","port_value":{port}}}}}}}}}]}}]}}}}"#
            )
        };
        let rds_dir = rds_file.parent().unwrap();
        let bootstrap = format!(
            r#"{{
  "node": {{"id": "test", "cluster": "test"}},
  "admin": {{"address": {{"socket_address": {{"address": "127.0.0.1", "port_value": 0}}}}}},
  "stats_config": {{"stats_tags": [{tags}]}},
  "static_resources": {{
    "listeners": [{{"name": "main",
      "address": {{"socket_address": {{"address": "127.0.0.1", "port_value": 0}}}},
      "filter_chains": [{{"filters": [{{"name": "envoy.filters.network.http_connection_manager",
        "typed_config": {{"@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
          "stat_prefix": "ingress",
          "rds": {{"route_config_name": "fledge_route", "config_source": {{"resource_api_version": "V3",
            "path_config_source": {{"path": {rds_path:?}, "watched_directory": {{"path": {rds_dir:?}}}}}}}}},
          "http_filters": [{wasm}{{"name": "envoy.filters.http.router", "typed_config": {{"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}}}]
        }}}}]}}]}}],
    "clusters": [{stable_cluster}, {canary_cluster}]
  }}
}}"#,
            tags = stats_tags.join(","),
            rds_path = rds_file.display().to_string(),
            rds_dir = rds_dir.display().to_string(),
            wasm = wasm_filter.unwrap_or_default(),
            stable_cluster = cluster("app_stable", stable),
            canary_cluster = cluster("app_canary", canary),
        );
        let bootstrap_path = dir.join("bootstrap.json");
        std::fs::write(&bootstrap_path, bootstrap).unwrap();
        let admin_address_path = dir.join("admin.address");
        let child = tokio::process::Command::new(binary)
            .arg("-c")
            .arg(&bootstrap_path)
            .args([
                "--disable-hot-restart",
                "--concurrency",
                "1",
                "-l",
                "warning",
            ])
            .arg("--admin-address-path")
            .arg(&admin_address_path)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.join("envoy.log")).unwrap())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut envoy = Envoy {
            child,
            admin_url: String::new(),
            listener_url: String::new(),
        };
        let started = Instant::now();
        while envoy.admin_url.is_empty() {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "Envoy did not start; see {}",
                dir.join("envoy.log").display()
            );
            if let Ok(address) = std::fs::read_to_string(&admin_address_path) {
                if !address.trim().is_empty() {
                    envoy.admin_url = format!("http://{}", address.trim());
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let listeners: serde_json::Value =
            reqwest::get(format!("{}/listeners?format=json", envoy.admin_url))
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
        let port = listeners["listener_statuses"][0]["local_address"]["socket_address"]
            ["port_value"]
            .as_u64()
            .unwrap();
        envoy.listener_url = format!("http://127.0.0.1:{port}/");
        envoy
    }

    async fn stop(mut self) {
        self.child.kill().await.unwrap();
    }
}

fn envoy_binary() -> Option<String> {
    let binary = std::env::var("FLEDGE_ENVOY_BIN").ok();
    if binary.is_none() {
        eprintln!("FLEDGE_ENVOY_BIN not set; skipping");
    }
    binary
}

async fn served_by(url: &str, requests: usize) -> (usize, usize) {
    let client = reqwest::Client::new();
    let mut counts = (0, 0);
    for _ in 0..requests {
        let body = client.get(url).send().await.unwrap().text().await.unwrap();
        match body.as_str() {
            "stable" => counts.0 += 1,
            "canary" => counts.1 += 1,
            other => panic!("unexpected response {other:?}"),
        }
    }
    counts
}

async fn check_router_with(file_name: &str, initial: &str) {
    let Some(binary) = envoy_binary() else { return };
    let dir = tempfile::tempdir().unwrap();
    let rds_dir: PathBuf = dir.path().join("rds");
    std::fs::create_dir(&rds_dir).unwrap();
    let rds_file = rds_dir.join(file_name);
    std::fs::write(&rds_file, initial).unwrap();
    let stable = upstream("stable").await;
    let canary = upstream("canary").await;
    let envoy = Envoy::start(&binary, dir.path(), &rds_file, stable.port(), canary.port()).await;

    let router = EnvoyRdsRouter::new(EnvoyRdsSettings {
        path: rds_file.clone(),
        route_configuration: "fledge_route".to_string(),
        virtual_host: "app".to_string(),
        route: "primary".to_string(),
        stable_cluster: "app_stable".to_string(),
        canary_cluster: "app_canary".to_string(),
        admin_url: envoy.admin_url.clone(),
        verify_timeout: Duration::from_secs(5),
    })
    .unwrap();
    assert_eq!(
        router.get_weights().await.unwrap(),
        Weights::canary_percent(0)
    );
    router.verify(Weights::canary_percent(0)).await.unwrap();
    assert_eq!(served_by(&envoy.listener_url, 10).await, (10, 0));

    for percent in [10u8, 100, 50, 0] {
        let wanted = Weights::canary_percent(percent);
        let started = Instant::now();
        router.set_weights(wanted).await.unwrap();
        router.verify(wanted).await.unwrap();
        eprintln!(
            "{file_name}: {}% canary live after {} ms",
            percent,
            started.elapsed().as_millis()
        );
    }
    router
        .set_weights(Weights::canary_percent(100))
        .await
        .unwrap();
    router.verify(Weights::canary_percent(100)).await.unwrap();
    assert_eq!(served_by(&envoy.listener_url, 10).await, (0, 10));

    let not_live = router.verify(Weights::canary_percent(30)).await;
    assert!(
        matches!(not_live, Err(super::RouterError::NotLive { live: Some(live), .. }) if live == Weights::canary_percent(100)),
        "{not_live:?}"
    );
    let leftovers: Vec<_> = std::fs::read_dir(&rds_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers.len(), 1, "{leftovers:?}");

    // Metrics: the real exposition parses, and the source works against it.
    let full = reqwest::get(format!("{}/stats/prometheus", envoy.admin_url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let samples = promtext::parse(&full).unwrap();
    eprintln!(
        "{} samples in Envoy's full /stats/prometheus",
        samples.len()
    );
    let mut source = EnvoyAdminSource::new(
        vec![envoy.admin_url.clone()],
        SubsetSelector {
            service: "app".to_string(),
            stable_subset: "stable".to_string(),
            canary_subset: "canary".to_string(),
        },
        Duration::from_secs(2),
    )
    .unwrap();
    assert_eq!(source.observe().await, Err(ObservationError::Baseline));
    router
        .set_weights(Weights::canary_percent(50))
        .await
        .unwrap();
    router.verify(Weights::canary_percent(50)).await.unwrap();
    served_by(&envoy.listener_url, 20).await;
    // Histograms reach the admin API on Envoy's stats flush (5 s by default).
    tokio::time::sleep(Duration::from_millis(5500)).await;
    let observation = source.observe().await.unwrap();
    eprintln!("observation after 20 requests: {observation:?}");
    let filtered = reqwest::get(format!(
        "{}/stats/prometheus?filter=fledge_request%7C%5Eserver%5C.uptime%24",
        envoy.admin_url
    ))
    .await
    .unwrap()
    .text()
    .await
    .unwrap();
    let shown: Vec<&str> = filtered
        .lines()
        .filter(|line| !line.contains("_bucket") || line.contains("+Inf"))
        .collect();
    eprintln!(
        "filtered exposition (finite buckets hidden):\n{}",
        shown.join("\n")
    );
    if std::env::var("FLEDGE_FILTER_WASM").is_ok() {
        assert_eq!(
            observation.stable.requests() + observation.canary.requests(),
            20
        );
    }
    envoy.stop().await;
}

const EXAMPLE_JSON: &str = r#"{"version_info":"1","resources":[{"@type":"type.googleapis.com/envoy.config.route.v3.RouteConfiguration","name":"fledge_route","virtual_hosts":[{"name":"app","domains":["*"],"routes":[{"name":"primary","match":{"prefix":"/"},"route":{"weighted_clusters":{"clusters":[{"name":"app_stable","weight":100},{"name":"app_canary","weight":0}]}}}]}]}]}"#;

const EXAMPLE_YAML: &str = r#"version_info: "1"
resources:
- "@type": type.googleapis.com/envoy.config.route.v3.RouteConfiguration
  name: fledge_route
  virtual_hosts:
  - name: app
    domains: ["*"]
    routes:
    - name: primary
      match: {prefix: "/"}
      route:
        weighted_clusters:
          clusters:
          - {name: app_stable, weight: 100}
          - {name: app_canary, weight: 0}
"#;

#[tokio::test]
#[ignore = "needs a real Envoy: set FLEDGE_ENVOY_BIN"]
async fn real_envoy_json_rds() {
    check_router_with("routes.json", EXAMPLE_JSON).await;
}

#[tokio::test]
#[ignore = "needs a real Envoy: set FLEDGE_ENVOY_BIN"]
async fn real_envoy_yaml_rds() {
    check_router_with("routes.yaml", EXAMPLE_YAML).await;
}
