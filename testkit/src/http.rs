//! One fake HTTP endpoint for the metrics sources' and routers' tests: an Envoy admin
//! (`/stats/prometheus`, `/config_dump`), a Prometheus query API, anything that answers HTTP.
//!
//! It binds 127.0.0.1 on a free port, answers each request from the replies set for its path
//! (optionally only when a query or form parameter has a given value), records every request,
//! and stops when dropped.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{Method, StatusCode, Uri};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

/// What the endpoint answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// This HTTP status and body.
    Body(u16, String),
    /// This HTTP status and these bytes as the body (e.g. text that is not UTF-8).
    Bytes(u16, Vec<u8>),
    /// `200` with an empty body, only after this long (to trip a client's timeout).
    Slow(Duration),
}

impl Reply {
    /// `200` with `body`.
    pub fn text(body: impl Into<String>) -> Reply {
        Reply::Body(200, body.into())
    }

    /// `status` with `value` as its JSON body.
    pub fn json(status: u16, value: &serde_json::Value) -> Reply {
        Reply::Body(status, value.to_string())
    }

    /// `status` with a short body that names it.
    pub fn status(status: u16) -> Reply {
        Reply::Body(status, format!("fake: status {status}"))
    }
}

/// One request the endpoint received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
    /// The raw query string, without `?`.
    pub query: Option<String>,
    pub body: String,
}

impl Request {
    /// The value of `key` in the query string or, failing that, a form-encoded body.
    pub fn param(&self, key: &str) -> Option<String> {
        let query = self.query.as_deref().unwrap_or_default();
        [query.as_bytes(), self.body.as_bytes()]
            .into_iter()
            .flat_map(form_urlencoded::parse)
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.into_owned())
    }
}

type Fallback = dyn Fn(&Request) -> Reply + Send + Sync;

/// A reply and the `(parameter, value)` a request must have to get it (`None`: any request).
type Rule = (Option<(String, String)>, Reply);

struct Replies {
    /// By path, in the order they are tried.
    by_path: BTreeMap<String, Vec<Rule>>,
    requests: Vec<Request>,
    fallback: Arc<Fallback>,
}

