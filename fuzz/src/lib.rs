//! # fledge-fuzz — the fuzz targets, as plain functions
//!
//! Each target takes arbitrary bytes, runs one of Fledge's parsers on them and checks what
//! must hold whatever the input: no panic, and for every accepted input a round trip through
//! the parser's own output gives the same value back. A target returns an *outcome signature*
//! (a hash of the shape of the result: which error, which fields were set) that the stable
//! runner uses as cheap feedback; libFuzzer ignores it and uses real coverage.
//!
//! | target | code under test |
//! | --- | --- |
//! | [`filter_config`] | `fledge_core::filter_config::FilterConfig::parse_bytes` (what the Wasm filter runs in `on_configure`), cluster-name resolution |
//! | [`prometheus_text`] | `controller/src/metrics/promtext.rs` (what the Envoy-admin source parses `/stats/prometheus` with) |
//! | [`canary_spec`] | `controller/src/config.rs::parse_canaries` (what `fledge validate` / `fledge run` run: multi-document YAML → `Canary` → `validate()`), then one rollout step on every accepted spec |
//!
//! The two controller files are compiled in here from their own source (`#[path]`), so the
//! fuzzer builds without the controller's async and Kubernetes dependencies; both depend only
//! on `std`, `serde`, `serde_yaml`, `thiserror` and `fledge-core`.

#[path = "../../controller/src/metrics/promtext.rs"]
pub mod promtext;

#[path = "../../controller/src/config.rs"]
pub mod canary_config;

use chrono::{TimeZone, Utc};
use fledge_core::filter_config::{istio_workload_revision, FilterConfig, IstioCluster};
use fledge_core::observe::{Observation, ObservationError};
use fledge_core::rollout::{self, CanaryStatus, Input};
use std::hash::{Hash, Hasher};

/// A target: bytes in, outcome signature out; panics on a finding.
pub type Target = fn(&[u8]) -> u64;

/// Every target by name, as `cargo fuzz` and the stable runner know them.
pub const TARGETS: [(&str, Target); 3] = [
    ("filter_config", filter_config),
    ("prometheus_text", prometheus_text),
    ("canary_spec", canary_spec),
];

fn signature(parts: impl Hash) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    parts.hash(&mut hasher);
    hasher.finish()
}

/// An error message with the input's own text blanked out, so that two inputs failing the same
/// way in different words count as one outcome: quoted spans, digits and everything after the
/// first `(` are dropped, and of the rest only plain lowercase words are kept (field paths and
/// names from the input have dots, digits, underscores or capitals), at most eight.
fn error_shape(message: &str) -> String {
    message_without_input(message)
        .split_whitespace()
        .filter(|word| word.chars().all(|c| c.is_ascii_lowercase()))
        .take(8)
        .collect::<Vec<_>>()
        .join(" ")
}

fn message_without_input(message: &str) -> String {
    let mut shape = String::new();
    let mut quoted = false;
    for c in message.chars() {
        match c {
            '"' | '`' => quoted = !quoted,
            '(' if !quoted => break,
            _ if quoted || c.is_ascii_digit() => {}
            _ => shape.push(c),
        }
        if shape.len() > 120 {
            break;
        }
    }
    shape
}

/// The Wasm filter's configuration parser. Accepted configurations must survive a round trip
/// through `to_json` (which the controller and e2e harness use to generate Envoy config), and
/// any input used as an upstream cluster name must resolve without panicking.
pub fn filter_config(data: &[u8]) -> u64 {
    let outcome = match FilterConfig::parse_bytes(data) {
        Ok(config) => {
            let json = config.to_json();
            let again = FilterConfig::parse(&json)
                .unwrap_or_else(|e| panic!("our own JSON is rejected: {e}\n{json}"));
            assert_eq!(
                again, config,
                "round trip through to_json changed the config"
            );
            for name in config.clusters.keys() {
                let _ = config.resolve(Some(name));
            }
            signature((
                "ok",
                config.clusters.len().min(3),
                config.force_canary.is_some(),
                config.sticky.is_some(),
                config.subset_header.is_some(),
                config.response_header.is_some(),
            ))
        }
        Err(error) => {
            let message = error.to_string();
            assert!(!message.is_empty(), "empty error message");
            let variant = format!("{error:?}");
            let variant = variant
                .split([' ', '(', '{'])
                .next()
                .unwrap_or("")
                .to_string();
            signature(("err", variant, error_shape(&message)))
        }
    };
    // The same bytes as a cluster name and as Istio endpoint metadata.
    let text = String::from_utf8_lossy(data);
    let labels = FilterConfig::default().resolve(Some(&text));
    assert!(
        !labels.service.is_empty() && labels.service.len() <= fledge_core::contract::MAX_LABEL_LEN,
        "bad service label {:?}",
        labels.service
    );
    let istio = IstioCluster::parse(&text).is_some();
    let revision = istio_workload_revision(&text).is_some();
    outcome ^ signature((istio, revision))
}

