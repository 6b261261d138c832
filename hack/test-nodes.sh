#!/usr/bin/env bash
# The second phase of `make test` (started by hack/test.sh beside its cargo tests): the chart on
# real nodes (node-a and node-b: kubelet, containerd, runc, CNI, kube-proxy, CoreDNS; helm
# install) and `cargo test -p livedisk-node-e2e` against it. Its cluster has its own state dir,
# ports, links and subnet, so it runs beside the processes-layout cluster of the first phase; it
# always stops what it started.
#
# Env: LIVEDISK_TEST_NODES_STATE_DIR (.livedisk/test-nodes), LIVEDISK_TEST_NODES_LINK_PREFIX
# (lr), LIVEDISK_TEST_NODES_SUBNET (10.237), LIVEDISK_TEST_NODES_APISERVER_PORT (16743; its
# other ports are fixed below); NODE_BUILD_STATUS: a file the node runtime build
# (hack/harness/node-build.sh, run by hack/test.sh in the background) writes its exit status to,
# waited for before the nodes start.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
T0=$SECONDS
step() { echo; echo "=== nodes: [$((SECONDS - T0))s] $*"; }

unset LIVEDISK_APISERVER_ADDRESS LIVEDISK_FAKE_NODES LIVEDISK_NODES LIVEDISK_TEST_IMAGE LIVEDISK_HELM_VALUES \
  LIVEDISK_UP_MODE LIVEDISK_NODES_DIR KUBECONFIG
export LIVEDISK_STATE_DIR="${LIVEDISK_TEST_NODES_STATE_DIR:-$ROOT/.livedisk/test-nodes}"
# Below Linux's ephemeral range, and none the first phase's cluster, `make up`'s or `make
# bench`'s use.
export LIVEDISK_APISERVER_PORT="${LIVEDISK_TEST_NODES_APISERVER_PORT:-16743}"
export LIVEDISK_ETCD_PORT=25990 LIVEDISK_ETCD_PEER_PORT=26000 LIVEDISK_KCM_PORT=30557 \
  LIVEDISK_SCHEDULER_PORT=30559 LIVEDISK_SNAPSHOT_METADATA_PORT=17743 \
  LIVEDISK_SNAPSHOT_METADATA_HTTP_PORT=17780 LIVEDISK_VIRT_API_STANDIN_PORT=16744 \
  LIVEDISK_VIRT_CONTROLLER_PORT=18282
export LIVEDISK_LINK_PREFIX="${LIVEDISK_TEST_NODES_LINK_PREFIX:-lr}" LIVEDISK_SUBNET="${LIVEDISK_TEST_NODES_SUBNET:-10.237}"
export LIVEDISK_IMAGE_PROFILE=dev

if [ -n "${NODE_BUILD_STATUS:-}" ]; then
  step "waiting for the node runtime build (containerd, runc, CNI plugins, CoreDNS, pause)"
  while [ ! -s "$NODE_BUILD_STATUS" ]; do sleep 5; done
  build_status="$(cat "$NODE_BUILD_STATUS")"
  [ "$build_status" = 0 ] || { echo "node runtime build failed (exit $build_status): see its log"; exit 1; }
fi

step "the chart on real nodes: node-a and node-b (kubelet, containerd, runc, CNI, kube-proxy, CoreDNS), helm install"
# shellcheck source=hack/lib/chart-cluster.sh
source hack/lib/chart-cluster.sh
cleanup() {
  step "stopping the nodes and the cluster"
  chart_cluster_down
}
trap cleanup EXIT
# A TERM from hack/test.sh (interrupted) ends the script through its EXIT trap.
trap 'exit 143' TERM INT
chart_cluster_up

step "cargo test -p livedisk-node-e2e (pods started by kubelet on real nodes, the chart's driver)"
cargo test -p livedisk-node-e2e --no-fail-fast
