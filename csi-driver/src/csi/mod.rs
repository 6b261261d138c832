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
pub mod node;
pub mod request;
pub mod run;
pub mod server;
pub mod topology;
pub mod wait;

pub use livedisk_common::DRIVER_NAME;
/// The driver's version, reported by GetPluginInfo.
pub const DRIVER_VERSION: &str = env!("CARGO_PKG_VERSION");
