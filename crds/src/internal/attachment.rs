//! `LivediskAttachment`: a volume used on a node that does not hold it (remote attach).

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::NodeError;
use crate::schema;

/// Label on a LivediskAttachment: the node that uses the volume.
pub const LABEL_CLIENT_NODE: &str = "livedisk.io/client-node";

/// A remote attachment: the node plugin of `spec.clientNode` declares it when it stages a volume
/// that `spec.nodeName` holds; the node plugin of `spec.nodeName` then serves the volume's
/// writable export through its TLS front to exactly the client certificate the spec pins (the
/// client node's engine daemon connects with it). Deleting the object withdraws the admission
/// and cuts its connections. Named `<volume ID>.<client node>`. With `spec.snapshotId`, a
/// snapshot served read-only to a node that restores a volume from it (cross-node restore).
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "livedisk.io",
    version = "v1alpha1",
    kind = "LivediskAttachment",
    doc = "Internal: a volume served over TLS NBD by the node that holds it to a node that uses it (created by the client node's plugin).",
    status = "LivediskAttachmentStatus",
    shortname = "ldattach",
    category = "livedisk-internal",
    selectable = ".spec.nodeName",
    selectable = ".spec.volumeId",
    selectable = ".spec.clientNode",
    printcolumn = r#"{"name":"Volume","type":"string","jsonPath":".spec.volumeId"}"#,
    printcolumn = r#"{"name":"Owner","type":"string","jsonPath":".spec.nodeName"}"#,
    printcolumn = r#"{"name":"Client","type":"string","jsonPath":".spec.clientNode"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    validation = Rule::new("self.spec == oldSelf.spec").message("spec is immutable").reason(Reason::FieldValueForbidden),
    validation = Rule::new("self.spec.nodeName != self.spec.clientNode").message("a node attaches its own volumes locally, not remotely")
)]
#[serde(rename_all = "camelCase")]
pub struct LivediskAttachmentSpec {
    /// The node whose engine holds the volume and serves it.
    #[schemars(schema_with = "schema::object_name")]
    pub node_name: String,
    /// The node that uses the volume.
    #[schemars(schema_with = "schema::object_name")]
    pub client_node: String,
    /// The volume (`vol-<uuid>`; also the export's name on the wire).
    #[schemars(regex(pattern = livedisk_common::VOLUME_ID_PATTERN))]
    pub volume_id: String,
    /// Hex SHA-256 of the DER client certificate the client node's engine presents (its export
    /// front's certificate, which the driver's export CA issues for client and server use).
    #[schemars(regex(pattern = "^[0-9a-f]{64}$"))]
    pub client_certificate_sha256: String,
    /// Set for a cross-node restore: the owner serves this snapshot of `volumeId` read-only
    /// (named by the snapshot's ID on the wire) instead of the volume, and the client node
    /// restores a new volume from it. Such an object is named after the new volume
    /// (`restore.<new volume>.<client node>`) and deleted once that volume stands alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = livedisk_common::SNAPSHOT_ID_PATTERN))]
    pub snapshot_id: Option<String>,
}

/// Where an attachment is.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema, Default,
)]
pub enum AttachmentPhase {
    /// Declared; the owner does not serve it yet.
    #[default]
    Pending,
    /// Served at `status.host`:`status.port` under the volume's ID.
    Ready,
    /// The owner cannot serve it; `status.error` says why.
    Failed,
}

/// What the owner reports.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LivediskAttachmentStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Pending, Ready or Failed.
    #[serde(default)]
    pub phase: AttachmentPhase,
    /// The host the client dials (the owner's export front), named in its server certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The front's NBD port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i32>,
    /// The NBD export name the client opens: the volume's ID, or its import name for an
    /// incoming migration's volume on a node that also attaches it remotely. Absent from owners
    /// that predate it: the volume's ID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub export: Option<String>,
    /// Why the owner cannot serve it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<NodeError>,
}

/// The object's name for the source of a volume `restored` on `client_node` from another node's
/// snapshot: `restore.<restored volume>.<node>` (cut as in [`attachment_name`]). One per restored
/// volume, so that two volumes restored from the same snapshot end their sources independently.
pub fn restore_source_name(restored: &str, client_node: &str) -> String {
    attachment_name(&format!("restore.{restored}"), client_node)
}

/// The object's name for a volume used on `client_node`: `<volume>.<node>`, or, when that is
/// longer than an object name may be, the node's name cut and a digest of it appended.
pub fn attachment_name(volume: &str, client_node: &str) -> String {
    let name = format!("{volume}.{client_node}");
    if name.len() <= 253 {
        return name;
    }
    // FNV-1a: stable across builds and releases, as an object's name must be.
    let hash = client_node.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    let digest = format!("{hash:016x}");
    let keep = 253 - volume.len() - 2 - digest.len();
    let cut = client_node[..keep].trim_end_matches(['.', '-']);
    format!("{volume}.{cut}-{digest}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_join_the_volume_and_the_node_and_stay_object_names() {
        let volume = "vol-01234567-89ab-cdef-0123-456789abcdef";
        assert_eq!(
            attachment_name(volume, "node-b"),
            format!("{volume}.node-b")
        );
        let long = "n".repeat(250);
        let name = attachment_name(volume, &long);
        assert!(name.len() <= 253, "{}", name.len());
        assert!(name.starts_with(volume));
        assert_ne!(name, attachment_name(volume, &"m".repeat(250)));
        let restore = restore_source_name(volume, &long);
        assert!(restore.len() <= 253 && restore.starts_with("restore.vol-"));
        assert_ne!(
            restore_source_name(volume, "node-b"),
            attachment_name(volume, "node-b")
        );
    }
}
