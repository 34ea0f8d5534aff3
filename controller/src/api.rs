//! The HTTP server on `--listen`: canary status as JSON, operator commands, the dashboard and
//! the controller's own metrics.
//!
//! - `GET  /api/v1/canaries`                  every canary's status (without the time series)
//! - `GET  /api/v1/canaries/{name}`           one canary, with `series` (per-interval traffic)
//! - `POST /api/v1/canaries/{name}/promote`   continue past an indefinite pause
//!   (`?full=true`: skip the remaining steps and promote now)
//! - `POST /api/v1/canaries/{name}/abort`     roll back now
//! - `POST /api/v1/canaries/{name}/pause`     hold at the current step (analysis continues)
//! - `POST /api/v1/canaries/{name}/resume`    undo `pause`
//! - `POST /api/v1/canaries/{name}/retry`     start a rolled-back rollout again
//! - `GET  /api/v1/info`                      version, and whether commands are accepted
//! - `GET  /metrics`                          self-metrics (OpenMetrics text)
//! - `GET  /`, `/simulator`, `/ui/*`          the dashboard (read-only) and decision simulator
//! - `GET  /healthz`
//!
//! **Commands are guarded.** They are accepted only when [`CommandPolicy::Enabled`]: `fledge
//! run` enables them when it listens on a loopback address (anyone who can reach 127.0.0.1
//! can already touch the state files) and disables them on any other address unless started
//! with `--allow-remote-commands`; `--read-only` disables them everywhere. A refused command is
//! `403` with the reason. Browsers are kept out too: a `POST` whose `Origin` header does not
//! name this server is `403`, so a web page elsewhere cannot steer a rollout through the
//! operator's browser (the dashboard itself never sends commands).

use crate::runner::{CommandError, Registry};
use crate::{dashboard, telemetry};
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use fledge_core::rollout::Command;
use serde::Deserialize;
use serde_json::json;

/// Whether operator commands (`POST`) are accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandPolicy {
    Enabled,
    /// Refused, with the reason shown to the client.
    Disabled(String),
}

impl CommandPolicy {
    /// The policy for a server on `listen`: enabled on loopback (or when remote commands are
    /// allowed), disabled by `read_only`.
    pub fn for_listen(listen: std::net::SocketAddr, read_only: bool, allow_remote: bool) -> Self {
        if read_only {
            CommandPolicy::Disabled(
                "commands are disabled: fledge run was started with --read-only".into(),
            )
        } else if listen.ip().is_loopback() || allow_remote {
            CommandPolicy::Enabled
        } else {
            CommandPolicy::Disabled(format!(
                "commands are disabled: fledge run listens on {listen}, not on a loopback address; start it with --allow-remote-commands to accept them"
            ))
        }
    }
}

/// How commands reach a Canary in Kubernetes mode (shown where this server refuses them).
pub const KUBERNETES_COMMANDS: &str = "in Kubernetes mode commands are annotations on the Canary, so the API server's RBAC decides who may steer a rollout: run `fledge promote NAME --kubernetes -n NAMESPACE` (or abort, pause, resume, retry), or `kubectl annotate canary NAME fledge.dev/promote=\"$(date +%s)\" --overwrite`";

#[derive(Clone)]
struct AppState {
    registry: Registry,
    commands: CommandPolicy,
}

/// The API with commands enabled (as on a loopback address).
pub fn router(registry: Registry) -> Router {
    router_with(registry, CommandPolicy::Enabled)
}

/// The API, dashboard and `/metrics`, with the given command policy.
pub fn router_with(registry: Registry, commands: CommandPolicy) -> Router {
    let state = AppState { registry, commands };
    let commands_routes = Router::new()
        .route("/api/v1/canaries/{name}/promote", post(promote))
        .route("/api/v1/canaries/{name}/abort", post(abort))
        .route("/api/v1/canaries/{name}/pause", post(pause))
        .route("/api/v1/canaries/{name}/resume", post(resume))
        .route("/api/v1/canaries/{name}/retry", post(retry))
        .route_layer(middleware::from_fn_with_state(state.clone(), guard));
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/api/v1/canaries", get(list))
        .route("/api/v1/canaries/{name}", get(one))
        .route("/api/v1/info", get(info))
        .route("/metrics", get(metrics))
        .merge(commands_routes)
        .with_state(state)
        .merge(dashboard::routes())
}

fn error(status: StatusCode, message: String) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

/// `true` when the request's `Origin` (if any) is this server itself.
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true; // not a browser (curl, the fledge CLI)
    };
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let origin = origin.to_str().ok();
    match (origin, host) {
        (Some(origin), Some(host)) => {
            let without_scheme = origin
                .strip_prefix("http://")
                .or_else(|| origin.strip_prefix("https://"));
            without_scheme == Some(host)
        }
        _ => false,
    }
}

async fn guard(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if let CommandPolicy::Disabled(reason) = &state.commands {
        return error(StatusCode::FORBIDDEN, reason.clone());
    }
    if !same_origin(request.headers()) {
        return error(
            StatusCode::FORBIDDEN,
            "cross-origin command refused: send commands with the fledge CLI or curl".into(),
        );
    }
    next.run(request).await
}

