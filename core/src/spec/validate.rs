//! Validation: everything serde cannot check (ranges, exclusive options, cross-field rules),
//! every problem reported at once with the field and the fix.

use super::*;
use crate::duration::HumanDuration;
use crate::names::{is_dns_label, is_object_name};
use serde::{Deserialize, Serialize};
use std::fmt;

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

/// Problems collected while validating (shared with the workload fields' validation).
pub(crate) struct Problems(pub(crate) Vec<SpecError>);

impl Problems {
    pub(crate) fn add(
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
