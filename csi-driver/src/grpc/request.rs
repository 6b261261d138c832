//! Pure validation of CSI request fields shared by the Controller and Node services.

use livedisk_csi_proto::csi::v1::volume_capability::AccessType;
use livedisk_csi_proto::csi::v1::volume_capability::access_mode::Mode;
use livedisk_csi_proto::csi::v1::{CapacityRange, VolumeCapability};

use livedisk_api::internal::VolumeSnapshotReference;

use super::error::CsiError;

/// The VolumeSnapshotClass (or StorageClass: the default of the volume's snapshots) parameter
/// that limits the speed of the merge deleting a snapshot starts, as a quantity of bytes per
/// second (`50Mi`).
pub const MERGE_BANDWIDTH_PARAMETER: &str = "mergeBandwidthLimit";
/// Parameters the CSI sidecars add or reserve (`csi.storage.k8s.io/...`): never livedisk's.
const SIDECAR_PARAMETER_PREFIX: &str = "csi.storage.k8s.io/";
/// The VolumeSnapshot a CreateSnapshot is for, as csi-snapshotter's `--extra-create-metadata`
/// passes it.
const VOLUME_SNAPSHOT_NAME_PARAMETER: &str = "csi.storage.k8s.io/volumesnapshot/name";
const VOLUME_SNAPSHOT_NAMESPACE_PARAMETER: &str = "csi.storage.k8s.io/volumesnapshot/namespace";

/// Size of a volume created without a capacity range.
pub const DEFAULT_CAPACITY: i64 = 1 << 30;
/// Volumes are sized in whole MiB: qcow2 needs sector multiples, and it keeps sizes readable.
const GRANULE: i64 = 1 << 20;

/// The size to create for a capacity range: the required bytes rounded up to a MiB, or the
/// default when nothing is required, never above the limit.
pub fn capacity(range: Option<&CapacityRange>) -> Result<i64, CsiError> {
    let (required, limit) = range
        .map(|r| (r.required_bytes, r.limit_bytes))
        .unwrap_or((0, 0));
    if required < 0 || limit < 0 {
        return Err(CsiError::InvalidArgument(
            "capacity_range bytes must not be negative".into(),
        ));
    }
    if limit > 0 && required > limit {
        return Err(CsiError::InvalidArgument(format!(
            "capacity_range.required_bytes {required} exceeds limit_bytes {limit}"
        )));
    }
    let wanted = if required > 0 {
        required
    } else if limit > 0 {
        limit.min(DEFAULT_CAPACITY)
    } else {
        DEFAULT_CAPACITY
    };
    let rounded = (wanted + GRANULE - 1) / GRANULE * GRANULE;
    if limit > 0 && rounded > limit {
        if wanted <= limit && limit >= 512 {
            // The limit is below the next MiB: honour it exactly at sector granularity.
            return Ok(limit / 512 * 512);
        }
        return Err(CsiError::OutOfRange(format!(
            "no size between {required} and {limit} bytes can be allocated"
        )));
    }
    Ok(rounded)
}

/// Whether an existing volume of `size` bytes satisfies a capacity range (idempotent creates).
pub fn satisfies(size: i64, range: Option<&CapacityRange>) -> bool {
    match range {
        None => true,
        Some(range) => {
            size >= range.required_bytes && (range.limit_bytes == 0 || size <= range.limit_bytes)
        }
    }
}

/// Checks that every capability is one livedisk serves: one node at a time (block or mount), or
/// several nodes writing one block device.
pub fn capabilities(capabilities: &[VolumeCapability]) -> Result<(), CsiError> {
    if capabilities.is_empty() {
        return Err(CsiError::InvalidArgument(
            "volume_capabilities must not be empty".into(),
        ));
    }
    capabilities.iter().try_for_each(capability)
}

