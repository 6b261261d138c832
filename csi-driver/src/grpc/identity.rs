//! The CSI Identity service, served by both modes.

use std::collections::HashMap;

use livedisk_csi_proto::csi::v1::identity_server::Identity;
use livedisk_csi_proto::csi::v1::plugin_capability::{self, service};
use livedisk_csi_proto::csi::v1::{
    GetPluginCapabilitiesRequest, GetPluginCapabilitiesResponse, GetPluginInfoRequest,
    GetPluginInfoResponse, PluginCapability, ProbeRequest, ProbeResponse,
};
use tonic::{Request, Response, Status};

use crate::DRIVER_VERSION;
use livedisk_common::DRIVER_NAME;

/// Identity; `controller` says whether this process also serves the Controller service.
pub struct IdentityService {
    pub controller: bool,
    /// Whether this process also serves the SnapshotMetadata service.
    pub snapshot_metadata: bool,
}

fn service_capability(kind: service::Type) -> PluginCapability {
    PluginCapability {
        r#type: Some(plugin_capability::Type::Service(
            plugin_capability::Service {
                r#type: kind as i32,
            },
        )),
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _request: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        Ok(Response::new(GetPluginInfoResponse {
            name: DRIVER_NAME.to_string(),
            vendor_version: DRIVER_VERSION.to_string(),
            manifest: HashMap::new(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _request: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        let mut capabilities = vec![service_capability(
            service::Type::VolumeAccessibilityConstraints,
        )];
        if self.controller {
            capabilities.push(service_capability(service::Type::ControllerService));
        }
        if self.snapshot_metadata {
            capabilities.push(service_capability(service::Type::SnapshotMetadataService));
        }
        Ok(Response::new(GetPluginCapabilitiesResponse {
            capabilities,
        }))
    }

    async fn probe(
        &self,
        _request: Request<ProbeRequest>,
    ) -> Result<Response<ProbeResponse>, Status> {
        Ok(Response::new(ProbeResponse { ready: Some(true) }))
    }
}
