//! Runs admin commands. Read-only commands read the pool's records directly
//! and never touch the daemon, so they work while a node plugin holds it;
//! commands that change something open an engine on the daemon's admin
//! monitor (`Engine::open_admin`: it re-attaches to the daemon, or starts it
//! when none runs) and go through its operations, beside a running node
//! plugin: per-volume locks keep the two off each other's volumes, and the
//! node plugin's engine finishes what a command leaves running (a merge).

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use livedisk_engine::daemon::{Daemon, Origin, RuntimeDir, pid_alive};
use livedisk_engine::qmp::{Greeting, probe};
use livedisk_engine::qmp::{JobInfo, Qmp, query_jobs};
use livedisk_engine::record::{RECORD_FILE, RecordStore, VolumeRecord};
use livedisk_engine::{
    Engine, EngineConfig, EngineError, ExtentPage, MergeMode, MergeOptions, Monitor, Recovery,
    SnapshotId, VolumeId, extents, plan,
};
use serde_json::{Value, json};

use super::args::{AdminArgs, AdminCmd, PageArgs};
use super::exit::{CliError, ExitClass};
use super::views::{self, DaemonFacts, LayerFile, Out};

pub async fn run(a: &AdminArgs) -> Result<Out> {
    let store = RecordStore::new(&a.pool);
    let runtime = RuntimeDir::new(&a.runtime_dir);
    match &a.cmd {
        AdminCmd::Info => info(a, &store, &runtime).await,
        AdminCmd::Volumes => Ok(views::volumes(&all_records(&store)?)),
        AdminCmd::Stop { force } => stop(&store, &runtime, *force).await,
        AdminCmd::Chain { volume } => {
            let rec = load(&store, volume)?;
            let files = rec
                .layers
                .iter()
                .map(|l| {
                    layer_file(
                        &store
                            .volume_dir(volume)
                            .join(VolumeRecord::layer_file(l.seq)),
                    )
                })
                .collect::<Vec<_>>();
            Ok(views::chain(&rec, &files))
        }
        AdminCmd::Record { volume } => record(&store, volume),
        AdminCmd::Snapshots { volume } => Ok(views::snapshots(&load(&store, volume)?)),
        AdminCmd::Jobs => {
            let qmp = monitor(&runtime).await?;
            Ok(views::jobs(&query_jobs(&qmp).await.context("query-jobs")?))
        }
        AdminCmd::Exports => {
            let qmp = monitor(&runtime).await?;
            let v = qmp
                .execute("query-block-exports", json!({}))
                .await
                .context("query-block-exports")?;
            let live: HashSet<String> = v
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|e| e.get("id").and_then(Value::as_str).map(str::to_owned))
                .collect();
            Ok(views::exports(
                &all_records(&store)?,
                &live,
                &runtime.nbd_socket(),
            ))
        }
        AdminCmd::Allocated { snapshot, page } => {
            let rec = locate(&store, snapshot)?;
            let list = plan::allocated(&rec, snapshot).map_err(EngineError::from)?;
            Ok(views::extent_page(&page_of(&rec, &list, *page)))
        }
        AdminCmd::Delta { base, target, page } => {
            let rec = locate(&store, target)?;
            // A deleted base answers while its tombstone lasts, as in the engine.
            if rec.snapshot(base).is_none() && rec.tombstone(base).is_none() {
                let other = locate(&store, base)?;
                return Err(EngineError::InvalidArgument(format!(
                    "base snapshot {base} belongs to volume {}, not to {}",
                    other.id, rec.id
                ))
                .into());
            }
            let list = plan::delta(&rec, base, target).map_err(EngineError::from)?;
            Ok(views::extent_page(&page_of(&rec, &list, *page)))
        }
        cmd => {
            // Known before the engine opens: opening finishes interrupted
            // merges, after which "not found" means "done".
            let known = match cmd {
                AdminCmd::DeleteSnapshot { snapshot, .. } => locate(&store, snapshot).is_ok(),
                _ => false,
            };
            mutate(a, cmd, known).await
        }
    }
}

