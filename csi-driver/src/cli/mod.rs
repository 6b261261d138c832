//! The `livedisk-csi` command line: the node-local admin tool, and room for
//! the controller/node server modes.

pub mod admin;
pub mod args;
pub mod exit;
pub mod size;
pub mod table;
pub mod views;
