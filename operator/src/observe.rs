//! Dereference stage: looks up what a livedisk object names.
//!
//! Lookups are answered from reflector caches (metadata only), so a reconcile costs no API
//! request to observe and a thousand objects do not mean a thousand GETs per pass. Only KubeVirt
//! VirtualMachines are fetched directly: KubeVirt may not be installed, and a watch on a missing
//! resource would fail forever.

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use k8s_openapi::api::storage::v1::CSIDriver;
use kube::api::{Api, DynamicObject};
use kube::core::{ApiResource, GroupVersionKind, PartialObjectMeta};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource};
use livedisk_api::DiskSnapshot;

use crate::decide::{CSI_DRIVER_NAME, Observation};
use crate::error::Error;
use crate::kinds::Reference;

/// Metadata caches of everything a livedisk object can refer to.
#[derive(Clone)]
pub struct Caches {
    pvcs: Store<PartialObjectMeta<PersistentVolumeClaim>>,
    drivers: Store<PartialObjectMeta<CSIDriver>>,
    snapshots: Store<PartialObjectMeta<DiskSnapshot>>,
}

impl Caches {
    /// Starts one metadata reflector per referenced kind and waits until each has listed once.
    pub async fn start(client: &Client) -> Result<Self, Error> {
        let caches = Self {
            pvcs: cache(client),
            drivers: cache(client),
            snapshots: cache(client),
        };
        let ready = futures::future::try_join3(
            caches.pvcs.wait_until_ready(),
            caches.drivers.wait_until_ready(),
            caches.snapshots.wait_until_ready(),
        );
        ready.await.map_err(|e| Error::CacheSync(e.to_string()))?;
        Ok(caches)
    }
}

/// A metadata-only reflector running in the background; its store fills as events arrive.
fn cache<K>(client: &Client) -> Store<PartialObjectMeta<K>>
where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    // An Api of PartialObjectMeta makes metadata-only requests: specs and statuses never cross.
    let api: Api<PartialObjectMeta<K>> = Api::all(client.clone());
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(
        writer,
        watcher(api, watcher::Config::default().any_semantic()),
    )
    .default_backoff()
    .touched_objects()
    .for_each(|event| async move {
        if let Err(error) = event {
            tracing::debug!(%error, kind = %K::kind(&()), "cache watch error; retrying");
        }
    });
    tokio::spawn(stream);
    reader
}

/// Observes the cluster for one object in `namespace` with the given references.
pub async fn observe(
    caches: &Caches,
    client: &Client,
    namespace: &str,
    references: &[Reference],
) -> Result<Observation, Error> {
    let mut missing = Vec::new();
    for reference in references {
        if !exists(caches, client, namespace, reference).await? {
            missing.push(reference.clone());
        }
    }
    let driver_registered = caches
        .drivers
        .get(&ObjectRef::new(CSI_DRIVER_NAME))
        .is_some();
    Ok(Observation {
        missing,
        driver_registered,
    })
}

async fn exists(
    caches: &Caches,
    client: &Client,
    namespace: &str,
    reference: &Reference,
) -> Result<bool, Error> {
    Ok(match reference {
        Reference::PersistentVolumeClaim(name) => {
            in_cache(&caches.pvcs, ObjectRef::new(name).within(namespace))
        }
        Reference::DiskSnapshot(name) => {
            in_cache(&caches.snapshots, ObjectRef::new(name).within(namespace))
        }
        Reference::VirtualMachine(name) => {
            let gvk = GroupVersionKind::gvk("kubevirt.io", "v1", "VirtualMachine");
            let resource = ApiResource::from_gvk_with_plural(&gvk, "virtualmachines");
            let api: Api<DynamicObject> =
                Api::namespaced_with(client.clone(), namespace, &resource);
            match api.get_opt(name).await {
                Ok(found) => found.is_some(),
                // Without KubeVirt the kubevirt.io API is not served at all: a bare 404 page
                // rather than a Status, which means "no such VirtualMachine" just the same.
                Err(kube::Error::Api(status)) if status.code == 404 => false,
                Err(cause) => {
                    return Err(Error::Observe {
                        what: reference.to_string(),
                        cause,
                    });
                }
            }
        }
    })
}

fn in_cache<K>(store: &Store<PartialObjectMeta<K>>, key: ObjectRef<PartialObjectMeta<K>>) -> bool
where
    K: Resource<DynamicType = ()> + Clone,
{
    store
        .get(&key)
        .is_some_and(|object: Arc<PartialObjectMeta<K>>| {
            object.metadata.deletion_timestamp.is_none()
        })
}
