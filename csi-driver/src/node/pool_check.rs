//! The node's half of the full-pool rule (`livedisk_engine::pool_space`): a new volume, a
//! volume's growth, a clone or a snapshot is refused with RESOURCE_EXHAUSTED when the pool's
//! room (its free space less what its volumes were promised and have not written) cannot hold
//! it, before the engine makes anything. The engine checks snapshots once more under their
//! volume's lock, against the free space alone.

use std::sync::Arc;

use livedisk_api::internal::{ContentSource, ErrorCode, NodeError};
use livedisk_engine::pool_space::{self, Need};
use livedisk_engine::{Engine, VolumeId};

use super::blocking::off_runtime;
use crate::grpc::error::CsiError;

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

/// Why a snapshot of `volume` does not fit in the pool's room; `None` when it fits, or when the
/// volume is unknown (the engine's create says so).
pub async fn snapshot_too_big(engine: &Arc<Engine>, volume: &VolumeId) -> Option<NodeError> {
    let (engine, volume) = (engine.clone(), volume.clone());
    let checked = off_runtime("checking the pool's room", move || {
        let Ok(need) = engine.snapshot_need(&volume) else {
            return Ok(None);
        };
        Ok(pool_space::refusal(need, engine.pool_room()?))
    })
    .await;
    refused(checked)
}

/// Volumes are not overcommitted: a request must fit in the pool's room, its free space less
/// what every volume on it was promised and has not written yet, so the promises never add up
/// to more than the pool holds (docs/operations.md, "Full pool").
pub async fn pool_too_small(engine: &Arc<Engine>, need: Need) -> Option<NodeError> {
    if need.bytes() == 0 {
        return None;
    }
    let engine = engine.clone();
    let checked = off_runtime("checking the pool's room", move || {
        Ok(pool_space::refusal(need, engine.pool_room()?))
    })
    .await;
    refused(checked)
}

/// The refusal to report, if any. A room that cannot be read lets the request through: the
/// engine's own errors will tell what is wrong with the pool.
fn refused(checked: Result<Option<String>, CsiError>) -> Option<NodeError> {
    match checked {
        Ok(refusal) => refusal.map(|message| NodeError {
            code: ErrorCode::ResourceExhausted,
            message,
        }),
        Err(error) => {
            tracing::warn!(%error, "could not read the pool's room; not checked");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grpc::error::node_error;
    use crate::node::report::failed_create_phase;
    use livedisk_api::internal::NodePhase;
    use livedisk_engine::EngineError;
    use livedisk_engine::pool_space::Room;
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
                Room {
                    free: 30 * MIB,
                    promised: 29 * MIB,
                },
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
