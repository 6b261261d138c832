//! Revert to any snapshot, keeping every snapshot: content, the other
//! snapshots' views, changed-block answers against independent sources
//! (`nbdinfo` block status, byte comparison of exports), refusals that
//! change nothing, and kill -9 of the library (a re-executed copy of this
//! test binary) and of the daemon at each step of the revert.

mod common;

use std::collections::BTreeSet;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::time::Duration;

use common::*;
use livedisk_engine::{
    Engine, EngineConfig, ErrorCode, Extent, MergeMode, MergeOptions, SnapshotId, VolumeId,
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
    let vol = VolumeId::parse(&var("LD_VOL")).expect("LD_VOL");
    let snap = SnapshotId::parse(&var("LD_SNAP")).expect("LD_SNAP");
    match op.as_str() {
        "revert" => {
            e.revert_volume(&vol, &snap).await.expect("child: revert");
        }
        other => panic!("unknown child op {other}"),
    }
}

fn code<T>(r: Result<T, livedisk_engine::EngineError>) -> Option<ErrorCode> {
    r.map(|_| ()).map_err(|e| e.code()).err()
}

fn write_clusters(w: &mut Writer, clusters: &[u64]) {
    for c in clusters {
        w.write_block(c * CLUSTER / BLOCK).expect("write");
    }
}

/// Copies a snapshot's view to a raw file through its read-only export.
async fn snapshot_raw(e: &Engine, env: &TestEnv, s: &SnapshotId, tag: &str) -> Vec<u8> {
    let x = e.export_snapshot(s).await.expect("export");
    let raw = env.root.join(format!("{s}-{tag}.raw"));
    export_to_raw(&x.uri(), &raw);
    e.unexport_snapshot(s).await.expect("unexport");
    let bytes = std::fs::read(&raw).expect("raw");
    std::fs::remove_file(&raw).expect("rm raw");
    bytes
}

/// The volume's content through its consumer export (attached for the
/// copy, detached again unless it was attached before).
async fn volume_raw(e: &Engine, env: &TestEnv, vol: &VolumeId) -> Vec<u8> {
    let was = e
        .record(vol)
        .expect("rec")
        .exports
        .iter()
        .any(|x| x.target == livedisk_engine::record::ExportTarget::Volume);
    let uri = e.attach_volume(vol).await.expect("attach").uri();
    let raw = env.root.join(format!("{vol}.raw"));
    export_to_raw(&uri, &raw);
    if !was {
        e.detach_volume(vol).await.expect("detach");
    }
    let bytes = std::fs::read(&raw).expect("raw");
    std::fs::remove_file(&raw).expect("rm raw");
    bytes
}

/// Clusters whose bytes differ between two images of the same size: the
/// exact change at cluster granularity, from the data itself.
fn differing_clusters(a: &[u8], b: &[u8]) -> Vec<Extent> {
    assert_eq!(a.len(), b.len());
    let c = CLUSTER as usize;
    livedisk_engine::extents::normalize(
        (0..a.len().div_ceil(c))
            .filter(|i| {
                let r = i * c..((i + 1) * c).min(a.len());
                a[r.clone()] != b[r]
            })
            .map(|i| Extent {
                offset: i as u64 * CLUSTER,
                length: CLUSTER,
            })
            .collect(),
    )
}

/// Whether every byte of `small` lies in `big`.
fn covers(big: &[Extent], small: &[Extent]) -> bool {
    small.iter().all(|s| {
        let mut at = s.offset;
        for b in big {
            if b.offset <= at && at < b.end() {
                at = b.end();
            }
            if at >= s.end() {
                return true;
            }
        }
        at >= s.end()
    })
}

/// Nothing of an operation is left over: the volume directory holds the
/// record and exactly the record's layer files, the daemon exactly the
/// record's layer nodes, and no intent is pending.
async fn assert_clean(e: &Engine, env: &TestEnv, vol: &VolumeId, case: &str) {
    let rec = e.record(vol).expect("record");
    assert!(rec.pending_revert.is_none(), "{case}: revert intent left");
    assert!(rec.pending_snapshot.is_none() && rec.in_flight.is_none());
    let want_files: BTreeSet<String> = rec
        .layers
        .iter()
        .map(|l| format!("layer-{}.qcow2", l.seq))
        .chain(["record.json".to_owned()])
        .collect();
    let files: BTreeSet<String> = std::fs::read_dir(env.cfg.pool.join(vol.as_str()))
        .expect("vol dir")
        .flatten()
        .filter_map(|d| d.file_name().to_str().map(str::to_owned))
        .collect();
    assert_eq!(files, want_files, "{case}: files");
    let have: BTreeSet<String> = volume_node_names(e, vol).await.into_iter().collect();
    let want: BTreeSet<String> = rec.layers.iter().map(|l| rec.node_name(l.seq)).collect();
    assert_eq!(have, want, "{case}: nodes");
}

