//! What the DiskSnapshot reconciler reads besides the DiskSnapshot itself: the VolumeSnapshots,
//! their contents and the nodes' `LivediskSnapshot`s. Each kind has one watch that both fills a
//! cache and wakes the DiskSnapshots it concerns, so a reconcile reads them without an API
//! request and a DiskSnapshot in progress waits for a change instead of polling. At a thousand
//! DiskSnapshots, polling three GETs per object every few seconds was most of the operator's
//! requests and memory (docs/benchmarks.md, (f)).

use std::fmt::Debug;
use std::hash::Hash;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use kube::api::{Api, DynamicObject};
use kube::runtime::reflector::{ObjectRef, Store, store::Writer};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use livedisk_api::DiskSnapshot;
use livedisk_api::internal::LivediskSnapshot;
use serde::de::DeserializeOwned;

use crate::error::Error;
use crate::standard;

/// The caches the DiskSnapshot reconciler reads.
#[derive(Clone)]
pub struct Watched {
    pub volume_snapshots: Store<DynamicObject>,
    pub contents: Store<DynamicObject>,
    pub node_snapshots: Store<LivediskSnapshot>,
}

/// The watch streams behind [`Watched`]: the controller polls them (which fills the caches) and
/// maps each object to the DiskSnapshots to wake.
pub struct WatchStreams {
    pub volume_snapshots: WatchStream<DynamicObject>,
    pub contents: WatchStream<DynamicObject>,
    pub node_snapshots: WatchStream<LivediskSnapshot>,
}

type WatchStream<K> = BoxStream<'static, Result<K, watcher::Error>>;

/// How long a reconcile waits for the caches' first list before it is retried.
const FIRST_LIST_WAIT: Duration = Duration::from_secs(10);

impl Watched {
    pub fn start(client: &Client) -> (Self, WatchStreams) {
        let vs_resource = standard::volume_snapshots();
        let content_resource = standard::volume_snapshot_contents();
        let (volume_snapshots, vs_stream) = reflected(
            Api::all_with(client.clone(), &vs_resource),
            vs_resource.clone(),
        );
        let (contents, content_stream) = reflected(
            Api::all_with(client.clone(), &content_resource),
            content_resource.clone(),
        );
        let (node_snapshots, node_stream) = reflected(Api::all(client.clone()), ());
        (
            Self {
                volume_snapshots,
                contents,
                node_snapshots,
            },
            WatchStreams {
                volume_snapshots: vs_stream,
                contents: content_stream,
                node_snapshots: node_stream,
            },
        )
    }

    /// Waits until every cache has listed once: before that, a missing object may only be one
    /// not listed yet, and a deletion must not take that for "gone".
    pub async fn listed(&self) -> Result<(), Error> {
        let all = futures::future::try_join3(
            self.volume_snapshots.wait_until_ready(),
            self.contents.wait_until_ready(),
            self.node_snapshots.wait_until_ready(),
        );
        match tokio::time::timeout(FIRST_LIST_WAIT, all).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(stopped)) => Err(Error::CacheSync(stopped.to_string())),
            Err(_) => Err(Error::CacheSync(format!(
                "the VolumeSnapshot, VolumeSnapshotContent and LivediskSnapshot caches have not listed within {} s",
                FIRST_LIST_WAIT.as_secs()
            ))),
        }
    }

    pub fn volume_snapshot(&self, namespace: &str, name: &str) -> Option<DynamicObject> {
        let key = ObjectRef::new_with(name, standard::volume_snapshots()).within(namespace);
        self.volume_snapshots.get(&key).map(|o| o.as_ref().clone())
    }

    pub fn content(&self, name: &str) -> Option<DynamicObject> {
        let key = ObjectRef::new_with(name, standard::volume_snapshot_contents());
        self.contents.get(&key).map(|o| o.as_ref().clone())
    }

    pub fn node_snapshot(&self, handle: &str) -> Option<LivediskSnapshot> {
        self.node_snapshots
            .get(&ObjectRef::new(handle))
            .map(|o| o.as_ref().clone())
    }

    /// The DiskSnapshot a content belongs to: the one named like the VolumeSnapshot it is bound
    /// to (a DiskSnapshot's VolumeSnapshot has its name). A content of someone else's
    /// VolumeSnapshot wakes nothing that exists.
    pub fn disk_snapshot_of_content(content: &DynamicObject) -> Option<ObjectRef<DiskSnapshot>> {
        let reference = &content.data["spec"]["volumeSnapshotRef"];
        let name = reference["name"].as_str()?;
        let namespace = reference["namespace"].as_str()?;
        Some(ObjectRef::new(name).within(namespace))
    }

    /// The DiskSnapshots a node snapshot belongs to: the one named like the VolumeSnapshot it
    /// was taken for (from the CSI sidecar's extra metadata), and those whose status names its
    /// handle (when the sidecar runs without extra metadata).
    pub fn disk_snapshots_of_node_snapshot(
        node_snapshot: &LivediskSnapshot,
        disk_snapshots: &Store<DiskSnapshot>,
    ) -> Vec<ObjectRef<DiskSnapshot>> {
        let handle = node_snapshot.name_any();
        let mut found: Vec<ObjectRef<DiskSnapshot>> = disk_snapshots
            .state_filter(|s| {
                s.status
                    .as_ref()
                    .and_then(|st| st.snapshot_handle.as_deref())
                    == Some(handle.as_str())
            })
            .iter()
            .map(|s| ObjectRef::from_obj(s.as_ref()))
            .collect();
        if let Some(vs) = &node_snapshot.spec.volume_snapshot {
            let named = ObjectRef::new(&vs.name).within(&vs.namespace);
            if !found.contains(&named) {
                found.push(named);
            }
        }
        found
    }
}

