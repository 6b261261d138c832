//! How much of the pool a snapshot holds (the allocated size of the layer it sealed), the pool's
//! room (free space less what its volumes were promised), and the engine's own full-pool check
//! of new snapshots (the rule is `crate::pool_space`).

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::engine::{Engine, Result};
use super::record::VolumeRecord;
use crate::error::EngineError;
use crate::pool_space::{self, Need, Room};
use livedisk_common::{SnapshotId, VolumeId};

/// Bytes a file takes on its file system (qcow2 metadata included, holes left out).
fn allocated(file: &Path) -> Result<u64> {
    // st_blocks is in 512-byte units whatever the file system's block size.
    Ok(std::fs::metadata(file)?.blocks() * 512)
}

impl Engine {
    /// Bytes of the pool the layer sealed by `snap` takes (its file's allocated blocks, qcow2
    /// metadata included). 0 when no layer is the snapshot's own any more (a merge moved its
    /// point in time into another layer). NOT_FOUND for an unknown snapshot.
    pub fn snapshot_allocated_bytes(&self, snap: &SnapshotId) -> Result<u64> {
        let rec = self.locate(snap)?;
        let Some(index) = rec.layer_of(snap) else {
            return Ok(0);
        };
        allocated(
            &self
                .vol_dir(&rec.id)
                .join(VolumeRecord::layer_file(rec.layers[index].seq)),
        )
    }

    /// Bytes of the pool the volume's active layer takes: what a snapshot of it would keep
    /// (see `pool_space`). NOT_FOUND for an unknown or deleted volume.
    pub fn active_allocated_bytes(&self, volume: &VolumeId) -> Result<u64> {
        let rec = self.load_live(volume)?;
        let Some(active) = rec.active() else {
            return Ok(0);
        };
        allocated(
            &self
                .vol_dir(volume)
                .join(VolumeRecord::layer_file(active.seq)),
        )
    }

    /// The pool's room for a new request: its free space, less what every live volume on it
    /// was promised and has not taken yet (`pool_space::promised`). Reads the volumes' records
    /// and stats their active layers: blocking.
    pub fn pool_room(&self) -> Result<Room> {
        let mut promised = 0u64;
        for id in self.store.list()? {
            let Some(rec) = self.store.load(&id)? else {
                continue;
            };
            // A deleted volume kept for its snapshots has no consumer and no active layer.
            let Some(active) = rec.active().filter(|_| !rec.deleted) else {
                continue;
            };
            let held = allocated(&self.vol_dir(&id).join(VolumeRecord::layer_file(active.seq)))?;
            promised = promised.saturating_add(pool_space::promised(rec.size, held));
        }
        Ok(Room {
            free: pool_space::available_bytes(self.pool())?,
            promised,
        })
    }

    /// What a snapshot of `volume` needs of the pool's room.
    pub fn snapshot_need(&self, volume: &VolumeId) -> Result<Need> {
        Ok(Need::Snapshot {
            size: self.load_live(volume)?.size,
            active_allocated: self.active_allocated_bytes(volume)?,
        })
    }

    /// Refuses (RESOURCE_EXHAUSTED, before anything is made) the snapshots of `pairs` the pool's
    /// file system cannot hold now; run under the volumes' locks. What the volumes were promised
    /// is not counted here: the node counts it for CSI requests (see `pool_space`). Snapshots already taken (a repeat) need
    /// nothing, and a volume that cannot be snapshotted at all is left to the snapshot's own
    /// checks, which say why.
    pub(super) fn check_snapshot_space(&self, pairs: &[(VolumeId, SnapshotId)]) -> Result<()> {
        let mut needs = vec![];
        for (volume, snap) in pairs {
            let Ok(rec) = self.load_live(volume) else {
                continue;
            };
            if rec.snapshot(snap).is_some() {
                continue;
            }
            needs.push(self.snapshot_need(volume)?);
        }
        if needs.is_empty() {
            return Ok(());
        }
        let room = Room::free_only(pool_space::available_bytes(self.pool())?);
        match pool_space::group_refusal(&needs, room) {
            Some(why) => Err(EngineError::ResourceExhausted(why)),
            None => Ok(()),
        }
    }
}
