//! The I/O shell around [`super::plan`]: observes a volume's front end on the host, runs
//! nbdfuse as a child of this process (its own process group, so that signals meant for the
//! server do not reach it), reaps it, and unmounts it. Calls on one volume run one at a time;
//! calls on different volumes run side by side.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use livedisk_engine::VolumeId;
use procfs::process::Process;
use rustix::io::Errno;
use rustix::mount::UnmountFlags;

use super::error::FrontEndError;
use super::layout::{self, FrontEndPaths};
use super::plan::{self, Observed, StartPlan, StopPlan};
use crate::node::mount_decision::mountinfo_escape;

type Result<T> = std::result::Result<T, FrontEndError>;

/// How long nbdfuse may take to connect to the export and mount.
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// How long an unmount is retried while the kernel still holds the file: the kernel lets go of
/// a loop device's backing file after `losetup --detach` returns (the release is deferred).
const BUSY_RETRY: Duration = Duration::from_secs(10);
/// How long nbdfuse gets to exit after its unmount before SIGTERM, and after SIGTERM.
const EXIT_GRACE: Duration = Duration::from_secs(2);

/// A running front end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrontEnd {
    pub volume: VolumeId,
    /// Empty for a front end adopted from a release that recorded no URI.
    pub uri: String,
    pub file: PathBuf,
    pub pid: i32,
    /// Not started by this process (found running).
    pub adopted: bool,
}

pub struct Supervisor {
    engine_dir: PathBuf,
    /// The engine dir as the mount table shows it (symlinks resolved).
    mount_dir: PathBuf,
    locks: Mutex<HashMap<VolumeId, Arc<tokio::sync::Mutex<()>>>>,
    /// nbdfuse processes this process started and has not reaped yet.
    children: Arc<Mutex<HashMap<VolumeId, i32>>>,
}

impl Supervisor {
    pub fn new(engine_dir: &Path) -> Self {
        Self {
            engine_dir: engine_dir.to_path_buf(),
            mount_dir: std::fs::canonicalize(engine_dir).unwrap_or_else(|_| engine_dir.into()),
            locks: Mutex::default(),
            children: Arc::default(),
        }
    }

    pub fn engine_dir(&self) -> &Path {
        &self.engine_dir
    }

