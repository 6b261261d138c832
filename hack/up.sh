#!/usr/bin/env bash
# `make up`: the local cluster on loopback, the livedisk CRDs, and the operator, ready for
# `kubectl apply -f examples/`. The kubeconfig is written to ./.livedisk/kubeconfig.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export LIVEDISK_STATE_DIR="${LIVEDISK_STATE_DIR:-$ROOT/.livedisk}"
STATE="$LIVEDISK_STATE_DIR"
log() { echo "up: $*" >&2; }

hack/deps.sh
log "building the livedisk binaries (cargo build --workspace --bins; the first build takes a few minutes)"
cargo build --workspace --bins
hack/cluster.sh up >/dev/null
# shellcheck disable=SC1091
source "$STATE/env"
log "installing the livedisk CRDs"
kubectl apply --server-side --force-conflicts --field-manager=livedisk-up -f crds/generated/ >/dev/null
kubectl wait --for condition=Established --timeout=60s -f crds/generated/ >/dev/null
log "the chart's ServiceAccounts and RBAC; a kubeconfig per component (no component runs as admin)"
hack/accounts.sh apply

mkdir -p "$STATE/pids" "$STATE/logs"
pidfile="$STATE/pids/livedisk-operator.pid"
if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
  log "operator already running (pid $(cat "$pidfile")); restarting it with the fresh build"
  kill "$(cat "$pidfile")"; sleep 1
fi
KUBECONFIG="$STATE/accounts/operator.kubeconfig" setsid target/debug/livedisk-operator >"$STATE/logs/livedisk-operator.log" 2>&1 < /dev/null &
echo $! > "$pidfile"
for _ in $(seq 1 60); do
  grep -q "all livedisk CRDs are established" "$STATE/logs/livedisk-operator.log" && break
  kill -0 "$(cat "$pidfile")" 2>/dev/null || { tail -20 "$STATE/logs/livedisk-operator.log" >&2; log "operator exited"; exit 1; }
  sleep 0.5
done
log "starting the CSI driver: controller with its sidecars, two nodes (engine + node plugin each)"
hack/driver.sh start
cat >&2 <<MSG
up: ready. The operator and the CSI driver run (logs: $STATE/logs/).
    CSI sockets: $STATE/csi/controller.sock, $STATE/csi/node-a.sock, $STATE/csi/node-b.sock
    source $STATE/env          # KUBECONFIG and kubectl on PATH
    kubectl apply -f examples/
    kubectl get livedisk
    make down                  # stops everything
MSG
