//! The Canary spec: what an operator writes, and its validation.
//!
//! The same types are read by `fledge run` from YAML and will be served as the Kubernetes CRD.
//! Unknown fields are rejected at parse time (a typo must not silently change behaviour), and
//! [`Canary::validate`] reports *every* problem at once, each naming the field and the fix.

use crate::duration::HumanDuration;
use serde::{Deserialize, Serialize};
use std::fmt;

pub use crate::router_spec::{
    BackendRefSpec, CookieMatchSpec, GatewayApiRouterSpec, HeaderMatchSpec, RuleRef,
};

pub const API_VERSION: &str = "fledge.dev/v1alpha1";
pub const KIND: &str = "Canary";

/// Built-in metric: percentage of canary requests that did not fail (5xx / no response).
pub const METRIC_SUCCESS_RATE: &str = "request-success-rate";
/// Built-in metric: canary latency at a quantile, in milliseconds.
pub const METRIC_DURATION: &str = "request-duration";
pub const KNOWN_METRICS: [&str; 2] = [METRIC_SUCCESS_RATE, METRIC_DURATION];

/// The annotation that names the release a rollout is for (e.g. `fledge.dev/rollout: v3`).
/// Changing it starts a new rollout of the same spec, in both modes: the canary slot now runs
/// a new version.
pub const ROLLOUT_ANNOTATION: &str = "fledge.dev/rollout";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Canary {
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    pub spec: CanarySpec,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct Metadata {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Annotations. Changing [`ROLLOUT_ANNOTATION`] starts a new rollout of an unchanged spec.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub annotations: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CanarySpec {
    /// The `fledge_service` label value of the service being canaried.
    pub service: String,
    /// The stable version: its `fledge_subset` label value.
    pub stable: SubsetRef,
    /// The canary version: its `fledge_subset` label value.
    pub canary: SubsetRef,
    pub metrics_source: MetricsSourceSpec,
    pub router: RouterSpec,
    /// How the canary is judged and how its traffic grows: interval, steps, checks.
    pub analysis: AnalysisSpec,
    /// Calls out at Flagger's hook points (load tests, approval gates, notifications); see
    /// docs/operating.md.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub webhooks: Vec<crate::webhook::WebhookSpec>,
    /// Kubernetes mode: the Deployment (apps/v1, in the Canary's namespace) whose pod template
    /// changes are released. Fledge keeps a copy, `<name>-primary`, that serves the stable
    /// version, scales this one up for a new revision and back to 0 after promotion or
    /// rollback. Without it, Fledge only moves traffic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<crate::workload::TargetRef>,
    /// With `targetRef`: the autoscaling/v2 HorizontalPodAutoscaler of the target; the primary
    /// gets a copy of it (`<name>-primary`) that scales the primary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaler_ref: Option<crate::workload::AutoscalerRef>,
    /// With `targetRef`: how long the target or the primary may take to become available, and
    /// how long a rollout may stay Halted, before it is rolled back. Default 10m.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress_deadline: Option<crate::duration::HumanDuration>,
    /// With `targetRef`: the pod label that tells the two versions apart: `canary` on the
    /// target's pods (write it in Git), `stable` on the primary's. The DestinationRule's subsets
    /// select by it. Default `fledge.dev/track`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub track_label: Option<String>,
    /// With `targetRef`: how long after all traffic went back to the primary the target is
    /// scaled to 0 (the mesh needs a moment to push the weights to every proxy). Default 30s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_down_delay: Option<crate::duration::HumanDuration>,
    /// With `targetRef`: when the Canary is deleted, copy the primary's pod template back into
    /// the target, scale the target up and send it all traffic before the primary goes
    /// (Flagger's `revertOnDeletion`). Default false: the primary keeps serving, all traffic
    /// on stable.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub revert_on_deletion: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SubsetRef {
    /// The `fledge_subset` label value the filter gives this version's requests (with Istio,
    /// the DestinationRule subset name).
    pub subset: String,
}

/// Where per-subset metrics are read from. Exactly one field is set (a structural schema,
/// as Kubernetes CRDs require, instead of a tagged enum).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MetricsSourceSpec {
    /// Scrape the filter's metrics straight from one or more Envoy admin endpoints (no
    /// Prometheus needed). Counters of all endpoints are summed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envoy_admin: Option<EnvoyAdminSpec>,
    /// Query a Prometheus that scrapes the gateways (many replicas: PromQL sums them).
    /// Needed for custom metric `query` templates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prometheus: Option<PrometheusSpec>,
    /// Read Envoy's own per-cluster statistics (`upstream_rq_<N>xx`, `upstream_rq_time`) from
    /// one or more Envoy admin endpoints, for a stable and a canary cluster: no Wasm filter is
    /// needed for metrics (so it costs the data plane nothing), at the price of the filter's
    /// finer points (see docs/envoy.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envoy_cluster_stats: Option<EnvoyClusterStatsSpec>,
}

/// `metricsSource.envoyClusterStats`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EnvoyClusterStatsSpec {
    /// Admin base URLs, e.g. `http://127.0.0.1:9901`.
    pub urls: Vec<String>,
    /// The Envoy cluster of the stable version, e.g. `app_stable`, or in Istio
    /// `outbound|80|stable|app.shop.svc.cluster.local`.
    pub stable_cluster: String,
    /// The Envoy cluster of the canary version.
    pub canary_cluster: String,
    /// Per-scrape timeout (a duration, above 0). Default 2s.
    #[serde(default = "default_scrape_timeout")]
    pub timeout: HumanDuration,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PrometheusSpec {
    /// Base URL of the Prometheus HTTP API, e.g. `http://prometheus.istio-system:9090`.
    pub address: String,
    /// Per-query timeout (a duration, above 0). Default 5s.
    #[serde(default = "default_prometheus_timeout")]
    pub timeout: HumanDuration,
}

fn default_prometheus_timeout() -> HumanDuration {
    HumanDuration::from_secs(5)
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EnvoyAdminSpec {
    /// Admin base URLs, e.g. `http://127.0.0.1:9901`.
    pub urls: Vec<String>,
    /// Per-scrape timeout (a duration, above 0). Default 2s.
    #[serde(default = "default_scrape_timeout")]
    pub timeout: HumanDuration,
}

fn default_scrape_timeout() -> HumanDuration {
    HumanDuration::from_secs(2)
}

/// How traffic weights are changed. Exactly one field is set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouterSpec {
    /// Rewrite a file-based RDS resource that Envoy watches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envoy_rds: Option<EnvoyRdsSpec>,
    /// Shift the weights of a route in your own Istio VirtualService (Kubernetes mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub istio: Option<IstioRouterSpec>,
    /// Shift the weights of two backendRefs of a rule in your own Gateway API HTTPRoute or
    /// GRPCRoute (Kubernetes mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_api: Option<GatewayApiRouterSpec>,
}

impl RouterSpec {
    /// The spec names of the routers that are set.
    fn set(&self) -> Vec<&'static str> {
        [
            ("envoyRds", self.envoy_rds.is_some()),
            ("istio", self.istio.is_some()),
            ("gatewayApi", self.gateway_api.is_some()),
        ]
        .into_iter()
        .filter(|(_, set)| *set)
        .map(|(name, _)| name)
        .collect()
    }
}

/// The Istio router: Fledge changes only the weights of two destinations of one HTTP route in
/// a VirtualService you own (e.g. kept in Git), plus the optional testers-first route and
/// mirror below while a rollout runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IstioRouterSpec {
    /// Name of the VirtualService, in the Canary's namespace.
    pub virtual_service: String,
    /// Name of the HTTP route (`spec.http[].name`) whose stable and canary destinations are
    /// weighted.
    pub route: String,
    /// Two-Service setups: the destination host of the stable version. When unset, the
    /// destinations are found by subset (`spec.stable.subset` / `spec.canary.subset`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stable_host: Option<String>,
    /// Two-Service setups: the destination host of the canary version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary_host: Option<String>,
    /// DestinationRule that defines the subsets (checked before any weight is written).
    /// Default: any DestinationRule in the namespace whose `host` is the destination host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_rule: Option<String>,
    /// Testers first: while the rollout runs, matching requests always go to the canary,
    /// through a route Fledge inserts just before `route`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header_route: Option<HeaderRouteSpec>,
    /// While the rollout runs, copy this percentage of the route's traffic to the canary
    /// (percent of requests, above 1 and at most 100; Istio `mirror` + `mirrorPercentage`;
    /// mirrored responses are discarded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror_percentage: Option<f64>,
}

/// A route that sends the testers' requests to the canary while a rollout runs. A request is
/// the testers' when it meets every condition given: `headers`, `headerMatches` and `cookie`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderRouteSpec {
    /// Name of the inserted route. Default: `<route>-canary-testers`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Request headers (lowercase names) and the exact values that select the canary, e.g.
    /// `{stage: canary}`.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub headers: std::collections::BTreeMap<String, String>,
    /// Header conditions by `exact` value, `prefix` or `regex` (RE2, whole value), e.g.
    /// `[{name: user-agent, regex: ".*Firefox.*"}]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub header_matches: Vec<HeaderMatchSpec>,
    /// A cookie that selects the canary, e.g. `{name: canary, value: always}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie: Option<CookieMatchSpec>,
}

