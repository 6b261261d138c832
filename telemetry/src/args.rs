//! The telemetry flags of every server binary (the operator, `livedisk-csi controller` and
//! `livedisk-csi node`), defined once and flattened into each command line.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;

use crate::logging::LogFormat;

#[derive(Debug, Clone, Args)]
pub struct TelemetryArgs {
    /// Address (ip:port) of the HTTPS endpoint with /healthz, /readyz and /metrics. Unset: no
    /// endpoint (and no network listener) at all.
    #[arg(long, env = "LIVEDISK_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Directory with `tls.crt` and `tls.key` (PEM) for that endpoint. Unset: a self-signed
    /// certificate is made at start (kubelet's HTTPS probes do not verify it; a scraper that
    /// does needs this directory).
    #[arg(long, env = "LIVEDISK_METRICS_TLS_DIR", requires = "metrics_addr")]
    pub metrics_tls_dir: Option<PathBuf>,
    /// Log format: `text` for people, `json` (one object per line) for log pipelines.
    #[arg(long, env = "LIVEDISK_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}
