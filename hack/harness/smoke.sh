#!/usr/bin/env bash
# Smoke test of a running hack/cluster.sh cluster: readyz, nodes, snapshot APIs,
# TokenRequest, SubjectAccessReview, PVC, scheduling, namespace deletion and GC.
#   hack/cluster.sh up && hack/harness/smoke.sh
set -euo pipefail
STATE="${LIVEDISK_STATE_DIR:-$PWD/.livedisk}"
[ -f "$STATE/env" ] || { echo "smoke: $STATE/env missing: run hack/cluster.sh up first" >&2; exit 1; }
# shellcheck disable=SC1091
source "$STATE/env"
NS="smoke-$$"
pass=0; fail=0
check() {
  local what="$1"; shift
  if out="$("$@" 2>&1)"; then pass=$((pass + 1)); echo "ok    $what"
  else fail=$((fail + 1)); echo "FAIL  $what"; printf '%s\n' "$out" | sed 's/^/      /'; fi
}
retry() { local i; for i in $(seq 1 60); do "$@" && return 0; sleep 1; done; return 1; }

check "readyz" bash -c '[ "$(kubectl get --raw /readyz)" = ok ]'
check "2 Ready nodes" bash -c '[ "$(kubectl get nodes --no-headers | grep -c " Ready ")" = 2 ]'
check "topology label" bash -c 'kubectl get node node-a -o jsonpath="{.metadata.labels.topology\.livedisk\.io/node}" | grep -qx node-a'
check "snapshot API resources" bash -c 'kubectl api-resources | grep -q volumesnapshots && kubectl api-resources | grep -q volumegroupsnapshots && kubectl api-resources | grep -q snapshotmetadataservices'
check "namespace" kubectl create namespace "$NS"
check "ServiceAccount default appears" retry kubectl -n "$NS" get sa default
check "TokenRequest (kubectl create token)" bash -c "kubectl -n $NS create token default --audience https://kubernetes.default.svc.cluster.local | grep -q '^ey'"
check "TokenReview of that token" bash -c "t=\$(kubectl -n $NS create token default); printf '{\"apiVersion\":\"authentication.k8s.io/v1\",\"kind\":\"TokenReview\",\"spec\":{\"token\":\"%s\"}}' \"\$t\" | kubectl create -o jsonpath='{.status.authenticated}' -f - | grep -qx true"
check "SubjectAccessReview denies SA" bash -c "[ \"\$(kubectl auth can-i list secrets --as=system:serviceaccount:$NS:default 2>/dev/null)\" = no ]"
check "SubjectAccessReview allows admin" bash -c '[ "$(kubectl auth can-i "*" "*")" = yes ]'
check "PVC created (Pending)" bash -c "kubectl -n $NS apply -f - <<EOF
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: data}
spec:
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 1Gi}}
  storageClassName: none-such
EOF"
check "pod created" bash -c "kubectl -n $NS apply -f - <<EOF
apiVersion: v1
kind: Pod
metadata: {name: p}
spec:
  containers: [{name: c, image: busybox}]
EOF"
check "scheduler bound pod to a node" retry bash -c "kubectl -n $NS get pod p -o jsonpath='{.spec.nodeName}' | grep -q '^node-'"
check "GC deletes dependents" bash -c "
  kubectl -n $NS create configmap owner >/dev/null
  uid=\$(kubectl -n $NS get configmap owner -o jsonpath='{.metadata.uid}')
  kubectl -n $NS apply -f - >/dev/null <<EOF
apiVersion: v1
kind: ConfigMap
metadata:
  name: dependent
  ownerReferences: [{apiVersion: v1, kind: ConfigMap, name: owner, uid: \$uid}]
EOF
  kubectl -n $NS delete configmap owner >/dev/null
  for i in \$(seq 1 60); do kubectl -n $NS get configmap dependent >/dev/null 2>&1 || exit 0; sleep 1; done; exit 1"
# No kubelet: finish the pod's graceful deletion as a kubelet would, so the namespace can go.
check "namespace deletion (pod finalized as kubelet would)" bash -c "
  kubectl delete namespace $NS --wait=false >/dev/null
  for i in \$(seq 1 90); do
    kubectl -n $NS delete pod --all --grace-period=0 --force >/dev/null 2>&1 || true
    kubectl get namespace $NS >/dev/null 2>&1 || exit 0; sleep 1; done; exit 1"
echo "smoke: $pass passed, $fail failed"
[ "$fail" = 0 ]
