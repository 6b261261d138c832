//! NBD exports: the consumer's writable attach path and read-only
//! snapshot views.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::engine::{Engine, Result};
use super::record::{ExportRecord, ExportTarget, InFlight, SnapshotState, VolumeRecord};
use super::types::ExportInfo;
use super::{bitmap, plan};
use crate::error::EngineError;
use crate::extents::Extent;
use crate::qsd::qmp::{self};
use livedisk_common::{SnapshotId, VolumeId};

/// Bound on waiting for a deleted export to leave the daemon.
const EXPORT_GONE_TIMEOUT: Duration = Duration::from_secs(30);
/// The export list is read again at least this often while no
/// `BLOCK_EXPORT_DELETED` arrives.
const EXPORT_GONE_POLL: Duration = Duration::from_millis(100);
/// How long a refusal "still in use" of an export is taken for a client whose close the daemon
/// has not read yet, before it means a client that is really connected.
const CLIENT_GONE_GRACE: Duration = Duration::from_secs(2);

impl Engine {
    // ----- exports ---------------------------------------------------------

    /// Serves an export as its record describes. A snapshot export with a
    /// base (`changed_since`) also publishes its changed-block bitmap (see
    /// `engine/bitmap.rs`); building it needs the snapshot's export not to
    /// be served yet, which holds when the record is new or the daemon
    /// restarted.
    pub(super) async fn add_export(
        &self,
        rec: &VolumeRecord,
        export: &ExportRecord,
    ) -> Result<ExportInfo> {
        self.add_export_with(rec, export, None).await
    }

