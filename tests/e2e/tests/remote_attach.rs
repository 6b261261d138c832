//! Remote attach on the two-node local cluster: a volume node-b holds, staged on node-a through
//! node-a's real CSI node service, as kubelet would. node-a's engine daemon opens node-b's
//! export front over TLS NBD with its own certificate (issued by the driver's export CA, which
//! the operator, under the chart's account, runs); the front admits it because node-a's
//! LivediskAttachment pins that certificate. Data is checked against the checksummed writer's
//! logs, read back on the node that holds the volume.
//!
//! Faults: the link between the nodes cut mid-write, and the owner's node plugin killed with
//! SIGKILL mid-write (its front, which carries the connection, dies with it): the client's NBD
//! connection comes back by itself, the writer sees no error and every acknowledged write is
//! there; the client's node plugin killed mid-write: the I/O goes on without it, and the
//! restarted plugin detaches the volume from its record. Refusals: a plaintext client, and a certificate of the same CA that no attachment pins.
//! Sharing: a MULTI_NODE_MULTI_WRITER block volume attached on both nodes at once; a block read
//! on one node before the other rewrote it reads new afterwards (direct I/O, as QEMU's
//! `cache=none` that KubeVirt uses for migratable disks).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::api::Api;
use livedisk_api::internal::{AttachmentPhase, LivediskAttachment};
use livedisk_csi_proto::csi::v1::volume_capability::access_mode::Mode;
use livedisk_csi_proto::csi::v1::volume_capability::{AccessMode, AccessType, MountVolume};
use livedisk_csi_proto::csi::v1::*;
use livedisk_e2e::csi::{
    attach_block_as_kubelet, block_volume_request, controller, delete_volume, detach_block,
    in_node, node, node_plugin_pid,
};
use livedisk_e2e::disks::{ScratchDir, host_device, verifier};
use livedisk_e2e::operator::operator_with_fronts;
use livedisk_e2e::phases::{verify, write_phase};
use livedisk_e2e::{client, eventually};

const OWNER: &str = "node-b";
const CLIENT: &str = "node-a";
const BLOCKS: u64 = 2048;

/// One test at a time: they cut links and kill node plugins the others use.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn create_volume(name: &str, owner: &str, mode: Mode) -> Result<String> {
    let mut request = block_volume_request(name, owner, 64 << 20);
    request.volume_capabilities[0].access_mode = Some(AccessMode { mode: mode as i32 });
    let volume = controller()
        .await?
        .create_volume(request)
        .await?
        .into_inner()
        .volume
        .context("CreateVolume answered no volume")?;
    Ok(volume.volume_id)
}

/// The attachment object of `volume` on the client node, once it is Ready.
async fn ready_attachment(client: &Client, volume: &str) -> Result<LivediskAttachment> {
    let api: Api<LivediskAttachment> = Api::all(client.clone());
    let name = format!("{volume}.{CLIENT}");
    eventually(30, &format!("LivediskAttachment {name} Ready"), || async {
        Ok(api.get_opt(&name).await?.filter(|a| {
            a.status
                .as_ref()
                .is_some_and(|s| s.phase == AttachmentPhase::Ready)
        }))
    })
    .await
}

async fn attachment_gone(client: &Client, volume: &str) -> Result<()> {
    let api: Api<LivediskAttachment> = Api::all(client.clone());
    let name = format!("{volume}.{CLIENT}");
    eventually(30, &format!("LivediskAttachment {name} gone"), || async {
        Ok(api.get_opt(&name).await?.is_none().then_some(()))
    })
    .await
}

fn host_link(node: &str) -> String {
    let prefix = std::env::var("LIVEDISK_LINK_PREFIX").unwrap_or_else(|_| "ld".into());
    format!("{prefix}-{node}")
}

fn ip(args: &[&str]) -> Result<()> {
    let status = Command::new("ip").args(args).status()?;
    ensure!(status.success(), "ip {args:?} failed");
    Ok(())
}

