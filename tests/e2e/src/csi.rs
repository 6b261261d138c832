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
    CapacityRange, CreateSnapshotRequest, CreateVolumeRequest, NodePublishVolumeRequest,
    NodeStageVolumeRequest, NodeUnpublishVolumeRequest, NodeUnstageVolumeRequest, Snapshot,
    Topology, TopologyRequirement, VolumeCapability, VolumeContentSource, volume_content_source,
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
    let volume = controller()
        .await?
        .create_volume(block_volume_request(name, node_name, 64 << 20))
        .await?
        .into_inner()
        .volume
        .context("CreateVolume answered no volume")?;
    Ok(volume.volume_id)
}

/// The CreateVolume request of a block volume of `bytes` that must live on `node_name`.
pub fn block_volume_request(name: &str, node_name: &str, bytes: i64) -> CreateVolumeRequest {
    let topology = Topology {
        segments: [(
            livedisk_common::TOPOLOGY_NODE_KEY.to_string(),
            node_name.to_string(),
        )]
        .into(),
    };
    CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![block_capability()],
        accessibility_requirements: Some(TopologyRequirement {
            requisite: vec![topology.clone()],
            preferred: vec![topology],
        }),
        ..Default::default()
    }
}

/// kubelet's staging and publish paths of a block volume for `tag` on `node_name`, under the
/// cluster's state directory.
fn kubelet_paths(node_name: &str, tag: &str) -> Result<(String, String)> {
    let state = std::env::var("LIVEDISK_STATE_DIR").context("LIVEDISK_STATE_DIR is not set")?;
    Ok((
        format!("{state}/kubelet/{node_name}/staging/{tag}"),
        format!("{state}/kubelet/{node_name}/publish/{tag}/dev"),
    ))
}

/// NodeStage + NodePublish of a block volume, as kubelet does; returns the published device.
pub async fn attach_block(node_name: &str, volume_id: &str, tag: &str) -> Result<String> {
    let (staging, target) = kubelet_paths(node_name, tag)?;
    let mut client = node(node_name).await?;
    client
        .node_stage_volume(NodeStageVolumeRequest {
            volume_id: volume_id.into(),
            staging_target_path: staging.clone(),
            volume_capability: Some(block_capability()),
            ..Default::default()
        })
        .await?;
    client
        .node_publish_volume(NodePublishVolumeRequest {
            volume_id: volume_id.into(),
            staging_target_path: staging,
            target_path: target.clone(),
            volume_capability: Some(block_capability()),
            ..Default::default()
        })
        .await?;
    Ok(target)
}

/// NodeUnpublish + NodeUnstage of what `attach_block` did for `tag`, retried as kubelet retries
/// them while the node answers ABORTED (an operation on the volume in progress there).
pub async fn detach_block(node_name: &str, volume_id: &str, tag: &str) -> Result<()> {
    crate::eventually(
        60,
        &format!("{volume_id} unstaged on {node_name}"),
        || async {
            match detach_block_once(node_name, volume_id, tag).await {
                Ok(()) => Ok(Some(())),
                Err(e) if busy(&e) => Ok(None),
                Err(e) => Err(e),
            }
        },
    )
    .await
}

async fn detach_block_once(node_name: &str, volume_id: &str, tag: &str) -> Result<()> {
    let (staging, target) = kubelet_paths(node_name, tag)?;
    let mut client = node(node_name).await?;
    client
        .node_unpublish_volume(NodeUnpublishVolumeRequest {
            volume_id: volume_id.into(),
            target_path: target,
        })
        .await?;
    client
        .node_unstage_volume(NodeUnstageVolumeRequest {
            volume_id: volume_id.into(),
            staging_target_path: staging,
        })
        .await?;
    Ok(())
}

/// The pid of a node's node plugin (`livedisk-csi node` serving `<node>.sock`), if one runs.
pub fn node_plugin_pid(node_name: &str) -> Result<Option<i32>> {
    let endpoint = format!(
        "unix://{}",
        socket_dir()?.join(format!("{node_name}.sock")).display()
    );
    let entries = std::fs::read_dir("/proc")?;
    Ok(entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .find(|pid| {
            let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let args: Vec<String> = String::from_utf8_lossy(&cmd)
                .split('\0')
                .map(str::to_owned)
                .collect();
            // A killed plugin stays a zombie until its restarter reaps it.
            let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| {
                    s.rsplit(')')
                        .next()
                        .unwrap_or("")
                        .trim_start()
                        .starts_with('Z')
                })
                .unwrap_or(true);
            !zombie
                && args.first().is_some_and(|a| a.ends_with("/livedisk-csi"))
                && args.get(1).is_some_and(|a| a == "node")
                && args.contains(&endpoint)
        }))
}

/// Brings the host side of `node`'s network link down or up: the node's namespace loses (or
/// gets back) every connection to the other node and to the API server.
pub fn set_link(node: &str, up: bool) -> Result<()> {
    let prefix = std::env::var("LIVEDISK_LINK_PREFIX").unwrap_or_else(|_| "ld".into());
    let status = std::process::Command::new("ip")
        .args(["link", "set", &format!("{prefix}-{node}")])
        .arg(if up { "up" } else { "down" })
        .status()?;
    anyhow::ensure!(status.success(), "ip link set {prefix}-{node}");
    Ok(())
}

