//! Pure: validates what a DiskMigration refers to, decides its node work (`LivediskMigration`),
//! and what of a later change of the DiskMigration its node work must follow.
//!
//! The source is where the volume is now: the node its LivediskVolume names. The node work
//! records it (`spec.nodeName`) and keeps it, so `status.sourceNodeName` still names the old node
//! after the volume's inventory has moved to the target.

use livedisk_api::DiskMigrationSpec;
use livedisk_api::internal::LivediskMigrationSpec;
use serde_json::{Map, Value, json};

use crate::decide;
pub use crate::merge::plan::Claim;

/// Everything looked up for one DiskMigration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lookup {
    pub claim: Claim,
    /// The node holding the volume (its LivediskVolume's `spec.nodeName`).
    pub source: Option<String>,
    /// Whether the target runs the livedisk node plugin (its LivediskNode exists).
    pub target_known: bool,
    /// Other migrations of the same volume that have not ended (`DiskMigration ns/name`, or the
    /// node work's name where its labels do not say).
    pub busy: Vec<String>,
}

/// Why a DiskMigration cannot start. Each variant is a condition reason; none of them changed
/// anything.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("PersistentVolumeClaim {0:?} does not exist in this namespace; nothing was moved")]
    ClaimNotFound(String),
    #[error("PersistentVolumeClaim {0:?} is not bound yet; nothing was moved")]
    ClaimNotBound(String),
    #[error(
        "PersistentVolumeClaim {claim:?} is a volume of {driver}, not of livedisk; nothing was moved"
    )]
    OtherDriver { claim: String, driver: String },
    #[error(
        "PersistentVolumeClaim {claim:?} is bound to the volume handle {handle:?}, which is no livedisk volume ID; nothing was moved"
    )]
    NotLivediskVolume { claim: String, handle: String },
    #[error("the volume {0} has no LivediskVolume, so no node holds it; nothing was moved")]
    NoNode(String),
    #[error(
        "node {0:?} does not run the livedisk node plugin (it has no LivediskNode); nothing was moved"
    )]
    TargetNotFound(String),
    #[error("the volume is on node {node} already; nothing was moved")]
    AlreadyOnTarget { node: String },
    #[error(
        "bandwidthLimit {0:?} is not a quantity livedisk understands (a number with one of the suffixes Ki, Mi, Gi, Ti, k, M, G, T); nothing was moved"
    )]
    InvalidBandwidth(String),
    #[error(
        "the volume {volume} is being moved by {others}; nothing was moved, this migration starts once that one ended"
    )]
    Busy { volume: String, others: String },
}

impl decide::Refusal for Refusal {
    /// The condition reason.
    fn reason(&self) -> &'static str {
        match self {
            Refusal::ClaimNotFound(_) => "ClaimNotFound",
            Refusal::ClaimNotBound(_) => "ClaimNotBound",
            Refusal::OtherDriver { .. } => "OtherDriver",
            Refusal::NotLivediskVolume { .. } => "NotLivediskVolume",
            Refusal::NoNode(_) => "VolumeNotFound",
            Refusal::TargetNotFound(_) => "NodeNotFound",
            Refusal::AlreadyOnTarget { .. } => "AlreadyOnTarget",
            Refusal::InvalidBandwidth(_) => "InvalidBandwidth",
            Refusal::Busy { .. } => "MigrationInProgress",
        }
    }

    /// Whether it can go away without a change of the DiskMigration (a claim that appears or
    /// binds, a node plugin that registers, another migration that ends): then the DiskMigration
    /// waits, else it fails. The claim, the target and `verify` are immutable, so a refusal of
    /// them is final; an unusable bandwidth too, since a Failed migration never starts again.
    fn may_resolve(&self) -> bool {
        match self {
            Refusal::ClaimNotFound(_)
            | Refusal::ClaimNotBound(_)
            | Refusal::NoNode(_)
            | Refusal::TargetNotFound(_)
            | Refusal::Busy { .. } => true,
            Refusal::OtherDriver { .. }
            | Refusal::NotLivediskVolume { .. }
            | Refusal::AlreadyOnTarget { .. }
            | Refusal::InvalidBandwidth(_) => false,
        }
    }
}

/// The rate limit of a DiskMigration in bytes per second (`None`: unlimited).
pub fn bandwidth(spec: &DiskMigrationSpec) -> Result<Option<i64>, Refusal> {
    match spec.bandwidth_limit.as_deref().map(str::trim) {
        None | Some("") => Ok(None),
        Some(quantity) => livedisk_common::quantity::bytes(quantity)
            .map(Some)
            .ok_or_else(|| Refusal::InvalidBandwidth(quantity.into())),
    }
}

/// The volume ID of a claim bound to a livedisk volume, or why not. The ID is checked against
/// livedisk's strict pattern: it goes into a field selector and into the node work, whose schema
/// would refuse anything else.
pub fn volume_of(claim_name: &str, claim: &Claim) -> Result<String, Refusal> {
    let handle = match claim {
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
            .ok_or_else(|| Refusal::ClaimNotBound(claim_name.into())),
    }?;
    livedisk_common::VolumeId::parse(&handle)
        .map(|id| id.as_str().to_string())
        .map_err(|_| Refusal::NotLivediskVolume {
            claim: claim_name.into(),
            handle,
        })
}

