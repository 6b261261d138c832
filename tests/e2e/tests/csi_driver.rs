//! The CSI driver on the two-node local cluster of the processes layout, at the level of its
//! gRPC services: the changed-block service on the controller's socket as the sidecar calls it
//! (paging, resuming, the spec's codes), DiskSnapshot to VolumeSnapshot, and block expansion
//! through csi-resizer. These tests stand in for kubelet (NodeStage/NodePublish over the node
//! plugin's socket) to put data on volumes, since no kubelet runs in this layout; what users do
//! with pods (restores that outlive their source PVC, the cross-node restore error, clean pools,
//! a backup pod listing and verifying changed blocks through the sidecar) runs with real kubelets
//! in tests/nodes (snapshots.rs).

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::api::{Api, DeleteParams, DynamicObject};
use kube::core::{ApiResource, GroupVersionKind};
use kube::{Client, ResourceExt};
use livedisk_api::internal::{LivediskSnapshot, LivediskVolume};
use livedisk_csi_proto::csi::v1::*;
use livedisk_e2e::csi::{attach_block, detach_block, in_node};
use livedisk_e2e::disks::{must, pod, pvc};
use livedisk_e2e::{TestNamespace, bound_volume, client, eventually, expected_extents};
use serde_json::json;

async fn force_delete_pod(client: &Client, namespace: &str, name: &str) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let _ = pods
        .delete(
            name,
            &DeleteParams {
                grace_period_seconds: Some(0),
                ..Default::default()
            },
        )
        .await;
    Ok(())
}

/// The CSI snapshot ID behind a VolumeSnapshot (from its bound VolumeSnapshotContent).
async fn snapshot_handle(client: &Client, snapshot: &DynamicObject) -> Result<String> {
    let content_name = snapshot.data["status"]["boundVolumeSnapshotContentName"]
        .as_str()
        .context("VolumeSnapshot has no bound content")?;
    let gvk = GroupVersionKind::gvk("snapshot.storage.k8s.io", "v1", "VolumeSnapshotContent");
    let contents: Api<DynamicObject> = Api::all_with(client.clone(), &ApiResource::from_gvk(&gvk));
    let content = contents.get(content_name).await?;
    content.data["status"]["snapshotHandle"]
        .as_str()
        .map(str::to_string)
        .context("VolumeSnapshotContent has no snapshotHandle")
}

fn volume_snapshots(client: &Client, namespace: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("snapshot.storage.k8s.io", "v1", "VolumeSnapshot");
    Api::namespaced_with(client.clone(), namespace, &ApiResource::from_gvk(&gvk))
}

/// Writes 4 KiB blocks of recognisable data at the given block indices.
fn write_blocks(node_name: &str, device: &str, blocks: &[u64], tag: &str) -> Result<()> {
    for block in blocks {
        let script = format!(
            "printf '%-4096s' '{tag}-{block}' | dd of={device} bs=4096 seek={block} count=1 oflag=direct conv=notrunc status=none"
        );
        in_node(node_name, &["sh", "-c", &script])?;
    }
    Ok(())
}

async fn snapshot_ready(client: &Client, namespace: &str, name: &str, claim: &str) -> Result<()> {
    must(
        client,
        namespace,
        json!({"apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
        "metadata": {"name": name}, "spec": {"volumeSnapshotClassName": "livedisk",
        "source": {"persistentVolumeClaimName": claim}}}),
    )
    .await?;
    let snapshots = volume_snapshots(client, namespace);
    eventually(90, &format!("VolumeSnapshot {name} ReadyToUse"), || async {
        let object = snapshots.get(name).await?;
        Ok((object.data["status"]["readyToUse"] == json!(true)).then_some(()))
    })
    .await
}

