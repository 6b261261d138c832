#!/usr/bin/env bash
# KubeVirt's virt-controller on the local cluster of hack/cluster.sh: the real controller, built
# from KubeVirt's Go module by hack/harness/build.sh (sub-module hack/harness/kubevirt), with
# all of its controllers (VM, VMI, migration, snapshot, restore, export, clone, backup, ...).
# KubeVirt's CRDs are already in the cluster (hack/cluster.sh install_crds).
#
#   hack/kubevirt.sh start | stop | status
#
# start:
#   * namespace `kubevirt`, virt-controller's ServiceAccount `kubevirt-controller` with the
#     ClusterRole, Role and bindings virt-operator gives it (kubevirt-manifests controller-rbac,
#     KubeVirt's own rbac.GetAllController), and a kubeconfig with a token of that account
#     ($STATE/accounts/virt-controller.kubeconfig): it acts as itself, not as the admin;
#   * the KubeVirt CR `kubevirt/kubevirt` with the `Snapshot` feature gate; its status.phase is
#     set to Deployed, which is what virt-operator would write once it deployed KubeVirt
#     (virt-controller reads its configuration only from a KubeVirt CR that has a phase). No
#     virt-operator, virt-api (webhooks, subresources) or virt-handler runs: nothing starts a
#     VMI's pod, so only what needs no running VM works (VMs kept Halted: snapshot, restore);
#   * virt-controller on the host, in its own session (log $STATE/logs/virt-controller.log),
#     its HTTPS endpoint (/healthz, /leader, /metrics) on 127.0.0.1:$LIVEDISK_VIRT_CONTROLLER_PORT
#     (default 8182) with a self-signed certificate; ready once it holds the lease
#     kubevirt/virt-controller and has started its controllers.
# Needs the cluster's env ($LIVEDISK_STATE_DIR/env) and the harness binaries.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${LIVEDISK_STATE_DIR:-$ROOT/.livedisk}"
PIDS="$STATE/pids"
LOGS="$STATE/logs"
NAMESPACE=kubevirt
PORT="${LIVEDISK_VIRT_CONTROLLER_PORT:-8182}"
DURATION="${LIVEDISK_TOKEN_DURATION:-48h}"
log() { echo "kubevirt: $*" >&2; }
die() { echo "kubevirt: ERROR: $*" >&2; exit 1; }

alive() { [ -f "$PIDS/virt-controller.pid" ] && kill -0 "$(cat "$PIDS/virt-controller.pid")" 2>/dev/null; }

cmd_stop() {
  [ -f "$PIDS/virt-controller.pid" ] || return 0
  local pid
  pid="$(cat "$PIDS/virt-controller.pid")"
  if kill -0 "$pid" 2>/dev/null; then
    kill -- "-$pid" 2>/dev/null || kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 -- "-$pid" 2>/dev/null || true
  fi
  rm -f "$PIDS/virt-controller.pid"
  log "virt-controller stopped"
}

# The KubeVirt CR as virt-operator's user writes it, then the phase virt-operator would set.
apply_kubevirt_cr() {
  kubectl apply --server-side --field-manager=livedisk-kubevirt -f - >/dev/null <<YAML
apiVersion: kubevirt.io/v1
kind: KubeVirt
metadata:
  name: kubevirt
  namespace: $NAMESPACE
spec:
  configuration:
    developerConfiguration:
      featureGates: [Snapshot]
YAML
  kubectl patch kubevirt kubevirt -n "$NAMESPACE" --subresource=status --type=merge \
    -p '{"status":{"phase":"Deployed"}}' >/dev/null
}

