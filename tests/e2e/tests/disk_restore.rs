//! DiskRestore on the two-node local cluster: the operator (under the chart's account) turns it
//! into node work, and the node plugin reverts the volume with its engine once no consumer has it
//! attached. The consumer's attach path is the node's CSI socket (NodeStage/NodePublish of a block
//! volume, as kubelet does), and the data is checked with the checksummed writer's logs: each
//! phase writes every block of the first `BLOCKS` once with its own tag, so a point in time is
//! exactly one phase's log.
//!
//! While the volume is attached the revert waits (`Pending`, reason `VolumeInUse`) and changes
//! nothing, and NodeStage of the volume is refused (also by a node plugin restarted after kill -9,
//! which learns the waiting revert from the API server); once the consumer detached, the revert runs,
//! the volume reads exactly as the snapshot, and a newer snapshot still reads as it was taken.
//! Invalid references end in their condition, create no node work and change nothing; a
//! DiskRestore deleted while it waits never runs; one force-removed loses its node work too.
//!
//! The small harness here (a bound, attached disk; phases; snapshots; reading a snapshot back
//! through a volume restored from it) follows tests/disk_merge.rs.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use livedisk_api::internal::restore::LABEL_NAMESPACE;
use livedisk_api::internal::{LivediskRestore, RestorePhase};
use livedisk_api::{DiskRestore, DiskRestoreStatus, Phase};
use livedisk_csi_proto::csi::v1::NodeStageVolumeRequest;
use livedisk_e2e::csi::{attach_block, block_capability, detach_block, node, node_plugin_pid};
use livedisk_e2e::disks::{ScratchDir, host_device, must, pod, pvc, verifier};
use livedisk_e2e::operator::Operator;
use livedisk_e2e::phases::take_snapshot;
use livedisk_e2e::{TestNamespace, bound_volume, client, eventually};
use serde_json::{Value, json};

/// Blocks of 4 KiB each phase writes (4 MiB).
const BLOCKS: u64 = 1024;

/// The revert test kills a node plugin: the other test of this binary waits for it.
static NODES: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

fn restore(name: &str, claim: &str, snapshot: &str) -> Value {
    json!({"apiVersion": "livedisk.io/v1alpha1", "kind": "DiskRestore", "metadata": {"name": name},
           "spec": {"persistentVolumeClaimName": claim, "snapshotName": snapshot}})
}

/// A claim bound through a consumer pod on the scheduler's node.
struct Disk {
    volume_id: String,
    node: String,
}

/// An attachment of a disk through the node's CSI socket under kubelet-like paths named `tag`.
struct Attached {
    tag: String,
    device: String,
}

async fn bound_disk(
    client: &Client,
    ns: &str,
    claim: &str,
    node: Option<&str>,
    source: Option<&str>,
) -> Result<Disk> {
    must(client, ns, pvc(claim, source)).await?;
    let pod_name = format!("{claim}-consumer");
    must(client, ns, pod(&pod_name, claim, node)).await?;
    let (volume_id, node) = bound_volume(client, ns, claim, &pod_name).await?;
    Ok(Disk { volume_id, node })
}

async fn attach(disk: &Disk, tag: &str) -> Result<Attached> {
    let target = attach_block(&disk.node, &disk.volume_id, tag).await?;
    Ok(Attached {
        tag: tag.into(),
        device: host_device(&disk.node, &target)?,
    })
}

async fn detach(disk: &Disk, attached: &Attached) -> Result<()> {
    detach_block(&disk.node, &disk.volume_id, &attached.tag).await
}

fn log_path(dir: &Path, phase: u64) -> PathBuf {
    dir.join(format!("phase{phase}.log"))
}

