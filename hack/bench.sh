#!/usr/bin/env bash
# The node engine's benchmarks: a table of ratios against the targets of
# DESIGN.md §5 (medians of several runs). Benchmarks report; they never
# fail the build on a missed target, only on a broken run.
#
# Environment (all optional):
#   LIVEDISK_BENCH_SCALE       data sizes x this (default 1: 256 MiB snapshot
#                              data, 512 MiB merge, 1 GiB attach I/O)
#   LIVEDISK_BENCH_RUNS        runs of snapshot/query benches (default 5)
#   LIVEDISK_BENCH_HEAVY_RUNS  runs of merge/attach benches (default 4: the merge
#                              alternates which side goes first)
#   LIVEDISK_BENCH_EXTENTS     changed extents on the 1 TiB disk (default 100000)
#   LIVEDISK_BENCH_ONLY        run only these benchmarks, e.g. "b,d" (default: all)
#   LIVEDISK_BENCH_DIR         where the temporary pool goes (default /var/tmp;
#                              use a real disk, not tmpfs)
set -euo pipefail
cd "$(dirname "$0")/.."

for tool in qemu-storage-daemon qemu-img qemu-io nbdfuse losetup fusermount3; do
  command -v "$tool" >/dev/null || {
    echo "bench: $tool missing: apt-get install qemu-system-common qemu-utils libnbd-bin fuse3 util-linux" >&2
    exit 1
  }
done

echo "bench: building (release)" >&2
cargo build -q --release -p livedisk-csi --bin livedisk-bench
exec target/release/livedisk-bench "$@"
