//! Pure: validates what a DiskExport refers to, decides its node work (`LivediskExport`), and
//! reports what the node says of it.

use livedisk_api::internal::{ExportPhase, LivediskExportSpec, LivediskExportStatus};
use livedisk_api::{DiskExportSpec, Phase};
use serde_json::{Value, json};

use super::credentials::Pins;
use crate::decide::{self, Decision, EventKind, Health, conditions};
use crate::merge::plan::NamedSnapshot;

/// Where a snapshot lives: its LivediskSnapshot's node and volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Home {
    pub node: String,
    pub volume: String,
}

/// A named DiskSnapshot, resolved as far as it goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    pub named: NamedSnapshot,
    /// For a taken snapshot: where it lives (`None`: no LivediskSnapshot, not livedisk's).
    pub home: Option<Home>,
}

/// Everything looked up for one DiskExport.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lookup {
    pub snapshot: Resolved,
    pub base: Option<Resolved>,
}

/// Why a DiskExport cannot start. Each variant is a condition reason; none of them changed
/// anything.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("DiskSnapshot {0:?} does not exist in this namespace; nothing is exported")]
    SnapshotNotFound(String),
    #[error("DiskSnapshot {0:?} is not ready to use yet; nothing is exported")]
    SnapshotNotReady(String),
    #[error(
        "DiskSnapshot {0:?} is not a livedisk snapshot (no node holds it); only livedisk snapshots are exported"
    )]
    NotLivedisk(String),
    #[error(
        "baseSnapshotName {base:?} is a snapshot of another volume than {snapshot:?}; changed extents exist only between snapshots of one volume"
    )]
    BaseOfAnotherVolume { base: String, snapshot: String },
    #[error("{0}")]
    CredentialsConflict(String),
}

impl decide::Refusal for Refusal {
    fn reason(&self) -> &'static str {
        match self {
            Refusal::SnapshotNotFound(_) => "ReferenceNotFound",
            Refusal::SnapshotNotReady(_) => "SnapshotNotReady",
            Refusal::NotLivedisk(_) => "OtherDriver",
            Refusal::BaseOfAnotherVolume { .. } => "SnapshotOfAnotherVolume",
            Refusal::CredentialsConflict(_) => "CredentialsConflict",
        }
    }

    fn may_resolve(&self) -> bool {
        match self {
            Refusal::SnapshotNotFound(_)
            | Refusal::SnapshotNotReady(_)
            | Refusal::CredentialsConflict(_) => true,
            Refusal::NotLivedisk(_) | Refusal::BaseOfAnotherVolume { .. } => false,
        }
    }
}

/// The node and snapshot ID of a resolved DiskSnapshot, or why not.
fn located(name: &str, resolved: &Resolved) -> Result<(Home, String), Refusal> {
    match &resolved.named {
        NamedSnapshot::Missing => Err(Refusal::SnapshotNotFound(name.into())),
        NamedSnapshot::NotTaken => Err(Refusal::SnapshotNotReady(name.into())),
        NamedSnapshot::Taken(content) => match (&resolved.home, &content.snapshot_handle) {
            (Some(home), Some(handle)) => Ok((home.clone(), handle.clone())),
            _ => Err(Refusal::NotLivedisk(name.into())),
        },
    }
}

/// Validates the references (pure: no credentials yet).
pub fn validate(spec: &DiskExportSpec, lookup: &Lookup) -> Result<(), Refusal> {
    plan(spec, lookup, &placeholder_pins()).map(|_| ())
}

fn placeholder_pins() -> Pins {
    Pins {
        certificate_sha256: "0".repeat(64),
        token_sha256: "0".repeat(64),
    }
}

