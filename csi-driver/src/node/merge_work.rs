//! The node's part of a `DiskMerge`: carries out a `LivediskMerge` with the engine.
//!
//! Each listed snapshot is deleted by the engine's own snapshot deletion (a merge of its layer,
//! in the object's mode), one after the other, in a background task per object: a merge runs for
//! minutes, and the reconcile must stay free to apply a changed bandwidth to the running QMP job
//! (`block-job-set-speed`), to cancel it (`job-cancel`) and to report progress from `query-jobs`.
//! Everything the task learns lives in [`RunState`]; what the status says is decided by the pure
//! [`merge_status`]. After a restart of the node plugin the engine has already finished an
//! interrupted merge job when it opened; the task then starts again with the snapshots not yet
//! merged, and a snapshot the engine no longer knows counts as merged.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use livedisk_api::Progress;
use livedisk_api::internal::{
    ErrorCode, LivediskMergeSpec, LivediskMergeStatus, MergePhase, NodeError,
};
use livedisk_engine::MergeOptions;
use livedisk_engine::{Engine, EngineError, JobInfo, MergeMode, SnapshotId};

use crate::grpc::error::node_error;

/// How often a running merge's status is refreshed: at most two writes a second.
pub const PROGRESS_INTERVAL: Duration = Duration::from_millis(500);

/// How long the task waits before it tries a step again that the engine refused for now (the
/// volume busy with an attach or a snapshot).
const BUSY_RETRY: Duration = Duration::from_secs(2);

/// The merges this node runs now, by object name.
#[derive(Default)]
pub struct Runs {
    runs: Mutex<HashMap<String, Arc<RunState>>>,
}

/// How a run ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Completed,
    Cancelled(NodeError),
    Failed(NodeError),
}

/// What one run's task and the reconciles share.
pub struct RunState {
    /// Set by a reconcile that saw `spec.cancel` (or the object's deletion).
    cancel: AtomicBool,
    /// The rate limit the next job starts with, bytes/s (0: unlimited).
    speed: AtomicU64,
    inner: Mutex<RunInner>,
}

#[derive(Default)]
struct RunInner {
    current: Option<SnapshotId>,
    merged: Vec<String>,
    /// Bytes of the jobs that finished (their last total seen).
    finished_bytes: u64,
    /// The current job's last (done, total) seen.
    current_job: (u64, u64),
    /// The last progress sample, for the rate.
    sample: Option<(Instant, u64)>,
    rate: Option<u64>,
    outcome: Option<Outcome>,
    /// Why the current step waits (the engine refused it for now), if it does.
    waiting: Option<NodeError>,
}

/// A moment's view of a run, for the status.
#[derive(Clone, Debug, PartialEq)]
pub struct RunView {
    pub current: Option<String>,
    pub merged: Vec<String>,
    pub progress: Progress,
    pub outcome: Option<Outcome>,
    /// Why the current step waits, reported while running.
    pub waiting: Option<NodeError>,
}

impl Runs {
    pub fn get(&self, name: &str) -> Option<Arc<RunState>> {
        self.lock().get(name).cloned()
    }

    /// Starts the task of `name` (unless one runs): it merges away `spec.snapshotIds` except
    /// those in `merged` already.
    pub fn start(
        &self,
        name: &str,
        engine: Arc<Engine>,
        spec: &LivediskMergeSpec,
        merged: &[String],
    ) -> Result<Arc<RunState>, NodeError> {
        let steps = steps(spec, merged)?;
        let mut runs = self.lock();
        if let Some(run) = runs.get(name) {
            return Ok(run.clone());
        }
        let run = Arc::new(RunState {
            cancel: AtomicBool::new(spec.cancel),
            speed: AtomicU64::new(speed_of(spec)),
            inner: Mutex::new(RunInner {
                merged: merged.to_vec(),
                ..Default::default()
            }),
        });
        runs.insert(name.to_string(), run.clone());
        let mode = engine_mode(spec.mode);
        tokio::spawn(run_steps(engine, run.clone(), steps, mode));
        Ok(run)
    }

