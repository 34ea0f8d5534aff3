//! The end-to-end tests, one module per area, in one test binary: the modules share one build
//! and one link, and `--test-threads=2` keeps two tests running across all of them (as separate
//! binaries, cargo ran them one after another and a binary with one test used one thread).
//!
//! Run one area with `cargo test -p fledge-e2e --test e2e -- scenarios::`, one test by its name.
//! Every `tests/*.rs` file must be a module below: `every_test_file_is_a_module` fails otherwise,
//! so that a new file is never silently left out (`autotests = false` in Cargo.toml).

mod allocator;
mod cluster_stats;
mod dashboard;
mod dashboard_grafana;
mod demo;
mod faults;
mod filter_manifests;
mod filter_robustness;
mod filter_tagging;
mod gateway_api;
mod guard;
mod harness;
mod kubernetes;
mod lifecycle;
mod native_floor;
mod operator_cli;
mod prometheus;
mod scenarios;
// The real-Envoy filter fixtures of filter_robustness and filter_tagging.
#[path = "support/filter.rs"]
mod support;
mod warnings;
mod workload_standins;

#[test]
fn every_test_file_is_a_module() {
    let tests = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    let main = std::fs::read_to_string(tests.join("main.rs")).expect("tests/main.rs");
    let declared: Vec<&str> = main
        .lines()
        .filter_map(|line| line.strip_prefix("mod ")?.strip_suffix(';'))
        .collect();
    let mut missing = Vec::new();
    for entry in std::fs::read_dir(&tests).expect("e2e/tests") {
        let path = entry.expect("a directory entry").path();
        let Some(stem) = path.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        if path.extension().is_some_and(|e| e == "rs")
            && stem != "main"
            && !declared.contains(&stem)
        {
            missing.push(format!("mod {stem};"));
        }
    }
    assert!(
        missing.is_empty(),
        "e2e/tests has files that no test runs: add {} to e2e/tests/main.rs",
        missing.join(" ")
    );
}