/// Validates and decides the node work.
pub fn plan(
    spec: &DiskExportSpec,
    lookup: &Lookup,
    pins: &Pins,
) -> Result<LivediskExportSpec, Refusal> {
    let (home, snapshot_id) = located(&spec.snapshot_name, &lookup.snapshot)?;
    let base_snapshot_id = match (&spec.base_snapshot_name, &lookup.base) {
        (Some(name), Some(base)) => {
            let (base_home, id) = located(name, base)?;
            if base_home.volume != home.volume {
                return Err(Refusal::BaseOfAnotherVolume {
                    base: name.clone(),
                    snapshot: spec.snapshot_name.clone(),
                });
            }
            Some(id)
        }
        (Some(name), None) => return Err(Refusal::SnapshotNotFound(name.clone())),
        (None, _) => None,
    };
    Ok(LivediskExportSpec {
        node_name: home.node,
        volume_id: home.volume,
        snapshot_id,
        base_snapshot_id,
        protocol: spec.protocol,
        client_certificate_sha256: pins.certificate_sha256.clone(),
        token_sha256: pins.token_sha256.clone(),
        ttl_seconds: spec.ttl_seconds,
    })
}

/// How long a served export waits before it is looked at again when nothing woke it (the node
/// writes its byte count every few seconds, which wakes it).
pub const READY_RECHECK_SECONDS: u64 = 60;

/// The reason of a serving export, and of one whose time ran out.
pub const SERVING: &str = "Serving";
pub const EXPIRED: &str = "Expired";

