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
use super::mounts;
use crate::grpc::error::CsiError;
use crate::grpc::inflight::InFlight;
use crate::grpc::{request, topology};
use livedisk_engine::{Engine, VolumeId};

type Reply<T> = Result<Response<T>, Status>;

pub struct NodeService {
    engine: Arc<Engine>,
    attacher: Attacher,
    node_name: String,
    in_flight: InFlight,
}

impl NodeService {
    pub fn new(engine: Arc<Engine>, runtime_dir: &Path, node_name: String) -> Self {
        Self {
            engine,
            attacher: Attacher::new(runtime_dir),
            node_name,
            in_flight: InFlight::default(),
        }
    }

    /// The volume, or NOT_FOUND: an ID of the wrong shape names no volume.
    fn volume(&self, id: &str) -> Result<VolumeId, CsiError> {
        if id.is_empty() {
            return Err(CsiError::InvalidArgument(
                "volume_id must not be empty".into(),
            ));
        }
        let volume = VolumeId::parse(id)
            .map_err(|_| CsiError::NotFound(format!("volume {id:?} does not exist")))?;
        self.engine.volume(&volume).map_err(|_| {
            CsiError::NotFound(format!("volume {id} is not on node {}", self.node_name))
        })?;
        Ok(volume)
    }

    async fn stage(&self, request: NodeStageVolumeRequest) -> Result<(), CsiError> {
        let staging = required_path(&request.staging_target_path, "staging_target_path")?;
        let capability = request
            .volume_capability
            .as_ref()
            .ok_or_else(|| CsiError::InvalidArgument("volume_capability is required".into()))?;
        request::capability(capability)?;
        let volume = self.volume(&request.volume_id)?;
        let _guard = self.in_flight.begin(volume.as_str())?;
        let device = self.attacher.attach(&self.engine, &volume).await?;
        if let Some(AccessType::Mount(mount)) = &capability.access_type
            && !mounts::is_mounted(&staging)
        {
            std::fs::create_dir_all(&staging)
                .map_err(|e| CsiError::Internal(format!("creating {}: {e}", staging.display())))?;
            let fs_type = if mount.fs_type.is_empty() {
                "ext4"
            } else {
                mount.fs_type.as_str()
            };
            mounts::format_and_mount(&device, fs_type, &staging, &mount.mount_flags).await?;
        }
        Ok(())
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
        self.attacher.detach(&self.engine, &volume).await
    }

    async fn publish(&self, request: NodePublishVolumeRequest) -> Result<(), CsiError> {
        let target = required_path(&request.target_path, "target_path")?;
        let staging = required_path(&request.staging_target_path, "staging_target_path")?;
        let capability = request
            .volume_capability
            .as_ref()
            .ok_or_else(|| CsiError::InvalidArgument("volume_capability is required".into()))?;
        request::capability(capability)?;
        let volume = self.volume(&request.volume_id)?;
        let _guard = self.in_flight.begin(volume.as_str())?;
        if mounts::is_mounted(&target) {
            return Ok(());
        }
        let single_writer = capability
            .access_mode
            .as_ref()
            .is_some_and(|m| m.mode == Mode::SingleNodeSingleWriter as i32);
        if single_writer {
            let elsewhere: Vec<PathBuf> = self
                .attacher
                .targets(&volume)
                .into_iter()
                .filter(|t| *t != target && mounts::is_mounted(t))
                .collect();
            if !elsewhere.is_empty() {
                return Err(CsiError::FailedPrecondition(format!(
                    "volume {volume} has the single-writer access mode and is already published at {}",
                    elsewhere[0].display()
                )));
            }
        }
        self.publish_at(&volume, capability, &staging, &target, request.readonly)
            .await?;
        self.attacher.add_target(&volume, &target)
    }