impl IstioRouterSpec {
    /// Name of the testers-first route, if one is configured.
    pub fn header_route_name(&self) -> Option<String> {
        self.header_route.as_ref().map(|h| {
            h.name
                .clone()
                .unwrap_or_else(|| format!("{}-canary-testers", self.route))
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EnvoyRdsSpec {
    /// The RDS file (a DiscoveryResponse in JSON or YAML) named by Envoy's `path_config_source`.
    pub path: String,
    /// Name of the RouteConfiguration in that file.
    pub route_configuration: String,
    /// Name of the virtual host that holds the route.
    pub virtual_host: String,
    /// Name of the route whose `weighted_clusters` are shifted.
    pub route: String,
    /// The cluster of the stable version in that route's `weighted_clusters`.
    pub stable_cluster: String,
    /// The cluster of the canary version in that route's `weighted_clusters`.
    pub canary_cluster: String,
    /// Envoy admin base URL, used to check that new weights are live (`/config_dump`).
    pub admin_url: String,
    /// How long to wait for new weights to become live before reporting an error (a
    /// duration). Default 5s.
    #[serde(default = "default_verify_timeout")]
    pub verify_timeout: HumanDuration,
}

fn default_verify_timeout() -> HumanDuration {
    HumanDuration::from_secs(5)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AnalysisSpec {
    /// How often metrics are read and judged (a duration, e.g. `30s`; at least 1s). Each
    /// weight step lasts at least one interval.
    #[serde(default = "default_interval")]
    pub interval: HumanDuration,
    /// Failed analysis intervals (a count, over the whole rollout) at which the canary is
    /// rolled back: `threshold: 5` rolls back at the 5th failed interval (Flagger's meaning).
    /// Default 5. Exclusive with `failureLimit`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<u32>,
    /// Argo Rollouts' meaning: failed analysis intervals (a count) that are tolerated; one
    /// more rolls back, so `failureLimit: 3` is `threshold: 4` and `failureLimit: 0` rolls back
    /// at the first failure. Exclusive with `threshold`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_limit: Option<u32>,
    /// Canary requests an interval needs to be judged (a count per interval). Fewer means "no
    /// data": the rollout halts (and never promotes) until traffic returns. Default 20.
    #[serde(default = "default_min_canary_requests")]
    pub min_canary_requests: u64,
    /// Explicit steps (Argo Rollouts style). Exclusive with `stepWeight`/`stepWeights`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<Vec<StepSpec>>,
    /// Increase the canary weight by this many percent of traffic (a whole number, 1-100) per
    /// step (Flagger style), up to `maxWeight`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "optional_weight"
    )]
    #[cfg_attr(feature = "schema", schemars(range(min = 1, max = 100)))]
    pub step_weight: Option<u8>,
    /// Last canary weight before promotion when `stepWeight` is used, in percent of traffic (a
    /// whole number, `stepWeight`-100). Default 50.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "optional_weight"
    )]
    #[cfg_attr(feature = "schema", schemars(range(min = 1, max = 100)))]
    pub max_weight: Option<u8>,
    /// An explicit list of canary weights in percent of traffic (whole numbers, 0-100), one
    /// step each (Flagger style).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "optional_weights"
    )]
    pub step_weights: Option<Vec<u8>>,
    /// Index (0-based) of the step from which checks are enforced; earlier steps are judged
    /// and shown, not acted on (a warning says so).
    #[serde(default)]
    pub starting_step: usize,
    /// Consecutive intervals (a count) the metrics source may fail (unreachable, slow, garbage)
    /// before the rollout is Halted with the reason. Nothing advances meanwhile. Default 2.
    #[serde(default = "default_metrics_failure_limit")]
    pub metrics_failure_limit: u32,
    /// Response classes the built-in checks (request-success-rate, compareWithStable's errors,
    /// sloBurnRate) count as errors: `5xx` always, plus any of `3xx`, `4xx`. No response from
    /// the upstream (reset, timeout, no healthy upstream) always counts. Default `[5xx]`;
    /// `[5xx, 4xx]` is "good = status < 400".
    #[serde(
        default = "default_error_statuses",
        skip_serializing_if = "is_default_error_statuses"
    )]
    pub error_statuses: Vec<crate::contract::ResponseClass>,
    /// Promote on traffic alone, with no check at all. Without it, a spec with no
    /// `metrics`, `compareWithStable` or `sloBurnRate` is refused; with it, the status, the CLI
    /// and the dashboard carry a warning for as long as the rollout runs.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unchecked: bool,
    /// Fixed-threshold checks judged every interval (Flagger style): a value outside its range
    /// fails the interval.
    #[serde(default)]
    pub metrics: Vec<MetricSpec>,
    /// Judge the canary against the stable version with anytime-valid sequential tests
    /// (recommended: fewer false rollbacks and faster detection than fixed thresholds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compare_with_stable: Option<CompareSpec>,
    /// Roll back when the canary burns its error budget too fast.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slo_burn_rate: Option<BurnRateSpec>,
    /// The data-plane guard: the filter sends the canary's traffic to stable within a second
    /// when its error ratio crosses a hard ceiling, and the controller then rolls back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guard: Option<GuardSpec>,
}

/// The data-plane guard as the controller sees it. The same thresholds go into the filter's
/// plugin configuration (`guard.services.<service>`, see [`GuardSpec::filter_guard`]): the
/// filter trips, the controller only watches `fledge_guard_tripped` every `checkInterval` and
/// rolls back. Every field has a default, so `guard: {}` is a good start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GuardSpec {
    /// Trip when at least this share of the canary's requests in the window failed (5xx or no
    /// response), as a fraction (above 0, at most 1; 0.5 = half). Default 0.5.
    #[serde(default = "default_guard_max_error_ratio")]
    pub max_error_ratio: f64,
    /// ... over at least this many canary requests (a count) in the window. Default 20.
    #[serde(default = "default_guard_min_requests")]
    pub min_requests: u32,
    /// The sliding window (whole seconds, 1s..1h). Default 10s.
    #[serde(default = "default_guard_window")]
    pub window: HumanDuration,
    /// How long after a trip the filter re-arms (whole seconds, at least `window`). Default 30s.
    #[serde(default = "default_guard_rearm_after")]
    pub rearm_after: HumanDuration,
    /// How often the controller reads the guard's gauge between analysis intervals (a duration,
    /// 100ms-1m). Default 1s.
    #[serde(default = "default_guard_check_interval")]
    pub check_interval: HumanDuration,
}

fn default_guard_max_error_ratio() -> f64 {
    crate::filter_config::DEFAULT_GUARD_MAX_ERROR_RATIO
}
fn default_guard_min_requests() -> u32 {
    crate::filter_config::DEFAULT_GUARD_MIN_REQUESTS
}
fn default_guard_window() -> HumanDuration {
    HumanDuration::from_secs(u64::from(
        crate::filter_config::DEFAULT_GUARD_WINDOW_SECONDS,
    ))
}
fn default_guard_rearm_after() -> HumanDuration {
    HumanDuration::from_secs(u64::from(crate::filter_config::DEFAULT_GUARD_REARM_SECONDS))
}
fn default_guard_check_interval() -> HumanDuration {
    HumanDuration::from_secs(1)
}

impl Default for GuardSpec {
    fn default() -> Self {
        GuardSpec {
            max_error_ratio: default_guard_max_error_ratio(),
            min_requests: default_guard_min_requests(),
            window: default_guard_window(),
            rearm_after: default_guard_rearm_after(),
            check_interval: default_guard_check_interval(),
        }
    }
}

impl GuardSpec {
    /// The filter's guard for this canary's service: the entry to put under
    /// `guard.services.<spec.service>` in the plugin configuration.
    pub fn filter_guard(&self, canary_subset: &str) -> crate::filter_config::GuardedService {
        let seconds = |d: &HumanDuration| u32::try_from(d.as_millis() / 1000).unwrap_or(u32::MAX);
        crate::filter_config::GuardedService {
            canary_subset: crate::contract::sanitize_label_value(canary_subset),
            max_error_ratio: self.max_error_ratio,
            min_requests: self.min_requests,
            window_seconds: seconds(&self.window),
            rearm_seconds: seconds(&self.rearm_after),
        }
    }
}

/// What `compareWithStable` tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub enum ComparedSignal {
    /// The canary's rate of 5xx / no-response compared with the stable's.
    Errors,
    /// The canary's rate of requests slower than latency bucket boundaries.
    Latency,
}

/// Sequential canary-vs-stable tests. Every field has a default, so `compareWithStable: {}`
/// is a good start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CompareSpec {
    /// The chance of rolling back a canary that is no worse than the tolerance, over the whole
    /// rollout however long it runs and however often it is checked: a probability as a
    /// fraction (above 0, below 0.5; 0.03 = 3%). Default 0.03.
    #[serde(default = "default_false_rollback_rate")]
    pub false_rollback_rate: f64,
    /// How much worse than stable is still acceptable, as a multiplier of the stable's rate
    /// (1-10): 1.0 = not worse at all, 1.2 = up to 20% more errors (or slow requests).
    /// Default 1.0.
    #[serde(default = "default_tolerance")]
    pub tolerance: f64,
    /// Which signals are compared. Default: errors and latency.
    #[serde(default = "default_compared_signals")]
    pub signals: Vec<ComparedSignal>,
    /// Latency bucket boundaries to compare at, in milliseconds; each must be a bucket
    /// boundary of the latency histogram (a warning says when one is not). Default: chosen from
    /// the first interval in which the stable version serves at least 50 requests (near its
    /// p50, p90, p99) plus the `request-duration` limit; until then latency is not compared,
    /// and a warning says so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_boundaries_ms: Option<Vec<f64>>,
    /// If set, a step only advances once the canary's error ratio to stable is shown (with
    /// the same confidence) to be below this margin, a multiplier above `tolerance`, e.g.
    /// 2.0 = "at most twice as many errors".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promotion_margin: Option<f64>,
    /// With `promotionMargin`: canary requests (a count, over the whole rollout) needed
    /// before a step may advance.
    #[serde(default)]
    pub promotion_min_canary_requests: u64,
}

fn default_false_rollback_rate() -> f64 {
    0.03
}
fn default_tolerance() -> f64 {
    1.0
}
fn default_compared_signals() -> Vec<ComparedSignal> {
    vec![ComparedSignal::Errors, ComparedSignal::Latency]
}

impl Default for CompareSpec {
    fn default() -> Self {
        CompareSpec {
            false_rollback_rate: default_false_rollback_rate(),
            tolerance: default_tolerance(),
            signals: default_compared_signals(),
            latency_boundaries_ms: None,
            promotion_margin: None,
            promotion_min_canary_requests: 0,
        }
    }
}

/// SRE-workbook multi-window burn-rate gate on the canary's own error budget.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BurnRateSpec {
    /// Success objective in percent of requests (above 1, below 100), e.g. 99.9. Error
    /// budget = 100 − objective.
    pub objective: f64,
    /// Fail when the burn rate (error ratio ÷ error budget, a multiplier: 1 = spending the
    /// budget exactly) exceeds this over both windows. Default 14.4 (the workbook's "page"
    /// rate).
    #[serde(default = "default_max_burn_rate")]
    pub max_burn_rate: f64,
    /// The long window (a duration, at least the interval). Default 5m.
    #[serde(default = "default_long_window")]
    pub long_window: HumanDuration,
    /// The short window (a duration, at most the long window). Default: a twelfth of the
    /// long window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub short_window: Option<HumanDuration>,
}

fn default_max_burn_rate() -> f64 {
    14.4
}
fn default_long_window() -> HumanDuration {
    HumanDuration::from_secs(300)
}

impl BurnRateSpec {
    pub fn short_window(&self) -> HumanDuration {
        self.short_window.unwrap_or(HumanDuration::from_millis(
            self.long_window.as_millis() / 12,
        ))
    }
}

fn default_interval() -> HumanDuration {
    HumanDuration::from_secs(30)
}
/// Failed intervals that roll back when neither `threshold` nor `failureLimit` is set.
pub const DEFAULT_THRESHOLD: u32 = 5;
fn default_error_statuses() -> Vec<crate::contract::ResponseClass> {
    vec![crate::contract::ResponseClass::ServerError]
}
fn is_default_error_statuses(statuses: &[crate::contract::ResponseClass]) -> bool {
    statuses == default_error_statuses().as_slice()
}
fn default_min_canary_requests() -> u64 {
    20
}
fn default_metrics_failure_limit() -> u32 {
    2
}
const DEFAULT_MAX_WEIGHT: u8 = 50;

