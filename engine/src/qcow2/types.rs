//! The values the engine's operations take and return: configuration, what a
//! volume, snapshot or export looks like to a caller, extent pages.

use std::path::PathBuf;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::record::{MergeMode, SnapshotRecord, SnapshotState, VolumeRecord};
use crate::extents::{self, Extent};
use livedisk_common::{SnapshotId, VolumeId};

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

pub(super) fn info(rec: &VolumeRecord) -> VolumeInfo {
    VolumeInfo {
        id: rec.id.clone(),
        size: rec.size,
        deleted: rec.deleted,
        layers: rec.layers.len(),
        snapshots: rec.snapshots.len(),
    }
}

pub(super) fn snap_info(rec: &VolumeRecord, s: &SnapshotRecord) -> SnapshotInfo {
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
