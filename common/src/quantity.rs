//! Kubernetes quantities (`200Mi`, `1G`, `500000`) as byte counts, for the rate limits that come
//! from a DiskMerge's spec and from class parameters. Written here because the crates that parse
//! quantities pull in far more than these dozen lines.

/// Pure: a quantity in bytes; fractions of a byte round down. `None` for anything that is not a
/// non-negative quantity with a known suffix.
pub fn bytes(quantity: &str) -> Option<i64> {
    let q = quantity.trim();
    let split = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(q.len());
    let (number, suffix) = q.split_at(split);
    let value: f64 = number.parse().ok()?;
    let factor: f64 = match suffix {
        "" => 1.0,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "m" => 1e-3,
        _ => return None,
    };
    let bytes = (value * factor).floor();
    (bytes >= 0.0 && bytes < i64::MAX as f64).then_some(bytes as i64)
}

#[cfg(test)]
mod tests {
    use super::bytes;

    #[test]
    fn quantities_become_bytes() {
        assert_eq!(bytes("500000"), Some(500_000));
        assert_eq!(bytes("2Mi"), Some(2 * 1024 * 1024));
        assert_eq!(bytes("1G"), Some(1_000_000_000));
        assert_eq!(bytes(" 1.5Ki "), Some(1536));
        assert_eq!(bytes("1500m"), Some(1));
    }

    #[test]
    fn anything_else_is_refused() {
        for bad in ["", "fast", "2MB", "-1", "1e3x", "Mi"] {
            assert_eq!(bytes(bad), None, "{bad:?}");
        }
    }
}
