#!/usr/bin/env bash
# Runs inside a node's mount namespace (hack/driver.sh stop): unmounts what the node plugin
# mounted for consumers (publish targets and staging filesystems under PREFIX..., the front-end
# server's nbdfuse mounts under the engine's attach directory) and frees the loop devices backed
# there, so that no mount, loop device or nbdfuse process is left (nbdfuse exits once its mount
# is gone; a FUSE mount a loop device still holds is detached lazily and goes with the loop
# device). The engine's own runtime directory stays mounted.
#   node-release.sh PREFIX...
set -u
for prefix in "$@"; do
  awk -v r="$prefix" 'index($5, r) == 1 {print $5}' /proc/self/mountinfo | sort -r | while read -r m; do
    umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
  done
  losetup --list --noheadings -O NAME,BACK-FILE 2>/dev/null | while read -r dev file; do
    case "$file" in "$prefix"/*) losetup --detach "$dev" 2>/dev/null || true ;; esac
  done
done
