//! libFuzzer entry point: `cargo +nightly fuzz run filter_config --features libfuzzer`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = fledge_fuzz::filter_config(data);
});
