//! The full-pool rule: how much room in the pool a new volume, a volume's growth, a clone or a
//! snapshot needs before it is made, and how much room the pool has (pure), and the pool's free
//! space (statvfs, the one I/O here).
//!
//! Volumes are thin qcow2 files, so nothing is reserved on the file system. Instead, what every
//! volume on the pool was promised and has not taken yet counts as taken: the pool's room is its
//! free space minus those promises ([`Room`]). The node checks every CSI request against it, so
//! the volumes' promises never add up to more than the pool holds, and a consumer meets ENOSPC
//! below the size it was promised only when something the rule does not see fills the file
//! system (other files on it, a merge's copy in flight; docs/operations.md, "Full pool"). The
//! engine itself refuses only a snapshot that does not fit in the free space now
//! ([`Room::free_only`]): a safety net for every caller, which leaves the engine's own users
//! (benchmarks of huge sparse volumes, tests) free to overcommit.
//!
//! * A volume (or its growth) is promised its size: its consumer may write every byte. What it
//!   still may take is that size less what its active layer already holds ([`promised`]).
//! * A snapshot seals the volume's active layer, which keeps its allocated bytes; the consumer
//!   may then rewrite the whole volume into the new active layer. So a snapshot adds about the
//!   active layer's allocated bytes to what the volume may take.
//! * Each also needs room for the qcow2 metadata of a layer of the volume's size written in full
//!   ([`layer_metadata_bytes`]), so that a consumer who writes everything does not run the pool
//!   out on L2 tables, refcounts or its dirty bitmap.

use std::path::Path;

use crate::qcow2::qemu_img::LAYER_CLUSTER_SIZE;

/// What a request needs from the pool; the input of [`refusal`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// A new volume of `size` bytes, or an existing one growing by `size`.
    Volume { size: u64 },
    /// A snapshot of a volume of `size` bytes whose active layer has `active_allocated` bytes
    /// allocated on the pool.
    Snapshot { size: u64, active_allocated: u64 },
    /// A new volume of `size` bytes cloned from a volume of `source_size` bytes: the volume, and
    /// the snapshot of its source the clone is made from (it seals the source's active layer
    /// of `source_active_allocated` bytes until the clone is flattened and the snapshot merged
    /// away).
    Clone {
        size: u64,
        source_size: u64,
        source_active_allocated: u64,
    },
}

impl Need {
    /// Bytes of free pool space the request needs.
    pub fn bytes(self) -> u64 {
        match self {
            Need::Volume { size: 0 } => 0,
            Need::Volume { size } => size.saturating_add(layer_metadata_bytes(size)),
            Need::Snapshot {
                size,
                active_allocated,
            } => active_allocated.saturating_add(layer_metadata_bytes(size)),
            Need::Clone {
                size,
                source_size,
                source_active_allocated,
            } => Need::Volume { size }.bytes().saturating_add(
                Need::Snapshot {
                    size: source_size,
                    active_allocated: source_active_allocated,
                }
                .bytes(),
            ),
        }
    }
}

/// The qcow2 metadata of one layer of `size` bytes with every cluster written, rounded up to
/// whole clusters: the header and L1 table, one L2 entry (8 bytes) per cluster, one 16-bit
/// refcount per cluster (data and metadata), the refcount table, and the changed-block bitmap
/// every layer carries (one bit per cluster, with its table and directory). An upper bound, not
/// an estimate: a request refused with a few clusters to spare is better than a consumer
/// meeting ENOSPC below the size it was promised.
pub fn layer_metadata_bytes(size: u64) -> u64 {
    let c = LAYER_CLUSTER_SIZE;
    let clusters_of = |bytes: u64| bytes.div_ceil(c);
    let data = clusters_of(size);
    let l2 = clusters_of(data.saturating_mul(8));
    let l1 = clusters_of(l2.saturating_mul(8)).max(1);
    let bitmap = clusters_of(data.div_ceil(8));
    // The bitmap's table (8 bytes per bitmap cluster) and its directory.
    let bitmap_meta = clusters_of(bitmap.saturating_mul(8)).max(1) + 1;
    let header = 1;
    let counted = data + l2 + l1 + bitmap + bitmap_meta + header;
    // Refcount blocks count themselves too: two passes settle it well within one block.
    let mut refcount = clusters_of(counted.saturating_mul(2));
    refcount = clusters_of((counted + refcount).saturating_mul(2));
    let refcount_table = clusters_of(refcount.saturating_mul(8)).max(1);
    (l2 + l1 + bitmap + bitmap_meta + header + refcount + refcount_table).saturating_mul(c)
}

/// The pool's room for a new request: its free space, less what its volumes were promised and
/// have not taken yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Room {
    /// Free bytes of the pool's file system ([`available_bytes`]).
    pub free: u64,
    /// The sum of [`promised`] over the pool's volumes.
    pub promised: u64,
}

