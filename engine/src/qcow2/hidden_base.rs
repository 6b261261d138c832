//! Clones of a volume, and the hidden snapshot each is made from.
//!
//! A clone of a live volume is a restore (`clone.rs`) from a snapshot the
//! engine takes of the source for it: its *hidden base*, whose ID derives
//! from the clone's and which nobody else knows. The base lives exactly as
//! long as the clone reads it:
//!
//! 1. the base is taken, marked with the clone's ID (`for_clone`, part of
//!    the snapshot's durable intent), and the clone's record is saved
//!    naming it (`cloned_from`), both volumes locked throughout;
//! 2. once the clone is flattened (the flatten watcher sees it), the
//!    releaser task deletes the base (a merge on the source) and then
//!    records it gone;
//! 3. deleting the clone deletes its base with it.
//!
//! Every step is durable before the next, so a crash is finished by
//! recovery (`Engine::finish_pool_hidden_bases`, at the end of the next
//! open's recovery and of each of the adopter's passes): a flattened clone whose base is still recorded gets it
//! deleted, and a marked base whose clone has no record naming it (a crash
//! between steps 1's snapshot and record, or a clone removed before its
//! base could go) is deleted as an orphan. A base that cannot go yet (its
//! source is busy, or another clone of it is still being flattened) stays
//! recorded and is tried again; a deletion of the clone that cannot delete
//! it fails, so whoever deletes retries.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use livedisk_common::names::snapshot_id_for;

use super::engine::{Engine, Result};
use super::record::{ClonedFrom, ExportTarget, VolumeRecord};
use super::types::{MergeOptions, VolumeInfo, info};
use crate::error::EngineError;
use crate::failpoint;
use livedisk_common::{SnapshotId, VolumeId};

/// The hidden base snapshot a clone is made from. Derived from the clone's
/// ID, so a call repeated after a crash finds the base it took, and a
/// deletion of the clone finds it without a record.
pub fn hidden_base_id(clone: &VolumeId) -> SnapshotId {
    // The name the node plugin used before the engine owned clones: bases
    // taken then are found (and deleted with their clone) as well.
    snapshot_id_for(&format!("clone-base/{clone}"))
}

/// How long after its flatten a clone's base is deleted. Not at once: a
/// clone is often used right after it is made (attached, snapshot, or
/// deleted again, which deletes the base itself), and the deletion is a
/// merge that holds the source volume meanwhile.
const RELEASE_DELAY: Duration = Duration::from_secs(5);

/// Background task: deletes the hidden base of each clone the flatten
/// watcher sends (a clone it found flattened), one at a time, each
/// `RELEASE_DELAY` after it came. A base that cannot go yet stays recorded;
/// the adopter and the next open retry it.
pub(super) fn spawn_releaser(engine: Engine) -> (Releases, tokio::task::JoinHandle<()>) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(VolumeId, tokio::time::Instant)>();
    let task = tokio::spawn(async move {
        while let Some((id, sent)) = rx.recv().await {
            // Sent in order: each one's time comes after the previous one's.
            tokio::time::sleep_until(sent + RELEASE_DELAY).await;
            match engine.release_hidden_base(&id).await {
                Ok(()) | Err(EngineError::NotFound(_)) => {}
                Err(e) => {
                    tracing::warn!(volume = %id, error = %e, "the clone's hidden base cannot be deleted yet; will retry");
                }
            }
        }
    });
    (Releases(tx), task)
}

/// Where the flatten watcher sends each clone it found flattened.
pub(super) struct Releases(mpsc::UnboundedSender<(VolumeId, tokio::time::Instant)>);

impl Releases {
    pub(super) fn send(&self, clone: VolumeId) {
        // Fails only once the releaser ended with the engine.
        let _ = self.0.send((clone, tokio::time::Instant::now()));
    }
}

impl Engine {
    /// A new volume `id` with the content `source` has now, usable at once
    /// (see the module documentation). `size` (rounded up to 512 bytes) may
    /// exceed the source's size, never fall below it. Idempotent for the
    /// same source and size.
    pub async fn clone_volume(
        &self,
        id: &VolumeId,
        source: &VolumeId,
        size: Option<u64>,
    ) -> Result<VolumeInfo> {
        self.clone_volume_with(id, source, size, None).await
    }

    /// [`Engine::clone_volume`] with a rate limit (bytes/s) for the
    /// background flatten.
    pub async fn clone_volume_with(
        &self,
        id: &VolumeId,
        source: &VolumeId,
        size: Option<u64>,
        flatten_speed: Option<u64>,
    ) -> Result<VolumeInfo> {
        if id == source {
            return Err(EngineError::InvalidArgument(format!(
                "volume {id} cannot be a clone of itself"
            )));
        }
        // Both locks from the base's snapshot to the clone's record: the
        // orphan sweep, which runs under the source's lock, never sees a
        // base whose clone is still being made.
        let _gs = self.locks.try_lock(source)?;
        let _gc = self.locks.try_lock(id)?;
        self.refuse_if_migrating(source)?;
        if let Some(rec) = self.store.load(id)? {
            let same = !rec.deleted
                && rec
                    .cloned_from
                    .as_ref()
                    .is_some_and(|c| &c.volume == source)
                && size.is_none_or(|s| s.div_ceil(512) * 512 == rec.size);
            return if same {
                Ok(info(&rec))
            } else {
                Err(EngineError::AlreadyExists(format!("volume {id}")))
            };
        }
        let src = self.load_live(source)?;
        if let Some(size) = size
            && size < src.size
        {
            return Err(EngineError::OutOfRange(format!(
                "volume {source} is {} bytes; a clone of it cannot be {size}",
                src.size
            )));
        }
        let base = hidden_base_id(id);
        // Idempotent: a base an interrupted call took is used as it is.
        self.snapshot_locked(&[(source.clone(), base.clone())], Some(id), Instant::now())
            .await?;
        let origin = ClonedFrom {
            volume: source.clone(),
            hidden_base: Some(base.clone()),
        };
        self.restore_locked(id, source, &base, size, flatten_speed, Some(origin))
            .await
    }

