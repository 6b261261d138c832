//! Changed-block answers, from the durable extent records only: what a
//! snapshot's view holds, and what changed between two snapshots.

use super::engine::{Engine, Result};
use super::plan;
use super::record::VolumeRecord;
use super::types::{ExtentList, ExtentPage};
use crate::error::EngineError;
use crate::extents::Extent;
use livedisk_common::SnapshotId;

impl Engine {
    /// Allocated extents of a snapshot, from the durable records only (a
    /// record still being captured is waited for).
    pub async fn allocated_extents(&self, snap: &SnapshotId) -> Result<ExtentList> {
        let rec = self.locate_captured(snap).await?;
        Ok(ExtentList {
            volume_size: rec.size,
            extents: plan::allocated(&rec, snap)?,
        })
    }

    /// Extents changed after `base` up to `target` (same volume only), from
    /// the durable records only.
    pub async fn changed_extents(
        &self,
        base: &SnapshotId,
        target: &SnapshotId,
    ) -> Result<ExtentList> {
        let rec = self.locate_captured(target).await?;
        Ok(ExtentList {
            volume_size: rec.size,
            extents: self.delta_list(&rec, base, target)?,
        })
    }

    /// One page of [`Engine::allocated_extents`].
    pub async fn allocated(&self, snap: &SnapshotId, start: u64, max: usize) -> Result<ExtentPage> {
        Ok(self.allocated_extents(snap).await?.page(start, max))
    }

    /// One page of [`Engine::changed_extents`].
    pub async fn delta(
        &self,
        base: &SnapshotId,
        target: &SnapshotId,
        start: u64,
        max: usize,
    ) -> Result<ExtentPage> {
        Ok(self.changed_extents(base, target).await?.page(start, max))
    }

    /// The whole list of extents changed after `base` up to `target` of the
    /// volume `rec`; a base of another volume is named in the error. The
    /// base may be a deleted snapshot that left a tombstone in `rec` (see
    /// `record::Tombstone`); nothing else answers for a deleted one.
    pub(super) fn delta_list(
        &self,
        rec: &VolumeRecord,
        base: &SnapshotId,
        target: &SnapshotId,
    ) -> Result<Vec<Extent>> {
        if rec.snapshot(base).is_none() && rec.tombstone(base).is_none() {
            return Err(match self.locate(base) {
                Ok(other) => EngineError::InvalidArgument(format!(
                    "base snapshot {base} belongs to volume {}, not to {}",
                    other.id, rec.id
                )),
                Err(e) => e,
            });
        }
        Ok(plan::delta(rec, base, target)?)
    }
}
