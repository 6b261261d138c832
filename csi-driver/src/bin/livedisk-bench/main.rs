//! `livedisk-bench`: the node engine's benchmarks (a–d, g and k, on an engine of
//! its own), the CSI driver's snapshot path through its sockets (e) and
//! DiskSnapshots at scale through the operator (f), both on the cluster
//! hack/bench.sh starts, run by `make bench` through hack/bench.sh. Prints
//! ratios against targets; never fails on a missed target, only on a broken
//! run.

// Shared with the admin CLI; only `render` is used here.
#[allow(dead_code)]
#[path = "../../cli/table.rs"]
mod table;

mod at_scale;
mod audit;
mod csi;
mod demo_latency;
mod exports;
mod merge_latency;
mod migration;
mod remote;
mod report;
mod scenarios;
mod through_csi;
mod tools;
mod vm_path;
mod watch;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use livedisk_engine::{Engine, EngineConfig};

use csi::CsiTarget;
use scenarios::Config;

/// The benchmarks, by row letter: a–d, g and k on an engine of the benchmark's own, e through the
/// driver's CSI sockets, f through the operator, h through the operator and a node's export
/// front, i and j through the operator and both nodes (e, f, h, i and j on hack/bench.sh's
/// cluster), l from `make demo`'s story on a chart cluster of real nodes that hack/bench.sh
/// starts (its latency table; see demo_latency.rs).
const ALL: [char; 12] = ['a', 'b', 'c', 'd', 'e', 'f', 'g', 'h', 'i', 'j', 'k', 'l'];
const ENGINE_ONLY: [char; 6] = ['a', 'b', 'c', 'd', 'g', 'k'];

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> Result<T> {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .map_err(|_| anyhow::anyhow!("{name}={v:?} is not valid")),
        Err(_) => Ok(default),
    }
}

/// `LIVEDISK_BENCH_ONLY=b,d` runs only those benchmarks (letters of the
/// table rows); unset runs them all.
fn only_scenarios() -> Result<Option<Vec<char>>> {
    let Ok(v) = std::env::var("LIVEDISK_BENCH_ONLY") else {
        return Ok(None);
    };
    parse_only(&v).map(Some)
}

fn parse_only(v: &str) -> Result<Vec<char>> {
    let mut picked = vec![];
    for part in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.chars().collect::<Vec<_>>()[..] {
            [letter] if ALL.contains(&letter) => picked.push(letter),
            _ => anyhow::bail!(
                "LIVEDISK_BENCH_ONLY: unknown benchmark {part:?} (choose from a to l)"
            ),
        }
    }
    anyhow::ensure!(!picked.is_empty(), "LIVEDISK_BENCH_ONLY is empty");
    Ok(picked)
}

