//! Shared pieces of the filter tests (`filter_tagging.rs`, `filter_robustness.rs` include this
//! file as a module): a raw HTTP/1.1 upstream that can echo headers, answer like a gRPC server
//! or reset, plain HTTP requests with custom headers, curl for HTTP/2, and metric lookups.
#![allow(dead_code)]

use anyhow::{bail, Context, Result};
use fledge_core::filter_config::FilterModule;
use fledge_e2e::http::prometheus_samples;
use fledge_e2e::{paths, wait_until, Envoy};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Both built modules — the full filter and the metrics-only observer — to run a test against
/// each; empty (test skipped) unless `FLEDGE_REQUIRE_WASM=1`.
pub fn modules_or_skip(test: &str) -> Result<Vec<(FilterModule, PathBuf)>> {
    let require = std::env::var("FLEDGE_REQUIRE_WASM").is_ok_and(|v| v == "1");
    match (paths::filter_wasm(), paths::observer_wasm()) {
        (Ok(full), Ok(observer)) => Ok(vec![
            (FilterModule::Full, full),
            (FilterModule::Observer, observer),
        ]),
        (Err(error), _) | (_, Err(error)) if !require => {
            eprintln!("SKIPPED {test}: {error:#} (set FLEDGE_REQUIRE_WASM=1 to fail instead)");
            Ok(Vec::new())
        }
        (Err(error), _) | (_, Err(error)) => Err(error),
    }
}

/// The built filter, or `None` (test skipped) unless `FLEDGE_REQUIRE_WASM=1`.
pub fn filter_wasm_or_skip(test: &str) -> Result<Option<PathBuf>> {
    built_or_skip(test, paths::filter_wasm())
}

/// A built artifact, or `None` (test skipped, saying why) unless `FLEDGE_REQUIRE_WASM=1`
/// (`make test`), which turns a missing build into the test's failure.
pub fn built_or_skip<T>(test: &str, built: Result<T>) -> Result<Option<T>> {
    let require = std::env::var("FLEDGE_REQUIRE_WASM").is_ok_and(|v| v == "1");
    match built {
        Ok(artifact) => Ok(Some(artifact)),
        Err(error) if !require => {
            eprintln!("SKIPPED {test}: {error:#} (set FLEDGE_REQUIRE_WASM=1 to fail instead)");
            Ok(None)
        }
        Err(error) => Err(error),
    }
}

