//! The qcow2 backend's engine: the state every operation shares (the record
//! store, the daemon session, the per-volume locks, background work) and the
//! primitives the operations are built from. The operations themselves live
//! one per file beside this one; this file imports none of them.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde_json::{Value, json};

use super::reclaim::Reclaimer;
use super::record::{RecordStore, VolumeRecord};
use crate::error::EngineError;
use crate::lock::Locks;
use crate::qsd::daemon::Daemon;
use crate::qsd::qmp::{self, Qmp, SessionState};
use crate::stats::JobStats;
use livedisk_common::VolumeId;

/// The engine's captures in flight.
#[derive(Default)]
pub(super) struct Captures {
    /// One capture at a time per engine: a query that needs a record waits for the background
    /// capture already reading it instead of reading the same layer again.
    pub(super) running: tokio::sync::Mutex<()>,
    /// Volumes with a background capture queued or running in this process: the adopter leaves
    /// them alone instead of "recovering" them under the volume's lock.
    pending: Mutex<HashSet<VolumeId>>,
}

impl Captures {
    pub(super) fn mark(&self, id: &VolumeId, on: bool) {
        if let Ok(mut set) = self.pending.lock() {
            if on {
                set.insert(id.clone());
            } else {
                set.remove(id);
            }
        }
    }

    pub(super) fn is_pending(&self, id: &VolumeId) -> bool {
        self.pending.lock().is_ok_and(|set| set.contains(id))
    }
}

pub(super) type Result<T, E = EngineError> = std::result::Result<T, E>;

/// How long `open` waits for a volume another process holds.
pub(super) const RECOVERY_LOCK_WAIT: Duration = Duration::from_secs(60);

/// How long `open` spends recovering one volume (after its lock was taken)
/// before it reports the volume in `recovery_errors()` and goes on with the
/// rest of the pool. A merge still running then goes on in the daemon;
/// deleting its snapshot again (or reopening) finishes it. Overridable with
/// `LIVEDISK_RECOVERY_TIMEOUT_SECS`.
pub(super) const RECOVERY_VOLUME_TIMEOUT: Duration = Duration::from_secs(120);

/// Job states are re-read at least this often, so a lost event costs one
/// poll, never a hang.
pub(super) const JOB_POLL: Duration = Duration::from_secs(2);

pub(super) fn recovery_volume_timeout() -> Duration {
    std::env::var("LIVEDISK_RECOVERY_TIMEOUT_SECS")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|s| *s > 0)
        .map_or(RECOVERY_VOLUME_TIMEOUT, Duration::from_secs)
}

pub struct Engine {
    pub(super) store: RecordStore,
    /// The daemon the session is attached to: another one after the node
    /// plugin's engine re-attached to a restarted daemon (`reconnect.rs`).
    pub(super) daemon: Arc<RwLock<Daemon>>,
    pub(super) qmp: Qmp,
    pub(super) locks: Arc<Locks>,
    pub(super) reclaim: Reclaimer,
    /// Extent records being captured after snapshots (see `capture.rs`).
    pub(super) captures: Arc<Captures>,
    /// Background tasks (the flatten watcher; the adopter and the
    /// reconnector of the node plugin's engine), ended with the engine.
    pub(super) tasks: Vec<tokio::task::JoinHandle<()>>,
    pub(super) recovery_errors: Arc<Mutex<Vec<(VolumeId, String)>>>,
    /// Bytes moved by merge and flatten jobs (shared by every handle).
    pub(super) stats: Arc<JobStats>,
}

impl Drop for Engine {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

pub(super) fn node_add_args(
    pool_dir: &Path,
    rec: &VolumeRecord,
    seq: u64,
    backing: Value,
) -> Value {
    let file = pool_dir.join(VolumeRecord::layer_file(seq));
    json!({
        "driver": "qcow2",
        "node-name": rec.node_name(seq),
        // Discards from the consumer reach the image and free clusters.
        "discard": "unmap",
        "file": { "driver": "file", "filename": file, "discard": "unmap" },
        "backing": backing,
    })
}

impl Engine {
    /// Another handle on the same daemon session, pool and locks, for a
    /// background task that outlives no engine (the caller aborts it).
    pub(super) fn background_handle(&self) -> Engine {
        self.handle_on(self.qmp.clone())
    }

    /// A background handle that may use the session while it is
    /// `Restoring`: the reconnector's, and only the reconnector's.
    pub(super) fn restoring_handle(&self) -> Engine {
        self.handle_on(self.qmp.restorer())
    }

    pub(super) fn handle_on(&self, qmp: Qmp) -> Engine {
        Engine {
            store: self.store.clone(),
            daemon: self.daemon.clone(),
            qmp,
            locks: self.locks.clone(),
            reclaim: self.reclaim.clone(),
            captures: self.captures.clone(),
            tasks: vec![],
            recovery_errors: self.recovery_errors.clone(),
            stats: self.stats.clone(),
        }
    }

