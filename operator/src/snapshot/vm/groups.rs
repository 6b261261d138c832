//! Build/apply stage of a DiskSnapshot of a VirtualMachine: the VolumeGroupSnapshots (one per
//! node), the label that selects each group's claims, and what the groups and their member
//! VolumeSnapshots report.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

use super::plan::GroupFacts;
use crate::error::Error;
use crate::standard;

/// The label on each VolumeGroupSnapshot that names its DiskSnapshot (by UID).
pub const GROUP_OWNER_LABEL: &str = "livedisk.io/disksnapshot-uid";

pub fn groups_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("groupsnapshot.storage.k8s.io", "v1", "VolumeGroupSnapshot"),
        "volumegroupsnapshots",
    )
}

fn contents_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(
            "groupsnapshot.storage.k8s.io",
            "v1",
            "VolumeGroupSnapshotContent",
        ),
        "volumegroupsnapshotcontents",
    )
}

fn apply_error(what: String) -> impl FnOnce(kube::Error) -> Error {
    move |cause| Error::Apply { what, cause }
}

fn observe_error(what: String) -> impl FnOnce(kube::Error) -> Error {
    move |cause| Error::Observe { what, cause }
}

/// Pure: the VolumeGroupSnapshot of one node's claims.
pub fn group(
    name: &str,
    class: Option<&str>,
    selector: (&str, &str),
    owner_uid: &str,
    owner: OwnerReference,
) -> Value {
    let mut spec =
        json!({ "source": { "selector": { "matchLabels": { selector.0: selector.1 } } } });
    if let Some(class) = class {
        spec["volumeGroupSnapshotClassName"] = json!(class);
    }
    json!({
        "apiVersion": "groupsnapshot.storage.k8s.io/v1",
        "kind": "VolumeGroupSnapshot",
        "metadata": {
            "name": name,
            "labels": {
                "app.kubernetes.io/managed-by": "livedisk-operator",
                GROUP_OWNER_LABEL: owner_uid,
            },
            "ownerReferences": [owner],
        },
        "spec": spec,
    })
}

/// Whether the create failed because the cluster does not serve VolumeGroupSnapshots.
pub fn not_served(error: &Error) -> bool {
    matches!(error, Error::Apply { cause: kube::Error::Api(s), .. } if s.code == 404)
}

/// Creates a group (one that exists already, from an earlier pass, is kept).
pub async fn create(client: &Client, namespace: &str, desired: Value) -> Result<(), Error> {
    let object: DynamicObject = serde_json::from_value(desired).map_err(|source| Error::Build {
        what: "VolumeGroupSnapshot".into(),
        source,
    })?;
    let name = object.name_any();
    let api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), namespace, &groups_resource());
    match api.create(&PostParams::default(), &object).await {
        Ok(_) => {
            tracing::info!(volume_group_snapshot = %name, "VolumeGroupSnapshot created");
            Ok(())
        }
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(cause) => Err(apply_error(format!(
            "VolumeGroupSnapshot {namespace}/{name}"
        ))(cause)),
    }
}

/// The groups of a DiskSnapshot (every attempt).
pub async fn list(
    client: &Client,
    namespace: &str,
    uid: &str,
) -> Result<Vec<DynamicObject>, Error> {
    let api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), namespace, &groups_resource());
    match api
        .list(&ListParams::default().labels(&format!("{GROUP_OWNER_LABEL}={uid}")))
        .await
    {
        Ok(list) => Ok(list.items),
        // Not served: there can be none.
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(Vec::new()),
        Err(cause) => Err(observe_error(format!(
            "the VolumeGroupSnapshots of {namespace}"
        ))(cause)),
    }
}

