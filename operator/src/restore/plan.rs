//! Pure: validates what a DiskRestore refers to and decides its node work (`LivediskRestore`).
//!
//! A DiskRestore reverts the claim's volume to one DiskSnapshot of that same volume. The snapshot
//! must be a livedisk snapshot whose content names the claim's volume as its source
//! (`spec.source.volumeHandle`): a snapshot of another volume, even one of the same namespace,
//! is refused before anything reaches a node.

use livedisk_api::internal::LivediskRestoreSpec;

use crate::decide;

pub use crate::merge::plan::{Claim, NamedSnapshot};

/// Everything looked up for one DiskRestore.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lookup {
    pub claim: Claim,
    /// The named DiskSnapshot, resolved to its content (`NotTaken` also while the content is
    /// not ready to use).
    pub snapshot: NamedSnapshot,
    /// The node holding the volume (its LivediskVolume's `spec.nodeName`).
    pub node: Option<String>,
}

/// Why a DiskRestore cannot start. Each variant is a condition reason; none of them changed
/// anything.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("PersistentVolumeClaim {0:?} does not exist in this namespace; nothing was reverted")]
    ClaimNotFound(String),
    #[error("PersistentVolumeClaim {0:?} is not bound yet; nothing was reverted")]
    ClaimNotBound(String),
    #[error(
        "PersistentVolumeClaim {claim:?} is a volume of {driver}, not of livedisk; nothing was reverted"
    )]
    OtherDriver { claim: String, driver: String },
    #[error("DiskSnapshot {0:?} does not exist in this namespace; nothing was reverted")]
    SnapshotNotFound(String),
    #[error("DiskSnapshot {0:?} is not ready to use yet; nothing was reverted")]
    SnapshotNotReady(String),
    #[error(
        "DiskSnapshot {snapshot:?} is a snapshot of another volume than PersistentVolumeClaim {claim:?}; nothing was reverted"
    )]
    OtherVolume { snapshot: String, claim: String },
    #[error("the volume {0} has no LivediskVolume, so no node holds it; nothing was reverted")]
    NoNode(String),
}

impl decide::Refusal for Refusal {
    /// The condition reason. A missing claim or DiskSnapshot is `ReferenceNotFound`, as for
    /// every livedisk kind.
    fn reason(&self) -> &'static str {
        match self {
            Refusal::ClaimNotFound(_) | Refusal::SnapshotNotFound(_) => "ReferenceNotFound",
            Refusal::ClaimNotBound(_) => "ClaimNotBound",
            Refusal::OtherDriver { .. } => "OtherDriver",
            Refusal::SnapshotNotReady(_) => "SnapshotNotReady",
            Refusal::OtherVolume { .. } => "SnapshotOfAnotherVolume",
            Refusal::NoNode(_) => "VolumeNotFound",
        }
    }

    /// Whether it can go away without a change of the DiskRestore (a claim or snapshot that
    /// appears, binds or becomes ready): then the DiskRestore waits, else it fails.
    fn may_resolve(&self) -> bool {
        match self {
            Refusal::ClaimNotFound(_)
            | Refusal::ClaimNotBound(_)
            | Refusal::SnapshotNotFound(_)
            | Refusal::SnapshotNotReady(_)
            | Refusal::NoNode(_) => true,
            Refusal::OtherDriver { .. } | Refusal::OtherVolume { .. } => false,
        }
    }
}

