//! Growing an ext2/3/4 filesystem whose device has grown, before it is mounted.
//!
//! Why before: growing a mounted ext4 (what `resize2fs` does on a mounted device, through the
//! EXT4_IOC_RESIZE_FS ioctl) needs CAP_SYS_RESOURCE, which a node plugin does not always have (on
//! the machines this project is tested on no process has it). Offline growth needs only write
//! access to the device. With offline expansion (the only kind this driver offers) kubelet stages
//! the volume and then calls NodeExpandVolume; growing at stage time leaves that call nothing to
//! do. xfs grows only while mounted (`xfs_growfs`), so it is left to NodeExpandVolume.

use std::io::{Seek, SeekFrom};
use std::path::Path;

use super::attach::run;
use super::blocking::{io, off_runtime};
use crate::grpc::error::CsiError;

/// Size of the filesystem in bytes, from `dumpe2fs -h` output.
pub fn ext_filesystem_bytes(dumpe2fs_header: &str) -> Option<u64> {
    let field = |name: &str| {
        dumpe2fs_header
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    field("Block count:")?.checked_mul(field("Block size:")?)
}

/// Whether the device has room for at least one more block group's worth of growth; smaller
/// differences (a device size that is not a multiple of the block size) are left alone.
pub fn needs_growth(filesystem_bytes: u64, device_bytes: u64) -> bool {
    const MIN_GROWTH: u64 = 1 << 20;
    device_bytes >= filesystem_bytes.saturating_add(MIN_GROWTH)
}

/// Grows the unmounted ext filesystem on `device` to the device's size, if it has grown:
/// `e2fsck -f -p` (resize2fs refuses a filesystem not checked since its last mount), then
/// `resize2fs`. Returns whether it grew.
pub async fn grow_unmounted_ext(device: &Path) -> Result<bool, CsiError> {
    let header = run("dumpe2fs", &["-h", &device.to_string_lossy()]).await?;
    let filesystem = ext_filesystem_bytes(&header).ok_or_else(|| {
        CsiError::Internal(format!(
            "dumpe2fs -h {} printed no block count and size",
            device.display()
        ))
    })?;
    let path = device.to_path_buf();
    let device_bytes = off_runtime("reading the device size", move || {
        std::fs::File::open(&path)
            .and_then(|mut f| f.seek(SeekFrom::End(0)))
            .map_err(io(format!("reading the size of {}", path.display())))
    })
    .await?;
    if !needs_growth(filesystem, device_bytes) {
        return Ok(false);
    }
    tracing::info!(device = %device.display(), filesystem, device_bytes, "growing the filesystem before mounting it");
    // -p repairs what is safe; exit 1 means it did, 2 and up that it could not: then say so.
    let check = tokio::process::Command::new("e2fsck")
        .args(["-f", "-p"])
        .arg(device)
        .output()
        .await
        .map_err(|e| CsiError::Internal(format!("running e2fsck: {e}")))?;
    if !matches!(check.status.code(), Some(0 | 1)) {
        return Err(CsiError::Internal(format!(
            "e2fsck -f -p {} before growing it failed ({}): {}",
            device.display(),
            check.status,
            String::from_utf8_lossy(&check.stdout).trim()
        )));
    }
    run("resize2fs", &[&device.to_string_lossy()]).await?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_size_from_a_dumpe2fs_header() {
        let header = "Filesystem volume name:   <none>\nBlock count:              65536\n\
                      Reserved block count:     3276\nBlock size:               4096\n";
        assert_eq!(ext_filesystem_bytes(header), Some(256 << 20));
        assert_eq!(ext_filesystem_bytes("Block size: 4096\n"), None);
        assert_eq!(
            ext_filesystem_bytes("Block count: x\nBlock size: 4096\n"),
            None
        );
    }

    #[test]
    fn grows_only_for_a_real_difference() {
        assert!(!needs_growth(256 << 20, 256 << 20));
        assert!(!needs_growth(256 << 20, (256 << 20) + 4096));
        assert!(needs_growth(256 << 20, 512 << 20));
        assert!(!needs_growth(512 << 20, 256 << 20));
    }
}
