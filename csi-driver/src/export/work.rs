//! The node's part of a `DiskExport`: serves a `LivediskExport` with its engine's read-only
//! snapshot export and a grant in the front, reports the endpoint, expiry and bytes served, and
//! stops it when the object goes or its time runs out.
//!
//! The engine's export of a snapshot is one per snapshot, shared by every LivediskExport of it
//! on this node (with the same base): it is stopped when the last of them goes. After a restart
//! of the node plugin every object is reconciled again: the engine export is still there (or is
//! re-created from the volume record after a daemon restart) and the grant is put back with the
//! expiry and byte count the status kept.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use livedisk_api::internal::{
    ErrorCode, ExportPhase, LivediskExport, LivediskExportStatus, NodeError,
};
use livedisk_engine::nbd_client::NbdClient;
use livedisk_engine::{EngineError, SnapshotId};

use super::Front;
use super::grants::Grant;
use crate::grpc::error::{CsiError, node_error};

/// How often a served export's byte count is reported.
pub const REPORT_INTERVAL: Duration = Duration::from_secs(10);

/// What one reconcile decided to write and when to look again.
pub struct Outcome {
    pub status: LivediskExportStatus,
    pub requeue: Option<Duration>,
}

/// Pure: whether `next` must be written over `previous`: anything but the byte count changed,
/// or the byte count changed and a report is due (a report per change would wake the reconcile
/// again at once, for as long as a client reads).
pub fn worth_writing(
    previous: Option<&LivediskExportStatus>,
    next: &LivediskExportStatus,
    report_due: impl FnOnce() -> bool,
) -> bool {
    let Some(previous) = previous else {
        return true;
    };
    let same_but_bytes = LivediskExportStatus {
        bytes_served: next.bytes_served,
        ..previous.clone()
    } == *next;
    match same_but_bytes {
        false => true,
        true => previous.bytes_served != next.bytes_served && report_due(),
    }
}

/// Pure: when an export stops, from when it was first served and its TTL.
pub fn expiry(ready: Timestamp, ttl_seconds: Option<i64>) -> Option<Timestamp> {
    let ttl = ttl_seconds?;
    ready
        .checked_add(k8s_openapi::jiff::SignedDuration::from_secs(ttl))
        .ok()
}

fn system_time(t: Timestamp) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_nanos(t.as_nanosecond().max(0) as u64)
}

