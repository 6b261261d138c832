//! Snapshot exports "changed since" a base publish the changed blocks as an
//! NBD `qemu:dirty-bitmap:` metadata context: against a real daemon, real
//! qcow2 files, a live writer, merges and a daemon kill -9.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use livedisk_engine::bitmap::{LAYER_CLUSTER_SIZE, context_name};
use livedisk_engine::nbd_client::NbdClient;
use livedisk_engine::record::ExportTarget;
use livedisk_engine::{Engine, ErrorCode, Extent, SnapshotId, VolumeId};
use livedisk_verifier::Writer;
use serde_json::{Value, json};

const MIB: u64 = 1 << 20;

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

fn run_json(cmd: &str, args: &[&str]) -> Value {
    let out = Command::new(cmd).args(args).output().expect(cmd);
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json output")
}

fn to_extents(v: &Value, keep: impl Fn(&Value) -> bool, off: &str) -> Vec<Extent> {
    livedisk_engine::extents::normalize(
        v.as_array()
            .into_iter()
            .flatten()
            .filter(|e| keep(e))
            .map(|e| Extent {
                offset: e[off].as_u64().unwrap_or(0),
                length: e["length"].as_u64().unwrap_or(0),
            })
            .collect(),
    )
}

/// Dirty ranges of a `qemu:dirty-bitmap:` context, read by `nbdinfo`.
fn nbdinfo_dirty(uri: &str, context: &str) -> Vec<Extent> {
    nbdinfo_map(uri, context, |t| t == 1)
}

/// Dirty ranges read by QEMU's own NBD client: with `x-dirty-bitmap`,
/// `qemu-img map` reports dirty ranges as `"data": false`.
fn qemu_img_dirty(socket: &Path, export: &str, context: &str) -> Vec<Extent> {
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},export={export},x-dirty-bitmap={context}",
        socket.display()
    );
    let v = run_json(
        "qemu-img",
        &["map", "--output=json", "--image-opts", opts.as_str()],
    );
    to_extents(&v, |e| e["data"].as_bool() == Some(false), "start")
}

/// `rd_bytes` of the volume's layer nodes only.
async fn layer_reads(e: &Engine, vol: &VolumeId) -> BTreeMap<String, u64> {
    let prefix = livedisk_engine::record::VolumeRecord::node_prefix(vol);
    node_read_bytes(e)
        .await
        .into_iter()
        .filter(|(n, _)| n.starts_with(&prefix))
        .collect()
}

/// Named nodes and exports of the daemon that serve snapshot `s`'s bitmap.
async fn helpers(e: &Engine, s: &SnapshotId) -> Vec<String> {
    let hex = &s.hex()[..24];
    let mut out = vec![];
    let exports = e
        .qmp()
        .execute("query-block-exports", json!({}))
        .await
        .expect("exports");
    let exports = exports.as_array().cloned().unwrap_or_default();
    for (v, key) in [(block_nodes(e).await, "node-name"), (exports, "id")] {
        for n in v {
            if let Some(name) = n[key].as_str()
                && name.ends_with(hex)
                && !name.starts_with('s')
            {
                out.push(name.to_owned());
            }
        }
    }
    out
}

/// The helper's bitmap as the daemon reports it.
async fn helper_bitmap(e: &Engine, s: &SnapshotId) -> Value {
    let name = format!("c{}", &s.hex()[..24]);
    let node = block_nodes(e)
        .await
        .into_iter()
        .find(|n| n["node-name"].as_str() == Some(name.as_str()))
        .unwrap_or_else(|| panic!("helper node {name} missing"));
    let bitmaps = node["dirty-bitmaps"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        bitmaps.len(),
        1,
        "the helper holds exactly one bitmap: {bitmaps:?}"
    );
    bitmaps[0].clone()
}

