//! The pieces of `fledge-bench-scale`: a fleet of thousands of Canaries mid-rollout, the gateways
//! and the Prometheus their metrics come from, and what the bench reads of the process under
//! test.
//!
//! ```text
//!  FakeApiServer (in this process, over HTTP) ◀──list/watch/status── fledge controller (measured)
//!  FakeGateway × G  /stats/prometheus: every service's fledge series ◀──scrapes──┘   │
//!  FakePrometheus   /api/v1/query: the same series from 2 gateway replicas ◀─queries──┘
//! ```
//!
//! Traffic is a function of time, the same for every reader: service `i`'s subset serves a fixed
//! rate, with 0.05 % 5xx, 0.2 % 4xx and latencies mostly 5–25 ms, so every canary passes its
//! checks at any interval of 1 s or more (success rate at least 95 %: see [`SUCCESS_RATE_MIN`]).
//! A gateway's page holds, per service, exactly what the filter and Envoy emit (see
//! [`GatewayPage`]): 6 request counters per subset (one per response class, all defined when the
//! pair is) and the duration histogram with Envoy's 19 default buckets plus `+Inf`, `_sum` and
//! `_count` — 56 lines of about 100 bytes (labels included), about 5.6 KB per service.

use anyhow::{Context, Result};
use axum::extract::{Form, RawQuery, State};
use axum::routing::get;
use chrono::{DateTime, Duration as ChronoDuration, Utc};
use fledge_core::observe::{LatencyHistogram, Observation, ObservationError, SubsetTraffic};
use fledge_core::rollout::{step, CanaryStatus, Input};
use fledge_core::spec::CanarySpec;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Envoy's default histogram buckets (ms), as `/stats/prometheus` prints them.
pub const ENVOY_BUCKETS: [&str; 19] = [
    "0.5", "1", "5", "10", "25", "50", "100", "250", "500", "1000", "2500", "5000", "10000",
    "30000", "60000", "300000", "600000", "1800000", "3600000",
];
/// Share of requests at or under each bucket bound.
const BUCKET_SHARE: [f64; 19] = [
    0.0, 0.02, 0.30, 0.60, 0.85, 0.95, 0.99, 0.999, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0,
    1.0, 1.0,
];
const CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "none"];
/// Requests per second per subset.
const STABLE_RPS: f64 = 100.0;
const CANARY_RPS: f64 = 30.0;
/// The fleet's success-rate threshold (percent): every interval of 1 s or more passes it.
const SUCCESS_RATE_MIN: f64 = 95.0;
/// Counters start as if the gateway had been up this long.
const UPTIME_AT_START_S: f64 = 86_400.0;

/// Where a Canary's metrics come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `envoyAdmin` on gateway `g`.
    Gateway(usize),
    /// `prometheus`, which scrapes two replicas of a gateway of its own.
    Prometheus,
}

/// One Canary of the fleet.
#[derive(Debug, Clone)]
pub struct Member {
    pub index: usize,
    pub namespace: String,
    pub name: String,
    pub source: Source,
    pub guard: bool,
}

impl Member {
    pub fn service(&self) -> &str {
        &self.name
    }
}

/// The fleet's shape.
#[derive(Debug, Clone)]
pub struct Fleet {
    pub members: Vec<Member>,
    pub gateways: usize,
    pub interval: Duration,
    /// Each pause step lasts this long (the fleet is mid-rollout, in pauses ending at spread
    /// times, so some canaries take a step during any window).
    pub pause: Duration,
}

impl Fleet {
    /// `canaries` Canaries in 20 namespaces; 1 in 10 reads Prometheus, the others a gateway of
    /// `services_per_gateway` services; every other one has the data-plane guard.
    pub fn new(
        canaries: usize,
        services_per_gateway: usize,
        interval: Duration,
        pause: Duration,
    ) -> Fleet {
        let mut on_gateways = 0usize;
        let members = (0..canaries)
            .map(|index| {
                let source = if index % 10 == 9 {
                    Source::Prometheus
                } else {
                    on_gateways += 1;
                    Source::Gateway((on_gateways - 1) / services_per_gateway.max(1))
                };
                Member {
                    index,
                    namespace: format!("team-{:02}", index % 20),
                    name: format!("svc-{index:05}"),
                    source,
                    guard: index % 2 == 0,
                }
            })
            .collect::<Vec<_>>();
        let gateways = members
            .iter()
            .filter_map(|m| match m.source {
                Source::Gateway(g) => Some(g + 1),
                Source::Prometheus => None,
            })
            .max()
            .unwrap_or(0);
        Fleet {
            members,
            gateways,
            interval,
            pause,
        }
    }

    pub fn on_gateway(&self, gateway: usize) -> Vec<&Member> {
        self.members
            .iter()
            .filter(|m| m.source == Source::Gateway(gateway))
            .collect()
    }

