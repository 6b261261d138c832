//! DiskSnapshot of a KubeVirt VirtualMachine, with the real operator, snapshot-controller and
//! csi-snapshotter (CSIVolumeGroupSnapshot gate) and KubeVirt's own CRDs. No KubeVirt controller
//! runs here: the tests create the VirtualMachine and VirtualMachineInstance objects themselves
//! and set the instance's status (Running, AgentConnected) as virt-handler would.
//!
//! * A stopped VM with disks on two nodes: one VolumeGroupSnapshot per node, each volume's member
//!   restores with its data, volumes that are not livedisk claims are listed as skipped
//!   (`PartialSnapshot`), the selection labels are gone afterwards, and deleting the DiskSnapshot
//!   (`deletionPolicy: Retain`) deletes the groups and keeps their contents and the storage
//!   snapshots, which go once an administrator deletes the contents with policy Delete.
//! * A running VM without a guest agent whose disks are on two nodes is refused, and nothing is
//!   taken; `freeze: Required` without an agent is refused too.
//!
//! The freeze tests (a guest agent connected) run against the virt-api stand-in; see
//! `vm_snapshot_freeze.rs`.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams,
};
use kube::{Client, ResourceExt};
use livedisk_api::DiskSnapshot;
use livedisk_api::internal::LivediskSnapshot;
use livedisk_e2e::csi::{attach_block, detach_block};
use livedisk_e2e::disks::{ScratchDir, claim_bound_on, host_device, must, pvc};
use livedisk_e2e::operator::Operator;
use livedisk_e2e::phases::{verify, write_phase};
use livedisk_e2e::vm::{
    disk_snapshot, group_snapshot_contents, group_snapshots, instance, member_content,
    virtual_machine, wait_for_phase,
};
use livedisk_e2e::{TestNamespace, bound_volume, client, eventually};
use serde_json::json;

const NODE: &str = "node-a";
const OTHER: &str = "node-b";

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A claim bound to a PersistentVolume of another CSI driver (made by hand, bound by the
/// controller manager): a VM volume the snapshot must leave out and report.
async fn foreign_claim(client: &Client, ns: &str, name: &str) -> Result<()> {
    let pv_name = format!("{ns}-{name}");
    must(
        client,
        "",
        json!({"apiVersion": "v1", "kind": "PersistentVolume",
               "metadata": {"name": pv_name},
               "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
                        "storageClassName": "", "persistentVolumeReclaimPolicy": "Retain",
                        "claimRef": {"namespace": ns, "name": name},
                        "csi": {"driver": "nfs.example.com", "volumeHandle": pv_name}}}),
    )
    .await?;
    must(
        client,
        ns,
        json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
               "metadata": {"name": name},
               "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "",
                        "volumeName": pv_name,
                        "resources": {"requests": {"storage": "1Gi"}}}}),
    )
    .await?;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
    eventually(60, "the foreign claim bound", || async {
        let claim = claims.get(name).await?;
        Ok((claim.status.and_then(|s| s.phase).as_deref() == Some("Bound")).then_some(()))
    })
    .await
}

/// The CSI snapshot handles (the driver's `LivediskSnapshot` names) of member VolumeSnapshots.
async fn member_handles(
    client: &Client,
    ns: &str,
    members: impl Iterator<Item = &String>,
) -> Result<Vec<String>> {
    let mut handles = Vec::new();
    for member in members {
        handles.push(
            member_content(client, ns, member).await?.data["status"]["snapshotHandle"]
                .as_str()
                .context("member content without snapshotHandle")?
                .to_string(),
        );
    }
    Ok(handles)
}

