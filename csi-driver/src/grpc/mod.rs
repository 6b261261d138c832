//! CSI plumbing shared by the cluster and node sides: the unix-socket gRPC server, the Identity
//! service, the one error type and its gRPC codes, request validation, in-flight guards and the
//! topology of a livedisk node.

pub mod error;
pub mod identity;
pub mod inflight;
pub mod request;
pub mod server;
pub mod topology;
