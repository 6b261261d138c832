//! The node's half of the full-pool rule (`livedisk_engine::pool_space`): a new volume, a
//! volume's growth or a clone is refused with RESOURCE_EXHAUSTED when the pool's free space
//! cannot hold it, before the engine makes anything. Snapshots are checked by the engine
//! itself, under their volume's lock, so every caller (CSI, group snapshots, the admin CLI)
//! meets the same rule.

use livedisk_api::internal::{ContentSource, ErrorCode, NodeError};
use livedisk_engine::pool_space::{self, Need};
use livedisk_engine::{Engine, VolumeId};

/// What a volume needs of the pool: `growth` bytes (its whole size when it is new); a new clone
/// of a volume also needs what its snapshot of the source keeps (`source`, the engine's
/// [`Engine::snapshot_need`] of the source volume).
pub fn need_of(growth: u64, source: Option<Need>) -> Need {
    match source {
        Some(Need::Snapshot {
            size,
            active_allocated,
        }) if growth > 0 => Need::Clone {
            size: growth,
            source_size: size,
            source_active_allocated: active_allocated,
        },
        _ => Need::Volume { size: growth },
    }
}

/// The snapshot need of the volume a new volume is cloned from, if it is a clone of one the
/// engine knows (an unknown source is the create's own error to report).
pub fn clone_source_need(engine: &Engine, source: Option<&ContentSource>) -> Option<Need> {
    let source = source?;
    if source.snapshot_id.is_some() {
        // Made from a snapshot: nothing of the source is sealed anew.
        return None;
    }
    let volume = VolumeId::parse(source.volume_id.as_deref()?).ok()?;
    engine.snapshot_need(&volume).ok()
}

/// Volumes are not overcommitted against the pool's free space now: a request must fit in
/// it, so a consumer never meets ENOSPC below a size it was promised by a pool that had the
/// room when it asked (what other volumes were promised and have not written yet is not
/// counted; docs/operations.md, "Full pool").
pub async fn pool_too_small(pool: &std::path::Path, need: Need) -> Option<NodeError> {
    if need.bytes() == 0 {
        return None;
    }
    let stat = super::mounts::statvfs_off_runtime(pool).await.ok()?;
    let available = stat.f_bavail * stat.f_frsize;
    pool_space::refusal(need, available).map(|message| NodeError {
        code: ErrorCode::ResourceExhausted,
        message,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grpc::error::{CsiError, node_error};
    use crate::node::report::failed_create_phase;
    use livedisk_api::internal::NodePhase;
    use livedisk_engine::EngineError;
    use tonic::{Code, Status};

    const MIB: u64 = 1 << 20;

    #[test]
    fn a_clone_of_a_volume_needs_the_snapshot_of_its_source_too() {
        let source = Need::Snapshot {
            size: 16 * MIB,
            active_allocated: 4 * MIB,
        };
        assert_eq!(
            need_of(32 * MIB, Some(source)),
            Need::Clone {
                size: 32 * MIB,
                source_size: 16 * MIB,
                source_active_allocated: 4 * MIB,
            }
        );
        assert_eq!(need_of(32 * MIB, None), Need::Volume { size: 32 * MIB });
        // An existing clone that does not grow needs nothing, whatever its source holds.
        assert_eq!(need_of(0, Some(source)).bytes(), 0);
    }

    /// The refusal of a snapshot (or volume) the pool cannot hold travels unchanged: engine
    /// error, the object's status (Failed: not retried), the CSI status of CreateSnapshot or
    /// CreateVolume.
    #[test]
    fn a_full_pool_is_resource_exhausted_all_the_way_to_csi() {
        let refused = EngineError::ResourceExhausted(
            pool_space::refusal(
                Need::Snapshot {
                    size: 64 * MIB,
                    active_allocated: 20 * MIB,
                },
                MIB,
            )
            .unwrap_or_default(),
        );
        let reported = node_error(&refused);
        assert_eq!(reported.code, ErrorCode::ResourceExhausted);
        assert!(
            reported.message.contains("the snapshot needs"),
            "{reported:?}"
        );
        assert_eq!(failed_create_phase(&reported), NodePhase::Failed);
        let status = Status::from(CsiError::Node(reported));
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert!(
            status.message().contains("bytes free"),
            "{}",
            status.message()
        );
    }
}
