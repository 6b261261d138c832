//! What the reconcilers that hold a finalizer (DiskMerge, DiskRestore, DiskSnapshot) share: how
//! the outcome of kube-runtime's `finalizer()` becomes theirs, and how a decision is written to
//! the status and announced as an Event.

use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::finalizer;
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::decide::{Decision, EventKind};
use crate::error::Error;
use crate::status;

/// The outcome of a `finalizer()` pass over the `kind` object `namespace/name`.
pub fn settle(
    result: Result<Action, finalizer::Error<Error>>,
    kind: &str,
    namespace: &str,
    name: &str,
) -> Result<Action, Error> {
    match result {
        // A second pass over an object whose deletion the first one finished (from a cache that
        // had not seen it go): nothing is left to do.
        Err(finalizer::Error::AddFinalizer(kube::Error::Api(s)))
        | Err(finalizer::Error::RemoveFinalizer(kube::Error::Api(s)))
            if s.code == 404 =>
        {
            Ok(Action::await_change())
        }
        // The finalizer patch tests the list it read: a pass that ran on a cache not yet showing
        // the previous pass's change gets 422. Nothing is wrong; look again once it caught up.
        Err(finalizer::Error::AddFinalizer(kube::Error::Api(s)))
        | Err(finalizer::Error::RemoveFinalizer(kube::Error::Api(s)))
            if s.code == 422 =>
        {
            tracing::debug!("finalizer patch of a stale copy refused; looking again");
            Ok(Action::requeue(Duration::from_secs(1)))
        }
        other => other.map_err(|e| match e {
            finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => e,
            finalizer::Error::AddFinalizer(cause) | finalizer::Error::RemoveFinalizer(cause) => {
                Error::Apply {
                    what: format!("the finalizer of {kind} {namespace}/{name}"),
                    cause,
                }
            }
            other => Error::InvalidObject(other.to_string()),
        }),
    }
}

/// Publishes an Event about `subject` (best-effort: a failure is logged).
pub async fn publish(
    recorder: &Recorder,
    subject: &ObjectReference,
    type_: EventType,
    reason: &str,
    note: &str,
    action: &str,
) {
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(crate::controller::event_note(note)),
        action: action.into(),
        secondary: None,
    };
    if let Err(error) = recorder.publish(&event, subject).await {
        tracing::warn!(%error, "could not publish Event");
    }
}

/// Writes a decision to the object's status when it changes something, and publishes an Event
/// when the Ready reason changed.
pub async fn write_status<K>(
    client: &Client,
    recorder: &Recorder,
    object: &K,
    source: Option<String>,
    decision: &Decision,
) -> Result<(), Error>
where
    K: Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
        + Clone
        + Serialize
        + DeserializeOwned
        + std::fmt::Debug,
{
    let current = serde_json::to_value(object).ok();
    let update = status::build(
        current.as_ref().and_then(|o| o.get("status")),
        object.meta().generation,
        source,
        decision,
        k8s_openapi::jiff::Timestamp::now(),
    );
    if let Some(patch) = &update.patch {
        let api: Api<K> = Api::namespaced(client.clone(), &object.namespace().unwrap_or_default());
        status::write(&api, &object.name_any(), patch).await?;
        tracing::info!(phase = ?decision.phase, "status updated");
    }
    if update.ready_reason_changed
        && let Some(ready) = decision
            .conditions
            .iter()
            .find(|c| c.type_ == livedisk_api::conditions::READY)
    {
        let kind = match decision.event {
            EventKind::Normal => EventType::Normal,
            EventKind::Warning => EventType::Warning,
        };
        let subject = object.object_ref(&());
        publish(
            recorder,
            &subject,
            kind,
            &ready.reason,
            &ready.message,
            "Reconcile",
        )
        .await;
    }
    Ok(())
}
