//! Pure: the DiskEvacuation's status from its volumes (a refusal's is `decide::refused`), and
//! the Events a pass publishes: Started, VolumeMoved, VolumeFailed, VolumeSkipped, then
//! Completed, Failed or Cancelled.
//!
//! Running while any volume's migration has not ended (or a volume waits for its turn);
//! afterwards Cancelled when a cancel left volumes on the node, Failed when a volume's migration
//! failed (or was cancelled by someone else), else Completed. Skipped volumes are told in the
//! message; they fail nothing.

use livedisk_api::{
    DiskEvacuationSpec, EvacuationCounts, EvacuationVolume, EvacuationVolumePhase, Phase, Progress,
};
use serde_json::Value;

use super::plan::claim_text;
use crate::decide::{Decision, EventKind, Health, conditions};

/// How long a running evacuation waits before it is looked at again when nothing woke it: the
/// watch of its DiskMigrations wakes it on every change, and this finds volumes that appear on
/// the node.
pub const RUNNING_RECHECK_SECONDS: u64 = 30;

/// At most this many volumes are named in a message; the rest are counted.
const NAMED: usize = 5;

/// An Event a pass publishes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    pub kind: EventKind,
    pub reason: &'static str,
    pub message: String,
    /// The object a volume's Event is also about (its `related`): each volume's Event is one of
    /// its own, where Events of the same reason about the evacuation alone would be counted as
    /// repeats of the first.
    pub related: Option<Related>,
}

/// What a volume's Event names beside the evacuation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Related {
    /// Its DiskMigration (namespace, name).
    Migration { namespace: String, name: String },
    /// Its LivediskVolume, when it has no DiskMigration.
    Volume(String),
}

/// Pure: the object a volume's Events name beside the evacuation.
fn related(volume: &EvacuationVolume) -> Related {
    match (&volume.persistent_volume_claim, &volume.migration_name) {
        (Some(claim), Some(name)) => Related::Migration {
            namespace: claim.namespace.clone(),
            name: name.clone(),
        },
        _ => Related::Volume(volume.volume_id.clone()),
    }
}

/// Counts of the volumes by state.
pub fn counts(volumes: &[EvacuationVolume]) -> EvacuationCounts {
    let count = |phase| {
        i32::try_from(volumes.iter().filter(|v| v.phase == phase).count()).unwrap_or(i32::MAX)
    };
    EvacuationCounts {
        total: i32::try_from(volumes.len()).unwrap_or(i32::MAX),
        completed: count(EvacuationVolumePhase::Completed),
        failed: count(EvacuationVolumePhase::Failed),
        cancelled: count(EvacuationVolumePhase::Cancelled),
        skipped: count(EvacuationVolumePhase::Skipped),
    }
}

