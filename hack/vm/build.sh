#!/usr/bin/env bash
# Builds the test VM's guest: a Debian cloud kernel and a small initramfs (busybox-static, the
# checksummed writer/verifier livedisk-verifier built statically, the virtio modules, Debian's
# qemu-guest-agent and mke2fs with the shared libraries they load, and hack/vm/guest-init as
# /init). docs/vm-test.md says what the guest does.
#
#   hack/vm/build.sh              build what is missing (content-keyed cache); print the output dir
#   hack/vm/build.sh --out DIR    build again into DIR, reading and writing no cache
#
# Output directory (last line of stdout): vmlinuz, initramfs.img (gzip'd newc cpio),
# livedisk-verifier (static, also what the vm-test image ships), inputs.txt (what went in).
# Cache: ${LIVEDISK_CACHE_DIR:-$HOME/.cache/livedisk}/vm/<key>, where <key> hashes this script,
# guest-init, the pinned package versions, the verifier's source and the Rust toolchain.
#
# Package versions are the host apt's candidates (its own lists, as hack/images.sh resolves
# them), downloaded pinned (pkg=version): a mirror that has moved past the host's lists fails the
# download with a message to run `apt-get update`.
#
# Env: SOURCE_DATE_EPOCH (mtime of every initramfs entry; default 1735689600), LIVEDISK_CACHE_DIR.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
log() { echo "vm-build: $*" >&2; }
die() { echo "vm-build: error: $*" >&2; exit 1; }

EPOCH="${SOURCE_DATE_EPOCH:-1735689600}"
CACHE="${LIVEDISK_CACHE_DIR:-$HOME/.cache/livedisk}/vm"
KERNEL_META=linux-image-cloud-amd64
BUSYBOX=busybox-static
# Dynamically linked programs the guest runs, from Debian packages: qemu-ga (the real guest agent:
# fsfreeze, shutdown) and mke2fs (the live mode's ext4 disk). GUEST_PROGRAMS are paths inside
# their packages; GUEST_LIBRARY_PACKAGES must hold every shared library they load (build.sh walks
# their NEEDED entries and fails naming a missing one).
GUEST_PROGRAM_PACKAGES=(qemu-guest-agent e2fsprogs)
GUEST_PROGRAMS=(usr/sbin/qemu-ga sbin/mke2fs)
GUEST_LIBRARY_PACKAGES=(libc6 libglib2.0-0 libnuma1 libudev1 liburing2 libpcre2-8-0 libblkid1
  libuuid1 libcom-err2 libext2fs2)
# The virtio modules the guest loads, in load order (the cloud kernel builds them as modules):
# virtio_blk for its disks, virtio_console for its output port (a virtio serial port).
MODULES=(virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk virtio_console)
# The verifier is built for the target explicitly, so that crt-static applies to it and not to
# build scripts or proc macros, and its output stays apart from the workspace's own target/.
VERIFIER_TARGET=x86_64-unknown-linux-gnu

OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="${2:?--out needs a directory}"; shift 2 ;;
    -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
for tool in apt-get apt-cache dpkg-deb cpio gzip sha256sum cargo file readelf; do
  command -v "$tool" >/dev/null || die "'$tool' is missing: hack/deps.sh installs it"
done

# --- inputs ---------------------------------------------------------------------------------

candidate() { # PACKAGE -> its candidate version in the host's apt lists
  apt-cache policy "$1" 2>/dev/null | awk '$1 == "Candidate:" { print $2 }'
}
pin() { # PACKAGE -> PACKAGE=VERSION
  local v
  v="$(candidate "$1")"
  if [ -z "$v" ] || [ "$v" = "(none)" ]; then die "the host's apt knows no $1: run apt-get update"; fi
  echo "$1=$v"
}
# The metapackage names the kernel of the day; pin that package itself.
META_PIN="$(pin "$KERNEL_META")"
KERNEL_PKG="$(apt-cache depends "$META_PIN" 2>/dev/null \
  | awk '$1 == "Depends:" && $2 ~ /^linux-image-.*-cloud-amd64$/ { print $2; exit }')"
