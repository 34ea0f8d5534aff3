//! `fledge controller`: the Kubernetes controller process — probes, leader election,
//! reconciles, graceful shutdown.
//!
//! ```text
//!  SIGTERM ──▶ shutdown ──▶ Controller stops taking work, in-flight reconciles finish
//!                              ──▶ Lease released ──▶ probes server stops ──▶ exit 0
//! ```
//!
//! `/healthz` answers while the process runs; `/readyz` answers once started and says whether
//! this instance leads (standby replicas are ready too: they are healthy spares).

use super::clock::SystemClock;
use super::factory::DefaultBackends;
use super::lease::LeaseSettings;
use super::reconciler::{run, ControllerOptions};
use super::{Error, Result};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Everything `fledge controller` is told on its command line (and by the Downward API).
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub controller: ControllerOptions,
    pub listen: SocketAddr,
}

impl ServeOptions {
    /// Fill the defaults: Lease namespace from `$POD_NAMESPACE` (else `fledge-system`),
    /// identity from `$POD_NAME` (else `$HOSTNAME`, else `fledge`).
    pub fn from_args(
        namespace: Option<String>,
        lease_namespace: Option<String>,
        lease_name: String,
        identity: Option<String>,
        listen: SocketAddr,
    ) -> Self {
        let env = |key: &str| std::env::var(key).ok().filter(|v| !v.is_empty());
        let lease_namespace = lease_namespace
            .or_else(|| env("POD_NAMESPACE"))
            .unwrap_or_else(|| "fledge-system".to_string());
        let identity = identity
            .or_else(|| env("POD_NAME"))
            .or_else(|| env("HOSTNAME"))
            .unwrap_or_else(|| "fledge".to_string());
        ServeOptions {
            controller: ControllerOptions {
                namespace,
                lease: LeaseSettings::new(&lease_namespace, &lease_name, &identity),
                retry_delay: Duration::from_secs(10),
            },
            listen,
        }
    }
}

/// Run until `signal` completes, then shut down gracefully.
pub async fn run_until(options: ServeOptions, signal: impl Future<Output = ()>) -> Result<()> {
    let client = kube::Client::try_default().await.map_err(|e| {
        Error::Startup(format!(
            "cannot reach the Kubernetes API ({e}); in a pod this uses the ServiceAccount, elsewhere $KUBECONFIG or ~/.kube/config"
        ))
    })?;
    let listener = tokio::net::TcpListener::bind(options.listen)
        .await
        .map_err(|e| {
            Error::Startup(format!(
                "cannot listen on {} (--listen): {e}",
                options.listen
            ))
        })?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (leader_tx, leader_rx) = watch::channel(false);
    tracing::info!(
        identity = %options.controller.lease.identity,
        lease = %format!("{}/{}", options.controller.lease.namespace, options.controller.lease.name),
        namespace = options.controller.namespace.as_deref().unwrap_or("(all)"),
        probes = %options.listen,
        "fledge controller starting"
    );

    let probes = axum::Router::new()
        .route("/healthz", axum::routing::get(|| async { "ok" }))
        .route(
            "/readyz",
            axum::routing::get(move || {
                let leader = *leader_rx.borrow();
                async move {
                    if leader {
                        "ok: leader"
                    } else {
                        "ok: standby"
                    }
                }
            }),
        );
    let mut probes_shutdown = shutdown_rx.clone();
    let probes = tokio::spawn(async move {
        axum::serve(listener, probes)
            .with_graceful_shutdown(async move {
                let _ = probes_shutdown.wait_for(|s| *s).await;
            })
            .await
    });

    let controller = tokio::spawn(run(
        client,
        options.controller,
        Arc::new(DefaultBackends),
        Arc::new(SystemClock),
        leader_tx,
        shutdown_rx,
    ));
    tokio::pin!(signal);
    tokio::pin!(controller);
    let result = tokio::select! {
        _ = &mut signal => {
            tracing::info!("shutting down: finishing in-flight reconciles, then releasing the lease");
            shutdown_tx.send_replace(true);
            (&mut controller).await
        }
        finished = &mut controller => {
            shutdown_tx.send_replace(true);
            finished
        }
    };
    let _ = probes.await;
    result.map_err(|e| Error::Startup(format!("controller task failed: {e}")))?
}
