//! Live snapshots: one QMP `transaction` per call, across volumes, with a
//! durable intent written before the switch-over.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use super::engine::{Engine, Result, node_add_args, remove_file_if_exists};
use super::merge_pause::{self, MergeAtSnapshot};
use super::record::{InFlight, PendingSnapshot, VolumeRecord};
use super::types::{SnapshotInfo, SnapshotTimings, snap_info};
use super::{plan, qemu_img};
use crate::error::EngineError;
use crate::failpoint;
use livedisk_common::{SnapshotId, VolumeId};

impl Engine {
    // ----- snapshots -------------------------------------------------------

    /// Finds the volume that holds a snapshot by scanning the pool's records.
    pub(super) fn locate(&self, snap: &SnapshotId) -> Result<VolumeRecord> {
        for id in self.store.list()? {
            if let Some(rec) = self.store.load(&id)?
                && rec.snapshot(snap).is_some()
            {
                return Ok(rec);
            }
        }
        Err(EngineError::NotFound(format!("snapshot {snap}")))
    }

    pub async fn create_snapshot(
        &self,
        volume: &VolumeId,
        snap: &SnapshotId,
    ) -> Result<(SnapshotInfo, SnapshotTimings)> {
        let (mut v, t) = self
            .create_snapshots(&[(volume.clone(), snap.clone())])
            .await?;
        let i = v
            .pop()
            .ok_or_else(|| EngineError::NotFound(format!("snapshot {snap}")))?;
        Ok((i, t))
    }

    /// Snapshots several volumes atomically: one QMP `transaction`, so every
    /// volume's point-in-time is the same instant. Idempotent per snapshot.
    pub async fn create_snapshots(
        &self,
        pairs: &[(VolumeId, SnapshotId)],
    ) -> Result<(Vec<SnapshotInfo>, SnapshotTimings)> {
        let started = Instant::now();
        let mut seen = HashSet::new();
        if pairs.is_empty() || !pairs.iter().all(|(v, _)| seen.insert(v.clone())) {
            return Err(EngineError::InvalidArgument(
                "need at least one volume, each at most once".into(),
            ));
        }
        // Lock in sorted order so two group snapshots cannot deadlock.
        let mut sorted: Vec<_> = pairs.iter().map(|(v, _)| v.clone()).collect();
        sorted.sort();
        let mut guards = vec![];
        for v in &sorted {
            guards.push(self.locks.try_lock(v)?);
        }
        // Every snapshot taken already (a retried call, or a group a sibling's call took):
        // answered as it is, before the checks that only matter for new ones.
        let mut taken = vec![];
        for (v, s) in pairs {
            let rec = self.load(v)?;
            if let Some(sr) = rec.snapshot(s) {
                taken.push(snap_info(&rec, sr));
            }
        }
        if taken.len() == pairs.len() {
            return Ok((
                taken,
                SnapshotTimings {
                    transaction: Duration::ZERO,
                    total: started.elapsed(),
                },
            ));
        }
        for v in &sorted {
            self.refuse_if_migrating(v)?;
        }
        self.check_snapshot_space(pairs)?;
        self.snapshot_locked(pairs, None, started).await
    }

