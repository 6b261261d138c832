#!/usr/bin/env bash
# `make down`: stops the operator and the local cluster; no process is left behind.
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
[ -f "$LIVEDISK_STATE_DIR/env" ] && hack/driver.sh stop || true
hack/cluster.sh down
