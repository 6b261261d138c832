//! The CSI GroupController service: snapshots of several volumes at one instant.
//!
//! A group snapshot is no object of its own: it is the set of its member `LivediskSnapshot`s,
//! each labelled with the group's ID and recording every member. The node holding the volumes
//! takes all members in one engine transaction once every member is declared (see the node
//! agent), so the members are ordinary snapshots afterwards: restorable, deletable one by one,
//! listed and queried for changed blocks like any other. Volumes held by different nodes have no
//! common instant and are refused.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use kube::ResourceExt;
use kube::api::{ListParams, ObjectMeta, PostParams};
use livedisk_api::internal::{
    GROUP_SNAPSHOT_LABEL, GroupMember, LivediskSnapshot, LivediskSnapshotSpec, SnapshotGroup,
};
use livedisk_common::names::{group_member_snapshot_id, group_snapshot_id_for};
use livedisk_common::{GroupSnapshotId, VolumeId};
use livedisk_csi_proto::csi::v1::group_controller_server::GroupController;
use livedisk_csi_proto::csi::v1::group_controller_service_capability::{self, rpc};
use livedisk_csi_proto::csi::v1::*;
use tonic::{Request, Response, Status};

use super::controller::{ControllerService, to_csi_snapshot};
use crate::grpc::error::CsiError;
use crate::grpc::request::{self, ParameterOwner};

type Reply<T> = Result<Response<T>, Status>;

/// The most volumes one group snapshot may hold (one QMP transaction; the CRD's bound too).
pub const MAX_GROUP_VOLUMES: usize = 64;

pub struct GroupControllerService {
    controller: Arc<ControllerService>,
}

impl GroupControllerService {
    pub fn new(controller: Arc<ControllerService>) -> Self {
        Self { controller }
    }
}

/// Pure: the request's volumes, sorted, or why the request is malformed (no name, no volume,
/// one listed twice, too many).
pub fn requested_volumes(name: &str, volume_ids: &[String]) -> Result<BTreeSet<String>, CsiError> {
    if name.is_empty() {
        return Err(CsiError::InvalidArgument("name must not be empty".into()));
    }
    if volume_ids.is_empty() {
        return Err(CsiError::InvalidArgument(
            "source_volume_ids must not be empty".into(),
        ));
    }
    if volume_ids.len() > MAX_GROUP_VOLUMES {
        return Err(CsiError::InvalidArgument(format!(
            "a group snapshot holds at most {MAX_GROUP_VOLUMES} volumes, not {}",
            volume_ids.len()
        )));
    }
    let volumes: BTreeSet<String> = volume_ids.iter().cloned().collect();
    if volumes.len() != volume_ids.len() {
        return Err(CsiError::InvalidArgument(
            "source_volume_ids lists a volume more than once".into(),
        ));
    }
    Ok(volumes)
}

/// Pure: the node and the group to declare for `name` over `volumes` (each volume ID with the
/// node holding it), or why not: volumes held by several nodes have no common instant.
pub fn plan_group(
    name: &str,
    volumes: &BTreeMap<String, String>,
) -> Result<(String, SnapshotGroup), CsiError> {
    let nodes: BTreeSet<&String> = volumes.values().collect();
    if nodes.len() > 1 {
        let held: Vec<String> = volumes
            .iter()
            .map(|(volume, node)| format!("{volume} on {node}"))
            .collect();
        return Err(CsiError::FailedPrecondition(format!(
            "the volumes are held by different nodes ({}): they have no common instant, so no \
             crash-consistent group snapshot can be taken of them; move them to one node \
             (DiskMigration) or snapshot them one by one",
            held.join(", ")
        )));
    }
    let node =
        nodes.into_iter().next().cloned().ok_or_else(|| {
            CsiError::InvalidArgument("source_volume_ids must not be empty".into())
        })?;
    let mut members = Vec::with_capacity(volumes.len());
    for volume in volumes.keys() {
        let id = VolumeId::parse(volume)
            .map_err(|_| CsiError::NotFound(format!("volume {volume:?} does not exist")))?;
        members.push(GroupMember {
            volume_id: volume.clone(),
            snapshot_id: group_member_snapshot_id(name, &id).to_string(),
        });
    }
    let group = SnapshotGroup {
        id: group_snapshot_id_for(name).to_string(),
        csi_name: name.to_string(),
        members,
    };
    Ok((node, group))
}

