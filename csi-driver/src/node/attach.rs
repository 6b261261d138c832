//! The consumer's block device: the engine's writable NBD export of the volume, turned into a
//! file by `nbdfuse` and into a kernel block device by a loop device.
//!
//! Why this path: there is no `nbd` kernel module on these hosts, and QEMU 7.2's own FUSE export
//! takes the resize permission, which blocks an active commit (see csi-driver/README.md). The loop
//! device runs without direct I/O: with direct I/O over FUSE a filesystem broke right after mkfs.
//! nbdfuse runs in its own process group, so restarting the node plugin does not cut I/O.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::process::Command;

use super::blocking::io;
use crate::grpc::error::CsiError;
use livedisk_engine::{Engine, ErrorCode, VolumeId};

/// Attachment state lives under `<runtime dir>/attach/<volume>/`.
pub struct Attacher {
    root: PathBuf,
}

impl Attacher {
    pub fn new(runtime_dir: &Path) -> Self {
        Self {
            root: runtime_dir.join("attach"),
        }
    }

    fn dir(&self, volume: &VolumeId) -> PathBuf {
        self.root.join(volume.as_str())
    }

    fn fuse_dir(&self, volume: &VolumeId) -> PathBuf {
        self.dir(volume).join("fuse")
    }

    fn backing_file(&self, volume: &VolumeId) -> PathBuf {
        self.fuse_dir(volume).join("disk")
    }

    /// The loop device of an attached volume, if it is attached and healthy.
    pub async fn device(&self, volume: &VolumeId) -> Option<PathBuf> {
        let recorded = tokio::fs::read_to_string(self.dir(volume).join("device"))
            .await
            .ok()?;
        let device = PathBuf::from(recorded.trim());
        let backing = run(
            "losetup",
            &[
                "--noheadings",
                "-O",
                "BACK-FILE",
                "--list",
                &device.to_string_lossy(),
            ],
        )
        .await
        .ok()?;
        (Path::new(backing.trim()) == self.backing_file(volume)).then_some(device)
    }

    /// Attaches the volume and returns its block device. Idempotent.
    pub async fn attach(&self, engine: &Engine, volume: &VolumeId) -> Result<PathBuf, CsiError> {
        if let Some(device) = self.device(volume).await {
            return Ok(device);
        }
        let export = engine.attach_volume(volume).await?;
        let fuse_dir = self.fuse_dir(volume);
        tokio::fs::create_dir_all(&fuse_dir)
            .await
            .map_err(io("creating the attach directory"))?;
        if !exists(&self.backing_file(volume)).await {
            self.start_nbdfuse(volume, &export.uri()).await?;
        }
        let backing = self.backing_file(volume);
        let device = run("losetup", &["--find", "--show", &backing.to_string_lossy()]).await?;
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

    async fn start_nbdfuse(&self, volume: &VolumeId, uri: &str) -> Result<(), CsiError> {
        let dir = self.dir(volume);
        let pidfile = dir.join("nbdfuse.pid");
        let _ = tokio::fs::remove_file(&pidfile).await;
        let log = tokio::fs::File::create(dir.join("nbdfuse.log"))
            .await
            .map_err(io("creating the nbdfuse log"))?
            .into_std()
            .await;
        let mut command = std::process::Command::new("nbdfuse");
        command
            .arg("-P")
            .arg(&pidfile)
            .arg(self.backing_file(volume))
            .arg(uri)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log);
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let mut child = command.spawn().map_err(|e| {
            CsiError::Internal(format!(
                "starting nbdfuse (apt-get install libnbd-bin fuse3): {e}"
            ))
        })?;
        let started = Instant::now();
        while !exists(&pidfile).await {
            if let Ok(Some(status)) = child.try_wait() {
                let log = tokio::fs::read_to_string(dir.join("nbdfuse.log"))
                    .await
                    .unwrap_or_default();
                return Err(CsiError::Internal(format!(
                    "nbdfuse exited ({status}): {log}"
                )));
            }
            if started.elapsed() > Duration::from_secs(15) {
                let _ = child.kill();
                return Err(CsiError::Internal(
                    "nbdfuse did not come up within 15 s".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // nbdfuse outlives this process by design (its own process group); while we live, a
        // thread reaps it when it exits so that it never lingers as a zombie.
        std::thread::spawn(move || {
            let _ = child.wait();
        });
        Ok(())
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

    /// Detaches the volume: loop device, nbdfuse, engine export. Idempotent.
    pub async fn detach(&self, engine: &Engine, volume: &VolumeId) -> Result<(), CsiError> {
        let dir = self.dir(volume);
        if let Ok(recorded) = tokio::fs::read_to_string(dir.join("device")).await {
            let device = recorded.trim().to_string();
            if let Some(current) = self.device(volume).await {
                run("losetup", &["--detach", &current.to_string_lossy()]).await?;
            }
            tracing::debug!(%device, "loop device released");
        }
        let fuse_dir = self.fuse_dir(volume);
        if exists(&self.backing_file(volume)).await {
            unmount_fuse(&fuse_dir).await?;
        }
        if let Ok(pid) = tokio::fs::read_to_string(dir.join("nbdfuse.pid")).await
            && let Ok(pid) = pid.trim().parse::<i32>()
        {
            wait_gone(pid).await;
        }
        // A volume the engine serves no consumer export of (never staged, or
        // detached already) needs nothing from the engine: not asking keeps an
        // idempotent unstage from being refused as busy while background work
        // (a flatten, a capture) holds the volume.
        if serves_consumer(engine, volume) {
            match engine.detach_volume(volume).await {
                Ok(()) => {}
                Err(error) if error.code() == ErrorCode::NotFound => {}
                Err(error) => return Err(error.into()),
            }
        }
        if exists(&dir).await {
            tokio::fs::remove_dir_all(&dir)
                .await
                .map_err(io("removing the attach directory"))?;
        }
        tracing::info!(volume = %volume, "volume detached");
        Ok(())
    }
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

/// How long a FUSE unmount is retried while the kernel still holds the file.
const FUSE_BUSY_RETRY: Duration = Duration::from_secs(10);

/// Unmounts the nbdfuse mount. The kernel lets go of a loop device's backing
/// file after `losetup --detach` returns (the release is deferred), so the
/// unmount can meet EBUSY for a moment: retried, bounded.
async fn unmount_fuse(fuse_dir: &std::path::Path) -> Result<(), CsiError> {
    let started = Instant::now();
    loop {
        match run("fusermount3", &["-u", &fuse_dir.to_string_lossy()]).await {
            Err(CsiError::Internal(message))
                if message.contains("busy") && started.elapsed() < FUSE_BUSY_RETRY =>
            {
                tracing::debug!(%message, "FUSE mount still busy; retrying");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            result => return result.map(|_| ()),
        }
    }
}

/// nbdfuse exits by itself once unmounted; a stuck one is terminated.
async fn wait_gone(pid: i32) {
    for attempt in 0..100 {
        // SAFETY: kill with signal 0 only checks whether the process exists.
        if unsafe { libc::kill(pid, 0) } != 0 {
            return;
        }
        if attempt == 50 {
            // SAFETY: sends SIGTERM to the nbdfuse this attacher started (pid from its pid file).
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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
