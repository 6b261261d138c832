//! Pure decisions of the DiskSnapshot reconciler: whether the VolumeSnapshot of the same name is
//! ours, what the status says, and the next step of a deletion.

use kube::api::DynamicObject;
use livedisk_api::{DiskSnapshotStatus, Phase, Progress};
use serde_json::{Map, Value, json};

use crate::decide::{Decision, EventKind, Health, conditions};

/// What the operator reads from a VolumeSnapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VolumeSnapshotFacts {
    pub name: String,
    /// UIDs of its owners.
    pub owner_uids: Vec<String>,
    /// The claim it snapshots (`spec.source.persistentVolumeClaimName`).
    pub claim: Option<String>,
    /// Whether its deletion has begun.
    pub deleting: bool,
    /// `status.boundVolumeSnapshotContentName`.
    pub bound_content: Option<String>,
    /// `status.error.message`: the snapshot-controller keeps retrying after one.
    pub error: Option<String>,
}

impl VolumeSnapshotFacts {
    pub fn of(object: &DynamicObject) -> Self {
        let text = |v: &Value| v.as_str().map(str::to_string);
        Self {
            name: object.metadata.name.clone().unwrap_or_default(),
            owner_uids: object
                .metadata
                .owner_references
                .iter()
                .flatten()
                .map(|o| o.uid.clone())
                .collect(),
            claim: text(&object.data["spec"]["source"]["persistentVolumeClaimName"]),
            deleting: object.metadata.deletion_timestamp.is_some(),
            bound_content: text(&object.data["status"]["boundVolumeSnapshotContentName"]),
            error: text(&object.data["status"]["error"]["message"]),
        }
    }
}

/// What the operator reads from a VolumeSnapshotContent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ContentFacts {
    pub name: String,
    /// The CSI snapshot ID.
    pub snapshot_handle: Option<String>,
    pub retain: bool,
}

impl ContentFacts {
    pub fn of(object: &DynamicObject) -> Self {
        Self {
            name: object.metadata.name.clone().unwrap_or_default(),
            snapshot_handle: object.data["status"]["snapshotHandle"]
                .as_str()
                .map(str::to_string),
            retain: object.data["spec"]["deletionPolicy"] == "Retain",
        }
    }
}

/// What the node reports about the snapshot (its `LivediskSnapshot`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeSnapshotFacts {
    pub allocated_bytes: Option<i64>,
    /// How far the merge deleting it is, while it is being deleted.
    pub progress: Option<Progress>,
}

/// Why a DiskSnapshot does not take the VolumeSnapshot of its name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// It exists and this DiskSnapshot does not own it: a user's, or another tool's.
    NotOwned { name: String },
    /// This DiskSnapshot owns it, but it snapshots another claim.
    OfAnotherClaim { name: String, claim: String },
}

/// Pure: whether an existing VolumeSnapshot of the same name is this DiskSnapshot's (owned by
/// `uid`, of `claim`): only then it is adopted; anything else is left alone.
pub fn ownership(uid: &str, claim: &str, vs: &VolumeSnapshotFacts) -> Result<(), Refusal> {
    if !vs.owner_uids.iter().any(|o| o == uid) {
        return Err(Refusal::NotOwned {
            name: vs.name.clone(),
        });
    }
    match vs.claim.as_deref() {
        Some(c) if c == claim => Ok(()),
        other => Err(Refusal::OfAnotherClaim {
            name: vs.name.clone(),
            claim: other.unwrap_or("").to_string(),
        }),
    }
}

/// Pure: the status of a refused DiskSnapshot: Stalled until a person renames or removes
/// something; nothing was created or changed.
pub fn refused(refusal: &Refusal) -> Decision {
    let (reason, message) = match refusal {
        Refusal::NotOwned { name } => (
            "VolumeSnapshotNotOwned",
            format!(
                "VolumeSnapshot {name} already exists and is not owned by this DiskSnapshot; it is left alone and nothing was done (delete or rename one of them)"
            ),
        ),
        Refusal::OfAnotherClaim { name, claim } => (
            "VolumeSnapshotOfAnotherClaim",
            format!(
                "VolumeSnapshot {name} belongs to this DiskSnapshot but snapshots PersistentVolumeClaim {claim:?}, not this DiskSnapshot's source; nothing was done"
            ),
        ),
    };
    Decision {
        phase: Phase::Failed,
        conditions: conditions(Health::Stalled, reason, &message),
        event: EventKind::Warning,
        requeue_seconds: 60,
        fields: Map::new(),
    }
}

/// Pure: whether a DiskSnapshot whose VolumeSnapshot is not there had one bound already (its
/// status names the content or the snapshot): then that point in time is gone, and a new
/// VolumeSnapshot would be another one under the same name, so none is made.
pub fn volume_snapshot_lost(status: &DiskSnapshotStatus) -> bool {
    status.volume_snapshot_content_name.is_some() || status.snapshot_handle.is_some()
}

