//! The DiskMigration reconciler: look up PVC → PV → volume handle → the LivediskVolume's node
//! (the source) and the target's LivediskNode (`lookup`), validate and decide the node work
//! (`plan`, pure), create the `LivediskMigration` that the two node plugins carry out, make it
//! follow later changes of the rate limit and a cancel, and report what the nodes say
//! (`report`, pure). The finalizer of the node-work shell (`crate::node_work`) makes deleting a
//! DiskMigration cancel its node work and wait for its end first.

pub(crate) mod lookup;
pub mod plan;
pub mod report;

use std::time::Duration;

use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use livedisk_api::internal::LivediskMigration;
use livedisk_api::{DiskMigration, Phase};
use serde_json::{Value, json};

use crate::error::Error;
use crate::node_work::{NodeWorkContext, NodeWorkKind, work};

/// Labels on a LivediskMigration naming its DiskMigration (a cluster-scoped object cannot be
/// owned by a namespaced one).
pub const LABEL_NAMESPACE: &str = "livedisk.io/diskmigration-namespace";
pub const LABEL_NAME: &str = "livedisk.io/diskmigration-name";

/// How long a deletion waits in one reconcile for the nodes to end or let go of the migration;
/// after that the reconcile fails and is retried (the finalizer stays until they did).
const CLEANUP_WAIT: Duration = Duration::from_secs(60);

/// The DiskMigration kind, for the node-work shell.
pub struct Migration;

impl NodeWorkKind for Migration {
    type Object = DiskMigration;
    type Work = LivediskMigration;
    /// Its node work is cancelled (or, past the cutover, awaited) and removed first.
    const FINALIZER: &'static str = "livedisk.io/migration";
    const WORK_PREFIX: &'static str = "migrate-";
    const LABEL_NAMESPACE: &'static str = LABEL_NAMESPACE;
    const LABEL_NAME: &'static str = LABEL_NAME;

    async fn refused_early(
        migration: &DiskMigration,
        ctx: &NodeWorkContext,
    ) -> Result<Option<Action>, Error> {
        let name = work::name::<Self>(migration)?;
        if work::get::<Self>(&work::api::<Self>(ctx), &name)
            .await?
            .is_some()
        {
            return Ok(None);
        }
        if terminal(migration) {
            return Ok(Some(Action::await_change()));
        }
        Ok(validate(migration, ctx, &name).await?.err())
    }

    async fn apply(migration: &DiskMigration, ctx: &NodeWorkContext) -> Result<Action, Error> {
        let name = work::name::<Self>(migration)?;
        let works = work::api::<Self>(ctx);
        let (work, ignored_bandwidth) = match work::get::<Self>(&works, &name).await? {
            Some(work) => follow(&works, migration, work).await?,
            // A DiskMigration that ended never starts again: the volume may have moved since,
            // and a new migration is a new DiskMigration.
            None if terminal(migration) => return Ok(Action::await_change()),
            None => {
                let spec = match validate(migration, ctx, &name).await? {
                    Ok(spec) => spec,
                    Err(action) => return Ok(action),
                };
                let new = LivediskMigration::new(&name, spec);
                (work::create::<Self>(&works, migration, new).await?, None)
            }
        };
        report_progress(migration, ctx, &work, ignored_bandwidth.as_deref()).await
    }

    /// Deleting a DiskMigration stops its node work: the LivediskMigration is cancelled and its
    /// end awaited (a migration past the start of its cutover refuses the cancel and completes:
    /// that end is awaited too, as the volume then lives on the target), then it is deleted and
    /// awaited until its nodes let it go.
    async fn cleanup(migration: &DiskMigration, ctx: &NodeWorkContext) -> Result<Action, Error> {
        let name = work::name::<Self>(migration)?;
        let works = work::api::<Self>(ctx);
        let Some(current) = work::get::<Self>(&works, &name).await? else {
            return Ok(Action::await_change());
        };
        if !ended(&current) {
            if !current.spec.cancel {
                patch_work(&works, &name, &json!({ "spec": { "cancel": true } })).await?;
            }
            // What the nodes say meanwhile (a refused cancel, the stage) stays visible on the
            // DiskMigration being deleted.
            report_progress(migration, ctx, &current, None).await?;
            work::await_ended::<Self>(
                &works,
                &name,
                CLEANUP_WAIT,
                ended,
                "has not ended yet: its nodes stop it before the cutover, or complete it after",
            )
            .await?;
        }
        work::delete_and_await::<Self>(&works, &name, CLEANUP_WAIT, "is still held by its nodes")
            .await
    }
}

