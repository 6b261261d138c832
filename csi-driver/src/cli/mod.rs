//! The `livedisk-csi` command line: the node-local admin tool, the backup client, and room for
//! the controller/node server modes.

pub mod admin;
pub mod args;
pub mod backup;
pub mod exit;
pub mod size;
pub mod table;
pub mod views;
