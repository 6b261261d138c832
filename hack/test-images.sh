#!/usr/bin/env bash
# The images test (issue 10): `make images` is reproducible and its images start.
#   1. hack/images.sh --test: the images the chart names and the test images (from the cache when
#      warm).
#   2. hack/images.sh --test --out TMP: every image built again from its inputs, reading no cache --
#      the root filesystem (mmdebstrap) included, unless LIVEDISK_TEST_IMAGES_REUSE_ROOTFS=1 --
#      and each manifest digest must equal the first one.
#   3. Each archive is unpacked with `umoci unpack` (which checks every blob against its digest)
#      and its programs run in the unpacked root filesystem, in new mount and PID namespaces
#      (unshare, chroot; the host's /dev bound in and a fresh /proc, as a runtime would give):
#      livedisk: livedisk-operator --help, livedisk-csi --help, qemu-storage-daemon --version,
#        nbdfuse --version, every other program the node plugin and the engine run, and the
#        engine command the chart renders, which must create its QMP socket for its owner only;
#      sidecars: <binary> --help (Go's flag package may exit non-zero: the output is checked);
#      livedisk/vm-test: qemu-system-x86_64 --version, livedisk-verifier --help, vm-run --help,
#        snapshot-metadata-lister --help, snapshot-metadata-verifier --help, and
#        hack/vm/smoke.sh --rootfs: VMs booted inside the image write to and verify a volume that
#        qemu-storage-daemon serves (docs/vm-test.md).
# Needs root (unshare, chroot, mount) and umoci. Prints "N passed, N failed" last.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PASS=0 FAIL=0
pass() { PASS=$((PASS + 1)); echo "PASS  $*"; }
fail() { FAIL=$((FAIL + 1)); echo "FAIL  $*"; }
die() { echo "test-images: error: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "needs root (unshare --mount, chroot)"
command -v umoci >/dev/null || die "umoci is missing: hack/deps.sh installs it"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/livedisk-test-images.XXXXXX")"
ENGINE_PID=""
cleanup() {
  [ -z "$ENGINE_PID" ] || kill -KILL "$ENGINE_PID" 2>/dev/null || true
  [ -z "$ENGINE_PID" ] || wait "$ENGINE_PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# --- 1 + 2: build, rebuild without the cache, compare -----------------------------------------
t=$SECONDS
hack/images.sh --test >"$WORK/first.txt" || die "hack/images.sh --test failed"
echo "test-images: build (cache allowed) took $((SECONDS - t))s"
rebuild_args=(--test --out "$WORK/rebuild")
what="root filesystem, binary layers and assembly"
if [ "${LIVEDISK_TEST_IMAGES_REUSE_ROOTFS:-0}" = 1 ]; then
  rebuild_args+=(--reuse-rootfs); what="binary layers and assembly (root filesystem from the cache)"
fi
t=$SECONDS
hack/images.sh "${rebuild_args[@]}" >"$WORK/second.txt" || die "hack/images.sh ${rebuild_args[*]} failed"
echo "test-images: rebuild without the cache ($what) took $((SECONDS - t))s"

[ -s "$WORK/first.txt" ] || die "hack/images.sh built no image"
while read -r ref digest _; do
  again="$(awk -v r="$ref" '$1 == r { print $2 }' "$WORK/second.txt")"
  if [ "$again" = "$digest" ]; then
    pass "$ref: same manifest digest when rebuilt without the cache ($digest)"
  else
    fail "$ref: manifest digest $digest, rebuilt without the cache: ${again:-none}"
  fi
done <"$WORK/first.txt"

# --- 3: unpack and run --------------------------------------------------------------------------

# Unpacks an oci-archive with umoci; prints the root filesystem directory.
unpack() { # ARCHIVE REF NAME
  local layout="$WORK/$3.layout" bundle="$WORK/$3.bundle"
  mkdir -p "$layout"
  tar -xf "$1" -C "$layout"
  umoci unpack --image "$layout:${2##*:}" "$bundle" >"$WORK/$3.umoci.log" 2>&1 \
    || { cat "$WORK/$3.umoci.log" >&2; return 1; }
  mkdir -p "$bundle/rootfs/dev" "$bundle/rootfs/proc"
  echo "$bundle/rootfs"
}

# "${IN_IMAGE[@]}" ROOTFS CMD... runs CMD inside ROOTFS: new mount and PID namespaces, the host's
# /dev bound in, a new /proc. An array, not a function, so that `"${IN_IMAGE[@]}" ... &` makes $!
# the unshare process itself (whose end kills everything inside: --kill-child).
IN_IMAGE=(unshare --mount --pid --fork --kill-child sh -c '
  r="$1"; shift
  mount --rbind /dev "$r/dev" && mount -t proc proc "$r/proc" && exec chroot "$r" "$@"' in_image)

# Runs CMD in ROOTFS and checks its output (stdout + stderr) for PATTERN, whatever its exit code.
expect_output() { # ROOTFS LABEL PATTERN CMD...
  local rootfs="$1" label="$2" pattern="$3" out; shift 3
  out="$("${IN_IMAGE[@]}" "$rootfs" "$@" 2>&1)" || true
  if grep -q -E -- "$pattern" <<<"$out"; then
    pass "$label: $* ($(grep -m1 -E -- "$pattern" <<<"$out" | cut -c1-80))"
  else
    fail "$label: '$*' printed no /$pattern/: $(head -c 300 <<<"$out")"
  fi
}

# The engine command the chart renders (default values): the container's command list, as JSON.
engine_command() {
  local helm
  helm="$(hack/helm.sh | tail -n 1)"
  "$helm" template livedisk charts/livedisk --namespace livedisk | python3 -c '
import json, sys, yaml
for doc in yaml.safe_load_all(sys.stdin):
    if doc and doc.get("kind") == "DaemonSet" and doc["metadata"]["name"].endswith("engine"):
        print(json.dumps(doc["spec"]["template"]["spec"]["containers"][0]["command"]))
        break'
}

check_livedisk() { # ROOTFS REF
  local r="$1" ref="$2" tool
  expect_output "$r" "$ref" 'Usage: livedisk-operator' livedisk-operator --help
  expect_output "$r" "$ref" 'Usage: livedisk-csi' livedisk-csi --help
  expect_output "$r" "$ref" '^qemu-storage-daemon version 7\.' qemu-storage-daemon --version
  expect_output "$r" "$ref" '^nbdfuse [0-9]' nbdfuse --version
  # Every program the node plugin and the engine run (Command::new in csi-driver/ and engine/),
  # and what the chart's engine command and readiness probe use.
  for tool in qemu-img blkid losetup fusermount3 mkfs.ext4 resize2fs mkfs.xfs xfs_growfs sh rm dirname test; do
    expect_output "$r" "$ref" "^/" which "$tool"
  done
  expect_output "$r" "$ref" '^qemu-img version 7\.' qemu-img --version
  expect_output "$r" "$ref" 'mke2fs [0-9]' mkfs.ext4 -V
  expect_output "$r" "$ref" 'mkfs.xfs version' mkfs.xfs -V

  # The chart's engine command, as the engine DaemonSet runs it: the QMP socket appears, 0600.
  local cmd sockdir="/var/lib/livedisk/engine"
  cmd="$(engine_command)"
  [ -n "$cmd" ] || { fail "$ref: helm template rendered no engine command"; return; }
  mkdir -p "$r$sockdir"
  # NUL-separated: the shell script inside the command spans many lines.
  mapfile -d '' -t argv < <(jq -j '.[] | . + "\u0000"' <<<"$cmd")
  "${IN_IMAGE[@]}" "$r" env QMP_SOCKET="$sockdir/qmp.sock" "${argv[@]}" >"$WORK/engine.log" 2>&1 &
  ENGINE_PID=$!
  local i
  for i in $(seq 1 50); do [ -S "$r$sockdir/qmp.sock" ] && break; sleep 0.1; done
  if [ -S "$r$sockdir/qmp.sock" ]; then
    local mode
    mode="$(stat -c %a "$r$sockdir/qmp.sock")"
    # umask 077 before bind(2): no access for group or others (a socket's x bit means nothing).
    if [ $((8#$mode & 8#077)) -eq 0 ]; then
      pass "$ref: the chart's engine command runs qemu-storage-daemon; QMP socket mode $mode (owner only)"
    else
      fail "$ref: the chart's engine command made its QMP socket with mode $mode: group or others have access"
    fi
  else
    fail "$ref: the chart's engine command made no QMP socket in 5 s: $(head -c 300 "$WORK/engine.log")"
  fi
  # unshare ignores SIGTERM while it waits for its child: SIGKILL, and --kill-child ends the rest.
  kill -KILL "$ENGINE_PID" 2>/dev/null || true
  wait "$ENGINE_PID" 2>/dev/null || true
  ENGINE_PID=""
}

check_vm_test() { # ROOTFS REF
  local r="$1" ref="$2" t=$SECONDS
  expect_output "$r" "$ref" '^QEMU emulator version 7\.' qemu-system-x86_64 --version
  expect_output "$r" "$ref" 'Checksummed block writer' livedisk-verifier --help
  expect_output "$r" "$ref" 'vm-run write' vm-run --help
  expect_output "$r" "$ref" 'previous-snapshot' snapshot-metadata-lister --help
  expect_output "$r" "$ref" 'target-device-path' snapshot-metadata-verifier --help
  # The VM itself, booted inside the image (smoke.sh starts it as IN_IMAGE does).
  if hack/vm/smoke.sh --rootfs "$r" >"$WORK/vm-smoke.log" 2>&1; then
    pass "$ref: VMs in the image write and verify a volume served by qemu-storage-daemon ($((SECONDS - t))s): $(grep -c '^PASS' "$WORK/vm-smoke.log") checks"
  else
    fail "$ref: hack/vm/smoke.sh --rootfs: $(grep -E '^(FAIL|vm-smoke: error)' "$WORK/vm-smoke.log" | head -c 400)"
  fi
  grep -E '^(PASS|FAIL)' "$WORK/vm-smoke.log" | sed 's/^/      vm-smoke: /'
}

i=0
while read -r ref digest archive; do
  i=$((i + 1))
  if ! rootfs="$(unpack "$archive" "$ref" "img$i")"; then
    fail "$ref: umoci unpack of $archive failed"
    continue
  fi
  pass "$ref: umoci unpack (blobs match their digests)"
  base="${ref%:*}"; base="${base##*/}"
  if [ "$base" = livedisk ]; then
    check_livedisk "$rootfs" "$ref"
  elif [ "$base" = vm-test ]; then
    check_vm_test "$rootfs" "$ref"
  else
    # Every kubernetes-csi sidecar has --csi-address; its usage text names it.
    expect_output "$rootfs" "$ref" 'csi-address' "/$base" --help
  fi
  rm -rf "$WORK/img$i.layout" "$WORK/img$i.bundle"
done <"$WORK/first.txt"

echo
echo "images: $PASS passed, $FAIL failed"
[ "$FAIL" -eq 0 ]