/// Pure: whether a member snapshot was taken (Ready) or is being deleted: either way the
/// group's instant is settled for it.
pub fn taken_or_going(member: &LivediskSnapshot) -> bool {
    member.metadata.deletion_timestamp.is_some()
        || member
            .status
            .as_ref()
            .is_some_and(|s| s.phase == livedisk_api::internal::NodePhase::Ready)
}

/// Pure: whether a caller's `snapshot_ids` name exactly the group's members (an empty list
/// names them all: the caller leaves it to the plugin).
pub fn check_snapshot_ids(group: &SnapshotGroup, snapshot_ids: &[String]) -> Result<(), CsiError> {
    if snapshot_ids.is_empty() {
        return Ok(());
    }
    let recorded: BTreeSet<&str> = group
        .members
        .iter()
        .map(|m| m.snapshot_id.as_str())
        .collect();
    let given: BTreeSet<&str> = snapshot_ids.iter().map(String::as_str).collect();
    if recorded != given {
        return Err(CsiError::InvalidArgument(format!(
            "snapshot_ids do not match group snapshot {}: its members are {}",
            group.id,
            recorded.into_iter().collect::<Vec<_>>().join(", ")
        )));
    }
    Ok(())
}

/// Pure: the CSI view of a group from its member snapshots (as found; members deleted one by
/// one are left out). The instant is the members' (one transaction: the same for all).
pub fn to_csi_group(id: &str, members: &[LivediskSnapshot]) -> VolumeGroupSnapshot {
    let snapshots: Vec<Snapshot> = members.iter().map(to_csi_snapshot).collect();
    VolumeGroupSnapshot {
        group_snapshot_id: id.to_string(),
        creation_time: snapshots.iter().find_map(|s| s.creation_time),
        ready_to_use: !snapshots.is_empty() && snapshots.iter().all(|s| s.ready_to_use),
        snapshots,
    }
}

impl GroupControllerService {
    /// The member snapshots of a group, sorted by volume, and the group as they record it.
    async fn members(
        &self,
        id: &GroupSnapshotId,
    ) -> Result<(Vec<LivediskSnapshot>, Option<SnapshotGroup>), CsiError> {
        let mut members = self
            .controller
            .snapshots()
            .list(&ListParams::default().labels(&format!("{GROUP_SNAPSHOT_LABEL}={id}")))
            .await?
            .items;
        members.sort_by(|a, b| a.spec.volume_id.cmp(&b.spec.volume_id));
        let group = members.iter().find_map(|m| m.spec.group.clone());
        Ok((members, group))
    }

