#!/usr/bin/env bash
# Builds what a real node runs besides kubelet and kube-proxy (those come from build.sh, from the
# same k8s.io/kubernetes module as the control plane): containerd, its runc shim and ctr, runc,
# the CNI plugins, CoreDNS, Kubernetes' pause program, and OCI image archives made without a
# registry (pause, CoreDNS, and busybox for test pods). Into a cache OUTSIDE the clone, one
# directory per artefact, keyed by what makes it (its recipe below, its version, `go version`,
# `gcc --version`, the busybox-static package, the artefacts it is made of):
#   ${LIVEDISK_CACHE_DIR:-$HOME/.cache/livedisk}/node/<artefact>-<key>/
# and a set of links to the current ones: .../node/set-<key>/{bin,cni,images}/. An artefact
# already in the cache is not rebuilt; a warm run builds nothing.
#
#   node-build.sh                 build what is missing; the last stdout line is the set dir
#   node-build.sh --print-dir     print the set dir only (builds nothing)
#   node-build.sh --print-images  print "NAME FILE" per image archive (builds nothing)
#
# Needs go (>= 1.26), gcc with a static libc (libc6-dev), libseccomp-dev (runc's seccomp support),
# busybox-static (the test image) and sha256sum. Go builds honour GOFLAGS (e.g. -p=1).
set -euo pipefail

HARNESS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

CONTAINERD_VERSION=v2.1.9
RUNC_VERSION=v1.3.0
CNI_PLUGINS_VERSION=v1.9.1
COREDNS_VERSION=v1.14.7
# The pause program's version, as build/pause/Makefile of k8s.io/kubernetes v1.36.3 names it.
PAUSE_VERSION=3.10.2
# Image names. containerd's CRI config names PAUSE_IMAGE as its sandbox image (hack/node.sh); no
# registry serves any of them: they are imported from the archives built here.
PAUSE_IMAGE="localhost/livedisk/pause:$PAUSE_VERSION"
BUSYBOX_IMAGE="localhost/livedisk/busybox:1.35"
COREDNS_IMAGE="localhost/livedisk/coredns:${COREDNS_VERSION#v}"
CNI_PLUGINS=(ptp bridge loopback host-local)

T0=$SECONDS
log() { echo "node-build: [$((SECONDS - T0))s] $*" >&2; }
die() { echo "node-build: ERROR: $*" >&2; exit 1; }
need() { command -v "$1" >/dev/null 2>&1 || die "'$1' not found: $2"; }

need go "install Go >= 1.26"
need gcc "apt-get install gcc libc6-dev"
need sha256sum "install coreutils"
# ldd refuses a static executable.
{ [ -x /bin/busybox ] && ! ldd /bin/busybox >/dev/null 2>&1; } || die "/bin/busybox is missing or not static: apt-get install busybox-static"

CACHE="${LIVEDISK_CACHE_DIR:-$HOME/.cache/livedisk}/node"
GO_VERSION="$(go version)"
GCC_VERSION="$(gcc --version | head -n 1)"
BUSYBOX_PKG="$(dpkg-query -W -f '${Version}' busybox-static 2>/dev/null || /bin/busybox 2>&1 | head -n 1)"

# --- recipes: build_NAME OUT builds artefact NAME into the empty dir OUT ------------------------

# runc: cgo, for seccomp (libseccomp-dev).
build_runc() {
  [ -f /usr/include/seccomp.h ] || die "seccomp.h missing: apt-get install libseccomp-dev"
  GOBIN="$1" CGO_ENABLED=1 go install -trimpath -tags seccomp \
    -ldflags "-s -w -X main.version=${RUNC_VERSION#v}" "github.com/opencontainers/runc@$RUNC_VERSION" >&2
}

# containerd: its go.mod has `exclude` directives, which `go install pkg@version` refuses, so it
# is built as the main module, from a writable copy of the module source. no_btrfs: the btrfs
# snapshotter needs cgo and libbtrfs headers, and the nodes use overlayfs.
build_containerd() {
  local out="$1" src work="$1/.src" b pkg=github.com/containerd/containerd/v2 tags=no_btrfs
  [ -f /usr/include/btrfs/ioctl.h ] && tags=""
  src="$(cd "$out" && go mod download -json "$pkg@$CONTAINERD_VERSION" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
  [ -d "$src" ] || die "go mod download of containerd $CONTAINERD_VERSION gave no source dir"
  cp -r "$src" "$work" && chmod -R u+w "$work"
  for b in containerd containerd-shim-runc-v2 ctr; do
    log "  $b"
    ( cd "$work" && CGO_ENABLED=0 GOFLAGS="${GOFLAGS:-} -mod=readonly" go build -trimpath ${tags:+-tags "$tags"} \
        -ldflags "-s -w -X $pkg/version.Version=$CONTAINERD_VERSION -X $pkg/version.Package=$pkg" \
        -o "$out/$b" "./cmd/$b" ) >&2 || die "building $b failed"
  done
  rm -rf "$work"
}

