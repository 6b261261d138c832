//! The CSI Node service: stage (attach + format/mount), publish (bind mounts), stats, expansion.
//! Tests play kubelet's part and call it exactly as kubelet does.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use livedisk_csi_proto::csi::v1::node_server::Node;
use livedisk_csi_proto::csi::v1::node_service_capability::{self, rpc};
use livedisk_csi_proto::csi::v1::volume_capability::AccessType;
use livedisk_csi_proto::csi::v1::volume_capability::access_mode::Mode;
use livedisk_csi_proto::csi::v1::volume_usage::Unit;
use livedisk_csi_proto::csi::v1::*;
use tonic::{Request, Response, Status};

use super::attach::{Attacher, run};
use super::blocking::off_runtime;
use super::health;
use super::mount_decision::{self, Decision, Source, Wanted};
use super::mounts;
pub use super::mounts::statvfs;
use super::remote_attach::{Placement, RemoteAttacher};
use super::restore_work::RestoreGate;
use crate::export::grants::Grants;
use crate::grpc::error::CsiError;
use crate::grpc::inflight::InFlight;
use crate::grpc::{request, topology};
use livedisk_engine::{Engine, VolumeId, VolumeInfo};

type Reply<T> = Result<Response<T>, Status>;

pub struct NodeService {
    engine: Arc<Engine>,
    attacher: Attacher,
    /// Volumes other nodes hold, attached here over the network.
    remote: RemoteAttacher,
    /// The export front's admissions: a volume this node serves to another node keeps its
    /// engine export when the local consumer lets go.
    served: Option<Arc<Grants>>,
    node_name: String,
    in_flight: InFlight,
    /// This node's reverts: a volume whose revert waits or runs is not staged.
    restores: RestoreGate,
}

impl NodeService {
    pub fn new(
        engine: Arc<Engine>,
        runtime_dir: &Path,
        node_name: String,
        restores: RestoreGate,
        remote: RemoteAttacher,
        served: Option<Arc<Grants>>,
        in_flight: InFlight,
    ) -> Self {
        Self {
            engine,
            attacher: Attacher::new(runtime_dir),
            remote,
            served,
            node_name,
            in_flight,
            restores,
        }
    }

    /// The volume and where it lives (this node, or the node that serves it here), or
    /// NOT_FOUND: an ID of the wrong shape names no volume.
    async fn volume(&self, id: &str) -> Result<(VolumeId, Placement), CsiError> {
        if id.is_empty() {
            return Err(CsiError::InvalidArgument(
                "volume_id must not be empty".into(),
            ));
        }
        let volume = VolumeId::parse(id)
            .map_err(|_| CsiError::NotFound(format!("volume {id:?} does not exist")))?;
        let placement = self.remote.placement(&volume).await?;
        Ok((volume, placement))
    }

    /// Attaches the volume where it lives and returns its block device.
    async fn attach(
        &self,
        volume: &VolumeId,
        placement: &Placement,
        capability: &VolumeCapability,
    ) -> Result<PathBuf, CsiError> {
        let shared = capability
            .access_mode
            .as_ref()
            .is_some_and(|m| m.mode == Mode::MultiNodeMultiWriter as i32);
        match placement {
            Placement::Local => self.attacher.attach(&self.engine, volume, shared).await,
            Placement::Remote { owner, .. } => {
                // Attached already: the device is found over the export it was made on.
                let export = match self.attacher.device(volume).await {
                    Some(_) => self.engine.remote_export(volume),
                    None => self.remote.attach(volume, owner).await?,
                };
                self.attacher.attach_over(volume, &export, shared).await
            }
        }
    }

    /// The volume's size: this node's engine's, or the inventory's for a volume another node
    /// holds.
    async fn size(&self, volume: &VolumeId, placement: &Placement) -> Result<i64, CsiError> {
        match placement {
            Placement::Local => Ok(self.volume_info(volume).await?.size as i64),
            Placement::Remote { capacity, .. } => Ok(*capacity),
        }
    }

    /// The engine's view of a volume (it reads the volume's record file: off the runtime).
    async fn volume_info(&self, volume: &VolumeId) -> Result<VolumeInfo, CsiError> {
        let (engine, volume) = (self.engine.clone(), volume.clone());
        off_runtime("reading the volume record", move || {
            engine.volume(&volume).map_err(CsiError::from)
        })
        .await
    }

