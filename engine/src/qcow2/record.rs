//! Per-volume record files: the durable truth for a volume's chain layout,
//! snapshots, changed-extent records and in-flight operation.
//!
//! `<pool>/<vol-id>/record.json`, replaced atomically (write temp, fsync,
//! rename, fsync directory), so a crash leaves either the old or the new
//! record, never a torn one.

use std::fs;
use std::io::{self, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::extents::Extent;
use livedisk_common::ids::{SnapshotId, VolumeId};

pub const RECORD_FILE: &str = "record.json";
const RECORD_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("record {0}: {1}")]
    Io(PathBuf, io::Error),
    #[error("record {0} is corrupt: {1}")]
    Corrupt(PathBuf, serde_json::Error),
    #[error("record {0} has unsupported version {1}")]
    Version(PathBuf, u32),
}

/// One qcow2 file of a volume's chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layer {
    /// Unique per volume; names the file and the QEMU node.
    pub seq: u64,
    /// The snapshot whose point-in-time view ends at this layer; `None` for
    /// the active (writable) layer, and for an *internal* layer: one sealed
    /// by nobody (below the active layer) because the engine put an overlay
    /// on it to merge it away without committing the layer that takes
    /// writes (see `InFlight::Merge::seal`). Its writes are accounted for in
    /// `VolumeRecord::inherited` until the next snapshot seals.
    pub sealed_by: Option<SnapshotId>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum SnapshotState {
    Ready,
    /// A merge into this snapshot's layer has started: its data is no longer
    /// its point-in-time view, so it is never exported or read again.
    Deleting,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub id: SnapshotId,
    pub created: DateTime<Utc>,
    /// Virtual size of the volume when the snapshot was taken.
    pub size: u64,
    pub state: SnapshotState,
    /// Clusters written between the previous live snapshot (or volume
    /// creation) and this one: the sealed layer's allocation map, captured
    /// after the snapshot returned (see `capture.rs`). `None` until then;
    /// whatever needs it captures it first.
    pub changed: Option<Vec<Extent>>,
    /// Extents this snapshot took over from `VolumeRecord::inherited` when it
    /// sealed, folded into `changed` when that is captured (then emptied).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inherited: Vec<Extent>,
    /// Set on a *hidden base*: a snapshot the engine took itself to make
    /// this clone of the volume (`Engine::clone_volume`). Nobody else knows
    /// its ID; the engine deletes it once the clone no longer reads it, and
    /// recovery deletes it when the clone's record is gone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub for_clone: Option<VolumeId>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum ExportTarget {
    /// The volume itself, writable (the consumer's attach path).
    Volume,
    /// A snapshot's point-in-time view, read-only.
    Snapshot { id: SnapshotId },
    /// An incoming migration's volume, writable, served to the source's mirror under a name of
    /// its own: this node uses the volume through a remote attachment whose export has the
    /// consumer export's name (`remote.rs`), and the mirror must not write into that.
    Import,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportRecord {
    pub target: ExportTarget,
    /// For a snapshot export: the older snapshot whose changes up to the
    /// target it publishes as `qemu:dirty-bitmap:changed-since-<base>`. The
    /// list itself is frozen in `export-<snap>.changed.json` beside this
    /// record (the base may be merged away while the export lives).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changed_since: Option<SnapshotId>,
}

/// How far a merge got, as far as the durable record knows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum MergePhase {
    /// The job may be copying; the chain in the record is still the truth.
    #[default]
    Running,
    /// `job-complete` of an active commit may have been sent: QEMU may have
    /// switched writes to the base layer. Recovery must find out which layer
    /// is the truth (see `recover::resolve_completing`).
    Completing,
}

/// How a snapshot's layer is merged away.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum MergeMode {
    /// `block-commit` of the next layer into the snapshot's layer (active
    /// commit with `job-complete` when the next layer is the active one).
    #[default]
    Commit,
    /// `block-stream` of the snapshot's layer into the next layer: the next
    /// layer stays where it is, so no write target ever switches.
    Stream,
}

/// A long operation that must be finished after a crash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "op")]
pub enum InFlight {
    /// Deleting `snapshot` by merging its layer away.
    Merge {
        snapshot: SnapshotId,
        job: String,
        #[serde(default)]
        mode: MergeMode,
        #[serde(default)]
        phase: MergePhase,
        /// Deleting the snapshot just below the active layer first seals the
        /// active layer internally (an overlay on it, in one `transaction`):
        /// this is the overlay's layer number while that transaction may or
        /// may not have run. Cleared, with the overlay in `layers`, once it
        /// ran; recovery decides it like a `PendingSnapshot`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        seal: Option<u64>,
    },
}

