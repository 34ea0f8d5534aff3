//! A parser for the Prometheus text exposition format (0.0.4), the format Envoy's admin
//! `/stats/prometheus` emits.
//!
//! Supported: `# TYPE` and `# HELP` lines (other `#` lines are comments), blank lines, samples
//! `name{k="v",...} value [timestamp_ms]` with optional empty braces (`envoy_server_uptime{} 7`,
//! as Envoy prints unlabelled stats), label value escapes `\\`, `\"` and `\n`, and the values
//! `+Inf`, `-Inf` and `NaN`. Lines may end in `\r\n`, and must be UTF-8.
//!
//! A text is read whole ([`parse`], [`parse_each`]) or in pieces as they arrive
//! ([`LineParser`], which both of those use): one parser, holding only an unfinished line.
//!
//! The parser must never panic whatever the input (it is fuzzed): it walks the text with
//! iterators and checked splits only, never with indexing.

use std::borrow::Cow;
use std::collections::HashMap;

/// The type a `# TYPE` line declared for a metric family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MetricType {
    Counter,
    Gauge,
    Histogram,
    Summary,
    /// No `# TYPE` line, or `# TYPE name untyped`.
    Untyped,
}

impl MetricType {
    fn from_keyword(keyword: &str) -> Option<Self> {
        match keyword {
            "counter" => Some(MetricType::Counter),
            "gauge" => Some(MetricType::Gauge),
            "histogram" => Some(MetricType::Histogram),
            "summary" => Some(MetricType::Summary),
            "untyped" => Some(MetricType::Untyped),
            _ => None,
        }
    }
}

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The sample's own name, e.g. `fledge_request_duration_ms_bucket`.
    pub name: String,
    /// Labels in the order they appeared; label names are unique within a sample.
    pub labels: Vec<(String, String)>,
    pub value: f64,
    pub timestamp_ms: Option<i64>,
    /// The type of the sample's family: for `x_bucket`, `x_sum` and `x_count` that is the type
    /// declared for `x` when `x` is a histogram or summary.
    pub metric_type: MetricType,
}

impl Sample {
    /// The value of label `key`, if the sample has it.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(name, _)| name == key)
            .map(|(_, value)| value.as_str())
    }
}

/// One sample line borrowed from the text: a label value is copied only when it has escapes.
/// [`LineParser`] reuses one for every line of a piece, so reading a page allocates almost
/// nothing.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SampleRef<'a> {
    pub name: &'a str,
    /// Labels in the order they appeared; label names are unique within a sample.
    pub labels: Vec<(&'a str, Cow<'a, str>)>,
    pub value: f64,
    pub timestamp_ms: Option<i64>,
}

impl SampleRef<'_> {
    /// The value of label `key`, if the sample has it.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(name, _)| *name == key)
            .map(|(_, value)| value.as_ref())
    }

    fn to_owned_sample(&self) -> Sample {
        Sample {
            name: self.name.to_string(),
            labels: self
                .labels
                .iter()
                .map(|(name, value)| (name.to_string(), value.to_string()))
                .collect(),
            value: self.value,
            timestamp_ms: self.timestamp_ms,
            metric_type: MetricType::Untyped,
        }
    }
}

/// Why a text could not be parsed, and on which line (1-based).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {problem}")]
pub struct ParseError {
    pub line: usize,
    pub problem: String,
}

/// The longest line [`LineParser`] accepts, in bytes without its `\n`. Envoy's lines are a few
/// hundred bytes; a longer one means a broken page, and holding it whole is what streaming
/// avoids.
pub const MAX_LINE_BYTES: usize = 64 * 1024;

/// Parse a whole exposition. Fails on the first malformed line.
pub fn parse(text: &str) -> Result<Vec<Sample>, ParseError> {
    let mut samples = Vec::new();
    let mut parser = LineParser::new();
    let mut keep = |sample: &SampleRef<'_>| samples.push(sample.to_owned_sample());
    parser.feed(text.as_bytes(), &mut keep)?;
    let declared_types = parser.finish_declared(&mut keep)?;
    for sample in &mut samples {
        sample.metric_type = family_type(&sample.name, &declared_types);
    }
    Ok(samples)
}

