//! The one error-code vocabulary. An engine error, a node's typed error in an internal CR's
//! status, a CSI gRPC status and a condition's or Event's reason all speak it, so each boundary
//! maps with one exhaustive `match` and nothing is lost or guessed on the way.
//!
//! Each table lives next to the foreign type it maps to: code → `tonic::Code` in the CSI crate's
//! error module, `kube::Error` → code in `livedisk-api`, engine error → code in the engine. The
//! two that need no foreign type (the reason string, the retry class) are methods below.

use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// What kind of failure an error is, named after the gRPC code a CSI call answers with.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum ErrorCode {
    InvalidArgument,
    NotFound,
    AlreadyExists,
    Aborted,
    OutOfRange,
    FailedPrecondition,
    ResourceExhausted,
    Unavailable,
    Internal,
    /// The work was cancelled before it finished (a merge job); the request may be repeated.
    Cancelled,
    /// The caller's identity may not do this (Kubernetes 403): a missing RBAC rule.
    PermissionDenied,
    /// The caller's identity was not accepted (Kubernetes 401): bad or expired credentials.
    Unauthenticated,
    /// The answer did not come in time; the work may still finish.
    DeadlineExceeded,
    /// Not implemented by this version.
    Unimplemented,
}

/// Whether a failure can go away by retrying the same request, with nothing else changing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Persistence {
    /// Goes away by itself (a conflict, a busy volume, a restarting daemon or API server): retry
    /// soon.
    Transient,
    /// Stays until a person changes something (the spec, a permission, free space): retrying
    /// soon only adds load, so retry slowly.
    Permanent,
}

/// How soon a controller retries a reconcile that failed with a transient error.
pub const TRANSIENT_RETRY: Duration = Duration::from_secs(5);
/// How soon a controller retries a reconcile that failed with a permanent error. Not never: the
/// missing permission or object may be fixed without the object being touched.
pub const PERMANENT_RETRY: Duration = Duration::from_secs(300);

impl ErrorCode {
    /// Every code, for tables and their tests.
    pub const ALL: [ErrorCode; 14] = [
        ErrorCode::InvalidArgument,
        ErrorCode::NotFound,
        ErrorCode::AlreadyExists,
        ErrorCode::Aborted,
        ErrorCode::OutOfRange,
        ErrorCode::FailedPrecondition,
        ErrorCode::ResourceExhausted,
        ErrorCode::Unavailable,
        ErrorCode::Internal,
        ErrorCode::Cancelled,
        ErrorCode::PermissionDenied,
        ErrorCode::Unauthenticated,
        ErrorCode::DeadlineExceeded,
        ErrorCode::Unimplemented,
    ];

