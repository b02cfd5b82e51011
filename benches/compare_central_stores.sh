#!/usr/bin/env bash
# Compares oncemesh with the two central stores people would put in its
# place, on the same workload: allocate a fresh idempotency key, durably
# (fsync before the answer), as fast as C concurrent clients can.
#
#   oncemesh    POST /v1/allocations with a fresh key, over HTTP to one node
#               without peers (wrk with benches/wrk_allocate.lua, closed
#               loop); a fresh node and data dir per run.
#   oncemesh-3  the same load against node 0 of three nodes on loopback, each
#               connected to the other two and replicating to them (the
#               project's target: >= 3x PostgreSQL's allocations/s in the same
#               run). Per run: three fresh data dirs, peer ids from
#               `oncemesh id`, nodes started with --listen and a --peer for
#               each other node, load once every node reports 2 connected
#               peers. After the load the script waits (up to 30 s) until
#               nodes 1 and 2 hold as many keys as node 0 and reports that
#               catch-up time.
#   postgresql  INSERT INTO tokens(key) VALUES ('pg-' || :random) ON CONFLICT
#               DO NOTHING, pgbench -M prepared over TCP, default durable
#               config (fsync=on, synchronous_commit=on); TRUNCATE and
#               CHECKPOINT before each run.
#   postgresql-sync2
#               the same load against a primary with two synchronous
#               standbys on this machine, the replicating central store to
#               set oncemesh-3 against (the project's target: >= 3x its
#               allocations/s in the same run): each standby made with
#               pg_basebackup -R and streaming from the primary,
#               synchronous_standby_names = 'FIRST 2 (s1, s2)', so a commit
#               answers once both standbys have flushed it; the script
#               checks pg_stat_replication shows both as sync before the
#               first run.
#   redis       SET key:<random> v NX, redis-benchmark, AOF with
#               appendfsync always (an fsync before each batch of replies),
#               no RDB snapshots; FLUSHALL before each run.
#
# Each system is driven by a load generator written in C: pgbench (-j 2,
# two threads), redis-benchmark (one thread), and wrk (-t 2, two threads)
# for oncemesh's HTTP API.
# They share the machine's 2 cores with the server, so a heavier client
# would take CPU from the server it measures: examples/loadgen (Rust,
# reqwest) spends about twice wrk's CPU per request, and is used only for
# what wrk cannot do (--client loadgen, or LOADGEN_ARGS set): a fixed
# offered rate without coordinated omission, replays and retries.
#
# All servers and their load generators run on this machine, in this one
# invocation, interleaved run by run (oncemesh, oncemesh-3, postgresql,
# redis, oncemesh, ...), so they share the same cores, disk and background
# noise. The load generators share the CPU with the server they drive (and
# for oncemesh-3 and postgresql-sync2, with the two followers). Figures are throughput (answered
# allocations/s), p99 latency and the machine's CPU time per answered
# allocation (for oncemesh also each node's share), which bounds what the
# system could answer on these cores; the table gives every run, the median of
# each system and each oncemesh row's median as a ratio of the central
# stores'. Ports on 127.0.0.1: oncemesh HTTP 7700 (oncemesh-3: 7700-7702,
# libp2p 7800-7802), throwaway PostgreSQL 5433 (postgresql-sync2: primary
# 5434, standbys 5435 and 5436) and Redis 6380 instances that live in a
# temporary directory removed on exit.
#
# Run from anywhere (as root: PostgreSQL runs as user postgres, missing
# Debian packages are installed with apt-get):
#
#   benches/compare_central_stores.sh
#   CLIENTS=50 SECONDS=10 RUNS=3 benches/compare_central_stores.sh   # the defaults
#   benches/compare_central_stores.sh --systems oncemesh-3,postgresql
#
# Env LOADGEN_ARGS drives oncemesh with examples/loadgen instead of wrk and
# adds these arguments to every run, e.g. LOADGEN_ARGS='--rate 4200'
# --systems oncemesh-3 for the latency of a node at a fixed offered load (no
# coordinated omission: see examples/loadgen.rs). The summary of a closed-loop
# run with oncemesh prints the command for the p99 at half its peak.
#
# Options: --clients N, --seconds N, --runs N (same as the env variables),
# --systems LIST (env SYSTEMS; comma-separated, in run order, from
# oncemesh,oncemesh-3,postgresql,postgresql-sync2,redis; default all five), --client
# wrk|loadgen (env CLIENT: oncemesh's load generator; default wrk, or loadgen
# when LOADGEN_ARGS is set), --replicating
# (env REPLICATING=1: the replicating node only, same as --systems
# oncemesh-3,postgresql,postgresql-sync2,redis), --node-bin PATH, --loadgen-bin PATH (default
# target/release/oncemesh and target/release/examples/loadgen, built with
# cargo if missing).
# Progress goes to stderr, the table and the closing summary to stdout.

# SECONDS is bash's own clock (seconds since the shell started): read the
# caller's value before it moves. Unset, it reads 0 here.
duration_env=$SECONDS

set -euo pipefail
export LC_ALL=C # decimal points in printf, awk and $EPOCHREALTIME

