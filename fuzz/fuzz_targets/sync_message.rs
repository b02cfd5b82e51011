#![no_main]
//! cargo-fuzz driver of the `sync_message` target (tests/fuzz_targets).

#[path = "../../tests/fuzz_targets/mod.rs"]
mod fuzz_targets;

mod caught_panics;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    caught_panics::let_automerge_panics_unwind();
    fuzz_targets::sync_message(data)
});