/// A writer over `device` in the background: `writes` writes over the first `blocks` blocks.
fn start_writer(
    device: &str,
    tag: u64,
    blocks: u64,
    writes: u64,
    log: &Path,
) -> Result<std::process::Child> {
    Ok(verifier()?
        .args(["write", "--path", device, "--tag", &tag.to_string()])
        .args([
            "--blocks",
            &blocks.to_string(),
            "--count",
            &writes.to_string(),
            "--log",
        ])
        .arg(log)
        .stderr(std::process::Stdio::piped())
        .spawn()?)
}

fn finish_writer(writer: std::process::Child) -> Result<()> {
    let output = writer.wait_with_output()?;
    ensure!(
        output.status.success(),
        "the writer met an error: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

/// The count of acknowledged writes in a writer's log.
fn acked(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_volume_one_node_holds_is_written_on_the_other_and_reads_back_where_it_lives()
-> Result<()> {
    let _serial = SERIAL.lock().await;
    let client = client().await?;
    let _operator = operator_with_fronts(&client, &[OWNER, CLIENT]).await?;
    let dir = ScratchDir::new("remote-attach")?;

    // Block: staged on node-a, written there, read back on node-b.
    let volume = create_volume("remote-attach-block", OWNER, Mode::SingleNodeWriter).await?;
    let target = attach_block_as_kubelet(CLIENT, &volume, "remote-block").await?;
    let attachment = ready_attachment(&client, &volume).await?;
    ensure!(attachment.spec.node_name == OWNER && attachment.spec.client_node == CLIENT);
    let device = host_device(CLIENT, &target)?;
    let log = dir.0.join("block.log");
    write_phase(&device, 1, BLOCKS, &log)?;
    verify(&device, 1, &log)?;
    detach_block(CLIENT, &volume, "remote-block").await?;
    attachment_gone(&client, &volume).await?;
    let target = attach_block_as_kubelet(OWNER, &volume, "local-block").await?;
    verify(host_device(OWNER, &target)?, 1, &log)?;
    detach_block(OWNER, &volume, "local-block").await?;
    delete_volume(&volume).await?;

    // Filesystem: mkfs and a file on node-a, the file read on node-b.
    let volume = create_volume("remote-attach-fs", OWNER, Mode::SingleNodeWriter).await?;
    let (staging_a, target_a) = fs_paths(CLIENT, "remote-fs")?;
    fs_stage_publish(CLIENT, &volume, &staging_a, &target_a).await?;
    in_node(
        CLIENT,
        &[
            "sh",
            "-c",
            &format!(
                "head -c 1048576 /dev/urandom > {target_a}/data && sha256sum {target_a}/data > {target_a}/data.sum && sync"
            ),
        ],
    )?;
    let written =
        String::from_utf8(in_node(CLIENT, &["cat", &format!("{target_a}/data.sum")])?.stdout)?;
    unpublish_unstage(CLIENT, &volume, &staging_a, &target_a).await?;
    attachment_gone(&client, &volume).await?;
    let (staging_b, target_b) = fs_paths(OWNER, "local-fs")?;
    fs_stage_publish(OWNER, &volume, &staging_b, &target_b).await?;
    let read =
        String::from_utf8(in_node(OWNER, &["sha256sum", &format!("{target_b}/data")])?.stdout)?;
    ensure!(
        read.split_whitespace().next() == written.split_whitespace().next(),
        "the file written on {CLIENT} reads {read:?} on {OWNER}, expected {written:?}"
    );
    unpublish_unstage(OWNER, &volume, &staging_b, &target_b).await?;
    delete_volume(&volume).await?;
    Ok(())
}

#[tokio::test]
async fn the_owners_front_admits_only_the_certificate_an_attachment_pins() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let client = client().await?;
    let _operator = operator_with_fronts(&client, &[OWNER, CLIENT]).await?;
    let dir = ScratchDir::new("remote-attach-refusals")?;
    let volume = create_volume("remote-attach-refused", OWNER, Mode::SingleNodeWriter).await?;
    let target = attach_block_as_kubelet(CLIENT, &volume, "refused").await?;
    let attachment = ready_attachment(&client, &volume).await?;
    let status = attachment.status.context("no status")?;
    let (host, port) = (
        status.host.context("no host")?,
        status.port.context("no port")?,
    );

    // Plaintext: the front requires TLS before any export is named.
    let plain = Command::new("nbdinfo")
        .arg(format!("nbd://{host}:{port}/{volume}"))
        .output()?;
    ensure!(
        !plain.status.success(),
        "a plaintext client opened {volume}"
    );

    // A certificate of the driver's own CA, pinned by no attachment: refused in the handshake.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "livedisk-system");
    let ca = secrets
        .get("livedisk-export-ca")
        .await?
        .data
        .unwrap_or_default();
    let creds = dir.0.join("creds");
    std::fs::create_dir_all(&creds)?;
    for (key, file) in [("ca.crt", "ca.pem"), ("ca.key", "ca.key")] {
        std::fs::write(
            dir.0.join(file),
            &ca.get(key).with_context(|| format!("CA {key}"))?.0,
        )?;
    }
    std::fs::copy(dir.0.join("ca.pem"), creds.join("ca-cert.pem"))?;
    let openssl = |args: &[&str]| -> Result<()> {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(&dir.0)
            .output()?;
        ensure!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    openssl(&[
        "ecparam",
        "-name",
        "prime256v1",
        "-genkey",
        "-noout",
        "-out",
        "creds/client-key.pem",
    ])?;
    openssl(&[
        "req",
        "-new",
        "-key",
        "creds/client-key.pem",
        "-subj",
        "/CN=intruder",
        "-out",
        "client.csr",
    ])?;
    std::fs::write(dir.0.join("ext"), "extendedKeyUsage=clientAuth\n")?;
    openssl(&[
        "x509",
        "-req",
        "-in",
        "client.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "ext",
        "-out",
        "creds/client-cert.pem",
    ])?;
    let uri = format!(
        "nbds://{host}:{port}/{volume}?tls-certificates={}",
        creds.display()
    );
    let unpinned = Command::new("nbdinfo").arg(&uri).output()?;
    ensure!(
        !unpinned.status.success(),
        "a certificate no attachment pins opened {volume}: {}",
        String::from_utf8_lossy(&unpinned.stdout)
    );
    // The consumer on node-a is untouched by the refusals.
    let device = host_device(CLIENT, &target)?;
    let log = dir.0.join("after.log");
    write_phase(&device, 7, 256, &log)?;
    verify(&device, 7, &log)?;
    detach_block(CLIENT, &volume, "refused").await?;
    delete_volume(&volume).await?;
    Ok(())
}

#[tokio::test]
async fn a_cut_link_and_killed_node_plugins_lose_no_acknowledged_write() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let client = client().await?;
    let _operator = operator_with_fronts(&client, &[OWNER, CLIENT]).await?;
    let dir = ScratchDir::new("remote-attach-faults")?;
    let volume = create_volume("remote-attach-faults", OWNER, Mode::SingleNodeWriter).await?;
    let target = attach_block_as_kubelet(CLIENT, &volume, "faults").await?;
    ready_attachment(&client, &volume).await?;
    let device = host_device(CLIENT, &target)?;

    // The link of the owner cut for 5 s while the writer runs.
    let log = dir.0.join("cut.log");
    let writer = start_writer(&device, 2, BLOCKS, 6000, &log)?;
    eventually(30, "the writer under way", || async {
        Ok((acked(&log) > 100).then_some(()))
    })
    .await?;
    let link = host_link(OWNER);
    ip(&["link", "set", &link, "down"])?;
    let during = acked(&log);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let stalled = acked(&log) - during;
    ip(&["link", "set", &link, "up"])?;
    finish_writer(writer)?;
    ensure!(
        acked(&log) == 6000,
        "the writer acknowledged {} of 6000 writes",
        acked(&log)
    );
    eprintln!(
        "link cut for 5 s: {stalled} writes acknowledged while it was down (in flight at the cut)"
    );
    verify(&device, 2, &log)?;

    // The owner's node plugin killed (its front with it) while the writer runs; it is started
    // again (as the DaemonSet would), gets its certificate again and serves the attachment again.
    let log = dir.0.join("kill.log");
    let writer = start_writer(&device, 3, BLOCKS, 6000, &log)?;
    eventually(30, "the writer under way", || async {
        Ok((acked(&log) > 100).then_some(()))
    })
    .await?;
    let pid = node_plugin_pid(OWNER)?.context("the owner's node plugin is not running")?;
    // SAFETY: kill(2) of the node plugin this cluster's driver started.
    ensure!(
        unsafe { libc::kill(pid, libc::SIGKILL) } == 0,
        "kill -9 {pid}"
    );
    eventually(120, "the owner's node plugin back", || async {
        Ok(node_plugin_pid(OWNER)?.filter(|p| *p != pid))
    })
    .await?;
    finish_writer(writer)?;
    ensure!(
        acked(&log) == 6000,
        "the writer acknowledged {} of 6000 writes",
        acked(&log)
    );
    verify(&device, 3, &log)?;

    // The client's node plugin killed mid-write: the consumer's I/O does not go through it
    // (its engine daemon and front end run on), and the restarted plugin detaches the volume
    // from what it recorded.
    let log = dir.0.join("client-kill.log");
    let writer = start_writer(&device, 4, BLOCKS, 4000, &log)?;
    eventually(30, "the writer under way", || async {
        Ok((acked(&log) > 100).then_some(()))
    })
    .await?;
    let pid = node_plugin_pid(CLIENT)?.context("the client's node plugin is not running")?;
    // SAFETY: kill(2) of the node plugin this cluster's driver started.
    ensure!(
        unsafe { libc::kill(pid, libc::SIGKILL) } == 0,
        "kill -9 {pid}"
    );
    eventually(120, "the client's node plugin back", || async {
        Ok(node_plugin_pid(CLIENT)?.filter(|p| *p != pid))
    })
    .await?;
    finish_writer(writer)?;
    ensure!(
        acked(&log) == 4000,
        "the writer acknowledged {} of 4000 writes",
        acked(&log)
    );
    verify(&device, 4, &log)?;
    eventually(60, "the client's node plugin serving again", || async {
        Ok(detach_block(CLIENT, &volume, "faults").await.ok())
    })
    .await?;
    attachment_gone(&client, &volume).await?;
    // Read back where the volume lives.
    let target = attach_block_as_kubelet(OWNER, &volume, "faults-local").await?;
    verify(host_device(OWNER, &target)?, 4, &log)?;
    detach_block(OWNER, &volume, "faults-local").await?;
    delete_volume(&volume).await?;
    Ok(())
}

#[tokio::test]
async fn a_shared_block_volume_serves_both_nodes_without_stale_reads() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let client = client().await?;
    let _operator = operator_with_fronts(&client, &[OWNER, CLIENT]).await?;
    let volume = create_volume("remote-attach-shared", OWNER, Mode::MultiNodeMultiWriter).await?;
    let owner_device = host_device(OWNER, &shared_attach(OWNER, &volume).await?)?;
    let client_device = host_device(CLIENT, &shared_attach(CLIENT, &volume).await?)?;
    let block = |device: &str, fill: u8| -> Result<()> {
        let pattern = dir_file(fill)?;
        let out = Command::new("dd")
            .args([
                &format!("if={}", pattern.display()),
                &format!("of={device}"),
            ])
            .args([
                "bs=4096",
                "count=1",
                "seek=10",
                "oflag=direct",
                "conv=fsync,notrunc",
                "status=none",
            ])
            .output()?;
        ensure!(
            out.status.success(),
            "dd to {device}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    let read = |device: &str| -> Result<Vec<u8>> {
        let out = Command::new("dd")
            .args([
                &format!("if={device}"),
                "bs=4096",
                "count=1",
                "skip=10",
                "iflag=direct",
                "status=none",
            ])
            .output()?;
        ensure!(
            out.status.success(),
            "dd from {device}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(out.stdout)
    };
    // The destination reads the block, then the source rewrites it: the destination reads new.
    block(&owner_device, 0x11)?;
    ensure!(
        read(&client_device)? == vec![0x11; 4096],
        "{CLIENT} does not read {OWNER}'s write"
    );
    block(&owner_device, 0x22)?;
    ensure!(
        read(&client_device)? == vec![0x22; 4096],
        "{CLIENT} reads a stale block after {OWNER} rewrote it"
    );
    // And the other way round.
    block(&client_device, 0x33)?;
    ensure!(
        read(&owner_device)? == vec![0x33; 4096],
        "{OWNER} reads a stale block after {CLIENT} rewrote it"
    );
    ensure!(read(&client_device)? == vec![0x33; 4096]);
    shared_detach(CLIENT, &volume).await?;
    shared_detach(OWNER, &volume).await?;
    attachment_gone(&client, &volume).await?;
    delete_volume(&volume).await?;
    Ok(())
}

fn dir_file(fill: u8) -> Result<std::path::PathBuf> {
    let path = std::env::temp_dir().join(format!("remote-attach-fill-{fill:02x}"));
    std::fs::write(&path, vec![fill; 4096])?;
    Ok(path)
}

fn shared_capability() -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::MultiNodeMultiWriter as i32,
        }),
        access_type: Some(AccessType::Block(Default::default())),
    }
}

