//! Volume health as the cluster sees it: from the volume's inventory object and the report of
//! the node that holds it (its `LivediskNode`, refreshed every 20 s by that node's plugin).
//! Pure: the CSI controller's ControllerGetVolumeHealth, ControllerListVolumeHealth and the
//! volume list use it.

use k8s_openapi::jiff::{SignedDuration, Timestamp};
use livedisk_api::internal::{LivediskNode, LivediskVolume, NodePhase};
use livedisk_csi_proto::csi::v1::VolumeHealthErrorType;
use livedisk_csi_proto::csi::v1::volume_health::VolumeHealthEntry;

/// A node that has not reported for this long is taken as gone (three of its report periods).
pub const NODE_SILENCE: SignedDuration = SignedDuration::from_secs(60);

fn entry(status: VolumeHealthErrorType, reason: &str, message: String) -> VolumeHealthEntry {
    VolumeHealthEntry {
        status: status as i32,
        reason: reason.into(),
        message,
    }
}

/// What is wrong with `volume` (nothing: healthy), given the report of its node (`None`: no
/// report exists) at `now`.
pub fn volume_health(
    volume: &LivediskVolume,
    node: Option<&LivediskNode>,
    now: Timestamp,
) -> Vec<VolumeHealthEntry> {
    let holder = &volume.spec.node_name;
    let mut found = Vec::new();
    let status = volume.status.clone().unwrap_or_default();
    if status.phase == NodePhase::Failed {
        found.push(entry(
            VolumeHealthErrorType::Inaccessible,
            "VolumeFailed",
            format!(
                "node {holder} could not make the volume: {}",
                status
                    .error
                    .as_ref()
                    .map(|e| e.message.as_str())
                    .unwrap_or("no detail")
            ),
        ));
    }
    let Some(report) = node.and_then(|n| n.status.as_ref()) else {
        found.push(entry(
            VolumeHealthErrorType::Inaccessible,
            "NodeNotReporting",
            format!("node {holder}, which holds the volume, has no livedisk node plugin report"),
        ));
        return found;
    };
    match report.heartbeat_time.as_ref() {
        Some(at) if now.duration_since(at.0) <= NODE_SILENCE => {}
        Some(at) => found.push(entry(
            VolumeHealthErrorType::Inaccessible,
            "NodeNotReporting",
            format!(
                "the node plugin of node {holder}, which holds the volume, last reported {} s ago",
                now.duration_since(at.0).as_secs()
            ),
        )),
        None => found.push(entry(
            VolumeHealthErrorType::Inaccessible,
            "NodeNotReporting",
            format!("the node plugin of node {holder} has never reported"),
        )),
    }
    if report.engine_live == Some(false) {
        found.push(entry(
            VolumeHealthErrorType::Inaccessible,
            "EngineDown",
            format!(
                "the engine daemon of node {holder}, which serves the volume's I/O, is not running"
            ),
        ));
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use livedisk_api::internal::{
        LivediskNodeSpec, LivediskNodeStatus, LivediskVolumeSpec, LivediskVolumeStatus, NodeError,
    };
    use livedisk_common::ErrorCode;

    fn volume(phase: NodePhase) -> LivediskVolume {
        let mut v = LivediskVolume::new(
            "vol-1",
            LivediskVolumeSpec {
                node_name: "node-a".into(),
                capacity_bytes: 1 << 20,
                csi_name: "pvc-1".into(),
                content_source: None,
                merge_bandwidth_bytes_per_second: None,
            },
        );
        v.status = Some(LivediskVolumeStatus {
            phase,
            error: (phase == NodePhase::Failed).then(|| NodeError {
                code: ErrorCode::ResourceExhausted,
                message: "the pool is full".into(),
            }),
            ..Default::default()
        });
        v
    }

    fn node(age_secs: i64, engine_live: Option<bool>, now: Timestamp) -> LivediskNode {
        let mut n = LivediskNode::new("node-a", LivediskNodeSpec::default());
        n.status = Some(LivediskNodeStatus {
            heartbeat_time: Some(Time(now - SignedDuration::from_secs(age_secs))),
            engine_live,
            ..Default::default()
        });
        n
    }

    fn reasons(found: &[VolumeHealthEntry]) -> Vec<&str> {
        found.iter().map(|e| e.reason.as_str()).collect()
    }

    #[test]
    fn a_ready_volume_on_a_reporting_node_with_its_engine_is_healthy() {
        let now = Timestamp::now();
        let healthy = volume_health(
            &volume(NodePhase::Ready),
            Some(&node(5, Some(true), now)),
            now,
        );
        assert!(healthy.is_empty(), "{healthy:?}");
        // A node plugin too old to report its engine says nothing about it.
        assert!(
            volume_health(&volume(NodePhase::Ready), Some(&node(5, None, now)), now).is_empty()
        );
    }

    #[test]
    fn a_silent_node_a_dead_engine_or_a_failed_volume_is_inaccessible() {
        let now = Timestamp::now();
        let v = volume(NodePhase::Ready);
        assert_eq!(reasons(&volume_health(&v, None, now)), ["NodeNotReporting"]);
        let silent = volume_health(&v, Some(&node(120, Some(true), now)), now);
        assert_eq!(reasons(&silent), ["NodeNotReporting"]);
        assert!(
            silent[0].message.contains("120 s ago"),
            "{}",
            silent[0].message
        );
        assert_eq!(silent[0].status, VolumeHealthErrorType::Inaccessible as i32);
        let engine = volume_health(&v, Some(&node(5, Some(false), now)), now);
        assert_eq!(reasons(&engine), ["EngineDown"]);
        let failed = volume_health(
            &volume(NodePhase::Failed),
            Some(&node(5, Some(true), now)),
            now,
        );
        assert_eq!(reasons(&failed), ["VolumeFailed"]);
        assert!(failed[0].message.contains("the pool is full"));
    }
}