    /// Forgets a run whose outcome was reported.
    pub fn remove(&self, name: &str) {
        self.lock().remove(name);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<RunState>>> {
        // A poisoned map only means a panic elsewhere; its entries are still whole.
        self.runs.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl RunState {
    fn inner(&self) -> std::sync::MutexGuard<'_, RunInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The job of the snapshot being merged now, if any.
    pub fn current_job(&self) -> Option<String> {
        self.inner().current.as_ref().map(Engine::merge_job_id)
    }

    /// Asks the task to stop; the caller cancels the running job.
    pub fn request_cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
    }

    pub fn cancel_requested(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    /// Records a new rate limit; returns whether it differs from the one in force.
    pub fn set_speed(&self, speed: u64) -> bool {
        self.speed.swap(speed, Ordering::SeqCst) != speed
    }

    /// Takes in the engine's job list and returns the view to report.
    pub fn observe(&self, jobs: &[JobInfo], now: Instant) -> RunView {
        let mut inner = self.inner();
        let job = inner.current.as_ref().map(Engine::merge_job_id);
        if let Some(info) = job.and_then(|id| jobs.iter().find(|j| j.id == id)) {
            inner.current_job = (info.current_progress, info.total_progress);
        }
        let done = inner.finished_bytes + inner.current_job.0;
        let total = inner.finished_bytes + inner.current_job.1;
        inner.rate = rate(inner.sample, (now, done)).or(inner.rate);
        inner.sample = Some((now, done));
        RunView {
            current: inner.current.as_ref().map(ToString::to_string),
            merged: inner.merged.clone(),
            progress: Progress::new(done as i64, total as i64, inner.rate.map(|r| r as i64)),
            outcome: inner.outcome.clone(),
            waiting: inner.waiting.clone(),
        }
    }
}

/// Pure: bytes per second between two samples (none over less than a tenth of a second).
pub fn rate(previous: Option<(Instant, u64)>, now: (Instant, u64)) -> Option<u64> {
    let (then, before) = previous?;
    let elapsed = now.0.checked_duration_since(then)?.as_secs_f64();
    (elapsed >= 0.1).then(|| (now.1.saturating_sub(before) as f64 / elapsed) as u64)
}

/// Pure: the snapshots still to merge, in order; an invalid ID refuses the whole object.
pub fn steps(spec: &LivediskMergeSpec, merged: &[String]) -> Result<Vec<SnapshotId>, NodeError> {
    spec.snapshot_ids
        .iter()
        .filter(|id| !merged.contains(id))
        .map(|id| {
            SnapshotId::parse(id).map_err(|e| NodeError {
                code: ErrorCode::InvalidArgument,
                message: e.to_string(),
            })
        })
        .collect()
}

/// Pure: the rate limit a spec asks for, bytes/s (0: unlimited).
pub fn speed_of(spec: &LivediskMergeSpec) -> u64 {
    spec.bandwidth_bytes_per_second
        .map(|b| b.max(0) as u64)
        .unwrap_or(0)
}

fn engine_mode(mode: livedisk_api::MergeMode) -> MergeMode {
    match mode {
        livedisk_api::MergeMode::Commit => MergeMode::Commit,
        livedisk_api::MergeMode::Stream => MergeMode::Stream,
    }
}

/// What the engine's answer to one step means for the run.
#[derive(Debug, PartialEq)]
enum StepResult {
    Merged,
    RetryLater(NodeError),
    Stop(Outcome),
}

/// Pure: one step's engine result, classified. A snapshot the engine does not know is merged
/// already (by this task before a restart, or by the engine's recovery when it opened).
fn classify(result: Result<(), &EngineError>) -> StepResult {
    match result {
        Ok(()) => StepResult::Merged,
        Err(e) if e.code() == ErrorCode::NotFound => StepResult::Merged,
        Err(e @ EngineError::Cancelled(_)) => StepResult::Stop(Outcome::Cancelled(node_error(e))),
        Err(e) if e.code().is_transient() => StepResult::RetryLater(node_error(e)),
        Err(e) => StepResult::Stop(Outcome::Failed(node_error(e))),
    }
}

async fn run_steps(
    engine: Arc<Engine>,
    run: Arc<RunState>,
    steps: Vec<SnapshotId>,
    mode: MergeMode,
) {
    let cancelled = || {
        Outcome::Cancelled(NodeError {
            code: ErrorCode::Cancelled,
            message: "cancelled before the next snapshot's merge started".into(),
        })
    };
    let mut outcome = Outcome::Completed;
    'steps: for snap in steps {
        run.inner().current = Some(snap.clone());
        loop {
            if run.cancel_requested() {
                outcome = cancelled();
                break 'steps;
            }
            let speed = run.speed.load(Ordering::SeqCst);
            let opts = MergeOptions {
                mode,
                speed: (speed > 0).then_some(speed),
            };
            let result = engine.delete_snapshot_with(&snap, opts).await;
            if let Err(error) = &result {
                tracing::info!(snapshot = %snap, %error, "merge step ended with an error");
            }
            match classify(result.as_ref().map(|_| ())) {
                StepResult::Merged => break,
                StepResult::RetryLater(why) => {
                    run.inner().waiting = Some(why);
                    tokio::time::sleep(BUSY_RETRY).await;
                }
                StepResult::Stop(o) => {
                    outcome = o;
                    break 'steps;
                }
            }
        }
        let mut inner = run.inner();
        inner.waiting = None;
        inner.finished_bytes += inner.current_job.1;
        inner.current_job = (0, 0);
        inner.merged.push(snap.to_string());
        inner.current = None;
        tracing::info!(snapshot = %snap, "snapshot merged away");
    }
    let mut inner = run.inner();
    inner.current = None;
    inner.outcome = Some(outcome);
}

/// Pure: the status to report from the previous one and what the run shows now (`None`: no run,
/// for example a cancelled object whose task never started).
pub fn merge_status(
    previous: Option<&LivediskMergeStatus>,
    generation: Option<i64>,
    view: &RunView,
    now: Timestamp,
) -> LivediskMergeStatus {
    let previous = previous.cloned().unwrap_or_default();
    let (phase, error) = match &view.outcome {
        None => (MergePhase::Running, view.waiting.clone()),
        Some(Outcome::Completed) => (MergePhase::Completed, None),
        Some(Outcome::Cancelled(e)) => (MergePhase::Cancelled, Some(e.clone())),
        Some(Outcome::Failed(e)) => (MergePhase::Failed, Some(e.clone())),
    };
    let completion_time = match phase.is_terminal() {
        true => previous.completion_time.or(Some(Time(now))),
        false => None,
    };
    LivediskMergeStatus {
        observed_generation: generation,
        phase,
        progress: Some(match phase {
            MergePhase::Completed => view.progress.clone().finished(),
            _ => view.progress.clone(),
        }),
        current_snapshot_id: view.current.clone(),
        merged: view.merged.clone(),
        start_time: previous.start_time.or(Some(Time(now))),
        completion_time,
        error,
    }
}

/// Pure: the status of an object cancelled before its task ever started (or after a restart):
/// nothing more is merged.
pub fn cancelled_before_start(
    previous: Option<&LivediskMergeStatus>,
    generation: Option<i64>,
    now: Timestamp,
) -> LivediskMergeStatus {
    let previous = previous.cloned().unwrap_or_default();
    LivediskMergeStatus {
        observed_generation: generation,
        phase: MergePhase::Cancelled,
        current_snapshot_id: None,
        completion_time: previous.completion_time.clone().or(Some(Time(now))),
        error: Some(NodeError {
            code: ErrorCode::Cancelled,
            message: "cancelled while no merge job ran".into(),
        }),
        ..previous
    }
}

/// Pure: the status of an object the node refuses to run (an invalid snapshot ID).
pub fn refused(
    previous: Option<&LivediskMergeStatus>,
    generation: Option<i64>,
    error: NodeError,
    now: Timestamp,
) -> LivediskMergeStatus {
    let previous = previous.cloned().unwrap_or_default();
    LivediskMergeStatus {
        observed_generation: generation,
        phase: MergePhase::Failed,
        completion_time: Some(Time(now)),
        error: Some(error),
        ..previous
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(ids: &[&str]) -> LivediskMergeSpec {
        LivediskMergeSpec {
            node_name: "n".into(),
            volume_id: livedisk_common::VolumeId::generate().to_string(),
            mode: livedisk_api::MergeMode::Commit,
            snapshot_ids: ids.iter().map(|s| s.to_string()).collect(),
            bandwidth_bytes_per_second: Some(-5),
            cancel: false,
        }
    }

    #[test]
    fn steps_skip_what_was_merged_and_refuse_a_bad_id() {
        let a = SnapshotId::generate().to_string();
        let b = SnapshotId::generate().to_string();
        let s = spec(&[&a, &b]);
        let left = steps(&s, std::slice::from_ref(&a)).expect("valid");
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].to_string(), b);
        let bad = steps(&spec(&["../etc"]), &[]).expect_err("not an ID");
        assert_eq!(bad.code, ErrorCode::InvalidArgument);
        assert_eq!(speed_of(&s), 0, "a negative limit is no limit");
    }

    #[test]
    fn step_results_are_classified() {
        assert_eq!(classify(Ok(())), StepResult::Merged);
        let gone = EngineError::NotFound("snapshot x".into());
        assert_eq!(classify(Err(&gone)), StepResult::Merged);
        let busy = EngineError::Busy("volume v".into());
        assert!(matches!(
            classify(Err(&busy)),
            StepResult::RetryLater(e) if e.code == ErrorCode::Aborted
        ));
        let cancelled = EngineError::Cancelled("m1".into());
        assert!(matches!(
            classify(Err(&cancelled)),
            StepResult::Stop(Outcome::Cancelled(e)) if e.code == ErrorCode::Cancelled
        ));
        let refused = EngineError::FailedPrecondition("exported".into());
        assert!(matches!(
            classify(Err(&refused)),
            StepResult::Stop(Outcome::Failed(e)) if e.code == ErrorCode::FailedPrecondition
        ));
    }

    #[test]
    fn the_rate_needs_a_tenth_of_a_second() {
        let t = Instant::now();
        assert_eq!(rate(None, (t, 5)), None);
        assert_eq!(
            rate(Some((t, 0)), (t + Duration::from_millis(50), 100)),
            None
        );
        assert_eq!(
            rate(Some((t, 0)), (t + Duration::from_secs(2), 100)),
            Some(50)
        );
    }

    #[test]
    fn status_follows_the_run_and_keeps_its_times() {
        let now = Timestamp::from_second(1_000).expect("time");
        let later = Timestamp::from_second(2_000).expect("time");
        let mut view = RunView {
            current: Some("snap-x".into()),
            merged: vec![],
            progress: Progress::new(5, 10, None),
            outcome: None,
            waiting: None,
        };
        let running = merge_status(None, Some(1), &view, now);
        assert_eq!(running.phase, MergePhase::Running);
        assert_eq!(running.progress.as_ref().map(|p| p.percent), Some(50));
        assert_eq!(running.completion_time, None);
        view.outcome = Some(Outcome::Completed);
        view.merged = vec!["snap-x".into()];
        view.current = None;
        let done = merge_status(Some(&running), Some(1), &view, later);
        assert_eq!(done.phase, MergePhase::Completed);
        assert_eq!(done.start_time, running.start_time, "start time kept");
        assert_eq!(done.completion_time, Some(Time(later)));
        assert_eq!(
            done.progress.as_ref().map(|p| p.percent),
            Some(100),
            "a completed merge is whole"
        );
        let cancelled = cancelled_before_start(Some(&running), Some(2), later);
        assert_eq!(cancelled.phase, MergePhase::Cancelled);
        assert_eq!(cancelled.start_time, running.start_time);
        let failed = refused(
            None,
            Some(1),
            NodeError {
                code: ErrorCode::InvalidArgument,
                message: "bad".into(),
            },
            now,
        );
        assert_eq!(failed.phase, MergePhase::Failed);
    }
}
