//! DiskMerge on the two-node local cluster, from the example manifest: the operator (under the
//! chart's account) turns it into node work, the node plugin merges with its engine while the
//! checksummed writer writes through the node's attach path (NodeStage/NodePublish of a block
//! volume, as kubelet does), and the volume and every surviving snapshot (read back through a
//! restored volume) equal the writer's logs. Invalid references end in a clear condition and
//! change nothing; a cancelled Commit ends `Cancelled` with the other snapshots intact, and
//! deleting the snapshot being merged finishes its merge; a raised `bandwidthLimit` applies to the
//! running job; a merge survives kill -9 of the operator and of the node plugin.
//!
//! Each phase of writing writes every block of the first `BLOCKS` once with its own tag, then a
//! snapshot is taken, so a snapshot's view is exactly one phase's log. During the merge a writer
//! keeps writing the first half of the blocks; the second half keeps the last phase's data.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::{PersistentVolume, Pod};
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::{Client, ResourceExt};
use livedisk_api::internal::{LivediskMerge, LivediskSnapshot};
use livedisk_api::{DiskMerge, DiskSnapshot, Phase};
use livedisk_e2e::csi::{attach_block, detach_block, node_plugin_pid};
use livedisk_e2e::disks::{ScratchDir, host_device, must, pod, pvc_of_size, verifier};
use livedisk_e2e::operator::Operator;
use livedisk_e2e::phases::{log_from_block, verify, write_phase};
use livedisk_e2e::{
    TestNamespace, bound_volume, client, eventually, parse_manifests, workspace_root,
};
use serde_json::{Value, json};

/// Blocks of 4 KiB each phase writes (8 MiB: a layer a rate-limited merge takes seconds on).
const BLOCKS: u64 = 2048;

/// The DiskMerge of examples/20-diskmerge.yaml, with the test's claim, range and mode.
fn merge_from_example(
    name: &str,
    claim: &str,
    mode: &str,
    base: Option<&str>,
    top: Option<&str>,
    bandwidth: Option<&str>,
) -> Result<Value> {
    let text = std::fs::read_to_string(workspace_root().join("examples/20-diskmerge.yaml"))?;
    let mut merge = parse_manifests(&text)?
        .into_iter()
        .find(|o| o["kind"] == "DiskMerge")
        .context("no DiskMerge in the example")?;
    merge["metadata"]["name"] = json!(name);
    let spec = &mut merge["spec"];
    spec["persistentVolumeClaimName"] = json!(claim);
    spec["mode"] = json!(mode);
    let object = spec.as_object_mut().context("spec")?;
    for (key, value) in [
        ("baseSnapshotName", base),
        ("topSnapshotName", top),
        ("bandwidthLimit", bandwidth),
    ] {
        match value {
            Some(v) => {
                object.insert(key.into(), json!(v));
            }
            None => {
                object.remove(key);
            }
        }
    }
    Ok(merge)
}

/// A claim bound through a consumer pod on the scheduler's node, attached as kubelet would.
struct Disk {
    claim: String,
    /// kubelet's staging/publish directory name: unique across the tests running at once.
    tag: String,
    volume_id: String,
    node: String,
    device: String,
}

async fn bound_disk(
    client: &Client,
    ns: &str,
    claim: &str,
    node: Option<&str>,
    source: Option<&str>,
) -> Result<Disk> {
    bound_disk_of_size(client, ns, claim, node, source, "64Mi").await
}

async fn bound_disk_of_size(
    client: &Client,
    ns: &str,
    claim: &str,
    node: Option<&str>,
    source: Option<&str>,
    size: &str,
) -> Result<Disk> {
    must(client, ns, pvc_of_size(claim, source, size)).await?;
    let pod_name = format!("{claim}-consumer");
    must(client, ns, pod(&pod_name, claim, node)).await?;
    let (volume_id, node) = bound_volume(client, ns, claim, &pod_name).await?;
    let tag = format!("{ns}-{claim}");
    let target = attach_block(&node, &volume_id, &tag).await?;
    let device = host_device(&node, &target)?;
    Ok(Disk {
        claim: claim.into(),
        tag,
        volume_id,
        node,
        device,
    })
}

fn log_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.log"))
}

/// A writer over the first half of the blocks until `stop` exists.
fn start_writer(device: &str, tag: u64, log: &Path, stop: &Path) -> Result<Child> {
    Ok(verifier()?
        .args([
            "write",
            "--path",
            device,
            "--tag",
            &tag.to_string(),
            "--blocks",
            &(BLOCKS / 2).to_string(),
        ])
        .arg("--until-file")
        .arg(stop)
        .arg("--log")
        .arg(log)
        .spawn()?)
}

fn stop_writer(mut child: Child, stop: &Path) -> Result<()> {
    std::fs::write(stop, b"")?;
    let status = child.wait()?;
    anyhow::ensure!(status.success(), "the writer failed: {status}");
    Ok(())
}

/// The volume now: the merge writer's log for the first half, the last phase's for the rest.
fn verify_volume(device: &str, dir: &Path, writer_tag: u64, last_phase: u64) -> Result<()> {
    verify(
        device,
        writer_tag,
        &log_path(dir, &format!("phase{writer_tag}")),
    )?;
    let rest = log_path(dir, "rest");
    log_from_block(
        &log_path(dir, &format!("phase{last_phase}")),
        BLOCKS / 2,
        &rest,
    )?;
    verify(device, last_phase, &rest)
}

async fn take_snapshot(
    client: &Client,
    ns: &str,
    name: &str,
    claim: &str,
    retain: bool,
) -> Result<()> {
    let mut spec = json!({"source": {"persistentVolumeClaimName": claim}});
    if retain {
        spec["deletionPolicy"] = json!("Retain");
    }
    take_snapshot_with(client, ns, name, spec).await?;
    if retain {
        // The operator sets Retain on the content once the snapshot is ready.
        let contents = contents(client);
        eventually(60, "the content to say Retain", || async {
            let vs = volume_snapshots(client, ns).get(name).await?;
            let Some(content) = vs.data["status"]["boundVolumeSnapshotContentName"].as_str() else {
                return Ok(None);
            };
            Ok(
                (contents.get(content).await?.data["spec"]["deletionPolicy"] == "Retain")
                    .then_some(()),
            )
        })
        .await?;
    }
    Ok(())
}

/// Applies a DiskSnapshot of `spec` and waits until it is Ready.
async fn take_snapshot_with(
    client: &Client,
    ns: &str,
    name: &str,
    spec: Value,
) -> Result<livedisk_api::DiskSnapshotStatus> {
    must(
        client,
        ns,
        json!({"apiVersion": "livedisk.io/v1alpha1", "kind": "DiskSnapshot",
        "metadata": {"name": name}, "spec": spec}),
    )
    .await?;
    let snapshots: Api<DiskSnapshot> = Api::namespaced(client.clone(), ns);
    eventually(90, &format!("DiskSnapshot {name} Ready"), || async {
        let status = snapshots.get(name).await?.status.unwrap_or_default();
        Ok((status.phase == Phase::Ready).then_some(status))
    })
    .await
}

