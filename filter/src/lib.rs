//! # fledge-filter — per-subset request metrics from inside Envoy
//!
//! A proxy-wasm HTTP filter for Envoy/Istio gateways and sidecars. For every finished request
//! it records, labelled by the `(service, subset)` that served it, a request counter by
//! response class and a duration histogram; the Fledge controller reads these from
//! `/stats/prometheus` to judge a canary against its stable version. Names and label keys come
//! from [`fledge_core::contract`]; the configuration schema from [`fledge_core::filter_config`].
//!
//! ```text
//! on_configure: plugin config JSON ──FilterConfig::parse──▶ Plugin { config, MetricCache }
//!               (bad JSON: log, +1 fledge_config_errors_total, keep previous/defaults; always `true`)
//!               configured clusters ──define_metric ×7 each──▶ cached ids
//! on_log:       xds.cluster_name, response.code, response.code_details, request.duration
//!                  ──Finished::from_properties──▶ class (ResponseClass::classify), duration ms
//!                  ──MetricCache::ids_for(cluster bytes)──▶ ids (defined on first sight, bounded)
//!                  ──▶ increment fledge_requests_total{service,subset,class}
//!                      record   fledge_request_duration_ms{service,subset}
//! ```
//!
//! Only the `host` module (compiled for `wasm32` only) makes hostcalls; [`plugin`] and
//! [`metrics`] are plain Rust, tested natively against a fake [`metrics::MetricHost`]. The
//! filter never blocks or alters traffic: it only reads properties after the response is done,
//! and every failure degrades to "not recorded".

pub mod metrics;
pub mod plugin;
pub mod tagging;

#[cfg(target_arch = "wasm32")]
mod host;
