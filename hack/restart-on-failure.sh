#!/usr/bin/env bash
# Runs CMD again whenever it exits non-zero, as kubelet restarts the chart's node plugin
# container (DaemonSet, restartPolicy Always): hack/driver.sh runs each node plugin under it. The
# node plugin exits non-zero when its engine daemon stays away longer than
# --engine-reconnect-seconds; the restarted one opens its engine afresh (and, as `Engine::open`
# does, starts the node's daemon if none runs). A clean exit (0: SIGTERM from driver.sh stop)
# ends the loop.
#
#   hack/restart-on-failure.sh CMD...
set -uo pipefail
[[ $# -ge 1 ]] || { echo "usage: $0 CMD..." >&2; exit 2; }
until "$@"; do
  echo "restart-on-failure: $1 exited with status $?; restarting it in 1 s" >&2
  sleep 1
done