/// Render samples back into exposition text (labels escaped as the format requires).
fn render(samples: &[promtext::Sample]) -> String {
    let mut text = String::new();
    for sample in samples {
        text.push_str(&sample.name);
        text.push('{');
        for (i, (name, value)) in sample.labels.iter().enumerate() {
            if i > 0 {
                text.push(',');
            }
            let escaped = value
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            text.push_str(&format!("{name}=\"{escaped}\""));
        }
        text.push_str(&format!("}} {:?}", sample.value));
        if let Some(timestamp) = sample.timestamp_ms {
            text.push_str(&format!(" {timestamp}"));
        }
        text.push('\n');
    }
    text
}

/// A sample as [`streamed`] compares them: name, labels, value bits, timestamp.
type SeenSample = (String, Vec<(String, String)>, u64, Option<i64>);

/// What [`promtext::LineParser`] gives for `pieces` fed in turn: the samples and the outcome.
fn streamed(pieces: &[&[u8]]) -> (Vec<SeenSample>, Result<(), promtext::ParseError>) {
    let mut seen = Vec::new();
    let mut keep = |sample: &promtext::SampleRef<'_>| {
        let labels = sample
            .labels
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect();
        let value = sample.value.to_bits();
        seen.push((sample.name.to_string(), labels, value, sample.timestamp_ms));
    };
    let mut parser = promtext::LineParser::new();
    for piece in pieces {
        if let Err(error) = parser.feed(piece, &mut keep) {
            return (seen, Err(error));
        }
    }
    let outcome = parser.finish(&mut keep);
    (seen, outcome)
}

/// The Prometheus text parser. Accepted input re-rendered must parse to the same samples
/// (names, labels, values bit for bit, timestamps).
pub fn prometheus_text(data: &[u8]) -> u64 {
    // The Envoy-admin source parses a page chunk by chunk as it arrives: cut anywhere (here
    // where the first byte says, and byte by byte), it must read the same as whole.
    let whole = streamed(&[data]);
    let cut = data
        .first()
        .map_or(0, |b| usize::from(*b) * 7919 % (data.len() + 1));
    let (head, tail) = data.split_at(cut);
    assert_eq!(streamed(&[head, tail]), whole, "cut at byte {cut}");
    let bytes: Vec<&[u8]> = data.chunks(1).collect();
    assert_eq!(streamed(&bytes), whole, "byte by byte");
    let Ok(text) = std::str::from_utf8(data) else {
        // The source refuses a page that is not UTF-8; the rest of it is still checked.
        assert!(whole.1.is_err(), "text that is not UTF-8 was accepted");
        let lossy = String::from_utf8_lossy(data);
        return prometheus_text(lossy.as_bytes()) ^ 1;
    };
    match promtext::parse(text) {
        Ok(samples) => {
            let rendered = render(&samples);
            let again = promtext::parse(&rendered)
                .unwrap_or_else(|e| panic!("re-rendered samples rejected: {e}\n{rendered}"));
            assert_eq!(again.len(), samples.len(), "sample count changed");
            for (a, b) in samples.iter().zip(&again) {
                assert_eq!(a.name, b.name);
                assert_eq!(a.labels, b.labels);
                assert_eq!(a.timestamp_ms, b.timestamp_ms);
                assert!(
                    a.value.to_bits() == b.value.to_bits()
                        || (a.value.is_nan() && b.value.is_nan()),
                    "value {} came back as {}",
                    a.value,
                    b.value
                );
            }
            let types: Vec<_> = samples
                .iter()
                .take(4)
                .map(|s| (format!("{:?}", s.metric_type), s.labels.len().min(3)))
                .collect();
            signature(("ok", samples.len().min(8), types))
        }
        Err(error) => {
            assert!(error.line >= 1, "line numbers are 1-based");
            signature(("err", error_shape(&error.problem)))
        }
    }
}

