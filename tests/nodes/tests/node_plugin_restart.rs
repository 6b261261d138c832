//! The node plugin goes away under a writing pod: `kubectl delete pod` of the node plugin, then
//! `helm upgrade` to a rebuilt node-plugin image. The data path (the engine daemon and its
//! FUSE front ends, the loop device) lives in the engine pod and the kernel, so the writer sees no
//! I/O error and every acknowledged write reads back; the restarted plugin then unstages the
//! volume (no loop device left) and stages it again for the reader.

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use livedisk_node_e2e::{
    Cluster, PodSpec, TestNamespace, VolumeMode, ack_count, writer_until_stopped_script,
};

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
    let replaced_pod = cluster.wait_node_plugin_replaced(node, &old).await?;
    let replaced = replaced_pod.name_any();
    let after_delete = cluster
        .wait_acks(node, &ns.name, "acks", before + 200)
        .await?;

    // 2. helm upgrade to a rebuilt node-plugin image (a new image with a digest of its own,
    //    imported into the nodes as a registry-less node receives one): the DaemonSet rolls it.
    let old_image_id = container_image_id(&replaced_pod);
    let tag = format!(
        "upgrade-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let output = cluster.hack("hack/chart-upgrade.sh", &["--image-tag", &tag, "--rebuild"])?;
    let rebuilt_id = output
        .lines()
        .find_map(|l| l.strip_prefix("image-id: "))
        .with_context(|| format!("chart-upgrade.sh printed no image ID:\n{output}"))?
        .to_string();
    let upgraded = cluster.wait_node_plugin_replaced(node, &replaced).await?;
    let image = upgraded
        .spec
        .as_ref()
        .and_then(|s| s.containers.first())
        .and_then(|c| c.image.clone())
        .unwrap_or_default();
    ensure!(
        image.ends_with(&format!(":{tag}")),
        "the upgraded node plugin runs {image}"
    );
    let new_image_id = container_image_id(&upgraded);
    ensure!(
        new_image_id.ends_with(&rebuilt_id) && new_image_id != old_image_id,
        "the upgraded node plugin runs image {new_image_id}, not the rebuilt {rebuilt_id} (before: {old_image_id})"
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
    // kubelet unpublishes and unstages through the restarted node plugin, which must still know
    // the loop device it did not set up itself: none is left behind.
    let volume = cluster.volume_handle(&ns.name, "disk").await?;
    cluster.delete_pod(&ns.name, "writer").await?;
    cluster.wait_no_loop_device(node, &volume).await?;

    cluster
        .read_back(&ns.name, node, "disk", mode, "acks", "")
        .await?;
    println!(
        "{acks} acknowledged writes through a node plugin deletion and an upgrade; writer: {summary}"
    );
    ns.delete().await
}

/// The image (by digest) kubelet runs the pod's first container (the node plugin) from.
fn container_image_id(pod: &Pod) -> String {
    let first = pod
        .spec
        .as_ref()
        .and_then(|s| s.containers.first())
        .map(|c| c.name.as_str());
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|statuses| statuses.iter().find(|c| Some(c.name.as_str()) == first))
        .map(|c| c.image_id.clone())
        .unwrap_or_default()
}
