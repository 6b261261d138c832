//! The node's part of a `DiskMigration`: carries out a `LivediskMigration` as its source or its
//! target (see the kind's documentation for the protocol).
//!
//! The source's reconcile is a step function over what the object's status and the engine say
//! (requeued every second while it runs), so a restarted plugin takes up where it stopped. The
//! target copies the source's files in a background task per object, killed when the object
//! is cancelled or goes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{self, Event, finalizer};
use kube::{Client, ResourceExt};
use livedisk_api::ExportProtocol;
use livedisk_api::Progress;
use livedisk_api::internal::{
    AttachmentPhase, ErrorCode, LivediskAttachment, LivediskAttachmentSpec, LivediskMigration,
    LivediskSnapshot, LivediskVolume, MigrationLayer, MigrationPhase, MigrationSource,
    MigrationStage, MigrationVerification, NodeError, attachment_name,
};
use livedisk_engine::qcow2::migrate::{FileSource, MigrationStep};
use livedisk_engine::qcow2::remote::RemoteSource;
use livedisk_engine::{EngineError, VolumeId};
use serde_json::{Value, json};

use super::agent::Agent;
use super::remote_attach::ChainParts;
use crate::export::Front;
use crate::export::grants::Grant;
use crate::grpc::error::{CsiError, node_error};

pub const SOURCE_FINALIZER: &str = "livedisk.io/migration-source";
pub const TARGET_FINALIZER: &str = "livedisk.io/migration-target";

/// How often a running migration is looked at again (progress, convergence).
const STEP: Duration = Duration::from_secs(1);

type ReconcileError = finalizer::Error<CsiError>;

/// A step refused for now (a busy volume, a peer not ready): tried again soon, quietly.
fn waits(e: &CsiError) -> bool {
    matches!(
        e.code(),
        tonic::Code::Unavailable | tonic::Code::Aborted | tonic::Code::DeadlineExceeded
    )
}

/// The imports this node runs as a target, by object name.
#[derive(Default)]
pub struct Imports {
    runs: Mutex<HashMap<String, Import>>,
    samples: Mutex<HashMap<String, (std::time::Instant, u64)>>,
    /// When this process started each migration's mirror (as its source).
    mirrors: Mutex<HashMap<String, std::time::Instant>>,
}

struct Import {
    task: tokio::task::JoinHandle<()>,
}

impl Imports {
    fn mirror_started(&self, name: &str) {
        if let Ok(mut m) = self.mirrors.lock() {
            m.insert(name.to_string(), std::time::Instant::now());
        }
    }

    /// How long ago this process started the mirror of `name`; `None` after a restart.
    fn mirror_age(&self, name: &str) -> Option<Duration> {
        let m = self.mirrors.lock().ok()?;
        m.get(name).map(|t| t.elapsed())
    }

    /// Bytes per second since the previous sample of the same migration (the source's reports
    /// come from its reconciles, about once a second).
    pub fn rate(&self, name: &str, bytes: u64) -> Option<i64> {
        let now = std::time::Instant::now();
        let mut samples = self.samples.lock().ok()?;
        let Some(&(then, before)) = samples.get(name) else {
            samples.insert(name.to_string(), (now, bytes));
            return None;
        };
        let secs = now.duration_since(then).as_secs_f64();
        if secs < 0.5 {
            // Too close to the last sample for a rate (a reconcile woken by its own write).
            return None;
        }
        samples.insert(name.to_string(), (now, bytes));
        (bytes >= before).then(|| ((bytes - before) as f64 / secs) as i64)
    }

    fn running(&self, name: &str) -> bool {
        self.runs
            .lock()
            .is_ok_and(|r| r.get(name).is_some_and(|i| !i.task.is_finished()))
    }

    fn start(&self, name: &str, task: tokio::task::JoinHandle<()>) {
        if let Ok(mut r) = self.runs.lock() {
            r.insert(name.to_string(), Import { task });
        }
    }

    fn stop(&self, name: &str) {
        if let Ok(mut r) = self.runs.lock()
            && let Some(i) = r.remove(name)
        {
            i.task.abort();
        }
    }
}

