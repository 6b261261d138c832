//! Cross-node restore on the two-node local cluster (processes layout: each node's engine and
//! node plugin in their own network namespace). The test plays the external-provisioner and
//! kubelet: it calls the driver's CSI controller (CreateVolume from a snapshot, with the
//! consumer's node as the only allowed topology, as `--strict-topology` sends it) and node
//! services (NodeStage/NodePublish) itself.
//!
//! A snapshot on node-a restored for a consumer on node-b: the volume is made on node-b at once,
//! backed over TLS NBD by node-a's export of the snapshot, and copied in the background (slowed
//! by the class's `mergeBandwidthLimit` so that the faults land mid-copy). The consumer reads the
//! snapshot's point in time (the checksummed writer's log of the phase before the snapshot, not
//! the source's present) while the copy runs; during it the link between the nodes is cut and
//! node-a's node plugin, node-a's engine daemon and node-b's engine daemon are each killed with
//! SIGKILL (the test re-stages the volumes whose devices died, as kubelet would after the pod's
//! restart); afterwards the volume stands alone (node-a's
//! link down, it still reads right), the served source is withdrawn and the snapshot can be
//! deleted. Cloning a volume (not a snapshot) across nodes is refused with a clear error.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use kube::api::Api;
use livedisk_api::internal::{LivediskAttachment, LivediskVolume, restore_source_name};
use livedisk_csi_proto::csi::v1::*;
use livedisk_e2e::csi::{
    attach_block, block_volume_request, controller, create_block_volume, delete_volume,
    detach_block, kill_engine_daemon, kill_node_plugin, set_link,
};
use livedisk_e2e::disks::{ScratchDir, host_device};
use livedisk_e2e::operator::operator_with_fronts;
use livedisk_e2e::phases::{verify, write_phase};
use livedisk_e2e::{client, eventually};

const OWNER: &str = "node-a";
const CONSUMER: &str = "node-b";
/// 40 MiB of checksummed 4 KiB blocks: at 2 MiB/s the copy takes about twenty seconds, long
/// enough for every fault below to land in it.
const BLOCKS: u64 = 10240;
const COPY_SPEED: &str = "2Mi";

/// NodeUnstage + NodeStage again until it works (right after an engine daemon restart the node
/// answers UNAVAILABLE for a moment); the new device.
async fn restage(node: &str, volume: &str, tag: &str) -> Result<String> {
    eventually(120, &format!("{volume} re-staged on {node}"), || async {
        let _ = detach_block(node, volume, tag).await;
        match attach_block(node, volume, tag).await {
            Ok(path) => Ok(Some(host_device(node, &path)?)),
            Err(e) => {
                println!("re-staging {volume} on {node}: {e:#}");
                Ok(None)
            }
        }
    })
    .await
}

async fn snapshot_ready(name: &str, volume: &str) -> Result<String> {
    eventually(60, &format!("snapshot {name} ready"), || async {
        let snapshot = livedisk_e2e::csi::create_snapshot(name, volume).await?;
        Ok(snapshot.ready_to_use.then_some(snapshot.snapshot_id))
    })
    .await
}

fn from_snapshot(mut request: CreateVolumeRequest, snapshot: &str) -> CreateVolumeRequest {
    request.volume_content_source = Some(VolumeContentSource {
        r#type: Some(volume_content_source::Type::Snapshot(
            volume_content_source::SnapshotSource {
                snapshot_id: snapshot.into(),
            },
        )),
    });
    request
}