/// Call `each` with every sample of `text`, in order, without collecting them. Fails on the
/// first malformed line (`each` has then seen the samples before it).
pub fn parse_each(text: &str, mut each: impl FnMut(&SampleRef<'_>)) -> Result<(), ParseError> {
    let mut parser = LineParser::new();
    parser.feed(text.as_bytes(), &mut each)?;
    parser.finish(each)
}

/// An exposition parsed as it arrives, in pieces of any size (a response body's chunks): only
/// the unfinished last line is kept between pieces, so a page is never held whole. `# TYPE`
/// declarations and line numbers carry across pieces: however a text is cut, the same samples
/// reach `each` and the same error names the same line. Lines are UTF-8 (a line that is not
/// is an error); a piece may end anywhere, even inside a character. After an error, stop.
#[derive(Debug)]
pub struct LineParser {
    declared_types: HashMap<String, MetricType>,
    /// Lines whose `\n` was seen.
    lines_ended: usize,
    /// The last line's bytes so far.
    unfinished: Vec<u8>,
    max_line_bytes: usize,
}

impl Default for LineParser {
    fn default() -> Self {
        Self::with_max_line_bytes(MAX_LINE_BYTES)
    }
}

impl LineParser {
    /// A parser for lines of up to [`MAX_LINE_BYTES`].
    pub fn new() -> Self {
        Self::default()
    }

    /// A parser for lines of up to `max_line_bytes` (without the `\n`).
    pub fn with_max_line_bytes(max_line_bytes: usize) -> Self {
        LineParser {
            declared_types: HashMap::new(),
            lines_ended: 0,
            unfinished: Vec::new(),
            max_line_bytes,
        }
    }

    /// Parse every line `piece` ends, giving their samples to `each`; keep the rest for the
    /// next piece (or [`LineParser::finish`]).
    pub fn feed(
        &mut self,
        piece: &[u8],
        mut each: impl FnMut(&SampleRef<'_>),
    ) -> Result<(), ParseError> {
        let mut rest = piece;
        if !self.unfinished.is_empty() {
            let Some((head, tail)) = split_at_newline(rest) else {
                return self.keep_unfinished(rest);
            };
            self.check_length(self.unfinished.len() + head.len())?;
            self.unfinished.extend_from_slice(head);
            // Taken out for the call (samples borrow it), then given back for its capacity.
            let line = std::mem::take(&mut self.unfinished);
            let outcome = self.end_line(&line, &mut SampleRef::default(), &mut each);
            self.unfinished = line;
            self.unfinished.clear();
            outcome?;
            rest = tail;
        }
        // One sample for all of the piece's lines: its label list is allocated once.
        let mut sample = SampleRef::default();
        while let Some((line, tail)) = split_at_newline(rest) {
            self.end_line(line, &mut sample, &mut each)?;
            rest = tail;
        }
        self.keep_unfinished(rest)
    }

    /// The end of the text: parse its last line if it had no `\n`.
    pub fn finish(self, each: impl FnMut(&SampleRef<'_>)) -> Result<(), ParseError> {
        self.finish_declared(each).map(|_| ())
    }

    /// [`LineParser::finish`], returning the `# TYPE` declarations.
    fn finish_declared(
        mut self,
        mut each: impl FnMut(&SampleRef<'_>),
    ) -> Result<HashMap<String, MetricType>, ParseError> {
        if !self.unfinished.is_empty() {
            let line = std::mem::take(&mut self.unfinished);
            self.end_line(&line, &mut SampleRef::default(), &mut each)?;
        }
        Ok(self.declared_types)
    }

    fn keep_unfinished(&mut self, rest: &[u8]) -> Result<(), ParseError> {
        self.check_length(self.unfinished.len() + rest.len())?;
        self.unfinished.extend_from_slice(rest);
        Ok(())
    }

    /// The line being read, `length` bytes long so far, is not too long.
    fn check_length(&self, length: usize) -> Result<(), ParseError> {
        if length <= self.max_line_bytes {
            return Ok(());
        }
        Err(ParseError {
            line: self.lines_ended + 1,
            problem: format!(
                "line longer than {} bytes (Envoy's lines are far shorter: a broken page?)",
                self.max_line_bytes
            ),
        })
    }

    /// One whole line (without its `\n`): a sample goes to `each`, a `# TYPE` is recorded.
    fn end_line<'a>(
        &mut self,
        raw_line: &'a [u8],
        sample: &mut SampleRef<'a>,
        each: &mut impl FnMut(&SampleRef<'_>),
    ) -> Result<(), ParseError> {
        self.check_length(raw_line.len())?;
        self.lines_ended += 1;
        let line_number = self.lines_ended;
        let error = |problem: String| ParseError {
            line: line_number,
            problem,
        };
        let text = std::str::from_utf8(raw_line).map_err(|utf8| {
            error(format!(
                "invalid UTF-8 at byte {} of the line",
                utf8.valid_up_to() + 1
            ))
        })?;
        let line = text.strip_suffix('\r').unwrap_or(text);
        let mut cursor = Cursor::new(line);
        cursor.skip_blanks();
        if cursor.is_at_end() {
            return Ok(());
        }
        let outcome = if cursor.eat('#') {
            parse_comment(cursor, &mut self.declared_types)
        } else {
            parse_sample(cursor, sample).map(|()| each(sample))
        };
        outcome.map_err(error)
    }
}

/// The bytes before the first `\n` and those after it, if there is one.
fn split_at_newline(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let newline = bytes.iter().position(|byte| *byte == b'\n')?;
    let (line, rest) = bytes.split_at_checked(newline)?;
    Some((line, rest.get(1..).unwrap_or_default()))
}

/// The declared type of the family `sample_name` belongs to.
fn family_type(sample_name: &str, declared: &HashMap<String, MetricType>) -> MetricType {
    if let Some(declared_type) = declared.get(sample_name) {
        return *declared_type;
    }
    for suffix in ["_bucket", "_sum", "_count"] {
        let family = sample_name
            .strip_suffix(suffix)
            .and_then(|base| declared.get(base));
        match family {
            Some(MetricType::Histogram) if suffix == "_bucket" => return MetricType::Histogram,
            Some(t @ (MetricType::Histogram | MetricType::Summary)) if suffix != "_bucket" => {
                return *t
            }
            _ => {}
        }
    }
    MetricType::Untyped
}

/// A `#` line: `# TYPE name type`, `# HELP name text`, or a free comment.
fn parse_comment(
    mut cursor: Cursor<'_>,
    declared_types: &mut HashMap<String, MetricType>,
) -> Result<(), String> {
    cursor.skip_blanks();
    match cursor.take_token() {
        "TYPE" => {
            let name = expect_metric_name_after_blank(&mut cursor, "# TYPE")?;
            if !cursor.skip_blanks() {
                return Err(format!(
                    "expected a type after `# TYPE {name}`, found {}",
                    cursor.describe_next()
                ));
            }
            let keyword = cursor.take_token();
            let metric_type = MetricType::from_keyword(keyword).ok_or_else(|| {
                format!(
                    "unknown metric type {keyword:?} for {name} \
                     (expected counter, gauge, histogram, summary or untyped)"
                )
            })?;
            cursor.skip_blanks();
            if !cursor.is_at_end() {
                return Err(format!(
                    "unexpected text after `# TYPE {name} {keyword}`: {}",
                    cursor.describe_next()
                ));
            }
            match declared_types.insert(name.to_string(), metric_type) {
                Some(previous) if previous != metric_type => Err(format!(
                    "{name} declared as {previous:?} and again as {metric_type:?}"
                )),
                _ => Ok(()),
            }
        }
        "HELP" => {
            // The docstring is free text; only the name is checked.
            expect_metric_name_after_blank(&mut cursor, "# HELP").map(|_| ())
        }
        _ => Ok(()),
    }
}

fn expect_metric_name_after_blank<'a>(
    cursor: &mut Cursor<'a>,
    keyword: &str,
) -> Result<&'a str, String> {
    if !cursor.skip_blanks() {
        return Err(format!(
            "expected a metric name after `{keyword}`, found {}",
            cursor.describe_next()
        ));
    }
    take_metric_name(cursor)
}

/// One sample line into `sample` (its previous contents are replaced).
fn parse_sample<'a>(mut cursor: Cursor<'a>, sample: &mut SampleRef<'a>) -> Result<(), String> {
    let name = take_metric_name(&mut cursor)?;
    sample.name = name;
    sample.labels.clear();
    cursor.skip_blanks();
    if cursor.eat('{') {
        parse_labels(&mut cursor, &mut sample.labels)?;
    }
    cursor.skip_blanks();
    let value_text = cursor.take_token();
    if value_text.is_empty() {
        return Err(format!(
            "expected a value for {name}, found {}",
            cursor.describe_next()
        ));
    }
    sample.value = parse_value(value_text).ok_or_else(|| {
        format!("invalid value {value_text:?} for {name} (expected a number, +Inf, -Inf or NaN)")
    })?;
    cursor.skip_blanks();
    sample.timestamp_ms = if cursor.is_at_end() {
        None
    } else {
        let timestamp_text = cursor.take_token();
        let timestamp = timestamp_text.parse::<i64>().map_err(|_| {
            format!(
                "invalid timestamp {timestamp_text:?} for {name} (expected integer milliseconds)"
            )
        })?;
        Some(timestamp)
    };
    cursor.skip_blanks();
    if !cursor.is_at_end() {
        return Err(format!(
            "unexpected text after the sample of {name}: {}",
            cursor.describe_next()
        ));
    }
    Ok(())
}

/// Labels after the opening `{`, up to and including the closing `}`, into `labels`. A
/// trailing comma is allowed, as in Prometheus' own parser.
fn parse_labels<'a>(
    cursor: &mut Cursor<'a>,
    labels: &mut Vec<(&'a str, Cow<'a, str>)>,
) -> Result<(), String> {
    loop {
        cursor.skip_blanks();
        if cursor.eat('}') {
            return Ok(());
        }
        let label_name = cursor.take_while(is_label_name_char);
        if !is_valid_name_start(label_name, false) {
            return Err(format!(
                "expected a label name or `}}`, found {}",
                describe_token_or_next(label_name, cursor)
            ));
        }
        cursor.skip_blanks();
        if !cursor.eat('=') {
            return Err(format!(
                "expected `=` after label name {label_name}, found {}",
                cursor.describe_next()
            ));
        }
        cursor.skip_blanks();
        if !cursor.eat('"') {
            return Err(format!(
                "expected `\"` to open the value of label {label_name}, found {}",
                cursor.describe_next()
            ));
        }
        let label_value = parse_label_value(cursor, label_name)?;
        if labels.iter().any(|(existing, _)| *existing == label_name) {
            return Err(format!("label {label_name} appears twice"));
        }
        labels.push((label_name, label_value));
        cursor.skip_blanks();
        if cursor.eat(',') {
            continue;
        }
        if cursor.eat('}') {
            return Ok(());
        }
        return Err(format!(
            "expected `,` or `}}` after the value of label {label_name}, found {}",
            cursor.describe_next()
        ));
    }
}