async fn mutate(a: &AdminArgs, cmd: &AdminCmd, known: bool) -> Result<Out> {
    // `start` is the explicit "bring everything in line": it also restarts
    // interrupted or cancelled merges and waits for them. Every other
    // command only recovers what nobody holds and never waits for a merge.
    let recovery = match cmd {
        AdminCmd::Start => Recovery::Full,
        _ => Recovery::Light,
    };
    let engine = Engine::open_admin(
        EngineConfig {
            pool: a.pool.clone(),
            runtime_dir: a.runtime_dir.clone(),
        },
        recovery,
        a.engine_daemon.into(),
    )
    .await
    .context("opening the engine")?;
    for (vol, e) in engine.recovery_errors() {
        eprintln!("warning: volume {vol} not recovered: {e}");
    }
    let out = run_mutation(a, &engine, cmd, known).await;
    // The deleted layers leave their directories at once and are unlinked
    // in the background: wait for that, so the command leaves no garbage.
    engine.reclaimed().await;
    out
}

async fn run_mutation(a: &AdminArgs, engine: &Engine, cmd: &AdminCmd, known: bool) -> Result<Out> {
    match cmd {
        AdminCmd::Start => {
            let d = engine.daemon();
            Ok(views::message(
                format!(
                    "engine daemon pid {} ({:?}); {} volumes reconciled",
                    d.pid.map_or("unknown".into(), |p| p.to_string()),
                    d.origin,
                    engine.list_volumes().map(|v| v.len()).unwrap_or(0)
                ),
                json!({ "pid": d.pid, "origin": format!("{:?}", d.origin).to_lowercase() }),
            ))
        }
        AdminCmd::CreateVolume { size, id } => {
            let id = id.clone().unwrap_or_else(VolumeId::generate);
            let v = engine
                .create_volume(&id, *size)
                .await
                .with_context(|| format!("creating volume {id}"))?;
            Ok(views::volume_created(&v))
        }
        AdminCmd::Snapshot { volumes, id } => {
            if id.is_some() && volumes.len() > 1 {
                return Err(CliError::new(
                    ExitClass::InvalidArgument,
                    "--id names one snapshot; give one volume or let IDs be generated",
                )
                .into());
            }
            let pairs: Vec<(VolumeId, SnapshotId)> = volumes
                .iter()
                .map(|v| (v.clone(), id.clone().unwrap_or_else(SnapshotId::generate)))
                .collect();
            let (list, t) = engine
                .create_snapshots(&pairs)
                .await
                .context("snapshot transaction")?;
            // A short-lived process: the extent records are captured before
            // it exits (timings above are the snapshot's own).
            for v in volumes.iter() {
                engine
                    .capture_extents(v)
                    .await
                    .with_context(|| format!("capturing the extent records of {v}"))?;
            }
            Ok(views::snapshots_created(
                &list,
                t.transaction.as_secs_f64() * 1e3,
                t.total.as_secs_f64() * 1e3,
            ))
        }
        AdminCmd::DeleteSnapshot {
            snapshot,
            speed,
            wait,
        } => {
            if known && locate(&RecordStore::new(&a.pool), snapshot).is_err() {
                return Ok(views::message(
                    format!("deleted snapshot {snapshot} (finished an interrupted merge)"),
                    json!({ "snapshot": snapshot, "deleted": true }),
                ));
            }
            delete_snapshot(engine, snapshot, *speed, *wait).await
        }
        AdminCmd::SetSpeed { job, speed } => {
            engine
                .set_job_speed(job, *speed)
                .await
                .with_context(|| format!("setting the speed of job {job}"))?;
            Ok(views::message(
                format!("job {job}: speed {speed} B/s"),
                json!({ "job": job, "speed": speed }),
            ))
        }
        AdminCmd::Cancel { job } => {
            engine
                .cancel_job(job)
                .await
                .with_context(|| format!("cancelling job {job}"))?;
            let status = settle_cancelled(engine, job).await?;
            Ok(views::message(
                match &status {
                    None => format!("job {job}: cancelled"),
                    Some(s) => format!("job {job}: cancel requested ({s})"),
                },
                json!({ "job": job, "cancelled": true, "status": status }),
            ))
        }
        AdminCmd::DeleteVolume { volume } => {
            engine
                .delete_volume(volume)
                .await
                .with_context(|| format!("deleting volume {volume}"))?;
            Ok(views::message(
                format!("deleted volume {volume}"),
                json!({ "volume": volume, "deleted": true }),
            ))
        }
        AdminCmd::Export {
            snapshot,
            changed_since,
        } => {
            let e = match changed_since {
                Some(base) => engine
                    .export_snapshot_changed_since(snapshot, base)
                    .await
                    .with_context(|| {
                        format!("exporting snapshot {snapshot} changed since {base}")
                    })?,
                None => engine
                    .export_snapshot(snapshot)
                    .await
                    .with_context(|| format!("exporting snapshot {snapshot}"))?,
            };
            Ok(views::export_started(&e))
        }
        AdminCmd::Revert { volume, snapshot } => {
            let t = std::time::Instant::now();
            let v = engine
                .revert_volume(volume, snapshot)
                .await
                .with_context(|| format!("reverting volume {volume} to snapshot {snapshot}"))?;
            Ok(views::reverted(
                &v,
                snapshot,
                t.elapsed().as_secs_f64() * 1e3,
            ))
        }
        AdminCmd::Unexport { snapshot } => {
            engine
                .unexport_snapshot(snapshot)
                .await
                .with_context(|| format!("stopping the export of snapshot {snapshot}"))?;
            Ok(views::message(
                format!("export of {snapshot} stopped"),
                json!({ "snapshot": snapshot, "exported": false }),
            ))
        }
        AdminCmd::Attach { volume } => {
            let e = engine
                .attach_volume(volume)
                .await
                .with_context(|| format!("attaching volume {volume}"))?;
            Ok(views::export_started(&e))
        }
        AdminCmd::Detach { volume } => {
            engine
                .detach_volume(volume)
                .await
                .with_context(|| format!("detaching volume {volume}"))?;
            Ok(views::message(
                format!("volume {volume} detached"),
                json!({ "volume": volume, "attached": false }),
            ))
        }
        _ => Err(CliError::new(ExitClass::Internal, "command not routed").into()),
    }
}

