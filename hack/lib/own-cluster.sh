# shellcheck shell=bash
# A local cluster of a script's own (sourced by hack/test.sh and hack/bench.sh): the caller sets
# LIVEDISK_STATE_DIR and the LIVEDISK_*_PORT / LIVEDISK_LINK_PREFIX / LIVEDISK_SUBNET of
# hack/cluster.sh and hack/driver.sh to values of its own, so that it runs beside `make up`'s
# cluster and beside other scripts' clusters. Run from the repository root.

# Starts a fresh cluster with the project's CRDs and the chart's accounts (not the driver) and
# sources its env
# (KUBECONFIG, the harness binaries on PATH).
own_cluster_up() {
  # A fresh cluster and fresh pools every run: stop whatever an interrupted run left.
  own_cluster_down >/dev/null 2>&1
  rm -rf "$LIVEDISK_STATE_DIR/nodes" "$LIVEDISK_STATE_DIR/driver-pki"
  hack/cluster.sh up >/dev/null
  # shellcheck disable=SC1091
  source "$LIVEDISK_STATE_DIR/env"
  kubectl apply --server-side --force-conflicts --field-manager=livedisk-test -f crds/generated/ >/dev/null
  kubectl wait --for condition=Established --timeout=60s -f crds/generated/ >/dev/null
  # The chart's ServiceAccounts and RBAC, and a kubeconfig per component: every livedisk
  # component of the run acts under its chart account (the audit check proves the RBAC).
  hack/accounts.sh apply
}

# Stops KubeVirt's virt-controller and the driver (if started) and the cluster; never fails, so
# that it can run in a trap.
own_cluster_down() {
  hack/kubevirt.sh stop || true
  hack/driver.sh stop || true
  hack/cluster.sh down || true
}
