//! Thin wrappers over the tools the benchmark drives.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::process::{Child, Command};

/// Runs a command to completion; fails with its stderr.
pub async fn run(prog: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("running {prog}"))?;
    if !out.status.success() {
        bail!(
            "{prog} {}: {}: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Wall time of a command.
pub async fn timed(prog: &str, args: &[&str]) -> Result<Duration> {
    let t = Instant::now();
    run(prog, args).await?;
    Ok(t.elapsed())
}

/// `qemu-img bench` on a raw target (file path or NBD URI); seconds of
/// the run as qemu-img reports them.
pub async fn qemu_img_bench(target: &str, extra: &[&str]) -> Result<f64> {
    qemu_img_bench_fmt("raw", target, extra).await
}

/// `qemu-img bench` on an image of the given format.
pub async fn qemu_img_bench_fmt(fmt: &str, target: &str, extra: &[&str]) -> Result<f64> {
    let mut args = vec!["bench", "-f", fmt];
    args.extend_from_slice(extra);
    args.push(target);
    let out = run("qemu-img", &args).await?;
    parse_bench_seconds(&out).with_context(|| format!("qemu-img bench output: {out}"))
}

/// "Run completed in 1.348 seconds." → 1.348
pub fn parse_bench_seconds(out: &str) -> Option<f64> {
    out.lines()
        .find_map(|l| l.strip_prefix("Run completed in "))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// Fills `[0, bytes)` of a raw target with non-zero data (zeros would let
/// copies skip them as holes), 1 MiB at a time.
pub async fn fill(target: &str, bytes: u64) -> Result<()> {
    let count = (bytes >> 20).max(1).to_string();
    qemu_img_bench(
        target,
        &["-w", "--pattern=165", "-c", &count, "-s", "1M", "-d", "4"],
    )
    .await?;
    Ok(())
}

/// A writer that keeps writing 4 KiB blocks sequentially (wrapping) until
/// stopped: the "consumer keeps writing" of every live operation.
pub struct Writer(Child);

impl Writer {
    pub fn start(target: &str) -> Result<Self> {
        let child = Command::new("qemu-img")
            .args([
                "bench",
                "-f",
                "raw",
                "-w",
                "-c",
                "1000000000",
                "-s",
                "4096",
                "-d",
                "1",
            ])
            .arg(target)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting the writer")?;
        Ok(Self(child))
    }

    pub async fn stop(mut self) -> Result<()> {
        self.0.kill().await.context("stopping the writer")?;
        Ok(())
    }
}

/// Flushes dirty pages and drops the page cache. False where not allowed.
pub fn drop_caches() -> bool {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3\n").is_ok()
}

pub async fn sync_file(p: &Path) -> Result<()> {
    let f = std::fs::File::open(p).with_context(|| format!("open {}", p.display()))?;
    f.sync_all()
        .with_context(|| format!("fsync {}", p.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bench_output() {
        let out = "Sending 10 write requests, 4096 bytes each\nRun completed in 1.348 seconds.\n";
        assert_eq!(parse_bench_seconds(out), Some(1.348));
        assert_eq!(parse_bench_seconds("nothing"), None);
    }
}
