//! (e) Snapshots and changed blocks measured through the CSI driver's sockets on the local
//! cluster (hack/bench.sh starts it): what the external-snapshotter and a backup tool see, CR
//! round trip, node agent and relay included, rather than the engine's own call.

use anyhow::{Context, Result, ensure};

use crate::csi::{CsiTarget, Driver};
use crate::report::{Pairs, Row, Target, median, ms};
use crate::scenarios::Config;

const GIB: u64 = 1 << 30;
const CLUSTER: u64 = 65536;

/// The two sizes whose snapshot latency must not differ (virtual; sparse).
const SMALL: u64 = GIB;
const LARGE: u64 = 64 * GIB;
/// The volume that gets the scattered extents.
const BUSY: u64 = 64 * GIB;
/// Pairs of the size comparison per run: they are cheap, and a single call varies by ±5 ms
/// around ~70 ms (or lands on the controller's next poll), against a 10 % target.
const SIZE_PAIRS_PER_RUN: usize = 3;
/// "A little data" on the size-comparison volumes before their first snapshot, in MiB.
const LITTLE_DATA_MIB: u64 = 16;
/// Extents per message of the paged query, and the page the whole answer fits in.
const PAGE: i32 = 10_000;
const ONE_PAGE: i32 = 200_000;

/// Non-zero data, so that nothing could take a write for a hole.
const PATTERN: &str = "--pattern=165";
/// A quiet layer: 4 new 4 KiB extents, 16 MiB apart.
const QUIET_WRITES: [&str; 8] = ["-w", PATTERN, "-c", "4", "-s", "4096", "-S", "16777216"];

fn progress(msg: &str) {
    eprintln!("bench: (e) {msg}");
}

/// The stride that scatters `n` 4 KiB writes over `size` bytes, each in a cluster of its own
/// with at least one untouched cluster between two (so each is a separate extent).
pub fn scatter_stride(size: u64, n: u64) -> Result<u64> {
    ensure!(n > 0, "no extents asked for");
    let stride = (size / n) / CLUSTER * CLUSTER;
    ensure!(
        stride >= 2 * CLUSTER,
        "{n} extents do not fit {} GiB at a stride of two clusters",
        size / GIB
    );
    Ok(stride)
}

/// What one run of the scenario measured, in seconds.
#[derive(Debug, Clone, PartialEq)]
pub struct Measured {
    pub extents: u64,
    /// CreateSnapshot of the 64 GiB volume and of the 1 GiB one.
    pub sizes: Pairs,
    /// CreateSnapshot sealing `extents` new extents, and sealing a quiet layer just before.
    pub busy: Pairs,
    /// A quiet CreateSnapshot once the busy layer's extents are captured in the volume's
    /// record, and the quiet one before.
    pub quiet_after: Pairs,
    /// GetMetadataDelta of the busy snapshot started as soon as CreateSnapshot returned, until
    /// its stream ended (median); and busy snapshot + that query (median of per-run sums).
    pub first_query: f64,
    pub snapshot_then_query: f64,
    /// The same delta later (its record long captured): pages of `PAGE`, and one message.
    pub paging: Pairs,
}

/// The table rows of (e). Ratios are medians of per-run ratios.
pub fn rows(m: &Measured) -> Vec<Row> {
    let n = m.extents;
    let paired = |name: String, p: &Pairs, target| Row {
        name,
        measured: ms(p.measured()),
        peer: ms(p.peer()),
        ratio: p.ratio(),
        target,
    };
    vec![
        paired(
            format!(
                "(e) CSI CreateSnapshot, {} GiB vs {} GiB volume, {LITTLE_DATA_MIB} MiB data",
                LARGE / GIB,
                SMALL / GIB
            ),
            &m.sizes,
            Target::AtMost(1.10),
        ),
        paired(
            format!("(e) CSI CreateSnapshot sealing {n} new 4 KiB extents vs quiet"),
            &m.busy,
            Target::AtMost(2.0),
        ),
        paired(
            format!("(e)   quiet CreateSnapshot once {n} extents are in the record"),
            &m.quiet_after,
            Target::Info,
        ),
        Row {
            name: format!("(e)   GetMetadataDelta at once after it ({n} extents) vs later"),
            measured: ms(m.first_query),
            peer: ms(m.paging.peer()),
            ratio: m.first_query / m.paging.peer(),
            target: Target::Info,
        },
        Row {
            name: "(e)   that snapshot + GetMetadataDelta at once, to the stream's end".into(),
            measured: ms(m.snapshot_then_query),
            peer: String::new(),
            ratio: f64::NAN,
            target: Target::Info,
        },
        paired(
            format!(
                "(e) GetMetadataDelta of {n}, {} per message vs one message",
                thousands(PAGE as u64)
            ),
            &m.paging,
            Target::AtMost(2.0),
        ),
    ]
}

