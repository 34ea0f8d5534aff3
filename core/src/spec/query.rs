//! PromQL templating for custom metrics: `{{ variable }}` replaced by the canary's values.

use super::Canary;

/// Variables a custom `query` template may use, written `{{ name }}`.
pub const QUERY_VARIABLES: [&str; 6] = [
    "name",
    "namespace",
    "service",
    "stable",
    "canary",
    "interval",
];

/// Values for the variables of a query template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryVariables {
    pub name: String,
    pub namespace: String,
    pub service: String,
    pub stable: String,
    pub canary: String,
    /// The analysis interval as a PromQL duration, e.g. `30s`.
    pub interval: String,
}

impl QueryVariables {
    pub fn for_canary(canary: &Canary) -> Self {
        QueryVariables {
            name: canary.metadata.name.clone(),
            namespace: canary.metadata.namespace.clone().unwrap_or_default(),
            service: canary.spec.service.clone(),
            stable: canary.spec.stable.subset.clone(),
            canary: canary.spec.canary.subset.clone(),
            interval: canary.spec.analysis.interval.to_string(),
        }
    }

    fn get(&self, variable: &str) -> Option<&str> {
        Some(match variable {
            "name" => &self.name,
            "namespace" => &self.namespace,
            "service" => &self.service,
            "stable" => &self.stable,
            "canary" => &self.canary,
            "interval" => &self.interval,
            _ => return None,
        })
    }
}

/// A problem in a query template.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("unknown variable {{{{ {0} }}}}; use one of: {vars}", vars = QUERY_VARIABLES.join(", "))]
    UnknownVariable(String),
    #[error("unclosed `{{{{` at byte {0}; close it with `}}}}`")]
    Unclosed(usize),
}

/// Replace every `{{ variable }}` in `template`. Unknown variables are errors, never silently
/// empty: an empty label matcher would select the wrong series. Values are inserted as they
/// are: a valid spec only has letters, digits, '_', '-' (and, in `interval`, a duration) in
/// them, so they cannot end a PromQL string or add a matcher.
pub fn render_query(template: &str, vars: &QueryVariables) -> Result<String, TemplateError> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    let mut offset = 0;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find("}}")
            .ok_or(TemplateError::Unclosed(offset + start))?;
        let variable = after[..end].trim();
        let value = vars
            .get(variable)
            .ok_or_else(|| TemplateError::UnknownVariable(variable.to_string()))?;
        out.push_str(value);
        let consumed = start + 2 + end + 2;
        offset += consumed;
        rest = &rest[consumed..];
    }
    out.push_str(rest);
    Ok(out)
}