fn api(client: &Client) -> Api<LivediskMigration> {
    Api::all(client.clone())
}

async fn patch_status(client: &Client, name: &str, status: Value) -> Result<(), CsiError> {
    api(client)
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": status })),
        )
        .await?;
    Ok(())
}

fn now() -> Time {
    Time(Timestamp::now())
}

fn node_err(code: ErrorCode, message: impl Into<String>) -> NodeError {
    NodeError {
        code,
        message: message.into(),
    }
}

/// This node's certificate chain split for client use (the front's, which the driver's CA
/// issues for client and server use).
fn identity(front: Option<&Arc<Front>>) -> Result<(ChainParts, &Arc<Front>), CsiError> {
    let front = front.ok_or_else(|| {
        CsiError::FailedPrecondition(
            "migrating a volume needs the export front on both nodes (--export-listen; the \
             chart's exports.enabled)"
                .into(),
        )
    })?;
    let chain = front.tls.chain_pem().ok_or_else(|| {
        CsiError::Unavailable(
            "this node has no certificate from the driver's export CA yet (the operator signs it)"
                .into(),
        )
    })?;
    Ok((ChainParts::of(&chain)?, front))
}

// ----- source ---------------------------------------------------------------

/// Both nodes add their finalizer to the same object: one of two concurrent adds (or removes)
/// is refused by the API server's patch test, and is simply tried again at once.
fn finalizer_race(result: Result<Action, ReconcileError>) -> Result<Action, ReconcileError> {
    match result {
        Err(finalizer::Error::AddFinalizer(_) | finalizer::Error::RemoveFinalizer(_)) => {
            Ok(Action::requeue(Duration::from_millis(200)))
        }
        r => r,
    }
}

pub async fn reconcile_source(
    migration: Arc<LivediskMigration>,
    agent: Arc<Agent>,
) -> Result<Action, ReconcileError> {
    let migrations = api(&agent.client);
    let agent = agent.as_ref();
    let result = finalizer(&migrations, SOURCE_FINALIZER, migration, |event| async move {
        match event {
            Event::Apply(m) => match source_step(agent, &m).await {
                Err(e) if waits(&e) => {
                    tracing::info!(migration = %m.name_any(), error = %e, "migration step waits");
                    Ok(Action::requeue(Duration::from_secs(2)))
                }
                r => r,
            },
            Event::Cleanup(m) => source_cleanup(agent, &m).await,
        }
    })
    .await;
    finalizer_race(result)
}

/// Whether the cutover has (or may have) pivoted: from then on the target is the truth.
fn pivoted_already(
    agent: &Agent,
    m: &LivediskMigration,
    volume: &VolumeId,
) -> Result<bool, CsiError> {
    let status = m.status.clone().unwrap_or_default();
    if status.source.as_ref().is_some_and(|s| s.pivoted) {
        return Ok(true);
    }
    if agent
        .engine
        .migration_marker(volume)?
        .is_some_and(|mk| mk.step == MigrationStep::Pivoting)
    {
        return Ok(true);
    }
    // The volume left this pool after a pivot the status did not record yet.
    Ok(status.source.is_some() && agent.engine.record(volume).is_err())
}

