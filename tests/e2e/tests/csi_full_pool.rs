//! A snapshot its node's pool has no room for, through the CSI controller as csi-snapshotter
//! calls it: CreateSnapshot answers RESOURCE_EXHAUSTED with the node's reason, nothing is left
//! behind, and the same request takes the snapshot once room was made.
//!
//! The room is made scarce with the pool's own rule, not by filling a disk: a second, empty
//! volume is created as large as the room allows, so its promise takes nearly all of it, while
//! the first volume holds 256 MiB of data that a snapshot would keep (docs/operations.md, "Full
//! pool"). Its own test binary: while it runs, node-b has almost no room for anything else.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use kube::api::{Api, ListParams};
use livedisk_api::internal::LivediskSnapshot;
use livedisk_csi_proto::csi::v1::*;
use livedisk_e2e::csi::{attach_block, block_volume_request, controller, detach_block, in_node};
use livedisk_e2e::{client, eventually};
use tonic::Code;

const NODE: &str = "node-b";
const MIB: i64 = 1 << 20;

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

fn on_node(name: &str, bytes: i64) -> CreateVolumeRequest {
    block_volume_request(name, NODE, bytes)
}

/// The first run of digits after `marker` in `message`.
fn number_after(message: &str, marker: &str) -> Option<i64> {
    let rest = &message[message.find(marker)? + marker.len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// The pool's room on the node as its rule counts it (free bytes less the volumes' promises),
/// read from the refusal of a volume no pool can hold.
async fn room() -> Result<i64> {
    let refusal = controller()
        .await?
        .create_volume(on_node(&unique("full-probe"), 1 << 60))
        .await
        .err()
        .context("a volume of 1 EiB was not refused")?;
    anyhow::ensure!(refusal.code() == Code::ResourceExhausted, "{refusal:?}");
    let message = refusal.message();
    let free = number_after(message, "the pool has ").context(message.to_string())?;
    let promised = number_after(message, "bytes free, ").unwrap_or(0);
    Ok(free - promised)
}

/// Creates a volume that leaves about `leave` bytes of the node's room (less than twice that),
/// trying again when other work moved the room meanwhile.
async fn take_the_room(leave: i64) -> Result<String> {
    for _ in 0..5 {
        let room = room().await?;
        // A volume needs its size and the qcow2 metadata of a fully written layer: well under
        // 1/2000 of the size plus 4 MiB.
        let size = ((room - leave - 4 * MIB) * 2000 / 2001) / MIB * MIB;
        anyhow::ensure!(size > 0, "node {NODE} has only {room} bytes of room");
        match controller()
            .await?
            .create_volume(on_node(&unique("full-reserve"), size))
            .await
        {
            Ok(created) => {
                return Ok(created.into_inner().volume.context("no volume")?.volume_id);
            }
            Err(status) if status.code() == Code::ResourceExhausted => continue,
            Err(status) => return Err(status.into()),
        }
    }
    bail!("the room of node {NODE} kept changing")
}

async fn delete_volume(volume_id: &str) -> Result<()> {
    controller()
        .await?
        .delete_volume(DeleteVolumeRequest {
            volume_id: volume_id.into(),
            ..Default::default()
        })
        .await?;
    Ok(())
}

#[tokio::test]
async fn a_snapshot_the_pool_has_no_room_for_is_refused_and_taken_once_room_is_made() -> Result<()>
{
    let kube = client().await?;
    let node_snapshots: Api<LivediskSnapshot> = Api::all(kube);
    // The volume to snapshot: 256 MiB of data in its active layer.
    let tag = unique("full");
    let volume_id = controller()
        .await?
        .create_volume(on_node(&tag, 512 * MIB))
        .await?
        .into_inner()
        .volume
        .context("no volume")?
        .volume_id;
    let device = attach_block(NODE, &volume_id, &tag).await?;
    let script = format!(
        "dd if=/dev/urandom of={device} bs=1M count=256 oflag=direct conv=notrunc,fsync status=none"
    );
    in_node(NODE, &["sh", "-c", &script])?;
    detach_block(NODE, &volume_id, &tag).await?;

    // Another volume takes the room but 32 MiB or so: the snapshot needs more than 256 MiB.
    let reserve = take_the_room(32 * MIB).await?;
    let request = CreateSnapshotRequest {
        source_volume_id: volume_id.clone(),
        name: format!("{tag}-snap"),
        ..Default::default()
    };
    let refused = controller()
        .await?
        .create_snapshot(request.clone())
        .await
        .err()
        .context("the snapshot was taken although the pool had no room for it")?;
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("the snapshot needs"),
        "the node's reason: {}",
        refused.message()
    );
    // Nothing is left behind: the controller removes the refused node snapshot.
    eventually(30, "the refused node snapshot to go", || async {
        let left = node_snapshots
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .filter(|s| s.spec.volume_id == volume_id)
            .count();
        Ok((left == 0).then_some(()))
    })
    .await?;

    // Room made: the same request takes the snapshot (the engine frees the deleted volume's
    // files in the background, so it may take a moment).
    delete_volume(&reserve).await?;
    let snapshot = eventually(60, "the snapshot once room was made", || async {
        match controller().await?.create_snapshot(request.clone()).await {
            Ok(created) => Ok(created.into_inner().snapshot),
            Err(status) if status.code() == Code::ResourceExhausted => {
                tokio::time::sleep(Duration::from_secs(1)).await;
                Ok(None)
            }
            Err(status) => Err(status.into()),
        }
    })
    .await?;
    assert!(snapshot.ready_to_use, "{snapshot:?}");
    assert_eq!(snapshot.source_volume_id, volume_id);

    controller()
        .await?
        .delete_snapshot(DeleteSnapshotRequest {
            snapshot_id: snapshot.snapshot_id,
            ..Default::default()
        })
        .await?;
    delete_volume(&volume_id).await
}
