//! DiskExport on the two-node local cluster: the operator (under the chart's account) issues the
//! export's credentials from its export CA and declares the node work; the node plugin holding
//! the snapshot serves it through its TLS front, and real clients of other implementations read
//! it: `qemu-img` and `nbdinfo`/libnbd over NBD with TLS, `curl` over HTTPS with Range requests.
//! What they read is checked against the checksummed writer's logs, never against another read
//! through livedisk, while a writer keeps changing the live volume (the export is the snapshot's
//! point in time).
//!
//! Phase 1 writes every block once (tag 1), then s1 is taken; s2 is taken **while a writer runs**
//! (tag 2, cycling over every block), and what qemu-img reads of it is checked against that
//! writer's log at the cut (every write acknowledged before the snapshot was asked for is there,
//! none issued after it was Ready); s2b is taken once that writer stopped, phase 3 rewrites the
//! first quarter (tag 3) and s3 is taken, so the extents changed between s2b and s3 are exactly
//! the first quarter.
//!
//! Refusals: a plaintext NBD client, a TLS client without a certificate, a client with another
//! export's credentials (it sees only its own export in `NBD_OPT_LIST`), an HTTP request without
//! or with another export's token, an expired export, a deleted one and a force-removed one.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use livedisk_api::{DiskExport, DiskSnapshot, Phase};
use livedisk_e2e::csi::node_plugin_pid;
use livedisk_e2e::csi::{attach_block, detach_block};
use livedisk_e2e::disks::{ScratchDir, host_device, must, pod, pvc, verifier};
use livedisk_e2e::operator::Operator;
use livedisk_e2e::phases::{log_from_block, take_snapshot, verify, write_phase};
use livedisk_e2e::{TestNamespace, bound_volume, client, eventually, workspace_binary};
use serde_json::{Value, json};

/// Blocks of 4 KiB (4 MiB): phases 1 and 2 write all of them, phase 3 the first `QUARTER`.
const BLOCKS: u64 = 1024;
const QUARTER: u64 = BLOCKS / 4;
const BLOCK: u64 = 4096;

fn log_path(dir: &Path, phase: u64) -> PathBuf {
    dir.join(format!("phase{phase}.log"))
}

/// The extents a log's blocks cover, merged, in bytes.
fn extents_of_log(log: &Path) -> Result<Vec<(u64, u64)>> {
    let mut blocks: Vec<u64> = std::fs::read_to_string(log)?
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok()?["block"].as_u64())
        .collect();
    blocks.sort_unstable();
    blocks.dedup();
    Ok(merge(blocks.iter().map(|b| (b * BLOCK, BLOCK))))
}

fn merge(extents: impl Iterator<Item = (u64, u64)>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (offset, length) in extents {
        match out.last_mut() {
            Some((o, l)) if *o + *l == offset => *l += length,
            _ => out.push((offset, length)),
        }
    }
    out
}

/// A DiskExport, applied, and its status once it serves.
async fn export(
    client: &Client,
    ns: &str,
    name: &str,
    snapshot: &str,
    base: Option<&str>,
    protocol: &str,
    ttl: Option<i64>,
) -> Result<Served> {
    let mut spec = json!({"snapshotName": snapshot, "protocol": protocol});
    if let Some(base) = base {
        spec["baseSnapshotName"] = json!(base);
    }
    if let Some(ttl) = ttl {
        spec["ttlSeconds"] = json!(ttl);
    }
    must(
        client,
        ns,
        json!({"apiVersion": "livedisk.io/v1alpha1", "kind": "DiskExport", "metadata": {"name": name}, "spec": spec}),
    )
    .await?;
    let exports: Api<DiskExport> = Api::namespaced(client.clone(), ns);
    let status = eventually(90, &format!("DiskExport {name} Ready"), || async {
        let status = exports.get(name).await?.status.unwrap_or_default();
        Ok((status.phase == Phase::Ready).then_some(status))
    })
    .await?;
    let endpoint = status.endpoint.clone().context("no endpoint")?;
    let secret = status
        .credentials_secret_name
        .clone()
        .context("no credentials Secret")?;
    ensure!(status.node_name.is_some(), "no node in {status:?}");
    let dir = std::env::temp_dir().join(format!("{ns}-{name}-credentials"));
    std::fs::create_dir_all(&dir)?;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let data = secrets.get(&secret).await?.data.unwrap_or_default();
    for key in ["ca-cert.pem", "client-cert.pem", "client-key.pem", "token"] {
        let value = data
            .get(key)
            .with_context(|| format!("{secret} lacks {key}"))?;
        std::fs::write(dir.join(key), &value.0)?;
    }
    Ok(Served {
        name: name.into(),
        endpoint,
        size: status.size_bytes.context("no size")? as u64,
        dir,
    })
}

