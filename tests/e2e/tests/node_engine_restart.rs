//! The node plugin survives its engine daemon. On the two-node local cluster (hack/driver.sh),
//! the daemon of a node is killed with SIGKILL under its running node plugin:
//! * node-a: the daemon is restarted by its owner (`hack/engine-ns.sh start`, as the engine
//!   DaemonSet restarts it); the node plugin's Probe and its HTTPS `/readyz` answer not-ready
//!   within seconds while it is gone (its `/healthz` stays ok: the plugin itself is fine), the
//!   plugin re-attaches by itself, and the next CSI calls (re-staging the volume, a snapshot
//!   through the controller) work;
//! * node-b: nobody restarts the daemon; the Probe answers not-ready, the node plugin gives up
//!   after its bound and exits non-zero, its restart (hack/restart-on-failure.sh, as the DaemonSet
//!   restarts it) opens the engine afresh, and the same calls work.
//!
//! Tests play kubelet's part (NodeStage/NodePublish over the node plugin's socket). The consumer's
//! loop device over nbdfuse dies with the daemon by design: the volume is re-staged.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use livedisk_csi_proto::csi::v1::identity_client::IdentityClient;
use livedisk_csi_proto::csi::v1::*;
use livedisk_e2e::csi::{
    attach_block, channel, controller, create_block_volume, detach_block, engine_daemon_pid,
    in_node, kill_engine_daemon, process_alive, socket_dir,
};
use livedisk_e2e::metrics::endpoint;
use livedisk_e2e::{eventually, workspace_binary, workspace_root};

/// The node plugin's Probe: `Some(ready)`, or `None` while its socket does not answer (the
/// plugin is restarting).
async fn probe(node_name: &str) -> Option<bool> {
    let socket = socket_dir().ok()?.join(format!("{node_name}.sock"));
    let mut identity = IdentityClient::new(channel(&socket).await.ok()?);
    let answer = tokio::time::timeout(
        Duration::from_secs(5),
        identity.probe(ProbeRequest::default()),
    )
    .await
    .ok()?
    .ok()?;
    Some(answer.into_inner().ready.unwrap_or(false))
}

/// The status of the node plugin's HTTPS probe `path`, or `None` while it does not answer.
async fn http_probe(node_name: &str, path: &str) -> Option<u16> {
    let endpoint = endpoint(node_name).ok()?;
    let reply = tokio::time::timeout(Duration::from_secs(5), endpoint.get(path, None))
        .await
        .ok()?
        .ok()?;
    Some(reply.status)
}

fn nodes_dir() -> Result<PathBuf> {
    Ok(socket_dir()?.with_file_name("nodes"))
}

/// The command lines of the live processes, by pid.
fn processes() -> Vec<(i32, Vec<String>)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| process_alive(*pid))
        .filter_map(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let args = String::from_utf8_lossy(&cmd)
                .split('\0')
                .filter(|a| !a.is_empty())
                .map(str::to_owned)
                .collect();
            Some((pid, args))
        })
        .collect()
}

/// Pids of the qemu-storage-daemons listening in this runtime dir, inside this node's mount
/// namespace (hack/engine-ns.sh keeps it at `<node>/ns/mnt`, beside `<node>/run`). The namespace
/// counts as much as the path: another cluster's node of the same name has a daemon with the
/// same socket path in a namespace of its own.
fn daemons_in(run_dir: &std::path::Path) -> Vec<i32> {
    use std::os::unix::fs::MetadataExt;
    let socket = format!("path={}/qmp.sock,", run_dir.display());
    let namespace = run_dir
        .parent()
        .map(|node| node.join("ns/mnt"))
        .and_then(|ns| std::fs::metadata(ns).ok())
        .map(|m| (m.dev(), m.ino()));
    processes()
        .into_iter()
        .filter(|(_, args)| {
            args.first()
                .is_some_and(|a| a.ends_with("qemu-storage-daemon"))
                && args.iter().any(|a| a.contains(&socket))
        })
        .filter(|(pid, _)| {
            let theirs = std::fs::metadata(format!("/proc/{pid}/ns/mnt"))
                .ok()
                .map(|m| (m.dev(), m.ino()));
            namespace.is_none() || theirs == namespace
        })
        .map(|(pid, _)| pid)
        .collect()
}

