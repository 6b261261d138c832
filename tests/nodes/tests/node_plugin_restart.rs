//! The node plugin goes away under a writing pod: `kubectl delete pod` of the node plugin, then
//! `helm upgrade` to a new node-plugin image reference. The data path (the engine daemon and its
//! FUSE front ends, the loop device) lives in the engine pod and the kernel, so the writer sees no
//! I/O error and every acknowledged write reads back.

use anyhow::{Context, Result, ensure};
use kube::ResourceExt;
use livedisk_node_e2e::{
    Cluster, PodSpec, TestNamespace, VolumeMode, ack_count, writer_until_stopped_script,
};

/// The image tag `helm upgrade` moves the node plugin to.
const UPGRADE_TAG: &str = "0.1.0-upgrade";

#[tokio::test]
async fn a_writer_sees_no_error_while_the_node_plugin_is_deleted_and_upgraded() -> Result<()> {
    let cluster = Cluster::connect().await?;
    let ns = TestNamespace::create(&cluster.client, "plugin-restart").await?;
    let node = "node-a";
    let mode = VolumeMode::Block;
    cluster.create_pvc(&ns.name, "disk", mode).await?;
    let writer = writer_until_stopped_script(mode, "acks", "stop");
    cluster
        .run_pod(
            &ns.name,
            &PodSpec::once("writer", node, "disk", mode, &writer),
        )
        .await?;
    cluster.wait_running(&ns.name, "writer", 0, 180).await?;
    let before = cluster.wait_acks(node, &ns.name, "acks", 200).await?;

    // 1. kubectl delete pod: the DaemonSet starts a new node plugin.
    let old = cluster.node_plugin_pod(node).await?.name_any();
    livedisk_e2e::kubectl()
        .args([
            "-n",
            livedisk_node_e2e::CHART_NAMESPACE,
            "delete",
            "pod",
            &old,
            "--wait=true",
        ])
        .status()
        .context("kubectl delete pod")?
        .success()
        .then_some(())
        .context("kubectl delete pod failed")?;
    let replaced = cluster
        .wait_node_plugin_replaced(node, &old)
        .await?
        .name_any();
    let after_delete = cluster
        .wait_acks(node, &ns.name, "acks", before + 200)
        .await?;

    // 2. helm upgrade to another image reference of the node plugin: the DaemonSet rolls it.
    cluster.hack("hack/chart-upgrade.sh", &["--image-tag", UPGRADE_TAG])?;
    let upgraded = cluster.wait_node_plugin_replaced(node, &replaced).await?;
    let image = upgraded
        .spec
        .as_ref()
        .and_then(|s| s.containers.first())
        .and_then(|c| c.image.clone())
        .unwrap_or_default();
    ensure!(
        image.ends_with(UPGRADE_TAG),
        "the upgraded node plugin runs {image}"
    );
    cluster
        .wait_acks(node, &ns.name, "acks", after_delete + 200)
        .await?;

    std::fs::write(cluster.ack_path(node, &ns.name, "stop"), b"")?;
    cluster
        .wait_phase(&ns.name, "writer", "Succeeded", 120)
        .await?;
    let summary = cluster.logs(&ns.name, "writer").await?;
    let acks = ack_count(&cluster.ack_log(node, &ns.name, "acks")?);
    cluster.delete_pod(&ns.name, "writer").await?;

    cluster
        .read_back(&ns.name, node, "disk", mode, "acks", "")
        .await?;
    println!(
        "{acks} acknowledged writes through a node plugin deletion and an upgrade; writer: {summary}"
    );
    ns.delete().await
}