/// An export as a client sees it: where, and the credentials directory (the Secret's keys as
/// files, as a mounted Secret would be).
struct Served {
    name: String,
    endpoint: String,
    size: u64,
    dir: PathBuf,
}

impl Served {
    fn token(&self) -> Result<String> {
        Ok(std::fs::read_to_string(self.dir.join("token"))?
            .trim()
            .to_string())
    }

    /// (host, port, export name) of an `nbds://` endpoint.
    fn nbd(&self) -> Result<(String, String, String)> {
        let rest = self
            .endpoint
            .strip_prefix("nbds://")
            .context("not an nbds:// endpoint")?;
        let (address, name) = rest.split_once('/').context("no export name")?;
        let (host, port) = address.rsplit_once(':').context("no port")?;
        Ok((host.into(), port.into(), name.into()))
    }
}

fn run(command: &mut Command) -> Result<std::process::Output> {
    let output = command
        .output()
        .with_context(|| format!("running {command:?}"))?;
    Ok(output)
}

fn text(output: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// `qemu-img convert` of an NBD export to a raw file, over TLS with the credentials in `dir`
/// (None: no TLS at all).
fn qemu_img_read(
    host: &str,
    port: &str,
    name: &str,
    dir: Option<&Path>,
    out: &Path,
) -> Result<std::process::Output> {
    let mut file = format!(
        "driver=raw,file.driver=nbd,file.server.type=inet,file.server.host={host},file.server.port={port},file.export={name}"
    );
    let mut command = Command::new("qemu-img");
    command.arg("convert");
    if let Some(dir) = dir {
        command.args([
            "--object",
            &format!(
                "tls-creds-x509,id=tls0,endpoint=client,dir={}",
                dir.display()
            ),
        ]);
        file.push_str(",file.tls-creds=tls0");
    }
    command.args(["-O", "raw", "--image-opts", &file]).arg(out);
    run(&mut command)
}

/// `curl` of an HTTPS URL with the export's CA; returns (status, body file).
fn curl(
    url: &str,
    ca: &Path,
    token: Option<&str>,
    range: Option<(u64, u64)>,
    out: &Path,
) -> Result<u16> {
    let mut command = Command::new("curl");
    command
        .args(["-sS", "--cacert"])
        .arg(ca)
        .args(["-o"])
        .arg(out)
        .args(["-w", "%{http_code}"]);
    if let Some(token) = token {
        command.args(["-H", &format!("Authorization: Bearer {token}")]);
    }
    if let Some((a, b)) = range {
        command.args(["-r", &format!("{a}-{b}")]);
    }
    command.arg(url);
    let output = run(&mut command)?;
    ensure!(output.status.success(), "curl {url}: {}", text(&output));
    Ok(String::from_utf8_lossy(&output.stdout).trim().parse()?)
}

/// The whole image of an HTTPS export, read with Range requests of 1 MiB.
fn read_by_ranges(served: &Served, size: u64, out: &Path) -> Result<()> {
    let token = served.token()?;
    let ca = served.dir.join("ca-cert.pem");
    let mut image = Vec::with_capacity(size as usize);
    let piece = served.dir.join("piece");
    let mut at = 0;
    while at < size {
        let end = (at + (1 << 20)).min(size) - 1;
        let status = curl(&served.endpoint, &ca, Some(&token), Some((at, end)), &piece)?;
        ensure!(
            status == 206,
            "Range {at}-{end}: HTTP {status}: {}",
            std::fs::read_to_string(&piece).unwrap_or_default()
        );
        let bytes = std::fs::read(&piece)?;
        ensure!(
            bytes.len() as u64 == end - at + 1,
            "Range {at}-{end} returned {} bytes",
            bytes.len()
        );
        image.extend_from_slice(&bytes);
        at = end + 1;
    }
    std::fs::write(out, image)?;
    Ok(())
}

/// The backup test kills a node plugin: it runs alone, the other test of this binary waits.
static NODES: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// `livedisk-csi backup ARGS`, its JSON summary line (stdout) and its stderr.
fn backup(args: &[&str]) -> Result<(Value, String)> {
    let output = run(Command::new(workspace_binary("livedisk-csi")?)
        .arg("backup")
        .args(args))?;
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    ensure!(
        output.status.success(),
        "livedisk-csi backup {args:?}: {}",
        text(&output)
    );
    let summary = String::from_utf8_lossy(&output.stdout)
        .lines()
        .last()
        .context("no summary line")?
        .to_string();
    Ok((serde_json::from_str(&summary)?, stderr))
}

/// An incremental backup of `served` into `out`; it must read exactly the extents the phase
/// logged in `log` wrote.
fn incremental(served: &Served, out: &Path, log: &Path) -> Result<()> {
    let (summary, _) = backup(&[
        "incremental",
        "--url",
        &served.endpoint,
        "--credentials",
        path_str(&served.dir)?,
        "--output",
        path_str(out)?,
    ])?;
    let changed: u64 = extents_of_log(log)?.iter().map(|e| e.1).sum();
    ensure!(
        summary["bytesRead"].as_u64() == Some(changed),
        "incremental backup of {} read {summary}, {changed} bytes changed",
        served.name
    );
    Ok(())
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str().context("path is not UTF-8")
}

/// A writer cycling over every block with `tag` until `stop` exists, logging to `log`.
fn start_writer(device: &str, tag: u64, log: &Path, stop: &Path) -> Result<Child> {
    Ok(verifier()?
        .args(["write", "--path", device, "--tag", &tag.to_string()])
        .args(["--blocks", &BLOCKS.to_string(), "--until-file"])
        .arg(stop)
        .arg("--log")
        .arg(log)
        .spawn()?)
}

fn stop_writer(mut writer: Child, stop: &Path) -> Result<()> {
    std::fs::write(stop, b"")?;
    let status = writer.wait()?;
    ensure!(status.success(), "the writer failed: {status}");
    Ok(())
}

/// The writer's log so far: how many writes, and the last sequence number acknowledged.
fn acked(log: &Path) -> Result<(usize, Option<u64>)> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let seqs: Vec<u64> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok()?["seq"].as_u64())
        .collect();
    Ok((seqs.len(), seqs.iter().max().copied()))
}

