//! Volume and storage health as this node sees them: its engine daemon, the volume's engine
//! export and the front end (nbdfuse and its loop device) that serve a consumer here, and the
//! paths kubelet staged and published. Pure decisions over what the node service observed.

use livedisk_csi_proto::csi::v1::node_get_storage_health_response::StorageBackendHealth;
use livedisk_csi_proto::csi::v1::volume_health::VolumeHealthEntry;
use livedisk_csi_proto::csi::v1::{StorageHealthErrorType, VolumeHealthErrorType};

/// What the node service found about one volume.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VolumeObserved {
    /// The engine's session with its daemon is live.
    pub engine_live: bool,
    /// The node that holds the volume, when it is not this one (a remote attachment).
    pub remote_owner: Option<String>,
    /// This node's engine has an export of the volume for a consumer here (its own volume's
    /// export, or its NBD client of the owner's).
    pub exported: bool,
    /// A front end was attached here for the volume (its device is recorded)...
    pub front_end_recorded: bool,
    /// ...and its loop device still backs the front end's file.
    pub device_present: bool,
    /// Paths kubelet gave that do not exist.
    pub missing_paths: Vec<String>,
}

fn entry(reason: &str, message: String) -> VolumeHealthEntry {
    VolumeHealthEntry {
        status: VolumeHealthErrorType::Inaccessible as i32,
        reason: reason.into(),
        message,
    }
}

/// What is wrong with a volume on this node (nothing: healthy).
pub fn volume_health(observed: &VolumeObserved) -> Vec<VolumeHealthEntry> {
    let mut found = Vec::new();
    if !observed.engine_live {
        found.push(entry(
            "EngineDown",
            "this node's engine daemon, which serves the volume's I/O here, is not running".into(),
        ));
    }
    if observed.front_end_recorded {
        if !observed.exported && observed.engine_live {
            found.push(entry(
                "ExportGone",
                match &observed.remote_owner {
                    Some(owner) => format!(
                        "the volume is attached here but this node's connection to node {owner}, which holds it, is gone"
                    ),
                    None => "the volume is attached here but its engine export is gone".into(),
                },
            ));
        }
        if !observed.device_present {
            found.push(entry(
                "AttachPathGone",
                "the volume's block device on this node no longer backs its front end".into(),
            ));
        }
    }
    for path in &observed.missing_paths {
        found.push(entry(
            "PathGone",
            format!("{path}, where the volume was staged or published, does not exist"),
        ));
    }
    found
}

/// What is wrong with this node's storage (nothing: healthy): its engine daemon and its pool.
/// `pool_available`: the bytes the pool's filesystem has left, `None` when it cannot be read.
pub fn storage_health(engine_live: bool, pool_available: Option<u64>) -> Vec<StorageBackendHealth> {
    let entry =
        |status: StorageHealthErrorType, reason: &str, message: &str| StorageBackendHealth {
            status: status as i32,
            reason: reason.into(),
            message: message.into(),
            volume_capability: None,
        };
    let mut found = Vec::new();
    if !engine_live {
        found.push(entry(
            StorageHealthErrorType::StorageUnreachable,
            "EngineDown",
            "this node's engine daemon is not running: no volume here can be read or written",
        ));
    }
    match pool_available {
        None => found.push(entry(
            StorageHealthErrorType::StorageUnreachable,
            "PoolUnreadable",
            "the pool's filesystem cannot be read",
        )),
        Some(0) => found.push(entry(
            StorageHealthErrorType::StorageDegraded,
            "PoolFull",
            "the pool's filesystem is full: new volumes, snapshots and writes to unallocated blocks fail",
        )),
        Some(_) => {}
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attached() -> VolumeObserved {
        VolumeObserved {
            engine_live: true,
            remote_owner: None,
            exported: true,
            front_end_recorded: true,
            device_present: true,
            missing_paths: vec![],
        }
    }

    fn reasons(found: &[VolumeHealthEntry]) -> Vec<&str> {
        found.iter().map(|e| e.reason.as_str()).collect()
    }

    #[test]
    fn an_attached_volume_with_its_engine_export_and_device_is_healthy() {
        assert!(volume_health(&attached()).is_empty());
        // Not attached here: only the engine matters.
        let idle = VolumeObserved {
            engine_live: true,
            ..Default::default()
        };
        assert!(volume_health(&idle).is_empty());
    }

    #[test]
    fn a_dead_engine_a_lost_export_a_lost_device_or_a_lost_path_is_reported() {
        let down = VolumeObserved {
            engine_live: false,
            exported: false,
            ..attached()
        };
        // The export is unknown while the engine is down: only the engine is named.
        assert_eq!(reasons(&volume_health(&down)), ["EngineDown"]);
        let no_export = VolumeObserved {
            exported: false,
            ..attached()
        };
        assert_eq!(reasons(&volume_health(&no_export)), ["ExportGone"]);
        let remote = VolumeObserved {
            remote_owner: Some("node-b".into()),
            ..no_export
        };
        assert!(volume_health(&remote)[0].message.contains("node-b"));
        let no_device = VolumeObserved {
            device_present: false,
            ..attached()
        };
        assert_eq!(reasons(&volume_health(&no_device)), ["AttachPathGone"]);
        let no_path = VolumeObserved {
            missing_paths: vec!["/var/lib/kubelet/x".into()],
            ..attached()
        };
        let found = volume_health(&no_path);
        assert_eq!(reasons(&found), ["PathGone"]);
        assert!(found[0].message.contains("/var/lib/kubelet/x"));
        assert_eq!(found[0].status, VolumeHealthErrorType::Inaccessible as i32);
    }

    #[test]
    fn storage_is_unreachable_without_its_engine_and_degraded_when_full() {
        assert!(storage_health(true, Some(1 << 30)).is_empty());
        let down = storage_health(false, Some(1 << 30));
        assert_eq!(down.len(), 1);
        assert_eq!(
            down[0].status,
            StorageHealthErrorType::StorageUnreachable as i32
        );
        let full = storage_health(true, Some(0));
        assert_eq!(
            full[0].status,
            StorageHealthErrorType::StorageDegraded as i32
        );
        assert_eq!(full[0].reason, "PoolFull");
        assert_eq!(storage_health(true, None)[0].reason, "PoolUnreadable");
    }
}
