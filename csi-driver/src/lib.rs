//! livedisk's CSI driver: one binary, two sides.
//!
//! * [`cluster`]: the CSI Controller service (a Deployment beside the CSI sidecars). It declares
//!   volumes and snapshots as internal CRs with `spec.nodeName` and waits for their status; it
//!   never touches a host.
//! * [`node`]: the CSI Node service and the node agent (a DaemonSet on every host). The agent
//!   turns this node's internal CRs into work for the engine (`livedisk-engine`); the Node service
//!   stages and publishes volumes through it.
//! * [`metadata`]: the changed-block (SnapshotMetadata) service: served by the node from its
//!   engine's records over mutual TLS, relayed by the cluster side to the sidecar.
//! * [`export`]: the node's export front: snapshot exports over NBD-over-TLS and HTTPS for
//!   backup tools, admitted per export by credentials the operator issued.
//! * [`frontends`]: the engine pod's front-end server (the FUSE front ends of attached volumes,
//!   beside the engine daemon) and the node plugin's client of it.
//! * [`grpc`]: what both sides share: the unix-socket server, Identity, the error type mapped to
//!   gRPC codes, request validation, in-flight guards and topology.
//! * [`run`]: the server modes the binary starts.

pub mod cluster;
pub mod export;
pub mod frontends;
pub mod grpc;
pub mod metadata;
pub mod node;
pub mod run;

/// The driver's version, reported by GetPluginInfo.
pub const DRIVER_VERSION: &str = env!("CARGO_PKG_VERSION");
