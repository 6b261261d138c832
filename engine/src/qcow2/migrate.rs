//! Live migration of a volume to another node's engine.
//!
//! The source serves, read-only, the raw bytes of its sealed layer files and a copy of the
//! volume's record (its *manifest*) as NBD exports; the target copies them into its pool
//! (`import_layer`, `import_finish`), puts an empty active layer on top and serves it. The
//! source then opens the target's writable export as an NBD client node (the same node a remote
//! attachment uses) and runs `blockdev-mirror` of its active layer into it with `sync=top` (the
//! sealed layers are there already) and `copy-mode=write-blocking` (once converged, a write is
//! acknowledged only after it reached both nodes, so the mirror converges whatever the writer's
//! rate). `job-complete` pivots: the consumer's export then writes through the NBD client to
//! the target, and the source's chain is retired; a consumer still attached on the source stays
//! there as a remote attachment.
//!
//! A marker file in the volume directory (`migration.json`) says which side of a migration a
//! volume is on and how far it got: while it exists, operations that would change the chain
//! (snapshots, merges, reverts, expansion, deletion, clones, snapshot exports) are refused, and
//! recovery after a crash knows what to finish.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

use super::engine::{Engine, Result};
use super::qemu_img;
use super::record::{ExportTarget, RECORD_FILE, VolumeRecord, atomic_write, atomic_write_private};
use super::remote::{RemoteRecord, RemoteSource};
use super::types::Recovery;
use crate::error::EngineError;
use crate::qsd::qmp;
use livedisk_common::VolumeId;

const MARKER_FILE: &str = "migration.json";
const MANIFEST_FILE: &str = "migration-manifest.json";
/// Where a target assembles a volume before it enters the pool.
const INCOMING_DIR: &str = "incoming";
/// How long the cutover waits for the mirror to pivot.
const PIVOT_TIMEOUT: Duration = Duration::from_secs(60);

/// The dirty bitmap that records what reaches the target from just before `job-complete`.
const VERIFY_BITMAP: &str = "migverify";
/// How much the verification reads per request from each side.
const VERIFY_CHUNK: u64 = 4 << 20;

/// What the post-cutover comparison found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verification {
    /// Bytes compared (the volume less what the verify bitmap marked).
    pub compared: u64,
    /// Bytes skipped because they were written after the bitmap started.
    pub skipped: u64,
    /// The offset of the first chunk that differs, if any.
    pub first_difference: Option<u64>,
}

/// Which side of a migration this node's copy of a volume is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum MigrationRole {
    Source,
    Target,
}

/// How far the source got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum MigrationStep {
    /// Sealed layers are served for copying; nothing else changed.
    Copying,
    /// The mirror into the target may run.
    Mirroring,
    /// `job-complete` may have been sent: writes may go to the target only.
    Pivoting,
}

/// The marker of a volume being migrated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MigrationMarker {
    pub role: MigrationRole,
    pub step: MigrationStep,
    /// The target's front (source side, once mirroring).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<u16>,
    /// The export the mirror writes into on the target: the volume's ID, or its import name
    /// when the target also attaches the volume remotely (`ExportTarget::Import`). Absent in
    /// markers written before it was recorded: the volume's ID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_export: Option<String>,
}

/// What the source serves for the copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedFiles {
    pub manifest_export: String,
    pub manifest_length: u64,
    pub manifest_sha256: String,
    /// Sealed layers, base first: (layer number, export name, file length).
    pub layers: Vec<(u64, String, u64)>,
}

/// Where a running mirror is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MirrorProgress {
    /// Converged: `job-complete` may be sent.
    pub ready: bool,
    pub done: u64,
    pub total: u64,
}

/// Where to read one of the source's files, and with which credentials.
#[derive(Debug, Clone)]
pub struct FileSource<'a> {
    pub host: &'a str,
    pub port: u16,
    pub export: &'a str,
    pub ca_pem: &'a str,
    pub cert_pem: &'a str,
    pub key_pem: &'a str,
}

fn hex(volume: &VolumeId) -> String {
    volume.hex()[..24].to_string()
}

fn manifest_node(volume: &VolumeId) -> String {
    format!("mm{}", &volume.hex()[..16])
}

fn layer_node(volume: &VolumeId, seq: u64) -> String {
    format!("ml{}-{seq}", &volume.hex()[..16])
}

/// Export names on the wire (also the names the front's grants use).
pub fn manifest_export(volume: &VolumeId) -> String {
    format!("mm-{}", hex(volume))
}

pub fn layer_export(volume: &VolumeId, seq: u64) -> String {
    format!("ml-{}-{seq}", hex(volume))
}

fn mirror_job(volume: &VolumeId) -> String {
    format!("migrate-{}", hex(volume))
}

