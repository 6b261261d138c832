//! The engine pod's front-end server on real parts: a real qemu-storage-daemon, real nbdfuse
//! processes run by the `livedisk-csi frontends` binary, a real loop device and the checksummed
//! writer. The node plugin side (a second process hosting the node's `Attacher`) is killed with
//! everything it started, as a container restart kills a container, while a consumer writes;
//! then the server itself is killed and restarted. No write may fail and every acknowledged
//! write must read back.
//!
//! Needs root (loop devices, FUSE mounts), qemu-storage-daemon, nbdfuse.

#[path = "../../engine/tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{TestEnv, spawn_child, wait_until};
use livedisk_csi::frontends::{FrontEndServer, FrontEndsClient};
use livedisk_csi::grpc::error::CsiError;
use livedisk_csi::node::attach::Attacher;
use livedisk_engine::{EngineConfig, ErrorCode, VolumeId};
use livedisk_verifier::{BackgroundWriter, Pattern, Writer, verify};

const BIN: &str = env!("CARGO_BIN_EXE_livedisk-csi");
const MIB: u64 = 1 << 20;
const TAG: u64 = 11;

/// `livedisk-csi frontends` as its own process, killed by PID on drop.
struct ServerProcess {
    child: Child,
    socket: PathBuf,
}

impl ServerProcess {
    fn start(engine_dir: &Path, log: &Path) -> Self {
        let socket = engine_dir.join("frontends.sock");
        let _ = std::fs::remove_file(&socket);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("server log");
        let child = Command::new(BIN)
            .arg("frontends")
            .arg("--engine-socket-dir")
            .arg(engine_dir)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("server log"))
            .stderr(log)
            .spawn()
            .expect("start livedisk-csi frontends");
        let started = Instant::now();
        while !socket.exists() {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "the front-end server did not listen"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { child, socket }
    }

    fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Every process below `root` (by parent PID), `root` included.
fn process_tree(root: i32) -> Vec<i32> {
    let parents: Vec<(i32, i32)> = procfs::process::all_processes()
        .expect("/proc")
        .filter_map(|p| p.ok()?.stat().ok())
        .map(|s| (s.pid, s.ppid))
        .collect();
    let mut tree = vec![root];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(
            parents
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    tree
}

/// kill -9 of a process and all it started, as a container's restart does: under the old
/// layout, nbdfuse (a child of the node plugin) died here.
fn kill_tree(root: i32) -> Vec<i32> {
    let tree = process_tree(root);
    for pid in &tree {
        // SAFETY: kill(2) of the node plugin process this test started and its descendants.
        unsafe { libc::kill(*pid, libc::SIGKILL) };
    }
    tree
}

/// Releases, also when an assertion failed, what the test left on the host under `root`: loop
/// devices over its files, then its mounts (nbdfuse exits once unmounted).
struct ReleaseOnDrop(PathBuf);

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        let root = self.0.display().to_string();
        let loops = Command::new("losetup")
            .args(["--list", "--noheadings", "-O", "NAME,BACK-FILE"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        for line in loops.lines() {
            if let Some((device, file)) = line.split_once(' ')
                && file.trim().starts_with(&root)
            {
                let _ = Command::new("losetup").args(["--detach", device]).status();
            }
        }
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        for mount_point in mounts.lines().filter_map(|l| l.split(' ').nth(4)) {
            if mount_point.starts_with(&root) {
                let _ = Command::new("umount").args(["-l", mount_point]).status();
            }
        }
    }
}

fn alive(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| !c.is_empty())
}

/// The node plugin side, in a second process: opens the engine on the daemon's main monitor,
/// attaches the volume through the front-end server, records the loop device, and stays until
/// killed. Runs only when re-executed by the test below.
#[tokio::test]
#[ignore = "child-process entry point of the front-end test (the node-plugin stand-in), run by it"]
async fn child_entry() {
    let Ok(op) = std::env::var("LD_CHILD") else {
        return;
    };
    assert_eq!(op, "node-plugin");
    let cfg = EngineConfig {
        pool: std::env::var("LD_POOL").expect("LD_POOL").into(),
        runtime_dir: std::env::var("LD_RUN").expect("LD_RUN").into(),
    };
    let volume = VolumeId::parse(&std::env::var("LD_VOLUME").expect("LD_VOLUME")).expect("id");
    let engine = livedisk_engine::Engine::open(cfg.clone())
        .await
        .expect("engine");
    let device = Attacher::new(&cfg.runtime_dir)
        .attach(&engine, &volume, false)
        .await
        .expect("attach");
    let out = std::env::var("LD_DEVICE_FILE").expect("LD_DEVICE_FILE");
    std::fs::write(format!("{out}.tmp"), device.to_string_lossy().as_bytes()).expect("write");
    std::fs::rename(format!("{out}.tmp"), &out).expect("rename");
    loop {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn io_survives_the_node_plugin_and_a_server_restart() {
    let env = TestEnv::new("fe");
    let _release = ReleaseOnDrop(env.root.clone());
    let run = env.cfg.runtime_dir.clone();
    let volume = VolumeId::generate();
    {
        let engine = env.engine().await;
        engine
            .create_volume(&volume, 64 * MIB)
            .await
            .expect("create");
    }
    let server_log = env.root.join("frontends.log");
    let server = ServerProcess::start(&run, &server_log);
    let frontends = FrontEndsClient::new(&run);

    // The node plugin attaches the volume through the server, in its own process.
    let device_file = env.root.join("device");
    let mut plugin = spawn_child(
        &env,
        "node-plugin",
        &[
            ("LD_VOLUME", volume.to_string()),
            ("LD_DEVICE_FILE", device_file.display().to_string()),
        ],
    );
    let started = Instant::now();
    while !device_file.exists() {
        if let Some(status) = plugin.try_wait().expect("try_wait") {
            panic!("the node plugin side exited ({status})");
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "attach took too long"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let device = PathBuf::from(std::fs::read_to_string(&device_file).expect("device"));
    let listed = frontends.list().await.expect("list");
    assert_eq!(listed.len(), 1, "{listed:?}");
    let front_end = listed[0].clone();
    assert_eq!(front_end.volume_id, volume.to_string());
    assert!(!front_end.adopted, "started by this server: {front_end:?}");
    let nbdfuse = front_end.pid;
    assert!(
        !process_tree(plugin.id() as i32).contains(&nbdfuse),
        "nbdfuse runs under the node plugin"
    );

    let writer = BackgroundWriter::start(
        Writer::open(&device, TAG).expect("open the loop device"),
        Pattern::Sequential {
            first: 0,
            count: 2048,
        },
        Duration::from_millis(1),
    );
    let more = |writer: &BackgroundWriter, n: u64| {
        let seen = writer.last_acked();
        move |w: &BackgroundWriter| w.last_acked() >= seen + n || w.finished()
    };
    let enough = more(&writer, 100);
    wait_until("writes", Duration::from_secs(60), || enough(&writer)).await;

    // The node plugin dies with everything it started, as its container would.
    let killed = kill_tree(plugin.id() as i32);
    let _ = plugin.wait();
    assert!(!killed.contains(&nbdfuse));
    assert!(alive(nbdfuse), "nbdfuse died with the node plugin");
    let enough = more(&writer, 200);
    wait_until(
        "writes after the node plugin died",
        Duration::from_secs(60),
        || enough(&writer),
    )
    .await;
    assert!(!writer.finished(), "the writer stopped (an I/O error?)");

    // The server dies too (kill -9) and comes back: it adopts the running front end.
    server.kill9();
    assert!(alive(nbdfuse), "nbdfuse died with the server");
    let enough = more(&writer, 100);
    wait_until("writes without a server", Duration::from_secs(60), || {
        enough(&writer)
    })
    .await;
    let server = ServerProcess::start(&run, &server_log);
    let listed = frontends.list().await.expect("list after the restart");
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].pid, nbdfuse);
    assert!(listed[0].adopted, "{:?}", listed[0]);
    assert_eq!(listed[0].nbd_uri, front_end.nbd_uri);
    let log = std::fs::read_to_string(&server_log).unwrap_or_default();
    assert!(log.contains("front end adopted"), "{log}");

    // A restarted node plugin attaches again: the same loop device, the same front end.
    let engine = env.engine().await;
    let attacher = Attacher::new(&run);
    assert_eq!(
        attacher
            .attach(&engine, &volume, false)
            .await
            .expect("re-attach"),
        device
    );
    let file = frontends
        .start(&volume, &front_end.nbd_uri)
        .await
        .expect("start again");
    assert_eq!(file.display().to_string(), front_end.file);
    assert_eq!(frontends.list().await.expect("list")[0].pid, nbdfuse);

    let enough = more(&writer, 100);
    wait_until("writes after the restarts", Duration::from_secs(60), || {
        enough(&writer)
    })
    .await;
    let acks = writer.stop().expect("no write failed");
    let report = verify(&device, TAG, &acks).expect("verify through the loop device");
    assert!(report.ok(), "{:?}", report.mismatches);

    // Stopping the front end while the loop device holds it is refused, and changes nothing.
    match frontends.stop(&volume).await {
        Err(error @ CsiError::FrontEnds { .. }) => {
            assert_eq!(error.error_code(), ErrorCode::FailedPrecondition, "{error}")
        }
        other => panic!("stop under a loop device: {other:?}"),
    }
    assert!(alive(nbdfuse));

    // Detach: loop device, front end (through the adopting server), export. Nothing is left.
    attacher.detach(&engine, &volume).await.expect("detach");
    assert!(frontends.list().await.expect("list").is_empty());
    wait_until("nbdfuse to exit", Duration::from_secs(10), || {
        !alive(nbdfuse)
    })
    .await;
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert!(!mounts.contains(&run.display().to_string()), "{mounts}");

    // Attached anew, the volume reads back every acknowledged write.
    let device = attacher
        .attach(&engine, &volume, false)
        .await
        .expect("attach");
    let report = verify(&device, TAG, &acks).expect("verify after re-attach");
    assert!(report.ok(), "{:?}", report.mismatches);
    attacher.detach(&engine, &volume).await.expect("detach");
    eprintln!(
        "{} writes verified across a node plugin kill and a server restart",
        acks.len()
    );
    drop(server);
}

/// The codes the server answers with, through its real socket (no daemon needed).
#[tokio::test]
async fn refusals_carry_their_codes() {
    let root = PathBuf::from(format!(
        "/tmp/ld-fec-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    ));
    std::fs::create_dir_all(&root).expect("root");
    let client = FrontEndsClient::new(&root);
    let volume = VolumeId::generate();

    // No server: UNAVAILABLE, saying where it was looked for.
    let error = client.stop(&volume).await.expect_err("no server");
    assert_eq!(error.error_code(), ErrorCode::Unavailable);
    assert!(
        error
            .to_string()
            .contains("the engine pod's front-end server is not running at"),
        "{error}"
    );

    let server = FrontEndServer::start(&root).await.expect("server");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(root.join("frontends.sock"))
            .expect("socket")
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let code = |result: Result<PathBuf, CsiError>| result.expect_err("refused").error_code();
    let own = |socket: &Path| format!("nbd+unix:///{volume}?socket={}", socket.display());
    // Another directory's socket, another volume's export.
    assert_eq!(
        code(
            client
                .start(&volume, &own(Path::new("/tmp/nbd.sock")))
                .await
        ),
        ErrorCode::InvalidArgument
    );
    let other = VolumeId::generate();
    assert_eq!(
        code(
            client
                .start(
                    &volume,
                    &own(&root.join("nbd.sock")).replace(volume.as_str(), other.as_str())
                )
                .await
        ),
        ErrorCode::InvalidArgument
    );
    // No daemon behind the socket: nbdfuse cannot connect.
    let error = client
        .start(&volume, &own(&root.join("nbd.sock")))
        .await
        .expect_err("no export");
    assert_eq!(error.error_code(), ErrorCode::Unavailable, "{error}");
    // Stopping what does not run is fine, twice.
    client.stop(&volume).await.expect("stop");
    client.stop(&volume).await.expect("stop again");
    assert!(client.list().await.expect("list").is_empty());

    server.stop().await.expect("stop the server");
    assert!(!root.join("frontends.sock").exists());
    std::fs::remove_dir_all(&root).expect("cleanup");
}
