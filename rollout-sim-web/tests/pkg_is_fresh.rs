//! The committed browser package (rollout-sim-web/pkg) must be built from the current sources: a
//! fresh machine embeds it as it is (rollout-sim-web/build.sh only rebuilds it when its inputs
//! changed), so a stale one would run yesterday's state machine in the dashboard.

use std::path::Path;
use std::process::Command;

#[test]
fn the_committed_simulator_package_matches_its_inputs() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let pkg = root.join("rollout-sim-web/pkg");
    for file in [
        "fledge_rollout_sim_web.js",
        "fledge_rollout_sim_web_bg.wasm",
        "inputs.txt",
    ] {
        assert!(
            pkg.join(file).is_file(),
            "rollout-sim-web/pkg/{file} is missing; run `make simulator` and commit rollout-sim-web/pkg"
        );
    }
    let check = match Command::new("python3")
        .arg(root.join("rollout-sim-web/inputs.py"))
        .arg("--check")
        .output()
    {
        Ok(output) => output,
        Err(e) => {
            eprintln!(
                "note: python3 not runnable ({e}); rollout-sim-web/pkg freshness not checked"
            );
            return;
        }
    };
    assert!(
        check.status.success(),
        "rollout-sim-web/pkg is stale: {}run `make simulator` and commit rollout-sim-web/pkg (the package \
         and inputs.txt), so that fresh machines need not build it",
        String::from_utf8_lossy(&check.stderr)
    );
}