/// Looks up and validates; a refusal is written to the status and answered with when to look
/// again.
async fn validate(
    migration: &DiskMigration,
    ctx: &NodeWorkContext,
    work_name: &str,
) -> Result<Result<livedisk_api::internal::LivediskMigrationSpec, Action>, Error> {
    let namespace = migration.namespace().unwrap_or_default();
    let observed = lookup::lookup(&ctx.client, &namespace, &migration.spec, work_name).await?;
    match plan::plan(&migration.spec, &observed) {
        Ok(spec) => Ok(Ok(spec)),
        Err(refusal) => Ok(Err(ctx.refuse(migration, &refusal).await?)),
    }
}

/// Makes the existing node work follow the DiskMigration's rate limit and cancel. Returns the
/// work as read (the watch brings the patched one) and a rate limit it could not take.
async fn follow(
    works: &Api<LivediskMigration>,
    migration: &DiskMigration,
    work: LivediskMigration,
) -> Result<(LivediskMigration, Option<String>), Error> {
    // An ended migration has nothing left to limit or cancel.
    if ended(&work) {
        return Ok((work, None));
    }
    let following = plan::follow(&migration.spec, &work.spec);
    if let Some(patch) = &following.patch {
        patch_work(works, &work.name_any(), patch).await?;
    }
    Ok((work, following.ignored_bandwidth))
}

async fn patch_work(
    works: &Api<LivediskMigration>,
    name: &str,
    patch: &Value,
) -> Result<(), Error> {
    works
        .patch(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .map(|_| ())
        .map_err(|cause| Error::Apply {
            what: format!("LivediskMigration {name}"),
            cause,
        })
}

/// Reports the node work on the DiskMigration's status.
async fn report_progress(
    migration: &DiskMigration,
    ctx: &NodeWorkContext,
    work: &LivediskMigration,
    ignored_bandwidth: Option<&str>,
) -> Result<Action, Error> {
    // A cancel that reached an ended node work (not forwarded any more) is still the user's
    // request, and the report says what became of it.
    let mut asked = work.spec.clone();
    asked.cancel |= migration.spec.cancel;
    let decision = report::from_node(&asked, work.status.as_ref(), ignored_bandwidth);
    ctx.write_status(migration, &decision).await?;
    Ok(Action::requeue(Duration::from_secs(
        decision.requeue_seconds,
    )))
}

/// Whether the nodes are done with a migration.
fn ended(work: &LivediskMigration) -> bool {
    work.status.as_ref().is_some_and(|s| s.phase.is_terminal())
}

/// Whether the DiskMigration has ended (or was refused for good).
fn terminal(migration: &DiskMigration) -> bool {
    migration
        .status
        .as_ref()
        .is_some_and(|s| matches!(s.phase, Phase::Completed | Phase::Failed | Phase::Cancelled))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn migration(uid: &str) -> DiskMigration {
        serde_json::from_value(json!({
            "apiVersion": "livedisk.io/v1alpha1", "kind": "DiskMigration",
            "metadata": {"name": "m", "namespace": "ns", "uid": uid},
            "spec": {"persistentVolumeClaimName": "disk", "targetNodeName": "node-b"}
        }))
        .expect("object")
    }

    #[test]
    fn node_work_is_named_after_the_migrations_uid() {
        assert_eq!(
            work::name::<Migration>(&migration("u1")).expect("name"),
            "migrate-u1"
        );
        // The default of spec.verify is true.
        assert!(migration("u1").spec.verify);
    }

    #[test]
    fn only_an_ended_migration_is_terminal() {
        let mut m = migration("u1");
        assert!(!terminal(&m));
        for (phase, ended) in [
            (Phase::Pending, false),
            (Phase::Running, false),
            (Phase::Completed, true),
            (Phase::Failed, true),
            (Phase::Cancelled, true),
        ] {
            m.status = Some(livedisk_api::DiskMigrationStatus {
                phase,
                ..Default::default()
            });
            assert_eq!(terminal(&m), ended, "{phase:?}");
        }
    }
}
