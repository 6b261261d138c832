//! Helpers for the end-to-end tests on real nodes: the local cluster of `make test`'s second
//! phase (hack/lib/chart-cluster.sh), where kubelet, containerd and runc run pods on node-a and
//! node-b and the Helm chart runs livedisk. Tests act as users act: they create PVCs and pods and
//! let kubelet call the driver; they read results from pod phases, exit codes and logs.
//!
//! A writer pod runs the checksummed writer (`livedisk-verifier write`) on its volume and logs every
//! acknowledged write to a node directory (hostPath), so that the log outlives the pod, the
//! container and the node's processes; a reader pod verifies every logged write.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{Node, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::CSINode;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, LogParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::{Client, ResourceExt};
use livedisk_e2e::eventually;
use serde_json::json;

pub use livedisk_e2e::TestNamespace;

pub mod live_vm;

pub const DRIVER: &str = "csi.livedisk.io";
pub const CHART_NAMESPACE: &str = "livedisk-system";
/// Where writer pods log acknowledged writes, inside every node (a node-private directory).
const ACK_ROOT_IN_NODE: &str = "/var/lib/livedisk/e2e-acks";
/// Blocks the writers cycle over (4 KiB each): 16 MiB, so each block is rewritten many times.
pub const BLOCKS: u64 = 4096;

/// The cluster of real nodes with the chart installed, or an error that says how to get one.
pub struct Cluster {
    pub client: Client,
    /// LIVEDISK_STATE_DIR of the cluster (nodes' directories live under `nodes/`).
    pub state: PathBuf,
    /// The image with `livedisk-verifier` (and the test VM), imported into every node.
    pub test_image: String,
}

