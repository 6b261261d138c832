//! The HTTPS endpoints of the CSI controller and the node plugins, on the two-node local cluster
//! (hack/driver.sh), and of the operator (started here under the chart's operator account): a
//! scraper's token is checked by the API server (TokenReview and a SubjectAccessReview of
//! `get /metrics`), and the metrics move by exactly what was done.
//!
//! The scraper is a ServiceAccount of the test bound to the chart's `livedisk-metrics-reader`
//! ClusterRole (applied by hack/driver.sh from charts/livedisk/templates/metrics/rbac.yaml), with
//! a token from the TokenRequest API, as a Prometheus in the cluster would have.

use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::ClusterRoleBinding;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use livedisk_api::internal::{LivediskSnapshot, LivediskVolume};
use livedisk_csi_proto::csi::v1::*;
use livedisk_e2e::csi::{attach_block, controller, create_block_volume, detach_block, in_node};
use livedisk_e2e::metrics::{Endpoint, Samples, endpoint};
use livedisk_e2e::operator::Operator;
use livedisk_e2e::service_account_token;
use livedisk_e2e::{TestNamespace, apply, client, error_message, eventually};

const NODE: &str = "node-a";
const CALLS: &str = "livedisk_csi_grpc_calls_total";
const OPERATIONS: &str = "livedisk_node_operations_total";

/// A ServiceAccount in a namespace of its own; with `reader`, bound to the metrics reader role.
struct Scraper {
    namespace: TestNamespace,
    binding: Option<String>,
    token: String,
    client: kube::Client,
}

impl Scraper {
    async fn create(reader: bool) -> Result<Self> {
        let client = client().await?;
        let namespace = TestNamespace::create(&client, "metrics").await?;
        let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), &namespace.name);
        let account: ServiceAccount = serde_json::from_value(serde_json::json!({
            "metadata": { "name": "scraper" }
        }))?;
        accounts.create(&PostParams::default(), &account).await?;
        let binding = if reader {
            let name = format!("{}-scraper", namespace.name);
            let binding: ClusterRoleBinding = serde_json::from_value(serde_json::json!({
                "metadata": { "name": name },
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "ClusterRole",
                    "name": "livedisk-metrics-reader",
                },
                "subjects": [{
                    "kind": "ServiceAccount", "name": "scraper", "namespace": namespace.name,
                }],
            }))?;
            Api::<ClusterRoleBinding>::all(client.clone())
                .create(&PostParams::default(), &binding)
                .await
                .context("binding livedisk-metrics-reader")?;
            Some(name)
        } else {
            None
        };
        let token = service_account_token(&client, &namespace.name, "scraper").await?;
        Ok(Self {
            namespace,
            binding,
            token,
            client,
        })
    }

    /// A scrape that waits for the grant to reach the API server's authorizer (a refusal is
    /// cached by the endpoint for a few seconds).
    async fn first_scrape(&self, endpoint: &Endpoint) -> Result<Samples> {
        eventually(30, "the scraper's grant to take effect", || async {
            let reply = endpoint.get("/metrics", Some(&self.token)).await?;
            Ok((reply.status == 200).then(|| Samples::parse(&reply.body)))
        })
        .await
    }

    async fn delete(self) -> Result<()> {
        if let Some(name) = &self.binding {
            Api::<ClusterRoleBinding>::all(self.client.clone())
                .delete(name, &DeleteParams::default())
                .await?;
        }
        self.namespace.delete().await
    }
}

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

/// Writes `mib` MiB of data at `offset_mib` on the device, flushed.
fn write(device: &str, offset_mib: u64, mib: u64) -> Result<()> {
    let script = format!(
        "dd if=/dev/urandom of={device} bs=1M seek={offset_mib} count={mib} oflag=direct conv=notrunc,fsync status=none"
    );
    in_node(NODE, &["sh", "-c", &script])?;
    Ok(())
}

/// What the test watches move, from one scrape of the controller and one of the node plugin.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Counts {
    create_snapshot_calls: f64,
    create_snapshot_ok: f64,
    delete_snapshot_calls: f64,
    delete_snapshot_ok: f64,
    snapshots: f64,
    snapshots_taken: f64,
    snapshots_deleted: f64,
    merged_bytes: f64,
}

impl Counts {
    fn read(controller: &Samples, node: &Samples) -> Self {
        let call = |method, code: Option<&str>| {
            let mut labels = vec![("service", "csi.v1.Controller"), ("method", method)];
            labels.extend(code.map(|c| ("code", c)));
            controller.sum(CALLS, &labels)
        };
        Self {
            create_snapshot_calls: call("CreateSnapshot", None),
            create_snapshot_ok: call("CreateSnapshot", Some("OK")),
            delete_snapshot_calls: call("DeleteSnapshot", None),
            delete_snapshot_ok: call("DeleteSnapshot", Some("OK")),
            snapshots: node.sum("livedisk_node_snapshots", &[]),
            snapshots_taken: node.sum(OPERATIONS, &[("kind", "create_snapshot"), ("code", "OK")]),
            snapshots_deleted: node.sum(OPERATIONS, &[("kind", "delete_snapshot"), ("code", "OK")]),
            merged_bytes: node.sum("livedisk_node_merged_bytes_total", &[]),
        }
    }
}

