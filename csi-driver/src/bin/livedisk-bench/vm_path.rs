//! (k) The disk path for a VM, measured where the VM sees it: the test VM (hack/vm/vm-run's
//! `bench` mode, qemu-system-x86_64 with TCG) runs direct-I/O sequential and 4 KiB random I/O in
//! its guest on one volume of the engine, reached three ways, one VM boot each, interleaved run
//! by run:
//!
//! * the CSI consumer device, as a VM launcher pod gets it through `volumeDevices` (the node
//!   service's attach: a loop device over an nbdfuse file of the daemon's NBD export), opened by
//!   QEMU with `cache=none` as KubeVirt does for a block PVC;
//! * QEMU's own NBD client on the daemon's unix socket (no kernel device);
//! * a vhost-user-blk export of the same block node by the daemon (the guest's virtqueues served
//!   by qemu-storage-daemon itself).
//!
//! Ratios are medians of per-run ratios against the NBD path of the same run. A raw file on the
//! same filesystem as the pool, booted the same way, is the diagnostic floor of what TCG allows.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, ensure};
use livedisk_engine::{Engine, VolumeId};
use serde::Deserialize;
use serde_json::json;

use crate::report::{Row, Target, median};
use crate::scenarios::{Config, ConsumerDevice, attached_volume};
use crate::tools::{drop_caches, fill, run};

const MIB: u64 = 1 << 20;
/// QEMU's id of the vhost-user-blk export this benchmark adds (and removes).
const VHOST_EXPORT: &str = "bench-vhost-user-blk";

/// What the guest measured (livedisk-verifier's BenchReport, the `LDBENCH` line).
#[derive(Debug, Clone, Deserialize)]
struct GuestBench {
    seq_write_mibs: f64,
    seq_read_mibs: f64,
    rand_write_iops: f64,
    rand_read_iops: f64,
}

/// Where vm-run and the guest are: hack/bench.sh sets both.
struct VmTools {
    vm_run: PathBuf,
    guest: PathBuf,
}

impl VmTools {
    fn from_env() -> Result<Self> {
        let var = |name: &str| {
            std::env::var(name).map(PathBuf::from).with_context(|| {
                format!(
                    "benchmark (k) boots the test VM: run it with hack/bench.sh (make bench), \
                     which builds the guest (hack/vm/build.sh) and sets {name}"
                )
            })
        };
        Ok(Self {
            vm_run: var("LIVEDISK_BENCH_VM_RUN")?,
            guest: var("LIVEDISK_BENCH_VM_GUEST")?,
        })
    }

    /// One VM boot on `disk` (a device, a file or an NBD URI), or on a vhost-user-blk socket.
    async fn bench(&self, disk: Disk<'_>, mib: u64, ops: u64) -> Result<GuestBench> {
        let (mib, ops) = (mib.to_string(), ops.to_string());
        let vm_run = self.vm_run.display().to_string();
        let guest = self.guest.display().to_string();
        let mut args = vec![
            "bench", "--guest", &guest, "--mib", &mib, "--ops", &ops, "--cache", "none",
        ];
        match disk {
            Disk::Path(p) => args.extend(["--disk", p]),
            Disk::VhostUser(s) => args.extend(["--vhost-user", s]),
        }
        let out = run(&vm_run, &args).await?;
        parse_guest_bench(&out).with_context(|| format!("vm-run bench printed no LDBENCH: {out}"))
    }
}

