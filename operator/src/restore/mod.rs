//! The DiskRestore reconciler: look up PVC → PV → volume handle and DiskSnapshot → snapshot
//! handle (`lookup`), validate and decide the node work (`plan`, pure), create the
//! `LivediskRestore`, and report what its node says (`report`, pure): waiting while a consumer
//! has the volume attached, reverting, restored or failed. A finalizer (kube-runtime's
//! `finalizer()`) makes deleting a DiskRestore remove its node work first: a revert that waits
//! never starts, and one that runs is waited for (it cannot be cancelled midway).

mod lookup;
pub mod plan;
pub mod report;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::api::{Api, DeleteParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{EventType, Recorder};
use kube::runtime::finalizer::{self, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use livedisk_api::DiskRestore;
use livedisk_api::internal::restore::{LABEL_NAME, LABEL_NAMESPACE};
use livedisk_api::internal::{LivediskRestore, LivediskRestoreSpec};

use crate::decide::Decision;
use crate::error::Error;
use crate::leader::Leadership;
use crate::metrics::OperatorMetrics;

/// The operator's finalizer on a DiskRestore: its node work is removed (or awaited) first.
pub const FINALIZER: &str = "livedisk.io/restore";

/// How long a deletion waits in one reconcile for the node to let its work go (a running revert
/// ends first); after that the reconcile fails and is retried.
const CLEANUP_WAIT: Duration = Duration::from_secs(60);

pub struct RestoreContext {
    pub client: Client,
    pub recorder: Recorder,
    pub leadership: Leadership,
    pub metrics: Arc<OperatorMetrics>,
}

/// Runs the DiskRestore controller until shutdown.
pub async fn run(context: Arc<RestoreContext>) {
    let restores: Api<DiskRestore> = Api::all(context.client.clone());
    let work: Api<LivediskRestore> = Api::all(context.client.clone());
    Controller::new(restores, watcher::Config::default().any_semantic())
        .watches(work, watcher::Config::default().any_semantic(), |w| {
            let labels = w.labels();
            Some(ObjectRef::new(labels.get(LABEL_NAME)?).within(labels.get(LABEL_NAMESPACE)?))
        })
        .shutdown_on_signal()
        .run(reconcile, error_policy, context)
        .for_each(|_| async {})
        .await;
}

/// The name of a DiskRestore's node work.
fn work_name(restore: &DiskRestore) -> Result<String, Error> {
    restore
        .uid()
        .map(|uid| format!("restore-{uid}"))
        .ok_or_else(|| {
            Error::InvalidObject(format!("DiskRestore {} has no uid yet", restore.name_any()))
        })
}

async fn reconcile(
    restore: Arc<DiskRestore>,
    context: Arc<RestoreContext>,
) -> Result<Action, Error> {
    if !context.leadership.is_leader() {
        return Ok(Action::await_change());
    }
    let started = Instant::now();
    let namespace = restore.namespace().unwrap_or_default();
    let api: Api<DiskRestore> = Api::namespaced(context.client.clone(), &namespace);
    let ctx = context.as_ref();
    // The finalizer goes on only once there is node work: a DiskRestore refused for its
    // references never holds up its own deletion (or its namespace's) on the operator.
    let guarded = restore.finalizers().iter().any(|f| f == FINALIZER);
    let early = match guarded || restore.meta().deletion_timestamp.is_some() {
        true => Ok(None),
        false => refused_early(&restore, ctx).await,
    };
    let result = match early {
        Ok(Some(action)) => Ok(action),
        Err(error) => Err(error),
        Ok(None) => with_finalizer(&api, restore.clone(), ctx, &namespace).await,
    };
    context
        .metrics
        .reconciled("DiskRestore", &result, started.elapsed());
    if let Err(error) = &result {
        let note = format!(
            "{}; {}",
            livedisk_common::error_chain(error),
            error.code().retry_note()
        );
        publish(
            ctx,
            restore.as_ref(),
            EventType::Warning,
            error.code().reason(),
            &note,
            error.action(),
        )
        .await;
    }
    result
}

/// The reconcile under the finalizer: `apply`, or `cleanup` once the DiskRestore is deleted.
async fn with_finalizer(
    api: &Api<DiskRestore>,
    restore: Arc<DiskRestore>,
    ctx: &RestoreContext,
    namespace: &str,
) -> Result<Action, Error> {
    let name = restore.name_any();
    let result = finalizer(api, FINALIZER, restore, |event| async move {
        match event {
            finalizer::Event::Apply(r) => apply(&r, ctx).await,
            finalizer::Event::Cleanup(r) => cleanup(&r, ctx).await,
        }
    })
    .await;
    crate::finalized::settle(result, "DiskRestore", namespace, &name)
}

/// Before the finalizer is on: whether the DiskRestore stops here (`Some`): it ended and its
/// node work is gone, or its references refuse it (the status says why). `None`: go on.
async fn refused_early(
    restore: &DiskRestore,
    ctx: &RestoreContext,
) -> Result<Option<Action>, Error> {
    let name = work_name(restore)?;
    let works: Api<LivediskRestore> = Api::all(ctx.client.clone());
    let existing = works.get_opt(&name).await.map_err(|cause| Error::Observe {
        what: format!("LivediskRestore {name}"),
        cause,
    })?;
    if existing.is_some() {
        return Ok(None);
    }
    if terminal(restore) {
        return Ok(Some(Action::await_change()));
    }
    match validate(restore, ctx).await? {
        Ok(_) => Ok(None),
        Err(action) => Ok(Some(action)),
    }
}

/// Looks up and validates; a refusal is written to the status and answered with when to look
/// again.
async fn validate(
    restore: &DiskRestore,
    ctx: &RestoreContext,
) -> Result<Result<LivediskRestoreSpec, Action>, Error> {
    let namespace = restore.namespace().unwrap_or_default();
    let observed = lookup::lookup(&ctx.client, &namespace, &restore.spec).await?;
    match plan::plan(&restore.spec, &observed) {
        Ok(spec) => Ok(Ok(spec)),
        Err(refusal) => {
            let decision = report::refused(&refusal);
            write_status(restore, ctx, &decision).await?;
            Ok(Err(Action::requeue(Duration::from_secs(
                decision.requeue_seconds,
            ))))
        }
    }
}

fn error_policy(_: Arc<DiskRestore>, error: &Error, _: Arc<RestoreContext>) -> Action {
    tracing::warn!(error = %livedisk_common::error_chain(error), "DiskRestore reconcile failed");
    Action::requeue(error.code().retry_after())
}

async fn apply(restore: &DiskRestore, ctx: &RestoreContext) -> Result<Action, Error> {
    let name = work_name(restore)?;
    let works: Api<LivediskRestore> = Api::all(ctx.client.clone());
    let work = match works.get_opt(&name).await.map_err(|cause| Error::Observe {
        what: format!("LivediskRestore {name}"),
        cause,
    })? {
        Some(work) => work,
        // A DiskRestore whose node work ended and was removed never starts again.
        None if terminal(restore) => return Ok(Action::await_change()),
        None => {
            let spec = match validate(restore, ctx).await? {
                Ok(spec) => spec,
                Err(action) => return Ok(action),
            };
            create_work(&works, restore, &name, spec).await?
        }
    };
    let decision = report::from_node(
        &work.spec,
        work.status.as_ref(),
        &restore.spec.snapshot_name,
    );
    write_status(restore, ctx, &decision).await?;
    Ok(Action::requeue(Duration::from_secs(
        decision.requeue_seconds,
    )))
}

fn terminal(restore: &DiskRestore) -> bool {
    use livedisk_api::Phase;
    restore
        .status
        .as_ref()
        .is_some_and(|s| matches!(s.phase, Phase::Completed | Phase::Failed))
}

async fn create_work(
    works: &Api<LivediskRestore>,
    restore: &DiskRestore,
    name: &str,
    spec: LivediskRestoreSpec,
) -> Result<LivediskRestore, Error> {
    let mut work = LivediskRestore::new(name, spec);
    work.metadata.labels = Some(BTreeMap::from([
        (
            LABEL_NAMESPACE.to_string(),
            restore.namespace().unwrap_or_default(),
        ),
        (LABEL_NAME.to_string(), restore.name_any()),
    ]));
    match works.create(&PostParams::default(), &work).await {
        Ok(created) => Ok(created),
        // Created by a reconcile whose answer was lost: it is the same work.
        Err(kube::Error::Api(s)) if s.code == 409 => {
            works.get(name).await.map_err(|cause| Error::Observe {
                what: format!("LivediskRestore {name}"),
                cause,
            })
        }
        Err(cause) => Err(Error::Apply {
            what: format!("LivediskRestore {name}"),
            cause,
        }),
    }
}

/// Deleting a DiskRestore deletes its node work and waits until the node let it go: at once for
/// a revert that waits or ended, after the revert for one that runs.
async fn cleanup(restore: &DiskRestore, ctx: &RestoreContext) -> Result<Action, Error> {
    let name = work_name(restore)?;
    let works: Api<LivediskRestore> = Api::all(ctx.client.clone());
    let error = |cause| Error::Apply {
        what: format!("LivediskRestore {name}"),
        cause,
    };
    match works.delete(&name, &DeleteParams::default()).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 404 => return Ok(Action::await_change()),
        Err(cause) => return Err(error(cause)),
    }
    let deadline = Instant::now() + CLEANUP_WAIT;
    while Instant::now() < deadline {
        if works.get_opt(&name).await.map_err(error)?.is_none() {
            return Ok(Action::await_change());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(Error::CacheSync(format!(
        "LivediskRestore {name} is still held by its node (a running revert ends first)"
    )))
}

async fn write_status(
    restore: &DiskRestore,
    ctx: &RestoreContext,
    decision: &Decision,
) -> Result<(), Error> {
    crate::finalized::write_status(&ctx.client, &ctx.recorder, restore, None, decision).await
}

async fn publish(
    ctx: &RestoreContext,
    restore: &DiskRestore,
    type_: EventType,
    reason: &str,
    note: &str,
    action: &str,
) {
    let subject = restore.object_ref(&());
    crate::finalized::publish(&ctx.recorder, &subject, type_, reason, note, action).await;
}
