//! The API server itself rejects bad livedisk objects at admission, with a message that names the
//! offending field, and accepts every example.

use anyhow::Result;
use kube::ResourceExt;
use livedisk_e2e::{
    TestNamespace, api_for, apply, client, error_message, parse_manifests, workspace_root,
};
use serde_json::{Value, json};

fn snapshot(spec: Value) -> Value {
    json!({"apiVersion": "livedisk.io/v1alpha1", "kind": "DiskSnapshot",
           "metadata": {"name": "snap"}, "spec": spec})
}

fn merge(spec: Value) -> Value {
    json!({"apiVersion": "livedisk.io/v1alpha1", "kind": "DiskMerge",
           "metadata": {"name": "merge"}, "spec": spec})
}

fn export(spec: Value) -> Value {
    json!({"apiVersion": "livedisk.io/v1alpha1", "kind": "DiskExport",
           "metadata": {"name": "export"}, "spec": spec})
}

/// Applies `object` and asserts that it is rejected with a message containing every fragment.
async fn assert_rejected(
    namespace: &str,
    case: &str,
    object: Value,
    fragments: &[&str],
) -> Result<()> {
    let client = client().await?;
    match apply(&client, namespace, &object).await? {
        Ok(_) => panic!("{case}: the API server accepted an invalid object: {object}"),
        Err(error) => {
            let message = error_message(&error);
            for fragment in fragments {
                assert!(
                    message.contains(fragment),
                    "{case}: rejection message lacks {fragment:?}: {message}"
                );
            }
        }
    }
    Ok(())
}

#[tokio::test]
async fn every_example_is_accepted() -> Result<()> {
    let client = client().await?;
    let namespace = TestNamespace::create(&client, "examples").await?;
    let mut files: Vec<_> = std::fs::read_dir(workspace_root().join("examples"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 6,
        "examples/ should hold one manifest per kind at least"
    );
    let mut cluster_scoped = Vec::new();
    for file in files {
        for object in parse_manifests(&std::fs::read_to_string(&file)?)? {
            let result = apply(&client, &namespace.name, &object).await?;
            assert!(
                result.is_ok(),
                "{} rejected: {}",
                file.display(),
                error_message(&result.unwrap_err())
            );
            let (api, object) = api_for(&client, &namespace.name, &object).await?;
            if api.namespace().is_none() {
                cluster_scoped.push((api, object.name_any()));
            }
        }
    }
    // A namespace holds no cluster-scoped example (a DiskEvacuation): removed one by one.
    for (api, name) in cluster_scoped {
        api.delete(&name, &Default::default()).await?;
    }
    namespace.delete().await
}

#[tokio::test]
async fn invalid_objects_are_rejected_naming_the_field() -> Result<()> {
    let client = client().await?;
    let namespace = TestNamespace::create(&client, "admission").await?;
    let ns = namespace.name.as_str();
    assert_rejected(
        ns,
        "missing required field",
        merge(json!({"mode": "Commit"})),
        &["spec.persistentVolumeClaimName", "Required value"],
    )
    .await?;
    assert_rejected(
        ns,
        "wrong type",
        export(json!({"snapshotName": "s", "ttlSeconds": "an hour"})),
        &["spec.ttlSeconds"],
    )
    .await?;
    assert_rejected(
        ns,
        "unknown field",
        snapshot(json!({"source": {"persistentVolumeClaimName": "d"}, "retention": 3})),
        &["spec.retention", "field not declared in schema"],
    )
    .await?;
    assert_rejected(
        ns,
        "out-of-range number",
        export(json!({"snapshotName": "s", "ttlSeconds": 5})),
        &["spec.ttlSeconds", "greater than or equal to 60"],
    )
    .await?;
    assert_rejected(
        ns,
        "negative bandwidth",
        merge(json!({"persistentVolumeClaimName": "d", "bandwidthLimit": "-10Mi"})),
        &["spec.bandwidthLimit", "must not be negative"],
    )
    .await?;
    assert_rejected(
        ns,
        "malformed quantity",
        merge(json!({"persistentVolumeClaimName": "d", "bandwidthLimit": "fast"})),
        &["spec.bandwidthLimit", "must be a quantity"],
    )
    .await?;
    assert_rejected(
        ns,
        "bad enum value",
        merge(json!({"persistentVolumeClaimName": "d", "mode": "Squash"})),
        &["spec.mode", "Unsupported value"],
    )
    .await?;
    assert_rejected(
        ns,
        "invalid object name",
        merge(json!({"persistentVolumeClaimName": "Not_A_Name"})),
        &["spec.persistentVolumeClaimName", "should match"],
    )
    .await?;
    assert_rejected(
        ns,
        "cross-field rule (two sources)",
        snapshot(json!({"source": {"persistentVolumeClaimName": "d", "virtualMachineName": "vm"}})),
        &["spec.source", "exactly one of"],
    )
    .await?;
    assert_rejected(
        ns,
        "cross-field rule (no source)",
        snapshot(json!({"source": {}})),
        &["spec.source", "exactly one of"],
    )
    .await?;
    assert_rejected(
        ns,
        "cross-field rule (top with Stream)",
        merge(json!({"persistentVolumeClaimName": "d", "mode": "Stream", "topSnapshotName": "t"})),
        &["spec.topSnapshotName", "only valid with mode Commit"],
    )
    .await?;
    assert_rejected(
        ns,
        "cross-field rule (base equals snapshot)",
        export(json!({"snapshotName": "s", "baseSnapshotName": "s"})),
        &["spec.baseSnapshotName", "not the same one"],
    )
    .await?;
    namespace.delete().await
}

#[tokio::test]
async fn immutable_fields_cannot_change_on_update() -> Result<()> {
    let client = client().await?;
    let namespace = TestNamespace::create(&client, "immutable").await?;
    let ns = namespace.name.as_str();
    let original = snapshot(json!({"source": {"persistentVolumeClaimName": "disk-a"}}));
    apply(&client, ns, &original)
        .await?
        .map_err(|e| anyhow::anyhow!(error_message(&e)))?;
    assert_rejected(
        ns,
        "immutable DiskSnapshot spec",
        snapshot(json!({"source": {"persistentVolumeClaimName": "disk-b"}})),
        &["spec is immutable"],
    )
    .await?;

    let stored = merge(json!({"persistentVolumeClaimName": "disk-a", "bandwidthLimit": "100Mi"}));
    apply(&client, ns, &stored)
        .await?
        .map_err(|e| anyhow::anyhow!(error_message(&e)))?;
    assert_rejected(ns, "immutable DiskMerge mode",
        merge(json!({"persistentVolumeClaimName": "disk-a", "mode": "Stream", "bandwidthLimit": "100Mi"})),
        &["immutable"]).await?;
    // The mutable fields of a stored object may change: bandwidth, and cancel (one way only).
    let cancelled = merge(
        json!({"persistentVolumeClaimName": "disk-a", "bandwidthLimit": "50Mi", "cancel": true}),
    );
    apply(&client, ns, &cancelled)
        .await?
        .map_err(|e| anyhow::anyhow!(error_message(&e)))?;
    assert_rejected(ns, "cancel undone",
        merge(json!({"persistentVolumeClaimName": "disk-a", "bandwidthLimit": "50Mi", "cancel": false})),
        &["cancel cannot be set back"]).await?;
    namespace.delete().await
}