fn volume_snapshots(client: &Client, ns: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("snapshot.storage.k8s.io", "v1", "VolumeSnapshot");
    Api::namespaced_with(client.clone(), ns, &ApiResource::from_gvk(&gvk))
}

fn contents(client: &Client) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("snapshot.storage.k8s.io", "v1", "VolumeSnapshotContent");
    Api::all_with(client.clone(), &ApiResource::from_gvk(&gvk))
}

async fn snapshot_handle(client: &Client, ns: &str, name: &str) -> Result<String> {
    let vs = volume_snapshots(client, ns).get(name).await?;
    let content = vs.data["status"]["boundVolumeSnapshotContentName"]
        .as_str()
        .context("unbound")?;
    contents(client).get(content).await?.data["status"]["snapshotHandle"]
        .as_str()
        .map(str::to_string)
        .context("no snapshotHandle")
}

/// Reads a snapshot back: a volume restored from its VolumeSnapshot on the same node, attached,
/// checked against one phase's log, detached.
async fn verify_snapshot(
    client: &Client,
    ns: &str,
    snapshot: &str,
    node: &str,
    tag: u64,
    dir: &Path,
) -> Result<()> {
    let claim = format!("restore-{snapshot}");
    let disk = bound_disk(client, ns, &claim, Some(node), Some(snapshot)).await?;
    let result = verify(&disk.device, tag, &log_path(dir, &format!("phase{tag}")));
    detach_block(&disk.node, &disk.volume_id, &disk.tag).await?;
    result.with_context(|| format!("snapshot {snapshot}"))
}

/// The engine's record of a volume, as it is in the node's pool.
fn record(node: &str, volume_id: &str) -> Result<Value> {
    let state = std::env::var("LIVEDISK_STATE_DIR")?;
    let path = format!("{state}/nodes/{node}/pool/{volume_id}/record.json");
    Ok(serde_json::from_slice(
        &std::fs::read(&path).context(path)?,
    )?)
}

/// Reads a snapshot's point in time straight from the node's pool (the qcow2 chain up to the
/// layer the snapshot sealed, opened read-only beside the engine with `qemu-img -U`) and checks
/// it against one phase's log: no livedisk code on the read path, and no restore (which the
/// engine refuses while a cancelled merge waits on the volume).
fn verify_snapshot_in_pool(
    node: &str,
    volume_id: &str,
    handle: &str,
    tag: u64,
    dir: &Path,
) -> Result<()> {
    let raw = snapshot_raw(node, volume_id, handle, dir)?;
    let result = verify(&raw, tag, &log_path(dir, &format!("phase{tag}")));
    let _ = std::fs::remove_file(&raw);
    result.with_context(|| format!("snapshot {handle} read from the pool"))
}

