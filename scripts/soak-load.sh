#!/usr/bin/env bash
# TESTPLAN R12 soak: 32 clients for 30 minutes (by default) of the mixed load (70% Decrypt, 20%
# GenerateDataKey, 10% ReEncrypt) against a release server of its own, while an officer rotates
# the key every 30 s and disables and enables another key. Fails if any call of the load failed,
# if the server's RSS grew by 10% or more after the first minute's warm-up, or if its open file
# descriptors grew. The load's report is kept as target/soak-load.json.
#   scripts/soak-load.sh [MINUTES] [CLIENTS]   (MINUTES at least 2: the first is warm-up)
set -euo pipefail
cd "$(dirname "$0")/.."
minutes="${1:-30}"
clients="${2:-32}"
cargo build --release --workspace --bins
dir=$(mktemp -d)
target/release/kms-server dev --data-dir "$dir/.kms-dev" --data-listen 127.0.0.1:17500 \
    --admin-listen 127.0.0.1:17501 --metrics-listen 127.0.0.1:17502 --xks-listen 127.0.0.1:17503 >"$dir/server.out" 2>"$dir/server.log" &
server=$!
# The server's database grows by ~200 MB a minute of load: the directory goes with the run.
trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null || true; rm -rf "$dir"' EXIT
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
kmsctl key create --alias other >/dev/null
rss() { awk '/VmRSS/ {print $2}' "/proc/$server/status"; }
fds() { ls "/proc/$server/fd" | wc -l; }
# The officer's loop: rotate every 30 s, disable and enable the other key every 5 s.
(
    n=0
    while kill -0 "$server" 2>/dev/null; do
        sleep 5
        kmsctl key disable alias/other >/dev/null && kmsctl key enable alias/other >/dev/null
        n=$((n + 1))
        if [ $((n % 6)) -eq 0 ]; then kmsctl key rotate alias/soak >/dev/null; fi
    done
) &
officer=$!
trap 'kill "$officer" 2>/dev/null; kill "$server" 2>/dev/null; wait "$server" 2>/dev/null || true; rm -rf "$dir"' EXIT
(cd "$dir" && "$OLDPWD/target/release/kms-load" --data-endpoint https://127.0.0.1:17500 --key alias/soak \
    --clients "$clients" --duration $((minutes * 60)) --server-pid "$server" --json) >target/soak-load.json &
load=$!
sleep 60
rss_start=$(rss) fds_start=$(fds)
wait "$load"
rss_end=$(rss) fds_end=$(fds)
cat target/soak-load.json
echo "soak: RSS ${rss_start} KiB after warm-up, ${rss_end} KiB at the end; file descriptors ${fds_start} -> ${fds_end}"
python3 - target/soak-load.json "$rss_start" "$rss_end" "$fds_start" "$fds_end" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
rss_start, rss_end, fds_start, fds_end = map(int, sys.argv[2:])
if report.get("errors"):
    sys.exit(f"soak: calls failed: {report['errors']}")
if rss_end >= rss_start * 1.1:
    sys.exit(f"soak: RSS grew from {rss_start} to {rss_end} KiB")
if fds_end > fds_start + 4:
    sys.exit(f"soak: file descriptors grew from {fds_start} to {fds_end}")
print("soak: no call failed, RSS and file descriptors flat")
PY