    pub fn on_prometheus(&self) -> Vec<&Member> {
        self.members
            .iter()
            .filter(|m| m.source == Source::Prometheus)
            .collect()
    }

    /// The `spec` of `member`'s Canary (JSON, as in the CRD).
    pub fn spec(&self, member: &Member, gateway_urls: &[String], prometheus_url: &str) -> Value {
        let metrics_source = match member.source {
            Source::Gateway(g) => json!({"envoyAdmin": {"urls": [gateway_urls[g]]}}),
            Source::Prometheus => json!({"prometheus": {"address": prometheus_url}}),
        };
        let pause = format!("{}s", self.pause.as_secs());
        let mut analysis = json!({
            "interval": format!("{}s", self.interval.as_secs()),
            "threshold": 3,
            "minCanaryRequests": 20,
            "steps": [
                {"setWeight": 10}, {"pause": {"duration": pause}},
                {"setWeight": 25}, {"pause": {"duration": pause}},
                {"setWeight": 50}, {"pause": {"duration": pause}},
            ],
            "metrics": [
                // 95, not 99: the counters are whole requests, so an interval that holds one of
                // the 0.05 % 5xx (one in 2,000) at a short interval (2 s of 30 requests a
                // second: 60 requests) reads 98.3 %, and at 99 the whole fleet failed checks
                // and rolled back within 200 s: the memory part measured a rollback storm.
                {"name": "request-success-rate", "thresholdRange": {"min": SUCCESS_RATE_MIN}},
                {"name": "request-duration", "quantile": 0.99, "thresholdRange": {"max": 500}},
            ],
        });
        if member.guard {
            analysis["guard"] = json!({});
        }
        json!({
            "service": member.service(),
            "stable": {"subset": "stable"},
            "canary": {"subset": "canary"},
            "metricsSource": metrics_source,
            "router": {"istio": {
                "virtualService": member.name,
                "route": "primary",
                "destinationRule": member.name,
            }},
            "analysis": analysis,
        })
    }

    /// A status `member` could have mid-rollout at `now`: the state machine itself run from the
    /// start through the first weight step into the first pause, which began a spread time ago
    /// (so pauses end at spread times from now on).
    pub fn mid_rollout_status(
        &self,
        member: &Member,
        spec: &CanarySpec,
        now: DateTime<Utc>,
    ) -> CanaryStatus {
        let interval = ChronoDuration::from_std(self.interval).unwrap_or_default();
        let pause = ChronoDuration::from_std(self.pause).unwrap_or_default();
        // Golden-ratio spread of the pause's start over its length.
        let spread = (member.index as f64 * 0.618_033_988_75).fract();
        let paused_for =
            ChronoDuration::milliseconds((pause.num_milliseconds() as f64 * spread) as i64);
        let mut at = now - paused_for - interval * 2;
        let mut status = CanaryStatus::default();
        for observation in [
            Err(ObservationError::Baseline),
            Ok(passing_observation(self.interval)),
        ] {
            let input = Input {
                observation: Some(observation),
                command: None,
            };
            status = step(spec, &status, &input, at).status;
            at += interval;
        }
        status
    }
}

/// An interval of traffic that passes the fleet's checks.
fn passing_observation(interval: Duration) -> Observation {
    let seconds = interval.as_secs_f64();
    Observation {
        stable: subset_traffic(STABLE_RPS * seconds),
        canary: subset_traffic(CANARY_RPS * seconds),
        ..Default::default()
    }
}

fn subset_traffic(requests: f64) -> SubsetTraffic {
    let counts = SubsetCounts::at(requests);
    SubsetTraffic {
        by_class: counts.by_class,
        latency: LatencyHistogram {
            bounds_ms: ENVOY_BUCKETS
                .iter()
                .filter_map(|b| b.parse().ok())
                .collect(),
            cumulative: counts.buckets.to_vec(),
            count: counts.total,
            sum_ms: counts.sum_ms,
        },
    }
}

/// One subset's cumulative counters after `requests` requests.
struct SubsetCounts {
    total: u64,
    by_class: [u64; 6],
    buckets: [u64; 19],
    sum_ms: f64,
}

impl SubsetCounts {
    fn at(requests: f64) -> SubsetCounts {
        let total = requests.max(0.0) as u64;
        let failed = total / 2000;
        let client_errors = total / 500;
        let mut buckets = [0u64; 19];
        for (bucket, share) in buckets.iter_mut().zip(BUCKET_SHARE) {
            *bucket = (total as f64 * share) as u64;
        }
        SubsetCounts {
            total,
            by_class: [
                0,
                total - failed - client_errors,
                0,
                client_errors,
                failed,
                0,
            ],
            buckets,
            sum_ms: total as f64 * 7.25,
        }
    }

