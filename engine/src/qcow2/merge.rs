//! Deleting a snapshot by merging its layer away live (`block-commit` or
//! `block-stream`), with job control.

use std::path::PathBuf;

use serde_json::{Value, json};

use super::engine::{Engine, JOB_POLL, Result, node_add_args, remove_file_if_exists};
use super::record::{ExportTarget, InFlight, MergeMode, MergePhase, SnapshotState, VolumeRecord};
use super::types::MergeOptions;
use super::{merge_pause, plan, qemu_img, writeback};
use crate::error::EngineError;
use crate::failpoint;
use crate::lock::VolumeGuard;
use crate::qsd::qmp::{self, JobInfo, QmpError};
use livedisk_common::{SnapshotId, VolumeId};

/// How long a merge's finisher waits for the volume's lock. Other holders keep it for seconds
/// (an attach, a snapshot pausing this very job); past this the caller is told `Busy` and asks
/// again, which picks the job up where it is.
const CONCLUDE_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

impl Engine {
    /// The merge job's id for deleting `snap` (for progress, speed, cancel).
    pub fn merge_job_id(snap: &SnapshotId) -> String {
        format!("m{}", &snap.hex()[..24])
    }

    /// Deletes a snapshot by merging its layer away live. `speed` limits the
    /// merge in bytes per second (0 or `None`: unlimited). Returns once the
    /// layer is gone; progress is visible through [`Engine::jobs`].
    pub async fn delete_snapshot(&self, snap: &SnapshotId, speed: Option<u64>) -> Result<()> {
        self.delete_snapshot_with(
            snap,
            MergeOptions {
                mode: MergeMode::Commit,
                speed,
            },
        )
        .await
    }

    /// [`Engine::delete_snapshot`] with a choice of merge mode.
    ///
    /// The volume's lock is held only to start the job and to finish it: while the job copies,
    /// the volume can be attached, detached and snapshotted (a snapshot pauses the job and
    /// starts it again, see `merge_pause.rs`).
    pub async fn delete_snapshot_with(&self, snap: &SnapshotId, opts: MergeOptions) -> Result<()> {
        let (rec, guard) = self.lock_for_merge(snap).await?;
        let volume = rec.id.clone();
        self.refuse_if_migrating(&volume)?;
        if !self.merge_locked(rec, snap, opts, false).await? {
            return Ok(());
        }
        drop(guard);
        self.conclude_merge(&volume, snap, opts.speed).await
    }

    /// Waits, without the volume's lock, until the merge job deleting `snap` has copied what it
    /// copies, then takes the lock and finishes the deletion. A job that a snapshot paused and
    /// started again is simply waited for again; what the lock holder finds decides.
    async fn conclude_merge(
        &self,
        volume: &VolumeId,
        snap: &SnapshotId,
        speed: Option<u64>,
    ) -> Result<()> {
        let job = Self::merge_job_id(snap);
        let mut rx = self.qmp.subscribe();
        let mut pacer = None;
        loop {
            let status = self.job_status(&job).await?;
            if merge_pause::copying(status.as_deref()) {
                // Writeback of the layer the job writes into, overlapped with the copy (see
                // `writeback.rs`); read without the lock, which is fine for a hint.
                if pacer.is_none() {
                    pacer = self
                        .load(volume)
                        .ok()
                        .and_then(|rec| {
                            let (mode, _) = rec.merge_of(snap)?;
                            let plan = plan::plan_delete_with(&rec, snap, mode).ok()?;
                            self.finalized_by_us(&rec, &plan)
                        })
                        .and_then(writeback::WritebackPacer::start);
                }
                Self::wait_job_poll(&mut rx, &job, &["ready", "pending", "concluded", "null"])
                    .await?;
                continue;
            }
            drop(pacer.take());
            let guard = self.locks.lock_waiting(volume, CONCLUDE_LOCK_WAIT).await?;
            let rec = match self.load(volume) {
                // Its last snapshot merged away by whoever held the lock before us.
                Err(EngineError::NotFound(_)) => return Ok(()),
                r => r?,
            };
            let Some((mode, _)) = rec.merge_of(snap) else {
                // Finished by whoever held the lock before us (a snapshot that found the job
                // waiting for its finisher, or recovery).
                return match rec.snapshot(snap) {
                    None => Ok(()),
                    Some(_) => Err(EngineError::JobFailed {
                        job,
                        error: "the merge is no longer in flight, but the snapshot is still there"
                            .into(),
                    }),
                };
            };
            let status = self.job_status(&job).await?;
            if merge_pause::copying(status.as_deref()) {
                // Paused for a snapshot and started again while we waited for the lock.
                drop(guard);
                continue;
            }
            if status.is_none() {
                return Err(EngineError::JobFailed {
                    job,
                    error: "job vanished".into(),
                });
            }
            let mut rec = rec;
            let plan = plan::plan_delete_with(&rec, snap, mode)?;
            self.run_merge_job(&mut rec, &job, &plan, speed, true)
                .await?;
            failpoint::hit("merge-after-complete", self.daemon().pid);
            return self.finish_merge(&rec, snap, &plan, &job).await;
        }
    }

