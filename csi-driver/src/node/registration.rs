//! kubelet plugin registration, served by the node plugin itself (the job of the
//! node-driver-registrar sidecar): kubelet's plugin watcher finds `<driver>-reg.sock` in its
//! `plugins_registry` directory, asks GetInfo for the driver name and the CSI socket, registers
//! the driver (calling NodeGetInfo on that socket) and reports the outcome through
//! NotifyRegistrationStatus.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use livedisk_common::DRIVER_NAME;
use livedisk_csi_proto::pluginregistration::registration_server::{
    Registration, RegistrationServer,
};
use livedisk_csi_proto::pluginregistration::{
    InfoRequest, PluginInfo, RegistrationStatus, RegistrationStatusResponse,
};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Server;
use tonic::{Request, Response, Status};

use crate::grpc::{authority, server};

/// The plugin type kubelet's CSI handler claims.
const CSI_PLUGIN_TYPE: &str = "CSIPlugin";
/// The registration API versions kubelet's CSI handler accepts (it picks the highest it knows).
const SUPPORTED_VERSIONS: [&str; 1] = ["1.0.0"];

/// The registration socket of this driver in kubelet's registry directory.
pub fn socket_path(registration_dir: &Path) -> PathBuf {
    registration_dir.join(format!("{DRIVER_NAME}-reg.sock"))
}

/// What GetInfo answers: this driver, reachable at `kubelet_csi_endpoint` (the CSI socket's path
/// in kubelet's mount namespace, which differs from ours inside a container).
pub fn plugin_info(kubelet_csi_endpoint: &Path) -> PluginInfo {
    PluginInfo {
        r#type: CSI_PLUGIN_TYPE.to_string(),
        name: DRIVER_NAME.to_string(),
        endpoint: kubelet_csi_endpoint.display().to_string(),
        supported_versions: SUPPORTED_VERSIONS.iter().map(|v| v.to_string()).collect(),
    }
}

/// Whether kubelet's last word on the registration was "registered". Cheap to clone and read.
#[derive(Clone, Debug, Default)]
pub struct Registered(Arc<AtomicBool>);

impl Registered {
    /// True once kubelet reported a successful registration, until it reports a failure.
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    fn set(&self, registered: bool) {
        self.0.store(registered, Ordering::Relaxed);
    }
}

/// The `Registration` service.
pub struct RegistrationService {
    info: PluginInfo,
    registered: Registered,
}

#[tonic::async_trait]
impl Registration for RegistrationService {
    async fn get_info(&self, _: Request<InfoRequest>) -> Result<Response<PluginInfo>, Status> {
        tracing::debug!(endpoint = %self.info.endpoint, "kubelet asked for the plugin info");
        Ok(Response::new(self.info.clone()))
    }

    async fn notify_registration_status(
        &self,
        request: Request<RegistrationStatus>,
    ) -> Result<Response<RegistrationStatusResponse>, Status> {
        let status = request.into_inner();
        if status.plugin_registered {
            tracing::info!(driver = DRIVER_NAME, "kubelet registered the node plugin");
        } else {
            tracing::warn!(
                driver = DRIVER_NAME,
                reason = %status.error,
                "kubelet refused to register the node plugin"
            );
        }
        self.registered.set(status.plugin_registered);
        Ok(Response::new(RegistrationStatusResponse {}))
    }
}

/// The registration server running on its socket. [`stop`](Self::stop) ends it and removes the
/// socket (so kubelet deregisters the driver); dropping it does the same without waiting.
pub struct RegistrationHandle {
    socket: PathBuf,
    registered: Registered,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
}

impl RegistrationHandle {
    /// Binds `<registration_dir>/<driver>-reg.sock` (0600, replacing a stale socket) and serves
    /// `Registration` on it.
    pub fn start(registration_dir: &Path, kubelet_csi_endpoint: &Path) -> Result<Self> {
        let socket = socket_path(registration_dir);
        let listener = server::bind(&socket)?;
        let registered = Registered::default();
        let service = RegistrationService {
            info: plugin_info(kubelet_csi_endpoint),
            registered: registered.clone(),
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(
            Server::builder()
                .add_service(RegistrationServer::new(service))
                // kubelet's calls need their `:authority` repaired before h2 sees them.
                .serve_with_incoming_shutdown(authority::incoming(listener), async {
                    let _ = stopped.await;
                }),
        );
        tracing::info!(
            socket = %socket.display(),
            csi_endpoint = %kubelet_csi_endpoint.display(),
            "kubelet plugin registration serving"
        );
        Ok(Self {
            socket,
            registered,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// The registration socket's path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Whether kubelet has registered the driver (see [`Registered`]).
    pub fn registered(&self) -> Registered {
        self.registered.clone()
    }

    /// Stops serving (letting a call in progress finish) and removes the socket.
    pub async fn stop(mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let served = match self.task.take() {
            Some(task) => task.await.context("the registration server task")?,
            None => Ok(()),
        };
        remove_socket(&self.socket)?;
        served.context("serving kubelet plugin registration")
    }
}

impl Drop for RegistrationHandle {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            // Best effort on an early exit: a socket left behind is replaced at the next start.
            let _ = remove_socket(&self.socket);
        }
    }
}

fn remove_socket(socket: &Path) -> Result<()> {
    match std::fs::remove_file(socket) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", socket.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugin_info_names_the_driver_and_kubelet_endpoint() {
        let info = plugin_info(Path::new(
            "/var/lib/kubelet/plugins/csi.livedisk.io/csi.sock",
        ));
        assert_eq!(info.r#type, "CSIPlugin");
        assert_eq!(info.name, "csi.livedisk.io");
        assert_eq!(
            info.endpoint,
            "/var/lib/kubelet/plugins/csi.livedisk.io/csi.sock"
        );
        assert_eq!(info.supported_versions, vec!["1.0.0".to_string()]);
    }

    #[test]
    fn socket_is_named_after_the_driver() {
        assert_eq!(
            socket_path(Path::new("/var/lib/kubelet/plugins_registry")),
            PathBuf::from("/var/lib/kubelet/plugins_registry/csi.livedisk.io-reg.sock")
        );
    }
}
