//! The engine's one error type. Each variant says what went wrong in terms a
//! caller can act on, and maps to exactly one code of livedisk's one vocabulary,
//! [`ErrorCode`] (the CSI side turns that into a gRPC status, a node into its CR's status).

use crate::qcow2::plan::PlanError;
use crate::qcow2::qemu_img::QemuImgError;
use crate::qcow2::record::RecordError;
use crate::qsd::daemon::DaemonError;
use crate::qsd::qmp::QmpError;
use livedisk_common::ErrorCode;
use livedisk_common::ids::IdError;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    InvalidId(#[from] IdError),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists with different parameters")]
    AlreadyExists(String),
    #[error("another operation is in progress on {0}")]
    Busy(String),
    #[error("{0}")]
    OutOfRange(String),
    #[error("{0}")]
    FailedPrecondition(String),
    /// The pool has no room for what was asked (see `pool_space`); nothing was made.
    #[error("{0}")]
    ResourceExhausted(String),
    /// Another node that must take part (the owner of a remotely attached volume) cannot be
    /// reached now.
    #[error("{0}")]
    Unreachable(String),
    #[error("merge job {0} was cancelled; the snapshot stays in state deleting, retry to finish")]
    Cancelled(String),
    #[error("merge job {job} failed: {error}")]
    JobFailed { job: String, error: String },
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Qmp(#[from] QmpError),
    #[error(transparent)]
    Record(#[from] RecordError),
    #[error(transparent)]
    QemuImg(#[from] QemuImgError),
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    #[error(transparent)]
    Nbd(#[from] crate::qsd::nbd_client::NbdError),
    #[error("pool I/O: {0}")]
    Io(#[from] std::io::Error),
}

impl EngineError {
    /// The code of this error; exhaustive, nested errors included.
    pub fn code(&self) -> ErrorCode {
        use EngineError as E;
        use ErrorCode as Code;
        match self {
            E::InvalidId(_) | E::InvalidArgument(_) => Code::InvalidArgument,
            E::NotFound(_) => Code::NotFound,
            E::AlreadyExists(_) => Code::AlreadyExists,
            E::Busy(_) => Code::Aborted,
            E::OutOfRange(_) => Code::OutOfRange,
            E::FailedPrecondition(_) => Code::FailedPrecondition,
            E::ResourceExhausted(_) => Code::ResourceExhausted,
            E::Unreachable(_) => Code::Unavailable,
            E::Cancelled(_) => Code::Cancelled,
            E::Plan(p) => match p {
                PlanError::SnapshotNotFound(_) => Code::NotFound,
                PlanError::NotOlder { .. } => Code::InvalidArgument,
                PlanError::SnapshotDeleting(_) | PlanError::NotCaptured(_) => {
                    Code::FailedPrecondition
                }
                PlanError::Inconsistent(_) => Code::Internal,
            },
            E::Qmp(qmp) => match qmp {
                QmpError::Disconnected | QmpError::Connect(_) => Code::Unavailable,
                QmpError::Timeout(..) => Code::DeadlineExceeded,
                QmpError::Protocol(_) | QmpError::Command { .. } => Code::Internal,
            },
            E::Daemon(_) => Code::Unavailable,
            E::JobFailed { .. } | E::Record(_) | E::QemuImg(_) | E::Io(_) | E::Nbd(_) => {
                Code::Internal
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{SnapshotId, VolumeId};
    use std::time::Duration;

    fn snapshot() -> SnapshotId {
        SnapshotId::parse("snap-00000000-0000-4000-8000-000000000000").expect("snapshot id")
    }

    fn io() -> std::io::Error {
        std::io::Error::other("disk")
    }

    #[test]
    fn every_engine_error_has_its_code() {
        use ErrorCode as C;
        let id_error = VolumeId::parse("../x").expect_err("not an ID");
        let table: Vec<(EngineError, ErrorCode)> = vec![
            (EngineError::InvalidId(id_error), C::InvalidArgument),
            (EngineError::InvalidArgument("x".into()), C::InvalidArgument),
            (EngineError::NotFound("x".into()), C::NotFound),
            (EngineError::AlreadyExists("x".into()), C::AlreadyExists),
            (EngineError::Busy("x".into()), C::Aborted),
            (EngineError::OutOfRange("x".into()), C::OutOfRange),
            (
                EngineError::FailedPrecondition("x".into()),
                C::FailedPrecondition,
            ),
            (
                EngineError::ResourceExhausted("x".into()),
                C::ResourceExhausted,
            ),
            (EngineError::Cancelled("job".into()), C::Cancelled),
            (EngineError::Unreachable("x".into()), C::Unavailable),
            (
                EngineError::JobFailed {
                    job: "job".into(),
                    error: "boom".into(),
                },
                C::Internal,
            ),
            (PlanError::SnapshotNotFound(snapshot()).into(), C::NotFound),
            (
                PlanError::SnapshotDeleting(snapshot()).into(),
                C::FailedPrecondition,
            ),
            (
                PlanError::NotOlder {
                    base: snapshot(),
                    target: snapshot(),
                }
                .into(),
                C::InvalidArgument,
            ),
            (
                PlanError::NotCaptured(snapshot()).into(),
                C::FailedPrecondition,
            ),
            (PlanError::Inconsistent("x".into()).into(), C::Internal),
            (QmpError::Disconnected.into(), C::Unavailable),
            (QmpError::Connect("refused".into()).into(), C::Unavailable),
            (
                QmpError::Timeout(Duration::from_secs(1), "x".into()).into(),
                C::DeadlineExceeded,
            ),
            (QmpError::Protocol("x".into()).into(), C::Internal),
            (
                QmpError::Command {
                    command: "c".into(),
                    class: "GenericError".into(),
                    desc: "d".into(),
                }
                .into(),
                C::Internal,
            ),
            (RecordError::Io("r".into(), io()).into(), C::Internal),
            (
                QemuImgError::Failed {
                    args: "map".into(),
                    stderr: "x".into(),
                }
                .into(),
                C::Internal,
            ),
            (DaemonError::StartFailed("x".into()).into(), C::Unavailable),
            (
                crate::qsd::nbd_client::NbdError::Protocol("x".into()).into(),
                C::Internal,
            ),
            (EngineError::Io(io()), C::Internal),
        ];
        for (error, code) in table {
            assert_eq!(error.code(), code, "{error}");
        }
    }
}
