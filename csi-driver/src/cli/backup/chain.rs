//! Pure checks that a full backup and incrementals, in the order given, rebuild one disk: same
//! size, and each incremental starting at the snapshot the backup before it ended at.

use std::path::{Path, PathBuf};

use super::manifest::{Full, Incremental};
use super::plan;

/// Checks the chain `full`, `incrementals[0]`, `incrementals[1]`, …; the message names the file
/// that breaks it and why. A base is compared only where both snapshots are known: a full
/// backup of an export not named after its snapshot does not say which one it holds.
pub fn check(
    full_path: &Path,
    full: &Full,
    incrementals: &[(PathBuf, Incremental)],
) -> Result<(), String> {
    let mut previous = (full_path, full.snapshot.as_deref());
    for (path, inc) in incrementals {
        if inc.size != full.size {
            return Err(format!(
                "{} is of a {}-byte disk, the full backup {} of a {}-byte one",
                path.display(),
                inc.size,
                full_path.display(),
                full.size
            ));
        }
        if let (prev_path, Some(prev_snapshot)) = previous
            && prev_snapshot != inc.base
        {
            return Err(format!(
                "{} holds the changes since {}, but the backup before it ({}) is of {}; give the \
                 incrementals in the order they were taken, each right after the backup of its base",
                path.display(),
                inc.base,
                prev_path.display(),
                prev_snapshot
            ));
        }
        plan::check_extents(&inc.extents, inc.size)
            .map_err(|why| format!("{}: its manifest's extents: {why}", path.display()))?;
        previous = (path, Some(inc.snapshot.as_str()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::backup::plan::Extent;

    fn full(snapshot: Option<&str>) -> Full {
        Full {
            url: "u".into(),
            size: 100,
            bytes_read: 100,
            snapshot: snapshot.map(str::to_string),
            created_at: "t".into(),
        }
    }

    fn inc(name: &str, base: &str, snapshot: &str, size: u64) -> (PathBuf, Incremental) {
        (
            PathBuf::from(name),
            Incremental {
                url: "u".into(),
                base: base.into(),
                snapshot: snapshot.into(),
                size,
                extents: vec![Extent::new(0, 10)],
                bytes_read: 10,
                created_at: "t".into(),
            },
        )
    }

    #[test]
    fn a_chain_in_order_passes() {
        let incs = [inc("i1", "s1", "s2", 100), inc("i2", "s2", "s3", 100)];
        assert_eq!(check(Path::new("f"), &full(Some("s1")), &incs), Ok(()));
        assert_eq!(check(Path::new("f"), &full(Some("s1")), &[]), Ok(()));
    }

    #[test]
    fn an_unknown_full_snapshot_checks_only_between_incrementals() {
        let incs = [inc("i1", "s1", "s2", 100), inc("i2", "s2", "s3", 100)];
        assert_eq!(check(Path::new("f"), &full(None), &incs), Ok(()));
        let skipped = [inc("i1", "s1", "s2", 100), inc("i3", "s3", "s4", 100)];
        let e = check(Path::new("f"), &full(None), &skipped).unwrap_err();
        assert!(
            e.contains("i3 holds the changes since s3") && e.contains("(i1) is of s2"),
            "{e}"
        );
    }

    #[test]
    fn order_gaps_and_sizes_are_refused() {
        let swapped = [inc("i2", "s2", "s3", 100), inc("i1", "s1", "s2", 100)];
        let e = check(Path::new("f"), &full(Some("s1")), &swapped).unwrap_err();
        assert!(
            e.contains("i2 holds the changes since s2") && e.contains("(f) is of s1"),
            "{e}"
        );
        let resized = [inc("i1", "s1", "s2", 200)];
        let e = check(Path::new("f"), &full(Some("s1")), &resized).unwrap_err();
        assert!(e.contains("200-byte"), "{e}");
    }

    #[test]
    fn extents_outside_the_disk_are_refused() {
        let mut bad = inc("i1", "s1", "s2", 100);
        bad.1.extents = vec![Extent::new(95, 10)];
        assert!(check(Path::new("f"), &full(Some("s1")), &[bad]).is_err());
    }
}
