//! Expansion as users do it: the PVC's request grows. The driver offers offline expansion only
//! (QEMU 7.2 cannot resize a block node under the consumer's NBD export; an attached volume is
//! refused with FAILED_PRECONDITION and csi-resizer waits), so the claim grows between pods:
//! csi-resizer asks the controller while no pod uses it, and kubelet (not the test) calls
//! NodeExpandVolume when the next pod stages it, which grows the filesystem before that pod
//! starts. The next pod sees the new size, and every write acknowledged before reads back.

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::api::{Api, Patch, PatchParams};
use livedisk_e2e::eventually;
use livedisk_node_e2e::{Cluster, PodSpec, TestNamespace, VolumeMode, writer_script};
use serde_json::json;

/// Size in KiB of the filesystem from the last `df -Pk` line in the pod's output.
fn last_df_kib(logs: &str) -> Option<u64> {
    logs.lines()
        .rev()
        .find(|l| l.ends_with("/data"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kib| kib.parse().ok())
}

#[tokio::test]
async fn a_filesystem_pvc_grows_between_pods_and_keeps_its_data() -> Result<()> {
    let cluster = Cluster::connect().await?;
    let ns = TestNamespace::create(&cluster.client, "resize").await?;
    let node = "node-b";
    let mode = VolumeMode::Filesystem;
    cluster.create_pvc(&ns.name, "disk", mode).await?;
    let writer = format!(
        "df -Pk /data | tail -n 1; {}",
        writer_script(mode, "acks", 5)
    );
    cluster
        .run_pod(
            &ns.name,
            &PodSpec::once("writer", node, "disk", mode, &writer),
        )
        .await?;
    cluster
        .wait_phase(&ns.name, "writer", "Succeeded", 180)
        .await?;
    let before = last_df_kib(&cluster.logs(&ns.name, "writer").await?)
        .context("no df output from the writer")?;
    cluster.delete_pod(&ns.name, "writer").await?;

    let claims = Api::<PersistentVolumeClaim>::namespaced(cluster.client.clone(), &ns.name);
    claims
        .patch(
            "disk",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"resources": {"requests": {"storage": "512Mi"}}}})),
        )
        .await
        .context("growing the PVC")?;
    // The controller's part: the volume grows, the filesystem waits for the next stage.
    eventually(
        120,
        "the claim's FileSystemResizePending condition",
        || async {
            let pvc = claims.get("disk").await?;
            let pending = pvc
                .status
                .and_then(|s| s.conditions)
                .is_some_and(|c| c.iter().any(|c| c.type_ == "FileSystemResizePending"));
            Ok(pending.then_some(()))
        },
    )
    .await?;

    let report = cluster
        .read_back(
            &ns.name,
            node,
            "disk",
            mode,
            "acks",
            "df -Pk /data | tail -n 1; ",
        )
        .await?;
    let after = last_df_kib(&report).context("no df output from the reader")?;
    ensure!(
        after > 440 * 1024 && before < 260 * 1024,
        "filesystem {before} KiB before, {after} KiB after growing the claim to 512Mi"
    );
    eventually(60, "the PVC's status capacity 512Mi", || async {
        let pvc = claims.get("disk").await?;
        let capacity = pvc
            .status
            .and_then(|s| s.capacity)
            .and_then(|c| c.get("storage").cloned())
            .map(|q| q.0)
            .unwrap_or_default();
        Ok((capacity == "512Mi").then_some(()))
    })
    .await?;
    println!(
        "filesystem grew from {before} KiB to {after} KiB between two pods; every write read back"
    );
    ns.delete().await
}
