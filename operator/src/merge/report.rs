//! Pure: the DiskMerge's status from its node work's status (a refusal's is `decide::refused`).

use livedisk_api::Phase;
use livedisk_api::internal::{LivediskMergeStatus, MergePhase};

use crate::decide::{Decision, EventKind, Health, conditions};

/// How long a running merge waits before it is looked at again when nothing woke it: the watch
/// of its node work wakes it on every change (progress included), so this is only a safety net.
pub const RUNNING_RECHECK_SECONDS: u64 = 30;

/// The status of a DiskMerge from its node work's status. `merged_names` are the
/// VolumeSnapshots of the snapshots merged away so far.
pub fn from_node(
    node_name: &str,
    work: Option<&LivediskMergeStatus>,
    total: usize,
    merged_names: &[String],
) -> Decision {
    let status = work.cloned().unwrap_or_default();
    let mut fields = serde_json::Map::new();
    fields.insert("nodeName".into(), node_name.into());
    if let Some(p) = &status.progress {
        fields.insert(
            "progress".into(),
            serde_json::to_value(p).unwrap_or_default(),
        );
    }
    if let Some(t) = &status.start_time {
        fields.insert(
            "startTime".into(),
            serde_json::to_value(t).unwrap_or_default(),
        );
    }
    if let Some(t) = &status.completion_time {
        fields.insert(
            "completionTime".into(),
            serde_json::to_value(t).unwrap_or_default(),
        );
    }
    if !merged_names.is_empty() {
        fields.insert("mergedSnapshots".into(), merged_names.into());
    }
    let merged = describe(merged_names);
    let error = status.error.as_ref();
    let (phase, health, reason, message, event) = match status.phase {
        MergePhase::Pending => (
            Phase::Pending,
            Health::InProgress,
            "MergePending".to_string(),
            format!("waiting for node {node_name} to start merging {total} snapshot(s)"),
            EventKind::Normal,
        ),
        MergePhase::Running => (
            Phase::Running,
            Health::InProgress,
            "Merging".into(),
            format!(
                "node {node_name} merges snapshot {} of {total}{}{}",
                status.merged.len() + 1,
                status
                    .current_snapshot_id
                    .as_ref()
                    .map(|s| format!(" ({s})"))
                    .unwrap_or_default(),
                error
                    .map(|e| format!("; waiting, retried every few seconds: {}", e.message))
                    .unwrap_or_default()
            ),
            EventKind::Normal,
        ),
        MergePhase::Completed => (
            Phase::Completed,
            Health::Ready,
            "MergeCompleted".into(),
            format!("merged {total} snapshot(s) away; {merged}"),
            EventKind::Normal,
        ),
        MergePhase::Cancelled => (
            Phase::Cancelled,
            Health::Stalled,
            "Cancelled".into(),
            format!(
                "cancelled after {} of {total} snapshot(s); {merged}; node: {}",
                status.merged.len(),
                error.map(|e| e.message.as_str()).unwrap_or("stopped")
            ),
            EventKind::Normal,
        ),
        MergePhase::Failed => (
            Phase::Failed,
            Health::Stalled,
            error
                .map(|e| e.code.reason().to_string())
                .unwrap_or_else(|| "MergeFailed".into()),
            format!(
                "merge failed after {} of {total} snapshot(s); {merged}; node: {}",
                status.merged.len(),
                error.map(|e| e.message.as_str()).unwrap_or("no detail")
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
            RUNNING_RECHECK_SECONDS
        },
        fields,
    }
}

fn describe(merged_names: &[String]) -> String {
    if merged_names.is_empty() {
        "no snapshot was merged away".into()
    } else {
        format!(
            "the DiskSnapshots and VolumeSnapshots (and their contents) of the merged snapshots are deleted: {}",
            merged_names.join(", ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::{condition, refused};
    use crate::merge::plan::Refusal;
    use livedisk_api::Progress;
    use livedisk_api::conditions::{READY, RECONCILING, STALLED, Status};
    use livedisk_api::internal::{ErrorCode, NodeError};

    #[test]
    fn a_refusal_waits_or_fails_and_says_nothing_was_done() {
        let waiting = refused(&Refusal::ClaimNotFound("disk".into()));
        assert_eq!(waiting.phase, Phase::Pending);
        assert_eq!(condition(&waiting, RECONCILING).0, Status::True);
        let failed = refused(&Refusal::Retained("VolumeSnapshot ns/a".into()));
        assert_eq!(failed.phase, Phase::Failed);
        assert_eq!(
            condition(&failed, STALLED),
            (Status::True, "RetainedSnapshotInRange".into())
        );
        assert!(failed.conditions[0].message.contains("nothing was merged"));
    }

    #[test]
    fn the_node_works_phases_become_the_merges() {
        let mut work = LivediskMergeStatus {
            phase: MergePhase::Running,
            progress: Some(Progress::new(1, 4, Some(9))),
            current_snapshot_id: Some("snap-a".into()),
            ..Default::default()
        };
        let running = from_node("node-a", Some(&work), 2, &[]);
        assert_eq!(running.phase, Phase::Running);
        assert_eq!(running.fields["progress"]["percent"], 25);
        assert_eq!(running.fields["nodeName"], "node-a");
        assert_eq!(running.requeue_seconds, RUNNING_RECHECK_SECONDS);
        assert!(running.conditions[0].message.contains("1 of 2 (snap-a)"));
        work.error = Some(NodeError {
            code: ErrorCode::Aborted,
            message: "volume v (merge of snap-z in flight)".into(),
        });
        let waiting = from_node("node-a", Some(&work), 2, &[]);
        assert_eq!(waiting.phase, Phase::Running);
        assert!(waiting.conditions[0].message.contains("waiting, retried"));
        assert!(waiting.conditions[0].message.contains("snap-z in flight"));
        work.error = None;

        work.phase = MergePhase::Completed;
        work.merged = vec!["snap-a".into(), "snap-b".into()];
        let done = from_node("node-a", Some(&work), 2, &["a".into(), "b".into()]);
        assert_eq!(done.phase, Phase::Completed);
        assert_eq!(
            condition(&done, READY),
            (Status::True, "MergeCompleted".into())
        );
        assert_eq!(
            done.fields["mergedSnapshots"],
            serde_json::json!(["a", "b"])
        );
        assert!(done.conditions[0].message.contains("are deleted: a, b"));

        work.phase = MergePhase::Cancelled;
        work.merged = vec![];
        work.error = Some(NodeError {
            code: ErrorCode::Cancelled,
            message: "merge job m1 was cancelled; the snapshot stays in state deleting".into(),
        });
        let cancelled = from_node("node-a", Some(&work), 2, &[]);
        assert_eq!(cancelled.phase, Phase::Cancelled);
        assert_eq!(condition(&cancelled, STALLED).1, "Cancelled");
        assert!(
            cancelled.conditions[0]
                .message
                .contains("stays in state deleting")
        );

        work.phase = MergePhase::Failed;
        work.error = Some(NodeError {
            code: ErrorCode::FailedPrecondition,
            message: "exported".into(),
        });
        let failed = from_node("node-a", Some(&work), 2, &[]);
        assert_eq!(failed.phase, Phase::Failed);
        assert_eq!(condition(&failed, READY).1, "FailedPrecondition");
        assert_eq!(failed.event, EventKind::Warning);
    }
}
