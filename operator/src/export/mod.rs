//! The DiskExport reconciler: look up the DiskSnapshot (and base) → snapshot handle → the
//! LivediskSnapshot's node and volume, validate (`plan`, pure), issue the export's credentials
//! (`credentials`, from the driver's export CA in `ca`), declare the `LivediskExport` for the
//! node to serve, and report what the node says: endpoint, expiry, bytes served. When the node
//! reports the export expired, its node work is removed (nothing stays served) and the DiskExport
//! is `Completed`. Deleting a DiskExport removes its node work first (the node ends every
//! connection at once); the credentials Secret goes with the DiskExport (owner reference).
//! `signer` issues the nodes' front certificates.

pub mod ca;
pub mod credentials;
pub mod plan;
pub mod signer;

use std::time::Duration;

use kube::api::Api;
use kube::runtime::controller::Action;
use kube::{Client, ResourceExt};
use livedisk_api::DiskExport;
use livedisk_api::internal::export::{LABEL_NAME, LABEL_NAMESPACE};
use livedisk_api::internal::{ExportPhase, LivediskExport, LivediskSnapshot};

use crate::error::Error;
use crate::merge::plan::NamedSnapshot;
use crate::node_work::{NodeWorkContext, NodeWorkKind, work};
use plan::{Home, Lookup, Resolved};

/// How long a deletion waits in one reconcile for the node to let its work go.
const CLEANUP_WAIT: Duration = Duration::from_secs(30);

/// The DiskExport kind, for the node-work shell.
pub struct Export;

impl NodeWorkKind for Export {
    type Object = DiskExport;
    type Work = LivediskExport;
    const FINALIZER: &'static str = "livedisk.io/export";
    const WORK_PREFIX: &'static str = "export-";
    const LABEL_NAMESPACE: &'static str = LABEL_NAMESPACE;
    const LABEL_NAME: &'static str = LABEL_NAME;

    async fn refused_early(
        export: &DiskExport,
        ctx: &NodeWorkContext,
    ) -> Result<Option<Action>, Error> {
        let name = work::name::<Self>(export)?;
        if work::get::<Self>(&work::api::<Self>(ctx), &name)
            .await?
            .is_some()
        {
            return Ok(None);
        }
        if terminal(export) {
            return Ok(Some(Action::await_change()));
        }
        let namespace = export.namespace().unwrap_or_default();
        let observed = lookup(&ctx.client, &namespace, export).await?;
        match plan::validate(&export.spec, &observed) {
            Ok(()) => Ok(None),
            Err(refusal) => Ok(Some(ctx.refuse(export, &refusal).await?)),
        }
    }

    async fn apply(export: &DiskExport, ctx: &NodeWorkContext) -> Result<Action, Error> {
        let name = work::name::<Self>(export)?;
        let works = work::api::<Self>(ctx);
        let secret =
            credentials::secret_name(&export.name_any(), &export.uid().unwrap_or_default());
        let work = match work::get::<Self>(&works, &name).await? {
            Some(work) => work,
            // An export that ended (expired or failed) and whose node work is gone stays ended.
            None if terminal(export) => return Ok(Action::await_change()),
            None => {
                let namespace = export.namespace().unwrap_or_default();
                let observed = lookup(&ctx.client, &namespace, export).await?;
                if let Err(refusal) = plan::validate(&export.spec, &observed) {
                    return ctx.refuse(export, &refusal).await;
                }
                let ca = ctx.export_ca.current().await?;
                let pins = match credentials::ensure(&ctx.client, &ca, export).await? {
                    Ok((_, pins)) => pins,
                    Err(conflict) => {
                        return ctx
                            .refuse(export, &plan::Refusal::CredentialsConflict(conflict.0))
                            .await;
                    }
                };
                let spec = match plan::plan(&export.spec, &observed, &pins) {
                    Ok(spec) => spec,
                    Err(refusal) => return ctx.refuse(export, &refusal).await,
                };
                work::create::<Self>(&works, export, LivediskExport::new(&name, spec)).await?
            }
        };
        let decision = plan::from_node(&work.spec, work.status.as_ref(), &secret);
        ctx.write_status(export, &decision).await?;
        let phase = work.status.as_ref().map(|s| s.phase).unwrap_or_default();
        if matches!(phase, ExportPhase::Expired | ExportPhase::Failed) {
            // Ended on the node: nothing is served any more; the node work goes.
            work::delete_and_await::<Self>(
                &works,
                &name,
                CLEANUP_WAIT,
                "is still held by its node",
            )
            .await?;
            return Ok(Action::await_change());
        }
        Ok(Action::requeue(Duration::from_secs(
            decision.requeue_seconds,
        )))
    }

    /// Deleting a DiskExport deletes its node work and waits until the node stopped serving it.
    async fn cleanup(export: &DiskExport, ctx: &NodeWorkContext) -> Result<Action, Error> {
        let name = work::name::<Self>(export)?;
        let works = work::api::<Self>(ctx);
        work::delete_and_await::<Self>(
            &works,
            &name,
            CLEANUP_WAIT,
            "is still held by its node (it stops serving first)",
        )
        .await
    }
}

fn terminal(export: &DiskExport) -> bool {
    use livedisk_api::Phase;
    export
        .status
        .as_ref()
        .is_some_and(|s| matches!(s.phase, Phase::Completed | Phase::Failed))
}

/// The DiskSnapshot and its base, each to its LivediskSnapshot. Reads go to the API server: a
/// DiskExport is looked up a handful of times before its node work exists.
async fn lookup(client: &Client, namespace: &str, export: &DiskExport) -> Result<Lookup, Error> {
    let snapshot = resolve(client, namespace, &export.spec.snapshot_name).await?;
    let base = match &export.spec.base_snapshot_name {
        Some(name) => Some(resolve(client, namespace, name).await?),
        None => None,
    };
    Ok(Lookup { snapshot, base })
}

async fn resolve(client: &Client, namespace: &str, name: &str) -> Result<Resolved, Error> {
    let named = crate::restore::lookup::snapshot(client, namespace, name).await?;
    let home = match &named {
        NamedSnapshot::Taken(content) => match &content.snapshot_handle {
            Some(handle) => {
                let api: Api<LivediskSnapshot> = Api::all(client.clone());
                api.get_opt(handle)
                    .await
                    .map_err(|cause| Error::Observe {
                        what: format!("LivediskSnapshot {handle}"),
                        cause,
                    })?
                    .map(|s| Home {
                        node: s.spec.node_name,
                        volume: s.spec.volume_id,
                    })
            }
            None => None,
        },
        _ => None,
    };
    Ok(Resolved { named, home })
}
