#!/usr/bin/env bash
# `make images`: builds the container images the Helm chart (charts/livedisk) names, from Debian
# packages and the project's own binaries, with nothing pulled from an image registry. Each image
# is an OCI image archive (oci-archive tar), importable with `ctr -n k8s.io images import FILE`.
#
#   hack/images.sh                build what is missing (content-keyed cache); print the list
#   hack/images.sh --out DIR      build every image again, reading and writing no cache, into DIR
#   hack/images.sh --out DIR --reuse-rootfs
#                                 the same, but take the root filesystem layer from the cache
#   hack/images.sh --list         print the list of the last cached build (builds nothing)
#   --test (with any of the above but --list)
#                                 also build the test images, listed after the chart's
#
# Images (the list is what `helm template` renders, so it cannot drift from the chart):
#   livedisk:<appVersion>         operator, CSI driver and engine daemon: a Debian root filesystem
#                                 made by mmdebstrap (Essential set + images/packages.txt) plus
#                                 livedisk-operator and livedisk-csi (cargo --release) in
#                                 /usr/local/bin
#   sig-storage/<sidecar>:<tag>   one static Go binary from the harness build (hack/harness) at
#                                 /<sidecar>, its entrypoint, and an empty /tmp
# Test images (--test; the end-to-end tests' pods run them, users need not build them):
#   livedisk/vm-test:<appVersion> a tiny VM for pods (docs/vm-test.md): a Debian root filesystem
#                                 (Essential set + images/vm-test-packages.txt: qemu-system-x86),
#                                 the guest kernel + initramfs of hack/vm/build.sh in
#                                 /usr/local/share/livedisk-vm, vm-run (hack/vm/vm-run, the
#                                 entrypoint), the static livedisk-verifier, and the
#                                 snapshot-metadata-lister and -verifier (hack/harness: backup
#                                 clients of the snapshot-metadata sidecar) in /usr/local/bin
#
# Output: ${LIVEDISK_CACHE_DIR:-$HOME/.cache/livedisk}/images/<key>/<image>.oci.tar, where <key>
# hashes everything that goes into that artefact (the builder functions that make it and the
# OCI writer, the resolved package versions, the binaries' sha256, the epoch; for vm-test also
# vm-run and the guest's files), so that an edit here rebuilds only what it changes. The list -- chart reference, manifest digest, archive -- goes to stdout and
# to ${LIVEDISK_STATE_DIR:-./.livedisk}/images/images.txt, beside a stable symlink per archive.
#
# Package versions are resolved from the host's apt lists (apt-get -s against an empty system)
# and then installed pinned (pkg=version), so the cache key is exactly what goes in. A mirror
# that has moved past the host's lists fails the build with a message: run `apt-get update`.
#
# Env: SOURCE_DATE_EPOCH (every mtime in the images; default 1735689600 = 2025-01-01T00:00:00Z),
# LIVEDISK_CACHE_DIR, LIVEDISK_STATE_DIR, LIVEDISK_IMAGE_PROFILE (cargo profile of the livedisk
# binaries: release, the default and what users get; `make test` uses dev, whose binaries it has
# built already, to stay within CI's time: a cold release build takes 10-30 min on 2 cores),
# LIVEDISK_IMAGES_BINARIES_DIR (take livedisk-operator and livedisk-csi from this directory instead
# of building them: `make test` hands its background image test a copy of the binaries, so that
# the cargo tests running meanwhile neither wait on cargo's lock nor relink what is being packed).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PROFILE="${LIVEDISK_IMAGE_PROFILE:-release}"
# shellcheck source=hack/lib/oci-image.sh
source "$ROOT/hack/lib/oci-image.sh"

log() { echo "images: $*" >&2; }
die() { echo "images: error: $*" >&2; exit 1; }

EPOCH="${SOURCE_DATE_EPOCH:-1735689600}"
CACHE="${LIVEDISK_CACHE_DIR:-$HOME/.cache/livedisk}/images"
STATE="${LIVEDISK_STATE_DIR:-$ROOT/.livedisk}/images"
PACKAGES_FILE="$ROOT/images/packages.txt"
# The sidecar binaries the harness builds, by image name (the last path element of the chart's
# repository). node-driver-registrar is absent: see UNAVAILABLE.
SIDECARS=(csi-provisioner csi-snapshotter csi-resizer csi-snapshot-metadata)
# Images the chart names that cannot be built here, with the reason.
declare -A UNAVAILABLE=(
  [csi-node-driver-registrar]="github.com/kubernetes-csi/node-driver-registrar is not served by the Go module proxy this project can reach"
)

