//! `fledge-fake-apiserver` — the controller's in-process fake Kubernetes API server
//! (`fledge_controller::k8s::fake_api`, the one its unit tests use) served over plain HTTP on
//! 127.0.0.1, so end-to-end tests can run the real `fledge controller` and `fledge ... --kubernetes`
//! binaries against it. Test tooling only: no authentication, no TLS, state in memory.
//!
//! ```text
//! fledge-fake-apiserver --listen 127.0.0.1:0 --kubeconfig DIR/kubeconfig --seed objects.json
//! ```
//!
//! `--seed` is a JSON array of objects (Canary, VirtualService, DestinationRule, ...) created
//! before it listens. It writes a kubeconfig naming its address (the user's bearer token is the
//! client identity the server records), prints `listening on http://ADDR`, and serves until
//! SIGTERM or Ctrl-C.

#![forbid(unsafe_code)]

use anyhow::{Context, Result};
use clap::Parser;
use fledge_controller::k8s::fake_api::FakeApiServer;
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

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    let server = FakeApiServer::new();
    for seed in &args.seed {
        let text = std::fs::read_to_string(seed)
            .with_context(|| format!("reading --seed {}", seed.display()))?;
        let objects: Vec<serde_json::Value> = serde_json::from_str(&text)
            .with_context(|| format!("--seed {} is not a JSON array", seed.display()))?;
        for object in objects {
            server
                .try_create(object)
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("creating an object of --seed {}", seed.display()))?;
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
