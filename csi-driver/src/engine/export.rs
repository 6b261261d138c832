//! NBD exports: the consumer's writable attach path and read-only
//! snapshot views.

use super::*;

impl Engine {
    // ----- exports ---------------------------------------------------------

    pub(super) async fn add_export(
        &self,
        rec: &VolumeRecord,
        target: &ExportTarget,
    ) -> Result<ExportInfo> {
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

    pub(super) async fn remove_export(
        &self,
        rec: &VolumeRecord,
        target: &ExportTarget,
    ) -> Result<()> {
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

    pub(super) async fn export(
        &self,
        volume: &VolumeId,
        target: ExportTarget,
    ) -> Result<ExportInfo> {
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

    pub(super) async fn unexport(&self, volume: &VolumeId, target: ExportTarget) -> Result<()> {
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