/// The QMP commands a future sends (the engine's `qmp send` debug events),
/// in order: a subscriber scoped to that future only, so other tests of
/// this binary and the engine's background tasks do not count.
struct QmpLog(Arc<Mutex<Vec<String>>>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for QmpLog {
    fn on_event(
        &self,
        event: &tracing::Event<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        #[derive(Default)]
        struct V {
            command: Option<String>,
            send: bool,
        }
        impl tracing::field::Visit for V {
            fn record_str(&mut self, f: &tracing::field::Field, v: &str) {
                if f.name() == "command" {
                    self.command = Some(v.to_owned());
                }
            }
            fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
                if f.name() == "message" && format!("{v:?}") == "qmp send" {
                    self.send = true;
                }
            }
        }
        let mut v = V::default();
        event.record(&mut v);
        if let (true, Some(c)) = (v.send, v.command) {
            self.0.lock().expect("qmp log").push(c);
        }
    }
}

/// Runs `fut` and returns its output with the QMP commands it sent.
async fn qmp_commands<T>(fut: impl std::future::Future<Output = T>) -> (T, Vec<String>) {
    use tracing::instrument::WithSubscriber;
    use tracing_subscriber::layer::SubscriberExt;
    let log = Arc::new(Mutex::new(vec![]));
    let sub = tracing_subscriber::registry().with(QmpLog(log.clone()));
    let out = fut.with_subscriber(sub).await;
    let cmds = log.lock().expect("qmp log").clone();
    (out, cmds)
}

/// The helper node's bitmap, looked up by name the way the engine does
/// (`x-debug-block-dirty-bitmap-sha256`): `None` when the helper or the
/// bitmap is absent. Lists no nodes, so it is safe while a stream settles.
async fn helper_bitmap_hash(e: &Engine, s: &SnapshotId, base: &SnapshotId) -> Option<String> {
    match e
        .qmp()
        .execute(
            "x-debug-block-dirty-bitmap-sha256",
            json!({ "node": format!("c{}", &s.hex()[..24]), "name": format!("changed-since-{base}") }),
        )
        .await
    {
        Ok(v) => Some(v["sha256"].as_str().expect("sha256").to_owned()),
        Err(err) if err.desc_contains("not found") => None,
        Err(err) => panic!("x-debug-block-dirty-bitmap-sha256: {err}"),
    }
}

/// Export ids of the daemon (`query-block-exports`).
async fn export_ids(e: &Engine) -> Vec<String> {
    let v = e
        .qmp()
        .execute("query-block-exports", json!({}))
        .await
        .expect("exports");
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|x| x["id"].as_str().map(str::to_owned))
        .collect()
}

/// `qemu-img info` of a layer file (the daemon holds it: `-U`).
fn image_info(file: &Path) -> Value {
    run_json(
        "qemu-img",
        &[
            "info",
            "-U",
            "--output=json",
            file.to_str().expect("utf-8 path"),
        ],
    )
}

