//! A VM is the consumer: a pod runs qemu-system-x86_64 (TCG) from the test image with a livedisk
//! block PVC as its virtio disk; the guest writes checksummed blocks (O_DSYNC) and reports every
//! acknowledged write on its console. A VolumeSnapshot is taken while the guest writes; a second
//! VM pod boots from a PVC restored from the snapshot and verifies every block the guest had
//! acknowledged before the snapshot was requested (`vm-run verify --upto SEQ`).

use anyhow::{Context, Result, ensure};
use kube::api::{Api, DynamicObject, PostParams};
use kube::discovery::ApiResource;
use livedisk_e2e::eventually;
use livedisk_node_e2e::{Cluster, PodSpec, TestNamespace, VolumeMode};
use serde_json::json;

/// The highest sequence number of the guest's acknowledged writes in `vm-run`'s output so far.
fn last_ack(logs: &str) -> Option<u64> {
    logs.lines()
        .filter_map(|l| l.split_once("LDACK ").map(|(_, json)| json))
        .filter_map(|json| serde_json::from_str::<serde_json::Value>(json).ok())
        .filter_map(|ack| ack["seq"].as_u64())
        .max()
}

#[tokio::test]
async fn a_vm_snapshotted_while_it_writes_boots_again_from_the_restored_disk() -> Result<()> {
    let cluster = Cluster::connect().await?;
    let ns = TestNamespace::create(&cluster.client, "vm").await?;
    let node = "node-a";
    let mode = VolumeMode::Block;
    cluster.create_pvc(&ns.name, "vm-disk", mode).await?;
    cluster
        .run_pod(
            &ns.name,
            &PodSpec::once(
                "vm",
                node,
                "vm-disk",
                mode,
                "exec vm-run write --disk /dev/xvda --acks /ack/acks --blocks 2048 --seconds 60",
            ),
        )
        .await?;
    // The guest boots (TCG: tens of seconds on this machine) and starts acknowledging writes.
    let seq = eventually(300, "the guest's first 500 acknowledged writes", || async {
        let logs = cluster.logs(&ns.name, "vm").await.unwrap_or_default();
        Ok(last_ack(&logs).filter(|s| *s >= 500))
    })
    .await;
    let seq = match seq {
        Ok(seq) => seq,
        Err(e) => {
            eprintln!("{}", cluster.describe(&ns.name, "vm").await);
            return Err(e);
        }
    };

    let snapshots = Api::<DynamicObject>::namespaced_with(
        cluster.client.clone(),
        &ns.name,
        &ApiResource::from_gvk(&kube::core::GroupVersionKind::gvk(
            "snapshot.storage.k8s.io",
            "v1",
            "VolumeSnapshot",
        )),
    );
    let snapshot: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
        "metadata": {"name": "while-running"},
        "spec": {"volumeSnapshotClassName": "livedisk",
                 "source": {"persistentVolumeClaimName": "vm-disk"}}
    }))?;
    snapshots.create(&PostParams::default(), &snapshot).await?;
    eventually(120, "VolumeSnapshot ready", || async {
        let s = snapshots.get("while-running").await?;
        Ok((s.data["status"]["readyToUse"] == json!(true)).then_some(()))
    })
    .await?;
    // Taken while the guest runs: its pod has not finished when the snapshot is ready.
    let phase = livedisk_node_e2e::pod_phase(&cluster.pods(&ns.name).get("vm").await?);
    ensure!(
        phase == "Running",
        "the VM pod is {phase} once the snapshot is ready: the guest should still be writing"
    );

    cluster.wait_phase(&ns.name, "vm", "Succeeded", 300).await?;
    let written = cluster.logs(&ns.name, "vm").await?;
    let total = last_ack(&written).context("no acks from the writing guest")?;
    cluster.delete_pod(&ns.name, "vm").await?;

    cluster
        .create_pvc_from(&ns.name, "restored", mode, Some("while-running"))
        .await?;
    let verify = format!("exec vm-run verify --disk /dev/xvda --acks /ack/acks --upto {seq}");
    cluster
        .run_pod(
            &ns.name,
            &PodSpec::once("vm-restored", node, "restored", mode, &verify),
        )
        .await?;
    cluster
        .wait_phase(&ns.name, "vm-restored", "Succeeded", 300)
        .await?;
    let report = cluster.logs(&ns.name, "vm-restored").await?;
    ensure!(
        report.contains("status=ok"),
        "the restored VM's report: {report}"
    );
    println!(
        "guest acknowledged {total} writes; the snapshot was requested after #{seq}; \
         the VM booted from the restored PVC verified all of them"
    );
    cluster.delete_pod(&ns.name, "vm-restored").await?;
    ns.delete().await
}
