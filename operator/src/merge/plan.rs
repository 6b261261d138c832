//! Pure: validates what a DiskMerge refers to and decides the node work (`LivediskMerge`).
//!
//! The engine's primitive is the deletion of one snapshot by merging its layer away; every other
//! snapshot keeps its point in time. A DiskMerge is the deletion of a range of snapshots, in an
//! order that moves each layer's data once:
//! * `Commit` base..top: the snapshots from the base up to, not including, the top, oldest first.
//!   Each deletion commits the layer above into the base's layer, which in the end holds the
//!   top's point in time. Without a top, every snapshot from the base up (the newest one's
//!   deletion commits the active layer's data too).
//! * `Stream` from the base: the base and every newer snapshot, newest first, each layer pulled
//!   up into the active layer.
//!
//! The order of snapshots is their VolumeSnapshotContents' `status.creationTime` (nanoseconds),
//! the order in which the node sealed their layers.

use livedisk_api::MergeMode;
use livedisk_api::internal::LivediskMergeSpec;

use crate::decide;

/// A VolumeSnapshotContent of the volume, as far as the merge cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Content {
    pub name: String,
    /// The CSI snapshot ID; `None` while the snapshot is not taken yet.
    pub snapshot_handle: Option<String>,
    /// The CSI volume ID of the snapshot's source volume.
    pub source_volume: Option<String>,
    /// `status.creationTime`, nanoseconds.
    pub created: Option<i64>,
    /// `spec.deletionPolicy: Retain`.
    pub retain: bool,
    /// The VolumeSnapshot bound to it (namespace, name).
    pub volume_snapshot: Option<(String, String)>,
}

/// The claim a DiskMerge names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    Missing,
    Unbound,
    /// Bound to a PV of a CSI driver (`driver`, volume handle), or of none.
    Bound {
        driver: Option<String>,
        volume_handle: Option<String>,
    },
}

/// A DiskSnapshot the DiskMerge names, resolved to its content.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NamedSnapshot {
    Missing,
    /// The DiskSnapshot exists but its VolumeSnapshot has no content with a snapshot yet.
    NotTaken,
    Taken(Content),
}

/// Everything looked up for one DiskMerge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lookup {
    pub claim: Claim,
    pub base: Option<NamedSnapshot>,
    pub top: Option<NamedSnapshot>,
    /// Every content of the claim's volume (any namespace's VolumeSnapshot).
    pub contents: Vec<Content>,
    /// The node holding the volume (its LivediskVolume's `spec.nodeName`).
    pub node: Option<String>,
}

/// Why a DiskMerge cannot start. Each variant is a condition reason.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("PersistentVolumeClaim {0:?} does not exist in this namespace")]
    ClaimNotFound(String),
    #[error("PersistentVolumeClaim {0:?} is not bound yet")]
    ClaimNotBound(String),
    #[error(
        "PersistentVolumeClaim {claim:?} is a volume of {driver}, not of livedisk; nothing was merged"
    )]
    OtherDriver { claim: String, driver: String },
    #[error("DiskSnapshot {0:?} does not exist in this namespace")]
    SnapshotNotFound(String),
    #[error("DiskSnapshot {0:?} is not taken yet")]
    SnapshotNotTaken(String),
    #[error(
        "DiskSnapshot {snapshot:?} is a snapshot of another volume than PersistentVolumeClaim {claim:?}; nothing was merged"
    )]
    OtherVolume { snapshot: String, claim: String },
    #[error(
        "baseSnapshotName {base:?} is not older than topSnapshotName {top:?}; nothing was merged"
    )]
    NotOlder { base: String, top: String },
    #[error("the range holds no snapshot to merge; nothing was merged")]
    EmptyRange,
    #[error(
        "the range includes snapshots whose VolumeSnapshotContent has deletionPolicy Retain ({0}); merging would delete them, so nothing was merged"
    )]
    Retained(String),
    #[error("the volume {0} has no LivediskVolume, so no node holds it")]
    NoNode(String),
}

