//! Snapshots as users take and use them, with pods as the consumers: a restore outlives its
//! source PVC, a restore whose consumer runs on the other node is made there and reads the
//! snapshot's point in time (a cross-node restore), and deleting everything
//! leaves nothing of it in the node's pool; a backup tool in a pod reads a snapshot's allocated blocks and
//! the changed blocks between two snapshots through the snapshot-metadata sidecar's Service
//! (snapshot-metadata-lister and snapshot-metadata-verifier, clients of
//! kubernetes-csi/external-snapshot-metadata), with a token of its own ServiceAccount.

use std::path::Path;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::api::{Api, DeleteParams, DynamicObject};
use kube::core::{ApiResource, GroupVersionKind};
use livedisk_e2e::{eventually, expected_extents};
use livedisk_node_e2e::{
    Cluster, PodClaim, PodSpec, TestNamespace, VolumeMode, ack_count, writer_script,
};
use serde_json::json;

/// The node's pool directory (the chart's `host.poolDir`, node-private), on this host.
fn pool_dir(cluster: &Cluster, node: &str) -> std::path::PathBuf {
    cluster
        .state
        .join("nodes")
        .join(node)
        .join("var/lib/livedisk/pools")
}

/// The entries of a pool (one directory per volume); none before the node's first volume.
fn pool_entries(pool: &Path) -> Result<Vec<String>> {
    match std::fs::read_dir(pool) {
        Ok(entries) => Ok(entries
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(vec![]),
        Err(e) => Err(e).with_context(|| format!("reading {}", pool.display())),
    }
}

#[tokio::test]
async fn a_restore_outlives_its_source_pvc_and_deleting_everything_empties_the_pool() -> Result<()>
{
    let cluster = Cluster::connect().await?;
    let ns = TestNamespace::create(&cluster.client, "restore").await?;
    let (node, other) = ("node-b", "node-a");
    let mode = VolumeMode::Block;
    let pool = pool_dir(&cluster, node);
    let before = pool_entries(&pool)?;
    cluster.create_pvc(&ns.name, "disk", mode).await?;
    let source = {
        let write = writer_script(mode, "acks", 5);
        cluster
            .run_to_completion(
                &ns.name,
                &PodSpec::once("writer", node, "disk", mode, &write),
            )
            .await?;
        cluster.volume_handle(&ns.name, "disk").await?
    };
    let acks = ack_count(&cluster.ack_log(node, &ns.name, "acks")?);
    ensure!(acks > 0, "the writer acknowledged nothing");
    ensure!(
        pool_entries(&pool)?.contains(&source),
        "volume {source} is not in the pool of {node}, where its consumer ran"
    );
    cluster.snapshot_ready(&ns.name, "snap", "disk").await?;
    // After the snapshot the source changes everywhere the writer wrote: a restore that showed
    // the source's present instead of the snapshot's point in time fails the verifier.
    let overwrite = format!(
        "dd if=/dev/zero of=/dev/xvda bs=1M count={} oflag=direct status=none",
        livedisk_node_e2e::BLOCKS * 4096 / (1 << 20)
    );
    cluster
        .run_to_completion(
            &ns.name,
            &PodSpec::once("overwriter", node, "disk", mode, &overwrite),
        )
        .await?;

    // The source PVC goes (its volume with it: the driver's inventory object is gone, while the
    // engine keeps the layers the snapshot still needs); the snapshot stays restorable.
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(cluster.client.clone(), &ns.name);
    claims.delete("disk", &DeleteParams::default()).await?;
    let volumes = Api::<DynamicObject>::all_with(
        cluster.client.clone(),
        &ApiResource::from_gvk(&GroupVersionKind::gvk(
            "livedisk.io",
            "v1alpha1",
            "LivediskVolume",
        )),
    );
    eventually(120, "the source volume deleted", || {
        let volumes = volumes.clone();
        let source = source.clone();
        async move { Ok(volumes.get_opt(&source).await?.is_none().then_some(())) }
    })
    .await?;
    cluster
        .create_pvc_from(&ns.name, "restored", mode, Some("snap"))
        .await?;
    let report = cluster
        .read_back(&ns.name, node, "restored", mode, "acks", "")
        .await?;
    let restored = cluster.volume_handle(&ns.name, "restored").await?;

    // A restore whose consumer lands on the other node: made there, read from the snapshot's
    // node until copied (a cross-node restore), with the snapshot's point in time.
    cluster
        .create_pvc_from(&ns.name, "elsewhere", mode, Some("snap"))
        .await?;
    let far_acks = cluster.ack_path(other, &ns.name, "acks");
    std::fs::create_dir_all(far_acks.parent().context("ack path")?)?;
    std::fs::copy(cluster.ack_path(node, &ns.name, "acks"), &far_acks)?;
    let far_report = cluster
        .read_back(&ns.name, other, "elsewhere", mode, "acks", "")
        .await?;
    let elsewhere = cluster.volume_handle(&ns.name, "elsewhere").await?;
    let placed = volumes.get(&elsewhere).await?;
    ensure!(
        placed.data["spec"]["nodeName"] == other,
        "the cross-node restore was made on {}",
        placed.data["spec"]["nodeName"]
    );
    println!("the cross-node restore on {other} read back: {far_report}");

    // Deleting the restores and the snapshot leaves nothing of them in the pool.
    for claim in ["restored", "elsewhere"] {
        claims.delete(claim, &DeleteParams::default()).await?;
    }
    cluster
        .volume_snapshots(&ns.name)
        .delete("snap", &DeleteParams::default())
        .await?;
    eventually(120, "nothing of this test left in the node's pool", || {
        let pool = pool.clone();
        let before = before.clone();
        async move {
            let left: Vec<String> = pool_entries(&pool)?
                .into_iter()
                .filter(|e| !before.contains(e))
                .collect();
            Ok(left.is_empty().then_some(()))
        }
    })
    .await?;
    ensure!(
        !pool_entries(&pool)?.contains(&restored),
        "the restored volume {restored} is still in the pool"
    );
    println!("{acks} acknowledged writes read back from a restore of a deleted PVC: {report}");
    ns.delete().await
}

/// `sh` that writes 4 KiB blocks of recognisable data at the given block indices.
fn write_blocks_script(blocks: &[u64], tag: &str) -> String {
    let mut script = String::from("set -e; ");
    for block in blocks {
        script.push_str(&format!(
            "printf '%-4096s' '{tag}-{block}' | dd of=/dev/xvda bs=4096 seek={block} count=1 \
             oflag=direct conv=notrunc status=none; "
        ));
    }
    script
}

/// The extents in snapshot-metadata-lister's JSON output (one array of responses per stream;
/// fields at zero are omitted), adjacent ones merged.
fn listed_extents(stdout: &str) -> Result<Vec<(u64, u64)>> {
    let mut extents: Vec<(u64, u64)> = Vec::new();
    for value in serde_json::Deserializer::from_str(stdout).into_iter::<serde_json::Value>() {
        let value = value.with_context(|| format!("lister output {stdout:?}"))?;
        let responses = match value {
            serde_json::Value::Array(items) => items,
            other => vec![other],
        };
        for response in responses {
            for block in response["block_metadata"].as_array().into_iter().flatten() {
                let offset = block["byte_offset"].as_u64().unwrap_or(0);
                let size = block["size_bytes"].as_u64().unwrap_or(0);
                match extents.last_mut() {
                    Some((o, l)) if *o + *l == offset => *l += size,
                    _ => extents.push((offset, size)),
                }
            }
        }
    }
    Ok(extents)
}

/// What a backup tool's ServiceAccount needs: find the SnapshotMetadataService and the snapshot
/// contents (cluster-wide), read VolumeSnapshots and request its own token for the sidecar's
/// audience (here), and be allowed by the sidecar (which checks `get volumesnapshots`).
async fn backup_account(cluster: &Cluster, ns: &str) -> Result<()> {
    let role = format!("livedisk-e2e-backup-{ns}");
    let objects = [
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "backup"}}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": "backup"},
            "rules": [
                {"apiGroups": ["snapshot.storage.k8s.io"], "resources": ["volumesnapshots"],
                 "verbs": ["get", "list"]},
                {"apiGroups": [""], "resources": ["serviceaccounts/token"],
                 "resourceNames": ["backup"], "verbs": ["create"]}]}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": "backup"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "backup"},
            "subjects": [{"kind": "ServiceAccount", "name": "backup", "namespace": ns}]}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": role, "labels": {"livedisk.io/e2e-namespace": ns}},
            "rules": [
                {"apiGroups": ["cbt.storage.k8s.io"], "resources": ["snapshotmetadataservices"],
                 "verbs": ["get", "list"]},
                {"apiGroups": ["snapshot.storage.k8s.io"], "resources": ["volumesnapshotcontents"],
                 "verbs": ["get", "list"]}]}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": role, "labels": {"livedisk.io/e2e-namespace": ns}},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": [{"kind": "ServiceAccount", "name": "backup", "namespace": ns}]}),
    ];
    for object in objects {
        cluster.create_object(ns, object).await?;
    }
    Ok(())
}

