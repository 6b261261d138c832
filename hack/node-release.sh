#!/usr/bin/env bash
# Runs inside a node's mount namespace (hack/driver.sh stop): unmounts every mount under the
# state directory (publish targets, staging filesystems, nbdfuse) and frees the loop devices
# whose backing files live there, so that no mount, loop device or nbdfuse process is left.
set -u
state="$1"
awk -v r="$state" 'index($5, r) == 1 {print $5}' /proc/self/mountinfo | sort -r | while read -r m; do
  umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
done
losetup --list --noheadings -O NAME,BACK-FILE 2>/dev/null | while read -r dev file; do
  case "$file" in "$state"/*) losetup --detach "$dev" 2>/dev/null || true ;; esac
done