fn config() -> Result<Config> {
    let base: PathBuf = env_or("LIVEDISK_BENCH_DIR", PathBuf::from("/var/tmp"))?;
    // Short: NBD/QMP unix socket paths are limited to 107 bytes.
    let dir = base.join(format!(
        "ldb-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    ));
    Ok(Config {
        dir,
        scale: env_or("LIVEDISK_BENCH_SCALE", 1.0)?,
        runs: env_or("LIVEDISK_BENCH_RUNS", 5usize)?.max(1),
        heavy_runs: env_or("LIVEDISK_BENCH_HEAVY_RUNS", 4usize)?.max(1),
        extents: env_or("LIVEDISK_BENCH_EXTENTS", 100_000u64)?,
        disk_snapshots: env_or("LIVEDISK_BENCH_DISK_SNAPSHOTS", 1000usize)?,
        claims: env_or("LIVEDISK_BENCH_CLAIMS", 50usize)?,
        only: only_scenarios()?,
    })
}

/// Benchmarks a–d on an engine of their own in a temporary pool (removed
/// again, also on error).
async fn on_own_engine(c: &Config) -> Result<(Vec<report::Row>, bool)> {
    std::fs::create_dir_all(&c.dir).with_context(|| format!("create {}", c.dir.display()))?;
    let e = Engine::open(EngineConfig {
        pool: c.dir.join("pool"),
        runtime_dir: c.dir.join("run"),
    })
    .await
    .context("starting the engine")?;
    let result = engine_scenarios(&e, c).await;
    // Stop the daemon this run started and remove its files, also on error.
    let stopped = e
        .daemon()
        .signal_and_wait(libc::SIGTERM, Duration::from_secs(20))
        .await;
    drop(e);
    let removed = std::fs::remove_dir_all(&c.dir);
    let found = result?;
    stopped.context("stopping the bench daemon")?;
    removed.with_context(|| format!("removing {}", c.dir.display()))?;
    Ok(found)
}

async fn engine_scenarios(e: &Engine, c: &Config) -> Result<(Vec<report::Row>, bool)> {
    let mut rows = vec![];
    let mut dropped = tools::drop_caches();
    if c.selected('a') {
        rows.extend(scenarios::snapshot_latency(e, c).await?);
    }
    if c.selected('b') {
        rows.extend(scenarios::merge_throughput(e, c).await?);
    }
    if c.selected('c') {
        rows.extend(scenarios::changed_extents(e, c).await?);
    }
    if c.selected('d') {
        let (io, d) = scenarios::attach_path(e, c).await?;
        rows.extend(io);
        dropped = d;
    }
    if c.selected('g') {
        rows.extend(merge_latency::merge_write_latency(e, c).await?);
    }
    if c.selected('k') {
        rows.extend(vm_path::vm_disk_path(e, c).await?);
    }
    Ok((rows, dropped))
}

async fn machine_facts() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let kernel = tools::run("uname", &["-r"]).await.unwrap_or_default();
    let qemu = tools::run("qemu-img", &["--version"])
        .await
        .unwrap_or_default();
    format!(
        "machine: {cores} cores, {cpu}; kernel {}; {}",
        kernel.trim(),
        qemu.lines().next().unwrap_or("qemu-img unknown")
    )
}

#[tokio::main]
async fn main() -> Result<()> {
    let c = config()?;
    // Scenario (e) needs the driver hack/bench.sh starts: find out before a–d run for minutes.
    let csi = if c.selected('e') {
        Some(CsiTarget::from_env()?.context(
            "benchmark (e) runs through the CSI driver on a local cluster: run it with \
             hack/bench.sh (make bench), which starts one, or pick a–d with LIVEDISK_BENCH_ONLY",
        )?)
    } else {
        None
    };
    let scale = if c.selected('f') {
        Some(at_scale::ScaleTarget::from_env()?.context(
            "benchmark (f) runs the operator on a local cluster: run it with hack/bench.sh \
             (make bench), which starts one",
        )?)
    } else {
        None
    };
    let exports_on = if c.selected('h') {
        let context = "benchmark (h) runs the operator and the driver on a local cluster: run it \
                       with hack/bench.sh (make bench), which starts one";
        Some((
            CsiTarget::from_env()?.context(context)?,
            at_scale::ScaleTarget::from_env()?.context(context)?,
        ))
    } else {
        None
    };
    let remote_on = if c.selected('i') {
        let context = "benchmark (i) runs the operator and the two-node driver on a local \
                       cluster: run it with hack/bench.sh (make bench), which starts one";
        Some((
            CsiTarget::from_env()?.context(context)?,
            at_scale::ScaleTarget::from_env()?.context(context)?,
        ))
    } else {
        None
    };
    let migration_on = if c.selected('j') {
        let context = "benchmark (j) runs the operator and the two-node driver on a local \
                       cluster: run it with hack/bench.sh (make bench), which starts one";
        Some((
            CsiTarget::from_env()?.context(context)?,
            at_scale::ScaleTarget::from_env()?.context(context)?,
        ))
    } else {
        None
    };
    let started = Instant::now();
    let (mut rows, mut dropped) = (vec![], None);
    if ENGINE_ONLY.iter().any(|&s| c.selected(s)) {
        let (found, d) = on_own_engine(&c).await?;
        (rows, dropped) = (found, Some(d));
    }
    if let Some(target) = csi {
        rows.extend(through_csi::through_csi(target, &c).await?);
    }
    if let Some(target) = scale {
        rows.extend(at_scale::disk_snapshots_at_scale(target, &c).await?);
    }
    if let Some((csi, operator)) = exports_on {
        rows.extend(exports::exports(csi, operator, &c).await?);
    }
    if let Some((csi, operator)) = remote_on {
        rows.extend(remote::remote_attach(csi, operator, &c).await?);
    }
    if let Some((csi, operator)) = migration_on {
        rows.extend(migration::migration(csi, operator, &c).await?);
    }
    if c.selected('l') {
        rows.extend(demo_latency::demo_latency()?);
    }

    println!("{}", machine_facts().await);
    println!(
        "config: scale {} (LIVEDISK_BENCH_SCALE), runs {} / heavy runs {}, {} extents, \
         {} DiskSnapshots of {} claims; page cache dropped before I/O runs: {}; total {:.0} s",
        c.scale,
        c.runs,
        c.heavy_runs,
        c.extents,
        c.disk_snapshots,
        c.claims,
        match dropped {
            Some(true) => "yes",
            Some(false) => "no (not permitted)",
            None => "n/a",
        },
        started.elapsed().as_secs_f64()
    );
    println!("medians of the runs; ratio = engine / peer\n");
    print!("{}", report::render_rows(&rows));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn benchmarks_are_picked_by_letter() {
        assert_eq!(parse_only("e").unwrap(), ['e']);
        assert_eq!(parse_only(" b, d ,e").unwrap(), ['b', 'd', 'e']);
        assert_eq!(parse_only("f,g").unwrap(), ['f', 'g']);
        assert_eq!(parse_only("h,i").unwrap(), ['h', 'i']);
        assert_eq!(parse_only("i,j").unwrap(), ['i', 'j']);
        assert_eq!(parse_only("k,l").unwrap(), ['k', 'l']);
        assert!(parse_only("m").is_err());
        assert!(parse_only("ab").is_err());
        assert!(parse_only(" , ").is_err());
    }
}
