#!/usr/bin/env bash
# Builds the livedisk test harness binaries (kube-apiserver, kube-controller-manager,
# kube-scheduler, kubectl, etcd, the kubernetes-csi sidecars and test tools) from the
# Go module in this directory, csi-sanity from sanity/, KubeVirt's virt-controller and
# kubevirt-manifests from kubevirt/, into a cache OUTSIDE the clone:
#   ${LIVEDISK_CACHE_DIR:-$HOME/.cache/livedisk}/harness/<key>/bin/
# where <key> hashes the go.mod + go.sum files, the harness's own sources and `go version`.
# Binaries already in the cache are not rebuilt, so a second run (or a second clone)
# builds nothing. The last line on stdout is the bin dir.
#
#   build.sh                 build what is missing, print the bin dir last
#   build.sh --print-bin-dir print the bin dir only (builds nothing)
#   build.sh --list          print the binary names
#   build.sh NAME...         build only these binaries
#
# Env: LIVEDISK_CACHE_DIR, LIVEDISK_BUILD_JOBS (go build -p, default 2)
set -euo pipefail

HARNESS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# name -> Go package (all pinned by go.mod in this directory).
BINARIES=(
  "etcd=livedisk.io/harness/cmd/etcd"
  "kube-apiserver=k8s.io/kubernetes/cmd/kube-apiserver"
  "kube-controller-manager=k8s.io/kubernetes/cmd/kube-controller-manager"
  "kube-scheduler=k8s.io/kubernetes/cmd/kube-scheduler"
  "kubectl=k8s.io/kubernetes/cmd/kubectl"
  "kubelet=k8s.io/kubernetes/cmd/kubelet"
  "kube-proxy=k8s.io/kubernetes/cmd/kube-proxy"
  "snapshot-controller=github.com/kubernetes-csi/external-snapshotter/v8/cmd/snapshot-controller"
  "csi-snapshotter=github.com/kubernetes-csi/external-snapshotter/v8/cmd/csi-snapshotter"
  "csi-provisioner=github.com/kubernetes-csi/external-provisioner/v6/cmd/csi-provisioner"
  "csi-resizer=github.com/kubernetes-csi/external-resizer/v2/cmd/csi-resizer"
  "csi-snapshot-metadata=github.com/kubernetes-csi/external-snapshot-metadata/cmd/csi-snapshot-metadata"
  "snapshot-metadata-lister=livedisk.io/harness/cmd/snapshot-metadata-lister"
  "snapshot-metadata-verifier=livedisk.io/harness/cmd/snapshot-metadata-verifier"
  # A `dir:` prefix builds from that sub-module (see sanity/tools.go for why it is separate).
  "csi-sanity=sanity:github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity"
  # KubeVirt (and CDI's CRDs) from the sub-module kubevirt/ (KubeVirt pins k8s.io/* to 0.34).
  "kubevirt-manifests=kubevirt:livedisk.io/harness/kubevirt/cmd/kubevirt-manifests"
  "virt-controller=kubevirt:kubevirt.io/kubevirt/cmd/virt-controller"
)

die() { echo "build.sh: $*" >&2; exit 1; }

command -v go >/dev/null 2>&1 || die "'go' not found on PATH: install Go >= 1.26 (e.g. the golang package or a Go 1.26 toolchain)"
command -v openssl >/dev/null 2>&1 || die "'openssl' not found on PATH: install it (apt-get install openssl); hack/cluster.sh needs it for certificates"
command -v sha256sum >/dev/null 2>&1 || die "'sha256sum' not found: install coreutils"

export GOFLAGS="${GOFLAGS:+$GOFLAGS }-mod=mod"
export CGO_ENABLED="${CGO_ENABLED:-0}"
GOVER="$(go env GOVERSION)"
case "$GOVER" in
  go1.2[6-9]*|go1.[3-9]*) ;;
  *) die "Go $GOVER is too old: install Go >= 1.26" ;;
esac

cache_key() {
  ( cd "$HARNESS_DIR"
    cat go.mod go.sum sanity/go.mod sanity/go.sum kubevirt/go.mod kubevirt/go.sum
    find cmd smtool kubevirt/cmd -name '*.go' -type f | LC_ALL=C sort | xargs cat
    echo "$GOVER $(go env GOOS GOARCH) CGO_ENABLED=$CGO_ENABLED"
  ) | sha256sum | cut -c1-16
}

