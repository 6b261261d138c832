#!/usr/bin/env bash
# A real Kubernetes node on this machine: containerd + runc, kubelet and kube-proxy
# in the node's own mount and network namespace, pods networked by CNI (ptp + host-local +
# loopback), joined to the cluster of hack/cluster.sh. See docs/real-nodes.md.
#
#   hack/node.sh start NAME         namespaces, link, containerd, images, kube-proxy, kubelet;
#                                   waits until the Node is Ready
#   hack/node.sh stop NAME          stops kubelet, kube-proxy, every container, containerd and its
#                                   shims; removes the node's cgroups, link and namespaces (its
#                                   data stays in $LIVEDISK_NODES_DIR/NAME, as a disk would)
#   hack/node.sh purge NAME         stop, then delete the node's data and its Node object
#   hack/node.sh exec NAME -- CMD   run CMD in the node's namespaces (ctr talks to its containerd)
#   hack/node.sh import NAME LIST.. import the images of hack/images.sh lists (ref digest archive)
#   hack/node.sh down               stop every node of LIVEDISK_NODES and remove the router
#   hack/node.sh dns                CoreDNS in the cluster (Deployment + kube-dns Service 10.96.0.10)
#   hack/node.sh status NAME
#
# The cluster must run in real-node mode: LIVEDISK_APISERVER_ADDRESS=$LIVEDISK_SUBNET.0.1 and
# LIVEDISK_FAKE_NODES without NAME (hack/cluster.sh). NAME is one of LIVEDISK_NODES ("node-a
# node-b"); its position i (1, 2, ...) picks its addresses: link $SUBNET.i.0/30 (host .1, node .2),
# pods $SUBNET.(128+i).0/24. Needs root, util-linux, iproute2, iptables, openssl, and the builds
# of hack/harness/build.sh (kubelet, kube-proxy) and hack/harness/node-build.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${LIVEDISK_STATE_DIR:-$ROOT/.livedisk}"
NODES_DIR="${LIVEDISK_NODES_DIR:-$STATE/nodes}"
LINK_PREFIX="${LIVEDISK_LINK_PREFIX:-ld}"
SUBNET="${LIVEDISK_SUBNET:-10.231}"
read -r -a ALL_NODES <<< "${LIVEDISK_NODES:-node-a node-b}"
PIDS="$STATE/pids" LOGS="$STATE/logs"
CLUSTER_DNS=10.96.0.10
CLUSTER_DOMAIN=cluster.local

