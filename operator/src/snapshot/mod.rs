//! The DiskSnapshot reconciler (a PersistentVolumeClaim source): look up the VolumeSnapshot of
//! the same name and refuse one that is not ours (`plan::ownership`), create it, follow it to its
//! content and to the node's snapshot for the status (`plan`, pure), and keep a finalizer
//! (kube-runtime's `finalizer()`) so that deleting the DiskSnapshot follows the deletion through:
//! `Retain` keeps the content, `Delete` waits while the node merges the layer away, with the
//! merge's progress on the status (the CSI controller publishes it as Events on the
//! VolumeSnapshot). A VirtualMachine source is taken as VolumeGroupSnapshots (`vm`).

pub mod plan;
pub mod vm;
mod watched;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::finalizer::{self, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use livedisk_api::DiskSnapshot;
use livedisk_api::snapshot::DeletionPolicy;
use serde_json::json;

use self::plan::{ContentFacts, DeletionStep, NodeSnapshotFacts, VolumeSnapshotFacts};
use self::watched::Watched;
use crate::controller::Context;
use crate::decide::{Decision, decide, decide_work};
use crate::error::Error;
use crate::kinds::LivediskKind;
use crate::{observe, standard};

/// The operator's context with the caches only the DiskSnapshot reconciler reads.
pub struct SnapshotContext {
    base: Arc<Context>,
    watched: Watched,
    /// What this process started of each VirtualMachine snapshot.
    vm_attempts: vm::Attempts,
}

impl std::ops::Deref for SnapshotContext {
    type Target = Context;
    fn deref(&self) -> &Context {
        &self.base
    }
}

/// The operator's finalizer on a DiskSnapshot: its VolumeSnapshot's deletion is followed
/// through before the object goes.
pub const FINALIZER: &str = "livedisk.io/snapshot";

/// Runs the DiskSnapshot controller until shutdown. The VolumeSnapshots, their contents and the
/// node snapshots are each watched once, for the caches the reconciler reads and to wake the
/// DiskSnapshots they concern.
pub async fn run(context: Arc<Context>) {
    let client = context.client.clone();
    let (watched, streams) = Watched::start(&client);
    let snapshots: Api<DiskSnapshot> = Api::all(client.clone());
    let controller = Controller::new(snapshots, watcher::Config::default().any_semantic())
        .with_config(
            controller::Config::default().concurrency(crate::controller::CONCURRENT_RECONCILES),
        );
    // A claim appearing (or going) wakes the DiskSnapshots of it at once.
    let store = controller.store();
    let claim_watchers = move |pvc: PartialObjectMeta<PersistentVolumeClaim>| {
        let namespace = pvc.namespace();
        let claim = pvc.name_any();
        store
            .state_filter(|s| {
                s.namespace() == namespace
                    && s.spec.source.persistent_volume_claim_name.as_deref() == Some(&claim)
            })
            .iter()
            .map(|s| ObjectRef::from_obj(s.as_ref()))
            .collect::<Vec<_>>()
    };
    // Only names matter here: a metadata watch keeps the claims' specs and statuses out.
    let claims = crate::controller::metadata_watch::<PersistentVolumeClaim>(&client);
    let store = controller.store();
    let node_snapshot_watchers = move |node: livedisk_api::internal::LivediskSnapshot| {
        Watched::disk_snapshots_of_node_snapshot(&node, &store)
    };
    let context = Arc::new(SnapshotContext {
        base: context,
        watched,
        vm_attempts: vm::Attempts::default(),
    });
    controller
        .owns_stream_with(streams.volume_snapshots, standard::volume_snapshots())
        .watches_stream_with(
            streams.contents,
            |content| Watched::disk_snapshot_of_content(&content),
            standard::volume_snapshot_contents(),
        )
        .watches_stream(streams.node_snapshots, node_snapshot_watchers)
        .watches_stream(claims, claim_watchers)
        .shutdown_on_signal()
        .run(reconcile, error_policy, context)
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!(%error, "DiskSnapshot reconcile loop reported an error");
            }
        })
        .await;
}

