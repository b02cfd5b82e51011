//! Panics inside automerge that the ledger catches (`ledger::document`
//! wraps automerge's sync and merge calls in `catch_unwind`): the node
//! answers them with an error and goes on, so they are not crashes of the
//! node. libfuzzer-sys's panic hook aborts on every panic, caught or not,
//! which stopped the long runs at the first one; this hook lets a panic
//! raised in automerge's own source unwind to the ledger, counts it and
//! prints each new place once (automerge's column codec, hexane, counts as
//! automerge). A panic anywhere else (the node's code,
//! including its mirror of automerge's receive path) still aborts, and one
//! that escapes the ledger aborts in libfuzzer-sys's wrapper either way.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, Once};

/// Installs the hook once; call at the start of every input.
pub fn let_automerge_panics_unwind() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let abort_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let place = info
                .location()
                .map(|l| format!("{}:{}", l.file(), l.line()))
                .unwrap_or_default();
            let in_automerge = ["/automerge-0.12.0/", "/hexane-"]
                .iter()
                .any(|crate_dir| place.contains(crate_dir));
            if !in_automerge {
                abort_hook(info);
                return;
            }
            static COUNT: AtomicU64 = AtomicU64::new(0);
            static SEEN: Mutex<Option<HashSet<String>>> = Mutex::new(None);
            let count = COUNT.fetch_add(1, Ordering::Relaxed) + 1;
            let new = SEEN
                .lock()
                .map(|mut seen| seen.get_or_insert_with(HashSet::new).insert(place.clone()))
                .unwrap_or(false);
            if new || count.is_power_of_two() {
                eprintln!("caught automerge panic #{count} at {place}: {info}");
            }
        }));
    });
}
