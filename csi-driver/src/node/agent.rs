//! The node agent: makes this node's `LivediskVolume`s and `LivediskSnapshot`s real with the
//! engine, carries out its `LivediskMerge`s (see `merge_work.rs`) and `LivediskRestore`s (see
//! `restore_work.rs`), and reports back in their status.
//!
//! It watches only its own objects (a field selector on the selectable `spec.nodeName`). Both
//! reconcilers run through kube-runtime's `finalizer()`: the node's finalizer is on an object
//! before any storage is made for it (`Apply`), and comes off only once the storage is gone
//! (`Cleanup`). A deletion that fails keeps the finalizer, reports the error in status and is
//! retried. Status is written by server-side apply of the typed status structs, which
//! `report.rs` decides. The agent is idempotent: after a crash it reconciles everything again,
//! and the engine's create/delete calls tolerate repeats.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::core::object::HasStatus;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::finalizer::{self, Event, finalizer};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use livedisk_api::Progress;
use livedisk_api::internal::{
    ContentSource, ErrorCode, GROUP_SNAPSHOT_LABEL, LivediskAttachment, LivediskExport,
    LivediskMerge, LivediskMigration, LivediskNode, LivediskNodeSpec, LivediskNodeStatus,
    LivediskRestore, LivediskRestoreStatus, LivediskSnapshot, LivediskVolume, NODE_FINALIZER,
    NodeError, NodePhase, RestoreWait, SnapshotGroup,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::merge_work::{self, PROGRESS_INTERVAL, Runs};
use super::metrics::{NodeMetrics, OperationKind};
use super::migration_work;
use super::pool_check;
use super::report::{self, SnapshotReport, VolumeReport};
use super::restore_work::{self, AfterError};
use crate::grpc::error::{CsiError, node_error};
use livedisk_common::error_chain;
use livedisk_engine::qcow2::remote_clone::RemoteSnapshot;
use livedisk_engine::{Engine, EngineError, SnapshotId, VolumeId, VolumeInfo};

pub struct Agent {
    pub client: Client,
    pub engine: Arc<Engine>,
    pub node_name: String,
    /// Where the controller reaches this node's changed-block service, if it is served.
    pub metadata_endpoint: Option<String>,
    /// Counts the storage operations below as they run.
    pub metrics: Arc<NodeMetrics>,
    /// The merges running on this node (`LivediskMerge`), each in its own task.
    pub merges: Runs,
    /// The export front, when this node serves exports.
    pub front: Option<Arc<crate::export::Front>>,
    /// The volumes this node imports as a migration's target, each in its own task.
    pub imports: super::migration_work::Imports,
    /// Calls on a volume in progress, shared with the CSI node service (one at a time).
    pub volume_calls: crate::grpc::inflight::InFlight,
    /// One take of a group snapshot at a time (its members are reconciled side by side).
    pub group_turns: super::group_turns::GroupTurns,
}

impl Agent {
    pub(super) fn remote_attacher(&self) -> super::remote_attach::RemoteAttacher {
        super::remote_attach::RemoteAttacher::new(
            self.client.clone(),
            self.node_name.clone(),
            self.engine.clone(),
            self.front.clone(),
        )
    }
}

/// The field manager of everything the node writes: its objects' status, its `LivediskNode`.
const FIELD_MANAGER: &str = "livedisk-node";

/// A reconcile's failure: adding or removing the finalizer, or the work itself.
type ReconcileError = finalizer::Error<CsiError>;

/// Runs the volume and snapshot reconcilers of this node until shutdown.
pub async fn run(agent: Arc<Agent>) {
    let selector = format!("spec.nodeName={}", agent.node_name);
    let volumes: Api<LivediskVolume> = Api::all(agent.client.clone());
    let snapshots: Api<LivediskSnapshot> = Api::all(agent.client.clone());
    let volume_loop = Controller::new(volumes, watcher::Config::default().fields(&selector))
        .shutdown_on_signal()
        .run(reconcile_volume, retry, agent.clone())
        .for_each(|_| async {});
    let agent_for_report = agent.clone();
    let snapshot_loop = Controller::new(snapshots, watcher::Config::default().fields(&selector))
        .shutdown_on_signal()
        .run(reconcile_snapshot, retry, agent.clone())
        .for_each(|_| async {});
    let merges: Api<LivediskMerge> = Api::all(agent.client.clone());
    let merge_loop = Controller::new(merges, watcher::Config::default().fields(&selector))
        .shutdown_on_signal()
        .run(reconcile_merge, retry, agent.clone())
        .for_each(|_| async {});
    let restores: Api<LivediskRestore> = Api::all(agent.client.clone());
    let restore_loop = Controller::new(restores, watcher::Config::default().fields(&selector))
        .shutdown_on_signal()
        .run(reconcile_restore, retry, agent.clone())
        .for_each(|_| async {});
    let exports: Api<LivediskExport> = Api::all(agent.client.clone());
    if let Some(front) = &agent.front {
        // The exports served before this start: the front tells their clients to retry until
        // each is back (the reconciler below serves them again).
        match exports.list(&ListParams::default().fields(&selector)).await {
            Ok(list) => front.expect_restore(
                list.items
                    .iter()
                    .filter(|e| {
                        e.status
                            .as_ref()
                            .is_some_and(|s| s.phase == livedisk_api::internal::ExportPhase::Ready)
                    })
                    .map(|e| e.name_any()),
            ),
            Err(error) => tracing::warn!(%error, "listing this node's LivediskExports"),
        }
    }
    let export_loop = Controller::new(exports, watcher::Config::default().fields(&selector))
        .shutdown_on_signal()
        .run(reconcile_export, retry, agent.clone())
        .for_each(|_| async {});
    let attachments: Api<LivediskAttachment> = Api::all(agent.client.clone());
    let attachment_loop =
        Controller::new(attachments, watcher::Config::default().fields(&selector))
            .shutdown_on_signal()
            .run(reconcile_attachment, retry, agent.clone())
            .for_each(|_| async {});
    // A migration is this node's work as its source (`spec.nodeName`) or as its target.
    let migrations: Api<LivediskMigration> = Api::all(agent.client.clone());
    let migration_source_loop = Controller::new(
        migrations.clone(),
        watcher::Config::default().fields(&selector),
    )
    .shutdown_on_signal()
    .run(migration_work::reconcile_source, retry, agent.clone())
    .for_each(|_| async {});
    let target_selector = format!("spec.targetNodeName={}", agent.node_name);
    let migration_target_loop = Controller::new(
        migrations,
        watcher::Config::default().fields(&target_selector),
    )
    .shutdown_on_signal()
    .run(migration_work::reconcile_target, retry, agent)
    .for_each(|_| async {});
    tokio::join!(
        volume_loop,
        snapshot_loop,
        merge_loop,
        restore_loop,
        export_loop,
        attachment_loop,
        migration_source_loop,
        migration_target_loop,
        report_node(agent_for_report)
    );
}

/// Whether a reconcile failed only because its object is gone: a second reconcile of an object
/// whose deletion the first one finished (from a cache that had not seen it go yet). Nothing is
/// left to do then.
fn object_gone(error: &ReconcileError) -> bool {
    let api_status = match error {
        finalizer::Error::AddFinalizer(kube::Error::Api(status))
        | finalizer::Error::RemoveFinalizer(kube::Error::Api(status))
        | finalizer::Error::ApplyFailed(CsiError::Kube(kube::Error::Api(status)))
        | finalizer::Error::CleanupFailed(CsiError::Kube(kube::Error::Api(status))) => status,
        _ => return false,
    };
    api_status.code == 404
}

fn done_if_gone(result: Result<Action, ReconcileError>) -> Result<Action, ReconcileError> {
    match result {
        Err(error) if object_gone(&error) => Ok(Action::await_change()),
        other => other,
    }
}

/// The agent's error policy: a transient error (a conflict, the engine daemon or the API server
/// restarting) is retried soon; a permanent one (a missing permission, an object the API
/// rejects) slowly, since only a person changing something can make it pass. What failed is
/// already in the object's `status.error` where the engine was at fault.
fn retry<K: Resource<DynamicType = ()>>(
    object: Arc<K>,
    error: &ReconcileError,
    _: Arc<Agent>,
) -> Action {
    let code = reconcile_error_code(error);
    let after = retry_after(error);
    let chain = error_chain(error);
    tracing::warn!(
        kind = %K::kind(&()),
        name = %object.name_any(),
        %code,
        error = %chain,
        "reconcile failed: {}; retrying in {}s",
        code.reason(),
        after.as_secs()
    );
    Action::requeue(after)
}

/// When a failed reconcile is tried again: by the code's class, except a deletion, which is
/// tried again soon whatever stopped it. What stands in a deletion's way (a consumer still
/// attached, a snapshot still exported, a busy source volume) goes away without any change to
/// the object, so no event would wake the reconcile earlier, and a held finalizer holds up
/// whoever deletes (the CSI DeleteVolume, a namespace).
fn retry_after(error: &ReconcileError) -> Duration {
    match error {
        finalizer::Error::CleanupFailed(_) => livedisk_common::code::TRANSIENT_RETRY,
        _ => reconcile_error_code(error).retry_after(),
    }
}

/// The code of a failed reconcile: the agent's own error's, or the API server's for a
/// finalizer patch.
fn reconcile_error_code(error: &ReconcileError) -> ErrorCode {
    match error {
        finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => e.error_code(),
        finalizer::Error::AddFinalizer(e) | finalizer::Error::RemoveFinalizer(e) => {
            livedisk_api::kube_error_code(e)
        }
        finalizer::Error::UnnamedObject | finalizer::Error::InvalidFinalizer => {
            ErrorCode::InvalidArgument
        }
    }
}

/// A server-side apply of an object's status: its type, its name and the whole status the node
/// reports. Fields the node leaves out are removed, since it owns them all.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct StatusApply<'a, S> {
    api_version: &'a str,
    kind: &'a str,
    metadata: ObjectName<'a>,
    status: &'a S,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ObjectName<'a> {
    name: &'a str,
    /// A precondition: the apply fails with 409 Conflict unless the object is still at this
    /// version.
    #[serde(skip_serializing_if = "Option::is_none")]
    resource_version: Option<&'a str>,
}

async fn apply_status<K>(api: &Api<K>, name: &str, status: &K::Status) -> Result<(), kube::Error>
where
    K: Resource<DynamicType = ()> + HasStatus + Clone + DeserializeOwned + std::fmt::Debug,
    K::Status: Serialize + std::fmt::Debug,
{
    apply_status_at(api, name, None, status).await?;
    Ok(())
}

/// [`apply_status`], only if the object is still at `resource_version` (when given); returns
/// the object as written.
async fn apply_status_at<K>(
    api: &Api<K>,
    name: &str,
    resource_version: Option<&str>,
    status: &K::Status,
) -> Result<K, kube::Error>
where
    K: Resource<DynamicType = ()> + HasStatus + Clone + DeserializeOwned + std::fmt::Debug,
    K::Status: Serialize + std::fmt::Debug,
{
    let body = StatusApply {
        api_version: &K::api_version(&()),
        kind: &K::kind(&()),
        metadata: ObjectName {
            name,
            resource_version,
        },
        status,
    };
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await
}

/// How often the node refreshes its `LivediskNode` report.
const REPORT_INTERVAL: Duration = Duration::from_secs(20);

/// Keeps this node's `LivediskNode` current: pool space, volume count, engine pid.
async fn report_node(agent: Arc<Agent>) {
    let api: Api<LivediskNode> = Api::all(agent.client.clone());
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let name = agent.node_name.as_str();
    loop {
        let pool = agent.engine.pool().to_path_buf();
        let node = LivediskNode::new(
            name,
            LivediskNodeSpec {
                pool_path: Some(pool.display().to_string()),
            },
        );
        let space = super::mounts::statvfs_off_runtime(&pool).await.ok();
        let status = LivediskNodeStatus {
            pool_capacity_bytes: space.map(|s| (s.f_blocks * s.f_frsize) as i64),
            pool_available_bytes: space.map(|s| (s.f_bavail * s.f_frsize) as i64),
            volumes: agent.engine.list_volumes().map(|v| v.len() as i64).ok(),
            engine_pid: agent.engine.daemon().pid.map(i64::from),
            engine_live: Some(super::engine_health::ready(agent.engine.session())),
            metadata_endpoint: agent.metadata_endpoint.clone(),
            export_front: agent.front.as_ref().map(|f| f.report()),
            heartbeat_time: Some(Time(Timestamp::now())),
        };
        let result = async {
            api.patch(name, &params, &Patch::Apply(&node)).await?;
            apply_status(&api, name, &status).await
        };
        if let Err(error) = result.await {
            tracing::warn!(%error, "could not report this node's LivediskNode");
        }
        tokio::time::sleep(REPORT_INTERVAL).await;
    }
}

async fn reconcile_volume(
    volume: Arc<LivediskVolume>,
    agent: Arc<Agent>,
) -> Result<Action, ReconcileError> {
    let api: Api<LivediskVolume> = Api::all(agent.client.clone());
    let (api_ref, agent) = (&api, agent.as_ref());
    let result = finalizer(&api, NODE_FINALIZER, volume, |event| async move {
        match event {
            Event::Apply(volume) => apply_volume(api_ref, agent, &volume).await,
            Event::Cleanup(volume) => cleanup_volume(api_ref, agent, &volume).await,
        }
    })
    .await;
    done_if_gone(result)
}

async fn reconcile_snapshot(
    snapshot: Arc<LivediskSnapshot>,
    agent: Arc<Agent>,
) -> Result<Action, ReconcileError> {
    let api: Api<LivediskSnapshot> = Api::all(agent.client.clone());
    let (api_ref, agent) = (&api, agent.as_ref());
    let result = finalizer(&api, NODE_FINALIZER, snapshot, |event| async move {
        match event {
            Event::Apply(snapshot) => apply_snapshot(api_ref, agent, &snapshot).await,
            Event::Cleanup(snapshot) => cleanup_snapshot(api_ref, agent, &snapshot).await,
        }
    })
    .await;
    done_if_gone(result)
}

async fn reconcile_merge(
    merge: Arc<LivediskMerge>,
    agent: Arc<Agent>,
) -> Result<Action, ReconcileError> {
    let api: Api<LivediskMerge> = Api::all(agent.client.clone());
    let (api_ref, agent) = (&api, agent.as_ref());
    let result = finalizer(&api, NODE_FINALIZER, merge, |event| async move {
        match event {
            Event::Apply(merge) => apply_merge(api_ref, agent, &merge).await,
            Event::Cleanup(merge) => cleanup_merge(agent, &merge).await,
        }
    })
    .await;
    done_if_gone(result)
}

/// Starts the merge (or picks it up after a restart), applies a changed rate limit and a cancel
/// to the running job, and reports its progress at most every [`PROGRESS_INTERVAL`] until it
/// reaches a terminal phase.
async fn apply_merge(
    api: &Api<LivediskMerge>,
    agent: &Agent,
    merge: &LivediskMerge,
) -> Result<Action, CsiError> {
    let name = merge.name_any();
    let previous = merge.status.as_ref();
    let generation = merge.metadata.generation;
    if previous.is_some_and(|s| s.phase.is_terminal()) {
        return Ok(Action::await_change());
    }
    let run = match agent.merges.get(&name) {
        Some(run) => run,
        None if merge.spec.cancel => {
            let status = merge_work::cancelled_before_start(previous, generation, Timestamp::now());
            apply_status(api, &name, &status).await?;
            return Ok(Action::await_change());
        }
        None => {
            let merged = previous.map(|s| s.merged.clone()).unwrap_or_default();
            match agent
                .merges
                .start(&name, agent.engine.clone(), &merge.spec, &merged)
            {
                Ok(run) => run,
                Err(error) => {
                    let status = merge_work::refused(previous, generation, error, Timestamp::now());
                    apply_status(api, &name, &status).await?;
                    return Ok(Action::await_change());
                }
            }
        }
    };
    let speed = merge_work::speed_of(&merge.spec);
    if run.set_speed(speed)
        && let Some(job) = run.current_job()
        && let Err(error) = agent.engine.set_job_speed(&job, speed).await
    {
        tracing::warn!(merge = %name, job, %error, "could not change the merge job's speed");
    }
    if merge.spec.cancel {
        stop_run(agent, &run).await;
    }
    let jobs = agent.engine.jobs().await.unwrap_or_default();
    let view = run.observe(&jobs, std::time::Instant::now());
    let status = merge_work::merge_status(previous, generation, &view, Timestamp::now());
    if previous != Some(&status) {
        apply_status(api, &name, &status).await?;
    }
    if status.phase.is_terminal() {
        agent.merges.remove(&name);
        tracing::info!(merge = %name, phase = ?status.phase, "merge ended");
        return Ok(Action::await_change());
    }
    Ok(Action::requeue(PROGRESS_INTERVAL))
}

/// Asks a run to stop and cancels its job (again on every pass: the job may have started right
/// after the previous attempt).
async fn stop_run(agent: &Agent, run: &merge_work::RunState) {
    run.request_cancel();
    if let Some(job) = run.current_job()
        && let Err(error) = agent.engine.cancel_job(&job).await
    {
        tracing::debug!(job, %error, "cancelling the merge job");
    }
}

/// A deleted `LivediskMerge` stops its merge: the finalizer stays until the task ended.
async fn cleanup_merge(agent: &Agent, merge: &LivediskMerge) -> Result<Action, CsiError> {
    let name = merge.name_any();
    let Some(run) = agent.merges.get(&name) else {
        return Ok(Action::await_change());
    };
    stop_run(agent, &run).await;
    let view = run.observe(&[], std::time::Instant::now());
    if view.outcome.is_none() {
        return Err(CsiError::Aborted(format!("merge {name} (stopping)")));
    }
    agent.merges.remove(&name);
    Ok(Action::await_change())
}

async fn reconcile_export(
    export: Arc<LivediskExport>,
    agent: Arc<Agent>,
) -> Result<Action, ReconcileError> {
    let api: Api<LivediskExport> = Api::all(agent.client.clone());
    let (api_ref, agent) = (&api, agent.as_ref());
    let result = finalizer(&api, NODE_FINALIZER, export, |event| async move {
        match event {
            Event::Apply(export) => apply_export(api_ref, agent, &export).await,
            Event::Cleanup(export) => {
                if let Some(front) = &agent.front {
                    crate::export::work::stop(front, &export).await?;
                }
                Ok(Action::await_change())
            }
        }
    })
    .await;
    done_if_gone(result)
}

/// Serves the export and reports it; a served export is looked at again every few seconds (its
/// byte count, its expiry).
async fn apply_export(
    api: &Api<LivediskExport>,
    agent: &Agent,
    export: &LivediskExport,
) -> Result<Action, CsiError> {
    let name = export.name_any();
    let outcome = crate::export::work::serve(agent.front.as_ref(), export).await?;
    let grant = agent.front.as_ref().and_then(|f| f.grants.get(&name));
    let due = || {
        grant
            .as_ref()
            .is_some_and(|g| g.report_due(crate::export::work::REPORT_INTERVAL))
    };
    if crate::export::work::worth_writing(export.status.as_ref(), &outcome.status, due) {
        apply_status(api, &name, &outcome.status).await?;
    }
    Ok(match outcome.requeue {
        Some(after) => Action::requeue(after),
        None => Action::await_change(),
    })
}

/// Serves a remote node's attachment of a volume this node holds; its deletion withdraws the
/// grant (the finalizer stays until it is withdrawn).
async fn reconcile_attachment(
    attachment: Arc<LivediskAttachment>,
    agent: Arc<Agent>,
) -> Result<Action, ReconcileError> {
    let api: Api<LivediskAttachment> = Api::all(agent.client.clone());
    let (api_ref, agent) = (&api, agent.as_ref());
    // Serving or withdrawing not while a NodeStage or NodeUnstage of the same volume runs here:
    // they share the volume's engine export. A withdrawal could stop it between a NodeStage's
    // export and its front end's connect; a NodeUnstage between a serve's export and its grant
    // would stop an export the grant then names. The reconcile is retried; a NodeStage meanwhile
    // answers ABORTED, which kubelet retries.
    let _call = agent
        .volume_calls
        .begin(&attachment.spec.volume_id)
        .map_err(|e| match attachment.metadata.deletion_timestamp {
            Some(_) => finalizer::Error::CleanupFailed(e),
            None => finalizer::Error::ApplyFailed(e),
        })?;
    let result = finalizer(&api, NODE_FINALIZER, attachment, |event| async move {
        match event {
            Event::Apply(attachment) => {
                let status =
                    crate::export::attachment::serve(agent.front.as_ref(), &attachment).await?;
                if attachment.status.as_ref() != Some(&status) {
                    apply_status(api_ref, &attachment.name_any(), &status).await?;
                }
                Ok(Action::await_change())
            }
            Event::Cleanup(attachment) => {
                if let Some(front) = &agent.front {
                    let local = livedisk_engine::VolumeId::parse(&attachment.spec.volume_id)
                        .is_ok_and(|v| {
                            crate::frontends::layout::FrontEndPaths::new(
                                &agent.engine.daemon().runtime.dir,
                                &v,
                            )
                            .dir
                            .exists()
                        });
                    crate::export::attachment::stop(front, &attachment, local).await?;
                    end_attachment_kept_for_others(agent, front, &attachment, local).await?;
                }
                Ok(Action::await_change())
            }
        }
    })
    .await;
    done_if_gone(result)
}

/// A migration that moved a volume away while another node used it through this one leaves
/// this node attached to the new owner on that node's behalf (`finish_pivot`: the export that
/// node reads stays, now over an NBD client of the new owner). Once the last such node let go
/// and no consumer here uses the volume, that attachment ends too: the engine's part and this
/// node's LivediskAttachment to the new owner.
async fn end_attachment_kept_for_others(
    agent: &Agent,
    front: &crate::export::Front,
    attachment: &LivediskAttachment,
    attached_locally: bool,
) -> Result<(), CsiError> {
    if attached_locally || attachment.spec.snapshot_id.is_some() {
        return Ok(());
    }
    let Ok(volume) = livedisk_engine::VolumeId::parse(&attachment.spec.volume_id) else {
        return Ok(());
    };
    if agent.engine.record(&volume).is_ok()
        || agent.engine.remote_record(&volume)?.is_none()
        || front.grants.serves_export(volume.as_str())
    {
        return Ok(());
    }
    agent.remote_attacher().detach(&volume).await?;
    tracing::info!(%volume, "remote attachment kept for another node ended");
    Ok(())
}

async fn reconcile_restore(
    restore: Arc<LivediskRestore>,
    agent: Arc<Agent>,
) -> Result<Action, ReconcileError> {
    let api: Api<LivediskRestore> = Api::all(agent.client.clone());
    let (api_ref, agent) = (&api, agent.as_ref());
    let result = finalizer(&api, NODE_FINALIZER, restore, |event| async move {
        match event {
            Event::Apply(restore) => apply_restore(api_ref, agent, &restore).await,
            // A revert runs inside its reconcile and the controller never runs two reconciles of
            // one object at once: by the time a deletion is handled, no revert runs for it, and
            // one that waited simply never starts.
            Event::Cleanup(_) => Ok(Action::await_change()),
        }
    })
    .await;
    done_if_gone(result)
}

/// Reverts the volume once no consumer has it attached: `Pending` (with why) until then,
/// `Running` while the engine reverts, then `Completed` or `Failed`.
///
/// Every status write is conditional on the object's resourceVersion: a reconcile of a stale
/// copy (the controller's cache may not have seen this node's own last write yet) must neither
/// revert a second time after `Completed` nor write over a terminal phase. Its write fails with
/// a conflict, and the newer copy's event reconciles again.
async fn apply_restore(
    api: &Api<LivediskRestore>,
    agent: &Agent,
    restore: &LivediskRestore,
) -> Result<Action, CsiError> {
    let name = restore.name_any();
    let previous = restore.status.as_ref();
    let generation = restore.metadata.generation;
    if previous.is_some_and(|s| s.phase.is_terminal()) {
        return Ok(Action::await_change());
    }
    let version = restore.metadata.resource_version.as_deref();
    let node = agent.node_name.as_str();
    let invalid = |e: livedisk_engine::ids::IdError| CsiError::InvalidArgument(e.to_string());
    let volume = VolumeId::parse(&restore.spec.volume_id).map_err(invalid)?;
    let snapshot = SnapshotId::parse(&restore.spec.snapshot_id).map_err(invalid)?;
    if restore_work::attached(&agent.engine, &volume) {
        let why = restore_work::in_use(node, volume.as_str());
        return report_wait(api, &name, version, previous, generation, why).await;
    }
    let running = restore_work::running(previous, generation, Timestamp::now());
    let written = match apply_status_at(api, &name, version, &running).await {
        Ok(written) => written,
        Err(kube::Error::Api(s)) if s.code == 409 => return Ok(stale(&name)),
        Err(error) => return Err(error.into()),
    };
    let version = written.metadata.resource_version.as_deref();
    tracing::info!(restore = %name, %volume, %snapshot, "reverting the volume");
    let reverting = agent.engine.revert_volume(&volume, &snapshot);
    let result = agent
        .metrics
        .track(OperationKind::RevertVolume, reverting)
        .await;
    let outcome = match result {
        Ok(_) => Ok(()),
        Err(error) => {
            let attached_now = restore_work::attached(&agent.engine, &volume);
            match restore_work::after_error(&error, attached_now, node, volume.as_str()) {
                AfterError::Wait(why) => {
                    tracing::info!(restore = %name, %error, "revert waits");
                    // Compared with what is reported now (`Running`), so the wait is written.
                    return report_wait(api, &name, version, Some(&running), generation, why).await;
                }
                AfterError::Fail(error) => Err(error),
            }
        }
    };
    // Unconditional: only this node writes phases, and the revert it reports did happen (a
    // conflict here would leave `Running` and make the node revert once more).
    let status = restore_work::finished(Some(&running), generation, outcome, Timestamp::now());
    apply_status(api, &name, &status).await?;
    tracing::info!(restore = %name, phase = ?status.phase, "revert ended");
    Ok(Action::await_change())
}

/// A reconcile of a stale copy of a LivediskRestore: nothing was done; the newer copy comes.
fn stale(name: &str) -> Action {
    tracing::debug!(restore = %name, "stale copy: reconciled again from the newer one");
    Action::requeue(Duration::from_secs(1))
}

/// Reports a revert that waits (once per change of reason) and looks again soon: what it waits
/// for goes away without any change to the object, so no event would wake the reconcile.
async fn report_wait(
    api: &Api<LivediskRestore>,
    name: &str,
    version: Option<&str>,
    reported: Option<&LivediskRestoreStatus>,
    generation: Option<i64>,
    why: RestoreWait,
) -> Result<Action, CsiError> {
    let status = restore_work::waiting(reported, generation, why);
    if reported != Some(&status) {
        match apply_status_at(api, name, version, &status).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => return Ok(stale(name)),
            Err(error) => return Err(error.into()),
        }
    }
    Ok(Action::requeue(restore_work::WAIT_RETRY))
}

