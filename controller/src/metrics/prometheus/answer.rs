//! A Prometheus API answer read as it arrives, in pieces of any size (a response body's chunks),
//! never held whole.
//!
//! The samples of a vector result (`data.result`) are the bulk of an answer: at 1,000 services
//! the shared traffic query's answer is about 3 MB, at 10,000 about 25 MB. Reading it whole cost
//! hyper's read buffer, reqwest's collected body, the `String` and the parsed samples at once.
//! Here a splitter walks the bytes, tracking only JSON strings, escapes and nesting: each
//! sample of `data.result` is handed over as its own JSON text as soon as it is complete (a
//! sample cut between pieces is the only thing carried over), and everything else — `status`,
//! `errorType`, `error`, `warnings`, `resultType`, and a result of another type — is kept as
//! "the rest" and parsed by serde at the end, so those keep serde's checks and messages.
//!
//! A sample is read for what the query needs ([`Samples`]), then dropped. The samples of a
//! matrix result are skipped unread (only its type matters). However a body is cut, the same
//! samples reach [`Samples::add`] and the same error comes out.

use super::{excerpt, QUERY_PATH};
use fledge_core::observe::ObservationError;
use serde::de::{Deserializer, IgnoredAny, MapAccess};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;

/// The longest sample of a vector this reader takes, in bytes. A sample is a few hundred bytes
/// (its labels and one value); one this long means a broken answer, and holding it is what
/// streaming avoids.
pub(super) const MAX_SAMPLE_BYTES: usize = 64 * 1024;

/// The longest the rest of an answer may be (everything but a vector's or a matrix's samples:
/// status, error, warnings, or a scalar or string result), in bytes.
pub(super) const MAX_REST_BYTES: usize = 1024 * 1024;

/// Bytes kept from the start of a body, for the excerpt in messages.
const HEAD_BYTES: usize = 4 * super::BODY_EXCERPT_CHARS;

/// Longest key or `resultType` value the splitter looks at (longer ones are none of ours).
const MAX_NAME_BYTES: usize = 256;

/// What a query keeps of a vector's samples, given one at a time as its JSON text.
pub(super) trait Samples {
    fn add(&mut self, sample: &[u8]) -> Result<(), serde_json::Error>;
}

/// The `data` of an answer that reported success.
#[derive(Debug)]
pub(super) enum AnswerData<S> {
    /// A vector: what [`Samples`] kept of it.
    Vector(S),
    Scalar(SampleValue),
    /// Another `resultType` (as the answer spelled it).
    Other(String),
}

impl<S> AnswerData<S> {
    /// The result type as messages name it.
    pub(super) fn type_name(&self) -> &'static str {
        match self {
            AnswerData::Vector(_) => "vector",
            AnswerData::Scalar(_) => "scalar",
            AnswerData::Other(kind) => result_type_name(kind),
        }
    }
}

/// A result type as messages name it.
pub(super) fn result_type_name(result_type: &str) -> &'static str {
    match result_type {
        "vector" => "vector",
        "scalar" => "scalar",
        "matrix" => "range vector (matrix)",
        "string" => "string",
        _ => "result of an unknown type",
    }
}

/// `[<unix time>, "<value>"]`; the value is a string so that NaN and ±Inf survive JSON. The
/// time is Prometheus' evaluation time, the same for every sample of an instant query.
#[derive(Debug, Deserialize)]
pub(super) struct SampleValue(#[allow(dead_code)] f64, pub(super) String);

/// The query an answer belongs to, for messages.
#[derive(Debug, Clone, Copy)]
pub(super) struct QueryContext<'a> {
    pub address: &'a str,
    /// "traffic query", "custom metric \"x\"", ...
    pub what: &'a str,
    pub promql: &'a str,
}

/// One answer, fed piece by piece ([`AnswerReader::feed`]), then [`AnswerReader::finish`]ed.
pub(super) struct AnswerReader<S> {
    splitter: Splitter,
    samples: S,
    /// The start of the body, for messages.
    head: Vec<u8>,
    /// Why the body is not an API answer, once known (no more samples are read).
    failed: Option<String>,
}

impl<S: Samples> AnswerReader<S> {
    pub(super) fn new(samples: S) -> Self {
        AnswerReader {
            splitter: Splitter::default(),
            samples,
            head: Vec::new(),
            failed: None,
        }
    }

