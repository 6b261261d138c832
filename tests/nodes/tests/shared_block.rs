//! A ReadWriteMany block PVC used from both real nodes at once, as KubeVirt's VM live migration
//! uses one: kubelet stages it on the node that holds the volume and, through the same CSI calls,
//! on the other node, whose node plugin attaches it remotely (its engine opens the holder's
//! export front over TLS NBD). A pod on node-a writes with the checksummed writer and stays (the
//! volume stays attached there); a pod on node-b reads every acknowledged write back, then
//! writes itself, and a pod on node-a reads those back.

use anyhow::{Context, Result, ensure};
use kube::api::Api;
use livedisk_api::internal::{AttachmentPhase, LivediskAttachment};
use livedisk_e2e::eventually;
use livedisk_node_e2e::{BLOCKS, Cluster, PodSpec, TestNamespace, VolumeMode, ack_count};

const OWNER: &str = "node-a";
const OTHER: &str = "node-b";

/// A writer that stops when /ack/`stop` exists, marks /ack/`done`, and keeps the device open.
fn writer_then_hold(log: &str, stop: &str, done: &str) -> String {
    format!(
        "set -e; livedisk-verifier write --path /dev/xvda --tag 1 --blocks {BLOCKS} --until-file /ack/{stop} --log /ack/{log}; touch /ack/{done}; exec sleep 600"
    )
}

async fn write_until(cluster: &Cluster, ns: &str, node: &str, log: &str) -> Result<usize> {
    cluster.wait_acks(node, ns, log, 300).await?;
    std::fs::write(cluster.ack_path(node, ns, &format!("{log}.stop")), b"")?;
    let done = cluster.ack_path(node, ns, &format!("{log}.done"));
    eventually(120, "the writer stopped", || async {
        Ok(done.exists().then_some(()))
    })
    .await?;
    Ok(ack_count(&cluster.ack_log(node, ns, log)?))
}

/// The log of `node`'s writer, copied to `to`'s ack directory for its reader.
fn copy_log(cluster: &Cluster, ns: &str, from: &str, to: &str, log: &str) -> Result<()> {
    let text = cluster.ack_log(from, ns, log)?;
    let path = cluster.ack_path(to, ns, log);
    std::fs::create_dir_all(path.parent().context("ack dir")?)?;
    std::fs::write(path, text)?;
    Ok(())
}

#[tokio::test]
async fn a_read_write_many_block_pvc_is_used_from_both_nodes_at_once() -> Result<()> {
    let cluster = Cluster::connect().await?;
    let ns = TestNamespace::create(&cluster.client, "shared").await?;
    let mode = VolumeMode::Block;
    cluster
        .create_pvc_with(&ns.name, "shared", mode, "ReadWriteMany", None)
        .await?;
    // node-a first: WaitForFirstConsumer puts the volume there.
    let script = writer_then_hold("a.log", "a.log.stop", "a.log.done");
    cluster
        .run_pod(
            &ns.name,
            &PodSpec::once("writer-a", OWNER, "shared", mode, &script),
        )
        .await?;
    cluster.wait_running(&ns.name, "writer-a", 0, 180).await?;
    let written = write_until(&cluster, &ns.name, OWNER, "a.log").await?;
    let volume = cluster.volume_handle(&ns.name, "shared").await?;

    // node-b reads while node-a still has it attached.
    copy_log(&cluster, &ns.name, OWNER, OTHER, "a.log")?;
    let script = format!(
        "set -e; livedisk-verifier verify --path /dev/xvda --tag 1 --log /ack/a.log; livedisk-verifier write --path /dev/xvda --tag 1 --blocks {BLOCKS} --count 2000 --log /ack/b.log"
    );
    cluster
        .run_pod(
            &ns.name,
            &PodSpec::once("reader-writer-b", OTHER, "shared", mode, &script),
        )
        .await?;
    let attachments: Api<LivediskAttachment> = Api::all(cluster.client.clone());
    let attachment = eventually(180, "node-b's LivediskAttachment Ready", || async {
        Ok(attachments
            .get_opt(&format!("{volume}.{OTHER}"))
            .await?
            .filter(|a| {
                a.status
                    .as_ref()
                    .is_some_and(|s| s.phase == AttachmentPhase::Ready)
            }))
    })
    .await?;
    ensure!(attachment.spec.node_name == OWNER, "{:?}", attachment.spec);
    cluster
        .wait_phase(&ns.name, "reader-writer-b", "Succeeded", 240)
        .await?;
    let report = cluster.logs(&ns.name, "reader-writer-b").await?;
    ensure!(
        report.contains("\"mismatches\": []"),
        "node-b's reader: {report}"
    );
    cluster.delete_pod(&ns.name, "reader-writer-b").await?;
    eventually(120, "node-b's attachment withdrawn", || async {
        Ok(attachments
            .get_opt(&format!("{volume}.{OTHER}"))
            .await?
            .is_none()
            .then_some(()))
    })
    .await?;

    // node-a (still attached all along) reads node-b's writes.
    copy_log(&cluster, &ns.name, OTHER, OWNER, "b.log")?;
    cluster.delete_pod(&ns.name, "writer-a").await?;
    cluster
        .read_back(&ns.name, OWNER, "shared", mode, "b.log", "")
        .await?;
    println!("{written} writes of node-a read back on node-b, 2000 of node-b on node-a");
    ns.delete().await
}