#[tokio::test]
async fn get_metadata_delta_on_the_controller_socket_pages_resumes_and_answers_spec_codes()
-> Result<()> {
    let client = client().await?;
    let namespace = TestNamespace::create(&client, "cbt").await?;
    let ns = namespace.name.clone();
    must(&client, &ns, pvc("disk", None)).await?;
    must(&client, &ns, pod("consumer", "disk", None)).await?;
    let (volume_id, node_name) = bound_volume(&client, &ns, "disk", "consumer").await?;
    let device = attach_block(&node_name, &volume_id, "cbt").await?;
    let first = [0, 5, 100];
    let second = [5, 300, 1000];
    write_blocks(&node_name, &device, &first, "one")?;
    snapshot_ready(&client, &ns, "s1", "disk").await?;
    write_blocks(&node_name, &device, &second, "two")?;
    snapshot_ready(&client, &ns, "s2", "disk").await?;
    detach_block(&node_name, &volume_id, "cbt").await?;

    // The same service on the controller's socket, as the sidecar calls it: paging, resuming,
    // capacity in every message, and the spec's codes.
    let snapshots = volume_snapshots(&client, &ns);
    let s1 = snapshot_handle(&client, &snapshots.get("s1").await?).await?;
    let s2 = snapshot_handle(&client, &snapshots.get("s2").await?).await?;
    let mut metadata = livedisk_e2e::csi::snapshot_metadata().await?;
    let delta = |starting_offset: i64, max_results: i32| GetMetadataDeltaRequest {
        base_snapshot_id: s1.clone(),
        target_snapshot_id: s2.clone(),
        starting_offset,
        max_results,
        ..Default::default()
    };
    let mut stream = metadata.get_metadata_delta(delta(0, 1)).await?.into_inner();
    let mut paged = Vec::new();
    while let Some(message) = stream.message().await? {
        assert_eq!(message.volume_capacity_bytes, 64 << 20);
        assert_eq!(
            message.block_metadata_type,
            BlockMetadataType::VariableLength as i32
        );
        assert!(
            message.block_metadata.len() <= 1,
            "max_results is per message"
        );
        paged.extend(
            message
                .block_metadata
                .iter()
                .map(|b| (b.byte_offset as u64, b.size_bytes as u64)),
        );
    }
    assert_eq!(paged, expected_extents(&second), "paged delta");
    assert!(
        paged.windows(2).all(|w| w[0].0 + w[0].1 <= w[1].0),
        "ascending, non-overlapping"
    );
    let resume_at = paged[1].0 as i64;
    let mut stream = metadata
        .get_metadata_delta(delta(resume_at, 0))
        .await?
        .into_inner();
    let mut resumed = Vec::new();
    while let Some(message) = stream.message().await? {
        resumed.extend(
            message
                .block_metadata
                .iter()
                .map(|b| (b.byte_offset as u64, b.size_bytes as u64)),
        );
    }
    assert_eq!(resumed, paged[1..].to_vec(), "resumed from starting_offset");
    let code = |result: Result<
        tonic::Response<tonic::Streaming<GetMetadataDeltaResponse>>,
        tonic::Status,
    >| { result.err().map(|status| status.code()) };
    assert_eq!(
        code(metadata.get_metadata_delta(delta(64 << 20, 0)).await),
        Some(tonic::Code::OutOfRange)
    );
    assert_eq!(
        code(metadata.get_metadata_delta(delta(-1, 0)).await),
        Some(tonic::Code::InvalidArgument)
    );
    let mut unknown = delta(0, 0);
    unknown.target_snapshot_id = "snap-00000000-0000-4000-8000-000000000000".into();
    assert_eq!(
        code(metadata.get_metadata_delta(unknown).await),
        Some(tonic::Code::NotFound)
    );
    let mut empty = delta(0, 0);
    empty.base_snapshot_id.clear();
    assert_eq!(
        code(metadata.get_metadata_delta(empty).await),
        Some(tonic::Code::InvalidArgument)
    );
    let mut reversed = delta(0, 0);
    std::mem::swap(
        &mut reversed.base_snapshot_id,
        &mut reversed.target_snapshot_id,
    );
    assert!(
        code(metadata.get_metadata_delta(reversed).await).is_some(),
        "a base newer than the target is refused"
    );

    for pod_name in ["consumer"] {
        force_delete_pod(&client, &ns, pod_name).await?;
    }
    namespace.delete().await
}

