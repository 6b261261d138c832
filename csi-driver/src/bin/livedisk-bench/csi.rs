//! A CSI client over the running driver's unix sockets, for benchmark (e): it plays the parts
//! of the external-provisioner and -snapshotter (controller socket), kubelet (the node's
//! socket) and a backup tool behind the snapshot-metadata sidecar (the controller socket's
//! SnapshotMetadata service). Thin I/O: the figures are wall times of the calls.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use livedisk_csi::grpc::topology::of_node;
use livedisk_csi_proto::csi::v1::controller_client::ControllerClient;
use livedisk_csi_proto::csi::v1::node_client::NodeClient;
use livedisk_csi_proto::csi::v1::snapshot_metadata_client::SnapshotMetadataClient;
use livedisk_csi_proto::csi::v1::volume_capability::{
    AccessMode, AccessType, BlockVolume, access_mode::Mode,
};
use livedisk_csi_proto::csi::v1::*;
use tokio::process::Command;
use tonic::transport::{Channel, Endpoint};

/// Where the driver of hack/bench.sh's cluster listens, and the node the benchmark uses.
/// hack/bench.sh sets these; they follow hack/driver.sh's layout.
#[derive(Debug, Clone)]
pub struct CsiTarget {
    /// The CSI controller's socket (Controller + SnapshotMetadata services).
    pub controller_socket: PathBuf,
    /// The node plugin's socket of `node`.
    pub node_socket: PathBuf,
    /// The node the volumes are placed on (its topology segment).
    pub node: String,
    /// hack/engine-ns.sh's nodes directory: `<dir>/<node>/run` is the node engine's runtime
    /// directory (its NBD socket), visible only inside the node's mount namespace.
    pub nodes_dir: PathBuf,
    /// Where kubelet's staging paths of `node` go.
    pub staging_dir: PathBuf,
}

impl CsiTarget {
    /// From the environment hack/bench.sh sets for scenario (e); `None` if it set nothing.
    pub fn from_env() -> Result<Option<Self>> {
        let var = |name: &str| std::env::var_os(name).map(PathBuf::from);
        let Some(controller_socket) = var("LIVEDISK_BENCH_CONTROLLER_SOCKET") else {
            return Ok(None);
        };
        let need = |name: &str| var(name).with_context(|| format!("{name} is not set"));
        Ok(Some(Self {
            controller_socket,
            node_socket: need("LIVEDISK_BENCH_NODE_SOCKET")?,
            node: need("LIVEDISK_BENCH_NODE")?.to_string_lossy().into_owned(),
            nodes_dir: need("LIVEDISK_BENCH_NODES_DIR")?,
            staging_dir: need("LIVEDISK_BENCH_STAGING_DIR")?,
        }))
    }

    /// The NBD URI of a volume's consumer export on the node's engine daemon (export name =
    /// volume ID, socket in the daemon's runtime directory).
    pub fn export_uri(&self, volume_id: &str) -> String {
        let socket = self.nodes_dir.join(&self.node).join("run/nbd.sock");
        format!("nbd+unix:///{volume_id}?socket={}", socket.display())
    }
}

/// A raw block volume, one node writer: what the benchmark's volumes are staged as.
fn block_capability() -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(AccessType::Block(BlockVolume {})),
    }
}

async fn unix_channel(socket: &Path) -> Result<Channel> {
    Endpoint::from_shared(format!("unix://{}", socket.display()))?
        .connect()
        .await
        .with_context(|| format!("connecting to {}", socket.display()))
}

/// A GetMetadataDelta stream as received: its extents checked the way a backup tool relies on
/// them (ascending, not overlapping, no message above `max_results`), and counted.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct DeltaTally {
    pub extents: u64,
    pub messages: usize,
    /// End of the last extent seen (the next one must not start before it).
    end: i64,
}

