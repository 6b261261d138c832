#!/usr/bin/env bash
# The benchmarks: a table of ratios against the targets of DESIGN.md §5
# (medians of several runs). Benchmarks report; they never fail the build on
# a missed target, only on a broken run.
#   a–d  the node engine, on a daemon of the benchmark's own in a temporary
#        pool (no cluster);
#   g    the same engine: a consumer's 4 KiB O_DIRECT|O_DSYNC write latency
#        while a snapshot deletion merges at 16 MiB/s, vs none;
#   e    the CSI driver's snapshot and changed-block path through its
#        sockets, on a local cluster of its own that this script starts (the
#        sequence of hack/test.sh, on ports and a state dir of its own) and
#        always stops. The nodes' pools live on a sparse ext4 image, so that a
#        64 GiB volume fits whatever the host has free (the driver does not
#        overcommit); the benchmark writes a few GiB at most;
#   f    DiskSnapshots at scale on the same cluster, through the operator
#        (release build, started by the benchmark under the chart's operator
#        account): time until all are Ready, the operator's peak RSS, its API
#        requests per DiskSnapshot (from the API server's audit log), and the
#        same for deleting them all;
#   h    exports on the same cluster, through the operator and a node's TLS
#        front: a snapshot read over NBD with TLS vs qemu-nbd without TLS on
#        the same layer file (nbdcopy), and an incremental backup's bytes
#        read vs the bytes changed;
#   k    the disk path for a VM, on the engine of a–d: the test VM's guest
#        (TCG) measures direct I/O on one volume through the CSI consumer
#        device, QEMU's NBD client on the daemon's socket and a vhost-user-blk
#        export of the daemon (and a raw file), one boot each, interleaved;
#   l    the guest's write latency during each step of `make demo`'s story
#        (snapshot, merge, migrations, incremental backups) against the same
#        VM idle: hack/demo.sh on a chart cluster of real nodes of its own
#        (hack/lib/chart-cluster.sh, release images; always stopped again).
#
# Environment (all optional):
#   LIVEDISK_BENCH_SCALE       data sizes x this (default 1: 256 MiB snapshot
#                              data, 512 MiB merge, 1 GiB attach I/O)
#   LIVEDISK_BENCH_RUNS        runs of snapshot/query benches (default 5)
#   LIVEDISK_BENCH_HEAVY_RUNS  runs of merge/attach benches (default 4: the merge
#                              alternates which side goes first)
#   LIVEDISK_BENCH_EXTENTS     changed extents (default 100000; (c) on a 1 TiB
#                              disk, (e) on a 64 GiB volume)
#   LIVEDISK_BENCH_ONLY        run only these benchmarks, e.g. "b,d" or "e"
#                              (default: all, a–k; only e, f, h, i and j start a cluster)
#   LIVEDISK_BENCH_DISK_SNAPSHOTS  (f) DiskSnapshots (default 1000)
#   LIVEDISK_BENCH_CLAIMS      (f) PVCs they are spread over (default 50); e.g.
#                              100 of 5 for a quick run
#   LIVEDISK_BENCH_DIR         where a–d's temporary pool goes (default /var/tmp;
#                              use a real disk, not tmpfs)
# The cluster of scenarios e and f (defaults differ from `make up`'s and
# `make test`'s, so that the three can run side by side):
#   LIVEDISK_BENCH_STATE_DIR   its state, pools and logs (default .livedisk/bench-cluster)
#   LIVEDISK_BENCH_APISERVER_PORT (16543)   LIVEDISK_BENCH_ETCD_PORT (25790)
#   LIVEDISK_BENCH_ETCD_PEER_PORT (25800)   LIVEDISK_BENCH_KCM_PORT (30357)
#   LIVEDISK_BENCH_SCHEDULER_PORT (30359)   LIVEDISK_BENCH_SNAPSHOT_METADATA_PORT (17543)
#   LIVEDISK_BENCH_SNAPSHOT_METADATA_HTTP_PORT (17580)   LIVEDISK_BENCH_VIRT_API_STANDIN_PORT (16544)
#   LIVEDISK_BENCH_LINK_PREFIX (lb)         LIVEDISK_BENCH_SUBNET (10.233)
#   LIVEDISK_BENCH_CONTROLLER_METRICS_PORT (the snapshot-metadata HTTP port + 1)
#   LIVEDISK_BENCH_NODE_METRICS_PORT (9090, inside each node's network namespace)
#   LIVEDISK_BENCH_POOL_GIB    size of the nodes' sparse pool image (default 160)
# Scenario l's chart cluster: LIVEDISK_BENCH_NODES_STATE_DIR (.livedisk/bench-nodes), ports
#   LIVEDISK_BENCH_NODES_APISERVER_PORT (16643), its etcd 25890/25900, controller-manager 30457,
#   scheduler 30459, snapshot-metadata 17643/17680, virt-api stand-in 16644, virt-controller 30482;
#   LIVEDISK_BENCH_NODES_LINK_PREFIX (ln), LIVEDISK_BENCH_NODES_SUBNET (10.234)
# This script tells the binary where the driver is (scenario e):
#   LIVEDISK_BENCH_CONTROLLER_SOCKET, LIVEDISK_BENCH_NODE_SOCKET, LIVEDISK_BENCH_NODE,
#   LIVEDISK_BENCH_NODES_DIR, LIVEDISK_BENCH_STAGING_DIR
# and what scenario f needs: LIVEDISK_BENCH_OPERATOR_BIN, LIVEDISK_BENCH_OPERATOR_KUBECONFIG,
#   LIVEDISK_BENCH_AUDIT_DIR, LIVEDISK_BENCH_LOG_DIR (the operator's log and pid file)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

