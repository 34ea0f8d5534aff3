//! `fledge_observer.wasm`: the Fledge filter's metrics-only build. Everything is in
//! `fledge-filter` (its `module.rs` lists which callbacks this build exports and why); this
//! crate only links it with the `observer-module` feature.

#![forbid(unsafe_code)]

// Linked for its exports (`#[no_mangle]` functions are exported from the cdylib).
extern crate fledge_filter;
