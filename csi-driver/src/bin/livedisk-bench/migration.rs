//! (j) DiskMigration on hack/bench.sh's two-node cluster, through the operator as a user drives
//! it: a block claim filled with data that a snapshot sealed, moved back and forth between the
//! nodes. Each run first times the raw peer, `qemu-img convert` of the same sealed data from a
//! DiskExport of the snapshot over the source's TLS front into a file on the target node (the
//! same link, the same TLS, the same front; flushed to disk at the end, as the migration's copy
//! is), then the migration, whose target reports how long
//! its copy of the sealed layers took. A consumer writes to the volume (`qemu-img bench`, 4 KiB
//! writes 64 KiB apart) from the moment the migration starts until it ends on every second run,
//! at queue depth 1, 4 and 16 in turn, so the mirror's time to converge and the cutover pause are
//! measured without a writer and as a function of the writer's rate (its bytes over its time).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DeleteParams, PostParams};
use livedisk_api::internal::LivediskMigration;
use livedisk_api::{DiskExport, DiskMigration, Phase};
use serde_json::json;

use crate::at_scale::{Operator, ScaleTarget};
use crate::csi::{CsiTarget, Driver};
use crate::exports::{bound_claim, export, snapshot, until};
use crate::report::{Pairs, Row, Target, median, mibps};
use crate::scenarios::Config;

/// Claim size at scale 1.
const CLAIM_MIB: u64 = 1024;

fn progress(msg: &str) {
    eprintln!("bench: (j) {msg}");
}

/// What the runs measured.
#[derive(Debug, Default)]
pub struct Measured {
    pub bytes: u64,
    /// Seconds: the migration's copy of the sealed layers, and the peer's convert (runs without
    /// a writer).
    pub copies: Pairs,
    /// Milliseconds from the mirror's start to convergence, without a writer.
    pub converge_idle: Vec<f64>,
    /// Milliseconds the cutover held I/O, without a writer.
    pub pause_idle: Vec<f64>,
    /// The runs with a writer.
    pub writing: Vec<WritingRun>,
}

/// One migration under a writer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WritingRun {
    /// The writer's queue depth.
    pub depth: u32,
    /// What it wrote, in MiB/s over the migration.
    pub rate_mibps: f64,
    /// Milliseconds from the mirror's start to convergence.
    pub converge_ms: f64,
    /// Milliseconds the cutover held I/O.
    pub pause_ms: f64,
}

/// The writer's queue depths, one per writing run in turn.
const WRITER_DEPTHS: [u32; 3] = [1, 4, 16];

/// Writes of one `qemu-img bench` round of the writer.
const WRITER_ROUND: u64 = 2048;
/// Bytes between two writes of a round.
const WRITER_STRIDE: u64 = 64 << 10;

pub fn rows(m: &Measured) -> Vec<Row> {
    let mut rows = vec![Row {
        name:
            "(j) migration: copy of the sealed layers vs qemu-img convert over the same TLS front"
                .into(),
        measured: format!("{:.0} MiB/s", mibps(m.bytes, m.copies.measured())),
        peer: format!("{:.0} MiB/s", mibps(m.bytes, m.copies.peer())),
        ratio: 1.0 / m.copies.ratio(),
        target: Target::AtLeast(0.9),
    }];
    let mut series = vec![(
        "no consumer".to_string(),
        m.converge_idle.clone(),
        m.pause_idle.clone(),
    )];
    for depth in WRITER_DEPTHS {
        let runs: Vec<&WritingRun> = m.writing.iter().filter(|r| r.depth == depth).collect();
        if runs.is_empty() {
            continue;
        }
        let rate = median(runs.iter().map(|r| r.rate_mibps).collect());
        series.push((
            format!("a writer at {rate:.0} MiB/s (4 KiB, depth {depth})"),
            runs.iter().map(|r| r.converge_ms).collect(),
            runs.iter().map(|r| r.pause_ms).collect(),
        ));
    }
    for (what, converge, pause) in &series {
        if pause.is_empty() {
            continue;
        }
        rows.push(Row {
            name: format!("(j) migration, {what}: mirror of the active layer to convergence"),
            measured: format!("{:.0} ms", median(converge.clone())),
            peer: "-".into(),
            ratio: median(converge.clone()) / 1000.0,
            target: Target::Info,
        });
        let worst = pause.iter().cloned().fold(0.0, f64::max);
        rows.push(Row {
            name: format!(
                "(j) migration, {what}: cutover pause (worst of {})",
                pause.len()
            ),
            measured: format!("{worst:.0} ms"),
            peer: "-".into(),
            ratio: worst,
            target: Target::Below {
                limit: 50.0,
                unit: "ms",
            },
        });
    }
    rows
}