VM_TEST_PACKAGES_FILE="$ROOT/images/vm-test-packages.txt"

OUT="" REUSE_ROOTFS=0 LIST_ONLY=0 TEST_SET=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="${2:?--out needs a directory}"; shift 2 ;;
    --reuse-rootfs) REUSE_ROOTFS=1; shift ;;
    --list) LIST_ONLY=1; shift ;;
    --test) TEST_SET=1; shift ;;
    -h|--help) sed -n '2,41p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
[ "$REUSE_ROOTFS" = 0 ] || [ -n "$OUT" ] || die "--reuse-rootfs only goes with --out"
if [ "$LIST_ONLY" = 1 ]; then
  [ -f "$STATE/images.txt" ] || die "no images built yet ($STATE/images.txt): run make images"
  cat "$STATE/images.txt"; exit 0
fi

for tool in mmdebstrap jq gzip tar sha256sum file apt-get cargo go; do
  command -v "$tool" >/dev/null || die "'$tool' is missing: hack/deps.sh installs what make images needs"
done

# --- inputs ---------------------------------------------------------------------------------

# The package names of a package list such as images/packages.txt (comments and blank lines
# dropped).
package_names() { sed 's/#.*//' "$1" | tr -s ' \t' '\n' | sed '/^$/d'; }

# What `helm template` renders as container images, one reference per line.
chart_images() {
  local helm
  helm="$("$ROOT/hack/helm.sh" | tail -n 1)" || die "hack/helm.sh could not provide helm"
  "$helm" template livedisk "$ROOT/charts/livedisk" --namespace livedisk \
    | sed -n 's/^ *image: *"\{0,1\}\([^"]*\)"\{0,1\} *$/\1/p' | LC_ALL=C sort -u
}

# The closure of Debian's Essential set and a package list (images/packages.txt), resolved by the
# host's apt from its own lists (nothing is downloaded): sorted pkg=version lines.
resolve_packages() { # SUITE PACKAGES_FILE
  local suite="$1" packages_file="$2" arch lists essential status sim
  arch="$(dpkg --print-architecture)"
  lists="$(apt-get indextargets --format '$(FILENAME)' 'Identifier: Packages' "Architecture: $arch" "Codename: $suite")"
  [ -n "$lists" ] || die "the host's apt has no package lists for $suite/$arch: run apt-get update"
  # shellcheck disable=SC2086 # one file name per word
  essential="$(for f in $lists; do /usr/lib/apt/apt-helper cat-file "$f"; done \
    | awk '/^Package:/ { p = $2 } /^Essential: yes/ { print p }' | LC_ALL=C sort -u)"
  status="$(mktemp)"
  # shellcheck disable=SC2046,SC2086
  sim="$(apt-get -s -q -o Dir::State::Status="$status" -o APT::Install-Recommends=false \
    -o APT::Install-Suggests=false install $essential $(package_names "$packages_file") 2>&1)" \
    || { rm -f "$status"; die "apt-get could not resolve the image's packages:"$'\n'"$sim"; }
  rm -f "$status"
  awk '$1 == "Inst" { v = $3; sub(/^\(/, "", v); print $2 "=" v }' <<<"$sim" | LC_ALL=C sort
}

# The host's apt sources, as files mmdebstrap pastes into the build's sources.list: the mirror
# comes from the host's configuration and is never written into this repository.
host_sources() {
  local f
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [ -s "$f" ] && echo "$f"
  done
  return 0
}

hash_of() { sha256sum | cut -c1-16; }
# Each artefact's key names the code that builds it (the bash text of its builder functions, as
# `declare -f` prints them, and the OCI writer), not this whole script: an edit elsewhere here
# rebuilds nothing. The package lists are in the keys through the resolved pins.
recipe_hash() { { declare -f "$@"; cat "$ROOT/hack/lib/oci-image.sh"; } | hash_of; }
TOOLS="$(gzip --version | head -n1); $(tar --version | head -n1); $(jq --version)"

# --- builders -------------------------------------------------------------------------------

