//! The node work object of one object of a node-work kind: its name, and reading, creating and
//! deleting it on the API server.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use kube::api::{Api, DeleteParams, PostParams};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};

use super::{NodeWorkContext, NodeWorkKind, kind_name};
use crate::error::Error;

/// How often a deletion (or a wait for the end of node work) looks at the node work again.
const DELETION_POLL: Duration = Duration::from_millis(500);

/// All node work of the kind.
pub fn api<K: NodeWorkKind>(ctx: &NodeWorkContext) -> Api<K::Work> {
    Api::all(ctx.client.clone())
}

/// The name of an object's node work: one per object, and a new object of the same name gets
/// new work (the UID differs).
pub fn name<K: NodeWorkKind>(object: &K::Object) -> Result<String, Error> {
    object
        .uid()
        .map(|uid| format!("{}{uid}", K::WORK_PREFIX))
        .ok_or_else(|| {
            Error::InvalidObject(format!(
                "{} {} has no uid yet",
                kind_name::<K>(),
                object.name_any()
            ))
        })
}

/// What the node work is called in errors.
fn what<K: NodeWorkKind>(name: &str) -> String {
    format!("{} {name}", K::Work::kind(&()))
}

/// The node work named `name`, while it exists.
pub async fn get<K: NodeWorkKind>(
    works: &Api<K::Work>,
    name: &str,
) -> Result<Option<K::Work>, Error> {
    works.get_opt(name).await.map_err(|cause| Error::Observe {
        what: what::<K>(name),
        cause,
    })
}

/// Creates the node work of `object`, labelled with the object's namespace and name.
pub async fn create<K: NodeWorkKind>(
    works: &Api<K::Work>,
    object: &K::Object,
    mut work: K::Work,
) -> Result<K::Work, Error> {
    let name = work.name_any();
    work.meta_mut().labels = Some(BTreeMap::from([
        (
            K::LABEL_NAMESPACE.to_string(),
            object.namespace().unwrap_or_default(),
        ),
        (K::LABEL_NAME.to_string(), object.name_any()),
    ]));
    match works.create(&PostParams::default(), &work).await {
        Ok(created) => Ok(created),
        // Created by a reconcile whose answer was lost: it is the same work.
        Err(kube::Error::Api(s)) if s.code == 409 => {
            works.get(&name).await.map_err(|cause| Error::Observe {
                what: what::<K>(&name),
                cause,
            })
        }
        Err(cause) => Err(Error::Apply {
            what: what::<K>(&name),
            cause,
        }),
    }
}

/// Waits up to `wait` until the node work named `name` has `ended` (or is gone: `None`). Past
/// that, the reconcile fails with `still_running` (what the node is still doing) and is retried:
/// a finalizer's cleanup may not return before its work is over.
pub async fn await_ended<K: NodeWorkKind>(
    works: &Api<K::Work>,
    name: &str,
    wait: Duration,
    ended: impl Fn(&K::Work) -> bool,
    still_running: &str,
) -> Result<Option<K::Work>, Error> {
    let deadline = Instant::now() + wait;
    loop {
        let current = get::<K>(works, name).await?;
        if current.as_ref().is_none_or(&ended) {
            return Ok(current);
        }
        if Instant::now() >= deadline {
            return Err(Error::CacheSync(format!(
                "{} {still_running}",
                what::<K>(name)
            )));
        }
        tokio::time::sleep(DELETION_POLL).await;
    }
}

/// Deletes the node work named `name` and waits up to `wait` until the node let it go. Past
/// that, the reconcile fails with `still_held` (what the node is still doing) and is retried.
pub async fn delete_and_await<K: NodeWorkKind>(
    works: &Api<K::Work>,
    name: &str,
    wait: Duration,
    still_held: &str,
) -> Result<Action, Error> {
    let error = |cause| Error::Apply {
        what: what::<K>(name),
        cause,
    };
    match works.delete(name, &DeleteParams::default()).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 404 => return Ok(Action::await_change()),
        Err(cause) => return Err(error(cause)),
    }
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        if works.get_opt(name).await.map_err(error)?.is_none() {
            return Ok(Action::await_change());
        }
        tokio::time::sleep(DELETION_POLL).await;
    }
    Err(Error::CacheSync(format!(
        "{} {still_held}",
        what::<K>(name)
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::restore::Restore;
    use livedisk_api::DiskRestore;

    fn restore(uid: Option<&str>) -> DiskRestore {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "livedisk.io/v1alpha1", "kind": "DiskRestore",
            "metadata": {"name": "r", "namespace": "ns", "uid": uid},
            "spec": {"persistentVolumeClaimName": "disk", "snapshotName": "s1"}
        }))
        .expect("object")
    }

    #[test]
    fn node_work_is_named_after_its_objects_uid() {
        let name = name::<Restore>(&restore(Some("u1"))).expect("name");
        assert_eq!(name, "restore-u1");
        assert!(!crate::orphans::orphaned(
            &name,
            Restore::WORK_PREFIX,
            Some("u1")
        ));
    }

    #[test]
    fn an_object_without_a_uid_has_no_node_work_yet() {
        match name::<Restore>(&restore(None)) {
            Err(Error::InvalidObject(message)) => {
                assert_eq!(message, "DiskRestore r has no uid yet");
            }
            other => panic!("{other:?}"),
        }
    }
}