/// 10000 → "10 000", as the other rows write counts of extents per page.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, d) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(' ');
        }
        out.push(d);
    }
    out
}

/// The driver, and what this run made on it, so that everything goes again even after a
/// failed run: volumes first, then snapshots newest first (each is then the top layer of a
/// deleted volume and is dropped without a merge).
struct Session {
    driver: Driver,
    /// Prefix of this run's CSI names.
    tag: String,
    named: usize,
    staged: Vec<String>,
    volumes: Vec<String>,
    /// (volume, snapshot), oldest first.
    snapshots: Vec<(String, String)>,
}

impl Session {
    fn name(&mut self, what: &str) -> String {
        self.named += 1;
        format!("{}-{what}-{}", self.tag, self.named)
    }

    /// A new volume on the benchmark's node, staged (attached) as kubelet would.
    async fn staged_volume(&mut self, bytes: u64) -> Result<String> {
        let name = self.name("vol");
        let id = self.driver.create_volume(&name, bytes).await?;
        self.volumes.push(id.clone());
        self.driver.stage(&id, &id).await?;
        self.staged.push(id.clone());
        Ok(id)
    }

    async fn unstage(&mut self, volume: &str) -> Result<()> {
        self.driver.unstage(volume, volume).await?;
        self.staged.retain(|v| v != volume);
        Ok(())
    }

    /// CreateSnapshot of `volume`: its ID and the call's wall time.
    async fn snapshot(&mut self, volume: &str) -> Result<(String, f64)> {
        let name = self.name("snap");
        let (id, secs) = self.driver.create_snapshot(&name, volume).await?;
        self.snapshots.push((volume.to_string(), id.clone()));
        Ok((id, secs))
    }

    /// Deletes a volume and then its snapshots, newest first, now rather than at the end (a busy
    /// volume holds 100 000 clusters), and waits until the node has freed their files.
    async fn retire(&mut self, volume: &str) -> Result<()> {
        if self.staged.iter().any(|v| v == volume) {
            self.unstage(volume).await?;
        }
        self.driver.delete_volume(volume).await?;
        self.volumes.retain(|v| v != volume);
        while let Some(i) = self.snapshots.iter().rposition(|(v, _)| v == volume) {
            self.driver.delete_snapshot(&self.snapshots[i].1).await?;
            self.snapshots.remove(i);
        }
        self.driver.settle().await
    }

    /// GetMetadataDelta to the end of its stream; fails unless it held `expected` extents.
    async fn delta(&mut self, base: &str, target: &str, page: i32, expected: u64) -> Result<f64> {
        let (tally, secs) = self.driver.delta(base, target, page).await?;
        ensure!(
            tally.extents == expected,
            "GetMetadataDelta (max_results {page}) returned {} extents, expected {expected}",
            tally.extents
        );
        Ok(secs)
    }

