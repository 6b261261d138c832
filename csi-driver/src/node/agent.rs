//! The node agent: makes this node's `LivediskVolume`s and `LivediskSnapshot`s real with the
//! engine and reports back in their status.
//!
//! It watches only its own objects (a field selector on the selectable `spec.nodeName`), keeps a
//! finalizer on every object it holds storage for, and is idempotent: after a crash it simply
//! reconciles everything again, and the engine's create/delete calls tolerate repeats.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use livedisk_api::Progress;
use livedisk_api::internal::{
    ErrorCode, LivediskNode, LivediskSnapshot, LivediskVolume, NODE_FINALIZER, NodeError, NodePhase,
};
use serde_json::{Value, json};

use crate::grpc::error::{CsiError, node_error};
use livedisk_common::error_chain;
use livedisk_common::names::snapshot_id_for;
use livedisk_engine::{Engine, EngineError, SnapshotId, VolumeId};

pub struct Agent {
    pub client: Client,
    pub engine: Arc<Engine>,
    pub node_name: String,
    /// Where the controller reaches this node's changed-block service, if it is served.
    pub metadata_endpoint: Option<String>,
}

/// The hidden engine snapshot a clone of a volume is made from; deleted once the clone no
/// longer depends on it.
fn clone_base(clone: &VolumeId) -> SnapshotId {
    snapshot_id_for(&format!("clone-base/{clone}"))
}

/// Runs the volume and snapshot reconcilers of this node until shutdown.
pub async fn run(agent: Arc<Agent>) {
    let selector = format!("spec.nodeName={}", agent.node_name);
    let volumes: Api<LivediskVolume> = Api::all(agent.client.clone());
    let snapshots: Api<LivediskSnapshot> = Api::all(agent.client.clone());
    let volume_loop = Controller::new(volumes, watcher::Config::default().fields(&selector))
        .shutdown_on_signal()
        .run(reconcile_volume, retry_volume, agent.clone())
        .for_each(|_| async {});
    let agent_for_report = agent.clone();
    let snapshot_loop = Controller::new(snapshots, watcher::Config::default().fields(&selector))
        .shutdown_on_signal()
        .run(reconcile_snapshot, retry_snapshot, agent)
        .for_each(|_| async {});
    tokio::join!(volume_loop, snapshot_loop, report_node(agent_for_report));
}

/// How often the node refreshes its `LivediskNode` report.
const REPORT_INTERVAL: Duration = Duration::from_secs(20);

/// Keeps this node's `LivediskNode` current: pool space, volume count, engine pid.
async fn report_node(agent: Arc<Agent>) {
    let api: Api<LivediskNode> = Api::all(agent.client.clone());
    let params = PatchParams::apply("livedisk-node").force();
    loop {
        let pool = agent.engine.pool().to_path_buf();
        let object = json!({
            "apiVersion": "livedisk.io/v1alpha1",
            "kind": "LivediskNode",
            "metadata": { "name": agent.node_name },
            "spec": { "poolPath": pool.display().to_string() },
        });
        let space = super::service::statvfs(&pool).ok();
        let status = json!({
            "apiVersion": "livedisk.io/v1alpha1",
            "kind": "LivediskNode",
            "status": {
                "poolCapacityBytes": space.map(|s| (s.f_blocks * s.f_frsize) as i64),
                "poolAvailableBytes": space.map(|s| (s.f_bavail * s.f_frsize) as i64),
                "volumes": agent.engine.list_volumes().map(|v| v.len() as i64).ok(),
                "enginePid": agent.engine.daemon().pid.map(i64::from),
                "heartbeatTime": Time(k8s_openapi::jiff::Timestamp::now()),
                "metadataEndpoint": agent.metadata_endpoint,
            }
        });
        let result = async {
            api.patch(&agent.node_name, &params, &Patch::Apply(&object))
                .await?;
            api.patch_status(&agent.node_name, &params, &Patch::Apply(&status))
                .await
        };
        if let Err(error) = result.await {
            tracing::warn!(%error, "could not report this node's LivediskNode");
        }
        tokio::time::sleep(REPORT_INTERVAL).await;
    }
}

