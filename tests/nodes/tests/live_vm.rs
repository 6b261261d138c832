//! A running VM with two livedisk disks, snapshotted as a KubeVirt user does it: a DiskSnapshot of
//! the VirtualMachine, with the guest frozen through its real qemu-guest-agent.
//!
//! The VM is the test VM's live mode (`vm-run live`, docs/vm-test.md) in a pod started by
//! kubelet on node-a, its disks two block PVCs of the chart's StorageClass at `volumeDevices`,
//! as a VM launcher pod gets them: a block writer on one, ext4 with a file writer on the other,
//! and Debian's qemu-guest-agent on a unix socket in the pod's node directory. KubeVirt's node
//! side cannot run here, so the test creates the VirtualMachine and VirtualMachineInstance
//! objects that describe this VM, and the virt-api STAND-IN (tests/virt-api-standin) forwards
//! the operator's freeze and unfreeze to the guest's real agent (the VMI names its socket).
//!
//! What is checked, on clones restored from the member VolumeSnapshots, in pods: the frozen
//! cut's ext4 is clean without a journal replay (`dumpe2fs` shows no needs_recovery, `e2fsck -fn`
//! passes) and its file holds every write its own log records; a cut taken without a freeze
//! (`freeze: Never`) needs journal recovery, so the check can fail; the block disk's cut holds
//! every write acknowledged before the snapshot was asked for. Then a DiskMerge (an active
//! commit of the ext4 disk into a new snapshot's layer) runs under the VM, its progress seen;
//! the guest is shut down through its agent and verifies both disks itself. The guest's write
//! latency per stretch is printed (from its own ack log).

use anyhow::{Context, Result, bail, ensure};
use kube::api::{Api, Patch, PatchParams};
use livedisk_api::{DiskMerge, DiskSnapshot, Phase};
use livedisk_e2e::eventually;
use livedisk_e2e::vm::{disk_snapshot, instance, instances, virtual_machine, wait_for_phase};
use livedisk_node_e2e::live_vm::{guest_agent, last_seq};
use livedisk_node_e2e::{Cluster, PodSpec, TestNamespace, VolumeMode, live_vm};
use serde_json::json;

const NODE: &str = "node-a";
const VM: &str = "live";
const BLOCK_DISK: &str = "live-blocks";
const DATA_DISK: &str = "live-data";
const TAG: u64 = 3;

/// The member VolumeSnapshot of `claim` in a Ready DiskSnapshot of the VM.
fn member(snapshot: &DiskSnapshot, claim: &str) -> Result<String> {
    let status = snapshot.status.as_ref().context("no status")?;
    status
        .volumes
        .iter()
        .find(|v| v.claim_name.as_deref() == Some(claim))
        .and_then(|v| v.volume_snapshot_name.clone())
        .with_context(|| format!("no member snapshot of {claim}: {:?}", status.volumes))
}

/// A pod that checks the ext4 disk at /dev/xvda without mounting it (no privilege): prints
/// `needs_recovery=yes|no`, then, unless `fsck_only`, e2fsck -fn and the file's verification
/// against the log on the same filesystem (both copied out with debugfs).
fn ext4_check_script(fsck_only: bool) -> String {
    let mut script = String::from(
        "set -e; if dumpe2fs -h /dev/xvda 2>/dev/null | grep -q '^Filesystem features:.*needs_recovery'; \
         then echo needs_recovery=yes; else echo needs_recovery=no; fi; ",
    );
    if !fsck_only {
        script.push_str(&format!(
            "e2fsck -fn /dev/xvda; \
             debugfs -R 'dump /acks.jsonl /tmp/acks.jsonl' /dev/xvda; \
             debugfs -R 'dump /blocks /tmp/blocks' /dev/xvda; \
             echo file_acks=$(grep -c . /tmp/acks.jsonl); \
             livedisk-verifier verify --path /tmp/blocks --tag {TAG} --log /tmp/acks.jsonl"
        ));
    }
    script
}