    /// Read one more piece of the body. `false` once no more is needed: the body is known not
    /// to be an API answer and the start quoted in the message has been read (the excerpt is
    /// the same however the body was cut).
    pub(super) fn feed(&mut self, piece: &[u8]) -> bool {
        let room = HEAD_BYTES.saturating_sub(self.head.len());
        self.head
            .extend_from_slice(piece.get(..room.min(piece.len())).unwrap_or_default());
        if self.failed.is_none() {
            let samples = &mut self.samples;
            if let Err(problem) = self.splitter.feed(piece, &mut |sample| samples.add(sample)) {
                self.failed = Some(problem);
            }
        }
        self.failed.is_none() || self.head.len() < HEAD_BYTES
    }

    /// The answer's data, or the error it is (see the module docs of `prometheus` for which
    /// errors are `Unreachable` and which `Malformed`). `status` is the HTTP status.
    pub(super) fn finish(
        mut self,
        query: &QueryContext<'_>,
        status: reqwest::StatusCode,
    ) -> Result<AnswerData<S>, ObservationError> {
        let parsed = match self.failed.take() {
            Some(problem) => Err(problem),
            None => self.parse_rest(),
        };
        let (api, data) = parsed.map_err(|problem| self.not_an_answer(query, status, &problem))?;
        let promql = excerpt(query.promql);
        for warning in &api.warnings {
            tracing::warn!(prometheus = %query.address, query = %promql, %warning, "Prometheus warning");
        }
        if api.status != "success" {
            return Err(api_error(api, query));
        }
        let data = data.ok_or_else(|| {
            ObservationError::Malformed(format!(
                "Prometheus {}: {}: answer has no data; query: {promql}",
                query.address, query.what
            ))
        })?;
        Ok(match data {
            Settled::Vector => AnswerData::Vector(self.samples),
            Settled::Scalar(value) => AnswerData::Scalar(value),
            Settled::Other(kind) => AnswerData::Other(kind),
        })
    }

    /// A body that is no API answer: Prometheus answers API errors (bad query: 400, execution
    /// error: 422, timeout: 503) with a JSON body, so anything else that is not 2xx comes from
    /// somewhere else (a proxy, a wrong address) and says nothing about the query.
    fn not_an_answer(
        &self,
        query: &QueryContext<'_>,
        status: reqwest::StatusCode,
        problem: &str,
    ) -> ObservationError {
        let (address, what) = (query.address, query.what);
        if !status.is_success() {
            return ObservationError::Unreachable(format!(
                "Prometheus {address}: {what}: HTTP {status} from {QUERY_PATH}: {}",
                self.excerpt()
            ));
        }
        ObservationError::Malformed(format!(
            "Prometheus {address}: {what}: not a Prometheus API answer ({problem}): {}; query: {}",
            self.excerpt(),
            excerpt(query.promql)
        ))
    }

    /// The rest of the answer parsed, and its data settled: a vector whose samples were kept in
    /// the rest (its `result` came before its `resultType`) is given to `samples` now.
    fn parse_rest(&mut self) -> Result<(ApiResponse, Option<Settled>), String> {
        let mut api = serde_json::from_slice::<ApiResponse>(&self.splitter.rest)
            .map_err(|error| error.to_string())?;
        let Some(shape) = api.data.take() else {
            return Ok((api, None));
        };
        let data = match shape.result_type.as_str() {
            "vector" => {
                if !self.splitter.streamed {
                    let samples: Vec<&RawValue> = serde_json::from_str(shape.result.get())
                        .map_err(|error| error.to_string())?;
                    for (number, sample) in samples.iter().enumerate() {
                        self.samples
                            .add(sample.get().as_bytes())
                            .map_err(|error| sample_problem(number + 1, &error))?;
                    }
                }
                Settled::Vector
            }
            "scalar" => Settled::Scalar(
                serde_json::from_str(shape.result.get()).map_err(|error| error.to_string())?,
            ),
            other => Settled::Other(other.to_string()),
        };
        Ok((api, Some(data)))
    }

    fn excerpt(&self) -> String {
        String::from_utf8_lossy(&self.head)
            .chars()
            .take(super::BODY_EXCERPT_CHARS)
            .collect::<String>()
            .trim()
            .to_string()
    }
}

/// The error an answer reports: one Prometheus could not finish in time says nothing about the
/// query (`Unreachable`); any other is the query's (`Malformed`).
fn api_error(api: ApiResponse, query: &QueryContext<'_>) -> ObservationError {
    let error_type = api.error_type.unwrap_or_else(|| "unknown".to_string());
    let message = format!(
        "Prometheus {}: {} failed: {error_type}: {}; query: {}",
        query.address,
        query.what,
        api.error.unwrap_or_else(|| "no error message".to_string()),
        excerpt(query.promql)
    );
    match error_type.as_str() {
        "timeout" | "canceled" | "unavailable" => ObservationError::Unreachable(message),
        _ => ObservationError::Malformed(message),
    }
}

