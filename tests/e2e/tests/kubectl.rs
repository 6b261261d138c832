//! What a person sees with kubectl: the `livedisk` category lists every kind with useful
//! columns, and `kubectl explain` teaches the API.

use anyhow::{Context, Result};
use livedisk_e2e::{
    TestNamespace, apply, client, error_message, kubectl, parse_manifests, workspace_root,
};

fn run(args: &[&str]) -> Result<String> {
    let output = kubectl().args(args).output().context(
        "running kubectl (put the harness's bin directory on PATH: `source .livedisk/env`)",
    )?;
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    anyhow::ensure!(
        output.status.success(),
        "kubectl {args:?} failed: {}{}",
        stdout,
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(stdout)
}

#[tokio::test]
async fn get_livedisk_lists_every_kind_with_columns() -> Result<()> {
    let client = client().await?;
    let namespace = TestNamespace::create(&client, "kubectl").await?;
    for file in [
        "10-disksnapshot.yaml",
        "20-diskmerge.yaml",
        "30-diskmigration.yaml",
        "40-diskexport.yaml",
        "50-diskrestore.yaml",
        "60-diskevacuation.yaml",
    ] {
        let yaml = std::fs::read_to_string(workspace_root().join("examples").join(file))?;
        for object in parse_manifests(&yaml)? {
            apply(&client, &namespace.name, &object)
                .await?
                .map_err(|e| anyhow::anyhow!(error_message(&e)))?;
        }
    }
    let listing = run(&["get", "livedisk", "-n", &namespace.name])?;
    for expected in [
        "disksnapshot.livedisk.io/vm-disk-before-upgrade",
        "diskmerge.livedisk.io/scratch-disk-flatten",
        "diskmigration.livedisk.io/vm-disk-to-node-b",
        "diskexport.livedisk.io/vm-disk-backup",
        "diskrestore.livedisk.io/vm-disk-rollback",
        // Cluster-scoped: listed whatever the namespace.
        "diskevacuation.livedisk.io/drain-node-c",
    ] {
        assert!(
            listing.contains(expected),
            "`kubectl get livedisk` lacks {expected}:\n{listing}"
        );
    }
    for header in [
        "SOURCE", "READY", "SIZE", "HELD", "MODE", "PROGRESS", "TO", "PROTOCOL", "SNAPSHOT",
        "NODE", "DONE", "TOTAL",
    ] {
        assert!(
            listing.contains(header),
            "`kubectl get livedisk` lacks column {header}:\n{listing}"
        );
    }
    let short = run(&["get", "dmerge", "-n", &namespace.name])?;
    assert!(
        short.contains("scratch-disk-flatten") && short.contains("Commit"),
        "{short}"
    );
    let evacuation = run(&["get", "devac", "drain-node-c"])?;
    assert!(
        evacuation.contains("drain-node-c") && evacuation.contains("node-c"),
        "{evacuation}"
    );
    run(&["delete", "devac", "drain-node-c", "--wait=true"])?;
    namespace.delete().await
}

#[test]
fn explain_teaches_the_api() -> Result<()> {
    let spec = run(&["explain", "disksnapshot.spec"])?;
    for expected in [
        "source",
        "freeze",
        "deletionPolicy",
        "VirtualMachine",
        "exactly one",
    ] {
        assert!(
            spec.contains(expected),
            "`kubectl explain disksnapshot.spec` lacks {expected:?}:\n{spec}"
        );
    }
    let merge = run(&["explain", "diskmerge.spec.bandwidthLimit"])?;
    assert!(merge.contains("bytes per second"), "{merge}");
    Ok(())
}
