//! A running VM and its disks moved from node-a to node-b while the guest writes, in the order
//! KubeVirt users move one: the VM first, then its disks. The disks are ReadWriteMany block PVCs.
//!
//! 1. The VM runs in a pod on node-a (the test VM's live mode, docs/vm-test.md): a block writer
//!    on one disk, ext4 with a file writer on the other, a real qemu-guest-agent.
//! 2. The same VM starts on node-b with `-incoming`, its disks staged there too: node-b uses them
//!    through remote attachments to node-a, which holds them.
//! 3. QEMU's live migration moves the guest from node-a's pod to node-b's (hack/vm/migrate plays
//!    virt-handler, which drives it over QEMU's monitor in KubeVirt); the source pod ends saying
//!    its guest moved away.
//! 4. A DiskMigration of each disk brings the volume to node-b under the running guest (its
//!    consumer on the target): the engine mirrors it live and cuts over, node-b's exports are
//!    switched to the local volumes under the guest, and the remote attachments to node-a go.
//! 5. The guest, shut down through its agent on node-b, verifies every write it acknowledged on
//!    both disks, before and after both moves.

use anyhow::{Context, Result, bail, ensure};
use kube::api::Api;
use livedisk_api::internal::{LivediskAttachment, attachment_name};
use livedisk_api::{DiskMigration, Phase};
use livedisk_e2e::eventually;
use livedisk_node_e2e::live_vm::{last_seq, migrate};
use livedisk_node_e2e::{Cluster, TestNamespace, VolumeMode, live_vm};
use serde_json::json;

const SOURCE: &str = "node-a";
const TARGET: &str = "node-b";
const DISKS: [&str; 2] = ["mig-blocks", "mig-data"];
const TAG: u64 = 5;
const PORT: u16 = 4444;