/// snapshot-metadata-lister (the harness's build, on PATH from `.livedisk/env`) on the host: a
/// backup tool's client of the real external-snapshot-metadata sidecar (its address in the
/// SnapshotMetadataService is on loopback), as the namespace's `backup` ServiceAccount.
fn lister(ns: &str, args: &[&str]) -> Result<std::process::Output> {
    std::process::Command::new("snapshot-metadata-lister")
        .args(["-n", ns, "-o", "json", "-service-account", "backup"])
        .args(["-service-account-namespace", ns])
        .args(args)
        .output()
        .context("running snapshot-metadata-lister (on PATH from .livedisk/env)")
}

/// The extents of the lister's JSON (one array of responses per stream), adjacent ones merged.
fn listed_extents(output: &std::process::Output) -> Result<Vec<(u64, u64)>> {
    anyhow::ensure!(
        output.status.success(),
        "snapshot-metadata-lister failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let mut extents: Vec<(u64, u64)> = Vec::new();
    for value in serde_json::Deserializer::from_str(&stdout).into_iter::<serde_json::Value>() {
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

/// Deletes VolumeSnapshots and waits until their storage snapshots are gone too (merged away).
async fn delete_snapshots(client: &Client, ns: &str, names: &[(&str, &str)]) -> Result<()> {
    let snapshots = volume_snapshots(client, ns);
    let internal: Api<LivediskSnapshot> = Api::all(client.clone());
    for (name, _) in names {
        snapshots.delete(name, &DeleteParams::default()).await?;
    }
    for (name, handle) in names {
        eventually(
            90,
            &format!("VolumeSnapshot {name} and {handle} to go"),
            || async {
                let gone = snapshots.get_opt(name).await?.is_none()
                    && internal.get_opt(handle).await?.is_none();
                Ok(gone.then_some(()))
            },
        )
        .await?;
    }
    Ok(())
}

/// Issue 12: a backup tool keeps only the CSI handle of the snapshot it backed up last and
/// deletes its VolumeSnapshot; its next incremental backup asks the sidecar for the changes since
/// that handle. The deleted snapshot's tombstone answers exactly the writes after it, until no
/// later snapshot of the volume is left.
#[tokio::test]
async fn get_metadata_delta_from_a_deleted_base_through_the_sidecar() -> Result<()> {
    let client = client().await?;
    let namespace = TestNamespace::create(&client, "tomb").await?;
    let ns = namespace.name.clone();
    // The sidecar lets the backup tool's account in if it may get VolumeSnapshots here.
    for object in [
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "backup"}}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": "backup"},
            "rules": [{"apiGroups": ["snapshot.storage.k8s.io"], "resources": ["volumesnapshots"],
                       "verbs": ["get", "list"]}]}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": "backup"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "backup"},
            "subjects": [{"kind": "ServiceAccount", "name": "backup", "namespace": ns}]}),
    ] {
        must(&client, &ns, object).await?;
    }
    must(&client, &ns, pvc("disk", None)).await?;
    must(&client, &ns, pod("consumer", "disk", None)).await?;
    let (volume_id, node_name) = bound_volume(&client, &ns, "disk", "consumer").await?;
    let device = attach_block(&node_name, &volume_id, "tomb").await?;
    // 16 blocks per cluster: the second round rewrites a cluster of the first (block 5), and the
    // first has clusters the second never touches (blocks 100, 2000).
    let (first, second, third) = ([0, 100, 2000], [5, 300, 1000], [301, 3000]);
    write_blocks(&node_name, &device, &first, "one")?;
    snapshot_ready(&client, &ns, "s1", "disk").await?;
    write_blocks(&node_name, &device, &second, "two")?;
    snapshot_ready(&client, &ns, "s2", "disk").await?;
    write_blocks(&node_name, &device, &third, "three")?;
    snapshot_ready(&client, &ns, "s3", "disk").await?;

    let snapshots = volume_snapshots(&client, &ns);
    let mut handles = Vec::new();
    for name in ["s1", "s2", "s3"] {
        handles.push(snapshot_handle(&client, &snapshots.get(name).await?).await?);
    }
    let s1 = handles[0].clone();
    assert_eq!(
        listed_extents(&lister(&ns, &["-s", "s2", "-P", &s1])?)?,
        expected_extents(&second),
        "before the deletion"
    );

    // The backup tool deletes s1 (a real merge on the node) and keeps only its handle.
    delete_snapshots(&client, &ns, &[("s1", &s1)]).await?;
    assert_eq!(
        listed_extents(&lister(&ns, &["-s", "s2", "-P", &s1])?)?,
        expected_extents(&second),
        "s1 deleted -> s2: exactly the second round"
    );
    let second_and_third: Vec<u64> = second.iter().chain(&third).copied().collect();
    assert_eq!(
        listed_extents(&lister(&ns, &["-s", "s3", "-P", &s1])?)?,
        expected_extents(&second_and_third),
        "s1 deleted -> s3"
    );
    // Nothing else answers for it: the snapshot is gone.
    let mut metadata = livedisk_e2e::csi::snapshot_metadata().await?;
    let allocated = metadata
        .get_metadata_allocated(GetMetadataAllocatedRequest {
            snapshot_id: s1.clone(),
            ..Default::default()
        })
        .await;
    assert_eq!(
        allocated.err().map(|status| status.code()),
        Some(tonic::Code::NotFound),
        "GetMetadataAllocated of a deleted snapshot"
    );

    // No later snapshot left: the deleted base no longer answers, also not for a snapshot taken
    // afterwards.
    delete_snapshots(&client, &ns, &[("s2", &handles[1]), ("s3", &handles[2])]).await?;
    snapshot_ready(&client, &ns, "s4", "disk").await?;
    let late = lister(&ns, &["-s", "s4", "-P", &s1])?;
    let stderr = String::from_utf8_lossy(&late.stderr).to_lowercase();
    assert!(
        !late.status.success() && stderr.contains("not") && stderr.contains("found"),
        "a base without a later snapshot must be NOT_FOUND: {stderr}"
    );
    detach_block(&node_name, &volume_id, "tomb").await?;

    force_delete_pod(&client, &ns, "consumer").await?;
    namespace.delete().await
}

