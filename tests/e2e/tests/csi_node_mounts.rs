//! NodeStage and NodePublish check what is mounted at their path, through the node plugin's real
//! socket and in the node's own mount namespace (where kubelet's paths live): a repeat succeeds,
//! anything else mounted there is refused with ALREADY_EXISTS and left as it is.

use anyhow::{Context, Result, ensure};
use livedisk_csi_proto::csi::v1::volume_capability::{
    AccessMode, AccessType, MountVolume, access_mode::Mode,
};
use livedisk_csi_proto::csi::v1::*;
use livedisk_e2e::csi::{controller, in_node, node};
use tonic::Code;

const NODE: &str = "node-a";

fn mount_capability(mount_flags: &[&str]) -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: "ext4".into(),
            mount_flags: mount_flags.iter().map(|f| f.to_string()).collect(),
            ..Default::default()
        })),
    }
}

/// The mounts at `path` in the node's namespace, topmost last: `FSTYPE SOURCE OPTIONS` each.
fn mounts_at(path: &str) -> Result<Vec<String>> {
    let output = in_node(NODE, &["cat", "/proc/self/mountinfo"])?;
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            if fields.get(4) != Some(&path) {
                return None;
            }
            let after = fields.iter().position(|f| *f == "-")?;
            Some(format!(
                "{} {} {}",
                fields.get(after + 1)?,
                fields.get(after + 2)?,
                fields.get(5)?
            ))
        })
        .collect())
}

fn expect_code<T: std::fmt::Debug>(
    case: &str,
    result: Result<tonic::Response<T>, tonic::Status>,
    code: Code,
) -> Result<String> {
    match result {
        Ok(response) => anyhow::bail!("{case}: expected {code:?}, got success {response:?}"),
        Err(status) => {
            ensure!(
                status.code() == code,
                "{case}: expected {code:?}, got {:?}: {}",
                status.code(),
                status.message()
            );
            Ok(status.message().to_string())
        }
    }
}

struct Paths {
    base: String,
    staging: String,
    rw: String,
    ro: String,
    foreign: String,
}

impl Paths {
    fn new(tag: &str) -> Result<Self> {
        let state = std::env::var("LIVEDISK_STATE_DIR").context("LIVEDISK_STATE_DIR")?;
        let base = format!("{state}/kubelet/{NODE}/mount-checks-{tag}");
        Ok(Self {
            staging: format!("{base}/staging"),
            rw: format!("{base}/publish-rw"),
            ro: format!("{base}/publish-ro"),
            foreign: format!("{base}/publish-foreign"),
            base,
        })
    }
}

fn mount_tmpfs(path: &str) -> Result<()> {
    in_node(NODE, &["mkdir", "-p", path])?;
    in_node(
        NODE,
        &[
            "mount",
            "-t",
            "tmpfs",
            "-o",
            "size=1m",
            "livedisk-foreign",
            path,
        ],
    )?;
    Ok(())
}

fn stage_request(volume_id: &str, staging: &str, flags: &[&str]) -> NodeStageVolumeRequest {
    NodeStageVolumeRequest {
        volume_id: volume_id.into(),
        staging_target_path: staging.into(),
        volume_capability: Some(mount_capability(flags)),
        ..Default::default()
    }
}

fn publish_request(
    volume_id: &str,
    paths: &Paths,
    target: &str,
    readonly: bool,
) -> NodePublishVolumeRequest {
    NodePublishVolumeRequest {
        volume_id: volume_id.into(),
        staging_target_path: paths.staging.clone(),
        target_path: target.into(),
        volume_capability: Some(mount_capability(&[])),
        readonly,
        ..Default::default()
    }
}

