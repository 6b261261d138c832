//! Pure lease decisions: what to write to the Lease after reading it, and whether the holder may
//! still act. No I/O and no clock reads: every instant comes in as an argument.
//!
//! Two clocks, on purpose:
//! * a candidate decides that a lease has expired by its *own monotonic* clock: the lease duration
//!   counts from the moment it last saw the record change, never from the `renewTime` written by
//!   another host's wall clock (clocks skew; a renewal that this replica has not seen yet only
//!   makes it wait longer);
//! * the holder decides that it still holds the lease by its own monotonic clock too: it acts
//!   only until `renew_deadline` after the start of its last successful renewal. A process stopped
//!   by SIGSTOP finds on SIGCONT that its monotonic clock has moved on, so it stops at once.
//!
//! The wall-clock times written into the record (`acquireTime`, `renewTime`) are for people and
//! tools reading the Lease; no decision here reads them.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::LeaseSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;

/// The three durations of leader election, as client-go names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// How long a candidate waits after it last saw the record change before it takes the lease
    /// over (written into the record as `leaseDurationSeconds`).
    pub lease_duration: Duration,
    /// How long the holder keeps acting after the start of its last successful renewal. Shorter
    /// than `lease_duration`, so the holder stops before anyone else may start.
    pub renew_deadline: Duration,
    /// The pause between two attempts to acquire or renew.
    pub retry_period: Duration,
}

impl Timing {
    /// client-go's defaults (kube-controller-manager, kube-scheduler, controller-runtime): 15 s,
    /// 10 s, 2 s.
    pub const DEFAULT: Timing = Timing {
        lease_duration: Duration::from_secs(15),
        renew_deadline: Duration::from_secs(10),
        retry_period: Duration::from_secs(2),
    };
}

/// What this replica knows of the Lease: its last record, and when (by this replica's monotonic
/// clock) that record was first seen.
#[derive(Clone, Debug, PartialEq)]
pub struct Observed {
    pub record: LeaseSpec,
    pub since: Instant,
}

/// Pure: the observation after reading `current` at `now`. The clock restarts only when the
/// record changed: an unchanged record means its holder has not renewed since.
pub fn observe(previous: Option<Observed>, current: &LeaseSpec, now: Instant) -> Observed {
    match previous {
        Some(previous) if previous.record == *current => previous,
        _ => Observed {
            record: current.clone(),
            since: now,
        },
    }
}

/// What to do after reading the Lease.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// There is no Lease yet: create it with this record.
    Create(LeaseSpec),
    /// Replace the record read with this one, guarded by the resourceVersion read (so that a
    /// concurrent writer makes this write fail instead of being overwritten): a renewal when this
    /// replica holds the lease, a takeover when the lease is free or has expired.
    Write(LeaseSpec),
    /// Another replica holds the lease and it has not expired.
    Wait { holder: String },
}

/// Pure: the holder named by a record; an empty name is no holder (a released lease).
pub fn holder(record: &LeaseSpec) -> Option<&str> {
    record.holder_identity.as_deref().filter(|h| !h.is_empty())
}

/// Pure: has the lease observed expired at `now`? Its duration is the one in the record (the
/// holder's choice; a released lease says 1 s), else `fallback`.
pub fn expired(observed: &Observed, now: Instant, fallback: Duration) -> bool {
    let duration = observed
        .record
        .lease_duration_seconds
        .and_then(|s| u64::try_from(s).ok())
        .map(Duration::from_secs)
        .unwrap_or(fallback);
    now.saturating_duration_since(observed.since) >= duration
}

/// Pure: the next step of `identity` (client-go's tryAcquireOrRenew), given what it observed of
/// the Lease (`None`: the Lease does not exist).
pub fn next_step(
    identity: &str,
    observed: Option<&Observed>,
    now: Instant,
    wall_now: Timestamp,
    timing: &Timing,
) -> Step {
    let Some(observed) = observed else {
        return Step::Create(fresh_record(identity, None, wall_now, timing));
    };
    match holder(&observed.record) {
        Some(current) if current == identity => Step::Write(LeaseSpec {
            holder_identity: Some(identity.to_string()),
            lease_duration_seconds: Some(seconds(timing.lease_duration)),
            renew_time: Some(MicroTime(wall_now)),
            ..observed.record.clone()
        }),
        Some(other) if !expired(observed, now, timing.lease_duration) => Step::Wait {
            holder: other.to_string(),
        },
        _ => Step::Write(fresh_record(
            identity,
            Some(&observed.record),
            wall_now,
            timing,
        )),
    }
}

