#!/usr/bin/env bash
# TESTPLAN R1 soak: SIGKILL under load and restart, 500 times by default (CI runs 20). Each
# iteration checks every acknowledged blob, key and version, the database, the HSM objects, the
# audit chain and the usage counters. About 30 minutes on 2 cores.
# With --cluster: the same across three nodes over PostgreSQL, one random node killed and
# restarted while the others carry the load (CI runs 10; about 4 s an iteration).
#   scripts/soak-kill9.sh [--cluster] [ITERATIONS]
set -euo pipefail
cd "$(dirname "$0")/.."
test='test(kill9_at_random_instants)'
if [ "${1:-}" = "--cluster" ]; then
    test='test(cluster::a_node_killed_at_random_instants)'
    shift
fi
cargo build --workspace --bins
cargo build -p kms-server --features test-hooks --bin kms-server-test-hooks
KMS_KILL9_ITERATIONS="${1:-500}" cargo nextest run -p kms-tests --no-capture -E "$test"
