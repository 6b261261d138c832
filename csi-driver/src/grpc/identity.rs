//! The CSI Identity service, served by both modes.

use std::collections::HashMap;
use std::sync::Arc;

use livedisk_csi_proto::csi::v1::identity_server::Identity;
use livedisk_csi_proto::csi::v1::plugin_capability::{self, service};
use livedisk_csi_proto::csi::v1::{
    GetPluginCapabilitiesRequest, GetPluginCapabilitiesResponse, GetPluginInfoRequest,
    GetPluginInfoResponse, PluginCapability, ProbeRequest, ProbeResponse,
};
use tonic::{Request, Response, Status};

use crate::DRIVER_VERSION;
use livedisk_common::DRIVER_NAME;

/// Whether the services behind this socket can do their work now: what Probe answers (and with
/// it the liveness-probe sidecar, and so the chart's liveness probe).
pub trait Readiness: Send + Sync {
    fn ready(&self) -> bool;
}

/// Identity; `controller` says whether this process also serves the Controller service.
pub struct IdentityService {
    pub controller: bool,
    /// Whether this process also serves the SnapshotMetadata service.
    pub snapshot_metadata: bool,
    /// What Probe asks (the node plugin: its engine). `None`: ready whenever it answers (the
    /// controller keeps no state of its own to lose).
    pub readiness: Option<Arc<dyn Readiness>>,
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
            capabilities.push(service_capability(service::Type::GroupControllerService));
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
        let ready = self.readiness.as_ref().is_none_or(|r| r.ready());
        Ok(Response::new(ProbeResponse { ready: Some(ready) }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(bool);

    impl Readiness for Fixed {
        fn ready(&self) -> bool {
            self.0
        }
    }

    async fn probe(readiness: Option<Arc<dyn Readiness>>) -> Option<bool> {
        let service = IdentityService {
            controller: false,
            snapshot_metadata: false,
            readiness,
        };
        service
            .probe(Request::new(ProbeRequest {}))
            .await
            .map(|r| r.into_inner().ready)
            .unwrap_or_else(|status| panic!("probe failed: {status}"))
    }

    #[tokio::test]
    async fn probe_answers_what_the_readiness_says() {
        assert_eq!(probe(None).await, Some(true));
        assert_eq!(probe(Some(Arc::new(Fixed(true)))).await, Some(true));
        assert_eq!(probe(Some(Arc::new(Fixed(false)))).await, Some(false));
    }
}
