//! # fledge-filter — per-subset request metrics and canary tagging from inside Envoy
//!
//! A proxy-wasm HTTP filter for Envoy/Istio gateways, built as two modules from this crate
//! (see [`module`]): `fledge_filter.wasm` (metrics, canary tagging, the data-plane guard) and
//! the metrics-only `fledge_observer.wasm`, which exports only the callbacks metrics need. For
//! every finished request it counts the response class and the duration, labelled by the
//! `(service, subset)` that served it; the Fledge controller reads these from
//! `/stats/prometheus` to judge a canary against its stable version. Names and label keys come
//! from [`fledge_core::contract`]; the configuration schema from [`fledge_core::filter_config`].
//!
//! ```text
//! on_configure:  plugin config JSON ──FilterConfig::parse_for(module)──▶ Plugin per root context
//!                (bad: log, +1 fledge_config_errors_total, keep previous/defaults; always `true`)
//!                configured clusters ──define_metric (22 counters each)──▶ cached ids; 1 s tick
//! context create: the clock (the stream's start) into a slot of a fixed ring
//! request hdrs:  (full) forced-canary header? (token / source CIDR) ── strip; trusted → canary
//!                sticky key? ── FNV-1a bucket → route = <bucket>;  else strip client's route hdr
//!                guard tripped? ── guard header = <tripped services> (→ stable); else strip it
//! response hdrs: (full) bodiless? grpc-status; responseHeader ← subset (resolves the pair)
//! response body: (both; every chunk, no hostcall) end of stream after data → complete
//! trailers:      (both; only responses with trailers) grpc-status
//! on_log:        xds.cluster_name ──MetricCache::pair_for──▶ pair (name, else endpoint
//!                metadata / subset header; bounded); :status (with clusterHeader: the response
//!                headers in one read give the cluster and :status); response.code_details unless
//!                the response was seen complete below 400; the clock ──▶ class and duration
//!                counted in the VM; guarded canary? ── would trip → merge into shared data now
//! on_tick:       every root's counts ──increment──▶ fledge_requests_total{service,subset,class},
//!                fledge_request_duration_ms_{bucket,sum,count} (every 1 s); guards (100 ms):
//!                merge into the shared window (CAS), learn trips ──▶ fledge_guard_tripped
//! ```
//!
//! Only the `host` module (compiled for `wasm32` only) makes hostcalls and exports callbacks;
//! [`module`], [`plugin`], [`metrics`], [`tagging`] and [`guard`] are plain Rust, tested natively
//! against fakes that also pin each module's per-request hostcall list (every hostcall costs
//! Envoy CPU on every request). The filter never rejects or delays traffic, and every failure
//! degrades to "not recorded" or "not tagged".

// The runtime code never panics and never breaks traffic (tests may unwrap: filter/clippy.toml).
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::unreachable
)]

#[cfg(test)]
mod fake;
pub mod guard;
pub mod header_pairs;
pub mod metrics;
pub mod module;
pub mod plugin;
pub mod tagging;

#[cfg(all(
    target_arch = "wasm32",
    feature = "full-module",
    feature = "observer-module"
))]
compile_error!(
    "fledge-filter: features full-module and observer-module both on (cargo unified the \
     features of fledge-filter and fledge-observer): build them in separate cargo invocations, \
     e.g. `make build-filter`"
);

#[cfg(all(
    target_arch = "wasm32",
    any(feature = "full-module", feature = "observer-module")
))]
// The proxy-wasm ABI: `#[no_mangle]` exports and raw hostcalls, each with a SAFETY comment. The
// rest of the crate denies unsafe code (workspace lints).
#[allow(unsafe_code)]
mod host;