async fn source_step(agent: &Agent, m: &LivediskMigration) -> Result<Action, CsiError> {
    let name = m.name_any();
    let status = m.status.clone().unwrap_or_default();
    if status.phase.is_terminal() {
        return Ok(Action::await_change());
    }
    let volume =
        VolumeId::parse(&m.spec.volume_id).map_err(|e| CsiError::InvalidArgument(e.to_string()))?;
    let client = &agent.client;
    let pivoted = pivoted_already(agent, m, &volume)?;
    if m.spec.cancel && !pivoted {
        abandon(agent, m, &volume).await?;
        patch_status(
            client,
            &name,
            json!({
                "phase": MigrationPhase::Cancelled, "stage": null, "completionTime": now(),
                "error": node_err(ErrorCode::Cancelled, "cancelled on request; the volume stays on this node"),
            }),
        )
        .await?;
        tracing::info!(migration = %name, %volume, "migration cancelled");
        return Ok(Action::await_change());
    }
    if m.spec.cancel && pivoted && status.error.is_none() {
        patch_status(
            client,
            &name,
            json!({ "error": node_err(
                ErrorCode::FailedPrecondition,
                "cancel refused: the cutover has pivoted and the target holds the volume; the migration completes",
            ) }),
        )
        .await?;
    }
    if pivoted {
        return finish(agent, m, &volume, None).await;
    }
    let target = status.target.clone().unwrap_or_default();
    if let Some(error) = target.error.clone() {
        abandon(agent, m, &volume).await?;
        patch_status(
            client,
            &name,
            json!({ "phase": MigrationPhase::Failed, "stage": null, "completionTime": now(),
                    "error": node_err(error.code, format!("the target node failed: {}", error.message)) }),
        )
        .await?;
        return Ok(Action::await_change());
    }
    let Some(target_sha) = target.certificate_sha256.clone() else {
        // The target has not published the certificate it reads with yet.
        return Ok(Action::requeue(STEP));
    };
    let (me, front) = identity(agent.front.as_ref())?;
    let served = match agent.engine.migrate_out_begin(&volume).await {
        Ok(s) => s,
        Err(e @ (EngineError::FailedPrecondition(_) | EngineError::NotFound(_))) => {
            patch_status(
                client,
                &name,
                json!({ "phase": MigrationPhase::Failed, "completionTime": now(),
                        "error": node_error(&e) }),
            )
            .await?;
            return Ok(Action::await_change());
        }
        Err(e) => return Err(e.into()),
    };
    let socket = agent.engine.daemon().runtime.nbd_socket();
    let mut exports = vec![served.manifest_export.clone()];
    exports.extend(served.layers.iter().map(|l| l.1.clone()));
    for export in &exports {
        let work = format!("{name}/{export}");
        if front
            .grants
            .get(&work)
            .is_none_or(|g| g.certificate_sha256 != target_sha)
        {
            front.grants.put(Grant::new(
                work,
                export.clone(),
                ExportProtocol::Nbd,
                export.clone(),
                socket.clone(),
                target_sha.clone(),
                String::new(),
                None,
                None,
                0,
            ));
        }
    }
    let layer_bytes: u64 = served.layers.iter().map(|l| l.2).sum();
    if status.source.is_none() {
        let source = MigrationSource {
            host: front.config.host.clone(),
            port: i32::from(front.config.nbd_port),
            manifest_export: served.manifest_export.clone(),
            manifest_length: served.manifest_length as i64,
            manifest_sha256: served.manifest_sha256.clone(),
            layers: served
                .layers
                .iter()
                .map(|(seq, export, bytes)| MigrationLayer {
                    seq: *seq as i64,
                    export: export.clone(),
                    bytes: *bytes as i64,
                })
                .collect(),
            cutover_pause_milliseconds: None,
            pivoted: false,
            verification: None,
            mirror_milliseconds: None,
            mirrored_bytes: None,
        };
        patch_status(
            client,
            &name,
            json!({ "phase": MigrationPhase::Running, "stage": MigrationStage::Copying,
                    "startTime": now(), "source": source,
                    "progress": Progress::new(0, layer_bytes as i64, None) }),
        )
        .await?;
        tracing::info!(migration = %name, %volume, target = %m.spec.target_node_name, layers = served.layers.len(), "migration started: sealed layers served to the target");
        return Ok(Action::requeue(STEP));
    }
    if !target.imported {
        let done = target.copied_bytes;
        let rate = agent.imports.rate(&name, done.max(0) as u64);
        patch_status(
            client,
            &name,
            json!({ "progress": Progress::new(done, layer_bytes as i64, rate) }),
        )
        .await?;
        return Ok(Action::requeue(STEP));
    }
    // The target serves its copy: mirror the active layer into it.
    let attachments: Api<LivediskAttachment> = Api::all(client.clone());
    let attachment = attachment_name(volume.as_str(), &agent.node_name);
    let spec = LivediskAttachmentSpec {
        node_name: m.spec.target_node_name.clone(),
        client_node: agent.node_name.clone(),
        volume_id: volume.to_string(),
        client_certificate_sha256: me.leaf_sha256.clone(),
        snapshot_id: None,
    };
    let existing = attachments.get_opt(&attachment).await?;
    let served_to_me = match existing {
        Some(a) if a.spec == spec => a.status.filter(|s| s.phase == AttachmentPhase::Ready),
        Some(_) => {
            attachments
                .delete(&attachment, &DeleteParams::default())
                .await?;
            return Ok(Action::requeue(STEP));
        }
        None => {
            let mut object = LivediskAttachment::new(&attachment, spec);
            object.metadata.labels = Some(
                [(
                    livedisk_api::internal::attachment::LABEL_CLIENT_NODE.to_string(),
                    agent.node_name.clone(),
                )]
                .into(),
            );
            match attachments.create(&PostParams::default(), &object).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 409 => {}
                Err(e) => return Err(e.into()),
            }
            return Ok(Action::requeue(STEP));
        }
    };
    let Some(served_to_me) = served_to_me else {
        return Ok(Action::requeue(STEP));
    };
    let (Some(host), Some(port)) = (served_to_me.host, served_to_me.port) else {
        return Ok(Action::requeue(STEP));
    };
    // The import's name on the target: the volume's ID, or its import name when the target
    // also attaches the volume remotely (a consumer there came before its disk).
    let export = served_to_me.export.unwrap_or_else(|| volume.to_string());
    let speed = m.spec.bandwidth_bytes_per_second.map(|b| b.max(0) as u64);
    let progress = match agent.engine.mirror_progress(&volume).await {
        Ok(Some(p)) => p,
        Ok(None) => {
            let target = RemoteSource {
                host,
                port: u16::try_from(port)
                    .map_err(|_| CsiError::Internal(format!("port {port} out of range")))?,
                export,
                ca_pem: me.ca_pem.clone(),
                cert_pem: me.leaf_pem.clone(),
                key_pem: front.key.key_pem().to_string(),
            };
            agent.engine.mirror_start(&volume, &target, speed).await?;
            agent.imports.mirror_started(&name);
            return Ok(Action::requeue(Duration::from_millis(300)));
        }
        Err(e) => {
            // The mirror failed (the target unreachable for longer than the reconnect
            // delay): the source is untouched; start it again.
            tracing::warn!(migration = %name, error = %e, "mirror failed; starting it again");
            agent.engine.migrate_out_abort(&volume).await?;
            return Ok(Action::requeue(Duration::from_secs(2)));
        }
    };
    agent
        .engine
        .mirror_set_speed(&volume, speed.unwrap_or(0))
        .await?;
    let remaining = progress.total.saturating_sub(progress.done);
    // One count for the whole move: the sealed layers copied, then the mirror's bytes.
    let overall = Progress::new(
        (layer_bytes + progress.done) as i64,
        (layer_bytes + progress.total) as i64,
        agent.imports.rate(&name, layer_bytes + progress.done),
    );
    if !progress.ready {
        patch_status(
            client,
            &name,
            json!({ "progress": overall, "dirtyBytesRemaining": remaining }),
        )
        .await?;
        return Ok(Action::requeue(Duration::from_millis(500)));
    }
    // Written once, when the mirror first converges: the time to converge is what it reports,
    // and a held migration must not rewrite its status on every pass (each write wakes the
    // next pass at once).
    if status.stage != Some(MigrationStage::Synchronized) {
        let converged = agent
            .imports
            .mirror_age(&name)
            .map(|d| d.as_millis() as i64);
        patch_status(
            client,
            &name,
            json!({ "stage": MigrationStage::Synchronized, "progress": overall,
                    "dirtyBytesRemaining": remaining,
                    "source": { "mirrorMilliseconds": converged, "mirroredBytes": progress.total } }),
        )
        .await?;
    }
    // Held: the converged mirror keeps the target in step (write-blocking) until the hold is
    // lifted or the migration cancelled; both come back here through a change of the spec.
    if m.spec.hold_cutover {
        return Ok(Action::requeue(Duration::from_secs(5)));
    }
    patch_status(
        client,
        &name,
        json!({ "stage": MigrationStage::CuttingOver }),
    )
    .await?;
    let pause = agent.engine.cutover(&volume, m.spec.verify).await?;
    let pause_ms = pause.as_millis() as i64;
    patch_status(
        client,
        &name,
        json!({ "source": { "pivoted": true, "cutoverPauseMilliseconds": pause_ms } }),
    )
    .await?;
    tracing::info!(migration = %name, %volume, pause_ms, "cutover done: the target holds the volume");
    let mut difference = None;
    if m.spec.verify {
        patch_status(client, &name, json!({ "stage": MigrationStage::Verifying })).await?;
        match agent.engine.verify_migration_out(&volume).await {
            Ok(v) => {
                tracing::info!(migration = %name, %volume, compared = v.compared, skipped = v.skipped, difference = ?v.first_difference, "verification done");
                difference = v.first_difference;
                let found = MigrationVerification {
                    compared_bytes: v.compared as i64,
                    skipped_bytes: v.skipped as i64,
                    first_difference_offset: v.first_difference.map(|o| o as i64),
                };
                patch_status(
                    client,
                    &name,
                    json!({ "source": { "verification": found } }),
                )
                .await?;
            }
            // The comparison is a check, not a step of the move: the target is the truth
            // either way. Said in the status, never retried (the bitmap is gone with a restart).
            Err(e) => {
                tracing::warn!(migration = %name, %volume, error = %e, "verification could not run");
                patch_status(
                    client,
                    &name,
                    json!({ "error": node_err(ErrorCode::Internal, format!("the cutover pivoted; the comparison with the source could not run: {e}")) }),
                )
                .await?;
            }
        }
    }
    if let Some(offset) = difference {
        agent.engine.complete_migration_out(&volume).await?;
        hand_over(&agent.client, &volume, &m.spec.target_node_name).await?;
        withdraw_grants(agent, &name);
        patch_status(
            client,
            &name,
            json!({ "phase": MigrationPhase::Failed, "stage": null, "completionTime": now(),
                    "error": node_err(ErrorCode::Internal, format!(
                        "the target holds the volume (the cutover pivoted), but its content differs from the source's at offset {offset}, outside what was written after the comparison started"
                    )) }),
        )
        .await?;
        return Ok(Action::await_change());
    }
    // `m` was read before this pass reported the mirror's bytes: its progress is older.
    finish(agent, m, &volume, Some(overall.bytes_total)).await
}

