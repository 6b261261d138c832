//! The CSI SnapshotMetadata service.
//!
//! The node that holds a snapshot answers from its engine's durable extent records (never by
//! reading data), on a private gRPC endpoint with mutual TLS. The CSI controller serves the same
//! service to the external-snapshot-metadata sidecar and relays each stream from the owning
//! node, so 100 k extents never pass through a CR status.

use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use kube::Api;
use livedisk_api::internal::{LivediskNode, LivediskSnapshot};
use livedisk_csi_proto::csi::v1::snapshot_metadata_client::SnapshotMetadataClient;
use livedisk_csi_proto::csi::v1::snapshot_metadata_server::SnapshotMetadata;
use livedisk_csi_proto::csi::v1::{
    BlockMetadata, BlockMetadataType, GetMetadataAllocatedRequest, GetMetadataAllocatedResponse,
    GetMetadataDeltaRequest, GetMetadataDeltaResponse,
};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};
use tonic::{Request, Response, Status};

use crate::grpc::error::CsiError;
use livedisk_engine::{Engine, ExtentPage, SnapshotId};

/// Extents per message when the caller leaves `max_results` at 0.
const DEFAULT_PAGE: usize = 1024;
/// The default TLS name of the nodes' certificate; nodes are told apart by address, not name.
pub const NODE_TLS_NAME: &str = "livedisk-node";

type MetadataStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Mutual-TLS material in a directory: `ca.crt`, and `tls.crt` + `tls.key` for this side.
pub struct TlsDir {
    ca: Vec<u8>,
    cert: Vec<u8>,
    key: Vec<u8>,
}

impl TlsDir {
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let read = |name: &str| {
            std::fs::read(dir.join(name))
                .map_err(|e| anyhow::anyhow!("reading {}: {e}", dir.join(name).display()))
        };
        Ok(Self {
            ca: read("ca.crt")?,
            cert: read("tls.crt")?,
            key: read("tls.key")?,
        })
    }

    /// Server side: only clients with a certificate from the same CA get in.
    pub fn server(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert, &self.key))
            .client_ca_root(Certificate::from_pem(&self.ca))
    }

    /// Client side: trusts only that CA and expects `server_name` in the node's certificate.
    pub fn client(&self, server_name: &str) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca))
            .identity(Identity::from_pem(&self.cert, &self.key))
            .domain_name(server_name)
    }
}

fn checked_request(starting_offset: i64, max_results: i32) -> Result<(u64, usize), CsiError> {
    if starting_offset < 0 {
        return Err(CsiError::InvalidArgument(
            "starting_offset must not be negative".into(),
        ));
    }
    if max_results < 0 {
        return Err(CsiError::InvalidArgument(
            "max_results must not be negative".into(),
        ));
    }
    let page = if max_results == 0 {
        DEFAULT_PAGE
    } else {
        max_results as usize
    };
    Ok((starting_offset as u64, page))
}

/// A starting offset at or past the end of the volume asks for nothing that exists.
fn within_volume(start: u64, page: &ExtentPage) -> Result<(), CsiError> {
    if start >= page.volume_size {
        return Err(CsiError::OutOfRange(format!(
            "starting_offset {start} is not below the volume capacity {}",
            page.volume_size
        )));
    }
    Ok(())
}

fn snapshot_id(id: &str, field: &str) -> Result<SnapshotId, CsiError> {
    if id.is_empty() {
        return Err(CsiError::InvalidArgument(format!(
            "{field} must not be empty"
        )));
    }
    SnapshotId::parse(id).map_err(|_| CsiError::NotFound(format!("snapshot {id:?} does not exist")))
}

/// One page of extents as the wire's block metadata.
fn blocks(page: &ExtentPage) -> Vec<BlockMetadata> {
    page.extents
        .iter()
        .map(|e| BlockMetadata {
            byte_offset: e.offset as i64,
            size_bytes: e.length as i64,
        })
        .collect()
}

/// Paging state of one stream: the page to send next and how to fetch the one after it.
struct Pager<F> {
    next: Option<ExtentPage>,
    fetch: F,
    page_size: usize,
}

/// Streams pages until a short (or empty) page; each message carries the volume capacity, as
/// the spec requires. A failure while fetching a later page ends the stream with that error.
fn page_stream<T, F, M>(first: ExtentPage, page_size: usize, fetch: F, make: M) -> MetadataStream<T>
where
    T: Send + 'static,
    F: FnMut(u64) -> Result<ExtentPage, CsiError> + Send + 'static,
    M: Fn(i64, Vec<BlockMetadata>) -> T + Send + Sync + 'static,
{
    let make = Arc::new(make);
    let pager = Pager {
        next: Some(first),
        fetch,
        page_size,
    };
    let stream = futures::stream::try_unfold(pager, move |mut pager| {
        let make = make.clone();
        async move {
            let Some(page) = pager.next.take() else {
                return Ok(None);
            };
            let message = make(page.volume_size as i64, blocks(&page));
            if page.extents.len() >= pager.page_size
                && let Some(last) = page.extents.last()
            {
                let following = (pager.fetch)(last.offset + last.length).map_err(Status::from)?;
                pager.next = (!following.extents.is_empty()).then_some(following);
            }
            Ok(Some((message, pager)))
        }
    });
    Box::pin(stream)
}

/// The node side: answers from this node's engine.
pub struct NodeMetadata {
    pub engine: Arc<Engine>,
}

#[tonic::async_trait]
impl SnapshotMetadata for NodeMetadata {
    type GetMetadataAllocatedStream = MetadataStream<GetMetadataAllocatedResponse>;
    type GetMetadataDeltaStream = MetadataStream<GetMetadataDeltaResponse>;

