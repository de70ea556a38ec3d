#!/usr/bin/env bash
# Makes tests/fixtures/single-node/: the data directory of a single-node deployment (SQLite), as
# the release before PostgreSQL clusters (commit 6ec73bc) left it, for the test of
# `kms-server migrate --from-sqlite` (tests/tests/e2e/migrate.rs). Committed once; kept so that
# anyone can see how it was made, or make another from a later release.
#   git worktree add /tmp/rel 6ec73bc && (cd /tmp/rel && cargo build -p kms-server -p kms-client --bins)
#   scripts/make-single-node-fixture.sh /tmp/rel/target/debug
set -euo pipefail
bin="$(cd "$1" && pwd)"
cd "$(dirname "$0")/.."
out="$(pwd)/tests/fixtures/single-node"
rm -rf "$out" && mkdir -p "$out"
work="$(mktemp -d)"
trap 'kill "$server" 2>/dev/null || true; cd /; rm -rf "$work"' EXIT
"$bin/kms-server" dev --data-dir "$work/d" --data-listen 127.0.0.1:17400 --admin-listen 127.0.0.1:17401 \
    --metrics-listen 127.0.0.1:17402 >"$work/server.log" 2>&1 &
server=$!
for _ in $(seq 100); do grep -q "admin plane" "$work/server.log" && break; sleep 0.2; done
export KMS_ENDPOINT=https://127.0.0.1:17401 KMS_DATA_ENDPOINT=https://127.0.0.1:17400 KMS_PKI="$work/d/pki" KMS_SESSION_FILE="$work/session"
cd "$work" && ln -s d .kms-dev
k() { "$bin/kmsctl" "$@"; }
k login --dev >/dev/null
workload=spiffe://kms.dev/workload/dev
k principal add "$workload" >/dev/null
k principal add spiffe://kms.dev/workload/retired >/dev/null
k principal disable spiffe://kms.dev/workload/retired >/dev/null
k --json key create --alias fixture --description "made by the single-node release" >/dev/null
k grant create --principal "$workload" --key alias/fixture --operations all >/dev/null
k grant create --principal "$workload" --key alias/fixture --operations Decrypt --require app=payroll --expires-in 3650d >/dev/null
k --json key create --alias disabled >/dev/null
k key disable alias/disabled >/dev/null
printf 'auditor passphrase for the fixture\n' >"$work/pass"
k officer add auditor1 --role auditor --passphrase-file "$work/pass" >/dev/null
k review sign-off --note "fixture" >/dev/null
# Blobs under version 1, then a rotation, then blobs under version 2.
vectors=()
for i in 1 2; do
    for j in 1 2; do
        answer="$(k --json data-key generate --key alias/fixture --context app=payroll --context n="$i$j")"
        vectors+=("{\"encryption_context\": {\"app\": \"payroll\", \"n\": \"$i$j\"}, \"answer\": $answer}")
    done
    [ "$i" = 1 ] && k key rotate alias/fixture >/dev/null
done
echo "single-node release fixture: a file encrypted with kmsctl" >"$work/plain.txt"
k encrypt --key alias/fixture --in "$work/plain.txt" --out "$out/fixture.kmse" --context app=payroll >/dev/null
cp "$work/plain.txt" "$out/fixture.txt"
# A backup signs a checkpoint of the audit trail; the shutdown signs another.
k backup create --out "$work/backup.kmsb" >/dev/null || true
kill -TERM "$server" && wait "$server" || true
cp "$work/d/kms.db" "$out/kms.db"
mkdir -p "$out/softhsm" && cp -r "$work/d/softhsm/tokens" "$out/softhsm/" && cp "$work/d/softhsm/user.pin" "$out/softhsm/"
# The development officer's credentials, for the test to log in after the migration.
cp "$work/d/dev-officer.passphrase" "$work/d/dev-officer.totp" "$out/"
printf '{"made_by": "kms-server %s (commit 6ec73bc)", "token_label": "kms-dev", "alias": "alias/fixture", "vectors": [%s]}\n' \
    "$("$bin/kms-server" --version | awk '{print $2}')" "$(IFS=,; echo "${vectors[*]}")" >"$out/golden.json"
echo "wrote $out"
