//! Pure decisions over a volume record: what a snapshot deletion must do to
//! the chain, what the record looks like afterwards, and which extent records
//! answer a changed-block query. No I/O here, so all of it is unit-tested.

use super::record::{
    Layer, MergeMode, PendingRevert, PendingSnapshot, SnapshotRecord, SnapshotState, VolumeRecord,
};
use super::tombstone;
use crate::extents::{self, Extent};
use livedisk_common::ids::SnapshotId;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("snapshot {0} not found")]
    SnapshotNotFound(SnapshotId),
    #[error("snapshot {0} is being deleted")]
    SnapshotDeleting(SnapshotId),
    #[error("snapshot {base} is not older than {target}")]
    NotOlder {
        base: SnapshotId,
        target: SnapshotId,
    },
    #[error(
        "changed blocks of snapshot {0} are not captured yet (the engine captures them right after the snapshot; ask again in a moment)"
    )]
    NotCaptured(SnapshotId),
    #[error("record inconsistent: {0}")]
    Inconsistent(String),
}

/// How to make a snapshot's layer disappear from the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeletePlan {
    /// Commit layer `top` into layer `base` (the snapshot's layer). `base`
    /// then takes over `top`'s role: the view of the next snapshot, or the
    /// active layer. `active` says that `top` is the top of the chain (the
    /// active layer, or the topmost sealed layer of a deleted volume), so
    /// QEMU runs an active commit that needs `job-complete`. Committing *upwards-in* keeps every other
    /// snapshot's view intact, whichever snapshot is deleted.
    Commit { top: u64, base: u64, active: bool },
    /// The volume was deleted and this is the topmost layer: nothing depends
    /// on it, so the layer is simply dropped.
    DropTop { layer: u64 },
    /// Stream layer `removed` (the snapshot's) into layer `into` (the next
    /// one), which then backs onto `base` (`None`: `removed` was the bottom).
    /// `into` only gains copies of what it already showed, so every view
    /// stays intact at every instant and no write target ever switches.
    Stream {
        into: u64,
        removed: u64,
        base: Option<u64>,
    },
}

/// The commit plan (the default merge mode).
pub fn plan_delete(rec: &VolumeRecord, snap: &SnapshotId) -> Result<DeletePlan, PlanError> {
    plan_delete_with(rec, snap, MergeMode::Commit)
}

pub fn plan_delete_with(
    rec: &VolumeRecord,
    snap: &SnapshotId,
    mode: MergeMode,
) -> Result<DeletePlan, PlanError> {
    let li = rec
        .layer_of(snap)
        .ok_or_else(|| PlanError::SnapshotNotFound(snap.clone()))?;
    let base = rec.layers[li].seq;
    match rec.layers.get(li + 1) {
        Some(top) if mode == MergeMode::Stream => Ok(DeletePlan::Stream {
            into: top.seq,
            removed: base,
            base: li.checked_sub(1).map(|b| rec.layers[b].seq),
        }),
        // QEMU runs an active commit (READY, then `job-complete`) whenever
        // the top is the top of the chain: the active layer of a live
        // volume, or the topmost sealed layer of a deleted one. Planning a
        // non-active commit there would wait for a conclusion that never
        // comes without `job-complete`.
        // Internal layers (sealed by nobody) right below the snapshot's are
        // merged in the same job: no view ends at them, and folding them
        // keeps the chain from growing by one layer per deletion.
        Some(top) => {
            let mut bi = li;
            while bi > 0 && rec.layers[bi - 1].sealed_by.is_none() {
                bi -= 1;
            }
            Ok(DeletePlan::Commit {
                top: top.seq,
                base: rec.layers[bi].seq,
                active: li + 2 == rec.layers.len(),
            })
        }
        None if rec.deleted => Ok(DeletePlan::DropTop { layer: base }),
        None => Err(PlanError::Inconsistent(format!(
            "snapshot {snap} has the top layer of a live volume"
        ))),
    }
}