impl DeltaTally {
    pub fn add(&mut self, blocks: &[BlockMetadata], max_results: i32) -> Result<()> {
        ensure!(
            max_results == 0 || blocks.len() <= max_results as usize,
            "a message carried {} extents, max_results is {max_results}",
            blocks.len()
        );
        for b in blocks {
            ensure!(
                b.size_bytes > 0 && b.byte_offset >= self.end,
                "extent {}+{} is empty or not after the previous one (which ended at {})",
                b.byte_offset,
                b.size_bytes,
                self.end
            );
            self.end = b.byte_offset + b.size_bytes;
        }
        self.extents += blocks.len() as u64;
        self.messages += 1;
        Ok(())
    }
}

/// How long a call answered ABORTED is tried again.
const RETRY_FOR: Duration = Duration::from_secs(120);

/// Makes `call` until it answers something other than ABORTED, as the CSI sidecars do: ABORTED
/// means another operation holds the volume on its node (a background extent capture storing
/// its record, say) and that the call is to be made again. The answer, or the last error.
async fn retry_aborted<T, Fut>(what: &str, mut call: impl FnMut() -> Fut) -> Result<T>
where
    Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let deadline = Instant::now() + RETRY_FOR;
    let mut pause = Duration::from_millis(100);
    loop {
        match call().await {
            Ok(reply) => return Ok(reply.into_inner()),
            Err(status) if status.code() == tonic::Code::Aborted && Instant::now() < deadline => {
                eprintln!("bench: (e) {what}: ABORTED ({}), again", status.message());
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
            Err(status) => return Err(anyhow::Error::new(status).context(what.to_string())),
        }
    }
}

/// The driver's three services, connected.
#[derive(Clone)]
pub struct Driver {
    pub target: CsiTarget,
    controller: ControllerClient<Channel>,
    node: NodeClient<Channel>,
    metadata: SnapshotMetadataClient<Channel>,
}

impl Driver {
    pub async fn connect(target: CsiTarget) -> Result<Self> {
        let controller = unix_channel(&target.controller_socket).await?;
        let node = unix_channel(&target.node_socket).await?;
        Ok(Self {
            controller: ControllerClient::new(controller.clone()),
            // A one-page answer of 100 000+ extents is a message of a few MiB.
            metadata: SnapshotMetadataClient::new(controller).max_decoding_message_size(64 << 20),
            node: NodeClient::new(node),
            target,
        })
    }

