//! Reverting a volume to any of its snapshots, keeping every snapshot.
//!
//! The chain stays linear and no existing layer is ever written: a new
//! active layer N goes on the *latest* snapshot's layer, holding exactly the
//! clusters where the target snapshot's view differs from the latest
//! snapshot's view (built offline by `qemu-img rebase` in safe mode from
//! sealed, flushed layers only). The old active layer, whose writes the
//! revert discards, goes with any internal layers above the latest
//! snapshot's layer. Every snapshot keeps its layer, so its export, its
//! clones and its extent records are untouched, and the next snapshot's
//! extent record (N's allocation map) is exactly "changed since the latest
//! snapshot". Reverting to the latest snapshot is the same operation with
//! nothing to compare: N is empty.
//!
//! Steps, each durable before the next (see `recover::resolve_revert`):
//! 1. intent `pendingRevert {snapshot, onto, layer}` saved before N exists;
//! 2. N's file created and filled, synced;
//! 3. intent marked `built` (saved): from here the revert rolls forward;
//! 4. N's node added on the latest snapshot's node, then the record names N
//!    as the active layer (the switch; the intent goes in the same save);
//! 5. the old active layer and the internal layers above the latest
//!    snapshot's layer are deleted (orphans if we crash: swept).

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::engine::{Engine, Result, node_add_args, remove_file_if_exists};
use super::record::{ExportTarget, SnapshotState, VolumeRecord};
use super::types::{VolumeInfo, info};
use super::{plan, qemu_img, record, recover};
use crate::error::EngineError;
use crate::failpoint;
use livedisk_common::{SnapshotId, VolumeId};
use record::PendingRevert;
use recover::{RevertEvidence, RevertResolution};

impl Engine {
    /// Reverts a detached volume to any of its snapshots (FAILED_PRECONDITION
    /// while attached: the consumer would see its disk change under it).
    /// Writes since the latest snapshot are discarded; every snapshot stays
    /// readable, exportable, restorable and deletable. The volume keeps its
    /// current size (bytes beyond the snapshot's size read as zeros).
    /// Idempotent: a retry finishes or undoes an interrupted attempt first.
    pub async fn revert_volume(&self, id: &VolumeId, snap: &SnapshotId) -> Result<VolumeInfo> {
        let _g = self.locks.try_lock(id)?;
        self.refuse_if_migrating(id)?;
        let rec = self.load_live(id)?;
        if rec.exports.iter().any(|e| e.target == ExportTarget::Volume) {
            return Err(EngineError::FailedPrecondition(format!(
                "volume {id} is attached; detach it before reverting"
            )));
        }
        let Some(s) = rec.snapshot(snap) else {
            return Err(match self.locate(snap) {
                Ok(other) => EngineError::InvalidArgument(format!(
                    "snapshot {snap} belongs to volume {}, not to {id}",
                    other.id
                )),
                Err(e) => e,
            });
        };
        if s.state != SnapshotState::Ready {
            return Err(plan::PlanError::SnapshotDeleting(snap.clone()).into());
        }
        if rec.in_flight.is_some() || rec.pending_snapshot.is_some() {
            return Err(EngineError::Busy(format!(
                "volume {id} (operation in flight)"
            )));
        }
        // An earlier attempt that failed after its intent (in this or a
        // killed process): finish or undo it first. Rolled forward to this
        // very snapshot, the volume already is what was asked for.
        if let Some(p) = rec.pending_revert.clone() {
            let done = self.resolve_pending_revert(id).await?;
            if done == RevertResolution::RollForward && &p.snapshot == snap {
                return Ok(info(&self.load_live(id)?));
            }
        }
        let mut rec = self.load_live(id)?;
        self.refuse_if_remote_clone(&rec, "it can be reverted")?;
        let plan = plan::plan_revert(&rec, snap)?;
        // A clone's flatten job writes its bottom layer, which N's
        // difference is computed through: paused (cancelled; a stream
        // skips what it already copied) until the switch.
        let reflatten = rec.clone_of.is_some();
        if reflatten {
            self.stop_flatten(&rec).await?;
        }
        let r = self.revert_steps(&mut rec, snap, &plan).await;
        if reflatten {
            self.restart_flattens(std::slice::from_ref(id)).await;
        }
        r?;
        Ok(info(&self.load_live(id)?))
    }

