#!/usr/bin/env bash
# One node's engine in its own mount and network namespace, with its own pool.
#
#   hack/engine-ns.sh start NAME        create the namespaces, start the engine daemon
#                                       and the front-end server (each unless running)
#   hack/engine-ns.sh exec NAME -- CMD  run CMD inside NAME's namespaces, with
#                                       LIVEDISK_POOL / LIVEDISK_RUNTIME_DIR set
#   hack/engine-ns.sh stop NAME         release the front ends, stop the server and the
#                                       daemon, release the namespaces (the pool stays)
#
# Layout: $LIVEDISK_NODES_DIR/NAME/{pool,run,ns} (default .livedisk/nodes). The
# namespaces are kept alive by bind mounts of their nsfs files under ns/. The
# runtime dir is a tmpfs mounted inside the node's mount namespace only, so the
# daemon's QMP and NBD sockets exist in that namespace and nowhere else.
# The engine is what the chart's engine pod runs: the daemon, and the front-end
# server (`livedisk-csi frontends`, pid file NAME/frontends.pid, log
# NAME/frontends.log), which runs the FUSE front ends (nbdfuse) of attached
# volumes outside the node plugin, so that a node plugin restart keeps their I/O.
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

frontends_pid="$root/frontends.pid"
frontends_alive() {
  [[ -f "$frontends_pid" ]] && grep -q frontends "/proc/$(cat "$frontends_pid")/cmdline" 2>/dev/null
}

# The front-end server in the node's namespaces, in its own session: a signal to the caller's
# process group (hack/driver.sh stops groups) does not reach it. Its socket is in the runtime dir.
start_frontends() {
  frontends_alive && return 0
  local attempt
  # Two attempts: a server that died at once (seen once in a loaded `make test`, with an empty
  # log) is started again before the node is given up.
  for attempt in 1 2; do
    setsid nsenter --mount="$ns/mnt" --net="$ns/net" -- env RUST_LOG="${RUST_LOG:-info}" \
      "$1" frontends --engine-socket-dir "$root/run" >>"$root/frontends.log" 2>&1 </dev/null &
    echo $! > "$frontends_pid"
    for _ in $(seq 1 300); do
      in_ns test -S "$root/run/frontends.sock" && return 0
      # Whether the process still exists, not whether it is the server yet: right after the
      # fork, before its exec, the child still looks like this script (a loaded `make test`
      # once gave up on a server that then started fine).
      kill -0 "$(cat "$frontends_pid")" 2>/dev/null || break
      sleep 0.1
    done
    if frontends_alive; then
      echo "the front-end server of $name (pid $(cat "$frontends_pid")) runs but has no socket after 30 s" >&2
      break
    fi
    echo "the front-end server of $name exited (attempt $attempt)" >&2
  done
  echo "the front-end server of $name did not start; its log:" >&2
  tail -n 20 "$root/frontends.log" >&2
  exit 1
}

stop_frontends() {
  if frontends_alive; then
    local pid
    pid="$(cat "$frontends_pid")"
    kill "$pid" 2>/dev/null || true
    # A zombie has exited (PID 1 reaps orphans here only after about 2 s).
    for _ in $(seq 1 50); do
      grep -qs '^State:[[:space:]]*[^Z[:space:]]' "/proc/$pid/status" || break
      sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$frontends_pid"
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
    start_frontends "$b"
    ;;
  exec)
    [[ "${1:-}" == "--" ]] && shift
    [[ $# -ge 1 ]] || usage
    in_ns "$@"
    ;;
  stop)
    if mountpoint -q "$ns/mnt" 2>/dev/null; then
      # Front ends left running (nbdfuse exits once its mount is gone) would keep the
      # namespace alive: release them as the engine pod's end would.
      in_ns "$repo/hack/node-release.sh" "$root/run/attach" || true
      stop_frontends
      for pid in $(in_ns sh -c 'cat "$0"/attach/*/nbdfuse.pid 2>/dev/null' "$root/run"); do
        grep -q nbdfuse "/proc/$pid/cmdline" 2>/dev/null && kill "$pid" 2>/dev/null || true
      done
      in_ns "$(bin)" admin stop --force || true
      umount "$ns/mnt" "$ns/net"
    else
      stop_frontends
    fi
    if mountpoint -q "$ns" 2>/dev/null; then umount "$ns"; fi
    rm -rf "$ns"
    ;;
  *) usage ;;
esac