/// Checks one capability.
pub fn capability(capability: &VolumeCapability) -> Result<(), CsiError> {
    let access_type = capability
        .access_type
        .as_ref()
        .ok_or_else(|| CsiError::InvalidArgument("volume capability has no access_type".into()))?;
    if let AccessType::Mount(mount) = access_type
        && !mount.fs_type.is_empty()
        && !matches!(mount.fs_type.as_str(), "ext4" | "xfs")
    {
        return Err(CsiError::InvalidArgument(format!(
            "fs_type {:?} is not supported (ext4 or xfs)",
            mount.fs_type
        )));
    }
    let mode = capability
        .access_mode
        .as_ref()
        .map(|m| Mode::try_from(m.mode).unwrap_or(Mode::Unknown))
        .ok_or_else(|| CsiError::InvalidArgument("volume capability has no access_mode".into()))?;
    match mode {
        Mode::SingleNodeWriter
        | Mode::SingleNodeReaderOnly
        | Mode::SingleNodeSingleWriter
        | Mode::SingleNodeMultiWriter => Ok(()),
        // Block only: the owner's engine serves every node's writes, so the device is shared;
        // a filesystem mounted on two nodes at once would be corrupted by either.
        Mode::MultiNodeMultiWriter => match access_type {
            AccessType::Block(_) => Ok(()),
            AccessType::Mount(_) => Err(CsiError::InvalidArgument(
                "access mode MULTI_NODE_MULTI_WRITER is offered for volumeMode Block only (as \
                 KubeVirt's live migration uses it): a filesystem mounted on two nodes at once \
                 would be corrupted"
                    .into(),
            )),
        },
        Mode::Unknown => Err(CsiError::InvalidArgument("access mode is unknown".into())),
        other => Err(CsiError::InvalidArgument(format!(
            "access mode {} is not supported: a livedisk volume has one writer node, or is \
             block-shared by several (MULTI_NODE_MULTI_WRITER)",
            other.as_str_name()
        ))),
    }
}

/// Whose parameters: a VolumeSnapshotClass's (CreateSnapshot) or a StorageClass's
/// (CreateVolume), for the error message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParameterOwner {
    Snapshot,
    Volume,
}

/// Pure: the deletion merge rate limit a CreateSnapshot's or CreateVolume's parameters ask for
/// (`None`: none given). A parameter livedisk does not know, or a limit that is not a positive
/// quantity, is refused: a typo must not silently mean "full speed".
pub fn merge_bandwidth(
    owner: ParameterOwner,
    parameters: &std::collections::HashMap<String, String>,
) -> Result<Option<i64>, CsiError> {
    let what = match owner {
        ParameterOwner::Snapshot => "snapshot",
        ParameterOwner::Volume => "volume",
    };
    let mut limit = None;
    for (key, value) in parameters {
        if key.starts_with(SIDECAR_PARAMETER_PREFIX) {
            continue;
        }
        if key != MERGE_BANDWIDTH_PARAMETER {
            return Err(CsiError::InvalidArgument(format!(
                "unknown {what} parameter {key:?}: livedisk knows only {MERGE_BANDWIDTH_PARAMETER:?}"
            )));
        }
        match livedisk_common::quantity::bytes(value) {
            Some(bytes) if bytes > 0 => limit = Some(bytes),
            _ => {
                return Err(CsiError::InvalidArgument(format!(
                    "{what} parameter {MERGE_BANDWIDTH_PARAMETER}={value:?} is not a positive quantity of bytes per second (for example 50Mi)"
                )));
            }
        }
    }
    Ok(limit)
}