/// An HTTP/1.1 upstream on 127.0.0.1 that answers by path:
/// - anything else: 200, `x-backend-version: NAME`, `x-version: NAME`, body = the request's
///   header block as received (so tests see what reached the upstream);
/// - `/grpc/N`: a gRPC response (200, `application/grpc`, chunked, trailer `grpc-status: N`);
/// - `/grpc-only/N`: a trailers-only gRPC response (`grpc-status: N` in the headers, no body);
/// - `/status/N`: status N;
/// - `/reset`: closes the connection without answering;
/// - `/reset-mid`: sends headers announcing 1000 bytes, 10 bytes, then closes.
///
/// Stopped (and its port closed) on drop.
pub struct RawUpstream {
    name: String,
    port: u16,
    served: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl RawUpstream {
    pub fn start(name: &str) -> Result<RawUpstream> {
        let listener = TcpListener::bind("127.0.0.1:0").context("binding raw upstream")?;
        let port = listener.local_addr()?.port();
        let served = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let acceptor = {
            let (name, served, stop) = (name.to_string(), Arc::clone(&served), Arc::clone(&stop));
            std::thread::spawn(move || {
                for connection in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(connection) = connection else { continue };
                    let (name, served, stop) =
                        (name.clone(), Arc::clone(&served), Arc::clone(&stop));
                    std::thread::spawn(move || serve_connection(connection, &name, &served, &stop));
                }
            })
        };
        Ok(RawUpstream {
            name: name.to_string(),
            port,
            served,
            stop,
            acceptor: Some(acceptor),
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Requests answered (or deliberately reset).
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::SeqCst)
    }
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the acceptor so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

fn serve_connection(connection: TcpStream, name: &str, served: &AtomicU64, stop: &AtomicBool) {
    let _ = connection.set_read_timeout(Some(Duration::from_secs(30)));
    let Ok(writer) = connection.try_clone() else {
        return;
    };
    let mut writer = writer;
    let mut reader = BufReader::new(connection);
    while !stop.load(Ordering::SeqCst) {
        let mut head = String::new();
        let mut content_length = 0usize;
        loop {
            let mut raw_line = Vec::new();
            match reader.read_until(b'\n', &mut raw_line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            // Header values may be any bytes; the echo only needs to be readable.
            let line = String::from_utf8_lossy(&raw_line).into_owned();
            if line == "\r\n" || line == "\n" {
                break;
            }
            if let Some((key, value)) = line.split_once(':') {
                if key.eq_ignore_ascii_case("content-length") {
                    content_length = value.trim().parse().unwrap_or(0);
                }
            }
            head.push_str(&line);
        }
        let mut body = vec![0u8; content_length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        served.fetch_add(1, Ordering::SeqCst);
        let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
        let response = if let Some(code) = path.strip_prefix("/grpc/") {
            format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/grpc\r\nx-backend-version: {name}\r\n\
                 transfer-encoding: chunked\r\ntrailer: grpc-status\r\n\r\n\
                 5\r\n\0\0\0\0\0\r\n0\r\ngrpc-status: {code}\r\ngrpc-message: test\r\n\r\n"
            )
        } else if let Some(code) = path.strip_prefix("/grpc-only/") {
            format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/grpc\r\nx-backend-version: {name}\r\n\
                 grpc-status: {code}\r\ncontent-length: 0\r\n\r\n"
            )
        } else if let Some(code) = path.strip_prefix("/status/") {
            format!(
                "HTTP/1.1 {code} X\r\nx-backend-version: {name}\r\nx-version: {name}\r\ncontent-length: 0\r\n\r\n"
            )
        } else if path == "/reset" {
            return;
        } else if path == "/reset-mid" {
            let _ = writer.write_all(
                format!("HTTP/1.1 200 OK\r\nx-backend-version: {name}\r\ncontent-length: 1000\r\n\r\n0123456789")
                    .as_bytes(),
            );
            let _ = writer.flush();
            return;
        } else {
            format!(
                "HTTP/1.1 200 OK\r\nx-backend-version: {name}\r\nx-version: {name}\r\n\
                 content-type: text/plain\r\ncontent-length: {}\r\n\r\n{head}",
                head.len()
            )
        };
        if writer.write_all(response.as_bytes()).is_err() {
            return;
        }
    }
}

/// What came back from one request.
#[derive(Debug, Clone, Default)]
pub struct Reply {
    pub status: u16,
    /// Lowercase names; the first value of each.
    pub headers: BTreeMap<String, String>,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    /// The `x-backend-version` of the upstream that answered (`-` for Envoy's own replies).
    pub fn version(&self) -> &str {
        self.header("x-backend-version").unwrap_or("-")
    }

    /// Whether the upstream saw request header `name` (from the echoed header block).
    pub fn upstream_saw(&self, name: &str) -> bool {
        let prefix = format!("{}:", name.to_ascii_lowercase());
        self.body
            .lines()
            .any(|line| line.to_ascii_lowercase().starts_with(&prefix))
    }
}

/// GET `url` over HTTP/1.1 with extra request headers (raw bytes allowed in values).
pub fn get(url: &str, headers: &[(&str, &[u8])]) -> Result<Reply> {
    let rest = url.strip_prefix("http://").context("only http:// URLs")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let mut stream =
        TcpStream::connect(authority).with_context(|| format!("connect {authority}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut request =
        format!("GET {path} HTTP/1.1\r\nhost: {authority}\r\nconnection: close\r\n").into_bytes();
    for (name, value) in headers {
        request.extend_from_slice(name.as_bytes());
        request.extend_from_slice(b": ");
        request.extend_from_slice(value);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"\r\n");
    stream.write_all(&request)?;
    let mut raw = Vec::new();
    // A reset after the headers is an error here; keep what arrived.
    let _ = stream.read_to_end(&mut raw);
    parse_reply(&raw).with_context(|| format!("GET {url}: {:?}", String::from_utf8_lossy(&raw)))
}

fn parse_reply(raw: &[u8]) -> Result<Reply> {
    let text = String::from_utf8_lossy(raw);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        bail!("no complete response head");
    };
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .context("no status line")?;
    let mut headers = BTreeMap::new();
    for line in lines {
        if let Some((k, v)) = line.split_once(':') {
            headers
                .entry(k.trim().to_ascii_lowercase())
                .or_insert_with(|| v.trim().to_string());
        }
    }
    Ok(Reply {
        status,
        headers,
        body: body.to_string(),
    })
}

/// One request with curl over cleartext HTTP/2 (prior knowledge). `extra` are curl arguments.
/// Returns the status, the response headers and trailers (lowercase), and the HTTP version curl
/// used.
pub fn curl_h2(url: &str, extra: &[&str]) -> Result<(u16, String, String)> {
    let output = std::process::Command::new("curl")
        .args([
            "-sS",
            "--http2-prior-knowledge",
            "--max-time",
            "10",
            "-o",
            "/dev/null",
        ])
        .args(["-D", "-", "-w", "\n%{http_code} %{http_version}"])
        .args(extra)
        .arg(url)
        .output()
        .context("running curl (apt-get install curl)")?;
    let text = String::from_utf8_lossy(&output.stdout).to_string();
    let last = text.lines().last().unwrap_or_default().to_string();
    let mut parts = last.split_whitespace();
    let status = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let version = parts.next().unwrap_or_default().to_string();
    Ok((status, text.to_ascii_lowercase(), version))
}

/// Sum of `fledge_requests_total` samples matching every `(label, value)`.
pub fn requests_total(envoy: &Envoy, labels: &[(&str, &str)]) -> Result<f64> {
    metric_sum(envoy, "fledge_requests_total", labels)
}

/// Sum of a metric's samples matching every `(label, value)`.
pub fn metric_sum(envoy: &Envoy, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
    let text = envoy.stats_prometheus()?;
    Ok(prometheus_samples(&text, name)
        .iter()
        .filter(|s| labels.iter().all(|(k, v)| s.label(k) == Some(v)))
        .map(|s| s.value)
        .sum())
}

/// Wait until `fledge_requests_total` over all labels reaches `total` (on_log runs after the
/// reply is sent, so a test may look before the last count lands).
pub fn wait_for_total(envoy: &Envoy, total: f64) -> Result<()> {
    wait_until(
        &format!("fledge_requests_total to reach {total}"),
        Duration::from_secs(10),
        || Ok((requests_total(envoy, &[])? >= total).then_some(())),
    )
    .map_err(|e| e.context(format!("Envoy log tail:\n{}", envoy.log_tail(20))))
}

/// A static cluster (raw Envoy JSON) with one endpoint per `(port, istio.workload metadata)`.
pub fn cluster_with_endpoints(name: &str, endpoints: &[(u16, Option<&str>)]) -> serde_json::Value {
    let lb_endpoints: Vec<serde_json::Value> = endpoints
        .iter()
        .map(|(port, workload)| {
            let mut endpoint = serde_json::json!({"endpoint": {"address": {"socket_address": {
                "address": "127.0.0.1", "port_value": port
            }}}});
            if let Some(workload) = workload {
                endpoint["metadata"] =
                    serde_json::json!({"filter_metadata": {"istio": {"workload": workload}}});
            }
            endpoint
        })
        .collect();
    serde_json::json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "0.25s",
        "lb_policy": "ROUND_ROBIN",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": lb_endpoints}]}
    })
}

/// A route (raw Envoy JSON) sending path prefix `prefix` to `cluster`.
pub fn prefix_route(prefix: &str, cluster: &str) -> serde_json::Value {
    serde_json::json!({"match": {"prefix": prefix}, "route": {"cluster": cluster}})
}
