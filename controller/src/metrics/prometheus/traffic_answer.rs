//! The shared traffic query's answer, indexed as it is read.
//!
//! An answer holds every origin's series of every canary reading this Prometheus: at 10,000
//! services, 112,000 samples and about 25 MB of JSON. Parsing it into owned samples first (a map
//! of owned label strings per sample) cost several times the body in short-lived allocations,
//! and the allocator kept much of that high-water mark. Here each sample, handed over by
//! [`super::answer::AnswerReader`] as soon as it has arrived, is read with its labels borrowed
//! from its text (copied only when a value has JSON escapes), added to its origin's accumulator
//! at once and dropped; only one owned key per origin is built.

use super::answer::{BorrowedSample, Labels, Samples};
use super::{OriginKey, TrafficIndex};
use crate::metrics::traffic_parts::TrafficParts;
use fledge_core::contract::{
    ResponseClass, REQUESTS_TOTAL, REQUEST_DURATION_MS, TAG_CLASS, TAG_SERVICE, TAG_SUBSET,
};
use fledge_core::observe::SubsetTraffic;
use std::collections::HashMap;

/// Labels that tell the series of one origin apart rather than the origin itself.
fn is_series_label(name: &str) -> bool {
    matches!(name, "__name__" | "le" | TAG_CLASS)
}

/// Builds a [`TrafficIndex`]: one accumulator per origin; an origin's first problem sticks to
/// it (only canaries reading that origin fail on it).
#[derive(Default)]
pub(super) struct TrafficIndexer {
    /// An origin's labels written out unambiguously ([`origin_text`]) → its key and series.
    origins: HashMap<String, (OriginKey, Result<OriginAccumulator, String>)>,
    /// Reused for every sample's origin text.
    scratch: String,
}

impl Samples for TrafficIndexer {
    fn add(&mut self, sample: &[u8]) -> Result<(), serde_json::Error> {
        self.index(serde_json::from_slice(sample)?);
        Ok(())
    }
}

impl TrafficIndexer {
    fn index(&mut self, mut sample: BorrowedSample<'_>) {
        let labels = &mut sample.metric;
        if labels.get(TAG_SERVICE).is_none() || labels.get(TAG_SUBSET).is_none() {
            return;
        }
        labels.0.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        origin_text(labels, &mut self.scratch);
        if !self.origins.contains_key(self.scratch.as_str()) {
            let key: OriginKey = labels
                .0
                .iter()
                .filter(|(name, _)| !is_series_label(name))
                .map(|(name, value)| (name.to_string(), value.to_string()))
                .collect();
            self.origins.insert(
                self.scratch.clone(),
                (key, Ok(OriginAccumulator::default())),
            );
        }
        let Some((_, accumulator)) = self.origins.get_mut(self.scratch.as_str()) else {
            return;
        };
        let Ok(series) = accumulator else {
            return;
        };
        if let Err(problem) = series.add(&sample) {
            *accumulator = Err(problem);
        }
    }

    pub(super) fn finish(self) -> TrafficIndex {
        let mut index = TrafficIndex::default();
        for (_, (key, accumulator)) in self.origins {
            let traffic = accumulator.map(OriginAccumulator::finish);
            let (Some(service), Some(subset)) = (key.get(TAG_SERVICE), key.get(TAG_SUBSET)) else {
                continue;
            };
            let (service, subset) = (service.clone(), subset.clone());
            index
                .by_service
                .entry(service)
                .or_default()
                .push((key, subset, traffic));
        }
        index
    }
}

/// The origin's labels (sorted, series labels left out), each name and value prefixed with its
/// length so that no two label sets write the same text.
fn origin_text(labels: &Labels<'_>, out: &mut String) {
    use std::fmt::Write as _;
    out.clear();
    for (name, value) in labels.0.iter().filter(|(name, _)| !is_series_label(name)) {
        let (name, value): (&str, &str) = (name, value);
        let _ = write!(out, "{}:{name}{}:{value}", name.len(), value.len());
    }
}

