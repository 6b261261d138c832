//! Getting a merge's copied data to disk outside QEMU's drained sections.
//!
//! A non-active `block-commit` copies into the base layer's page cache and,
//! when the job is finalized, reopens the base read-only; that reopen flushes
//! it while the whole chain above is drained. Measured here: a 512 MiB
//! commit stalled the consumer's writes for 0.7 s in that flush, and the
//! stall grows with the data copied (up to the kernel's dirty-page limits).
//! So the engine (1) starts writeback of the base while the job copies
//! (`WritebackPacer`, overlapping the disk writes with the copy), and (2)
//! runs merge jobs with `auto-finalize: false` and flushes the base itself
//! while the job is `pending` (`flush_file`), when nothing is drained: the
//! reopen's own flush then finds little left. Both act on the page cache
//! QEMU writes through (the same inode), never on QEMU's own state, so they
//! only ever make data durable earlier.

use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How often the pacer starts writeback of what the job wrote since.
const PACE: Duration = Duration::from_millis(100);

/// Starts writeback of a file's dirty pages every `PACE` until dropped.
pub(super) struct WritebackPacer {
    task: tokio::task::JoinHandle<()>,
}

impl WritebackPacer {
    /// `None` if the file cannot be opened: pacing is an optimisation, and
    /// the job's own flush still makes the data durable.
    pub(super) fn start(path: PathBuf) -> Option<Self> {
        let file = match std::fs::File::open(&path) {
            Ok(f) => std::sync::Arc::new(f),
            Err(e) => {
                tracing::debug!(path = %path.display(), error = %e, "no writeback pacing");
                return None;
            }
        };
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(PACE);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let f = file.clone();
                // Usually returns at once; it may block while the device's
                // queue is full, so never on a runtime thread.
                let started = tokio::task::spawn_blocking(move || start_writeback(&f)).await;
                if let Ok(Err(e)) = started {
                    tracing::debug!(error = %e, "writeback pacing stopped");
                    return;
                }
            }
        });
        Some(Self { task })
    }
}

impl Drop for WritebackPacer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `sync_file_range(SYNC_FILE_RANGE_WRITE)` over the whole file: queues the
/// dirty pages for writeback without waiting for them.
fn start_writeback(file: &std::fs::File) -> io::Result<()> {
    // SAFETY: a valid open descriptor; the call reads no memory of ours.
    let rc = unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `fdatasync` of a file QEMU writes through the page cache, from our side.
pub(super) async fn flush_file(path: &Path) -> io::Result<()> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || std::fs::File::open(path)?.sync_data())
        .await
        .map_err(io::Error::other)?
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[tokio::test]
    async fn pacer_and_flush_work_on_a_file_opened_read_only() {
        let dir = std::env::temp_dir().join(format!("ld-wb-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(&[7u8; 1 << 20]).unwrap();
        let pacer = WritebackPacer::start(path.clone()).expect("pacer");
        tokio::time::sleep(PACE * 3).await;
        // Still pacing: no error stopped it.
        assert!(!pacer.task.is_finished());
        drop(pacer);
        flush_file(&path).await.unwrap();
        assert!(WritebackPacer::start(dir.join("missing")).is_none());
        assert!(flush_file(&dir.join("missing")).await.is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
