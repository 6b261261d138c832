//! The consumer's block device: the engine's writable NBD export of the volume, turned into a
//! file by its FUSE front end (nbdfuse) and into a kernel block device by a loop device.
//!
//! Why this path: there is no `nbd` kernel module on these hosts, and QEMU 7.2's own FUSE export
//! takes the resize permission, which blocks an active commit (see docs/architecture.md). The loop
//! device runs without direct I/O: with direct I/O over FUSE a filesystem broke right after mkfs.
//! nbdfuse runs in the engine pod, started by its front-end server (`crate::frontends`), so
//! restarting the node plugin does not cut I/O; the loop device and the mounts made here are
//! kernel objects, which outlive this process too.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::process::Command;

use super::blocking::io;
use crate::frontends::FrontEndsClient;
use crate::frontends::layout::FrontEndPaths;
use crate::grpc::error::CsiError;
use livedisk_engine::{Engine, ErrorCode, ExportInfo, VolumeId};

/// Attachment state lives under `<runtime dir>/attach/<volume>/`, beside the front end's files.
pub struct Attacher {
    engine_dir: PathBuf,
    frontends: FrontEndsClient,
}

impl Attacher {
    pub fn new(runtime_dir: &Path) -> Self {
        Self {
            engine_dir: runtime_dir.to_path_buf(),
            frontends: FrontEndsClient::new(runtime_dir),
        }
    }

    fn paths(&self, volume: &VolumeId) -> FrontEndPaths {
        FrontEndPaths::new(&self.engine_dir, volume)
    }

    fn dir(&self, volume: &VolumeId) -> PathBuf {
        self.paths(volume).dir
    }

    fn backing_file(&self, volume: &VolumeId) -> PathBuf {
        self.paths(volume).file
    }

    /// The loop device of an attached volume, if it is attached and healthy.
    ///
    /// The loop device is matched by the identity (device number and inode) of its backing file,
    /// not by the backing file's path: the kernel names the path as seen from the mount namespace
    /// that set the loop device up, so a restarted node plugin container reads a path that is not
    /// its own (`/disk`, the FUSE mount's root) for a device it did attach.
    /// Whether a front end was attached for `volume` here (its device is recorded), whether or
    /// not its device still backs it.
    pub async fn recorded(&self, volume: &VolumeId) -> bool {
        tokio::fs::try_exists(self.dir(volume).join("device"))
            .await
            .unwrap_or(false)
    }

    pub async fn device(&self, volume: &VolumeId) -> Option<PathBuf> {
        let recorded = tokio::fs::read_to_string(self.dir(volume).join("device"))
            .await
            .ok()?;
        let device = PathBuf::from(recorded.trim());
        let listed = run(
            "losetup",
            &[
                "--noheadings",
                "-O",
                "BACK-MAJ:MIN,BACK-INO",
                "--list",
                &device.to_string_lossy(),
            ],
        )
        .await
        .ok()?;
        let backing = file_identity(&self.backing_file(volume)).await?;
        (parse_backing_identity(&listed) == Some(backing)).then_some(device)
    }

    /// Attaches the volume and returns its block device. Idempotent: the engine's export and the
    /// front end are started or found as they are.
    pub async fn attach(
        &self,
        engine: &Engine,
        volume: &VolumeId,
        shared: bool,
    ) -> Result<PathBuf, CsiError> {
        if let Some(device) = self.device(volume).await {
            return share(device, shared).await;
        }
        let export = engine.attach_volume(volume).await?;
        self.attach_over(volume, &export, shared).await
    }