/// Whether `plan` would commit the layer that takes the volume's writes (an
/// active commit on a live volume). The engine never does that: it seals
/// that layer internally first (see [`seal_internal`]), after which the plan
/// is a non-active commit. Deleted volumes have no writer and keep it.
pub fn needs_seal(rec: &VolumeRecord, plan: &DeletePlan) -> bool {
    matches!(plan, DeletePlan::Commit { active: true, .. })
        && !rec.deleted
        && rec.active().is_some()
}

/// The record once the internal seal's transaction has run: the active
/// layer stays, sealed by nobody, under the new active layer `overlay`, and
/// the in-flight merge no longer waits for the transaction. `sealed_map` is
/// the sealed layer's allocation map (captured before any job touches it):
/// writes no snapshot record holds, kept in `inherited` for the next one.
pub fn seal_internal(
    rec: &VolumeRecord,
    overlay: u64,
    sealed_map: &[Extent],
) -> Result<VolumeRecord, PlanError> {
    let mut out = rec.clone();
    if out.active().is_none() {
        return Err(PlanError::Inconsistent(format!(
            "volume {} has no active layer",
            rec.id
        )));
    }
    out.layers.push(Layer {
        seq: overlay,
        sealed_by: None,
    });
    out.next_layer_seq = out.next_layer_seq.max(overlay + 1);
    out.inherited = extents::union([out.inherited.as_slice(), sealed_map]);
    if let Some(super::record::InFlight::Merge { seal, .. }) = out.in_flight.as_mut() {
        *seal = None;
    }
    Ok(out)
}

/// Whether carrying out `plan` writes to or removes layer `seq`.
pub fn touches(plan: &DeletePlan, seq: u64) -> bool {
    match plan {
        DeletePlan::Commit { top, base, .. } => *top == seq || *base == seq,
        DeletePlan::DropTop { layer } => *layer == seq,
        DeletePlan::Stream { into, removed, .. } => *into == seq || *removed == seq,
    }
}

/// The record after `plan` for deleting `snap` has been carried out.
///
/// The deleted snapshot's extent record is folded into the next snapshot's:
/// the merged layer now holds both sets of writes, so their union is exactly
/// what a delta across it needs. A delta *from* the deleted snapshot needs
/// the next snapshot's own record as it was: that is kept in a tombstone
/// (see [`tombstone::after_delete`]). If no later snapshot exists the writes
/// live on in the active layer and will be in the next snapshot's record
/// when it seals.
pub fn apply_delete(
    rec: &VolumeRecord,
    snap: &SnapshotId,
    plan: &DeletePlan,
) -> Result<VolumeRecord, PlanError> {
    let mut out = rec.clone();
    let si = out
        .snapshot_index(snap)
        .ok_or_else(|| PlanError::SnapshotNotFound(snap.clone()))?;
    let removed = out.snapshots.remove(si);
    out.tombstones = tombstone::after_delete(&out.tombstones, &removed, out.snapshots.get(si));
    if let Some(next) = out.snapshots.get_mut(si) {
        next.changed = match (&removed.changed, &next.changed) {
            (Some(a), Some(b)) => Some(extents::union([a.as_slice(), b.as_slice()])),
            _ => None,
        };
    } else if !out.deleted {
        // No later snapshot: the next one to seal takes these writes.
        let mine = removed.changed.as_deref().unwrap_or_default();
        out.inherited = extents::union([out.inherited.as_slice(), mine]);
    }
    match plan {
        DeletePlan::Commit { top, base, .. } => {
            let pos = |seq: u64| {
                out.layers
                    .iter()
                    .position(|l| l.seq == seq)
                    .ok_or_else(|| PlanError::Inconsistent(format!("layer {seq} missing")))
            };
            let (ti, bi) = (pos(*top)?, pos(*base)?);
            if bi >= ti {
                return Err(PlanError::Inconsistent(format!(
                    "layer {base} is not below {top}"
                )));
            }
            // Every layer above the base up to the top is merged into it.
            let sealed_by = out.layers[ti].sealed_by.clone();
            out.layers.drain(bi + 1..=ti);
            out.layers[bi].sealed_by = sealed_by;
        }
        DeletePlan::DropTop { layer } => out.layers.retain(|l| l.seq != *layer),
        DeletePlan::Stream { removed, .. } => out.layers.retain(|l| l.seq != *removed),
    }
    out.exports.retain(
        |e| !matches!(&e.target, super::record::ExportTarget::Snapshot { id } if id == snap),
    );
    out.in_flight = None;
    Ok(out)
}

