//! The `fledge` binary runs with the allocator it was measured with: jemalloc, configured when
//! it is built (`.cargo/config.toml`) to purge freed pages from a background thread. Without
//! that configuration the same binary keeps each tick's burst resident (docs/operating.md,
//! "Memory per Canary"), and nothing else would notice: this test looks for the thread.

use anyhow::{Context, Result};
use fledge_e2e::{free_port, wait_until, CanaryManifest, Controller, ScratchDir};
use std::time::Duration;

/// The name jemalloc gives its background purge threads.
const PURGE_THREAD: &str = "jemalloc_bg_thd";

fn thread_names(pid: u32) -> Result<Vec<String>> {
    let tasks = format!("/proc/{pid}/task");
    let mut names = Vec::new();
    for task in std::fs::read_dir(&tasks).with_context(|| format!("listing {tasks}"))? {
        let comm = task?.path().join("comm");
        if let Ok(name) = std::fs::read_to_string(&comm) {
            names.push(name.trim().to_string());
        }
    }
    Ok(names)
}

#[test]
fn fledge_purges_freed_memory_from_a_background_thread() -> Result<()> {
    let dir = ScratchDir::temp("allocator")?;
    // No Envoy: the canary only waits for metrics, which is enough for the process to allocate.
    let admin = format!("http://127.0.0.1:{}", free_port()?);
    let manifest = CanaryManifest::new("app", "app", &admin, &dir.path().join("rds.yaml"));
    let controller = Controller::start_in(dir.path(), &manifest)?;
    wait_until(
        "jemalloc's background purge thread",
        Duration::from_secs(10),
        || {
            let names = thread_names(controller.pid())?;
            Ok(names.iter().any(|name| name == PURGE_THREAD).then_some(()))
        },
    )
    .with_context(|| format!("threads of fledge: {:?}", thread_names(controller.pid())))?;
    controller.stop();
    Ok(())
}