/// The cut of a snapshot taken while the writer of `log` runs: every write acknowledged before
/// it was asked for must be in it (`acked_before`), none issued after it was Ready
/// (`issued_after`: the writer has one write in flight, so the one after the last acknowledged
/// one may still precede the cut).
async fn snapshot_under_writer(
    client: &Client,
    ns: &str,
    name: &str,
    claim: &str,
    log: &Path,
) -> Result<(u64, u64)> {
    let (_, before) = acked(log)?;
    take_snapshot(client, ns, name, claim).await?;
    let (_, after) = acked(log)?;
    let before = before.context("the writer acknowledged nothing before the snapshot")?;
    let after = after.unwrap_or(before);
    Ok((before, after + 2))
}

/// Checks a point-in-time image against a log written across its cut.
fn verify_cut(
    image: &Path,
    tag: u64,
    log: &Path,
    (acked_before, issued_after): (u64, u64),
) -> Result<()> {
    let output = verifier()?
        .args(["verify", "--path"])
        .arg(image)
        .args(["--tag", &tag.to_string(), "--log"])
        .arg(log)
        .args(["--acked-before", &acked_before.to_string()])
        .args(["--issued-after", &issued_after.to_string()])
        .output()?;
    ensure!(
        output.status.success(),
        "verify {} at the cut ({acked_before}, {issued_after}) of {}: {}",
        image.display(),
        log.display(),
        text(&output)
    );
    Ok(())
}

