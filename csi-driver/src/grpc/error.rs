//! One error type for the CSI services. Its code is livedisk's one [`ErrorCode`] (engine errors,
//! node errors and Kubernetes errors each classified where their type lives), turned into a gRPC
//! code by the one table [`grpc_code`]. The message carries the whole error chain.

use livedisk_api::internal::{ErrorCode, NodeError};
use livedisk_api::{kube_error_code, kube_error_message};
use livedisk_common::error_chain;
use thiserror::Error;
use tonic::{Code, Status};

use livedisk_engine::EngineError;

#[derive(Debug, Error)]
pub enum CsiError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("an operation on {0} is already in progress; retry later")]
    Aborted(String),
    #[error("{0}")]
    OutOfRange(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    Unimplemented(String),
    #[error("{0}")]
    Unavailable(String),
    /// An answer of the engine pod's front-end server, with the code it chose.
    #[error("front-end server: {message}")]
    FrontEnds { code: ErrorCode, message: String },
    #[error("timed out waiting for {0}; the operation continues and a retry picks it up")]
    Timeout(String),
    #[error("node reported: {}", .0.message)]
    Node(NodeError),
    /// Kept as a value, not a `#[source]`: its readable message is already in this one's.
    #[error("Kubernetes API: {}", kube_error_message(.0))]
    Kube(kube::Error),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("{0}")]
    Internal(String),
}

impl CsiError {
    /// The code of this error in livedisk's one vocabulary; exhaustive.
    pub fn error_code(&self) -> ErrorCode {
        match self {
            CsiError::InvalidArgument(_) => ErrorCode::InvalidArgument,
            CsiError::NotFound(_) => ErrorCode::NotFound,
            CsiError::AlreadyExists(_) => ErrorCode::AlreadyExists,
            CsiError::Aborted(_) => ErrorCode::Aborted,
            CsiError::OutOfRange(_) => ErrorCode::OutOfRange,
            CsiError::FailedPrecondition(_) => ErrorCode::FailedPrecondition,
            CsiError::ResourceExhausted(_) => ErrorCode::ResourceExhausted,
            CsiError::Unimplemented(_) => ErrorCode::Unimplemented,
            CsiError::Unavailable(_) => ErrorCode::Unavailable,
            CsiError::FrontEnds { code, .. } => *code,
            CsiError::Timeout(_) => ErrorCode::DeadlineExceeded,
            CsiError::Node(error) => error.code,
            CsiError::Kube(error) => kube_error_code(error),
            CsiError::Engine(error) => error.code(),
            CsiError::Internal(_) => ErrorCode::Internal,
        }
    }

    /// The gRPC code a CSI call answers this error with.
    pub fn code(&self) -> Code {
        grpc_code(self.error_code())
    }
}

/// The one table from livedisk's error codes to gRPC codes. The vocabulary is named after gRPC,
/// so this is one-to-one: a CSI sidecar decides from the code whether to retry, and a permanent
/// failure (a 403 or 422 from the API server included) must not reach it as UNAVAILABLE.
pub fn grpc_code(code: ErrorCode) -> Code {
    match code {
        ErrorCode::InvalidArgument => Code::InvalidArgument,
        ErrorCode::NotFound => Code::NotFound,
        ErrorCode::AlreadyExists => Code::AlreadyExists,
        ErrorCode::Aborted => Code::Aborted,
        ErrorCode::OutOfRange => Code::OutOfRange,
        ErrorCode::FailedPrecondition => Code::FailedPrecondition,
        ErrorCode::ResourceExhausted => Code::ResourceExhausted,
        ErrorCode::Unavailable => Code::Unavailable,
        ErrorCode::Internal => Code::Internal,
        ErrorCode::Cancelled => Code::Cancelled,
        ErrorCode::PermissionDenied => Code::PermissionDenied,
        ErrorCode::Unauthenticated => Code::Unauthenticated,
        ErrorCode::DeadlineExceeded => Code::DeadlineExceeded,
        ErrorCode::Unimplemented => Code::Unimplemented,
    }
}

/// The inverse of [`grpc_code`], for answers of livedisk's own gRPC services (the front-end
/// server). The codes outside livedisk's vocabulary (OK, UNKNOWN, DATA_LOSS) never come from
/// them; met anyway, they count as internal errors.
pub fn error_code_of(code: Code) -> ErrorCode {
    match code {
        Code::InvalidArgument => ErrorCode::InvalidArgument,
        Code::NotFound => ErrorCode::NotFound,
        Code::AlreadyExists => ErrorCode::AlreadyExists,
        Code::Aborted => ErrorCode::Aborted,
        Code::OutOfRange => ErrorCode::OutOfRange,
        Code::FailedPrecondition => ErrorCode::FailedPrecondition,
        Code::ResourceExhausted => ErrorCode::ResourceExhausted,
        Code::Unavailable => ErrorCode::Unavailable,
        Code::Internal => ErrorCode::Internal,
        Code::Cancelled => ErrorCode::Cancelled,
        Code::PermissionDenied => ErrorCode::PermissionDenied,
        Code::Unauthenticated => ErrorCode::Unauthenticated,
        Code::DeadlineExceeded => ErrorCode::DeadlineExceeded,
        Code::Unimplemented => ErrorCode::Unimplemented,
        Code::Ok | Code::Unknown | Code::DataLoss => ErrorCode::Internal,
    }
}