/// A snapshot whose overlay exists (or is being created) and whose QMP
/// transaction may or may not have run. Written before the transaction, so
/// recovery can always tell whether writes may have gone to the overlay.
/// Kept apart from `in_flight`: a merge and a snapshot never overlap (both
/// hold the volume lock), but older readers match on `InFlight` variants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingSnapshot {
    pub snapshot: SnapshotId,
    /// Layer number of the new overlay.
    pub overlay: u64,
    pub created: DateTime<Utc>,
    /// The clone this snapshot is the hidden base of (see
    /// `SnapshotRecord::for_clone`): part of the intent, so that a snapshot
    /// recovery rolls forward is marked as well.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub for_clone: Option<VolumeId>,
}

/// A revert of the volume to an older snapshot, between its first durable
/// step and the switch (see `engine/revert.rs`). Saved before the new
/// layer's file exists. `built` is set (and saved) only once the new layer
/// holds its complete content and is on disk: recovery rolls a built revert
/// forward and anything earlier back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingRevert {
    /// The snapshot whose view the volume takes.
    pub snapshot: SnapshotId,
    /// The latest snapshot: the new layer backs onto its layer and holds
    /// exactly the clusters where `snapshot`'s view differs from its view.
    /// Named by snapshot, not by layer number, since its view (not the
    /// layer holding it) is what the new layer was computed against.
    pub onto: SnapshotId,
    /// Layer number of the new active layer.
    pub layer: u64,
    #[serde(default)]
    pub built: bool,
}

/// A deleted snapshot kept as a boundary in the volume's sequence of
/// extent records, so that a changed-block query from it stays exact: a
/// backup tool keeps only the ID of the snapshot it backed up last, deletes
/// that snapshot, and asks for the changes since it at the next backup.
///
/// Deleting a snapshot folds its extent record into the next live
/// snapshot's (`before`), which then no longer tells the writes after the
/// deleted snapshot apart from those before it; `changed` keeps exactly the
/// writes after it up to `before`. A tombstone only ever serves as the base
/// of a delta: every other use of the ID finds no snapshot. It lives as long
/// as a later snapshot does (see `plan::apply_delete`) and goes with the
/// record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tombstone {
    pub id: SnapshotId,
    /// When the deleted snapshot was taken (for views only).
    pub created: DateTime<Utc>,
    /// The oldest live snapshot taken after the deleted one: the position
    /// of the boundary in `VolumeRecord::snapshots`.
    pub before: SnapshotId,
    /// Clusters written after the deleted snapshot up to `before`.
    pub changed: Vec<Extent>,
}

/// Where a clone's bottom layer gets its backing while it is not flattened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloneSource {
    pub volume: VolumeId,
    /// The source volume's layer (sealed, read-only) the clone sits on.
    pub layer: u64,
    /// The snapshot that sealed that layer, for messages and checks.
    pub snapshot: SnapshotId,
    /// Rate limit of the flatten job (bytes/s), kept so that a restarted
    /// job (after a snapshot or a daemon restart) keeps it.
    #[serde(default)]
    pub flatten_speed: Option<u64>,
    /// Set when the source is on another node (a cross-node restore):
    /// `volume` and `snapshot` name it there, `layer` means nothing, and
    /// the bottom layer backs onto an NBD client of that node's export of
    /// the snapshot (credentials under `<pool>/remote/<this volume>/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<RemoteOrigin>,
}

/// Where a remote clone's source snapshot is served: the owner's export
/// front and the export's name on the wire (the snapshot's ID).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteOrigin {
    pub host: String,
    pub port: u16,
    pub export: String,
}

