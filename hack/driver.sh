#!/usr/bin/env bash
# The livedisk CSI driver on the local cluster, laid out as the chart lays it out:
#   * the CSI controller (livedisk-csi controller) with csi-provisioner, csi-snapshotter and
#     csi-resizer, on the host, socket ./.livedisk/csi/controller.sock;
#   * per node (node-a, node-b): an engine daemon and a node plugin in the node's own mount and
#     network namespace with its own pool (hack/engine-ns.sh), socket ./.livedisk/csi/<node>.sock.
#     A node reaches the API server through a unix-socket bridge (socat), as its own loopback
#     has nothing on it; the node is registered as a CSINode the way node-driver-registrar would.
#
#   hack/driver.sh start | stop
# Needs the cluster of hack/cluster.sh (LIVEDISK_STATE_DIR's env) and root.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${LIVEDISK_STATE_DIR:-$ROOT/.livedisk}"
CSI_DIR="$STATE/csi"
PIDS="$STATE/pids"
LOGS="$STATE/logs"
NODES=(node-a node-b)
BIN="$ROOT/target/debug/livedisk-csi"
export LIVEDISK_NODES_DIR="$STATE/nodes"
export LIVEDISK_BIN="$BIN"
log() { echo "driver: $*" >&2; }
die() { echo "driver: ERROR: $*" >&2; exit 1; }

[ -f "$STATE/env" ] || die "no cluster in $STATE: run hack/cluster.sh up first"
# shellcheck disable=SC1091
source "$STATE/env"
APISERVER_PORT="$(sed -n 's#.*server: https://127.0.0.1:\([0-9]*\).*#\1#p' "$KUBECONFIG" | head -n1)"

alive() { [ -f "$PIDS/$1.pid" ] && kill -0 "$(cat "$PIDS/$1.pid")" 2>/dev/null; }

# start_bg NAME CMD...: runs CMD in its own session, logs to $LOGS/NAME.log, pid to $PIDS/NAME.pid.
start_bg() {
  local name="$1"; shift
  alive "$name" && { log "$name already running"; return 0; }
  setsid "$@" >"$LOGS/$name.log" 2>&1 < /dev/null &
  echo $! > "$PIDS/$name.pid"
}

stop_one() {
  local name="$1" pid
  [ -f "$PIDS/$name.pid" ] || return 0
  pid="$(cat "$PIDS/$name.pid")"
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$PIDS/$name.pid"
}

wait_socket() {
  for _ in $(seq 1 150); do [ -S "$1" ] && return 0; sleep 0.1; done
  die "$1 did not appear (logs in $LOGS)"
}

cmd_start() {
  [ "$(id -u)" -eq 0 ] || die "needs root (namespaces, loop devices, mounts)"
  [ -x "$BIN" ] || die "$BIN missing: cargo build -p livedisk-csi"
  command -v socat >/dev/null || die "socat is missing: apt-get install socat"
  mkdir -p "$CSI_DIR" "$PIDS" "$LOGS"

  log "CSIDriver, StorageClass and VolumeSnapshotClass from the chart"
  "$(cd "$ROOT" && hack/helm.sh | tail -n 1)" template livedisk "$ROOT/charts/livedisk" \
    --show-only templates/storage/csidriver.yaml --show-only templates/storage/storageclass.yaml \
    --show-only templates/storage/volumesnapshotclass.yaml | kubectl apply -f - >/dev/null
  kubectl create namespace livedisk-system --dry-run=client -o yaml | kubectl apply -f - >/dev/null

  log "CSI controller and sidecars"
  start_bg csi-controller "$BIN" controller --csi-endpoint "unix://$CSI_DIR/controller.sock"
  wait_socket "$CSI_DIR/controller.sock"
  local common=(--csi-address="$CSI_DIR/controller.sock" --kubeconfig="$KUBECONFIG" --leader-election=false --timeout=150s)
  start_bg csi-provisioner env NAMESPACE=livedisk-system POD_NAME=csi-controller \
    csi-provisioner "${common[@]}" --strict-topology --immediate-topology=false --extra-create-metadata \
    --default-fstype=ext4 --enable-capacity --capacity-ownerref-level=-1 --capacity-poll-interval=15s
  start_bg csi-snapshotter csi-snapshotter "${common[@]}" --extra-create-metadata
  start_bg csi-resizer csi-resizer "${common[@]}"

  local node
  for node in "${NODES[@]}"; do
    log "node $node: engine and node plugin in their own namespaces"
    "$ROOT/hack/engine-ns.sh" start "$node" >/dev/null
    local root="$LIVEDISK_NODES_DIR/$node" bridge="$LIVEDISK_NODES_DIR/$node/apiserver.sock"
    rm -f "$bridge"
    start_bg "apiserver-bridge-$node" socat "UNIX-LISTEN:$bridge,fork,mode=600" "TCP:127.0.0.1:$APISERVER_PORT"
    wait_socket "$bridge"
    start_bg "node-bridge-$node" "$ROOT/hack/engine-ns.sh" exec "$node" -- \
      socat "TCP-LISTEN:$APISERVER_PORT,bind=127.0.0.1,fork,reuseaddr" "UNIX-CONNECT:$bridge"
    start_bg "csi-node-$node" "$ROOT/hack/engine-ns.sh" exec "$node" -- env KUBECONFIG="$KUBECONFIG" RUST_LOG=info \
      "$BIN" node --csi-endpoint "unix://$CSI_DIR/$node.sock" --node-name "$node" \
      --pool-dir "$root/pool" --engine-socket-dir "$root/run"
    wait_socket "$CSI_DIR/$node.sock"
    kubectl apply -f - >/dev/null <<YAML
apiVersion: storage.k8s.io/v1
kind: CSINode
metadata: {name: $node}
spec:
  drivers:
  - name: csi.livedisk.io
    nodeID: $node
    topologyKeys: [topology.livedisk.io/node]
YAML
  done
  for name in csi-controller csi-provisioner csi-snapshotter csi-resizer; do
    alive "$name" || { tail -n 20 "$LOGS/$name.log" >&2; die "$name exited"; }
  done
  log "driver running: sockets in $CSI_DIR"
}

cmd_stop() {
  local node
  for node in "${NODES[@]}"; do
    stop_one "csi-node-$node"
    stop_one "node-bridge-$node"
    stop_one "apiserver-bridge-$node"
    if [ -d "$LIVEDISK_NODES_DIR/$node/ns" ]; then
      # Release what the node plugin left attached inside its namespace (mounts, loop devices,
      # nbdfuse), then stop its engine.
      "$ROOT/hack/engine-ns.sh" exec "$node" -- "$ROOT/hack/node-release.sh" "$STATE" 2>/dev/null || true
      "$ROOT/hack/engine-ns.sh" stop "$node" >/dev/null 2>&1 || true
    fi
  done
  for name in csi-resizer csi-snapshotter csi-provisioner csi-controller; do stop_one "$name"; done
  rm -f "$CSI_DIR"/*.sock
  log "driver stopped"
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  *) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