    async fn revert_steps(
        &self,
        rec: &mut VolumeRecord,
        snap: &SnapshotId,
        plan: &plan::RevertPlan,
    ) -> Result<()> {
        let dir = self.vol_dir(&rec.id);
        // 1. The intent, durable before N's file exists.
        let n = rec.next_layer_seq;
        rec.next_layer_seq = n + 1;
        rec.pending_revert = Some(PendingRevert {
            snapshot: snap.clone(),
            onto: plan.onto.clone(),
            layer: n,
            built: false,
        });
        self.store.save(rec)?;
        // 2. N, complete and on disk.
        let file = dir.join(VolumeRecord::layer_file(n));
        let onto_seq = rec.layers[plan.onto_layer].seq;
        let built = async {
            if plan.diff {
                qemu_img::create(&file, rec.size, None).await?;
                failpoint::hit("revert-before-rebase", self.daemon().pid);
                let view = self.chain_files(rec, plan.snap_layer)?;
                let onto = self.chain_files(rec, plan.onto_layer)?;
                let view: Vec<&Path> = view.iter().map(PathBuf::as_path).collect();
                let onto: Vec<&Path> = onto.iter().map(PathBuf::as_path).collect();
                qemu_img::build_difference(
                    &file,
                    &view,
                    &onto,
                    &VolumeRecord::layer_file(onto_seq),
                )
                .await?;
            } else {
                // The latest snapshot: nothing differs, N stays empty.
                qemu_img::create(&file, rec.size, Some(&VolumeRecord::layer_file(onto_seq)))
                    .await?;
                qemu_img::sync_file(&file).await?;
            }
            Ok::<(), EngineError>(())
        }
        .await;
        if let Err(e) = built {
            // Nothing switched and nothing names N: undo here.
            self.abandon_revert(rec).await?;
            return Err(e);
        }
        failpoint::hit("revert-before-built", self.daemon().pid);
        // 3. Point of no return.
        if let Some(p) = rec.pending_revert.as_mut() {
            p.built = true;
        }
        self.store.save(rec)?;
        failpoint::hit("revert-after-built", self.daemon().pid);
        // 4. + 5.
        self.switch_revert(rec).await?;
        Ok(())
    }

    /// Step 4 and 5 for a built revert (also recovery's roll-forward): N's
    /// node on the latest snapshot's node (unless the daemon does not hold
    /// that node: restarted, then `reconcile` adds the chain from the
    /// record), the record naming N, then the old layers dropped.
    async fn switch_revert(&self, rec: &VolumeRecord) -> Result<VolumeRecord> {
        let p = rec
            .pending_revert
            .clone()
            .ok_or_else(|| plan::PlanError::Inconsistent("revert intent lost".into()))?;
        let (after, gone) = plan::apply_revert(rec, &p)?;
        let dir = self.vol_dir(&rec.id);
        let nodes = self.named_nodes().await?;
        let below = after
            .layers
            .len()
            .checked_sub(2)
            .map(|i| rec.node_name(after.layers[i].seq))
            .ok_or_else(|| plan::PlanError::Inconsistent("no layer below".into()))?;
        let top = rec.node_name(p.layer);
        if !nodes.contains(&top) && nodes.contains(&below) {
            self.qmp
                .execute(
                    "blockdev-add",
                    node_add_args(&dir, rec, p.layer, Value::String(below)),
                )
                .await?;
        }
        self.store.save(&after)?;
        failpoint::hit("revert-after-switch", self.daemon().pid);
        // Top first: each node is the backing of the one above it.
        for seq in gone {
            self.blockdev_del(&rec.node_name(seq)).await?;
            self.reclaim
                .file(&dir.join(VolumeRecord::layer_file(seq)))?;
        }
        Ok(after)
    }

    /// Decides a revert left pending (see `recover::resolve_revert`), under
    /// the volume's lock: at `open`, and before any other operation on the
    /// volume (so a revert interrupted in another process never blocks the
    /// volume until the next restart).
    pub(super) async fn resolve_pending_revert(&self, id: &VolumeId) -> Result<RevertResolution> {
        let Some(rec) = self.store.load(id)? else {
            return Ok(RevertResolution::RollBack);
        };
        let Some(p) = rec.pending_revert.clone() else {
            return Ok(RevertResolution::RollBack);
        };
        let file = self.vol_dir(id).join(VolumeRecord::layer_file(p.layer));
        let evidence = RevertEvidence {
            built: p.built,
            layer_valid: p.built && qemu_img::is_qcow2(&file).await?,
        };
        let mut decision = recover::resolve_revert(evidence);
        tracing::info!(volume = %id, snapshot = %p.snapshot, ?evidence, ?decision, "interrupted revert");
        if decision == RevertResolution::RollForward {
            match self.switch_revert(&rec).await {
                Ok(_) => return Ok(decision),
                // The latest snapshot changed since N was built (cannot
                // happen while every operation resolves the intent first):
                // N's difference would be wrong, and the old layers are all
                // there, so the revert is undone instead.
                Err(EngineError::Plan(e)) => {
                    tracing::warn!(volume = %id, error = %e, "revert cannot roll forward; rolling back");
                    decision = RevertResolution::RollBack;
                }
                Err(e) => return Err(e),
            }
        }
        let mut rec = rec;
        self.abandon_revert(&mut rec).await?;
        Ok(decision)
    }

    /// Undoes a revert that did not switch: drops its new layer (node and
    /// file; either may not exist yet), then the intent.
    async fn abandon_revert(&self, rec: &mut VolumeRecord) -> Result<()> {
        if let Some(p) = rec.pending_revert.take() {
            self.blockdev_del(&rec.node_name(p.layer)).await?;
            remove_file_if_exists(
                &self
                    .vol_dir(&rec.id)
                    .join(VolumeRecord::layer_file(p.layer)),
            )?;
        }
        self.store.save(rec)?;
        Ok(())
    }

    /// The volume's record as the other operations start from it, right
    /// after taking the volume's lock: a revert left pending (by another
    /// process) is decided first, so it never blocks the volume until the
    /// next restart. `rec` was loaded under the lock.
    pub(super) async fn settled(&self, rec: VolumeRecord) -> Result<VolumeRecord> {
        if rec.pending_revert.is_none() {
            return Ok(rec);
        }
        self.resolve_pending_revert(&rec.id).await?;
        self.load(&rec.id)
    }
}
