//! The front-end server's one error type, and its one table to livedisk's error codes (and
//! through `grpc::error::grpc_code` to gRPC codes). The codes are chosen for the node plugin,
//! which passes them on to kubelet: a retry helps for UNAVAILABLE and DEADLINE_EXCEEDED, a
//! caller's fix is needed for INVALID_ARGUMENT and FAILED_PRECONDITION.

use std::time::Duration;

use livedisk_common::{IdError, error_chain};
use livedisk_engine::ErrorCode;
use thiserror::Error;
use tonic::Status;

use super::layout::UriError;
use crate::grpc::error::grpc_code;

#[derive(Debug, Error)]
pub enum FrontEndError {
    #[error(transparent)]
    InvalidVolume(#[from] IdError),
    #[error(transparent)]
    InvalidUri(#[from] UriError),
    #[error("the front end of {volume} serves {running}, not {requested}; stop it first")]
    OtherUri {
        volume: String,
        running: String,
        requested: String,
    },
    #[error("the FUSE file of {0} is still in use (a loop device over it?): detach that first")]
    InUse(String),
    #[error("starting nbdfuse (apt-get install libnbd-bin fuse3)")]
    Spawn(#[source] std::io::Error),
    #[error("nbdfuse for {volume} exited ({status}) before serving: {log}")]
    Exited {
        volume: String,
        status: String,
        log: String,
    },
    #[error("nbdfuse for {volume} did not serve within {waited:?}")]
    StartTimeout { volume: String, waited: Duration },
    #[error("nbdfuse {pid} of {volume} did not exit after its unmount and SIGTERM")]
    Stuck { volume: String, pid: i32 },
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl FrontEndError {
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |source| FrontEndError::Io { what, source }
    }

    /// The code of this error in livedisk's one vocabulary; exhaustive.
    pub fn code(&self) -> ErrorCode {
        match self {
            FrontEndError::InvalidVolume(_) | FrontEndError::InvalidUri(_) => {
                ErrorCode::InvalidArgument
            }
            // A state the caller must change first (stop the other front end, detach the loop
            // device), or a host without the tool: retrying as is does not help.
            FrontEndError::OtherUri { .. } | FrontEndError::InUse(_) | FrontEndError::Spawn(_) => {
                ErrorCode::FailedPrecondition
            }
            // nbdfuse could not reach the engine's export: the daemon may be restarting.
            FrontEndError::Exited { .. } => ErrorCode::Unavailable,
            FrontEndError::StartTimeout { .. } => ErrorCode::DeadlineExceeded,
            FrontEndError::Stuck { .. } | FrontEndError::Io { .. } => ErrorCode::Internal,
        }
    }
}

impl From<FrontEndError> for Status {
    fn from(error: FrontEndError) -> Self {
        Status::new(grpc_code(error.code()), error_chain(&error))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn every_error_answers_with_its_code() {
        let io = || std::io::Error::other("x");
        let table = [
            (
                FrontEndError::InvalidVolume(livedisk_engine::VolumeId::parse("../x").unwrap_err()),
                Code::InvalidArgument,
            ),
            (
                FrontEndError::InvalidUri(UriError::Malformed("x".into())),
                Code::InvalidArgument,
            ),
            (
                FrontEndError::OtherUri {
                    volume: "v".into(),
                    running: "a".into(),
                    requested: "b".into(),
                },
                Code::FailedPrecondition,
            ),
            (FrontEndError::InUse("v".into()), Code::FailedPrecondition),
            (FrontEndError::Spawn(io()), Code::FailedPrecondition),
            (
                FrontEndError::Exited {
                    volume: "v".into(),
                    status: "exit status: 1".into(),
                    log: "connection refused".into(),
                },
                Code::Unavailable,
            ),
            (
                FrontEndError::StartTimeout {
                    volume: "v".into(),
                    waited: Duration::from_secs(1),
                },
                Code::DeadlineExceeded,
            ),
            (
                FrontEndError::Stuck {
                    volume: "v".into(),
                    pid: 1,
                },
                Code::Internal,
            ),
            (FrontEndError::io("reading")(io()), Code::Internal),
        ];
        for (error, code) in table {
            let message = error.to_string();
            let status = Status::from(error);
            assert_eq!(status.code(), code, "{message}");
            assert!(
                status.message().starts_with(&message),
                "{}",
                status.message()
            );
        }
    }
}
