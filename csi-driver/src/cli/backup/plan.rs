//! Pure decisions about bytes: which ranges to read, whether an answer's range is the one asked
//! for, and which parts of a buffer are worth writing.

use serde::{Deserialize, Serialize};

/// A byte range of the image, `[offset, offset + length)`, as the front's extent map and the
/// manifests spell it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
}

impl Extent {
    pub fn new(offset: u64, length: u64) -> Self {
        Self { offset, length }
    }

    pub fn end(&self) -> u64 {
        self.offset + self.length
    }

    /// The `Range` header value that asks for exactly this extent (inclusive end).
    pub fn range_header(&self) -> String {
        format!("bytes={}-{}", self.offset, self.end() - 1)
    }
}

/// The sum of the extents' lengths.
pub fn total(extents: &[Extent]) -> u64 {
    extents.iter().map(|e| e.length).sum()
}

/// The whole image of `size` bytes in pieces of at most `chunk` bytes.
pub fn whole(size: u64, chunk: u64) -> Vec<Extent> {
    if size == 0 {
        return Vec::new();
    }
    split(&[Extent::new(0, size)], chunk)
}

/// Each extent cut into pieces of at most `chunk` bytes, in order; no byte added or lost.
pub fn split(extents: &[Extent], chunk: u64) -> Vec<Extent> {
    let chunk = chunk.max(1);
    let mut out = Vec::new();
    for e in extents {
        let mut at = e.offset;
        while at < e.end() {
            let len = chunk.min(e.end() - at);
            out.push(Extent::new(at, len));
            at += len;
        }
    }
    out
}

/// Touching extents joined, so that two neighbours cost one request; gaps are kept, so nothing
/// outside the map is ever read. The input must have passed [`check_extents`].
pub fn coalesce(extents: &[Extent]) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::with_capacity(extents.len());
    for e in extents {
        match out.last_mut() {
            Some(last) if last.end() == e.offset => last.length += e.length,
            _ => out.push(*e),
        }
    }
    out
}

/// Checks an extent map against the promise of the interface: non-empty extents, sorted,
/// non-overlapping, inside the image. A map that breaks it would be restored wrongly, so it is
/// refused rather than repaired.
pub fn check_extents(extents: &[Extent], size: u64) -> Result<(), String> {
    let mut previous_end = 0u64;
    for (i, e) in extents.iter().enumerate() {
        if e.length == 0 {
            return Err(format!("extent {i} at offset {} is empty", e.offset));
        }
        let end = e
            .offset
            .checked_add(e.length)
            .ok_or_else(|| format!("extent {i} at offset {} overflows", e.offset))?;
        if end > size {
            return Err(format!(
                "extent {i} ({}+{}) ends after the {size}-byte image",
                e.offset, e.length
            ));
        }
        if i > 0 && e.offset < previous_end {
            return Err(format!(
                "extent {i} at offset {} overlaps or precedes the one before it (which ends at {previous_end})",
                e.offset
            ));
        }
        previous_end = end;
    }
    Ok(())
}

/// A `Content-Range: bytes A-B/SIZE` header: the inclusive range and the image size.
#[derive(Debug, PartialEq, Eq)]
pub struct ContentRange {
    pub first: u64,
    pub last: u64,
    pub size: u64,
}

/// Parses a `Content-Range` value; `*` sizes and unsatisfied forms are errors, because a 206
/// answer to one range must carry both.
pub fn parse_content_range(value: &str) -> Result<ContentRange, String> {
    let bad = || format!("Content-Range {value:?} is not bytes A-B/SIZE");
    let spec = value.trim().strip_prefix("bytes ").ok_or_else(bad)?;
    let (range, size) = spec.split_once('/').ok_or_else(bad)?;
    let (first, last) = range.split_once('-').ok_or_else(bad)?;
    let number = |s: &str| s.trim().parse::<u64>().map_err(|_| bad());
    let parsed = ContentRange {
        first: number(first)?,
        last: number(last)?,
        size: number(size)?,
    };
    if parsed.last < parsed.first {
        return Err(bad());
    }
    Ok(parsed)
}

/// Checks that a 206 answer carries exactly the range asked for, of an image of the expected
/// size (a front that serves another range, or an image whose size changed, is not resumed).
pub fn check_answer(asked: Extent, size: u64, got: &ContentRange) -> Result<(), String> {
    if got.size != size {
        return Err(format!(
            "the image is now {} bytes, it was {size} when the backup started",
            got.size
        ));
    }
    if got.first != asked.offset || got.last + 1 != asked.end() {
        return Err(format!(
            "asked for bytes {}-{}, got {}-{}",
            asked.offset,
            asked.end() - 1,
            got.first,
            got.last
        ));
    }
    Ok(())
}