/// The pid of the node's node plugin: `livedisk-csi node` serving `<node>.sock` (not the
/// wrappers that run it).
fn node_plugin_pid(node_name: &str) -> Result<Option<i32>> {
    let endpoint = format!(
        "unix://{}",
        socket_dir()?.join(format!("{node_name}.sock")).display()
    );
    Ok(processes().into_iter().find_map(|(pid, args)| {
        let plugin = args.first().is_some_and(|a| a.ends_with("/livedisk-csi"))
            && args.get(1).is_some_and(|a| a == "node")
            && args.contains(&endpoint);
        plugin.then_some(pid)
    }))
}

/// Writes a 4 KiB block of `text` at block 0 of the device, synchronously and flushed.
fn write_block(node_name: &str, device: &str, text: &str) -> Result<()> {
    let script = format!(
        "printf '%-4096s' '{text}' | dd of={device} bs=4096 count=1 oflag=direct conv=notrunc,fsync status=none"
    );
    in_node(node_name, &["sh", "-c", &script])?;
    Ok(())
}

fn read_block(node_name: &str, device: &str) -> Result<String> {
    let output = in_node(
        node_name,
        &[
            "dd",
            &format!("if={device}"),
            "bs=4096",
            "count=1",
            "iflag=direct",
            "status=none",
        ],
    )?;
    Ok(String::from_utf8_lossy(&output.stdout)
        .trim_end()
        .to_string())
}

