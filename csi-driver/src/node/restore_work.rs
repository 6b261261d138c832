//! The node's part of a `DiskRestore`: carries out a `LivediskRestore` with the engine's revert,
//! and tells NodeStage which volumes must not be staged meanwhile.
//!
//! A revert is short (it writes one new layer holding the difference between two points in
//! time) and cannot be cancelled midway, so it runs inside the reconcile: `Running` is reported
//! before the engine starts and the terminal phase after it returned. A node plugin killed in
//! between finds `Running` again, and the engine's revert is idempotent (it finishes or undoes
//! an interrupted attempt first). While a consumer has the volume attached nothing is changed:
//! the object stays `Pending` with the reason and is looked at again every few seconds (a
//! consumer's detach changes nothing in this object, so no event would wake the reconcile).
//!
//! The NodeStage gate reads this node's LivediskRestores from a watch (a reflector store), not
//! from memory: after a restart of the node plugin the API server still knows which reverts wait,
//! where an in-memory list would have forgotten them and let a consumer in.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use livedisk_api::internal::restore::{LABEL_NAME, LABEL_NAMESPACE};
use livedisk_api::internal::{
    ErrorCode, LivediskRestore, LivediskRestoreStatus, NodeError, RestorePhase, RestoreWait,
};
use livedisk_engine::{Engine, EngineError, VolumeId};

use crate::grpc::error::{CsiError, node_error};

/// How soon a waiting revert looks again whether the volume is free.
pub const WAIT_RETRY: Duration = Duration::from_secs(2);

/// The condition reason of a revert waiting for its volume's consumer.
pub const VOLUME_IN_USE: &str = "VolumeInUse";
/// The condition reason of a revert waiting for another operation on its volume.
pub const VOLUME_BUSY: &str = "VolumeBusy";

/// How long NodeStage waits for the first list of this node's restores after a start.
const GATE_SYNC_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether the engine's record says a consumer has the volume attached (its writable export
/// exists). An unreadable record says no: the revert then reports the engine's error.
pub fn attached(engine: &Engine, volume: &VolumeId) -> bool {
    engine.record(volume).is_ok_and(|rec| {
        rec.exports
            .iter()
            .any(|e| e.target == livedisk_engine::record::ExportTarget::Volume)
    })
}

/// Pure: the wait of a revert whose volume a consumer has attached.
pub fn in_use(node: &str, volume: &str) -> RestoreWait {
    RestoreWait {
        reason: VOLUME_IN_USE.into(),
        message: format!(
            "volume {volume} is attached on node {node} (staged for a consumer); the revert starts once it is unstaged, and nothing has been changed"
        ),
    }
}

/// What a failed revert means: wait and try again, or fail for good.
#[derive(Clone, Debug, PartialEq)]
pub enum AfterError {
    Wait(RestoreWait),
    Fail(NodeError),
}

/// Pure: a revert's engine error, classified. `attached_now`: whether a consumer has the volume
/// attached after the refusal (a consumer that came between the node's look and the engine's
/// own check is the same wait, never a failure). Another operation holding the volume is a
/// wait too; anything else fails.
pub fn after_error(
    error: &EngineError,
    attached_now: bool,
    node: &str,
    volume: &str,
) -> AfterError {
    match error.code() {
        ErrorCode::FailedPrecondition if attached_now => AfterError::Wait(in_use(node, volume)),
        code if code.is_transient() => AfterError::Wait(RestoreWait {
            reason: VOLUME_BUSY.into(),
            message: format!(
                "another operation on volume {volume} runs; tried again in a few seconds: {}",
                livedisk_common::error_chain(error)
            ),
        }),
        _ => AfterError::Fail(node_error(error)),
    }
}

/// Pure: the status of a revert that waits.
pub fn waiting(
    previous: Option<&LivediskRestoreStatus>,
    generation: Option<i64>,
    wait: RestoreWait,
) -> LivediskRestoreStatus {
    LivediskRestoreStatus {
        observed_generation: generation,
        phase: RestorePhase::Pending,
        waiting_for: Some(wait),
        start_time: previous.and_then(|p| p.start_time.clone()),
        completion_time: None,
        error: None,
    }
}