#[tokio::test]
async fn disk_snapshot_becomes_a_ready_volume_snapshot_and_goes_with_it() -> Result<()> {
    let client = client().await?;
    let operator = livedisk_e2e::operator::Operator::start()?;
    let namespace = TestNamespace::create(&client, "dsnap").await?;
    let ns = namespace.name.clone();
    must(&client, &ns, pvc("disk", None)).await?;
    must(&client, &ns, pod("consumer", "disk", None)).await?;
    let (volume_id, _node) = bound_volume(&client, &ns, "disk", "consumer").await?;

    must(&client, &ns, json!({"apiVersion": "livedisk.io/v1alpha1", "kind": "DiskSnapshot",
        "metadata": {"name": "nightly"}, "spec": {"source": {"persistentVolumeClaimName": "disk"}}})).await?;
    let disk_snapshots: Api<livedisk_api::DiskSnapshot> = Api::namespaced(client.clone(), &ns);
    let status = eventually(90, "DiskSnapshot Ready=True", || async {
        let object = disk_snapshots.get("nightly").await?;
        let status = object.status.clone().unwrap_or_default();
        let ready =
            livedisk_api::conditions::is_true(&status.conditions, livedisk_api::conditions::READY);
        Ok((ready && status.observed_generation == object.metadata.generation).then_some(status))
    })
    .await
    .with_context(|| operator.log())?;
    assert_eq!(status.volume_snapshot_name.as_deref(), Some("nightly"));
    assert_eq!(status.restore_size.as_deref(), Some("64Mi"));
    assert_eq!(status.phase, livedisk_api::Phase::Ready);

    // The standard VolumeSnapshot is the one the driver took: its content names our snapshot.
    let snapshots = volume_snapshots(&client, &ns);
    let volume_snapshot = snapshots.get("nightly").await?;
    assert_eq!(volume_snapshot.data["status"]["readyToUse"], json!(true));
    let handle = snapshot_handle(&client, &volume_snapshot).await?;
    let internal: Api<LivediskSnapshot> = Api::all(client.clone());
    assert_eq!(internal.get(&handle).await?.spec.volume_id, volume_id);
    // The status names the content and the snapshot handle, and the space the layer holds.
    assert_eq!(status.snapshot_handle.as_deref(), Some(handle.as_str()));
    assert_eq!(
        status.volume_snapshot_content_name.as_deref(),
        volume_snapshot.data["status"]["boundVolumeSnapshotContentName"].as_str()
    );
    let held = eventually(60, "the space the snapshot holds", || async {
        let status = disk_snapshots
            .get("nightly")
            .await?
            .status
            .unwrap_or_default();
        Ok(status.allocated_bytes)
    })
    .await?;
    assert!(held > 0, "a sealed qcow2 layer holds at least its header");
    let object = disk_snapshots.get("nightly").await?;
    assert!(
        object
            .finalizers()
            .iter()
            .any(|f| f == "livedisk.io/snapshot"),
        "{:?}",
        object.finalizers()
    );

    // Deleting the DiskSnapshot takes the VolumeSnapshot (owned) and the storage snapshot along;
    // the DiskSnapshot itself goes last (its finalizer waits for both).
    disk_snapshots
        .delete("nightly", &DeleteParams::default())
        .await?;
    eventually(90, "the DiskSnapshot to go", || async {
        Ok(disk_snapshots
            .get_opt("nightly")
            .await?
            .is_none()
            .then_some(()))
    })
    .await
    .with_context(|| operator.log())?;
    assert!(snapshots.get_opt("nightly").await?.is_none());
    assert!(internal.get_opt(&handle).await?.is_none());
    // deletionPolicy: Retain: the operator sets it on the bound content, so the storage snapshot
    // outlives the DiskSnapshot and its VolumeSnapshot.
    must(
        &client,
        &ns,
        json!({"apiVersion": "livedisk.io/v1alpha1", "kind": "DiskSnapshot",
        "metadata": {"name": "kept"}, "spec": {"source": {"persistentVolumeClaimName": "disk"},
        "deletionPolicy": "Retain"}}),
    )
    .await?;
    let contents: Api<DynamicObject> = Api::all_with(
        client.clone(),
        &ApiResource::from_gvk(&GroupVersionKind::gvk(
            "snapshot.storage.k8s.io",
            "v1",
            "VolumeSnapshotContent",
        )),
    );
    let content_name = eventually(
        90,
        "the retained snapshot's content to say Retain",
        || async {
            let Some(snapshot) = snapshots.get_opt("kept").await? else {
                return Ok(None);
            };
            let Some(content) = snapshot.data["status"]["boundVolumeSnapshotContentName"].as_str()
            else {
                return Ok(None);
            };
            let object = contents.get(content).await?;
            Ok((object.data["spec"]["deletionPolicy"] == json!("Retain"))
                .then(|| content.to_string()))
        },
    )
    .await
    .with_context(|| operator.log())?;
    let kept_handle = snapshot_handle(&client, &snapshots.get("kept").await?).await?;
    disk_snapshots
        .delete("kept", &DeleteParams::foreground())
        .await?;
    eventually(
        90,
        "the retained snapshot's VolumeSnapshot to go",
        || async { Ok(snapshots.get_opt("kept").await?.is_none().then_some(())) },
    )
    .await?;
    assert!(
        internal.get_opt(&kept_handle).await?.is_some(),
        "the storage snapshot of a Retain DiskSnapshot was deleted"
    );
    // Cleaning up what was retained is the administrator's job: the content, then the snapshot.
    contents
        .delete(&content_name, &DeleteParams::default())
        .await?;
    internal
        .delete(&kept_handle, &DeleteParams::default())
        .await?;
    eventually(90, "the retained storage snapshot to go", || async {
        Ok(internal
            .get_opt(&kept_handle)
            .await?
            .is_none()
            .then_some(()))
    })
    .await?;

    // A StorageClass's mergeBandwidthLimit is the default of its volumes' snapshots: a
    // snapshot in a class without one takes the volume's.
    let class = format!("{ns}-gentle");
    must(
        &client,
        &ns,
        json!({"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "metadata": {"name": class},
               "provisioner": livedisk_common::DRIVER_NAME, "volumeBindingMode": "WaitForFirstConsumer",
               "parameters": {"mergeBandwidthLimit": "3Mi"}}),
    )
    .await?;
    let mut gentle = pvc("gentle", None);
    gentle["spec"]["storageClassName"] = json!(class);
    must(&client, &ns, gentle).await?;
    must(&client, &ns, pod("gentle-consumer", "gentle", None)).await?;
    let (gentle_id, _) = bound_volume(&client, &ns, "gentle", "gentle-consumer").await?;
    let volumes: Api<LivediskVolume> = Api::all(client.clone());
    assert_eq!(
        volumes
            .get(&gentle_id)
            .await?
            .spec
            .merge_bandwidth_bytes_per_second,
        Some(3 << 20)
    );
    must(&client, &ns, json!({"apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
        "metadata": {"name": "gentle-snap"}, "spec": {"source": {"persistentVolumeClaimName": "gentle"}}})).await?;
    let gentle_snapshot = eventually(90, "VolumeSnapshot gentle-snap ready", || async {
        let vs = snapshots.get("gentle-snap").await?;
        Ok((vs.data["status"]["readyToUse"] == json!(true)).then_some(vs))
    })
    .await?;
    let gentle_handle = snapshot_handle(&client, &gentle_snapshot).await?;
    assert_eq!(
        internal
            .get(&gentle_handle)
            .await?
            .spec
            .merge_bandwidth_bytes_per_second,
        Some(3 << 20),
        "the volume's class limit is the snapshot's default"
    );
    snapshots
        .delete("gentle-snap", &DeleteParams::default())
        .await?;
    eventually(90, "the gentle snapshot to go", || async {
        Ok(internal
            .get_opt(&gentle_handle)
            .await?
            .is_none()
            .then_some(()))
    })
    .await?;
    force_delete_pod(&client, &ns, "gentle-consumer").await?;
    let classes: Api<k8s_openapi::api::storage::v1::StorageClass> = Api::all(client.clone());
    classes.delete(&class, &DeleteParams::default()).await?;

    force_delete_pod(&client, &ns, "consumer").await?;
    drop(operator);
    namespace.delete().await
}

