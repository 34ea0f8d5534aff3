//! Loading Canary specs from YAML files (one or more documents per file).

use fledge_core::spec::Canary;
pub use fledge_core::warning::spec_warnings;
use fledge_core::warning::Warning;
use serde::Deserialize;
use std::collections::BTreeSet;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}, document {doc}: {message}")]
    Parse {
        path: String,
        doc: usize,
        message: String,
    },
    #[error("{path}, document {doc} (Canary {name:?}): {errors}")]
    Invalid {
        path: String,
        doc: usize,
        name: String,
        errors: fledge_core::spec::SpecErrors,
        /// What the spec would not check, were it valid (see [`spec_warnings`]).
        warnings: Vec<Warning>,
    },
    #[error("Canary {0:?} is defined more than once; give each canary its own metadata.name")]
    Duplicate(String),
    #[error("{0} contains no Canary document")]
    Empty(String),
}

/// Parse every YAML document in `text` as a Canary and validate it. All problems of all
/// documents are returned, not just the first.
pub fn parse_canaries(path: &str, text: &str) -> Result<Vec<Canary>, Vec<ConfigError>> {
    let mut canaries = Vec::new();
    let mut errors = Vec::new();
    for (i, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let doc = i + 1;
        let value = match serde_yaml::Value::deserialize(document) {
            Ok(serde_yaml::Value::Null) => continue,
            Ok(value) => value,
            Err(e) => {
                errors.push(ConfigError::Parse {
                    path: path.to_string(),
                    doc,
                    message: e.to_string(),
                });
                // After a YAML syntax error serde_yaml's document iterator yields the same
                // error forever (found by fuzzing: `fledge validate` then filled memory), and
                // no later document can be found reliably anyway.
                break;
            }
        };
        match serde_path_to_error::deserialize::<_, Canary>(value) {
            Ok(canary) => match canary.validate() {
                Ok(()) => canaries.push(canary),
                Err(e) => errors.push(ConfigError::Invalid {
                    path: path.to_string(),
                    doc,
                    name: canary.metadata.name.clone(),
                    errors: e,
                    warnings: spec_warnings(&canary),
                }),
            },
            Err(e) => errors.push(ConfigError::Parse {
                path: path.to_string(),
                doc,
                message: shape_error(&e),
            }),
        }
    }
    if canaries.is_empty() && errors.is_empty() {
        errors.push(ConfigError::Empty(path.to_string()));
    }
    if errors.is_empty() {
        Ok(canaries)
    } else {
        Err(errors)
    }
}

/// A type error with the field it happened at, so that `missing field` or `unknown variant`
/// says where: `spec.router.envoyRds: missing field `adminUrl``.
fn shape_error(e: &serde_path_to_error::Error<serde_yaml::Error>) -> String {
    let at = e.path().to_string();
    let inner = e.inner().to_string();
    if at.is_empty() || at == "." {
        format!("{inner} (the fields are listed in docs/spec.md)")
    } else {
        format!("{at}: {inner} (the fields are listed in docs/spec.md)")
    }
}

