//! Recovery lists the daemon's nodes, and QEMU 7.2 segfaults on
//! `query-named-block-nodes` while a `block-stream` job that ended waits to be
//! dismissed: a clone's flatten does, from its end until its flush and
//! dismissal, and it can end between any look at `query-jobs` and a listing
//! (seen: a node's daemon died so in an end-to-end run, an adopter pass
//! listing nodes as a restored volume's flatten concluded). A full recovery
//! in that state must keep the daemon alive and still see which nodes are
//! missing.

mod common;

use common::*;
use livedisk_engine::{DaemonPolicy, Engine, Recovery, SnapshotId, VolumeId};
use serde_json::json;

const MIB: u64 = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_recovery_beside_a_finished_undismissed_stream_keeps_the_daemon() {
    let env = TestEnv::new("settle");
    let e = env.engine().await;
    let vol = VolumeId::generate();
    e.create_volume(&vol, 8 * MIB).await.expect("create");
    e.create_snapshot(&vol, &SnapshotId::generate())
        .await
        .expect("snapshot");
    let mut before = volume_node_names(&e, &vol).await;
    before.sort();

    finished_stream_left_undismissed(&env, &e, "tstream").await;
    // The active layer's node gone behind the engine's back: recovery must
    // see that it is missing, and add it again.
    let rec = e.record(&vol).expect("record");
    let active = rec.node_name(rec.layers.last().expect("a layer").seq);
    e.qmp()
        .execute("blockdev-del", json!({ "node-name": active }))
        .await
        .expect("drop the active layer's node");
    let pid = env.daemon_pid();

    let admin = Engine::open_admin(env.cfg.clone(), Recovery::Full, DaemonPolicy::AttachOnly)
        .await
        .expect("a full recovery while the stream waits for dismissal");
    assert_eq!(admin.recovery_errors(), vec![]);
    let alive = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| !stat.contains(") Z "));
    assert!(alive, "the daemon died");
    assert_eq!(env.daemon_pid(), pid, "the daemon was replaced");
    // The recovery dismissed the job, which no record waits for: listing
    // the nodes the usual way is safe again.
    assert!(
        !admin
            .jobs()
            .await
            .expect("jobs")
            .iter()
            .any(|j| j.id == "tstream"),
        "the stale stream job stays"
    );
    let mut after = volume_node_names(&admin, &vol).await;
    after.sort();
    assert_eq!(after, before, "the volume's nodes after recovery");
    check_volume_layers(&admin, &vol);
}
