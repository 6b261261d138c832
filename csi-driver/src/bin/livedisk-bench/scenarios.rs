//! The engine's four benchmarks, (a)–(d). Each returns finished table rows.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use livedisk_csi::frontends::FrontEndServer;
use livedisk_csi::node::attach::Attacher;
use livedisk_engine::nbd_client::NbdClient;
use livedisk_engine::{Engine, ExportInfo, SnapshotId, VolumeId};

use crate::report::{Row, Target, median, mibps, ms};
use crate::tools::{
    Writer, drop_caches, fill, qemu_img_bench, qemu_img_bench_fmt, run, sync_file, timed,
};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const CLUSTER: u64 = 65536;

#[derive(Debug, Clone)]
pub struct Config {
    pub dir: PathBuf,
    /// Scales every data size (not the extent count).
    pub scale: f64,
    /// Runs of the cheap benchmarks (snapshot, query).
    pub runs: usize,
    /// Runs of the benchmarks that move a lot of data (merge, attach).
    pub heavy_runs: usize,
    /// Changed extents for the query benchmark.
    pub extents: u64,
    /// (f): DiskSnapshots, and the claims they are spread over.
    pub disk_snapshots: usize,
    pub claims: usize,
    /// Benchmarks to run (`None`: all).
    pub only: Option<Vec<char>>,
}

impl Config {
    pub fn selected(&self, bench: char) -> bool {
        self.only.as_ref().is_none_or(|o| o.contains(&bench))
    }

    /// A data size scaled, rounded to whole MiB, at least 16 MiB.
    pub fn bytes(&self, base: u64) -> u64 {
        let b = (base as f64 * self.scale) as u64;
        (b / MIB).max(16) * MIB
    }
}

fn progress(msg: &str) {
    eprintln!("bench: {msg}");
}

pub async fn attached_volume(e: &Engine, size: u64) -> Result<(VolumeId, String)> {
    let vol = VolumeId::generate();
    e.create_volume(&vol, size).await.context("create volume")?;
    let uri = e.attach_volume(&vol).await.context("attach")?.uri();
    Ok((vol, uri))
}

/// (a) snapshot latency at 1 GiB and 64 GiB virtual size with the same
/// allocated data and a writer running; peer: a full copy of that data.
pub async fn snapshot_latency(e: &Engine, c: &Config) -> Result<Vec<Row>> {
    let data = c.bytes(256 * MIB);
    let mut totals = vec![];
    let mut switch = vec![];
    let mut small: Option<VolumeId> = None;
    for size in [GIB.max(data), 64 * GIB] {
        progress(&format!("snapshot latency at {} GiB", size / GIB));
        let (vol, uri) = attached_volume(e, size).await?;
        fill(&uri, data).await?;
        let writer = Writer::start(&uri)?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut t_total = vec![];
        let mut t_tx = vec![];
        for _ in 0..c.runs {
            let (_, t) = e
                .create_snapshot(&vol, &SnapshotId::generate())
                .await
                .context("snapshot")?;
            t_total.push(t.total.as_secs_f64());
            t_tx.push(t.transaction.as_secs_f64());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        writer.stop().await?;
        totals.push(median(t_total));
        switch.push(median(t_tx));
        small.get_or_insert(vol);
    }
    let small = small.context("no volume")?;
    progress("full-copy peer (cp + fsync of the same data)");
    let src = e.layer_path(&small, 0);
    let dst = c.dir.join("full-copy.qcow2");
    let (s, d) = (src.display().to_string(), dst.display().to_string());
    let mut copies = vec![];
    for _ in 0..c.runs.min(3) {
        let t = Instant::now();
        run("cp", &[&s, &d]).await?;
        sync_file(&dst).await?;
        copies.push(t.elapsed().as_secs_f64());
        std::fs::remove_file(&dst).context("remove copy")?;
    }
    let copy = median(copies);
    let mib = data / MIB;
    Ok(vec![
        Row {
            name: format!("(a) snapshot, 64 GiB vs 1 GiB virtual, {mib} MiB data, writer on"),
            measured: ms(totals[1]),
            peer: ms(totals[0]),
            ratio: totals[1] / totals[0],
            target: Target::AtMost(1.10),
        },
        Row {
            name: "(a) snapshot switch-over (QMP transaction), 64 vs 1 GiB".into(),
            measured: ms(switch[1]),
            peer: ms(switch[0]),
            ratio: switch[1] / switch[0],
            target: Target::Info,
        },
        Row {
            name: format!("(a) snapshot vs full copy (cp+fsync) of {mib} MiB"),
            measured: ms(totals[0]),
            peer: ms(copy),
            ratio: totals[0] / copy,
            target: Target::AtMost(1.0),
        },
    ])
}

/// The merge benchmark's chain on a new volume of `2 * data` bytes:
/// `layer0` (`data` bytes) ← `layer1` (`data` bytes over the same range) ←
/// active, written through the volume's export. Returns the volume, its
/// export and the older snapshot, whose deletion commits layer1 into layer0.
pub async fn merge_chain(e: &Engine, data: u64) -> Result<(VolumeId, ExportInfo, SnapshotId)> {
    let vol = VolumeId::generate();
    e.create_volume(&vol, 2 * data)
        .await
        .context("create volume")?;
    let export = e.attach_volume(&vol).await.context("attach")?;
    let uri = export.uri();
    let count = (data / MIB).to_string();
    let write = |pattern: &'static str| {
        let uri = uri.clone();
        let count = count.clone();
        async move { qemu_img_bench(&uri, &["-w", pattern, "-c", &count, "-s", "1M", "-d", "4"]).await }
    };
    write("--pattern=1").await?;
    let s1 = SnapshotId::generate();
    e.create_snapshot(&vol, &s1).await.context("snapshot 1")?;
    write("--pattern=2").await?;
    e.create_snapshot(&vol, &SnapshotId::generate())
        .await
        .context("snapshot 2")?;
    Ok((vol, export, s1))
}