/// Waits (bounded) until a cancelled job is gone: whoever drives it (a
/// waiting merge in the node plugin or another command) dismisses it, and a
/// merge nobody waits for is dismissed here (`recover_idle`), so the next
/// command finds the volume settled (snapshot `deleting`, merge in flight
/// without a job). Returns the job's status if it is still there.
/// The daemon's view of one job, if it still has it.
async fn job_info(engine: &Engine, job: &str) -> Result<Option<JobInfo>> {
    Ok(engine
        .jobs()
        .await
        .context("query-jobs")?
        .into_iter()
        .find(|j| j.id == job))
}

async fn settle_cancelled(engine: &Engine, job: &str) -> Result<Option<String>> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    // Backing off: a pass of `recover_idle` reads every record of the pool,
    // and a volume someone else holds stays so for a while.
    let mut delay = Duration::from_millis(50);
    loop {
        let status = job_info(engine, job).await?.map(|j| j.status);
        match status.as_deref() {
            None => return Ok(None),
            Some("concluded") => {
                engine
                    .recover_idle()
                    .await
                    .context("recording the cancel")?;
            }
            Some(_) => {}
        }
        if std::time::Instant::now() > deadline {
            return Ok(status);
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(1));
    }
}

/// Starts the merge and, unless `wait`, returns once the daemon runs
/// the job: the job goes on in the daemon and the record marks it in
/// flight; when it concludes the node plugin's engine (its adopter) finishes
/// it, or else the next admin command or `delete-snapshot --wait`.
async fn delete_snapshot(
    engine: &Engine,
    snap: &SnapshotId,
    speed: Option<u64>,
    wait: bool,
) -> Result<Out> {
    let job = Engine::merge_job_id(snap);
    if !wait {
        // Takes the volume (Busy if another process holds it: then the job
        // seen in the daemon would be that process's, not ours), starts the
        // job and lets the volume go.
        engine
            .start_snapshot_delete(
                snap,
                MergeOptions {
                    mode: MergeMode::Commit,
                    speed,
                },
            )
            .await
            .with_context(|| format!("deleting snapshot {snap}"))?;
        let status = job_info(engine, &job).await?.map(|j| j.status);
        match status {
            // Pending: copied, waiting for its finisher (see below).
            Some(s) if s != "concluded" && s != "pending" => {
                return Ok(views::message(
                    format!(
                        "merge job {job} started for snapshot {snap} ({s}); follow it with `admin jobs`"
                    ),
                    json!({ "snapshot": snap, "job": job, "status": s, "deleted": false }),
                ));
            }
            // No job (nothing to copy, done already) or one that ended
            // already: finish it below rather than leave it to others.
            _ => {}
        }
    }
    let merge = engine.delete_snapshot(snap, speed);
    tokio::pin!(merge);
    let mut last_report = std::time::Instant::now();
    loop {
        let result = tokio::select! {
            r = &mut merge => Some(r),
            () = tokio::time::sleep(Duration::from_secs(1)) => None,
        };
        if let Some(r) = result {
            match r {
                Ok(()) => {}
                // Our own quick merge that another engine (the node plugin's
                // adopter) finished first: the snapshot is gone.
                Err(EngineError::NotFound(_)) if !wait => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("deleting snapshot {snap}"));
                }
            }
            return Ok(views::message(
                format!("deleted snapshot {snap}"),
                json!({ "snapshot": snap, "deleted": true }),
            ));
        }
        let running = job_info(engine, &job).await?;
        if let Some(j) = running
            && last_report.elapsed() >= Duration::from_secs(1)
        {
            eprintln!(
                "{job}: {} {}",
                j.status,
                views::percent(j.current_progress, j.total_progress)
            );
            last_report = std::time::Instant::now();
        }
    }
}

