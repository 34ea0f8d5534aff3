//! `fledge-testbackend` — a small HTTP backend that plays one version of an application in
//! end-to-end tests and the demo.
//!
//! Every request (any method, any path) is answered after `--latency-ms` (or `--slow-ms` for a
//! `--slow-fraction` of requests), with status 500 for an `--error-rate` fraction and 200
//! otherwise; every response carries `x-backend-version: NAME` and a body naming the version.
//! Which requests fail or are slow is drawn from a deterministic sequence seeded by `--seed`.
//! `GET /__backend/stats` returns `{"version":..,"served":N,"errors":E,"lastServedUnixMs":..,
//! "firstErrorUnixMs":..,"errorRate":..}` and is not counted (`firstErrorUnixMs` is the first
//! injected error since start or since the error rate last changed).
//! `POST /__backend/error-rate?rate=R` changes the error rate now and answers
//! `{"changedAtUnixMs":..}`, so a test knows the instant a canary starts failing.
//! `/__backend/echo?status=S&bytes=N&seed=K` (any method) answers status `S` with a body that
//! echoes the method, path, request headers (sorted, without `host`) and a hash of the request
//! body, followed by `N` deterministic bytes from `K` (no body at all for 204 and 304):
//! identical requests get identical responses, whichever proxy sent them. It is counted as
//! served.
//! `GET /__backend/ready` is its readiness probe: 200 once `--ready-after-ms` passed since
//! start, 503 before that and always with `--never-ready` (not counted). With `--pod NAME`,
//! every response also carries `x-backend-pod: NAME` (the e2e kubelet stand-in runs one process
//! per pod).
//! SIGTERM or Ctrl-C stops it gracefully.

#![forbid(unsafe_code)]

use anyhow::{bail, Context, Result};
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Json, Router};
use clap::Parser;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Debug, Parser)]
#[command(
    name = "fledge-testbackend",
    about = "HTTP backend for Fledge end-to-end tests"
)]
struct Args {
    /// Address to listen on (127.0.0.1 only in tests).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Version name reported in `x-backend-version` and in the body.
    #[arg(long = "version", default_value = "v1")]
    version_name: String,
    /// Fraction of requests answered with 500 (0.0..=1.0).
    #[arg(long, default_value_t = 0.0)]
    error_rate: f64,
    /// Base latency of every request, in milliseconds.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Fraction of requests that take `--slow-ms` instead (0.0..=1.0).
    #[arg(long, default_value_t = 0.0)]
    slow_fraction: f64,
    /// Latency of slow requests, in milliseconds.
    #[arg(long, default_value_t = 0)]
    slow_ms: u64,
    /// Seed of the error and slowness draws.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The pod this process plays, sent as `x-backend-pod`.
    #[arg(long)]
    pod: Option<String>,
    /// The readiness probe never succeeds.
    #[arg(long)]
    never_ready: bool,
    /// The readiness probe succeeds only this long after start.
    #[arg(long, default_value_t = 0)]
    ready_after_ms: u64,
}

struct Behaviour {
    version: String,
    version_header: HeaderValue,
    pod_header: Option<HeaderValue>,
    /// When the readiness probe starts to succeed (`None`: never).
    ready_at: Option<std::time::Instant>,
    latency: Duration,
    slow_fraction: f64,
    slow_latency: Duration,
    seed: u64,
}