    /// The status of job `id` in the daemon (`None`: no such job).
    pub(super) async fn job_status(&self, id: &str) -> Result<Option<String>> {
        Ok(qmp::query_jobs(&self.qmp)
            .await?
            .into_iter()
            .find(|j| j.id == id)
            .map(|j| j.status))
    }

    /// Starts deleting a snapshot and returns the merge job's id without
    /// waiting. The merge is recorded as in flight; calling
    /// [`Engine::delete_snapshot`] again (or reopening the engine) waits for
    /// it and finishes the deletion. Until then the volume is busy.
    pub async fn start_snapshot_delete(
        &self,
        snap: &SnapshotId,
        opts: MergeOptions,
    ) -> Result<String> {
        let (rec, _g) = self.lock_for_merge(snap).await?;
        self.merge_locked(rec, snap, opts, false).await?;
        Ok(Self::merge_job_id(snap))
    }

    pub(super) async fn lock_for_merge(
        &self,
        snap: &SnapshotId,
    ) -> Result<(VolumeRecord, VolumeGuard)> {
        let rec = self.locate(snap)?;
        let g = self.locks.try_lock(&rec.id)?;
        // Reload under the lock: the first read only found the volume.
        let rec = self.settled(self.load(&rec.id)?).await?;
        if rec
            .exports
            .iter()
            .any(|e| matches!(&e.target, ExportTarget::Snapshot { id } if id == snap))
        {
            return Err(EngineError::FailedPrecondition(format!(
                "snapshot {snap} is exported; stop the export first"
            )));
        }
        Ok((rec, g))
    }

