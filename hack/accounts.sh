#!/usr/bin/env bash
# The chart's identities on the local cluster: every livedisk component runs under its own chart
# ServiceAccount, never the cluster admin's credentials.
#
#   hack/accounts.sh apply
#     1. renders the chart (helm template, release `livedisk`, namespace livedisk-system) and
#        applies only its ServiceAccounts and RBAC objects (ClusterRole, ClusterRoleBinding, Role,
#        RoleBinding): the same objects `helm install` creates;
#     2. asks the TokenRequest API for a token of each component's ServiceAccount and writes a
#        kubeconfig per component: $LIVEDISK_STATE_DIR/accounts/<component>.kubeconfig for
#        operator, csi-controller (the driver and its sidecars share the pod's account) and node.
#   hack/accounts.sh kubeconfig COMPONENT [NAME]
#     a kubeconfig with a fresh token (its own credential id in the audit log) for COMPONENT,
#     written to accounts/NAME.kubeconfig (default: COMPONENT); prints its path.
#
# Needs the cluster of hack/cluster.sh ($LIVEDISK_STATE_DIR/env) and its admin kubeconfig.
# Tokens last LIVEDISK_TOKEN_DURATION (default 48h); `make up` and `make test` mint new ones.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${LIVEDISK_STATE_DIR:-$ROOT/.livedisk}"
NAMESPACE=livedisk-system
RELEASE=livedisk
DURATION="${LIVEDISK_TOKEN_DURATION:-48h}"
ACCOUNTS="$STATE/accounts"
log() { echo "accounts: $*" >&2; }
die() { echo "accounts: ERROR: $*" >&2; exit 1; }

[ -f "$STATE/env" ] || die "no cluster in $STATE: run hack/cluster.sh up first"
# shellcheck disable=SC1091
source "$STATE/env"

# component -> ServiceAccount name, as the chart names them for release `livedisk`.
service_account() {
  case "$1" in
    operator) echo "$RELEASE-operator" ;;
    csi-controller) echo "$RELEASE-csi-controller" ;;
    node) echo "$RELEASE-node" ;;
    *) die "unknown component '$1' (operator, csi-controller, node)" ;;
  esac
}

# kubeconfig COMPONENT NAME: a token from the TokenRequest API, in a kubeconfig of its own.
write_kubeconfig() {
  local component="$1" name="$2" sa token server ca file
  sa="$(service_account "$component")"
  token="$(kubectl create token "$sa" --namespace "$NAMESPACE" --duration "$DURATION")" \
    || die "TokenRequest for $NAMESPACE/$sa failed"
  server="$(kubectl config view --minify -o jsonpath='{.clusters[0].cluster.server}')"
  ca="$(kubectl config view --minify --raw -o jsonpath='{.clusters[0].cluster.certificate-authority-data}')"
  mkdir -p "$ACCOUNTS"; chmod 700 "$ACCOUNTS"
  file="$ACCOUNTS/$name.kubeconfig"
  umask 077
  cat > "$file.tmp" <<YAML
apiVersion: v1
kind: Config
clusters:
- name: livedisk
  cluster: {server: "$server", certificate-authority-data: "$ca"}
users:
- name: $NAMESPACE/$sa
  user: {token: "$token"}
contexts:
- name: $name
  context: {cluster: livedisk, user: $NAMESPACE/$sa, namespace: $NAMESPACE}
current-context: $name
YAML
  mv -f "$file.tmp" "$file"
  echo "$file"
}

cmd_apply() {
  local helm
  helm="$("$ROOT/hack/helm.sh" | tail -n 1)"
  kubectl create namespace "$NAMESPACE" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
  log "the chart's ServiceAccounts and RBAC (helm template $RELEASE -n $NAMESPACE)"
  "$helm" template "$RELEASE" "$ROOT/charts/livedisk" --namespace "$NAMESPACE" \
    --set groupSnapshot.enabled=true \
    | python3 "$ROOT/hack/lib/select-kinds.py" ServiceAccount ClusterRole ClusterRoleBinding Role RoleBinding \
    | kubectl apply --server-side --force-conflicts --field-manager=livedisk-accounts -f - >/dev/null
  local component
  for component in operator csi-controller node; do
    write_kubeconfig "$component" "$component" >/dev/null
  done
  log "kubeconfigs in $ACCOUNTS: operator, csi-controller, node"
}

case "${1:-}" in
  apply) cmd_apply ;;
  kubeconfig) [ -n "${2:-}" ] || die "usage: hack/accounts.sh kubeconfig COMPONENT [NAME]"
    write_kubeconfig "$2" "${3:-$2}" ;;
  *) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
