//! A full pool, on a real small file system: an ext4 image of 64 MiB, loop-mounted, holds the
//! pool directory.
//!
//! * A snapshot the pool has no room for is refused with RESOURCE_EXHAUSTED before anything is
//!   made: by the node's rule when the volumes' promises take the room (checked here on the
//!   engine's `pool_room`), by the engine itself when the file system lacks the space; the
//!   record, the snapshot list and every file of the pool stay as they were, and once room is
//!   made the same snapshot is taken.
//! * Something the rule does not see (a file beside the pool) fills the file system under a
//!   volume's consumer, writing through the production data path (a loop device over an
//!   nbdfuse file of the daemon's NBD export): it gets EIO for its `O_DSYNC` write, and ENOSPC
//!   for an `O_DIRECT` write and on the nbdfuse file itself. Every write acknowledged before
//!   reads back, the daemon serves on, and once the file is removed the writes succeed again.

mod common;
#[path = "common/small_pool.rs"]
mod small_pool;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use livedisk_engine::pool_space::{self, Need};
use livedisk_engine::{Engine, ErrorCode, SnapshotId, VolumeId};
use livedisk_verifier::{Ack, Writer, verify};
use small_pool::SmallPool;

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 4096;

fn free(e: &Engine) -> u64 {
    pool_space::available_bytes(e.pool()).expect("statvfs of the pool")
}

fn room(e: &Engine) -> pool_space::Room {
    e.pool_room().expect("the pool's room")
}

/// Writes `len` bytes of data at offset 0 of a volume through its export, then detaches it.
async fn fill(e: &Engine, vol: &VolumeId, pattern: u8, len: u64) {
    let uri = e.attach_volume(vol).await.expect("attach").uri();
    qemu_io_write(&uri, pattern, 0, len);
    e.detach_volume(vol).await.expect("detach");
}

/// A file of `len` bytes of data (not a hole), made durable.
fn write_file(path: &Path, len: u64) {
    use std::io::Write;
    let mut file = std::fs::File::create(path).expect("create the file");
    let block = vec![0xa5u8; MIB as usize];
    for _ in 0..len / MIB {
        file.write_all(&block).expect("write the file");
    }
    file.sync_all().expect("sync the file");
}

