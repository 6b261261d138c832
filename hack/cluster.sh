#!/usr/bin/env bash
# A real, local Kubernetes control plane on 127.0.0.1, built from Go modules by
# hack/harness/build.sh: etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler and the external-snapshotter snapshot-controller, plus the
# snapshot.storage.k8s.io / groupsnapshot.storage.k8s.io / cbt.storage.k8s.io CRDs, KubeVirt's
# and CDI's CRDs (kubevirt.io, snapshot.kubevirt.io, cdi.kubevirt.io, ...) and two Node
# objects (node-a, node-b). No kubelet runs: tests play its part.
# Also virt-api-standin (tests/virt-api-standin), a STAND-IN for KubeVirt's virt-api: the
# aggregated API subresources.kubevirt.io/v1 (VMI freeze/unfreeze), registered as the APIService
# v1.subresources.kubevirt.io through the Service kubevirt/virt-api-standin (ExternalName
# localhost); its call record is $STATE/virt-api-standin/calls.jsonl.
#
#   hack/cluster.sh up       start (idempotent: a healthy running cluster is left alone)
#   hack/cluster.sh down     stop every process it started; deletes the cluster data
#                            (LIVEDISK_KEEP_DATA=1 or `down --keep-data` keeps it)
#   hack/cluster.sh status   which processes are up (exit 0 only when all are)
#
# State: ${LIVEDISK_STATE_DIR:-$PWD/.livedisk}: kubeconfig, env (source it), logs/, pids/,
# pki/, etcd/.   `source $STATE/env` sets KUBECONFIG and puts the built binaries on PATH.
#
# Ports (all on 127.0.0.1), overridable:
#   LIVEDISK_APISERVER_PORT  (6443)   LIVEDISK_ETCD_PORT (23790)  LIVEDISK_ETCD_PEER_PORT (23800)
#   LIVEDISK_KCM_PORT        (20257)  LIVEDISK_SCHEDULER_PORT (20259)
#   LIVEDISK_VIRT_API_STANDIN_PORT (the API server port + 1: 6444) the virt-api stand-in
# Other: LIVEDISK_CACHE_DIR (build cache, see hack/harness/build.sh),
#   LIVEDISK_UP_TIMEOUT (seconds to wait for readiness, 180),
#   LIVEDISK_SNAPSHOT_FEATURE_GATES (snapshot-controller, "CSIVolumeGroupSnapshot=true"),
#   LIVEDISK_VIRT_API_STANDIN_BIN (the stand-in's binary; default: cargo builds it).
# Real nodes (prototype, hack/node.sh; both default to today's behaviour):
#   LIVEDISK_FAKE_NODES      the Node objects registered without a kubelet ("node-a node-b");
#                            when empty, the node lifecycle controller runs as on a real cluster.
#   LIVEDISK_APISERVER_ADDRESS  (127.0.0.1) the address the API server binds and advertises. Any
#                            other address (one that pods in the nodes' namespaces can reach, e.g.
#                            $LIVEDISK_SUBNET.0.1) switches on what kubelets need: that address is
#                            put on a host interface ${LIVEDISK_LINK_PREFIX:-ld}-api when no
#                            interface has it, the kubernetes Service gets it as its endpoint
#                            (lease reconciler), the Node authorizer and NodeRestriction run, and
#                            the API server authenticates to kubelets with a client certificate.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HARNESS_DIR="$REPO_ROOT/hack/harness"

STATE="${LIVEDISK_STATE_DIR:-$PWD/.livedisk}"
mkdir -p "$STATE" && STATE="$(cd "$STATE" && pwd)"
PKI="$STATE/pki"; LOGS="$STATE/logs"; PIDS="$STATE/pids"
KUBECONFIG_FILE="$STATE/kubeconfig"

