//! The CSI Controller service. It never touches storage: it declares volumes and snapshots as
//! internal CRs on the chosen node and waits for that node's plugin to report in their status.

use std::collections::HashMap;
use std::time::Duration;

use super::health;
use k8s_openapi::api::storage::v1::CSINode;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::events::{Recorder, Reporter};
use kube::{Client, ResourceExt};
use livedisk_api::internal::{
    ContentSource, LivediskNode, LivediskSnapshot, LivediskSnapshotSpec, LivediskVolume,
    LivediskVolumeSpec, NodePhase,
};
use livedisk_csi_proto::csi::v1::controller_server::Controller;
use livedisk_csi_proto::csi::v1::controller_service_capability::{self, rpc};
use livedisk_csi_proto::csi::v1::volume_capability::AccessType;
use livedisk_csi_proto::csi::v1::volume_capability::access_mode::Mode;
use livedisk_csi_proto::csi::v1::volume_content_source::{self, SnapshotSource, VolumeSource};
use livedisk_csi_proto::csi::v1::*;
use tonic::{Request, Response, Status};

use super::deletion_events;
use super::wait::{self, Poll};
use crate::grpc::error::CsiError;
use crate::grpc::inflight::{Guard, InFlight};
use crate::grpc::request::ParameterOwner;
use crate::grpc::{request, topology};
use livedisk_common::names::{snapshot_id_for, volume_id_for};
use livedisk_common::{DRIVER_NAME, SnapshotId, VolumeId};

type Reply<T> = Result<Response<T>, Status>;

pub struct ControllerService {
    client: Client,
    /// Events of snapshot deletions on their VolumeSnapshots (see `deletion_events`).
    recorder: Recorder,
    /// How long one call waits for a node before answering DEADLINE_EXCEEDED (the sidecars retry).
    timeout: Duration,
    /// Names and IDs with a call in progress: a second call on the same one gets ABORTED.
    in_flight: InFlight,
}

impl ControllerService {
    pub fn new(client: Client, timeout: Duration) -> Self {
        let reporter = Reporter {
            controller: "livedisk-csi-controller".into(),
            instance: None,
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            timeout,
            in_flight: InFlight::default(),
        }
    }

    pub(super) fn begin(&self, key: &str) -> Result<Guard, CsiError> {
        self.in_flight.begin(key)
    }

    fn volumes(&self) -> Api<LivediskVolume> {
        Api::all(self.client.clone())
    }

    pub(super) fn snapshots(&self) -> Api<LivediskSnapshot> {
        Api::all(self.client.clone())
    }

    /// Nodes where the livedisk node plugin is registered (listed in their CSINode).
    async fn known_nodes(&self) -> Result<Vec<String>, CsiError> {
        let csi_nodes: Api<CSINode> = Api::all(self.client.clone());
        let mut nodes: Vec<String> = csi_nodes
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .filter(|n| n.spec.drivers.iter().any(|d| d.name == DRIVER_NAME))
            .map(|n| n.name_any())
            .collect();
        nodes.sort();
        Ok(nodes)
    }

    async fn volumes_per_node(&self) -> Result<HashMap<String, usize>, CsiError> {
        let mut counts = HashMap::new();
        for volume in self.volumes().list(&ListParams::default()).await?.items {
            *counts.entry(volume.spec.node_name).or_insert(0) += 1;
        }
        Ok(counts)
    }

    /// The existing volume with this ID, or NOT_FOUND (an ID of the wrong shape cannot exist).
    pub(super) async fn volume(&self, id: &str) -> Result<LivediskVolume, CsiError> {
        let not_found = || CsiError::NotFound(format!("volume {id:?} does not exist"));
        VolumeId::parse(id).map_err(|_| not_found())?;
        self.volumes().get_opt(id).await?.ok_or_else(not_found)
    }

    /// The volumes that exist (not being deleted), sorted by ID: what ListVolumes pages over.
    async fn listed_volumes(&self) -> Result<Vec<LivediskVolume>, CsiError> {
        let mut volumes: Vec<LivediskVolume> = self
            .volumes()
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .filter(|v| v.metadata.deletion_timestamp.is_none())
            .collect();
        volumes.sort_by_key(|v| v.name_any());
        Ok(volumes)
    }

    /// Every node's livedisk report, by node name.
    async fn node_reports(&self) -> Result<HashMap<String, LivediskNode>, CsiError> {
        let nodes: Api<LivediskNode> = Api::all(self.client.clone());
        Ok(nodes
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .map(|n| (n.name_any(), n))
            .collect())
    }