    /// CreateVolume of an empty raw block volume on the benchmark's node; returns its ID.
    pub async fn create_volume(&self, name: &str, bytes: u64) -> Result<String> {
        let here = of_node(&self.target.node);
        let request = CreateVolumeRequest {
            name: name.into(),
            capacity_range: Some(CapacityRange {
                required_bytes: bytes as i64,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![block_capability()],
            accessibility_requirements: Some(TopologyRequirement {
                requisite: vec![here.clone()],
                preferred: vec![here],
            }),
            ..Default::default()
        };
        let reply = retry_aborted(&format!("CreateVolume {name}"), || {
            let (mut c, r) = (self.controller.clone(), request.clone());
            async move { c.create_volume(r).await }
        })
        .await?;
        reply
            .volume
            .map(|v| v.volume_id)
            .context("CreateVolume answered without a volume")
    }

    pub async fn delete_volume(&self, volume_id: &str) -> Result<()> {
        let request = DeleteVolumeRequest {
            volume_id: volume_id.into(),
            ..Default::default()
        };
        retry_aborted(&format!("DeleteVolume {volume_id}"), || {
            let (mut c, r) = (self.controller.clone(), request.clone());
            async move { c.delete_volume(r).await }
        })
        .await?;
        Ok(())
    }

    /// CreateSnapshot through the controller socket: the snapshot's ID and the call's wall
    /// time in seconds (a call answered ABORTED and made again counts from the first).
    pub async fn create_snapshot(&self, name: &str, volume_id: &str) -> Result<(String, f64)> {
        let request = CreateSnapshotRequest {
            source_volume_id: volume_id.into(),
            name: name.into(),
            ..Default::default()
        };
        let started = Instant::now();
        let reply = retry_aborted(&format!("CreateSnapshot {name}"), || {
            let (mut c, r) = (self.controller.clone(), request.clone());
            async move { c.create_snapshot(r).await }
        })
        .await?;
        let secs = started.elapsed().as_secs_f64();
        let snapshot = reply
            .snapshot
            .context("CreateSnapshot answered without a snapshot")?;
        ensure!(snapshot.ready_to_use, "snapshot {name} is not ready to use");
        Ok((snapshot.snapshot_id, secs))
    }

    pub async fn delete_snapshot(&self, snapshot_id: &str) -> Result<()> {
        let request = DeleteSnapshotRequest {
            snapshot_id: snapshot_id.into(),
            ..Default::default()
        };
        retry_aborted(&format!("DeleteSnapshot {snapshot_id}"), || {
            let (mut c, r) = (self.controller.clone(), request.clone());
            async move { c.delete_snapshot(r).await }
        })
        .await?;
        Ok(())
    }

    fn staging_path(&self, tag: &str) -> String {
        self.target.staging_dir.join(tag).display().to_string()
    }

    /// NodeStage as a raw block volume: the node attaches it (its engine serves the writable
    /// export the benchmark then writes through).
    pub async fn stage(&self, volume_id: &str, tag: &str) -> Result<()> {
        let request = NodeStageVolumeRequest {
            volume_id: volume_id.into(),
            staging_target_path: self.staging_path(tag),
            volume_capability: Some(block_capability()),
            ..Default::default()
        };
        retry_aborted(&format!("NodeStageVolume {volume_id}"), || {
            let (mut c, r) = (self.node.clone(), request.clone());
            async move { c.node_stage_volume(r).await }
        })
        .await?;
        Ok(())
    }

    pub async fn unstage(&self, volume_id: &str, tag: &str) -> Result<()> {
        let request = NodeUnstageVolumeRequest {
            volume_id: volume_id.into(),
            staging_target_path: self.staging_path(tag),
        };
        retry_aborted(&format!("NodeUnstageVolume {volume_id}"), || {
            let (mut c, r) = (self.node.clone(), request.clone());
            async move { c.node_unstage_volume(r).await }
        })
        .await?;
        Ok(())
    }

    /// GetMetadataDelta through the controller socket (relayed from the node), read to the end
    /// of the stream: what it held and the wall time until it ended.
    pub async fn delta(
        &self,
        base: &str,
        target: &str,
        max_results: i32,
    ) -> Result<(DeltaTally, f64)> {
        let request = GetMetadataDeltaRequest {
            base_snapshot_id: base.into(),
            target_snapshot_id: target.into(),
            starting_offset: 0,
            max_results,
            ..Default::default()
        };
        let started = Instant::now();
        let mut stream = retry_aborted(&format!("GetMetadataDelta {base} -> {target}"), || {
            let (mut c, r) = (self.metadata.clone(), request.clone());
            async move { c.get_metadata_delta(r).await }
        })
        .await?;
        let mut tally = DeltaTally::default();
        while let Some(message) = stream
            .message()
            .await
            .with_context(|| format!("GetMetadataDelta {base} -> {target} stream"))?
        {
            tally.add(&message.block_metadata, max_results)?;
        }
        Ok((tally, started.elapsed().as_secs_f64()))
    }

    /// Waits until the node's engine has unlinked what deletions left to its background reclaim
    /// (`.reclaim` in the pool), the pool's filesystem has committed that, and its freed blocks
    /// are trimmed (given back to the host), so that the next measurement does not pay for the
    /// previous one's cleanup. hack/bench.sh mounts the pools without `discard`: trimming on
    /// every unlink would run behind the next snapshot's flushes.
    pub async fn settle(&self) -> Result<()> {
        let pool = self.target.nodes_dir.join(&self.target.node).join("pool");
        let reclaim = pool.join(".reclaim");
        let deadline = Instant::now() + Duration::from_secs(300);
        while std::fs::read_dir(&reclaim).is_ok_and(|mut d| d.next().is_some()) {
            ensure!(
                Instant::now() < deadline,
                "{} still holds files after 5 minutes",
                reclaim.display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let pool = pool.display().to_string();
        crate::tools::run("sync", &["-f", &pool]).await?;
        crate::tools::run("fstrim", &[&pool]).await?;
        Ok(())
    }

    /// `qemu-img bench` (raw) on a staged volume's export, run inside the node's mount
    /// namespace (hack/engine-ns.sh exec), where the engine daemon's NBD socket lives.
    pub async fn write(&self, volume_id: &str, bench_args: &[&str]) -> Result<()> {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../hack/engine-ns.sh");
        let uri = self.target.export_uri(volume_id);
        let out = Command::new(script)
            .env("LIVEDISK_NODES_DIR", &self.target.nodes_dir)
            .args([
                "exec",
                &self.target.node,
                "--",
                "qemu-img",
                "bench",
                "-f",
                "raw",
            ])
            .args(bench_args)
            .arg(&uri)
            .stdin(Stdio::null())
            .output()
            .await
            .context("running hack/engine-ns.sh exec")?;
        if !out.status.success() {
            bail!(
                "qemu-img bench {} on {uri} in node {}: {}: {}",
                bench_args.join(" "),
                self.target.node,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(offset: i64, size: i64) -> BlockMetadata {
        BlockMetadata {
            byte_offset: offset,
            size_bytes: size,
        }
    }

    #[test]
    fn a_tally_counts_ascending_extents_across_messages() {
        let mut t = DeltaTally::default();
        t.add(&[block(0, 4096), block(65536, 4096)], 2).unwrap();
        t.add(&[block(131072, 65536)], 2).unwrap();
        t.add(&[], 2).unwrap();
        assert_eq!((t.extents, t.messages), (3, 3));
    }

    #[test]
    fn a_tally_refuses_what_a_backup_tool_cannot_use() {
        let mut t = DeltaTally::default();
        assert!(t.add(&[block(0, 4096), block(4096, 4096)], 1).is_err());
        let mut t = DeltaTally::default();
        t.add(&[block(65536, 4096)], 0).unwrap();
        assert!(t.add(&[block(0, 4096)], 0).is_err(), "not ascending");
        let mut t = DeltaTally::default();
        assert!(
            t.add(&[block(0, 4096), block(2048, 4096)], 0).is_err(),
            "overlap"
        );
        assert!(DeltaTally::default().add(&[block(0, 0)], 0).is_err());
    }

    #[tokio::test]
    async fn aborted_calls_are_made_again_and_other_errors_are_not() {
        let calls = std::cell::Cell::new(0);
        let answer = retry_aborted("call", || {
            calls.set(calls.get() + 1);
            let n = calls.get();
            async move {
                match n {
                    1 | 2 => Err(tonic::Status::aborted("busy")),
                    _ => Ok(tonic::Response::new(n)),
                }
            }
        })
        .await
        .unwrap();
        assert_eq!(answer, 3);
        calls.set(0);
        let failed = retry_aborted("call", || {
            calls.set(calls.get() + 1);
            async { Err::<tonic::Response<()>, _>(tonic::Status::not_found("gone")) }
        })
        .await;
        assert!(failed.is_err());
        assert_eq!(calls.get(), 1);
    }

    #[test]
    fn the_export_lives_in_the_nodes_runtime_dir() {
        let t = CsiTarget {
            controller_socket: "/s/csi/controller.sock".into(),
            node_socket: "/s/csi/node-a.sock".into(),
            node: "node-a".into(),
            nodes_dir: "/s/nodes".into(),
            staging_dir: "/s/kubelet/node-a/staging".into(),
        };
        assert_eq!(
            t.export_uri("vol-1"),
            "nbd+unix:///vol-1?socket=/s/nodes/node-a/run/nbd.sock"
        );
    }
}
