//! What the CSI-level end-to-end tests share about block disks in the processes layout: the
//! objects they apply (a 64 MiB block claim, a consumer pod that binds it on a node), the host
//! device a published volume is, the checksummed verifier, and a scratch directory for its logs.

use std::process::Command;

use anyhow::{Context, Result};
use kube::Client;
use serde_json::{Value, json};

use crate::csi::in_node;
use crate::{apply, error_message, workspace_binary};

/// Applies an object the test needs; the API server's refusal is the test's failure.
pub async fn must(client: &Client, namespace: &str, object: Value) -> Result<()> {
    apply(client, namespace, &object)
        .await?
        .map_err(|e| anyhow::anyhow!(error_message(&e)))?;
    Ok(())
}

/// A 64 MiB block claim of the livedisk class, restored from a VolumeSnapshot when given.
pub fn pvc(name: &str, data_source: Option<&str>) -> Value {
    pvc_of_size(name, data_source, "64Mi")
}

/// [`pvc`] of another size (a quantity).
pub fn pvc_of_size(name: &str, data_source: Option<&str>, size: &str) -> Value {
    let mut spec = json!({"storageClassName": "livedisk", "volumeMode": "Block", "accessModes": ["ReadWriteOnce"],
                          "resources": {"requests": {"storage": size}}});
    if let Some(snapshot) = data_source {
        spec["dataSource"] = json!({"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": snapshot});
    }
    json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name}, "spec": spec})
}

/// A pod using `claim` as a block device, on `node` when given: scheduling it binds the claim
/// (WaitForFirstConsumer); no kubelet runs it in this layout.
pub fn pod(name: &str, claim: &str, node: Option<&str>) -> Value {
    let mut spec = json!({"containers": [{"name": "c", "image": "busybox",
                            "volumeDevices": [{"name": "d", "devicePath": "/dev/xvda"}]}],
                          "volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": claim}}]});
    if let Some(node) = node {
        spec["nodeSelector"] = json!({"kubernetes.io/hostname": node});
    }
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec})
}

/// The host path of the block device published at `target` inside the node's namespace.
pub fn host_device(node_name: &str, target: &str) -> Result<String> {
    let output = in_node(node_name, &["stat", "-L", "-c", "%t:%T", target])?;
    let text = String::from_utf8_lossy(&output.stdout);
    let (major, minor) = text.trim().split_once(':').context("stat output")?;
    let (major, minor) = (
        u32::from_str_radix(major, 16)?,
        u32::from_str_radix(minor, 16)?,
    );
    let uevent = std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/uevent"))?;
    let name = uevent
        .lines()
        .find_map(|l| l.strip_prefix("DEVNAME="))
        .context("no DEVNAME")?;
    Ok(format!("/dev/{name}"))
}

/// The checksummed writer and verifier (`tests/verifier`).
pub fn verifier() -> Result<Command> {
    Ok(Command::new(workspace_binary("livedisk-verifier")?))
}

/// A directory for the writer's logs, removed at the end.
pub struct ScratchDir(pub std::path::PathBuf);

impl ScratchDir {
    pub fn new(prefix: &str) -> std::io::Result<Self> {
        let p = std::env::temp_dir().join(format!("{prefix}-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&p)?;
        Ok(Self(p))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A block PVC bound on `node`: created with a consumer pod pinned there (no kubelet runs it in
/// the processes layout; the test stages the volume itself as kubelet would), then the pod is
/// removed. The volume's ID.
pub async fn claim_bound_on(client: &Client, ns: &str, claim: &str, node: &str) -> Result<String> {
    claim_of_size_bound_on(client, ns, claim, "64Mi", node).await
}

/// [`claim_bound_on`] for a claim of another size (a quantity).
pub async fn claim_of_size_bound_on(
    client: &Client,
    ns: &str,
    claim: &str,
    size: &str,
    node: &str,
) -> Result<String> {
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::{Api, DeleteParams};
    must(client, ns, pvc_of_size(claim, None, size)).await?;
    let consumer = format!("{claim}-consumer");
    must(client, ns, pod(&consumer, claim, Some(node))).await?;
    let (volume, bound) = crate::bound_volume(client, ns, claim, &consumer).await?;
    anyhow::ensure!(bound == node, "the consumer was scheduled on {bound}");
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let _ = pods
        .delete(
            &consumer,
            &DeleteParams {
                grace_period_seconds: Some(0),
                ..Default::default()
            },
        )
        .await;
    Ok(volume)
}
