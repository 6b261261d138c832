//! The operator's error type. Each variant names the pipeline stage that failed (the `action` of
//! the Warning Event that reports it); its [`ErrorCode`] is the Event's reason and decides how
//! soon the reconcile is retried.

use livedisk_api::{kube_error_code, kube_error_message};
use livedisk_common::ErrorCode;
use thiserror::Error;

/// The Kubernetes errors are kept as values (`cause`), not as `#[source]`: their message, via
/// [`kube_error_message`], is already part of this error's own, so the error chain in an Event
/// says it once and readably.
#[derive(Debug, Error)]
pub enum Error {
    #[error("reading {what}: {}", kube_error_message(cause))]
    Observe { what: String, cause: kube::Error },
    #[error("building {what}")]
    Build {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("applying {what}: {}", kube_error_message(cause))]
    Apply { what: String, cause: kube::Error },
    #[error("writing status: {}", kube_error_message(.0))]
    UpdateStatus(kube::Error),
    #[error("caches did not sync: {0}")]
    CacheSync(String),
    #[error("object cannot be read with this operator's API types: {0}")]
    InvalidObject(String),
    #[error("export credentials: {0}")]
    Credentials(String),
}

impl Error {
    /// The kind of failure, in livedisk's one vocabulary; exhaustive.
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::Observe { cause, .. } | Error::Apply { cause, .. } => kube_error_code(cause),
            Error::UpdateStatus(cause) => kube_error_code(cause),
            // The operator built an object its own types cannot express: a bug.
            Error::Build { .. } => ErrorCode::Internal,
            // The watches could not list: the API server is not reachable (yet).
            Error::CacheSync(_) => ErrorCode::Unavailable,
            // The stored object does not match the schema this operator was built with (a
            // version skew): retrying will not change it.
            Error::InvalidObject(_) => ErrorCode::InvalidArgument,
            // A certificate could not be made or read (a broken CA Secret is named in the
            // message; a person must replace it).
            Error::Credentials(_) => ErrorCode::Internal,
        }
    }

    /// The pipeline stage that failed, CamelCase: the `action` of the Warning Event.
    pub fn action(&self) -> &'static str {
        match self {
            Error::Observe { .. } => "Observe",
            Error::Build { .. } => "Build",
            Error::Apply { .. } => "Apply",
            Error::UpdateStatus(_) => "UpdateStatus",
            Error::CacheSync(_) => "CacheSync",
            Error::InvalidObject(_) => "Read",
            Error::Credentials(_) => "IssueCredentials",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real `kube::Error::Api`, as the client builds it from the API server's Status answer.
    fn api_error(code: u16) -> kube::Error {
        let status: kube::core::Status = serde_json::from_value(serde_json::json!({
            "kind": "Status", "apiVersion": "v1", "status": "Failure",
            "message": format!("answer {code}"), "reason": "", "code": code,
        }))
        .expect("a Status");
        kube::Error::Api(Box::new(status))
    }

    #[test]
    fn every_stage_error_has_its_code_and_action() {
        let serde = serde_json::from_str::<u8>("x").expect_err("not a number");
        let table = [
            (
                Error::Observe {
                    what: "x".into(),
                    cause: api_error(403),
                },
                ErrorCode::PermissionDenied,
                "Observe",
            ),
            (
                Error::Build {
                    what: "x".into(),
                    source: serde,
                },
                ErrorCode::Internal,
                "Build",
            ),
            (
                Error::Apply {
                    what: "x".into(),
                    cause: api_error(422),
                },
                ErrorCode::InvalidArgument,
                "Apply",
            ),
            (
                Error::UpdateStatus(api_error(409)),
                ErrorCode::Aborted,
                "UpdateStatus",
            ),
            (
                Error::CacheSync("x".into()),
                ErrorCode::Unavailable,
                "CacheSync",
            ),
            (
                Error::InvalidObject("x".into()),
                ErrorCode::InvalidArgument,
                "Read",
            ),
        ];
        for (error, code, action) in table {
            assert_eq!(error.code(), code, "{error}");
            assert_eq!(error.action(), action, "{error}");
        }
    }

    #[test]
    fn the_message_carries_the_api_servers_answer_once() {
        let error = Error::Apply {
            what: "VolumeSnapshot ns/s".into(),
            cause: api_error(403),
        };
        let message = livedisk_common::error_chain(&error);
        assert_eq!(message, "applying VolumeSnapshot ns/s: answer 403 (403)");
    }
}