/// Pure: the status reported right before the engine starts.
pub fn running(
    previous: Option<&LivediskRestoreStatus>,
    generation: Option<i64>,
    now: Timestamp,
) -> LivediskRestoreStatus {
    LivediskRestoreStatus {
        observed_generation: generation,
        phase: RestorePhase::Running,
        waiting_for: None,
        start_time: previous
            .and_then(|p| p.start_time.clone())
            .or(Some(Time(now))),
        completion_time: None,
        error: None,
    }
}

/// Pure: the terminal status, from the engine's answer.
pub fn finished(
    previous: Option<&LivediskRestoreStatus>,
    generation: Option<i64>,
    result: Result<(), NodeError>,
    now: Timestamp,
) -> LivediskRestoreStatus {
    let (phase, error) = match result {
        Ok(()) => (RestorePhase::Completed, None),
        Err(e) => (RestorePhase::Failed, Some(e)),
    };
    LivediskRestoreStatus {
        observed_generation: generation,
        phase,
        waiting_for: None,
        start_time: previous
            .and_then(|p| p.start_time.clone())
            .or(Some(Time(now))),
        completion_time: previous
            .and_then(|p| p.completion_time.clone())
            .or(Some(Time(now))),
        error,
    }
}

/// Pure: the restore of `volume` among `restores` that keeps it from being staged: one whose
/// revert waits or runs (no terminal phase yet).
pub fn blocking_restore<'a>(
    restores: impl IntoIterator<Item = &'a LivediskRestore>,
    volume: &str,
) -> Option<&'a LivediskRestore> {
    restores.into_iter().find(|r| {
        r.spec.volume_id == volume && !r.status.as_ref().is_some_and(|s| s.phase.is_terminal())
    })
}

/// This node's LivediskRestores, as NodeStage consults them.
#[derive(Clone)]
pub struct RestoreGate {
    store: Store<LivediskRestore>,
}

impl RestoreGate {
    /// Starts watching the LivediskRestores of `node_name` (in a task of its own).
    pub fn start(client: Client, node_name: &str) -> Self {
        let api: Api<LivediskRestore> = Api::all(client);
        let config = watcher::Config::default().fields(&format!("spec.nodeName={node_name}"));
        let (store, writer) = reflector::store();
        let stream = reflector::reflector(writer, watcher(api, config))
            .default_backoff()
            .applied_objects();
        tokio::spawn(async move {
            futures::pin_mut!(stream);
            while let Some(item) = stream.next().await {
                if let Err(error) = item {
                    tracing::warn!(%error, "watching this node's LivediskRestores");
                }
            }
        });
        Self { store }
    }

    /// FAILED_PRECONDITION while a revert of `volume` waits or runs on this node; UNAVAILABLE
    /// while the node does not know yet (its first list after a start has not come).
    pub async fn check(&self, volume: &VolumeId) -> Result<(), CsiError> {
        if tokio::time::timeout(GATE_SYNC_TIMEOUT, self.store.wait_until_ready())
            .await
            .is_err()
        {
            return Err(CsiError::Unavailable(
                "this node has not listed its LivediskRestores yet (is the API server reachable?); a volume is not staged before the node knows whether a revert waits for it".into(),
            ));
        }
        let restores = self.store.state();
        match blocking_restore(restores.iter().map(Arc::as_ref), volume.as_str()) {
            None => Ok(()),
            Some(restore) => Err(CsiError::FailedPrecondition(refusal(restore))),
        }
    }
}