/// An answer's data once its rest is parsed (a vector's samples are in the reader's [`Samples`]).
enum Settled {
    Vector,
    Scalar(SampleValue),
    Other(String),
}

fn sample_problem(number: usize, error: &dyn std::fmt::Display) -> String {
    format!("sample {number} of data.result: {error}")
}

/// The rest of every Prometheus API answer.
#[derive(Debug, Deserialize)]
struct ApiResponse {
    status: String,
    #[serde(default)]
    data: Option<Shape>,
    #[serde(default, rename = "errorType")]
    error_type: Option<String>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    warnings: Vec<String>,
}

/// `data` in the rest: a streamed vector's or a matrix' `result` is `[]` there.
#[derive(Debug, Deserialize)]
struct Shape {
    #[serde(rename = "resultType")]
    result_type: String,
    result: Box<RawValue>,
}

/// Which object of the answer a tracked frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Top,
    Data,
}

/// The key of the member being read in a tracked object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Key {
    Data,
    ResultType,
    Result,
    Other,
}

#[derive(Debug, Clone, Copy)]
struct Frame {
    role: Role,
    /// Before a member's `:`.
    awaiting_key: bool,
    key: Key,
}

impl Frame {
    fn new(role: Role) -> Self {
        Frame {
            role,
            awaiting_key: true,
            key: Key::Other,
        }
    }
}

/// Where in `data.result` the splitter is, between two samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gap {
    First,
    AfterSample,
    AfterComma,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Region {
    /// Outside the samples: bytes go to the rest.
    Rest,
    /// Directly inside `data.result`.
    Between(Gap),
    /// Inside one sample.
    Sample,
}

/// A string being read that matters: a key of a tracked object, or `resultType`'s value.
#[derive(Debug)]
enum Capture {
    Key(Vec<u8>),
    ResultType(Vec<u8>),
}

/// Splits an answer into its samples and its rest (see the module docs).
#[derive(Debug)]
struct Splitter {
    region: Region,
    /// The tracked objects open, outermost first: the answer and its `data`.
    frames: Vec<Frame>,
    /// Containers open inside values the splitter does not look into.
    untracked: usize,
    /// A top-level value has begun.
    top_seen: bool,
    in_string: bool,
    escaped: bool,
    capture: Option<Capture>,
    result_type: Option<String>,
    /// `data.result`'s samples go to [`Samples`] (a vector), or are skipped (a matrix).
    keep_samples: bool,
    /// A vector's samples were handed over as they came (not kept in the rest).
    streamed: bool,
    /// The sample being read: nesting depth, string state.
    sample: SampleScan,
    /// The start of a sample cut off by the end of the previous piece.
    carry: Vec<u8>,
    samples_seen: usize,
    rest: Vec<u8>,
}

impl Default for Splitter {
    fn default() -> Self {
        Splitter {
            region: Region::Rest,
            frames: Vec::new(),
            untracked: 0,
            top_seen: false,
            in_string: false,
            escaped: false,
            capture: None,
            result_type: None,
            keep_samples: false,
            streamed: false,
            sample: SampleScan::default(),
            carry: Vec::new(),
            samples_seen: 0,
            rest: Vec::new(),
        }
    }
}

type Each<'a> = dyn FnMut(&[u8]) -> Result<(), serde_json::Error> + 'a;

impl Splitter {
    fn feed(&mut self, piece: &[u8], each: &mut Each<'_>) -> Result<(), String> {
        let mut at = 0;
        while at < piece.len() {
            at = match self.region {
                Region::Rest => self.scan_rest(piece, at)?,
                Region::Between(gap) => self.scan_between(piece, at, gap)?,
                Region::Sample => self.scan_sample(piece, at, each)?,
            };
        }
        Ok(())
    }

    /// Bytes of the rest from `from` until the samples begin or the piece ends.
    fn scan_rest(&mut self, piece: &[u8], from: usize) -> Result<usize, String> {
        let mut end = piece.len();
        for (offset, byte) in piece.iter().skip(from).enumerate() {
            if self.rest_byte(*byte) {
                end = from + offset + 1;
                break;
            }
        }
        self.keep_rest(piece.get(from..end).unwrap_or_default())?;
        Ok(end)
    }

    fn keep_rest(&mut self, bytes: &[u8]) -> Result<(), String> {
        if self.rest.len() + bytes.len() > MAX_REST_BYTES {
            return Err(format!(
                "longer than {MAX_REST_BYTES} bytes outside the samples of data.result"
            ));
        }
        self.rest.extend_from_slice(bytes);
        Ok(())
    }