/// Load and validate all canaries from several files; names must be unique across them.
pub fn load_files(paths: &[impl AsRef<Path>]) -> Result<Vec<Canary>, Vec<ConfigError>> {
    let mut canaries = Vec::new();
    let mut errors = Vec::new();
    for path in paths {
        let path = path.as_ref();
        let shown = path.display().to_string();
        match std::fs::read_to_string(path) {
            Err(source) => errors.push(ConfigError::Read {
                path: shown,
                source,
            }),
            Ok(text) => match parse_canaries(&shown, &text) {
                Ok(mut found) => canaries.append(&mut found),
                Err(mut found) => errors.append(&mut found),
            },
        }
    }
    let mut seen = BTreeSet::new();
    for canary in &canaries {
        if !seen.insert(canary.name().to_string()) {
            errors.push(ConfigError::Duplicate(canary.name().to_string()));
        }
    }
    if errors.is_empty() {
        Ok(canaries)
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub const GOOD: &str = r#"
apiVersion: fledge.dev/v1alpha1
kind: Canary
metadata: {name: NAME}
spec:
  service: app
  stable: {subset: stable}
  canary: {subset: canary}
  metricsSource: {envoyAdmin: {urls: ["http://127.0.0.1:9901"]}}
  router:
    envoyRds: {path: /tmp/r.json, routeConfiguration: r, virtualHost: app, route: primary,
               stableCluster: a, canaryCluster: b, adminUrl: "http://127.0.0.1:9901"}
  analysis:
    stepWeight: 20
    compareWithStable: {}
"#;

    #[test]
    fn multi_document_files_load_every_canary() {
        let text = format!(
            "{}---\n{}",
            GOOD.replace("NAME", "one"),
            GOOD.replace("NAME", "two")
        );
        let canaries = parse_canaries("c.yaml", &text).unwrap();
        let names: Vec<&str> = canaries.iter().map(|c| c.name()).collect();
        assert_eq!(names, vec!["one", "two"]);
    }

    #[test]
    fn errors_name_file_document_and_field() {
        let text = format!(
            "{}---\n{}",
            GOOD.replace("NAME", "one")
                .replace("stepWeight: 20", "stepWeight: 0"),
            GOOD.replace("NAME", "two")
                .replace("service: app", "servce: app")
        );
        let errors = parse_canaries("c.yaml", &text).unwrap_err();
        let text: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        assert_eq!(text.len(), 2, "{text:?}");
        assert!(
            text[0].starts_with("c.yaml, document 1 (Canary \"one\"): 1 problem"),
            "{}",
            text[0]
        );
        assert!(text[0].contains("spec.analysis.stepWeight"), "{}", text[0]);
        assert!(text[1].starts_with("c.yaml, document 2:"), "{}", text[1]);
        assert!(text[1].contains("unknown field `servce`"), "{}", text[1]);
    }

    #[test]
    fn shape_errors_name_the_nested_field() {
        let text = GOOD
            .replace("NAME", "one")
            .replace(r#", adminUrl: "http://127.0.0.1:9901""#, "");
        let errors = parse_canaries("c.yaml", &text).unwrap_err();
        assert_eq!(
            errors[0].to_string(),
            "c.yaml, document 1: spec.router.envoyRds: missing field `adminUrl` \
             (the fields are listed in docs/spec.md)"
        );
    }

    /// Regression (fuzzing, `fuzz/` target `canary_spec`): a YAML syntax error used to make
    /// the document loop run forever, growing the error list until the process ran out of memory.
    #[test]
    fn a_yaml_syntax_error_is_reported_once() {
        let inputs = [
            "a: {b\n".to_string(),
            "- {duration pause: {}\n".to_string(),
            format!(
                "{}speclatencyBoundariesMs: [250, 500]:\n",
                GOOD.replace("NAME", "one")
            ),
            format!("{}---\nb: [\n", GOOD.replace("NAME", "one")),
        ];
        for text in inputs {
            let errors = parse_canaries("c.yaml", &text).unwrap_err();
            assert_eq!(errors.len(), 1, "{text:?}: {errors:?}");
            assert!(matches!(errors[0], ConfigError::Parse { .. }), "{errors:?}");
        }
    }

    #[test]
    fn duplicates_and_empty_files_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.yaml");
        let b = dir.path().join("b.yaml");
        let empty = dir.path().join("empty.yaml");
        std::fs::write(&a, GOOD.replace("NAME", "same")).unwrap();
        std::fs::write(&b, GOOD.replace("NAME", "same")).unwrap();
        std::fs::write(&empty, "# nothing\n").unwrap();
        let errors = load_files(&[&a, &b]).unwrap_err();
        assert!(matches!(&errors[..], [ConfigError::Duplicate(n)] if n == "same"));
        let errors = load_files(&[&empty]).unwrap_err();
        assert!(matches!(&errors[..], [ConfigError::Empty(_)]));
        let errors = load_files(&[dir.path().join("missing.yaml")]).unwrap_err();
        assert!(errors[0].to_string().starts_with("cannot read"));
    }
}
