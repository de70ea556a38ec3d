#!/usr/bin/env bash
# The cluster's performance figures (issue: several nodes over PostgreSQL), on this machine, in
# release builds: the mixed load (kms-load --clients 16) and the open loop at 1,800 per s
# against one node over SQLite (kms-server dev), one node over PostgreSQL, and three nodes over
# PostgreSQL (the load spread over them). Prints kms-load's table of each run.
# With BIN=DIR the binaries of DIR are used as they are (to compare two builds); else the
# release build is made first. ONLY="sqlite|pg1|pg3 ..." runs those set-ups alone.
#   scripts/bench-cluster.sh [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-3}"
only="${ONLY:-sqlite pg1 pg3}"
if [ -z "${BIN:-}" ]; then
    cargo build --release --workspace --bins
    BIN="$(pwd)/target/release"
fi
bin="$BIN"
work="$(mktemp -d)"
pids=()
trap 'for p in "${pids[@]}"; do kill -INT "$p" 2>/dev/null || true; done; sleep 3; rm -rf "$work"' EXIT
workload=spiffe://kms.dev/workload/dev

# Makes alias/bench granted to the development workload, through the nodes in $KMS_ENDPOINT.
setup() {
    "$bin/kmsctl" login --dev >/dev/null
    "$bin/kmsctl" key create --alias bench >/dev/null
    "$bin/kmsctl" principal add "$workload" >/dev/null
    "$bin/kmsctl" grant create --principal "$workload" --key alias/bench --operations all >/dev/null
}

load() {
    local what="$1" endpoints="$2" pki="$3"
    shift 3
    for i in $(seq "$runs"); do
        echo "== $what, run $i: kms-load $*"
        "$bin/kms-load" --data-endpoint "$endpoints" --pki "$pki" --key alias/bench "$@" | grep -v "^raw HSM"
    done
}

both() {
    load "$1, mixed" "$2" "$3" --clients 16 --duration 10
    load "$1, open loop" "$2" "$3" --rate 1800 --duration 20
}

# One node over SQLite.
if [[ " $only " == *" sqlite "* ]]; then
mkdir -p "$work/sqlite" && cd "$work/sqlite"
"$bin/kms-server" dev --data-listen 127.0.0.1:17400 --admin-listen 127.0.0.1:17401 --metrics-listen 127.0.0.1:17402 --xks-listen 127.0.0.1:17403 >server.out 2>server.log &
pids+=($!)
until grep -q "admin plane" server.out; do sleep 0.2; done
KMS_ENDPOINT=https://127.0.0.1:17401 KMS_SESSION_FILE="$work/sqlite/session" setup
both "one node, SQLite" https://127.0.0.1:17400 "$work/sqlite/.kms-dev/pki"
kill -INT "${pids[-1]}" && wait "${pids[-1]}" || true
fi

# One node, then three, over PostgreSQL (cargo xtask cluster's set-up).
for nodes in 1 3; do
    [[ " $only " == *" pg$nodes "* ]] || continue
    dir="$work/pg$nodes"
    "$bin/local-cluster" "$dir" "$nodes" >"$work/cluster$nodes.out" &
    pids+=($!)
    until grep -q "Ctrl-C" "$work/cluster$nodes.out"; do sleep 0.5; done
    admin=$(seq -s, -f "https://127.0.0.1:74%g1" 1 "$nodes")
    data=$(seq -s, -f "https://127.0.0.1:74%g0" 1 "$nodes")
    KMS_DEV_DIR="$dir" KMS_ENDPOINT="$admin" KMS_SESSION_FILE="$dir/session" setup
    both "$nodes node(s), PostgreSQL" "$data" "$dir/pki"
    pkill -INT -f "$dir/node" || true
    kill -INT "${pids[-1]}" && wait "${pids[-1]}" || true
done
