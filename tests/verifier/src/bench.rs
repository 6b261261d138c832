//! The guest's disk benchmark: what a VM's own I/O gets from its disk, measured inside the
//! guest (`livedisk-verifier bench`, run by the test VM's `livedisk.mode=bench`). Direct I/O
//! (`O_DIRECT`), so the guest's page cache is out of the path and every request reaches the
//! virtual disk. Writes go to the disk's first `mib` MiB: sequential 1 MiB writes, then 4 KiB
//! random writes (each `O_DSYNC`: acknowledged once the host has it) at depth 1. Reads come from
//! the next `mib` MiB, which this run did not write: a host that caches what the guest just
//! wrote (a loop device's page cache) would otherwise answer reads from memory. Sequential 1 MiB
//! reads, then 4 KiB random reads at depth 1. Random passes visit blocks on a co-prime stride
//! (scattered, each at most once per pass).

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::time::Instant;

use serde::Serialize;

const MIB: usize = 1 << 20;
const SMALL: usize = 4096;
/// Co-prime with any power-of-two block count: the random passes visit scattered blocks.
const STRIDE: u64 = 7919;

/// What one run measured.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BenchReport {
    pub mib: u64,
    pub ops: u64,
    pub seq_write_mibs: f64,
    pub seq_read_mibs: f64,
    pub rand_write_iops: f64,
    pub rand_read_iops: f64,
    /// Median latency of one 4 KiB synchronous write, microseconds.
    pub rand_write_p50_us: f64,
    pub rand_read_p50_us: f64,
}

/// A buffer aligned for `O_DIRECT` (page-aligned, any length multiple of 4 KiB).
struct Aligned {
    ptr: *mut u8,
    layout: Layout,
}

impl Aligned {
    fn new(len: usize) -> io::Result<Self> {
        let layout = Layout::from_size_align(len, SMALL)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // SAFETY: the layout has a non-zero size (callers pass 4 KiB or more).
        let ptr = unsafe { alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(io::Error::new(io::ErrorKind::OutOfMemory, "buffer"));
        }
        Ok(Self { ptr, layout })
    }

    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr is a live allocation of layout.size() bytes owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this very layout.
        unsafe { dealloc(self.ptr, self.layout) }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs the four measurements on `path` (a disk of at least 2 × `mib` MiB; its first `mib` MiB
/// are overwritten, the next `mib` MiB read).
pub fn bench(path: &Path, mib: u64, ops: u64) -> io::Result<BenchReport> {
    let direct = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)?;
    let mut big = Aligned::new(MIB)?;
    for (i, b) in big.as_mut().iter_mut().enumerate() {
        // Not zeros: a zero write may be stored as a hole and cost nothing.
        *b = (i % 251) as u8 | 1;
    }
    let t = Instant::now();
    for i in 0..mib {
        direct.write_all_at(big.as_mut(), i * MIB as u64)?;
    }
    direct.sync_data()?;
    let seq_write_mibs = mib as f64 / t.elapsed().as_secs_f64();
    let reads_from = mib * MIB as u64;
    let t = Instant::now();
    for i in 0..mib {
        direct.read_exact_at(big.as_mut(), reads_from + i * MIB as u64)?;
    }
    let seq_read_mibs = mib as f64 / t.elapsed().as_secs_f64();

    let blocks = mib * (MIB / SMALL) as u64;
    let at = |i: u64| (i * STRIDE % blocks) * SMALL as u64;
    let synced = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT | libc::O_DSYNC)
        .open(path)?;
    let mut small = Aligned::new(SMALL)?;
    small.as_mut().fill(0x5a);
    let mut lat = Vec::with_capacity(ops as usize);
    let t = Instant::now();
    for i in 0..ops {
        let one = Instant::now();
        synced.write_all_at(small.as_mut(), at(i))?;
        lat.push(one.elapsed().as_secs_f64() * 1e6);
    }
    let rand_write_iops = ops as f64 / t.elapsed().as_secs_f64();
    let rand_write_p50_us = median(lat);
    let mut lat = Vec::with_capacity(ops as usize);
    let t = Instant::now();
    for i in 0..ops {
        let one = Instant::now();
        direct.read_exact_at(small.as_mut(), reads_from + at(i))?;
        lat.push(one.elapsed().as_secs_f64() * 1e6);
    }
    let rand_read_iops = ops as f64 / t.elapsed().as_secs_f64();
    Ok(BenchReport {
        mib,
        ops,
        seq_write_mibs,
        seq_read_mibs,
        rand_write_iops,
        rand_read_iops,
        rand_write_p50_us,
        rand_read_p50_us: median(lat),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_on_a_file_reports_every_measure() {
        // O_DIRECT needs a filesystem that supports it: /var/tmp (a disk), not a tmpfs /tmp.
        let path = std::path::Path::new("/var/tmp")
            .join(format!("livedisk-bench-{}.img", std::process::id()));
        std::fs::File::create(&path)
            .and_then(|f| f.set_len(4 * MIB as u64))
            .expect("file");
        let r = bench(&path, 2, 64);
        let _ = std::fs::remove_file(&path);
        let r = r.expect("bench on /var/tmp");
        assert_eq!((r.mib, r.ops), (2, 64));
        for v in [
            r.seq_write_mibs,
            r.seq_read_mibs,
            r.rand_write_iops,
            r.rand_read_iops,
            r.rand_write_p50_us,
            r.rand_read_p50_us,
        ] {
            assert!(v.is_finite() && v > 0.0, "{r:?}");
        }
    }

    #[test]
    fn the_random_passes_visit_distinct_blocks() {
        let blocks = 2 * (MIB / SMALL) as u64;
        let seen: std::collections::HashSet<u64> =
            (0..blocks).map(|i| i * STRIDE % blocks).collect();
        assert_eq!(seen.len() as u64, blocks);
    }
}
