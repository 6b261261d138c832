//! The DiskRestore reconciler: look up PVC → PV → volume handle and DiskSnapshot → snapshot
//! handle (`lookup`), validate and decide the node work (`plan`, pure), create the
//! `LivediskRestore`, and report what its node says (`report`, pure): waiting while a consumer
//! has the volume attached, reverting, restored or failed. The finalizer of the node-work shell
//! (`crate::node_work`) makes deleting a DiskRestore remove its node work first: a revert that
//! waits never starts, and one that runs is waited for (it cannot be cancelled midway).

pub(crate) mod lookup;
pub mod plan;
pub mod report;

use std::time::Duration;

use kube::ResourceExt;
use kube::runtime::controller::Action;
use livedisk_api::DiskRestore;
use livedisk_api::internal::restore::{LABEL_NAME, LABEL_NAMESPACE};
use livedisk_api::internal::{LivediskRestore, LivediskRestoreSpec};

use crate::error::Error;
use crate::node_work::{NodeWorkContext, NodeWorkKind, work};

/// How long a deletion waits in one reconcile for the node to let its work go (a running revert
/// ends first); after that the reconcile fails and is retried.
const CLEANUP_WAIT: Duration = Duration::from_secs(60);

/// The DiskRestore kind, for the node-work shell.
pub struct Restore;

impl NodeWorkKind for Restore {
    type Object = DiskRestore;
    type Work = LivediskRestore;
    /// Its node work is removed (or awaited) first.
    const FINALIZER: &'static str = "livedisk.io/restore";
    const WORK_PREFIX: &'static str = "restore-";
    const LABEL_NAMESPACE: &'static str = LABEL_NAMESPACE;
    const LABEL_NAME: &'static str = LABEL_NAME;

    async fn refused_early(
        restore: &DiskRestore,
        ctx: &NodeWorkContext,
    ) -> Result<Option<Action>, Error> {
        let name = work::name::<Self>(restore)?;
        if work::get::<Self>(&work::api::<Self>(ctx), &name)
            .await?
            .is_some()
        {
            return Ok(None);
        }
        if terminal(restore) {
            return Ok(Some(Action::await_change()));
        }
        Ok(validate(restore, ctx).await?.err())
    }

    async fn apply(restore: &DiskRestore, ctx: &NodeWorkContext) -> Result<Action, Error> {
        let name = work::name::<Self>(restore)?;
        let works = work::api::<Self>(ctx);
        let work = match work::get::<Self>(&works, &name).await? {
            Some(work) => work,
            // A DiskRestore whose node work ended and was removed never starts again.
            None if terminal(restore) => return Ok(Action::await_change()),
            None => {
                let spec = match validate(restore, ctx).await? {
                    Ok(spec) => spec,
                    Err(action) => return Ok(action),
                };
                work::create::<Self>(&works, restore, LivediskRestore::new(&name, spec)).await?
            }
        };
        let decision = report::from_node(
            &work.spec,
            work.status.as_ref(),
            &restore.spec.snapshot_name,
        );
        ctx.write_status(restore, &decision).await?;
        Ok(Action::requeue(Duration::from_secs(
            decision.requeue_seconds,
        )))
    }

    /// Deleting a DiskRestore deletes its node work and waits until the node let it go: at once
    /// for a revert that waits or ended, after the revert for one that runs.
    async fn cleanup(restore: &DiskRestore, ctx: &NodeWorkContext) -> Result<Action, Error> {
        let name = work::name::<Self>(restore)?;
        let works = work::api::<Self>(ctx);
        work::delete_and_await::<Self>(
            &works,
            &name,
            CLEANUP_WAIT,
            "is still held by its node (a running revert ends first)",
        )
        .await
    }
}

/// Looks up and validates; a refusal is written to the status and answered with when to look
/// again.
async fn validate(
    restore: &DiskRestore,
    ctx: &NodeWorkContext,
) -> Result<Result<LivediskRestoreSpec, Action>, Error> {
    let namespace = restore.namespace().unwrap_or_default();
    let observed = lookup::lookup(&ctx.client, &namespace, &restore.spec).await?;
    match plan::plan(&restore.spec, &observed) {
        Ok(spec) => Ok(Ok(spec)),
        Err(refusal) => Ok(Err(ctx.refuse(restore, &refusal).await?)),
    }
}

fn terminal(restore: &DiskRestore) -> bool {
    use livedisk_api::Phase;
    restore
        .status
        .as_ref()
        .is_some_and(|s| matches!(s.phase, Phase::Completed | Phase::Failed))
}
