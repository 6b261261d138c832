//! DiskMigration on the two-node local cluster (processes layout: each node's engine and node
//! plugin in their own namespaces, so the copy is real I/O over TLS NBD between them), driven
//! the way a user drives it: a DiskMigration of a PVC, reconciled by the operator under the
//! chart's account.
//!
//! * Under a continuous checksummed writer on the source node: zero write errors, every
//!   acknowledged write reads back on the source (now served remotely by the target) and on the
//!   target after the consumer moved; the inventory names the target; the cutover pause is
//!   reported; GetMetadataDelta between two snapshots taken before the move answers the same
//!   after it (the snapshots and their changed-block records moved with the volume).
//! * Faults: the source's node plugin killed, the link between the nodes cut and the target's
//!   node plugin killed, each mid-copy, then the target's link cut after the pivot while the
//!   source's consumer is served remotely: the migration completes, the writer sees no error,
//!   every acknowledged write reads back.
//! * To the node whose consumer uses the volume through a remote attachment (a VM moved before
//!   its disk): under that consumer's writer, the migration completes with no write error, the
//!   consumer's way through the old owner is withdrawn (its LivediskAttachment goes), and with
//!   the old owner's link cut the consumer still writes and reads back: its export now sits on
//!   the target's own volume.
//! * Staged on both nodes (a VM on the source, the QEMU it will move to waiting on the target),
//!   moved under the source's writer: every write reads back through both consumers, the
//!   target's consumer ends up local, the source's goes on through the target until it unstages,
//!   and then no LivediskAttachment of the volume is left.
//! * Cancelled while the mirror runs (a bandwidth limit keeps it running): Cancelled, the volume
//!   stays on the source with every write, and the target keeps nothing.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use livedisk_api::internal::{
    LivediskAttachment, LivediskMigration, LivediskSnapshot, LivediskVolume, attachment_name,
};
use livedisk_api::{DiskMigration, DiskMigrationStatus, MigrationStage, Phase};
use livedisk_csi_proto::csi::v1::*;
use livedisk_e2e::csi::{
    attach_block, detach_block, kill_engine_daemon, kill_node_plugin, set_link,
};
use livedisk_e2e::disks::{ScratchDir, host_device, must, verifier};
use livedisk_e2e::operator::operator_with_fronts;
use livedisk_e2e::phases::{log_from_block, take_snapshot, verify, write_phase};
use livedisk_e2e::{TestNamespace, client, eventually};
use serde_json::json;

const SOURCE: &str = "node-a";
const TARGET: &str = "node-b";
const BLOCKS: u64 = 2048;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A block PVC bound on the source node.
async fn volume_on_source(client: &Client, ns: &str, claim: &str) -> Result<String> {
    livedisk_e2e::disks::claim_bound_on(client, ns, claim, SOURCE).await
}

async fn stage_as_kubelet(node: &str, volume: &str, tag: &str) -> Result<String> {
    livedisk_e2e::csi::attach_block_as_kubelet(node, volume, tag).await
}

fn start_writer(device: &str, tag: u64, writes: u64, log: &Path) -> Result<std::process::Child> {
    Ok(verifier()?
        .args(["write", "--path", device, "--tag", &tag.to_string()])
        .args([
            "--blocks",
            &BLOCKS.to_string(),
            "--count",
            &writes.to_string(),
            "--log",
        ])
        .arg(log)
        .stderr(std::process::Stdio::piped())
        .spawn()?)
}