/// After the pivot: the cutover finished if a crash interrupted it, the inventory handed to the
/// target, the grants withdrawn, the attachment kept only while a consumer here uses it.
/// `moved_bytes` is the move's total when this pass knows it; otherwise the last one reported.
async fn finish(
    agent: &Agent,
    m: &LivediskMigration,
    volume: &VolumeId,
    moved_bytes: Option<i64>,
) -> Result<Action, CsiError> {
    let name = m.name_any();
    agent.engine.complete_migration_out(volume).await?;
    hand_over(&agent.client, volume, &m.spec.target_node_name).await?;
    withdraw_grants(agent, &name);
    if agent.engine.remote_record(volume)?.is_none() {
        delete_attachment(agent, volume).await?;
    }
    let total = moved_bytes
        .or_else(|| m.status.as_ref()?.progress.as_ref().map(|p| p.bytes_total))
        .unwrap_or(0);
    patch_status(
        &agent.client,
        &name,
        json!({ "phase": MigrationPhase::Completed, "stage": null, "completionTime": now(),
                "dirtyBytesRemaining": 0, "progress": Progress::new(total, total, None),
                "source": { "pivoted": true } }),
    )
    .await?;
    tracing::info!(migration = %name, %volume, "migration completed");
    Ok(Action::await_change())
}

