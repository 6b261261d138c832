//! The node plugin's engine follows its daemon across restarts.
//!
//! When the daemon dies (or closes the main monitor), the QMP reader meets
//! the end of its stream and the session is `Lost`: every operation fails
//! UNAVAILABLE. The reconnector then re-attaches to the daemon whoever owns
//! it restarts (the engine DaemonSet; `admin start` under hack/driver.sh),
//! never starting one itself, and brings it in line exactly as
//! `Engine::open` does (`bring_in_line`, `Recovery::Full`: chains and
//! exports re-added, interrupted work finished) while the session is
//! `Restoring` and holds every other caller back. Only then is the session
//! `Live` again.
//!
//! How long a daemon may stay away is not the engine's call: the node
//! plugin watches [`Engine::session`] and exits after its own bound, so that
//! it is restarted and opens afresh (see `csi-driver/src/node/engine_health.rs`).

use std::time::{Duration, Instant};

use super::engine::Engine;
use super::types::Recovery;
use crate::qsd::daemon::{self};
use crate::qsd::qmp::SessionState;

/// Between attempts to reach a restarted daemon: it listens within a moment
/// of being started.
const REATTACH_RETRY: Duration = Duration::from_millis(500);

/// Between attempts to bring a re-attached daemon in line after one failed
/// (e.g. `nbd-server-start` refused): the daemon is there, so is the pool.
const RESTORE_RETRY: Duration = Duration::from_secs(2);

/// The reconnector: waits for the session to be lost, re-attaches, restores.
/// `engine` is a restoring handle (`Engine::restoring_handle`).
pub(super) fn spawn_reconnector(engine: Engine) -> tokio::task::JoinHandle<()> {
    let mut states = engine.qmp.state_changes();
    tokio::spawn(async move {
        loop {
            // Err: the session is gone with its engine; this task is aborted.
            if states
                .wait_for(|s| matches!(s, SessionState::Lost { .. }))
                .await
                .is_err()
            {
                return;
            }
            tracing::warn!(
                "lost the engine daemon's QMP session; waiting for the daemon to return"
            );
            engine.reattach().await;
            engine.restore().await;
        }
    })
}

impl Engine {
    /// Re-attaches the lost session to the daemon running now; retries until
    /// one listens.
    async fn reattach(&self) {
        let runtime = self.daemon().runtime;
        let mut said: Option<Instant> = None;
        loop {
            match daemon::reattach(&runtime, daemon::Monitor::Main, &self.qmp).await {
                Ok(d) => {
                    match self.daemon.write() {
                        Ok(mut slot) => *slot = d,
                        Err(poisoned) => *poisoned.into_inner() = d,
                    }
                    return;
                }
                Err(e) => {
                    // Once a minute at most: the node plugin's Probe says the rest.
                    if said.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                        tracing::info!(error = %e, "engine daemon not reachable yet");
                        said = Some(Instant::now());
                    }
                }
            }
            tokio::time::sleep(REATTACH_RETRY).await;
        }
    }

    /// Brings the re-attached daemon in line with the records, then opens
    /// the session to every caller. Returns early if the session is lost
    /// again meanwhile (the reconnector then starts over).
    async fn restore(&self) {
        let started = Instant::now();
        loop {
            match self.bring_in_line(Recovery::Full).await {
                Ok(()) => {
                    self.qmp.finish_restoring();
                    let failed = self.recovery_errors().len();
                    tracing::info!(
                        elapsed = ?started.elapsed(),
                        failed,
                        "engine daemon back in line with the records"
                    );
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "bringing the re-attached daemon in line failed")
                }
            }
            if matches!(self.qmp.state(), SessionState::Lost { .. }) {
                return;
            }
            tokio::time::sleep(RESTORE_RETRY).await;
        }
    }
}