#[tokio::test]
async fn a_running_vm_moves_to_another_node_without_an_io_error() -> Result<()> {
    let cluster = Cluster::connect().await?;
    let ns = TestNamespace::create(&cluster.client, "vm-migration").await?;
    let n = ns.name.as_str();
    for claim in DISKS {
        cluster
            .create_pvc_with(n, claim, VolumeMode::Block, "ReadWriteMany", None)
            .await?;
    }
    let source_script = live_vm::script(TAG, "");
    cluster
        .run_pod(n, &live_vm::pod("vm-a", SOURCE, DISKS, &source_script))
        .await?;
    live_vm::wait_writing(&cluster, n, "vm-a").await?;
    let idle_upto = last_seq(&cluster.logs(n, "vm-a").await?, "LDACK ").unwrap_or(0);

    // 2. The destination: the same VM, waiting for its state on node-b with the same disks
    // (attached there remotely: node-a holds them).
    let target_script = live_vm::script(TAG, &format!("--incoming tcp:0.0.0.0:{PORT}"));
    cluster
        .run_pod(n, &live_vm::pod("vm-b", TARGET, DISKS, &target_script))
        .await?;
    let target_qmp = cluster.ack_path(TARGET, n, "qmp.sock");
    let waiting = eventually(240, "the destination QEMU on node-b", || async {
        let logs = cluster.logs(n, "vm-b").await.unwrap_or_default();
        Ok((target_qmp.exists() && logs.contains("waiting for a live migration")).then_some(()))
    })
    .await;
    if let Err(error) = waiting {
        eprintln!("{}", cluster.describe(n, "vm-b").await);
        return Err(error);
    }
    let attachments: Api<LivediskAttachment> = Api::all(cluster.client.clone());
    let mut volumes = vec![];
    for claim in DISKS {
        let volume = cluster.volume_handle(n, claim).await?;
        ensure!(
            attachments
                .get_opt(&attachment_name(&volume, TARGET))
                .await?
                .is_some(),
            "{claim} ({volume}) is not attached remotely on {TARGET}"
        );
        volumes.push(volume);
    }

    // 3. The guest moves.
    let target_ip = cluster
        .pods(n)
        .get("vm-b")
        .await?
        .status
        .and_then(|s| s.pod_ip)
        .context("vm-b has no pod IP")?;
    let before = last_seq(&cluster.logs(n, "vm-a").await?, "LDACK ").unwrap_or(0);
    let summary = migrate(
        &cluster.ack_path(SOURCE, n, "qmp.sock"),
        &format!("tcp:{target_ip}:{PORT}"),
    )?;
    ensure!(summary["status"] == "completed", "migration: {summary}");
    // A migration that moved memory took time: 0 would be a figure read before QEMU set it.
    ensure!(
        summary["total_ms"].as_u64().is_some_and(|ms| ms > 0),
        "the migration's summary has no total time: {summary}"
    );
    println!(
        "QEMU migrated node-a -> node-b: total {} ms, guest paused {} ms, {} bytes sent",
        summary["total_ms"], summary["downtime_ms"], summary["transferred_bytes"]
    );
    cluster.wait_phase(n, "vm-a", "Succeeded", 120).await?;
    let source_logs = cluster.logs(n, "vm-a").await?;
    ensure!(
        source_logs.contains("LIVEDISK-MIGRATED"),
        "the source pod's end: {}",
        source_logs.lines().last().unwrap_or_default()
    );
    let moved_at = last_seq(&source_logs, "LDACK ").unwrap_or(0);
    ensure!(moved_at >= before, "acks went backwards on the source");
    eventually(120, "the guest writing on node-b", || async {
        let logs = cluster.logs(n, "vm-b").await.unwrap_or_default();
        Ok(last_seq(&logs, "LDACK ")
            .filter(|s| *s > moved_at + 200)
            .and(last_seq(&logs, "LDFILE ")))
    })
    .await?;

    // 4. The disks follow the guest: DiskMigrations to node-b, whose guest uses them remotely.
    let migrations: Api<DiskMigration> = Api::namespaced(cluster.client.clone(), n);
    let disks_from = last_seq(&cluster.logs(n, "vm-b").await?, "LDACK ").unwrap_or(0);
    for claim in DISKS {
        cluster
            .create_object(
                n,
                json!({"apiVersion": "livedisk.io/v1alpha1", "kind": "DiskMigration",
                       "metadata": {"name": claim},
                       "spec": {"persistentVolumeClaimName": claim, "targetNodeName": TARGET,
                                "verify": true}}),
            )
            .await?;
    }
    for claim in DISKS {
        let done = eventually(600, &format!("DiskMigration {claim} Completed"), || async {
            let status = migrations.get(claim).await?.status.unwrap_or_default();
            match status.phase {
                Phase::Completed => Ok(Some(status)),
                Phase::Failed | Phase::Cancelled => bail!("DiskMigration {claim}: {status:?}"),
                _ => Ok(None),
            }
        })
        .await?;
        println!(
            "DiskMigration {claim}: {}",
            serde_json::to_string(&done).unwrap_or_default()
        );
    }
    let after_disks = last_seq(&cluster.logs(n, "vm-b").await?, "LDACK ").unwrap_or(0);
    // node-b's guest no longer goes through node-a: its remote attachments are withdrawn (their
    // connections end with them), and the guest goes on writing.
    for volume in &volumes {
        let name = attachment_name(volume, TARGET);
        eventually(
            120,
            &format!("LivediskAttachment {name} withdrawn"),
            || async { Ok(attachments.get_opt(&name).await?.is_none().then_some(())) },
        )
        .await?;
    }
    eventually(
        120,
        "the guest on node-b writing to its disks, now local",
        || async {
            let logs = cluster.logs(n, "vm-b").await.unwrap_or_default();
            Ok(last_seq(&logs, "LDACK ").filter(|s| *s > after_disks + 200))
        },
    )
    .await?;

    let on_b = last_seq(&cluster.logs(n, "vm-b").await?, "LDACK ").unwrap_or(0);
    let both = format!("{source_logs}{}", cluster.logs(n, "vm-b").await?);
    live_vm::print_latency(
        "live_vm_migration",
        &both,
        &[
            ("idle on node-a (before any move)", 1, idle_upto),
            (
                "QEMU's migration (the ask to the last ack on a)",
                before,
                moved_at + 1,
            ),
            (
                "the two DiskMigrations, start to Completed",
                disks_from,
                after_disks,
            ),
            ("on node-b after both moves", after_disks, on_b),
        ],
    );

    // 5. Shut down through its agent on node-b: the guest verifies both disks, every write of
    // its whole life (before and after both moves).
    let socket = cluster.ack_path(TARGET, n, "qga.sock");
    let result = live_vm::shut_down_verified(&cluster, n, "vm-b", &socket).await?;
    let writes: u64 = result
        .split_whitespace()
        .find_map(|w| w.strip_prefix("writes="))
        .and_then(|w| w.parse().ok())
        .context("no writes= in the result")?;
    ensure!(
        writes > after_disks,
        "the guest's log ({writes} writes) covers the writes before the disks moved ({after_disks})"
    );
    println!("guest moved after block ack {moved_at}, disks after {after_disks}; {result}");
    ns.delete().await
}