#[tokio::test]
async fn exports_serve_the_point_in_time_over_tls_to_their_own_credentials_only() -> Result<()> {
    let _nodes = NODES.read().await;
    let client = client().await?;
    let operator = Operator::start()?;
    let namespace = TestNamespace::create(&client, "export").await?;
    let ns = namespace.name.clone();
    let scratch = ScratchDir::new("disk-export")?;
    let dir = scratch.0.clone();
    let result = async {
        must(&client, &ns, pvc("disk", None)).await?;
        must(&client, &ns, pod("disk-consumer", "disk", None)).await?;
        let (volume_id, node) = bound_volume(&client, &ns, "disk", "disk-consumer").await?;
        let tag = format!("{ns}-disk");
        let target = attach_block(&node, &volume_id, &tag).await?;
        let device = host_device(&node, &target)?;
        write_phase(&device, 1, BLOCKS, &log_path(&dir, 1))?;
        take_snapshot(&client, &ns, "s1", "disk").await?;
        // s2 is taken while a writer runs (tag 2, every block written at least once first).
        let stop2 = dir.join("stop2");
        let writer2 = start_writer(&device, 2, &log_path(&dir, 2), &stop2)?;
        eventually(60, "the writer's first pass over every block", || async {
            Ok((acked(&log_path(&dir, 2))?.0 as u64 >= BLOCKS).then_some(()))
        })
        .await?;
        let cut = snapshot_under_writer(&client, &ns, "s2", "disk", &log_path(&dir, 2)).await;
        stop_writer(writer2, &stop2)?;
        let cut = cut?;
        // The writer wrote on after s2's cut: s2b, taken once it stopped, is the quiet base of s3.
        take_snapshot(&client, &ns, "s2b", "disk").await?;
        write_phase(&device, 3, QUARTER, &log_path(&dir, 3))?;
        take_snapshot(&client, &ns, "s3", "disk").await?;

        // One that expires while the others are read (60 s is the shortest TTL allowed).
        let short = export(&client, &ns, "short", "s1", None, "HTTP", Some(60)).await?;
        let stop = dir.join("stop");
        let writer = start_writer(&device, 9, &dir.join("live.log"), &stop)?;
        let checks = async {
            let nbd = export(&client, &ns, "nbd", "s2", Some("s1"), "NBD", None).await?;
            let http = export(&client, &ns, "http", "s3", Some("s2b"), "HTTP", None).await?;
            let (host, port, name) = nbd.nbd()?;

            // qemu-img over TLS with the issued certificate: the writer's log at s2's cut.
            let image = dir.join("s2.raw");
            let output = qemu_img_read(&host, &port, &name, Some(&nbd.dir), &image)?;
            ensure!(
                output.status.success(),
                "qemu-img over TLS: {}",
                text(&output)
            );
            verify_cut(&image, 2, &log_path(&dir, 2), cut)?;

            // nbdcopy (libnbd) over TLS: the same bytes.
            let uri = format!("{}?tls-certificates={}", nbd.endpoint, nbd.dir.display());
            let copied = dir.join("s2-nbdcopy.raw");
            let output = run(Command::new("nbdcopy").arg(&uri).arg(&copied))?;
            ensure!(
                output.status.success(),
                "nbdcopy over TLS: {}",
                text(&output)
            );
            ensure!(
                std::fs::read(&copied)? == std::fs::read(&image)?,
                "nbdcopy and qemu-img read different bytes"
            );

            // The changed-block context: exactly phase 2's blocks (all of them).
            let context = format!(
                "qemu:dirty-bitmap:changed-since-{}",
                snapshot_handle(&client, &ns, "s1").await?
            );
            let output = run(Command::new("nbdinfo")
                .arg(format!("--map={context}"))
                .arg(&uri))?;
            ensure!(output.status.success(), "nbdinfo --map: {}", text(&output));
            let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
            let dirty = merge(stdout.lines().filter_map(dirty_line));
            ensure!(
                dirty == extents_of_log(&log_path(&dir, 2))?,
                "NBD changed blocks {dirty:?}"
            );

            // HTTPS Range reads of s3: phase 3's quarter, phase 2 after it.
            let s3 = dir.join("s3.raw");
            read_by_ranges(&http, http.size, &s3)?;
            verify(&s3, 3, &log_path(&dir, 3))?;
            let rest = dir.join("phase2-rest.log");
            log_from_block(&log_path(&dir, 2), QUARTER, &rest)?;
            verify(&s3, 2, &rest)?;
            // Its extent map: exactly the blocks phase 3 wrote.
            let map = dir.join("extents.json");
            let ca = http.dir.join("ca-cert.pem");
            let status = curl(
                &format!("{}/extents", http.endpoint),
                &ca,
                Some(&http.token()?),
                None,
                &map,
            )?;
            ensure!(status == 200, "extents: HTTP {status}");
            let map: Value = serde_json::from_slice(&std::fs::read(&map)?)?;
            let extents = merge(
                map["extents"]
                    .as_array()
                    .context("extents")?
                    .iter()
                    .filter_map(|e| Some((e["offset"].as_u64()?, e["length"].as_u64()?))),
            );
            ensure!(
                extents == extents_of_log(&log_path(&dir, 3))?,
                "HTTP extent map {extents:?}"
            );

            // Refusals: plaintext, no certificate, another export's credentials (an NBD export of
            // s1), an HTTP export's certificate on the NBD listener.
            let other = export(&client, &ns, "nbd-other", "s1", None, "NBD", None).await?;
            let s1_handle = snapshot_handle(&client, &ns, "s1").await?;
            let output = qemu_img_read(&host, &port, &name, None, &dir.join("x.raw"))?;
            ensure!(
                !output.status.success(),
                "a plaintext NBD client read the export"
            );
            ensure!(
                text(&output).contains("TLS"),
                "plaintext refusal: {}",
                text(&output)
            );
            let ca_only = dir.join("ca-only");
            std::fs::create_dir_all(&ca_only)?;
            std::fs::copy(nbd.dir.join("ca-cert.pem"), ca_only.join("ca-cert.pem"))?;
            let output = qemu_img_read(&host, &port, &name, Some(&ca_only), &dir.join("x.raw"))?;
            ensure!(
                !output.status.success(),
                "a TLS client without a certificate read the export"
            );
            let output = qemu_img_read(&host, &port, &name, Some(&other.dir), &dir.join("x.raw"))?;
            ensure!(
                !output.status.success(),
                "another export's certificate read the export"
            );
            let output = qemu_img_read(&host, &port, &name, Some(&http.dir), &dir.join("x.raw"))?;
            ensure!(
                !output.status.success(),
                "an HTTP export's certificate read over NBD"
            );
            let list = |creds: &Path| -> Result<String> {
                let uri = format!("nbds://{host}:{port}/?tls-certificates={}", creds.display());
                let output = run(Command::new("nbdinfo").args(["--list", "--json"]).arg(uri))?;
                ensure!(output.status.success(), "nbdinfo --list: {}", text(&output));
                Ok(String::from_utf8_lossy(&output.stdout).into_owned())
            };
            let own = list(&nbd.dir)?;
            ensure!(
                own.contains(&name),
                "NBD_OPT_LIST hides the client's own export: {own}"
            );
            let s3_handle = snapshot_handle(&client, &ns, "s3").await?;
            let theirs = list(&other.dir)?;
            ensure!(
                !theirs.contains(&name) && theirs.contains(&s1_handle),
                "NBD_OPT_LIST of the other credentials: {theirs}"
            );
            let x = dir.join("x");
            ensure!(
                curl(&http.endpoint, &ca, None, Some((0, 4095)), &x)? == 401,
                "HTTP without a token"
            );
            // The export's client certificate opens it over HTTPS too, without a token.
            let output = run(Command::new("curl")
                .args(["-sS", "-w", "%{http_code}", "-r", "0-4095", "--cacert"])
                .arg(&ca)
                .arg("--cert")
                .arg(http.dir.join("client-cert.pem"))
                .arg("--key")
                .arg(http.dir.join("client-key.pem"))
                .arg("-o")
                .arg(&x)
                .arg(&http.endpoint))?;
            ensure!(
                String::from_utf8_lossy(&output.stdout).trim() == "206",
                "HTTPS with the client certificate: {}",
                text(&output)
            );
            ensure!(
                std::fs::read(&x)? == std::fs::read(&s3)?[..4096],
                "the first block read with the client certificate differs from s3"
            );
            let s2_url = http.endpoint.replace(&s3_handle, &name);
            ensure!(
                curl(&s2_url, &ca, Some(&http.token()?), Some((0, 4095)), &x)? == 404,
                "HTTP with another export's token"
            );
            ensure!(
                curl(&s2_url, &ca, Some(&nbd.token()?), Some((0, 4095)), &x)? != 206,
                "the NBD export's token over HTTP"
            );

            // Deleting an export stops it at once.
            let exports: Api<DiskExport> = Api::namespaced(client.clone(), &ns);
            exports.delete(&http.name, &DeleteParams::default()).await?;
            eventually(30, "DiskExport http gone", || async {
                Ok(exports.get_opt(&http.name).await?.is_none().then_some(()))
            })
            .await?;
            ensure!(
                curl(
                    &http.endpoint,
                    &ca,
                    Some(&http.token()?),
                    Some((0, 4095)),
                    &x
                )? == 401,
                "a deleted export still serves"
            );

            // One force-removed (its finalizer stripped) stops being served too: the operator's
            // sweep removes node work whose owner is gone.
            let forced = export(&client, &ns, "forced", "s3", Some("s2b"), "HTTP", None).await?;
            exports
                .patch(
                    &forced.name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"metadata": {"finalizers": null}})),
                )
                .await?;
            exports
                .delete(&forced.name, &DeleteParams::default())
                .await?;
            let token = forced.token()?;
            eventually(120, "the force-removed export to stop serving", || async {
                let status = curl(&forced.endpoint, &ca, Some(&token), Some((0, 4095)), &x)?;
                Ok((status == 401).then_some(()))
            })
            .await?;
            Ok::<_, anyhow::Error>(())
        };
        let checked = checks.await;
        std::fs::write(&stop, b"")?;
        let mut writer = writer;
        let written = writer.wait()?;
        checked?;
        ensure!(written.success(), "the live writer failed");

        // The short export expires: Completed, and its token opens nothing.
        let exports: Api<DiskExport> = Api::namespaced(client.clone(), &ns);
        let status = eventually(120, "DiskExport short Completed (expired)", || async {
            let status = exports.get("short").await?.status.unwrap_or_default();
            Ok((status.phase == Phase::Completed).then_some(status))
        })
        .await?;
        ensure!(
            status.endpoint.is_none(),
            "an expired export names an endpoint: {status:?}"
        );
        let ca = short.dir.join("ca-cert.pem");
        let x = dir.join("x");
        ensure!(
            curl(
                &short.endpoint,
                &ca,
                Some(&short.token()?),
                Some((0, 4095)),
                &x
            )? == 401,
            "an expired export still serves"
        );
        detach_block(&node, &volume_id, &tag).await?;
        Ok::<_, anyhow::Error>(())
    }
    .await;
    finish(operator, result)
}