HOST=127.0.0.1
# The API server's own address; 127.0.0.1 unless real nodes must reach it (see the header).
API_HOST="${LIVEDISK_APISERVER_ADDRESS:-127.0.0.1}"
REAL_NODES=0; [ "$API_HOST" != 127.0.0.1 ] && REAL_NODES=1
API_LINK="${LIVEDISK_LINK_PREFIX:-ld}-api"
APISERVER_PORT="${LIVEDISK_APISERVER_PORT:-6443}"
ETCD_PORT="${LIVEDISK_ETCD_PORT:-23790}"
ETCD_PEER_PORT="${LIVEDISK_ETCD_PEER_PORT:-23800}"
KCM_PORT="${LIVEDISK_KCM_PORT:-20257}"
SCHEDULER_PORT="${LIVEDISK_SCHEDULER_PORT:-20259}"
# Derived from the API server's port, so that clusters side by side (each with its own API server
# port) get distinct ones without setting it.
STANDIN_PORT="${LIVEDISK_VIRT_API_STANDIN_PORT:-$((APISERVER_PORT + 1))}"
STANDIN_DIR="$STATE/virt-api-standin"
UP_TIMEOUT="${LIVEDISK_UP_TIMEOUT:-180}"
SNAPSHOT_FEATURE_GATES="${LIVEDISK_SNAPSHOT_FEATURE_GATES-CSIVolumeGroupSnapshot=true}"
SERVICE_CIDR="10.96.0.0/24"
SERVICE_IP="10.96.0.1"
SA_ISSUER="https://kubernetes.default.svc.cluster.local"
read -r -a NODES <<< "${LIVEDISK_FAKE_NODES-node-a node-b}"

# Start order; down stops in reverse.
COMPONENTS=(etcd kube-apiserver kube-controller-manager kube-scheduler snapshot-controller virt-api-standin)

T0=$SECONDS
log() { echo "cluster: [$((SECONDS - T0))s] $*" >&2; }
die() { echo "cluster: ERROR: $*" >&2; exit 1; }

need() {
  command -v "$1" >/dev/null 2>&1 || die "'$1' is missing: install $2"
}

# --- processes -------------------------------------------------------------------------

pid_of() { [ -f "$PIDS/$1.pid" ] && cat "$PIDS/$1.pid" 2>/dev/null || true; }

# alive NAME: the pid in the pid file runs, and it is that binary (not a recycled pid).
alive() {
  local pid; pid="$(pid_of "$1")"
  [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
  tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q -- "/$1 " || return 1
  # A zombie is not alive.
  ! grep -q '^State:[[:space:]]*Z' "/proc/$pid/status" 2>/dev/null
}

# start NAME ARGS...: runs $BIN/NAME in its own session, log in $LOGS/NAME.log.
start() { local name="$1"; shift; start_at "$name" "$BIN/$name" "$@"; }

# start_at NAME PATH ARGS...: runs PATH (a binary named NAME) in its own session.
start_at() {
  local name="$1" path="$2"; shift 2
  log "starting $name (log: $LOGS/$name.log)"
  setsid "$path" "$@" </dev/null >"$LOGS/$name.log" 2>&1 &
  echo $! > "$PIDS/$name.pid"
  sleep 1
  alive "$name" || { tail -n 30 "$LOGS/$name.log" >&2; die "$name exited right after start (log above: $LOGS/$name.log)"; }
}

stop_one() {
  local name="$1" pid i
  pid="$(pid_of "$name")"
  if [ -z "$pid" ]; then return 0; fi
  if alive "$name"; then
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 100); do alive "$name" || break; sleep 0.1; done
    if alive "$name"; then
      log "$name did not exit after TERM in 10s: KILL"
      kill -KILL "$pid" 2>/dev/null || true
      for i in $(seq 1 50); do alive "$name" || break; sleep 0.1; done
    fi
    alive "$name" && die "could not stop $name (pid $pid)"
  fi
  rm -f "$PIDS/$name.pid"
}

# --- certificates ----------------------------------------------------------------------

PKI_DAYS=3650
CLIENT_EXT="basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"

# new_ca NAME CN: a self-signed CA NAME.crt/.key.
new_ca() {
  openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days "$PKI_DAYS" \
    -keyout "$PKI/$1.key" -out "$PKI/$1.crt" -subj "/CN=$2" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" 2>/dev/null
}

# signed NAME SUBJECT EXTFILE-CONTENT [CA]: NAME.crt/.key signed by CA (default: ca).
signed() {
  local name="$1" subj="$2" ext="$3" ca="${4:-ca}"
  openssl req -newkey rsa:2048 -nodes -sha256 -keyout "$PKI/$name.key" -out "$PKI/$name.csr" -subj "$subj" 2>/dev/null
  printf '%s\n' "$ext" > "$PKI/$name.ext"
  openssl x509 -req -sha256 -days "$PKI_DAYS" -in "$PKI/$name.csr" -CA "$PKI/$ca.crt" -CAkey "$PKI/$ca.key" \
    -CAcreateserial -out "$PKI/$name.crt" -extfile "$PKI/$name.ext" 2>/dev/null
  rm -f "$PKI/$name.csr" "$PKI/$name.ext"
}

