//! The consumer's data path, proved with the verifier: Block volumeMode is a
//! loop device (no direct I/O) over an nbdfuse file of the daemon's NBD
//! export (no `nbd` module here); Filesystem volumeMode is ext4 on it.
//! Writes go on through snapshots and merges; then the consumer side
//! crashes (kill -9 of nbdfuse, no unmount, no flush) and the daemon is
//! killed too: every acknowledged write must still be in the image.

mod common;

use std::time::Duration;

use common::*;
use livedisk_engine::{SnapshotId, VolumeId};
use livedisk_verifier::writer::longest_stall;
use livedisk_verifier::{BackgroundWriter, Pattern, Writer, verify, verify_point_in_time};

const MIB: u64 = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_mode_loop_over_nbdfuse_keeps_acknowledged_writes_through_crashes() {
    let env = TestEnv::new("blk");
    let e = env.engine().await;
    let vol = VolumeId::generate();
    e.create_volume(&vol, 64 * MIB).await.expect("create");
    let uri = e.attach_volume(&vol).await.expect("attach").uri();
    let fuse = NbdFile::mount(&env.root.join("f0"), &uri, false);
    let lo = LoopDev::attach(&fuse.file);

    let bg = BackgroundWriter::start(
        Writer::open(&lo.dev, 1).expect("open loop device"),
        Pattern::Sequential {
            first: 0,
            count: 512,
        },
        Duration::from_millis(1),
    );
    let wait_more = |n: u64| {
        let seen = bg.last_acked();
        move |b: &BackgroundWriter| b.last_acked() >= seen + n
    };
    let more = wait_more(50);
    wait_until("writes", Duration::from_secs(60), || more(&bg)).await;
    let s: Vec<SnapshotId> = (0..3).map(|_| SnapshotId::generate()).collect();
    e.create_snapshot(&vol, &s[0]).await.expect("s0");
    let s1_acked = bg.last_acked();
    e.create_snapshot(&vol, &s[1]).await.expect("s1");
    let s1_issued = bg.issued_bound();
    let more = wait_more(50);
    wait_until("writes", Duration::from_secs(60), || more(&bg)).await;
    e.create_snapshot(&vol, &s[2]).await.expect("s2");
    // A non-active and an active merge under the writer.
    e.delete_snapshot(&s[0], None).await.expect("merge s0");
    e.delete_snapshot(&s[2], None)
        .await
        .expect("active commit s2");
    let more = wait_more(50);
    wait_until("writes", Duration::from_secs(60), || more(&bg)).await;
    let log = bg.stop().expect("the writer saw no error");
    let r = verify(&lo.dev, 1, &log).expect("verify via loop");
    assert!(r.ok(), "through the loop device: {:?}", r.mismatches);

    // Consumer-side crash: nbdfuse dies without unmount or flush.
    kill9(fuse.pid());
    drop(lo);
    drop(fuse);
    let raw = env.root.join("after-consumer-crash.raw");
    export_to_raw(&uri, &raw);
    let r = verify(&raw, 1, &log).expect("verify");
    assert!(r.ok(), "after the consumer crash: {:?}", r.mismatches);

    // And the daemon dies too: the acknowledged writes are in the files.
    e.daemon()
        .signal_and_wait(libc::SIGKILL, Duration::from_secs(10))
        .await
        .expect("kill -9 daemon");
    drop(e);
    let e = env.engine().await;
    check_volume_layers(&e, &vol);
    let raw = env.root.join("after-daemon-crash.raw");
    export_to_raw(&uri, &raw);
    let r = verify(&raw, 1, &log).expect("verify");
    assert!(r.ok(), "after the daemon crash: {:?}", r.mismatches);
    // The snapshot taken through this path is a clean point in time.
    let x = e.export_snapshot(&s[1]).await.expect("export s1");
    let sraw = env.root.join("s1.raw");
    export_to_raw(&x.uri(), &sraw);
    let r = verify_point_in_time(&sraw, 1, &log, s1_acked, s1_issued).expect("pit");
    assert!(r.ok(), "snapshot s1: {:?}", r.mismatches);
    e.unexport_snapshot(&s[1]).await.expect("unexport");

    // Re-attach, read back, clean detach: no loop device, no mount left.
    let fuse = NbdFile::mount(&env.root.join("f1"), &uri, false);
    let lo = LoopDev::attach(&fuse.file);
    let r = verify(&lo.dev, 1, &log).expect("verify");
    assert!(r.ok(), "re-attached: {:?}", r.mismatches);
    let file = fuse.file.clone();
    drop(lo);
    drop(fuse);
    e.detach_volume(&vol).await.expect("detach");
    let left = std::process::Command::new("losetup")
        .arg("-j")
        .arg(&file)
        .output()
        .expect("losetup -j");
    assert!(left.stdout.is_empty(), "loop device left behind");
    let (lat, gap) = longest_stall(&log);
    eprintln!(
        "block path: {} writes verified; longest write {lat:?}, longest gap {gap:?} \
         (3 snapshots, 2 merges)",
        log.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filesystem_mode_ext4_survives_a_consumer_crash() {
    let env = TestEnv::new("fs");
    let e = env.engine().await;
    let vol = VolumeId::generate();
    e.create_volume(&vol, 128 * MIB).await.expect("create");
    let uri = e.attach_volume(&vol).await.expect("attach").uri();
    let fuse = NbdFile::mount(&env.root.join("f0"), &uri, false);
    let lo = LoopDev::attach(&fuse.file);
    mkfs_ext4(&lo.dev);
    let mnt = Mounted::mount(&lo.dev, &env.root.join("mnt"));
    let data = mnt.target.join("data");
    std::fs::File::create(&data)
        .and_then(|f| f.set_len(4 * MIB))
        .expect("data file");

    let bg = BackgroundWriter::start(
        Writer::open(&data, 7).expect("open data file"),
        Pattern::Sequential {
            first: 0,
            count: 1024,
        },
        Duration::from_millis(1),
    );
    wait_until("writes", Duration::from_secs(60), || bg.last_acked() >= 100).await;
    let s1 = SnapshotId::generate();
    e.create_snapshot(&vol, &s1).await.expect("snapshot");
    wait_until("writes", Duration::from_secs(60), || bg.last_acked() >= 300).await;
    e.delete_snapshot(&s1, None).await.expect("active commit");
    wait_until("writes", Duration::from_secs(60), || bg.last_acked() >= 500).await;
    let log = bg.stop().expect("the writer saw no error");

    // Consumer-side crash while mounted: no unmount, no flush.
    kill9(fuse.pid());
    drop(mnt);
    drop(lo);
    drop(fuse);

    // Re-attach: mounting replays the journal; every acknowledged write of
    // the file is there, and the filesystem checks clean.
    let fuse = NbdFile::mount(&env.root.join("f1"), &uri, false);
    let lo = LoopDev::attach(&fuse.file);
    let mnt = Mounted::mount(&lo.dev, &env.root.join("mnt2"));
    let r = verify(&mnt.target.join("data"), 7, &log).expect("verify");
    assert!(r.ok(), "after the consumer crash: {:?}", r.mismatches);
    drop(mnt);
    fsck_clean(&lo.dev);
    drop(lo);
    drop(fuse);
    e.detach_volume(&vol).await.expect("detach");
    check_volume_layers(&e, &vol);
    let (lat, gap) = longest_stall(&log);
    eprintln!(
        "filesystem path: {} writes verified, fsck clean; longest write {lat:?}, \
         longest gap {gap:?} (snapshot + active commit)",
        log.len()
    );
}