#[derive(Clone, Copy)]
enum Disk<'a> {
    Path(&'a str),
    VhostUser(&'a str),
}

fn parse_guest_bench(out: &str) -> Option<GuestBench> {
    out.lines()
        .rev()
        .find_map(|l| l.strip_prefix("LDBENCH "))
        .and_then(|j| serde_json::from_str(j).ok())
}

/// The block node of the engine's consumer export of `vol` (its NBD export, whose QEMU id is
/// `v` + the first 24 hex digits of the volume's id), which the vhost-user-blk export serves too.
async fn consumer_node(e: &Engine, vol: &VolumeId) -> Result<String> {
    let exports = e
        .qmp()
        .execute("query-block-exports", json!({}))
        .await
        .context("query-block-exports")?;
    let id = format!("v{}", &vol.hex()[..24]);
    exports
        .as_array()
        .into_iter()
        .flatten()
        .find(|x| x["type"] == "nbd" && x["id"] == id.as_str())
        .and_then(|x| x["node-name"].as_str().map(str::to_owned))
        .with_context(|| format!("no NBD export {id} in {exports}"))
}

/// The three paths and the raw file, `runs` times each, interleaved.
pub async fn vm_disk_path(e: &Engine, c: &Config) -> Result<Vec<Row>> {
    let vm = VmTools::from_env()?;
    let size = c.bytes(256 * MIB);
    let mib = (size / MIB / 2).clamp(16, 128);
    let ops = 2000u64;
    let (vol, uri) = attached_volume(e, size).await?;
    progress("filling the volume and the raw file (allocated: no first-write cost)");
    fill(&uri, size).await?;
    let raw = c.dir.join("vm-raw.img");
    std::fs::File::create(&raw)
        .and_then(|f| f.set_len(size))
        .context("raw file")?;
    let raw_s = raw.display().to_string();
    fill(&raw_s, size).await?;
    let node = consumer_node(e, &vol).await?;
    let socket = c.dir.join("vub.sock");
    e.qmp()
        .execute(
            "block-export-add",
            json!({
                "type": "vhost-user-blk", "id": VHOST_EXPORT, "node-name": node,
                "addr": {"type": "unix", "path": socket}, "writable": true, "num-queues": 1,
            }),
        )
        .await
        .context("adding the vhost-user-blk export")?;
    // The export goes again whatever happens to the device or the runs.
    let measured = match ConsumerDevice::attach(e, &vol).await {
        Ok(device) => {
            let measured = measure(&vm, c, &device.path, &uri, &socket, &raw_s, mib, ops).await;
            device.release(e, &vol).await.map(|()| measured)
        }
        Err(error) => Err(error),
    };
    e.qmp()
        .execute("block-export-del", json!({"id": VHOST_EXPORT}))
        .await
        .context("removing the vhost-user-blk export")?;
    let _ = std::fs::remove_file(&raw);
    measured?
}

fn progress(msg: &str) {
    eprintln!("bench: {msg}");
}

#[allow(clippy::too_many_arguments)]
async fn measure(
    vm: &VmTools,
    c: &Config,
    device: &Path,
    uri: &str,
    vhost: &Path,
    raw: &str,
    mib: u64,
    ops: u64,
) -> Result<Vec<Row>> {
    let device = device.display().to_string();
    let vhost = vhost.display().to_string();
    let paths: [(&str, Disk); 4] = [
        ("CSI device", Disk::Path(&device)),
        ("NBD", Disk::Path(uri)),
        ("vhost-user-blk", Disk::VhostUser(&vhost)),
        ("raw file", Disk::Path(raw)),
    ];
    let runs = c.heavy_runs.clamp(1, 3);
    let mut results: Vec<Vec<GuestBench>> = vec![vec![]; paths.len()];
    for run in 0..runs {
        for (i, (name, disk)) in paths.iter().enumerate() {
            progress(&format!(
                "VM disk path: run {}/{runs}, {name} ({mib} MiB sequential, {ops} random 4 KiB)",
                run + 1
            ));
            drop_caches();
            results[i].push(vm.bench(*disk, mib, ops).await?);
        }
    }
    ensure!(results.iter().all(|r| r.len() == runs), "missing runs");
    type Metric = (&'static str, &'static str, fn(&GuestBench) -> f64);
    let metrics: [Metric; 4] = [
        ("sequential write 1 MiB", "MiB/s", |b| b.seq_write_mibs),
        ("sequential read 1 MiB", "MiB/s", |b| b.seq_read_mibs),
        ("random write 4 KiB O_DSYNC, depth 1", "IOPS", |b| {
            b.rand_write_iops
        }),
        ("random read 4 KiB, depth 1", "IOPS", |b| b.rand_read_iops),
    ];
    let nbd = &results[1];
    let mut rows = vec![];
    for (what, unit, get) in metrics {
        let peer = median(nbd.iter().map(get).collect());
        let row = |label: String, of: &[GuestBench]| Row {
            name: label,
            measured: format!("{:.0} {unit}", median(of.iter().map(get).collect())),
            peer: format!("{peer:.0} {unit}"),
            ratio: median(of.iter().zip(nbd).map(|(a, b)| get(a) / get(b)).collect()),
            target: Target::Info,
        };
        rows.push(row(
            format!("(k) VM guest {what}: CSI device (loop over nbdfuse) vs QEMU's NBD client"),
            &results[0],
        ));
        rows.push(row(
            "(k)   same on a vhost-user-blk export of the daemon vs NBD".into(),
            &results[2],
        ));
        rows.push(row(
            "(k)   same on a raw file, no daemon (diagnostic) vs NBD".into(),
            &results[3],
        ));
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guests_report_is_read_from_its_output() {
        let out = "vm-run: accelerator: tcg\nLDBENCH {\"mib\":64,\"ops\":10,\"seq_write_mibs\":50.5,\
                   \"seq_read_mibs\":80.0,\"rand_write_iops\":300.0,\"rand_read_iops\":400.0,\
                   \"rand_write_p50_us\":3000.0,\"rand_read_p50_us\":2000.0}\n\
                   LIVEDISK-RESULT mode=bench status=ok\n";
        let b = parse_guest_bench(out).expect("parsed");
        assert_eq!(b.seq_write_mibs, 50.5);
        assert_eq!(b.rand_read_iops, 400.0);
        assert!(parse_guest_bench("LIVEDISK-RESULT mode=bench status=failed").is_none());
    }
}
