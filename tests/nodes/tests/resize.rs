//! Online expansion as users do it: the PVC's request grows while a pod writes to its
//! filesystem. csi-resizer asks the controller, and kubelet (not the test) calls
//! NodeExpandVolume, which grows the filesystem under the running pod: the pod sees the new size,
//! its writer sees no error, and every acknowledged write reads back.

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::api::{Api, Patch, PatchParams};
use livedisk_e2e::eventually;
use livedisk_node_e2e::{Cluster, PodSpec, TestNamespace, VolumeMode, verify_script};
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
async fn a_filesystem_pvc_grows_under_a_writing_pod() -> Result<()> {
    let cluster = Cluster::connect().await?;
    let ns = TestNamespace::create(&cluster.client, "resize").await?;
    let node = "node-b";
    let mode = VolumeMode::Filesystem;
    cluster.create_pvc(&ns.name, "disk", mode).await?;
    let script = format!(
        "set -e; {prepare}livedisk-verifier write --path {path} --tag 1 --blocks {blocks} \
         --until-file /ack/stop --log /ack/acks & w=$!; \
         while kill -0 $w 2>/dev/null; do df -Pk /data | tail -n 1; sleep 1; done; wait $w",
        prepare = mode.prepare(),
        path = mode.path(),
        blocks = livedisk_node_e2e::BLOCKS,
    );
    cluster
        .run_pod(
            &ns.name,
            &PodSpec {
                name: "app",
                node,
                claim: "disk",
                mode,
                script: &script,
                restart_policy: "Never",
                privileged: false,
            },
        )
        .await?;
    cluster.wait_running(&ns.name, "app", 0, 180).await?;
    cluster.wait_acks(node, &ns.name, "acks", 100).await?;
    let before = eventually(60, "df output of the pod", || async {
        Ok(last_df_kib(&cluster.logs(&ns.name, "app").await?))
    })
    .await?;

    let claims = Api::<PersistentVolumeClaim>::namespaced(cluster.client.clone(), &ns.name);
    claims
        .patch(
            "disk",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"resources": {"requests": {"storage": "512Mi"}}}})),
        )
        .await
        .context("growing the PVC")?;
    let after = eventually(180, "the pod's filesystem to grow past 480 MiB", || async {
        let kib = last_df_kib(&cluster.logs(&ns.name, "app").await?).unwrap_or(0);
        Ok((kib > 480 * 1024).then_some(kib))
    })
    .await;
    let after = match after {
        Ok(kib) => kib,
        Err(e) => {
            eprintln!("{}", cluster.describe(&ns.name, "app").await);
            return Err(e);
        }
    };
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

    std::fs::write(cluster.ack_path(node, &ns.name, "stop"), b"")?;
    cluster
        .wait_phase(&ns.name, "app", "Succeeded", 120)
        .await?;
    cluster.delete_pod(&ns.name, "app").await?;
    let reader = verify_script(mode, "acks");
    cluster
        .run_pod(
            &ns.name,
            &PodSpec {
                name: "reader",
                node,
                claim: "disk",
                mode,
                script: &reader,
                restart_policy: "Never",
                privileged: false,
            },
        )
        .await?;
    cluster
        .wait_phase(&ns.name, "reader", "Succeeded", 180)
        .await?;
    let report = cluster.logs(&ns.name, "reader").await?;
    ensure!(
        report.contains("\"mismatches\": []"),
        "the reader's report: {report}"
    );
    println!("filesystem grew from {before} KiB to {after} KiB under a writing pod");
    cluster.delete_pod(&ns.name, "reader").await?;
    ns.delete().await
}
