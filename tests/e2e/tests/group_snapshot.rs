//! Group snapshots: the CSI GroupController of the driver, and VolumeGroupSnapshots through the
//! real snapshot-controller and csi-snapshotter (with the CSIVolumeGroupSnapshot gate) of the
//! local cluster (`hack/driver.sh start` runs the driver's two nodes in processes).
//!
//! * One instant: a writer alternates acknowledged writes between two volumes of one node while
//!   their group snapshot is taken; restored, the two members hold the writer's log up to one
//!   common point (the newest sequence numbers of the two differ by exactly one). The control:
//!   two CreateSnapshot calls of the same volumes under the same writer differ by more.
//! * Members are ordinary snapshots: listed with their group ID, restorable, deletable; the
//!   call is idempotent by name, a name reused for other volumes is refused, volumes of two
//!   nodes are refused, and csi-sanity's error-code specs run in `hack/csi-sanity.sh`.
//! * A VolumeGroupSnapshot of claims selected by label becomes ready and each member restores
//!   into a new claim with its volume's data.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch};
use kube::api::{ListParams, PatchParams};
use kube::{Client, ResourceExt};
use livedisk_api::internal::{GROUP_SNAPSHOT_LABEL, LivediskSnapshot};
use livedisk_csi_proto::csi::v1::group_controller_client::GroupControllerClient;
use livedisk_csi_proto::csi::v1::*;
use livedisk_e2e::csi::{
    attach_block, attach_block_as_kubelet, channel, controller, create_block_volume,
    create_snapshot_retrying, delete_volume, detach_block, restore_block_volume, retry_aborted,
    socket_dir,
};
use livedisk_e2e::disks::{ScratchDir, claim_bound_on, host_device, must, pvc};
use livedisk_e2e::phases::{verify, write_phase};
use livedisk_e2e::{TestNamespace, bound_volume, client, eventually};
use serde_json::json;
use tonic::transport::Channel;

const NODE: &str = "node-a";
const OTHER: &str = "node-b";
const BLOCK: usize = 4096;
/// Blocks each volume's writer cycles over.
const BLOCKS: u64 = 256;
const MAGIC: &[u8; 8] = b"LDGROUP1";

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn groups() -> Result<GroupControllerClient<Channel>> {
    Ok(GroupControllerClient::new(
        channel(&socket_dir()?.join("controller.sock")).await?,
    ))
}

fn group_request(name: &str, volumes: &[&str]) -> CreateVolumeGroupSnapshotRequest {
    CreateVolumeGroupSnapshotRequest {
        name: name.into(),
        source_volume_ids: volumes.iter().map(|v| v.to_string()).collect(),
        ..Default::default()
    }
}

/// Writes `seq` into `block` of `device`, acknowledged only once on the device (O_DSYNC).
fn write_seq(device: &mut std::fs::File, block: u64, seq: u64) -> std::io::Result<()> {
    let mut buffer = vec![0u8; BLOCK];
    buffer[..8].copy_from_slice(&seq.to_le_bytes());
    buffer[8..16].copy_from_slice(MAGIC);
    device.seek(SeekFrom::Start(block * BLOCK as u64))?;
    device.write_all(&buffer)
}

/// The newest sequence number written in the first `BLOCKS` blocks of `device` (None: none).
fn newest_seq(device: &str) -> Result<Option<u64>> {
    let mut file = std::fs::File::open(device).with_context(|| device.to_string())?;
    let mut buffer = vec![0u8; BLOCK * BLOCKS as usize];
    file.read_exact(&mut buffer)?;
    Ok(buffer
        .chunks(BLOCK)
        .filter(|b| &b[8..16] == MAGIC)
        .map(|b| u64::from_le_bytes(b[..8].try_into().unwrap_or_default()))
        .max())
}

/// A volume restored from `snapshot` on `node`, staged there: its host device.
/// A volume restored from `snapshot` and staged, as the provisioner and kubelet do it (both
/// retry ABORTED: the node may still be busy with the snapshot's volume).
async fn restored(name: &str, snapshot: &str, node: &str) -> Result<(String, String)> {
    let volume = retry_aborted(&format!("restore {name}"), || {
        restore_block_volume(name, snapshot, node)
    })
    .await?;
    let device = host_device(node, &attach_block_as_kubelet(node, &volume, name).await?)?;
    Ok((volume, device))
}