/// Pure: the VolumeSnapshot a CreateSnapshot is for, when the sidecar said; its UID when the
/// CSI name is csi-snapshotter's `snapshot-<UID>`.
pub fn snapshot_origin(
    name: &str,
    parameters: &std::collections::HashMap<String, String>,
) -> Option<VolumeSnapshotReference> {
    let vs_name = parameters.get(VOLUME_SNAPSHOT_NAME_PARAMETER)?;
    let namespace = parameters.get(VOLUME_SNAPSHOT_NAMESPACE_PARAMETER)?;
    if vs_name.is_empty() || namespace.is_empty() {
        return None;
    }
    let uid = name
        .strip_prefix("snapshot-")
        .filter(|u| uuid::Uuid::parse_str(u).is_ok())
        .map(str::to_string);
    Some(VolumeSnapshotReference {
        namespace: namespace.clone(),
        name: vs_name.clone(),
        uid,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use livedisk_csi_proto::csi::v1::volume_capability::{AccessMode, BlockVolume, MountVolume};

    fn range(required: i64, limit: i64) -> CapacityRange {
        CapacityRange {
            required_bytes: required,
            limit_bytes: limit,
        }
    }

    #[test]
    fn capacity_rounds_up_within_limits() {
        assert_eq!(capacity(None).unwrap(), DEFAULT_CAPACITY);
        assert_eq!(capacity(Some(&range(1, 0))).unwrap(), 1 << 20);
        assert_eq!(capacity(Some(&range(0, 10 << 20))).unwrap(), 10 << 20);
        assert_eq!(capacity(Some(&range(1000, 4096))).unwrap(), 4096);
        assert!(matches!(
            capacity(Some(&range(10, 5))),
            Err(CsiError::InvalidArgument(_))
        ));
        assert!(matches!(
            capacity(Some(&range(-1, 0))),
            Err(CsiError::InvalidArgument(_))
        ));
    }

    #[test]
    fn satisfies_checks_both_bounds() {
        assert!(satisfies(100, Some(&range(50, 0))));
        assert!(!satisfies(100, Some(&range(150, 0))));
        assert!(!satisfies(100, Some(&range(0, 99))));
    }

    fn cap(mode: Mode, block: bool) -> VolumeCapability {
        VolumeCapability {
            access_mode: Some(AccessMode { mode: mode as i32 }),
            access_type: Some(if block {
                AccessType::Block(BlockVolume {})
            } else {
                AccessType::Mount(MountVolume::default())
            }),
        }
    }

    #[test]
    fn single_node_modes_and_shared_block_only() {
        assert!(
            capabilities(&[
                cap(Mode::SingleNodeWriter, true),
                cap(Mode::SingleNodeReaderOnly, false)
            ])
            .is_ok()
        );
        assert!(capabilities(&[cap(Mode::MultiNodeMultiWriter, true)]).is_ok());
        let filesystem_rwx = capabilities(&[cap(Mode::MultiNodeMultiWriter, false)])
            .expect_err("a filesystem on several nodes");
        assert!(
            filesystem_rwx.to_string().contains("Block only"),
            "{filesystem_rwx}"
        );
        assert!(capabilities(&[cap(Mode::MultiNodeReaderOnly, true)]).is_err());
        assert!(capabilities(&[cap(Mode::MultiNodeSingleWriter, true)]).is_err());
        assert!(capabilities(&[]).is_err());
        let mut no_type = cap(Mode::SingleNodeWriter, true);
        no_type.access_type = None;
        assert!(capabilities(&[no_type]).is_err());
    }

    #[test]
    fn the_merge_rate_limit_comes_from_its_parameter_only() {
        let params = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<std::collections::HashMap<_, _>>()
        };
        assert_eq!(
            merge_bandwidth(ParameterOwner::Snapshot, &params(&[])).ok(),
            Some(None)
        );
        assert_eq!(
            merge_bandwidth(
                ParameterOwner::Volume,
                &params(&[
                    ("mergeBandwidthLimit", "2Mi"),
                    ("csi.storage.k8s.io/volumesnapshot/name", "s"),
                ])
            )
            .ok(),
            Some(Some(2 << 20))
        );
        let metadata = params(&[
            ("csi.storage.k8s.io/volumesnapshot/name", "s"),
            ("csi.storage.k8s.io/volumesnapshot/namespace", "ns"),
        ]);
        let uid = "0b6f1c1e-7a57-4e0e-9c55-6d1d2c7e9a10";
        let origin = snapshot_origin(&format!("snapshot-{uid}"), &metadata).expect("origin");
        assert_eq!(
            (origin.namespace.as_str(), origin.name.as_str()),
            ("ns", "s")
        );
        assert_eq!(origin.uid.as_deref(), Some(uid));
        assert_eq!(snapshot_origin("mine", &metadata).and_then(|o| o.uid), None);
        assert!(snapshot_origin("mine", &params(&[])).is_none());
        for bad in [
            params(&[("mergeBandwidthLimt", "2Mi")]),
            params(&[("mergeBandwidthLimit", "0")]),
            params(&[("mergeBandwidthLimit", "fast")]),
        ] {
            assert!(
                matches!(
                    merge_bandwidth(ParameterOwner::Snapshot, &bad),
                    Err(CsiError::InvalidArgument(_))
                ),
                "{bad:?}"
            );
        }
    }
}
