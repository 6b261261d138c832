//! Changed-block bitmaps for snapshot exports: a read-only export of
//! snapshot S "changed since" an older snapshot B publishes the NBD metadata
//! context `qemu:dirty-bitmap:changed-since-<B>`, whose dirty ranges are the
//! engine's `delta(B, S)` extents at cluster granularity. Standard backup
//! clients (`nbdinfo --map`, `qemu-img map` with `x-dirty-bitmap`) can then
//! copy an increment from the export alone.
//!
//! How the bitmap is built without reading volume data (QEMU 7.2 facts,
//! verified on these machines against the running daemon):
//!
//! * QMP cannot set arbitrary bits of a dirty bitmap; only writes reaching
//!   a node mark its enabled bitmaps, and a write-zeroes request marks them
//!   too. So the bitmap lives on a throw-away `null-co` node (the *helper*,
//!   `c<snapshot hex>`, same virtual size as the snapshot's layer; it stores
//!   nothing), with granularity = the layer's qcow2 cluster size. An
//!   internal writable NBD export of the helper (`w<snapshot hex>`) receives
//!   one payload-less `NBD_CMD_WRITE_ZEROES` per extent from the in-crate
//!   client (`nbd_client.rs`); then that export goes and the bitmap is
//!   disabled (nothing may change it while it is published).
//! * The export path never lists the daemon's nodes: QEMU 7.2 segfaults on
//!   `query-named-block-nodes` while a concluded `block-stream` job is not
//!   dismissed yet (see `qmp::stream_settling`), which another
//!   volume's merge or flatten can cause at any time. The helper's size and
//!   granularity come from the record (the snapshot's size is its layer's
//!   virtual size: layers are created at the volume's size, and volumes
//!   only grow) and from the fixed cluster size every layer is created
//!   with ([`LAYER_CLUSTER_SIZE`]); the finished bitmap is checked with
//!   `x-debug-block-dirty-bitmap-sha256` (a name lookup, no node listing)
//!   against the bitmap the list must give ([`bitmap_sha256`]).
//! * `block-export-add` accepts `bitmaps: [{node, name}]` naming a bitmap
//!   of *another* node than the exported one (7.2's `BlockDirtyBitmapOrStr`),
//!   so the snapshot's layer node is never touched: merges that move the
//!   export to another layer node leave the bitmap where it is. The context
//!   is named after the bitmap (7.2 has no alias for it).
//! * **Deleting the helper while an export publishes its bitmap aborts the
//!   whole daemon** (tried: `blockdev-del` of the helper killed QEMU 7.2).
//!   So the helper is deleted only once `query-block-exports` no longer
//!   lists the snapshot's export (nor the internal writer export).
//!
//! The extent list is frozen at export time in `export-<snap>.changed.json`
//! next to the volume's record (written atomically before the export is
//! recorded): once B is merged away the records can no longer tell
//! `delta(B, S)` apart from the union with B's own interval, yet the export,
//! re-created after a daemon restart, must publish the same bitmap. Without
//! the file (never expected), the list is recomputed from the records while
//! B still exists.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::qsd::nbd_client::NbdClient;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::json;

use super::engine::{Engine, Result, remove_file_if_exists};
use super::record::{ExportTarget, VolumeRecord};
use super::{qemu_img, record};
use crate::error::EngineError;
use crate::extents::{self, Extent};
use livedisk_common::{SnapshotId, VolumeId};

/// Bound on building one bitmap (100k extents take well under a second).
const BUILD_TIMEOUT: Duration = Duration::from_secs(120);

/// The granularity of every changed-block bitmap: the cluster size every
/// layer is created with (`tests/engine_export_bitmap.rs` checks the files).
pub const LAYER_CLUSTER_SIZE: u64 = qemu_img::LAYER_CLUSTER_SIZE;

/// Name of the bitmap (and, prefixed with `qemu:dirty-bitmap:`, of the NBD
/// metadata context) an export changed since `base` publishes. Stable and
/// well within QEMU's limits (1023 bytes for a bitmap name, 4096 for a
/// context name): a snapshot ID is 41 characters. It names the base so that
/// a client asking for the wrong increment gets no context instead of a
/// wrong answer.
pub fn bitmap_name(base: &SnapshotId) -> String {
    format!("changed-since-{base}")
}

