//! Recovery: bringing the daemon in line with the records after any
//! interruption (interrupted snapshots and merges, orphans, lost nodes).
//!
//! Several processes may drive the host's daemon at once: the node plugin's
//! long-lived engine and short-lived admin CLI engines. Recovery only ever
//! touches a volume whose lock it holds: a volume another process holds is
//! that process's, in the middle of a step. A volume whose lock is free but
//! whose record shows unfinished work was left by a process that is gone
//! (or that returned before the end, like `admin delete-snapshot` without
//! `--wait`): the node plugin's engine adopts it (`spawn_adopter`), woken
//! by the daemon's job events (QMP events go to every monitor) and by a
//! periodic look at the records.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};

use super::clone::flatten_job_id;
use super::engine::{
    Engine, RECOVERY_LOCK_WAIT, Result, node_add_args, recovery_volume_timeout,
    remove_file_if_exists,
};
use super::record::{InFlight, MergeMode, MergePhase, VolumeRecord};
use super::recover::{
    CompletingEvidence, CompletingResolution, SnapshotEvidence, SnapshotResolution,
};
use super::types::{MergeOptions, Recovery};
use super::{bitmap, plan, qemu_img, recover};
use crate::error::EngineError;
use crate::qsd::qmp::{self, JobInfo, SessionState};
use livedisk_common::ErrorCode;
use livedisk_common::VolumeId;

impl Engine {
    /// Node name -> backing depth of every node in the daemon (see
    /// [`qmp::BlockGraph`]).
    pub(super) async fn node_depths(&self) -> Result<HashMap<String, u64>> {
        Ok(qmp::block_graph(&self.qmp).await?.backing_depth)
    }

    /// Layer files of the chain a layer's view is read from, base first,
    /// including a clone's source layers: for offline recovery decisions.
    pub(super) fn chain_files(&self, rec: &VolumeRecord, upto: usize) -> Result<Vec<PathBuf>> {
        let mut out = vec![];
        self.refuse_if_remote_clone(rec, "offline decisions on its layers can be made")?;
        if let Some(src) = &rec.clone_of {
            let srec = self.load(&src.volume)?;
            let si = srec
                .layers
                .iter()
                .position(|l| l.seq == src.layer)
                .ok_or_else(|| {
                    EngineError::FailedPrecondition(format!(
                        "clone {} lost its source layer {} of {}",
                        rec.id, src.layer, src.volume
                    ))
                })?;
            out = self.chain_files(&srec, si)?;
        }
        let dir = self.vol_dir(&rec.id);
        out.extend(
            rec.layers[..=upto.min(rec.layers.len().saturating_sub(1))]
                .iter()
                .map(|l| dir.join(VolumeRecord::layer_file(l.seq))),
        );
        Ok(out)
    }

    /// Decides an interrupted snapshot (see `recover::resolve_snapshot`).
    pub(super) async fn resolve_pending_snapshot(&self, id: &VolumeId) -> Result<()> {
        let rec = self.load(id)?;
        let Some(p) = rec.pending_snapshot.clone() else {
            return Ok(());
        };
        let depths = self.node_depths().await?;
        let overlay_file = self.vol_dir(id).join(VolumeRecord::layer_file(p.overlay));
        let has_volume = rec
            .active()
            .is_some_and(|a| depths.contains_key(&rec.node_name(a.seq)));
        let evidence = if has_volume {
            SnapshotEvidence::DaemonHasVolume {
                overlay_backed: depths.get(&rec.node_name(p.overlay)).map(|d| *d > 0),
            }
        } else {
            SnapshotEvidence::FilesOnly {
                overlay_valid: qemu_img::is_qcow2(&overlay_file).await?,
            }
        };
        let decision = recover::resolve_snapshot(evidence);
        tracing::info!(volume = %id, snapshot = %p.snapshot, ?evidence, ?decision, "interrupted snapshot");
        match decision {
            SnapshotResolution::RollForward => {
                self.store.save(&plan::seal(&rec, &p)?)?;
            }
            SnapshotResolution::RollBack => {
                self.blockdev_del(&rec.node_name(p.overlay)).await?;
                remove_file_if_exists(&overlay_file)?;
                let mut rec = rec;
                rec.pending_snapshot = None;
                self.store.save(&rec)?;
            }
        }
        Ok(())
    }

