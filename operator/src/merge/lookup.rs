//! Dereference stage of a DiskMerge: the claim's volume, the named DiskSnapshots' contents, every
//! content of the volume and the node that holds it; and the deletion of the objects of merged
//! snapshots. Reads go straight to the API server: a DiskMerge is reconciled a handful of times
//! before its node work exists, and never looked up again after.

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use kube::Client;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams};
use kube::core::{ApiResource, GroupVersionKind};
use livedisk_api::internal::LivediskVolume;
use livedisk_api::{DiskMergeSpec, DiskSnapshot};
use serde_json::Value;

use super::plan::{Claim, Content, Lookup, NamedSnapshot};
use crate::error::Error;

pub(crate) fn resource(kind: &str) -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk(
        "snapshot.storage.k8s.io",
        "v1",
        kind,
    ))
}

pub(crate) fn observe_error(what: String) -> impl FnOnce(kube::Error) -> Error {
    move |cause| Error::Observe { what, cause }
}

pub async fn lookup(
    client: &Client,
    namespace: &str,
    spec: &DiskMergeSpec,
) -> Result<Lookup, Error> {
    let claim = claim(client, namespace, &spec.persistent_volume_claim_name).await?;
    let contents_api: Api<DynamicObject> =
        Api::all_with(client.clone(), &resource("VolumeSnapshotContent"));
    let contents: Vec<Content> = contents_api
        .list(&ListParams::default())
        .await
        .map_err(observe_error("VolumeSnapshotContents".into()))?
        .items
        .iter()
        .filter(|c| c.data["spec"]["driver"] == livedisk_common::DRIVER_NAME)
        .map(content)
        .collect();
    let base = named(
        client,
        namespace,
        spec.base_snapshot_name.as_deref(),
        &contents,
    )
    .await?;
    let top = named(
        client,
        namespace,
        spec.top_snapshot_name.as_deref(),
        &contents,
    )
    .await?;
    let node = node_of(client, &claim).await?;
    Ok(Lookup {
        claim,
        base,
        top,
        contents,
        node,
    })
}

/// A claim, through its PersistentVolume to the CSI driver and volume handle. Shared by every
/// kind that works on a claim's volume (DiskMerge, DiskRestore).
pub(crate) async fn claim(
    client: &Client,
    namespace: &str,
    claim_name: &str,
) -> Result<Claim, Error> {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), namespace);
    let claim = match claims
        .get_opt(claim_name)
        .await
        .map_err(observe_error(format!(
            "PersistentVolumeClaim {namespace}/{claim_name}"
        )))? {
        None => Claim::Missing,
        Some(pvc) => match pvc
            .spec
            .and_then(|s| s.volume_name)
            .filter(|n| !n.is_empty())
        {
            None => Claim::Unbound,
            Some(pv_name) => {
                let pvs: Api<PersistentVolume> = Api::all(client.clone());
                match pvs
                    .get_opt(&pv_name)
                    .await
                    .map_err(observe_error(format!("PersistentVolume {pv_name}")))?
                    .and_then(|pv| pv.spec)
                {
                    None => Claim::Unbound,
                    Some(pv) => Claim::Bound {
                        driver: pv.csi.as_ref().map(|c| c.driver.clone()),
                        volume_handle: pv.csi.map(|c| c.volume_handle),
                    },
                }
            }
        },
    };
    Ok(claim)
}

/// The node holding a bound claim's volume (its LivediskVolume's `spec.nodeName`).
pub(crate) async fn node_of(client: &Client, claim: &Claim) -> Result<Option<String>, Error> {
    Ok(match claim {
        Claim::Bound {
            volume_handle: Some(handle),
            ..
        } => {
            let volumes: Api<LivediskVolume> = Api::all(client.clone());
            volumes
                .get_opt(handle)
                .await
                .map_err(observe_error(format!("LivediskVolume {handle}")))?
                .map(|v| v.spec.node_name)
        }
        _ => None,
    })
}

/// A named DiskSnapshot, through its VolumeSnapshot to its bound content (among `contents`).
async fn named(
    client: &Client,
    namespace: &str,
    name: Option<&str>,
    contents: &[Content],
) -> Result<Option<NamedSnapshot>, Error> {
    let Some(name) = name else { return Ok(None) };
    Ok(Some(match bound_content(client, namespace, name).await? {
        BoundContent::NoDiskSnapshot => NamedSnapshot::Missing,
        BoundContent::Unbound => NamedSnapshot::NotTaken,
        BoundContent::Named(bound) => match contents.iter().find(|c| c.name == bound) {
            Some(c) if c.snapshot_handle.is_some() => NamedSnapshot::Taken(c.clone()),
            // A content of another driver is no livedisk snapshot of this claim.
            _ => NamedSnapshot::NotTaken,
        },
    }))
}

