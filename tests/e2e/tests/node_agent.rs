//! The node agent on the local cluster, through the CSI sockets: a clone of a volume is one
//! engine operation whose hidden base snapshot is gone once the clone is flattened, and a
//! deletion the engine refuses keeps the node's finalizer, shows the typed error in status and
//! is retried until it succeeds. Tests play kubelet's part (NodeStage/NodePublish).

use anyhow::{Context, Result};
use kube::api::Api;
use kube::{Client, ResourceExt};
use livedisk_api::conditions::{READY, STALLED, find, is_true};
use livedisk_api::internal::{ErrorCode, LivediskVolume, NODE_FINALIZER, NodePhase};
use livedisk_csi_proto::csi::v1::volume_capability::{
    AccessMode, AccessType, BlockVolume, access_mode::Mode,
};
use livedisk_csi_proto::csi::v1::volume_content_source::{Type as SourceType, VolumeSource};
use livedisk_csi_proto::csi::v1::*;
use livedisk_e2e::csi::{controller, in_node, node};
use livedisk_e2e::{client, eventually};
use serde_json::Value;
use tonic::Code;

const NODE: &str = "node-a";

fn block() -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(AccessType::Block(BlockVolume {})),
    }
}

fn on_node() -> TopologyRequirement {
    let topology = Topology {
        segments: [(
            livedisk_common::TOPOLOGY_NODE_KEY.to_string(),
            NODE.to_string(),
        )]
        .into(),
    };
    TopologyRequirement {
        requisite: vec![topology.clone()],
        preferred: vec![topology],
    }
}

/// A unique CSI name for this run.
fn name(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

async fn create(name: &str, source: Option<&str>) -> Result<String> {
    let request = CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(CapacityRange {
            required_bytes: 64 << 20,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![block()],
        volume_content_source: source.map(|id| VolumeContentSource {
            r#type: Some(SourceType::Volume(VolumeSource {
                volume_id: id.into(),
            })),
        }),
        accessibility_requirements: Some(on_node()),
        ..Default::default()
    };
    let volume = controller()
        .await?
        .create_volume(request)
        .await?
        .into_inner()
        .volume
        .context("CreateVolume returned no volume")?;
    Ok(volume.volume_id)
}

async fn delete(volume_id: &str) -> Result<(), tonic::Status> {
    let mut c = controller()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    c.delete_volume(DeleteVolumeRequest {
        volume_id: volume_id.into(),
        ..Default::default()
    })
    .await
    .map(|_| ())
}

fn state_dir() -> Result<String> {
    Ok(std::env::var("LIVEDISK_STATE_DIR")?)
}

fn staging(tag: &str) -> Result<String> {
    Ok(format!("{}/kubelet/{NODE}/staging/{tag}", state_dir()?))
}

fn target(tag: &str) -> Result<String> {
    Ok(format!("{}/kubelet/{NODE}/publish/{tag}/dev", state_dir()?))
}

async fn stage(volume_id: &str, tag: &str) -> Result<()> {
    node(NODE)
        .await?
        .node_stage_volume(NodeStageVolumeRequest {
            volume_id: volume_id.into(),
            staging_target_path: staging(tag)?,
            volume_capability: Some(block()),
            ..Default::default()
        })
        .await?;
    Ok(())
}

async fn unstage(volume_id: &str, tag: &str) -> Result<()> {
    node(NODE)
        .await?
        .node_unstage_volume(NodeUnstageVolumeRequest {
            volume_id: volume_id.into(),
            staging_target_path: staging(tag)?,
        })
        .await?;
    Ok(())
}

/// Stages and publishes as kubelet would; returns the device path.
async fn attach(volume_id: &str, tag: &str) -> Result<String> {
    stage(volume_id, tag).await?;
    node(NODE)
        .await?
        .node_publish_volume(NodePublishVolumeRequest {
            volume_id: volume_id.into(),
            staging_target_path: staging(tag)?,
            target_path: target(tag)?,
            volume_capability: Some(block()),
            ..Default::default()
        })
        .await?;
    target(tag)
}

async fn detach(volume_id: &str, tag: &str) -> Result<()> {
    node(NODE)
        .await?
        .node_unpublish_volume(NodeUnpublishVolumeRequest {
            volume_id: volume_id.into(),
            target_path: target(tag)?,
        })
        .await?;
    unstage(volume_id, tag).await
}

fn write_block(device: &str, text: &str) -> Result<()> {
    let script = format!(
        "printf '%-4096s' '{text}' | dd of={device} bs=4096 count=1 oflag=direct conv=notrunc status=none"
    );
    in_node(NODE, &["sh", "-c", &script])?;
    Ok(())
}

fn read_block(device: &str) -> Result<String> {
    let output = in_node(
        NODE,
        &[
            "dd",
            &format!("if={device}"),
            "bs=4096",
            "count=1",
            "iflag=direct",
            "status=none",
        ],
    )?;
    Ok(String::from_utf8_lossy(&output.stdout)
        .trim_end()
        .to_string())
}

