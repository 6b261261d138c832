//! A merge deleting a snapshot does not hold its volume: the volume is detached, attached,
//! snapshotted and exported while the job copies, against a real qemu-storage-daemon. Data is
//! checked against the patterns written (qemu-io), not against another read of the engine's.

mod common;

use std::sync::Arc;

use common::*;
use livedisk_engine::{
    Engine, EngineError, ErrorCode, Extent, MergeMode, MergeOptions, SnapshotId, VolumeId,
};

const MIB: u64 = 1 << 20;

async fn snapshot(e: &Engine, vol: &VolumeId) -> SnapshotId {
    let s = SnapshotId::generate();
    e.create_snapshot(vol, &s).await.expect("snapshot");
    s
}

async fn delta_all(e: &Engine, base: &SnapshotId, target: &SnapshotId) -> Vec<Extent> {
    e.delta(base, target, 0, 100_000)
        .await
        .expect("delta")
        .extents
}

fn ids(e: &Engine, vol: &VolumeId) -> Vec<SnapshotId> {
    e.list_snapshots(vol)
        .expect("list")
        .into_iter()
        .map(|s| s.id)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merge_holding_the_active_layer_is_paused_for_a_snapshot_and_the_volume_stays_usable() {
    let env = TestEnv::new("mpause");
    let e = Arc::new(env.engine().await);
    let vol = VolumeId::generate();
    e.create_volume(&vol, 64 * MIB).await.expect("create");
    let x = e.attach_volume(&vol).await.expect("attach");
    qemu_io_write(&x.uri(), 0x11, 0, 16 * MIB);
    let s1 = snapshot(&e, &vol).await;
    qemu_io_write(&x.uri(), 0x22, 16 * MIB, 16 * MIB);
    let s2 = snapshot(&e, &vol).await;
    qemu_io_write(&x.uri(), 0x44, 48 * MIB, 2 * MIB);

    // Deleting s1 commits s2's layer (16 MiB) into s1's at 2 MiB/s: the job holds the layer
    // above it, the active one.
    let job = Engine::merge_job_id(&s1);
    let merge = {
        let (e, s1) = (e.clone(), s1.clone());
        tokio::spawn(async move { e.delete_snapshot(&s1, Some(2 * MIB)).await })
    };
    merge_copying(&e, &job).await;

    // The attach path needs only the volume's lock.
    retrying_busy("detach during the merge", || e.detach_volume(&vol)).await;
    let x = retrying_busy("attach during the merge", || e.attach_volume(&vol)).await;
    // A snapshot stops the job, switches, and starts the job again.
    let s3 = SnapshotId::generate();
    retrying_busy("snapshot during the merge", || e.create_snapshot(&vol, &s3)).await;
    assert!(!merge.is_finished(), "the snapshot waited for the merge");
    assert_eq!(e.job_stats().merge_restarts(), 1);
    assert!(
        e.jobs().await.expect("jobs").iter().any(|j| j.id == job),
        "the merge job was not started again"
    );
    // A snapshot above the merged layers is served meanwhile.
    let sx = retrying_busy("export s3 during the merge", || e.export_snapshot(&s3)).await;
    qemu_io_read(&sx.uri(), 0x11, 0, 16 * MIB);
    qemu_io_read(&sx.uri(), 0x22, 16 * MIB, 16 * MIB);
    qemu_io_read(&sx.uri(), 0x44, 48 * MIB, 2 * MIB);
    retrying_busy("unexport s3", || e.unexport_snapshot(&s3)).await;
    // One whose layer the job merges cannot be (QEMU unshares its consistent read): refused
    // as busy, retried by the caller once the merge is done.
    let refused = retrying_busy("export s2 during the merge", || async {
        match e.export_snapshot(&s2).await {
            Err(EngineError::Busy(m)) if m.contains("being merged") => Ok(m),
            Err(other) => Err(other),
            Ok(x) => panic!("s2's layer was exported under its merge: {x:?}"),
        }
    })
    .await;
    assert_eq!(EngineError::Busy(refused).code(), ErrorCode::Aborted);
    qemu_io_write(&x.uri(), 0x33, 32 * MIB, 16 * MIB);

    merge
        .await
        .expect("join")
        .expect("the merge finishes after its restart");
    assert!(
        e.job_stats().merge_copied_again_bytes() > 0,
        "the restarted commit's extra copy is not counted"
    );
    assert_eq!(ids(&e, &vol), vec![s2.clone(), s3.clone()]);
    // Changed blocks stay exact: between s2 and s3 only the 2 MiB written before the merge.
    assert_eq!(
        delta_all(&e, &s2, &s3).await,
        vec![Extent {
            offset: 48 * MIB,
            length: 2 * MIB
        }]
    );
    for (snap, tail) in [(&s2, 0x00), (&s3, 0x44)] {
        let sx = e.export_snapshot(snap).await.expect("export");
        qemu_io_read(&sx.uri(), 0x11, 0, 16 * MIB);
        qemu_io_read(&sx.uri(), 0x22, 16 * MIB, 16 * MIB);
        qemu_io_read(&sx.uri(), 0x00, 32 * MIB, 16 * MIB);
        qemu_io_read(&sx.uri(), tail, 48 * MIB, 2 * MIB);
        e.unexport_snapshot(snap).await.expect("unexport");
    }
    qemu_io_read(&x.uri(), 0x33, 32 * MIB, 16 * MIB);
    qemu_io_read(&x.uri(), 0x44, 48 * MIB, 2 * MIB);
    e.detach_volume(&vol).await.expect("detach");
    check_volume_layers(&e, &vol);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_into_a_sealed_layer_goes_on_under_a_snapshot_without_a_restart() {
    let env = TestEnv::new("mdeep");
    let e = Arc::new(env.engine().await);
    let vol = VolumeId::generate();
    e.create_volume(&vol, 64 * MIB).await.expect("create");
    let x = e.attach_volume(&vol).await.expect("attach");
    qemu_io_write(&x.uri(), 0x11, 0, 16 * MIB);
    let sa = snapshot(&e, &vol).await;
    qemu_io_write(&x.uri(), 0x22, 16 * MIB, MIB);
    let sb = snapshot(&e, &vol).await;
    qemu_io_write(&x.uri(), 0x33, 32 * MIB, MIB);
    let sc = snapshot(&e, &vol).await;

    // Deleting sa by a stream copies its layer (16 MiB) into sb's sealed layer at 2 MiB/s:
    // the job does not hold the active layer.
    let job = Engine::merge_job_id(&sa);
    let merge = {
        let (e, sa) = (e.clone(), sa.clone());
        let opts = MergeOptions {
            mode: MergeMode::Stream,
            speed: Some(2 * MIB),
        };
        tokio::spawn(async move { e.delete_snapshot_with(&sa, opts).await })
    };
    merge_copying(&e, &job).await;
    qemu_io_write(&x.uri(), 0x44, 48 * MIB, MIB);
    let sd = SnapshotId::generate();
    retrying_busy("snapshot during the merge", || e.create_snapshot(&vol, &sd)).await;
    assert!(!merge.is_finished(), "the snapshot waited for the merge");
    assert_eq!(e.job_stats().merge_restarts(), 0, "a restart nobody needed");
    merge.await.expect("join").expect("merge");

    assert_eq!(ids(&e, &vol), vec![sb.clone(), sc.clone(), sd.clone()]);
    assert_eq!(
        delta_all(&e, &sc, &sd).await,
        vec![Extent {
            offset: 48 * MIB,
            length: MIB
        }]
    );
    for (snap, c, d) in [(&sb, 0x00, 0x00), (&sd, 0x33, 0x44)] {
        let sx = e.export_snapshot(snap).await.expect("export");
        qemu_io_read(&sx.uri(), 0x11, 0, 16 * MIB);
        qemu_io_read(&sx.uri(), 0x22, 16 * MIB, MIB);
        qemu_io_read(&sx.uri(), c, 32 * MIB, MIB);
        qemu_io_read(&sx.uri(), d, 48 * MIB, MIB);
        e.unexport_snapshot(snap).await.expect("unexport");
    }
    e.detach_volume(&vol).await.expect("detach");
    check_volume_layers(&e, &vol);
}