fn volume_id(volume: &LivediskVolume) -> Result<VolumeId, CsiError> {
    VolumeId::parse(&volume.name_any()).map_err(|e| CsiError::InvalidArgument(e.to_string()))
}

fn snapshot_id(snapshot: &LivediskSnapshot) -> Result<SnapshotId, CsiError> {
    SnapshotId::parse(&snapshot.name_any()).map_err(|e| CsiError::InvalidArgument(e.to_string()))
}

/// Makes the volume the spec asks for: creates it (empty, from a snapshot, or as a clone of a
/// volume), grows it, and reports its size and the progress of a flatten.
async fn apply_volume(
    api: &Api<LivediskVolume>,
    agent: &Agent,
    volume: &LivediskVolume,
) -> Result<Action, CsiError> {
    let name = volume.name_any();
    let id = volume_id(volume)?;
    let previous = volume.status.as_ref();
    let status = |report: VolumeReport| {
        report::volume_status(
            previous,
            volume.metadata.generation,
            report,
            Timestamp::now(),
        )
    };
    if previous.is_some_and(|s| s.phase == NodePhase::Failed) {
        // The controller removes failed volumes; nothing to retry for this spec.
        return Ok(Action::await_change());
    }

    let size = volume.spec.capacity_bytes as u64;
    let existing = agent.engine.volume(&id).ok().filter(|v| !v.deleted);
    let growth = size.saturating_sub(existing.as_ref().map(|v| v.size).unwrap_or(0));
    let clone_source = match existing {
        Some(_) => None,
        None => pool_check::clone_source_need(&agent.engine, volume.spec.content_source.as_ref()),
    };
    let need = pool_check::need_of(growth, clone_source);
    if let Some(error) = pool_check::pool_too_small(&agent.engine, need).await {
        let report = VolumeReport {
            phase: if existing.is_some() {
                NodePhase::Ready
            } else {
                NodePhase::Failed
            },
            capacity_bytes: existing.as_ref().map(|v| v.size as i64),
            progress: None,
            error: Some(error),
        };
        apply_status(api, &name, &status(report)).await?;
        return Ok(Action::requeue(Duration::from_secs(30)));
    }
    let created = match (&existing, &volume.spec.content_source) {
        // Already made (a repeat, or an expansion of the spec): grown below if needed.
        (Some(info), _) => Ok(info.clone()),
        (None, None) => {
            let creating = agent.engine.create_volume(&id, size);
            agent
                .metrics
                .track(OperationKind::CreateVolume, creating)
                .await
                .map_err(|e| node_error(&e))
        }
        (None, Some(source)) => {
            let speed = volume
                .spec
                .merge_bandwidth_bytes_per_second
                .and_then(|b| u64::try_from(b).ok());
            create_from(agent, &id, source, size, speed).await
        }
    };
    let info = match created {
        Ok(info) => info,
        Err(error) => {
            let phase = report::failed_create_phase(&error);
            let report = VolumeReport {
                phase,
                capacity_bytes: None,
                progress: None,
                error: Some(error.clone()),
            };
            apply_status(api, &name, &status(report)).await?;
            return retry_unless_failed(phase, error);
        }
    };
    let info = if info.size < size {
        let expanding = agent.engine.expand_volume(&id, size);
        match agent
            .metrics
            .track(OperationKind::ExpandVolume, expanding)
            .await
        {
            Ok(info) => info,
            Err(error) => {
                let reported = node_error(&error);
                let blocked = reported.code == ErrorCode::FailedPrecondition;
                let report = VolumeReport {
                    phase: NodePhase::Ready,
                    capacity_bytes: Some(info.size as i64),
                    progress: None,
                    error: Some(reported),
                };
                apply_status(api, &name, &status(report)).await?;
                // Refused while attached (offline expansion): the consumer's detach changes
                // nothing in this object, so no event would wake the reconcile; retried soon,
                // as csi-resizer retries ControllerExpandVolume right after kubelet unstages.
                if blocked {
                    tracing::info!(volume = %name, "expansion waits until the volume is detached");
                    return Ok(Action::requeue(livedisk_common::code::TRANSIENT_RETRY));
                }
                return Err(error.into());
            }
        }
    } else {
        info
    };
    // A volume made from a snapshot or a volume is flattened in the background (a clone's hidden
    // base snapshot is the engine's business): report how far it got until it stands alone.
    let flattening = match volume.spec.content_source {
        None => None,
        Some(_) => match agent.engine.flatten_progress(&id).await {
            Ok(progress) => progress,
            Err(error) => {
                tracing::warn!(volume = %name, %error, "could not read the flatten's progress");
                Some(Default::default())
            }
        },
    };
    if flattening.is_none()
        && volume
            .spec
            .content_source
            .as_ref()
            .is_some_and(|s| s.snapshot_id.is_some())
    {
        // Restored from another node's snapshot: its source is not read any more.
        agent.remote_attacher().release_restore_source(&id).await?;
    }
    let report = VolumeReport {
        phase: NodePhase::Ready,
        capacity_bytes: Some(info.size as i64),
        progress: flattening.map(|p| Progress::new(p.done as i64, p.total as i64, None)),
        error: None,
    };
    apply_status(api, &name, &status(report)).await?;
    Ok(Action::requeue(if flattening.is_some() {
        Duration::from_secs(5)
    } else {
        Duration::from_secs(300)
    }))
}

