//! Byte sizes as operators type and read them: `1GiB`, `512M`, `4096`.

/// Parses a size with an optional binary (`KiB`, `MiB`, …) or short (`K`,
/// `M`, `G`, `T`, all powers of 1024) suffix. Decimal suffixes (`KB`, `GB`)
/// are refused rather than guessed.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(format!("size {s:?}: expected a number, e.g. 1GiB"));
    }
    let n: u64 = num.parse().map_err(|e| format!("size {s:?}: {e}"))?;
    let shift = match unit.trim() {
        "" | "B" => 0,
        "K" | "k" | "KiB" => 10,
        "M" | "MiB" => 20,
        "G" | "GiB" => 30,
        "T" | "TiB" => 40,
        "P" | "PiB" => 50,
        other => {
            return Err(format!(
                "size {s:?}: unknown unit {other:?} (use B, KiB, MiB, GiB, TiB)"
            ));
        }
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("size {s:?} does not fit in 64 bits"))
}

/// Human-readable size with a binary unit, exact when it divides evenly.
pub fn format_size(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut unit = 0;
    let mut v = n;
    while unit + 1 < UNITS.len() && v >= 1024 && v.is_multiple_of(1024) {
        v /= 1024;
        unit += 1;
    }
    if v < 1024 || unit + 1 == UNITS.len() {
        return format!("{v}{}", UNITS[unit]);
    }
    // Not a whole number of the next unit: one decimal is enough to read.
    let mut f = n as f64;
    let mut u = 0;
    while u + 1 < UNITS.len() && f >= 1024.0 {
        f /= 1024.0;
        u += 1;
    }
    format!("{f:.1}{}", UNITS[u])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size(" 2 TiB "), Ok(2 << 40));
        assert_eq!(parse_size("1k"), Ok(1024));
    }

    #[test]
    fn refuses_garbage() {
        assert!(parse_size("").is_err());
        assert!(parse_size("GiB").is_err());
        assert!(parse_size("1GB").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999PiB").is_err());
    }

    #[test]
    fn formats() {
        assert_eq!(format_size(0), "0B");
        assert_eq!(format_size(1000), "1000B");
        assert_eq!(format_size(1 << 30), "1GiB");
        assert_eq!(format_size(64 << 30), "64GiB");
        assert_eq!(format_size((1 << 30) + (1 << 29)), "1.5GiB");
        assert_eq!(format_size(3 << 20), "3MiB");
        assert_eq!(format_size((1 << 30) + 1), "1.0GiB");
        assert_eq!(format_size(1536), "1.5KiB");
    }
}
