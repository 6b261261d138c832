//! The mount table and the mounts the Node service makes. mountinfo is read through `procfs`;
//! mounts and unmounts are mount(2)/umount2(2) through `rustix`, not the mount(8) program; each
//! runs off the async runtime. mkfs and blkid stay external programs.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::path::{Path, PathBuf};

use procfs::process::{MountInfo, MountInfos, Process};
use rustix::fs::{FileType, StatVfsMountFlags};
use rustix::mount::{MountFlags, UnmountFlags};

use super::attach::run;
use super::blocking::{io, off_runtime};
use super::mount_decision::{DevId, MountOptions, Mounted, mountinfo_escape};
use crate::grpc::error::CsiError;

/// The topmost mount at `path` in this process's mount namespace, or `None`.
pub async fn mounted_at(path: &Path) -> Result<Option<Mounted>, CsiError> {
    let path = path.to_path_buf();
    off_runtime("reading the mount table", move || {
        // mountinfo shows resolved paths: resolve ours the same way when it exists.
        let resolved = std::fs::canonicalize(&path).unwrap_or(path);
        let table = mount_table()?;
        let Some(info) = topmost(&table, &resolved) else {
            return Ok(None);
        };
        Ok(Some(mounted(info, block_device_at(&resolved))))
    })
    .await
}

fn mount_table() -> Result<MountInfos, CsiError> {
    Process::myself()
        .and_then(|me| me.mountinfo())
        .map_err(io("reading /proc/self/mountinfo"))
}

/// The mount a path shows when several are stacked on it: the one no other mount there sits on.
fn topmost<'a>(table: &'a MountInfos, path: &Path) -> Option<&'a MountInfo> {
    let escaped = mountinfo_escape(&path.to_string_lossy());
    let here: Vec<&MountInfo> = table
        .iter()
        .filter(|m| m.mount_point.as_os_str() == escaped.as_str())
        .collect();
    here.iter()
        .find(|m| !here.iter().any(|other| other.pid == m.mnt_id))
        .copied()
}

/// A mountinfo entry as the decision table reads it.
fn mounted(info: &MountInfo, block_device: Option<DevId>) -> Mounted {
    Mounted {
        filesystem: DevId::parse(&info.majmin).unwrap_or(DevId { major: 0, minor: 0 }),
        root: info.root.clone(),
        fs_type: info.fs_type.clone(),
        source: info.mount_source.clone(),
        options: info.mount_options.keys().cloned().collect::<BTreeSet<_>>(),
        block_device,
    }
}

/// The device number of a block device node at `path` (what a bind of a device shows there).
fn block_device_at(path: &Path) -> Option<DevId> {
    let stat = rustix::fs::stat(path).ok()?;
    (FileType::from_raw_mode(stat.st_mode) == FileType::BlockDevice).then(|| dev_id(stat.st_rdev))
}

fn dev_id(dev: rustix::fs::Dev) -> DevId {
    DevId {
        major: rustix::fs::major(dev),
        minor: rustix::fs::minor(dev),
    }
}

/// The device number of a block device (the loop device of an attached volume).
pub async fn device_number(device: &Path) -> Result<DevId, CsiError> {
    let device = device.to_path_buf();
    off_runtime("inspecting the volume's device", move || {
        block_device_at(&device).ok_or_else(|| {
            CsiError::Internal(format!("{} is not a block device", device.display()))
        })
    })
    .await
}

/// Creates a directory (and its parents) to mount onto.
pub async fn create_dir(path: &Path) -> Result<(), CsiError> {
    let path = path.to_path_buf();
    off_runtime("creating a mount point", move || {
        std::fs::create_dir_all(&path).map_err(io(format!("creating {}", path.display())))
    })
    .await
}

/// Creates an empty file (and its parent directories) to bind a block device onto.
pub async fn create_file(path: &Path) -> Result<(), CsiError> {
    let path = path.to_path_buf();
    off_runtime("creating a mount point", move || {
        // Whatever is there already (kubelet may have made it) is used as it is.
        if path.symlink_metadata().is_ok() {
            return Ok(());
        }
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(io(format!("creating {}", parent.display())))?;
        }
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map(drop)
            .map_err(io(format!("creating {}", path.display())))
    })
    .await
}

/// Removes an unpublished target (a directory or the file a block device was bound onto);
/// something left there is harmless, so failures are only logged.
pub async fn remove_target(path: &Path) {
    let path = path.to_path_buf();
    let removed = off_runtime("removing a target path", move || {
        let result = if path.is_dir() {
            std::fs::remove_dir(&path)
        } else {
            std::fs::remove_file(&path)
        };
        match result {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                tracing::debug!(path = %path.display(), %error, "target path left in place");
            }
            _ => {}
        }
        Ok(())
    })
    .await;
    if let Err(error) = removed {
        tracing::debug!(%error, "target path left in place");
    }
}