impl decide::Refusal for Refusal {
    /// The condition reason: the variant's name.
    fn reason(&self) -> &'static str {
        match self {
            Refusal::ClaimNotFound(_) => "ClaimNotFound",
            Refusal::ClaimNotBound(_) => "ClaimNotBound",
            Refusal::OtherDriver { .. } => "OtherDriver",
            Refusal::SnapshotNotFound(_) => "SnapshotNotFound",
            Refusal::SnapshotNotTaken(_) => "SnapshotNotTaken",
            Refusal::OtherVolume { .. } => "SnapshotOfAnotherVolume",
            Refusal::NotOlder { .. } => "BaseNotOlderThanTop",
            Refusal::EmptyRange => "EmptyRange",
            Refusal::Retained(_) => "RetainedSnapshotInRange",
            Refusal::NoNode(_) => "VolumeNotFound",
        }
    }

    /// Whether it can go away without a change of the DiskMerge (a claim that binds, a
    /// snapshot that appears or is taken): then the DiskMerge waits, else it fails.
    fn may_resolve(&self) -> bool {
        matches!(
            self,
            Refusal::ClaimNotFound(_)
                | Refusal::ClaimNotBound(_)
                | Refusal::SnapshotNotFound(_)
                | Refusal::SnapshotNotTaken(_)
                | Refusal::NoNode(_)
        )
    }
}

/// The node work decided for a valid DiskMerge, and which VolumeSnapshots it merges away.
#[derive(Clone, Debug, PartialEq)]
pub struct Planned {
    pub spec: LivediskMergeSpec,
    /// The VolumeSnapshots (namespace, name) of the merged snapshots, by snapshot ID.
    pub volume_snapshots: Vec<(String, Option<(String, String)>)>,
}

/// Validates the lookup and decides the node work.
pub fn plan(
    claim_name: &str,
    spec: &livedisk_api::DiskMergeSpec,
    bandwidth: Option<i64>,
    lookup: &Lookup,
) -> Result<Planned, Refusal> {
    let volume = match &lookup.claim {
        Claim::Missing => return Err(Refusal::ClaimNotFound(claim_name.into())),
        Claim::Unbound => return Err(Refusal::ClaimNotBound(claim_name.into())),
        Claim::Bound { driver, .. } if driver.as_deref() != Some(livedisk_common::DRIVER_NAME) => {
            return Err(Refusal::OtherDriver {
                claim: claim_name.into(),
                driver: driver.clone().unwrap_or_else(|| "no CSI driver".into()),
            });
        }
        Claim::Bound { volume_handle, .. } => volume_handle
            .clone()
            .ok_or_else(|| Refusal::ClaimNotBound(claim_name.into()))?,
    };
    let named = |name: &Option<String>,
                 found: &Option<NamedSnapshot>|
     -> Result<Option<Content>, Refusal> {
        let (Some(name), Some(found)) = (name, found) else {
            return Ok(None);
        };
        match found {
            NamedSnapshot::Missing => Err(Refusal::SnapshotNotFound(name.clone())),
            NamedSnapshot::NotTaken => Err(Refusal::SnapshotNotTaken(name.clone())),
            NamedSnapshot::Taken(c) if c.source_volume.as_deref() != Some(volume.as_str()) => {
                Err(Refusal::OtherVolume {
                    snapshot: name.clone(),
                    claim: claim_name.into(),
                })
            }
            NamedSnapshot::Taken(c) => Ok(Some(c.clone())),
        }
    };
    let base = named(&spec.base_snapshot_name, &lookup.base)?;
    let top = named(&spec.top_snapshot_name, &lookup.top)?;
    let node = lookup
        .node
        .clone()
        .ok_or_else(|| Refusal::NoNode(volume.clone()))?;
    let chain = ordered(&lookup.contents, &volume);
    let index_of = |c: &Content| chain.iter().position(|x| x.name == c.name);
    let from = match &base {
        Some(b) => index_of(b).ok_or_else(|| Refusal::SnapshotNotTaken(b.name.clone()))?,
        None => 0,
    };
    let to = match &top {
        Some(t) => index_of(t).ok_or_else(|| Refusal::SnapshotNotTaken(t.name.clone()))?,
        None => chain.len(),
    };
    if let (Some(b), Some(t)) = (&spec.base_snapshot_name, &spec.top_snapshot_name)
        && from >= to
    {
        return Err(Refusal::NotOlder {
            base: b.clone(),
            top: t.clone(),
        });
    }
    let mut range: Vec<&Content> = chain.get(from..to).unwrap_or_default().to_vec();
    if range.is_empty() {
        return Err(Refusal::EmptyRange);
    }
    let retained: Vec<String> = range
        .iter()
        .filter(|c| c.retain)
        .map(|c| display(c))
        .collect();
    if !retained.is_empty() {
        return Err(Refusal::Retained(retained.join(", ")));
    }
    if spec.mode == MergeMode::Stream {
        range.reverse();
    }
    Ok(Planned {
        spec: LivediskMergeSpec {
            node_name: node,
            volume_id: volume,
            mode: spec.mode,
            snapshot_ids: range
                .iter()
                .filter_map(|c| c.snapshot_handle.clone())
                .collect(),
            bandwidth_bytes_per_second: bandwidth,
            cancel: spec.cancel,
        },
        volume_snapshots: range
            .iter()
            .filter_map(|c| Some((c.snapshot_handle.clone()?, c.volume_snapshot.clone())))
            .collect(),
    })
}

