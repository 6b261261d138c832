//! KubeVirt objects for the tests of DiskSnapshots of VirtualMachines. No KubeVirt controller
//! runs: a test creates the VirtualMachine, and the VirtualMachineInstance with the status
//! virt-handler would report (its phase, and whether the guest agent is connected).

use anyhow::{Context, Result};
use kube::Client;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use livedisk_api::DiskSnapshot;
use serde_json::{Value, json};

use crate::disks::must;
use crate::eventually;

fn template(claims: &[&str]) -> Value {
    let mut disks: Vec<Value> = claims
        .iter()
        .map(|c| json!({"name": c, "disk": {"bus": "virtio"}}))
        .collect();
    disks.push(json!({"name": "cloudinit", "disk": {"bus": "virtio"}}));
    let mut volumes: Vec<Value> = claims
        .iter()
        .map(|c| json!({"name": c, "persistentVolumeClaim": {"claimName": c}}))
        .collect();
    volumes.push(json!({"name": "cloudinit", "cloudInitNoCloud": {"userData": "#cloud-config\n"}}));
    json!({
        "domain": {"devices": {"disks": disks}, "resources": {"requests": {"memory": "64Mi"}}},
        "volumes": volumes,
    })
}

/// A VirtualMachine whose disks are the claims (each volume named after its claim) and a
/// cloud-init disk; `stopped`: runStrategy Halted, else Always.
pub fn virtual_machine(name: &str, claims: &[&str], stopped: bool) -> Value {
    json!({
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
        "metadata": {"name": name},
        "spec": {
            "runStrategy": if stopped { "Halted" } else { "Always" },
            "template": {"metadata": {"labels": {"vm": name}}, "spec": template(claims)},
        },
    })
}

pub fn instances(client: &Client, ns: &str) -> Api<DynamicObject> {
    Api::namespaced_with(
        client.clone(),
        ns,
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("kubevirt.io", "v1", "VirtualMachineInstance"),
            "virtualmachineinstances",
        ),
    )
}

/// Creates the VirtualMachineInstance of the VM `name` and sets its status as virt-handler
/// would: `phase`, and the AgentConnected condition when `agent`.
pub async fn instance(
    client: &Client,
    ns: &str,
    name: &str,
    claims: &[&str],
    phase: &str,
    agent: bool,
) -> Result<()> {
    must(
        client,
        ns,
        json!({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
               "metadata": {"name": name}, "spec": template(claims)}),
    )
    .await?;
    set_instance_status(client, ns, name, phase, agent).await
}

/// Sets the instance's phase and guest agent condition.
pub async fn set_instance_status(
    client: &Client,
    ns: &str,
    name: &str,
    phase: &str,
    agent: bool,
) -> Result<()> {
    let mut conditions = vec![json!({"type": "Ready", "status": "True"})];
    if agent {
        conditions.push(json!({"type": "AgentConnected", "status": "True"}));
    }
    let patch = json!({"status": {"phase": phase, "conditions": conditions}});
    // KubeVirt's VirtualMachineInstance CRD has no status subresource: virt-handler writes the
    // status with the object. A CRD that has one takes it only through /status.
    let api = instances(client, ns);
    let written = api
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .context("setting the VirtualMachineInstance status")?;
    if written.data["status"]["phase"] != json!(phase) {
        api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .context("setting the VirtualMachineInstance status (status subresource)")?;
    }
    Ok(())
}

/// A DiskSnapshot of the VM `vm`.
pub fn disk_snapshot(name: &str, vm: &str, freeze: &str, class: Option<&str>) -> Value {
    let mut spec = json!({"source": {"virtualMachineName": vm}, "freeze": freeze});
    if let Some(class) = class {
        spec["snapshotClassName"] = json!(class);
    }
    json!({"apiVersion": "livedisk.io/v1alpha1", "kind": "DiskSnapshot",
           "metadata": {"name": name}, "spec": spec})
}

pub fn group_snapshot_contents(client: &Client) -> Api<DynamicObject> {
    Api::all_with(
        client.clone(),
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(
                "groupsnapshot.storage.k8s.io",
                "v1",
                "VolumeGroupSnapshotContent",
            ),
            "volumegroupsnapshotcontents",
        ),
    )
}

/// The VolumeSnapshotContent bound to the VolumeSnapshot `name` (a group's member).
pub async fn member_content(client: &Client, ns: &str, name: &str) -> Result<DynamicObject> {
    let snapshots: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        ns,
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("snapshot.storage.k8s.io", "v1", "VolumeSnapshot"),
            "volumesnapshots",
        ),
    );
    let contents: Api<DynamicObject> = Api::all_with(
        client.clone(),
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("snapshot.storage.k8s.io", "v1", "VolumeSnapshotContent"),
            "volumesnapshotcontents",
        ),
    );
    let content = snapshots.get(name).await?.data["status"]["boundVolumeSnapshotContentName"]
        .as_str()
        .with_context(|| format!("{name} without content"))?
        .to_string();
    Ok(contents.get(&content).await?)
}

pub fn group_snapshots(client: &Client, ns: &str) -> Api<DynamicObject> {
    Api::namespaced_with(
        client.clone(),
        ns,
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("groupsnapshot.storage.k8s.io", "v1", "VolumeGroupSnapshot"),
            "volumegroupsnapshots",
        ),
    )
}

/// Waits until the DiskSnapshot reports `phase`; fails early on another final phase.
pub async fn wait_for_phase(
    snapshots: &Api<DiskSnapshot>,
    name: &str,
    phase: &str,
    seconds: u64,
) -> Result<DiskSnapshot> {
    let what = format!("DiskSnapshot {name} {phase}");
    eventually(seconds, &what, || async {
        let snapshot = snapshots.get(name).await?;
        let status = snapshot.status.clone().unwrap_or_default();
        let current = serde_json::to_value(status.phase)?;
        if current == json!(phase) {
            return Ok(Some(snapshot));
        }
        for end in ["Ready", "Failed"] {
            if current == json!(end) {
                let ready = status.conditions.iter().find(|c| c.type_ == "Ready");
                anyhow::bail!(
                    "DiskSnapshot {name} is {end}, not {phase}: {:?}",
                    ready.map(|c| (&c.reason, &c.message))
                );
            }
        }
        Ok(None)
    })
    .await
}