/// A PVC grows through the standard path: csi-resizer calls ControllerExpandVolume, the node
/// plugin grows the volume in its engine, and the claim reports the new size (a block volume
/// needs no node expansion).
#[tokio::test]
async fn a_block_pvc_grows_through_csi_resizer() -> Result<()> {
    let client = client().await?;
    let namespace = TestNamespace::create(&client, "grow").await?;
    let ns = namespace.name.clone();
    must(&client, &ns, pvc("disk", None)).await?;
    must(&client, &ns, pod("consumer", "disk", None)).await?;
    let (volume_id, _node) = bound_volume(&client, &ns, "disk", "consumer").await?;

    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns);
    let patch = json!({"spec": {"resources": {"requests": {"storage": "128Mi"}}}});
    claims
        .patch(
            "disk",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await?;
    eventually(90, "the claim to report 128Mi", || async {
        let claim = claims.get("disk").await?;
        let capacity = claim
            .status
            .and_then(|s| s.capacity)
            .and_then(|c| c.get("storage").map(|q| q.0.clone()));
        Ok((capacity.as_deref() == Some("128Mi")).then_some(()))
    })
    .await?;
    let volumes: Api<LivediskVolume> = Api::all(client.clone());
    let volume = volumes.get(&volume_id).await?;
    assert_eq!(volume.spec.capacity_bytes, 128 << 20);
    assert_eq!(
        volume.status.and_then(|s| s.capacity_bytes),
        Some(128 << 20),
        "the node did not grow the volume in its engine"
    );

    force_delete_pod(&client, &ns, "consumer").await?;
    namespace.delete().await
}
