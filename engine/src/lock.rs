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
    // Declared before `_slot`: the mutex is released before the slot checks whether its entry
    // can go.
    _task: OwnedMutexGuard<()>,
    _slot: Slot,
    file: fs::File,
}

impl Drop for VolumeGuard {
    fn drop(&mut self) {
        // SAFETY: unlocking our own descriptor (closing would also do it).
        unsafe { libc::flock(self.file.as_raw_fd(), libc::LOCK_UN) };
    }
}

type Table = Mutex<HashMap<VolumeId, Arc<tokio::sync::Mutex<()>>>>;

/// One use of a volume's entry in the table (a holder, or an attempt to become one). When the
/// last use ends the entry goes, so the table holds only volumes in use. Every clone of an
/// entry's `Arc` outside the table lives in a slot (or in the guard of the mutex a slot
/// took), and clones are only made under the table's lock: so an entry whose only reference is
/// the table's has nobody holding or trying it, and removing it cannot split one volume's
/// lock in two.
struct Slot {
    table: Arc<Table>,
    id: VolumeId,
    mutex: Option<Arc<tokio::sync::Mutex<()>>>,
}

impl Slot {
    fn take(table: &Arc<Table>, id: &VolumeId) -> Result<Self> {
        let mutex = table
            .lock()
            .map_err(|_| EngineError::Busy("lock table poisoned".into()))?
            .entry(id.clone())
            .or_default()
            .clone();
        Ok(Self {
            table: table.clone(),
            id: id.clone(),
            mutex: Some(mutex),
        })
    }

    fn try_lock(&self) -> Option<OwnedMutexGuard<()>> {
        self.mutex.as_ref()?.clone().try_lock_owned().ok()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        drop(self.mutex.take());
        // A poisoned table is left as it is: try_lock already refuses with it.
        if let Ok(mut map) = self.table.lock()
            && map.get(&self.id).is_some_and(|m| Arc::strong_count(m) == 1)
        {
            map.remove(&self.id);
        }
    }
}

pub struct Locks {
    dir: PathBuf,
    /// Held only to find, insert or prune a volume's mutex, never across an operation.
    tasks: Arc<Table>,
}

impl Locks {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            tasks: Arc::default(),
        }
    }

    /// Takes the volume or fails at once with `Busy` (CSI: ABORTED, retry).
    pub fn try_lock(&self, id: &VolumeId) -> Result<VolumeGuard> {
        let slot = Slot::take(&self.tasks, id)?;
        let task = slot
            .try_lock()
            .ok_or_else(|| EngineError::Busy(id.to_string()))?;
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
        Ok(VolumeGuard {
            _task: task,
            _slot: slot,
            file,
        })
    }

    /// How many volumes the in-process table holds an entry for (tests).
    #[cfg(test)]
    fn entries(&self) -> usize {
        self.tasks.lock().map(|m| m.len()).unwrap_or(usize::MAX)
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

    #[tokio::test]
    async fn the_table_empties_when_no_volume_is_held() {
        let dir = std::env::temp_dir().join(format!("ld-lock-{}", uuid::Uuid::new_v4()));
        let (a, other_process) = (Arc::new(Locks::new(&dir)), Locks::new(&dir));
        let (v, w) = (VolumeId::generate(), VolumeId::generate());

        let g = a.try_lock(&v).expect("v");
        let h = a.try_lock(&w).expect("w");
        assert_eq!(a.entries(), 2);
        // A refused attempt while v is held leaves v's entry to its holder and adds nothing.
        assert!(matches!(a.try_lock(&v), Err(EngineError::Busy(_))));
        assert_eq!(a.entries(), 2);
        drop(g);
        assert_eq!(a.entries(), 1, "v's entry goes with its guard");
        // Released means released: the pruned volume is taken again at once.
        let g = a.try_lock(&v).expect("v again");
        drop(g);
        drop(h);
        assert_eq!(a.entries(), 0);

        // Refused by the file lock (another process holds the volume): no entry is left behind.
        let elsewhere = other_process.try_lock(&v).expect("v in the other table");
        assert!(matches!(a.try_lock(&v), Err(EngineError::Busy(_))));
        assert_eq!(a.entries(), 0);
        drop(elsewhere);
        assert_eq!(other_process.entries(), 0);

        // A waiter polls with try_lock: it holds no entry between tries, and the table empties
        // once it has had the volume and let it go.
        let held = a.try_lock(&v).expect("v held");
        let waiter = {
            let (a, v) = (a.clone(), v.clone());
            tokio::spawn(async move {
                let guard = a
                    .lock_waiting(&v, Duration::from_secs(5))
                    .await
                    .expect("the waiter gets v");
                drop(guard);
            })
        };
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert_eq!(a.entries(), 1);
        drop(held);
        waiter.await.expect("waiter");
        assert_eq!(a.entries(), 0);
        fs::remove_dir_all(&dir).expect("cleanup");
    }
}