/// Whether every byte of `buf` is zero; compares 64-byte blocks at once so it runs at memory
/// speed on multi-megabyte chunks.
pub fn is_zero(buf: &[u8]) -> bool {
    let mut blocks = buf.chunks_exact(64);
    let blocks_zero = blocks
        .by_ref()
        .all(|b| b.iter().fold(0u8, |acc, &x| acc | x) == 0);
    blocks_zero && blocks.remainder().iter().all(|&b| b == 0)
}

/// The runs of `buf` (offset, length) that hold a non-zero byte, in `granule`-sized steps: what
/// must be written to a file that reads zeros everywhere else (a new sparse file, or a target
/// the user says is zeroed). All-zero granules are left as holes.
pub fn data_runs(buf: &[u8], granule: usize) -> Vec<(usize, usize)> {
    let granule = granule.max(1);
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (i, piece) in buf.chunks(granule).enumerate() {
        if is_zero(piece) {
            continue;
        }
        let at = i * granule;
        match runs.last_mut() {
            Some((start, len)) if *start + *len == at => *len += piece.len(),
            _ => runs.push((at, piece.len())),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(offset: u64, length: u64) -> Extent {
        Extent::new(offset, length)
    }

    #[test]
    fn whole_images_split_into_chunks_with_a_short_tail() {
        assert_eq!(whole(10, 4), vec![e(0, 4), e(4, 4), e(8, 2)]);
        assert_eq!(whole(8, 4), vec![e(0, 4), e(4, 4)]);
        assert_eq!(whole(0, 4), vec![]);
        assert_eq!(whole(3, 4), vec![e(0, 3)]);
    }

    #[test]
    fn splitting_keeps_every_byte_and_no_other() {
        let extents = [e(0, 5), e(10, 1), e(20, 8)];
        let pieces = split(&extents, 4);
        assert_eq!(pieces, vec![e(0, 4), e(4, 1), e(10, 1), e(20, 4), e(24, 4)]);
        assert_eq!(total(&pieces), total(&extents));
    }

    #[test]
    fn coalescing_joins_neighbours_and_keeps_gaps() {
        let joined = coalesce(&[e(0, 4), e(4, 4), e(9, 1), e(10, 2)]);
        assert_eq!(joined, vec![e(0, 8), e(9, 3)]);
        assert_eq!(coalesce(&[]), vec![]);
    }

    #[test]
    fn extent_maps_must_be_sorted_disjoint_and_inside() {
        assert!(check_extents(&[e(0, 4), e(4, 4), e(10, 6)], 16).is_ok());
        assert!(check_extents(&[], 0).is_ok());
        assert!(check_extents(&[e(0, 0)], 16).unwrap_err().contains("empty"));
        assert!(
            check_extents(&[e(8, 4), e(0, 4)], 16)
                .unwrap_err()
                .contains("overlaps")
        );
        assert!(
            check_extents(&[e(0, 8), e(4, 8)], 16)
                .unwrap_err()
                .contains("overlaps")
        );
        assert!(
            check_extents(&[e(12, 8)], 16)
                .unwrap_err()
                .contains("ends after")
        );
        assert!(
            check_extents(&[e(u64::MAX, 2)], 16)
                .unwrap_err()
                .contains("overflows")
        );
    }

    #[test]
    fn content_ranges_parse_and_must_match_the_ask() {
        let got = parse_content_range("bytes 4096-8191/1048576").unwrap();
        assert_eq!(
            got,
            ContentRange {
                first: 4096,
                last: 8191,
                size: 1048576
            }
        );
        assert!(check_answer(e(4096, 4096), 1048576, &got).is_ok());
        assert!(check_answer(e(4096, 4097), 1048576, &got).is_err());
        assert!(
            check_answer(e(4096, 4096), 2048, &got)
                .unwrap_err()
                .contains("now")
        );
        for bad in [
            "bytes */100",
            "bytes 5-4/100",
            "items 0-1/2",
            "bytes 0-1",
            "bytes a-b/c",
        ] {
            assert!(parse_content_range(bad).is_err(), "{bad}");
        }
        assert_eq!(e(0, 1).range_header(), "bytes=0-0");
    }

    #[test]
    fn zero_detection_sees_a_single_byte_anywhere() {
        let mut buf = vec![0u8; 4096 + 7];
        assert!(is_zero(&buf));
        assert!(is_zero(&[]));
        for at in [0, 63, 64, 4095, 4096 + 6] {
            buf[at] = 1;
            assert!(!is_zero(&buf), "byte {at}");
            buf[at] = 0;
        }
    }

    #[test]
    fn data_runs_skip_zero_granules_and_join_neighbours() {
        let mut buf = vec![0u8; 10];
        assert_eq!(data_runs(&buf, 4), vec![]);
        buf[1] = 1; // granule 0
        buf[5] = 1; // granule 1
        assert_eq!(data_runs(&buf, 4), vec![(0, 8)]);
        buf[5] = 0;
        buf[9] = 1; // the short last granule
        assert_eq!(data_runs(&buf, 4), vec![(0, 4), (8, 2)]);
    }
}