/// The record once a snapshot transaction has run: the active layer is
/// sealed by the snapshot and the overlay is the new active layer. The
/// extent record stays `None` until the sealed layer's map is captured; the
/// volume's inherited extents go with the snapshot now, to be folded in then.
pub fn seal(rec: &VolumeRecord, p: &PendingSnapshot) -> Result<VolumeRecord, PlanError> {
    let mut out = rec.clone();
    let active = out
        .layers
        .last_mut()
        .filter(|l| l.sealed_by.is_none())
        .ok_or_else(|| PlanError::Inconsistent(format!("volume {} has no active layer", rec.id)))?;
    active.sealed_by = Some(p.snapshot.clone());
    out.layers.push(Layer {
        seq: p.overlay,
        sealed_by: None,
    });
    out.next_layer_seq = out.next_layer_seq.max(p.overlay + 1);
    // A live snapshot owns its ID: a tombstone of the same ID (an ID
    // reused after deletion) would answer for another point in time.
    out.tombstones.retain(|t| t.id != p.snapshot);
    out.snapshots.push(SnapshotRecord {
        id: p.snapshot.clone(),
        created: p.created,
        size: rec.size,
        state: SnapshotState::Ready,
        changed: None,
        inherited: std::mem::take(&mut out.inherited),
        for_clone: p.for_clone.clone(),
    });
    out.pending_snapshot = None;
    Ok(out)
}

/// How reverting a live volume to a snapshot changes its chain.
///
/// The chain stays linear and every snapshot keeps its layer: a new active
/// layer goes on the *latest* snapshot's layer (`onto`) and holds exactly
/// the clusters where the target snapshot's view differs from the latest
/// snapshot's view; the old active layer and any internal layers above the
/// latest snapshot's layer go. When the target *is* the latest snapshot the
/// new layer is simply empty (`diff == false`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevertPlan {
    /// The latest snapshot (topmost layer sealed by a snapshot).
    pub onto: SnapshotId,
    /// Index in `layers` of the target snapshot's layer.
    pub snap_layer: usize,
    /// Index in `layers` of the latest snapshot's layer.
    pub onto_layer: usize,
    /// Whether the new layer needs content (target older than `onto`).
    pub diff: bool,
}

pub fn plan_revert(rec: &VolumeRecord, snap: &SnapshotId) -> Result<RevertPlan, PlanError> {
    ready_index(rec, snap)?;
    if rec.deleted || rec.active().is_none() {
        return Err(PlanError::Inconsistent(format!(
            "volume {} has no active layer",
            rec.id
        )));
    }
    let snap_layer = rec
        .layer_of(snap)
        .ok_or_else(|| PlanError::Inconsistent(format!("snapshot {snap} has no layer")))?;
    let (onto_layer, onto) = rec
        .layers
        .iter()
        .enumerate()
        .rev()
        .find_map(|(i, l)| l.sealed_by.clone().map(|s| (i, s)))
        .ok_or_else(|| PlanError::Inconsistent("no sealed layer".into()))?;
    // A merge into the latest snapshot's layer is in flight: its view is
    // no longer a point in time to compute a difference against.
    ready_index(rec, &onto)?;
    Ok(RevertPlan {
        diff: snap_layer != onto_layer,
        onto,
        snap_layer,
        onto_layer,
    })
}