/// What the consumer feels of a merge: one more merge of the benchmark's
/// chain, with the writer on and a probe timing single durable 4 KiB
/// writes (FUA, what an `O_DSYNC` write waits for) on the merged volume all
/// the way through; returns the longest. Kept out of the throughput runs:
/// the probe's flushes are load the peer would not share.
async fn merge_stall(e: &Engine, data: u64) -> Result<Duration> {
    let (_, export, s1) = merge_chain(e, data).await?;
    let uri = export.uri();
    let mut client = NbdClient::connect(&export.socket, &export.name)
        .await
        .context("probe connect")?;
    drop_caches();
    let writer = Writer::start(&uri)?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let probe = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let block = [0x5au8; 4096];
            let mut longest = Duration::ZERO;
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // Above the merged range: the probe never touches its data.
                let offset = data + (i % 4096) * 4096;
                let t = Instant::now();
                client.write(offset, &block).await?;
                longest = longest.max(t.elapsed());
                i += 1;
            }
            client.disconnect().await?;
            Ok::<_, anyhow::Error>(longest)
        })
    };
    // The probe is writing before the merge starts.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let merged = e.delete_snapshot(&s1, None).await.context("merge");
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let longest = probe.await.context("probe task")??;
    writer.stop().await?;
    merged?;
    e.reclaimed().await;
    Ok(longest)
}

