//! An operator error on the real API server ends in a Warning Event on the object being
//! reconciled, with the error's code as its reason, and a permanent one also in a `Stalled`
//! condition.
//!
//! The error is a real one: the operator binary runs as a ServiceAccount that may do everything
//! the operator needs except create VolumeSnapshots and DiskMigrations, so applying a
//! DiskSnapshot's VolumeSnapshot, or a DiskEvacuation's first DiskMigration, is answered 403 by
//! the API server's RBAC. Its own test binary, its tests one at a time: the operator each starts
//! must be the only one reconciling while it runs.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::storage::v1::CSIDriver;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::{Client, ResourceExt};
use livedisk_api::conditions::{READY, STALLED, find};
use livedisk_api::internal::{LivediskNode, LivediskVolume};
use livedisk_api::{DiskEvacuation, DiskMigration, DiskSnapshot};
use livedisk_e2e::disks::{must, pod, pvc};
use livedisk_e2e::operator::Operator;
use livedisk_e2e::{TestNamespace, apply, bound_volume, client, error_message, eventually};
use serde_json::{Value, json};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Every permission the operator uses, except `create` on VolumeSnapshots and DiskMigrations.
fn rules_without_volume_snapshot_create() -> Value {
    json!([
        {"apiGroups": ["livedisk.io"],
         "resources": ["disksnapshots", "diskmerges", "diskmigrations", "diskexports", "diskrestores",
                       "diskevacuations"],
         "verbs": ["get", "list", "watch"]},
        // The DiskSnapshot's finalizer.
        {"apiGroups": ["livedisk.io"], "resources": ["disksnapshots"], "verbs": ["patch"]},
        {"apiGroups": ["livedisk.io"], "resources": ["livedisksnapshots"],
         "verbs": ["list", "watch"]},
        // A DiskEvacuation's lookups: the nodes, the volumes of its node, their PVs.
        {"apiGroups": ["livedisk.io"], "resources": ["livedisknodes", "livediskvolumes"],
         "verbs": ["list", "watch"]},
        {"apiGroups": [""], "resources": ["persistentvolumes"], "verbs": ["list"]},
        {"apiGroups": ["snapshot.storage.k8s.io"], "resources": ["volumesnapshotcontents"],
         "verbs": ["list", "watch", "patch"]},
        {"apiGroups": ["livedisk.io"],
         "resources": ["disksnapshots/status", "diskmerges/status", "diskmigrations/status",
                       "diskexports/status", "diskrestores/status", "diskevacuations/status"],
         "verbs": ["get", "patch"]},
        {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"],
         "verbs": ["get", "list", "watch"]},
        {"apiGroups": [""], "resources": ["persistentvolumeclaims", "nodes"],
         "verbs": ["get", "list", "watch"]},
        {"apiGroups": ["storage.k8s.io"], "resources": ["csidrivers"],
         "verbs": ["get", "list", "watch"]},
        {"apiGroups": ["snapshot.storage.k8s.io"], "resources": ["volumesnapshots"],
         "verbs": ["get", "list", "watch"]},
        {"apiGroups": ["", "events.k8s.io"], "resources": ["events"],
         "verbs": ["create", "patch"]},
        // Leader election: the operator's Lease in livedisk-system.
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
         "verbs": ["get", "create", "update"]},
    ])
}

/// A ServiceAccount bound to a ClusterRole, and a kubeconfig that authenticates as it.
struct RestrictedIdentity {
    client: Client,
    /// Name of the cluster-scoped ClusterRole and ClusterRoleBinding (deleted by `delete`).
    name: String,
    kubeconfig: PathBuf,
}

impl RestrictedIdentity {
    async fn create(client: &Client, namespace: &str, rules: Value) -> Result<Self> {
        let name = format!("livedisk-e2e-{namespace}");
        let account = json!({"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": "operator"}});
        let role = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": name}, "rules": rules});
        let binding = json!({"apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding", "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": "operator", "namespace": namespace}]});
        for object in [&account, &role, &binding] {
            apply(client, namespace, object)
                .await?
                .map_err(|e| anyhow::anyhow!(error_message(&e)))?;
        }
        let identity = Self {
            client: client.clone(),
            name,
            kubeconfig: std::env::temp_dir().join(format!("livedisk-e2e-{namespace}.kubeconfig")),
        };
        let token = livedisk_e2e::service_account_token(client, namespace, "operator").await?;
        std::fs::write(
            &identity.kubeconfig,
            livedisk_e2e::kubeconfig_with_token(&token)?,
        )?;
        Ok(identity)
    }

    async fn delete(self) -> Result<()> {
        let _ = std::fs::remove_file(&self.kubeconfig);
        for kind in ["ClusterRoleBinding", "ClusterRole"] {
            let gvk = GroupVersionKind::gvk("rbac.authorization.k8s.io", "v1", kind);
            let api: Api<DynamicObject> =
                Api::all_with(self.client.clone(), &ApiResource::from_gvk(&gvk));
            api.delete(&self.name, &DeleteParams::default()).await?;
        }
        Ok(())
    }
}

