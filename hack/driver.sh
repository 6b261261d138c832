#!/usr/bin/env bash
# The livedisk CSI driver on the local cluster, laid out as the chart lays it out:
#   * the CSI controller (livedisk-csi controller) with csi-provisioner, csi-snapshotter and
#     csi-resizer, on the host, socket ./.livedisk/csi/controller.sock;
#   * per node (node-a, node-b): an engine daemon and a node plugin in the node's own mount and
#     network namespace with its own pool (hack/engine-ns.sh), socket ./.livedisk/csi/<node>.sock.
#     The node plugin is restarted when it exits non-zero (hack/restart-on-failure.sh), as the
#     chart's DaemonSet restarts it.
#     Every component acts under its chart ServiceAccount (kubeconfigs from hack/accounts.sh):
#     the controller and its sidecars as the controller pod's account, node plugins as the node's.
#     A node reaches the API server through a unix-socket bridge (socat), as its own loopback
#     has nothing on it; the node is registered as a CSINode the way node-driver-registrar would.
#   * every server's HTTPS endpoint (/healthz, /readyz, /metrics): the controller's on
#     127.0.0.1:$LIVEDISK_CONTROLLER_METRICS_PORT (default: the snapshot-metadata HTTP port + 1)
#     with a certificate of the driver CA, each node plugin's on its link address
#     $SUBNET.<i>.2:$LIVEDISK_NODE_METRICS_PORT (default 9090), self-signed; listed in
#     ./.livedisk/csi/metrics-endpoints for tests that scrape them.
#
#   hack/driver.sh start | stop
# Needs the cluster of hack/cluster.sh (LIVEDISK_STATE_DIR's env) and root. LIVEDISK_CSI_BIN
# picks the livedisk-csi binary (default target/debug/livedisk-csi; hack/bench.sh runs release).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${LIVEDISK_STATE_DIR:-$ROOT/.livedisk}"
CSI_DIR="$STATE/csi"
PIDS="$STATE/pids"
LOGS="$STATE/logs"
NODES=(node-a node-b)
BIN="${LIVEDISK_CSI_BIN:-$ROOT/target/debug/livedisk-csi}"
export LIVEDISK_NODES_DIR="$STATE/nodes"
export LIVEDISK_BIN="$BIN"
log() { echo "driver: $*" >&2; }
die() { echo "driver: ERROR: $*" >&2; exit 1; }

# Stopping needs no cluster (it may already be gone); starting does.
if [ -f "$STATE/env" ]; then
  # shellcheck disable=SC1091
  source "$STATE/env"
elif [ "${1:-}" = start ]; then
  die "no cluster in $STATE: run hack/cluster.sh up first"
fi
SNAPSHOT_METADATA_PORT="${LIVEDISK_SNAPSHOT_METADATA_PORT:-7443}"
SNAPSHOT_METADATA_HTTP_PORT="${LIVEDISK_SNAPSHOT_METADATA_HTTP_PORT:-7480}"
AUDIENCE=livedisk-snapshot-metadata
# Derived from a port each cluster already sets apart, so `make up`'s and `make test`'s
# controllers (both on the host's loopback) do not collide.
CONTROLLER_METRICS_PORT="${LIVEDISK_CONTROLLER_METRICS_PORT:-$((SNAPSHOT_METADATA_HTTP_PORT + 1))}"
# Inside each node's own network namespace: the same port everywhere.
NODE_METRICS_PORT="${LIVEDISK_NODE_METRICS_PORT:-9090}"
# Host-side interface names and the /16 the node links use: distinct for `make test`'s cluster so
# that it can run beside the one of `make up`.
LINK_PREFIX="${LIVEDISK_LINK_PREFIX:-ld}"
SUBNET="${LIVEDISK_SUBNET:-10.231}"
PKI="$STATE/driver-pki"
APISERVER_PORT="$(sed -n 's#.*server: https://127.0.0.1:\([0-9]*\).*#\1#p' "${KUBECONFIG:-/dev/null}" | head -n1)"

alive() { [ -f "$PIDS/$1.pid" ] && kill -0 "$(cat "$PIDS/$1.pid")" 2>/dev/null; }

