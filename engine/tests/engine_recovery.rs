//! Recovery is bounded: a volume whose recovery outlasts the per-volume
//! bound (here a throttled merge of a deleted volume's snapshot) is reported
//! by `recovery_errors()` while `Engine::open` returns and the rest of the
//! pool opens. Its own binary: the bound is set through the environment.

mod common;

use std::time::Duration;

use common::*;
use livedisk_engine::{Engine, MergeMode, MergeOptions, SnapshotId, VolumeId};
use livedisk_verifier::{Writer, verify_point_in_time};

const MIB: u64 = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_is_bounded_and_reports_a_volume_it_cannot_finish() {
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
    let errs = e.recovery_errors();
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(errs[0].0, vol);
    // The rest of the pool is open.
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