#[tokio::test]
async fn a_group_snapshot_of_two_volumes_is_one_instant_and_its_members_are_ordinary_snapshots()
-> Result<()> {
    let _serial = SERIAL.lock().await;
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let a = create_block_volume(&format!("group-a-{suffix}"), NODE).await?;
    let b = create_block_volume(&format!("group-b-{suffix}"), NODE).await?;
    let device_a = host_device(NODE, &attach_block(NODE, &a, "group-a").await?)?;
    let device_b = host_device(NODE, &attach_block(NODE, &b, "group-b").await?)?;

    // The writer: seq 2k to volume a, then 2k+1 to volume b, each acknowledged before the next.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let (path_a, path_b) = (device_a.clone(), device_b.clone());
        std::thread::spawn(move || -> Result<u64> {
            let open = |path: &str| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_DSYNC)
                    .open(path)
                    .with_context(|| path.to_string())
            };
            let (mut a, mut b) = (open(&path_a)?, open(&path_b)?);
            let mut k = 0u64;
            while !stop.load(Ordering::Relaxed) {
                write_seq(&mut a, k % BLOCKS, 2 * k)?;
                write_seq(&mut b, k % BLOCKS, 2 * k + 1)?;
                k += 1;
            }
            Ok(k)
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let name = format!("group-{suffix}");
    let created = groups()
        .await?
        .create_volume_group_snapshot(group_request(&name, &[&a, &b]))
        .await?
        .into_inner()
        .group_snapshot
        .context("no group snapshot in the answer")?;
    // The control: the same two volumes snapshotted one after the other, as two CreateSnapshot
    // calls, while the writer goes on. They are two instants, which the same measure shows.
    let mut separate = Vec::new();
    for (tag, volume) in [("a", &a), ("b", &b)] {
        let snapshot =
            create_snapshot_retrying(&format!("separate-{tag}-{suffix}"), volume).await?;
        separate.push(snapshot.snapshot_id);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let pairs = writer
        .join()
        .map_err(|_| anyhow::anyhow!("the writer panicked"))??;
    eprintln!("writer: {pairs} pairs of acknowledged writes");
    ensure!(created.ready_to_use, "the group is not ready: {created:?}");
    ensure!(created.snapshots.len() == 2, "{created:?}");
    ensure!(created.creation_time.is_some(), "no creation time");
    let member_of: BTreeMap<String, String> = created
        .snapshots
        .iter()
        .map(|s| (s.source_volume_id.clone(), s.snapshot_id.clone()))
        .collect();
    for s in &created.snapshots {
        ensure!(
            s.group_snapshot_id == created.group_snapshot_id,
            "member {} names group {:?}",
            s.snapshot_id,
            s.group_snapshot_id
        );
        ensure!(
            s.creation_time == created.creation_time,
            "members' instants differ"
        );
    }

    // One instant: what each member holds is the writer's log up to one common point.
    let (restored_a, read_a) =
        restored(&format!("group-ra-{suffix}"), &member_of[&a], NODE).await?;
    let (restored_b, read_b) =
        restored(&format!("group-rb-{suffix}"), &member_of[&b], NODE).await?;
    let newest_a = newest_seq(&read_a)?.context("member a holds no write")?;
    let newest_b = newest_seq(&read_b)?.context("member b holds no write")?;
    eprintln!("newest write in member a: {newest_a}, in member b: {newest_b}");
    ensure!(
        newest_a.abs_diff(newest_b) == 1,
        "the members are not one instant: a holds writes up to {newest_a}, b up to {newest_b} \
         (the writer alternates a and b, so one instant differs by exactly one)"
    );

    let (control_a, read_ca) = restored(&format!("group-ca-{suffix}"), &separate[0], NODE).await?;
    let (control_b, read_cb) = restored(&format!("group-cb-{suffix}"), &separate[1], NODE).await?;
    let (control_newest_a, control_newest_b) = (
        newest_seq(&read_ca)?.context("no write in a")?,
        newest_seq(&read_cb)?.context("no write in b")?,
    );
    eprintln!(
        "control, two CreateSnapshot calls: newest write in a {control_newest_a}, in b {control_newest_b}"
    );
    ensure!(
        control_newest_a.abs_diff(control_newest_b) > 1,
        "two separate snapshots looked like one instant: the measure cannot tell them apart"
    );

    // Idempotent by name; the name for other volumes is refused.
    let mut group_client = groups().await?;
    let again = group_client
        .create_volume_group_snapshot(group_request(&name, &[&b, &a]))
        .await?
        .into_inner()
        .group_snapshot
        .context("no group snapshot")?;
    ensure!(again.group_snapshot_id == created.group_snapshot_id);
    let other = group_client
        .create_volume_group_snapshot(group_request(&name, &[&a]))
        .await
        .expect_err("the name reused for other volumes");
    ensure!(other.code() == tonic::Code::AlreadyExists, "{other:?}");
    // Get answers the group; a wrong member list is refused.
    let got = group_client
        .get_volume_group_snapshot(GetVolumeGroupSnapshotRequest {
            group_snapshot_id: created.group_snapshot_id.clone(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .group_snapshot
        .context("no group")?;
    ensure!(got.snapshots.len() == 2 && got.ready_to_use);
    let mismatch = group_client
        .get_volume_group_snapshot(GetVolumeGroupSnapshotRequest {
            group_snapshot_id: created.group_snapshot_id.clone(),
            snapshot_ids: vec![member_of[&a].clone()],
            ..Default::default()
        })
        .await
        .expect_err("a snapshot list that is not the group's");
    ensure!(
        mismatch.code() == tonic::Code::InvalidArgument,
        "{mismatch:?}"
    );

    // Volumes of two nodes have no common instant.
    let c = create_block_volume(&format!("group-c-{suffix}"), OTHER).await?;
    let refused = group_client
        .create_volume_group_snapshot(group_request(&format!("cross-{suffix}"), &[&a, &c]))
        .await
        .expect_err("a group across nodes");
    ensure!(
        refused.code() == tonic::Code::FailedPrecondition
            && refused.message().contains("different nodes"),
        "{refused:?}"
    );

    // Members are ordinary snapshots: listed with their group, and one deleted on its own.
    let listed = controller()
        .await?
        .list_snapshots(ListSnapshotsRequest {
            snapshot_id: member_of[&a].clone(),
            ..Default::default()
        })
        .await?
        .into_inner();
    ensure!(
        listed.entries.len() == 1
            && listed.entries[0]
                .snapshot
                .as_ref()
                .is_some_and(|s| s.group_snapshot_id == created.group_snapshot_id),
        "{listed:?}"
    );
    controller()
        .await?
        .delete_snapshot(DeleteSnapshotRequest {
            snapshot_id: member_of[&a].clone(),
            ..Default::default()
        })
        .await?;
    // The group then deletes what is left of it.
    group_client
        .delete_volume_group_snapshot(DeleteVolumeGroupSnapshotRequest {
            group_snapshot_id: created.group_snapshot_id.clone(),
            snapshot_ids: created
                .snapshots
                .iter()
                .map(|s| s.snapshot_id.clone())
                .collect(),
            ..Default::default()
        })
        .await?;
    let left = Api::<LivediskSnapshot>::all(client().await?)
        .list(&ListParams::default().labels(&format!(
            "{GROUP_SNAPSHOT_LABEL}={}",
            created.group_snapshot_id
        )))
        .await?;
    ensure!(left.items.is_empty(), "{} members left", left.items.len());
    let missing = group_client
        .get_volume_group_snapshot(GetVolumeGroupSnapshotRequest {
            group_snapshot_id: created.group_snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .expect_err("a deleted group");
    ensure!(missing.code() == tonic::Code::NotFound, "{missing:?}");

    for (volume, tag) in [
        (&a, "group-a"),
        (&b, "group-b"),
        (&restored_a, &format!("group-ra-{suffix}")[..]),
        (&restored_b, &format!("group-rb-{suffix}")[..]),
        (&control_a, &format!("group-ca-{suffix}")[..]),
        (&control_b, &format!("group-cb-{suffix}")[..]),
    ] {
        detach_block(NODE, volume, tag).await?;
    }
    for volume in [&restored_a, &restored_b, &control_a, &control_b] {
        delete_volume(volume).await?;
    }
    for snapshot in &separate {
        controller()
            .await?
            .delete_snapshot(DeleteSnapshotRequest {
                snapshot_id: snapshot.clone(),
                ..Default::default()
            })
            .await?;
    }
    for volume in [&a, &b, &c] {
        delete_volume(volume).await?;
    }
    Ok(())
}

fn group_snapshot_api(client: &Client, ns: &str, kind: &str, plural: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("groupsnapshot.storage.k8s.io", "v1", kind);
    Api::namespaced_with(
        client.clone(),
        ns,
        &ApiResource::from_gvk_with_plural(&gvk, plural),
    )
}

fn volume_snapshot_api(client: &Client, ns: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("snapshot.storage.k8s.io", "v1", "VolumeSnapshot");
    Api::namespaced_with(
        client.clone(),
        ns,
        &ApiResource::from_gvk_with_plural(&gvk, "volumesnapshots"),
    )
}

#[tokio::test]
async fn a_volume_group_snapshot_of_labelled_claims_is_ready_and_each_member_restores() -> Result<()>
{
    let _serial = SERIAL.lock().await;
    let client = client().await?;
    let namespace = TestNamespace::create(&client, "group-snapshot").await?;
    let ns = namespace.name.clone();
    let dir = ScratchDir::new("group-snapshot")?;
    let claims: Api<k8s_openapi::api::core::v1::PersistentVolumeClaim> =
        Api::namespaced(client.clone(), &ns);
    let mut logs = BTreeMap::new();
    for (tag, claim) in [(1u64, "disk-1"), (2, "disk-2")] {
        let volume = claim_bound_on(&client, &ns, claim, NODE).await?;
        claims
            .patch(
                claim,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {"vm": "db"}}})),
            )
            .await?;
        let device = host_device(NODE, &attach_block(NODE, &volume, claim).await?)?;
        let log = dir.0.join(format!("{claim}.log"));
        write_phase(&device, tag, 1024, &log)?;
        detach_block(NODE, &volume, claim).await?;
        logs.insert(claim.to_string(), (tag, log));
    }

    // A claim on the other node, and a label on it and on disk-1: a group across two nodes.
    claim_bound_on(&client, &ns, "disk-3", OTHER).await?;
    for claim in ["disk-1", "disk-3"] {
        claims
            .patch(
                claim,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {"span": "two-nodes"}}})),
            )
            .await?;
    }

    must(
        &client,
        &ns,
        json!({"apiVersion": "groupsnapshot.storage.k8s.io/v1", "kind": "VolumeGroupSnapshot",
               "metadata": {"name": "db"},
               "spec": {"volumeGroupSnapshotClassName": "livedisk",
                        "source": {"selector": {"matchLabels": {"vm": "db"}}}}}),
    )
    .await?;
    let groups = group_snapshot_api(&client, &ns, "VolumeGroupSnapshot", "volumegroupsnapshots");
    let status = eventually(180, "VolumeGroupSnapshot db ready", || async {
        let group = groups.get("db").await?;
        let status = group.data.get("status").cloned().unwrap_or_default();
        // csi-snapshotter records a transient error (an ABORTED call) and retries: only the
        // timeout fails the test, and it names the last error.
        if let Some(error) = status.get("error") {
            eprintln!("VolumeGroupSnapshot db reports: {error}");
        }
        Ok((status["readyToUse"] == json!(true)).then_some(status))
    })
    .await?;
    eprintln!("VolumeGroupSnapshot status: {status}");

    // The members: VolumeSnapshots of the group, one per claim.
    let snapshots = volume_snapshot_api(&client, &ns);
    let members: BTreeMap<String, String> =
        eventually(60, "the member VolumeSnapshots", || async {
            let members: BTreeMap<String, String> = snapshots
                .list(&ListParams::default())
                .await?
                .items
                .into_iter()
                .filter(|s| s.data["status"]["volumeGroupSnapshotName"] == json!("db"))
                .filter(|s| s.data["status"]["readyToUse"] == json!(true))
                .filter_map(|s| {
                    let claim = s.data["spec"]["source"]["persistentVolumeClaimName"]
                        .as_str()?
                        .to_string();
                    Some((claim, s.name_any()))
                })
                .collect();
            Ok((members.len() == 2).then_some(members))
        })
        .await?;

    // Each member restores into a new claim with its volume's data.
    for (claim, snapshot) in &members {
        let restored = format!("{claim}-restored");
        must(&client, &ns, pvc(&restored, Some(snapshot))).await?;
        let consumer = format!("{restored}-consumer");
        must(
            &client,
            &ns,
            livedisk_e2e::disks::pod(&consumer, &restored, Some(NODE)),
        )
        .await?;
        let (volume, node) = bound_volume(&client, &ns, &restored, &consumer).await?;
        let device = host_device(&node, &attach_block(&node, &volume, &restored).await?)?;
        let (tag, log) = &logs[claim];
        verify(&device, *tag, log)?;
        detach_block(&node, &volume, &restored).await?;
    }

    // Deleting the group deletes its members, down to the driver's snapshots.
    let content_name = status["boundVolumeGroupSnapshotContentName"]
        .as_str()
        .context("no bound VolumeGroupSnapshotContent")?
        .to_string();
    let gvk = GroupVersionKind::gvk(
        "groupsnapshot.storage.k8s.io",
        "v1",
        "VolumeGroupSnapshotContent",
    );
    let contents: Api<DynamicObject> = Api::all_with(
        client.clone(),
        &ApiResource::from_gvk_with_plural(&gvk, "volumegroupsnapshotcontents"),
    );
    let handle = contents.get(&content_name).await?.data["status"]["volumeGroupSnapshotHandle"]
        .as_str()
        .context("no group snapshot handle")?
        .to_string();
    ensure!(handle.starts_with("gsnap-"), "handle {handle}");
    let driver_members = Api::<LivediskSnapshot>::all(client.clone());
    let by_group = ListParams::default().labels(&format!("{GROUP_SNAPSHOT_LABEL}={handle}"));
    ensure!(driver_members.list(&by_group).await?.items.len() == 2);
    groups.delete("db", &DeleteParams::default()).await?;
    eventually(
        180,
        "the group's snapshots gone from the driver",
        || async {
            Ok(driver_members
                .list(&by_group)
                .await?
                .items
                .is_empty()
                .then_some(()))
        },
    )
    .await?;
    eventually(120, "the member VolumeSnapshots gone", || async {
        let left = snapshots
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .filter(|s| members.values().any(|m| *m == s.name_any()))
            .count();
        Ok((left == 0).then_some(()))
    })
    .await?;

    // A group of claims on two nodes is refused by the driver, and the user reads why on the
    // VolumeGroupSnapshot; nothing is taken.
    must(
        &client,
        &ns,
        json!({"apiVersion": "groupsnapshot.storage.k8s.io/v1", "kind": "VolumeGroupSnapshot",
               "metadata": {"name": "split"},
               "spec": {"volumeGroupSnapshotClassName": "livedisk",
                        "source": {"selector": {"matchLabels": {"span": "two-nodes"}}}}}),
    )
    .await?;
    let told = eventually(120, "VolumeGroupSnapshot split refused", || async {
        let group = groups.get("split").await?;
        ensure!(
            group.data["status"]["readyToUse"] != json!(true),
            "a group across two nodes became ready"
        );
        Ok(group.data["status"]["error"]["message"]
            .as_str()
            .filter(|m| m.contains("different nodes"))
            .map(str::to_string))
    })
    .await?;
    eprintln!("split group refused: {told}");
    let split_members = driver_members
        .list(&ListParams::default().labels(GROUP_SNAPSHOT_LABEL))
        .await?;
    ensure!(
        split_members.items.is_empty(),
        "{} group members exist after the refusal",
        split_members.items.len()
    );
    groups.delete("split", &DeleteParams::default()).await?;
    namespace.delete().await
}