/// Removes the cluster-wide grants of [`backup_account`].
fn remove_backup_grants(ns: &str) -> Result<()> {
    let selector = format!("livedisk.io/e2e-namespace={ns}");
    let status = livedisk_e2e::kubectl()
        .args(["delete", "clusterrolebinding,clusterrole", "-l", &selector])
        .status()?;
    ensure!(
        status.success(),
        "kubectl delete of the backup grants failed"
    );
    Ok(())
}

/// A pod of the backup tool, as the `backup` ServiceAccount, on `node`.
fn backup_pod<'a>(name: &'a str, node: &'a str, script: &'a str) -> PodSpec<'a> {
    PodSpec {
        service_account: Some("backup"),
        ..PodSpec::once_without_claims(name, node, script)
    }
}

#[tokio::test]
async fn a_backup_pod_reads_allocated_and_changed_blocks_through_the_sidecar() -> Result<()> {
    let cluster = Cluster::connect().await?;
    let ns = TestNamespace::create(&cluster.client, "cbt").await?;
    let node = "node-a";
    let mode = VolumeMode::Block;
    backup_account(&cluster, &ns.name).await?;
    let result = async {
        cluster.create_pvc(&ns.name, "disk", mode).await?;
        let first = [0, 5, 100];
        let second = [5, 300, 1000];
        let write_first = write_blocks_script(&first, "one");
        cluster
            .run_to_completion(
                &ns.name,
                &PodSpec::once("write-one", node, "disk", mode, &write_first),
            )
            .await?;
        cluster.snapshot_ready(&ns.name, "s1", "disk").await?;
        let write_second = write_blocks_script(&second, "two");
        cluster
            .run_to_completion(
                &ns.name,
                &PodSpec::once("write-two", node, "disk", mode, &write_second),
            )
            .await?;
        cluster.snapshot_ready(&ns.name, "s2", "disk").await?;

        // The lister's stderr only when it fails: its JSON alone is the pod's output.
        let lister = |args: &str| {
            format!(
                "snapshot-metadata-lister -n {ns} {args} -o json -service-account backup \
                 -service-account-namespace {ns} 2>/tmp/err || {{ cat /tmp/err; exit 1; }}",
                ns = ns.name
            )
        };
        let allocated_script = lister("-s s1");
        let allocated = cluster
            .run_to_completion(&ns.name, &backup_pod("list-s1", node, &allocated_script))
            .await?;
        ensure!(
            listed_extents(&allocated)? == expected_extents(&first),
            "allocated blocks of s1: {allocated}"
        );
        let changed_script = lister("-s s2 -p s1");
        let changed = cluster
            .run_to_completion(&ns.name, &backup_pod("list-s2", node, &changed_script))
            .await?;
        ensure!(
            listed_extents(&changed)? == expected_extents(&second),
            "changed blocks s1 -> s2: {changed}"
        );

        // The verifier copies the changed blocks from a restore of s2 onto a restore of s1 and
        // finds the two equal: the changed-block list is complete.
        cluster
            .create_pvc_from(&ns.name, "r1", mode, Some("s1"))
            .await?;
        cluster
            .create_pvc_from(&ns.name, "r2", mode, Some("s2"))
            .await?;
        let verify = format!(
            "snapshot-metadata-verifier -n {ns} -s s2 -p s1 -service-account backup \
             -service-account-namespace {ns} -source-device-path=/dev/r2 \
             -target-device-path=/dev/r1",
            ns = ns.name
        );
        let verifier = PodSpec {
            claims: vec![
                PodClaim {
                    name: "r1",
                    mode,
                    path: "/dev/r1",
                },
                PodClaim {
                    name: "r2",
                    mode,
                    path: "/dev/r2",
                },
            ],
            ..backup_pod("verify", node, &verify)
        };
        let report = cluster.run_to_completion(&ns.name, &verifier).await?;
        ensure!(report.contains("match"), "verifier: {report}");
        println!("lister: s1 {allocated}; s1 -> s2 {changed}; verifier: {report}");
        Ok(())
    }
    .await;
    let removed = remove_backup_grants(&ns.name);
    result?;
    removed?;
    ns.delete().await
}

#[cfg(test)]
mod extents {
    use super::*;

    #[test]
    fn clusters_cover_blocks_and_merge() {
        assert_eq!(
            expected_extents(&[0, 5, 100]),
            vec![(0, 64 << 10), (384 << 10, 64 << 10)]
        );
        assert_eq!(expected_extents(&[15, 16]), vec![(0, 128 << 10)]);
    }

    #[test]
    fn lister_output_merges_adjacent_blocks() -> Result<()> {
        let out = r#"[{"block_metadata":[{"size_bytes":65536},{"byte_offset":65536,"size_bytes":65536}]}]"#;
        assert_eq!(listed_extents(out)?, vec![(0, 128 << 10)]);
        Ok(())
    }
}