    async fn snapshot(&self, id: &str) -> Result<LivediskSnapshot, CsiError> {
        let not_found = || CsiError::NotFound(format!("snapshot {id:?} does not exist"));
        SnapshotId::parse(id).map_err(|_| not_found())?;
        self.snapshots().get_opt(id).await?.ok_or_else(not_found)
    }

    /// Waits until the node made the volume real; on failure the object is removed again, so a
    /// failed create (a full pool) leaves nothing behind.
    async fn await_volume(&self, id: &str) -> Result<LivediskVolume, CsiError> {
        let result = wait::until(
            &self.volumes(),
            id,
            self.timeout,
            || {
                Err(CsiError::Aborted(format!(
                    "volume {id} was deleted while being created"
                )))
            },
            |volume: &LivediskVolume| {
                let status = volume.status.clone().unwrap_or_default();
                match (status.phase, status.error) {
                    (NodePhase::Ready, _) => Ok(Poll::Done(volume.clone())),
                    (NodePhase::Failed, Some(error)) => Err(CsiError::Node(error)),
                    _ => Ok(Poll::Pending),
                }
            },
        )
        .await;
        if let Err(CsiError::Node(_)) = &result {
            let _ = self.volumes().delete(id, &DeleteParams::default()).await;
        }
        result
    }

    pub(super) async fn await_snapshot(&self, id: &str) -> Result<LivediskSnapshot, CsiError> {
        let result = wait::until(
            &self.snapshots(),
            id,
            self.timeout,
            || {
                Err(CsiError::Aborted(format!(
                    "snapshot {id} was deleted while being taken"
                )))
            },
            |snapshot: &LivediskSnapshot| {
                let status = snapshot.status.clone().unwrap_or_default();
                match (status.phase, status.error) {
                    (NodePhase::Ready, _) => Ok(Poll::Done(snapshot.clone())),
                    (NodePhase::Failed, Some(error)) => Err(CsiError::Node(error)),
                    _ => Ok(Poll::Pending),
                }
            },
        )
        .await;
        if let Err(CsiError::Node(_)) = &result {
            let _ = self.snapshots().delete(id, &DeleteParams::default()).await;
        }
        result
    }

    /// Deletes an internal object and waits until its node released the storage. A permanent
    /// node error while deleting (for example a volume still attached) is returned as is; a
    /// transient one (the node's own background work holds the volume for a moment) is retried
    /// by the node within seconds, so the call keeps waiting, and returns it only at its timeout.
    async fn delete_and_wait<K>(&self, api: Api<K>, id: &str) -> Result<(), CsiError>
    where
        K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + NodeReported,
    {
        match api.delete(id, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => return Ok(()),
            Err(error) => return Err(error.into()),
        }
        let mut last_transient = None;
        let result = wait::until(
            &api,
            id,
            self.timeout,
            || Ok(()),
            |object: &K| match object.node_error() {
                Some(error) if !error.code.is_transient() => Err(CsiError::Node(error)),
                transient => {
                    last_transient = transient.or(last_transient.take());
                    Ok(Poll::Pending)
                }
            },
        )
        .await;
        match (result, last_transient) {
            (Err(CsiError::Timeout(_)), Some(error)) => Err(CsiError::Node(error)),
            (result, _) => result,
        }
    }

    /// Deletes a snapshot and waits for the node to merge its layer away, publishing the
    /// deletion's progress as Events on the VolumeSnapshot it was taken for (when known): when it
    /// starts (once, not on a retried call), at each quarter, and when it is done.
    pub(super) async fn delete_snapshot_with_events(&self, id: &str) -> Result<(), CsiError> {
        let snapshot = match SnapshotId::parse(id) {
            Ok(_) => self.snapshots().get_opt(id).await?,
            Err(_) => None,
        };
        let Some((snapshot, subject)) =
            snapshot.and_then(|s| deletion_events::subject(&s).map(|subject| (s, subject)))
        else {
            return self.delete_and_wait(self.snapshots(), id).await;
        };
        if snapshot.metadata.deletion_timestamp.is_none() {
            let note = deletion_events::started_note(&snapshot);
            deletion_events::publish(&self.recorder, &subject, deletion_events::MERGING, note)
                .await;
        }
        let snapshots = self.snapshots();
        let progress = deletion_events::follow(&self.recorder, &subject, &snapshots, id);
        let deletion = self.delete_and_wait(self.snapshots(), id);
        tokio::pin!(deletion);
        let result = tokio::select! {
            result = &mut deletion => result,
            () = progress => deletion.await,
        };
        if result.is_ok() {
            let note = format!("snapshot {id} deleted: its layer is merged away");
            deletion_events::publish(&self.recorder, &subject, deletion_events::MERGED, note).await;
        }
        result
    }