    fn lock(&self, volume: &VolumeId) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(volume.clone()).or_default().clone()
    }

    fn paths(&self, volume: &VolumeId) -> FrontEndPaths {
        FrontEndPaths::new(&self.engine_dir, volume)
    }

    fn is_child(&self, volume: &VolumeId, pid: i32) -> bool {
        let children = self.children.lock().unwrap_or_else(|p| p.into_inner());
        children.get(volume) == Some(&pid)
    }

    async fn observe(&self, volume: &VolumeId) -> Result<Observed> {
        let paths = self.paths(volume);
        let mount_point = self.mount_dir.join(
            paths
                .fuse_dir
                .strip_prefix(&self.engine_dir)
                .unwrap_or(&paths.fuse_dir),
        );
        blocking(move || observe(&paths, &mount_point)).await
    }

    fn front_end(&self, volume: &VolumeId, observed: &Observed, pid: i32) -> FrontEnd {
        FrontEnd {
            volume: volume.clone(),
            uri: observed.uri.clone().unwrap_or_default(),
            file: self.paths(volume).file,
            pid,
            adopted: !self.is_child(volume, pid),
        }
    }

    /// Starts the volume's front end on `uri`, or returns the running one. Idempotent.
    pub async fn start(&self, volume: &str, uri: &str) -> Result<FrontEnd> {
        let volume = VolumeId::parse(volume)?;
        layout::check_export_uri(uri, &volume, &self.engine_dir)?;
        let lock = self.lock(&volume);
        let _held = lock.lock().await;
        let observed = self.observe(&volume).await?;
        match plan::plan_start(&observed, uri) {
            StartPlan::Reuse { pid } => {
                let mut found = self.front_end(&volume, &observed, pid);
                if found.uri.is_empty() {
                    write_atomic(&self.paths(&volume).uri_file, uri).await?;
                    found.uri = uri.to_string();
                }
                tracing::debug!(volume = %volume, pid, adopted = found.adopted, "front end already running");
                Ok(found)
            }
            StartPlan::Conflict { running } => Err(FrontEndError::OtherUri {
                volume: volume.to_string(),
                running,
                requested: uri.to_string(),
            }),
            StartPlan::Spawn {
                unmount_stale,
                terminate,
            } => {
                let paths = self.paths(&volume);
                if unmount_stale {
                    tracing::warn!(volume = %volume, "detaching a dead front end's mount");
                    let fuse_dir = paths.fuse_dir.clone();
                    blocking(move || unmount(&fuse_dir, UnmountFlags::DETACH)).await?;
                }
                if let Some(pid) = terminate {
                    tracing::warn!(volume = %volume, pid, "ending an nbdfuse that never mounted");
                    end_process(&volume, pid, &paths.file, Duration::ZERO).await?;
                }
                let pid = self.spawn(&volume, &paths, uri).await?;
                Ok(FrontEnd {
                    volume,
                    uri: uri.to_string(),
                    file: paths.file,
                    pid,
                    adopted: false,
                })
            }
        }
    }

    async fn spawn(&self, volume: &VolumeId, paths: &FrontEndPaths, uri: &str) -> Result<i32> {
        tokio::fs::create_dir_all(&paths.fuse_dir)
            .await
            .map_err(FrontEndError::io("creating the front end's mount point"))?;
        match tokio::fs::remove_file(&paths.pid_file).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(FrontEndError::io("removing an old nbdfuse pid file")(e)),
        }
        write_atomic(&paths.uri_file, uri).await?;
        let log = std::fs::File::create(&paths.log_file)
            .map_err(FrontEndError::io("creating the nbdfuse log"))?;
        let mut command = tokio::process::Command::new("nbdfuse");
        command
            .arg("-P")
            .arg(&paths.pid_file)
            .arg(&paths.file)
            .arg(uri)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            // Its own process group: a signal to the server's group (a supervisor stopping it)
            // leaves the front ends serving; a restarted server adopts them.
            .process_group(0);
        let mut child = command.spawn().map_err(FrontEndError::Spawn)?;
        let pid = child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .ok_or_else(|| FrontEndError::Exited {
                volume: volume.to_string(),
                status: "gone at once".into(),
                log: String::new(),
            })?;
        let started = Instant::now();
        loop {
            // nbdfuse writes its pid file once it serves.
            if read_pid(&paths.pid_file).await == Some(pid) {
                break;
            }
            if let Some(status) = child
                .try_wait()
                .map_err(FrontEndError::io("waiting for nbdfuse"))?
            {
                let log = tokio::fs::read_to_string(&paths.log_file)
                    .await
                    .unwrap_or_default();
                return Err(FrontEndError::Exited {
                    volume: volume.to_string(),
                    status: status.to_string(),
                    log: log.trim().to_string(),
                });
            }
            if started.elapsed() > START_TIMEOUT {
                let _ = child.start_kill();
                let _ = child.wait().await;
                return Err(FrontEndError::StartTimeout {
                    volume: volume.to_string(),
                    waited: START_TIMEOUT,
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.children
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(volume.clone(), pid);
        tracing::info!(volume = %volume, pid, file = %paths.file.display(), "front end started");
        // Reaps nbdfuse when it exits (after its unmount, or a crash), so it never lingers as a
        // zombie, and says how it ended.
        let children = self.children.clone();
        let volume = volume.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            {
                let mut children = children.lock().unwrap_or_else(|p| p.into_inner());
                if children.get(&volume) == Some(&pid) {
                    children.remove(&volume);
                }
            }
            match status {
                Ok(status) if status.success() => {
                    tracing::info!(volume = %volume, pid, "front end exited")
                }
                Ok(status) => {
                    tracing::warn!(volume = %volume, pid, %status, "front end exited with a failure")
                }
                Err(error) => {
                    tracing::warn!(volume = %volume, pid, %error, "waiting for a front end failed")
                }
            }
        });
        Ok(pid)
    }

    /// Stops the volume's front end: unmount, then nbdfuse exits. Idempotent.
    pub async fn stop(&self, volume: &str) -> Result<()> {
        let volume = VolumeId::parse(volume)?;
        let lock = self.lock(&volume);
        let _held = lock.lock().await;
        let paths = self.paths(&volume);
        let observed = self.observe(&volume).await?;
        match plan::plan_stop(&observed) {
            StopPlan::Nothing => {}
            StopPlan::Unmount { pid } => {
                unmount_retrying(&volume, &paths.fuse_dir).await?;
                if let Some(pid) = pid {
                    end_process(&volume, pid, &paths.file, EXIT_GRACE).await?;
                }
            }
            StopPlan::Terminate { pid } => {
                end_process(&volume, pid, &paths.file, Duration::ZERO).await?
            }
        }
        for file in [&paths.pid_file, &paths.uri_file, &paths.log_file] {
            let _ = tokio::fs::remove_file(file).await;
        }
        // Empty once unmounted; a failure leaves only an empty directory.
        let _ = tokio::fs::remove_dir(&paths.fuse_dir).await;
        if observed != Observed::default() {
            tracing::info!(volume = %volume, "front end stopped");
        }
        Ok(())
    }

    /// The running front ends: every volume directory under `attach/` is looked at.
    pub async fn list(&self) -> Result<Vec<FrontEnd>> {
        let root = layout::attach_root(&self.engine_dir);
        let mut entries = match tokio::fs::read_dir(&root).await {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => return Err(FrontEndError::io(format!("listing {}", root.display()))(e)),
        };
        let mut found = vec![];
        while let Some(entry) = entries
            .next_entry()
            .await
            .map_err(FrontEndError::io(format!("listing {}", root.display())))?
        {
            let Ok(volume) = VolumeId::parse(&entry.file_name().to_string_lossy()) else {
                continue;
            };
            let observed = self.observe(&volume).await?;
            if let (true, Some(pid)) = (observed.running(), observed.pid) {
                found.push(self.front_end(&volume, &observed, pid));
            }
        }
        found.sort_by(|a, b| a.volume.cmp(&b.volume));
        Ok(found)
    }
}