    async fn publish_at(
        &self,
        volume: &VolumeId,
        capability: &VolumeCapability,
        staging: &Path,
        target: &Path,
        readonly: bool,
    ) -> Result<(), CsiError> {
        match &capability.access_type {
            Some(AccessType::Block(_)) => {
                let device = self.attacher.device(volume).await.ok_or_else(|| {
                    CsiError::FailedPrecondition(format!(
                        "volume {volume} is not staged on this node"
                    ))
                })?;
                if let Some(parent) = target.parent() {
                    std::fs::create_dir_all(parent).map_err(|e| {
                        CsiError::Internal(format!("creating {}: {e}", parent.display()))
                    })?;
                }
                if !target.exists() {
                    std::fs::write(target, b"").map_err(|e| {
                        CsiError::Internal(format!("creating {}: {e}", target.display()))
                    })?;
                }
                mounts::bind(&device, target, readonly).await
            }
            _ => {
                if !mounts::is_mounted(staging) {
                    return Err(CsiError::FailedPrecondition(format!(
                        "volume {volume} is not staged at {}",
                        staging.display()
                    )));
                }
                std::fs::create_dir_all(target).map_err(|e| {
                    CsiError::Internal(format!("creating {}: {e}", target.display()))
                })?;
                mounts::bind(staging, target, readonly).await
            }
        }
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
            self.attacher.remove_target(&volume, &target)?;
        }
        if target.is_dir() {
            let _ = std::fs::remove_dir(&target);
        } else if target.exists() {
            let _ = std::fs::remove_file(&target);
        }
        Ok(())
    }

    async fn stats(
        &self,
        request: NodeGetVolumeStatsRequest,
    ) -> Result<NodeGetVolumeStatsResponse, CsiError> {
        let path = required_path(&request.volume_path, "volume_path")?;
        let volume = self.volume(&request.volume_id)?;
        if !path.exists() {
            return Err(CsiError::NotFound(format!(
                "volume path {} does not exist",
                path.display()
            )));
        }
        let usage = if path.is_dir() {
            let stat = statvfs(&path)?;
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
            let size = self.engine.volume(&volume)?.size as i64;
            vec![VolumeUsage {
                available: 0,
                total: size,
                used: 0,
                unit: Unit::Bytes as i32,
            }]
        };
        Ok(NodeGetVolumeStatsResponse { usage })
    }

    async fn expand(
        &self,
        request: NodeExpandVolumeRequest,
    ) -> Result<NodeExpandVolumeResponse, CsiError> {
        let path = required_path(&request.volume_path, "volume_path")?;
        let volume = self.volume(&request.volume_id)?;
        let _guard = self.in_flight.begin(volume.as_str())?;
        let size = self.engine.volume(&volume)?.size as i64;
        if let Some(device) = self.attacher.device(&volume).await {
            // The loop device learns the new size of its backing file, then the filesystem grows.
            run("losetup", &["--set-capacity", &device.to_string_lossy()]).await?;
            let block = matches!(
                request
                    .volume_capability
                    .as_ref()
                    .and_then(|c| c.access_type.as_ref()),
                Some(AccessType::Block(_))
            );
            if !block && path.is_dir() {
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

pub fn statvfs(path: &Path) -> Result<libc::statvfs, CsiError> {
    let c_path = std::ffi::CString::new(path.to_string_lossy().as_bytes())
        .map_err(|_| CsiError::InvalidArgument("volume_path contains a NUL byte".into()))?;
    // SAFETY: statvfs fills the zeroed struct for a valid NUL-terminated path.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) } != 0 {
        return Err(CsiError::Internal(format!(
            "statvfs {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        )));
    }
    Ok(stat)
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
        _: Request<NodeGetVolumeHealthRequest>,
    ) -> Reply<NodeGetVolumeHealthResponse> {
        Err(CsiError::Unimplemented("volume health is not offered".into()).into())
    }

    async fn node_get_storage_health(
        &self,
        _: Request<NodeGetStorageHealthRequest>,
    ) -> Reply<NodeGetStorageHealthResponse> {
        Err(CsiError::Unimplemented("storage health is not offered".into()).into())
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
