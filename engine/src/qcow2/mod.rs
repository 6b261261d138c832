//! The qcow2 chain backend: a volume is a chain of qcow2 layers
//! (`base <- snap-A <- snap-B <- active`) held by the host's
//! qemu-storage-daemon and driven over QMP.
//!
//! Every mutating operation follows the same shape: take the volume's lock,
//! load its record, decide with pure functions (`plan`), do the QMP work,
//! then persist the new record atomically. The record is written *before*
//! work that recovery must be able to finish (in-flight merges) and *after*
//! work that is harmless to lose (a layer file nobody references yet).

pub mod bitmap;
mod capture;
pub mod clone;
mod export;
mod merge;
pub mod plan;
pub mod qemu_img;
mod reclaim;
mod reconcile;
mod reconnect;
pub mod record;
pub mod recover;
mod revert;
mod snapshot;
mod writeback;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Value, json};

pub use crate::error::{Code, EngineError};
pub use crate::extents::{self, Extent};
pub use crate::failpoint;
pub use crate::lock::{self, Locks, VolumeGuard};
pub use crate::qsd::daemon::{self, Daemon, Monitor, Origin, RuntimeDir};
pub use crate::qsd::nbd_client;
pub use crate::qsd::qmp::{self, JobInfo, Qmp, QmpError, SessionState};
use clone::flatten_job_id;
pub use livedisk_common::ids;
pub use livedisk_common::{SnapshotId, VolumeId};
pub use record::MergeMode;
use record::{
    ExportRecord, ExportTarget, InFlight, MergePhase, PendingSnapshot, RecordStore, SnapshotRecord,
    SnapshotState, VolumeRecord,
};
use recover::{CompletingEvidence, CompletingResolution, SnapshotEvidence, SnapshotResolution};

type Result<T, E = EngineError> = std::result::Result<T, E>;

/// How long `open` waits for a volume another process holds.
const RECOVERY_LOCK_WAIT: Duration = Duration::from_secs(60);

/// How long `open` spends recovering one volume (after its lock was taken)
/// before it reports the volume in `recovery_errors()` and goes on with the
/// rest of the pool. A merge still running then goes on in the daemon;
/// deleting its snapshot again (or reopening) finishes it. Overridable with
/// `LIVEDISK_RECOVERY_TIMEOUT_SECS`.
const RECOVERY_VOLUME_TIMEOUT: Duration = Duration::from_secs(120);

/// Job states are re-read at least this often, so a lost event costs one
/// poll, never a hang.
const JOB_POLL: Duration = Duration::from_secs(2);

fn recovery_volume_timeout() -> Duration {
    std::env::var("LIVEDISK_RECOVERY_TIMEOUT_SECS")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|s| *s > 0)
        .map_or(RECOVERY_VOLUME_TIMEOUT, Duration::from_secs)
}

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Pool directory holding one sub-directory per volume.
    pub pool: PathBuf,
    /// Runtime directory of the host's daemon (QMP and NBD sockets, pid file).
    pub runtime_dir: PathBuf,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct VolumeInfo {
    pub id: VolumeId,
    pub size: u64,
    pub deleted: bool,
    pub layers: usize,
    pub snapshots: usize,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub id: SnapshotId,
    pub volume: VolumeId,
    pub created: DateTime<Utc>,
    pub size: u64,
    pub ready: bool,
}

/// Where to reach an NBD export of the daemon.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ExportInfo {
    pub name: String,
    pub socket: PathBuf,
    pub writable: bool,
    /// The NBD metadata context with the changed blocks
    /// (`qemu:dirty-bitmap:changed-since-<base>`), for a snapshot exported
    /// changed since a base.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dirty_bitmap: Option<String>,
}

impl ExportInfo {
    /// NBD URI understood by `nbdinfo`, `qemu-img` and `nbdfuse`.
    pub fn uri(&self) -> String {
        format!("nbd+unix:///{}?socket={}", self.name, self.socket.display())
    }
}

/// One page of a changed/allocated-block query.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ExtentPage {
    pub volume_size: u64,
    pub extents: Vec<Extent>,
}

/// The whole answer of a changed/allocated-block query, computed once: a
/// stream of pages reads from it instead of asking the engine again per page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtentList {
    pub volume_size: u64,
    /// Ascending, non-overlapping, coalesced.
    pub extents: Vec<Extent>,
}

