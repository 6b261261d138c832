#!/usr/bin/env bash
# `make test`: every test, against real parts. Installs what it needs, starts its own local
# cluster (separate state dir and ports, so a `make up` cluster is left alone), runs the static
# checks, the chart checks and the whole cargo test suite, and always stops what it started.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
T0=$SECONDS
step() { echo; echo "=== test: [$((SECONDS - T0))s] $*"; }

# The clusters are this script's own: nothing from a sourced .livedisk/*/env (another cluster's
# mode, nodes, kubeconfig) may leak into them.
unset LIVEDISK_APISERVER_ADDRESS LIVEDISK_FAKE_NODES LIVEDISK_NODES LIVEDISK_TEST_IMAGE LIVEDISK_HELM_VALUES \
  LIVEDISK_UP_MODE LIVEDISK_NODES_DIR KUBECONFIG
export LIVEDISK_STATE_DIR="${LIVEDISK_TEST_STATE_DIR:-$ROOT/.livedisk/test-cluster}"
export LIVEDISK_APISERVER_PORT="${LIVEDISK_TEST_APISERVER_PORT:-16443}"
# Listening ports stay below Linux's ephemeral range (32768-60999): a client connection of
# anything else on the host may hold a port in that range for a moment (a run once failed on
# etcd's peer port taken as the source port of an operator's connection to another cluster).
export LIVEDISK_ETCD_PORT="${LIVEDISK_TEST_ETCD_PORT:-24790}"
export LIVEDISK_ETCD_PEER_PORT="${LIVEDISK_TEST_ETCD_PEER_PORT:-24800}"
export LIVEDISK_KCM_PORT="${LIVEDISK_TEST_KCM_PORT:-30257}"
export LIVEDISK_SCHEDULER_PORT="${LIVEDISK_TEST_SCHEDULER_PORT:-30259}"
export LIVEDISK_SNAPSHOT_METADATA_PORT="${LIVEDISK_TEST_SNAPSHOT_METADATA_PORT:-17443}"
export LIVEDISK_SNAPSHOT_METADATA_HTTP_PORT="${LIVEDISK_TEST_SNAPSHOT_METADATA_HTTP_PORT:-17480}"
# The virt-api stand-in (hack/cluster.sh), stated here rather than left to its derivation.
export LIVEDISK_VIRT_API_STANDIN_PORT="${LIVEDISK_TEST_VIRT_API_STANDIN_PORT:-16444}"
export LIVEDISK_LINK_PREFIX="${LIVEDISK_TEST_LINK_PREFIX:-lt}" LIVEDISK_SUBNET="${LIVEDISK_TEST_SUBNET:-10.232}"
export LIVEDISK_VIRT_CONTROLLER_PORT="${LIVEDISK_TEST_VIRT_CONTROLLER_PORT:-18182}"

step "dependencies (apt packages, Rust components)"
hack/deps.sh

step "static checks: cargo fmt, clippy -D warnings, generated CRD drift"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo run -q -p livedisk-api --bin crdgen -- --check
echo "generated CRDs match the Rust types"

step "building the workspace and its tests"
cargo build --workspace --all-targets
# The second phase's tests, built now: it runs beside the first phase's test binaries.
cargo test -p livedisk-node-e2e --no-run

step "the live test VM without a cluster: two volumes on qemu-storage-daemon, ext4, the real qemu-guest-agent's freeze (hack/vm/live-smoke.sh)"
live_vm_status=0
hack/vm/live-smoke.sh || live_vm_status=$?

step "images: make images (cached by content); their test in the background"
# With the dev binaries just built: a cold release build would not fit CI's time. `make images`
# (release) builds the same images with the release binaries.
LIVEDISK_IMAGE_PROFILE=dev hack/images.sh --test >/dev/null
# The images test (rebuilt without the cache to the same digests, started under unshare: minutes,
# mostly mmdebstrap and the test VM's boots) runs beside the first phase, at low priority, on a
# copy of the binaries just packed (cargo test may relink target/ meanwhile).
image_bins="$LIVEDISK_STATE_DIR/image-binaries"
rm -rf "$image_bins" && mkdir -p "$image_bins"
cp "$(cargo metadata --format-version 1 --no-deps | jq -r .target_directory)"/debug/livedisk-{operator,csi} "$image_bins/"
images_log="$LIVEDISK_STATE_DIR/logs/test-images.log"
mkdir -p "$(dirname "$images_log")"
echo "images test (hack/test-images.sh) in the background, log: $images_log"
LIVEDISK_IMAGE_PROFILE=dev LIVEDISK_IMAGES_BINARIES_DIR="$image_bins" \
  setsid nice -n 10 hack/test-images.sh >"$images_log" 2>&1 &
images_test_pid=$!