    /// Stages: attaches the volume and, for the mount access type, mounts its filesystem at the
    /// staging path. A repeat succeeds; a staging path where anything else is mounted (another
    /// device, another filesystem type, other flags) is refused with ALREADY_EXISTS, the code
    /// the spec gives for a volume staged there incompatibly, and is left as it is; when the
    /// mount there cannot be this volume's (the volume is not attached), nothing is attached.
    async fn stage(&self, request: NodeStageVolumeRequest) -> Result<(), CsiError> {
        let staging = required_path(&request.staging_target_path, "staging_target_path")?;
        let capability = request
            .volume_capability
            .as_ref()
            .ok_or_else(|| CsiError::InvalidArgument("volume_capability is required".into()))?;
        request::capability(capability)?;
        let (volume, placement) = self.volume(&request.volume_id).await?;
        let _guard = self.in_flight.begin(volume.as_str())?;
        // A consumer staged now would see its disk change under it (or hold the revert off
        // again right after the previous consumer let go).
        self.restores.check(&volume).await?;
        let Some(AccessType::Mount(mount)) = &capability.access_type else {
            // Block access: the device is all there is to stage; nothing goes at the path.
            self.attach(&volume, &placement, capability).await?;
            return Ok(());
        };
        let fs_type = if mount.fs_type.is_empty() {
            "ext4"
        } else {
            mount.fs_type.as_str()
        };
        let options = mount_decision::mount_options(&mount.mount_flags);
        let existing = mounts::mounted_at(&staging).await?;
        let device = match &existing {
            None => self.attach(&volume, &placement, capability).await?,
            Some(mounted) => self.attacher.device(&volume).await.ok_or_else(|| {
                CsiError::AlreadyExists(format!(
                    "staging path {}: {} is mounted there, and volume {volume} is not attached",
                    staging.display(),
                    mounted.describe()
                ))
            })?,
        };
        let wanted = Wanted {
            source: Source::Filesystem {
                device: mounts::device_number(&device).await?,
                fs_type: fs_type.to_string(),
            },
            read_only: options.read_only(),
            options: options.visible.clone(),
        };
        match mount_decision::decide(existing.as_ref(), &wanted) {
            Decision::NotMounted => {
                mounts::format_and_mount(&device, fs_type, &staging, &options).await
            }
            Decision::AlreadyDone => Ok(()),
            Decision::Conflict(why) => Err(CsiError::AlreadyExists(format!(
                "staging path {}: {why}",
                staging.display()
            ))),
        }
    }

    async fn unstage(&self, request: NodeUnstageVolumeRequest) -> Result<(), CsiError> {
        let staging = required_path(&request.staging_target_path, "staging_target_path")?;
        if request.volume_id.is_empty() {
            return Err(CsiError::InvalidArgument(
                "volume_id must not be empty".into(),
            ));
        }
        let Ok(volume) = VolumeId::parse(&request.volume_id) else {
            return Err(CsiError::NotFound(format!(
                "volume {:?} does not exist",
                request.volume_id
            )));
        };
        let _guard = self.in_flight.begin(volume.as_str())?;
        mounts::unmount(&staging).await?;
        let local = {
            let (engine, id) = (self.engine.clone(), volume.clone());
            off_runtime("reading the volume record", move || {
                Ok(engine.record(&id).is_ok())
            })
            .await?
        };
        if local {
            let served = self
                .served
                .as_ref()
                .is_some_and(|g| g.serves_export(volume.as_str()));
            return self
                .attacher
                .detach_keeping(&self.engine, &volume, served)
                .await;
        }
        // Held by another node (or by none any more): the remote attachment, if any, ends.
        self.attacher.release(&volume).await?;
        self.remote.detach(&volume).await?;
        self.attacher.forget(&volume).await
    }

