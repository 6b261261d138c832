//! `livedisk-bench`: the node engine's benchmarks (run by `make bench`
//! through hack/bench.sh). Prints ratios against targets; never fails on
//! a missed target, only on a broken run.

// Shared with the admin CLI; only `render` is used here.
#[allow(dead_code)]
#[path = "../../cli/table.rs"]
mod table;

mod report;
mod scenarios;
mod tools;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use livedisk_engine::{Engine, EngineConfig};

use scenarios::Config;

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
    let mut picked = vec![];
    for part in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part {
            "a" | "b" | "c" | "d" => picked.extend(part.chars()),
            other => anyhow::bail!(
                "LIVEDISK_BENCH_ONLY: unknown benchmark {other:?} (choose from a, b, c, d)"
            ),
        }
    }
    anyhow::ensure!(!picked.is_empty(), "LIVEDISK_BENCH_ONLY is empty");
    Ok(Some(picked))
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
        only: only_scenarios()?,
    })
}

async fn all(e: &Engine, c: &Config) -> Result<(Vec<report::Row>, bool)> {
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
    std::fs::create_dir_all(&c.dir).with_context(|| format!("create {}", c.dir.display()))?;
    let started = Instant::now();
    let e = Engine::open(EngineConfig {
        pool: c.dir.join("pool"),
        runtime_dir: c.dir.join("run"),
    })
    .await
    .context("starting the engine")?;
    let result = all(&e, &c).await;
    // Stop the daemon this run started and remove its files, also on error.
    let stopped = e
        .daemon()
        .signal_and_wait(libc::SIGTERM, Duration::from_secs(20))
        .await;
    drop(e);
    let removed = std::fs::remove_dir_all(&c.dir);
    let (rows, dropped) = result?;
    stopped.context("stopping the bench daemon")?;
    removed.with_context(|| format!("removing {}", c.dir.display()))?;

    println!("{}", machine_facts().await);
    println!(
        "config: scale {} (LIVEDISK_BENCH_SCALE), runs {} / heavy runs {}, {} extents; \
         page cache dropped before I/O runs: {}; total {:.0} s",
        c.scale,
        c.runs,
        c.heavy_runs,
        c.extents,
        if dropped { "yes" } else { "no (not permitted)" },
        started.elapsed().as_secs_f64()
    );
    println!("medians of the runs; ratio = engine / peer\n");
    print!("{}", report::render_rows(&rows));
    Ok(())
}
