//! The operator binary against the real API server: it waits for its CRDs, then writes an honest
//! status (observedGeneration matching, Ready=False with a reason) and Events.
//!
//! This test removes and reinstalls the livedisk CRDs, so it lives in its own test binary (cargo
//! runs test binaries one after another).

use std::time::Duration;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::Event;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use livedisk_api::{DiskMerge, DiskSnapshot};
use livedisk_e2e::operator::Operator;
use livedisk_e2e::{TestNamespace, apply, client, error_message, eventually};
use serde_json::json;

async fn remove_crds(client: &Client) -> Result<()> {
    // As an administrator uninstalling would: no operator runs now to release its finalizers.
    livedisk_e2e::remove_livedisk_objects(client, None).await?;
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in livedisk_api::public_crds() {
        let name = crd.name_any();
        let _ = api.delete(&name, &DeleteParams::default()).await;
    }
    for _ in 0..120 {
        let mut left = 0;
        for crd in livedisk_api::public_crds() {
            left += api.get_opt(&crd.name_any()).await?.is_some() as usize;
        }
        if left == 0 {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    bail!("livedisk CRDs were not removed within a minute")
}

async fn install_crds(client: &Client) -> Result<()> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in livedisk_api::public_crds() {
        api.patch(
            &crd.name_any(),
            &PatchParams::apply("livedisk-e2e").force(),
            &Patch::Apply(&crd),
        )
        .await?;
    }
    Ok(())
}

fn ready_reason(
    conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
) -> Option<(String, String)> {
    livedisk_api::conditions::find(conditions, livedisk_api::conditions::READY)
        .map(|c| (c.status.clone(), c.reason.clone()))
}

#[tokio::test]
async fn operator_waits_for_crds_then_reports_honest_status() -> Result<()> {
    let client = client().await?;
    remove_crds(&client).await?;
    let mut operator = Operator::start()?;

    // Without its CRDs the operator neither exits nor proceeds: it waits.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        operator.child.try_wait()?.is_none(),
        "operator exited without CRDs:\n{}",
        operator.log()
    );
    assert!(
        operator.log().contains("waiting for the livedisk CRDs"),
        "{}",
        operator.log()
    );
    assert!(
        !operator.log().contains("all livedisk CRDs are established"),
        "{}",
        operator.log()
    );

    install_crds(&client).await?;
    eventually(60, "the operator to see its CRDs", || async {
        Ok(operator
            .log()
            .contains("all livedisk CRDs are established")
            .then_some(()))
    })
    .await
    .with_context(|| operator.log())?;

    let namespace = TestNamespace::create(&client, "operator").await?;
    let ns = namespace.name.clone();
    let snapshot = json!({"apiVersion": "livedisk.io/v1alpha1", "kind": "DiskSnapshot",
        "metadata": {"name": "data-snap"}, "spec": {"source": {"persistentVolumeClaimName": "data"}}});
    apply(&client, &ns, &snapshot)
        .await?
        .map_err(|e| anyhow::anyhow!(error_message(&e)))?;

    let snapshots: Api<DiskSnapshot> = Api::namespaced(client.clone(), &ns);
    let stored = eventually(60, "a status on the DiskSnapshot", || async {
        let object = snapshots.get("data-snap").await?;
        Ok(object
            .status
            .clone()
            .filter(|s| !s.conditions.is_empty())
            .map(|s| (object, s)))
    })
    .await
    .with_context(|| operator.log())?;
    let (object, status) = stored;
    assert_eq!(status.observed_generation, object.metadata.generation);
    assert_eq!(
        ready_reason(&status.conditions),
        Some(("False".into(), "ReferenceNotFound".into()))
    );
    assert_eq!(status.source.as_deref(), Some("PersistentVolumeClaim/data"));
    for condition in &status.conditions {
        assert_eq!(
            condition.observed_generation, object.metadata.generation,
            "{condition:?}"
        );
    }
    let ready = livedisk_api::conditions::find(&status.conditions, "Ready").unwrap();
    assert!(
        ready.message.contains("PersistentVolumeClaim \"data\""),
        "{}",
        ready.message
    );

    // The Event explains the same thing.
    let events: Api<Event> = Api::namespaced(client.clone(), &ns);
    eventually(30, "a ReferenceNotFound Event", || async {
        let list = events.list(&ListParams::default()).await?;
        Ok(list.items.into_iter().find(|e| {
            e.reason.as_deref() == Some("ReferenceNotFound")
                && e.involved_object.name.as_deref() == Some("data-snap")
        }))
    })
    .await?;

    // Once the PVC exists, the next reconcile says honestly that no driver did anything.
    let pvc = json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "data"},
        "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "livedisk",
                 "resources": {"requests": {"storage": "1Gi"}}}});
    apply(&client, &ns, &pvc)
        .await?
        .map_err(|e| anyhow::anyhow!(error_message(&e)))?;
    snapshots
        .patch(
            "data-snap",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"touched": "yes"}}})),
        )
        .await?;
    let reason = eventually(60, "Ready to leave ReferenceNotFound", || async {
        let object = snapshots.get("data-snap").await?;
        let reason = object
            .status
            .map(|s| ready_reason(&s.conditions))
            .unwrap_or_default();
        Ok(reason.filter(|(_, r)| r != "ReferenceNotFound"))
    })
    .await?;
    assert_eq!(
        reason.0, "False",
        "never Ready=True for work that did not happen"
    );
    // Without the driver nothing can happen; with it, the VolumeSnapshot waits for the unbound
    // PVC (WaitForFirstConsumer, no consumer) and says so: either way not Ready.
    assert!(
        ["WaitingForDriver", "SnapshotInProgress", "SnapshotError"].contains(&reason.1.as_str()),
        "{reason:?}"
    );

    // A spec change bumps the generation; the status follows it.
    let merge = json!({"apiVersion": "livedisk.io/v1alpha1", "kind": "DiskMerge",
        "metadata": {"name": "m"}, "spec": {"persistentVolumeClaimName": "data", "bandwidthLimit": "10Mi"}});
    apply(&client, &ns, &merge)
        .await?
        .map_err(|e| anyhow::anyhow!(error_message(&e)))?;
    let mut changed = merge.clone();
    changed["spec"]["bandwidthLimit"] = json!("20Mi");
    apply(&client, &ns, &changed)
        .await?
        .map_err(|e| anyhow::anyhow!(error_message(&e)))?;
    let merges: Api<DiskMerge> = Api::namespaced(client.clone(), &ns);
    eventually(60, "DiskMerge status at generation 2", || async {
        let object = merges.get("m").await?;
        let observed = object.status.as_ref().and_then(|s| s.observed_generation);
        Ok((object.metadata.generation == Some(2) && observed == Some(2)).then_some(()))
    })
    .await
    .with_context(|| operator.log())?;

    drop(operator);
    namespace.delete().await
}