    /// Deletes the hidden base of clone `id` if the clone no longer reads
    /// it, then records it gone. Holds the source's lock for the deletion
    /// (a merge) and the clone's only to record it: the clone stays usable
    /// meanwhile (a flattened clone never reads its base again).
    pub(super) async fn release_hidden_base(&self, id: &VolumeId) -> Result<()> {
        let rec = self.load(id)?;
        let Some(base) = rec.hidden_base_to_release().cloned() else {
            return Ok(());
        };
        failpoint::hit("clone-before-release", self.daemon().pid);
        self.delete_hidden_base(&base).await?;
        // Under the clone's lock, so that no operation on the clone saves an
        // older copy of its record over this. Held: the next recovery pass
        // finds the base gone and records it then.
        let Ok(_g) = self.locks.try_lock(id) else {
            return Ok(());
        };
        self.store.update(id, |r| {
            let Some(origin) = r.cloned_from.as_mut() else {
                return false;
            };
            origin.hidden_base.take().is_some()
        })?;
        tracing::info!(volume = %id, snapshot = %base, "deleted the clone's hidden base");
        Ok(())
    }

    /// Deletes a hidden base snapshot, taking its volume's lock (not the
    /// clone's); already gone counts as deleted.
    pub(super) async fn delete_hidden_base(&self, base: &SnapshotId) -> Result<()> {
        match self
            .delete_snapshot_with(base, MergeOptions::default())
            .await
        {
            Err(EngineError::NotFound(_)) => Ok(()),
            r => r,
        }
    }

    /// Hidden bases of volume `rec` whose clone has no record naming them.
    pub(super) fn orphan_hidden_bases(&self, rec: &VolumeRecord) -> Vec<SnapshotId> {
        rec.hidden_bases()
            .filter(|(base, clone)| match self.store.load(clone) {
                Ok(Some(c)) => c.cloned_from.and_then(|o| o.hidden_base).as_ref() != Some(*base),
                Ok(None) => true,
                // Unreadable: not known to be an orphan.
                Err(_) => false,
            })
            .map(|(base, _)| base.clone())
            .collect()
    }

    /// Recovery's part for hidden bases, run after the rest of recovery (the
    /// next open's, and each of the adopter's passes): for every volume that
    /// no one holds, deletes its clone's base if the clone no longer reads
    /// it, and its own orphaned bases. Never merges on a volume in
    /// `unrecovered` (the daemon may not hold it as its record says). What
    /// cannot go yet is logged and stays recorded: not a failure of the
    /// volume's recovery; the next pass tries again.
    pub(super) async fn finish_pool_hidden_bases(
        &self,
        unrecovered: &HashSet<VolumeId>,
        limit: Duration,
    ) {
        let Ok(ids) = self.store.list() else {
            return;
        };
        for id in ids {
            let Ok(Some(rec)) = self.store.load(&id) else {
                continue;
            };
            let release = rec
                .hidden_base_to_release()
                .and(rec.cloned_from.as_ref())
                .is_some_and(|o| !unrecovered.contains(&o.volume));
            let sweep = !unrecovered.contains(&id) && !self.orphan_hidden_bases(&rec).is_empty();
            if !release && !sweep {
                continue;
            }
            let r = tokio::time::timeout(limit, self.finish_hidden_bases(&id, release, sweep))
                .await
                .unwrap_or_else(|_| {
                    Err(EngineError::Busy(format!(
                        "deleting a hidden base of volume {id} (did not finish within {limit:?})"
                    )))
                });
            if let Err(e) = r {
                tracing::warn!(volume = %id, error = %e, "a hidden base snapshot cannot be deleted yet; will retry");
            }
        }
    }

    /// Hidden-base work of one volume: its clone's base (`release`), its own
    /// orphaned bases (`sweep`, under its lock; held: a live process works
    /// on it, and the next pass looks again).
    async fn finish_hidden_bases(&self, id: &VolumeId, release: bool, sweep: bool) -> Result<()> {
        if release {
            self.release_hidden_base(id).await?;
        }
        if !sweep {
            return Ok(());
        }
        let Ok(_g) = self.locks.try_lock(id) else {
            return Ok(());
        };
        let rec = self.load(id)?;
        for base in self.orphan_hidden_bases(&rec) {
            let rec = self.load(id)?;
            let exported = rec
                .exports
                .iter()
                .any(|e| matches!(&e.target, ExportTarget::Snapshot { id } if *id == base));
            if rec.snapshot(&base).is_none() || exported {
                continue;
            }
            tracing::info!(volume = %id, snapshot = %base, "deleting an orphaned hidden base");
            self.merge_locked(rec, &base, MergeOptions::default(), true)
                .await?;
        }
        Ok(())
    }
}
