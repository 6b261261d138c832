//! The host's engine daemon: one qemu-storage-daemon per host, in its own
//! process (daemonized, its own session), so that restarts or upgrades of the
//! process hosting this library never stop volume I/O.
//!
//! `start_or_attach_on` is the entry point: it re-attaches to a live
//! daemon whenever there is one and starts a new one only when there is not,
//! under an exclusive lock so that two callers racing can never produce two
//! daemons. Nothing here ever stops a daemon that runs.
//!
//! A daemon has two QMP monitors and QEMU 7.2 serves one client on each: the
//! main one (`qmp.sock`) belongs to the node plugin's engine, the admin one
//! (`admin.sock`) to the admin CLI, so that both can work at once.
//!
//! `reattach` follows a daemon that restarted under a live session (see
//! `reconnect.rs`); it only ever attaches.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::qmp::{Qmp, QmpError};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("runtime dir {0}: {1}")]
    RuntimeDir(PathBuf, io::Error),
    #[error(
        "qemu-storage-daemon not found or not runnable ({0}); install it with \
         `apt-get install qemu-system-common qemu-utils libnbd-bin`"
    )]
    Missing(io::Error),
    #[error("qemu-storage-daemon failed to start: {0}")]
    StartFailed(String),
    #[error(
        "the daemon's monitor {0} does not answer: another process holds it (QEMU 7.2 serves one \
         client per monitor); {1}"
    )]
    MonitorBusy(PathBuf, &'static str),
    #[error(
        "no qemu-storage-daemon answers on {0}, and this process only attaches (its daemon is \
         started by the engine pod or `livedisk-csi admin start`)"
    )]
    NotRunning(PathBuf),
    #[error("QMP: {0}")]
    Qmp(#[from] QmpError),
}

/// Whether a caller that finds no daemon may start one.
///
/// In the chart the daemon belongs to the engine pod: a node plugin that started one itself would
/// run it inside its own container (the daemon goes down with the container, cutting every
/// consumer's I/O), and the engine pod, starting later, would replace its socket with a second
/// daemon on the same images. Such callers only attach.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DaemonPolicy {
    /// Start a daemon when none runs (processes on a host, the admin CLI on a bare host, tests).
    #[default]
    StartWhenAbsent,
    /// Never start one: fail with [`DaemonError::NotRunning`] while none answers.
    AttachOnly,
}

/// Which of the daemon's monitors a session talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Monitor {
    /// `qmp.sock`: the long-lived engine of the node plugin.
    Main,
    /// `admin.sock`: the admin CLI, beside the node plugin. Falls back to the
    /// main monitor for a daemon started without an admin monitor.
    Admin,
}

/// How we came to hold the daemon: callers use this to decide whether the
/// daemon's in-memory state (nodes, exports) must be rebuilt from records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Attached,
    Started,
}

/// Paths of one daemon's runtime directory.
#[derive(Debug, Clone)]
pub struct RuntimeDir {
    pub dir: PathBuf,
}

impl RuntimeDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }
    pub fn qmp_socket(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }
    /// A second QMP monitor for people and tools on the host (the admin CLI): the engine process
    /// holds the first one, and a daemon serves one client per monitor.
    pub fn admin_socket(&self) -> PathBuf {
        self.dir.join("admin.sock")
    }
    pub fn nbd_socket(&self) -> PathBuf {
        self.dir.join("nbd.sock")
    }
    pub fn pid_file(&self) -> PathBuf {
        self.dir.join("qsd.pid")
    }
    fn lock_file(&self) -> PathBuf {
        self.dir.join("start.lock")
    }
    fn log_file(&self) -> PathBuf {
        self.dir.join("qsd.log")
    }
}

/// A handle on the running daemon.
#[derive(Debug, Clone)]
pub struct Daemon {
    pub runtime: RuntimeDir,
    pub pid: Option<i32>,
    pub origin: Origin,
    /// The monitor this handle's QMP session is on.
    pub monitor: Monitor,
}

/// Exclusive advisory lock on a file, released on drop.
struct FileLock(fs::File);