impl Cluster {
    pub async fn connect() -> Result<Self> {
        let hint = "these tests need the chart on real nodes: run them through `make test` \
                    (its second phase), or `make up` and then `source .livedisk/env`";
        let state = std::env::var_os("LIVEDISK_STATE_DIR")
            .map(PathBuf::from)
            .with_context(|| format!("LIVEDISK_STATE_DIR is not set: {hint}"))?;
        let test_image = std::env::var("LIVEDISK_TEST_IMAGE")
            .with_context(|| format!("LIVEDISK_TEST_IMAGE is not set: {hint}"))?;
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            bail!("these tests stop and start nodes and read node directories: run them as root");
        }
        let client = livedisk_e2e::client().await?;
        for node in ["node-a", "node-b"] {
            let n = Api::<Node>::all(client.clone())
                .get(node)
                .await
                .with_context(|| format!("Node {node}: {hint}"))?;
            let runtime = n
                .status
                .and_then(|s| s.node_info)
                .map(|i| i.container_runtime_version)
                .unwrap_or_default();
            if !runtime.starts_with("containerd://") {
                bail!("Node {node} has no real kubelet (runtime {runtime:?}): {hint}");
            }
            let csinode = Api::<CSINode>::all(client.clone()).get(node).await?;
            if !csinode.spec.drivers.iter().any(|d| d.name == DRIVER) {
                bail!("{DRIVER} is not registered on {node}: {hint}");
            }
        }
        Ok(Self {
            client,
            state,
            test_image,
        })
    }

    pub fn pods(&self, ns: &str) -> Api<Pod> {
        Api::namespaced(self.client.clone(), ns)
    }

    /// A PVC of the chart's StorageClass.
    pub async fn create_pvc(&self, ns: &str, name: &str, mode: VolumeMode) -> Result<()> {
        self.create_pvc_from(ns, name, mode, None).await
    }

    /// A PVC of the chart's StorageClass, restored from a VolumeSnapshot when `snapshot` is set.
    pub async fn create_pvc_from(
        &self,
        ns: &str,
        name: &str,
        mode: VolumeMode,
        snapshot: Option<&str>,
    ) -> Result<()> {
        self.create_pvc_with(ns, name, mode, "ReadWriteOnce", snapshot)
            .await
    }

    /// A PVC of the chart's StorageClass with one access mode (`ReadWriteMany`: a block volume
    /// several nodes attach at once).
    pub async fn create_pvc_with(
        &self,
        ns: &str,
        name: &str,
        mode: VolumeMode,
        access_mode: &str,
        snapshot: Option<&str>,
    ) -> Result<()> {
        let mut spec = json!({
            "accessModes": [access_mode], "storageClassName": "livedisk",
            "volumeMode": mode.as_str(), "resources": {"requests": {"storage": "256Mi"}}
        });
        if let Some(snapshot) = snapshot {
            spec["dataSource"] = json!({
                "apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": snapshot
            });
        }
        let pvc: PersistentVolumeClaim = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": name},
            "spec": spec
        }))?;
        Api::<PersistentVolumeClaim>::namespaced(self.client.clone(), ns)
            .create(&PostParams::default(), &pvc)
            .await
            .with_context(|| format!("creating PVC {ns}/{name}"))?;
        Ok(())
    }

    /// Creates a pod on `node` running `script` (sh -c) in the test image, with `claim` at
    /// [`VolumeMode::path`] and the node's ack directory of this namespace at /ack.
    pub async fn run_pod(&self, ns: &str, spec: &PodSpec<'_>) -> Result<()> {
        let mut mounts = vec![json!({"name": "ack", "mountPath": "/ack"})];
        let mut devices = vec![];
        let mut volumes = vec![json!({"name": "ack", "hostPath": {
            "path": format!("{ACK_ROOT_IN_NODE}/{ns}"), "type": "DirectoryOrCreate"}})];
        for (i, claim) in spec.claims.iter().enumerate() {
            let name = format!("claim{i}");
            match claim.mode {
                VolumeMode::Filesystem => {
                    mounts.push(json!({"name": name, "mountPath": claim.path}))
                }
                VolumeMode::Block => devices.push(json!({"name": name, "devicePath": claim.path})),
            }
            volumes.push(json!({"name": name, "persistentVolumeClaim": {"claimName": claim.name}}));
        }
        let container = json!({
            "name": "main", "image": self.test_image, "imagePullPolicy": "Never",
            "command": ["sh", "-c", spec.script],
            "volumeMounts": mounts, "volumeDevices": devices,
        });
        let pod: Pod = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": spec.name},
            "spec": {
                // Through the scheduler (not nodeName): WaitForFirstConsumer provisions on its choice.
                "nodeSelector": {"kubernetes.io/hostname": spec.node},
                "restartPolicy": spec.restart_policy,
                "terminationGracePeriodSeconds": 2,
                "enableServiceLinks": false,
                // Only a pod that acts as an account (a backup tool) gets a token.
                "serviceAccountName": spec.service_account.unwrap_or("default"),
                "automountServiceAccountToken": spec.service_account.is_some(),
                "containers": [container],
                "volumes": volumes,
            }
        }))?;
        self.pods(ns)
            .create(&PostParams::default(), &pod)
            .await
            .with_context(|| format!("creating pod {ns}/{}", spec.name))?;
        Ok(())
    }

    /// Runs pod "reader" on `node` with `claim`: `before` (shell, may be empty), then the
    /// verifier over every ack in /ack/`log`. Fails unless the pod succeeds with no mismatch;
    /// returns its output, then deletes it.
    pub async fn read_back(
        &self,
        ns: &str,
        node: &str,
        claim: &str,
        mode: VolumeMode,
        log: &str,
        before: &str,
    ) -> Result<String> {
        let script = format!("{before}{}", verify_script(mode, log));
        let spec = PodSpec::once("reader", node, claim, mode, &script);
        self.run_pod(ns, &spec).await?;
        self.wait_phase(ns, "reader", "Succeeded", 180).await?;
        let report = self.logs(ns, "reader").await?;
        if !report.contains("\"mismatches\": []") {
            bail!("the reader's report: {report}");
        }
        self.delete_pod(ns, "reader").await?;
        Ok(report)
    }

    /// Waits until the pod's phase is one of `phases`; fails at once if it ends otherwise.
    pub async fn wait_phase(&self, ns: &str, name: &str, phase: &str, secs: u64) -> Result<Pod> {
        let pods = self.pods(ns);
        let result = eventually(secs, &format!("pod {ns}/{name} {phase}"), || {
            let pods = pods.clone();
            async move {
                let pod = pods.get(name).await?;
                let now = pod_phase(&pod);
                if now == phase {
                    return Ok(Some(pod));
                }
                if (now == "Succeeded" || now == "Failed") && now != phase {
                    bail!("pod {name} ended {now}, expected {phase}");
                }
                Ok(None)
            }
        })
        .await;
        if result.is_err() {
            eprintln!("{}", self.describe(ns, name).await);
        }
        result
    }

    /// Waits until the pod's container runs (and, with `restarts`, has restarted that often).
    pub async fn wait_running(&self, ns: &str, name: &str, restarts: i32, secs: u64) -> Result<()> {
        let pods = self.pods(ns);
        let result = eventually(secs, &format!("pod {ns}/{name} running"), || {
            let pods = pods.clone();
            async move {
                let pod = pods.get(name).await?;
                let status = pod
                    .status
                    .as_ref()
                    .and_then(|s| s.container_statuses.as_ref())
                    .and_then(|c| c.first().cloned());
                Ok(status
                    .filter(|c| {
                        c.restart_count >= restarts
                            && c.state.as_ref().is_some_and(|s| s.running.is_some())
                    })
                    .map(|_| ()))
            }
        })
        .await;
        if result.is_err() {
            eprintln!("{}", self.describe(ns, name).await);
        }
        result
    }

    pub async fn logs(&self, ns: &str, name: &str) -> Result<String> {
        Ok(self.pods(ns).logs(name, &LogParams::default()).await?)
    }

    /// The pod's status, events and logs, for a failure message.
    pub async fn describe(&self, ns: &str, name: &str) -> String {
        let mut kubectl = livedisk_e2e::kubectl();
        kubectl.args(["-n", ns, "describe", "pod", name]);
        let describe = kubectl
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let logs = self.logs(ns, name).await.unwrap_or_default();
        format!("--- pod {ns}/{name}\n{describe}\n--- logs\n{logs}")
    }

    /// Deletes the pod and waits until kubelet has finished with it (volumes unpublished).
    pub async fn delete_pod(&self, ns: &str, name: &str) -> Result<()> {
        let pods = self.pods(ns);
        pods.delete(name, &DeleteParams::default()).await?;
        eventually(120, &format!("pod {ns}/{name} gone"), || {
            let pods = pods.clone();
            async move { Ok(pods.get_opt(name).await?.is_none().then_some(())) }
        })
        .await
    }

    /// A file of the ack directory that pods of `ns` on `node` see at /ack, on this host.
    pub fn ack_path(&self, node: &str, ns: &str, file: &str) -> PathBuf {
        self.state
            .join("nodes")
            .join(node)
            .join(ACK_ROOT_IN_NODE.trim_start_matches('/'))
            .join(ns)
            .join(file)
    }

    /// The ack log a writer pod on `node` wrote, read from the node's directory on this host.
    pub fn ack_log(&self, node: &str, ns: &str, file: &str) -> Result<String> {
        let path = self.ack_path(node, ns, file);
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
    }

    /// Waits until the writer on `node` has acknowledged at least `n` writes (in total). A writer
    /// that stops is reported with what the pods of `ns` and livedisk's pods on `node` say.
    pub async fn wait_acks(&self, node: &str, ns: &str, file: &str, n: usize) -> Result<usize> {
        let waited = eventually(
            120,
            &format!("{n} acknowledged writes in {file}"),
            || async move {
                let count = self
                    .ack_log(node, ns, file)
                    .map(|l| ack_count(&l))
                    .unwrap_or(0);
                Ok((count >= n).then_some(count))
            },
        )
        .await;
        match waited {
            Ok(count) => Ok(count),
            Err(error) => {
                let last = self
                    .ack_log(node, ns, file)
                    .map(|l| format!("{} acks; last: {:?}", ack_count(&l), l.lines().last()))
                    .unwrap_or_else(|e| e.to_string());
                let diagnosis = self.diagnose(ns, node).await;
                Err(error.context(format!("{last}\n{diagnosis}")))
            }
        }
    }

    /// What a failure message needs: every pod of `ns` (status, events, logs) and the recent logs
    /// of livedisk's pods on `node`.
    pub async fn diagnose(&self, ns: &str, node: &str) -> String {
        let mut text = String::new();
        if let Ok(list) = self.pods(ns).list(&ListParams::default()).await {
            for pod in list.items {
                text.push_str(&self.describe(ns, &pod.name_any()).await);
            }
        }
        let chart = self.pods(CHART_NAMESPACE);
        if let Ok(list) = chart.list(&ListParams::default()).await {
            let on_node = list
                .items
                .into_iter()
                .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node));
            for pod in on_node {
                let containers: Vec<String> = pod
                    .spec
                    .iter()
                    .flat_map(|s| s.containers.iter().map(|c| c.name.clone()))
                    .collect();
                let statuses = pod
                    .status
                    .as_ref()
                    .and_then(|s| s.container_statuses.clone())
                    .unwrap_or_default();
                for container in containers {
                    let status = statuses.iter().find(|c| c.name == container);
                    let restarts = status.map_or(0, |c| c.restart_count);
                    let params = LogParams {
                        container: Some(container.clone()),
                        tail_lines: Some(40),
                        ..LogParams::default()
                    };
                    let logs = chart
                        .logs(&pod.name_any(), &params)
                        .await
                        .unwrap_or_else(|e| e.to_string());
                    text.push_str(&format!(
                        "--- {CHART_NAMESPACE}/{} [{container}] restarts {restarts} (last 40 lines)\n{logs}\n",
                        pod.name_any()
                    ));
                    // A restarted container's previous run usually holds the cause.
                    if restarts > 0 {
                        let last = status
                            .and_then(|c| c.last_state.as_ref())
                            .and_then(|s| s.terminated.as_ref())
                            .map(|t| {
                                format!(
                                    "exit {} signal {:?} reason {:?}",
                                    t.exit_code, t.signal, t.reason
                                )
                            })
                            .unwrap_or_default();
                        let previous = chart
                            .logs(
                                &pod.name_any(),
                                &LogParams {
                                    previous: true,
                                    ..params.clone()
                                },
                            )
                            .await
                            .unwrap_or_else(|e| e.to_string());
                        text.push_str(&format!(
                            "--- {CHART_NAMESPACE}/{} [{container}] previous run ({last})\n{previous}\n",
                            pod.name_any()
                        ));
                    }
                }
            }
        }
        text
    }

    /// The node plugin pod (chart DaemonSet) on `node`.
    pub async fn node_plugin_pod(&self, node: &str) -> Result<Pod> {
        let pods = self.pods(CHART_NAMESPACE);
        let list = pods
            .list(&ListParams::default().labels("app.kubernetes.io/component=node"))
            .await?;
        list.items
            .into_iter()
            .find(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node))
            .with_context(|| format!("no node plugin pod on {node}"))
    }

    /// Waits until a node plugin pod other than `old` runs on `node` and kubelet lists the driver.
    pub async fn wait_node_plugin_replaced(&self, node: &str, old: &str) -> Result<Pod> {
        eventually(
            180,
            &format!("a new node plugin on {node}"),
            || async move {
                let Ok(pod) = self.node_plugin_pod(node).await else {
                    return Ok(None);
                };
                let ready = pod
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
                Ok((pod.name_any() != old && ready).then_some(pod))
            },
        )
        .await
    }

    /// The CSI volume handle of a bound PVC.
    pub async fn volume_handle(&self, ns: &str, claim: &str) -> Result<String> {
        let pvc = Api::<PersistentVolumeClaim>::namespaced(self.client.clone(), ns)
            .get(claim)
            .await
            .with_context(|| format!("reading PVC {ns}/{claim}"))?;
        let pv_name = pvc
            .spec
            .and_then(|s| s.volume_name)
            .with_context(|| format!("PVC {ns}/{claim} is not bound"))?;
        let pv = Api::<k8s_openapi::api::core::v1::PersistentVolume>::all(self.client.clone())
            .get(&pv_name)
            .await
            .with_context(|| format!("reading PV {pv_name}"))?;
        pv.spec
            .and_then(|s| s.csi)
            .map(|c| c.volume_handle)
            .with_context(|| format!("PV {pv_name} is not a CSI volume"))
    }

    /// The backing files of `node`'s loop devices, as the kernel names them inside the node (by
    /// full path there).
    pub fn loop_backing_files(&self, node: &str) -> Result<Vec<String>> {
        let listing = self.hack(
            "hack/node.sh",
            &[
                "exec",
                node,
                "--",
                "sh",
                "-c",
                "cat /sys/block/loop*/loop/backing_file 2>/dev/null || true",
            ],
        )?;
        Ok(listing.lines().map(str::to_string).collect())
    }

    /// Waits until no loop device of `node` goes over a front end of `volume` (it was unstaged
    /// and its loop device released).
    pub async fn wait_no_loop_device(&self, node: &str, volume: &str) -> Result<()> {
        let needle = format!("/attach/{volume}/");
        eventually(
            60,
            &format!("no loop device of volume {volume} on {node}"),
            || {
                let needle = needle.clone();
                async move {
                    let files = self.loop_backing_files(node)?;
                    Ok((!files.iter().any(|f| f.contains(&needle))).then_some(()))
                }
            },
        )
        .await
    }

    /// The namespace's VolumeSnapshots.
    pub fn volume_snapshots(&self, ns: &str) -> Api<DynamicObject> {
        Api::namespaced_with(
            self.client.clone(),
            ns,
            &ApiResource::from_gvk(&GroupVersionKind::gvk(
                "snapshot.storage.k8s.io",
                "v1",
                "VolumeSnapshot",
            )),
        )
    }

    /// Creates VolumeSnapshot `name` of `claim` (class livedisk) and waits until it is ready.
    pub async fn snapshot_ready(&self, ns: &str, name: &str, claim: &str) -> Result<()> {
        let snapshots = self.volume_snapshots(ns);
        let snapshot: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
            "metadata": {"name": name},
            "spec": {"volumeSnapshotClassName": "livedisk",
                     "source": {"persistentVolumeClaimName": claim}}
        }))?;
        snapshots
            .create(&PostParams::default(), &snapshot)
            .await
            .with_context(|| format!("creating VolumeSnapshot {ns}/{name}"))?;
        eventually(120, &format!("VolumeSnapshot {ns}/{name} ready"), || {
            let snapshots = snapshots.clone();
            async move {
                let s = snapshots.get(name).await?;
                Ok((s.data["status"]["readyToUse"] == json!(true)).then_some(()))
            }
        })
        .await
    }

    /// Creates an object of any kind from its JSON (namespaced ones in `ns`), as `kubectl
    /// create` does.
    pub async fn create_object(&self, ns: &str, object: serde_json::Value) -> Result<()> {
        let mut kubectl = livedisk_e2e::kubectl();
        kubectl.args(["-n", ns, "create", "-f", "-"]);
        kubectl
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = kubectl.spawn().context("kubectl create")?;
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().context("kubectl stdin")?;
            stdin.write_all(object.to_string().as_bytes())?;
        }
        let output = child.wait_with_output()?;
        if !output.status.success() {
            bail!(
                "kubectl create {}: {}",
                object["kind"],
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(())
    }

    /// Runs a pod to completion: fails unless it Succeeds; returns its logs, then deletes it.
    pub async fn run_to_completion(&self, ns: &str, spec: &PodSpec<'_>) -> Result<String> {
        self.run_pod(ns, spec).await?;
        let result = self.wait_phase(ns, spec.name, "Succeeded", 240).await;
        let logs = self.logs(ns, spec.name).await.unwrap_or_default();
        if let Err(error) = result {
            return Err(error.context(format!("pod {}'s output:\n{logs}", spec.name)));
        }
        self.delete_pod(ns, spec.name).await?;
        Ok(logs)
    }

    /// Runs a script of this repository (hack/...) with the cluster's environment.
    pub fn hack(&self, script: &str, args: &[&str]) -> Result<String> {
        let root = livedisk_e2e::workspace_root();
        let output = Command::new(root.join(script))
            .args(args)
            .current_dir(&root)
            .output()
            .with_context(|| format!("running {script}"))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        if !output.status.success() {
            bail!(
                "{script} {} failed ({}):\n{text}",
                args.join(" "),
                output.status
            );
        }
        Ok(text)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VolumeMode {
    Filesystem,
    Block,
}

impl VolumeMode {
    pub fn as_str(self) -> &'static str {
        match self {
            VolumeMode::Filesystem => "Filesystem",
            VolumeMode::Block => "Block",
        }
    }

    /// Where a pod gets the claim: its mount point, or its device.
    pub fn claim_path(self) -> &'static str {
        match self {
            VolumeMode::Filesystem => "/data",
            VolumeMode::Block => "/dev/xvda",
        }
    }

    /// What the writer writes to inside the pod: the raw device, or a file on the filesystem.
    pub fn path(self) -> &'static str {
        match self {
            VolumeMode::Filesystem => "/data/blocks",
            VolumeMode::Block => "/dev/xvda",
        }
    }

    /// Shell that makes the writer's target exist (a file of BLOCKS blocks on a filesystem).
    pub fn prepare(self) -> String {
        match self {
            VolumeMode::Filesystem => format!(
                "[ -e /data/blocks ] || {{ dd if=/dev/zero of=/data/blocks bs=4096 count={BLOCKS} && sync; }}; "
            ),
            VolumeMode::Block => String::new(),
        }
    }
}