T0=$SECONDS
log() { echo "node: [$((SECONDS - T0))s] $*" >&2; }
die() { echo "node: ERROR: $*" >&2; exit 1; }
usage() { sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

# --- the node's identity and places -----------------------------------------------------------

set_node() {
  NAME="$1"
  [[ "$NAME" =~ ^[a-z0-9][a-z0-9-]{0,30}$ ]] || die "bad node name: $NAME"
  local i=0 n
  INDEX=""
  for n in "${ALL_NODES[@]}"; do i=$((i + 1)); [ "$n" = "$NAME" ] && INDEX=$i; done
  [ -n "$INDEX" ] || die "$NAME is not in LIVEDISK_NODES (${ALL_NODES[*]})"
  NODE="$NODES_DIR/$NAME" NS="$NODES_DIR/$NAME/ns"
  HOST_IP="$SUBNET.$INDEX.1" NODE_IP="$SUBNET.$INDEX.2"
  POD_CIDR="$SUBNET.$((128 + INDEX)).0/24" CLUSTER_CIDR="$SUBNET.128.0/17"
  # One cgroup per node under every hierarchy's root: kubelet's cgroupRoot. Named with the
  # cluster's link prefix too: another cluster's node-a (make up beside make test) has its own,
  # and stopping one node must never touch the other's processes.
  CGROUP_ROOT="/livedisk-$LINK_PREFIX-$NAME"
}

# Node-private directories, bind-mounted at the standard paths inside the node's mount namespace,
# so kubelet, containerd, CNI and (later) the chart's hostPath volumes see a node's usual layout.
# /var/lib/livedisk holds the chart's pools and engine sockets (hostPath volumes): one per node.
NODE_BINDS=(var/lib/kubelet var/lib/containerd var/lib/cni var/log/pods etc/cni/net.d etc/kubernetes var/lib/livedisk)

in_node() { nsenter --mount="$NS/mnt" --net="$NS/net" -- "$@"; }

# --- processes ---------------------------------------------------------------------------------

pidfile() { echo "$PIDS/$NAME-$1.pid"; }
# alive WHAT: the pid in WHAT's pid file runs that binary (not a recycled pid), and is no zombie.
alive() {
  local f pid; f="$(pidfile "$1")"
  [ -f "$f" ] && pid="$(cat "$f")" && [ -r "/proc/$pid/cmdline" ] || return 1
  tr '\0' ' ' < "/proc/$pid/cmdline" | grep -q -- "/$1 " || return 1
  ! grep -q '^State:[[:space:]]*Z' "/proc/$pid/status" 2>/dev/null
}

# start_in_node WHAT ARGS...: $BIN_OF_WHAT in the node's namespaces, own session, log and pid file.
# nsenter execs the program (no pid namespace is entered), so the pid is the program's own.
start_in_node() {
  local what="$1" bin="$2"; shift 2
  alive "$what" && { log "$what already running (pid $(cat "$(pidfile "$what")"))"; return 0; }
  log "starting $what (log: $LOGS/$NAME-$what.log)"
  setsid nsenter --mount="$NS/mnt" --net="$NS/net" -- env PATH="$NODE_BIN:$HARNESS_BIN:/usr/sbin:/usr/bin:/sbin:/bin" \
    "$bin" "$@" </dev/null >>"$LOGS/$NAME-$what.log" 2>&1 &
  echo $! > "$(pidfile "$what")"
  sleep 1
  alive "$what" || { tail -n 30 "$LOGS/$NAME-$what.log" >&2; die "$what exited right after start"; }
}

# stop_proc WHAT: TERM, then KILL after 15 s.
stop_proc() {
  local what="$1" f pid
  f="$(pidfile "$what")"
  [ -f "$f" ] || return 0
  pid="$(cat "$f")"
  if alive "$what"; then
    log "stopping $what (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 150); do alive "$what" || break; sleep 0.1; done
    if alive "$what"; then log "$what ignored TERM for 15s: KILL"; kill -KILL "$pid" 2>/dev/null || true; sleep 0.5; fi
  fi
  rm -f "$f"
}

# --- builds ------------------------------------------------------------------------------------

find_builds() {
  HARNESS_BIN="$("$ROOT/hack/harness/build.sh" kubelet kube-proxy kubectl | tail -n 1)"
  local dir; dir="$("$ROOT/hack/harness/node-build.sh" | tail -n 1)"
  NODE_BIN="$dir/bin" NODE_CNI="$dir/cni"
  # The CNI dir holds links into the build cache; the node's /opt/cni/bin is a read-only bind of
  # the links (absolute paths, valid inside the node's mount namespace too).
  [ -x "$HARNESS_BIN/kubelet" ] && [ -x "$NODE_BIN/containerd" ] || die "builds missing (hack/harness/build.sh, node-build.sh)"
  mapfile -t IMAGES < <("$ROOT/hack/harness/node-build.sh" --print-images)
  PAUSE_IMAGE="$(echo "${IMAGES[0]}" | cut -d' ' -f1)"
}

# --- namespaces, mounts, network ---------------------------------------------------------------

# The same namespace files as hack/engine-ns.sh ($NODE/ns/{mnt,net}), so the node's engine can
# join them.
make_namespaces() {
  mkdir -p "$NS"
  mountpoint -q "$NS/mnt" && return 0
  log "mount and network namespaces ($NS)"
  # nsfs bind mounts must live on a private mount.
  mountpoint -q "$NS" || { mount --bind "$NS" "$NS"; mount --make-private "$NS"; }
  touch "$NS/mnt" "$NS/net"
  unshare --mount="$NS/mnt" --net="$NS/net" --propagation private true
}

# Inside the mount namespace: node-private /run and standard paths; kubelet's view of the kernel
# tunables it insists on (see below); then every mount shared within the node (as on a host with
# systemd), so that kubelet's and CSI's Bidirectional mounts propagate into and out of pods.
setup_mounts() {
  in_node mountpoint -q /run/livedisk-node && return 0
  log "node mounts: tmpfs /run, ${NODE_BINDS[*]/#//} bound from $NODE, CNI plugins at /opt/cni/bin"
  local d
  for d in "${NODE_BINDS[@]}" opt/cni/bin; do
    mkdir -p "/$d"            # the mount point on the shared root file system (empty)
    [ "$d" = opt/cni/bin ] || mkdir -p "$NODE/$d"
  done
  in_node mount -t tmpfs -o mode=0755,size=256m "livedisk-$NAME-run" /run
  in_node mkdir -p /run/livedisk-node
  for d in "${NODE_BINDS[@]}"; do in_node mount --bind "$NODE/$d" "/$d"; done
  in_node mount --bind "$NODE_CNI" /opt/cni/bin
  in_node mount -o remount,bind,ro /opt/cni/bin
  kernel_tunables_view
  in_node mount --make-rshared /
}

# kubelet checks six global kernel tunables; with protectKernelDefaults (so that it never writes
# them on this shared machine) it refuses to start when one differs. They are not per-namespace,
# so the node's mount namespace shows kubelet the values it expects, read-only, over the
# /proc/sys files that differ; the kernel's own values stay as they are (containers get a /proc
# of their own and see those).
KUBELET_TUNABLES=(vm/overcommit_memory=1 vm/panic_on_oom=0 kernel/panic=10 kernel/panic_on_oops=1
  kernel/keys/root_maxkeys=1000000 kernel/keys/root_maxbytes=25000000)
kernel_tunables_view() {
  local t key want have
  mkdir -p "$NODE/kernel-tunables"
  for t in "${KUBELET_TUNABLES[@]}"; do
    key="${t%%=*}" want="${t#*=}" have="$(cat "/proc/sys/$key")"
    [ "$have" = "$want" ] && continue
    log "  kernel tunable $key is $have, kubelet expects $want: the node's view shows $want"
    echo "$want" > "$NODE/kernel-tunables/${key//\//.}"
    in_node mount --bind -o ro "$NODE/kernel-tunables/${key//\//.}" "/proc/sys/$key"
  done
}

# The nodes' network: a router namespace of this cluster ($NODES_DIR/router/net) holds one veth
# per node ($SUBNET.i.1 router side, $SUBNET.i.2 = the node's eth0) and an uplink to the host
# ($LINK_PREFIX-rt: $SUBNET.0.5 host side, $SUBNET.0.6 router side). The router forwards between
# nodes (pods of node-a reach pods of node-b) and up to the host, where the API server listens on
# $SUBNET.0.1; the host itself never forwards (its ip_forward is a shared machine's setting) and
# only routes $SUBNET.0.0/16 to the router. Pods leaving their node are masqueraded (ptp ipMasq).
ROUTER_DIR="$NODES_DIR/router" ROUTER_UPLINK="$LINK_PREFIX-rt"
in_router() { nsenter --net="$ROUTER_DIR/net" -- "$@"; }

ensure_router() {
  mkdir -p "$ROUTER_DIR"
  if ! mountpoint -q "$ROUTER_DIR/net"; then
    log "router namespace ($ROUTER_DIR/net), uplink $ROUTER_UPLINK $SUBNET.0.5 <-> $SUBNET.0.6"
    mountpoint -q "$ROUTER_DIR" || { mount --bind "$ROUTER_DIR" "$ROUTER_DIR"; mount --make-private "$ROUTER_DIR"; }
    touch "$ROUTER_DIR/net"
    unshare --net="$ROUTER_DIR/net" true
  fi
  in_router ip link set lo up
  in_router sysctl -qw net.ipv4.ip_forward=1
  in_router ip link show uplink >/dev/null 2>&1 && return 0
  ip link del "$ROUTER_UPLINK" 2>/dev/null || true
  ip link add "$ROUTER_UPLINK" type veth peer name uplink
  move_to_router uplink
  ip addr add "$SUBNET.0.5/30" dev "$ROUTER_UPLINK"
  ip link set "$ROUTER_UPLINK" up
  in_router ip addr add "$SUBNET.0.6/30" dev uplink
  in_router ip link set uplink up
  in_router ip route add default via "$SUBNET.0.5"
  ip route replace "$SUBNET.0.0/16" via "$SUBNET.0.6" dev "$ROUTER_UPLINK"
}

# move_to_router IFACE [FROM-NS-ARGS...]: ip moves a link into a namespace named by a process in it.
move_to_router() {
  local iface="$1" holder; shift
  nsenter --net="$ROUTER_DIR/net" -- sleep 30 & holder=$!
  # The holder is in the router's namespace only once nsenter has entered it.
  local want i; want="$(stat -L -c %i "$ROUTER_DIR/net")"
  for i in $(seq 1 100); do
    [ "$(stat -L -c %i "/proc/$holder/ns/net" 2>/dev/null)" = "$want" ] && break
    sleep 0.02
  done
  "$@" ip link set "$iface" netns "$holder"
  kill "$holder" 2>/dev/null || true; wait "$holder" 2>/dev/null || true
}

remove_router() {
  ip link del "$ROUTER_UPLINK" 2>/dev/null || true
  ip route del "$SUBNET.0.0/16" 2>/dev/null || true
  if mountpoint -q "$ROUTER_DIR/net" 2>/dev/null; then umount "$ROUTER_DIR/net"; fi
  mountpoint -q "$ROUTER_DIR" 2>/dev/null && umount "$ROUTER_DIR"
  rm -rf "$ROUTER_DIR"
}

# The node's link: eth0 ($NODE_IP) in the node, "$NAME" ($HOST_IP) in the router, the node's
# default route via the router, and the router's route to the node's pods.
make_link() {
  in_node ip link set lo up
  # Routing between pods and eth0 in the node; per network namespace, the host's stays as it is.
  in_node sysctl -qw net.ipv4.ip_forward=1
  ensure_router
  in_node ip link show eth0 >/dev/null 2>&1 && return 0
  log "link $NAME eth0 ($NODE_IP) <-> router ($HOST_IP); pods $POD_CIDR"
  in_router ip link del "$NAME" 2>/dev/null || true
  in_node ip link add eth0 type veth peer name "$NAME"
  move_to_router "$NAME" in_node
  in_router ip addr add "$HOST_IP/30" dev "$NAME"
  in_router ip link set "$NAME" up
  in_node ip addr add "$NODE_IP/30" dev eth0
  in_node ip link set eth0 up
  in_node ip route add default via "$HOST_IP"
  in_router ip route replace "$POD_CIDR" via "$NODE_IP" dev "$NAME"
}

# kubelet's cgroupRoot must exist in every v1 hierarchy (on this host cgroups are a v1 + v2
# hybrid: v1 controllers, v2 only at /sys/fs/cgroup/unified). cpuset needs its cpus and mems
# before any task can join.
make_cgroups() {
  local h
  for h in /sys/fs/cgroup/*/; do
    h="${h%/}"
    [ -f "$h/cgroup.procs" ] || continue
    mkdir -p "$h$CGROUP_ROOT"
  done
  if [ -d /sys/fs/cgroup/cpuset ]; then
    local c=/sys/fs/cgroup/cpuset$CGROUP_ROOT
    [ -n "$(cat "$c/cpuset.cpus")" ] || cat /sys/fs/cgroup/cpuset/cpuset.cpus > "$c/cpuset.cpus"
    [ -n "$(cat "$c/cpuset.mems")" ] || cat /sys/fs/cgroup/cpuset/cpuset.mems > "$c/cpuset.mems"
  fi
}

# Processes left in the node's cgroups (containers, pause), deepest first; then the cgroups.
remove_cgroups() {
  local h tries
  for tries in 1 2 3 4 5 6 7 8 9 10; do
    local left=0 pid
    for h in /sys/fs/cgroup/*/; do
      [ -d "${h%/}$CGROUP_ROOT" ] || continue
      while read -r pid; do
        [ -n "$pid" ] || continue
        left=1; kill -KILL "$pid" 2>/dev/null || true
      done < <(find "${h%/}$CGROUP_ROOT" -name cgroup.procs -exec cat {} + 2>/dev/null)
    done
    [ $left = 0 ] && break
    # A frozen cgroup (kubelet never freezes, but a stopped runc may) holds its tasks: thaw it.
    find /sys/fs/cgroup/freezer$CGROUP_ROOT -name freezer.state 2>/dev/null | while read -r f; do echo THAWED > "$f" 2>/dev/null || true; done
    sleep 0.5
  done
  for h in /sys/fs/cgroup/*/; do
    [ -d "${h%/}$CGROUP_ROOT" ] || continue
    find "${h%/}$CGROUP_ROOT" -depth -type d -exec rmdir {} + 2>/dev/null || true
    [ -d "${h%/}$CGROUP_ROOT" ] && log "could not remove cgroup ${h%/}$CGROUP_ROOT"
  done
  return 0
}

# Processes still in the node's mount namespace after containerd stopped: its shims (they
# outlive containerd by design). Identified by namespace, ended by pid.
kill_node_processes() {
  mountpoint -q "$NS/mnt" 2>/dev/null || return 0
  local ns_ino pid
  ns_ino="$(stat -L -c %i "$NS/mnt" 2>/dev/null)" || return 0
  for pid in /proc/[0-9]*; do
    pid="${pid#/proc/}"
    [ "$(stat -L -c %i "/proc/$pid/ns/mnt" 2>/dev/null)" = "$ns_ino" ] || continue
    log "  ending $(tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | cut -c1-80) (pid $pid, in the node's mount namespace)"
    kill -KILL "$pid" 2>/dev/null || true
  done
}

# Loop devices are the kernel's, not the namespace's: a node going away (as in a reboot) must let
# go of the ones over its files (the engine's FUSE front ends), or they outlive it holding dead
# files. They are found from inside the node's mount namespace while it still exists: there the
# kernel names a loop device's backing file by its full path under the node's private
# directories (elsewhere only by its path inside its own mount). Busy ones (a filesystem still
# mounted in the node) are marked autoclear by losetup and go once the namespace's mounts go.
release_loop_devices() {
  mountpoint -q "$NS/mnt" 2>/dev/null || return 0
  local dev back
  while read -r dev back; do
    case "$back" in
      /var/lib/livedisk/*|/var/lib/kubelet/*)
        log "  detaching $dev (backed by $back in $NAME)"
        losetup -d "$dev" 2>/dev/null || true ;;
    esac
  done < <(in_node sh -c 'for f in /sys/block/loop*/loop/backing_file; do [ -r "$f" ] && d="${f#/sys/block/}" && echo "/dev/${d%%/*} $(cat "$f")"; done' 2>/dev/null)
}

# --- credentials -------------------------------------------------------------------------------

# A client certificate signed by the cluster CA (hack/cluster.sh's pki), and a kubeconfig.
client_kubeconfig() {
  local file="$1" subj="$2" dir; dir="$(dirname "$file")"
  local pki="$STATE/pki" key="$file.key" crt="$file.crt"
  [ -f "$pki/ca.key" ] || die "$pki/ca.key missing: is the cluster of hack/cluster.sh up?"
  mkdir -p "$dir"
  if [ ! -f "$crt" ] || ! openssl verify -CAfile "$pki/ca.crt" "$crt" >/dev/null 2>&1; then
    openssl req -newkey rsa:2048 -nodes -sha256 -keyout "$key" -out "$file.csr" -subj "$subj" 2>/dev/null
    printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n' > "$file.ext"
    openssl x509 -req -sha256 -days 365 -in "$file.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" \
      -CAcreateserial -out "$crt" -extfile "$file.ext" 2>/dev/null
    rm -f "$file.csr" "$file.ext"; chmod 600 "$key"
  fi
  cat > "$file" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: livedisk
  cluster: {server: "$API_SERVER", certificate-authority: "$pki/ca.crt"}
users:
- name: node
  user: {client-certificate: "$crt", client-key: "$key"}
contexts:
- name: livedisk
  context: {cluster: livedisk, user: node}
current-context: livedisk
EOF
  chmod 600 "$file"
}

# --- configuration -----------------------------------------------------------------------------

write_configs() {
  local etc="$NODE/etc/kubernetes"
  mkdir -p "$etc" "$NODE/etc/cni/net.d" "$NODE/etc/containerd"
  client_kubeconfig "$etc/kubelet.kubeconfig" "/O=system:nodes/CN=system:node:$NAME"
  client_kubeconfig "$etc/kube-proxy.kubeconfig" "/CN=system:kube-proxy"

  # containerd: node-private root and state (both at the standard paths in the node's mounts),
  # cgroupfs (runc's default), the pause image imported below as the sandbox image.
  cat > "$NODE/etc/containerd/config.toml" <<EOF
version = 3
root = "/var/lib/containerd"
state = "/run/containerd"
[debug]
  level = "${LIVEDISK_CONTAINERD_LOG_LEVEL:-info}"
[grpc]
  address = "/run/containerd/containerd.sock"
[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = "$PAUSE_IMAGE"
[plugins.'io.containerd.cri.v1.runtime']
  enable_selinux = false
  # No process here may lower its OOM score (CAP_SYS_RESOURCE is not in the bounding set):
  # containerd keeps pods' oom_score_adj at or above its own instead of failing them.
  restrict_oom_score_adj = true
  [plugins.'io.containerd.cri.v1.runtime'.containerd]
    default_runtime_name = "runc"
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
        BinaryName = "$NODE_BIN/runc"
        SystemdCgroup = false
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ["/opt/cni/bin"]
    conf_dir = "/etc/cni/net.d"
[plugins.'io.containerd.grpc.v1.cri']
  # Exec/attach/port-forward streams, on the node's loopback (kubelet proxies them).
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
EOF

  # ptp: a veth per pod routed by the node, no bridge, so nothing depends on br_netfilter.
  cat > "$NODE/etc/cni/net.d/10-livedisk.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "livedisk-pods",
  "plugins": [
    {
      "type": "ptp",
      "ipMasq": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "$POD_CIDR"}]],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dataDir": "/var/lib/cni/networks"
      }
    }
  ]
}
EOF

  # No upstream resolver for pods: cluster DNS answers cluster names only, and no query leaves
  # this machine.
  echo "# livedisk node $NAME: no upstream resolver" > "$etc/resolv.conf"

  cat > "$etc/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# cgroups v1 + v2 hybrid here: kubelet >= 1.35 refuses v1 unless told.
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: $CGROUP_ROOT
cgroupsPerQOS: true
# Never change the shared machine's kernel tunables (see kernel_tunables_view in hack/node.sh).
protectKernelDefaults: true
containerRuntimeEndpoint: unix:///run/containerd/containerd.sock
address: $NODE_IP
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: "$STATE/pki/ca.crt"}
authorization: {mode: Webhook}
clusterDomain: $CLUSTER_DOMAIN
clusterDNS: [$CLUSTER_DNS]
resolvConf: $etc/resolv.conf
failSwapOn: false
# The disk is shared with other work: evict only when it is really full.
evictionHard: {memory.available: 100Mi, nodefs.available: 2%, imagefs.available: 2%, nodefs.inodesFree: 2%}
imageGCHighThresholdPercent: 98
imageGCLowThresholdPercent: 95
rotateCertificates: false
serverTLSBootstrap: false
shutdownGracePeriod: 0s
# Lowering an OOM score needs CAP_SYS_RESOURCE, which no process has here.
oomScoreAdj: 0
EOF

  cat > "$etc/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: "$etc/kube-proxy.kubeconfig"}