    async fn get_metadata_allocated(
        &self,
        request: Request<GetMetadataAllocatedRequest>,
    ) -> Result<Response<Self::GetMetadataAllocatedStream>, Status> {
        let request = request.into_inner();
        let snapshot = snapshot_id(&request.snapshot_id, "snapshot_id")?;
        let (start, page) = checked_request(request.starting_offset, request.max_results)?;
        // The whole list once per stream; every page is cut from it.
        let list = self
            .engine
            .allocated_extents(&snapshot)
            .await
            .map_err(CsiError::from)?;
        let first = list.page(start, page);
        within_volume(start, &first)?;
        let next = move |offset| Ok(list.page(offset, page));
        Ok(Response::new(page_stream(
            first,
            page,
            next,
            |capacity, block_metadata| GetMetadataAllocatedResponse {
                block_metadata_type: BlockMetadataType::VariableLength as i32,
                volume_capacity_bytes: capacity,
                block_metadata,
            },
        )))
    }

    async fn get_metadata_delta(
        &self,
        request: Request<GetMetadataDeltaRequest>,
    ) -> Result<Response<Self::GetMetadataDeltaStream>, Status> {
        let request = request.into_inner();
        let base = snapshot_id(&request.base_snapshot_id, "base_snapshot_id")?;
        let target = snapshot_id(&request.target_snapshot_id, "target_snapshot_id")?;
        let (start, page) = checked_request(request.starting_offset, request.max_results)?;
        // The base may be a deleted snapshot: its tombstone answers while a later snapshot of
        // the volume exists (docs/architecture.md). The relay finds this node by the target.
        // The whole list once per stream; every page is cut from it.
        let list = self
            .engine
            .changed_extents(&base, &target)
            .await
            .map_err(CsiError::from)?;
        let first = list.page(start, page);
        within_volume(start, &first)?;
        let next = move |offset| Ok(list.page(offset, page));
        Ok(Response::new(page_stream(
            first,
            page,
            next,
            |capacity, block_metadata| GetMetadataDeltaResponse {
                block_metadata_type: BlockMetadataType::VariableLength as i32,
                volume_capacity_bytes: capacity,
                block_metadata,
            },
        )))
    }
}

/// The controller side: finds the node holding the snapshot and relays its stream.
pub struct RelayMetadata {
    pub client: kube::Client,
    pub tls: ClientTlsConfig,
}

impl RelayMetadata {
    async fn node_client(
        &self,
        snapshot: &str,
    ) -> Result<SnapshotMetadataClient<tonic::transport::Channel>, CsiError> {
        snapshot_id(snapshot, "snapshot_id")?;
        let snapshots: Api<LivediskSnapshot> = Api::all(self.client.clone());
        let snapshot = snapshots
            .get_opt(snapshot)
            .await?
            .ok_or_else(|| CsiError::NotFound(format!("snapshot {snapshot:?} does not exist")))?;
        let nodes: Api<LivediskNode> = Api::all(self.client.clone());
        let node = &snapshot.spec.node_name;
        let endpoint = nodes
            .get_opt(node)
            .await?
            .and_then(|n| n.status.and_then(|s| s.metadata_endpoint))
            .ok_or_else(|| {
                CsiError::FailedPrecondition(format!(
                    "node {node} does not report a changed-block endpoint"
                ))
            })?;
        let channel = Endpoint::from_shared(endpoint.clone())
            .map_err(|e| CsiError::Internal(format!("node {node} endpoint {endpoint:?}: {e}")))?
            .tls_config(self.tls.clone())
            .map_err(|e| CsiError::Internal(format!("TLS for node {node}: {e}")))?
            .connect()
            .await
            .map_err(|e| {
                CsiError::Internal(format!("connecting to node {node} at {endpoint}: {e}"))
            })?;
        Ok(SnapshotMetadataClient::new(channel))
    }
}

#[tonic::async_trait]
impl SnapshotMetadata for RelayMetadata {
    type GetMetadataAllocatedStream = MetadataStream<GetMetadataAllocatedResponse>;
    type GetMetadataDeltaStream = MetadataStream<GetMetadataDeltaResponse>;

    async fn get_metadata_allocated(
        &self,
        request: Request<GetMetadataAllocatedRequest>,
    ) -> Result<Response<Self::GetMetadataAllocatedStream>, Status> {
        let request = request.into_inner();
        checked_request(request.starting_offset, request.max_results)?;
        let mut node = self.node_client(&request.snapshot_id).await?;
        let stream = node.get_metadata_allocated(request).await?.into_inner();
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_metadata_delta(
        &self,
        request: Request<GetMetadataDeltaRequest>,
    ) -> Result<Response<Self::GetMetadataDeltaStream>, Status> {
        let request = request.into_inner();
        checked_request(request.starting_offset, request.max_results)?;
        snapshot_id(&request.base_snapshot_id, "base_snapshot_id")?;
        let mut node = self.node_client(&request.target_snapshot_id).await?;
        let stream = node.get_metadata_delta(request).await?.into_inner();
        Ok(Response::new(Box::pin(stream)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_checked() {
        assert!(matches!(
            checked_request(-1, 0),
            Err(CsiError::InvalidArgument(_))
        ));
        assert!(matches!(
            checked_request(0, -1),
            Err(CsiError::InvalidArgument(_))
        ));
        assert_eq!(checked_request(4096, 0).unwrap(), (4096, DEFAULT_PAGE));
        assert_eq!(checked_request(0, 7).unwrap(), (0, 7));
        assert!(matches!(
            snapshot_id("", "snapshot_id"),
            Err(CsiError::InvalidArgument(_))
        ));
        assert!(matches!(
            snapshot_id("../x", "snapshot_id"),
            Err(CsiError::NotFound(_))
        ));
    }
}
