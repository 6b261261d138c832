//! The writer: one block at a time, each acknowledged by an `O_DSYNC` write.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::block::{BLOCK_SIZE, Header, encode};

/// One acknowledged write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    pub seq: u64,
    pub block: u64,
    /// Nanoseconds from the writer's start to the acknowledgement.
    pub acked_ns: u64,
    /// How long the write took.
    pub latency_ns: u64,
}

pub struct Writer {
    file: File,
    tag: u64,
    next_seq: u64,
    start: Instant,
    log: Vec<Ack>,
}

impl Writer {
    /// Opens an existing file or block device for synchronous writes.
    pub fn open(path: &Path, tag: u64) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DSYNC)
            .open(path)?;
        Ok(Self {
            file,
            tag,
            next_seq: 1,
            start: Instant::now(),
            log: vec![],
        })
    }

    /// Continues a global sequence (several volumes written alternately).
    pub fn with_next_seq(mut self, seq: u64) -> Self {
        self.next_seq = seq;
        self
    }

    /// Moves the sequence on, for one global sequence across several writers.
    pub fn set_next_seq(&mut self, seq: u64) {
        self.next_seq = seq;
    }

    /// The sequence number the next write will carry.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Writes `block`; returns once the write is durable.
    pub fn write_block(&mut self, block: u64) -> io::Result<Ack> {
        let seq = self.next_seq;
        self.next_seq += 1;
        let buf = encode(&Header {
            tag: self.tag,
            seq,
            block,
        });
        let t0 = Instant::now();
        self.file.write_all_at(&buf, block * BLOCK_SIZE as u64)?;
        let ack = Ack {
            seq,
            block,
            acked_ns: self.start.elapsed().as_nanos() as u64,
            latency_ns: t0.elapsed().as_nanos() as u64,
        };
        self.log.push(ack);
        Ok(ack)
    }

    pub fn log(&self) -> &[Ack] {
        &self.log
    }

    pub fn into_log(self) -> Vec<Ack> {
        self.log
    }
}

/// Longest time the writer waited for one write, and the longest gap between
/// two acknowledgements (which also counts time the writer was not scheduled).
pub fn longest_stall(log: &[Ack]) -> (Duration, Duration) {
    let lat = log.iter().map(|a| a.latency_ns).max().unwrap_or(0);
    let gap = log
        .windows(2)
        .map(|w| w[1].acked_ns.saturating_sub(w[0].acked_ns))
        .max()
        .unwrap_or(0);
    (Duration::from_nanos(lat), Duration::from_nanos(gap))
}

/// Which blocks a background writer touches.
#[derive(Debug, Clone, Copy)]
pub enum Pattern {
    /// Cycles through `first..first + count`.
    Sequential { first: u64, count: u64 },
}

/// A writer running on its own thread until stopped; the test thread reads
/// its progress (last acknowledged / next issued sequence) at any time.
pub struct BackgroundWriter {
    stop: Arc<AtomicBool>,
    last_acked: Arc<AtomicU64>,
    next_issue: Arc<AtomicU64>,
    handle: Option<JoinHandle<(Vec<Ack>, Option<io::Error>)>>,
}

impl Drop for BackgroundWriter {
    /// A writer dropped without `stop` (a failing test) stops writing, so
    /// the file it holds open can be unmounted. Not joined: a write stuck on
    /// a dead mount must not hang the drop.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

impl BackgroundWriter {
    pub fn start(mut w: Writer, pattern: Pattern, pause: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let last_acked = Arc::new(AtomicU64::new(0));
        let next_issue = Arc::new(AtomicU64::new(w.next_seq()));
        let (s, la, ni) = (stop.clone(), last_acked.clone(), next_issue.clone());
        let handle = std::thread::spawn(move || {
            let Pattern::Sequential { first, count } = pattern;
            let mut i = 0u64;
            while !s.load(Ordering::SeqCst) {
                // Publish the seq *before* issuing so "next_issue" is an upper
                // bound of anything that may have reached the disk.
                ni.store(w.next_seq() + 1, Ordering::SeqCst);
                match w.write_block(first + i % count.max(1)) {
                    Ok(ack) => la.store(ack.seq, Ordering::SeqCst),
                    // Keep the log: what was acknowledged before the error
                    // must still read back (fault tests).
                    Err(e) => return (w.into_log(), Some(e)),
                }
                i += 1;
                if !pause.is_zero() {
                    std::thread::sleep(pause);
                }
            }
            (w.into_log(), None)
        });
        Self {
            stop,
            last_acked,
            next_issue,
            handle: Some(handle),
        }
    }

    /// Highest sequence number acknowledged so far.
    pub fn last_acked(&self) -> u64 {
        self.last_acked.load(Ordering::SeqCst)
    }

    /// No write with a sequence number >= this has been issued yet.
    pub fn issued_bound(&self) -> u64 {
        self.next_issue.load(Ordering::SeqCst)
    }

    /// Stops the writer; any write error is an error.
    pub fn stop(self) -> io::Result<Vec<Ack>> {
        match self.stop_with_error()? {
            (log, None) => Ok(log),
            (_, Some(e)) => Err(e),
        }
    }

    /// Stops the writer and returns its log of acknowledged writes together
    /// with the error that stopped it early, if any (a daemon killed under
    /// it): the log up to the error still has to read back.
    pub fn stop_with_error(mut self) -> io::Result<(Vec<Ack>, Option<io::Error>)> {
        self.stop.store(true, Ordering::SeqCst);
        self.handle
            .take()
            .ok_or_else(|| io::Error::other("writer already stopped"))?
            .join()
            .map_err(|_| io::Error::other("writer thread panicked"))
    }

    /// Whether the writer thread has ended (stopped or failed).
    pub fn finished(&self) -> bool {
        self.handle.as_ref().is_none_or(JoinHandle::is_finished)
    }
}
