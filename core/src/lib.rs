//! # fledge-core — the pure heart of Fledge
//!
//! Everything that decides lives here, with no I/O, no async and no clock of its own, so the
//! controller, the tests, the simulation benchmark and the browser simulator all run exactly the
//! same code. Data flows through it like this:
//!
//! ```text
//! filter (Wasm) ──writes──▶ metrics named by `contract` ──scraped by controller──▶ `observe::Observation`
//!                                                                                   │
//!  `spec::Canary` (validated) ─────────────────────────────────────────────────┐     ▼
//!                                                  `rollout::step(spec, status, input, now)`
//!                                                                 │   uses `analysis::evaluate`
//!                                                                 ▼
//!                                                 (new `CanaryStatus`, `Vec<Action>`)
//! ```
//!
//! - [`contract`]: metric names, label keys, response classes — shared by filter and controller.
//! - [`filter_config`]: the filter's plugin configuration schema and its validation.
//! - [`observe`]: per-subset traffic, latency histograms, cumulative → per-interval deltas.
//! - [`duration`]: human durations (`30s`, `2m`) used in specs.
//! - [`spec`]: the Canary spec and its validation (errors name the field and the fix).
//! - [`router_spec`]: the Gateway API router's spec and the testers' match conditions.
//! - [`analysis`]: judging one interval's observation against the spec's metrics.
//! - [`rollout`]: the state machine.
//! - [`webhook`]: the spec's webhooks (hook points) and their validation.
//! - [`workload`]: the workload lifecycle (Kubernetes mode with `targetRef`): the primary copy,
//!   scaling a new revision up, promotion by copying its template, rollback, deadlines.
//! - [`warning`]: what a valid spec or a running rollout does not check, with the field and fix.

#![forbid(unsafe_code)]

pub mod analysis;
pub mod contract;
pub mod duration;
pub mod filter_config;
mod names;
pub mod observe;
pub mod rollout;
pub mod router_spec;
pub mod sequential;
pub mod spec;
pub mod warning;
pub mod webhook;
pub mod workload;