async fn reconcile(
    snapshot: Arc<DiskSnapshot>,
    context: Arc<SnapshotContext>,
) -> Result<Action, Error> {
    if !context.leadership.is_leader() {
        return Ok(Action::await_change());
    }
    let started = Instant::now();
    let result = match snapshot.spec.source.persistent_volume_claim_name.clone() {
        Some(claim) => reconcile_claim_snapshot(snapshot.clone(), &context, &claim).await,
        None => reconcile_vm_snapshot(snapshot.clone(), &context).await,
    };
    context
        .metrics
        .reconciled("DiskSnapshot", &result, started.elapsed());
    if let Err(error) = &result {
        crate::failure::publish_warning(&context.recorder, snapshot.as_ref(), error).await;
        crate::failure::write_stalled(&context.client, snapshot.as_ref(), error).await;
    }
    result
}

fn error_policy(snapshot: Arc<DiskSnapshot>, error: &Error, _: Arc<SnapshotContext>) -> Action {
    crate::failure::retry("DiskSnapshot", &snapshot.name_any(), error)
}

/// A DiskSnapshot of a claim: refused, waiting for its references, or under the finalizer.
async fn reconcile_claim_snapshot(
    snapshot: Arc<DiskSnapshot>,
    ctx: &SnapshotContext,
    claim: &str,
) -> Result<Action, Error> {
    let name = snapshot.name_any();
    let namespace = snapshot.namespace().unwrap_or_default();
    let span = tracing::info_span!("reconcile", kind = "DiskSnapshot", %namespace, %name);
    let _entered = span.enter();
    ctx.watched.listed().await?;
    let guarded = snapshot.finalizers().iter().any(|f| f == FINALIZER);
    let deleting = snapshot.meta().deletion_timestamp.is_some();
    if deleting && !guarded {
        // Never ours to clean up (refused, or never started).
        return Ok(Action::await_change());
    }
    if deleting {
        // The deletion is followed here, not in the finalizer's cleanup: that one may not return
        // before it is done, and a merge can take minutes.
        match deletion(&snapshot, ctx).await? {
            Some(action) => return Ok(action),
            None => return with_finalizer(snapshot, ctx, claim).await,
        }
    }
    if !guarded {
        // Before the finalizer goes on: a refused DiskSnapshot never holds up its own deletion
        // (or its namespace's).
        let uid = uid_of(&snapshot)?;
        if let Some(vs) = ctx.watched.volume_snapshot(&namespace, &name)
            && let Err(refusal) = plan::ownership(&uid, claim, &VolumeSnapshotFacts::of(&vs))
        {
            let decision = plan::refused(&refusal);
            write_status(&snapshot, ctx, &decision).await?;
            return Ok(requeue(&decision));
        }
        let observation =
            observe::observe(&ctx.caches, &ctx.client, &namespace, &snapshot.references()).await?;
        if !observation.ready_for_work() {
            let decision = decide("DiskSnapshot", &observation, None);
            write_status(&snapshot, ctx, &decision).await?;
            return Ok(requeue(&decision));
        }
    }
    with_finalizer(snapshot, ctx, claim).await
}

/// A DiskSnapshot of a VirtualMachine: waiting for its VM and the driver before the finalizer
/// goes on, then `vm::reconcile`.
async fn reconcile_vm_snapshot(
    snapshot: Arc<DiskSnapshot>,
    ctx: &SnapshotContext,
) -> Result<Action, Error> {
    let vm = snapshot
        .spec
        .source
        .virtual_machine_name
        .clone()
        .unwrap_or_default();
    let guarded = snapshot.finalizers().iter().any(|f| f == FINALIZER);
    if !guarded && snapshot.meta().deletion_timestamp.is_none() {
        let namespace = snapshot.namespace().unwrap_or_default();
        let observation =
            observe::observe(&ctx.caches, &ctx.client, &namespace, &snapshot.references()).await?;
        if !observation.ready_for_work() {
            let decision = decide("DiskSnapshot", &observation, None);
            write_status(&snapshot, ctx, &decision).await?;
            return Ok(requeue(&decision));
        }
    }
    vm::reconcile(snapshot, ctx, &vm).await
}

fn uid_of(snapshot: &DiskSnapshot) -> Result<String, Error> {
    snapshot.uid().ok_or_else(|| {
        Error::InvalidObject(format!(
            "DiskSnapshot {} has no uid yet",
            snapshot.name_any()
        ))
    })
}

fn requeue(decision: &Decision) -> Action {
    Action::requeue(Duration::from_secs(decision.requeue_seconds))
}

