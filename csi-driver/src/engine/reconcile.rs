//! Recovery: bringing the daemon in line with the records after any
//! interruption (interrupted snapshots and merges, orphans, lost nodes).

use super::*;

impl Engine {
    /// Node name -> `backing_file_depth` of every named node in the daemon.
    /// Not `flat`: QEMU 7.2 reports depth 0 for every node in flat mode.
    pub(super) async fn node_depths(&self) -> Result<HashMap<String, u64>> {
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
    pub(super) fn chain_files(&self, rec: &VolumeRecord, upto: usize) -> Result<Vec<PathBuf>> {
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
    pub(super) async fn resolve_pending_snapshot(&self, id: &VolumeId) -> Result<()> {
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

    /// Decides an internal seal (the overlay put on the active layer before
    /// merging it away) interrupted around its transaction: the same
    /// evidence and decision as an interrupted snapshot. Rolled back, the
    /// merge stays in flight and seals again when it is finished.
    pub(super) async fn resolve_merge_seal(&self, id: &VolumeId) -> Result<()> {
        let rec = self.load(id)?;
        let Some(InFlight::Merge {
            snapshot,
            seal: Some(n),
            ..
        }) = rec.in_flight.clone()
        else {
            return Ok(());
        };
        let depths = self.node_depths().await?;
        let overlay_file = self.vol_dir(id).join(VolumeRecord::layer_file(n));
        let has_volume = rec
            .active()
            .is_some_and(|a| depths.contains_key(&rec.node_name(a.seq)));
        let evidence = if has_volume {
            SnapshotEvidence::DaemonHasVolume {
                overlay_backed: depths.get(&rec.node_name(n)).map(|d| *d > 0),
            }
        } else {
            SnapshotEvidence::FilesOnly {
                overlay_valid: qemu_img::is_qcow2(&overlay_file).await?,
            }
        };
        let decision = recover::resolve_snapshot(evidence);
        tracing::info!(volume = %id, %snapshot, overlay = n, ?evidence, ?decision, "interrupted internal seal");
        match decision {
            SnapshotResolution::RollForward => {
                // No job has started on the sealed layer yet.
                let sealed = rec
                    .active()
                    .map(|a| a.seq)
                    .ok_or_else(|| EngineError::NotFound(format!("volume {id}")))?;
                let map = qemu_img::layer_allocation(
                    &self.vol_dir(id).join(VolumeRecord::layer_file(sealed)),
                )
                .await?;
                self.store.save(&plan::seal_internal(&rec, n, &map)?)?;
            }
            SnapshotResolution::RollBack => {
                self.blockdev_del(&rec.node_name(n)).await?;
                remove_file_if_exists(&overlay_file)?;
                let mut rec = rec;
                if let Some(InFlight::Merge { seal, .. }) = rec.in_flight.as_mut() {
                    *seal = None;
                }
                self.store.save(&rec)?;
            }
        }
        Ok(())
    }

    /// Decides an active commit interrupted after `job-complete` may have
    /// been sent (see `recover::resolve_completing`).
    pub(super) async fn resolve_completing_merge(&self, id: &VolumeId) -> Result<()> {
        let mut rec = self.load(id)?;
        let Some(InFlight::Merge {
            snapshot,
            job,
            mode: MergeMode::Commit,
            phase: MergePhase::Completing,
            ..
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
                        seal: None,
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
    pub(super) async fn sweep_orphans(&self, rec: &VolumeRecord) -> Result<()> {
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
    pub(super) async fn reconcile(&self, id: &VolumeId) -> Result<()> {
        self.resolve_pending_snapshot(id).await?;
        self.resolve_merge_seal(id).await?;
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
}
