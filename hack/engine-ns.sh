#!/usr/bin/env bash
# One node's engine in its own mount and network namespace, with its own pool.
#
#   hack/engine-ns.sh start NAME        create the namespaces, start the engine daemon
#   hack/engine-ns.sh exec NAME -- CMD  run CMD inside NAME's namespaces, with
#                                       LIVEDISK_POOL / LIVEDISK_RUNTIME_DIR set
#   hack/engine-ns.sh stop NAME         stop the daemon, release the namespaces
#                                       (the pool stays)
#
# Layout: $LIVEDISK_NODES_DIR/NAME/{pool,run,ns} (default .livedisk/nodes). The
# namespaces are kept alive by bind mounts of their nsfs files under ns/. The
# runtime dir is a tmpfs mounted inside the node's mount namespace only, so the
# daemon's QMP and NBD sockets exist in that namespace and nowhere else.
# Needs root, util-linux (unshare, nsenter) and iproute2.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
nodes="${LIVEDISK_NODES_DIR:-$repo/.livedisk/nodes}"

usage() { echo "usage: $0 start|stop NAME | exec NAME -- CMD..." >&2; exit 2; }
[[ $# -ge 2 ]] || usage
cmd="$1" name="$2"
shift 2
[[ "$name" =~ ^[a-z0-9][a-z0-9-]{0,30}$ ]] || { echo "bad node name: $name" >&2; exit 2; }
root="$nodes/$name" ns="$nodes/$name/ns"

bin() {
  if [[ -n "${LIVEDISK_BIN:-}" ]]; then echo "$LIVEDISK_BIN"; return; fi
  (cd "$repo" && cargo build -q -p livedisk-csi --bin livedisk-csi)
  echo "$repo/target/debug/livedisk-csi"
}

in_ns() {
  nsenter --mount="$ns/mnt" --net="$ns/net" -- \
    env LIVEDISK_POOL="$root/pool" LIVEDISK_RUNTIME_DIR="$root/run" "$@"
}

case "$cmd" in
  start)
    b="$(bin)"
    mkdir -p "$root/pool" "$root/run" "$ns"
    if [[ ! -e "$ns/mnt" ]] || ! mountpoint -q "$ns/mnt"; then
      # nsfs bind mounts must live on a private mount.
      mountpoint -q "$ns" || { mount --bind "$ns" "$ns"; mount --make-private "$ns"; }
      touch "$ns/mnt" "$ns/net"
      unshare --mount="$ns/mnt" --net="$ns/net" --propagation private true
      nsenter --net="$ns/net" -- ip link set lo up
      nsenter --mount="$ns/mnt" -- mount -t tmpfs -o mode=0700,size=16m "livedisk-$name" "$root/run"
    fi
    in_ns "$b" admin start
    ;;
  exec)
    [[ "${1:-}" == "--" ]] && shift
    [[ $# -ge 1 ]] || usage
    in_ns "$@"
    ;;
  stop)
    if mountpoint -q "$ns/mnt" 2>/dev/null; then
      in_ns "$(bin)" admin stop --force || true
      umount "$ns/mnt" "$ns/net"
    fi
    if mountpoint -q "$ns" 2>/dev/null; then umount "$ns"; fi
    rm -rf "$ns"
    ;;
  *) usage ;;
esac