/// One watch of `api`, reflected into a cache (without managed fields, which nothing here reads
/// and which are most of a small object's size), as a stream of the objects it touched.
fn reflected<K>(api: Api<K>, dyntype: K::DynamicType) -> (Store<K>, WatchStream<K>)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone + Send + Sync,
{
    let writer = Writer::new(dyntype);
    let reader = writer.as_reader();
    let stream = watcher(api, watcher::Config::default().any_semantic())
        .default_backoff()
        .modify(|object: &mut K| object.managed_fields_mut().clear())
        .reflect(writer)
        .touched_objects()
        .boxed();
    (reader, stream)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::watcher::Event;
    use livedisk_api::internal::{LivediskSnapshotSpec, VolumeSnapshotReference};
    use serde_json::json;

    fn disk_snapshot(namespace: &str, name: &str, handle: Option<&str>) -> DiskSnapshot {
        serde_json::from_value(json!({
            "apiVersion": "livedisk.io/v1alpha1",
            "kind": "DiskSnapshot",
            "metadata": { "name": name, "namespace": namespace },
            "spec": { "source": { "persistentVolumeClaimName": "disk" } },
            "status": { "snapshotHandle": handle },
        }))
        .expect("a DiskSnapshot")
    }

    fn node_snapshot(handle: &str, vs: Option<(&str, &str)>) -> LivediskSnapshot {
        LivediskSnapshot::new(
            handle,
            LivediskSnapshotSpec {
                node_name: "node-a".into(),
                volume_id: "vol".into(),
                csi_name: "snapshot-1".into(),
                merge_bandwidth_bytes_per_second: None,
                volume_snapshot: vs.map(|(namespace, name)| VolumeSnapshotReference {
                    namespace: namespace.into(),
                    name: name.into(),
                    uid: None,
                }),
                group: None,
            },
        )
    }

    fn store_of(objects: Vec<DiskSnapshot>) -> Store<DiskSnapshot> {
        let mut writer = Writer::new(());
        writer.apply_watcher_event(&Event::Init);
        for object in objects {
            writer.apply_watcher_event(&Event::InitApply(object));
        }
        writer.apply_watcher_event(&Event::InitDone);
        writer.as_reader()
    }

    #[test]
    fn a_content_wakes_the_disk_snapshot_named_like_its_volume_snapshot() {
        let content: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "snapshot.storage.k8s.io/v1",
            "kind": "VolumeSnapshotContent",
            "metadata": { "name": "snapcontent-1" },
            "spec": { "volumeSnapshotRef": { "namespace": "ns", "name": "nightly" } },
        }))
        .expect("a content");
        assert_eq!(
            Watched::disk_snapshot_of_content(&content),
            Some(ObjectRef::new("nightly").within("ns"))
        );
        let unbound: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "snapshot.storage.k8s.io/v1",
            "kind": "VolumeSnapshotContent",
            "metadata": { "name": "snapcontent-2" },
            "spec": {},
        }))
        .expect("a content");
        assert_eq!(Watched::disk_snapshot_of_content(&unbound), None);
    }

    #[test]
    fn a_node_snapshot_wakes_its_volume_snapshots_namesake_and_whoever_names_its_handle() {
        let store = store_of(vec![
            disk_snapshot("ns", "nightly", Some("snap-1")),
            disk_snapshot("ns", "other", Some("snap-2")),
        ]);
        // Named by the sidecar's metadata and by the status: woken once.
        assert_eq!(
            Watched::disk_snapshots_of_node_snapshot(
                &node_snapshot("snap-1", Some(("ns", "nightly"))),
                &store
            ),
            vec![ObjectRef::new("nightly").within("ns")]
        );
        // Without the sidecar's metadata: by the handle in the status.
        assert_eq!(
            Watched::disk_snapshots_of_node_snapshot(&node_snapshot("snap-2", None), &store),
            vec![ObjectRef::new("other").within("ns")]
        );
        // Another tool's snapshot: nothing of ours.
        assert!(
            Watched::disk_snapshots_of_node_snapshot(&node_snapshot("snap-3", None), &store)
                .is_empty()
        );
    }
}
