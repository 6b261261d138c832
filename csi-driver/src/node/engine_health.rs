//! The node plugin's view of its engine: what Probe answers, and when the plugin gives up on a
//! lost engine daemon.
//!
//! The engine re-attaches by itself to a daemon that restarts (`engine/src/qcow2/reconnect.rs`).
//! Whether to keep waiting for one that does not come back is the node plugin's policy: after
//! `--engine-reconnect-seconds` without a daemon it exits non-zero, so that its supervisor (the
//! DaemonSet; `hack/restart-on-failure.sh` under hack/driver.sh) restarts it and `Engine::open`
//! runs afresh. Why both, in docs/architecture.md ("The node plugin and its engine daemon").

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::grpc::identity::Readiness;
use livedisk_engine::{Engine, SessionState};

/// Probe's answer for an engine session: ready only while the engine can work. Not while its
/// daemon is gone, nor while a restarted one is being brought in line (calls fail UNAVAILABLE
/// then).
pub fn ready(state: SessionState) -> bool {
    state == SessionState::Live
}

impl Readiness for Engine {
    fn ready(&self) -> bool {
        ready(self.session())
    }
}

/// What the node plugin does about its engine's session now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Attached to a daemon (live, or being restored): nothing.
    Serving,
    /// No daemon: wait for it until this instant.
    WaitUntil(Instant),
    /// No daemon for longer than the bound: exit, so that a restart opens the engine afresh.
    GiveUp { lost_for: Duration },
}

/// The pure decision behind [`abandoned`]. A restore counts as attached: the daemon is back and
/// the restore is bounded per volume, and a restart would only do the same recovery again.
pub fn verdict(state: SessionState, now: Instant, bound: Duration) -> Verdict {
    match state {
        SessionState::Live | SessionState::Restoring => Verdict::Serving,
        SessionState::Lost { since } => {
            let lost_for = now.saturating_duration_since(since);
            if lost_for >= bound {
                Verdict::GiveUp { lost_for }
            } else {
                Verdict::WaitUntil(since + bound)
            }
        }
    }
}

/// Resolves once the engine has had no daemon for `bound` at a stretch, with the reason to exit
/// with. Never resolves while the daemon comes back in time.
pub async fn abandoned(mut states: watch::Receiver<SessionState>, bound: Duration) -> String {
    loop {
        let state = *states.borrow_and_update();
        match verdict(state, Instant::now(), bound) {
            Verdict::Serving => {
                if states.changed().await.is_err() {
                    // The engine is gone, and with it whatever could be lost.
                    return std::future::pending().await;
                }
            }
            Verdict::WaitUntil(deadline) => {
                tokio::select! {
                    changed = states.changed() => if changed.is_err() {
                        return std::future::pending().await;
                    },
                    () = tokio::time::sleep_until(deadline) => {}
                }
            }
            Verdict::GiveUp { lost_for } => {
                return format!(
                    "the engine daemon has been unreachable for {}s (bound {}s): exiting so that \
                     the node plugin is restarted and opens its engine afresh",
                    lost_for.as_secs(),
                    bound.as_secs()
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_is_ready_only_while_live() {
        assert!(ready(SessionState::Live));
        assert!(!ready(SessionState::Restoring));
        assert!(!ready(SessionState::Lost {
            since: Instant::now()
        }));
    }

    #[test]
    fn gives_up_only_after_the_bound_without_a_daemon() {
        let bound = Duration::from_secs(30);
        let since = Instant::now();
        let lost = SessionState::Lost { since };
        assert_eq!(verdict(SessionState::Live, since, bound), Verdict::Serving);
        // A restore that outlasts the bound is not a reason to restart.
        assert_eq!(
            verdict(SessionState::Restoring, since + 2 * bound, bound),
            Verdict::Serving
        );
        assert_eq!(
            verdict(lost, since + Duration::from_secs(1), bound),
            Verdict::WaitUntil(since + bound)
        );
        assert_eq!(
            verdict(lost, since + bound, bound),
            Verdict::GiveUp { lost_for: bound }
        );
    }

    #[tokio::test]
    async fn abandoned_resolves_after_the_bound_unless_the_daemon_returns() {
        let bound = Duration::from_millis(300);
        let (tx, rx) = watch::channel(SessionState::Live);
        let waiter = tokio::spawn(abandoned(rx, bound));
        tx.send_replace(SessionState::Lost {
            since: Instant::now(),
        });
        tokio::time::sleep(bound / 2).await;
        // Back in time: a later loss starts the clock again.
        tx.send_replace(SessionState::Restoring);
        tx.send_replace(SessionState::Live);
        tokio::time::sleep(bound * 2).await;
        assert!(!waiter.is_finished(), "gave up on a daemon that came back");
        let lost = Instant::now();
        tx.send_replace(SessionState::Lost { since: lost });
        let reason = tokio::time::timeout(bound * 10, waiter)
            .await
            .expect("gives up after the bound")
            .expect("task");
        assert!(lost.elapsed() >= bound, "gave up early");
        assert!(reason.contains("unreachable"), "{reason}");
    }
}