/// Validates the lookup and decides the node work.
pub fn plan(
    spec: &livedisk_api::DiskRestoreSpec,
    lookup: &Lookup,
) -> Result<LivediskRestoreSpec, Refusal> {
    let claim_name = &spec.persistent_volume_claim_name;
    let snapshot_name = &spec.snapshot_name;
    let volume = match &lookup.claim {
        Claim::Missing => return Err(Refusal::ClaimNotFound(claim_name.clone())),
        Claim::Unbound => return Err(Refusal::ClaimNotBound(claim_name.clone())),
        Claim::Bound { driver, .. } if driver.as_deref() != Some(livedisk_common::DRIVER_NAME) => {
            return Err(Refusal::OtherDriver {
                claim: claim_name.clone(),
                driver: driver.clone().unwrap_or_else(|| "no CSI driver".into()),
            });
        }
        Claim::Bound { volume_handle, .. } => volume_handle
            .clone()
            .ok_or_else(|| Refusal::ClaimNotBound(claim_name.clone()))?,
    };
    let snapshot = match &lookup.snapshot {
        NamedSnapshot::Missing => return Err(Refusal::SnapshotNotFound(snapshot_name.clone())),
        NamedSnapshot::NotTaken => return Err(Refusal::SnapshotNotReady(snapshot_name.clone())),
        NamedSnapshot::Taken(c) if c.source_volume.as_deref() != Some(volume.as_str()) => {
            return Err(Refusal::OtherVolume {
                snapshot: snapshot_name.clone(),
                claim: claim_name.clone(),
            });
        }
        NamedSnapshot::Taken(c) => c
            .snapshot_handle
            .clone()
            .ok_or_else(|| Refusal::SnapshotNotReady(snapshot_name.clone()))?,
    };
    let node = lookup
        .node
        .clone()
        .ok_or_else(|| Refusal::NoNode(volume.clone()))?;
    Ok(LivediskRestoreSpec {
        node_name: node,
        volume_id: volume,
        snapshot_id: snapshot,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::Refusal as _;
    use crate::merge::plan::Content;
    use livedisk_api::DiskRestoreSpec;

    const VOL: &str = "vol-00000000-0000-4000-8000-000000000001";
    const SNAP: &str = "snap-00000000-0000-4000-8000-000000000001";

    fn spec() -> DiskRestoreSpec {
        DiskRestoreSpec {
            persistent_volume_claim_name: "disk".into(),
            snapshot_name: "s1".into(),
        }
    }

    fn content(source: &str) -> Content {
        Content {
            name: "c-1".into(),
            snapshot_handle: Some(SNAP.into()),
            source_volume: Some(source.into()),
            created: Some(1),
            retain: false,
            volume_snapshot: Some(("ns".into(), "s1".into())),
        }
    }

    fn valid() -> Lookup {
        Lookup {
            claim: Claim::Bound {
                driver: Some(livedisk_common::DRIVER_NAME.into()),
                volume_handle: Some(VOL.into()),
            },
            snapshot: NamedSnapshot::Taken(content(VOL)),
            node: Some("node-a".into()),
        }
    }

    #[test]
    fn a_snapshot_of_the_claims_volume_becomes_node_work_on_its_node() {
        let work = plan(&spec(), &valid()).expect("valid");
        assert_eq!(
            work,
            LivediskRestoreSpec {
                node_name: "node-a".into(),
                volume_id: VOL.into(),
                snapshot_id: SNAP.into(),
            }
        );
    }

    #[test]
    fn invalid_references_are_refused_with_their_reason() {
        let refuse = |l: &Lookup| plan(&spec(), l).expect_err("refused");
        let cases: Vec<(Lookup, &str, bool)> = vec![
            (
                Lookup {
                    claim: Claim::Missing,
                    ..valid()
                },
                "ReferenceNotFound",
                true,
            ),
            (
                Lookup {
                    claim: Claim::Unbound,
                    ..valid()
                },
                "ClaimNotBound",
                true,
            ),
            (
                Lookup {
                    claim: Claim::Bound {
                        driver: Some("hostpath.csi.k8s.io".into()),
                        volume_handle: Some("h".into()),
                    },
                    ..valid()
                },
                "OtherDriver",
                false,
            ),
            (
                Lookup {
                    snapshot: NamedSnapshot::Missing,
                    ..valid()
                },
                "ReferenceNotFound",
                true,
            ),
            (
                Lookup {
                    snapshot: NamedSnapshot::NotTaken,
                    ..valid()
                },
                "SnapshotNotReady",
                true,
            ),
            (
                Lookup {
                    snapshot: NamedSnapshot::Taken(content(
                        "vol-00000000-0000-4000-8000-000000000002",
                    )),
                    ..valid()
                },
                "SnapshotOfAnotherVolume",
                false,
            ),
            (
                Lookup {
                    node: None,
                    ..valid()
                },
                "VolumeNotFound",
                true,
            ),
        ];
        for (lookup, reason, resolves) in cases {
            let refusal = refuse(&lookup);
            assert_eq!(refusal.reason(), reason, "{refusal}");
            assert_eq!(refusal.may_resolve(), resolves, "{refusal}");
            assert!(
                refusal.to_string().contains("nothing was reverted"),
                "{refusal}"
            );
        }
        let other = refuse(&Lookup {
            claim: Claim::Bound {
                driver: Some("hostpath.csi.k8s.io".into()),
                volume_handle: None,
            },
            ..valid()
        });
        assert!(other.to_string().contains("hostpath.csi.k8s.io"), "{other}");
    }
}
