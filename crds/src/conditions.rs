//! Conditions as the Kubernetes API conventions and kstatus read them.
//!
//! Every livedisk object carries `Ready`, `Reconciling` and `Stalled`: GitOps tools (Flux, Argo CD
//! through kstatus) derive health from exactly these plus `status.observedGeneration`.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

/// The object's result is usable (`True`) or not yet / no longer (`False`).
pub const READY: &str = "Ready";
/// A controller is working towards the spec; kstatus reports "in progress" while `True`.
pub const RECONCILING: &str = "Reconciling";
/// Progress stopped on an error that needs a person; kstatus reports "failed" while `True`.
pub const STALLED: &str = "Stalled";

/// The status of a condition, as its API string.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    True,
    False,
    Unknown,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::True => "True",
            Status::False => "False",
            Status::Unknown => "Unknown",
        }
    }
}

/// A condition to set; the time of the transition is decided by [`set_condition`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConditionUpdate {
    pub type_: &'static str,
    pub status: Status,
    /// CamelCase, machine-readable cause (for example `WaitingForDriver`).
    pub reason: String,
    /// A sentence for people.
    pub message: String,
}

impl ConditionUpdate {
    pub fn new(
        type_: &'static str,
        status: Status,
        reason: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            type_,
            status,
            reason: reason.into(),
            message: message.into(),
        }
    }
}

/// Sets one condition in place. `lastTransitionTime` only moves when the status changes, as the
/// API conventions require; reason, message and observedGeneration are always refreshed.
/// Returns whether anything changed, so callers can skip a no-op status write.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    update: ConditionUpdate,
    observed_generation: Option<i64>,
    now: Timestamp,
) -> bool {
    let status = update.status.as_str();
    match conditions.iter_mut().find(|c| c.type_ == update.type_) {
        Some(existing) => {
            let before = existing.clone();
            if existing.status != status {
                existing.status = status.to_string();
                existing.last_transition_time = Time(now);
            }
            existing.reason = update.reason;
            existing.message = update.message;
            existing.observed_generation = observed_generation;
            *existing != before
        }
        None => {
            conditions.push(Condition {
                type_: update.type_.to_string(),
                status: status.to_string(),
                reason: update.reason,
                message: update.message,
                observed_generation,
                last_transition_time: Time(now),
            });
            true
        }
    }
}

/// The condition of the given type, if present.
pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Whether the condition of the given type is present with status `True`.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    find(conditions, type_).is_some_and(|c| c.status == "True")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(seconds).expect("valid timestamp")
    }

    #[test]
    fn new_condition_is_added_with_the_given_time() {
        let mut conditions = Vec::new();
        let changed = set_condition(
            &mut conditions,
            ConditionUpdate::new(READY, Status::False, "Waiting", "waiting"),
            Some(3),
            at(10),
        );
        assert!(changed);
        assert_eq!(conditions.len(), 1);
        assert_eq!(conditions[0].status, "False");
        assert_eq!(conditions[0].observed_generation, Some(3));
        assert_eq!(conditions[0].last_transition_time, Time(at(10)));
    }

    #[test]
    fn transition_time_moves_only_when_status_changes() {
        let mut conditions = Vec::new();
        let first = ConditionUpdate::new(READY, Status::False, "Waiting", "waiting");
        set_condition(&mut conditions, first.clone(), Some(1), at(10));
        let changed = set_condition(
            &mut conditions,
            ConditionUpdate::new(READY, Status::False, "StillWaiting", "still"),
            Some(2),
            at(20),
        );
        assert!(changed);
        assert_eq!(conditions[0].last_transition_time, Time(at(10)));
        assert_eq!(conditions[0].reason, "StillWaiting");
        set_condition(
            &mut conditions,
            ConditionUpdate::new(READY, Status::True, "Done", "done"),
            Some(2),
            at(30),
        );
        assert_eq!(conditions[0].last_transition_time, Time(at(30)));
        assert!(is_true(&conditions, READY));
    }

    #[test]
    fn identical_update_reports_no_change() {
        let mut conditions = Vec::new();
        let update = ConditionUpdate::new(STALLED, Status::False, "Ok", "fine");
        set_condition(&mut conditions, update.clone(), Some(1), at(10));
        assert!(!set_condition(&mut conditions, update, Some(1), at(99)));
    }
}