/// One interval: stable and canary requests with some failures, latency in Envoy-like buckets.
fn traffic(stable: u64, stable_errors: u64, canary: u64, canary_errors: u64) -> Observation {
    use fledge_core::contract::ResponseClass;
    use fledge_core::observe::{LatencyHistogram, SubsetTraffic};
    let subset = |total: u64, errors: u64| {
        let mut traffic = SubsetTraffic {
            latency: LatencyHistogram {
                bounds_ms: vec![1.0, 5.0, 10.0, 50.0, 100.0, 500.0, 1000.0],
                cumulative: vec![0, total / 4, total / 2, total * 3 / 4, total, total, total],
                count: total,
                sum_ms: 20.0 * total as f64,
            },
            ..SubsetTraffic::default()
        };
        traffic.add(ResponseClass::Success, total - errors);
        traffic.add(ResponseClass::ServerError, errors);
        traffic
    };
    Observation {
        stable: subset(stable, stable_errors),
        canary: subset(canary, canary_errors),
        ..Default::default()
    }
}

/// Spec loading as `fledge validate` does it. Every accepted Canary must: serialize to YAML
/// and load back equal and valid; and go through two rollout steps (baseline, then an
/// observation) without panicking.
pub fn canary_spec(data: &[u8]) -> u64 {
    let Ok(text) = std::str::from_utf8(data) else {
        return 0;
    };
    match canary_config::parse_canaries("fuzz.yaml", text) {
        Ok(canaries) => {
            let mut shape = Vec::new();
            for canary in &canaries {
                let yaml = serde_yaml::to_string(canary)
                    .unwrap_or_else(|e| panic!("cannot serialize an accepted spec: {e}"));
                let again =
                    canary_config::parse_canaries("again.yaml", &yaml).unwrap_or_else(|errors| {
                        let errors: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
                        panic!("our own YAML is rejected: {errors:?}\n{yaml}")
                    });
                assert_eq!(
                    again.as_slice(),
                    std::slice::from_ref(canary),
                    "round trip changed the spec:\n{yaml}"
                );
                let t0 = Utc
                    .timestamp_opt(1_700_000_000, 0)
                    .single()
                    .unwrap_or_default();
                let mut status = CanaryStatus::default();
                for (i, observation) in [
                    Err(ObservationError::Baseline),
                    Ok(traffic(1000, 5, 200, 1)),
                    Ok(traffic(1000, 5, 200, 60)),
                ]
                .into_iter()
                .enumerate()
                {
                    let input = Input {
                        observation: Some(observation),
                        command: None,
                    };
                    let now = t0 + chrono::Duration::seconds(60 * i as i64);
                    status = rollout::step(&canary.spec, &status, &input, now).status;
                }
                let analysis = &canary.spec.analysis;
                shape.push((
                    format!("{:?}", status.phase),
                    analysis.plan().len().min(5),
                    analysis.metrics.len().min(3),
                    analysis.compare_with_stable.is_some(),
                    analysis.slo_burn_rate.is_some(),
                    canary.spec.webhooks.len().min(3),
                ));
            }
            signature(("ok", shape))
        }
        Err(errors) => {
            let shapes: Vec<String> = errors
                .iter()
                .take(4)
                .map(|e| error_shape(&e.to_string()))
                .collect();
            signature(("err", shapes))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_seed_passes_every_target() {
        let seeds = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
        for (name, target) in TARGETS {
            let dir = seeds.join(name);
            let mut count = 0;
            for entry in std::fs::read_dir(&dir).unwrap() {
                let data = std::fs::read(entry.unwrap().path()).unwrap();
                target(&data);
                count += 1;
            }
            assert!(count > 0, "no seeds in {}", dir.display());
        }
    }

    #[test]
    fn error_shapes_drop_input_text() {
        assert_eq!(
            error_shape("clusters.\"a b\".subset: expected 12 things here and there (see docs)"),
            "expected things here and there"
        );
    }
}
