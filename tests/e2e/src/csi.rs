//! A CSI client over the driver's unix sockets, for tests that play kubelet's part.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use hyper_util::rt::TokioIo;
use livedisk_csi_proto::csi::v1::controller_client::ControllerClient;
use livedisk_csi_proto::csi::v1::node_client::NodeClient;
use livedisk_csi_proto::csi::v1::volume_capability::{
    AccessMode, AccessType, BlockVolume, access_mode::Mode,
};
use livedisk_csi_proto::csi::v1::{
    CapacityRange, CreateVolumeRequest, Topology, TopologyRequirement, VolumeCapability,
};
use tonic::transport::{Channel, Endpoint, Uri};

/// The directory holding `controller.sock` and `<node>.sock` of the running driver.
pub fn socket_dir() -> Result<PathBuf> {
    let state = std::env::var_os("LIVEDISK_STATE_DIR").context(
        "LIVEDISK_STATE_DIR is not set: source the cluster env (`source .livedisk/env`)",
    )?;
    Ok(PathBuf::from(state).join("csi"))
}

/// A gRPC channel over a unix socket.
pub async fn channel(socket: &Path) -> Result<Channel> {
    let socket = socket.to_path_buf();
    let shown = socket.display().to_string();
    Endpoint::try_from("http://[::1]:1")?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await
        .with_context(|| format!("connecting to {shown} (is the driver running? `make up`)"))
}

pub async fn node(name: &str) -> Result<NodeClient<Channel>> {
    Ok(NodeClient::new(
        channel(&socket_dir()?.join(format!("{name}.sock"))).await?,
    ))
}

/// The SnapshotMetadata service on the controller's socket (what the sidecar calls).
pub async fn snapshot_metadata()
-> Result<livedisk_csi_proto::csi::v1::snapshot_metadata_client::SnapshotMetadataClient<Channel>> {
    Ok(
        livedisk_csi_proto::csi::v1::snapshot_metadata_client::SnapshotMetadataClient::new(
            channel(&socket_dir()?.join("controller.sock")).await?,
        ),
    )
}

pub async fn controller() -> Result<ControllerClient<Channel>> {
    Ok(ControllerClient::new(
        channel(&socket_dir()?.join("controller.sock")).await?,
    ))
}

/// Runs a command inside a node's mount and network namespaces (hack/engine-ns.sh exec).
pub fn in_node(node: &str, command: &[&str]) -> Result<std::process::Output> {
    let script = crate::workspace_root().join("hack/engine-ns.sh");
    let nodes = socket_dir()?.with_file_name("nodes");
    let output = std::process::Command::new(script)
        .env("LIVEDISK_NODES_DIR", nodes)
        .arg("exec")
        .arg(node)
        .arg("--")
        .args(command)
        .output()
        .context("running hack/engine-ns.sh exec")?;
    anyhow::ensure!(
        output.status.success(),
        "{command:?} in {node} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(output)
}

/// A single-node-writer block volume capability.
pub fn block_capability() -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(AccessType::Block(BlockVolume {})),
    }
}

/// CreateVolume of a 64 MiB block volume on `node_name` (the CSI name `name`); its volume ID.
pub async fn create_block_volume(name: &str, node_name: &str) -> Result<String> {
    let topology = Topology {
        segments: [(
            livedisk_common::TOPOLOGY_NODE_KEY.to_string(),
            node_name.to_string(),
        )]
        .into(),
    };
    let volume = controller()
        .await?
        .create_volume(CreateVolumeRequest {
            name: name.into(),
            capacity_range: Some(CapacityRange {
                required_bytes: 64 << 20,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![block_capability()],
            accessibility_requirements: Some(TopologyRequirement {
                requisite: vec![topology.clone()],
                preferred: vec![topology],
            }),
            ..Default::default()
        })
        .await?
        .into_inner()
        .volume
        .context("CreateVolume answered no volume")?;
    Ok(volume.volume_id)
}
