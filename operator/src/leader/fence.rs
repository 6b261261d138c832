//! The write fence: a tower layer under the controllers' client that refuses every request that
//! changes something while this replica does not hold the Lease.
//!
//! Checking before each reconcile is not enough: a reconcile that was running when the process was
//! stopped (SIGSTOP, a long GC-like pause, a frozen VM) resumes in the middle, past that check,
//! and would write over the new leader. The fence checks at the last moment the client has, as
//! the request leaves, whatever code path sends it (status, applied objects, Events). Reads
//! (GET, including lists and watches) always pass: a standby may look.

use http::{Method, Request};
use kube::client::Body;
use tower::BoxError;
use tower::filter::{FilterLayer, Predicate};

use super::Leadership;

/// The layer to add to the controllers' client (`kube::client::ClientBuilder::with_layer`).
pub fn layer(leadership: Leadership) -> FilterLayer<Fence> {
    FilterLayer::new(Fence { leadership })
}

/// The predicate of [`layer`].
#[derive(Clone, Debug)]
pub struct Fence {
    leadership: Leadership,
}

/// A write refused because this replica does not hold the Lease.
#[derive(Debug, thiserror::Error)]
#[error(
    "{method} {path} refused: this replica does not hold the operator's Lease, so it writes nothing"
)]
pub struct NotLeader {
    pub method: Method,
    pub path: String,
}

impl Predicate<Request<Body>> for Fence {
    type Request = Request<Body>;

    fn check(&mut self, request: Request<Body>) -> Result<Request<Body>, BoxError> {
        if !changes_something(request.method()) || self.leadership.is_leader() {
            return Ok(request);
        }
        let refused = NotLeader {
            method: request.method().clone(),
            path: request.uri().path().to_string(),
        };
        tracing::warn!(method = %refused.method, path = %refused.path, "write refused: not the leader");
        Err(Box::new(refused))
    }
}

/// Pure: does a request with this method change anything on the API server? Everything but the
/// safe methods does (POST, PUT, PATCH, DELETE: create, update, patch, delete).
pub fn changes_something(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn request(method: Method) -> Request<Body> {
        Request::builder()
            .method(method)
            .uri("/apis/livedisk.io/v1alpha1/namespaces/n/disksnapshots/s/status")
            .body(Body::empty())
            .expect("a request")
    }

    #[test]
    fn only_reads_are_safe() {
        for method in [Method::GET, Method::HEAD, Method::OPTIONS] {
            assert!(!changes_something(&method), "{method}");
        }
        for method in [Method::POST, Method::PUT, Method::PATCH, Method::DELETE] {
            assert!(changes_something(&method), "{method}");
        }
    }

    #[test]
    fn a_replica_without_the_lease_reads_but_does_not_write() {
        let leadership = Leadership::elected(Duration::from_secs(10));
        let mut fence = Fence {
            leadership: leadership.clone(),
        };
        assert!(fence.check(request(Method::GET)).is_ok());
        let refused = fence
            .check(request(Method::PATCH))
            .expect_err("a candidate must not write");
        let refused = refused.downcast::<NotLeader>().expect("a NotLeader error");
        assert_eq!(refused.method, Method::PATCH);
        assert!(refused.path.ends_with("/status"));

        leadership.renewed(Instant::now());
        assert!(fence.check(request(Method::PATCH)).is_ok());
        assert!(fence.check(request(Method::DELETE)).is_ok());

        leadership.resign();
        assert!(fence.check(request(Method::POST)).is_err());
    }
}
