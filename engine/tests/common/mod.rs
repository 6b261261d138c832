//! Shared harness for engine tests: every test gets its own pool, runtime
//! dir and daemon, and everything it started is stopped by PID on drop.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use livedisk_engine::{Engine, EngineConfig, Extent};

pub const CLUSTER: u64 = 65536;
pub const BLOCK: u64 = 4096;

/// Fails (never skips) when the QEMU tools are missing.
pub fn require_tools() {
    for tool in ["qemu-storage-daemon", "qemu-img", "nbdinfo", "nbdfuse"] {
        let found = Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        assert!(
            found,
            "{tool} is missing: apt-get install qemu-system-common qemu-utils libnbd-bin"
        );
    }
}

pub struct TestEnv {
    pub root: PathBuf,
    pub cfg: EngineConfig,
}

impl TestEnv {
    pub fn new(name: &str) -> Self {
        require_tools();
        // Short paths: unix socket paths are limited to 107 bytes.
        let root = PathBuf::from(format!(
            "/tmp/ld-{name}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        ));
        std::fs::create_dir_all(&root).expect("test root");
        let cfg = EngineConfig {
            pool: root.join("pool"),
            runtime_dir: root.join("run"),
        };
        Self { root, cfg }
    }

    /// Opens the engine; every volume must have recovered.
    pub async fn engine(&self) -> Engine {
        let e = Engine::open(self.cfg.clone()).await.expect("engine open");
        assert_eq!(e.recovery_errors(), vec![], "volumes failed to recover");
        e
    }

    fn pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.cfg.runtime_dir.join("qsd.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    pub fn daemon_pid(&self) -> i32 {
        self.pid().expect("daemon pid file")
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        if let Some(pid) = self.pid() {
            // SAFETY: killing the daemon this test started, by its PID.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let t = Instant::now();
            while Path::new(&format!("/proc/{pid}")).exists()
                && t.elapsed() < Duration::from_secs(5)
            {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// A consumer-side file for an NBD export, via nbdfuse (its own process).
pub struct NbdFile {
    child: Child,
    dir: PathBuf,
    pub file: PathBuf,
}

impl NbdFile {
    /// PID of the nbdfuse process serving this file.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn mount(dir: &Path, uri: &str, readonly: bool) -> Self {
        std::fs::create_dir_all(dir).expect("mount dir");
        let pidfile = dir.with_extension("pid");
        let _ = std::fs::remove_file(&pidfile);
        let mut cmd = Command::new("nbdfuse");
        if readonly {
            cmd.arg("-r");
        }
        let child = cmd
            .arg("-P")
            .arg(&pidfile)
            .arg(dir.join("disk"))
            .arg(uri)
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn nbdfuse");
        let t = Instant::now();
        while !pidfile.exists() {
            assert!(t.elapsed() < Duration::from_secs(10), "nbdfuse not ready");
            std::thread::sleep(Duration::from_millis(10));
        }
        Self {
            child,
            dir: dir.to_owned(),
            file: dir.join("disk"),
        }
    }
}

impl Drop for NbdFile {
    fn drop(&mut self) {
        let ok = Command::new("fusermount3")
            .arg("-u")
            .arg(&self.dir)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            // Still open somewhere (a failing test's writer): detach lazily
            // so no mount outlives the test.
            let _ = Command::new("fusermount3")
                .args(["-u", "-z"])
                .arg(&self.dir)
                .stderr(Stdio::null())
                .status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Extents covering the clusters that contain the given 4 KiB blocks.
pub fn clusters_of(blocks: impl IntoIterator<Item = u64>) -> Vec<Extent> {
    livedisk_engine::extents::normalize(
        blocks
            .into_iter()
            .map(|b| Extent {
                offset: b * BLOCK / CLUSTER * CLUSTER,
                length: CLUSTER,
            })
            .collect(),
    )
}

/// Extents whose `qemu:allocation-depth` is 1 (allocated in the exported
/// layer itself), read over NBD block status by `nbdinfo`: an independent
/// view of what the engine's records should say.
pub fn nbdinfo_local_extents(uri: &str) -> Vec<Extent> {
    nbdinfo_map(uri, "qemu:allocation-depth", |d| d == 1)
}

/// Extents allocated anywhere in the exported view's chain (any
/// `qemu:allocation-depth` above 0), read over NBD block status by `nbdinfo`.
pub fn nbdinfo_allocated_extents(uri: &str) -> Vec<Extent> {
    nbdinfo_extents_within(uri, u64::MAX)
}

/// Extents allocated in the top `depth` layers of the exported view (its
/// own layer and the `depth - 1` below it), by `nbdinfo`.
pub fn nbdinfo_extents_within(uri: &str, depth: u64) -> Vec<Extent> {
    nbdinfo_map(uri, "qemu:allocation-depth", |d| d > 0 && d <= depth)
}

/// The extents of metadata `context` (`nbdinfo --map`) whose type `keep`
/// selects, normalized.
pub fn nbdinfo_map(uri: &str, context: &str, keep: impl Fn(u64) -> bool) -> Vec<Extent> {
    let out = Command::new("nbdinfo")
        .arg("--json")
        .arg(format!("--map={context}"))
        .arg(uri)
        .output()
        .expect("nbdinfo");
    assert!(
        out.status.success(),
        "nbdinfo: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("nbdinfo json");
    let list = v.as_array().cloned().unwrap_or_default();
    livedisk_engine::extents::normalize(
        list.iter()
            .filter(|e| e["type"].as_u64().is_some_and(&keep))
            .map(|e| Extent {
                offset: e["offset"].as_u64().unwrap_or(0),
                length: e["length"].as_u64().unwrap_or(0),
            })
            .collect(),
    )
}

/// Copies an export to a raw file (for the verifier) with qemu-img.
pub fn export_to_raw(uri: &str, dst: &Path) {
    let st = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", uri])
        .arg(dst)
        .status()
        .expect("qemu-img convert");
    assert!(st.success());
}

/// Every file under the pool with its size and, for records, its content:
/// "nothing changed on disk" is checked by comparing two of these.
pub fn pool_fingerprint(pool: &Path) -> Vec<(PathBuf, u64, String)> {
    let mut out = vec![];
    let mut stack = vec![pool.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read pool").flatten() {
            let p = e.path();
            // Layer files of earlier, finished deletions being unlinked in
            // the background (engine/reclaim.rs): not part of any volume.
            if e.file_name() == ".reclaim" {
                continue;
            }
            if p.is_dir() {
                stack.push(p);
            } else {
                let len = e.metadata().map(|m| m.len()).unwrap_or(0);
                let body = if p.extension().is_some_and(|x| x == "json") {
                    std::fs::read_to_string(&p).unwrap_or_default()
                } else {
                    String::new()
                };
                out.push((p, len, body));
            }
        }
    }
    out.sort();
    out
}

/// A second process hosting the engine library: the test binary re-executed
/// with `LD_CHILD=<op>`, running only its `child_entry` test. Killing it is a
/// real kill -9 of the process hosting the library.
pub fn spawn_child(env: &TestEnv, op: &str, vars: &[(&str, String)]) -> Child {
    let exe = std::env::current_exe().expect("test exe");
    let mut cmd = Command::new(exe);
    cmd.args([
        "--exact",
        "child_entry",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("LD_CHILD", op)
    .env("LD_POOL", &env.cfg.pool)
    .env("LD_RUN", &env.cfg.runtime_dir)
    .stdout(Stdio::null());
    for (k, v) in vars {
        cmd.env(k, v);
    }
    cmd.spawn().expect("spawn child")
}

/// Waits for a child; kills it (by PID) if it overstays.
pub fn wait_child(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let t = Instant::now();
    loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            return st;
        }
        if t.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!("child did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `qemu-img check` of one layer file alone (force-share: the daemon has it
/// open). Leaked clusters (exit 3) are reported but accepted: a kill -9 can
/// leave allocated-but-unreferenced clusters, which waste space but never
/// corrupt data. Only meaningful while nothing writes the file.
pub fn qemu_img_check(file: &Path) {
    let out = Command::new("qemu-img")
        .args(["check", "-U", "-q"])
        .arg(file)
        .output()
        .expect("qemu-img check");
    let code = out.status.code();
    if code == Some(3) {
        eprintln!("qemu-img check {}: leaked clusters only", file.display());
    }
    assert!(
        matches!(code, Some(0) | Some(3)),
        "qemu-img check {} (exit {code:?}): {}{}",
        file.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every layer file of a volume passes `qemu-img check`; call it while no
/// writer is running (the active layer's metadata moves under writes).
pub fn check_volume_layers(e: &Engine, vol: &livedisk_engine::VolumeId) {
    let rec = e.record(vol).expect("record");
    for l in &rec.layers {
        qemu_img_check(&e.layer_path(vol, l.seq));
    }
}

/// The sealed (read-only) layers pass `qemu-img check`, writer or not.
pub fn check_sealed_layers(e: &Engine, vol: &livedisk_engine::VolumeId) {
    let rec = e.record(vol).expect("record");
    for l in rec.layers.iter().filter(|l| l.sealed_by.is_some()) {
        qemu_img_check(&e.layer_path(vol, l.seq));
    }
}

/// Number of live qemu-storage-daemon processes serving this runtime dir.
pub fn daemons_for(runtime: &Path) -> usize {
    let needle = runtime.join("qmp.sock").display().to_string();
    std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.parse::<u32>().is_ok())
        })
        .filter(|e| {
            let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd);
            let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
            let zombie = stat
                .rsplit(')')
                .next()
                .is_some_and(|s| s.trim_start().starts_with('Z'));
            !zombie && cmd.contains("qemu-storage-daemon") && cmd.contains(&needle)
        })
        .count()
}

/// `rd_bytes` of every named node, from the daemon's own block statistics.
pub async fn node_read_bytes(e: &Engine) -> std::collections::BTreeMap<String, u64> {
    let v = e
        .qmp()
        .execute(
            "query-blockstats",
            serde_json::json!({ "query-nodes": true }),
        )
        .await
        .expect("query-blockstats");
    let mut out = std::collections::BTreeMap::new();
    for s in v.as_array().cloned().unwrap_or_default() {
        if let Some(n) = s["node-name"].as_str() {
            out.insert(n.to_owned(), s["stats"]["rd_bytes"].as_u64().unwrap_or(0));
        }
    }
    out
}

/// Polls until `f` is true or the timeout passes (then panics with `what`).
pub async fn wait_until<F: FnMut() -> bool>(what: &str, timeout: Duration, mut f: F) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn run_ok(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| {
        panic!("{cmd} is missing ({e}): apt-get install util-linux e2fsprogs fuse3")
    });
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A loop device over a file, without direct I/O (see the brief's pitfall:
/// direct I/O over FUSE broke a filesystem). Detached on drop.
pub struct LoopDev {
    pub dev: PathBuf,
}

impl LoopDev {
    pub fn attach(file: &Path) -> Self {
        let f = file.to_str().expect("utf-8 path");
        let dev = run_ok("losetup", &["--find", "--show", "--direct-io=off", f]);
        Self {
            dev: PathBuf::from(dev),
        }
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup")
            .arg("-d")
            .arg(&self.dev)
            .stderr(Stdio::null())
            .status();
    }
}

/// A mounted filesystem; unmounted on drop (lazily if still busy).
pub struct Mounted {
    pub target: PathBuf,
}

impl Mounted {
    pub fn mount(dev: &Path, target: &Path) -> Self {
        std::fs::create_dir_all(target).expect("mount target");
        run_ok(
            "mount",
            &[
                "-t",
                "ext4",
                dev.to_str().expect("utf-8"),
                target.to_str().expect("utf-8"),
            ],
        );
        Self {
            target: target.to_owned(),
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.target)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.target)
                .stderr(Stdio::null())
                .status();
        }
    }
}

pub fn mkfs_ext4(dev: &Path) {
    run_ok("mkfs.ext4", &["-q", "-F", dev.to_str().expect("utf-8")]);
}

/// `e2fsck -fn`: a forced, read-only check; panics unless clean.
pub fn fsck_clean(dev: &Path) {
    run_ok("e2fsck", &["-fn", dev.to_str().expect("utf-8")]);
}

/// Kills a process by PID with SIGKILL (a consumer-side crash).
pub fn kill9(pid: u32) {
    // SAFETY: signalling a process this test started, by its PID.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
}

/// The daemon's block nodes (`query-named-block-nodes`, flat).
pub async fn block_nodes(e: &livedisk_engine::Engine) -> Vec<serde_json::Value> {
    let nodes = e
        .qmp()
        .execute(
            "query-named-block-nodes",
            serde_json::json!({ "flat": true }),
        )
        .await
        .expect("query-named-block-nodes");
    nodes.as_array().cloned().unwrap_or_default()
}

/// Names of the daemon's block nodes of one volume.
pub async fn volume_node_names(
    e: &livedisk_engine::Engine,
    vol: &livedisk_engine::VolumeId,
) -> Vec<String> {
    let prefix = livedisk_engine::record::VolumeRecord::node_prefix(vol);
    block_nodes(e)
        .await
        .iter()
        .filter_map(|n| n["node-name"].as_str())
        .filter(|n| n.starts_with(&prefix))
        .map(str::to_owned)
        .collect()
}

/// The writers of the live tests on one consumer file: a background writer
/// (tag 1) cycling through clusters 0..16 every millisecond, running once it
/// has 5 acknowledged writes, and a foreground writer (tag 2) for chosen
/// clusters between operations.
pub async fn live_writers(
    file: &Path,
) -> (
    livedisk_verifier::BackgroundWriter,
    livedisk_verifier::Writer,
) {
    use livedisk_verifier::{BackgroundWriter, Pattern, Writer};
    let bg = BackgroundWriter::start(
        Writer::open(file, 1).expect("open background writer"),
        Pattern::Sequential {
            first: 0,
            count: 16,
        },
        Duration::from_millis(1),
    );
    let fg = Writer::open(file, 2).expect("open foreground writer");
    while bg.last_acked() < 5 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    (bg, fg)
}

/// Reads `len` bytes at `offset` of an NBD URI with `qemu-io` and asserts
/// they all hold `pattern`.
pub fn qemu_io_read(uri: &str, pattern: u8, offset: u64, len: u64) {
    let rd = Command::new("qemu-io")
        .args(["-r", "-f", "raw", "-c"])
        .arg(format!("read -P {pattern} {offset} {len}"))
        .arg(uri)
        .output()
        .expect("qemu-io read");
    let out = String::from_utf8_lossy(&rd.stdout);
    assert!(
        rd.status.success()
            && out.contains(&format!("read {len}/{len}"))
            && !out.contains("Pattern verification failed"),
        "{out}{}",
        String::from_utf8_lossy(&rd.stderr)
    );
}

/// Writes `len` bytes of `pattern` at `offset` of an NBD URI with `qemu-io`.
pub fn qemu_io_write(uri: &str, pattern: u8, offset: u64, len: u64) {
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

/// Waits until every extent record of the pool is captured (a snapshot's is
/// captured in the background after the call returns), so that what a test
/// reads from the pool now stays put.
pub async fn all_captured(e: &Engine) {
    for v in e.list_volumes().expect("list volumes") {
        e.capture_extents(&v.id).await.expect("capture extents");
    }
}

/// Runs `op` until it is not refused as busy: the merge holds the volume's lock for moments
/// (starting and finishing its job), and callers retry ABORTED as kubelet does.
pub async fn retrying_busy<T, F, Fut>(what: &str, mut op: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, livedisk_engine::EngineError>>,
{
    for _ in 0..50 {
        match op().await {
            Err(livedisk_engine::EngineError::Busy(_)) => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            r => return r.unwrap_or_else(|e| panic!("{what}: {e:?}")),
        }
    }
    panic!("{what}: busy for 5 s");
}

/// Waits until the merge job `job` has copied something (and not everything).
pub async fn merge_copying(e: &livedisk_engine::Engine, job: &str) {
    for _ in 0..500 {
        if let Some(j) = e
            .jobs()
            .await
            .expect("jobs")
            .into_iter()
            .find(|j| j.id == job)
            && j.current_progress > 0
        {
            assert!(
                j.current_progress < j.total_progress,
                "{j:?}: too fast to test"
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("merge job {job} never made progress");
}

/// Leaves a `block-stream` job `job` finished and undismissed, of two scratch
/// nodes (`<job>base`, `<job>top`: no volume's), as a clone's flatten is
/// between its end and its flush and dismissal: QEMU 7.2 then segfaults on
/// `query-named-block-nodes`.
pub async fn finished_stream_left_undismissed(env: &TestEnv, e: &Engine, job: &str) {
    use serde_json::{Value, json};
    let (base, top) = (format!("{job}base"), format!("{job}top"));
    let file = |n: &str| env.root.join(format!("{n}.qcow2"));
    for (n, backing) in [(&base, None), (&top, Some(format!("{base}.qcow2")))] {
        let mut cmd = Command::new("qemu-img");
        cmd.args(["create", "-q", "-f", "qcow2"]);
        if let Some(b) = backing {
            cmd.args(["-u", "-b", &b, "-F", "qcow2"]);
        }
        assert!(
            cmd.arg(file(n))
                .arg("4M")
                .status()
                .expect("qemu-img")
                .success()
        );
    }
    let io = Command::new("qemu-io")
        .args(["-c", "write 0 1M"])
        .arg(file(&base))
        .output()
        .expect("qemu-io");
    assert!(io.status.success());
    let q = e.qmp();
    for (n, backing) in [(&base, Value::Null), (&top, json!(base))] {
        q.execute(
            "blockdev-add",
            json!({ "driver": "qcow2", "node-name": n, "backing": backing,
                    "file": { "driver": "file", "filename": file(n) } }),
        )
        .await
        .expect("scratch node");
    }
    q.execute(
        "block-stream",
        json!({ "job-id": job, "device": top, "auto-dismiss": false }),
    )
    .await
    .expect("block-stream");
    let t = Instant::now();
    loop {
        let jobs = e.jobs().await.expect("jobs");
        if jobs.iter().any(|j| j.id == job && j.status == "concluded") {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "stream not concluded: {jobs:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
