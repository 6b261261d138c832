//! Cross-node restore: a volume made on this node from a snapshot another node holds.
//!
//! The new volume is a clone like a local one (`clone.rs`): an empty bottom layer, usable at
//! once, flattened in the background by the same `block-stream` job. Only its backing differs:
//! instead of the source's sealed layer it is an NBD client (read-only, over TLS with this
//! node's certificate, reconnecting after a blip) of the owner's export of the snapshot. The
//! layer file's header names no backing file; the record does (`CloneSource::remote`), so every
//! open of the layer (recovery after a restart) puts the client back under it. Once the
//! stream has copied everything, the record stops naming the source and the client and its
//! credentials are removed.
//!
//! While it is not flattened the volume refuses reverts and snapshot deletions: recovery's
//! offline decisions read layer files, and the source's data is not in any file here.

use serde_json::Value;

use super::engine::{Engine, Result, node_add_args};
use super::qemu_img;
use super::record::{CloneSource, RemoteOrigin, VolumeRecord};
use super::remote::{RemoteRecord, RemoteSource};
use super::types::{VolumeInfo, info};
use crate::error::EngineError;
use livedisk_common::{SnapshotId, VolumeId};

/// A snapshot another node serves to this one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteSnapshot {
    /// Its owner's export front, the export's name (the snapshot's ID) and this node's
    /// credentials.
    pub source: RemoteSource,
    /// The volume the snapshot belongs to, on its owner.
    pub volume: VolumeId,
    pub snapshot: SnapshotId,
    /// The snapshot's size in bytes (the export's).
    pub size: u64,
}

impl Engine {
    /// A new volume with the content of a snapshot `src` that another node holds, usable at once
    /// (reads of what is not copied yet go over the network) and flattened in the background at
    /// `flatten_speed` bytes/s (unlimited if `None`). `size` as in
    /// [`Engine::create_volume_from_snapshot`]. Idempotent for the same source and size.
    pub async fn create_volume_from_remote_snapshot(
        &self,
        id: &VolumeId,
        src: &RemoteSnapshot,
        size: Option<u64>,
        flatten_speed: Option<u64>,
    ) -> Result<VolumeInfo> {
        let _g = self.locks.try_lock(id)?;
        let size = size.unwrap_or(src.size).div_ceil(512) * 512;
        if size < src.size {
            return Err(EngineError::OutOfRange(format!(
                "snapshot {} is {} bytes; a volume from it cannot be {size}",
                src.snapshot, src.size
            )));
        }
        if let Some(rec) = self.store.load(id)? {
            let same = rec.size == size
                && !rec.deleted
                && rec
                    .clone_of
                    .as_ref()
                    .is_none_or(|c| c.snapshot == src.snapshot);
            return if same {
                Ok(info(&rec))
            } else {
                Err(EngineError::AlreadyExists(format!("volume {id}")))
            };
        }
        if self.locate(&src.snapshot).is_ok() {
            return Err(EngineError::FailedPrecondition(format!(
                "snapshot {} is held by this node: restore it locally",
                src.snapshot
            )));
        }
        if self.remote_record(id)?.is_some() {
            return Err(EngineError::FailedPrecondition(format!(
                "volume {id} is attached remotely on this node"
            )));
        }
        let origin = RemoteOrigin {
            host: src.source.host.clone(),
            port: src.source.port,
            export: src.source.export.clone(),
        };
        // The connection first: a source that cannot be reached (or refuses this node) leaves
        // nothing behind.
        self.write_remote_tls(id, &src.source)?;
        let backing = match self.open_remote_origin(id, &origin).await {
            Ok(node) => node,
            Err(e) => {
                self.discard_remote_origin(id).await;
                return Err(e);
            }
        };
        let dir = self.vol_dir(id);
        let made = async {
            std::fs::create_dir_all(&dir)?;
            qemu_img::create(&dir.join(VolumeRecord::layer_file(0)), size, None).await?;
            Ok::<(), EngineError>(())
        }
        .await;
        if let Err(e) = made {
            self.discard_remote_origin(id).await;
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        let mut rec = VolumeRecord::new(id.clone(), size);
        rec.clone_of = Some(CloneSource {
            volume: src.volume.clone(),
            layer: 0,
            snapshot: src.snapshot.clone(),
            flatten_speed,
            remote: Some(origin),
        });
        // Durable before the daemon knows it: recovery re-adds and flattens.
        self.store.save(&rec)?;
        self.qmp
            .execute(
                "blockdev-add",
                node_add_args(&dir, &rec, 0, Value::String(backing)),
            )
            .await?;
        self.ensure_flatten(&rec).await?;
        tracing::info!(volume = %id, snapshot = %src.snapshot, host = %src.source.host, "volume restored from another node's snapshot; copying it in the background");
        Ok(info(&rec))
    }

    /// The node a clone's bottom layer backs onto, opened if it is a remote clone's NBD client
    /// (after a daemon restart). `None` for a volume that is not an unflattened clone.
    pub(super) async fn open_clone_backing(&self, rec: &VolumeRecord) -> Result<Option<String>> {
        match rec.clone_of.as_ref().and_then(|c| c.remote.as_ref()) {
            Some(origin) => self.open_remote_origin(&rec.id, origin).await.map(Some),
            None => self.clone_backing(rec),
        }
    }

    async fn open_remote_origin(&self, id: &VolumeId, origin: &RemoteOrigin) -> Result<String> {
        let record = RemoteRecord {
            volume: id.clone(),
            host: origin.host.clone(),
            port: origin.port,
            export: origin.export.clone(),
        };
        self.open_remote_node_with(&record, true).await
    }

    /// Removes a remote clone's NBD client and credentials, once nothing reads through them (it
    /// is flattened, or deleted). Failures are logged: `sweep_remote_origin` finds leftovers.
    pub(super) async fn discard_remote_origin(&self, id: &VolumeId) {
        if let Err(e) = self.close_remote_node(id).await {
            tracing::warn!(volume = %id, error = %e, "could not remove the connection to a restored volume's source");
            return;
        }
        if let Err(e) = self.remove_remote_files(id) {
            tracing::warn!(volume = %id, error = %e, "could not remove the credentials of a restored volume's source");
        }
    }

    /// After recovery: the connection and credentials of a remote clone that stands alone now
    /// (a crash between its flatten and their removal).
    pub(super) async fn sweep_remote_origin(&self, rec: &VolumeRecord) -> Result<()> {
        // A volume migrating out mirrors through the same names (`migrate.rs`).
        let in_use = rec.clone_of.as_ref().is_some_and(|c| c.remote.is_some())
            || self.migration_marker(&rec.id)?.is_some()
            || self.remote_record(&rec.id)?.is_some();
        if !in_use && self.has_remote_files(&rec.id) {
            self.discard_remote_origin(&rec.id).await;
        }
        Ok(())
    }

    /// Refuses what an unflattened remote clone cannot do yet (see the module's comment).
    pub(super) fn refuse_if_remote_clone(&self, rec: &VolumeRecord, what: &str) -> Result<()> {
        match &rec.clone_of {
            Some(c) if c.remote.is_some() => Err(EngineError::FailedPrecondition(format!(
                "volume {} is still being copied from snapshot {} on another node; {what} once \
                 it stands alone (its status shows the copy's progress)",
                rec.id, c.snapshot
            ))),
            _ => Ok(()),
        }
    }
}
