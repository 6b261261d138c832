//! The host's qemu-storage-daemon: the process (started, adopted, signalled), its QMP monitor
//! sessions and a minimal NBD client for its unix-socket exports. Every backend serves I/O through
//! this one daemon (decision 1 of the design brief), so nothing here knows about qcow2 chains.

pub mod daemon;
pub mod nbd_client;
pub mod qmp;