/// The origin of a volume cloned from another volume. The clone is made
/// from a hidden snapshot of the source (its *hidden base*), which the engine
/// deletes once the clone is flattened (`clone_of` cleared), then records
/// that here, so that a crash in between is finished by recovery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClonedFrom {
    /// The volume cloned.
    pub volume: VolumeId,
    /// The hidden base snapshot of `volume` while it exists; `None` once
    /// the engine deleted it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden_base: Option<SnapshotId>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub version: u32,
    pub id: VolumeId,
    pub size: u64,
    pub created: DateTime<Utc>,
    /// Set when the volume was deleted while snapshots still exist: those
    /// snapshots stay restorable, the volume itself is gone.
    #[serde(default)]
    pub deleted: bool,
    /// Base first; the last layer is the active one unless `deleted`.
    pub layers: Vec<Layer>,
    /// In creation order.
    pub snapshots: Vec<SnapshotRecord>,
    #[serde(default)]
    pub exports: Vec<ExportRecord>,
    pub next_layer_seq: u64,
    #[serde(default)]
    pub in_flight: Option<InFlight>,
    #[serde(default)]
    pub pending_snapshot: Option<PendingSnapshot>,
    /// An interrupted revert (see [`PendingRevert`]); every other operation
    /// on the volume waits until it is resolved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_revert: Option<PendingRevert>,
    /// Set while the volume is a clone still backed by another volume's
    /// layer; cleared once `block-stream` has flattened it.
    #[serde(default)]
    pub clone_of: Option<CloneSource>,
    /// Set on a volume made by `Engine::clone_volume`: where it came from,
    /// and whether its hidden base snapshot still waits to be deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloned_from: Option<ClonedFrom>,
    /// Extents folded into the next snapshot's extent record when it seals
    /// (then cleared): a clone's inherited allocation (its source snapshot's
    /// allocated extents: the clone's own layers only hold its own writes
    /// until flattening, yet its snapshots' "allocated" must cover it all),
    /// and the writes of deleted snapshots' intervals (and internally sealed
    /// layers) that no later snapshot exists to take them yet.
    #[serde(default)]
    pub inherited: Vec<Extent>,
    /// Deleted snapshots that still answer as the base of a delta (see
    /// [`Tombstone`]), oldest first. Absent in records written before
    /// tombstones existed, which load with none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tombstones: Vec<Tombstone>,
}

impl VolumeRecord {
    pub fn new(id: VolumeId, size: u64) -> Self {
        Self {
            version: RECORD_VERSION,
            id,
            size,
            created: Utc::now(),
            deleted: false,
            layers: vec![Layer {
                seq: 0,
                sealed_by: None,
            }],
            snapshots: vec![],
            exports: vec![],
            next_layer_seq: 1,
            in_flight: None,
            pending_snapshot: None,
            pending_revert: None,
            clone_of: None,
            cloned_from: None,
            inherited: vec![],
            tombstones: vec![],
        }
    }

    /// The hidden base snapshot this volume's clone no longer reads and the
    /// engine still has to delete: the clone is flattened (or gone from the
    /// daemon's view entirely) and the base is still recorded.
    pub fn hidden_base_to_release(&self) -> Option<&SnapshotId> {
        if self.clone_of.is_some() {
            return None;
        }
        self.cloned_from.as_ref()?.hidden_base.as_ref()
    }

    /// Hidden base snapshots of this volume, with the clone each was taken
    /// for.
    pub fn hidden_bases(&self) -> impl Iterator<Item = (&SnapshotId, &VolumeId)> {
        self.snapshots
            .iter()
            .filter_map(|s| s.for_clone.as_ref().map(|c| (&s.id, c)))
    }

    /// The mode and phase of the merge in flight if it deletes `snap`.
    pub fn merge_of(&self, snap: &SnapshotId) -> Option<(MergeMode, MergePhase)> {
        match &self.in_flight {
            Some(InFlight::Merge {
                snapshot,
                mode,
                phase,
                ..
            }) if snapshot == snap => Some((*mode, *phase)),
            _ => None,
        }
    }

    pub fn snapshot(&self, id: &SnapshotId) -> Option<&SnapshotRecord> {
        self.snapshots.iter().find(|s| &s.id == id)
    }

    /// The tombstone a deleted snapshot left, if it still answers.
    pub fn tombstone(&self, id: &SnapshotId) -> Option<&Tombstone> {
        self.tombstones.iter().find(|t| &t.id == id)
    }

    pub fn snapshot_index(&self, id: &SnapshotId) -> Option<usize> {
        self.snapshots.iter().position(|s| &s.id == id)
    }

    /// Index in `layers` of the layer sealed by `id`.
    pub fn layer_of(&self, id: &SnapshotId) -> Option<usize> {
        self.layers
            .iter()
            .position(|l| l.sealed_by.as_ref() == Some(id))
    }

    pub fn active(&self) -> Option<&Layer> {
        self.layers.last().filter(|l| l.sealed_by.is_none())
    }