CACHE_ROOT="${LIVEDISK_CACHE_DIR:-$HOME/.cache/livedisk}/harness"
KEY="$(cache_key)"
BIN_DIR="$CACHE_ROOT/$KEY/bin"

case "${1:-}" in
  --print-bin-dir) echo "$BIN_DIR"; exit 0 ;;
  --list) for b in "${BINARIES[@]}"; do echo "${b%%=*}"; done; exit 0 ;;
  -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
esac

WANT=("$@")
selected() {
  [ ${#WANT[@]} -eq 0 ] && return 0
  local w; for w in "${WANT[@]}"; do [ "$w" = "$1" ] && return 0; done; return 1
}
if [ ${#WANT[@]} -gt 0 ]; then
  for w in "${WANT[@]}"; do
    found=0; for b in "${BINARIES[@]}"; do [ "${b%%=*}" = "$w" ] && found=1; done
    [ $found = 1 ] || die "unknown binary '$w' (see --list)"
  done
fi

# Version stamps, as the upstream release builds set them (kubectl version, /version).
modver() { (cd "$HARNESS_DIR/${MODDIR:-.}" && go list -m -f '{{if .Replace}}{{.Replace.Version}}{{else}}{{.Version}}{{end}}' "$1"); }
ldflags() {
  local pkg="$1" f="-s -w" v
  case "$pkg" in
    k8s.io/kubernetes/*)
      v="$(modver k8s.io/kubernetes)"; local minor="${v#v1.}"; minor="${minor%%.*}"
      local p
      for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        f="$f -X $p.gitVersion=$v -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
      done ;;
    livedisk.io/*) ;;
    kubevirt.io/kubevirt/*)
      # As KubeVirt's hack/version.sh stamps its release builds (virt-controller logs it).
      v="$(modver kubevirt.io/kubevirt)"
      f="$f -X kubevirt.io/client-go/version.gitVersion=$v -X kubevirt.io/client-go/version.gitTreeState=clean"
      f="$f -X kubevirt.io/client-go/version.buildDate=1970-01-01T00:00:00Z" ;;
    *) v="$(modver "$(cd "$HARNESS_DIR/${MODDIR:-.}" && go list -f '{{.Module.Path}}' "$pkg")")"; f="$f -X main.version=$v" ;;
  esac
  echo "$f"
}

mkdir -p "$BIN_DIR"
JOBS="${LIVEDISK_BUILD_JOBS:-2}"
todo=()
for b in "${BINARIES[@]}"; do
  name="${b%%=*}"
  selected "$name" || continue
  [ -x "$BIN_DIR/$name" ] || todo+=("$b")
done

if [ ${#todo[@]} -eq 0 ]; then
  echo "harness: all binaries cached in $BIN_DIR" >&2
  echo "$BIN_DIR"
  exit 0
fi

echo "harness: building ${#todo[@]} binaries into $BIN_DIR (go $GOVER, -p $JOBS)" >&2
echo "harness: a cold build (empty Go build cache) takes a long time, ~15-25 min on 2 cores; later runs reuse the cache" >&2
T0=$SECONDS
# Module downloads first, so their time is visible and not blamed on the first binary.
( cd "$HARNESS_DIR" && go mod download && (cd sanity && go mod download) && cd kubevirt && go mod download ) >&2 || die "go mod download failed (is the Go module proxy reachable?)"
i=0
for b in "${todo[@]}"; do
  i=$((i + 1))
  name="${b%%=*}"; pkg="${b#*=}"; MODDIR=.
  case "$pkg" in *:*) MODDIR="${pkg%%:*}"; pkg="${pkg#*:}" ;; esac
  t=$SECONDS
  echo "harness: [$i/${#todo[@]}] building $name ($pkg) — may take several minutes when the Go build cache is cold..." >&2
  tmp="$BIN_DIR/.$name.tmp.$$"
  if ! ( cd "$HARNESS_DIR/$MODDIR" && go build -trimpath -p "$JOBS" -ldflags="$(ldflags "$pkg")" -o "$tmp" "$pkg" ) >&2; then
    rm -f "$tmp"
    die "building $name ($pkg) failed"
  fi
  mv -f "$tmp" "$BIN_DIR/$name"
  echo "harness: [$i/${#todo[@]}] $name done in $((SECONDS - t))s (total $((SECONDS - T0))s)" >&2
done
echo "harness: all done in $((SECONDS - T0))s" >&2
echo "$BIN_DIR"
