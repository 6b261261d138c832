//! The test VM's live mode in pods (docs/vm-test.md): QEMU with two block PVCs, a real
//! qemu-guest-agent and QEMU's monitor on unix sockets in the pod's node directory (/ack), which
//! the test reaches from this host.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{Cluster, PodClaim, PodSpec, VolumeMode};

/// The block disk (vda) and the ext4 disk (vdc) of a live VM pod.
pub const DEVICES: [&str; 2] = ["/dev/xvda", "/dev/xvdb"];

/// The `vm-run live` command of a pod; `extra` is appended (e.g. `--incoming tcp:0.0.0.0:4444`).
pub fn script(tag: u64, extra: &str) -> String {
    format!(
        "exec vm-run live --disk {} --disk2 {} --acks /ack/acks.jsonl --blocks 2048 \
         --file-blocks 1024 --agent /ack/qga.sock --qmp /ack/qmp.sock --tag {tag} {extra}",
        DEVICES[0], DEVICES[1]
    )
}

/// A pod that runs `script` on `node` with the two claims as its disks.
pub fn pod<'a>(name: &'a str, node: &'a str, claims: [&'a str; 2], script: &'a str) -> PodSpec<'a> {
    PodSpec {
        claims: vec![
            PodClaim {
                name: claims[0],
                mode: VolumeMode::Block,
                path: DEVICES[0],
            },
            PodClaim {
                name: claims[1],
                mode: VolumeMode::Block,
                path: DEVICES[1],
            },
        ],
        ..PodSpec::once_without_claims(name, node, script)
    }
}

/// Waits until the guest of `pod` writes on both disks (boot under TCG: tens of seconds); on a
/// timeout, what the pod's description says is printed.
pub async fn wait_writing(cluster: &Cluster, ns: &str, pod: &str) -> Result<()> {
    let started =
        livedisk_e2e::eventually(300, &format!("the guest's writers in {pod}"), || async {
            let logs = cluster.logs(ns, pod).await.unwrap_or_default();
            Ok(last_seq(&logs, "LDFILE ")
                .filter(|s| *s >= 50)
                .and(last_seq(&logs, "LDACK ").filter(|s| *s >= 100)))
        })
        .await;
    if started.is_err() {
        eprintln!("{}", cluster.describe(ns, pod).await);
    }
    started.map(|_| ())
}

/// Shuts the guest of `pod` down through its agent at `socket` and waits for the pod to end;
/// fails unless the guest's own verification of both disks passed. Returns its result line.
pub async fn shut_down_verified(
    cluster: &Cluster,
    ns: &str,
    pod: &str,
    socket: &Path,
) -> Result<String> {
    guest_agent(socket, "guest-shutdown")?;
    cluster.wait_phase(ns, pod, "Succeeded", 300).await?;
    let logs = cluster.logs(ns, pod).await?;
    let result = logs
        .lines()
        .rfind(|l| l.starts_with("LIVEDISK-RESULT"))
        .unwrap_or_default()
        .to_string();
    if !(result.contains("status=ok") && result.contains("verified=vda,ext4")) {
        bail!("the guest's own verification in {pod}: {result}");
    }
    Ok(result)
}

/// The newest `seq` on the `prefix` lines (`LDACK `, `LDFILE `) of a VM's output.
pub fn last_seq(logs: &str, prefix: &str) -> Option<u64> {
    logs.lines()
        .filter_map(|l| l.strip_prefix(prefix))
        .filter_map(|json| serde_json::from_str::<serde_json::Value>(json).ok())
        .filter_map(|ack| ack["seq"].as_u64())
        .max()
}

