//! libFuzzer entry point: `cargo +nightly fuzz run prometheus_text --features libfuzzer`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = fledge_fuzz::prometheus_text(data);
});