#[tokio::test]
async fn a_stopped_vm_is_one_group_per_node_and_each_volume_restores() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let client = client().await?;
    let operator = Operator::start()?;
    let namespace = TestNamespace::create(&client, "vm-snapshot").await?;
    let ns = namespace.name.clone();
    let dir = ScratchDir::new("vm-snapshot")?;
    let result = async {
        let mut logs = BTreeMap::new();
        for (tag, claim, node) in [
            (11u64, "root", NODE),
            (12, "data", NODE),
            (13, "logs", OTHER),
        ] {
            let volume = claim_bound_on(&client, &ns, claim, node).await?;
            let device = host_device(node, &attach_block(node, &volume, claim).await?)?;
            let log = dir.0.join(format!("{claim}.log"));
            write_phase(&device, tag, 512, &log)?;
            detach_block(node, &volume, claim).await?;
            logs.insert(claim.to_string(), (tag, log, node));
        }
        foreign_claim(&client, &ns, "shared").await?;
        must(
            &client,
            &ns,
            virtual_machine("web", &["root", "data", "logs", "shared"], true),
        )
        .await?;
        // Retain: deleting the DiskSnapshot must leave its snapshots in place.
        let mut request = disk_snapshot("web-snap", "web", "Auto", None);
        request["spec"]["deletionPolicy"] = json!("Retain");
        must(&client, &ns, request).await?;
        let snapshots: Api<DiskSnapshot> = Api::namespaced(client.clone(), &ns);
        let snapshot = wait_for_phase(&snapshots, "web-snap", "Ready", 240).await?;
        let status = snapshot.status.clone().context("status")?;
        eprintln!("status: {}", serde_json::to_string_pretty(&status)?);

        // One group per node, named in the status, each a real VolumeGroupSnapshot.
        ensure!(
            status.volume_group_snapshot_names.len() == 2,
            "groups {:?}",
            status.volume_group_snapshot_names
        );
        let groups = group_snapshots(&client, &ns);
        let mut group_contents = Vec::new();
        for name in &status.volume_group_snapshot_names {
            let group = groups.get(name).await?;
            ensure!(
                group.data["status"]["readyToUse"] == json!(true),
                "{name} not ready"
            );
            group_contents.push(
                group.data["status"]["boundVolumeGroupSnapshotContentName"]
                    .as_str()
                    .context("group without content")?
                    .to_string(),
            );
        }
        // Every volume is listed: three taken, the foreign claim and the cloud-init disk skipped.
        ensure!(status.volumes.len() == 5, "volumes {:?}", status.volumes);
        let taken: BTreeMap<String, String> = status
            .volumes
            .iter()
            .filter_map(|v| Some((v.claim_name.clone()?, v.volume_snapshot_name.clone()?)))
            .collect();
        ensure!(taken.len() == 3, "taken {taken:?}");
        let skipped: Vec<&str> = status
            .volumes
            .iter()
            .filter(|v| v.skipped.is_some())
            .map(|v| v.name.as_str())
            .collect();
        ensure!(
            skipped == vec!["shared", "cloudinit"],
            "skipped {skipped:?}"
        );
        let indications: Vec<&str> = status
            .indications
            .iter()
            .map(|i| i.indication.as_str())
            .collect();
        ensure!(
            indications == vec!["PartialSnapshot"],
            "indications {indications:?}"
        );
        ensure!(status.guest_freeze.is_none(), "a stopped VM is not frozen");
        let ready = snapshot
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
            .context("Ready condition")?;
        ensure!(ready.message.contains("stopped"), "{}", ready.message);

        // The selection labels are gone from the claims.
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns);
        for claim in claims.list(&ListParams::default()).await?.items {
            ensure!(
                !claim
                    .labels()
                    .keys()
                    .any(|k| k.starts_with("livedisk.io/dsnap-")),
                "claim {} still labelled: {:?}",
                claim.name_any(),
                claim.labels()
            );
        }

        // Each member restores with its volume's data.
        for (claim, member) in &taken {
            let (tag, log, node) = &logs[claim];
            let restored = format!("{claim}-restored");
            must(&client, &ns, pvc(&restored, Some(member))).await?;
            let consumer = format!("{restored}-consumer");
            must(
                &client,
                &ns,
                livedisk_e2e::disks::pod(&consumer, &restored, Some(node)),
            )
            .await?;
            let (volume, bound) = bound_volume(&client, &ns, &restored, &consumer).await?;
            let device = host_device(&bound, &attach_block(&bound, &volume, &restored).await?)?;
            verify(&device, *tag, log)?;
            detach_block(&bound, &volume, &restored).await?;
        }

        // Deleting the Retain DiskSnapshot deletes its groups and keeps what they took: the group
        // contents (set to Retain first) and every member's storage snapshot.
        let handles = member_handles(&client, &ns, taken.values()).await?;
        snapshots
            .delete("web-snap", &DeleteParams::default())
            .await?;
        eventually(180, "the DiskSnapshot and its groups gone", || async {
            let left = groups.list(&ListParams::default()).await?.items.len();
            let gone = snapshots.get_opt("web-snap").await?.is_none();
            Ok((gone && left == 0).then_some(()))
        })
        .await?;
        let contents = group_snapshot_contents(&client);
        for name in &group_contents {
            let content = contents.get(name).await?;
            ensure!(
                content.data["spec"]["deletionPolicy"] == json!("Retain"),
                "{name}: {}",
                content.data["spec"]
            );
        }
        let internal: Api<LivediskSnapshot> = Api::all(client.clone());
        for handle in &handles {
            ensure!(
                internal.get_opt(handle).await?.is_some(),
                "the retained snapshot {handle} was deleted"
            );
        }
        eprintln!("retained: group contents {group_contents:?}, snapshots {handles:?}");

        // An administrator releases them: Delete on the contents, then delete the contents.
        for name in &group_contents {
            contents
                .patch(
                    name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"spec": {"deletionPolicy": "Delete"}})),
                )
                .await?;
            contents.delete(name, &DeleteParams::default()).await?;
        }
        eventually(180, "the released snapshots gone", || async {
            let mut left = 0;
            for handle in &handles {
                left += usize::from(internal.get_opt(handle).await?.is_some());
            }
            for name in &group_contents {
                left += usize::from(contents.get_opt(name).await?.is_some());
            }
            Ok((left == 0).then_some(()))
        })
        .await?;
        Ok(())
    }
    .await;
    if result.is_err() {
        eprintln!("operator log:\n{}", operator.log());
    }
    namespace.delete().await?;
    result
}

