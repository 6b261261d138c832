//! kubelet is the consumer: a pod with a livedisk PVC is started by kubelet on a real node
//! (NodeStage/NodePublish called by kubelet through the registered plugin), writes with the
//! checksummed writer, is deleted (kubelet unpublishes and unstages), and a second pod on the same
//! node reads every acknowledged write back.

use anyhow::{Result, ensure};
use livedisk_node_e2e::{Cluster, PodSpec, TestNamespace, VolumeMode, ack_count, writer_script};

async fn write_delete_read(mode: VolumeMode) -> Result<()> {
    let cluster = Cluster::connect().await?;
    let ns = TestNamespace::create(&cluster.client, "pods").await?;
    let node = "node-a";
    cluster.create_pvc(&ns.name, "disk", mode).await?;
    let writer = writer_script(mode, "acks", 8);
    cluster
        .run_pod(
            &ns.name,
            &PodSpec::once("writer", node, "disk", mode, &writer),
        )
        .await?;
    cluster
        .wait_phase(&ns.name, "writer", "Succeeded", 180)
        .await?;
    let acks = ack_count(&cluster.ack_log(node, &ns.name, "acks")?);
    ensure!(acks > 100, "the writer acknowledged only {acks} writes");
    cluster.delete_pod(&ns.name, "writer").await?;

    cluster
        .read_back(&ns.name, node, "disk", mode, "acks", "")
        .await?;
    println!("{mode:?}: {acks} acknowledged writes read back by a second pod");
    ns.delete().await
}

#[tokio::test]
async fn a_filesystem_pvc_written_by_one_pod_reads_back_in_the_next() -> Result<()> {
    write_delete_read(VolumeMode::Filesystem).await
}

#[tokio::test]
async fn a_block_pvc_written_by_one_pod_reads_back_in_the_next() -> Result<()> {
    write_delete_read(VolumeMode::Block).await
}