/// A new volume with the content of `source`: restored from a snapshot (of this node, or served
/// by the node that holds it), or cloned from a volume (the engine takes, and later deletes, the
/// snapshot a clone is made from). A restore's background copy runs at `speed` bytes/s (the
/// class's `mergeBandwidthLimit`; unlimited if `None`).
async fn create_from(
    agent: &Agent,
    id: &VolumeId,
    source: &ContentSource,
    size: u64,
    speed: Option<u64>,
) -> Result<VolumeInfo, NodeError> {
    let invalid = |e: livedisk_engine::ids::IdError| NodeError {
        code: ErrorCode::InvalidArgument,
        message: e.to_string(),
    };
    let (engine, metrics) = (&agent.engine, &agent.metrics);
    let engine_error = |e: EngineError| node_error(&e);
    match (&source.snapshot_id, &source.volume_id) {
        (Some(snapshot), _) => {
            let snapshot = SnapshotId::parse(snapshot).map_err(invalid)?;
            let Some(remote) = restore_source(agent, id, &snapshot)
                .await
                .map_err(|e| csi_node_error(&e))?
            else {
                let restoring =
                    engine.create_volume_from_snapshot_with(id, &snapshot, Some(size), speed);
                return metrics
                    .track(OperationKind::RestoreVolume, restoring)
                    .await
                    .map_err(engine_error);
            };
            let restoring =
                engine.create_volume_from_remote_snapshot(id, &remote, Some(size), speed);
            metrics
                .track(OperationKind::RestoreVolume, restoring)
                .await
                .map_err(engine_error)
        }
        (None, Some(volume)) => {
            let volume = VolumeId::parse(volume).map_err(invalid)?;
            let cloning = engine.clone_volume(id, &volume, Some(size));
            metrics
                .track(OperationKind::CloneVolume, cloning)
                .await
                .map_err(engine_error)
        }
        (None, None) => Err(NodeError {
            code: ErrorCode::InvalidArgument,
            message: "empty content source".into(),
        }),
    }
}