#[tokio::test]
async fn a_running_vm_that_cannot_be_frozen_is_refused_across_nodes_and_nothing_is_taken()
-> Result<()> {
    let _serial = SERIAL.lock().await;
    let client = client().await?;
    let operator = Operator::start()?;
    let namespace = TestNamespace::create(&client, "vm-refused").await?;
    let ns = namespace.name.clone();
    let result = async {
        claim_bound_on(&client, &ns, "a", NODE).await?;
        claim_bound_on(&client, &ns, "b", OTHER).await?;
        must(&client, &ns, virtual_machine("db", &["a", "b"], false)).await?;
        instance(&client, &ns, "db", &["a", "b"], "Running", false).await?;
        must(&client, &ns, disk_snapshot("auto", "db", "Auto", None)).await?;
        // One node and no agent, but the guest freeze is Required.
        must(&client, &ns, virtual_machine("single", &["a"], false)).await?;
        instance(&client, &ns, "single", &["a"], "Running", false).await?;
        must(
            &client,
            &ns,
            disk_snapshot("required", "single", "Required", None),
        )
        .await?;

        let snapshots: Api<DiskSnapshot> = Api::namespaced(client.clone(), &ns);
        for (name, reason, words) in [
            ("auto", "VolumesOnSeveralNodes", "node-a, node-b"),
            ("required", "FreezeImpossible", "no guest agent"),
        ] {
            let snapshot = wait_for_phase(&snapshots, name, "Failed", 120).await?;
            let ready = snapshot
                .status
                .as_ref()
                .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
                .context("Ready condition")?;
            ensure!(
                ready.reason == reason,
                "{name}: {} ({})",
                ready.reason,
                ready.message
            );
            ensure!(ready.message.contains(words), "{name}: {}", ready.message);
        }
        // Nothing was taken and no claim was touched.
        tokio::time::sleep(Duration::from_secs(2)).await;
        ensure!(
            group_snapshots(&client, &ns)
                .list(&ListParams::default())
                .await?
                .items
                .is_empty(),
            "a group was made"
        );
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns);
        for claim in claims.list(&ListParams::default()).await?.items {
            ensure!(
                !claim
                    .labels()
                    .keys()
                    .any(|k| k.starts_with("livedisk.io/dsnap-")),
                "claim {} labelled",
                claim.name_any()
            );
        }
        let snapshots_api: Api<DynamicObject> = Api::namespaced_with(
            client.clone(),
            &ns,
            &ApiResource::from_gvk_with_plural(
                &GroupVersionKind::gvk("snapshot.storage.k8s.io", "v1", "VolumeSnapshot"),
                "volumesnapshots",
            ),
        );
        ensure!(
            snapshots_api
                .list(&ListParams::default())
                .await?
                .items
                .is_empty(),
            "a VolumeSnapshot was made"
        );
        Ok(())
    }
    .await;
    if result.is_err() {
        eprintln!("operator log:\n{}", operator.log());
    }
    namespace.delete().await?;
    result
}
