//! The gRPC face of the [`Supervisor`], and the server that serves it on its unix socket.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use livedisk_csi_proto::frontends::front_ends_server::{FrontEnds, FrontEndsServer};
use livedisk_csi_proto::frontends::{
    self as proto, ListRequest, ListResponse, StartRequest, StartResponse, StopRequest,
    StopResponse,
};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Server;
use tonic::{Request, Response, Status};

use super::layout;
use super::supervisor::{FrontEnd, Supervisor};
use crate::grpc::server;

pub struct FrontEndService {
    supervisor: Arc<Supervisor>,
}

fn to_proto(front_end: FrontEnd) -> proto::FrontEnd {
    proto::FrontEnd {
        volume_id: front_end.volume.to_string(),
        nbd_uri: front_end.uri,
        file: front_end.file.display().to_string(),
        pid: front_end.pid,
        adopted: front_end.adopted,
    }
}

#[tonic::async_trait]
impl FrontEnds for FrontEndService {
    async fn start(
        &self,
        request: Request<StartRequest>,
    ) -> Result<Response<StartResponse>, Status> {
        let request = request.into_inner();
        let front_end = self
            .supervisor
            .start(&request.volume_id, &request.nbd_uri)
            .await
            .inspect_err(|error| {
                tracing::warn!(volume = %request.volume_id, error = %livedisk_common::error_chain(error), "start refused")
            })?;
        Ok(Response::new(StartResponse {
            front_end: Some(to_proto(front_end)),
        }))
    }

    async fn stop(&self, request: Request<StopRequest>) -> Result<Response<StopResponse>, Status> {
        let request = request.into_inner();
        self.supervisor
            .stop(&request.volume_id)
            .await
            .inspect_err(|error| {
                tracing::warn!(volume = %request.volume_id, error = %livedisk_common::error_chain(error), "stop refused")
            })?;
        Ok(Response::new(StopResponse {}))
    }

    async fn list(&self, _: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        let front_ends = self.supervisor.list().await?;
        Ok(Response::new(ListResponse {
            front_ends: front_ends.into_iter().map(to_proto).collect(),
        }))
    }
}

/// A running front-end server. Stopping it (or dropping the process) leaves the front ends
/// serving: the next server adopts them.
pub struct FrontEndServer {
    socket: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl FrontEndServer {
    /// Binds `<engine_dir>/frontends.sock` (0600, a stale socket replaced), logs the front ends
    /// found running, and serves.
    pub async fn start(engine_dir: &Path) -> Result<Self> {
        let supervisor = Arc::new(Supervisor::new(engine_dir));
        let running = supervisor
            .list()
            .await
            .context("looking for running front ends")?;
        for front_end in &running {
            tracing::info!(volume = %front_end.volume, pid = front_end.pid, uri = %front_end.uri, "front end adopted");
        }
        let socket = layout::socket(engine_dir);
        let listener = server::bind(&socket)?;
        tracing::info!(socket = %socket.display(), adopted = running.len(), "front-end server serving");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(
            Server::builder()
                .add_service(FrontEndsServer::new(FrontEndService { supervisor }))
                .serve_with_incoming_shutdown(server::incoming(listener), async {
                    let _ = stopped.await;
                }),
        );
        Ok(Self {
            socket,
            stop: Some(stop),
            task,
        })
    }

    /// Stops serving and removes the socket, so that a client sees at once that no server runs.
    pub async fn stop(mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let served = (&mut self.task)
            .await
            .context("the front-end server task")?;
        let _ = std::fs::remove_file(&self.socket);
        served.context("serving the front-end API")
    }
}
