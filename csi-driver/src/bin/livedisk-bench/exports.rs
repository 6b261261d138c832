//! (h) Exports, through the operator and a node's TLS front on hack/bench.sh's cluster: a block
//! claim bound on the benchmark's node, filled through the engine's writable export, snapshotted;
//! then scattered 64 KiB writes and a second snapshot. Measured:
//!
//! * read throughput of the first snapshot through a DiskExport (NBD over TLS, `nbdcopy` to
//!   `null:`) vs `qemu-nbd` without TLS serving the same layer file to the same `nbdcopy` (the
//!   issue's target ≥ 0.8), and vs `qemu-nbd` with TLS (what encryption costs either way), runs
//!   alternating which goes first;
//! * the bytes an incremental backup (`livedisk-csi backup incremental` from a DiskExport over
//!   HTTPS with the first snapshot as base) read vs the bytes the writes changed (target ≤ 1.05).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::{Namespace, PersistentVolume, PersistentVolumeClaim, Secret};
use kube::Api;
use kube::api::PostParams;
use livedisk_api::{DiskExport, DiskSnapshot, Phase};
use serde_json::{Value, json};
use tokio::process::Command;

use crate::at_scale::{Operator, ScaleTarget, clean};
use crate::csi::{CsiTarget, Driver};
use crate::report::{Pairs, Row, Target, mibps};
use crate::scenarios::Config;

/// The claim's size at scale 1.
const CLAIM_MIB: u64 = 1024;
/// Scattered writes after the first snapshot: one 64 KiB write every `STRIDE`.
const WRITE: u64 = 64 * 1024;
const STRIDE: u64 = 1024 * 1024;

fn progress(msg: &str) {
    eprintln!("bench: (h) {msg}");
}

/// What one run of (h) measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Measured {
    pub bytes: u64,
    /// Seconds of `nbdcopy` through the front (TLS) and through plain `qemu-nbd`, per pair.
    pub reads: Pairs,
    /// The front against `qemu-nbd` with TLS (x509, client certificates verified).
    pub tls_reads: Pairs,
    pub changed: u64,
    pub incremental_read: u64,
}

pub fn rows(m: &Measured) -> Vec<Row> {
    let mib = m.bytes >> 20;
    vec![
        Row {
            name: format!(
                "(h) export read of a {mib} MiB snapshot: DiskExport NBD over TLS vs qemu-nbd without TLS (nbdcopy)"
            ),
            measured: format!("{:.0} MiB/s", mibps(m.bytes, m.reads.measured())),
            peer: format!("{:.0} MiB/s", mibps(m.bytes, m.reads.peer())),
            // Throughput ratio: the peer's time over ours.
            ratio: 1.0 / m.reads.ratio(),
            target: Target::AtLeast(0.8),
        },
        Row {
            name: "(h)   the same read: DiskExport vs qemu-nbd with TLS (x509, client certificate)"
                .into(),
            measured: format!("{:.0} MiB/s", mibps(m.bytes, m.tls_reads.measured())),
            peer: format!("{:.0} MiB/s", mibps(m.bytes, m.tls_reads.peer())),
            ratio: 1.0 / m.tls_reads.ratio(),
            target: Target::AtLeast(0.8),
        },
        Row {
            name: "(h) incremental backup: bytes read vs bytes changed".into(),
            measured: format!("{} KiB", m.incremental_read >> 10),
            peer: format!("{} KiB", m.changed >> 10),
            ratio: m.incremental_read as f64 / m.changed as f64,
            target: Target::AtMost(1.05),
        },
    ]
}

