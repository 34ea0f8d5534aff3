//! libFuzzer entry point: `cargo +nightly fuzz run canary_spec --features libfuzzer`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = fledge_fuzz::canary_spec(data);
});
