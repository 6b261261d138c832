//! Dereference stage: looks up what a livedisk object names. Thin I/O only.

use k8s_openapi::api::core::v1::{Node, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::CSIDriver;
use kube::Client;
use kube::api::{Api, DynamicObject};
use kube::core::{ApiResource, GroupVersionKind};
use livedisk_api::DiskSnapshot;

use crate::decide::{CSI_DRIVER_NAME, Observation};
use crate::error::Error;
use crate::kinds::Reference;

/// Observes the cluster for one object in `namespace` with the given references.
pub async fn observe(
    client: &Client,
    namespace: &str,
    references: &[Reference],
) -> Result<Observation, Error> {
    let mut missing = Vec::new();
    for reference in references {
        if !exists(client, namespace, reference).await? {
            missing.push(reference.clone());
        }
    }
    let drivers: Api<CSIDriver> = Api::all(client.clone());
    let driver_registered = drivers
        .get_opt(CSI_DRIVER_NAME)
        .await
        .map_err(|source| Error::Observe {
            what: format!("CSIDriver {CSI_DRIVER_NAME}"),
            source,
        })?
        .is_some();
    Ok(Observation {
        missing,
        driver_registered,
    })
}

async fn exists(client: &Client, namespace: &str, reference: &Reference) -> Result<bool, Error> {
    let found = match reference {
        Reference::PersistentVolumeClaim(name) => {
            let api: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), namespace);
            api.get_opt(name).await.map(|o| o.is_some())
        }
        Reference::DiskSnapshot(name) => {
            let api: Api<DiskSnapshot> = Api::namespaced(client.clone(), namespace);
            api.get_opt(name).await.map(|o| o.is_some())
        }
        Reference::Node(name) => {
            let api: Api<Node> = Api::all(client.clone());
            api.get_opt(name).await.map(|o| o.is_some())
        }
        Reference::VirtualMachine(name) => {
            // KubeVirt may not be installed; then no VirtualMachine exists and the API answers 404.
            let gvk = GroupVersionKind::gvk("kubevirt.io", "v1", "VirtualMachine");
            let resource = ApiResource::from_gvk_with_plural(&gvk, "virtualmachines");
            let api: Api<DynamicObject> =
                Api::namespaced_with(client.clone(), namespace, &resource);
            api.get_opt(name).await.map(|o| o.is_some())
        }
    };
    found.map_err(|source| Error::Observe {
        what: reference.to_string(),
        source,
    })
}
