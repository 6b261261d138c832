//! (i) Remote attach vs local attach, through the CSI driver on hack/bench.sh's cluster: one
//! volume held by the other node and staged on the benchmark's node (its engine daemon's NBD
//! client over TLS to the holder's export front), one held and staged on the benchmark's node;
//! `qemu-img bench` (sequential 1 MiB writes, then reads of them, and scattered 4 KiB writes, queue depth 8)
//! against each one's consumer export on the benchmark's node's daemon, the path the node's
//! front end and loop device go through. Runs alternate which goes first. The operator runs for
//! the nodes' front certificates.

use std::time::Instant;

use anyhow::{Context, Result};

use crate::at_scale::{Operator, ScaleTarget};
use crate::csi::{CsiTarget, Driver};
use crate::report::{Pairs, Row, Target, mibps};
use crate::scenarios::Config;

/// Volume size at scale 1.
const VOLUME_MIB: u64 = 512;

fn progress(msg: &str) {
    eprintln!("bench: (i) {msg}");
}

/// One `qemu-img bench` pattern: its arguments for a volume of `bytes`, and the bytes it moves.
struct Pattern {
    name: &'static str,
    args: fn(u64) -> Vec<String>,
    /// The bytes it moves on a volume of that size.
    moved: fn(u64) -> u64,
}

const PATTERNS: [Pattern; 3] = [
    // Writes first: the reads then read data, not holes.
    Pattern {
        name: "sequential 1 MiB writes",
        args: |bytes| seq(bytes, true),
        moved: |bytes| bytes,
    },
    Pattern {
        name: "sequential 1 MiB reads (of written data)",
        args: |bytes| seq(bytes, false),
        moved: |bytes| bytes,
    },
    Pattern {
        name: "4 KiB writes, 1 MiB apart",
        args: |bytes| {
            let count = bytes >> 20;
            let mut a: Vec<String> = ["-w", "--pattern=90", "-s", "4096", "-S", "1048576"]
                .iter()
                .map(|s| s.to_string())
                .collect();
            a.extend(["-d".into(), "8".into(), "-c".into(), count.to_string()]);
            a
        },
        moved: |bytes| (bytes >> 20) * 4096,
    },
];

fn seq(bytes: u64, write: bool) -> Vec<String> {
    let mut a: Vec<String> = vec![];
    if write {
        a.extend(["-w".into(), "--pattern=165".into()]);
    }
    a.extend(
        ["-s", "1048576", "-d", "8", "-c"]
            .iter()
            .map(|s| s.to_string()),
    );
    a.push((bytes >> 20).to_string());
    a
}

pub async fn remote_attach(csi: CsiTarget, op: ScaleTarget, c: &Config) -> Result<Vec<Row>> {
    let operator = Operator::start(&op)?;
    let measured = measure(&csi, c).await;
    progress("stopping the operator");
    let stopped = operator.stop().await;
    let pairs = measured?;
    stopped.context("stopping the operator")?;
    let bytes = ((VOLUME_MIB as f64 * c.scale) as u64).max(64) << 20;
    Ok(PATTERNS
        .iter()
        .zip(pairs)
        .map(|(p, pairs)| {
            let size = (p.moved)(bytes);
            Row {
                name: format!("(i) remote attach vs local attach: {}", p.name),
                measured: format!("{:.0} MiB/s", mibps(size, pairs.measured())),
                peer: format!("{:.0} MiB/s", mibps(size, pairs.peer())),
                ratio: 1.0 / pairs.ratio(),
                target: Target::Info,
            }
        })
        .collect())
}

async fn measure(csi: &CsiTarget, c: &Config) -> Result<Vec<Pairs>> {
    let other = other_node(&csi.node);
    let remote_target = CsiTarget {
        node: other.clone(),
        ..csi.clone()
    };
    // Volumes are created with the holder's topology; both are staged on the benchmark's node.
    let holder = Driver::connect(remote_target).await?;
    let here = Driver::connect(csi.clone()).await?;
    let bytes = ((VOLUME_MIB as f64 * c.scale) as u64).max(64) << 20;
    let tag = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    let remote = holder
        .create_volume(&format!("bench-i-remote-{tag}"), bytes)
        .await?;
    let local = here
        .create_volume(&format!("bench-i-local-{tag}"), bytes)
        .await?;
    let result = async {
        here.stage(&remote, &format!("i-remote-{tag}")).await?;
        here.stage(&local, &format!("i-local-{tag}")).await?;
        let mut all = vec![];
        for pattern in &PATTERNS {
            let mut pairs = Pairs::default();
            for run in 0..c.runs {
                progress(&format!("{}: run {} of {}", pattern.name, run + 1, c.runs));
                let args = (pattern.args)(bytes);
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                let time = |volume: String| {
                    let (here, args) = (&here, args.clone());
                    async move {
                        let started = Instant::now();
                        here.write(&volume, &args).await?;
                        Ok::<f64, anyhow::Error>(started.elapsed().as_secs_f64())
                    }
                };
                let (r, l) = if run % 2 == 0 {
                    let r = time(remote.clone()).await?;
                    (r, time(local.clone()).await?)
                } else {
                    let l = time(local.clone()).await?;
                    (time(remote.clone()).await?, l)
                };
                pairs.push(r, l);
            }
            all.push(pairs);
        }
        Ok::<_, anyhow::Error>(all)
    }
    .await;
    progress("unstaging and deleting the volumes");
    for (volume, kind) in [(&remote, "remote"), (&local, "local")] {
        here.unstage(volume, &format!("i-{kind}-{tag}")).await?;
    }
    holder.delete_volume(&remote).await?;
    here.delete_volume(&local).await?;
    result
}

/// The other node of hack/bench.sh's two-node driver.
fn other_node(node: &str) -> String {
    match node {
        "node-a" => "node-b".into(),
        _ => "node-a".into(),
    }
}