async fn counts(scraper: &Scraper, controller: &Endpoint, node: &Endpoint) -> Result<Counts> {
    Ok(Counts::read(
        &controller.scrape(&scraper.token).await?,
        &node.scrape(&scraper.token).await?,
    ))
}

/// Counts that stay the same for two seconds: snapshots left behind by earlier tests (being
/// deleted through csi-snapshotter) would otherwise move them under this test.
/// True when no deletion is under way on the cluster that calls the driver: no
/// VolumeSnapshotContent being deleted (earlier tests' cleanup: the snapshotter then calls
/// DeleteSnapshot) and no internal object being deleted. (Namespaces, and a VolumeSnapshot held
/// by csi-provisioner's source-protection finalizer, may stay Terminating here for a long time:
/// a pod never ends without a kubelet; neither calls the driver meanwhile.)
async fn cluster_quiet() -> Result<bool> {
    let client = client().await?;
    let contents: Api<DynamicObject> = Api::all_with(
        client.clone(),
        &ApiResource::from_gvk(&GroupVersionKind::gvk(
            "snapshot.storage.k8s.io",
            "v1",
            "VolumeSnapshotContent",
        )),
    );
    let mut deleting = contents
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .any(|o| o.metadata.deletion_timestamp.is_some());
    let snapshots: Api<LivediskSnapshot> = Api::all(client.clone());
    let volumes: Api<LivediskVolume> = Api::all(client);
    deleting |= snapshots
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .any(|s| s.metadata.deletion_timestamp.is_some())
        || volumes
            .list(&ListParams::default())
            .await?
            .items
            .iter()
            .any(|v| v.metadata.deletion_timestamp.is_some());
    Ok(!deleting)
}

/// The counts once the cluster is quiet and they stopped moving (the driver's metrics count
/// every client's calls, so other work must be over before a delta means ours).
async fn settled(scraper: &Scraper, controller: &Endpoint, node: &Endpoint) -> Result<Counts> {
    let mut last = counts(scraper, controller, node).await?;
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let now = counts(scraper, controller, node).await?;
        if now == last && cluster_quiet().await? {
            return Ok(now);
        }
        last = now;
    }
    anyhow::bail!("the snapshot metrics did not settle within two minutes: last {last:?}")
}

#[tokio::test]
async fn a_snapshot_and_its_merge_move_the_metrics_by_exactly_what_was_done() -> Result<()> {
    let scraper = Scraper::create(true).await?;
    let (controller_endpoint, node_endpoint) = (endpoint("controller")?, endpoint(NODE)?);
    let first = scraper.first_scrape(&controller_endpoint).await?;
    assert!(
        first.has(CALLS),
        "the controller shows no gRPC call metrics"
    );
    let node_first = scraper.first_scrape(&node_endpoint).await?;
    for name in [
        "livedisk_node_pool_free_bytes",
        "livedisk_node_pool_used_bytes",
        "livedisk_node_volumes",
        "livedisk_node_snapshots",
        "livedisk_node_merged_bytes_total",
        "livedisk_node_merge_restarts_total",
        "livedisk_node_merge_copied_again_bytes_total",
        "livedisk_node_copied_bytes_total",
    ] {
        assert!(node_first.has(name), "the node plugin shows no {name}");
    }
    assert!(node_first.sum("livedisk_node_pool_free_bytes", &[]) > 0.0);

    // A volume on node-a with data, staged as kubelet would stage it.
    let tag = unique("metrics");
    let volume_id = create_block_volume(&tag, NODE).await?;
    let device = attach_block(NODE, &volume_id, &tag).await?;
    write(&device, 0, 4)?;
    let node_calls = node_endpoint.scrape(&scraper.token).await?;
    for method in ["NodeStageVolume", "NodePublishVolume"] {
        assert!(
            node_calls.sum(CALLS, &[("method", method), ("code", "OK")]) >= 1.0,
            "the node plugin did not count {method}"
        );
    }

    let before = settled(&scraper, &controller_endpoint, &node_endpoint).await?;
    let snapshot_id = controller()
        .await?
        .create_snapshot(CreateSnapshotRequest {
            source_volume_id: volume_id.clone(),
            name: format!("{tag}-snap"),
            ..Default::default()
        })
        .await?
        .into_inner()
        .snapshot
        .context("CreateSnapshot answered no snapshot")?
        .snapshot_id;
    // Written after the snapshot: what its deletion has to merge.
    write(&device, 8, 4)?;
    let taken = counts(&scraper, &controller_endpoint, &node_endpoint).await?;
    assert_eq!(
        taken,
        Counts {
            create_snapshot_calls: before.create_snapshot_calls + 1.0,
            create_snapshot_ok: before.create_snapshot_ok + 1.0,
            snapshots: before.snapshots + 1.0,
            snapshots_taken: before.snapshots_taken + 1.0,
            ..before
        },
        "after one CreateSnapshot"
    );

    controller()
        .await?
        .delete_snapshot(DeleteSnapshotRequest {
            snapshot_id,
            ..Default::default()
        })
        .await?;
    let deleted = counts(&scraper, &controller_endpoint, &node_endpoint).await?;
    assert!(
        deleted.merged_bytes > taken.merged_bytes,
        "deleting the snapshot merged no bytes: {taken:?} then {deleted:?}"
    );
    assert_eq!(
        deleted,
        Counts {
            delete_snapshot_calls: taken.delete_snapshot_calls + 1.0,
            delete_snapshot_ok: taken.delete_snapshot_ok + 1.0,
            snapshots: taken.snapshots - 1.0,
            snapshots_deleted: taken.snapshots_deleted + 1.0,
            merged_bytes: deleted.merged_bytes,
            ..taken
        },
        "after one DeleteSnapshot"
    );

    detach_block(NODE, &volume_id, &tag).await?;
    controller()
        .await?
        .delete_volume(DeleteVolumeRequest {
            volume_id,
            ..Default::default()
        })
        .await?;
    scraper.delete().await
}

