//! The DiskEvacuation reconciler: one request moves every livedisk volume off a node.
//!
//! A pass is the pipeline every kind follows: look up the nodes, the volumes the node holds,
//! their claims and the evacuation's DiskMigrations (`lookup`), decide what to create and patch
//! (`plan`, pure), create and patch the DiskMigrations, then report (`report`, pure) on the
//! status and in Events. The DiskMigrations do the moving, one per volume, in their claims'
//! namespaces; the evacuation owns them (so deleting it deletes them, and deleting a
//! DiskMigration cancels its node work first) and labels them with its UID and their volume, so
//! a pass finds them whatever its status says. No finalizer: there is nothing of its own to
//! release.

pub(crate) mod lookup;
pub mod plan;
pub mod report;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use livedisk_api::internal::LivediskVolume;
use livedisk_api::{DiskEvacuation, DiskMigration, EvacuationVolumePhase, Phase};

use crate::decide::{Decision, EventKind, Refusal as _};
use crate::error::Error;
use crate::leader::Leadership;
use crate::merge::lookup::observe_error;
use crate::metrics::OperatorMetrics;
use crate::status;
use plan::{NewMigration, Plan};
use report::{Note, Related};

/// Labels on each DiskMigration of an evacuation: the evacuation's UID (its name may be longer
/// than a label value) and the volume it moves.
pub const LABEL_UID: &str = "livedisk.io/diskevacuation-uid";
pub const LABEL_VOLUME: &str = "livedisk.io/diskevacuation-volume";

const KIND: &str = "DiskEvacuation";

/// Evacuations reconciled at once: each pass lists a node's volumes and the evacuation's
/// migrations, and there are rarely more than a few evacuations.
const CONCURRENT_RECONCILES: u16 = 4;

/// Changes of an evacuation's migrations (their progress among them) within this time wake it
/// once.
const DEBOUNCE: Duration = Duration::from_secs(1);

/// What the DiskEvacuation reconciler reads and writes through.
pub struct EvacuationContext {
    pub client: Client,
    pub recorder: Recorder,
    /// Checked before each reconcile: a replica that does not hold the Lease does nothing.
    pub leadership: Leadership,
    pub metrics: Arc<OperatorMetrics>,
}

/// Runs the DiskEvacuation controller until shutdown. A change of one of its DiskMigrations
/// wakes it.
pub async fn run(context: Arc<EvacuationContext>) {
    let evacuations: Api<DiskEvacuation> = Api::all(context.client.clone());
    let migrations: Api<DiskMigration> = Api::all(context.client.clone());
    Controller::new(evacuations, watcher::Config::default().any_semantic())
        .with_config(
            controller::Config::default()
                .concurrency(CONCURRENT_RECONCILES)
                .debounce(DEBOUNCE),
        )
        // Not `owns()`: it would look for the (cluster-scoped) owner in the child's namespace.
        .watches(
            migrations,
            watcher::Config::default().labels(LABEL_UID).any_semantic(),
            |migration| owner(&migration),
        )
        .shutdown_on_signal()
        .run(reconcile, error_policy, context)
        .for_each(|_| async {})
        .await;
}

/// Pure: the evacuation that owns a DiskMigration, if one does.
fn owner(migration: &DiskMigration) -> Option<ObjectRef<DiskEvacuation>> {
    migration
        .owner_references()
        .iter()
        .find(|o| {
            o.kind == DiskEvacuation::kind(&()) && o.api_version == DiskEvacuation::api_version(&())
        })
        .map(|o| ObjectRef::new(&o.name))
}

async fn reconcile(
    object: Arc<DiskEvacuation>,
    context: Arc<EvacuationContext>,
) -> Result<Action, Error> {
    if !context.leadership.is_leader() {
        return Ok(Action::await_change());
    }
    let started = Instant::now();
    let result = evacuate(&object, &context).await;
    context.metrics.reconciled(KIND, &result, started.elapsed());
    if let Err(error) = &result {
        crate::failure::publish_warning(&context.recorder, object.as_ref(), error).await;
        write_stalled(&context, object.as_ref(), error).await;
    }
    result
}

fn error_policy(object: Arc<DiskEvacuation>, error: &Error, _: Arc<EvacuationContext>) -> Action {
    crate::failure::retry(KIND, &object.name_any(), error)
}

/// Whether the evacuation has ended (or was refused).
fn terminal(evacuation: &DiskEvacuation) -> bool {
    evacuation
        .status
        .as_ref()
        .is_some_and(|s| matches!(s.phase, Phase::Completed | Phase::Failed | Phase::Cancelled))
}

