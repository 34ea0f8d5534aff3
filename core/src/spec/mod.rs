//! The Canary spec: what an operator writes, and its validation.
//!
//! The same types are read by `fledge run` from YAML and will be served as the Kubernetes CRD.
//! Unknown fields are rejected at parse time (a typo must not silently change behaviour), and
//! [`Canary::validate`] reports *every* problem at once, each naming the field and the fix.
//!
//! - [`types`]: the types, their defaults and derived values (the step plan, the threshold);
//! - [`query`]: PromQL templating for custom metrics;
//! - [`validate`]: [`Canary::validate`] and the rules behind it.
//!
//! Everything is re-exported here: callers write `fledge_core::spec::Canary`.

mod query;
mod types;
mod validate;

pub use query::*;
pub use types::*;
pub use validate::*;

pub use crate::router_spec::{
    BackendRefSpec, CookieMatchSpec, GatewayApiRouterSpec, HeaderMatchSpec, RuleRef,
};

#[cfg(test)]
pub(crate) mod tests;
