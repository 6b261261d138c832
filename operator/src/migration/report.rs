//! Pure: the DiskMigration's status from its node work's status (a refusal's is
//! `decide::refused`).
//!
//! The node work's phase becomes the DiskMigration's phase of the same name. Its stage, progress,
//! dirty bytes and cutover pause are copied, and the time left is estimated from the progress.
//! An error the node reports while the migration goes on (a cancel refused because the cutover
//! has started, a step retried) is told in the condition message; it fails nothing.

use livedisk_api::internal::{
    LivediskMigrationSpec, LivediskMigrationStatus, MigrationPhase, MigrationStage, NodeError,
};
use livedisk_api::{Phase, Progress};
use serde_json::Value;

use crate::decide::{Decision, EventKind, Health, conditions};

/// How long a migration that has not ended waits before it is looked at again when nothing woke
/// it: the watch of its node work wakes it on every change (progress included), so this is only
/// a safety net.
pub const RUNNING_RECHECK_SECONDS: u64 = 30;

/// How long an ended migration waits before it is looked at again.
const ENDED_RECHECK_SECONDS: u64 = 300;

/// The status of a DiskMigration from its node work. `ignored_bandwidth`: a `bandwidthLimit` the
/// node work could not take (see `plan::follow`).
pub fn from_node(
    work: &LivediskMigrationSpec,
    status: Option<&LivediskMigrationStatus>,
    ignored_bandwidth: Option<&str>,
) -> Decision {
    let status = status.cloned().unwrap_or_default();
    let source = &work.node_name;
    let target = &work.target_node_name;
    let volume = &work.volume_id;
    let running = status.phase == MigrationPhase::Running;
    let progress = match status.phase {
        // Whole, also when the node's last report came just before the end.
        MigrationPhase::Completed => status.progress.clone().map(Progress::finished),
        _ => status.progress.clone(),
    };
    let pause = status
        .source
        .as_ref()
        .and_then(|s| s.cutover_pause_milliseconds);
    let pivoted = status.source.as_ref().is_some_and(|s| s.pivoted);
    let target_error = status.target.as_ref().and_then(|t| t.error.as_ref());

    // Every field is written, null when the node work has no value: a merge patch clears it, so
    // the status never keeps a stage or an estimate that no longer holds.
    let mut fields = serde_json::Map::new();
    fields.insert("sourceNodeName".into(), source.as_str().into());
    let stage = status.stage.filter(|_| running);
    fields.insert("stage".into(), json_or_null(stage.as_ref()));
    fields.insert("progress".into(), json_or_null(progress.as_ref()));
    fields.insert(
        "dirtyBytesRemaining".into(),
        status.dirty_bytes_remaining.into(),
    );
    let eta = progress.as_ref().filter(|_| running).and_then(eta_seconds);
    fields.insert("etaSeconds".into(), eta.into());
    fields.insert("cutoverPauseMilliseconds".into(), pause.into());
    let verification = status.source.as_ref().and_then(|s| s.verification.clone());
    fields.insert("verification".into(), json_or_null(verification.as_ref()));

    // A cancel asked for, what the nodes say while the migration goes on, and a rate limit that
    // was not taken.
    let notes = || {
        let mut notes = String::new();
        if work.cancel {
            notes.push_str("; cancel requested (honoured until the cutover starts)");
        }
        if let Some(e) = &status.error {
            notes.push_str(&format!("; node {source} reports {}", said(e)));
        }
        if let Some(e) = target_error {
            notes.push_str(&format!("; target node {target} reports {}", said(e)));
        }
        if let Some(limit) = ignored_bandwidth {
            notes.push_str(&format!(
                "; bandwidthLimit {limit:?} is not a quantity livedisk understands, so the rate stays {}",
                rate(work.bandwidth_bytes_per_second)
            ));
        }
        notes
    };
    let (phase, health, reason, message, event) = match status.phase {
        MigrationPhase::Pending => (
            Phase::Pending,
            Health::InProgress,
            "MigrationPending".to_string(),
            format!(
                "waiting for nodes {source} and {target} to start moving volume {volume}{}",
                notes()
            ),
            EventKind::Normal,
        ),
        MigrationPhase::Running => (
            Phase::Running,
            Health::InProgress,
            "Migrating".into(),
            format!("{}{}", running_message(work, stage), notes()),
            EventKind::Normal,
        ),
        MigrationPhase::Completed => (
            Phase::Completed,
            Health::Ready,
            "MigrationCompleted".into(),
            format!(
                "volume {volume} moved from node {source} to node {target}; {}; {}",
                match pause {
                    Some(ms) => format!("the consumer's I/O was held for {ms} ms at the cutover"),
                    None => "the node did not report the cutover pause".into(),
                },
                match (&verification, work.verify) {
                    (Some(v), _) => format!(
                        "{} bytes compared equal with the source's last content ({} bytes \
                         written after the comparison started were skipped)",
                        v.compared_bytes, v.skipped_bytes
                    ),
                    (None, true) => "the comparison with the source could not run".into(),
                    (None, false) => "not compared (spec.verify is false)".into(),
                }
            ) + if work.cancel {
                // Asked for too late: while the cutover or the verification ran, or after.
                "; cancel refused: the cutover had pivoted and the target held the volume before the cancel took effect"
            } else {
                ""
            },
            EventKind::Normal,
        ),
        MigrationPhase::Cancelled => (
            Phase::Cancelled,
            Health::Stalled,
            "Cancelled".into(),
            format!(
                "cancelled before the cutover: volume {volume} stays on node {source}; node: {}",
                status
                    .error
                    .as_ref()
                    .map(|e| e.message.as_str())
                    .unwrap_or("stopped")
            ),
            EventKind::Normal,
        ),
        MigrationPhase::Failed => {
            let error = status.error.as_ref().or(target_error);
            (
                Phase::Failed,
                Health::Stalled,
                error
                    .map(|e| e.code.reason().to_string())
                    .unwrap_or_else(|| "MigrationFailed".into()),
                format!(
                    "the migration failed {}; node: {}",
                    // The node says which side of the cutover it stopped on.
                    if pivoted {
                        format!("after the cutover: node {target} holds volume {volume}")
                    } else {
                        format!("before the cutover: volume {volume} stays on node {source}")
                    },
                    error.map(|e| e.message.as_str()).unwrap_or("no detail")
                ),
                EventKind::Warning,
            )
        }
    };
    Decision {
        phase,
        conditions: conditions(health, &reason, &message),
        event,
        requeue_seconds: if status.phase.is_terminal() {
            ENDED_RECHECK_SECONDS
        } else {
            RUNNING_RECHECK_SECONDS
        },
        fields,
    }
}

