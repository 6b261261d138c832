//! Dereference stage of a DiskRestore: the claim's volume and node (shared with DiskMerge) and
//! the named DiskSnapshot, through its VolumeSnapshot to its bound content. Reads go straight to
//! the API server: a DiskRestore is looked up a handful of times before its node work exists.

use kube::Client;
use kube::api::{Api, DynamicObject};
use livedisk_api::DiskRestoreSpec;

use super::plan::{Lookup, NamedSnapshot};
use crate::error::Error;
use crate::merge::lookup::{
    BoundContent, bound_content, claim, content, node_of, observe_error, resource,
};

pub async fn lookup(
    client: &Client,
    namespace: &str,
    spec: &DiskRestoreSpec,
) -> Result<Lookup, Error> {
    let claim = claim(client, namespace, &spec.persistent_volume_claim_name).await?;
    let snapshot = snapshot(client, namespace, &spec.snapshot_name).await?;
    let node = node_of(client, &claim).await?;
    Ok(Lookup {
        claim,
        snapshot,
        node,
    })
}

/// A DiskSnapshot, through its VolumeSnapshot to its bound content. `NotTaken` until the
/// content has a snapshot handle and is ready to use.
pub(crate) async fn snapshot(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<NamedSnapshot, Error> {
    let bound = match bound_content(client, namespace, name).await? {
        BoundContent::NoDiskSnapshot => return Ok(NamedSnapshot::Missing),
        BoundContent::Unbound => return Ok(NamedSnapshot::NotTaken),
        BoundContent::Named(bound) => bound,
    };
    let contents: Api<DynamicObject> =
        Api::all_with(client.clone(), &resource("VolumeSnapshotContent"));
    let Some(object) = contents
        .get_opt(&bound)
        .await
        .map_err(observe_error(format!("VolumeSnapshotContent {bound}")))?
    else {
        return Ok(NamedSnapshot::NotTaken);
    };
    Ok(resolved(&object))
}

/// Pure: a bound content as a restore target. A content of another driver keeps its source's
/// handle, which is never a livedisk volume's: the plan refuses it as another volume's snapshot.
fn resolved(object: &DynamicObject) -> NamedSnapshot {
    let ready = object.data["status"]["readyToUse"] == true;
    let found = content(object);
    match (ready, &found.snapshot_handle) {
        (true, Some(_)) => NamedSnapshot::Taken(found),
        _ => NamedSnapshot::NotTaken,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(ready: bool) -> DynamicObject {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshotContent",
            "metadata": {"name": "snapcontent-1"},
            "spec": {"driver": "csi.livedisk.io", "source": {"volumeHandle": "vol-1"}},
            "status": {"snapshotHandle": "snap-1", "readyToUse": ready}
        }))
        .expect("object")
    }

    #[test]
    fn only_a_ready_content_is_a_restore_target() {
        match resolved(&object(true)) {
            NamedSnapshot::Taken(c) => {
                assert_eq!(c.snapshot_handle.as_deref(), Some("snap-1"));
                assert_eq!(c.source_volume.as_deref(), Some("vol-1"));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(resolved(&object(false)), NamedSnapshot::NotTaken);
    }
}
