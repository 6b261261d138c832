//! What the node agent reports in its objects' status, decided from what the engine answered.
//! Pure functions, unit-tested here; `agent.rs` applies the result with server-side apply.
//!
//! Every status carries the `Ready`, `Reconciling` and `Stalled` conditions (see
//! `livedisk_api::conditions`), so `kubectl wait` and kstatus-based tools read these internal
//! objects like any other.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, MicroTime};
use k8s_openapi::jiff::Timestamp;
use livedisk_api::Progress;
use livedisk_api::conditions::{
    ConditionUpdate, READY, RECONCILING, STALLED, Status, set_condition,
};
use livedisk_api::internal::{
    ErrorCode, LivediskSnapshotStatus, LivediskVolumeStatus, NodeError, NodePhase,
};

/// Whether a failure may go away by itself, so that the same spec is simply tried again. Every
/// other failure needs a person (or, for a failed create, the controller, which removes the
/// object and answers the CSI call with the error).
pub fn transient(code: ErrorCode) -> bool {
    // The one retry classification of the code vocabulary.
    code.is_transient()
}

/// The phase a failed create reports: `Pending` (tried again) while the failure is transient,
/// else `Failed`.
pub fn failed_create_phase(error: &NodeError) -> NodePhase {
    if transient(error.code) {
        NodePhase::Pending
    } else {
        NodePhase::Failed
    }
}

/// What the node knows about a volume at the end of one reconcile.
#[derive(Debug, Clone, PartialEq)]
pub struct VolumeReport {
    pub phase: NodePhase,
    /// The size the volume has on the node.
    pub capacity_bytes: Option<i64>,
    /// A flatten still running (a volume made from a snapshot or a volume).
    pub progress: Option<Progress>,
    pub error: Option<NodeError>,
}

/// What the node knows about a snapshot at the end of one reconcile.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotReport {
    pub phase: NodePhase,
    pub ready_to_use: bool,
    pub size_bytes: Option<i64>,
    pub creation_time: Option<MicroTime>,
    /// Bytes the snapshot's layer takes in the pool.
    pub allocated_bytes: Option<i64>,
    /// How far the deletion merge is, while `Deleting`.
    pub progress: Option<Progress>,
    pub error: Option<NodeError>,
}

/// The whole status of a volume: the report, and conditions carried over from `previous` (their
/// transition times move only when their status does).
pub fn volume_status(
    previous: Option<&LivediskVolumeStatus>,
    generation: Option<i64>,
    report: VolumeReport,
    now: Timestamp,
) -> LivediskVolumeStatus {
    let mut conditions = previous.map(|s| s.conditions.clone()).unwrap_or_default();
    set_conditions(
        &mut conditions,
        Facts {
            phase: report.phase,
            background: report.progress.is_some(),
            error: report.error.as_ref(),
        },
        generation,
        now,
    );
    LivediskVolumeStatus {
        observed_generation: generation,
        phase: report.phase,
        capacity_bytes: report.capacity_bytes,
        error: report.error,
        progress: report.progress,
        conditions,
    }
}

/// The whole status of a snapshot (see [`volume_status`]).
pub fn snapshot_status(
    previous: Option<&LivediskSnapshotStatus>,
    generation: Option<i64>,
    report: SnapshotReport,
    now: Timestamp,
) -> LivediskSnapshotStatus {
    let mut conditions = previous.map(|s| s.conditions.clone()).unwrap_or_default();
    set_conditions(
        &mut conditions,
        Facts {
            phase: report.phase,
            background: false,
            error: report.error.as_ref(),
        },
        generation,
        now,
    );
    LivediskSnapshotStatus {
        observed_generation: generation,
        phase: report.phase,
        ready_to_use: report.ready_to_use,
        size_bytes: report.size_bytes,
        creation_time: report.creation_time,
        allocated_bytes: report.allocated_bytes,
        progress: report.progress,
        error: report.error,
        conditions,
    }
}