# start_bg NAME CMD...: runs CMD in its own session, logs to $LOGS/NAME.log, pid to $PIDS/NAME.pid.
start_bg() {
  local name="$1"; shift
  alive "$name" && { log "$name already running"; return 0; }
  setsid "$@" >"$LOGS/$name.log" 2>&1 < /dev/null &
  echo $! > "$PIDS/$name.pid"
}

# group_running PGID: a process of the group still runs. Zombies do not count: an orphan is
# reaped by PID 1, which here takes about 2 s each, and a stop would wait that long for nothing.
group_running() {
  ps -e -o pgid=,stat= | awk -v g="$1" '$1 == g && $2 !~ /^Z/ { found = 1 } END { exit !found }'
}

stop_one() {
  local name="$1" pid
  [ -f "$PIDS/$name.pid" ] || return 0
  pid="$(cat "$PIDS/$name.pid")"
  # start_bg made each process the leader of its own group: stop the whole group, so wrappers
  # (engine-ns.sh exec, env) and what they run go together.
  if kill -0 "$pid" 2>/dev/null; then
    kill -- "-$pid" 2>/dev/null || kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do group_running "$pid" || break; sleep 0.1; done
    kill -9 -- "-$pid" 2>/dev/null || true
  fi
  rm -f "$PIDS/$name.pid"
}

wait_socket() {
  for _ in $(seq 1 150); do [ -S "$1" ] && return 0; sleep 0.1; done
  die "$1 did not appear (logs in $LOGS)"
}

# issue NAME CN SAN EKU: a key and a certificate signed by the driver CA, in $PKI/NAME/ with ca.crt.
issue() {
  local name="$1" cn="$2" san="$3" dir="$PKI/$1"
  mkdir -p "$dir"
  [ -f "$dir/tls.crt" ] && return 0
  openssl req -new -newkey rsa:2048 -nodes -keyout "$dir/tls.key" -subj "/CN=$cn" -out "$dir/tls.csr" 2>/dev/null
  printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth,clientAuth\nkeyUsage=digitalSignature,keyEncipherment\n' "$san" > "$dir/ext"
  openssl x509 -req -in "$dir/tls.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" -CAcreateserial \
    -days 30 -extfile "$dir/ext" -out "$dir/tls.crt" 2>/dev/null
  cp "$PKI/ca.crt" "$dir/ca.crt"
  chmod 600 "$dir/tls.key"
}

# The driver's own CA: mutual TLS between the controller and the nodes' changed-block service,
# and the serving certificate of the csi-snapshot-metadata sidecar.
make_pki() {
  mkdir -p "$PKI"; chmod 700 "$PKI"
  if [ ! -f "$PKI/ca.crt" ]; then
    openssl req -x509 -new -newkey rsa:2048 -nodes -keyout "$PKI/ca.key" -subj "/CN=livedisk-driver-ca" \
      -days 30 -out "$PKI/ca.crt" 2>/dev/null
  fi
  issue node-tls livedisk-node "DNS:livedisk-node"
  issue controller-tls livedisk-csi-controller "DNS:livedisk-csi-controller"
  issue sidecar-tls livedisk-snapshot-metadata "DNS:localhost,IP:127.0.0.1"
  issue controller-metrics-tls livedisk-csi-controller "DNS:localhost,IP:127.0.0.1"
}

# link_node NAME INDEX: a veth pair between the host and the node's network namespace, so the
# controller reaches the node's private service over a real network hop ($SUBNET.INDEX.0/30,
# addresses of this project's own test hosts), and the nodes reach each other through the host.
link_node() {
  local node="$1" i="$2" ns="$LIVEDISK_NODES_DIR/$1/ns/net" host_if="$LINK_PREFIX-$1"
  if ! nsenter --net="$ns" ip link show eth0 >/dev/null 2>&1; then
    # A host end without its node end is left from an interrupted run: replace it.
    ip link del "$host_if" 2>/dev/null || true
    nsenter --net="$ns" ip link add eth0 type veth peer name "$host_if" netns 1
    ip addr add "$SUBNET.$i.1/30" dev "$host_if"
    ip link set "$host_if" up
    nsenter --net="$ns" ip addr add "$SUBNET.$i.2/30" dev eth0
    nsenter --net="$ns" ip link set eth0 up
  fi
  # Node to node (remote attach: one node's engine dials another's export front) through the
  # host: forwarding on these links only, the host's other interfaces keep their setting.
  sysctl -qw "net.ipv4.conf.$host_if.forwarding=1"
  nsenter --net="$ns" ip route replace "$SUBNET.0.0/16" via "$SUBNET.$i.1" dev eth0
}

