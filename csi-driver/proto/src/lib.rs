//! Generated Rust bindings for the Container Storage Interface (CSI) v1 gRPC
//! API, package `csi.v1`.
//!
//! The definitions live in `proto/csi.proto` (written from the CSI spec's
//! wire format: v1.12, plus the v1.13 additions) and are compiled at build
//! time with protox, so no `protoc` is needed.
//!
//! * [`csi::v1`]: messages, enums, and for each of the services `Identity`,
//!   `Controller`, `GroupController`, `Node` and `SnapshotMetadata` a
//!   `*_server` module (trait + tonic service) and a `*_client` module.
//! * [`pluginregistration`]: kubelet's plugin registration API (vendored from k8s.io/kubelet
//!   v0.36.3), served by the node plugin in kubelet's `plugins_registry` directory in place of
//!   the node-driver-registrar sidecar.
//! * [`frontends`]: livedisk's front-end API (`livedisk.frontends.v1`), served by the engine
//!   pod's front-end server to the node plugin (the FUSE front ends of attached volumes).
//! * [`FILE_DESCRIPTOR_SET`]: the encoded `FileDescriptorSet` (with its
//!   google/protobuf imports) for a gRPC reflection service.

/// The CSI protobuf packages.
pub mod csi {
    /// Package `csi.v1`.
    pub mod v1 {
        #![allow(
            clippy::all,
            clippy::pedantic,
            missing_docs,
            rustdoc::bare_urls,
            rustdoc::invalid_html_tags
        )]
        tonic::include_proto!("csi.v1");
    }
}

/// kubelet's plugin registration API, package `pluginregistration` (its version is v1; the
/// package name carries none).
pub mod pluginregistration {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("pluginregistration");
}

/// livedisk's front-end API, package `livedisk.frontends.v1`.
pub mod frontends {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("livedisk.frontends.v1");
}

/// Encoded `google.protobuf.FileDescriptorSet` of `csi.proto` and its
/// imports, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/csi_descriptor.bin"));

/// Fully qualified names of the five CSI services.
pub const SERVICE_NAMES: [&str; 5] = [
    "csi.v1.Identity",
    "csi.v1.Controller",
    "csi.v1.GroupController",
    "csi.v1.Node",
    "csi.v1.SnapshotMetadata",
];

#[cfg(test)]
mod tests;