/// The NBD metadata context clients ask for.
pub fn context_name(base: &SnapshotId) -> String {
    format!("qemu:dirty-bitmap:{}", bitmap_name(base))
}

/// The `null-co` node carrying the bitmap of a snapshot's export.
pub(super) fn helper_node(snap: &SnapshotId) -> String {
    format!("c{}", &snap.hex()[..24])
}

/// The internal writable export (id and name) of the helper, alive only
/// while the bitmap is being built.
pub(super) fn writer_export(snap: &SnapshotId) -> String {
    format!("w{}", &snap.hex()[..24])
}

fn changed_file(dir: &Path, snap: &SnapshotId) -> PathBuf {
    dir.join(format!("export-{snap}.changed.json"))
}

/// The frozen `delta(base, snapshot)` of an export.
#[derive(Debug, Serialize, Deserialize)]
struct ChangedFile {
    base: SnapshotId,
    snapshot: SnapshotId,
    extents: Vec<Extent>,
}

/// What building a bitmap did, for logs and tests.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct BitmapBuild {
    pub extents: usize,
    pub requests: u64,
    pub granularity: u64,
    /// Bytes the bitmap marks dirty (whole granules), checked against the
    /// extent list before the bitmap is published.
    pub dirty_bytes: u64,
    /// The NBD part: connect, every write-zeroes request, disconnect.
    pub nbd: Duration,
    pub elapsed: Duration,
}

/// Bytes a bitmap of `granularity` marks for `list`: every granule an
/// extent touches, counted once, within `[0, size)`.
pub(super) fn granule_bytes(list: &[Extent], granularity: u64, size: u64) -> u64 {
    let g = granularity.max(1);
    let mut total = 0;
    let mut covered_to = 0u64;
    for e in list {
        let end = e.end().min(size);
        if e.length == 0 || e.offset >= end {
            continue;
        }
        let first = (e.offset / g * g).max(covered_to);
        let last = end.div_ceil(g) * g;
        if last > first {
            total += last - first;
            covered_to = last;
        }
    }
    total
}

/// Lower-case hex, as QEMU prints hashes.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 (lowercase hex) of the bitmap of `granularity` that marks
/// exactly the granules `list` touches on a node of `size` bytes, laid out
/// as QEMU 7.2's `x-debug-block-dirty-bitmap-sha256` hashes it: the lowest
/// level of its `HBitmap`, one bit per granule in `unsigned long` words
/// (bit k in byte k/8, bit k%8 on little-endian hosts), `ceil(granules/64)`
/// words and at least one. Checked against the daemon on every build (a
/// mismatch fails the export) and in the unit tests with hashes the
/// daemon returned; on a big-endian host the layout would differ and every
/// build would fail closed (export refused, never a wrong bitmap). Streams
/// the bitmap in chunks: memory stays small however large the volume
/// (1 TiB at 64 KiB granules: 2 MiB hashed).
pub(super) fn bitmap_sha256(list: &[Extent], granularity: u64, size: u64) -> String {
    const CHUNK: u64 = 1 << 16;
    let g = granularity.max(1);
    let granules = size.div_ceil(g);
    let total = granules.div_ceil(64).max(1) * 8;
    // Granule runs [first, end), ascending and merged.
    let mut runs: Vec<(u64, u64)> = list
        .iter()
        .filter_map(|e| {
            let end = e.end().min(size);
            (e.length > 0 && e.offset < end).then(|| (e.offset / g, end.div_ceil(g)))
        })
        .collect();
    runs.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(runs.len());
    for (a, b) in runs {
        match merged.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => merged.push((a, b)),
        }
    }
    let mut h = Sha256::new();
    let mut buf = vec![0u8; CHUNK as usize];
    let mut next = 0;
    let mut pos = 0u64;
    while pos < total {
        let n = CHUNK.min(total - pos);
        let chunk = &mut buf[..n as usize];
        chunk.fill(0);
        let (g0, g1) = (pos * 8, (pos + n) * 8);
        while next < merged.len() && merged[next].1 <= g0 {
            next += 1;
        }
        for &(a, b) in merged[next..].iter().take_while(|r| r.0 < g1) {
            set_bits(chunk, a.max(g0) - g0, b.min(g1) - g0);
        }
        h.update(chunk);
        pos += n;
    }
    hex(&h.finalize())
}