/// The status of an evacuation from its volumes.
pub fn decide(
    spec: &DiskEvacuationSpec,
    volumes: &[EvacuationVolume],
    progress: Option<&Progress>,
) -> Decision {
    let node = &spec.node_name;
    let counts = counts(volumes);
    let ended = volumes.iter().all(|v| v.phase.is_terminal());
    let of = |phase| volumes.iter().filter(move |v| v.phase == phase);
    let skipped = match counts.skipped {
        0 => String::new(),
        n => format!(
            "; {n} not moved: {}",
            named(of(EvacuationVolumePhase::Skipped), |v| format!(
                "{} ({})",
                v.volume_id,
                v.message.as_deref().unwrap_or("skipped")
            ))
        ),
    };
    let movable = counts.total - counts.skipped;
    let (phase, health, reason, message, event) = if !ended {
        let running = volumes
            .iter()
            .filter(|v| !v.phase.is_terminal() && v.migration_name.is_some())
            .count();
        let waiting = volumes
            .iter()
            .filter(|v| !v.phase.is_terminal() && v.migration_name.is_none())
            .count();
        let (reason, doing) = if spec.cancel {
            (
                "Cancelling",
                format!(
                    "cancelling the evacuation of node {node}: waiting for {running} migration(s) to stop"
                ),
            )
        } else {
            ("Evacuating", format!("moving the volumes of node {node}"))
        };
        (
            Phase::Running,
            Health::InProgress,
            reason,
            format!(
                "{doing}: {} of {movable} moved, {running} migrating, {waiting} waiting for their turn{}{skipped}",
                counts.completed,
                failed_note(volumes, counts.failed),
            ),
            EventKind::Normal,
        )
    } else if spec.cancel && counts.cancelled > 0 {
        (
            Phase::Cancelled,
            Health::Stalled,
            "Cancelled",
            format!(
                "cancelled: {} of {movable} volume(s) moved off node {node} before the cancel, {} left on it{}{skipped}",
                counts.completed,
                counts.cancelled,
                failed_note(volumes, counts.failed),
            ),
            EventKind::Normal,
        )
    } else if counts.failed > 0 || counts.cancelled > 0 {
        let unmoved = counts.failed + counts.cancelled;
        (
            Phase::Failed,
            Health::Stalled,
            "VolumesNotMoved",
            format!(
                "{unmoved} of {movable} volume(s) could not be moved off node {node}: {}; {} moved{skipped}",
                named(
                    volumes.iter().filter(|v| matches!(
                        v.phase,
                        EvacuationVolumePhase::Failed | EvacuationVolumePhase::Cancelled
                    )),
                    said
                ),
                counts.completed,
            ),
            EventKind::Warning,
        )
    } else if counts.total == 0 {
        (
            Phase::Completed,
            Health::Ready,
            "NothingToMove",
            format!("node {node} holds no livedisk volume; nothing was moved"),
            EventKind::Normal,
        )
    } else {
        (
            Phase::Completed,
            Health::Ready,
            "EvacuationCompleted",
            format!(
                "{} volume(s) moved off node {node}{}{skipped}",
                counts.completed,
                destinations(volumes),
            ),
            EventKind::Normal,
        )
    };
    let mut fields = serde_json::Map::new();
    fields.insert(
        "volumes".into(),
        serde_json::to_value(volumes).unwrap_or(Value::Null),
    );
    fields.insert(
        "counts".into(),
        serde_json::to_value(&counts).unwrap_or(Value::Null),
    );
    // Whole once every volume moved, also when the migrations had nothing to copy.
    let progress = progress.cloned().map(|p| match phase {
        Phase::Completed => p.finished(),
        _ => p,
    });
    fields.insert(
        "progress".into(),
        progress
            .and_then(|p| serde_json::to_value(p).ok())
            .unwrap_or(Value::Null),
    );
    Decision {
        phase,
        conditions: conditions(health, reason, &message),
        event,
        requeue_seconds: RUNNING_RECHECK_SECONDS,
        fields,
    }
}