/// What the conditions are derived from.
struct Facts<'a> {
    phase: NodePhase,
    /// Work goes on in the background although the object is usable (a flatten).
    background: bool,
    error: Option<&'a NodeError>,
}

fn set_conditions(
    conditions: &mut Vec<Condition>,
    facts: Facts<'_>,
    generation: Option<i64>,
    now: Timestamp,
) {
    let phase = phase_name(facts.phase);
    let ready = facts.phase == NodePhase::Ready;
    let (ready_reason, ready_message) = if ready {
        ("Ready", "it exists on the node and can be used")
    } else {
        (phase, "it cannot be used now")
    };
    set_condition(
        conditions,
        ConditionUpdate::new(READY, status(ready), ready_reason, ready_message),
        generation,
        now,
    );

    let working = matches!(
        facts.phase,
        NodePhase::Pending | NodePhase::Creating | NodePhase::Deleting
    );
    let (reconciling_reason, reconciling_message) = if working {
        (phase, "the node is working on it")
    } else if facts.background {
        ("Flattening", "its data is being copied in the background")
    } else {
        ("Reconciled", "the node has done what the spec asks")
    };
    set_condition(
        conditions,
        ConditionUpdate::new(
            RECONCILING,
            status(working || facts.background),
            reconciling_reason,
            reconciling_message,
        ),
        generation,
        now,
    );

    // Stalled: an error that retrying the same spec does not fix. The node still retries a
    // deletion (what stands in its way, like a consumer still attached, may go away).
    let stalled = facts
        .error
        .filter(|e| facts.phase == NodePhase::Failed || !transient(e.code));
    let update = match stalled {
        Some(error) => ConditionUpdate::new(
            STALLED,
            Status::True,
            format!("{:?}", error.code),
            error.message.clone(),
        ),
        None => ConditionUpdate::new(
            STALLED,
            Status::False,
            "NoError",
            "nothing stands in the way",
        ),
    };
    set_condition(conditions, update, generation, now);
}

fn status(value: bool) -> Status {
    if value { Status::True } else { Status::False }
}

