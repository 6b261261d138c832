//! Operations beyond snapshot/merge: the stream merge mode, volumes from
//! snapshots (clones, flattened in the background), deleting a volume while
//! its snapshots stay restorable, revert, and discard reaching the image.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use livedisk_engine::clone::flatten_job_id;
use livedisk_engine::{Engine, ErrorCode, Extent, MergeMode, MergeOptions, SnapshotId, VolumeId};
use livedisk_verifier::{Writer, verify, verify_point_in_time};

const MIB: u64 = 1 << 20;

fn write_clusters(w: &mut Writer, clusters: &[u64]) -> Vec<u64> {
    clusters
        .iter()
        .map(|c| {
            let b = c * CLUSTER / BLOCK;
            w.write_block(b).expect("write");
            b
        })
        .collect()
}

fn code<T>(r: Result<T, livedisk_engine::EngineError>) -> Option<ErrorCode> {
    r.map(|_| ()).map_err(|e| e.code()).err()
}

/// Copies a snapshot's view to a raw file through its read-only export.
async fn snapshot_raw(e: &Engine, env: &TestEnv, s: &SnapshotId) -> std::path::PathBuf {
    let x = e.export_snapshot(s).await.expect("export");
    let raw = env.root.join(format!("{s}.raw"));
    export_to_raw(&x.uri(), &raw);
    e.unexport_snapshot(s).await.expect("unexport");
    raw
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_merge_mode_keeps_every_view() {
    let env = TestEnv::new("stream");
    let e = env.engine().await;
    let vol = VolumeId::generate();
    e.create_volume(&vol, 64 * MIB).await.expect("create");
    let uri = e.attach_volume(&vol).await.expect("attach").uri();
    let disk = NbdFile::mount(&env.root.join("c"), &uri, false);
    let (bg, mut fg) = live_writers(&disk.file).await;
    let s: Vec<SnapshotId> = (0..3).map(|_| SnapshotId::generate()).collect();
    let p0 = write_clusters(&mut fg, &[10]);
    e.create_snapshot(&vol, &s[0]).await.expect("s0");
    let p1 = write_clusters(&mut fg, &[20, 21]);
    e.create_snapshot(&vol, &s[1]).await.expect("s1");
    let p2 = write_clusters(&mut fg, &[30]);
    e.create_snapshot(&vol, &s[2]).await.expect("s2");
    let _p3 = write_clusters(&mut fg, &[40]);
    let d02 = e.delta(&s[0], &s[2], 0, 100).await.expect("delta").extents;

    // Stream s1's layer into s2's (a sealed layer): s2's view must not move.
    let raw2 = snapshot_raw(&e, &env, &s[2]).await;
    let opts = MergeOptions {
        mode: MergeMode::Stream,
        speed: None,
    };
    let merged_before = e.job_stats().merged_bytes();
    e.delete_snapshot_with(&s[1], opts)
        .await
        .expect("stream s1");
    // The job's progress is counted once it concluded (what the node plugin's metrics show).
    assert!(
        e.job_stats().merged_bytes() > merged_before,
        "a merge moved no bytes"
    );
    assert_eq!(
        e.delta(&s[0], &s[2], 0, 100).await.expect("delta").extents,
        d02
    );
    let raw2b = snapshot_raw(&e, &env, &s[2]).await;
    assert_eq!(
        std::fs::read(&raw2).expect("r"),
        std::fs::read(&raw2b).expect("r"),
        "s2's view changed"
    );
    // Stream s2's layer into the active layer, writer running: no switch.
    e.delete_snapshot_with(&s[2], opts)
        .await
        .expect("stream s2");
    assert_eq!(e.record(&vol).expect("rec").layers.len(), 2);
    // s0 is intact and its view still holds exactly what it held.
    let raw0 = snapshot_raw(&e, &env, &s[0]).await;
    let fg_log = fg.into_log();
    let r =
        verify_point_in_time(&raw0, 2, &fg_log, p0.len() as u64, p0.len() as u64 + 1).expect("pit");
    assert!(r.ok(), "{:?}", r.mismatches);
    // The merged deltas are the writer's clusters plus the background
    // writer's cluster 0.
    assert_eq!(d02, clusters_of(p1.iter().chain(&p2).copied().chain([0])));
    let bg_log = bg.stop().expect("writer");
    for (tag, log) in [(1, &bg_log), (2, &fg_log)] {
        let r = verify(&disk.file, tag, log).expect("verify");
        assert!(r.ok(), "tag {tag}: {:?}", r.mismatches);
    }
    check_volume_layers(&e, &vol);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clones_are_instant_flatten_in_background_and_outlive_their_source() {
    let env = TestEnv::new("clone");
    let e = env.engine().await;
    let src = VolumeId::generate();
    e.create_volume(&src, 32 * MIB).await.expect("create");
    let uri = e.attach_volume(&src).await.expect("attach").uri();
    let s1 = SnapshotId::generate();
    let log;
    {
        let disk = NbdFile::mount(&env.root.join("c"), &uri, false);
        let mut w = Writer::open(&disk.file, 5).expect("writer");
        // 8 MiB of verifier blocks: something for the flatten to copy.
        for b in 0..2048 {
            w.write_block(b).expect("write");
        }
        e.create_snapshot(&src, &s1).await.expect("s1");
        // Later writes on the source must not show in the clone.
        for b in 0..16 {
            w.write_block(b).expect("write");
        }
        log = w.into_log();
    }
    let at_s1 = 2048u64;

    // The clone is usable at once, flattened slowly in the background.
    let clone = VolumeId::generate();
    let t = std::time::Instant::now();
    e.create_volume_from_snapshot_with(&clone, &s1, Some(48 * MIB), Some(256 * 1024))
        .await
        .expect("clone");
    eprintln!("clone of 8 MiB created in {:?}", t.elapsed());
    assert!(!e.is_flattened(&clone).expect("rec"));
    // Merging the layer the clone reads is refused until it is flattened.
    assert_eq!(
        code(e.delete_snapshot(&s1, None).await),
        Some(ErrorCode::FailedPrecondition)
    );
    // A snapshot of the unflattened clone works; merging it into the bottom
    // layer (which the flatten job writes) is refused, and changes nothing.
    let cs = SnapshotId::generate();
    e.create_snapshot(&clone, &cs)
        .await
        .expect("snapshot of clone");
    all_captured(&e).await;
    let before = pool_fingerprint(&env.cfg.pool);
    assert_eq!(
        code(e.delete_snapshot(&cs, None).await),
        Some(ErrorCode::FailedPrecondition)
    );
    assert_eq!(pool_fingerprint(&env.cfg.pool), before);
    // Its allocated extents include what it inherited from the source.
    let alloc = e.allocated(&cs, 0, 1000).await.expect("allocated").extents;
    assert_eq!(
        alloc,
        e.allocated(&s1, 0, 1000)
            .await
            .expect("src allocated")
            .extents
    );
    let cu = e.attach_volume(&clone).await.expect("attach clone").uri();
    {
        let cd = NbdFile::mount(&env.root.join("cc"), &cu, false);
        let r = verify_point_in_time(&cd.file, 5, &log, at_s1, at_s1 + 1).expect("pit");
        assert!(r.ok(), "clone content: {:?}", r.mismatches);
        // The clone's own writes land in the clone only.
        let mut cw = Writer::open(&cd.file, 6).expect("clone writer");
        write_clusters(&mut cw, &[700]);
        let clog = cw.into_log();
        assert!(verify(&cd.file, 6, &clog).expect("v").ok());
    }
    // A daemon crash mid-flatten: the clone comes back on its source and
    // the flatten starts over.
    e.daemon()
        .signal_and_wait(libc::SIGKILL, Duration::from_secs(10))
        .await
        .expect("kill -9");
    drop(e);
    let e = env.engine().await;
    // Reopening restarted the flatten (at its recorded rate): lift the limit.
    assert!(!e.is_flattened(&clone).expect("rec"));
    e.set_job_speed(&flatten_job_id(&clone), 0)
        .await
        .expect("unthrottle");
    e.wait_flattened(&clone, Duration::from_secs(120))
        .await
        .expect("flattened");
    // The watcher / waiter recorded it; the source may now merge, and so
    // may the clone.
    assert!(e.is_flattened(&clone).expect("rec"));
    assert!(
        e.job_stats().copied_bytes() >= 8 * MIB,
        "the flatten's bytes were not counted: {}",
        e.job_stats().copied_bytes()
    );
    assert_eq!(e.job_stats().merged_bytes(), 0, "no merge ran yet");
    e.delete_snapshot(&cs, None)
        .await
        .expect("merge on the flat clone");

    // Delete the source volume: its snapshot lives on and stays restorable.
    e.detach_volume(&src).await.expect("detach");
    e.delete_volume(&src).await.expect("delete source");
    assert_eq!(code(e.volume(&src)), Some(ErrorCode::NotFound));
    let restored = VolumeId::generate();
    e.create_volume_from_snapshot(&restored, &s1, None)
        .await
        .expect("restore from a deleted volume's snapshot");
    e.wait_flattened(&restored, Duration::from_secs(120))
        .await
        .expect("restored flattened");
    let ru = e.attach_volume(&restored).await.expect("attach").uri();
    {
        let rd = NbdFile::mount(&env.root.join("cr"), &ru, true);
        let r = verify_point_in_time(&rd.file, 5, &log, at_s1, at_s1 + 1).expect("pit");
        assert!(r.ok(), "restored: {:?}", r.mismatches);
    }
    // Last snapshot of the deleted volume gone: the volume's files go too;
    // both clones still read their data.
    e.delete_snapshot(&s1, None).await.expect("delete s1");
    assert!(!env.cfg.pool.join(src.as_str()).exists());
    let cd = NbdFile::mount(&env.root.join("cc2"), &cu, true);
    let r = verify_point_in_time(&cd.file, 5, &log, at_s1, at_s1 + 1).expect("pit");
    assert!(r.ok(), "clone after source gone: {:?}", r.mismatches);
    for v in [&clone, &restored] {
        check_volume_layers(&e, v);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revert_to_the_latest_snapshot() {
    let env = TestEnv::new("revert");
    let e = env.engine().await;
    let vol = VolumeId::generate();
    e.create_volume(&vol, 16 * MIB).await.expect("create");
    let uri = e.attach_volume(&vol).await.expect("attach").uri();
    let (s1, s2) = (SnapshotId::generate(), SnapshotId::generate());
    let log;
    let at_s1;
    let at_s2;
    {
        let disk = NbdFile::mount(&env.root.join("c"), &uri, false);
        let mut w = Writer::open(&disk.file, 4).expect("writer");
        write_clusters(&mut w, &[1, 2]);
        at_s1 = w.next_seq() - 1;
        e.create_snapshot(&vol, &s1).await.expect("s1");
        write_clusters(&mut w, &[3]);
        e.create_snapshot(&vol, &s2).await.expect("s2");
        at_s2 = w.next_seq() - 1;
        write_clusters(&mut w, &[1, 4, 5]);
        log = w.into_log();
    }
    // Attached: refused. Unknown: refused. Nothing changes. (Older
    // snapshots: `engine_revert`.)
    assert_eq!(
        code(e.revert_volume(&vol, &s2).await),
        Some(ErrorCode::FailedPrecondition)
    );
    e.detach_volume(&vol).await.expect("detach");
    all_captured(&e).await;
    let before = pool_fingerprint(&env.cfg.pool);
    assert_eq!(
        code(e.revert_volume(&vol, &SnapshotId::generate()).await),
        Some(ErrorCode::NotFound)
    );
    assert_eq!(pool_fingerprint(&env.cfg.pool), before);

    e.revert_volume(&vol, &s2).await.expect("revert");
    let uri = e.attach_volume(&vol).await.expect("attach").uri();
    let disk = NbdFile::mount(&env.root.join("c2"), &uri, true);
    let r = verify_point_in_time(&disk.file, 4, &log, at_s2, at_s2 + 1).expect("pit");
    assert!(r.ok(), "{:?}", r.mismatches);
    check_volume_layers(&e, &vol);
    assert_eq!(e.record(&vol).expect("rec").layers.len(), 3);
    drop(disk);

    // Deleting the latest (s2) seals the active layer internally and
    // commits it into s2's layer, which stays sealed by nobody under a fresh
    // active layer; its writes wait for the next snapshot's record.
    e.delete_snapshot(&s2, None).await.expect("delete s2");
    let rec = e.record(&vol).expect("rec");
    assert_eq!(rec.layers.len(), 3, "{:?}", rec.layers);
    assert!(rec.layers[1].sealed_by.is_none() && rec.in_flight.is_none());
    assert!(!rec.inherited.is_empty());
    // Reverting to s1 goes across that internal layer and drops it.
    e.detach_volume(&vol).await.expect("detach");
    e.revert_volume(&vol, &s1)
        .await
        .expect("revert to s1 across an internal layer");
    let rec = e.record(&vol).expect("rec");
    assert_eq!(rec.layers.len(), 2, "{:?}", rec.layers);
    assert!(rec.inherited.is_empty());
    let uri = e.attach_volume(&vol).await.expect("attach").uri();
    let disk = NbdFile::mount(&env.root.join("c3"), &uri, true);
    let r = verify_point_in_time(&disk.file, 4, &log, at_s1, at_s1 + 1).expect("pit s1");
    assert!(r.ok(), "{:?}", r.mismatches);
    drop(disk);
    check_volume_layers(&e, &vol);

    // Deleting the volume drops the active layer and the internal one
    // under it; s1 lives on, and deleting it empties the pool.
    let s3 = SnapshotId::generate();
    e.create_snapshot(&vol, &s3).await.expect("s3");
    e.delete_snapshot(&s3, None).await.expect("delete s3");
    assert_eq!(e.record(&vol).expect("rec").layers.len(), 3);
    e.detach_volume(&vol).await.expect("detach");
    e.delete_volume(&vol).await.expect("delete volume");
    let rec = e.record(&vol).expect("rec");
    assert!(rec.deleted);
    assert_eq!(rec.layers.len(), 1, "{:?}", rec.layers);
    assert_eq!(rec.layers[0].sealed_by.as_ref(), Some(&s1));
    check_volume_layers(&e, &vol);
    e.delete_snapshot(&s1, None).await.expect("delete s1");
    assert!(e.list_volumes().expect("list").is_empty());
    assert!(!env.cfg.pool.join(vol.as_str()).exists());
}

/// Clusters of a layer file alone (backing cut off) that hold data, as
/// `qemu-img map` reports them: the image's own view, not the engine's.
fn data_clusters(file: &Path) -> Vec<Extent> {
    let spec = serde_json::json!({
        "driver": "qcow2",
        "file": { "driver": "file", "filename": file },
        "backing": null,
    });
    let out = Command::new("qemu-img")
        .args(["map", "-U", "--output=json"])
        .arg(format!("json:{spec}"))
        .output()
        .expect("qemu-img map");
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    livedisk_engine::extents::normalize(
        v.as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .filter(|m| m["data"].as_bool() == Some(true))
            .map(|m| Extent {
                offset: m["start"].as_u64().unwrap_or(0),
                length: m["length"].as_u64().unwrap_or(0),
            })
            .collect(),
    )
}

fn qemu_io(uri: &str, cmd: &str) {
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", cmd, uri])
        .output()
        .expect("qemu-io");
    assert!(
        out.status.success(),
        "qemu-io {cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discard_from_the_consumer_reaches_the_image() {
    let env = TestEnv::new("trim");
    let e = env.engine().await;
    let vol = VolumeId::generate();
    e.create_volume(&vol, 16 * MIB).await.expect("create");
    let uri = e.attach_volume(&vol).await.expect("attach").uri();
    let c = |n: u64| Extent {
        offset: n * CLUSTER,
        length: CLUSTER,
    };
    qemu_io(&uri, "write -P 0x11 196608 131072"); // clusters 3 and 4
    let base = e.layer_path(&vol, 0);
    assert_eq!(
        data_clusters(&base),
        vec![Extent {
            offset: 3 * CLUSTER,
            length: 2 * CLUSTER
        }]
    );
    // Discard through the export (NBD trim): the cluster is freed.
    qemu_io(&uri, "discard 196608 65536");
    assert_eq!(data_clusters(&base), vec![c(4)]);

    // Through the consumer's file, as a filesystem's TRIM would arrive:
    // a punched hole on the nbdfuse file becomes an NBD trim.
    let s = SnapshotId::generate();
    e.create_snapshot(&vol, &s).await.expect("snapshot");
    qemu_io(&uri, "write -P 0x22 524288 65536"); // cluster 8, active layer
    let active = e.layer_path(&vol, e.record(&vol).expect("r").layers[1].seq);
    assert_eq!(data_clusters(&active), vec![c(8)]);
    {
        let disk = NbdFile::mount(&env.root.join("c"), &uri, false);
        let st = Command::new("fallocate")
            .args([
                "--punch-hole",
                "--keep-size",
                "--offset",
                "524288",
                "--length",
                "65536",
            ])
            .arg(&disk.file)
            .status()
            .expect("fallocate");
        assert!(st.success(), "punch hole through nbdfuse");
        let st = Command::new("fallocate")
            .args([
                "--punch-hole",
                "--keep-size",
                "--offset",
                "262144",
                "--length",
                "65536",
            ])
            .arg(&disk.file)
            .status()
            .expect("fallocate");
        assert!(st.success(), "punch hole over the snapshot's data");
    }
    assert!(data_clusters(&active).is_empty(), "active layer kept data");
    // Cluster 4 lives in the snapshot's layer: the active layer masks it
    // (reads zeros) while the snapshot keeps it.
    let mut buf = vec![0u8; CLUSTER as usize];
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read -P 0 262144 65536", &uri])
        .output()
        .expect("qemu-io");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("read 65536/65536") && !text.contains("verification failed"),
        "discarded range must read zeros: {text}"
    );
    let raw = snapshot_raw(&e, &env, &s).await;
    use std::os::unix::fs::FileExt;
    std::fs::File::open(&raw)
        .expect("raw")
        .read_exact_at(&mut buf, 4 * CLUSTER)
        .expect("read");
    assert!(buf.iter().all(|b| *b == 0x11), "snapshot lost its data");
    check_volume_layers(&e, &vol);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clone_bad_input_and_deleting_an_unflattened_clone() {
    let env = TestEnv::new("clonebad");
    let e = env.engine().await;
    let src = VolumeId::generate();
    e.create_volume(&src, 16 * MIB).await.expect("create");
    let uri = e.attach_volume(&src).await.expect("attach").uri();
    qemu_io(&uri, "write -P 0x33 0 8M");
    let s1 = SnapshotId::generate();
    e.create_snapshot(&src, &s1).await.expect("s1");
    all_captured(&e).await;
    let before = pool_fingerprint(&env.cfg.pool);
    let c = VolumeId::generate();
    assert_eq!(
        code(
            e.create_volume_from_snapshot(&c, &SnapshotId::generate(), None)
                .await
        ),
        Some(ErrorCode::NotFound)
    );
    assert_eq!(
        code(e.create_volume_from_snapshot(&c, &s1, Some(MIB)).await),
        Some(ErrorCode::OutOfRange)
    );
    assert_eq!(
        code(e.create_volume_from_snapshot(&src, &s1, None).await),
        Some(ErrorCode::AlreadyExists)
    );
    assert_eq!(
        pool_fingerprint(&env.cfg.pool),
        before,
        "refusals changed the pool"
    );

    // Idempotent for the same source and size.
    e.create_volume_from_snapshot_with(&c, &s1, None, Some(64 * 1024))
        .await
        .expect("clone");
    e.create_volume_from_snapshot(&c, &s1, None)
        .await
        .expect("same clone again");
    assert!(!e.is_flattened(&c).expect("rec"));
    // Deleting the clone mid-flatten stops its job and frees the source.
    e.delete_volume(&c).await.expect("delete unflattened clone");
    assert!(!env.cfg.pool.join(c.as_str()).exists());
    assert!(
        e.jobs()
            .await
            .expect("jobs")
            .iter()
            .all(|j| !j.id.starts_with('f'))
    );
    e.detach_volume(&src).await.expect("detach");
    e.delete_snapshot(&s1, None)
        .await
        .expect("source merge allowed");
    check_volume_layers(&e, &src);
}

/// A volume with snapshots s1 then s2, written before, between and after,
/// then deleted (its active layer dropped, its snapshots kept).
struct DeletedWithSnapshots {
    vol: VolumeId,
    s1: SnapshotId,
    s2: SnapshotId,
    log: Vec<livedisk_verifier::Ack>,
    at_s1: u64,
    at_s2: u64,
}

async fn deleted_volume_with_two_snapshots(
    e: &Engine,
    env: &TestEnv,
    between: u64,
) -> DeletedWithSnapshots {
    let vol = VolumeId::generate();
    e.create_volume(&vol, 32 * MIB).await.expect("create");
    let uri = e.attach_volume(&vol).await.expect("attach").uri();
    let (s1, s2) = (SnapshotId::generate(), SnapshotId::generate());
    let (log, at_s1, at_s2);
    {
        let disk = NbdFile::mount(&env.root.join("c"), &uri, false);
        let mut w = Writer::open(&disk.file, 7).expect("writer");
        write_clusters(&mut w, &[1, 2, 6]);
        e.create_snapshot(&vol, &s1).await.expect("s1");
        at_s1 = w.next_seq() - 1;
        // Overwrites of s1's clusters and new ones: s1 and s2 differ.
        write_clusters(&mut w, &[1, 18]);
        for b in 0..between {
            w.write_block(1024 + b).expect("write");
        }
        e.create_snapshot(&vol, &s2).await.expect("s2");
        at_s2 = w.next_seq() - 1;
        write_clusters(&mut w, &[2, 62]);
        log = w.into_log();
    }
    e.detach_volume(&vol).await.expect("detach");
    e.delete_volume(&vol).await.expect("delete volume");
    assert_eq!(code(e.volume(&vol)), Some(ErrorCode::NotFound));
    let rec = e.record(&vol).expect("record kept");
    assert!(rec.deleted);
    assert_eq!(rec.layers.len(), 2);
    DeletedWithSnapshots {
        vol,
        s1,
        s2,
        log,
        at_s1,
        at_s2,
    }
}

/// The snapshot's view holds exactly the writes acknowledged up to `at`.
async fn check_snapshot_view(
    e: &Engine,
    env: &TestEnv,
    d: &DeletedWithSnapshots,
    s: &SnapshotId,
    at: u64,
) {
    let x = e.export_snapshot(s).await.expect("export");
    {
        let dir = env.root.join(format!(
            "v-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        ));
        let f = NbdFile::mount(&dir, &x.uri(), true);
        let r = verify_point_in_time(&f.file, 7, &d.log, at, at + 1).expect("pit");
        assert!(r.ok(), "view of {s}: {:?}", r.mismatches);
    }
    e.unexport_snapshot(s).await.expect("unexport");
}

/// Nothing of the volume is left: no directory, no node, no job.
async fn assert_no_trace(e: &Engine, env: &TestEnv, vol: &VolumeId) {
    assert!(
        !env.cfg.pool.join(vol.as_str()).exists(),
        "volume directory left behind"
    );
    assert_eq!(code(e.record(vol)), Some(ErrorCode::NotFound));
    assert!(e.list_volumes().expect("list").iter().all(|v| &v.id != vol));
    let left = volume_node_names(e, vol).await;
    assert!(left.is_empty(), "nodes left: {left:?}");
    assert_eq!(e.jobs().await.expect("jobs"), vec![]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_the_snapshots_of_a_deleted_volume_empties_the_pool() {
    let env = TestEnv::new("delsnaps");
    let e = env.engine().await;
    let d = deleted_volume_with_two_snapshots(&e, &env, 16).await;
    // Both snapshots outlive their volume.
    check_snapshot_view(&e, &env, &d, &d.s1, d.at_s1).await;
    check_snapshot_view(&e, &env, &d, &d.s2, d.at_s2).await;
    let s2_before = std::fs::read(snapshot_raw(&e, &env, &d.s2).await).expect("raw");
    let s2_delta = e.delta(&d.s1, &d.s2, 0, 1000).await.expect("delta").extents;
    let s2_alloc = e
        .allocated(&d.s2, 0, 1000)
        .await
        .expect("allocated")
        .extents;

    // The older snapshot: its layer takes in s2's layer (the top of the
    // chain now). Bounded: this used to wait forever.
    tokio::time::timeout(Duration::from_secs(60), e.delete_snapshot(&d.s1, None))
        .await
        .expect("deleting s1 must not hang")
        .expect("delete s1");
    let rec = e.record(&d.vol).expect("record");
    assert!(rec.in_flight.is_none(), "merge left in flight: {rec:?}");
    assert_eq!(rec.layers.len(), 1);
    assert_eq!(rec.snapshots.len(), 1);
    check_sealed_layers(&e, &d.vol);
    // s2 reads back exactly as before, through an export and a new volume.
    check_snapshot_view(&e, &env, &d, &d.s2, d.at_s2).await;
    let s2_after = std::fs::read(snapshot_raw(&e, &env, &d.s2).await).expect("raw");
    assert!(s2_before == s2_after, "s2 changed by deleting s1");
    assert_eq!(
        e.allocated(&d.s2, 0, 1000)
            .await
            .expect("allocated")
            .extents,
        s2_alloc
    );
    assert!(s2_delta.iter().all(|x| {
        s2_alloc
            .iter()
            .any(|a| a.offset <= x.offset && x.offset + x.length <= a.offset + a.length)
    }));
    let restored = VolumeId::generate();
    e.create_volume_from_snapshot(&restored, &d.s2, None)
        .await
        .expect("restore s2");
    e.wait_flattened(&restored, Duration::from_secs(120))
        .await
        .expect("flattened");
    let ru = e.attach_volume(&restored).await.expect("attach").uri();
    {
        let rd = NbdFile::mount(&env.root.join("cr"), &ru, true);
        let r = verify_point_in_time(&rd.file, 7, &d.log, d.at_s2, d.at_s2 + 1).expect("pit");
        assert!(r.ok(), "restored s2: {:?}", r.mismatches);
    }

    // The last snapshot: the volume goes entirely.
    tokio::time::timeout(Duration::from_secs(60), e.delete_snapshot(&d.s2, None))
        .await
        .expect("deleting s2 must not hang")
        .expect("delete s2");
    assert_no_trace(&e, &env, &d.vol).await;
    // Reopening finds nothing to do, and the restored volume is intact.
    drop(e);
    let e = tokio::time::timeout(Duration::from_secs(90), env.engine())
        .await
        .expect("open must return");
    assert_no_trace(&e, &env, &d.vol).await;
    check_volume_layers(&e, &restored);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_volume_snapshot_merge_survives_daemon_kill() {
    let env = TestEnv::new("delkill");
    let e = env.engine().await;
    // 2 MiB between the snapshots: a rate-limited merge takes seconds.
    let d = deleted_volume_with_two_snapshots(&e, &env, 512).await;
    let job = e
        .start_snapshot_delete(
            &d.s1,
            MergeOptions {
                mode: MergeMode::Commit,
                speed: Some(256 * 1024),
            },
        )
        .await
        .expect("start delete s1");
    tokio::time::sleep(Duration::from_millis(700)).await;
    let running = e.jobs().await.expect("jobs");
    assert!(
        running.iter().any(|j| j.id == job && j.status == "running"),
        "merge not mid-way: {running:?}"
    );
    // kill -9 of the daemon in the middle of the merge.
    e.daemon()
        .signal_and_wait(libc::SIGKILL, Duration::from_secs(10))
        .await
        .expect("kill -9");
    drop(e);
    // Recovery finishes the merge, within a bound.
    let t = std::time::Instant::now();
    let e = tokio::time::timeout(Duration::from_secs(90), env.engine())
        .await
        .expect("Engine::open must return");
    eprintln!("recovery took {:?}", t.elapsed());
    let rec = e.record(&d.vol).expect("record");
    assert!(rec.in_flight.is_none(), "merge left in flight: {rec:?}");
    assert_eq!(rec.layers.len(), 1);
    assert_eq!(rec.snapshots.len(), 1);
    assert_eq!(e.jobs().await.expect("jobs"), vec![]);
    check_sealed_layers(&e, &d.vol);
    check_snapshot_view(&e, &env, &d, &d.s2, d.at_s2).await;

    // kill -9 again, then delete the last snapshot on the fresh daemon.
    e.daemon()
        .signal_and_wait(libc::SIGKILL, Duration::from_secs(10))
        .await
        .expect("kill -9");
    drop(e);
    let e = tokio::time::timeout(Duration::from_secs(90), env.engine())
        .await
        .expect("Engine::open must return");
    check_snapshot_view(&e, &env, &d, &d.s2, d.at_s2).await;
    e.delete_snapshot(&d.s2, None).await.expect("delete s2");
    assert_no_trace(&e, &env, &d.vol).await;
    e.reclaimed().await;
    let left: Vec<_> = std::fs::read_dir(&env.cfg.pool)
        .expect("pool")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "pool not empty: {left:?}");
}