    /// One byte of the rest; `true` when it opens `data.result`'s samples.
    fn rest_byte(&mut self, byte: u8) -> bool {
        if self.in_string {
            self.string_byte(byte);
            return false;
        }
        match byte {
            b'"' => {
                self.in_string = true;
                self.start_capture();
            }
            b':' => {
                if let Some(frame) = self.tracked_frame() {
                    frame.awaiting_key = false;
                }
            }
            b',' => {
                if let Some(frame) = self.tracked_frame() {
                    frame.awaiting_key = true;
                    frame.key = Key::Other;
                }
            }
            b'{' | b'[' => return self.open(byte),
            b'}' | b']' => self.close(),
            _ => {}
        }
        false
    }

    fn string_byte(&mut self, byte: u8) {
        if let Some(Capture::Key(text) | Capture::ResultType(text)) = &mut self.capture {
            if text.len() <= MAX_NAME_BYTES {
                text.push(byte);
            }
        }
        if self.escaped {
            self.escaped = false;
        } else if byte == b'\\' {
            self.escaped = true;
        } else if byte == b'"' {
            self.in_string = false;
            self.end_capture();
        }
    }

    /// The innermost open container, if it is a tracked object.
    fn tracked_frame(&mut self) -> Option<&mut Frame> {
        if self.untracked > 0 {
            return None;
        }
        self.frames.last_mut()
    }

    fn start_capture(&mut self) {
        self.capture = match self.tracked_frame() {
            Some(frame) if frame.awaiting_key => Some(Capture::Key(vec![b'"'])),
            Some(frame) if frame.role == Role::Data && frame.key == Key::ResultType => {
                Some(Capture::ResultType(vec![b'"']))
            }
            _ => None,
        };
    }

    /// A captured string ended: decoded as serde would (escapes and all).
    fn end_capture(&mut self) {
        let decode = |text: &[u8]| {
            (text.len() <= MAX_NAME_BYTES)
                .then(|| serde_json::from_slice::<String>(text).ok())
                .flatten()
        };
        match self.capture.take() {
            Some(Capture::Key(text)) => {
                let key = match decode(&text).as_deref() {
                    Some("data") => Key::Data,
                    Some("resultType") => Key::ResultType,
                    Some("result") => Key::Result,
                    _ => Key::Other,
                };
                if let Some(frame) = self.tracked_frame() {
                    frame.key = key;
                }
            }
            Some(Capture::ResultType(text)) => {
                self.result_type = Some(decode(&text).unwrap_or_default());
            }
            None => {}
        }
    }

    /// `{` or `[` in the rest; `true` when it opens `data.result`'s samples.
    fn open(&mut self, byte: u8) -> bool {
        let Some(frame) = self.tracked_frame().copied() else {
            if self.untracked == 0 && self.frames.is_empty() && !self.top_seen && byte == b'{' {
                self.frames.push(Frame::new(Role::Top));
            } else {
                self.untracked += 1;
            }
            self.top_seen = true;
            return false;
        };
        match (frame.role, frame.awaiting_key, frame.key, byte) {
            (Role::Top, false, Key::Data, b'{') => self.frames.push(Frame::new(Role::Data)),
            (Role::Data, false, Key::Result, b'[') => match self.result_type.as_deref() {
                Some("vector") => return self.enter_samples(true),
                Some("matrix") => return self.enter_samples(false),
                // Another type, or none yet: the result stays in the rest.
                _ => self.untracked += 1,
            },
            _ => self.untracked += 1,
        }
        false
    }

    fn enter_samples(&mut self, keep: bool) -> bool {
        self.keep_samples = keep;
        self.streamed |= keep;
        self.region = Region::Between(Gap::First);
        true
    }

    fn close(&mut self) {
        if self.untracked > 0 {
            self.untracked -= 1;
        } else {
            self.frames.pop();
        }
    }

    /// Between samples: whitespace, one `,` after each sample, `]` at the end.
    fn scan_between(&mut self, piece: &[u8], from: usize, mut gap: Gap) -> Result<usize, String> {
        let mut at = from;
        while let Some(byte) = piece.get(at) {
            match (byte, gap) {
                (b' ' | b'\t' | b'\n' | b'\r', _) => {}
                (b',', Gap::AfterSample) => gap = Gap::AfterComma,
                (b']', Gap::First | Gap::AfterSample) => {
                    self.keep_rest(b"]")?;
                    self.region = Region::Rest;
                    return Ok(at + 1);
                }
                (_, Gap::AfterSample) => {
                    return Err(format!(
                        "expected `,` or `]` after sample {} of data.result",
                        self.samples_seen
                    ))
                }
                (b',' | b']' | b'}', _) => {
                    return Err(format!(
                        "expected sample {} of data.result, found `{}`",
                        self.samples_seen + 1,
                        char::from(*byte)
                    ))
                }
                _ => {
                    self.region = Region::Sample;
                    self.sample = SampleScan::default();
                    return Ok(at);
                }
            }
            at += 1;
        }
        self.region = Region::Between(gap);
        Ok(at)
    }

