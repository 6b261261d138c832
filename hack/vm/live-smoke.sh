#!/usr/bin/env bash
# The live test VM without a cluster (docs/vm-test.md): two qcow2 volumes served by one real
# qemu-storage-daemon (NBD exports on a unix socket -> nbdfuse -> loop devices, the node plugin's
# block path) are the disks of a running VM (vm-run live: a block writer on the first, ext4 with a
# file writer on the second, the real qemu-guest-agent). While it runs:
#   1. both volumes are snapshotted in one QMP transaction *without* a freeze: the copy of the
#      ext4 disk needs journal recovery (the check below can tell a frozen cut from a crash cut);
#   2. the guest is frozen through its agent (guest-fsfreeze-freeze), both volumes are
#      snapshotted in one transaction, the guest is thawed: the copy of the ext4 disk is clean
#      (e2fsck -fn passes, no needs_recovery), its file holds every write its own log (on the
#      same filesystem) records, and the block disk's copy holds every write acknowledged before
#      the freeze;
#   3. the agent's guest-shutdown ends the writers; the guest verifies both disks itself and
#      powers off (status=ok); offline, `qemu-img convert` of the final layers is verified again
#      against the guest's ack log, independently of the guest.
#
#   hack/vm/live-smoke.sh
#
# Needs root (losetup, FUSE, mount), python3, e2fsprogs. Prints the freeze's duration as the agent
# and the host saw it, and last "N passed, N failed".
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

PASS=0 FAIL=0
pass() { PASS=$((PASS + 1)); echo "PASS  $*"; }
fail() { FAIL=$((FAIL + 1)); echo "FAIL  $*"; }
die() { echo "vm-live-smoke: error: $*" >&2; exit 1; }
log() { echo "vm-live-smoke: $*" >&2; }

case "${1:-}" in
  -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  "") ;;
  *) die "unknown argument '$1' (see --help)" ;;
esac
[ "$(id -u)" -eq 0 ] || die "needs root (losetup, FUSE and ext4 mounts)"
for tool in qemu-storage-daemon qemu-img nbdfuse fusermount3 losetup python3 e2fsck dumpe2fs; do
  command -v "$tool" >/dev/null || die "'$tool' is missing: hack/deps.sh installs it"
