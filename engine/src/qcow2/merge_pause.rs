//! A snapshot taken while a merge runs on the same volume.
//!
//! QEMU 7.2 refuses an overlay (`blockdev-snapshot`) on a node a block job holds. A commit
//! runs on the top of the chain, so it holds the active layer whichever layers it merges; a
//! stream holds the layer it streams into. When that is the active layer, the snapshot pauses the
//! merge: it cancels the job (a cancelled commit leaves the chain as it was, the base layer
//! holding part of the data it would have received, which only the snapshot being deleted
//! saw; a cancelled stream leaves copies the next layer already showed), takes the snapshot,
//! and starts the job again on the chain as it now is. The record keeps the merge in flight
//! throughout, so a crash in between is recovered like any interrupted merge. A restarted
//! commit copies again what it had copied (QEMU keeps no progress across jobs): that extra
//! copy is counted and logged.

use serde_json::json;

use super::engine::{Engine, Result};
use super::plan::{self, DeletePlan};
use super::record::{InFlight, MergeMode, MergePhase, VolumeRecord};
use crate::error::EngineError;
use crate::qsd::qmp;
use livedisk_common::{SnapshotId, VolumeId};

/// How long a merge job may take to stop when a snapshot cancels it.
const STOP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Whether a job in this status is still copying (its finisher waits for it to leave this
/// state without holding the volume's lock).
pub(super) fn copying(status: Option<&str>) -> bool {
    matches!(
        status,
        Some("created" | "running" | "paused" | "waiting" | "standby" | "aborting")
    )
}

/// What a snapshot does about the merge in flight on its volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum MergeAtSnapshot {
    /// Nothing is merging, or the job holds no node the snapshot changes: go ahead.
    Proceed,
    /// The job holds the active layer: stop it, snapshot, start it again.
    Pause {
        snapshot: SnapshotId,
        job: String,
        mode: MergeMode,
    },
    /// Not now (`Busy`, retried by the caller): the merge is finishing or being set up.
    Wait(String),
}

/// Pure: what a snapshot of `rec` must do about its merge in flight, given the status of the
/// merge's job in the daemon (`None`: no job). `for_clone`: the snapshot is the hidden base of
/// a new clone, whose flatten would then hold the layers the merge needs.
pub(super) fn merge_at_snapshot(
    rec: &VolumeRecord,
    job_status: Option<&str>,
    for_clone: bool,
) -> MergeAtSnapshot {
    let Some(InFlight::Merge {
        snapshot,
        job,
        mode,
        phase,
        seal,
    }) = &rec.in_flight
    else {
        return MergeAtSnapshot::Proceed;
    };
    let busy = |why: &str| MergeAtSnapshot::Wait(format!("volume {} ({why})", rec.id));
    if for_clone {
        return busy("a merge is in flight; a clone waits for it");
    }
    if seal.is_some() || *phase == MergePhase::Completing {
        return busy("a merge is switching layers");
    }
    if job_status.is_none() {
        // Cancelled and not started again: the chain is whole, and deleting the snapshot again
        // plans the merge on the chain as it will then be.
        return MergeAtSnapshot::Proceed;
    }
    if !copying(job_status) {
        return busy("a merge has copied everything and is finishing");
    }
    match plan::plan_delete_with(rec, snapshot, *mode) {
        Ok(p) if holds_active_layer(rec, &p) => MergeAtSnapshot::Pause {
            snapshot: snapshot.clone(),
            job: job.clone(),
            mode: *mode,
        },
        Ok(_) => MergeAtSnapshot::Proceed,
        Err(e) => busy(&format!("its merge in flight cannot be planned: {e}")),
    }
}

/// Pure: whether the job carrying out `p` holds the volume's active layer. A commit always
/// does: its job runs on the top of the chain (`device`), whichever layers it merges. A
/// stream holds the layer it streams into.
fn holds_active_layer(rec: &VolumeRecord, p: &DeletePlan) -> bool {
    let Some(active) = rec.active().map(|l| l.seq) else {
        return false;
    };
    match p {
        DeletePlan::Commit { .. } => true,
        DeletePlan::Stream { into, .. } => *into == active,
        DeletePlan::DropTop { .. } => false,
    }
}

