#!/usr/bin/env bash
# Runs the full csi-sanity suite (kubernetes-csi/csi-test v5) against a real livedisk CSI
# controller and node plugin, for the mount and the block access type. Needs a running local
# cluster (KUBECONFIG, from hack/cluster.sh) and root (loop devices, mounts, FUSE).
# Prints, per access type, the counts run / passed / failed / skipped, and exits non-zero on any
# failure. Skips are listed with their reasons in README.md.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
: "${KUBECONFIG:?KUBECONFIG must point at the local cluster (source .livedisk/env)}"
command -v csi-sanity >/dev/null || { echo "csi-sanity not on PATH: source the cluster env (hack/harness/build.sh builds it)" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || { echo "csi-sanity.sh needs root (loop devices, mounts)" >&2; exit 1; }

# Its own node name, so that it never shares work items with a node plugin of `make up`.
NODE=sanity-node
WORK="$(mktemp -d /tmp/livedisk-sanity.XXXXXX)"
BIN="$ROOT/target/debug/livedisk-csi"
# The driver acts under the chart's accounts (hack/accounts.sh), as installed.
ACCOUNTS="${LIVEDISK_STATE_DIR:-$ROOT/.livedisk}/accounts"
for account in csi-controller node; do
  [ -f "$ACCOUNTS/$account.kubeconfig" ] || { echo "$ACCOUNTS/$account.kubeconfig missing: run hack/accounts.sh apply" >&2; exit 1; }
done
[ -x "$BIN" ] || { echo "$BIN missing: cargo build -p livedisk-csi" >&2; exit 1; }
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done; done
  # The engine daemon the node plugin started runs on after it (by design); stop it by its pid file.
  if [ -f "$WORK/run/qsd.pid" ]; then kill "$(cat "$WORK/run/qsd.pid")" 2>/dev/null || true; fi
  for m in $(awk -v w="$WORK" '$5 ~ "^"w {print $5}' /proc/self/mountinfo | sort -r); do umount -l "$m" 2>/dev/null || true; done
  rm -rf "$WORK"
  kubectl delete csinode "$NODE" --ignore-not-found >/dev/null 2>&1 || true
  kubectl delete livedisknode "$NODE" --ignore-not-found >/dev/null 2>&1 || true
}
trap cleanup EXIT

# Register the node plugin with the cluster as node-driver-registrar would.
kubectl apply -f - >/dev/null <<YAML
apiVersion: storage.k8s.io/v1
kind: CSINode
metadata: {name: $NODE}
spec:
  drivers:
  - name: csi.livedisk.io
    nodeID: $NODE
    topologyKeys: [topology.livedisk.io/node]
YAML

mkdir -p "$WORK"/{pool,run,csi}
KUBECONFIG="$ACCOUNTS/csi-controller.kubeconfig" RUST_LOG=info setsid "$BIN" controller --csi-endpoint "unix://$WORK/csi/controller.sock" >"$WORK/controller.log" 2>&1 &
pids+=($!)
# The engine's front-end server (the engine pod's second container in the chart): the node plugin
# asks it for each staged volume's FUSE front end.
RUST_LOG=info setsid "$BIN" frontends --engine-socket-dir "$WORK/run" >"$WORK/frontends.log" 2>&1 &
pids+=($!)
KUBECONFIG="$ACCOUNTS/node.kubeconfig" RUST_LOG=info setsid "$BIN" node --csi-endpoint "unix://$WORK/csi/node.sock" --node-name "$NODE" \
  --pool-dir "$WORK/pool" --engine-socket-dir "$WORK/run" >"$WORK/node.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do [ -S "$WORK/csi/controller.sock" ] && [ -S "$WORK/csi/node.sock" ] && [ -S "$WORK/run/frontends.sock" ] && break; sleep 0.1; done
[ -S "$WORK/csi/node.sock" ] || { cat "$WORK"/*.log >&2; echo "CSI sockets did not appear" >&2; exit 1; }

status=0
summary=()
for access in mount block; do
  echo "=== csi-sanity, access type $access"
  log="$WORK/sanity-$access.log"
  set +e
  csi-sanity --csi.endpoint="$WORK/csi/node.sock" --csi.controllerendpoint="$WORK/csi/controller.sock" \
    --csi.stagingdir="$WORK/staging-$access" --csi.mountdir="$WORK/mount-$access" \
    --csi.testvolumesize=67108864 --csi.testvolumeexpandsize=134217728 \
    --csi.testvolumeaccesstype="$access" --ginkgo.no-color --ginkgo.v >"$log" 2>&1
  rc=$?
  set -e
  grep -E '^\s*\[FAIL\]|^Ran [0-9]+ of|Passed \|' "$log" || true
  line=$(grep -E 'Passed \|' "$log" | tail -n 1)
  ran=$(grep -oE '^Ran [0-9]+' "$log" | tail -n1 | grep -oE '[0-9]+')
  summary+=("csi-sanity $access: ran ${ran:-0}; $line")
  # Every skipped spec, by name, so README's list of skips can be checked against it.
  grep -A1 -E '^S \[SKIPPED\]' "$log" | grep -vE '^(S \[SKIPPED\]|--)' | sed 's/^/  skipped: /' | sort -u || true
  cp "$log" "${LIVEDISK_SANITY_LOG_DIR:-/tmp}/livedisk-sanity-$access.log"
  if [ $rc -ne 0 ]; then
    status=1
    grep -B2 -A12 '\[FAILED\]' "$log" | head -n 120 || true
    grep -E "WARN|ERROR" "$WORK/node.log" "$WORK/controller.log" "$WORK/frontends.log" | tail -n 20 || true
  fi
done
printf '%s\n' "${summary[@]}"
exit $status
