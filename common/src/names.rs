//! CSI names to livedisk IDs.
//!
//! CreateVolume and CreateSnapshot must be idempotent by name, across controller restarts: the ID
//! is a UUIDv5 of the name, so a retried call lands on the same internal object, and a crash
//! between "create the object" and "answer the call" cannot leave a second volume behind.

use uuid::Uuid;

use crate::ids::{GroupSnapshotId, SnapshotId, VolumeId};

/// Namespace of livedisk's name-derived IDs (a fixed random UUID; changing it orphans volumes).
const ID_NAMESPACE: Uuid = Uuid::from_u128(0x6c1f_53d8_9a7e_4b0c_8f35_2d0e_91a4_c7b2);

/// The volume ID for a CreateVolume name.
pub fn volume_id_for(name: &str) -> VolumeId {
    let uuid = Uuid::new_v5(&ID_NAMESPACE, format!("volume/{name}").as_bytes());
    VolumeId::parse(&format!("{}{}", VolumeId::PREFIX, uuid.hyphenated()))
        .unwrap_or_else(|_| unreachable!("a hyphenated UUID always forms a valid volume ID"))
}

/// The snapshot ID for a CreateSnapshot name.
pub fn snapshot_id_for(name: &str) -> SnapshotId {
    let uuid = Uuid::new_v5(&ID_NAMESPACE, format!("snapshot/{name}").as_bytes());
    SnapshotId::parse(&format!("{}{}", SnapshotId::PREFIX, uuid.hyphenated()))
        .unwrap_or_else(|_| unreachable!("a hyphenated UUID always forms a valid snapshot ID"))
}

/// The group snapshot ID for a CreateVolumeGroupSnapshot name.
pub fn group_snapshot_id_for(name: &str) -> GroupSnapshotId {
    let uuid = Uuid::new_v5(&ID_NAMESPACE, format!("group-snapshot/{name}").as_bytes());
    GroupSnapshotId::parse(&format!("{}{}", GroupSnapshotId::PREFIX, uuid.hyphenated()))
        .unwrap_or_else(|_| unreachable!("a hyphenated UUID always forms a valid group ID"))
}

/// The ID of the member snapshot of `volume` in the group snapshot named `name`: a retried
/// CreateVolumeGroupSnapshot lands on the same members. (No CreateSnapshot name can produce it:
/// a CSI name holds no '\0'.)
pub fn group_member_snapshot_id(name: &str, volume: &VolumeId) -> SnapshotId {
    snapshot_id_for(&format!("{name}\0{volume}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_per_name_and_distinct_across_kinds() {
        assert_eq!(volume_id_for("pvc-1"), volume_id_for("pvc-1"));
        assert_ne!(volume_id_for("pvc-1"), volume_id_for("pvc-2"));
        assert_ne!(volume_id_for("x").hex(), snapshot_id_for("x").hex());
        assert!(volume_id_for("../../etc").as_str().starts_with("vol-"));
        assert_eq!(group_snapshot_id_for("g"), group_snapshot_id_for("g"));
        assert_ne!(group_snapshot_id_for("g").hex(), snapshot_id_for("g").hex());
        let (a, b) = (volume_id_for("a"), volume_id_for("b"));
        assert_eq!(
            group_member_snapshot_id("g", &a),
            group_member_snapshot_id("g", &a)
        );
        assert_ne!(
            group_member_snapshot_id("g", &a),
            group_member_snapshot_id("g", &b)
        );
        assert_ne!(
            group_member_snapshot_id("g", &a),
            group_member_snapshot_id("h", &a)
        );
    }
}