fn finish_writer(writer: std::process::Child) -> Result<()> {
    let output = writer.wait_with_output()?;
    ensure!(
        output.status.success(),
        "the writer met an error: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

async fn migration(
    client: &Client,
    ns: &str,
    name: &str,
    claim: &str,
    extra: serde_json::Value,
) -> Result<()> {
    let mut spec = json!({ "persistentVolumeClaimName": claim, "targetNodeName": TARGET });
    if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
        s.extend(e.clone());
    }
    must(
        client,
        ns,
        json!({ "apiVersion": "livedisk.io/v1alpha1", "kind": "DiskMigration",
                "metadata": { "name": name }, "spec": spec }),
    )
    .await
}

/// The volume's snapshot IDs, oldest first.
async fn snapshot_ids(client: &Client, volume: &str) -> Result<Vec<String>> {
    let api: Api<LivediskSnapshot> = Api::all(client.clone());
    let mut list = api
        .list(&ListParams::default().fields(&format!("spec.volumeId={volume}")))
        .await?
        .items;
    list.sort_by_key(|s| s.metadata.creation_timestamp.clone().map(|t| t.0));
    Ok(list.iter().map(|s| s.name_any()).collect())
}

async fn delta(base: &str, target: &str) -> Result<Vec<(i64, i64)>> {
    let mut metadata = livedisk_e2e::csi::snapshot_metadata().await?;
    let mut stream = metadata
        .get_metadata_delta(GetMetadataDeltaRequest {
            base_snapshot_id: base.into(),
            target_snapshot_id: target.into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut out = vec![];
    while let Some(m) = stream.message().await? {
        out.extend(
            m.block_metadata
                .iter()
                .map(|b| (b.byte_offset, b.size_bytes)),
        );
    }
    Ok(out)
}

/// The LivediskAttachment by which the target uses `volume` (staged there, held by the
/// source), and its name; an error if there is none.
async fn attached_remotely_on_target(
    client: &Client,
    volume: &str,
) -> Result<(Api<LivediskAttachment>, String)> {
    let attachments: Api<LivediskAttachment> = Api::all(client.clone());
    let name = attachment_name(volume, TARGET);
    ensure!(
        attachments.get_opt(&name).await?.is_some(),
        "{volume} is not attached remotely on {TARGET}"
    );
    Ok((attachments, name))
}

/// A DiskMigration `name` of the claim "disk" to the target under a writer of `writes` blocks
/// with `tag` on `device`, completed while the writer still runs: the writer (to finish) and
/// the migration's status.
async fn migrate_under_writer(
    client: &Client,
    migrations: &Api<DiskMigration>,
    name: &str,
    device: &str,
    (tag, writes): (u64, u64),
    log: &Path,
) -> Result<(std::process::Child, DiskMigrationStatus)> {
    let mut writer = start_writer(device, tag, writes, log)?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ns = migrations.namespace().context("a namespaced API")?;
    migration(client, ns, name, "disk", json!({})).await?;
    let done = completed(migrations, name).await?;
    println!(
        "{name}: cutover pause {:?} ms, verification {:?}, {} writes acknowledged",
        done.cutover_pause_milliseconds,
        done.verification,
        acked(log)
    );
    still_writing(&mut writer)?;
    Ok((writer, done))
}

/// The inventory names the target as `volume`'s node, and the source's pool keeps nothing of it.
async fn held_by_the_target_alone(client: &Client, volume: &str) -> Result<()> {
    let volumes: Api<LivediskVolume> = Api::all(client.clone());
    let node = volumes.get(volume).await?.spec.node_name;
    ensure!(node == TARGET, "the inventory names {node} for {volume}");
    ensure!(
        !pool_has(SOURCE, volume)?,
        "the source still holds {volume}"
    );
    Ok(())
}

/// Waits for the DiskMigration `name` to complete: its status; an error if it failed or was
/// cancelled.
async fn completed(migrations: &Api<DiskMigration>, name: &str) -> Result<DiskMigrationStatus> {
    eventually(300, &format!("DiskMigration {name} Completed"), || async {
        let status = migrations.get(name).await?.status.unwrap_or_default();
        ensure!(
            !matches!(status.phase, Phase::Failed | Phase::Cancelled),
            "migration ended {:?}: {:?}",
            status.phase,
            status.conditions
        );
        Ok((status.phase == Phase::Completed).then_some(status))
    })
    .await
}

/// Fails unless the writer still runs: the migration that just completed was under it.
fn still_writing(writer: &mut std::process::Child) -> Result<()> {
    ensure!(
        writer.try_wait()?.is_none(),
        "the writer ended before the migration did: the move was not under it (raise its count)"
    );
    Ok(())
}

/// Waits until the LivediskAttachment `name` is gone.
async fn withdrawn(attachments: &Api<LivediskAttachment>, name: &str, what: &str) -> Result<()> {
    eventually(120, what, || async {
        Ok(attachments.get_opt(name).await?.is_none().then_some(()))
    })
    .await
}

/// With the old owner (the source) cut off, a consumer of the moved volume on the target writes
/// 256 blocks with `tag` and reads them back within 60 s. Through the old owner, its writes would
/// wait on the NBD client's reconnect for minutes.
async fn writes_with_the_old_owner_cut(device: &str, tag: u64, log: &Path) -> Result<()> {
    set_link(SOURCE, false)?;
    let (device, log) = (device.to_string(), log.to_path_buf());
    let cut = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::task::spawn_blocking(move || {
            write_phase(&device, tag, 256, &log)?;
            verify(&device, tag, &log)
        }),
    )
    .await;
    set_link(SOURCE, true)?;
    cut.context("the consumer's writes waited on the cut-off old owner")??
}

/// Whether a node's pool (a host directory in this layout) holds anything of `volume`.
fn pool_has(node: &str, volume: &str) -> Result<bool> {
    let pool = livedisk_e2e::csi::socket_dir()?
        .with_file_name("nodes")
        .join(node)
        .join("pool");
    Ok(pool.join(volume).exists() || pool.join("incoming").join(volume).exists())
}

#[tokio::test]
async fn a_volume_moves_under_a_writer_with_its_snapshots_and_changed_blocks() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let client = client().await?;
    let _operator = operator_with_fronts(&client, &[SOURCE, TARGET]).await?;
    let namespace = TestNamespace::create(&client, "migrate").await?;
    let ns = namespace.name.clone();
    let dir = ScratchDir::new("disk-migration")?;
    let volume = volume_on_source(&client, &ns, "disk").await?;
    let target = attach_block(SOURCE, &volume, "migrate").await?;
    let device = host_device(SOURCE, &target)?;

    // History: two snapshots with writes before and between them.
    let log1 = dir.0.join("phase1.log");
    write_phase(&device, 1, BLOCKS, &log1)?;
    take_snapshot(&client, &ns, "before", "disk").await?;
    let log2 = dir.0.join("phase2.log");
    write_phase(&device, 2, 300, &log2)?;
    take_snapshot(&client, &ns, "between", "disk").await?;
    let snaps = snapshot_ids(&client, &volume).await?;
    ensure!(snaps.len() == 2, "snapshots of {volume}: {snaps:?}");
    let delta_before = delta(&snaps[0], &snaps[1]).await?;
    ensure!(
        !delta_before.is_empty(),
        "no changed blocks between the snapshots"
    );

    // The move, under a writer.
    let log3 = dir.0.join("during.log");
    let writer = start_writer(&device, 3, 40_000, &log3)?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    migration(&client, &ns, "move", "disk", json!({})).await?;
    let migrations: Api<DiskMigration> = Api::namespaced(client.clone(), &ns);
    let stages = std::sync::Mutex::new(Vec::<MigrationStage>::new());
    let done = eventually(300, "DiskMigration move Completed", || async {
        let status = migrations.get("move").await?.status.unwrap_or_default();
        if let Some(stage) = status.stage
            && let Ok(mut seen) = stages.lock()
            && seen.last() != Some(&stage)
        {
            seen.push(stage);
        }
        ensure!(
            status.phase != Phase::Failed,
            "migration failed: {:?}",
            status.conditions
        );
        Ok((status.phase == Phase::Completed).then_some(status))
    })
    .await?;
    let stages = stages.into_inner().unwrap_or_default();
    finish_writer(writer)?;
    let pause = done
        .cutover_pause_milliseconds
        .context("no cutover pause reported")?;
    println!("cutover pause {pause} ms; stages seen {stages:?}");
    ensure!(done.source_node_name.as_deref() == Some(SOURCE));
    ensure!(
        stages.contains(&MigrationStage::Copying),
        "stages {stages:?}"
    );
    // The comparison after the cutover (spec.verify defaults to true): the source's frozen
    // chain against the target, outside what was written after it started.
    let verification = done
        .verification
        .clone()
        .context("no verification reported")?;
    println!("verification: {verification:?}");
    ensure!(
        verification.first_difference_offset.is_none() && verification.compared_bytes > 0,
        "verification: {verification:?}"
    );

    // Ownership moved: the inventory names the target, the source keeps no copy.
    held_by_the_target_alone(&client, &volume).await?;
    let snapshots: Api<LivediskSnapshot> = Api::all(client.clone());
    for s in &snaps {
        ensure!(
            snapshots.get(s).await?.spec.node_name == TARGET,
            "snapshot {s} stayed"
        );
    }

    // Every acknowledged write is there: through the source's (now remote) consumer...
    verify(&device, 3, &log3)?;
    // ...and on the target once the consumer moved.
    detach_block(SOURCE, &volume, "migrate").await?;
    let moved = host_device(
        TARGET,
        &stage_as_kubelet(TARGET, &volume, "migrated").await?,
    )?;
    verify(&moved, 3, &log3)?;
    // Changed blocks between the two snapshots answer the same on the new node.
    let delta_after = delta(&snaps[0], &snaps[1]).await?;
    ensure!(
        delta_after == delta_before,
        "delta changed: {delta_before:?} -> {delta_after:?}"
    );
    // The snapshots are still snapshots: a third one on the target.
    take_snapshot(&client, &ns, "after", "disk").await?;
    detach_block(TARGET, &volume, "migrated").await?;
    let _ = migrations.delete("move", &DeleteParams::default()).await;
    namespace.delete().await
}

#[tokio::test]
async fn a_volume_moves_to_the_node_whose_consumer_uses_it_remotely() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let client = client().await?;
    let _operator = operator_with_fronts(&client, &[SOURCE, TARGET]).await?;
    let namespace = TestNamespace::create(&client, "migrate-to-consumer").await?;
    let ns = namespace.name.clone();
    let dir = ScratchDir::new("disk-migration-to-consumer")?;
    let volume = volume_on_source(&client, &ns, "disk").await?;
    // The consumer is on the target, the volume on the source: a remote attachment.
    let staged = stage_as_kubelet(TARGET, &volume, "remote").await?;
    let device = host_device(TARGET, &staged)?;
    let (attachments, remote) = attached_remotely_on_target(&client, &volume).await?;
    let log1 = dir.0.join("before.log");
    write_phase(&device, 1, BLOCKS, &log1)?;

    let log2 = dir.0.join("during.log");
    let migrations: Api<DiskMigration> = Api::namespaced(client.clone(), &ns);
    let (writer, _) = migrate_under_writer(
        &client,
        &migrations,
        "to-consumer",
        &device,
        (2, 60_000),
        &log2,
    )
    .await?;
    // The consumer's way through the old owner is withdrawn once its export is local.
    withdrawn(&attachments, &remote, "the remote attachment withdrawn").await?;
    finish_writer(writer)?;
    held_by_the_target_alone(&client, &volume).await?;
    verify(&device, 2, &log2)?;

    // The old owner cut off: the consumer still writes and reads back.
    writes_with_the_old_owner_cut(&device, 3, &dir.0.join("cut.log")).await?;

    // Unstaged the local way: nothing of the old attachment is left to end.
    detach_block(TARGET, &volume, "remote").await?;
    let _ = migrations
        .delete("to-consumer", &DeleteParams::default())
        .await;
    namespace.delete().await
}

