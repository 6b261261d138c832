//! The node plugin's engine follows its daemon across a restart: kill -9 of the daemon under a
//! live engine, then whoever owns the daemon starts it again. While it is gone the session is
//! `Lost`, every operation fails UNAVAILABLE and the engine starts no daemon of its own; once one
//! listens again the engine re-attaches and brings it in line as `Engine::open` does (chains,
//! the export of the attached volume, the merge the kill interrupted), and only then serves
//! again. Its adopter follows the new session.

mod common;

use std::time::Duration;

use common::*;
use livedisk_engine::DaemonPolicy;
use livedisk_engine::daemon::{self, Monitor};
use livedisk_engine::{
    Engine, ErrorCode, MergeMode, MergeOptions, Recovery, RuntimeDir, SessionState, SnapshotId,
    VolumeId,
};

const MIB: u64 = 1 << 20;

async fn wait_session(e: &Engine, what: &str, within: Duration, want: fn(&SessionState) -> bool) {
    let mut states = e.session_changes();
    tokio::time::timeout(within, states.wait_for(want))
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for the session to be {what}"))
        .expect("session");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_follows_its_daemon_across_a_restart() {
    let env = TestEnv::new("recon");
    let e = env.engine().await;
    assert_eq!(e.session(), SessionState::Live);
    let vol = VolumeId::generate();
    let (s1, s2, s3) = (
        SnapshotId::generate(),
        SnapshotId::generate(),
        SnapshotId::generate(),
    );
    e.create_volume(&vol, 16 * MIB).await.expect("create");
    let uri = e.attach_volume(&vol).await.expect("attach").uri();
    qemu_io_write(&uri, 1, 0, MIB);
    e.create_snapshot(&vol, &s1).await.expect("s1");
    qemu_io_write(&uri, 2, MIB, 4 * MIB);
    e.create_snapshot(&vol, &s2).await.expect("s2");
    qemu_io_write(&uri, 3, 8 * MIB, MIB);
    // Deleting s1 commits the 4 MiB above it; throttled, the daemon dies in the middle.
    let job = e
        .start_snapshot_delete(
            &s1,
            MergeOptions {
                mode: MergeMode::Commit,
                speed: Some(512 * 1024),
            },
        )
        .await
        .expect("start the merge of s1");
    tokio::time::sleep(Duration::from_millis(700)).await;
    let jobs = e.jobs().await.expect("jobs");
    assert!(
        jobs.iter().any(|j| j.id == job && j.status == "running"),
        "merge not mid-way: {jobs:?}"
    );
    let old_pid = env.daemon_pid();

    e.daemon()
        .signal_and_wait(libc::SIGKILL, Duration::from_secs(10))
        .await
        .expect("kill -9 of the daemon");
    wait_session(&e, "lost", Duration::from_secs(5), |s| {
        matches!(s, SessionState::Lost { .. })
    })
    .await;
    assert_eq!(
        e.jobs().await.map(drop).map_err(|e| e.code()).err(),
        Some(ErrorCode::Unavailable),
        "an operation without a daemon"
    );
    // The engine waits for the daemon's owner; it never starts one itself (it retries every
    // half second: three tries at least).
    tokio::time::sleep(Duration::from_millis(1600)).await;
    assert!(matches!(e.session(), SessionState::Lost { .. }));
    assert_eq!(daemons_for(&env.cfg.runtime_dir), 0, "a daemon was started");

    // The owner starts the daemon again (as the engine DaemonSet or `admin start` would).
    let (started, admin) = daemon::start_or_attach_on(
        RuntimeDir::new(&env.cfg.runtime_dir),
        Monitor::Admin,
        DaemonPolicy::StartWhenAbsent,
    )
    .await
    .expect("restart the daemon");
    drop(admin);
    let new_pid = started.pid.expect("pid of the new daemon");
    assert_ne!(new_pid, old_pid);
    wait_session(&e, "live again", Duration::from_secs(90), |s| {
        *s == SessionState::Live
    })
    .await;
    assert_eq!(e.daemon().pid, Some(new_pid));
    assert_eq!(e.recovery_errors(), vec![]);

    // In line with the records: the interrupted merge finished, the chain and the volume's
    // export are back, and every write acknowledged before the kill reads back.
    let rec = e.record(&vol).expect("record");
    assert!(rec.in_flight.is_none(), "merge left in flight: {rec:?}");
    assert_eq!(
        rec.snapshots.iter().map(|s| &s.id).collect::<Vec<_>>(),
        vec![&s2]
    );
    assert_eq!(e.jobs().await.expect("jobs"), vec![]);
    let mut want: Vec<String> = rec.layers.iter().map(|l| rec.node_name(l.seq)).collect();
    let mut have = volume_node_names(&e, &vol).await;
    want.sort();
    have.sort();
    assert_eq!(have, want, "the daemon's nodes of the volume");
    check_sealed_layers(&e, &vol);
    qemu_io_read(&uri, 1, 0, MIB);
    qemu_io_read(&uri, 2, MIB, 4 * MIB);
    qemu_io_read(&uri, 3, 8 * MIB, MIB);

    // The adopter follows the new session: a merge the admin CLI starts and leaves behind is
    // finished by the node plugin's engine once its job waits for a finisher.
    {
        let admin = Engine::open_admin(
            env.cfg.clone(),
            Recovery::Light,
            DaemonPolicy::StartWhenAbsent,
        )
        .await
        .expect("admin engine");
        admin
            .start_snapshot_delete(&s2, MergeOptions::default())
            .await
            .expect("the admin starts the merge of s2");
    }
    wait_until(
        "the adopter finishing the merge of s2",
        Duration::from_secs(60),
        || {
            e.record(&vol)
                .is_ok_and(|r| r.in_flight.is_none() && r.snapshots.is_empty())
        },
    )
    .await;

    // And the next operations work as before the restart.
    qemu_io_write(&uri, 4, 12 * MIB, MIB);
    e.create_snapshot(&vol, &s3)
        .await
        .expect("s3 after the restart");
    let x = e.export_snapshot(&s3).await.expect("export s3");
    qemu_io_read(&x.uri(), 1, 0, MIB);
    qemu_io_read(&x.uri(), 2, MIB, 4 * MIB);
    qemu_io_read(&x.uri(), 4, 12 * MIB, MIB);
    e.unexport_snapshot(&s3).await.expect("unexport s3");
    e.detach_volume(&vol).await.expect("detach");
    for l in &e.record(&vol).expect("record").layers {
        qemu_img_check(&e.layer_path(&vol, l.seq));
    }
    assert_eq!(daemons_for(&env.cfg.runtime_dir), 1);
}

/// In the chart the engine pod owns the daemon and the node plugin only attaches: a node plugin
/// that starts first waits for the daemon instead of starting one in its own container (which
/// would die with that container and cut every consumer's I/O), and an attach-only admin command
/// fails at once, saying who starts the daemon.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attach_only_engine_waits_for_the_owners_daemon_and_never_starts_one() {
    let env = TestEnv::new("attach");
    let admin = Engine::open_admin(env.cfg.clone(), Recovery::Light, DaemonPolicy::AttachOnly)
        .await
        .err()
        .expect("an attach-only admin engine without a daemon");
    assert_eq!(admin.code(), ErrorCode::Unavailable);
    assert!(
        admin.to_string().contains("only attaches"),
        "the error says why: {admin}"
    );

    let opening = tokio::spawn(Engine::open_with(env.cfg.clone(), DaemonPolicy::AttachOnly));
    tokio::time::sleep(Duration::from_millis(1600)).await;
    assert!(!opening.is_finished(), "the engine opened without a daemon");
    assert_eq!(daemons_for(&env.cfg.runtime_dir), 0, "a daemon was started");

    // The owner starts the daemon (as the engine pod does); the waiting engine attaches to it.
    let (started, owner) = daemon::start_or_attach_on(
        RuntimeDir::new(&env.cfg.runtime_dir),
        Monitor::Admin,
        DaemonPolicy::StartWhenAbsent,
    )
    .await
    .expect("the owner starts the daemon");
    drop(owner);
    let e = tokio::time::timeout(Duration::from_secs(30), opening)
        .await
        .expect("the engine attached within 30 s")
        .expect("join")
        .expect("engine open");
    assert_eq!(
        e.daemon().pid,
        started.pid,
        "attached to the owner's daemon"
    );
    assert_eq!(daemons_for(&env.cfg.runtime_dir), 1);
    let vol = VolumeId::generate();
    e.create_volume(&vol, 16 * MIB)
        .await
        .expect("create on the attached daemon");
}
