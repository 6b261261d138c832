//! Blocking file-system work (mount syscalls, mountinfo, statvfs, small state files) runs on
//! tokio's blocking pool, so a slow disk or a hung FUSE mount stalls one request, not the
//! runtime that serves every gRPC call.

use crate::grpc::error::CsiError;

/// Runs `work` on the blocking pool and returns its result.
pub async fn off_runtime<T, F>(what: &'static str, work: F) -> Result<T, CsiError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, CsiError> + Send + 'static,
{
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|error| CsiError::Internal(format!("{what}: the blocking task failed: {error}")))?
}

/// Maps an I/O error to an internal CSI error that says what was being done.
pub fn io<E: std::fmt::Display>(what: impl Into<String>) -> impl FnOnce(E) -> CsiError {
    let what = what.into();
    move |error| CsiError::Internal(format!("{what}: {error}"))
}