/// (h), end to end, in a namespace of its own that goes again at the end.
pub async fn exports(csi: CsiTarget, op: ScaleTarget, c: &Config) -> Result<Vec<Row>> {
    let client = kube::Client::try_default()
        .await
        .context("the cluster's admin kubeconfig (KUBECONFIG)")?;
    let ns = format!(
        "bench-h-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let operator = Operator::start(&op)?;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let object = serde_json::from_value(json!({"metadata": {"name": ns}}))?;
    let driver = Driver::connect(csi.clone()).await?;
    let measured = match namespaces.create(&PostParams::default(), &object).await {
        Ok(_) => measure(&client, &ns, &csi, &driver, &op, c).await,
        Err(e) => Err(anyhow::Error::new(e).context(format!("creating namespace {ns}"))),
    };
    progress("stopping the operator, deleting the namespace");
    let stopped = operator.stop().await;
    let cleaned = clean(&client, &ns).await;
    let m = measured?;
    stopped.context("stopping the operator")?;
    cleaned.context("cleaning up after (h)")?;
    Ok(rows(&m))
}

async fn measure(
    client: &kube::Client,
    ns: &str,
    csi: &CsiTarget,
    driver: &Driver,
    op: &ScaleTarget,
    c: &Config,
) -> Result<Measured> {
    let bytes = ((CLAIM_MIB as f64 * c.scale) as u64).max(64) << 20;
    let volume = bound_claim(client, ns, &csi.node, bytes).await?;
    let tag = format!("{ns}-h");
    driver.stage(&volume, &tag).await?;
    progress(&format!("filling {} MiB", bytes >> 20));
    let count = (bytes / (4 << 20)).to_string();
    driver
        .write(
            &volume,
            &["-w", "-t", "none", "-s", "4M", "-S", "4M", "-c", &count],
        )
        .await?;
    snapshot(client, ns, "h1").await?;
    let writes = bytes / STRIDE;
    progress(&format!("{writes} scattered 64 KiB writes"));
    let (n, stride) = (writes.to_string(), STRIDE.to_string());
    driver
        .write(
            &volume,
            &["-w", "-t", "none", "-s", "64K", "-S", &stride, "-c", &n],
        )
        .await?;
    snapshot(client, ns, "h2").await?;
    driver.unstage(&volume, &tag).await?;
    let changed = writes * WRITE;

    let dir = std::env::temp_dir().join(ns);
    std::fs::create_dir_all(&dir)?;
    let nbd = export(client, ns, "h1-nbd", "h1", None, "NBD", &dir).await?;
    let layer = layer_file(csi, &volume, &handle(client, ns, "h1").await?)?;
    let pki = PeerPki::make(&dir)?;
    let (mut reads, mut tls_reads) = (Pairs::default(), Pairs::default());
    let uri = format!("{}?tls-certificates={}", nbd.0, nbd.1.display());
    for run in 0..c.runs.max(1) {
        // Which goes first alternates: what drifts on a shared machine cancels out.
        let (front, plain, tls) = if run % 2 == 0 {
            let f = nbdcopy(&uri).await?;
            let p = qemu_nbd(&layer, None).await?;
            (f, p, qemu_nbd(&layer, Some(&pki)).await?)
        } else {
            let t = qemu_nbd(&layer, Some(&pki)).await?;
            let p = qemu_nbd(&layer, None).await?;
            (nbdcopy(&uri).await?, p, t)
        };
        progress(&format!(
            "read run {run}: front {front:.2} s, qemu-nbd {plain:.2} s, qemu-nbd TLS {tls:.2} s"
        ));
        reads.push(front, plain);
        tls_reads.push(front, tls);
    }

    let http = export(client, ns, "h2-http", "h2", Some("h1"), "HTTP", &dir).await?;
    let out = dir.join("incremental.raw");
    let bin = op
        .operator_bin
        .with_file_name("livedisk-csi")
        .display()
        .to_string();
    let summary = crate::tools::run(
        &bin,
        &[
            "backup",
            "incremental",
            "--url",
            &http.0,
            "--credentials",
            &http.1.display().to_string(),
            "--output",
            &out.display().to_string(),
        ],
    )
    .await?;
    let summary: Value = serde_json::from_str(summary.lines().last().unwrap_or("{}"))?;
    let incremental_read = summary["bytesRead"]
        .as_u64()
        .with_context(|| format!("no bytesRead in {summary}"))?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Measured {
        bytes,
        reads,
        tls_reads,
        changed,
        incremental_read,
    })
}

