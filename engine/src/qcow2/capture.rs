//! Extent records of sealed layers, captured off the snapshot's path.
//!
//! A snapshot returns once its QMP transaction and its record are durable. The layer it sealed
//! holds exactly the clusters written since the previous snapshot (decision 3 of the brief), and
//! its allocation map becomes the snapshot's extent record *afterwards*: reading it with
//! `qemu-img map` takes seconds for a layer with 100,000 new extents, which a busy disk's
//! snapshot must not wait for.
//!
//! * After a snapshot, a background task reads the maps without holding the volume, then holds
//!   it only to store them (`spawn`).
//! * Whatever needs a record that is not captured yet captures it first: a merge (it changes the
//!   layer's allocation map), a clone or changed-since export (they copy records), a changed-block
//!   query (it waits for the capture), and recovery (what a crash or an exited admin CLI left).
//!
//! Why a map read without the volume's lock is still right when it is stored: a sealed layer is
//! never written until a merge, and a merge captures every missing record of its volume under
//! the lock before it starts. So when the stored record is found captured already, or the layer
//! is gone or changed, the read is dropped (`apply`). The background capture never takes the
//! volume's lock at all — an operation right after a snapshot never finds the volume busy — and
//! stores with one atomic update of the record file that no later save undoes.

use std::path::Path;

use livedisk_common::{SnapshotId, VolumeId};

use super::engine::{Engine, Result};
use super::qemu_img;
use super::record::{SnapshotRecord, VolumeRecord};
use crate::extents::{self, Extent};
use crate::failpoint;

/// A sealed layer whose extent record is missing: the snapshot and its layer's number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Missing {
    pub snapshot: SnapshotId,
    pub layer: u64,
}

/// The snapshots of `rec` whose extent record is missing, with the layer each sealed.
pub(super) fn missing(rec: &VolumeRecord) -> Vec<Missing> {
    rec.snapshots
        .iter()
        .filter(|s| s.changed.is_none())
        .filter_map(|s| {
            rec.layer_of(&s.id).map(|li| Missing {
                snapshot: s.id.clone(),
                layer: rec.layers[li].seq,
            })
        })
        .collect()
}

/// Stores a map read from `m.layer` as the record of `m.snapshot`, folded with the extents the
/// snapshot inherited when it sealed. False (and `rec` unchanged) when the record no longer
/// wants it: captured meanwhile, or the snapshot no longer ends at that layer.
pub(super) fn apply(rec: &mut VolumeRecord, m: &Missing, map: &[Extent]) -> bool {
    let still_sealed_there = rec
        .layer_of(&m.snapshot)
        .is_some_and(|li| rec.layers[li].seq == m.layer);
    let Some(s) = rec.snapshots.iter_mut().find(|s| s.id == m.snapshot) else {
        return false;
    };
    if s.changed.is_some() || !still_sealed_there {
        return false;
    }
    s.changed = Some(fold_inherited(s, map));
    true
}

fn fold_inherited(s: &mut SnapshotRecord, map: &[Extent]) -> Vec<Extent> {
    let inherited = std::mem::take(&mut s.inherited);
    if inherited.is_empty() {
        map.to_vec()
    } else {
        extents::union([map, inherited.as_slice()])
    }
}

impl Engine {
    async fn read_maps(&self, rec: &VolumeRecord, list: &[Missing]) -> Result<Vec<Vec<Extent>>> {
        let dir = self.vol_dir(&rec.id);
        let mut maps = Vec::with_capacity(list.len());
        for m in list {
            maps.push(layer_map(&dir, m.layer).await?);
        }
        Ok(maps)
    }

    /// Captures every missing record of a volume whose lock the caller holds; returns the
    /// record as saved.
    pub(super) async fn capture_locked(&self, mut rec: VolumeRecord) -> Result<VolumeRecord> {
        let list = missing(&rec);
        if list.is_empty() {
            return Ok(rec);
        }
        let _one_at_a_time = self.captures.running.lock().await;
        let maps = self.read_maps(&rec, &list).await?;
        let mut changed = false;
        for (m, map) in list.iter().zip(&maps) {
            changed |= apply(&mut rec, m, map);
        }
        if changed {
            self.store.save(&rec)?;
        }
        Ok(rec)
    }

    /// Captures every missing record of a volume without holding it: an operation on the
    /// volume runs meanwhile. The maps are read first, then stored with one atomic update of the
    /// record file (`RecordStore::update`, milliseconds), which a save of an operation's older
    /// copy does not undo (`record::keep_captured`).
    pub(super) async fn capture_unlocked(&self, id: &VolumeId) -> Result<()> {
        let _one_at_a_time = self.captures.running.lock().await;
        let Some(rec) = self.store.load(id)? else {
            return Ok(());
        };
        let list = missing(&rec);
        if list.is_empty() {
            return Ok(());
        }
        let maps = self.read_maps(&rec, &list).await?;
        failpoint::hit("capture-before-store", self.daemon().pid);
        self.store.update(id, |rec| {
            let mut changed = false;
            for (m, map) in list.iter().zip(&maps) {
                changed |= apply(rec, m, map);
            }
            changed
        })?;
        Ok(())
    }

    /// Makes sure every extent record of `volume` is captured, waiting for or doing the
    /// capture (for callers that read records directly, like the admin CLI and the tests).
    pub async fn capture_extents(&self, volume: &VolumeId) -> Result<()> {
        self.capture_unlocked(volume).await
    }