/// How far the group `name` is: its own status, or (for the cut, one hop sooner) the status
/// the CSI sidecar wrote on its bound content.
pub async fn facts(client: &Client, namespace: &str, name: &str) -> Result<GroupFacts, Error> {
    let api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), namespace, &groups_resource());
    let Some(group) = api.get_opt(name).await.map_err(observe_error(format!(
        "VolumeGroupSnapshot {namespace}/{name}"
    )))?
    else {
        return Ok(GroupFacts::default());
    };
    let status = &group.data["status"];
    let mut facts = GroupFacts {
        exists: true,
        ready: status["readyToUse"] == json!(true),
        creation_time: status["creationTime"].as_str().map(str::to_string),
        error: status["error"]["message"].as_str().map(str::to_string),
        cut: false,
        volume_handles: None,
    };
    facts.cut = facts.creation_time.is_some();
    if let Some(content) = status["boundVolumeGroupSnapshotContentName"].as_str() {
        let contents: Api<DynamicObject> = Api::all_with(client.clone(), &contents_resource());
        if let Some(content) = contents
            .get_opt(content)
            .await
            .map_err(observe_error(format!(
                "VolumeGroupSnapshotContent {content}"
            )))?
        {
            facts.volume_handles = content.data["spec"]["source"]["volumeHandles"]
                .as_array()
                .map(|hs| {
                    hs.iter()
                        .filter_map(|h| h.as_str().map(str::to_string))
                        .collect()
                });
            let status = &content.data["status"];
            facts.cut |= status["creationTime"].is_number() || status["creationTime"].is_string();
            if facts.error.is_none() {
                facts.error = status["error"]["message"].as_str().map(str::to_string);
            }
        }
    }
    Ok(facts)
}

/// The snapshot-controller's finalizer on a VolumeGroupSnapshot it has bound to a content.
const GROUP_BOUND_FINALIZER: &str =
    "groupsnapshot.storage.kubernetes.io/volumegroupsnapshot-bound-protection";

/// How long a deletion waits for the snapshot-controller to finish its first pass over a group.
const GROUP_SETTLE_LIMIT: Duration = Duration::from_secs(10);

/// Pure: whether the snapshot-controller is done with its first pass over a group, so that
/// deleting it now reaches the content too. A group deleted between the content's creation and
/// the controller's finalizer is gone before the controller could tie the content to it: the
/// content then stays behind, never deleted (seen with a group the driver refused at once).
/// Done means: the bound finalizer is on, or the controller refused the group before making a
/// content (an error and no content).
pub fn settled(group: &DynamicObject) -> bool {
    let status = &group.data["status"];
    group
        .finalizers()
        .iter()
        .any(|f| f == GROUP_BOUND_FINALIZER)
        || (status["boundVolumeGroupSnapshotContentName"].is_null() && !status["error"].is_null())
}

/// The group as it is once `settled`, or after GROUP_SETTLE_LIMIT (a snapshot-controller that
/// does not run never settles it; it is deleted all the same).
async fn settle(api: &Api<DynamicObject>, group: &DynamicObject) -> Result<DynamicObject, Error> {
    let name = group.name_any();
    let started = Instant::now();
    let mut current = group.clone();
    while !settled(&current) && started.elapsed() < GROUP_SETTLE_LIMIT {
        tokio::time::sleep(Duration::from_millis(200)).await;
        match api.get_opt(&name).await {
            Ok(Some(latest)) => current = latest,
            Ok(None) => break,
            Err(cause) => {
                return Err(observe_error(format!("VolumeGroupSnapshot {name}"))(cause));
            }
        }
    }
    Ok(current)
}

/// Deletes the named groups (a Retain DiskSnapshot first sets Retain on their contents), each
/// once the snapshot-controller has settled it (see `settled`).
pub async fn delete(
    client: &Client,
    namespace: &str,
    groups: &[DynamicObject],
    retain: bool,
) -> Result<(), Error> {
    let api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), namespace, &groups_resource());
    let contents: Api<DynamicObject> = Api::all_with(client.clone(), &contents_resource());
    for group in groups {
        let group = &if group.metadata.deletion_timestamp.is_none() {
            settle(&api, group).await?
        } else {
            group.clone()
        };
        let name = group.name_any();
        if retain
            && let Some(content) =
                group.data["status"]["boundVolumeGroupSnapshotContentName"].as_str()
        {
            let patch = json!({ "spec": { "deletionPolicy": "Retain" } });
            contents
                .patch(content, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map_err(apply_error(format!("VolumeGroupSnapshotContent {content}")))?;
        }
        if group.metadata.deletion_timestamp.is_some() {
            continue;
        }
        match api.delete(&name, &DeleteParams::background()).await {
            Ok(_) => {
                tracing::info!(volume_group_snapshot = %name, retain, "VolumeGroupSnapshot deleted")
            }
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(cause) => {
                return Err(apply_error(format!(
                    "deleting VolumeGroupSnapshot {namespace}/{name}"
                ))(cause));
            }
        }
    }
    Ok(())
}