impl ExtentList {
    /// The extents ending after `start` (the first clipped to it), at most
    /// `max` (at least one).
    pub fn page(&self, start: u64, max: usize) -> ExtentPage {
        ExtentPage {
            volume_size: self.volume_size,
            extents: extents::page(&self.extents, start, max.max(1)),
        }
    }
}

/// Timings of a snapshot call, for the benchmark and the logs.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct SnapshotTimings {
    /// The QMP transaction alone: the only moment writes are held.
    pub transaction: Duration,
    /// The whole call, including overlay creation and extent capture.
    pub total: Duration,
}

/// How to merge a snapshot's layer away.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MergeOptions {
    pub mode: MergeMode,
    /// Bytes per second; `None` or 0: unlimited.
    pub speed: Option<u64>,
}

pub struct Engine {
    store: RecordStore,
    /// The daemon the session is attached to: another one after the node
    /// plugin's engine re-attached to a restarted daemon (`reconnect.rs`).
    daemon: Arc<RwLock<Daemon>>,
    qmp: Qmp,
    locks: Arc<Locks>,
    reclaim: reclaim::Reclaimer,
    /// Extent records being captured after snapshots (see `capture.rs`).
    captures: Arc<capture::Captures>,
    /// Background tasks (the flatten watcher; the adopter and the
    /// reconnector of the node plugin's engine), ended with the engine.
    tasks: Vec<tokio::task::JoinHandle<()>>,
    recovery_errors: Arc<Mutex<Vec<(VolumeId, String)>>>,
}

impl Drop for Engine {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// How much recovery an engine does when it opens (see `reconcile.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// Every volume, waiting (bounded) for one another process holds, and
    /// every interrupted merge finished: restarted if its job is gone, and
    /// waited for. The node plugin's open, `admin start`, and any open that
    /// started the daemon (which then holds no volume at all).
    Full,
    /// Only volumes that show unfinished work and that no one holds: held
    /// ones are being worked on by a live process. Merges whose job ended
    /// are finished; a running merge is left to its job, and one whose job
    /// is gone (cancelled, or its starter died before starting it) waits
    /// for its snapshot to be deleted again. What the admin CLI does beside
    /// a running node plugin, and what the node plugin's adopter does.
    Light,
}