/// A ReadWriteMany block volume staged on both nodes (a VM writing on the source while the QEMU
/// it will live-migrate to waits on the target with the same disk) moves under the source's
/// writer: both consumers keep their data, the target's ends up on its local volume, and the
/// source's goes on through the target until it unstages, which then leaves nothing attached.
#[tokio::test]
async fn a_volume_used_on_both_nodes_moves_under_the_source_writer() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let client = client().await?;
    let _operator = operator_with_fronts(&client, &[SOURCE, TARGET]).await?;
    let namespace = TestNamespace::create(&client, "migrate-both").await?;
    let ns = namespace.name.clone();
    let dir = ScratchDir::new("disk-migration-both")?;
    let volume = volume_on_source(&client, &ns, "disk").await?;
    let on_source = host_device(SOURCE, &attach_block(SOURCE, &volume, "local").await?)?;
    let on_target = host_device(TARGET, &stage_as_kubelet(TARGET, &volume, "remote").await?)?;
    let (attachments, target_to_source) = attached_remotely_on_target(&client, &volume).await?;

    let log = dir.0.join("during.log");
    let migrations: Api<DiskMigration> = Api::namespaced(client.clone(), &ns);
    let (writer, done) =
        migrate_under_writer(&client, &migrations, "both", &on_source, (1, 40_000), &log).await?;
    ensure!(
        done.progress.as_ref().is_some_and(|p| p.bytes_total > 0),
        "no bytes reported moved: {:?}",
        done.progress
    );
    // The target's consumer is switched to its local volume: its way through the old owner goes.
    withdrawn(
        &attachments,
        &target_to_source,
        "the target's remote attachment withdrawn",
    )
    .await?;
    finish_writer(writer)?;
    held_by_the_target_alone(&client, &volume).await?;
    // Every acknowledged write, through the source's consumer (served by the target now) and
    // through the target's (local now).
    verify(&on_source, 1, &log)?;
    verify(&on_target, 1, &log)?;

    // The source's consumer lets go: its attachment to the new owner ends with it.
    detach_block(SOURCE, &volume, "local").await?;
    let source_to_target = attachment_name(&volume, SOURCE);
    withdrawn(
        &attachments,
        &source_to_target,
        "the source's attachment to the new owner ended",
    )
    .await?;
    // The old owner cut off: the target's consumer writes and reads back on its own.
    writes_with_the_old_owner_cut(&on_target, 2, &dir.0.join("after.log")).await?;

    detach_block(TARGET, &volume, "remote").await?;
    ensure!(
        attachments
            .list(&ListParams::default())
            .await?
            .items
            .iter()
            .all(|a| a.spec.volume_id != volume),
        "a LivediskAttachment of {volume} is left"
    );
    let _ = migrations.delete("both", &DeleteParams::default()).await;
    namespace.delete().await
}