/// One pair of the merge benchmark: an engine merge of `data` bytes (a
/// two-snapshot chain whose older snapshot is deleted: a non-active commit)
/// and the raw `qemu-img commit` of a copy of the same two layers (same
/// names, same qcow2 layout, copied before either runs), each from a cold
/// page cache, with the writer on or not. `peer_first` alternates the order
/// between runs, so that whatever the first one leaves behind on the
/// machine (the host's own write-back of the data just written) weighs on
/// both sides alike. Returns (engine, peer) MiB/s.
async fn merge_pair(
    e: &Engine,
    data: u64,
    load: Option<&str>,
    peer_dir: &Path,
    peer_first: bool,
) -> Result<(f64, f64)> {
    let (vol, export, s1) = merge_chain(e, data).await?;
    let uri = export.uri();
    // Layers 0 and 1 are sealed: nothing writes them any more.
    std::fs::create_dir_all(peer_dir).context("peer dir")?;
    for seq in [0, 1] {
        let src = e.layer_path(&vol, seq);
        let name = src.file_name().context("layer file name")?;
        std::fs::copy(&src, peer_dir.join(name))
            .with_context(|| format!("copy {}", src.display()))?;
    }
    let peer = if peer_first {
        Some(raw_commit(peer_dir, data, load).await?)
    } else {
        None
    };
    drop_caches();
    let writer = load.map(|_| Writer::start(&uri)).transpose()?;
    let t = Instant::now();
    e.delete_snapshot(&s1, None).await.context("merge")?;
    let speed = mibps(data, t.elapsed().as_secs_f64());
    if let Some(w) = writer {
        w.stop().await?;
    }
    // Freeing the merged-away file is not part of the merge (the engine
    // does it in the background); keep it out of the next measurement.
    e.reclaimed().await;
    let peer = match peer {
        Some(p) => p,
        None => raw_commit(peer_dir, data, load).await?,
    };
    Ok((speed, peer))
}

/// Raw `qemu-img commit` of the chain `merge_pair` copied to `peer_dir`
/// (`layer-1.qcow2` over `layer-0.qcow2`), caches dropped first. With
/// `load`, the same writer as the engine's runs meanwhile, on a scratch
/// volume of the engine (an offline commit cannot have a writer on its own
/// chain), so both sides share the machine with the same I/O load.
async fn raw_commit(peer_dir: &Path, data: u64, load: Option<&str>) -> Result<f64> {
    let top = peer_dir.join("layer-1.qcow2").display().to_string();
    drop_caches();
    let writer = load.map(Writer::start).transpose()?;
    let d = timed("qemu-img", &["commit", "-q", "-d", "-f", "qcow2", &top]).await?;
    if let Some(w) = writer {
        w.stop().await?;
    }
    std::fs::remove_dir_all(peer_dir).with_context(|| format!("remove {}", peer_dir.display()))?;
    Ok(mibps(data, d.as_secs_f64()))
}

/// (b) deleting a snapshot (commit of `data` bytes) vs raw `qemu-img
/// commit` of a copy of the same chain, run right after it under the same
/// load: with a writer on (the brief's condition) and off. The ratio is the
/// median of the per-pair ratios, so the machine's drift between runs
/// cancels out.
pub async fn merge_throughput(e: &Engine, c: &Config) -> Result<Vec<Row>> {
    let data = c.bytes(512 * MIB);
    let peer_dir = c.dir.join("peer-chain");
    let (_, scratch) = attached_volume(e, GIB).await?;
    let (mut live, mut quiet, mut raw_live, mut raw_quiet) = (vec![], vec![], vec![], vec![]);
    let (mut live_ratio, mut quiet_ratio, mut idle_peer_ratio) = (vec![], vec![], vec![]);
    for i in 0..c.heavy_runs {
        progress(&format!("merge run {}/{}", i + 1, c.heavy_runs));
        let peer_first = i % 2 == 1;
        let (m, r) = merge_pair(e, data, Some(&scratch), &peer_dir, peer_first).await?;
        live.push(m);
        raw_live.push(r);
        live_ratio.push(m / r);
        let (q, r) = merge_pair(e, data, None, &peer_dir, !peer_first).await?;
        quiet.push(q);
        raw_quiet.push(r);
        quiet_ratio.push(q / r);
        idle_peer_ratio.push(m / r);
    }
    progress("merge: the consumer's longest write during a merge");
    let stall = merge_stall(e, data).await?;
    let mib = data / MIB;
    Ok(vec![
        Row {
            name: format!("(b) merge {mib} MiB (delete snapshot) vs qemu-img commit, writer on"),
            measured: format!("{:.0} MiB/s", median(live.clone())),
            peer: format!("{:.0} MiB/s", median(raw_live)),
            ratio: median(live_ratio),
            target: Target::AtLeast(0.90),
        },
        Row {
            name: format!("(b) merge {mib} MiB vs qemu-img commit, no writer"),
            measured: format!("{:.0} MiB/s", median(quiet)),
            peer: format!("{:.0} MiB/s", median(raw_quiet.clone())),
            ratio: median(quiet_ratio),
            target: Target::AtLeast(0.90),
        },
        Row {
            name: "(b)   merge with writer vs qemu-img commit alone (informative)".into(),
            measured: format!("{:.0} MiB/s", median(live)),
            peer: format!("{:.0} MiB/s", median(raw_quiet)),
            ratio: median(idle_peer_ratio),
            target: Target::Info,
        },
        Row {
            name: format!(
                "(b)   consumer's longest durable 4 KiB write during a {mib} MiB merge (one run)"
            ),
            measured: ms(stall.as_secs_f64()),
            peer: String::new(),
            ratio: f64::NAN,
            target: Target::Info,
        },
    ])
}

