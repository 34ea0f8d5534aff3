//! The plain-Envoy example in `manifests/filter/envoy.yaml` is accepted by a real Envoy with the
//! built filter (`envoy --mode validate`: full config load, Wasm VM included, nothing bound).

use anyhow::{ensure, Context, Result};
use fledge_e2e::paths;
use std::process::Command;

#[test]
fn plain_envoy_example_validates_with_the_built_filter() -> Result<()> {
    let require = std::env::var("FLEDGE_REQUIRE_WASM").is_ok_and(|v| v == "1");
    let wasm = match paths::filter_wasm() {
        Ok(wasm) => wasm,
        Err(error) if !require => {
            eprintln!("SKIPPED: {error:#} (set FLEDGE_REQUIRE_WASM=1 to fail instead)");
            return Ok(());
        }
        Err(error) => return Err(error),
    };
    let example = paths::workspace_root().join("manifests/filter/envoy.yaml");
    let text = std::fs::read_to_string(&example)
        .with_context(|| format!("reading {}", example.display()))?;
    ensure!(text.contains("/etc/fledge/fledge_filter.wasm"));
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("envoy.yaml");
    std::fs::write(
        &config,
        text.replace(
            "/etc/fledge/fledge_filter.wasm",
            &wasm.display().to_string(),
        ),
    )?;
    let output = Command::new(paths::envoy_binary()?)
        .args([
            "--mode",
            "validate",
            "--disable-hot-restart",
            "-l",
            "info",
            "-c",
        ])
        .arg(&config)
        .output()?;
    let log = String::from_utf8_lossy(&output.stderr).to_string()
        + &String::from_utf8_lossy(&output.stdout);
    ensure!(
        output.status.success() && log.contains("OK"),
        "envoy rejected the example:\n{log}"
    );
    Ok(())
}
