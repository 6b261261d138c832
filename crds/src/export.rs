//! `DiskExport`: read-only access to a snapshot's point-in-time view, for backup tools.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::common::Phase;
use crate::schema;

/// A read-only export of a snapshot, readable by offset and length, with the changed-block map
/// against an older snapshot when `baseSnapshotName` is set.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "livedisk.io",
    version = "v1alpha1",
    kind = "DiskExport",
    doc = "A read-only NBD or HTTP export of a snapshot's point-in-time view and changed blocks.",
    namespaced,
    status = "DiskExportStatus",
    shortname = "dexport",
    category = "livedisk",
    printcolumn = r#"{"name":"Snapshot","type":"string","jsonPath":".spec.snapshotName"}"#,
    printcolumn = r#"{"name":"Protocol","type":"string","jsonPath":".spec.protocol"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Served","type":"integer","jsonPath":".status.bytesServed"}"#,
    printcolumn = r#"{"name":"Expires","type":"date","jsonPath":".status.expirationTime"}"#,
    printcolumn = r#"{"name":"Endpoint","type":"string","priority":1,"jsonPath":".status.endpoint"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    validation = Rule::new("self.spec == oldSelf.spec").message("spec is immutable: create a new DiskExport instead").reason(Reason::FieldValueForbidden)
)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!has(self.baseSnapshotName) || self.baseSnapshotName != self.snapshotName").message("baseSnapshotName must name an older snapshot than snapshotName, not the same one").field_path(".baseSnapshotName")
)]
pub struct DiskExportSpec {
    /// The DiskSnapshot to export, in the same namespace.
    #[schemars(schema_with = "schema::object_name")]
    pub snapshot_name: String,
    /// An older DiskSnapshot of the same volume: the export then also publishes the extents that
    /// changed between the two (NBD `qemu:dirty-bitmap:` context, or a JSON map over HTTP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "schema::optional_object_name")]
    pub base_snapshot_name: Option<String>,
    /// `NBD` (TLS) or `HTTP` (HTTPS with Range requests).
    #[serde(default)]
    pub protocol: ExportProtocol,
    /// Stop the export this many seconds after it became ready (60 s to 7 days). Empty: it lives
    /// until the DiskExport is deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 60, max = 604800))]
    pub ttl_seconds: Option<i64>,
}

/// Wire protocol of an export.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema,
)]
pub enum ExportProtocol {
    #[default]
    #[serde(rename = "NBD")]
    Nbd,
    #[serde(rename = "HTTP")]
    Http,
}

/// Observed state of a DiskExport.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DiskExportStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Pending, Ready, Completed (expired) or Failed.
    #[serde(default)]
    pub phase: Phase,
    /// Where to read: `nbds://host:port/name` or `https://host:port/exports/name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Secret in the same namespace holding the credentials: `ca-cert.pem` (the CA that signed
    /// the node's server certificate), `client-cert.pem` and `client-key.pem` (admitted over NBD
    /// and HTTP), and `token` (a bearer token admitted over HTTP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_name: Option<String>,
    /// The node serving the export.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// When the export stops (ttlSeconds after it became ready).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expiration_time: Option<Time>,
    /// Bytes the node's front has sent to this export's clients (reported every few seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_served: Option<i64>,
    /// Size of the exported image in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<i64>,
    /// Ready, Reconciling and Stalled, per the Kubernetes API conventions.
    #[serde(default)]
    #[schemars(schema_with = "schema::conditions")]
    pub conditions: Vec<Condition>,
}
