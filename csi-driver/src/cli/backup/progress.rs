//! Progress on stderr (at most every 2 s) and the one-line JSON summary on stdout.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

const EVERY: Duration = Duration::from_secs(2);
const MIB: f64 = (1u64 << 20) as f64;

/// Counters the workers add to and the reporter reads.
pub struct Progress {
    label: &'static str,
    total: u64,
    started: Instant,
    /// Bytes of the work done (read from the front or the backup files).
    pub done: AtomicU64,
    pub written: AtomicU64,
}

impl Progress {
    pub fn new(label: &'static str, total: u64) -> Arc<Self> {
        Arc::new(Self {
            label,
            total,
            started: Instant::now(),
            done: AtomicU64::new(0),
            written: AtomicU64::new(0),
        })
    }

    pub fn add(&self, done: u64, written: u64) {
        self.done.fetch_add(done, Ordering::Relaxed);
        self.written.fetch_add(written, Ordering::Relaxed);
    }

    /// Bytes of the work done so far.
    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    /// Prints a line every 2 s until the returned guard is dropped.
    pub fn report(self: &Arc<Self>) -> Reporter {
        let progress = self.clone();
        let task = tokio::spawn(async move {
            let mut last = (Instant::now(), 0u64);
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + EVERY, EVERY);
            loop {
                tick.tick().await;
                let done = progress.done.load(Ordering::Relaxed);
                let rate = (done - last.1) as f64 / last.0.elapsed().as_secs_f64().max(1e-3);
                last = (Instant::now(), done);
                eprintln!("{}", line(progress.label, done, progress.total, rate));
            }
        });
        Reporter(task)
    }

    /// The summary of the finished command.
    pub fn summary(&self, command: &'static str) -> Summary {
        Summary {
            command,
            bytes_read: self.done.load(Ordering::Relaxed),
            bytes_written: self.written.load(Ordering::Relaxed),
            seconds: (self.started.elapsed().as_secs_f64() * 1000.0).round() / 1000.0,
        }
    }
}

/// Stops the progress lines when dropped (the command ended, well or not).
pub struct Reporter(tokio::task::JoinHandle<()>);

impl Drop for Reporter {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What the command did, printed as one JSON line on stdout.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    pub command: &'static str,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub seconds: f64,
}

/// Pure: `LABEL: 1.5 GiB of 10.0 GiB (15%), 120.3 MiB/s`.
pub fn line(label: &str, done: u64, total: u64, bytes_per_second: f64) -> String {
    let percent = if total == 0 {
        100
    } else {
        (u128::from(done) * 100 / u128::from(total)) as u64
    };
    format!(
        "{label}: {} of {} ({percent}%), {:.1} MiB/s",
        human(done),
        human(total),
        bytes_per_second / MIB
    )
}

/// Pure: a byte count in binary units with one decimal.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_show_done_total_percent_and_rate() {
        assert_eq!(
            line("backup full", 3 << 29, 10 << 30, 120.25 * MIB),
            "backup full: 1.5 GiB of 10.0 GiB (15%), 120.2 MiB/s"
        );
        assert_eq!(
            line("restore", 0, 0, 0.0),
            "restore: 0 B of 0 B (100%), 0.0 MiB/s"
        );
        assert_eq!(human(1023), "1023 B");
        assert_eq!(human(4 << 20), "4.0 MiB");
    }

    #[test]
    fn summaries_are_camel_case_json() {
        let s = Summary {
            command: "backup full",
            bytes_read: 1,
            bytes_written: 2,
            seconds: 0.5,
        };
        assert_eq!(
            serde_json::to_string(&s).unwrap(),
            r#"{"command":"backup full","bytesRead":1,"bytesWritten":2,"seconds":0.5}"#
        );
    }
}
