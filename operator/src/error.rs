//! The operator's error type. Each variant names the pipeline stage that failed; its name becomes
//! the reason of the Warning Event that reports it.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum Error {
    #[error("reading {what}: {source}")]
    Observe {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("applying {what}: {source}")]
    Apply {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("writing status: {0}")]
    UpdateStatus(#[source] kube::Error),
    #[error("caches did not sync: {0}")]
    CacheSync(String),
    #[error("object cannot be read with this operator's API types: {0}")]
    InvalidObject(String),
}

impl Error {
    /// CamelCase reason for Events and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Observe { .. } => "ObserveFailed",
            Error::Apply { .. } => "ApplyFailed",
            Error::UpdateStatus(_) => "StatusUpdateFailed",
            Error::CacheSync(_) => "CacheSyncFailed",
            Error::InvalidObject(_) => "InvalidObject",
        }
    }
}