/// Pure: whether the merge in flight on `rec` keeps snapshot `snap`'s view from being exported
/// while its job runs: a commit's job unshares consistent reads of the layers it merges
/// (above its base, up to its top), so QEMU refuses a reader of them.
pub(super) fn merge_hides_snapshot(rec: &VolumeRecord, snap: &SnapshotId) -> bool {
    let Some(InFlight::Merge { snapshot, mode, .. }) = &rec.in_flight else {
        return false;
    };
    let (Some(layer), Ok(DeletePlan::Commit { top, base, .. })) = (
        rec.layer_of(snap).map(|i| rec.layers[i].seq),
        plan::plan_delete_with(rec, snapshot, *mode),
    ) else {
        return false;
    };
    layer > base && layer <= top
}

/// A merge stopped for a snapshot, to be started again after it.
#[derive(Debug, Clone)]
pub(super) struct PausedMerge {
    pub volume: VolumeId,
    pub snapshot: SnapshotId,
    pub job: String,
    pub mode: MergeMode,
    /// Its rate limit (bytes/s, 0: none) as the job had it, edits included.
    pub speed: u64,
    /// What the stopped job had copied; a restarted commit copies it again.
    pub copied: u64,
}

impl Engine {
    /// Stops the merge job `job` of `rec` for a snapshot (the caller holds the volume's lock).
    pub(super) async fn pause_merge(
        &self,
        rec: &VolumeRecord,
        snapshot: SnapshotId,
        job: String,
        mode: MergeMode,
    ) -> Result<PausedMerge> {
        let speed = qmp::block_job_speed(&self.qmp, &job).await?.unwrap_or(0);
        let mut rx = self.qmp.subscribe();
        if let Err(e) = self.qmp.execute("job-cancel", json!({ "id": job })).await {
            // It may have finished copying in the meantime: then the snapshot waits.
            return Err(match self.job_status(&job).await? {
                Some(s) if !copying(Some(&s)) => EngineError::Busy(format!(
                    "volume {} (a merge has copied everything and is finishing)",
                    rec.id
                )),
                _ => e.into(),
            });
        }
        let deadline = tokio::time::Instant::now() + STOP_TIMEOUT;
        let copied = loop {
            let info = qmp::query_jobs(&self.qmp)
                .await?
                .into_iter()
                .find(|j| j.id == job);
            match info {
                None => break 0,
                Some(j) if j.status == "concluded" => break j.current_progress,
                Some(_) if tokio::time::Instant::now() > deadline => {
                    return Err(EngineError::Busy(format!(
                        "merge job {job} does not stop for the snapshot"
                    )));
                }
                Some(_) => {
                    let _ = qmp::wait_job_status(
                        &mut rx,
                        &job,
                        &["concluded"],
                        std::time::Duration::from_millis(200),
                    )
                    .await;
                }
            }
        };
        self.dismiss(&job).await;
        tracing::info!(volume = %rec.id, %snapshot, job, copied, "merge paused for a snapshot");
        Ok(PausedMerge {
            volume: rec.id.clone(),
            snapshot,
            job,
            mode,
            speed,
            copied,
        })
    }