fn retry_volume(volume: Arc<LivediskVolume>, error: &CsiError, _: Arc<Agent>) -> Action {
    retry(&volume.name_any(), error)
}

fn retry_snapshot(snapshot: Arc<LivediskSnapshot>, error: &CsiError, _: Arc<Agent>) -> Action {
    retry(&snapshot.name_any(), error)
}

/// The agent's error policy: a transient error (a conflict, the engine daemon or the API server
/// restarting) is retried soon; a permanent one (a missing permission, an object the API
/// rejects) slowly, since only a person changing something can make it pass. What failed is
/// already in the object's `status.error` where the engine was at fault.
fn retry(name: &str, error: &CsiError) -> Action {
    let code = error.error_code();
    let error = error_chain(error);
    tracing::warn!(object = %name, %code, %error, "reconcile failed: {}", code.retry_note());
    Action::requeue(code.retry_after())
}

/// Whether an engine error will not go away by retrying the same spec.
fn permanent(error: &EngineError) -> bool {
    !error.code().is_transient()
}

async fn set_finalizers<K>(
    api: &Api<K>,
    name: &str,
    finalizers: Vec<String>,
) -> Result<(), CsiError>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let patch = json!({ "metadata": { "finalizers": finalizers } });
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}

async fn patch_status<K>(api: &Api<K>, name: &str, status: Value) -> Result<(), CsiError>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(&json!({ "status": status })),
    )
    .await?;
    Ok(())
}

fn without_finalizer(finalizers: &[String]) -> Vec<String> {
    finalizers
        .iter()
        .filter(|f| *f != NODE_FINALIZER)
        .cloned()
        .collect()
}

/// The deletion half shared by volumes and snapshots: once the object is being deleted and still
/// holds the node's finalizer, release the storage (already gone counts as released), report a
/// failure in status and retry, and drop the finalizer only when the storage is gone.
async fn release<K>(
    api: &Api<K>,
    object: &K,
    storage_released: impl std::future::Future<Output = Result<(), EngineError>>,
) -> Result<Action, CsiError>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let finalizers = object.finalizers().to_vec();
    if !finalizers.iter().any(|f| f == NODE_FINALIZER) {
        return Ok(Action::await_change());
    }
    match storage_released.await {
        Ok(()) => {}
        Err(error) if error.code() == ErrorCode::NotFound => {}
        Err(error) => {
            let generation = object.meta().generation;
            let status = error_status(NodePhase::Deleting, generation, node_error(&error));
            patch_status(api, &object.name_any(), status).await?;
            return Err(error.into());
        }
    }
    set_finalizers(api, &object.name_any(), without_finalizer(&finalizers)).await?;
    Ok(Action::await_change())
}

/// Reports a failed create in status: `Failed` when retrying the same spec cannot help (the
/// controller then answers with the error and removes the object), else `Pending` and a retry.
async fn creation_failed<K>(
    api: &Api<K>,
    name: &str,
    generation: Option<i64>,
    error: EngineError,
) -> Result<Action, CsiError>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let phase = if permanent(&error) {
        NodePhase::Failed
    } else {
        NodePhase::Pending
    };
    patch_status(
        api,
        name,
        error_status(phase, generation, node_error(&error)),
    )
    .await?;
    if permanent(&error) {
        Ok(Action::await_change())
    } else {
        Err(error.into())
    }
}

fn error_status(phase: NodePhase, generation: Option<i64>, error: NodeError) -> Value {
    json!({ "phase": phase, "observedGeneration": generation, "error": error })
}

