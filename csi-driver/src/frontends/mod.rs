//! The engine pod's front-end server (`livedisk-csi frontends`): it runs the FUSE front ends
//! (nbdfuse) that turn the engine daemon's writable NBD export of a volume into a file, beside
//! the daemon, so that restarting or upgrading the node plugin never cuts a consumer's I/O. The
//! node plugin keeps the kernel objects (loop device, filesystem, mounts), which outlive it.
//!
//! * [`layout`]: socket and per-volume paths, and the NBD URIs the server accepts (pure);
//! * [`plan`]: what start and stop do, from what is observed on the host (pure);
//! * [`supervisor`]: observing, spawning, reaping and unmounting (the I/O shell);
//! * [`service`]: the gRPC service (`livedisk.frontends.v1.FrontEnds`) and its server;
//! * [`client`]: the node plugin's client;
//! * [`error`]: the server's error type and its codes.

pub mod client;
pub mod error;
pub mod layout;
pub mod plan;
pub mod service;
pub mod supervisor;

pub use client::FrontEndsClient;
pub use service::FrontEndServer;