/// Serves (or stops) one export; returns the status to write.
pub async fn serve(
    front: Option<&Arc<Front>>,
    export: &LivediskExport,
) -> Result<Outcome, CsiError> {
    let name = export.name_any();
    let previous = export.status.clone().unwrap_or_default();
    let generation = export.metadata.generation;
    let Some(front) = front else {
        return Ok(failed(
            previous,
            generation,
            ErrorCode::FailedPrecondition,
            "this node plugin serves no exports (start it with --export-listen; the chart's exports.enabled)".into(),
        ));
    };
    if matches!(previous.phase, ExportPhase::Expired | ExportPhase::Failed) {
        stop(front, export).await?;
        return Ok(Outcome {
            status: previous,
            requeue: None,
        });
    }
    let now = Timestamp::now();
    let expires = previous.expiration_time.as_ref().map(|t| t.0).or_else(|| {
        previous
            .ready_time
            .as_ref()
            .and_then(|r| expiry(r.0, export.spec.ttl_seconds))
    });
    if expires.is_some_and(|e| e <= now) {
        stop(front, export).await?;
        let status = LivediskExportStatus {
            observed_generation: generation,
            phase: ExportPhase::Expired,
            bytes_served: front
                .grants
                .get(&name)
                .map(|g| g.served() as i64)
                .or(previous.bytes_served),
            ..previous
        };
        tracing::info!(export = %name, "export expired: no longer served");
        return Ok(Outcome {
            status,
            requeue: None,
        });
    }
    let invalid = |e: livedisk_engine::ids::IdError| CsiError::InvalidArgument(e.to_string());
    let snapshot = SnapshotId::parse(&export.spec.snapshot_id).map_err(invalid)?;
    let base = export
        .spec
        .base_snapshot_id
        .as_deref()
        .map(SnapshotId::parse)
        .transpose()
        .map_err(invalid)?;
    let served = match &base {
        Some(b) => {
            front
                .engine
                .export_snapshot_changed_since(&snapshot, b)
                .await
        }
        None => front.engine.export_snapshot(&snapshot).await,
    };
    let info = match served {
        Ok(info) => info,
        Err(error) if error.code().is_transient() || matches!(error, EngineError::Busy(_)) => {
            tracing::info!(export = %name, %error, "export waits for its snapshot");
            let status = LivediskExportStatus {
                observed_generation: generation,
                phase: ExportPhase::Pending,
                error: Some(node_error(&error)),
                ..previous
            };
            return Ok(Outcome {
                status,
                requeue: Some(Duration::from_secs(5)),
            });
        }
        Err(error) => {
            let e = node_error(&error);
            return Ok(failed(previous, generation, e.code, e.message));
        }
    };
    let size = match NbdClient::connect(&info.socket, &info.name).await {
        Ok(nbd) => {
            let size = nbd.size();
            let _ = nbd.disconnect().await;
            size
        }
        Err(error) => {
            return Err(CsiError::Unavailable(format!(
                "the engine's export of {snapshot} does not answer: {error}"
            )));
        }
    };
    let ready_time = previous.ready_time.clone().unwrap_or(Time(now));
    let expires = expiry(ready_time.0, export.spec.ttl_seconds);
    let grant = match front.grants.get(&name) {
        Some(g) => g,
        None => {
            let grant = Grant::new(
                name.clone(),
                info.name.clone(),
                export.spec.protocol,
                info.name.clone(),
                info.socket.clone(),
                export.spec.client_certificate_sha256.clone(),
                export.spec.token_sha256.clone(),
                export.spec.base_snapshot_id.clone(),
                expires.map(system_time),
                previous.bytes_served.unwrap_or(0).max(0) as u64,
            );
            tracing::info!(export = %name, snapshot = %snapshot, "export served");
            front.grants.put(grant)
        }
    };
    front.restored(&name);
    let status = LivediskExportStatus {
        observed_generation: generation,
        phase: ExportPhase::Ready,
        endpoint: Some(front.endpoint(export.spec.protocol, &info.name)),
        size_bytes: Some(size as i64),
        ready_time: Some(ready_time),
        expiration_time: expires.map(Time),
        bytes_served: Some(grant.served() as i64),
        error: None,
    };
    let until_expiry = expires
        .map(|e| Duration::from_secs(e.duration_since(now).as_secs().max(0) as u64 + 1))
        .unwrap_or(Duration::MAX);
    Ok(Outcome {
        status,
        requeue: Some(REPORT_INTERVAL.min(until_expiry)),
    })
}

/// Withdraws the grant (its connections end) and, when no other export of this node serves the
/// snapshot, stops the engine's export.
pub async fn stop(front: &Front, export: &LivediskExport) -> Result<(), CsiError> {
    let name = export.name_any();
    front.restored(&name);
    let removed = front.grants.remove(&name);
    let snapshot = export.spec.snapshot_id.as_str();
    if front.grants.export_shared(&name, snapshot) {
        return Ok(());
    }
    let Ok(id) = SnapshotId::parse(snapshot) else {
        return Ok(());
    };
    match front.engine.unexport_snapshot(&id).await {
        Ok(()) => {
            if removed.is_some() {
                tracing::info!(export = %name, %snapshot, "export stopped");
            }
            Ok(())
        }
        Err(EngineError::NotFound(_)) => Ok(()),
        Err(error) => Err(error.into()),
    }
}

fn failed(
    previous: LivediskExportStatus,
    generation: Option<i64>,
    code: ErrorCode,
    message: String,
) -> Outcome {
    Outcome {
        status: LivediskExportStatus {
            observed_generation: generation,
            phase: ExportPhase::Failed,
            error: Some(NodeError { code, message }),
            ..previous
        },
        requeue: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_due_byte_count_is_written_when_nothing_else_changed() {
        let ready = LivediskExportStatus {
            phase: ExportPhase::Ready,
            bytes_served: Some(10),
            ..Default::default()
        };
        let more = LivediskExportStatus {
            bytes_served: Some(20),
            ..ready.clone()
        };
        assert!(worth_writing(None, &ready, || false));
        assert!(!worth_writing(Some(&ready), &ready, || true));
        assert!(!worth_writing(Some(&ready), &more, || false));
        assert!(worth_writing(Some(&ready), &more, || true));
        let expired = LivediskExportStatus {
            phase: ExportPhase::Expired,
            ..ready.clone()
        };
        assert!(worth_writing(Some(&ready), &expired, || false));
    }

    #[test]
    fn an_export_without_ttl_never_expires() {
        let t = Timestamp::from_second(1_000).expect("t");
        assert_eq!(expiry(t, None), None);
        assert_eq!(
            expiry(t, Some(60)),
            Some(Timestamp::from_second(1_060).expect("t"))
        );
    }
}
