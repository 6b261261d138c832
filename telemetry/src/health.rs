//! What `/healthz` and `/readyz` answer.
//!
//! * Liveness: the endpoint runs on a thread and runtime of its own, so it still answers while
//!   the process's main runtime is stuck; a [`Heartbeat`] task on that main runtime beats every
//!   second, and `/healthz` fails once the beat is older than [`STALL_LIMIT`]: a process whose
//!   runtime no longer runs its tasks is wedged, and restarting it is the cure.
//! * Readiness: a [`ReadyCheck`] each binary supplies (caches synced, engine daemon live, ...).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long the main runtime may go without running its heartbeat before `/healthz` fails.
/// Far above any pause of a healthy process (a beat is one tiny task per second), well below the
/// chart's liveness window.
pub const STALL_LIMIT: Duration = Duration::from_secs(10);

const BEAT_EVERY: Duration = Duration::from_secs(1);

/// Whether the process can serve now: called on each `/readyz`, so it must be cheap.
pub type ReadyCheck = Arc<dyn Fn() -> bool + Send + Sync>;

/// A readiness that the process sets once something happened (caches synced, clients up).
#[derive(Clone, Default)]
pub struct ReadyFlag(Arc<AtomicBool>);

impl ReadyFlag {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Release);
    }

    pub fn get(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    /// This flag as the endpoint's readiness check.
    pub fn check(&self) -> ReadyCheck {
        let flag = self.clone();
        Arc::new(move || flag.get())
    }
}

/// The main runtime's heartbeat: the milliseconds since `origin` of its last beat.
#[derive(Clone)]
pub struct Heartbeat {
    origin: Instant,
    last_beat_ms: Arc<AtomicU64>,
}

impl Heartbeat {
    /// Starts beating on the current tokio runtime (the process's main one).
    pub fn start() -> Self {
        let heartbeat = Self {
            origin: Instant::now(),
            last_beat_ms: Arc::default(),
        };
        let beating = heartbeat.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(BEAT_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                beating.beat(Instant::now());
            }
        });
        heartbeat
    }

    fn beat(&self, now: Instant) {
        let ms = now.saturating_duration_since(self.origin).as_millis();
        self.last_beat_ms
            .store(u64::try_from(ms).unwrap_or(u64::MAX), Ordering::Release);
    }

    /// How long ago the last beat was.
    pub fn silent_for(&self, now: Instant) -> Duration {
        let last = self.origin + Duration::from_millis(self.last_beat_ms.load(Ordering::Acquire));
        now.saturating_duration_since(last)
    }

    /// What `/healthz` answers now.
    pub fn alive(&self, now: Instant) -> bool {
        alive(self.silent_for(now))
    }
}

/// Pure: alive while the heartbeat is younger than the stall limit.
pub fn alive(silent_for: Duration) -> bool {
    silent_for < STALL_LIMIT
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alive_until_the_heartbeat_is_older_than_the_limit() {
        assert!(alive(Duration::ZERO));
        assert!(alive(STALL_LIMIT - Duration::from_millis(1)));
        assert!(!alive(STALL_LIMIT));
    }

    #[tokio::test]
    async fn a_running_runtime_beats_and_a_silent_one_is_seen() {
        let heartbeat = Heartbeat::start();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = Instant::now();
        assert!(heartbeat.silent_for(now) < Duration::from_secs(2));
        assert!(heartbeat.alive(now));
        // Seen from the future: the same last beat is a stall.
        assert!(!heartbeat.alive(now + STALL_LIMIT + Duration::from_secs(1)));
    }

    #[test]
    fn a_flag_is_not_ready_until_set() {
        let flag = ReadyFlag::default();
        let check = flag.check();
        assert!(!check());
        flag.set(true);
        assert!(check());
    }
}