/// kill -9 of `node`'s node plugin (its export front dies with it), then waits until the
/// driver's restart loop has started a new one.
pub async fn kill_node_plugin(node: &str) -> Result<()> {
    let pid =
        node_plugin_pid(node)?.with_context(|| format!("{node}'s node plugin is not running"))?;
    // SAFETY: kill(2) of the node plugin this cluster's driver started.
    anyhow::ensure!(
        unsafe { libc::kill(pid, libc::SIGKILL) } == 0,
        "kill -9 {pid}"
    );
    crate::eventually(120, &format!("{node}'s node plugin back"), || async {
        Ok(node_plugin_pid(node)?.filter(|p| *p != pid))
    })
    .await?;
    Ok(())
}

/// Whether `pid` runs (a zombie does not count).
pub fn process_alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

/// The node's engine daemon pid (its runtime dir is a tmpfs in the node's mount namespace).
pub fn engine_daemon_pid(node_name: &str) -> Result<i32> {
    let file = socket_dir()?
        .with_file_name("nodes")
        .join(node_name)
        .join("run/qsd.pid");
    let output = in_node(node_name, &["cat", &file.to_string_lossy()])?;
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .context("daemon pid file")
}

/// SIGKILL of the node's engine daemon (every device of the node dies with it; its node plugin
/// starts another); waits until it is gone and returns its pid.
pub async fn kill_engine_daemon(node_name: &str) -> Result<i32> {
    let pid = engine_daemon_pid(node_name)?;
    // SAFETY: kill(2) of the engine daemon this cluster's driver started.
    anyhow::ensure!(
        unsafe { libc::kill(pid, libc::SIGKILL) } == 0,
        "kill -9 {pid}"
    );
    crate::eventually(10, "the daemon to be gone", || async {
        Ok((!process_alive(pid)).then_some(()))
    })
    .await?;
    Ok(pid)
}

/// `call` retried while it answers ABORTED (another operation on the volume in progress), as
/// the CSI sidecars and kubelet retry it; any other answer is returned.
pub async fn retry_aborted<T, F, Fut>(what: &str, call: F) -> Result<T>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    crate::eventually(60, what, || async {
        match call().await {
            Ok(v) => Ok(Some(v)),
            Err(e) if busy(&e) => Ok(None),
            Err(e) => Err(e),
        }
    })
    .await
}

/// CreateSnapshot of `volume` through the controller as csi-snapshotter calls it, retried while
/// the answer is ABORTED (another operation on the volume in progress: the node's own work on a
/// snapshot taken just before, for one), as csi-snapshotter retries it.
pub async fn create_snapshot_retrying(name: &str, volume: &str) -> Result<Snapshot> {
    crate::eventually(
        60,
        &format!("CreateSnapshot {name} of {volume}"),
        || async {
            match create_snapshot(name, volume).await {
                Ok(snapshot) => Ok(Some(snapshot)),
                Err(e) if busy(&e) => Ok(None),
                Err(e) => Err(e),
            }
        },
    )
    .await
}

/// CreateSnapshot of `volume` through the controller, as csi-snapshotter calls it.
pub async fn create_snapshot(name: &str, volume: &str) -> Result<Snapshot> {
    controller()
        .await?
        .create_snapshot(CreateSnapshotRequest {
            name: name.into(),
            source_volume_id: volume.into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .snapshot
        .context("CreateSnapshot answered no snapshot")
}

/// A 64 MiB block volume restored from `snapshot` that must live on `node_name`: its ID.
pub async fn restore_block_volume(name: &str, snapshot: &str, node_name: &str) -> Result<String> {
    let mut request = block_volume_request(name, node_name, 64 << 20);
    request.volume_content_source = Some(VolumeContentSource {
        r#type: Some(volume_content_source::Type::Snapshot(
            volume_content_source::SnapshotSource {
                snapshot_id: snapshot.into(),
            },
        )),
    });
    Ok(controller()
        .await?
        .create_volume(request)
        .await?
        .into_inner()
        .volume
        .context("CreateVolume answered no volume")?
        .volume_id)
}

/// DeleteVolume through the controller, as the provisioner calls it.
pub async fn delete_volume(volume: &str) -> Result<()> {
    controller()
        .await?
        .delete_volume(livedisk_csi_proto::csi::v1::DeleteVolumeRequest {
            volume_id: volume.into(),
            ..Default::default()
        })
        .await?;
    Ok(())
}

/// [`attach_block`], retried as kubelet retries NodeStage while the node answers ABORTED (the
/// volume busy for a moment: a node withdrawing another node's attachment of it shares its
/// export).
pub async fn attach_block_as_kubelet(node: &str, volume: &str, tag: &str) -> Result<String> {
    crate::eventually(60, &format!("{volume} staged on {node}"), || async {
        match attach_block(node, volume, tag).await {
            Ok(path) => Ok(Some(path)),
            Err(e) if busy(&e) => Ok(None),
            Err(e) => Err(e),
        }
    })
    .await
}

/// Whether a node answered ABORTED: an operation on the volume is in progress.
fn busy(error: &anyhow::Error) -> bool {
    let text = format!("{error:#}");
    text.contains("another operation is in progress")
        || text.contains("is already in progress; retry later")
}
