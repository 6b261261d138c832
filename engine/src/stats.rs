//! Running totals of the data the engine's jobs moved, for the node plugin's metrics. Counted
//! once per job, when it concluded successfully, from QEMU's own job progress: nothing is
//! measured on the I/O path. Totals of this process only (they start at zero when it does).

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct JobStats {
    merged_bytes: AtomicU64,
    copied_bytes: AtomicU64,
    merge_restarts: AtomicU64,
    merge_copied_again_bytes: AtomicU64,
}

impl JobStats {
    /// A merge job (`block-commit` or `block-stream` deleting a snapshot) moved `bytes`.
    pub fn merged(&self, bytes: u64) {
        self.merged_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// A copy job (a clone's or restored volume's flatten) moved `bytes`.
    pub fn copied(&self, bytes: u64) {
        self.copied_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// A merge job was stopped for a snapshot and started again, copying `again` bytes a second
    /// time.
    pub fn merge_restarted(&self, again: u64) {
        self.merge_restarts.fetch_add(1, Ordering::Relaxed);
        self.merge_copied_again_bytes
            .fetch_add(again, Ordering::Relaxed);
    }

    /// Merge jobs started again after a snapshot so far.
    pub fn merge_restarts(&self) -> u64 {
        self.merge_restarts.load(Ordering::Relaxed)
    }

    /// Bytes merge jobs copied a second time because a snapshot stopped them.
    pub fn merge_copied_again_bytes(&self) -> u64 {
        self.merge_copied_again_bytes.load(Ordering::Relaxed)
    }

    /// Bytes merged by snapshot deletions so far.
    pub fn merged_bytes(&self) -> u64 {
        self.merged_bytes.load(Ordering::Relaxed)
    }

    /// Bytes copied by flattens so far.
    pub fn copied_bytes(&self) -> u64 {
        self.copied_bytes.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_add_up_per_kind() {
        let stats = JobStats::default();
        stats.merged(10);
        stats.merged(5);
        stats.copied(7);
        assert_eq!((stats.merged_bytes(), stats.copied_bytes()), (15, 7));
    }
}