done
AGENT="$ROOT/hack/vm/guest-agent"
GUEST="$("$ROOT/hack/vm/build.sh" | tail -n 1)" || die "hack/vm/build.sh failed"
VERIFIER="$GUEST/livedisk-verifier"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/livedisk-vm-live.XXXXXX")"
QSD_PID="" VM_PID="" LOOPS=() FUSES=() MOUNTS=()
cleanup() {
  [ -z "$VM_PID" ] || kill "$VM_PID" 2>/dev/null || true
  for m in "${MOUNTS[@]}"; do umount "$m" 2>/dev/null || true; done
  for l in "${LOOPS[@]}"; do losetup -d "$l" 2>/dev/null || true; done
  for f in "${FUSES[@]}"; do fusermount3 -u "$f" 2>/dev/null || true; done
  if [ -n "$QSD_PID" ]; then
    kill -TERM "$QSD_PID" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$QSD_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$QSD_PID" 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

# Runs one QMP command on the daemon; prints its "return" (JSON), fails on an "error".
qmp() { "$ROOT/hack/vm/qmp" "$WORK/qsd.qmp" "$@"; } # COMMAND ARGUMENTS_JSON
# One transaction: both volumes' active layers become snapshots, new overlays NAME-a/b take the
# writes (the engine's group snapshot does the same).
snapshot_both() { # NAME
  local actions=""
  for d in a b; do
    actions+="${actions:+,}{\"type\": \"blockdev-snapshot-sync\", \"data\": {\"node-name\": \"$(active "$d")\",
      \"snapshot-file\": \"$WORK/$1-$d.qcow2\", \"snapshot-node-name\": \"$1-$d\", \"format\": \"qcow2\"}}"
  done
  qmp transaction "{\"actions\": [$actions]}" >/dev/null
  ACTIVE_a="$1-a" ACTIVE_b="$1-b"
}
active() { local v="ACTIVE_$1"; echo "${!v}"; }

# --- the two volumes, one daemon ------------------------------------------------------------------
for d in a b; do qemu-img create -q -f qcow2 "$WORK/vol-$d.qcow2" 64M; done
qemu-storage-daemon \
  --chardev "socket,id=qmp,path=$WORK/qsd.qmp,server=on,wait=off" --monitor chardev=qmp \
  --blockdev "driver=file,node-name=file-a,filename=$WORK/vol-a.qcow2" --blockdev driver=qcow2,node-name=base-a,file=file-a \
  --blockdev "driver=file,node-name=file-b,filename=$WORK/vol-b.qcow2" --blockdev driver=qcow2,node-name=base-b,file=file-b \
  --nbd-server "addr.type=unix,addr.path=$WORK/nbd.sock" \
  --export type=nbd,id=exp-a,node-name=base-a,name=a,writable=on \
  --export type=nbd,id=exp-b,node-name=base-b,name=b,writable=on \
  >"$WORK/qsd.log" 2>&1 &
QSD_PID=$!
ACTIVE_a=base-a ACTIVE_b=base-b
for _ in $(seq 1 100); do [ -S "$WORK/nbd.sock" ] && break; sleep 0.05; done
[ -S "$WORK/nbd.sock" ] || die "qemu-storage-daemon made no NBD socket: $(cat "$WORK/qsd.log")"
declare -A LOOP
for d in a b; do
  mkdir -p "$WORK/fuse-$d"
  nbdfuse -P "$WORK/nbdfuse-$d.pid" "$WORK/fuse-$d" "nbd+unix:///$d?socket=$WORK/nbd.sock" >"$WORK/nbdfuse-$d.log" 2>&1 &
  for _ in $(seq 1 150); do [ -s "$WORK/nbdfuse-$d.pid" ] && break; sleep 0.1; done
  [ -s "$WORK/nbdfuse-$d.pid" ] || die "nbdfuse did not come up: $(cat "$WORK/nbdfuse-$d.log")"
  FUSES+=("$WORK/fuse-$d")
  LOOP[$d]="$(losetup --find --show "$WORK/fuse-$d/nbd")"
  LOOPS+=("${LOOP[$d]}")
done
log "volumes: vol-a.qcow2 -> ${LOOP[a]}, vol-b.qcow2 -> ${LOOP[b]} (one qemu-storage-daemon, NBD, nbdfuse, loop)"

# --- the running VM -------------------------------------------------------------------------------
"$ROOT/hack/vm/vm-run" live --disk "${LOOP[a]}" --disk2 "${LOOP[b]}" --acks "$WORK/acks.jsonl" \
  --blocks 2048 --file-blocks 1024 --agent "$WORK/qga.sock" --seconds 600 --tag 21 --guest "$GUEST" \
  >"$WORK/vm.console" 2>"$WORK/vm.err" &
VM_PID=$!
last_seq() { # PREFIX -> the newest seq the console has shown on PREFIX lines
  sed -n "s/^$1 {\"seq\":\([0-9]*\),.*/\1/p" "$WORK/vm.console" | tail -n 1
}
for _ in $(seq 1 1800); do
  kill -0 "$VM_PID" 2>/dev/null || { tail -n 20 "$WORK/vm.console" "$WORK/vm.err" >&2; die "the VM ended early"; }
  [ "$(last_seq LDACK)" -ge 300 ] 2>/dev/null && [ "$(last_seq LDFILE)" -ge 100 ] 2>/dev/null && break
  sleep 0.1
done
[ "$(last_seq LDFILE)" -ge 100 ] 2>/dev/null || die "the guest's writers did not get going in 180 s"
log "the guest writes: block acks $(last_seq LDACK), file acks $(last_seq LDFILE)"
"$AGENT" "$WORK/qga.sock" guest-ping >/dev/null || die "the guest agent does not answer"

# --- 1. a crash-consistent cut (no freeze) ---------------------------------------------------------
snapshot_both crash
sleep 2

# --- 2. a cut inside a guest freeze ------------------------------------------------------------------
block_upto="$(last_seq LDACK)" file_upto="$(last_seq LDFILE)"
t0=$(date +%s%N)
frozen="$("$AGENT" "$WORK/qga.sock" guest-fsfreeze-freeze)" || die "guest-fsfreeze-freeze failed"
t1=$(date +%s%N)
status_frozen="$("$AGENT" "$WORK/qga.sock" guest-fsfreeze-status)"
snapshot_both frozen
t2=$(date +%s%N)
thawed="$("$AGENT" "$WORK/qga.sock" guest-fsfreeze-thaw)" || die "guest-fsfreeze-thaw failed"
t3=$(date +%s%N)
status_thawed="$("$AGENT" "$WORK/qga.sock" guest-fsfreeze-status)"
ms() { echo $((($2 - $1) / 1000000)); }
if [ "$frozen" = 1 ] && [ "$status_frozen" = '"frozen"' ] && [ "$thawed" = 1 ] && [ "$status_thawed" = '"thawed"' ]; then
  pass "guest agent: froze 1 filesystem (the ext4 disk) in $(ms "$t0" "$t1") ms, cut both volumes in one transaction $(ms "$t1" "$t2") ms later, thawed in $(ms "$t2" "$t3") ms: frozen $(ms "$t0" "$t3") ms as the host saw it"
else
  fail "guest agent: freeze returned $frozen (status $status_frozen), thaw returned $thawed (status $status_thawed)"
fi
sleep 3
# The writers go on after the thaw.
after="$(last_seq LDFILE)"
sleep 3
if [ "$(last_seq LDFILE)" -gt "$after" ]; then pass "the ext4 writer goes on after the thaw ($after -> $(last_seq LDFILE))"
else fail "the ext4 writer is stuck after the thaw at $(last_seq LDFILE)"; fi

# --- 3. shutdown through the agent: the guest verifies itself ---------------------------------------
"$AGENT" "$WORK/qga.sock" guest-shutdown || fail "guest-shutdown returned an error"
rc=0; wait "$VM_PID" || rc=$?; VM_PID=""
result="$(grep '^LIVEDISK-RESULT' "$WORK/vm.console" | tail -n 1)"
if [ "$rc" -eq 0 ] && [[ "$result" == *"status=ok"* ]]; then
  pass "guest-shutdown: the writers stopped, the guest verified both disks and powered off: ${result#LIVEDISK-RESULT }"
else
  fail "the live VM: exit $rc, ${result:-no result}"; tail -n 20 "$WORK/vm.console" "$WORK/vm.err" >&2
fi
cleanup_daemon() {
  for l in "${LOOPS[@]}"; do losetup -d "$l" 2>/dev/null || true; done; LOOPS=()
  for f in "${FUSES[@]}"; do fusermount3 -u "$f" 2>/dev/null || true; done; FUSES=()
  kill -TERM "$QSD_PID" 2>/dev/null || true
  for _ in $(seq 1 100); do kill -0 "$QSD_PID" 2>/dev/null || break; sleep 0.1; done
  QSD_PID=""
}
cleanup_daemon

# --- the copies, checked offline (qemu-img reads the layer files; nothing of livedisk) ------------
# A snapshot's content is its layer with what is under it: crash-b is vol-b + nothing above it...
# each cut is the file that became read-only at it (the base, then crash-X), converted whole.
copy() { qemu-img convert -f qcow2 -O raw "$WORK/$1.qcow2" "$WORK/$2.raw"; }
copy vol-b crash-b;  copy crash-b frozen-b;  copy crash-a frozen-a;  copy frozen-b final-b;  copy frozen-a final-a
needs_recovery() { dumpe2fs -h "$1" 2>/dev/null | grep -q '^Filesystem features:.*needs_recovery'; }
if needs_recovery "$WORK/crash-b.raw"; then
  pass "the cut without a freeze needs journal recovery (needs_recovery set): the check below can fail"
else
  fail "the cut without a freeze has a clean journal: the check cannot tell a frozen cut from a crash cut"
fi
if ! needs_recovery "$WORK/frozen-b.raw" && e2fsck -fn "$WORK/frozen-b.raw" >"$WORK/fsck.log" 2>&1; then
  pass "the cut inside the freeze: ext4 clean without a journal replay (e2fsck -fn passes, no needs_recovery)"
else
  fail "the cut inside the freeze is not a clean ext4: $(tail -n 5 "$WORK/fsck.log" | tr '\n' ' ')"
fi
# The frozen copy's file against its own log (both on the copy): the application's view.
mkdir -p "$WORK/mnt"
if mount -o ro,noload,loop "$WORK/frozen-b.raw" "$WORK/mnt"; then
  MOUNTS+=("$WORK/mnt")
  n="$(grep -c . "$WORK/mnt/acks.jsonl")"
  if [ "$n" -ge "$file_upto" ] && "$VERIFIER" verify --path "$WORK/mnt/blocks" --tag 21 --log "$WORK/mnt/acks.jsonl" >"$WORK/file-verify.log" 2>&1; then
    pass "the frozen copy's ext4 file holds all $n writes its log records (the log had at least $file_upto before the freeze)"
  else
    fail "the frozen copy's ext4 file against its log ($n acks, >= $file_upto expected): $(tail -n 2 "$WORK/file-verify.log" | tr '\n' ' ')"
  fi
  umount "$WORK/mnt"; MOUNTS=()
else
  fail "the frozen copy's ext4 does not mount read-only without a journal replay"
fi
# The block disk (not frozen: a raw device) holds every write acknowledged before the cut.
awk -v upto="$block_upto" 'match($0, /"seq":[0-9]+/) && substr($0, RSTART + 6, RLENGTH - 6) + 0 <= upto + 0' \
  "$WORK/acks.jsonl" >"$WORK/acks-upto.jsonl"
if "$VERIFIER" verify --path "$WORK/frozen-a.raw" --tag 21 --log "$WORK/acks-upto.jsonl" >"$WORK/a-verify.log" 2>&1; then
  pass "the block disk's cut holds every write acknowledged before the freeze (up to seq $block_upto)"
else
  fail "the block disk's cut lacks writes acknowledged before it: $(tail -n 2 "$WORK/a-verify.log" | tr '\n' ' ')"
fi
if "$VERIFIER" verify --path "$WORK/final-a.raw" --tag 21 --log "$WORK/acks.jsonl" >"$WORK/final-verify.log" 2>&1; then
  pass "offline: the final layers hold every one of the guest's $(grep -c . "$WORK/acks.jsonl") acknowledged block writes (qemu-img read, not the guest)"
else
  fail "offline: the final block disk lacks acknowledged writes: $(tail -n 2 "$WORK/final-verify.log" | tr '\n' ' ')"
fi
if e2fsck -fn "$WORK/final-b.raw" >"$WORK/fsck-final.log" 2>&1; then
  pass "offline: the final ext4 disk is clean after the guest's unmount"
else
  fail "offline: the final ext4 disk: $(tail -n 5 "$WORK/fsck-final.log" | tr '\n' ' ')"
fi

echo
echo "vm-live-smoke: $PASS passed, $FAIL failed"
[ "$FAIL" -eq 0 ]