    /// The CamelCase reason of a condition or Event that reports an error of this code.
    pub fn reason(self) -> &'static str {
        match self {
            ErrorCode::InvalidArgument => "InvalidArgument",
            ErrorCode::NotFound => "NotFound",
            ErrorCode::AlreadyExists => "AlreadyExists",
            ErrorCode::Aborted => "Aborted",
            ErrorCode::OutOfRange => "OutOfRange",
            ErrorCode::FailedPrecondition => "FailedPrecondition",
            ErrorCode::ResourceExhausted => "ResourceExhausted",
            ErrorCode::Unavailable => "Unavailable",
            ErrorCode::Internal => "Internal",
            ErrorCode::Cancelled => "Cancelled",
            ErrorCode::PermissionDenied => "PermissionDenied",
            ErrorCode::Unauthenticated => "Unauthenticated",
            ErrorCode::DeadlineExceeded => "DeadlineExceeded",
            ErrorCode::Unimplemented => "Unimplemented",
        }
    }

    /// Whether retrying the same request can succeed.
    pub fn persistence(self) -> Persistence {
        use Persistence::{Permanent, Transient};
        match self {
            ErrorCode::Aborted
            | ErrorCode::Unavailable
            | ErrorCode::DeadlineExceeded
            // The engine's cancelled merge says "retry to finish".
            | ErrorCode::Cancelled
            // An unclassified failure (a QMP or pool I/O error) is most often a daemon hiccup:
            // the node agent has always retried these soon, and keeps doing so.
            | ErrorCode::Internal => Transient,
            ErrorCode::InvalidArgument
            | ErrorCode::NotFound
            | ErrorCode::AlreadyExists
            | ErrorCode::OutOfRange
            | ErrorCode::FailedPrecondition
            | ErrorCode::ResourceExhausted
            | ErrorCode::PermissionDenied
            | ErrorCode::Unauthenticated
            | ErrorCode::Unimplemented => Permanent,
        }
    }

    /// Whether retrying the same request soon can succeed.
    pub fn is_transient(self) -> bool {
        self.persistence() == Persistence::Transient
    }

    /// How long a controller waits before it retries a reconcile that failed with this code.
    pub fn retry_after(self) -> Duration {
        match self.persistence() {
            Persistence::Transient => TRANSIENT_RETRY,
            Persistence::Permanent => PERMANENT_RETRY,
        }
    }

    /// A sentence for a condition or Event message: how the failure will be retried.
    pub fn retry_note(self) -> String {
        let seconds = self.retry_after().as_secs();
        match self.persistence() {
            Persistence::Transient => format!("a transient error; retrying in {seconds}s"),
            Persistence::Permanent => format!(
                "this will not succeed until something is changed (the object, a permission, free space); retrying in {seconds}s"
            ),
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.reason())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A condition reason must match the API's pattern, and an Event reason is read by tools.
    fn valid_reason(reason: &str) -> bool {
        let mut chars = reason.chars();
        chars.next().is_some_and(|c| c.is_ascii_uppercase())
            && chars.all(|c| c.is_ascii_alphanumeric())
    }

    /// The position of a code in [`ErrorCode::ALL`]; exhaustive, so a new variant cannot be
    /// left out of `ALL` (and with it out of every table test) unnoticed.
    fn position(code: ErrorCode) -> usize {
        match code {
            ErrorCode::InvalidArgument => 0,
            ErrorCode::NotFound => 1,
            ErrorCode::AlreadyExists => 2,
            ErrorCode::Aborted => 3,
            ErrorCode::OutOfRange => 4,
            ErrorCode::FailedPrecondition => 5,
            ErrorCode::ResourceExhausted => 6,
            ErrorCode::Unavailable => 7,
            ErrorCode::Internal => 8,
            ErrorCode::Cancelled => 9,
            ErrorCode::PermissionDenied => 10,
            ErrorCode::Unauthenticated => 11,
            ErrorCode::DeadlineExceeded => 12,
            ErrorCode::Unimplemented => 13,
        }
    }

    #[test]
    fn all_lists_every_code_once() {
        for (index, code) in ErrorCode::ALL.iter().enumerate() {
            assert_eq!(position(*code), index, "{code}");
        }
    }

    #[test]
    fn every_code_has_a_reason_that_is_its_serialized_name() {
        for code in ErrorCode::ALL {
            let reason = code.reason();
            assert!(valid_reason(reason), "{reason}");
            // The reason is the same word as the code in a CR's status.error.code.
            assert_eq!(
                serde_json::to_value(code).expect("serialize"),
                serde_json::Value::from(reason)
            );
            assert_eq!(code.to_string(), reason);
        }
        let distinct: std::collections::HashSet<_> =
            ErrorCode::ALL.iter().map(|c| c.reason()).collect();
        assert_eq!(distinct.len(), ErrorCode::ALL.len());
    }

    #[test]
    fn retry_class_of_every_code() {
        use Persistence::{Permanent, Transient};
        let expected = [
            (ErrorCode::InvalidArgument, Permanent),
            (ErrorCode::NotFound, Permanent),
            (ErrorCode::AlreadyExists, Permanent),
            (ErrorCode::Aborted, Transient),
            (ErrorCode::OutOfRange, Permanent),
            (ErrorCode::FailedPrecondition, Permanent),
            (ErrorCode::ResourceExhausted, Permanent),
            (ErrorCode::Unavailable, Transient),
            (ErrorCode::Internal, Transient),
            (ErrorCode::Cancelled, Transient),
            (ErrorCode::PermissionDenied, Permanent),
            (ErrorCode::Unauthenticated, Permanent),
            (ErrorCode::DeadlineExceeded, Transient),
            (ErrorCode::Unimplemented, Permanent),
        ];
        assert_eq!(expected.len(), ErrorCode::ALL.len());
        for (code, persistence) in expected {
            assert_eq!(code.persistence(), persistence, "{code}");
            assert_eq!(code.is_transient(), persistence == Transient, "{code}");
        }
    }

    #[test]
    fn permanent_errors_are_retried_slowly_and_say_so() {
        assert_eq!(ErrorCode::Aborted.retry_after(), TRANSIENT_RETRY);
        assert_eq!(ErrorCode::PermissionDenied.retry_after(), PERMANENT_RETRY);
        assert!(TRANSIENT_RETRY < PERMANENT_RETRY);
        assert!(ErrorCode::Unavailable.retry_note().contains("transient"));
        assert!(
            ErrorCode::InvalidArgument
                .retry_note()
                .contains("until something is changed")
        );
    }
}