/// A volume with three snapshots and writes after the last one.
struct Three {
    vol: VolumeId,
    s: [SnapshotId; 3],
    /// Foreground writer (tag 2) and the ack before each snapshot.
    log: Vec<Ack>,
    at: [u64; 3],
}

/// `writer`: a background writer (tag 1) runs through the snapshots.
async fn three_snapshots(e: &Engine, env: &TestEnv, size: u64, writer: bool) -> Three {
    let vol = VolumeId::generate();
    e.create_volume(&vol, size).await.expect("create");
    let uri = e.attach_volume(&vol).await.expect("attach").uri();
    let s = [
        SnapshotId::generate(),
        SnapshotId::generate(),
        SnapshotId::generate(),
    ];
    let mut at = [0; 3];
    let log;
    {
        let disk = NbdFile::mount(&env.root.join("c0"), &uri, false);
        let bg = writer.then(|| {
            BackgroundWriter::start(
                Writer::open(&disk.file, 1).expect("bg"),
                // Blocks 3072.. (12 MiB): away from the foreground clusters.
                Pattern::Sequential {
                    first: 3072,
                    count: 48,
                },
                Duration::from_millis(1),
            )
        });
        if let Some(bg) = &bg {
            wait_until("first writes", Duration::from_secs(30), || {
                bg.last_acked() >= 20
            })
            .await;
        }
        let mut w = Writer::open(&disk.file, 2).expect("fg");
        // S1: 1 2 3 10; S2 overwrites 2, adds 20 21; S3 overwrites 3 and 1,
        // adds 30; after S3: 1 40 50.
        write_clusters(&mut w, &[1, 2, 3, 10]);
        at[0] = w.next_seq() - 1;
        e.create_snapshot(&vol, &s[0]).await.expect("s1");
        write_clusters(&mut w, &[2, 20, 21]);
        at[1] = w.next_seq() - 1;
        e.create_snapshot(&vol, &s[1]).await.expect("s2");
        write_clusters(&mut w, &[3, 30, 1]);
        at[2] = w.next_seq() - 1;
        e.create_snapshot(&vol, &s[2]).await.expect("s3");
        write_clusters(&mut w, &[1, 40, 50]);
        log = w.into_log();
        if let Some(bg) = bg {
            let bg_log = bg.stop().expect("background writer");
            let r = verify(&disk.file, 1, &bg_log).expect("verify bg");
            assert!(r.ok(), "{:?}", r.mismatches);
        }
    }
    e.detach_volume(&vol).await.expect("detach");
    Three { vol, s, log, at }
}

fn tmp_file(env: &TestEnv, name: &str, bytes: &[u8]) -> PathBuf {
    let p = env.root.join(name);
    std::fs::write(&p, bytes).expect("write tmp");
    p
}