/// The taken snapshots of `volume`, oldest first.
fn ordered<'a>(contents: &'a [Content], volume: &str) -> Vec<&'a Content> {
    let mut chain: Vec<&Content> = contents
        .iter()
        .filter(|c| c.source_volume.as_deref() == Some(volume) && c.snapshot_handle.is_some())
        .collect();
    chain.sort_by(|a, b| a.created.cmp(&b.created).then_with(|| a.name.cmp(&b.name)));
    chain
}

fn display(c: &Content) -> String {
    match &c.volume_snapshot {
        Some((ns, name)) => format!("VolumeSnapshot {ns}/{name}"),
        None => format!("VolumeSnapshotContent {}", c.name),
    }
}

/// Pure: a bandwidth quantity (`200Mi`, `1G`, `500000`) in bytes per second (see
/// [`livedisk_common::quantity::bytes`]).
pub fn bandwidth_bytes(quantity: &str) -> Option<i64> {
    livedisk_common::quantity::bytes(quantity)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::Refusal as _;
    use livedisk_api::DiskMergeSpec;

    const VOL: &str = "vol-00000000-0000-4000-8000-000000000001";

    fn content(name: &str, created: i64) -> Content {
        Content {
            name: format!("c-{name}"),
            snapshot_handle: Some(format!("snap-{name}")),
            source_volume: Some(VOL.into()),
            created: Some(created),
            retain: false,
            volume_snapshot: Some(("ns".into(), name.into())),
        }
    }

    fn lookup(contents: Vec<Content>) -> Lookup {
        Lookup {
            claim: Claim::Bound {
                driver: Some(livedisk_common::DRIVER_NAME.into()),
                volume_handle: Some(VOL.into()),
            },
            base: None,
            top: None,
            contents,
            node: Some("node-a".into()),
        }
    }

    fn spec(mode: MergeMode, base: Option<&str>, top: Option<&str>) -> DiskMergeSpec {
        DiskMergeSpec {
            persistent_volume_claim_name: "disk".into(),
            mode,
            base_snapshot_name: base.map(Into::into),
            top_snapshot_name: top.map(Into::into),
            bandwidth_limit: None,
            cancel: false,
        }
    }

    /// a, b, c, d in time order (listed out of order), with the named ones resolved.
    fn chain(base: Option<&str>, top: Option<&str>) -> Lookup {
        let all = vec![
            content("c", 30),
            content("a", 10),
            content("d", 40),
            content("b", 20),
        ];
        let find = |n: Option<&str>| {
            n.map(|n| {
                NamedSnapshot::Taken(
                    all.iter()
                        .find(|c| c.name == format!("c-{n}"))
                        .cloned()
                        .expect("known"),
                )
            })
        };
        Lookup {
            base: find(base),
            top: find(top),
            ..lookup(all.clone())
        }
    }

    fn ids(p: &Planned) -> Vec<&str> {
        p.spec.snapshot_ids.iter().map(String::as_str).collect()
    }

    #[test]
    fn commit_merges_from_the_base_up_to_below_the_top_oldest_first() {
        let p = plan(
            "disk",
            &spec(MergeMode::Commit, Some("b"), Some("d")),
            None,
            &chain(Some("b"), Some("d")),
        )
        .expect("valid");
        assert_eq!(ids(&p), ["snap-b", "snap-c"]);
        assert_eq!(p.spec.node_name, "node-a");
        assert_eq!(p.volume_snapshots[0].1, Some(("ns".into(), "b".into())));
        // No top: an active commit, every snapshot from the base up goes.
        let p = plan(
            "disk",
            &spec(MergeMode::Commit, Some("c"), None),
            Some(7),
            &chain(Some("c"), None),
        )
        .expect("valid");
        assert_eq!(ids(&p), ["snap-c", "snap-d"]);
        assert_eq!(p.spec.bandwidth_bytes_per_second, Some(7));
        // No base: from the bottom of the chain.
        let p = plan(
            "disk",
            &spec(MergeMode::Commit, None, Some("b")),
            None,
            &chain(None, Some("b")),
        )
        .expect("valid");
        assert_eq!(ids(&p), ["snap-a"]);
    }

    #[test]
    fn stream_pulls_the_base_and_everything_newer_up_newest_first() {
        let p = plan(
            "disk",
            &spec(MergeMode::Stream, Some("b"), None),
            None,
            &chain(Some("b"), None),
        )
        .expect("valid");
        assert_eq!(ids(&p), ["snap-d", "snap-c", "snap-b"]);
        assert_eq!(p.spec.mode, MergeMode::Stream);
    }

    #[test]
    fn invalid_references_are_refused_with_their_reason() {
        let s = spec(MergeMode::Commit, Some("b"), None);
        let refuse = |l: &Lookup| plan("disk", &s, None, l).expect_err("refused");
        let mut l = chain(Some("b"), None);
        l.claim = Claim::Missing;
        assert_eq!(refuse(&l).reason(), "ClaimNotFound");
        assert!(refuse(&l).may_resolve());
        l.claim = Claim::Bound {
            driver: Some("hostpath.csi.k8s.io".into()),
            volume_handle: Some("x".into()),
        };
        let other = refuse(&l);
        assert_eq!(other.reason(), "OtherDriver");
        assert!(!other.may_resolve());
        assert!(other.to_string().contains("hostpath.csi.k8s.io"));

        let mut l = chain(Some("b"), None);
        l.base = Some(NamedSnapshot::Missing);
        assert_eq!(refuse(&l).reason(), "SnapshotNotFound");
        let mut foreign = content("x", 5);
        foreign.source_volume = Some("vol-00000000-0000-4000-8000-000000000002".into());
        l.base = Some(NamedSnapshot::Taken(foreign));
        assert_eq!(refuse(&l).reason(), "SnapshotOfAnotherVolume");

        let mut l = chain(Some("b"), None);
        l.contents
            .iter_mut()
            .find(|c| c.name == "c-c")
            .expect("c")
            .retain = true;
        let retained = refuse(&l);
        assert_eq!(retained.reason(), "RetainedSnapshotInRange");
        assert!(
            retained.to_string().contains("VolumeSnapshot ns/c"),
            "{retained}"
        );
        // A Retain snapshot outside the range is no obstacle.
        let mut l = chain(Some("c"), None);
        l.contents
            .iter_mut()
            .find(|c| c.name == "c-a")
            .expect("a")
            .retain = true;
        assert!(plan("disk", &spec(MergeMode::Commit, Some("c"), None), None, &l).is_ok());

        let s = spec(MergeMode::Commit, Some("c"), Some("b"));
        let err = plan("disk", &s, None, &chain(Some("c"), Some("b"))).expect_err("refused");
        assert_eq!(err.reason(), "BaseNotOlderThanTop");
        let empty = plan(
            "disk",
            &spec(MergeMode::Commit, None, None),
            None,
            &lookup(vec![]),
        )
        .expect_err("refused");
        assert_eq!(empty.reason(), "EmptyRange");
    }

    #[test]
    fn bandwidth_quantities() {
        assert_eq!(bandwidth_bytes("200Mi"), Some(200 << 20));
        assert_eq!(bandwidth_bytes("1G"), Some(1_000_000_000));
        assert_eq!(bandwidth_bytes("1.5Ki"), Some(1536));
        assert_eq!(bandwidth_bytes("0"), Some(0));
        assert_eq!(bandwidth_bytes("12"), Some(12));
        assert_eq!(bandwidth_bytes("5X"), None);
        assert_eq!(bandwidth_bytes("-1Mi"), None);
    }
}