pub async fn migration(csi: CsiTarget, op: ScaleTarget, c: &Config) -> Result<Vec<Row>> {
    let client = kube::Client::try_default()
        .await
        .context("the cluster's admin kubeconfig (KUBECONFIG)")?;
    let ns = format!(
        "bench-j-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let operator = Operator::start(&op)?;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let object = serde_json::from_value(json!({"metadata": {"name": ns}}))?;
    let measured = match namespaces.create(&PostParams::default(), &object).await {
        Ok(_) => measure(&client, &ns, &csi, c).await,
        Err(e) => Err(anyhow::Error::new(e).context(format!("creating namespace {ns}"))),
    };
    progress("stopping the operator, deleting the namespace");
    let stopped = operator.stop().await;
    let _ = namespaces.delete(&ns, &DeleteParams::default()).await;
    let m = measured?;
    stopped.context("stopping the operator")?;
    Ok(rows(&m))
}

/// The other node of hack/bench.sh's two-node driver.
fn other(node: &str) -> String {
    match node {
        "node-a" => "node-b".into(),
        _ => "node-a".into(),
    }
}

async fn measure(client: &kube::Client, ns: &str, csi: &CsiTarget, c: &Config) -> Result<Measured> {
    let bytes = ((CLAIM_MIB as f64 * c.scale) as u64).max(64) << 20;
    let volume = bound_claim(client, ns, &csi.node, bytes).await?;
    let mut holder = csi.node.clone();
    let driver_on = |node: &str| {
        Driver::connect(CsiTarget {
            node: node.to_string(),
            node_socket: csi.node_socket.with_file_name(format!("{node}.sock")),
            ..csi.clone()
        })
    };
    let driver = driver_on(&holder).await?;
    driver.stage(&volume, "j-fill").await?;
    progress(&format!("filling {} MiB", bytes >> 20));
    let count = (bytes / (4 << 20)).to_string();
    driver
        .write(
            &volume,
            // A non-zero pattern: zeros would be copied as holes, by both sides.
            &[
                "-w",
                "--pattern=165",
                "-t",
                "none",
                "-s",
                "4M",
                "-S",
                "4M",
                "-c",
                &count,
            ],
        )
        .await?;
    driver.unstage(&volume, "j-fill").await?;
    snapshot(client, ns, "j1").await?;
    let dir = std::env::temp_dir().join(ns);
    std::fs::create_dir_all(&dir)?;
    let mut m = Measured {
        bytes,
        ..Default::default()
    };
    for run in 0..c.runs.max(2) {
        let target = other(&holder);
        let peer = peer_convert(client, ns, csi, &target, &dir, run).await?;
        let writing = run % 2 == 1;
        let depth = WRITER_DEPTHS[(run / 2) % WRITER_DEPTHS.len()];
        let source = driver_on(&holder).await?;
        let tag = format!("j-run-{run}");
        source.stage(&volume, &tag).await?;
        let name = format!("j-{run}");
        let migrations: Api<DiskMigration> = Api::namespaced(client.clone(), ns);
        let object = serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"persistentVolumeClaimName": "disk", "targetNodeName": target, "verify": false}
        }))?;
        migrations.create(&PostParams::default(), &object).await?;
        // The consumer's writes for as long as the migration runs.
        let stop = Arc::new(AtomicBool::new(false));
        let writer = writing.then(|| {
            tokio::spawn(write_until(
                source.clone(),
                volume.clone(),
                bytes,
                depth,
                stop.clone(),
            ))
        });
        let done = until(
            Duration::from_secs(1800),
            &format!("DiskMigration {name} Completed"),
            || async {
                let s = migrations.get(&name).await?.status.unwrap_or_default();
                ensure!(
                    s.phase != Phase::Failed,
                    "migration {name} failed: {:?}",
                    s.conditions
                );
                Ok((s.phase == Phase::Completed).then_some(()))
            },
        )
        .await;
        stop.store(true, Ordering::Relaxed);
        let written = match writer {
            Some(w) => Some(w.await.context("the writer task")??),
            None => None,
        };
        done?;
        let uid = migrations
            .get(&name)
            .await?
            .metadata
            .uid
            .context("no uid")?;
        let works: Api<LivediskMigration> = Api::all(client.clone());
        let work = works.get(&format!("migrate-{uid}")).await?;
        let status = work.status.context("the LivediskMigration has no status")?;
        let copy_ms = status
            .target
            .as_ref()
            .and_then(|t| t.copy_milliseconds)
            .context("no copy time reported")?;
        let src = status.source.context("no source status")?;
        let pause = src.cutover_pause_milliseconds.context("no pause")? as f64;
        let converge = src.mirror_milliseconds.unwrap_or_default() as f64;
        let rate_mibps = written.map(|(bytes, secs)| mibps(bytes, secs));
        progress(&format!(
            "run {run} ({holder} -> {target}{}): copy {copy_ms} ms, peer {:.0} ms, mirror {converge:.0} ms, pause {pause:.0} ms",
            rate_mibps
                .map(|r| format!(", writer depth {depth} at {r:.1} MiB/s"))
                .unwrap_or_default(),
            peer * 1000.0
        ));
        // The peer copies with no writer: so is the copy it is compared with (under a writer
        // the copy shares the source's disk with it).
        if rate_mibps.is_none() {
            m.copies.push(copy_ms as f64 / 1000.0, peer);
        }
        match rate_mibps {
            Some(rate_mibps) => m.writing.push(WritingRun {
                depth,
                rate_mibps,
                converge_ms: converge,
                pause_ms: pause,
            }),
            None => {
                m.converge_idle.push(converge);
                m.pause_idle.push(pause);
            }
        }
        // The consumer on the old node is a remote attachment now: unstage it there.
        source.unstage(&volume, &tag).await?;
        migrations.delete(&name, &DeleteParams::default()).await?;
        holder = target;
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(m)
}