/// A label value after its opening quote, up to and including the closing quote: borrowed
/// from the line unless it has escapes.
fn parse_label_value<'a>(
    cursor: &mut Cursor<'a>,
    label_name: &str,
) -> Result<Cow<'a, str>, String> {
    let plain = cursor.take_while(|c| c != '"' && c != '\\');
    if cursor.eat('"') {
        return Ok(Cow::Borrowed(plain));
    }
    let mut value = plain.to_string();
    loop {
        match cursor.bump() {
            None => return Err(format!("unterminated value of label {label_name}")),
            Some('"') => return Ok(Cow::Owned(value)),
            Some('\\') => match cursor.bump() {
                Some('\\') => value.push('\\'),
                Some('"') => value.push('"'),
                Some('n') => value.push('\n'),
                Some(other) => {
                    return Err(format!(
                        "invalid escape `\\{}` in the value of label {label_name} \
                         (only \\\\, \\\" and \\n are allowed)",
                        other.escape_debug()
                    ))
                }
                None => return Err(format!("unterminated value of label {label_name}")),
            },
            Some(other) => value.push(other),
        }
    }
}

/// Go's `ParseFloat` spellings that matter here: decimals, exponents, `+Inf`, `-Inf`, `NaN`
/// (Rust's parser accepts these case-insensitively, as Go's does).
fn parse_value(text: &str) -> Option<f64> {
    text.parse::<f64>().ok()
}

