//! A snapshot deletion's progress as Events on its VolumeSnapshot. The VolumeSnapshot's status
//! belongs to the snapshot-controller, and the merge that removes a snapshot's layer can run for
//! minutes: users see it with `kubectl describe volumesnapshot`, however the deletion was asked
//! for (a DiskSnapshot, the VolumeSnapshot itself, a CSI client that names the VolumeSnapshot's
//! snapshot).

use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::Api;
use kube::runtime::events::{Event, EventType, Recorder};
use livedisk_api::Progress;
use livedisk_api::internal::LivediskSnapshot;

/// How often the deletion's progress is looked at.
const POLL: Duration = Duration::from_secs(1);

/// The Event reasons of a deletion.
pub const MERGING: &str = "Merging";
pub const MERGED: &str = "Merged";

/// Pure: the VolumeSnapshot a snapshot was taken for, as an Event's subject.
pub fn subject(snapshot: &LivediskSnapshot) -> Option<ObjectReference> {
    let origin = snapshot.spec.volume_snapshot.as_ref()?;
    Some(ObjectReference {
        api_version: Some("snapshot.storage.k8s.io/v1".into()),
        kind: Some("VolumeSnapshot".into()),
        namespace: Some(origin.namespace.clone()),
        name: Some(origin.name.clone()),
        uid: origin.uid.clone(),
        ..Default::default()
    })
}

/// Pure: the note of a progress Event when the merge crossed into another quarter since the
/// last one published (at most 0, 25, 50, 75 and 100 %), with that quarter.
pub fn progress_note(last_quarter: Option<i32>, now: &Progress) -> Option<(i32, String)> {
    let quarter = now.percent / 25;
    if last_quarter.is_some_and(|q| q >= quarter) {
        return None;
    }
    let rate = now
        .bytes_per_second
        .map(|r| format!(" at {r} bytes/s"))
        .unwrap_or_default();
    Some((
        quarter,
        format!(
            "merging the snapshot's layer away: {} % ({} of {} bytes){rate}",
            now.percent, now.bytes_done, now.bytes_total
        ),
    ))
}

/// Pure: the note of the Event that a deletion started.
pub fn started_note(snapshot: &LivediskSnapshot) -> String {
    let speed = match snapshot.spec.merge_bandwidth_bytes_per_second {
        Some(limit) => format!("at most {limit} bytes/s (its class's mergeBandwidthLimit)"),
        None => "at full speed".to_string(),
    };
    format!(
        "deleting snapshot {}: its layer is merged away on node {}, {speed}",
        snapshot.metadata.name.as_deref().unwrap_or_default(),
        snapshot.spec.node_name
    )
}

/// Publishes one Event; a failure is logged (the deletion goes on either way).
pub async fn publish(recorder: &Recorder, subject: &ObjectReference, reason: &str, note: String) {
    let event = Event {
        type_: EventType::Normal,
        reason: reason.into(),
        note: Some(note),
        action: "DeleteSnapshot".into(),
        secondary: None,
    };
    if let Err(error) = recorder.publish(&event, subject).await {
        tracing::warn!(%error, "could not publish the deletion's Event");
    }
}

/// Publishes the deletion's progress until dropped (the caller races it with the deletion).
pub async fn follow(
    recorder: &Recorder,
    subject: &ObjectReference,
    snapshots: &Api<LivediskSnapshot>,
    id: &str,
) {
    let mut last_quarter = None;
    loop {
        tokio::time::sleep(POLL).await;
        let progress = match snapshots.get_opt(id).await {
            Ok(Some(snapshot)) => snapshot.status.and_then(|s| s.progress),
            Ok(None) => None,
            Err(error) => {
                tracing::debug!(%error, "reading the deletion's progress");
                None
            }
        };
        if let Some((quarter, note)) = progress
            .as_ref()
            .and_then(|p| progress_note(last_quarter, p))
        {
            last_quarter = Some(quarter);
            publish(recorder, subject, MERGING, note).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_events_come_once_per_quarter_and_never_go_back() {
        let at = |percent: i64| Progress::new(percent, 100, Some(7));
        let (q, note) = progress_note(None, &at(3)).expect("the first one");
        assert_eq!(q, 0);
        assert!(note.contains("3 %") && note.contains("7 bytes/s"), "{note}");
        assert!(progress_note(Some(0), &at(20)).is_none());
        assert_eq!(progress_note(Some(0), &at(26)).map(|(q, _)| q), Some(1));
        assert!(progress_note(Some(2), &at(30)).is_none());
        assert_eq!(progress_note(Some(3), &at(100)).map(|(q, _)| q), Some(4));
    }

    #[test]
    fn the_subject_is_the_volume_snapshot_the_snapshot_was_taken_for() {
        use livedisk_api::internal::{LivediskSnapshotSpec, VolumeSnapshotReference};
        let mut snapshot = LivediskSnapshot::new(
            "snap-1",
            LivediskSnapshotSpec {
                node_name: "node-a".into(),
                volume_id: "vol-1".into(),
                csi_name: "snapshot-x".into(),
                merge_bandwidth_bytes_per_second: Some(1024),
                volume_snapshot: None,
                group: None,
            },
        );
        assert!(subject(&snapshot).is_none());
        snapshot.spec.volume_snapshot = Some(VolumeSnapshotReference {
            namespace: "ns".into(),
            name: "nightly".into(),
            uid: Some("u".into()),
        });
        let subject = subject(&snapshot).expect("a subject");
        assert_eq!(subject.kind.as_deref(), Some("VolumeSnapshot"));
        assert_eq!(subject.uid.as_deref(), Some("u"));
        assert!(started_note(&snapshot).contains("at most 1024 bytes/s"));
    }
}
