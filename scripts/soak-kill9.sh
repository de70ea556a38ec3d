#!/usr/bin/env bash
# TESTPLAN R1 soak: SIGKILL under load and restart, 500 times by default (CI runs 20). Each
# iteration checks every acknowledged blob, key and version, the database, the HSM objects, the
# audit chain and the usage counters. About 30 minutes on 2 cores.
#   scripts/soak-kill9.sh [ITERATIONS]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --workspace --bins
KMS_KILL9_ITERATIONS="${1:-500}" cargo nextest run -p kms-tests --no-capture -E 'test(kill9_at_random_instants)'