/// Where the snapshot a volume is restored from is read: `None` when this node holds it, else
/// its owner's served export (declared and waited for; see `RemoteAttacher::restore_source`).
async fn restore_source(
    agent: &Agent,
    id: &VolumeId,
    snapshot: &SnapshotId,
) -> Result<Option<RemoteSnapshot>, CsiError> {
    let snapshots: Api<LivediskSnapshot> = Api::all(agent.client.clone());
    let Some(object) = snapshots.get_opt(snapshot.as_str()).await? else {
        return Err(CsiError::NotFound(format!(
            "snapshot {snapshot} does not exist"
        )));
    };
    if object.spec.node_name == agent.node_name {
        return Ok(None);
    }
    let size = object
        .status
        .as_ref()
        .and_then(|s| s.size_bytes)
        .ok_or_else(|| CsiError::Unavailable(format!("snapshot {snapshot} reports no size yet")))?;
    let volume = VolumeId::parse(&object.spec.volume_id)
        .map_err(|e| CsiError::InvalidArgument(e.to_string()))?;
    let owner = object.spec.node_name.clone();
    let source = agent
        .remote_attacher()
        .restore_source(id, &owner, &volume, snapshot)
        .await?;
    Ok(Some(RemoteSnapshot {
        source,
        volume,
        snapshot: snapshot.clone(),
        size: size as u64,
    }))
}