/// Bind-mounts `source` (the staging directory or the block device) onto `target`, read-only
/// when asked. A read-only bind needs a second, remount call; if that fails the bind is undone
/// so that no writable mount is left where a read-only one was asked for.
pub async fn bind(source: &Path, target: &Path, read_only: bool) -> Result<(), CsiError> {
    let (source, target) = (source.to_path_buf(), target.to_path_buf());
    off_runtime("bind-mounting", move || {
        rustix::mount::mount_bind(&source, &target).map_err(io(format!(
            "bind-mounting {} on {}",
            source.display(),
            target.display()
        )))?;
        if read_only && let Err(error) = remount_read_only(&target) {
            if let Err(undo) = rustix::mount::unmount(&target, UnmountFlags::empty()) {
                tracing::warn!(target = %target.display(), %undo, "could not undo a bind mount");
            }
            return Err(error);
        }
        Ok(())
    })
    .await
}

fn remount_read_only(target: &Path) -> Result<(), CsiError> {
    let current = rustix::fs::statvfs(target)
        .map_err(io(format!("statvfs {}", target.display())))?
        .f_flag;
    // A bind remount sets the mount's flags as given: keep the ones it inherited.
    let flags = MountFlags::BIND | MountFlags::RDONLY | kept_flags(current);
    rustix::mount::mount_remount(target, flags, "")
        .map_err(io(format!("remounting {} read-only", target.display())))
}

/// The per-mount flags a mount has (as statvfs reports them) in mount(2)'s terms.
fn kept_flags(current: StatVfsMountFlags) -> MountFlags {
    [
        (StatVfsMountFlags::NOSUID, MountFlags::NOSUID),
        (StatVfsMountFlags::NODEV, MountFlags::NODEV),
        (StatVfsMountFlags::NOEXEC, MountFlags::NOEXEC),
        (StatVfsMountFlags::NOATIME, MountFlags::NOATIME),
        (StatVfsMountFlags::NODIRATIME, MountFlags::NODIRATIME),
        (StatVfsMountFlags::RELATIME, MountFlags::RELATIME),
    ]
    .into_iter()
    .filter(|(has, _)| current.contains(*has))
    .fold(MountFlags::empty(), |flags, (_, flag)| flags | flag)
}

/// Unmounts the topmost mount at `target`, if there is one. Idempotent.
pub async fn unmount(target: &Path) -> Result<(), CsiError> {
    if mounted_at(target).await?.is_none() {
        return Ok(());
    }
    let target = target.to_path_buf();
    off_runtime("unmounting", move || {
        rustix::mount::unmount(&target, UnmountFlags::empty())
            .map_err(io(format!("unmounting {}", target.display())))
    })
    .await
}

/// The filesystem type on a device, or `None` when it holds none.
pub async fn filesystem(device: &Path) -> Result<Option<String>, CsiError> {
    let output = tokio::process::Command::new("blkid")
        .args(["-p", "-s", "TYPE", "-o", "value"])
        .arg(device)
        .output()
        .await
        .map_err(|e| CsiError::Internal(format!("running blkid: {e}")))?;
    let kind = String::from_utf8_lossy(&output.stdout).trim().to_string();
    // blkid exits 2 when it finds nothing: an empty device.
    Ok((!kind.is_empty()).then_some(kind))
}

/// The options the node formats a device of `fs_type` with (the device follows them).
///
/// An ext filesystem always gets 4 KiB blocks. mke2fs would give a device under 512 MiB 1 KiB
/// blocks (its `small` type), and such a filesystem loses data it reported durable when its
/// volume's pool fills: measured on this data path (loop over nbdfuse over the daemon's export),
/// the last few MiB whose `fsync` had succeeded read back as zeros after a remount, while with
/// 4 KiB blocks, and with xfs, every fsynced byte read back (docs/operations.md, "Full pool";
/// `csi-driver/tests/full_pool_filesystems.rs`).
pub fn mkfs_options(fs_type: &str) -> &'static [&'static str] {
    if fs_type.starts_with("ext") {
        &["-q", "-F", "-b", "4096"]
    } else {
        &["-q"]
    }
}

/// Formats an empty device (never one that holds a filesystem) and mounts it at `target`. An ext
/// filesystem smaller than its (grown) device is grown first (see [`super::grow`]).
pub async fn format_and_mount(
    device: &Path,
    fs_type: &str,
    target: &Path,
    options: &MountOptions,
) -> Result<(), CsiError> {
    match filesystem(device).await? {
        Some(existing) if existing != fs_type => {
            return Err(CsiError::FailedPrecondition(format!(
                "{} holds a {existing} filesystem, not the requested {fs_type}",
                device.display()
            )));
        }
        Some(existing) if existing.starts_with("ext") => {
            super::grow::grow_unmounted_ext(device).await?;
        }
        Some(_) => {}
        None => {
            let mkfs = format!("mkfs.{fs_type}");
            let mut args = mkfs_options(fs_type).to_vec();
            let device = device.to_string_lossy();
            args.push(&device);
            run(&mkfs, &args).await?;
        }
    }
    create_dir(target).await?;
    let data = options
        .data()
        .map(CString::new)
        .transpose()
        .map_err(|_| CsiError::InvalidArgument("mount_flags contain a NUL byte".into()))?;
    let (device, fs_type, target, flags) = (
        device.to_path_buf(),
        fs_type.to_string(),
        target.to_path_buf(),
        options.flags,
    );
    off_runtime("mounting", move || {
        rustix::mount::mount(&device, &target, fs_type.as_str(), flags, data.as_deref()).map_err(
            io(format!(
                "mounting {} ({fs_type}) on {}",
                device.display(),
                target.display()
            )),
        )
    })
    .await
}

