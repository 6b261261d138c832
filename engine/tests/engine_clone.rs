//! Clones of a live volume, one engine operation: the engine takes a hidden
//! base snapshot of the source, makes the clone from it, and deletes the
//! base itself once the clone is flattened — also when a crash (of the
//! process, or of the process and the daemon) came in between, and when
//! the clone is deleted. A deletion that cannot delete the base fails and
//! is retried, never leaving the base behind.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::time::Duration;

use common::*;
use livedisk_engine::clone::flatten_job_id;
use livedisk_engine::record::RecordStore;
use livedisk_engine::{Engine, EngineConfig, ErrorCode, SnapshotId, VolumeId, hidden_base_id};

const MIB: u64 = 1 << 20;
const CHILD_TIMEOUT: Duration = Duration::from_secs(120);

fn code<T>(r: Result<T, livedisk_engine::EngineError>) -> Option<ErrorCode> {
    r.map(|_| ()).map_err(|e| e.code()).err()
}

/// Not a test of its own: the body of the child process that
/// `common::spawn_child` re-executes (with `--ignored`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "child-process entry point of the clone crash tests, run by them"]
async fn child_entry() {
    let op = std::env::var("LD_CHILD").expect("run by common::spawn_child (LD_CHILD unset)");
    let var = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} unset"));
    let e = Engine::open(EngineConfig {
        pool: PathBuf::from(var("LD_POOL")),
        runtime_dir: PathBuf::from(var("LD_RUN")),
    })
    .await
    .expect("child: open");
    let source = VolumeId::parse(&var("LD_VOL")).expect("LD_VOL");
    let clone = VolumeId::parse(&var("LD_CLONE")).expect("LD_CLONE");
    match op.as_str() {
        "clone" => {
            // Dies at the failpoint: inside the call, or in the background
            // once the clone is flattened.
            e.clone_volume(&clone, &source, None)
                .await
                .expect("child: clone");
            tokio::time::sleep(CHILD_TIMEOUT).await;
        }
        other => panic!("unknown child op {other}"),
    }
}

/// The record of a volume, read from the pool as a crash left it.
fn record_on_disk(env: &TestEnv, id: &VolumeId) -> Option<livedisk_engine::record::VolumeRecord> {
    RecordStore::new(&env.cfg.pool).load(id).expect("load")
}

/// A 32 MiB source volume with 8 MiB of pattern 0x11, detached.
async fn source_with_data(e: &Engine) -> VolumeId {
    let src = VolumeId::generate();
    e.create_volume(&src, 32 * MIB).await.expect("create");
    let x = e.attach_volume(&src).await.expect("attach");
    qemu_io_write(&x.uri(), 0x11, 0, 8 * MIB);
    e.detach_volume(&src).await.expect("detach");
    src
}

/// `delete_volume`, again while the answer is "busy": the adopter may hold
/// the volume or its source for a moment while it retries the same base.
async fn delete_volume(e: &Engine, id: &VolumeId) -> Result<(), livedisk_engine::EngineError> {
    for _ in 0..100 {
        match e.delete_volume(id).await {
            Err(err) if err.code() == ErrorCode::Aborted => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            r => return r,
        }
    }
    e.delete_volume(id).await
}