    pub(super) fn note_recovery_error(&self, id: &VolumeId, e: &EngineError) {
        tracing::error!(volume = %id, error = %e, "recovery failed");
        if let Ok(mut errs) = self.recovery_errors.lock() {
            errs.push((id.clone(), e.to_string()));
        }
    }

    /// Waits until the layer files of finished deletions are unlinked (they
    /// leave their volume's directory at once; see `reclaim.rs`). A process
    /// about to exit calls this so that it leaves no garbage behind.
    pub async fn reclaimed(&self) {
        self.reclaim.settled().await;
    }

    /// Volumes whose recovery failed during `open` (or during the last
    /// re-attach to a restarted daemon), with the reason. Each stays as its
    /// record says; reopening retries it.
    pub fn recovery_errors(&self) -> Vec<(VolumeId, String)> {
        self.recovery_errors
            .lock()
            .map(|e| e.clone())
            .unwrap_or_default()
    }

    /// The daemon the engine's session is attached to now.
    pub fn daemon(&self) -> Daemon {
        match self.daemon.read() {
            Ok(d) => d.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Where the engine stands with its daemon: `Live` while it can work,
    /// `Lost` while its daemon is gone (every operation fails UNAVAILABLE),
    /// `Restoring` while the node plugin's engine brings a restarted daemon
    /// in line (operations fail UNAVAILABLE until it is done).
    pub fn session(&self) -> SessionState {
        self.qmp.state()
    }

    /// Every change of [`Engine::session`] from now on.
    pub fn session_changes(&self) -> tokio::sync::watch::Receiver<SessionState> {
        self.qmp.state_changes()
    }

    /// Bytes the engine's merge and flatten jobs moved since this process opened it.
    pub fn job_stats(&self) -> &JobStats {
        &self.stats
    }

    pub fn pool(&self) -> &Path {
        self.store.pool()
    }

    /// Direct QMP access for diagnostics and tests.
    pub fn qmp(&self) -> &Qmp {
        &self.qmp
    }

    pub(super) async fn ensure_nbd_server(&self) -> Result<()> {
        let path = self.daemon().runtime.nbd_socket();
        let r = self
            .qmp
            .execute(
                "nbd-server-start",
                json!({ "addr": { "type": "unix", "data": { "path": path } } }),
            )
            .await;
        match r {
            Ok(_) => Ok(()),
            // Re-attached to a daemon whose server we started earlier.
            Err(e) if e.desc_contains("already running") => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    pub(super) fn vol_dir(&self, id: &VolumeId) -> PathBuf {
        self.store.volume_dir(id)
    }

    pub(super) fn load(&self, id: &VolumeId) -> Result<VolumeRecord> {
        self.store
            .load(id)?
            .ok_or_else(|| EngineError::NotFound(format!("volume {id}")))
    }

    pub(super) fn load_live(&self, id: &VolumeId) -> Result<VolumeRecord> {
        let rec = self.load(id)?;
        if rec.deleted {
            return Err(EngineError::NotFound(format!("volume {id}")));
        }
        Ok(rec)
    }

    /// The daemon's node names (never `query-named-block-nodes`: see
    /// [`qmp::BlockGraph`]).
    pub(super) async fn named_nodes(&self) -> Result<HashSet<String>> {
        Ok(qmp::block_graph(&self.qmp).await?.names())
    }

    pub(super) async fn export_ids(&self) -> Result<HashSet<String>> {
        let v = self.qmp.execute("query-block-exports", json!({})).await?;
        Ok(v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|n| n.get("id").and_then(Value::as_str))
            .map(str::to_owned)
            .collect())
    }

    /// The daemon's exports: id → the node each sits on.
    pub(super) async fn export_nodes(&self) -> Result<HashMap<String, String>> {
        let v = self.qmp.execute("query-block-exports", json!({})).await?;
        Ok(v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|n| {
                let id = n.get("id").and_then(Value::as_str)?;
                let node = n.get("node-name").and_then(Value::as_str)?;
                Some((id.to_owned(), node.to_owned()))
            })
            .collect())
    }

    // ----- volumes ---------------------------------------------------------

    pub(super) async fn blockdev_del(&self, node: &str) -> Result<()> {
        match self
            .qmp
            .execute("blockdev-del", json!({ "node-name": node }))
            .await
        {
            Ok(_) => Ok(()),
            // Already gone (e.g. the daemon restarted): the goal is reached.
            Err(e) if e.desc_contains("Failed to find node") => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    // ----- changed-block tracking -----------------------------------------
}

pub(super) fn remove_file_if_exists(p: &Path) -> Result<()> {
    match std::fs::remove_file(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e.into()),
    }
}
