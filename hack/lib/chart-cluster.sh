# shellcheck shell=bash
# The chart on real nodes (sourced by hack/up.sh and hack/test.sh): a local cluster in real-node
# mode, nodes node-a and node-b with kubelet, containerd and runc (hack/node.sh), cluster DNS, the
# product's images imported into every node's containerd, and `helm install` of charts/livedisk,
# as users install it. The caller sets LIVEDISK_STATE_DIR, the ports of hack/cluster.sh,
# LIVEDISK_LINK_PREFIX and LIVEDISK_SUBNET (its own, so that clusters run side by side); run from
# the repository root, as root.
#
# Env: LIVEDISK_IMAGE_PROFILE (dev | release: the cargo profile of the livedisk image's binaries,
# hack/images.sh), LIVEDISK_HELM_VALUES (extra values files for helm, space-separated).

CHART_RELEASE=livedisk
CHART_NAMESPACE=livedisk-system
CHART_NODES=(node-a node-b)

chart_log() { echo "chart-cluster: [$((SECONDS - ${CHART_T0:-0}))s] $*" >&2; }

# The images of the chart and the test images (livedisk/vm-test: the checksummed writer and the
# test VM, for pods of the tests and of users trying things out), built (or found in the cache)
# for this cluster's state dir; prints the image list file (reference, digest, archive per line).
chart_images() {
  chart_log "images (hack/images.sh --test, profile ${LIVEDISK_IMAGE_PROFILE:-release}; cached by content)"
  hack/images.sh --test >/dev/null
  echo "$LIVEDISK_STATE_DIR/images/images.txt"
}

chart_cluster_up() {
  CHART_T0=$SECONDS
  export LIVEDISK_APISERVER_ADDRESS="${LIVEDISK_SUBNET:?}.0.1" LIVEDISK_FAKE_NODES=""
  export LIVEDISK_NODES="${CHART_NODES[*]}"
  chart_cluster_down >/dev/null 2>&1 || true
  rm -rf "$LIVEDISK_STATE_DIR/nodes"
  local images; images="$(chart_images)"
  chart_log "cluster in real-node mode (API server on $LIVEDISK_APISERVER_ADDRESS)"
  hack/cluster.sh up >/dev/null
  # shellcheck disable=SC1091
  source "$LIVEDISK_STATE_DIR/env"
  local node
  for node in "${CHART_NODES[@]}"; do
    chart_log "node $node: containerd, runc, CNI, kube-proxy, kubelet; the chart's images"
    LIVEDISK_NODE_IMAGES="$images" hack/node.sh start "$node"
  done
  chart_log "cluster DNS (CoreDNS)"
  hack/node.sh dns >/dev/null
  chart_install
  # The test image, for tests/nodes and for whoever sources the env.
  local test_image
  test_image="$(awk '$1 ~ /^livedisk\/vm-test:/ {print $1}' "$images")"
  [ -n "$test_image" ] || { chart_log "no livedisk/vm-test image in $images"; return 1; }
  echo "export LIVEDISK_TEST_IMAGE=\"$test_image\"" >> "$LIVEDISK_STATE_DIR/env"
  export LIVEDISK_TEST_IMAGE="$test_image"
}

# helm install (or upgrade) of charts/livedisk with the values of this machine, then waits until
# every node plugin is registered with its kubelet and reports its LivediskNode.
chart_install() {
  local helm args=() f
  helm="$(hack/helm.sh | tail -n 1)"
  for f in ${LIVEDISK_HELM_VALUES:-}; do args+=(--values "$f"); done
  # The local cluster serves the group-snapshot CRDs (hack/cluster.sh): group snapshots on, as a
  # user whose cluster has them turns them on (a VM's DiskSnapshot takes one group per node).
  if kubectl get crd volumegroupsnapshots.groupsnapshot.storage.k8s.io >/dev/null 2>&1; then
    args+=(--set groupSnapshot.enabled=true)
  fi
  chart_log "helm upgrade --install $CHART_RELEASE charts/livedisk (namespace $CHART_NAMESPACE)"
  "$helm" upgrade --install "$CHART_RELEASE" charts/livedisk --namespace "$CHART_NAMESPACE" \
    --create-namespace --wait --timeout 5m "${args[@]}" >/dev/null
  local node
  for node in "${CHART_NODES[@]}"; do
    for _ in $(seq 1 120); do
      kubectl get csinode "$node" -o jsonpath='{.spec.drivers[*].name}' 2>/dev/null | grep -qw csi.livedisk.io \
        && kubectl get livedisknode "$node" >/dev/null 2>&1 && break
      sleep 0.5
    done
    kubectl get csinode "$node" -o jsonpath='{.spec.drivers[*].name}' | grep -qw csi.livedisk.io \
      || { chart_log "the node plugin of $node did not register with kubelet"; return 1; }
  done
  chart_log "chart installed: $(kubectl -n "$CHART_NAMESPACE" get pods --no-headers | wc -l) pods running"
}

# Stops the nodes (every container with them), the router and the cluster; never fails.
chart_cluster_down() {
  hack/node.sh down || true
  hack/cluster.sh down || true
}
