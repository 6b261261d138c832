//! Status stage: turns a decision into the object's new status and writes it when it changed.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use livedisk_api::conditions::{READY, set_condition};
use serde_json::{Value, json};

use livedisk_common::ErrorCode;

use crate::decide::{Decision, failure_conditions};
use crate::error::Error;

/// The status fields the pipeline owns, computed from the current status and a decision.
#[derive(Debug, PartialEq)]
pub struct StatusUpdate {
    /// The merge patch for the status subresource, or `None` when nothing would change.
    pub patch: Option<Value>,
    /// Whether the Ready condition's reason changed (worth an Event).
    pub ready_reason_changed: bool,
}

/// Pure: compares with the current status and builds the patch.
pub fn build(
    current_status: Option<&Value>,
    generation: Option<i64>,
    source: Option<String>,
    decision: &Decision,
    now: Timestamp,
) -> StatusUpdate {
    let mut conditions = current_conditions(current_status);
    let previous_reason =
        livedisk_api::conditions::find(&conditions, READY).map(|c| c.reason.clone());
    let mut changed = false;
    for update in &decision.conditions {
        changed |= set_condition(&mut conditions, update.clone(), generation, now);
    }
    let phase = serde_json::to_value(decision.phase).unwrap_or(Value::Null);
    let field = |name: &str| current_status.and_then(|s| s.get(name)).cloned();
    changed |= field("phase") != Some(phase.clone());
    changed |= field("observedGeneration") != generation.map(Value::from);
    if let Some(source) = &source {
        changed |= field("source").as_ref().and_then(Value::as_str) != Some(source.as_str());
    }
    // A null field clears it (merge patch): absent already counts as equal.
    for (key, value) in &decision.fields {
        changed |= field(key).unwrap_or(Value::Null) != *value;
    }
    let new_reason = livedisk_api::conditions::find(&conditions, READY).map(|c| c.reason.clone());
    let mut status = json!({
        "observedGeneration": generation,
        "phase": phase,
        "conditions": conditions,
    });
    if let Some(source) = source {
        status["source"] = Value::from(source);
    }
    for (key, value) in &decision.fields {
        status[key] = value.clone();
    }
    StatusUpdate {
        patch: changed.then(|| json!({ "status": status })),
        ready_reason_changed: previous_reason != new_reason,
    }
}

/// Pure: the patch that reports a permanent reconcile failure in the conditions (see
/// [`crate::decide::failure_conditions`]), or `None` when the status already says so. Phase and
/// kind-specific fields stay: they still describe the work that was done.
pub fn stalled(
    current_status: Option<&Value>,
    generation: Option<i64>,
    code: ErrorCode,
    message: &str,
    now: Timestamp,
) -> Option<Value> {
    let mut conditions = current_conditions(current_status);
    let mut changed = false;
    for update in failure_conditions(code, message) {
        changed |= set_condition(&mut conditions, update, generation, now);
    }
    let observed = current_status.and_then(|s| s.get("observedGeneration"));
    changed |= observed != generation.map(Value::from).as_ref();
    changed.then(
        || json!({ "status": { "observedGeneration": generation, "conditions": conditions } }),
    )
}

fn current_conditions(current_status: Option<&Value>) -> Vec<Condition> {
    current_status
        .and_then(|s| s.get("conditions"))
        .and_then(|c| serde_json::from_value(c.clone()).ok())
        .unwrap_or_default()
}

/// Writes a status patch through the status subresource.
pub async fn write<K>(api: &Api<K>, name: &str, patch: &Value) -> Result<(), Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .map(|_| ())
        .map_err(Error::UpdateStatus)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::{Observation, decide};

    fn now() -> Timestamp {
        Timestamp::from_second(1_000).expect("timestamp")
    }

    #[test]
    fn first_status_carries_generation_everywhere() {
        let decision = decide("DiskSnapshot", &Observation::default(), None);
        let update = build(
            None,
            Some(4),
            Some("PersistentVolumeClaim/a".into()),
            &decision,
            now(),
        );
        let patch = update.patch.expect("a first status is always written");
        assert_eq!(patch["status"]["observedGeneration"], 4);
        assert_eq!(patch["status"]["phase"], "Pending");
        assert_eq!(patch["status"]["source"], "PersistentVolumeClaim/a");
        let conditions = patch["status"]["conditions"]
            .as_array()
            .expect("conditions");
        assert_eq!(conditions.len(), 3);
        assert!(conditions.iter().all(|c| c["observedGeneration"] == 4));
        assert!(update.ready_reason_changed);
    }

    #[test]
    fn unchanged_status_is_not_rewritten() {
        let decision = decide("DiskSnapshot", &Observation::default(), None);
        let first = build(None, Some(1), None, &decision, now())
            .patch
            .expect("patch");
        let second = build(Some(&first["status"]), Some(1), None, &decision, now());
        assert_eq!(second.patch, None);
        assert!(!second.ready_reason_changed);
    }

    #[test]
    fn a_permanent_failure_is_written_once_and_keeps_the_phase() {
        let decision = decide("DiskSnapshot", &Observation::default(), None);
        let first = build(None, Some(1), None, &decision, now())
            .patch
            .expect("patch");
        let patch = stalled(
            Some(&first["status"]),
            Some(1),
            ErrorCode::PermissionDenied,
            "forbidden",
            now(),
        )
        .expect("the conditions change");
        assert!(patch["status"].get("phase").is_none(), "{patch}");
        let conditions = patch["status"]["conditions"].as_array().expect("list");
        let stalled_condition = conditions
            .iter()
            .find(|c| c["type"] == "Stalled")
            .expect("Stalled");
        assert_eq!(stalled_condition["status"], "True");
        assert_eq!(stalled_condition["reason"], "PermissionDenied");
        // Merged into the status, the same failure again changes nothing.
        let mut merged = first["status"].clone();
        merged["conditions"] = patch["status"]["conditions"].clone();
        assert_eq!(
            stalled(
                Some(&merged),
                Some(1),
                ErrorCode::PermissionDenied,
                "forbidden",
                now()
            ),
            None
        );
        // Once the error is gone, the next decision takes the conditions back.
        let update = build(Some(&merged), Some(1), None, &decision, now());
        assert!(update.patch.is_some());
        assert!(update.ready_reason_changed);
    }

    #[test]
    fn new_generation_is_written() {
        let decision = decide("DiskSnapshot", &Observation::default(), None);
        let first = build(None, Some(1), None, &decision, now())
            .patch
            .expect("patch");
        let second = build(Some(&first["status"]), Some(2), None, &decision, now());
        assert_eq!(
            second.patch.expect("patch")["status"]["observedGeneration"],
            2
        );
    }
}