[ -n "$KERNEL_PKG" ] || die "$META_PIN depends on no linux-image-*-cloud-amd64 package"
KERNEL_PIN="$(pin "$KERNEL_PKG")"
BUSYBOX_PIN="$(pin "$BUSYBOX")"
GUEST_PINS=()
for p in "${GUEST_PROGRAM_PACKAGES[@]}" "${GUEST_LIBRARY_PACKAGES[@]}"; do GUEST_PINS+=("$(pin "$p")"); done

verifier_source_hash() {
  (cd "$ROOT" && cat Cargo.toml Cargo.lock tests/verifier/Cargo.toml && find tests/verifier/src -type f | LC_ALL=C sort | xargs cat) \
    | sha256sum | cut -c1-16
}
KEY="$( { cat "$0" "$ROOT/hack/vm/guest-init"; echo "$KERNEL_PIN $BUSYBOX_PIN ${GUEST_PINS[*]} $EPOCH $VERIFIER_TARGET"
          verifier_source_hash; rustc -V; cpio --version | head -n1; gzip --version | head -n1; } \
        | sha256sum | cut -c1-16)"

if [ -z "$OUT" ]; then
  DEST="$CACHE/$KEY"
  if [ -f "$DEST/inputs.txt" ]; then
    log "cached ($KEY): $KERNEL_PIN, $BUSYBOX_PIN"
    echo "$DEST"; exit 0
  fi
else
  mkdir -p "$OUT"; DEST="$(cd "$OUT" && pwd)"
fi
T0=$SECONDS
log "building the guest ($KEY): $KERNEL_PIN, $BUSYBOX_PIN, livedisk-verifier"

mkdir -p "${DEST%/*}"
WORK="$(mktemp -d "${DEST%/*}/.vm-build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

# --- the verifier, static -------------------------------------------------------------------

log "cargo build --release --target $VERIFIER_TARGET -p livedisk-verifier (static; ~1 min cold)..."
t=$SECONDS
(cd "$ROOT" && RUSTFLAGS='-C target-feature=+crt-static' nice -n 10 \
  cargo build --release --target "$VERIFIER_TARGET" -p livedisk-verifier) >&2 \
  || die "building livedisk-verifier failed"
VERIFIER="$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps | jq -r .target_directory)/$VERIFIER_TARGET/release/livedisk-verifier"
file -b "$VERIFIER" | grep -q 'static' || die "$VERIFIER is not statically linked"
log "cargo: done in $((SECONDS - t))s"

# --- Debian packages --------------------------------------------------------------------------

log "apt-get download $KERNEL_PIN $BUSYBOX_PIN and ${#GUEST_PINS[@]} packages for qemu-ga and mke2fs (~35 MB)..."
mkdir -p "$WORK/debs"
# As root, apt downloads as the _apt user unless told otherwise; the work dir is root's.
(cd "$WORK/debs" && apt-get download -q -o APT::Sandbox::User=root "$KERNEL_PIN" "$BUSYBOX_PIN" "${GUEST_PINS[@]}") >"$WORK/apt.log" 2>&1 \
  || { cat "$WORK/apt.log" >&2; die "apt-get download failed; if a pinned version is missing, the mirror has moved past the host's apt lists: run apt-get update"; }
dpkg-deb -x "$WORK/debs/${KERNEL_PIN%%=*}"_*.deb "$WORK/kernel"
dpkg-deb -x "$WORK/debs/${BUSYBOX_PIN%%=*}"_*.deb "$WORK/busybox"
for p in "${GUEST_PINS[@]}"; do dpkg-deb -x "$WORK/debs/${p%%=*}"_*.deb "$WORK/userland"; done
KVER="${KERNEL_PKG#linux-image-}"
[ -f "$WORK/kernel/boot/vmlinuz-$KVER" ] || die "$KERNEL_PKG has no boot/vmlinuz-$KVER"

# --- the initramfs ----------------------------------------------------------------------------

ROOTFS="$WORK/initramfs"
mkdir -p "$ROOTFS/bin" "$ROOTFS/lib/modules" "$ROOTFS/dev" "$ROOTFS/proc" "$ROOTFS/sys" "$ROOTFS/tmp"
install -m 0755 "$ROOT/hack/vm/guest-init" "$ROOTFS/init"
install -m 0755 "$WORK/busybox/bin/busybox" "$ROOTFS/bin/busybox"
install -m 0755 "$VERIFIER" "$ROOTFS/bin/livedisk-verifier"
loaded=" "
for m in "${MODULES[@]}"; do
  ko="$(find "$WORK/kernel/lib/modules/$KVER" -name "$m.ko")"
  [ -n "$ko" ] || die "$KERNEL_PKG has no $m.ko (is it built in now? then drop it from MODULES)"
  # Each module's dependencies (its .modinfo depends= field) must be loaded before it.
  deps="$(grep -a -o 'depends=[a-z0-9_,-]*' "$ko" | head -n1 | cut -d= -f2 | tr ',' ' ')"
  for d in $deps; do
    [[ "$loaded" == *" $d "* ]] || die "$m.ko depends on $d, which MODULES does not load before it"
  done
  install -m 0644 "$ko" "$ROOTFS/lib/modules/$m.ko"
  loaded+="$m "
done
printf '%s\n' "${MODULES[@]}" >"$ROOTFS/lib/modules/load-order"
# The dynamic programs, their shared libraries (NEEDED, transitively, found in the extracted
# packages' library dirs) and the loader they name. Libraries land in /lib, which the loader
# searches by default.
UL="$WORK/userland"
mkdir -p "$ROOTFS/lib64" "$ROOTFS/sbin" "$ROOTFS/etc"
find_library() { # SONAME -> its path in the extracted packages
  local d
  for d in lib/x86_64-linux-gnu usr/lib/x86_64-linux-gnu; do
    [ -e "$UL/$d/$1" ] && { echo "$UL/$d/$1"; return; }
  done
  die "no package of GUEST_LIBRARY_PACKAGES holds $1 (add the package that does)"
}
pending=() copied=" "
for prog in "${GUEST_PROGRAMS[@]}"; do
  [ -f "$UL/$prog" ] || die "no $prog in ${GUEST_PROGRAM_PACKAGES[*]}"
  install -m 0755 "$UL/$prog" "$ROOTFS/sbin/${prog##*/}"
  pending+=("$UL/$prog")
