//! The node plugin's side: asks the engine pod's front-end server for a volume's FUSE front
//! end. A connection per call: attach and detach are rare, and a fresh connection finds a
//! restarted server without any reconnect logic.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use livedisk_csi_proto::frontends::front_ends_client::FrontEndsClient as Grpc;
use livedisk_csi_proto::frontends::{self as proto, ListRequest, StartRequest, StopRequest};
use livedisk_engine::VolumeId;
use tonic::transport::{Channel, Endpoint, Uri};

use super::layout;
use crate::grpc::error::{CsiError, error_code_of};

pub struct FrontEndsClient {
    socket: PathBuf,
}

impl FrontEndsClient {
    pub fn new(engine_dir: &Path) -> Self {
        Self {
            socket: layout::socket(engine_dir),
        }
    }

    fn not_running(&self, why: impl std::fmt::Display) -> CsiError {
        CsiError::Unavailable(format!(
            "the engine pod's front-end server is not running at {} ({why})",
            self.socket.display()
        ))
    }

    async fn connect(&self) -> Result<Grpc<Channel>, CsiError> {
        if !tokio::fs::try_exists(&self.socket).await.unwrap_or(false) {
            return Err(self.not_running("no socket"));
        }
        let socket = self.socket.clone();
        // The URI is required by tonic and never used: the connector dials the socket.
        let channel = Endpoint::from_static("http://localhost")
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let socket = socket.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(
                        tokio::net::UnixStream::connect(socket).await?,
                    ))
                }
            }))
            .await
            .map_err(|error| self.not_running(livedisk_common::error_chain(&error)))?;
        Ok(Grpc::new(channel))
    }

    /// Starts (or finds) the volume's front end and returns its FUSE file.
    pub async fn start(&self, volume: &VolumeId, nbd_uri: &str) -> Result<PathBuf, CsiError> {
        let answer = self
            .connect()
            .await?
            .start(StartRequest {
                volume_id: volume.to_string(),
                nbd_uri: nbd_uri.to_string(),
            })
            .await
            .map_err(from_status)?
            .into_inner();
        let front_end = answer.front_end.ok_or_else(|| {
            CsiError::Internal("the front-end server answered Start without a front end".into())
        })?;
        Ok(PathBuf::from(front_end.file))
    }

    /// Stops the volume's front end (OK when none runs).
    pub async fn stop(&self, volume: &VolumeId) -> Result<(), CsiError> {
        self.connect()
            .await?
            .stop(StopRequest {
                volume_id: volume.to_string(),
            })
            .await
            .map_err(from_status)?;
        Ok(())
    }

    pub async fn list(&self) -> Result<Vec<proto::FrontEnd>, CsiError> {
        Ok(self
            .connect()
            .await?
            .list(ListRequest {})
            .await
            .map_err(from_status)?
            .into_inner()
            .front_ends)
    }
}

/// The server's answer keeps its code on the way to kubelet.
fn from_status(status: tonic::Status) -> CsiError {
    CsiError::FrontEnds {
        code: error_code_of(status.code()),
        message: status.message().to_string(),
    }
}
