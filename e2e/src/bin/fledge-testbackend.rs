//! `fledge-testbackend` — a small HTTP backend that plays one version of an application in
//! end-to-end tests and the demo.
//!
//! Every request (any method, any path) is answered after `--latency-ms` (or `--slow-ms` for a
//! `--slow-fraction` of requests), with status 500 for an `--error-rate` fraction and 200
//! otherwise; every response carries `x-backend-version: NAME` and a body naming the version.
//! Which requests fail or are slow is drawn from a deterministic sequence seeded by `--seed`.
//! `GET /__backend/stats` returns `{"version":..,"served":N,"errors":E}` and is not counted.
//! SIGTERM or Ctrl-C stops it gracefully.

use anyhow::{bail, Context, Result};
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use clap::Parser;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

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
}

struct Behaviour {
    version: String,
    version_header: HeaderValue,
    error_rate: f64,
    latency: Duration,
    slow_fraction: f64,
    slow_latency: Duration,
    seed: u64,
}

struct AppState {
    behaviour: Behaviour,
    served: AtomicU64,
    errors: AtomicU64,
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
    let fail = draw(behaviour.seed, index, 0) < behaviour.error_rate;
    let (status, body) = if fail {
        state.errors.fetch_add(1, Ordering::Relaxed);
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
    response
}

async fn stats(State(state): State<Arc<AppState>>) -> Response {
    let mut response = Json(serde_json::json!({
        "version": state.behaviour.version,
        "served": state.served.load(Ordering::Relaxed),
        "errors": state.errors.load(Ordering::Relaxed),
    }))
    .into_response();
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
        error_rate: args.error_rate,
        latency: Duration::from_millis(args.latency_ms),
        slow_fraction: args.slow_fraction,
        slow_latency: Duration::from_millis(args.slow_ms),
        seed: args.seed,
    };
    let state = Arc::new(AppState {
        behaviour,
        served: AtomicU64::new(0),
        errors: AtomicU64::new(0),
    });
    let app = Router::new()
        .route("/__backend/stats", get(stats))
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