/// One origin's series, as they arrive.
#[derive(Default)]
struct OriginAccumulator(TrafficParts);

impl OriginAccumulator {
    /// Add one sample of the traffic query (other metric names are ignored).
    fn add(&mut self, sample: &BorrowedSample<'_>) -> Result<(), String> {
        let labels = &sample.metric;
        let name = labels.get("__name__").unwrap_or("");
        let value = sample
            .value
            .as_ref()
            .ok_or_else(|| {
                format!(
                    "{} is a native histogram, expected a float sample",
                    labels.describe()
                )
            })
            .and_then(|value| {
                super::parse_prometheus_float(&value.1)
                    .map_err(|problem| format!("{}: {problem}", labels.describe()))
            })?;
        match name.strip_prefix(REQUEST_DURATION_MS) {
            _ if name == REQUESTS_TOTAL => self.add_requests(labels, value),
            Some("_bucket") => self.add_bucket(labels, value),
            Some("_sum") => self.add_sum(labels, value),
            Some("_count") => {
                self.0.count = Some(whole_count(labels, value)?);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn add_requests(&mut self, labels: &Labels<'_>, value: f64) -> Result<(), String> {
        let class_label = labels
            .get(TAG_CLASS)
            .ok_or_else(|| format!("{} has no {TAG_CLASS} label", labels.describe()))?;
        let class = ResponseClass::from_label(class_label).ok_or_else(|| {
            format!(
                "{} has unknown {TAG_CLASS} {class_label:?}; this controller knows {}",
                labels.describe(),
                ResponseClass::ALL.map(ResponseClass::label).join(", ")
            )
        })?;
        self.0.add_class(class, whole_count(labels, value)?);
        Ok(())
    }

    fn add_bucket(&mut self, labels: &Labels<'_>, value: f64) -> Result<(), String> {
        let le_text = labels
            .get("le")
            .ok_or_else(|| format!("{} has no le label", labels.describe()))?;
        let le = super::parse_prometheus_float(le_text)
            .ok()
            .filter(|le| !le.is_nan())
            .ok_or_else(|| format!("{} has an invalid le {le_text:?}", labels.describe()))?;
        self.0.add_bucket(le, whole_count(labels, value)?);
        Ok(())
    }

    fn add_sum(&mut self, labels: &Labels<'_>, value: f64) -> Result<(), String> {
        if !value.is_finite() || value < 0.0 {
            return Err(format!(
                "{} is {value}, expected a non-negative number",
                labels.describe()
            ));
        }
        self.0.sum_ms = Some(value);
        Ok(())
    }

    /// The origin's traffic ([`TrafficParts::finish`]).
    fn finish(self) -> SubsetTraffic {
        self.0.finish()
    }
}

/// A counter value as a whole number. Raw Envoy counters are integers; anything else (a
/// recording rule in between, say) is rounded to the nearest request.
fn whole_count(labels: &Labels<'_>, value: f64) -> Result<u64, String> {
    // 2^64: the first value that does not fit.
    if (0.0..18_446_744_073_709_551_616.0).contains(&value) {
        Ok(value.round() as u64)
    } else {
        Err(format!(
            "{} is {value}, expected a non-negative count",
            labels.describe()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::super::answer::{read_in_pieces, AnswerData};
    use super::*;
    use fledge_core::contract::ResponseClass;

    #[derive(Debug)]
    enum TrafficData {
        Index(TrafficIndex),
        Other(&'static str),
    }

    /// A successful answer with `data`, read whole; read in 1-byte pieces and cut at a few
    /// places, it gives the same index or error.
    fn parse(data: &str) -> Result<TrafficData, String> {
        let body = format!(r#"{{"status":"success","data":{data}}}"#);
        let read = |cuts: &[usize]| -> Result<TrafficData, String> {
            match read_in_pieces(body.as_bytes(), cuts, TrafficIndexer::default(), 200) {
                Ok(AnswerData::Vector(indexer)) => Ok(TrafficData::Index(indexer.finish())),
                Ok(other) => Ok(TrafficData::Other(other.type_name())),
                Err(error) => Err(error.to_string()),
            }
        };
        let whole = read(&[]);
        let bytes: Vec<usize> = (1..body.len()).collect();
        let thirds = [body.len() / 3, 2 * body.len() / 3];
        for cuts in [&bytes[..], &thirds[..], &[body.len() / 2]] {
            assert_eq!(
                render(&read(cuts)),
                render(&whole),
                "{body} cut at {cuts:?}"
            );
        }
        whole
    }

    /// An outcome in a stable order, to compare.
    fn render(outcome: &Result<TrafficData, String>) -> String {
        let Ok(TrafficData::Index(index)) = outcome else {
            return format!("{outcome:?}");
        };
        let mut origins: Vec<String> = index
            .by_service
            .iter()
            .flat_map(|(service, origins)| {
                origins
                    .iter()
                    .map(move |origin| format!("{service}: {origin:?}"))
            })
            .collect();
        origins.sort();
        origins.join("\n")
    }

    fn index(data: &str) -> TrafficIndex {
        match parse(data) {
            Ok(TrafficData::Index(index)) => index,
            other => panic!("{data}: {other:?}"),
        }
    }

    /// The traffic of `service`'s `subset` at `instance`.
    fn traffic(
        index: &TrafficIndex,
        service: &str,
        subset: &str,
        instance: &str,
    ) -> Result<SubsetTraffic, String> {
        index.by_service[service]
            .iter()
            .find(|(key, s, _)| {
                s == subset && key.get("instance").map(String::as_str) == Some(instance)
            })
            .map(|(_, _, traffic)| traffic.clone())
            .unwrap_or_else(|| panic!("no origin {service}/{subset}@{instance}"))
    }

    fn sample(labels: &str, value: &str) -> String {
        format!(r#"{{"metric":{{{labels}}},"value":[1700000000.5,"{value}"]}}"#)
    }

    fn vector(samples: &[String]) -> String {
        format!(
            r#"{{"resultType":"vector","result":[{}]}}"#,
            samples.join(",")
        )
    }

    const APP_A: &str = r#""fledge_service":"app","fledge_subset":"canary","instance":"a""#;

    #[test]
    fn samples_are_summed_by_origin_whatever_the_label_order() {
        let samples = [
            sample(
                &format!(r#""__name__":"fledge_requests_total",{APP_A},"fledge_class":"2xx""#),
                "90",
            ),
            // Same origin, labels in another order.
            sample(
                r#""instance":"a","fledge_class":"5xx","fledge_subset":"canary","__name__":"fledge_requests_total","fledge_service":"app""#,
                "10",
            ),
            sample(
                &format!(r#""__name__":"fledge_request_duration_ms_bucket",{APP_A},"le":"10""#),
                "60",
            ),
            sample(
                &format!(r#""__name__":"fledge_request_duration_ms_bucket",{APP_A},"le":"+Inf""#),
                "100",
            ),
            sample(
                &format!(r#""__name__":"fledge_request_duration_ms_sum",{APP_A}"#),
                "800.5",
            ),
            sample(
                &format!(r#""__name__":"fledge_request_duration_ms_count",{APP_A}"#),
                "100",
            ),
            // Another replica of the same subset is another origin.
            sample(
                r#""__name__":"fledge_requests_total","fledge_service":"app","fledge_subset":"canary","instance":"b","fledge_class":"2xx""#,
                "7",
            ),
            // Another metric and a sample without our labels are ignored.
            sample(&format!(r#""__name__":"up",{APP_A}"#), "1"),
            sample(r#""__name__":"fledge_requests_total","instance":"a""#, "5"),
        ];
        let index = index(&vector(&samples));
        assert_eq!(index.by_service.len(), 1);
        assert_eq!(index.by_service["app"].len(), 2);
        let a = traffic(&index, "app", "canary", "a").unwrap();
        assert_eq!(a.count(ResponseClass::Success), 90);
        assert_eq!(a.count(ResponseClass::ServerError), 10);
        assert_eq!(a.latency.bounds_ms, vec![10.0]);
        let b = traffic(&index, "app", "canary", "b").unwrap();
        assert_eq!(b.count(ResponseClass::Success), 7);
        let (key, _, _) = &index.by_service["app"][0];
        assert!(
            !key.contains_key("__name__")
                && !key.contains_key("le")
                && !key.contains_key(TAG_CLASS)
        );
    }

    #[test]
    fn escaped_strings_are_read_and_label_sets_never_collide() {
        // `a` = "x1:y" and `a` = "x", `1:y`... the origin text is length-prefixed, so these are
        // two origins even though their labels concatenate to the same characters.
        let samples = [
            sample(
                r#""__name__":"fledge_requests_total","fledge_service":"s\"q","fledge_subset":"v1","a":"x1:y","fledge_class":"2xx""#,
                "1",
            ),
            sample(
                r#""__name__":"fledge_requests_total","fledge_service":"s\"q","fledge_subset":"v1","a":"x","b1:y":"","fledge_class":"2xx""#,
                "2",
            ),
            sample(
                r#""__name__":"fledge_requests_total","fledge_service":"\u0061pp","fledge_subset":"v1","fledge_class":"2xx""#,
                "3",
            ),
        ];
        let index = index(&vector(&samples));
        assert_eq!(index.by_service["s\"q"].len(), 2);
        let app = &index.by_service["app"];
        assert_eq!(app[0].2.as_ref().unwrap().count(ResponseClass::Success), 3);
    }

    #[test]
    fn result_before_its_type_and_other_types() {
        let one = sample(
            &format!(r#""__name__":"fledge_requests_total",{APP_A},"fledge_class":"2xx""#),
            "4",
        );
        let late = format!(r#"{{"result":[{one}],"resultType":"vector"}}"#);
        let a = traffic(&index(&late), "app", "canary", "a").unwrap();
        assert_eq!(a.count(ResponseClass::Success), 4);
        for (data, kind) in [
            (r#"{"resultType":"scalar","result":[1,"2"]}"#, "scalar"),
            (r#"{"result":[1,"2"],"resultType":"scalar"}"#, "scalar"),
            (
                r#"{"resultType":"matrix","result":[{"metric":{},"values":[]}]}"#,
                "range vector (matrix)",
            ),
            (
                r#"{"resultType":"string","result":[1,"x"],"stats":{}}"#,
                "string",
            ),
            (
                r#"{"resultType":"histogram","result":[]}"#,
                "result of an unknown type",
            ),
        ] {
            match parse(data) {
                Ok(TrafficData::Other(name)) => assert_eq!(name, kind, "{data}"),
                other => panic!("{data}: {other:?}"),
            }
        }
    }

    #[test]
    fn malformed_answers_fail_to_parse() {
        for (data, problem) in [
            (r#"{"result": []}"#, "missing field `resultType`"),
            (r#"{"resultType": "vector"}"#, "missing field `result`"),
            (r#"{"resultType": "vector", "result": {}}"#, "invalid type"),
            (
                r#"{"resultType": "vector", "result": [{"metric": []}]}"#,
                "invalid type",
            ),
            (
                r#"{"resultType": "vector", "result": [{"metric": {"a": 1}}]}"#,
                "invalid type",
            ),
            (
                r#"{"resultType": "vector", "result": [{"metric": {}, "value": [1, 2]}]}"#,
                "invalid type",
            ),
            (
                r#"{"resultType": "vector", "result": [{"metric": {}, "value": [1]}]}"#,
                "invalid length",
            ),
            (
                r#"{"result": [{"metric": 3}], "resultType": "vector"}"#,
                "invalid type",
            ),
            (
                r#"{"resultType": "vector", "result": ["#,
                "expected sample 1",
            ),
            (
                r#"{"resultType": "vector", "result": [{} {}]}"#,
                "expected `,` or `]`",
            ),
            (
                r#"{"resultType": "vector", "result": [,]}"#,
                "expected sample 1",
            ),
            (
                r#"{"resultType": "vector", "result": [{}, ]}"#,
                "expected sample 2",
            ),
            (
                r#"{"resultType": "vector", "result": [{}"#,
                "after sample 1",
            ),
            (r#"{"resultType": "vector", "result": []"#, "EOF"),
            (r#"[]"#, "not a Prometheus API answer"),
            (r#"3"#, "invalid type"),
        ] {
            let error = parse(data).unwrap_err();
            assert!(error.contains(problem), "{data}: {error}");
        }
    }

    #[test]
    fn a_bad_series_fails_only_its_origin_and_says_why() {
        let bad = |labels: &str, value: &str| {
            let samples = [
                sample(
                    &format!(r#""__name__":"fledge_requests_total",{APP_A},{labels}"#),
                    value,
                ),
                sample(
                    r#""__name__":"fledge_requests_total","fledge_service":"app","fledge_subset":"stable","instance":"a","fledge_class":"2xx""#,
                    "5",
                ),
            ];
            let index = index(&vector(&samples));
            assert_eq!(
                traffic(&index, "app", "stable", "a")
                    .unwrap()
                    .count(ResponseClass::Success),
                5
            );
            traffic(&index, "app", "canary", "a").unwrap_err()
        };
        for (labels, value, problem) in [
            (
                r#""fledge_class":"6xx""#,
                "1",
                "unknown fledge_class \"6xx\"",
            ),
            (
                r#""fledge_class":"2xx""#,
                "-3",
                "expected a non-negative count",
            ),
            (
                r#""fledge_class":"2xx""#,
                "NaN",
                "expected a non-negative count",
            ),
            (
                r#""fledge_class":"2xx""#,
                "lots",
                "\"lots\" is not a number",
            ),
            (r#""x":"y""#, "1", "has no fledge_class label"),
        ] {
            let message = bad(labels, value);
            assert!(message.contains(problem), "{labels} {value}: {message}");
            assert!(message.contains("fledge_requests_total{"), "{message}");
        }
        let histogram = |name: &str, extra: &str, value: &str| {
            let data = vector(&[sample(
                &format!(r#""__name__":"{name}",{APP_A}{extra}"#),
                value,
            )]);
            traffic(&index(&data), "app", "canary", "a").unwrap_err()
        };
        assert!(histogram("fledge_request_duration_ms_bucket", "", "1").contains("has no le label"));
        assert!(
            histogram("fledge_request_duration_ms_bucket", r#","le":"NaN""#, "1")
                .contains("invalid le")
        );
        assert!(histogram("fledge_request_duration_ms_sum", "", "-1")
            .contains("expected a non-negative number"));
        let native = vector(&[format!(
            r#"{{"metric":{{"__name__":"fledge_requests_total",{APP_A},"fledge_class":"2xx"}},"histogram":[1,{{}}]}}"#
        )]);
        assert!(traffic(&index(&native), "app", "canary", "a")
            .unwrap_err()
            .contains("native histogram"));
    }

    /// A cheap stand-in for a fuzzer: every prefix and many mutations of a realistic answer
    /// parse or fail, never panic.
    #[test]
    fn never_panics_on_truncated_or_mutated_answers() {
        let text = vector(&[
            sample(
                &format!(r#""__name__":"fledge_requests_total",{APP_A},"fledge_class":"2xx""#),
                "9",
            ),
            sample(
                r#""__name__":"fledge_request_duration_ms_bucket","fledge_service":"a\"✓","fledge_subset":"v","le":"+Inf""#,
                "1e3",
            ),
        ]);
        let chars: Vec<char> = text.chars().collect();
        for end in 0..=chars.len() {
            let prefix: String = chars[..end].iter().collect();
            let _ = parse(&prefix);
        }
        let replacements = ['{', '}', '[', ']', '"', '\\', ':', ',', '1', 'é', '\0', ' '];
        for position in 0..chars.len() {
            for replacement in replacements {
                let mut mutated = chars.clone();
                mutated[position] = replacement;
                let mutated: String = mutated.into_iter().collect();
                let _ = parse(&mutated);
            }
        }
    }
}