/// Runs a hack/vm tool on a socket, in the socket's directory (a socket path may be longer
/// than a unix address holds); returns its stdout.
fn on_socket(tool: &str, socket: &Path, args: &[&str]) -> Result<String> {
    let dir = socket.parent().context("socket without a directory")?;
    let name = socket.file_name().context("socket without a name")?;
    let output = Command::new(livedisk_e2e::workspace_root().join("hack/vm").join(tool))
        .arg(name)
        .args(args)
        .current_dir(dir)
        .output()
        .with_context(|| format!("running hack/vm/{tool}"))?;
    if !output.status.success() {
        bail!(
            "{tool} {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
}

/// One guest agent command (hack/vm/guest-agent); its JSON return.
pub fn guest_agent(socket: &Path, command: &str) -> Result<String> {
    on_socket("guest-agent", socket, &[command])
}

/// A live migration of the QEMU behind `qmp` to `uri` (hack/vm/migrate): its summary (status,
/// total_ms, downtime_ms, ...). The source QEMU quits once it completed.
pub fn migrate(qmp: &Path, uri: &str) -> Result<serde_json::Value> {
    let out = on_socket("migrate", qmp, &[uri])?;
    serde_json::from_str(&out).with_context(|| format!("migrate's summary: {out}"))
}

/// How long the guest's acknowledged block writes took in a stretch of its life.
#[derive(Debug, Clone, PartialEq)]
pub struct Latency {
    pub writes: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// The latency of the block writes with sequence numbers in `from..=to` among the `LDACK` lines
/// of `logs` (one pod's output, or several pods' of one guest concatenated); None without any.
pub fn write_latency(logs: &str, from: u64, to: u64) -> Option<Latency> {
    let mut seen = std::collections::BTreeMap::new();
    for ack in logs
        .lines()
        .filter_map(|l| l.strip_prefix("LDACK "))
        .filter_map(|json| serde_json::from_str::<serde_json::Value>(json).ok())
    {
        if let (Some(seq), Some(ns)) = (ack["seq"].as_u64(), ack["latency_ns"].as_u64())
            && (from..=to).contains(&seq)
        {
            seen.insert(seq, ns);
        }
    }
    let mut ns: Vec<u64> = seen.into_values().collect();
    if ns.is_empty() {
        return None;
    }
    ns.sort_unstable();
    let at = |q: f64| ns[((ns.len() - 1) as f64 * q).round() as usize] as f64 / 1e6;
    Some(Latency {
        writes: ns.len(),
        p50_ms: at(0.50),
        p99_ms: at(0.99),
        max_ms: at(1.0),
    })
}

/// Prints a table of the guest's write latency per stretch: (what, from seq, to seq).
pub fn print_latency(title: &str, logs: &str, stretches: &[(&str, u64, u64)]) {
    println!("{title}: guest block-write latency (ms), acknowledged O_DSYNC 4 KiB writes");
    println!(
        "{:<48} {:>7} {:>8} {:>8} {:>8}",
        "while", "writes", "p50", "p99", "max"
    );
    for (what, from, to) in stretches {
        match write_latency(logs, *from, *to) {
            Some(l) => println!(
                "{what:<48} {:>7} {:>8.2} {:>8.2} {:>8.2}",
                l.writes, l.p50_ms, l.p99_ms, l.max_ms
            ),
            None => println!("{what:<48} {:>7}", 0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_counts_each_write_of_the_stretch_once() {
        let logs = (1..=100)
            .map(|seq| {
                format!(
                    "LDACK {{\"seq\":{seq},\"block\":0,\"acked_ns\":0,\"latency_ns\":{}}}\n",
                    seq * 1_000_000
                )
            })
            .collect::<String>();
        // The same lines twice (two pods' logs overlapping), and a line of something else.
        let doubled = format!("{logs}LDFILE {{\"seq\":7}}\n{logs}");
        let l = write_latency(&doubled, 1, 100).expect("writes");
        assert_eq!(l.writes, 100);
        assert_eq!((l.p50_ms, l.p99_ms, l.max_ms), (51.0, 99.0, 100.0));
        assert_eq!(write_latency(&logs, 200, 300), None);
    }
}
