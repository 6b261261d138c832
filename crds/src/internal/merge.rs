//! `LivediskMerge`: merging snapshot layers of one volume away, on the node that holds it.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::NodeError;
use crate::common::Progress;
use crate::merge::MergeMode;
use crate::schema;

/// Node work of a `DiskMerge`: declared by the operator, carried out by the node plugin of
/// `spec.nodeName` with its engine. Every snapshot in `snapshotIds` is deleted by merging its
/// layer away (the engine's snapshot deletion), one after the other in the listed order; every
/// snapshot not listed keeps its point in time. The object is named after the DiskMerge's UID
/// (`merge-<uid>`), so a repeated create finds it.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "livedisk.io",
    version = "v1alpha1",
    kind = "LivediskMerge",
    doc = "Internal: a merge of snapshot layers of a volume on its node (created by the operator for a DiskMerge).",
    status = "LivediskMergeStatus",
    shortname = "ldmerge",
    category = "livedisk-internal",
    selectable = ".spec.nodeName",
    selectable = ".spec.volumeId",
    printcolumn = r#"{"name":"Volume","type":"string","jsonPath":".spec.volumeId"}"#,
    printcolumn = r#"{"name":"Node","type":"string","jsonPath":".spec.nodeName"}"#,
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mode"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Progress","type":"integer","jsonPath":".status.progress.percent"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    validation = Rule::new("self.spec.nodeName == oldSelf.spec.nodeName && self.spec.volumeId == oldSelf.spec.volumeId && self.spec.mode == oldSelf.spec.mode && self.spec.snapshotIds == oldSelf.spec.snapshotIds").message("only bandwidthBytesPerSecond and cancel may change").reason(Reason::FieldValueForbidden),
    validation = Rule::new("!oldSelf.spec.cancel || self.spec.cancel").message("spec.cancel cannot be set back to false").reason(Reason::FieldValueForbidden)
)]
#[serde(rename_all = "camelCase")]
pub struct LivediskMergeSpec {
    /// The node whose engine holds the volume.
    #[schemars(schema_with = "schema::object_name")]
    pub node_name: String,
    /// The volume whose layers are merged.
    #[schemars(regex(pattern = livedisk_common::VOLUME_ID_PATTERN))]
    pub volume_id: String,
    /// `Commit`: each listed snapshot's layer receives the layer above it (block-commit);
    /// `Stream`: each listed snapshot's layer is pulled up into the layer above it
    /// (block-stream).
    pub mode: MergeMode,
    /// The snapshots to merge away, in the order the node merges them (`Commit`: oldest first,
    /// `Stream`: newest first). Resolved by the operator from the DiskMerge's range.
    #[schemars(length(min = 1, max = 1024), inner(regex(pattern = livedisk_common::SNAPSHOT_ID_PATTERN)))]
    pub snapshot_ids: Vec<String>,
    /// Rate limit of the running merge job in bytes per second; 0 or empty: unlimited. Applied
    /// to the running job when it changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub bandwidth_bytes_per_second: Option<i64>,
    /// Set to stop the merge: the running job is cancelled and no further snapshot is merged.
    #[serde(default)]
    pub cancel: bool,
}

/// Where a node's merge is.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema, Default,
)]
pub enum MergePhase {
    /// Declared; the node has not started it yet.
    #[default]
    Pending,
    /// A merge job runs on the node.
    Running,
    /// Every listed snapshot is merged away.
    Completed,
    /// The node stopped on an error; `status.error` says which.
    Failed,
    /// Stopped on request; `status.merged` lists what was merged before.
    Cancelled,
}

impl MergePhase {
    /// Whether the node is done with the object (nothing will run for it again).
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }
}

/// What the node reports about the merge.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LivediskMergeStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Pending, Running, Completed, Failed or Cancelled.
    #[serde(default)]
    pub phase: MergePhase,
    /// Bytes copied by the merge jobs so far (of the snapshots merged and the one merging).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// The snapshot whose layer is being merged away now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_snapshot_id: Option<String>,
    /// The snapshots merged away so far, in order.
    #[serde(default)]
    pub merged: Vec<String>,
    /// When the node started the first merge job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the node reached a terminal phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// Why the merge failed or was stopped; while running, why the current snapshot's merge
    /// waits (the engine refused it for now and it is tried again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<NodeError>,
}