/// The consumer: rounds of `qemu-img bench` (4 KiB writes `WRITER_STRIDE` apart at queue
/// depth `depth`, each round further into the volume) until `stop`; the bytes written and the
/// seconds it wrote for (the gaps between rounds count: they are the writer's rate as the
/// mirror sees it).
async fn write_until(
    source: Driver,
    volume: String,
    volume_bytes: u64,
    depth: u32,
    stop: Arc<AtomicBool>,
) -> Result<(u64, f64)> {
    let started = Instant::now();
    let (depth, count) = (depth.to_string(), WRITER_ROUND.to_string());
    let span = WRITER_ROUND * WRITER_STRIDE;
    let (mut offset, mut written) = (0u64, 0u64);
    while !stop.load(Ordering::Relaxed) {
        let start = offset.to_string();
        source
            .write(
                &volume,
                &[
                    "-w",
                    "--pattern=90",
                    "-t",
                    "none",
                    "-s",
                    "4K",
                    "-S",
                    &WRITER_STRIDE.to_string(),
                    "-d",
                    &depth,
                    "-c",
                    &count,
                    "-o",
                    &start,
                ],
            )
            .await?;
        written += WRITER_ROUND * 4096;
        offset = (offset + span) % volume_bytes.saturating_sub(span).max(1);
    }
    Ok((written, started.elapsed().as_secs_f64()))
}

/// Seconds of `qemu-img convert` of the sealed snapshot from a DiskExport served by the holder's
/// front, run in `target`'s namespace into a file there (then removed).
async fn peer_convert(
    client: &kube::Client,
    ns: &str,
    csi: &CsiTarget,
    target: &str,
    dir: &Path,
    run: usize,
) -> Result<f64> {
    let name = format!("j1-peer-{run}");
    let (endpoint, creds) = export(client, ns, &name, "j1", None, "NBD", dir).await?;
    let rest = endpoint
        .strip_prefix("nbds://")
        .with_context(|| format!("endpoint {endpoint}"))?;
    let (address, export_name) = rest.split_once('/').context("endpoint without a name")?;
    let (host, port) = address
        .rsplit_once(':')
        .context("endpoint without a port")?;
    let object = format!(
        "tls-creds-x509,id=peer,endpoint=client,dir={}",
        creds.display()
    );
    let image = format!(
        "driver=nbd,server.type=inet,server.host={host},server.port={port},export={export_name},tls-creds=peer"
    );
    let out = csi
        .nodes_dir
        .join(target)
        .join("pool")
        .join(format!("bench-j-peer-{run}.raw"));
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../hack/engine-ns.sh");
    let started = Instant::now();
    let output = tokio::process::Command::new(script)
        .env("LIVEDISK_NODES_DIR", &csi.nodes_dir)
        // `-t writeback`: the copy is flushed to disk before qemu-img exits, as the migration's
        // copy is before the target records it (qemu-img's default for the output, `unsafe`,
        // never flushes).
        .args([
            "exec",
            target,
            "--",
            "qemu-img",
            "convert",
            "-t",
            "writeback",
            "-O",
            "raw",
            "--object",
        ])
        .arg(&object)
        .args(["--image-opts", &image])
        .arg(&out)
        .output()
        .await
        .context("running qemu-img convert in the target's namespace")?;
    let secs = started.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&out);
    ensure!(
        output.status.success(),
        "qemu-img convert: {}",
        String::from_utf8_lossy(&output.stderr).trim()
    );
    // A snapshot with an export cannot move: the export goes first.
    let exports: Api<DiskExport> = Api::namespaced(client.clone(), ns);
    exports.delete(&name, &DeleteParams::default()).await?;
    until(
        Duration::from_secs(120),
        "the peer's DiskExport gone",
        || async { Ok(exports.get_opt(&name).await?.is_none().then_some(())) },
    )
    .await?;
    Ok(secs)
}