    /// Returns whether a job is left running (only without `wait`): otherwise the deletion is
    /// done.
    pub(super) async fn merge_locked(
        &self,
        rec: VolumeRecord,
        snap: &SnapshotId,
        opts: MergeOptions,
        wait: bool,
    ) -> Result<bool> {
        // An interrupted merge keeps the mode it started with.
        let (mode, phase) = match &rec.in_flight {
            Some(InFlight::Merge {
                snapshot,
                seal: Some(_),
                ..
            }) if snapshot == snap => {
                // Only a crash (or a lost daemon) mid-seal leaves this.
                return Err(EngineError::FailedPrecondition(format!(
                    "volume {} has an unresolved internal seal; reopen the engine to recover",
                    rec.id
                )));
            }
            Some(InFlight::Merge {
                snapshot,
                mode,
                phase,
                ..
            }) if snapshot == snap => (*mode, *phase),
            Some(InFlight::Merge { snapshot, .. }) => {
                return Err(EngineError::Busy(format!(
                    "volume {} (merge of {snapshot} in flight)",
                    rec.id
                )));
            }
            None => (opts.mode, MergePhase::Running),
        };
        self.refuse_if_cloned(&rec).await?;
        self.refuse_if_remote_clone(&rec, "its snapshots can be deleted")?;
        let mut plan = plan::plan_delete_with(&rec, snap, mode)?;
        // The flatten job of an unflattened clone holds its bottom layer.
        if let (Some(src), Some(bottom)) = (&rec.clone_of, rec.layers.first())
            && plan::touches(&plan, bottom.seq)
        {
            return Err(EngineError::FailedPrecondition(format!(
                "volume {} is a clone of {} still being flattened; retry later",
                rec.id, src.volume
            )));
        }
        let job = Self::merge_job_id(snap);
        // The extent records must be captured before any layer's content
        // changes (a merge writes into one layer and removes another).
        let mut rec = self.capture_locked(rec).await?;
        // Point of no return, made durable before the first byte moves.
        if let Some(i) = rec.snapshot_index(snap) {
            rec.snapshots[i].state = SnapshotState::Deleting;
        }
        // Never commit the layer that takes writes: seal it internally
        // first (its overlay's number is part of the same durable intent).
        let seal = plan::needs_seal(&rec, &plan).then_some(rec.next_layer_seq);
        if let Some(n) = seal {
            rec.next_layer_seq = n + 1;
        }
        rec.in_flight = Some(InFlight::Merge {
            snapshot: snap.clone(),
            job: job.clone(),
            mode,
            phase,
            seal,
        });
        self.store.save(&rec)?;
        if let Some(n) = seal {
            rec = self.seal_for_merge(rec, n).await?;
            plan = plan::plan_delete_with(&rec, snap, mode)?;
        }

        if !matches!(plan, plan::DeletePlan::DropTop { .. }) {
            self.run_merge_job(&mut rec, &job, &plan, opts.speed, wait)
                .await?;
            if !wait {
                return Ok(true);
            }
            failpoint::hit("merge-after-complete", self.daemon().pid);
        }
        self.finish_merge(&rec, snap, &plan, &job).await?;
        Ok(false)
    }

    /// Puts the fresh overlay `n` on the active layer in one `transaction`
    /// (like a snapshot, but named by no snapshot), so that the old active
    /// layer can be merged away by a non-active commit. The intent (`seal`
    /// in the in-flight merge) is durable already; the record naming the
    /// overlay is saved after the transaction.
    async fn seal_for_merge(&self, mut rec: VolumeRecord, n: u64) -> Result<VolumeRecord> {
        let dir = self.vol_dir(&rec.id);
        let active = rec
            .active()
            .cloned()
            .ok_or_else(|| EngineError::NotFound(format!("volume {}", rec.id)))?;
        let prepared = async {
            qemu_img::create(
                &dir.join(VolumeRecord::layer_file(n)),
                rec.size,
                Some(&VolumeRecord::layer_file(active.seq)),
            )
            .await?;
            self.qmp
                .execute("blockdev-add", node_add_args(&dir, &rec, n, Value::Null))
                .await?;
            Ok::<(), EngineError>(())
        }
        .await;
        failpoint::hit("merge-before-seal", self.daemon().pid);
        // `Err(true)`: nothing can have switched (the transaction was not
        // sent, or the daemon refused it: QMP transactions are
        // all-or-nothing). `Err(false)`: the daemon may have switched
        // before it was lost, which only recovery can tell.
        let tx: Result<(), (EngineError, bool)> = match prepared {
            Ok(()) => self
                .qmp
                .execute(
                    "transaction",
                    json!({ "actions": [{
                        "type": "blockdev-snapshot",
                        "data": {
                            "node": rec.node_name(active.seq),
                            "overlay": rec.node_name(n),
                        },
                    }] }),
                )
                .await
                .map(|_| ())
                .map_err(|e| {
                    let refused = matches!(e, QmpError::Command { .. });
                    (e.into(), refused)
                }),
            Err(e) => Err((e, true)),
        };
        failpoint::hit("merge-after-seal", self.daemon().pid);
        match tx {
            Ok(()) => {}
            Err((e, true)) => {
                let _ = self.blockdev_del(&rec.node_name(n)).await;
                let _ = remove_file_if_exists(&dir.join(VolumeRecord::layer_file(n)));
                if let Some(InFlight::Merge { seal, .. }) = rec.in_flight.as_mut() {
                    *seal = None;
                }
                self.store.save(&rec)?;
                return Err(e);
            }
            Err((e, false)) => return Err(e),
        }
        // The sealed layer's writes, for the next snapshot's record: read
        // now, before the commit job holds (and hides) the layer.
        let map =
            qemu_img::layer_allocation(&dir.join(VolumeRecord::layer_file(active.seq))).await?;
        let rec = plan::seal_internal(&rec, n, &map)?;
        self.store.save(&rec)?;
        Ok(rec)
    }

