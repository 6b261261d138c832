//! `DiskRestore`: revert a PVC in place to a snapshot while nothing uses it.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::common::{Phase, Progress};
use crate::schema;

/// An in-place revert of a volume to a snapshot of the same volume. The consumer must be stopped
/// (no pod or VM may use the PVC); the restore waits for that and says so in its conditions. For a
/// new volume from a snapshot use a PVC with a `dataSource` instead.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "livedisk.io",
    version = "v1alpha1",
    kind = "DiskRestore",
    doc = "An in-place revert of a stopped volume to one of its snapshots.",
    namespaced,
    status = "DiskRestoreStatus",
    shortname = "drestore",
    category = "livedisk",
    printcolumn = r#"{"name":"PVC","type":"string","jsonPath":".spec.persistentVolumeClaimName"}"#,
    printcolumn = r#"{"name":"Snapshot","type":"string","jsonPath":".spec.snapshotName"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    validation = Rule::new("self.spec == oldSelf.spec").message("spec is immutable: create a new DiskRestore instead").reason(Reason::FieldValueForbidden)
)]
#[serde(rename_all = "camelCase")]
pub struct DiskRestoreSpec {
    /// The PersistentVolumeClaim to revert, in the same namespace.
    #[schemars(schema_with = "schema::object_name")]
    pub persistent_volume_claim_name: String,
    /// The DiskSnapshot of that PVC to revert to.
    #[schemars(schema_with = "schema::object_name")]
    pub snapshot_name: String,
}

/// Observed state of a DiskRestore.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DiskRestoreStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Pending, Running, Completed or Failed.
    #[serde(default)]
    pub phase: Phase,
    /// Bytes reverted so far, of how many.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// Ready, Reconciling and Stalled, per the Kubernetes API conventions.
    #[serde(default)]
    #[schemars(schema_with = "schema::conditions")]
    pub conditions: Vec<Condition>,
}