/// A snapshot's point-in-time view read from the node's layer files by `qemu-img` (not through
/// livedisk), as a raw file in `dir`.
fn snapshot_raw(node: &str, volume_id: &str, handle: &str, dir: &Path) -> Result<PathBuf> {
    let rec = record(node, volume_id)?;
    let seq = rec["layers"]
        .as_array()
        .and_then(|l| l.iter().find(|l| l["sealed_by"] == handle))
        .and_then(|l| l["seq"].as_u64())
        .with_context(|| format!("no layer sealed by {handle}: {rec}"))?;
    let state = std::env::var("LIVEDISK_STATE_DIR")?;
    let layer = format!("{state}/nodes/{node}/pool/{volume_id}/layer-{seq}.qcow2");
    let raw = dir.join(format!("{handle}.raw"));
    let output = Command::new("qemu-img")
        .args(["convert", "-U", "-f", "qcow2", "-O", "raw", &layer])
        .arg(&raw)
        .output()?;
    anyhow::ensure!(
        output.status.success(),
        "qemu-img: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(raw)
}

/// Whether bytes `from..from + len` of `a` and `b` are equal (cmp(1)).
fn same_bytes(a: &Path, b: &Path, from: u64, len: u64) -> Result<()> {
    let output = Command::new("cmp")
        .arg(format!("--ignore-initial={from}"))
        .arg(format!("--bytes={len}"))
        .arg(a)
        .arg(b)
        .output()?;
    anyhow::ensure!(
        output.status.success(),
        "{} and {} differ in {from}+{len}: {}{}",
        a.display(),
        b.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

/// Writes `file` to the start of `device` (dd, 4 MiB direct writes, synced).
fn write_file(device: &str, file: &Path) -> Result<()> {
    let output = Command::new("dd")
        .arg(format!("if={}", file.display()))
        .arg(format!("of={device}"))
        .args(["bs=4M", "oflag=direct", "conv=fsync,notrunc", "status=none"])
        .output()?;
    anyhow::ensure!(
        output.status.success(),
        "dd: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

/// Watches a DiskMerge's status in the background: the largest `progress.bytesDone` seen while
/// `Running`.
fn watch_progress(
    merges: Api<DiskMerge>,
    name: String,
) -> (Arc<AtomicI64>, tokio::task::JoinHandle<()>) {
    let seen = Arc::new(AtomicI64::new(-1));
    let out = seen.clone();
    let task = tokio::spawn(async move {
        loop {
            if let Ok(m) = merges.get(&name).await
                && let Some(s) = m.status
            {
                if s.phase == Phase::Running
                    && let Some(p) = s.progress
                {
                    out.fetch_max(p.bytes_done, Ordering::SeqCst);
                }
                if matches!(s.phase, Phase::Completed | Phase::Failed | Phase::Cancelled) {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    });
    (seen, task)
}

async fn wait_phase(
    merges: &Api<DiskMerge>,
    name: &str,
    phase: Phase,
    operator: &Operator,
) -> Result<livedisk_api::DiskMergeStatus> {
    eventually(240, &format!("DiskMerge {name} {phase:?}"), || async {
        let status = merges.get(name).await?.status.unwrap_or_default();
        if matches!(
            status.phase,
            Phase::Completed | Phase::Failed | Phase::Cancelled
        ) && status.phase != phase
        {
            anyhow::bail!(
                "DiskMerge {name} ended {:?}: {:?}",
                status.phase,
                status.conditions
            );
        }
        Ok((status.phase == phase).then_some(status))
    })
    .await
    .with_context(|| operator.log())
}

fn ready_reason(status: &livedisk_api::DiskMergeStatus) -> (String, String, String) {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
        .unwrap_or_default()
}

async fn gone_objects(client: &Client, ns: &str, names: &[&str], handles: &[String]) -> Result<()> {
    let disk_snapshots: Api<DiskSnapshot> = Api::namespaced(client.clone(), ns);
    let internal: Api<LivediskSnapshot> = Api::all(client.clone());
    let vs = volume_snapshots(client, ns);
    eventually(120, "the merged snapshots' objects to go", || async {
        for name in names {
            if disk_snapshots.get_opt(name).await?.is_some() || vs.get_opt(name).await?.is_some() {
                return Ok(None);
            }
        }
        for handle in handles {
            if internal.get_opt(handle).await?.is_some() {
                return Ok(None);
            }
        }
        Ok(Some(()))
    })
    .await
}

/// The restart test kills a node plugin: it runs alone, the other tests of this binary beside
/// one another.
static NODES: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

#[allow(dead_code)] // Held, never read.
enum NodeUse {
    Shared(tokio::sync::RwLockReadGuard<'static, ()>),
    Exclusive(tokio::sync::RwLockWriteGuard<'static, ()>),
}

struct Setup {
    _nodes: NodeUse,
    client: Client,
    namespace: TestNamespace,
    ns: String,
    operator: Operator,
    disk: Disk,
    dir: ScratchDir,
}

/// A namespace, the operator, an attached disk, and `phases` phases each followed by a snapshot
/// `s<phase>`.
async fn setup(prefix: &str, phases: u64) -> Result<Setup> {
    setup_with(prefix, phases, NodeUse::Shared(NODES.read().await)).await
}

async fn setup_with(prefix: &str, phases: u64, nodes: NodeUse) -> Result<Setup> {
    setup_sized(prefix, phases, nodes, "64Mi").await
}

async fn setup_sized(prefix: &str, phases: u64, nodes: NodeUse, size: &str) -> Result<Setup> {
    let client = client().await?;
    let operator = Operator::start()?;
    let namespace = TestNamespace::create(&client, prefix).await?;
    let ns = namespace.name.clone();
    let disk = bound_disk_of_size(&client, &ns, "vm-disk", None, None, size).await?;
    let dir = ScratchDir::new(prefix)?;
    for phase in 1..=phases {
        write_phase(
            &disk.device,
            phase,
            BLOCKS,
            &log_path(&dir.0, &format!("phase{phase}")),
        )?;
        take_snapshot(&client, &ns, &format!("s{phase}"), &disk.claim, false).await?;
    }
    Ok(Setup {
        _nodes: nodes,
        client,
        namespace,
        ns,
        operator,
        disk,
        dir,
    })
}

impl Setup {
    /// kill -9 of the operator and of the disk's node plugin; a new operator is started, and
    /// the node plugin is back once its supervisor restarted it (as kubelet would).
    async fn kill_operator_and_node_plugin(&mut self) -> Result<()> {
        self.operator.signal(libc::SIGKILL)?;
        let plugin = node_plugin_pid(&self.disk.node)?.context("no node plugin")?;
        // SAFETY: kill(2) only sends a signal, to the node plugin process found above.
        anyhow::ensure!(
            unsafe { libc::kill(plugin, libc::SIGKILL) } == 0,
            "kill -9 node plugin"
        );
        let killed = std::mem::replace(&mut self.operator, Operator::start()?);
        drop(killed);
        let node = self.disk.node.clone();
        eventually(90, "the node plugin to be restarted", || async {
            Ok(node_plugin_pid(&node)?.filter(|pid| *pid != plugin))
        })
        .await?;
        Ok(())
    }

    async fn finish(self) -> Result<()> {
        // A snapshot deletion of the test's cleanup may hold the volume for a moment (ABORTED,
        // retried as kubelet retries).
        let disk = &self.disk;
        eventually(60, "the disk to detach", || async {
            match detach_block(&disk.node, &disk.volume_id, &disk.tag).await {
                Ok(()) => Ok(Some(())),
                Err(e)
                    if e.downcast_ref::<tonic::Status>()
                        .is_some_and(|s| s.code() == tonic::Code::Aborted) =>
                {
                    Ok(None)
                }
                Err(e) => Err(e),
            }
        })
        .await?;
        // The DiskMerges go while the operator runs: its finalizer removes their node work.
        let merges: Api<DiskMerge> = Api::namespaced(self.client.clone(), &self.ns);
        // A merge the test deleted itself may finish going between the list and the delete.
        for merge in merges.list(&Default::default()).await? {
            match merges
                .delete(&merge.name_any(), &DeleteParams::default())
                .await
            {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
        eventually(90, "the DiskMerges to go", || async {
            Ok(merges
                .list(&Default::default())
                .await?
                .items
                .is_empty()
                .then_some(()))
        })
        .await
        .with_context(|| self.operator.log())?;
        drop(self.operator);
        // No kubelet runs here: the consumer pods only go when forced.
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.ns);
        let now = DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        };
        for pod in pods.list(&Default::default()).await? {
            let _ = pods.delete(&pod.name_any(), &now).await;
        }
        self.namespace.delete().await
    }
}

#[tokio::test]
async fn commit_merges_the_range_into_the_base_while_the_writer_runs() -> Result<()> {
    let s = setup("merge-commit", 3).await?;
    let (client, ns, dir) = (&s.client, s.ns.as_str(), s.dir.0.as_path());
    let handles = [
        snapshot_handle(client, ns, "s1").await?,
        snapshot_handle(client, ns, "s2").await?,
    ];
    let stop = dir.join("stop");
    let writer = start_writer(&s.disk.device, 4, &log_path(dir, "phase4"), &stop)?;
    // s1 and s2 go; s3's point in time survives in s1's layer. A limit keeps it running long
    // enough to see progress.
    must(
        client,
        ns,
        merge_from_example(
            "flatten",
            "vm-disk",
            "Commit",
            Some("s1"),
            Some("s3"),
            Some("8Mi"),
        )?,
    )
    .await?;
    let merges: Api<DiskMerge> = Api::namespaced(client.clone(), ns);
    let (seen, watcher) = watch_progress(merges.clone(), "flatten".into());
    let status = wait_phase(&merges, "flatten", Phase::Completed, &s.operator).await?;
    let _ = watcher.await;
    stop_writer(writer, &stop)?;
    assert!(
        seen.load(Ordering::SeqCst) > 0,
        "no progress seen while Running"
    );
    let (ready, reason, message) = ready_reason(&status);
    assert_eq!(
        (ready.as_str(), reason.as_str()),
        ("True", "MergeCompleted"),
        "{message}"
    );
    assert_eq!(status.merged_snapshots, ["s1", "s2"]);
    assert_eq!(status.node_name.as_deref(), Some(s.disk.node.as_str()));
    assert_eq!(status.progress.as_ref().map(|p| p.percent), Some(100));
    assert!(status.start_time.is_some() && status.completion_time.is_some());
    assert!(message.contains("deleted"), "{message}");
    gone_objects(client, ns, &["s1", "s2"], &handles).await?;
    // The volume equals the writer's logs, and s3 reads back as phase 3 wrote it.
    verify_volume(&s.disk.device, dir, 4, 3)?;
    verify_snapshot(client, ns, "s3", &s.disk.node, 3, dir).await?;
    s.finish().await
}

#[tokio::test]
async fn stream_pulls_the_newest_snapshots_into_the_volume_while_the_writer_runs() -> Result<()> {
    let s = setup("merge-stream", 3).await?;
    let (client, ns, dir) = (&s.client, s.ns.as_str(), s.dir.0.as_path());
    let handles = [
        snapshot_handle(client, ns, "s2").await?,
        snapshot_handle(client, ns, "s3").await?,
    ];
    let stop = dir.join("stop");
    let writer = start_writer(&s.disk.device, 4, &log_path(dir, "phase4"), &stop)?;
    must(
        client,
        ns,
        merge_from_example(
            "pull-up",
            "vm-disk",
            "Stream",
            Some("s2"),
            None,
            Some("8Mi"),
        )?,
    )
    .await?;
    let merges: Api<DiskMerge> = Api::namespaced(client.clone(), ns);
    let (seen, watcher) = watch_progress(merges.clone(), "pull-up".into());
    let status = wait_phase(&merges, "pull-up", Phase::Completed, &s.operator).await?;
    let _ = watcher.await;
    stop_writer(writer, &stop)?;
    assert!(
        seen.load(Ordering::SeqCst) > 0,
        "no progress seen while Running"
    );
    // Newest first: s3's layer, then s2's, pulled up into the active layer.
    assert_eq!(status.merged_snapshots, ["s3", "s2"]);
    gone_objects(client, ns, &["s2", "s3"], &handles).await?;
    verify_volume(&s.disk.device, dir, 4, 3)?;
    verify_snapshot(client, ns, "s1", &s.disk.node, 1, dir).await?;
    s.finish().await
}

#[tokio::test]
async fn a_cancelled_commit_keeps_every_other_snapshot_and_invalid_references_change_nothing()
-> Result<()> {
    let s = setup("merge-cancel", 3).await?;
    let (client, ns, dir) = (&s.client, s.ns.as_str(), s.dir.0.as_path());
    let merges: Api<DiskMerge> = Api::namespaced(client.clone(), ns);
    // This namespace's node work only: the other tests of this binary run beside this one and
    // make merges of their own.
    let works: Api<LivediskMerge> = Api::all(client.clone());
    let ours =
        kube::api::ListParams::default().labels(&format!("livedisk.io/diskmerge-namespace={ns}"));
    let works_before = works.list(&ours).await?.items.len();

    // Invalid references: a clear condition, no node work, every snapshot still there.
    take_snapshot(client, ns, "kept", "vm-disk", true).await?;
    must(client, ns, json!({"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": format!("{ns}-foreign")},
        "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"], "volumeMode": "Block",
                 "persistentVolumeReclaimPolicy": "Retain", "storageClassName": "",
                 "claimRef": {"namespace": ns, "name": "foreign"},
                 "csi": {"driver": "other.example.com", "volumeHandle": "h-1"}}})).await?;
    must(client, ns, json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "foreign"},
        "spec": {"storageClassName": "", "volumeName": format!("{ns}-foreign"), "volumeMode": "Block",
                 "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}})).await?;
    // A snapshot of another claim's volume, for a range across two volumes.
    let other = bound_disk(client, ns, "other", Some(&s.disk.node), None).await?;
    take_snapshot(client, ns, "o1", &other.claim, false).await?;
    let cases = [
        (
            "across",
            merge_from_example("across", "vm-disk", "Commit", Some("s1"), Some("o1"), None)?,
            "SnapshotOfAnotherVolume",
            "True",
        ),
        (
            "no-claim",
            merge_from_example("no-claim", "missing", "Commit", None, None, None)?,
            "ClaimNotFound",
            "False",
        ),
        (
            "other-driver",
            merge_from_example("other-driver", "foreign", "Commit", None, None, None)?,
            "OtherDriver",
            "True",
        ),
        (
            "over-retain",
            merge_from_example("over-retain", "vm-disk", "Commit", Some("s3"), None, None)?,
            "RetainedSnapshotInRange",
            "True",
        ),
        (
            "no-snapshot",
            merge_from_example("no-snapshot", "vm-disk", "Commit", Some("nope"), None, None)?,
            "SnapshotNotFound",
            "False",
        ),
    ];
    for (name, object, reason, stalled) in cases {
        must(client, ns, object).await?;
        let status = eventually(90, &format!("DiskMerge {name} refused"), || async {
            let status = merges.get(name).await?.status.unwrap_or_default();
            Ok((ready_reason(&status).1 == reason).then_some(status))
        })
        .await
        .with_context(|| s.operator.log())?;
        let stalled_now = status
            .conditions
            .iter()
            .find(|c| c.type_ == "Stalled")
            .map(|c| c.status.clone());
        assert_eq!(
            stalled_now.as_deref(),
            Some(stalled),
            "{name}: {:?}",
            status.conditions
        );
        assert!(status.merged_snapshots.is_empty());
    }
    assert_eq!(
        works.list(&ours).await?.items.len(),
        works_before,
        "no node work for invalid merges"
    );
    let disk_snapshots: Api<DiskSnapshot> = Api::namespaced(client.clone(), ns);
    for name in ["s1", "s2", "s3", "kept", "o1"] {
        assert!(
            disk_snapshots.get_opt(name).await?.is_some(),
            "{name} was touched"
        );
    }
    detach_block(&other.node, &other.volume_id, &other.tag).await?;

    // A rate-limited Commit of s1 (s2's 8 MiB layer into s1's), cancelled once it copied some.
    must(
        client,
        ns,
        merge_from_example(
            "slow",
            "vm-disk",
            "Commit",
            Some("s1"),
            Some("s2"),
            Some("512Ki"),
        )?,
    )
    .await?;
    eventually(120, "the slow merge to copy", || async {
        let status = merges.get("slow").await?.status.unwrap_or_default();
        Ok(
            (status.phase == Phase::Running && status.progress.is_some_and(|p| p.bytes_done > 0))
                .then_some(()),
        )
    })
    .await
    .with_context(|| s.operator.log())?;
    merges
        .patch(
            "slow",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"cancel": true}})),
        )
        .await?;
    let status = wait_phase(&merges, "slow", Phase::Cancelled, &s.operator).await?;
    let (ready, reason, message) = ready_reason(&status);
    assert_eq!(
        (ready.as_str(), reason.as_str()),
        ("False", "Cancelled"),
        "{message}"
    );
    assert!(
        message.contains("deleting"),
        "the engine's word on the snapshot being merged: {message}"
    );
    assert!(status.merged_snapshots.is_empty());
    assert!(
        disk_snapshots.get_opt("s1").await?.is_some(),
        "a cancelled merge deletes nothing"
    );
    // Every other snapshot reads back, and so does the volume; s1 stays `deleting` in the engine.
    let (vol, node) = (s.disk.volume_id.as_str(), s.disk.node.as_str());
    verify(&s.disk.device, 3, &log_path(dir, "phase3"))?;
    let s1 = snapshot_handle(client, ns, "s1").await?;
    let rec = record(node, vol)?;
    let state_of = |id: &str| {
        rec["snapshots"]
            .as_array()
            .and_then(|a| a.iter().find(|x| x["id"] == id))
            .map(|x| x["state"].clone())
    };
    assert_eq!(state_of(&s1), Some(json!("deleting")), "{rec}");
    for (name, tag) in [("s2", 2), ("s3", 3)] {
        let handle = snapshot_handle(client, ns, name).await?;
        assert_eq!(state_of(&handle), Some(json!("ready")), "{rec}");
        verify_snapshot_in_pool(node, vol, &handle, tag, dir)?;
    }
    // Asking again finishes it: deleting s1 deletes its snapshot, whose merge resumes.
    disk_snapshots
        .delete("s1", &DeleteParams::foreground())
        .await?;
    gone_objects(client, ns, &["s1"], std::slice::from_ref(&s1)).await?;
    verify_snapshot(client, ns, "s2", &s.disk.node, 2, dir).await?;
    verify(&s.disk.device, 3, &log_path(dir, "phase3"))?;
    // Deleting a DiskMerge removes its node work.
    let work_name = format!("merge-{}", merges.get("slow").await?.uid().context("uid")?);
    merges.delete("slow", &DeleteParams::default()).await?;
    eventually(90, "the node work to go", || async {
        Ok(works.get_opt(&work_name).await?.is_none().then_some(()))
    })
    .await?;
    // The retained snapshot is the administrator's to clean up.
    let kept = snapshot_handle(client, ns, "kept").await?;
    let kept_content = volume_snapshots(client, ns).get("kept").await?.data["status"]["boundVolumeSnapshotContentName"]
        .as_str()
        .map(str::to_string)
        .context("kept content")?;
    disk_snapshots
        .delete("kept", &DeleteParams::foreground())
        .await?;
    let _ = contents(client)
        .delete(&kept_content, &DeleteParams::default())
        .await;
    let internal: Api<LivediskSnapshot> = Api::all(client.clone());
    let _ = internal.delete(&kept, &DeleteParams::default()).await;
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let _ = pvs
        .delete(&format!("{ns}-foreign"), &DeleteParams::default())
        .await;
    s.finish().await
}

/// The changed blocks between two snapshots, as GetMetadataDelta answers them on the
/// controller's socket (what the snapshot-metadata sidecar serves): (offset, length) pairs.
async fn metadata_delta(base: &str, target: &str) -> Result<Vec<(u64, u64)>> {
    use livedisk_csi_proto::csi::v1::GetMetadataDeltaRequest;
    let mut metadata = livedisk_e2e::csi::snapshot_metadata().await?;
    let request = GetMetadataDeltaRequest {
        base_snapshot_id: base.into(),
        target_snapshot_id: target.into(),
        ..Default::default()
    };
    let mut stream = metadata.get_metadata_delta(request).await?.into_inner();
    let mut out = Vec::new();
    while let Some(message) = stream.message().await? {
        out.extend(
            message
                .block_metadata
                .iter()
                .map(|b| (b.byte_offset as u64, b.size_bytes as u64)),
        );
    }
    Ok(out)
}

/// Waits until the DiskMerge `name` runs and its current job copied at least a quarter of a
/// layer of at least 1 GiB.
async fn quarter_copied(merges: &Api<DiskMerge>, name: &str, operator: &Operator) -> Result<()> {
    eventually(300, "a quarter of the 1 GiB layer copied", || async {
        let status = merges.get(name).await?.status.unwrap_or_default();
        anyhow::ensure!(
            matches!(status.phase, Phase::Pending | Phase::Running),
            "{name} ended: {status:?}"
        );
        Ok(status
            .progress
            .filter(|p| p.bytes_total >= 1 << 30 && p.bytes_done * 4 >= p.bytes_total)
            .map(|_| ()))
    })
    .await
    .with_context(|| operator.log())
}

/// A Commit of a 1 GiB layer with the consumer attached: a DiskSnapshot taken while it copies
/// is Ready while the merge still runs (the engine stops the job, snapshots, starts it again);
/// the merge is then cancelled after a quarter of the layer was copied. Every other snapshot
/// reads back equal to the writer's logs (read from the layer files, not through livedisk),
/// the changed blocks between them stay right, and asking again finishes the merge.
#[tokio::test]
async fn a_1gib_commit_takes_a_snapshot_in_its_stride_and_cancels_after_a_quarter() -> Result<()> {
    const GIB: u64 = 1 << 30;
    let s = setup_sized(
        "merge-big",
        1,
        NodeUse::Shared(NODES.read().await),
        "1100Mi",
    )
    .await?;
    let (client, ns, dir) = (&s.client, s.ns.as_str(), s.dir.0.as_path());
    let (vol, node) = (s.disk.volume_id.as_str(), s.disk.node.as_str());
    let merges: Api<DiskMerge> = Api::namespaced(client.clone(), ns);
    // 1 GiB of random bytes, kept in a file as the ground truth of s2 (the checksummed writer's
    // 4 KiB synchronous writes would take minutes for that much).
    let data = dir.join("phase2.data");
    let output = Command::new("dd")
        .args(["if=/dev/urandom", "bs=4M", "count=256", "status=none"])
        .arg(format!("of={}", data.display()))
        .output()?;
    anyhow::ensure!(output.status.success(), "dd: {output:?}");
    write_file(&s.disk.device, &data)?;
    take_snapshot(client, ns, "s2", "vm-disk", false).await?;

    // Deleting s1 commits s2's 1 GiB layer into s1's, held at 64 MiB/s.
    must(
        client,
        ns,
        merge_from_example(
            "big",
            "vm-disk",
            "Commit",
            Some("s1"),
            Some("s2"),
            Some("64Mi"),
        )?,
    )
    .await?;
    quarter_copied(&merges, "big", &s.operator).await?;
    // The consumer writes on, and a snapshot is taken while the job copies.
    write_phase(&s.disk.device, 3, BLOCKS, &log_path(dir, "phase3"))?;
    let asked = std::time::Instant::now();
    take_snapshot(client, ns, "s3", "vm-disk", false).await?;
    let took = asked.elapsed();
    let status = merges.get("big").await?.status.unwrap_or_default();
    assert_eq!(
        status.phase,
        Phase::Running,
        "s3 was taken only after the merge ended ({took:?}): {status:?}"
    );
    eprintln!("snapshot during the merge: Ready {took:?} after it was applied");

    // The restarted job copies its quarter again; then cancel.
    tokio::time::sleep(Duration::from_secs(1)).await;
    quarter_copied(&merges, "big", &s.operator).await?;
    merges
        .patch(
            "big",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"cancel": true}})),
        )
        .await?;
    let status = wait_phase(&merges, "big", Phase::Cancelled, &s.operator).await?;
    assert!(status.merged_snapshots.is_empty(), "{status:?}");

    verify(&s.disk.device, 3, &log_path(dir, "phase3"))?;
    let (s2, s3) = (
        snapshot_handle(client, ns, "s2").await?,
        snapshot_handle(client, ns, "s3").await?,
    );
    // s2 is the 1 GiB file; s3 is phase 3's blocks over it.
    let check = |handle: &str, phase3: bool| -> Result<()> {
        let raw = snapshot_raw(node, vol, handle, dir)?;
        let result = if phase3 {
            verify(&raw, 3, &log_path(dir, "phase3"))
                .and_then(|()| same_bytes(&raw, &data, BLOCKS * 4096, GIB - BLOCKS * 4096))
        } else {
            same_bytes(&raw, &data, 0, GIB)
        };
        let _ = std::fs::remove_file(&raw);
        result.with_context(|| format!("snapshot {handle} read from the layer files"))
    };
    check(&s2, false)?;
    check(&s3, true)?;
    assert_eq!(
        metadata_delta(&s2, &s3).await?,
        vec![(0, BLOCKS * 4096)],
        "changed blocks between s2 and s3 = phase 3's blocks"
    );

    // Asking again finishes it: deleting s1 deletes its snapshot, whose merge resumes.
    let s1 = snapshot_handle(client, ns, "s1").await?;
    let disk_snapshots: Api<DiskSnapshot> = Api::namespaced(client.clone(), ns);
    disk_snapshots
        .delete("s1", &DeleteParams::foreground())
        .await?;
    gone_objects(client, ns, &["s1"], std::slice::from_ref(&s1)).await?;
    check(&s2, false)?;
    check(&s3, true)?;
    assert_eq!(
        metadata_delta(&s2, &s3).await?,
        vec![(0, BLOCKS * 4096)],
        "changed blocks after the merge"
    );
    verify(&s.disk.device, 3, &log_path(dir, "phase3"))?;
    s.finish().await
}

