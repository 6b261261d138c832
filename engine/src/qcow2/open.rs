//! Opening an engine: starting or re-attaching to the host's daemon and
//! bringing it in line with the pool's records (recovery), once at open.

use std::sync::{Arc, RwLock};

use super::engine::{Engine, Result};
use super::record::RecordStore;
use super::types::{EngineConfig, Recovery};
use super::{clone, hidden_base, reclaim, reconcile, reconnect};
use crate::lock::Locks;
use crate::qsd::daemon::{self, Origin, RuntimeDir};

impl Engine {
    /// Starts or re-attaches to the host's daemon and brings it in line with
    /// the pool's records: after a daemon restart every volume's chain and
    /// every export is added again, and interrupted work is finished. The
    /// node plugin's engine: it holds the daemon's main monitor and, while
    /// it lives, adopts work other processes (the admin CLI) left behind,
    /// and follows the daemon when it restarts: it re-attaches and brings
    /// the new daemon in line as this open does (see [`Engine::session`]).
    pub async fn open(cfg: EngineConfig) -> Result<Self> {
        let mut engine = Self::open_on(&cfg, daemon::Monitor::Main, Recovery::Full).await?;
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
    /// the daemon). It adopts nothing once open: it is short-lived.
    pub async fn open_admin(cfg: EngineConfig, recovery: Recovery) -> Result<Self> {
        Self::open_on(&cfg, daemon::Monitor::Admin, recovery).await
    }

    async fn open_on(
        cfg: &EngineConfig,
        monitor: daemon::Monitor,
        recovery: Recovery,
    ) -> Result<Self> {
        std::fs::create_dir_all(&cfg.pool)?;
        let (daemon, qmp) =
            daemon::start_or_attach_on(RuntimeDir::new(&cfg.runtime_dir), monitor).await?;
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
