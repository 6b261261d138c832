//! The one error-code vocabulary. An engine error, a node's typed error in an internal CR's
//! status, a CSI gRPC status and a condition's reason all speak it, so each boundary maps with one
//! exhaustive `match` and nothing is lost or guessed on the way.

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
}