/// Validates the lookup and decides the node work. An unusable bandwidth is refused first: it
/// is final, and waiting for a claim only to fail on it afterwards would help nobody.
pub fn plan(spec: &DiskMigrationSpec, lookup: &Lookup) -> Result<LivediskMigrationSpec, Refusal> {
    let bandwidth = bandwidth(spec)?;
    let volume = volume_of(&spec.persistent_volume_claim_name, &lookup.claim)?;
    let source = lookup
        .source
        .clone()
        .ok_or_else(|| Refusal::NoNode(volume.clone()))?;
    if source == spec.target_node_name {
        return Err(Refusal::AlreadyOnTarget { node: source });
    }
    if !lookup.target_known {
        return Err(Refusal::TargetNotFound(spec.target_node_name.clone()));
    }
    if !lookup.busy.is_empty() {
        return Err(Refusal::Busy {
            volume,
            others: lookup.busy.join(", "),
        });
    }
    Ok(LivediskMigrationSpec {
        node_name: source,
        target_node_name: spec.target_node_name.clone(),
        volume_id: volume,
        bandwidth_bytes_per_second: bandwidth,
        verify: spec.verify,
        cancel: spec.cancel,
        hold_cutover: spec.hold_cutover,
    })
}

/// What an existing node work must change to follow its DiskMigration.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Following {
    /// The merge patch of the node work, when something changes.
    pub patch: Option<Value>,
    /// A new `bandwidthLimit` that cannot be used: the node work keeps its rate, and the status
    /// says so.
    pub ignored_bandwidth: Option<String>,
}