hostnameOverride: $NAME
mode: iptables
clusterCIDR: $CLUSTER_CIDR
detectLocalMode: ClusterCIDR
bindAddress: $NODE_IP
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
nodePortAddresses: [primary]
iptables: {localhostNodePorts: false}
# 0: leave conntrack limits and timeouts alone (nf_conntrack_max is global, not per namespace).
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
# Lowering an OOM score needs CAP_SYS_RESOURCE, which no process has here.
oomScoreAdj: 0
EOF
}

# import_image NAME ARCHIVE [DIGEST]: into the node's containerd (namespace k8s.io, where the CRI
# looks), unless an image of that name (and digest) is there complete. Bare names are stored
# normalized (docker.io/library/...), as kubelet asks for them.
ctr_node() { in_node "$NODE_BIN/ctr" --address /run/containerd/containerd.sock -n k8s.io "$@"; }
import_image() {
  local name="$1" file="$2" digest="${3:-}" have
  have="$(ctr_node images ls 2>/dev/null | awk -v n="$name" '$1 == n || $1 == "docker.io/library/" n || $1 == "docker.io/" n {print $3}' | head -n 1)"
  if [ -n "$have" ] && { [ -z "$digest" ] || [ "$have" = "$digest" ]; }; then return 0; fi
  log "importing image $name${digest:+ ($digest)}"
  ctr_node images import "$file" >/dev/null
}