step "local cluster (the first run builds the Go harness: many minutes, with progress)"
# shellcheck source=hack/lib/own-cluster.sh
source hack/lib/own-cluster.sh
cleanup() {
  # The background node build, if still running (its own session: Go's children go with it).
  [ -z "${node_build_pid:-}" ] || kill -- "-$node_build_pid" 2>/dev/null || true
  [ -z "${images_test_pid:-}" ] || kill -- "-$images_test_pid" 2>/dev/null || true
  # The second phase, if still running: its EXIT trap stops its nodes and cluster.
  if [ -n "${nodes_pid:-}" ]; then
    step "stopping the chart on real nodes (hack/test-nodes.sh)"
    kill -- "-$nodes_pid" 2>/dev/null || true
    wait "$nodes_pid" 2>/dev/null || true
  fi
  [ -z "${second_up_pid:-}" ] || wait "$second_up_pid" 2>/dev/null || true
  if [ -z "${own_cluster_stopped:-}" ]; then
    step "stopping the drivers and the local clusters"
    own_cluster_down
    second_cluster own_cluster_down >/dev/null 2>&1
  fi
}
# The first phase's end-to-end binaries each need a cluster to themselves while they run (they
# kill its node plugins and daemons, cut its links, own its operator's Lease): a second
# processes-layout cluster with its own driver lets two of them run at once. COMMAND... runs with
# its settings (state dir, ports, links, subnet).
second_cluster() { # COMMAND...
  (
    export LIVEDISK_STATE_DIR="${LIVEDISK_TEST_STATE_DIR_2:-$ROOT/.livedisk/test-cluster-2}"
    export LIVEDISK_APISERVER_PORT=16843 LIVEDISK_ETCD_PORT=26090 LIVEDISK_ETCD_PEER_PORT=26100 \
      LIVEDISK_KCM_PORT=30657 LIVEDISK_SCHEDULER_PORT=30659 LIVEDISK_SNAPSHOT_METADATA_PORT=17843 \
      LIVEDISK_SNAPSHOT_METADATA_HTTP_PORT=17880 LIVEDISK_VIRT_API_STANDIN_PORT=16844 \
      LIVEDISK_VIRT_CONTROLLER_PORT=18382 LIVEDISK_LINK_PREFIX=lu LIVEDISK_SUBNET=10.239
    "$@"
  )
}
second_env="$ROOT/.livedisk/test-cluster-2.env"
# Starts the second cluster and its driver and writes the variables its tests need (KEY=VALUE).
second_cluster_up() {
  own_cluster_up
  hack/driver.sh start
  local v
  for v in LIVEDISK_STATE_DIR LIVEDISK_APISERVER_PORT LIVEDISK_ETCD_PORT LIVEDISK_ETCD_PEER_PORT \
    LIVEDISK_KCM_PORT LIVEDISK_SCHEDULER_PORT LIVEDISK_SNAPSHOT_METADATA_PORT \
    LIVEDISK_SNAPSHOT_METADATA_HTTP_PORT LIVEDISK_VIRT_API_STANDIN_PORT LIVEDISK_VIRT_CONTROLLER_PORT \
    LIVEDISK_LINK_PREFIX LIVEDISK_SUBNET KUBECONFIG PATH LIVEDISK_HARNESS_BIN; do
    echo "$v=${!v:-}"
  done >"$second_env"
}
trap cleanup EXIT
own_cluster_up

# The nodes' runtime (containerd, runc, CNI plugins, CoreDNS, pause) is needed only by the second
# phase: built meanwhile, at low priority, while the first phase mostly waits on its cluster. A
# no-op when cached. Its exit status goes to a file: the second phase (hack/test-nodes.sh) waits
# for it.
node_build_log="$LIVEDISK_STATE_DIR/logs/node-build.log"
node_build_status="$LIVEDISK_STATE_DIR/logs/node-build.status"
rm -f "$node_build_status"
echo "node runtime build (hack/harness/node-build.sh) in the background, log: $node_build_log"
# shellcheck disable=SC2016 # expanded by the inner shell
setsid nice -n 15 bash -c 'hack/harness/node-build.sh; echo $? >"$1"' node-build "$node_build_status" \
  >"$node_build_log" 2>&1 &
node_build_pid=$!

step "Helm chart: lint, template, server-side dry run of every rendered object"
hack/test-chart.sh

step "the CSI driver on the cluster: controller + sidecars, two nodes in their own namespaces"
hack/driver.sh start

# The second cluster starts meanwhile (csi-sanity and the gRPC clients use the first).
second_log="$LIVEDISK_STATE_DIR/logs/second-cluster.log"
rm -f "$second_env"
echo "a second processes-layout cluster and driver for the end-to-end binaries, in the background, log: $second_log"
second_cluster second_cluster_up >"$second_log" 2>&1 &
second_up_pid=$!

step "csi-sanity (kubernetes-csi/csi-test v5) against the two-node driver: node-a's and node-b's node service, mount and block access types"
hack/csi-sanity.sh