#[tokio::test]
async fn a_cancelled_migration_leaves_the_volume_where_it_was() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let client = client().await?;
    let _operator = operator_with_fronts(&client, &[SOURCE, TARGET]).await?;
    let namespace = TestNamespace::create(&client, "migrate-cancel").await?;
    let ns = namespace.name.clone();
    let dir = ScratchDir::new("disk-migration-cancel")?;
    let volume = volume_on_source(&client, &ns, "disk").await?;
    let target = attach_block(SOURCE, &volume, "cancel").await?;
    let device = host_device(SOURCE, &target)?;
    let log = dir.0.join("phase1.log");
    write_phase(&device, 1, BLOCKS, &log)?;

    // 1 MiB/s: the mirror of 8 MiB of written data runs for seconds.
    migration(
        &client,
        &ns,
        "slow",
        "disk",
        json!({ "bandwidthLimit": "1Mi" }),
    )
    .await?;
    let works: Api<LivediskMigration> = Api::all(client.clone());
    eventually(120, "the mirror running", || async {
        let list = works
            .list(&ListParams::default().fields(&format!("spec.volumeId={volume}")))
            .await?;
        Ok(list.items.into_iter().find(|w| {
            w.status
                .as_ref()
                .is_some_and(|s| s.target.as_ref().is_some_and(|t| t.imported))
        }))
    })
    .await?;
    let migrations: Api<DiskMigration> = Api::namespaced(client.clone(), &ns);
    cancel_and_expect_source_kept(&client, &migrations, "slow", &volume).await?;
    // The source is untouched and still takes writes.
    verify(&device, 1, &log)?;
    let log2 = dir.0.join("phase2.log");
    write_phase(&device, 2, 256, &log2)?;
    verify(&device, 2, &log2)?;
    detach_block(SOURCE, &volume, "cancel").await?;
    namespace.delete().await
}

