//! Tombstones: what a deleted snapshot leaves in its volume's record so
//! that changed blocks *from* it stay exact (design decision 3). Backup
//! tools keep only the ID of the snapshot they backed up last and delete
//! that snapshot once the next one exists; their next incremental backup
//! asks for the changes since the deleted ID.
//!
//! A tombstone answers only as the base of a delta. Everything else (get,
//! list, restore, allocated extents, a delta's target) finds no snapshot.
//! Pure functions over the record; the merge applies them in the same
//! atomic save that removes the snapshot, so a crash leaves either the
//! snapshot (which answers while it is being deleted) or its tombstone.

use super::plan::PlanError;
use super::record::{SnapshotRecord, Tombstone, VolumeRecord};
use crate::extents;

/// Most tombstones a volume keeps. A backup tool that rotates snapshots
/// (take the next, delete the last) never deletes the newest one, so without
/// a cap a volume would gather one tombstone per backup forever, each holding
/// every write since its deletion, in a record rewritten by every operation.
/// The tombstones of the snapshots taken longest ago go first: a tool asks
/// from the snapshot it backed up last. One that asks from an older one gets
/// `NOT_FOUND`, as for any unknown base, and takes a full backup.
pub const MAX_TOMBSTONES: usize = 16;

/// The tombstones once `removed` is deleted; `next` is the oldest live
/// snapshot after it, with its extent record as it was before `removed`'s
/// was folded into it.
///
/// * Tombstones bounded by `removed` move to `next`, taking `next`'s record
///   into theirs: they now end where `next` does.
/// * `removed` leaves a tombstone holding `next`'s record, unless it is a
///   hidden base (nobody outside the engine knows its ID).
/// * Without a later snapshot (`next` is `None`) the tombstones bounded by
///   `removed` go and `removed` leaves none: a deleted base answers while a
///   later snapshot exists. Keeping them until the next snapshot seals would
///   need the writes of the active layer, which no record holds yet.
/// * An uncaptured `next` (never the case after a merge, which captures
///   first) cannot bound anything exactly: those go too rather than answer
///   wrongly.
pub fn after_delete(
    tombstones: &[Tombstone],
    removed: &SnapshotRecord,
    next: Option<&SnapshotRecord>,
) -> Vec<Tombstone> {
    let bound = next.and_then(|n| n.changed.as_ref().map(|c| (n, c)));
    let mut out = Vec::with_capacity(tombstones.len() + 1);
    for t in tombstones {
        if t.id == removed.id {
            continue;
        }
        if t.before != removed.id {
            out.push(t.clone());
        } else if let Some((n, changed)) = bound {
            out.push(Tombstone {
                id: t.id.clone(),
                created: t.created,
                before: n.id.clone(),
                changed: extents::union([t.changed.as_slice(), changed.as_slice()]),
            });
        }
    }
    if let Some((n, changed)) = bound
        && removed.for_clone.is_none()
    {
        out.push(Tombstone {
            id: removed.id.clone(),
            created: removed.created,
            before: n.id.clone(),
            changed: changed.clone(),
        });
    }
    if out.len() > MAX_TOMBSTONES {
        // Oldest first (stable: equal times keep their order), then drop from the front.
        out.sort_by_key(|t| t.created);
        out.drain(..out.len() - MAX_TOMBSTONES);
    }
    out
}