/// Deletes a volume and waits until its space is back (layer files are unlinked in the
/// background).
async fn delete_and_wait_for_space(e: &Engine, vol: &VolumeId, at_least: u64) {
    let before = free(e);
    e.delete_volume(vol).await.expect("delete the other volume");
    wait_until(
        "the deleted volume's space",
        Duration::from_secs(30),
        || free(e) >= before + at_least,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_the_pool_cannot_hold_is_refused_and_changes_nothing() {
    let mut env = TestEnv::new("fullsnap");
    let fs = SmallPool::for_engine(&mut env, 64 * MIB);
    let e = env.engine().await;

    let vol = VolumeId::generate();
    let size = 24 * MIB;
    e.create_volume(&vol, size).await.expect("create");
    // A snapshot of a volume with nothing written needs only a layer's metadata.
    let s0 = SnapshotId::generate();
    e.create_snapshot(&vol, &s0)
        .await
        .expect("an empty snapshot fits");
    // Another volume, which the node's check lets through (what the first was promised counted).
    let other = VolumeId::generate();
    assert_eq!(pool_space::refusal(Need::Volume { size }, room(&e)), None);
    e.create_volume(&other, size)
        .await
        .expect("create the other");
    fill(&e, &vol, 0x5a, 12 * MIB).await;
    fill(&e, &other, 0x6b, 16 * MIB).await;

    // The file system still has room for the snapshot, but what the volumes were promised and
    // have not written takes it: the node's check (CSI CreateSnapshot) refuses it.
    let need = e.snapshot_need(&vol).expect("need");
    let promised = room(&e);
    assert!(
        need.bytes() < promised.free && need.bytes() > promised.available(),
        "the setup must leave the file system room but not the pool: need {need:?} ({} bytes), \
         {promised:?}",
        need.bytes()
    );
    let refused = pool_space::refusal(need, promised).expect("the node's check refuses");
    assert!(refused.contains("of them promised"), "{refused}");

    // A file beside the pool leaves the file system itself too little: the engine refuses too.
    let filler = fs.target.join("filler");
    write_file(&filler, 12 * MIB);
    let available = free(&e);
    assert!(need.bytes() > available, "{need:?}: {available} bytes free");
    let record = e.record(&vol).expect("record");
    let snapshots = e.list_snapshots(&vol).expect("snapshots");
    let files = pool_fingerprint(e.pool());

    let s1 = SnapshotId::generate();
    let refused = e
        .create_snapshot(&vol, &s1)
        .await
        .expect_err("a snapshot the pool cannot hold");
    assert_eq!(refused.code(), ErrorCode::ResourceExhausted, "{refused}");
    assert!(
        refused.to_string().contains("the snapshot needs"),
        "{refused}"
    );
    // A group snapshot with the volume in it is refused as a whole.
    let group = e
        .create_snapshots(&[
            (vol.clone(), SnapshotId::generate()),
            (other.clone(), SnapshotId::generate()),
        ])
        .await
        .expect_err("a group snapshot the pool cannot hold");
    assert_eq!(group.code(), ErrorCode::ResourceExhausted, "{group}");

    assert_eq!(
        e.record(&vol).expect("record"),
        record,
        "the record changed"
    );
    assert_eq!(e.list_snapshots(&vol).expect("snapshots"), snapshots);
    assert_eq!(
        pool_fingerprint(e.pool()),
        files,
        "the pool's files changed"
    );
    assert!(e.snapshot(&s1).is_err(), "the refused snapshot exists");
    assert!(free(&e) >= available, "the refusal took pool space");

    // Room made (the file removed, the other volume deleted), the same request passes the
    // node's check and the engine's, and the volume's data is intact in the snapshot.
    std::fs::remove_file(&filler).expect("remove the file beside the pool");
    delete_and_wait_for_space(&e, &other, 8 * MIB).await;
    assert_eq!(pool_space::refusal(need, room(&e)), None);
    e.create_snapshot(&vol, &s1)
        .await
        .expect("the snapshot fits once space is freed");
    let uri = e.attach_volume(&vol).await.expect("attach").uri();
    qemu_io_read(&uri, 0x5a, 0, 12 * MIB);
    e.detach_volume(&vol).await.expect("detach");
    check_volume_layers(&e, &vol);
}

/// The writer's outcome: its acknowledged writes and the error that stopped it, if any.
struct Run {
    acks: Vec<Ack>,
    error: Option<std::io::Error>,
}

/// Writes blocks `first..end` in order, one `O_DSYNC` write each, until one fails.
fn write_until_error(w: &mut Writer, first: u64, end: u64) -> Run {
    let mut acks = vec![];
    for block in first..end {
        match w.write_block(block) {
            Ok(ack) => acks.push(ack),
            Err(error) => {
                return Run {
                    acks,
                    error: Some(error),
                };
            }
        }
    }
    Run { acks, error: None }
}

/// One 4 KiB `O_DIRECT` write with dd; returns its stderr when it fails.
fn direct_write(path: &Path, block: u64) -> Option<String> {
    let out = Command::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}", path.display()))
        .args(["bs=4096", "count=1", "oflag=direct", "conv=notrunc"])
        .arg(format!("seek={block}"))
        .output()
        .expect("dd");
    (!out.status.success()).then(|| String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Every acknowledged write reads back from the daemon itself (a fresh copy of the export, no
/// page cache of the consumer's in between).
fn verify_on_daemon(env: &TestEnv, uri: &str, acks: &[Ack], name: &str) {
    let copy = env.root.join(name);
    export_to_raw(uri, &copy);
    let report = verify(&copy, 1, acks).expect("verify");
    assert!(report.ok(), "{name}: {:?}", report.mismatches);
    let blocks: std::collections::BTreeSet<u64> = acks.iter().map(|a| a.block).collect();
    assert_eq!(report.blocks_checked, blocks.len());
    let _ = std::fs::remove_file(&copy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_that_fills_the_pool_gets_eio_and_keeps_every_acknowledged_write() {
    let mut env = TestEnv::new("fullwr");
    let fs = SmallPool::for_engine(&mut env, 64 * MIB);
    let e = env.engine().await;

    // The volume fits: the node's check lets it through.
    let size = 40 * MIB;
    let vol = VolumeId::generate();
    assert_eq!(pool_space::refusal(Need::Volume { size }, room(&e)), None);
    e.create_volume(&vol, size).await.expect("create");
    // A file beside the pool, which no check of livedisk sees, takes most of what is left.
    let filler = fs.target.join("filler");
    write_file(&filler, 24 * MIB);
    // The rule now refuses a second volume like the first; the volume made keeps its promise
    // only as far as the file system lets it.
    assert!(pool_space::refusal(Need::Volume { size }, room(&e)).is_some());

    let uri = e.attach_volume(&vol).await.expect("attach").uri();
    let fuse = NbdFile::mount(&env.root.join("f0"), &uri, false);
    let lo = LoopDev::attach(&fuse.file);
    let mut w = Writer::open(&lo.dev, 1).expect("open the loop device");
    let blocks = size / BLOCK;

    let first = write_until_error(&mut w, 0, blocks);
    let error = first.error.expect("the pool filled before the volume did");
    let written = first.acks.len() as u64;
    eprintln!(
        "full pool: {written} writes of 4 KiB acknowledged, then {error:?}; {} bytes free",
        free(&e)
    );
    // Buffered (O_DSYNC) writes to the block device go through its page cache, whose
    // write-back turns any failure into EIO.
    assert_eq!(error.raw_os_error(), Some(libc::EIO), "{error}");
    assert!(written > 0 && written < blocks, "{written} of {blocks}");
    // The daemon's own answer is ENOSPC, per request: seen as is with O_DIRECT through the
    // loop device, and on the nbdfuse file.
    let failed = written;
    let direct = direct_write(&lo.dev, failed).expect("an O_DIRECT write to the full pool");
    assert!(direct.contains("No space left on device"), "{direct}");
    let on_file = direct_write(&fuse.file, failed).expect("a write to the nbdfuse file");
    assert!(on_file.contains("No space left on device"), "{on_file}");
    // A write into a cluster already allocated still succeeds on the full pool.
    let mut acks = first.acks;
    acks.push(
        w.write_block(0)
            .expect("an overwrite of an allocated cluster on the full pool"),
    );
    // Nothing acknowledged is lost, and the daemon serves on (the copy reads through it).
    verify_on_daemon(&env, &uri, &acks, "after-enospc.raw");

    // Space freed: the same writer goes on from the write that failed, to the volume's end.
    std::fs::remove_file(&filler).expect("remove the file beside the pool");
    let second = write_until_error(&mut w, failed, blocks);
    assert!(
        second.error.is_none(),
        "after freeing space: {:?}",
        second.error
    );
    acks.extend(second.acks);
    assert_eq!(acks.len() as u64, blocks + 1);
    verify_on_daemon(&env, &uri, &acks, "after-free.raw");

    drop(w);
    drop(lo);
    drop(fuse);
    e.detach_volume(&vol).await.expect("detach");
    check_volume_layers(&e, &vol);
}
