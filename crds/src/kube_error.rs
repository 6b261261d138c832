//! Kubernetes errors classified in one place: every side (operator, CSI controller, node agent)
//! turns a `kube::Error` into the one [`ErrorCode`] vocabulary here, so a 403 or a 422 is
//! never mistaken for a transient failure and retried as if the next try could succeed.

use kube::Error;
use livedisk_common::ErrorCode;

/// The code of an API server answer with this HTTP status.
///
/// The status, not the `reason`, decides: the API server always sets the status, and the reasons
/// of one status agree on what a client can do (409 is both `Conflict` and `AlreadyExists`, and
/// either way a retry that re-reads the object settles it).
pub fn http_status_code(status: u16) -> ErrorCode {
    match status {
        // A malformed request or an object the API rejects (schema, CEL rule, admission): a bug
        // or a bad spec; sending it again gets the same answer.
        400 | 413 | 422 => ErrorCode::InvalidArgument,
        401 => ErrorCode::Unauthenticated,
        403 => ErrorCode::PermissionDenied,
        404 => ErrorCode::NotFound,
        // The resource does not support the verb (for example a subresource that is not served),
        // or the server does not implement the request at all.
        405 | 501 => ErrorCode::Unimplemented,
        408 | 504 => ErrorCode::DeadlineExceeded,
        // A conflicting write (stale resourceVersion, or created meanwhile) or an expired watch
        // position: re-read and try again.
        409 | 410 => ErrorCode::Aborted,
        412 => ErrorCode::FailedPrecondition,
        // Throttled (API priority and fairness) or the server is failing or restarting.
        429 | 500 | 502 | 503 | 505..=599 => ErrorCode::Unavailable,
        // Any other client error: the request itself is wrong.
        400..=499 => ErrorCode::InvalidArgument,
        // Not an error status at all, or none (0): an answer this client does not understand.
        _ => ErrorCode::Internal,
    }
}

/// The code of a Kubernetes client error.
///
/// Exhaustive over the variants this workspace compiles (kube's `ws`, `openssl-tls` and
/// `unstable-client` features are off): enabling one of them adds a variant, and this match then
/// fails to compile until the new variant is classified.
pub fn kube_error_code(error: &Error) -> ErrorCode {
    match error {
        Error::Api(status) => http_status_code(status.code),
        // The connection failed, broke, or timed out below HTTP: the server is not reachable now.
        Error::HyperError(_) | Error::Service(_) | Error::ReadEvents(_) => ErrorCode::Unavailable,
        Error::Auth(_) => ErrorCode::Unauthenticated,
        // The client's own configuration (kubeconfig, proxy, TLS setup) is wrong: no retry fixes it.
        Error::ProxyProtocolUnsupported { .. }
        | Error::ProxyProtocolDisabled { .. }
        | Error::InferConfig(_)
        | Error::InferKubeconfig(_)
        | Error::RustlsTls(_)
        | Error::TlsRequired => ErrorCode::FailedPrecondition,
        // The request could not be built from what was asked (for example an empty name).
        Error::BuildRequest(_) => ErrorCode::InvalidArgument,
        // The group, version or kind is not served by this API server.
        Error::Discovery(_) => ErrorCode::NotFound,
        // An answer this client cannot read, or a request it could not encode: a bug or a version
        // skew between client and server.
        Error::FromUtf8(_)
        | Error::LinesCodecMaxLineLengthExceeded
        | Error::HttpError(_)
        | Error::SerdeError(_) => ErrorCode::Internal,
    }
}

