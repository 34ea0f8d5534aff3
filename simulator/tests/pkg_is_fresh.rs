//! The committed browser package (simulator/pkg) must be built from the current sources: a
//! fresh machine embeds it as it is (simulator/build.sh only rebuilds it when its inputs
//! changed), so a stale one would run yesterday's state machine in the dashboard.

use std::path::Path;
use std::process::Command;

#[test]
fn the_committed_simulator_package_matches_its_inputs() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let pkg = root.join("simulator/pkg");
    for file in [
        "fledge_simulator.js",
        "fledge_simulator_bg.wasm",
        "inputs.txt",
    ] {
        assert!(
            pkg.join(file).is_file(),
            "simulator/pkg/{file} is missing; run `make simulator` and commit simulator/pkg"
        );
    }
    let check = match Command::new("python3")
        .arg(root.join("simulator/inputs.py"))
        .arg("--check")
        .output()
    {
        Ok(output) => output,
        Err(e) => {
            eprintln!("note: python3 not runnable ({e}); simulator/pkg freshness not checked");
            return;
        }
    };
    assert!(
        check.status.success(),
        "simulator/pkg is stale: {}run `make simulator` and commit simulator/pkg (the package \
         and inputs.txt), so that fresh machines need not build it",
        String::from_utf8_lossy(&check.stderr)
    );
}
