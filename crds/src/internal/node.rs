//! `LivediskNode`: what a node plugin reports about its host (pool space, engine).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use serde::{Deserialize, Serialize};

/// One per node that runs the livedisk node plugin; the plugin creates it and keeps its status
/// current. The CSI controller answers GetCapacity from it (and so the provisioner's
/// CSIStorageCapacity objects), without a call to the node.
#[derive(
    CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema,
)]
#[kube(
    group = "livedisk.io",
    version = "v1alpha1",
    kind = "LivediskNode",
    doc = "Internal: a livedisk node's pool and engine, as its node plugin reports them.",
    status = "LivediskNodeStatus",
    shortname = "ldnode",
    category = "livedisk-internal",
    printcolumn = r#"{"name":"Available","type":"integer","jsonPath":".status.poolAvailableBytes"}"#,
    printcolumn = r#"{"name":"Capacity","type":"integer","jsonPath":".status.poolCapacityBytes"}"#,
    printcolumn = r#"{"name":"Volumes","type":"integer","jsonPath":".status.volumes"}"#,
    printcolumn = r#"{"name":"Heartbeat","type":"date","jsonPath":".status.heartbeatTime"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct LivediskNodeSpec {
    /// The pool directory on the host, for people reading the object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool_path: Option<String>,
}

/// The node plugin's last report.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LivediskNodeStatus {
    /// Size of the filesystem holding the pool, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool_capacity_bytes: Option<i64>,
    /// Bytes new volumes can still use in the pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool_available_bytes: Option<i64>,
    /// Volumes the engine holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volumes: Option<i64>,
    /// Process ID of the host's engine daemon (qemu-storage-daemon).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine_pid: Option<i64>,
    /// Whether the node plugin's session with its engine daemon is live: false while the daemon
    /// is gone or a restarted one is being brought in line (volume health reads it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine_live: Option<bool>,
    /// Where the node serves its private changed-block service (gRPC over mutual TLS), which the
    /// CSI controller's SnapshotMetadata service relays from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata_endpoint: Option<String>,
    /// The node's TLS front for exports, while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub export_front: Option<ExportFront>,
    /// When the node plugin last reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat_time: Option<Time>,
}

/// A node's export front: the certificate it asks for and the one the operator issued. The node
/// plugin writes `certificateRequest` (it keeps the private key in memory, never in the API);
/// the operator signs it with the driver's export CA and writes `certificate`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExportFront {
    /// Host (IP address or DNS name) clients use to reach the front.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// TCP port of the NBD-over-TLS listener.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbd_port: Option<i32>,
    /// TCP port of the HTTPS listener.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub https_port: Option<i32>,
    /// PEM PKCS#10 request for the front's server certificate (its names: `host` and the node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_request: Option<String>,
    /// PEM certificate the operator issued (leaf, then the CA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<String>,
    /// Hex SHA-256 of the `certificateRequest` text `certificate` was issued for: a node plugin
    /// that restarted with a new key waits for a certificate of its own request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signed_request_sha256: Option<String>,
}
