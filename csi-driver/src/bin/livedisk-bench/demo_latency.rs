//! (l) The guest's write latency during each step of `make demo`'s story, next to the same VM
//! idle. hack/bench.sh runs hack/demo.sh on a chart cluster of real nodes of its own and hands
//! its output over (`LIVEDISK_BENCH_DEMO_LOG`); the demo measures (the guest's own latency of
//! each acknowledged `O_DSYNC` 4 KiB block write, grouped by the step it happened in) and this
//! turns its table into rows: each step's p50, p99 and max against the idle VM's.

use anyhow::{Context, Result, ensure};

use crate::report::{Row, Target};

/// One row of the demo's latency table.
#[derive(Debug, Clone, PartialEq)]
struct Stretch {
    what: String,
    writes: u64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

/// The rows under the demo's "write latency per step" heading (its column header skipped).
fn parse_table(log: &str) -> Vec<Stretch> {
    log.lines()
        .skip_while(|l| !l.contains("write latency per step"))
        .skip(1)
        .take_while(|l| l.starts_with("    "))
        .filter_map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            let [.., writes, p50, p99, max] = words[..] else {
                return None;
            };
            let what = words[..words.len() - 4].join(" ");
            Some(Stretch {
                what,
                writes: writes.parse().ok()?,
                p50_ms: p50.parse().ok()?,
                p99_ms: p99.parse().ok()?,
                max_ms: max.parse().ok()?,
            })
        })
        .collect()
}

/// "guest frozen 936 ms" in the demo's output.
fn frozen_ms(log: &str) -> Option<f64> {
    log.lines()
        .find_map(|l| l.trim().strip_prefix("guest frozen "))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

pub fn demo_latency() -> Result<Vec<Row>> {
    let path = std::env::var("LIVEDISK_BENCH_DEMO_LOG").context(
        "benchmark (l) reads make demo's output: run it with hack/bench.sh (make bench), which \
         starts a chart cluster of real nodes and runs hack/demo.sh on it",
    )?;
    let log = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    ensure!(
        log.lines().any(|l| l.starts_with("demo: ok in ")),
        "the demo did not end with its summary line: see {path}"
    );
    let table = parse_table(&log);
    let idle = table
        .iter()
        .find(|s| s.what.contains("idle"))
        .with_context(|| format!("no idle row in the demo's latency table ({path})"))?
        .clone();
    let mut rows = vec![];
    for s in table.iter().filter(|s| s.what != idle.what) {
        for (q, of, base) in [
            ("p50", s.p50_ms, idle.p50_ms),
            ("p99", s.p99_ms, idle.p99_ms),
            ("max", s.max_ms, idle.max_ms),
        ] {
            rows.push(Row {
                name: format!(
                    "(l) guest write latency {q} during {} ({} writes)",
                    s.what, s.writes
                ),
                measured: format!("{of:.1} ms"),
                peer: format!("{base:.1} ms"),
                ratio: of / base,
                target: Target::Info,
            });
        }
    }
    if let Some(ms) = frozen_ms(&log) {
        rows.push(Row {
            name: "(l) guest frozen for the VM's DiskSnapshot (freeze through its agent)".into(),
            measured: format!("{ms:.0} ms"),
            peer: String::new(),
            ratio: f64::NAN,
            target: Target::Info,
        });
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "\
    guest frozen 936 ms; indications: Online GuestAgent

=== demo [184s] the guest's write latency per step (ms; its acknowledged O_DSYNC 4 KiB block writes)
    while                                         writes      p50      p99      max
    the VM idle                                      369     3.39    48.50   109.11
    a DiskMerge (active commit, 1 MiB/s)            4471     2.92    23.67   152.37

demo: ok in 184s: ...
";

    #[test]
    fn the_demos_table_becomes_rows_against_idle() {
        let t = parse_table(LOG);
        assert_eq!(t.len(), 2, "{t:?}");
        assert_eq!(t[0].what, "the VM idle");
        assert_eq!(t[1].what, "a DiskMerge (active commit, 1 MiB/s)");
        assert_eq!((t[1].writes, t[1].p99_ms), (4471, 23.67));
        assert_eq!(frozen_ms(LOG), Some(936.0));
    }
}