    /// Captures the missing records of `volumes` in the background, after a snapshot returned.
    /// A failure is logged and left to whatever needs the record next (which captures it) or to
    /// recovery.
    pub(super) fn spawn_capture(&self, volumes: Vec<VolumeId>) {
        for id in &volumes {
            self.captures.mark(id, true);
        }
        let engine = self.background_handle();
        tokio::spawn(async move {
            for id in volumes {
                if let Err(error) = engine.capture_unlocked(&id).await {
                    tracing::warn!(volume = %id, %error, "capturing extent records failed; the next query, merge or recovery captures them");
                }
                engine.captures.mark(&id, false);
            }
        });
    }

    /// Captures in the background what no capture of this process has in hand: records left
    /// by a process that exited before its background capture (an admin CLI), or whose capture
    /// failed. The node plugin's adopter calls it on every pass.
    pub(super) fn spawn_missing_captures(&self) {
        let ids = match self.store.list() {
            Ok(ids) => ids,
            Err(error) => {
                tracing::warn!(%error, "listing volumes for missing extent records failed");
                return;
            }
        };
        let left: Vec<VolumeId> = ids
            .into_iter()
            .filter(|id| !self.captures.is_pending(id))
            .filter(|id| {
                self.store
                    .load(id)
                    .ok()
                    .flatten()
                    .is_some_and(|rec| !missing(&rec).is_empty())
            })
            .collect();
        if !left.is_empty() {
            self.spawn_capture(left);
        }
    }

    /// The record of the volume holding `snap`, with every extent record captured (waiting for
    /// or doing the capture): what a changed-block query reads.
    pub(super) async fn locate_captured(&self, snap: &SnapshotId) -> Result<VolumeRecord> {
        let rec = self.locate(snap)?;
        if missing(&rec).is_empty() {
            return Ok(rec);
        }
        self.capture_unlocked(&rec.id).await?;
        self.locate(snap)
    }
}

async fn layer_map(dir: &Path, seq: u64) -> Result<Vec<Extent>> {
    Ok(qemu_img::layer_allocation(&dir.join(VolumeRecord::layer_file(seq))).await?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qcow2::record::{Layer, SnapshotState};

    fn x(offset: u64, length: u64) -> Extent {
        Extent { offset, length }
    }

    fn sealed(rec: &mut VolumeRecord, seq: u64, inherited: Vec<Extent>) -> SnapshotId {
        let id = SnapshotId::generate();
        if let Some(active) = rec.layers.last_mut() {
            active.seq = 100;
        }
        rec.layers.insert(
            rec.layers.len() - 1,
            Layer {
                seq,
                sealed_by: Some(id.clone()),
            },
        );
        rec.snapshots.push(SnapshotRecord {
            id: id.clone(),
            created: chrono::Utc::now(),
            size: rec.size,
            state: SnapshotState::Ready,
            changed: None,
            inherited,
            for_clone: None,
        });
        id
    }

    #[test]
    fn missing_lists_uncaptured_snapshots_with_their_layers() {
        let mut rec = VolumeRecord::new(VolumeId::generate(), 1 << 30);
        let a = sealed(&mut rec, 0, vec![]);
        let b = sealed(&mut rec, 1, vec![]);
        rec.snapshots[0].changed = Some(vec![]);
        assert_eq!(
            missing(&rec),
            vec![Missing {
                snapshot: b,
                layer: 1
            }]
        );
        assert!(!missing(&rec).iter().any(|m| m.snapshot == a));
    }

    #[test]
    fn apply_folds_inherited_extents_once() {
        let mut rec = VolumeRecord::new(VolumeId::generate(), 1 << 30);
        let a = sealed(&mut rec, 0, vec![x(0, 65536)]);
        let m = Missing {
            snapshot: a.clone(),
            layer: 0,
        };
        assert!(apply(&mut rec, &m, &[x(65536, 65536), x(1 << 20, 65536)]));
        assert_eq!(
            rec.snapshot(&a).and_then(|s| s.changed.clone()),
            Some(vec![x(0, 131072), x(1 << 20, 65536)])
        );
        assert!(rec.snapshot(&a).is_some_and(|s| s.inherited.is_empty()));
        // A second read of the same layer (a racing capture) changes nothing.
        assert!(!apply(&mut rec, &m, &[x(0, 1 << 20)]));
        assert_eq!(
            rec.snapshot(&a).and_then(|s| s.changed.clone()),
            Some(vec![x(0, 131072), x(1 << 20, 65536)])
        );
    }

    #[test]
    fn a_read_of_a_layer_that_changed_is_dropped() {
        let mut rec = VolumeRecord::new(VolumeId::generate(), 1 << 30);
        let a = sealed(&mut rec, 3, vec![]);
        let stale = Missing {
            snapshot: a.clone(),
            layer: 2,
        };
        assert!(!apply(&mut rec, &stale, &[x(0, 65536)]));
        assert_eq!(rec.snapshot(&a).and_then(|s| s.changed.clone()), None);
        let gone = Missing {
            snapshot: SnapshotId::generate(),
            layer: 3,
        };
        assert!(!apply(&mut rec, &gone, &[x(0, 65536)]));
    }
}
