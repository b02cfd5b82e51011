//! The short fuzz pass CI runs: every target of `fuzz_targets` on its valid
//! seeds, then on random bytes and on seeds mutated (bit flips, cut, spliced,
//! overwritten runs), from a fixed seed so a failure reproduces. Cases per
//! target: `ONCEMESH_FUZZ_CASES` (default 2000). The long, coverage-guided
//! runs use the same targets through `fuzz/` (docs/RELIABILITY.md).

mod fuzz_targets;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

fn cases() -> usize {
    std::env::var("ONCEMESH_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

/// One input: random bytes, or a seed changed in a few places.
fn input(rng: &mut StdRng, seeds: &[Vec<u8>]) -> Vec<u8> {
    if seeds.is_empty() || rng.random_bool(0.2) {
        let len = rng.random_range(0..512);
        return (0..len).map(|_| rng.random()).collect();
    }
    let mut data = seeds[rng.random_range(0..seeds.len())].clone();
    for _ in 0..rng.random_range(1..5) {
        if data.is_empty() {
            data.push(rng.random());
            continue;
        }
        let at = rng.random_range(0..data.len());
        match rng.random_range(0..5) {
            0 => data[at] ^= 1 << rng.random_range(0..8),
            1 => data.truncate(at),
            2 => {
                let run = rng.random_range(1..16).min(data.len() - at);
                for b in &mut data[at..at + run] {
                    *b = rng.random();
                }
            }
            3 => {
                let other = &seeds[rng.random_range(0..seeds.len())];
                let from = rng.random_range(0..other.len().max(1));
                data.splice(at..at, other[from.min(other.len())..].iter().copied());
            }
            _ => data.insert(at, rng.random()),
        }
    }
    data
}

#[test]
fn every_decoder_survives_random_and_mutated_input() {
    for (name, target) in fuzz_targets::TARGETS {
        let seeds = fuzz_targets::seeds(name);
        assert!(
            !seeds.is_empty() && seeds.iter().all(|s| !s.is_empty()),
            "{name}: no seed"
        );
        for seed in &seeds {
            target(seed);
        }
        let mut rng = StdRng::seed_from_u64(name.len() as u64 * 7919);
        for case in 0..cases() {
            let data = input(&mut rng, &seeds);
            let outcome = std::panic::catch_unwind(|| target(&data));
            assert!(
                outcome.is_ok(),
                "{name} panicked on case {case}: {} bytes {:02x?}",
                data.len(),
                &data[..data.len().min(256)]
            );
        }
    }
}

/// Inputs the long runs found a panic with, kept so it stays fixed.
#[test]
fn inputs_that_once_made_a_target_panic_no_longer_do() {
    let found: &[(&str, &[u8])] = &[
        // A peer's bloom filter with entries and no bits: automerge 0.12
        // divided by zero the next time it generated a message for the peer.
        (
            "sync_message",
            &[
                0x0a, 0x43, 0x00, 0x00, 0x01, 0x00, 0x06, 0x09, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
                0x00, 0xff, 0xff, 0xc4, 0x00, 0x00, 0x00,
            ],
        ),
    ];
    for (name, data) in found {
        let (_, target) = fuzz_targets::TARGETS
            .iter()
            .find(|(n, _)| n == name)
            .expect("a target of that name");
        target(data);
    }
}