/// The Warning Events published about `name` in `namespace` with `reason`.
async fn warnings(
    client: &Client,
    namespace: &str,
    name: &str,
    reason: &str,
) -> Result<Vec<Event>> {
    let events: Api<Event> = Api::namespaced(client.clone(), namespace);
    let list = events.list(&ListParams::default()).await?;
    Ok(list
        .items
        .into_iter()
        .filter(|e| {
            e.type_.as_deref() == Some("Warning")
                && e.reason.as_deref() == Some(reason)
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
        })
        .collect())
}

#[tokio::test]
async fn a_forbidden_apply_becomes_a_warning_event_and_a_stalled_condition() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let client = client().await?;
    // The operator only applies a VolumeSnapshot once the livedisk driver is registered.
    let drivers: Api<CSIDriver> = Api::all(client.clone());
    if drivers
        .get_opt(livedisk_common::DRIVER_NAME)
        .await?
        .is_none()
    {
        bail!(
            "CSIDriver {} is not registered: start the driver (hack/driver.sh start)",
            livedisk_common::DRIVER_NAME
        );
    }
    let namespace = TestNamespace::create(&client, "operator-errors").await?;
    let ns = namespace.name.clone();
    let identity =
        RestrictedIdentity::create(&client, &ns, rules_without_volume_snapshot_create()).await?;
    let result = forbidden_apply(&client, &ns, &identity).await;
    identity.delete().await?;
    namespace.delete().await?;
    result
}

async fn forbidden_apply(client: &Client, ns: &str, identity: &RestrictedIdentity) -> Result<()> {
    let operator = Operator::start_with_kubeconfig(&identity.kubeconfig)?;
    let pvc = json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "data"},
        "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "livedisk",
                 "resources": {"requests": {"storage": "1Gi"}}}});
    let snapshot = json!({"apiVersion": "livedisk.io/v1alpha1", "kind": "DiskSnapshot",
        "metadata": {"name": "data-snap"}, "spec": {"source": {"persistentVolumeClaimName": "data"}}});
    for object in [&pvc, &snapshot] {
        apply(client, ns, object)
            .await?
            .map_err(|e| anyhow::anyhow!(error_message(&e)))?;
    }

    let event = eventually(
        120,
        "a PermissionDenied Warning Event on the DiskSnapshot",
        || async {
            Ok(warnings(client, ns, "data-snap", "PermissionDenied")
                .await?
                .into_iter()
                .next())
        },
    )
    .await
    .with_context(|| operator.log())?;
    assert_eq!(event.action.as_deref(), Some("Apply"), "{event:?}");
    let note = event.note.clone().unwrap_or_default();
    // The whole chain: what was applied, the API server's own words, and how it is retried.
    assert!(
        note.contains(&format!("applying VolumeSnapshot {ns}/data-snap")),
        "{note}"
    );
    assert!(note.contains("forbidden"), "{note}");
    assert!(
        note.contains("cannot create resource \"volumesnapshots\""),
        "{note}"
    );
    assert!(note.contains("retrying in 300s"), "{note}");
    assert_eq!(
        event.reporting_controller.as_deref(),
        Some("livedisk-operator"),
        "{event:?}"
    );

    // A permission is not transient: the object says it is stalled, with the same reason.
    let snapshots: Api<DiskSnapshot> = Api::namespaced(client.clone(), ns);
    let stalled = eventually(30, "Stalled=True on the DiskSnapshot", || async {
        let object = snapshots.get("data-snap").await?;
        let conditions = object.status.map(|s| s.conditions).unwrap_or_default();
        Ok(find(&conditions, STALLED)
            .filter(|c| c.status == "True")
            .cloned())
    })
    .await
    .with_context(|| operator.log())?;
    assert_eq!(stalled.reason, "PermissionDenied");
    assert!(stalled.message.contains("forbidden"), "{}", stalled.message);

    // Nothing was created, and the operator's log says the retry is slow.
    let volume_snapshots: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        ns,
        &ApiResource::from_gvk(&GroupVersionKind::gvk(
            "snapshot.storage.k8s.io",
            "v1",
            "VolumeSnapshot",
        )),
    );
    assert!(volume_snapshots.get_opt("data-snap").await?.is_none());
    assert!(
        operator.log().contains("retrying in 300s"),
        "{}",
        operator.log()
    );

    // Granting the permission and touching the object: the next pass gets through and the
    // conditions stop saying Stalled.
    let mut rules = rules_without_volume_snapshot_create();
    rules.as_array_mut().context("rules")?.push(
        json!({"apiGroups": ["snapshot.storage.k8s.io"], "resources": ["volumesnapshots"],
                     "verbs": ["create"]}),
    );
    let role = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
        "metadata": {"name": identity.name}, "rules": rules});
    apply(client, ns, &role)
        .await?
        .map_err(|e| anyhow::anyhow!(error_message(&e)))?;
    let touch = json!({"metadata": {"labels": {"touched": "yes"}}});
    snapshots
        .patch("data-snap", &PatchParams::default(), &Patch::Merge(&touch))
        .await?;
    let ready = eventually(60, "the DiskSnapshot to leave PermissionDenied", || async {
        let object = snapshots.get("data-snap").await?;
        let conditions = object.status.map(|s| s.conditions).unwrap_or_default();
        Ok(find(&conditions, READY)
            .filter(|c| c.reason != "PermissionDenied")
            .cloned()
            .map(|ready| (ready, find(&conditions, STALLED).cloned())))
    })
    .await
    .with_context(|| operator.log())?;
    assert!(
        ["SnapshotInProgress", "SnapshotError"].contains(&ready.0.reason.as_str()),
        "{ready:?}"
    );
    assert_eq!(ready.1.map(|c| c.status).as_deref(), Some("False"));
    assert!(volume_snapshots.get_opt("data-snap").await?.is_some());
    drop(operator);
    Ok(())
}

