//! The spec's types as an operator writes them, with their defaults and the few derived
//! values (the step plan, the rollback threshold) the rest of Fledge reads.

use crate::duration::HumanDuration;
use serde::{Deserialize, Serialize};
use std::fmt;

use crate::router_spec::{CookieMatchSpec, GatewayApiRouterSpec, HeaderMatchSpec};

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
    pub(super) fn set(&self) -> Vec<&'static str> {
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
    /// p50, p90, p99, or its slowest bucket when it is faster than those) plus the
    /// `request-duration` limit; until then latency is not compared, and a warning says so.
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
pub(super) const DEFAULT_MAX_WEIGHT: u8 = 50;

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
    pub(super) fn bounds(&self) -> [(&'static str, Option<f64>); 4] {
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
