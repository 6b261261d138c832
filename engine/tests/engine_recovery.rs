//! Opening never waits for a merge that outlived the process that started it
//! (here a throttled merge of a deleted volume's snapshot, minutes long): the
//! job goes on in the daemon, `Engine::open` returns at once with nothing to
//! report, the pool opens, and deleting the snapshot again finishes it. (The
//! per-volume recovery bound, `LIVEDISK_RECOVERY_TIMEOUT_SECS`, stays for
//! work recovery must drive itself; it is set low here so that a wait would
//! show as a recovery error.)

mod common;

use std::time::Duration;

use common::*;
use livedisk_engine::{Engine, MergeMode, MergeOptions, SnapshotId, VolumeId};
use livedisk_verifier::{Writer, verify_point_in_time};

const MIB: u64 = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_leaves_a_copying_merge_to_its_finisher_and_the_pool_opens() {
    // SAFETY: the only test of this binary; set before any thread reads it.
    unsafe { std::env::set_var("LIVEDISK_RECOVERY_TIMEOUT_SECS", "2") };
    let env = TestEnv::new("bound");
    let e = env.engine().await;
    let (vol, other) = (VolumeId::generate(), VolumeId::generate());
    e.create_volume(&other, 8 * MIB).await.expect("other");
    e.create_volume(&vol, 32 * MIB).await.expect("create");
    let uri = e.attach_volume(&vol).await.expect("attach").uri();
    let (s1, s2) = (SnapshotId::generate(), SnapshotId::generate());
    let (log, at_s2);
    {
        let disk = NbdFile::mount(&env.root.join("c"), &uri, false);
        let mut w = Writer::open(&disk.file, 9).expect("writer");
        w.write_block(0).expect("write");
        e.create_snapshot(&vol, &s1).await.expect("s1");
        for b in 0..1024 {
            w.write_block(256 + b).expect("write");
        }
        e.create_snapshot(&vol, &s2).await.expect("s2");
        at_s2 = w.next_seq() - 1;
        w.write_block(0).expect("write");
        log = w.into_log();
    }
    e.detach_volume(&vol).await.expect("detach");
    e.delete_volume(&vol).await.expect("delete volume");
    // A merge throttled to take minutes, then the library goes away (the
    // daemon and its job live on).
    let job = e
        .start_snapshot_delete(
            &s1,
            MergeOptions {
                mode: MergeMode::Commit,
                speed: Some(16 * 1024),
            },
        )
        .await
        .expect("start delete s1");
    drop(e);

    let t = std::time::Instant::now();
    let e = tokio::time::timeout(Duration::from_secs(30), Engine::open(env.cfg.clone()))
        .await
        .expect("Engine::open must return")
        .expect("open");
    eprintln!("open took {:?}", t.elapsed());
    assert_eq!(e.recovery_errors(), vec![], "open waited for the merge");
    // The pool is open.
    e.volume(&other).expect("other volume");
    e.attach_volume(&other).await.expect("attach other");
    // The merge went on in the daemon; deleting again finishes it.
    assert!(e.jobs().await.expect("jobs").iter().any(|j| j.id == job));
    e.set_job_speed(&job, 0).await.expect("unthrottle");
    tokio::time::timeout(Duration::from_secs(60), e.delete_snapshot(&s1, None))
        .await
        .expect("bounded")
        .expect("finish delete s1");
    let rec = e.record(&vol).expect("record");
    assert!(rec.in_flight.is_none() && rec.layers.len() == 1);
    let x = e.export_snapshot(&s2).await.expect("export");
    {
        let f = NbdFile::mount(&env.root.join("v"), &x.uri(), true);
        let r = verify_point_in_time(&f.file, 9, &log, at_s2, at_s2 + 1).expect("pit");
        assert!(r.ok(), "s2: {:?}", r.mismatches);
    }
    e.unexport_snapshot(&s2).await.expect("unexport");
    e.delete_snapshot(&s2, None).await.expect("delete s2");
    assert!(!env.cfg.pool.join(vol.as_str()).exists());
    // Reopening now recovers everything.
    drop(e);
    let e = env.engine().await;
    assert_eq!(e.list_volumes().expect("list").len(), 1);
}
