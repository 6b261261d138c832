#!/usr/bin/env bash
# Runs the full csi-sanity suite (kubernetes-csi/csi-test v5) against the two-node driver of
# hack/driver.sh (its controller, and the node service of node-a, then of node-b), for the mount
# and the block access type: the controller places each volume where it chooses, and a node
# stages the other node's volumes by remote attach. Starts the operator (chart account) for the
# nodes' front certificates. Needs the running local cluster (KUBECONFIG, from hack/cluster.sh)
# with `hack/driver.sh start` done, and root (loop devices, mounts, FUSE).
# Prints, per node and access type, the counts run / passed / failed / skipped and how many stages
# were of the other node's volumes, and exits non-zero on any failure. Skips are listed with
# their reasons in README.md.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
: "${KUBECONFIG:?KUBECONFIG must point at the local cluster (source .livedisk/env)}"
command -v csi-sanity >/dev/null || { echo "csi-sanity not on PATH: source the cluster env (hack/harness/build.sh builds it)" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || { echo "csi-sanity.sh needs root (loop devices, mounts)" >&2; exit 1; }

CSI_DIR="${LIVEDISK_STATE_DIR:-$ROOT/.livedisk}/csi"
NODES=(node-a node-b)
WORK="$(mktemp -d /tmp/livedisk-sanity.XXXXXX)"
OPERATOR="$ROOT/target/debug/livedisk-operator"
# The operator acts under the chart's account, as installed.
ACCOUNTS="${LIVEDISK_STATE_DIR:-$ROOT/.livedisk}/accounts"
[ -f "$ACCOUNTS/operator.kubeconfig" ] || { echo "$ACCOUNTS/operator.kubeconfig missing: run hack/accounts.sh apply" >&2; exit 1; }
[ -x "$OPERATOR" ] || { echo "$OPERATOR missing: cargo build -p livedisk-operator" >&2; exit 1; }
for socket in controller "${NODES[@]}"; do
  [ -S "$CSI_DIR/$socket.sock" ] || { echo "$CSI_DIR/$socket.sock missing: run hack/driver.sh start (the two-node driver)" >&2; exit 1; }
done
operator_pid=""
# count PATTERN FILE: matching lines of a node plugin's log (colour codes removed).
count() { sed 's/\x1b\[[0-9;]*m//g' "$2" | grep -c "$1" || true; }
cleanup() {
  # SIGTERM: the operator hands its lease back, so the next one leads at once.
  if [ -n "$operator_pid" ]; then
    kill "$operator_pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$operator_pid" 2>/dev/null || break; sleep 0.1; done
  fi
  for m in $(awk -v w="$WORK" '$5 ~ "^"w {print $5}' /proc/self/mountinfo | sort -r); do umount -l "$m" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

# The operator signs the nodes' export front certificates: a node stages a volume the controller
# placed on the other node through that node's front (remote attach), with its own certificate.
KUBECONFIG="$ACCOUNTS/operator.kubeconfig" RUST_LOG=info setsid "$OPERATOR" >"$WORK/operator.log" 2>&1 &
operator_pid=$!
for node in "${NODES[@]}"; do
  for _ in $(seq 120); do
    [ -n "$(kubectl get livedisknode "$node" -o jsonpath='{.status.exportFront.certificate}' 2>/dev/null)" ] && break
    sleep 0.5
  done
  [ -n "$(kubectl get livedisknode "$node" -o jsonpath='{.status.exportFront.certificate}' 2>/dev/null)" ] \
    || { tail -n 20 "$WORK/operator.log" >&2; echo "node $node has no export front certificate" >&2; exit 1; }
done

status=0
summary=()
for node in "${NODES[@]}"; do
for access in mount block; do
  echo "=== csi-sanity, access type $access, node service of $node"
  log="$WORK/sanity-$node-$access.log"
  node_log="${LIVEDISK_STATE_DIR:-$ROOT/.livedisk}/logs/csi-node-$node.log"
  remote_before=$(count "volume attached from its owner" "$node_log")
  local_before=$(count "volume attached volume=" "$node_log")
  set +e
  csi-sanity --csi.endpoint="$CSI_DIR/$node.sock" --csi.controllerendpoint="$CSI_DIR/controller.sock" \
    --csi.stagingdir="$WORK/staging-$node-$access" --csi.mountdir="$WORK/mount-$node-$access" \
    --csi.testvolumesize=67108864 --csi.testvolumeexpandsize=134217728 \
    --csi.testvolumeaccesstype="$access" --ginkgo.no-color --ginkgo.v >"$log" 2>&1
  rc=$?
  set -e
  grep -E '^\s*\[FAIL\]|^Ran [0-9]+ of|Passed \|' "$log" || true
  line=$(grep -E 'Passed \|' "$log" | tail -n 1)
  ran=$(grep -oE '^Ran [0-9]+' "$log" | tail -n1 | grep -oE '[0-9]+')
  # Where the volumes this run staged lived: the other node's are attached remotely.
  remote=$(( $(count "volume attached from its owner" "$node_log") - remote_before ))
  attached=$(( $(count "volume attached volume=" "$node_log") - local_before ))
  summary+=("csi-sanity $access on $node: ran ${ran:-0}; $line; $attached stages, $remote of them of volumes on the other node")
  # Every skipped spec, by name, so README's list of skips can be checked against it.
  grep -A1 -E '^S \[SKIPPED\]' "$log" | grep -vE '^(S \[SKIPPED\]|--)' | sed 's/^/  skipped: /' | sort -u || true
  cp "$log" "${LIVEDISK_SANITY_LOG_DIR:-/tmp}/livedisk-sanity-$node-$access.log"
  if [ $rc -ne 0 ]; then
    status=1
    grep -B2 -A12 '\[FAILED\]' "$log" | head -n 120 || true
    grep -E "WARN|ERROR" "$node_log" "${LIVEDISK_STATE_DIR:-$ROOT/.livedisk}/logs/csi-controller.log" | tail -n 20 || true
  fi
done
done
# The GroupController is a service of the controller plugin only: csi-sanity runs its specs when
# the plugin at --csi.endpoint advertises GROUP_CONTROLLER_SERVICE, so this run points both
# endpoints at the controller and runs only those specs.
echo "=== csi-sanity, GroupController specs, controller plugin"
log="$WORK/sanity-group-controller.log"
set +e
csi-sanity --csi.endpoint="$CSI_DIR/controller.sock" --csi.controllerendpoint="$CSI_DIR/controller.sock" \
  --csi.stagingdir="$WORK/staging-group" --csi.mountdir="$WORK/mount-group" \
  --ginkgo.focus='GroupController' --ginkgo.no-color --ginkgo.v >"$log" 2>&1
rc=$?
set -e
grep -E '^\s*\[FAIL\]|^Ran [0-9]+ of|Passed \|' "$log" || true
line=$(grep -E 'Passed \|' "$log" | tail -n 1)
ran=$(grep -oE '^Ran [0-9]+' "$log" | tail -n1 | grep -oE '[0-9]+')
summary+=("csi-sanity GroupController specs on the controller: ran ${ran:-0}; $line")
cp "$log" "${LIVEDISK_SANITY_LOG_DIR:-/tmp}/livedisk-sanity-group-controller.log"
# Every GroupController spec must run: a skip would mean the service is not advertised.
if [ $rc -ne 0 ] || [ "${ran:-0}" -lt 6 ]; then
  status=1
  grep -B2 -A12 '\[FAILED\]\|SKIPPED' "$log" | head -n 80 || true
fi
printf '%s\n' "${summary[@]}"
exit $status