/// One step as written in a spec: exactly one of `setWeight` or `pause`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StepSpec {
    /// Send this percentage of traffic to the canary (a whole number, 0-100) and hold it for
    /// at least one passing interval.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "optional_weight"
    )]
    #[cfg_attr(feature = "schema", schemars(range(min = 0, max = 100)))]
    pub set_weight: Option<u8>,
    /// Hold the current weight: `{duration: 5m}`, or `{}` until `fledge promote` (a person
    /// decides; a warning says so).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause: Option<Pause>,
}

/// A canary weight as written: any number is read, so that a negative or fractional weight
/// gets an error naming the unit and the fix (serde's own would only say "expected u8"); the YAML
/// or JSON reader puts the field's path in front. Whole numbers up to 255 are read as they are:
/// validation reports those above 100 with everything else wrong in the spec (in Kubernetes, in
/// the Canary's status).
struct WeightValue(u8);

impl<'de> Deserialize<'de> for WeightValue {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = WeightValue;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a whole percentage of traffic from 0 to 100")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<WeightValue, E> {
                weight_from_number(v as f64).map_err(E::custom)
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<WeightValue, E> {
                weight_from_number(v as f64).map_err(E::custom)
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<WeightValue, E> {
                weight_from_number(v).map_err(E::custom)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

fn weight_from_number(value: f64) -> Result<WeightValue, String> {
    if value > 0.0 && value < 1.0 {
        return Err(format!(
            "{value} looks like a fraction, but weights are whole percentages of traffic (0-100): did you mean {} (%)?",
            format_number(value * 100.0)
        ));
    }
    if value.fract() != 0.0 || !(0.0..=f64::from(u8::MAX)).contains(&value) {
        return Err(format!(
            "{value} is not a whole percentage of traffic from 0 to 100; write e.g. `20` for 20% of requests to the canary"
        ));
    }
    Ok(WeightValue(value as u8))
}

fn optional_weight<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u8>, D::Error> {
    Ok(Option::<WeightValue>::deserialize(d)?.map(|w| w.0))
}

fn optional_weights<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
    Ok(Option::<Vec<WeightValue>>::deserialize(d)?.map(|ws| ws.into_iter().map(|w| w.0).collect()))
}

/// A number as an operator would write it: no float noise (`99.9`, not `99.90000000000001`).
pub fn format_number(value: f64) -> String {
    let rounded = (value * 1e6).round() / 1e6;
    if rounded == rounded.trunc() && rounded.abs() < 1e15 {
        format!("{}", rounded as i64)
    } else {
        format!("{rounded}")
    }
}

impl StepSpec {
    pub fn set_weight(weight: u8) -> Self {
        StepSpec {
            set_weight: Some(weight),
            pause: None,
        }
    }

    pub fn pause(duration: Option<HumanDuration>) -> Self {
        StepSpec {
            set_weight: None,
            pause: Some(Pause { duration }),
        }
    }

    /// The step this spec describes; `None` unless exactly one field is set (rejected by
    /// validation).
    pub fn to_step(&self) -> Option<Step> {
        match (self.set_weight, &self.pause) {
            (Some(weight), None) => Some(Step::SetWeight(weight)),
            (None, Some(pause)) => Some(Step::Pause(pause.clone())),
            _ => None,
        }
    }
}

/// One step of a rollout plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Send this percentage of traffic to the canary, and hold it for at least one passing
    /// analysis interval.
    SetWeight(u8),
    /// Hold the current weight for a duration, or (no duration) until a promote request.
    Pause(Pause),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Pause {
    /// How long to hold (a duration, e.g. `5m`); without it, until promoted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<HumanDuration>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MetricSpec {
    /// `request-success-rate` (percent of requests that are not errors, 0-100),
    /// `request-duration` (milliseconds at `quantile`), or a custom metric's own name (with
    /// `query`).
    pub name: String,
    /// The passing range, in the metric's unit (percent, ms, or the query's unit).
    pub threshold_range: ThresholdRange,
    /// For `request-duration`: the quantile judged, as a fraction (0-1, e.g. 0.99 for p99;
    /// default 0.99).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantile: Option<f64>,
    /// A custom metric: a PromQL template returning one number for the canary over the
    /// interval, e.g. `sum(rate(http_errors{app="{{ service }}",version="{{ canary }}"}[{{ interval }}]))`.
    /// Variables: `{{ name }}`, `{{ namespace }}`, `{{ service }}`,
    /// `{{ stable }}`, `{{ canary }}`, `{{ interval }}`. Needs `metricsSource.prometheus`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
}

/// Variables a custom `query` template may use, written `{{ name }}`.
pub const QUERY_VARIABLES: [&str; 6] = [
    "name",
    "namespace",
    "service",
    "stable",
    "canary",
    "interval",
];

/// Values for the variables of a query template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryVariables {
    pub name: String,
    pub namespace: String,
    pub service: String,
    pub stable: String,
    pub canary: String,
    /// The analysis interval as a PromQL duration, e.g. `30s`.
    pub interval: String,
}

impl QueryVariables {
    pub fn for_canary(canary: &Canary) -> Self {
        QueryVariables {
            name: canary.metadata.name.clone(),
            namespace: canary.metadata.namespace.clone().unwrap_or_default(),
            service: canary.spec.service.clone(),
            stable: canary.spec.stable.subset.clone(),
            canary: canary.spec.canary.subset.clone(),
            interval: canary.spec.analysis.interval.to_string(),
        }
    }

    fn get(&self, variable: &str) -> Option<&str> {
        Some(match variable {
            "name" => &self.name,
            "namespace" => &self.namespace,
            "service" => &self.service,
            "stable" => &self.stable,
            "canary" => &self.canary,
            "interval" => &self.interval,
            _ => return None,
        })
    }
}

/// A problem in a query template.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("unknown variable {{{{ {0} }}}}; use one of: {vars}", vars = QUERY_VARIABLES.join(", "))]
    UnknownVariable(String),
    #[error("unclosed `{{{{` at byte {0}; close it with `}}}}`")]
    Unclosed(usize),
}

/// Replace every `{{ variable }}` in `template`. Unknown variables are errors, never silently
/// empty: an empty label matcher would select the wrong series. Values are inserted as they
/// are: a valid spec only has letters, digits, '_', '-' (and, in `interval`, a duration) in
/// them, so they cannot end a PromQL string or add a matcher.
pub fn render_query(template: &str, vars: &QueryVariables) -> Result<String, TemplateError> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    let mut offset = 0;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find("}}")
            .ok_or(TemplateError::Unclosed(offset + start))?;
        let variable = after[..end].trim();
        let value = vars
            .get(variable)
            .ok_or_else(|| TemplateError::UnknownVariable(variable.to_string()))?;
        out.push_str(value);
        let consumed = start + 2 + end + 2;
        offset += consumed;
        rest = &rest[consumed..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The passing range of a metric, in the metric's unit: percent of requests (0-100) for
/// `request-success-rate`, milliseconds for `request-duration`, the query's own unit for a
/// custom metric. `min`/`max` are inclusive (Flagger's `thresholdRange`), `above`/`below` strict
/// (Argo's `result[0] > 0.90` is `above: 90` on the success rate).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ThresholdRange {
    /// Lowest passing value (inclusive), in the metric's unit (percent for
    /// request-success-rate, ms for request-duration).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    /// Highest passing value (inclusive), in the metric's unit (percent for
    /// request-success-rate, ms for request-duration).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
    /// Values must be strictly above this, in the metric's unit. Exclusive with `min`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub above: Option<f64>,
    /// Values must be strictly below this, in the metric's unit. Exclusive with `max`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub below: Option<f64>,
}

impl ThresholdRange {
    pub fn contains(&self, value: f64) -> bool {
        self.min.is_none_or(|min| value >= min)
            && self.max.is_none_or(|max| value <= max)
            && self.above.is_none_or(|above| value > above)
            && self.below.is_none_or(|below| value < below)
    }

    /// Whether any bound is set.
    pub fn is_bounded(&self) -> bool {
        self.min.is_some() || self.max.is_some() || self.above.is_some() || self.below.is_some()
    }

    /// Every bound as (field name, value).
    fn bounds(&self) -> [(&'static str, Option<f64>); 4] {
        [
            ("min", self.min),
            ("max", self.max),
            ("above", self.above),
            ("below", self.below),
        ]
    }

    /// The range with a unit after each number, e.g. `>= 99%`, `> 90% and <= 100%`, `< 500 ms`.
    pub fn with_unit(&self, unit: &str) -> String {
        let parts: Vec<String> = [
            (">=", self.min),
            ("> ", self.above),
            ("<=", self.max),
            ("< ", self.below),
        ]
        .into_iter()
        .filter_map(|(op, v)| v.map(|v| format!("{} {}{unit}", op.trim_end(), format_number(v))))
        .collect();
        if parts.is_empty() {
            "any".to_string()
        } else {
            parts.join(" and ")
        }
    }
}

impl fmt::Display for ThresholdRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.with_unit(""))
    }
}

/// A metric check, resolved from a [`MetricSpec`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MetricKind {
    SuccessRate,
    Duration {
        quantile: f64,
    },
    /// A PromQL template evaluated by the Prometheus source; its value is judged as is.
    Custom,
}

impl MetricKind {
    /// The unit of the metric's values, as written after a number: `%`, ` ms`, or nothing for
    /// a custom query (its unit is the query's own).
    pub fn unit(self) -> &'static str {
        match self {
            MetricKind::SuccessRate => "%",
            MetricKind::Duration { .. } => " ms",
            MetricKind::Custom => "",
        }
    }
}

impl MetricSpec {
    /// The check this spec describes; `None` for unknown names (rejected by validation).
    pub fn kind(&self) -> Option<MetricKind> {
        if self.query.is_some() {
            return (!KNOWN_METRICS.contains(&self.name.as_str())).then_some(MetricKind::Custom);
        }
        match self.name.as_str() {
            METRIC_SUCCESS_RATE => Some(MetricKind::SuccessRate),
            METRIC_DURATION => Some(MetricKind::Duration {
                quantile: self.quantile.unwrap_or(0.99),
            }),
            _ => None,
        }
    }
}

impl AnalysisSpec {
    /// Failed intervals at which the canary is rolled back: `threshold`, or `failureLimit` + 1,
    /// or [`DEFAULT_THRESHOLD`].
    pub fn rollback_threshold(&self) -> u32 {
        match (self.threshold, self.failure_limit) {
            (Some(threshold), _) => threshold,
            (None, Some(limit)) => limit.saturating_add(1),
            (None, None) => DEFAULT_THRESHOLD,
        }
    }

    /// Whether any check can fail the canary: a metric, a comparison with stable, or the
    /// burn-rate gate. (The guard and webhooks alone do not count: the guard only trips on
    /// hard failures, and a webhook's meaning is its own.)
    pub fn has_checks(&self) -> bool {
        !self.metrics.is_empty()
            || self.compare_with_stable.is_some()
            || self.slo_burn_rate.is_some()
    }