/// Stops the test's operator, with the end of its log when the test failed.
fn finish(operator: Operator, result: Result<()>) -> Result<()> {
    if result.is_err() {
        let log = operator.log();
        let tail: Vec<&str> = log.lines().rev().take(60).collect();
        eprintln!(
            "operator log (last lines):\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    drop(operator);
    result
}

/// A `nbdinfo --map` line of a dirty extent: (offset, length).
fn dirty_line(line: &str) -> Option<(u64, u64)> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let kind: u64 = fields.get(2)?.parse().ok()?;
    if kind & 1 == 0 {
        return None;
    }
    Some((fields.first()?.parse().ok()?, fields.get(1)?.parse().ok()?))
}

async fn snapshot_handle(client: &Client, ns: &str, name: &str) -> Result<String> {
    let snapshots: Api<DiskSnapshot> = Api::namespaced(client.clone(), ns);
    let status = snapshots.get(name).await?.status.unwrap_or_default();
    status.snapshot_handle.context("no snapshot handle")
}

/// The reference backup client against real exports: a full backup, then two incrementals (with
/// writes, and a live deletion merge of the full backup's snapshot, in between), restored into a
/// new volume, equal the last snapshot byte for byte and the writer's logs; each incremental read
/// exactly the changed extents. A full backup read while the snapshot's node plugin is killed
/// with -9 resumes once the plugin (and its front) is back, and is complete.
#[tokio::test]
async fn the_backup_client_restores_a_chain_and_survives_kill_9_of_the_front() -> Result<()> {
    let _nodes = NODES.write().await;
    let client = client().await?;
    let operator = Operator::start()?;
    let namespace = TestNamespace::create(&client, "backup").await?;
    let ns = namespace.name.clone();
    let scratch = ScratchDir::new("disk-backup")?;
    let dir = scratch.0.clone();
    let result = async {
        must(&client, &ns, pvc("disk", None)).await?;
        must(&client, &ns, pod("disk-consumer", "disk", None)).await?;
        let (volume_id, node) = bound_volume(&client, &ns, "disk", "disk-consumer").await?;
        let tag = format!("{ns}-disk");
        let device = host_device(&node, &attach_block(&node, &volume_id, &tag).await?)?;
        let exports: Api<DiskExport> = Api::namespaced(client.clone(), &ns);
        let unexport = |name: &'static str| {
            let exports = exports.clone();
            async move {
                exports.delete(name, &DeleteParams::default()).await?;
                eventually(30, &format!("DiskExport {name} gone"), || async {
                    Ok(exports.get_opt(name).await?.is_none().then_some(()))
                })
                .await
            }
        };

        // Full backup of b1 (every block of phase 1).
        write_phase(&device, 1, BLOCKS, &log_path(&dir, 1))?;
        take_snapshot(&client, &ns, "b1", "disk").await?;
        let e1 = export(&client, &ns, "e1", "b1", None, "HTTP", None).await?;
        let full = dir.join("full.raw");
        let (summary, _) = backup(&[
            "full",
            "--url",
            &e1.endpoint,
            "--credentials",
            path_str(&e1.dir)?,
            "--output",
            path_str(&full)?,
        ])?;
        ensure!(
            summary["bytesRead"].as_u64() == Some(e1.size),
            "full backup read {summary}"
        );

        // First incremental: b2 (the first half rewritten) against b1.
        write_phase(&device, 2, BLOCKS / 2, &log_path(&dir, 2))?;
        take_snapshot(&client, &ns, "b2", "disk").await?;
        let e2 = export(&client, &ns, "e2", "b2", Some("b1"), "HTTP", None).await?;
        let inc1 = dir.join("inc1.raw");
        incremental(&e2, &inc1, &log_path(&dir, 2))?;

        // A live merge: b1 is deleted (its layer merged away) while the disk stays attached.
        unexport("e1").await?;
        unexport("e2").await?;
        let snapshots: Api<DiskSnapshot> = Api::namespaced(client.clone(), &ns);
        snapshots.delete("b1", &DeleteParams::default()).await?;
        eventually(120, "DiskSnapshot b1 merged away", || async {
            Ok(snapshots.get_opt("b1").await?.is_none().then_some(()))
        })
        .await?;

        // Second incremental: b3 (the first quarter rewritten) against b2.
        write_phase(&device, 3, QUARTER, &log_path(&dir, 3))?;
        take_snapshot(&client, &ns, "b3", "disk").await?;
        let e3 = export(&client, &ns, "e3", "b3", Some("b2"), "HTTP", None).await?;
        let inc2 = dir.join("inc2.raw");
        incremental(&e3, &inc2, &log_path(&dir, 3))?;

        // Restore into a new volume: byte for byte b3, and the writer's logs.
        must(&client, &ns, pvc("restored", None)).await?;
        must(
            &client,
            &ns,
            pod("restored-consumer", "restored", Some(&node)),
        )
        .await?;
        let (restored_id, _) = bound_volume(&client, &ns, "restored", "restored-consumer").await?;
        let restored_tag = format!("{ns}-restored");
        let restored = host_device(
            &node,
            &attach_block(&node, &restored_id, &restored_tag).await?,
        )?;
        backup(&[
            "restore",
            "--full",
            path_str(&full)?,
            "--incremental",
            path_str(&inc1)?,
            "--incremental",
            path_str(&inc2)?,
            "--target",
            &restored,
        ])?;
        verify(&restored, 3, &log_path(&dir, 3))?;
        let from_quarter = dir.join("phase2-rest.log");
        log_from_block(&log_path(&dir, 2), QUARTER, &from_quarter)?;
        verify(&restored, 2, &from_quarter)?;
        let from_half = dir.join("phase1-rest.log");
        log_from_block(&log_path(&dir, 1), BLOCKS / 2, &from_half)?;
        verify(&restored, 1, &from_half)?;
        let whole = dir.join("b3.raw");
        let status = curl(
            &e3.endpoint,
            &e3.dir.join("ca-cert.pem"),
            Some(&e3.token()?),
            None,
            &whole,
        )?;
        ensure!(status == 200, "GET of the whole image: HTTP {status}");
        let image = std::fs::read(&whole)?;
        let mut device_bytes = vec![0u8; image.len()];
        {
            use std::io::Read;
            std::fs::File::open(&restored)?.read_exact(&mut device_bytes)?;
        }
        ensure!(
            device_bytes == image,
            "the restored volume differs from snapshot b3"
        );
        detach_block(&node, &restored_id, &restored_tag).await?;

        // kill -9 of the node plugin (its front) while a full backup reads: it resumes.
        let slow = dir.join("during-kill.raw");
        let mut reader = Command::new(workspace_binary("livedisk-csi")?)
            .args([
                "backup",
                "full",
                "--url",
                &e3.endpoint,
                "--credentials",
                path_str(&e3.dir)?,
            ])
            .args([
                "--output",
                path_str(&slow)?,
                "--chunk-size",
                "64KiB",
                "--parallel",
                "1",
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        ensure!(
            reader.try_wait()?.is_none(),
            "the backup ended before the kill: make it slower"
        );
        let plugin = node_plugin_pid(&node)?.context("no node plugin")?;
        // SAFETY: kill(2) only sends a signal, to the node plugin process found above.
        ensure!(
            unsafe { libc::kill(plugin, libc::SIGKILL) } == 0,
            "kill -9 node plugin"
        );
        let output = tokio::task::spawn_blocking(move || reader.wait_with_output()).await??;
        ensure!(
            output.status.success(),
            "the backup did not survive the kill: {}",
            text(&output)
        );
        ensure!(
            text(&output).contains("resumed"),
            "the backup never had to resume: {}",
            text(&output)
        );
        ensure!(
            std::fs::read(&slow)? == image,
            "the resumed backup differs from snapshot b3"
        );

        detach_block(&node, &volume_id, &tag).await?;
        Ok::<_, anyhow::Error>(())
    }
    .await;
    finish(operator, result)
}