/// A snapshot through the controller: the node agent takes it with the engine.
async fn snapshot(volume_id: &str, name: &str) -> Result<String> {
    let mut c = controller().await?;
    let taken = c
        .create_snapshot(CreateSnapshotRequest {
            source_volume_id: volume_id.into(),
            name: name.into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .snapshot
        .context("CreateSnapshot answered no snapshot")?;
    Ok(taken.snapshot_id)
}

async fn delete(volume_id: &str, snapshot_id: &str) -> Result<()> {
    let mut c = controller().await?;
    c.delete_snapshot(DeleteSnapshotRequest {
        snapshot_id: snapshot_id.into(),
        ..Default::default()
    })
    .await?;
    c.delete_volume(DeleteVolumeRequest {
        volume_id: volume_id.into(),
        ..Default::default()
    })
    .await?;
    Ok(())
}

/// Probe and `/readyz` answer not-ready within seconds of the daemon's death.
async fn not_ready_soon(node_name: &str) -> Result<()> {
    eventually(10, "Probe to answer not-ready", || async {
        Ok((probe(node_name).await == Some(false)).then_some(()))
    })
    .await?;
    eventually(10, "/readyz to answer 503", || async {
        Ok((http_probe(node_name, "/readyz").await == Some(503)).then_some(()))
    })
    .await
}

async fn ready_within(node_name: &str, seconds: u64) -> Result<()> {
    eventually(seconds, "Probe to answer ready again", || async {
        Ok((probe(node_name).await == Some(true)).then_some(()))
    })
    .await?;
    eventually(10, "/readyz to answer 200 again", || async {
        Ok((http_probe(node_name, "/readyz").await == Some(200)).then_some(()))
    })
    .await
}

/// Re-stages the volume (its old device died with the daemon), checks the data written before
/// the kill, writes again, and takes a snapshot through the controller.
async fn restage_and_snapshot(node_name: &str, volume_id: &str, tag: &str) -> Result<String> {
    detach_block(node_name, volume_id, tag).await?;
    let device = attach_block(node_name, volume_id, tag).await?;
    assert_eq!(
        read_block(node_name, &device)?,
        "before-the-kill",
        "re-staged volume lost a flushed write"
    );
    write_block(node_name, &device, "after-the-restart")?;
    assert_eq!(read_block(node_name, &device)?, "after-the-restart");
    let snapshot_id = snapshot(volume_id, &format!("{tag}-snapshot")).await?;
    detach_block(node_name, volume_id, tag).await?;
    Ok(snapshot_id)
}

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

#[tokio::test]
async fn node_plugin_reattaches_when_its_daemon_is_restarted() -> Result<()> {
    let node_name = "node-a";
    let tag = unique("h3-reattach");
    let volume_id = create_block_volume(&tag, node_name).await?;
    let device = attach_block(node_name, &volume_id, &tag).await?;
    write_block(node_name, &device, "before-the-kill")?;
    assert_eq!(probe(node_name).await, Some(true));
    assert_eq!(http_probe(node_name, "/readyz").await, Some(200));
    let plugin = node_plugin_pid(node_name)?.context("node plugin of node-a not found")?;

    let old = kill_engine_daemon(node_name).await?;
    let killed = std::time::Instant::now();
    not_ready_soon(node_name).await?;
    eprintln!("not ready {:?} after the kill", killed.elapsed());
    // Gone for a while: the plugin keeps answering not-ready and starts no daemon itself, and
    // the process itself stays healthy (no reason for kubelet to restart it).
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(probe(node_name).await, Some(false));
    assert_eq!(http_probe(node_name, "/readyz").await, Some(503));
    assert_eq!(http_probe(node_name, "/healthz").await, Some(200));
    let run_dir = nodes_dir()?.join(node_name).join("run");
    assert_eq!(
        daemons_in(&run_dir),
        Vec::<i32>::new(),
        "a daemon runs although nobody restarted it"
    );

    // Its owner restarts it; the same node plugin re-attaches and serves again.
    let restart = std::process::Command::new(workspace_root().join("hack/engine-ns.sh"))
        .env("LIVEDISK_NODES_DIR", nodes_dir()?)
        .env("LIVEDISK_BIN", workspace_binary("livedisk-csi")?)
        .args(["start", node_name])
        .output()?;
    if !restart.status.success() {
        bail!(
            "engine-ns.sh start {node_name}: {}",
            String::from_utf8_lossy(&restart.stderr)
        );
    }
    ready_within(node_name, 90).await?;
    assert_ne!(engine_daemon_pid(node_name)?, old);
    assert_eq!(
        node_plugin_pid(node_name)?,
        Some(plugin),
        "the node plugin was restarted instead of re-attaching"
    );

    let snapshot_id = restage_and_snapshot(node_name, &volume_id, &tag).await?;
    delete(&volume_id, &snapshot_id).await
}

#[tokio::test]
async fn node_plugin_exits_and_is_restarted_when_its_daemon_stays_away() -> Result<()> {
    let node_name = "node-b";
    let tag = unique("h3-giveup");
    let volume_id = create_block_volume(&tag, node_name).await?;
    let device = attach_block(node_name, &volume_id, &tag).await?;
    write_block(node_name, &device, "before-the-kill")?;
    let plugin = node_plugin_pid(node_name)?.context("node plugin of node-b not found")?;

    let old = kill_engine_daemon(node_name).await?;
    not_ready_soon(node_name).await?;
    // Nobody restarts the daemon: after its bound (LIVEDISK_ENGINE_RECONNECT_SECONDS, 30 s by
    // default) the plugin exits; restarted, it opens its engine afresh, which starts a daemon.
    let bound: u64 = std::env::var("LIVEDISK_ENGINE_RECONNECT_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    eventually(bound + 60, "the node plugin to be restarted", || async {
        Ok(node_plugin_pid(node_name)?.filter(|pid| *pid != plugin))
    })
    .await?;
    ready_within(node_name, 90).await?;
    assert_ne!(engine_daemon_pid(node_name)?, old);

    let snapshot_id = restage_and_snapshot(node_name, &volume_id, &tag).await?;
    delete(&volume_id, &snapshot_id).await
}