    /// [`Engine::create_snapshots`] once the caller holds every volume's
    /// lock. `for_clone` marks the snapshot as the hidden base of that clone
    /// (`Engine::clone_volume`, one volume only).
    pub(super) async fn snapshot_locked(
        &self,
        pairs: &[(VolumeId, SnapshotId)],
        for_clone: Option<&VolumeId>,
        started: Instant,
    ) -> Result<(Vec<SnapshotInfo>, SnapshotTimings)> {
        let mut recs = vec![];
        let mut existing = 0;
        for (v, s) in pairs {
            let rec = self.settled(self.load_live(v)?).await?;
            if rec.snapshot(s).is_some() {
                existing += 1;
            } else if let Ok(other) = self.locate(s) {
                return Err(EngineError::AlreadyExists(format!(
                    "snapshot {s} (of volume {})",
                    other.id
                )));
            }
            if rec.pending_snapshot.is_some() {
                // Only left by a failure after the switch-over in this
                // process; `open` resolves it.
                return Err(EngineError::FailedPrecondition(format!(
                    "volume {v} has an unresolved snapshot; reopen the engine to recover"
                )));
            }
            recs.push(rec);
        }
        if existing == pairs.len() {
            let infos = pairs
                .iter()
                .zip(&recs)
                .filter_map(|((_, s), r)| r.snapshot(s).map(|sr| snap_info(r, sr)))
                .collect();
            let t = started.elapsed();
            return Ok((
                infos,
                SnapshotTimings {
                    transaction: Duration::ZERO,
                    total: t,
                },
            ));
        }
        if existing != 0 {
            return Err(EngineError::AlreadyExists(
                "some snapshots of this group exist already".into(),
            ));
        }

        // A merge job holding the active layer is stopped for the snapshot and started again
        // after it, whatever the outcome (see `merge_pause.rs`).
        let mut paused = vec![];
        for rec in &recs {
            let job = match &rec.in_flight {
                Some(InFlight::Merge { job, .. }) => self.job_status(job).await?,
                _ => None,
            };
            match merge_pause::merge_at_snapshot(rec, job.as_deref(), for_clone.is_some()) {
                MergeAtSnapshot::Proceed => {}
                MergeAtSnapshot::Wait(why) => {
                    self.resume_merges(&paused).await;
                    return Err(EngineError::Busy(why));
                }
                MergeAtSnapshot::Pause {
                    snapshot,
                    job,
                    mode,
                } => match self.pause_merge(rec, snapshot, job, mode).await {
                    Ok(p) => paused.push(p),
                    Err(e) => {
                        self.resume_merges(&paused).await;
                        return Err(e);
                    }
                },
            }
        }
        let result = self
            .snapshot_transaction(&mut recs, pairs, for_clone, started)
            .await;
        self.resume_merges(&paused).await;
        result
    }

    /// Steps 1 to 3 of a snapshot, once nothing holds the volumes' active layers.
    async fn snapshot_transaction(
        &self,
        recs: &mut [VolumeRecord],
        pairs: &[(VolumeId, SnapshotId)],
        for_clone: Option<&VolumeId>,
        started: Instant,
    ) -> Result<(Vec<SnapshotInfo>, SnapshotTimings)> {
        // 1. The intent, durable before anything else: recovery then knows
        //    an overlay may exist and decides whether writes went to it.
        //    Then new overlay files and nodes, not yet in any chain.
        let now = Utc::now();
        let mut actions = vec![];
        let mut overlays = vec![];
        // QEMU refuses a snapshot of a node a block job works on: a clone
        // whose flatten job still runs on its (active) bottom layer has the
        // job paused by cancelling it, and restarted after the switch on the
        // then sealed layer (a stream skips what it already copied).
        let mut reflatten = vec![];
        for rec in recs.iter() {
            if rec.clone_of.is_some() && rec.layers.len() == 1 {
                self.stop_flatten(rec).await?;
                reflatten.push(rec.id.clone());
            }
        }
        let prepared = self
            .prepare_overlays(recs, pairs, now, for_clone, &mut actions, &mut overlays)
            .await;
        // 2. The switch-over: atomic across all volumes.
        failpoint::hit("snapshot-before-transaction", self.daemon().pid);
        let t0 = Instant::now();
        let tx = match prepared {
            Ok(()) => self
                .qmp
                .execute("transaction", json!({ "actions": actions }))
                .await
                .map_err(EngineError::from),
            Err(e) => Err(e),
        };
        let transaction = t0.elapsed();
        failpoint::hit("snapshot-after-transaction", self.daemon().pid);
        if let Err(e) = tx {
            // A failed transaction changed nothing (QMP transactions are
            // all-or-nothing): undo the overlays and the intents.
            for rec in recs.iter_mut() {
                let Some(p) = rec.pending_snapshot.take() else {
                    continue;
                };
                let _ = self.blockdev_del(&rec.node_name(p.overlay)).await;
                let _ = remove_file_if_exists(
                    &self
                        .vol_dir(&rec.id)
                        .join(VolumeRecord::layer_file(p.overlay)),
                );
                let _ = self.store.save(rec);
            }
            self.restart_flattens(&reflatten).await;
            return Err(e);
        }
        self.restart_flattens(&reflatten).await;
        // 3. The records: the snapshot is durable and returned from here. The
        //    sealed layers' allocation maps become extent records in the
        //    background (`capture.rs`); whatever needs one first captures it.
        let mut infos = vec![];
        for rec in recs.iter_mut() {
            let p = rec
                .pending_snapshot
                .clone()
                .ok_or_else(|| plan::PlanError::Inconsistent("intent lost".into()))?;
            *rec = plan::seal(rec, &p)?;
            self.store.save(rec)?;
            if let Some(s) = rec.snapshots.last() {
                infos.push(snap_info(rec, s));
            }
        }
        // The capture stores without the volumes' locks (see `capture.rs`).
        self.spawn_capture(recs.iter().map(|r| r.id.clone()).collect());
        Ok((
            infos,
            SnapshotTimings {
                transaction,
                total: started.elapsed(),
            },
        ))
    }