/// Seconds until the copy is done at the recent rate: the bytes left over the rate, rounded up
/// (a byte left is not done). `None` without a rate.
pub fn eta_seconds(progress: &Progress) -> Option<i64> {
    let rate = progress.bytes_per_second.filter(|r| *r > 0)?;
    let left = progress
        .bytes_total
        .saturating_sub(progress.bytes_done)
        .max(0);
    i64::try_from((left as u64).div_ceil(rate as u64)).ok()
}

/// What a running migration is doing, by stage.
fn running_message(work: &LivediskMigrationSpec, stage: Option<MigrationStage>) -> String {
    let source = &work.node_name;
    let target = &work.target_node_name;
    let volume = &work.volume_id;
    match stage {
        None => format!("node {source} moves volume {volume} to node {target}"),
        Some(MigrationStage::Copying) => format!(
            "copying volume {volume} from node {source} to node {target} while it is written (the sealed layers, then a mirror of the active layer)"
        ),
        Some(MigrationStage::Synchronized) if work.hold_cutover => format!(
            "volume {volume} is mirrored to node {target}: every write reaches both nodes; the cutover waits until spec.holdCutover is false"
        ),
        Some(MigrationStage::Synchronized) => format!(
            "volume {volume} is mirrored to node {target}: every write reaches both nodes; the cutover comes next"
        ),
        Some(MigrationStage::CuttingOver) => format!(
            "volume {volume} is cutting over from node {source} to node {target}; a cancel is refused from here on"
        ),
        Some(MigrationStage::Verifying) => format!(
            "node {target} holds volume {volume}; its content is being verified against the source's"
        ),
    }
}

fn said(error: &NodeError) -> String {
    format!("{}: {}", error.code.reason(), error.message)
}

fn rate(bytes_per_second: Option<i64>) -> String {
    match bytes_per_second {
        Some(rate) if rate > 0 => format!("{rate} bytes/s"),
        _ => "unlimited".into(),
    }
}