    /// Service `service`'s subset (stable: `canary == false`) after `elapsed` seconds.
    fn of(service: usize, canary: bool, elapsed: f64) -> SubsetCounts {
        let rate = if canary { CANARY_RPS } else { STABLE_RPS };
        // A little variety between services, the same at every reading.
        let rate = rate * (1.0 + (service % 7) as f64 * 0.05);
        SubsetCounts::at(rate * (UPTIME_AT_START_S + elapsed))
    }
}

/// Renders a gateway's `/stats/prometheus` (with the controller's `filter`) the way Envoy 1.40
/// does: one `# TYPE` line per family, families in name order, each with every service's series.
pub struct GatewayPage {
    /// (service index, `fledge_service="svc-..."`)
    services: Vec<(usize, String)>,
    guarded: Vec<String>,
}

impl GatewayPage {
    pub fn new(members: &[&Member]) -> GatewayPage {
        GatewayPage {
            services: members
                .iter()
                .map(|m| (m.index, format!("fledge_service=\"{}\"", m.service())))
                .collect(),
            guarded: members
                .iter()
                .filter(|m| m.guard)
                .map(|m| format!("fledge_service=\"{}\"", m.service()))
                .collect(),
        }
    }

    /// The page for `filter` (Envoy's regex, recognised by what the controller sends).
    pub fn render(&self, filter: &str, elapsed: f64) -> String {
        if filter.contains("guard") {
            let mut page = String::with_capacity(self.guarded.len() * 60 + 64);
            page.push_str("# TYPE fledge_guard_tripped gauge\n");
            for labels in &self.guarded {
                let _ = writeln!(page, "fledge_guard_tripped{{{labels}}} 0");
            }
            return page;
        }
        let mut page = String::with_capacity(self.services.len() * 2800 + 256);
        page.push_str("# TYPE fledge_requests_total counter\n");
        for (index, service) in &self.services {
            for (subset, canary) in [("canary", true), ("stable", false)] {
                let counts = SubsetCounts::of(*index, canary, elapsed);
                for (class, count) in CLASSES.iter().zip(counts.by_class) {
                    let _ = writeln!(
                        page,
                        "fledge_requests_total{{{service},fledge_subset=\"{subset}\",fledge_class=\"{class}\"}} {count}"
                    );
                }
            }
        }
        page.push_str("# TYPE envoy_server_uptime gauge\n");
        let _ = writeln!(
            page,
            "envoy_server_uptime{{}} {}",
            (UPTIME_AT_START_S + elapsed) as u64
        );
        page.push_str("# TYPE fledge_request_duration_ms histogram\n");
        for (index, service) in &self.services {
            for (subset, canary) in [("canary", true), ("stable", false)] {
                let counts = SubsetCounts::of(*index, canary, elapsed);
                for (le, count) in ENVOY_BUCKETS.iter().zip(counts.buckets) {
                    let _ = writeln!(
                        page,
                        "fledge_request_duration_ms_bucket{{{service},fledge_subset=\"{subset}\",le=\"{le}\"}} {count}"
                    );
                }
                let _ = writeln!(
                    page,
                    "fledge_request_duration_ms_bucket{{{service},fledge_subset=\"{subset}\",le=\"+Inf\"}} {}",
                    counts.total
                );
                let _ = writeln!(
                    page,
                    "fledge_request_duration_ms_sum{{{service},fledge_subset=\"{subset}\"}} {}",
                    counts.sum_ms
                );
                let _ = writeln!(
                    page,
                    "fledge_request_duration_ms_count{{{service},fledge_subset=\"{subset}\"}} {}",
                    counts.total
                );
            }
        }
        page
    }
}

/// Traffic reads whose instants [`Hits`] keeps (the newest): hours of one read per tick.
const TRAFFIC_INSTANTS_KEPT: usize = 100_000;

/// Requests a fake endpoint served.
#[derive(Debug, Default)]
pub struct Hits {
    /// `/stats/prometheus` for the traffic series (or Prometheus traffic queries).
    pub traffic: AtomicU64,
    /// Guard reads.
    pub guard: AtomicU64,
    /// Response bytes.
    pub bytes: AtomicU64,
    /// When each traffic read came (the newest [`TRAFFIC_INSTANTS_KEPT`]).
    traffic_at: std::sync::Mutex<std::collections::VecDeque<Instant>>,
}

impl Hits {
    pub fn snapshot(&self) -> (u64, u64, u64) {
        (
            self.traffic.load(Ordering::Relaxed),
            self.guard.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
        )
    }