done
while [ ${#pending[@]} -gt 0 ]; do
  elf="${pending[0]}"; pending=("${pending[@]:1}")
  for so in $(readelf -d "$elf" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
    [[ "$copied" == *" $so "* ]] && continue
    lib="$(find_library "$so")"
    install -m 0755 "$(readlink -f "$lib")" "$ROOTFS/lib/$so"
    copied+="$so "; pending+=("$lib")
  done
done
install -m 0755 "$(readlink -f "$UL/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")" "$ROOTFS/lib64/ld-linux-x86-64.so.2"
install -m 0644 "$UL/etc/mke2fs.conf" "$ROOTFS/etc/mke2fs.conf"
# Reproducible archive: sorted names, owner 0:0, one mtime, inode numbers renumbered.
find "$ROOTFS" -exec touch -h -d "@$EPOCH" {} +
(cd "$ROOTFS" && find . -mindepth 1 | LC_ALL=C sort \
  | cpio --quiet -o -H newc --reproducible -R 0:0) | gzip -n -9 >"$WORK/initramfs.img"

install -m 0644 "$WORK/kernel/boot/vmlinuz-$KVER" "$WORK/vmlinuz"
install -m 0755 "$VERIFIER" "$WORK/livedisk-verifier"
cat >"$WORK/inputs.txt" <<EOF
key $KEY
kernel $KERNEL_PIN (via $META_PIN)
busybox $BUSYBOX_PIN
guest programs ${GUEST_PROGRAMS[*]} from ${GUEST_PINS[*]}
guest libraries${copied% }
verifier source $(verifier_source_hash), $(rustc -V), target $VERIFIER_TARGET, crt-static
modules ${MODULES[*]}
EOF
rm -rf "$WORK/debs" "$WORK/kernel" "$WORK/busybox" "$WORK/userland" "$ROOTFS" "$WORK/apt.log"
if [ -z "$OUT" ]; then
  rm -rf "$DEST"; mv "$WORK" "$DEST"
else
  mv -f "$WORK"/* "$DEST"/
fi
trap - EXIT
[ -z "$OUT" ] || rm -rf "$WORK"
log "done in $((SECONDS - T0))s: $(du -h "$DEST/vmlinuz" | cut -f1) kernel, $(du -h "$DEST/initramfs.img" | cut -f1) initramfs"
echo "$DEST"