#[tokio::test]
async fn a_snapshot_restored_on_the_other_node_reads_at_once_survives_faults_and_stands_alone()
-> Result<()> {
    let client = client().await?;
    let _operator = operator_with_fronts(&client, &[OWNER, CONSUMER]).await?;
    let dir = ScratchDir::new("cross-node-restore")?;
    let (before, after) = (dir.0.join("before.log"), dir.0.join("after.log"));

    // The source on node-a: one phase, the snapshot, then a second phase over the same blocks.
    let source = create_block_volume("xnr-source", OWNER).await?;
    let published = attach_block(OWNER, &source, "xnr-source").await?;
    let source_device = host_device(OWNER, &published)?;
    write_phase(&source_device, 1, BLOCKS, &before)?;
    let snapshot = snapshot_ready("xnr-snap", &source).await?;
    write_phase(&source_device, 2, BLOCKS, &after)?;

    // The restore, for a consumer that can only run on node-b.
    let mut request = block_volume_request("xnr-restored", CONSUMER, 64 << 20);
    request
        .parameters
        .insert("mergeBandwidthLimit".into(), COPY_SPEED.into());
    let created = Instant::now();
    let restored = controller()
        .await?
        .create_volume(from_snapshot(request, &snapshot))
        .await?
        .into_inner()
        .volume
        .context("CreateVolume answered no volume")?;
    let bound_after = created.elapsed();
    let segments = restored
        .accessible_topology
        .first()
        .map(|t| t.segments.clone())
        .unwrap_or_default();
    ensure!(
        segments
            .get(livedisk_common::TOPOLOGY_NODE_KEY)
            .map(String::as_str)
            == Some(CONSUMER),
        "the restore is accessible from {segments:?}, not from {CONSUMER}"
    );
    let restored = restored.volume_id;
    let volumes: Api<LivediskVolume> = Api::all(client.clone());
    let inventory = volumes.get(&restored).await?;
    ensure!(
        inventory.spec.node_name == CONSUMER,
        "the restore was made on {}",
        inventory.spec.node_name
    );

    // Read while the copy runs: the snapshot's point in time, not the source's present.
    let attachments: Api<LivediskAttachment> = Api::all(client.clone());
    let source_object = restore_source_name(&restored, CONSUMER);
    let target = attach_block(CONSUMER, &restored, "xnr-restored").await?;
    let device = host_device(CONSUMER, &target)?;
    verify(&device, 1, &before)?;
    ensure!(
        attachments.get_opt(&source_object).await?.is_some(),
        "the copy had already finished when the first read did (LivediskAttachment \
         {source_object} is gone): the faults below would not land mid-copy"
    );
    let copying = volumes
        .get(&restored)
        .await?
        .status
        .and_then(|s| s.progress)
        .context("the restore reports no copy progress while it copies")?;
    println!("copy progress after the first read: {copying:?}");

    // Faults mid-copy, each checked to land before the copy ended: the link cut for three
    // seconds; node-a's plugin (and its front) killed; node-a's engine daemon killed (the
    // snapshot's export comes back from its record); node-b's engine daemon killed (the restore
    // comes back from its record, its source reconnected, the copy resumed).
    let copy_runs = |fault: &'static str| {
        let (attachments, source_object) = (attachments.clone(), source_object.clone());
        async move {
            ensure!(
                attachments.get_opt(&source_object).await?.is_some(),
                "the copy ended before the fault \"{fault}\"; slow it down (COPY_SPEED)"
            );
            Ok::<(), anyhow::Error>(())
        }
    };
    copy_runs("link cut").await?;
    set_link(OWNER, false)?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    set_link(OWNER, true)?;
    copy_runs("owner plugin killed").await?;
    kill_node_plugin(OWNER).await?;
    verify(&device, 1, &before)?;
    copy_runs("owner engine daemon killed").await?;
    kill_engine_daemon(OWNER).await?;
    let source_device = restage(OWNER, &source, "xnr-source").await?;
    verify(&device, 1, &before)?;
    copy_runs("restoring engine daemon killed").await?;
    kill_engine_daemon(CONSUMER).await?;
    let device = restage(CONSUMER, &restored, "xnr-restored").await?;
    verify(&device, 1, &before)?;

    // The copy ends: the served source is withdrawn and the volume reports no copy.
    let copied_in = eventually(
        180,
        "the restore copied and its source withdrawn",
        || async {
            let gone = attachments.get_opt(&source_object).await?.is_none();
            let flat = volumes
                .get(&restored)
                .await?
                .status
                .is_some_and(|s| s.progress.is_none());
            Ok((gone && flat).then(|| created.elapsed()))
        },
    )
    .await?;

    // It stands alone: with node-a unreachable, everything still reads back on node-b.
    set_link(OWNER, false)?;
    let alone = verify(&device, 1, &before);
    set_link(OWNER, true)?;
    alone.context("reading the restore with node-a unreachable")?;

    // The snapshot is no longer needed by anyone: its deletion goes through.
    controller()
        .await?
        .delete_snapshot(DeleteSnapshotRequest {
            snapshot_id: snapshot.clone(),
            ..Default::default()
        })
        .await?;
    verify(&source_device, 2, &after)?;

    // A volume (not a snapshot) cannot be cloned across nodes: a clear error.
    let mut clone = block_volume_request("xnr-clone", CONSUMER, 64 << 20);
    clone.volume_content_source = Some(VolumeContentSource {
        r#type: Some(volume_content_source::Type::Volume(
            volume_content_source::VolumeSource {
                volume_id: source.clone(),
            },
        )),
    });
    let refused = controller()
        .await?
        .create_volume(clone)
        .await
        .err()
        .context("a clone of node-a's volume for node-b was accepted")?;
    ensure!(
        refused.code() == tonic::Code::ResourceExhausted
            && refused
                .message()
                .contains("cloning a volume across nodes is not supported"),
        "{refused:?}"
    );

    detach_block(CONSUMER, &restored, "xnr-restored").await?;
    detach_block(OWNER, &source, "xnr-source").await?;
    delete_volume(&restored).await?;
    delete_volume(&source).await?;
    println!(
        "cross-node restore: bound in {bound_after:?}, {BLOCKS} blocks copied at {COPY_SPEED}/s \
         through a 3 s link cut, a killed owner plugin and both nodes' engine daemons killed in \
         {copied_in:?}, read back before, during and after the copy"
    );
    Ok(())
}
