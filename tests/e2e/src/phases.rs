//! The checksummed writer's phases as the data tests use them: each phase writes blocks of a
//! device once with its own tag and logs every acknowledged write, so a point in time taken after
//! a phase is exactly what the logs say; the logs, never another read through livedisk, are the
//! ground truth a snapshot, export or backup is checked against.

use std::path::Path;

use anyhow::{Result, ensure};
use kube::Client;
use kube::api::Api;
use livedisk_api::{DiskSnapshot, Phase};
use serde_json::{Value, json};

use crate::disks::{must, verifier};
use crate::eventually;

/// One phase: blocks `0..blocks` written once with `tag`, logged to `log`.
pub fn write_phase(device: &str, tag: u64, blocks: u64, log: &Path) -> Result<()> {
    let blocks = blocks.to_string();
    let output = verifier()?
        .args(["write", "--path", device, "--tag", &tag.to_string()])
        .args(["--blocks", &blocks, "--count", &blocks, "--log"])
        .arg(log)
        .output()?;
    ensure!(
        output.status.success(),
        "writer: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

/// Checks that every acknowledged write of `log` (written with `tag`) reads back from `image`
/// (a device or an image file).
pub fn verify(image: impl AsRef<Path>, tag: u64, log: &Path) -> Result<()> {
    let image = image.as_ref();
    let output = verifier()?
        .args(["verify", "--path"])
        .arg(image)
        .args(["--tag", &tag.to_string(), "--log"])
        .arg(log)
        .output()?;
    ensure!(
        output.status.success(),
        "verify {} against {} (tag {tag}): {}{}",
        image.display(),
        log.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

/// The lines of `log` for blocks at or above `from`, written to `out`.
pub fn log_from_block(log: &Path, from: u64, out: &Path) -> Result<()> {
    let text = std::fs::read_to_string(log)?;
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<Value>(l)
                .ok()
                .and_then(|v| v["block"].as_u64())
                .is_some_and(|b| b >= from)
        })
        .collect();
    ensure!(
        !kept.is_empty(),
        "no block at or above {from} in {}",
        log.display()
    );
    std::fs::write(out, kept.join("\n") + "\n")?;
    Ok(())
}

/// A DiskSnapshot of `claim`, applied, once it is Ready.
pub async fn take_snapshot(client: &Client, ns: &str, name: &str, claim: &str) -> Result<()> {
    must(
        client,
        ns,
        json!({"apiVersion": "livedisk.io/v1alpha1", "kind": "DiskSnapshot", "metadata": {"name": name},
               "spec": {"source": {"persistentVolumeClaimName": claim}}}),
    )
    .await?;
    let snapshots: Api<DiskSnapshot> = Api::namespaced(client.clone(), ns);
    eventually(90, &format!("DiskSnapshot {name} Ready"), || async {
        let status = snapshots.get(name).await?.status.unwrap_or_default();
        Ok((status.phase == Phase::Ready).then_some(()))
    })
    .await
}