/// Runs blocking host work (mount table, umount2, /proc) off the async runtime: a hung FUSE
/// mount then stalls one call, not the server.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| FrontEndError::io("a blocking task failed")(std::io::Error::other(e)))?
}

fn observe(paths: &FrontEndPaths, mount_point: &Path) -> Result<Observed> {
    let table = Process::myself()
        .and_then(|me| me.mountinfo())
        .map_err(|e| FrontEndError::io("reading /proc/self/mountinfo")(std::io::Error::other(e)))?;
    let escaped = mountinfo_escape(&mount_point.to_string_lossy());
    let mounted = table
        .iter()
        .any(|m| m.mount_point.as_os_str() == escaped.as_str() && m.fs_type.starts_with("fuse"));
    let pid = std::fs::read_to_string(&paths.pid_file)
        .ok()
        .and_then(|text| text.trim().parse::<i32>().ok())
        .filter(|pid| serves(*pid, &paths.file));
    let uri = std::fs::read_to_string(&paths.uri_file)
        .ok()
        .map(|text| text.trim().to_string())
        .filter(|uri| !uri.is_empty());
    Ok(Observed { mounted, pid, uri })
}

/// Whether `pid` is a live (not zombie) nbdfuse serving `file`.
fn serves(pid: i32, file: &Path) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|cmdline| plan::is_front_end_cmdline(&cmdline, &file.to_string_lossy()))
}

async fn read_pid(pid_file: &Path) -> Option<i32> {
    tokio::fs::read_to_string(pid_file)
        .await
        .ok()?
        .trim()
        .parse()
        .ok()
}

async fn write_atomic(path: &Path, text: &str) -> Result<()> {
    let temporary = path.with_extension("tmp");
    tokio::fs::write(&temporary, text)
        .await
        .map_err(FrontEndError::io(format!("writing {}", path.display())))?;
    tokio::fs::rename(&temporary, path)
        .await
        .map_err(FrontEndError::io(format!("writing {}", path.display())))
}

/// umount2; "not mounted" counts as done.
fn unmount(path: &Path, flags: UnmountFlags) -> Result<()> {
    match rustix::mount::unmount(path, flags) {
        Ok(()) | Err(Errno::INVAL) | Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(FrontEndError::io(format!("unmounting {}", path.display()))(
            e.into(),
        )),
    }
}

async fn unmount_retrying(volume: &VolumeId, fuse_dir: &Path) -> Result<()> {
    let started = Instant::now();
    loop {
        let path = fuse_dir.to_path_buf();
        let outcome =
            blocking(move || Ok(rustix::mount::unmount(&path, UnmountFlags::empty()))).await?;
        match outcome {
            Ok(()) | Err(Errno::INVAL) | Err(Errno::NOENT) => return Ok(()),
            Err(Errno::BUSY) if started.elapsed() < BUSY_RETRY => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(Errno::BUSY) => return Err(FrontEndError::InUse(volume.to_string())),
            Err(e) => {
                return Err(FrontEndError::io(format!(
                    "unmounting {}",
                    fuse_dir.display()
                ))(e.into()));
            }
        }
    }
}

/// Waits `grace` for nbdfuse to exit by itself, then sends SIGTERM and waits again.
async fn end_process(volume: &VolumeId, pid: i32, file: &Path, grace: Duration) -> Result<()> {
    let gone = |deadline: Duration| {
        let file = file.to_path_buf();
        async move {
            let started = Instant::now();
            loop {
                if !serves(pid, &file) {
                    return true;
                }
                if started.elapsed() >= deadline {
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    if gone(grace).await {
        return Ok(());
    }
    // SAFETY: kill(2) on a pid just checked to be nbdfuse serving this volume's file.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    if gone(EXIT_GRACE).await {
        return Ok(());
    }
    Err(FrontEndError::Stuck {
        volume: volume.to_string(),
        pid,
    })
}
