//! The verifier: reads back what the writer's log says must be there.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde::Serialize;

use crate::block::{BLOCK_SIZE, BlockError, decode};
use crate::writer::Ack;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Mismatch {
    pub block: u64,
    /// Sequence number the block must carry at least (0: none required).
    pub expected_seq: u64,
    pub found: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub blocks_checked: usize,
    pub mismatches: Vec<Mismatch>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.mismatches.is_empty()
    }
}

fn latest(acks: &[Ack], upto: u64) -> BTreeMap<u64, u64> {
    let mut m = BTreeMap::new();
    for a in acks.iter().filter(|a| a.seq <= upto) {
        let e = m.entry(a.block).or_insert(0);
        *e = (*e).max(a.seq);
    }
    m
}

fn read_block(f: &File, block: u64) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; BLOCK_SIZE];
    f.read_exact_at(&mut buf, block * BLOCK_SIZE as u64)?;
    Ok(buf)
}

/// Every block's latest acknowledged write must read back intact. A newer
/// write may be there instead (issued but not yet acknowledged when the log
/// was taken), but never an older one.
pub fn verify(path: &Path, tag: u64, acks: &[Ack]) -> io::Result<Report> {
    verify_point_in_time(path, tag, acks, u64::MAX, u64::MAX)
}

/// Checks a point-in-time copy (a snapshot): it must hold every write
/// acknowledged up to `acked_before` (the last ack before the snapshot call)
/// and nothing issued at or after `issued_after` (the first sequence number
/// issued once the call had returned).
pub fn verify_point_in_time(
    path: &Path,
    tag: u64,
    acks: &[Ack],
    acked_before: u64,
    issued_after: u64,
) -> io::Result<Report> {
    let f = File::open(path)?;
    let must = latest(acks, acked_before);
    let touched: BTreeMap<u64, u64> = latest(acks, u64::MAX);
    let mut report = Report::default();
    for &block in touched.keys() {
        let expected_seq = must.get(&block).copied().unwrap_or(0);
        report.blocks_checked += 1;
        let buf = read_block(&f, block)?;
        let found = match decode(&buf) {
            Ok(h) if h.tag != tag || h.block != block => Some(format!(
                "misplaced block (tag {}, index {})",
                h.tag, h.block
            )),
            Ok(h) if h.seq < expected_seq => Some(format!("stale seq {}", h.seq)),
            Ok(h) if h.seq >= issued_after => Some(format!("too new: seq {}", h.seq)),
            Ok(_) => None,
            Err(BlockError::Zero) if expected_seq == 0 => None,
            Err(e) => Some(e.to_string()),
        };
        if let Some(found) = found {
            report.mismatches.push(Mismatch {
                block,
                expected_seq,
                found,
            });
        }
    }
    Ok(report)
}