/// Why a volume cannot be migrated now, or `None`. Pure: decided from the record alone.
pub fn refusal(rec: &VolumeRecord) -> Option<String> {
    let id = &rec.id;
    if rec.deleted {
        return Some(format!(
            "volume {id} is deleted (only its snapshots remain)"
        ));
    }
    if rec.clone_of.is_some() {
        return Some(format!(
            "volume {id} is a clone that still reads another volume's layer; wait until it is \
             flattened"
        ));
    }
    if rec.hidden_bases().next().is_some() {
        return Some(format!(
            "volume {id} has clones that still read its layers; wait until they are flattened"
        ));
    }
    if rec.in_flight.is_some() || rec.pending_snapshot.is_some() || rec.pending_revert.is_some() {
        return Some(format!(
            "volume {id} has a snapshot, merge or revert in progress"
        ));
    }
    if rec
        .snapshots
        .iter()
        .any(|s| s.state != super::record::SnapshotState::Ready)
    {
        return Some(format!("volume {id} has a snapshot being deleted"));
    }
    if rec
        .exports
        .iter()
        .any(|e| matches!(e.target, ExportTarget::Snapshot { .. }))
    {
        return Some(format!(
            "volume {id} has snapshot exports; stop them (delete the DiskExports) first"
        ));
    }
    if rec.active().is_none() {
        return Some(format!("volume {id} has no active layer"));
    }
    None
}