    /// Restarts flatten jobs stopped for a snapshot. A failure only delays
    /// the flatten (the next open or `wait_flattened` starts it again).
    pub(super) async fn restart_flattens(&self, ids: &[VolumeId]) {
        for id in ids {
            let r = match self.load(id) {
                Ok(rec) => self.ensure_flatten(&rec).await,
                Err(e) => Err(e),
            };
            if let Err(e) = r {
                tracing::warn!(volume = %id, error = %e, "could not restart the flatten");
            }
        }
    }

    /// Step 1 of a snapshot, per volume: save the intent, create the
    /// overlay file and add its node (not yet in any chain).
    pub(super) async fn prepare_overlays(
        &self,
        recs: &mut [VolumeRecord],
        pairs: &[(VolumeId, SnapshotId)],
        now: DateTime<Utc>,
        for_clone: Option<&VolumeId>,
        actions: &mut Vec<Value>,
        overlays: &mut Vec<u64>,
    ) -> Result<()> {
        for (rec, (_, snap)) in recs.iter_mut().zip(pairs) {
            let dir = self.vol_dir(&rec.id);
            let active = rec
                .active()
                .cloned()
                .ok_or_else(|| EngineError::NotFound(format!("volume {}", rec.id)))?;
            let seq = rec.next_layer_seq;
            rec.pending_snapshot = Some(PendingSnapshot {
                snapshot: snap.clone(),
                overlay: seq,
                created: now,
                for_clone: for_clone.cloned(),
            });
            self.store.save(rec)?;
            qemu_img::create(
                &dir.join(VolumeRecord::layer_file(seq)),
                rec.size,
                Some(&VolumeRecord::layer_file(active.seq)),
            )
            .await?;
            self.qmp
                .execute("blockdev-add", node_add_args(&dir, rec, seq, Value::Null))
                .await?;
            overlays.push(seq);
            actions.push(json!({
                "type": "blockdev-snapshot",
                "data": { "node": rec.node_name(active.seq), "overlay": rec.node_name(seq) },
            }));
        }
        Ok(())
    }

    pub fn list_snapshots(&self, volume: &VolumeId) -> Result<Vec<SnapshotInfo>> {
        let rec = self.load(volume)?;
        Ok(rec.snapshots.iter().map(|s| snap_info(&rec, s)).collect())
    }

    pub fn snapshot(&self, snap: &SnapshotId) -> Result<SnapshotInfo> {
        let rec = self.locate(snap)?;
        let s = rec
            .snapshot(snap)
            .ok_or_else(|| EngineError::NotFound(format!("snapshot {snap}")))?;
        Ok(snap_info(&rec, s))
    }
}
