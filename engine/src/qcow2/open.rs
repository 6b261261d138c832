//! Opening an engine: starting or re-attaching to the host's daemon and
//! bringing it in line with the pool's records (recovery), once at open.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use super::engine::{Engine, Result};
use super::record::RecordStore;
use super::types::{EngineConfig, Recovery};
use super::{clone, hidden_base, reclaim, reconcile, reconnect};
use crate::error::EngineError;
use crate::lock::Locks;
use crate::qsd::daemon::{self, DaemonError, DaemonPolicy, Origin, RuntimeDir};

/// How often an attach-only engine looks for its daemon again, and how often it says it waits.
const ATTACH_RETRY: Duration = Duration::from_millis(500);
const ATTACH_WAIT_LOG: Duration = Duration::from_secs(30);

impl Engine {
    /// Starts or re-attaches to the host's daemon and brings it in line with
    /// the pool's records: after a daemon restart every volume's chain and
    /// every export is added again, and interrupted work is finished. The
    /// node plugin's engine: it holds the daemon's main monitor and, while
    /// it lives, adopts work other processes (the admin CLI) left behind,
    /// and follows the daemon when it restarts: it re-attaches and brings
    /// the new daemon in line as this open does (see [`Engine::session`]).
    pub async fn open(cfg: EngineConfig) -> Result<Self> {
        Self::open_with(cfg, DaemonPolicy::StartWhenAbsent).await
    }

    /// [`Engine::open`] with a say on who starts the daemon. `AttachOnly` waits, as long as it
    /// takes, for the daemon's owner (the engine pod) to start it: in the chart both pods start
    /// together and the node plugin may come first.
    pub async fn open_with(cfg: EngineConfig, policy: DaemonPolicy) -> Result<Self> {
        let mut engine = Self::open_on(&cfg, daemon::Monitor::Main, Recovery::Full, policy).await?;
        let adopter = reconcile::spawn_adopter(engine.background_handle());
        let reconnector = reconnect::spawn_reconnector(engine.restoring_handle());
        engine.tasks.extend([adopter, reconnector]);
        Ok(engine)
    }

    /// An engine for the admin CLI, on the daemon's admin monitor, so that it
    /// works beside a running node plugin. It never starts a daemon while one
    /// runs (it starts one only when none does, as `open` would). Per-volume
    /// locks keep it and the node plugin off each other's volumes;
    /// `recovery` says how much it recovers (always `Full` when it started
    /// the daemon, and `policy` allows it). It adopts nothing once open: it is short-lived, and
    /// with `AttachOnly` it fails at once when no daemon runs rather than waiting.
    pub async fn open_admin(
        cfg: EngineConfig,
        recovery: Recovery,
        policy: DaemonPolicy,
    ) -> Result<Self> {
        Self::open_on(&cfg, daemon::Monitor::Admin, recovery, policy).await
    }

    async fn open_on(
        cfg: &EngineConfig,
        monitor: daemon::Monitor,
        recovery: Recovery,
        policy: DaemonPolicy,
    ) -> Result<Self> {
        std::fs::create_dir_all(&cfg.pool)?;
        let (daemon, qmp) =
            attach_or_start(RuntimeDir::new(&cfg.runtime_dir), monitor, policy).await?;
        // A daemon started just now holds no volume: rebuild it all.
        let recovery = if daemon.origin == Origin::Started {
            Recovery::Full
        } else {
            recovery
        };
        let store = RecordStore::new(&cfg.pool);
        let locks = Arc::new(Locks::new(cfg.runtime_dir.join("locks")));
        let reclaim = reclaim::Reclaimer::new(&cfg.pool);
        reclaim.sweep_leftovers();
        let mut engine = Engine {
            store,
            daemon: Arc::new(RwLock::new(daemon)),
            qmp,
            locks,
            reclaim,
            captures: Arc::default(),
            tasks: vec![],
            recovery_errors: Arc::default(),
            stats: Arc::default(),
        };
        let (releases, releaser) = hidden_base::spawn_releaser(engine.background_handle());
        let flatten_watcher = clone::spawn_flatten_watcher(engine.background_handle(), releases);
        engine.tasks.extend([flatten_watcher, releaser]);
        engine.bring_in_line(recovery).await?;
        Ok(engine)
    }
}

/// The daemon session of an opening engine. On the main monitor an attach-only engine waits for
/// the daemon to appear; everything else answers at once.
async fn attach_or_start(
    runtime: RuntimeDir,
    monitor: daemon::Monitor,
    policy: DaemonPolicy,
) -> Result<(daemon::Daemon, crate::qsd::qmp::Qmp)> {
    let waits = policy == DaemonPolicy::AttachOnly && monitor == daemon::Monitor::Main;
    let started = Instant::now();
    let mut last_log: Option<Instant> = None;
    loop {
        match daemon::start_or_attach_on(runtime.clone(), monitor, policy).await {
            Err(DaemonError::NotRunning(socket)) if waits => {
                if last_log.is_none_or(|t| t.elapsed() >= ATTACH_WAIT_LOG) {
                    tracing::info!(
                        socket = %socket.display(),
                        waited_seconds = started.elapsed().as_secs(),
                        "waiting for the engine daemon (started by the engine pod) to listen"
                    );
                    last_log = Some(Instant::now());
                }
                tokio::time::sleep(ATTACH_RETRY).await;
            }
            other => return other.map_err(EngineError::from),
        }
    }
}
