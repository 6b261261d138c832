#!/usr/bin/env bash
# `make up`: a local cluster on this machine with two real nodes (kubelet, containerd, runc, CNI,
# kube-proxy; CoreDNS), the product's images imported into them, and the Helm chart installed
# with `helm install`: the operator, the CSI controller with its sidecars, and on every node the
# node plugin and the engine daemon, as users run them. Ready for `kubectl apply -f examples/`.
# The kubeconfig is written to ./.livedisk/kubeconfig (`source .livedisk/env`).
#
# LIVEDISK_UP_MODE=processes: the fast layout for engine work instead: API server with node
# objects but no kubelet, and the operator and driver as processes on this host (hack/driver.sh).
# LIVEDISK_IMAGE_PROFILE: cargo profile of the image's binaries (default here: dev, already
# built by the workspace build; `release` for what `make images` ships).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export LIVEDISK_STATE_DIR="${LIVEDISK_STATE_DIR:-$ROOT/.livedisk}"
STATE="$LIVEDISK_STATE_DIR"
MODE="${LIVEDISK_UP_MODE:-chart}"
log() { echo "up: $*" >&2; }
[ "$(id -u)" -eq 0 ] || { log "needs root (node namespaces, mounts, loop devices)"; exit 1; }

hack/deps.sh
log "building the livedisk binaries (cargo build --workspace --bins; the first build takes a few minutes)"
cargo build --workspace --bins

if [ "$MODE" = chart ]; then
  export LIVEDISK_IMAGE_PROFILE="${LIVEDISK_IMAGE_PROFILE:-dev}" LIVEDISK_SUBNET="${LIVEDISK_SUBNET:-10.231}"
  # shellcheck source=hack/lib/chart-cluster.sh
  source hack/lib/chart-cluster.sh
  chart_cluster_up
  cat >&2 <<MSG
up: ready: nodes node-a and node-b run the chart (namespace livedisk-system). Logs of the nodes'
    kubelet, containerd and kube-proxy: $STATE/logs/; of livedisk: kubectl -n livedisk-system logs ...
    source $STATE/env          # KUBECONFIG and kubectl on PATH
    kubectl apply -f examples/
    kubectl get livedisk
    make down                  # stops everything
MSG
  exit 0
fi
[ "$MODE" = processes ] || { log "LIVEDISK_UP_MODE is chart (default) or processes, not '$MODE'"; exit 1; }

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
up: ready (processes layout). The operator and the CSI driver run (logs: $STATE/logs/).
    CSI sockets: $STATE/csi/controller.sock, $STATE/csi/node-a.sock, $STATE/csi/node-b.sock
    source $STATE/env          # KUBECONFIG and kubectl on PATH
    kubectl apply -f examples/
    kubectl get livedisk
    make down                  # stops everything
MSG
