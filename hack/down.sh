#!/usr/bin/env bash
# `make down`: stops what `make up` started (either layout); no process is left behind.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export LIVEDISK_STATE_DIR="${LIVEDISK_STATE_DIR:-$ROOT/.livedisk}"
pidfile="$LIVEDISK_STATE_DIR/pids/livedisk-operator.pid"
if [ -f "$pidfile" ]; then
  pid="$(cat "$pidfile")"
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
fi
if [ -f "$LIVEDISK_STATE_DIR/env" ]; then
  # shellcheck disable=SC1091 # the cluster's mode, subnet and link prefix
  source "$LIVEDISK_STATE_DIR/env"
fi
if [ -n "${LIVEDISK_APISERVER_ADDRESS:-}" ]; then
  # Real nodes (chart layout): every container goes with its node.
  hack/node.sh down
else
  [ -f "$LIVEDISK_STATE_DIR/env" ] && hack/driver.sh stop || true
fi
hack/cluster.sh down
