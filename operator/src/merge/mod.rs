//! The DiskMerge reconciler: look up PVC → PV → volume handle and DiskSnapshots → snapshot
//! handles (`lookup`), validate and decide the node work (`plan`, pure), apply the
//! `LivediskMerge`, report its progress (`report`, pure), and once it ended delete the
//! DiskSnapshots and VolumeSnapshots of the snapshots merged away. A finalizer (kube-runtime's
//! `finalizer()`) makes deleting a DiskMerge stop its node work first.

pub(crate) mod lookup;
pub mod plan;
pub mod report;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{EventType, Recorder};
use kube::runtime::finalizer::{self, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use livedisk_api::DiskMerge;
use livedisk_api::internal::{LivediskMerge, LivediskMergeSpec};
use serde_json::json;

use crate::decide::Decision;
use crate::error::Error;
use crate::leader::Leadership;
use crate::metrics::OperatorMetrics;

/// The operator's finalizer on a DiskMerge: its node work is stopped and removed first.
pub const FINALIZER: &str = "livedisk.io/merge";
/// Labels on a LivediskMerge naming its DiskMerge (a cluster-scoped object cannot be owned by a
/// namespaced one).
pub const LABEL_NAMESPACE: &str = "livedisk.io/diskmerge-namespace";
pub const LABEL_NAME: &str = "livedisk.io/diskmerge-name";
/// Annotation on a LivediskMerge: the VolumeSnapshot (`namespace/name`) of each snapshot ID it
/// merges, so that they can be deleted after their contents are gone.
const ANNOTATION_SNAPSHOTS: &str = "livedisk.io/volume-snapshots";

pub struct MergeContext {
    pub client: Client,
    pub recorder: Recorder,
    pub leadership: Leadership,
    pub metrics: Arc<OperatorMetrics>,
}

/// Runs the DiskMerge controller until shutdown.
pub async fn run(context: Arc<MergeContext>) {
    let merges: Api<DiskMerge> = Api::all(context.client.clone());
    let work: Api<LivediskMerge> = Api::all(context.client.clone());
    Controller::new(merges, watcher::Config::default().any_semantic())
        .watches(work, watcher::Config::default().any_semantic(), |w| {
            let labels = w.labels();
            Some(ObjectRef::new(labels.get(LABEL_NAME)?).within(labels.get(LABEL_NAMESPACE)?))
        })
        .shutdown_on_signal()
        .run(reconcile, error_policy, context)
        .for_each(|_| async {})
        .await;
}

/// The name of a DiskMerge's node work.
fn work_name(merge: &DiskMerge) -> Result<String, Error> {
    merge
        .uid()
        .map(|uid| format!("merge-{uid}"))
        .ok_or_else(|| {
            Error::InvalidObject(format!("DiskMerge {} has no uid yet", merge.name_any()))
        })
}

async fn reconcile(merge: Arc<DiskMerge>, context: Arc<MergeContext>) -> Result<Action, Error> {
    if !context.leadership.is_leader() {
        return Ok(Action::await_change());
    }
    let started = Instant::now();
    let namespace = merge.namespace().unwrap_or_default();
    let api: Api<DiskMerge> = Api::namespaced(context.client.clone(), &namespace);
    let ctx = context.as_ref();
    // The finalizer goes on only once there is node work to stop: a DiskMerge refused for its
    // references never holds up its own deletion (or its namespace's) on the operator.
    let guarded = merge.finalizers().iter().any(|f| f == FINALIZER);
    let early = match guarded || merge.meta().deletion_timestamp.is_some() {
        true => Ok(None),
        false => refused_early(&merge, ctx).await,
    };
    let result = match early {
        Ok(Some(action)) => Ok(action),
        Err(error) => Err(error),
        Ok(None) => with_finalizer(&api, merge.clone(), ctx, &namespace).await,
    };
    context
        .metrics
        .reconciled("DiskMerge", &result, started.elapsed());
    if let Err(error) = &result {
        let note = format!(
            "{}; {}",
            livedisk_common::error_chain(error),
            error.code().retry_note()
        );
        publish(
            ctx,
            merge.as_ref(),
            EventType::Warning,
            error.code().reason(),
            &note,
            error.action(),
        )
        .await;
    }
    result
}

/// The reconcile under the finalizer: `apply`, or `cleanup` once the DiskMerge is deleted.
async fn with_finalizer(
    api: &Api<DiskMerge>,
    merge: Arc<DiskMerge>,
    ctx: &MergeContext,
    namespace: &str,
) -> Result<Action, Error> {
    let name = merge.name_any();
    let result = finalizer(api, FINALIZER, merge, |event| async move {
        match event {
            finalizer::Event::Apply(m) => apply(&m, ctx).await,
            finalizer::Event::Cleanup(m) => cleanup(&m, ctx).await,
        }
    })
    .await;
    crate::finalized::settle(result, "DiskMerge", namespace, &name)
}

/// Before the finalizer is on: whether the DiskMerge stops here (`Some`): its node work ended
/// and is gone, or its references refuse it (the status says why). `None`: go on and create
/// the node work.
async fn refused_early(merge: &DiskMerge, ctx: &MergeContext) -> Result<Option<Action>, Error> {
    let name = work_name(merge)?;
    let works: Api<LivediskMerge> = Api::all(ctx.client.clone());
    let existing = works.get_opt(&name).await.map_err(|cause| Error::Observe {
        what: format!("LivediskMerge {name}"),
        cause,
    })?;
    if existing.is_some() {
        return Ok(None);
    }
    if terminal(merge) {
        return Ok(Some(Action::await_change()));
    }
    match validate(merge, ctx).await? {
        Ok(_) => Ok(None),
        Err(action) => Ok(Some(action)),
    }
}

/// Looks up and validates; a refusal is written to the status and answered with when to look
/// again.
async fn validate(
    merge: &DiskMerge,
    ctx: &MergeContext,
) -> Result<Result<plan::Planned, Action>, Error> {
    let namespace = merge.namespace().unwrap_or_default();
    let observed = lookup::lookup(&ctx.client, &namespace, &merge.spec).await?;
    match plan::plan(
        &merge.spec.persistent_volume_claim_name,
        &merge.spec,
        bandwidth_of(merge),
        &observed,
    ) {
        Ok(planned) => Ok(Ok(planned)),
        Err(refusal) => {
            let decision = report::refused(&refusal);
            write_status(merge, ctx, &decision).await?;
            Ok(Err(Action::requeue(Duration::from_secs(
                decision.requeue_seconds,
            ))))
        }
    }
}

fn bandwidth_of(merge: &DiskMerge) -> Option<i64> {
    merge
        .spec
        .bandwidth_limit
        .as_deref()
        .and_then(plan::bandwidth_bytes)
}

fn error_policy(_: Arc<DiskMerge>, error: &Error, _: Arc<MergeContext>) -> Action {
    tracing::warn!(error = %livedisk_common::error_chain(error), "DiskMerge reconcile failed");
    Action::requeue(error.code().retry_after())
}

async fn apply(merge: &DiskMerge, ctx: &MergeContext) -> Result<Action, Error> {
    let name = work_name(merge)?;
    let works: Api<LivediskMerge> = Api::all(ctx.client.clone());
    let get_error = |cause| Error::Observe {
        what: format!("LivediskMerge {name}"),
        cause,
    };
    let bandwidth = bandwidth_of(merge);
    let work = match works.get_opt(&name).await.map_err(get_error)? {
        Some(work) => {
            // Only the rate limit and cancel follow the DiskMerge once the work exists.
            if work.spec.bandwidth_bytes_per_second != bandwidth
                || work.spec.cancel != merge.spec.cancel
            {
                let patch = json!({ "spec": {
                    "bandwidthBytesPerSecond": bandwidth,
                    "cancel": merge.spec.cancel || work.spec.cancel,
                }});
                works
                    .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .map_err(|cause| Error::Apply {
                        what: format!("LivediskMerge {name}"),
                        cause,
                    })?;
            }
            work
        }
        // A DiskMerge whose node work ended and was removed never starts again.
        None if terminal(merge) => return Ok(Action::await_change()),
        None => {
            let planned = match validate(merge, ctx).await? {
                Ok(planned) => planned,
                Err(action) => return Ok(action),
            };
            create_work(
                &works,
                merge,
                &name,
                planned.spec,
                &planned.volume_snapshots,
            )
            .await?
        }
    };
    let snapshots = volume_snapshots_of(&work);
    let merged: Vec<String> = work
        .status
        .as_ref()
        .map(|s| s.merged.clone())
        .unwrap_or_default();
    let merged_names: Vec<String> = merged
        .iter()
        .filter_map(|id| snapshots.get(id).map(|(_, n)| n.clone()))
        .collect();
    let decision = report::from_node(
        &work.spec.node_name,
        work.status.as_ref(),
        work.spec.snapshot_ids.len(),
        &merged_names,
    );
    write_status(merge, ctx, &decision).await?;
    if work.status.as_ref().is_some_and(|s| s.phase.is_terminal()) {
        let targets: Vec<&(String, String)> =
            merged.iter().filter_map(|id| snapshots.get(id)).collect();
        lookup::delete_merged(&ctx.client, &targets).await?;
    }
    Ok(Action::requeue(Duration::from_secs(
        decision.requeue_seconds,
    )))
}

fn terminal(merge: &DiskMerge) -> bool {
    use livedisk_api::Phase;
    merge
        .status
        .as_ref()
        .is_some_and(|s| matches!(s.phase, Phase::Completed | Phase::Failed | Phase::Cancelled))
}

async fn create_work(
    works: &Api<LivediskMerge>,
    merge: &DiskMerge,
    name: &str,
    spec: LivediskMergeSpec,
    volume_snapshots: &[(String, Option<(String, String)>)],
) -> Result<LivediskMerge, Error> {
    let mut work = LivediskMerge::new(name, spec);
    let labels = BTreeMap::from([
        (
            LABEL_NAMESPACE.to_string(),
            merge.namespace().unwrap_or_default(),
        ),
        (LABEL_NAME.to_string(), merge.name_any()),
    ]);
    let map: BTreeMap<&str, String> = volume_snapshots
        .iter()
        .filter_map(|(id, vs)| {
            vs.as_ref()
                .map(|(ns, n)| (id.as_str(), format!("{ns}/{n}")))
        })
        .collect();
    work.metadata.labels = Some(labels);
    work.metadata.annotations = Some(BTreeMap::from([(
        ANNOTATION_SNAPSHOTS.to_string(),
        serde_json::to_string(&map).unwrap_or_default(),
    )]));
    match works.create(&PostParams::default(), &work).await {
        Ok(created) => Ok(created),
        // Created by a reconcile whose answer was lost: it is the same work.
        Err(kube::Error::Api(s)) if s.code == 409 => {
            works.get(name).await.map_err(|cause| Error::Observe {
                what: format!("LivediskMerge {name}"),
                cause,
            })
        }
        Err(cause) => Err(Error::Apply {
            what: format!("LivediskMerge {name}"),
            cause,
        }),
    }
}

/// The VolumeSnapshot (namespace, name) of each snapshot ID of a node work.
fn volume_snapshots_of(work: &LivediskMerge) -> BTreeMap<String, (String, String)> {
    let map: BTreeMap<String, String> = work
        .annotations()
        .get(ANNOTATION_SNAPSHOTS)
        .and_then(|a| serde_json::from_str(a).ok())
        .unwrap_or_default();
    map.into_iter()
        .filter_map(|(id, vs)| {
            let (ns, name) = vs.split_once('/')?;
            Some((id, (ns.to_string(), name.to_string())))
        })
        .collect()
}

/// Deleting a DiskMerge stops its node work: the LivediskMerge is deleted (the node cancels the
/// job and removes its finalizer once the job ended) and awaited.
async fn cleanup(merge: &DiskMerge, ctx: &MergeContext) -> Result<Action, Error> {
    let name = work_name(merge)?;
    let works: Api<LivediskMerge> = Api::all(ctx.client.clone());
    let error = |cause| Error::Apply {
        what: format!("LivediskMerge {name}"),
        cause,
    };
    match works.delete(&name, &DeleteParams::default()).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 404 => return Ok(Action::await_change()),
        Err(cause) => return Err(error(cause)),
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if works.get_opt(&name).await.map_err(error)?.is_none() {
            return Ok(Action::await_change());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(Error::CacheSync(format!(
        "LivediskMerge {name} is still stopping on its node"
    )))
}

async fn write_status(
    merge: &DiskMerge,
    ctx: &MergeContext,
    decision: &Decision,
) -> Result<(), Error> {
    crate::finalized::write_status(&ctx.client, &ctx.recorder, merge, None, decision).await
}

async fn publish(
    ctx: &MergeContext,
    merge: &DiskMerge,
    type_: EventType,
    reason: &str,
    note: &str,
    action: &str,
) {
    let subject = merge.object_ref(&());
    crate::finalized::publish(&ctx.recorder, &subject, type_, reason, note, action).await;
}