/// The record once a built revert switches: the new layer `p.layer` is the
/// active layer on the latest snapshot's layer, the layers above that one
/// go (returned, top first, to be dropped after the record is saved), and
/// the pending extents go with them: the new layer's own allocation map
/// (the revert's difference plus later writes) is all the next snapshot's
/// record needs against the latest snapshot.
pub fn apply_revert(
    rec: &VolumeRecord,
    p: &PendingRevert,
) -> Result<(VolumeRecord, Vec<u64>), PlanError> {
    let plan = plan_revert(rec, &p.snapshot)?;
    if plan.onto != p.onto {
        return Err(PlanError::Inconsistent(format!(
            "revert of {} was built against {} but the latest snapshot is {}",
            rec.id, p.onto, plan.onto
        )));
    }
    let mut out = rec.clone();
    let gone: Vec<u64> = out.layers[plan.onto_layer + 1..]
        .iter()
        .rev()
        .map(|l| l.seq)
        .collect();
    out.layers.truncate(plan.onto_layer + 1);
    out.layers.push(Layer {
        seq: p.layer,
        sealed_by: None,
    });
    out.next_layer_seq = out.next_layer_seq.max(p.layer + 1);
    out.inherited.clear();
    out.pending_revert = None;
    Ok((out, gone))
}

fn ready_index(rec: &VolumeRecord, id: &SnapshotId) -> Result<usize, PlanError> {
    let i = rec
        .snapshot_index(id)
        .ok_or_else(|| PlanError::SnapshotNotFound(id.clone()))?;
    if rec.snapshots[i].state == SnapshotState::Deleting {
        return Err(PlanError::SnapshotDeleting(id.clone()));
    }
    Ok(i)
}

fn union_range(
    rec: &VolumeRecord,
    range: std::ops::Range<usize>,
) -> Result<Vec<Extent>, PlanError> {
    let mut lists = Vec::with_capacity(range.len());
    for s in &rec.snapshots[range] {
        lists.push(
            s.changed
                .as_deref()
                .ok_or_else(|| PlanError::NotCaptured(s.id.clone()))?,
        );
    }
    Ok(extents::union(lists))
}

/// Clusters allocated in a snapshot's view: every record up to it.
pub fn allocated(rec: &VolumeRecord, target: &SnapshotId) -> Result<Vec<Extent>, PlanError> {
    let j = ready_index(rec, target)?;
    union_range(rec, 0..j + 1)
}