impl FileLock {
    fn acquire(path: &Path) -> io::Result<Self> {
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)?;
        // SAFETY: flock on a valid, owned file descriptor.
        let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self(f))
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        // SAFETY: unlocking our own descriptor; closing would also release it.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// True if a process with this pid exists (signal 0 probes without killing).
pub fn pid_alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 performs only the permission/existence check.
    let rc = unsafe { libc::kill(pid, 0) };
    if rc == 0 {
        // A zombie still "exists"; treat it as dead.
        return !fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
            .unwrap_or(false);
    }
    io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

fn read_pid(path: &Path) -> Option<i32> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn is_qsd(pid: i32) -> bool {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains("qemu-storage-daemon"))
        .unwrap_or(false)
}

/// Starts the host's daemon or attaches to the one already running, on its
/// main monitor.
pub async fn start_or_attach(runtime: RuntimeDir) -> Result<(Daemon, Qmp), DaemonError> {
    start_or_attach_on(runtime, Monitor::Main, DaemonPolicy::StartWhenAbsent).await
}

/// Starts the host's daemon or attaches to the one already running, with a
/// QMP session on the monitor `want`. A daemon is started only when none is
/// alive (and `policy` allows it), and its session is then on `want` as well: an admin command
/// that started the daemon leaves the main monitor free for the node plugin.
pub async fn start_or_attach_on(
    runtime: RuntimeDir,
    want: Monitor,
    policy: DaemonPolicy,
) -> Result<(Daemon, Qmp), DaemonError> {
    let rt = runtime.clone();
    let dir_err = |e| DaemonError::RuntimeDir(rt.dir.clone(), e);
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&runtime.dir)
        .map_err(dir_err)?;
    // DirBuilder's mode only applies to directories it creates; enforce 0700
    // on a pre-existing one as well, since the QMP socket grants full control.
    fs::set_permissions(&runtime.dir, fs::Permissions::from_mode(0o700)).map_err(dir_err)?;

    let lock_path = runtime.lock_file();
    let _lock = tokio::task::spawn_blocking(move || FileLock::acquire(&lock_path))
        .await
        .map_err(|e| DaemonError::StartFailed(e.to_string()))?
        .map_err(dir_err)?;

    let pid = read_pid(&runtime.pid_file()).filter(|p| pid_alive(*p) && is_qsd(*p));
    // The monitors to try, in order. The admin CLI uses the main monitor
    // only on a daemon without an admin monitor (started by an older build).
    let mut candidates = vec![];
    if want == Monitor::Admin && runtime.admin_socket().exists() {
        candidates.push((Monitor::Admin, runtime.admin_socket()));
    }
    if runtime.qmp_socket().exists() {
        candidates.push((Monitor::Main, runtime.qmp_socket()));
    }
    let mut busy = None;
    for (monitor, sock) in &candidates {
        match Qmp::connect(sock).await {
            Ok(qmp) => {
                tracing::info!(?pid, ?monitor, "attached to running qemu-storage-daemon");
                return Ok((
                    Daemon {
                        runtime,
                        pid,
                        origin: Origin::Attached,
                        monitor: *monitor,
                    },
                    qmp,
                ));
            }
            // Accepted but never greeted: another session holds it. No other
            // monitor is tried then: the admin monitor being held means
            // another admin command runs, and the main one is the node
            // plugin's.
            Err(QmpError::Timeout(..)) => {
                busy = Some(sock.clone());
                break;
            }
            // Refused: a stale socket file; try the next one.
            Err(_) => {}
        }
    }
    if let Some(sock) = busy {
        return Err(DaemonError::MonitorBusy(
            sock,
            if want == Monitor::Admin {
                "retry when the other admin command has finished, or stop the node plugin \
                 if this daemon has no admin monitor"
            } else {
                "another engine process is attached; stop it first"
            },
        ));
    }
    if let Some(p) = pid {
        // Alive but no monitor answers: starting a second daemon on the same
        // images would corrupt them, so refuse instead.
        if !candidates.is_empty() {
            return Err(DaemonError::StartFailed(format!(
                "daemon pid {p} is alive but its QMP socket does not answer"
            )));
        }
        return Err(DaemonError::StartFailed(format!(
            "daemon pid {p} is alive but its QMP socket is gone; stop it first"
        )));
    }

    if policy == DaemonPolicy::AttachOnly {
        return Err(DaemonError::NotRunning(runtime.qmp_socket()));
    }
    // Stale leftovers of a dead daemon.
    let _ = fs::remove_file(runtime.qmp_socket());
    let _ = fs::remove_file(runtime.admin_socket());
    let _ = fs::remove_file(runtime.nbd_socket());
    let _ = fs::remove_file(runtime.pid_file());

    let log = fs::File::create(runtime.log_file()).map_err(dir_err)?;
    let log2 = log.try_clone().map_err(dir_err)?;
    // --daemonize: the parent exits once the monitor socket is listening, and
    // the daemon itself runs in its own session, outliving our process.
    let out = tokio::process::Command::new("qemu-storage-daemon")
        .arg("--chardev")
        .arg(format!(
            "socket,id=qmp0,path={},server=on,wait=off",
            runtime.qmp_socket().display()
        ))
        .arg("--monitor")
        .arg("chardev=qmp0")
        .arg("--chardev")
        .arg(format!(
            "socket,id=qmp1,path={},server=on,wait=off",
            runtime.admin_socket().display()
        ))
        .arg("--monitor")
        .arg("chardev=qmp1")
        .arg("--pidfile")
        .arg(runtime.pid_file())
        .arg("--daemonize")
        .stdin(std::process::Stdio::null())
        .stdout(log)
        .stderr(log2)
        .status()
        .await
        .map_err(DaemonError::Missing)?;
    if !out.success() {
        let msg = fs::read_to_string(runtime.log_file()).unwrap_or_default();
        return Err(DaemonError::StartFailed(format!("{out}: {}", msg.trim())));
    }
    let sock = match want {
        Monitor::Main => runtime.qmp_socket(),
        Monitor::Admin => runtime.admin_socket(),
    };
    let qmp = Qmp::connect(&sock).await?;
    let pid = read_pid(&runtime.pid_file());
    tracing::info!(?pid, monitor = ?want, "started qemu-storage-daemon");
    Ok((
        Daemon {
            runtime,
            pid,
            origin: Origin::Started,
            monitor: want,
        },
        qmp,
    ))
}