/// A DiskSnapshot followed to the VolumeSnapshotContent its VolumeSnapshot is bound to.
pub(crate) enum BoundContent {
    /// There is no DiskSnapshot of that name.
    NoDiskSnapshot,
    /// Its VolumeSnapshot does not exist or is not bound yet.
    Unbound,
    /// The name of the bound content.
    Named(String),
}

/// A DiskSnapshot, through its VolumeSnapshot (`status.volumeSnapshotName`, or the same name),
/// to the content it is bound to. Shared by every kind that names DiskSnapshots (DiskMerge,
/// DiskRestore).
pub(crate) async fn bound_content(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<BoundContent, Error> {
    let disk_snapshots: Api<DiskSnapshot> = Api::namespaced(client.clone(), namespace);
    let Some(disk_snapshot) = disk_snapshots
        .get_opt(name)
        .await
        .map_err(observe_error(format!("DiskSnapshot {namespace}/{name}")))?
    else {
        return Ok(BoundContent::NoDiskSnapshot);
    };
    let vs_name = disk_snapshot
        .status
        .and_then(|s| s.volume_snapshot_name)
        .unwrap_or_else(|| name.to_string());
    let volume_snapshots: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), namespace, &resource("VolumeSnapshot"));
    let bound = volume_snapshots
        .get_opt(&vs_name)
        .await
        .map_err(observe_error(format!(
            "VolumeSnapshot {namespace}/{vs_name}"
        )))?
        .and_then(|vs| {
            vs.data["status"]["boundVolumeSnapshotContentName"]
                .as_str()
                .map(str::to_string)
        });
    Ok(bound.map_or(BoundContent::Unbound, BoundContent::Named))
}

/// Pure: the facts of a VolumeSnapshotContent.
pub(crate) fn content(object: &DynamicObject) -> Content {
    let data = &object.data;
    let text = |v: &Value| v.as_str().map(str::to_string);
    let reference = &data["spec"]["volumeSnapshotRef"];
    Content {
        name: object.metadata.name.clone().unwrap_or_default(),
        snapshot_handle: text(&data["status"]["snapshotHandle"]),
        source_volume: text(&data["spec"]["source"]["volumeHandle"]),
        created: data["status"]["creationTime"].as_i64(),
        retain: data["spec"]["deletionPolicy"] == "Retain",
        volume_snapshot: text(&reference["namespace"]).zip(text(&reference["name"])),
    }
}

/// Deletes the DiskSnapshot and the VolumeSnapshot of each merged snapshot (the DiskSnapshot
/// first: it would make its VolumeSnapshot again). The snapshot-controller then deletes their
/// contents, whose CSI DeleteSnapshot finds the snapshot gone already.
pub async fn delete_merged(client: &Client, targets: &[&(String, String)]) -> Result<(), Error> {
    for (namespace, name) in targets {
        let disk_snapshots: Api<DiskSnapshot> = Api::namespaced(client.clone(), namespace);
        gone(
            disk_snapshots
                .delete(name, &DeleteParams::background())
                .await,
        )
        .map_err(|cause| Error::Apply {
            what: format!("deleting DiskSnapshot {namespace}/{name}"),
            cause,
        })?;
        let volume_snapshots: Api<DynamicObject> =
            Api::namespaced_with(client.clone(), namespace, &resource("VolumeSnapshot"));
        gone(
            volume_snapshots
                .delete(name, &DeleteParams::background())
                .await,
        )
        .map_err(|cause| Error::Apply {
            what: format!("deleting VolumeSnapshot {namespace}/{name}"),
            cause,
        })?;
    }
    Ok(())
}

fn gone<T>(result: Result<T, kube::Error>) -> Result<(), kube::Error> {
    match result {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_content_is_read_from_its_fields() {
        let object: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshotContent",
            "metadata": {"name": "snapcontent-1"},
            "spec": {"driver": "x", "deletionPolicy": "Retain",
                     "source": {"volumeHandle": "vol-1"},
                     "volumeSnapshotRef": {"namespace": "ns", "name": "s"}},
            "status": {"snapshotHandle": "snap-1", "creationTime": 1700000000123456789i64}
        }))
        .expect("object");
        let c = content(&object);
        assert_eq!(c.snapshot_handle.as_deref(), Some("snap-1"));
        assert_eq!(c.source_volume.as_deref(), Some("vol-1"));
        assert_eq!(c.created, Some(1_700_000_000_123_456_789));
        assert!(c.retain);
        assert_eq!(c.volume_snapshot, Some(("ns".into(), "s".into())));
    }
}
