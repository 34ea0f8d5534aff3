//! Standalone persistence: one JSON state file per canary, written atomically (temp file,
//! fsync, rename) after every decision, so a restarted `fledge run` continues at the same step.

use fledge_core::rollout::CanaryStatus;
use fledge_core::spec::{Canary, CanarySpec};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state file {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("state file {path} is corrupt ({message}); move it away to start this canary afresh")]
    Corrupt { path: String, message: String },
}

/// What is saved for one canary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SavedState {
    /// Fingerprint of the spec (and rollout annotation) the status belongs to: a change
    /// starts a new rollout.
    pub spec_fingerprint: String,
    pub status: CanaryStatus,
    /// The rollout finished and its final weights were applied: from then on the route is
    /// left alone (the operator finalizes), even across restarts.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub final_routes_applied: bool,
}

/// A stable fingerprint of a spec (FNV-1a over its canonical JSON).
pub fn fingerprint(spec: &CanarySpec) -> String {
    let json = serde_json::to_string(spec).unwrap_or_default();
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in json.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{hash:016x}")
}

/// Which rollout a canary asks for: its spec, plus the `fledge.dev/rollout` annotation when
/// set (a new release of an unchanged spec). Without the annotation it is the spec's
/// [`fingerprint`], as before the annotation existed, so saved states stay valid.
pub fn rollout_fingerprint(canary: &Canary) -> String {
    let spec = fingerprint(&canary.spec);
    match canary.rollout_marker() {
        Some(rollout) => format!("{spec}/{rollout}"),
        None => spec,
    }
}

/// Held while this process may act on a canary; the OS releases it when the process exits,
/// however it exits (even SIGKILL), so a crashed controller never blocks its successor.
#[derive(Debug)]
pub struct CanaryLock {
    _file: std::fs::File,
    pub path: PathBuf,
}

#[derive(Debug, Clone)]
pub struct StateStore {
    dir: PathBuf,
}

impl StateStore {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        StateStore { dir: dir.into() }
    }

    fn path_of(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.json"))
    }

    fn io_error(path: &Path, source: std::io::Error) -> StateError {
        StateError::Io {
            path: path.display().to_string(),
            source,
        }
    }

    /// Take the canary's lock file (`<dir>/<name>.lock`) without waiting: `None` when another
    /// process holds it.
    pub fn try_lock(&self, name: &str) -> Result<Option<CanaryLock>, StateError> {
        std::fs::create_dir_all(&self.dir).map_err(|e| Self::io_error(&self.dir, e))?;
        let path = self.dir.join(format!("{name}.lock"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Self::io_error(&path, e))?;
        if lock_exclusive_nonblocking(&file) {
            Ok(Some(CanaryLock { _file: file, path }))
        } else {
            Ok(None)
        }
    }

    pub fn lock_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.lock"))
    }

    pub fn load(&self, name: &str) -> Result<Option<SavedState>, StateError> {
        let path = self.path_of(name);
        match std::fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|e| StateError::Corrupt {
                        path: path.display().to_string(),
                        message: e.to_string(),
                    })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Self::io_error(&path, e)),
        }
    }

    pub fn save(&self, name: &str, state: &SavedState) -> Result<(), StateError> {
        std::fs::create_dir_all(&self.dir).map_err(|e| Self::io_error(&self.dir, e))?;
        let path = self.path_of(name);
        let tmp = self.dir.join(format!(".{name}.json.tmp"));
        let bytes = serde_json::to_vec_pretty(state).map_err(|e| StateError::Corrupt {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        let write = || -> std::io::Result<()> {
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(&bytes)?;
            file.sync_all()?;
            std::fs::rename(&tmp, &path)
        };
        write().map_err(|e| Self::io_error(&path, e))
    }
}

#[cfg(unix)]
#[allow(unsafe_code)] // flock(2): the controller's only FFI call
fn lock_exclusive_nonblocking(file: &std::fs::File) -> bool {
    use std::os::unix::io::AsRawFd;
    // SAFETY: flock on a file descriptor we own; no memory is shared with the kernel.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

#[cfg(not(unix))]
fn lock_exclusive_nonblocking(_file: &std::fs::File) -> bool {
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use fledge_core::rollout::Phase;

    #[test]
    fn save_then_load_round_trips_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path().join("state"));
        assert_eq!(store.load("app").unwrap(), None);
        let state = SavedState {
            spec_fingerprint: "abc".into(),
            status: CanaryStatus {
                phase: Phase::Progressing,
                canary_weight: 40,
                step: 2,
                ..Default::default()
            },
            final_routes_applied: true,
        };
        store.save("app", &state).unwrap();
        store.save("app", &state).unwrap();
        assert_eq!(store.load("app").unwrap(), Some(state));
        let files: Vec<_> = std::fs::read_dir(dir.path().join("state"))
            .unwrap()
            .collect();
        assert_eq!(files.len(), 1);
    }

    #[test]
    fn a_state_file_written_before_final_routes_were_tracked_loads_as_not_applied() {
        let dir = tempfile::tempdir().unwrap();
        let status = serde_json::to_string(&CanaryStatus::default()).unwrap();
        let old = format!(r#"{{"specFingerprint": "abc", "status": {status}}}"#);
        std::fs::write(dir.path().join("app.json"), old).unwrap();
        let loaded = StateStore::new(dir.path()).load("app").unwrap().unwrap();
        assert!(!loaded.final_routes_applied);
    }

    #[test]
    fn the_rollout_annotation_is_part_of_the_rollout_fingerprint() {
        let mut canary: Canary = serde_yaml::from_str(
            "apiVersion: fledge.dev/v1alpha1
kind: Canary
metadata: {name: app}
spec:
  service: app
  stable: {subset: stable}
  canary: {subset: canary}
  metricsSource: {envoyAdmin: {urls: [\"http://127.0.0.1:9901\"]}}
  router: {envoyRds: {path: /r.json, routeConfiguration: r, virtualHost: v, route: p,
           stableCluster: s, canaryCluster: c, adminUrl: \"http://127.0.0.1:9901\"}}
  analysis: {stepWeights: [50]}
",
        )
        .unwrap();
        let plain = rollout_fingerprint(&canary);
        assert_eq!(plain, fingerprint(&canary.spec), "saved states stay valid");
        canary
            .metadata
            .annotations
            .insert(fledge_core::spec::ROLLOUT_ANNOTATION.into(), "v2".into());
        let v2 = rollout_fingerprint(&canary);
        canary
            .metadata
            .annotations
            .insert(fledge_core::spec::ROLLOUT_ANNOTATION.into(), "v3".into());
        let v3 = rollout_fingerprint(&canary);
        assert!(plain != v2 && v2 != v3, "{plain} {v2} {v3}");
        canary
            .metadata
            .annotations
            .insert("other".into(), "x".into());
        assert_eq!(rollout_fingerprint(&canary), v3);
    }

    #[test]
    fn only_one_holder_of_a_canary_lock_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path());
        let first = store.try_lock("app").unwrap();
        assert!(first.is_some());
        // flock is per open file description: a second open in this process contends too.
        assert!(store.try_lock("app").unwrap().is_none());
        assert!(store.try_lock("other").unwrap().is_some());
        drop(first);
        assert!(store.try_lock("app").unwrap().is_some());
    }

    #[test]
    fn corrupt_state_names_the_file_and_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("app.json"), "{not json").unwrap();
        let err = StateStore::new(dir.path())
            .load("app")
            .unwrap_err()
            .to_string();
        assert!(err.contains("app.json is corrupt"), "{err}");
        assert!(err.contains("move it away"), "{err}");
    }
}