build_cni() {
  local p pkgs=()
  for p in "${CNI_PLUGINS[@]}"; do
    case "$p" in host-local) pkgs+=("github.com/containernetworking/plugins/plugins/ipam/$p@$CNI_PLUGINS_VERSION") ;;
      *) pkgs+=("github.com/containernetworking/plugins/plugins/main/$p@$CNI_PLUGINS_VERSION") ;; esac
  done
  GOBIN="$1" CGO_ENABLED=0 go install -trimpath -ldflags "-s -w" "${pkgs[@]}" >&2
}

# CoreDNS: the module's coremain with only the plugins the cluster's Corefile uses
# (hack/harness/coredns/main.go; its go.mod pins COREDNS_VERSION). The stock main compiles every
# plugin, cloud SDKs included: 566 s cold here, against about 135 s for this one.
build_coredns() {
  grep -q "github.com/coredns/coredns $COREDNS_VERSION\$" "$HARNESS_DIR/coredns/go.mod" \
    || die "hack/harness/coredns/go.mod does not require coredns $COREDNS_VERSION"
  (cd "$HARNESS_DIR/coredns" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$1/coredns" .) >&2
}

# pause: Kubernetes' own program, from the k8s.io/kubernetes module the harness pins, with the
# flags of its build/pause/Makefile.
build_pause() {
  local k8s_dir
  k8s_dir="$(cd "$HARNESS_DIR" && GOFLAGS=-mod=mod go list -m -f '{{.Dir}}' k8s.io/kubernetes)"
  [ -f "$k8s_dir/build/pause/linux/pause.c" ] || die "build/pause/linux/pause.c is not in $k8s_dir"
  gcc -Os -Wall -Werror -static -DVERSION="v$PAUSE_VERSION-livedisk" -o "$1/pause" "$k8s_dir/build/pause/linux/pause.c"
}

# oci_archive OUT NAME ROOTFS ENTRYPOINT-JSON: a one-layer OCI image layout in a tar, named NAME by
# the annotation containerd's importer reads (io.containerd.image.name). Reproducible: fixed
# mtimes, owners and order, so the same inputs give the same digests.
oci_archive() {
  local out="$1" name="$2" rootfs="$3" entrypoint="$4" lay="$1.layout"
  rm -rf "$lay" && mkdir -p "$lay/blobs/sha256"
  local tarflags=(--sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner --format=posix
    --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime)
  tar -C "$rootfs" "${tarflags[@]}" -cf "$lay/layer.tar" .
  local layer_digest layer_size config config_digest manifest manifest_digest
  layer_digest="$(sha256sum < "$lay/layer.tar" | cut -d' ' -f1)"
  layer_size="$(stat -c %s "$lay/layer.tar")"
  mv "$lay/layer.tar" "$lay/blobs/sha256/$layer_digest"
  config="{\"architecture\":\"amd64\",\"os\":\"linux\",\"config\":{\"Entrypoint\":$entrypoint,\"Env\":[\"PATH=/bin\"],\"WorkingDir\":\"/\"},\"rootfs\":{\"type\":\"layers\",\"diff_ids\":[\"sha256:$layer_digest\"]},\"history\":[{\"created_by\":\"livedisk hack/harness/node-build.sh\"}]}"
  config_digest="$(printf '%s' "$config" | sha256sum | cut -d' ' -f1)"
  printf '%s' "$config" > "$lay/blobs/sha256/$config_digest"
  manifest="{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"config\":{\"mediaType\":\"application/vnd.oci.image.config.v1+json\",\"digest\":\"sha256:$config_digest\",\"size\":${#config}},\"layers\":[{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar\",\"digest\":\"sha256:$layer_digest\",\"size\":$layer_size}]}"
  manifest_digest="$(printf '%s' "$manifest" | sha256sum | cut -d' ' -f1)"
  printf '%s' "$manifest" > "$lay/blobs/sha256/$manifest_digest"
  printf '{"imageLayoutVersion":"1.0.0"}' > "$lay/oci-layout"
  printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"platform":{"architecture":"amd64","os":"linux"},"annotations":{"io.containerd.image.name":"%s","org.opencontainers.image.ref.name":"%s"}}]}' \
    "$manifest_digest" "${#manifest}" "$name" "${name##*:}" > "$lay/index.json"
  tar -C "$lay" "${tarflags[@]}" -cf "$out" oci-layout index.json blobs
  rm -rf "$lay"
}

build_image_pause() {
  local r="$1/rootfs"; mkdir -p "$r"
  install -m 0755 "$(art pause)/pause" "$r/pause"
  oci_archive "$1/image.oci.tar" "$PAUSE_IMAGE" "$r" '["/pause"]'
  rm -rf "$r"
}