write_kubeconfig() {
  local token server ca file="$STATE/accounts/virt-controller.kubeconfig"
  token="$(kubectl create token kubevirt-controller --namespace "$NAMESPACE" --duration "$DURATION")" \
    || die "TokenRequest for $NAMESPACE/kubevirt-controller failed"
  server="$(kubectl config view --minify -o jsonpath='{.clusters[0].cluster.server}')"
  ca="$(kubectl config view --minify --raw -o jsonpath='{.clusters[0].cluster.certificate-authority-data}')"
  mkdir -p "$STATE/accounts"; chmod 700 "$STATE/accounts"
  (umask 077; cat > "$file.tmp" <<YAML
apiVersion: v1
kind: Config
clusters:
- name: livedisk
  cluster: {server: "$server", certificate-authority-data: "$ca"}
users:
- name: $NAMESPACE/kubevirt-controller
  user: {token: "$token"}
contexts:
- name: virt-controller
  context: {cluster: livedisk, user: $NAMESPACE/kubevirt-controller, namespace: $NAMESPACE}
current-context: virt-controller
YAML
  )
  mv -f "$file.tmp" "$file"
  echo "$file"
}

started() {
  [ "$(kubectl get lease virt-controller -n "$NAMESPACE" -o jsonpath='{.spec.holderIdentity}' 2>/dev/null)" = "$(hostname)" ] \
    && grep -q 'STARTING controllers' "$LOGS/virt-controller.log"
}

cmd_start() {
  [ -f "$STATE/env" ] || die "no cluster in $STATE: run hack/cluster.sh up first"
  # shellcheck disable=SC1091
  source "$STATE/env"
  local bin="${LIVEDISK_HARNESS_BIN:-}"
  [ -x "$bin/virt-controller" ] && [ -x "$bin/kubevirt-manifests" ] \
    || die "virt-controller or kubevirt-manifests missing in '$bin': run hack/harness/build.sh"
  kubectl get crd virtualmachines.kubevirt.io >/dev/null 2>&1 \
    || die "KubeVirt's CRDs are not installed: hack/cluster.sh up installs them"
  mkdir -p "$PIDS" "$LOGS"
  if alive; then log "virt-controller already running"; return 0; fi

  kubectl create namespace "$NAMESPACE" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
  log "virt-controller's ServiceAccount and RBAC (virt-operator's, from kubevirt-manifests controller-rbac)"
  "$bin/kubevirt-manifests" controller-rbac "$NAMESPACE" \
    | kubectl apply --server-side --force-conflicts --field-manager=livedisk-kubevirt -f - >/dev/null
  local kubeconfig
  kubeconfig="$(write_kubeconfig)"
  log "KubeVirt CR $NAMESPACE/kubevirt (feature gate Snapshot; status.phase Deployed, in virt-operator's place)"
  apply_kubevirt_cr

  # virt-controller's metrics endpoint serves TLS only: a self-signed certificate of its own.
  local pki="$STATE/kubevirt-pki"
  if [ ! -f "$pki/tls.crt" ]; then
    mkdir -p "$pki"; chmod 700 "$pki"
    openssl req -x509 -new -newkey rsa:2048 -nodes -keyout "$pki/tls.key" -subj "/CN=virt-controller" \
      -addext "subjectAltName=IP:127.0.0.1" -days 30 -out "$pki/tls.crt" 2>/dev/null
  fi

  log "starting $bin/virt-controller, log $LOGS/virt-controller.log"
  setsid "$bin/virt-controller" --kubeconfig "$kubeconfig" --listen 127.0.0.1 --port "$PORT" \
    --prom-cert-file "$pki/tls.crt" --prom-key-file "$pki/tls.key" \
    >"$LOGS/virt-controller.log" 2>&1 < /dev/null &
  echo $! > "$PIDS/virt-controller.pid"
  local start=$SECONDS
  until started; do
    alive || { tail -n 30 "$LOGS/virt-controller.log" >&2; die "virt-controller exited (log above)"; }
    [ $((SECONDS - start)) -lt 120 ] || { tail -n 30 "$LOGS/virt-controller.log" >&2; die "virt-controller did not start its controllers in 120 s"; }
    sleep 0.5
  done
  log "virt-controller leads (lease $NAMESPACE/virt-controller) and runs its controllers ($((SECONDS - start))s)"
}

cmd_status() {
  if alive; then echo "virt-controller running (pid $(cat "$PIDS/virt-controller.pid"))"; else echo "virt-controller not running"; return 1; fi
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  *) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
