//! What the README promises after `make up`: `kubectl apply -f examples/` on the chart's nodes.
//! The consumer pod is started by kubelet with the provisioned disk, the VolumeSnapshot and the
//! DiskSnapshot of that disk become ready, and the DiskMerge example completes on its own disk
//! (with its own writer pod and snapshot) without touching them.

use anyhow::{Context, Result, ensure};
use livedisk_e2e::{eventually, kubectl, workspace_root};
use livedisk_node_e2e::{Cluster, TestNamespace};

fn kubectl_out(args: &[&str]) -> Result<String> {
    let out = kubectl().args(args).output().context("running kubectl")?;
    ensure!(
        out.status.success(),
        "kubectl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[tokio::test]
async fn the_examples_run_on_real_nodes() -> Result<()> {
    let cluster = Cluster::connect().await?;
    let ns = TestNamespace::create(&cluster.client, "examples").await?;
    let examples = workspace_root().join("examples");
    let examples = examples.to_string_lossy();
    kubectl_out(&["apply", "-n", &ns.name, "-f", &examples])?;
    cluster
        .wait_running(&ns.name, "vm-launcher", 0, 180)
        .await?;
    for (kind, name, jsonpath) in [
        ("volumesnapshot", "vm-disk-snap", "{.status.readyToUse}"),
        (
            "disksnapshot",
            "vm-disk-before-upgrade",
            "{.status.conditions[?(@.type==\"Ready\")].status}",
        ),
    ] {
        let what = format!("{kind} {name} ready");
        let namespace = ns.name.clone();
        eventually(120, &what, || {
            let namespace = namespace.clone();
            async move {
                let out = kubectl_out(&[
                    "get",
                    "-n",
                    &namespace,
                    kind,
                    name,
                    "-o",
                    &format!("jsonpath={jsonpath}"),
                ])?;
                Ok(matches!(out.trim(), "true" | "True").then_some(()))
            }
        })
        .await?;
    }
    // The merge example works on its own disk: it completes (its snapshot is merged away), and
    // the other examples' snapshots are still there and ready afterwards.
    let namespace = ns.name.clone();
    eventually(180, "DiskMerge scratch-disk-flatten Completed", || {
        let namespace = namespace.clone();
        async move {
            let out = kubectl_out(&[
                "get",
                "-n",
                &namespace,
                "diskmerge",
                "scratch-disk-flatten",
                "-o",
                "jsonpath={.status.phase} {.status.progress.percent}",
            ])?;
            ensure!(
                !out.starts_with("Failed") && !out.starts_with("Cancelled"),
                "the example merge ended {out}"
            );
            Ok((out.trim() == "Completed 100").then_some(()))
        }
    })
    .await?;
    for (kind, name) in [
        ("volumesnapshot", "vm-disk-snap"),
        ("disksnapshot", "vm-disk-before-upgrade"),
    ] {
        kubectl_out(&["get", "-n", &ns.name, kind, name])
            .with_context(|| format!("{kind} {name} after the example merge"))?;
    }
    kubectl_out(&[
        "delete",
        "-n",
        &ns.name,
        "--wait=true",
        "--ignore-not-found",
        "-f",
        &examples,
    ])?;
    ns.delete().await
}