#[tokio::test]
async fn probes_answer_anyone_and_metrics_only_an_authorized_token() -> Result<()> {
    let unbound = Scraper::create(false).await?;
    for name in ["controller", NODE] {
        let endpoint = endpoint(name)?;
        for probe in ["/healthz", "/readyz"] {
            let reply = endpoint.get(probe, None).await?;
            assert_eq!(
                (reply.status, reply.body.as_str()),
                (200, "ok\n"),
                "{name} {probe}"
            );
        }
        let anonymous = endpoint.get("/metrics", None).await?;
        assert_eq!(anonymous.status, 401, "{name}: a scrape without a token");
        assert!(
            !anonymous.body.contains("livedisk_"),
            "{name} showed metrics"
        );
        let forged = endpoint.get("/metrics", Some("not-a-token")).await?;
        assert_eq!(forged.status, 401, "{name}: a token the API server rejects");
        let refused = endpoint.get("/metrics", Some(&unbound.token)).await?;
        assert_eq!(
            refused.status, 403,
            "{name}: a valid token without the grant"
        );
        assert!(!refused.body.contains("livedisk_"), "{name} showed metrics");
    }
    unbound.delete().await
}

#[tokio::test]
async fn the_operator_serves_probes_and_counts_its_reconciles() -> Result<()> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr = format!("127.0.0.1:{port}");
    // One replica without the Lease: this test is about its endpoint, not leader election.
    let operator = Operator::start_with_env(&[
        ("LIVEDISK_METRICS_ADDR", addr.as_str()),
        ("LIVEDISK_LEADER_ELECT", "false"),
    ])?;
    let endpoint = Endpoint {
        addr: addr.parse()?,
        server_name: "localhost".into(),
        ca: None,
    };
    eventually(60, "the operator's /readyz to answer 200", || async {
        Ok(endpoint
            .get("/readyz", None)
            .await
            .is_ok_and(|r| r.status == 200)
            .then_some(()))
    })
    .await
    .with_context(|| operator.log())?;
    assert_eq!(endpoint.get("/healthz", None).await?.status, 200);
    assert_eq!(endpoint.get("/metrics", None).await?.status, 401);

    let scraper = Scraper::create(true).await?;
    let snapshot = serde_json::json!({"apiVersion": "livedisk.io/v1alpha1", "kind": "DiskSnapshot",
        "metadata": {"name": "counted"}, "spec": {"source": {"persistentVolumeClaimName": "none"}}});
    apply(&scraper.client, &scraper.namespace.name, &snapshot)
        .await?
        .map_err(|e| anyhow::anyhow!(error_message(&e)))?;
    let kind = [("kind", "DiskSnapshot")];
    let samples =
        eventually(60, "a counted DiskSnapshot reconcile", || async {
            let reply = endpoint.get("/metrics", Some(&scraper.token)).await?;
            let samples = Samples::parse(&reply.body);
            Ok((reply.status == 200
                && samples.sum("livedisk_operator_reconciles_total", &kind) >= 1.0)
                .then_some(samples))
        })
        .await
        .with_context(|| operator.log())?;
    assert!(samples.sum("livedisk_operator_reconcile_duration_seconds_count", &kind) >= 1.0);
    drop(operator);
    scraper.delete().await
}