    /// The concrete step list: `steps` as written, or the weights from `stepWeights` /
    /// `stepWeight`+`maxWeight`. Promotion follows the last step.
    pub fn plan(&self) -> Vec<Step> {
        if let Some(steps) = &self.steps {
            return steps.iter().filter_map(StepSpec::to_step).collect();
        }
        if let Some(weights) = &self.step_weights {
            return weights.iter().map(|w| Step::SetWeight(*w)).collect();
        }
        if let Some(step) = self.step_weight.filter(|s| *s > 0) {
            let max = self.max_weight.unwrap_or(DEFAULT_MAX_WEIGHT).min(100);
            let mut weights = Vec::new();
            let mut w = step;
            while w < max {
                weights.push(Step::SetWeight(w));
                w = w.saturating_add(step);
            }
            weights.push(Step::SetWeight(max));
            return weights;
        }
        Vec::new()
    }
}

/// One problem in a spec: where it is, what is wrong, and what to write instead.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct SpecError {
    pub field: String,
    pub problem: String,
    pub fix: String,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}; {}", self.field, self.problem, self.fix)
    }
}

/// Every problem found in one spec.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct SpecErrors(pub Vec<SpecError>);

impl fmt::Display for SpecErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        write!(
            f,
            "{n} problem{} in the Canary spec:",
            if n == 1 { "" } else { "s" }
        )?;
        for e in &self.0 {
            write!(f, "\n  - {e}")?;
        }
        Ok(())
    }
}

struct Problems(Vec<SpecError>);

impl Problems {
    fn add(
        &mut self,
        field: impl Into<String>,
        problem: impl Into<String>,
        fix: impl Into<String>,
    ) {
        self.0.push(SpecError {
            field: field.into(),
            problem: problem.into(),
            fix: fix.into(),
        });
    }
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_http_url(s: &str) -> bool {
    (s.starts_with("http://") && s.len() > 7) || (s.starts_with("https://") && s.len() > 8)
}

impl Canary {
    pub fn name(&self) -> &str {
        &self.metadata.name
    }

    /// The release this rollout is for, from [`ROLLOUT_ANNOTATION`], if set.
    pub fn rollout_marker(&self) -> Option<&str> {
        self.metadata
            .annotations
            .get(ROLLOUT_ANNOTATION)
            .map(String::as_str)
    }

    /// Check everything serde cannot: ranges, exclusive options, cross-field rules.
    pub fn validate(&self) -> Result<(), SpecErrors> {
        let mut p = Problems(Vec::new());
        if self.api_version != API_VERSION {
            p.add(
                "apiVersion",
                format!("unsupported apiVersion {:?}", self.api_version),
                format!("write `apiVersion: {API_VERSION}`"),
            );
        }
        if self.kind != KIND {
            p.add(
                "kind",
                format!("unsupported kind {:?}", self.kind),
                format!("write `kind: {KIND}`"),
            );
        }
        if !is_dns_label(&self.metadata.name) {
            p.add(
                "metadata.name",
                format!("{:?} is not a valid name", self.metadata.name),
                "use 1-63 lowercase letters, digits or '-', starting and ending with a letter or digit, e.g. `name: checkout`",
            );
        }
        if let Some(namespace) = &self.metadata.namespace {
            if !is_dns_label(namespace) {
                p.add(
                    "metadata.namespace",
                    format!("{namespace:?} is not a valid namespace"),
                    "use 1-63 lowercase letters, digits or '-', starting and ending with a letter or digit, e.g. `namespace: shop`",
                );
            }
        }
        self.spec.validate_into(&mut p);
        if p.0.is_empty() {
            Ok(())
        } else {
            Err(SpecErrors(p.0))
        }
    }
}

/// The `urls` and `timeout` of a metrics source that scrapes Envoy admin endpoints.
fn validate_admin_urls(p: &mut Problems, at: &str, urls: &[String], timeout: HumanDuration) {
    if urls.is_empty() {
        p.add(
            format!("{at}.urls"),
            "is empty",
            "list at least one Envoy admin URL, e.g. `urls: [\"http://127.0.0.1:9901\"]`",
        );
    }
    for (i, url) in urls.iter().enumerate() {
        if !is_http_url(url) {
            p.add(
                format!("{at}.urls[{i}]"),
                format!("{url:?} is not an http(s) URL"),
                "write the admin base URL, e.g. `http://127.0.0.1:9901`",
            );
        }
    }
    if timeout.as_millis() == 0 {
        p.add(
            format!("{at}.timeout"),
            "must be a duration above 0",
            "write e.g. `timeout: 2s`",
        );
    }
}

impl CanarySpec {
    fn validate_into(&self, p: &mut Problems) {
        if self.service.trim().is_empty() {
            p.add(
                "spec.service",
                "is empty",
                "write the `fledge_service` label value the filter records, e.g. `service: app`",
            );
        }
        for (field, subset) in [
            ("spec.stable.subset", &self.stable.subset),
            ("spec.canary.subset", &self.canary.subset),
        ] {
            if subset.trim().is_empty() {
                p.add(
                    field,
                    "is empty",
                    "write the `fledge_subset` label value of that version, e.g. `subset: canary`",
                );
            }
        }
        // The filter records only these characters (anything else becomes '_'), so another
        // value would never match its series: the rollout would wait for data forever. It also
        // keeps every `{{ variable }}` of a custom query a plain PromQL string.
        for (field, value) in [
            ("spec.service", &self.service),
            ("spec.stable.subset", &self.stable.subset),
            ("spec.canary.subset", &self.canary.subset),
        ] {
            let recorded = crate::contract::sanitize_label_value(value);
            if !value.trim().is_empty() && recorded != *value {
                p.add(
                    field,
                    format!("{value:?} is not a label value the filter can record"),
                    format!(
                        "use only letters, digits, '_' and '-' (at most {} characters), as the filter records it: `{recorded}`",
                        crate::contract::MAX_LABEL_LEN
                    ),
                );
            }
        }
        if !self.stable.subset.is_empty() && self.stable.subset == self.canary.subset {
            p.add(
                "spec.canary.subset",
                format!("is the same as spec.stable.subset ({:?})", self.canary.subset),
                "stable and canary must be different subsets, e.g. `stable: {subset: stable}` and `canary: {subset: canary}`",
            );
        }
        let sources = [
            self.metrics_source.envoy_admin.is_some(),
            self.metrics_source.prometheus.is_some(),
            self.metrics_source.envoy_cluster_stats.is_some(),
        ];
        match sources.iter().filter(|set| **set).count() {
            0 => p.add(
                "spec.metricsSource",
                "names no metrics source",
                "add `envoyAdmin: {urls: [\"http://127.0.0.1:9901\"]}`, `prometheus: {address: \"http://prometheus:9090\"}` or `envoyClusterStats: {urls: [...], stableCluster: ..., canaryCluster: ...}`",
            ),
            1 => {}
            _ => p.add(
                "spec.metricsSource",
                "names more than one metrics source",
                "keep exactly one of envoyAdmin, prometheus and envoyClusterStats",
            ),
        }
        if let Some(stats) = &self.metrics_source.envoy_cluster_stats {
            validate_admin_urls(
                p,
                "spec.metricsSource.envoyClusterStats",
                &stats.urls,
                stats.timeout,
            );
            for (field, cluster) in [
                ("stableCluster", &stats.stable_cluster),
                ("canaryCluster", &stats.canary_cluster),
            ] {
                if cluster.trim().is_empty() {
                    p.add(
                        format!("spec.metricsSource.envoyClusterStats.{field}"),
                        "is empty",
                        "write the Envoy cluster name, e.g. `app_canary` (Istio: `outbound|80|canary|app.shop.svc.cluster.local`)",
                    );
                }
            }
            if !stats.stable_cluster.is_empty() && stats.stable_cluster == stats.canary_cluster {
                p.add(
                    "spec.metricsSource.envoyClusterStats.canaryCluster",
                    format!("is the same as stableCluster ({:?})", stats.canary_cluster),
                    "name the two versions' clusters, e.g. `stableCluster: app_stable` and `canaryCluster: app_canary`",
                );
            }
        }
        if let Some(prometheus) = &self.metrics_source.prometheus {
            if !is_http_url(&prometheus.address) {
                p.add(
                    "spec.metricsSource.prometheus.address",
                    format!("{:?} is not an http(s) URL", prometheus.address),
                    "write the Prometheus base URL, e.g. `address: http://prometheus.istio-system:9090`",
                );
            }
            if prometheus.timeout.as_millis() == 0 {
                p.add(
                    "spec.metricsSource.prometheus.timeout",
                    "must be a duration above 0",
                    "write e.g. `timeout: 5s`",
                );
            }
        }
        let has_prometheus = self.metrics_source.prometheus.is_some();
        if let Some(admin) = &self.metrics_source.envoy_admin {
            validate_admin_urls(
                p,
                "spec.metricsSource.envoyAdmin",
                &admin.urls,
                admin.timeout,
            );
        }
        let routers = self.router.set();
        match routers.as_slice() {
            [] => p.add(
                "spec.router",
                "names no traffic router",
                "add `istio: {virtualService: ..., route: ...}` or `gatewayApi: {httpRoute: ..., rule: ..., stableBackend: {name: ...}, canaryBackend: {name: ...}}` (Kubernetes), or `envoyRds: {path: ..., routeConfiguration: ..., virtualHost: ..., route: ..., stableCluster: ..., canaryCluster: ..., adminUrl: ...}` (standalone)",
            ),
            [_] => {}
            several => p.add(
                "spec.router",
                format!("sets {}", several.join(" and ")),
                "keep exactly one: `istio` or `gatewayApi` in Kubernetes, `envoyRds` standalone",
            ),
        }
        match &self.router.envoy_rds {
            None => {}
            Some(rds) => {
                let base = "spec.router.envoyRds";
                for (field, value, example) in [
                    ("path", &rds.path, "path: /etc/envoy/rds/routes.json"),
                    (
                        "routeConfiguration",
                        &rds.route_configuration,
                        "routeConfiguration: fledge_route",
                    ),
                    ("virtualHost", &rds.virtual_host, "virtualHost: app"),
                    ("route", &rds.route, "route: primary"),
                    (
                        "stableCluster",
                        &rds.stable_cluster,
                        "stableCluster: app_stable",
                    ),
                    (
                        "canaryCluster",
                        &rds.canary_cluster,
                        "canaryCluster: app_canary",
                    ),
                ] {
                    if value.trim().is_empty() {
                        p.add(
                            format!("{base}.{field}"),
                            "is empty",
                            format!("write e.g. `{example}`"),
                        );
                    }
                }
                if !rds.stable_cluster.is_empty() && rds.stable_cluster == rds.canary_cluster {
                    p.add(
                        format!("{base}.canaryCluster"),
                        "is the same as stableCluster",
                        "name the two different clusters of the route's weighted_clusters",
                    );
                }
                if !is_http_url(&rds.admin_url) {
                    p.add(
                        format!("{base}.adminUrl"),
                        format!("{:?} is not an http(s) URL", rds.admin_url),
                        "write the Envoy admin base URL, e.g. `adminUrl: http://127.0.0.1:9901`",
                    );
                }
            }
        }
        if let Some(istio) = &self.router.istio {
            istio.validate_into(p);
        }
        if let Some(gateway_api) = &self.router.gateway_api {
            p.0.extend(crate::router_spec::validate_gateway_api(gateway_api));
        }
        self.analysis.validate_into(p, has_prometheus);
        p.0.extend(crate::webhook::validate(&self.webhooks));
        p.0.extend(crate::workload::validate_spec(self));
    }
}

impl GuardSpec {
    fn validate_into(&self, p: &mut Problems, field: &str) {
        units::fraction(
            p,
            &format!("{field}.maxErrorRatio"),
            self.max_error_ratio,
            units::Fraction {
                max: 1.0,
                inclusive: true,
            },
            "maxErrorRatio (the share of failed canary requests that trips the guard)",
            "0.5",
        );
        if !(1..=1_000_000).contains(&self.min_requests) {
            p.add(
                format!("{field}.minRequests"),
                format!("{} requests is not between 1 and 1000000", self.min_requests),
                "write the smallest sample the guard judges, in canary requests, e.g. `minRequests: 20`",
            );
        }
        let whole_seconds = |d: &HumanDuration| d.as_millis().is_multiple_of(1000);
        let window_ms = self.window.as_millis();
        if !whole_seconds(&self.window) || !(1000..=3_600_000).contains(&window_ms) {
            p.add(
                format!("{field}.window"),
                format!("{} is not whole seconds from 1s to 1h", self.window),
                "write e.g. `window: 10s` (the filter keeps 10 buckets across it)",
            );
        }
        let rearm_ms = self.rearm_after.as_millis();
        if !whole_seconds(&self.rearm_after) || !(1000..=86_400_000).contains(&rearm_ms) {
            p.add(
                format!("{field}.rearmAfter"),
                format!("{} is not whole seconds from 1s to 24h", self.rearm_after),
                "write e.g. `rearmAfter: 30s`",
            );
        } else if rearm_ms < window_ms {
            p.add(
                format!("{field}.rearmAfter"),
                format!(
                    "{} is shorter than the window ({})",
                    self.rearm_after, self.window
                ),
                format!("write at least `rearmAfter: {}`", self.window),
            );
        }
        if !(100..=60_000).contains(&self.check_interval.as_millis()) {
            p.add(
                format!("{field}.checkInterval"),
                format!("{} is not between 100ms and 1m", self.check_interval),
                "write how often the controller reads the guard, e.g. `checkInterval: 1s`",
            );
        }
    }
}

/// A Kubernetes object name (DNS-1123 subdomain).
fn is_object_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

impl IstioRouterSpec {
    fn validate_into(&self, p: &mut Problems) {
        let base = "spec.router.istio";
        if !is_object_name(&self.virtual_service) {
            p.add(
                format!("{base}.virtualService"),
                format!("{:?} is not a Kubernetes object name", self.virtual_service),
                "write the name of the VirtualService in the Canary's namespace, e.g. `virtualService: app`",
            );
        }
        if self.route.trim().is_empty() {
            p.add(
                format!("{base}.route"),
                "is empty",
                "write the `name` of the VirtualService's HTTP route to shift, e.g. `route: primary`",
            );
        }
        match (&self.stable_host, &self.canary_host) {
            (Some(_), None) | (None, Some(_)) => p.add(
                format!("{base}.canaryHost"),
                "stableHost and canaryHost must be set together",
                "set both (two Services: `stableHost: app-stable`, `canaryHost: app-canary`) or neither (destinations found by subset)",
            ),
            (Some(stable), Some(canary)) if stable == canary => p.add(
                format!("{base}.canaryHost"),
                "is the same as stableHost",
                "name the two different Services, or drop both to match destinations by subset",
            ),
            _ => {}
        }
        if let Some(name) = &self.destination_rule {
            if !is_object_name(name) {
                p.add(
                    format!("{base}.destinationRule"),
                    format!("{name:?} is not a Kubernetes object name"),
                    "write the DestinationRule's name, e.g. `destinationRule: app`, or drop it",
                );
            }
        }
        if let Some(header_route) = &self.header_route {
            p.0.extend(crate::router_spec::validate_header_route(
                &format!("{base}.headerRoute"),
                header_route,
                &self.route,
            ));
        }
        if let Some(percentage) = self.mirror_percentage {
            let field = format!("{base}.mirrorPercentage");
            if units::percent(p, &field, percentage, "mirrorPercentage", "10") && percentage <= 0.0
            {
                p.add(
                    field,
                    format!("{} % mirrors nothing", format_number(percentage)),
                    "write the percentage of requests to copy, e.g. `mirrorPercentage: 10`, or drop it to mirror nothing",
                );
            }
        }
    }
}

/// The one rule for numbers that are shares (docs/spec.md, "Units"): a field in percent takes
/// 0-100 and refuses a value above 0 and at most 1, which is almost always a fraction meant as a
/// percentage (`0.9` for 90%); a field that is a fraction (0-1) refuses a value above 1, almost
/// always a percentage meant as a fraction. Both suggest the converted value.
mod units {
    use super::{format_number, Problems};