async fn with_finalizer(
    snapshot: Arc<DiskSnapshot>,
    ctx: &SnapshotContext,
    claim: &str,
) -> Result<Action, Error> {
    let name = snapshot.name_any();
    let namespace = snapshot.namespace().unwrap_or_default();
    let api: Api<DiskSnapshot> = Api::namespaced(ctx.client.clone(), &namespace);
    let result = finalizer(&api, FINALIZER, snapshot, |event| async move {
        match event {
            finalizer::Event::Apply(s) => apply(&s, ctx, claim).await,
            // `deletion` found nothing left to wait for.
            finalizer::Event::Cleanup(_) => Ok(Action::await_change()),
        }
    })
    .await;
    crate::finalized::settle(result, "DiskSnapshot", &namespace, &name)
}

/// Creates (or adopts) the VolumeSnapshot, keeps a Retain content retained, and reports what
/// the VolumeSnapshot, its content and the node say.
async fn apply(
    snapshot: &DiskSnapshot,
    ctx: &SnapshotContext,
    claim: &str,
) -> Result<Action, Error> {
    let name = snapshot.name_any();
    let namespace = snapshot.namespace().unwrap_or_default();
    let uid = uid_of(snapshot)?;
    let status = snapshot.status.clone().unwrap_or_default();
    let vs = match ctx.watched.volume_snapshot(&namespace, &name) {
        Some(vs) => vs,
        None if plan::volume_snapshot_lost(&status) => {
            let decision = plan::lost(&name, &status);
            write_status(snapshot, ctx, &decision).await?;
            return Ok(requeue(&decision));
        }
        None => create_volume_snapshot(snapshot, ctx, claim).await?,
    };
    let facts = VolumeSnapshotFacts::of(&vs);
    if let Err(refusal) = plan::ownership(&uid, claim, &facts) {
        let decision = plan::refused(&refusal);
        write_status(snapshot, ctx, &decision).await?;
        return Ok(requeue(&decision));
    }
    let content = match &facts.bound_content {
        Some(content) => ctx.watched.content(content).map(|c| ContentFacts::of(&c)),
        None => None,
    };
    let state = standard::volume_snapshot_state(&vs);
    if snapshot.spec.deletion_policy == DeletionPolicy::Retain
        && let Some(content) = content.as_ref().filter(|c| !c.retain)
    {
        retain_content(ctx, &content.name).await?;
    }
    let node = match content.as_ref().and_then(|c| c.snapshot_handle.as_deref()) {
        Some(handle) => node_snapshot(ctx, handle),
        None => None,
    };
    let mut decision = decide_work(&state);
    decision
        .fields
        .extend(plan::snapshot_fields(content.as_ref(), node.as_ref()));
    write_status(snapshot, ctx, &decision).await?;
    Ok(requeue(&decision))
}

/// One step of a deletion under the finalizer: `Some` to look again later, `None` when nothing
/// is left and the finalizer may come off.
async fn deletion(snapshot: &DiskSnapshot, ctx: &SnapshotContext) -> Result<Option<Action>, Error> {
    let name = snapshot.name_any();
    let namespace = snapshot.namespace().unwrap_or_default();
    let uid = uid_of(snapshot)?;
    let claim = snapshot
        .spec
        .source
        .persistent_volume_claim_name
        .clone()
        .unwrap_or_default();
    let status = snapshot.status.clone().unwrap_or_default();
    // Someone else's VolumeSnapshot of the same name is never touched.
    let vs = ctx
        .watched
        .volume_snapshot(&namespace, &name)
        .map(|vs| VolumeSnapshotFacts::of(&vs))
        .filter(|facts| plan::ownership(&uid, &claim, facts).is_ok());
    let content_name = vs
        .as_ref()
        .and_then(|v| v.bound_content.clone())
        .or(status.volume_snapshot_content_name.clone());
    let content = match &content_name {
        Some(c) => ctx.watched.content(c).map(|c| ContentFacts::of(&c)),
        None => None,
    };
    let handle = content
        .as_ref()
        .and_then(|c| c.snapshot_handle.clone())
        .or(status.snapshot_handle.clone());
    let retain = snapshot.spec.deletion_policy == DeletionPolicy::Retain;
    let node = match (&handle, retain) {
        (Some(handle), false) => node_snapshot(ctx, handle),
        _ => None,
    };
    match plan::deletion_step(retain, vs.as_ref(), content.as_ref(), node.as_ref()) {
        DeletionStep::RetainContent(content) => {
            retain_content(ctx, &content).await?;
            // The content's watch wakes this DiskSnapshot once the change is in the cache.
            Ok(Some(Action::requeue(Duration::from_secs(
                plan::DELETION_RECHECK_SECONDS,
            ))))
        }
        DeletionStep::DeleteVolumeSnapshot => {
            delete_volume_snapshot(ctx, &namespace, &name).await?;
            tracing::info!(volume_snapshot = %name, retain, "VolumeSnapshot deleted");
            Ok(Some(Action::requeue(Duration::from_secs(
                plan::DELETION_RECHECK_SECONDS,
            ))))
        }
        DeletionStep::Wait(decision) => {
            // The VolumeSnapshot's progress Events come from the CSI controller, which sees
            // every deletion (not only a DiskSnapshot's).
            write_status(snapshot, ctx, &decision).await?;
            Ok(Some(requeue(&decision)))
        }
        DeletionStep::Release => Ok(None),
    }
}

