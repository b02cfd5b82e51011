#!/usr/bin/env bash
# Runs every fuzz target for RUNS inputs each (default 10 million) and prints
# one line per target: inputs, time, coverage, and whether it found a crash.
# Needs a nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`).
# Usage: [MAX_LEN=4096] fuzz/run_all.sh [RUNS] [TARGET...]
set -uo pipefail
cd "$(dirname "$0")"
runs=${1:-10000000}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=($(cargo +nightly fuzz list))
mkdir -p logs
for t in "${targets[@]}"; do
  start=$(date +%s)
  cargo +nightly fuzz run "$t" -- -runs="$runs" -max_len="${MAX_LEN:-4096}" -print_final_stats=1 > "logs/$t.log" 2>&1
  rc=$?
  secs=$(( $(date +%s) - start ))
  done_line=$(grep -E '^#[0-9]+.*DONE' "logs/$t.log" | tail -1)
  crash=$(grep -cE 'panicked|ERROR: libFuzzer|SUMMARY' "logs/$t.log")
  echo "$t: rc=$rc ${secs}s ${done_line:-no DONE line} crashes=$crash"
done
