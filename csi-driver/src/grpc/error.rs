//! One error type for the CSI services, mapped deliberately to gRPC codes. The message carries the
//! whole error chain.

use livedisk_api::internal::{ErrorCode, NodeError};
use thiserror::Error;
use tonic::{Code, Status};

use livedisk_engine::{self as engine, EngineError};

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
    #[error("timed out waiting for {0}; the operation continues and a retry picks it up")]
    Timeout(String),
    #[error("node reported: {}", .0.message)]
    Node(NodeError),
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("{0}")]
    Internal(String),
}

impl CsiError {
    pub fn code(&self) -> Code {
        match self {
            CsiError::InvalidArgument(_) => Code::InvalidArgument,
            CsiError::NotFound(_) => Code::NotFound,
            CsiError::AlreadyExists(_) => Code::AlreadyExists,
            CsiError::Aborted(_) => Code::Aborted,
            CsiError::OutOfRange(_) => Code::OutOfRange,
            CsiError::FailedPrecondition(_) => Code::FailedPrecondition,
            CsiError::ResourceExhausted(_) => Code::ResourceExhausted,
            CsiError::Unimplemented(_) => Code::Unimplemented,
            CsiError::Timeout(_) => Code::DeadlineExceeded,
            CsiError::Node(error) => node_code(error.code),
            CsiError::Kube(kube::Error::Api(status)) if status.code == 404 => Code::NotFound,
            CsiError::Kube(kube::Error::Api(status)) if status.code == 409 => Code::Aborted,
            CsiError::Kube(_) => Code::Unavailable,
            CsiError::Engine(error) => engine_code(error.code()),
            CsiError::Internal(_) => Code::Internal,
        }
    }
}

fn node_code(code: ErrorCode) -> Code {
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
    }
}

fn engine_code(code: engine::Code) -> Code {
    match code {
        engine::Code::InvalidArgument => Code::InvalidArgument,
        engine::Code::NotFound => Code::NotFound,
        engine::Code::AlreadyExists => Code::AlreadyExists,
        engine::Code::Aborted => Code::Aborted,
        engine::Code::OutOfRange => Code::OutOfRange,
        engine::Code::FailedPrecondition => Code::FailedPrecondition,
        engine::Code::Cancelled => Code::Cancelled,
        engine::Code::Internal => Code::Internal,
        engine::Code::Unavailable => Code::Unavailable,
        #[allow(unreachable_patterns)]
        _ => Code::Internal,
    }
}

/// The engine's error as the typed error a node writes into a CR status.
pub fn node_error(error: &EngineError) -> NodeError {
    let code = match engine_code(error.code()) {
        Code::InvalidArgument => ErrorCode::InvalidArgument,
        Code::NotFound => ErrorCode::NotFound,
        Code::AlreadyExists => ErrorCode::AlreadyExists,
        Code::Aborted => ErrorCode::Aborted,
        Code::OutOfRange => ErrorCode::OutOfRange,
        Code::FailedPrecondition => ErrorCode::FailedPrecondition,
        Code::ResourceExhausted => ErrorCode::ResourceExhausted,
        Code::Unavailable => ErrorCode::Unavailable,
        _ => ErrorCode::Internal,
    };
    NodeError {
        code,
        message: error_chain(error),
    }
}

/// The error and all its sources, joined.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
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
}
