#!/usr/bin/env bash
# Where the CPU of converging after a partition goes: a flame graph of the
# three nodes while they heal, and the share of each part of the work.
#
#   benches/profile_heal.sh                       # 3 x 50 000 keys, 100 shared
#   benches/profile_heal.sh --keys 10000 --out /tmp/heal
#
# Runs examples/convergence once (three real nodes behind proxies, a
# partition while each allocates --keys keys, then heal), waits until the
# nodes go quiet after allocating, and records them with `perf record
# --call-graph dwarf` for --seconds (default 5: the heal and the
# compensations after it). Writes into --out (default target/profile-heal):
#
#   heal.svg       flame graph of all three nodes (inferno)
#   heal.folded    the folded stacks it is drawn from
#   parts.txt      the share of samples in each part of the work (below)
#
# and prints parts.txt and the convergence example's own figures.
#
# Needs perf (Debian package linux-perf) and inferno (cargo install
# inferno); both are installed if missing (apt-get needs root). Builds the
# release binary and example if missing (--bin overrides the binary).

set -euo pipefail
export LC_ALL=C

REPO=$(cd "$(dirname "$0")/.." && pwd)
KEYS=50000
SHARED=100
SECONDS_RECORDED=5
OUT=$REPO/target/profile-heal
BIN=$REPO/target/release/oncemesh
EXAMPLE=$REPO/target/release/examples/convergence
while (($#)); do
    case $1 in
        --keys) KEYS=$2; shift 2 ;;
        --shared) SHARED=$2; shift 2 ;;
        --seconds) SECONDS_RECORDED=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --bin) BIN=$(cd "$(dirname "$2")" && pwd)/$(basename "$2"); shift 2 ;;
        *) echo "profile_heal: unknown option $1 (see the top of this file)" >&2; exit 2 ;;
    esac
done
say() { echo "profile_heal: $*" >&2; }

if ! command -v perf >/dev/null; then
    say "installing perf (linux-perf)"
    apt-get update -qq && apt-get install -y -qq linux-perf >/dev/null
fi
if ! command -v inferno-flamegraph >/dev/null; then
    say "installing inferno (cargo install inferno)"
    cargo install --quiet --locked inferno
fi
[[ -x $BIN ]] || (cd "$REPO" && cargo build --release --bin oncemesh)
[[ -x $EXAMPLE ]] || (cd "$REPO" && cargo build --release --example convergence)
mkdir -p "$OUT"

"$EXAMPLE" --keys "$KEYS" --shared "$SHARED" --runs 1 --bin "$BIN" >"$OUT/convergence.txt" 2>"$OUT/convergence.err" &
example=$!
trap 'kill $example 2>/dev/null || true' EXIT

pids=""
for _ in $(seq 600); do
    pids=$(pgrep -d' ' -f "^$BIN run" || true)
    [[ $(wc -w <<<"$pids") == 3 ]] && break
    sleep 0.1
done
[[ $(wc -w <<<"$pids") == 3 ]] || { say "the three nodes did not start"; exit 1; }

# CPU ticks of the three nodes; busy while allocating, then quiet until the
# example heals the partition.
ticks() { local p t=0; for p in $pids; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done; echo $t; }
say "nodes up ($pids); waiting for the partition's allocations to finish"
busy="" previous=$(ticks)
while :; do
    sleep 0.3
    now=$(ticks)
    delta=$((now - previous))
    previous=$now
    ((delta > 20)) && busy=1
    [[ -n $busy ]] && ((delta < 5)) && break
done
say "recording the heal for $SECONDS_RECORDED s"
# perf stops early, with a failure status, when the example ends the nodes
# first: what it recorded until then is kept.
perf record -q -F 400 --call-graph dwarf,24000 -p "${pids// /,}" -o "$OUT/perf.data" -- sleep "$SECONDS_RECORDED" >/dev/null 2>&1 || true
[[ -s $OUT/perf.data ]] || { say "perf recorded nothing"; exit 1; }
wait $example || { cat "$OUT/convergence.err" >&2; say "the convergence example failed"; exit 1; }
trap - EXIT

perf script -i "$OUT/perf.data" 2>/dev/null | inferno-collapse-perf >"$OUT/heal.folded"
inferno-flamegraph --minwidth 1 --title "oncemesh: three nodes healing a $KEYS-key partition" <"$OUT/heal.folded" >"$OUT/heal.svg"

# Each sample counts once, for the first part (in this order) found on its
# stack; the order puts the more specific frames first.
awk '
    BEGIN {
        n = split("automerge applying changes|sync_receive::receive;" \
            "parsing records (JSON)|parse_entries;" \
            "key index and clock|Group::insert|Group::contains|Hlc<C>::update|key_index;" \
            "rest of applying|event_loop::apply;" \
            "automerge building changes to send|get_changes_by_hashes;" \
            "encoding sync messages|generate_sync;" \
            "compressing requests (zstd)|compress_request;" \
            "noise and yamux|yamux|noise|chacha;" \
            "request-response and codec|request_response|codec::;" \
            "redb storing chunks|redb::|storage::write_loop;" \
            "compensations|compensation::;" \
            "HTTP (the example polls)|hyper::|axum::|oncemesh::http::", parts, ";")
        for (i = 1; i <= n; i++) {
            split(parts[i], f, "|")
            name[i] = f[1]
            pattern[i] = substr(parts[i], length(f[1]) + 2)
        }
    }
    {
        count = $NF
        total += count
        for (i = 1; i <= n; i++) if ($0 ~ pattern[i]) { share[i] += count; next }
        other += count
    }
    END {
        printf "%-40s %6s\n", "part of the three nodes\047 CPU samples", "share"
        for (i = 1; i <= n; i++) printf "%-40s %5.1f %%\n", name[i], 100 * share[i] / total
        printf "%-40s %5.1f %%\n", "everything else", 100 * other / total
    }' "$OUT/heal.folded" >"$OUT/parts.txt"

cat "$OUT/parts.txt"
grep -E "converged|every conflict|bytes through" "$OUT/convergence.txt" || true
say "flame graph: $OUT/heal.svg"
