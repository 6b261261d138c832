//! The pure heart of reconciliation: from what was observed to what the status must say.
//!
//! No I/O here, so every branch is unit-tested.

use livedisk_api::Phase;
use livedisk_api::conditions::{ConditionUpdate, READY, RECONCILING, STALLED, Status};
use livedisk_common::ErrorCode;

use crate::kinds::Reference;
use crate::standard::WorkState;

/// Everything the decision needs to know about the cluster.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observation {
    /// References that do not exist (yet).
    pub missing: Vec<Reference>,
    /// Whether the livedisk CSIDriver object is registered in the cluster.
    pub driver_registered: bool,
}

/// What the status should say, and whether that deserves an Event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub phase: Phase,
    pub conditions: Vec<ConditionUpdate>,
    pub event: EventKind,
    /// Look again after this many seconds even if nothing changes (references may appear).
    pub requeue_seconds: u64,
    /// Kind-specific status fields to set (for example `volumeSnapshotName`).
    pub fields: serde_json::Map<String, serde_json::Value>,
}

impl Observation {
    /// Whether the work may start: every reference exists and the driver is registered.
    pub fn ready_for_work(&self) -> bool {
        self.missing.is_empty() && self.driver_registered
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Normal,
    Warning,
}

pub use livedisk_common::DRIVER_NAME as CSI_DRIVER_NAME;

/// Decides the status of a livedisk object of kind `kind` from an observation.
///
/// Used for the requests whose work this version does not carry out (a DiskSnapshot of a
/// VirtualMachine): the honest answer is `Ready=False` with the reason why. The kinds with work
/// of their own decide it in their modules.
pub fn decide(kind: &str, observation: &Observation, work: Option<&WorkState>) -> Decision {
    if !observation.missing.is_empty() {
        let names: Vec<String> = observation
            .missing
            .iter()
            .map(ToString::to_string)
            .collect();
        let message = format!(
            "waiting for {} to exist in this namespace",
            names.join(", ")
        );
        return waiting("ReferenceNotFound", message, EventKind::Warning, 30);
    }
    if !observation.driver_registered {
        let message = format!(
            "the livedisk CSI driver (CSIDriver {CSI_DRIVER_NAME}) is not registered in this cluster; nothing has been done yet"
        );
        return waiting("WaitingForDriver", message, EventKind::Normal, 60);
    }
    if let Some(state) = work {
        return decide_work(state);
    }
    let message = format!(
        "the {kind} request is valid and its references exist, but this livedisk version does not carry out {kind} work yet; nothing has been done"
    );
    Decision {
        phase: Phase::Pending,
        conditions: conditions(Health::Stalled, "NotSupportedYet", &message),
        event: EventKind::Warning,
        requeue_seconds: 300,
        fields: Default::default(),
    }
}

/// How long a DiskSnapshot whose VolumeSnapshot is being taken waits before it is looked at
/// again when nothing woke it: the VolumeSnapshot's and its content's watches wake it on every
/// change, so this is only a safety net.
pub(crate) const WATCHED_RECHECK_SECONDS: u64 = 60;

/// The status of a resource whose standard object exists, from that object's state.
pub(crate) fn decide_work(state: &WorkState) -> Decision {
    let mut fields = serde_json::Map::new();
    match state {
        WorkState::InProgress { object } => {
            fields.insert("volumeSnapshotName".into(), object.clone().into());
            let message = format!("VolumeSnapshot {object} is being taken");
            Decision {
                phase: Phase::Running,
                conditions: conditions(Health::InProgress, "SnapshotInProgress", &message),
                event: EventKind::Normal,
                requeue_seconds: WATCHED_RECHECK_SECONDS,
                fields,
            }
        }
        WorkState::Failed { object, message } => {
            // The snapshot-controller keeps retrying after an error (an unbound PVC is one), so
            // this is reported as still in progress, with the error for people to read.
            fields.insert("volumeSnapshotName".into(), object.clone().into());
            let message = format!("VolumeSnapshot {object} reports: {message}");
            Decision {
                phase: Phase::Pending,
                conditions: conditions(Health::InProgress, "SnapshotError", &message),
                event: EventKind::Warning,
                requeue_seconds: WATCHED_RECHECK_SECONDS,
                fields,
            }
        }
        WorkState::Ready {
            object,
            restore_size,
            creation_time,
        } => {
            fields.insert("volumeSnapshotName".into(), object.clone().into());
            if let Some(size) = restore_size {
                fields.insert("restoreSize".into(), size.clone().into());
            }
            if let Some(time) = creation_time {
                fields.insert("creationTime".into(), time.clone().into());
            }
            let message = format!("VolumeSnapshot {object} is ready to use");
            Decision {
                phase: Phase::Ready,
                conditions: conditions(Health::Ready, "SnapshotReady", &message),
                event: EventKind::Normal,
                requeue_seconds: 300,
                fields,
            }
        }
    }
}

/// The conditions of an object whose reconcile failed with a permanent error: `Stalled=True`
/// (kstatus "failed": nothing will happen without a person), the error's code as the reason.
pub fn failure_conditions(code: ErrorCode, message: &str) -> Vec<ConditionUpdate> {
    conditions(Health::Stalled, code.reason(), message)
}

/// Why an object's references do not allow it to start (each kind that checks its references
/// before handing work to a node has its own). Its text is the condition message.
pub trait Refusal: std::fmt::Display {
    /// The condition reason.
    fn reason(&self) -> &'static str;
    /// Whether it can go away without a change of the object (a reference that appears, binds
    /// or becomes ready): then the object waits, else it fails.
    fn may_resolve(&self) -> bool;
}

/// The status of an object whose references do not allow it to start; nothing was done.
pub fn refused(refusal: &impl Refusal) -> Decision {
    let (health, phase, requeue) = if refusal.may_resolve() {
        (Health::InProgress, Phase::Pending, 15)
    } else {
        (Health::Stalled, Phase::Failed, 300)
    };
    Decision {
        phase,
        conditions: conditions(health, refusal.reason(), &refusal.to_string()),
        event: EventKind::Warning,
        requeue_seconds: requeue,
        fields: Default::default(),
    }
}

/// The three states kstatus tells apart, each a fixed combination of the three conditions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Health {
    /// Ready=False, Reconciling=True: work is under way or waiting for something that will come.
    InProgress,
    /// Ready=False, Stalled=True: nothing will happen without a person.
    Stalled,
    /// Ready=True: the result exists.
    Ready,
}