/// One phase: every block of `0..BLOCKS` written once with the phase as its tag, logged.
fn write_phase(device: &str, phase: u64, dir: &Path) -> Result<()> {
    let blocks = BLOCKS.to_string();
    let output = verifier()?
        .args(["write", "--path", device, "--tag", &phase.to_string()])
        .args(["--blocks", &blocks, "--count", &blocks, "--log"])
        .arg(log_path(dir, phase))
        .output()?;
    anyhow::ensure!(
        output.status.success(),
        "writer: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

/// Checks that `device` holds exactly what phase `phase` wrote (every block of the phase).
fn verify(device: &str, phase: u64, dir: &Path) -> Result<()> {
    let output = verifier()?
        .args([
            "verify",
            "--path",
            device,
            "--tag",
            &phase.to_string(),
            "--log",
        ])
        .arg(log_path(dir, phase))
        .output()?;
    anyhow::ensure!(
        output.status.success(),
        "verify {device} against phase {phase}: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

/// Reads a snapshot back: a volume restored from its VolumeSnapshot (the standard PVC
/// `dataSource` path) on the same node, attached, checked against one phase's log, detached.
async fn verify_snapshot(
    client: &Client,
    ns: &str,
    snapshot: &str,
    node: &str,
    phase: u64,
    dir: &Path,
) -> Result<()> {
    let claim = format!("from-{snapshot}");
    let disk = bound_disk(client, ns, &claim, Some(node), Some(snapshot)).await?;
    let attached = attach(&disk, &format!("{ns}-{claim}")).await?;
    let result = verify(&attached.device, phase, dir);
    detach(&disk, &attached).await?;
    result.with_context(|| format!("snapshot {snapshot}"))
}

/// NodeStage of the disk at a second consumer's staging path, as kubelet would for another pod.
async fn stage_second(disk: &Disk, ns: &str) -> Result<Result<(), tonic::Status>> {
    let state = std::env::var("LIVEDISK_STATE_DIR")?;
    Ok(node(&disk.node)
        .await?
        .node_stage_volume(NodeStageVolumeRequest {
            volume_id: disk.volume_id.clone(),
            staging_target_path: format!("{state}/kubelet/{}/staging/{ns}-second", disk.node),
            volume_capability: Some(block_capability()),
            ..Default::default()
        })
        .await
        .map(|_| ()))
}

/// Whether NodeStage refused the volume for the DiskRestore `ns/name`.
fn refused_for(result: &Result<(), tonic::Status>, ns: &str, name: &str) -> Result<()> {
    let Err(status) = result else {
        anyhow::bail!("NodeStage staged a volume whose revert waits");
    };
    anyhow::ensure!(
        status.code() == tonic::Code::FailedPrecondition
            && status
                .message()
                .contains(&format!("DiskRestore {ns}/{name}")),
        "NodeStage answered {status:?}"
    );
    Ok(())
}

/// The Ready condition's (status, reason, message) and the Stalled condition's status.
fn conditions(status: &DiskRestoreStatus) -> (String, String, String, String) {
    let find = |t: &str| status.conditions.iter().find(|c| c.type_ == t);
    let ready = find("Ready");
    (
        ready.map(|c| c.status.clone()).unwrap_or_default(),
        ready.map(|c| c.reason.clone()).unwrap_or_default(),
        ready.map(|c| c.message.clone()).unwrap_or_default(),
        find("Stalled")
            .map(|c| c.status.clone())
            .unwrap_or_default(),
    )
}

/// Waits until the DiskRestore's Ready reason is `reason`.
async fn wait_reason(
    restores: &Api<DiskRestore>,
    name: &str,
    reason: &str,
    operator: &Operator,
) -> Result<DiskRestoreStatus> {
    eventually(120, &format!("DiskRestore {name}: {reason}"), || async {
        let status = restores.get(name).await?.status.unwrap_or_default();
        Ok((conditions(&status).1 == reason).then_some(status))
    })
    .await
    .with_context(|| operator.log())
}

/// The node work of the DiskRestores of namespace `ns`.
async fn works_of(client: &Client, ns: &str) -> Result<Vec<LivediskRestore>> {
    let works: Api<LivediskRestore> = Api::all(client.clone());
    let selector = format!("{LABEL_NAMESPACE}={ns}");
    Ok(works
        .list(&ListParams::default().labels(&selector))
        .await?
        .items)
}

/// Deletes the DiskRestores while the operator runs (its finalizer removes their node work),
/// then the consumer pods (no kubelet runs here: only forced) and the namespace.
async fn finish(client: &Client, namespace: TestNamespace, operator: Operator) -> Result<()> {
    let ns = namespace.name.clone();
    let restores: Api<DiskRestore> = Api::namespaced(client.clone(), &ns);
    for r in restores.list(&Default::default()).await? {
        restores
            .delete(&r.name_any(), &DeleteParams::default())
            .await?;
    }
    eventually(90, "the DiskRestores and their node work to go", || async {
        let left = restores.list(&Default::default()).await?.items.len()
            + works_of(client, &ns).await?.len();
        Ok((left == 0).then_some(()))
    })
    .await
    .with_context(|| operator.log())?;
    drop(operator);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let now = DeleteParams {
        grace_period_seconds: Some(0),
        ..Default::default()
    };
    for pod in pods.list(&Default::default()).await? {
        let _ = pods.delete(&pod.name_any(), &now).await;
    }
    namespace.delete().await
}

#[tokio::test]
async fn a_revert_waits_for_the_consumer_then_restores_the_snapshot_and_keeps_newer_ones()
-> Result<()> {
    let _nodes = NODES.write().await;
    let client = client().await?;
    let operator = Operator::start()?;
    let namespace = TestNamespace::create(&client, "restore").await?;
    let ns = namespace.name.clone();
    let dir = ScratchDir::new("restore")?;
    let dir = dir.0.as_path();
    let disk = bound_disk(&client, &ns, "vm-disk", None, None).await?;
    let consumer = attach(&disk, &format!("{ns}-consumer")).await?;
    // Phase 1, s1, phase 2, s2, phase 3 (written after the newest snapshot).
    write_phase(&consumer.device, 1, dir)?;
    take_snapshot(&client, &ns, "s1", "vm-disk").await?;
    write_phase(&consumer.device, 2, dir)?;
    take_snapshot(&client, &ns, "s2", "vm-disk").await?;
    write_phase(&consumer.device, 3, dir)?;

    // Attached: the revert waits, says why, and changes nothing.
    must(&client, &ns, restore("back", "vm-disk", "s1")).await?;
    let restores: Api<DiskRestore> = Api::namespaced(client.clone(), &ns);
    let status = wait_reason(&restores, "back", "VolumeInUse", &operator).await?;
    let (ready, _, message, stalled) = conditions(&status);
    assert_eq!(status.phase, Phase::Pending);
    assert_eq!((ready.as_str(), stalled.as_str()), ("False", "False"));
    assert!(
        message.contains(&disk.volume_id) && message.contains(&disk.node),
        "the message names the volume and the node that has it attached: {message}"
    );
    let works = works_of(&client, &ns).await?;
    assert_eq!(works.len(), 1, "one node work");
    assert_eq!(
        works[0].status.as_ref().map(|s| s.phase),
        Some(RestorePhase::Pending)
    );
    verify(&consumer.device, 3, dir).context("the waiting revert changed the volume")?;

    // A second consumer's NodeStage is refused while the revert waits, naming the DiskRestore.
    refused_for(&stage_second(&disk, &ns).await?, &ns, "back")?;
    // Also by a node plugin restarted after kill -9: it learns the waiting revert from the API
    // server, not from its memory.
    let plugin = node_plugin_pid(&disk.node)?.context("no node plugin")?;
    // SAFETY: kill(2) only sends a signal, to the node plugin process found above.
    anyhow::ensure!(
        unsafe { libc::kill(plugin, libc::SIGKILL) } == 0,
        "kill -9 node plugin"
    );
    eventually(
        90,
        "the node plugin to be restarted and answer NodeStage",
        || async {
            if node_plugin_pid(&disk.node)?.is_none_or(|pid| pid == plugin) {
                return Ok(None);
            }
            match node(&disk.node).await {
                Ok(_) => Ok(Some(())),
                Err(_) => Ok(None),
            }
        },
    )
    .await?;
    let after_restart = eventually(60, "an answer from the restarted node plugin", || async {
        Ok(match stage_second(&disk, &ns).await? {
            Err(s) if s.code() == tonic::Code::Unavailable => None,
            other => Some(other),
        })
    })
    .await?;
    refused_for(&after_restart, &ns, "back")?;
    verify(&consumer.device, 3, dir).context("the waiting revert changed the volume")?;

    // The consumer goes: the revert runs and completes.
    detach(&disk, &consumer).await?;
    let status = eventually(120, "DiskRestore back Completed", || async {
        let status = restores.get("back").await?.status.unwrap_or_default();
        anyhow::ensure!(
            status.phase != Phase::Failed,
            "DiskRestore failed: {:?}",
            status.conditions
        );
        Ok((status.phase == Phase::Completed).then_some(status))
    })
    .await
    .with_context(|| operator.log())?;
    let (ready, reason, message, _) = conditions(&status);
    assert_eq!(
        (ready.as_str(), reason.as_str()),
        ("True", "Restored"),
        "{message}"
    );

    // Attached again, the volume reads phase 1 exactly; s2 (newer than s1) still reads phase 2
    // and s1 phase 1.
    let again = attach(&disk, &format!("{ns}-again")).await?;
    verify(&again.device, 1, dir).context("the reverted volume")?;
    detach(&disk, &again).await?;
    verify_snapshot(&client, &ns, "s2", &disk.node, 2, dir).await?;
    verify_snapshot(&client, &ns, "s1", &disk.node, 1, dir).await?;
    finish(&client, namespace, operator).await
}

#[tokio::test]
async fn invalid_references_end_in_their_condition_and_change_nothing() -> Result<()> {
    let _nodes = NODES.read().await;
    let client = client().await?;
    let operator = Operator::start()?;
    let namespace = TestNamespace::create(&client, "restore-refs").await?;
    let ns = namespace.name.clone();
    let dir = ScratchDir::new("restore-refs")?;
    let dir = dir.0.as_path();
    let disk = bound_disk(&client, &ns, "vm-disk", None, None).await?;
    let consumer = attach(&disk, &format!("{ns}-consumer")).await?;
    write_phase(&consumer.device, 1, dir)?;
    take_snapshot(&client, &ns, "s1", "vm-disk").await?;
    write_phase(&consumer.device, 2, dir)?;
    // Another claim's snapshot, and a claim of another driver.
    let _other = bound_disk(&client, &ns, "other", Some(&disk.node), None).await?;
    take_snapshot(&client, &ns, "o1", "other").await?;
    must(&client, &ns, json!({"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": format!("{ns}-foreign")},
        "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"], "volumeMode": "Block",
                 "persistentVolumeReclaimPolicy": "Retain", "storageClassName": "",
                 "claimRef": {"namespace": ns, "name": "foreign"},
                 "csi": {"driver": "other.example.com", "volumeHandle": "h-1"}}})).await?;
    must(&client, &ns, json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "foreign"},
        "spec": {"storageClassName": "", "volumeName": format!("{ns}-foreign"), "volumeMode": "Block",
                 "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}})).await?;
    // The consumer is detached, so only the references stand in the way of a revert.
    detach(&disk, &consumer).await?;

    let restores: Api<DiskRestore> = Api::namespaced(client.clone(), &ns);
    // (name, claim, snapshot, reason, Stalled, phase)
    let cases = [
        (
            "no-claim",
            "missing",
            "s1",
            "ReferenceNotFound",
            "False",
            Phase::Pending,
        ),
        (
            "no-snapshot",
            "vm-disk",
            "nope",
            "ReferenceNotFound",
            "False",
            Phase::Pending,
        ),
        (
            "foreign-snapshot",
            "vm-disk",
            "o1",
            "SnapshotOfAnotherVolume",
            "True",
            Phase::Failed,
        ),
        (
            "other-driver",
            "foreign",
            "s1",
            "OtherDriver",
            "True",
            Phase::Failed,
        ),
    ];
    for (name, claim, snapshot, reason, stalled, phase) in cases {
        must(&client, &ns, restore(name, claim, snapshot)).await?;
        let status = wait_reason(&restores, name, reason, &operator).await?;
        let (ready, _, message, stalled_now) = conditions(&status);
        assert_eq!(ready, "False", "{name}: {message}");
        assert_eq!(stalled_now, stalled, "{name}: {:?}", status.conditions);
        assert_eq!(status.phase, phase, "{name}");
        assert!(
            message.contains("nothing was reverted"),
            "{name}: {message}"
        );
    }
    // A refused DiskRestore keeps being refused (the operator looked again meanwhile), got no
    // node work and no finalizer, and the volume is as phase 2 left it.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        works_of(&client, &ns).await?.is_empty(),
        "node work for an invalid restore"
    );
    for r in restores.list(&Default::default()).await? {
        assert!(
            r.finalizers().is_empty(),
            "{} has a finalizer",
            r.name_any()
        );
    }
    let look = attach(&disk, &format!("{ns}-look")).await?;
    verify(&look.device, 2, dir).context("an invalid restore changed the volume")?;

    // A valid DiskRestore deleted while it waits for the consumer never runs: its node work goes,
    // the volume stages again, and it still reads as phase 2 left it.
    must(&client, &ns, restore("withdrawn", "vm-disk", "s1")).await?;
    wait_reason(&restores, "withdrawn", "VolumeInUse", &operator).await?;
    restores
        .delete("withdrawn", &DeleteParams::default())
        .await?;
    eventually(
        60,
        "the withdrawn DiskRestore and its node work to go",
        || async {
            let gone = restores.get_opt("withdrawn").await?.is_none()
                && works_of(&client, &ns).await?.is_empty();
            Ok(gone.then_some(()))
        },
    )
    .await
    .with_context(|| operator.log())?;
    // One force-removed (finalizers stripped, then deleted) is never reconciled again: the
    // operator's sweep deletes its orphaned node work, so NodeStage is no longer refused.
    must(&client, &ns, restore("forced", "vm-disk", "s1")).await?;
    wait_reason(&restores, "forced", "VolumeInUse", &operator).await?;
    restores
        .patch(
            "forced",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": null}})),
        )
        .await?;
    restores.delete("forced", &DeleteParams::default()).await?;
    eventually(
        90,
        "the orphaned node work of a force-removed DiskRestore to go",
        || async { Ok(works_of(&client, &ns).await?.is_empty().then_some(())) },
    )
    .await
    .with_context(|| operator.log())?;
    detach(&disk, &look).await?;
    let again = attach(&disk, &format!("{ns}-again")).await?;
    let unchanged = verify(&again.device, 2, dir);
    detach(&disk, &again).await?;
    unchanged.context("a withdrawn restore changed the volume")?;
    finish(&client, namespace, operator).await
}
