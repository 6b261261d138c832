//! A node restart in miniature: kubelet, containerd (with its shims and every container, the
//! engine daemon's among them) and kube-proxy stop at once while a pod writes; the node's mounts
//! and loop devices are cleared as a reboot clears them (hack/node.sh stop); then the node starts
//! again. kubelet brings the pod back (a restarted container), the chart's pods come back, the
//! volume is staged again, and the pod's second run finds every write acknowledged before.

use anyhow::{Result, ensure};
use livedisk_node_e2e::{Cluster, PodSpec, TestNamespace, VolumeMode, ack_count, pod_phase};

#[tokio::test]
async fn a_pod_comes_back_after_its_node_restarts_with_every_acknowledged_write() -> Result<()> {
    let cluster = Cluster::connect().await?;
    let ns = TestNamespace::create(&cluster.client, "node-restart").await?;
    let node = "node-b";
    let mode = VolumeMode::Filesystem;
    cluster.create_pvc(&ns.name, "disk", mode).await?;
    // First run: write until killed. A later run (after the restart) finds the ack log and
    // verifies it instead; its exit code is the result.
    let script = format!(
        "if [ -s /ack/acks ]; then exec livedisk-verifier verify --path {path} --tag 1 --log /ack/acks; fi; {write}",
        path = mode.path(),
        write = livedisk_node_e2e::writer_until_stopped_script(mode, "acks", "never"),
    );
    cluster
        .run_pod(
            &ns.name,
            &PodSpec {
                restart_policy: "OnFailure",
                ..PodSpec::once("app", node, "disk", mode, &script)
            },
        )
        .await?;
    cluster.wait_running(&ns.name, "app", 0, 180).await?;
    cluster.wait_acks(node, &ns.name, "acks", 300).await?;

    let stop = cluster.hack("hack/node.sh", &["stop", node])?;
    let acks = ack_count(&cluster.ack_log(node, &ns.name, "acks")?);
    println!("{stop}");
    let start = cluster.hack("hack/node.sh", &["start", node])?;
    println!("{start}");

    let pod = cluster
        .wait_phase(&ns.name, "app", "Succeeded", 300)
        .await?;
    let restarts = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.first())
        .map(|c| c.restart_count)
        .unwrap_or(0);
    let report = cluster.logs(&ns.name, "app").await?;
    ensure!(
        restarts >= 1 && report.contains("\"mismatches\": []"),
        "pod {} after the restart (restarts {restarts}): {report}",
        pod_phase(&pod)
    );
    println!(
        "{acks} writes acknowledged before the node went down, all read back after it came back"
    );
    cluster.delete_pod(&ns.name, "app").await?;
    ns.delete().await
}