/// Sets bits `[from, to)` of `bytes` (bit k in byte k/8, bit k%8).
fn set_bits(bytes: &mut [u8], from: u64, to: u64) {
    let mut k = from;
    while k < to && !k.is_multiple_of(8) {
        bytes[(k / 8) as usize] |= 1 << (k % 8);
        k += 1;
    }
    let whole = to / 8 * 8;
    if k < whole {
        bytes[(k / 8) as usize..(whole / 8) as usize].fill(0xff);
        k = whole;
    }
    while k < to {
        bytes[(k / 8) as usize] |= 1 << (k % 8);
        k += 1;
    }
}

impl Engine {
    /// The list an export of `snap` changed since `base` publishes: the
    /// frozen file if present, else the records.
    pub(super) fn export_changed_extents(
        &self,
        rec: &VolumeRecord,
        snap: &SnapshotId,
        base: &SnapshotId,
    ) -> Result<Vec<Extent>> {
        let path = changed_file(&self.vol_dir(&rec.id), snap);
        match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice::<ChangedFile>(&bytes) {
                Ok(f) if &f.base == base && &f.snapshot == snap => {
                    return Ok(extents::normalize(f.extents));
                }
                Ok(_) => {
                    tracing::warn!(path = %path.display(), "changed-block file is for another export; recomputing")
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "unreadable changed-block file; recomputing")
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        self.delta_list(rec, base, snap).map_err(|e| match e {
            EngineError::NotFound(_) | EngineError::Plan(_) => {
                EngineError::FailedPrecondition(format!(
                    "the changed-block list of the export of {snap} since {base} is lost and \
                     cannot be recomputed ({e}); stop the export and export again"
                ))
            }
            e => e,
        })
    }

    /// Freezes an export's list next to the record, atomically (temp file,
    /// fsync, rename, fsync of the directory).
    pub(super) fn save_changed_file(
        &self,
        vol: &VolumeId,
        snap: &SnapshotId,
        base: &SnapshotId,
        list: &[Extent],
    ) -> Result<()> {
        let body = serde_json::to_vec(&ChangedFile {
            base: base.clone(),
            snapshot: snap.clone(),
            extents: list.to_vec(),
        })
        .map_err(std::io::Error::other)?;
        record::atomic_write(&changed_file(&self.vol_dir(vol), snap), &body)?;
        Ok(())
    }

    pub(super) fn remove_changed_file(&self, vol: &VolumeId, snap: &SnapshotId) -> Result<()> {
        remove_file_if_exists(&changed_file(&self.vol_dir(vol), snap))
    }

    /// Virtual size and cluster size of a snapshot's layer, from the record
    /// alone (never `query-named-block-nodes`: see the module docs). A layer
    /// sealed by a snapshot has the volume's size at that instant, which the
    /// snapshot records: layers are created at the volume's size, only the
    /// active one is ever resized, and a merge into a layer grows it to the
    /// (never smaller) size of the layer above, whose snapshot then owns it.
    fn snapshot_geometry(rec: &VolumeRecord, snap: &SnapshotId) -> Result<(u64, u64)> {
        let s = rec
            .snapshot(snap)
            .ok_or_else(|| EngineError::NotFound(format!("snapshot {snap}")))?;
        Ok((s.size, LAYER_CLUSTER_SIZE))
    }

    /// Removes a snapshot export's helper node (and with it its bitmap) and
    /// its internal writer export. Refuses while the snapshot's own export
    /// is still served: deleting a node whose bitmap an export publishes
    /// aborts QEMU 7.2.
    pub(super) async fn drop_changed_bitmap(
        &self,
        rec: &VolumeRecord,
        snap: &SnapshotId,
    ) -> Result<()> {
        let (_, eid) = rec.export_names(&ExportTarget::Snapshot { id: snap.clone() });
        self.delete_export_and_wait(&writer_export(snap)).await?;
        if self.export_ids().await?.contains(&eid) {
            return Err(EngineError::FailedPrecondition(format!(
                "export {eid} still publishes the bitmap of {}",
                helper_node(snap)
            )));
        }
        self.blockdev_del(&helper_node(snap)).await
    }

    /// SHA-256 (lowercase hex) of the bitmap `bitmap_name(base)` on the
    /// helper node of `snap`, as the daemon computes it; `None` when the
    /// helper or that bitmap does not exist. QEMU looks the node up by name
    /// (no listing of nodes: safe while a stream job settles).
    pub(super) async fn helper_bitmap_sha256(
        &self,
        snap: &SnapshotId,
        base: &SnapshotId,
    ) -> Result<Option<String>> {
        match self
            .qmp
            .execute(
                "x-debug-block-dirty-bitmap-sha256",
                json!({ "node": helper_node(snap), "name": bitmap_name(base) }),
            )
            .await
        {
            Ok(v) => Ok(v["sha256"].as_str().map(str::to_ascii_lowercase)),
            // "Node '…' not found", "Dirty bitmap '…' not found".
            Err(e) if e.desc_contains("not found") => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Builds the helper node and its bitmap for an export of `snap`
    /// changed since `base`. The caller holds the volume lock and has made
    /// sure the snapshot's export is not served.
    pub(super) async fn build_changed_bitmap(
        &self,
        rec: &VolumeRecord,
        snap: &SnapshotId,
        base: &SnapshotId,
        list: &[Extent],
    ) -> Result<BitmapBuild> {
        let t = Instant::now();
        let (size, cluster) = Self::snapshot_geometry(rec, snap)?;
        // Leftovers of an interrupted build go first.
        self.drop_changed_bitmap(rec, snap).await?;
        let helper = helper_node(snap);
        let name = bitmap_name(base);
        let writer = writer_export(snap);
        self.qmp
            .execute(
                "blockdev-add",
                json!({
                    // Stores nothing: only its dirty bitmap matters.
                    "driver": "null-co", "node-name": helper,
                    "size": size, "read-zeroes": true,
                }),
            )
            .await?;
        let r = async {
            self.qmp
                .execute(
                    "block-dirty-bitmap-add",
                    json!({
                        "node": helper, "name": name, "granularity": cluster,
                        "persistent": false,
                    }),
                )
                .await?;
            self.qmp
                .execute(
                    "block-export-add",
                    json!({
                        "type": "nbd", "id": writer, "node-name": helper,
                        "name": writer, "writable": true,
                    }),
                )
                .await?;
            let socket = self.daemon().runtime.nbd_socket();
            let tn = Instant::now();
            let mut c = NbdClient::connect(&socket, &writer).await?;
            let requests = c.write_zeroes(list, BUILD_TIMEOUT).await?;
            c.disconnect().await?;
            let nbd = tn.elapsed();
            self.delete_export_and_wait(&writer).await?;
            // Published read-only: nothing may change it from now on.
            self.qmp
                .execute(
                    "block-dirty-bitmap-disable",
                    json!({ "node": helper, "name": name }),
                )
                .await?;
            // Check what the daemon holds against the list, bit for bit,
            // before anyone can read it.
            let want = bitmap_sha256(list, cluster, size);
            let got = self.helper_bitmap_sha256(snap, base).await?;
            if got.as_deref() != Some(want.as_str()) {
                return Err(EngineError::FailedPrecondition(format!(
                    "bitmap {name} on {helper} does not mark exactly the {} listed extents \
                     (sha256 {got:?}, expected {want})",
                    list.len()
                )));
            }
            Ok(BitmapBuild {
                extents: list.len(),
                requests,
                granularity: cluster,
                dirty_bytes: granule_bytes(list, cluster, size),
                nbd,
                elapsed: t.elapsed(),
            })
        }
        .await;
        if r.is_err() {
            // Best effort: the error that matters is the first one.
            if let Err(e) = self.drop_changed_bitmap(rec, snap).await {
                tracing::warn!(node = helper, error = %e, "could not remove bitmap helper");
            }
        }
        r
    }

    /// What an interrupted export left of this volume (see
    /// [`ExportLeftovers`]), judged from the node names and export ids the
    /// caller read from the daemon and from the volume's directory. The
    /// one definition of a leftover: `sweep_export_helpers` removes exactly
    /// these, and recovery's look at the records can flag a volume that
    /// has any.
    pub(super) fn export_leftovers(
        &self,
        rec: &VolumeRecord,
        nodes: &HashSet<String>,
        exports: &HashSet<String>,
    ) -> ExportLeftovers {
        leftovers_in(rec, nodes, exports, &self.vol_files(&rec.id))
    }

    /// Deletes what an interrupted export build left of this volume
    /// ([`Engine::export_leftovers`]): writer exports, then helper nodes,
    /// then frozen lists. Called by recovery with the volume lock held.
    pub(super) async fn sweep_export_helpers(&self, rec: &VolumeRecord) -> Result<()> {
        let exports = self.export_ids().await?;
        let nodes = self.named_nodes().await?;
        let left = self.export_leftovers(rec, &nodes, &exports);
        if left.is_empty() {
            return Ok(());
        }
        for w in &left.writer_exports {
            // Only a build holds it, and builds hold the lock we hold.
            self.delete_export_and_wait(w).await?;
        }
        for h in &left.helper_nodes {
            // Its writer export is gone (above) and no export publishes
            // its bitmap: the node alone is left.
            tracing::info!(volume = %rec.id, node = h, "removing orphan bitmap helper");
            self.blockdev_del(h).await?;
        }
        for f in &left.files {
            remove_file_if_exists(f)?;
        }
        Ok(())
    }
}

/// What an interrupted export (a bitmap build killed mid-way, or one whose
/// clean-up failed) leaves of a volume.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct ExportLeftovers {
    /// Internal writer exports of bitmap builds: only a running build holds
    /// one, and it holds the volume's lock meanwhile.
    pub writer_exports: Vec<String>,
    /// Helper nodes of snapshots whose export is neither recorded with a
    /// base nor served (a served export may publish the helper's bitmap,
    /// and deleting the helper then would abort QEMU 7.2).
    pub helper_nodes: Vec<String>,
    /// Frozen lists no export record with a base names.
    pub files: Vec<PathBuf>,
}

impl ExportLeftovers {
    pub(super) fn is_empty(&self) -> bool {
        self.writer_exports.is_empty() && self.helper_nodes.is_empty() && self.files.is_empty()
    }
}

/// [`Engine::export_leftovers`] on the entries of the volume's directory.
pub(super) fn leftovers_in(
    rec: &VolumeRecord,
    nodes: &HashSet<String>,
    exports: &HashSet<String>,
    files: &[PathBuf],
) -> ExportLeftovers {
    let recorded_with_base = |snap: &SnapshotId| {
        rec.exports.iter().any(|e| {
            e.changed_since.is_some()
                && matches!(&e.target, ExportTarget::Snapshot { id } if id == snap)
        })
    };
    let mut left = ExportLeftovers::default();
    for s in &rec.snapshots {
        let writer = writer_export(&s.id);
        if exports.contains(&writer) {
            left.writer_exports.push(writer);
        }
        let (_, eid) = rec.export_names(&ExportTarget::Snapshot { id: s.id.clone() });
        let helper = helper_node(&s.id);
        if !recorded_with_base(&s.id) && nodes.contains(&helper) && !exports.contains(&eid) {
            left.helper_nodes.push(helper);
        }
    }
    left.files = files
        .iter()
        .filter(|f| {
            f.file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix("export-"))
                .and_then(|n| n.strip_suffix(".changed.json"))
                .and_then(|n| SnapshotId::parse(n).ok())
                .is_some_and(|snap| !recorded_with_base(&snap))
        })
        .cloned()
        .collect();
    left
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qcow2::record::{ExportRecord, SnapshotState};

    fn x(offset: u64, length: u64) -> Extent {
        Extent { offset, length }
    }

    #[test]
    fn names_fit_qemu_limits() {
        let b = SnapshotId::generate();
        let s = SnapshotId::generate();
        assert_eq!(bitmap_name(&b), format!("changed-since-{b}"));
        assert!(bitmap_name(&b).len() <= 1023);
        assert!(context_name(&b).len() <= 4096);
        assert!(helper_node(&s).len() <= 31 && writer_export(&s).len() <= 31);
        assert_ne!(helper_node(&s), writer_export(&s));
    }

    #[test]
    fn granule_bytes_counts_each_touched_granule_once() {
        let g = 65536;
        // Two extents in one granule, one spanning two, one past the end.
        let l = vec![x(0, 4096), x(8192, 4096), x(g + 100, g), x(10 * g, g)];
        assert_eq!(granule_bytes(&l, g, 5 * g), 3 * g);
        // A partial last granule counts whole, as QEMU's count does.
        assert_eq!(granule_bytes(&[x(4 * g, 512)], g, 4 * g + 512), g);
        assert_eq!(granule_bytes(&[], g, g), 0);
    }

    #[test]
    fn leftovers_are_what_no_record_or_served_export_explains() {
        let mut rec = VolumeRecord::new(VolumeId::generate(), 1 << 20);
        let ids: Vec<SnapshotId> = (0..4).map(|_| SnapshotId::generate()).collect();
        rec.snapshots = ids
            .iter()
            .map(|id| record::SnapshotRecord {
                id: id.clone(),
                created: chrono::Utc::now(),
                size: 1 << 20,
                state: SnapshotState::Ready,
                changed: Some(vec![]),
                inherited: vec![],
                for_clone: None,
            })
            .collect();
        let snap = |i: usize| ExportTarget::Snapshot { id: ids[i].clone() };
        // 0: exported changed since a base, served; 1: a plain export,
        // served; 2: a plain export recorded, not served (daemon lost it);
        // 3: not exported at all.
        rec.exports = vec![
            ExportRecord {
                target: snap(0),
                changed_since: Some(SnapshotId::generate()),
            },
            ExportRecord {
                target: snap(1),
                changed_since: None,
            },
            ExportRecord {
                target: snap(2),
                changed_since: None,
            },
        ];
        let eid = |i: usize| rec.export_names(&snap(i)).1;
        let nodes: HashSet<String> = ids.iter().map(helper_node).collect();
        let exports: HashSet<String> = [eid(0), eid(1), writer_export(&ids[3])].into();
        let file = |i: usize| PathBuf::from(format!("/p/v/export-{}.changed.json", ids[i]));
        let files = vec![
            file(0),
            file(3),
            PathBuf::from("/p/v/record.json"),
            PathBuf::from("/p/v/export-nonsense.changed.json"),
        ];
        let left = leftovers_in(&rec, &nodes, &exports, &files);
        assert_eq!(
            left,
            ExportLeftovers {
                writer_exports: vec![writer_export(&ids[3])],
                // Not 0 (its export publishes it), not 1 (served: it may
                // publish it although the record says plain).
                helper_nodes: vec![helper_node(&ids[2]), helper_node(&ids[3])],
                files: vec![file(3)],
            }
        );
        assert!(!left.is_empty());
        assert!(leftovers_in(&rec, &HashSet::new(), &[eid(0)].into(), &[file(0)]).is_empty());
    }

    #[test]
    fn bitmap_sha256_equals_what_qemu_reports() {
        let g = 65536;
        // Both hashes were returned by QEMU 7.2's
        // `x-debug-block-dirty-bitmap-sha256` for null-co nodes with a
        // 64 KiB bitmap. An empty bitmap of 8 MiB (two words):
        assert_eq!(
            bitmap_sha256(&[], g, 8 << 20),
            "374708fff7719dd5979ec875d56cd2286f6d3cf7ec317a3b25632aab28ec37bb"
        );
        // 193 granules (the last one partial), after write-zeroes of a
        // partial first granule, three whole ones, one across the first
        // word boundary and the partial last granule.
        let size = 12_583_424;
        let list = vec![
            x(0, 4096),
            x(70 * g, 3 * g),
            x(size - 512, 512),
            x(63 * g + 512, g),
        ];
        let want = "7709ff1d2d2642569037a714b88afc039c2acb2c9508da531575d687886900d8";
        assert_eq!(bitmap_sha256(&list, g, size), want);
        // Order, overlaps and bytes past the end change nothing.
        let mut messy = list.clone();
        messy.reverse();
        messy.push(x(70 * g + 100, g));
        messy.push(x(size - 512, 1 << 20));
        assert_eq!(bitmap_sha256(&messy, g, size), want);
        assert_ne!(bitmap_sha256(&list[..3], g, size), want);
    }

    #[test]
    fn bitmap_sha256_streams_large_bitmaps() {
        // 1 TiB at 64 KiB: 2 MiB of bitmap in 32 chunks. A run across a
        // chunk boundary hashes as the same run set bit by bit.
        let g = 65536;
        let size = 1u64 << 40;
        let boundary = (1u64 << 16) * 8 * g;
        let a = bitmap_sha256(&[x(boundary - 3 * g, 7 * g)], g, size);
        let b = bitmap_sha256(
            &(0..7)
                .map(|i| x(boundary - 3 * g + i * g, g))
                .collect::<Vec<_>>(),
            g,
            size,
        );
        assert_eq!(a, b);
        let mut bytes = vec![0u8; (size / g / 8) as usize];
        set_bits(&mut bytes, boundary / g - 3, boundary / g + 4);
        assert_eq!(a, hex(&Sha256::digest(&bytes)));
    }
}