step "gRPC clients of other implementations: Python grpcio (gRPC's C core) calls every service on the controller's and both nodes' sockets, default options and grpc.default_authority=localhost"
hack/grpc-clients.sh

step "waiting for the second processes-layout cluster"
set +e
wait "$second_up_pid"
second_status=$?
set -e
second_up_pid=""
[ "$second_status" -eq 0 ] && [ -s "$second_env" ] || { tail -n 30 "$second_log"; echo "the second cluster did not start"; exit 1; }
tail -n 1 "$second_log"

step "cargo test --workspace (unit, engine on real qemu-storage-daemon, e2e on two local clusters): three lanes, two clusters' end-to-end binaries beside the rest; the chart on real nodes beside them"
# The second phase (hack/test-nodes.sh: a chart cluster of real nodes on its own ports, links and
# subnet, and the tests of tests/nodes/) runs beside the first phase's test binaries: both
# mostly wait on real parts. Its output is printed whole when it ends.
nodes_state="${LIVEDISK_TEST_NODES_STATE_DIR:-$ROOT/.livedisk/test-nodes}"
nodes_log="$ROOT/.livedisk/test-nodes.log"
echo "the chart on real nodes: hack/test-nodes.sh in the background, log: $nodes_log"
NODE_BUILD_STATUS="$node_build_status" setsid hack/test-nodes.sh >"$nodes_log" 2>&1 &
nodes_pid=$!
nodes_t0=$SECONDS
echo "QEMU under test: $(qemu-storage-daemon --version | head -n1)"
log="$LIVEDISK_STATE_DIR/cargo-test.log"
binaries="$LIVEDISK_STATE_DIR/test-binaries.json"
# Built in the build step above: this only lists them.
cargo test --workspace --exclude livedisk-node-e2e --no-run --message-format=json >"$binaries"
set +e
python3 hack/run-test-binaries.py --cluster-package livedisk-e2e \
  --durations "$ROOT/.livedisk/test-durations.json" --seed hack/test-durations.json \
  --cluster-env "$second_env" <"$binaries" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e

step "stopping the processes-layout clusters"
own_cluster_down
second_cluster own_cluster_down
own_cluster_stopped=1

step "waiting for the images test"
while kill -0 "$images_test_pid" 2>/dev/null; do
  echo "  test-images: $(tail -n 1 "$images_log" 2>/dev/null)"; sleep 30
done
set +e
wait "$images_test_pid"
images_status=$?
set -e
images_test_pid=""
grep -E '^(PASS|FAIL) ' "$images_log" || true
tail -n 1 "$images_log"
[ "$status" -ne 0 ] || status=$images_status
[ "$status" -ne 0 ] || status=$live_vm_status
audit_logs=("$LIVEDISK_STATE_DIR"/logs/audit*.log "$(second_cluster printenv LIVEDISK_STATE_DIR)"/logs/audit*.log)

step "waiting for the chart on real nodes (running for $((SECONDS - nodes_t0))s)"
while kill -0 "$nodes_pid" 2>/dev/null; do
  echo "  nodes: $(grep -E '^(=== nodes|test .* \.\.\. |test result)' "$nodes_log" 2>/dev/null | tail -n 1)"; sleep 30
done
set +e
wait "$nodes_pid"
node_status=$?
set -e
nodes_pid=""
if grep -q '^node runtime build failed' "$nodes_log"; then
  tail -n 30 "$node_build_log" 2>/dev/null || true
fi
echo "--- hack/test-nodes.sh (exit $node_status, $((SECONDS - nodes_t0))s since it started):"
tee -a "$log" <"$nodes_log"
[ "$status" -ne 0 ] || status=$node_status
audit_logs+=("$nodes_state"/logs/audit*.log)
count() { awk -v what="$1" '/^test result:/ { for (i = 1; i <= NF; i++) if ($(i+1) ~ "^" what) n += $i } END { print n + 0 }' "$log"; }
step "RBAC proof: the API server's audit log of the whole run against the chart's grants"
rendered="$LIVEDISK_STATE_DIR/chart-rendered.yaml"
"$(hack/helm.sh | tail -n 1)" template livedisk charts/livedisk --namespace livedisk-system \
  --set groupSnapshot.enabled=true > "$rendered"
set +e
python3 hack/audit-check.py "$rendered" hack/audit-justified.yaml "${audit_logs[@]}"
audit_status=$?
set -e
[ "$status" -ne 0 ] || status=$audit_status
passed=$(count passed); failed=$(count failed); ignored=$(count ignored)
step "done in $((SECONDS - T0))s"
# The only ignored tests are child-process entry points (the fault tests', the front-end test's)
# (run by those tests themselves); anything else ignored shows up here too.
echo "cargo: ${passed:-0} passed, ${failed:-0} failed, ${ignored:-0} ignored (expected: 5 child-process entry points: the fault, revert, tombstone and clone crash tests, and the front-end test's node-plugin stand-in)"
exit "$status"
