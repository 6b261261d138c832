//! Every example of every public kind gets an honest status from the operator (running under the
//! chart's account): the generation it describes, and `Ready=False` with the reason that says
//! why nothing was done (a reference that does not exist, a snapshot still being taken, or work
//! this version does not perform). Nothing is `Ready=True` without the work done.

use anyhow::{Context, Result};
use kube::ResourceExt;
use livedisk_e2e::operator::Operator;
use livedisk_e2e::{
    TestNamespace, api_for, apply, client, error_message, eventually, parse_manifests,
    workspace_root,
};

/// The Ready condition's status and reason, once the status describes the current generation.
fn ready_for_generation(object: &kube::api::DynamicObject) -> Option<(String, String)> {
    let status = &object.data["status"];
    if status["observedGeneration"].as_i64() != object.metadata.generation {
        return None;
    }
    let ready = status["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Ready")?;
    Some((
        ready["status"].as_str()?.to_string(),
        ready["reason"].as_str()?.to_string(),
    ))
}

/// The reasons an example may honestly carry here: its PVC exists but is never bound (no consumer
/// pod), so no snapshot is taken, nothing exported and nothing moved, and KubeVirt is absent.
fn expected_reasons(object: &serde_json::Value) -> &'static [&'static str] {
    match object["kind"].as_str() {
        Some("DiskSnapshot")
            if object["spec"]["source"]["persistentVolumeClaimName"].is_string() =>
        {
            &["SnapshotInProgress", "SnapshotError"]
        }
        Some("DiskSnapshot") => &["ReferenceNotFound"],
        // Its claim is never bound here: the merge, revert or move waits for it, having done
        // nothing.
        Some("DiskMerge") | Some("DiskRestore") | Some("DiskMigration") => &["ClaimNotBound"],
        // Its DiskSnapshot is never taken here (the claim is never bound): nothing is exported.
        Some("DiskExport") => &["SnapshotNotReady"],
        // It names a node this cluster does not have: refused, nothing moved.
        Some("DiskEvacuation") => &["NodeNotFound"],
        _ => &["NotSupportedYet"],
    }
}

#[tokio::test]
async fn every_example_gets_an_honest_status_for_its_generation() -> Result<()> {
    let client = client().await?;
    let operator = Operator::start()?;
    let namespace = TestNamespace::create(&client, "every-kind").await?;
    let ns = namespace.name.clone();
    let result = async {
        let mut objects = Vec::new();
        // examples/demo/ is `make demo`'s, applied by its script step by step.
        let mut files: Vec<_> = std::fs::read_dir(workspace_root().join("examples"))?
            .map(|e| e.map(|e| e.path()))
            .filter(|p| p.as_ref().map_or(true, |p| p.is_file()))
            .collect::<std::io::Result<_>>()?;
        files.sort();
        for path in files {
            for object in parse_manifests(&std::fs::read_to_string(&path)?)? {
                let livedisk = object["apiVersion"]
                    .as_str()
                    .is_some_and(|v| v.starts_with("livedisk.io/"));
                // The PVC the examples name, so that each kind gets past its references.
                if livedisk || object["kind"] == "PersistentVolumeClaim" {
                    apply(&client, &ns, &object).await?.map_err(|e| {
                        anyhow::anyhow!("{}: {}", path.display(), error_message(&e))
                    })?;
                }
                if livedisk {
                    objects.push(object);
                }
            }
        }
        let kinds: std::collections::BTreeSet<_> =
            objects.iter().filter_map(|o| o["kind"].as_str()).collect();
        assert_eq!(
            kinds.len(),
            livedisk_api::public_crds().len(),
            "examples/ covers {kinds:?}"
        );
        for object in &objects {
            let (api, wanted) = api_for(&client, &ns, object).await?;
            let name = wanted.name_any();
            let kind = object["kind"].as_str().unwrap_or_default();
            let (status, reason) =
                eventually(90, &format!("a status on {kind} {name}"), || async {
                    Ok(ready_for_generation(&api.get(&name).await?))
                })
                .await
                .with_context(|| operator.log())?;
            assert_eq!(
                status, "False",
                "{kind} {name} is Ready without any work done"
            );
            let expected = expected_reasons(object);
            assert!(
                expected.contains(&reason.as_str()),
                "{kind} {name}: reason {reason:?}, expected one of {expected:?}"
            );
        }
        Ok(())
    }
    .await;
    drop(operator);
    namespace.delete().await?;
    // The cluster-scoped examples are in no namespace: removed one by one.
    for object in applied_cluster_scoped(&client).await? {
        let (api, object) = api_for(&client, &ns, &object).await?;
        match api.delete(&object.name_any(), &Default::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    result
}

/// The examples of cluster-scoped kinds (a DiskEvacuation).
async fn applied_cluster_scoped(client: &kube::Client) -> Result<Vec<serde_json::Value>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(workspace_root().join("examples"))? {
        let path = entry?.path();
        if !path.is_file() {
            continue;
        }
        for object in parse_manifests(&std::fs::read_to_string(&path)?)? {
            if !object["apiVersion"]
                .as_str()
                .is_some_and(|v| v.starts_with("livedisk.io/"))
            {
                continue;
            }
            let (api, _) = api_for(client, "default", &object).await?;
            if api.namespace().is_none() {
                found.push(object);
            }
        }
    }
    Ok(found)
}