/// A CSI-layer error as the node reports it in an object's status.
fn csi_node_error(error: &CsiError) -> NodeError {
    match error {
        CsiError::Node(e) => e.clone(),
        CsiError::Engine(e) => node_error(e),
        other => NodeError {
            code: other.error_code(),
            message: error_chain(other),
        },
    }
}

/// After a failed create was reported: wait for the controller to remove a `Failed` object,
/// retry anything else.
fn retry_unless_failed(phase: NodePhase, error: NodeError) -> Result<Action, CsiError> {
    if phase == NodePhase::Failed {
        Ok(Action::await_change())
    } else {
        Err(CsiError::Node(error))
    }
}

async fn cleanup_volume(
    api: &Api<LivediskVolume>,
    agent: &Agent,
    volume: &LivediskVolume,
) -> Result<Action, CsiError> {
    let id = volume_id(volume)?;
    let previous = volume.status.as_ref();
    let deleting = |error| {
        let report = VolumeReport {
            phase: NodePhase::Deleting,
            capacity_bytes: previous.and_then(|s| s.capacity_bytes),
            progress: None,
            error,
        };
        report::volume_status(
            previous,
            volume.metadata.generation,
            report,
            Timestamp::now(),
        )
    };
    let reported = previous.is_some_and(|s| s.phase == NodePhase::Deleting);
    release(
        api,
        volume,
        reported,
        deleting,
        agent
            .metrics
            .track(OperationKind::DeleteVolume, agent.engine.delete_volume(&id)),
    )
    .await?;
    if volume
        .spec
        .content_source
        .as_ref()
        .is_some_and(|s| s.snapshot_id.is_some())
    {
        agent.remote_attacher().release_restore_source(&id).await?;
    }
    tracing::info!(volume = %id, "volume deleted");
    Ok(Action::await_change())
}

