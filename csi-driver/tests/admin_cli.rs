//! The admin CLI through the real binary against a real daemon in a temp
//! pool: every call below is a separate `livedisk-csi admin` process.

mod common;

use std::process::{Command, Output};

use common::{TestEnv, pool_fingerprint};
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

fn qemu_io_write(uri: &str, pattern: u8, offset: u64, len: u64) {
    let st = Command::new("qemu-io")
        .args(["-f", "raw", "-c"])
        .arg(format!("write -P {pattern} {offset} {len}"))
        .arg(uri)
        .output()
        .expect("qemu-io");
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
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
    assert_eq!(snaps.as_array().map(Vec::len), Some(2));
    assert_ne!(snaps[0]["id"], s1.as_str());
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
    let vol = livedisk_csi::engine::VolumeId::generate();
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