    async fn clean(mut self) -> Result<()> {
        let mut first_error = None;
        let mut keep = |r: Result<()>| {
            if let Err(e) = r {
                eprintln!("bench: (e) cleanup: {e:#}");
                first_error.get_or_insert(e);
            }
        };
        for volume in std::mem::take(&mut self.staged) {
            keep(self.driver.unstage(&volume, &volume).await);
        }
        for volume in std::mem::take(&mut self.volumes) {
            keep(self.driver.delete_volume(&volume).await);
        }
        for (_, snapshot) in std::mem::take(&mut self.snapshots).iter().rev() {
            keep(self.driver.delete_snapshot(snapshot).await);
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// (e), end to end; everything it created is deleted again, also after a failure.
pub async fn through_csi(target: CsiTarget, c: &Config) -> Result<Vec<Row>> {
    let driver = Driver::connect(target)
        .await
        .context("connecting to the driver's sockets")?;
    let mut s = Session {
        driver,
        tag: format!(
            "bench-e-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        ),
        named: 0,
        staged: vec![],
        volumes: vec![],
        snapshots: vec![],
    };
    let measured = measure(&mut s, c).await;
    progress("deleting its volumes and snapshots");
    let cleaned = s.clean().await;
    let m = measured?;
    cleaned.context("cleaning up after (e)")?;
    Ok(rows(&m))
}

async fn measure(s: &mut Session, c: &Config) -> Result<Measured> {
    let sizes = size_comparison(s, c).await?;
    let b = busy_and_quiet(s, c).await?;
    Ok(Measured {
        extents: c.extents,
        sizes,
        busy: b.busy,
        quiet_after: b.quiet_after,
        first_query: b.first_query,
        snapshot_then_query: b.snapshot_then_query,
        paging: b.paging,
    })
}

/// CreateSnapshot of a 1 GiB and a 64 GiB volume with the same little data, staged, each
/// sealing a quiet layer; `SIZE_PAIRS_PER_RUN` pairs (64 GiB, 1 GiB) per run, which of the two
/// goes first alternating.
async fn size_comparison(s: &mut Session, c: &Config) -> Result<Pairs> {
    progress(&format!(
        "CreateSnapshot at {} GiB and {} GiB",
        SMALL / GIB,
        LARGE / GIB
    ));
    let little = LITTLE_DATA_MIB.to_string();
    let mut volumes = vec![];
    for size in [SMALL, LARGE] {
        let v = s.staged_volume(size).await?;
        s.driver
            .write(&v, &["-w", PATTERN, "-c", &little, "-s", "1M", "-d", "4"])
            .await?;
        volumes.push(v);
    }
    let mut pairs = Pairs::default();
    for run in 0..c.runs * SIZE_PAIRS_PER_RUN {
        let order = if run % 2 == 0 { [0, 1] } else { [1, 0] };
        let mut secs = [0.0; 2];
        for i in order {
            s.driver.write(&volumes[i], &QUIET_WRITES).await?;
            secs[i] = s.snapshot(&volumes[i]).await?.1;
        }
        progress(&format!(
            "run {}: {} GiB {}, {} GiB {}",
            run + 1,
            SMALL / GIB,
            ms(secs[0]),
            LARGE / GIB,
            ms(secs[1])
        ));
        pairs.push(secs[1], secs[0]);
    }
    for v in &volumes {
        s.retire(v).await?;
    }
    Ok(pairs)
}

struct BusyFigures {
    busy: Pairs,
    quiet_after: Pairs,
    first_query: f64,
    snapshot_then_query: f64,
    paging: Pairs,
}

/// Per run, on a fresh staged 64 GiB volume: CreateSnapshot of it empty, a few writes and
/// CreateSnapshot (quiet), `extents` scattered 4 KiB writes and CreateSnapshot (busy), at once
/// GetMetadataDelta quiet → busy; then a few writes and CreateSnapshot once more (quiet, with
/// the busy layer's extents now in the volume's record). The last run's delta is read again,
/// paged and in one message, before its volume goes like the others.
async fn busy_and_quiet(s: &mut Session, c: &Config) -> Result<BusyFigures> {
    let n = c.extents;
    let stride = scatter_stride(BUSY, n)?.to_string();
    let count = n.to_string();
    let scattered = [
        "-w", PATTERN, "-c", &count, "-s", "4096", "-S", &stride, "-d", "16",
    ];
    let (mut busy, mut quiet_after, mut paging) =
        (Pairs::default(), Pairs::default(), Pairs::default());
    let (mut first, mut both) = (vec![], vec![]);
    for run in 1..=c.runs {
        progress(&format!(
            "run {run}/{}: {} GiB volume, quiet and busy ({n} scattered 4 KiB writes) snapshots",
            c.runs,
            BUSY / GIB
        ));
        let v = s.staged_volume(BUSY).await?;
        s.snapshot(&v).await?;
        s.driver.write(&v, &QUIET_WRITES).await?;
        let (base, quiet_secs) = s.snapshot(&v).await?;
        s.driver.write(&v, &scattered).await?;
        let (target, busy_secs) = s.snapshot(&v).await?;
        let query = s.delta(&base, &target, ONE_PAGE, n).await?;
        s.driver.write(&v, &QUIET_WRITES).await?;
        let (_, after_secs) = s.snapshot(&v).await?;
        progress(&format!(
            "run {run}: quiet {}, busy {}, delta at once {}, quiet after {}",
            ms(quiet_secs),
            ms(busy_secs),
            ms(query),
            ms(after_secs)
        ));
        busy.push(busy_secs, quiet_secs);
        quiet_after.push(after_secs, quiet_secs);
        first.push(query);
        both.push(busy_secs + query);
        if run == c.runs {
            progress(&format!(
                "GetMetadataDelta of {n} extents, {PAGE} per message vs one message"
            ));
            for turn in 0..c.runs {
                // Take turns going first, so that neither always finds the caches warm.
                let mut secs = [0.0; 2];
                for paged_first in [turn % 2 == 0, turn % 2 != 0] {
                    if paged_first {
                        secs[0] = s.delta(&base, &target, PAGE, n).await?;
                    } else {
                        secs[1] = s.delta(&base, &target, ONE_PAGE, n).await?;
                    }
                }
                paging.push(secs[0], secs[1]);
            }
        }
        s.retire(&v).await?;
    }
    Ok(BusyFigures {
        busy,
        quiet_after,
        first_query: median(first),
        snapshot_then_query: median(both),
        paging,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::verdict;

    #[test]
    fn scattered_writes_leave_a_cluster_between_them() {
        assert_eq!(scatter_stride(64 * GIB, 100_000).unwrap(), 10 * CLUSTER);
        assert_eq!(scatter_stride(32 * GIB, 100_000).unwrap(), 5 * CLUSTER);
        assert!(scatter_stride(8 * GIB, 100_000).is_err());
        assert!(scatter_stride(GIB, 0).is_err());
    }

    #[test]
    fn counts_are_grouped_by_thousands() {
        assert_eq!(thousands(10_000), "10 000");
        assert_eq!(thousands(200_000), "200 000");
        assert_eq!(thousands(1_000_000), "1 000 000");
        assert_eq!(thousands(999), "999");
    }

    #[test]
    fn rows_hold_each_figure_to_its_target() {
        let pairs = |list: &[(f64, f64)]| {
            let mut p = Pairs::default();
            for &(m, q) in list {
                p.push(m, q);
            }
            p
        };
        let m = Measured {
            extents: 100_000,
            sizes: pairs(&[(0.21, 0.20), (0.07, 0.07)]),
            busy: pairs(&[(0.5, 0.2), (0.5, 0.2)]),
            quiet_after: pairs(&[(0.4, 0.2)]),
            first_query: 3.0,
            snapshot_then_query: 3.5,
            paging: pairs(&[(0.45, 0.3)]),
        };
        let r = rows(&m);
        let verdicts: Vec<_> = r.iter().map(|r| verdict(r.ratio, r.target)).collect();
        // Sizes 1.025 flat: pass; 2.5x busy: miss; three informative rows; paged 1.5x: pass.
        assert_eq!(verdicts, ["PASS", "MISS", "-", "-", "-", "PASS"]);
        assert!(r[1].name.contains("100000 new 4 KiB extents"));
        assert_eq!(r[2].ratio, 2.0);
        assert_eq!(r[3].ratio, 10.0);
        assert!(r[5].name.contains("10 000 per message"));
    }
}