    /// `add_export` with the changed-block list already at hand (a new
    /// export computed and froze it); `None`: read it back (recovery).
    async fn add_export_with(
        &self,
        rec: &VolumeRecord,
        export: &ExportRecord,
        list: Option<&[Extent]>,
    ) -> Result<ExportInfo> {
        let target = &export.target;
        let (name, eid) = rec.export_names(target);
        let (node, writable) = match target {
            ExportTarget::Volume | ExportTarget::Import => {
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
        let mut args = json!({
            "type": "nbd", "id": eid, "node-name": node, "name": name,
            "writable": writable,
            // Publishes qemu:allocation-depth so readers can tell this
            // layer's own clusters from its backing's.
            "allocation-depth": true,
        });
        let mut dirty_bitmap = None;
        if let (ExportTarget::Snapshot { id }, Some(base)) = (target, &export.changed_since) {
            dirty_bitmap = Some(bitmap::context_name(base));
            if self.export_ids().await?.contains(&eid) {
                // Served already (re-attached to a live daemon): it may only
                // be left alone if it publishes this very bitmap.
                if self.serves_bitmap(id, base).await? {
                    return Ok(self.export_info(name, writable, dirty_bitmap));
                }
                return Err(EngineError::AlreadyExists(format!(
                    "export of snapshot {id} (served without the bitmap changed since {base}; \
                     stop the export first)"
                )));
            }
            let owned;
            let list = match list {
                Some(l) => l,
                None => {
                    owned = self.export_changed_extents(rec, id, base)?;
                    &owned
                }
            };
            let b = self.build_changed_bitmap(rec, id, base, list).await?;
            tracing::info!(snapshot = %id, %base, build = ?b, "changed-block bitmap built");
            args["bitmaps"] =
                json!([{ "node": bitmap::helper_node(id), "name": bitmap::bitmap_name(base) }]);
        }
        let r = self.qmp.execute("block-export-add", args).await;
        match r {
            Ok(_) => {}
            Err(e) if e.desc_contains("already") => {}
            Err(e) => {
                if let (ExportTarget::Snapshot { id }, Some(_)) = (target, &export.changed_since)
                    && let Err(e2) = self.drop_changed_bitmap(rec, id).await
                {
                    tracing::warn!(snapshot = %id, error = %e2, "could not remove bitmap helper");
                }
                return Err(e.into());
            }
        }
        Ok(self.export_info(name, writable, dirty_bitmap))
    }

    fn export_info(
        &self,
        name: String,
        writable: bool,
        dirty_bitmap: Option<String>,
    ) -> ExportInfo {
        ExportInfo {
            name,
            socket: self.daemon().runtime.nbd_socket(),
            writable,
            dirty_bitmap,
        }
    }

    /// True when the helper node of `snap` carries the bitmap changed since
    /// `base` (the export then publishes it: only exports add helpers).
    async fn serves_bitmap(&self, snap: &SnapshotId, base: &SnapshotId) -> Result<bool> {
        Ok(self.helper_bitmap_sha256(snap, base).await?.is_some())
    }

    /// Stops an export as `rec` names it and waits until it is gone.
    pub(super) async fn remove_export(
        &self,
        rec: &VolumeRecord,
        target: &ExportTarget,
    ) -> Result<()> {
        let (_, eid) = rec.export_names(target);
        self.delete_export_and_wait(&eid).await?;
        if *target == ExportTarget::Volume && self.remote_record(&rec.id)?.is_none() {
            // The consumer's export of a volume that came to this node under a remote
            // attachment sat on the attachment's filter node (`localize_remote_attachment`).
            self.remove_remote_filter(&rec.id).await?;
        }
        Ok(())
    }

    /// Deletes an export (safe mode: refused while a client is connected)
    /// and returns once the daemon no longer lists it; absent already:
    /// nothing to wait for. The one way the engine stops an export: the
    /// consumer's, a snapshot's, and the internal writer export of a bitmap
    /// build (a bitmap's helper node may only go once no export is left).
    ///
    /// `BLOCK_EXPORT_DELETED` only wakes the wait; `query-block-exports` is
    /// the truth (a lagging event subscriber, or a late event of an earlier
    /// export with the same id, must not make us believe it gone), read
    /// again at least every `EXPORT_GONE_POLL`.
    pub(super) async fn delete_export_and_wait(&self, eid: &str) -> Result<()> {
        // Subscribed before the command, so its event cannot slip past.
        let mut rx = self.qmp.subscribe();
        let in_use_until = Instant::now() + CLIENT_GONE_GRACE;
        loop {
            match self
                .qmp
                .execute("block-export-del", json!({ "id": eid }))
                .await
            {
                Ok(_) => break,
                Err(e) if e.desc_contains("not found") => return Ok(()),
                // Shutting down already: wait for it below.
                Err(e) if e.desc_contains("already shutting down") => break,
                // A client that has just closed its end is still counted until the daemon
                // reads the close; one that stays connected makes the volume busy.
                Err(e) if e.desc_contains("still in use") => {
                    if Instant::now() >= in_use_until {
                        return Err(EngineError::Busy(format!(
                            "export {eid} (a client is still connected)"
                        )));
                    }
                    tokio::time::sleep(EXPORT_GONE_POLL / 2).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
        let deadline = Instant::now() + EXPORT_GONE_TIMEOUT;
        loop {
            let wait = EXPORT_GONE_POLL.min(deadline.saturating_duration_since(Instant::now()));
            // Woken by the event or after `wait`; a closed session shows
            // in the query below.
            let _ = qmp::wait_event(&mut rx, "BLOCK_EXPORT_DELETED", wait, |e| {
                e.event == "BLOCK_EXPORT_DELETED"
                    && e.data.get("id").and_then(Value::as_str) == Some(eid)
            })
            .await;
            if !self.export_ids().await?.contains(eid) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(EngineError::Busy(format!(
                    "export {eid} (still shutting down after {EXPORT_GONE_TIMEOUT:?}: \
                     a client is still connected)"
                )));
            }
        }
    }

    pub(super) async fn export(
        &self,
        volume: &VolumeId,
        target: ExportTarget,
        changed_since: Option<SnapshotId>,
    ) -> Result<ExportInfo> {
        let _g = self.locks.try_lock(volume)?;
        let rec = self.settled(self.load(volume)?).await?;
        // A changed-since export is built from the extent records.
        let mut rec = if changed_since.is_some() {
            self.capture_locked(rec).await?
        } else {
            rec
        };
        if let ExportTarget::Snapshot { id } = &target {
            self.refuse_if_migrating(volume)?;
            match rec.snapshot(id) {
                None => return Err(EngineError::NotFound(format!("snapshot {id}"))),
                Some(s) if s.state != SnapshotState::Ready => {
                    return Err(plan::PlanError::SnapshotDeleting(id.clone()).into());
                }
                Some(_) => {}
            }
            if super::merge_pause::merge_hides_snapshot(&rec, id)
                && let Some(InFlight::Merge { job, .. }) = &rec.in_flight
                && self.job_status(job).await?.is_some()
            {
                return Err(EngineError::Busy(format!(
                    "snapshot {id}: its layer is being merged by job {job}; export it once the merge is done"
                )));
            }
        } else if rec.deleted {
            return Err(EngineError::NotFound(format!("volume {volume}")));
        } else if !rec.exports.iter().any(|e| e.target == target) {
            // A consumer export added while a migration's mirror runs would sit below the
            // mirror's filter and not follow the pivot: it waits until the migration ended.
            self.refuse_new_consumer_while_mirroring(volume)?;
        }
        let want = ExportRecord {
            target: target.clone(),
            changed_since,
        };
        match rec.exports.iter().find(|e| e.target == target) {
            // Idempotent: the same export again.
            Some(e) if *e == want => return self.add_export(&rec, &want).await,
            Some(e) => {
                return Err(EngineError::AlreadyExists(format!(
                    "export of {} ({}; stop the export first)",
                    rec.export_names(&target).0,
                    match &e.changed_since {
                        Some(b) => format!("served changed since {b}"),
                        None => "served without a changed-block bitmap".into(),
                    }
                )));
            }
            None => {}
        }
        let mut frozen = None;
        if let (ExportTarget::Snapshot { id }, Some(base)) = (&target, &want.changed_since) {
            // Same checks and errors as `delta`; the list is frozen before
            // the daemon changes, so a crash leaves at worst a file that
            // recovery sweeps.
            let list = self.delta_list(&rec, base, id)?;
            self.save_changed_file(volume, id, base, &list)?;
            frozen = Some(list);
        }
        let info = match self.add_export_with(&rec, &want, frozen.as_deref()).await {
            Ok(i) => i,
            Err(e) => {
                if let ExportTarget::Snapshot { id } = &target
                    && want.changed_since.is_some()
                {
                    let _ = self.remove_changed_file(volume, id);
                }
                return Err(e);
            }
        };
        rec.exports.push(want);
        self.store.save(&rec)?;
        Ok(info)
    }

    pub(super) async fn unexport(&self, volume: &VolumeId, target: ExportTarget) -> Result<()> {
        let _g = self.locks.try_lock(volume)?;
        let mut rec = self.load(volume)?;
        // What the record says of the export's bitmap. A plain export never
        // had a helper; one the record does not name at all may have been
        // left half-built by an interrupted export, so it is cleaned up as
        // if it had one. (Helpers a crash leaves behind a plain export are
        // found by recovery's `sweep_export_helpers`.)
        let has_bitmap = match rec.exports.iter().find(|e| e.target == target) {
            Some(e) => e.changed_since.is_some(),
            None => true,
        };
        // The consumer export's id is also that of a remote attachment's export of the volume:
        // one this record does not name is the attachment's, not ours to stop.
        if target == ExportTarget::Volume
            && !rec.exports.iter().any(|e| e.target == target)
            && self.remote_record(volume)?.is_some()
        {
            return Ok(());
        }
        self.remove_export(&rec, &target).await?;
        if let ExportTarget::Snapshot { id } = &target
            && has_bitmap
        {
            // After the export is gone, never before (see bitmap.rs).
            self.drop_changed_bitmap(&rec, id).await?;
        }
        rec.exports.retain(|e| e.target != target);
        self.store.save(&rec)?;
        if let ExportTarget::Snapshot { id } = &target {
            // A file operation only: also a frozen list an interrupted
            // export left.
            self.remove_changed_file(volume, id)?;
        }
        Ok(())
    }

    /// Read-only NBD export of a snapshot's point-in-time view.
    pub async fn export_snapshot(&self, snap: &SnapshotId) -> Result<ExportInfo> {
        let rec = self.locate(snap)?;
        self.export(&rec.id, ExportTarget::Snapshot { id: snap.clone() }, None)
            .await
    }

    /// Read-only NBD export of a snapshot's point-in-time view that also
    /// publishes the clusters changed since the older snapshot `base` (same
    /// volume) as the NBD metadata context
    /// `qemu:dirty-bitmap:changed-since-<base>` (`ExportInfo::dirty_bitmap`):
    /// exactly [`Engine::delta`]`(base, snap)`, built from the extent
    /// records without reading volume data. The list is frozen when the
    /// export starts, so the bitmap stays the same after `base` is merged
    /// away and after a daemon restart. Errors as `delta`'s.
    pub async fn export_snapshot_changed_since(
        &self,
        snap: &SnapshotId,
        base: &SnapshotId,
    ) -> Result<ExportInfo> {
        let rec = self.locate(snap)?;
        self.export(
            &rec.id,
            ExportTarget::Snapshot { id: snap.clone() },
            Some(base.clone()),
        )
        .await
    }

    /// Stops a snapshot's export and removes what its bitmap needed.
    pub async fn unexport_snapshot(&self, snap: &SnapshotId) -> Result<()> {
        let rec = self.locate(snap)?;
        self.unexport(&rec.id, ExportTarget::Snapshot { id: snap.clone() })
            .await
    }

    /// Writable NBD export of the volume for its consumer. It follows the
    /// active layer across snapshots and merges (QEMU moves the export's
    /// node), and is re-created from the record after a daemon restart.
    pub async fn attach_volume(&self, volume: &VolumeId) -> Result<ExportInfo> {
        self.export(volume, ExportTarget::Volume, None).await
    }

    /// The writable export another node is served (a remote attachment, or a migration's
    /// source mirroring into its import): the consumer export, shared with a local consumer.
    ///
    /// An incoming migration's volume on a node that also attaches it remotely (its consumer
    /// came here before its disk) is served under [`ExportTarget::Import`] instead: the remote
    /// attachment's export holds the consumer export's name, and the source's mirror must
    /// reach the import, not write back into itself through that attachment. It stays the
    /// import until no grant names it (`detach_import`), also after the handover.
    pub async fn serve_volume(&self, volume: &VolumeId) -> Result<ExportInfo> {
        let target = if self.serves_import(volume)? {
            ExportTarget::Import
        } else {
            ExportTarget::Volume
        };
        self.export(volume, target, None).await
    }

    /// Whether `serve_volume` serves `volume` as an import: it does already, or the volume
    /// is an incoming migration's and this node attaches it remotely.
    pub fn serves_import(&self, volume: &VolumeId) -> Result<bool> {
        let Some(rec) = self.store.load(volume)? else {
            return Ok(false);
        };
        if rec.exports.iter().any(|e| e.target == ExportTarget::Import) {
            return Ok(true);
        }
        Ok(self.is_incoming(volume)? && self.remote_record(volume)?.is_some())
    }

    pub async fn detach_volume(&self, volume: &VolumeId) -> Result<()> {
        self.unexport(volume, ExportTarget::Volume).await
    }

    /// Stops the import export of `volume` (see [`Engine::serve_volume`]). Idempotent.
    pub async fn detach_import(&self, volume: &VolumeId) -> Result<()> {
        self.unexport(volume, ExportTarget::Import).await
    }
}
