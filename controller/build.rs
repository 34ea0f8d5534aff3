//! Embeds the browser decision simulator (`rollout-sim-web/pkg`, built by `make simulator`) into the
//! `fledge` binary when it has been built; without it the dashboard says how to build it.

use std::path::PathBuf;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(fledge_rollout_sim_web)");
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default());
    let pkg = manifest_dir.join("../rollout-sim-web/pkg");
    println!("cargo::rerun-if-changed={}", pkg.display());
    let wasm = pkg.join("fledge_rollout_sim_web_bg.wasm");
    let glue = pkg.join("fledge_rollout_sim_web.js");
    if wasm.is_file() && glue.is_file() {
        if let Ok(dir) = pkg.canonicalize() {
            println!("cargo::rustc-cfg=fledge_rollout_sim_web");
            println!(
                "cargo::rustc-env=FLEDGE_ROLLOUT_SIM_WEB_PKG={}",
                dir.display()
            );
        }
    }
}
