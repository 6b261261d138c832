//! Faults at exact instants: kill -9 of the process hosting the library
//! (a re-executed copy of this test binary) and of the daemon, during
//! snapshots, merges and plain writes. A writer runs through the daemon's
//! export the whole time; afterwards every acknowledged write must read back,
//! every layer must pass `qemu-img check`, and work must go on.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::*;
use livedisk_engine::{
    Engine, EngineConfig, Extent, MergeMode, MergeOptions, Origin, SnapshotId, VolumeId,
};
use livedisk_verifier::{Ack, BackgroundWriter, Pattern, Writer, verify, verify_point_in_time};

const MIB: u64 = 1 << 20;
const CHILD_TIMEOUT: Duration = Duration::from_secs(120);

/// Not a test of its own: the body of the child process that
/// `common::spawn_child` re-executes (with `--ignored`). Ignored so that a
/// plain run neither executes nor counts it as a passing test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "child-process entry point of the fault tests, run by them"]
async fn child_entry() {
    let op = std::env::var("LD_CHILD").expect("run by common::spawn_child (LD_CHILD unset)");
    let var = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} unset"));
    let e = Engine::open(EngineConfig {
        pool: PathBuf::from(var("LD_POOL")),
        runtime_dir: PathBuf::from(var("LD_RUN")),
    })
    .await
    .expect("child: open");
    let vol = || VolumeId::parse(&var("LD_VOL")).expect("LD_VOL");
    let snap = || SnapshotId::parse(&var("LD_SNAP")).expect("LD_SNAP");
    match op.as_str() {
        "snapshot" => {
            e.create_snapshot(&vol(), &snap())
                .await
                .expect("child: snapshot");
        }
        "snapshot-then-wait" => {
            // The snapshot returns first; its extent record is captured
            // after, by a background task that the failpoint kills.
            e.create_snapshot(&vol(), &snap())
                .await
                .expect("child: snapshot");
            std::fs::write(var("LD_MARK"), b"returned").expect("child: mark");
            tokio::time::sleep(CHILD_TIMEOUT).await;
        }
        "group" => {
            let v2 = VolumeId::parse(&var("LD_VOL2")).expect("LD_VOL2");
            let s2 = SnapshotId::parse(&var("LD_SNAP2")).expect("LD_SNAP2");
            e.create_snapshots(&[(vol(), snap()), (v2, s2)])
                .await
                .expect("child: group snapshot");
        }
        "merge" => {
            e.delete_snapshot(&snap(), None)
                .await
                .expect("child: merge");
        }
        "loop" => {
            // Snapshots and merges back to back until killed.
            let v = vol();
            let mut prev: Option<SnapshotId> = None;
            loop {
                let s = SnapshotId::generate();
                e.create_snapshot(&v, &s).await.expect("child: snapshot");
                if let Some(p) = prev.take() {
                    e.delete_snapshot(&p, None).await.expect("child: merge");
                }
                prev = Some(s);
            }
        }
        other => panic!("unknown child op {other}"),
    }
}

fn killed(st: std::process::ExitStatus) -> bool {
    st.signal() == Some(libc::SIGKILL)
}

/// A volume attached through nbdfuse with a background writer on it.
struct Live {
    uri: String,
    // Dropped before `disk`: the writer lets go of the file first.
    bg: Option<BackgroundWriter>,
    disk: Option<NbdFile>,
}

impl Live {
    async fn start(env: &TestEnv, e: &Engine, vol: &VolumeId, blocks: u64) -> Self {
        Self::start_at(env, e, vol, blocks, "c0").await
    }

    async fn start_at(env: &TestEnv, e: &Engine, vol: &VolumeId, blocks: u64, dir: &str) -> Self {
        e.create_volume(vol, 64 * MIB).await.expect("create");
        let uri = e.attach_volume(vol).await.expect("attach").uri();
        let disk = NbdFile::mount(&env.root.join(dir), &uri, false);
        let bg = BackgroundWriter::start(
            Writer::open(&disk.file, 1).expect("writer"),
            Pattern::Sequential {
                first: 0,
                count: blocks,
            },
            Duration::from_millis(1),
        );
        wait_until("first writes", Duration::from_secs(30), || {
            bg.last_acked() >= 20
        })
        .await;
        Self {
            uri,
            disk: Some(disk),
            bg: Some(bg),
        }
    }

