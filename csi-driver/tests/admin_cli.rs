//! The admin CLI through the real binary against a real daemon in a temp
//! pool: every call below is a separate `livedisk-csi admin` process.

#[path = "../../engine/tests/common/mod.rs"]
mod common;

use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use common::{TestEnv, daemons_for, pool_fingerprint, qemu_io_read, qemu_io_write, wait_until};
use livedisk_engine::{Engine, ErrorCode, SnapshotId, VolumeId};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_livedisk-csi");
const MIB: u64 = 1 << 20;

fn admin(env: &TestEnv, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("admin")
        .arg("--pool")
        .arg(&env.cfg.pool)
        .arg("--runtime-dir")
        .arg(&env.cfg.runtime_dir)
        .args(args)
        .output()
        .expect("run livedisk-csi")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Runs with `--json`, asserts success, returns the parsed output.
fn json(env: &TestEnv, args: &[&str]) -> Value {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    let o = admin(env, &a);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{args:?} failed: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: bad JSON {e}: {out}"))
}

/// Asserts failure with `code` and a stderr containing `needle`.
fn fails(env: &TestEnv, args: &[&str], code: i32, needle: &str) {
    let o = admin(env, args);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(code), "{args:?}: {err}");
    assert!(err.contains(needle), "{args:?}: {err:?} lacks {needle:?}");
}

/// Asserts the command is refused with code 5 and `needle`, retrying while
/// the refusal is only the held engine's momentary volume lock.
async fn refused_while_held(env: &TestEnv, args: &[&str], needle: &str) {
    let t = std::time::Instant::now();
    loop {
        let o = admin(env, args);
        let (_, err) = text(&o);
        assert_eq!(o.status.code(), Some(5), "{args:?}: {err}");
        if err.contains("held by another process") && t.elapsed() < Duration::from_secs(30) {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        assert!(err.contains(needle), "{args:?}: {err:?} lacks {needle:?}");
        return;
    }
}

/// The CLI with extra environment (failpoints), returning its raw output.
fn admin_env(env: &TestEnv, vars: &[(&str, &str)], args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("admin")
        .arg("--pool")
        .arg(&env.cfg.pool)
        .arg("--runtime-dir")
        .arg(&env.cfg.runtime_dir)
        .args(args)
        .envs(vars.iter().copied())
        .output()
        .expect("run livedisk-csi")
}

/// A call on the held engine, retried while it answers ABORTED: the
/// engine's adopter may hold the volume for a moment (as a CSI sidecar
/// retries ABORTED).
async fn retry_busy<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, livedisk_engine::EngineError>>,
{
    let t = std::time::Instant::now();
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) if e.code() == ErrorCode::Aborted && t.elapsed() < Duration::from_secs(30) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{what}: {e}"),
        }
    }
}

fn record_text(env: &TestEnv, vol: &VolumeId) -> String {
    std::fs::read_to_string(env.cfg.pool.join(vol.as_str()).join("record.json"))
        .expect("record.json")
}

fn file_names(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn extents(v: &Value) -> Vec<(u64, u64)> {
    v["extents"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            (
                e["offset"].as_u64().unwrap_or(u64::MAX),
                e["length"].as_u64().unwrap_or(u64::MAX),
            )
        })
        .collect()
}

fn str_of(v: &Value) -> String {
    v.as_str().expect("a string").to_owned()
}