cmd_import() {
  [ -e "$NS/mnt" ] || die "node $NAME is not started"
  find_builds
  local list line
  for list in "$@"; do
    while read -r line; do
      [ -n "$line" ] || continue
      # shellcheck disable=SC2086
      set -- $line
      import_image "$1" "$3" "$2"
    done < "$list"
  done
}

# --- commands ----------------------------------------------------------------------------------

read_cluster() {
  [ -f "$STATE/env" ] || die "no cluster in $STATE: run hack/cluster.sh up (real-node mode, see the header)"
  # shellcheck disable=SC1091
  source "$STATE/env"
  API_SERVER="$(sed -n 's#^[[:space:]]*server: \(https://.*\)$#\1#p' "$KUBECONFIG" | head -n 1)"
  case "$API_SERVER" in
    https://127.0.0.1:*) die "the API server listens on 127.0.0.1, which pods cannot reach: restart the cluster with LIVEDISK_APISERVER_ADDRESS=$SUBNET.0.1 (and LIVEDISK_FAKE_NODES without $NAME)" ;;
  esac
  if kubectl get node "$NAME" -o jsonpath='{.status.conditions[?(@.type=="Ready")].message}' 2>/dev/null | grep -q 'no kubelet'; then
    die "Node $NAME is a fake node of hack/cluster.sh: restart the cluster with LIVEDISK_FAKE_NODES without $NAME"
  fi
}