fn take_metric_name<'a>(cursor: &mut Cursor<'a>) -> Result<&'a str, String> {
    let name = cursor.take_while(is_metric_name_char);
    if is_valid_name_start(name, true) {
        Ok(name)
    } else {
        Err(format!(
            "expected a metric name, found {}",
            describe_token_or_next(name, cursor)
        ))
    }
}

fn is_metric_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

fn is_label_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Names are non-empty and do not start with a digit (nor, for label names, with `:`).
fn is_valid_name_start(name: &str, colon_allowed: bool) -> bool {
    match name.chars().next() {
        Some(first) => {
            first.is_ascii_alphabetic() || first == '_' || (colon_allowed && first == ':')
        }
        None => false,
    }
}

fn describe_token_or_next(token: &str, cursor: &Cursor<'_>) -> String {
    if token.is_empty() {
        cursor.describe_next()
    } else {
        format!("{token:?}")
    }
}

/// A read position in one line. Every operation is total: no indexing, no panics.
struct Cursor<'a> {
    rest: &'a str,
}

impl<'a> Cursor<'a> {
    fn new(line: &'a str) -> Self {
        Cursor { rest: line }
    }

    fn is_at_end(&self) -> bool {
        self.rest.is_empty()
    }

    fn bump(&mut self) -> Option<char> {
        let mut chars = self.rest.chars();
        let next = chars.next()?;
        self.rest = chars.as_str();
        Some(next)
    }