async fn list(State(state): State<AppState>) -> Response {
    let views: Vec<_> = state
        .registry
        .list()
        .into_iter()
        .map(|mut view| {
            view.series.clear();
            view
        })
        .collect();
    Json(views).into_response()
}

async fn one(State(state): State<AppState>, Path(name): Path<String>) -> Response {
    match state.registry.get(&name) {
        Some(view) => Json(view).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("no canary named {name:?}")),
    }
}

async fn info(State(state): State<AppState>) -> Response {
    let (commands, reason) = match &state.commands {
        CommandPolicy::Enabled => (true, None),
        CommandPolicy::Disabled(reason) => (false, Some(reason.clone())),
    };
    Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "commands": commands,
        "commandsDisabledReason": reason,
        "simulator": dashboard::simulator_available(),
        "note": state.registry.note(),
    }))
    .into_response()
}

async fn metrics(State(state): State<AppState>) -> Response {
    match state.registry.telemetry().encode() {
        Ok(text) => ([(header::CONTENT_TYPE, telemetry::CONTENT_TYPE)], text).into_response(),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode metrics: {e}"),
        ),
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
        Err(CommandError::NotHere) => error(
            StatusCode::FORBIDDEN,
            format!("canary {name:?} is not steered through this server: {KUBERNETES_COMMANDS}"),
        ),
        Err(CommandError::Busy) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("canary {name:?} has commands queued; try again in a moment"),
        ),
    }
}

#[derive(Debug, Deserialize)]
struct PromoteQuery {
    #[serde(default)]
    full: bool,
}

async fn promote(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(query): Query<PromoteQuery>,
) -> Response {
    let which = if query.full {
        Command::PromoteFull
    } else {
        Command::Promote
    };
    command(&state.registry, &name, which)
}

async fn abort(State(state): State<AppState>, Path(name): Path<String>) -> Response {
    command(&state.registry, &name, Command::Abort)
}

async fn pause(State(state): State<AppState>, Path(name): Path<String>) -> Response {
    command(&state.registry, &name, Command::Pause)
}

async fn resume(State(state): State<AppState>, Path(name): Path<String>) -> Response {
    command(&state.registry, &name, Command::Resume)
}

async fn retry(State(state): State<AppState>, Path(name): Path<String>) -> Response {
    command(&state.registry, &name, Command::Retry)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request as HttpRequest;
    use tower::ServiceExt;

    async fn send(app: Router, request: HttpRequest<Body>) -> (StatusCode, String) {
        let response = app.oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, String::from_utf8_lossy(&bytes).into_owned())
    }

    fn post(uri: &str) -> axum::http::request::Builder {
        HttpRequest::builder()
            .method("POST")
            .uri(uri)
            .header(header::HOST, "127.0.0.1:9090")
    }

    #[tokio::test]
    async fn commands_are_refused_when_disabled_and_from_other_origins() {
        let disabled = router_with(
            Registry::default(),
            CommandPolicy::for_listen("0.0.0.0:9090".parse().unwrap(), false, false),
        );
        let (status, body) = send(
            disabled,
            post("/api/v1/canaries/app/abort")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert!(body.contains("--allow-remote-commands"), "{body}");

        let enabled = router(Registry::default());
        let (status, body) = send(
            enabled.clone(),
            post("/api/v1/canaries/app/abort")
                .header(header::ORIGIN, "http://evil.example")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
        // Same origin, or no Origin at all (CLI, curl): reaches the registry (no such canary).
        for origin in [Some("http://127.0.0.1:9090"), None] {
            let mut request = post("/api/v1/canaries/app/pause?x=1");
            if let Some(origin) = origin {
                request = request.header(header::ORIGIN, origin);
            }
            let (status, body) = send(enabled.clone(), request.body(Body::empty()).unwrap()).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
        }
    }

    #[test]
    fn policy_follows_the_listen_address() {
        let loopback = "127.0.0.1:9090".parse().unwrap();
        let anywhere = "0.0.0.0:9090".parse().unwrap();
        assert_eq!(
            CommandPolicy::for_listen(loopback, false, false),
            CommandPolicy::Enabled
        );
        assert_eq!(
            CommandPolicy::for_listen(anywhere, false, true),
            CommandPolicy::Enabled
        );
        assert!(matches!(
            CommandPolicy::for_listen(loopback, true, true),
            CommandPolicy::Disabled(reason) if reason.contains("--read-only")
        ));
    }

    #[tokio::test]
    async fn serves_metrics_info_and_the_dashboard() {
        let app = router(Registry::default());
        let get = |uri: &str| HttpRequest::get(uri).body(Body::empty()).unwrap();
        let (status, body) = send(app.clone(), get("/metrics")).await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains("# TYPE fledge_info gauge"), "{body}");
        let (status, body) = send(app.clone(), get("/api/v1/info")).await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains("\"commands\":true"), "{body}");
        let (status, body) = send(app.clone(), get("/")).await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains("<title>Fledge"), "{body}");
        let (status, _) = send(app, get("/api/v1/canaries")).await;
        assert_eq!(status, StatusCode::OK);
    }
}