    async fn create_volume_impl(
        &self,
        request: CreateVolumeRequest,
    ) -> Result<CreateVolumeResponse, CsiError> {
        if request.name.is_empty() {
            return Err(CsiError::InvalidArgument("name must not be empty".into()));
        }
        request::capabilities(&request.volume_capabilities)?;
        let merge_bandwidth =
            request::merge_bandwidth(ParameterOwner::Volume, &request.parameters)?;
        let range = request.capacity_range.as_ref();
        let id = volume_id_for(&request.name);
        let _guard = self.begin(&request.name)?;

        let (source, source_node, source_size) = match request
            .volume_content_source
            .as_ref()
            .and_then(|s| s.r#type.as_ref())
        {
            None => (None, None, None),
            Some(volume_content_source::Type::Snapshot(SnapshotSource { snapshot_id })) => {
                let snapshot = self.snapshot(snapshot_id).await?;
                let ready = snapshot.status.as_ref().is_some_and(|s| s.ready_to_use);
                if !ready {
                    return Err(CsiError::FailedPrecondition(format!(
                        "snapshot {snapshot_id} is not ready to use"
                    )));
                }
                let size = snapshot.status.as_ref().and_then(|s| s.size_bytes);
                (
                    Some(ContentSource {
                        snapshot_id: Some(snapshot_id.clone()),
                        volume_id: None,
                    }),
                    Some(snapshot.spec.node_name),
                    size,
                )
            }
            Some(volume_content_source::Type::Volume(VolumeSource { volume_id })) => {
                let volume = self.volume(volume_id).await?;
                let size = volume
                    .status
                    .as_ref()
                    .and_then(|s| s.capacity_bytes)
                    .or(Some(volume.spec.capacity_bytes));
                (
                    Some(ContentSource {
                        snapshot_id: None,
                        volume_id: Some(volume_id.clone()),
                    }),
                    Some(volume.spec.node_name),
                    size,
                )
            }
        };
        let capacity = match (range, source_size) {
            (None, Some(size)) => size,
            (_, _) => request::capacity(range)?,
        };
        if let Some(size) = source_size
            && capacity < size
        {
            return Err(CsiError::OutOfRange(format!(
                "requested {capacity} bytes is smaller than the source's {size} bytes"
            )));
        }

        if let Some(existing) = self.volumes().get_opt(id.as_str()).await? {
            let existing_size = existing
                .status
                .as_ref()
                .and_then(|s| s.capacity_bytes)
                .unwrap_or(existing.spec.capacity_bytes);
            if existing.spec.content_source != source || !request::satisfies(existing_size, range) {
                return Err(CsiError::AlreadyExists(format!(
                    "volume {:?} exists with another size or source",
                    request.name
                )));
            }
        } else {
            let node = match source_node {
                Some(node) => {
                    let requisite = request
                        .accessibility_requirements
                        .as_ref()
                        .map(|r| r.requisite.as_slice())
                        .unwrap_or(&[]);
                    let allowed = requisite.is_empty()
                        || requisite
                            .iter()
                            .any(|t| t.segments.get(topology::NODE_KEY) == Some(&node));
                    let from_snapshot = source.as_ref().is_some_and(|s| s.snapshot_id.is_some());
                    if allowed {
                        node
                    } else if from_snapshot {
                        // A cross-node restore: the consumer's node makes the volume and reads
                        // the snapshot from its owner until it has copied it all.
                        let known = self.known_nodes().await?;
                        let counts = self.volumes_per_node().await?;
                        topology::choose_node(request.accessibility_requirements.as_ref(), &known, &counts)
                            .ok_or_else(|| CsiError::ResourceExhausted(format!(
                                "the snapshot lives on node {node}, which the topology requirement excludes, \
                                 and no other livedisk node satisfies it (registered nodes: {known:?})"
                            )))?
                    } else {
                        return Err(CsiError::ResourceExhausted(format!(
                            "the source volume lives on node {node}, which the topology requirement excludes; \
                             cloning a volume across nodes is not supported (restore from a snapshot of it, \
                             or move it with a DiskMigration first)"
                        )));
                    }
                }
                None => {
                    let known = self.known_nodes().await?;
                    let counts = self.volumes_per_node().await?;
                    topology::choose_node(request.accessibility_requirements.as_ref(), &known, &counts)
                        .ok_or_else(|| CsiError::ResourceExhausted(format!(
                            "no livedisk node satisfies the topology requirement (registered nodes: {known:?})"
                        )))?
                }
            };
            let volume = LivediskVolume {
                metadata: ObjectMeta {
                    name: Some(id.to_string()),
                    ..Default::default()
                },
                spec: LivediskVolumeSpec {
                    node_name: node,
                    capacity_bytes: capacity,
                    csi_name: request.name.clone(),
                    content_source: source.clone(),
                    merge_bandwidth_bytes_per_second: merge_bandwidth,
                },
                status: None,
            };
            match self.volumes().create(&PostParams::default(), &volume).await {
                Ok(_) => {}
                Err(kube::Error::Api(status)) if status.code == 409 => {}
                Err(error) => return Err(error.into()),
            }
        }
        let volume = self.await_volume(id.as_str()).await?;
        let shared = request.volume_capabilities.iter().any(|c| {
            c.access_mode
                .as_ref()
                .is_some_and(|m| m.mode == Mode::MultiNodeMultiWriter as i32)
        });
        let registered = match shared {
            true => self.known_nodes().await?,
            false => vec![],
        };
        Ok(CreateVolumeResponse {
            volume: Some(Volume {
                capacity_bytes: volume
                    .status
                    .as_ref()
                    .and_then(|s| s.capacity_bytes)
                    .unwrap_or(volume.spec.capacity_bytes),
                volume_id: id.to_string(),
                volume_context: HashMap::new(),
                content_source: request.volume_content_source.clone(),
                accessible_topology: topology::accessible(
                    &volume.spec.node_name,
                    &registered,
                    shared,
                ),
            }),
        })
    }

    async fn create_snapshot_impl(
        &self,
        request: CreateSnapshotRequest,
    ) -> Result<CreateSnapshotResponse, CsiError> {
        if request.name.is_empty() {
            return Err(CsiError::InvalidArgument("name must not be empty".into()));
        }
        if request.source_volume_id.is_empty() {
            return Err(CsiError::InvalidArgument(
                "source_volume_id must not be empty".into(),
            ));
        }
        let merge_bandwidth =
            request::merge_bandwidth(ParameterOwner::Snapshot, &request.parameters)?;
        let id = snapshot_id_for(&request.name);
        let _guard = self.begin(&request.source_volume_id)?;
        if let Some(existing) = self.snapshots().get_opt(id.as_str()).await? {
            if existing.spec.volume_id != request.source_volume_id {
                return Err(CsiError::AlreadyExists(format!(
                    "snapshot {:?} exists for another volume ({})",
                    request.name, existing.spec.volume_id
                )));
            }
        } else {
            let volume = self.volume(&request.source_volume_id).await?;
            let snapshot = LivediskSnapshot {
                metadata: ObjectMeta {
                    name: Some(id.to_string()),
                    ..Default::default()
                },
                spec: LivediskSnapshotSpec {
                    node_name: volume.spec.node_name.clone(),
                    volume_id: request.source_volume_id.clone(),
                    csi_name: request.name.clone(),
                    // The snapshot's class decides; without a limit there, its volume's class.
                    merge_bandwidth_bytes_per_second: merge_bandwidth
                        .or(volume.spec.merge_bandwidth_bytes_per_second),
                    volume_snapshot: request::snapshot_origin(&request.name, &request.parameters),
                    group: None,
                },
                status: None,
            };
            match self
                .snapshots()
                .create(&PostParams::default(), &snapshot)
                .await
            {
                Ok(_) => {}
                Err(kube::Error::Api(status)) if status.code == 409 => {}
                Err(error) => return Err(error.into()),
            }
        }
        let snapshot = self.await_snapshot(id.as_str()).await?;
        Ok(CreateSnapshotResponse {
            snapshot: Some(to_csi_snapshot(&snapshot)),
        })
    }

    async fn expand_impl(
        &self,
        request: ControllerExpandVolumeRequest,
    ) -> Result<ControllerExpandVolumeResponse, CsiError> {
        if request.volume_id.is_empty() {
            return Err(CsiError::InvalidArgument(
                "volume_id must not be empty".into(),
            ));
        }
        let range = request
            .capacity_range
            .as_ref()
            .ok_or_else(|| CsiError::InvalidArgument("capacity_range is required".into()))?;
        let _guard = self.begin(&request.volume_id)?;
        let volume = self.volume(&request.volume_id).await?;
        let wanted = request::capacity(Some(range))?;
        let node_expansion_required = !matches!(
            request
                .volume_capability
                .as_ref()
                .and_then(|c| c.access_type.as_ref()),
            Some(AccessType::Block(_))
        );
        if wanted > volume.spec.capacity_bytes {
            let patch = serde_json::json!({ "spec": { "capacityBytes": wanted } });
            self.volumes()
                .patch(
                    &request.volume_id,
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await?;
        }
        let target = wanted.max(volume.spec.capacity_bytes);
        let capacity = wait::until(
            &self.volumes(),
            &request.volume_id,
            self.timeout,
            || {
                Err(CsiError::NotFound(format!(
                    "volume {} was deleted",
                    request.volume_id
                )))
            },
            |volume: &LivediskVolume| {
                let status = volume.status.clone().unwrap_or_default();
                match (status.capacity_bytes, status.error) {
                    (Some(size), _) if size >= target => Ok(Poll::Done(size)),
                    (_, Some(error)) => Err(CsiError::Node(error)),
                    _ => Ok(Poll::Pending),
                }
            },
        )
        .await?;
        Ok(ControllerExpandVolumeResponse {
            capacity_bytes: capacity,
            node_expansion_required,
        })
    }
}

/// Internal objects whose node may report a typed error.
trait NodeReported {
    fn node_error(&self) -> Option<livedisk_api::internal::NodeError>;
}

impl NodeReported for LivediskVolume {
    fn node_error(&self) -> Option<livedisk_api::internal::NodeError> {
        self.status.as_ref().and_then(|s| s.error.clone())
    }
}

impl NodeReported for LivediskSnapshot {
    fn node_error(&self) -> Option<livedisk_api::internal::NodeError> {
        self.status.as_ref().and_then(|s| s.error.clone())
    }
}

pub(super) fn to_csi_snapshot(snapshot: &LivediskSnapshot) -> Snapshot {
    let status = snapshot.status.clone().unwrap_or_default();
    Snapshot {
        size_bytes: status.size_bytes.unwrap_or(0),
        snapshot_id: snapshot.name_any(),
        source_volume_id: snapshot.spec.volume_id.clone(),
        creation_time: status.creation_time.map(|t| prost_types::Timestamp {
            seconds: t.0.as_second(),
            nanos: t.0.subsec_nanosecond(),
        }),
        ready_to_use: status.ready_to_use,
        group_snapshot_id: snapshot
            .spec
            .group
            .as_ref()
            .map(|g| g.id.clone())
            .unwrap_or_default(),
        accessible_topology: vec![topology::of_node(&snapshot.spec.node_name)],
    }
}

fn capability(kind: rpc::Type) -> ControllerServiceCapability {
    ControllerServiceCapability {
        r#type: Some(controller_service_capability::Type::Rpc(
            controller_service_capability::Rpc {
                r#type: kind as i32,
            },
        )),
    }
}

