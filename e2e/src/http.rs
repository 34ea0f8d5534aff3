//! A tiny blocking HTTP helper (for admin and status endpoints) and a Prometheus text parser.

use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::time::Duration;

/// Largest body we read from an admin or status endpoint.
const MAX_BODY_BYTES: u64 = 64 * 1024 * 1024;

/// A blocking HTTP agent with keep-alive, a global per-request timeout, and non-2xx statuses
/// returned as responses rather than errors.
pub fn agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .http_status_as_error(false)
        .max_idle_connections_per_host(16)
        .build()
        .into()
}

/// GET `url` and return the status and body.
pub fn get(url: &str, timeout: Duration) -> Result<(u16, String)> {
    let mut response = agent(timeout)
        .get(url)
        .call()
        .with_context(|| format!("GET {url}"))?;
    let status = response.status().as_u16();
    let body = response
        .body_mut()
        .with_config()
        .limit(MAX_BODY_BYTES)
        .read_to_string()
        .with_context(|| format!("reading body of GET {url}"))?;
    Ok((status, body))
}

/// GET `url`, require a 2xx status, return the body.
pub fn get_ok(url: &str, timeout: Duration) -> Result<String> {
    let (status, body) = get(url, timeout)?;
    if !(200..300).contains(&status) {
        bail!(
            "GET {url} answered {status}: {}",
            body.chars().take(300).collect::<String>()
        );
    }
    Ok(body)
}

/// GET `url`, require a 2xx status, parse the body as JSON.
pub fn get_json(url: &str, timeout: Duration) -> Result<serde_json::Value> {
    let body = get_ok(url, timeout)?;
    serde_json::from_str(&body).with_context(|| format!("GET {url} did not return JSON"))
}

/// POST `url` with an empty body, require a 2xx status, return the body.
pub fn post_ok(url: &str, timeout: Duration) -> Result<String> {
    let response = agent(timeout)
        .post(url)
        .send_empty()
        .with_context(|| format!("POST {url}"))?;
    body_if_2xx("POST", url, response)
}

/// PATCH `url` with a JSON merge patch (as `kubectl patch --type merge` does), require 2xx.
pub fn patch_merge(url: &str, patch: &serde_json::Value, timeout: Duration) -> Result<String> {
    let response = agent(timeout)
        .patch(url)
        .header("content-type", "application/merge-patch+json")
        .send(serde_json::to_vec(patch)?.as_slice())
        .with_context(|| format!("PATCH {url}"))?;
    body_if_2xx("PATCH", url, response)
}

/// POST `url` with a JSON body, require 2xx, return the body.
pub fn post_json(url: &str, body: &serde_json::Value, timeout: Duration) -> Result<String> {
    let response = agent(timeout)
        .post(url)
        .header("content-type", "application/json")
        .send(serde_json::to_vec(body)?.as_slice())
        .with_context(|| format!("POST {url}"))?;
    body_if_2xx("POST", url, response)
}

/// PUT `url` with a JSON body, require 2xx, return the body.
pub fn put_json(url: &str, body: &serde_json::Value, timeout: Duration) -> Result<String> {
    let response = agent(timeout)
        .put(url)
        .header("content-type", "application/json")
        .send(serde_json::to_vec(body)?.as_slice())
        .with_context(|| format!("PUT {url}"))?;
    body_if_2xx("PUT", url, response)
}

fn body_if_2xx(
    method: &str,
    url: &str,
    mut response: ureq::http::Response<ureq::Body>,
) -> Result<String> {
    let status = response.status().as_u16();
    let body = response
        .body_mut()
        .with_config()
        .limit(MAX_BODY_BYTES)
        .read_to_string()
        .unwrap_or_default();
    if !(200..300).contains(&status) {
        bail!("{method} {url} answered {status}: {body}");
    }
    Ok(body)
}

/// One sample of the Prometheus text format: `name{labels} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct PromSample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl PromSample {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels.get(key).map(String::as_str)
    }
}

