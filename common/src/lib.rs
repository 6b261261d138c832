//! The ground floor of livedisk: the small vocabulary that the cluster side (operator, CSI
//! controller), the node side (node plugin) and the engine all share, written once.
//!
//! * [`ids`]: the strict opaque volume and snapshot IDs, and the one pattern they match;
//! * [`names`]: CSI names to IDs (idempotent creation across restarts);
//! * [`quantity`]: Kubernetes quantities as byte counts (rate limits);
//! * [`ErrorCode`]: the one code vocabulary an error carries across every boundary (engine →
//!   internal CR status → gRPC status → condition and Event reason), and whether it is worth
//!   retrying soon ([`Persistence`]);
//! * [`error_chain`]: an error and its causes as one line, for status messages and Events;
//! * the CSI driver name and the topology key.
//!
//! It depends on no Kubernetes, gRPC or QEMU crate, so every other crate can import it.

pub mod chain;
pub mod code;
pub mod ids;
pub mod names;
pub mod quantity;

pub use chain::error_chain;
pub use code::{ErrorCode, Persistence};
pub use ids::{
    GROUP_SNAPSHOT_ID_PATTERN, GroupSnapshotId, IdError, SNAPSHOT_ID_PATTERN, SnapshotId,
    VOLUME_ID_PATTERN, VolumeId,
};

/// The CSI driver name, as registered in the CSIDriver object and answered by GetPluginInfo.
pub const DRIVER_NAME: &str = "csi.livedisk.io";

/// The topology key of a livedisk node (a Node label set by the harness and the chart): every
/// volume lives on exactly one node, named by this one segment.
pub const TOPOLOGY_NODE_KEY: &str = "topology.livedisk.io/node";
