#!/usr/bin/env bash
# The driver's CSI sockets called by a gRPC implementation other than grpc-go: Python `grpcio`
# (gRPC's C core, as C++ and Ruby clients use it). grpcio 1.57 and later send the socket path,
# escaped, as the HTTP/2 `:authority`, which h2 (under tonic) refuses; the driver's relay
# (csi-driver/src/grpc/authority.rs) repairs it. tests/grpc-clients/csi_clients.py calls every
# service on the controller's socket and on each node plugin's, with grpcio's default options
# (`unix:///path` and `unix:/path`) and with `grpc.default_authority=localhost`.
# Needs the two-node driver of hack/driver.sh (`hack/driver.sh start`) and root (the sockets are
# 0600). Installs grpcio into a virtual environment in the cache, once per Python and grpcio
# version:
#   ${LIVEDISK_CACHE_DIR:-$HOME/.cache/livedisk}/grpc-clients/py<version>-grpcio-<version>/
#   LIVEDISK_GRPCIO_VERSION   the grpcio (and grpcio-tools) version (default below)
# Prints grpcio's default `:authority`, one line per call and the counts; exits non-zero on any
# failure. Arguments are handed to csi_clients.py (`--no-cluster`: a driver without an API
# server, ListVolumes not called).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
GRPCIO_VERSION="${LIVEDISK_GRPCIO_VERSION:-1.85.4}"
CSI_DIR="${LIVEDISK_STATE_DIR:-$ROOT/.livedisk}/csi"
NODES=(node-a node-b)
log() { echo "grpc-clients: $*" >&2; }
die() { echo "grpc-clients: ERROR: $*" >&2; exit 1; }

for socket in controller "${NODES[@]}"; do
  [ -S "$CSI_DIR/$socket.sock" ] || die "$CSI_DIR/$socket.sock missing: run hack/driver.sh start (the two-node driver)"
  [ -w "$CSI_DIR/$socket.sock" ] || die "$CSI_DIR/$socket.sock is not writable by $(id -un): run as root"
done
command -v python3 >/dev/null || die "python3 is missing (hack/deps.sh installs it)"
py_version="$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
VENV="${LIVEDISK_CACHE_DIR:-$HOME/.cache/livedisk}/grpc-clients/py$py_version-grpcio-$GRPCIO_VERSION"
if [ ! -f "$VENV/.complete" ]; then
  log "installing grpcio $GRPCIO_VERSION and grpcio-tools for Python $py_version in $VENV (once)"
  rm -rf "$VENV"
  mkdir -p "$(dirname "$VENV")"
  python3 -m venv "$VENV" \
    || die "python3 -m venv failed: on Debian, install python3-venv (hack/deps.sh does)"
  "$VENV/bin/python" -m pip --version >/dev/null 2>&1 \
    || die "pip is not available in the virtual environment (Debian: python3-venv provides it)"
  # pip's own progress; its package index must be reachable.
  "$VENV/bin/python" -m pip install --disable-pip-version-check --progress-bar on \
    "grpcio==$GRPCIO_VERSION" "grpcio-tools==$GRPCIO_VERSION" \
    || die "pip could not install grpcio $GRPCIO_VERSION (is the package index reachable? set LIVEDISK_GRPCIO_VERSION for another version)"
  touch "$VENV/.complete"
fi

WORK="$(mktemp -d /tmp/livedisk-grpc-clients.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
# Stubs from the driver's own proto, every run (a second at most).
"$VENV/bin/python" -m grpc_tools.protoc -I"$ROOT/csi-driver/proto/proto" \
  --python_out="$WORK" --grpc_python_out="$WORK" "$ROOT/csi-driver/proto/proto/csi.proto"

node_args=()
for node in "${NODES[@]}"; do node_args+=(--node "$CSI_DIR/$node.sock=$node"); done
# hack/driver.sh gives the controller the nodes' client certificate: it serves SnapshotMetadata.
"$VENV/bin/python" "$ROOT/tests/grpc-clients/csi_clients.py" --stubs "$WORK" \
  --controller "$CSI_DIR/controller.sock" --snapshot-metadata "${node_args[@]}" "$@"
