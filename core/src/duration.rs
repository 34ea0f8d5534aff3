//! Human-readable durations for specs: `500ms`, `30s`, `2m`, `1h`, `1m30s`.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;

/// A duration written as a string like `30s` in a spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct HumanDuration(pub std::time::Duration);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {input:?}: {problem}; write a number with a unit, e.g. \"500ms\", \"30s\", \"2m\", \"1h\" or \"1m30s\"")]
pub struct DurationError {
    pub input: String,
    pub problem: &'static str,
}

impl HumanDuration {
    pub const fn from_secs(secs: u64) -> Self {
        HumanDuration(std::time::Duration::from_secs(secs))
    }

    pub const fn from_millis(ms: u64) -> Self {
        HumanDuration(std::time::Duration::from_millis(ms))
    }

    pub fn as_millis(&self) -> u64 {
        u64::try_from(self.0.as_millis()).unwrap_or(u64::MAX)
    }

    /// As a chrono duration, for arithmetic on timestamps.
    pub fn to_chrono(self) -> chrono::Duration {
        chrono::Duration::milliseconds(i64::try_from(self.as_millis()).unwrap_or(i64::MAX))
    }
}

impl FromStr for HumanDuration {
    type Err = DurationError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let err = |problem| DurationError {
            input: input.to_string(),
            problem,
        };
        let s = input.trim();
        if s.is_empty() {
            return Err(err("it is empty"));
        }
        let mut total_ms: u64 = 0;
        let mut rest = s;
        while !rest.is_empty() {
            let digits = rest
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len());
            if digits == 0 {
                return Err(err("expected a number"));
            }
            let value: u64 = rest[..digits]
                .parse()
                .map_err(|_| err("number too large"))?;
            rest = &rest[digits..];
            let unit_len = rest
                .find(|c: char| c.is_ascii_digit())
                .unwrap_or(rest.len());
            let unit_ms = match &rest[..unit_len] {
                "ms" => 1,
                "s" => 1_000,
                "m" => 60_000,
                "h" => 3_600_000,
                "" => return Err(err("missing unit")),
                _ => return Err(err("unknown unit (use ms, s, m or h)")),
            };
            rest = &rest[unit_len..];
            total_ms = value
                .checked_mul(unit_ms)
                .and_then(|ms| total_ms.checked_add(ms))
                .ok_or_else(|| err("duration too large"))?;
        }
        Ok(HumanDuration::from_millis(total_ms))
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.as_millis();
        if ms == 0 {
            return f.write_str("0s");
        }
        if !ms.is_multiple_of(1000) {
            return write!(f, "{ms}ms");
        }
        let mut secs = ms / 1000;
        let hours = secs / 3600;
        secs %= 3600;
        let minutes = secs / 60;
        secs %= 60;
        if hours > 0 {
            write!(f, "{hours}h")?;
        }
        if minutes > 0 {
            write!(f, "{minutes}m")?;
        }
        if secs > 0 {
            write!(f, "{secs}s")?;
        }
        Ok(())
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// In a JSON Schema (the Kubernetes CRD) a duration is a string such as `30s`.
#[cfg(feature = "schema")]
impl schemars::JsonSchema for HumanDuration {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "HumanDuration".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "A duration: a number with a unit (ms, s, m, h), e.g. \"500ms\", \"30s\", \"1m30s\".",
            "pattern": "^\\s*([0-9]+(ms|s|m|h))+\\s*$"
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_compounds() {
        let cases = [
            ("500ms", 500),
            ("30s", 30_000),
            ("2m", 120_000),
            ("1h", 3_600_000),
            ("1m30s", 90_000),
            (" 10s ", 10_000),
            ("0s", 0),
        ];
        for (input, ms) in cases {
            assert_eq!(
                input.parse::<HumanDuration>().unwrap().as_millis(),
                ms,
                "{input}"
            );
        }
    }

    #[test]
    fn rejects_with_a_fix() {
        for input in ["", "10", "s", "10x", "1.5s", "-3s", "99999999999999999999s"] {
            let err = input.parse::<HumanDuration>().unwrap_err();
            assert!(err.to_string().contains("e.g. \"500ms\""), "{err}");
        }
    }

    #[test]
    fn display_round_trips() {
        for input in ["500ms", "30s", "2m", "1h", "1m30s", "1h2m3s", "0s"] {
            let d: HumanDuration = input.parse().unwrap();
            assert_eq!(d.to_string(), input);
        }
    }
}