/// Ownership's second phase: the volume's and its snapshots' inventory objects name the target
/// (the first phase was the import the target serves; the engine's pivot decided the truth).
async fn hand_over(client: &Client, volume: &VolumeId, target: &str) -> Result<(), CsiError> {
    let patch = Patch::Merge(json!({ "spec": { "nodeName": target } }));
    let volumes: Api<LivediskVolume> = Api::all(client.clone());
    match volumes
        .patch(volume.as_str(), &PatchParams::default(), &patch)
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 404 => {}
        Err(e) => return Err(e.into()),
    }
    let snapshots: Api<LivediskSnapshot> = Api::all(client.clone());
    let list = snapshots
        .list(&ListParams::default().fields(&format!("spec.volumeId={volume}")))
        .await?;
    for s in list.items {
        if s.spec.node_name != target {
            snapshots
                .patch(&s.name_any(), &PatchParams::default(), &patch)
                .await?;
        }
    }
    Ok(())
}

fn withdraw_grants(agent: &Agent, name: &str) {
    if let Some(front) = &agent.front {
        let prefix = format!("{name}/");
        for work in front.grants.works() {
            if work.starts_with(&prefix) {
                front.grants.remove(&work);
            }
        }
    }
}

async fn delete_attachment(agent: &Agent, volume: &VolumeId) -> Result<(), CsiError> {
    let attachments: Api<LivediskAttachment> = Api::all(agent.client.clone());
    match attachments
        .delete(
            &attachment_name(volume.as_str(), &agent.node_name),
            &DeleteParams::default(),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Gives a migration up before the pivot: the volume stays here as it was.
async fn abandon(agent: &Agent, m: &LivediskMigration, volume: &VolumeId) -> Result<(), CsiError> {
    if agent.engine.record(volume).is_ok() {
        agent.engine.migrate_out_abort(volume).await?;
    }
    withdraw_grants(agent, &m.name_any());
    if agent.engine.remote_record(volume)?.is_none() {
        delete_attachment(agent, volume).await?;
    }
    Ok(())
}

async fn source_cleanup(agent: &Agent, m: &LivediskMigration) -> Result<Action, CsiError> {
    let volume =
        VolumeId::parse(&m.spec.volume_id).map_err(|e| CsiError::InvalidArgument(e.to_string()))?;
    if pivoted_already(agent, m, &volume)? {
        if !m.status.as_ref().is_some_and(|s| s.phase.is_terminal()) {
            // Deleted mid-cutover: the target is the truth; finish the hand-over first.
            finish(agent, m, &volume, None).await?;
        }
        withdraw_grants(agent, &m.name_any());
    } else {
        abandon(agent, m, &volume).await?;
    }
    Ok(Action::await_change())
}

// ----- target ---------------------------------------------------------------

pub async fn reconcile_target(
    migration: Arc<LivediskMigration>,
    agent: Arc<Agent>,
) -> Result<Action, ReconcileError> {
    let migrations = api(&agent.client);
    let agent_ref = agent.clone();
    let result = finalizer(&migrations, TARGET_FINALIZER, migration, |event| async move {
        match event {
            Event::Apply(m) => match target_step(&agent_ref, &m).await {
                Err(e) if waits(&e) => {
                    tracing::info!(migration = %m.name_any(), error = %e, "migration step waits");
                    Ok(Action::requeue(Duration::from_secs(2)))
                }
                r => r,
            },
            Event::Cleanup(m) => target_cleanup(&agent_ref, &m).await,
        }
    })
    .await;
    finalizer_race(result)
}

async fn target_step(agent: &Arc<Agent>, m: &LivediskMigration) -> Result<Action, CsiError> {
    let name = m.name_any();
    let status = m.status.clone().unwrap_or_default();
    let volume =
        VolumeId::parse(&m.spec.volume_id).map_err(|e| CsiError::InvalidArgument(e.to_string()))?;
    let pivoted = status.source.as_ref().is_some_and(|s| s.pivoted);
    match status.phase {
        MigrationPhase::Completed => {
            agent.engine.import_commit(&volume)?;
            take_over_consumer(agent, &volume).await?;
            return Ok(Action::await_change());
        }
        MigrationPhase::Failed | MigrationPhase::Cancelled => {
            agent.imports.stop(&name);
            if !pivoted
                && (agent.engine.is_incoming(&volume)? || agent.engine.record(&volume).is_err())
            {
                agent.engine.import_discard(&volume).await?;
            }
            return Ok(Action::await_change());
        }
        _ => {}
    }
    if pivoted {
        // The consumer here is taken over once the migration completed, not before: until
        // then the source compares its old chain with this node's copy outside what its NBD
        // client saw written since the pivot, and the consumer's writes must go that way.
        agent.engine.import_commit(&volume)?;
        return Ok(Action::await_change());
    }
    let target = status.target.clone().unwrap_or_default();
    // Published again whenever it changed: a restarted plugin has a new certificate, which
    // the source must admit instead of the old one.
    let (me, _) = identity(agent.front.as_ref())?;
    if target.certificate_sha256.as_deref() != Some(me.leaf_sha256.as_str()) {
        patch_status(
            &agent.client,
            &name,
            json!({ "target": { "certificateSha256": me.leaf_sha256 } }),
        )
        .await?;
        return Ok(Action::await_change());
    }
    let Some(source) = status.source.clone() else {
        return Ok(Action::await_change());
    };
    if target.imported || target.error.is_some() || agent.imports.running(&name) {
        return Ok(Action::requeue(Duration::from_secs(5)));
    }
    // Not before this node has its certificate again (a restarted plugin waits for it).
    identity(agent.front.as_ref())?;
    let rate = m.spec.bandwidth_bytes_per_second.map(|b| b.max(0) as u64);
    let task = tokio::spawn(import(agent.clone(), name.clone(), volume, source, rate));
    agent.imports.start(&name, task);
    Ok(Action::requeue(Duration::from_secs(5)))
}

/// How long the target keeps trying to copy the source's files before it reports a failure, and
/// how long it waits in between. A restarted source plugin serves them again within seconds; a
/// source whose engine daemon died is back once its plugin gave the daemon up (30 s) and
/// started a new one, so the bound covers that with room to spare.
const IMPORT_RETRY_FOR: Duration = Duration::from_secs(180);
const IMPORT_RETRY: Duration = Duration::from_secs(3);

/// Whether a failed copy may succeed when tried again: the transfer failed, not the data.
fn retryable(e: &EngineError) -> bool {
    matches!(
        e,
        EngineError::QemuImg(_) | EngineError::Unreachable(_) | EngineError::Io(_)
    ) || e.code().is_transient()
}

/// Copies the manifest and the sealed layers, then makes the volume this node's import and
/// reports it; an error is reported for the source to act on.
async fn import(
    agent: Arc<Agent>,
    name: String,
    volume: VolumeId,
    source: MigrationSource,
    rate: Option<u64>,
) {
    let copied = Arc::new(AtomicU64::new(0));
    let reporter = {
        let (client, name, copied) = (agent.client.clone(), name.clone(), copied.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(STEP).await;
                let bytes = copied.load(Ordering::Relaxed);
                let _ = patch_status(
                    &client,
                    &name,
                    json!({ "target": { "copiedBytes": bytes } }),
                )
                .await;
            }
        })
    };
    // A lost connection (the source's plugin or daemon restarting, a network blip) is
    // retried: the source serves the same files again when it comes back.
    let mut attempt = 0;
    let mut started;
    let first = std::time::Instant::now();
    let result = loop {
        attempt += 1;
        started = std::time::Instant::now();
        match import_files(&agent, &volume, &source, rate, &copied).await {
            Err(e) if first.elapsed() < IMPORT_RETRY_FOR && retryable(&e) => {
                tracing::warn!(migration = %name, %volume, attempt, error = %e, "copy failed; retrying");
                tokio::time::sleep(IMPORT_RETRY).await;
            }
            r => break r,
        }
    };
    reporter.abort();
    let body = match result {
        Ok(()) => {
            tracing::info!(migration = %name, %volume, "volume imported; serving it to the source");
            json!({ "target": { "imported": true, "copiedBytes": copied.load(Ordering::Relaxed),
                                "copyMilliseconds": started.elapsed().as_millis() as i64 } })
        }
        Err(e) => {
            tracing::warn!(migration = %name, %volume, error = %e, "import failed");
            json!({ "target": { "error": node_error(&e) } })
        }
    };
    if let Err(e) = patch_status(&agent.client, &name, body).await {
        tracing::warn!(migration = %name, error = %e, "reporting the import");
    }
}

