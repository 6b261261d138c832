//! How much of the pool a snapshot holds: the allocated size of the layer it sealed.

use std::os::unix::fs::MetadataExt;

use super::engine::{Engine, Result};
use super::record::VolumeRecord;
use livedisk_common::SnapshotId;

impl Engine {
    /// Bytes of the pool the layer sealed by `snap` takes (its file's allocated blocks, qcow2
    /// metadata included). 0 when no layer is the snapshot's own any more (a merge moved its
    /// point in time into another layer). NOT_FOUND for an unknown snapshot.
    pub fn snapshot_allocated_bytes(&self, snap: &SnapshotId) -> Result<u64> {
        let rec = self.locate(snap)?;
        let Some(index) = rec.layer_of(snap) else {
            return Ok(0);
        };
        let file = self
            .vol_dir(&rec.id)
            .join(VolumeRecord::layer_file(rec.layers[index].seq));
        let metadata = std::fs::metadata(&file)?;
        // st_blocks is in 512-byte units whatever the file system's block size.
        Ok(metadata.blocks() * 512)
    }
}