fn page_of(rec: &VolumeRecord, list: &[extents::Extent], p: PageArgs) -> ExtentPage {
    let max = if p.max == 0 { usize::MAX } else { p.max };
    ExtentPage {
        volume_size: rec.size,
        extents: extents::page(list, p.start, max),
    }
}

fn layer_file(path: &Path) -> LayerFile {
    LayerFile {
        path: path.display().to_string(),
        disk_usage: std::fs::metadata(path).ok().map(|m| m.blocks() * 512),
    }
}

fn all_records(store: &RecordStore) -> Result<Vec<VolumeRecord>> {
    let mut out = vec![];
    for id in store.list().map_err(EngineError::from)? {
        if let Some(r) = store.load(&id).map_err(EngineError::from)? {
            out.push(r);
        }
    }
    Ok(out)
}

fn load(store: &RecordStore, id: &VolumeId) -> Result<VolumeRecord> {
    store
        .load(id)
        .map_err(EngineError::from)?
        .ok_or_else(|| EngineError::NotFound(format!("volume {id}")).into())
}

fn locate(store: &RecordStore, snap: &SnapshotId) -> Result<VolumeRecord> {
    all_records(store)?
        .into_iter()
        .find(|r| r.snapshot(snap).is_some())
        .ok_or_else(|| EngineError::NotFound(format!("snapshot {snap}")).into())
}