    /// The front end and loop device over an engine export of the volume (the engine's own, or
    /// its NBD client of another node's: see `remote_attach`). A `shared` volume (written from
    /// several nodes) gets a loop device with direct I/O on its backing file: the FUSE file's
    /// page cache would otherwise serve this node a block another node rewrote since (seen here
    /// with a direct-I/O reader of the loop device).
    pub async fn attach_over(
        &self,
        volume: &VolumeId,
        export: &ExportInfo,
        shared: bool,
    ) -> Result<PathBuf, CsiError> {
        if let Some(device) = self.device(volume).await {
            return share(device, shared).await;
        }
        let backing = self.frontends.start(volume, &export.uri()).await?;
        let direct = if shared {
            "--direct-io=on"
        } else {
            "--direct-io=off"
        };
        let device = run(
            "losetup",
            &["--find", "--show", direct, &backing.to_string_lossy()],
        )
        .await?;
        let device = PathBuf::from(device.trim());
        tokio::fs::write(
            self.dir(volume).join("device"),
            device.to_string_lossy().as_bytes(),
        )
        .await
        .map_err(io("recording the loop device"))?;
        tracing::info!(volume = %volume, device = %device.display(), "volume attached");
        Ok(device)
    }

    fn targets_file(&self, volume: &VolumeId) -> PathBuf {
        self.dir(volume).join("targets")
    }

    /// The paths the volume is published at (as recorded by [`Attacher::add_target`]).
    pub async fn targets(&self, volume: &VolumeId) -> Vec<PathBuf> {
        tokio::fs::read_to_string(self.targets_file(volume))
            .await
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.is_empty())
            .map(PathBuf::from)
            .collect()
    }

    async fn write_targets(&self, volume: &VolumeId, targets: &[PathBuf]) -> Result<(), CsiError> {
        let text: String = targets
            .iter()
            .map(|t| format!("{}\n", t.display()))
            .collect();
        let file = self.targets_file(volume);
        let temporary = file.with_extension("tmp");
        tokio::fs::write(&temporary, text)
            .await
            .map_err(io("recording publish targets"))?;
        tokio::fs::rename(&temporary, &file)
            .await
            .map_err(io("recording publish targets"))
    }

    pub async fn add_target(&self, volume: &VolumeId, target: &Path) -> Result<(), CsiError> {
        let mut targets = self.targets(volume).await;
        if !targets.iter().any(|t| t == target) {
            targets.push(target.to_path_buf());
        }
        self.write_targets(volume, &targets).await
    }

    pub async fn remove_target(&self, volume: &VolumeId, target: &Path) -> Result<(), CsiError> {
        if !exists(&self.dir(volume)).await {
            return Ok(());
        }
        let targets: Vec<PathBuf> = self
            .targets(volume)
            .await
            .into_iter()
            .filter(|t| t != target)
            .collect();
        self.write_targets(volume, &targets).await
    }

    /// Detaches the volume: loop device, front end, engine export. Idempotent.
    pub async fn detach(&self, engine: &Engine, volume: &VolumeId) -> Result<(), CsiError> {
        self.detach_keeping(engine, volume, false).await
    }

    /// [`Attacher::detach`]; with `export_in_use` the engine's consumer export stays (another
    /// node uses the volume through it: a remote attachment this node serves).
    pub async fn detach_keeping(
        &self,
        engine: &Engine,
        volume: &VolumeId,
        export_in_use: bool,
    ) -> Result<(), CsiError> {
        self.release(volume).await?;
        // A volume the engine serves no consumer export of (never staged, or
        // detached already) needs nothing from the engine: not asking keeps an
        // idempotent unstage from being refused as busy while background work
        // (a flatten, a capture) holds the volume.
        if !export_in_use && serves_consumer(engine, volume) {
            match engine.detach_volume(volume).await {
                Ok(()) => {}
                Err(error) if error.code() == ErrorCode::NotFound => {}
                Err(error) => return Err(error.into()),
            }
        }
        self.forget(volume).await
    }

    /// Releases what this node made for the consumer: loop device and front end. Idempotent.
    pub async fn release(&self, volume: &VolumeId) -> Result<(), CsiError> {
        let dir = self.dir(volume);
        if let Ok(recorded) = tokio::fs::read_to_string(dir.join("device")).await {
            let device = recorded.trim().to_string();
            if let Some(current) = self.device(volume).await {
                run("losetup", &["--detach", &current.to_string_lossy()]).await?;
            }
            tracing::debug!(%device, "loop device released");
        }
        // Without an attach directory no front end was ever started for the volume: an
        // idempotent unstage then needs no front-end server.
        if exists(&dir).await {
            self.frontends.stop(volume).await?;
        }
        Ok(())
    }

    /// Removes the attach directory: the volume is no longer attached here.
    pub async fn forget(&self, volume: &VolumeId) -> Result<(), CsiError> {
        let dir = self.dir(volume);
        if exists(&dir).await {
            tokio::fs::remove_dir_all(&dir)
                .await
                .map_err(io("removing the attach directory"))?;
        }
        tracing::info!(volume = %volume, "volume detached");
        Ok(())
    }
}

