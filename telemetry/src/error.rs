//! The telemetry layer's one error type.

use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum TelemetryError {
    #[error("reading {path}: {source}")]
    ReadTls {
        path: PathBuf,
        source: tokio_rustls::rustls::pki_types::pem::Error,
    },
    #[error("making a self-signed certificate: {0}")]
    SelfSigned(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Tls(#[from] tokio_rustls::rustls::Error),
    #[error("binding the telemetry endpoint on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("starting the telemetry thread: {0}")]
    Thread(std::io::Error),
    #[error("the Kubernetes client configuration: {0}")]
    KubeConfig(String),
    #[error("asking the API server to review a token: {0}")]
    Review(#[from] kube::Error),
}
