//! # fledge-filter — per-subset request metrics and canary tagging from inside Envoy
//!
//! A proxy-wasm HTTP filter for Envoy/Istio gateways. For every finished request it records,
//! labelled by the `(service, subset)` that served it, a request counter by response class and a
//! duration histogram; the Fledge controller reads these from `/stats/prometheus` to judge a
//! canary against its stable version. It can also tag traffic: the serving subset in a response
//! header, a forced-canary header for trusted testers, sticky buckets for users. Names and label
//! keys come from [`fledge_core::contract`]; the configuration schema from
//! [`fledge_core::filter_config`].
//!
//! ```text
//! on_configure:  plugin config JSON ──FilterConfig::parse──▶ Plugin { config, MetricCache }
//!                (bad: log, +1 fledge_config_errors_total, keep previous/defaults; always `true`)
//!                configured clusters ──define_metric ×7 each──▶ cached ids; 1 s tick
//! request hdrs:  forced-canary header? (token / source CIDR) ── strip; trusted → route = canary
//!                sticky key? ── FNV-1a bucket → route = <bucket>;  else strip client's route hdr
//!                guard tripped? ── guard header = <tripped services> (→ stable); else strip it
//! response hdrs: :status; grpc-status if bodiless; responseHeader ← subset (resolves the pair)
//! body/trailers: end of stream seen?  grpc-status from trailers
//! on_log:        xds.cluster_name ──MetricCache::pair_for──▶ pair (name, else endpoint
//!                metadata / subset header; bounded) ; class from status (+ code_details only
//!                for >= 400 or cut-off responses) ; duration from the clock
//!                ──▶ record fledge_request_duration_ms ; count into a batch
//!                guarded canary? ── count locally; would trip → merge into shared data now
//! on_tick:       batched counts ──increment──▶ fledge_requests_total{service,subset,class}
//!                (every 1 s); guards (every 100 ms): merge counts into the shared window (CAS),
//!                learn other workers' trips ──▶ fledge_guard_tripped{service}
//! ```
//!
//! Only the `host` module (compiled for `wasm32` only) makes hostcalls; [`plugin`],
//! [`metrics`], [`tagging`] and [`guard`] are plain Rust, tested natively against fakes that also pin the
//! per-request hostcall list (each hostcall costs Envoy about 1 µs of CPU). The filter never
//! rejects or delays traffic, and every failure degrades to "not recorded" or "not tagged".

#[cfg(test)]
mod fake;
pub mod guard;
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
mod host;
