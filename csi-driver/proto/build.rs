//! Compiles `proto/csi.proto` with protox (pure Rust, no protoc), generates
//! the tonic/prost bindings from the resulting descriptor set, and stores the
//! encoded descriptor set in OUT_DIR for gRPC reflection. Also compiles kubelet's plugin
//! registration API (`proto/pluginregistration/v1/api.proto`), kept out of that descriptor set:
//! it is served on kubelet's registry socket, not on the CSI socket. And livedisk's own
//! front-end API (`proto/livedisk/frontends/v1/frontends.proto`), served by the engine pod's
//! front-end server on its own socket, likewise kept apart.

use std::path::PathBuf;

const PROTO_DIR: &str = "proto";
const PROTO_FILE: &str = "proto/csi.proto";
const REGISTRATION_FILE: &str = "proto/pluginregistration/v1/api.proto";
const FRONTENDS_FILE: &str = "proto/livedisk/frontends/v1/frontends.proto";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed={PROTO_FILE}");
    println!("cargo:rerun-if-changed={REGISTRATION_FILE}");
    println!("cargo:rerun-if-changed={FRONTENDS_FILE}");
    println!("cargo:rerun-if-changed=build.rs");

    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);

    let mut compiler = protox::Compiler::new([PROTO_DIR])?;
    // Imports (descriptor/timestamp/wrappers) go in too, so a reflection
    // client can resolve every type; source info carries the comments.
    compiler.include_imports(true).include_source_info(true);
    compiler
        .open_file(PROTO_FILE)
        .map_err(|e| format!("{e:?}"))?;

    std::fs::write(
        out_dir.join("csi_descriptor.bin"),
        compiler.encode_file_descriptor_set(),
    )?;

    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .out_dir(&out_dir)
        .compile_fds(compiler.file_descriptor_set())?;

    let mut registration = protox::Compiler::new([PROTO_DIR])?;
    registration
        .open_file(REGISTRATION_FILE)
        .map_err(|e| format!("{e:?}"))?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .out_dir(&out_dir)
        .compile_fds(registration.file_descriptor_set())?;

    let mut frontends = protox::Compiler::new([PROTO_DIR])?;
    frontends
        .open_file(FRONTENDS_FILE)
        .map_err(|e| format!("{e:?}"))?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .out_dir(&out_dir)
        .compile_fds(frontends.file_descriptor_set())?;

    Ok(())
}
