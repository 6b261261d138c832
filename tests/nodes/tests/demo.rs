//! `make demo`'s story as a test: hack/demo.sh on the chart's real nodes, in a namespace of its
//! own. The script asserts each step itself (the snapshot's ext4 clean on a clone, the merge
//! completed, QEMU's migration completed, then the disks' migrations to the guest's new node
//! completed and its remote attachments withdrawn, three backups over HTTPS restored into
//! a new volume equal byte for byte to the last snapshot, the guest's own verification of every
//! write after both moves, a rollback with the VM stopped that the guest verifies when it boots
//! again) and ends with one summary line; the test checks that line, the guests' results and the
//! comparison in the output.

use anyhow::{Context, Result, ensure};
use livedisk_node_e2e::Cluster;

#[tokio::test]
async fn make_demo_runs_its_story_on_real_nodes() -> Result<()> {
    let cluster = Cluster::connect().await?;
    // The script makes the namespace itself (and deletes it at the end).
    let namespace = format!("demo-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let output = std::process::Command::new(livedisk_e2e::workspace_root().join("hack/demo.sh"))
        .env("LIVEDISK_STATE_DIR", &cluster.state)
        .env("LIVEDISK_DEMO_NAMESPACE", &namespace)
        .output()
        .context("running hack/demo.sh")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    ensure!(
        output.status.success(),
        "hack/demo.sh failed ({}):\n{stderr}",
        output.status
    );
    let summary = stdout
        .lines()
        .rfind(|l| l.starts_with("demo: "))
        .unwrap_or_default();
    ensure!(
        summary.starts_with("demo: ok in ") && summary.contains("no I/O error"),
        "the summary: {summary}"
    );
    ensure!(
        stdout.contains("LIVEDISK-RESULT mode=live status=ok")
            && stdout.contains("verified=vda,ext4"),
        "the guest's result is in the output"
    );
    ensure!(
        stdout.contains("| equal byte for byte"),
        "the restore pod's comparison is in the output"
    );
    ensure!(
        stdout
            .lines()
            .any(|l| l.contains("LIVEDISK-RESULT mode=verify status=ok")
                && l.contains("point_in_time=")),
        "the rebooted guest's point-in-time check of the rolled-back disk is in the output"
    );
    ensure!(
        stdout.contains("node-b's guest now writes to its local volumes"),
        "the disks followed the VM and node-b's guest uses them locally"
    );
    for step in [
        "incremental backups",
        "a DiskMerge",
        "QEMU's live migration",
        "DiskMigrations of both disks",
    ] {
        ensure!(
            stdout.lines().any(|l| l.trim_start().starts_with(step)),
            "no latency row for {step:?}"
        );
    }
    Ok(())
}