fn kubelet_dir(node: &str, tag: &str) -> Result<String> {
    let state = std::env::var("LIVEDISK_STATE_DIR").context("LIVEDISK_STATE_DIR is not set")?;
    Ok(format!("{state}/kubelet/{node}/{tag}"))
}

async fn shared_attach(node_name: &str, volume: &str) -> Result<String> {
    let base = kubelet_dir(node_name, "shared")?;
    let target = format!("{base}/publish/dev");
    let staging = format!("{base}/staging");
    stage_publish(node_name, volume, shared_capability(), &staging, &target).await?;
    Ok(target)
}

async fn shared_detach(node_name: &str, volume: &str) -> Result<()> {
    let base = kubelet_dir(node_name, "shared")?;
    unpublish_unstage(
        node_name,
        volume,
        &format!("{base}/staging"),
        &format!("{base}/publish/dev"),
    )
    .await
}

/// NodeStage + NodePublish with `capability`, as kubelet calls them.
async fn stage_publish(
    node_name: &str,
    volume: &str,
    capability: VolumeCapability,
    staging: &str,
    target: &str,
) -> Result<()> {
    let mut csi = node(node_name).await?;
    csi.node_stage_volume(NodeStageVolumeRequest {
        volume_id: volume.into(),
        staging_target_path: staging.into(),
        volume_capability: Some(capability.clone()),
        ..Default::default()
    })
    .await?;
    csi.node_publish_volume(NodePublishVolumeRequest {
        volume_id: volume.into(),
        staging_target_path: staging.into(),
        target_path: target.into(),
        volume_capability: Some(capability),
        ..Default::default()
    })
    .await?;
    Ok(())
}

