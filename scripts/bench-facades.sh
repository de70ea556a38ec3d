#!/usr/bin/env bash
# The facades' and the data plane's figures on one dev server (kms-server dev: SoftHSM2, SQLite,
# every call audited durably), release builds: each PHASE runs one load tool against it, in
# order, on the same instance, and prints the tool's table. A phase is `xks:ARGS` (xks-load:
# AWS XKS Encrypt and Decrypt, after the empty calls), `cse:ARGS` (cse-load: Google CSE wrap and
# unwrap), `grpc:ARGS` (kms-load) or `metrics:REGEX` (the server's Prometheus lines that match,
# so far). With BIN=DIR the binaries of DIR are used as they are (to
# compare two builds in alternating runs); otherwise the workspace is built first.
#   scripts/bench-facades.sh "xks:--clients 16 --duration 5" "grpc:--clients 16 --duration 5"
#   scripts/bench-facades.sh "xks:--clients 64 --rate 1800 --duration 10"
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${BIN:-}" ]; then
    cargo build --release -p kms-server -p kms-client -p kms-benches --bins
    BIN="$(pwd)/target/release"
fi
work="$(mktemp -d)"
cd "$work"
"$BIN/kms-server" dev --data-listen 127.0.0.1:17400 --admin-listen 127.0.0.1:17401 --metrics-listen 127.0.0.1:17402 \
    --xks-listen 127.0.0.1:17403 --cse-listen 127.0.0.1:17404 >out.txt 2>err.txt &
server=$!
trap 'kill -INT "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; rm -rf "$work"' EXIT
until grep -q "try:" out.txt 2>/dev/null; do sleep 0.3; done
export KMS_ENDPOINT=https://127.0.0.1:17401 KMS_SESSION_FILE="$work/session"
workload=spiffe://kms.dev/workload/dev
"$BIN/kmsctl" login --dev >/dev/null
"$BIN/kmsctl" key create --alias bench >/dev/null
"$BIN/kmsctl" principal add "$workload" >/dev/null 2>&1 || true
"$BIN/kmsctl" grant create --principal "$workload" --key alias/bench --operations all >/dev/null
"$BIN/kmsctl" xks create bench --region eu-west-3 --xks-url https://127.0.0.1:17403 >xks.json 2>/dev/null
key=$("$BIN/kmsctl" --json xks allow bench --key alias/bench | python3 -c "import json,sys; print(json.load(sys.stdin)['external_key_id'])")
for phase in "$@"; do
    kind="${phase%%:*}" args="${phase#*:}"
    echo "== $kind $args"
    # shellcheck disable=SC2086 # ARGS are words on purpose
    case "$kind" in
        xks) "$BIN/xks-load" --proxy-file xks.json --ca .kms-dev/pki/ca.pem --key "$key" $args | grep -v '^{' ;;
        cse) "$BIN/cse-load" --admin "$KMS_ENDPOINT" --pki .kms-dev/pki --session "$KMS_SESSION_FILE" \
            --kacls-url https://127.0.0.1:17404/v1/cse --key alias/bench $args | grep -v '^{' ;;
        grpc) "$BIN/kms-load" --data-endpoint https://127.0.0.1:17400 --pki .kms-dev/pki --key alias/bench $args | grep -v '^raw HSM' ;;
        metrics) curl -s http://127.0.0.1:17402/metrics | grep -E "$args" || true ;;
        *) echo "unknown phase $kind (xks, cse, grpc or metrics)" >&2; exit 2 ;;
    esac
done
