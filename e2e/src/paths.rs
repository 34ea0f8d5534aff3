//! Where things are: the workspace, Envoy, the built filter and cargo-built binaries.
//!
//! Contract (shared with `scripts/setup.sh` and `scripts/envoy-path`):
//! - Envoy is `$FLEDGE_ENVOY` if set, else `${FLEDGE_VENV:-<workspace>/.venv}/bin/envoy`.
//! - The filter is `<target>/wasm32-wasip1/release/fledge_filter.wasm`, or `$FLEDGE_FILTER_WASM`;
//!   its metrics-only module `fledge_observer.wasm` next to it, or `$FLEDGE_OBSERVER_WASM`.
//! - `<target>` is `$CARGO_TARGET_DIR` if set, else `<workspace>/target`.
//! - The controller is `$FLEDGE_BIN`, or `fledge` built by cargo (see [`cargo_binary`]).

use anyhow::{bail, Result};
use std::path::{Path, PathBuf};

/// The workspace root (the parent of this crate's directory).
pub fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| manifest_dir.to_path_buf())
}

/// Cargo's target directory: `$CARGO_TARGET_DIR` (relative paths are taken from the workspace
/// root) or `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                workspace_root().join(dir)
            }
        }
        _ => workspace_root().join("target"),
    }
}

/// The Envoy binary. Errors (with the fix) if it is not there.
pub fn envoy_binary() -> Result<PathBuf> {
    if let Some(explicit) = non_empty_env("FLEDGE_ENVOY") {
        let path = PathBuf::from(explicit);
        if is_executable(&path) {
            return Ok(path);
        }
        bail!(
            "FLEDGE_ENVOY={} is not an executable file; unset it or point it at an Envoy 1.40 binary",
            path.display()
        );
    }
    let venv = non_empty_env("FLEDGE_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(".venv"));
    let path = venv.join("bin").join("envoy");
    if is_executable(&path) {
        return Ok(path);
    }
    bail!(
        "Envoy not found at {}; run scripts/setup.sh (or set FLEDGE_ENVOY to an Envoy binary)",
        path.display()
    )
}

/// Where the release build of the filter is (whether or not it exists).
pub fn filter_wasm_location() -> PathBuf {
    match non_empty_env("FLEDGE_FILTER_WASM") {
        Some(path) => PathBuf::from(path),
        None => target_dir()
            .join("wasm32-wasip1")
            .join("release")
            .join("fledge_filter.wasm"),
    }
}

/// Where the release build of the metrics-only module is (`fledge_observer.wasm`, next to the
/// filter, or `$FLEDGE_OBSERVER_WASM`).
pub fn observer_wasm_location() -> PathBuf {
    match non_empty_env("FLEDGE_OBSERVER_WASM") {
        Some(path) => PathBuf::from(path),
        None => filter_wasm_location().with_file_name("fledge_observer.wasm"),
    }
}

/// The built metrics-only module. Errors (with the fix) if it has not been built.
pub fn observer_wasm() -> Result<PathBuf> {
    let path = observer_wasm_location();
    if path.is_file() {
        return Ok(path);
    }
    bail!(
        "observer module not built: {} is missing; run make build-filter \
         (cargo build -p fledge-observer --target wasm32-wasip1 --release)",
        path.display()
    )
}

/// The name Envoy loads `filter/native-floor` by (`lib<name>.so`).
pub const NATIVE_FLOOR_NAME: &str = "fledge_native_floor";

/// Where the release build of `filter/native-floor` is (a shared object for this machine,
/// `<target>/release/libfledge_native_floor.so`), whether or not it exists.
pub fn native_floor_module() -> PathBuf {
    target_dir()
        .join("release")
        .join(format!("lib{NATIVE_FLOOR_NAME}.so"))
}

/// The built filter. Errors (with the fix) if it has not been built.
pub fn filter_wasm() -> Result<PathBuf> {
    let path = filter_wasm_location();
    if path.is_file() {
        return Ok(path);
    }
    bail!(
        "filter not built: {} is missing; run make build-filter \
         (cargo build -p fledge-filter --target wasm32-wasip1 --release)",
        path.display()
    )
}

/// A binary built by cargo in this workspace, e.g. `fledge` or `fledge-testbackend`.
///
/// Looks next to the running executable first (so `cargo run`, tests in `target/*/deps` and
/// other profiles find their siblings), then in `<target>/debug`.
pub fn cargo_binary(name: &str) -> Result<PathBuf> {
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            candidates.push(dir.join(name));
            if dir.file_name().is_some_and(|n| n == "deps") {
                if let Some(profile_dir) = dir.parent() {
                    candidates.push(profile_dir.join(name));
                }
            }
        }
    }
    candidates.push(target_dir().join("debug").join(name));
    if let Some(found) = candidates.iter().find(|c| is_executable(c)) {
        return Ok(found.clone());
    }
    let package = match name {
        "fledge" => "fledge-controller",
        "fledge-testbackend" | "fledge-demo" => "fledge-e2e",
        _ => "<its package>",
    };
    bail!(
        "binary `{name}` not built (looked in {}); run cargo build -p {package}",
        candidates
            .iter()
            .map(|c| c.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// The controller binary: `$FLEDGE_BIN` if set, else the cargo-built `fledge`.
pub fn fledge_binary() -> Result<PathBuf> {
    if let Some(explicit) = non_empty_env("FLEDGE_BIN") {
        let path = PathBuf::from(explicit);
        if is_executable(&path) {
            return Ok(path);
        }
        bail!("FLEDGE_BIN={} is not an executable file", path.display());
    }
    cargo_binary("fledge")
}

/// The test backend binary, `fledge-testbackend`.
pub fn testbackend_binary() -> Result<PathBuf> {
    cargo_binary("fledge-testbackend")
}

fn non_empty_env(key: &str) -> Option<String> {
    std::env::var(key).ok().filter(|v| !v.is_empty())
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}