    /// `value` in a percent field: refuse 0 < value ≤ 1, and anything outside 0-100.
    pub(super) fn percent(
        p: &mut Problems,
        field: &str,
        value: f64,
        what: &str,
        example: &str,
    ) -> bool {
        let key = field.rsplit('.').next().unwrap_or(field);
        if value > 0.0 && value <= 1.0 {
            p.add(
                field,
                format!(
                    "{} looks like a fraction, but {what} is in percent (0-100)",
                    format_number(value)
                ),
                format!(
                    "did you mean {} (%)? write `{key}: {}`",
                    format_number(value * 100.0),
                    format_number(value * 100.0)
                ),
            );
            return false;
        }
        if !(0.0..=100.0).contains(&value) {
            p.add(
                field,
                format!(
                    "{} % is not a percentage from 0 to 100",
                    format_number(value)
                ),
                format!("write {what} in percent, e.g. `{key}: {example}`"),
            );
            return false;
        }
        true
    }

    /// The range of a fraction field: above 0 and below (or, `inclusive`, at most) `max`.
    pub(super) struct Fraction {
        pub max: f64,
        pub inclusive: bool,
    }

    impl Fraction {
        fn contains(&self, value: f64) -> bool {
            value > 0.0 && (value < self.max || (self.inclusive && value == self.max))
        }

        fn describe(&self) -> String {
            let max = format_number(self.max);
            if self.inclusive {
                format!("above 0, at most {max}")
            } else {
                format!("above 0, below {max}")
            }
        }
    }

    /// `value` in a fraction field: a value that fits once divided by 100 is taken for a
    /// percentage.
    pub(super) fn fraction(
        p: &mut Problems,
        field: &str,
        value: f64,
        range: Fraction,
        what: &str,
        example: &str,
    ) -> bool {
        if range.contains(value) {
            return true;
        }
        let key = field.rsplit('.').next().unwrap_or(field);
        if value > 1.0 && value <= 100.0 && range.contains(value / 100.0) {
            let meant = format_number(value / 100.0);
            p.add(
                field,
                format!(
                    "{} looks like a percentage, but {what} is a fraction ({})",
                    format_number(value),
                    range.describe()
                ),
                format!("did you mean {meant}? write `{key}: {meant}`"),
            );
        } else {
            p.add(
                field,
                format!(
                    "{} is not a fraction {}",
                    format_number(value),
                    range.describe()
                ),
                format!("write {what} as a fraction, e.g. `{key}: {example}`"),
            );
        }
        false
    }
}

impl AnalysisSpec {
    fn validate_into(&self, p: &mut Problems, has_prometheus: bool) {
        self.validate_schedule(p);
        self.validate_steps(p);
        self.validate_checks_present(p);
        self.validate_error_statuses(p);
        if let Some(compare) = &self.compare_with_stable {
            compare.validate_into(p, "spec.analysis.compareWithStable");
        }
        if let Some(burn) = &self.slo_burn_rate {
            burn.validate_into(p, "spec.analysis.sloBurnRate", self.interval);
        }
        if let Some(guard) = &self.guard {
            guard.validate_into(p, "spec.analysis.guard");
        }
        let mut seen = Vec::new();
        for (i, metric) in self.metrics.iter().enumerate() {
            let field = format!("spec.analysis.metrics[{i}]");
            if seen.contains(&metric.name.as_str()) {
                p.add(
                    format!("{field}.name"),
                    format!("{:?} is listed twice", metric.name),
                    "list each metric once",
                );
            }
            seen.push(metric.name.as_str());
            metric.validate_into(p, &field, has_prometheus);
        }
    }

    /// Interval, rollback threshold, limits.
    fn validate_schedule(&self, p: &mut Problems) {
        let base = "spec.analysis";
        if self.interval.as_millis() < 1000 {
            p.add(
                format!("{base}.interval"),
                format!("{} is shorter than 1s", self.interval),
                "write a duration of at least 1s, e.g. `interval: 30s` (metrics need time to accumulate)",
            );
        }
        if self.metrics_failure_limit == 0 {
            p.add(
                format!("{base}.metricsFailureLimit"),
                "must be at least 1 (failed metric reads in a row)",
                "write how many failed metric reads in a row halt the rollout, e.g. `metricsFailureLimit: 2`",
            );
        }
        match (self.threshold, self.failure_limit) {
            (Some(threshold), Some(limit)) => p.add(
                format!("{base}.failureLimit"),
                format!("is set together with threshold ({threshold} failed intervals)"),
                format!(
                    "keep one: `failureLimit: {limit}` (Argo: failures tolerated) is `threshold: {}` (Flagger: failures that roll back)",
                    limit.saturating_add(1)
                ),
            ),
            (Some(0), None) => p.add(
                format!("{base}.threshold"),
                "must be at least 1 (failed intervals that roll back)",
                "write the number of failed intervals that triggers a rollback, e.g. `threshold: 5` (or Argo's `failureLimit: 0` to roll back at the first failure)",
            ),
            _ => {}
        }
    }

