//! `LivediskSnapshot`: one snapshot, on the node that holds its layer.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, MicroTime};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::{NodeError, NodePhase};
use crate::common::Progress;
use crate::schema;

/// A livedisk snapshot: declared by the CSI controller, taken by the node plugin of
/// `spec.nodeName`. The object's name is the CSI snapshot ID (`snap-<uuid>`). It outlives its
/// source volume, as CSI requires.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "livedisk.io",
    version = "v1alpha1",
    kind = "LivediskSnapshot",
    doc = "Internal: a livedisk snapshot and the node that holds it (created by the CSI controller).",
    status = "LivediskSnapshotStatus",
    shortname = "ldsnap",
    category = "livedisk-internal",
    selectable = ".spec.nodeName",
    selectable = ".spec.volumeId",
    printcolumn = r#"{"name":"Volume","type":"string","jsonPath":".spec.volumeId"}"#,
    printcolumn = r#"{"name":"Node","type":"string","jsonPath":".spec.nodeName"}"#,
    printcolumn = r#"{"name":"Ready","type":"boolean","jsonPath":".status.readyToUse"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Progress","type":"integer","priority":1,"jsonPath":".status.progress.percent"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    validation = Rule::new(super::SNAPSHOT_NAME_RULE).message("the name must be a snapshot ID: snap-<lowercase uuid>"),
    validation = Rule::new("self.spec.volumeId == oldSelf.spec.volumeId && self.spec.csiName == oldSelf.spec.csiName && has(self.spec.mergeBandwidthBytesPerSecond) == has(oldSelf.spec.mergeBandwidthBytesPerSecond) && (!has(self.spec.mergeBandwidthBytesPerSecond) || self.spec.mergeBandwidthBytesPerSecond == oldSelf.spec.mergeBandwidthBytesPerSecond) && has(self.spec.volumeSnapshot) == has(oldSelf.spec.volumeSnapshot) && (!has(self.spec.volumeSnapshot) || self.spec.volumeSnapshot == oldSelf.spec.volumeSnapshot) && has(self.spec.group) == has(oldSelf.spec.group) && (!has(self.spec.group) || self.spec.group == oldSelf.spec.group)").message("spec is immutable except nodeName (a migration hands the snapshot to another node)").reason(Reason::FieldValueForbidden)
)]
#[serde(rename_all = "camelCase")]
pub struct LivediskSnapshotSpec {
    /// The node whose engine holds the snapshot's layer.
    #[schemars(schema_with = "schema::object_name")]
    pub node_name: String,
    /// The volume the snapshot was taken of (it may have been deleted since).
    #[schemars(regex(
        pattern = livedisk_common::VOLUME_ID_PATTERN
    ))]
    pub volume_id: String,
    /// The name the CSI CreateSnapshot call used: repeated calls find this object.
    #[schemars(length(min = 1, max = 253))]
    pub csi_name: String,
    /// Rate limit, in bytes per second, of the merge that deleting this snapshot starts; empty:
    /// unlimited. Captured at CreateSnapshot from the VolumeSnapshotClass parameters, because
    /// DeleteSnapshot carries none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub merge_bandwidth_bytes_per_second: Option<i64>,
    /// The VolumeSnapshot the snapshot was taken for (from the CSI sidecar's extra metadata):
    /// the CSI controller publishes the progress of its deletion there as Events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_snapshot: Option<VolumeSnapshotReference>,
    /// The group snapshot this snapshot is a member of (CSI CreateVolumeGroupSnapshot): the node
    /// takes every member in one engine transaction, at one instant, once all are declared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<SnapshotGroup>,
}

/// The label on every member snapshot of a group snapshot: its group snapshot ID.
pub const GROUP_SNAPSHOT_LABEL: &str = "livedisk.io/group-snapshot";

/// A group snapshot, as each of its members records it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotGroup {
    /// The group snapshot ID (`gsnap-<uuid>`), also the value of the member's
    /// `livedisk.io/group-snapshot` label.
    #[schemars(regex(pattern = livedisk_common::GROUP_SNAPSHOT_ID_PATTERN))]
    pub id: String,
    /// The name the CSI CreateVolumeGroupSnapshot call used.
    #[schemars(length(min = 1, max = 253))]
    pub csi_name: String,
    /// Every member of the group (this one included), in volume ID order.
    #[schemars(length(min = 1, max = 64))]
    pub members: Vec<GroupMember>,
}

/// One member of a group snapshot.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GroupMember {
    /// The member's volume.
    #[schemars(regex(pattern = livedisk_common::VOLUME_ID_PATTERN))]
    pub volume_id: String,
    /// The member's snapshot ID (its LivediskSnapshot's name).
    #[schemars(regex(pattern = livedisk_common::SNAPSHOT_ID_PATTERN))]
    pub snapshot_id: String,
}

/// A VolumeSnapshot, as CreateSnapshot learnt it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotReference {
    /// The VolumeSnapshot's namespace.
    #[schemars(schema_with = "schema::object_name")]
    pub namespace: String,
    /// The VolumeSnapshot's name.
    #[schemars(schema_with = "schema::object_name")]
    pub name: String,
    /// Its UID, where the snapshot's CSI name carries it (csi-snapshotter names a snapshot
    /// `snapshot-<VolumeSnapshot UID>`): `kubectl describe` matches Events by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
}

/// What the node reports about the snapshot.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LivediskSnapshotStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Pending, Ready, Failed or Deleting.
    #[serde(default)]
    pub phase: NodePhase,
    /// Whether a volume can be restored from it now.
    #[serde(default)]
    pub ready_to_use: bool,
    /// Size of a volume restored from it (the source's size at the snapshot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<i64>,
    /// The point in time captured, to the microsecond: the cut that CreateSnapshot returns and
    /// that a guest freeze must enclose (a `Time` would keep whole seconds only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_time: Option<MicroTime>,
    /// Space the snapshot holds in the pool: the allocated bytes of its sealed layer (refreshed
    /// at most every few minutes; a merge into it makes it grow).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocated_bytes: Option<i64>,
    /// While `Deleting`: how far the merge that removes the snapshot's layer is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// Why the node could not take or delete it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<NodeError>,
    /// Ready, Reconciling and Stalled, per the Kubernetes API conventions.
    #[serde(default)]
    #[schemars(schema_with = "schema::conditions")]
    pub conditions: Vec<Condition>,
}
