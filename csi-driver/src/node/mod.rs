//! The node side: the CSI Node service (stage, publish, stats, health), the agent that makes this
//! node's internal CRs real with the engine, and kubelet plugin registration.

pub mod agent;
pub mod attach;
mod blocking;
pub mod engine_health;
pub mod group_turns;
pub mod grow;
pub mod health;
pub mod merge_work;
pub mod metrics;
pub mod migration_work;
pub mod mount_decision;
pub mod mounts;
pub mod pool_check;
pub mod registration;
pub mod remote_attach;
pub mod report;
pub mod restore_work;
pub mod service;
