//! Leader election through a `coordination.k8s.io/v1` Lease: only the replica holding the Lease
//! runs the controllers, and a replica that cannot prove it still holds it writes nothing.
//!
//! Written here rather than taken from a crate. Of the Lease crates on crates.io,
//! `kube-leader-election` and `kube-coordinate` are built on older kube versions (4 and 2), and
//! `kube-lease-manager` (kube 5) judges expiry by comparing the holder's `renewTime` with the local
//! wall clock and tells its user only a "leading: yes/no" flag that changes when its own loop
//! notices. This operator needs more than a flag: the instant of its last successful renewal on a
//! monotonic clock, checked before every write, so that a process resumed after SIGSTOP stops
//! acting before its loop has run at all. The algorithm is client-go's (tryAcquireOrRenew with
//! an observed time, a renew deadline shorter than the lease, release on a clean shutdown); its
//! decisions are pure functions in [`decide`], and [`elector`] is the thin I/O shell around them,
//! writing with resourceVersion-guarded creates and replaces (optimistic concurrency: of two
//! replicas writing the same record version, one gets 409 Conflict and stays a candidate).
//!
//! The safety rule has three parts:
//! * [`Leadership::is_leader`] is true only until the renew deadline after the start of the last
//!   successful renewal, by the monotonic clock;
//! * the controllers' client passes its writes through [`fence`], which refuses any request that
//!   changes something while `is_leader` is false — the narrowest window the API offers, as it
//!   has no fencing token; and every reconcile checks `is_leader` before it starts;
//! * when the deadline passes, [`elector::Elector::keep`] returns and the process exits (the
//!   Deployment restarts it as a candidate): it acts again only after winning the Lease anew.

pub mod decide;
pub mod elector;
pub mod fence;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use decide::Timing;
pub use elector::{Elector, Settings};

/// Whether this replica may act now: a cheap getter shared by the elector (which renews it), the
/// controllers (which check it before each reconcile), the write fence and, later, readiness and
/// metrics.
#[derive(Clone, Debug)]
pub struct Leadership {
    state: Arc<State>,
}

#[derive(Debug)]
enum State {
    /// Leader election is off: this replica always acts (a single replica by the operator's own
    /// choice).
    Unconditional,
    /// Leader election is on: this replica acts until `renew_deadline` after `renewed_at`.
    Elected {
        renewed_at: Mutex<Option<Instant>>,
        renew_deadline: Duration,
    },
}

impl Leadership {
    /// For a replica run without leader election: always the leader.
    pub fn unconditional() -> Self {
        Self {
            state: Arc::new(State::Unconditional),
        }
    }

    /// For a candidate: not the leader until it renews.
    fn elected(renew_deadline: Duration) -> Self {
        Self {
            state: Arc::new(State::Elected {
                renewed_at: Mutex::new(None),
                renew_deadline,
            }),
        }
    }

    /// Does this replica hold the Lease now (by its monotonic clock)?
    pub fn is_leader(&self) -> bool {
        self.remaining(Instant::now()).is_some()
    }

    /// How long this replica still holds the Lease from `now`, if it does.
    fn remaining(&self, now: Instant) -> Option<Duration> {
        match &*self.state {
            State::Unconditional => Some(Duration::MAX),
            State::Elected {
                renewed_at,
                renew_deadline,
            } => {
                let at = (*lock(renewed_at))?;
                decide::still_holds(Some(at), now, *renew_deadline)
                    .then(|| *renew_deadline - now.saturating_duration_since(at))
            }
        }
    }

    /// Records a successful renewal (or acquisition) whose first request left at `at`.
    fn renewed(&self, at: Instant) {
        if let State::Elected { renewed_at, .. } = &*self.state {
            let mut renewed_at = lock(renewed_at);
            // A slow attempt that finished after a faster later one must not move time back.
            if renewed_at.is_none_or(|previous| previous < at) {
                *renewed_at = Some(at);
            }
        }
    }

    /// Stops acting at once (before the Lease is released, or when it is lost).
    fn resign(&self) {
        if let State::Elected { renewed_at, .. } = &*self.state {
            *lock(renewed_at) = None;
        }
    }
}

/// The state behind a mutex that a panicking thread may have poisoned: an `Option<Instant>` is
/// valid whatever the panic, so the value is used as it is.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Pure: the namespace of the Lease: the flag (or `POD_NAMESPACE`), else the namespace of the
/// ServiceAccount the pod runs as, else `livedisk-system` (the chart's documented namespace).
pub fn lease_namespace(flag: Option<&str>, service_account_namespace: Option<&str>) -> String {
    [flag, service_account_namespace]
        .into_iter()
        .flatten()
        .map(str::trim)
        .find(|n| !n.is_empty())
        .unwrap_or(DEFAULT_NAMESPACE)
        .to_string()
}

/// The namespace of the Lease when nothing else names one.
pub const DEFAULT_NAMESPACE: &str = "livedisk-system";

/// Where kubelet mounts the namespace of the pod's ServiceAccount.
pub const SERVICE_ACCOUNT_NAMESPACE_FILE: &str =
    "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

/// Pure: this replica's identity in the Lease: the pod name, else `<hostname>_<pid>` (unique on a
/// host, and says where to look).
pub fn identity(pod_name: Option<&str>, hostname: &str, pid: u32) -> String {
    match pod_name.map(str::trim).filter(|n| !n.is_empty()) {
        Some(pod) => pod.to_string(),
        None => format!("{}_{pid}", hostname.trim()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lease_namespace_falls_back_in_order() {
        assert_eq!(lease_namespace(Some("ops"), Some("sa-ns")), "ops");
        assert_eq!(lease_namespace(None, Some("sa-ns\n")), "sa-ns");
        assert_eq!(lease_namespace(Some(""), Some("sa-ns")), "sa-ns");
        assert_eq!(lease_namespace(None, None), "livedisk-system");
    }

    #[test]
    fn the_identity_is_the_pod_name_else_host_and_pid() {
        assert_eq!(
            identity(Some("livedisk-operator-7d9f"), "h", 1),
            "livedisk-operator-7d9f"
        );
        assert_eq!(identity(None, "node-1\n", 4242), "node-1_4242");
        assert_eq!(identity(Some(" "), "node-1", 7), "node-1_7");
    }

    #[test]
    fn leadership_lasts_until_the_renew_deadline_and_ends_on_resign() {
        let leadership = Leadership::elected(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(
            leadership.remaining(t0),
            None,
            "a candidate is not the leader"
        );
        leadership.renewed(t0);
        assert_eq!(
            leadership.remaining(t0 + Duration::from_secs(4)),
            Some(Duration::from_secs(6))
        );
        assert_eq!(leadership.remaining(t0 + Duration::from_secs(10)), None);
        // A late answer to an older attempt does not move the renewal back.
        leadership.renewed(t0 + Duration::from_secs(2));
        leadership.renewed(t0 + Duration::from_secs(1));
        assert_eq!(
            leadership.remaining(t0 + Duration::from_secs(11)),
            Some(Duration::from_secs(1))
        );
        leadership.resign();
        assert_eq!(leadership.remaining(t0 + Duration::from_secs(3)), None);
        assert!(!leadership.is_leader());
    }

    #[test]
    fn without_election_the_replica_always_leads() {
        let leadership = Leadership::unconditional();
        assert!(leadership.is_leader());
        leadership.resign();
        assert!(leadership.is_leader());
    }
}