async fn reconcile_volume(
    volume: Arc<LivediskVolume>,
    agent: Arc<Agent>,
) -> Result<Action, CsiError> {
    let api: Api<LivediskVolume> = Api::all(agent.client.clone());
    let name = volume.name_any();
    let id = VolumeId::parse(&name).map_err(|e| CsiError::InvalidArgument(e.to_string()))?;
    let generation = volume.metadata.generation;
    let finalizers = volume.finalizers().to_vec();

    if volume.metadata.deletion_timestamp.is_some() {
        let released = release(&api, volume.as_ref(), async {
            match agent.engine.delete_volume(&id).await {
                Err(error) if error.code() != ErrorCode::NotFound => return Err(error),
                _ => {}
            }
            // A clone's hidden base snapshot goes with it.
            let _ = agent.engine.delete_snapshot(&clone_base(&id), None).await;
            Ok(())
        })
        .await?;
        tracing::info!(volume = %name, "volume deleted");
        return Ok(released);
    }
    if volume
        .status
        .as_ref()
        .is_some_and(|s| s.phase == NodePhase::Failed)
    {
        // The controller removes failed volumes; nothing to retry for this spec.
        return Ok(Action::await_change());
    }
    if !finalizers.iter().any(|f| f == NODE_FINALIZER) {
        let mut with = finalizers.clone();
        with.push(NODE_FINALIZER.to_string());
        set_finalizers(&api, &name, with).await?;
    }

    let size = volume.spec.capacity_bytes as u64;
    let existing = agent.engine.volume(&id).ok().filter(|v| !v.deleted);
    let growth = size.saturating_sub(existing.as_ref().map(|v| v.size).unwrap_or(0));
    if let Some(error) = pool_too_small(agent.engine.pool(), growth) {
        let phase = if existing.is_some() {
            NodePhase::Ready
        } else {
            NodePhase::Failed
        };
        patch_status(&api, &name, error_status(phase, generation, error)).await?;
        return Ok(Action::requeue(Duration::from_secs(30)));
    }
    let created = match (&existing, &volume.spec.content_source) {
        // Already made (a repeat, or an expansion of the spec): grow below if needed.
        (Some(info), _) => Ok(info.clone()),
        (None, None) => agent.engine.create_volume(&id, size).await,
        (None, Some(source)) => match (&source.snapshot_id, &source.volume_id) {
            (Some(snapshot), _) => match SnapshotId::parse(snapshot) {
                Ok(snapshot) => {
                    agent
                        .engine
                        .create_volume_from_snapshot(&id, &snapshot, Some(size))
                        .await
                }
                Err(error) => Err(EngineError::InvalidArgument(error.to_string())),
            },
            (None, Some(source_volume)) => {
                clone_volume(&agent.engine, &id, source_volume, size).await
            }
            (None, None) => Err(EngineError::InvalidArgument("empty content source".into())),
        },
    };
    let info = match created {
        Ok(info) => info,
        Err(error) => {
            return creation_failed(&api, &name, generation, error).await;
        }
    };
    let info = if info.size < size {
        match agent.engine.expand_volume(&id, size).await {
            Ok(info) => info,
            Err(error) => {
                patch_status(
                    &api,
                    &name,
                    error_status(NodePhase::Ready, generation, node_error(&error)),
                )
                .await?;
                return Err(error.into());
            }
        }
    } else {
        info
    };
    // A volume made from a snapshot or a volume is an overlay flattened in the background: report
    // the flatten's progress, and drop a clone's hidden base snapshot once it is done.
    let mut requeue = Duration::from_secs(300);
    let mut progress = serde_json::Value::Null;
    if volume.spec.content_source.is_some() {
        if agent.engine.is_flattened(&id).unwrap_or(false) {
            if volume
                .spec
                .content_source
                .as_ref()
                .is_some_and(|s| s.volume_id.is_some())
            {
                let _ = agent.engine.delete_snapshot(&clone_base(&id), None).await;
            }
        } else {
            requeue = Duration::from_secs(5);
            let job_id = livedisk_engine::clone::flatten_job_id(&id);
            if let Ok(jobs) = agent.engine.jobs().await
                && let Some(job) = jobs.iter().find(|j| j.id == job_id)
            {
                progress = json!(Progress::new(
                    job.current_progress as i64,
                    job.total_progress as i64,
                    None
                ));
            }
        }
    }
    let status = json!({
        "phase": NodePhase::Ready,
        "observedGeneration": generation,
        "capacityBytes": info.size as i64,
        "progress": progress,
        "error": null,
    });
    patch_status(&api, &name, status).await?;
    Ok(Action::requeue(requeue))
}

