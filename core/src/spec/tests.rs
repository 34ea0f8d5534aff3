use super::*;
use crate::duration::HumanDuration;

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
    assert!(
        fields_of(&c).contains(&"spec.metricsSource.envoyClusterStats.canaryCluster".to_string())
    );
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
        text.contains(
            "spec.analysis.threshold: must be at least 1 (failed intervals that roll back); write"
        ),
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