    async fn create_impl(
        &self,
        request: CreateVolumeGroupSnapshotRequest,
    ) -> Result<CreateVolumeGroupSnapshotResponse, CsiError> {
        let requested = requested_volumes(&request.name, &request.source_volume_ids)?;
        let merge_bandwidth =
            request::merge_bandwidth(ParameterOwner::Snapshot, &request.parameters)?;
        let id = group_snapshot_id_for(&request.name);
        let _group_call = self.controller.begin(id.as_str())?;
        let (existing, recorded) = self.members(&id).await?;
        let (node, group) = match recorded {
            Some(group) => {
                let recorded_volumes: BTreeSet<String> =
                    group.members.iter().map(|m| m.volume_id.clone()).collect();
                if recorded_volumes != requested {
                    return Err(CsiError::AlreadyExists(format!(
                        "group snapshot {:?} exists for other volumes",
                        request.name
                    )));
                }
                let node = existing
                    .first()
                    .map(|s| s.spec.node_name.clone())
                    .unwrap_or_default();
                (node, group)
            }
            None => {
                // Each volume's node, as the inventory says now.
                let mut volumes = BTreeMap::new();
                for volume in &requested {
                    let found = self.controller.volume(volume).await?;
                    volumes.insert(volume.clone(), found.spec.node_name.clone());
                }
                plan_group(&request.name, &volumes)?
            }
        };
        let missing: Vec<&GroupMember> = group
            .members
            .iter()
            .filter(|m| !existing.iter().any(|s| s.name_any() == m.snapshot_id))
            .collect();
        if !missing.is_empty() && existing.iter().any(taken_or_going) {
            // The group's instant is past (or its members are going): a member declared now
            // could only be taken at another instant.
            return Err(CsiError::FailedPrecondition(format!(
                "group snapshot {:?} was taken without {} (deleted since) or is being deleted; \
                 delete the group and take a new one",
                request.name,
                missing
                    .iter()
                    .map(|m| m.volume_id.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        // Every member not declared yet (all of them the first time; those an interrupted call
        // left out on a retry), on the group's one node: a volume that moved since is refused.
        for member in missing {
            let volume = self.controller.volume(&member.volume_id).await?;
            if volume.spec.node_name != node {
                return Err(CsiError::FailedPrecondition(format!(
                    "volume {} moved to node {} while its group snapshot on node {node} was being \
                     declared; the group has no common instant",
                    member.volume_id, volume.spec.node_name
                )));
            }
            self.declare_member(&node, &group, member, merge_bandwidth, &volume)
                .await?;
        }
        let mut taken = Vec::with_capacity(group.members.len());
        for member in &group.members {
            match self.controller.await_snapshot(&member.snapshot_id).await {
                Ok(snapshot) => taken.push(snapshot),
                // The members share one instant or none: a node that could not take them (a
                // full pool) failed them all; the members not taken are removed, so a retry
                // starts afresh. A member taken already is never removed here.
                Err(error @ CsiError::Node(_)) => {
                    let (members, _) = self.members(&id).await?;
                    for member in members.iter().filter(|m| !taken_or_going(m)) {
                        let _ = self
                            .controller
                            .snapshots()
                            .delete(&member.name_any(), &Default::default())
                            .await;
                    }
                    return Err(error);
                }
                Err(error) => return Err(error),
            }
        }
        Ok(CreateVolumeGroupSnapshotResponse {
            group_snapshot: Some(to_csi_group(&group.id, &taken)),
        })
    }

    async fn declare_member(
        &self,
        node: &str,
        group: &SnapshotGroup,
        member: &GroupMember,
        merge_bandwidth: Option<i64>,
        volume: &livedisk_api::internal::LivediskVolume,
    ) -> Result<(), CsiError> {
        let snapshot = LivediskSnapshot {
            metadata: ObjectMeta {
                name: Some(member.snapshot_id.clone()),
                labels: Some([(GROUP_SNAPSHOT_LABEL.to_string(), group.id.clone())].into()),
                ..Default::default()
            },
            spec: LivediskSnapshotSpec {
                node_name: node.to_string(),
                volume_id: member.volume_id.clone(),
                csi_name: group.csi_name.clone(),
                merge_bandwidth_bytes_per_second: merge_bandwidth
                    .or(volume.spec.merge_bandwidth_bytes_per_second),
                volume_snapshot: None,
                group: Some(group.clone()),
            },
            status: None,
        };
        match self
            .controller
            .snapshots()
            .create(&PostParams::default(), &snapshot)
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
            Err(error) => Err(error.into()),
        }
    }

    async fn delete_impl(&self, request: DeleteVolumeGroupSnapshotRequest) -> Result<(), CsiError> {
        if request.group_snapshot_id.is_empty() {
            return Err(CsiError::InvalidArgument(
                "group_snapshot_id must not be empty".into(),
            ));
        }
        // An ID of the wrong shape names no group: nothing to delete.
        let Ok(id) = GroupSnapshotId::parse(&request.group_snapshot_id) else {
            return Ok(());
        };
        let _group_call = self.controller.begin(id.as_str())?;
        let (members, recorded) = self.members(&id).await?;
        let Some(group) = recorded else {
            return Ok(());
        };
        check_snapshot_ids(&group, &request.snapshot_ids)?;
        for member in &members {
            self.controller
                .delete_snapshot_with_events(&member.name_any())
                .await?;
        }
        Ok(())
    }

    async fn get_impl(
        &self,
        request: GetVolumeGroupSnapshotRequest,
    ) -> Result<GetVolumeGroupSnapshotResponse, CsiError> {
        if request.group_snapshot_id.is_empty() {
            return Err(CsiError::InvalidArgument(
                "group_snapshot_id must not be empty".into(),
            ));
        }
        let not_found = || {
            CsiError::NotFound(format!(
                "group snapshot {:?} does not exist",
                request.group_snapshot_id
            ))
        };
        let id = GroupSnapshotId::parse(&request.group_snapshot_id).map_err(|_| not_found())?;
        let (members, recorded) = self.members(&id).await?;
        let group = recorded.ok_or_else(not_found)?;
        check_snapshot_ids(&group, &request.snapshot_ids)?;
        Ok(GetVolumeGroupSnapshotResponse {
            group_snapshot: Some(to_csi_group(&group.id, &members)),
        })
    }
}

#[tonic::async_trait]
impl GroupController for GroupControllerService {
    async fn group_controller_get_capabilities(
        &self,
        _: Request<GroupControllerGetCapabilitiesRequest>,
    ) -> Reply<GroupControllerGetCapabilitiesResponse> {
        Ok(Response::new(GroupControllerGetCapabilitiesResponse {
            capabilities: vec![GroupControllerServiceCapability {
                r#type: Some(group_controller_service_capability::Type::Rpc(
                    group_controller_service_capability::Rpc {
                        r#type: rpc::Type::CreateDeleteGetVolumeGroupSnapshot as i32,
                    },
                )),
            }],
        }))
    }

    async fn create_volume_group_snapshot(
        &self,
        request: Request<CreateVolumeGroupSnapshotRequest>,
    ) -> Reply<CreateVolumeGroupSnapshotResponse> {
        Ok(Response::new(self.create_impl(request.into_inner()).await?))
    }

    async fn delete_volume_group_snapshot(
        &self,
        request: Request<DeleteVolumeGroupSnapshotRequest>,
    ) -> Reply<DeleteVolumeGroupSnapshotResponse> {
        self.delete_impl(request.into_inner()).await?;
        Ok(Response::new(DeleteVolumeGroupSnapshotResponse {}))
    }

    async fn get_volume_group_snapshot(
        &self,
        request: Request<GetVolumeGroupSnapshotRequest>,
    ) -> Reply<GetVolumeGroupSnapshotResponse> {
        Ok(Response::new(self.get_impl(request.into_inner()).await?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grpc::error::CsiError;
    use livedisk_common::names::volume_id_for;

    fn volumes(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(v, n)| (volume_id_for(v).to_string(), n.to_string()))
            .collect()
    }

    #[test]
    fn a_malformed_request_is_refused_before_anything_is_looked_up() {
        let a = volume_id_for("a").to_string();
        assert!(matches!(
            requested_volumes("", std::slice::from_ref(&a)),
            Err(CsiError::InvalidArgument(m)) if m.contains("name")
        ));
        assert!(matches!(
            requested_volumes("g", &[]),
            Err(CsiError::InvalidArgument(m)) if m.contains("source_volume_ids")
        ));
        assert!(matches!(
            requested_volumes("g", &[a.clone(), a.clone()]),
            Err(CsiError::InvalidArgument(m)) if m.contains("more than once")
        ));
        let many: Vec<String> = (0..=MAX_GROUP_VOLUMES)
            .map(|i| volume_id_for(&i.to_string()).to_string())
            .collect();
        assert!(matches!(
            requested_volumes("g", &many),
            Err(CsiError::InvalidArgument(m)) if m.contains("at most")
        ));
        assert_eq!(
            requested_volumes("g", std::slice::from_ref(&a))
                .map(|v| v.len())
                .ok(),
            Some(1)
        );
    }

    #[test]
    fn volumes_of_one_node_make_one_group_with_stable_member_ids() {
        let held = volumes(&[("b", "node-a"), ("a", "node-a")]);
        let (node, group) = plan_group("g", &held).expect("one node");
        assert_eq!(node, "node-a");
        assert_eq!(group.id, group_snapshot_id_for("g").to_string());
        assert_eq!(group.csi_name, "g");
        // Sorted by volume, each member's ID derived from the name and the volume.
        let ids: Vec<&String> = group.members.iter().map(|m| &m.volume_id).collect();
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(ids, sorted);
        let (_, again) = plan_group("g", &held).expect("one node");
        assert_eq!(group, again);
        let (_, other) = plan_group("h", &held).expect("one node");
        assert_ne!(group.members[0].snapshot_id, other.members[0].snapshot_id);
    }

    #[test]
    fn volumes_of_several_nodes_have_no_common_instant() {
        let held = volumes(&[("a", "node-a"), ("b", "node-b")]);
        match plan_group("g", &held) {
            Err(CsiError::FailedPrecondition(m)) => {
                assert!(m.contains("different nodes"), "{m}");
                assert!(m.contains("node-b"), "{m}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_snapshot_list_must_name_the_group_exactly() {
        let (_, group) =
            plan_group("g", &volumes(&[("a", "node-a"), ("b", "node-a")])).expect("one node");
        let ids: Vec<String> = group
            .members
            .iter()
            .map(|m| m.snapshot_id.clone())
            .collect();
        assert!(check_snapshot_ids(&group, &ids).is_ok());
        assert!(check_snapshot_ids(&group, &[]).is_ok());
        let reversed: Vec<String> = ids.iter().rev().cloned().collect();
        assert!(check_snapshot_ids(&group, &reversed).is_ok());
        assert!(matches!(
            check_snapshot_ids(&group, &ids[..1]),
            Err(CsiError::InvalidArgument(_))
        ));
        let mut extra = ids.clone();
        extra.push("snap-00000000-0000-0000-0000-000000000000".into());
        assert!(check_snapshot_ids(&group, &extra).is_err());
    }

    #[test]
    fn the_group_is_ready_when_every_member_is_and_has_their_instant() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
        use livedisk_api::internal::LivediskSnapshotStatus;
        let (_, group) =
            plan_group("g", &volumes(&[("a", "node-a"), ("b", "node-a")])).expect("one node");
        let member = |m: &GroupMember, ready: bool| {
            let mut s = LivediskSnapshot::new(
                &m.snapshot_id,
                LivediskSnapshotSpec {
                    node_name: "node-a".into(),
                    volume_id: m.volume_id.clone(),
                    csi_name: "g".into(),
                    merge_bandwidth_bytes_per_second: None,
                    volume_snapshot: None,
                    group: Some(group.clone()),
                },
            );
            s.status = Some(LivediskSnapshotStatus {
                ready_to_use: ready,
                creation_time: Some(MicroTime(
                    k8s_openapi::jiff::Timestamp::new(1_000, 250_000_000).unwrap_or_default(),
                )),
                ..Default::default()
            });
            s
        };
        let both = [
            member(&group.members[0], true),
            member(&group.members[1], true),
        ];
        let csi = to_csi_group(&group.id, &both);
        assert!(csi.ready_to_use);
        assert_eq!(csi.snapshots.len(), 2);
        assert_eq!(
            csi.creation_time.map(|t| (t.seconds, t.nanos)),
            Some((1_000, 250_000_000))
        );
        assert!(
            csi.snapshots
                .iter()
                .all(|s| s.group_snapshot_id == group.id)
        );
        let half = [
            member(&group.members[0], true),
            member(&group.members[1], false),
        ];
        assert!(!to_csi_group(&group.id, &half).ready_to_use);
        assert!(!to_csi_group(&group.id, &[]).ready_to_use);
    }
}