for tool in qemu-storage-daemon qemu-img qemu-io nbdfuse losetup fusermount3; do
  command -v "$tool" >/dev/null || {
    echo "bench: $tool missing: apt-get install qemu-system-common qemu-utils libnbd-bin fuse3 util-linux" >&2
    exit 1
  }
done

# Scenarios e, f, h, i and j are selected unless LIVEDISK_BENCH_ONLY leaves them out.
with_cluster=1 with_operator=1
if [ -n "${LIVEDISK_BENCH_ONLY+set}" ]; then
  case ",${LIVEDISK_BENCH_ONLY// /}," in *,f,*|*,h,*|*,i,*|*,j,*) ;; *) with_operator=0 ;; esac
  case ",${LIVEDISK_BENCH_ONLY// /}," in *,e,*|*,f,*|*,h,*|*,i,*|*,j,*) ;; *) with_cluster=0 ;; esac
fi
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"

# Scenario k boots the test VM (hack/vm/vm-run with the guest of hack/vm/build.sh, cached).
if [ -z "${LIVEDISK_BENCH_ONLY+set}" ] || [[ ",${LIVEDISK_BENCH_ONLY// /}," == *,k,* ]]; then
  command -v qemu-system-x86_64 >/dev/null || {
    echo "bench: scenario k needs qemu-system-x86_64: apt-get install qemu-system-x86" >&2
    exit 1
  }
  echo "bench: the test VM's guest (hack/vm/build.sh; cached)" >&2
  LIVEDISK_BENCH_VM_GUEST="$(hack/vm/build.sh | tail -n 1)"
  export LIVEDISK_BENCH_VM_GUEST LIVEDISK_BENCH_VM_RUN="$ROOT/hack/vm/vm-run"
fi

echo "bench: building (release)" >&2
if [ "$with_operator" = 1 ]; then
  # The driver and the operator run as built for release, like the benchmark.
  cargo build -q --release -p livedisk-csi -p livedisk-operator --bin livedisk-bench --bin livedisk-csi \
    --bin livedisk-operator
elif [ "$with_cluster" = 1 ]; then
  cargo build -q --release -p livedisk-csi --bin livedisk-bench --bin livedisk-csi
else
  cargo build -q --release -p livedisk-csi --bin livedisk-bench
fi

