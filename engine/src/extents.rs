//! Pure extent arithmetic for changed-block tracking.
//!
//! Every list that leaves this module is ascending and non-overlapping, with
//! adjacent extents coalesced, which is what the CSI SnapshotMetadata service
//! promises its callers.

use serde::{Deserialize, Serialize};

/// A byte range `[offset, offset + length)` of a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
}

impl Extent {
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.length)
    }
}

/// Sorts, drops empty extents and coalesces overlapping or touching ones.
pub fn normalize(mut v: Vec<Extent>) -> Vec<Extent> {
    v.retain(|e| e.length > 0);
    v.sort_unstable();
    let mut out: Vec<Extent> = Vec::with_capacity(v.len());
    for e in v {
        match out.last_mut() {
            Some(last) if e.offset <= last.end() => {
                let end = last.end().max(e.end());
                last.length = end - last.offset;
            }
            _ => out.push(e),
        }
    }
    out
}

/// Union of several extent lists.
pub fn union<'a>(lists: impl IntoIterator<Item = &'a [Extent]>) -> Vec<Extent> {
    normalize(lists.into_iter().flatten().copied().collect())
}

/// One page of a normalized list: extents that end after `starting_offset`,
/// the first one clipped to start there, at most `max` of them. Resuming with
/// `starting_offset = last.end()` walks the whole list exactly once.
pub fn page(list: &[Extent], starting_offset: u64, max: usize) -> Vec<Extent> {
    // Binary search keeps a 100k-extent query cheap for late pages.
    let first = list.partition_point(|e| e.end() <= starting_offset);
    list[first..]
        .iter()
        .take(max)
        .map(|e| {
            let offset = e.offset.max(starting_offset);
            Extent {
                offset,
                length: e.end() - offset,
            }
        })
        .collect()
}

/// Total bytes covered by a normalized list.
pub fn total_bytes(list: &[Extent]) -> u64 {
    list.iter().map(|e| e.length).sum()
}

/// One entry of `qemu-img map --output=json`.
#[derive(Debug, Deserialize)]
struct MapEntry {
    start: u64,
    length: u64,
    depth: u64,
    /// Allocated at this depth (data or an explicit zero cluster). A zeroed or
    /// discarded cluster is still a change relative to the backing layer.
    present: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("unparsable qemu-img map output: {0}")]
pub struct MapParseError(#[from] serde_json::Error);

/// Extents allocated in the top layer itself (depth 0) from `qemu-img map`
/// JSON output. Deeper entries belong to backing layers and are not changes
/// made in this layer.
pub fn parse_qemu_img_map(json: &str) -> Result<Vec<Extent>, MapParseError> {
    let entries: Vec<MapEntry> = serde_json::from_str(json)?;
    Ok(normalize(
        entries
            .into_iter()
            .filter(|e| e.depth == 0 && e.present)
            .map(|e| Extent {
                offset: e.start,
                length: e.length,
            })
            .collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn x(offset: u64, length: u64) -> Extent {
        Extent { offset, length }
    }

    #[test]
    fn normalize_merges_and_sorts() {
        let n = normalize(vec![
            x(100, 10),
            x(0, 10),
            x(5, 10),
            x(15, 0),
            x(15, 5),
            x(200, 1),
        ]);
        assert_eq!(n, vec![x(0, 20), x(100, 10), x(200, 1)]);
    }

    #[test]
    fn union_of_records() {
        let a = vec![x(0, 64), x(256, 64)];
        let b = vec![x(64, 64), x(1024, 64)];
        assert_eq!(
            union([a.as_slice(), b.as_slice()]),
            vec![x(0, 128), x(256, 64), x(1024, 64)]
        );
    }

    #[test]
    fn paging_resumes_anywhere() {
        let l = vec![x(0, 100), x(200, 100), x(400, 100)];
        assert_eq!(page(&l, 0, 2), vec![x(0, 100), x(200, 100)]);
        assert_eq!(page(&l, 300, 2), vec![x(400, 100)]);
        assert_eq!(page(&l, 250, 10), vec![x(250, 50), x(400, 100)]);
        assert_eq!(page(&l, 500, 10), vec![]);
        // Walking page by page yields the list once.
        let mut seen = vec![];
        let mut off = 0;
        loop {
            let p = page(&l, off, 1);
            let Some(last) = p.last() else { break };
            off = last.end();
            seen.extend(p);
        }
        assert_eq!(seen, l);
    }

    #[test]
    fn parses_map_top_layer_only() {
        let json = r#"[{ "start": 0, "length": 65536, "depth": 0, "present": true, "zero": false, "data": true, "offset": 327680},
{ "start": 65536, "length": 983040, "depth": 1, "present": true, "zero": false, "data": true},
{ "start": 1048576, "length": 65536, "depth": 0, "present": true, "zero": true, "data": false},
{ "start": 1114112, "length": 65994752, "depth": 0, "present": false, "zero": true, "data": false}]"#;
        assert_eq!(
            parse_qemu_img_map(json).unwrap(),
            vec![x(0, 65536), x(1048576, 65536)]
        );
    }
}