pub struct PodSpec<'a> {
    pub name: &'a str,
    pub node: &'a str,
    pub claims: Vec<PodClaim<'a>>,
    pub script: &'a str,
    pub restart_policy: &'a str,
    /// The ServiceAccount the pod runs as, with its token mounted; None: no token.
    pub service_account: Option<&'a str>,
}

/// A PVC of a pod, mounted (filesystem) or as a device (block) at `path`.
pub struct PodClaim<'a> {
    pub name: &'a str,
    pub mode: VolumeMode,
    pub path: &'a str,
}

impl<'a> PodSpec<'a> {
    /// A pod that runs `script` once (restartPolicy Never) with `claim` at
    /// [`VolumeMode::claim_path`].
    pub fn once(
        name: &'a str,
        node: &'a str,
        claim: &'a str,
        mode: VolumeMode,
        script: &'a str,
    ) -> Self {
        Self {
            claims: vec![PodClaim {
                name: claim,
                mode,
                path: mode.claim_path(),
            }],
            ..Self::once_without_claims(name, node, script)
        }
    }

    /// A pod that runs `script` once with no PVC.
    pub fn once_without_claims(name: &'a str, node: &'a str, script: &'a str) -> Self {
        Self {
            name,
            node,
            claims: vec![],
            script,
            restart_policy: "Never",
            service_account: None,
        }
    }
}

