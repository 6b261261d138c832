//! `DiskMerge`: merge qcow2 layers of a live volume (block-commit or block-stream).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::common::{Phase, Progress};
use crate::schema;

/// A live merge of snapshot layers of one volume, while the consumer keeps writing.
///
/// `Commit` folds the layers above `baseSnapshotName` up to and including `topSnapshotName` down
/// into the base (with no `topSnapshotName`, the active layer too: an active commit). `Stream`
/// pulls everything below the active layer, down to `baseSnapshotName`, up into the active layer.
/// The point-in-time views of the snapshots whose layers disappear are dropped; their changed-block
/// records are kept so that later delta queries stay exact.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "livedisk.io",
    version = "v1alpha1",
    kind = "DiskMerge",
    doc = "A live merge of qcow2 snapshot layers of a volume (block-commit or block-stream).",
    namespaced,
    status = "DiskMergeStatus",
    shortname = "dmerge",
    category = "livedisk",
    printcolumn = r#"{"name":"PVC","type":"string","jsonPath":".spec.persistentVolumeClaimName","description":"Volume being merged"}"#,
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mode"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Progress","type":"integer","jsonPath":".status.progress.percent","description":"Percent done"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    validation = Rule::new("self.spec.persistentVolumeClaimName == oldSelf.spec.persistentVolumeClaimName && self.spec.mode == oldSelf.spec.mode && has(self.spec.baseSnapshotName) == has(oldSelf.spec.baseSnapshotName) && (!has(self.spec.baseSnapshotName) || self.spec.baseSnapshotName == oldSelf.spec.baseSnapshotName) && has(self.spec.topSnapshotName) == has(oldSelf.spec.topSnapshotName) && (!has(self.spec.topSnapshotName) || self.spec.topSnapshotName == oldSelf.spec.topSnapshotName)").message("persistentVolumeClaimName, mode, baseSnapshotName and topSnapshotName are immutable; only bandwidthLimit and cancel may change").reason(Reason::FieldValueForbidden),
    validation = Rule::new("!oldSelf.spec.cancel || self.spec.cancel").message("spec.cancel cannot be set back to false").reason(Reason::FieldValueForbidden)
)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.mode == 'Commit' || !has(self.topSnapshotName)").message("topSnapshotName is only valid with mode Commit").field_path(".topSnapshotName"),
    validation = Rule::new("!has(self.topSnapshotName) || !has(self.baseSnapshotName) || self.topSnapshotName != self.baseSnapshotName").message("topSnapshotName and baseSnapshotName must name different snapshots").field_path(".topSnapshotName")
)]
pub struct DiskMergeSpec {
    /// The PersistentVolumeClaim whose layers are merged, in the same namespace.
    #[schemars(schema_with = "schema::object_name")]
    pub persistent_volume_claim_name: String,
    /// `Commit` (block-commit, default) or `Stream` (block-stream).
    #[serde(default)]
    pub mode: MergeMode,
    /// DiskSnapshot whose layer receives the data (`Commit`) or the lowest layer pulled up
    /// (`Stream`). Empty: the bottom of the chain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "schema::optional_object_name")]
    pub base_snapshot_name: Option<String>,
    /// DiskSnapshot whose layer is the newest one committed (`Commit` only). Empty: the active
    /// layer, i.e. an active commit that pivots the running volume onto the base.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "schema::optional_object_name")]
    pub top_snapshot_name: Option<String>,
    /// Maximum merge speed in bytes per second, e.g. `200Mi`. Empty: unlimited. May be changed
    /// while the merge runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "schema::bandwidth")]
    pub bandwidth_limit: Option<String>,
    /// Set to true to stop the merge: the running QEMU job is cancelled and no further snapshot
    /// is merged (docs/api.md says what each mode leaves behind). Deleting the DiskMerge does
    /// the same.
    #[serde(default)]
    pub cancel: bool,
}

/// How layers are merged.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema,
)]
pub enum MergeMode {
    #[default]
    Commit,
    Stream,
}

/// Observed state of a DiskMerge.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DiskMergeStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Pending, Running, Completed, Failed or Cancelled.
    #[serde(default)]
    pub phase: Phase,
    /// Bytes merged so far, of how many, at what rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// The node whose engine runs the merge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// When the merge started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    /// When the merge finished (completed, failed or cancelled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    /// The VolumeSnapshots (and DiskSnapshots of the same name) whose snapshots were merged
    /// away. The operator deletes them, and with them their VolumeSnapshotContents.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub merged_snapshots: Vec<String>,
    /// Ready, Reconciling and Stalled, per the Kubernetes API conventions.
    #[serde(default)]
    #[schemars(schema_with = "schema::conditions")]
    pub conditions: Vec<Condition>,
}
