//! Build/apply stage: the standard Kubernetes object a livedisk resource turns into (decision 5
//! of the brief: standard objects first), and what that object reports back.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::DynamicObject;
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::json;

/// How far the standard object is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WorkState {
    InProgress {
        object: String,
    },
    Failed {
        object: String,
        message: String,
    },
    Ready {
        object: String,
        restore_size: Option<String>,
        creation_time: Option<String>,
    },
}

pub fn volume_snapshots() -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk(
        "snapshot.storage.k8s.io",
        "v1",
        "VolumeSnapshot",
    ))
}

pub fn volume_snapshot_contents() -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk(
        "snapshot.storage.k8s.io",
        "v1",
        "VolumeSnapshotContent",
    ))
}

/// Pure: the VolumeSnapshot to create for a DiskSnapshot.
pub fn volume_snapshot(
    name: &str,
    pvc: &str,
    class: Option<&str>,
    owner: OwnerReference,
) -> serde_json::Value {
    let mut spec = json!({ "source": { "persistentVolumeClaimName": pvc } });
    if let Some(class) = class {
        spec["volumeSnapshotClassName"] = json!(class);
    }
    json!({
        "apiVersion": "snapshot.storage.k8s.io/v1",
        "kind": "VolumeSnapshot",
        "metadata": {
            "name": name,
            "labels": { "app.kubernetes.io/managed-by": "livedisk-operator" },
            "ownerReferences": [owner],
        },
        "spec": spec,
    })
}

/// Pure: reads a VolumeSnapshot's status.
pub fn volume_snapshot_state(object: &DynamicObject) -> WorkState {
    let name = object.metadata.name.clone().unwrap_or_default();
    let status = &object.data["status"];
    if let Some(message) = status["error"]["message"].as_str() {
        return WorkState::Failed {
            object: name,
            message: message.to_string(),
        };
    }
    if status["readyToUse"] == json!(true) {
        return WorkState::Ready {
            object: name,
            restore_size: status["restoreSize"].as_str().map(str::to_string),
            creation_time: status["creationTime"].as_str().map(str::to_string),
        };
    }
    WorkState::InProgress { object: name }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(status: serde_json::Value) -> DynamicObject {
        serde_json::from_value(json!({
            "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
            "metadata": {"name": "s"}, "spec": {}, "status": status
        }))
        .expect("object")
    }

    #[test]
    fn states_follow_the_volume_snapshot() {
        assert_eq!(
            volume_snapshot_state(&object(json!({}))),
            WorkState::InProgress { object: "s".into() }
        );
        assert_eq!(
            volume_snapshot_state(&object(json!({"error": {"message": "boom"}}))),
            WorkState::Failed {
                object: "s".into(),
                message: "boom".into()
            }
        );
        assert_eq!(
            volume_snapshot_state(&object(json!({"readyToUse": true, "restoreSize": "1Gi"}))),
            WorkState::Ready {
                object: "s".into(),
                restore_size: Some("1Gi".into()),
                creation_time: None
            }
        );
    }

    #[test]
    fn the_volume_snapshot_is_owned_and_names_its_class_only_when_given() {
        let owner = OwnerReference {
            name: "d".into(),
            ..Default::default()
        };
        let without = volume_snapshot("d", "pvc", None, owner.clone());
        assert!(without["spec"].get("volumeSnapshotClassName").is_none());
        assert_eq!(without["metadata"]["ownerReferences"][0]["name"], "d");
        let with = volume_snapshot("d", "pvc", Some("gold"), owner);
        assert_eq!(with["spec"]["volumeSnapshotClassName"], "gold");
        assert_eq!(with["spec"]["source"]["persistentVolumeClaimName"], "pvc");
    }
}
