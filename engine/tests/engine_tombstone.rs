//! Changed blocks from a deleted base (livedisk issue 12): a backup tool
//! keeps only the ID of the snapshot it backed up last, deletes that
//! snapshot, and asks for the changes since it. The deleted snapshot's
//! tombstone answers exactly that (the writer's log between the two points)
//! through real merges, restarts of the daemon and kill -9 mid-deletion,
//! while every other use of the ID finds nothing.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;
use livedisk_engine::{
    Engine, EngineConfig, ErrorCode, Extent, MergeMode, MergeOptions, SnapshotId, VolumeId,
};
use livedisk_verifier::{Ack, Writer, verify};

const MIB: u64 = 1 << 20;
const TAG: u64 = 12;
const CHILD_TIMEOUT: Duration = Duration::from_secs(120);

/// Not a test of its own: the body of the child process that
/// `common::spawn_child` re-executes (with `--ignored`) to be killed at a
/// failpoint in the middle of a snapshot deletion.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "child-process entry point of the fault test, run by it"]
async fn child_entry() {
    let op = std::env::var("LD_CHILD").expect("run by common::spawn_child (LD_CHILD unset)");
    let var = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} unset"));
    let e = Engine::open(EngineConfig {
        pool: PathBuf::from(var("LD_POOL")),
        runtime_dir: PathBuf::from(var("LD_RUN")),
    })
    .await
    .expect("child: open");
    let snap = SnapshotId::parse(&var("LD_SNAP")).expect("LD_SNAP");
    assert_eq!(op, "merge", "unknown child op");
    e.delete_snapshot(&snap, None).await.expect("child: merge");
}

fn code<T>(r: Result<T, livedisk_engine::EngineError>) -> Option<ErrorCode> {
    r.map(|_| ()).map_err(|e| e.code()).err()
}

/// Writes one checksummed block per listed block number; returns the
/// blocks as the writer's log has them.
fn write(w: &mut Writer, blocks: &[u64]) -> Vec<u64> {
    let from = w.log().len();
    for b in blocks {
        w.write_block(*b).expect("write");
    }
    w.log()[from..].iter().map(|a: &Ack| a.block).collect()
}

/// Every page of a delta, three extents per page (paging is part of what
/// the CSI side streams).
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