    /// Decides an internal seal (the overlay put on the active layer before
    /// merging it away) interrupted around its transaction: the same
    /// evidence and decision as an interrupted snapshot. Rolled back, the
    /// merge stays in flight and seals again when it is finished.
    pub(super) async fn resolve_merge_seal(&self, id: &VolumeId) -> Result<()> {
        let rec = self.load(id)?;
        let Some(InFlight::Merge {
            snapshot,
            seal: Some(n),
            ..
        }) = rec.in_flight.clone()
        else {
            return Ok(());
        };
        let depths = self.node_depths().await?;
        let overlay_file = self.vol_dir(id).join(VolumeRecord::layer_file(n));
        let has_volume = rec
            .active()
            .is_some_and(|a| depths.contains_key(&rec.node_name(a.seq)));
        let evidence = if has_volume {
            SnapshotEvidence::DaemonHasVolume {
                overlay_backed: depths.get(&rec.node_name(n)).map(|d| *d > 0),
            }
        } else {
            SnapshotEvidence::FilesOnly {
                overlay_valid: qemu_img::is_qcow2(&overlay_file).await?,
            }
        };
        let decision = recover::resolve_snapshot(evidence);
        tracing::info!(volume = %id, %snapshot, overlay = n, ?evidence, ?decision, "interrupted internal seal");
        match decision {
            SnapshotResolution::RollForward => {
                // No job has started on the sealed layer yet.
                let sealed = rec
                    .active()
                    .map(|a| a.seq)
                    .ok_or_else(|| EngineError::NotFound(format!("volume {id}")))?;
                let map = qemu_img::layer_allocation(
                    &self.vol_dir(id).join(VolumeRecord::layer_file(sealed)),
                )
                .await?;
                self.store.save(&plan::seal_internal(&rec, n, &map)?)?;
            }
            SnapshotResolution::RollBack => {
                self.blockdev_del(&rec.node_name(n)).await?;
                remove_file_if_exists(&overlay_file)?;
                let mut rec = rec;
                if let Some(InFlight::Merge { seal, .. }) = rec.in_flight.as_mut() {
                    *seal = None;
                }
                self.store.save(&rec)?;
            }
        }
        Ok(())
    }

    /// Decides an active commit interrupted after `job-complete` may have
    /// been sent (see `recover::resolve_completing`).
    pub(super) async fn resolve_completing_merge(&self, id: &VolumeId) -> Result<()> {
        let mut rec = self.load(id)?;
        let Some(InFlight::Merge {
            snapshot,
            job,
            mode: MergeMode::Commit,
            phase: MergePhase::Completing,
            ..
        }) = rec.in_flight.clone()
        else {
            return Ok(());
        };
        let in_daemon = qmp::query_jobs(&self.qmp)
            .await?
            .iter()
            .any(|j| j.id == job);
        let evidence = if in_daemon {
            CompletingEvidence::JobInDaemon
        } else {
            let plan = plan::plan_delete(&rec, &snapshot)?;
            let plan::DeletePlan::Commit { top, base, .. } = plan else {
                return Err(plan::PlanError::Inconsistent("completing a non-commit".into()).into());
            };
            let idx = |seq: u64| rec.layers.iter().position(|l| l.seq == seq);
            let (Some(ti), Some(bi)) = (idx(top), idx(base)) else {
                return Err(plan::PlanError::Inconsistent("merge layers missing".into()).into());
            };
            let top_view = self.chain_files(&rec, ti)?;
            let base_view = self.chain_files(&rec, bi)?;
            let a: Vec<&Path> = top_view.iter().map(PathBuf::as_path).collect();
            let b: Vec<&Path> = base_view.iter().map(PathBuf::as_path).collect();
            CompletingEvidence::DaemonLost {
                views_equal: qemu_img::chains_equal(&a, &b).await?,
            }
        };
        let decision = recover::resolve_completing(evidence);
        tracing::info!(volume = %id, %snapshot, ?evidence, ?decision, "interrupted merge completion");
        match decision {
            CompletingResolution::Resume => {
                if !in_daemon {
                    // The top layer is the truth: the job starts over.
                    rec.in_flight = Some(InFlight::Merge {
                        snapshot,
                        job,
                        mode: MergeMode::Commit,
                        phase: MergePhase::Running,
                        seal: None,
                    });
                    self.store.save(&rec)?;
                }
            }
            CompletingResolution::Finished => {
                let plan = plan::plan_delete(&rec, &snapshot)?;
                self.finish_merge(&rec, &snapshot, &plan, &job).await?;
            }
        }
        Ok(())
    }