/// Connects the lost session `qmp` to the daemon running now, on the
/// monitor `monitor`, and never starts one: the node plugin's engine follows
/// a daemon that whoever owns it (the engine DaemonSet, `admin start`)
/// restarted. Fails while no daemon listens there.
pub async fn reattach(
    runtime: &RuntimeDir,
    monitor: Monitor,
    qmp: &Qmp,
) -> Result<Daemon, DaemonError> {
    let sock = match monitor {
        Monitor::Main => runtime.qmp_socket(),
        Monitor::Admin => runtime.admin_socket(),
    };
    qmp.reconnect(&sock).await?;
    let pid = read_pid(&runtime.pid_file()).filter(|p| pid_alive(*p) && is_qsd(*p));
    tracing::info!(?pid, ?monitor, "re-attached to qemu-storage-daemon");
    Ok(Daemon {
        runtime: runtime.clone(),
        pid,
        origin: Origin::Attached,
        monitor,
    })
}

impl Daemon {
    /// Sends a signal to the daemon and waits for it to be gone.
    /// Used by tests (SIGKILL to simulate a crash) and by clean shutdown.
    pub async fn signal_and_wait(&self, signal: i32, timeout: Duration) -> Result<(), DaemonError> {
        let Some(pid) = self.pid else {
            return Err(DaemonError::StartFailed("daemon pid unknown".into()));
        };
        // SAFETY: sending a signal to the pid we started or attached to.
        unsafe { libc::kill(pid, signal) };
        let deadline = tokio::time::Instant::now() + timeout;
        while pid_alive(pid) {
            if tokio::time::Instant::now() > deadline {
                return Err(DaemonError::StartFailed(format!("pid {pid} still alive")));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }
}
