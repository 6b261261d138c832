//! The engine's one error type. Each variant says what went wrong in terms a
//! caller can act on, and maps to exactly one CSI status code.

use crate::qcow2::plan::PlanError;
use crate::qcow2::qemu_img::QemuImgError;
use crate::qcow2::record::RecordError;
use crate::qsd::daemon::DaemonError;
use crate::qsd::qmp::QmpError;
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

/// CSI / gRPC status codes the engine's errors map to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    InvalidArgument,
    NotFound,
    AlreadyExists,
    Aborted,
    OutOfRange,
    FailedPrecondition,
    Cancelled,
    Internal,
    Unavailable,
}

impl EngineError {
    pub fn code(&self) -> Code {
        use EngineError as E;
        match self {
            E::InvalidId(_) | E::InvalidArgument(_) => Code::InvalidArgument,
            E::NotFound(_) => Code::NotFound,
            E::AlreadyExists(_) => Code::AlreadyExists,
            E::Busy(_) => Code::Aborted,
            E::OutOfRange(_) => Code::OutOfRange,
            E::FailedPrecondition(_) => Code::FailedPrecondition,
            E::Cancelled(_) => Code::Cancelled,
            E::Plan(p) => match p {
                PlanError::SnapshotNotFound(_) => Code::NotFound,
                PlanError::NotOlder { .. } => Code::InvalidArgument,
                PlanError::SnapshotDeleting(_) | PlanError::NotCaptured(_) => {
                    Code::FailedPrecondition
                }
                PlanError::Inconsistent(_) => Code::Internal,
            },
            E::Qmp(QmpError::Disconnected | QmpError::Connect(_)) | E::Daemon(_) => {
                Code::Unavailable
            }
            E::JobFailed { .. }
            | E::Qmp(_)
            | E::Record(_)
            | E::QemuImg(_)
            | E::Io(_)
            | E::Nbd(_) => Code::Internal,
        }
    }
}
