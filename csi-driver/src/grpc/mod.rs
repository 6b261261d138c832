//! CSI plumbing shared by the cluster and node sides: the unix-socket gRPC server (and the
//! `:authority` repair for clients that send a socket path there), the Identity
//! service, the one error type and its gRPC codes, request validation, in-flight guards, the
//! topology of a livedisk node and the metrics of the calls.

pub mod authority;
pub mod error;
pub mod identity;
pub mod inflight;
pub mod metrics;
pub mod request;
pub mod server;
pub mod topology;