    /// Count a traffic read, now.
    pub fn traffic_read(&self) {
        self.traffic.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut instants) = self.traffic_at.lock() {
            if instants.len() == TRAFFIC_INSTANTS_KEPT {
                instants.pop_front();
            }
            instants.push_back(Instant::now());
        }
    }

    /// The traffic reads from `from` to `to` and the ticks they fell in (see [`ticks`]).
    pub fn traffic_ticks(&self, from: Instant, to: Instant, gap: Duration) -> ReadsInTicks {
        let instants: Vec<Instant> = match self.traffic_at.lock() {
            Ok(instants) => instants
                .iter()
                .copied()
                .filter(|at| *at >= from && *at <= to)
                .collect(),
            Err(_) => Vec::new(),
        };
        ReadsInTicks {
            reads: instants.len() as u64,
            ticks: ticks(&instants, gap),
        }
    }
}

/// Reads of one endpoint and the ticks they came in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadsInTicks {
    pub reads: u64,
    pub ticks: u64,
}

/// How many ticks `instants` (in order) came in: an instant more than `gap` after the one
/// before it starts a new tick. With the gap half an interval, a controller that reads each
/// endpoint once per tick gives as many ticks as reads, however the window's edges fall.
pub fn ticks(instants: &[Instant], gap: Duration) -> u64 {
    let new_ticks = instants
        .windows(2)
        .filter(|pair| matches!(pair, [before, at] if at.saturating_duration_since(*before) > gap))
        .count();
    match instants {
        [] => 0,
        _ => 1 + new_ticks as u64,
    }
}

/// Reads per endpoint per tick over `endpoints` (0 when no tick was seen).
pub fn reads_per_tick(endpoints: &[ReadsInTicks]) -> f64 {
    let reads: u64 = endpoints.iter().map(|e| e.reads).sum();
    let ticks: u64 = endpoints.iter().map(|e| e.ticks).sum();
    if ticks == 0 {
        0.0
    } else {
        reads as f64 / ticks as f64
    }
}

struct GatewayState {
    /// The traffic page and the guard page, rendered once a second (like Envoy's counters,
    /// which move between flushes): serving is a copy, so a page is never slow because the
    /// bench is busy.
    pages: std::sync::RwLock<(bytes::Bytes, bytes::Bytes)>,
    hits: Arc<Hits>,
}

/// A fake gateway Envoy admin: `/stats/prometheus` only.
pub struct FakeGateway {
    pub url: String,
    pub hits: Arc<Hits>,
}

impl FakeGateway {
    /// Serve on a free 127.0.0.1 port on the current tokio runtime until `shutdown` fires.
    pub async fn start(
        members: &[&Member],
        started: Instant,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Result<FakeGateway> {
        let hits = Arc::new(Hits::default());
        let page = Arc::new(GatewayPage::new(members));
        let render = |page: &GatewayPage, elapsed: f64| {
            (
                bytes::Bytes::from(page.render("fledge_request", elapsed)),
                bytes::Bytes::from(page.render("fledge_guard_tripped", elapsed)),
            )
        };
        let state = Arc::new(GatewayState {
            pages: std::sync::RwLock::new(render(&page, started.elapsed().as_secs_f64())),
            hits: hits.clone(),
        });
        let renderer = state.clone();
        let mut stop = shutdown.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = every.tick() => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                let page = page.clone();
                let elapsed = started.elapsed().as_secs_f64();
                if let Ok(pages) = tokio::task::spawn_blocking(move || render(&page, elapsed)).await
                {
                    if let Ok(mut current) = renderer.pages.write() {
                        *current = pages;
                    }
                }
            }
        });
        let app = axum::Router::new()
            .route("/stats/prometheus", get(serve_page))
            .with_state(state);
        let url = serve(app, shutdown).await?;
        Ok(FakeGateway { url, hits })
    }
}

async fn serve_page(
    State(state): State<Arc<GatewayState>>,
    RawQuery(query): RawQuery,
) -> bytes::Bytes {
    let query = query.unwrap_or_default();
    let filter = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("filter="))
        .unwrap_or_default();
    let guard = filter.contains("guard");
    let page = match state.pages.read() {
        Ok(pages) if guard => pages.1.clone(),
        Ok(pages) => pages.0.clone(),
        Err(_) => bytes::Bytes::new(),
    };
    if guard {
        state.hits.guard.fetch_add(1, Ordering::Relaxed);
    } else {
        state.hits.traffic_read();
    }
    state
        .hits
        .bytes
        .fetch_add(page.len() as u64, Ordering::Relaxed);
    page
}

async fn serve(
    app: axum::Router,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding a fake endpoint")?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = shutdown.wait_for(|stop| *stop).await;
            })
            .await;
    });
    Ok(url)
}

