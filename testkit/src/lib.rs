//! # fledge-testkit — what Fledge's tests run against, kept out of the product's crates
//!
//! - [`fake_api`]: an in-process fake Kubernetes API server reached through a real
//!   `kube::Client` (or served over HTTP), with the semantics the controller relies on;
//! - [`http`]: one fake HTTP endpoint (Envoy admin, Prometheus, anything HTTP) that records
//!   every request;
//! - [`fixtures`]: the VirtualService, DestinationRule and Canary of a two-subset app.
//!
//! A dev-dependency of `fledge-controller` and a dependency of `fledge-e2e`. It does not
//! depend on `fledge-controller`, so the controller's unit tests link one copy of its types.

#![forbid(unsafe_code)]

pub mod fake_api;
pub mod fixtures;
pub mod http;