    fn eat(&mut self, expected: char) -> bool {
        match self.rest.strip_prefix(expected) {
            Some(rest) => {
                self.rest = rest;
                true
            }
            None => false,
        }
    }

    /// Skip spaces and tabs; whether any were skipped.
    fn skip_blanks(&mut self) -> bool {
        let before = self.rest.len();
        self.rest = self.rest.trim_start_matches([' ', '\t']);
        self.rest.len() != before
    }

    fn take_while(&mut self, keep: impl Fn(char) -> bool) -> &'a str {
        let end = self
            .rest
            .char_indices()
            .find(|(_, c)| !keep(*c))
            .map_or(self.rest.len(), |(position, _)| position);
        match self.rest.split_at_checked(end) {
            Some((taken, rest)) => {
                self.rest = rest;
                taken
            }
            None => "",
        }
    }

    /// Everything up to the next space or tab.
    fn take_token(&mut self) -> &'a str {
        self.take_while(|c| c != ' ' && c != '\t')
    }

    fn describe_next(&self) -> String {
        match self.rest.chars().next() {
            None => "end of line".to_string(),
            Some(c) => format!("`{}`", c.escape_debug()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parses_envoy_style_exposition() {
        let text = "\
# TYPE fledge_requests_total counter
fledge_requests_total{fledge_service=\"app\",fledge_subset=\"canary\",fledge_class=\"5xx\"} 3

# TYPE envoy_server_uptime gauge
envoy_server_uptime{} 150
# HELP fledge_request_duration_ms Request duration.
# TYPE fledge_request_duration_ms histogram
fledge_request_duration_ms_bucket{fledge_service=\"app\",fledge_subset=\"canary\",le=\"0.5\"} 0
fledge_request_duration_ms_bucket{fledge_service=\"app\",fledge_subset=\"canary\",le=\"+Inf\"} 4
fledge_request_duration_ms_sum{fledge_service=\"app\",fledge_subset=\"canary\"} 12.5
fledge_request_duration_ms_count{fledge_service=\"app\",fledge_subset=\"canary\"} 4
";
        let samples = parse(text).unwrap();
        assert_eq!(samples.len(), 6);
        assert_eq!(samples[0].name, "fledge_requests_total");
        assert_eq!(
            samples[0].labels,
            labels(&[
                ("fledge_service", "app"),
                ("fledge_subset", "canary"),
                ("fledge_class", "5xx")
            ])
        );
        assert_eq!(samples[0].value, 3.0);
        assert_eq!(samples[0].metric_type, MetricType::Counter);
        assert_eq!(samples[1].labels, vec![]);
        assert_eq!(samples[1].metric_type, MetricType::Gauge);
        assert_eq!(samples[3].label("le"), Some("+Inf"));
        assert_eq!(samples[3].metric_type, MetricType::Histogram);
        assert_eq!(samples[4].value, 12.5);
        assert_eq!(samples[4].metric_type, MetricType::Histogram);
        assert_eq!(samples[5].metric_type, MetricType::Histogram);
    }

    #[test]
    fn sample_forms() {
        /// (what, line, labels, value, timestamp)
        type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)], f64, Option<i64>);
        let cases: &[Case] = &[
            ("plain", "a 1", &[], 1.0, None),
            (
                "timestamp",
                "a 1 1700000000000",
                &[],
                1.0,
                Some(1_700_000_000_000),
            ),
            ("negative timestamp", "a 1 -5", &[], 1.0, Some(-5)),
            ("empty braces", "a{} 2", &[], 2.0, None),
            (
                "no space before value",
                "a{x=\"1\"}2",
                &[("x", "1")],
                2.0,
                None,
            ),
            ("trailing comma", "a{x=\"1\",} 2", &[("x", "1")], 2.0, None),
            (
                "blanks inside braces",
                "a{ x = \"1\" , y=\"2\" } 2",
                &[("x", "1"), ("y", "2")],
                2.0,
                None,
            ),
            ("tabs", "a\t{x=\"1\"}\t3\t", &[("x", "1")], 3.0, None),
            ("leading blanks", "   a 4", &[], 4.0, None),
            ("crlf", "a 5\r", &[], 5.0, None),
            ("colon in name", "a:b_c 6", &[], 6.0, None),
            ("exponent", "a 1.5e3", &[], 1500.0, None),
            ("plus inf", "a +Inf", &[], f64::INFINITY, None),
            ("minus inf", "a -Inf", &[], f64::NEG_INFINITY, None),
            (
                "escaped quote",
                r#"a{x="say \"hi\""} 1"#,
                &[("x", "say \"hi\"")],
                1.0,
                None,
            ),
            (
                "escaped backslash",
                r#"a{x="C:\\dir"} 1"#,
                &[("x", "C:\\dir")],
                1.0,
                None,
            ),
            (
                "escaped newline",
                r#"a{x="one\ntwo"} 1"#,
                &[("x", "one\ntwo")],
                1.0,
                None,
            ),
            (
                "unicode value",
                "a{x=\"héllo ✓\"} 1",
                &[("x", "héllo ✓")],
                1.0,
                None,
            ),
            (
                "comma and brace in value",
                "a{x=\"a,b}c\"} 1",
                &[("x", "a,b}c")],
                1.0,
                None,
            ),
        ];
        for (what, line, want_labels, want_value, want_ts) in cases {
            let samples = parse(line).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(samples.len(), 1, "{what}");
            let sample = &samples[0];
            assert_eq!(sample.labels, labels(want_labels), "{what}");
            assert_eq!(sample.value, *want_value, "{what}");
            assert_eq!(sample.timestamp_ms, *want_ts, "{what}");
        }
    }

    #[test]
    fn nan_value() {
        let samples = parse("a NaN").unwrap();
        assert!(samples[0].value.is_nan());
    }

    #[test]
    fn comments_and_blank_lines_are_skipped() {
        let text = "\n\n# just a comment\n#\n   \n# HELP a Some \\n help \"text\"\na 1\n\n";
        let samples = parse(text).unwrap();
        assert_eq!(samples.len(), 1);
        assert_eq!(parse("").unwrap(), vec![]);
    }

    #[test]
    fn summary_and_untyped_families() {
        let text = "# TYPE s summary\ns{quantile=\"0.5\"} 1\ns_sum 2\ns_count 3\ns_bucket 4\nu 5\n";
        let types: Vec<_> = parse(text)
            .unwrap()
            .into_iter()
            .map(|s| s.metric_type)
            .collect();
        assert_eq!(
            types,
            vec![
                MetricType::Summary,
                MetricType::Summary,
                MetricType::Summary,
                MetricType::Untyped,
                MetricType::Untyped
            ]
        );
    }

    #[test]
    fn errors_name_the_line_and_the_problem() {
        let cases: &[(&str, usize, &str)] = &[
            ("a 1\nb", 2, "expected a value for b"),
            ("a 1\n\n9abc 1", 3, "expected a metric name"),
            ("{x=\"1\"} 1", 1, "expected a metric name"),
            ("a{x=\"1\" 1", 1, "expected `,` or `}`"),
            ("a{x=\"1", 1, "unterminated value of label x"),
            ("a{x=\"1\\", 1, "unterminated value of label x"),
            ("a{x=1} 1", 1, "expected `\"` to open the value of label x"),
            ("a{x} 1", 1, "expected `=` after label name x"),
            ("a{9x=\"1\"} 1", 1, "expected a label name"),
            ("a{x=\"\\t\"} 1", 1, "invalid escape `\\t`"),
            ("a{x=\"1\",x=\"2\"} 1", 1, "label x appears twice"),
            ("a one", 1, "invalid value \"one\""),
            ("a 1 soon", 1, "invalid timestamp \"soon\""),
            ("a 1 2 3", 1, "unexpected text after the sample of a"),
            ("# TYPE a countr", 1, "unknown metric type \"countr\""),
            ("# TYPE a", 1, "expected a type after `# TYPE a`"),
            ("# TYPE", 1, "expected a metric name after `# TYPE`"),
            (
                "# TYPE a counter extra",
                1,
                "unexpected text after `# TYPE a counter`",
            ),
            (
                "# TYPE a counter\n# TYPE a gauge",
                2,
                "declared as Counter and again as Gauge",
            ),
            ("# HELP 1a x", 1, "expected a metric name"),
            ("a{x=\"1\"}} 1", 1, "invalid value \"}\""),
        ];
        for (text, line, fragment) in cases {
            let error = parse(text).expect_err(text);
            assert_eq!(error.line, *line, "{text:?}: {error}");
            assert!(
                error.problem.contains(fragment),
                "{text:?}: {error} should mention {fragment:?}"
            );
        }
    }

    #[test]
    fn repeated_identical_type_lines_are_accepted() {
        assert_eq!(
            parse("# TYPE a counter\n# TYPE a counter\na 1")
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn parse_each_borrows_plain_values_and_matches_parse() {
        let text = "# TYPE m counter\nm{a=\"plain\",b=\"x\\\"y\",c=\"\"} 1 5\nn 2\nm{a=\"é✓\"} 3\n";
        let owned = parse(text).unwrap();
        let mut seen = Vec::new();
        parse_each(text, |sample| {
            let borrowed: Vec<bool> = sample
                .labels
                .iter()
                .map(|(_, value)| matches!(value, Cow::Borrowed(_)))
                .collect();
            seen.push((sample.to_owned_sample(), borrowed));
        })
        .unwrap();
        assert_eq!(seen.len(), owned.len());
        for ((sample, _), expected) in seen.iter().zip(&owned) {
            assert_eq!(
                (
                    &sample.name,
                    &sample.labels,
                    sample.value,
                    sample.timestamp_ms
                ),
                (
                    &expected.name,
                    &expected.labels,
                    expected.value,
                    expected.timestamp_ms
                )
            );
        }
        // Only the value with an escape is copied.
        assert_eq!(seen[0].1, [true, false, true]);
        assert_eq!(seen[0].0.labels[1].1, "x\"y");
        assert_eq!(
            seen[1].0.labels,
            labels(&[]),
            "a reused sample starts without labels"
        );
        assert_eq!(seen[2].1, [true]);
        // An error stops at its line; the samples before it were seen.
        let mut names = Vec::new();
        let error = parse_each("a 1\nb{x=\"\\t\"} 2\nc 3\n", |s| {
            names.push(s.name.to_string())
        })
        .unwrap_err();
        assert_eq!((error.line, names), (2, vec!["a".to_string()]));
    }

    /// What feeding `pieces` to a parser with lines of at most `max_line` bytes gives: every
    /// sample (owned) and the outcome.
    fn fed(pieces: &[&[u8]], max_line: usize) -> (Vec<Sample>, Result<(), ParseError>) {
        let mut samples = Vec::new();
        let mut keep = |sample: &SampleRef<'_>| samples.push(sample.to_owned_sample());
        let mut parser = LineParser::with_max_line_bytes(max_line);
        let mut outcome = Ok(());
        for piece in pieces {
            outcome = parser.feed(piece, &mut keep);
            if outcome.is_err() {
                break;
            }
        }
        if outcome.is_ok() {
            outcome = parser.finish(&mut keep);
        }
        (samples, outcome)
    }

    /// A page gives the same samples and the same error however it is cut: whole, line by
    /// line, in two pieces at every byte offset, and byte by byte.
    #[test]
    fn a_page_cut_anywhere_parses_the_same() {
        const MAX_LINE: usize = 40;
        let long_line = format!("a{{x=\"{}\"}} 1\n", "y".repeat(MAX_LINE));
        /// (what, page, the samples' names, the error's line and words)
        type Case<'a> = (&'a str, Vec<u8>, &'a [&'a str], Option<(usize, &'a str)>);
        let cases: Vec<Case> = vec![
            (
                "types, crlf, multi-byte values, a last line without \\n",
                "# TYPE m counter\r\nm{x=\"é✓\"} 1\r\n\n# TYPE m counter\nn{y=\"ü\\\"\"} 2\nm 3"
                    .into(),
                &["m", "n", "m"],
                None,
            ),
            ("empty", Vec::new(), &[], None),
            ("only newlines", b"\n\r\n\n".to_vec(), &[], None),
            (
                "an error after samples",
                "a 1\nb{x=\"✓\"} 2\nc{x=\"\\t\"} 3\nd 4\n".into(),
                &["a", "b"],
                Some((3, "invalid escape")),
            ),
            (
                "a type declared twice, across lines",
                b"# TYPE a counter\na 1\n# TYPE a gauge\n".to_vec(),
                &["a"],
                Some((3, "declared as Counter and again as Gauge")),
            ),
            (
                "invalid UTF-8",
                [b"a 1\nb{x=\"".as_slice(), &[0xC3, 0x28], b"\"} 2\nc 3\n"].concat(),
                &["a"],
                Some((2, "invalid UTF-8 at byte 6")),
            ),
            (
                "a character cut short at the end",
                [b"a 1\nb{x=\"\xE2\x9C\"} 2".as_slice()].concat(),
                &["a"],
                Some((2, "invalid UTF-8")),
            ),
            (
                "an over-long line",
                format!("a 1\n{long_line}b 2\n").into(),
                &["a"],
                Some((2, "line longer than 40 bytes")),
            ),
            (
                "an over-long last line without \\n",
                format!("a 1\n{}", long_line.trim_end()).into(),
                &["a"],
                Some((2, "line longer than 40 bytes")),
            ),
            (
                "a line of exactly the limit",
                format!("a{{x=\"{}\"}} 1\n", "y".repeat(MAX_LINE - 9)).into(),
                &["a"],
                None,
            ),
        ];
        for (what, page, want_names, want_error) in &cases {
            let whole = fed(&[page], MAX_LINE);
            let names: Vec<&str> = whole.0.iter().map(|s| s.name.as_str()).collect();
            assert_eq!(names, *want_names, "{what}");
            match (&whole.1, want_error) {
                (Ok(()), None) => {}
                (Err(error), Some((line, words))) => {
                    assert_eq!(error.line, *line, "{what}: {error}");
                    assert!(error.problem.contains(words), "{what}: {error}");
                }
                (got, want) => panic!("{what}: got {got:?}, want an error {want:?}"),
            }
            let by_line: Vec<&[u8]> = page.split_inclusive(|b| *b == b'\n').collect();
            assert_eq!(fed(&by_line, MAX_LINE), whole, "{what}: line by line");
            let by_byte: Vec<&[u8]> = page.chunks(1).collect();
            assert_eq!(fed(&by_byte, MAX_LINE), whole, "{what}: byte by byte");
            for cut in 0..=page.len() {
                let (head, tail) = page.split_at(cut);
                assert_eq!(fed(&[head, tail], MAX_LINE), whole, "{what}: cut at {cut}");
            }
        }
    }

    /// A line that never ends is refused as soon as it passes the limit, not held until the
    /// page ends.
    #[test]
    fn an_endless_line_is_refused_as_it_grows() {
        let mut parser = LineParser::with_max_line_bytes(10);
        assert_eq!(parser.feed(b"a 1\nb{x=", |_| {}), Ok(()));
        assert_eq!(parser.feed(b"\"yyyyy", |_| {}), Ok(()));
        let error = parser
            .feed(b"y", |_| {})
            .expect_err("the 11th byte of line 2");
        assert_eq!(error.line, 2, "{error}");
        assert!(error.problem.contains("longer than 10 bytes"), "{error}");
    }

    #[test]
    fn parse_each_and_parse_take_lines_up_to_the_limit() {
        let line = |length: usize| format!("a{{x=\"{}\"}} 1", "y".repeat(length - 9));
        assert_eq!(line(MAX_LINE_BYTES).len(), MAX_LINE_BYTES);
        assert_eq!(parse(&line(MAX_LINE_BYTES)).map(|s| s.len()), Ok(1));
        let error = parse_each(&format!("a 1\n{}", line(MAX_LINE_BYTES + 1)), |_| {})
            .expect_err("a line over the limit");
        assert_eq!(error.line, 2, "{error}");
    }

    #[test]
    fn never_panics_on_random_input() {
        let alphabet: Vec<char> = "a_:{}=\",\\ \t\n\r#TYPEHELPcounter+-.eInfNaN019é✓\0"
            .chars()
            .collect();
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..5_000 {
            let mut text = String::new();
            for _ in 0..(state % 64) {
                // xorshift64: deterministic, no dependency.
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let pick = usize::try_from(state % alphabet.len() as u64).unwrap();
                text.push(alphabet[pick]);
            }
            let _ = parse(&text);
            state = state.wrapping_add(1);
        }
    }

    /// A cheap stand-in for the fuzzer: every prefix and many mutations of a realistic text
    /// must parse or fail, never panic.
    #[test]
    fn never_panics_on_truncated_or_mutated_input() {
        let text = "# TYPE m histogram\nm_bucket{a=\"x\\\"y\\\\z\\n\",le=\"+Inf\"} 1 17\nm_sum{} 2.5\n# HELP m ✓ multi-byte\nm_count 1\n";
        let bytes = text.as_bytes();
        for end in 0..=bytes.len() {
            let prefix = String::from_utf8_lossy(&bytes[..end]);
            let _ = parse(&prefix);
        }
        let replacements = [
            '{', '}', '"', '\\', '=', ',', ' ', '\n', '#', 'é', '\0', '\r',
        ];
        for position in 0..bytes.len() {
            for replacement in replacements {
                let mutated: String = text
                    .chars()
                    .enumerate()
                    .map(|(i, c)| if i == position { replacement } else { c })
                    .collect();
                let _ = parse(&mutated);
            }
        }
    }
}
