//! New volumes from a snapshot: a fresh layer on top of the source's sealed
//! layer (instant), flattened in the background by a `block-stream` job that
//! copies the source's data in and then cuts the backing link.
//!
//! While a clone is not flattened its source volume refuses merges
//! (FAILED_PRECONDITION): the clone reads the source's layers, and QEMU
//! would refuse the write lock a commit into them needs anyway.

use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::broadcast;

use super::engine::{Engine, Result, node_add_args};
use super::hidden_base::Releases;
use super::record::{CloneSource, ClonedFrom, SnapshotState, VolumeRecord};
use super::types::{VolumeInfo, info};
use super::{plan, qemu_img};
use crate::error::EngineError;
use crate::qsd::nbd_client::NbdClient;
use crate::qsd::qmp;
use livedisk_common::{SnapshotId, VolumeId};

/// The flatten job of a clone.
pub fn flatten_job_id(id: &VolumeId) -> String {
    format!("f{}", &id.hex()[..24])
}

impl Engine {
    /// Node a clone's bottom layer backs onto, if it is an unflattened clone.
    pub(super) fn clone_backing(&self, rec: &VolumeRecord) -> Result<Option<String>> {
        let Some(src) = &rec.clone_of else {
            return Ok(None);
        };
        let srec = self.load(&src.volume)?;
        Ok(Some(srec.node_name(src.layer)))
    }

    /// A new volume with the content of `snap`, usable at once. `size`
    /// (rounded up to 512 bytes) may exceed the snapshot's size, never fall
    /// below it. Idempotent for the same source and size.
    pub async fn create_volume_from_snapshot(
        &self,
        id: &VolumeId,
        snap: &SnapshotId,
        size: Option<u64>,
    ) -> Result<VolumeInfo> {
        self.create_volume_from_snapshot_with(id, snap, size, None)
            .await
    }

    /// [`Engine::create_volume_from_snapshot`] with a rate limit (bytes/s)
    /// for the background flatten; change it later with
    /// [`Engine::set_job_speed`] on [`flatten_job_id`].
    pub async fn create_volume_from_snapshot_with(
        &self,
        id: &VolumeId,
        snap: &SnapshotId,
        size: Option<u64>,
        flatten_speed: Option<u64>,
    ) -> Result<VolumeInfo> {
        let src = self.locate(snap)?;
        if &src.id == id {
            return Err(EngineError::AlreadyExists(format!("volume {id}")));
        }
        let _gs = self.locks.try_lock(&src.id)?;
        let _gn = self.locks.try_lock(id)?;
        self.refuse_if_migrating(&src.id)?;
        self.restore_locked(id, &src.id, snap, size, flatten_speed, None)
            .await
    }

    /// [`Engine::create_volume_from_snapshot_with`] once the caller holds
    /// the locks of the new volume and of `source`, the volume holding
    /// `snap`. `cloned_from` is recorded with the new volume in its first
    /// save (a clone of a volume, made from its hidden base).
    pub(super) async fn restore_locked(
        &self,
        id: &VolumeId,
        source: &VolumeId,
        snap: &SnapshotId,
        size: Option<u64>,
        flatten_speed: Option<u64>,
        cloned_from: Option<ClonedFrom>,
    ) -> Result<VolumeInfo> {
        // The clone's snapshots report the source's allocation as theirs.
        let src = self.capture_locked(self.load(source)?).await?;
        let s = src
            .snapshot(snap)
            .ok_or_else(|| EngineError::NotFound(format!("snapshot {snap}")))?;
        if s.state != SnapshotState::Ready {
            return Err(plan::PlanError::SnapshotDeleting(snap.clone()).into());
        }
        let size = size.unwrap_or(s.size).div_ceil(512) * 512;
        if size < s.size {
            return Err(EngineError::OutOfRange(format!(
                "snapshot {snap} is {} bytes; a volume from it cannot be {size}",
                s.size
            )));
        }
        if let Some(rec) = self.store.load(id)? {
            let same = rec.size == size
                && !rec.deleted
                && rec.clone_of.as_ref().is_none_or(|c| &c.snapshot == snap);
            return if same {
                Ok(info(&rec))
            } else {
                Err(EngineError::AlreadyExists(format!("volume {id}")))
            };
        }
        let li = src
            .layer_of(snap)
            .ok_or_else(|| EngineError::NotFound(format!("snapshot {snap}")))?;
        let layer = src.layers[li].seq;
        let inherited = plan::allocated(&src, snap)?;

        let dir = self.vol_dir(id);
        std::fs::create_dir_all(&dir)?;
        let backing_name = format!("../{}/{}", src.id, VolumeRecord::layer_file(layer));
        qemu_img::create(
            &dir.join(VolumeRecord::layer_file(0)),
            size,
            Some(&backing_name),
        )
        .await?;
        let mut rec = VolumeRecord::new(id.clone(), size);
        rec.clone_of = Some(CloneSource {
            volume: src.id.clone(),
            layer,
            snapshot: snap.clone(),
            flatten_speed,
            remote: None,
        });
        rec.cloned_from = cloned_from;
        rec.inherited = inherited;
        // Durable before the daemon knows it: recovery re-adds and flattens.
        self.store.save(&rec)?;
        self.qmp
            .execute(
                "blockdev-add",
                node_add_args(&dir, &rec, 0, Value::String(src.node_name(layer))),
            )
            .await?;
        self.ensure_flatten(&rec).await?;
        Ok(info(&rec))
    }