#[test]
fn admin_cli_against_a_real_daemon() {
    let env = TestEnv::new("cli");
    let vol = str_of(&json(&env, &["create-volume", "--size", "64MiB"])["id"]);
    let uri = str_of(&json(&env, &["attach", &vol])["uri"]);
    qemu_io_write(&uri, 1, 0, MIB);
    let s1 = str_of(&json(&env, &["snapshot", &vol])["snapshots"][0]["id"]);
    qemu_io_write(&uri, 2, 4 * MIB, 65536);
    let s2 = str_of(&json(&env, &["snapshot", &vol])["snapshots"][0]["id"]);

    let vols = json(&env, &["volumes"]);
    assert_eq!(vols[0]["id"], vol.as_str());
    assert_eq!(vols[0]["size"], 64 * MIB);
    assert_eq!(vols[0]["layers"], 3);
    assert_eq!(vols[0]["snapshots"], 2);
    let (table, _) = text(&admin(&env, &["snapshots", &vol]));
    assert!(table.starts_with("SNAPSHOT"), "{table}");
    assert!(table.contains(&s1) && table.contains(&s2), "{table}");
    let (chain, _) = text(&admin(&env, &["chain", &vol]));
    assert_eq!(chain.lines().count(), 4, "{chain}");
    assert!(chain.contains("active"), "{chain}");

    let all = json(&env, &["allocated", &s2]);
    assert_eq!(extents(&all), vec![(0, MIB), (4 * MIB, 65536)]);
    let delta = json(&env, &["delta", &s1, &s2]);
    assert_eq!(extents(&delta), vec![(4 * MIB, 65536)]);
    // Paging: one extent at a time, resumed where the last one ended.
    let p1 = json(&env, &["allocated", &s2, "--max", "1"]);
    assert_eq!(extents(&p1), vec![(0, MIB)]);
    let next = p1["nextStart"].as_u64().expect("nextStart").to_string();
    let p2 = json(&env, &["allocated", &s2, "--start", &next, "--max", "1"]);
    assert_eq!(extents(&p2), vec![(4 * MIB, 65536)]);

    // Bad input: a clear message, a code per class, nothing changed.
    let other = str_of(&json(&env, &["create-volume", "--size", "1MiB"])["id"]);
    let s3 = str_of(&json(&env, &["snapshot", &other])["snapshots"][0]["id"]);
    let before = pool_fingerprint(&env.cfg.pool);
    fails(&env, &["chain", "../x"], 2, "invalid volume id");
    fails(
        &env,
        &["create-volume", "--size", "1GiB", "--id", "../x"],
        2,
        "invalid volume id",
    );
    fails(&env, &["delete-snapshot", "../x"], 2, "invalid snapshot id");
    fails(
        &env,
        &["allocated", "snap-../../etc/passwd"],
        2,
        "invalid snapshot id",
    );
    fails(&env, &["delete-volume", "vol-../x"], 2, "invalid volume id");
    fails(&env, &["create-volume", "--size", "1GB"], 2, "unknown unit");
    fails(&env, &["delta", &s3, &s2], 2, "belongs to volume");
    fails(&env, &["delta", &s2, &s1], 2, "");
    let ghost = "snap-00000000-0000-4000-8000-000000000000";
    fails(&env, &["delete-snapshot", ghost], 3, "not found");
    fails(
        &env,
        &["snapshots", "vol-00000000-0000-4000-8000-000000000000"],
        3,
        "not found",
    );
    fails(
        &env,
        &["snapshot", &vol, &other, "--id", ghost],
        2,
        "--id names one snapshot",
    );
    assert_eq!(
        before,
        pool_fingerprint(&env.cfg.pool),
        "bad input changed the pool"
    );

    // Group snapshot: one transaction over both volumes.
    let group = json(&env, &["snapshot", &vol, &other]);
    assert_eq!(group["snapshots"].as_array().map(Vec::len), Some(2));

    // Delete by merge; the later snapshot's view is unchanged.
    let del = json(&env, &["delete-snapshot", &s1, "--wait"]);
    assert_eq!(del["deleted"], true);
    let snaps = json(&env, &["snapshots", &vol]);
    // The live ones, then s1's tombstone: it only answers as a delta's base.
    assert_eq!(snaps.as_array().map(Vec::len), Some(3), "{snaps}");
    assert_ne!(snaps[0]["id"], s1.as_str());
    assert_eq!(snaps[2]["id"], s1.as_str());
    assert_eq!(snaps[2]["state"], "deleted");
    assert_eq!(snaps[2]["until"], s2.as_str());
    assert_eq!(
        extents(&json(&env, &["delta", &s1, &s2])),
        vec![(4 * MIB, 65536)],
        "delta from the deleted s1"
    );
    fails(&env, &["allocated", &s1], 3, "not found");
    assert_eq!(
        extents(&json(&env, &["allocated", &s2])),
        vec![(0, MIB), (4 * MIB, 65536)]
    );
    let (jobs, _) = text(&admin(&env, &["jobs"]));
    assert!(jobs.starts_with("JOB"), "{jobs}");
    let (exports, _) = text(&admin(&env, &["exports"]));
    assert!(
        exports.contains(&vol) && exports.contains("yes"),
        "{exports}"
    );
    let (info, _) = text(&admin(&env, &["info"]));
    assert!(
        info.contains("qemu version: 7.") || info.contains("qemu version: "),
        "{info}"
    );
    assert!(
        info.contains(&format!("daemon pid:   {}", env.daemon_pid())),
        "{info}"
    );

    // A snapshot export reads back the point-in-time data.
    let e = json(&env, &["export", &s2]);
    let ro = str_of(&e["uri"]);
    let rd = Command::new("qemu-io")
        .args([
            "-r",
            "-f",
            "raw",
            "-c",
            &format!("read -P 2 {} 65536", 4 * MIB),
            &ro,
        ])
        .output()
        .expect("qemu-io read");
    assert!(
        String::from_utf8_lossy(&rd.stdout).contains("read 65536/65536"),
        "{}",
        String::from_utf8_lossy(&rd.stdout)
    );
    fails(&env, &["delete-snapshot", &s2], 7, "exported");

    // A newer snapshot exported with the clusters changed since s2 as a
    // dirty-bitmap context, read back by nbdinfo: the same as `delta`.
    qemu_io_write(&uri, 3, 8 * MIB, 3 * 65536);
    let g = str_of(&json(&env, &["snapshot", &vol])["snapshots"][0]["id"]);
    let x = json(&env, &["export", &g, "--changed-since", &s2]);
    let ctx = format!("qemu:dirty-bitmap:changed-since-{s2}");
    assert_eq!(x["dirtyBitmap"], ctx.as_str());
    let out = Command::new("nbdinfo")
        .args(["--json", &format!("--map={ctx}"), &str_of(&x["uri"])])
        .output()
        .expect("nbdinfo");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let map: Value = serde_json::from_slice(&out.stdout).expect("nbdinfo json");
    let dirty: Vec<(u64, u64)> = map
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["type"] == 1)
        .map(|e| {
            (
                e["offset"].as_u64().unwrap_or(0),
                e["length"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert!(
        !dirty.is_empty(),
        "no writes between s2 and the group snapshot"
    );
    assert_eq!(dirty, extents(&json(&env, &["delta", &s2, &g])));
    let listed = json(&env, &["exports"]);
    assert!(
        listed
            .as_array()
            .into_iter()
            .flatten()
            .any(|e| e["dirtyBitmap"] == ctx.as_str()),
        "{listed}"
    );
    fails(&env, &["export", &g], 4, "already exists");
    json(&env, &["unexport", &g]);
    json(&env, &["unexport", &s2]);
    json(&env, &["detach", &vol]);
    json(&env, &["delete-volume", &vol]);
    let vols = json(&env, &["volumes"]);
    let gone = vols
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| v["id"] == vol.as_str())
        .expect("volume with snapshots is kept");
    assert_eq!(gone["state"], "deleted");
}

/// Two nodes' engines side by side, each in its own mount and network
/// namespace with its own pool (hack/engine-ns.sh), driven by the CLI run
/// inside each namespace.
struct Nodes {
    dir: std::path::PathBuf,
}

impl Nodes {
    fn script() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../hack/engine-ns.sh")
    }

    fn ns(&self, args: &[&str]) -> Output {
        Command::new(Self::script())
            .args(args)
            .env("LIVEDISK_NODES_DIR", &self.dir)
            .env("LIVEDISK_BIN", BIN)
            .output()
            .expect("engine-ns.sh")
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.ns(args);
        let (out, err) = text(&o);
        assert!(o.status.success(), "{args:?}: {err}");
        out
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        for n in ["a", "b"] {
            let _ = self.ns(&["stop", n]);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn two_engines_in_their_own_namespaces() {
    common::require_tools();
    let nodes = Nodes {
        dir: std::path::PathBuf::from(format!(
            "/tmp/ldns-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        )),
    };
    for n in ["a", "b"] {
        nodes.ok(&["start", n]);
    }
    let mut vols = vec![];
    for n in ["a", "b"] {
        let out = nodes.ok(&[
            "exec",
            n,
            "--",
            BIN,
            "admin",
            "--json",
            "create-volume",
            "--size",
            "16MiB",
        ]);
        let v: Value = serde_json::from_str(&out).expect("json");
        vols.push(str_of(&v["id"]));
    }
    // Separate pools: each holds exactly its own volume.
    for (n, vol) in ["a", "b"].iter().zip(&vols) {
        let pool = nodes.dir.join(n).join("pool");
        let entries: Vec<String> = std::fs::read_dir(&pool)
            .expect("pool")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(entries, vec![vol.clone()], "pool of {n}");
        let out = nodes.ok(&["exec", n, "--", BIN, "admin", "--json", "volumes"]);
        let v: Value = serde_json::from_str(&out).expect("json");
        assert_eq!(v.as_array().map(Vec::len), Some(1));
        assert_eq!(v[0]["id"], vol.as_str());
    }
    // Each daemon's sockets exist only in its own mount namespace.
    let sock = |n: &str| nodes.dir.join(n).join("run").join("qmp.sock");
    for n in ["a", "b"] {
        assert!(
            !sock(n).exists(),
            "{n}'s socket is visible outside its namespace"
        );
    }
    let test_e = |inside: &str, of: &str| {
        nodes
            .ns(&[
                "exec",
                inside,
                "--",
                "test",
                "-S",
                &sock(of).display().to_string(),
            ])
            .status
            .success()
    };
    assert!(test_e("a", "a") && test_e("b", "b"));
    assert!(!test_e("a", "b") && !test_e("b", "a"));
    // Own network namespace: nothing but loopback.
    let links = nodes.ok(&["exec", "a", "--", "ip", "-o", "link"]);
    assert_eq!(links.lines().count(), 1, "{links}");
    assert!(links.contains("lo:"), "{links}");
}

/// The daemon's admin monitor answers the CLI's queries while an engine process (the node plugin)
/// holds the main monitor, as it always does on a running node.
#[tokio::test]
async fn queries_work_while_an_engine_holds_the_main_monitor() {
    let env = TestEnv::new("mon");
    let engine = env.engine().await;
    let vol = livedisk_engine::VolumeId::generate();
    engine
        .create_volume(&vol, 8 * MIB)
        .await
        .expect("create volume");
    engine.attach_volume(&vol).await.expect("attach");
    let (info, err) = text(&admin(&env, &["info"]));
    assert!(
        info.contains(&format!("daemon pid:   {}", env.daemon_pid())),
        "{info}{err}"
    );
    assert!(info.contains("qemu version: 7."), "{info}");
    let exports = json(&env, &["exports"]);
    assert!(exports.to_string().contains(vol.as_str()), "{exports}");
    json(&env, &["jobs"]);
    // The engine's own connection still works afterwards.
    engine.detach_volume(&vol).await.expect("detach");
    drop(engine);
}

/// Changing commands beside a running node plugin: the test process holds an
/// engine on the daemon's main monitor (as the node plugin does, with its
/// adopter running) while every command below is the real CLI binary. Each
/// one succeeds, the held engine sees the same records and state and can
/// work on the volumes itself afterwards, and no second daemon ever starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changing_commands_work_beside_a_held_engine() {
    let env = TestEnv::new("beside");
    let engine = Arc::new(env.engine().await);
    let runtime = env.cfg.runtime_dir.clone();
    let one_daemon = |when: &str| assert_eq!(daemons_for(&runtime), 1, "{when}");
    one_daemon("held engine open");

    // Create: the held engine lists the new volume.
    let vol = str_of(&json(&env, &["create-volume", "--size", "32MiB"])["id"]);
    let vid = VolumeId::parse(&vol).expect("volume id");
    let listed = engine.list_volumes().expect("list");
    assert!(
        listed.iter().any(|v| v.id == vid && v.size == 32 * MIB),
        "{listed:?}"
    );
    one_daemon("create-volume");

    // The consumer attaches through the held engine and writes.
    let uri = engine.attach_volume(&vid).await.expect("attach").uri();
    qemu_io_write(&uri, 1, 0, MIB);

    // Snapshot: the held engine sees it ready, with its extents.
    let s1 = str_of(&json(&env, &["snapshot", &vol])["snapshots"][0]["id"]);
    let sid1 = SnapshotId::parse(&s1).expect("snapshot id");
    let snaps = engine.list_snapshots(&vid).expect("snapshots");
    assert_eq!(snaps.len(), 1);
    assert!(snaps[0].id == sid1 && snaps[0].ready, "{snaps:?}");
    let alloc = engine.allocated(&sid1, 0, 0).await.expect("allocated");
    assert_eq!(alloc.extents.len(), 1);
    assert_eq!((alloc.extents[0].offset, alloc.extents[0].length), (0, MIB));
    one_daemon("snapshot");

    // 8 MiB above s1: at 1 MiB/s its merge takes seconds.
    qemu_io_write(&uri, 2, 0, 8 * MIB);
    let started = json(&env, &["delete-snapshot", &s1, "--speed", "1MiB"]);
    assert_eq!(started["deleted"], false, "{started}");
    let job = str_of(&started["job"]);
    assert_eq!(job, Engine::merge_job_id(&sid1));
    // The held engine's session sees the CLI's job (one daemon, one job).
    let jobs = engine.jobs().await.expect("jobs");
    assert!(jobs.iter().any(|j| j.id == job), "{jobs:?}");
    let listed = json(&env, &["jobs"]);
    assert!(listed.to_string().contains(&job), "{listed}");

    // Cancel: the job is gone, the merge stays in flight, s1 unreadable.
    let c = json(&env, &["cancel", &job]);
    assert_eq!(c["cancelled"], true);
    assert!(c["status"].is_null(), "job still there: {c}");
    assert!(
        !engine
            .jobs()
            .await
            .expect("jobs")
            .iter()
            .any(|j| j.id == job)
    );
    let rec = engine.record(&vid).expect("record");
    assert!(rec.in_flight.is_some(), "{rec:?}");
    assert!(!engine.snapshot(&sid1).expect("s1").ready);
    // The adopter does not restart a cancelled merge. Proven by a pass of
    // the adopter over this very volume after the cancel, not by sleeping:
    // a stray layer file (what a step killed between creating a file and
    // saving the record leaves) makes the volume need recovery; the
    // adopter's light recovery deletes it and, with the volume's lock still
    // held, decides about the merge in flight. Once the file is gone and
    // the lock is free again, that decision has been taken.
    let marker = env
        .cfg
        .pool
        .join(&vol)
        .join(livedisk_engine::record::VolumeRecord::layer_file(
            rec.next_layer_seq + 1000,
        ));
    std::fs::write(&marker, b"").expect("stray layer file");
    wait_until(
        "the adopter's pass over the volume (it removes the stray layer file)",
        Duration::from_secs(30),
        || !marker.exists(),
    )
    .await;
    // Taking the volume's lock (an idempotent attach) waits out the pass.
    retry_busy("attach after the adopter's pass", || {
        engine.attach_volume(&vid)
    })
    .await;
    let jobs = engine.jobs().await.expect("jobs");
    assert!(
        !jobs.iter().any(|j| j.id == job),
        "the adopter restarted the cancelled merge: {jobs:?}"
    );
    let rec = engine.record(&vid).expect("record");
    assert!(
        rec.in_flight.is_some(),
        "the cancelled merge left the record: {rec:?}"
    );
    assert!(!engine.snapshot(&sid1).expect("s1").ready);
    one_daemon("cancel");

    // Finishing: delete again (throttled), unthrottle; the CLI has exited
    // by then, and the held engine records the end of the merge itself.
    let again = json(&env, &["delete-snapshot", &s1, "--speed", "1MiB"]);
    assert_eq!(again["deleted"], false, "{again}");
    json(&env, &["set-speed", &job, "0"]);
    wait_until(
        "the held engine finishing the CLI's merge",
        Duration::from_secs(60),
        || {
            engine
                .record(&vid)
                .is_ok_and(|r| r.in_flight.is_none() && r.snapshots.is_empty())
        },
    )
    .await;
    // The job itself goes right after the record says so (dismissed once concluded); under load
    // the daemon may list it for a moment longer.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let jobs = engine.jobs().await.expect("jobs");
        if !jobs.iter().any(|j| j.id == job) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the finished merge's job stays in the daemon: {jobs:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rec = engine.record(&vid).expect("record");
    assert_eq!(
        rec.layers.len(),
        2,
        "internal seal + commit keeps two layers: {rec:?}"
    );
    qemu_io_read(&uri, 2, 0, 8 * MIB);
    one_daemon("merge finished");

    // The held engine works on the volume itself afterwards.
    let own = SnapshotId::generate();
    retry_busy("held snapshot", || engine.create_snapshot(&vid, &own)).await;
    qemu_io_write(&uri, 3, 4 * MIB, MIB);
    retry_busy("held merge", || engine.delete_snapshot(&own, None)).await;
    qemu_io_read(&uri, 3, 4 * MIB, MIB);
    qemu_io_read(&uri, 2, 0, 4 * MIB);

    // Export start/stop of a snapshot the held engine took.
    let s2 = SnapshotId::generate();
    retry_busy("held snapshot s2", || engine.create_snapshot(&vid, &s2)).await;
    let e = json(&env, &["export", s2.as_str()]);
    let ro = str_of(&e["uri"]);
    qemu_io_read(&ro, 3, 4 * MIB, MIB);
    let rec = engine.record(&vid).expect("record");
    assert_eq!(rec.exports.len(), 2, "attach + snapshot export: {rec:?}");
    json(&env, &["unexport", s2.as_str()]);
    assert_eq!(engine.record(&vid).expect("record").exports.len(), 1);
    one_daemon("export/unexport");

    // While the held engine merges s2 (throttled), the volume is not held: the
    // CLI snapshots it from its own process (stopping the held engine's job and
    // starting it again), and only what must wait for the merge answers 5,
    // changing nothing.
    qemu_io_write(&uri, 4, 8 * MIB, 8 * MIB);
    let held = {
        let (engine, s2) = (engine.clone(), s2.clone());
        tokio::spawn(async move { engine.delete_snapshot(&s2, Some(MIB)).await })
    };
    let hjob = Engine::merge_job_id(&s2);
    let running = || async {
        let t = std::time::Instant::now();
        loop {
            let jobs = engine.jobs().await.expect("jobs");
            if jobs.iter().any(|j| j.id == hjob && j.status == "running") {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(30), "{jobs:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    running().await;
    let cli_snapshot = loop {
        // The held engine holds the lock for a moment while it starts its job.
        let o = admin(&env, &["--json", "snapshot", &vol]);
        if o.status.code() == Some(5) {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        let (out, err) = text(&o);
        assert!(o.status.success(), "snapshot during the held merge: {err}");
        let v: Value = serde_json::from_str(&out).expect("snapshot JSON");
        break str_of(&v["snapshots"][0]["id"]);
    };
    running().await;
    assert!(
        !held.is_finished(),
        "the snapshot waited for the held merge"
    );
    let before = (
        record_text(&env, &vid),
        file_names(&env.cfg.pool.join(&vol)),
    );
    // Another snapshot's merge waits for this one. The held engine may hold
    // the volume's lock for a moment (restarting its job after the CLI's
    // snapshot); that answer is also 5 and is retried, as a sidecar would.
    refused_while_held(&env, &["delete-snapshot", &cli_snapshot], "in flight").await;
    let after = (
        record_text(&env, &vid),
        file_names(&env.cfg.pool.join(&vol)),
    );
    assert_eq!(before, after, "a refused command changed the volume");
    // Job control needs no volume lock: the CLI unthrottles the held merge.
    json(&env, &["set-speed", &hjob, "0"]);
    tokio::time::timeout(Duration::from_secs(60), held)
        .await
        .expect("held merge bounded")
        .expect("join")
        .expect("held merge");
    qemu_io_read(&uri, 4, 8 * MIB, 8 * MIB);
    json(&env, &["delete-snapshot", &cli_snapshot, "--wait"]);
    one_daemon("busy");

    // Delete: the held engine sees the volume gone.
    engine.detach_volume(&vid).await.expect("detach");
    json(&env, &["delete-volume", &vol]);
    assert!(engine.volume(&vid).is_err());
    assert!(engine.list_volumes().expect("list").is_empty());
    // `stop` refuses while the held engine holds the main monitor, even forced.
    fails(
        &env,
        &["stop", "--force"],
        7,
        "holds the daemon's main monitor",
    );
    one_daemon("end");
    // The held engine's own session still works.
    engine.jobs().await.expect("jobs");
}

/// An admin command killed mid-step while the node plugin runs: its engine
/// (the held one here) recovers the step by itself, restarting nothing, and
/// no acknowledged write is lost.
/// Runs an admin command that kills itself (kill -9) at `failpoint`.
fn admin_killed_at(env: &TestEnv, failpoint: &str, args: &[&str]) {
    let o = admin_env(env, &[("LIVEDISK_FAILPOINT", failpoint)], args);
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&o.status),
        Some(libc::SIGKILL),
        "failpoint {failpoint} not reached: {}",
        text(&o).1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cli_killed_mid_step_is_recovered_by_the_held_engine() {
    let env = TestEnv::new("clikill");
    let engine = Arc::new(env.engine().await);
    let vid = VolumeId::generate();
    engine.create_volume(&vid, 16 * MIB).await.expect("create");
    let uri = engine.attach_volume(&vid).await.expect("attach").uri();
    qemu_io_write(&uri, 1, 0, 2 * MIB);
    let pid = env.daemon_pid();

    // Killed right after the snapshot transaction: rolled forward.
    let s1 = SnapshotId::generate();
    admin_killed_at(
        &env,
        "snapshot-after-transaction",
        &["snapshot", vid.as_str(), "--id", s1.as_str()],
    );
    wait_until(
        "the adopter resolving the snapshot",
        Duration::from_secs(30),
        || {
            engine.record(&vid).is_ok_and(|r| {
                r.pending_snapshot.is_none() && r.snapshots.iter().all(|s| s.changed.is_some())
            })
        },
    )
    .await;
    let s = engine.snapshot(&s1).expect("rolled forward");
    assert!(s.ready);
    let alloc = engine.allocated(&s1, 0, 0).await.expect("allocated");
    assert_eq!(
        alloc.extents.iter().map(|e| e.length).sum::<u64>(),
        2 * MIB,
        "{alloc:?}"
    );

    // Killed right after the internal seal of a merge: the seal is resolved,
    // the merge waits in flight, and deleting again finishes it.
    qemu_io_write(&uri, 2, MIB, 2 * MIB);
    admin_killed_at(&env, "merge-after-seal", &["delete-snapshot", s1.as_str()]);
    wait_until(
        "the adopter resolving the seal",
        Duration::from_secs(30),
        || {
            engine.record(&vid).is_ok_and(|r| {
                matches!(
                    &r.in_flight,
                    Some(livedisk_engine::record::InFlight::Merge { seal: None, .. })
                )
            })
        },
    )
    .await;
    // The writer never stopped: the daemon is the same, and writes go on.
    assert_eq!(env.daemon_pid(), pid);
    assert_eq!(daemons_for(&env.cfg.runtime_dir), 1);
    qemu_io_write(&uri, 3, 8 * MIB, MIB);
    retry_busy("finish the merge", || engine.delete_snapshot(&s1, None)).await;
    let rec = engine.record(&vid).expect("record");
    assert!(
        rec.in_flight.is_none() && rec.snapshots.is_empty(),
        "{rec:?}"
    );
    qemu_io_read(&uri, 1, 0, MIB);
    qemu_io_read(&uri, 2, MIB, 2 * MIB);
    qemu_io_read(&uri, 3, 8 * MIB, MIB);
    for l in &rec.layers {
        common::qemu_img_check(&engine.layer_path(&vid, l.seq));
    }

    // Killed with its merge copied and flushed but not finalized: the job
    // waits in the daemon (`pending`) for a finisher, and the adopter is it.
    let (s2, s3) = (SnapshotId::generate(), SnapshotId::generate());
    qemu_io_write(&uri, 4, 4 * MIB, 2 * MIB);
    engine.create_snapshot(&vid, &s2).await.expect("s2");
    qemu_io_write(&uri, 5, 5 * MIB, 2 * MIB);
    engine.create_snapshot(&vid, &s3).await.expect("s3");
    admin_killed_at(
        &env,
        "merge-before-finalize",
        &["delete-snapshot", s2.as_str(), "--wait"],
    );
    wait_until(
        "the adopter finalizing and finishing the merge",
        Duration::from_secs(30),
        || {
            engine
                .record(&vid)
                .is_ok_and(|r| r.in_flight.is_none() && r.snapshots.len() == 1)
        },
    )
    .await;
    assert!(engine.snapshot(&s2).is_err(), "s2 still there");
    // The finisher saves the record, then dismisses the job: wait for the second step too.
    let mut jobs = engine.jobs().await.expect("jobs");
    for _ in 0..50 {
        if jobs.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        jobs = engine.jobs().await.expect("jobs");
    }
    assert!(jobs.is_empty(), "job left: {jobs:?}");
    assert_eq!(env.daemon_pid(), pid);
    qemu_io_read(&uri, 4, 4 * MIB, MIB);
    qemu_io_read(&uri, 5, 5 * MIB, 2 * MIB);
    let x = engine.export_snapshot(&s3).await.expect("export s3");
    qemu_io_read(&x.uri(), 4, 4 * MIB, MIB);
    qemu_io_read(&x.uri(), 5, 5 * MIB, 2 * MIB);
    engine.unexport_snapshot(&s3).await.expect("unexport");
    for l in &engine.record(&vid).expect("record").layers {
        common::qemu_img_check(&engine.layer_path(&vid, l.seq));
    }
    engine.detach_volume(&vid).await.expect("detach");
}

/// `qemu-img compare` of two NBD exports: whether they read the same.
fn same_content(a: &str, b: &str) -> bool {
    let o = Command::new("qemu-img")
        .args(["compare", "-q", "-f", "raw", "-F", "raw", a, b])
        .output()
        .expect("qemu-img compare");
    match o.status.code() {
        Some(0) => true,
        Some(1) => false,
        c => panic!(
            "qemu-img compare {c:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        ),
    }
}

#[test]
fn admin_revert_to_an_older_snapshot_keeps_the_newer_one() {
    let env = TestEnv::new("clirev");
    let vol = str_of(&json(&env, &["create-volume", "--size", "16MiB"])["id"]);
    let uri = str_of(&json(&env, &["attach", &vol])["uri"]);
    qemu_io_write(&uri, 1, 0, 65536);
    let s1 = str_of(&json(&env, &["snapshot", &vol])["snapshots"][0]["id"]);
    qemu_io_write(&uri, 2, 0, 65536);
    qemu_io_write(&uri, 3, MIB, 65536);
    let s2 = str_of(&json(&env, &["snapshot", &vol])["snapshots"][0]["id"]);
    qemu_io_write(&uri, 4, 2 * MIB, 65536);
    let other = str_of(&json(&env, &["create-volume", "--size", "1MiB"])["id"]);
    let o1 = str_of(&json(&env, &["snapshot", &other])["snapshots"][0]["id"]);

    // Refusals: attached (7), unknown (3), another volume's snapshot (2),
    // a bad ID (2); nothing changes.
    let before = pool_fingerprint(&env.cfg.pool);
    fails(&env, &["revert", &vol, &s1], 7, "attached");
    json(&env, &["detach", &vol]);
    let before_detached = pool_fingerprint(&env.cfg.pool);
    assert_ne!(before, before_detached, "detach is recorded");
    let ghost = "snap-00000000-0000-4000-8000-000000000000";
    fails(&env, &["revert", &vol, ghost], 3, "not found");
    fails(&env, &["revert", &vol, &o1], 2, "belongs to volume");
    fails(
        &env,
        &["revert", &vol, "snap-../x"],
        2,
        "invalid snapshot id",
    );
    assert_eq!(before_detached, pool_fingerprint(&env.cfg.pool));

    let r = json(&env, &["revert", &vol, &s1]);
    assert_eq!(r["volume"], vol.as_str());
    assert_eq!(r["snapshot"], s1.as_str());
    assert_eq!(r["snapshots"], 2, "{r}");
    assert_eq!(r["layers"], 3, "{r}");
    // Table output, and a second revert to the same snapshot is fine.
    let o = admin(&env, &["revert", &vol, &s1]);
    let (table, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        table.contains("reverted to") && table.contains(&s1),
        "{table}"
    );

    // The volume reads as s1; s2 is still there and still reads as s2.
    let vu = str_of(&json(&env, &["attach", &vol])["uri"]);
    let u1 = str_of(&json(&env, &["export", &s1])["uri"]);
    let u2 = str_of(&json(&env, &["export", &s2])["uri"]);
    assert!(same_content(&vu, &u1), "volume must read as s1");
    assert!(!same_content(&vu, &u2));
    let snaps = json(&env, &["snapshots", &vol]);
    assert_eq!(snaps.as_array().map(Vec::len), Some(2), "{snaps}");
    // s2 still holds its own writes (pattern 3 at 1 MiB is only in s2).
    qemu_io_read(&u2, 3, MIB, 65536);
    json(&env, &["unexport", &s1]);
    json(&env, &["unexport", &s2]);
    json(&env, &["detach", &vol]);
}