/// Parse every sample line of Prometheus text exposition (comments and malformed lines are
/// skipped).
pub fn parse_prometheus(text: &str) -> Vec<PromSample> {
    text.lines().filter_map(parse_sample_line).collect()
}

/// The samples of one metric name (exact match, e.g. `fledge_requests_total`).
pub fn prometheus_samples(text: &str, name: &str) -> Vec<PromSample> {
    parse_prometheus(text)
        .into_iter()
        .filter(|s| s.name == name)
        .collect()
}

fn parse_sample_line(line: &str) -> Option<PromSample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(['{', ' '])?;
    let name = line[..name_end].to_string();
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(after_brace) = rest.strip_prefix('{') {
        let (parsed, remaining) = parse_labels(after_brace)?;
        labels = parsed;
        rest = remaining;
    }
    let value_text = rest.split_whitespace().next()?;
    let value = match value_text {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        other => other.parse().ok()?,
    };
    Some(PromSample {
        name,
        labels,
        value,
    })
}

/// Parse `k="v",k2="v2"}` and return the labels and the text after the closing brace.
fn parse_labels(mut text: &str) -> Option<(BTreeMap<String, String>, &str)> {
    let mut labels = BTreeMap::new();
    loop {
        text = text.trim_start_matches([',', ' ']);
        if let Some(rest) = text.strip_prefix('}') {
            return Some((labels, rest));
        }
        let eq = text.find('=')?;
        let key = text[..eq].trim().to_string();
        let mut chars = text[eq + 1..].char_indices();
        if chars.next()?.1 != '"' {
            return None;
        }
        let mut value = String::new();
        let mut end = None;
        let mut escaped = false;
        for (index, c) in chars {
            if escaped {
                value.push(match c {
                    'n' => '\n',
                    other => other,
                });
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                end = Some(index);
                break;
            } else {
                value.push(c);
            }
        }
        let end = end?;
        labels.insert(key, value);
        text = &text[eq + 1 + end + 1..];
    }
}

/// A webhook receiver on 127.0.0.1: every request's path and body go to `answer`, whose
/// status code is sent back (empty body, connection closed). Returns the port; the receiver
/// lives as long as the test process.
pub fn serve_hooks(answer: impl Fn(&str, &[u8]) -> u16 + Send + 'static) -> Result<u16> {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
            let mut reader = BufReader::new(&stream);
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).is_err() {
                continue;
            }
            let path = request_line.split_whitespace().nth(1).unwrap_or("/");
            let mut length = 0usize;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
                    break;
                }
                if let Some((name, value)) = line.split_once(':') {
                    if name.eq_ignore_ascii_case("content-length") {
                        length = value.trim().parse().unwrap_or(0);
                    }
                }
            }
            let mut body = vec![0u8; length.min(1 << 20)];
            let _ = reader.read_exact(&mut body);
            let code = answer(path, &body);
            let mut stream = &stream;
            let _ = write!(
                stream,
                "HTTP/1.1 {code} -\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            );
        }
    });
    Ok(port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_labels_values_and_skips_comments() {
        let text = "# TYPE fledge_requests_total counter\n\
            fledge_requests_total{fledge_service=\"app\",fledge_subset=\"canary\",fledge_class=\"5xx\"} 7\n\
            envoy_server_live 1\n\
            fledge_request_duration_ms_bucket{fledge_subset=\"a\\\"b\",le=\"+Inf\"} 3\n\
            garbage{\n";
        let samples = parse_prometheus(text);
        assert_eq!(samples.len(), 3);
        assert_eq!(samples[0].name, "fledge_requests_total");
        assert_eq!(samples[0].label("fledge_class"), Some("5xx"));
        assert_eq!(samples[0].value, 7.0);
        assert_eq!(samples[1].name, "envoy_server_live");
        assert!(samples[1].labels.is_empty());
        assert_eq!(samples[2].label("fledge_subset"), Some("a\"b"));
        assert_eq!(samples[2].label("le"), Some("+Inf"));
        assert_eq!(prometheus_samples(text, "envoy_server_live").len(), 1);
    }
}