/// (c) changed extents between two snapshots: `extents` scattered clusters
/// on a 1 TiB virtual disk.
pub async fn changed_extents(e: &Engine, c: &Config) -> Result<Vec<Row>> {
    let n = c.extents;
    let size = 1u64 << 40;
    // Scattered: one 4 KiB write every `stride` bytes, each in its own cluster.
    let stride = (size / n) / CLUSTER * CLUSTER;
    ensure!(stride >= 2 * CLUSTER, "too many extents for 1 TiB");
    let (vol, uri) = attached_volume(e, size).await?;
    let count = n.to_string();
    let step = stride.to_string();
    progress(&format!("writing {n} scattered blocks (pattern 1)"));
    qemu_img_bench(
        &uri,
        &["-w", "-c", &count, "-s", "4096", "-S", &step, "-d", "16"],
    )
    .await?;
    let s1 = SnapshotId::generate();
    e.create_snapshot(&vol, &s1).await.context("snapshot 1")?;
    progress(&format!("writing {n} scattered blocks (pattern 2)"));
    let half = (stride / 2 / CLUSTER * CLUSTER).to_string();
    qemu_img_bench(
        &uri,
        &[
            "-w", "-c", &count, "-s", "4096", "-S", &step, "-o", &half, "-d", "16",
        ],
    )
    .await?;
    // The snapshot that seals the 100 k extents, then at once the query that
    // needs its extent record (captured after the snapshot returned).
    let s2 = SnapshotId::generate();
    let t = Instant::now();
    let (_, busy) = e.create_snapshot(&vol, &s2).await.context("snapshot 2")?;
    let first_query = e
        .changed_extents(&s1, &s2)
        .await
        .context("delta after snapshot")?;
    let snapshot_then_query = t.elapsed().as_secs_f64();
    ensure!(
        first_query.extents.len() as u64 == n,
        "expected {n} changed extents right after the snapshot, got {}",
        first_query.extents.len()
    );
    // A quiet snapshot of the same volume (a handful of new extents), as the
    // baseline the busy one is held to.
    let mut quiet = vec![];
    for _ in 0..c.runs {
        qemu_img_bench(&uri, &["-w", "-c", "4", "-s", "4096", "-S", &step]).await?;
        let (_, q) = e
            .create_snapshot(&vol, &SnapshotId::generate())
            .await
            .context("quiet snapshot")?;
        quiet.push(q.total.as_secs_f64());
    }
    let quiet = median(quiet);
    let busy = busy.total.as_secs_f64();

    progress("querying");
    let mut one = vec![];
    let mut paged = vec![];
    let mut found = 0;
    for _ in 0..c.runs {
        let t = Instant::now();
        let p = e.delta(&s1, &s2, 0, usize::MAX).await.context("delta")?;
        one.push(t.elapsed().as_secs_f64());
        found = p.extents.len();
        // As the SnapshotMetadata stream pages: the list once, then pages of
        // 10 000 resumed by offset.
        let t = Instant::now();
        let list = e.changed_extents(&s1, &s2).await.context("delta list")?;
        let mut start = 0;
        let mut got = 0;
        loop {
            let p = list.page(start, 10_000);
            let Some(last) = p.extents.last() else { break };
            start = last.end();
            got += p.extents.len();
        }
        paged.push(t.elapsed().as_secs_f64());
        ensure!(
            got == found,
            "paged walk saw {got} extents, one call {found}"
        );
    }
    ensure!(
        found as u64 == n,
        "expected {n} changed extents, got {found}"
    );
    let (one, paged) = (median(one), median(paged));
    Ok(vec![
        Row {
            name: format!("(c) changed extents, {found} on 1 TiB, one call"),
            measured: format!("{one:.3} s"),
            peer: String::new(),
            ratio: one,
            target: Target::SecondsBelow(1.0),
        },
        Row {
            name: "(c) same, paged 10 000 per message (list computed once per stream)".into(),
            measured: format!("{paged:.3} s"),
            peer: format!("{one:.3} s"),
            ratio: paged / one,
            target: Target::AtMost(2.0),
        },
        Row {
            name: format!("(c) snapshot sealing {n} new extents vs a quiet snapshot"),
            measured: ms(busy),
            peer: ms(quiet),
            ratio: busy / quiet,
            target: Target::AtMost(2.0),
        },
        Row {
            name: format!("(c) that snapshot + at once a query of its {n} extents"),
            measured: ms(snapshot_then_query),
            peer: ms(busy),
            ratio: f64::NAN,
            target: Target::Info,
        },
    ])
}