    /// Starts the flatten job unless it runs or the clone is flat already.
    /// Its rate limit is the one recorded at clone time.
    pub(super) async fn ensure_flatten(&self, rec: &VolumeRecord) -> Result<()> {
        if self.settle_flatten_locked(rec).await? {
            return Ok(());
        }
        let job = flatten_job_id(&rec.id);
        if qmp::query_jobs(&self.qmp)
            .await?
            .iter()
            .any(|j| j.id == job)
        {
            return Ok(());
        }
        let bottom = rec
            .layers
            .first()
            .ok_or_else(|| EngineError::NotFound(format!("volume {}", rec.id)))?;
        self.qmp
            .execute(
                "block-stream",
                json!({
                    "job-id": job,
                    "device": rec.node_name(bottom.seq),
                    "auto-dismiss": false,
                    "speed": rec.clone_of.as_ref().and_then(|c| c.flatten_speed).unwrap_or(0),
                }),
            )
            .await?;
        Ok(())
    }

    /// If the clone's flatten job concluded, records that the clone stands
    /// alone. Returns whether it does. Takes the clone's lock (without
    /// waiting: busy means "not settled yet").
    pub(super) async fn settle_flatten(&self, rec: &VolumeRecord) -> Result<bool> {
        let Ok(_g) = self.locks.try_lock(&rec.id) else {
            return Ok(false);
        };
        let rec = self.load(&rec.id)?;
        self.settle_flatten_locked(&rec).await
    }

    /// If the clone's flatten job concluded, records that the clone stands
    /// alone (the caller holds the clone's lock). Returns whether it does.
    async fn settle_flatten_locked(&self, rec: &VolumeRecord) -> Result<bool> {
        self.settle_flatten_with(rec, false).await
    }

    /// [`Engine::settle_flatten_locked`]; `flushed`: the caller flushed the
    /// clone's bottom layer after the job concluded (the flatten watcher
    /// does, before it takes the lock: see `flush_concluded_flatten`).
    async fn settle_flatten_with(&self, rec: &VolumeRecord, flushed: bool) -> Result<bool> {
        if rec.clone_of.is_none() {
            return Ok(true);
        }
        let job = flatten_job_id(&rec.id);
        let Some(j) = qmp::query_jobs(&self.qmp)
            .await?
            .into_iter()
            .find(|j| j.id == job)
        else {
            return Ok(false);
        };
        if j.status != "concluded" {
            return Ok(false);
        }
        if let Some(e) = j.error {
            tracing::warn!(volume = %rec.id, error = e, "flatten failed; it will be retried");
            self.dismiss(&job).await;
            return Ok(false);
        }
        // The copied data must be durable before the record stops naming
        // the source: the job leaves QEMU's qcow2 metadata of what it
        // copied in QEMU's cache, while the file's header already lost its
        // backing link (seen here: a daemon killed right after the job
        // lost the clone's content). Until the save, recovery puts the
        // clone back on its source, which still holds everything.
        if !flushed {
            self.flush_bottom(rec).await?;
        }
        // Save first, dismiss after: a crash in between re-runs a (now
        // trivial) stream, never loses the fact.
        let mut rec = rec.clone();
        let remote = rec.clone_of.take().is_some_and(|c| c.remote.is_some());
        self.store.save(&rec)?;
        self.stats.copied(j.current_progress);
        self.dismiss(&job).await;
        if remote {
            // Nothing reads through the connection to the source any more.
            self.discard_remote_origin(&rec.id).await;
        }
        tracing::info!(volume = %rec.id, "clone flattened");
        Ok(true)
    }