/// A block claim of `bytes` bound on `node`; its volume handle.
pub(crate) async fn bound_claim(
    client: &kube::Client,
    ns: &str,
    node: &str,
    bytes: u64,
) -> Result<String> {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
    let pvc = serde_json::from_value(json!({
        "metadata": {"name": "disk"},
        "spec": {"storageClassName": "livedisk", "volumeMode": "Block", "accessModes": ["ReadWriteOnce"],
                 "resources": {"requests": {"storage": bytes.to_string()}}}
    }))?;
    claims.create(&PostParams::default(), &pvc).await?;
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), ns);
    let pod = serde_json::from_value(json!({
        "metadata": {"name": "disk-consumer"},
        "spec": {"nodeSelector": {"kubernetes.io/hostname": node},
                 "containers": [{"name": "c", "image": "busybox", "volumeDevices": [{"name": "d", "devicePath": "/dev/xvda"}]}],
                 "volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": "disk"}}]}
    }))?;
    pods.create(&PostParams::default(), &pod).await?;
    let pv = until(Duration::from_secs(120), "the claim Bound", || async {
        let claim = claims.get("disk").await?;
        Ok(claim.spec.and_then(|s| s.volume_name))
    })
    .await?;
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    pvs.get(&pv)
        .await?
        .spec
        .and_then(|s| s.csi)
        .map(|c| c.volume_handle)
        .context("the PV has no CSI volume handle")
}

pub(crate) async fn until<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let started = Instant::now();
    loop {
        if let Some(v) = check().await? {
            return Ok(v);
        }
        ensure!(started.elapsed() < limit, "(h) waited {limit:?} for {what}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

pub(crate) async fn snapshot(client: &kube::Client, ns: &str, name: &str) -> Result<()> {
    let api: Api<DiskSnapshot> = Api::namespaced(client.clone(), ns);
    let object = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"source": {"persistentVolumeClaimName": "disk"}}
    }))?;
    api.create(&PostParams::default(), &object).await?;
    until(
        Duration::from_secs(300),
        &format!("DiskSnapshot {name} Ready"),
        || async {
            let s = api.get(name).await?.status.unwrap_or_default();
            Ok((s.phase == Phase::Ready).then_some(()))
        },
    )
    .await
}

async fn handle(client: &kube::Client, ns: &str, name: &str) -> Result<String> {
    let api: Api<DiskSnapshot> = Api::namespaced(client.clone(), ns);
    api.get(name)
        .await?
        .status
        .and_then(|s| s.snapshot_handle)
        .context("no snapshot handle")
}

/// A served DiskExport: its endpoint and a directory with its credentials.
pub(crate) async fn export(
    client: &kube::Client,
    ns: &str,
    name: &str,
    snapshot: &str,
    base: Option<&str>,
    protocol: &str,
    dir: &Path,
) -> Result<(String, PathBuf)> {
    let api: Api<DiskExport> = Api::namespaced(client.clone(), ns);
    let mut spec = json!({"snapshotName": snapshot, "protocol": protocol});
    if let Some(base) = base {
        spec["baseSnapshotName"] = json!(base);
    }
    let object = serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec}))?;
    api.create(&PostParams::default(), &object).await?;
    let status = until(
        Duration::from_secs(120),
        &format!("DiskExport {name} Ready"),
        || async {
            let s = api.get(name).await?.status.unwrap_or_default();
            Ok((s.phase == Phase::Ready).then_some(s))
        },
    )
    .await?;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let secret = status
        .credentials_secret_name
        .context("no credentials Secret")?;
    let data = secrets.get(&secret).await?.data.unwrap_or_default();
    let creds = dir.join(name);
    std::fs::create_dir_all(&creds)?;
    for (key, value) in data {
        std::fs::write(creds.join(key), value.0)?;
    }
    Ok((status.endpoint.context("no endpoint")?, creds))
}

/// The qcow2 layer that a snapshot sealed, in the node's pool (hack/driver.sh's layout).
fn layer_file(csi: &CsiTarget, volume: &str, handle: &str) -> Result<PathBuf> {
    let dir = csi.nodes_dir.join(&csi.node).join("pool").join(volume);
    let record: Value = serde_json::from_slice(&std::fs::read(dir.join("record.json"))?)?;
    let seq = record["layers"]
        .as_array()
        .and_then(|l| l.iter().find(|l| l["sealed_by"] == handle))
        .and_then(|l| l["seq"].as_u64())
        .with_context(|| format!("no layer sealed by {handle}"))?;
    Ok(dir.join(format!("layer-{seq}.qcow2")))
}

