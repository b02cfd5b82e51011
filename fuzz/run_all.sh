#!/usr/bin/env bash
# Runs every fuzz target for RUNS inputs each (default 10 million) and prints
# one line per target: inputs, time, coverage, and whether it found a crash.
# Needs a nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`).
# Usage: [MAX_LEN=4096] [SANITIZER=none] fuzz/run_all.sh [RUNS] [TARGET...]
# Built without AddressSanitizer by default (SANITIZER=address for it): the
# code the targets reach is safe Rust, and ASAN's bookkeeping was a third of
# each input's time. Panics that automerge raises and the ledger catches are
# counted, not crashes (fuzz_targets/caught_panics.rs); any other panic is.
set -uo pipefail
cd "$(dirname "$0")"
runs=${1:-10000000}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=($(cargo +nightly fuzz list))
mkdir -p logs
for t in "${targets[@]}"; do
  start=$(date +%s)
  cargo +nightly fuzz run -s "${SANITIZER:-none}" "$t" -- -runs="$runs" -max_len="${MAX_LEN:-4096}" -print_final_stats=1 > "logs/$t.log" 2>&1
  rc=$?
  secs=$(( $(date +%s) - start ))
  done_line=$(grep -E '^#[0-9]+.*DONE' "logs/$t.log" | tail -1)
  crash=$(grep -E 'panicked|ERROR: libFuzzer|SUMMARY' "logs/$t.log" | grep -vc '^caught automerge panic')
  caught=$(grep -c '^caught automerge panic' "logs/$t.log")
  echo "$t: rc=$rc ${secs}s ${done_line:-no DONE line} crashes=$crash caught-automerge-panic-lines=$caught"
done
