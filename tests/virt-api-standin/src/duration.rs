//! Durations as Kubernetes writes them (`metav1.Duration`: Go's `time.Duration` string form, e.g.
//! `5m0s`, `1h30m`, `2.5s`, `300ms`), and the whole seconds the freeze path takes from them.

/// Nanoseconds in a duration string, or why it is not one. The grammar is Go's
/// `time.ParseDuration`: an optional sign, then one or more decimal numbers each with a unit
/// (`ns`, `us`/`µs`/`μs`, `ms`, `s`, `m`, `h`); `0` alone is zero.
pub fn parse_go_duration(text: &str) -> Result<i128, String> {
    let bad = || format!("time: invalid duration {text:?}");
    let (negative, mut rest) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    if rest == "0" {
        return Ok(0);
    }
    if rest.is_empty() {
        return Err(bad());
    }
    let mut total: f64 = 0.0;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number = &rest[..number_len];
        if number.is_empty() || number == "." || number.matches('.').count() > 1 {
            return Err(bad());
        }
        let value: f64 = number.parse().map_err(|_| bad())?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let nanos_per_unit: f64 = match &rest[..unit_len] {
            "ns" => 1.0,
            "us" | "\u{b5}s" | "\u{3bc}s" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            "" => return Err(format!("time: missing unit in duration {text:?}")),
            other => return Err(format!("time: unknown unit {other:?} in duration {text:?}")),
        };
        rest = &rest[unit_len..];
        total += value * nanos_per_unit;
    }
    // Go's limit: a duration is an int64 of nanoseconds.
    if total > i64::MAX as f64 {
        return Err(bad());
    }
    let nanos = total.round() as i128;
    Ok(if negative { -nanos } else { nanos })
}

/// The whole seconds virt-handler hands to virt-launcher: `int32(d.Seconds())`, truncated
/// toward zero (so `1.9s` is 1, and anything under a second is 0: no safety unfreeze at all).
pub fn whole_seconds(nanos: i128) -> i64 {
    let seconds = nanos / 1_000_000_000;
    seconds.clamp(i32::MIN as i128, i32::MAX as i128) as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_forms_kubernetes_writes_parse() {
        assert_eq!(parse_go_duration("5m0s"), Ok(300_000_000_000));
        assert_eq!(parse_go_duration("2s"), Ok(2_000_000_000));
        assert_eq!(parse_go_duration("1h30m"), Ok(5_400_000_000_000));
        assert_eq!(parse_go_duration("1.5s"), Ok(1_500_000_000));
        assert_eq!(parse_go_duration("300ms"), Ok(300_000_000));
        assert_eq!(parse_go_duration("0"), Ok(0));
        assert_eq!(parse_go_duration("-2s"), Ok(-2_000_000_000));
        assert_eq!(parse_go_duration("10\u{b5}s"), Ok(10_000));
    }

    #[test]
    fn what_go_refuses_is_refused() {
        for text in ["", "5", "s", "5x", "1..5s", "-", "five minutes", "5m 0s"] {
            assert!(parse_go_duration(text).is_err(), "{text:?} parsed");
        }
    }

    #[test]
    fn seconds_are_truncated_toward_zero() {
        assert_eq!(whole_seconds(1_900_000_000), 1);
        assert_eq!(whole_seconds(900_000_000), 0);
        assert_eq!(whole_seconds(-1_500_000_000), -1);
        assert_eq!(whole_seconds(300_000_000_000), 300);
    }
}