ALL_SYSTEMS=(oncemesh oncemesh-3 postgresql postgresql-sync2 redis)
CLIENTS=${CLIENTS:-50}
DURATION=$duration_env
[[ $DURATION == 0 ]] && DURATION=10
RUNS=${RUNS:-3}
SYSTEMS_ARG=${SYSTEMS:-}
[[ ${REPLICATING:-0} == 1 && -z $SYSTEMS_ARG ]] && SYSTEMS_ARG=oncemesh-3,postgresql,postgresql-sync2,redis
NODE_BIN=""
LOADGEN_BIN=""
CLIENT=${CLIENT:-}
PG_PORT=5433
PG2_PORT=5434 # postgresql-sync2's primary; its standbys s1, s2 on +1, +2
REDIS_PORT=6380
NODE_HTTP_PORT=7700 # node i of oncemesh-3: +i
NODE_P2P_PORT=7800  # node i of oncemesh-3: +i
CLUSTER_SIZE=3
CATCH_UP_TIMEOUT=30

die() { echo "compare_central_stores: $*" >&2; exit 1; }
say() { echo "$*" >&2; }

abspath() { [[ $1 == /* ]] && echo "$1" || echo "$PWD/$1"; }
while (($#)); do
    case $1 in
        --clients) CLIENTS=${2:?}; shift 2 ;;
        --seconds) DURATION=${2:?}; shift 2 ;;
        --runs) RUNS=${2:?}; shift 2 ;;
        --systems) SYSTEMS_ARG=${2:?}; shift 2 ;;
        --replicating) SYSTEMS_ARG=oncemesh-3,postgresql,postgresql-sync2,redis; shift ;;
        --client) CLIENT=${2:?}; shift 2 ;;
        --node-bin) NODE_BIN=$(abspath "${2:?}"); shift 2 ;;
        --loadgen-bin) LOADGEN_BIN=$(abspath "${2:?}"); shift 2 ;;
        -h | --help) sed -n '2,/^$/s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done
for v in CLIENTS DURATION RUNS; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer, got '${!v}'"
done
[[ -z $CLIENT ]] && { [[ -n ${LOADGEN_ARGS:-} ]] && CLIENT=loadgen || CLIENT=wrk; }
[[ $CLIENT == wrk || $CLIENT == loadgen ]] || die "--client must be wrk or loadgen, got '$CLIENT'"
[[ $CLIENT == wrk && -n ${LOADGEN_ARGS:-} ]] && die "LOADGEN_ARGS needs --client loadgen"
SYSTEMS=()
if [[ -n $SYSTEMS_ARG ]]; then
    IFS=, read -r -a requested <<<"$SYSTEMS_ARG"
    for s in "${requested[@]}"; do
        [[ " ${ALL_SYSTEMS[*]} " == *" $s "* ]] || die "unknown system '$s' (choose from ${ALL_SYSTEMS[*]})"
        [[ " ${SYSTEMS[*]} " == *" $s "* ]] || SYSTEMS+=("$s")
    done
    ((${#SYSTEMS[@]})) || die "--systems is empty"
else
    SYSTEMS=("${ALL_SYSTEMS[@]}")
fi
selected() { [[ " ${SYSTEMS[*]} " == *" $1 "* ]]; }
selected_pg() { selected postgresql || selected postgresql-sync2; }

cd "$(dirname "$0")/.."
REPO=$PWD

# ---------------------------------------------------------------- tools

pg_bindir() {
    local d
    for d in $(printf "%s\n" /usr/lib/postgresql/*/bin | sort -t/ -k5,5n -r); do
        [[ -x $d/initdb && -x $d/pg_ctl && -x $d/pgbench && -x $d/psql && -x $d/pg_basebackup ]] && { echo "$d"; return 0; }
    done
    return 1
}

missing=()
if selected_pg; then
    pg_bindir >/dev/null || missing+=(postgresql)
fi
if selected redis; then
    command -v redis-server >/dev/null || missing+=(redis-server)
    command -v redis-benchmark >/dev/null && command -v redis-cli >/dev/null || missing+=(redis-tools)
fi
if [[ $CLIENT == wrk ]] && { selected oncemesh || selected oncemesh-3; }; then
    command -v wrk >/dev/null || missing+=(wrk)
fi
if ((${#missing[@]})); then
    ((EUID == 0)) || die "missing ${missing[*]}: run as root to install them, or install them first"
    say "installing missing Debian packages: ${missing[*]} (apt-get update && apt-get install -y ${missing[*]})"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
fi
if selected_pg; then
    PGBIN=$(pg_bindir) || die "no PostgreSQL server binaries under /usr/lib/postgresql/*/bin"
fi
command -v curl >/dev/null || die "curl is needed"

NODE_BIN=${NODE_BIN:-$REPO/target/release/oncemesh}
LOADGEN_BIN=${LOADGEN_BIN:-$REPO/target/release/examples/loadgen}
if selected oncemesh || selected oncemesh-3; then
    needed=("$NODE_BIN")
    [[ $CLIENT == loadgen ]] && needed+=("$LOADGEN_BIN")
    for bin in "${needed[@]}"; do
        [[ -x $bin ]] && continue
        [[ $bin == "$REPO"/target/* ]] || die "$bin is missing"
        say "building: cargo build --release --bin oncemesh --example loadgen"
        cargo build --release --bin oncemesh --example loadgen >&2
        break
    done
fi

# PostgreSQL refuses to run as root: as root it runs as user postgres.
if selected_pg; then
    if ((EUID == 0)); then
        id postgres >/dev/null 2>&1 || die "no user 'postgres' (it comes with the postgresql package)"
        PGSUPER=postgres
        as_pg() { runuser -u postgres -- "$@"; }
    else
        PGSUPER=$(id -un)
        as_pg() { "$@"; }
    fi
fi

ports=()
selected postgresql && ports+=("$PG_PORT")
selected postgresql-sync2 && ports+=("$PG2_PORT" "$((PG2_PORT + 1))" "$((PG2_PORT + 2))")
selected redis && ports+=("$REDIS_PORT")
selected oncemesh && ports+=("$NODE_HTTP_PORT")
if selected oncemesh-3; then
    for ((i = 0; i < CLUSTER_SIZE; i++)); do
        ports+=("$((NODE_HTTP_PORT + i))" "$((NODE_P2P_PORT + i))")
    done
fi
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for port in $(printf '%s\n' "${ports[@]}" | sort -nu); do
    listening "$port" && die "something already listens on 127.0.0.1:$port"
done

# ---------------------------------------------------------------- cleanup

WORK=$(mktemp -d)
chmod 755 "$WORK"
NODE_PIDS=()
REDIS_PID=""
PG_STARTED=() # data dirs of the PostgreSQL servers started
stop_nodes() {
    local pid
    for pid in "${NODE_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${NODE_PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    NODE_PIDS=()
}
cleanup() {
    set +e
    stop_nodes
    if [[ -n $REDIS_PID ]]; then
        kill "$REDIS_PID" 2>/dev/null
        wait "$REDIS_PID" 2>/dev/null
    fi
    local data
    for data in "${PG_STARTED[@]}"; do
        as_pg "$PGBIN/pg_ctl" -D "$data" -m immediate -w stop >/dev/null 2>&1
    done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- helpers

# Thousands separators: 21192.4 -> 21,192
fmt() { printf '%.0f' "$1" | sed ':a;s/\B[0-9]\{3\}\>/,&/;ta'; }
median() { printf '%s\n' "$@" | sort -g | awk '{v[NR]=$1} END {print (NR%2) ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2}'; }
# p-th percentile (nearest rank) of the numbers on stdin
percentile() { sort -n | awk -v p="$1" '{v[NR]=$1} END {r=int(p/100*NR); if (r<p/100*NR) r++; if (r<1) r=1; print v[r]}'; }
# A field of one-line JSON by name, wherever it is nested (the names looked up
# here occur once in their document: "connected", "keys", ...).
json_field() { sed -n "s/.*\"$1\":\([^,}]*\).*/\1/p" <<<"$2"; }
ms() { [[ $1 =~ ^[0-9.eE+-]+$ ]] && printf '%.2f' "$1" || echo "-"; }
now() { echo "$EPOCHREALTIME"; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN {printf "%.1f", b - a}'; }

# ---------------------------------------------------------------- PostgreSQL

psql_q() { # port, psql arguments
    local port=$1
    shift
    "$PGBIN/psql" -h 127.0.0.1 -p "$port" -U "$PGSUPER" -X -q -v ON_ERROR_STOP=1 "$@"
}
pg_start() { # data dir, port (its log is DIR.log, its socket dir DIR's parent)
    PG_STARTED+=("$1")
    as_pg "$PGBIN/pg_ctl" -D "$1" -l "$1.log" -w -t 60 \
        -o "-p $2 -k $(dirname "$1") -c listen_addresses=127.0.0.1 -c max_connections=$max_conn" start >/dev/null ||
        { cat "$1.log" >&2; die "PostgreSQL in $1 did not start"; }
}
pg_init() { # data dir, port: a fresh server, started
    mkdir -p "$(dirname "$1")"
    chown "$PGSUPER" "$(dirname "$1")" 2>/dev/null || true
    as_pg "$PGBIN/initdb" -D "$1" -A trust -U "$PGSUPER" >"$1.initdb.log" 2>&1 ||
        { cat "$1.initdb.log" >&2; die "initdb failed"; }
    pg_start "$1" "$2"
}
pg_bench_db() { # port: the database and table the load goes to
    psql_q "$1" -d postgres -c 'CREATE DATABASE bench'
    psql_q "$1" -d bench -c 'CREATE TABLE tokens(key text PRIMARY KEY)'
}
# Waits until the primary on this port streams to this many synchronous standbys.
pg_wait_sync() { # port, standbys
    local n
    for _ in $(seq 600); do
        n=$(psql_q "$1" -d postgres -At -c "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming' AND sync_state = 'sync'")
        ((n == $2)) && return 0
        sleep 0.1
    done
    psql_q "$1" -d postgres -c 'SELECT application_name, state, sync_state FROM pg_stat_replication' >&2
    die "the primary on port $1 has $n synchronous standbys after 60 s, wanted $2"
}

if selected_pg; then
    max_conn=$((CLIENTS + 10 > 100 ? CLIENTS + 10 : 100))
    cat >"$WORK/insert.sql" <<'EOF'
\set k random(1, 9000000000000000000)
INSERT INTO tokens(key) VALUES ('pg-' || :k) ON CONFLICT DO NOTHING;
EOF
fi
if selected postgresql; then
    say "starting PostgreSQL ($PGBIN) on 127.0.0.1:$PG_PORT in $WORK/pg"
    pg_init "$WORK/pg/data" "$PG_PORT"
    pg_bench_db "$PG_PORT"
fi
if selected postgresql-sync2; then
    say "starting PostgreSQL with two synchronous standbys on 127.0.0.1:$PG2_PORT-$((PG2_PORT + 2)) in $WORK/pg2"
    pg_init "$WORK/pg2/primary" "$PG2_PORT"
    for i in 1 2; do
        as_pg "$PGBIN/pg_basebackup" -h 127.0.0.1 -p "$PG2_PORT" -U "$PGSUPER" -D "$WORK/pg2/s$i" -R -X stream \
            >"$WORK/pg2/s$i.basebackup.log" 2>&1 || { cat "$WORK/pg2/s$i.basebackup.log" >&2; die "pg_basebackup failed"; }
        # The last setting in the file wins: the standby's name, which the primary's list refers to.
        echo "primary_conninfo = 'host=127.0.0.1 port=$PG2_PORT user=$PGSUPER application_name=s$i'" |
            as_pg tee -a "$WORK/pg2/s$i/postgresql.auto.conf" >/dev/null
        pg_start "$WORK/pg2/s$i" $((PG2_PORT + i))
    done
    psql_q "$PG2_PORT" -d postgres -c "ALTER SYSTEM SET synchronous_standby_names = 'FIRST 2 (s1, s2)'" -c 'SELECT pg_reload_conf()' >/dev/null
    pg_wait_sync "$PG2_PORT" 2
    pg_bench_db "$PG2_PORT"
    pg2_settings=$(psql_q "$PG2_PORT" -d bench -At -c "SELECT string_agg(name || '=''' || setting || '''', ' ' ORDER BY name) FROM pg_settings
        WHERE name IN ('synchronous_commit', 'synchronous_standby_names')")
fi
if selected_pg; then
    pg_port=$PG_PORT
    selected postgresql || pg_port=$PG2_PORT
    pg_settings=$(psql_q "$pg_port" -d bench -At -c "SELECT string_agg(name || '=' || setting, ' ' ORDER BY name) FROM pg_settings
        WHERE name IN ('fsync', 'synchronous_commit', 'wal_sync_method', 'full_page_writes')")
    pg_version=$(psql_q "$pg_port" -d bench -At -c 'SHOW server_version')
fi

# ---------------------------------------------------------------- Redis

# redis-benchmark has no time limit, only a request count: each run is sized
# from a ~1 s probe just before it (the first probe from a calibration here).
redis_bench() { # N -> CSV on stdout
    redis-benchmark -h 127.0.0.1 -p "$REDIS_PORT" -c "$CLIENTS" -n "$1" -r 1000000000 --csv \
        SET key:__rand_int__ v NX 2>/dev/null
}
csv_col() { # CSV text, column name -> value of the last row
    awk -F, -v col="$2" '{gsub(/"/, "")} NR == 1 {for (i = 1; i <= NF; i++) if ($i == col) c = i} END {if (c) print $c}' <<<"$1"
}
# Empty the store and its AOF (like TRUNCATE + CHECKPOINT for PostgreSQL), so
# no run pays for an earlier run's data or triggers a rewrite because of it.
redis_reset() {
    redis-cli -p "$REDIS_PORT" flushall >/dev/null
    redis-cli -p "$REDIS_PORT" bgrewriteaof >/dev/null 2>&1 || true
    for _ in $(seq 600); do
        redis-cli -p "$REDIS_PORT" info persistence | grep -q '^aof_rewrite_in_progress:0' &&
            redis-cli -p "$REDIS_PORT" info persistence | grep -q '^aof_rewrite_scheduled:0' && return 0
        sleep 0.1
    done
    die "Redis's AOF rewrite did not finish"
}
requests_for() { # rate, seconds -> request count (at least 100 per client)
    awk -v r="$1" -v t="$2" -v c="$CLIENTS" 'BEGIN {n = int(r * t); if (n < c * 100) n = c * 100; print n}'
}

if selected redis; then
    say "starting Redis on 127.0.0.1:$REDIS_PORT in $WORK/redis"
    mkdir -p "$WORK/redis"
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$WORK/redis" \
        --appendonly yes --appendfsync always --save '' \
        --daemonize no --logfile "$WORK/redis/log" >/dev/null 2>&1 &
    REDIS_PID=$!
    for _ in $(seq 100); do
        [[ $(redis-cli -p "$REDIS_PORT" ping 2>/dev/null) == PONG ]] && break
        kill -0 "$REDIS_PID" 2>/dev/null || { cat "$WORK/redis/log" >&2; die "redis-server exited"; }
        sleep 0.1
    done
    [[ $(redis-cli -p "$REDIS_PORT" ping 2>/dev/null) == PONG ]] || die "redis-server did not answer"
    redis_version=$(redis-server --version | sed -n 's/.* v=\([^ ]*\).*/\1/p')
    redis_settings=$(redis-cli -p "$REDIS_PORT" config get appendfsync | paste -sd= -)
    say "calibrating redis-benchmark's request count"
    redis_reset
    redis_rate=$(csv_col "$(redis_bench $((CLIENTS * 100)))" rps)
    [[ -n $redis_rate ]] || die "could not read redis-benchmark's CSV output"
fi

# ---------------------------------------------------------------- the runs

# Per system: space-separated figures, one per run.
declare -A TPUT P99 CPU
CPU_LEADER="" CPU_FOLLOWERS="" # oncemesh-3: node 0's and nodes 1-2's CPU per allocation, µs

# CPU accounting: every system's figure comes with the CPU the whole machine
# spent per answered allocation while it ran (server, followers, load
# generator and any noise), from /proc/stat; for oncemesh also each node's
# own share, from /proc/<pid>/stat. 2 cores divided by that cost is the
# most the system could answer on this machine.
CLK_TCK=$(getconf CLK_TCK)
busy_ticks() { awk '/^cpu / {print $2 + $3 + $4 + $7 + $8 + $9}' /proc/stat; }
pid_ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
us_per() { awk -v t="$1" -v n="$2" -v hz="$CLK_TCK" 'BEGIN {printf "%.1f", (n > 0) ? t / hz * 1e6 / n : 0}'; }
CATCH_UP=() # oncemesh-3: followers' catch-up after each run's load, seconds or "-"

health() { curl -sf --max-time 2 "http://127.0.0.1:$1/v1/health"; }

start_node() { # index (for the log name), then `oncemesh run` arguments
    local log=$WORK/node$1.log
    shift
    "$NODE_BIN" run "$@" >"$log" 2>&1 &
    NODE_PIDS+=("$!")
}

# Waits until node i (HTTP port, pid) answers /v1/health with at least the
# given number of connected peers.
wait_node() { # http port, pid, log, peers wanted
    local h c
    for _ in $(seq 300); do
        if h=$(health "$1"); then
            c=$(json_field connected "$h")
            ((${c:-0} >= $4)) && return 0
        fi
        kill -0 "$2" 2>/dev/null || { cat "$3" >&2; die "the node on port $1 exited"; }
        sleep 0.1
    done
    [[ -n ${h:-} ]] || die "the node on port $1 did not answer /v1/health in 30 s"
    die "the node on port $1 has ${c:-0} connected peers after 30 s, wanted $4: $h"
}

# Drives the node on this HTTP port with $CLIENT for $DURATION s; sets
# R_RPS (answered allocations/s), R_P50 and R_P99 (ms), R_ERRORS (failed
# requests), R_CREATED (new allocations answered) and R_ERROR_TEXT.
drive_node() { # sets R_* and, in ticks over the load, R_MACHINE_TICKS and R_NODE_TICKS
    local machine i node=()
    machine=$(busy_ticks)
    for i in "${!NODE_PIDS[@]}"; do node[i]=$(pid_ticks "${NODE_PIDS[i]}"); done
    if [[ $CLIENT == wrk ]]; then drive_with_wrk "$1"; else drive_with_loadgen "$1"; fi
    R_MACHINE_TICKS=$(($(busy_ticks) - machine))
    R_NODE_TICKS=()
    for i in "${!NODE_PIDS[@]}"; do R_NODE_TICKS[i]=$(($(pid_ticks "${NODE_PIDS[i]}") - node[i])); done
}

drive_with_loadgen() {
    local out last extra
    read -r -a extra <<<"${LOADGEN_ARGS:-}"
    out=$("$LOADGEN_BIN" --node "http://127.0.0.1:$1" --clients "$CLIENTS" --seconds "$DURATION" --json "${extra[@]}" 2>"$WORK/loadgen.err") ||
        { cat "$WORK/loadgen.err" >&2; die "loadgen failed"; }
    last=$(tail -n 1 <<<"$out")
    R_RPS=$(json_field allocations_per_s "$last")
    R_P50=$(json_field p50_ms "$last")
    R_P99=$(json_field p99_ms "$last")
    R_ERRORS=$(json_field errors "$last")
    R_CREATED=$(json_field created "$last")
    R_ERROR_TEXT=$(grep -m1 'error:' <<<"$out" || true)
}

# wrk's latencies come with a unit: 850.00us, 1.83ms, 1.20s -> ms
wrk_ms() { awk -v v="$1" 'BEGIN {n = v + 0; if (v ~ /us$/) n /= 1000; else if (v ~ /ms$/) n += 0; else if (v ~ /s$/) n *= 1000; print n}'; }

drive_with_wrk() {
    local out requests non2xx socket
    out=$(wrk -t 2 -c "$CLIENTS" -d "${DURATION}s" --latency -s "$REPO/benches/wrk_allocate.lua" "http://127.0.0.1:$1" 2>&1) ||
        { echo "$out" >&2; die "wrk failed"; }
    requests=$(sed -n 's/^ *\([0-9]*\) requests in .*/\1/p' <<<"$out")
    [[ -n $requests ]] || { echo "$out" >&2; die "could not read wrk's request count"; }
    non2xx=$(sed -n 's/^ *Non-2xx or 3xx responses: *\([0-9]*\).*/\1/p' <<<"$out")
    socket=$(sed -n 's/^ *Socket errors: *\(.*\)/\1/p' <<<"$out")
    R_ERRORS=${non2xx:-0}
    R_CREATED=$((requests - R_ERRORS))
    # Requests/sec counts every answer: only the 2xx ones are allocations.
    R_RPS=$(awk -v n="$R_CREATED" -v r="$requests" -v rps="$(sed -n 's/^Requests\/sec: *\([0-9.]*\).*/\1/p' <<<"$out")" 'BEGIN {print rps * n / r}')
    R_P50=$(wrk_ms "$(awk '$1 == "50%" {print $2}' <<<"$out")")
    R_P99=$(wrk_ms "$(awk '$1 == "99%" {print $2}' <<<"$out")")
    R_ERROR_TEXT=""
    [[ -z $socket ]] || R_ERROR_TEXT="socket errors: $socket"
    ((R_ERRORS == 0)) || R_ERROR_TEXT+="${R_ERROR_TEXT:+; }$R_ERRORS answers were not 2xx"
    [[ -z $R_ERROR_TEXT ]] || R_ERRORS=$((R_ERRORS > 0 ? R_ERRORS : 1))
}

record_node() { # system name
    local answered followers=0 i
    TPUT[$1]+="$R_RPS "
    P99[$1]+="$R_P99 "
    answered=$(awk -v r="$R_RPS" -v d="$DURATION" 'BEGIN {print r * d}')
    CPU[$1]+="$(us_per "$R_MACHINE_TICKS" "$answered") "
    say "  $1 ($CLIENT): $(fmt "$R_RPS")/s, p50 $(ms "$R_P50") ms, p99 $(ms "$R_P99") ms, errors $R_ERRORS"
    if [[ $1 == oncemesh-3 ]]; then
        for ((i = 1; i < ${#R_NODE_TICKS[@]}; i++)); do followers=$((followers + R_NODE_TICKS[i])); done
        CPU_LEADER+="$(us_per "${R_NODE_TICKS[0]}" "$answered") "
        CPU_FOLLOWERS+="$(us_per "$followers" "$answered") "
        say "  CPU per allocation: machine $(us_per "$R_MACHINE_TICKS" "$answered") µs, node 0 $(us_per "${R_NODE_TICKS[0]}" "$answered") µs, nodes 1-$((${#R_NODE_TICKS[@]} - 1)) $(us_per "$followers" "$answered") µs"
    else
        say "  CPU per allocation: machine $(us_per "$R_MACHINE_TICKS" "$answered") µs, node $(us_per "${R_NODE_TICKS[0]}" "$answered") µs"
    fi
    [[ $R_ERRORS == 0 ]] || say "  WARNING: failed requests: $R_ERROR_TEXT"
}

run_oncemesh() {
    local data
    data=$(mktemp -d -p "$WORK" node.XXXXXX)
    start_node 0 --data-dir "$data" --http "127.0.0.1:$NODE_HTTP_PORT"
    wait_node "$NODE_HTTP_PORT" "${NODE_PIDS[0]}" "$WORK/node0.log" 0
    drive_node "$NODE_HTTP_PORT"
    stop_nodes
    rm -rf "$data"
    record_node oncemesh
}

run_oncemesh3() {
    local i j t0 created h k0 k caught data=() ids=() args=()
    for ((i = 0; i < CLUSTER_SIZE; i++)); do
        data+=("$(mktemp -d -p "$WORK" node3-$i.XXXXXX)")
        ids+=("$("$NODE_BIN" id --data-dir "${data[i]}" | tail -n 1)")
        [[ ${ids[i]} =~ ^[1-9A-HJ-NP-Za-km-z]{40,}$ ]] || die "'oncemesh id' printed '${ids[i]}', not a peer id"
    done
    t0=$(now)
    for ((i = 0; i < CLUSTER_SIZE; i++)); do
        args=(--region "r$i" --data-dir "${data[i]}" --http "127.0.0.1:$((NODE_HTTP_PORT + i))"
            --listen "/ip4/127.0.0.1/tcp/$((NODE_P2P_PORT + i))")
        for ((j = 0; j < CLUSTER_SIZE; j++)); do
            ((j == i)) || args+=(--peer "/ip4/127.0.0.1/tcp/$((NODE_P2P_PORT + j))/p2p/${ids[j]}")
        done
        start_node "3-$i" "${args[@]}"
    done
    for ((i = 0; i < CLUSTER_SIZE; i++)); do
        wait_node $((NODE_HTTP_PORT + i)) "${NODE_PIDS[i]}" "$WORK/node3-$i.log" $((CLUSTER_SIZE - 1))
    done
    say "  $CLUSTER_SIZE nodes up, each with $((CLUSTER_SIZE - 1)) peers connected ($(since "$t0") s); load on node 0"
    drive_node "$NODE_HTTP_PORT"
    t0=$(now)
    created=$R_CREATED
    caught=""
    while :; do
        h=$(health "$NODE_HTTP_PORT") && k0=$(json_field keys "$h") || k0=""
        if [[ -n $k0 ]] && ((k0 >= created)); then
            caught=1
            for ((i = 1; i < CLUSTER_SIZE; i++)); do
                h=$(health $((NODE_HTTP_PORT + i))) && k=$(json_field keys "$h") || k=""
                [[ $k == "$k0" ]] || { caught=""; break; }
            done
        fi
        [[ -n $caught ]] && break
        awk -v a="$t0" -v b="$(now)" -v m="$CATCH_UP_TIMEOUT" 'BEGIN {exit !(b - a > m)}' && break
        sleep 0.1
    done
    record_node oncemesh-3
    if [[ -n $caught ]]; then
        CATCH_UP+=("$(since "$t0")")
        say "  followers caught up ${CATCH_UP[-1]} s after the load ($k0 keys on every node, $created allocations answered)"
    else
        CATCH_UP+=("-")
        local counts=""
        for ((i = 0; i < CLUSTER_SIZE; i++)); do
            h=$(health $((NODE_HTTP_PORT + i))) && counts+=" node $i: $(json_field keys "$h") keys," || counts+=" node $i: no answer,"
        done
        say "  WARNING: followers did not catch up within $CATCH_UP_TIMEOUT s after the load ($created allocations answered;${counts%,})"
    fi
    stop_nodes
    rm -rf "${data[@]}"
}

run_postgresql() { # system name, port of its primary
    local out tps avg failed machine
    psql_q "$2" -d bench -c 'TRUNCATE tokens' -c 'CHECKPOINT'
    [[ $1 == postgresql-sync2 ]] && pg_wait_sync "$2" 2
    rm -f "$WORK"/txlog*
    machine=$(busy_ticks)
    out=$(cd "$WORK" && "$PGBIN/pgbench" -h 127.0.0.1 -p "$2" -U "$PGSUPER" -n -M prepared \
        -c "$CLIENTS" -j 2 -T "$DURATION" -l --log-prefix="$WORK/txlog" -f "$WORK/insert.sql" bench 2>&1) ||
        { echo "$out" >&2; die "pgbench failed"; }
    tps=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' <<<"$out" | tail -n 1)
    avg=$(sed -n 's/^latency average = \([0-9.]*\) ms.*/\1/p' <<<"$out")
    failed=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' <<<"$out")
    [[ -n $tps ]] || { echo "$out" >&2; die "could not read pgbench's tps"; }
    machine=$(($(busy_ticks) - machine))
    TPUT[$1]+="$tps "
    CPU[$1]+="$(us_per "$machine" "$(awk -v r="$tps" -v d="$DURATION" 'BEGIN {print r * d}')") "
    # column 3 of pgbench's per-transaction log: latency in microseconds
    P99[$1]+="$(cat "$WORK"/txlog* | awk '{print $3 / 1000}' | percentile 99) "
    rm -f "$WORK"/txlog*
    say "  $1: $(fmt "$tps")/s, latency average $(ms "$avg") ms, p99 $(ms "$(awk '{print $NF}' <<<"${P99[$1]}")") ms, failed ${failed:-0}, machine CPU per allocation $(awk '{print $NF}' <<<"${CPU[$1]}") µs"
}

run_redis() {
    local n csv rps p99 machine
    redis_reset
    rps=$(csv_col "$(redis_bench "$(requests_for "$redis_rate" 1)")" rps)
    [[ -n $rps ]] && redis_rate=$rps
    redis_reset
    n=$(requests_for "$redis_rate" "$DURATION")
    machine=$(busy_ticks)
    csv=$(redis_bench "$n")
    CPU[redis]+="$(us_per $(($(busy_ticks) - machine)) "$n") "
    rps=$(csv_col "$csv" rps)
    [[ -n $rps ]] || { echo "$csv" >&2; die "could not read redis-benchmark's rps"; }
    redis_rate=$rps
    p99=$(csv_col "$csv" p99_latency_ms)
    TPUT[redis]+="$rps "
    P99[redis]+="${p99:--} "
    say "  redis: $(fmt "$rps")/s over $n requests ($(awk -v n="$n" -v r="$rps" 'BEGIN {printf "%.1f", n / r}') s), avg $(ms "$(csv_col "$csv" avg_latency_ms)") ms, p99 $(ms "$p99") ms"
}

say "$CLIENTS clients, $DURATION s per run, $RUNS runs of each of ${SYSTEMS[*]}, interleaved"
for ((r = 1; r <= RUNS; r++)); do
    for s in "${SYSTEMS[@]}"; do
        say "run $r/$RUNS: $s ..."
        case $s in
            oncemesh) run_oncemesh ;;
            oncemesh-3) run_oncemesh3 ;;
            postgresql) run_postgresql postgresql "$PG_PORT" ;;
            postgresql-sync2) run_postgresql postgresql-sync2 "$PG2_PORT" ;;
            redis) run_redis ;;
        esac
    done
done

# ---------------------------------------------------------------- report

declare -A MED
for s in "${SYSTEMS[@]}"; do
    read -r -a v <<<"${TPUT[$s]}"
    MED[$s]=$(median "${v[@]}")
done
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {r = a / b; printf (r < 10 ? "%.2f" : "%.0f"), r}'; }

row() { # name, median, values...
    local name=$1 med=$2 v
    shift 2
    printf '%-16s' "$name"
    for v in "$@"; do printf ' %10s' "$v"; done
    printf ' %10s\n' "$med"
}
header() {
    local i
    printf '%-16s' "$1"
    for ((i = 1; i <= RUNS; i++)); do printf ' %10s' "run $i"; done
    printf ' %10s\n' "${2:-median}"
}
fmt_all() { local v; for v in "$@"; do fmt "$v"; echo; done; }
ms_all() { local v; for v in "$@"; do ms "$v"; echo; done; }
numbers() { local v; for v in "$@"; do [[ $v =~ ^[0-9.eE+-]+$ ]] && echo "$v"; done; }

echo
echo "oncemesh vs central stores: $CLIENTS clients, $DURATION s per run, $RUNS runs each, interleaved, same machine ($(nproc) cores)"
if selected oncemesh || selected oncemesh-3; then
    echo "  oncemesh $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$REPO" diff --quiet HEAD -- src 2>/dev/null || echo ' (src/ modified)'), fresh nodes and data dirs per run"
fi
if selected oncemesh || selected oncemesh-3; then
    echo "  oncemesh load generator: $CLIENT${LOADGEN_ARGS:+ $LOADGEN_ARGS}"
fi
selected oncemesh && echo "  oncemesh:   one node, no peers"
selected oncemesh-3 && echo "  oncemesh-3: load on node 0 of $CLUSTER_SIZE nodes on loopback, each connected to the other $((CLUSTER_SIZE - 1)) and replicating"
selected_pg && echo "  PostgreSQL $pg_version: $pg_settings"
selected postgresql-sync2 && echo "  postgresql-sync2: a primary and two standbys streaming from it on this machine, $pg2_settings"
selected redis && echo "  Redis $redis_version: appendonly=yes $redis_settings save=''"
echo
header "allocs/s"
for s in "${SYSTEMS[@]}"; do
    read -r -a v <<<"${TPUT[$s]}"
    mapfile -t a < <(fmt_all "${v[@]}")
    row "$s" "$(fmt "${MED[$s]}")" "${a[@]}"
done
echo
header "p99 ms"
for s in "${SYSTEMS[@]}"; do
    read -r -a v <<<"${P99[$s]}"
    mapfile -t a < <(ms_all "${v[@]}")
    mapfile -t n < <(numbers "${v[@]}")
    if ((${#n[@]})); then med=$(ms "$(median "${n[@]}")"); else med=-; fi
    row "$s" "$med" "${a[@]}"
done
echo
header "CPU µs/alloc"
for s in "${SYSTEMS[@]}"; do
    read -r -a v <<<"${CPU[$s]}"
    row "$s" "$(median "${v[@]}")" "${v[@]}"
done
if selected oncemesh-3; then
    read -r -a v <<<"$CPU_LEADER"
    row "  node 0" "$(median "${v[@]}")" "${v[@]}"
    read -r -a v <<<"$CPU_FOLLOWERS"
    row "  nodes 1-2" "$(median "${v[@]}")" "${v[@]}"
fi
echo "  (CPU time of the whole machine while the load ran, per answered allocation: server, followers, load"
echo "   generator and noise; $(nproc) cores / that = the most this machine could answer)"
if selected oncemesh-3; then
    echo
    header "catch-up s" max
    mapfile -t n < <(numbers "${CATCH_UP[@]}")
    if ((${#n[@]} == ${#CATCH_UP[@]})); then
        med=$(printf '%s\n' "${n[@]}" | sort -g | tail -n 1)
    else
        med="> $CATCH_UP_TIMEOUT"
    fi
    row "oncemesh-3" "$med" "${CATCH_UP[@]}"
    echo "  (time from the end of the load until nodes 1 and 2 held as many keys as node 0; - = not within $CATCH_UP_TIMEOUT s)"
fi
echo
CENTRAL=(postgresql postgresql-sync2 redis)
for s in oncemesh oncemesh-3; do
    selected "$s" || continue
    for c in "${CENTRAL[@]}"; do
        selected "$c" || continue
        printf '%-44s %sx\n' "$s median / $c median:" "$(ratio "${MED[$s]}" "${MED[$c]}")"
    done
done
# The targets: each oncemesh system against the central store it replaces.
declare -A BASELINE=([oncemesh]=postgresql [oncemesh-3]=postgresql-sync2)
declare -A TARGET=([oncemesh]=2 [oncemesh-3]=3)
for s in oncemesh oncemesh-3; do
    selected "$s" || continue
    line="$s $(fmt "${MED[$s]}")/s"
    sep=" ="
    for c in "${CENTRAL[@]}"; do
        selected "$c" || continue
        line+="$sep $(ratio "${MED[$s]}" "${MED[$c]}")x $c ($(fmt "${MED[$c]}")/s)"
        sep=","
    done
    c=${BASELINE[$s]}
    if selected "$c"; then
        if awk -v a="${MED[$s]}" -v b="${MED[$c]}" -v t="${TARGET[$s]}" 'BEGIN {exit !(a >= t * b)}'; then
            line+="; target >= ${TARGET[$s]}x $c: met"
        else
            line+="; target >= ${TARGET[$s]}x $c: NOT met"
        fi
    fi
    echo "$line"
done
for s in "${SYSTEMS[@]}"; do
    read -r -a v <<<"${CPU[$s]}"
    printf '%-44s %s µs machine CPU per allocation: at most %s/s on %s cores\n' "$s CPU budget:" "$(median "${v[@]}")" \
        "$(fmt "$(awk -v us="$(median "${v[@]}")" -v c="$(nproc)" 'BEGIN {print (us > 0) ? c * 1e6 / us : 0}')")" "$(nproc)"
done
if selected oncemesh && [[ -z ${LOADGEN_ARGS:-} ]]; then
    half=$(awk -v r="${MED[oncemesh]}" 'BEGIN {printf "%.0f", r / 2}')
    echo "p99 at half the single node's peak (target <= 5 ms): LOADGEN_ARGS='--rate $half' $0 --systems oncemesh --runs $RUNS"
fi
