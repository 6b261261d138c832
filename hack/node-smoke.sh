#!/usr/bin/env bash
# Proof that a real node works here (prototype, not part of `make test`): a fresh cluster in
# real-node mode, node-a started by hack/node.sh, then
#   1. a busybox pod on node-a reaches Running and `kubectl logs` shows its line;
#   2. deleting it removes it, its containers included;
#   3. CoreDNS runs as a pod; a pod resolves kubernetes.default (search path) and a Service FQDN;
#   4. a node restart in miniature (stop: every process, cgroup, mount and link of the node goes;
#      start) brings a pod back Running;
# then everything is stopped and removed again. Prints the time of every step.
#
#   hack/node-smoke.sh        (root; uses LIVEDISK_STATE_DIR, ports, LINK_PREFIX, SUBNET as
#                              hack/cluster.sh and hack/node.sh do; stops what it started)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export LIVEDISK_STATE_DIR="${LIVEDISK_STATE_DIR:-$ROOT/.livedisk/node-smoke}"
SUBNET="${LIVEDISK_SUBNET:-10.231}"
export LIVEDISK_APISERVER_ADDRESS="${LIVEDISK_APISERVER_ADDRESS:-$SUBNET.0.1}"
export LIVEDISK_FAKE_NODES=""
NODE=node-a
IMAGE="$(hack/harness/node-build.sh --print-images | awk '$1 ~ /busybox/ {print $1}')"

passed=0 failed=0
T0=$SECONDS
step_t=$SECONDS
say() { echo "node-smoke: [$((SECONDS - T0))s] $*" >&2; }
ok() { passed=$((passed + 1)); say "ok: $1 ($((SECONDS - step_t))s)"; step_t=$SECONDS; }
fail() { failed=$((failed + 1)); say "FAILED: $1"; step_t=$SECONDS; }
check() { local what="$1"; shift; if "$@" >/dev/null; then ok "$what"; else fail "$what"; fi; }

cleanup() {
  hack/node.sh purge "$NODE" >/dev/null 2>&1 || true
  hack/cluster.sh down >/dev/null 2>&1 || true
}
trap cleanup EXIT

# pod NAME COMMAND: a busybox pod on the node.
pod() {
  kubectl apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Pod
metadata: {name: $1, namespace: default}
spec:
  nodeName: $NODE
  terminationGracePeriodSeconds: 2
  restartPolicy: ${3:-Always}
  containers:
  - name: c
    image: $IMAGE
    imagePullPolicy: Never
    command: [sh, -c, '$2']
EOF
}
containers_of_node() { hack/node.sh exec "$NODE" -- ctr -n k8s.io tasks ls -q 2>/dev/null | wc -l; }

say "builds (cached after the first run)"
hack/harness/build.sh >/dev/null
hack/harness/node-build.sh >/dev/null 2>&1
ok "builds"
cleanup
hack/cluster.sh up >/dev/null 2>&1
# shellcheck disable=SC1091
source "$LIVEDISK_STATE_DIR/env"
ok "cluster up (API server on $LIVEDISK_APISERVER_ADDRESS)"
hack/node.sh start "$NODE" 2>/dev/null
ok "node $NODE started and Ready"

pod hello "echo hello from $NODE; sleep 3600"
check "pod hello Running" kubectl wait --for condition=Ready pod/hello --timeout=120s
check "kubectl logs shows its line" bash -c "kubectl logs hello | grep -qx 'hello from $NODE'"
kubectl delete pod hello --wait=true --timeout=60s >/dev/null
check "pod hello deleted" bash -c "! kubectl get pod hello >/dev/null 2>&1"
# Its sandbox task goes with the pod (kubelet stops it; the container record may stay until GC).
for _ in $(seq 1 30); do [ "$(containers_of_node)" = 0 ] && break; sleep 1; done
check "no task left on the node" test "$(containers_of_node)" = 0

hack/node.sh dns 2>/dev/null
ok "CoreDNS Ready"
pod dns 'nslookup kubernetes.default.svc.cluster.local && ping -c 1 -W 1 kubernetes.default 2>&1 | head -n 1; true' Never
kubectl wait --for=jsonpath='{.status.phase}'=Succeeded pod/dns --timeout=120s >/dev/null || true
out="$(kubectl logs dns 2>&1 || true)"
check "kubernetes.default.svc.cluster.local resolves to 10.96.0.1" grep -q 'Address: 10.96.0.1$' <<< "$out"
check "kubernetes.default resolves through the search path" grep -q 'PING kubernetes.default (10.96.0.1)' <<< "$out"

pod again "echo back; sleep 3600"
kubectl wait --for condition=Ready pod/again --timeout=120s >/dev/null
hack/node.sh stop "$NODE" 2>/dev/null
check "node stopped: no process, cgroup or link left" bash -c "! ls -d /sys/fs/cgroup/*/livedisk-$NODE >/dev/null 2>&1 && ! ip link show ${LIVEDISK_LINK_PREFIX:-ld}-$NODE >/dev/null 2>&1"
hack/node.sh start "$NODE" 2>/dev/null
check "after the restart the pod runs again" kubectl wait --for=jsonpath='{.status.containerStatuses[0].restartCount}'=1 pod/again --timeout=120s
check "and logs again" bash -c "kubectl wait --for condition=Ready pod/again --timeout=60s >/dev/null && kubectl logs again | grep -qx back"

say "total $((SECONDS - T0))s"
echo "node-smoke: $passed passed, $failed failed"
[ "$failed" = 0 ]