fn record(store: &RecordStore, id: &VolumeId) -> Result<Out> {
    let path = store.volume_dir(id).join(RECORD_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(EngineError::NotFound(format!("volume {id}")).into());
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let v: Value = serde_json::from_slice(&bytes)
        .with_context(|| format!("record {} is not JSON", path.display()))?;
    let text = serde_json::to_string_pretty(&v).context("formatting the record")?;
    Ok(Out {
        text: format!("{text}\n"),
        json: v,
    })
}

/// A QMP session on the running daemon, without starting one: its admin monitor when it has one
/// (daemons the engine starts do), so that queries work while the node plugin holds the main
/// monitor; else the main monitor, which fails fast while another engine process holds it.
async fn monitor(runtime: &RuntimeDir) -> Result<Qmp> {
    let sock = if runtime.admin_socket().exists() {
        runtime.admin_socket()
    } else {
        runtime.qmp_socket()
    };
    if !sock.exists() {
        return Err(CliError::new(
            ExitClass::Unavailable,
            format!("no engine daemon: {} does not exist", sock.display()),
        )
        .into());
    }
    match tokio::time::timeout(Duration::from_secs(3), Qmp::connect(&sock)).await {
        Ok(r) => Ok(r.map_err(EngineError::from).context("connecting to the engine daemon")?),
        Err(_) => Err(CliError::new(
            ExitClass::Unavailable,
            format!(
                "the engine daemon's monitor {} does not answer (another engine process may hold it)",
                sock.display()
            ),
        )
        .into()),
    }
}

async fn stop(store: &RecordStore, runtime: &RuntimeDir, force: bool) -> Result<Out> {
    // The node plugin's engine holds the main monitor while it runs: the
    // daemon is its, and killing it would stop every volume's I/O under it
    // (its engine does not reconnect by itself). Not even with --force.
    if probe(&runtime.qmp_socket(), Duration::from_secs(1)).await == Greeting::Held {
        return Err(CliError::new(
            ExitClass::FailedPrecondition,
            "another engine process (the node plugin) holds the daemon's main monitor; \
             stop it first",
        )
        .into());
    }
    let exported: usize = all_records(store)?.iter().map(|r| r.exports.len()).sum();
    if exported > 0 && !force {
        return Err(CliError::new(
            ExitClass::FailedPrecondition,
            format!("{exported} exports are recorded; their I/O would stop (use --force)"),
        )
        .into());
    }
    let pid = std::fs::read_to_string(runtime.pid_file())
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
        .filter(|p| pid_alive(*p) && is_qsd(*p));
    let Some(pid) = pid else {
        return Ok(views::message(
            "engine daemon not running".into(),
            json!({ "stopped": false, "running": false }),
        ));
    };
    let d = Daemon {
        runtime: runtime.clone(),
        pid: Some(pid),
        origin: Origin::Attached,
        monitor: Monitor::Admin,
    };
    d.signal_and_wait(libc::SIGTERM, Duration::from_secs(20))
        .await
        .map_err(EngineError::from)
        .context("stopping the engine daemon")?;
    Ok(views::message(
        format!("engine daemon pid {pid} stopped"),
        json!({ "stopped": true, "pid": pid }),
    ))
}

/// Guards against a stale pid file naming a reused pid.
fn is_qsd(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| String::from_utf8_lossy(&c).contains("qemu-storage-daemon"))
}

async fn info(a: &AdminArgs, store: &RecordStore, runtime: &RuntimeDir) -> Result<Out> {
    let pid = std::fs::read_to_string(runtime.pid_file())
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok());
    let alive = pid.is_some_and(pid_alive);
    let version = if alive {
        match monitor(runtime).await {
            Ok(q) => q
                .execute("query-version", json!({}))
                .await
                .map(|v| qemu_version(&v))
                .map_err(|e| e.to_string()),
            Err(e) => Err(format!("{e:#}")),
        }
    } else {
        Err("daemon not running".into())
    };
    let volumes = store.list().map(|v| v.len()).unwrap_or(0);
    Ok(views::info(
        &a.pool,
        &a.runtime_dir,
        volumes,
        &DaemonFacts {
            pid,
            alive,
            version,
        },
    ))
}

fn qemu_version(v: &Value) -> String {
    let q = &v["qemu"];
    let pkg = v["package"].as_str().unwrap_or("").trim();
    format!("{}.{}.{} {pkg}", q["major"], q["minor"], q["micro"])
        .trim()
        .to_owned()
}
