//! The web dashboard, served by `fledge run` on its `--listen` address: dependency-free HTML,
//! CSS and vanilla JavaScript with inline SVG charts, embedded in the binary.
//!
//! - `/` — the list of canaries (phase, weight bar, step, last reason), and for one canary
//!   (`/#/canary/<name>`) the weight over time, per-subset request rate, success rate and p99
//!   latency charts, the checks of the last analysis, webhooks and the decision log. It polls
//!   the JSON API every 2 s and never sends commands (read-only).
//! - `/simulator` — the decision simulator: `fledge-core` compiled to WebAssembly
//!   (`rollout-sim-web/`), so a pasted Canary spec is decided in the browser by the code the
//!   controller runs. Embedded when `make simulator` has built `rollout-sim-web/pkg` before the
//!   controller (see `controller/build.rs`); otherwise the page says how to build it.
//! - [`series`]: the bounded per-interval time series the runner keeps for the charts.

mod latency_code;
pub mod series;

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

const INDEX_HTML: &str = include_str!("assets/index.html");
const SIMULATOR_HTML: &str = include_str!("assets/simulator.html");
const APP_JS: &str = include_str!("assets/app.js");
const SIMULATOR_JS: &str = include_str!("assets/simulator.js");
const CHARTS_JS: &str = include_str!("assets/charts.js");
const STYLE_CSS: &str = include_str!("assets/style.css");

#[cfg(fledge_rollout_sim_web)]
const SIMULATOR_WASM: Option<&[u8]> = Some(include_bytes!(concat!(
    env!("FLEDGE_ROLLOUT_SIM_WEB_PKG"),
    "/fledge_rollout_sim_web_bg.wasm"
)));
#[cfg(fledge_rollout_sim_web)]
const SIMULATOR_GLUE: Option<&str> = Some(include_str!(concat!(
    env!("FLEDGE_ROLLOUT_SIM_WEB_PKG"),
    "/fledge_rollout_sim_web.js"
)));
#[cfg(not(fledge_rollout_sim_web))]
const SIMULATOR_WASM: Option<&[u8]> = None;
#[cfg(not(fledge_rollout_sim_web))]
const SIMULATOR_GLUE: Option<&str> = None;

/// Whether the WebAssembly simulator is embedded in this binary.
pub fn simulator_available() -> bool {
    SIMULATOR_WASM.is_some() && SIMULATOR_GLUE.is_some()
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

fn not_built() -> Response {
    (
        StatusCode::NOT_FOUND,
        "the decision simulator is not in this build: run `make simulator`, then rebuild fledge",
    )
        .into_response()
}

/// The dashboard's routes (stateless: the pages read the JSON API).
pub fn routes() -> Router {
    Router::new()
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/simulator",
            get(|| async { asset("text/html; charset=utf-8", SIMULATOR_HTML) }),
        )
        .route(
            "/ui/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/ui/charts.js",
            get(|| async { asset("text/javascript; charset=utf-8", CHARTS_JS) }),
        )
        .route(
            "/ui/simulator.js",
            get(|| async { asset("text/javascript; charset=utf-8", SIMULATOR_JS) }),
        )
        .route(
            "/ui/style.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE_CSS) }),
        )
        .route(
            "/ui/pkg/fledge_rollout_sim_web.js",
            get(|| async {
                match SIMULATOR_GLUE {
                    Some(glue) => asset("text/javascript; charset=utf-8", glue),
                    None => not_built(),
                }
            }),
        )
        .route(
            "/ui/pkg/fledge_rollout_sim_web_bg.wasm",
            get(|| async {
                match SIMULATOR_WASM {
                    Some(wasm) => (
                        [
                            (header::CONTENT_TYPE, "application/wasm"),
                            (header::CACHE_CONTROL, "no-cache"),
                        ],
                        wasm,
                    )
                        .into_response(),
                    None => not_built(),
                }
            }),
        )
}
