//! `LivediskVolume`: one volume, on one node.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::{NodeError, NodePhase};
use crate::common::Progress;
use crate::schema;

/// A livedisk volume: declared by the CSI controller, made real by the node plugin of
/// `spec.nodeName`. The object's name is the CSI volume ID (`vol-<uuid>`).
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "livedisk.io",
    version = "v1alpha1",
    kind = "LivediskVolume",
    doc = "Internal: a livedisk volume and the node that owns it (created by the CSI controller).",
    status = "LivediskVolumeStatus",
    shortname = "ldvol",
    category = "livedisk-internal",
    selectable = ".spec.nodeName",
    printcolumn = r#"{"name":"Node","type":"string","jsonPath":".spec.nodeName"}"#,
    printcolumn = r#"{"name":"Capacity","type":"integer","jsonPath":".spec.capacityBytes"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"CSI Name","type":"string","priority":1,"jsonPath":".spec.csiName"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    validation = Rule::new(super::VOLUME_NAME_RULE).message("the name must be a volume ID: vol-<lowercase uuid>"),
    validation = Rule::new("self.spec.csiName == oldSelf.spec.csiName && has(self.spec.contentSource) == has(oldSelf.spec.contentSource) && (!has(self.spec.contentSource) || self.spec.contentSource == oldSelf.spec.contentSource)").message("csiName and contentSource are immutable").reason(Reason::FieldValueForbidden),
    validation = Rule::new("self.spec.capacityBytes >= oldSelf.spec.capacityBytes").message("capacityBytes can only grow").reason(Reason::FieldValueInvalid)
)]
#[serde(rename_all = "camelCase")]
pub struct LivediskVolumeSpec {
    /// The node whose engine holds the volume.
    #[schemars(schema_with = "schema::object_name")]
    pub node_name: String,
    /// Requested size in bytes; increasing it expands the volume on the node.
    #[schemars(range(min = 1))]
    pub capacity_bytes: i64,
    /// The name the CSI CreateVolume call used (usually `pvc-<uid>`): repeated calls with the same
    /// name find this object instead of creating another.
    #[schemars(length(min = 1, max = 253))]
    pub csi_name: String,
    /// Initial content: a snapshot or another volume. Empty: a blank volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_source: Option<ContentSource>,
    /// Rate limit, in bytes per second, of the merges that deleting this volume's snapshots
    /// start, from the StorageClass's `mergeBandwidthLimit`; a snapshot's own
    /// VolumeSnapshotClass limit wins. Also the speed of the background copy of a volume made
    /// from a snapshot. Empty: unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub merge_bandwidth_bytes_per_second: Option<i64>,
}

/// Initial content of a new volume: exactly one of the two IDs.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("has(self.snapshotId) != has(self.volumeId)").message("exactly one of snapshotId or volumeId must be set")
)]
pub struct ContentSource {
    /// Restore from this snapshot (`snap-<uuid>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(
        pattern = livedisk_common::SNAPSHOT_ID_PATTERN
    ))]
    pub snapshot_id: Option<String>,
    /// Clone this volume (`vol-<uuid>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(
        pattern = livedisk_common::VOLUME_ID_PATTERN
    ))]
    pub volume_id: Option<String>,
}

/// What the node reports about the volume.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LivediskVolumeStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Pending, Creating, Ready, Failed or Deleting.
    #[serde(default)]
    pub phase: NodePhase,
    /// The size the volume has on the node now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity_bytes: Option<i64>,
    /// Why the node could not do what the spec asks, as a gRPC code and message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<NodeError>,
    /// Background work on the volume (flattening a clone), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// Ready, Reconciling and Stalled, per the Kubernetes API conventions.
    #[serde(default)]
    #[schemars(schema_with = "schema::conditions")]
    pub conditions: Vec<Condition>,
}
