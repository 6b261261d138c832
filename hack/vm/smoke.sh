#!/usr/bin/env bash
# The test VM without a cluster (docs/vm-test.md): a qcow2 volume served by a real
# qemu-storage-daemon (NBD export on a unix socket -> nbdfuse -> loop device, the node plugin's
# block path); a VM that writes checksummed blocks to the loop device, during which a snapshot is
# taken over QMP (blockdev-snapshot-sync: the volume file freezes, an overlay takes the writes)
# once the VM has printed a third of its acks; then, each on a `qemu-img convert` copy served the
# same way, a VM that verifies every acknowledged write on the final state, one that verifies
# the snapshot holds every write acknowledged before it was taken (vm-run --upto), and two that
# must fail (the check can fail): the snapshot against the whole log, and a copy with an
# acknowledged block zeroed.
#
#   hack/vm/smoke.sh                   vm-run and the guest from this tree (hack/vm/build.sh)
#   hack/vm/smoke.sh --rootfs DIR      vm-run, qemu and the guest from an unpacked vm-test image
#                                      (run inside it: new mount + PID namespaces, chroot, the
#                                      host's /dev bound in, as hack/test-images.sh starts images)
#
# Env: SMOKE_BLOCKS (4096, 16 MiB of a 64 MiB volume), SMOKE_WRITES (3000).
# Needs root (losetup, FUSE, unshare). Prints the VMs' boot-to-power-off times and, last,
# "N passed, N failed".
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

PASS=0 FAIL=0
pass() { PASS=$((PASS + 1)); echo "PASS  $*"; }
fail() { FAIL=$((FAIL + 1)); echo "FAIL  $*"; }
die() { echo "vm-smoke: error: $*" >&2; exit 1; }
log() { echo "vm-smoke: $*" >&2; }

ROOTFS=""
while [ $# -gt 0 ]; do
  case "$1" in
    --rootfs) ROOTFS="$(cd "${2:?--rootfs needs a directory}" && pwd)"; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
BLOCKS="${SMOKE_BLOCKS:-4096}" WRITES="${SMOKE_WRITES:-3000}"
[ "$(id -u)" -eq 0 ] || die "needs root (losetup, FUSE mounts)"
for tool in qemu-storage-daemon qemu-img qemu-io nbdfuse fusermount3 losetup; do
  command -v "$tool" >/dev/null || die "'$tool' is missing: hack/deps.sh installs it"
done

