//! The qcow2 chain backend: a volume is a chain of qcow2 layers
//! (`base <- snap-A <- snap-B <- active`) held by the host's
//! qemu-storage-daemon and driven over QMP.
//!
//! Every mutating operation follows the same shape: take the volume's lock,
//! load its record, decide with pure functions (`plan`), do the QMP work,
//! then persist the new record atomically. The record is written *before*
//! work that recovery must be able to finish (in-flight merges) and *after*
//! work that is harmless to lose (a layer file nobody references yet).
pub mod bitmap;
mod capture;
pub mod clone;
mod engine;
mod export;
mod hidden_base;
mod merge;
mod merge_pause;
pub mod migrate;
mod open;
pub mod plan;
pub mod qemu_img;
mod query;
mod reclaim;
mod reconcile;
mod reconnect;
pub mod record;
pub mod recover;
pub mod remote;
pub mod remote_clone;
mod revert;
mod snapshot;
mod space;
pub mod tombstone;
mod types;
mod volume;
mod writeback;

pub use engine::Engine;
pub use hidden_base::hidden_base_id;
pub use record::MergeMode;
pub use types::{
    EngineConfig, ExportInfo, ExtentList, ExtentPage, MergeOptions, Recovery, SnapshotInfo,
    SnapshotTimings, VolumeInfo,
};