/// Ready, Reconciling and Stalled for a health, all with the same reason and message.
pub(crate) fn conditions(health: Health, reason: &str, message: &str) -> Vec<ConditionUpdate> {
    let (ready, reconciling, stalled) = match health {
        Health::InProgress => (Status::False, Status::True, Status::False),
        Health::Stalled => (Status::False, Status::False, Status::True),
        Health::Ready => (Status::True, Status::False, Status::False),
    };
    vec![
        ConditionUpdate::new(READY, ready, reason, message),
        ConditionUpdate::new(RECONCILING, reconciling, reason, message),
        ConditionUpdate::new(STALLED, stalled, reason, message),
    ]
}

fn waiting(reason: &str, message: String, event: EventKind, requeue_seconds: u64) -> Decision {
    Decision {
        phase: Phase::Pending,
        conditions: conditions(Health::InProgress, reason, &message),
        event,
        requeue_seconds,
        fields: Default::default(),
    }
}

/// The status and reason of the condition `type_` of a decision (which must set it).
#[cfg(test)]
pub(crate) fn condition(decision: &Decision, type_: &str) -> (Status, String) {
    let c = decision
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .expect("condition");
    (c.status, c.reason.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct TestRefusal(&'static str, bool);

    impl std::fmt::Display for TestRefusal {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "refused for {}", self.0)
        }
    }

    impl Refusal for TestRefusal {
        fn reason(&self) -> &'static str {
            self.0
        }
        fn may_resolve(&self) -> bool {
            self.1
        }
    }

    #[test]
    fn a_refusal_that_may_resolve_waits_and_one_that_cannot_fails() {
        let waiting = refused(&TestRefusal("ClaimNotBound", true));
        assert_eq!(waiting.phase, Phase::Pending);
        assert_eq!(
            condition(&waiting, RECONCILING),
            (Status::True, "ClaimNotBound".into())
        );
        assert_eq!(waiting.requeue_seconds, 15);
        assert_eq!(waiting.event, EventKind::Warning);
        assert_eq!(waiting.conditions[0].message, "refused for ClaimNotBound");
        let failed = refused(&TestRefusal("OtherDriver", false));
        assert_eq!(failed.phase, Phase::Failed);
        assert_eq!(
            condition(&failed, STALLED),
            (Status::True, "OtherDriver".into())
        );
        assert_eq!(failed.requeue_seconds, 300);
        assert!(failed.fields.is_empty());
    }

    #[test]
    fn snapshot_status_follows_its_volume_snapshot() {
        let ready = WorkState::Ready {
            object: "s".into(),
            restore_size: Some("1Gi".into()),
            creation_time: None,
        };
        let observation = Observation {
            missing: vec![],
            driver_registered: true,
        };
        let decision = decide("DiskSnapshot", &observation, Some(&ready));
        assert_eq!(decision.phase, Phase::Ready);
        assert_eq!(decision.conditions[0].status, Status::True);
        assert_eq!(decision.fields["restoreSize"], "1Gi");
        let failed = WorkState::Failed {
            object: "s".into(),
            message: "no space".into(),
        };
        let decision = decide("DiskSnapshot", &observation, Some(&failed));
        assert_eq!(decision.conditions[0].reason, "SnapshotError");
        assert!(
            decision
                .conditions
                .iter()
                .any(|c| c.type_ == RECONCILING && c.status == Status::True)
        );
        assert!(decision.conditions[0].message.contains("no space"));
        // Missing references win over a stale work state.
        let waiting = Observation {
            missing: vec![Reference::PersistentVolumeClaim("p".into())],
            driver_registered: true,
        };
        assert_eq!(
            decide("DiskSnapshot", &waiting, Some(&ready)).conditions[0].reason,
            "ReferenceNotFound"
        );
    }

    fn ready(decision: &Decision) -> &ConditionUpdate {
        decision
            .conditions
            .iter()
            .find(|c| c.type_ == READY)
            .expect("Ready condition")
    }

    #[test]
    fn missing_reference_is_named_and_reconciling() {
        let decision = decide(
            "DiskSnapshot",
            &Observation {
                missing: vec![Reference::PersistentVolumeClaim("disk-a".into())],
                driver_registered: true,
            },
            None,
        );
        assert_eq!(decision.phase, Phase::Pending);
        assert_eq!(ready(&decision).status, Status::False);
        assert_eq!(ready(&decision).reason, "ReferenceNotFound");
        assert!(
            ready(&decision)
                .message
                .contains("PersistentVolumeClaim \"disk-a\"")
        );
        assert!(
            decision
                .conditions
                .iter()
                .any(|c| c.type_ == RECONCILING && c.status == Status::True)
        );
    }

    #[test]
    fn without_driver_nothing_is_claimed() {
        let decision = decide("DiskMerge", &Observation::default(), None);
        assert_eq!(ready(&decision).status, Status::False);
        assert_eq!(ready(&decision).reason, "WaitingForDriver");
        assert!(ready(&decision).message.contains("nothing has been done"));
    }

    #[test]
    fn a_permanent_failure_stalls_with_its_code_as_reason() {
        let conditions = failure_conditions(ErrorCode::PermissionDenied, "forbidden");
        let status_of = |type_| {
            conditions
                .iter()
                .find(|c| c.type_ == type_)
                .map(|c| (c.status, c.reason.as_str(), c.message.as_str()))
        };
        assert_eq!(
            status_of(READY),
            Some((Status::False, "PermissionDenied", "forbidden"))
        );
        assert_eq!(
            status_of(STALLED),
            Some((Status::True, "PermissionDenied", "forbidden"))
        );
        assert_eq!(
            status_of(RECONCILING),
            Some((Status::False, "PermissionDenied", "forbidden"))
        );
    }

    #[test]
    fn never_ready_for_work_not_done() {
        // A DiskSnapshot of a VirtualMachine: valid, its references exist, no work yet.
        let decision = decide(
            "DiskSnapshot",
            &Observation {
                missing: vec![],
                driver_registered: true,
            },
            None,
        );
        assert_eq!(ready(&decision).status, Status::False);
        assert_eq!(ready(&decision).reason, "NotSupportedYet");
        assert!(
            decision
                .conditions
                .iter()
                .any(|c| c.type_ == STALLED && c.status == Status::True)
        );
    }
}