/// The DiskExport's status from its node work (`secret`: the credentials Secret's name).
pub fn from_node(
    work: &LivediskExportSpec,
    status: Option<&LivediskExportStatus>,
    secret: &str,
) -> Decision {
    let status = status.cloned().unwrap_or_default();
    let node = &work.node_name;
    let snapshot = &work.snapshot_id;
    let (phase, health, reason, message, event) = match status.phase {
        ExportPhase::Pending => match &status.error {
            Some(e) => (
                Phase::Pending,
                Health::InProgress,
                e.code.reason().to_string(),
                format!(
                    "node {node} cannot serve snapshot {snapshot} yet (tried again): {}",
                    e.message
                ),
                EventKind::Warning,
            ),
            None => (
                Phase::Pending,
                Health::InProgress,
                "ExportPending".to_string(),
                format!("waiting for node {node} to serve snapshot {snapshot}"),
                EventKind::Normal,
            ),
        },
        ExportPhase::Ready => (
            Phase::Ready,
            Health::Ready,
            SERVING.to_string(),
            format!(
                "node {node} serves snapshot {snapshot} read-only at {} to the credentials in Secret {secret:?}",
                status.endpoint.as_deref().unwrap_or("(no endpoint)")
            ),
            EventKind::Normal,
        ),
        ExportPhase::Expired => (
            Phase::Completed,
            Health::Stalled,
            EXPIRED.to_string(),
            format!(
                "the export's ttlSeconds ran out: snapshot {snapshot} is no longer served; create a new DiskExport to read it again"
            ),
            EventKind::Normal,
        ),
        ExportPhase::Failed => (
            Phase::Failed,
            Health::Stalled,
            status
                .error
                .as_ref()
                .map(|e| e.code.reason().to_string())
                .unwrap_or_else(|| "ExportFailed".into()),
            format!(
                "node {node} could not serve snapshot {snapshot}: {}",
                status
                    .error
                    .as_ref()
                    .map(|e| e.message.as_str())
                    .unwrap_or("no detail")
            ),
            EventKind::Warning,
        ),
    };
    let time = |t: &Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>| {
        t.as_ref().map_or(Value::Null, |t| json!(t.0.to_string()))
    };
    let mut fields = serde_json::Map::new();
    fields.insert("nodeName".into(), json!(node));
    fields.insert("credentialsSecretName".into(), json!(secret));
    let serving = status.phase == ExportPhase::Ready;
    fields.insert(
        "endpoint".into(),
        match (serving, &status.endpoint) {
            (true, Some(e)) => json!(e),
            _ => Value::Null,
        },
    );
    fields.insert("expirationTime".into(), time(&status.expiration_time));
    fields.insert(
        "bytesServed".into(),
        status.bytes_served.map_or(Value::Null, |b| json!(b)),
    );
    fields.insert(
        "sizeBytes".into(),
        status.size_bytes.map_or(Value::Null, |b| json!(b)),
    );
    Decision {
        phase,
        conditions: conditions(health, &reason, &message),
        event,
        requeue_seconds: match status.phase {
            ExportPhase::Pending => 15,
            ExportPhase::Ready => READY_RECHECK_SECONDS,
            ExportPhase::Expired | ExportPhase::Failed => 300,
        },
        fields,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::plan::Content;
    use livedisk_api::ExportProtocol;

    fn taken(handle: &str, node: &str, volume: &str) -> Resolved {
        Resolved {
            named: NamedSnapshot::Taken(Content {
                name: format!("content-{handle}"),
                snapshot_handle: Some(handle.into()),
                source_volume: Some(volume.into()),
                created: None,
                retain: false,
                volume_snapshot: None,
            }),
            home: Some(Home {
                node: node.into(),
                volume: volume.into(),
            }),
        }
    }

    fn spec(base: Option<&str>) -> DiskExportSpec {
        DiskExportSpec {
            snapshot_name: "s2".into(),
            base_snapshot_name: base.map(Into::into),
            protocol: ExportProtocol::Http,
            ttl_seconds: Some(600),
        }
    }

    #[test]
    fn an_export_goes_to_the_node_holding_the_snapshot_with_the_pins() {
        let lookup = Lookup {
            snapshot: taken("snap-2", "node-b", "vol-1"),
            base: Some(taken("snap-1", "node-b", "vol-1")),
        };
        let pins = Pins {
            certificate_sha256: "a".repeat(64),
            token_sha256: "b".repeat(64),
        };
        let work = plan(&spec(Some("s1")), &lookup, &pins).expect("plan");
        assert_eq!(work.node_name, "node-b");
        assert_eq!(work.snapshot_id, "snap-2");
        assert_eq!(work.base_snapshot_id.as_deref(), Some("snap-1"));
        assert_eq!(work.client_certificate_sha256, pins.certificate_sha256);
        assert_eq!(work.ttl_seconds, Some(600));
    }

    #[test]
    fn refusals_name_what_is_wrong_and_wait_only_for_what_may_come() {
        use crate::decide::Refusal as _;
        let missing = Lookup {
            snapshot: Resolved {
                named: NamedSnapshot::Missing,
                home: None,
            },
            base: None,
        };
        assert_eq!(
            validate(&spec(None), &missing),
            Err(Refusal::SnapshotNotFound("s2".into()))
        );
        let other = Lookup {
            snapshot: taken("snap-2", "node-b", "vol-1"),
            base: Some(taken("snap-9", "node-b", "vol-9")),
        };
        let refusal = validate(&spec(Some("s9")), &other).expect_err("another volume");
        assert!(!refusal.may_resolve());
        let foreign = Lookup {
            snapshot: Resolved {
                home: None,
                ..taken("snap-2", "node-b", "vol-1")
            },
            base: None,
        };
        assert_eq!(
            validate(&spec(None), &foreign),
            Err(Refusal::NotLivedisk("s2".into()))
        );
    }

    #[test]
    fn the_status_follows_the_node_and_an_expired_export_is_completed() {
        let work = plan(
            &spec(None),
            &Lookup {
                snapshot: taken("snap-2", "node-b", "vol-1"),
                base: None,
            },
            &placeholder_pins(),
        )
        .expect("plan");
        let ready = LivediskExportStatus {
            phase: ExportPhase::Ready,
            endpoint: Some("https://10.0.0.2:10810/exports/snap-2".into()),
            bytes_served: Some(4096),
            ..Default::default()
        };
        let d = from_node(&work, Some(&ready), "x-credentials");
        assert_eq!(d.phase, Phase::Ready);
        assert_eq!(
            d.fields["endpoint"],
            json!("https://10.0.0.2:10810/exports/snap-2")
        );
        assert_eq!(d.fields["bytesServed"], json!(4096));
        let expired = LivediskExportStatus {
            phase: ExportPhase::Expired,
            ..ready
        };
        let d = from_node(&work, Some(&expired), "x-credentials");
        assert_eq!(d.phase, Phase::Completed);
        assert_eq!(d.fields["endpoint"], Value::Null);
    }
}
