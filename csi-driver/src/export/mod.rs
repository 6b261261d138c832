//! The node's export front: read-only snapshot exports served to backup tools over
//! authenticated TLS, NBD (`nbd`) and HTTPS with `Range` (`http`), from the node that holds the
//! snapshot. Nothing here is open without TLS and a credential the operator issued for one
//! export (`grants`, `identity`); the engine daemon's own NBD server stays on its unix socket.
//! `work` turns this node's `LivediskExport` objects into engine exports and grants.

pub mod attachment;
pub mod grants;
pub mod http;
pub mod identity;
mod listener;
pub mod nbd;
pub mod work;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use futures::StreamExt;
use kube::runtime::watcher;
use kube::{Api, Client};
use livedisk_api::internal::{ExportFront, LivediskNode};
use livedisk_engine::Engine;

use grants::Grants;
use identity::{FrontKey, FrontTls};

#[derive(Debug, thiserror::Error)]
pub enum FrontError {
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("refused: {0}")]
    Refused(String),
    #[error("the front has no certificate yet (the operator signs this node's request)")]
    NotReady,
    #[error("the engine's NBD server: {0}")]
    Backend(String),
    #[error("certificate: {0}")]
    Certificate(String),
    #[error("making the front's key or request: {0}")]
    Key(#[from] rcgen::Error),
}

/// Where the front listens and what it tells clients.
#[derive(Clone, Debug)]
pub struct FrontConfig {
    /// Address the listeners bind.
    pub listen: IpAddr,
    /// Host clients dial (an IP address or DNS name naming this node), in endpoints and in the
    /// server certificate.
    pub host: String,
    pub nbd_port: u16,
    pub https_port: u16,
}

/// The running front.
pub struct Front {
    pub config: FrontConfig,
    pub grants: Arc<Grants>,
    pub tls: FrontTls,
    pub key: FrontKey,
    pub engine: Arc<Engine>,
    /// The engine daemon's NBD socket.
    pub backend_socket: PathBuf,
    /// The exports this node served before the plugin (re)started and has not served again yet,
    /// and since when: until they are back, a request no grant admits may be one of theirs.
    restoring: std::sync::Mutex<(std::time::Instant, std::collections::HashSet<String>)>,
}

/// How long a started front waits at most for its exports to come back before a request no
/// grant admits is refused for good (401/404) rather than told to retry (503).
const RESTORE_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);

impl Front {
    /// Binds both listeners and starts serving (connections are refused until the certificate
    /// arrives), and follows this node's LivediskNode for the certificate.
    pub async fn start(
        config: FrontConfig,
        engine: Arc<Engine>,
        client: Client,
        node_name: &str,
    ) -> anyhow::Result<Arc<Self>> {
        let key = FrontKey::generate(&config.host, node_name)?;
        let grants = Arc::new(Grants::default());
        let nbd_listener =
            tokio::net::TcpListener::bind(SocketAddr::new(config.listen, config.nbd_port)).await?;
        let https_listener =
            tokio::net::TcpListener::bind(SocketAddr::new(config.listen, config.https_port))
                .await?;
        let front = Arc::new(Self {
            restoring: std::sync::Mutex::new((std::time::Instant::now(), Default::default())),
            backend_socket: engine.daemon().runtime.nbd_socket(),
            tls: FrontTls::new(grants.clone()),
            grants,
            key,
            engine,
            config,
        });
        tracing::info!(
            host = %front.config.host,
            nbd = front.config.nbd_port,
            https = front.config.https_port,
            "export front listening (TLS only; waiting for its certificate)"
        );
        tokio::spawn(nbd::serve(nbd_listener, front.clone()));
        tokio::spawn(http::serve(https_listener, front.clone()));
        tokio::spawn(follow_certificate(
            front.clone(),
            client,
            node_name.to_string(),
        ));
        Ok(front)
    }

    /// The LivediskExports this node served when the plugin started (from one list before its
    /// reconciler runs): the front answers "retry" until each is served again or has ended.
    pub fn expect_restore(&self, works: impl IntoIterator<Item = String>) {
        let mut restoring = self.restoring.lock().unwrap_or_else(|p| p.into_inner());
        restoring.1.extend(works);
    }