/// Pure: the status of a DiskSnapshot whose bound VolumeSnapshot was deleted by someone else.
pub fn lost(name: &str, status: &DiskSnapshotStatus) -> Decision {
    let content = status
        .volume_snapshot_content_name
        .as_deref()
        .unwrap_or("(unknown)");
    let message = format!(
        "VolumeSnapshot {name} (content {content}) was deleted after the snapshot was taken; \
         no new one is taken under this name, since it would be another point in time: delete \
         this DiskSnapshot"
    );
    Decision {
        phase: Phase::Failed,
        conditions: conditions(Health::Stalled, "VolumeSnapshotDeleted", &message),
        event: EventKind::Warning,
        requeue_seconds: 300,
        fields: Map::new(),
    }
}

/// Pure: the status fields that come from the content and the node (`progress` cleared: it only
/// shows while the snapshot is being deleted).
pub fn snapshot_fields(
    content: Option<&ContentFacts>,
    node: Option<&NodeSnapshotFacts>,
) -> Map<String, Value> {
    let mut fields = Map::new();
    if let Some(content) = content {
        fields.insert("volumeSnapshotContentName".into(), json!(content.name));
        if let Some(handle) = &content.snapshot_handle {
            fields.insert("snapshotHandle".into(), json!(handle));
        }
    }
    if let Some(bytes) = node.and_then(|n| n.allocated_bytes) {
        fields.insert("allocatedBytes".into(), json!(bytes));
    }
    fields.insert("progress".into(), Value::Null);
    fields
}

/// The next step of deleting a DiskSnapshot that holds the finalizer.
#[derive(Clone, Debug, PartialEq)]
pub enum DeletionStep {
    /// `Retain`: set the bound content's deletion policy to Retain first.
    RetainContent(String),
    /// Delete the VolumeSnapshot (the snapshot-controller then deletes the content, and the CSI
    /// driver the snapshot, unless the content is retained).
    DeleteVolumeSnapshot,
    /// The storage is still being released: report this and look again soon.
    Wait(Decision),
    /// Nothing is left to wait for: the finalizer comes off.
    Release,
}

/// How long a deletion in progress waits before it is looked at again when nothing woke it
/// sooner. The VolumeSnapshot's, the content's and the node snapshot's watches wake it on every
/// change (the merge's progress included), so this is only a safety net.
pub const DELETION_RECHECK_SECONDS: u64 = 30;

/// Pure: the next step of a deletion. `vs` is the VolumeSnapshot only if it is ours; `node`
/// the snapshot on its node, while it still exists.
pub fn deletion_step(
    retain: bool,
    vs: Option<&VolumeSnapshotFacts>,
    content: Option<&ContentFacts>,
    node: Option<&NodeSnapshotFacts>,
) -> DeletionStep {
    if retain {
        return match vs {
            Some(vs) if vs.deleting => DeletionStep::Release,
            Some(vs) => match content {
                Some(c) if !c.retain => DeletionStep::RetainContent(c.name.clone()),
                Some(_) => DeletionStep::DeleteVolumeSnapshot,
                // Deleting it before it is bound would let the class's policy decide.
                None if vs.bound_content.is_none() && vs.error.is_none() => {
                    DeletionStep::Wait(deleting(
                        format!(
                            "waiting for VolumeSnapshot {} to be taken, to retain it",
                            vs.name
                        ),
                        None,
                    ))
                }
                None => DeletionStep::DeleteVolumeSnapshot,
            },
            None => DeletionStep::Release,
        };
    }
    match (vs, node) {
        (Some(vs), _) if !vs.deleting => DeletionStep::DeleteVolumeSnapshot,
        (
            _,
            Some(NodeSnapshotFacts {
                progress: Some(p), ..
            }),
        ) => DeletionStep::Wait(deleting(
            format!(
                "the snapshot's layer is being merged away: {} of {} bytes ({} %)",
                p.bytes_done, p.bytes_total, p.percent
            ),
            Some(p.clone()),
        )),
        (Some(vs), _) => DeletionStep::Wait(deleting(
            format!(
                "waiting for VolumeSnapshot {} and its content to be deleted",
                vs.name
            ),
            None,
        )),
        (None, Some(_)) => DeletionStep::Wait(deleting(
            "the snapshot is being deleted on its node".to_string(),
            None,
        )),
        (None, None) => DeletionStep::Release,
    }
}