/// `bandwidthLimit` follows edits while the job runs: a merge held at 64 KiB/s (two minutes for
/// the 8 MiB layer) finishes within seconds once the limit is raised.
#[tokio::test]
async fn a_raised_bandwidth_limit_applies_to_the_running_job() -> Result<()> {
    let s = setup("merge-speed", 2).await?;
    let (client, ns, dir) = (&s.client, s.ns.as_str(), s.dir.0.as_path());
    let merges: Api<DiskMerge> = Api::namespaced(client.clone(), ns);
    must(
        client,
        ns,
        merge_from_example(
            "paced",
            "vm-disk",
            "Commit",
            Some("s1"),
            Some("s2"),
            Some("64Ki"),
        )?,
    )
    .await?;
    eventually(120, "the paced merge to copy", || async {
        let status = merges.get("paced").await?.status.unwrap_or_default();
        Ok(
            (status.phase == Phase::Running && status.progress.is_some_and(|p| p.bytes_done > 0))
                .then_some(()),
        )
    })
    .await
    .with_context(|| s.operator.log())?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let status = merges.get("paced").await?.status.unwrap_or_default();
    let progress = status.progress.context("progress")?;
    assert_eq!(
        status.phase,
        Phase::Running,
        "the limit did not hold: {progress:?}"
    );
    assert!(
        progress.bytes_done < 4 << 20,
        "the limit did not hold: {progress:?}"
    );
    let raised = std::time::Instant::now();
    merges
        .patch(
            "paced",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"bandwidthLimit": "1Gi"}})),
        )
        .await?;
    wait_phase(&merges, "paced", Phase::Completed, &s.operator).await?;
    assert!(
        raised.elapsed() < Duration::from_secs(60),
        "finished {:?} after the limit was raised: the running job kept its old speed",
        raised.elapsed()
    );
    verify(&s.disk.device, 2, &log_path(dir, "phase2"))?;
    verify_snapshot(client, ns, "s2", &s.disk.node, 2, dir).await?;
    s.finish().await
}

