//! `LivediskRestore`: reverting one volume in place to one of its snapshots, on the node that
//! holds it.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::NodeError;
use crate::schema;

/// Label on a LivediskRestore: the namespace of its DiskRestore (a cluster-scoped object cannot
/// be owned by a namespaced one).
pub const LABEL_NAMESPACE: &str = "livedisk.io/diskrestore-namespace";
/// Label on a LivediskRestore: the name of its DiskRestore.
pub const LABEL_NAME: &str = "livedisk.io/diskrestore-name";

/// Node work of a `DiskRestore`: declared by the operator, carried out by the node plugin of
/// `spec.nodeName` with its engine's revert. The revert waits while a consumer has the volume
/// attached (the node reports `Pending` with the reason in `status.waitingFor`), and the node
/// refuses to stage the volume while the object is `Pending` or `Running`. The object is named
/// after the DiskRestore's UID (`restore-<uid>`), so a repeated create finds it.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "livedisk.io",
    version = "v1alpha1",
    kind = "LivediskRestore",
    doc = "Internal: an in-place revert of a volume to one of its snapshots on its node (created by the operator for a DiskRestore).",
    status = "LivediskRestoreStatus",
    shortname = "ldrestore",
    category = "livedisk-internal",
    selectable = ".spec.nodeName",
    selectable = ".spec.volumeId",
    printcolumn = r#"{"name":"Volume","type":"string","jsonPath":".spec.volumeId"}"#,
    printcolumn = r#"{"name":"Snapshot","type":"string","jsonPath":".spec.snapshotId"}"#,
    printcolumn = r#"{"name":"Node","type":"string","jsonPath":".spec.nodeName"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    validation = Rule::new("self.spec == oldSelf.spec").message("spec is immutable").reason(Reason::FieldValueForbidden)
)]
#[serde(rename_all = "camelCase")]
pub struct LivediskRestoreSpec {
    /// The node whose engine holds the volume.
    #[schemars(schema_with = "schema::object_name")]
    pub node_name: String,
    /// The volume to revert.
    #[schemars(regex(pattern = livedisk_common::VOLUME_ID_PATTERN))]
    pub volume_id: String,
    /// The snapshot of that volume to revert to.
    #[schemars(regex(pattern = livedisk_common::SNAPSHOT_ID_PATTERN))]
    pub snapshot_id: String,
}

/// Where a node's revert is.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema, Default,
)]
pub enum RestorePhase {
    /// Declared, or waiting (`status.waitingFor` says for what); nothing changed yet.
    #[default]
    Pending,
    /// The engine reverts the volume now.
    Running,
    /// The volume holds the snapshot's data.
    Completed,
    /// The node stopped on an error; `status.error` says which. The volume is as it was.
    Failed,
}

impl RestorePhase {
    /// Whether the node is done with the object (nothing will run for it again).
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Failed)
    }
}

/// What the revert waits for while `Pending`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreWait {
    /// `VolumeInUse` (a consumer has the volume attached) or `VolumeBusy` (another operation on
    /// the volume runs; tried again in a few seconds).
    pub reason: String,
    /// For people: what holds the volume.
    pub message: String,
}

/// What the node reports about the revert.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LivediskRestoreStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Pending, Running, Completed or Failed.
    #[serde(default)]
    pub phase: RestorePhase,
    /// While `Pending`: why the revert has not started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_for: Option<RestoreWait>,
    /// When the engine started the revert.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the node reached a terminal phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// Why the revert failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<NodeError>,
}