    /// After the job concluded: save the new record, and only then dismiss
    /// the job and drop the merged-away node, so that a crash in between
    /// still finds the concluded job (or the new record).
    pub(super) async fn finish_merge(
        &self,
        rec: &VolumeRecord,
        snap: &SnapshotId,
        plan: &plan::DeletePlan,
        job: &str,
    ) -> Result<()> {
        let after = plan::apply_delete(rec, snap, plan)?;
        let dir = self.vol_dir(&rec.id);
        if after.deleted && after.snapshots.is_empty() {
            // No record will be left to sweep from: release the nodes first.
            self.dismiss(job).await;
            for l in rec.layers.iter().rev() {
                self.blockdev_del(&rec.node_name(l.seq)).await?;
            }
            self.store.remove(&rec.id)?;
            return Ok(());
        }
        self.store.save(&after)?;
        // The job holds its nodes until dismissed; a crash from here on
        // leaves an orphan node or file that the next reconcile sweeps.
        self.dismiss(job).await;
        for l in rec.layers.iter().rev() {
            if !after.layers.iter().any(|a| a.seq == l.seq) {
                self.blockdev_del(&rec.node_name(l.seq)).await?;
                self.reclaim
                    .file(&dir.join(VolumeRecord::layer_file(l.seq)))?;
            }
        }
        Ok(())
    }

    /// The file of the layer a merge job writes into when the engine
    /// finalizes the job itself (non-active commits: the base).
    fn finalized_by_us(&self, rec: &VolumeRecord, plan: &plan::DeletePlan) -> Option<PathBuf> {
        match plan {
            plan::DeletePlan::Commit {
                base,
                active: false,
                ..
            } => Some(self.vol_dir(&rec.id).join(VolumeRecord::layer_file(*base))),
            _ => None,
        }
    }

    pub(super) async fn dismiss(&self, job: &str) {
        // Not found is fine: the daemon restarted or it was dismissed.
        let _ = self.qmp.execute("job-dismiss", json!({ "id": job })).await;
    }

    /// Merges on a volume some unflattened clone still backs onto are
    /// refused: QEMU would refuse the write lock on a layer a clone reads,
    /// and a stream would pull the clone's backing away. The clone is
    /// flattened in the background; retry once it is.
    pub(super) async fn refuse_if_cloned(&self, rec: &VolumeRecord) -> Result<()> {
        for id in self.store.list()? {
            if let Some(c) = self.store.load(&id)?
                && c.clone_of.as_ref().is_some_and(|s| s.volume == rec.id)
            {
                // It may have finished flattening since we last looked.
                if self.settle_flatten(&c).await? {
                    continue;
                }
                return Err(EngineError::FailedPrecondition(format!(
                    "volume {} is a clone still backed by {}; it is being flattened, retry later",
                    c.id, rec.id
                )));
            }
        }
        Ok(())
    }