    /// Steps, weights, startingStep.
    fn validate_steps(&self, p: &mut Problems) {
        let base = "spec.analysis";
        let styles = [
            self.steps.is_some(),
            self.step_weight.is_some() || self.max_weight.is_some(),
            self.step_weights.is_some(),
        ];
        match styles.iter().filter(|s| **s).count() {
            0 => p.add(
                base,
                "has no steps",
                "add `steps: [{setWeight: 20}, {pause: {duration: 1m}}, {setWeight: 50}]`, or `stepWeight: 10` with `maxWeight: 50`, or `stepWeights: [5, 20, 50]`",
            ),
            1 => {}
            _ => p.add(
                base,
                "sets more than one of steps, stepWeight/maxWeight and stepWeights",
                "keep exactly one way of describing the steps",
            ),
        }
        if let Some(steps) = &self.steps {
            if steps.is_empty() {
                p.add(
                    format!("{base}.steps"),
                    "is empty",
                    "list at least one step, e.g. `steps: [{setWeight: 20}]`",
                );
            }
            for (i, step) in steps.iter().enumerate() {
                if step.to_step().is_none() {
                    p.add(
                        format!("{base}.steps[{i}]"),
                        "must set exactly one of setWeight and pause",
                        "write `{setWeight: 20}`, `{pause: {duration: 1m}}` or `{pause: {}}` as separate steps",
                    );
                }
                if let Some(w) = step.set_weight.filter(|w| *w > 100) {
                    p.add(
                        format!("{base}.steps[{i}].setWeight"),
                        format!("{w} % is above 100"),
                        "write a whole percentage of traffic from 0 to 100, e.g. `setWeight: 20`",
                    );
                }
            }
        }
        if self.max_weight.is_some() && self.step_weight.is_none() {
            p.add(
                format!("{base}.stepWeight"),
                "is missing while maxWeight is set",
                "add the weight increase per step in percent, e.g. `stepWeight: 10`",
            );
        }
        if let Some(step) = self.step_weight {
            if step == 0 || step > 100 {
                p.add(
                    format!("{base}.stepWeight"),
                    format!("{step} % is not between 1 and 100"),
                    "write the weight increase per step in percent, e.g. `stepWeight: 10`",
                );
            }
            let max = self.max_weight.unwrap_or(DEFAULT_MAX_WEIGHT);
            if max == 0 || max > 100 || max < step {
                p.add(
                    format!("{base}.maxWeight"),
                    format!("{max} % is not between stepWeight ({step} %) and 100 %"),
                    format!(
                        "write the last weight before promotion in percent, at least stepWeight, e.g. `maxWeight: {}`",
                        step.clamp(DEFAULT_MAX_WEIGHT, 100)
                    ),
                );
            }
        }
        if let Some(weights) = &self.step_weights {
            if weights.is_empty() {
                p.add(
                    format!("{base}.stepWeights"),
                    "is empty",
                    "write the weights in percent, e.g. `stepWeights: [5, 20, 50]`",
                );
            }
            for (i, w) in weights.iter().enumerate().filter(|(_, w)| **w > 100) {
                p.add(
                    format!("{base}.stepWeights[{i}]"),
                    format!("{w} % is above 100"),
                    "write a whole percentage of traffic from 0 to 100",
                );
            }
        }
        let plan_len = self.plan().len();
        if plan_len > 0 && self.starting_step >= plan_len {
            p.add(
                format!("{base}.startingStep"),
                format!(
                    "{} is past the last step (a 0-based index; there are {plan_len} steps)",
                    self.starting_step
                ),
                format!("write a step index from 0 to {}", plan_len - 1),
            );
        }
    }

    /// A spec that would promote whatever the canary does is refused unless it says so.
    fn validate_checks_present(&self, p: &mut Problems) {
        if self.has_checks() || self.unchecked {
            return;
        }
        p.add(
            "spec.analysis",
            "has no checks: nothing would stop a failing canary from being promoted (the guard and webhooks alone do not judge it)",
            "add `compareWithStable: {}` (canary vs stable), `metrics: [{name: request-success-rate, thresholdRange: {min: 99}}]` or `sloBurnRate: {objective: 99.9}`; or write `unchecked: true` to promote on traffic alone",
        );
    }

    fn validate_error_statuses(&self, p: &mut Problems) {
        use crate::contract::ResponseClass;
        let field = "spec.analysis.errorStatuses";
        if !self.error_statuses.contains(&ResponseClass::ServerError) {
            p.add(
                field,
                "does not list 5xx: server errors would count as good requests",
                "list 5xx and what else is bad, e.g. `errorStatuses: [5xx, 4xx]`",
            );
        }
        for (i, class) in self.error_statuses.iter().enumerate() {
            if matches!(class, ResponseClass::Informational | ResponseClass::Success) {
                p.add(
                    format!("{field}[{i}]"),
                    format!("{} cannot be an error status", class.label()),
                    "list only 3xx, 4xx and 5xx (no response always counts), e.g. `errorStatuses: [5xx, 4xx]`",
                );
            }
        }
    }
}

impl CompareSpec {
    fn validate_into(&self, p: &mut Problems, field: &str) {
        units::fraction(
            p,
            &format!("{field}.falseRollbackRate"),
            self.false_rollback_rate,
            units::Fraction {
                max: 0.5,
                inclusive: false,
            },
            "falseRollbackRate (a probability)",
            "0.03",
        );
        if !(self.tolerance >= 1.0 && self.tolerance <= 10.0) {
            p.add(
                format!("{field}.tolerance"),
                format!(
                    "{}× is not a multiplier between 1 and 10",
                    format_number(self.tolerance)
                ),
                "write how many times the stable's rate is acceptable, e.g. `tolerance: 1.2` (up to 20% worse)",
            );
        }
        if self.signals.is_empty() {
            p.add(
                format!("{field}.signals"),
                "is empty",
                "write `signals: [errors, latency]`, or remove compareWithStable",
            );
        }
        if let Some(bounds) = &self.latency_boundaries_ms {
            if bounds.is_empty() || bounds.iter().any(|b| !b.is_finite() || *b <= 0.0) {
                p.add(
                    format!("{field}.latencyBoundariesMs"),
                    "must list positive bucket boundaries in milliseconds",
                    "write histogram bucket boundaries in ms, e.g. `latencyBoundariesMs: [250, 500]`, or remove it",
                );
            }
        }
        if let Some(margin) = self.promotion_margin {
            if !(margin > self.tolerance.max(1.0) && margin.is_finite()) {
                p.add(
                    format!("{field}.promotionMargin"),
                    format!(
                        "{}× must be a multiplier above the tolerance ({}×)",
                        format_number(margin),
                        format_number(self.tolerance)
                    ),
                    "write e.g. `promotionMargin: 2.0` (at most twice the stable's error rate)",
                );
            }
        }
    }
}

impl BurnRateSpec {
    fn validate_into(&self, p: &mut Problems, field: &str, interval: HumanDuration) {
        let objective = format!("{field}.objective");
        if units::percent(p, &objective, self.objective, "the objective", "99.9")
            && self.objective >= 100.0
        {
            p.add(
                &objective,
                format!("{} % leaves no error budget", format_number(self.objective)),
                "write the success objective in percent, below 100, e.g. `objective: 99.9`",
            );
        } else if self.objective == 0.0 {
            p.add(
                &objective,
                "0 % is not an objective",
                "write the success objective in percent, e.g. `objective: 99.9`",
            );
        }
        if !(self.max_burn_rate > 0.0 && self.max_burn_rate.is_finite()) {
            p.add(
                format!("{field}.maxBurnRate"),
                format!(
                    "{}× is not a positive multiplier of the budget",
                    format_number(self.max_burn_rate)
                ),
                "write the burn rate that fails the check (1 = spending the budget exactly), e.g. `maxBurnRate: 14.4`",
            );
        }
        if self.long_window < interval {
            p.add(
                format!("{field}.longWindow"),
                format!(
                    "{} is shorter than the interval ({})",
                    self.long_window, interval
                ),
                "make the window span several intervals, e.g. `longWindow: 5m`",
            );
        }
        if self.short_window() > self.long_window || self.short_window().as_millis() == 0 {
            p.add(
                format!("{field}.shortWindow"),
                format!(
                    "{} must be a positive duration not longer than longWindow ({})",
                    self.short_window(),
                    self.long_window
                ),
                "write e.g. `shortWindow: 30s`, or leave it out (longWindow / 12)",
            );
        }
    }
}

impl MetricSpec {
    fn validate_into(&self, p: &mut Problems, field: &str, has_prometheus: bool) {
        let range = self.threshold_range;
        let kind = self.kind();
        let unit = kind.map_or("", MetricKind::unit);
        validate_range_shape(p, &format!("{field}.thresholdRange"), &range, unit);
        match kind {
            None if self.query.is_some() => p.add(
                format!("{field}.name"),
                format!("{:?} is a built-in metric and cannot have a query", self.name),
                "give the custom metric its own name, e.g. `name: error-budget-burn`, or remove `query`",
            ),
            None => p.add(
                format!("{field}.name"),
                format!("unknown metric {:?}", self.name),
                format!(
                    "use one of: {}, or add a PromQL `query` for a custom metric",
                    KNOWN_METRICS.join(", ")
                ),
            ),
            Some(MetricKind::Custom) => self.validate_custom(p, field, has_prometheus),
            Some(MetricKind::SuccessRate) => {
                self.refuse_quantile(p, field);
                for (bound, value) in range.bounds() {
                    if let Some(v) = value.filter(|v| v.is_finite()) {
                        let what = "request-success-rate (the share of requests that are not errors)";
                        units::percent(p, &format!("{field}.thresholdRange.{bound}"), v, what, "99");
                    }
                }
            }
            Some(MetricKind::Duration { quantile }) => {
                let fraction = units::Fraction {
                    max: 1.0,
                    inclusive: false,
                };
                units::fraction(
                    p,
                    &format!("{field}.quantile"),
                    quantile,
                    fraction,
                    "quantile",
                    "0.99",
                );
                if range.max.is_none() && range.below.is_none() {
                    p.add(
                        format!("{field}.thresholdRange.max"),
                        "is missing: a latency limit needs a maximum in milliseconds",
                        "write e.g. `thresholdRange: {max: 500}` (500 ms)",
                    );
                }
                for (bound, value) in range.bounds() {
                    if let Some(v) = value.filter(|v| v.is_finite() && *v < 1.0) {
                        p.add(
                            format!("{field}.thresholdRange.{bound}"),
                            format!(
                                "{} ms is below the 1 ms resolution of Envoy's latency histograms; request-duration is in milliseconds",
                                format_number(v)
                            ),
                            format!(
                                "did you mean {} (ms)? write `{bound}: {}`",
                                format_number(v * 1000.0),
                                format_number(v * 1000.0)
                            ),
                        );
                    }
                }
            }
        }
    }

    fn refuse_quantile(&self, p: &mut Problems, field: &str) {
        if self.quantile.is_some() {
            p.add(
                format!("{field}.quantile"),
                "only applies to request-duration",
                "remove `quantile`",
            );
        }
    }

