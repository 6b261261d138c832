//! `LivediskMigration`: moving one volume from the node that holds it to another node, carried
//! out by the node plugins of both.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::NodeError;
use crate::common::Progress;
pub use crate::migration::{MigrationStage, MigrationVerification};
use crate::schema;

/// Node work of a `DiskMigration`, declared by the operator and named `migrate-<uid>` after it.
///
/// The two node plugins talk through this object only (and the TLS NBD connections it admits):
/// the target publishes its client certificate (`status.target`); the source serves its sealed
/// layer files and a copy of its volume record read-only to exactly that certificate
/// (`status.source`); the target copies them, adds an empty active layer on top and reports the
/// volume imported; the source then mirrors its active layer into the target's (`sync=top`,
/// write-blocking) with the consumer writing, cuts over with `job-complete` and hands the
/// volume's inventory objects to the target. The source drives `status.phase` and
/// `status.stage`; each side writes only its own part of the status.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "livedisk.io",
    version = "v1alpha1",
    kind = "LivediskMigration",
    doc = "Internal: a live move of a volume to another node (created by the operator for a DiskMigration).",
    status = "LivediskMigrationStatus",
    shortname = "ldmig",
    category = "livedisk-internal",
    selectable = ".spec.nodeName",
    selectable = ".spec.targetNodeName",
    selectable = ".spec.volumeId",
    printcolumn = r#"{"name":"Volume","type":"string","jsonPath":".spec.volumeId"}"#,
    printcolumn = r#"{"name":"From","type":"string","jsonPath":".spec.nodeName"}"#,
    printcolumn = r#"{"name":"To","type":"string","jsonPath":".spec.targetNodeName"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Stage","type":"string","jsonPath":".status.stage"}"#,
    printcolumn = r#"{"name":"Progress","type":"integer","jsonPath":".status.progress.percent"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    validation = Rule::new("self.spec.nodeName == oldSelf.spec.nodeName && self.spec.targetNodeName == oldSelf.spec.targetNodeName && self.spec.volumeId == oldSelf.spec.volumeId && self.spec.verify == oldSelf.spec.verify").message("only bandwidthBytesPerSecond, holdCutover and cancel may change").reason(Reason::FieldValueForbidden),
    validation = Rule::new("!oldSelf.spec.cancel || self.spec.cancel").message("spec.cancel cannot be set back to false").reason(Reason::FieldValueForbidden),
    validation = Rule::new("self.spec.nodeName != self.spec.targetNodeName").message("the target node is the node that holds the volume already")
)]
#[serde(rename_all = "camelCase")]
pub struct LivediskMigrationSpec {
    /// The node that holds the volume now (the source).
    #[schemars(schema_with = "schema::object_name")]
    pub node_name: String,
    /// The node that will hold it.
    #[schemars(schema_with = "schema::object_name")]
    pub target_node_name: String,
    /// The volume to move.
    #[schemars(regex(pattern = livedisk_common::VOLUME_ID_PATTERN))]
    pub volume_id: String,
    /// Rate limit of the copy and of the mirror in bytes per second; 0 or empty: unlimited.
    /// Applied to the running mirror when it changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub bandwidth_bytes_per_second: Option<i64>,
    /// Compare the source's last content with the target after the cutover.
    #[serde(default)]
    pub verify: bool,
    /// Set to stop the migration; honoured until the cutover starts, refused after it.
    #[serde(default)]
    pub cancel: bool,
    /// While true, a converged mirror is kept in step (stage Synchronized) and not cut over.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hold_cutover: bool,
}

/// Where a migration is.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema, Default,
)]
pub enum MigrationPhase {
    /// Declared; the nodes have not started it.
    #[default]
    Pending,
    /// The nodes are moving the volume; `status.stage` says where they are.
    Running,
    /// The target holds the volume.
    Completed,
    /// Stopped on an error before the cutover: the source still holds the volume.
    Failed,
    /// Stopped on request before the cutover: the source still holds the volume.
    Cancelled,
}

impl MigrationPhase {
    /// Whether nothing will run for the object again.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }
}

/// The source node's part of the status.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MigrationSource {
    /// The source's export front: a host its certificate names.
    pub host: String,
    /// The source's export front: its NBD port.
    pub port: i32,
    /// The NBD export (raw bytes) of the source's volume record as it was when the copy
    /// started.
    pub manifest_export: String,
    /// The manifest's length in bytes (the export is padded to whole sectors).
    #[schemars(range(min = 1))]
    pub manifest_length: i64,
    /// Hex SHA-256 of the manifest's bytes, checked by the target on arrival.
    #[schemars(regex(pattern = "^[0-9a-f]{64}$"))]
    pub manifest_sha256: String,
    /// The sealed layer files to copy, base first.
    #[serde(default)]
    pub layers: Vec<MigrationLayer>,
    /// How long the mirror took from its start to converging (ready), in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub mirror_milliseconds: Option<i64>,
    /// The bytes the mirror had copied when it converged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub mirrored_bytes: Option<i64>,
    /// When the cutover held the consumer's I/O, for how long, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub cutover_pause_milliseconds: Option<i64>,
    /// Set once `job-complete` returned: the target is the truth.
    #[serde(default)]
    pub pivoted: bool,
    /// With `spec.verify`: what comparing the old chain with the target found.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification: Option<MigrationVerification>,
}

/// One sealed layer file the source serves for the copy.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MigrationLayer {
    /// The layer number (the file is `layer-<seq>.qcow2` on both nodes).
    #[schemars(range(min = 0))]
    pub seq: i64,
    /// The NBD export of the file's bytes.
    pub export: String,
    /// The file's length in bytes.
    #[schemars(range(min = 0))]
    pub bytes: i64,
}

/// The target node's part of the status.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MigrationTarget {
    /// Hex SHA-256 of the DER certificate the target presents when it reads the source's
    /// exports (its export front's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = "^[0-9a-f]{64}$"))]
    pub certificate_sha256: Option<String>,
    /// Bytes of the sealed layers copied so far.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub copied_bytes: i64,
    /// Set once the layers and the record are in the target's pool with an empty active layer
    /// on top, served by its engine.
    #[serde(default)]
    pub imported: bool,
    /// How long the successful copy of the manifest and the sealed layers took, in
    /// milliseconds (for benchmarks: bytes copied over this time is the copy's throughput).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub copy_milliseconds: Option<i64>,
    /// Why the target could not do its part.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<NodeError>,
}

/// What the nodes report about the migration.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LivediskMigrationStatus {
    /// Pending, Running, Completed, Failed or Cancelled (written by the source).
    #[serde(default)]
    pub phase: MigrationPhase,
    /// While Running: Copying, Synchronized, CuttingOver or Verifying.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<MigrationStage>,
    /// Bytes copied so far, of how many, at what rate (layers, then the mirror).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// Bytes the mirror still has to copy (written while the consumer keeps writing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub dirty_bytes_remaining: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<MigrationSource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<MigrationTarget>,
    /// When the source started, and when it reached a terminal phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// Why the migration failed, was refused, or why a cancel was refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<NodeError>,
}