/// A DiskEvacuation is cluster-scoped: its Events are in `default`, its conditions on itself.
#[tokio::test]
async fn a_forbidden_create_stalls_an_evacuation_and_moves_nothing() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let client = client().await?;
    let nodes: Api<LivediskNode> = Api::all(client.clone());
    for node in ["node-a", "node-b"] {
        eventually(120, &format!("{node}'s pool space reported"), || async {
            Ok(nodes
                .get_opt(node)
                .await?
                .and_then(|n| n.status?.pool_available_bytes))
        })
        .await?;
    }
    let namespace = TestNamespace::create(&client, "evacuation-errors").await?;
    let ns = namespace.name.clone();
    let identity =
        RestrictedIdentity::create(&client, &ns, rules_without_volume_snapshot_create()).await?;
    let name = format!("drain-{ns}");
    let result = forbidden_evacuation(&client, &ns, &name, &identity).await;
    let evacuations: Api<DiskEvacuation> = Api::all(client.clone());
    let _ = evacuations.delete(&name, &DeleteParams::default()).await;
    identity.delete().await?;
    namespace.delete().await?;
    result
}

async fn forbidden_evacuation(
    client: &Client,
    ns: &str,
    name: &str,
    identity: &RestrictedIdentity,
) -> Result<()> {
    // A claim bound on node-a: the evacuation has a volume to move.
    must(client, ns, pvc("disk", None)).await?;
    must(client, ns, pod("disk-consumer", "disk", Some("node-a"))).await?;
    let (volume, node) = bound_volume(client, ns, "disk", "disk-consumer").await?;
    anyhow::ensure!(node == "node-a", "scheduled on {node}");
    let operator = Operator::start_with_kubeconfig(&identity.kubeconfig)?;
    must(
        client,
        "",
        json!({"apiVersion": "livedisk.io/v1alpha1", "kind": "DiskEvacuation",
               "metadata": {"name": name}, "spec": {"nodeName": "node-a", "targetNodeName": "node-b"}}),
    )
    .await?;
    let event = eventually(
        120,
        "a PermissionDenied Warning Event on the DiskEvacuation",
        || async {
            Ok(warnings(client, "default", name, "PermissionDenied")
                .await?
                .into_iter()
                .next())
        },
    )
    .await
    .with_context(|| operator.log())?;
    assert_eq!(event.action.as_deref(), Some("Apply"), "{event:?}");
    let note = event.note.clone().unwrap_or_default();
    // The first volume of node-a it tried may be another namespace's (a volume of an earlier
    // test whose namespace is still being deleted): any claim's namespace.
    assert!(
        note.contains("applying DiskMigration ") && note.contains("/evac-"),
        "{note}"
    );
    assert!(
        note.contains("cannot create resource \"diskmigrations\""),
        "{note}"
    );
    let evacuations: Api<DiskEvacuation> = Api::all(client.clone());
    let stalled = eventually(30, "Stalled=True on the DiskEvacuation", || async {
        let conditions = evacuations
            .get(name)
            .await?
            .status
            .map(|s| s.conditions)
            .unwrap_or_default();
        Ok(find(&conditions, STALLED)
            .filter(|c| c.status == "True")
            .cloned())
    })
    .await
    .with_context(|| operator.log())?;
    assert_eq!(stalled.reason, "PermissionDenied");
    // Nothing was created, in any namespace; nothing moved.
    let migrations: Api<DiskMigration> = Api::all(client.clone());
    let created: Vec<String> = migrations
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .filter(|m| {
            m.owner_references()
                .iter()
                .any(|o| o.kind == "DiskEvacuation" && o.name == name)
        })
        .map(|m| m.name_any())
        .collect();
    assert!(created.is_empty(), "created: {created:?}");
    let volumes: Api<LivediskVolume> = Api::all(client.clone());
    assert_eq!(volumes.get(&volume).await?.spec.node_name, "node-a");
    drop(operator);
    Ok(())
}