/// A member VolumeSnapshot of a group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub volume_snapshot: String,
    pub restore_size: Option<String>,
}

/// The member VolumeSnapshots of the named groups, by claim.
pub async fn members(
    client: &Client,
    namespace: &str,
    groups: &[String],
) -> Result<BTreeMap<String, Member>, Error> {
    let api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), namespace, &standard::volume_snapshots());
    let list = api
        .list(&ListParams::default())
        .await
        .map_err(observe_error(format!("the VolumeSnapshots of {namespace}")))?;
    Ok(list
        .items
        .into_iter()
        .filter(|s| {
            s.data["status"]["volumeGroupSnapshotName"]
                .as_str()
                .is_some_and(|g| groups.iter().any(|n| n == g))
        })
        .filter_map(|s| {
            let claim = s.data["spec"]["source"]["persistentVolumeClaimName"]
                .as_str()?
                .to_string();
            Some((
                claim,
                Member {
                    volume_snapshot: s.name_any(),
                    restore_size: s.data["status"]["restoreSize"].as_str().map(str::to_string),
                },
            ))
        })
        .collect())
}

/// Puts the group label on a claim (`Some(value)`) or takes it off (`None`).
pub async fn label_claim(
    client: &Client,
    namespace: &str,
    claim: &str,
    key: &str,
    value: Option<&str>,
) -> Result<(), Error> {
    let api: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), namespace);
    let patch = json!({ "metadata": { "labels": { key: value } } });
    match api
        .patch(claim, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(()),
        // A claim deleted meanwhile carries no label.
        Err(kube::Error::Api(s)) if s.code == 404 && value.is_none() => Ok(()),
        Err(cause) => Err(apply_error(format!(
            "the label of PersistentVolumeClaim {namespace}/{claim}"
        ))(cause)),
    }
}

/// Takes the label `key` off every claim of the namespace that still has it.
pub async fn unlabel_claims(client: &Client, namespace: &str, key: &str) -> Result<(), Error> {
    let api: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), namespace);
    let labelled = api
        .list_metadata(&ListParams::default().labels(key))
        .await
        .map_err(observe_error(format!("the claims labelled {key}")))?;
    for claim in labelled.items {
        label_claim(client, namespace, &claim.name_any(), key, None).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_selects_by_the_request_label_and_is_owned() {
        let owner = OwnerReference {
            name: "d".into(),
            ..Default::default()
        };
        let g = group(
            "d-0-0",
            None,
            ("livedisk.io/dsnap-u", "0-0"),
            "u",
            owner.clone(),
        );
        assert_eq!(
            g["spec"]["source"]["selector"]["matchLabels"]["livedisk.io/dsnap-u"],
            "0-0"
        );
        assert!(g["spec"].get("volumeGroupSnapshotClassName").is_none());
        assert_eq!(g["metadata"]["labels"][GROUP_OWNER_LABEL], "u");
        let g = group("d-0-0", Some("gold"), ("k", "v"), "u", owner);
        assert_eq!(g["spec"]["volumeGroupSnapshotClassName"], "gold");
    }

    fn observed(finalizers: &[&str], status: Value) -> DynamicObject {
        let mut g = DynamicObject::new("g", &groups_resource());
        g.metadata.finalizers = Some(finalizers.iter().map(|f| f.to_string()).collect());
        g.data = json!({ "status": status });
        g
    }

    #[test]
    fn a_group_is_deleted_once_the_snapshot_controller_is_done_with_it() {
        // Bound and protected: its deletion reaches the content.
        assert!(settled(&observed(
            &[GROUP_BOUND_FINALIZER],
            json!({"boundVolumeGroupSnapshotContentName": "c"})
        )));
        // A content made but not yet tied to the group: deleting now would orphan it.
        assert!(!settled(&observed(
            &[],
            json!({"boundVolumeGroupSnapshotContentName": "c", "error": {"message": "refused"}})
        )));
        assert!(!settled(&observed(&[], Value::Null)));
        // Refused before any content was made: nothing to orphan.
        assert!(settled(&observed(
            &[],
            json!({"error": {"message": "class not found"}})
        )));
    }
}