cmd_start() {
  [ "$(id -u)" -eq 0 ] || die "needs root (namespaces, loop devices, mounts)"
  [ -x "$BIN" ] || die "$BIN missing: cargo build -p livedisk-csi"
  command -v socat >/dev/null || die "socat is missing: apt-get install socat"
  mkdir -p "$CSI_DIR" "$PIDS" "$LOGS"

  # The chart's RBAC (metrics review grants included) is applied by hack/accounts.sh.
  log "CSIDriver, StorageClass, VolumeSnapshotClass and VolumeGroupSnapshotClass from the chart"
  "$(cd "$ROOT" && hack/helm.sh | tail -n 1)" template livedisk "$ROOT/charts/livedisk" \
    --namespace livedisk-system --set groupSnapshot.enabled=true \
    --show-only templates/storage/csidriver.yaml --show-only templates/storage/storageclass.yaml \
    --show-only templates/storage/volumesnapshotclass.yaml \
    --show-only templates/storage/volumegroupsnapshotclass.yaml | kubectl apply -f - >/dev/null
  kubectl create namespace livedisk-system --dry-run=client -o yaml | kubectl apply -f - >/dev/null

  local accounts="$STATE/accounts" account
  for account in csi-controller node; do
    [ -f "$accounts/$account.kubeconfig" ] || die "$accounts/$account.kubeconfig missing: run hack/accounts.sh apply"
  done
  make_pki
  log "CSI controller and sidecars (account: csi-controller)"
  start_bg csi-controller env KUBECONFIG="$accounts/csi-controller.kubeconfig" "$BIN" controller --csi-endpoint "unix://$CSI_DIR/controller.sock" \
    --node-tls-dir "$PKI/controller-tls" \
    --metrics-addr "127.0.0.1:$CONTROLLER_METRICS_PORT" --metrics-tls-dir "$PKI/controller-metrics-tls"
  # name, address, server name, CA file ("-": self-signed, not verifiable).
  printf 'controller 127.0.0.1:%s 127.0.0.1 %s\n' "$CONTROLLER_METRICS_PORT" "$PKI/ca.crt" > "$CSI_DIR/metrics-endpoints"
  wait_socket "$CSI_DIR/controller.sock"
  # Leader election on, as the chart runs them (its Leases are part of what the RBAC grants).
  local common=(--csi-address="$CSI_DIR/controller.sock" --kubeconfig="$accounts/csi-controller.kubeconfig"
    --leader-election --leader-election-namespace=livedisk-system --timeout=150s)
  # Each sidecar also gets KUBECONFIG in its environment: csi-provisioner prefers the variable to
  # its --kubeconfig flag, and would otherwise act as the cluster admin of this shell.
  local as_controller=(env KUBECONFIG="$accounts/csi-controller.kubeconfig")
  start_bg csi-provisioner "${as_controller[@]}" NAMESPACE=livedisk-system POD_NAME=csi-controller \
    csi-provisioner "${common[@]}" --strict-topology --immediate-topology=false --extra-create-metadata \
    --default-fstype=ext4 --enable-capacity --capacity-ownerref-level=-1 --capacity-poll-interval=15s
  # Group snapshots on, as the chart runs it with groupSnapshot.enabled (the cluster serves the
  # groupsnapshot CRDs).
  start_bg csi-snapshotter "${as_controller[@]}" csi-snapshotter "${common[@]}" --extra-create-metadata \
    --feature-gates=CSIVolumeGroupSnapshot=true
  start_bg csi-resizer "${as_controller[@]}" csi-resizer "${common[@]}"
  start_bg csi-snapshot-metadata "${as_controller[@]}" csi-snapshot-metadata --csi-address="$CSI_DIR/controller.sock" \
    --kubeconfig="$accounts/csi-controller.kubeconfig" --port="$SNAPSHOT_METADATA_PORT" --audience="$AUDIENCE" \
    --tls-cert="$PKI/sidecar-tls/tls.crt" --tls-key="$PKI/sidecar-tls/tls.key" \
    --http-endpoint="127.0.0.1:$SNAPSHOT_METADATA_HTTP_PORT"
  kubectl apply -f - >/dev/null <<YAML
apiVersion: cbt.storage.k8s.io/v1beta1
kind: SnapshotMetadataService
metadata: {name: csi.livedisk.io}
spec:
  address: 127.0.0.1:$SNAPSHOT_METADATA_PORT
  audience: $AUDIENCE
  caCert: $(base64 -w0 "$PKI/ca.crt")
YAML

  local node index=0
  for node in "${NODES[@]}"; do
    index=$((index + 1))
    log "node $node: engine and node plugin in their own namespaces"
    "$ROOT/hack/engine-ns.sh" start "$node" >/dev/null
    link_node "$node" "$index"
    local root="$LIVEDISK_NODES_DIR/$node" bridge="$LIVEDISK_NODES_DIR/$node/apiserver.sock"
    rm -f "$bridge"
    start_bg "apiserver-bridge-$node" socat "UNIX-LISTEN:$bridge,fork,mode=600" "TCP:127.0.0.1:$APISERVER_PORT"
    wait_socket "$bridge"
    start_bg "node-bridge-$node" "$ROOT/hack/engine-ns.sh" exec "$node" -- \
      socat "TCP-LISTEN:$APISERVER_PORT,bind=127.0.0.1,fork,reuseaddr" "UNIX-CONNECT:$bridge"
    # Restarted whenever it exits non-zero, as the DaemonSet restarts it: it does so when its engine
    # daemon stays away longer than LIVEDISK_ENGINE_RECONNECT_SECONDS (default 30).
    start_bg "csi-node-$node" "$ROOT/hack/restart-on-failure.sh" \
      "$ROOT/hack/engine-ns.sh" exec "$node" -- env KUBECONFIG="$accounts/node.kubeconfig" RUST_LOG=info \
      LIVEDISK_ENGINE_RECONNECT_SECONDS="${LIVEDISK_ENGINE_RECONNECT_SECONDS:-30}" \
      "$BIN" node --csi-endpoint "unix://$CSI_DIR/$node.sock" --node-name "$node" \
      --pool-dir "$root/pool" --engine-socket-dir "$root/run" \
      --metadata-listen "$SUBNET.$index.2:9443" --metadata-advertise "https://$SUBNET.$index.2:9443" \
      --node-tls-dir "$PKI/node-tls" --metrics-addr "$SUBNET.$index.2:$NODE_METRICS_PORT" \
      --export-listen "$SUBNET.$index.2"
    printf '%s %s.%s.2:%s %s.%s.2 -\n' "$node" "$SUBNET" "$index" "$NODE_METRICS_PORT" "$SUBNET" "$index" \
      >> "$CSI_DIR/metrics-endpoints"
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
  for name in csi-controller csi-provisioner csi-snapshotter csi-resizer csi-snapshot-metadata; do
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
      "$ROOT/hack/engine-ns.sh" exec "$node" -- "$ROOT/hack/node-release.sh" \
        "$STATE/kubelet/$node" "$LIVEDISK_NODES_DIR/$node/run/attach" 2>/dev/null || true
      "$ROOT/hack/engine-ns.sh" stop "$node" || log "stopping the engine of $node failed"
    fi
    ip link del "$LINK_PREFIX-$node" 2>/dev/null || true
    # The cluster's data goes with `hack/cluster.sh down`; the pools its objects described go
    # with it, unless kept on purpose.
    [ "${LIVEDISK_KEEP_DATA:-0}" = 1 ] || rm -rf "${LIVEDISK_NODES_DIR:?}/$node"
  done
  for name in csi-snapshot-metadata csi-resizer csi-snapshotter csi-provisioner csi-controller; do stop_one "$name"; done
  rm -f "$CSI_DIR"/*.sock "$CSI_DIR/metrics-endpoints"
  log "driver stopped"
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  *) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
