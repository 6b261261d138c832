//! Node work whose public object went without its finalizer (force-removed with its finalizers
//! stripped, or a namespace torn down that way). The reconcilers never see such an object again,
//! so its internal, cluster-scoped node work would stay for good: a `LivediskRestore` keeps
//! refusing NodeStage of its volume, a `LivediskMerge` keeps its node busy, a `LivediskExport`
//! keeps serving a snapshot to its credentials, a `LivediskMigration` keeps moving a volume. Every
//! [`SWEEP_INTERVAL`] the leader deletes node work whose owner (named by its labels, with the
//! UID in the work's name) no longer exists.

use std::time::Duration;

use kube::api::{Api, DeleteParams, ListParams};
use kube::{Client, Resource, ResourceExt};

use crate::export::Export;
use crate::leader::Leadership;
use crate::merge::Merge;
use crate::migration::Migration;
use crate::node_work::NodeWorkKind;
use crate::restore::Restore;

/// How often the leader looks for orphaned node work.
const SWEEP_INTERVAL: Duration = Duration::from_secs(30);

/// Pure: whether node work named `work_name` has lost its owner, given the UID of the object
/// its labels name (`None`: there is none). A new owner of the same name is not the owner.
pub fn orphaned(work_name: &str, prefix: &str, owner_uid: Option<&str>) -> bool {
    match owner_uid {
        None => true,
        Some(uid) => work_name.strip_prefix(prefix) != Some(uid),
    }
}

/// Runs the sweep until the process ends.
pub async fn run(client: Client, leadership: Leadership) {
    let mut tick = tokio::time::interval(SWEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if !leadership.is_leader() {
            continue;
        }
        sweep::<Restore>(&client).await;
        sweep::<Merge>(&client).await;
        sweep::<Export>(&client).await;
        sweep::<Migration>(&client).await;
    }
}

/// Deletes the orphaned node work of one kind; failures are logged and tried next time.
async fn sweep<K: NodeWorkKind>(client: &Client) {
    let works: Api<K::Work> = Api::all(client.clone());
    let listed = match works
        .list(&ListParams::default().labels(K::LABEL_NAME))
        .await
    {
        Ok(list) => list.items,
        Err(error) => {
            tracing::warn!(kind = %K::Work::kind(&()), %error, "listing node work for orphans failed");
            return;
        }
    };
    for work in listed {
        let work_name = work.name_any();
        let labels = work.labels();
        let (Some(namespace), Some(name)) =
            (labels.get(K::LABEL_NAMESPACE), labels.get(K::LABEL_NAME))
        else {
            continue;
        };
        let owners: Api<K::Object> = Api::namespaced(client.clone(), namespace);
        let owner_uid = match owners.get_opt(name).await {
            Ok(owner) => owner.and_then(|o| o.uid()),
            Err(error) => {
                tracing::warn!(work = work_name, %error, "looking up the owner of node work failed");
                continue;
            }
        };
        if !orphaned(&work_name, K::WORK_PREFIX, owner_uid.as_deref()) {
            continue;
        }
        match works.delete(&work_name, &DeleteParams::default()).await {
            Ok(_) => tracing::warn!(
                work = work_name,
                owner_kind = %K::Object::kind(&()),
                owner = format!("{namespace}/{name}"),
                "deleted node work whose owner was removed without its finalizer"
            ),
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(error) => {
                tracing::warn!(work = work_name, %error, "deleting orphaned node work failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_without_its_owner_is_orphaned() {
        assert!(orphaned("restore-u1", "restore-", None));
    }

    #[test]
    fn work_of_a_living_owner_is_kept() {
        assert!(!orphaned("restore-u1", "restore-", Some("u1")));
        assert!(!orphaned("merge-u1", "merge-", Some("u1")));
    }

    #[test]
    fn a_new_owner_of_the_same_name_does_not_adopt_old_work() {
        assert!(orphaned("restore-u1", "restore-", Some("u2")));
        assert!(orphaned("restore-u1", "merge-", Some("u1")));
    }
}