WORK="$(mktemp -d "${TMPDIR:-/tmp}/livedisk-vm-smoke.XXXXXX")"
QSD_PID="" NBDFUSE_PID="" LOOP="" FUSE_DIR=""
detach() {
  if [ -n "$LOOP" ]; then losetup --detach "$LOOP" 2>/dev/null || true; LOOP=""; fi
  if [ -n "$FUSE_DIR" ]; then fusermount3 -u "$FUSE_DIR" 2>/dev/null || true; FUSE_DIR=""; fi
  if [ -n "$NBDFUSE_PID" ]; then
    for _ in $(seq 1 50); do kill -0 "$NBDFUSE_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$NBDFUSE_PID" 2>/dev/null || true
    NBDFUSE_PID=""
  fi
  if [ -n "$QSD_PID" ]; then
    # SIGTERM: the daemon flushes and closes its images, as a clean stop does.
    kill -TERM "$QSD_PID" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$QSD_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$QSD_PID" 2>/dev/null || true
    QSD_PID=""
  fi
}
cleanup() {
  detach
  if [ -n "$ROOTFS" ]; then rm -rf "$ROOTFS/tmp/vm-smoke"; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

# Serves QCOW2 with a qemu-storage-daemon NBD export, mounts it as a file with nbdfuse and puts
# a loop device over that file (no direct I/O: see DESIGN.md §3); sets LOOP.
attach() { # QCOW2 NAME
  local qcow2="$1" name="$2" sock="$WORK/$2.sock" pidfile="$WORK/$2.nbdfuse.pid"
  qemu-storage-daemon \
    --chardev "socket,id=qmp,path=$WORK/$name.qmp,server=on,wait=off" --monitor chardev=qmp \
    --blockdev "driver=file,node-name=file0,filename=$qcow2" \
    --blockdev driver=qcow2,node-name=disk0,file=file0 \
    --nbd-server "addr.type=unix,addr.path=$sock" \
    --export type=nbd,id=exp0,node-name=disk0,name=disk,writable=on \
    >"$WORK/$name.qsd.log" 2>&1 &
  QSD_PID=$!
  for _ in $(seq 1 100); do [ -S "$sock" ] && break; sleep 0.05; done
  [ -S "$sock" ] || die "qemu-storage-daemon made no NBD socket: $(cat "$WORK/$name.qsd.log")"
  FUSE_DIR="$WORK/$name.fuse"
  mkdir -p "$FUSE_DIR"
  nbdfuse -P "$pidfile" "$FUSE_DIR" "nbd+unix:///disk?socket=$sock" >"$WORK/$name.nbdfuse.log" 2>&1 &
  for _ in $(seq 1 150); do [ -s "$pidfile" ] && break; sleep 0.1; done
  [ -s "$pidfile" ] || die "nbdfuse did not come up: $(cat "$WORK/$name.nbdfuse.log")"
  NBDFUSE_PID="$(cat "$pidfile")"
  LOOP="$(losetup --find --show "$FUSE_DIR/nbd")"
  log "$name: $qcow2 -> qemu-storage-daemon NBD -> nbdfuse -> $LOOP"
}

# Runs one QMP command on SOCKET; prints its "return" (JSON), fails on an "error".
qmp() { "$ROOT/hack/vm/qmp" "$@"; } # SOCKET COMMAND ARGUMENTS_JSON

# Where vm-run runs, and where its ack logs live (inside the image: under its /tmp).
if [ -n "$ROOTFS" ]; then
  [ -x "$ROOTFS/usr/local/bin/vm-run" ] || die "$ROOTFS has no /usr/local/bin/vm-run: not a vm-test image"
  mkdir -p "$ROOTFS/dev" "$ROOTFS/proc" "$ROOTFS/tmp/vm-smoke"
  ACKS_HOST="$ROOTFS/tmp/vm-smoke" ACKS_RUN="/tmp/vm-smoke"
  vm_run() {
    unshare --mount --pid --fork --kill-child sh -c '
      r="$1"; shift
      mount --rbind /dev "$r/dev" && mount -t proc proc "$r/proc" && exec chroot "$r" "$@"' in_image \
      "$ROOTFS" vm-run "$@"
  }
  where="inside the vm-test image ($ROOTFS)"
else
  GUEST="$("$ROOT/hack/vm/build.sh" | tail -n 1)" || die "hack/vm/build.sh failed"
  ACKS_HOST="$WORK" ACKS_RUN="$WORK"
  vm_run() { "$ROOT/hack/vm/vm-run" "$@" --guest "$GUEST"; }
  where="on the host (hack/vm/vm-run, guest $GUEST)"
fi
log "vm-run $where; $(qemu-system-x86_64 --version 2>/dev/null | head -n1 || echo 'host has no qemu-system-x86_64')"

# Runs vm-run; its console goes to FILE.console; prints "rc seconds".
timed_vm_run() { # NAME ARGS...
  local name="$1" rc=0; shift
  vm_run "$@" >"$WORK/$name.console" 2>"$WORK/$name.err" || rc=$?
  echo "$rc $(sed -n 's/^vm-run: qemu ran \([0-9.]*\)s.*/\1/p' "$WORK/$name.err")"
}
show_failure() { # NAME
  tail -n 15 "$WORK/$1.console" "$WORK/$1.err" >&2 || true
}

# --- 1. write on a volume the daemon serves; a snapshot while the VM writes ----------------------
qemu-img create -q -f qcow2 "$WORK/vol.qcow2" 64M
attach "$WORK/vol.qcow2" vol
vm_run write --disk "$LOOP" --acks "$ACKS_RUN/acks.jsonl" --blocks "$BLOCKS" --count "$WRITES" --tag 11 \
  >"$WORK/write.console" 2>"$WORK/write.err" &
vm=$!
# The acks the console has shown so far: each was acknowledged before the snapshot call below.
last_ack() { sed -n 's/^LDACK {"seq":\([0-9]*\),.*/\1/p' "$WORK/write.console" | tail -n 1; }
for _ in $(seq 1 1200); do
  seen="$(last_ack)"
  [ "${seen:-0}" -lt $((WRITES / 3)) ] && kill -0 "$vm" 2>/dev/null || break
  sleep 0.1
done
snap_upto="$(last_ack)"; snap_upto="${snap_upto:-0}"
snap_out="$(qmp "$WORK/vol.qmp" blockdev-snapshot-sync \
  "{\"node-name\": \"disk0\", \"snapshot-file\": \"$WORK/overlay.qcow2\", \"snapshot-node-name\": \"overlay0\", \"format\": \"qcow2\"}" 2>&1)" \
  && snap_rc=0 || snap_rc=$?
running_after_snapshot=no
kill -0 "$vm" 2>/dev/null && running_after_snapshot=yes
rc=0; wait "$vm" || rc=$?
secs="$(sed -n 's/^vm-run: qemu ran \([0-9.]*\)s.*/\1/p' "$WORK/write.err")"
acked="$(grep -c . "$ACKS_HOST/acks.jsonl" 2>/dev/null || echo 0)"
if [ "$rc" -eq 0 ] && [ "$acked" -eq "$WRITES" ]; then
  pass "write VM on $LOOP (qcow2 via qemu-storage-daemon): $acked acknowledged writes over $BLOCKS blocks; boot to power-off ${secs}s"
else
  fail "write VM: exit $rc, $acked of $WRITES writes acknowledged"; show_failure write
fi
if [ "$snap_rc" -eq 0 ] && [ "$running_after_snapshot" = yes ] && [ "$snap_upto" -gt 0 ] && [ "$snap_upto" -lt "$acked" ]; then
  pass "snapshot (blockdev-snapshot-sync) while the VM wrote: after ack $snap_upto of $acked"
else
  fail "snapshot while the VM wrote: QMP exit $snap_rc ($snap_out), VM still running: $running_after_snapshot, after ack $snap_upto of $acked"
fi
detach

# --- 2. copies of the volume and of the snapshot, verified by VMs -------------------------------
if qemu-img check -q "$WORK/overlay.qcow2" && qemu-img check -q "$WORK/vol.qcow2"; then
  pass "qemu-img check: the volume (snapshot + overlay) is consistent after the daemon stopped"
else
  fail "qemu-img check found errors in the volume"
fi
# The volume's final state (the overlay over the snapshot, flattened) and the snapshot alone.
qemu-img convert -f qcow2 -O qcow2 "$WORK/overlay.qcow2" "$WORK/copy.qcow2"
qemu-img convert -f qcow2 -O qcow2 "$WORK/vol.qcow2" "$WORK/snap.qcow2"
attach "$WORK/copy.qcow2" copy
read -r rc secs < <(timed_vm_run verify verify --disk "$LOOP" --acks "$ACKS_RUN/acks.jsonl" --tag 11)
if [ "$rc" -eq 0 ] && grep -q "status=ok" "$WORK/verify.console"; then
  pass "verify VM on a qemu-img copy: $(sed -n 's/^LIVEDISK-RESULT .*status=ok //p' "$WORK/verify.console"); boot to power-off ${secs}s"
else
  fail "verify VM on the copy: exit $rc"; show_failure verify
fi
detach
attach "$WORK/snap.qcow2" snap
read -r rc secs < <(timed_vm_run snap verify --disk "$LOOP" --acks "$ACKS_RUN/acks.jsonl" --upto "$snap_upto" --tag 11)
if [ "$rc" -eq 0 ] && grep -q "status=ok" "$WORK/snap.console"; then
  pass "verify VM on the snapshot: every write acknowledged before it (--upto $snap_upto): $(sed -n 's/^LIVEDISK-RESULT .*status=ok //p' "$WORK/snap.console"); ${secs}s"
else
  fail "verify VM on the snapshot (--upto $snap_upto): exit $rc"; show_failure snap
fi
# The snapshot is a point in time: the writes after it are not in it, so the whole log fails.
read -r rc secs < <(timed_vm_run snap-all verify --disk "$LOOP" --acks "$ACKS_RUN/acks.jsonl" --tag 11)
if [ "$rc" -eq 1 ] && grep -q "status=failed" "$WORK/snap-all.console"; then
  pass "verify VM on the snapshot with the whole log fails (the later writes are not in it); ${secs}s"
else
  fail "verify VM on the snapshot with the whole log: exit $rc (expected 1: the snapshot would hold writes made after it)"
fi
detach

# --- 3. the check can fail: one acknowledged block lost ------------------------------------------
# The last write's block, zeroed in a copy: its latest acknowledged write no longer reads back.
last_block="$(tail -n 1 "$ACKS_HOST/acks.jsonl" | sed 's/.*"block":\([0-9]*\).*/\1/')"
qemu-img convert -f qcow2 -O qcow2 "$WORK/copy.qcow2" "$WORK/broken.qcow2"
qemu-io -f qcow2 -c "write -z $((last_block * 4096)) 4k" "$WORK/broken.qcow2" >/dev/null
attach "$WORK/broken.qcow2" broken
read -r rc secs < <(timed_vm_run broken verify --disk "$LOOP" --acks "$ACKS_RUN/acks.jsonl" --tag 11)
if [ "$rc" -eq 1 ] && grep -q "^LIVEDISK-RESULT .*status=failed bad_blocks=$last_block " "$WORK/broken.console"; then
  pass "verify VM on a copy with block $last_block zeroed: fails and names the block; ${secs}s"
else
  fail "verify VM on a damaged copy: exit $rc (expected 1, a failed result naming block $last_block)"; show_failure broken
fi
detach

echo
echo "vm-smoke: $PASS passed, $FAIL failed"
[ "$FAIL" -eq 0 ]