/// The engine's record of a volume on the node, as it is on disk (`None`: no record).
fn record(volume_id: &str) -> Result<Option<Value>> {
    let path = format!("{}/nodes/{NODE}/pool/{volume_id}/record.json", state_dir()?);
    match std::fs::read(&path) {
        Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes)?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(anyhow::Error::new(e).context(path)),
    }
}

async fn gone(volumes: &Api<LivediskVolume>, ids: &[&str]) -> Result<()> {
    for id in ids {
        eventually(90, &format!("LivediskVolume {id} to be gone"), || async {
            Ok(volumes.get_opt(id).await?.is_none().then_some(()))
        })
        .await?;
        anyhow::ensure!(record(id)?.is_none(), "{id} left a record in the pool");
    }
    Ok(())
}

#[tokio::test]
async fn a_clone_is_one_engine_operation_and_its_hidden_base_goes_once_flattened() -> Result<()> {
    let kube: Client = client().await?;
    let volumes: Api<LivediskVolume> = Api::all(kube.clone());
    let source = create(&name("agent-source"), None).await?;
    let device = attach(&source, "agent-source").await?;
    write_block(&device, "before-clone")?;

    let clone = create(&name("agent-clone"), Some(&source)).await?;
    write_block(&device, "after-clone")?;
    let object = volumes.get(&clone).await?;
    let status = object.status.clone().context("the clone has no status")?;
    assert_eq!(status.phase, NodePhase::Ready);
    assert!(is_true(&status.conditions, READY), "{status:?}");
    assert!(
        object.finalizers().iter().any(|f| f == NODE_FINALIZER),
        "the node's finalizer is on the clone"
    );

    // The engine made the clone from a hidden snapshot of the source and deletes that snapshot
    // itself once the clone stands alone; the agent reports the flatten until then.
    eventually(
        90,
        "the clone to be flattened and its base deleted",
        || async {
            let clone_rec = record(&clone)?.context("no record of the clone")?;
            let source_rec = record(&source)?.context("no record of the source")?;
            let flat = clone_rec["clone_of"].is_null();
            let base_recorded = !clone_rec["cloned_from"]["hidden_base"].is_null();
            let source_snapshots = source_rec["snapshots"].as_array().map_or(0, Vec::len);
            Ok((flat && !base_recorded && source_snapshots == 0).then_some(()))
        },
    )
    .await?;
    assert_eq!(
        record(&clone)?.context("clone record")?["cloned_from"]["volume"],
        Value::String(source.clone())
    );
    eventually(30, "the clone's status to show no flatten", || async {
        let status = volumes.get(&clone).await?.status.unwrap_or_default();
        Ok(status.progress.is_none().then_some(()))
    })
    .await?;

    let cloned = attach(&clone, "agent-clone").await?;
    assert_eq!(read_block(&cloned)?, "before-clone");
    assert_eq!(read_block(&device)?, "after-clone");
    detach(&clone, "agent-clone").await?;
    detach(&source, "agent-source").await?;
    delete(&clone).await?;
    delete(&source).await?;
    gone(&volumes, &[&clone, &source]).await
}

#[tokio::test]
async fn a_deletion_the_engine_refuses_keeps_the_finalizer_reports_and_is_retried() -> Result<()> {
    let kube: Client = client().await?;
    let volumes: Api<LivediskVolume> = Api::all(kube.clone());
    let id = create(&name("agent-held"), None).await?;
    // Attached: the engine refuses to delete a volume a consumer uses.
    stage(&id, "agent-held").await?;
    let refused = delete(&id)
        .await
        .expect_err("deleting an attached volume must fail");
    assert_eq!(
        refused.code(),
        Code::FailedPrecondition,
        "{}",
        refused.message()
    );

    // Still there, held by the finalizer, the error typed in status; retried and still so.
    let holds = |object: &LivediskVolume| -> Result<()> {
        anyhow::ensure!(
            object.metadata.deletion_timestamp.is_some(),
            "not being deleted"
        );
        anyhow::ensure!(
            object.finalizers().iter().any(|f| f == NODE_FINALIZER),
            "the node's finalizer was dropped while the storage exists"
        );
        let status = object.status.clone().context("no status")?;
        anyhow::ensure!(
            status.phase == NodePhase::Deleting,
            "phase {:?}",
            status.phase
        );
        let error = status.error.context("no error in status")?;
        anyhow::ensure!(error.code == ErrorCode::FailedPrecondition, "{error:?}");
        anyhow::ensure!(error.message.contains("attached"), "{}", error.message);
        let stalled = find(&status.conditions, STALLED).context("no Stalled condition")?;
        anyhow::ensure!(
            stalled.status == "True" && stalled.reason == "FailedPrecondition",
            "{stalled:?}"
        );
        Ok(())
    };
    holds(&volumes.get(&id).await?)?;
    tokio::time::sleep(std::time::Duration::from_secs(12)).await;
    holds(&volumes.get(&id).await?)?;
    anyhow::ensure!(record(&id)?.is_some(), "the storage went although refused");

    // Once the consumer is gone, a retried deletion succeeds and nothing is left.
    unstage(&id, "agent-held").await?;
    eventually(60, "DeleteVolume to succeed", || async {
        Ok(delete(&id).await.ok())
    })
    .await?;
    gone(&volumes, &[&id]).await
}