    /// File name of a layer, relative to the volume directory. Derived only
    /// from a number, so it can never escape the directory.
    pub fn layer_file(seq: u64) -> String {
        format!("layer-{seq}.qcow2")
    }

    /// The layer number a [`VolumeRecord::layer_file`] name stands for.
    pub fn parse_layer_file(name: &str) -> Option<u64> {
        name.strip_prefix("layer-")?
            .strip_suffix(".qcow2")?
            .parse()
            .ok()
    }

    /// QEMU node name of a layer: QEMU caps node names at 31 characters, so
    /// it is `n` + 64 bits of the volume UUID + the layer number.
    pub fn node_name(&self, seq: u64) -> String {
        format!("{}{seq}", Self::node_prefix(&self.id))
    }

    /// What every layer node name of volume `id` starts with.
    pub fn node_prefix(id: &VolumeId) -> String {
        format!("n{}-", &id.hex()[..16])
    }

    /// The layer number of one of this volume's node names, if it is one.
    pub fn layer_of_node(&self, node: &str) -> Option<u64> {
        node.strip_prefix(Self::node_prefix(&self.id).as_str())?
            .parse()
            .ok()
    }

    /// NBD export name / block-export id for an export target.
    pub fn export_names(&self, target: &ExportTarget) -> (String, String) {
        match target {
            ExportTarget::Volume => (self.id.to_string(), format!("v{}", &self.id.hex()[..24])),
            ExportTarget::Import => (
                import_export_name(&self.id),
                format!("m{}", &self.id.hex()[..24]),
            ),
            ExportTarget::Snapshot { id } => (id.to_string(), format!("s{}", &id.hex()[..24])),
        }
    }
}

/// The NBD export name an incoming migration's volume is served under while this node also
/// attaches it remotely ([`ExportTarget::Import`]).
pub fn import_export_name(volume: &VolumeId) -> String {
    format!("{volume}.import")
}

/// Replaces `path` with `body` atomically and durably: write a temporary
/// file beside it, fsync, rename over, fsync the directory (the rename is
/// durable only once the directory entry is on disk). A crash leaves the
/// old or the new content, never a mix.
/// `rec` with the extent records that `on_disk` has captured and `rec` lacks
/// (same snapshot, sealed by the same layer): a record only ever goes from
/// "not captured" to "captured", so a save of an older copy must not undo a
/// capture stored in between.
pub fn keep_captured(mut rec: VolumeRecord, on_disk: Option<&VolumeRecord>) -> VolumeRecord {
    let Some(disk) = on_disk else {
        return rec;
    };
    let sealing_layer = |r: &VolumeRecord, id: &SnapshotId| r.layer_of(id).map(|i| r.layers[i].seq);
    let mut kept = vec![];
    for (i, s) in rec.snapshots.iter().enumerate() {
        if s.changed.is_some() {
            continue;
        }
        if let Some(d) = disk.snapshot(&s.id)
            && d.changed.is_some()
            && sealing_layer(&rec, &s.id) == sealing_layer(disk, &s.id)
        {
            kept.push((i, d.changed.clone(), d.inherited.clone()));
        }
    }
    for (i, changed, inherited) in kept {
        rec.snapshots[i].changed = changed;
        rec.snapshots[i].inherited = inherited;
    }
    rec
}

pub fn atomic_write(path: &Path, body: &[u8]) -> io::Result<()> {
    atomic_write_mode(path, body, 0o666)
}

/// [`atomic_write`] of a file only its owner may read (a private key).
pub fn atomic_write_private(path: &Path, body: &[u8]) -> io::Result<()> {
    atomic_write_mode(path, body, 0o600)
}

fn atomic_write_mode(path: &Path, body: &[u8], mode: u32) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(body)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Reads and writes records under one pool directory.
#[derive(Debug, Clone)]
pub struct RecordStore {
    pool: PathBuf,
}

impl RecordStore {
    pub fn new(pool: impl Into<PathBuf>) -> Self {
        Self { pool: pool.into() }
    }

    pub fn pool(&self) -> &Path {
        &self.pool
    }

    pub fn volume_dir(&self, id: &VolumeId) -> PathBuf {
        self.pool.join(id.as_str())
    }

    fn record_path(&self, id: &VolumeId) -> PathBuf {
        self.volume_dir(id).join(RECORD_FILE)
    }

