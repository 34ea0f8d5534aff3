//! Running the headless-browser script (`e2e/browser/dashboard.mjs`: Debian's chromium driven
//! by playwright-core) and other bounded child commands.

use crate::paths;
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Run `program args` with a deadline; `(exit code, stdout, stderr)`.
pub fn run_bounded(
    program: &Path,
    args: &[&str],
    limit: Duration,
) -> Result<(i32, String, String)> {
    run_bounded_with_env(program, args, &[], limit)
}

/// [`run_bounded`] with extra environment variables.
pub fn run_bounded_with_env(
    program: &Path,
    args: &[&str],
    env: &[(&str, &Path)],
    limit: Duration,
) -> Result<(i32, String, String)> {
    let mut child = Command::new(program)
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", program.display()))?;
    let deadline = Instant::now() + limit;
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "{} {args:?} did not finish within {limit:?}",
                program.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let output = child.wait_with_output()?;
    Ok((
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    ))
}

/// `program` on `$PATH`, if any.
pub fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|candidate| candidate.is_file())
    })
}

/// `e2e/browser/dashboard.mjs`, once its dependencies are installed.
pub fn dashboard_script() -> Result<PathBuf> {
    let dir = paths::workspace_root().join("e2e/browser");
    if !dir
        .join("node_modules/playwright-core/package.json")
        .is_file()
    {
        bail!("playwright-core is not installed: run `make setup-browser` (Debian chromium + npm ci in e2e/browser)");
    }
    Ok(dir.join("dashboard.mjs"))
}

/// Open the dashboard at `base` in headless chromium: the list, canary `canary`'s page (its
/// charts once they have points) and the simulator page fed `spec` (written to
/// `<dir>/simulated.yaml`) and
/// `scenario`. Screenshots go to `<target>/dashboard-screenshots/<shots>/`. Fails on any script
/// error in the pages, or unless the list shows exactly `canary`. Returns the script's JSON.
pub fn drive_dashboard(
    base: &str,
    canary: &str,
    dir: &Path,
    spec: &str,
    scenario: &str,
    shots: &str,
) -> Result<Value> {
    let script = dashboard_script()?;
    let node = which("node").context("node is needed for the browser test")?;
    let spec_path = dir.join("simulated.yaml");
    std::fs::write(&spec_path, spec)?;
    let out = paths::target_dir()
        .join("dashboard-screenshots")
        .join(shots);
    std::fs::create_dir_all(&out)?;
    let (code, stdout, stderr) = run_bounded(
        &node,
        &[
            script.to_str().unwrap_or_default(),
            "--base",
            base,
            "--canary",
            canary,
            "--spec",
            spec_path.to_str().unwrap_or_default(),
            "--scenario",
            scenario,
            "--out",
            out.to_str().unwrap_or_default(),
        ],
        Duration::from_secs(170),
    )?;
    if code != 0 {
        bail!("browser script exit {code}\nstdout: {stdout}\nstderr: {stderr}");
    }
    let page: Value = serde_json::from_str(stdout.trim().lines().last().unwrap_or_default())
        .with_context(|| format!("browser script output: {stdout}\nstderr: {stderr}"))?;
    eprintln!("screenshots: {}", page["screenshots"]);
    if !page["pageErrors"].as_array().is_some_and(Vec::is_empty) {
        bail!("page errors: {}", page["pageErrors"]);
    }
    let list = page["list"].as_array().context("no canary list")?;
    if list.len() != 1 || list[0]["name"] != canary {
        bail!("the list does not show exactly {canary:?}: {list:?}");
    }
    Ok(page)
}