fn json_or_null<T: serde::Serialize>(value: Option<&T>) -> Value {
    value
        .and_then(|v| serde_json::to_value(v).ok())
        .unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::{condition, refused};
    use crate::migration::plan::Refusal;
    use livedisk_api::conditions::{READY, RECONCILING, STALLED, Status};
    use livedisk_api::internal::{ErrorCode, MigrationSource, MigrationTarget};
    use serde_json::json;

    const VOL: &str = "vol-00000000-0000-4000-8000-000000000001";

    fn work() -> LivediskMigrationSpec {
        LivediskMigrationSpec {
            node_name: "node-a".into(),
            target_node_name: "node-b".into(),
            volume_id: VOL.into(),
            bandwidth_bytes_per_second: Some(1 << 20),
            verify: true,
            cancel: false,
            hold_cutover: false,
        }
    }

    fn source(pause: Option<i64>, pivoted: bool) -> MigrationSource {
        MigrationSource {
            host: "10.0.0.1".into(),
            port: 10809,
            manifest_export: "manifest".into(),
            manifest_length: 1,
            manifest_sha256: "0".repeat(64),
            layers: vec![],
            cutover_pause_milliseconds: pause,
            pivoted,
            verification: None,
            mirror_milliseconds: None,
            mirrored_bytes: None,
        }
    }

    fn message(decision: &Decision) -> &str {
        &decision.conditions[0].message
    }

    #[test]
    fn a_refusal_waits_or_fails_and_says_nothing_was_moved() {
        let waiting = refused(&Refusal::ClaimNotBound("disk".into()));
        assert_eq!(waiting.phase, Phase::Pending);
        assert_eq!(
            condition(&waiting, RECONCILING),
            (Status::True, "ClaimNotBound".into())
        );
        let failed = refused(&Refusal::AlreadyOnTarget {
            node: "node-b".into(),
        });
        assert_eq!(failed.phase, Phase::Failed);
        assert_eq!(
            condition(&failed, STALLED),
            (Status::True, "AlreadyOnTarget".into())
        );
        assert_eq!(
            message(&failed),
            "the volume is on node node-b already; nothing was moved"
        );
        assert!(failed.fields.is_empty(), "nothing started, no source");
    }

    #[test]
    fn a_declared_migration_is_pending_and_names_its_source() {
        let pending = from_node(&work(), None, None);
        assert_eq!(pending.phase, Phase::Pending);
        assert_eq!(
            condition(&pending, RECONCILING),
            (Status::True, "MigrationPending".into())
        );
        assert_eq!(pending.fields["sourceNodeName"], "node-a");
        for cleared in [
            "stage",
            "progress",
            "etaSeconds",
            "dirtyBytesRemaining",
            "cutoverPauseMilliseconds",
        ] {
            assert_eq!(pending.fields[cleared], Value::Null, "{cleared}");
        }
        assert_eq!(pending.requeue_seconds, RUNNING_RECHECK_SECONDS);
        assert_eq!(pending.event, EventKind::Normal);
    }

    #[test]
    fn a_running_migration_reports_its_stage_progress_and_time_left() {
        let mut status = LivediskMigrationStatus {
            phase: MigrationPhase::Running,
            stage: Some(MigrationStage::Copying),
            progress: Some(Progress::new(1 << 30, 3 << 30, Some(100 << 20))),
            dirty_bytes_remaining: Some(4096),
            ..Default::default()
        };
        let running = from_node(&work(), Some(&status), None);
        assert_eq!(running.phase, Phase::Running);
        assert_eq!(
            condition(&running, RECONCILING),
            (Status::True, "Migrating".into())
        );
        assert_eq!(running.fields["stage"], "Copying");
        assert_eq!(running.fields["progress"]["percent"], 33);
        assert_eq!(running.fields["dirtyBytesRemaining"], 4096);
        // 2 GiB left at 100 MiB/s: 20.48 s, rounded up.
        assert_eq!(running.fields["etaSeconds"], 21);
        assert!(message(&running).contains("copying volume"));

        status.stage = Some(MigrationStage::Synchronized);
        status.progress = Some(Progress::new(3 << 30, 3 << 30, Some(0)));
        let synchronized = from_node(&work(), Some(&status), None);
        assert_eq!(synchronized.fields["stage"], "Synchronized");
        assert_eq!(
            synchronized.fields["etaSeconds"],
            Value::Null,
            "no rate, no estimate"
        );
        assert!(message(&synchronized).contains("every write reaches both nodes"));
        let held = LivediskMigrationSpec {
            hold_cutover: true,
            ..work()
        };
        assert!(message(&from_node(&held, Some(&status), None)).contains("spec.holdCutover"));

        status.stage = Some(MigrationStage::CuttingOver);
        assert!(message(&from_node(&work(), Some(&status), None)).contains("cancel is refused"));
        status.stage = Some(MigrationStage::Verifying);
        assert!(message(&from_node(&work(), Some(&status), None)).contains("verified"));
    }

    #[test]
    fn the_fields_are_the_disk_migrations_own() {
        // Written through the status stage and read back with the DiskMigration's own type:
        // every field name is one the CRD knows.
        let status = LivediskMigrationStatus {
            phase: MigrationPhase::Running,
            stage: Some(MigrationStage::Synchronized),
            progress: Some(Progress::new(50, 100, Some(25))),
            dirty_bytes_remaining: Some(7),
            source: Some(source(Some(4), false)),
            ..Default::default()
        };
        let decision = from_node(&work(), Some(&status), None);
        let now = k8s_openapi::jiff::Timestamp::from_second(1_000).expect("timestamp");
        let patch = crate::status::build(None, Some(3), None, &decision, now)
            .patch
            .expect("a first status is written");
        let written: livedisk_api::DiskMigrationStatus =
            serde_json::from_value(patch["status"].clone()).expect("a DiskMigration status");
        assert_eq!(written.observed_generation, Some(3));
        assert_eq!(written.phase, Phase::Running);
        assert_eq!(written.source_node_name.as_deref(), Some("node-a"));
        assert_eq!(written.stage, Some(MigrationStage::Synchronized));
        assert_eq!(written.progress, Some(Progress::new(50, 100, Some(25))));
        assert_eq!(written.dirty_bytes_remaining, Some(7));
        assert_eq!(written.eta_seconds, Some(2));
        assert_eq!(written.cutover_pause_milliseconds, Some(4));
        assert_eq!(written.conditions.len(), 3);

        // Unchanged, nothing is written again.
        let again = crate::status::build(Some(&patch["status"]), Some(3), None, &decision, now);
        assert_eq!(again.patch, None);
    }

    #[test]
    fn the_time_left_is_the_bytes_left_over_the_rate() {
        assert_eq!(eta_seconds(&Progress::new(0, 100, Some(10))), Some(10));
        assert_eq!(eta_seconds(&Progress::new(95, 100, Some(10))), Some(1));
        assert_eq!(eta_seconds(&Progress::new(100, 100, Some(10))), Some(0));
        // The total may lag behind a consumer's writes: never negative.
        assert_eq!(eta_seconds(&Progress::new(120, 100, Some(10))), Some(0));
        assert_eq!(eta_seconds(&Progress::new(0, 100, Some(0))), None);
        assert_eq!(eta_seconds(&Progress::new(0, 100, None)), None);
    }

    #[test]
    fn a_cancel_refused_after_the_cutover_is_told_and_fails_nothing() {
        let status = LivediskMigrationStatus {
            phase: MigrationPhase::Running,
            stage: Some(MigrationStage::CuttingOver),
            error: Some(NodeError {
                code: ErrorCode::FailedPrecondition,
                message: "the cutover has started: the migration completes".into(),
            }),
            ..Default::default()
        };
        let cancelled = LivediskMigrationSpec {
            cancel: true,
            ..work()
        };
        let running = from_node(&cancelled, Some(&status), None);
        assert_eq!(running.phase, Phase::Running);
        assert_eq!(
            condition(&running, RECONCILING),
            (Status::True, "Migrating".into())
        );
        assert_eq!(condition(&running, STALLED).0, Status::False);
        assert!(message(&running).contains("cancel requested"));
        assert!(
            message(&running).contains(
                "node node-a reports FailedPrecondition: the cutover has started: the migration completes"
            ),
            "{}",
            message(&running)
        );

        // The target's word too, and a rate limit the node work could not take.
        let status = LivediskMigrationStatus {
            phase: MigrationPhase::Pending,
            target: Some(MigrationTarget {
                error: Some(NodeError {
                    code: ErrorCode::ResourceExhausted,
                    message: "pool full".into(),
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let pending = from_node(&work(), Some(&status), Some("1e3"));
        assert_eq!(pending.phase, Phase::Pending);
        assert!(
            message(&pending).contains("target node node-b reports ResourceExhausted: pool full")
        );
        assert!(
            message(&pending).contains("bandwidthLimit \"1e3\"")
                && message(&pending).contains("stays 1048576 bytes/s"),
            "{}",
            message(&pending)
        );
    }

    #[test]
    fn a_completed_migration_is_ready_with_its_cutover_pause() {
        let status = LivediskMigrationStatus {
            phase: MigrationPhase::Completed,
            stage: Some(MigrationStage::Verifying),
            progress: Some(Progress::new(90, 100, Some(10))),
            source: Some(source(Some(3), true)),
            ..Default::default()
        };
        let done = from_node(&work(), Some(&status), None);
        assert_eq!(done.phase, Phase::Completed);
        assert_eq!(
            condition(&done, READY),
            (Status::True, "MigrationCompleted".into())
        );
        assert_eq!(done.fields["cutoverPauseMilliseconds"], 3);
        assert_eq!(
            done.fields["stage"],
            Value::Null,
            "a stage only while running"
        );
        assert_eq!(done.fields["etaSeconds"], Value::Null);
        assert_eq!(done.fields["progress"]["percent"], 100);
        assert_eq!(done.fields["sourceNodeName"], "node-a");
        assert!(message(&done).contains("held for 3 ms at the cutover"));
        assert!(message(&done).contains("could not run"));
        assert_eq!(done.event, EventKind::Normal);
        assert_eq!(done.requeue_seconds, ENDED_RECHECK_SECONDS);
        assert!(!message(&done).contains("cancel"));

        // A cancel that came during the cutover or the verification, or after: still Completed
        // and Ready, and the message says the cancel was refused.
        let late = LivediskMigrationSpec {
            cancel: true,
            ..work()
        };
        let refused = from_node(&late, Some(&status), None);
        assert_eq!(refused.phase, Phase::Completed);
        assert_eq!(
            condition(&refused, READY),
            (Status::True, "MigrationCompleted".into())
        );
        assert!(
            message(&refused).contains("cancel refused"),
            "{}",
            message(&refused)
        );
    }

    #[test]
    fn a_cancelled_or_failed_migration_stalls_and_says_where_the_volume_is() {
        let mut status = LivediskMigrationStatus {
            phase: MigrationPhase::Cancelled,
            error: Some(NodeError {
                code: ErrorCode::Cancelled,
                message: "cancelled while copying".into(),
            }),
            ..Default::default()
        };
        let cancelled = from_node(&work(), Some(&status), None);
        assert_eq!(cancelled.phase, Phase::Cancelled);
        assert_eq!(
            condition(&cancelled, STALLED),
            (Status::True, "Cancelled".into())
        );
        assert!(message(&cancelled).contains("stays on node node-a"));
        assert!(message(&cancelled).contains("cancelled while copying"));
        assert_eq!(cancelled.event, EventKind::Normal);

        status.phase = MigrationPhase::Failed;
        status.error = Some(NodeError {
            code: ErrorCode::Unavailable,
            message: "the target's engine is gone".into(),
        });
        let failed = from_node(&work(), Some(&status), None);
        assert_eq!(failed.phase, Phase::Failed);
        assert_eq!(
            condition(&failed, STALLED),
            (Status::True, "Unavailable".into())
        );
        assert!(message(&failed).contains("before the cutover: volume"));
        assert!(message(&failed).contains("the target's engine is gone"));
        assert_eq!(failed.event, EventKind::Warning);

        // Without a word from the source, the target's; after the pivot, the target holds it.
        status.error = None;
        status.source = Some(source(Some(2), true));
        status.target = Some(MigrationTarget {
            error: Some(NodeError {
                code: ErrorCode::Internal,
                message: "content differs".into(),
            }),
            ..Default::default()
        });
        let failed = from_node(&work(), Some(&status), None);
        assert!(message(&failed).contains("after the cutover: node node-b holds volume"));
        assert!(message(&failed).contains("content differs"));

        status.target = None;
        let bare = from_node(&work(), Some(&status), None);
        assert_eq!(condition(&bare, READY).1, "MigrationFailed");
        assert!(message(&bare).ends_with("node: no detail"));
        assert_eq!(bare.fields["cutoverPauseMilliseconds"], json!(2));
    }
}