/// Pure: the record of a takeover (or of a new Lease): this replica holds it from `wall_now`, and
/// the holder changed once more. Fields this module does not manage (`strategy`,
/// `preferredHolder`) are kept as they were.
fn fresh_record(
    identity: &str,
    previous: Option<&LeaseSpec>,
    wall_now: Timestamp,
    timing: &Timing,
) -> LeaseSpec {
    let base = previous.cloned().unwrap_or_default();
    let transitions = match previous {
        Some(previous) => previous.lease_transitions.unwrap_or(0).saturating_add(1),
        None => 0,
    };
    LeaseSpec {
        holder_identity: Some(identity.to_string()),
        lease_duration_seconds: Some(seconds(timing.lease_duration)),
        acquire_time: Some(MicroTime(wall_now)),
        renew_time: Some(MicroTime(wall_now)),
        lease_transitions: Some(transitions),
        ..base
    }
}

/// Pure: the record that gives the lease up on a clean shutdown (client-go's ReleaseOnCancel): no
/// holder and a one-second duration, so a standby takes over at its next attempt instead of
/// waiting out the whole lease.
pub fn released(current: &LeaseSpec, wall_now: Timestamp) -> LeaseSpec {
    LeaseSpec {
        holder_identity: None,
        lease_duration_seconds: Some(1),
        renew_time: Some(MicroTime(wall_now)),
        ..current.clone()
    }
}

/// Pure: does a holder whose last successful renewal started at `renewed_at` still hold the lease
/// at `now`? `renewed_at` is the instant *before* the renewal's first request, so the deadline
/// runs from no later than the moment any other replica could have seen the renewal.
pub fn still_holds(renewed_at: Option<Instant>, now: Instant, renew_deadline: Duration) -> bool {
    renewed_at.is_some_and(|at| now.saturating_duration_since(at) < renew_deadline)
}

