#!/usr/bin/env bash
# TESTPLAN R12 soak: 32 clients for 30 minutes (by default) against a development server of its
# own, in a directory of its own; fails if any call failed. The report (throughput, latency
# percentiles, the server's RSS and CPU) is printed and kept as target/soak-load.json; compare the
# server's RSS at the start and the end of the run to see that it stays flat.
#   scripts/soak-load.sh [MINUTES] [CLIENTS]
set -euo pipefail
cd "$(dirname "$0")/.."
minutes="${1:-30}"
clients="${2:-32}"
cargo build --release --workspace --bins
dir=$(mktemp -d)
target/release/kms-server dev --data-dir "$dir/.kms-dev" --data-listen 127.0.0.1:17500 \
    --admin-listen 127.0.0.1:17501 --metrics-listen 127.0.0.1:17502 >"$dir/server.out" 2>"$dir/server.log" &
server=$!
trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null || true' EXIT
until grep -q "admin plane" "$dir/server.out"; do
    kill -0 "$server" || { cat "$dir/server.log"; exit 1; }
    sleep 0.2
done
kmsctl() { (cd "$dir" && "$OLDPWD/target/release/kmsctl" --endpoint https://127.0.0.1:17501 \
    --data-endpoint https://127.0.0.1:17500 --session-file "$dir/session" "$@"); }
workload=spiffe://kms.dev/workload/dev
kmsctl login --dev >/dev/null
kmsctl key create --alias soak >/dev/null
kmsctl principal add "$workload" >/dev/null
kmsctl grant create --principal "$workload" --key alias/soak --operations all >/dev/null
(cd "$dir" && "$OLDPWD/target/release/kms-load" --data-endpoint https://127.0.0.1:17500 --key alias/soak \
    --clients "$clients" --duration $((minutes * 60)) --server-pid "$server" --json) | tee target/soak-load.json
python3 - target/soak-load.json <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
errors = report.get("errors", {})
if errors:
    sys.exit(f"soak: calls failed: {errors}")
print("soak: no call failed")
PY
