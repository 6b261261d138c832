//! `livedisk-verifier write|verify|bench`: the checksummed writer/verifier as a tool, and the
//! test VM's disk benchmark.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use livedisk_verifier::{Ack, Writer, verify, verify_point_in_time, writer::longest_stall};

#[derive(Parser)]
#[command(about = "Checksummed block writer and verifier")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Write blocks 0..blocks cyclically, logging every acknowledged write.
    Write {
        #[arg(long)]
        path: PathBuf,
        #[arg(long, default_value_t = 1)]
        tag: u64,
        #[arg(long)]
        blocks: u64,
        /// Stop after this many writes...
        #[arg(long)]
        count: Option<u64>,
        /// ...or after this many seconds...
        #[arg(long)]
        seconds: Option<u64>,
        /// ...or once this file exists (checked between writes): how a test that cannot signal
        /// the writer (it runs in a pod) ends it cleanly.
        #[arg(long)]
        until_file: Option<PathBuf>,
        /// JSON-lines log of acknowledged writes.
        #[arg(long)]
        log: PathBuf,
    },
    /// Check every acknowledged write in the log reads back.
    Verify {
        #[arg(long)]
        path: PathBuf,
        #[arg(long, default_value_t = 1)]
        tag: u64,
        #[arg(long)]
        log: PathBuf,
        /// A point-in-time copy (a snapshot, an export of one): it must hold every write
        /// acknowledged up to this sequence number (the last ack before the cut was asked for)...
        #[arg(long, requires = "issued_after")]
        acked_before: Option<u64>,
        /// ...and nothing issued from this sequence number on (issued once the cut was done).
        #[arg(long, requires = "acked_before")]
        issued_after: Option<u64>,
    },
    /// Direct-I/O benchmark of a disk (overwrites its first `mib` MiB): prints one JSON line.
    Bench {
        #[arg(long)]
        path: PathBuf,
        /// Sequential passes over this many MiB (1 MiB requests).
        #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
        mib: u64,
        /// 4 KiB random writes, then as many reads, at depth 1.
        #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(1..))]
        ops: u64,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Write {
            path,
            tag,
            blocks,
            count,
            seconds,
            until_file,
            log,
        } => {
            use std::io::Write as _;
            let mut w = Writer::open(&path, tag).with_context(|| path.display().to_string())?;
            let mut out = std::io::BufWriter::new(std::fs::File::create(&log)?);
            let deadline = seconds.map(|s| Instant::now() + Duration::from_secs(s));
            let mut n = 0u64;
            let mut next_check = Instant::now();
            let mut stop_requested = || {
                let Some(file) = &until_file else {
                    return false;
                };
                // A stat per write would slow the writer down: every 100 ms is enough.
                if Instant::now() < next_check {
                    return false;
                }
                next_check = Instant::now() + Duration::from_millis(100);
                file.exists()
            };
            while count.is_none_or(|c| n < c)
                && deadline.is_none_or(|d| Instant::now() < d)
                && !stop_requested()
            {
                let ack = w.write_block(n % blocks.max(1))?;
                // Log after the ack, flushed, so the log never claims more
                // than what was acknowledged.
                writeln!(out, "{}", serde_json::to_string(&ack)?)?;
                out.flush()?;
                n += 1;
            }
            let (lat, gap) = longest_stall(w.log());
            println!(
                "{n} writes; longest write {:.1} ms; longest gap {:.1} ms",
                lat.as_secs_f64() * 1e3,
                gap.as_secs_f64() * 1e3
            );
        }
        Cmd::Verify {
            path,
            tag,
            log,
            acked_before,
            issued_after,
        } => {
            let text = std::fs::read_to_string(&log)?;
            let acks: Vec<Ack> = text
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(serde_json::from_str)
                .collect::<Result<_, _>>()?;
            let r = match (acked_before, issued_after) {
                (Some(before), Some(after)) => {
                    verify_point_in_time(&path, tag, &acks, before, after)?
                }
                _ => verify(&path, tag, &acks)?,
            };
            println!("{}", serde_json::to_string_pretty(&r)?);
            let (lat, gap) = longest_stall(&acks);
            println!(
                "longest write {:.1} ms; longest gap {:.1} ms",
                lat.as_secs_f64() * 1e3,
                gap.as_secs_f64() * 1e3
            );
            if !r.ok() {
                anyhow::bail!("{} blocks failed verification", r.mismatches.len());
            }
        }
        Cmd::Bench { path, mib, ops } => {
            let r = livedisk_verifier::bench::bench(&path, mib, ops)
                .with_context(|| path.display().to_string())?;
            println!("{}", serde_json::to_string(&r)?);
        }
    }
    Ok(())
}