    fn validate_custom(&self, p: &mut Problems, field: &str, has_prometheus: bool) {
        let template = self.query.as_deref().unwrap_or_default();
        if template.trim().is_empty() {
            p.add(
                format!("{field}.query"),
                "is empty",
                "write a PromQL expression that returns one number",
            );
        }
        let probe = QueryVariables {
            name: "n".into(),
            namespace: "ns".into(),
            service: "s".into(),
            stable: "st".into(),
            canary: "c".into(),
            interval: "30s".into(),
        };
        if let Err(e) = render_query(template, &probe) {
            p.add(
                format!("{field}.query"),
                e.to_string(),
                "fix the template variable",
            );
        }
        if !has_prometheus {
            p.add(
                format!("{field}.query"),
                "needs a Prometheus metrics source",
                "set `spec.metricsSource.prometheus.address`, or use a built-in metric",
            );
        }
        self.refuse_quantile(p, field);
    }
}

/// Bounds that can hold at all: at least one, finite, not contradicting each other.
fn validate_range_shape(p: &mut Problems, field: &str, range: &ThresholdRange, unit: &str) {
    if !range.is_bounded() {
        p.add(
            field,
            "has no bound",
            "set one, e.g. `thresholdRange: {min: 99}` (inclusive) or `{above: 99}` (strict)",
        );
    }
    for (bound, value) in range.bounds() {
        if value.is_some_and(|v| !v.is_finite()) {
            p.add(
                format!("{field}.{bound}"),
                "is not a finite number",
                "write a plain number",
            );
        }
    }
    for (low, high, a, b) in [
        ("min", "above", range.min, range.above),
        ("max", "below", range.max, range.below),
    ] {
        if a.is_some() && b.is_some() {
            p.add(
                format!("{field}.{high}"),
                format!("is set together with {low}"),
                format!("keep one: `{low}` is inclusive, `{high}` is strict"),
            );
        }
    }
    let lower = range.min.or(range.above);
    let upper = range.max.or(range.below);
    if let (Some(lo), Some(hi)) = (lower, upper) {
        let empty = lo > hi || (lo == hi && (range.above.is_some() || range.below.is_some()));
        if empty {
            p.add(
                field,
                format!("no value passes: {}", range.with_unit(unit)),
                "swap the bounds or drop one",
            );
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const EXAMPLE: &str = r#"
apiVersion: fledge.dev/v1alpha1
kind: Canary
metadata: {name: app}
spec:
  service: app
  stable: {subset: stable}
  canary: {subset: canary}
  metricsSource:
    envoyAdmin: {urls: ["http://127.0.0.1:9901"]}
  router:
    envoyRds:
      path: /tmp/rds/routes.json
      routeConfiguration: fledge_route
      virtualHost: app
      route: primary
      stableCluster: app_stable
      canaryCluster: app_canary
      adminUrl: http://127.0.0.1:9901
  analysis:
    interval: 10s
    threshold: 2
    minCanaryRequests: 10
    steps:
      - setWeight: 20
      - pause: {duration: 30s}
      - setWeight: 50
      - pause: {}
    metrics:
      - {name: request-success-rate, thresholdRange: {min: 99}}
      - {name: request-duration, quantile: 0.99, thresholdRange: {max: 500}}
"#;

    pub(crate) fn example() -> Canary {
        serde_yaml::from_str(EXAMPLE).unwrap()
    }

    fn fields_of(canary: &Canary) -> Vec<String> {
        match canary.validate() {
            Ok(()) => vec![],
            Err(SpecErrors(errors)) => errors.into_iter().map(|e| e.field).collect(),
        }
    }

    #[test]
    fn example_is_valid_and_parses_steps() {
        let c = example();
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(
            c.spec.analysis.plan(),
            vec![
                Step::SetWeight(20),
                Step::Pause(Pause {
                    duration: Some(HumanDuration::from_secs(30))
                }),
                Step::SetWeight(50),
                Step::Pause(Pause { duration: None }),
            ]
        );
    }

    #[test]
    fn guard_defaults_validation_and_filter_mapping() {
        let yaml = EXAMPLE.replace("    threshold: 2\n", "    threshold: 2\n    guard: {}\n");
        let c: Canary = serde_yaml::from_str(&yaml).unwrap();
        assert_eq!(c.validate(), Ok(()));
        let guard = c.spec.analysis.guard.clone().unwrap();
        assert_eq!(guard, GuardSpec::default());
        assert_eq!(
            guard.filter_guard("canary"),
            crate::filter_config::GuardedService::default()
        );
        let bad = |edit: fn(&mut GuardSpec)| {
            let mut c = c.clone();
            edit(c.spec.analysis.guard.as_mut().unwrap());
            match c.validate() {
                Ok(()) => vec![],
                Err(SpecErrors(errors)) => errors
                    .into_iter()
                    .map(|e| {
                        assert!(!e.fix.is_empty());
                        e.field
                    })
                    .collect(),
            }
        };
        let field = |name: &str| vec![format!("spec.analysis.guard.{name}")];
        assert_eq!(bad(|g| g.max_error_ratio = 0.0), field("maxErrorRatio"));
        assert_eq!(
            bad(|g| g.max_error_ratio = f64::NAN),
            field("maxErrorRatio")
        );
        assert_eq!(bad(|g| g.min_requests = 0), field("minRequests"));
        assert_eq!(
            bad(|g| g.window = HumanDuration::from_millis(1500)),
            field("window")
        );
        assert_eq!(
            bad(|g| g.rearm_after = HumanDuration::from_secs(5)),
            field("rearmAfter")
        );
        assert_eq!(
            bad(|g| g.check_interval = HumanDuration::from_millis(10)),
            field("checkInterval")
        );
        let yaml = EXAMPLE.replace(
            "    threshold: 2\n",
            "    threshold: 2\n    guard: {maxErrorRate: 1}\n",
        );
        let err = serde_yaml::from_str::<Canary>(&yaml)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `maxErrorRate`"), "{err}");
    }

    #[test]
    fn defaults_apply() {
        let yaml = EXAMPLE
            .replace("    interval: 10s\n", "")
            .replace("    threshold: 2\n", "")
            .replace("    minCanaryRequests: 10\n", "");
        let c: Canary = serde_yaml::from_str(&yaml).unwrap();
        assert_eq!(c.spec.analysis.interval, HumanDuration::from_secs(30));
        assert_eq!(c.spec.analysis.rollback_threshold(), 5);
        assert_eq!(c.spec.analysis.min_canary_requests, 20);
    }

    #[test]
    fn step_weight_plans() {
        let cases: &[(Option<u8>, Option<u8>, &[u8])] = &[
            (Some(10), None, &[10, 20, 30, 40, 50]),
            (Some(20), Some(80), &[20, 40, 60, 80]),
            (Some(30), Some(80), &[30, 60, 80]),
            (Some(50), Some(50), &[50]),
            (Some(25), Some(100), &[25, 50, 75, 100]),
        ];
        for (step, max, want) in cases {
            let mut a = example().spec.analysis;
            a.steps = None;
            a.step_weight = *step;
            a.max_weight = *max;
            let got: Vec<u8> = a
                .plan()
                .into_iter()
                .map(|s| match s {
                    Step::SetWeight(w) => w,
                    Step::Pause(_) => panic!("pause in a stepWeight plan"),
                })
                .collect();
            assert_eq!(got, *want, "stepWeight {step:?} maxWeight {max:?}");
        }
    }

    #[test]
    fn unknown_fields_are_rejected_at_parse_time() {
        let yaml = EXAMPLE.replace("threshold: 2", "treshold: 2");
        let err = serde_yaml::from_str::<Canary>(&yaml)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `treshold`"), "{err}");
        assert!(err.contains("threshold"), "{err}");
    }

    #[test]
    fn envoy_cluster_stats_is_one_source_with_two_different_clusters() {
        let mut c = example();
        let stats = |stable: &str, canary: &str| EnvoyClusterStatsSpec {
            urls: vec!["http://127.0.0.1:9901".into()],
            stable_cluster: stable.into(),
            canary_cluster: canary.into(),
            timeout: HumanDuration::from_secs(2),
        };
        c.spec.metrics_source.envoy_cluster_stats = Some(stats("app_stable", "app_canary"));
        assert!(fields_of(&c).contains(&"spec.metricsSource".to_string()));
        c.spec.metrics_source.envoy_admin = None;
        assert_eq!(c.validate(), Ok(()));
        c.spec.metrics_source.envoy_cluster_stats = Some(stats("app", "app"));
        assert!(fields_of(&c)
            .contains(&"spec.metricsSource.envoyClusterStats.canaryCluster".to_string()));
        c.spec.metrics_source.envoy_cluster_stats = Some(EnvoyClusterStatsSpec {
            urls: vec!["ftp://x".into()],
            ..stats("", "app_canary")
        });
        let fields = fields_of(&c);
        assert!(fields.contains(&"spec.metricsSource.envoyClusterStats.urls[0]".to_string()));
        assert!(fields.contains(&"spec.metricsSource.envoyClusterStats.stableCluster".to_string()));
        // YAML, as an operator writes it for Istio's cluster names.
        let yaml = EXAMPLE.replace(
            r#"envoyAdmin: {urls: ["http://127.0.0.1:9901"]}"#,
            r#"envoyClusterStats: {urls: ["http://127.0.0.1:15000"], stableCluster: "outbound|80|stable|app.shop.svc.cluster.local", canaryCluster: "outbound|80|canary|app.shop.svc.cluster.local"}"#,
        );
        let parsed: Canary = serde_yaml::from_str(&yaml).unwrap();
        assert_eq!(parsed.validate(), Ok(()));
        let stats = parsed.spec.metrics_source.envoy_cluster_stats.unwrap();
        assert_eq!(
            stats.canary_cluster,
            "outbound|80|canary|app.shop.svc.cluster.local"
        );
        assert_eq!(stats.timeout, HumanDuration::from_secs(2));
    }

    #[test]
    fn a_label_the_filter_cannot_record_is_rejected_with_the_value_it_would_record() {
        let mut canary: Canary = serde_yaml::from_str(EXAMPLE).unwrap();
        canary.spec.service = "app.shop".into();
        let errors = canary.validate().unwrap_err().to_string();
        assert!(errors.contains("spec.service"), "{errors}");
        assert!(errors.contains("`app_shop`"), "{errors}");
    }

    #[test]
    fn invalid_fields_are_named_with_a_fix() {
        type Mutate = fn(&mut Canary);
        let cases: &[(Mutate, &str)] = &[
            (|c| c.api_version = "v1".into(), "apiVersion"),
            (|c| c.kind = "Rollout".into(), "kind"),
            (|c| c.metadata.name = "App_1".into(), "metadata.name"),
            (|c| c.spec.service = " ".into(), "spec.service"),
            (|c| c.spec.service = "app.shop".into(), "spec.service"),
            (
                |c| c.spec.canary.subset = "v2\"} or vector(1) #".into(),
                "spec.canary.subset",
            ),
            (
                |c| c.metadata.namespace = Some("Shop Floor".into()),
                "metadata.namespace",
            ),
            (
                |c| c.spec.canary.subset = "stable".into(),
                "spec.canary.subset",
            ),
            (|c| c.spec.stable.subset = "".into(), "spec.stable.subset"),
            (
                |c| c.spec.analysis.interval = HumanDuration::from_millis(10),
                "spec.analysis.interval",
            ),
            (
                |c| c.spec.analysis.threshold = Some(0),
                "spec.analysis.threshold",
            ),
            (
                |c| c.spec.analysis.steps = Some(vec![]),
                "spec.analysis.steps",
            ),
            (
                |c| c.spec.analysis.steps = Some(vec![StepSpec::set_weight(120)]),
                "spec.analysis.steps[0].setWeight",
            ),
            (
                |c| {
                    c.spec.analysis.steps = Some(vec![StepSpec {
                        set_weight: Some(10),
                        pause: Some(Pause::default()),
                    }])
                },
                "spec.analysis.steps[0]",
            ),
            (
                |c| c.spec.analysis.steps = Some(vec![StepSpec::default()]),
                "spec.analysis.steps[0]",
            ),
            (
                |c| c.spec.metrics_source.envoy_admin = None,
                "spec.metricsSource",
            ),
            (|c| c.spec.router.envoy_rds = None, "spec.router"),
            (|c| c.spec.analysis.steps = None, "spec.analysis"),
            (|c| c.spec.analysis.step_weight = Some(10), "spec.analysis"),
            (
                |c| c.spec.analysis.starting_step = 4,
                "spec.analysis.startingStep",
            ),
            (
                |c| c.spec.analysis.metrics[0].name = "success".into(),
                "spec.analysis.metrics[0].name",
            ),
            (
                |c| c.spec.analysis.metrics[0].threshold_range = ThresholdRange::default(),
                "spec.analysis.metrics[0].thresholdRange",
            ),
            (
                |c| c.spec.analysis.metrics[0].threshold_range.min = Some(120.0),
                "spec.analysis.metrics[0].thresholdRange.min",
            ),
            (
                |c| c.spec.analysis.metrics[0].quantile = Some(0.5),
                "spec.analysis.metrics[0].quantile",
            ),
            (
                |c| c.spec.analysis.metrics[1].quantile = Some(1.5),
                "spec.analysis.metrics[1].quantile",
            ),
            (
                |c| {
                    c.spec.analysis.metrics[1].threshold_range = ThresholdRange {
                        min: Some(1.0),
                        max: None,
                        ..ThresholdRange::default()
                    }
                },
                "spec.analysis.metrics[1].thresholdRange.max",
            ),
            (
                |c| c.spec.analysis.metrics[1].name = METRIC_SUCCESS_RATE.into(),
                "spec.analysis.metrics[1].name",
            ),
            (
                |c| c.spec.analysis.metrics[0].threshold_range.max = Some(f64::NAN),
                "spec.analysis.metrics[0].thresholdRange.max",
            ),
            (
                |c| {
                    let a = c.spec.metrics_source.envoy_admin.as_mut().unwrap();
                    a.urls = vec!["127.0.0.1:9901".into()];
                },
                "spec.metricsSource.envoyAdmin.urls[0]",
            ),
            (
                |c| {
                    let a = c.spec.metrics_source.envoy_admin.as_mut().unwrap();
                    a.urls.clear();
                },
                "spec.metricsSource.envoyAdmin.urls",
            ),
            (
                |c| {
                    let r = c.spec.router.envoy_rds.as_mut().unwrap();
                    r.route = String::new();
                },
                "spec.router.envoyRds.route",
            ),
            (
                |c| {
                    let r = c.spec.router.envoy_rds.as_mut().unwrap();
                    r.canary_cluster = r.stable_cluster.clone();
                },
                "spec.router.envoyRds.canaryCluster",
            ),
            (
                |c| {
                    let r = c.spec.router.envoy_rds.as_mut().unwrap();
                    r.admin_url = "localhost".into();
                },
                "spec.router.envoyRds.adminUrl",
            ),
        ];
        for (mutate, field) in cases {
            let mut c = example();
            mutate(&mut c);
            let fields = fields_of(&c);
            assert!(
                fields.iter().any(|f| f == field),
                "expected an error on {field}, got {fields:?}"
            );
        }
    }

    #[test]
    fn step_weight_ranges() {
        let mut c = example();
        c.spec.analysis.steps = None;
        c.spec.analysis.step_weight = Some(60);
        c.spec.analysis.max_weight = Some(50);
        assert!(fields_of(&c).contains(&"spec.analysis.maxWeight".to_string()));
        c.spec.analysis.step_weight = Some(0);
        assert!(fields_of(&c).contains(&"spec.analysis.stepWeight".to_string()));
        c.spec.analysis.step_weight = None;
        assert!(fields_of(&c).contains(&"spec.analysis.stepWeight".to_string()));
    }

    #[test]
    fn all_problems_are_reported_at_once_and_readably() {
        let mut c = example();
        c.spec.analysis.threshold = Some(0);
        c.spec.analysis.metrics[0].name = "latency".into();
        let err = c.validate().unwrap_err();
        assert_eq!(err.0.len(), 2);
        let text = err.to_string();
        assert!(text.starts_with("2 problems in the Canary spec:"), "{text}");
        assert!(
            text.contains("spec.analysis.threshold: must be at least 1 (failed intervals that roll back); write"),
            "{text}"
        );
        assert!(
            text.contains("use one of: request-success-rate, request-duration"),
            "{text}"
        );
    }

    #[test]
    fn query_templates_render_and_reject_unknown_variables() {
        let c = example();
        let vars = QueryVariables::for_canary(&c);
        assert_eq!(
            render_query(
                "rate(x{svc=\"{{ service }}\",v=\"{{canary}}\"}[{{ interval }}])",
                &vars
            )
            .unwrap(),
            "rate(x{svc=\"app\",v=\"canary\"}[10s])"
        );
        assert_eq!(render_query("up", &vars).unwrap(), "up");
        assert_eq!(
            render_query("x{{ version }}", &vars),
            Err(TemplateError::UnknownVariable("version".into()))
        );
        assert_eq!(
            render_query("x{{ service", &vars),
            Err(TemplateError::Unclosed(1))
        );
    }

    #[test]
    fn custom_metrics_need_prometheus_and_a_good_template() {
        let mut c = example();
        c.spec.analysis.metrics.push(MetricSpec {
            name: "error-burn".into(),
            threshold_range: ThresholdRange {
                min: None,
                max: Some(1.0),
                ..ThresholdRange::default()
            },
            quantile: None,
            query: Some("sum(x{v=\"{{ canary }}\"})".into()),
        });
        assert!(fields_of(&c).contains(&"spec.analysis.metrics[2].query".to_string()));
        c.spec.metrics_source = MetricsSourceSpec {
            prometheus: Some(PrometheusSpec {
                address: "http://127.0.0.1:9090".into(),
                timeout: HumanDuration::from_secs(5),
            }),
            ..MetricsSourceSpec::default()
        };
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(c.spec.analysis.metrics[2].kind(), Some(MetricKind::Custom));
        c.spec.analysis.metrics[2].query = Some("x{{ nope }}".into());
        assert!(fields_of(&c).contains(&"spec.analysis.metrics[2].query".to_string()));
        c.spec.analysis.metrics[2].query = Some("x".into());
        c.spec.analysis.metrics[2].name = METRIC_SUCCESS_RATE.into();
        assert!(fields_of(&c).contains(&"spec.analysis.metrics[2].name".to_string()));
        c.spec.analysis.metrics[2].name = "x".into();
        c.spec.metrics_source.envoy_admin = example().spec.metrics_source.envoy_admin;
        assert!(fields_of(&c).contains(&"spec.metricsSource".to_string()));
    }

    #[test]
    fn compare_and_burn_rate_defaults_and_validation() {
        let yaml = EXAMPLE.replace(
            "    metrics:\n",
            "    compareWithStable: {}\n    sloBurnRate: {objective: 99.5}\n    metrics:\n",
        );
        let c: Canary = serde_yaml::from_str(&yaml).unwrap();
        assert_eq!(c.validate(), Ok(()));
        let compare = c.spec.analysis.compare_with_stable.clone().unwrap();
        assert_eq!(compare, CompareSpec::default());
        let burn = c.spec.analysis.slo_burn_rate.clone().unwrap();
        assert_eq!(burn.max_burn_rate, 14.4);
        assert_eq!(burn.short_window(), HumanDuration::from_secs(25));

        type Mutate = fn(&mut Canary);
        let cases: &[(Mutate, &str)] = &[
            (
                |c| {
                    c.spec
                        .analysis
                        .compare_with_stable
                        .as_mut()
                        .unwrap()
                        .false_rollback_rate = 0.0
                },
                "falseRollbackRate",
            ),
            (
                |c| {
                    c.spec
                        .analysis
                        .compare_with_stable
                        .as_mut()
                        .unwrap()
                        .tolerance = 0.5
                },
                "tolerance",
            ),
            (
                |c| {
                    c.spec
                        .analysis
                        .compare_with_stable
                        .as_mut()
                        .unwrap()
                        .signals
                        .clear()
                },
                "signals",
            ),
            (
                |c| {
                    c.spec
                        .analysis
                        .compare_with_stable
                        .as_mut()
                        .unwrap()
                        .latency_boundaries_ms = Some(vec![-1.0])
                },
                "latencyBoundariesMs",
            ),
            (
                |c| {
                    c.spec
                        .analysis
                        .compare_with_stable
                        .as_mut()
                        .unwrap()
                        .promotion_margin = Some(0.9)
                },
                "promotionMargin",
            ),
            (
                |c| c.spec.analysis.slo_burn_rate.as_mut().unwrap().objective = 100.0,
                "objective",
            ),
            (
                |c| {
                    c.spec
                        .analysis
                        .slo_burn_rate
                        .as_mut()
                        .unwrap()
                        .max_burn_rate = 0.0
                },
                "maxBurnRate",
            ),
            (
                |c| {
                    c.spec.analysis.slo_burn_rate.as_mut().unwrap().long_window =
                        HumanDuration::from_secs(1)
                },
                "longWindow",
            ),
            (
                |c| {
                    c.spec.analysis.slo_burn_rate.as_mut().unwrap().short_window =
                        Some(HumanDuration::from_secs(600))
                },
                "shortWindow",
            ),
        ];
        for (mutate, field) in cases {
            let mut bad = c.clone();
            mutate(&mut bad);
            let fields = fields_of(&bad);
            assert!(
                fields.iter().any(|f| f.ends_with(field)),
                "{field}: {fields:?}"
            );
        }
    }

    #[test]
    fn threshold_range_contains() {
        let r = ThresholdRange {
            min: Some(99.0),
            max: None,
            ..ThresholdRange::default()
        };
        assert!(r.contains(99.0) && r.contains(100.0) && !r.contains(98.9));
        let r = ThresholdRange {
            min: None,
            max: Some(500.0),
            ..ThresholdRange::default()
        };
        assert!(r.contains(500.0) && !r.contains(500.1));
    }
}
