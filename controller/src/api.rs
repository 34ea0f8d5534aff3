//! The HTTP API on `--listen`: canary status as JSON and operator commands.
//!
//! - `GET  /api/v1/canaries`                 every canary's status
//! - `GET  /api/v1/canaries/{name}`          one canary
//! - `POST /api/v1/canaries/{name}/promote`  continue past an indefinite pause
//! - `POST /api/v1/canaries/{name}/abort`    roll back now
//! - `GET  /healthz`

use crate::runner::{CommandError, Registry};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use fledge_core::rollout::Command;
use serde_json::json;

pub fn router(registry: Registry) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/api/v1/canaries", get(list))
        .route("/api/v1/canaries/{name}", get(one))
        .route("/api/v1/canaries/{name}/promote", post(promote))
        .route("/api/v1/canaries/{name}/abort", post(abort))
        .with_state(registry)
}

fn error(status: StatusCode, message: String) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

async fn list(State(registry): State<Registry>) -> Response {
    Json(registry.list()).into_response()
}

async fn one(State(registry): State<Registry>, Path(name): Path<String>) -> Response {
    match registry.get(&name) {
        Some(view) => Json(view).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("no canary named {name:?}")),
    }
}

fn command(registry: &Registry, name: &str, command: Command) -> Response {
    match registry.send(name, command) {
        Ok(()) => (
            StatusCode::ACCEPTED,
            Json(json!({ "accepted": true, "canary": name, "command": command })),
        )
            .into_response(),
        Err(CommandError::NotFound) => {
            error(StatusCode::NOT_FOUND, format!("no canary named {name:?}"))
        }
        Err(CommandError::Finished) => error(
            StatusCode::CONFLICT,
            format!("canary {name:?} has already finished (Promoted or RolledBack)"),
        ),
        Err(CommandError::NotRolledBack) => error(
            StatusCode::CONFLICT,
            format!(
                "canary {name:?} is not rolled back; only a rolled-back rollout can be retried"
            ),
        ),
        Err(CommandError::Busy) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("canary {name:?} has commands queued; try again in a moment"),
        ),
    }
}

async fn promote(State(registry): State<Registry>, Path(name): Path<String>) -> Response {
    command(&registry, &name, Command::Promote)
}

async fn abort(State(registry): State<Registry>, Path(name): Path<String>) -> Response {
    command(&registry, &name, Command::Abort)
}