/// Clusters changed after `base` up to and including `target`.
///
/// `base` may be a snapshot being deleted (its merge changes layers, never
/// the extent records, which change in one save when it is gone) or a
/// deleted snapshot's tombstone: a backup tool asks from the snapshot it
/// backed up last, and deletes that snapshot when the next one is taken.
/// `target` must be a live, ready snapshot.
pub fn delta(
    rec: &VolumeRecord,
    base: &SnapshotId,
    target: &SnapshotId,
) -> Result<Vec<Extent>, PlanError> {
    let j = ready_index(rec, target)?;
    let not_older = || PlanError::NotOlder {
        base: base.clone(),
        target: target.clone(),
    };
    if let Some(t) = rec.tombstone(base) {
        let b = tombstone::boundary(rec, t)?;
        if b > j {
            return Err(not_older());
        }
        let after = union_range(rec, b + 1..j + 1)?;
        return Ok(extents::union([t.changed.as_slice(), after.as_slice()]));
    }
    let i = rec
        .snapshot_index(base)
        .ok_or_else(|| PlanError::SnapshotNotFound(base.clone()))?;
    if i >= j {
        return Err(not_older());
    }
    union_range(rec, i + 1..j + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qcow2::record::{Layer, SnapshotRecord};
    use livedisk_common::VolumeId;

    fn x(offset: u64, length: u64) -> Extent {
        Extent { offset, length }
    }

    /// base(S1) <- L1(S2) <- L2(S3) <- L3 active
    fn chain() -> (VolumeRecord, Vec<SnapshotId>) {
        let mut r = VolumeRecord::new(VolumeId::generate(), 1 << 20);
        let ids: Vec<_> = (0..3).map(|_| SnapshotId::generate()).collect();
        r.layers = (0..4)
            .map(|i| Layer {
                seq: i,
                sealed_by: ids.get(i as usize).cloned(),
            })
            .collect();
        r.snapshots = ids
            .iter()
            .enumerate()
            .map(|(i, id)| SnapshotRecord {
                id: id.clone(),
                created: chrono::Utc::now(),
                size: 1 << 20,
                state: SnapshotState::Ready,
                changed: Some(vec![x(i as u64 * 65536, 65536)]),
                inherited: vec![],
                for_clone: None,
            })
            .collect();
        (r, ids)
    }

    #[test]
    fn delete_middle_commits_next_layer_down() {
        let (r, ids) = chain();
        let p = plan_delete(&r, &ids[1]).unwrap();
        assert_eq!(
            p,
            DeletePlan::Commit {
                top: 2,
                base: 1,
                active: false
            }
        );
        let after = apply_delete(&r, &ids[1], &p).unwrap();
        assert_eq!(after.layers.len(), 3);
        assert_eq!(after.layers[1].sealed_by.as_ref(), Some(&ids[2]));
        // S3's record now covers what S2's did: delta(S1,S3) is unchanged.
        assert_eq!(delta(&r, &ids[0], &ids[2]).unwrap(), vec![x(65536, 131072)]);
        assert_eq!(
            delta(&after, &ids[0], &ids[2]).unwrap(),
            vec![x(65536, 131072)]
        );
        assert_eq!(allocated(&after, &ids[2]).unwrap(), vec![x(0, 196608)]);
    }

    #[test]
    fn delete_latest_is_active_commit_and_base_delete_keeps_deltas() {
        let (r, ids) = chain();
        let p = plan_delete(&r, &ids[2]).unwrap();
        assert_eq!(
            p,
            DeletePlan::Commit {
                top: 3,
                base: 2,
                active: true
            }
        );
        let after = apply_delete(&r, &ids[2], &p).unwrap();
        assert!(after.active().is_some());
        assert_eq!(after.active().map(|l| l.seq), Some(2));

        let p0 = plan_delete(&r, &ids[0]).unwrap();
        let after0 = apply_delete(&r, &ids[0], &p0).unwrap();
        assert_eq!(
            delta(&after0, &ids[1], &ids[2]).unwrap(),
            delta(&r, &ids[1], &ids[2]).unwrap()
        );
        assert_eq!(
            allocated(&after0, &ids[2]).unwrap(),
            allocated(&r, &ids[2]).unwrap()
        );
    }

    #[test]
    fn deleted_volume_commits_into_the_older_snapshot_as_an_active_commit() {
        // Volume deleted: the active layer is gone, S3's layer is the top.
        let (mut r, ids) = chain();
        r.deleted = true;
        r.layers.pop();
        // The top of the chain is committed: QEMU runs an active commit.
        let p = plan_delete(&r, &ids[1]).unwrap();
        assert_eq!(
            p,
            DeletePlan::Commit {
                top: 2,
                base: 1,
                active: true
            }
        );
        let after = apply_delete(&r, &ids[1], &p).unwrap();
        assert_eq!(after.layers.len(), 2);
        assert_eq!(after.layers[1].sealed_by.as_ref(), Some(&ids[2]));
        assert!(after.active().is_none() && after.in_flight.is_none());
        assert_eq!(
            allocated(&after, &ids[2]).unwrap(),
            allocated(&r, &ids[2]).unwrap()
        );
        // Lower layers stay non-active commits.
        assert_eq!(
            plan_delete(&r, &ids[0]).unwrap(),
            DeletePlan::Commit {
                top: 1,
                base: 0,
                active: false
            }
        );
        // The topmost snapshot of a deleted volume is simply dropped, and
        // then the last one too.
        let p = plan_delete(&after, &ids[2]).unwrap();
        assert_eq!(p, DeletePlan::DropTop { layer: 1 });
        let after = apply_delete(&after, &ids[2], &p).unwrap();
        assert_eq!(
            plan_delete(&after, &ids[0]).unwrap(),
            DeletePlan::DropTop { layer: 0 }
        );
    }

    #[test]
    fn deleting_the_latest_seals_internally_then_commits_non_active() {
        let (r, ids) = chain();
        // Latest snapshot: the plan would commit the active layer.
        let p = plan_delete(&r, &ids[2]).unwrap();
        assert!(needs_seal(&r, &p));
        let sealed = seal_internal(&r, 9, &[x(5 * 65536, 65536)]).unwrap();
        assert_eq!(sealed.active().map(|l| l.seq), Some(9));
        assert_eq!(sealed.layers[3].sealed_by, None);
        assert_eq!(sealed.next_layer_seq, 10);
        let p = plan_delete(&sealed, &ids[2]).unwrap();
        assert_eq!(
            p,
            DeletePlan::Commit {
                top: 3,
                base: 2,
                active: false
            }
        );
        assert!(!needs_seal(&sealed, &p));
        let after = apply_delete(&sealed, &ids[2], &p).unwrap();
        assert_eq!(
            after.layers.iter().map(|l| l.seq).collect::<Vec<_>>(),
            vec![0, 1, 2, 9]
        );
        assert_eq!(after.layers[2].sealed_by, None);
        // The deleted snapshot's and the sealed layer's writes wait for the
        // next snapshot's record.
        assert_eq!(
            after.inherited,
            vec![x(2 * 65536, 65536), x(5 * 65536, 65536)]
        );
        // Deleting S2 now merges the internal layer down; its record joins.
        let p = plan_delete(&after, &ids[1]).unwrap();
        assert_eq!(
            p,
            DeletePlan::Commit {
                top: 2,
                base: 1,
                active: false
            }
        );
        let after2 = apply_delete(&after, &ids[1], &p).unwrap();
        assert_eq!(
            after2.layers.iter().map(|l| l.seq).collect::<Vec<_>>(),
            vec![0, 1, 9]
        );
        assert_eq!(
            after2.inherited,
            vec![x(65536, 2 * 65536), x(5 * 65536, 65536)]
        );
        // Deleting S1 (latest, internal layer between it and the active
        // one): no active commit, internal layers fold into the base.
        let p = plan_delete(&after2, &ids[0]).unwrap();
        assert!(!needs_seal(&after2, &p));
        let after3 = apply_delete(&after2, &ids[0], &p).unwrap();
        assert_eq!(
            after3.layers.iter().map(|l| l.seq).collect::<Vec<_>>(),
            vec![0, 9]
        );
        // A deleted volume keeps the active commit (nobody writes).
        let mut dead = r.clone();
        dead.deleted = true;
        dead.layers.pop();
        let p = plan_delete(&dead, &ids[1]).unwrap();
        assert!(!needs_seal(&dead, &p));
    }

    #[test]
    fn internal_layers_below_the_snapshot_join_the_commit() {
        // base(int) <- L1(S) <- L2 active: sealed, then one commit of the
        // sealed layer and S's layer into the internal base.
        let mut r = VolumeRecord::new(VolumeId::generate(), 1 << 20);
        let s = SnapshotId::generate();
        r.layers = vec![
            Layer {
                seq: 0,
                sealed_by: None,
            },
            Layer {
                seq: 1,
                sealed_by: Some(s.clone()),
            },
            Layer {
                seq: 2,
                sealed_by: None,
            },
        ];
        r.next_layer_seq = 3;
        r.snapshots = vec![SnapshotRecord {
            id: s.clone(),
            created: chrono::Utc::now(),
            size: 1 << 20,
            state: SnapshotState::Ready,
            changed: Some(vec![x(0, 65536)]),
            inherited: vec![],
            for_clone: None,
        }];
        let sealed = seal_internal(&r, 3, &[]).unwrap();
        let p = plan_delete(&sealed, &s).unwrap();
        assert_eq!(
            p,
            DeletePlan::Commit {
                top: 2,
                base: 0,
                active: false
            }
        );
        let after = apply_delete(&sealed, &s, &p).unwrap();
        assert_eq!(
            after.layers.iter().map(|l| l.seq).collect::<Vec<_>>(),
            vec![0, 3]
        );
        assert!(after.layers.iter().all(|l| l.sealed_by.is_none()));
        assert_eq!(after.inherited, vec![x(0, 65536)]);
    }

    #[test]
    fn stream_plan_drops_the_snapshot_layer_and_keeps_deltas() {
        let (r, ids) = chain();
        let p = plan_delete_with(&r, &ids[1], MergeMode::Stream).unwrap();
        assert_eq!(
            p,
            DeletePlan::Stream {
                into: 2,
                removed: 1,
                base: Some(0)
            }
        );
        let after = apply_delete(&r, &ids[1], &p).unwrap();
        assert_eq!(
            after.layers.iter().map(|l| l.seq).collect::<Vec<_>>(),
            vec![0, 2, 3]
        );
        assert_eq!(after.layers[1].sealed_by.as_ref(), Some(&ids[2]));
        assert_eq!(
            delta(&after, &ids[0], &ids[2]).unwrap(),
            delta(&r, &ids[0], &ids[2]).unwrap()
        );
        let p0 = plan_delete_with(&r, &ids[0], MergeMode::Stream).unwrap();
        assert_eq!(
            p0,
            DeletePlan::Stream {
                into: 1,
                removed: 0,
                base: None
            }
        );
    }

    #[test]
    fn touches_names_the_layers_a_plan_writes_or_drops() {
        let c = DeletePlan::Commit {
            top: 2,
            base: 1,
            active: false,
        };
        assert!(touches(&c, 1) && touches(&c, 2) && !touches(&c, 0));
        let st = DeletePlan::Stream {
            into: 2,
            removed: 1,
            base: Some(0),
        };
        assert!(touches(&st, 1) && touches(&st, 2) && !touches(&st, 0));
        assert!(touches(&DeletePlan::DropTop { layer: 3 }, 3));
    }

    #[test]
    fn seal_makes_the_overlay_active() {
        let (r, _) = chain();
        let s = SnapshotId::generate();
        let p = PendingSnapshot {
            snapshot: s.clone(),
            overlay: 9,
            created: chrono::Utc::now(),
            for_clone: None,
        };
        let mut with = r.clone();
        with.pending_snapshot = Some(p.clone());
        let after = seal(&with, &p).unwrap();
        assert_eq!(after.layers[3].sealed_by.as_ref(), Some(&s));
        assert_eq!(after.active().map(|l| l.seq), Some(9));
        assert_eq!(after.next_layer_seq, 10);
        assert!(after.pending_snapshot.is_none());
        assert_eq!(after.snapshot(&s).and_then(|x| x.changed.clone()), None);
        // A volume without an active layer cannot be sealed.
        let mut dead = r.clone();
        dead.layers.pop();
        assert!(seal(&dead, &p).is_err());
        // A hidden base keeps its mark through the seal, also when recovery
        // rolls the intent forward.
        let clone = VolumeId::generate();
        let marked = PendingSnapshot {
            for_clone: Some(clone.clone()),
            ..p.clone()
        };
        with.pending_snapshot = Some(marked.clone());
        let after = seal(&with, &marked).unwrap();
        assert_eq!(
            after.snapshot(&s).and_then(|x| x.for_clone.clone()),
            Some(clone)
        );
    }

    #[test]
    fn revert_puts_a_new_layer_on_the_latest_snapshot_and_keeps_every_snapshot() {
        let (mut r, ids) = chain();
        r.inherited = vec![x(9 * 65536, 65536)];
        r.next_layer_seq = 4;
        // Oldest snapshot: a difference layer on S3's layer.
        let p = plan_revert(&r, &ids[0]).unwrap();
        assert_eq!(
            p,
            RevertPlan {
                onto: ids[2].clone(),
                snap_layer: 0,
                onto_layer: 2,
                diff: true
            }
        );
        let pending = PendingRevert {
            snapshot: ids[0].clone(),
            onto: ids[2].clone(),
            layer: 4,
            built: true,
        };
        let mut with = r.clone();
        with.pending_revert = Some(pending.clone());
        with.next_layer_seq = 5;
        let (after, gone) = apply_revert(&with, &pending).unwrap();
        assert_eq!(gone, vec![3]);
        assert_eq!(
            after.layers.iter().map(|l| l.seq).collect::<Vec<_>>(),
            vec![0, 1, 2, 4]
        );
        assert_eq!(after.active().map(|l| l.seq), Some(4));
        assert_eq!(after.snapshots, r.snapshots, "every snapshot kept");
        assert!(after.inherited.is_empty() && after.pending_revert.is_none());
        assert_eq!(after.next_layer_seq, 5);
        // Deltas between the kept snapshots are untouched.
        assert_eq!(
            delta(&after, &ids[0], &ids[2]).unwrap(),
            delta(&r, &ids[0], &ids[2]).unwrap()
        );
        // The latest snapshot: an empty layer, no difference to build.
        assert!(!plan_revert(&r, &ids[2]).unwrap().diff);
        // Internal layers above the latest snapshot go with the active one.
        let sealed = seal_internal(&r, 7, &[]).unwrap();
        let p2 = PendingRevert {
            snapshot: ids[1].clone(),
            onto: ids[2].clone(),
            layer: 8,
            built: true,
        };
        let (after, gone) = apply_revert(&sealed, &p2).unwrap();
        assert_eq!(gone, vec![7, 3]);
        assert_eq!(
            after.layers.iter().map(|l| l.seq).collect::<Vec<_>>(),
            vec![0, 1, 2, 8]
        );
    }

    #[test]
    fn revert_is_refused_for_unknown_deleting_and_stale_intents() {
        let (mut r, ids) = chain();
        assert!(matches!(
            plan_revert(&r, &SnapshotId::generate()),
            Err(PlanError::SnapshotNotFound(_))
        ));
        // Built against S3, but S3 is gone meanwhile: never switch.
        let p = PendingRevert {
            snapshot: ids[0].clone(),
            onto: ids[1].clone(),
            layer: 9,
            built: true,
        };
        assert!(matches!(
            apply_revert(&r, &p),
            Err(PlanError::Inconsistent(_))
        ));
        r.snapshots[2].state = SnapshotState::Deleting;
        assert!(matches!(
            plan_revert(&r, &ids[0]),
            Err(PlanError::SnapshotDeleting(_))
        ));
        r.snapshots[0].state = SnapshotState::Deleting;
        assert!(matches!(
            plan_revert(&r, &ids[0]),
            Err(PlanError::SnapshotDeleting(_))
        ));
        let (mut dead, ids) = chain();
        dead.deleted = true;
        dead.layers.pop();
        assert!(plan_revert(&dead, &ids[0]).is_err());
    }

    #[test]
    fn delta_rejects_wrong_order_unknown_and_deleting() {
        let (mut r, ids) = chain();
        assert!(matches!(
            delta(&r, &ids[2], &ids[0]),
            Err(PlanError::NotOlder { .. })
        ));
        let other = SnapshotId::generate();
        assert!(matches!(
            delta(&r, &other, &ids[0]),
            Err(PlanError::SnapshotNotFound(_))
        ));
        // A base being deleted still answers: its merge moves data between
        // layers, the extent records change only when it is gone.
        r.snapshots[0].state = SnapshotState::Deleting;
        assert_eq!(delta(&r, &ids[0], &ids[1]).unwrap(), vec![x(65536, 65536)]);
        // A target being deleted does not: it is no point in time any more.
        assert!(matches!(
            delta(&r, &ids[1], &ids[0]),
            Err(PlanError::SnapshotDeleting(_))
        ));
        r.snapshots[2].state = SnapshotState::Deleting;
        assert!(matches!(
            delta(&r, &ids[1], &ids[2]),
            Err(PlanError::SnapshotDeleting(_))
        ));
    }
}