async fn import_files(
    agent: &Agent,
    volume: &VolumeId,
    source: &MigrationSource,
    rate: Option<u64>,
    copied: &AtomicU64,
) -> Result<(), EngineError> {
    // Imported already by a plugin that died before it could say so: only opened again.
    if agent.engine.is_incoming(volume)? {
        let rec = agent.engine.record(volume)?;
        return agent.engine.import_finish(volume, rec).await;
    }
    // A plugin that has just started has no certificate yet: the copy is tried again.
    let (me, front) =
        identity(agent.front.as_ref()).map_err(|e| EngineError::Unreachable(e.to_string()))?;
    let port = u16::try_from(source.port)
        .map_err(|_| EngineError::InvalidArgument(format!("port {} out of range", source.port)))?;
    let key = front.key.key_pem().to_string();
    let mut files: Vec<(Option<u64>, String, u64)> = vec![(
        None,
        source.manifest_export.clone(),
        source.manifest_length as u64,
    )];
    files.extend(
        source
            .layers
            .iter()
            .map(|l| (Some(l.seq as u64), l.export.clone(), l.bytes as u64)),
    );
    let mut before = 0u64;
    for (seq, export, bytes) in &files {
        let from = FileSource {
            host: &source.host,
            port,
            export,
            ca_pem: &me.ca_pem,
            cert_pem: &me.leaf_pem,
            key_pem: &key,
        };
        let base = before;
        agent
            .engine
            .import_file(volume, *seq, *bytes, &from, rate, |done| {
                if seq.is_some() {
                    copied.store(base + done, Ordering::Relaxed);
                }
            })
            .await?;
        if seq.is_some() {
            before += bytes;
        }
    }
    let rec = agent.engine.import_manifest(
        volume,
        source.manifest_length as u64,
        &source.manifest_sha256,
    )?;
    agent.engine.import_finish(volume, rec).await
}

