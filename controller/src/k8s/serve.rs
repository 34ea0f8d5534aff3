//! `fledge controller`: the Kubernetes controller process — probes, dashboard and self-metrics,
//! leader election, reconciles, graceful shutdown.
//!
//! ```text
//!  SIGTERM ──▶ shutdown ──▶ Controller stops taking work, in-flight reconciles finish
//!                              ──▶ Lease released ──▶ HTTP server stops ──▶ exit 0
//! ```
//!
//! One HTTP server on `--listen` serves:
//! - `/healthz` while the process runs; `/readyz` once started, saying whether this instance
//!   leads (standby replicas are ready too: they are healthy spares);
//! - the same read-only API, dashboard and decision simulator as `fledge run` (canaries named
//!   `namespace/name`; the leader shows them, a standby says it is one), and `/metrics`
//!   (prometheus-client: weights, phases, analyses, decisions, webhook calls, errors).
//!
//! Commands are not taken over HTTP here: in a cluster they are annotations on the Canary
//! (`fledge promote NAME --kubernetes`), so the API server's RBAC decides who may steer.

use super::clock::{Clock, SystemClock};
use super::factory::{Backends, DefaultBackends};
use super::lease::LeaseSettings;
use super::reconciler::{run, Clients, ControllerOptions};
use super::shard::{self, Shard};
use super::throttle::ThrottleLayer;
use super::{Error, Result};
use crate::api::{CommandPolicy, KUBERNETES_COMMANDS};
use crate::runner::Registry;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// How often analysis progress alone is written to a Canary's `.status` by default (each
/// Canary at a spread moment between one and two of these after its last write).
pub const DEFAULT_STATUS_CHECKPOINT: Duration = Duration::from_secs(300);

/// Default client-side limit on API requests per second (Argo Rollouts: 40), and the burst
/// above it (Argo Rollouts: 80).
pub const DEFAULT_API_QPS: f64 = 50.0;
pub const DEFAULT_API_BURST: u32 = 100;

/// Everything `fledge controller` is told on its command line (and by the Downward API).
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub controller: ControllerOptions,
    pub listen: SocketAddr,
    /// API requests per second (client side, leader election aside).
    pub api_qps: f64,
    /// Requests allowed above `api_qps` after a quiet while.
    pub api_burst: u32,
    /// Canaries with self-metrics series of their own (see [`crate::telemetry`]).
    pub canary_series_limit: usize,
}

/// How one instance scales: what it owns and how it talks to the API server.
#[derive(Debug, Clone, Default)]
pub struct ScaleArgs {
    pub shard: Option<Shard>,
    pub selector: Option<String>,
    pub status_checkpoint: Option<Duration>,
    pub api_qps: Option<f64>,
    pub api_burst: Option<u32>,
    pub canary_series_limit: Option<usize>,
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
                status_checkpoint: DEFAULT_STATUS_CHECKPOINT,
                shard: None,
                selector: None,
                shutdown_grace: super::reconciler::SHUTDOWN_GRACE,
            },
            listen,
            api_qps: DEFAULT_API_QPS,
            api_burst: DEFAULT_API_BURST,
            canary_series_limit: crate::telemetry::DEFAULT_CANARY_SERIES_LIMIT,
        }
    }

    /// Apply `--shard`, `--selector`, `--status-checkpoint`, `--kube-api-qps` and
    /// `--kube-api-burst`; a shard or selector gets its own Lease (see [`shard::lease_name`]).
    pub fn scaled(mut self, scale: ScaleArgs) -> Self {
        let controller = &mut self.controller;
        controller.lease.name = shard::lease_name(
            &controller.lease.name,
            scale.shard,
            scale.selector.as_deref(),
        );
        controller.shard = scale.shard;
        controller.selector = scale.selector.filter(|s| !s.trim().is_empty());
        if let Some(checkpoint) = scale.status_checkpoint {
            controller.status_checkpoint = checkpoint;
        }
        if let Some(qps) = scale.api_qps {
            self.api_qps = qps;
        }
        if let Some(burst) = scale.api_burst {
            self.api_burst = burst;
        }
        if let Some(limit) = scale.canary_series_limit {
            self.canary_series_limit = limit;
        }
        self
    }
}