/// A node of the daemon by name (`query-named-block-nodes`).
async fn node(e: &Engine, name: &str) -> Value {
    block_nodes(e)
        .await
        .into_iter()
        .find(|n| n["node-name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("node {name} missing"))
}

/// The snapshot's view read offline from its layer file and the backing
/// files its header names (no daemon involved).
fn offline_view(e: &Engine, vol: &VolumeId, s: &SnapshotId, dst: &Path) -> Vec<u8> {
    let rec = e.record(vol).expect("record");
    let l = rec
        .layers
        .iter()
        .find(|l| l.sealed_by.as_ref() == Some(s))
        .expect("snapshot layer");
    let st = Command::new("qemu-img")
        .args(["convert", "-U", "-f", "qcow2", "-O", "raw"])
        .arg(e.layer_path(vol, l.seq))
        .arg(dst)
        .status()
        .expect("qemu-img convert");
    assert!(st.success());
    std::fs::read(dst).expect("read offline view")
}

/// CPU time (user + system) the daemon has used so far.
fn daemon_cpu(pid: i32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // Fields after the command name; utime and stime are the 12th and 13th.
    let f: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap_or(0) + f[12].parse::<u64>().unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

fn export_view(uri: &str, dst: &Path) -> Vec<u8> {
    export_to_raw(uri, dst);
    std::fs::read(dst).expect("read export view")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_since_export_publishes_the_writers_log_as_a_dirty_bitmap() {
    let env = TestEnv::new("xbm");
    let socket = env.cfg.runtime_dir.join("nbd.sock");
    let vol = VolumeId::generate();
    let (b, m, s) = (
        SnapshotId::generate(),
        SnapshotId::generate(),
        SnapshotId::generate(),
    );
    let expected;
    let context = context_name(&b);
    {
        let e = env.engine().await;
        e.create_volume(&vol, 64 * MIB).await.expect("create");
        let attach = e.attach_volume(&vol).await.expect("attach");
        let disk = NbdFile::mount(&env.root.join("consumer"), &attach.uri(), false);
        // Background writer: cluster 0 the whole time, snapshots under it.
        let (bg, mut fg) = live_writers(&disk.file).await;
        write_clusters(&mut fg, &[3, 7]);
        e.create_snapshot(&vol, &b).await.expect("snapshot b");
        let p2 = write_clusters(&mut fg, &[10, 11, 500, 501, 502]);
        e.create_snapshot(&vol, &m).await.expect("snapshot m");
        let p3 = write_clusters(&mut fg, &[20, 700, 1023]);
        e.create_snapshot(&vol, &s).await.expect("snapshot s");
        write_clusters(&mut fg, &[40, 41]);
        bg.stop().expect("bg writer");
        // The writer's log between b and s, at cluster granularity.
        expected = clusters_of(p2.iter().chain(&p3).copied().chain([0]));
        assert_eq!(
            e.delta(&b, &s, 0, 1000).await.expect("delta").extents,
            expected
        );

        // Bad requests: the errors `delta` gives, and nothing left behind.
        let other = VolumeId::generate();
        e.create_volume(&other, 8 * MIB).await.expect("other");
        let os = SnapshotId::generate();
        e.create_snapshot(&other, &os).await.expect("other snap");
        let code = |r: Result<livedisk_engine::ExportInfo, _>| {
            r.map(|_| ())
                .map_err(|e: livedisk_engine::EngineError| e.code())
                .err()
        };
        assert_eq!(
            code(e.export_snapshot_changed_since(&b, &s).await),
            Some(ErrorCode::InvalidArgument),
            "base not older"
        );
        assert_eq!(
            code(e.export_snapshot_changed_since(&s, &s).await),
            Some(ErrorCode::InvalidArgument),
            "base = target"
        );
        assert_eq!(
            code(e.export_snapshot_changed_since(&s, &os).await),
            Some(ErrorCode::InvalidArgument),
            "other volume"
        );
        assert_eq!(
            code(
                e.export_snapshot_changed_since(&s, &SnapshotId::generate())
                    .await
            ),
            Some(ErrorCode::NotFound),
            "unknown base"
        );
        assert_eq!(
            code(
                e.export_snapshot_changed_since(&SnapshotId::generate(), &b)
                    .await
            ),
            Some(ErrorCode::NotFound),
            "unknown snapshot"
        );
        assert_eq!(helpers(&e, &s).await, Vec::<String>::new());
        assert!(e.record(&vol).expect("record").exports.len() == 1);

        // The export: no volume data read to build it.
        let reads_before = layer_reads(&e, &vol).await;
        let t = Instant::now();
        let x = e
            .export_snapshot_changed_since(&s, &b)
            .await
            .expect("export changed since b");
        eprintln!(
            "export with a {}-extent bitmap: {:?}",
            expected.len(),
            t.elapsed()
        );
        assert_eq!(
            layer_reads(&e, &vol).await,
            reads_before,
            "layers were read"
        );
        assert_eq!(x.dirty_bitmap.as_deref(), Some(context.as_str()));
        assert!(!x.writable);
        // Cluster granularity, frozen (not recording), on the helper node.
        let bm = helper_bitmap(&e, &s).await;
        assert_eq!(bm["granularity"], CLUSTER, "{bm}");
        assert_eq!(bm["recording"], false, "{bm}");
        assert_eq!(bm["name"], format!("changed-since-{b}"), "{bm}");
        // The geometry the engine takes from the record is the daemon's:
        // the helper is as large as the snapshot's layer node, and every
        // layer file has the cluster size the bitmaps are built with.
        let rec = e.record(&vol).expect("record");
        let layer = rec
            .layers
            .iter()
            .find(|l| l.sealed_by.as_ref() == Some(&s))
            .expect("layer of s");
        assert_eq!(
            node(&e, &format!("c{}", &s.hex()[..24])).await["image"]["virtual-size"],
            node(&e, &rec.node_name(layer.seq)).await["image"]["virtual-size"],
        );
        for l in &rec.layers {
            assert_eq!(
                image_info(&e.layer_path(&vol, l.seq))["cluster-size"],
                LAYER_CLUSTER_SIZE,
                "layer {}",
                l.seq
            );
        }

        assert_eq!(nbdinfo_dirty(&x.uri(), &context), expected);
        assert_eq!(qemu_img_dirty(&socket, &x.name, &context), expected);
        // The data read through the export is the snapshot.
        assert!(
            export_view(&x.uri(), &env.root.join("x1.raw"))
                == offline_view(&e, &vol, &s, &env.root.join("o1.raw")),
            "export data differs from the snapshot"
        );
        // Idempotent with the same base; another base is another export.
        let again = e
            .export_snapshot_changed_since(&s, &b)
            .await
            .expect("again");
        assert_eq!(again, x);
        assert_eq!(
            code(e.export_snapshot_changed_since(&s, &m).await),
            Some(ErrorCode::AlreadyExists)
        );
        assert_eq!(
            code(e.export_snapshot(&s).await),
            Some(ErrorCode::AlreadyExists)
        );

        // The base is merged away (b's interval folds into m's record), then
        // m too (s's layer is committed into m's: the export moves node).
        e.delete_snapshot(&b, None).await.expect("delete b");
        assert_eq!(nbdinfo_dirty(&x.uri(), &context), expected);
        e.delete_snapshot(&m, None).await.expect("delete m");
        assert_eq!(nbdinfo_dirty(&x.uri(), &context), expected);
        assert_eq!(qemu_img_dirty(&socket, &x.name, &context), expected);
        assert!(
            export_view(&x.uri(), &env.root.join("x2.raw"))
                == offline_view(&e, &vol, &s, &env.root.join("o2.raw")),
            "export data differs from the snapshot after merges"
        );

        // kill -9 of the daemon.
        e.daemon()
            .signal_and_wait(libc::SIGKILL, Duration::from_secs(5))
            .await
            .expect("kill daemon");
        drop(fg);
        drop(disk);
    }
    // Reopen: the export and its bitmap come back from the records although
    // b no longer exists.
    let e = env.engine().await;
    // The daemon is new and the bitmap was rebuilt by the open: no layer
    // node of the volume has served a single byte of data for it.
    let reads = layer_reads(&e, &vol).await;
    assert!(!reads.is_empty(), "no layer nodes found");
    assert!(
        reads.values().all(|r| *r == 0),
        "rebuilding the bitmap read data: {reads:?}"
    );
    let rec = e.record(&vol).expect("record");
    assert!(rec.snapshot(&b).is_none());
    let uri = format!("nbd+unix:///{s}?socket={}", socket.display());
    assert_eq!(nbdinfo_dirty(&uri, &context), expected);
    assert_eq!(
        layer_reads(&e, &vol).await,
        reads,
        "reading the dirty-bitmap context read data"
    );
    assert_eq!(helper_bitmap(&e, &s).await["granularity"], CLUSTER);
    assert!(
        export_view(&uri, &env.root.join("x3.raw"))
            == offline_view(&e, &vol, &s, &env.root.join("o3.raw")),
        "export data differs from the snapshot after restart"
    );

    // Stopping the export removes every helper node, export and file.
    let frozen = env
        .cfg
        .pool
        .join(vol.as_str())
        .join(format!("export-{s}.changed.json"));
    assert!(frozen.exists());
    assert_eq!(helpers(&e, &s).await.len(), 1, "the helper node");
    e.unexport_snapshot(&s).await.expect("unexport");
    assert_eq!(helpers(&e, &s).await, Vec::<String>::new());
    assert!(!frozen.exists());
    assert!(
        !e.record(&vol)
            .expect("record")
            .exports
            .iter()
            .any(|x| matches!(x.target, ExportTarget::Snapshot { .. })),
        "snapshot export still recorded"
    );
    // The snapshot can now be merged like any other.
    e.delete_snapshot(&s, None).await.expect("delete s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bitmap_of_100k_extents_is_built_without_reading_data() {
    const N: u64 = 100_000;
    // Shows the engine's own breakdown of the build (`changed-block bitmap
    // built`: NBD part and total).
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let env = TestEnv::new("xbk");
    let e = env.engine().await;
    let vol = VolumeId::generate();
    // Every other cluster of 2N clusters: N separate extents.
    e.create_volume(&vol, 2 * N * CLUSTER)
        .await
        .expect("create");
    let (b, s) = (SnapshotId::generate(), SnapshotId::generate());
    e.create_snapshot(&vol, &b).await.expect("snapshot b");
    let attach = e.attach_volume(&vol).await.expect("attach");
    let list: Vec<Extent> = (0..N)
        .map(|i| Extent {
            offset: 2 * i * CLUSTER,
            length: CLUSTER,
        })
        .collect();
    // Real writes (zero clusters over the backing layer) through the
    // consumer's export, by the engine's own NBD client.
    let mut c = NbdClient::connect(&attach.socket, &attach.name)
        .await
        .expect("connect");
    let t = Instant::now();
    c.write_zeroes(&list, Duration::from_secs(300))
        .await
        .expect("write");
    c.disconnect().await.expect("disconnect");
    eprintln!("{N} writes to the volume: {:?}", t.elapsed());
    e.create_snapshot(&vol, &s).await.expect("snapshot s");
    let delta = e.delta(&b, &s, 0, usize::MAX).await.expect("delta").extents;
    assert_eq!(delta, list);

    let t = Instant::now();
    e.delta(&b, &s, 0, usize::MAX).await.expect("delta");
    eprintln!("delta query alone (record load + union): {:?}", t.elapsed());
    let reads_before = layer_reads(&e, &vol).await;
    let cpu = daemon_cpu(env.daemon_pid());
    let t = Instant::now();
    let x = e
        .export_snapshot_changed_since(&s, &b)
        .await
        .expect("export");
    let took = t.elapsed();
    eprintln!(
        "export changed since b with a {N}-extent bitmap: {took:?} (daemon CPU {:?})",
        daemon_cpu(env.daemon_pid()) - cpu
    );
    assert_eq!(
        layer_reads(&e, &vol).await,
        reads_before,
        "layers were read"
    );
    let context = context_name(&b);
    let t = Instant::now();
    let dirty = nbdinfo_dirty(&x.uri(), &context);
    eprintln!("nbdinfo --map of it: {:?}", t.elapsed());
    assert_eq!(dirty.len(), N as usize);
    assert_eq!(dirty, list);
    e.unexport_snapshot(&s).await.expect("unexport");
    assert_eq!(helpers(&e, &s).await, Vec::<String>::new());

    // The mechanism alone at the other extreme: one fully changed 1 TiB
    // range (1 GiB requests) on a null-co node marks every granule.
    const TIB: u64 = 1 << 40;
    let q = e.qmp();
    q.execute(
        "blockdev-add",
        json!({ "driver": "null-co", "node-name": "tbig", "size": TIB, "read-zeroes": true }),
    )
    .await
    .expect("null-co");
    q.execute(
        "block-dirty-bitmap-add",
        json!({ "node": "tbig", "name": "b", "granularity": CLUSTER }),
    )
    .await
    .expect("bitmap");
    q.execute(
        "block-export-add",
        json!({ "type": "nbd", "id": "tbig", "node-name": "tbig", "name": "tbig", "writable": true }),
    )
    .await
    .expect("export");
    let mut c = NbdClient::connect(&attach.socket, "tbig")
        .await
        .expect("connect");
    let t = Instant::now();
    let n = c
        .write_zeroes(
            &[Extent {
                offset: 0,
                length: TIB,
            }],
            Duration::from_secs(300),
        )
        .await
        .expect("write_zeroes");
    eprintln!("1 TiB as {n} write-zeroes requests: {:?}", t.elapsed());
    c.disconnect().await.expect("disconnect");
    let nodes = q
        .execute("query-named-block-nodes", json!({ "flat": true }))
        .await
        .expect("nodes");
    let count = nodes
        .as_array()
        .into_iter()
        .flatten()
        .find(|n| n["node-name"] == "tbig")
        .map(|n| n["dirty-bitmaps"][0]["count"].clone());
    assert_eq!(count, Some(json!(TIB)));
}

/// QEMU 7.2 segfaults on `query-named-block-nodes` while a finished
/// `block-stream` job is not dismissed (a merge in stream mode or a clone's
/// flatten of any volume, between its end and its owner's `job-dismiss`).
/// Exporting (with a bitmap or without) and stopping exports must work then
/// and leave the daemon alive: the export path lists no nodes. The volume
/// was grown after the snapshot, so the helper's size must come from the
/// snapshot, not from the volume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_work_while_a_finished_stream_job_waits_for_dismissal() {
    let env = TestEnv::new("xst");
    let e = env.engine().await;
    let vol = VolumeId::generate();
    let (b, s) = (SnapshotId::generate(), SnapshotId::generate());
    e.create_volume(&vol, 16 * MIB).await.expect("create");
    let write = |list: Vec<Extent>| {
        let e = &e;
        let vol = &vol;
        async move {
            let a = e.attach_volume(vol).await.expect("attach");
            let mut c = NbdClient::connect(&a.socket, &a.name)
                .await
                .expect("connect");
            c.write_zeroes(&list, Duration::from_secs(30))
                .await
                .expect("write");
            c.disconnect().await.expect("disconnect");
            e.detach_volume(vol).await.expect("detach");
        }
    };
    let x = |offset: u64, length: u64| Extent { offset, length };
    write(vec![x(0, CLUSTER)]).await;
    e.create_snapshot(&vol, &b).await.expect("snapshot b");
    let changed = vec![x(3 * CLUSTER, 2 * CLUSTER), x(100 * CLUSTER, CLUSTER)];
    write(changed.clone()).await;
    e.create_snapshot(&vol, &s).await.expect("snapshot s");
    e.expand_volume(&vol, 32 * MIB).await.expect("expand");
    assert_eq!(
        e.delta(&b, &s, 0, 100).await.expect("delta").extents,
        changed
    );

    // A stream job of two scratch nodes (no volume's), finished and left
    // undismissed.
    finished_stream_left_undismissed(&env, &e, "tstream").await;
    let q = e.qmp();
    let pid = env.daemon_pid();

    // Changed since b: built, published, read back; idempotent; stopped.
    let context = context_name(&b);
    let xp = e
        .export_snapshot_changed_since(&s, &b)
        .await
        .expect("export changed since b while a stream settles");
    assert_eq!(nbdinfo_dirty(&xp.uri(), &context), changed);
    assert!(helper_bitmap_hash(&e, &s, &b).await.is_some());
    assert_eq!(
        e.export_snapshot_changed_since(&s, &b)
            .await
            .expect("again"),
        xp
    );
    e.unexport_snapshot(&s).await.expect("unexport");
    assert_eq!(helper_bitmap_hash(&e, &s, &b).await, None, "helper left");
    // Plain: exported and stopped.
    let sid = format!("s{}", &s.hex()[..24]);
    let plain = e.export_snapshot(&s).await.expect("plain export");
    assert_eq!(plain.dirty_bitmap, None);
    assert!(export_ids(&e).await.contains(&sid));
    e.unexport_snapshot(&s).await.expect("plain unexport");
    assert!(!export_ids(&e).await.contains(&sid));
    // The same daemon throughout, still answering.
    assert_eq!(env.daemon_pid(), pid);
    assert_eq!(daemons_for(&env.cfg.runtime_dir), 1);
    assert!(
        e.jobs()
            .await
            .expect("the daemon answers")
            .iter()
            .any(|j| j.id == "tstream" && j.status == "concluded")
    );

    // Dismissed, the node list is safe again: the helper of a new export
    // is as large as the snapshot (16 MiB), not as the volume (32 MiB).
    q.execute("job-dismiss", json!({ "id": "tstream" }))
        .await
        .expect("dismiss");
    for n in ["tstreamtop", "tstreambase"] {
        q.execute("blockdev-del", json!({ "node-name": n }))
            .await
            .expect("drop scratch node");
    }
    let xp = e
        .export_snapshot_changed_since(&s, &b)
        .await
        .expect("export again");
    assert_eq!(nbdinfo_dirty(&xp.uri(), &context), changed);
    let helper = node(&e, &format!("c{}", &s.hex()[..24])).await;
    assert_eq!(helper["image"]["virtual-size"], 16 * MIB, "{helper}");
    assert_eq!(helper_bitmap(&e, &s).await["granularity"], CLUSTER);
    e.unexport_snapshot(&s).await.expect("unexport");
    assert_eq!(helpers(&e, &s).await, Vec::<String>::new());
}

/// Stopping a plain snapshot export (no bitmap in its record) sends only
/// the export's own deletion and the check that it is gone: no lookups of
/// bitmap helpers. A helper an interrupted export left is still removed:
/// by recovery's sweep, and by stopping an export the record does not name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_unexport_skips_the_bitmap_cleanup_and_leftovers_are_swept() {
    let env = TestEnv::new("xpl");
    let vol = VolumeId::generate();
    let s = SnapshotId::generate();
    let helper = format!("c{}", &s.hex()[..24]);
    let add_leftover = |e: &Engine| {
        let helper = helper.clone();
        let q = e.qmp().clone();
        async move {
            // What a build killed before its record was saved leaves.
            q.execute(
                "blockdev-add",
                json!({ "driver": "null-co", "node-name": helper, "size": 8 * MIB }),
            )
            .await
            .expect("leftover helper");
        }
    };
    let has_helper = |e: &Engine| {
        let helper = helper.clone();
        let e = e.qmp().clone();
        async move {
            let v = e
                .execute("query-named-block-nodes", json!({ "flat": true }))
                .await
                .expect("nodes");
            v.as_array()
                .into_iter()
                .flatten()
                .any(|n| n["node-name"].as_str() == Some(helper.as_str()))
        }
    };
    {
        let e = env.engine().await;
        e.create_volume(&vol, 8 * MIB).await.expect("create");
        e.create_snapshot(&vol, &s).await.expect("snapshot");
        add_leftover(&e).await;
        let x = e.export_snapshot(&s).await.expect("plain export");
        assert_eq!(x.dirty_bitmap, None);
        let (r, cmds) = qmp_commands(e.unexport_snapshot(&s)).await;
        r.expect("unexport");
        assert!(
            cmds.len() >= 2
                && cmds[0] == "block-export-del"
                && cmds[1..].iter().all(|c| c == "query-block-exports"),
            "a plain unexport sent {cmds:?}"
        );
        assert!(
            !export_ids(&e)
                .await
                .contains(&format!("s{}", &s.hex()[..24]))
        );
        assert!(has_helper(&e).await, "the plain path touched the helper");
    }
    // Recovery (a new engine on the same daemon) sweeps the leftover.
    let e = env.engine().await;
    assert!(!has_helper(&e).await, "recovery left the helper");
    // Stopping an export the record does not name cleans up too.
    add_leftover(&e).await;
    e.unexport_snapshot(&s).await.expect("unexport unrecorded");
    assert!(!has_helper(&e).await, "unexport left the helper");
    // The bitmap path still removes its helper (see the first test) and a
    // plain export of the same snapshot works again.
    e.export_snapshot(&s).await.expect("plain export again");
    e.unexport_snapshot(&s).await.expect("unexport again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nbd_client_writes_data_that_reads_back() {
    let env = TestEnv::new("xwr");
    let e = env.engine().await;
    let vol = VolumeId::generate();
    e.create_volume(&vol, 4 * CLUSTER).await.expect("create");
    let attach = e.attach_volume(&vol).await.expect("attach");
    let mut c = NbdClient::connect(&attach.socket, &attach.name)
        .await
        .expect("connect");
    c.write(CLUSTER, &[0x5a; 8192]).await.expect("write");
    c.disconnect().await.expect("disconnect");
    let uri = attach.uri();
    // Written data reads back, and nothing else was written.
    common::qemu_io_read(&uri, 0x5a, CLUSTER, 8192);
    common::qemu_io_read(&uri, 0, 0, CLUSTER);
    common::qemu_io_read(&uri, 0, CLUSTER + 8192, CLUSTER);
}
