//! The node engine: owns the volumes of one pool on this host by driving the
//! host's qemu-storage-daemon over QMP.
//!
//! Every mutating operation follows the same shape: take the volume's lock,
//! load its record, decide with pure functions (`plan`), do the QMP work,
//! then persist the new record atomically. The record is written *before*
//! work that recovery must be able to finish (in-flight merges) and *after*
//! work that is harmless to lose (a layer file nobody references yet).

pub mod clone;
pub mod daemon;
pub mod error;
pub mod extents;
pub mod failpoint;
pub mod ids;
pub mod plan;
pub mod qemu_img;
pub mod qmp;
pub mod record;
pub mod recover;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::OwnedMutexGuard;

use clone::flatten_job_id;
pub use daemon::{Daemon, Origin, RuntimeDir};
pub use error::{Code, EngineError};
pub use extents::Extent;
pub use ids::{SnapshotId, VolumeId};
pub use qmp::JobInfo;
use qmp::{Qmp, QmpError};
pub use record::MergeMode;
use record::{
    ExportRecord, ExportTarget, InFlight, MergePhase, PendingSnapshot, RecordStore, SnapshotRecord,
    SnapshotState, VolumeRecord,
};
use recover::{CompletingEvidence, CompletingResolution, SnapshotEvidence, SnapshotResolution};

type Result<T, E = EngineError> = std::result::Result<T, E>;

/// Merges can take long on big layers; this only guards against a lost event.
const JOB_TIMEOUT: Duration = Duration::from_secs(6 * 3600);

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

/// Per-volume locks. The map lock is held only to find or insert a volume's
/// lock, never across an operation: there is no global operation lock.
#[derive(Default)]
struct Locks(Mutex<HashMap<VolumeId, Arc<tokio::sync::Mutex<()>>>>);

impl Locks {
    fn try_lock(&self, id: &VolumeId) -> Result<OwnedMutexGuard<()>> {
        let m = {
            let mut map = self
                .0
                .lock()
                .map_err(|_| EngineError::Busy("lock table poisoned".into()))?;
            map.entry(id.clone()).or_default().clone()
        };
        m.try_lock_owned()
            .map_err(|_| EngineError::Busy(id.to_string()))
    }
}