fn acked(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

/// The migration of `volume` while its target copies the sealed layers (copied some, not yet
/// imported).
async fn copy_under_way(client: &Client, volume: &str) -> Result<Option<LivediskMigration>> {
    let works: Api<LivediskMigration> = Api::all(client.clone());
    let list = works
        .list(&ListParams::default().fields(&format!("spec.volumeId={volume}")))
        .await?;
    Ok(list.items.into_iter().find(|w| {
        w.status.as_ref().is_some_and(|s| {
            s.target
                .as_ref()
                .is_some_and(|t| t.copied_bytes > 0 && !t.imported)
        })
    }))
}

#[tokio::test]
async fn killed_node_plugins_and_cut_links_lose_no_acknowledged_write() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let client = client().await?;
    let _operator = operator_with_fronts(&client, &[SOURCE, TARGET]).await?;
    let namespace = TestNamespace::create(&client, "migrate-faults").await?;
    let ns = namespace.name.clone();
    let dir = ScratchDir::new("disk-migration-faults")?;
    let volume = volume_on_source(&client, &ns, "disk").await?;
    let target = attach_block(SOURCE, &volume, "faults").await?;
    let device = host_device(SOURCE, &target)?;
    // 47 MiB in a sealed layer: at 4 MiB/s the copy reads for over ten seconds.
    write_phase(&device, 1, 12_000, &dir.0.join("phase1.log"))?;
    take_snapshot(&client, &ns, "sealed", "disk").await?;

    let log = dir.0.join("during.log");
    let writer = start_writer(&device, 2, 60_000, &log)?;
    eventually(30, "the writer under way", || async {
        Ok((acked(&log) > 100).then_some(()))
    })
    .await?;
    migration(
        &client,
        &ns,
        "faulty",
        "disk",
        json!({ "bandwidthLimit": "4Mi" }),
    )
    .await?;
    let copying = || copy_under_way(&client, &volume);
    eventually(120, "the copy under way", copying).await?;
    // The source's node plugin (its front serves the copy) killed mid-copy.
    kill_node_plugin(SOURCE).await?;
    // The link between the nodes cut for 3 s while the copy goes on.
    eventually(120, "the copy under way again", copying).await?;
    set_link(SOURCE, false)?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    set_link(SOURCE, true)?;
    // The target's node plugin (it runs the copy) killed mid-copy: the restarted plugin copies
    // again from the start.
    eventually(120, "the copy under way after the cut", copying).await?;
    kill_node_plugin(TARGET).await?;

    let migrations: Api<DiskMigration> = Api::namespaced(client.clone(), &ns);
    let done = eventually(300, "DiskMigration faulty Completed", || async {
        let status = migrations.get("faulty").await?.status.unwrap_or_default();
        ensure!(
            status.phase != Phase::Failed,
            "migration failed: {:?}",
            status.conditions
        );
        Ok((status.phase == Phase::Completed).then_some(status))
    })
    .await?;
    println!(
        "after killed node plugins and a cut link: completed, pause {:?} ms",
        done.cutover_pause_milliseconds
    );

    // After the pivot the source's consumer is served by the target: a cut link mid-write.
    finish_writer(writer)?;
    ensure!(
        acked(&log) == 60_000,
        "the writer acknowledged {} of 60000 writes",
        acked(&log)
    );
    verify(&device, 2, &log)?;
    let volumes: Api<LivediskVolume> = Api::all(client.clone());
    ensure!(volumes.get(&volume).await?.spec.node_name == TARGET);
    let log = dir.0.join("after.log");
    let writer = start_writer(&device, 3, 6000, &log)?;
    eventually(30, "the writer under way", || async {
        Ok((acked(&log) > 100).then_some(()))
    })
    .await?;
    set_link(TARGET, false)?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    set_link(TARGET, true)?;
    finish_writer(writer)?;
    ensure!(
        acked(&log) == 6000,
        "the writer acknowledged {} of 6000 writes",
        acked(&log)
    );
    verify(&device, 3, &log)?;
    eventually(60, "the source's plugin unstaging", || async {
        Ok(detach_block(SOURCE, &volume, "faults").await.ok())
    })
    .await?;
    let moved = host_device(
        TARGET,
        &stage_as_kubelet(TARGET, &volume, "faults-moved").await?,
    )?;
    verify(&moved, 3, &log)?;
    detach_block(TARGET, &volume, "faults-moved").await?;
    let _ = migrations.delete("faulty", &DeleteParams::default()).await;
    namespace.delete().await
}