/// The fields of statvfs(3) the node reads (volume stats, pool space), under their C names.
#[derive(Clone, Copy, Debug)]
pub struct StatVfs {
    pub f_frsize: u64,
    pub f_blocks: u64,
    pub f_bfree: u64,
    pub f_bavail: u64,
    pub f_files: u64,
    pub f_ffree: u64,
    pub f_favail: u64,
}

/// The statvfs of a path. Blocking: async callers use [`statvfs_off_runtime`].
pub fn statvfs(path: &Path) -> Result<StatVfs, CsiError> {
    let stat = rustix::fs::statvfs(path).map_err(io(format!("statvfs {}", path.display())))?;
    Ok(StatVfs {
        f_frsize: stat.f_frsize,
        f_blocks: stat.f_blocks,
        f_bfree: stat.f_bfree,
        f_bavail: stat.f_bavail,
        f_files: stat.f_files,
        f_ffree: stat.f_ffree,
        f_favail: stat.f_favail,
    })
}

/// [`statvfs`] off the async runtime.
pub async fn statvfs_off_runtime(path: &Path) -> Result<StatVfs, CsiError> {
    let path: PathBuf = path.to_path_buf();
    off_runtime("statvfs", move || statvfs(&path)).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use procfs::FromBufRead;

    const TABLE: &str = "\
22 1 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:5 - proc proc rw
36 22 7:3 / /mnt/with\\040space rw,noatime shared:1 - ext4 /dev/loop3 rw
40 22 7:3 / /staging rw,relatime - ext4 /dev/loop3 rw
41 22 0:61 / /publish rw,relatime - tmpfs foreign rw,size=1024k
42 41 7:3 / /publish ro,relatime - ext4 /dev/loop3 rw
43 22 0:5 /loop3 /dev-target ro,nosuid - devtmpfs udev rw,size=100k
";

    fn table() -> MountInfos {
        MountInfos::from_buf_read(TABLE.as_bytes()).expect("parse")
    }

    #[test]
    fn escaped_mount_points_are_found() {
        let table = table();
        let found = topmost(&table, Path::new("/mnt/with space")).expect("found");
        assert_eq!(found.mnt_id, 36);
        assert!(topmost(&table, Path::new("/mnt")).is_none());
    }

    #[test]
    fn the_topmost_of_stacked_mounts_is_what_the_path_shows() {
        let table = table();
        let top = topmost(&table, Path::new("/publish")).expect("found");
        assert_eq!(top.mnt_id, 42);
        let seen = mounted(top, None);
        assert_eq!(seen.filesystem, DevId { major: 7, minor: 3 });
        assert_eq!(seen.root, "/");
        assert_eq!(seen.fs_type, "ext4");
        assert!(seen.read_only());
    }

    #[test]
    fn a_bound_device_node_keeps_its_device_number() {
        let table = table();
        let entry = topmost(&table, Path::new("/dev-target")).expect("found");
        let seen = mounted(entry, Some(DevId { major: 7, minor: 3 }));
        assert_eq!(seen.root, "/loop3");
        assert_eq!(seen.block_device, Some(DevId { major: 7, minor: 3 }));
        assert!(seen.options.contains("nosuid"));
    }

    #[test]
    fn a_read_only_remount_keeps_the_inherited_flags() {
        let current =
            StatVfsMountFlags::NOSUID | StatVfsMountFlags::NODEV | StatVfsMountFlags::RDONLY;
        assert_eq!(kept_flags(current), MountFlags::NOSUID | MountFlags::NODEV);
        assert_eq!(kept_flags(StatVfsMountFlags::empty()), MountFlags::empty());
    }

    #[test]
    fn ext_filesystems_get_4k_blocks_whatever_their_size() {
        for ext in ["ext2", "ext3", "ext4"] {
            let options = mkfs_options(ext);
            assert!(
                options.windows(2).any(|w| w == ["-b", "4096"]),
                "{ext}: {options:?}"
            );
            assert!(
                options.contains(&"-F"),
                "{ext}: a device, not a file, and no prompt"
            );
        }
        assert_eq!(mkfs_options("xfs"), ["-q"]);
    }
}
