//! Pure parts of the benchmark: medians, ratios, verdicts, the table.

use crate::table::render;

/// What a row's ratio is held against.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Target {
    /// Ratio must be at most this (latencies, 64 GiB over 1 GiB).
    AtMost(f64),
    /// Ratio must be at least this (throughputs over the raw peer).
    AtLeast(f64),
    /// Absolute value (seconds) must be below this.
    SecondsBelow(f64),
    /// Absolute value, in `unit`, must be below `limit` (the operator's memory, say).
    Below { limit: f64, unit: &'static str },
    /// Reported only.
    Info,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub name: String,
    /// The engine's figure, already formatted with its unit.
    pub measured: String,
    /// The peer's or baseline's figure, formatted; empty if none.
    pub peer: String,
    /// measured/peer (or the absolute value for `SecondsBelow`).
    pub ratio: f64,
    pub target: Target,
}

pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if !n.is_multiple_of(2) {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// A figure and its peer measured back to back, one pair per run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Pairs(Vec<(f64, f64)>);

impl Pairs {
    pub fn push(&mut self, measured: f64, peer: f64) {
        self.0.push((measured, peer));
    }

    pub fn measured(&self) -> f64 {
        median(self.0.iter().map(|p| p.0).collect())
    }

    pub fn peer(&self) -> f64 {
        median(self.0.iter().map(|p| p.1).collect())
    }

    /// The median of the per-pair ratios: what drifts on a shared machine between pairs (or
    /// falls on the other side of a polling interval in one pair) cancels out.
    pub fn ratio(&self) -> f64 {
        median(self.0.iter().map(|p| p.0 / p.1).collect())
    }
}

pub fn verdict(ratio: f64, t: Target) -> &'static str {
    let ok = match t {
        Target::AtMost(x) => ratio <= x,
        Target::AtLeast(x) => ratio >= x,
        Target::SecondsBelow(x) => ratio < x,
        Target::Below { limit, .. } => ratio < limit,
        Target::Info => return "-",
    };
    if ok { "PASS" } else { "MISS" }
}

fn target_text(t: Target) -> String {
    match t {
        Target::AtMost(x) => format!("ratio <= {x:.2}"),
        Target::AtLeast(x) => format!("ratio >= {x:.2}"),
        Target::SecondsBelow(x) => format!("< {x} s"),
        Target::Below { limit, unit } => format!("< {limit} {unit}"),
        Target::Info => "-".into(),
    }
}

fn ratio_text(r: &Row) -> String {
    match r.target {
        Target::SecondsBelow(_) => format!("{:.3} s", r.ratio),
        Target::Below { unit, .. } => format!("{:.1} {unit}", r.ratio),
        _ if r.ratio.is_finite() => format!("{:.2}", r.ratio),
        _ => "n/a".into(),
    }
}

pub fn render_rows(rows: &[Row]) -> String {
    let cells = rows
        .iter()
        .map(|r| {
            vec![
                r.name.clone(),
                r.measured.clone(),
                r.peer.clone(),
                ratio_text(r),
                target_text(r.target),
                verdict(r.ratio, r.target).into(),
            ]
        })
        .collect::<Vec<_>>();
    render(
        &["BENCHMARK", "ENGINE", "PEER", "RATIO", "TARGET", "RESULT"],
        &cells,
    )
}

/// The `q`-quantile (0..=1) of a sample, nearest rank: the value at or below which a share `q`
/// of the sample lies (`q = 1` is the maximum). NaN for an empty sample.
pub fn percentile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = (q.clamp(0.0, 1.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

pub fn ms(s: f64) -> String {
    format!("{:.1} ms", s * 1e3)
}

pub fn mibps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64 / secs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(vec![]).is_nan());
    }

    #[test]
    fn pairs_are_held_against_each_other_run_by_run() {
        let mut p = Pairs::default();
        // The machine slows down between runs; each pair stays at 1.0 but one.
        p.push(0.07, 0.07);
        p.push(0.18, 0.07);
        p.push(0.20, 0.20);
        assert_eq!(p.ratio(), 1.0);
        assert_eq!(p.measured(), 0.18);
        assert_eq!(p.peer(), 0.07);
        assert!(Pairs::default().ratio().is_nan());
    }

    #[test]
    fn verdicts() {
        assert_eq!(verdict(1.05, Target::AtMost(1.1)), "PASS");
        assert_eq!(verdict(1.2, Target::AtMost(1.1)), "MISS");
        assert_eq!(verdict(0.95, Target::AtLeast(0.9)), "PASS");
        assert_eq!(verdict(0.5, Target::AtLeast(0.7)), "MISS");
        assert_eq!(verdict(0.2, Target::SecondsBelow(1.0)), "PASS");
        assert_eq!(verdict(f64::NAN, Target::AtLeast(0.7)), "MISS");
        assert_eq!(verdict(9.0, Target::Info), "-");
        let mib = Target::Below {
            limit: 100.0,
            unit: "MiB",
        };
        assert_eq!(verdict(42.0, mib), "PASS");
        assert_eq!(verdict(100.0, mib), "MISS");
        assert_eq!(verdict(f64::NAN, mib), "MISS");
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&v, 1.0), 100.0);
        assert_eq!(percentile(&[3.0, 1.0, 2.0], 0.5), 2.0);
        assert_eq!(percentile(&[7.0], 0.99), 7.0);
        assert_eq!(percentile(&[7.0], 0.0), 7.0);
        assert!(percentile(&[], 0.5).is_nan());
    }

    #[test]
    fn table_has_verdicts() {
        let t = render_rows(&[Row {
            name: "query".into(),
            measured: "0.2 s".into(),
            peer: String::new(),
            ratio: 0.2,
            target: Target::SecondsBelow(1.0),
        }]);
        assert!(t.lines().nth(1).is_some_and(|l| l.ends_with("PASS")));
        assert!(t.contains("< 1 s"));
        let t = render_rows(&[Row {
            name: "rss".into(),
            measured: "42.0 MiB".into(),
            peer: String::new(),
            ratio: 42.0,
            target: Target::Below {
                limit: 100.0,
                unit: "MiB",
            },
        }]);
        assert!(t.contains("42.0 MiB") && t.contains("< 100 MiB"), "{t}");
    }

    #[test]
    fn throughput() {
        assert_eq!(mibps(512 << 20, 2.0), 256.0);
    }
}