/// NodeUnpublish + NodeUnstage, as kubelet calls them (and retries them while the node answers
/// ABORTED: the owner withdrawing the other node's attachment of the volume meanwhile).
async fn unpublish_unstage(
    node_name: &str,
    volume: &str,
    staging: &str,
    target: &str,
) -> Result<()> {
    eventually(60, &format!("{volume} unstaged on {node_name}"), || async {
        match unpublish_unstage_once(node_name, volume, staging, target).await {
            Ok(()) => Ok(Some(())),
            Err(e) if format!("{e:#}").contains("is already in progress; retry later") => Ok(None),
            Err(e) => Err(e),
        }
    })
    .await
}

async fn unpublish_unstage_once(
    node_name: &str,
    volume: &str,
    staging: &str,
    target: &str,
) -> Result<()> {
    let mut csi = node(node_name).await?;
    csi.node_unpublish_volume(NodeUnpublishVolumeRequest {
        volume_id: volume.into(),
        target_path: target.into(),
    })
    .await?;
    csi.node_unstage_volume(NodeUnstageVolumeRequest {
        volume_id: volume.into(),
        staging_target_path: staging.into(),
    })
    .await?;
    Ok(())
}

fn mount_capability() -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: "ext4".into(),
            ..Default::default()
        })),
    }
}

fn fs_paths(node_name: &str, tag: &str) -> Result<(String, String)> {
    let base = kubelet_dir(node_name, tag)?;
    Ok((format!("{base}/staging"), format!("{base}/publish")))
}

async fn fs_stage_publish(
    node_name: &str,
    volume: &str,
    staging: &str,
    target: &str,
) -> Result<()> {
    in_node(node_name, &["mkdir", "-p", staging])?;
    stage_publish(node_name, volume, mount_capability(), staging, target).await
}