/// Volumes are not overcommitted: a volume (or its growth) must fit in the pool's free space
/// now, so a consumer never meets ENOSPC below a size it was promised.
fn pool_too_small(pool: &std::path::Path, needed: u64) -> Option<NodeError> {
    if needed == 0 {
        return None;
    }
    let stat = super::service::statvfs(pool).ok()?;
    let available = stat.f_bavail * stat.f_frsize;
    (needed > available).then(|| NodeError {
        code: ErrorCode::ResourceExhausted,
        message: format!("the pool has {available} bytes free; the volume needs {needed} more"),
    })
}

/// A clone: a hidden snapshot of the source, and a volume from it (flattened in the background).
async fn clone_volume(
    engine: &Engine,
    id: &VolumeId,
    source: &str,
    size: u64,
) -> Result<livedisk_engine::VolumeInfo, EngineError> {
    let source =
        VolumeId::parse(source).map_err(|e| EngineError::InvalidArgument(e.to_string()))?;
    if let Ok(existing) = engine.volume(id) {
        return Ok(existing);
    }
    let base = clone_base(id);
    if engine.snapshot(&base).is_err() {
        engine.create_snapshot(&source, &base).await?;
    }
    engine
        .create_volume_from_snapshot(id, &base, Some(size))
        .await
}

async fn reconcile_snapshot(
    snapshot: Arc<LivediskSnapshot>,
    agent: Arc<Agent>,
) -> Result<Action, CsiError> {
    let api: Api<LivediskSnapshot> = Api::all(agent.client.clone());
    let name = snapshot.name_any();
    let id = SnapshotId::parse(&name).map_err(|e| CsiError::InvalidArgument(e.to_string()))?;
    let generation = snapshot.metadata.generation;
    let finalizers = snapshot.finalizers().to_vec();

    if snapshot.metadata.deletion_timestamp.is_some() {
        let released = release(
            &api,
            snapshot.as_ref(),
            agent.engine.delete_snapshot(&id, None),
        )
        .await?;
        tracing::info!(snapshot = %name, "snapshot deleted");
        return Ok(released);
    }
    if snapshot
        .status
        .as_ref()
        .is_some_and(|s| s.phase == NodePhase::Ready || s.phase == NodePhase::Failed)
    {
        return Ok(Action::await_change());
    }
    if !finalizers.iter().any(|f| f == NODE_FINALIZER) {
        let mut with = finalizers.clone();
        with.push(NODE_FINALIZER.to_string());
        set_finalizers(&api, &name, with).await?;
    }
    let volume = VolumeId::parse(&snapshot.spec.volume_id)
        .map_err(|e| CsiError::InvalidArgument(e.to_string()))?;
    let taken = match agent.engine.snapshot(&id) {
        Ok(info) => Ok(info),
        Err(_) => agent
            .engine
            .create_snapshot(&volume, &id)
            .await
            .map(|(info, _)| info),
    };
    match taken {
        Ok(info) => {
            let created = k8s_openapi::jiff::Timestamp::from_second(info.created.timestamp())
                .ok()
                .map(Time);
            let status = json!({
                "phase": NodePhase::Ready,
                "observedGeneration": generation,
                "readyToUse": info.ready,
                "sizeBytes": info.size as i64,
                "creationTime": created,
                "error": null,
            });
            patch_status(&api, &name, status).await?;
            Ok(Action::await_change())
        }
        Err(error) => creation_failed(&api, &name, generation, error).await,
    }
}