cmd_start() {
  [ "$(id -u)" -eq 0 ] || die "needs root (namespaces, mounts, cgroups, links)"
  local t
  for t in nsenter unshare ip iptables openssl sysctl; do command -v "$t" >/dev/null || die "'$t' is missing"; done
  read_cluster
  mkdir -p "$PIDS" "$LOGS" "$NODE"
  find_builds
  [ -e /proc/sys/net/bridge ] && log "br_netfilter: present (not needed: ptp routes pods, no bridge)" \
    || log "br_netfilter: absent (not needed: ptp routes pods, no bridge)"
  make_namespaces
  setup_mounts
  make_link
  make_cgroups
  write_configs

  start_in_node containerd "$NODE_BIN/containerd" --config "$NODE/etc/containerd/config.toml"
  local i
  for i in $(seq 1 100); do
    in_node "$NODE_BIN/ctr" --address /run/containerd/containerd.sock version >/dev/null 2>&1 && break
    alive containerd || { tail -n 30 "$LOGS/$NAME-containerd.log" >&2; die "containerd exited"; }
    sleep 0.2
  done
  local line list
  for line in "${IMAGES[@]}"; do import_image "${line%% *}" "${line#* }"; done
  # The product's images (hack/images.sh lists: reference, digest, archive), as a registry-less
  # node gets them.
  for list in ${LIVEDISK_NODE_IMAGES:-}; do
    [ -f "$list" ] || die "image list $list (LIVEDISK_NODE_IMAGES) does not exist: run hack/images.sh"
    while read -r line; do
      [ -n "$line" ] || continue
      # shellcheck disable=SC2086
      set -- $line
      import_image "$1" "$3" "$2"
    done < "$list"
  done

  start_in_node kube-proxy "$HARNESS_BIN/kube-proxy" --config "$NODE/etc/kubernetes/kube-proxy.yaml" --v=2
  start_in_node kubelet "$HARNESS_BIN/kubelet" --config "$NODE/etc/kubernetes/kubelet.yaml" \
    --kubeconfig "$NODE/etc/kubernetes/kubelet.kubeconfig" --hostname-override "$NAME" --node-ip "$NODE_IP" \
    --node-labels "topology.livedisk.io/node=$NAME" --v=2

  log "waiting for Node $NAME to be Ready"
  for i in $(seq 1 120); do
    kubectl get node "$NAME" >/dev/null 2>&1 && kubectl wait --for condition=Ready --timeout=1s "node/$NAME" >/dev/null 2>&1 && break
    alive kubelet || { tail -n 30 "$LOGS/$NAME-kubelet.log" >&2; die "kubelet exited"; }
    alive containerd || { tail -n 30 "$LOGS/$NAME-containerd.log" >&2; die "containerd exited"; }
    sleep 1
  done
  kubectl wait --for condition=Ready --timeout=1s "node/$NAME" >/dev/null || die "Node $NAME not Ready after 120s (logs: $LOGS/$NAME-*.log)"
  # With fake nodes beside it the node lifecycle controller is off (hack/cluster.sh), and nothing
  # removes the not-ready taint the API server put on the new Node: do it, as that controller would.
  for i in $(seq 1 10); do
    kubectl get node "$NAME" -o jsonpath='{.spec.taints[*].key}' | grep -q node.kubernetes.io/not-ready || break
    [ "$i" = 10 ] && { log "removing the not-ready taint (no node lifecycle controller runs)"; kubectl taint node "$NAME" node.kubernetes.io/not-ready:NoSchedule- >/dev/null; }
    sleep 1
  done
  log "node $NAME Ready ($NODE_IP, pods $POD_CIDR); ctr: hack/node.sh exec $NAME -- ctr -n k8s.io ..."
}