/// The Events of a pass: what changed between the volumes the status listed and the new ones,
/// and the evacuation's own start and end.
pub fn notes(
    spec: &DiskEvacuationSpec,
    previous: &[EvacuationVolume],
    volumes: &[EvacuationVolume],
    created: usize,
    decision: &Decision,
) -> Vec<Note> {
    let node = &spec.node_name;
    let before = |id: &str| previous.iter().find(|v| v.volume_id == id);
    let mut notes = Vec::new();
    let had_migrations = previous.iter().any(|v| v.migration_name.is_some());
    if created > 0 && !had_migrations {
        let movable = volumes
            .iter()
            .filter(|v| v.phase != EvacuationVolumePhase::Skipped)
            .count();
        notes.push(Note {
            kind: EventKind::Normal,
            reason: "Started",
            message: format!(
                "evacuating node {node}: {movable} volume(s) to move, {created} migration(s) started"
            ),
            related: None,
        });
    }
    for volume in volumes {
        let was = before(&volume.volume_id).map(|v| v.phase);
        if was == Some(volume.phase) {
            continue;
        }
        let (kind, reason, message) = match volume.phase {
            EvacuationVolumePhase::Completed => (
                EventKind::Normal,
                "VolumeMoved",
                format!(
                    "volume {} moved to node {}",
                    claim_text(volume),
                    volume.target_node_name.as_deref().unwrap_or("?")
                ),
            ),
            EvacuationVolumePhase::Failed => (EventKind::Warning, "VolumeFailed", said(volume)),
            EvacuationVolumePhase::Skipped => (
                EventKind::Warning,
                "VolumeSkipped",
                format!(
                    "volume {} is not moved: {}",
                    volume.volume_id,
                    volume.message.as_deref().unwrap_or("skipped")
                ),
            ),
            EvacuationVolumePhase::Cancelled => (
                EventKind::Normal,
                "VolumeCancelled",
                format!("volume {} stays on node {node}", claim_text(volume)),
            ),
            EvacuationVolumePhase::Pending | EvacuationVolumePhase::Running => continue,
        };
        notes.push(Note {
            kind,
            reason,
            message,
            related: Some(related(volume)),
        });
    }
    let ended = match decision.phase {
        Phase::Completed => Some("Completed"),
        Phase::Failed => Some("Failed"),
        Phase::Cancelled => Some("Cancelled"),
        Phase::Pending | Phase::Running | Phase::Ready | Phase::Deleting => None,
    };
    if let Some(reason) = ended {
        notes.push(Note {
            kind: decision.event,
            reason,
            message: decision
                .conditions
                .first()
                .map(|c| c.message.clone())
                .unwrap_or_default(),
            related: None,
        });
    }
    notes
}

/// `namespace/claim (volume): what its migration said`.
fn said(volume: &EvacuationVolume) -> String {
    format!(
        "{}: {}",
        claim_text(volume),
        volume.message.as_deref().unwrap_or("no detail")
    )
}

fn failed_note(volumes: &[EvacuationVolume], failed: i32) -> String {
    match failed {
        0 => String::new(),
        n => format!(
            "; {n} failed: {}",
            named(
                volumes
                    .iter()
                    .filter(|v| v.phase == EvacuationVolumePhase::Failed),
                said
            )
        ),
    }
}

/// Where the moved volumes went, by node.
fn destinations(volumes: &[EvacuationVolume]) -> String {
    let mut by_node = std::collections::BTreeMap::<&str, usize>::new();
    for v in volumes
        .iter()
        .filter(|v| v.phase == EvacuationVolumePhase::Completed)
    {
        *by_node
            .entry(v.target_node_name.as_deref().unwrap_or("?"))
            .or_default() += 1;
    }
    if by_node.is_empty() {
        return String::new();
    }
    let list: Vec<String> = by_node
        .iter()
        .map(|(node, n)| format!("{n} to {node}"))
        .collect();
    format!(" ({})", list.join(", "))
}