/// After the handover: a consumer of the volume on this node that used it through a remote
/// attachment (it came here before its disk) now writes to the local volume, without the old
/// owner on its way, and the attachment to the old owner is withdrawn. An attachment made
/// before its export sat on a switchable filter keeps its way through the old owner until the
/// consumer stages the volume again (logged).
async fn take_over_consumer(agent: &Agent, volume: &VolumeId) -> Result<(), CsiError> {
    match agent.engine.localize_remote_attachment(volume).await {
        Ok(_) => {}
        Err(EngineError::FailedPrecondition(message)) => {
            tracing::warn!(%volume, %message, "consumer here keeps its way through the old owner");
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    }
    agent.remote_attacher().forget_old_owner(volume).await
}

async fn target_cleanup(agent: &Arc<Agent>, m: &LivediskMigration) -> Result<Action, CsiError> {
    agent.imports.stop(&m.name_any());
    let volume =
        VolumeId::parse(&m.spec.volume_id).map_err(|e| CsiError::InvalidArgument(e.to_string()))?;
    let pivoted = m
        .status
        .as_ref()
        .and_then(|s| s.source.as_ref())
        .is_some_and(|s| s.pivoted);
    if pivoted {
        agent.engine.import_commit(&volume)?;
        take_over_consumer(agent, &volume).await?;
    } else if agent.engine.is_incoming(&volume)? || agent.engine.record(&volume).is_err() {
        agent.engine.import_discard(&volume).await?;
    }
    Ok(Action::await_change())
}
