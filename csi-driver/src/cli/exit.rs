//! Exit codes per error class and the error report printed on failure.

use livedisk_engine::ids::IdError;
use livedisk_engine::{EngineError, ErrorCode};

/// Process exit codes; stable, documented in docs/admin-cli.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitClass {
    Internal = 1,
    /// Bad input: usage, invalid ID, invalid size. Also clap's own code.
    InvalidArgument = 2,
    NotFound = 3,
    AlreadyExists = 4,
    /// Another operation holds the volume.
    Busy = 5,
    OutOfRange = 6,
    FailedPrecondition = 7,
    Cancelled = 8,
    /// The engine daemon is not reachable.
    Unavailable = 9,
}

impl ExitClass {
    pub fn code(self) -> i32 {
        self as i32
    }

    pub fn from_engine(code: ErrorCode) -> Self {
        match code {
            ErrorCode::InvalidArgument => Self::InvalidArgument,
            ErrorCode::NotFound => Self::NotFound,
            ErrorCode::AlreadyExists => Self::AlreadyExists,
            ErrorCode::Aborted => Self::Busy,
            ErrorCode::OutOfRange => Self::OutOfRange,
            ErrorCode::FailedPrecondition => Self::FailedPrecondition,
            ErrorCode::Cancelled => Self::Cancelled,
            ErrorCode::Unavailable => Self::Unavailable,
            ErrorCode::Internal => Self::Internal,
            // A QMP command that timed out: the daemon did not answer in time.
            ErrorCode::DeadlineExceeded => Self::Unavailable,
            // Codes of the cluster side (pool space is checked by the node agent, permissions
            // and authentication are the API server's); the engine does not produce them, so
            // they get no exit code of their own.
            ErrorCode::ResourceExhausted
            | ErrorCode::PermissionDenied
            | ErrorCode::Unauthenticated
            | ErrorCode::Unimplemented => Self::Internal,
        }
    }
}

/// An error the CLI itself decides the class of (not from the engine).
#[derive(Debug, thiserror::Error)]
#[error("{msg}")]
pub struct CliError {
    pub class: ExitClass,
    pub msg: String,
}

impl CliError {
    pub fn new(class: ExitClass, msg: impl Into<String>) -> Self {
        Self {
            class,
            msg: msg.into(),
        }
    }
}

/// The class of an error: the first error in the chain that knows its class.
pub fn classify(err: &anyhow::Error) -> ExitClass {
    for e in err.chain() {
        if let Some(c) = e.downcast_ref::<CliError>() {
            return c.class;
        }
        if let Some(e) = e.downcast_ref::<EngineError>() {
            return ExitClass::from_engine(e.code());
        }
        if e.downcast_ref::<IdError>().is_some() {
            return ExitClass::InvalidArgument;
        }
    }
    ExitClass::Internal
}

/// `error: outer` then one `caused by:` line per distinct cause.
pub fn report(messages: &[String]) -> String {
    let mut out = String::new();
    let mut last: Option<&str> = None;
    for m in messages {
        if last == Some(m.as_str()) {
            continue;
        }
        if last.is_none() {
            out.push_str(&format!("error: {m}\n"));
        } else {
            out.push_str(&format!("  caused by: {m}\n"));
        }
        last = Some(m);
    }
    out
}

pub fn chain_messages(err: &anyhow::Error) -> Vec<String> {
    err.chain().map(ToString::to_string).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn classifies_through_context() {
        let e: anyhow::Error = EngineError::NotFound("volume x".into()).into();
        let e = e.context("snapshots of vol-x");
        assert_eq!(classify(&e), ExitClass::NotFound);
        assert_eq!(e.to_string(), "snapshots of vol-x");
    }

    #[test]
    fn classifies_id_errors() {
        let r: Result<(), _> = livedisk_engine::VolumeId::parse("../x").map(|_| ());
        let e = r.context("parsing").err();
        assert_eq!(e.as_ref().map(classify), Some(ExitClass::InvalidArgument));
    }

    #[test]
    fn unknown_errors_are_internal() {
        assert_eq!(classify(&anyhow::anyhow!("boom")), ExitClass::Internal);
        let e: anyhow::Error = CliError::new(ExitClass::Unavailable, "down").into();
        assert_eq!(classify(&e), ExitClass::Unavailable);
    }

    #[test]
    fn report_prints_chain_once() {
        let r = report(&["a".into(), "b".into(), "b".into(), "c".into()]);
        assert_eq!(r, "error: a\n  caused by: b\n  caused by: c\n");
    }
}