#[tokio::test]
async fn a_running_vm_snapshotted_inside_its_real_guest_agents_freeze_has_a_clean_filesystem()
-> Result<()> {
    let cluster = Cluster::connect().await?;
    let ns = TestNamespace::create(&cluster.client, "live-vm").await?;
    let n = ns.name.as_str();
    for claim in [BLOCK_DISK, DATA_DISK] {
        cluster.create_pvc(n, claim, VolumeMode::Block).await?;
    }
    let script = live_vm::script(TAG, "");
    let vm_pod = live_vm::pod("vm", NODE, [BLOCK_DISK, DATA_DISK], &script);
    cluster.run_pod(n, &vm_pod).await?;
    live_vm::wait_writing(&cluster, n, "vm").await?;
    let socket = cluster.ack_path(NODE, n, "qga.sock");
    ensure!(
        guest_agent(&socket, "guest-ping")? == "{}",
        "the guest agent answers ping"
    );

    // The objects KubeVirt would keep for this VM.
    cluster
        .create_object(n, virtual_machine(VM, &[BLOCK_DISK, DATA_DISK], false))
        .await?;
    instance(
        &cluster.client,
        n,
        VM,
        &[BLOCK_DISK, DATA_DISK],
        "Running",
        true,
    )
    .await?;
    let annotate = json!({"metadata": {"annotations": {
        "livedisk.io/standin-guest-agent-socket": socket.display().to_string()}}});
    instances(&cluster.client, n)
        .patch(VM, &PatchParams::default(), &Patch::Merge(&annotate))
        .await?;

    // A crash-consistent cut first (no freeze): the check below must tell it from a frozen one.
    let snapshots: Api<DiskSnapshot> = Api::namespaced(cluster.client.clone(), n);
    let idle_upto = last_seq(&cluster.logs(n, "vm").await?, "LDACK ").unwrap_or(0);
    cluster
        .create_object(n, disk_snapshot("crash", VM, "Never", None))
        .await?;
    let crash = wait_for_phase(&snapshots, "crash", "Ready", 180).await?;

    let logs = cluster.logs(n, "vm").await?;
    let block_upto = last_seq(&logs, "LDACK ").context("no block acks")?;
    let file_upto = last_seq(&logs, "LDFILE ").context("no file acks")?;
    cluster
        .create_object(n, disk_snapshot("frozen", VM, "Required", None))
        .await?;
    let frozen = wait_for_phase(&snapshots, "frozen", "Ready", 180).await?;
    let frozen_upto = last_seq(&cluster.logs(n, "vm").await?, "LDACK ").unwrap_or(0);
    let status = frozen.status.clone().unwrap_or_default();
    let freeze = status.guest_freeze.clone().context("no guest freeze")?;
    let indications: Vec<&str> = status
        .indications
        .iter()
        .map(|i| i.indication.as_str())
        .collect();
    ensure!(
        indications.contains(&"Online") && indications.contains(&"GuestAgent"),
        "indications: {:?}",
        status.indications
    );
    ensure!(
        serde_json::to_value(freeze.state)? == json!("Thawed"),
        "freeze: {freeze:?}"
    );
    // The stand-in's record: the real agent froze and thawed the guest's one filesystem.
    let record = std::fs::read_to_string(cluster.state.join("virt-api-standin/calls.jsonl"))?;
    let ours: Vec<serde_json::Value> = record
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|c| c["namespace"] == json!(n))
        .collect();
    let said = |op: &str| {
        ours.iter()
            .filter(|c| c["op"] == json!(op))
            .map(|c| c["message"].as_str().unwrap_or_default().to_string())
            .collect::<Vec<_>>()
    };
    ensure!(
        said("freeze") == ["the guest agent froze 1 filesystems"]
            && said("unfreeze") == ["the guest agent thawed 1 filesystems"],
        "the stand-in's calls for {n}: {ours:?}"
    );
    ensure!(
        guest_agent(&socket, "guest-fsfreeze-status")? == "\"thawed\"",
        "the guest is thawed after the snapshot"
    );
    println!(
        "guest frozen {} ms (as the operator reports it); cut after block ack {block_upto} and file ack {file_upto}",
        freeze.frozen_milliseconds.unwrap_or(-1)
    );

    // The clones, checked in pods.
    let restore = |pvc: &'static str, snapshot: String| {
        let cluster = &cluster;
        async move {
            cluster
                .create_pvc_from(n, pvc, VolumeMode::Block, Some(&snapshot))
                .await
        }
    };
    restore("crash-data", member(&crash, DATA_DISK)?).await?;
    restore("frozen-data", member(&frozen, DATA_DISK)?).await?;
    restore("frozen-blocks", member(&frozen, BLOCK_DISK)?).await?;

    let crash_check = ext4_check_script(true);
    let out = cluster
        .run_to_completion(
            n,
            &PodSpec::once(
                "check-crash",
                NODE,
                "crash-data",
                VolumeMode::Block,
                &crash_check,
            ),
        )
        .await?;
    ensure!(
        out.contains("needs_recovery=yes"),
        "a cut of the mounted ext4 without a freeze needs journal recovery: {out}"
    );
    let frozen_check = ext4_check_script(false);
    let out = cluster
        .run_to_completion(
            n,
            &PodSpec::once(
                "check-frozen",
                NODE,
                "frozen-data",
                VolumeMode::Block,
                &frozen_check,
            ),
        )
        .await
        .context("the frozen cut's ext4 check")?;
    ensure!(
        out.contains("needs_recovery=no"),
        "the frozen cut is clean: {out}"
    );
    let file_acks: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("file_acks="))
        .context("no file_acks line")?
        .trim()
        .parse()?;
    ensure!(
        file_acks >= file_upto,
        "the frozen cut's log has {file_acks} acks, {file_upto} were acknowledged before the snapshot was asked for"
    );

    // The block disk (a raw device, not frozen) holds every write acknowledged before the ask.
    let acks: String = logs
        .lines()
        .filter_map(|l| l.strip_prefix("LDACK "))
        .filter(|j| {
            serde_json::from_str::<serde_json::Value>(j)
                .ok()
                .and_then(|a| a["seq"].as_u64())
                .is_some_and(|s| s <= block_upto)
        })
        .map(|j| format!("{j}\n"))
        .collect();
    std::fs::write(cluster.ack_path(NODE, n, "acks-upto.jsonl"), acks)?;
    let verify = format!(
        "exec livedisk-verifier verify --path /dev/xvda --tag {TAG} --log /ack/acks-upto.jsonl"
    );
    cluster
        .run_to_completion(
            n,
            &PodSpec::once(
                "check-blocks",
                NODE,
                "frozen-blocks",
                VolumeMode::Block,
                &verify,
            ),
        )
        .await
        .context("the frozen cut of the block disk")?;

    // A live merge under the running VM: a snapshot of the ext4 disk, then an active commit of
    // every layer above it (the active layer included) into its layer, rate-limited so that its
    // progress shows while it runs.
    cluster
        .create_object(
            n,
            json!({"apiVersion": "livedisk.io/v1alpha1", "kind": "DiskSnapshot",
                   "metadata": {"name": "data-base"},
                   "spec": {"source": {"persistentVolumeClaimName": DATA_DISK}}}),
        )
        .await?;
    wait_for_phase(&snapshots, "data-base", "Ready", 120).await?;
    // Something to merge: the guest's file writes on the ext4 disk after data-base (a slow
    // guest on a loaded machine once wrote none, and the commit of an empty layer ended before
    // any progress could show).
    let file_from = last_seq(&cluster.logs(n, "vm").await?, "LDFILE ").unwrap_or(0);
    eventually(
        180,
        "1000 file writes of the guest after data-base",
        || async {
            let logs = cluster.logs(n, "vm").await.unwrap_or_default();
            Ok(last_seq(&logs, "LDFILE ")
                .filter(|s| *s >= file_from + 1000)
                .map(|_| ()))
        },
    )
    .await?;
    let merge_from = last_seq(&cluster.logs(n, "vm").await?, "LDACK ").unwrap_or(0);
    cluster
        .create_object(
            n,
            json!({"apiVersion": "livedisk.io/v1alpha1", "kind": "DiskMerge",
                   "metadata": {"name": "data-commit"},
                   "spec": {"persistentVolumeClaimName": DATA_DISK, "mode": "Commit",
                            "baseSnapshotName": "data-base", "bandwidthLimit": "1Mi"}}),
        )
        .await?;
    let merges: Api<DiskMerge> = Api::namespaced(cluster.client.clone(), n);
    let seen = std::cell::Cell::new(0i64);
    let merged = eventually(300, "DiskMerge data-commit Completed", || async {
        let status = merges.get("data-commit").await?.status.unwrap_or_default();
        if status.phase == Phase::Running
            && let Some(p) = &status.progress
        {
            seen.set(seen.get().max(p.bytes_done));
        }
        match status.phase {
            Phase::Completed => Ok(Some(status)),
            Phase::Failed | Phase::Cancelled => bail!("DiskMerge data-commit: {status:?}"),
            _ => Ok(None),
        }
    })
    .await?;
    let progress_seen = seen.get();
    let merge_to = last_seq(&cluster.logs(n, "vm").await?, "LDACK ").unwrap_or(0);
    ensure!(
        progress_seen > 0,
        "no progress seen while the merge ran: {merged:?}"
    );
    ensure!(
        merged.merged_snapshots == ["data-base"],
        "merged: {:?}",
        merged.merged_snapshots
    );
    println!("DiskMerge data-commit: progress seen up to {progress_seen} bytes while Running");

    // The guest stops through its agent and verifies both disks itself.
    let before_shutdown = last_seq(&cluster.logs(n, "vm").await?, "LDACK ").unwrap_or(0);
    let during = cluster.logs(n, "vm").await?;
    live_vm::print_latency(
        "live_vm",
        &during,
        &[
            ("idle (before any snapshot)", 1, idle_upto),
            (
                "the frozen DiskSnapshot, ask to Ready",
                block_upto,
                frozen_upto,
            ),
            (
                "the DiskMerge (active commit, 1 MiB/s)",
                merge_from,
                merge_to,
            ),
            ("everything until the shutdown", 1, before_shutdown),
        ],
    );
    let result = live_vm::shut_down_verified(&cluster, n, "vm", &socket).await?;
    println!("{result}");
    ns.delete().await
}