fn seconds(duration: Duration) -> i32 {
    i32::try_from(duration.as_secs()).unwrap_or(i32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: &str = "replica-a";
    const OTHER: &str = "replica-b";

    fn wall() -> Timestamp {
        Timestamp::from_second(1_800_000_000).expect("a valid timestamp")
    }

    fn record(holder: Option<&str>, duration: i32, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(str::to_string),
            lease_duration_seconds: Some(duration),
            lease_transitions: Some(transitions),
            acquire_time: Some(MicroTime(Timestamp::UNIX_EPOCH)),
            renew_time: Some(MicroTime(Timestamp::UNIX_EPOCH)),
            ..Default::default()
        }
    }

    fn seen(record: LeaseSpec, since: Instant) -> Observed {
        Observed { record, since }
    }

    #[test]
    fn a_missing_lease_is_created_held_by_this_replica() {
        let step = next_step(ME, None, Instant::now(), wall(), &Timing::DEFAULT);
        let Step::Create(created) = step else {
            panic!("expected Create, got {step:?}")
        };
        assert_eq!(created.holder_identity.as_deref(), Some(ME));
        assert_eq!(created.lease_duration_seconds, Some(15));
        assert_eq!(created.lease_transitions, Some(0));
        assert_eq!(created.acquire_time, Some(MicroTime(wall())));
        assert_eq!(created.renew_time, Some(MicroTime(wall())));
    }

    #[test]
    fn a_live_lease_of_another_replica_is_waited_for() {
        let t0 = Instant::now();
        let observed = seen(record(Some(OTHER), 15, 3), t0);
        let now = t0 + Duration::from_secs(14);
        assert_eq!(
            next_step(ME, Some(&observed), now, wall(), &Timing::DEFAULT),
            Step::Wait {
                holder: OTHER.into()
            }
        );
    }

    #[test]
    fn an_expired_lease_is_taken_over_with_one_more_transition() {
        let t0 = Instant::now();
        let mut old = record(Some(OTHER), 15, 3);
        old.strategy = Some("OldestEmulationVersion".into());
        let observed = seen(old, t0);
        let step = next_step(
            ME,
            Some(&observed),
            t0 + Duration::from_secs(15),
            wall(),
            &Timing::DEFAULT,
        );
        let Step::Write(taken) = step else {
            panic!("expected Write, got {step:?}")
        };
        assert_eq!(taken.holder_identity.as_deref(), Some(ME));
        assert_eq!(taken.lease_transitions, Some(4));
        assert_eq!(taken.acquire_time, Some(MicroTime(wall())));
        // What this module does not manage is kept.
        assert_eq!(taken.strategy.as_deref(), Some("OldestEmulationVersion"));
    }

    #[test]
    fn expiry_uses_the_duration_written_by_the_holder() {
        let t0 = Instant::now();
        // The holder asked for 40 s: 20 s of silence is not enough, whatever our own timing says.
        let observed = seen(record(Some(OTHER), 40, 0), t0);
        let now = t0 + Duration::from_secs(20);
        assert!(!expired(&observed, now, Timing::DEFAULT.lease_duration));
        assert!(matches!(
            next_step(ME, Some(&observed), now, wall(), &Timing::DEFAULT),
            Step::Wait { .. }
        ));
        assert!(expired(
            &observed,
            t0 + Duration::from_secs(40),
            Timing::DEFAULT.lease_duration
        ));
    }

    #[test]
    fn a_released_lease_is_taken_at_once() {
        let t0 = Instant::now();
        let observed = seen(released(&record(Some(OTHER), 15, 2), wall()), t0);
        let step = next_step(ME, Some(&observed), t0, wall(), &Timing::DEFAULT);
        let Step::Write(taken) = step else {
            panic!("expected Write, got {step:?}")
        };
        assert_eq!(taken.holder_identity.as_deref(), Some(ME));
        assert_eq!(taken.lease_duration_seconds, Some(15));
        assert_eq!(taken.lease_transitions, Some(3));
        // An empty holder name (as other clients write it) is no holder either.
        let emptied = seen(record(Some(""), 15, 2), t0);
        assert!(matches!(
            next_step(ME, Some(&emptied), t0, wall(), &Timing::DEFAULT),
            Step::Write(_)
        ));
    }

    #[test]
    fn the_holder_renews_keeping_acquire_time_and_transitions() {
        let t0 = Instant::now();
        let observed = seen(record(Some(ME), 15, 5), t0);
        // However old the observation: a replica never waits for its own lease.
        let later = t0 + Duration::from_secs(60);
        let step = next_step(ME, Some(&observed), later, wall(), &Timing::DEFAULT);
        let Step::Write(renewed) = step else {
            panic!("expected Write, got {step:?}")
        };
        assert_eq!(renewed.holder_identity.as_deref(), Some(ME));
        assert_eq!(renewed.lease_transitions, Some(5));
        assert_eq!(renewed.acquire_time, Some(MicroTime(Timestamp::UNIX_EPOCH)));
        assert_eq!(renewed.renew_time, Some(MicroTime(wall())));
    }

    #[test]
    fn the_expiry_clock_restarts_only_when_the_record_changes() {
        let t0 = Instant::now();
        let first = observe(None, &record(Some(OTHER), 15, 0), t0);
        assert_eq!(first.since, t0);
        // Read again, unchanged: the holder has not renewed; the clock keeps running from t0.
        let t1 = t0 + Duration::from_secs(10);
        let unchanged = observe(Some(first.clone()), &record(Some(OTHER), 15, 0), t1);
        assert_eq!(unchanged.since, t0);
        // Renewed (a new renewTime): the holder is alive; the clock restarts.
        let mut renewed = record(Some(OTHER), 15, 0);
        renewed.renew_time = Some(MicroTime(wall()));
        let changed = observe(Some(unchanged), &renewed, t1);
        assert_eq!(changed.since, t1);
        assert!(!expired(
            &changed,
            t0 + Duration::from_secs(16),
            Timing::DEFAULT.lease_duration
        ));
    }

    #[test]
    fn the_holder_acts_only_until_the_renew_deadline() {
        let renewed = Instant::now();
        let deadline = Timing::DEFAULT.renew_deadline;
        assert!(still_holds(Some(renewed), renewed, deadline));
        assert!(still_holds(
            Some(renewed),
            renewed + Duration::from_millis(9_999),
            deadline
        ));
        // SIGSTOP for a minute, then SIGCONT: the monotonic clock has moved on.
        assert!(!still_holds(
            Some(renewed),
            renewed + Duration::from_secs(60),
            deadline
        ));
        assert!(!still_holds(Some(renewed), renewed + deadline, deadline));
        assert!(!still_holds(None, renewed, deadline));
    }

    #[test]
    fn the_holder_stops_before_anyone_may_take_over() {
        let timing = Timing::DEFAULT;
        assert!(timing.renew_deadline < timing.lease_duration);
        assert!(timing.retry_period < timing.renew_deadline);
    }

    #[test]
    fn a_release_frees_the_lease_and_keeps_its_history() {
        let current = record(Some(ME), 15, 7);
        let free = released(&current, wall());
        assert_eq!(holder(&free), None);
        assert_eq!(free.lease_duration_seconds, Some(1));
        assert_eq!(free.lease_transitions, Some(7));
        assert_eq!(free.acquire_time, current.acquire_time);
    }
}
