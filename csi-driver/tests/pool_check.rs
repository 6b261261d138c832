//! The node's full-pool checks (`node::pool_check`) against a real engine on a real small pool
//! (a 64 MiB ext4 image, loop-mounted): what the volumes were promised and have not written
//! takes the room, so a volume, a clone and a snapshot are refused with RESOURCE_EXHAUSTED
//! although the file system still has the space, and pass again once a volume is deleted.
//!
//! Needs root (loop mounts) and qemu-storage-daemon.

#[path = "../../engine/tests/common/mod.rs"]
mod common;
#[path = "../../engine/tests/common/small_pool.rs"]
mod small_pool;

use std::sync::Arc;
use std::time::Duration;

use common::{TestEnv, qemu_io_write, wait_until};
use livedisk_api::internal::{ContentSource, ErrorCode};
use livedisk_csi::node::pool_check::{
    clone_source_need, need_of, pool_too_small, snapshot_too_big,
};
use livedisk_engine::pool_space::{self, Need};
use livedisk_engine::{Engine, VolumeId};
use small_pool::SmallPool;

const MIB: u64 = 1 << 20;

fn free(e: &Engine) -> u64 {
    pool_space::available_bytes(e.pool()).expect("statvfs of the pool")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promises_take_the_room_of_volumes_clones_and_snapshots() {
    let mut env = TestEnv::new("pcheck");
    let _fs = SmallPool::for_engine(&mut env, 64 * MIB);
    let e = Arc::new(env.engine().await);

    // A volume of 24 MiB fits an empty pool of about 50 MiB; the node lets it through.
    let size = 24 * MIB;
    assert!(pool_too_small(&e, need_of(size, None)).await.is_none());
    let vol = VolumeId::generate();
    e.create_volume(&vol, size).await.expect("create");
    let uri = e.attach_volume(&vol).await.expect("attach").uri();
    qemu_io_write(&uri, 0x5a, 0, 12 * MIB);
    e.detach_volume(&vol).await.expect("detach");

    // A second one of the same size still fits what is left after the first one's promise.
    assert!(pool_too_small(&e, need_of(size, None)).await.is_none());
    let other = VolumeId::generate();
    e.create_volume(&other, size)
        .await
        .expect("create the other");

    // Now the promises take nearly all of it, though the file system has room for any of these.
    let room = e.pool_room().expect("room");
    assert!(room.available() < 4 * MIB, "{room:?}");
    assert!(free(&e) > 24 * MIB, "{} bytes free", free(&e));
    let volume = pool_too_small(&e, need_of(8 * MIB, None))
        .await
        .expect("a new volume is refused");
    assert_eq!(volume.code, ErrorCode::ResourceExhausted);
    assert!(volume.message.contains("of them promised"), "{volume:?}");
    let snapshot = snapshot_too_big(&e, &vol)
        .await
        .expect("a snapshot of the written volume is refused");
    assert_eq!(snapshot.code, ErrorCode::ResourceExhausted);
    assert!(
        snapshot.message.contains("the snapshot needs"),
        "{snapshot:?}"
    );
    let from_volume = ContentSource {
        snapshot_id: None,
        volume_id: Some(vol.to_string()),
    };
    let source = clone_source_need(&e, Some(&from_volume)).expect("the source's snapshot need");
    assert!(
        matches!(source, Need::Snapshot { active_allocated, .. } if active_allocated >= 12 * MIB),
        "{source:?}"
    );
    let clone = pool_too_small(&e, need_of(size, Some(source)))
        .await
        .expect("a clone is refused");
    assert!(clone.message.contains("the clone needs"), "{clone:?}");
    // A volume that does not grow needs nothing, however full the pool.
    assert!(pool_too_small(&e, need_of(0, Some(source))).await.is_none());

    // The other volume deleted (its promise gone), the snapshot and the clone fit again.
    e.delete_volume(&other).await.expect("delete the other");
    wait_until("the promise released", Duration::from_secs(30), || {
        e.pool_room().is_ok_and(|r| r.available() > 20 * MIB)
    })
    .await;
    assert!(snapshot_too_big(&e, &vol).await.is_none());
    let clone_need = need_of(8 * MIB, Some(source));
    assert!(
        pool_too_small(&e, clone_need).await.is_none(),
        "{clone_need:?}"
    );
}