    /// Inside a sample: hand it over once complete, else carry its start to the next piece.
    fn scan_sample(
        &mut self,
        piece: &[u8],
        from: usize,
        each: &mut Each<'_>,
    ) -> Result<usize, String> {
        let mut end = None;
        for (offset, byte) in piece.iter().skip(from).enumerate() {
            let step = self.sample.step(*byte);
            let length = match step {
                Step::EndsBefore => self.carry.len() + offset,
                Step::More | Step::EndsAfter => self.carry.len() + offset + 1,
            };
            if self.keep_samples && length > MAX_SAMPLE_BYTES {
                return Err(format!(
                    "sample {} of data.result is longer than {MAX_SAMPLE_BYTES} bytes",
                    self.samples_seen + 1
                ));
            }
            match step {
                Step::More => {}
                Step::EndsBefore => end = Some(from + offset),
                Step::EndsAfter => end = Some(from + offset + 1),
            }
            if end.is_some() {
                break;
            }
        }
        let Some(end) = end else {
            if self.keep_samples {
                self.carry
                    .extend_from_slice(piece.get(from..).unwrap_or_default());
            }
            return Ok(piece.len());
        };
        self.samples_seen += 1;
        if self.keep_samples {
            let tail = piece.get(from..end).unwrap_or_default();
            let outcome = if self.carry.is_empty() {
                each(tail)
            } else {
                self.carry.extend_from_slice(tail);
                let outcome = each(&self.carry);
                self.carry.clear();
                outcome
            };
            outcome.map_err(|error| sample_problem(self.samples_seen, &error))?;
        }
        self.region = Region::Between(Gap::AfterSample);
        Ok(end)
    }
}

/// Where one sample's bytes end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// The byte belongs to the sample, which goes on.
    More,
    /// The byte is the sample's last.
    EndsAfter,
    /// The byte follows the sample (which was a bare number or literal).
    EndsBefore,
}

/// One sample's nesting and string state. Its content is serde's to check.
#[derive(Debug, Default)]
struct SampleScan {
    depth: usize,
    in_string: bool,
    escaped: bool,
}

impl SampleScan {
    fn step(&mut self, byte: u8) -> Step {
        if self.in_string {
            if self.escaped {
                self.escaped = false;
            } else if byte == b'\\' {
                self.escaped = true;
            } else if byte == b'"' {
                self.in_string = false;
                if self.depth == 0 {
                    return Step::EndsAfter;
                }
            }
            return Step::More;
        }
        match byte {
            b'"' => self.in_string = true,
            b'{' | b'[' => self.depth += 1,
            b'}' | b']' if self.depth == 0 => return Step::EndsBefore,
            b'}' | b']' => {
                self.depth -= 1;
                if self.depth == 0 {
                    return Step::EndsAfter;
                }
            }
            b' ' | b'\t' | b'\n' | b'\r' | b',' if self.depth == 0 => return Step::EndsBefore,
            _ => {}
        }
        Step::More
    }
}

/// One sample of a vector, its strings borrowed from the body unless they hold escapes.
#[derive(Debug, Deserialize)]
pub(super) struct BorrowedSample<'a> {
    #[serde(borrow, default)]
    pub(super) metric: Labels<'a>,
    /// Absent for native histogram samples (which carry `histogram` instead).
    #[serde(borrow, default)]
    pub(super) value: Option<BorrowedValue<'a>>,
}

/// `[<unix time>, "<value>"]` (the time is the same for every sample of an instant query).
#[derive(Debug, Deserialize)]
pub(super) struct BorrowedValue<'a>(IgnoredAny, #[serde(borrow)] pub(super) Str<'a>);

/// A JSON string borrowed from the body, or owned when it had escapes. (serde's own `Cow`
/// always owns unless it is a derived field marked `borrow`.)
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Str<'a>(Cow<'a, str>);