/// The engine's error as the typed error a node writes into a CR status.
pub fn node_error(error: &EngineError) -> NodeError {
    NodeError {
        code: error.code(),
        message: error_chain(error),
    }
}

impl From<kube::Error> for CsiError {
    fn from(error: kube::Error) -> Self {
        CsiError::Kube(error)
    }
}

impl From<CsiError> for Status {
    fn from(error: CsiError) -> Self {
        Status::new(error.code(), error_chain(&error))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_errors_keep_their_code() {
        let error = CsiError::Node(NodeError {
            code: ErrorCode::ResourceExhausted,
            message: "pool full".into(),
        });
        let status = Status::from(error);
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert!(status.message().contains("pool full"));
    }

    #[test]
    fn timeouts_are_deadline_exceeded() {
        assert_eq!(CsiError::Timeout("x".into()).code(), Code::DeadlineExceeded);
    }

    #[test]
    fn every_error_code_has_its_grpc_code() {
        let table = [
            (ErrorCode::InvalidArgument, Code::InvalidArgument),
            (ErrorCode::NotFound, Code::NotFound),
            (ErrorCode::AlreadyExists, Code::AlreadyExists),
            (ErrorCode::Aborted, Code::Aborted),
            (ErrorCode::OutOfRange, Code::OutOfRange),
            (ErrorCode::FailedPrecondition, Code::FailedPrecondition),
            (ErrorCode::ResourceExhausted, Code::ResourceExhausted),
            (ErrorCode::Unavailable, Code::Unavailable),
            (ErrorCode::Internal, Code::Internal),
            (ErrorCode::Cancelled, Code::Cancelled),
            (ErrorCode::PermissionDenied, Code::PermissionDenied),
            (ErrorCode::Unauthenticated, Code::Unauthenticated),
            (ErrorCode::DeadlineExceeded, Code::DeadlineExceeded),
            (ErrorCode::Unimplemented, Code::Unimplemented),
        ];
        assert_eq!(table.len(), ErrorCode::ALL.len());
        for (code, grpc) in table {
            assert_eq!(grpc_code(code), grpc, "{code}");
            assert_eq!(error_code_of(grpc), code, "{code}");
            // A node's typed error answers with the same code.
            let node = CsiError::Node(NodeError {
                code,
                message: "m".into(),
            });
            assert_eq!(node.code(), grpc, "{code}");
        }
    }

    #[test]
    fn every_csi_error_has_its_code() {
        let table = [
            (CsiError::InvalidArgument("x".into()), Code::InvalidArgument),
            (CsiError::NotFound("x".into()), Code::NotFound),
            (CsiError::AlreadyExists("x".into()), Code::AlreadyExists),
            (CsiError::Aborted("x".into()), Code::Aborted),
            (CsiError::OutOfRange("x".into()), Code::OutOfRange),
            (
                CsiError::FailedPrecondition("x".into()),
                Code::FailedPrecondition,
            ),
            (
                CsiError::ResourceExhausted("x".into()),
                Code::ResourceExhausted,
            ),
            (CsiError::Unimplemented("x".into()), Code::Unimplemented),
            (CsiError::Unavailable("x".into()), Code::Unavailable),
            (
                CsiError::FrontEnds {
                    code: ErrorCode::FailedPrecondition,
                    message: "in use".into(),
                },
                Code::FailedPrecondition,
            ),
            (CsiError::Timeout("x".into()), Code::DeadlineExceeded),
            (CsiError::Internal("x".into()), Code::Internal),
            (
                CsiError::Engine(EngineError::Busy("vol".into())),
                Code::Aborted,
            ),
            (
                CsiError::Engine(EngineError::Cancelled("job".into())),
                Code::Cancelled,
            ),
        ];
        for (error, grpc) in table {
            assert_eq!(error.code(), grpc, "{error}");
        }
    }

    /// A real `kube::Error::Api`, as the client builds it from the API server's Status answer.
    fn kube_api_error(status: u16, reason: &str) -> CsiError {
        let status: kube::core::Status = serde_json::from_value(serde_json::json!({
            "kind": "Status", "apiVersion": "v1", "status": "Failure",
            "message": "denied", "reason": reason, "code": status,
        }))
        .expect("a Status");
        CsiError::Kube(kube::Error::Api(Box::new(status)))
    }

    #[test]
    fn permanent_kube_errors_are_not_answered_as_unavailable() {
        assert_eq!(
            kube_api_error(403, "Forbidden").code(),
            Code::PermissionDenied
        );
        assert_eq!(kube_api_error(422, "Invalid").code(), Code::InvalidArgument);
        assert_eq!(kube_api_error(404, "NotFound").code(), Code::NotFound);
        assert_eq!(kube_api_error(409, "Conflict").code(), Code::Aborted);
        assert_eq!(
            kube_api_error(503, "ServiceUnavailable").code(),
            Code::Unavailable
        );
        // The message is the API server's, once, without kube's Debug dump of the Status.
        let status = Status::from(kube_api_error(403, "Forbidden"));
        assert_eq!(status.message(), "Kubernetes API: denied (403 Forbidden)");
    }

    #[test]
    fn node_error_carries_the_engine_code_and_chain() {
        let error = EngineError::Cancelled("job-1".into());
        let node = node_error(&error);
        // Once mapped through gRPC's codes and back with a wildcard; now kept as it is.
        assert_eq!(node.code, ErrorCode::Cancelled);
        assert!(node.message.contains("job-1"), "{}", node.message);
    }
}