if [ "$with_cluster" = 1 ]; then
  [ "$(id -u)" -eq 0 ] || { echo "bench: scenarios e and f need root (namespaces, loop devices, mounts)" >&2; exit 1; }
  export LIVEDISK_STATE_DIR="${LIVEDISK_BENCH_STATE_DIR:-$ROOT/.livedisk/bench-cluster}"
  export LIVEDISK_APISERVER_PORT="${LIVEDISK_BENCH_APISERVER_PORT:-16543}"
  export LIVEDISK_ETCD_PORT="${LIVEDISK_BENCH_ETCD_PORT:-25790}"
  export LIVEDISK_ETCD_PEER_PORT="${LIVEDISK_BENCH_ETCD_PEER_PORT:-25800}"
  export LIVEDISK_KCM_PORT="${LIVEDISK_BENCH_KCM_PORT:-30357}"
  export LIVEDISK_SCHEDULER_PORT="${LIVEDISK_BENCH_SCHEDULER_PORT:-30359}"
  export LIVEDISK_SNAPSHOT_METADATA_PORT="${LIVEDISK_BENCH_SNAPSHOT_METADATA_PORT:-17543}"
  export LIVEDISK_SNAPSHOT_METADATA_HTTP_PORT="${LIVEDISK_BENCH_SNAPSHOT_METADATA_HTTP_PORT:-17580}"
  export LIVEDISK_VIRT_API_STANDIN_PORT="${LIVEDISK_BENCH_VIRT_API_STANDIN_PORT:-16544}"
  export LIVEDISK_LINK_PREFIX="${LIVEDISK_BENCH_LINK_PREFIX:-lb}" LIVEDISK_SUBNET="${LIVEDISK_BENCH_SUBNET:-10.233}"
  # hack/driver.sh's metrics ports: only when asked for (it derives its own defaults).
  [ -z "${LIVEDISK_BENCH_CONTROLLER_METRICS_PORT:-}" ] ||
    export LIVEDISK_CONTROLLER_METRICS_PORT="$LIVEDISK_BENCH_CONTROLLER_METRICS_PORT"
  [ -z "${LIVEDISK_BENCH_NODE_METRICS_PORT:-}" ] ||
    export LIVEDISK_NODE_METRICS_PORT="$LIVEDISK_BENCH_NODE_METRICS_PORT"
  # For starting and for stopping (hack/engine-ns.sh stops a node's engine with it).
  export LIVEDISK_CSI_BIN="$TARGET_DIR/release/livedisk-csi"
  # Scenario f's operator: the benchmark starts and stops it; its pid file is for this trap.
  operator_pid_file="$LIVEDISK_STATE_DIR/logs/bench-operator.pid"
  mkdir -p "$LIVEDISK_STATE_DIR"
  nodes="$LIVEDISK_STATE_DIR/nodes"
  image="$LIVEDISK_STATE_DIR/pools.img"

  # shellcheck source=hack/lib/own-cluster.sh
  source hack/lib/own-cluster.sh
  # Never fails, so that it can run in the trap. The node namespaces go with the driver, so the
  # image's last mount goes here and its loop device (autoclear) with it.
  release_pools() {
    if mountpoint -q "$nodes" 2>/dev/null; then umount "$nodes" || umount -l "$nodes" || true; fi
    rm -f "$image"
  }
  cleanup() {
    echo "bench: stopping the driver and the local cluster" >&2
    # An operator the benchmark could not stop (interrupted): it must not outlive its cluster.
    if [ -f "$operator_pid_file" ]; then
      kill "$(cat "$operator_pid_file")" 2>/dev/null || true
      rm -f "$operator_pid_file"
    fi
    own_cluster_down >/dev/null 2>&1
    release_pools
  }
  trap cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  # What an interrupted run left, before own_cluster_up clears the pools.
  hack/driver.sh stop >/dev/null 2>&1 || true
  release_pools

  echo "bench: local cluster for scenarios e/f in $LIVEDISK_STATE_DIR (the first run builds the Go harness)" >&2
  own_cluster_up
  truncate -s "${LIVEDISK_BENCH_POOL_GIB:-160}G" "$image"
  # Few inodes and lazy initialisation: a large, nearly empty filesystem made in a second.
  mkfs.ext4 -q -F -m 0 -i 1048576 -E nodiscard,lazy_itable_init=1,lazy_journal_init=1 "$image"
  mkdir -p "$nodes"
  mount -o loop "$image" "$nodes"
  echo "bench: the CSI driver (release build), two nodes" >&2
  hack/driver.sh start

  export LIVEDISK_BENCH_CONTROLLER_SOCKET="$LIVEDISK_STATE_DIR/csi/controller.sock"
  export LIVEDISK_BENCH_NODE=node-a
  export LIVEDISK_BENCH_NODE_SOCKET="$LIVEDISK_STATE_DIR/csi/$LIVEDISK_BENCH_NODE.sock"
  export LIVEDISK_BENCH_NODES_DIR="$nodes"
  # Where kubelet's staging paths would be (hack/driver.sh stop releases what is left there).
  export LIVEDISK_BENCH_STAGING_DIR="$LIVEDISK_STATE_DIR/kubelet/$LIVEDISK_BENCH_NODE/staging"
  if [ "$with_operator" = 1 ]; then
    export LIVEDISK_BENCH_OPERATOR_BIN="$TARGET_DIR/release/livedisk-operator"
    export LIVEDISK_BENCH_OPERATOR_KUBECONFIG="$LIVEDISK_STATE_DIR/accounts/operator.kubeconfig"
    export LIVEDISK_BENCH_AUDIT_DIR="$LIVEDISK_STATE_DIR/logs"
    export LIVEDISK_BENCH_LOG_DIR="$LIVEDISK_STATE_DIR/logs"
  fi