impl std::ops::Deref for Str<'_> {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Str<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct StrVisitor;
        impl<'de> serde::de::Visitor<'de> for StrVisitor {
            type Value = Str<'de>;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }

            fn visit_borrowed_str<E: serde::de::Error>(self, v: &'de str) -> Result<Str<'de>, E> {
                Ok(Str(Cow::Borrowed(v)))
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Str<'de>, E> {
                Ok(Str(Cow::Owned(v.to_string())))
            }

            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Str<'de>, E> {
                Ok(Str(Cow::Owned(v)))
            }
        }
        deserializer.deserialize_str(StrVisitor)
    }
}

/// A sample's labels in answer order (Prometheus writes them sorted by name).
#[derive(Debug, Default)]
pub(super) struct Labels<'a>(pub(super) Vec<(Str<'a>, Str<'a>)>);

impl Labels<'_> {
    pub(super) fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(label, _)| &**label == name)
            .map(|(_, value)| &**value)
    }

    /// `name{label="value",...}` for messages, in answer order.
    pub(super) fn describe(&self) -> String {
        let pairs: Vec<(&str, &str)> = self.0.iter().map(|(k, v)| (&**k, &**v)).collect();
        super::format_label_pairs(&pairs)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Labels<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct LabelsVisitor;
        impl<'de> serde::de::Visitor<'de> for LabelsVisitor {
            type Value = Labels<'de>;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a map of label names to values")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Labels<'de>, A::Error> {
                let mut labels = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some((name, value)) = map.next_entry::<Str<'de>, Str<'de>>()? {
                    labels.push((name, value));
                }
                Ok(Labels(labels))
            }
        }
        deserializer.deserialize_map(LabelsVisitor)
    }
}