/// kill -9 of the operator and of the node plugin in the middle of an active commit (no top):
/// the node plugin is restarted (as kubelet restarts it), its engine finishes the interrupted job,
/// the node work goes on with the snapshots left, a new operator takes over, and the volume
/// equals the writer's logs.
#[tokio::test]
async fn a_merge_survives_kill_9_of_the_operator_and_the_node_plugin() -> Result<()> {
    let mut s = setup_with("merge-kill", 3, NodeUse::Exclusive(NODES.write().await)).await?;
    let (client, ns, dir) = (s.client.clone(), s.ns.clone(), s.dir.0.clone());
    let stop = dir.join("stop");
    let writer = start_writer(&s.disk.device, 4, &log_path(&dir, "phase4"), &stop)?;
    let merges: Api<DiskMerge> = Api::namespaced(client.clone(), &ns);
    must(
        &client,
        &ns,
        merge_from_example(
            "flatten-all",
            "vm-disk",
            "Commit",
            Some("s1"),
            None,
            Some("1Mi"),
        )?,
    )
    .await?;
    eventually(120, "the merge to copy", || async {
        let status = merges.get("flatten-all").await?.status.unwrap_or_default();
        Ok(
            (status.phase == Phase::Running && status.progress.is_some_and(|p| p.bytes_done > 0))
                .then_some(()),
        )
    })
    .await
    .with_context(|| s.operator.log())?;

    s.kill_operator_and_node_plugin().await?;

    let status = wait_phase(&merges, "flatten-all", Phase::Completed, &s.operator).await?;
    stop_writer(writer, &stop)?;
    assert_eq!(status.merged_snapshots, ["s1", "s2", "s3"]);
    verify_volume(&s.disk.device, &dir, 4, 3)?;
    // The base layer now holds everything: the volume reads back after a detach and re-attach.
    let disk = &s.disk;
    detach_block(&disk.node, &disk.volume_id, &disk.tag).await?;
    let target = attach_block(&disk.node, &disk.volume_id, &disk.tag).await?;
    let device = host_device(&disk.node, &target)?;
    verify_volume(&device, &dir, 4, 3)?;
    s.disk.device = device;
    s.finish().await
}