/// A device staged before for one node only, now staged shared: direct I/O switched on (the
/// loop driver changes it on a live device).
async fn share(device: PathBuf, shared: bool) -> Result<PathBuf, CsiError> {
    if shared {
        run("losetup", &["--direct-io=on", &device.to_string_lossy()]).await?;
    }
    Ok(device)
}

/// Whether the engine's record names the volume's writable (consumer) export.
/// An unreadable record counts as "yes": the engine then answers itself.
fn serves_consumer(engine: &Engine, volume: &VolumeId) -> bool {
    match engine.record(volume) {
        Ok(rec) => rec
            .exports
            .iter()
            .any(|e| e.target == livedisk_engine::record::ExportTarget::Volume),
        Err(error) => error.code() != ErrorCode::NotFound,
    }
}

/// A file's identity as the loop driver records it for its backing file: (major, minor, inode).
type FileIdentity = (u32, u32, u64);

/// How long a look at the front end's file may take: a stuck FUSE server must not hang a CSI call.
const FRONT_END_STAT_TIMEOUT: Duration = Duration::from_secs(5);

/// The identity of the front end's file, or None when it cannot be read (the front end is gone,
/// or does not answer in time).
async fn file_identity(path: &Path) -> Option<FileIdentity> {
    let metadata = tokio::time::timeout(FRONT_END_STAT_TIMEOUT, tokio::fs::metadata(path))
        .await
        .ok()?
        .ok()?;
    let dev = metadata.dev();
    Some((libc::major(dev), libc::minor(dev), metadata.ino()))
}

/// Parses `losetup --noheadings -O BACK-MAJ:MIN,BACK-INO` output ("   0:52    1", padded), as the
/// loop driver reports its backing file.
fn parse_backing_identity(listed: &str) -> Option<FileIdentity> {
    let mut fields = listed.split_whitespace();
    let (major, minor) = fields.next()?.split_once(':')?;
    let inode = fields.next()?.parse().ok()?;
    if fields.next().is_some() {
        return None;
    }
    Some((major.parse().ok()?, minor.parse().ok()?, inode))
}

/// Whether a path exists; an unreadable one counts as absent, as `Path::exists` has it.
async fn exists(path: &Path) -> bool {
    tokio::fs::try_exists(path).await.unwrap_or(false)
}

/// Runs a host tool and returns its stdout, or an error with its stderr.
pub async fn run(program: &str, args: &[&str]) -> Result<String, CsiError> {
    let output = Command::new(program)
        .args(args)
        .output()
        .await
        .map_err(|e| CsiError::Internal(format!("running {program}: {e}")))?;
    if !output.status.success() {
        return Err(CsiError::Internal(format!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&output.stdout).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_backing_file_identity_losetup_reports() {
        assert_eq!(
            parse_backing_identity("     0:52          1\n"),
            Some((0, 52, 1))
        );
        assert_eq!(
            parse_backing_identity("259:3 123456"),
            Some((259, 3, 123456))
        );
    }

    #[test]
    fn refuses_what_is_not_one_identity() {
        for listed in ["", "\n", "0:52", "052 1", "0:52 x", "a:b 1", "0:52 1 2"] {
            assert_eq!(parse_backing_identity(listed), None, "{listed:?}");
        }
    }
}