fn union(lists: &[&[Extent]]) -> Vec<Extent> {
    livedisk_engine::extents::union(lists.iter().copied())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_from_a_deleted_base_equals_the_writers_log() {
    let env = TestEnv::new("tomb");
    let vol = VolumeId::generate();
    let [s1, s2, s3, s4] = [(); 4].map(|_| SnapshotId::generate());
    let e = env.engine().await;
    e.create_volume(&vol, 64 * MIB).await.expect("create");
    let uri = e.attach_volume(&vol).await.expect("attach").uri();
    let disk = NbdFile::mount(&env.root.join("c0"), &uri, false);
    let mut w = Writer::open(&disk.file, TAG).expect("writer");
    // 16 blocks per cluster: B rewrites one of A's clusters, and A has
    // clusters B never touches, so a delta that leaked the deleted
    // snapshot's own writes (or lost B's rewrite) would show.
    let a = write(&mut w, &[0, 20, 500]);
    e.create_snapshot(&vol, &s1).await.expect("s1");
    let b = write(&mut w, &[5, 800, 801, 2000]);
    e.create_snapshot(&vol, &s2).await.expect("s2");
    let c = write(&mut w, &[21, 3000]);
    let (a, b, c) = (clusters_of(a), clusters_of(b), clusters_of(c));
    assert_eq!(delta_all(&e, &s1, &s2).await, b);

    // A real merge: s2's layer is committed into s1's.
    e.delete_snapshot(&s1, None).await.expect("delete s1");
    assert_eq!(delta_all(&e, &s1, &s2).await, b, "delta from deleted s1");
    assert_eq!(
        e.allocated(&s2, 0, 100).await.expect("alloc").extents,
        union(&[&a, &b]),
        "s2's record now holds s1's writes too"
    );
    e.create_snapshot(&vol, &s3).await.expect("s3");
    assert_eq!(delta_all(&e, &s1, &s3).await, union(&[&b, &c]));
    assert_eq!(delta_all(&e, &s2, &s3).await, c);
    // A backup over NBD from the deleted base: the export's dirty-bitmap
    // context, read back by nbdinfo, says the same.
    let x = e
        .export_snapshot_changed_since(&s3, &s1)
        .await
        .expect("export s3 changed since deleted s1");
    let context = x.dirty_bitmap.clone().expect("dirty bitmap context");
    assert_eq!(
        nbdinfo_map(&x.uri(), &context, |t| t == 1),
        union(&[&b, &c])
    );
    e.unexport_snapshot(&s3).await.expect("unexport s3");

    // Only a delta's base accepts the ID: the snapshot is gone.
    assert_eq!(code(e.snapshot(&s1)), Some(ErrorCode::NotFound));
    assert!(
        !e.list_snapshots(&vol)
            .expect("list")
            .iter()
            .any(|i| i.id == s1)
    );
    assert_eq!(
        code(e.allocated(&s1, 0, 10).await),
        Some(ErrorCode::NotFound)
    );
    assert_eq!(
        code(e.delta(&s2, &s1, 0, 10).await),
        Some(ErrorCode::NotFound),
        "a tombstone is never a target"
    );
    assert_eq!(
        code(e.export_snapshot(&s1).await),
        Some(ErrorCode::NotFound)
    );
    assert_eq!(
        code(
            e.create_volume_from_snapshot(&VolumeId::generate(), &s1, None)
                .await
        ),
        Some(ErrorCode::NotFound)
    );

    // A restart of the daemon and the engine: the tombstone is durable.
    let mut log = w.into_log();
    drop(disk);
    e.daemon()
        .signal_and_wait(libc::SIGTERM, Duration::from_secs(30))
        .await
        .expect("clean stop");
    drop(e);
    let e = env.engine().await;
    assert_eq!(delta_all(&e, &s1, &s3).await, union(&[&b, &c]));

    // Deleting its boundary (s2) moves it on to s3, exactly.
    e.delete_snapshot(&s2, None).await.expect("delete s2");
    assert_eq!(delta_all(&e, &s1, &s3).await, union(&[&b, &c]));
    assert_eq!(delta_all(&e, &s2, &s3).await, c);
    let rec = e.record(&vol).expect("record");
    assert_eq!(rec.tombstones.len(), 2, "{:?}", rec.tombstones);

    // Deleting the last later snapshot ends them: nothing bounds them any
    // more, and a snapshot taken afterwards does not revive them.
    let disk = NbdFile::mount(&env.root.join("c1"), &uri, false);
    let mut w = Writer::open(&disk.file, TAG)
        .expect("writer")
        .with_next_seq(log.len() as u64 + 1);
    let d = clusters_of(write(&mut w, &[40, 4000]));
    e.delete_snapshot(&s3, None).await.expect("delete s3");
    assert!(e.record(&vol).expect("record").tombstones.is_empty());
    e.create_snapshot(&vol, &s4).await.expect("s4");
    for gone in [&s1, &s2, &s3] {
        assert_eq!(
            code(e.delta(gone, &s4, 0, 10).await),
            Some(ErrorCode::NotFound),
            "{gone}"
        );
    }
    assert_eq!(
        e.allocated(&s4, 0, 100).await.expect("alloc").extents,
        union(&[&a, &b, &c, &d])
    );
    log.extend(w.into_log());
    drop(disk);
    let ro = NbdFile::mount(&env.root.join("c2"), &uri, true);
    let r = verify(&ro.file, TAG, &log).expect("verify");
    assert!(r.ok(), "{:?}", r.mismatches);
}

fn fill(file: &std::path::Path, offset: u64, len: usize, byte: u8) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(file)
        .expect("open");
    f.write_all_at(&vec![byte; len], offset).expect("fill");
    f.sync_all().expect("fsync");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deletion_killed_mid_merge_leaves_the_snapshot_or_its_tombstone() {
    for case in [
        "daemon killed mid-copy",
        "failpoint merge-before-finalize, daemon too",
        "failpoint merge-after-complete, library only",
    ] {
        let env = TestEnv::new("tombkill");
        let vol = VolumeId::generate();
        let [s1, s2] = [(); 2].map(|_| SnapshotId::generate());
        let e = env.engine().await;
        e.create_volume(&vol, 64 * MIB).await.expect("create");
        let uri = e.attach_volume(&vol).await.expect("attach").uri();
        let disk = NbdFile::mount(&env.root.join("c0"), &uri, false);
        let mut w = Writer::open(&disk.file, TAG).expect("writer");
        let a = clusters_of(write(&mut w, &[0, 20, 500]));
        e.create_snapshot(&vol, &s1).await.expect("s1");
        let b_blocks = write(&mut w, &[5, 800, 2000]);
        // 16 MiB for the merge to copy, so that a kill lands mid-copy.
        fill(&disk.file, 8 * MIB, 16 * MIB as usize, 0x5a);
        e.create_snapshot(&vol, &s2).await.expect("s2");
        let b = union(&[
            &clusters_of(b_blocks),
            &[Extent {
                offset: 8 * MIB,
                length: 16 * MIB,
            }],
        ]);
        let log = w.into_log();
        drop(disk);
        assert_eq!(delta_all(&e, &s1, &s2).await, b, "{case}: before");

        if case == "daemon killed mid-copy" {
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
                    .find(|j| j.id == job)
                    .expect("job exists");
                if j.current_progress > 0 && j.current_progress < j.total_progress {
                    break;
                }
                assert!(t.elapsed() < Duration::from_secs(120), "{case}: {j:?}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            // While it is being deleted, the base still answers.
            assert_eq!(delta_all(&e, &s1, &s2).await, b, "{case}: mid-merge");
            e.daemon()
                .signal_and_wait(libc::SIGKILL, Duration::from_secs(10))
                .await
                .expect("kill -9 daemon");
            drop(e);
        } else {
            drop(e);
            let point = case
                .split_whitespace()
                .nth(1)
                .expect("failpoint name")
                .trim_end_matches(',');
            let daemon = if case.contains("daemon too") {
                "1"
            } else {
                "0"
            };
            let vars = [
                ("LD_SNAP", s1.to_string()),
                ("LIVEDISK_FAILPOINT", point.to_owned()),
                ("LIVEDISK_FAILPOINT_DAEMON", daemon.to_owned()),
            ];
            let mut child = spawn_child(&env, "merge", &vars);
            let st = wait_child(&mut child, CHILD_TIMEOUT);
            use std::os::unix::process::ExitStatusExt;
            assert_eq!(
                st.signal(),
                Some(libc::SIGKILL),
                "{case}: failpoint not reached: {st}"
            );
            // The record still names s1: the crash came before its save.
            let rec = livedisk_engine::record::RecordStore::new(&env.cfg.pool)
                .load(&vol)
                .expect("load")
                .expect("record");
            assert!(rec.snapshot(&s1).is_some(), "{case}: {rec:?}");
        }

        // Reopening finishes the deletion: s1 is gone, its tombstone
        // answers exactly B.
        let e = env.engine().await;
        let rec = e.record(&vol).expect("record");
        assert!(rec.in_flight.is_none(), "{case}: merge not finished");
        assert!(rec.snapshot(&s1).is_none(), "{case}");
        assert!(rec.tombstone(&s1).is_some(), "{case}: no tombstone");
        assert_eq!(code(e.snapshot(&s1)), Some(ErrorCode::NotFound), "{case}");
        assert_eq!(delta_all(&e, &s1, &s2).await, b, "{case}: after");
        assert_eq!(
            e.allocated(&s2, 0, 100).await.expect("alloc").extents,
            union(&[&a, &b]),
            "{case}"
        );
        check_sealed_layers(&e, &vol);
        let ro = NbdFile::mount(&env.root.join("c1"), &uri, true);
        let r = verify(&ro.file, TAG, &log).expect("verify");
        assert!(r.ok(), "{case}: {:?}", r.mismatches);
        drop(ro);
        eprintln!("{case}: ok");
    }
}