/// kill -9 of the operator and of the node plugin while a DiskSnapshot's deletion merges (its
/// class holds it at 1 MiB/s, so it runs for seconds) and the consumer writes: the restarted node
/// plugin's engine finishes the merge, the DiskSnapshot and its objects go, and the volume and
/// the other snapshots equal the writer's logs (the snapshots read from the layer files).
#[tokio::test]
async fn a_deletion_merge_survives_kill_9_of_the_operator_and_the_node_plugin() -> Result<()> {
    let mut s = setup_with("dsnap-kill", 1, NodeUse::Exclusive(NODES.write().await)).await?;
    let (client, ns, dir) = (s.client.clone(), s.ns.clone(), s.dir.0.clone());
    let slow = snapshot_class(&client, &ns, "slow", json!({"mergeBandwidthLimit": "1Mi"})).await?;
    write_phase(&s.disk.device, 2, BLOCKS, &log_path(&dir, "phase2"))?;
    take_snapshot_with(
        &client,
        &ns,
        "slow",
        json!({"source": {"persistentVolumeClaimName": s.disk.claim}, "snapshotClassName": slow}),
    )
    .await?;
    write_phase(&s.disk.device, 3, BLOCKS, &log_path(&dir, "phase3"))?;
    take_snapshot(&client, &ns, "s3", &s.disk.claim, false).await?;
    let handles = [
        snapshot_handle(&client, &ns, "s1").await?,
        snapshot_handle(&client, &ns, "slow").await?,
        snapshot_handle(&client, &ns, "s3").await?,
    ];
    let stop = dir.join("stop");
    let writer = start_writer(&s.disk.device, 4, &log_path(&dir, "phase4"), &stop)?;

    // Deleting "slow" commits phase 3's 8 MiB into its layer at 1 MiB/s.
    let disk_snapshots: Api<DiskSnapshot> = Api::namespaced(client.clone(), &ns);
    disk_snapshots
        .delete("slow", &DeleteParams::default())
        .await?;
    eventually(60, "the deletion merge to copy", || async {
        let status = disk_snapshots.get("slow").await?.status.unwrap_or_default();
        Ok(
            (status.phase == Phase::Deleting && status.progress.is_some_and(|p| p.bytes_done > 0))
                .then_some(()),
        )
    })
    .await
    .with_context(|| s.operator.log())?;

    s.kill_operator_and_node_plugin().await?;
    gone_objects(&client, &ns, &["slow"], std::slice::from_ref(&handles[1]))
        .await
        .with_context(|| s.operator.log())?;

    stop_writer(writer, &stop)?;
    verify_volume(&s.disk.device, &dir, 4, 3)?;
    let (vol, node) = (s.disk.volume_id.as_str(), s.disk.node.as_str());
    verify_snapshot_in_pool(node, vol, &handles[0], 1, &dir)?;
    verify_snapshot_in_pool(node, vol, &handles[2], 3, &dir)?;
    s.finish().await
}