/// NodeUnstage + NodeStage again until it works (after an engine daemon restart the node answers
/// UNAVAILABLE for a while); the new host device.
async fn restage(node: &str, volume: &str, tag: &str) -> Result<String> {
    eventually(180, &format!("{volume} re-staged on {node}"), || async {
        let _ = detach_block(node, volume, tag).await;
        match attach_block(node, volume, tag).await {
            Ok(path) => Ok(Some(host_device(node, &path)?)),
            Err(_) => Ok(None),
        }
    })
    .await
}

#[tokio::test]
async fn killed_engine_daemons_mid_copy_lose_no_acknowledged_write() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let client = client().await?;
    let _operator = operator_with_fronts(&client, &[SOURCE, TARGET]).await?;
    let namespace = TestNamespace::create(&client, "migrate-daemons").await?;
    let ns = namespace.name.clone();
    let dir = ScratchDir::new("disk-migration-daemons")?;
    let volume = volume_on_source(&client, &ns, "disk").await?;
    let device = host_device(SOURCE, &attach_block(SOURCE, &volume, "daemons").await?)?;
    // 47 MiB in a sealed layer (at 4 MiB/s the copy reads for over ten seconds), then writes
    // in the active layer over its first 2000 blocks. Each daemon kill takes the consumer's
    // device with it, so nothing writes while they happen: the ground truth is the two phases.
    let (sealed_log, active_log) = (dir.0.join("sealed.log"), dir.0.join("active.log"));
    write_phase(&device, 1, 12_000, &sealed_log)?;
    take_snapshot(&client, &ns, "sealed", "disk").await?;
    write_phase(&device, 2, 2000, &active_log)?;
    let below = dir.0.join("sealed-untouched.log");
    log_from_block(&sealed_log, 2000, &below)?;

    migration(
        &client,
        &ns,
        "daemons",
        "disk",
        json!({ "bandwidthLimit": "4Mi" }),
    )
    .await?;
    let copying = || copy_under_way(&client, &volume);
    eventually(120, "the copy under way", copying).await?;
    // The target's engine daemon (it holds the import) killed mid-copy.
    kill_engine_daemon(TARGET).await?;
    eventually(240, "the copy under way again", copying).await?;
    // The source's engine daemon (it serves the sealed layers) killed mid-copy.
    kill_engine_daemon(SOURCE).await?;

    let migrations: Api<DiskMigration> = Api::namespaced(client.clone(), &ns);
    let ended = eventually(480, "DiskMigration daemons ended", || async {
        let status = migrations.get("daemons").await?.status.unwrap_or_default();
        Ok(matches!(status.phase, Phase::Completed | Phase::Failed).then_some(status))
    })
    .await?;
    let volumes: Api<LivediskVolume> = Api::all(client.clone());
    let owner = volumes.get(&volume).await?.spec.node_name;
    println!(
        "after both engine daemons were killed mid-copy: {:?} ({:?}), the volume on {owner}",
        ended.phase,
        ended
            .conditions
            .iter()
            .map(|c| &c.message)
            .collect::<Vec<_>>()
    );
    // The copy resumes after each restart (the target retries for up to three minutes).
    ensure!(
        ended.phase == Phase::Completed && owner == TARGET,
        "{:?} and the volume is on {owner}",
        ended.phase
    );
    // Every acknowledged write, read where a consumer on the source reads it now (its device
    // died with the daemon: staged again, as kubelet would after the pod's restart).
    let device = restage(SOURCE, &volume, "daemons").await?;
    verify(&device, 2, &active_log)?;
    verify(&device, 1, &below)?;
    detach_block(SOURCE, &volume, "daemons").await?;
    if owner == TARGET {
        let moved = host_device(
            TARGET,
            &stage_as_kubelet(TARGET, &volume, "daemons-moved").await?,
        )?;
        verify(&moved, 2, &active_log)?;
        verify(&moved, 1, &below)?;
        detach_block(TARGET, &volume, "daemons-moved").await?;
    }
    let _ = migrations.delete("daemons", &DeleteParams::default()).await;
    namespace.delete().await
}