pub struct Engine {
    store: RecordStore,
    daemon: Daemon,
    qmp: Qmp,
    locks: Arc<Locks>,
    flatten_watcher: tokio::task::JoinHandle<()>,
    recovery_errors: Mutex<Vec<(VolumeId, String)>>,
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.flatten_watcher.abort();
    }
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
    /// every export is added again, and interrupted work is finished.
    pub async fn open(cfg: EngineConfig) -> Result<Self> {
        std::fs::create_dir_all(&cfg.pool)?;
        let (daemon, qmp) = daemon::start_or_attach(RuntimeDir::new(&cfg.runtime_dir)).await?;
        let store = RecordStore::new(&cfg.pool);
        let locks = Arc::new(Locks::default());
        let flatten_watcher =
            clone::spawn_flatten_watcher(store.clone(), qmp.clone(), locks.clone());
        let engine = Engine {
            store,
            daemon,
            qmp,
            locks,
            flatten_watcher,
            recovery_errors: Mutex::default(),
        };
        engine.ensure_nbd_server().await?;
        // Sources before clones: a clone's bottom layer backs onto a node
        // of its source volume, which must exist first.
        let mut ids = vec![];
        let mut clones = vec![];
        for id in engine.store.list()? {
            match engine.store.load(&id)? {
                Some(r) if r.clone_of.is_some() => clones.push(id),
                _ => ids.push(id),
            }
        }
        ids.extend(clones);
        for id in &ids {
            let _guard = engine.locks.try_lock(id)?;
            match engine.reconcile(id).await {
                Ok(()) => {}
                // Without the daemon nothing can be recovered: give up.
                Err(e) if e.code() == Code::Unavailable => return Err(e),
                // One volume that cannot be recovered must not keep every
                // other volume of the host offline; it is reported instead.
                Err(e) => {
                    tracing::error!(volume = %id, error = %e, "recovery failed");
                    if let Ok(mut errs) = engine.recovery_errors.lock() {
                        errs.push((id.clone(), e.to_string()));
                    }
                }
            }
        }
        engine.dismiss_stale_jobs().await?;
        Ok(engine)
    }

    /// Dismisses finished jobs of ours that no record waits for any more
    /// (the record was saved, then the process died before dismissing).
    async fn dismiss_stale_jobs(&self) -> Result<()> {
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
        for j in qmp::query_jobs(&self.qmp).await? {
            if j.status == "concluded" && !wanted.contains(&j.id) {
                let _ = self.qmp.execute("job-dismiss", json!({ "id": j.id })).await;
            }
        }
        Ok(())
    }

    /// Volumes whose recovery failed during `open`, with the reason. Each
    /// stays as its record says; reopening retries it.
    pub fn recovery_errors(&self) -> Vec<(VolumeId, String)> {
        self.recovery_errors
            .lock()
            .map(|e| e.clone())
            .unwrap_or_default()
    }

    pub fn daemon(&self) -> &Daemon {
        &self.daemon
    }

    pub fn pool(&self) -> &Path {
        self.store.pool()
    }

    /// Direct QMP access for diagnostics and tests.
    pub fn qmp(&self) -> &Qmp {
        &self.qmp
    }

    async fn ensure_nbd_server(&self) -> Result<()> {
        let path = self.daemon.runtime.nbd_socket();
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

    async fn named_nodes(&self) -> Result<HashSet<String>> {
        let v = self
            .qmp
            .execute("query-named-block-nodes", json!({ "flat": true }))
            .await?;
        Ok(v.as_array()
            .into_iter()
            .flatten()
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

    /// Node name -> `backing_file_depth` of every named node in the daemon.
    /// Not `flat`: QEMU 7.2 reports depth 0 for every node in flat mode.
    async fn node_depths(&self) -> Result<HashMap<String, u64>> {
        let v = self
            .qmp
            .execute("query-named-block-nodes", json!({ "flat": false }))
            .await?;
        Ok(v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|n| {
                let name = n.get("node-name").and_then(Value::as_str)?;
                let depth = n
                    .get("backing_file_depth")
                    .and_then(Value::as_u64)
                    .unwrap_or(0);
                Some((name.to_owned(), depth))
            })
            .collect())
    }

    /// Layer files of the chain a layer's view is read from, base first,
    /// including a clone's source layers: for offline recovery decisions.
    fn chain_files(&self, rec: &VolumeRecord, upto: usize) -> Result<Vec<PathBuf>> {
        let mut out = vec![];
        if let Some(src) = &rec.clone_of {
            let srec = self.load(&src.volume)?;
            let si = srec
                .layers
                .iter()
                .position(|l| l.seq == src.layer)
                .ok_or_else(|| {
                    EngineError::FailedPrecondition(format!(
                        "clone {} lost its source layer {} of {}",
                        rec.id, src.layer, src.volume
                    ))
                })?;
            out = self.chain_files(&srec, si)?;
        }
        let dir = self.vol_dir(&rec.id);
        out.extend(
            rec.layers[..=upto.min(rec.layers.len().saturating_sub(1))]
                .iter()
                .map(|l| dir.join(VolumeRecord::layer_file(l.seq))),
        );
        Ok(out)
    }

    /// Decides an interrupted snapshot (see `recover::resolve_snapshot`).
    async fn resolve_pending_snapshot(&self, id: &VolumeId) -> Result<()> {
        let rec = self.load(id)?;
        let Some(p) = rec.pending_snapshot.clone() else {
            return Ok(());
        };
        let depths = self.node_depths().await?;
        let overlay_file = self.vol_dir(id).join(VolumeRecord::layer_file(p.overlay));
        let has_volume = rec
            .active()
            .is_some_and(|a| depths.contains_key(&rec.node_name(a.seq)));
        let evidence = if has_volume {
            SnapshotEvidence::DaemonHasVolume {
                overlay_backed: depths.get(&rec.node_name(p.overlay)).map(|d| *d > 0),
            }
        } else {
            SnapshotEvidence::FilesOnly {
                overlay_valid: qemu_img::is_qcow2(&overlay_file).await?,
            }
        };
        let decision = recover::resolve_snapshot(evidence);
        tracing::info!(volume = %id, snapshot = %p.snapshot, ?evidence, ?decision, "interrupted snapshot");
        match decision {
            SnapshotResolution::RollForward => {
                self.store.save(&plan::seal(&rec, &p)?)?;
            }
            SnapshotResolution::RollBack => {
                self.blockdev_del(&rec.node_name(p.overlay)).await?;
                remove_file_if_exists(&overlay_file)?;
                let mut rec = rec;
                rec.pending_snapshot = None;
                self.store.save(&rec)?;
            }
        }
        Ok(())
    }

    /// Decides an active commit interrupted after `job-complete` may have
    /// been sent (see `recover::resolve_completing`).
    async fn resolve_completing_merge(&self, id: &VolumeId) -> Result<()> {
        let mut rec = self.load(id)?;
        let Some(InFlight::Merge {
            snapshot,
            job,
            mode: MergeMode::Commit,
            phase: MergePhase::Completing,
        }) = rec.in_flight.clone()
        else {
            return Ok(());
        };
        let in_daemon = qmp::query_jobs(&self.qmp)
            .await?
            .iter()
            .any(|j| j.id == job);
        let evidence = if in_daemon {
            CompletingEvidence::JobInDaemon
        } else {
            let plan = plan::plan_delete(&rec, &snapshot)?;
            let plan::DeletePlan::Commit { top, base, .. } = plan else {
                return Err(plan::PlanError::Inconsistent("completing a non-commit".into()).into());
            };
            let idx = |seq: u64| rec.layers.iter().position(|l| l.seq == seq);
            let (Some(ti), Some(bi)) = (idx(top), idx(base)) else {
                return Err(plan::PlanError::Inconsistent("merge layers missing".into()).into());
            };
            let top_view = self.chain_files(&rec, ti)?;
            let base_view = self.chain_files(&rec, bi)?;
            let a: Vec<&Path> = top_view.iter().map(PathBuf::as_path).collect();
            let b: Vec<&Path> = base_view.iter().map(PathBuf::as_path).collect();
            CompletingEvidence::DaemonLost {
                views_equal: qemu_img::chains_equal(&a, &b).await?,
            }
        };
        let decision = recover::resolve_completing(evidence);
        tracing::info!(volume = %id, %snapshot, ?evidence, ?decision, "interrupted merge completion");
        match decision {
            CompletingResolution::Resume => {
                if !in_daemon {
                    // The top layer is the truth: the job starts over.
                    rec.in_flight = Some(InFlight::Merge {
                        snapshot,
                        job,
                        mode: MergeMode::Commit,
                        phase: MergePhase::Running,
                    });
                    self.store.save(&rec)?;
                }
            }
            CompletingResolution::Finished => {
                let plan = plan::plan_delete(&rec, &snapshot)?;
                self.finish_merge(&rec, &snapshot, &plan, &job).await?;
            }
        }
        Ok(())
    }

    /// Deletes nodes and files of this volume that no record references:
    /// leftovers of an operation interrupted between its steps.
    async fn sweep_orphans(&self, rec: &VolumeRecord) -> Result<()> {
        let live: HashSet<u64> = rec.layers.iter().map(|l| l.seq).collect();
        let prefix = format!("n{}-", &rec.id.hex()[..16]);
        for node in self.named_nodes().await? {
            let orphan = node
                .strip_prefix(prefix.as_str())
                .and_then(|n| n.parse::<u64>().ok())
                .is_some_and(|seq| !live.contains(&seq));
            if orphan && let Err(e) = self.blockdev_del(&node).await {
                tracing::warn!(node, error = %e, "could not delete orphan node");
            }
        }
        for ent in std::fs::read_dir(self.vol_dir(&rec.id))?.flatten() {
            let name = ent.file_name();
            let seq = name
                .to_str()
                .and_then(|n| n.strip_prefix("layer-"))
                .and_then(|n| n.strip_suffix(".qcow2"))
                .and_then(|n| n.parse::<u64>().ok());
            if let Some(seq) = seq
                && !live.contains(&seq)
            {
                tracing::info!(volume = %rec.id, seq, "removing orphan layer file");
                remove_file_if_exists(&ent.path())?;
            }
        }
        Ok(())
    }

    /// Makes the daemon hold what the record describes. Idempotent.
    async fn reconcile(&self, id: &VolumeId) -> Result<()> {
        self.resolve_pending_snapshot(id).await?;
        self.resolve_completing_merge(id).await?;
        let Some(mut rec) = self.store.load(id)? else {
            return Ok(());
        };
        let dir = self.vol_dir(id);
        let nodes = self.named_nodes().await?;
        let mut below: Option<String> = self.clone_backing(&rec)?;
        for l in &rec.layers {
            let name = rec.node_name(l.seq);
            if !nodes.contains(&name) {
                let backing = below.clone().map_or(Value::Null, Value::String);
                self.qmp
                    .execute("blockdev-add", node_add_args(&dir, &rec, l.seq, backing))
                    .await?;
                tracing::info!(volume = %id, node = name, "re-added layer");
            }
            below = Some(name);
        }
        self.sweep_orphans(&rec).await?;
        let exports = self.export_ids().await?;
        for e in rec.exports.clone() {
            let (_, eid) = rec.export_names(&e.target);
            if !exports.contains(&eid) {
                self.add_export(&rec, &e.target).await?;
            }
        }
        // Snapshots sealed but whose extents were not captured before a crash.
        for i in 0..rec.snapshots.len() {
            if rec.snapshots[i].changed.is_none()
                && let Some(li) = rec.layer_of(&rec.snapshots[i].id)
            {
                let seq = rec.layers[li].seq;
                let ext =
                    qemu_img::layer_allocation(&dir.join(VolumeRecord::layer_file(seq))).await?;
                rec.snapshots[i].changed = Some(clone::with_inherited(&mut rec, ext));
                self.store.save(&rec)?;
            }
        }
        if rec.clone_of.is_some() {
            self.ensure_flatten(&rec).await?;
        }
        if let Some(InFlight::Merge { snapshot, mode, .. }) = rec.in_flight.clone() {
            tracing::info!(volume = %id, %snapshot, "finishing interrupted merge");
            self.merge_locked(rec, &snapshot, MergeOptions { mode, speed: None }, true)
                .await?;
        }
        Ok(())
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
        let mut rec = self.load_live(id)?;
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
        let Some(active) = rec.active().cloned() else {
            return Err(EngineError::NotFound(format!("volume {id}")));
        };
        rec.deleted = true;
        rec.layers.pop();
        // Record first: a crash after this leaves at worst an orphan file.
        self.store.save(&rec)?;
        self.blockdev_del(&rec.node_name(active.seq)).await?;
        remove_file_if_exists(&self.vol_dir(id).join(VolumeRecord::layer_file(active.seq)))?;
        Ok(())
    }

    /// Reverts a volume to its latest snapshot: a fresh empty active layer
    /// on the snapshot's layer replaces the current one, whose writes are
    /// dropped. Refused while the volume is attached (the consumer would see
    /// its disk change under it) and for older snapshots (their layers have
    /// later snapshots on top; restore those to a new volume instead).
    pub async fn revert_volume(&self, id: &VolumeId, snap: &SnapshotId) -> Result<VolumeInfo> {
        let _g = self.locks.try_lock(id)?;
        let mut rec = self.load_live(id)?;
        if rec.exports.iter().any(|e| e.target == ExportTarget::Volume) {
            return Err(EngineError::FailedPrecondition(format!(
                "volume {id} is attached; detach it before reverting"
            )));
        }
        if rec.in_flight.is_some() || rec.pending_snapshot.is_some() {
            return Err(EngineError::Busy(format!(
                "volume {id} (operation in flight)"
            )));
        }
        let Some(s) = rec.snapshot(snap) else {
            return Err(match self.locate(snap) {
                Ok(other) => EngineError::InvalidArgument(format!(
                    "snapshot {snap} belongs to volume {}, not to {id}",
                    other.id
                )),
                Err(e) => e,
            });
        };
        if s.state != SnapshotState::Ready {
            return Err(plan::PlanError::SnapshotDeleting(snap.clone()).into());
        }
        let n = rec.layers.len();
        let (Some(active), Some(sealed)) = (rec.active().cloned(), rec.layer_of(snap)) else {
            return Err(EngineError::NotFound(format!("volume {id}")));
        };
        if sealed + 2 != n {
            return Err(EngineError::FailedPrecondition(format!(
                "snapshot {snap} is not the latest snapshot of {id}; only the latest can be \
                 reverted to in place (restore older ones to a new volume)"
            )));
        }
        let under = rec.layers[sealed].seq;
        let seq = rec.next_layer_seq;
        let dir = self.vol_dir(id);
        // New layer and node first (an orphan if we crash), then the record
        // (the switch), then the old layer goes (an orphan if we crash).
        qemu_img::create(
            &dir.join(VolumeRecord::layer_file(seq)),
            rec.size,
            Some(&VolumeRecord::layer_file(under)),
        )
        .await?;
        self.qmp
            .execute(
                "blockdev-add",
                node_add_args(&dir, &rec, seq, Value::String(rec.node_name(under))),
            )
            .await?;
        if let Some(l) = rec.layers.last_mut() {
            l.seq = seq;
        }
        rec.next_layer_seq = seq + 1;
        self.store.save(&rec)?;
        self.blockdev_del(&rec.node_name(active.seq)).await?;
        remove_file_if_exists(&dir.join(VolumeRecord::layer_file(active.seq)))?;
        Ok(info(&rec))
    }

    /// Grows a volume. Shrinking is refused: it would destroy data.
    pub async fn expand_volume(&self, id: &VolumeId, new_size: u64) -> Result<VolumeInfo> {
        let _g = self.locks.try_lock(id)?;
        let mut rec = self.load_live(id)?;
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

    // ----- snapshots -------------------------------------------------------

    /// Finds the volume that holds a snapshot by scanning the pool's records.
    fn locate(&self, snap: &SnapshotId) -> Result<VolumeRecord> {
        for id in self.store.list()? {
            if let Some(rec) = self.store.load(&id)?
                && rec.snapshot(snap).is_some()
            {
                return Ok(rec);
            }
        }
        Err(EngineError::NotFound(format!("snapshot {snap}")))
    }

    pub async fn create_snapshot(
        &self,
        volume: &VolumeId,
        snap: &SnapshotId,
    ) -> Result<(SnapshotInfo, SnapshotTimings)> {
        let (mut v, t) = self
            .create_snapshots(&[(volume.clone(), snap.clone())])
            .await?;
        let i = v
            .pop()
            .ok_or_else(|| EngineError::NotFound(format!("snapshot {snap}")))?;
        Ok((i, t))
    }

    /// Snapshots several volumes atomically: one QMP `transaction`, so every
    /// volume's point-in-time is the same instant. Idempotent per snapshot.
    pub async fn create_snapshots(
        &self,
        pairs: &[(VolumeId, SnapshotId)],
    ) -> Result<(Vec<SnapshotInfo>, SnapshotTimings)> {
        let started = Instant::now();
        let mut seen = HashSet::new();
        if pairs.is_empty() || !pairs.iter().all(|(v, _)| seen.insert(v.clone())) {
            return Err(EngineError::InvalidArgument(
                "need at least one volume, each at most once".into(),
            ));
        }
        // Lock in sorted order so two group snapshots cannot deadlock.
        let mut sorted: Vec<_> = pairs.iter().map(|(v, _)| v.clone()).collect();
        sorted.sort();
        let mut guards = vec![];
        for v in &sorted {
            guards.push(self.locks.try_lock(v)?);
        }
        let mut recs = vec![];
        let mut existing = 0;
        for (v, s) in pairs {
            let rec = self.load_live(v)?;
            if rec.snapshot(s).is_some() {
                existing += 1;
            } else if let Ok(other) = self.locate(s) {
                return Err(EngineError::AlreadyExists(format!(
                    "snapshot {s} (of volume {})",
                    other.id
                )));
            }
            if rec.in_flight.is_some() {
                return Err(EngineError::Busy(format!("volume {v} (merge in flight)")));
            }
            recs.push(rec);
        }
        if existing == pairs.len() {
            let infos = pairs
                .iter()
                .zip(&recs)
                .filter_map(|((_, s), r)| r.snapshot(s).map(|sr| snap_info(r, sr)))
                .collect();
            let t = started.elapsed();
            return Ok((
                infos,
                SnapshotTimings {
                    transaction: Duration::ZERO,
                    total: t,
                },
            ));
        }
        if existing != 0 {
            return Err(EngineError::AlreadyExists(
                "some snapshots of this group exist already".into(),
            ));
        }

        // 1. The intent, durable before anything else: recovery then knows
        //    an overlay may exist and decides whether writes went to it.
        //    Then new overlay files and nodes, not yet in any chain.
        let now = Utc::now();
        let mut actions = vec![];
        let mut overlays = vec![];
        // QEMU refuses a snapshot of a node a block job works on: a clone
        // whose flatten job still runs on its (active) bottom layer has the
        // job paused by cancelling it, and restarted after the switch on the
        // then sealed layer (a stream skips what it already copied).
        let mut reflatten = vec![];
        for rec in &recs {
            if rec.clone_of.is_some() && rec.layers.len() == 1 {
                self.stop_flatten(rec).await?;
                reflatten.push(rec.id.clone());
            }
        }
        let prepared = self
            .prepare_overlays(&mut recs, pairs, now, &mut actions, &mut overlays)
            .await;
        // 2. The switch-over: atomic across all volumes.
        failpoint::hit("snapshot-before-transaction", self.daemon.pid);
        let t0 = Instant::now();
        let tx = match prepared {
            Ok(()) => self
                .qmp
                .execute("transaction", json!({ "actions": actions }))
                .await
                .map_err(EngineError::from),
            Err(e) => Err(e),
        };
        let transaction = t0.elapsed();
        failpoint::hit("snapshot-after-transaction", self.daemon.pid);
        if let Err(e) = tx {
            // A failed transaction changed nothing (QMP transactions are
            // all-or-nothing): undo the overlays and the intents.
            for rec in recs.iter_mut() {
                let Some(p) = rec.pending_snapshot.take() else {
                    continue;
                };
                let _ = self.blockdev_del(&rec.node_name(p.overlay)).await;
                let _ = remove_file_if_exists(
                    &self
                        .vol_dir(&rec.id)
                        .join(VolumeRecord::layer_file(p.overlay)),
                );
                let _ = self.store.save(rec);
            }
            self.restart_flattens(&reflatten).await;
            return Err(e);
        }
        self.restart_flattens(&reflatten).await;
        // 3. Records, then the sealed layers' allocation maps.
        let mut infos = vec![];
        for rec in recs.iter_mut() {
            let p = rec
                .pending_snapshot
                .clone()
                .ok_or_else(|| plan::PlanError::Inconsistent("intent lost".into()))?;
            let sealed_seq = rec
                .active()
                .map(|l| l.seq)
                .ok_or_else(|| EngineError::NotFound(format!("volume {}", rec.id)))?;
            *rec = plan::seal(rec, &p)?;
            self.store.save(rec)?;
            let file = self
                .vol_dir(&rec.id)
                .join(VolumeRecord::layer_file(sealed_seq));
            let ext = qemu_img::layer_allocation(&file).await?;
            let ext = clone::with_inherited(rec, ext);
            if let Some(s) = rec.snapshots.last_mut() {
                s.changed = Some(ext);
            }
            self.store.save(rec)?;
            if let Some(s) = rec.snapshots.last() {
                infos.push(snap_info(rec, s));
            }
        }
        drop(guards);
        Ok((
            infos,
            SnapshotTimings {
                transaction,
                total: started.elapsed(),
            },
        ))
    }

    /// Restarts flatten jobs stopped for a snapshot. A failure only delays
    /// the flatten (the next open or `wait_flattened` starts it again).
    async fn restart_flattens(&self, ids: &[VolumeId]) {
        for id in ids {
            let r = match self.load(id) {
                Ok(rec) => self.ensure_flatten(&rec).await,
                Err(e) => Err(e),
            };
            if let Err(e) = r {
                tracing::warn!(volume = %id, error = %e, "could not restart the flatten");
            }
        }
    }

    /// Step 1 of a snapshot, per volume: save the intent, create the
    /// overlay file and add its node (not yet in any chain).
    async fn prepare_overlays(
        &self,
        recs: &mut [VolumeRecord],
        pairs: &[(VolumeId, SnapshotId)],
        now: DateTime<Utc>,
        actions: &mut Vec<Value>,
        overlays: &mut Vec<u64>,
    ) -> Result<()> {
        for (rec, (_, snap)) in recs.iter_mut().zip(pairs) {
            let dir = self.vol_dir(&rec.id);
            let active = rec
                .active()
                .cloned()
                .ok_or_else(|| EngineError::NotFound(format!("volume {}", rec.id)))?;
            let seq = rec.next_layer_seq;
            rec.pending_snapshot = Some(PendingSnapshot {
                snapshot: snap.clone(),
                overlay: seq,
                created: now,
            });
            self.store.save(rec)?;
            qemu_img::create(
                &dir.join(VolumeRecord::layer_file(seq)),
                rec.size,
                Some(&VolumeRecord::layer_file(active.seq)),
            )
            .await?;
            self.qmp
                .execute("blockdev-add", node_add_args(&dir, rec, seq, Value::Null))
                .await?;
            overlays.push(seq);
            actions.push(json!({
                "type": "blockdev-snapshot",
                "data": { "node": rec.node_name(active.seq), "overlay": rec.node_name(seq) },
            }));
        }
        Ok(())
    }

    pub fn list_snapshots(&self, volume: &VolumeId) -> Result<Vec<SnapshotInfo>> {
        let rec = self.load(volume)?;
        Ok(rec.snapshots.iter().map(|s| snap_info(&rec, s)).collect())
    }

    pub fn snapshot(&self, snap: &SnapshotId) -> Result<SnapshotInfo> {
        let rec = self.locate(snap)?;
        let s = rec
            .snapshot(snap)
            .ok_or_else(|| EngineError::NotFound(format!("snapshot {snap}")))?;
        Ok(snap_info(&rec, s))
    }

    /// The merge job's id for deleting `snap` (for progress, speed, cancel).
    pub fn merge_job_id(snap: &SnapshotId) -> String {
        format!("m{}", &snap.hex()[..24])
    }

    /// Deletes a snapshot by merging its layer away live. `speed` limits the
    /// merge in bytes per second (0 or `None`: unlimited). Returns once the
    /// layer is gone; progress is visible through [`Engine::jobs`].
    pub async fn delete_snapshot(&self, snap: &SnapshotId, speed: Option<u64>) -> Result<()> {
        self.delete_snapshot_with(
            snap,
            MergeOptions {
                mode: MergeMode::Commit,
                speed,
            },
        )
        .await
    }

    /// [`Engine::delete_snapshot`] with a choice of merge mode.
    pub async fn delete_snapshot_with(&self, snap: &SnapshotId, opts: MergeOptions) -> Result<()> {
        let (rec, _g) = self.lock_for_merge(snap).await?;
        self.merge_locked(rec, snap, opts, true).await
    }

    /// Starts deleting a snapshot and returns the merge job's id without
    /// waiting. The merge is recorded as in flight; calling
    /// [`Engine::delete_snapshot`] again (or reopening the engine) waits for
    /// it and finishes the deletion. Until then the volume is busy.
    pub async fn start_snapshot_delete(
        &self,
        snap: &SnapshotId,
        opts: MergeOptions,
    ) -> Result<String> {
        let (rec, _g) = self.lock_for_merge(snap).await?;
        self.merge_locked(rec, snap, opts, false).await?;
        Ok(Self::merge_job_id(snap))
    }

    async fn lock_for_merge(
        &self,
        snap: &SnapshotId,
    ) -> Result<(VolumeRecord, OwnedMutexGuard<()>)> {
        let rec = self.locate(snap)?;
        let g = self.locks.try_lock(&rec.id)?;
        // Reload under the lock: the first read only found the volume.
        let rec = self.load(&rec.id)?;
        if rec
            .exports
            .iter()
            .any(|e| matches!(&e.target, ExportTarget::Snapshot { id } if id == snap))
        {
            return Err(EngineError::FailedPrecondition(format!(
                "snapshot {snap} is exported; stop the export first"
            )));
        }
        Ok((rec, g))
    }

    async fn merge_locked(
        &self,
        mut rec: VolumeRecord,
        snap: &SnapshotId,
        opts: MergeOptions,
        wait: bool,
    ) -> Result<()> {
        // An interrupted merge keeps the mode it started with.
        let (mode, phase) = match &rec.in_flight {
            Some(InFlight::Merge {
                snapshot,
                mode,
                phase,
                ..
            }) if snapshot == snap => (*mode, *phase),
            Some(InFlight::Merge { snapshot, .. }) => {
                return Err(EngineError::Busy(format!(
                    "volume {} (merge of {snapshot} in flight)",
                    rec.id
                )));
            }
            None => (opts.mode, MergePhase::Running),
        };
        self.refuse_if_cloned(&rec).await?;
        let plan = plan::plan_delete_with(&rec, snap, mode)?;
        // The flatten job of an unflattened clone holds its bottom layer.
        if let (Some(src), Some(bottom)) = (&rec.clone_of, rec.layers.first())
            && plan::touches(&plan, bottom.seq)
        {
            return Err(EngineError::FailedPrecondition(format!(
                "volume {} is a clone of {} still being flattened; retry later",
                rec.id, src.volume
            )));
        }
        let job = Self::merge_job_id(snap);
        // The extents must be captured before the layer's content changes.
        if let Some(i) = rec.snapshot_index(snap)
            && rec.snapshots[i].changed.is_none()
        {
            return Err(EngineError::FailedPrecondition(format!(
                "snapshot {snap} extents not captured; reopen the engine to recover"
            )));
        }
        // Point of no return, made durable before the first byte moves.
        if let Some(i) = rec.snapshot_index(snap) {
            rec.snapshots[i].state = SnapshotState::Deleting;
        }
        rec.in_flight = Some(InFlight::Merge {
            snapshot: snap.clone(),
            job: job.clone(),
            mode,
            phase,
        });
        self.store.save(&rec)?;

        if !matches!(plan, plan::DeletePlan::DropTop { .. }) {
            self.run_merge_job(&mut rec, &job, &plan, opts.speed, wait)
                .await?;
            if !wait {
                return Ok(());
            }
            failpoint::hit("merge-after-complete", self.daemon.pid);
        }
        self.finish_merge(&rec, snap, &plan, &job).await
    }

    /// After the job concluded: save the new record, and only then dismiss
    /// the job and drop the merged-away node, so that a crash in between
    /// still finds the concluded job (or the new record).
    async fn finish_merge(
        &self,
        rec: &VolumeRecord,
        snap: &SnapshotId,
        plan: &plan::DeletePlan,
        job: &str,
    ) -> Result<()> {
        let drop_seq = match plan {
            plan::DeletePlan::Commit { top, .. } => *top,
            plan::DeletePlan::DropTop { layer } => *layer,
            plan::DeletePlan::Stream { removed, .. } => *removed,
        };
        let after = plan::apply_delete(rec, snap, plan)?;
        let file = self
            .vol_dir(&rec.id)
            .join(VolumeRecord::layer_file(drop_seq));
        if after.deleted && after.snapshots.is_empty() {
            // No record will be left to sweep from: release the node first.
            self.dismiss(job).await;
            self.blockdev_del(&rec.node_name(drop_seq)).await?;
            self.store.remove(&rec.id)?;
            return Ok(());
        }
        self.store.save(&after)?;
        // The job holds its nodes until dismissed; a crash from here on
        // leaves an orphan node or file that the next reconcile sweeps.
        self.dismiss(job).await;
        self.blockdev_del(&rec.node_name(drop_seq)).await?;
        remove_file_if_exists(&file)?;
        Ok(())
    }

    async fn dismiss(&self, job: &str) {
        // Not found is fine: the daemon restarted or it was dismissed.
        let _ = self.qmp.execute("job-dismiss", json!({ "id": job })).await;
    }

    /// Merges on a volume some unflattened clone still backs onto are
    /// refused: QEMU would refuse the write lock on a layer a clone reads,
    /// and a stream would pull the clone's backing away. The clone is
    /// flattened in the background; retry once it is.
    async fn refuse_if_cloned(&self, rec: &VolumeRecord) -> Result<()> {
        for id in self.store.list()? {
            if let Some(c) = self.store.load(&id)?
                && c.clone_of.as_ref().is_some_and(|s| s.volume == rec.id)
            {
                // It may have finished flattening since we last looked.
                if self.settle_flatten(&c).await? {
                    continue;
                }
                return Err(EngineError::FailedPrecondition(format!(
                    "volume {} is a clone still backed by {}; it is being flattened, retry later",
                    c.id, rec.id
                )));
            }
        }
        Ok(())
    }

    /// Starts (or picks up) the merge job and, when `wait`, drives it until
    /// it concluded. A successful job is left undismissed for the caller.
    async fn run_merge_job(
        &self,
        rec: &mut VolumeRecord,
        job: &str,
        plan: &plan::DeletePlan,
        speed: Option<u64>,
        wait: bool,
    ) -> Result<()> {
        let mut rx = self.qmp.subscribe();
        let existing = qmp::query_jobs(&self.qmp).await?;
        let mut status = existing
            .iter()
            .find(|j| j.id == job)
            .map(|j| j.status.clone());
        let active = matches!(plan, plan::DeletePlan::Commit { active: true, .. });
        if status.is_none() {
            let (cmd, args) = self.merge_job_args(rec, job, plan, speed)?;
            self.qmp.execute(cmd, args).await?;
            status = Some("running".into());
        }
        if !wait {
            return Ok(());
        }
        // Drive the job through its states. Statuses are re-read with
        // query-jobs after each event so a missed event cannot stall us.
        loop {
            match status.as_deref() {
                Some("ready") => {
                    // From here QEMU may switch writes to the base at any
                    // moment: recovery must know that.
                    if let Some(InFlight::Merge { phase, .. }) = rec.in_flight.as_mut()
                        && *phase != MergePhase::Completing
                    {
                        *phase = MergePhase::Completing;
                        self.store.save(rec)?;
                    }
                    failpoint::hit("merge-before-complete", self.daemon.pid);
                    self.qmp
                        .execute("job-complete", json!({ "id": job }))
                        .await?;
                    qmp::wait_job_status(&mut rx, job, &["concluded"], JOB_TIMEOUT).await?;
                }
                Some("concluded") => {
                    let info = qmp::query_jobs(&self.qmp)
                        .await?
                        .into_iter()
                        .find(|j| j.id == job);
                    return match info.and_then(|i| i.error) {
                        None => Ok(()),
                        Some(e) => {
                            self.dismiss(job).await;
                            if e.to_lowercase().contains("cancel") {
                                Err(EngineError::Cancelled(job.to_owned()))
                            } else {
                                Err(EngineError::JobFailed {
                                    job: job.to_owned(),
                                    error: e,
                                })
                            }
                        }
                    };
                }
                None => {
                    return Err(EngineError::JobFailed {
                        job: job.to_owned(),
                        error: "job vanished".into(),
                    });
                }
                Some(_) => {
                    qmp::wait_job_status(&mut rx, job, &["ready", "concluded"], JOB_TIMEOUT)
                        .await
                        .or_else(|e| match e {
                            // Re-check below instead of failing on a lag.
                            QmpError::Timeout(..) => Ok(String::new()),
                            e => Err(e),
                        })?;
                }
            }
            status = qmp::query_jobs(&self.qmp)
                .await?
                .into_iter()
                .find(|j| j.id == job)
                .map(|j| j.status);
            if status.as_deref() == Some("ready") && !active {
                // Only active commits become ready; be defensive.
                status = Some("running".into());
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }

    fn merge_job_args(
        &self,
        rec: &VolumeRecord,
        job: &str,
        plan: &plan::DeletePlan,
        speed: Option<u64>,
    ) -> Result<(&'static str, Value)> {
        let speed = speed.unwrap_or(0);
        match plan {
            plan::DeletePlan::Commit { top, base, active } => {
                let top_of_chain = rec
                    .layers
                    .last()
                    .map(|l| rec.node_name(l.seq))
                    .ok_or_else(|| EngineError::NotFound(format!("volume {}", rec.id)))?;
                let mut args = json!({
                    "job-id": job,
                    "device": top_of_chain,
                    "base-node": rec.node_name(*base),
                    "auto-dismiss": false,
                    "speed": speed,
                });
                if !active {
                    args["top-node"] = json!(rec.node_name(*top));
                }
                Ok(("block-commit", args))
            }
            plan::DeletePlan::Stream { into, base, .. } => {
                let mut args = json!({
                    "job-id": job,
                    "device": rec.node_name(*into),
                    "auto-dismiss": false,
                    "speed": speed,
                });
                match base {
                    Some(b) => args["base-node"] = json!(rec.node_name(*b)),
                    // Streaming the bottom layer of a clone would also pull
                    // in the source's layers; that is the flatten job's work.
                    None if rec.clone_of.is_some() => {
                        return Err(EngineError::FailedPrecondition(format!(
                            "volume {} is an unflattened clone",
                            rec.id
                        )));
                    }
                    None => {}
                }
                Ok(("block-stream", args))
            }
            plan::DeletePlan::DropTop { .. } => {
                Err(plan::PlanError::Inconsistent("a dropped layer needs no job".into()).into())
            }
        }
    }

    /// Running and finished-but-undismissed jobs with byte progress.
    pub async fn jobs(&self) -> Result<Vec<JobInfo>> {
        Ok(qmp::query_jobs(&self.qmp).await?)
    }

    /// Changes a running merge's rate limit (bytes/s, 0 = unlimited).
    pub async fn set_job_speed(&self, job: &str, speed: u64) -> Result<()> {
        self.qmp
            .execute(
                "block-job-set-speed",
                json!({ "device": job, "speed": speed }),
            )
            .await?;
        Ok(())
    }

    /// Cancels a running merge. The snapshot stays `deleting` (its layer may
    /// already hold newer data); deleting it again finishes the merge.
    pub async fn cancel_job(&self, job: &str) -> Result<()> {
        self.qmp.execute("job-cancel", json!({ "id": job })).await?;
        Ok(())
    }

    // ----- changed-block tracking -----------------------------------------

    fn page(rec: &VolumeRecord, list: &[Extent], start: u64, max: usize) -> ExtentPage {
        ExtentPage {
            volume_size: rec.size,
            extents: extents::page(list, start, max.max(1)),
        }
    }

    /// Allocated extents of a snapshot, from the durable records only.
    pub fn allocated(&self, snap: &SnapshotId, start: u64, max: usize) -> Result<ExtentPage> {
        let rec = self.locate(snap)?;
        let list = plan::allocated(&rec, snap)?;
        Ok(Self::page(&rec, &list, start, max))
    }

    /// Extents changed after `base` up to `target` (same volume only).
    pub fn delta(
        &self,
        base: &SnapshotId,
        target: &SnapshotId,
        start: u64,
        max: usize,
    ) -> Result<ExtentPage> {
        let rec = self.locate(target)?;
        if rec.snapshot(base).is_none() {
            return Err(match self.locate(base) {
                Ok(other) => EngineError::InvalidArgument(format!(
                    "base snapshot {base} belongs to volume {}, not to {}",
                    other.id, rec.id
                )),
                Err(e) => e,
            });
        }
        let list = plan::delta(&rec, base, target)?;
        Ok(Self::page(&rec, &list, start, max))
    }

    // ----- exports ---------------------------------------------------------

    async fn add_export(&self, rec: &VolumeRecord, target: &ExportTarget) -> Result<ExportInfo> {
        let (name, eid) = rec.export_names(target);
        let (node, writable) = match target {
            ExportTarget::Volume => {
                let a = rec
                    .active()
                    .ok_or_else(|| EngineError::NotFound(format!("volume {}", rec.id)))?;
                (rec.node_name(a.seq), true)
            }
            ExportTarget::Snapshot { id } => {
                let li = rec
                    .layer_of(id)
                    .ok_or_else(|| EngineError::NotFound(format!("snapshot {id}")))?;
                (rec.node_name(rec.layers[li].seq), false)
            }
        };
        let r = self
            .qmp
            .execute(
                "block-export-add",
                json!({
                    "type": "nbd", "id": eid, "node-name": node, "name": name,
                    "writable": writable,
                    // Publishes qemu:allocation-depth so readers can tell this
                    // layer's own clusters from its backing's.
                    "allocation-depth": true,
                }),
            )
            .await;
        match r {
            Ok(_) => {}
            Err(e) if e.desc_contains("already") => {}
            Err(e) => return Err(e.into()),
        }
        Ok(ExportInfo {
            name,
            socket: self.daemon.runtime.nbd_socket(),
            writable,
        })
    }

    async fn remove_export(&self, rec: &VolumeRecord, target: &ExportTarget) -> Result<()> {
        let (_, eid) = rec.export_names(target);
        let mut rx = self.qmp.subscribe();
        match self
            .qmp
            .execute("block-export-del", json!({ "id": eid }))
            .await
        {
            Ok(_) => {
                qmp::wait_event(
                    &mut rx,
                    "BLOCK_EXPORT_DELETED",
                    Duration::from_secs(30),
                    |e| {
                        e.event == "BLOCK_EXPORT_DELETED"
                            && e.data.get("id").and_then(Value::as_str) == Some(&eid)
                    },
                )
                .await?;
                Ok(())
            }
            Err(e) if e.desc_contains("not found") => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn export(&self, volume: &VolumeId, target: ExportTarget) -> Result<ExportInfo> {
        let _g = self.locks.try_lock(volume)?;
        let mut rec = self.load(volume)?;
        if let ExportTarget::Snapshot { id } = &target {
            match rec.snapshot(id) {
                None => return Err(EngineError::NotFound(format!("snapshot {id}"))),
                Some(s) if s.state != SnapshotState::Ready => {
                    return Err(plan::PlanError::SnapshotDeleting(id.clone()).into());
                }
                Some(_) => {}
            }
        } else if rec.deleted {
            return Err(EngineError::NotFound(format!("volume {volume}")));
        }
        let info = self.add_export(&rec, &target).await?;
        if !rec.exports.iter().any(|e| e.target == target) {
            rec.exports.push(ExportRecord { target });
            self.store.save(&rec)?;
        }
        Ok(info)
    }

    async fn unexport(&self, volume: &VolumeId, target: ExportTarget) -> Result<()> {
        let _g = self.locks.try_lock(volume)?;
        let mut rec = self.load(volume)?;
        self.remove_export(&rec, &target).await?;
        rec.exports.retain(|e| e.target != target);
        self.store.save(&rec)?;
        Ok(())
    }

    /// Read-only NBD export of a snapshot's point-in-time view.
    pub async fn export_snapshot(&self, snap: &SnapshotId) -> Result<ExportInfo> {
        let rec = self.locate(snap)?;
        self.export(&rec.id, ExportTarget::Snapshot { id: snap.clone() })
            .await
    }

    pub async fn unexport_snapshot(&self, snap: &SnapshotId) -> Result<()> {
        let rec = self.locate(snap)?;
        self.unexport(&rec.id, ExportTarget::Snapshot { id: snap.clone() })
            .await
    }

    /// Writable NBD export of the volume for its consumer. It follows the
    /// active layer across snapshots and merges (QEMU moves the export's
    /// node), and is re-created from the record after a daemon restart.
    pub async fn attach_volume(&self, volume: &VolumeId) -> Result<ExportInfo> {
        self.export(volume, ExportTarget::Volume).await
    }

    pub async fn detach_volume(&self, volume: &VolumeId) -> Result<()> {
        self.unexport(volume, ExportTarget::Volume).await
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
        ready: s.state == SnapshotState::Ready && s.changed.is_some(),
    }
}