cmd_stop() {
  [ "$(id -u)" -eq 0 ] || die "needs root"
  mkdir -p "$PIDS"
  stop_proc kubelet
  stop_proc kube-proxy
  # Containers first (their cgroups are kubelet's), then containerd, then its orphaned shims.
  local h pid
  for h in /sys/fs/cgroup/pids /sys/fs/cgroup/memory /sys/fs/cgroup/cpu; do
    [ -d "$h$CGROUP_ROOT" ] || continue
    while read -r pid; do [ -n "$pid" ] && kill -KILL "$pid" 2>/dev/null || true; done \
      < <(find "$h$CGROUP_ROOT" -name cgroup.procs -exec cat {} + 2>/dev/null)
  done
  stop_proc containerd
  kill_node_processes
  remove_cgroups
  release_loop_devices
  if mountpoint -q "$NS/mnt" 2>/dev/null; then
    log "releasing the namespaces (every mount inside goes with them)"
    umount "$NS/mnt" "$NS/net"
  fi
  mountpoint -q "$NS" 2>/dev/null && umount "$NS"
  rm -rf "$NS"
  [ -e "$ROUTER_DIR/net" ] && in_router ip link del "$NAME" 2>/dev/null || true
  log "node $NAME stopped (data kept in $NODE)"
}