fn node_add_args(pool_dir: &Path, rec: &VolumeRecord, seq: u64, backing: Value) -> Value {
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
        let flatten_watcher =
            clone::spawn_flatten_watcher(store.clone(), qmp.clone(), locks.clone());
        let reclaim = reclaim::Reclaimer::new(&cfg.pool);
        reclaim.sweep_leftovers();
        let engine = Engine {
            store,
            daemon: Arc::new(RwLock::new(daemon)),
            qmp,
            locks,
            reclaim,
            captures: Arc::default(),
            tasks: vec![flatten_watcher],
            recovery_errors: Arc::default(),
        };
        engine.bring_in_line(recovery).await?;
        Ok(engine)
    }

    /// Makes the daemon hold what the records describe and finishes or
    /// undoes interrupted work, as much as `recovery` says: what `open`
    /// does once attached, and what the node plugin's engine does again
    /// after it re-attached to a restarted daemon.
    async fn bring_in_line(&self, recovery: Recovery) -> Result<()> {
        if let Ok(mut errs) = self.recovery_errors.lock() {
            errs.clear();
        }
        self.ensure_nbd_server().await?;
        match recovery {
            Recovery::Full => self.recover_all().await?,
            Recovery::Light => {
                for (id, e) in self.recover_idle().await? {
                    self.note_recovery_error(&id, &e);
                }
            }
        }
        self.dismiss_stale_jobs().await
    }

    /// Another handle on the same daemon session, pool and locks, for a
    /// background task that outlives no engine (the caller aborts it).
    fn background_handle(&self) -> Engine {
        self.handle_on(self.qmp.clone())
    }

    /// A background handle that may use the session while it is
    /// `Restoring`: the reconnector's, and only the reconnector's.
    fn restoring_handle(&self) -> Engine {
        self.handle_on(self.qmp.restorer())
    }

    fn handle_on(&self, qmp: Qmp) -> Engine {
        Engine {
            store: self.store.clone(),
            daemon: self.daemon.clone(),
            qmp,
            locks: self.locks.clone(),
            reclaim: self.reclaim.clone(),
            captures: self.captures.clone(),
            tasks: vec![],
            recovery_errors: self.recovery_errors.clone(),
        }
    }

    fn note_recovery_error(&self, id: &VolumeId, e: &EngineError) {
        tracing::error!(volume = %id, error = %e, "recovery failed");
        if let Ok(mut errs) = self.recovery_errors.lock() {
            errs.push((id.clone(), e.to_string()));
        }
    }

    /// Volume ids, sources before clones: a clone's bottom layer backs onto
    /// a node of its source volume, which must exist first.
    fn ids_sources_first(&self) -> Result<Vec<VolumeId>> {
        let mut ids = vec![];
        let mut clones = vec![];
        for id in self.store.list()? {
            match self.store.load(&id)? {
                Some(r) if r.clone_of.is_some() => clones.push(id),
                _ => ids.push(id),
            }
        }
        ids.extend(clones);
        Ok(ids)
    }

    /// `Recovery::Full` of every volume.
    async fn recover_all(&self) -> Result<()> {
        // Every wait below is bounded: the lock by RECOVERY_LOCK_WAIT, the
        // recovery itself by the per-volume timeout.
        let limit = recovery_volume_timeout();
        for id in &self.ids_sources_first()? {
            let r = match self.locks.lock_waiting(id, RECOVERY_LOCK_WAIT).await {
                Ok(_guard) => {
                    match tokio::time::timeout(limit, self.reconcile_with(id, Recovery::Full)).await
                    {
                        Ok(r) => r,
                        // Reported as busy: what outlasts the bound is a merge
                        // job still running in the daemon.
                        Err(_) => Err(EngineError::Busy(format!(
                            "volume {id} (recovery did not finish within {limit:?}; a merge may \
                         still be running: deleting its snapshot again or reopening finishes it)"
                        ))),
                    }
                }
                Err(e) => Err(e),
            };
            match r {
                Ok(()) => {}
                // Without the daemon nothing can be recovered: give up.
                Err(e) if e.code() == Code::Unavailable => return Err(e),
                // One volume that cannot be recovered must not keep every
                // other volume of the host offline; it is reported instead.
                Err(e) => self.note_recovery_error(id, &e),
            }
        }
        Ok(())
    }

    /// Dismisses finished jobs of ours that no record waits for any more
    /// (the record was saved, then the process died before dismissing).
    async fn dismiss_stale_jobs(&self) -> Result<()> {
        // Jobs first, records after: every job's record names it before the
        // job starts, and stops naming it only when its finisher is about to
        // dismiss it. Read the other way round, a job another process
        // started after the records were read would look stale.
        let jobs = qmp::query_jobs(&self.qmp).await?;
        let mut wanted = HashSet::new();
        for id in self.store.list()? {
            if let Some(r) = self.store.load(&id)? {
                if let Some(InFlight::Merge { job, .. }) = &r.in_flight {
                    wanted.insert(job.clone());
                }
                if r.clone_of.is_some() {
                    wanted.insert(flatten_job_id(&r.id));
                }
            }
        }
        for j in jobs {
            if j.status == "concluded" && !wanted.contains(&j.id) {
                let _ = self.qmp.execute("job-dismiss", json!({ "id": j.id })).await;
            }
        }
        Ok(())
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

    pub fn pool(&self) -> &Path {
        self.store.pool()
    }

    /// Direct QMP access for diagnostics and tests.
    pub fn qmp(&self) -> &Qmp {
        &self.qmp
    }

    async fn ensure_nbd_server(&self) -> Result<()> {
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

    fn vol_dir(&self, id: &VolumeId) -> PathBuf {
        self.store.volume_dir(id)
    }

    fn load(&self, id: &VolumeId) -> Result<VolumeRecord> {
        self.store
            .load(id)?
            .ok_or_else(|| EngineError::NotFound(format!("volume {id}")))
    }

    fn load_live(&self, id: &VolumeId) -> Result<VolumeRecord> {
        let rec = self.load(id)?;
        if rec.deleted {
            return Err(EngineError::NotFound(format!("volume {id}")));
        }
        Ok(rec)
    }

    /// The daemon's block nodes as `query-named-block-nodes` (flat) lists
    /// them.
    async fn block_nodes(&self) -> Result<Vec<Value>> {
        let v = self
            .qmp
            .execute("query-named-block-nodes", json!({ "flat": true }))
            .await?;
        Ok(match v {
            Value::Array(nodes) => nodes,
            _ => vec![],
        })
    }

    async fn named_nodes(&self) -> Result<HashSet<String>> {
        Ok(self
            .block_nodes()
            .await?
            .iter()
            .filter_map(|n| n.get("node-name").and_then(Value::as_str))
            .map(str::to_owned)
            .collect())
    }

    async fn export_ids(&self) -> Result<HashSet<String>> {
        let v = self.qmp.execute("query-block-exports", json!({})).await?;
        Ok(v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|n| n.get("id").and_then(Value::as_str))
            .map(str::to_owned)
            .collect())
    }

    // ----- volumes ---------------------------------------------------------

    /// Creates an empty volume. Idempotent for the same size.
    pub async fn create_volume(&self, id: &VolumeId, size: u64) -> Result<VolumeInfo> {
        if size == 0 {
            return Err(EngineError::InvalidArgument("size must be > 0".into()));
        }
        // qcow2 sizes are whole sectors; round up so the caller gets at least
        // what was asked for.
        let size = size.div_ceil(512) * 512;
        let _g = self.locks.try_lock(id)?;
        if let Some(rec) = self.store.load(id)? {
            if rec.size == size && !rec.deleted {
                return Ok(info(&rec));
            }
            return Err(EngineError::AlreadyExists(format!("volume {id}")));
        }
        let dir = self.vol_dir(id);
        std::fs::create_dir_all(&dir)?;
        let rec = VolumeRecord::new(id.clone(), size);
        qemu_img::create(&dir.join(VolumeRecord::layer_file(0)), size, None).await?;
        self.store.save(&rec)?;
        self.qmp
            .execute("blockdev-add", node_add_args(&dir, &rec, 0, Value::Null))
            .await?;
        Ok(info(&rec))
    }

    pub fn list_volumes(&self) -> Result<Vec<VolumeInfo>> {
        let mut out = vec![];
        for id in self.store.list()? {
            if let Some(rec) = self.store.load(&id)? {
                out.push(info(&rec));
            }
        }
        Ok(out)
    }

    pub fn volume(&self, id: &VolumeId) -> Result<VolumeInfo> {
        Ok(info(&self.load_live(id)?))
    }

    /// The volume's record, for the admin CLI and tests.
    pub fn record(&self, id: &VolumeId) -> Result<VolumeRecord> {
        self.load(id)
    }

    /// Path of a layer file (admin/diagnostics).
    pub fn layer_path(&self, id: &VolumeId, seq: u64) -> PathBuf {
        self.vol_dir(id).join(VolumeRecord::layer_file(seq))
    }

    /// Deletes a volume. Its snapshots, if any, live on and stay restorable;
    /// only the active layer goes.
    pub async fn delete_volume(&self, id: &VolumeId) -> Result<()> {
        let _g = self.locks.try_lock(id)?;
        let mut rec = self.settled(self.load_live(id)?).await?;
        if rec.exports.iter().any(|e| e.target == ExportTarget::Volume) {
            return Err(EngineError::FailedPrecondition(format!(
                "volume {id} is attached; detach it first"
            )));
        }
        if rec.in_flight.is_some() {
            return Err(EngineError::Busy(format!("volume {id} (merge in flight)")));
        }
        if rec.snapshots.is_empty() {
            // Nothing of the clone lives on: its flatten is pointless (and
            // its job holds the bottom node). With snapshots kept it goes on.
            if rec.clone_of.is_some() {
                self.stop_flatten(&rec).await?;
            }
            for l in rec.layers.iter().rev() {
                self.blockdev_del(&rec.node_name(l.seq)).await?;
            }
            self.store.remove(id)?;
            return Ok(());
        }
        if rec.active().is_none() {
            return Err(EngineError::NotFound(format!("volume {id}")));
        }
        rec.deleted = true;
        // The active layer goes, and with it any internal layers (sealed by
        // nobody) under it: no snapshot's view reaches them.
        let mut gone = vec![];
        while let Some(l) = rec.layers.last()
            && l.sealed_by.is_none()
        {
            gone.push(l.seq);
            rec.layers.pop();
        }
        rec.inherited.clear();
        // Record first: a crash after this leaves at worst an orphan file.
        self.store.save(&rec)?;
        for seq in gone {
            self.blockdev_del(&rec.node_name(seq)).await?;
            self.reclaim
                .file(&self.vol_dir(id).join(VolumeRecord::layer_file(seq)))?;
        }
        Ok(())
    }

    /// Grows a volume. Shrinking is refused: it would destroy data.
    pub async fn expand_volume(&self, id: &VolumeId, new_size: u64) -> Result<VolumeInfo> {
        let _g = self.locks.try_lock(id)?;
        let mut rec = self.settled(self.load_live(id)?).await?;
        let new_size = new_size.div_ceil(512) * 512;
        if new_size < rec.size {
            return Err(EngineError::OutOfRange(format!(
                "volume {id} is {} bytes; cannot shrink to {new_size}",
                rec.size
            )));
        }
        if new_size == rec.size {
            return Ok(info(&rec));
        }
        if rec.exports.iter().any(|e| e.target == ExportTarget::Volume) {
            // QEMU 7.2 NBD exports forbid resizing their node.
            return Err(EngineError::FailedPrecondition(format!(
                "volume {id} is attached; QEMU 7.2 cannot resize a node under an NBD export"
            )));
        }
        let active = rec
            .active()
            .ok_or_else(|| EngineError::NotFound(format!("volume {id}")))?;
        self.qmp
            .execute(
                "block_resize",
                json!({ "node-name": rec.node_name(active.seq), "size": new_size }),
            )
            .await?;
        rec.size = new_size;
        self.store.save(&rec)?;
        Ok(info(&rec))
    }

    async fn blockdev_del(&self, node: &str) -> Result<()> {
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

    /// Allocated extents of a snapshot, from the durable records only (a
    /// record still being captured is waited for).
    pub async fn allocated_extents(&self, snap: &SnapshotId) -> Result<ExtentList> {
        let rec = self.locate_captured(snap).await?;
        Ok(ExtentList {
            volume_size: rec.size,
            extents: plan::allocated(&rec, snap)?,
        })
    }

    /// Extents changed after `base` up to `target` (same volume only), from
    /// the durable records only.
    pub async fn changed_extents(
        &self,
        base: &SnapshotId,
        target: &SnapshotId,
    ) -> Result<ExtentList> {
        let rec = self.locate_captured(target).await?;
        Ok(ExtentList {
            volume_size: rec.size,
            extents: self.delta_list(&rec, base, target)?,
        })
    }

    /// One page of [`Engine::allocated_extents`].
    pub async fn allocated(&self, snap: &SnapshotId, start: u64, max: usize) -> Result<ExtentPage> {
        Ok(self.allocated_extents(snap).await?.page(start, max))
    }

    /// One page of [`Engine::changed_extents`].
    pub async fn delta(
        &self,
        base: &SnapshotId,
        target: &SnapshotId,
        start: u64,
        max: usize,
    ) -> Result<ExtentPage> {
        Ok(self.changed_extents(base, target).await?.page(start, max))
    }

    /// The whole list of extents changed after `base` up to `target` of the
    /// volume `rec`; a base of another volume is named in the error.
    pub(super) fn delta_list(
        &self,
        rec: &VolumeRecord,
        base: &SnapshotId,
        target: &SnapshotId,
    ) -> Result<Vec<Extent>> {
        if rec.snapshot(base).is_none() {
            return Err(match self.locate(base) {
                Ok(other) => EngineError::InvalidArgument(format!(
                    "base snapshot {base} belongs to volume {}, not to {}",
                    other.id, rec.id
                )),
                Err(e) => e,
            });
        }
        Ok(plan::delta(rec, base, target)?)
    }
}

fn remove_file_if_exists(p: &Path) -> Result<()> {
    match std::fs::remove_file(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn info(rec: &VolumeRecord) -> VolumeInfo {
    VolumeInfo {
        id: rec.id.clone(),
        size: rec.size,
        deleted: rec.deleted,
        layers: rec.layers.len(),
        snapshots: rec.snapshots.len(),
    }
}

fn snap_info(rec: &VolumeRecord, s: &SnapshotRecord) -> SnapshotInfo {
    SnapshotInfo {
        id: s.id.clone(),
        volume: rec.id.clone(),
        created: s.created,
        size: s.size,
        // Restorable from the instant its layer is sealed; its extent record
        // may still be on its way (changed-block queries wait for it).
        ready: s.state == SnapshotState::Ready,
    }
}