struct AppState {
    behaviour: Behaviour,
    served: AtomicU64,
    errors: AtomicU64,
    /// The current error rate (`f64` bits): `--error-rate`, or the last `POST /__backend/error-rate`.
    error_rate_bits: AtomicU64,
    /// Unix ms of the last request served (0: none yet).
    last_served_unix_ms: AtomicU64,
    /// Unix ms of the first injected error since start or the last error-rate change (0: none).
    first_error_unix_ms: AtomicU64,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// SplitMix64: a tiny, good-enough mixer so request `n` always draws the same numbers.
fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// A uniform draw in [0, 1) for request `index`, stream `stream`.
fn draw(seed: u64, index: u64, stream: u64) -> f64 {
    let bits = splitmix64(seed ^ splitmix64(index.wrapping_mul(2).wrapping_add(stream)));
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

async fn serve_request(State(state): State<Arc<AppState>>) -> Response {
    let index = state.served.fetch_add(1, Ordering::Relaxed);
    let behaviour = &state.behaviour;
    let slow = draw(behaviour.seed, index, 1) < behaviour.slow_fraction;
    let delay = if slow {
        behaviour.slow_latency
    } else {
        behaviour.latency
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let error_rate = f64::from_bits(state.error_rate_bits.load(Ordering::Relaxed));
    let fail = draw(behaviour.seed, index, 0) < error_rate;
    let now = unix_ms();
    state.last_served_unix_ms.fetch_max(now, Ordering::Relaxed);
    let (status, body) = if fail {
        state.errors.fetch_add(1, Ordering::Relaxed);
        let _ = state.first_error_unix_ms.compare_exchange(
            0,
            now,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("injected error from version {}\n", behaviour.version),
        )
    } else {
        (
            StatusCode::OK,
            format!("hello from version {}\n", behaviour.version),
        )
    };
    let mut response = (status, body).into_response();
    response
        .headers_mut()
        .insert("x-backend-version", behaviour.version_header.clone());
    if let Some(pod) = &behaviour.pod_header {
        response.headers_mut().insert("x-backend-pod", pod.clone());
    }
    response
}

/// `GET /__backend/ready`: the readiness probe.
async fn ready(State(state): State<Arc<AppState>>) -> Response {
    match state.behaviour.ready_at {
        Some(at) if std::time::Instant::now() >= at => (StatusCode::OK, "ready\n").into_response(),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response(),
    }
}

async fn stats(State(state): State<Arc<AppState>>) -> Response {
    let mut response = Json(serde_json::json!({
        "version": state.behaviour.version,
        "served": state.served.load(Ordering::Relaxed),
        "errors": state.errors.load(Ordering::Relaxed),
        "lastServedUnixMs": state.last_served_unix_ms.load(Ordering::Relaxed),
        "firstErrorUnixMs": state.first_error_unix_ms.load(Ordering::Relaxed),
        "errorRate": f64::from_bits(state.error_rate_bits.load(Ordering::Relaxed)),
        "pod": state.behaviour.pod_header.as_ref().and_then(|p| p.to_str().ok()),
    }))
    .into_response();
    response
        .headers_mut()
        .insert("x-backend-version", state.behaviour.version_header.clone());
    response
}

#[derive(Debug, serde::Deserialize)]
struct ErrorRateQuery {
    rate: f64,
}

/// `POST /__backend/error-rate?rate=R`: fail a fraction `R` of requests from now on.
async fn set_error_rate(
    State(state): State<Arc<AppState>>,
    Query(query): Query<ErrorRateQuery>,
) -> Response {
    if !(0.0..=1.0).contains(&query.rate) {
        return (
            StatusCode::BAD_REQUEST,
            format!("rate must be between 0 and 1, got {}\n", query.rate),
        )
            .into_response();
    }
    state.first_error_unix_ms.store(0, Ordering::Relaxed);
    state
        .error_rate_bits
        .store(query.rate.to_bits(), Ordering::Relaxed);
    let changed = unix_ms();
    tracing::info!(
        rate = query.rate,
        changed_at_unix_ms = changed,
        "error rate changed"
    );
    Json(serde_json::json!({"changedAtUnixMs": changed, "errorRate": query.rate})).into_response()
}

#[derive(Debug, serde::Deserialize)]
struct EchoQuery {
    #[serde(default = "default_echo_status")]
    status: u16,
    #[serde(default)]
    bytes: usize,
    #[serde(default)]
    seed: u64,
}

fn default_echo_status() -> u16 {
    200
}

/// Largest deterministic payload `/__backend/echo` sends.
const MAX_ECHO_BYTES: usize = 4 << 20;

/// `/__backend/echo`: a response that depends only on the request (see the module docs).
async fn echo(
    State(state): State<Arc<AppState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Query(query): Query<EchoQuery>,
    body: Bytes,
) -> Response {
    state.served.fetch_add(1, Ordering::Relaxed);
    state
        .last_served_unix_ms
        .fetch_max(unix_ms(), Ordering::Relaxed);
    let mut lines: Vec<String> = headers
        .iter()
        .filter(|(name, _)| name.as_str() != "host")
        .map(|(name, value)| format!("{name}: {}", String::from_utf8_lossy(value.as_bytes())))
        .collect();
    lines.sort();
    let body_hash = body.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    let mut out = format!(
        "{method} {uri}\nversion: {}\nbody: {} bytes, fnv {body_hash:016x}\n{}\n\n",
        state.behaviour.version,
        body.len(),
        lines.join("\n")
    )
    .into_bytes();
    let mut x = query.seed;
    for _ in 0..query.bytes.min(MAX_ECHO_BYTES) {
        x = splitmix64(x);
        out.push(x as u8);
    }
    let status = StatusCode::from_u16(query.status).unwrap_or(StatusCode::IM_A_TEAPOT);
    if status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        // These carry no body (a proxy rejects one).
        out.clear();
    }
    let mut response = (status, out).into_response();
    response
        .headers_mut()
        .insert("x-backend-version", state.behaviour.version_header.clone());
    response
}

async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = terminate => tracing::info!("SIGTERM received, shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("Ctrl-C received, shutting down"),
    }
}

fn validate(args: &Args) -> Result<()> {
    for (flag, value) in [
        ("--error-rate", args.error_rate),
        ("--slow-fraction", args.slow_fraction),
    ] {
        if !(0.0..=1.0).contains(&value) {
            bail!("{flag} must be between 0 and 1, got {value}");
        }
    }
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
    let args = Args::parse();
    validate(&args)?;
    let behaviour = Behaviour {
        version_header: HeaderValue::from_str(&args.version_name).with_context(|| {
            format!(
                "--version {:?} is not a valid header value",
                args.version_name
            )
        })?,
        version: args.version_name.clone(),
        pod_header: match &args.pod {
            Some(pod) => Some(
                HeaderValue::from_str(pod)
                    .with_context(|| format!("--pod {pod:?} is not a valid header value"))?,
            ),
            None => None,
        },
        ready_at: (!args.never_ready)
            .then(|| std::time::Instant::now() + Duration::from_millis(args.ready_after_ms)),
        latency: Duration::from_millis(args.latency_ms),
        slow_fraction: args.slow_fraction,
        slow_latency: Duration::from_millis(args.slow_ms),
        seed: args.seed,
    };
    let state = Arc::new(AppState {
        behaviour,
        served: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        error_rate_bits: AtomicU64::new(args.error_rate.to_bits()),
        last_served_unix_ms: AtomicU64::new(0),
        first_error_unix_ms: AtomicU64::new(0),
    });
    let app = Router::new()
        .route("/__backend/stats", get(stats))
        .route("/__backend/ready", get(ready))
        .route("/__backend/error-rate", post(set_error_rate))
        .route("/__backend/echo", any(echo))
        .fallback(serve_request)
        .with_state(Arc::clone(&state));
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    tracing::info!(
        listen = %args.listen,
        version = %args.version_name,
        error_rate = args.error_rate,
        latency_ms = args.latency_ms,
        slow_fraction = args.slow_fraction,
        slow_ms = args.slow_ms,
        seed = args.seed,
        "test backend listening"
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("serving")?;
    tracing::info!(
        served = state.served.load(Ordering::Relaxed),
        errors = state.errors.load(Ordering::Relaxed),
        "test backend stopped"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_are_uniform_enough_and_deterministic() {
        let n = 20_000u64;
        let below = (0..n).filter(|i| draw(7, *i, 0) < 0.2).count() as f64 / n as f64;
        assert!((0.18..0.22).contains(&below), "got {below}");
        assert_eq!(draw(7, 42, 0), draw(7, 42, 0));
        assert_ne!(draw(7, 42, 0), draw(7, 42, 1));
        assert_ne!(draw(7, 42, 0), draw(8, 42, 0));
    }
}