    /// Starts (or picks up) the merge job and, when `wait`, drives it until
    /// it concluded. A successful job is left undismissed for the caller.
    pub(super) async fn run_merge_job(
        &self,
        rec: &mut VolumeRecord,
        job: &str,
        plan: &plan::DeletePlan,
        speed: Option<u64>,
        wait: bool,
    ) -> Result<()> {
        let mut rx = self.qmp.subscribe();
        let existing = qmp::query_jobs(&self.qmp).await?;
        let mut status = existing
            .iter()
            .find(|j| j.id == job)
            .map(|j| j.status.clone());
        if status.is_none() {
            let (cmd, args) = self.merge_job_args(rec, job, plan, speed)?;
            self.qmp.execute(cmd, args).await?;
            status = Some("running".into());
        }
        if !wait {
            return Ok(());
        }
        // The layer a non-active commit writes into: written back while the
        // job copies, and flushed by us before the job is finalized (see
        // `writeback.rs`).
        let written = self.finalized_by_us(rec, plan);
        let mut pacer = written
            .clone()
            .filter(|_| status.as_deref() == Some("running"))
            .and_then(writeback::WritebackPacer::start);
        // Drive the job through its states. Statuses are re-read with
        // query-jobs after each event, and at least every JOB_POLL, so a
        // missed event delays us by one poll at most, never forever.
        let mut completed = false;
        loop {
            match status.as_deref() {
                // QEMU alone decides whether a commit is active (its top is
                // the top of the chain); whatever became READY waits for
                // `job-complete`, so complete it rather than wait for a
                // conclusion that cannot come.
                Some("ready") if !completed => {
                    // From here QEMU may switch writes to the base at any
                    // moment: recovery must know that.
                    if let Some(InFlight::Merge { phase, .. }) = rec.in_flight.as_mut()
                        && *phase != MergePhase::Completing
                    {
                        *phase = MergePhase::Completing;
                        self.store.save(rec)?;
                    }
                    failpoint::hit("merge-before-complete", self.daemon().pid);
                    self.qmp
                        .execute("job-complete", json!({ "id": job }))
                        .await?;
                    completed = true;
                    Self::wait_job_poll(&mut rx, job, &["concluded"]).await?;
                }
                Some("pending") => {
                    drop(pacer.take());
                    if let Some(file) = &written {
                        // Not drained now: the consumer keeps writing while
                        // this runs, and the finalize's reopen flush below
                        // (under drain) finds the data on disk already.
                        if let Err(e) = writeback::flush_file(file).await {
                            tracing::warn!(file = %file.display(), error = %e,
                                "flushing a merged layer early failed; QEMU flushes it");
                        }
                    }
                    failpoint::hit("merge-before-finalize", self.daemon().pid);
                    self.qmp
                        .execute("job-finalize", json!({ "id": job }))
                        .await?;
                    Self::wait_job_poll(&mut rx, job, &["concluded"]).await?;
                }
                Some("concluded") => {
                    let info = qmp::query_jobs(&self.qmp)
                        .await?
                        .into_iter()
                        .find(|j| j.id == job);
                    return match info {
                        Some(JobInfo {
                            error: None,
                            current_progress,
                            ..
                        }) => {
                            self.stats.merged(current_progress);
                            Ok(())
                        }
                        None => Ok(()),
                        Some(JobInfo { error: Some(e), .. }) => {
                            self.dismiss(job).await;
                            if e.to_lowercase().contains("cancel") {
                                Err(EngineError::Cancelled(job.to_owned()))
                            } else {
                                Err(EngineError::JobFailed {
                                    job: job.to_owned(),
                                    error: e,
                                })
                            }
                        }
                    };
                }
                None => {
                    return Err(EngineError::JobFailed {
                        job: job.to_owned(),
                        error: "job vanished".into(),
                    });
                }
                Some(_) => {
                    Self::wait_job_poll(&mut rx, job, &["ready", "pending", "concluded"]).await?;
                }
            }
            status = qmp::query_jobs(&self.qmp)
                .await?
                .into_iter()
                .find(|j| j.id == job)
                .map(|j| j.status);
        }
    }