async fn wait_base_gone(e: &Engine, base: &SnapshotId) {
    wait_until(
        "the hidden base to be deleted",
        Duration::from_secs(60),
        || e.snapshot(base).is_err(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clone_takes_a_hidden_base_and_deletes_it_once_flattened() {
    let env = TestEnv::new("vclone");
    let e = env.engine().await;
    let src = VolumeId::generate();
    e.create_volume(&src, 32 * MIB).await.expect("create");
    let sx = e.attach_volume(&src).await.expect("attach").uri();
    qemu_io_write(&sx, 0x11, 0, 8 * MIB);

    // Refusals change nothing and take no base.
    let c = VolumeId::generate();
    all_captured(&e).await;
    let before = pool_fingerprint(&env.cfg.pool);
    assert_eq!(
        code(e.clone_volume(&c, &src, Some(MIB)).await),
        Some(ErrorCode::OutOfRange)
    );
    assert_eq!(
        code(e.clone_volume(&c, &VolumeId::generate(), None).await),
        Some(ErrorCode::NotFound)
    );
    assert_eq!(
        code(e.clone_volume(&src, &src, None).await),
        Some(ErrorCode::InvalidArgument)
    );
    assert_eq!(
        pool_fingerprint(&env.cfg.pool),
        before,
        "refusals changed the pool"
    );

    // Cloned from the attached, written source; flattened slowly.
    e.clone_volume_with(&c, &src, Some(48 * MIB), Some(256 * 1024))
        .await
        .expect("clone");
    e.clone_volume(&c, &src, Some(48 * MIB))
        .await
        .expect("the same clone again");
    assert_eq!(
        code(e.clone_volume(&c, &VolumeId::generate(), None).await),
        Some(ErrorCode::AlreadyExists)
    );
    let base = hidden_base_id(&c);
    let origin = e.record(&c).expect("clone record").cloned_from;
    assert_eq!(origin.and_then(|o| o.hidden_base), Some(base.clone()));
    let srec = e.record(&src).expect("source record");
    assert_eq!(
        srec.snapshot(&base).and_then(|s| s.for_clone.clone()),
        Some(c.clone()),
        "the base is marked with its clone"
    );
    assert!(!e.is_flattened(&c).expect("rec"));
    let progress = e.flatten_progress(&c).await.expect("progress");
    assert!(progress.is_some(), "an unflattened clone reports progress");

    // Later writes on the source do not reach the clone; the clone's own
    // writes stay in the clone.
    qemu_io_write(&sx, 0x22, 0, MIB);
    let cx = e.attach_volume(&c).await.expect("attach clone").uri();
    qemu_io_read(&cx, 0x11, 0, 8 * MIB);
    qemu_io_write(&cx, 0x33, 8 * MIB, MIB);

    // Flattened: the engine deletes the base by itself.
    e.set_job_speed(&flatten_job_id(&c), 0)
        .await
        .expect("unthrottle");
    e.wait_flattened(&c, Duration::from_secs(120))
        .await
        .expect("flattened");
    assert_eq!(e.flatten_progress(&c).await.expect("progress"), None);
    wait_base_gone(&e, &base).await;
    wait_until("the base recorded gone", Duration::from_secs(10), || {
        e.record(&c)
            .expect("clone record")
            .cloned_from
            .is_some_and(|o| o.hidden_base.is_none())
    })
    .await;
    assert_eq!(e.record(&src).expect("source").snapshots, vec![]);

    // Both volumes read what they should.
    qemu_io_read(&sx, 0x22, 0, MIB);
    qemu_io_read(&sx, 0x11, MIB, 7 * MIB);
    qemu_io_read(&cx, 0x11, 0, 8 * MIB);
    qemu_io_read(&cx, 0x33, 8 * MIB, MIB);
    e.detach_volume(&c).await.expect("detach clone");
    e.detach_volume(&src).await.expect("detach source");
    check_volume_layers(&e, &c);
    check_volume_layers(&e, &src);

    // Deleting an unflattened clone deletes its base at once.
    let d = VolumeId::generate();
    e.clone_volume_with(&d, &src, None, Some(64 * 1024))
        .await
        .expect("second clone");
    assert!(e.snapshot(&hidden_base_id(&d)).is_ok());
    delete_volume(&e, &d)
        .await
        .expect("delete unflattened clone");
    assert_eq!(
        code(e.snapshot(&hidden_base_id(&d))),
        Some(ErrorCode::NotFound)
    );
    for v in [&c, &src] {
        delete_volume(&e, v).await.expect("delete");
    }
    e.reclaimed().await;
    let left: Vec<_> = std::fs::read_dir(&env.cfg.pool)
        .expect("pool")
        .flatten()
        .map(|d| d.file_name())
        .filter(|n| n != ".reclaim")
        .collect();
    assert!(left.is_empty(), "pool not empty: {left:?}");
}

/// A crash at either side of a clone's life: while its base is being taken
/// (the base is rolled forward marked, no clone was recorded: an orphan,
/// deleted), or after it was flattened and before its base was deleted
/// (deleted then). With the process alone, and with the daemon too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_around_a_clone_leaves_no_hidden_base_after_recovery() {
    for (point, daemon_too, clone_recorded) in [
        ("clone-before-release", false, true),
        ("clone-before-release", true, true),
        ("snapshot-after-transaction", false, false),
    ] {
        eprintln!("case: {point}, daemon killed too: {daemon_too}");
        let env = TestEnv::new("vclonecrash");
        let src = {
            let e = env.engine().await;
            source_with_data(&e).await
        };
        let c = VolumeId::generate();
        let base = hidden_base_id(&c);
        let vars = vec![
            ("LD_VOL", src.to_string()),
            ("LD_CLONE", c.to_string()),
            ("LIVEDISK_FAILPOINT", point.to_owned()),
            (
                "LIVEDISK_FAILPOINT_DAEMON",
                if daemon_too { "1" } else { "0" }.to_owned(),
            ),
        ];
        let mut child = spawn_child(&env, "clone", &vars);
        let st = wait_child(&mut child, CHILD_TIMEOUT);
        assert_eq!(
            st.signal(),
            Some(libc::SIGKILL),
            "{point}: failpoint not reached: {st}"
        );

        // What the crash left: the marked base, and the clone's record
        // naming it (flattened) or no clone at all.
        let clone_rec = record_on_disk(&env, &c);
        assert_eq!(clone_rec.is_some(), clone_recorded, "{point}");
        if let Some(r) = &clone_rec {
            assert!(
                r.clone_of.is_none(),
                "{point}: not flattened before the release"
            );
            assert_eq!(r.hidden_base_to_release(), Some(&base), "{point}");
        }
        let srec = record_on_disk(&env, &src).expect("source record");
        let pending_mark = srec
            .pending_snapshot
            .as_ref()
            .and_then(|p| p.for_clone.clone());
        let sealed_mark = srec.snapshot(&base).and_then(|s| s.for_clone.clone());
        assert_eq!(
            sealed_mark.or(pending_mark),
            Some(c.clone()),
            "{point}: the base (or its intent) is marked"
        );

        // Recovery deletes the base; the clone (if any) keeps its data.
        let e = env.engine().await;
        assert_eq!(
            code(e.snapshot(&base)),
            Some(ErrorCode::NotFound),
            "{point}"
        );
        assert_eq!(e.record(&src).expect("source").snapshots, vec![], "{point}");
        if clone_recorded {
            let r = e.record(&c).expect("clone");
            assert_eq!(
                r.hidden_base_to_release(),
                None,
                "{point} daemon {daemon_too}: {r:?}"
            );
            let cx = e.attach_volume(&c).await.expect("attach clone").uri();
            qemu_io_read(&cx, 0x11, 0, 8 * MIB);
            e.detach_volume(&c).await.expect("detach clone");
            check_volume_layers(&e, &c);
        } else {
            // The call is simply repeated.
            e.clone_volume(&c, &src, None).await.expect("clone again");
            e.wait_flattened(&c, Duration::from_secs(120))
                .await
                .expect("flattened");
            wait_base_gone(&e, &base).await;
        }
        check_volume_layers(&e, &src);
    }
}

/// Deleting a clone whose base cannot be deleted yet (something holds the
/// base: here a read-only export of it, which refuses the merge that would
/// delete it) fails, and keeps failing, with the base still there; once the
/// holder lets go, the repeated deletion finishes it and nothing is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clone_deletion_that_cannot_delete_the_base_fails_and_is_retried() {
    let env = TestEnv::new("vclonedel");
    let e = env.engine().await;
    let src = source_with_data(&e).await;
    let c = VolumeId::generate();
    e.clone_volume_with(&c, &src, None, Some(64 * 1024))
        .await
        .expect("clone");
    let base = hidden_base_id(&c);
    let held = e.export_snapshot(&base).await.expect("export the base");
    qemu_io_read(&held.uri(), 0x11, 0, 8 * MIB);
    e.set_job_speed(&flatten_job_id(&c), 0)
        .await
        .expect("unthrottle");
    e.wait_flattened(&c, Duration::from_secs(120))
        .await
        .expect("flattened");
    // Flattened, but the base is held: it stays, recorded as to be deleted.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(e.snapshot(&base).is_ok());
    assert_eq!(
        e.record(&c).expect("record").hidden_base_to_release(),
        Some(&base)
    );

    for attempt in 0..2 {
        assert_eq!(
            code(delete_volume(&e, &c).await),
            Some(ErrorCode::FailedPrecondition),
            "attempt {attempt}: a deletion that leaves the base must fail"
        );
        assert!(e.snapshot(&base).is_ok(), "attempt {attempt}");
        qemu_io_read(&held.uri(), 0x11, 0, 8 * MIB);
    }
    assert_eq!(code(e.volume(&c)), Some(ErrorCode::NotFound));

    e.unexport_snapshot(&base).await.expect("unexport");
    // The repeated deletion finishes the base (unless the adopter swept
    // the orphan first: then there is nothing left to do).
    match delete_volume(&e, &c).await {
        Ok(()) => {}
        Err(err) if err.code() == ErrorCode::NotFound => {}
        Err(err) => panic!("the retried deletion failed: {err}"),
    }
    assert_eq!(code(e.snapshot(&base)), Some(ErrorCode::NotFound));
    assert_eq!(code(delete_volume(&e, &c).await), Some(ErrorCode::NotFound));
    assert_eq!(e.record(&src).expect("source").snapshots, vec![]);
    let sx = e.attach_volume(&src).await.expect("attach").uri();
    qemu_io_read(&sx, 0x11, 0, 8 * MIB);
    e.detach_volume(&src).await.expect("detach");
    check_volume_layers(&e, &src);
}
