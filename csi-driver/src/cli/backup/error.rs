//! The one error type of the backup client, and the exit class of each error.

use std::path::PathBuf;

use super::super::exit::ExitClass;

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// Bad input the command line could not catch itself (an option that contradicts another).
    #[error("{0}")]
    Usage(String),

    #[error("export URL {url:?}: {why}")]
    Url { url: String, why: String },

    #[error("credentials {path}: {why}")]
    Credentials { path: PathBuf, why: String },

    #[error("{path} exists (give --force to overwrite it)")]
    OutputExists { path: PathBuf },

    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The front answered a 4xx: retrying cannot help, so the command stops at once.
    #[error("{url}: the server refused the request with {status}: {message}")]
    Refused {
        url: String,
        status: u16,
        message: String,
    },

    /// The front did not answer (or answered 5xx) for the whole retry budget.
    #[error("{url}: {what} failed for {seconds} s ({attempts} attempts); last error: {last}")]
    Unavailable {
        url: String,
        what: String,
        seconds: u64,
        attempts: u32,
        last: String,
    },

    /// The front's certificate is not signed by the given CA, or is not for the URL's host.
    #[error("{url}: TLS: {why}")]
    Tls { url: String, why: String },

    /// The front answered something this client cannot use (a wrong range, bad JSON).
    #[error("{url}: {why}")]
    Protocol { url: String, why: String },

    #[error("backup {path}: {why}")]
    Backup { path: PathBuf, why: String },

    /// The backups given to restore do not form one chain of the same disk.
    #[error("the backups do not form a chain: {0}")]
    Chain(String),

    #[error("target {path} holds {have} bytes, the backup needs {need}")]
    TargetTooSmall { path: PathBuf, have: u64, need: u64 },

    #[error("interrupted by {signal}: {incomplete} is incomplete ({hint})")]
    Interrupted {
        signal: &'static str,
        incomplete: String,
        hint: &'static str,
    },
}

impl BackupError {
    pub fn io(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            what,
            path: path.into(),
            source,
        }
    }

    /// The process exit code's class; the table is in docs/backup.md.
    pub fn class(&self) -> ExitClass {
        match self {
            Self::Usage(_) | Self::Url { .. } | Self::Credentials { .. } => {
                ExitClass::InvalidArgument
            }
            Self::OutputExists { .. } => ExitClass::AlreadyExists,
            Self::Io { .. } | Self::Protocol { .. } => ExitClass::Internal,
            Self::Refused { status, .. } => match status {
                404 => ExitClass::NotFound,
                416 => ExitClass::OutOfRange,
                _ => ExitClass::FailedPrecondition,
            },
            Self::Unavailable { .. } => ExitClass::Unavailable,
            Self::Tls { .. } | Self::Backup { .. } | Self::Chain(_) => {
                ExitClass::FailedPrecondition
            }
            Self::TargetTooSmall { .. } => ExitClass::OutOfRange,
            Self::Interrupted { .. } => ExitClass::Cancelled,
        }
    }

    /// The message and then each cause, for the CLI's error report.
    pub fn messages(&self) -> Vec<String> {
        let mut out = vec![self.to_string()];
        let mut cause = std::error::Error::source(self);
        while let Some(e) = cause {
            out.push(e.to_string());
            cause = e.source();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_map_to_classes_by_status() {
        let refused = |status| BackupError::Refused {
            url: "u".into(),
            status,
            message: "m".into(),
        };
        assert_eq!(refused(401).class(), ExitClass::FailedPrecondition);
        assert_eq!(refused(403).class(), ExitClass::FailedPrecondition);
        assert_eq!(refused(404).class(), ExitClass::NotFound);
        assert_eq!(refused(416).class(), ExitClass::OutOfRange);
    }

    #[test]
    fn messages_follow_the_source_chain() {
        let e = BackupError::io("writing", "/x", std::io::Error::other("disk full"));
        assert_eq!(
            e.messages(),
            vec!["writing /x".to_string(), "disk full".into()]
        );
    }
}