async fn apply_snapshot(
    api: &Api<LivediskSnapshot>,
    agent: &Agent,
    snapshot: &LivediskSnapshot,
) -> Result<Action, CsiError> {
    let name = snapshot.name_any();
    let id = snapshot_id(snapshot)?;
    let previous = snapshot.status.as_ref();
    if previous.is_some_and(|s| s.phase == NodePhase::Failed) {
        return Ok(Action::await_change());
    }
    let status = |report: SnapshotReport| {
        report::snapshot_status(
            previous,
            snapshot.metadata.generation,
            report,
            Timestamp::now(),
        )
    };
    if let Some(ready) = previous.filter(|s| s.phase == NodePhase::Ready) {
        return refresh_space(api, agent, &name, &id, ready, status).await;
    }
    let volume = VolumeId::parse(&snapshot.spec.volume_id)
        .map_err(|e| CsiError::InvalidArgument(e.to_string()))?;
    let taken = match (agent.engine.snapshot(&id), &snapshot.spec.group) {
        (Ok(info), _) => Ok(info),
        (Err(_), Some(group)) => {
            let _turn = agent.group_turns.turn(&group.id).await;
            // A sibling's transaction may have taken this member while this one waited.
            match agent.engine.snapshot(&id) {
                Ok(info) => Ok(info),
                Err(_) => match take_group(api, agent, &id, group).await {
                    Ok(Some(info)) => Ok(info),
                    // Not every member is declared yet: the CSI controller is declaring them.
                    Ok(None) => return Ok(Action::requeue(Duration::from_secs(2))),
                    Err(error) => Err(error),
                },
            }
        }
        (Err(_), None) => match pool_check::snapshot_too_big(&agent.engine, &volume).await {
            Some(refused) => Err(EngineError::ResourceExhausted(refused.message)),
            None => agent
                .metrics
                .track(
                    OperationKind::CreateSnapshot,
                    agent.engine.create_snapshot(&volume, &id),
                )
                .await
                .map(|(info, _)| info),
        },
    };
    match taken {
        Ok(info) => {
            let report = SnapshotReport {
                phase: NodePhase::Ready,
                ready_to_use: info.ready,
                size_bytes: Some(info.size as i64),
                creation_time: info
                    .created
                    .timestamp_nanos_opt()
                    .and_then(|nanos| Timestamp::from_nanosecond(i128::from(nanos)).ok())
                    .map(MicroTime),
                allocated_bytes: allocated_bytes(agent, &id),
                progress: None,
                error: None,
            };
            apply_status(api, &name, &status(report)).await?;
            Ok(Action::requeue(SPACE_REFRESH))
        }
        Err(error) => {
            let error = node_error(&error);
            let phase = report::failed_create_phase(&error);
            let report = SnapshotReport {
                phase,
                ready_to_use: false,
                size_bytes: None,
                creation_time: None,
                allocated_bytes: None,
                progress: None,
                error: Some(error.clone()),
            };
            apply_status(api, &name, &status(report)).await?;
            retry_unless_failed(phase, error)
        }
    }
}