    /// Waits for one of `statuses` of `job`, at most one poll interval:
    /// the caller re-reads the status with `query-jobs` either way.
    async fn wait_job_poll(
        rx: &mut tokio::sync::broadcast::Receiver<qmp::Event>,
        job: &str,
        statuses: &[&str],
    ) -> Result<()> {
        match qmp::wait_job_status(rx, job, statuses, JOB_POLL).await {
            Ok(_) | Err(QmpError::Timeout(..)) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    pub(super) fn merge_job_args(
        &self,
        rec: &VolumeRecord,
        job: &str,
        plan: &plan::DeletePlan,
        speed: Option<u64>,
    ) -> Result<(&'static str, Value)> {
        let speed = speed.unwrap_or(0);
        match plan {
            plan::DeletePlan::Commit { top, base, active } => {
                let top_of_chain = rec
                    .layers
                    .last()
                    .map(|l| rec.node_name(l.seq))
                    .ok_or_else(|| EngineError::NotFound(format!("volume {}", rec.id)))?;
                let mut args = json!({
                    "job-id": job,
                    "device": top_of_chain,
                    "base-node": rec.node_name(*base),
                    "auto-dismiss": false,
                    "speed": speed,
                });
                if !active {
                    // Finalized by us after flushing the base (see
                    // `writeback.rs`). Not for active commits: a mirror keeps
                    // the chain drained from its last copy until finalized.
                    args["auto-finalize"] = json!(false);
                    args["top-node"] = json!(rec.node_name(*top));
                    // The name QEMU writes into the header of the layer
                    // above `top`: by default the base node's filename,
                    // which for nodes added with explicit backing is a
                    // `json:` spec of the whole chain below, stale (and
                    // unopenable by offline tools) after the next merge.
                    args["backing-file"] = json!(VolumeRecord::layer_file(*base));
                }
                Ok(("block-commit", args))
            }
            plan::DeletePlan::Stream { into, base, .. } => {
                let mut args = json!({
                    "job-id": job,
                    "device": rec.node_name(*into),
                    "auto-dismiss": false,
                    "speed": speed,
                });
                match base {
                    Some(b) => args["base-node"] = json!(rec.node_name(*b)),
                    // Streaming the bottom layer of a clone would also pull
                    // in the source's layers; that is the flatten job's work.
                    None if rec.clone_of.is_some() => {
                        return Err(EngineError::FailedPrecondition(format!(
                            "volume {} is an unflattened clone",
                            rec.id
                        )));
                    }
                    None => {}
                }
                Ok(("block-stream", args))
            }
            plan::DeletePlan::DropTop { .. } => {
                Err(plan::PlanError::Inconsistent("a dropped layer needs no job".into()).into())
            }
        }
    }

    /// Running and finished-but-undismissed jobs with byte progress.
    pub async fn jobs(&self) -> Result<Vec<JobInfo>> {
        Ok(qmp::query_jobs(&self.qmp).await?)
    }

    /// Changes a running merge's rate limit (bytes/s, 0 = unlimited).
    pub async fn set_job_speed(&self, job: &str, speed: u64) -> Result<()> {
        let r = self
            .qmp
            .execute(
                "block-job-set-speed",
                json!({ "device": job, "speed": speed }),
            )
            .await;
        self.job_verb_result(job, "its speed can no longer change", r)
            .await
    }

    /// Cancels a running merge. The snapshot stays `deleting` (its layer may
    /// already hold newer data); deleting it again finishes the merge.
    pub async fn cancel_job(&self, job: &str) -> Result<()> {
        let r = self.qmp.execute("job-cancel", json!({ "id": job })).await;
        self.job_verb_result(job, "it can no longer be cancelled", r)
            .await
    }

    /// A job that has copied everything and waits for its finisher
    /// (`pending`) refuses cancel and speed changes: say so plainly instead
    /// of QEMU's verb error.
    async fn job_verb_result(
        &self,
        job: &str,
        refused: &str,
        r: std::result::Result<Value, QmpError>,
    ) -> Result<()> {
        let Err(e) = r else { return Ok(()) };
        let status = qmp::query_jobs(&self.qmp)
            .await?
            .into_iter()
            .find(|j| j.id == job)
            .map(|j| j.status);
        match status.as_deref() {
            Some("pending") => Err(EngineError::FailedPrecondition(format!(
                "merge job {job} has copied everything and is finishing; {refused}"
            ))),
            _ => Err(e.into()),
        }
    }
}
