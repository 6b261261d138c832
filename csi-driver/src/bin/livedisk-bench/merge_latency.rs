//! (g) What a consumer's writes feel of a rate-limited merge: 4 KiB writes at random offsets,
//! `O_DIRECT | O_DSYNC` (each one durable before the next is issued, one in flight), on the
//! consumer's device (the CSI node service's attach path: a loop device over an nbdfuse file of
//! the daemon's export), each timed; first with nothing else running, then while a snapshot
//! deletion of the same volume merges at a bandwidth limit (`Engine::delete_snapshot` with a
//! speed, the call the node agent makes for a class's `mergeBandwidthLimit`).

use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use livedisk_engine::{Engine, SnapshotId};

use crate::report::{Row, Target, ms, percentile};
use crate::scenarios::{Config, ConsumerDevice, merge_chain};
use crate::tools::{drop_caches, fill};

const MIB: u64 = 1 << 20;
const BLOCK: usize = 4096;
/// The merge's bandwidth limit: slow enough that a few hundred MiB keep it running for the
/// whole sample.
pub const LIMIT: u64 = 16 * MIB;

fn progress(msg: &str) {
    eprintln!("bench: (g) {msg}");
}

/// One sample: when each write was issued and how long it took.
type Sample = Vec<(Instant, Duration)>;

/// Latencies in seconds of the writes issued in `[from, to)`.
pub fn issued_between(sample: &[(Instant, Duration)], from: Instant, to: Instant) -> Vec<f64> {
    sample
        .iter()
        .filter(|(at, _)| *at >= from && *at < to)
        .map(|(_, d)| d.as_secs_f64())
        .collect()
}

/// xorshift64: a cheap, reproducible scatter of offsets (no statistical needs here).
pub fn next_block(state: &mut u64, blocks: u64) -> u64 {
    let mut x = *state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *state = x;
    x % blocks
}

/// Writes one 4 KiB block at a time to `device` at random block offsets below `span` until
/// `stop`, timing each write.
fn write_until(device: &Path, span: u64, stop: &AtomicBool) -> Result<Sample> {
    let f = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT | libc::O_DSYNC)
        .open(device)
        .with_context(|| format!("opening {} with O_DIRECT|O_DSYNC", device.display()))?;
    // O_DIRECT wants a buffer aligned to the logical block size: a 4 KiB-aligned window of a
    // larger allocation.
    let mut backing = vec![0x5au8; 2 * BLOCK];
    let skew = backing.as_ptr().align_offset(BLOCK);
    let buf = &mut backing[skew..skew + BLOCK];
    let blocks = span / BLOCK as u64;
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut sample = Vec::with_capacity(1 << 16);
    while !stop.load(Ordering::Relaxed) {
        let offset = next_block(&mut state, blocks) * BLOCK as u64;
        buf[0] = buf[0].wrapping_add(1);
        let at = Instant::now();
        f.write_all_at(buf, offset)
            .with_context(|| format!("writing at {offset}"))?;
        sample.push((at, at.elapsed()));
    }
    Ok(sample)
}

/// A writer on its own thread (blocking I/O), until stopped.
struct Writer {
    stop: Arc<AtomicBool>,
    thread: tokio::task::JoinHandle<Result<Sample>>,
}

impl Writer {
    fn start(device: PathBuf, span: u64) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = tokio::task::spawn_blocking(move || write_until(&device, span, &flag));
        Self { stop, thread }
    }

    async fn stop(self) -> Result<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.await.context("the writer thread")?
    }
}

/// Latencies of the writes of `duration` with nothing else running, seconds.
async fn idle_sample(device: &Path, span: u64, duration: Duration) -> Result<Vec<f64>> {
    let w = Writer::start(device.to_path_buf(), span);
    tokio::time::sleep(duration).await;
    Ok(w.stop()
        .await?
        .iter()
        .map(|(_, d)| d.as_secs_f64())
        .collect())
}

/// p50, p99 and max of a sample, seconds.
fn quantiles(v: &[f64]) -> [f64; 3] {
    [percentile(v, 0.50), percentile(v, 0.99), percentile(v, 1.0)]
}

/// What (g) measured, seconds.
#[derive(Debug, Clone, PartialEq)]
pub struct Measured {
    /// The merged layer, bytes.
    pub layer: u64,
    /// p50, p99, max with nothing else running, and during the limited merge.
    pub idle: [f64; 3],
    pub merging: [f64; 3],
    pub idle_writes: usize,
    pub merging_writes: usize,
    /// Wall time of the limited merge.
    pub merge_secs: f64,
}