#[derive(Clone)]
struct Shared(Arc<Mutex<Replies>>);

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Replies> {
        // A test that panicked while holding the lock must not hide its own failure.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A fake HTTP endpoint on 127.0.0.1:<free port>; stopped when dropped.
pub struct FakeEndpoint {
    url: String,
    shared: Shared,
    server: tokio::task::JoinHandle<()>,
}

impl FakeEndpoint {
    /// Start serving (inside a tokio runtime). A request nothing was set for gets `404`.
    pub async fn start() -> std::io::Result<FakeEndpoint> {
        Self::start_with_fallback(|request| {
            Reply::Body(
                404,
                format!("fake: no reply for {} {}", request.method, request.path),
            )
        })
        .await
    }

    /// [`FakeEndpoint::start`], answering requests nothing was set for with `fallback`.
    pub async fn start_with_fallback(
        fallback: impl Fn(&Request) -> Reply + Send + Sync + 'static,
    ) -> std::io::Result<FakeEndpoint> {
        let shared = Shared(Arc::new(Mutex::new(Replies {
            by_path: BTreeMap::new(),
            requests: Vec::new(),
            fallback: Arc::new(fallback),
        })));
        let app = axum::Router::new()
            .fallback(answer)
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let server = tokio::spawn(async move {
            // Ends when the task is aborted (drop) or the runtime shuts down.
            let _ = axum::serve(listener, app).await;
        });
        Ok(FakeEndpoint {
            url,
            shared,
            server,
        })
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.url
            .rsplit(':')
            .next()
            .and_then(|port| port.parse().ok())
            .unwrap_or_default()
    }

    /// Answer every request to `path` with `reply` (replacing what was set for it).
    pub fn reply(&self, path: &str, reply: Reply) {
        let mut replies = self.shared.lock();
        let rules = replies.by_path.entry(path.to_string()).or_default();
        rules.retain(|(when, _)| when.is_some());
        rules.push((None, reply));
    }

    /// Answer requests to `path` whose parameter `key` (query string or form body) is `value`
    /// with `reply`; these win over [`FakeEndpoint::reply`].
    pub fn reply_when(&self, path: &str, key: &str, value: &str, reply: Reply) {
        let when = Some((key.to_string(), value.to_string()));
        let mut replies = self.shared.lock();
        let rules = replies.by_path.entry(path.to_string()).or_default();
        rules.retain(|(w, _)| *w != when);
        rules.insert(0, (when, reply));
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<Request> {
        self.shared.lock().requests.clone()
    }

    /// The parameter `key` of every request received so far, in order (requests without it
    /// are left out): e.g. the PromQL sent to a fake Prometheus.
    pub fn params(&self, key: &str) -> Vec<String> {
        self.requests()
            .iter()
            .filter_map(|r| r.param(key))
            .collect()
    }
}

/// `http://127.0.0.1:<port>` of a port nothing listens on (bound, then released), for
/// "unreachable" cases.
pub fn closed_port_url() -> std::io::Result<String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(format!("http://{}", listener.local_addr()?))
}

impl Drop for FakeEndpoint {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn answer(
    State(shared): State<Shared>,
    method: Method,
    uri: Uri,
    body: Bytes,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let request = Request {
        method: method.to_string(),
        path: uri.path().to_string(),
        query: uri.query().map(str::to_string),
        body: String::from_utf8_lossy(&body).into_owned(),
    };
    let reply = {
        let mut replies = shared.lock();
        replies.requests.push(request.clone());
        let matching = replies.by_path.get(&request.path).and_then(|rules| {
            rules.iter().find_map(|(when, reply)| match when {
                Some((key, value)) => {
                    (request.param(key).as_deref() == Some(value.as_str())).then(|| reply.clone())
                }
                None => Some(reply.clone()),
            })
        });
        matching.unwrap_or_else(|| (replies.fallback)(&request))
    };
    let status =
        |code: u16| StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    match reply {
        Reply::Body(code, body) => (status(code), body).into_response(),
        Reply::Bytes(code, body) => (status(code), body).into_response(),
        Reply::Slow(delay) => {
            tokio::time::sleep(delay).await;
            (StatusCode::OK, String::new()).into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(url: &str) -> (u16, String) {
        post(url, "").await
    }

    async fn post(url: &str, form: &str) -> (u16, String) {
        let client = reqwest::Client::new();
        let request = if form.is_empty() {
            client.get(url)
        } else {
            client
                .post(url)
                .header("content-type", "application/x-www-form-urlencoded")
                .body(form.to_string())
        };
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.text().await.unwrap())
    }

    #[tokio::test]
    async fn replies_by_path_and_parameter_and_records_every_request() {
        let fake = FakeEndpoint::start().await.unwrap();
        fake.reply("/stats", Reply::text("a 1"));
        fake.reply_when(
            "/q",
            "query",
            "up",
            Reply::json(200, &serde_json::json!([1])),
        );
        fake.reply("/q", Reply::status(503));
        let url = fake.url().to_string();
        assert_eq!(
            get(&format!("{url}/stats?format=x")).await,
            (200, "a 1".into())
        );
        assert_eq!(
            post(&format!("{url}/q"), "query=up").await,
            (200, "[1]".into())
        );
        assert_eq!(get(&format!("{url}/q?query=up")).await, (200, "[1]".into()));
        assert_eq!(post(&format!("{url}/q"), "query=down").await.0, 503);
        assert_eq!(
            get(&format!("{url}/other")).await,
            (404, "fake: no reply for GET /other".into())
        );
        fake.reply("/stats", Reply::text("a 2"));
        assert_eq!(get(&format!("{url}/stats")).await.1, "a 2");
        fake.reply("/raw", Reply::Bytes(200, vec![b'a', 0xC3, 0x28]));
        let raw = reqwest::get(format!("{url}/raw")).await.unwrap();
        assert_eq!(raw.bytes().await.unwrap().as_ref(), [b'a', 0xC3, 0x28]);
        let requests = fake.requests();
        assert_eq!(requests.len(), 7);
        assert_eq!(requests[0].query.as_deref(), Some("format=x"));
        assert_eq!(requests[1].method, "POST");
        assert_eq!(fake.params("query"), ["up", "up", "down"]);
    }

    #[tokio::test]
    async fn a_slow_reply_trips_a_client_timeout_and_the_fallback_answers_the_rest() {
        let fake = FakeEndpoint::start_with_fallback(|r| {
            Reply::Body(
                400,
                format!("unexpected {}", r.param("query").unwrap_or_default()),
            )
        })
        .await
        .unwrap();
        fake.reply("/slow", Reply::Slow(Duration::from_secs(5)));
        let client = reqwest::Client::new();
        let slow = client
            .get(format!("{}/slow", fake.url()))
            .timeout(Duration::from_millis(100))
            .send()
            .await;
        assert!(slow.unwrap_err().is_timeout());
        assert_eq!(
            post(&format!("{}/api", fake.url()), "query=vector%281%29").await,
            (400, "unexpected vector(1)".into())
        );
    }
}
