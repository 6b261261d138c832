//! What every livedisk server shows about itself, shared by the operator, the CSI controller and
//! the node plugin:
//!
//! * [`endpoint`]: one HTTPS listener (`--metrics-addr`) with `/healthz`, `/readyz` and
//!   `/metrics`. TLS always (decision 9): a certificate from `--metrics-tls-dir`, or a
//!   self-signed one made at start ([`tls`]). The probes answer anyone and say only ok / not ok;
//!   `/metrics` wants a bearer token that the API server accepts and that may `get` the
//!   non-resource URL `/metrics` ([`auth`]).
//! * [`health`]: what the probes answer: the process's own heartbeat (liveness) and a readiness
//!   check each binary supplies.
//! * [`logging`]: the log format (`--log-format text|json`, `LIVEDISK_LOG_FORMAT`).
//! * [`args`]: those flags, once, for every server binary.
//!
//! Metrics themselves are defined where they are counted (the operator, the CSI services); they
//! register into the `prometheus_client` [`Registry`] handed to the endpoint. HTTP stays out of
//! `livedisk-common`, which the CRD crate and the engine also import.

pub mod args;
pub mod auth;
#[cfg(any(test, feature = "client"))]
pub mod client;
pub mod endpoint;
pub mod error;
pub mod health;
pub mod logging;
pub mod tls;

pub use args::TelemetryArgs;
pub use endpoint::{Endpoint, EndpointConfig};
pub use error::TelemetryError;
pub use health::{Heartbeat, ReadyCheck, ReadyFlag};
pub use logging::LogFormat;
pub use prometheus_client::registry::Registry;
