//! Shared harness for engine tests: every test gets its own pool, runtime
//! dir and daemon, and everything it started is stopped by PID on drop.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use livedisk_csi::engine::{Engine, EngineConfig, Extent};

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

    pub async fn engine(&self) -> Engine {
        Engine::open(self.cfg.clone()).await.expect("engine open")
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
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg(&self.dir)
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Extents covering the clusters that contain the given 4 KiB blocks.
pub fn clusters_of(blocks: impl IntoIterator<Item = u64>) -> Vec<Extent> {
    livedisk_csi::engine::extents::normalize(
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
    let out = Command::new("nbdinfo")
        .arg("--json")
        .arg("--map=qemu:allocation-depth")
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
    livedisk_csi::engine::extents::normalize(
        list.iter()
            .filter(|e| e["type"].as_u64() == Some(1))
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
