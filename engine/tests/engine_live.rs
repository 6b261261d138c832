//! The engine against a real qemu-storage-daemon, real qcow2 files and a
//! writer that never stops.

mod common;

use std::time::{Duration, Instant};

use common::*;
use livedisk_engine::{Engine, ErrorCode, Extent, Origin, SnapshotId, VolumeId};
use livedisk_verifier::writer::longest_stall;
use livedisk_verifier::{Writer, verify, verify_point_in_time};

const MIB: u64 = 1 << 20;

/// Writes one block in each listed cluster (first block of the cluster).
fn write_clusters(w: &mut Writer, clusters: &[u64]) -> Vec<u64> {
    clusters
        .iter()
        .map(|c| {
            let b = c * CLUSTER / BLOCK;
            w.write_block(b).expect("foreground write");
            b
        })
        .collect()
}

async fn all_pages(e: &Engine, base: Option<&SnapshotId>, target: &SnapshotId) -> Vec<Extent> {
    // Small pages on purpose: exercises resuming at a starting offset.
    let mut out = vec![];
    let mut start = 0;
    loop {
        let page = match base {
            Some(b) => e.delta(b, target, start, 2).await,
            None => e.allocated(target, start, 2).await,
        }
        .expect("extent query");
        let Some(last) = page.extents.last() else {
            break;
        };
        start = last.end();
        out.extend(page.extents);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_merges_and_changed_blocks_with_a_live_writer() {
    let env = TestEnv::new("live");
    let e = env.engine().await;
    let vol = VolumeId::generate();
    e.create_volume(&vol, 64 * MIB).await.expect("create");
    let attach = e.attach_volume(&vol).await.expect("attach");
    let disk = NbdFile::mount(&env.root.join("consumer"), &attach.uri(), false);

    // Background writer through cluster 0 the whole time; foreground writer
    // (tag 2) for chosen clusters between snapshots.
    let (bg, mut fg) = live_writers(&disk.file).await;

    let p1 = write_clusters(&mut fg, &[10, 11]);
    let s1 = SnapshotId::generate();
    let s1_acked = (bg.last_acked(), fg.next_seq() - 1);
    let (_, t1) = e.create_snapshot(&vol, &s1).await.expect("snapshot 1");
    let s1_issued = (bg.issued_bound(), fg.next_seq());

    let p2 = write_clusters(&mut fg, &[20, 21, 500]);
    let s2 = SnapshotId::generate();
    let (_, t2) = e.create_snapshot(&vol, &s2).await.expect("snapshot 2");

    let p3 = write_clusters(&mut fg, &[30, 1000]);
    let s3 = SnapshotId::generate();
    e.create_snapshot(&vol, &s3).await.expect("snapshot 3");
    let _p4 = write_clusters(&mut fg, &[40]);
    eprintln!(
        "snapshot latency: transaction {:?}/{:?}, total {:?}/{:?}",
        t1.transaction, t2.transaction, t1.total, t2.total
    );

    // Changed blocks = the writer's log at cluster granularity (+ cluster 0,
    // which the background writer keeps dirtying).
    let exp_alloc_s1 = clusters_of(p1.iter().copied().chain([0]));
    let exp_d12 = clusters_of(p2.iter().copied().chain([0]));
    let exp_d23 = clusters_of(p3.iter().copied().chain([0]));
    assert_eq!(all_pages(&e, None, &s1).await, exp_alloc_s1);
    assert_eq!(all_pages(&e, Some(&s1), &s2).await, exp_d12);
    assert_eq!(all_pages(&e, Some(&s2), &s3).await, exp_d23);
    // And the daemon's own view over NBD block status agrees.
    let x2 = e.export_snapshot(&s2).await.expect("export s2");
    assert_eq!(nbdinfo_local_extents(&x2.uri()), exp_d12);
    e.unexport_snapshot(&s2).await.expect("unexport s2");

    // Snapshot 1 holds exactly what was acknowledged before the call.
    let x1 = e.export_snapshot(&s1).await.expect("export s1");
    let raw = env.root.join("s1.raw");
    export_to_raw(&x1.uri(), &raw);
    e.unexport_snapshot(&s1).await.expect("unexport s1");

    // Delete snapshot 1 = commit s2's layer into s1's, with the writer running.
    let t = Instant::now();
    e.delete_snapshot(&s1, None)
        .await
        .expect("delete s1 (merge)");
    eprintln!("merge (non-active) took {:?}", t.elapsed());
    assert_eq!(all_pages(&e, Some(&s2), &s3).await, exp_d23);
    assert_eq!(
        all_pages(&e, None, &s2).await,
        clusters_of(p1.iter().chain(&p2).copied().chain([0]))
    );
    // Deleted s1 left a tombstone: the delta from it is still exactly the
    // writer's log after it (a backup tool's last base, issue 12).
    let exp_d13 = clusters_of(p2.iter().chain(&p3).copied().chain([0]));
    assert_eq!(all_pages(&e, Some(&s1), &s3).await, exp_d13);
    assert_eq!(
        e.allocated(&s1, 0, 10).await.map_err(|e| e.code()).err(),
        Some(ErrorCode::NotFound)
    );

    // Delete snapshot 3 (the latest) under writes: internal seal of the
    // active layer, then a non-active commit of it into s3's layer.
    let t = Instant::now();
    e.delete_snapshot(&s3, None)
        .await
        .expect("delete s3 (seal + commit)");
    eprintln!("latest deletion (seal + commit) took {:?}", t.elapsed());
    let p5 = write_clusters(&mut fg, &[50]);
    let s4 = SnapshotId::generate();
    e.create_snapshot(&vol, &s4).await.expect("snapshot 4");
    // s3's writes (and the sealed layer's) were kept for the next record,
    // so they show up here.
    assert_eq!(
        all_pages(&e, Some(&s2), &s4).await,
        clusters_of(p3.iter().chain(&p5).copied().chain([1000 * 16, 40 * 16, 0]))
    );
    // The daemon agrees: what its view of s4 holds above s2's layer (s4's
    // layer and the internal one under it, which took s3's writes and the
    // internally sealed layer's).
    let rec = e.record(&vol).expect("record");
    let pos = |s: &SnapshotId| {
        rec.layers
            .iter()
            .position(|l| l.sealed_by.as_ref() == Some(s))
            .expect("layer")
    };
    let above = (pos(&s4) - pos(&s2)) as u64;
    assert_eq!(above, 2, "{:?}", rec.layers);
    let x4 = e.export_snapshot(&s4).await.expect("export s4");
    assert_eq!(
        nbdinfo_extents_within(&x4.uri(), above),
        all_pages(&e, Some(&s2), &s4).await
    );
    e.unexport_snapshot(&s4).await.expect("unexport s4");
    // s1's tombstone is bounded by s2, which lives: it reaches s4 too. The
    // latest (s3) had no later snapshot when deleted, so it left none.
    assert_eq!(
        all_pages(&e, Some(&s1), &s4).await,
        livedisk_engine::extents::union([
            exp_d12.as_slice(),
            all_pages(&e, Some(&s2), &s4).await.as_slice()
        ])
    );
    assert_eq!(
        e.delta(&s3, &s4, 0, 10).await.map_err(|e| e.code()).err(),
        Some(ErrorCode::NotFound)
    );

    let bg_log = bg.stop().expect("bg writer");
    let fg_log = fg.into_log();
    // Every acknowledged write reads back through the attach path.
    for (tag, log) in [(1, &bg_log), (2, &fg_log)] {
        let r = verify(&disk.file, tag, log).expect("verify");
        assert!(r.ok(), "tag {tag}: {:?}", r.mismatches);
    }
    let v1 = verify_point_in_time(&raw, 1, &bg_log, s1_acked.0, s1_issued.0).expect("pit");
    assert!(v1.ok(), "snapshot 1 (bg): {:?}", v1.mismatches);
    let v2 = verify_point_in_time(&raw, 2, &fg_log, s1_acked.1, s1_issued.1).expect("pit");
    assert!(v2.ok(), "snapshot 1 (fg): {:?}", v2.mismatches);
    let (lat, gap) = longest_stall(&bg_log);
    eprintln!(
        "writer: {} writes, longest write {lat:?}, longest gap {gap:?}",
        bg_log.len()
    );
    assert_eq!(e.list_snapshots(&vol).expect("list").len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_changes_nothing() {
    let env = TestEnv::new("bad");
    let e = env.engine().await;
    let a = VolumeId::generate();
    let b = VolumeId::generate();
    e.create_volume(&a, 8 * MIB).await.expect("create a");
    e.create_volume(&b, 8 * MIB).await.expect("create b");
    let sa = SnapshotId::generate();
    let sb = SnapshotId::generate();
    let sa2 = SnapshotId::generate();
    e.create_snapshot(&a, &sa).await.expect("snap a");
    e.create_snapshot(&a, &sa2).await.expect("snap a2");
    e.create_snapshot(&b, &sb).await.expect("snap b");
    all_captured(&e).await;
    let before = pool_fingerprint(&env.cfg.pool);

    for bad in ["../x", "vol-../../etc", "/etc/passwd", "vol-", ""] {
        let err = VolumeId::parse(bad).expect_err(bad);
        assert!(err.to_string().contains("invalid volume id"), "{err}");
    }
    let unknown = VolumeId::generate();
    let code = |r: Result<(), livedisk_engine::EngineError>| r.map_err(|e| e.code()).err();
    assert_eq!(
        code(e.delete_volume(&unknown).await),
        Some(ErrorCode::NotFound)
    );
    assert_eq!(
        code(e.expand_volume(&unknown, 16 * MIB).await.map(|_| ())),
        Some(ErrorCode::NotFound)
    );
    assert_eq!(
        code(
            e.create_snapshot(&unknown, &SnapshotId::generate())
                .await
                .map(|_| ())
        ),
        Some(ErrorCode::NotFound)
    );
    let shrink = e.expand_volume(&a, 4 * MIB).await.expect_err("shrink");
    assert_eq!(shrink.code(), ErrorCode::OutOfRange);
    assert!(shrink.to_string().contains("cannot shrink"), "{shrink}");
    let other = e
        .delta(&sb, &sa2, 0, 10)
        .await
        .expect_err("other volume's base");
    assert_eq!(other.code(), ErrorCode::InvalidArgument);
    assert!(other.to_string().contains("belongs to volume"), "{other}");
    assert_eq!(
        e.delta(&sa2, &sa, 0, 10)
            .await
            .map(|_| ())
            .map_err(|e| e.code())
            .err(),
        Some(ErrorCode::InvalidArgument)
    );
    assert_eq!(
        code(e.delete_snapshot(&SnapshotId::generate(), None).await),
        Some(ErrorCode::NotFound)
    );
    // A snapshot id reused for another volume.
    assert_eq!(
        code(e.create_snapshot(&b, &sa).await.map(|_| ())),
        Some(ErrorCode::AlreadyExists)
    );
    assert_eq!(
        code(e.create_volume(&a, 16 * MIB).await.map(|_| ())),
        Some(ErrorCode::AlreadyExists)
    );
    assert_eq!(pool_fingerprint(&env.cfg.pool), before, "pool changed");
    // Idempotent retries succeed without changes.
    e.create_volume(&a, 8 * MIB)
        .await
        .expect("idempotent create");
    e.create_snapshot(&a, &sa)
        .await
        .expect("idempotent snapshot");
    assert_eq!(pool_fingerprint(&env.cfg.pool), before, "pool changed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reattach_and_recovery_after_daemon_kill() {
    let env = TestEnv::new("rec");
    let vol = VolumeId::generate();
    let s1 = SnapshotId::generate();
    let log;
    let expected;
    {
        let e = env.engine().await;
        assert_eq!(e.daemon().origin, Origin::Started);
        e.create_volume(&vol, 16 * MIB).await.expect("create");
        let x = e.attach_volume(&vol).await.expect("attach");
        let disk = NbdFile::mount(&env.root.join("c1"), &x.uri(), false);
        let mut w = Writer::open(&disk.file, 7).expect("writer");
        let blocks = write_clusters(&mut w, &[1, 2, 3]);
        e.create_snapshot(&vol, &s1).await.expect("snapshot");
        write_clusters(&mut w, &[4]);
        expected = clusters_of(blocks);
        log = w.into_log();
    }
    let pid = env.daemon_pid();

    // The library's process "restarts": it re-attaches, never a second daemon.
    let e = env.engine().await;
    assert_eq!(e.daemon().origin, Origin::Attached);
    assert_eq!(env.daemon_pid(), pid);
    assert_eq!(
        e.allocated(&s1, 0, 100).await.expect("alloc").extents,
        expected
    );

    // The daemon dies hard; the next open starts one and rebuilds everything
    // (chains and the volume's export) from the records.
    e.daemon()
        .signal_and_wait(libc::SIGKILL, Duration::from_secs(5))
        .await
        .expect("kill daemon");
    drop(e);
    let e = env.engine().await;
    assert_eq!(e.daemon().origin, Origin::Started);
    assert_ne!(env.daemon_pid(), pid);
    assert_eq!(
        e.allocated(&s1, 0, 100).await.expect("alloc").extents,
        expected
    );
    // Rebuilt like the snapshot left it: the sealed layer read-only (so a
    // commit into it ends with QEMU's flushing reopen), the active one not.
    let rec = e.record(&vol).expect("record");
    let nodes = block_nodes(&e).await;
    let ro = |seq: u64| {
        let name = rec.node_name(seq);
        nodes
            .iter()
            .find(|n| n["node-name"] == name.as_str())
            .and_then(|n| n["ro"].as_bool())
            .unwrap_or_else(|| panic!("node {name} missing: {nodes:?}"))
    };
    let (sealed, active) = (rec.layers[0].seq, rec.layers[rec.layers.len() - 1].seq);
    assert!(ro(sealed), "sealed layer must be read-only after a rebuild");
    assert!(!ro(active), "the active layer must stay writable");
    let xs = e.export_snapshot(&s1).await.expect("export snapshot");
    assert_eq!(nbdinfo_local_extents(&xs.uri()), expected);
    // The volume export came back by itself: read the data through it.
    let uri = format!(
        "nbd+unix:///{vol}?socket={}",
        env.cfg.runtime_dir.join("nbd.sock").display()
    );
    let raw = env.root.join("vol.raw");
    export_to_raw(&uri, &raw);
    let r = verify(&raw, 7, &log).expect("verify");
    assert!(r.ok(), "{:?}", r.mismatches);
    // And work continues: a merge after the restart.
    e.unexport_snapshot(&s1).await.expect("unexport");
    e.delete_snapshot(&s1, None)
        .await
        .expect("merge after restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_snapshot_is_one_instant_across_volumes() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let env = TestEnv::new("grp");
    let e = env.engine().await;
    let (a, b) = (VolumeId::generate(), VolumeId::generate());
    let mut disks = vec![];
    for (i, v) in [&a, &b].into_iter().enumerate() {
        e.create_volume(v, 16 * MIB).await.expect("create");
        let x = e.attach_volume(v).await.expect("attach");
        disks.push(NbdFile::mount(
            &env.root.join(format!("c{i}")),
            &x.uri(),
            false,
        ));
    }
    // One global sequence, alternating volumes, each write to a fresh block:
    // a consistent cut holds exactly the writes 1..=k for some k.
    let mut wa = Writer::open(&disks[0].file, 1).expect("wa");
    let mut wb = Writer::open(&disks[1].file, 2).expect("wb");
    let stop = Arc::new(AtomicBool::new(false));
    let st = stop.clone();
    let writer = std::thread::spawn(move || {
        let mut seq = 1;
        let mut i = 0;
        while !st.load(Ordering::SeqCst) && i < 4000 {
            for w in [&mut wa, &mut wb] {
                w.set_next_seq(seq);
                w.write_block(i).expect("write");
                seq += 1;
            }
            i += 1;
        }
        (wa.into_log(), wb.into_log())
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let (sa, sb) = (SnapshotId::generate(), SnapshotId::generate());
    let (_, t) = e
        .create_snapshots(&[(a.clone(), sa.clone()), (b.clone(), sb.clone())])
        .await
        .expect("group snapshot");
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.store(true, Ordering::SeqCst);
    let (la, lb) = writer.join().expect("writer thread");
    eprintln!("group snapshot transaction {:?}", t.transaction);

    let mut present = vec![];
    for (snap, tag, log) in [(&sa, 1u64, &la), (&sb, 2, &lb)] {
        let x = e.export_snapshot(snap).await.expect("export");
        let raw = env.root.join(format!("{snap}.raw"));
        export_to_raw(&x.uri(), &raw);
        let data = std::fs::read(&raw).expect("read raw");
        for ack in log {
            let off = (ack.block * BLOCK) as usize;
            if let Ok(h) = livedisk_verifier::decode(&data[off..off + BLOCK as usize]) {
                assert_eq!((h.tag, h.block, h.seq), (tag, ack.block, ack.seq));
                present.push(h.seq);
            }
        }
    }
    present.sort_unstable();
    let k = present.len() as u64;
    assert!(k > 0, "snapshot holds no writes");
    assert_eq!(
        present,
        (1..=k).collect::<Vec<_>>(),
        "cut is not consistent"
    );
    assert!(
        k < (la.len() + lb.len()) as u64,
        "writer stopped before snapshot"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_progress_rate_limit_and_cancel() {
    use std::io::Write as _;
    use std::sync::Arc;

    let env = TestEnv::new("job");
    let e = Arc::new(env.engine().await);
    let vol = VolumeId::generate();
    e.create_volume(&vol, 64 * MIB).await.expect("create");
    let x = e.attach_volume(&vol).await.expect("attach");
    let disk = NbdFile::mount(&env.root.join("c"), &x.uri(), false);
    let (s1, s2) = (SnapshotId::generate(), SnapshotId::generate());
    e.create_snapshot(&vol, &s1).await.expect("s1");
    {
        // 16 MiB of data in s2's layer: the merge has something to copy.
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&disk.file)
            .expect("open");
        f.write_all(&vec![0x5a; 16 * MIB as usize]).expect("write");
        f.sync_all().expect("fsync");
    }
    e.create_snapshot(&vol, &s2).await.expect("s2");

    // Delete s1 = commit s2's layer (16 MiB) into s1's, limited to 2 MiB/s.
    let job = Engine::merge_job_id(&s1);
    let e2 = e.clone();
    let s1c = s1.clone();
    let merge = tokio::spawn(async move { e2.delete_snapshot(&s1c, Some(2 * MIB)).await });
    merge_copying(&e, &job).await;
    // A snapshot meanwhile is taken (the job is stopped and started again for it), and the
    // merge goes on under the same job id.
    let s3 = SnapshotId::generate();
    retrying_busy("snapshot during the merge", || e.create_snapshot(&vol, &s3)).await;
    assert!(!merge.is_finished(), "the snapshot waited for the merge");
    assert!(
        e.jobs().await.expect("jobs").iter().any(|j| j.id == job),
        "the merge job was not started again after the snapshot"
    );
    e.cancel_job(&job).await.expect("cancel");
    let r = merge.await.expect("join");
    assert_eq!(r.map_err(|e| e.code()).err(), Some(ErrorCode::Cancelled));
    // s1 is doomed (its layer may hold s2 data now) and cannot be read...
    assert_eq!(
        e.export_snapshot(&s1)
            .await
            .map(|_| ())
            .map_err(|e| e.code())
            .err(),
        Some(ErrorCode::FailedPrecondition)
    );
    // ...but deleting it again finishes the merge, unthrottled.
    e.delete_snapshot(&s1, None).await.expect("finish merge");
    assert_eq!(e.list_snapshots(&vol).expect("list").len(), 2);
    let data = std::fs::read(&disk.file).expect("read back");
    assert!(data[..16 * MIB as usize].iter().all(|b| *b == 0x5a));
}