impl ServeOptions {
    /// A Lease valid for `duration` after its last renewal (default 15 s): a new leader takes
    /// over about this long after the last one died. The renew deadline and retry period keep
    /// their default proportions (2/3 and 2/15 of it).
    pub fn with_lease_duration(mut self, duration: Duration) -> Self {
        let lease = &mut self.controller.lease;
        lease.lease_duration = duration;
        lease.renew_deadline = duration * 2 / 3;
        lease.retry_period = (duration * 2 / 15).max(Duration::from_millis(200));
        self
    }
}

/// Run until `signal` completes, then shut down gracefully.
pub async fn run_until(options: ServeOptions, signal: impl Future<Output = ()>) -> Result<()> {
    let unreachable = |e: &dyn std::fmt::Display| {
        Error::Startup(format!(
            "cannot reach the Kubernetes API ({e}); in a pod this uses the ServiceAccount, elsewhere $KUBECONFIG or ~/.kube/config"
        ))
    };
    let config = kube::Config::infer().await.map_err(|e| unreachable(&e))?;
    let throttle = ThrottleLayer::new(options.api_qps, options.api_burst);
    let throttled = kube::client::ClientBuilder::try_from(config.clone())
        .map_err(|e| unreachable(&e))?
        .with_layer(&throttle)
        .build();
    let election = kube::Client::try_from(config).map_err(|e| unreachable(&e))?;
    let clients = Clients {
        api: throttled,
        election,
        budget: Some(throttle.bucket()),
    };
    let listener = tokio::net::TcpListener::bind(options.listen)
        .await
        .map_err(|e| {
            Error::Startup(format!(
                "cannot listen on {} (--listen): {e}",
                options.listen
            ))
        })?;
    serve(
        clients,
        listener,
        options,
        Arc::new(DefaultBackends::default()),
        Arc::new(SystemClock),
        signal,
    )
    .await
}

/// [`run_until`] with its parts given: the API clients, the bound listener, the backends and
/// the clock (tests pass the fake API server's client and scripted backends).
pub async fn serve(
    clients: Clients,
    listener: tokio::net::TcpListener,
    options: ServeOptions,
    backends: Arc<dyn Backends>,
    clock: Arc<dyn Clock>,
    signal: impl Future<Output = ()>,
) -> Result<()> {
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (leader_tx, leader_rx) = watch::channel(false);
    tracing::info!(
        identity = %options.controller.lease.identity,
        lease = %format!("{}/{}", options.controller.lease.namespace, options.controller.lease.name),
        namespace = options.controller.namespace.as_deref().unwrap_or("(all)"),
        shard = %options.controller.shard.map(|s| s.to_string()).unwrap_or_else(|| "(all)".into()),
        selector = options.controller.selector.as_deref().unwrap_or("(all)"),
        api_qps = options.api_qps,
        api_burst = options.api_burst,
        http = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        "fledge controller starting"
    );

    let registry = Registry::with_telemetry(
        crate::telemetry::Telemetry::new().with_canary_limit(options.canary_series_limit),
    );
    let http = crate::api::router_with(
        registry.clone(),
        CommandPolicy::Disabled(KUBERNETES_COMMANDS.to_string()),
    )
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
    let mut http_shutdown = shutdown_rx.clone();
    let server = tokio::spawn(async move {
        axum::serve(listener, http)
            .with_graceful_shutdown(async move {
                let _ = http_shutdown.wait_for(|s| *s).await;
            })
            .await
    });

    let controller = tokio::spawn(run(
        clients,
        options.controller,
        backends,
        clock,
        registry,
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
    let _ = server.await;
    result.map_err(|e| Error::Startup(format!("controller task failed: {e}")))?
}
