//! `DiskMigration`: move a live volume to another node while it is written.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::common::{Phase, Progress};
use crate::schema;

/// A live block migration: the volume is mirrored to the target node's engine over an
/// authenticated NBD connection while the consumer keeps writing, converges, cuts over in
/// milliseconds and is verified.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "livedisk.io",
    version = "v1alpha1",
    kind = "DiskMigration",
    doc = "A live block migration of a volume to another node.",
    namespaced,
    status = "DiskMigrationStatus",
    shortname = "dmig",
    category = "livedisk",
    printcolumn = r#"{"name":"PVC","type":"string","jsonPath":".spec.persistentVolumeClaimName","description":"Volume being moved"}"#,
    printcolumn = r#"{"name":"From","type":"string","jsonPath":".status.sourceNodeName"}"#,
    printcolumn = r#"{"name":"To","type":"string","jsonPath":".spec.targetNodeName"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Stage","type":"string","jsonPath":".status.stage"}"#,
    printcolumn = r#"{"name":"Progress","type":"integer","jsonPath":".status.progress.percent","description":"Percent copied"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    validation = Rule::new("self.spec.persistentVolumeClaimName == oldSelf.spec.persistentVolumeClaimName && self.spec.targetNodeName == oldSelf.spec.targetNodeName && self.spec.verify == oldSelf.spec.verify").message("persistentVolumeClaimName, targetNodeName and verify are immutable; only bandwidthLimit, holdCutover and cancel may change").reason(Reason::FieldValueForbidden),
    validation = Rule::new("!oldSelf.spec.cancel || self.spec.cancel").message("spec.cancel cannot be set back to false").reason(Reason::FieldValueForbidden)
)]
#[serde(rename_all = "camelCase")]
pub struct DiskMigrationSpec {
    /// The PersistentVolumeClaim to move, in the same namespace.
    #[schemars(schema_with = "schema::object_name")]
    pub persistent_volume_claim_name: String,
    /// The node that will own the volume afterwards.
    #[schemars(schema_with = "schema::object_name")]
    pub target_node_name: String,
    /// Maximum copy speed in bytes per second, e.g. `500Mi`. Empty: unlimited. May be changed
    /// while the copy runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "schema::bandwidth")]
    pub bandwidth_limit: Option<String>,
    /// Compare source and target after the cutover and before the source is released.
    #[serde(default = "default_true")]
    pub verify: bool,
    /// Set to true to cancel before the cutover; the volume stays where it was.
    #[serde(default)]
    pub cancel: bool,
    /// While true, a converged migration waits in the stage Synchronized instead of cutting
    /// over: the mirror keeps the target in step (every write is acknowledged by both nodes)
    /// until this is set back to false (the cutover follows) or the migration is cancelled.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hold_cutover: bool,
}

fn default_true() -> bool {
    true
}

/// Observed state of a DiskMigration.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DiskMigrationStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Pending, Running, Completed, Failed or Cancelled.
    #[serde(default)]
    pub phase: Phase,
    /// The node that owned the volume when the migration started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_node_name: Option<String>,
    /// While Running: Copying, Synchronized, CuttingOver or Verifying.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<MigrationStage>,
    /// Bytes copied so far, of how many, at what rate (the sealed layers, then the mirror of
    /// the active layer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// Bytes written by the consumer that the mirror has still to copy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub dirty_bytes_remaining: Option<i64>,
    /// Estimated seconds until the copy converges, from the recent throughput.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub eta_seconds: Option<i64>,
    /// With `spec.verify`: what comparing the source's last content with the target found.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification: Option<MigrationVerification>,
    /// How long the consumer's I/O was held during the cutover, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub cutover_pause_milliseconds: Option<i64>,
    /// Ready, Reconciling and Stalled, per the Kubernetes API conventions.
    #[serde(default)]
    #[schemars(schema_with = "schema::conditions")]
    pub conditions: Vec<Condition>,
}

/// The step a running migration is in.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum MigrationStage {
    /// Sealed layers, then the active layer, are copied to the target.
    Copying,
    /// The mirror is converged: every write reaches both nodes before it is acknowledged.
    Synchronized,
    /// `job-complete` is sent or done: the target is the truth from here on, and cancelling is
    /// refused.
    CuttingOver,
    /// The source's last content is compared with the target's.
    Verifying,
}

/// What the comparison of source and target after the cutover found.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MigrationVerification {
    /// Bytes read on both nodes and found equal.
    #[schemars(range(min = 0))]
    pub compared_bytes: i64,
    /// Bytes not compared: written (by the mirror's last copies or the consumer) after the
    /// comparison's dirty bitmap started, just before `job-complete`.
    #[schemars(range(min = 0))]
    pub skipped_bytes: i64,
    /// The offset of the first 4 MiB chunk that differs; absent when everything compared is
    /// equal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub first_difference_offset: Option<i64>,
}