/// A fake Prometheus answering the instant queries Fledge sends (`POST /api/v1/query`) with the
/// fledge series of two scraped replicas of one gateway, labelled as Prometheus labels them
/// (`instance`, `job`, `namespace`, `pod`). Values are those of its last scrape (every second).
/// It understands selectors naming `fledge_service` by `=` or by a regex of alternatives, and the
/// guard query; anything else is answered with `bad_data`, as Prometheus answers a query it
/// cannot parse.
pub struct FakePrometheus {
    pub url: String,
    pub hits: Arc<Hits>,
}

struct PrometheusState {
    /// service name → service index, for the services Prometheus knows.
    services: HashMap<String, usize>,
    started: Instant,
    hits: Arc<Hits>,
    /// query → (scrape second, answer): an answer is built once per scrape.
    answers: std::sync::Mutex<HashMap<String, (f64, bytes::Bytes)>>,
}

const REPLICAS: [(&str, &str); 2] = [
    ("10.8.0.14:15090", "istio-ingressgateway-7c9f6d8b5-2xk4p"),
    ("10.8.1.22:15090", "istio-ingressgateway-7c9f6d8b5-q7wzn"),
];

impl FakePrometheus {
    pub async fn start(
        members: &[&Member],
        started: Instant,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Result<FakePrometheus> {
        let hits = Arc::new(Hits::default());
        let state = Arc::new(PrometheusState {
            services: members
                .iter()
                .map(|m| (m.service().to_string(), m.index))
                .collect(),
            started,
            hits: hits.clone(),
            answers: std::sync::Mutex::new(HashMap::new()),
        });
        let app = axum::Router::new()
            .route("/api/v1/query", get(query_get).post(query_post))
            .with_state(state);
        let url = serve(app, shutdown).await?;
        Ok(FakePrometheus { url, hits })
    }
}

async fn query_get(
    State(state): State<Arc<PrometheusState>>,
    axum::extract::Query(form): axum::extract::Query<HashMap<String, String>>,
) -> axum::response::Response {
    answer(
        &state,
        form.get("query").map(String::as_str).unwrap_or_default(),
    )
}

async fn query_post(
    State(state): State<Arc<PrometheusState>>,
    Form(form): Form<HashMap<String, String>>,
) -> axum::response::Response {
    answer(
        &state,
        form.get("query").map(String::as_str).unwrap_or_default(),
    )
}

fn answer(state: &PrometheusState, promql: &str) -> axum::response::Response {
    use axum::response::IntoResponse;
    let scraped = state.started.elapsed().as_secs_f64().floor();
    let now = chrono::Utc::now().timestamp_millis() as f64 / 1000.0;
    let Some(services) = named_services(promql) else {
        let body = json!({"status": "error", "errorType": "bad_data",
            "error": format!("the bench's fake Prometheus does not understand {promql:?}")});
        return (axum::http::StatusCode::BAD_REQUEST, axum::Json(body)).into_response();
    };
    let known: Vec<(&str, usize)> = services
        .iter()
        .filter_map(|s| state.services.get(s).map(|i| (s.as_str(), *i)))
        .collect();
    let guard = promql.contains("fledge_guard_tripped");
    if guard {
        state.hits.guard.fetch_add(1, Ordering::Relaxed);
    } else {
        state.hits.traffic_read();
    }
    let cached = state.answers.lock().ok().and_then(|answers| {
        answers
            .get(promql)
            .filter(|(at, _)| *at == scraped)
            .map(|(_, a)| a.clone())
    });
    let text = match cached {
        Some(text) => text,
        None => {
            let body = if guard {
                guard_answer(promql, &known, now).to_string()
            } else {
                traffic_answer(&known, scraped, now)
            };
            let text = bytes::Bytes::from(body);
            if let Ok(mut answers) = state.answers.lock() {
                // Only this scrape's answers are kept.
                answers.retain(|_, (at, _)| *at == scraped);
                answers.insert(promql.to_string(), (scraped, text.clone()));
            }
            text
        }
    };
    state
        .hits
        .bytes
        .fetch_add(text.len() as u64, Ordering::Relaxed);
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        text,
    )
        .into_response()
}

/// The services a query's `fledge_service` matcher names: `="x"` or `=~"a|b|c"` (regex escapes
/// undone).
fn named_services(promql: &str) -> Option<Vec<String>> {
    let at = promql.find("fledge_service=")?;
    let rest = &promql[at + "fledge_service=".len()..];
    let (regex, rest) = match rest.strip_prefix('~') {
        Some(rest) => (true, rest),
        None => (false, rest),
    };
    let rest = rest.strip_prefix('"')?;
    let mut value = String::new();
    let mut chars = rest.chars();
    loop {
        match chars.next()? {
            '"' => break,
            '\\' => value.push(chars.next()?),
            c => value.push(c),
        }
    }
    if !regex {
        return Some(vec![value]);
    }
    // PromQL string escapes are undone above; now the regex escapes.
    let mut names = vec![String::new()];
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => names.last_mut()?.push(chars.next()?),
            '|' => names.push(String::new()),
            c => names.last_mut()?.push(c),
        }
    }
    Some(names)
}

