//! Runs one kube-runtime Controller per livedisk kind, all sharing the same pipeline:
//! dereference (observe) → decide (pure) → update status → publish an Event on a change.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::core::DeserializeGuard;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use livedisk_api::{DiskExport, DiskMerge, DiskMigration, DiskRestore, DiskSnapshot};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::decide::{EventKind, decide};
use crate::error::Error;
use crate::kinds::{LivediskKind, Reference};
use crate::observe::{self, Caches};
use crate::{standard, status};
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::runtime::reflector::{ObjectRef, Store};

pub struct Context {
    client: Client,
    recorder: Recorder,
    caches: Caches,
}

/// Runs the controllers of all kinds until the process is stopped.
pub async fn run_all(client: Client, reporter: Reporter) -> Result<(), Error> {
    let caches = Caches::start(&client).await?;
    let context = Arc::new(Context {
        recorder: Recorder::new(client.clone(), reporter),
        client: client.clone(),
        caches,
    });
    tokio::join!(
        run::<DiskSnapshot>(context.clone()),
        run::<DiskMerge>(context.clone()),
        run::<DiskMigration>(context.clone()),
        run::<DiskExport>(context.clone()),
        run::<DiskRestore>(context),
    );
    Ok(())
}

async fn run<K>(context: Arc<Context>)
where
    K: Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
        + LivediskKind
        + Clone
        + DeserializeOwned
        + Serialize
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let api: Api<DeserializeGuard<K>> = Api::all(context.client.clone());
    let controller = Controller::new(api, watcher::Config::default().any_semantic());
    // A referenced PVC or DiskSnapshot appearing (or going) triggers the objects that name it at
    // once, instead of waiting for the periodic requeue.
    let store = controller.store();
    let pvc_watchers = move |pvc: PersistentVolumeClaim| {
        referrers(&store, &pvc, |name| {
            Reference::PersistentVolumeClaim(name.to_string())
        })
    };
    let store = controller.store();
    let snapshot_watchers = move |snapshot: DiskSnapshot| {
        referrers(&store, &snapshot, |name| {
            Reference::DiskSnapshot(name.to_string())
        })
    };
    controller
        .watches(
            Api::all(context.client.clone()),
            watcher::Config::default().any_semantic(),
            pvc_watchers,
        )
        .watches(
            Api::all(context.client.clone()),
            watcher::Config::default().any_semantic(),
            snapshot_watchers,
        )
        .shutdown_on_signal()
        .run(reconcile::<K>, error_policy::<K>, context)
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!(%error, kind = %K::kind(&()), "reconcile loop reported an error");
            }
        })
        .await;
}

async fn reconcile<K>(
    guarded: Arc<DeserializeGuard<K>>,
    context: Arc<Context>,
) -> Result<Action, Error>
where
    K: Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
        + LivediskKind
        + Clone
        + DeserializeOwned
        + Serialize
        + std::fmt::Debug,
{
    let object = match &guarded.0 {
        Ok(object) => object,
        // One unreadable object must not stall the others: report it and move on.
        Err(invalid) => return Err(Error::InvalidObject(invalid.to_string())),
    };
    let kind = K::kind(&()).to_string();
    let name = object.name_any();
    let namespace = object.namespace().unwrap_or_default();
    let span = tracing::info_span!("reconcile", %kind, %namespace, %name);
    let _entered = span.enter();

    let observation = observe::observe(
        &context.caches,
        &context.client,
        &namespace,
        &object.references(),
    )
    .await?;
    let work_state = match object.work() {
        Some(work) if observation.ready_for_work() => {
            let owner = object
                .controller_owner_ref(&())
                .ok_or_else(|| Error::InvalidObject(format!("{kind} {name} has no uid yet")))?;
            Some(standard::ensure(&context.client, &namespace, &name, owner, &work).await?)
        }
        _ => None,
    };
    let decision = decide(&kind, &observation, work_state.as_ref());
    let current = serde_json::to_value(object).ok();
    let update = status::build(
        current.as_ref().and_then(|o| o.get("status")),
        object.meta().generation,
        object.source_description(),
        &decision,
        k8s_openapi::jiff::Timestamp::now(),
    );
    if let Some(patch) = &update.patch {
        let api: Api<K> = Api::namespaced(context.client.clone(), &namespace);
        status::write(&api, &name, patch).await?;
        tracing::info!(phase = ?decision.phase, "status updated");
    }
    if update.ready_reason_changed
        && let Some(ready) = decision
            .conditions
            .iter()
            .find(|c| c.type_ == livedisk_api::conditions::READY)
    {
        let event = Event {
            type_: match decision.event {
                EventKind::Normal => EventType::Normal,
                EventKind::Warning => EventType::Warning,
            },
            reason: ready.reason.clone(),
            note: Some(ready.message.clone()),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(error) = context
            .recorder
            .publish(&event, &object.object_ref(&()))
            .await
        {
            tracing::warn!(%error, "could not publish Event");
        }
    }
    Ok(Action::requeue(Duration::from_secs(
        decision.requeue_seconds,
    )))
}

/// The objects in the store that refer to `referenced` (same namespace, same name).
fn referrers<K, R>(
    store: &Store<DeserializeGuard<K>>,
    referenced: &R,
    as_reference: impl Fn(&str) -> Reference,
) -> Vec<ObjectRef<DeserializeGuard<K>>>
where
    K: Resource<DynamicType = ()> + LivediskKind + Clone,
    R: Resource,
{
    let namespace = referenced.namespace();
    let reference = as_reference(&referenced.name_any());
    store
        .state()
        .iter()
        .filter_map(|guarded| guarded.0.as_ref().ok())
        .filter(|object| {
            object.namespace() == namespace && object.references().contains(&reference)
        })
        .map(|object| {
            ObjectRef::new(&object.name_any()).within(&object.namespace().unwrap_or_default())
        })
        .collect()
}

fn error_policy<K>(
    guarded: Arc<DeserializeGuard<K>>,
    error: &Error,
    _context: Arc<Context>,
) -> Action
where
    K: Resource<DynamicType = ()>,
{
    let name = guarded
        .0
        .as_ref()
        .map(|o| o.name_any())
        .unwrap_or_else(|invalid| invalid.metadata.name.clone().unwrap_or_default());
    tracing::warn!(kind = %K::kind(&()), %name, reason = error.reason(), %error, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(15))
}