fi

# Scenario l: the demo on a chart cluster of its own, in a subshell (its own state, ports and
# trap), before the benchmark reads the demo's output.
if [ -z "${LIVEDISK_BENCH_ONLY+set}" ] || [[ ",${LIVEDISK_BENCH_ONLY// /}," == *,l,* ]]; then
  [ "$(id -u)" -eq 0 ] || { echo "bench: scenario l needs root (real nodes: namespaces, mounts)" >&2; exit 1; }
  demo_log="$ROOT/.livedisk/bench-demo.log"
  mkdir -p "$(dirname "$demo_log")"
  echo "bench: scenario l: make demo's story on a chart cluster of real nodes (output: $demo_log)" >&2
  (
    unset LIVEDISK_APISERVER_ADDRESS LIVEDISK_FAKE_NODES LIVEDISK_NODES LIVEDISK_TEST_IMAGE \
      LIVEDISK_HELM_VALUES LIVEDISK_UP_MODE LIVEDISK_NODES_DIR KUBECONFIG
    export LIVEDISK_STATE_DIR="${LIVEDISK_BENCH_NODES_STATE_DIR:-$ROOT/.livedisk/bench-nodes}"
    export LIVEDISK_APISERVER_PORT="${LIVEDISK_BENCH_NODES_APISERVER_PORT:-16643}"
    export LIVEDISK_ETCD_PORT=25890 LIVEDISK_ETCD_PEER_PORT=25900 LIVEDISK_KCM_PORT=30457 \
      LIVEDISK_SCHEDULER_PORT=30459 LIVEDISK_SNAPSHOT_METADATA_PORT=17643 \
      LIVEDISK_SNAPSHOT_METADATA_HTTP_PORT=17680 LIVEDISK_VIRT_API_STANDIN_PORT=16644 \
      LIVEDISK_VIRT_CONTROLLER_PORT=30482
    export LIVEDISK_LINK_PREFIX="${LIVEDISK_BENCH_NODES_LINK_PREFIX:-ln}" \
      LIVEDISK_SUBNET="${LIVEDISK_BENCH_NODES_SUBNET:-10.234}" LIVEDISK_IMAGE_PROFILE=release
    # shellcheck source=hack/lib/chart-cluster.sh
    source hack/lib/chart-cluster.sh
    trap 'chart_cluster_down >/dev/null 2>&1' EXIT
    chart_cluster_up >&2
    hack/demo.sh | tee "$demo_log" >&2
  ) || { echo "bench: scenario l: the demo failed (see $demo_log)" >&2; exit 1; }
  export LIVEDISK_BENCH_DEMO_LOG="$demo_log"
fi

"$TARGET_DIR/release/livedisk-bench" "$@"