/// Index in `rec.snapshots` of the live snapshot that bounds `t`.
pub fn boundary(rec: &VolumeRecord, t: &Tombstone) -> Result<usize, PlanError> {
    rec.snapshot_index(&t.before).ok_or_else(|| {
        PlanError::Inconsistent(format!(
            "tombstone {} is bounded by {}, which is not a snapshot",
            t.id, t.before
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::extents::Extent;
    use crate::qcow2::plan::{
        DeletePlan, allocated, apply_delete, delta, needs_seal, plan_delete, plan_delete_with,
        seal, seal_internal,
    };
    use crate::qcow2::record::{Layer, MergeMode, PendingSnapshot, SnapshotState};
    use livedisk_common::{SnapshotId, VolumeId};

    const C: u64 = 65536;

    fn x(offset: u64, length: u64) -> Extent {
        Extent { offset, length }
    }

    /// `n` snapshots over layers 0..n, active layer n; snapshot k's record
    /// is cluster k alone (what a writer wrote between k-1 and k).
    fn chain(n: u64) -> (VolumeRecord, Vec<SnapshotId>) {
        let mut r = VolumeRecord::new(VolumeId::generate(), 1 << 20);
        let ids: Vec<_> = (0..n).map(|_| SnapshotId::generate()).collect();
        r.layers = (0..=n)
            .map(|i| Layer {
                seq: i,
                sealed_by: ids.get(i as usize).cloned(),
            })
            .collect();
        r.next_layer_seq = n + 1;
        r.snapshots = ids
            .iter()
            .enumerate()
            .map(|(i, id)| SnapshotRecord {
                id: id.clone(),
                created: chrono::Utc::now(),
                size: 1 << 20,
                state: SnapshotState::Ready,
                changed: Some(vec![x(i as u64 * C, C)]),
                inherited: vec![],
                for_clone: None,
            })
            .collect();
        (r, ids)
    }

    /// Deletes `snap` the way the merge does: sealing the active layer
    /// internally first when the plan would commit it.
    fn delete(r: &VolumeRecord, snap: &SnapshotId, mode: MergeMode) -> VolumeRecord {
        let mut p = plan_delete_with(r, snap, mode).unwrap();
        let mut r = r.clone();
        if needs_seal(&r, &p) {
            r = seal_internal(&r, r.next_layer_seq, &[]).unwrap();
            p = plan_delete_with(&r, snap, mode).unwrap();
        }
        apply_delete(&r, snap, &p).unwrap()
    }

    #[test]
    fn a_deleted_base_answers_exactly_until_no_later_snapshot_is_left() {
        let (r, ids) = chain(3);
        let r = delete(&r, &ids[0], MergeMode::Commit);
        // Gone for everything but a delta's base.
        assert!(r.snapshot(&ids[0]).is_none());
        assert!(matches!(
            allocated(&r, &ids[0]),
            Err(PlanError::SnapshotNotFound(_))
        ));
        assert!(matches!(
            delta(&r, &ids[1], &ids[0]),
            Err(PlanError::SnapshotNotFound(_))
        ));
        // Exactly what was written after it, not what its successor's
        // record holds now (its writes and the deleted one's).
        assert_eq!(delta(&r, &ids[0], &ids[1]).unwrap(), vec![x(C, C)]);
        assert_eq!(delta(&r, &ids[0], &ids[2]).unwrap(), vec![x(C, 2 * C)]);
        assert_eq!(allocated(&r, &ids[1]).unwrap(), vec![x(0, 2 * C)]);
        // Its boundary goes: the tombstone moves on to the next snapshot.
        let r = delete(&r, &ids[1], MergeMode::Commit);
        assert_eq!(r.tombstones.len(), 2);
        assert!(r.tombstones.iter().all(|t| t.before == ids[2]));
        assert_eq!(delta(&r, &ids[0], &ids[2]).unwrap(), vec![x(C, 2 * C)]);
        assert_eq!(delta(&r, &ids[1], &ids[2]).unwrap(), vec![x(2 * C, C)]);
        // A snapshot taken later extends it.
        let s3 = SnapshotId::generate();
        let p = PendingSnapshot {
            snapshot: s3.clone(),
            overlay: r.next_layer_seq,
            created: chrono::Utc::now(),
            for_clone: None,
        };
        let mut r = seal(&r, &p).unwrap();
        if let Some(s) = r.snapshots.iter_mut().find(|s| s.id == s3) {
            s.changed = Some(vec![x(9 * C, C)]);
        }
        assert_eq!(
            delta(&r, &ids[0], &s3).unwrap(),
            vec![x(C, 2 * C), x(9 * C, C)]
        );
        // Deleting the newest while an older one is left keeps them.
        let r = delete(&r, &s3, MergeMode::Commit);
        assert_eq!(r.tombstones.len(), 2);
        // No later snapshot left: the tombstones go, with the last one.
        let r = delete(&r, &ids[2], MergeMode::Commit);
        assert!(r.tombstones.is_empty() && r.snapshots.is_empty());
        assert!(matches!(
            delta(&r, &ids[0], &ids[2]),
            Err(PlanError::SnapshotNotFound(_))
        ));
    }

    #[test]
    fn a_tombstone_is_no_later_than_its_boundary() {
        let (r, ids) = chain(3);
        let r = delete(&r, &ids[1], MergeMode::Stream);
        assert_eq!(delta(&r, &ids[1], &ids[2]).unwrap(), vec![x(2 * C, C)]);
        assert!(matches!(
            delta(&r, &ids[1], &ids[0]),
            Err(PlanError::NotOlder { .. })
        ));
        // A target being deleted does not answer, whatever the base.
        let mut deleting = r.clone();
        deleting.snapshots[1].state = SnapshotState::Deleting;
        assert!(matches!(
            delta(&deleting, &ids[1], &ids[2]),
            Err(PlanError::SnapshotDeleting(_))
        ));
        // A record naming a missing boundary is inconsistent, never empty.
        let mut broken = r.clone();
        broken.tombstones[0].before = SnapshotId::generate();
        assert!(matches!(
            delta(&broken, &ids[1], &ids[2]),
            Err(PlanError::Inconsistent(_))
        ));
    }

    #[test]
    fn hidden_bases_and_uncaptured_successors_leave_no_tombstone() {
        let (mut r, ids) = chain(3);
        r.snapshots[0].for_clone = Some(VolumeId::generate());
        let after = delete(&r, &ids[0], MergeMode::Commit);
        assert!(after.tombstones.is_empty());
        let (mut r, ids) = chain(3);
        r = delete(&r, &ids[0], MergeMode::Commit);
        r.snapshots[1].changed = None;
        let after = delete(&r, &ids[1], MergeMode::Commit);
        assert!(after.tombstones.is_empty(), "{:?}", after.tombstones);
    }

    #[test]
    fn tombstones_outlive_the_volume_while_its_later_snapshots_do() {
        let (mut r, ids) = chain(3);
        r = delete(&r, &ids[0], MergeMode::Commit);
        // The volume deleted: its active layer goes, its snapshots stay.
        r.deleted = true;
        r.layers.pop();
        assert_eq!(delta(&r, &ids[0], &ids[2]).unwrap(), vec![x(C, 2 * C)]);
        let p = plan_delete(&r, &ids[2]).unwrap();
        assert_eq!(p, DeletePlan::DropTop { layer: 2 });
        let r = apply_delete(&r, &ids[2], &p).unwrap();
        assert_eq!(delta(&r, &ids[0], &ids[1]).unwrap(), vec![x(C, C)]);
        let p = plan_delete(&r, &ids[1]).unwrap();
        let r = apply_delete(&r, &ids[1], &p).unwrap();
        assert!(r.tombstones.is_empty() && r.snapshots.is_empty());
    }

    #[test]
    fn a_reused_id_names_the_live_snapshot() {
        let (r, ids) = chain(2);
        let r = delete(&r, &ids[0], MergeMode::Commit);
        let p = PendingSnapshot {
            snapshot: ids[0].clone(),
            overlay: r.next_layer_seq,
            created: chrono::Utc::now(),
            for_clone: None,
        };
        let r = seal(&r, &p).unwrap();
        assert!(r.tombstone(&ids[0]).is_none());
        assert!(r.snapshot(&ids[0]).is_some());
    }

    #[test]
    fn a_rotating_backup_keeps_the_newest_tombstones_only() {
        // Take the next snapshot, delete the previous: the newest snapshot
        // is never deleted, so tombstones would pile up without the cap.
        let (mut r, ids) = chain(1);
        let mut all = ids.clone();
        let base = chrono::Utc::now();
        r.snapshots[0].created = base;
        for k in 1..=(MAX_TOMBSTONES as i64 + 5) {
            let s = SnapshotId::generate();
            let p = PendingSnapshot {
                snapshot: s.clone(),
                overlay: r.next_layer_seq,
                created: base + chrono::Duration::seconds(k),
                for_clone: None,
            };
            r = seal(&r, &p).unwrap();
            if let Some(rec) = r.snapshots.iter_mut().find(|x| x.id == s) {
                rec.changed = Some(vec![x(k as u64 * C, C)]);
            }
            let prev = all.last().unwrap().clone();
            r = delete(&r, &prev, MergeMode::Commit);
            all.push(s);
        }
        assert_eq!(r.tombstones.len(), MAX_TOMBSTONES);
        let newest = &all[all.len() - 2];
        let latest = all.last().unwrap();
        // The last base a tool backed up answers exactly; the oldest are gone.
        assert_eq!(
            delta(&r, newest, latest).unwrap(),
            vec![x((all.len() as u64 - 1) * C, C)]
        );
        assert!(r.tombstone(&all[0]).is_none());
        assert!(matches!(
            delta(&r, &all[0], latest),
            Err(PlanError::SnapshotNotFound(_))
        ));
        let oldest_kept = &all[all.len() - 1 - MAX_TOMBSTONES];
        assert_eq!(
            delta(&r, oldest_kept, latest).unwrap(),
            vec![x(
                (all.len() - MAX_TOMBSTONES) as u64 * C,
                MAX_TOMBSTONES as u64 * C
            )]
        );
        assert!(
            r.tombstones
                .windows(2)
                .all(|w| w[0].created <= w[1].created)
        );
    }

    /// Every order of deleting five snapshots (both merge modes): after
    /// each step, the delta from every deleted snapshot that has a later
    /// live one, and between live ones, is exactly the union of the writes
    /// between the two points; every other deleted one is not found.
    #[test]
    fn every_deletion_order_keeps_every_delta_exact() {
        fn permutations(n: usize) -> Vec<Vec<usize>> {
            if n == 0 {
                return vec![vec![]];
            }
            let mut out = vec![];
            for p in permutations(n - 1) {
                for i in 0..=p.len() {
                    let mut q = p.clone();
                    q.insert(i, n - 1);
                    out.push(q);
                }
            }
            out
        }
        let n = 5;
        let mut checked = 0;
        for mode in [MergeMode::Commit, MergeMode::Stream] {
            for order in permutations(n) {
                let (mut r, ids) = chain(n as u64);
                let mut gone = vec![false; n];
                for &d in &order {
                    r = delete(&r, &ids[d], mode);
                    gone[d] = true;
                    for a in 0..n {
                        let newer_live = (a + 1..n).filter(|&b| !gone[b]).collect::<Vec<_>>();
                        if gone[a] && newer_live.is_empty() {
                            assert!(r.tombstone(&ids[a]).is_none(), "{order:?}");
                            continue;
                        }
                        for b in newer_live {
                            let want = vec![x((a as u64 + 1) * C, (b - a) as u64 * C)];
                            assert_eq!(
                                delta(&r, &ids[a], &ids[b]).unwrap(),
                                want,
                                "{mode:?} {order:?} delta({a},{b})"
                            );
                            checked += 1;
                        }
                    }
                }
            }
        }
        assert!(checked > 1000, "{checked}");
    }
}