    /// Publishes: binds the staged volume (its staging mount, or its block device) onto the
    /// target, read-only when asked. A repeat succeeds; a target where anything else is mounted,
    /// or the volume with the other read-only flag, is refused with ALREADY_EXISTS (the spec's
    /// code for a volume published there incompatibly) and left as it is.
    async fn publish(&self, request: NodePublishVolumeRequest) -> Result<(), CsiError> {
        let target = required_path(&request.target_path, "target_path")?;
        let staging = required_path(&request.staging_target_path, "staging_target_path")?;
        let capability = request
            .volume_capability
            .as_ref()
            .ok_or_else(|| CsiError::InvalidArgument("volume_capability is required".into()))?;
        request::capability(capability)?;
        let (volume, _) = self.volume(&request.volume_id).await?;
        let _guard = self.in_flight.begin(volume.as_str())?;
        let staged = self.staged(&volume, capability, &staging).await?;
        let wanted = Wanted {
            source: staged.source,
            read_only: request.readonly,
            options: Default::default(),
        };
        match mount_decision::decide(mounts::mounted_at(&target).await?.as_ref(), &wanted) {
            Decision::NotMounted => {}
            Decision::AlreadyDone => return Ok(()),
            Decision::Conflict(why) => {
                return Err(CsiError::AlreadyExists(format!(
                    "target path {}: {why}",
                    target.display()
                )));
            }
        }
        let single_writer = capability
            .access_mode
            .as_ref()
            .is_some_and(|m| m.mode == Mode::SingleNodeSingleWriter as i32);
        if single_writer {
            for other in self.attacher.targets(&volume).await {
                if other != target && mounts::mounted_at(&other).await?.is_some() {
                    return Err(CsiError::FailedPrecondition(format!(
                        "volume {volume} has the single-writer access mode and is already published at {}",
                        other.display()
                    )));
                }
            }
        }
        if staged.block {
            mounts::create_file(&target).await?;
        } else {
            mounts::create_dir(&target).await?;
        }
        mounts::bind(&staged.path, &target, request.readonly).await?;
        self.attacher.add_target(&volume, &target).await
    }

    /// What publishing binds from: the volume's block device, or its filesystem mounted at the
    /// staging path. FAILED_PRECONDITION when the volume is not staged there.
    async fn staged(
        &self,
        volume: &VolumeId,
        capability: &VolumeCapability,
        staging: &Path,
    ) -> Result<Staged, CsiError> {
        let not_staged = || {
            CsiError::FailedPrecondition(format!(
                "volume {volume} is not staged at {}",
                staging.display()
            ))
        };
        let device = self.attacher.device(volume).await.ok_or_else(not_staged)?;
        let device_number = mounts::device_number(&device).await?;
        if let Some(AccessType::Block(_)) = &capability.access_type {
            return Ok(Staged {
                path: device,
                block: true,
                source: Source::DeviceNode {
                    device: device_number,
                },
            });
        }
        let mounted = mounts::mounted_at(staging).await?.ok_or_else(not_staged)?;
        if mounted.filesystem != device_number || mounted.root != "/" {
            return Err(CsiError::FailedPrecondition(format!(
                "volume {volume} is not staged at {}: {} is mounted there",
                staging.display(),
                mounted.describe()
            )));
        }
        Ok(Staged {
            path: staging.to_path_buf(),
            block: false,
            source: Source::BindOf {
                filesystem: mounted.filesystem,
                root: mounted.root,
            },
        })
    }

    async fn unpublish(&self, request: NodeUnpublishVolumeRequest) -> Result<(), CsiError> {
        let target = required_path(&request.target_path, "target_path")?;
        if request.volume_id.is_empty() {
            return Err(CsiError::InvalidArgument(
                "volume_id must not be empty".into(),
            ));
        }
        let _guard = self.in_flight.begin(&request.volume_id)?;
        mounts::unmount(&target).await?;
        if let Ok(volume) = VolumeId::parse(&request.volume_id) {
            self.attacher.remove_target(&volume, &target).await?;
        }
        mounts::remove_target(&target).await;
        Ok(())
    }

