//! Dereference stage of a DiskSnapshot of a VirtualMachine: the VM's volumes (its
//! `spec.template.spec.volumes`), each claim's driver and node (claim → PersistentVolume →
//! LivediskVolume), and the VM's instance. Read straight from the API server: KubeVirt may not
//! be installed, and a watch on a resource that is not served fails forever.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use kube::Client;
use kube::api::{Api, DynamicObject};
use kube::core::{ApiResource, GroupVersionKind};
use livedisk_api::internal::LivediskVolume;
use serde_json::Value;

use super::plan::{ClaimFacts, InstanceFacts, VmVolume, VolumeSource};
use crate::error::Error;

fn kubevirt(kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("kubevirt.io", "v1", kind), plural)
}

fn observe_error(what: String) -> impl FnOnce(kube::Error) -> Error {
    move |cause| Error::Observe { what, cause }
}

/// The VM's volumes, or `None` when the VirtualMachine does not exist (or KubeVirt's API is not
/// served, which answers the same 404).
pub async fn vm_volumes(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<Option<Vec<VmVolume>>, Error> {
    let api: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        namespace,
        &kubevirt("VirtualMachine", "virtualmachines"),
    );
    let vm = match api.get_opt(name).await {
        Ok(vm) => vm,
        Err(kube::Error::Api(s)) if s.code == 404 => None,
        Err(cause) => {
            return Err(observe_error(format!("VirtualMachine {namespace}/{name}"))(
                cause,
            ));
        }
    };
    Ok(vm.map(|vm| volumes_of(&vm.data)))
}

/// Pure: the volumes of a VirtualMachine object, by what backs them.
pub fn volumes_of(vm: &Value) -> Vec<VmVolume> {
    let Some(volumes) = vm["spec"]["template"]["spec"]["volumes"].as_array() else {
        return Vec::new();
    };
    volumes
        .iter()
        .filter_map(|v| {
            let name = v["name"].as_str()?.to_string();
            let source = if let Some(claim) = v["persistentVolumeClaim"]["claimName"].as_str() {
                VolumeSource::Claim {
                    claim: claim.into(),
                }
            } else if let Some(dv) = v["dataVolume"]["name"].as_str() {
                // CDI names a DataVolume's claim after the DataVolume.
                VolumeSource::Claim { claim: dv.into() }
            } else {
                let kind = v
                    .as_object()
                    .and_then(|o| o.keys().find(|k| *k != "name").cloned())
                    .unwrap_or_else(|| "unknown".into());
                VolumeSource::Other(kind)
            };
            Some(VmVolume { name, source })
        })
        .collect()
}

/// What the cluster says about each claim the volumes name.
pub async fn claims(
    client: &Client,
    namespace: &str,
    volumes: &[VmVolume],
) -> Result<BTreeMap<String, ClaimFacts>, Error> {
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), namespace);
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let inventory: Api<LivediskVolume> = Api::all(client.clone());
    let mut facts = BTreeMap::new();
    for volume in volumes {
        let VolumeSource::Claim { claim, .. } = &volume.source else {
            continue;
        };
        if facts.contains_key(claim) {
            continue;
        }
        let mut found = ClaimFacts::default();
        let pvc = pvcs.get_opt(claim).await.map_err(observe_error(format!(
            "PersistentVolumeClaim {namespace}/{claim}"
        )))?;
        if let Some(pvc) = pvc {
            found.exists = true;
            let bound = pvc
                .spec
                .and_then(|s| s.volume_name)
                .filter(|v| !v.is_empty());
            if let Some(pv_name) = bound {
                let pv = pvs
                    .get_opt(&pv_name)
                    .await
                    .map_err(observe_error(format!("PersistentVolume {pv_name}")))?;
                let csi = pv.and_then(|pv| pv.spec).and_then(|s| s.csi);
                if let Some(csi) = csi {
                    found.driver = Some(csi.driver.clone());
                    found.volume_handle = Some(csi.volume_handle.clone());
                    if csi.driver == livedisk_common::DRIVER_NAME {
                        found.node = inventory
                            .get_opt(&csi.volume_handle)
                            .await
                            .map_err(observe_error(format!(
                                "LivediskVolume {}",
                                csi.volume_handle
                            )))?
                            .map(|v| v.spec.node_name)
                            .filter(|n| !n.is_empty());
                    }
                } else {
                    found.driver = Some("(not CSI)".into());
                }
            }
        }
        facts.insert(claim.clone(), found);
    }
    Ok(facts)
}

/// The VM's instance, or `None` when it has none (the VM is stopped).
pub async fn instance(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<Option<InstanceFacts>, Error> {
    let api: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        namespace,
        &kubevirt("VirtualMachineInstance", "virtualmachineinstances"),
    );
    let vmi = match api.get_opt(name).await {
        Ok(vmi) => vmi,
        Err(kube::Error::Api(s)) if s.code == 404 => None,
        Err(cause) => {
            return Err(observe_error(format!(
                "VirtualMachineInstance {namespace}/{name}"
            ))(cause));
        }
    };
    Ok(vmi.map(|vmi| instance_of(&vmi.data)))
}

/// Pure: the facts of a VirtualMachineInstance object that matter to a snapshot.
pub fn instance_of(vmi: &Value) -> InstanceFacts {
    let condition = |kind: &str| {
        vmi["status"]["conditions"].as_array().is_some_and(|cs| {
            cs.iter()
                .any(|c| c["type"] == kind && c["status"] == "True")
        })
    };
    InstanceFacts {
        running: vmi["status"]["phase"] == "Running",
        paused: condition("Paused"),
        agent_connected: condition("AgentConnected"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn volumes_are_read_by_their_source() {
        let vm = json!({"spec": {"template": {"spec": {"volumes": [
            {"name": "root", "persistentVolumeClaim": {"claimName": "root-disk"}},
            {"name": "data", "dataVolume": {"name": "data-dv"}},
            {"name": "cloudinit", "cloudInitNoCloud": {"userData": "#cloud-config"}},
        ]}}}});
        let volumes = volumes_of(&vm);
        assert_eq!(volumes.len(), 3);
        assert_eq!(
            volumes[1].source,
            VolumeSource::Claim {
                claim: "data-dv".into()
            }
        );
        assert_eq!(
            volumes[2].source,
            VolumeSource::Other("cloudInitNoCloud".into())
        );
        assert!(volumes_of(&json!({"spec": {}})).is_empty());
    }

    #[test]
    fn an_instance_is_running_with_an_agent_from_its_status() {
        let vmi = json!({"status": {"phase": "Running", "conditions": [
            {"type": "Ready", "status": "True"},
            {"type": "AgentConnected", "status": "True"},
        ]}});
        let facts = instance_of(&vmi);
        assert!(facts.running && facts.agent_connected && !facts.paused);
        let scheduled = instance_of(&json!({"status": {"phase": "Scheduled"}}));
        assert!(!scheduled.running && !scheduled.agent_connected);
    }
}