struct IoMode {
    name: &'static str,
    args: Vec<String>,
    bytes: u64,
    target: Target,
}

/// (d) sequential and 4 KiB random I/O through the consumer's device (and,
/// as diagnostics, the daemon's NBD export and a local qcow2 file) vs the
/// raw file, caches dropped before each run.
pub async fn attach_path(e: &Engine, c: &Config) -> Result<(Vec<Row>, bool)> {
    let size = c.bytes(GIB);
    let (vol, uri) = attached_volume(e, size).await?;
    let raw = c.dir.join("raw.img");
    std::fs::File::create(&raw)
        .and_then(|f| f.set_len(size))
        .context("raw file")?;
    let raw_s = raw.display().to_string();
    // Diagnostic peer: the same qcow2 format without daemon or NBD, to
    // tell the format's cost from the transport's.
    let q = c.dir.join("direct.qcow2").display().to_string();
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", &q, &size.to_string()],
    )
    .await?;
    progress("filling the volume, the raw file and the qcow2 file");
    fill(&uri, size).await?;
    fill(&raw_s, size).await?;
    let count = (size / MIB).to_string();
    qemu_img_bench_fmt(
        "qcow2",
        &q,
        &["-w", "--pattern=165", "-c", &count, "-s", "1M", "-d", "4"],
    )
    .await?;
    let seq = (size / MIB).to_string();
    let rnd_count = (size / 4096 / 8).min(32_768);
    let rnd = rnd_count.to_string();
    // A step co-prime with the block count visits blocks in a scattered order.
    let step = (4096 * 7919u64).to_string();
    let s = |v: &[&str]| v.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
    let modes = [
        IoMode {
            name: "sequential read 1 MiB, depth 16",
            args: s(&["-c", &seq, "-s", "1M", "-d", "16"]),
            bytes: size,
            target: Target::AtLeast(0.70),
        },
        IoMode {
            name: "sequential write 1 MiB, depth 16",
            args: s(&[
                "-w",
                "-c",
                &seq,
                "-s",
                "1M",
                "-d",
                "16",
                &format!("--flush-interval={seq}"),
            ]),
            bytes: size,
            target: Target::AtLeast(0.70),
        },
        IoMode {
            name: "random read 4 KiB, depth 16",
            args: s(&["-c", &rnd, "-s", "4096", "-S", &step, "-d", "16"]),
            bytes: rnd_count * 4096,
            target: Target::Info,
        },
        IoMode {
            name: "random write 4 KiB, depth 16",
            args: s(&[
                "-w",
                "-c",
                &rnd,
                "-s",
                "4096",
                "-S",
                &step,
                "-d",
                "16",
                &format!("--flush-interval={rnd}"),
            ]),
            bytes: rnd_count * 4096,
            target: Target::Info,
        },
    ];
    // The consumer's real device: what the CSI node service stages (a loop
    // device without direct I/O over an nbdfuse file of the export, which the
    // engine's front-end server runs: here in this process).
    let device = ConsumerDevice::attach(e, &vol).await?;
    let device_s = device.path.display().to_string();
    let measured = measure_io(c, &modes, &device_s, &uri, &raw_s, &q).await;
    device.release(e, &vol).await?;
    measured
}

