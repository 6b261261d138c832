//! livedisk node-side library: the engine that owns volumes on one host by
//! driving that host's qemu-storage-daemon over QMP.

pub mod csi;
pub mod engine;