impl Room {
    /// Bytes a new request may take.
    pub fn available(self) -> u64 {
        self.free.saturating_sub(self.promised)
    }

    /// The file system's free space alone, nothing counted as promised: the engine's own
    /// check, which refuses only what cannot fit now.
    pub fn free_only(free: u64) -> Self {
        Self { free, promised: 0 }
    }

    fn describe(self) -> String {
        if self.promised == 0 {
            return format!("the pool has {} bytes free", self.free);
        }
        format!(
            "the pool has {} bytes free, {} of them promised to its volumes' unwritten blocks",
            self.free, self.promised
        )
    }
}

/// What a volume of `size` bytes may still take of the pool: its size and a full layer's
/// metadata, less what its active layer (`active_allocated`) already holds. Its sealed layers
/// never grow, so they promise nothing.
pub fn promised(size: u64, active_allocated: u64) -> u64 {
    Need::Volume { size }
        .bytes()
        .saturating_sub(active_allocated)
}

/// Why a request that needs `need` does not fit in the pool's `room`; `None` when it fits. The
/// message is what the caller reports (the volume's or snapshot's status error, the CSI
/// RESOURCE_EXHAUSTED).
pub fn refusal(need: Need, room: Room) -> Option<String> {
    let needed = need.bytes();
    if needed <= room.available() {
        return None;
    }
    let room = room.describe();
    Some(match need {
        Need::Volume { size } => format!(
            "{room}; the volume needs {needed} ({size} bytes and the metadata of a fully \
             written layer)"
        ),
        Need::Snapshot {
            active_allocated, ..
        } => format!(
            "{room}; the snapshot needs {needed} (the {active_allocated} bytes its volume's \
             active layer holds, which the snapshot keeps while the volume may be written again \
             in full, and the metadata of a new layer)"
        ),
        Need::Clone {
            size,
            source_active_allocated,
            ..
        } => format!(
            "{room}; the clone needs {needed} ({size} bytes, the {source_active_allocated} bytes \
             its source's active layer holds, which the clone's snapshot of it keeps until the \
             clone is flattened, and the metadata of two layers)"
        ),
    })
}

/// [`refusal`] of several snapshots taken together (one group snapshot): they need the sum.
pub fn group_refusal(needs: &[Need], room: Room) -> Option<String> {
    if let [one] = needs {
        return refusal(*one, room);
    }
    let needed = needs
        .iter()
        .fold(0u64, |sum, need| sum.saturating_add(need.bytes()));
    (needed > room.available()).then(|| {
        format!(
            "{}; the {} snapshots need {needed} together (what their volumes' active layers \
             hold, and the metadata of new layers)",
            room.describe(),
            needs.len()
        )
    })
}