fn guard_answer(promql: &str, services: &[(&str, usize)], now: f64) -> Value {
    let by_service =
        promql.contains("by (fledge_service)") || promql.contains("by(fledge_service)");
    let result: Vec<Value> = if by_service {
        services
            .iter()
            .map(|(name, _)| json!({"metric": {"fledge_service": name}, "value": [now, "0"]}))
            .collect()
    } else if services.is_empty() {
        Vec::new()
    } else {
        vec![json!({"metric": {}, "value": [now, "0"]})]
    };
    json!({"status": "success", "data": {"resultType": "vector", "result": result}})
}

/// The answer to the shared traffic query, written as text: with 1,000 services it holds
/// 112,000 series (about 25 MB), and building it as `serde_json::Value`s took the fake longer
/// than the controller's query timeout on a busy machine (the bench, not the controller, was the
/// bottleneck).
fn traffic_answer(services: &[(&str, usize)], scraped: f64, now: f64) -> String {
    let mut text = String::with_capacity(services.len() * 2 * 28 * REPLICAS.len() * 240 + 128);
    text.push_str(r#"{"status":"success","data":{"resultType":"vector","result":["#);
    let mut first = true;
    let mut series = |text: &mut String, labels: &str, extra: &str, value: &str| {
        if !first {
            text.push(',');
        }
        first = false;
        let _ = write!(
            text,
            r#"{{"metric":{{{labels}{extra}}},"value":[{now:.3},"{value}"]}}"#
        );
    };
    for (name, index) in services {
        let name = serde_json::to_string(name).unwrap_or_default();
        for (subset, canary) in [("stable", false), ("canary", true)] {
            // Each replica serves half the traffic.
            let counts = SubsetCounts::of(*index, canary, scraped);
            for (instance, pod) in REPLICAS {
                let labels = |metric: &str| {
                    format!(
                        r#""__name__":"{metric}","fledge_service":{name},"fledge_subset":"{subset}","instance":"{instance}","job":"envoy-stats","namespace":"istio-system","pod":"{pod}""#
                    )
                };
                let half = |n: u64| (n / 2).to_string();
                let requests = labels("fledge_requests_total");
                for (class, count) in CLASSES.iter().zip(counts.by_class) {
                    let extra = format!(r#","fledge_class":"{class}""#);
                    series(&mut text, &requests, &extra, &half(count));
                }
                let bucket = labels("fledge_request_duration_ms_bucket");
                for (le, count) in ENVOY_BUCKETS.iter().zip(counts.buckets) {
                    let extra = format!(r#","le":"{le}""#);
                    series(&mut text, &bucket, &extra, &half(count));
                }
                series(&mut text, &bucket, r#","le":"+Inf""#, &half(counts.total));
                let sum = labels("fledge_request_duration_ms_sum");
                series(&mut text, &sum, "", &(counts.sum_ms / 2.0).to_string());
                let count = labels("fledge_request_duration_ms_count");
                series(&mut text, &count, "", &half(counts.total));
            }
        }
    }
    text.push_str("]}}");
    text
}

/// The RDS file of `member` for standalone `fledge run` (`router.envoyRds`): one
/// RouteConfiguration `{name}` with one virtual host and the route `primary` at stable 100.
pub fn rds_file(member: &Member) -> Value {
    let name = member.service();
    json!({
        "version_info": "1",
        "resources": [{
            "@type": "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
            "name": name,
            "virtual_hosts": [{
                "name": name,
                "domains": [format!("{name}.example.com")],
                "routes": [{
                    "name": "primary",
                    "match": {"prefix": "/"},
                    "route": {"weighted_clusters": {"clusters": [
                        {"name": format!("{name}_stable"), "weight": 100},
                        {"name": format!("{name}_canary"), "weight": 0}
                    ]}}
                }]
            }]
        }]
    })
}

impl Fleet {
    /// `member` as a standalone Canary document (`fledge run -f`): the same analysis and
    /// metrics source, the `envoyRds` router on `rds_dir/{name}.json`, verified through
    /// `{rds_admin}/{name}` (a [`FakeRdsAdmin`]).
    pub fn standalone_document(
        &self,
        member: &Member,
        gateway_urls: &[String],
        prometheus_url: &str,
        rds_dir: &std::path::Path,
        rds_admin: &str,
    ) -> Value {
        let name = member.service();
        let mut spec = self.spec(member, gateway_urls, prometheus_url);
        spec["stable"] = json!({"subset": "stable"});
        spec["router"] = json!({"envoyRds": {
            "path": rds_dir.join(format!("{name}.json")).display().to_string(),
            "routeConfiguration": name,
            "virtualHost": name,
            "route": "primary",
            "stableCluster": format!("{name}_stable"),
            "canaryCluster": format!("{name}_canary"),
            "adminUrl": format!("{rds_admin}/{name}"),
        }});
        json!({
            "apiVersion": "fledge.dev/v1alpha1",
            "kind": "Canary",
            "metadata": {"name": name},
            "spec": spec,
        })
    }
}

/// The part of Envoy's admin that `router.envoyRds` verifies with:
/// `GET /{name}/config_dump?resource=dynamic_route_configs` answers the RouteConfiguration in
/// `dir/{name}.json` as Envoy would once it has loaded the file (at once: there is no Envoy).
pub struct FakeRdsAdmin {
    pub url: String,
    pub hits: Arc<Hits>,
}

struct RdsAdminState {
    dir: std::path::PathBuf,
    hits: Arc<Hits>,
}

impl FakeRdsAdmin {
    pub async fn start(
        dir: &std::path::Path,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Result<FakeRdsAdmin> {
        let hits = Arc::new(Hits::default());
        let state = Arc::new(RdsAdminState {
            dir: dir.to_path_buf(),
            hits: hits.clone(),
        });
        let app = axum::Router::new()
            .route("/{name}/config_dump", get(config_dump))
            .with_state(state);
        let url = serve(app, shutdown).await?;
        Ok(FakeRdsAdmin { url, hits })
    }
}

async fn config_dump(
    State(state): State<Arc<RdsAdminState>>,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    state.hits.traffic_read();
    let path = state.dir.join(format!("{name}.json"));
    let loaded = std::fs::read(&path)
        .ok()
        .and_then(|text| serde_json::from_slice::<Value>(&text).ok());
    let Some(file) = loaded else {
        return (axum::http::StatusCode::NOT_FOUND, "no such route file").into_response();
    };
    let configs: Vec<Value> = file["resources"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|route_config| {
            json!({
                "@type": "type.googleapis.com/envoy.admin.v3.RoutesConfigDump.DynamicRouteConfig",
                "version_info": file["version_info"],
                "route_config": route_config,
            })
        })
        .collect();
    axum::Json(json!({"configs": configs})).into_response()
}

/// CPU time and resident memory of a process, from `/proc`.
#[derive(Debug, Clone, Copy)]
pub struct ProcSample {
    /// utime + stime, in milliseconds.
    pub cpu_ms: f64,
    pub rss_kib: u64,
    pub at: Instant,
}

impl ProcSample {
    pub fn read(pid: u32) -> Result<ProcSample> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .with_context(|| format!("reading /proc/{pid}/stat"))?;
        // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
        let after = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest)
            .context("unexpected /proc/PID/stat")?;
        let fields: Vec<&str> = after.split_whitespace().collect();
        let ticks = |i: usize| -> Result<f64> {
            fields
                .get(i)
                .and_then(|f| f.parse::<f64>().ok())
                .context("unexpected /proc/PID/stat")
        };
        // Field 14 is index 11 after the state field (index 0 is field 3).
        let cpu_ticks = ticks(11)? + ticks(12)?;
        let hz = clock_ticks_per_second();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("reading /proc/{pid}/status"))?;
        let rss_kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        Ok(ProcSample {
            cpu_ms: cpu_ticks * 1000.0 / hz,
            rss_kib,
            at: Instant::now(),
        })
    }

    pub fn rss_mib(&self) -> f64 {
        self.rss_kib as f64 / 1024.0
    }
}

/// The 1-, 5- and 15-minute load averages.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|| "?".to_string())
}

/// The `q` quantile (0..1) of `values` (nearest rank); 0 when empty.
pub fn quantile(values: &mut [f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
    values[rank - 1]
}

/// `sysconf(_SC_CLK_TCK)`: the unit of the CPU times in `/proc/PID/stat`.
#[allow(unsafe_code)] // sysconf(3)
fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no memory-safety preconditions; it reads a configuration value.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads (at these seconds) grouped into ticks half an interval (2 s) apart at most.
    #[test]
    fn reads_are_counted_per_tick() {
        let start = Instant::now();
        let at = |seconds: &[f64]| -> Vec<Instant> {
            seconds
                .iter()
                .map(|s| start + Duration::from_secs_f64(*s))
                .collect()
        };
        let gap = Duration::from_secs(2);
        // (what, read instants, ticks)
        let cases: &[(&str, &[f64], u64)] = &[
            ("none", &[], 0),
            ("one", &[3.0], 1),
            ("one per tick", &[0.1, 4.1, 8.2, 12.05], 4),
            (
                "eleven ticks in a ten-interval window",
                &[
                    0.0, 4.0, 8.0, 12.0, 16.0, 20.0, 24.0, 28.0, 32.0, 36.0, 40.0,
                ],
                11,
            ),
            ("twice in one tick", &[0.1, 0.3, 4.1, 4.2], 2),
            ("a late read within the gap", &[0.0, 2.0, 4.5], 2),
        ];
        for (what, seconds, want) in cases {
            assert_eq!(ticks(&at(seconds), gap), *want, "{what}");
        }
        let per_tick = |reads: &[(u64, u64)]| {
            let endpoints: Vec<ReadsInTicks> = reads
                .iter()
                .map(|(reads, ticks)| ReadsInTicks {
                    reads: *reads,
                    ticks: *ticks,
                })
                .collect();
            reads_per_tick(&endpoints)
        };
        assert_eq!(per_tick(&[(11, 11), (10, 10)]), 1.0);
        assert_eq!(per_tick(&[(20, 10), (10, 10)]), 1.5);
        assert_eq!(per_tick(&[]), 0.0);
    }

    #[test]
    fn hits_keep_the_instants_of_traffic_reads() {
        let hits = Hits::default();
        let before = Instant::now();
        hits.traffic_read();
        hits.traffic_read();
        let after = Instant::now();
        hits.traffic_read();
        assert_eq!(hits.snapshot().0, 3);
        let window = hits.traffic_ticks(before, after, Duration::from_secs(1));
        assert_eq!(window, ReadsInTicks { reads: 2, ticks: 1 });
    }

    #[test]
    fn a_page_parses_as_the_controller_reads_it() {
        let fleet = Fleet::new(30, 10, Duration::from_secs(10), Duration::from_secs(600));
        let page = GatewayPage::new(&fleet.on_gateway(0)).render("fledge_request", 5.0);
        let lines = page.lines().filter(|l| !l.starts_with('#')).count();
        assert_eq!(lines, 10 * 56 + 1, "56 lines per service, plus the uptime");
        let bytes_per_service = page.len() / 10;
        assert!(
            (5000..6500).contains(&bytes_per_service),
            "{bytes_per_service}"
        );
        assert_eq!(
            named_services(r#"{__name__=~"x",fledge_service=~"svc\\-1|svc\\.2"}"#),
            Some(vec!["svc-1".to_string(), "svc.2".to_string()])
        );
        assert_eq!(
            named_services(r#"max(fledge_guard_tripped{fledge_service="svc-3"})"#),
            Some(vec!["svc-3".to_string()])
        );
    }

    #[test]
    fn a_prometheus_answer_is_json_with_every_series() {
        let text = traffic_answer(&[("svc-1", 1), ("svc-\"2", 2)], 5.0, 1.5);
        let answer: Value = serde_json::from_str(&text).unwrap();
        let result = answer["data"]["result"].as_array().unwrap();
        assert_eq!(result.len(), 2 * 2 * REPLICAS.len() * 28);
        assert_eq!(result[0]["metric"]["fledge_service"], "svc-1");
        assert_eq!(result[0]["metric"]["fledge_class"], "1xx");
        assert!(result[0]["value"][1]
            .as_str()
            .unwrap()
            .parse::<u64>()
            .is_ok());
    }

    #[test]
    fn every_interval_of_a_second_or_more_passes_the_success_rate_check() {
        // (interval in seconds) at every 0.1 s over an hour, for each of the 7 service rates
        // of both subsets: the worst success rate stays at or above the fleet's threshold.
        for interval in [1.0, 2.0, 10.0] {
            let mut worst = 100.0_f64;
            for service in 0..7 {
                for canary in [true, false] {
                    for tenth in 0..36_000 {
                        let start = f64::from(tenth) / 10.0;
                        let before = SubsetCounts::of(service, canary, start);
                        let after = SubsetCounts::of(service, canary, start + interval);
                        let requests = after.total - before.total;
                        let failed = after.by_class[4] - before.by_class[4];
                        let success = 100.0 * (1.0 - failed as f64 / requests as f64);
                        worst = worst.min(success);
                    }
                }
            }
            assert!(worst >= SUCCESS_RATE_MIN, "{interval} s: {worst:.2} %");
            assert!(worst < 100.0, "{interval} s: some intervals hold a 5xx");
        }
    }

    #[test]
    fn the_seeded_status_is_mid_rollout_in_a_pause() {
        let fleet = Fleet::new(3, 10, Duration::from_secs(10), Duration::from_secs(600));
        let member = &fleet.members[1];
        let spec: CanarySpec =
            serde_json::from_value(fleet.spec(member, &["http://g".into()], "http://p")).unwrap();
        let status = fleet.mid_rollout_status(member, &spec, Utc::now());
        assert_eq!(status.step, 1, "{status:?}");
        assert_eq!(status.canary_weight, 10);
    }
}