/// `sh` for a writer: writes with tag 1 for `seconds` (or until killed), logging acks to
/// /ack/`log`, then prints its summary.
pub fn writer_script(mode: VolumeMode, log: &str, seconds: u64) -> String {
    format!(
        "set -e; {}exec livedisk-verifier write --path {} --tag 1 --blocks {BLOCKS} --seconds {seconds} --log /ack/{log}",
        mode.prepare(),
        mode.path()
    )
}

/// `sh` for a writer that runs until the test creates /ack/`stop` (through [`Cluster::ack_path`]),
/// then prints its summary and exits 0; any I/O error makes it exit non-zero.
pub fn writer_until_stopped_script(mode: VolumeMode, log: &str, stop: &str) -> String {
    format!(
        "set -e; {}exec livedisk-verifier write --path {} --tag 1 --blocks {BLOCKS} --until-file /ack/{stop} --log /ack/{log}",
        mode.prepare(),
        mode.path()
    )
}

/// `sh` for a reader: verifies every ack in /ack/`log` and exits non-zero on any mismatch.
pub fn verify_script(mode: VolumeMode, log: &str) -> String {
    format!(
        "set -e; exec livedisk-verifier verify --path {} --tag 1 --log /ack/{log}",
        mode.path()
    )
}

pub fn pod_phase(pod: &Pod) -> String {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.clone())
        .unwrap_or_default()
}

/// Number of acknowledged writes in an ack log.
pub fn ack_count(log: &str) -> usize {
    log.lines().filter(|l| !l.trim().is_empty()).count()
}