/// A Kubernetes client error as people read it. For an API server answer that is the server's
/// own message with its status and reason; kube's `Display` of it also prints the whole `Status`
/// in `Debug` form, which buries the message and overruns an Event's 1 KiB note.
pub fn kube_error_message(error: &Error) -> String {
    match error {
        Error::Api(status) if status.reason.is_empty() => {
            format!("{} ({})", status.message, status.code)
        }
        Error::Api(status) => format!("{} ({} {})", status.message, status.code, status.reason),
        other => livedisk_common::error_chain(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::core::Status;

    /// A real `kube::Error::Api` as the client builds it from an API server's Status answer.
    fn api_error(code: u16, reason: &str) -> Error {
        let status: Status = serde_json::from_value(serde_json::json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": format!("answer {code}"), "reason": reason, "code": code,
        }))
        .expect("a Status");
        Error::Api(Box::new(status))
    }

    #[test]
    fn api_statuses_are_classified() {
        let table = [
            (400, "BadRequest", ErrorCode::InvalidArgument),
            (401, "Unauthorized", ErrorCode::Unauthenticated),
            (403, "Forbidden", ErrorCode::PermissionDenied),
            (404, "NotFound", ErrorCode::NotFound),
            (405, "MethodNotAllowed", ErrorCode::Unimplemented),
            (406, "NotAcceptable", ErrorCode::InvalidArgument),
            (408, "Timeout", ErrorCode::DeadlineExceeded),
            (409, "Conflict", ErrorCode::Aborted),
            (409, "AlreadyExists", ErrorCode::Aborted),
            (410, "Expired", ErrorCode::Aborted),
            (412, "", ErrorCode::FailedPrecondition),
            (413, "RequestEntityTooLarge", ErrorCode::InvalidArgument),
            (415, "UnsupportedMediaType", ErrorCode::InvalidArgument),
            (422, "Invalid", ErrorCode::InvalidArgument),
            (429, "TooManyRequests", ErrorCode::Unavailable),
            (500, "InternalError", ErrorCode::Unavailable),
            (501, "", ErrorCode::Unimplemented),
            (502, "", ErrorCode::Unavailable),
            (503, "ServiceUnavailable", ErrorCode::Unavailable),
            (504, "Timeout", ErrorCode::DeadlineExceeded),
            (0, "", ErrorCode::Internal),
            (302, "", ErrorCode::Internal),
        ];
        for (status, reason, expected) in table {
            let error = api_error(status, reason);
            assert_eq!(kube_error_code(&error), expected, "{status} {reason}");
        }
    }

    #[test]
    fn permission_and_validation_errors_are_not_transient() {
        for status in [400, 401, 403, 422] {
            let code = kube_error_code(&api_error(status, ""));
            assert!(!code.is_transient(), "{status} is {code}");
        }
        for status in [409, 410, 429, 500, 503, 504] {
            let code = kube_error_code(&api_error(status, ""));
            assert!(code.is_transient(), "{status} is {code}");
        }
    }

    #[test]
    fn client_side_errors_are_classified() {
        let serde = serde_json::from_str::<u8>("x").expect_err("not a number");
        assert_eq!(
            kube_error_code(&Error::SerdeError(serde)),
            ErrorCode::Internal
        );
        let broken = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        assert_eq!(
            kube_error_code(&Error::ReadEvents(broken)),
            ErrorCode::Unavailable
        );
        assert_eq!(
            kube_error_code(&Error::Service("connection refused".into())),
            ErrorCode::Unavailable
        );
        assert_eq!(
            kube_error_code(&Error::TlsRequired),
            ErrorCode::FailedPrecondition
        );
        assert_eq!(
            kube_error_code(&Error::LinesCodecMaxLineLengthExceeded),
            ErrorCode::Internal
        );
        let bad_utf8 = String::from_utf8(vec![0xff]).expect_err("not UTF-8");
        assert_eq!(
            kube_error_code(&Error::FromUtf8(bad_utf8)),
            ErrorCode::Internal
        );
    }

    #[test]
    fn api_errors_read_as_the_servers_message() {
        let message = kube_error_message(&api_error(403, "Forbidden"));
        assert_eq!(message, "answer 403 (403 Forbidden)");
        assert_eq!(kube_error_message(&api_error(500, "")), "answer 500 (500)");
        let broken = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        assert_eq!(
            kube_error_message(&Error::ReadEvents(broken)),
            "Error reading events stream: reset"
        );
    }

    #[tokio::test]
    async fn an_unreachable_api_server_is_unavailable() {
        // A real client against a port nothing listens on: the error the client really returns.
        let config = kube::Config::new("http://127.0.0.1:9".parse().expect("uri"));
        let client = kube::Client::try_from(config).expect("client");
        let error = client
            .apiserver_version()
            .await
            .expect_err("nothing listens on the discard port");
        assert_eq!(kube_error_code(&error), ErrorCode::Unavailable, "{error:?}");
    }
}