    async fn stats(
        &self,
        request: NodeGetVolumeStatsRequest,
    ) -> Result<NodeGetVolumeStatsResponse, CsiError> {
        let path = required_path(&request.volume_path, "volume_path")?;
        let (volume, placement) = self.volume(&request.volume_id).await?;
        let Ok(metadata) = tokio::fs::metadata(&path).await else {
            return Err(CsiError::NotFound(format!(
                "volume path {} does not exist",
                path.display()
            )));
        };
        let usage = if metadata.is_dir() {
            let stat = mounts::statvfs_off_runtime(&path).await?;
            vec![
                VolumeUsage {
                    available: (stat.f_bavail * stat.f_frsize) as i64,
                    total: (stat.f_blocks * stat.f_frsize) as i64,
                    used: ((stat.f_blocks - stat.f_bfree) * stat.f_frsize) as i64,
                    unit: Unit::Bytes as i32,
                },
                VolumeUsage {
                    available: stat.f_favail as i64,
                    total: stat.f_files as i64,
                    used: (stat.f_files - stat.f_ffree) as i64,
                    unit: Unit::Inodes as i32,
                },
            ]
        } else {
            let size = self.size(&volume, &placement).await?;
            vec![VolumeUsage {
                available: 0,
                total: size,
                used: 0,
                unit: Unit::Bytes as i32,
            }]
        };
        Ok(NodeGetVolumeStatsResponse { usage })
    }

    /// The volume's health on this node: its engine, its export and front end here, and the
    /// paths kubelet gave (NOT_FOUND for a volume that exists nowhere).
    async fn volume_health(
        &self,
        request: NodeGetVolumeHealthRequest,
    ) -> Result<NodeGetVolumeHealthResponse, CsiError> {
        let engine_live = super::engine_health::ready(self.engine.session());
        let (volume, placement) = self.volume(&request.volume_id).await?;
        let remote_owner = match &placement {
            Placement::Remote { owner, .. } => Some(owner.clone()),
            Placement::Local => None,
        };
        let exported = match &placement {
            Placement::Remote { .. } => self.remote.is_attached(&volume).await?,
            Placement::Local => {
                let (engine, id) = (self.engine.clone(), volume.clone());
                off_runtime("reading the volume record", move || {
                    Ok(engine.record(&id).is_ok_and(|r| {
                        r.exports.iter().any(|e| {
                            matches!(e.target, livedisk_engine::record::ExportTarget::Volume)
                        })
                    }))
                })
                .await?
            }
        };
        let mut missing_paths = Vec::new();
        for path in [&request.staging_target_path, &request.volume_publish_path] {
            if !path.is_empty() && !tokio::fs::try_exists(path).await.unwrap_or(false) {
                missing_paths.push(path.clone());
            }
        }
        let observed = health::VolumeObserved {
            engine_live,
            remote_owner,
            exported,
            front_end_recorded: self.attacher.recorded(&volume).await,
            device_present: self.attacher.device(&volume).await.is_some(),
            missing_paths,
        };
        Ok(NodeGetVolumeHealthResponse {
            volume_health: Some(VolumeHealth {
                volume_id: volume.to_string(),
                health_statuses: health::volume_health(&observed),
            }),
        })
    }

    async fn expand(
        &self,
        request: NodeExpandVolumeRequest,
    ) -> Result<NodeExpandVolumeResponse, CsiError> {
        let path = required_path(&request.volume_path, "volume_path")?;
        let (volume, placement) = self.volume(&request.volume_id).await?;
        let _guard = self.in_flight.begin(volume.as_str())?;
        let size = self.size(&volume, &placement).await?;
        if let Some(device) = self.attacher.device(&volume).await {
            if let Placement::Remote { owner, .. } = &placement {
                let attached = run("blockdev", &["--getsize64", &device.to_string_lossy()]).await?;
                if attached.trim().parse::<i64>().is_ok_and(|a| a < size) {
                    // The NBD connection carries the size it was opened with.
                    return Err(CsiError::FailedPrecondition(format!(
                        "volume {volume} grew on node {owner} after it was attached here; it has \
                         its new size on this node once it is staged here again"
                    )));
                }
            }
            // The loop device learns the new size of its backing file, then the filesystem grows.
            run("losetup", &["--set-capacity", &device.to_string_lossy()]).await?;
            let block = matches!(
                request
                    .volume_capability
                    .as_ref()
                    .and_then(|c| c.access_type.as_ref()),
                Some(AccessType::Block(_))
            );
            let is_dir = tokio::fs::metadata(&path).await.is_ok_and(|m| m.is_dir());
            if !block && is_dir {
                match mounts::filesystem(&device).await?.as_deref() {
                    Some("xfs") => {
                        run("xfs_growfs", &[&path.to_string_lossy()]).await?;
                    }
                    Some(_) => {
                        run("resize2fs", &[&device.to_string_lossy()]).await?;
                    }
                    None => {}
                }
            }
        }
        Ok(NodeExpandVolumeResponse {
            capacity_bytes: size,
        })
    }
}

