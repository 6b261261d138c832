//! The pure heart of reconciliation: from what was observed to what the status must say.
//!
//! No I/O here, so every branch is unit-tested.

use livedisk_api::Phase;
use livedisk_api::conditions::{ConditionUpdate, READY, RECONCILING, STALLED, Status};

use crate::kinds::Reference;

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
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Normal,
    Warning,
}

pub const CSI_DRIVER_NAME: &str = "csi.livedisk.io";

/// Decides the status of a livedisk object of kind `kind` from an observation.
///
/// This revision of the operator performs no storage work itself: until the CSI driver and the
/// node engine carry out the request, the honest answer is `Ready=False` with the reason why.
pub fn decide(kind: &str, observation: &Observation) -> Decision {
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
    let message = format!(
        "the {kind} request is valid and its references exist, but this livedisk version does not carry out {kind} work yet; nothing has been done"
    );
    Decision {
        phase: Phase::Pending,
        conditions: vec![
            ConditionUpdate::new(READY, Status::False, "NotSupportedYet", message.clone()),
            ConditionUpdate::new(
                RECONCILING,
                Status::False,
                "NotSupportedYet",
                message.clone(),
            ),
            ConditionUpdate::new(STALLED, Status::True, "NotSupportedYet", message),
        ],
        event: EventKind::Warning,
        requeue_seconds: 300,
    }
}

fn waiting(reason: &str, message: String, event: EventKind, requeue_seconds: u64) -> Decision {
    Decision {
        phase: Phase::Pending,
        conditions: vec![
            ConditionUpdate::new(READY, Status::False, reason, message.clone()),
            ConditionUpdate::new(RECONCILING, Status::True, reason, message.clone()),
            ConditionUpdate::new(STALLED, Status::False, reason, message),
        ],
        event,
        requeue_seconds,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let decision = decide("DiskMerge", &Observation::default());
        assert_eq!(ready(&decision).status, Status::False);
        assert_eq!(ready(&decision).reason, "WaitingForDriver");
        assert!(ready(&decision).message.contains("nothing has been done"));
    }

    #[test]
    fn never_ready_for_work_not_done() {
        let decision = decide(
            "DiskExport",
            &Observation {
                missing: vec![],
                driver_registered: true,
            },
        );
        assert_eq!(ready(&decision).status, Status::False);
        assert!(
            decision
                .conditions
                .iter()
                .any(|c| c.type_ == STALLED && c.status == Status::True)
        );
    }
}
