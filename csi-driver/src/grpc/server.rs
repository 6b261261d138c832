//! Serving gRPC on a unix socket: stale socket removed, the new one 0600 before it listens,
//! graceful shutdown on SIGTERM/SIGINT.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

/// The socket path of a CSI endpoint (`unix:///csi/csi.sock`, `unix:/csi/csi.sock` or a path).
pub fn socket_path(endpoint: &str) -> Result<PathBuf> {
    let path = endpoint
        .strip_prefix("unix://")
        .or_else(|| endpoint.strip_prefix("unix:"))
        .unwrap_or(endpoint);
    if path.is_empty() || !path.starts_with('/') {
        bail!(
            "CSI endpoint {endpoint:?} must be an absolute unix socket path (unix:///path/csi.sock)"
        );
    }
    Ok(PathBuf::from(path))
}

/// Binds the socket owner-only. The umask is process-wide, so it is set only for the bind: the
/// socket never exists with wider permissions, not even for an instant.
pub fn bind(path: &Path) -> Result<UnixListener> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?,
        Ok(_) => bail!(
            "{} exists and is not a socket; refusing to replace it",
            path.display()
        ),
        Err(_) => {}
    }
    // SAFETY: umask only swaps the process file-creation mask; it cannot fail.
    let previous = unsafe { libc::umask(0o177) };
    let listener = UnixListener::bind(path);
    // SAFETY: restores the mask saved above.
    unsafe { libc::umask(previous) };
    let listener = listener.with_context(|| format!("binding {}", path.display()))?;
    let mode = std::fs::metadata(path)?.permissions().mode() & 0o777;
    if mode != 0o600 {
        bail!("socket {} has mode {mode:o}, expected 600", path.display());
    }
    Ok(listener)
}

/// A stream of connections for tonic's `serve_with_incoming_shutdown`, as they come: for sockets
/// only the driver's own clients use. The CSI and registration sockets serve
/// `authority::incoming` (other gRPC implementations send a path as `:authority`).
pub fn incoming(listener: UnixListener) -> UnixListenerStream {
    UnixListenerStream::new(listener)
}

/// Resolves when the process is asked to stop (SIGTERM or SIGINT).
pub async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = terminate => {},
    }
    tracing::info!("shutdown requested; finishing in-flight calls");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_to_absolute_paths() {
        assert_eq!(
            socket_path("unix:///csi/csi.sock").unwrap(),
            PathBuf::from("/csi/csi.sock")
        );
        assert_eq!(
            socket_path("unix:/csi/csi.sock").unwrap(),
            PathBuf::from("/csi/csi.sock")
        );
        assert!(socket_path("tcp://1.2.3.4:5").is_err());
        assert!(socket_path("unix://relative").is_err());
    }

    #[tokio::test]
    async fn socket_is_owner_only_and_stale_one_replaced() {
        let dir = std::env::temp_dir().join(format!("livedisk-sock-{}", std::process::id()));
        let path = dir.join("csi.sock");
        drop(bind(&path).unwrap());
        let listener = bind(&path).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        drop(listener);
        std::fs::write(dir.join("file"), b"x").unwrap();
        assert!(bind(&dir.join("file")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
