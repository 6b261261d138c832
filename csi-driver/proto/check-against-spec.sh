#!/usr/bin/env bash
# Compares proto/csi.proto (through the crate's embedded descriptor set) with
# the reference csi.proto of the CSI spec Go module in the local module cache.
#
#   csi-driver/proto/check-against-spec.sh [PATH/TO/reference/csi.proto]
#
# Without an argument the newest github.com/container-storage-interface/spec
# version in `go env GOMODCACHE` is used (SPEC_VERSION=v1.13.0 pins one).
# Exit 0: identical wire definitions; 1: differences (listed); 2: no reference.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ref="${1:-}"

if [[ -z "$ref" ]]; then
  if ! command -v go >/dev/null 2>&1; then
    echo "check-against-spec: 'go' not found; pass the reference csi.proto path" >&2
    exit 2
  fi
  modcache="$(go env GOMODCACHE)"
  base="$modcache/github.com/container-storage-interface"
  if [[ -n "${SPEC_VERSION:-}" ]]; then
    dir="$base/spec@${SPEC_VERSION}"
  else
    dir="$(ls -d "$base"/spec@v* 2>/dev/null | sort -V | tail -n 1 || true)"
  fi
  ref="${dir:+$dir/csi.proto}"
  if [[ -z "$ref" || ! -f "$ref" ]]; then
    echo "check-against-spec: no CSI spec module under $base" >&2
    echo "  (e.g. 'go mod download github.com/container-storage-interface/spec@v1.13.0')" >&2
    exit 2
  fi
fi

cd "$here"
exec cargo run --quiet -p livedisk-csi-proto --example compare_with_spec -- "$ref"