build_image_busybox() {
  local r="$1/rootfs" a; mkdir -p "$r/bin" "$r/tmp" "$r/etc"
  chmod 1777 "$r/tmp"
  install -m 0755 /bin/busybox "$r/bin/busybox"
  # One link per applet, as busybox --install would make them.
  for a in $(/bin/busybox --list); do [ "$a" = busybox ] || ln -s busybox "$r/bin/$a"; done
  printf 'root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' > "$r/etc/passwd"
  printf 'root:x:0:\nnogroup:x:65534:\n' > "$r/etc/group"
  oci_archive "$1/image.oci.tar" "$BUSYBOX_IMAGE" "$r" '["/bin/sh"]'
  rm -rf "$r"
}

build_image_coredns() {
  local r="$1/rootfs"; mkdir -p "$r/etc"
  install -m 0755 "$(art coredns)/coredns" "$r/coredns"
  printf 'nobody:x:65534:65534:nobody:/:/bin/false\n' > "$r/etc/passwd"
  oci_archive "$1/image.oci.tar" "$COREDNS_IMAGE" "$r" '["/coredns"]'
  rm -rf "$r"
}

# --- keys and the cache ------------------------------------------------------------------------

# What each artefact's key covers besides its own recipe (and the helpers it calls).
inputs_of() {
  case "$1" in
    runc) echo "$RUNC_VERSION $GO_VERSION $(cat /usr/include/seccomp.h 2>/dev/null | sha256sum)" ;;
    containerd) echo "$CONTAINERD_VERSION $GO_VERSION $(ls /usr/include/btrfs/ioctl.h 2>/dev/null)" ;;
    cni) echo "$CNI_PLUGINS_VERSION ${CNI_PLUGINS[*]} $GO_VERSION" ;;
    coredns) echo "$COREDNS_VERSION $GO_VERSION $(cat "$HARNESS_DIR"/coredns/{main.go,go.mod,go.sum} | sha256sum)" ;;
    pause) echo "$PAUSE_VERSION $GCC_VERSION $(cd "$HARNESS_DIR" && grep '^	k8s.io/kubernetes ' go.mod)" ;;
    image_pause) echo "$PAUSE_IMAGE $(declare -f oci_archive) $(art pause)" ;;
    image_busybox) echo "$BUSYBOX_IMAGE $BUSYBOX_PKG $(declare -f oci_archive)" ;;
    image_coredns) echo "$COREDNS_IMAGE $(declare -f oci_archive) $(art coredns)" ;;
  esac
}
ARTEFACTS=(runc containerd cni coredns pause image_pause image_busybox image_coredns)

# art NAME: the artefact's cache dir.
art() {
  local key
  key="$({ declare -f "build_$1"; inputs_of "$1"; } | sha256sum | cut -c1-12)"
  echo "$CACHE/${1//_/-}-$key"
}

# The set: links to the current artefacts, laid out as hack/node.sh wants them.
set_dir() {
  local a all=""
  for a in "${ARTEFACTS[@]}"; do all="$all $(art "$a")"; done
  echo "$CACHE/set-$(echo "$all" | sha256sum | cut -c1-12)"
}

case "${1:-}" in
  --print-dir) set_dir; exit 0 ;;
  --print-images)
    d="$(set_dir)/images"
    echo "$PAUSE_IMAGE $d/pause.oci.tar"
    echo "$BUSYBOX_IMAGE $d/busybox.oci.tar"
    echo "$COREDNS_IMAGE $d/coredns.oci.tar"
    exit 0 ;;
  -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  "") ;;
  *) die "unknown argument $1 (see --help)" ;;
esac

mkdir -p "$CACHE"
for a in "${ARTEFACTS[@]}"; do
  out="$(art "$a")"
  if [ -d "$out" ]; then log "$a: cached ($out)"; continue; fi
  log "building $a into $out..."
  t=$SECONDS
  rm -rf "$out.tmp" && mkdir -p "$out.tmp"
  "build_$a" "$out.tmp"
  mv "$out.tmp" "$out"
  log "$a done in $((SECONDS - t))s"
done

SET="$(set_dir)"
if [ ! -d "$SET" ]; then
  rm -rf "$SET.tmp" && mkdir -p "$SET.tmp/bin" "$SET.tmp/cni" "$SET.tmp/images"
  for f in "$(art runc)/runc" "$(art containerd)"/* "$(art coredns)/coredns" "$(art pause)/pause"; do
    ln -s "$f" "$SET.tmp/bin/"
  done
  for f in "$(art cni)"/*; do ln -s "$f" "$SET.tmp/cni/"; done
  for i in pause busybox coredns; do ln -s "$(art "image_$i")/image.oci.tar" "$SET.tmp/images/$i.oci.tar"; done
  mv "$SET.tmp" "$SET"
fi
log "all done in $((SECONDS - T0))s: $SET"
echo "$SET"