pub fn rows(m: &Measured) -> Vec<Row> {
    let mib = m.layer / MIB;
    let limit = LIMIT / MIB;
    let mut rows: Vec<Row> = ["p50", "p99", "max"]
        .iter()
        .enumerate()
        .map(|(i, q)| Row {
            name: format!(
                "(g) 4 KiB random write, O_DIRECT|O_DSYNC, {q}: merge at {limit} MiB/s vs none"
            ),
            measured: ms(m.merging[i]),
            peer: ms(m.idle[i]),
            ratio: m.merging[i] / m.idle[i],
            target: Target::Info,
        })
        .collect();
    rows.push(Row {
        name: format!(
            "(g)   the merge of {mib} MiB at {limit} MiB/s; writes timed during it / idle"
        ),
        measured: format!("{:.1} s", m.merge_secs),
        peer: format!("{} / {}", m.merging_writes, m.idle_writes),
        ratio: f64::NAN,
        target: Target::Info,
    });
    rows
}

/// (g) on the benchmark's engine: a chain whose older layer (`256 MiB` x scale) is merged at
/// `LIMIT`, its active layer filled, the consumer device attached as the node attaches it.
pub async fn merge_write_latency(e: &Engine, c: &Config) -> Result<Vec<Row>> {
    let layer = c.bytes(256 * MIB);
    progress(&format!("a chain of two {} MiB layers", layer / MIB));
    let (vol, export, older) = merge_chain(e, layer).await?;
    // Every cluster of the active layer allocated before either sample: otherwise the first
    // sample pays for allocating the clusters the second one finds allocated.
    progress("filling the active layer");
    fill(&export.uri(), 2 * layer).await?;
    let device = ConsumerDevice::attach(e, &vol).await?;
    let measured = measure(e, &device.path, 2 * layer, layer, &older).await;
    device.release(e, &vol).await?;
    Ok(rows(&measured?))
}

async fn measure(
    e: &Engine,
    device: &Path,
    span: u64,
    layer: u64,
    older: &SnapshotId,
) -> Result<Measured> {
    // As long as the merge is expected to run, half before it and half after, so that neither
    // what the fill left to write back nor what the merge leaves weighs on one side only.
    let half = Duration::from_secs_f64(layer as f64 / LIMIT as f64 / 2.0);
    drop_caches();
    progress(&format!(
        "idle: {:.0} s of writes on {}",
        half.as_secs_f64(),
        device.display()
    ));
    let mut idle = idle_sample(device, span, half).await?;

    progress(&format!(
        "the same while the older layer merges at {} MiB/s",
        LIMIT / MIB
    ));
    let w = Writer::start(device.to_path_buf(), span);
    // The writer is writing before the merge starts.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let from = Instant::now();
    let merged = e.delete_snapshot(older, Some(LIMIT)).await;
    let to = Instant::now();
    let sample = w.stop().await?;
    merged.context("the limited merge")?;
    e.reclaimed().await;
    progress(&format!("idle again: {:.0} s", half.as_secs_f64()));
    idle.extend(idle_sample(device, span, half).await?);
    let merging = issued_between(&sample, from, to);
    ensure!(
        !idle.is_empty() && !merging.is_empty(),
        "no writes timed ({} idle, {} during the merge)",
        idle.len(),
        merging.len()
    );
    let m = Measured {
        layer,
        idle: quantiles(&idle),
        merging: quantiles(&merging),
        idle_writes: idle.len(),
        merging_writes: merging.len(),
        merge_secs: (to - from).as_secs_f64(),
    };
    progress(&format!(
        "idle p50/p99/max {} / {} / {} ({} writes); merging {} / {} / {} ({} writes, {:.1} s)",
        ms(m.idle[0]),
        ms(m.idle[1]),
        ms(m.idle[2]),
        m.idle_writes,
        ms(m.merging[0]),
        ms(m.merging[1]),
        ms(m.merging[2]),
        m.merging_writes,
        m.merge_secs
    ));
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_writes_issued_during_the_merge_count() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let d = Duration::from_millis;
        let sample = [
            (at(0), d(1)),
            (at(10), d(2)),
            (at(20), d(3)),
            (at(30), d(4)),
        ];
        assert_eq!(issued_between(&sample, at(10), at(30)), [0.002, 0.003]);
    }

    #[test]
    fn offsets_stay_in_the_span_and_scatter() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let blocks: Vec<u64> = (0..1000).map(|_| next_block(&mut state, 131_072)).collect();
        assert!(blocks.iter().all(|&b| b < 131_072));
        let mut distinct = blocks.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert!(distinct.len() > 990, "{} distinct", distinct.len());
    }

    #[test]
    fn rows_set_the_merge_against_no_merge() {
        let m = Measured {
            layer: 256 * MIB,
            idle: [0.001, 0.004, 0.010],
            merging: [0.002, 0.020, 0.100],
            idle_writes: 5000,
            merging_writes: 3000,
            merge_secs: 16.2,
        };
        let r = rows(&m);
        assert_eq!(r.len(), 4);
        assert!(r[0].name.contains("p50") && r[0].name.contains("16 MiB/s"));
        assert_eq!(r[1].ratio, 5.0);
        assert_eq!(r[2].measured, "100.0 ms");
        assert_eq!(r[3].peer, "3000 / 5000");
    }
}
