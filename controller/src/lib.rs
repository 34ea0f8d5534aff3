//! # fledge-controller
//!
//! The I/O shell around `fledge-core`. For each canary, [`runner::CanaryTask`] loops (and
//! `fledge controller`'s reconciler does the same through the same [`tick`] and
//! [`router::TrafficRouter`]):
//!
//! ```text
//!  TrafficRouter::ensure (set + verify) ◀── status.canary_weight (level-triggered, every loop)
//!        (Envoy file RDS)                        ▲
//!                                                │
//!  tick: hooks → MetricsSource::observe → core::rollout::step ──▶ StateStore::save ──▶ notify
//!                 (Envoy admin scrape)      (pure decision)       (atomic file)    progress lines,
//!                                                                                  webhooks, Registry
//! ```
//!
//! - [`config`]: read and validate Canary YAML files.
//! - [`metrics`]: the `MetricsSource` seam and its backends.
//! - [`router`]: the `TrafficRouter` seam and its backends.
//! - [`backends`]: the one place that maps a spec to backends.
//! - [`state`]: atomic per-canary state files.
//! - [`tick`]: one analysis tick (hooks → observe → decide → record → notify), shared by
//!   `fledge run` and `fledge controller`.
//! - [`runner`]: the per-canary loop of `fledge run` and the shared registry.
//! - [`schedule`]: when analyses are due (aligned ticks, so reads are shared).
//! - [`api`]: the status/command HTTP API, `/metrics` and the dashboard routes.
//! - [`cli`]: the operator CLI (`fledge status`, `promote`, `abort`, `pause`, `resume`, `retry`).
//! - [`dashboard`]: the embedded web dashboard and decision simulator, and the per-interval
//!   time series the runner keeps for its charts.
//! - [`webhooks`]: calling the spec's webhooks and turning answers into gates.
//! - [`http`]: the one HTTP client of the process (metrics reads, webhooks, routers).
//! - [`telemetry`]: the controller's own Prometheus metrics.
//! - [`k8s`]: Kubernetes mode — the `Canary` CRD, its reconciler (state in `.status`), leader
//!   election, and the fake API server its tests run against (see docs/kubernetes.md).

pub mod api;
pub mod backends;
pub mod cli;
pub mod config;
pub mod dashboard;
pub mod http;
pub mod k8s;
pub mod metrics;
pub mod progress;
pub mod router;
pub mod runner;
pub mod schedule;
pub mod state;
pub mod supervisor;
pub mod telemetry;
pub mod tick;
pub mod webhooks;
