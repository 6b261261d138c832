//! A VM disk backed up with livedisk as users do it, on the chart's real nodes: a writer pod fills
//! a block PVC on node-b, a DiskSnapshot of it is served by a DiskExport (HTTP), a backup pod on
//! node-a (the livedisk image, the export's credentials Secret mounted as a volume) runs
//! `livedisk-csi backup full` against the endpoint in the DiskExport's status, across the pod
//! network to node-b's node plugin; a restore pod on node-b writes the backup onto a new PVC
//! (`volumeDevices`), and every write the writer acknowledged reads back from it.

use anyhow::{Context, Result, ensure};
use kube::Api;
use livedisk_api::{DiskExport, DiskSnapshot, Phase};
use livedisk_e2e::eventually;
use livedisk_node_e2e::{Cluster, PodSpec, TestNamespace, VolumeMode, ack_count, writer_script};
use serde_json::json;

/// A pod of the livedisk image (the chart's, as the node plugin runs it) running `script`, with
/// the node's ack directory at /ack, and optionally a Secret at /creds and a block claim at
/// /dev/xvda.
fn livedisk_pod(
    name: &str,
    node: &str,
    image: &str,
    script: &str,
    secret: Option<&str>,
    claim: Option<&str>,
    ack_dir: &str,
) -> serde_json::Value {
    let mut mounts = vec![json!({"name": "ack", "mountPath": "/ack"})];
    let mut volumes =
        vec![json!({"name": "ack", "hostPath": {"path": ack_dir, "type": "DirectoryOrCreate"}})];
    if let Some(secret) = secret {
        mounts.push(json!({"name": "creds", "mountPath": "/creds", "readOnly": true}));
        volumes.push(json!({"name": "creds", "secret": {"secretName": secret}}));
    }
    let mut devices = vec![];
    if let Some(claim) = claim {
        devices.push(json!({"name": "disk", "devicePath": "/dev/xvda"}));
        volumes.push(json!({"name": "disk", "persistentVolumeClaim": {"claimName": claim}}));
    }
    json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": node},
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 2,
            "automountServiceAccountToken": false,
            "containers": [{
                "name": "main", "image": image, "imagePullPolicy": "Never",
                "command": ["sh", "-c", script],
                "securityContext": {"runAsUser": 0},
                "volumeMounts": mounts, "volumeDevices": devices,
            }],
            "volumes": volumes,
        }
    })
}

#[tokio::test]
async fn a_backup_pod_reads_a_disk_export_across_nodes_and_a_restore_pod_writes_it_back()
-> Result<()> {
    let cluster = Cluster::connect().await?;
    let ns = TestNamespace::create(&cluster.client, "export").await?;
    let (home, reader) = ("node-b", "node-a");
    let mode = VolumeMode::Block;
    cluster.create_pvc(&ns.name, "disk", mode).await?;
    let write = writer_script(mode, "acks", 5);
    cluster
        .run_to_completion(
            &ns.name,
            &PodSpec::once("writer", home, "disk", mode, &write),
        )
        .await?;
    let acks = ack_count(&cluster.ack_log(home, &ns.name, "acks")?);
    ensure!(acks > 0, "the writer acknowledged nothing");

    cluster
        .create_object(
            &ns.name,
            json!({"apiVersion": "livedisk.io/v1alpha1", "kind": "DiskSnapshot", "metadata": {"name": "snap"},
                   "spec": {"source": {"persistentVolumeClaimName": "disk"}}}),
        )
        .await?;
    let snapshots: Api<DiskSnapshot> = Api::namespaced(cluster.client.clone(), &ns.name);
    eventually(120, "DiskSnapshot snap Ready", || async {
        let s = snapshots.get("snap").await?.status.unwrap_or_default();
        Ok((s.phase == Phase::Ready).then_some(()))
    })
    .await?;
    cluster
        .create_object(
            &ns.name,
            json!({"apiVersion": "livedisk.io/v1alpha1", "kind": "DiskExport", "metadata": {"name": "backup"},
                   "spec": {"snapshotName": "snap", "protocol": "HTTP", "ttlSeconds": 3600}}),
        )
        .await?;
    let exports: Api<DiskExport> = Api::namespaced(cluster.client.clone(), &ns.name);
    let status = eventually(120, "DiskExport backup Ready", || async {
        let s = exports.get("backup").await?.status.unwrap_or_default();
        Ok((s.phase == Phase::Ready).then_some(s))
    })
    .await?;
    ensure!(
        status.node_name.as_deref() == Some(home),
        "served by {status:?}"
    );
    let endpoint = status.endpoint.context("no endpoint")?;
    let secret = status
        .credentials_secret_name
        .context("no credentials Secret")?;

    // The backup tool: the livedisk image on the other node, the Secret mounted as a volume.
    let plugin = cluster.node_plugin_pod(home).await?;
    let image = plugin
        .spec
        .as_ref()
        .and_then(|s| s.containers.first())
        .and_then(|c| c.image.clone())
        .context("the node plugin's image")?;
    let ack_dir = |node: &str| {
        cluster
            .ack_path(node, &ns.name, "")
            .strip_prefix(cluster.state.join("nodes").join(node))
            .map(|p| format!("/{}", p.display()))
    };
    let backup = format!(
        "set -e; livedisk-csi backup full --url {endpoint} --credentials /creds --output /ack/full.raw"
    );
    cluster
        .create_object(
            &ns.name,
            livedisk_pod(
                "backup",
                reader,
                &image,
                &backup,
                Some(&secret),
                None,
                &ack_dir(reader)?,
            ),
        )
        .await?;
    let finished = cluster
        .wait_phase(&ns.name, "backup", "Succeeded", 240)
        .await;
    let output = cluster.logs(&ns.name, "backup").await.unwrap_or_default();
    finished.with_context(|| format!("the backup pod:\n{output}"))?;
    ensure!(
        output.contains("\"bytesRead\""),
        "no summary from the backup pod: {output}"
    );
    cluster.delete_pod(&ns.name, "backup").await?;

    // The backup's files go to the node of the restore (a backup store, in miniature).
    for file in ["full.raw", "full.raw.backup.json"] {
        let to = cluster.ack_path(home, &ns.name, file);
        std::fs::create_dir_all(to.parent().context("ack dir")?)?;
        std::fs::copy(cluster.ack_path(reader, &ns.name, file), &to)
            .with_context(|| format!("copying {file}"))?;
    }
    cluster.create_pvc(&ns.name, "restored", mode).await?;
    let restore = "set -e; livedisk-csi backup restore --full /ack/full.raw --target /dev/xvda";
    cluster
        .create_object(
            &ns.name,
            livedisk_pod(
                "restore",
                home,
                &image,
                restore,
                None,
                Some("restored"),
                &ack_dir(home)?,
            ),
        )
        .await?;
    let finished = cluster
        .wait_phase(&ns.name, "restore", "Succeeded", 240)
        .await;
    let output = cluster.logs(&ns.name, "restore").await.unwrap_or_default();
    finished.with_context(|| format!("the restore pod:\n{output}"))?;
    cluster.delete_pod(&ns.name, "restore").await?;
    let report = cluster
        .read_back(&ns.name, home, "restored", mode, "acks", "")
        .await?;
    println!(
        "{acks} acknowledged writes read back from a restore of a backup over a DiskExport: {report}"
    );
    ns.delete().await
}