/// The first [`NAMED`] volumes as `describe` says them, then how many more.
fn named<'a>(
    volumes: impl Iterator<Item = &'a EvacuationVolume>,
    describe: impl Fn(&EvacuationVolume) -> String,
) -> String {
    let all: Vec<&EvacuationVolume> = volumes.collect();
    let mut text: Vec<String> = all.iter().take(NAMED).map(|v| describe(v)).collect();
    if all.len() > NAMED {
        text.push(format!("and {} more", all.len() - NAMED));
    }
    text.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::condition;
    use livedisk_api::ClaimReference;
    use livedisk_api::conditions::{READY, RECONCILING, STALLED, Status};

    fn spec() -> DiskEvacuationSpec {
        DiskEvacuationSpec {
            node_name: "node-a".into(),
            target_node_name: None,
            bandwidth_limit: None,
            max_concurrent_migrations: 2,
            verify: true,
            cancel: false,
        }
    }

    fn volume(id: &str, claim: Option<&str>, phase: EvacuationVolumePhase) -> EvacuationVolume {
        EvacuationVolume {
            volume_id: id.into(),
            persistent_volume_claim: claim.map(|c| ClaimReference {
                namespace: "ns".into(),
                name: c.into(),
            }),
            target_node_name: claim.map(|_| "node-b".into()),
            migration_name: claim.map(|c| format!("evac-drain-{c}")),
            phase,
            stage: None,
            percent: None,
            message: None,
        }
    }

    fn message(decision: &Decision) -> &str {
        &decision.conditions[0].message
    }

    #[test]
    fn running_while_a_volume_moves_or_waits() {
        use EvacuationVolumePhase::*;
        let mut waiting = volume("vol-c", Some("c"), Pending);
        waiting.migration_name = None;
        let volumes = [
            volume("vol-a", Some("a"), Completed),
            volume("vol-b", Some("b"), Running),
            waiting,
            volume("vol-d", None, Skipped),
        ];
        let progress = Progress::new(10, 20, Some(5));
        let decision = decide(&spec(), &volumes, Some(&progress));
        assert_eq!(decision.phase, Phase::Running);
        assert_eq!(
            condition(&decision, RECONCILING),
            (Status::True, "Evacuating".into())
        );
        assert!(
            message(&decision).starts_with(
                "moving the volumes of node node-a: 1 of 3 moved, 1 migrating, 1 waiting"
            ),
            "{}",
            message(&decision)
        );
        assert!(message(&decision).contains("1 not moved: vol-d"));
        assert_eq!(decision.fields["counts"]["total"], 4);
        assert_eq!(decision.fields["counts"]["completed"], 1);
        assert_eq!(decision.fields["counts"]["skipped"], 1);
        assert_eq!(decision.fields["progress"]["percent"], 50);
        assert_eq!(decision.fields["volumes"][1]["phase"], "Running");
    }

    #[test]
    fn completed_when_every_volume_moved_and_skipped_ones_are_told() {
        use EvacuationVolumePhase::*;
        let mut skipped = volume("vol-z", None, Skipped);
        skipped.message = Some("no claim is bound to its PersistentVolume".into());
        let volumes = [
            volume("vol-a", Some("a"), Completed),
            volume("vol-b", Some("b"), Completed),
            skipped,
        ];
        let decision = decide(&spec(), &volumes, None);
        assert_eq!(decision.phase, Phase::Completed);
        assert_eq!(
            condition(&decision, READY),
            (Status::True, "EvacuationCompleted".into())
        );
        assert_eq!(
            message(&decision),
            "2 volume(s) moved off node node-a (2 to node-b); 1 not moved: vol-z (no claim is bound to its PersistentVolume)"
        );
        assert_eq!(decision.fields["progress"], Value::Null);
        let empty = Progress::new(0, 0, Some(0));
        let whole = decide(&spec(), &volumes, Some(&empty));
        assert_eq!(whole.fields["progress"]["percent"], 100);

        let nothing = decide(&spec(), &[], None);
        assert_eq!(nothing.phase, Phase::Completed);
        assert_eq!(condition(&nothing, READY).1, "NothingToMove");
    }

    #[test]
    fn failed_once_the_rest_ended_naming_the_failed_volume() {
        use EvacuationVolumePhase::*;
        let mut broken = volume("vol-b", Some("b"), Failed);
        broken.message = Some("the target is gone".into());
        let still = [volume("vol-a", Some("a"), Running), broken.clone()];
        assert_eq!(decide(&spec(), &still, None).phase, Phase::Running);
        assert!(
            message(&decide(&spec(), &still, None))
                .contains("1 failed: ns/b (vol-b): the target is gone")
        );

        let done = [volume("vol-a", Some("a"), Completed), broken];
        let failed = decide(&spec(), &done, None);
        assert_eq!(failed.phase, Phase::Failed);
        assert_eq!(
            condition(&failed, STALLED),
            (Status::True, "VolumesNotMoved".into())
        );
        assert_eq!(
            message(&failed),
            "1 of 2 volume(s) could not be moved off node node-a: ns/b (vol-b): the target is gone; 1 moved"
        );
        assert_eq!(failed.event, EventKind::Warning);

        // A migration someone else cancelled leaves its volume on the node: not completed.
        let other = [
            volume("vol-a", Some("a"), Completed),
            volume("vol-b", Some("b"), Cancelled),
        ];
        assert_eq!(decide(&spec(), &other, None).phase, Phase::Failed);
    }

    #[test]
    fn cancelled_when_a_cancel_left_volumes_behind() {
        use EvacuationVolumePhase::*;
        let cancel = DiskEvacuationSpec {
            cancel: true,
            ..spec()
        };
        let stopping = [
            volume("vol-a", Some("a"), Completed),
            volume("vol-b", Some("b"), Running),
        ];
        let decision = decide(&cancel, &stopping, None);
        assert_eq!(decision.phase, Phase::Running);
        assert_eq!(condition(&decision, RECONCILING).1, "Cancelling");

        let stopped = [
            volume("vol-a", Some("a"), Completed),
            volume("vol-b", Some("b"), Cancelled),
        ];
        let decision = decide(&cancel, &stopped, None);
        assert_eq!(decision.phase, Phase::Cancelled);
        assert_eq!(
            condition(&decision, STALLED),
            (Status::True, "Cancelled".into())
        );
        assert!(
            message(&decision)
                .contains("1 of 2 volume(s) moved off node node-a before the cancel, 1 left on it")
        );
        // A cancel that came after every volume moved cancels nothing.
        let all = [volume("vol-a", Some("a"), Completed)];
        assert_eq!(decide(&cancel, &all, None).phase, Phase::Completed);
    }

    #[test]
    fn events_say_what_changed_once() {
        use EvacuationVolumePhase::*;
        let spec = spec();
        let skipped = volume("vol-z", None, Skipped);
        let started = [volume("vol-a", Some("a"), Pending), skipped.clone()];
        let decision = decide(&spec, &started, None);
        let first = notes(&spec, &[], &started, 1, &decision);
        let reasons: Vec<&str> = first.iter().map(|n| n.reason).collect();
        assert_eq!(reasons, ["Started", "VolumeSkipped"]);
        assert_eq!(
            first[0].message,
            "evacuating node node-a: 1 volume(s) to move, 1 migration(s) started"
        );

        // Nothing changed: nothing said.
        assert!(notes(&spec, &started, &started, 0, &decision).is_empty());

        let moved = [volume("vol-a", Some("a"), Completed), skipped];
        let done = decide(&spec, &moved, None);
        let last = notes(&spec, &started, &moved, 0, &done);
        let reasons: Vec<&str> = last.iter().map(|n| n.reason).collect();
        assert_eq!(reasons, ["VolumeMoved", "Completed"]);
        assert_eq!(last[0].message, "volume ns/a (vol-a) moved to node node-b");
        assert_eq!(
            last[0].related,
            Some(Related::Migration {
                namespace: "ns".into(),
                name: "evac-drain-a".into()
            })
        );
        assert_eq!(first[1].related, Some(Related::Volume("vol-z".into())));
        assert_eq!(last[1].related, None);
        assert_eq!(last[1].kind, EventKind::Normal);

        let mut broken = volume("vol-a", Some("a"), Failed);
        broken.message = Some("verification found a difference".into());
        let failed = [broken];
        let decision = decide(&spec, &failed, None);
        let notes = notes(&spec, &started[..1], &failed, 0, &decision);
        assert_eq!(notes[0].reason, "VolumeFailed");
        assert_eq!(notes[0].kind, EventKind::Warning);
        assert!(notes[0].message.contains("verification found a difference"));
        assert_eq!(
            (notes[1].reason, notes[1].kind),
            ("Failed", EventKind::Warning)
        );
    }

    #[test]
    fn long_lists_are_cut() {
        use EvacuationVolumePhase::*;
        let volumes: Vec<EvacuationVolume> = (0..8)
            .map(|i| volume(&format!("vol-{i}"), None, Skipped))
            .collect();
        let decision = decide(&spec(), &volumes, None);
        assert!(
            message(&decision).ends_with("and 3 more"),
            "{}",
            message(&decision)
        );
    }
}