    async fn flush_bottom(&self, rec: &VolumeRecord) -> Result<()> {
        let bottom = rec
            .layers
            .first()
            .ok_or_else(|| EngineError::NotFound(format!("volume {}", rec.id)))?;
        self.flush_node(&rec.node_name(bottom.seq)).await
    }

    /// The slow part of settling a flatten, without the clone's lock (a
    /// flush only makes durable what is there, and the clone stays usable
    /// meanwhile): flushes its bottom layer if the flatten job concluded
    /// without error. Returns whether it did.
    async fn flush_concluded_flatten(&self, id: &VolumeId) -> Result<bool> {
        let Some(rec) = self.store.load(id)? else {
            return Ok(false);
        };
        if rec.clone_of.is_none() {
            return Ok(false);
        }
        let job = flatten_job_id(id);
        let concluded = qmp::query_jobs(&self.qmp)
            .await?
            .into_iter()
            .any(|j| j.id == job && j.status == "concluded" && j.error.is_none());
        if !concluded {
            return Ok(false);
        }
        self.flush_bottom(&rec).await?;
        Ok(true)
    }

    /// Makes a node's content durable: QMP has no flush command, so an NBD
    /// `FLUSH` on a short-lived read-only export of the node does it. The
    /// export's name derives from the node: a flush of the same node going
    /// on (another task or process) is waited for, and an export still there
    /// after `FLUSH_TIMEOUT` is one an interrupted flush left, removed then.
    pub(super) async fn flush_node(&self, node: &str) -> Result<()> {
        let eid = flush_export(node);
        let args =
            json!({ "type": "nbd", "id": eid, "node-name": node, "name": eid, "writable": false });
        let deadline = tokio::time::Instant::now() + FLUSH_TIMEOUT;
        loop {
            match self.qmp.execute("block-export-add", args.clone()).await {
                Ok(_) => break,
                Err(e) if e.desc_contains("already in use") => {
                    if tokio::time::Instant::now() > deadline {
                        self.delete_export_and_wait(&eid).await?;
                    } else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        let socket = self.daemon().runtime.nbd_socket();
        let flushed = async {
            let mut c = NbdClient::connect(&socket, &eid).await?;
            c.flush(FLUSH_TIMEOUT).await?;
            c.disconnect().await
        }
        .await;
        self.delete_export_and_wait(&eid).await?;
        Ok(flushed?)
    }

    /// Cancels a clone's flatten job (the clone is being deleted): the job
    /// holds the clone's node, which could not be deleted under it.
    pub(super) async fn stop_flatten(&self, rec: &VolumeRecord) -> Result<()> {
        // An export a flush interrupted by a crash left would hold the node.
        if let Some(bottom) = rec.layers.first() {
            self.delete_export_and_wait(&flush_export(&rec.node_name(bottom.seq)))
                .await?;
        }
        let job = flatten_job_id(&rec.id);
        let _ = self.qmp.execute("job-cancel", json!({ "id": job })).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let j = qmp::query_jobs(&self.qmp)
                .await?
                .into_iter()
                .find(|j| j.id == job);
            match j {
                None => return Ok(()),
                Some(j) if j.status == "concluded" => {
                    self.dismiss(&job).await;
                    return Ok(());
                }
                Some(_) if tokio::time::Instant::now() > deadline => {
                    return Err(EngineError::Busy(format!(
                        "flatten job {job} does not stop"
                    )));
                }
                Some(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    /// Waits until a clone no longer depends on its source.
    pub async fn wait_flattened(&self, id: &VolumeId, timeout: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        let job = flatten_job_id(id);
        loop {
            let mut rx = self.qmp.subscribe();
            // Busy means another task (the flatten watcher, an operation on
            // the clone) holds the lock: look again after the wait below.
            if let Ok(_g) = self.locks.try_lock(id) {
                let rec = self.load(id)?;
                if self.settle_flatten_locked(&rec).await? {
                    return Ok(());
                }
                self.ensure_flatten(&rec).await?;
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Err(EngineError::FailedPrecondition(format!(
                    "volume {id} still not flattened"
                )));
            }
            // Either the event or a short poll: a missed event cannot stall.
            let _ = qmp::wait_job_status(
                &mut rx,
                &job,
                &["concluded"],
                left.min(Duration::from_secs(1)),
            )
            .await;
        }
    }

    /// Whether a volume is a clone still backed by its source.
    pub fn is_flattened(&self, id: &VolumeId) -> Result<bool> {
        Ok(self.load(id)?.clone_of.is_none())
    }

    /// How far a volume made from a snapshot or a volume is from standing
    /// alone: `None` once it does, else its flatten job's bytes done and
    /// total (both 0 while no job runs, e.g. right after a daemon restart).
    pub async fn flatten_progress(&self, id: &VolumeId) -> Result<Option<FlattenProgress>> {
        if self.is_flattened(id)? {
            return Ok(None);
        }
        let job = flatten_job_id(id);
        let progress = qmp::query_jobs(&self.qmp)
            .await?
            .into_iter()
            .find(|j| j.id == job)
            .map_or(FlattenProgress::default(), |j| FlattenProgress {
                done: j.current_progress,
                total: j.total_progress,
            });
        Ok(Some(progress))
    }
}

/// Bytes a flatten job has copied, of how many (QEMU's job progress).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlattenProgress {
    pub done: u64,
    pub total: u64,
}

/// The export a flush of `node` uses (see `Engine::flush_node`).
fn flush_export(node: &str) -> String {
    format!("F{node}")
}

/// Bound on one flush of a node (it writes what QEMU caches of it).
const FLUSH_TIMEOUT: Duration = Duration::from_secs(120);

/// Background task: records each clone as flattened as soon as its job
/// concludes, so that `is_flattened` and the source's merges see it without
/// anyone polling; a clone of a volume whose hidden base it no longer reads
/// goes to `releases` (see `hidden_base.rs`), never deleted here: this loop
/// must stay quick, since a concluded stream job waiting for it to be
/// dismissed makes QEMU 7.2 crash on `query-named-block-nodes`. Follows the
/// session across a daemon restart (its events are the session's); settles
/// only while the session is `Live`.
pub(super) fn spawn_flatten_watcher(
    engine: Engine,
    releases: Releases,
) -> tokio::task::JoinHandle<()> {
    let mut rx = engine.qmp.subscribe();
    tokio::spawn(async move {
        loop {
            let ev = match rx.recv().await {
                Ok(ev) => ev,
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return,
            };
            let concluded = ev.event == "JOB_STATUS_CHANGE"
                && ev.data.get("status").and_then(Value::as_str) == Some("concluded");
            let Some(job) = ev.job_id().filter(|j| concluded && j.starts_with('f')) else {
                continue;
            };
            let Ok(ids) = engine.store.list() else {
                continue;
            };
            let Some(id) = ids.into_iter().find(|id| flatten_job_id(id) == job) else {
                continue;
            };
            engine.qmp.until_live().await;
            let flushed = engine
                .flush_concluded_flatten(&id)
                .await
                .unwrap_or_else(|e| {
                    tracing::warn!(volume = %id, error = %e, "flushing a flattened clone failed");
                    false
                });
            // The volume may be busy with an operation: retry for a while;
            // every later operation on it settles as well.
            for _ in 0..600 {
                engine.qmp.until_live().await;
                if let Ok(_g) = engine.locks.try_lock(&id) {
                    let settled = match engine.store.load(&id) {
                        Ok(Some(rec)) => engine.settle_flatten_with(&rec, flushed).await,
                        Ok(None) => Ok(false),
                        Err(e) => Err(e.into()),
                    };
                    match settled {
                        Ok(true) => {
                            releases.send(id.clone());
                        }
                        Ok(false) => {}
                        Err(e) => {
                            tracing::warn!(volume = %id, error = %e, "settling flatten failed")
                        }
                    }
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    })
}