async fn checks(volume_id: &str, paths: &Paths) -> Result<()> {
    let mut n = node(NODE).await?;

    // Something else at the staging path: refused, left mounted, the volume not attached.
    mount_tmpfs(&paths.staging)?;
    let message = expect_code(
        "NodeStage onto a tmpfs",
        n.node_stage_volume(stage_request(volume_id, &paths.staging, &[]))
            .await,
        Code::AlreadyExists,
    )?;
    ensure!(
        message.contains("tmpfs"),
        "the error names the tmpfs: {message}"
    );
    let at_staging = mounts_at(&paths.staging)?;
    ensure!(
        at_staging.len() == 1 && at_staging[0].starts_with("tmpfs livedisk-foreign rw"),
        "the tmpfs is left alone and nothing is stacked on it: {at_staging:?}"
    );
    in_node(NODE, &["umount", &paths.staging])?;

    // Stage, and stage again: one ext4 mount of the volume's device.
    n.node_stage_volume(stage_request(volume_id, &paths.staging, &[]))
        .await
        .context("NodeStage")?;
    n.node_stage_volume(stage_request(volume_id, &paths.staging, &[]))
        .await
        .context("NodeStage repeated")?;
    let at_staging = mounts_at(&paths.staging)?;
    ensure!(
        at_staging.len() == 1 && at_staging[0].starts_with("ext4 /dev/loop"),
        "one ext4 mount of a loop device at the staging path: {at_staging:?}"
    );
    expect_code(
        "NodeStage read-only onto the read-write stage",
        n.node_stage_volume(stage_request(volume_id, &paths.staging, &["ro"]))
            .await,
        Code::AlreadyExists,
    )?;

    // Publish read-write, and again; read-only onto that target is refused.
    n.node_publish_volume(publish_request(volume_id, paths, &paths.rw, false))
        .await
        .context("NodePublish rw")?;
    n.node_publish_volume(publish_request(volume_id, paths, &paths.rw, false))
        .await
        .context("NodePublish rw repeated")?;
    let message = expect_code(
        "NodePublish readonly onto a read-write bind",
        n.node_publish_volume(publish_request(volume_id, paths, &paths.rw, true))
            .await,
        Code::AlreadyExists,
    )?;
    ensure!(message.contains("read-only"), "{message}");
    let at_rw = mounts_at(&paths.rw)?;
    ensure!(
        at_rw.len() == 1 && at_rw[0].starts_with("ext4 /dev/loop") && at_rw[0].contains(" rw"),
        "the read-write bind is left as it was: {at_rw:?}"
    );

    // Publish read-only: a read-only bind (made by mount(2) and a remount), repeatable.
    n.node_publish_volume(publish_request(volume_id, paths, &paths.ro, true))
        .await
        .context("NodePublish ro")?;
    n.node_publish_volume(publish_request(volume_id, paths, &paths.ro, true))
        .await
        .context("NodePublish ro repeated")?;
    let at_ro = mounts_at(&paths.ro)?;
    ensure!(
        at_ro.len() == 1 && at_ro[0].contains(" ro"),
        "one read-only bind: {at_ro:?}"
    );
    let write = in_node(NODE, &["touch", &format!("{}/file", paths.ro)]);
    ensure!(
        write.is_err(),
        "a write through the read-only bind must fail"
    );
    in_node(NODE, &["touch", &format!("{}/file", paths.rw)])
        .context("a write through the read-write bind")?;

    // Something else at a publish target: refused and left alone.
    mount_tmpfs(&paths.foreign)?;
    expect_code(
        "NodePublish onto a tmpfs",
        n.node_publish_volume(publish_request(volume_id, paths, &paths.foreign, false))
            .await,
        Code::AlreadyExists,
    )?;
    let at_foreign = mounts_at(&paths.foreign)?;
    ensure!(
        at_foreign.len() == 1 && at_foreign[0].starts_with("tmpfs livedisk-foreign"),
        "the tmpfs target is left alone: {at_foreign:?}"
    );
    Ok(())
}

/// Undoes what the test made, whatever step it stopped at.
async fn cleanup(volume_id: &str, paths: &Paths) -> Result<()> {
    let mut n = node(NODE).await?;
    for target in [&paths.rw, &paths.ro] {
        n.node_unpublish_volume(NodeUnpublishVolumeRequest {
            volume_id: volume_id.into(),
            target_path: target.clone(),
        })
        .await
        .with_context(|| format!("unpublishing {target}"))?;
    }
    n.node_unstage_volume(NodeUnstageVolumeRequest {
        volume_id: volume_id.into(),
        staging_target_path: paths.staging.clone(),
    })
    .await
    .context("unstaging")?;
    for path in [&paths.foreign, &paths.staging] {
        while mounts_at(path)?
            .iter()
            .any(|m| m.starts_with("tmpfs livedisk-foreign"))
        {
            in_node(NODE, &["umount", path])?;
        }
    }
    in_node(NODE, &["rm", "-rf", &paths.base])?;
    controller()
        .await?
        .delete_volume(DeleteVolumeRequest {
            volume_id: volume_id.into(),
            ..Default::default()
        })
        .await
        .context("deleting the volume")?;
    Ok(())
}

#[tokio::test]
async fn stage_and_publish_refuse_a_path_where_something_else_is_mounted() -> Result<()> {
    let tag = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    let paths = Paths::new(&tag)?;
    let created = controller()
        .await?
        .create_volume(CreateVolumeRequest {
            name: format!("mount-checks-{tag}"),
            capacity_range: Some(CapacityRange {
                required_bytes: 64 << 20,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![mount_capability(&[])],
            accessibility_requirements: Some(TopologyRequirement {
                requisite: vec![],
                preferred: vec![Topology {
                    segments: [("topology.livedisk.io/node".to_string(), NODE.to_string())].into(),
                }],
            }),
            ..Default::default()
        })
        .await
        .context("CreateVolume")?
        .into_inner();
    let volume = created.volume.context("CreateVolume returned no volume")?;
    ensure!(
        volume.accessible_topology.iter().any(|t| t
            .segments
            .get("topology.livedisk.io/node")
            .is_some_and(|n| n == NODE)),
        "the volume is on {NODE}: {:?}",
        volume.accessible_topology
    );
    let result = checks(&volume.volume_id, &paths).await;
    let cleaned = cleanup(&volume.volume_id, &paths).await;
    result?;
    cleaned
}