/// How long a group member waits for its siblings to be declared.
const GROUP_DECLARATION_LIMIT: Duration = Duration::from_secs(300);

/// Takes every member of `group` in one engine transaction (one instant for all its volumes),
/// once each member's object is declared: before that, `None`. A member another reconcile took
/// meanwhile is not taken twice (the engine's transaction is idempotent when every member
/// exists). Returns this member's snapshot.
async fn take_group(
    api: &Api<LivediskSnapshot>,
    agent: &Agent,
    id: &SnapshotId,
    group: &SnapshotGroup,
) -> Result<Option<livedisk_engine::SnapshotInfo>, EngineError> {
    let listed = api
        .list(&ListParams::default().labels(&format!("{GROUP_SNAPSHOT_LABEL}={}", group.id)))
        .await
        .map_err(|e| EngineError::Busy(format!("listing the members of group {}: {e}", group.id)))?
        .items;
    // A member being deleted would get a snapshot no object accounts for.
    if let Some(going) = listed
        .iter()
        .find(|s| s.metadata.deletion_timestamp.is_some())
    {
        return Err(EngineError::FailedPrecondition(format!(
            "member {} of group snapshot {} is being deleted; the group is not taken",
            going.name_any(),
            group.id
        )));
    }
    let declared: std::collections::BTreeSet<String> =
        listed.iter().map(|s| s.name_any()).collect();
    if group
        .members
        .iter()
        .any(|m| !declared.contains(&m.snapshot_id))
    {
        // The controller declares all members in one call; one still missing long after is
        // left by a call that failed and was not retried.
        let this = listed.iter().find(|s| s.name_any() == id.as_str());
        let age = this
            .and_then(|s| s.metadata.creation_timestamp.as_ref())
            .map(|t| Timestamp::now().duration_since(t.0).as_secs())
            .unwrap_or(0);
        if age > GROUP_DECLARATION_LIMIT.as_secs() as i64 {
            return Err(EngineError::FailedPrecondition(format!(
                "not every member of group snapshot {} was declared within {} s",
                group.id,
                GROUP_DECLARATION_LIMIT.as_secs()
            )));
        }
        return Ok(None);
    }
    let mut pairs = Vec::with_capacity(group.members.len());
    for member in &group.members {
        let volume = VolumeId::parse(&member.volume_id)
            .map_err(|e| EngineError::InvalidArgument(e.to_string()))?;
        let snapshot = SnapshotId::parse(&member.snapshot_id)
            .map_err(|e| EngineError::InvalidArgument(e.to_string()))?;
        if let Some(refused) = pool_check::snapshot_too_big(&agent.engine, &volume).await {
            return Err(EngineError::ResourceExhausted(refused.message));
        }
        pairs.push((volume, snapshot));
    }
    let (taken, timings) = agent
        .metrics
        .track(
            OperationKind::CreateSnapshot,
            agent.engine.create_snapshots(&pairs),
        )
        .await?;
    tracing::info!(group = %group.id, members = pairs.len(), transaction_ms = timings.transaction.as_secs_f64() * 1e3, "group snapshot taken in one transaction");
    taken
        .into_iter()
        .find(|info| info.id == *id)
        .map(Some)
        .ok_or_else(|| EngineError::NotFound(format!("snapshot {id} in group {}", group.id)))
}

/// How often a ready snapshot's held space is looked at again: a sealed layer only grows when a
/// merge (deleting the snapshot before it) commits into it.
const SPACE_REFRESH: Duration = Duration::from_secs(300);

/// The space a snapshot's layer holds, if the engine can tell (an error is logged: the number is
/// informative, never a reason to fail the snapshot).
fn allocated_bytes(agent: &Agent, id: &SnapshotId) -> Option<i64> {
    match agent.engine.snapshot_allocated_bytes(id) {
        Ok(bytes) => Some(bytes as i64),
        Err(error) => {
            tracing::warn!(snapshot = %id, %error, "could not read the space the snapshot holds");
            None
        }
    }
}

/// A ready snapshot: reports the space its layer holds when that changed.
async fn refresh_space(
    api: &Api<LivediskSnapshot>,
    agent: &Agent,
    name: &str,
    id: &SnapshotId,
    ready: &livedisk_api::internal::LivediskSnapshotStatus,
    status: impl Fn(SnapshotReport) -> livedisk_api::internal::LivediskSnapshotStatus,
) -> Result<Action, CsiError> {
    let held = allocated_bytes(agent, id);
    if held.is_some() && held != ready.allocated_bytes {
        let report = SnapshotReport {
            phase: NodePhase::Ready,
            ready_to_use: ready.ready_to_use,
            size_bytes: ready.size_bytes,
            creation_time: ready.creation_time.clone(),
            allocated_bytes: held,
            progress: None,
            error: None,
        };
        apply_status(api, name, &status(report)).await?;
    }
    Ok(Action::requeue(SPACE_REFRESH))
}