    /// `Ok(None)` when the volume has no record.
    pub fn load(&self, id: &VolumeId) -> Result<Option<VolumeRecord>, RecordError> {
        let path = self.record_path(id);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(RecordError::Io(path, e)),
        };
        let rec: VolumeRecord =
            serde_json::from_slice(&bytes).map_err(|e| RecordError::Corrupt(path.clone(), e))?;
        if rec.version != RECORD_VERSION {
            return Err(RecordError::Version(path, rec.version));
        }
        Ok(Some(rec))
    }

    /// Atomically replaces the record (creating the volume directory if
    /// needed). Extent records captured on disk since `rec` was loaded are
    /// kept (see [`keep_captured`]): the background capture stores them
    /// without holding the volume.
    pub fn save(&self, rec: &VolumeRecord) -> Result<(), RecordError> {
        let _file = self.lock_file(&rec.id)?;
        // Only a copy that lacks an extent record can undo a capture; reading
        // the file back (large with 100 k extents) is skipped otherwise.
        if rec.snapshots.iter().all(|s| s.changed.is_some()) {
            return self.write(rec);
        }
        let on_disk = self.load(&rec.id)?;
        self.write(&keep_captured(rec.clone(), on_disk.as_ref()))
    }

    /// Changes the record as it is on disk now, atomically with respect to
    /// every other save of this volume (any task or process): `change`
    /// returns whether it changed anything. `Ok(None)`: no record.
    pub fn update(
        &self,
        id: &VolumeId,
        change: impl FnOnce(&mut VolumeRecord) -> bool,
    ) -> Result<Option<VolumeRecord>, RecordError> {
        // A volume removed meanwhile is left removed: no directory is made.
        let Some(_file) = self.lock_existing(id)? else {
            return Ok(None);
        };
        let Some(mut rec) = self.load(id)? else {
            return Ok(None);
        };
        if change(&mut rec) {
            self.write(&rec)?;
        }
        Ok(Some(rec))
    }

    fn write(&self, rec: &VolumeRecord) -> Result<(), RecordError> {
        let dir = self.volume_dir(&rec.id);
        let io_err = |e| RecordError::Io(dir.clone(), e);
        let body = serde_json::to_vec_pretty(rec)
            .map_err(|e| RecordError::Corrupt(dir.join(RECORD_FILE), e))?;
        atomic_write(&dir.join(RECORD_FILE), &body).map_err(io_err)
    }

    /// Holds the record file of one volume for a read-modify-write: an
    /// exclusive `flock` on the volume's directory (no extra file in it),
    /// held for the milliseconds of one save, never across an operation
    /// (that is the volume lock's job, see `lock.rs`).
    fn lock_file(&self, id: &VolumeId) -> Result<fs::File, RecordError> {
        let dir = self.volume_dir(id);
        fs::create_dir_all(&dir).map_err(|e| RecordError::Io(dir.clone(), e))?;
        self.lock_existing(id)?
            .ok_or_else(|| RecordError::Io(dir, io::ErrorKind::NotFound.into()))
    }

    /// [`Self::lock_file`] of a volume whose directory exists; `None` when
    /// it does not (it is never created here).
    fn lock_existing(&self, id: &VolumeId) -> Result<Option<fs::File>, RecordError> {
        let dir = self.volume_dir(id);
        let handle = match fs::File::open(&dir) {
            Ok(h) => h,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(RecordError::Io(dir, e)),
        };
        // SAFETY: flock on a descriptor we own; released when it closes.
        if unsafe { libc::flock(handle.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(RecordError::Io(dir, io::Error::last_os_error()));
        }
        Ok(Some(handle))
    }

    /// Every volume with a record. Directory entries that are not valid
    /// volume IDs are ignored, never interpreted.
    pub fn list(&self) -> Result<Vec<VolumeId>, RecordError> {
        let rd = match fs::read_dir(&self.pool) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => return Err(RecordError::Io(self.pool.clone(), e)),
        };
        let mut out = vec![];
        for ent in rd {
            let ent = ent.map_err(|e| RecordError::Io(self.pool.clone(), e))?;
            if let Some(id) = ent
                .file_name()
                .to_str()
                .and_then(|n| VolumeId::parse(n).ok())
                && ent.path().join(RECORD_FILE).exists()
            {
                out.push(id);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Removes the volume directory and everything in it.
    pub fn remove(&self, id: &VolumeId) -> Result<(), RecordError> {
        let dir = self.volume_dir(id);
        match fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(RecordError::Io(dir, e)),
        }
        fs::File::open(&self.pool)
            .and_then(|d| d.sync_all())
            .map_err(|e| RecordError::Io(self.pool.clone(), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_load_round_trip_and_list() {
        let dir = std::env::temp_dir().join(format!("ld-rec-{}", uuid::Uuid::new_v4()));
        let store = RecordStore::new(&dir);
        let id = VolumeId::generate();
        assert!(store.load(&id).unwrap().is_none());
        let mut rec = VolumeRecord::new(id.clone(), 1 << 30);
        rec.snapshots.push(SnapshotRecord {
            id: SnapshotId::generate(),
            created: Utc::now(),
            size: 1 << 30,
            state: SnapshotState::Ready,
            changed: Some(vec![Extent {
                offset: 0,
                length: 65536,
            }]),
            inherited: vec![],
            for_clone: None,
        });
        store.save(&rec).unwrap();
        store.save(&rec).unwrap();
        assert_eq!(store.load(&id).unwrap().unwrap(), rec);
        fs::create_dir_all(dir.join("not-a-volume")).unwrap();
        assert_eq!(store.list().unwrap(), vec![id.clone()]);
        assert!(rec.node_name(12345).len() <= 31);
        store.remove(&id).unwrap();
        assert!(store.list().unwrap().is_empty());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn records_without_tombstones_load_and_tombstones_round_trip() {
        let dir = std::env::temp_dir().join(format!("ld-rec-{}", uuid::Uuid::new_v4()));
        let store = RecordStore::new(&dir);
        let mut rec = VolumeRecord::new(VolumeId::generate(), 1 << 30);
        // A record as written before tombstones existed has no such field.
        let mut old = serde_json::to_value(&rec).unwrap();
        assert!(old.get("tombstones").is_none(), "none: nothing written");
        old.as_object_mut().unwrap().remove("tombstones");
        fs::create_dir_all(store.volume_dir(&rec.id)).unwrap();
        fs::write(
            store.volume_dir(&rec.id).join(RECORD_FILE),
            serde_json::to_vec(&old).unwrap(),
        )
        .unwrap();
        assert_eq!(store.load(&rec.id).unwrap().unwrap(), rec);
        let (gone, next) = (SnapshotId::generate(), SnapshotId::generate());
        rec.tombstones.push(Tombstone {
            id: gone.clone(),
            created: Utc::now(),
            before: next,
            changed: vec![Extent {
                offset: 65536,
                length: 65536,
            }],
        });
        store.save(&rec).unwrap();
        let back = store.load(&rec.id).unwrap().unwrap();
        assert_eq!(back, rec);
        assert!(back.tombstone(&gone).is_some() && back.snapshot(&gone).is_none());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_save_of_an_older_copy_keeps_a_capture_stored_meanwhile() {
        let dir = std::env::temp_dir().join(format!("ld-rec-{}", uuid::Uuid::new_v4()));
        let store = RecordStore::new(&dir);
        let mut rec = VolumeRecord::new(VolumeId::generate(), 1 << 30);
        let snap = SnapshotId::generate();
        rec.layers[0].sealed_by = Some(snap.clone());
        rec.layers.push(Layer {
            seq: 1,
            sealed_by: None,
        });
        rec.snapshots.push(SnapshotRecord {
            id: snap.clone(),
            created: Utc::now(),
            size: 1 << 30,
            state: SnapshotState::Ready,
            changed: None,
            inherited: vec![Extent {
                offset: 0,
                length: 65536,
            }],
            for_clone: None,
        });
        store.save(&rec).unwrap();
        // An operation holds this copy while the capture stores the record.
        let older = rec.clone();
        let captured = vec![Extent {
            offset: 0,
            length: 131072,
        }];
        store
            .update(&rec.id, |r| {
                r.snapshots[0].changed = Some(captured.clone());
                r.snapshots[0].inherited.clear();
                true
            })
            .unwrap();
        let mut older = older;
        older.next_layer_seq = 7;
        store.save(&older).unwrap();
        let now = store.load(&rec.id).unwrap().unwrap();
        assert_eq!(now.next_layer_seq, 7, "the operation's change is saved");
        assert_eq!(now.snapshots[0].changed.as_ref(), Some(&captured));
        assert!(now.snapshots[0].inherited.is_empty());
        // A snapshot now sealed by another layer does not take the old map.
        let mut moved = older.clone();
        moved.layers[0].sealed_by = None;
        moved.layers[1].sealed_by = Some(snap);
        assert_eq!(keep_captured(moved, Some(&now)).snapshots[0].changed, None);
        fs::remove_dir_all(&dir).unwrap();
    }
}
