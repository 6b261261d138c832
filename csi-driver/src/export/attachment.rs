//! The owner's part of a remote attachment: serves a `LivediskAttachment` with the engine's
//! writable export of the volume (the one a local consumer uses too) and a grant in the front's
//! NBD listener that admits exactly the client node's pinned certificate, and withdraws both
//! when the object goes.
//!
//! The engine's consumer export is shared by the local consumer and every remote one: it is
//! stopped only when none of them is left. An incoming migration's volume on a node that also
//! attaches it remotely is served under an import export of its own (`Engine::serve_volume`),
//! stopped once no attachment names it.
//!
//! An attachment that names a snapshot (a cross-node restore's source) is served the same way
//! with the engine's read-only export of that snapshot, shared with any `DiskExport` of it.

use std::sync::Arc;

use kube::ResourceExt;
use livedisk_api::ExportProtocol;
use livedisk_api::internal::{
    AttachmentPhase, ErrorCode, LivediskAttachment, LivediskAttachmentStatus, NodeError,
};
use livedisk_engine::{EngineError, SnapshotId, VolumeId};

use super::Front;
use super::grants::Grant;
use crate::grpc::error::{CsiError, node_error};

/// Serves one attachment; returns the status to write.
pub async fn serve(
    front: Option<&Arc<Front>>,
    attachment: &LivediskAttachment,
) -> Result<LivediskAttachmentStatus, CsiError> {
    let generation = attachment.metadata.generation;
    let failed = |code: ErrorCode, message: String| LivediskAttachmentStatus {
        observed_generation: generation,
        phase: AttachmentPhase::Failed,
        error: Some(NodeError { code, message }),
        ..Default::default()
    };
    let Some(front) = front else {
        return Ok(failed(
            ErrorCode::FailedPrecondition,
            "this node plugin serves no remote attachments (start it with --export-listen; the chart's exports.enabled)".into(),
        ));
    };
    let Ok(volume) = VolumeId::parse(&attachment.spec.volume_id) else {
        return Ok(failed(
            ErrorCode::InvalidArgument,
            format!("{:?} is not a volume ID", attachment.spec.volume_id),
        ));
    };
    let served = match attachment.spec.snapshot_id.as_deref() {
        None => front.engine.serve_volume(&volume).await,
        Some(snapshot) => match SnapshotId::parse(snapshot) {
            Ok(snapshot) => export_snapshot_of(front, &volume, &snapshot).await,
            Err(_) => {
                return Ok(failed(
                    ErrorCode::InvalidArgument,
                    format!("{snapshot:?} is not a snapshot ID"),
                ));
            }
        },
    };
    let info = match served {
        Ok(info) => info,
        Err(error) if error.code().is_transient() || matches!(error, EngineError::Busy(_)) => {
            return Err(error.into());
        }
        Err(error) => {
            let e = node_error(&error);
            return Ok(failed(e.code, e.message));
        }
    };
    let name = attachment.name_any();
    let pinned = &attachment.spec.client_certificate_sha256;
    if front
        .grants
        .get(&name)
        .is_none_or(|g| g.certificate_sha256 != *pinned)
    {
        front.grants.put(Grant::new(
            name.clone(),
            info.name.clone(),
            ExportProtocol::Nbd,
            info.name.clone(),
            info.socket.clone(),
            pinned.clone(),
            // No bearer token opens a volume: the HTTPS listener never admits this grant.
            String::new(),
            None,
            None,
            0,
        ));
        tracing::info!(attachment = %name, %volume, snapshot = ?attachment.spec.snapshot_id, client = %attachment.spec.client_node, "volume served to a remote node");
    }
    Ok(LivediskAttachmentStatus {
        observed_generation: generation,
        phase: AttachmentPhase::Ready,
        host: Some(front.config.host.clone()),
        port: Some(i32::from(front.config.nbd_port)),
        export: Some(info.name.clone()),
        error: None,
    })
}

/// The read-only export of `snapshot`, which must be one of `volume`'s.
async fn export_snapshot_of(
    front: &Front,
    volume: &VolumeId,
    snapshot: &SnapshotId,
) -> Result<livedisk_engine::ExportInfo, EngineError> {
    let owner = front.engine.snapshot(snapshot)?.volume;
    if &owner != volume {
        return Err(EngineError::InvalidArgument(format!(
            "snapshot {snapshot} belongs to volume {owner}, not to {volume}"
        )));
    }
    front.engine.export_snapshot(snapshot).await
}

/// Withdraws the grant (its connections end) and stops the engine's consumer export unless a
/// local consumer or another remote node still uses it.
pub async fn stop(
    front: &Front,
    attachment: &LivediskAttachment,
    attached_locally: bool,
) -> Result<(), CsiError> {
    let name = attachment.name_any();
    let removed = front.grants.remove(&name);
    let Ok(volume) = VolumeId::parse(&attachment.spec.volume_id) else {
        return Ok(());
    };
    if removed.is_some() {
        tracing::info!(attachment = %name, %volume, "remote attachment withdrawn");
    }
    if let Some(snapshot) = attachment.spec.snapshot_id.as_deref() {
        let Ok(snapshot) = SnapshotId::parse(snapshot) else {
            return Ok(());
        };
        if front.grants.export_shared(&name, snapshot.as_str()) {
            return Ok(());
        }
        return match front.engine.unexport_snapshot(&snapshot).await {
            Ok(()) | Err(EngineError::NotFound(_)) => Ok(()),
            Err(error) => Err(error.into()),
        };
    }
    // An incoming migration's import export (see `Engine::serve_volume`) is the source's way
    // in, whatever else uses the volume here: it goes once no grant names it.
    let import = livedisk_engine::record::import_export_name(&volume);
    if !front.grants.export_shared(&name, &import) && front.engine.serves_import(&volume)? {
        match front.engine.detach_import(&volume).await {
            Ok(()) | Err(EngineError::NotFound(_)) => {}
            Err(error) => return Err(error.into()),
        }
    }
    if attached_locally || front.grants.export_shared(&name, volume.as_str()) {
        return Ok(());
    }
    match front.engine.detach_volume(&volume).await {
        Ok(()) => Ok(()),
        Err(EngineError::NotFound(_)) => Ok(()),
        Err(error) => Err(error.into()),
    }
}