/// The manifest's bytes: the record as JSON, padded with spaces to whole 512-byte sectors (an
/// NBD export's size is a multiple of the sector size; JSON ignores trailing white space).
fn manifest_bytes(rec: &VolumeRecord) -> Result<(Vec<u8>, u64, String)> {
    let mut body = serde_json::to_vec_pretty(rec).map_err(io::Error::other)?;
    let length = body.len() as u64;
    let sha = sha256_hex(&body);
    body.resize(body.len().div_ceil(512) * 512, b' ');
    Ok((body, length, sha))
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl Engine {
    fn marker_path(&self, volume: &VolumeId) -> PathBuf {
        self.vol_dir(volume).join(MARKER_FILE)
    }

    /// The migration marker of a volume this node holds, if it is being migrated.
    pub fn migration_marker(&self, volume: &VolumeId) -> Result<Option<MigrationMarker>> {
        read_marker(&self.marker_path(volume))
    }

    fn write_marker(&self, volume: &VolumeId, marker: &MigrationMarker) -> Result<()> {
        let body = serde_json::to_vec_pretty(marker).map_err(io::Error::other)?;
        atomic_write(&self.marker_path(volume), &body)?;
        Ok(())
    }

    /// Refuses an operation that would change the chain of a volume being migrated.
    pub(super) fn refuse_if_migrating(&self, volume: &VolumeId) -> Result<()> {
        match self.migration_marker(volume)? {
            None => Ok(()),
            Some(m) => Err(EngineError::Busy(format!(
                "volume {volume} is being migrated ({} side); try again once the migration ended",
                match m.role {
                    MigrationRole::Source => "source",
                    MigrationRole::Target => "target",
                }
            ))),
        }
    }

    /// Refuses a new consumer export of a volume whose mirror may run (see `export`).
    pub(super) fn refuse_new_consumer_while_mirroring(&self, volume: &VolumeId) -> Result<()> {
        match self.migration_marker(volume)? {
            Some(m) if m.role == MigrationRole::Source && m.step != MigrationStep::Copying => {
                Err(EngineError::Busy(format!(
                    "volume {volume} is being migrated to another node; attach it once the \
                     migration ended"
                )))
            }
            _ => Ok(()),
        }
    }

    // ----- source ----------------------------------------------------------

    /// Starts (or finds) a migration out of this node: checks the volume, captures every extent
    /// record, marks the volume and serves its manifest and sealed layer files read-only on the
    /// daemon's NBD socket. Idempotent.
    pub async fn migrate_out_begin(&self, volume: &VolumeId) -> Result<ServedFiles> {
        let _g = self.locks.try_lock(volume)?;
        let rec = self.load(volume)?;
        let marker = self.migration_marker(volume)?;
        if let Some(m) = &marker
            && m.role != MigrationRole::Source
        {
            return Err(EngineError::FailedPrecondition(format!(
                "volume {volume} is being migrated to this node, not from it"
            )));
        }
        if marker.is_none()
            && let Some(why) = refusal(&rec)
        {
            return Err(EngineError::FailedPrecondition(why));
        }
        // The target's changed-block answers come from these records.
        let rec = self.capture_locked(rec).await?;
        if marker.is_none() {
            self.write_marker(
                volume,
                &MigrationMarker {
                    role: MigrationRole::Source,
                    step: MigrationStep::Copying,
                    target_host: None,
                    target_port: None,
                    target_export: None,
                },
            )?;
        }
        let dir = self.vol_dir(volume);
        let (body, length, sha) = manifest_bytes(&rec)?;
        let manifest = dir.join(MANIFEST_FILE);
        atomic_write_private(&manifest, &body)?;
        self.ensure_nbd_server().await?;
        self.serve_file(&manifest, &manifest_node(volume), &manifest_export(volume))
            .await?;
        let mut layers = vec![];
        for l in rec.layers.iter().filter(|l| l.sealed_by.is_some()) {
            let file = dir.join(VolumeRecord::layer_file(l.seq));
            let bytes = fs::metadata(&file)?.len();
            let export = layer_export(volume, l.seq);
            self.serve_file(&file, &layer_node(volume, l.seq), &export)
                .await?;
            layers.push((l.seq, export, bytes));
        }
        // Internal (sealed by nobody) layers below the active one are sealed too.
        for l in rec
            .layers
            .iter()
            .rev()
            .skip(1)
            .filter(|l| l.sealed_by.is_none())
        {
            let file = dir.join(VolumeRecord::layer_file(l.seq));
            let bytes = fs::metadata(&file)?.len();
            let export = layer_export(volume, l.seq);
            self.serve_file(&file, &layer_node(volume, l.seq), &export)
                .await?;
            layers.push((l.seq, export, bytes));
        }
        layers.sort_by_key(|l| rec.layers.iter().position(|x| x.seq == l.0));
        Ok(ServedFiles {
            manifest_export: manifest_export(volume),
            manifest_length: length,
            manifest_sha256: sha,
            layers,
        })
    }

    /// A read-only raw view of one file, exported on the daemon's socket.
    async fn serve_file(&self, file: &Path, node: &str, export: &str) -> Result<()> {
        let added = self
            .qmp
            .execute(
                "blockdev-add",
                json!({
                    "driver": "file", "node-name": node, "filename": file,
                    "read-only": true,
                }),
            )
            .await;
        match added {
            Ok(_) => {}
            Err(e) if e.desc_contains("Duplicate") || e.desc_contains("already") => {}
            Err(e) => return Err(e.into()),
        }
        let exported = self
            .qmp
            .execute(
                "block-export-add",
                json!({
                    "type": "nbd", "id": export, "node-name": node, "name": export,
                    "writable": false,
                }),
            )
            .await;
        match exported {
            Ok(_) => Ok(()),
            Err(e) if e.desc_contains("already") => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Stops serving the manifest and layer files. Idempotent.
    async fn unserve_files(&self, rec: &VolumeRecord) -> Result<()> {
        let volume = &rec.id;
        let mut pairs = vec![(manifest_node(volume), manifest_export(volume))];
        for l in &rec.layers {
            pairs.push((layer_node(volume, l.seq), layer_export(volume, l.seq)));
        }
        for (node, export) in pairs {
            self.delete_export_and_wait(&export).await?;
            self.blockdev_del(&node).await?;
        }
        super::engine::remove_file_if_exists(&self.vol_dir(volume).join(MANIFEST_FILE))
    }

    /// Connects to the target's writable export of the volume and mirrors the active layer into
    /// it (`sync=top`, write-blocking). Idempotent: a running mirror is left alone.
    pub async fn mirror_start(
        &self,
        volume: &VolumeId,
        target: &RemoteSource,
        speed: Option<u64>,
    ) -> Result<()> {
        let _g = self.locks.try_lock(volume)?;
        let rec = self.load(volume)?;
        let Some(marker) = self.migration_marker(volume)? else {
            return Err(EngineError::FailedPrecondition(format!(
                "volume {volume} is not being migrated"
            )));
        };
        if marker.step == MigrationStep::Pivoting {
            return Ok(());
        }
        let job = mirror_job(volume);
        if qmp::query_jobs(&self.qmp)
            .await?
            .iter()
            .any(|j| j.id == job && j.status != "concluded")
        {
            return Ok(());
        }
        self.write_marker(
            volume,
            &MigrationMarker {
                step: MigrationStep::Mirroring,
                target_host: Some(target.host.clone()),
                target_port: Some(target.port),
                target_export: Some(target.export.clone()),
                ..marker
            },
        )?;
        self.write_remote_tls(volume, target)?;
        let node = self
            .open_remote_node(&RemoteRecord {
                volume: volume.clone(),
                host: target.host.clone(),
                port: target.port,
                export: target.export.clone(),
            })
            .await?;
        let active = rec
            .active()
            .ok_or_else(|| EngineError::NotFound(format!("volume {volume}")))?;
        let mut args = json!({
            "job-id": job, "device": rec.node_name(active.seq), "target": node,
            "sync": "top", "copy-mode": "write-blocking",
        });
        if let Some(s) = speed.filter(|s| *s > 0) {
            args["speed"] = json!(s);
        }
        self.qmp.execute("blockdev-mirror", args).await?;
        tracing::info!(%volume, host = %target.host, "mirror to the target started");
        Ok(())
    }

    /// The running mirror's progress; `None` when no mirror runs (never started, failed, or
    /// lost with a restarted daemon).
    pub async fn mirror_progress(&self, volume: &VolumeId) -> Result<Option<MirrorProgress>> {
        let job = mirror_job(volume);
        let jobs = qmp::query_jobs(&self.qmp).await?;
        let Some(j) = jobs.into_iter().find(|j| j.id == job) else {
            return Ok(None);
        };
        if let Some(error) = j.error {
            return Err(EngineError::Unreachable(format!(
                "the mirror of volume {volume} failed: {error}"
            )));
        }
        if j.status == "concluded" || j.status == "null" {
            return Ok(None);
        }
        Ok(Some(MirrorProgress {
            ready: j.status == "ready",
            done: j.current_progress,
            total: j.total_progress,
        }))
    }

    /// Changes the running mirror's rate limit (0: unlimited).
    pub async fn mirror_set_speed(&self, volume: &VolumeId, speed: u64) -> Result<()> {
        self.set_job_speed(&mirror_job(volume), speed).await
    }

    /// Gives the migration up before the cutover: the mirror is cancelled, the NBD client and
    /// the served files go, the marker is removed. The source stays what it was. Refused once
    /// the cutover may have pivoted.
    pub async fn migrate_out_abort(&self, volume: &VolumeId) -> Result<()> {
        let _g = self.locks.try_lock(volume)?;
        let Some(marker) = self.migration_marker(volume)? else {
            return Ok(());
        };
        if marker.step == MigrationStep::Pivoting {
            return Err(EngineError::FailedPrecondition(format!(
                "volume {volume}: the cutover has started; the target holds the volume now"
            )));
        }
        let rec = self.load(volume)?;
        self.cancel_mirror(volume).await?;
        self.close_remote_node(volume).await?;
        if self.remote_record(volume)?.is_none() {
            self.remove_remote_files(volume)?;
        }
        self.unserve_files(&rec).await?;
        super::engine::remove_file_if_exists(&self.marker_path(volume))?;
        tracing::info!(%volume, "migration out of this node abandoned; the volume stays here");
        Ok(())
    }

    /// Cancels the mirror job if it runs and waits until it is gone.
    async fn cancel_mirror(&self, volume: &VolumeId) -> Result<()> {
        let job = mirror_job(volume);
        let deadline = Instant::now() + PIVOT_TIMEOUT;
        loop {
            let jobs = qmp::query_jobs(&self.qmp).await?;
            let Some(j) = jobs.into_iter().find(|j| j.id == job) else {
                return Ok(());
            };
            let verb = if j.status == "concluded" {
                "job-dismiss"
            } else {
                "job-cancel"
            };
            let _ = self.qmp.execute(verb, json!({ "id": job })).await;
            if Instant::now() >= deadline {
                return Err(EngineError::Busy(format!(
                    "the mirror of volume {volume} did not stop"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Pivots a converged mirror with `job-complete`. Returns how long the pivot took (QEMU
    /// drains the consumer's I/O for part of it). With `verify`, a dirty bitmap on the NBD
    /// connection to the target starts recording before `job-complete`: every write that
    /// reaches the target from then on (the mirror's last copies, the consumer's writes after
    /// the pivot) passes through that connection, so what it does not mark must read the same
    /// on the target as in the source's old chain ([`Engine::verify_migration_out`]). The old
    /// chain stays until [`Engine::complete_migration_out`]. Idempotent after a crash: a marker
    /// at `Pivoting` is finished, never undone.
    pub async fn cutover(&self, volume: &VolumeId, verify: bool) -> Result<Duration> {
        let _g = self.locks.try_lock(volume)?;
        let Some(marker) = self.migration_marker(volume)? else {
            return Err(EngineError::NotFound(format!(
                "volume {volume} is not being migrated from this node"
            )));
        };
        let job = mirror_job(volume);
        let mut rx = self.qmp.subscribe();
        let started = Instant::now();
        if marker.step != MigrationStep::Pivoting {
            match self.mirror_progress(volume).await? {
                Some(p) if p.ready => {}
                _ => {
                    return Err(EngineError::FailedPrecondition(format!(
                        "the mirror of volume {volume} has not converged"
                    )));
                }
            }
            self.write_marker(
                volume,
                &MigrationMarker {
                    step: MigrationStep::Pivoting,
                    ..marker.clone()
                },
            )?;
        }
        let running = qmp::query_jobs(&self.qmp)
            .await?
            .into_iter()
            .find(|j| j.id == job);
        let pause = match running {
            Some(j) if j.status == "ready" => {
                if verify {
                    let (_, node, _) = super::remote::names(volume);
                    let added = self
                        .qmp
                        .execute(
                            "block-dirty-bitmap-add",
                            json!({ "node": node, "name": VERIFY_BITMAP }),
                        )
                        .await;
                    match added {
                        Ok(_) => {}
                        Err(e) if e.desc_contains("already") => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                let started = Instant::now();
                self.qmp
                    .execute("job-complete", json!({ "id": job }))
                    .await?;
                qmp::wait_event(&mut rx, "BLOCK_JOB_COMPLETED", PIVOT_TIMEOUT, |e| {
                    e.event == "BLOCK_JOB_COMPLETED"
                        && e.data.get("device").and_then(Value::as_str) == Some(job.as_str())
                })
                .await?;
                started.elapsed()
            }
            // Completing already, or completed before a crash: wait for the job to go.
            Some(_) => {
                self.wait_job_gone(&job).await?;
                started.elapsed()
            }
            None => Duration::ZERO,
        };
        Ok(pause)
    }

    /// Compares the source's old chain (frozen at the pivot) with the target, read through the
    /// NBD connection, outside the verify bitmap's dirty ranges. Call between
    /// [`Engine::cutover`] with `verify` and [`Engine::complete_migration_out`].
    pub async fn verify_migration_out(&self, volume: &VolumeId) -> Result<Verification> {
        let _g = self.locks.try_lock(volume)?;
        let rec = self.load(volume)?;
        let active = rec
            .active()
            .ok_or_else(|| EngineError::NotFound(format!("volume {volume}")))?;
        let (_, node, _) = super::remote::names(volume);
        let names = VerifyExports::of(volume);
        let result = async {
            // The target's side is exported writable (nothing writes through it): QEMU refuses
            // an enabled bitmap on a read-only export, and the bitmap must stay enabled to keep
            // recording the consumer's writes while the comparison runs.
            for (id, name, target, writable) in [
                (
                    &names.old_id,
                    &names.old_name,
                    rec.node_name(active.seq),
                    false,
                ),
                (&names.new_id, &names.new_name, node.clone(), true),
            ] {
                let mut args = json!({
                    "type": "nbd", "id": id, "node-name": target, "name": name,
                    "writable": writable,
                });
                if writable {
                    args["bitmaps"] = json!([VERIFY_BITMAP]);
                }
                match self.qmp.execute("block-export-add", args).await {
                    Ok(_) => {}
                    Err(e) if e.desc_contains("already") => {}
                    Err(e) => return Err(e.into()),
                }
            }
            let socket = self.daemon().runtime.nbd_socket();
            compare_outside_dirty(&socket, &names.old_name, &names.new_name, rec.size).await
        }
        .await;
        self.remove_verify_exports(volume).await?;
        result
    }

    /// Removes the comparison's exports (left by an interrupted one too). Idempotent.
    async fn remove_verify_exports(&self, volume: &VolumeId) -> Result<()> {
        let names = VerifyExports::of(volume);
        self.delete_export_and_wait(&names.old_id).await?;
        self.delete_export_and_wait(&names.new_id).await
    }

    /// Ends a migration out of this node after the pivot (finishing a cutover a crash
    /// interrupted first): the source's chain is retired and a consumer attached here goes on
    /// as a remote attachment of the target. Idempotent.
    pub async fn complete_migration_out(&self, volume: &VolumeId) -> Result<()> {
        let _g = self.locks.try_lock(volume)?;
        self.resolve_pivoting(volume).await
    }

    async fn wait_job_gone(&self, job: &str) -> Result<()> {
        let deadline = Instant::now() + PIVOT_TIMEOUT;
        loop {
            let jobs = qmp::query_jobs(&self.qmp).await?;
            match jobs.into_iter().find(|j| j.id == job) {
                None => return Ok(()),
                Some(j) if j.status == "concluded" => {
                    let _ = self.qmp.execute("job-dismiss", json!({ "id": job })).await;
                }
                Some(_) if Instant::now() >= deadline => {
                    return Err(EngineError::Busy(format!("job {job} did not finish")));
                }
                Some(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    /// After the pivot: a consumer export of the volume here becomes a remote attachment of
    /// the target (its record written), otherwise the NBD client goes; then the served files,
    /// the old chain's nodes and the volume's directory go. Idempotent.
    async fn finish_pivot(&self, volume: &VolumeId, marker: &MigrationMarker) -> Result<()> {
        let Some(rec) = self.store.load(volume)? else {
            return Ok(());
        };
        // The comparison's exports hold the old chain's top node (one a crash left included).
        self.remove_verify_exports(volume).await?;
        // The verify bitmap would record the consumer's writes for as long as the node lives.
        let (_, node, _) = super::remote::names(volume);
        let _ = self
            .qmp
            .execute(
                "block-dirty-bitmap-remove",
                json!({ "node": node, "name": VERIFY_BITMAP }),
            )
            .await;
        let consumer = rec
            .exports
            .iter()
            .any(|e| matches!(e.target, ExportTarget::Volume));
        match (consumer, &marker.target_host, marker.target_port) {
            // The NBD client stays connected to the export the mirror wrote into; a restarted
            // daemon opens that one again.
            (true, Some(host), Some(port)) => self.write_remote_record(&RemoteRecord {
                volume: volume.clone(),
                host: host.clone(),
                port,
                export: marker
                    .target_export
                    .clone()
                    .unwrap_or_else(|| volume.to_string()),
            })?,
            _ => {
                self.close_remote_node(volume).await?;
                self.remove_remote_files(volume)?;
            }
        }
        self.unserve_files(&rec).await?;
        for l in rec.layers.iter().rev() {
            self.blockdev_del(&rec.node_name(l.seq)).await?;
        }
        let dir = self.vol_dir(volume);
        let retired = self.store.pool().join(format!(".retired-{volume}"));
        match fs::rename(&dir, &retired) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        sync_dir(self.store.pool())?;
        match fs::remove_dir_all(&retired) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        tracing::info!(%volume, consumer, "volume handed over to the target");
        Ok(())
    }

    /// Recovery of a source whose cutover may have pivoted (a crash after the marker said
    /// `Pivoting`): the pivot is finished, never undone. Called with the volume's lock held.
    pub(super) async fn resolve_pivoting(&self, volume: &VolumeId) -> Result<()> {
        let Some(marker) = self.migration_marker(volume)? else {
            return Ok(());
        };
        if marker.role != MigrationRole::Source || marker.step != MigrationStep::Pivoting {
            return Ok(());
        }
        let job = mirror_job(volume);
        if let Some(j) = qmp::query_jobs(&self.qmp)
            .await?
            .into_iter()
            .find(|j| j.id == job)
        {
            if j.status == "ready" {
                self.qmp
                    .execute("job-complete", json!({ "id": job }))
                    .await?;
            }
            self.wait_job_gone(&job).await?;
        }
        tracing::warn!(%volume, "finishing a cutover interrupted by a crash");
        self.finish_pivot(volume, &marker).await
    }

    // ----- target ----------------------------------------------------------

    fn incoming_dir(&self, volume: &VolumeId) -> PathBuf {
        self.store.pool().join(INCOMING_DIR).join(volume.as_str())
    }

    /// Whether this node's copy of `volume` is an import not yet handed over.
    pub fn is_incoming(&self, volume: &VolumeId) -> Result<bool> {
        Ok(self
            .migration_marker(volume)?
            .is_some_and(|m| m.role == MigrationRole::Target))
    }

    /// Copies one of the source's files into the import directory (`qemu-img convert` over TLS
    /// NBD, holes kept), reporting the bytes copied. `seq` `None`: the manifest. Refused for a
    /// volume this node holds already.
    pub async fn import_file(
        &self,
        volume: &VolumeId,
        seq: Option<u64>,
        bytes: u64,
        source: &FileSource<'_>,
        rate: Option<u64>,
        progress: impl Fn(u64),
    ) -> Result<PathBuf> {
        if self.store.load(volume)?.is_some() {
            return Err(EngineError::AlreadyExists(format!(
                "volume {volume} is in this node's pool already"
            )));
        }
        let dir = self.incoming_dir(volume);
        let tls = dir.join("tls");
        super::remote::write_client_tls(&tls, source.ca_pem, source.cert_pem, source.key_pem)?;
        let out = match seq {
            Some(seq) => dir.join(VolumeRecord::layer_file(seq)),
            None => dir.join(MANIFEST_FILE),
        };
        let partial = out.with_extension("part");
        super::engine::remove_file_if_exists(&partial)?;
        qemu_img::convert_from_nbd(
            &qemu_img::NbdTls {
                host: source.host,
                port: source.port,
                export: source.export,
                tls_dir: &tls,
            },
            &partial,
            rate,
            |fraction| progress((fraction * bytes as f64) as u64),
        )
        .await?;
        // The export is whole sectors; the file is exactly as long as the source's.
        let f = fs::OpenOptions::new().write(true).open(&partial)?;
        f.set_len(bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&partial, &out)?;
        sync_dir(&dir)?;
        progress(bytes);
        Ok(out)
    }

    /// Reads the manifest copied by `import_file`, checks it and returns the record.
    pub fn import_manifest(
        &self,
        volume: &VolumeId,
        length: u64,
        sha256: &str,
    ) -> Result<VolumeRecord> {
        let path = self.incoming_dir(volume).join(MANIFEST_FILE);
        let body = fs::read(&path)?;
        let body = body.get(..length as usize).ok_or_else(|| {
            EngineError::InvalidArgument(format!(
                "the manifest of volume {volume} is shorter than {length} bytes"
            ))
        })?;
        if sha256_hex(body) != sha256 {
            return Err(EngineError::InvalidArgument(format!(
                "the manifest of volume {volume} does not match its SHA-256"
            )));
        }
        let rec: VolumeRecord = serde_json::from_slice(body).map_err(|e| {
            EngineError::InvalidArgument(format!("the manifest of volume {volume}: {e}"))
        })?;
        if &rec.id != volume {
            return Err(EngineError::InvalidArgument(format!(
                "the manifest describes volume {}, not {volume}",
                rec.id
            )));
        }
        Ok(rec)
    }

    /// Turns the copied files into a volume of this node: an empty active layer (numbered as
    /// the source's) on the copied layers, the record (without exports) and a target marker,
    /// moved into the pool in one rename, then opened in the daemon. Idempotent.
    pub async fn import_finish(&self, volume: &VolumeId, mut rec: VolumeRecord) -> Result<()> {
        let _g = self.locks.try_lock(volume)?;
        if self.store.load(volume)?.is_none() {
            let dir = self.incoming_dir(volume);
            let active = rec
                .active()
                .ok_or_else(|| {
                    EngineError::InvalidArgument(format!(
                        "the manifest of {volume} has no active layer"
                    ))
                })?
                .seq;
            let below = rec.layers.iter().rev().nth(1).map(|l| l.seq);
            for l in rec.layers.iter().filter(|l| l.seq != active) {
                if !dir.join(VolumeRecord::layer_file(l.seq)).exists() {
                    return Err(EngineError::FailedPrecondition(format!(
                        "layer {} of volume {volume} has not been copied",
                        l.seq
                    )));
                }
            }
            let backing = below.map(VolumeRecord::layer_file);
            let active_file = dir.join(VolumeRecord::layer_file(active));
            super::engine::remove_file_if_exists(&active_file)?;
            qemu_img::create(&active_file, rec.size, backing.as_deref()).await?;
            rec.exports.clear();
            let body = serde_json::to_vec_pretty(&rec).map_err(io::Error::other)?;
            atomic_write(&dir.join(RECORD_FILE), &body)?;
            let marker = MigrationMarker {
                role: MigrationRole::Target,
                step: MigrationStep::Copying,
                target_host: None,
                target_port: None,
                target_export: None,
            };
            let marker = serde_json::to_vec_pretty(&marker).map_err(io::Error::other)?;
            atomic_write(&dir.join(MARKER_FILE), &marker)?;
            fs::remove_dir_all(dir.join("tls"))?;
            super::engine::remove_file_if_exists(&dir.join(MANIFEST_FILE))?;
            fs::rename(&dir, self.vol_dir(volume))?;
            sync_dir(self.store.pool())?;
        }
        self.reconcile_with(volume, Recovery::Full).await
    }

    /// The handed-over volume is this node's from now on: the target marker goes.
    pub fn import_commit(&self, volume: &VolumeId) -> Result<()> {
        if self.is_incoming(volume)? {
            super::engine::remove_file_if_exists(&self.marker_path(volume))?;
            sync_dir(&self.vol_dir(volume))?;
        }
        Ok(())
    }

    /// Throws an unfinished import away (the source stays the owner): its export, its nodes,
    /// its files. Refused for a volume that is not an import.
    pub async fn import_discard(&self, volume: &VolumeId) -> Result<()> {
        let _g = self.locks.try_lock(volume)?;
        match self.store.load(volume)? {
            Some(rec) => {
                if !self.is_incoming(volume)? {
                    return Err(EngineError::FailedPrecondition(format!(
                        "volume {volume} is held by this node; it is not an import"
                    )));
                }
                // The import's own export; the consumer export only if this node does not
                // also attach the volume remotely (then that id is the attachment's).
                self.remove_export(&rec, &ExportTarget::Import).await?;
                if self.remote_record(volume)?.is_none() {
                    self.remove_export(&rec, &ExportTarget::Volume).await?;
                }
                for l in rec.layers.iter().rev() {
                    self.blockdev_del(&rec.node_name(l.seq)).await?;
                }
                let discarded = self.store.pool().join(format!(".discarded-{volume}"));
                fs::rename(self.vol_dir(volume), &discarded)?;
                sync_dir(self.store.pool())?;
                fs::remove_dir_all(&discarded)?;
            }
            None => match fs::remove_dir_all(self.incoming_dir(volume)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            },
        }
        Ok(())
    }
}

/// The comparison's two exports: the source's old chain, and the target through the NBD
/// connection (with the verify bitmap).
struct VerifyExports {
    old_id: String,
    old_name: String,
    new_id: String,
    new_name: String,
}

impl VerifyExports {
    fn of(volume: &VolumeId) -> Self {
        Self {
            old_id: format!("vo{}", hex(volume)),
            old_name: format!("mig-old-{}", hex(volume)),
            new_id: format!("vn{}", hex(volume)),
            new_name: format!("mig-new-{}", hex(volume)),
        }
    }
}

/// Whether `[offset, offset + length)` lies inside one of `ranges`.
fn inside(ranges: &[(u64, u64)], offset: u64, length: u64) -> bool {
    ranges
        .iter()
        .any(|&(s, l)| s <= offset && offset + length <= s + l)
}

/// The ranges of `[0, size)` a `qemu-img map` of an export with `x-dirty-bitmap` reports as
/// clean (`"data": true`; dirty ranges read as `"data": false`).
async fn clean_ranges(socket: &Path, export: &str) -> Result<Vec<(u64, u64)>> {
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},export={export},x-dirty-bitmap=qemu:dirty-bitmap:{VERIFY_BITMAP}",
        socket.display()
    );
    let out = tokio::process::Command::new("qemu-img")
        .args(["map", "--output=json", "--image-opts", &opts])
        .output()
        .await?;
    if !out.status.success() {
        return Err(EngineError::Io(io::Error::other(format!(
            "qemu-img map of {export}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))));
    }
    clean_from_map(&out.stdout)
}

/// Pure: the `"data": true` entries of `qemu-img map --output=json`, as (offset, length).
fn clean_from_map(json: &[u8]) -> Result<Vec<(u64, u64)>> {
    let entries: Vec<Value> = serde_json::from_slice(json)
        .map_err(|e| EngineError::Io(io::Error::other(format!("qemu-img map output: {e}"))))?;
    Ok(entries
        .iter()
        .filter(|e| e["data"].as_bool() == Some(true))
        .filter_map(|e| Some((e["start"].as_u64()?, e["length"].as_u64()?)))
        .filter(|(_, l)| *l > 0)
        .collect())
}

async fn compare_outside_dirty(
    socket: &Path,
    old: &str,
    new: &str,
    size: u64,
) -> Result<Verification> {
    let clean = clean_ranges(socket, new).await?;
    let nbd =
        |e: crate::qsd::nbd_client::NbdError| EngineError::Io(io::Error::other(e.to_string()));
    let mut a = crate::qsd::nbd_client::NbdClient::connect(socket, old)
        .await
        .map_err(nbd)?;
    let mut b = crate::qsd::nbd_client::NbdClient::connect(socket, new)
        .await
        .map_err(nbd)?;
    let mut compared = 0;
    let mut first_difference = None;
    let mut differing = vec![];
    let (mut x, mut y) = (vec![], vec![]);
    for (start, length) in clean {
        let end = (start + length).min(size);
        let mut at = start;
        while at < end {
            let n = VERIFY_CHUNK.min(end - at) as usize;
            x.resize(n, 0);
            y.resize(n, 0);
            a.read(at, &mut x).await.map_err(nbd)?;
            b.read(at, &mut y).await.map_err(nbd)?;
            if x != y {
                differing.push((at, n as u64));
            } else {
                compared += n as u64;
            }
            at += n as u64;
        }
    }
    let _ = a.disconnect().await;
    let _ = b.disconnect().await;
    // The consumer may have written a chunk while it was being compared (the bitmap was read
    // once, before): a chunk the bitmap marks dirty now is excused, one it still leaves clean
    // is a real difference.
    if !differing.is_empty() {
        let clean_now = clean_ranges(socket, new).await?;
        for (offset, length) in differing {
            if inside(&clean_now, offset, length) {
                first_difference.get_or_insert(offset);
                break;
            }
        }
    }
    Ok(Verification {
        compared,
        skipped: size.saturating_sub(compared),
        first_difference,
    })
}

fn read_marker(path: &Path) -> Result<Option<MigrationMarker>> {
    match fs::read(path) {
        Ok(body) => serde_json::from_slice(&body).map(Some).map_err(|e| {
            EngineError::Io(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            ))
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// Reads qemu-img's `-p` output (`(12.34/100%)` lines ended by `\r`) and reports fractions.
pub(super) async fn read_progress(
    mut out: impl tokio::io::AsyncRead + Unpin,
    report: impl Fn(f64),
) -> io::Result<()> {
    let mut buf = [0u8; 512];
    let mut line = Vec::new();
    loop {
        let n = out.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        for &b in &buf[..n] {
            if b == b'\r' || b == b'\n' {
                if let Some(f) = parse_progress(&line) {
                    report(f);
                }
                line.clear();
            } else {
                line.push(b);
            }
        }
    }
}

fn parse_progress(line: &[u8]) -> Option<f64> {
    let s = std::str::from_utf8(line).ok()?.trim();
    let inner = s.strip_prefix('(')?.strip_suffix("%)")?;
    let (done, _) = inner.split_once('/')?;
    let pct: f64 = done.trim().parse().ok()?;
    Some((pct / 100.0).clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_img_progress_lines_parse() {
        assert_eq!(parse_progress(b"    (12.50/100%)"), Some(0.125));
        assert_eq!(parse_progress(b"(100.00/100%)"), Some(1.0));
        assert_eq!(parse_progress(b"garbage"), None);
    }

    #[test]
    fn a_chunk_is_inside_a_clean_range_only_whole() {
        let clean = [(0, 65536), (131072, 65536)];
        assert!(inside(&clean, 0, 4096));
        assert!(inside(&clean, 131072, 65536));
        assert!(!inside(&clean, 61440, 8192));
        assert!(!inside(&clean, 65536, 4096));
    }

    #[test]
    fn clean_ranges_are_the_data_entries_of_the_map() {
        let map =
            br#"[{"start":0,"length":65536,"depth":0,"present":true,"zero":false,"data":true},
            {"start":65536,"length":131072,"depth":0,"present":false,"zero":false,"data":false},
            {"start":196608,"length":65536,"depth":0,"present":true,"zero":false,"data":true}]"#;
        assert_eq!(
            clean_from_map(map).unwrap(),
            vec![(0, 65536), (196608, 65536)]
        );
    }

    #[test]
    fn daemon_names_fit_qemu_limits() {
        let v = VolumeId::generate();
        assert!(layer_node(&v, 123_456).len() <= 31);
        assert!(manifest_node(&v).len() <= 31);
        assert_ne!(layer_export(&v, 1), layer_export(&v, 2));
        assert_ne!(manifest_export(&v), layer_export(&v, 0));
    }

    #[test]
    fn manifest_is_whole_sectors_and_hashes_the_record_alone() {
        let rec = VolumeRecord::new(VolumeId::generate(), 1 << 20);
        let (body, length, sha) = manifest_bytes(&rec).unwrap();
        assert_eq!(body.len() % 512, 0);
        assert_eq!(sha256_hex(&body[..length as usize]), sha);
        let back: VolumeRecord = serde_json::from_slice(&body).unwrap();
        assert_eq!(back, rec);
    }

    #[test]
    fn a_clone_or_a_deleted_volume_is_refused() {
        let mut rec = VolumeRecord::new(VolumeId::generate(), 1 << 20);
        assert_eq!(refusal(&rec), None);
        rec.deleted = true;
        assert!(refusal(&rec).unwrap().contains("deleted"));
        rec.deleted = false;
        rec.clone_of = Some(super::super::record::CloneSource {
            volume: VolumeId::generate(),
            layer: 0,
            snapshot: livedisk_common::SnapshotId::generate(),
            flatten_speed: None,
            remote: None,
        });
        assert!(refusal(&rec).unwrap().contains("clone"));
    }
}