    fn last_acked(&self) -> u64 {
        self.bg.as_ref().map_or(0, BackgroundWriter::last_acked)
    }

    /// Stops the writer; `must_succeed` when the daemon never died.
    fn stop(&mut self, must_succeed: bool) -> Vec<Ack> {
        let bg = self.bg.take().expect("writer running");
        let (log, err) = bg.stop_with_error().expect("writer thread");
        if must_succeed {
            assert!(err.is_none(), "writer saw an error: {err:?}");
        }
        log
    }

    /// Every acknowledged write reads back through a fresh attach path.
    fn verify_fresh(&mut self, env: &TestEnv, name: &str, log: &[Ack]) {
        self.disk = None;
        let d = NbdFile::mount(&env.root.join(name), &self.uri, true);
        let r = verify(&d.file, 1, log).expect("verify");
        assert!(r.ok(), "{name}: {:?}", r.mismatches);
        assert!(r.blocks_checked > 0);
    }
}

fn fp_vars(
    vol: &VolumeId,
    snap: &SnapshotId,
    point: &str,
    daemon: bool,
) -> Vec<(&'static str, String)> {
    vec![
        ("LD_VOL", vol.to_string()),
        ("LD_SNAP", snap.to_string()),
        ("LIVEDISK_FAILPOINT", point.to_owned()),
        (
            "LIVEDISK_FAILPOINT_DAEMON",
            if daemon { "1" } else { "0" }.to_owned(),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_crash_windows_lose_no_acknowledged_write() {
    for (point, daemon_too) in [
        ("snapshot-before-transaction", false),
        ("snapshot-after-transaction", false),
        ("snapshot-before-transaction", true),
        ("snapshot-after-transaction", true),
    ] {
        let case = format!("{point} daemon_killed={daemon_too}");
        let env = TestEnv::new("snapcrash");
        let vol = VolumeId::generate();
        let snap = SnapshotId::generate();
        let mut live = {
            let e = env.engine().await;
            Live::start(&env, &e, &vol, 64).await
        };
        let acked_before = live.last_acked();
        let mut child = spawn_child(&env, "snapshot", &fp_vars(&vol, &snap, point, daemon_too));
        let st = wait_child(&mut child, CHILD_TIMEOUT);
        assert!(killed(st), "{case}: failpoint not reached: {st}");
        if !daemon_too {
            // The writer talks to the daemon, not to the library: it goes on.
            let seen = live.last_acked();
            wait_until("writes after the kill", Duration::from_secs(30), || {
                live.last_acked() > seen + 20
            })
            .await;
        }

        let e = env.engine().await;
        let want_origin = if daemon_too {
            Origin::Started
        } else {
            Origin::Attached
        };
        assert_eq!(e.daemon().origin, want_origin, "{case}");
        assert_eq!(daemons_for(&env.cfg.runtime_dir), 1, "{case}");
        let rec = e.record(&vol).expect("record");
        assert!(rec.pending_snapshot.is_none(), "{case}: intent left over");
        // A live daemon that never switched rolls back; everything else
        // rolls forward (see recover::resolve_snapshot).
        let rolled_forward = daemon_too || point == "snapshot-after-transaction";
        assert_eq!(e.snapshot(&snap).is_ok(), rolled_forward, "{case}");
        check_sealed_layers(&e, &vol);

        // Retrying the call is idempotent (or takes the snapshot now).
        e.create_snapshot(&vol, &snap)
            .await
            .expect("retry snapshot");
        let log = live.stop(!daemon_too);
        check_volume_layers(&e, &vol);
        live.verify_fresh(&env, "c1", &log);
        // The snapshot holds every write acknowledged before the first call.
        let x = e.export_snapshot(&snap).await.expect("export snapshot");
        let raw = env.root.join("snap.raw");
        export_to_raw(&x.uri(), &raw);
        let r = verify_point_in_time(&raw, 1, &log, acked_before, u64::MAX).expect("pit");
        assert!(r.ok(), "{case}: {:?}", r.mismatches);
        // Its extent record is what the daemon shows for its layer.
        assert_eq!(
            e.allocated(&snap, 0, 1000)
                .await
                .expect("allocated")
                .extents,
            nbdinfo_local_extents(&x.uri()),
            "{case}"
        );
        e.unexport_snapshot(&snap).await.expect("unexport");
        eprintln!("{case}: ok, {} writes", log.len());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn library_host_kill_mid_writes_and_operations() {
    let env = TestEnv::new("libkill");
    let vol = VolumeId::generate();
    let mut live = {
        let e = env.engine().await;
        Live::start(&env, &e, &vol, 256).await
    };
    let pid = env.daemon_pid();
    // The child takes snapshots and merges in a loop; kill it at various
    // moments, whatever step it is in.
    for (i, ms) in [700u64, 1100, 1600].into_iter().enumerate() {
        let mut child = spawn_child(&env, "loop", &[("LD_VOL", vol.to_string())]);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        child.kill().expect("kill -9 child");
        let st = child.wait().expect("wait child");
        assert!(killed(st), "round {i}: {st}");
        let seen = live.last_acked();
        wait_until("writes after the kill", Duration::from_secs(30), || {
            live.last_acked() > seen + 20
        })
        .await;
        // Restart of the library: same daemon, never a second one, and the
        // interrupted step is finished or undone.
        let e = env.engine().await;
        assert_eq!(e.daemon().origin, Origin::Attached);
        assert_eq!(env.daemon_pid(), pid);
        assert_eq!(daemons_for(&env.cfg.runtime_dir), 1);
        let rec = e.record(&vol).expect("record");
        assert!(rec.pending_snapshot.is_none() && rec.in_flight.is_none());
        check_sealed_layers(&e, &vol);
        // Every operation continues.
        let s = SnapshotId::generate();
        e.create_snapshot(&vol, &s)
            .await
            .expect("snapshot after restart");
        for old in e.list_snapshots(&vol).expect("list") {
            e.delete_snapshot(&old.id, None)
                .await
                .expect("merge after restart");
        }
        assert!(e.list_snapshots(&vol).expect("list").is_empty());
        eprintln!(
            "round {i}: killed after {ms} ms, {} layers left",
            e.record(&vol).expect("r").layers.len()
        );
    }
    let log = live.stop(true);
    let e = env.engine().await;
    check_volume_layers(&e, &vol);
    live.verify_fresh(&env, "c1", &log);
    eprintln!("writer: {} writes, no error", log.len());
}

/// Fills `len` bytes at `offset` of the attached disk with `byte`, durably.
fn fill(file: &std::path::Path, offset: u64, len: usize, byte: u8) {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(file)
        .expect("open disk");
    f.seek(SeekFrom::Start(offset)).expect("seek");
    f.write_all(&vec![byte; len]).expect("fill");
    f.sync_all().expect("fsync");
}

fn assert_filled(file: &std::path::Path, offset: u64, len: usize, byte: u8) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(file).expect("open");
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset).expect("read");
    assert!(buf.iter().all(|b| *b == byte), "fill pattern lost");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_survives_daemon_kill_at_several_points() {
    // (name, delete the latest snapshot (internal seal, then commit)?).
    // Deleting the latest snapshot never commits the layer that takes
    // writes: the active layer is sealed internally first (an overlay in
    // one transaction), then merged by a non-active commit. Each crash point
    // around those steps, with and without the daemon.
    for (case, active) in [
        ("mid-way non-active commit", false),
        (
            "latest: mid-way commit of the internally sealed layer",
            true,
        ),
        ("failpoint merge-before-seal, daemon too", true),
        ("failpoint merge-after-seal, daemon too", true),
        ("failpoint merge-before-seal, library only", true),
        ("failpoint merge-after-seal, library only", true),
        ("failpoint merge-after-complete, daemon too", true),
        ("failpoint merge-after-complete, library only", true),
        // Copied, flushed by the library, not yet finalized: the job waits
        // (`pending`) for a finisher that died.
        ("failpoint merge-before-finalize, daemon too", true),
        ("failpoint merge-before-finalize, library only", true),
    ] {
        let env = TestEnv::new("mergekill");
        let vol = VolumeId::generate();
        let (s1, s2) = (SnapshotId::generate(), SnapshotId::generate());
        let e = env.engine().await;
        let mut live = Live::start(&env, &e, &vol, 64).await;
        e.create_snapshot(&vol, &s1).await.expect("s1");
        // 16 MiB for the merge to copy, beyond the writer's blocks.
        let file = live.disk.as_ref().expect("disk").file.clone();
        fill(&file, 4 * MIB, 16 * MIB as usize, 0x5a);
        if !active {
            e.create_snapshot(&vol, &s2).await.expect("s2");
        }
        let daemon_killed;
        match case {
            "mid-way non-active commit"
            | "latest: mid-way commit of the internally sealed layer" => {
                let job = e
                    .start_snapshot_delete(
                        &s1,
                        MergeOptions {
                            mode: MergeMode::Commit,
                            speed: Some(4 * MIB),
                        },
                    )
                    .await
                    .expect("start merge");
                let t = std::time::Instant::now();
                loop {
                    let j = e
                        .jobs()
                        .await
                        .expect("jobs")
                        .into_iter()
                        .find(|j| j.id == job);
                    let j = j.expect("job exists");
                    // Never READY: no active commit any more.
                    assert_ne!(j.status, "ready", "{case}");
                    let hit = j.current_progress > 0 && j.current_progress < j.total_progress;
                    if hit {
                        eprintln!(
                            "{case}: killing daemon at {}/{} ({})",
                            j.current_progress, j.total_progress, j.status
                        );
                        break;
                    }
                    assert!(t.elapsed() < Duration::from_secs(120), "{case}: {j:?}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                e.daemon()
                    .signal_and_wait(libc::SIGKILL, Duration::from_secs(10))
                    .await
                    .expect("kill daemon");
                daemon_killed = true;
                drop(e);
            }
            _ => {
                drop(e);
                let daemon = case.contains("daemon too");
                let point = case
                    .split_whitespace()
                    .nth(1)
                    .expect("failpoint name")
                    .trim_end_matches(',');
                let seen = live.last_acked();
                let mut child = spawn_child(&env, "merge", &fp_vars(&vol, &s1, point, daemon));
                let st = wait_child(&mut child, CHILD_TIMEOUT);
                assert!(killed(st), "{case}: failpoint not reached: {st}");
                if !daemon {
                    // The writer talks to the daemon, not to the library.
                    wait_until("writes after the kill", Duration::from_secs(30), || {
                        live.last_acked() > seen + 20
                    })
                    .await;
                }
                daemon_killed = daemon;
            }
        }
        // Reopening finishes the merge.
        let e = env.engine().await;
        assert_eq!(daemons_for(&env.cfg.runtime_dir), 1, "{case}");
        let rec = e.record(&vol).expect("record");
        assert!(rec.in_flight.is_none(), "{case}: merge not finished");
        assert!(e.snapshot(&s1).is_err(), "{case}: s1 still there");
        check_sealed_layers(&e, &vol);
        let log = live.stop(!daemon_killed);
        check_volume_layers(&e, &vol);
        live.verify_fresh(&env, "c1", &log);
        let d = NbdFile::mount(&env.root.join("c2"), &live.uri, true);
        assert_filled(&d.file, 4 * MIB, 16 * MIB as usize, 0x5a);
        drop(d);
        if active {
            // No active commit ran, so there is no READY job left behind,
            // no internal seal pending, and the chain is the bottom layer
            // (now sealed by nobody) under a fresh active layer.
            assert!(
                e.jobs().await.expect("jobs").is_empty(),
                "{case}: jobs left"
            );
            let rec = e.record(&vol).expect("record");
            assert_eq!(rec.layers.len(), 2, "{case}: {:?}", rec.layers);
            assert!(rec.layers.iter().all(|l| l.sealed_by.is_none()));
            // The next snapshot's extent record is exact: it holds s1's
            // writes and the merged-away layer's, as the daemon shows.
            let s3 = SnapshotId::generate();
            e.create_snapshot(&vol, &s3).await.expect("s3");
            let x = e.export_snapshot(&s3).await.expect("export s3");
            assert_eq!(
                e.allocated(&s3, 0, 1000).await.expect("alloc").extents,
                nbdinfo_allocated_extents(&x.uri()),
                "{case}"
            );
            e.unexport_snapshot(&s3).await.expect("unexport");
            check_sealed_layers(&e, &vol);
            // And deleting the latest again works (and stays bounded).
            e.delete_snapshot(&s3, None).await.expect("delete s3");
            assert_eq!(e.record(&vol).expect("r").layers.len(), 2, "{case}");
            check_volume_layers(&e, &vol);
        } else {
            // Changed extents after the kill and the merge: s2 now covers
            // s1's writes too; the daemon's view of s2's layer agrees.
            let x = e.export_snapshot(&s2).await.expect("export s2");
            assert_eq!(
                e.allocated(&s2, 0, 1000).await.expect("alloc").extents,
                nbdinfo_local_extents(&x.uri())
            );
            e.unexport_snapshot(&s2).await.expect("unexport");
        }
        eprintln!("{case}: ok ({} writes)", log.len());
    }
}

/// Blocks (4 KiB) written in each cluster, one per listed cluster.
fn write_clusters(w: &mut Writer, clusters: &[u64]) -> Vec<u64> {
    clusters
        .iter()
        .map(|c| {
            let b = c * CLUSTER / BLOCK;
            w.write_block(b).expect("write");
            b
        })
        .collect()
}

async fn delta_all(e: &Engine, base: &SnapshotId, target: &SnapshotId) -> Vec<Extent> {
    let mut out = vec![];
    let mut start = 0;
    loop {
        let p = e.delta(base, target, start, 3).await.expect("delta");
        let Some(last) = p.extents.last() else {
            return out;
        };
        start = last.end();
        out.extend(p.extents);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_extents_across_restarts_and_merges_read_no_data() {
    let env = TestEnv::new("cbt");
    let vol = VolumeId::generate();
    let s: Vec<SnapshotId> = (0..5).map(|_| SnapshotId::generate()).collect();
    let e = env.engine().await;
    e.create_volume(&vol, 64 * MIB).await.expect("create");
    let uri = e.attach_volume(&vol).await.expect("attach").uri();
    let mut disk = Some(NbdFile::mount(&env.root.join("c0"), &uri, false));
    let mut w = Writer::open(&disk.as_ref().expect("disk").file, 3).expect("writer");
    let mut log: Vec<Ack> = vec![];

    let p0 = write_clusters(&mut w, &[1, 2]);
    e.create_snapshot(&vol, &s[0]).await.expect("s0");
    let p1 = write_clusters(&mut w, &[10, 11, 300]);
    e.create_snapshot(&vol, &s[1]).await.expect("s1");
    let p2 = write_clusters(&mut w, &[20, 600]);
    e.create_snapshot(&vol, &s[2]).await.expect("s2");
    // Merge the middle one away, then a clean daemon restart.
    e.delete_snapshot(&s[1], None).await.expect("merge s1");
    log.extend(w.log());
    drop(w);
    disk = None;
    e.daemon()
        .signal_and_wait(libc::SIGTERM, Duration::from_secs(30))
        .await
        .expect("clean stop");
    drop(e);
    let e = env.engine().await;
    assert_eq!(e.daemon().origin, Origin::Started);
    let d12 = clusters_of(p1.iter().chain(&p2).copied());
    assert_eq!(delta_all(&e, &s[0], &s[2]).await, d12);
    assert_eq!(
        e.allocated(&s[0], 0, 100).await.expect("a").extents,
        clusters_of(p0.clone())
    );

    // More writes, delete the latest (internal seal + commit), another snapshot,
    // then kill -9 of the daemon.
    disk.replace(NbdFile::mount(&env.root.join("c1"), &uri, false));
    let mut w = Writer::open(&disk.as_ref().expect("disk").file, 3)
        .expect("writer")
        .with_next_seq(log.len() as u64 + 1);
    let p3 = write_clusters(&mut w, &[30, 31]);
    e.create_snapshot(&vol, &s[3]).await.expect("s3");
    let p4 = write_clusters(&mut w, &[40, 900]);
    e.delete_snapshot(&s[3], None)
        .await
        .expect("delete the latest, s3");
    e.create_snapshot(&vol, &s[4]).await.expect("s4");
    log.extend(w.log());
    drop(w);
    disk = None;
    e.daemon()
        .signal_and_wait(libc::SIGKILL, Duration::from_secs(10))
        .await
        .expect("kill -9");
    drop(e);
    let e = env.engine().await;
    assert_eq!(e.daemon().origin, Origin::Started);
    let d24 = clusters_of(p3.iter().chain(&p4).copied());
    assert_eq!(delta_all(&e, &s[2], &s[4]).await, d24);
    assert_eq!(
        delta_all(&e, &s[0], &s[4]).await,
        clusters_of(p1.iter().chain(&p2).chain(&p3).chain(&p4).copied())
    );
    // Independent check: the daemon's allocation view of s4. s3's writes
    // and the internally sealed layer's now live in the layer below s4's
    // (sealed by nobody), so compare the whole view: every layer of it.
    let x = e.export_snapshot(&s[4]).await.expect("export");
    assert_eq!(
        nbdinfo_allocated_extents(&x.uri()),
        e.allocated(&s[4], 0, 1000).await.expect("alloc").extents
    );
    assert_eq!(
        e.allocated(&s[4], 0, 1000).await.expect("alloc").extents,
        clusters_of(
            p0.iter()
                .chain(&p1)
                .chain(&p2)
                .chain(&p3)
                .chain(&p4)
                .copied()
        )
    );
    e.unexport_snapshot(&s[4]).await.expect("unexport");

    // Answering reads no data: the daemon's per-node read counters do not
    // move across a burst of extent queries.
    let before = node_read_bytes(&e).await;
    assert!(!before.is_empty());
    for _ in 0..50 {
        delta_all(&e, &s[0], &s[4]).await;
        delta_all(&e, &s[2], &s[4]).await;
        e.allocated(&s[4], 0, 1000).await.expect("alloc");
    }
    let after = node_read_bytes(&e).await;
    assert_eq!(before, after, "extent queries read data");
    eprintln!("rd_bytes per node unchanged across 150 queries: {after:?}");

    let d = NbdFile::mount(&env.root.join("c2"), &uri, true);
    let r = verify(&d.file, 3, &log).expect("verify");
    assert!(r.ok(), "{:?}", r.mismatches);
    drop(disk);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_snapshot_crash_is_all_or_nothing() {
    for (point, daemon_too) in [
        ("snapshot-before-transaction", false),
        ("snapshot-after-transaction", false),
        ("snapshot-after-transaction", true),
    ] {
        let case = format!("{point} daemon_killed={daemon_too}");
        let env = TestEnv::new("grpcrash");
        let (va, vb) = (VolumeId::generate(), VolumeId::generate());
        let (sa, sb) = (SnapshotId::generate(), SnapshotId::generate());
        let (mut la, mut lb) = {
            let e = env.engine().await;
            (
                Live::start_at(&env, &e, &va, 32, "ca").await,
                Live::start_at(&env, &e, &vb, 32, "cb").await,
            )
        };
        let mut vars = fp_vars(&va, &sa, point, daemon_too);
        vars.push(("LD_VOL2", vb.to_string()));
        vars.push(("LD_SNAP2", sb.to_string()));
        let mut child = spawn_child(&env, "group", &vars);
        let st = wait_child(&mut child, CHILD_TIMEOUT);
        assert!(killed(st), "{case}: failpoint not reached: {st}");
        let e = env.engine().await;
        let (ra, rb) = (e.record(&va).expect("a"), e.record(&vb).expect("b"));
        assert!(ra.pending_snapshot.is_none() && rb.pending_snapshot.is_none());
        // Both or neither: one QMP transaction, one decision per volume
        // from the same evidence.
        let (ha, hb) = (e.snapshot(&sa).is_ok(), e.snapshot(&sb).is_ok());
        assert_eq!(ha, hb, "{case}: only one volume has its snapshot");
        assert_eq!(
            ha,
            daemon_too || point == "snapshot-after-transaction",
            "{case}"
        );
        let (loga, logb) = (la.stop(!daemon_too), lb.stop(!daemon_too));
        check_volume_layers(&e, &va);
        check_volume_layers(&e, &vb);
        la.verify_fresh(&env, "ca2", &loga);
        lb.verify_fresh(&env, "cb2", &logb);
        eprintln!("{case}: ok, snapshots kept: {ha}");
    }
}

/// A snapshot returns before its extent record is captured (decision 3: the
/// record is the sealed layer's allocation map, read after the call); a crash
/// in between loses nothing: recovery captures it, and the changed blocks
/// equal what was written and what the daemon shows for the layer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extent_record_is_captured_after_the_snapshot_returns_and_survives_a_crash() {
    let env = TestEnv::new("capture");
    let vol = VolumeId::generate();
    let (s0, s1) = (SnapshotId::generate(), SnapshotId::generate());
    let written: Vec<u64> = (0..400).map(|i| i * 3).collect();
    {
        let e = env.engine().await;
        e.create_volume(&vol, 256 * MIB).await.expect("create");
        e.create_snapshot(&vol, &s0).await.expect("s0");
        let x = e.attach_volume(&vol).await.expect("attach");
        qemu_io_write_clusters(&x.uri(), &written);
    }
    let mark = env.root.join("returned");
    let mut vars = fp_vars(&vol, &s1, "capture-before-store", false);
    vars.push(("LD_MARK", mark.display().to_string()));
    let mut child = spawn_child(&env, "snapshot-then-wait", &vars);
    let st = wait_child(&mut child, CHILD_TIMEOUT);
    assert!(killed(st), "failpoint not reached: {st}");
    assert!(
        mark.exists(),
        "the snapshot call did not return before its capture"
    );

    // The record names the snapshot, without its extent record yet.
    let rec = livedisk_engine::record::RecordStore::new(&env.cfg.pool)
        .load(&vol)
        .expect("load")
        .expect("record");
    let s = rec.snapshot(&s1).expect("s1 in the record");
    assert!(s.changed.is_none(), "captured before the call returned");

    // A new engine (recovery) captures it; the answer is the writes.
    let e = env.engine().await;
    let want = clusters_of(written.iter().map(|c| c * CLUSTER / BLOCK));
    assert_eq!(delta_all(&e, &s0, &s1).await, want);
    let x = e.export_snapshot(&s1).await.expect("export s1");
    assert_eq!(
        e.allocated(&s1, 0, usize::MAX)
            .await
            .expect("allocated")
            .extents,
        nbdinfo_allocated_extents(&x.uri())
    );
    assert_eq!(nbdinfo_local_extents(&x.uri()), want);
    e.unexport_snapshot(&s1).await.expect("unexport");
}

/// A changed-block query and a merge issued the instant a snapshot returns
/// (its record most likely still being captured) answer exactly the writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_and_merges_right_after_a_snapshot_wait_for_its_record() {
    let env = TestEnv::new("capture-race");
    let e = env.engine().await;
    let vol = VolumeId::generate();
    e.create_volume(&vol, 1024 * MIB).await.expect("create");
    let s = [
        SnapshotId::generate(),
        SnapshotId::generate(),
        SnapshotId::generate(),
    ];
    e.create_snapshot(&vol, &s[0]).await.expect("s0");
    let x = e.attach_volume(&vol).await.expect("attach");
    // Thousands of separate clusters make the map take a while to read.
    let first: Vec<u64> = (0..3000).map(|i| i * 2).collect();
    qemu_io_write_clusters(&x.uri(), &first);
    e.create_snapshot(&vol, &s[1]).await.expect("s1");
    let pending = e
        .record(&vol)
        .expect("record")
        .snapshot(&s[1])
        .is_some_and(|r| r.changed.is_none());
    let want1 = clusters_of(first.iter().map(|c| c * CLUSTER / BLOCK));
    assert_eq!(delta_all(&e, &s[0], &s[1]).await, want1);
    eprintln!("record still being captured when queried: {pending}");

    let second: Vec<u64> = (0..3000).map(|i| i * 2 + 1).collect();
    qemu_io_write_clusters(&x.uri(), &second);
    e.create_snapshot(&vol, &s[2]).await.expect("s2");
    let pending = e
        .record(&vol)
        .expect("record")
        .snapshot(&s[2])
        .is_some_and(|r| r.changed.is_none());
    // Merge s1 away at once: its record and s2's must be captured first.
    e.delete_snapshot(&s[1], None).await.expect("merge s1");
    eprintln!("record still being captured when merged: {pending}");
    let both = clusters_of(first.iter().chain(&second).map(|c| c * CLUSTER / BLOCK));
    assert_eq!(delta_all(&e, &s[0], &s[2]).await, both);
    e.detach_volume(&vol).await.expect("detach");
}

/// One block in each listed cluster, in one `qemu-io` run.
fn qemu_io_write_clusters(uri: &str, clusters: &[u64]) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for c in clusters {
        cmd.arg("-c")
            .arg(format!("write -P 0x5a {} 4k", c * CLUSTER));
    }
    let out = cmd.arg(uri).output().expect("qemu-io");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
