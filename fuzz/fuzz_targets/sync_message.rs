#![no_main]
//! cargo-fuzz driver of the `sync_message` target (tests/fuzz_targets).

#[path = "../../tests/fuzz_targets/mod.rs"]
mod fuzz_targets;

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_targets::sync_message(data));
