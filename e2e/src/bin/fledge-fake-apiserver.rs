//! `fledge-fake-apiserver` — the controller's in-process fake Kubernetes API server
//! (`fledge_testkit::fake_api`, the one the controller's unit tests use) served over plain HTTP on
//! 127.0.0.1, so end-to-end tests can run the real `fledge controller` and `fledge ... --kubernetes`
//! binaries against it. Test tooling only: no authentication, no TLS, state in memory.
//!
//! ```text
//! fledge-fake-apiserver --listen 127.0.0.1:0 --kubeconfig DIR/kubeconfig --seed objects.json
//! ```
//!
//! `--seed` is a JSON array of objects (Canary, VirtualService, DestinationRule, ...) created
//! before it listens; an object's `status`, if given, is then written through the status
//! subresource (e.g. a Canary that is mid-rollout). `GET /__fake/request-tallies` counts the
//! requests served by kind; `--request-log-limit` and `--history-limit` bound its memory for long
//! runs. It writes a kubeconfig naming its address (the user's bearer token is the client identity
//! the server records), prints `listening on http://ADDR`, and serves until SIGTERM or Ctrl-C.

#![forbid(unsafe_code)]

use anyhow::{Context, Result};
use clap::Parser;
use fledge_testkit::fake_api::FakeApiServer;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "fledge-fake-apiserver",
    about = "The fake Kubernetes API server of Fledge's tests, over HTTP (test tooling only)"
)]
struct Args {
    /// Address to listen on (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Where to write a kubeconfig for clients of this server.
    #[arg(long)]
    kubeconfig: PathBuf,
    /// Namespace of the kubeconfig's context.
    #[arg(long, default_value = "default")]
    namespace: String,
    /// Bearer token written into the kubeconfig (recorded as the client's identity).
    #[arg(long, default_value = "fledge")]
    token: String,
    /// A JSON file holding an array of objects to create first (repeatable).
    #[arg(long)]
    seed: Vec<PathBuf>,
    /// Events kept for watches resuming from a resourceVersion (older: 410 Expired).
    #[arg(long, default_value_t = fledge_testkit::fake_api::DEFAULT_HISTORY_LIMIT)]
    history_limit: usize,
    /// Requests kept in the in-memory log (all are counted at /__fake/request-tallies).
    #[arg(long)]
    request_log_limit: Option<usize>,
}

fn kubeconfig(server: &str, namespace: &str, token: &str) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
  - name: fake
    cluster: {{server: \"{server}\"}}
users:
  - name: fake
    user: {{token: \"{token}\"}}
contexts:
  - name: fake
    context: {{cluster: fake, user: fake, namespace: \"{namespace}\"}}
current-context: fake
"
    )
}

/// Write `status` to the object `created` (whose resource does or does not have a status
/// subresource: either way the stored object ends up with it).
fn seed_status(
    server: &FakeApiServer,
    created: &serde_json::Value,
    status: serde_json::Value,
) -> Result<()> {
    let text = |pointer: &str| created.pointer(pointer).and_then(|v| v.as_str());
    let group = text("/apiVersion")
        .and_then(|v| v.rsplit_once('/'))
        .map(|(group, _)| group)
        .unwrap_or_default();
    let plural = match text("/kind") {
        Some("Canary") => "canaries",
        Some("VirtualService") => "virtualservices",
        Some("DestinationRule") => "destinationrules",
        other => anyhow::bail!("a status can be seeded for Canaries, VirtualServices and DestinationRules, not {other:?}"),
    };
    server
        .set_status(
            group,
            plural,
            text("/metadata/namespace").unwrap_or("default"),
            text("/metadata/name").unwrap_or_default(),
            status,
        )
        .map(drop)
        .map_err(anyhow::Error::msg)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    let mut server = FakeApiServer::new().with_history_limit(args.history_limit);
    if let Some(limit) = args.request_log_limit {
        server = server.with_request_log_limit(limit);
    }
    for seed in &args.seed {
        let text = std::fs::read_to_string(seed)
            .with_context(|| format!("reading --seed {}", seed.display()))?;
        let objects: Vec<serde_json::Value> = serde_json::from_str(&text)
            .with_context(|| format!("--seed {} is not a JSON array", seed.display()))?;
        for object in objects {
            let status = object.get("status").cloned();
            let created = server
                .try_create(object)
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("creating an object of --seed {}", seed.display()))?;
            if let Some(status) = status {
                seed_status(&server, &created, status)
                    .with_context(|| format!("writing a status of --seed {}", seed.display()))?;
            }
        }
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let address = format!("http://{}", listener.local_addr()?);
    std::fs::write(
        &args.kubeconfig,
        kubeconfig(&address, &args.namespace, &args.token),
    )
    .with_context(|| format!("writing {}", args.kubeconfig.display()))?;
    println!("listening on {address}");
    let shutdown = async {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => return,
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    server.serve_http(listener, shutdown).await?;
    Ok(())
}