cmd_purge() {
  cmd_stop
  if [ -f "$STATE/env" ]; then
    # shellcheck disable=SC1091
    source "$STATE/env"
    kubectl delete node "$NAME" --ignore-not-found --wait=false >/dev/null 2>&1 || true
  fi
  rm -rf "${NODE:?}"
  log "node $NAME purged"
}

# Every node of LIVEDISK_NODES, then the router.
cmd_down() {
  local n
  for n in "${ALL_NODES[@]}"; do set_node "$n"; cmd_stop; done
  remove_router
}

cmd_status() {
  local w
  for w in containerd kube-proxy kubelet; do
    if alive "$w"; then printf '%-12s up   (pid %s)\n' "$w" "$(cat "$(pidfile "$w")")"; else printf '%-12s down\n' "$w"; fi
  done
}

cmd_dns() {
  [ -f "$STATE/env" ] || die "no cluster in $STATE"
  # shellcheck disable=SC1091
  source "$STATE/env"
  local image; image="$("$ROOT/hack/harness/node-build.sh" --print-images | awk '$1 ~ /coredns/ {print $1}')"
  [ -n "$image" ] || die "no CoreDNS image from node-build.sh"
  sed -e "s#@IMAGE@#$image#" -e "s#@CLUSTER_DNS@#$CLUSTER_DNS#" -e "s#@CLUSTER_DOMAIN@#$CLUSTER_DOMAIN#" \
    "$ROOT/hack/node/coredns.yaml" | kubectl apply -f - >/dev/null
  log "CoreDNS applied ($image, Service kube-system/kube-dns $CLUSTER_DNS); waiting for it"
  kubectl -n kube-system rollout status deployment/coredns --timeout=120s >&2
}

case "${1:-}" in
  start|stop|purge|status) [ $# -eq 2 ] || usage; set_node "$2"; "cmd_$1" ;;
  exec)
    [ $# -ge 3 ] || usage
    set_node "$2"; shift 2; [ "${1:-}" = "--" ] && shift
    [ -e "$NS/mnt" ] || die "node $NAME is not started"
    dir="$("$ROOT/hack/harness/node-build.sh" --print-dir)"
    exec nsenter --mount="$NS/mnt" --net="$NS/net" -- env PATH="$dir/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
      CONTAINERD_ADDRESS=/run/containerd/containerd.sock CONTAINERD_NAMESPACE=k8s.io "$@" ;;
  import) [ $# -ge 3 ] || usage; set_node "$2"; shift 2; cmd_import "$@" ;;
  dns) cmd_dns ;;
  down) [ "$(id -u)" -eq 0 ] || die "needs root"; cmd_down ;;
  *) usage ;;
esac