/// A VolumeSnapshotClass of the driver with `parameters`, named after the test's namespace.
async fn snapshot_class(
    client: &Client,
    ns: &str,
    suffix: &str,
    parameters: Value,
) -> Result<String> {
    let name = format!("{ns}-{suffix}");
    must(
        client,
        ns,
        json!({"apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshotClass",
               "metadata": {"name": name}, "driver": livedisk_common::DRIVER_NAME,
               "deletionPolicy": "Delete", "parameters": parameters}),
    )
    .await?;
    Ok(name)
}

/// The Events with `reason` about VolumeSnapshot `name`.
async fn deletion_events(
    client: &Client,
    ns: &str,
    name: &str,
    reason: &str,
) -> Result<Vec<k8s_openapi::api::events::v1::Event>> {
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), ns);
    Ok(events
        .list(&Default::default())
        .await?
        .items
        .into_iter()
        .filter(|e| {
            let regarding = e.regarding.as_ref();
            e.reason.as_deref() == Some(reason)
                && regarding.and_then(|r| r.kind.as_deref()) == Some("VolumeSnapshot")
                && regarding.and_then(|r| r.name.as_deref()) == Some(name)
        })
        .collect())
}

fn snapshot_classes(client: &Client) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("snapshot.storage.k8s.io", "v1", "VolumeSnapshotClass");
    Api::all_with(client.clone(), &ApiResource::from_gvk(&gvk))
}