/// One pass: look up, plan, create and patch the migrations, report.
async fn evacuate(object: &DiskEvacuation, ctx: &EvacuationContext) -> Result<Action, Error> {
    let name = object.name_any();
    let api: Api<DiskEvacuation> = Api::all(ctx.client.clone());
    // The stored copy, not the watch's: the status is this kind's record of the volumes, and a
    // pass must start from what the previous one wrote.
    let Some(current) = api
        .get_opt(&name)
        .await
        .map_err(observe_error(format!("DiskEvacuation {name}")))?
    else {
        return Ok(Action::await_change());
    };
    // An ended evacuation never starts again; a deleted one takes its migrations with it.
    if terminal(&current) || current.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let uid = current
        .uid()
        .ok_or_else(|| Error::InvalidObject(format!("{KIND} {name} has no uid yet")))?;
    let previous = current.status.clone().unwrap_or_default().volumes;
    let observed = lookup::lookup(&ctx.client, &current.spec.node_name, &uid, &previous).await?;
    let evacuation = plan::Evacuation {
        name: &name,
        uid: &uid,
        spec: &current.spec,
    };
    let mut plan = match plan::plan(evacuation, &previous, &observed) {
        Ok(plan) => plan,
        Err(refusal) => {
            let decision = crate::decide::refused(&refusal);
            let note = Note {
                kind: EventKind::Warning,
                reason: refusal.reason(),
                message: refusal.to_string(),
                related: None,
            };
            write(ctx, &current, &decision, &[note]).await?;
            return Ok(Action::await_change());
        }
    };
    let created = apply(ctx, &current, &uid, &mut plan).await?;
    let decision = report::decide(&current.spec, &plan.volumes, plan.progress.as_ref());
    let notes = report::notes(&current.spec, &previous, &plan.volumes, created, &decision);
    write(ctx, &current, &decision, &notes).await?;
    Ok(match decision.phase {
        Phase::Completed | Phase::Failed | Phase::Cancelled => Action::await_change(),
        _ => Action::requeue(Duration::from_secs(decision.requeue_seconds)),
    })
}

/// Creates and patches the DiskMigrations of a plan. Returns how many were created; a volume
/// whose claim's namespace is being deleted (or is gone) is marked skipped in the plan.
async fn apply(
    ctx: &EvacuationContext,
    evacuation: &DiskEvacuation,
    uid: &str,
    plan: &mut Plan,
) -> Result<usize, Error> {
    let mut owner = evacuation.controller_owner_ref(&()).ok_or_else(|| {
        Error::InvalidObject(format!("{KIND} {} has no uid yet", evacuation.name_any()))
    })?;
    // Garbage collection needs no more; blocking the owner's deletion would need `update` on
    // diskevacuations/finalizers where OwnerReferencesPermissionEnforcement is on.
    owner.block_owner_deletion = None;
    let mut created = 0;
    for new in &plan.creates {
        match create(&ctx.client, &owner, uid, new).await? {
            Created::Now => created += 1,
            Created::Before => {}
            Created::Refused(why) => {
                if let Some(volume) = plan
                    .volumes
                    .iter_mut()
                    .find(|v| v.volume_id == new.volume_id)
                {
                    volume.phase = EvacuationVolumePhase::Skipped;
                    volume.migration_name = None;
                    volume.target_node_name = None;
                    volume.message = Some(why);
                }
            }
        }
    }
    for patch in &plan.patches {
        let api: Api<DiskMigration> = Api::namespaced(ctx.client.clone(), &patch.namespace);
        api.patch(
            &patch.name,
            &PatchParams::default(),
            &Patch::Merge(&patch.patch),
        )
        .await
        .map_err(|cause| Error::Apply {
            what: format!("DiskMigration {}/{}", patch.namespace, patch.name),
            cause,
        })?;
    }
    Ok(created)
}

/// What creating a DiskMigration came to.
enum Created {
    Now,
    /// It exists already (made by a pass whose answer was lost).
    Before,
    /// Its namespace refuses it: being deleted, or gone.
    Refused(String),
}

async fn create(
    client: &Client,
    owner: &OwnerReference,
    uid: &str,
    new: &NewMigration,
) -> Result<Created, Error> {
    let mut migration = DiskMigration::new(&new.name, new.spec.clone());
    migration.metadata.namespace = Some(new.namespace.clone());
    migration.metadata.owner_references = Some(vec![owner.clone()]);
    migration.metadata.labels = Some(BTreeMap::from([
        (LABEL_UID.to_string(), uid.to_string()),
        (LABEL_VOLUME.to_string(), new.volume_id.clone()),
        (
            "app.kubernetes.io/managed-by".to_string(),
            "livedisk-operator".to_string(),
        ),
    ]));
    let api: Api<DiskMigration> = Api::namespaced(client.clone(), &new.namespace);
    match api.create(&PostParams::default(), &migration).await {
        Ok(_) => Ok(Created::Now),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(Created::Before),
        Err(kube::Error::Api(s)) if s.code == 403 && s.message.contains("being terminated") => {
            Ok(Created::Refused(format!(
                "its claim's namespace {} is being deleted",
                new.namespace
            )))
        }
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(Created::Refused(format!(
            "its claim's namespace {} does not exist",
            new.namespace
        ))),
        Err(cause) => Err(Error::Apply {
            what: format!("DiskMigration {}/{}", new.namespace, new.name),
            cause,
        }),
    }
}