    /// Deletes nodes and files of this volume that no record references:
    /// leftovers of an operation interrupted between its steps.
    pub(super) async fn sweep_orphans(&self, rec: &VolumeRecord) -> Result<()> {
        for node in orphan_nodes(rec, &self.named_nodes().await?) {
            if let Err(e) = self.blockdev_del(&node).await {
                tracing::warn!(node, error = %e, "could not delete orphan node");
            }
        }
        for (seq, path) in self.orphan_files(rec) {
            tracing::info!(volume = %rec.id, seq, "removing orphan layer file");
            remove_file_if_exists(&path)?;
        }
        Ok(())
    }

    /// Layer files in the volume's directory that its record does not name
    /// (a step interrupted between creating a file and saving the record).
    fn orphan_files(&self, rec: &VolumeRecord) -> Vec<(u64, PathBuf)> {
        orphan_layer_files(rec, &self.vol_files(&rec.id))
    }

    /// The entries of a volume's directory (none if it cannot be read).
    pub(super) fn vol_files(&self, id: &VolumeId) -> Vec<PathBuf> {
        std::fs::read_dir(self.vol_dir(id))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .collect()
    }

    /// Makes the daemon hold what the record describes. Idempotent. The
    /// caller holds the volume's lock.
    pub(super) async fn reconcile_with(&self, id: &VolumeId, mode: Recovery) -> Result<()> {
        // A cutover that may have pivoted is finished first: the volume is then the target's.
        self.resolve_pivoting(id).await?;
        self.resolve_pending_revert(id).await?;
        self.resolve_pending_snapshot(id).await?;
        self.resolve_merge_seal(id).await?;
        self.resolve_completing_merge(id).await?;
        let Some(rec) = self.store.load(id)? else {
            return Ok(());
        };
        // Snapshots sealed whose extent records were not captured yet (a
        // crash, or an admin CLI that exited before its background capture);
        // before the exports, whose changed-block lists are built from them.
        let rec = self.capture_locked(rec).await?;
        let dir = self.vol_dir(id);
        let nodes = self.named_nodes().await?;
        let mut below: Option<String> = self.open_clone_backing(&rec).await?;
        let top = rec.layers.last().map(|l| l.seq);
        for l in &rec.layers {
            let name = rec.node_name(l.seq);
            if !nodes.contains(&name) {
                let backing = below.clone().map_or(Value::Null, Value::String);
                let mut args = node_add_args(&dir, &rec, l.seq, backing);
                // Layers under another one are read-only, as the snapshot
                // transaction left them. Besides keeping offline readers'
                // locks shareable, it makes every commit into such a layer
                // end with QEMU's reopen to read-only, which flushes it: a
                // commit into a read-write base concludes with the copied
                // data (and qcow2 metadata) still unflushed, and the engine
                // drops the merged-away layer right after.
                if Some(l.seq) != top {
                    args["read-only"] = json!(true);
                }
                self.qmp.execute("blockdev-add", args).await?;
                tracing::info!(volume = %id, node = name, "re-added layer");
            }
            below = Some(name);
        }
        self.sweep_orphans(&rec).await?;
        self.sweep_remote_origin(&rec).await?;
        let exports = self.export_ids().await?;
        for e in rec.exports.clone() {
            let (_, eid) = rec.export_names(&e.target);
            if !exports.contains(&eid) {
                self.add_export(&rec, &e).await?;
            }
        }
        self.sweep_export_helpers(&rec).await?;
        if rec.clone_of.is_some() {
            self.ensure_flatten(&rec).await?;
        }
        let Some(InFlight::Merge {
            snapshot,
            job,
            mode: merge_mode,
            ..
        }) = rec.in_flight.clone()
        else {
            return Ok(());
        };
        let opts = MergeOptions {
            mode: merge_mode,
            speed: None,
        };
        match mode {
            Recovery::Full
                if super::merge_pause::copying(self.job_status(&job).await?.as_deref()) =>
            {
                // The job outlived the process that started it and still copies. Waiting here
                // would hold the volume (and this open) for the rest of the merge; its finisher
                // is whoever asks for the deletion again (the node agent and a DiskMerge do at
                // start) or, once the job waits for one, the adopter (`recover_idle`).
                tracing::info!(volume = %id, %snapshot, job, "merge still copying; left to its finisher");
            }
            Recovery::Full => {
                tracing::info!(volume = %id, %snapshot, "finishing interrupted merge");
                // Whoever opens the engine finishes this merge (or deletes
                // the snapshot again if the bound below runs out): it is
                // this engine's, not the adopter's.
                self.qmp.claim(&job);
                self.merge_locked(rec, &snapshot, opts, true).await?;
            }
            Recovery::Light => {
                let status = qmp::query_jobs(&self.qmp)
                    .await?
                    .into_iter()
                    .find(|j| j.id == job)
                    .map(|j| j.status);
                // Only a job that ended (or waits for `job-complete` or
                // `job-finalize`) is finished here; a running one goes on by
                // itself, and a missing one is not restarted: it was
                // cancelled (or never started) and stays so until the
                // snapshot is deleted again.
                if awaits_finisher(status.as_deref()) && !self.qmp.claimed(&job) {
                    tracing::info!(volume = %id, %snapshot, "finishing a merge another process started");
                    match self.merge_locked(rec, &snapshot, opts, true).await {
                        // Dismissed; the snapshot stays `deleting`.
                        Err(EngineError::Cancelled(job)) => {
                            tracing::info!(volume = %id, %snapshot, job, "merge was cancelled");
                        }
                        r => {
                            r?;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// What the daemon holds, read once for a look at many records; `None`
    /// while a stream job settles (see `stream_settling`).
    async fn daemon_view(&self) -> Result<Option<DaemonView>> {
        // Claims first, jobs after: a job its owner dismisses in between is
        // then either still claimed here or already gone from the list. The
        // other order could see it concluded and no longer claimed, and
        // take the volume's lock from under its owner's next step.
        let claimed = self.qmp.claimed_jobs();
        let jobs = qmp::query_jobs(&self.qmp).await?;
        if qmp::stream_settling(&jobs) {
            return Ok(None);
        }
        Ok(Some(DaemonView {
            nodes: self.named_nodes().await?,
            exports: self.export_ids().await?,
            jobs: jobs.into_iter().map(|j| (j.id.clone(), j)).collect(),
            claimed,
        }))
    }

    /// Whether a record shows work left unfinished, or a daemon out of line
    /// with it: decided without the lock, so only a hint (the recovery
    /// itself re-reads everything under the lock). Jobs this engine's own
    /// session started are its callers' to finish and do not count.
    fn needs_recovery(&self, rec: &VolumeRecord, view: &DaemonView) -> bool {
        if rec.pending_snapshot.is_some() || rec.pending_revert.is_some() {
            return true;
        }
        if let Some(InFlight::Merge {
            job, seal, phase, ..
        }) = &rec.in_flight
        {
            let status = view.jobs.get(job).map(|j| j.status.as_str());
            let ended = awaits_finisher(status) && !view.claimed.contains(job);
            let lost_completion = status.is_none() && *phase == MergePhase::Completing;
            if seal.is_some() || ended || lost_completion {
                return true;
            }
        }
        // Missing extent records alone are no reason to take the volume:
        // `recover_idle_pass` captures them in the background.
        let layers: HashSet<String> = rec.layers.iter().map(|l| rec.node_name(l.seq)).collect();
        if !layers.is_subset(&view.nodes) || !orphan_nodes(rec, &view.nodes).is_empty() {
            return true;
        }
        if rec
            .exports
            .iter()
            .any(|e| !view.exports.contains(&rec.export_names(&e.target).1))
        {
            return true;
        }
        if rec.clone_of.is_some() && !view.jobs.contains_key(&flatten_job_id(&rec.id)) {
            return true;
        }
        // One listing of the directory for both kinds of leftover files.
        let files = self.vol_files(&rec.id);
        // Bitmap helpers, writer exports and frozen extent lists an
        // interrupted export left: exactly what `sweep_export_helpers`
        // (run by `reconcile_with`) removes, so this never flags forever.
        if !bitmap::leftovers_in(rec, &view.nodes, &view.exports, &files).is_empty() {
            return true;
        }
        !orphan_layer_files(rec, &files).is_empty()
    }

    /// `Recovery::Light` of the pool: every volume that needs it and that no
    /// one holds (never waits for a lock), each within the per-volume bound.
    /// Returns the volumes that failed. The admin CLI runs it at open (and
    /// after `cancel`); the node plugin's adopter runs it in the background.
    pub async fn recover_idle(&self) -> Result<Vec<(VolumeId, EngineError)>> {
        Ok(self.recover_idle_pass().await?.failed)
    }

    async fn recover_idle_pass(&self) -> Result<IdlePass> {
        let mut pass = IdlePass::default();
        let Some(view) = self.daemon_view().await? else {
            pass.busy = true;
            return Ok(pass);
        };
        let limit = recovery_volume_timeout();
        for id in self.ids_sources_first()? {
            let Some(rec) = self.store.load(&id)? else {
                continue;
            };
            if !self.needs_recovery(&rec, &view) {
                continue;
            }
            let _guard = match self.locks.try_lock(&id) {
                Ok(g) => g,
                // A live process is working on it; look again later.
                Err(EngineError::Busy(_)) => {
                    pass.busy = true;
                    pass.held.insert(id);
                    continue;
                }
                Err(e) => {
                    pass.failed.push((id, e));
                    continue;
                }
            };
            // Checked again right before: a stream may have ended since.
            if qmp::stream_settling(&qmp::query_jobs(&self.qmp).await?) {
                pass.busy = true;
                return Ok(pass);
            }
            let r = tokio::time::timeout(limit, self.reconcile_with(&id, Recovery::Light))
                .await
                .unwrap_or_else(|_| {
                    Err(EngineError::Busy(format!(
                        "volume {id} (recovery did not finish within {limit:?})"
                    )))
                });
            match r {
                Ok(()) => {}
                // Looked at again on the next pass.
                Err(EngineError::Busy(_)) => {
                    pass.busy = true;
                    pass.held.insert(id);
                }
                Err(e) if e.code() == ErrorCode::Unavailable => return Err(e),
                Err(e) => pass.failed.push((id, e)),
            }
        }
        // Hidden bases last, once the daemon holds what the records say:
        // their deletion merges on volumes this pass may have just put
        // back in line (never on one it could not).
        let mut unrecovered = pass.held.clone();
        unrecovered.extend(pass.failed.iter().map(|(id, _)| id.clone()));
        self.finish_pool_hidden_bases(&unrecovered, limit).await;
        Ok(pass)
    }
}

/// Nodes of `rec`'s volume that its record does not name, newest layer
/// first: a node's backing always has a lower layer number (it existed
/// before the overlay was made), and QEMU refuses to delete a node another
/// one still backs onto (e.g. the old active layer and the internal layers
/// under it after a revert).
fn orphan_nodes<'a>(
    rec: &VolumeRecord,
    nodes: impl IntoIterator<Item = &'a String>,
) -> Vec<String> {
    let live: HashSet<u64> = rec.layers.iter().map(|l| l.seq).collect();
    let mut orphans: Vec<(u64, &String)> = nodes
        .into_iter()
        .filter_map(|n| {
            let seq = rec.layer_of_node(n)?;
            (!live.contains(&seq)).then_some((seq, n))
        })
        .collect();
    orphans.sort_by_key(|o| std::cmp::Reverse(o.0));
    orphans.into_iter().map(|(_, n)| n.clone()).collect()
}

/// Whether a merge job in this status waits for whoever drives it: ended
/// (`concluded`), or waiting for `job-complete` (`ready`, active commits)
/// or for `job-finalize` (`pending`, non-active commits, see
/// `writeback.rs`). Nothing moves it on until its owner, or an adopter if
/// the owner is gone, does.
fn awaits_finisher(status: Option<&str>) -> bool {
    matches!(status, Some("concluded" | "ready" | "pending"))
}

/// Layer files among a volume directory's entries that its record does not
/// name.
fn orphan_layer_files(rec: &VolumeRecord, files: &[PathBuf]) -> Vec<(u64, PathBuf)> {
    let live: HashSet<u64> = rec.layers.iter().map(|l| l.seq).collect();
    files
        .iter()
        .filter_map(|f| {
            let seq = f
                .file_name()?
                .to_str()
                .and_then(VolumeRecord::parse_layer_file)?;
            (!live.contains(&seq)).then(|| (seq, f.clone()))
        })
        .collect()
}

/// Names of what the daemon holds.
struct DaemonView {
    nodes: HashSet<String>,
    exports: HashSet<String>,
    jobs: HashMap<String, JobInfo>,
    /// Jobs this session drove when the view was taken.
    claimed: HashSet<String>,
}

#[derive(Default)]
struct IdlePass {
    /// Some volume needed recovery but was held.
    busy: bool,
    /// The volumes that needed recovery and were held.
    held: HashSet<VolumeId>,
    failed: Vec<(VolumeId, EngineError)>,
}

/// How often the adopter looks at the records when no job event wakes it
/// (`LIVEDISK_ADOPT_INTERVAL_SECS`): the bound on how long a step another
/// process left unfinished (the admin CLI killed mid-way) waits.
const ADOPT_INTERVAL: Duration = Duration::from_secs(5);

/// How soon the adopter looks again when a volume that needs it was held.
const ADOPT_RETRY: Duration = Duration::from_millis(500);
/// How long the adopter lets a job's owner finish after the job ended.
const ADOPT_SETTLE: Duration = Duration::from_secs(1);

fn adopt_interval() -> Duration {
    std::env::var("LIVEDISK_ADOPT_INTERVAL_SECS")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|s| *s > 0)
        .map_or(ADOPT_INTERVAL, Duration::from_secs)
}

/// The node plugin's adopter: a `Recovery::Light` pass whenever a merge job
/// ends or waits (`JOB_STATUS_CHANGE` to concluded/ready/pending, seen on every
/// monitor, so also for jobs the admin CLI started), and every
/// `ADOPT_INTERVAL`. A merge the CLI started and left running is thus
/// finished and recorded by the node plugin as soon as its job concludes,
/// and a CLI killed mid-step is recovered without a restart of anything.
/// While the session is not `Live` (the daemon is gone, or a restarted one
/// is being brought in line by the reconnector) it waits, then follows the
/// session: events are the session's, not one connection's.
pub(super) fn spawn_adopter(engine: Engine) -> tokio::task::JoinHandle<()> {
    let mut rx = engine.qmp.subscribe();
    tokio::spawn(async move {
        let interval = adopt_interval();
        let mut next = tokio::time::Instant::now() + interval;
        loop {
            if engine.qmp.state() != SessionState::Live {
                engine.qmp.until_live().await;
                // The restore was a full recovery: the next look can wait.
                next = tokio::time::Instant::now() + interval;
            }
            match tokio::time::timeout_at(next, rx.recv()).await {
                Ok(Ok(ev)) => {
                    let wakes = ev.event == "JOB_STATUS_CHANGE"
                        && ev.job_id().is_some_and(|j| j.starts_with('m'))
                        && awaits_finisher(ev.data.get("status").and_then(Value::as_str));
                    if !wakes {
                        continue;
                    }
                    // The job's owner, if alive, finishes it right now (saves
                    // the record, dismisses, drops nodes): give it that moment
                    // rather than take the volume's lock from under it.
                    tokio::time::sleep(ADOPT_SETTLE).await;
                }
                Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {}
                Ok(Err(tokio::sync::broadcast::error::RecvError::Closed)) => return,
                Err(_) => {}
            }
            // Lost while waiting: wait for the session first (top of the loop).
            if engine.qmp.state() != SessionState::Live {
                continue;
            }
            engine.spawn_missing_captures();
            let busy = match engine.recover_idle_pass().await {
                Ok(pass) => {
                    for (id, e) in &pass.failed {
                        tracing::warn!(volume = %id, error = %e, "adopting unfinished work failed");
                    }
                    pass.busy
                }
                Err(e) => {
                    tracing::warn!(error = %e, "adopter pass failed");
                    false
                }
            };
            next = tokio::time::Instant::now() + if busy { ADOPT_RETRY } else { interval };
        }
    })
}

impl Engine {
    /// Makes the daemon hold what the records describe and finishes or
    /// undoes interrupted work, as much as `recovery` says: what `open`
    /// does once attached, and what the node plugin's engine does again
    /// after it re-attached to a restarted daemon.
    pub(super) async fn bring_in_line(&self, recovery: Recovery) -> Result<()> {
        if let Ok(mut errs) = self.recovery_errors.lock() {
            errs.clear();
        }
        self.ensure_nbd_server().await?;
        match recovery {
            Recovery::Full => self.recover_all().await?,
            Recovery::Light => {
                for (id, e) in self.recover_idle().await? {
                    self.note_recovery_error(&id, &e);
                }
            }
        }
        self.restore_remotes().await?;
        self.dismiss_stale_jobs().await
    }

    /// Volume ids, sources before clones: a clone's bottom layer backs onto
    /// a node of its source volume, which must exist first.
    pub(super) fn ids_sources_first(&self) -> Result<Vec<VolumeId>> {
        let mut ids = vec![];
        let mut clones = vec![];
        for id in self.store.list()? {
            match self.store.load(&id)? {
                Some(r) if r.clone_of.is_some() => clones.push(id),
                _ => ids.push(id),
            }
        }
        ids.extend(clones);
        Ok(ids)
    }

    /// `Recovery::Full` of every volume.
    pub(super) async fn recover_all(&self) -> Result<()> {
        // Every wait below is bounded: the lock by RECOVERY_LOCK_WAIT, the
        // recovery itself by the per-volume timeout.
        let limit = recovery_volume_timeout();
        let mut failed = HashSet::new();
        for id in &self.ids_sources_first()? {
            let r = match self.locks.lock_waiting(id, RECOVERY_LOCK_WAIT).await {
                Ok(_guard) => {
                    match tokio::time::timeout(limit, self.reconcile_with(id, Recovery::Full)).await
                    {
                        Ok(r) => r,
                        // Reported as busy: what outlasts the bound is a merge
                        // job still running in the daemon.
                        Err(_) => Err(EngineError::Busy(format!(
                            "volume {id} (recovery did not finish within {limit:?}; a merge may \
                         still be running: deleting its snapshot again or reopening finishes it)"
                        ))),
                    }
                }
                Err(e) => Err(e),
            };
            match r {
                Ok(()) => {}
                // Without the daemon nothing can be recovered: give up.
                Err(e) if e.code() == ErrorCode::Unavailable => return Err(e),
                // One volume that cannot be recovered must not keep every
                // other volume of the host offline; it is reported instead.
                Err(e) => {
                    self.note_recovery_error(id, &e);
                    failed.insert(id.clone());
                }
            }
        }
        // Hidden bases last: their deletion merges on volumes that must be
        // in the daemon first.
        self.finish_pool_hidden_bases(&failed, limit).await;
        Ok(())
    }

    /// Dismisses finished jobs of ours that no record waits for any more
    /// (the record was saved, then the process died before dismissing).
    pub(super) async fn dismiss_stale_jobs(&self) -> Result<()> {
        // Jobs first, records after: every job's record names it before the
        // job starts, and stops naming it only when its finisher is about to
        // dismiss it. Read the other way round, a job another process
        // started after the records were read would look stale.
        let jobs = qmp::query_jobs(&self.qmp).await?;
        let mut wanted = HashSet::new();
        for id in self.store.list()? {
            if let Some(r) = self.store.load(&id)? {
                if let Some(InFlight::Merge { job, .. }) = &r.in_flight {
                    wanted.insert(job.clone());
                }
                if r.clone_of.is_some() {
                    wanted.insert(flatten_job_id(&r.id));
                }
            }
        }
        for j in jobs {
            if j.status == "concluded" && !wanted.contains(&j.id) {
                let _ = self.qmp.execute("job-dismiss", json!({ "id": j.id })).await;
            }
        }
        Ok(())
    }
}