    /// One export is served again (or ended): no longer waited for.
    pub fn restored(&self, work: &str) {
        let mut restoring = self.restoring.lock().unwrap_or_else(|p| p.into_inner());
        restoring.1.remove(work);
    }

    /// Whether exports of before the start are still coming back (within the window).
    pub fn is_restoring(&self) -> bool {
        let restoring = self.restoring.lock().unwrap_or_else(|p| p.into_inner());
        !restoring.1.is_empty() && restoring.0.elapsed() < RESTORE_WINDOW
    }

    /// What the node reports of its front in its LivediskNode.
    pub fn report(&self) -> ExportFront {
        ExportFront {
            host: Some(self.config.host.clone()),
            nbd_port: Some(i32::from(self.config.nbd_port)),
            https_port: Some(i32::from(self.config.https_port)),
            certificate_request: Some(self.key.request_pem.clone()),
            certificate: None,
            signed_request_sha256: None,
        }
    }

    /// The endpoint clients of an export named `export` dial.
    pub fn endpoint(&self, protocol: livedisk_api::ExportProtocol, export: &str) -> String {
        endpoint(&self.config, protocol, export)
    }
}

/// Pure: `nbds://host:port/NAME` or `https://host:port/exports/NAME` (IPv6 hosts bracketed).
pub fn endpoint(
    config: &FrontConfig,
    protocol: livedisk_api::ExportProtocol,
    export: &str,
) -> String {
    let host = match config.host.parse::<IpAddr>() {
        Ok(IpAddr::V6(v6)) => format!("[{v6}]"),
        _ => config.host.clone(),
    };
    match protocol {
        livedisk_api::ExportProtocol::Nbd => format!("nbds://{host}:{}/{export}", config.nbd_port),
        livedisk_api::ExportProtocol::Http => {
            format!("https://{host}:{}/exports/{export}", config.https_port)
        }
    }
}

/// Installs the certificate the operator issues for this front's request, and any re-issue.
async fn follow_certificate(front: Arc<Front>, client: Client, node_name: String) {
    let api: Api<LivediskNode> = Api::all(client);
    let config = watcher::Config::default().fields(&format!("metadata.name={node_name}"));
    let stream = watcher::watcher(api, config);
    futures::pin_mut!(stream);
    while let Some(event) = stream.next().await {
        let node = match event {
            Ok(watcher::Event::Apply(node) | watcher::Event::InitApply(node)) => node,
            Ok(_) => continue,
            Err(error) => {
                tracing::warn!(%error, "export front: watching this node's LivediskNode");
                continue;
            }
        };
        let Some(issued) = node.status.and_then(|s| s.export_front) else {
            continue;
        };
        if issued.signed_request_sha256.as_deref() != Some(front.key.request_sha256.as_str()) {
            continue;
        }
        let Some(chain) = issued.certificate else {
            continue;
        };
        match front.tls.install(&front.key, &chain) {
            Ok(true) => tracing::info!("export front: certificate installed, serving"),
            Ok(false) => {}
            Err(error) => {
                tracing::warn!(%error, "export front: the issued certificate is unusable")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use livedisk_api::ExportProtocol;

    #[test]
    fn endpoints_name_the_host_port_and_export() {
        let mut config = FrontConfig {
            listen: "0.0.0.0".parse().expect("ip"),
            host: "10.0.0.2".into(),
            nbd_port: 10809,
            https_port: 10810,
        };
        assert_eq!(
            endpoint(&config, ExportProtocol::Nbd, "snap-1"),
            "nbds://10.0.0.2:10809/snap-1"
        );
        assert_eq!(
            endpoint(&config, ExportProtocol::Http, "snap-1"),
            "https://10.0.0.2:10810/exports/snap-1"
        );
        config.host = "fd00::2".into();
        assert_eq!(
            endpoint(&config, ExportProtocol::Nbd, "s"),
            "nbds://[fd00::2]:10809/s"
        );
    }
}