fn observe_error(what: String) -> impl FnOnce(kube::Error) -> Error {
    move |cause| Error::Observe { what, cause }
}

fn volume_snapshots(ctx: &SnapshotContext, namespace: &str) -> Api<DynamicObject> {
    Api::namespaced_with(ctx.client.clone(), namespace, &standard::volume_snapshots())
}

async fn create_volume_snapshot(
    snapshot: &DiskSnapshot,
    ctx: &SnapshotContext,
    claim: &str,
) -> Result<DynamicObject, Error> {
    let name = snapshot.name_any();
    let namespace = snapshot.namespace().unwrap_or_default();
    let what = format!("VolumeSnapshot {namespace}/{name}");
    let owner = snapshot
        .controller_owner_ref(&())
        .ok_or_else(|| Error::InvalidObject(format!("DiskSnapshot {name} has no uid yet")))?;
    let desired: DynamicObject = serde_json::from_value(standard::volume_snapshot(
        &name,
        claim,
        snapshot.spec.snapshot_class_name.as_deref(),
        owner,
    ))
    .map_err(|source| Error::Build {
        what: what.clone(),
        source,
    })?;
    let api = volume_snapshots(ctx, &namespace);
    match api.create(&PostParams::default(), &desired).await {
        Ok(created) => {
            tracing::info!(volume_snapshot = %name, "VolumeSnapshot created");
            Ok(created)
        }
        // Made meanwhile (by a pass whose answer was lost, or by someone else): the ownership
        // check that follows decides.
        Err(kube::Error::Api(s)) if s.code == 409 => {
            api.get(&name).await.map_err(observe_error(what))
        }
        Err(cause) => Err(Error::Apply { what, cause }),
    }
}

async fn delete_volume_snapshot(
    ctx: &SnapshotContext,
    namespace: &str,
    name: &str,
) -> Result<(), Error> {
    match volume_snapshots(ctx, namespace)
        .delete(name, &DeleteParams::background())
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(cause) => Err(Error::Apply {
            what: format!("deleting VolumeSnapshot {namespace}/{name}"),
            cause,
        }),
    }
}

/// Retain is a property of the bound content: set there, deleting the VolumeSnapshot keeps the
/// storage snapshot.
async fn retain_content(ctx: &SnapshotContext, content: &str) -> Result<(), Error> {
    let contents: Api<DynamicObject> =
        Api::all_with(ctx.client.clone(), &standard::volume_snapshot_contents());
    let patch = json!({ "spec": { "deletionPolicy": "Retain" } });
    contents
        .patch(content, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(|_| ())
        .map_err(|cause| Error::Apply {
            what: format!("VolumeSnapshotContent {content}"),
            cause,
        })
}

/// The node's view of a snapshot (its `LivediskSnapshot`), while it exists.
fn node_snapshot(ctx: &SnapshotContext, handle: &str) -> Option<NodeSnapshotFacts> {
    ctx.watched.node_snapshot(handle).map(|s| {
        let status = s.status.unwrap_or_default();
        NodeSnapshotFacts {
            allocated_bytes: status.allocated_bytes,
            progress: status.progress,
        }
    })
}

async fn write_status(
    snapshot: &DiskSnapshot,
    ctx: &SnapshotContext,
    decision: &Decision,
) -> Result<(), Error> {
    let source = snapshot.source_description();
    crate::finalized::write_status(&ctx.client, &ctx.recorder, snapshot, source, decision).await
}