/// The stage of the node work of `volume`, and whether the target has imported the sealed
/// layers.
async fn work_state(
    client: &Client,
    volume: &str,
) -> Result<Option<(Option<MigrationStage>, bool)>> {
    let works: Api<LivediskMigration> = Api::all(client.clone());
    let list = works
        .list(&ListParams::default().fields(&format!("spec.volumeId={volume}")))
        .await?;
    Ok(list.items.into_iter().next().and_then(|w| {
        w.status.map(|s| {
            let imported = s.target.as_ref().is_some_and(|t| t.imported);
            (s.stage, imported)
        })
    }))
}

/// Cancels DiskMigration `name` and waits until it is Cancelled with the volume still on the
/// source and the target's partial import discarded.
async fn cancel_and_expect_source_kept(
    client: &Client,
    migrations: &Api<DiskMigration>,
    name: &str,
    volume: &str,
) -> Result<()> {
    migrations
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "cancel": true } })),
        )
        .await?;
    eventually(120, &format!("DiskMigration {name} Cancelled"), || async {
        let status = migrations.get(name).await?.status.unwrap_or_default();
        ensure!(
            status.phase != Phase::Completed,
            "completed despite the cancel"
        );
        Ok((status.phase == Phase::Cancelled).then_some(()))
    })
    .await?;
    let volumes: Api<LivediskVolume> = Api::all(client.clone());
    ensure!(volumes.get(volume).await?.spec.node_name == SOURCE);
    eventually(60, "the target's partial copy discarded", || async {
        Ok((!pool_has(TARGET, volume)?).then_some(()))
    })
    .await?;
    migrations.delete(name, &DeleteParams::default()).await?;
    eventually(60, &format!("DiskMigration {name} gone"), || async {
        Ok(migrations.get_opt(name).await?.is_none().then_some(()))
    })
    .await
}

/// Waits until the node work of `volume` reports `stage`.
async fn work_reaches(client: &Client, volume: &str, stage: MigrationStage) -> Result<()> {
    eventually(240, &format!("the migration at {stage:?}"), || async {
        Ok(work_state(client, volume)
            .await?
            .filter(|(s, _)| *s == Some(stage))
            .map(|_| ()))
    })
    .await
}

/// Blocks the writer rewrites while a migration is held in Synchronized.
const HELD_BLOCKS: u64 = 512;