/// Only the rate limit, the cutover hold and a cancel follow the DiskMigration once its node work
/// exists (the rest of both specs is immutable), and a cancel only from false to true: a node
/// work's cancel is never taken back (its CEL rule refuses that too).
pub fn follow(spec: &DiskMigrationSpec, work: &LivediskMigrationSpec) -> Following {
    let mut changes = Map::new();
    let mut ignored_bandwidth = None;
    match bandwidth(spec) {
        Ok(limit) if limit != work.bandwidth_bytes_per_second => {
            // Null removes the field: unlimited.
            changes.insert("bandwidthBytesPerSecond".into(), json!(limit));
        }
        Ok(_) => {}
        Err(_) => ignored_bandwidth = spec.bandwidth_limit.clone(),
    }
    if spec.cancel && !work.cancel {
        changes.insert("cancel".into(), Value::Bool(true));
    }
    if spec.hold_cutover != work.hold_cutover {
        changes.insert("holdCutover".into(), Value::Bool(spec.hold_cutover));
    }
    Following {
        patch: (!changes.is_empty()).then(|| json!({ "spec": changes })),
        ignored_bandwidth,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::Refusal as _;

    const VOL: &str = "vol-00000000-0000-4000-8000-000000000001";

    fn spec() -> DiskMigrationSpec {
        DiskMigrationSpec {
            persistent_volume_claim_name: "disk".into(),
            target_node_name: "node-b".into(),
            bandwidth_limit: Some("500Mi".into()),
            verify: true,
            cancel: false,
            hold_cutover: false,
        }
    }

    fn lookup() -> Lookup {
        Lookup {
            claim: Claim::Bound {
                driver: Some(livedisk_common::DRIVER_NAME.into()),
                volume_handle: Some(VOL.into()),
            },
            source: Some("node-a".into()),
            target_known: true,
            busy: vec![],
        }
    }

    #[test]
    fn a_valid_migration_moves_the_volume_from_where_it_is() {
        let work = plan(&spec(), &lookup()).expect("valid");
        assert_eq!(
            work,
            LivediskMigrationSpec {
                node_name: "node-a".into(),
                target_node_name: "node-b".into(),
                volume_id: VOL.into(),
                bandwidth_bytes_per_second: Some(500 << 20),
                verify: true,
                cancel: false,
                hold_cutover: false,
            }
        );
        let unlimited = DiskMigrationSpec {
            bandwidth_limit: None,
            verify: false,
            ..spec()
        };
        let work = plan(&unlimited, &lookup()).expect("valid");
        assert_eq!(work.bandwidth_bytes_per_second, None);
        assert!(!work.verify);
        let empty = DiskMigrationSpec {
            bandwidth_limit: Some(String::new()),
            ..spec()
        };
        assert_eq!(bandwidth(&empty), Ok(None));
    }

    #[test]
    fn what_may_still_come_waits_and_what_cannot_change_fails() {
        let refuse = |s: &DiskMigrationSpec, l: &Lookup| plan(s, l).expect_err("refused");
        let waits = |r: &Refusal, reason: &str| {
            assert_eq!(r.reason(), reason, "{r}");
            assert!(r.may_resolve(), "{r}");
            assert!(r.to_string().contains("nothing was moved"), "{r}");
        };
        let fails = |r: &Refusal, reason: &str| {
            assert_eq!(r.reason(), reason, "{r}");
            assert!(!r.may_resolve(), "{r}");
            assert!(r.to_string().contains("nothing was moved"), "{r}");
        };

        let mut l = lookup();
        l.claim = Claim::Missing;
        waits(&refuse(&spec(), &l), "ClaimNotFound");
        l.claim = Claim::Unbound;
        waits(&refuse(&spec(), &l), "ClaimNotBound");
        l.claim = Claim::Bound {
            driver: Some(livedisk_common::DRIVER_NAME.into()),
            volume_handle: None,
        };
        waits(&refuse(&spec(), &l), "ClaimNotBound");

        let mut l = lookup();
        l.claim = Claim::Bound {
            driver: Some("hostpath.csi.k8s.io".into()),
            volume_handle: Some("x".into()),
        };
        let other = refuse(&spec(), &l);
        fails(&other, "OtherDriver");
        assert!(other.to_string().contains("hostpath.csi.k8s.io"));
        l.claim = Claim::Bound {
            driver: None,
            volume_handle: None,
        };
        assert!(refuse(&spec(), &l).to_string().contains("no CSI driver"));

        let mut l = lookup();
        l.claim = Claim::Bound {
            driver: Some(livedisk_common::DRIVER_NAME.into()),
            volume_handle: Some("../etc".into()),
        };
        let odd = refuse(&spec(), &l);
        fails(&odd, "NotLivediskVolume");
        assert!(odd.to_string().contains("\"../etc\""), "{odd}");

        let mut l = lookup();
        l.source = None;
        waits(&refuse(&spec(), &l), "VolumeNotFound");

        let mut l = lookup();
        l.target_known = false;
        let unknown = refuse(&spec(), &l);
        waits(&unknown, "NodeNotFound");
        assert!(unknown.to_string().contains("\"node-b\""));

        let mut l = lookup();
        l.source = Some("node-b".into());
        let there = refuse(&spec(), &l);
        fails(&there, "AlreadyOnTarget");
        assert_eq!(
            there.to_string(),
            "the volume is on node node-b already; nothing was moved"
        );

        let mut l = lookup();
        l.busy = vec!["DiskMigration ns/first".into()];
        let busy = refuse(&spec(), &l);
        waits(&busy, "MigrationInProgress");
        assert!(busy.to_string().contains("DiskMigration ns/first"));
    }

    #[test]
    fn an_unusable_bandwidth_fails_before_anything_is_waited_for() {
        let bad = DiskMigrationSpec {
            bandwidth_limit: Some("1Pi".into()),
            ..spec()
        };
        let mut l = lookup();
        l.claim = Claim::Unbound;
        let refusal = plan(&bad, &l).expect_err("refused");
        assert_eq!(refusal.reason(), "InvalidBandwidth");
        assert!(!refusal.may_resolve());
        assert!(refusal.to_string().contains("\"1Pi\""));
    }

    #[test]
    fn the_node_work_follows_the_rate_the_hold_and_a_cancel_only() {
        let work = plan(&spec(), &lookup()).expect("valid");
        assert_eq!(follow(&spec(), &work), Following::default());

        let faster = DiskMigrationSpec {
            bandwidth_limit: Some("1Gi".into()),
            ..spec()
        };
        assert_eq!(
            follow(&faster, &work).patch,
            Some(json!({"spec": {"bandwidthBytesPerSecond": 1i64 << 30}}))
        );
        // Removing the limit removes it from the node work: unlimited.
        let unlimited = DiskMigrationSpec {
            bandwidth_limit: None,
            ..spec()
        };
        assert_eq!(
            follow(&unlimited, &work).patch,
            Some(json!({"spec": {"bandwidthBytesPerSecond": null}}))
        );

        let cancel = DiskMigrationSpec {
            cancel: true,
            ..spec()
        };
        assert_eq!(
            follow(&cancel, &work).patch,
            Some(json!({"spec": {"cancel": true}}))
        );
        // The cutover hold follows both ways.
        let held = DiskMigrationSpec {
            hold_cutover: true,
            ..spec()
        };
        assert_eq!(
            follow(&held, &work).patch,
            Some(json!({"spec": {"holdCutover": true}}))
        );
        let held_work = LivediskMigrationSpec {
            hold_cutover: true,
            ..work.clone()
        };
        assert_eq!(
            follow(&spec(), &held_work).patch,
            Some(json!({"spec": {"holdCutover": false}}))
        );
        // A cancelled node work stays cancelled, whatever the DiskMigration says.
        let cancelled = LivediskMigrationSpec {
            cancel: true,
            ..work.clone()
        };
        assert_eq!(follow(&spec(), &cancelled).patch, None);

        // A limit livedisk cannot read leaves the node work's rate as it is, and says so.
        let odd = DiskMigrationSpec {
            bandwidth_limit: Some("1e3".into()),
            cancel: true,
            ..spec()
        };
        let following = follow(&odd, &work);
        assert_eq!(following.patch, Some(json!({"spec": {"cancel": true}})));
        assert_eq!(following.ignored_bandwidth.as_deref(), Some("1e3"));
    }
}
