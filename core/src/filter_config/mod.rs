//! The filter's plugin configuration: its schema, its validation, and the pure functions that
//! turn an Envoy upstream cluster name (plus, when the name says nothing about the version, what
//! the upstream tells) into the `(service, subset)` label values the filter writes.
//!
//! The filter (Wasm) parses it in `on_configure`; the controller and the e2e tests build it and
//! serialize it with [`FilterConfig::to_json`] to generate Envoy or Istio configuration.
//!
//! ```json
//! {"clusters": {"app_stable": {"service": "app", "subset": "stable"},
//!               "app_canary": {"service": "app", "subset": "canary"}},
//!  "istioClusterNames": true,
//!  "responseHeader": "x-fledge-subset",
//!  "sticky": {"cookie": "session"},
//!  "forceCanary": {"header": "x-fledge-stage", "secret": "<32+ random bytes>"}}
//! ```
//!
//! Subset detection, in order (see [`FilterConfig::classify_cluster`]):
//! - `clusters` maps an Envoy upstream cluster name to the service and subset it serves; an entry
//!   without `subset` takes the subset from the upstream (below).
//! - `istioClusterNames` (default `true`) understands Istio's cluster names
//!   `outbound|<port>|<subset>|<host>`: service = the first DNS label of the host (`reviews` for
//!   `reviews.default.svc.cluster.local`), subset = the third field. With an empty subset field
//!   (one Service per version, Gateway API backends) the subset comes from the upstream, and
//!   failing that is the service label.
//! - From the upstream: `endpointMetadata` (default `true`) reads the canonical revision from the
//!   endpoint's `filter_metadata.istio.workload`
//!   (`workload;namespace;canonical-service;canonical-revision;cluster`, set by Istio on every
//!   endpoint); else `subsetHeader`, an upstream response header naming the version.
//! - Anything else is labelled `(other, other)` ([`contract::OTHER`]).
//!
//! The cluster name is Envoy's `xds.cluster_name`, or with `clusterHeader` the value of a
//! response header each route sets to its cluster's name (one read of the response headers
//! then gives the cluster and the status; the property stays the fallback).
//!
//! Data-plane guard (optional): `guard` sets, per service, a hard ceiling on the canary's error
//! ratio over a short sliding window; when it is crossed the filter sends new requests of that
//! service to stable at once (see [`Guard`]).
//!
//! Canary tagging (all optional): `responseHeader` names the serving subset in the response;
//! `forceCanary` lets trusted testers send `x-fledge-stage: canary` (secret token and/or source
//! networks); `sticky` hashes a user key into a bucket for `weighted_clusters.header_name`. Both
//! write the internal `routeHeader`, which the filter strips from every client request.
//!
//! Empty or absent configuration means the defaults. Parsing is strict: unknown keys and wrong
//! types are errors that name the field and say what to write instead, so typos are visible
//! (the filter then fails open and keeps its previous configuration).
//!
//! Every label value goes through [`contract::sanitize_label_value`].
//!
//! - [`schema`]: the types and their defaults;
//! - [`parse`]: strict parsing and validation, errors naming the field;
//! - [`classify`]: cluster names to `(service, subset)` labels;
//! - [`cidr`]: IP networks for `forceCanary.sourceCidrs`.
//!
//! Everything is re-exported here: callers write `fledge_core::filter_config::FilterConfig`.

mod cidr;
mod classify;
mod parse;
mod schema;

pub use cidr::*;
pub use classify::*;
pub use parse::*;
pub use schema::*;

#[cfg(test)]
mod tests;
