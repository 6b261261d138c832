//! `LivediskExport`: a read-only export of one snapshot, served by the node that holds it through
//! its authenticated TLS front.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::NodeError;
use crate::export::ExportProtocol;
use crate::schema;

/// Label on a LivediskExport: the namespace of its DiskExport.
pub const LABEL_NAMESPACE: &str = "livedisk.io/diskexport-namespace";
/// Label on a LivediskExport: the name of its DiskExport.
pub const LABEL_NAME: &str = "livedisk.io/diskexport-name";

/// Node work of a `DiskExport`: declared by the operator, served by the node plugin of
/// `spec.nodeName`. The node exports the snapshot from its engine (read-only) and admits to it,
/// through its TLS front, exactly the client certificate and bearer token whose SHA-256 digests
/// the spec names. The object is named after the DiskExport's UID (`export-<uid>`).
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "livedisk.io",
    version = "v1alpha1",
    kind = "LivediskExport",
    doc = "Internal: a snapshot export served by a node's TLS front (created by the operator for a DiskExport).",
    status = "LivediskExportStatus",
    shortname = "ldexport",
    category = "livedisk-internal",
    selectable = ".spec.nodeName",
    selectable = ".spec.snapshotId",
    printcolumn = r#"{"name":"Snapshot","type":"string","jsonPath":".spec.snapshotId"}"#,
    printcolumn = r#"{"name":"Node","type":"string","jsonPath":".spec.nodeName"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Served","type":"integer","jsonPath":".status.bytesServed"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    validation = Rule::new("self.spec == oldSelf.spec").message("spec is immutable").reason(Reason::FieldValueForbidden)
)]
#[serde(rename_all = "camelCase")]
pub struct LivediskExportSpec {
    /// The node whose engine holds the snapshot.
    #[schemars(schema_with = "schema::object_name")]
    pub node_name: String,
    /// The volume the snapshot belongs to.
    #[schemars(regex(pattern = livedisk_common::VOLUME_ID_PATTERN))]
    pub volume_id: String,
    /// The snapshot to serve (also the export's name on the wire).
    #[schemars(regex(pattern = livedisk_common::SNAPSHOT_ID_PATTERN))]
    pub snapshot_id: String,
    /// An older snapshot of the same volume: the export then publishes the extents changed
    /// since it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = livedisk_common::SNAPSHOT_ID_PATTERN))]
    pub base_snapshot_id: Option<String>,
    /// `NBD` or `HTTP`: which of the front's listeners admits the client.
    pub protocol: ExportProtocol,
    /// Hex SHA-256 of the DER client certificate admitted (NBD, and HTTP with a certificate).
    #[schemars(regex(pattern = "^[0-9a-f]{64}$"))]
    pub client_certificate_sha256: String,
    /// Hex SHA-256 of the bearer token admitted over HTTP.
    #[schemars(regex(pattern = "^[0-9a-f]{64}$"))]
    pub token_sha256: String,
    /// The export stops this many seconds after the node first served it. Empty: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub ttl_seconds: Option<i64>,
}

/// Where a node's export is.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema, Default,
)]
pub enum ExportPhase {
    /// Declared; the node does not serve it yet.
    #[default]
    Pending,
    /// Served: `status.endpoint` admits the named credentials.
    Ready,
    /// Its time ran out: no longer served, nothing admitted.
    Expired,
    /// The node could not serve it; `status.error` says why.
    Failed,
}

/// What the node reports about its export.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LivediskExportStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Pending, Ready, Expired or Failed.
    #[serde(default)]
    pub phase: ExportPhase,
    /// `nbds://host:port/name` or `https://host:port/exports/name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Size of the exported image in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<i64>,
    /// When the node first served the export.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_time: Option<Time>,
    /// When it stops (`readyTime` + `spec.ttlSeconds`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expiration_time: Option<Time>,
    /// Bytes the front sent to this export's clients since the node plugin started serving it
    /// (a restarted node plugin counts on from the last report).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_served: Option<i64>,
    /// Why serving failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<NodeError>,
}