/// `body` read by an [`AnswerReader`] in pieces ending at `cuts` (and at its end), answered
/// with HTTP `status`, for a test query.
#[cfg(test)]
pub(super) fn read_in_pieces<S: Samples>(
    body: &[u8],
    cuts: &[usize],
    samples: S,
    status: u16,
) -> Result<AnswerData<S>, ObservationError> {
    let mut reader = AnswerReader::new(samples);
    let mut from = 0;
    for cut in cuts.iter().copied().chain([body.len()]) {
        let cut = cut.clamp(from, body.len());
        if !reader.feed(body.get(from..cut).unwrap_or_default()) {
            break;
        }
        from = cut;
    }
    let status = reqwest::StatusCode::from_u16(status).unwrap_or(reqwest::StatusCode::OK);
    reader.finish(&tests::QUERY, status)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) const QUERY: QueryContext<'static> = QueryContext {
        address: "http://prometheus.test:9090",
        what: "test query",
        promql: "up",
    };

    /// Every sample as `labels => value`, in order.
    #[derive(Debug, Default)]
    struct Recorded(Vec<String>);

    impl Samples for Recorded {
        fn add(&mut self, sample: &[u8]) -> Result<(), serde_json::Error> {
            let sample: BorrowedSample<'_> = serde_json::from_slice(sample)?;
            let value = sample.value.map(|value| value.1.to_string());
            self.0
                .push(format!("{} => {value:?}", sample.metric.describe()));
            Ok(())
        }
    }

    /// The outcome as text: a vector's samples one per line, an error's message unescaped.
    fn outcome(body: &[u8], cuts: &[usize], status: u16) -> String {
        match read_in_pieces(body, cuts, Recorded::default(), status) {
            Ok(AnswerData::Vector(Recorded(samples))) => {
                format!("vector of {}:\n{}", samples.len(), samples.join("\n"))
            }
            Ok(other) => format!("{other:?}"),
            Err(ObservationError::Unreachable(message)) => format!("Unreachable: {message}"),
            Err(ObservationError::Malformed(message)) => format!("Malformed: {message}"),
            Err(other) => format!("{other:?}"),
        }
    }

    /// A small deterministic generator (xorshift), for cuts and mutations.
    struct Random(u64);

    impl Random {
        fn below(&mut self, bound: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % bound.max(1) as u64) as usize
        }

        fn cuts(&mut self, length: usize) -> Vec<usize> {
            let mut cuts: Vec<usize> = (0..self.below(8)).map(|_| self.below(length)).collect();
            cuts.sort_unstable();
            cuts
        }
    }

    /// Read whole, in 1-byte pieces, cut in two at every offset and at random places: always
    /// the same outcome, which is returned.
    fn same_however_cut(body: &[u8], status: u16) -> String {
        let whole = outcome(body, &[], status);
        let bytes: Vec<usize> = (1..body.len()).collect();
        assert_eq!(outcome(body, &bytes, status), whole, "1-byte pieces");
        for cut in 0..=body.len() {
            assert_eq!(outcome(body, &[cut], status), whole, "cut at {cut}");
        }
        let mut random = Random(0x9e37_79b9_7f4a_7c15 ^ body.len() as u64);
        for _ in 0..50 {
            let cuts = random.cuts(body.len());
            assert_eq!(outcome(body, &cuts, status), whole, "cut at {cuts:?}");
        }
        whole
    }

    const SAMPLES: &str = r#"[
        {"metric": {"__name__": "fledge_requests_total", "fledge_class": "2xx", "fledge_service": "app", "fledge_subset": "v1", "instance": "10.0.0.1:15090"}, "value": [1700000000.123, "1027"]},
        {"metric": {"__name__": "fledge_requests_total", "fledge_class": "5xx", "fledge_service": "app", "fledge_subset": "v1", "instance": "10.0.0.1:15090"}, "value": [1700000000.123, "3"]},
        {"metric":{"__name__":"fledge_request_duration_ms_bucket","fledge_service":"app","fledge_subset":"v2","le":"+Inf"},"value":[1700000000.123,"1e+06"]}
    ]"#;

    #[test]
    fn real_shaped_answers_read_the_same_however_cut() {
        let vector = format!(
            r#"{{"status":"success","data":{{"resultType":"vector","result":{SAMPLES}}}}}"#
        );
        let late_type = format!(
            r#"{{"status":"success","data":{{"result":{SAMPLES},"resultType":"vector"}},"warnings":["w"]}}"#
        );
        let tricky = r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{"path":"/a{b}[c]\"d\\\",","ünï":"✓ ok","esc":"\u00e9\ud83d\ude00\n","__name__":"x"},"value":[1,"NaN"]},{"metric":{"q":"]}"},"value":[1,"-Inf"]}]}}"#;
        let cases: Vec<(&str, String, u16, &[&str])> = vec![
            (
                "vector",
                vector.clone(),
                200,
                &[
                    "vector of 3:",
                    r#"fledge_requests_total{fledge_class="2xx",fledge_service="app",fledge_subset="v1",instance="10.0.0.1:15090"} => Some("1027")"#,
                    r#"fledge_request_duration_ms_bucket{fledge_service="app",fledge_subset="v2",le="+Inf"} => Some("1e+06")"#,
                ],
            ),
            ("result before its type", late_type, 200, &["vector of 3:", r#"=> Some("3")"#]),
            (
                "escapes, braces and unicode in label values",
                tricky.to_string(),
                200,
                &[
                    "vector of 2:",
                    r#"x{path="/a{b}[c]\"d\\\",",ünï="✓ ok",esc="é😀\n"} => Some("NaN")"#,
                    r#"{q="]}"} => Some("-Inf")"#,
                ],
            ),
            (
                "empty",
                r#"{"status":"success","data":{"resultType":"vector","result":[]}}"#.to_string(),
                200,
                &["vector of 0:"],
            ),
            (
                "scalar",
                r#"{"status":"success","data":{"resultType":"scalar","result":[1700000000.1,"0.5"]}}"#.to_string(),
                200,
                &[r#"Scalar(SampleValue(1700000000.1, "0.5"))"#],
            ),
            (
                "matrix, skipped",
                r#"{"status":"success","data":{"resultType":"matrix","result":[{"metric":{},"values":[[1,"1"],[2,"2"]]}]}}"#.to_string(),
                200,
                &[r#"Other("matrix")"#],
            ),
            (
                "API error",
                r#"{"status":"error","errorType":"bad_data","error":"1:8: parse error: unexpected \")\""}"#.to_string(),
                400,
                &[r#"Malformed: Prometheus http://prometheus.test:9090: test query failed: bad_data: 1:8: parse error: unexpected ")"; query: up"#],
            ),
            (
                "API timeout",
                r#"{"status":"error","errorType":"timeout","error":"query timed out","data":null}"#.to_string(),
                503,
                &["Unreachable: Prometheus http://prometheus.test:9090: test query failed: timeout: query timed out; query: up"],
            ),
            (
                "not JSON, not 2xx",
                "<html><body>502 Bad Gateway [nginx]</body></html>".to_string(),
                502,
                &["Unreachable: Prometheus http://prometheus.test:9090: test query: HTTP 502 Bad Gateway from /api/v1/query: <html><body>502 Bad Gateway [nginx]</body></html>"],
            ),
            (
                "not JSON, 2xx",
                r#"<html>login {"</html>"#.to_string(),
                200,
                &["Malformed: Prometheus http://prometheus.test:9090: test query: not a Prometheus API answer (", r#"): <html>login {"</html>; query: up"#],
            ),
            (
                "truncated",
                vector.get(..vector.len() - 40).unwrap_or_default().to_string(),
                200,
                &["Malformed", "not a Prometheus API answer (EOF while parsing"],
            ),
            (
                "no data",
                r#"{"status":"success"}"#.to_string(),
                200,
                &["Malformed", "answer has no data; query: up"],
            ),
        ];
        for (what, body, status, needles) in cases {
            let outcome = same_however_cut(body.as_bytes(), status);
            for needle in needles {
                assert!(
                    outcome.contains(needle),
                    "{what}: {needle} not in {outcome}"
                );
            }
        }
    }

    #[test]
    fn a_sample_or_a_rest_over_its_cap_is_malformed_naming_the_cap() {
        let long_value = "x".repeat(MAX_SAMPLE_BYTES);
        let body = format!(
            r#"{{"status":"success","data":{{"resultType":"vector","result":[{{"metric":{{}},"value":[1,"2"]}},{{"metric":{{"a":"{long_value}"}}}}]}}}}"#
        );
        let cut = |pieces: usize| -> Vec<usize> {
            (1..pieces).map(|n| n * body.len() / pieces).collect()
        };
        let whole = outcome(body.as_bytes(), &[], 200);
        for pieces in [2, 7, 1000] {
            assert_eq!(outcome(body.as_bytes(), &cut(pieces), 200), whole);
        }
        for needle in [
            "Malformed",
            "http://prometheus.test:9090",
            "test query",
            "sample 2 of data.result is longer than 65536 bytes",
            "query: up",
        ] {
            assert!(whole.contains(needle), "{needle} not in {whole}");
        }
        // A matrix's samples are not held, so they have no cap.
        let matrix = body.replace("\"vector\"", "\"matrix\"");
        assert_eq!(outcome(matrix.as_bytes(), &[], 200), r#"Other("matrix")"#);

        let warnings = format!(
            r#"{{"status":"success","warnings":["{}"]}}"#,
            "w".repeat(MAX_REST_BYTES)
        );
        let over = outcome(warnings.as_bytes(), &[], 200);
        assert!(
            over.contains("longer than 1048576 bytes outside the samples"),
            "{over}"
        );
        let html = "<p>".repeat(MAX_REST_BYTES);
        let over = outcome(html.as_bytes(), &[1000], 502);
        assert!(
            over.contains("Unreachable") && over.contains("HTTP 502"),
            "{over}"
        );
    }

    #[test]
    fn only_the_sample_being_read_is_held() {
        let sample = r#"{"metric":{"__name__":"fledge_requests_total","fledge_service":"app","fledge_subset":"v1","instance":"a"},"value":[1,"5"]}"#;
        let samples = vec![sample; 10_000].join(",");
        let body = format!(
            r#"{{"status":"success","data":{{"resultType":"vector","result":[{samples}]}}}}"#
        );
        let mut reader = AnswerReader::new(Recorded::default());
        for piece in body.as_bytes().chunks(16 * 1024 + 7) {
            assert!(reader.feed(piece));
            assert!(reader.splitter.carry.len() < sample.len());
            assert!(
                reader.splitter.rest.len() < 100,
                "{}",
                reader.splitter.rest.len()
            );
        }
        assert!(reader.splitter.carry.capacity() <= 2 * sample.len());
        match reader.finish(&QUERY, reqwest::StatusCode::OK) {
            Ok(AnswerData::Vector(Recorded(samples))) => assert_eq!(samples.len(), 10_000),
            other => panic!("{other:?}"),
        }
    }

    /// A stand-in for a fuzzer: mutated answers read whole and cut at random places agree,
    /// and nothing panics.
    #[test]
    fn mutated_answers_read_the_same_however_cut() {
        let body = format!(
            r#"{{"status":"success","data":{{"resultType":"vector","result":{SAMPLES}}},"warnings":["a\"b"]}}"#
        );
        let replacements = b"{}[]\":,\\ 1x";
        let mut random = Random(42);
        for _ in 0..3000 {
            let mut mutated = body.clone().into_bytes();
            for _ in 0..=random.below(3) {
                let at = random.below(mutated.len());
                let byte = replacements[random.below(replacements.len())];
                if let Some(slot) = mutated.get_mut(at) {
                    *slot = byte;
                }
            }
            let whole = outcome(&mutated, &[], 200);
            for _ in 0..3 {
                let cuts = random.cuts(mutated.len());
                assert_eq!(
                    outcome(&mutated, &cuts, 200),
                    whole,
                    "{} cut at {cuts:?}",
                    String::from_utf8_lossy(&mutated)
                );
            }
        }
    }
}