/// Writes a decision to the status when it changes something, and publishes the pass's Events.
async fn write(
    ctx: &EvacuationContext,
    evacuation: &DiskEvacuation,
    decision: &Decision,
    notes: &[Note],
) -> Result<(), Error> {
    let current = serde_json::to_value(evacuation).ok();
    let update = status::build(
        current.as_ref().and_then(|o| o.get("status")),
        evacuation.meta().generation,
        None,
        decision,
        k8s_openapi::jiff::Timestamp::now(),
    );
    if let Some(patch) = &update.patch {
        let api: Api<DiskEvacuation> = Api::all(ctx.client.clone());
        status::write(&api, &evacuation.name_any(), patch).await?;
        tracing::info!(evacuation = %evacuation.name_any(), phase = ?decision.phase, "status updated");
    }
    let subject = evacuation.object_ref(&());
    for note in notes {
        let kind = match note.kind {
            EventKind::Normal => EventType::Normal,
            EventKind::Warning => EventType::Warning,
        };
        let event = Event {
            type_: kind,
            reason: note.reason.into(),
            note: Some(crate::controller::event_note(&note.message)),
            action: "Evacuate".into(),
            secondary: note.related.as_ref().map(reference),
        };
        if let Err(error) = ctx.recorder.publish(&event, &subject).await {
            tracing::warn!(%error, "could not publish Event");
        }
    }
    Ok(())
}

/// The reference of an Event's related object.
fn reference(related: &Related) -> ObjectReference {
    match related {
        Related::Migration { namespace, name } => ObjectReference {
            api_version: Some(DiskMigration::api_version(&()).into_owned()),
            kind: Some(DiskMigration::kind(&()).into_owned()),
            namespace: Some(namespace.clone()),
            name: Some(name.clone()),
            ..Default::default()
        },
        Related::Volume(id) => ObjectReference {
            api_version: Some(LivediskVolume::api_version(&()).into_owned()),
            kind: Some(LivediskVolume::kind(&()).into_owned()),
            name: Some(id.clone()),
            ..Default::default()
        },
    }
}

/// For a permanent error, `Stalled=True` with the error's code as the reason (best-effort, as
/// for the namespaced kinds: `crate::failure::write_stalled`).
async fn write_stalled(ctx: &EvacuationContext, evacuation: &DiskEvacuation, error: &Error) {
    let code = error.code();
    if code.is_transient() {
        return;
    }
    let current = serde_json::to_value(evacuation).ok();
    let Some(patch) = status::stalled(
        current.as_ref().and_then(|o| o.get("status")),
        evacuation.meta().generation,
        code,
        &crate::failure::message(error),
        k8s_openapi::jiff::Timestamp::now(),
    ) else {
        return;
    };
    let api: Api<DiskEvacuation> = Api::all(ctx.client.clone());
    if let Err(status_error) = status::write(&api, &evacuation.name_any(), &patch).await {
        tracing::warn!(error = %status_error, "could not write the Stalled condition");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_migration_wakes_the_evacuation_that_owns_it_by_name_alone() {
        let migration: DiskMigration = serde_json::from_value(json!({
            "apiVersion": "livedisk.io/v1alpha1", "kind": "DiskMigration",
            "metadata": {"name": "evac-drain-0123456789", "namespace": "ns",
                         "ownerReferences": [
                             {"apiVersion": "v1", "kind": "ConfigMap", "name": "x", "uid": "1"},
                             {"apiVersion": "livedisk.io/v1alpha1", "kind": "DiskEvacuation",
                              "name": "drain", "uid": "2", "controller": true}]},
            "spec": {"persistentVolumeClaimName": "disk", "targetNodeName": "node-b"}
        }))
        .expect("a DiskMigration");
        let owner = owner(&migration).expect("owned");
        assert_eq!(owner.name, "drain");
        assert_eq!(owner.namespace, None, "a DiskEvacuation is cluster-scoped");
        let mut user = migration.clone();
        user.metadata.owner_references = None;
        assert!(super::owner(&user).is_none());
    }

    #[test]
    fn only_an_ended_evacuation_is_terminal() {
        let mut evacuation: DiskEvacuation = serde_json::from_value(json!({
            "apiVersion": "livedisk.io/v1alpha1", "kind": "DiskEvacuation",
            "metadata": {"name": "drain"}, "spec": {"nodeName": "node-a"}
        }))
        .expect("a DiskEvacuation");
        assert!(!terminal(&evacuation));
        for (phase, ended) in [
            (Phase::Pending, false),
            (Phase::Running, false),
            (Phase::Completed, true),
            (Phase::Failed, true),
            (Phase::Cancelled, true),
        ] {
            evacuation.status = Some(livedisk_api::DiskEvacuationStatus {
                phase,
                ..Default::default()
            });
            assert_eq!(terminal(&evacuation), ended, "{phase:?}");
        }
    }
}
