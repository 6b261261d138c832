//! What a failed reconcile leaves behind. On its object, so the failure is seen where the object
//! is looked at: a Warning Event, and for a permanent error a Stalled condition (both
//! best-effort: the error itself goes back to the controller either way, and a failure to report
//! it is only logged). In the log, and as when it is retried: the error policy.

use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::events::{EventType, Recorder};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::Error;
use crate::status;

/// Pure: what a failed reconcile says about itself: the whole error chain, then how it is retried.
pub(crate) fn message(error: &Error) -> String {
    format!(
        "{}; {}",
        livedisk_common::error_chain(error),
        error.code().retry_note()
    )
}

/// Publishes a failed reconcile as a Warning Event on `object` (reason: the error's code;
/// action: the stage that failed; note: [`message`]).
pub(crate) async fn publish_warning<K>(recorder: &Recorder, object: &K, error: &Error)
where
    K: Resource<DynamicType = ()>,
{
    crate::finalized::publish(
        recorder,
        &object.object_ref(&()),
        EventType::Warning,
        error.code().reason(),
        &message(error),
        error.action(),
    )
    .await;
}

/// For a permanent error, sets `Stalled=True` on `object` with the error's code as the reason.
/// A transient error is retried soon and usually gone by then: the conditions keep saying what
/// the last successful pass found, rather than flapping.
pub(crate) async fn write_stalled<K>(client: &Client, object: &K, error: &Error)
where
    K: Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Serialize
        + std::fmt::Debug,
{
    let code = error.code();
    if code.is_transient() {
        return;
    }
    let current = serde_json::to_value(object).ok();
    let Some(patch) = status::stalled(
        current.as_ref().and_then(|o| o.get("status")),
        object.meta().generation,
        code,
        &message(error),
        k8s_openapi::jiff::Timestamp::now(),
    ) else {
        return;
    };
    let api: Api<K> = Api::namespaced(client.clone(), &object.namespace().unwrap_or_default());
    if let Err(status_error) = status::write(&api, &object.name_any(), &patch).await {
        tracing::warn!(error = %status_error, "could not write the Stalled condition");
    }
}

/// The error policy of a failed reconcile of the `kind` object `name`: logged, then retried soon
/// for a transient error and slowly for a permanent one (see `ErrorCode::persistence`).
pub(crate) fn retry(kind: &str, name: &str, error: &Error) -> Action {
    let code = error.code();
    tracing::warn!(
        %kind,
        %name,
        %code,
        action = error.action(),
        error = %livedisk_common::error_chain(error),
        "reconcile failed: {}",
        code.retry_note()
    );
    Action::requeue(code.retry_after())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_failure_message_says_how_it_is_retried() {
        let error = Error::InvalidObject("missing field `spec`".into());
        let message = message(&error);
        assert!(message.contains("missing field `spec`"), "{message}");
        assert!(message.contains("until something is changed"), "{message}");
    }
}
