//! Pure: the DiskRestore's status from its node work's status (a refusal's is `decide::refused`).

use livedisk_api::Phase;
use livedisk_api::internal::{LivediskRestoreSpec, LivediskRestoreStatus, RestorePhase};

use crate::decide::{Decision, EventKind, Health, conditions};

/// How long a waiting or running revert waits before it is looked at again when nothing woke it:
/// the watch of its node work wakes it on every change (the node writes what it waits for, and
/// its phase), so this is only a safety net.
pub const ACTIVE_RECHECK_SECONDS: u64 = 30;

/// The reason of a completed revert.
pub const RESTORED: &str = "Restored";

/// The status of a DiskRestore from its node work. `snapshot_name`: the DiskSnapshot reverted to.
pub fn from_node(
    work: &LivediskRestoreSpec,
    status: Option<&LivediskRestoreStatus>,
    snapshot_name: &str,
) -> Decision {
    let status = status.cloned().unwrap_or_default();
    let node = &work.node_name;
    let volume = &work.volume_id;
    let (phase, health, reason, message, event) = match (status.phase, &status.waiting_for) {
        (RestorePhase::Pending, Some(wait)) => (
            Phase::Pending,
            Health::InProgress,
            wait.reason.clone(),
            wait.message.clone(),
            EventKind::Warning,
        ),
        (RestorePhase::Pending, None) => (
            Phase::Pending,
            Health::InProgress,
            "RestorePending".into(),
            format!("waiting for node {node} to start reverting volume {volume}"),
            EventKind::Normal,
        ),
        (RestorePhase::Running, _) => (
            Phase::Running,
            Health::InProgress,
            "Reverting".into(),
            format!(
                "node {node} reverts volume {volume} to DiskSnapshot {snapshot_name:?}; a revert is not cancellable midway"
            ),
            EventKind::Normal,
        ),
        (RestorePhase::Completed, _) => (
            Phase::Completed,
            Health::Ready,
            RESTORED.into(),
            format!(
                "volume {volume} holds the data of DiskSnapshot {snapshot_name:?}; writes made after that snapshot are discarded, and every snapshot (newer ones too) is kept"
            ),
            EventKind::Normal,
        ),
        (RestorePhase::Failed, _) => (
            Phase::Failed,
            Health::Stalled,
            status
                .error
                .as_ref()
                .map(|e| e.code.reason().to_string())
                .unwrap_or_else(|| "RestoreFailed".into()),
            format!(
                "the revert of volume {volume} on node {node} failed and the volume is as it was: {}",
                status
                    .error
                    .as_ref()
                    .map(|e| e.message.as_str())
                    .unwrap_or("no detail")
            ),
            EventKind::Warning,
        ),
    };
    Decision {
        phase,
        conditions: conditions(health, &reason, &message),
        event,
        requeue_seconds: if status.phase.is_terminal() {
            300
        } else {
            ACTIVE_RECHECK_SECONDS
        },
        fields: Default::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::{condition, refused};
    use crate::restore::plan::Refusal;
    use livedisk_api::conditions::{READY, RECONCILING, STALLED, Status};
    use livedisk_api::internal::{ErrorCode, NodeError, RestoreWait};

    fn work() -> LivediskRestoreSpec {
        LivediskRestoreSpec {
            node_name: "node-a".into(),
            volume_id: "vol-1".into(),
            snapshot_id: "snap-1".into(),
        }
    }

    #[test]
    fn a_refusal_waits_or_fails_and_says_nothing_was_done() {
        let waiting = refused(&Refusal::SnapshotNotFound("s1".into()));
        assert_eq!(waiting.phase, Phase::Pending);
        assert_eq!(
            condition(&waiting, RECONCILING),
            (Status::True, "ReferenceNotFound".into())
        );
        let failed = refused(&Refusal::OtherVolume {
            snapshot: "s".into(),
            claim: "c".into(),
        });
        assert_eq!(failed.phase, Phase::Failed);
        assert_eq!(
            condition(&failed, STALLED),
            (Status::True, "SnapshotOfAnotherVolume".into())
        );
        assert!(
            failed.conditions[0]
                .message
                .contains("nothing was reverted")
        );
    }

    #[test]
    fn the_node_works_phases_become_the_restores() {
        let pending = from_node(&work(), None, "s1");
        assert_eq!(pending.phase, Phase::Pending);
        assert_eq!(condition(&pending, READY).1, "RestorePending");
        assert_eq!(pending.requeue_seconds, ACTIVE_RECHECK_SECONDS);

        let mut status = LivediskRestoreStatus {
            waiting_for: Some(RestoreWait {
                reason: "VolumeInUse".into(),
                message: "volume vol-1 is attached on node node-a".into(),
            }),
            ..Default::default()
        };
        let in_use = from_node(&work(), Some(&status), "s1");
        assert_eq!(in_use.phase, Phase::Pending);
        assert_eq!(
            condition(&in_use, RECONCILING),
            (Status::True, "VolumeInUse".into())
        );
        assert!(
            in_use.conditions[0]
                .message
                .contains("attached on node node-a")
        );

        status.waiting_for = None;
        status.phase = RestorePhase::Running;
        assert_eq!(
            from_node(&work(), Some(&status), "s1").phase,
            Phase::Running
        );

        status.phase = RestorePhase::Completed;
        let done = from_node(&work(), Some(&status), "s1");
        assert_eq!(done.phase, Phase::Completed);
        assert_eq!(condition(&done, READY), (Status::True, RESTORED.into()));
        assert!(done.conditions[0].message.contains("every snapshot"));

        status.phase = RestorePhase::Failed;
        status.error = Some(NodeError {
            code: ErrorCode::NotFound,
            message: "snapshot gone".into(),
        });
        let failed = from_node(&work(), Some(&status), "s1");
        assert_eq!(failed.phase, Phase::Failed);
        assert_eq!(
            condition(&failed, STALLED),
            (Status::True, "NotFound".into())
        );
        assert!(failed.conditions[0].message.contains("snapshot gone"));
        assert_eq!(failed.event, EventKind::Warning);
    }
}