/// Pure: NodeStage's refusal of a volume whose revert waits or runs, naming the DiskRestore.
fn refusal(restore: &LivediskRestore) -> String {
    let labels = restore.labels();
    let owner = match (labels.get(LABEL_NAMESPACE), labels.get(LABEL_NAME)) {
        (Some(ns), Some(name)) => format!("DiskRestore {ns}/{name}"),
        _ => "a DiskRestore".to_string(),
    };
    let phase = restore.status.as_ref().map(|s| s.phase).unwrap_or_default();
    format!(
        "volume {} is being reverted to snapshot {} by {owner} (LivediskRestore {}, {phase:?}); it cannot be staged until the revert ended or the DiskRestore is deleted",
        restore.spec.volume_id,
        restore.spec.snapshot_id,
        restore.name_any()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use livedisk_api::internal::LivediskRestoreSpec;

    const VOL: &str = "vol-00000000-0000-4000-8000-000000000001";

    fn restore(volume: &str, phase: Option<RestorePhase>) -> LivediskRestore {
        let mut r = LivediskRestore::new(
            "restore-1",
            LivediskRestoreSpec {
                node_name: "node-a".into(),
                volume_id: volume.into(),
                snapshot_id: "snap-00000000-0000-4000-8000-000000000009".into(),
            },
        );
        r.status = phase.map(|phase| LivediskRestoreStatus {
            phase,
            ..Default::default()
        });
        r
    }

    #[test]
    fn only_a_waiting_or_running_revert_of_the_volume_blocks_staging() {
        let other = "vol-00000000-0000-4000-8000-000000000002";
        for phase in [
            None,
            Some(RestorePhase::Pending),
            Some(RestorePhase::Running),
        ] {
            let list = [restore(VOL, phase)];
            assert!(blocking_restore(&list, VOL).is_some(), "{phase:?}");
            assert!(blocking_restore(&list, other).is_none());
        }
        for phase in [RestorePhase::Completed, RestorePhase::Failed] {
            assert!(blocking_restore(&[restore(VOL, Some(phase))], VOL).is_none());
        }
    }

    #[test]
    fn the_refusal_names_the_disk_restore() {
        let mut r = restore(VOL, Some(RestorePhase::Pending));
        r.metadata.labels = Some(
            [
                (LABEL_NAMESPACE.to_string(), "ns".to_string()),
                (LABEL_NAME.to_string(), "back".to_string()),
            ]
            .into(),
        );
        let message = refusal(&r);
        assert!(message.contains("DiskRestore ns/back"), "{message}");
        assert!(message.contains(VOL), "{message}");
        assert!(message.contains("Pending"), "{message}");
    }

    #[test]
    fn an_attached_refusal_waits_and_other_errors_fail() {
        let attached = EngineError::FailedPrecondition("volume v is attached".into());
        assert!(matches!(
            after_error(&attached, true, "n", VOL),
            AfterError::Wait(w) if w.reason == VOLUME_IN_USE && w.message.contains("node n")
        ));
        // The same code without a consumer (a snapshot being deleted) is a failure.
        assert!(matches!(
            after_error(&attached, false, "n", VOL),
            AfterError::Fail(e) if e.code == ErrorCode::FailedPrecondition
        ));
        let busy = EngineError::Busy("volume v".into());
        assert!(matches!(
            after_error(&busy, false, "n", VOL),
            AfterError::Wait(w) if w.reason == VOLUME_BUSY
        ));
        let foreign = EngineError::InvalidArgument("snapshot of another volume".into());
        assert!(matches!(
            after_error(&foreign, false, "n", VOL),
            AfterError::Fail(e) if e.code == ErrorCode::InvalidArgument
        ));
    }

    #[test]
    fn status_keeps_its_times_and_clears_the_wait() {
        let t1 = Timestamp::from_second(1_000).expect("time");
        let t2 = Timestamp::from_second(2_000).expect("time");
        let wait = waiting(None, Some(1), in_use("n", VOL));
        assert_eq!(wait.phase, RestorePhase::Pending);
        assert_eq!(wait.start_time, None);
        let run = running(Some(&wait), Some(1), t1);
        assert_eq!(run.phase, RestorePhase::Running);
        assert_eq!(run.waiting_for, None);
        assert_eq!(run.start_time, Some(Time(t1)));
        let done = finished(Some(&run), Some(1), Ok(()), t2);
        assert_eq!(done.phase, RestorePhase::Completed);
        assert_eq!(done.start_time, Some(Time(t1)));
        assert_eq!(done.completion_time, Some(Time(t2)));
        let failed = finished(
            Some(&run),
            Some(1),
            Err(NodeError {
                code: ErrorCode::NotFound,
                message: "gone".into(),
            }),
            t2,
        );
        assert_eq!(failed.phase, RestorePhase::Failed);
        assert_eq!(failed.error.map(|e| e.code), Some(ErrorCode::NotFound));
    }
}