fn deleting(message: String, progress: Option<Progress>) -> Decision {
    let mut fields = Map::new();
    fields.insert(
        "progress".into(),
        progress
            .and_then(|p| serde_json::to_value(p).ok())
            .unwrap_or(Value::Null),
    );
    Decision {
        phase: Phase::Deleting,
        conditions: conditions(Health::InProgress, "Deleting", &message),
        event: EventKind::Normal,
        requeue_seconds: DELETION_RECHECK_SECONDS,
        fields,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bound_snapshot_whose_volume_snapshot_went_is_lost_not_taken_again() {
        let taking = DiskSnapshotStatus::default();
        assert!(!volume_snapshot_lost(&taking), "never bound: it is made");
        let bound = DiskSnapshotStatus {
            volume_snapshot_content_name: Some("snapcontent-1".into()),
            ..Default::default()
        };
        assert!(volume_snapshot_lost(&bound));
        let handled = DiskSnapshotStatus {
            snapshot_handle: Some("snap-1".into()),
            ..Default::default()
        };
        assert!(volume_snapshot_lost(&handled));
        let decision = lost("s", &bound);
        assert_eq!(decision.phase, Phase::Failed);
        let ready = decision
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .expect("Ready");
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "VolumeSnapshotDeleted")
        );
        assert!(ready.message.contains("snapcontent-1"), "{}", ready.message);
    }

    fn vs(owner: &str, claim: &str) -> VolumeSnapshotFacts {
        VolumeSnapshotFacts {
            name: "s".into(),
            owner_uids: vec![owner.into()],
            claim: Some(claim.into()),
            ..Default::default()
        }
    }

    #[test]
    fn only_an_owned_volume_snapshot_of_the_same_claim_is_adopted() {
        assert_eq!(ownership("u1", "disk", &vs("u1", "disk")), Ok(()));
        assert!(matches!(
            ownership("u1", "disk", &vs("u2", "disk")),
            Err(Refusal::NotOwned { .. })
        ));
        assert!(matches!(
            ownership("u1", "disk", &vs("u1", "other")),
            Err(Refusal::OfAnotherClaim { .. })
        ));
        let decision = refused(&Refusal::NotOwned { name: "s".into() });
        assert_eq!(decision.phase, Phase::Failed);
        assert_eq!(decision.conditions[0].reason, "VolumeSnapshotNotOwned");
    }

    #[test]
    fn the_status_clears_progress_and_shows_the_space_held() {
        let content = ContentFacts {
            name: "c".into(),
            snapshot_handle: Some("snap-1".into()),
            retain: false,
        };
        let node = NodeSnapshotFacts {
            allocated_bytes: Some(4096),
            progress: None,
        };
        let fields = snapshot_fields(Some(&content), Some(&node));
        assert_eq!(fields["volumeSnapshotContentName"], "c");
        assert_eq!(fields["snapshotHandle"], "snap-1");
        assert_eq!(fields["allocatedBytes"], 4096);
        assert_eq!(fields["progress"], Value::Null);
    }

    #[test]
    fn a_deletion_deletes_the_volume_snapshot_then_waits_for_the_node() {
        let ours = vs("u", "disk");
        assert_eq!(
            deletion_step(false, Some(&ours), None, None),
            DeletionStep::DeleteVolumeSnapshot
        );
        let going = VolumeSnapshotFacts {
            deleting: true,
            ..ours.clone()
        };
        let merging = NodeSnapshotFacts {
            allocated_bytes: None,
            progress: Some(Progress::new(25, 100, Some(5))),
        };
        let DeletionStep::Wait(decision) = deletion_step(false, Some(&going), None, Some(&merging))
        else {
            panic!("waits while the node merges")
        };
        assert_eq!(decision.phase, Phase::Deleting);
        assert_eq!(decision.fields["progress"]["percent"], 25);
        assert!(decision.conditions[0].message.contains("25 of 100 bytes"));
        // The VolumeSnapshot gone but the node still merging: still waiting.
        assert!(matches!(
            deletion_step(false, None, None, Some(&merging)),
            DeletionStep::Wait(_)
        ));
        assert!(matches!(
            deletion_step(false, Some(&going), None, None),
            DeletionStep::Wait(_)
        ));
        assert_eq!(
            deletion_step(false, None, None, None),
            DeletionStep::Release
        );
    }

    #[test]
    fn a_retained_snapshot_keeps_its_content() {
        let bound = VolumeSnapshotFacts {
            bound_content: Some("c".into()),
            ..vs("u", "disk")
        };
        let content = ContentFacts {
            name: "c".into(),
            snapshot_handle: Some("snap-1".into()),
            retain: false,
        };
        assert_eq!(
            deletion_step(true, Some(&bound), Some(&content), None),
            DeletionStep::RetainContent("c".into())
        );
        let retained = ContentFacts {
            retain: true,
            ..content
        };
        assert_eq!(
            deletion_step(true, Some(&bound), Some(&retained), None),
            DeletionStep::DeleteVolumeSnapshot
        );
        // Never waits for the node: the storage stays.
        let going = VolumeSnapshotFacts {
            deleting: true,
            ..bound
        };
        assert_eq!(
            deletion_step(true, Some(&going), Some(&retained), None),
            DeletionStep::Release
        );
        assert!(matches!(
            deletion_step(true, Some(&vs("u", "disk")), None, None),
            DeletionStep::Wait(_)
        ));
    }
}
