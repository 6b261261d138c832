//! The DiskMerge reconciler: look up PVC → PV → volume handle and DiskSnapshots → snapshot
//! handles (`lookup`), validate and decide the node work (`plan`, pure), apply the
//! `LivediskMerge`, report its progress (`report`, pure), and once it ended delete the
//! DiskSnapshots and VolumeSnapshots of the snapshots merged away. The finalizer of the
//! node-work shell (`crate::node_work`) makes deleting a DiskMerge stop its node work first.

pub(crate) mod lookup;
pub mod plan;
pub mod report;

use std::collections::BTreeMap;
use std::time::Duration;

use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use livedisk_api::DiskMerge;
use livedisk_api::internal::{LivediskMerge, LivediskMergeSpec};
use serde_json::json;

use crate::error::Error;
use crate::node_work::{NodeWorkContext, NodeWorkKind, work};

/// Labels on a LivediskMerge naming its DiskMerge (a cluster-scoped object cannot be owned by a
/// namespaced one).
pub const LABEL_NAMESPACE: &str = "livedisk.io/diskmerge-namespace";
pub const LABEL_NAME: &str = "livedisk.io/diskmerge-name";
/// Annotation on a LivediskMerge: the VolumeSnapshot (`namespace/name`) of each snapshot ID it
/// merges, so that they can be deleted after their contents are gone.
const ANNOTATION_SNAPSHOTS: &str = "livedisk.io/volume-snapshots";

/// How long a deletion waits in one reconcile for the node to stop the merge; after that the
/// reconcile fails and is retried.
const CLEANUP_WAIT: Duration = Duration::from_secs(60);

/// The DiskMerge kind, for the node-work shell.
pub struct Merge;

impl NodeWorkKind for Merge {
    type Object = DiskMerge;
    type Work = LivediskMerge;
    /// Its node work is stopped and removed first.
    const FINALIZER: &'static str = "livedisk.io/merge";
    const WORK_PREFIX: &'static str = "merge-";
    const LABEL_NAMESPACE: &'static str = LABEL_NAMESPACE;
    const LABEL_NAME: &'static str = LABEL_NAME;

    async fn refused_early(
        merge: &DiskMerge,
        ctx: &NodeWorkContext,
    ) -> Result<Option<Action>, Error> {
        let name = work::name::<Self>(merge)?;
        if work::get::<Self>(&work::api::<Self>(ctx), &name)
            .await?
            .is_some()
        {
            return Ok(None);
        }
        if terminal(merge) {
            return Ok(Some(Action::await_change()));
        }
        Ok(validate(merge, ctx).await?.err())
    }

    async fn apply(merge: &DiskMerge, ctx: &NodeWorkContext) -> Result<Action, Error> {
        let name = work::name::<Self>(merge)?;
        let works = work::api::<Self>(ctx);
        let work = match work::get::<Self>(&works, &name).await? {
            Some(work) => follow(&works, merge, work).await?,
            // A DiskMerge whose node work ended and was removed never starts again.
            None if terminal(merge) => return Ok(Action::await_change()),
            None => {
                let planned = match validate(merge, ctx).await? {
                    Ok(planned) => planned,
                    Err(action) => return Ok(action),
                };
                let new = new_work(&name, planned.spec, &planned.volume_snapshots);
                work::create::<Self>(&works, merge, new).await?
            }
        };
        report_progress(merge, ctx, &work).await
    }

    /// Deleting a DiskMerge stops its node work: the LivediskMerge is deleted (the node cancels
    /// the job and removes its finalizer once the job ended) and awaited.
    async fn cleanup(merge: &DiskMerge, ctx: &NodeWorkContext) -> Result<Action, Error> {
        let name = work::name::<Self>(merge)?;
        let works = work::api::<Self>(ctx);
        work::delete_and_await::<Self>(&works, &name, CLEANUP_WAIT, "is still stopping on its node")
            .await
    }
}

/// Looks up and validates; a refusal is written to the status and answered with when to look
/// again.
async fn validate(
    merge: &DiskMerge,
    ctx: &NodeWorkContext,
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
        Err(refusal) => Ok(Err(ctx.refuse(merge, &refusal).await?)),
    }
}

fn bandwidth_of(merge: &DiskMerge) -> Option<i64> {
    merge
        .spec
        .bandwidth_limit
        .as_deref()
        .and_then(plan::bandwidth_bytes)
}

/// Only the rate limit and cancel follow the DiskMerge once its node work exists.
async fn follow(
    works: &Api<LivediskMerge>,
    merge: &DiskMerge,
    work: LivediskMerge,
) -> Result<LivediskMerge, Error> {
    let bandwidth = bandwidth_of(merge);
    if work.spec.bandwidth_bytes_per_second != bandwidth || work.spec.cancel != merge.spec.cancel {
        let name = work.name_any();
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
    Ok(work)
}

/// Reports the node work on the DiskMerge's status; once it ended, deletes the DiskSnapshots and
/// VolumeSnapshots of the snapshots it merged away.
async fn report_progress(
    merge: &DiskMerge,
    ctx: &NodeWorkContext,
    work: &LivediskMerge,
) -> Result<Action, Error> {
    let snapshots = volume_snapshots_of(work);
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
    ctx.write_status(merge, &decision).await?;
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

fn new_work(
    name: &str,
    spec: LivediskMergeSpec,
    volume_snapshots: &[(String, Option<(String, String)>)],
) -> LivediskMerge {
    let mut work = LivediskMerge::new(name, spec);
    let map: BTreeMap<&str, String> = volume_snapshots
        .iter()
        .filter_map(|(id, vs)| {
            vs.as_ref()
                .map(|(ns, n)| (id.as_str(), format!("{ns}/{n}")))
        })
        .collect();
    work.metadata.annotations = Some(BTreeMap::from([(
        ANNOTATION_SNAPSHOTS.to_string(),
        serde_json::to_string(&map).unwrap_or_default(),
    )]));
    work
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
