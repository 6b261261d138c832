//! Volumes: create, list, read, delete (kept while snapshots exist), expand.

use std::path::PathBuf;

use serde_json::{Value, json};

use super::engine::{Engine, Result, node_add_args};
use super::hidden_base::hidden_base_id;
use super::qemu_img;
use super::record::{ExportTarget, VolumeRecord};
use super::types::{VolumeInfo, info};
use crate::error::EngineError;
use livedisk_common::VolumeId;

impl Engine {
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
    /// only the active layer goes. A clone's hidden base goes with it (see
    /// `hidden_base.rs`): if it cannot go now the call fails, and a repeat,
    /// which finds the volume gone, deletes the base.
    pub async fn delete_volume(&self, id: &VolumeId) -> Result<()> {
        let _g = self.locks.try_lock(id)?;
        if self.store.load(id)?.is_some() {
            self.refuse_if_migrating(id)?;
        }
        let rec = match self.store.load(id)? {
            Some(rec) if !rec.deleted => rec,
            Some(_) => return Err(EngineError::NotFound(format!("volume {id}"))),
            None => {
                let base = hidden_base_id(id);
                if self.locate(&base).is_err() {
                    return Err(EngineError::NotFound(format!("volume {id}")));
                }
                return self.delete_hidden_base(&base).await;
            }
        };
        let mut rec = self.settled(rec).await?;
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
            if rec.clone_of.as_ref().is_some_and(|c| c.remote.is_some()) {
                self.discard_remote_origin(id).await;
            }
            if let Some(base) = rec
                .cloned_from
                .as_ref()
                .and_then(|c| c.hidden_base.as_ref())
            {
                self.delete_hidden_base(base).await?;
            }
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
        self.refuse_if_migrating(id)?;
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
}