/// The CSI view of an existing volume (ListVolumes, ControllerGetVolume): its node's topology.
fn to_csi_volume(volume: &LivediskVolume) -> Volume {
    let source = volume.spec.content_source.as_ref();
    Volume {
        capacity_bytes: volume
            .status
            .as_ref()
            .and_then(|s| s.capacity_bytes)
            .unwrap_or(volume.spec.capacity_bytes),
        volume_id: volume.name_any(),
        volume_context: HashMap::new(),
        content_source: source.and_then(|s| {
            let kind = match (&s.snapshot_id, &s.volume_id) {
                (Some(snapshot_id), _) => volume_content_source::Type::Snapshot(SnapshotSource {
                    snapshot_id: snapshot_id.clone(),
                }),
                (None, Some(volume_id)) => volume_content_source::Type::Volume(VolumeSource {
                    volume_id: volume_id.clone(),
                }),
                (None, None) => return None,
            };
            Some(VolumeContentSource { r#type: Some(kind) })
        }),
        accessible_topology: vec![topology::of_node(&volume.spec.node_name)],
    }
}

/// Pagination over objects sorted by name: the token is the name of the last entry of the
/// previous page, so volumes created or deleted between two pages neither shift nor repeat
/// entries (a deleted last entry is still a valid place to go on from). A token that is not a
/// volume ID was not issued here: ABORTED, as CSI asks.
fn page_after<K: kube::Resource + Clone>(
    items: &[K],
    starting_token: &str,
    max_entries: i32,
) -> Result<(Vec<K>, String), CsiError> {
    if max_entries < 0 {
        return Err(CsiError::InvalidArgument(
            "max_entries must not be negative".into(),
        ));
    }
    if !starting_token.is_empty() && VolumeId::parse(starting_token).is_err() {
        return Err(CsiError::Aborted(format!(
            "starting_token {starting_token:?} is not valid"
        )));
    }
    let rest: Vec<&K> = items
        .iter()
        .filter(|i| starting_token.is_empty() || i.meta().name.as_deref() > Some(starting_token))
        .collect();
    let take = match max_entries {
        0 => rest.len(),
        n => (n as usize).min(rest.len()),
    };
    let next = match take < rest.len() {
        true => rest[take - 1].meta().name.clone().unwrap_or_default(),
        false => String::new(),
    };
    Ok((rest[..take].iter().map(|i| (*i).clone()).collect(), next))
}

/// Pagination over a sorted list: the token is the index of the next entry.
fn page<T: Clone>(
    items: &[T],
    starting_token: &str,
    max_entries: i32,
) -> Result<(Vec<T>, String), CsiError> {
    if max_entries < 0 {
        return Err(CsiError::InvalidArgument(
            "max_entries must not be negative".into(),
        ));
    }
    let start = if starting_token.is_empty() {
        0
    } else {
        starting_token
            .parse::<usize>()
            .ok()
            .filter(|start| *start <= items.len())
            .ok_or_else(|| {
                CsiError::Aborted(format!("starting_token {starting_token:?} is not valid"))
            })?
    };
    let end = if max_entries == 0 {
        items.len()
    } else {
        (start + max_entries as usize).min(items.len())
    };
    let next = if end < items.len() {
        end.to_string()
    } else {
        String::new()
    };
    Ok((items[start..end].to_vec(), next))
}

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn create_volume(
        &self,
        request: Request<CreateVolumeRequest>,
    ) -> Reply<CreateVolumeResponse> {
        Ok(Response::new(
            self.create_volume_impl(request.into_inner()).await?,
        ))
    }

    async fn delete_volume(
        &self,
        request: Request<DeleteVolumeRequest>,
    ) -> Reply<DeleteVolumeResponse> {
        let id = request.into_inner().volume_id;
        if id.is_empty() {
            return Err(CsiError::InvalidArgument("volume_id must not be empty".into()).into());
        }
        if VolumeId::parse(&id).is_err() {
            // No volume can have that ID, so it is already deleted.
            return Ok(Response::new(DeleteVolumeResponse {}));
        }
        let _guard = self.begin(&id)?;
        self.delete_and_wait(self.volumes(), &id).await?;
        Ok(Response::new(DeleteVolumeResponse {}))
    }

    async fn controller_publish_volume(
        &self,
        _: Request<ControllerPublishVolumeRequest>,
    ) -> Reply<ControllerPublishVolumeResponse> {
        Err(CsiError::Unimplemented(
            "livedisk needs no controller publish (attachRequired: false)".into(),
        )
        .into())
    }

    async fn controller_unpublish_volume(
        &self,
        _: Request<ControllerUnpublishVolumeRequest>,
    ) -> Reply<ControllerUnpublishVolumeResponse> {
        Err(CsiError::Unimplemented(
            "livedisk needs no controller unpublish (attachRequired: false)".into(),
        )
        .into())
    }

    async fn validate_volume_capabilities(
        &self,
        request: Request<ValidateVolumeCapabilitiesRequest>,
    ) -> Reply<ValidateVolumeCapabilitiesResponse> {
        let request = request.into_inner();
        if request.volume_id.is_empty() {
            return Err(CsiError::InvalidArgument("volume_id must not be empty".into()).into());
        }
        if request.volume_capabilities.is_empty() {
            return Err(
                CsiError::InvalidArgument("volume_capabilities must not be empty".into()).into(),
            );
        }
        self.volume(&request.volume_id).await?;
        let response = match request::capabilities(&request.volume_capabilities) {
            Ok(()) => ValidateVolumeCapabilitiesResponse {
                confirmed: Some(validate_volume_capabilities_response::Confirmed {
                    volume_context: request.volume_context,
                    volume_capabilities: request.volume_capabilities,
                    parameters: request.parameters,
                    mutable_parameters: request.mutable_parameters,
                }),
                message: String::new(),
            },
            Err(error) => ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message: error.to_string(),
            },
        };
        Ok(Response::new(response))
    }

    async fn list_volumes(
        &self,
        request: Request<ListVolumesRequest>,
    ) -> Reply<ListVolumesResponse> {
        let request = request.into_inner();
        let volumes = self.listed_volumes().await?;
        let (entries, next_token) =
            page_after(&volumes, &request.starting_token, request.max_entries)?;
        Ok(Response::new(ListVolumesResponse {
            entries: entries
                .iter()
                .map(|v| list_volumes_response::Entry {
                    volume: Some(to_csi_volume(v)),
                    status: Some(list_volumes_response::VolumeStatus {
                        published_node_ids: vec![],
                    }),
                })
                .collect(),
            next_token,
        }))
    }

    async fn controller_list_volume_health(
        &self,
        request: Request<ControllerListVolumeHealthRequest>,
    ) -> Reply<ControllerListVolumeHealthResponse> {
        let request = request.into_inner();
        let volumes = self.listed_volumes().await?;
        let (entries, next_token) =
            page_after(&volumes, &request.starting_token, request.max_entries)?;
        let nodes = self.node_reports().await?;
        let now = k8s_openapi::jiff::Timestamp::now();
        Ok(Response::new(ControllerListVolumeHealthResponse {
            entries: entries
                .iter()
                .map(|v| VolumeHealth {
                    volume_id: v.name_any(),
                    health_statuses: health::volume_health(v, nodes.get(&v.spec.node_name), now),
                })
                .collect(),
            next_token,
        }))
    }

    async fn controller_get_volume_health(
        &self,
        request: Request<ControllerGetVolumeHealthRequest>,
    ) -> Reply<ControllerGetVolumeHealthResponse> {
        let id = request.into_inner().volume_id;
        if id.is_empty() {
            return Err(CsiError::InvalidArgument("volume_id must not be empty".into()).into());
        }
        let volume = self.volume(&id).await?;
        let nodes = self.node_reports().await?;
        Ok(Response::new(ControllerGetVolumeHealthResponse {
            volume_health: Some(VolumeHealth {
                volume_id: id,
                health_statuses: health::volume_health(
                    &volume,
                    nodes.get(&volume.spec.node_name),
                    k8s_openapi::jiff::Timestamp::now(),
                ),
            }),
        }))
    }

    async fn get_capacity(
        &self,
        request: Request<GetCapacityRequest>,
    ) -> Reply<GetCapacityResponse> {
        let request = request.into_inner();
        if !request.volume_capabilities.is_empty() {
            request::capabilities(&request.volume_capabilities)?;
        }
        // Each node plugin reports its pool's free space in its LivediskNode.
        let nodes: Api<LivediskNode> = Api::all(self.client.clone());
        let reports = nodes
            .list(&ListParams::default())
            .await
            .map_err(CsiError::from)?
            .items;
        let wanted = request
            .accessible_topology
            .as_ref()
            .and_then(|t| t.segments.get(topology::NODE_KEY));
        let available: Vec<i64> = reports
            .iter()
            .filter(|n| wanted.is_none_or(|w| n.name_any() == *w))
            .filter_map(|n| n.status.as_ref().and_then(|s| s.pool_available_bytes))
            .collect();
        Ok(Response::new(GetCapacityResponse {
            available_capacity: available.iter().sum(),
            // One volume lives on one node: the largest one fits the emptiest pool.
            maximum_volume_size: Some(available.iter().copied().max().unwrap_or(0)),
            minimum_volume_size: None,
        }))
    }

    async fn controller_get_capabilities(
        &self,
        _: Request<ControllerGetCapabilitiesRequest>,
    ) -> Reply<ControllerGetCapabilitiesResponse> {
        let capabilities = [
            rpc::Type::CreateDeleteVolume,
            rpc::Type::CreateDeleteSnapshot,
            rpc::Type::ListSnapshots,
            rpc::Type::GetSnapshot,
            rpc::Type::CloneVolume,
            rpc::Type::ExpandVolume,
            rpc::Type::GetCapacity,
            rpc::Type::SingleNodeMultiWriter,
            rpc::Type::ListVolumes,
            rpc::Type::GetVolume,
            rpc::Type::GetVolumeHealth,
            rpc::Type::ListVolumeHealth,
        ]
        .into_iter()
        .map(capability)
        .collect();
        Ok(Response::new(ControllerGetCapabilitiesResponse {
            capabilities,
        }))
    }

    async fn create_snapshot(
        &self,
        request: Request<CreateSnapshotRequest>,
    ) -> Reply<CreateSnapshotResponse> {
        Ok(Response::new(
            self.create_snapshot_impl(request.into_inner()).await?,
        ))
    }

    async fn delete_snapshot(
        &self,
        request: Request<DeleteSnapshotRequest>,
    ) -> Reply<DeleteSnapshotResponse> {
        let id = request.into_inner().snapshot_id;
        if id.is_empty() {
            return Err(CsiError::InvalidArgument("snapshot_id must not be empty".into()).into());
        }
        if SnapshotId::parse(&id).is_err() {
            return Ok(Response::new(DeleteSnapshotResponse {}));
        }
        let _guard = self.begin(&id)?;
        self.delete_snapshot_with_events(&id).await?;
        Ok(Response::new(DeleteSnapshotResponse {}))
    }

    async fn list_snapshots(
        &self,
        request: Request<ListSnapshotsRequest>,
    ) -> Reply<ListSnapshotsResponse> {
        let request = request.into_inner();
        let mut snapshots: Vec<LivediskSnapshot> = self
            .snapshots()
            .list(&ListParams::default())
            .await
            .map_err(CsiError::from)?
            .items
            .into_iter()
            .filter(|s| request.snapshot_id.is_empty() || s.name_any() == request.snapshot_id)
            .filter(|s| {
                request.source_volume_id.is_empty() || s.spec.volume_id == request.source_volume_id
            })
            .filter(|s| s.metadata.deletion_timestamp.is_none())
            .collect();
        snapshots.sort_by_key(|s| s.name_any());
        let (entries, next_token) = page(&snapshots, &request.starting_token, request.max_entries)?;
        Ok(Response::new(ListSnapshotsResponse {
            entries: entries
                .iter()
                .map(|s| list_snapshots_response::Entry {
                    snapshot: Some(to_csi_snapshot(s)),
                })
                .collect(),
            next_token,
        }))
    }

    async fn get_snapshot(
        &self,
        request: Request<GetSnapshotRequest>,
    ) -> Reply<GetSnapshotResponse> {
        let id = request.into_inner().snapshot_id;
        if id.is_empty() {
            return Err(CsiError::InvalidArgument("snapshot_id must not be empty".into()).into());
        }
        let snapshot = self.snapshot(&id).await?;
        Ok(Response::new(GetSnapshotResponse {
            snapshot: Some(to_csi_snapshot(&snapshot)),
        }))
    }

    async fn controller_expand_volume(
        &self,
        request: Request<ControllerExpandVolumeRequest>,
    ) -> Reply<ControllerExpandVolumeResponse> {
        Ok(Response::new(self.expand_impl(request.into_inner()).await?))
    }

    async fn controller_get_volume(
        &self,
        request: Request<ControllerGetVolumeRequest>,
    ) -> Reply<ControllerGetVolumeResponse> {
        let id = request.into_inner().volume_id;
        if id.is_empty() {
            return Err(CsiError::InvalidArgument("volume_id must not be empty".into()).into());
        }
        let volume = self.volume(&id).await?;
        Ok(Response::new(ControllerGetVolumeResponse {
            volume: Some(to_csi_volume(&volume)),
            status: Some(controller_get_volume_response::VolumeStatus {
                published_node_ids: vec![],
            }),
        }))
    }

    async fn controller_modify_volume(
        &self,
        _: Request<ControllerModifyVolumeRequest>,
    ) -> Reply<ControllerModifyVolumeResponse> {
        Err(CsiError::Unimplemented("ControllerModifyVolume is not offered".into()).into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_walk_the_list_and_reject_bad_tokens() {
        let items: Vec<u32> = (0..5).collect();
        let (first, token) = page(&items, "", 2).unwrap();
        assert_eq!((first, token.as_str()), (vec![0, 1], "2"));
        let (second, token) = page(&items, &token, 2).unwrap();
        assert_eq!((second, token.as_str()), (vec![2, 3], "4"));
        let (last, token) = page(&items, &token, 2).unwrap();
        assert_eq!((last, token.as_str()), (vec![4], ""));
        assert_eq!(page(&items, "", 0).unwrap().0.len(), 5);
        assert!(matches!(page(&items, "x", 1), Err(CsiError::Aborted(_))));
        assert!(matches!(page(&items, "9", 1), Err(CsiError::Aborted(_))));
        assert!(matches!(
            page(&items, "", -1),
            Err(CsiError::InvalidArgument(_))
        ));
    }
}