/// Free bytes of the file system holding `path`, as an unprivileged writer may use them
/// (`f_bavail`): the file system's reserve is left out.
pub fn available_bytes(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: a NUL-terminated path and a buffer of the right type, which statvfs fills on 0.
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), stat.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it filled the buffer.
    let stat = unsafe { stat.assume_init() };
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    /// A pool with `free` bytes free and nothing promised.
    fn room(free: u64) -> Room {
        Room { free, promised: 0 }
    }

    #[test]
    fn a_layers_metadata_is_a_small_bounded_share_of_its_size() {
        // 1 GiB: 16384 clusters -> 2 L2 clusters, 1 L1, 1 bitmap, 2 bitmap meta, 1 header,
        // 1 refcount block, 1 refcount table: 9 clusters.
        assert_eq!(layer_metadata_bytes(GIB), 9 * 65536);
        // A tiny volume still needs its fixed clusters (one L2, one bitmap cluster fewer at 0).
        assert_eq!(layer_metadata_bytes(MIB), 8 * 65536);
        assert_eq!(layer_metadata_bytes(0), 6 * 65536);
        // Grows with the size, under 0.03 % of it for large volumes.
        let tib = 1 << 40;
        let meta = layer_metadata_bytes(tib);
        assert!(meta > layer_metadata_bytes(GIB));
        assert!(meta < tib / 3000, "{meta}");
        // Enough for the L2 tables alone (8 bytes per 64 KiB cluster).
        assert!(meta >= tib / 65536 * 8);
    }

    #[test]
    fn a_volume_needs_its_size_and_the_metadata_of_a_full_layer() {
        let need = Need::Volume { size: 32 * MIB };
        assert_eq!(need.bytes(), 32 * MIB + layer_metadata_bytes(32 * MIB));
        assert_eq!(refusal(need, room(need.bytes())), None);
        let refused = refusal(need, room(need.bytes() - 1)).expect("one byte short");
        assert!(refused.contains("the volume needs"), "{refused}");
        // No growth needs nothing, even from a full pool.
        assert_eq!(Need::Volume { size: 0 }.bytes(), 0);
        assert_eq!(refusal(Need::Volume { size: 0 }, room(0)), None);
    }

    #[test]
    fn a_snapshot_needs_what_its_volumes_active_layer_holds() {
        let size = 64 * MIB;
        let meta = layer_metadata_bytes(size);
        let need = |active_allocated| Need::Snapshot {
            size,
            active_allocated,
        };
        // An empty active layer (nothing written since the last snapshot): only the metadata.
        assert_eq!(need(0).bytes(), meta);
        // Not the volume's size: only what the snapshot keeps on top of what was promised.
        assert_eq!(need(20 * MIB).bytes(), 20 * MIB + meta);
        assert_eq!(refusal(need(20 * MIB), room(20 * MIB + meta)), None);
        let refused = refusal(need(20 * MIB), room(20 * MIB)).expect("no room for the metadata");
        assert!(refused.contains("the snapshot needs"), "{refused}");
        assert!(refused.contains(&format!("{}", 20 * MIB)), "{refused}");
        // A full pool refuses even a snapshot of a volume with nothing new written.
        assert!(refusal(need(0), room(0)).is_some());
    }

    #[test]
    fn a_clone_needs_its_volume_and_the_snapshot_of_its_source() {
        let need = Need::Clone {
            size: 32 * MIB,
            source_size: 16 * MIB,
            source_active_allocated: 10 * MIB,
        };
        let volume = Need::Volume { size: 32 * MIB }.bytes();
        let snapshot = Need::Snapshot {
            size: 16 * MIB,
            active_allocated: 10 * MIB,
        }
        .bytes();
        assert_eq!(need.bytes(), volume + snapshot);
        assert_eq!(refusal(need, room(volume + snapshot)), None);
        // Room for the volume alone is not enough.
        let refused = refusal(need, room(volume)).expect("no room for the source's snapshot");
        assert!(refused.contains("the clone needs"), "{refused}");
    }

    #[test]
    fn snapshots_taken_together_need_the_sum() {
        let one = Need::Snapshot {
            size: 64 * MIB,
            active_allocated: 10 * MIB,
        };
        let two = [one, one];
        let both = 2 * one.bytes();
        assert_eq!(group_refusal(&two, room(both)), None);
        let refused = group_refusal(&two, room(both - 1)).expect("one byte short");
        assert!(refused.contains("the 2 snapshots need"), "{refused}");
        // Either fits alone.
        assert_eq!(group_refusal(&[one], room(one.bytes())), None);
        assert_eq!(group_refusal(&[one], room(0)), refusal(one, room(0)));
    }

    #[test]
    fn what_volumes_were_promised_and_have_not_written_is_taken() {
        let size = 32 * MIB;
        let full = Need::Volume { size }.bytes();
        // A new volume may still take all of it; one written in full, nothing more.
        assert_eq!(promised(size, 0), full);
        assert_eq!(promised(size, 12 * MIB), full - 12 * MIB);
        assert_eq!(promised(size, full), 0);
        assert_eq!(promised(size, full + MIB), 0);
        // 40 MiB free of which 30 MiB promised: a 16 MiB volume does not fit, an 8 MiB one does.
        let pool = Room {
            free: 40 * MIB,
            promised: 30 * MIB,
        };
        assert_eq!(pool.available(), 10 * MIB);
        let refused = refusal(Need::Volume { size: 16 * MIB }, pool).expect("promised away");
        assert!(
            refused.contains(&format!("{} of them promised", 30 * MIB)),
            "{refused}"
        );
        assert_eq!(refusal(Need::Volume { size: 8 * MIB }, pool), None);
        // More promised than free (something else filled the file system): no room at all.
        let over = Room {
            free: MIB,
            promised: 30 * MIB,
        };
        assert_eq!(over.available(), 0);
        assert_eq!(refusal(Need::Volume { size: 0 }, over), None);
        // The engine's check: the free space alone, and a message without promises.
        let refused = refusal(Need::Volume { size: 16 * MIB }, Room::free_only(8 * MIB))
            .expect("does not fit");
        assert!(
            refused.starts_with(&format!("the pool has {} bytes free;", 8 * MIB)),
            "{refused}"
        );
    }

    #[test]
    fn huge_numbers_saturate_instead_of_wrapping() {
        let need = Need::Snapshot {
            size: u64::MAX,
            active_allocated: u64::MAX,
        };
        assert_eq!(need.bytes(), u64::MAX);
        assert!(refusal(need, room(u64::MAX - 1)).is_some());
        assert!(refusal(Need::Volume { size: u64::MAX }, room(u64::MAX - 1)).is_some());
    }

    #[test]
    fn the_pools_free_space_is_read() {
        let free = available_bytes(Path::new("/")).expect("statvfs /");
        assert!(free > 0);
        assert!(available_bytes(Path::new("/no/such/dir")).is_err());
    }
}