/// Seconds of `nbdcopy URI null:`.
async fn nbdcopy(uri: &str) -> Result<f64> {
    let started = Instant::now();
    crate::tools::run("nbdcopy", &[uri, "null:"]).await?;
    Ok(started.elapsed().as_secs_f64())
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, in the directories
/// QEMU's and libnbd's x509 credentials read (`srv/`, `cli/`), for the TLS peer.
struct PeerPki {
    server: PathBuf,
    client: PathBuf,
}

impl PeerPki {
    fn make(dir: &Path) -> Result<Self> {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::default();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca, ca_key);
        let leaf = |names: Vec<String>| -> Result<(String, String)> {
            let key = KeyPair::generate()?;
            let cert = CertificateParams::new(names)?.signed_by(&key, &issuer)?;
            Ok((cert.pem(), key.serialize_pem()))
        };
        let (server_cert, server_key) = leaf(vec!["127.0.0.1".into()])?;
        let (client_cert, client_key) = leaf(vec!["bench-client".into()])?;
        let pki = Self {
            server: dir.join("peer-srv"),
            client: dir.join("peer-cli"),
        };
        for (d, files) in [
            (
                &pki.server,
                [
                    ("server-cert.pem", server_cert),
                    ("server-key.pem", server_key),
                ],
            ),
            (
                &pki.client,
                [
                    ("client-cert.pem", client_cert),
                    ("client-key.pem", client_key),
                ],
            ),
        ] {
            std::fs::create_dir_all(d)?;
            std::fs::write(d.join("ca-cert.pem"), ca_cert.pem())?;
            for (name, text) in files {
                std::fs::write(d.join(name), text)?;
            }
        }
        Ok(pki)
    }
}

/// Seconds of `nbdcopy` from a read-only `qemu-nbd` (TCP on the loopback; with `pki`, TLS with
/// client certificates verified) serving `layer` (the layer file of the first snapshot, which
/// has no backing file).
async fn qemu_nbd(layer: &Path, pki: Option<&PeerPki>) -> Result<f64> {
    let port = "10899";
    // The engine daemon holds the layer open; it is sealed (never written again), so the peer
    // opens it without image locking (qemu-nbd 7.2 has no --force-share).
    let image = format!(
        "driver=qcow2,file.driver=file,file.filename={},file.locking=off",
        layer.display()
    );
    let mut command = Command::new("qemu-nbd");
    // Persistent: the readiness probe's connection must not end the server.
    command.args([
        "-r",
        "-t",
        "--image-opts",
        "-b",
        "127.0.0.1",
        "-p",
        port,
        "-x",
        "h1",
    ]);
    let uri = match pki {
        Some(pki) => {
            command.args([
                "--object",
                &format!(
                    "tls-creds-x509,id=tls0,endpoint=server,dir={},verify-peer=yes",
                    pki.server.display()
                ),
                "--tls-creds",
                "tls0",
            ]);
            format!(
                "nbds://127.0.0.1:{port}/h1?tls-certificates={}",
                pki.client.display()
            )
        }
        None => format!("nbd://127.0.0.1:{port}/h1"),
    };
    let mut server = command
        .arg(image)
        .kill_on_drop(true)
        .spawn()
        .context("starting qemu-nbd")?;
    // qemu-nbd listens before it serves; try until it answers.
    let started = Instant::now();
    let result = loop {
        if let Some(status) = server.try_wait()? {
            break Err(anyhow::anyhow!("qemu-nbd exited at once: {status}"));
        }
        match crate::tools::run("nbdinfo", &["--size", &uri]).await {
            Ok(_) => break nbdcopy(&uri).await,
            Err(_) if started.elapsed() < Duration::from_secs(10) => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => break Err(e),
        }
    };
    let _ = server.kill().await;
    let _ = server.wait().await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_hold_throughput_and_read_amplification_to_their_targets() {
        let mut reads = Pairs::default();
        reads.push(2.0, 1.0);
        let m = Measured {
            bytes: 1 << 30,
            tls_reads: reads.clone(),
            reads,
            changed: 1 << 20,
            incremental_read: 1 << 20,
        };
        let r = rows(&m);
        assert!((r[0].ratio - 0.5).abs() < 1e-9, "{:?}", r[0]);
        assert!((r[2].ratio - 1.0).abs() < 1e-9, "{:?}", r[2]);
    }
}