fn phase_name(phase: NodePhase) -> &'static str {
    match phase {
        NodePhase::Pending => "Pending",
        NodePhase::Creating => "Creating",
        NodePhase::Ready => "Ready",
        NodePhase::Failed => "Failed",
        NodePhase::Deleting => "Deleting",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use livedisk_api::conditions::{find, is_true};

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(seconds).expect("valid timestamp")
    }

    fn error(code: ErrorCode) -> NodeError {
        NodeError {
            code,
            message: "volume vol-x is attached; detach it first".into(),
        }
    }

    fn volume(phase: NodePhase, error: Option<NodeError>) -> VolumeReport {
        VolumeReport {
            phase,
            capacity_bytes: Some(1 << 20),
            progress: None,
            error,
        }
    }

    #[test]
    fn only_aborted_unavailable_and_internal_are_retried_as_they_are() {
        assert!(transient(ErrorCode::Aborted));
        assert!(transient(ErrorCode::Unavailable));
        assert!(transient(ErrorCode::Internal));
        assert!(!transient(ErrorCode::FailedPrecondition));
        assert_eq!(
            failed_create_phase(&error(ErrorCode::OutOfRange)),
            NodePhase::Failed
        );
        assert_eq!(
            failed_create_phase(&error(ErrorCode::Unavailable)),
            NodePhase::Pending
        );
    }

    #[test]
    fn a_ready_volume_is_ready_and_reconciled() {
        let s = volume_status(None, Some(2), volume(NodePhase::Ready, None), at(10));
        assert_eq!(s.phase, NodePhase::Ready);
        assert_eq!(s.observed_generation, Some(2));
        assert!(is_true(&s.conditions, READY));
        assert!(!is_true(&s.conditions, RECONCILING));
        assert!(!is_true(&s.conditions, STALLED));
        assert!(
            s.conditions
                .iter()
                .all(|c| c.observed_generation == Some(2))
        );
    }

    #[test]
    fn a_flattening_volume_is_ready_and_reconciling_with_progress() {
        let mut report = volume(NodePhase::Ready, None);
        report.progress = Some(Progress::new(1, 4, None));
        let s = volume_status(None, Some(1), report, at(10));
        assert!(is_true(&s.conditions, READY));
        assert!(is_true(&s.conditions, RECONCILING));
        assert_eq!(
            find(&s.conditions, RECONCILING).map(|c| c.reason.as_str()),
            Some("Flattening")
        );
        assert_eq!(s.progress.map(|p| p.percent), Some(25));
    }

    #[test]
    fn a_failing_deletion_is_in_status_typed_and_stalled() {
        let ready = volume_status(None, Some(1), volume(NodePhase::Ready, None), at(10));
        let failed = volume_status(
            Some(&ready),
            Some(1),
            volume(
                NodePhase::Deleting,
                Some(error(ErrorCode::FailedPrecondition)),
            ),
            at(20),
        );
        assert_eq!(failed.phase, NodePhase::Deleting);
        assert_eq!(
            failed.error.as_ref().map(|e| e.code),
            Some(ErrorCode::FailedPrecondition)
        );
        let stalled = find(&failed.conditions, STALLED).expect("Stalled");
        assert_eq!(stalled.status, "True");
        assert_eq!(stalled.reason, "FailedPrecondition");
        assert_eq!(stalled.last_transition_time, Time(at(20)));
        assert!(!is_true(&failed.conditions, READY));
        assert!(is_true(&failed.conditions, RECONCILING));
        // A transient failure is retried without calling for a person.
        let busy = volume_status(
            Some(&failed),
            Some(1),
            volume(NodePhase::Deleting, Some(error(ErrorCode::Aborted))),
            at(30),
        );
        assert!(!is_true(&busy.conditions, STALLED));
    }

    #[test]
    fn an_unchanged_report_keeps_every_transition_time() {
        let first = volume_status(None, Some(1), volume(NodePhase::Ready, None), at(10));
        let again = volume_status(
            Some(&first),
            Some(1),
            volume(NodePhase::Ready, None),
            at(99),
        );
        assert_eq!(first, again);
    }

    #[test]
    fn a_failed_snapshot_is_stalled_and_not_ready() {
        let s = snapshot_status(
            None,
            Some(1),
            SnapshotReport {
                phase: NodePhase::Failed,
                ready_to_use: false,
                size_bytes: None,
                creation_time: None,
                allocated_bytes: None,
                progress: None,
                error: Some(error(ErrorCode::NotFound)),
            },
            at(10),
        );
        assert!(is_true(&s.conditions, STALLED));
        assert!(!is_true(&s.conditions, READY));
        assert!(!is_true(&s.conditions, RECONCILING));
    }

    #[test]
    fn a_snapshot_keeps_its_cut_to_the_microsecond_through_the_api() {
        let cut = Timestamp::new(1_800_000_000, 123_456_789).expect("valid timestamp");
        let s = snapshot_status(
            None,
            Some(1),
            SnapshotReport {
                phase: NodePhase::Ready,
                ready_to_use: true,
                size_bytes: Some(1 << 20),
                creation_time: Some(MicroTime(cut)),
                allocated_bytes: None,
                progress: None,
                error: None,
            },
            at(10),
        );
        let json = serde_json::to_value(&s).expect("serializes");
        assert_eq!(json["creationTime"], "2027-01-15T08:00:00.123456Z");
        let back: LivediskSnapshotStatus = serde_json::from_value(json).expect("parses");
        let kept = back.creation_time.expect("creation time").0;
        assert_eq!(kept.as_second(), 1_800_000_000);
        assert_eq!(kept.subsec_nanosecond(), 123_456_000);
    }
}