fn required_path(path: &str, field: &str) -> Result<PathBuf, CsiError> {
    if path.is_empty() {
        return Err(CsiError::InvalidArgument(format!(
            "{field} must not be empty"
        )));
    }
    Ok(PathBuf::from(path))
}

/// Where publishing binds from, and what the target then shows.
struct Staged {
    path: PathBuf,
    block: bool,
    source: Source,
}

fn capability(kind: rpc::Type) -> NodeServiceCapability {
    NodeServiceCapability {
        r#type: Some(node_service_capability::Type::Rpc(
            node_service_capability::Rpc {
                r#type: kind as i32,
            },
        )),
    }
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_stage_volume(
        &self,
        request: Request<NodeStageVolumeRequest>,
    ) -> Reply<NodeStageVolumeResponse> {
        self.stage(request.into_inner()).await?;
        Ok(Response::new(NodeStageVolumeResponse {}))
    }

    async fn node_unstage_volume(
        &self,
        request: Request<NodeUnstageVolumeRequest>,
    ) -> Reply<NodeUnstageVolumeResponse> {
        self.unstage(request.into_inner()).await?;
        Ok(Response::new(NodeUnstageVolumeResponse {}))
    }

    async fn node_publish_volume(
        &self,
        request: Request<NodePublishVolumeRequest>,
    ) -> Reply<NodePublishVolumeResponse> {
        self.publish(request.into_inner()).await?;
        Ok(Response::new(NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<NodeUnpublishVolumeRequest>,
    ) -> Reply<NodeUnpublishVolumeResponse> {
        self.unpublish(request.into_inner()).await?;
        Ok(Response::new(NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        request: Request<NodeGetVolumeStatsRequest>,
    ) -> Reply<NodeGetVolumeStatsResponse> {
        Ok(Response::new(self.stats(request.into_inner()).await?))
    }

    async fn node_get_volume_health(
        &self,
        request: Request<NodeGetVolumeHealthRequest>,
    ) -> Reply<NodeGetVolumeHealthResponse> {
        Ok(Response::new(
            self.volume_health(request.into_inner()).await?,
        ))
    }

    async fn node_get_storage_health(
        &self,
        _: Request<NodeGetStorageHealthRequest>,
    ) -> Reply<NodeGetStorageHealthResponse> {
        let pool = self.engine.pool().to_path_buf();
        let available = mounts::statvfs_off_runtime(&pool)
            .await
            .ok()
            .map(|s| s.f_bavail * s.f_frsize);
        Ok(Response::new(NodeGetStorageHealthResponse {
            backend_health: health::storage_health(
                super::engine_health::ready(self.engine.session()),
                available,
            ),
        }))
    }

    async fn node_expand_volume(
        &self,
        request: Request<NodeExpandVolumeRequest>,
    ) -> Reply<NodeExpandVolumeResponse> {
        Ok(Response::new(self.expand(request.into_inner()).await?))
    }

    async fn node_get_capabilities(
        &self,
        _: Request<NodeGetCapabilitiesRequest>,
    ) -> Reply<NodeGetCapabilitiesResponse> {
        let capabilities = [
            rpc::Type::StageUnstageVolume,
            rpc::Type::GetVolumeStats,
            rpc::Type::ExpandVolume,
            rpc::Type::SingleNodeMultiWriter,
            rpc::Type::GetVolumeHealth,
            rpc::Type::GetStorageHealth,
        ]
        .into_iter()
        .map(capability)
        .collect();
        Ok(Response::new(NodeGetCapabilitiesResponse { capabilities }))
    }

    async fn node_get_info(&self, _: Request<NodeGetInfoRequest>) -> Reply<NodeGetInfoResponse> {
        Ok(Response::new(NodeGetInfoResponse {
            node_id: self.node_name.clone(),
            max_volumes_per_node: 0,
            accessible_topology: Some(topology::of_node(&self.node_name)),
        }))
    }
}
