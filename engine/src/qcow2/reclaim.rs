//! Frees layer files off the caller's path.
//!
//! Unlinking a big layer file is not free: on a filesystem mounted with
//! `discard` the kernel trims every extent of it first (a 512 MiB layer took
//! ~0.4 s on the build machines, as long as merging it). A file that no
//! record names any more is renamed into the pool's `.reclaim` directory
//! (one rename on the same filesystem) and unlinked by a blocking-pool
//! thread, so deleting a snapshot returns when its merge is done, not when
//! the filesystem has trimmed the old layer. Whatever a crash leaves there is
//! unlinked at the next open, and the directory goes once it is empty, so an
//! empty pool stays empty.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::watch;

/// Name of the directory under the pool. Not a valid volume id, so the
/// record store never lists it.
pub const RECLAIM_DIR: &str = ".reclaim";

#[derive(Clone)]
pub(super) struct Reclaimer {
    dir: PathBuf,
    /// Files (or sweeps) not yet unlinked.
    pending: Arc<watch::Sender<usize>>,
}

impl Reclaimer {
    pub(super) fn new(pool: &Path) -> Self {
        Self {
            dir: pool.join(RECLAIM_DIR),
            pending: Arc::new(watch::Sender::new(0)),
        }
    }

    /// Takes `file` out of its volume directory at once and unlinks it in
    /// the background. A file that is already gone is fine.
    pub(super) fn file(&self, file: &Path) -> io::Result<()> {
        let Some(name) = file.file_name() else {
            return Ok(());
        };
        // Unique: a volume's layer numbers are never reused, but two volumes
        // have files of the same name.
        let target = self.dir.join(format!(
            "{}-{}",
            uuid::Uuid::new_v4().simple(),
            name.to_string_lossy()
        ));
        // A few times: a background thread may remove the (then empty)
        // directory between our create_dir_all and the rename, or inside
        // create_dir_all itself (its mkdir finds the directory, which is gone
        // by the time it looks again: AlreadyExists, seen under load).
        for _ in 0..4 {
            if !file.exists() {
                return Ok(());
            }
            match std::fs::create_dir_all(&self.dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
            match std::fs::rename(file, &target) {
                Ok(()) => {
                    self.spawn_unlink(Some(target));
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            }
        }
        // The directory kept vanishing: unlink in place rather than fail.
        match std::fs::remove_file(file) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Unlinks whatever an earlier process left in the directory.
    pub(super) fn sweep_leftovers(&self) {
        if self.dir.exists() {
            self.spawn_unlink(None);
        }
    }

    /// Waits until every file handed over so far is unlinked.
    pub(super) async fn settled(&self) {
        let mut rx = self.pending.subscribe();
        // The sender lives as long as `self`: this cannot fail.
        let _ = rx.wait_for(|n| *n == 0).await;
    }

    /// `Some(file)`: unlink that file; `None`: everything in the directory.
    fn spawn_unlink(&self, file: Option<PathBuf>) {
        self.pending.send_modify(|n| *n += 1);
        let dir = self.dir.clone();
        let pending = self.pending.clone();
        tokio::task::spawn_blocking(move || {
            let files = match file {
                Some(f) => vec![f],
                None => std::fs::read_dir(&dir)
                    .map(|rd| rd.flatten().map(|e| e.path()).collect())
                    .unwrap_or_default(),
            };
            for f in files {
                if let Err(e) = std::fs::remove_file(&f)
                    && e.kind() != io::ErrorKind::NotFound
                {
                    tracing::warn!(file = %f.display(), error = %e, "could not free a layer file");
                }
            }
            // Fails while other files wait in it (or it is gone): fine.
            let _ = std::fs::remove_dir(&dir);
            pending.send_modify(|n| *n -= 1);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct TempPool(PathBuf);
    impl TempPool {
        fn new() -> Self {
            let p =
                std::env::temp_dir().join(format!("ld-reclaim-{}", uuid::Uuid::new_v4().simple()));
            std::fs::create_dir(&p).expect("mkdir");
            Self(p)
        }
        fn path(&self) -> &Path {
            &self.0
        }
    }
    impl Drop for TempPool {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[tokio::test]
    async fn files_leave_their_directory_at_once_and_the_pool_ends_empty() {
        let pool = TempPool::new();
        let vol = pool.path().join("vol");
        std::fs::create_dir(&vol).expect("mkdir");
        let r = Reclaimer::new(pool.path());
        for i in 0..20 {
            let f = vol.join(format!("layer-{i}.qcow2"));
            std::fs::write(&f, vec![7u8; 4096]).expect("write");
            r.file(&f).expect("reclaim");
            assert!(
                !f.exists(),
                "the file must leave the volume directory at once"
            );
        }
        // Already gone: fine.
        r.file(&vol.join("layer-99.qcow2")).expect("missing file");
        r.settled().await;
        assert!(!pool.path().join(RECLAIM_DIR).exists());
        std::fs::remove_dir(&vol).expect("volume directory empty");
        assert_eq!(std::fs::read_dir(pool.path()).expect("ls").count(), 0);
    }

    #[tokio::test]
    async fn leftovers_of_a_crash_are_swept() {
        let pool = TempPool::new();
        let dir = pool.path().join(RECLAIM_DIR);
        std::fs::create_dir(&dir).expect("mkdir");
        std::fs::write(dir.join("x-layer-1.qcow2"), b"left").expect("write");
        let r = Reclaimer::new(pool.path());
        r.sweep_leftovers();
        r.settled().await;
        assert!(!dir.exists());
    }
}