/// A volume's consumer device as the CSI node service stages it (a loop device over an nbdfuse
/// file of the export), with the engine's front-end server run in this process.
pub struct ConsumerDevice {
    frontends: FrontEndServer,
    attacher: Attacher,
    pub path: PathBuf,
}

impl ConsumerDevice {
    pub async fn attach(e: &Engine, vol: &VolumeId) -> Result<Self> {
        let engine_dir = e.daemon().runtime.dir.clone();
        let frontends = FrontEndServer::start(&engine_dir).await?;
        let attacher = Attacher::new(&engine_dir);
        let path = attacher
            .attach(e, vol, false)
            .await
            .map_err(|err| anyhow::anyhow!("attaching the consumer device: {err}"))?;
        Ok(Self {
            frontends,
            attacher,
            path,
        })
    }

    /// Detaches the device and stops the front-end server.
    pub async fn release(self, e: &Engine, vol: &VolumeId) -> Result<()> {
        self.attacher
            .detach(e, vol)
            .await
            .map_err(|err| anyhow::anyhow!("detaching the consumer device: {err}"))?;
        self.frontends.stop().await?;
        Ok(())
    }
}

/// Every mode on the consumer device, the export, the raw file and the
/// local qcow2 file, interleaved run by run; ratios are medians of the
/// per-run ratios against the raw file of the same run.
async fn measure_io(
    c: &Config,
    modes: &[IoMode],
    device: &str,
    uri: &str,
    raw: &str,
    qcow: &str,
) -> Result<(Vec<Row>, bool)> {
    let mut rows = vec![];
    let mut dropped = true;
    for m in modes {
        progress(&format!("attach path: {}", m.name));
        let args: Vec<&str> = m.args.iter().map(String::as_str).collect();
        let (mut dev, mut nbd, mut file, mut local) = (vec![], vec![], vec![], vec![]);
        let (mut dev_r, mut nbd_r, mut local_r) = (vec![], vec![], vec![]);
        for _ in 0..c.heavy_runs {
            dropped &= drop_caches();
            let f = mibps(m.bytes, qemu_img_bench(raw, &args).await?);
            dropped &= drop_caches();
            let d = mibps(m.bytes, qemu_img_bench(device, &args).await?);
            dropped &= drop_caches();
            let n = mibps(m.bytes, qemu_img_bench(uri, &args).await?);
            dropped &= drop_caches();
            let l = mibps(m.bytes, qemu_img_bench_fmt("qcow2", qcow, &args).await?);
            file.push(f);
            dev.push(d);
            nbd.push(n);
            local.push(l);
            dev_r.push(d / f);
            nbd_r.push(n / f);
            local_r.push(l / f);
        }
        let raw_mibs = format!("{:.0} MiB/s", median(file));
        rows.push(Row {
            name: format!(
                "(d) {}, consumer device (loop over nbdfuse) vs raw file",
                m.name
            ),
            measured: format!("{:.0} MiB/s", median(dev)),
            peer: raw_mibs.clone(),
            ratio: median(dev_r),
            target: m.target,
        });
        rows.push(Row {
            name: "(d)   same on the daemon's NBD export, no kernel device (diagnostic)".into(),
            measured: format!("{:.0} MiB/s", median(nbd)),
            peer: raw_mibs.clone(),
            ratio: median(nbd_r),
            target: Target::Info,
        });
        rows.push(Row {
            name: "(d)   same on a local qcow2 file, no daemon/NBD (diagnostic)".into(),
            measured: format!("{:.0} MiB/s", median(local)),
            peer: raw_mibs,
            ratio: median(local_r),
            target: Target::Info,
        });
    }
    Ok((rows, dropped))
}