/// Deletes the snapshot's storage: the engine merges its layer away at the rate limit captured
/// at CreateSnapshot, and the status shows the merge's progress while it runs.
async fn cleanup_snapshot(
    api: &Api<LivediskSnapshot>,
    agent: &Agent,
    snapshot: &LivediskSnapshot,
) -> Result<Action, CsiError> {
    let name = snapshot.name_any();
    let id = snapshot_id(snapshot)?;
    let previous = snapshot.status.as_ref();
    let deleting = |error, progress| {
        let report = SnapshotReport {
            phase: NodePhase::Deleting,
            ready_to_use: false,
            size_bytes: previous.and_then(|s| s.size_bytes),
            creation_time: previous.and_then(|s| s.creation_time.clone()),
            allocated_bytes: previous.and_then(|s| s.allocated_bytes),
            progress,
            error,
        };
        report::snapshot_status(
            previous,
            snapshot.metadata.generation,
            report,
            Timestamp::now(),
        )
    };
    let reported = previous.is_some_and(|s| s.phase == NodePhase::Deleting);
    let speed = snapshot
        .spec
        .merge_bandwidth_bytes_per_second
        .filter(|b| *b > 0)
        .map(|b| b as u64);
    let deletion = agent.metrics.track(
        OperationKind::DeleteSnapshot,
        agent.engine.delete_snapshot(&id, speed),
    );
    let progress = report_deletion_progress(api, agent, &name, &id, |p| deleting(None, Some(p)));
    release(
        api,
        snapshot,
        reported,
        |error| deleting(error, None),
        while_reporting(deletion, progress),
    )
    .await?;
    tracing::info!(snapshot = %id, "snapshot deleted");
    Ok(Action::await_change())
}

/// Runs `work` to its end while `report` runs beside it (`report` never ends by itself).
async fn while_reporting<T>(work: impl Future<Output = T>, report: impl Future<Output = ()>) -> T {
    tokio::pin!(work);
    tokio::select! {
        out = &mut work => out,
        () = report => work.await,
    }
}

/// Reports the progress of the merge job deleting `id`, at most every [`PROGRESS_INTERVAL`],
/// until dropped. A failed write is logged and tried again next time: the deletion goes on.
async fn report_deletion_progress(
    api: &Api<LivediskSnapshot>,
    agent: &Agent,
    name: &str,
    id: &SnapshotId,
    status: impl Fn(Progress) -> livedisk_api::internal::LivediskSnapshotStatus,
) {
    let job = Engine::merge_job_id(id);
    let mut sample = None;
    let mut rate = None;
    let mut reported = None;
    loop {
        tokio::time::sleep(PROGRESS_INTERVAL).await;
        let jobs = agent.engine.jobs().await.unwrap_or_default();
        let Some(info) = jobs.iter().find(|j| j.id == job) else {
            continue;
        };
        let now = (std::time::Instant::now(), info.current_progress);
        rate = merge_work::rate(sample, now).or(rate);
        sample = Some(now);
        let progress = Progress::new(
            info.current_progress as i64,
            info.total_progress as i64,
            rate.map(|r| r as i64),
        );
        if reported.as_ref() == Some(&progress) {
            continue;
        }
        match apply_status(api, name, &status(progress.clone())).await {
            Ok(()) => reported = Some(progress),
            Err(error) => {
                tracing::warn!(snapshot = %id, %error, "could not report the deletion's progress")
            }
        }
    }
}

/// The deletion half shared by volumes and snapshots, run while the node's finalizer holds the
/// object: reports `Deleting` (once, clearing an older error), then releases the storage
/// (already gone counts as released). A failure is reported in status and returned, so the
/// finalizer stays and the deletion is retried; nothing of it is swallowed.
async fn release<K>(
    api: &Api<K>,
    object: &K,
    reported_deleting: bool,
    deleting: impl Fn(Option<NodeError>) -> K::Status,
    storage_released: impl Future<Output = Result<(), EngineError>>,
) -> Result<(), CsiError>
where
    K: Resource<DynamicType = ()> + HasStatus + Clone + DeserializeOwned + std::fmt::Debug,
    K::Status: Serialize + std::fmt::Debug,
{
    let name = object.name_any();
    if !reported_deleting {
        apply_status(api, &name, &deleting(None)).await?;
    }
    match storage_released.await {
        Ok(()) => Ok(()),
        Err(error) if error.code() == ErrorCode::NotFound => Ok(()),
        Err(error) => {
            apply_status(api, &name, &deleting(Some(node_error(&error)))).await?;
            Err(error.into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api_error(code: u16) -> kube::Error {
        kube::Error::Api(Box::new(kube::core::Status {
            code,
            ..Default::default()
        }))
    }

    #[test]
    fn a_failed_deletion_is_retried_soon_whatever_its_code() {
        let refused = finalizer::Error::CleanupFailed(CsiError::FailedPrecondition(
            "volume vol-x is attached; detach it first".into(),
        ));
        assert_eq!(
            retry_after(&refused),
            livedisk_common::code::TRANSIENT_RETRY
        );
        // The same code while creating: only a change of the object makes it pass.
        let create = finalizer::Error::ApplyFailed(CsiError::FailedPrecondition("x".into()));
        assert_eq!(
            retry_after(&create),
            ErrorCode::FailedPrecondition.retry_after()
        );
        assert!(retry_after(&create) > retry_after(&refused));
    }

    #[test]
    fn only_a_missing_object_ends_a_failed_reconcile_quietly() {
        assert!(object_gone(&finalizer::Error::RemoveFinalizer(api_error(
            404
        ))));
        assert!(object_gone(&finalizer::Error::CleanupFailed(
            CsiError::Kube(api_error(404))
        )));
        // A finalizer patch whose test failed (the list changed meanwhile): retried.
        assert!(!object_gone(&finalizer::Error::RemoveFinalizer(api_error(
            422
        ))));
        // The engine's "not found" is the cleanup's business, never the object's.
        assert!(!object_gone(&finalizer::Error::CleanupFailed(
            CsiError::NotFound("volume".into())
        )));
        assert!(done_if_gone(Err(finalizer::Error::AddFinalizer(api_error(404)))).is_ok());
    }
}