# Builds a root filesystem layer (the livedisk image's, vm-test's) into DIR: layer.gz,
# layer.gz.diffid and packages.lock (the pinned package list).
build_rootfs() { # DIR SUITE PINS
  local dir="$1" suite="$2" pins="$3" tmp sources
  tmp="$(mktemp -d "${dir%/*}/.rootfs.XXXXXX")"
  mapfile -t sources < <(host_sources)
  [ ${#sources[@]} -gt 0 ] || die "the host has no apt sources (/etc/apt/sources.list[.d])"
  log "mmdebstrap: $(wc -l <<<"$pins") Debian packages for $suite (downloads ~100 MB; one to two minutes)..."
  local t=$SECONDS
  # custom variant + every package pinned: exactly the resolved closure, nothing chosen anew.
  # The custom variant sets up no merged /usr by itself (usr-is-merged refuses to install
  # without it): mmdebstrap's own merged-usr hook does, as its other variants do for bookworm.
  # Documentation, man pages and translations are left out as Debian's -slim images do.
  # Python bytecode (python3's postinst compiles every module) is dropped: marshal's output
  # depends on reference counts, so two builds can differ (seen once: the livedisk image's
  # no-cache rebuild got another digest); Python compiles what it imports when it runs.
  # Progress: mmdebstrap's step lines (I:/W:/E:); everything it prints goes to mmdebstrap.log.
  if ! SOURCE_DATE_EPOCH="$EPOCH" nice -n 10 mmdebstrap --variant=custom --format=tar \
      --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
      --include="$(tr '\n' ',' <<<"$pins")" \
      --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
      --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
      --dpkgopt='path-exclude=/usr/share/locale/*' \
      --customize-hook='rm -f "$1/etc/resolv.conf" "$1/etc/hostname" "$1/etc/apt/sources.list" "$1"/etc/apt/sources.list.d/*' \
      --customize-hook='find "$1/usr" -depth -type d -name __pycache__ -exec rm -rf {} +' \
      --skip=output/dev \
      "$suite" "$tmp/rootfs.tar" "${sources[@]}" \
      > >(cat >"$tmp/mmdebstrap.out") 2> >(tee "$tmp/mmdebstrap.log" | grep --line-buffered -E '^[IWE]: ' >&2); then
    sleep 1 # the tee above may still be writing
    tail -n 30 "$tmp/mmdebstrap.log" >&2
    cp "$tmp/mmdebstrap.log" "${dir%/*}/mmdebstrap-failed.log"
    rm -rf "$tmp"
    die "mmdebstrap failed (log: ${dir%/*}/mmdebstrap-failed.log); if a pinned version is missing, the mirror has moved past the host's apt lists: run apt-get update and retry"
  fi
  rm -f "$tmp/mmdebstrap.out"
  log "mmdebstrap: done in $((SECONDS - t))s; compressing the layer..."
  oci_compress_layer "$tmp/rootfs.tar" "$tmp/layer.gz"
  rm -f "$tmp/rootfs.tar"
  echo "$pins" >"$tmp/packages.lock"
  rm -rf "$dir"
  mv "$tmp" "$dir"
}

# A layer of the given files: SPEC lines "mode path-in-image source-file" (source "-": an empty
# directory; directories on the way are created 0755), to GZ and GZ.diffid.
build_file_layer() { # GZ SPEC
  local out="$1" stage mode path src
  stage="$(mktemp -d)"
  chmod 0755 "$stage"
  while read -r mode path src; do
    [ -n "$mode" ] || continue
    if [ "$src" = "-" ]; then
      mkdir -p "$stage/$path"
    else
      mkdir -p "$stage/$(dirname "$path")"
      cp "$src" "$stage/$path"
    fi
    chmod "$mode" "$stage/$path"
  done <<<"$2"
  find "$stage" -mindepth 1 -type d ! -path "$stage/tmp" -exec chmod 0755 {} +
  oci_tar_dir "$stage" "$stage.tar" "$EPOCH"
  oci_compress_layer "$stage.tar" "$out"
  rm -rf "$stage" "$stage.tar"
}

# Writes IMAGE_DIR/<file>.oci.tar and IMAGE_DIR/digest for the livedisk image.
build_livedisk_image() { # IMAGE_DIR REF ROOTFS_DIR BIN_DIR
  local dir="$1" ref="$2" rootfs="$3" bins="$4" work digest
  work="$(mktemp -d)"
  build_file_layer "$work/bins.gz" "0755 usr/local/bin/livedisk-operator $bins/livedisk-operator
0755 usr/local/bin/livedisk-csi $bins/livedisk-csi"
  digest="$(oci_write_image "$work/layout" "$(oci_containerd_name "$ref")" \
    '{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"WorkingDir":"/"}' \
    '[{"created_by":"mmdebstrap: Debian Essential set + images/packages.txt"},{"created_by":"livedisk-operator, livedisk-csi (cargo build --profile '"$PROFILE"')"}]' \
    "$rootfs/layer.gz" "$work/bins.gz")"
  finish_image "$dir" "$ref" "$work" "$digest"
}

# Writes IMAGE_DIR/<file>.oci.tar and IMAGE_DIR/digest for a sidecar image of one static binary.
build_sidecar_image() { # IMAGE_DIR REF BINARY
  local dir="$1" ref="$2" bin="$3" name work digest
  name="$(basename "$bin")"
  work="$(mktemp -d)"
  build_file_layer "$work/layer.gz" "0755 $name $bin
1777 tmp -"
  digest="$(oci_write_image "$work/layout" "$(oci_containerd_name "$ref")" \
    "$(jq -nc --arg e "/$name" '{Entrypoint: [$e], WorkingDir: "/"}')" \
    "$(jq -nc --arg b "$name" '[{created_by: ($b + " (hack/harness, go build -trimpath, CGO_ENABLED=0)")}]')" \
    "$work/layer.gz")"
  finish_image "$dir" "$ref" "$work" "$digest"
}

# Writes IMAGE_DIR/<file>.oci.tar and IMAGE_DIR/digest for the vm-test image.
build_vm_test_image() { # IMAGE_DIR REF ROOTFS_DIR GUEST_DIR BACKUP_TOOLS_DIR
  local dir="$1" ref="$2" rootfs="$3" guest="$4" tools="$5" work digest
  work="$(mktemp -d)"
  build_file_layer "$work/vm.gz" "0755 usr/local/bin/vm-run $ROOT/hack/vm/vm-run
0755 usr/local/bin/livedisk-verifier $guest/livedisk-verifier
0755 usr/local/bin/snapshot-metadata-lister $tools/snapshot-metadata-lister
0755 usr/local/bin/snapshot-metadata-verifier $tools/snapshot-metadata-verifier
0644 usr/local/share/livedisk-vm/vmlinuz $guest/vmlinuz
0644 usr/local/share/livedisk-vm/initramfs.img $guest/initramfs.img
0644 usr/local/share/livedisk-vm/inputs.txt $guest/inputs.txt"
  digest="$(oci_write_image "$work/layout" "$(oci_containerd_name "$ref")" \
    '{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Entrypoint":["/usr/local/bin/vm-run"],"WorkingDir":"/"}' \
    '[{"created_by":"mmdebstrap: Debian Essential set + images/vm-test-packages.txt"},{"created_by":"vm-run, livedisk-verifier (static), guest kernel + initramfs (hack/vm/build.sh), snapshot-metadata-lister and -verifier (hack/harness, static)"}]' \
    "$rootfs/layer.gz" "$work/vm.gz")"
  finish_image "$dir" "$ref" "$work" "$digest"
}

archive_name() { echo "${1//[\/:]/_}.oci.tar"; }

finish_image() { # IMAGE_DIR REF WORK DIGEST
  local dir="$1" ref="$2" work="$3" digest="$4" tmp
  tmp="$(mktemp -d "${dir%/*}/.image.XXXXXX")"
  oci_archive "$work/layout" "$tmp/$(archive_name "$ref")" "$EPOCH"
  echo "$digest" >"$tmp/digest"
  rm -rf "$work" "$dir"
  mv "$tmp" "$dir"
}

# The module version a Go binary was built from (its embedded build info).
go_module_version() { go version -m "$1" | awk '$1 == "mod" { print $3; exit }'; }

# --- main -----------------------------------------------------------------------------------

T0=$SECONDS
mkdir -p "$CACHE"
if [ -n "$OUT" ]; then
  mkdir -p "$OUT"; OUT="$(cd "$OUT" && pwd)"
  IMAGES_ROOT="$OUT"
  log "building every image again into $OUT (no cache read or written$([ "$REUSE_ROOTFS" = 1 ] && echo ', except the root filesystem layer'))"
else
  IMAGES_ROOT="$CACHE"
fi

mapfile -t REFS < <(chart_images)
[ ${#REFS[@]} -gt 0 ] || die "helm template rendered no images"
log "the chart names: ${REFS[*]}"

SUITE="$(. /etc/os-release && echo "${VERSION_CODENAME:-}")"
[ -n "$SUITE" ] || die "cannot tell the host's Debian suite from /etc/os-release"
# The key of a root filesystem: what mmdebstrap is given and is.
rootfs_key() { # PINS
  { echo "rootfs $(recipe_hash build_rootfs) $SUITE $(dpkg --print-architecture) $EPOCH"; mmdebstrap --version 2>&1; echo "$TOOLS"; echo "$1"; } | hash_of
}
# The directory of the root filesystem layer of KEY, built unless the cache has it (with --out:
# built into OUT, unless --reuse-rootfs). Prints the directory.
rootfs_layer() { # KEY PINS
  local key="$1" pins="$2" rootfs="$CACHE/rootfs/$1"
  if [ -n "$OUT" ] && [ "$REUSE_ROOTFS" = 0 ]; then
    rootfs="$OUT/rootfs/$key"
  fi
  if [ ! -f "$rootfs/layer.gz.diffid" ] || { [ -n "$OUT" ] && [ "$REUSE_ROOTFS" = 0 ]; }; then
    mkdir -p "${rootfs%/*}"
    build_rootfs "$rootfs" "$SUITE" "$pins"
  else
    log "root filesystem $key: cached"
  fi
  echo "$rootfs"
}

PINS="$(resolve_packages "$SUITE" "$PACKAGES_FILE")"
ROOTFS_KEY="$(rootfs_key "$PINS")"
log "$(wc -l <<<"$PINS") Debian packages resolved ($SUITE); root filesystem key $ROOTFS_KEY"

case "$PROFILE" in
  release) PROFILE_DIR=release ;;
  dev) PROFILE_DIR=debug ;;
  *) die "LIVEDISK_IMAGE_PROFILE=$PROFILE: use release (default) or dev" ;;
esac
if [ -n "${LIVEDISK_IMAGES_BINARIES_DIR:-}" ]; then
  RUST_BINS="$LIVEDISK_IMAGES_BINARIES_DIR"
  for bin in livedisk-operator livedisk-csi; do
    [ -x "$RUST_BINS/$bin" ] || die "LIVEDISK_IMAGES_BINARIES_DIR=$RUST_BINS has no $bin"
  done
  log "livedisk binaries from $RUST_BINS (not built here)"
else
  log "cargo build --profile $PROFILE --bins -p livedisk-operator -p livedisk-csi (a cold release build takes many minutes)..."
  t=$SECONDS
  ( cd "$ROOT" && nice -n 10 cargo build --profile "$PROFILE" --bins -p livedisk-operator -p livedisk-csi ) >&2 \
    || die "cargo build --profile $PROFILE failed"
  RUST_BINS="$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps | jq -r .target_directory)/$PROFILE_DIR"
  log "cargo: done in $((SECONDS - t))s"
fi

need_sidecars=()
for ref in "${REFS[@]}"; do
  base="${ref%:*}"; base="${base##*/}"
  for s in "${SIDECARS[@]}"; do [ "$s" = "$base" ] && need_sidecars+=("$s"); done
done
HARNESS_BINS=""
if [ ${#need_sidecars[@]} -gt 0 ]; then
  HARNESS_BINS="$("$ROOT/hack/harness/build.sh" "${need_sidecars[@]}" | tail -n 1)" \
    || die "hack/harness/build.sh could not build ${need_sidecars[*]}"
fi

LIST=""
missing=()
for ref in "${REFS[@]}"; do
  base="${ref%:*}"; base="${base##*/}"; tag="${ref##*:}"
  if [ "$base" = livedisk ]; then
    key="$( { echo "livedisk $(recipe_hash build_livedisk_image build_file_layer finish_image archive_name) $ref $EPOCH $ROOTFS_KEY $TOOLS"
              sha256sum "$RUST_BINS/livedisk-operator" "$RUST_BINS/livedisk-csi" | cut -d' ' -f1; } | hash_of)"
    dir="$IMAGES_ROOT/$key"
    if [ -n "$OUT" ] || [ ! -f "$dir/digest" ]; then
      rootfs="$(rootfs_layer "$ROOTFS_KEY" "$PINS")"
      log "assembling $ref..."
      build_livedisk_image "$dir" "$ref" "$rootfs" "$RUST_BINS"
    else
      log "$ref: cached ($key)"
    fi
  elif [ -n "${UNAVAILABLE[$base]:-}" ]; then
    log "NOT BUILT: $ref: ${UNAVAILABLE[$base]}"
    missing+=("$ref")
    continue
  elif [ -n "$HARNESS_BINS" ] && [ -x "$HARNESS_BINS/$base" ]; then
    bin="$HARNESS_BINS/$base"
    built="$(go_module_version "$bin")"
    [ "$built" = "$tag" ] || die "$ref: the harness builds $base $built, the chart names $tag: align hack/harness/go.mod and charts/livedisk/values.yaml"
    file -b "$bin" | grep -q 'statically linked' || die "$bin is not statically linked (the image has no libc): build it with CGO_ENABLED=0"
    key="$( { echo "sidecar $(recipe_hash build_sidecar_image build_file_layer finish_image archive_name) $ref $EPOCH $TOOLS"; sha256sum "$bin" | cut -d' ' -f1; } | hash_of)"
    dir="$IMAGES_ROOT/$key"
    if [ -n "$OUT" ] || [ ! -f "$dir/digest" ]; then
      log "assembling $ref..."
      build_sidecar_image "$dir" "$ref" "$bin"
    else
      log "$ref: cached ($key)"
    fi
  else
    die "the chart names $ref, which this script does not know how to build"
  fi
  LIST+="$ref $(cat "$dir/digest") $dir/$(archive_name "$ref")"$'\n'
done

# The test images (--test), named with the chart's appVersion (the livedisk image's tag).
if [ "$TEST_SET" = 1 ]; then
  app_version=""
  for ref in "${REFS[@]}"; do
    base="${ref%:*}"; base="${base##*/}"
    [ "$base" = livedisk ] && app_version="${ref##*:}"
  done
  [ -n "$app_version" ] || die "the chart names no livedisk image: no appVersion to tag the test images with"
  ref="livedisk/vm-test:$app_version"
  if [ -n "$OUT" ]; then
    guest="$(SOURCE_DATE_EPOCH="$EPOCH" "$ROOT/hack/vm/build.sh" --out "$OUT/vm-guest" | tail -n 1)" || die "hack/vm/build.sh --out failed"
  else
    guest="$(SOURCE_DATE_EPOCH="$EPOCH" "$ROOT/hack/vm/build.sh" | tail -n 1)" || die "hack/vm/build.sh failed"
  fi
  vm_pins="$(resolve_packages "$SUITE" "$VM_TEST_PACKAGES_FILE")"
  vm_rootfs_key="$(rootfs_key "$vm_pins")"
  log "$ref: $(wc -l <<<"$vm_pins") Debian packages resolved; root filesystem key $vm_rootfs_key"
  # The backup-tool clients of the snapshot-metadata sidecar, for pods of the tests.
  backup_tools="$("$ROOT/hack/harness/build.sh" snapshot-metadata-lister snapshot-metadata-verifier | tail -n 1)" \
    || die "hack/harness/build.sh could not build snapshot-metadata-lister and -verifier"
  key="$( { echo "vm-test $(recipe_hash build_vm_test_image build_file_layer finish_image archive_name) $ref $EPOCH $vm_rootfs_key $TOOLS"
            sha256sum "$ROOT/hack/vm/vm-run" "$guest/vmlinuz" "$guest/initramfs.img" \
              "$guest/livedisk-verifier" "$guest/inputs.txt" \
              "$backup_tools/snapshot-metadata-lister" "$backup_tools/snapshot-metadata-verifier" \
              | cut -d' ' -f1; } | hash_of)"
  dir="$IMAGES_ROOT/$key"
  if [ -n "$OUT" ] || [ ! -f "$dir/digest" ]; then
    rootfs="$(rootfs_layer "$vm_rootfs_key" "$vm_pins")"
    log "assembling $ref..."
    build_vm_test_image "$dir" "$ref" "$rootfs" "$guest" "$backup_tools"
  else
    log "$ref: cached ($key)"
  fi
  LIST+="$ref $(cat "$dir/digest") $dir/$(archive_name "$ref")"$'\n'
fi

if [ -n "$OUT" ]; then
  printf '%s' "$LIST" >"$OUT/images.txt"
else
  mkdir -p "$STATE"
  printf '%s' "$LIST" >"$STATE/images.txt"
  while read -r ref _ archive; do
    [ -n "$ref" ] && ln -sfn "$archive" "$STATE/$(archive_name "$ref")"
  done <<<"$LIST"
fi
log "done in $((SECONDS - T0))s; reference, manifest digest, archive (list in ${OUT:-$STATE}/images.txt):"
printf '%s' "$LIST"
if [ ${#missing[@]} -gt 0 ]; then
  log "not built (see above): ${missing[*]}"
fi