gen_pki() {
  mkdir -p "$PKI"; chmod 700 "$PKI"
  [ -f "$PKI/ca.crt" ] && [ -f "$PKI/sa.key" ] && { gen_aggregation_pki; return 0; }
  log "generating CA, serving and client certificates, service-account key pair (openssl)"
  new_ca ca livedisk-local-ca
  local client="$CLIENT_EXT"
  signed apiserver "/CN=kube-apiserver" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,IP:$API_HOST,IP:$SERVICE_IP,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  signed admin "/O=system:masters/CN=livedisk-admin" "$client"
  signed kube-controller-manager "/CN=system:kube-controller-manager" "$client"
  signed kube-scheduler "/CN=system:kube-scheduler" "$client"
  # The API server's identity towards kubelets (logs, exec, port-forward); bound to
  # system:kubelet-api-admin in real-node mode.
  signed apiserver-kubelet-client "/CN=livedisk:apiserver-kubelet-client" "$client"
  openssl genrsa -out "$PKI/sa.key" 2048 2>/dev/null
  openssl rsa -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub" 2>/dev/null
  gen_aggregation_pki
  chmod 600 "$PKI"/*.key
}

# API aggregation: the front-proxy CA (its own, as kubeadm makes it) and the API server's client
# certificate of it, with which the aggregator calls aggregated API servers and vouches for the
# X-Remote-* headers; the virt-api stand-in's serving certificate (cluster CA; the name the
# aggregator checks is <service>.<namespace>.svc) and its client certificate towards the API
# server (user livedisk:virt-api-standin). Made when missing (also in a kept, older PKI).
gen_aggregation_pki() {
  [ -f "$PKI/virt-api-standin-client.crt" ] && return 0
  log "generating the front-proxy CA and client certificate, the virt-api stand-in's certificates (openssl)"
  new_ca front-proxy-ca livedisk-front-proxy-ca
  signed front-proxy-client "/CN=front-proxy-client" "$CLIENT_EXT" front-proxy-ca
  signed virt-api-standin "/CN=virt-api-standin.kubevirt.svc" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=DNS:virt-api-standin.kubevirt.svc,DNS:localhost,IP:127.0.0.1"
  signed virt-api-standin-client "/CN=livedisk:virt-api-standin" "$CLIENT_EXT"
  chmod 600 "$PKI"/*.key
}

# kubeconfig FILE CERTNAME USER
write_kubeconfig() {
  local file="$1" cert="$2" user="$3"
  cat > "$file" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: livedisk
  cluster:
    server: https://$API_HOST:$APISERVER_PORT
    certificate-authority-data: $(base64 -w0 < "$PKI/ca.crt")
users:
- name: $user
  user:
    client-certificate-data: $(base64 -w0 < "$PKI/$cert.crt")
    client-key-data: $(base64 -w0 < "$PKI/$cert.key")
contexts:
- name: livedisk
  context:
    cluster: livedisk
    user: $user
current-context: livedisk
EOF
  chmod 600 "$file"
}

# --- waiting ---------------------------------------------------------------------------

kc() { "$BIN/kubectl" --kubeconfig "$KUBECONFIG_FILE" "$@"; }

# wait_for WHAT COMPONENT CMD...: retries CMD until it succeeds; fails early if COMPONENT died.
wait_for() {
  local what="$1" comp="$2"; shift 2
  local start=$SECONDS next=$((SECONDS + 10))
  until "$@" >/dev/null 2>&1; do
    if [ -n "$comp" ] && ! alive "$comp"; then
      tail -n 30 "$LOGS/$comp.log" >&2
      die "$comp died while waiting for $what (log above: $LOGS/$comp.log)"
    fi
    [ $((SECONDS - start)) -ge "$UP_TIMEOUT" ] && die "timed out after ${UP_TIMEOUT}s waiting for $what (logs: $LOGS)"
    if [ $SECONDS -ge $next ]; then log "  still waiting for $what ($((SECONDS - start))s)"; next=$((SECONDS + 10)); fi
    sleep 0.5
  done
  log "$what: ok ($((SECONDS - start))s)"
}

# GET /health on etcd's client URL with bash's /dev/tcp (no curl needed).
etcd_healthy() {
  local out
  out="$(exec 3<>"/dev/tcp/$HOST/$ETCD_PORT" && printf 'GET /health HTTP/1.0\r\nHost: %s\r\n\r\n' "$HOST" >&3 && timeout 2 cat <&3)" || return 1
  case "$out" in *'"health":"true"'*) return 0 ;; *) return 1 ;; esac
}
apiserver_ready() { [ "$(kc get --raw /readyz 2>/dev/null)" = "ok" ]; }

# Real-node mode: the API server's address must exist on the host before it binds it. An
# interface of its own holds it when no interface has it yet (removed by down): a dummy one, or,
# where the kernel has no dummy driver, one end of a veth pair whose other end stays unused.
ensure_api_address() {
  [ "$REAL_NODES" = 1 ] || return 0
  need ip "iproute2 (apt-get install iproute2)"
  ip -o addr show | grep -q " inet $API_HOST/" && return 0
  log "putting $API_HOST on a host interface $API_LINK (pods of real nodes reach the API server there)"
  if ! ip link add "$API_LINK" type dummy 2>/dev/null; then
    ip link add "$API_LINK" type veth peer name "$API_LINK-peer"
    ip link set "$API_LINK-peer" up
  fi
  ip addr add "$API_HOST/32" dev "$API_LINK"
  ip link set "$API_LINK" up
}
# /healthz is on the always-allowed paths of controller-manager and scheduler.
component_healthy() {
  [ "$("$BIN/kubectl" --kubeconfig "$KUBECONFIG_FILE" --server "https://$HOST:$1" \
        --insecure-skip-tls-verify=true get --raw /healthz 2>/dev/null)" = "ok" ]
}

all_alive() { local c; for c in "${COMPONENTS[@]}"; do alive "$c" || return 1; done; }

# --- cluster content -------------------------------------------------------------------

install_crds() {
  local snap_dir sms_dir f
  snap_dir="$(cd "$HARNESS_DIR" && GOFLAGS=-mod=mod go list -m -f '{{.Dir}}' github.com/kubernetes-csi/external-snapshotter/client/v8)/config/crd"
  sms_dir="$(cd "$HARNESS_DIR" && GOFLAGS=-mod=mod go list -m -f '{{.Dir}}' github.com/kubernetes-csi/external-snapshot-metadata/client)/config/crd"
  [ -d "$snap_dir" ] || die "external-snapshotter CRD dir not found: $snap_dir (run hack/harness/build.sh)"
  [ -d "$sms_dir" ] || die "external-snapshot-metadata CRD dir not found: $sms_dir (run hack/harness/build.sh)"
  log "installing CRDs from $snap_dir and $sms_dir"
  local args=()
  for f in "$snap_dir"/*.storage.k8s.io_*.yaml "$sms_dir"/*.yaml; do args+=(-f "$f"); done
  kc apply --server-side --force-conflicts "${args[@]}" >/dev/null
  local crds=(volumesnapshots.snapshot.storage.k8s.io volumesnapshotcontents.snapshot.storage.k8s.io
    volumesnapshotclasses.snapshot.storage.k8s.io volumegroupsnapshots.groupsnapshot.storage.k8s.io
    volumegroupsnapshotcontents.groupsnapshot.storage.k8s.io volumegroupsnapshotclasses.groupsnapshot.storage.k8s.io
    snapshotmetadataservices.cbt.storage.k8s.io)
  local c
  for c in "${crds[@]}"; do
    wait_for "CRD $c Established" kube-apiserver kc wait --for condition=Established --timeout=5s "crd/$c"
  done
  install_kubevirt_crds
}

# KubeVirt's and CDI's CRDs, exactly as their operators install them: generated by
# hack/harness/kubevirt (kubevirt-manifests crds) from their Go modules, once per harness cache
# key (the file sits beside the binaries), then applied server-side (the VirtualMachine CRD is
# far too big for the last-applied annotation of a client-side apply).
install_kubevirt_crds() {
  local file="$BIN/../kubevirt-crds.yaml"
  if [ ! -s "$file" ]; then
    [ -x "$BIN/kubevirt-manifests" ] || die "$BIN/kubevirt-manifests missing (run hack/harness/build.sh)"
    "$BIN/kubevirt-manifests" crds > "$file.tmp.$$" || { rm -f "$file.tmp.$$"; die "kubevirt-manifests crds failed"; }
    mv -f "$file.tmp.$$" "$file"
  fi
  log "installing KubeVirt's and CDI's CRDs ($(grep -c '^kind: CustomResourceDefinition' "$file") from $file)"
  kc apply --server-side --force-conflicts -f "$file" >/dev/null
  # One list per try (`kubectl wait` on 31 CRDs takes ~4 s even when all are Established).
  wait_for "KubeVirt and CDI CRDs Established" kube-apiserver crds_established "$file"
}

# crds_established FILE: every CRD named in FILE is Established.
crds_established() {
  local want have
  want="$(sed -n 's/^  name: //p' "$1" | LC_ALL=C sort)"
  have="$(kc get crd -o jsonpath='{range .items[*]}{.metadata.name}{" "}{.status.conditions[?(@.type=="Established")].status}{"\n"}{end}' \
    | sed -n 's/ True$//p' | LC_ALL=C sort)"
  [ -z "$(LC_ALL=C comm -23 <(echo "$want") <(echo "$have"))" ]
}

register_nodes() {
  local n now
  now="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  for n in "${NODES[@]}"; do
    log "registering Node $n (Ready, as a kubelet would)"
    kc apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Node
metadata:
  name: $n
  labels:
    kubernetes.io/hostname: $n
    kubernetes.io/os: linux
    kubernetes.io/arch: amd64
    topology.livedisk.io/node: $n
spec: {}
EOF
    kc patch node "$n" --subresource=status --type=merge -p "{\"status\":{
      \"capacity\":{\"cpu\":\"4\",\"memory\":\"8Gi\",\"pods\":\"110\",\"ephemeral-storage\":\"50Gi\"},
      \"allocatable\":{\"cpu\":\"4\",\"memory\":\"8Gi\",\"pods\":\"110\",\"ephemeral-storage\":\"50Gi\"},
      \"conditions\":[{\"type\":\"Ready\",\"status\":\"True\",\"reason\":\"KubeletReady\",\"message\":\"livedisk test node (no kubelet; tests play its part)\",\"lastHeartbeatTime\":\"$now\",\"lastTransitionTime\":\"$now\"}],
      \"addresses\":[{\"type\":\"InternalIP\",\"address\":\"127.0.0.1\"},{\"type\":\"Hostname\",\"address\":\"$n\"}],
      \"nodeInfo\":{\"architecture\":\"amd64\",\"operatingSystem\":\"linux\",\"kubeletVersion\":\"v1.36.3\",\"kubeProxyVersion\":\"\",\"machineID\":\"\",\"systemUUID\":\"\",\"bootID\":\"\",\"kernelVersion\":\"\",\"osImage\":\"\",\"containerRuntimeVersion\":\"\"}}}" >/dev/null
    # The TaintNodesByCondition admission adds not-ready on create; the node lifecycle
    # controller (disabled: no heartbeats) would remove it once Ready.
    kc taint node "$n" node.kubernetes.io/not-ready:NoSchedule- >/dev/null 2>&1 || true
  done
}

# --- the virt-api stand-in -------------------------------------------------------------

# Its binary: LIVEDISK_VIRT_API_STANDIN_BIN, or built by cargo from this repository (a no-op
# when up to date). `--workspace --bin`, not `-p`: the dependencies are then resolved with the
# workspace's features, so the artifacts of `cargo build --workspace` are reused, not rebuilt.
standin_binary() {
  if [ -n "${LIVEDISK_VIRT_API_STANDIN_BIN:-}" ]; then echo "$LIVEDISK_VIRT_API_STANDIN_BIN"; return 0; fi
  need cargo "the Rust toolchain (hack/deps.sh)"
  need jq "jq (apt-get install jq)"
  (cd "$REPO_ROOT" && nice cargo build -q --workspace --bin virt-api-standin --message-format=json) |
    jq -r 'select(.reason == "compiler-artifact" and .executable != null) | .executable' | tail -n 1
}

# Its identity (a client certificate of the cluster CA) may review access and read and patch
# VMIs; the aggregator finds it through an ExternalName Service: for those the API server's
# service resolver (k8s.io/apiserver/pkg/util/proxy ResolveCluster) dials
# https://<externalName>:<APIService port> directly, with no endpoints or kube-proxy involved,
# and verifies the serving certificate against the caBundle for <service>.<namespace>.svc.
register_standin() {
  kc apply --server-side --force-conflicts --field-manager=livedisk-cluster -f - >/dev/null <<EOF
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: livedisk:virt-api-standin
rules:
- apiGroups: [authorization.k8s.io]
  resources: [subjectaccessreviews]
  verbs: [create]
- apiGroups: [kubevirt.io]
  resources: [virtualmachineinstances]
  verbs: [get, patch]
- apiGroups: [kubevirt.io]
  resources: [virtualmachineinstances/status]
  verbs: [patch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: livedisk:virt-api-standin
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: livedisk:virt-api-standin
subjects:
- apiGroup: rbac.authorization.k8s.io
  kind: User
  name: livedisk:virt-api-standin
---
apiVersion: v1
kind: Namespace
metadata:
  name: kubevirt
---
apiVersion: v1
kind: Service
metadata:
  name: virt-api-standin
  namespace: kubevirt
spec:
  type: ExternalName
  externalName: localhost
---
apiVersion: apiregistration.k8s.io/v1
kind: APIService
metadata:
  name: v1.subresources.kubevirt.io
spec:
  group: subresources.kubevirt.io
  version: v1
  groupPriorityMinimum: 1000
  versionPriority: 15
  service:
    namespace: kubevirt
    name: virt-api-standin
    port: $STANDIN_PORT
  caBundle: $(base64 -w0 < "$PKI/ca.crt")
EOF
}

write_env() {
  cat > "$STATE/env" <<EOF
# source this file: livedisk local cluster (hack/cluster.sh)
export KUBECONFIG="$KUBECONFIG_FILE"
export PATH="$BIN:\$PATH"
export LIVEDISK_STATE_DIR="$STATE"
export LIVEDISK_HARNESS_BIN="$BIN"
EOF
  # Real-node mode: what hack/node.sh and `make down` need to find this cluster's nodes again.
  if [ "$REAL_NODES" = 1 ]; then
    cat >> "$STATE/env" <<EOF
export LIVEDISK_APISERVER_ADDRESS="$API_HOST"
export LIVEDISK_FAKE_NODES=""
export LIVEDISK_SUBNET="${LIVEDISK_SUBNET:-10.231}"
export LIVEDISK_LINK_PREFIX="${LIVEDISK_LINK_PREFIX:-ld}"
EOF
  fi
  chmod 644 "$STATE/env"
}

# --- commands --------------------------------------------------------------------------

# The audit policy: every request of the livedisk namespace's ServiceAccounts (the chart's
# components) at Metadata level, and nothing else. hack/audit-check.sh reads the log to prove the
# chart's RBAC: no request of theirs was refused, and every verb granted to them was used.
# Blocking mode, so a request is in the log before its answer is sent.
write_audit_policy() {
  cat > "$STATE/audit-policy.yaml" <<'YAML'
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: Metadata
  userGroups: ["system:serviceaccounts:livedisk-system"]
- level: None
YAML
}

cmd_up() {
  need go "Go >= 1.26 (it builds the control plane from hack/harness)"
  need openssl "openssl (apt-get install openssl)"
  need setsid "util-linux (apt-get install util-linux)"
  need base64 "coreutils"
  mkdir -p "$LOGS" "$PIDS"

  BIN="$("$HARNESS_DIR/build.sh" | tail -n 1)"
  [ -x "$BIN/kube-apiserver" ] || die "build.sh did not produce binaries in '$BIN'"

  if all_alive && apiserver_ready; then
    write_env
    log "already running and healthy (kubeconfig: $KUBECONFIG_FILE); nothing to do"
    echo "source $STATE/env"
    return 0
  fi
  local c
  for c in "${COMPONENTS[@]}"; do
    if alive "$c"; then log "found a partly running cluster: stopping it first"; cmd_down --quiet; break; fi
  done
  local standin_bin
  standin_bin="$(standin_binary)"
  [ -x "$standin_bin" ] || die "the virt-api stand-in's binary was not built ('$standin_bin')"
  # A fresh cluster each up (unless the data was kept by `down --keep-data`).
  gen_pki
  write_kubeconfig "$KUBECONFIG_FILE" admin livedisk-admin
  write_kubeconfig "$STATE/kube-controller-manager.kubeconfig" kube-controller-manager system:kube-controller-manager
  write_kubeconfig "$STATE/kube-scheduler.kubeconfig" kube-scheduler system:kube-scheduler
  write_env
  write_audit_policy
  # A fresh cluster gets a fresh audit log: the RBAC proof reads one run.
  rm -f "$LOGS"/audit*.log

  start etcd --name livedisk --data-dir "$STATE/etcd" \
    --listen-client-urls "http://$HOST:$ETCD_PORT" --advertise-client-urls "http://$HOST:$ETCD_PORT" \
    --listen-peer-urls "http://$HOST:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://$HOST:$ETCD_PEER_PORT" \
    --initial-cluster "livedisk=http://$HOST:$ETCD_PEER_PORT" --initial-cluster-state new \
    --unsafe-no-fsync --log-level warn
  wait_for "etcd on $HOST:$ETCD_PORT" etcd etcd_healthy

  ensure_api_address
  # Real-node mode: kubelets authenticate as system:node:<name> and are authorized by the Node
  # authorizer; the kubernetes Service's endpoint is the advertised address (lease reconciler).
  local node_args=(--endpoint-reconciler-type none --authorization-mode RBAC)
  if [ "$REAL_NODES" = 1 ]; then
    node_args=(--endpoint-reconciler-type lease --authorization-mode Node,RBAC
      --enable-admission-plugins NodeRestriction
      --kubelet-preferred-address-types InternalIP,Hostname
      --kubelet-client-certificate "$PKI/apiserver-kubelet-client.crt"
      --kubelet-client-key "$PKI/apiserver-kubelet-client.key")
  fi
  start kube-apiserver \
    --etcd-servers "http://$HOST:$ETCD_PORT" \
    --bind-address "$API_HOST" --advertise-address "$API_HOST" --secure-port "$APISERVER_PORT" \
    --tls-cert-file "$PKI/apiserver.crt" --tls-private-key-file "$PKI/apiserver.key" \
    --client-ca-file "$PKI/ca.crt" \
    --requestheader-client-ca-file "$PKI/front-proxy-ca.crt" \
    --requestheader-allowed-names front-proxy-client \
    --requestheader-username-headers X-Remote-User \
    --requestheader-uid-headers X-Remote-Uid \
    --requestheader-group-headers X-Remote-Group \
    --requestheader-extra-headers-prefix X-Remote-Extra- \
    --proxy-client-cert-file "$PKI/front-proxy-client.crt" \
    --proxy-client-key-file "$PKI/front-proxy-client.key" \
    --service-account-issuer "$SA_ISSUER" \
    --service-account-key-file "$PKI/sa.pub" \
    --service-account-signing-key-file "$PKI/sa.key" \
    --api-audiences "$SA_ISSUER" \
    "${node_args[@]}" \
    --service-cluster-ip-range "$SERVICE_CIDR" \
    --allow-privileged=true \
    --cert-dir "$PKI/apiserver-generated" \
    --audit-policy-file "$STATE/audit-policy.yaml" --audit-log-path "$LOGS/audit.log" \
    --audit-log-format json --audit-log-maxsize 200 --audit-log-maxbackup 5 \
    --audit-log-mode blocking \
    --profiling=false
  wait_for "kube-apiserver /readyz on https://$API_HOST:$APISERVER_PORT" kube-apiserver apiserver_ready
  if [ "$REAL_NODES" = 1 ]; then
    kc create clusterrolebinding livedisk:apiserver-kubelet-client --clusterrole system:kubelet-api-admin \
      --user livedisk:apiserver-kubelet-client --dry-run=client -o yaml | kc apply -f - >/dev/null
  fi
  # Without heartbeats the node lifecycle controller would mark fake nodes unreachable and
  # evict their pods: it runs only when every node has a kubelet.
  local controllers='*,-nodelifecycle'
  [ ${#NODES[@]} -eq 0 ] && controllers='*'

  start kube-controller-manager \
    --kubeconfig "$STATE/kube-controller-manager.kubeconfig" \
    --authentication-kubeconfig "$STATE/kube-controller-manager.kubeconfig" \
    --authorization-kubeconfig "$STATE/kube-controller-manager.kubeconfig" \
    --bind-address "$HOST" --secure-port "$KCM_PORT" \
    --cert-dir "$PKI/kcm-generated" \
    --service-account-private-key-file "$PKI/sa.key" \
    --root-ca-file "$PKI/ca.crt" \
    --cluster-signing-cert-file "$PKI/ca.crt" --cluster-signing-key-file "$PKI/ca.key" \
    --use-service-account-credentials=true \
    --controllers "$controllers" \
    --service-cluster-ip-range "$SERVICE_CIDR" \
    --leader-elect=false --profiling=false
  start kube-scheduler \
    --kubeconfig "$STATE/kube-scheduler.kubeconfig" \
    --authentication-kubeconfig "$STATE/kube-scheduler.kubeconfig" \
    --authorization-kubeconfig "$STATE/kube-scheduler.kubeconfig" \
    --bind-address "$HOST" --secure-port "$SCHEDULER_PORT" \
    --cert-dir "$PKI/scheduler-generated" \
    --leader-elect=false --profiling=false

  install_crds
  register_nodes

  local gates=()
  [ -n "$SNAPSHOT_FEATURE_GATES" ] && gates=(--feature-gates "$SNAPSHOT_FEATURE_GATES")
  start snapshot-controller --kubeconfig "$KUBECONFIG_FILE" --leader-election=false "${gates[@]}"

  write_kubeconfig "$STATE/virt-api-standin.kubeconfig" virt-api-standin-client livedisk:virt-api-standin
  # A fresh record each up, like the audit log.
  mkdir -p "$STANDIN_DIR" && rm -f "$STANDIN_DIR/calls.jsonl"
  start_at virt-api-standin "$standin_bin" --address "$HOST" --port "$STANDIN_PORT" \
    --tls-cert-file "$PKI/virt-api-standin.crt" --tls-private-key-file "$PKI/virt-api-standin.key" \
    --requestheader-client-ca-file "$PKI/front-proxy-ca.crt" --requestheader-allowed-names front-proxy-client \
    --kubeconfig "$STATE/virt-api-standin.kubeconfig" --record "$STANDIN_DIR/calls.jsonl"
  register_standin

  wait_for "kube-controller-manager /healthz on :$KCM_PORT" kube-controller-manager component_healthy "$KCM_PORT"
  wait_for "kube-scheduler /healthz on :$SCHEDULER_PORT" kube-scheduler component_healthy "$SCHEDULER_PORT"
  wait_for "ServiceAccount default/default (controller-manager)" kube-controller-manager kc get serviceaccount default -n default
  wait_for "APIService v1.subresources.kubevirt.io Available (virt-api stand-in on $HOST:$STANDIN_PORT)" virt-api-standin \
    kc wait --for condition=Available --timeout=5s apiservice/v1.subresources.kubevirt.io

  # Every process must still be up a moment later (crash loops show here).
  sleep 2
  for c in "${COMPONENTS[@]}"; do
    alive "$c" || { tail -n 30 "$LOGS/$c.log" >&2; die "$c exited (log above: $LOGS/$c.log)"; }
  done
  log "cluster up in $((SECONDS - T0))s: kubeconfig $KUBECONFIG_FILE, binaries $BIN"
  echo "source $STATE/env"
}

cmd_down() {
  local keep="${LIVEDISK_KEEP_DATA:-0}" quiet=0 a
  for a in "$@"; do
    case "$a" in --keep-data) keep=1 ;; --quiet) quiet=1 ;; *) die "down: unknown option $a" ;; esac
  done
  local i
  for ((i = ${#COMPONENTS[@]} - 1; i >= 0; i--)); do stop_one "${COMPONENTS[$i]}"; done
  # The dummy interface of real-node mode, if this cluster made it.
  if [ "$REAL_NODES" = 1 ] && ip link show "$API_LINK" >/dev/null 2>&1; then ip link del "$API_LINK"; fi
  if [ "$keep" != 1 ]; then
    rm -rf "$STATE/etcd" "$PKI" "$KUBECONFIG_FILE" "$STATE"/*.kubeconfig "$STATE/env"
    [ $quiet = 1 ] || log "stopped; cluster data deleted (logs kept in $LOGS)"
  else
    [ $quiet = 1 ] || log "stopped; data kept in $STATE"
  fi
}

cmd_status() {
  local c pid up=0 total=0
  for c in "${COMPONENTS[@]}"; do
    total=$((total + 1))
    pid="$(pid_of "$c")"
    if alive "$c"; then up=$((up + 1)); printf '%-24s up    (pid %s)\n' "$c" "$pid"
    else printf '%-24s down\n' "$c"; fi
  done
  if [ -f "$STATE/env" ] && BIN="$(sed -n 's/^export LIVEDISK_HARNESS_BIN="\(.*\)"$/\1/p' "$STATE/env")" && [ -x "$BIN/kubectl" ] && apiserver_ready; then
    printf '%-24s ok    (https://%s:%s)\n' "apiserver /readyz" "$API_HOST" "$APISERVER_PORT"
  else
    printf '%-24s not ready\n' "apiserver /readyz"
  fi
  echo "$up/$total processes up; state dir $STATE"
  [ "$up" -eq "$total" ]
}

case "${1:-}" in
  up) shift; cmd_up "$@" ;;
  down) shift; cmd_down "$@" ;;
  status) shift; cmd_status "$@" ;;
  *) sed -n '2,37p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
