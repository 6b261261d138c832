//! The CSI services: Identity, Controller (cluster side, through the internal CRs) and Node
//! (host side, through the engine), plus the node agent that turns the internal CRs of this node
//! into engine work.

pub mod agent;
pub mod attach;
pub mod controller;
pub mod error;
pub mod identity;
pub mod inflight;
pub mod metadata;
pub mod mounts;
pub mod names;
pub mod node;
pub mod request;
pub mod run;
pub mod server;
pub mod topology;
pub mod wait;

/// The CSI driver name, as registered in the CSIDriver object.
pub const DRIVER_NAME: &str = "csi.livedisk.io";
/// The driver's version, reported by GetPluginInfo.
pub const DRIVER_VERSION: &str = env!("CARGO_PKG_VERSION");