/// The views of the three snapshots, byte for byte.
async fn views(e: &Engine, env: &TestEnv, t: &Three, tag: &str) -> Vec<Vec<u8>> {
    let mut out = vec![];
    for s in &t.s {
        out.push(snapshot_raw(e, env, s, tag).await);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revert_to_any_snapshot_keeps_every_snapshot() {
    let env = TestEnv::new("revany");
    let e = env.engine().await;
    let t = three_snapshots(&e, &env, 16 * MIB, true).await;
    let vol = &t.vol;
    let before = views(&e, &env, &t, "before").await;
    let records: Vec<_> = e.record(vol).expect("rec").snapshots;
    // The foreground writer's view of each snapshot is its point in time.
    for (i, v) in before.iter().enumerate() {
        let f = tmp_file(&env, "pit.raw", v);
        let r = verify_point_in_time(&f, 2, &t.log, t.at[i], t.at[i] + 1).expect("pit");
        assert!(r.ok(), "S{}: {:?}", i + 1, r.mismatches);
    }

    // Revert to the oldest snapshot.
    let started = std::time::Instant::now();
    let info = e.revert_volume(vol, &t.s[0]).await.expect("revert to S1");
    eprintln!(
        "revert to S1 (two snapshots newer): {:?}",
        started.elapsed()
    );
    assert_eq!(info.snapshots, 3);
    assert_eq!(info.layers, 4, "S1, S2, S3 layers and the new active one");
    let content = volume_raw(&e, &env, vol).await;
    assert!(content == before[0], "the volume must read as S1");
    // Every snapshot's view, record and extent answers are untouched.
    assert_eq!(views(&e, &env, &t, "after").await, before);
    assert_eq!(e.record(vol).expect("rec").snapshots, records);
    assert_clean(&e, &env, vol, "revert S1").await;
    check_volume_layers(&e, vol);
    // The new layer holds exactly the clusters where S1 differs from S3
    // (nbdinfo block status of the volume's own layer vs. a byte compare).
    let uri = e.attach_volume(vol).await.expect("attach").uri();
    let own = nbdinfo_local_extents(&uri);
    e.detach_volume(vol).await.expect("detach");
    assert_eq!(own, differing_clusters(&before[0], &before[2]));
    assert!(!own.is_empty());

    // Again (a no-op for the content), then the latest snapshot (an empty
    // layer), then the middle one, then S1 once more.
    e.revert_volume(vol, &t.s[0])
        .await
        .expect("revert to S1 again");
    assert!(volume_raw(&e, &env, vol).await == before[0]);
    assert_clean(&e, &env, vol, "revert S1 again").await;
    e.revert_volume(vol, &t.s[2]).await.expect("revert to S3");
    assert!(volume_raw(&e, &env, vol).await == before[2]);
    let uri = e.attach_volume(vol).await.expect("attach").uri();
    assert_eq!(nbdinfo_local_extents(&uri), vec![], "S3: empty layer");
    e.detach_volume(vol).await.expect("detach");
    e.revert_volume(vol, &t.s[1]).await.expect("revert to S2");
    assert!(volume_raw(&e, &env, vol).await == before[1]);
    e.revert_volume(vol, &t.s[0])
        .await
        .expect("revert to S1 last");
    assert!(volume_raw(&e, &env, vol).await == before[0]);
    assert_eq!(views(&e, &env, &t, "again").await, before);
    assert_eq!(e.record(vol).expect("rec").layers.len(), 4);
    assert_clean(&e, &env, vol, "reverts").await;
    check_volume_layers(&e, vol);

    // Attach, write, snapshot S4: delta(S3, S4) against the data.
    let uri = e.attach_volume(vol).await.expect("attach").uri();
    let log4;
    {
        let disk = NbdFile::mount(&env.root.join("c4"), &uri, false);
        // Reads as S1 through the consumer path too.
        let r = verify_point_in_time(&disk.file, 2, &t.log, t.at[0], t.at[0] + 1).expect("pit");
        assert!(r.ok(), "{:?}", r.mismatches);
        let mut w = Writer::open(&disk.file, 3).expect("writer");
        write_clusters(&mut w, &[2, 60, 61]);
        log4 = w.into_log();
    }
    let s4 = SnapshotId::generate();
    e.create_snapshot(vol, &s4).await.expect("s4");
    let v4 = snapshot_raw(&e, &env, &s4, "s4").await;
    let exact = differing_clusters(&before[2], &v4);
    let delta = e
        .delta(&t.s[2], &s4, 0, 10_000)
        .await
        .expect("delta")
        .extents;
    assert!(covers(&delta, &exact), "delta {delta:?} misses {exact:?}");
    // The record is S4's layer's allocation map: the same as nbdinfo's
    // block status of S4's own layer, and (no write rewrote equal bytes)
    // exactly the change.
    let x = e.export_snapshot(&s4).await.expect("export s4");
    let map = nbdinfo_local_extents(&x.uri());
    let alloc_view = nbdinfo_allocated_extents(&x.uri());
    e.unexport_snapshot(&s4).await.expect("unexport");
    assert_eq!(delta, map);
    assert_eq!(delta, exact);
    // Wider deltas and "allocated" never under-report.
    let d14 = e
        .delta(&t.s[0], &s4, 0, 10_000)
        .await
        .expect("delta")
        .extents;
    assert!(covers(&d14, &differing_clusters(&before[0], &v4)));
    let alloc = e
        .allocated(&s4, 0, 10_000)
        .await
        .expect("allocated")
        .extents;
    assert!(covers(&alloc, &alloc_view), "{alloc:?} vs {alloc_view:?}");
    let vol4 = volume_raw(&e, &env, vol).await;
    {
        let f = tmp_file(&env, "v4.raw", &vol4);
        let r = verify(&f, 3, &log4).expect("verify");
        assert!(r.ok() && r.blocks_checked > 0, "{:?}", r.mismatches);
    }

    // Deleting S3, S1, S2 (merges, the attached volume's export in place)
    // changes neither the volume nor S4's view.
    for (i, s) in [(2, &t.s[2]), (0, &t.s[0]), (1, &t.s[1])] {
        e.delete_snapshot(s, None)
            .await
            .unwrap_or_else(|err| panic!("delete S{}: {err}", i + 1));
        assert!(volume_raw(&e, &env, vol).await == vol4, "S{} merge", i + 1);
        check_volume_layers(&e, vol);
    }
    assert!(snapshot_raw(&e, &env, &s4, "s4b").await == v4);
    let rec = e.record(vol).expect("rec");
    assert_eq!(rec.snapshots.len(), 1);
    assert_eq!(rec.layers.len(), 2, "{:?}", rec.layers);
    let alloc = e
        .allocated(&s4, 0, 10_000)
        .await
        .expect("allocated")
        .extents;
    assert!(covers(&alloc, &alloc_view));
    e.detach_volume(vol).await.expect("detach");
    assert_clean(&e, &env, vol, "merges").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revert_refusals_change_nothing() {
    let env = TestEnv::new("revno");
    let e = env.engine().await;
    let t = three_snapshots(&e, &env, 16 * MIB, false).await;
    let vol = &t.vol;
    // Another volume with its own snapshot, and 4 MiB written between its
    // two snapshots so that a rate-limited merge stays running.
    let other = VolumeId::generate();
    e.create_volume(&other, 16 * MIB).await.expect("create");
    let ouri = e.attach_volume(&other).await.expect("attach").uri();
    let (o1, o2) = (SnapshotId::generate(), SnapshotId::generate());
    {
        let disk = NbdFile::mount(&env.root.join("o"), &ouri, false);
        let mut w = Writer::open(&disk.file, 5).expect("writer");
        e.create_snapshot(&other, &o1).await.expect("o1");
        for b in 0..1024 {
            w.write_block(b).expect("write");
        }
        e.create_snapshot(&other, &o2).await.expect("o2");
    }
    e.detach_volume(&other).await.expect("detach");

    // Attached.
    e.attach_volume(vol).await.expect("attach");
    all_captured(&e).await;
    let before = pool_fingerprint(&env.cfg.pool);
    assert_eq!(
        code(e.revert_volume(vol, &t.s[0]).await),
        Some(ErrorCode::FailedPrecondition)
    );
    assert_eq!(pool_fingerprint(&env.cfg.pool), before);
    e.detach_volume(vol).await.expect("detach");
    all_captured(&e).await;
    let before = pool_fingerprint(&env.cfg.pool);
    // Unknown snapshot; another volume's snapshot; unknown volume.
    assert_eq!(
        code(e.revert_volume(vol, &SnapshotId::generate()).await),
        Some(ErrorCode::NotFound)
    );
    assert_eq!(
        code(e.revert_volume(vol, &o1).await),
        Some(ErrorCode::InvalidArgument)
    );
    assert_eq!(
        code(e.revert_volume(&VolumeId::generate(), &t.s[0]).await),
        Some(ErrorCode::NotFound)
    );
    assert_eq!(pool_fingerprint(&env.cfg.pool), before);

    // A snapshot in state deleting: a rate-limited merge, cancelled (the
    // snapshot stays deleting, the merge in flight).
    let job = e
        .start_snapshot_delete(
            &o1,
            MergeOptions {
                mode: MergeMode::Commit,
                speed: Some(256 * 1024),
            },
        )
        .await
        .expect("start merge");
    e.cancel_job(&job).await.expect("cancel");
    let t0 = std::time::Instant::now();
    loop {
        let jobs = e.jobs().await.expect("jobs");
        if jobs.iter().any(|j| j.id == job && j.status == "concluded") {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "cancel: {jobs:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    all_captured(&e).await;
    let before = pool_fingerprint(&env.cfg.pool);
    assert_eq!(
        code(e.revert_volume(&other, &o1).await),
        Some(ErrorCode::FailedPrecondition),
        "deleting snapshot"
    );
    // The volume has a merge in flight: busy, for any snapshot.
    assert_eq!(
        code(e.revert_volume(&other, &o2).await),
        Some(ErrorCode::Aborted)
    );
    assert_eq!(pool_fingerprint(&env.cfg.pool), before);
    // Finishing the merge frees the volume; reverting then works.
    let _ = e.delete_snapshot(&o1, None).await;
    e.delete_snapshot(&o1, None).await.expect("finish merge");
    e.revert_volume(&other, &o2).await.expect("revert other");
    assert_clean(&e, &env, &other, "other").await;
    assert_clean(&e, &env, vol, "vol").await;
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
async fn revert_crash_windows_roll_back_or_forward_never_a_mix() {
    for (point, daemon_too, forward) in [
        ("revert-before-rebase", false, false),
        ("revert-before-rebase", true, false),
        ("revert-before-built", false, false),
        ("revert-before-built", true, false),
        ("revert-after-built", false, true),
        ("revert-after-built", true, true),
        ("revert-after-switch", false, true),
        ("revert-after-switch", true, true),
    ] {
        let case = format!("{point} daemon_killed={daemon_too}");
        let env = TestEnv::new("revcrash");
        let (t, pre, views_before) = {
            let e = env.engine().await;
            let t = three_snapshots(&e, &env, 16 * MIB, false).await;
            let pre = volume_raw(&e, &env, &t.vol).await;
            let v = views(&e, &env, &t, "before").await;
            (t, pre, v)
        };
        assert!(pre != views_before[0]);
        let mut child = spawn_child(&env, "revert", &fp_vars(&t.vol, &t.s[0], point, daemon_too));
        let st = wait_child(&mut child, CHILD_TIMEOUT);
        assert_eq!(
            st.signal(),
            Some(libc::SIGKILL),
            "{case}: failpoint not reached: {st}"
        );

        let e = env.engine().await;
        assert_eq!(daemons_for(&env.cfg.runtime_dir), 1, "{case}");
        assert_clean(&e, &env, &t.vol, &case).await;
        let now = volume_raw(&e, &env, &t.vol).await;
        if forward {
            assert!(now == views_before[0], "{case}: must read as S1");
        } else {
            assert!(now == pre, "{case}: must keep the pre-revert content");
        }
        assert_eq!(views(&e, &env, &t, "after").await, views_before, "{case}");
        check_volume_layers(&e, &t.vol);
        // Retrying the call ends where an uninterrupted one would.
        e.revert_volume(&t.vol, &t.s[0]).await.expect("retry");
        assert!(
            volume_raw(&e, &env, &t.vol).await == views_before[0],
            "{case}"
        );
        assert_eq!(e.record(&t.vol).expect("rec").layers.len(), 4, "{case}");
        assert_clean(&e, &env, &t.vol, &case).await;
        check_volume_layers(&e, &t.vol);
        eprintln!(
            "{case}: ok (rolled {})",
            if forward { "forward" } else { "back" }
        );
    }
}

/// An intent left behind in a live engine (the switch failed, here: the
/// record edited as a crash would leave it) is settled by the next
/// operation on the volume, not only at `open`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_revert_is_settled_by_the_next_operation() {
    let env = TestEnv::new("revpend");
    let e = env.engine().await;
    let t = three_snapshots(&e, &env, 16 * MIB, false).await;
    let pre = volume_raw(&e, &env, &t.vol).await;
    // An intent whose layer was never built: attach rolls it back.
    let mut rec = e.record(&t.vol).expect("rec");
    let n = rec.next_layer_seq;
    rec.next_layer_seq = n + 1;
    rec.pending_revert = Some(livedisk_engine::record::PendingRevert {
        snapshot: t.s[0].clone(),
        onto: t.s[2].clone(),
        layer: n,
        built: false,
    });
    livedisk_engine::record::RecordStore::new(&env.cfg.pool)
        .save(&rec)
        .expect("save");
    std::fs::write(
        env.cfg
            .pool
            .join(t.vol.as_str())
            .join(format!("layer-{n}.qcow2")),
        b"half",
    )
    .expect("partial layer");
    assert!(volume_raw(&e, &env, &t.vol).await == pre);
    assert_clean(&e, &env, &t.vol, "settled by attach").await;
}