#[tokio::test]
async fn a_cancel_in_each_stage_before_the_cutover_keeps_the_source_and_one_after_is_refused()
-> Result<()> {
    let _serial = SERIAL.lock().await;
    let client = client().await?;
    let _operator = operator_with_fronts(&client, &[SOURCE, TARGET]).await?;
    let namespace = TestNamespace::create(&client, "migrate-cancels").await?;
    let ns = namespace.name.clone();
    let dir = ScratchDir::new("disk-migration-cancels")?;
    // 2 GiB, mostly holes: the copy and the mirror move only what was written, while the
    // verification after the pivot reads all of it (seconds: the window for a late cancel).
    let volume =
        livedisk_e2e::disks::claim_of_size_bound_on(&client, &ns, "disk", "2Gi", SOURCE).await?;
    let device = host_device(SOURCE, &attach_block(SOURCE, &volume, "cancels").await?)?;
    // 47 MiB sealed by a snapshot: at 2 MiB/s its copy runs for many seconds.
    let sealed_log = dir.0.join("sealed.log");
    write_phase(&device, 1, 12_000, &sealed_log)?;
    take_snapshot(&client, &ns, "sealed", "disk").await?;
    let migrations: Api<DiskMigration> = Api::namespaced(client.clone(), &ns);

    // Copying: cancelled while the target copies the sealed layers (before any mirror).
    migration(
        &client,
        &ns,
        "copying",
        "disk",
        json!({ "bandwidthLimit": "2Mi" }),
    )
    .await?;
    eventually(120, "the sealed layers being copied", || {
        copy_under_way(&client, &volume)
    })
    .await?;
    cancel_and_expect_source_kept(&client, &migrations, "copying", &volume).await?;
    verify(&device, 1, &sealed_log)?;

    // Synchronized: converged and held there by holdCutover, for seconds, with writes made
    // meanwhile; the cancel keeps the source with every one of them (what the mirror carried to
    // the target is discarded with it, so it is not checked here).
    migration(
        &client,
        &ns,
        "synchronized",
        "disk",
        json!({ "holdCutover": true }),
    )
    .await?;
    work_reaches(&client, &volume, MigrationStage::Synchronized).await?;
    let held_log = dir.0.join("held.log");
    write_phase(&device, 2, HELD_BLOCKS, &held_log)?;
    // The sealed writes the held ones did not overwrite.
    let sealed_rest = dir.0.join("sealed-rest.log");
    log_from_block(&sealed_log, HELD_BLOCKS, &sealed_rest)?;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let held = migrations
        .get("synchronized")
        .await?
        .status
        .unwrap_or_default();
    ensure!(
        held.phase == Phase::Running && held.stage == Some(MigrationStage::Synchronized),
        "a held migration left Synchronized: {:?} {:?}",
        held.phase,
        held.stage
    );
    cancel_and_expect_source_kept(&client, &migrations, "synchronized", &volume).await?;
    verify(&device, 1, &sealed_rest)?;
    verify(&device, 2, &held_log)?;

    // After the pivot (held, then released; the cancel lands during the verification): refused
    // with a condition, the migration completes and the volume lives on the target.
    migration(&client, &ns, "late", "disk", json!({ "holdCutover": true })).await?;
    work_reaches(&client, &volume, MigrationStage::Synchronized).await?;
    migrations
        .patch(
            "late",
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "holdCutover": false } })),
        )
        .await?;
    work_reaches(&client, &volume, MigrationStage::Verifying).await?;
    migrations
        .patch(
            "late",
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "cancel": true } })),
        )
        .await?;
    let refused = eventually(
        120,
        "the late cancel refused on the DiskMigration",
        || async {
            let status = migrations.get("late").await?.status.unwrap_or_default();
            Ok(status
                .conditions
                .iter()
                // The node's refusal ("cancel is refused" is the CuttingOver stage's message).
                .find(|c| c.message.contains("cancel refused"))
                .map(|c| (c.type_.clone(), c.reason.clone(), c.message.clone())))
        },
    )
    .await?;
    eprintln!("late cancel: {refused:?}");
    let done = eventually(180, "DiskMigration late ended", || async {
        let status = migrations.get("late").await?.status.unwrap_or_default();
        Ok(matches!(
            status.phase,
            Phase::Completed | Phase::Cancelled | Phase::Failed
        )
        .then_some(status))
    })
    .await?;
    ensure!(
        done.phase == Phase::Completed,
        "a cancel after the pivot ended the migration {:?}: {:?}",
        done.phase,
        done.conditions
    );
    let volumes: Api<LivediskVolume> = Api::all(client.clone());
    ensure!(volumes.get(&volume).await?.spec.node_name == TARGET);
    verify(&device, 1, &sealed_rest)?;
    verify(&device, 2, &held_log)?;
    eventually(60, "the source's plugin unstaging", || async {
        Ok(detach_block(SOURCE, &volume, "cancels").await.ok())
    })
    .await?;
    let moved = host_device(
        TARGET,
        &stage_as_kubelet(TARGET, &volume, "cancels-moved").await?,
    )?;
    verify(&moved, 1, &sealed_rest)?;
    verify(&moved, 2, &held_log)?;
    detach_block(TARGET, &volume, "cancels-moved").await?;
    let _ = migrations.delete("late", &DeleteParams::default()).await;
    namespace.delete().await
}
