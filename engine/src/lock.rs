//! Per-volume locks, across tasks *and* processes: the node plugin and the
//! admin CLI each open an engine on the same pool and daemon, so an
//! in-memory lock alone would let one process's recovery undo a step the
//! other is in the middle of. Each volume has a lock file in the runtime
//! directory, held with `flock` for the whole operation (released by the
//! kernel if the holder dies). Never a global lock.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::OwnedMutexGuard;

use crate::error::EngineError;
use livedisk_common::VolumeId;

type Result<T, E = EngineError> = std::result::Result<T, E>;

/// Holds a volume for one operation; dropping it releases the volume.
pub struct VolumeGuard {
    _task: OwnedMutexGuard<()>,
    file: fs::File,
}

impl Drop for VolumeGuard {
    fn drop(&mut self) {
        // SAFETY: unlocking our own descriptor (closing would also do it).
        unsafe { libc::flock(self.file.as_raw_fd(), libc::LOCK_UN) };
    }
}

pub struct Locks {
    dir: PathBuf,
    /// Held only to find or insert a volume's mutex, never across an operation.
    tasks: Mutex<HashMap<VolumeId, Arc<tokio::sync::Mutex<()>>>>,
}

impl Locks {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            tasks: Mutex::default(),
        }
    }

    /// Takes the volume or fails at once with `Busy` (CSI: ABORTED, retry).
    pub fn try_lock(&self, id: &VolumeId) -> Result<VolumeGuard> {
        let m = {
            let mut map = self
                .tasks
                .lock()
                .map_err(|_| EngineError::Busy("lock table poisoned".into()))?;
            map.entry(id.clone()).or_default().clone()
        };
        let task = m
            .try_lock_owned()
            .map_err(|_| EngineError::Busy(id.to_string()))?;
        fs::create_dir_all(&self.dir)?;
        // The file name comes from a validated id: it cannot leave the dir.
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.dir.join(format!("{id}.lock")))?;
        // SAFETY: flock on a valid descriptor we own.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            return Err(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                EngineError::Busy(format!("{id} (held by another process)"))
            } else {
                e.into()
            });
        }
        Ok(VolumeGuard { _task: task, file })
    }

    /// Waits up to `timeout` for the volume (recovery at open: another
    /// process may hold it briefly).
    pub async fn lock_waiting(&self, id: &VolumeId, timeout: Duration) -> Result<VolumeGuard> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match self.try_lock(id) {
                Err(EngineError::Busy(_)) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                r => return r,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_volume_is_held_once_and_released_on_drop() {
        let dir = std::env::temp_dir().join(format!("ld-lock-{}", uuid::Uuid::new_v4()));
        let (a, b) = (Locks::new(&dir), Locks::new(&dir));
        let v = VolumeId::generate();
        let g = a.try_lock(&v).expect("first");
        // Same process, other lock table: the file lock still refuses, as it
        // would for another process.
        assert!(matches!(b.try_lock(&v), Err(EngineError::Busy(_))));
        assert!(matches!(a.try_lock(&v), Err(EngineError::Busy(_))));
        assert!(a.try_lock(&VolumeId::generate()).is_ok());
        drop(g);
        let _g = b
            .lock_waiting(&v, Duration::from_secs(5))
            .await
            .expect("after release");
        fs::remove_dir_all(&dir).expect("cleanup");
    }
}