    /// Starts paused merges again on their volumes' chains as they now are (the caller still
    /// holds the locks). A failure leaves the merge in flight without a job: its finisher
    /// reports it, and deleting the snapshot again (or recovery) starts it.
    pub(super) async fn resume_merges(&self, paused: &[PausedMerge]) {
        for p in paused {
            let r = async {
                let mut rec = self.load(&p.volume)?;
                let plan = plan::plan_delete_with(&rec, &p.snapshot, p.mode)?;
                let speed = (p.speed > 0).then_some(p.speed);
                self.run_merge_job(&mut rec, &p.job, &plan, speed, false)
                    .await
            }
            .await;
            match r {
                Ok(()) => {
                    // What the stopped job had copied, a commit copies again (a stream skips
                    // what the layer it streams into already holds).
                    let again = match p.mode {
                        MergeMode::Commit => p.copied,
                        MergeMode::Stream => 0,
                    };
                    self.stats.merge_restarted(again);
                    tracing::info!(volume = %p.volume, snapshot = %p.snapshot, job = p.job,
                        copied_again = again, "merge started again after the snapshot");
                }
                Err(e) => {
                    tracing::warn!(volume = %p.volume, snapshot = %p.snapshot, job = p.job,
                        error = %e, "could not start the paused merge again");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qcow2::record::{Layer, SnapshotRecord, SnapshotState};

    fn volume(layers: usize) -> VolumeRecord {
        let mut rec = VolumeRecord::new(VolumeId::generate(), 1 << 20);
        rec.layers.clear();
        rec.snapshots.clear();
        for seq in 0..layers as u64 {
            let snap = (seq + 1 < layers as u64).then(SnapshotId::generate);
            if let Some(s) = &snap {
                rec.snapshots.push(SnapshotRecord {
                    id: s.clone(),
                    created: chrono::Utc::now(),
                    size: 1 << 20,
                    state: SnapshotState::Ready,
                    changed: None,
                    inherited: vec![],
                    for_clone: None,
                });
            }
            rec.layers.push(Layer {
                seq,
                sealed_by: snap,
            });
        }
        rec.next_layer_seq = layers as u64;
        rec
    }

    fn merging(mut rec: VolumeRecord, snap_index: usize, mode: MergeMode) -> VolumeRecord {
        let snapshot = rec.snapshots[snap_index].id.clone();
        rec.snapshots[snap_index].state = SnapshotState::Deleting;
        rec.in_flight = Some(InFlight::Merge {
            job: Engine::merge_job_id(&snapshot),
            snapshot,
            mode,
            phase: MergePhase::Running,
            seal: None,
        });
        rec
    }

    #[test]
    fn nothing_merging_means_go_ahead() {
        assert_eq!(
            merge_at_snapshot(&volume(3), None, false),
            MergeAtSnapshot::Proceed
        );
    }

    #[test]
    fn a_commit_whose_top_lies_under_the_active_layer_is_paused() {
        // layers 0 (s0), 1 (s1), 2 (active); deleting s0 commits 1 into 0: 2 is top's overlay.
        let rec = merging(volume(3), 0, MergeMode::Commit);
        assert!(matches!(
            merge_at_snapshot(&rec, Some("running"), false),
            MergeAtSnapshot::Pause { .. }
        ));
    }

    #[test]
    fn a_commit_deeper_in_the_chain_is_paused_too() {
        // layers 0 (s0), 1 (s1), 2 (s2), 3 (active); deleting s0 commits 1 into 0, but the job
        // runs on layer 3.
        let rec = merging(volume(4), 0, MergeMode::Commit);
        assert!(matches!(
            merge_at_snapshot(&rec, Some("running"), false),
            MergeAtSnapshot::Pause { .. }
        ));
    }

    #[test]
    fn a_stream_into_the_active_layer_is_paused_and_one_into_a_sealed_layer_is_not() {
        let rec = merging(volume(3), 1, MergeMode::Stream);
        assert!(matches!(
            merge_at_snapshot(&rec, Some("running"), false),
            MergeAtSnapshot::Pause { .. }
        ));
        let rec = merging(volume(3), 0, MergeMode::Stream);
        assert_eq!(
            merge_at_snapshot(&rec, Some("running"), false),
            MergeAtSnapshot::Proceed
        );
    }

    #[test]
    fn a_finishing_merge_a_switch_or_a_clone_waits() {
        let rec = merging(volume(3), 0, MergeMode::Commit);
        for status in ["pending", "ready", "concluded"] {
            assert!(matches!(
                merge_at_snapshot(&rec, Some(status), false),
                MergeAtSnapshot::Wait(_)
            ));
        }
        assert!(matches!(
            merge_at_snapshot(&rec, Some("running"), true),
            MergeAtSnapshot::Wait(_)
        ));
        let mut sealing = rec.clone();
        if let Some(InFlight::Merge { seal, .. }) = sealing.in_flight.as_mut() {
            *seal = Some(3);
        }
        assert!(matches!(
            merge_at_snapshot(&sealing, Some("running"), false),
            MergeAtSnapshot::Wait(_)
        ));
    }

    #[test]
    fn a_commit_hides_the_views_of_the_layers_it_merges_only() {
        // layers 0 (s0), 1 (s1), 2 (s2), 3 (active); deleting s0 commits 1 into 0.
        let rec = merging(volume(4), 0, MergeMode::Commit);
        let snaps: Vec<_> = rec.snapshots.iter().map(|s| s.id.clone()).collect();
        assert!(merge_hides_snapshot(&rec, &snaps[1]));
        assert!(!merge_hides_snapshot(&rec, &snaps[2]));
        assert!(!merge_hides_snapshot(&volume(4), &snaps[1]));
        let rec = merging(volume(4), 0, MergeMode::Stream);
        assert!(!merge_hides_snapshot(&rec, &snaps[1]));
    }

    #[test]
    fn a_merge_whose_job_was_cancelled_does_not_stop_a_snapshot() {
        let rec = merging(volume(3), 0, MergeMode::Commit);
        assert_eq!(
            merge_at_snapshot(&rec, None, false),
            MergeAtSnapshot::Proceed
        );
    }
}