/// Deleting a DiskSnapshot merges its layer away at the rate its VolumeSnapshotClass asks for
/// (`mergeBandwidthLimit`, captured at CreateSnapshot: DeleteSnapshot carries no parameters);
/// the DiskSnapshot shows `Deleting` with the merge's progress, its VolumeSnapshot gets progress
/// Events, and the DiskSnapshot goes only after its VolumeSnapshot and storage snapshot. A typo
/// in the class's parameters is refused; a VolumeSnapshot of the same name that is not the
/// DiskSnapshot's is never adopted nor touched.
#[tokio::test]
async fn deleting_a_disk_snapshot_merges_at_its_class_rate_with_progress() -> Result<()> {
    let s = setup("dsnap-rate", 1).await?;
    let (client, ns, dir) = (&s.client, s.ns.as_str(), s.dir.0.as_path());
    let slow = snapshot_class(client, ns, "slow", json!({"mergeBandwidthLimit": "1Mi"})).await?;
    let typo = snapshot_class(client, ns, "typo", json!({"mergeBandwidthLimt": "1Mi"})).await?;

    // s1 (phase 1), "slow" (phase 2) in the rate-limited class, s3 (phase 3): deleting "slow"
    // commits the 8 MiB phase 3 wrote into its layer.
    write_phase(&s.disk.device, 2, BLOCKS, &log_path(dir, "phase2"))?;
    let status = take_snapshot_with(
        client,
        ns,
        "slow",
        json!({"source": {"persistentVolumeClaimName": s.disk.claim}, "snapshotClassName": slow}),
    )
    .await?;
    write_phase(&s.disk.device, 3, BLOCKS, &log_path(dir, "phase3"))?;
    take_snapshot(client, ns, "s3", &s.disk.claim, false).await?;

    let handle = snapshot_handle(client, ns, "slow").await?;
    assert_eq!(status.snapshot_handle.as_deref(), Some(handle.as_str()));
    assert!(status.volume_snapshot_content_name.is_some(), "{status:?}");
    let internal: Api<LivediskSnapshot> = Api::all(client.clone());
    assert_eq!(
        internal
            .get(&handle)
            .await?
            .spec
            .merge_bandwidth_bytes_per_second,
        Some(1 << 20),
        "the class's limit is captured at CreateSnapshot"
    );
    let disk_snapshots: Api<DiskSnapshot> = Api::namespaced(client.clone(), ns);
    let held = eventually(60, "the space the snapshot holds", || async {
        let status = disk_snapshots.get("slow").await?.status.unwrap_or_default();
        Ok(status.allocated_bytes)
    })
    .await?;
    assert!(
        held >= (BLOCKS * 4096) as i64,
        "phase 2 wrote {} bytes into the layer, status says {held}",
        BLOCKS * 4096
    );

    let started = std::time::Instant::now();
    disk_snapshots
        .delete("slow", &DeleteParams::default())
        .await?;
    let mut deleting_progress: Option<livedisk_api::Progress> = None;
    loop {
        let Some(object) = disk_snapshots.get_opt("slow").await? else {
            break;
        };
        let status = object.status.unwrap_or_default();
        if status.phase == Phase::Deleting
            && let Some(p) = status.progress.clone()
            && deleting_progress
                .as_ref()
                .is_none_or(|d| p.bytes_done > d.bytes_done)
        {
            deleting_progress = Some(p);
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(180),
            "DiskSnapshot slow still there after 180 s: {:?}\n{}",
            status,
            s.operator.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let took = started.elapsed();
    eprintln!("DiskSnapshot slow deleted in {took:?}; last progress seen: {deleting_progress:?}");
    // The finalizer let it go only after the VolumeSnapshot and the storage snapshot.
    assert!(
        volume_snapshots(client, ns)
            .get_opt("slow")
            .await?
            .is_none()
    );
    assert!(
        internal.get_opt(&handle).await?.is_none(),
        "the DiskSnapshot went before its storage snapshot"
    );
    let progress = deleting_progress.context("no Deleting progress seen on the DiskSnapshot")?;
    assert!(
        progress.bytes_done > 0 && progress.bytes_total >= (BLOCKS * 4096) as i64,
        "{progress:?}"
    );
    // 8 MiB at 1 MiB/s: a merge at full speed takes well under a second here.
    assert!(
        took >= Duration::from_secs(4),
        "deleted in {took:?}: the rate limit was not applied"
    );
    let merging = deletion_events(client, ns, "slow", "Merging").await?;
    assert!(
        !merging.is_empty(),
        "no progress Event on VolumeSnapshot slow"
    );
    assert!(
        merging.iter().any(|e| e
            .note
            .as_deref()
            .is_some_and(|n| n.contains("at most 1048576 bytes/s"))),
        "{merging:?}"
    );
    assert!(
        !deletion_events(client, ns, "slow", "Merged")
            .await?
            .is_empty()
    );
    // The snapshots around it read back as their phases wrote them.
    verify_snapshot(client, ns, "s1", &s.disk.node, 1, dir).await?;
    verify_snapshot(client, ns, "s3", &s.disk.node, 3, dir).await?;

    // A VolumeSnapshot deleted by itself (no DiskSnapshot) gets the same Events, under its UID
    // (`kubectl describe` matches them by it).
    must(
        client,
        ns,
        json!({"apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot", "metadata": {"name": "direct"},
               "spec": {"volumeSnapshotClassName": slow, "source": {"persistentVolumeClaimName": s.disk.claim}}}),
    )
    .await?;
    let direct = eventually(90, "VolumeSnapshot direct ready", || async {
        let vs = volume_snapshots(client, ns).get("direct").await?;
        Ok((vs.data["status"]["readyToUse"] == true).then_some(vs))
    })
    .await?;
    volume_snapshots(client, ns)
        .delete("direct", &DeleteParams::default())
        .await?;
    let merged = eventually(90, "a Merged Event on VolumeSnapshot direct", || async {
        let events = deletion_events(client, ns, "direct", "Merged").await?;
        Ok((!events.is_empty()).then_some(events))
    })
    .await?;
    assert_eq!(
        merged[0].regarding.as_ref().and_then(|r| r.uid.clone()),
        direct.metadata.uid,
        "{merged:?}"
    );
    assert!(
        !deletion_events(client, ns, "direct", "Merging")
            .await?
            .is_empty()
    );

    // A typo in the class is refused at CreateSnapshot: never a silent "full speed".
    must(
        client,
        ns,
        json!({"apiVersion": "livedisk.io/v1alpha1", "kind": "DiskSnapshot", "metadata": {"name": "typo"},
               "spec": {"source": {"persistentVolumeClaimName": s.disk.claim}, "snapshotClassName": typo}}),
    )
    .await?;
    let message = eventually(90, "the typo to be reported", || async {
        let status = disk_snapshots.get("typo").await?.status.unwrap_or_default();
        Ok(livedisk_api::conditions::find(&status.conditions, "Ready")
            .filter(|c| c.reason == "SnapshotError")
            .map(|c| c.message.clone()))
    })
    .await
    .with_context(|| s.operator.log())?;
    assert!(message.contains("mergeBandwidthLimt"), "{message}");

    // A VolumeSnapshot of the same name made by someone else is left alone.
    must(
        client,
        ns,
        json!({"apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot", "metadata": {"name": "mine"},
               "spec": {"source": {"persistentVolumeClaimName": s.disk.claim}}}),
    )
    .await?;
    must(
        client,
        ns,
        json!({"apiVersion": "livedisk.io/v1alpha1", "kind": "DiskSnapshot", "metadata": {"name": "mine"},
               "spec": {"source": {"persistentVolumeClaimName": s.disk.claim}}}),
    )
    .await?;
    let refused = eventually(60, "the foreign VolumeSnapshot to be refused", || async {
        let object = disk_snapshots.get("mine").await?;
        let status = object.status.clone().unwrap_or_default();
        Ok(
            livedisk_api::conditions::find(&status.conditions, "Stalled")
                .filter(|c| c.status == "True" && c.reason == "VolumeSnapshotNotOwned")
                .map(|_| object),
        )
    })
    .await
    .with_context(|| s.operator.log())?;
    assert!(
        refused.finalizers().is_empty(),
        "a refused DiskSnapshot holds no finalizer"
    );
    disk_snapshots
        .delete("mine", &DeleteParams::default())
        .await?;
    eventually(30, "the refused DiskSnapshot to go", || async {
        Ok(disk_snapshots
            .get_opt("mine")
            .await?
            .is_none()
            .then_some(()))
    })
    .await?;
    let theirs = volume_snapshots(client, ns).get("mine").await?;
    assert!(
        theirs.metadata.deletion_timestamp.is_none(),
        "the foreign VolumeSnapshot was deleted"
    );
    assert!(
        theirs
            .metadata
            .owner_references
            .is_none_or(|o| o.is_empty()),
        "it was adopted"
    );

    // The classes go last: csi-snapshotter cannot finish the deletion of a content whose class
    // is gone (it looks the class up first), which would leave it deleting for good.
    disk_snapshots
        .delete("typo", &DeleteParams::default())
        .await?;
    eventually(90, "the DiskSnapshot with the typo to go", || async {
        Ok(disk_snapshots
            .get_opt("typo")
            .await?
            .is_none()
            .then_some(()))
    })
    .await
    .with_context(|| s.operator.log())?;
    for class in [&slow, &typo] {
        snapshot_classes(client)
            .delete(class, &DeleteParams::default())
            .await?;
    }
    s.finish().await
}
