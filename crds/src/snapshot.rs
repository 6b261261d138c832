//! `DiskSnapshot`: a point-in-time copy of a PVC, or of every livedisk disk of a VirtualMachine.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::common::{Phase, Progress};
use crate::schema;

/// A live, crash-consistent snapshot of a disk (or of all disks of a VirtualMachine as one group).
///
/// The operator turns it into a standard VolumeSnapshot (or VolumeGroupSnapshot for a VM), so
/// backup tools see the same snapshot. Taking it is O(1): the active qcow2 layer is sealed and a
/// new one put on top without pausing the consumer. Deleting it merges its layer away live.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "livedisk.io",
    version = "v1alpha1",
    kind = "DiskSnapshot",
    doc = "A live snapshot of a PVC or of every livedisk disk of a VirtualMachine.",
    namespaced,
    status = "DiskSnapshotStatus",
    shortname = "dsnap",
    category = "livedisk",
    printcolumn = r#"{"name":"Source","type":"string","jsonPath":".status.source","description":"What was snapshotted"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status","description":"Whether the snapshot can be used"}"#,
    printcolumn = r#"{"name":"Size","type":"string","jsonPath":".status.restoreSize","description":"Size of a volume restored from it"}"#,
    printcolumn = r#"{"name":"Held","type":"integer","jsonPath":".status.allocatedBytes","description":"Bytes of the pool the snapshot's layer holds"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase","description":"Pending, Running, Ready, Failed or Deleting"}"#,
    printcolumn = r#"{"name":"Progress","type":"integer","priority":1,"jsonPath":".status.progress.percent","description":"Percent of the deletion merge done"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","priority":1,"jsonPath":".status.conditions[?(@.type==\"Ready\")].reason","description":"Why it is (not) ready"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    validation = Rule::new("self.spec == oldSelf.spec").message("spec is immutable: create a new DiskSnapshot instead").reason(Reason::FieldValueForbidden)
)]
#[serde(rename_all = "camelCase")]
pub struct DiskSnapshotSpec {
    /// What to snapshot: exactly one PersistentVolumeClaim or one KubeVirt VirtualMachine in the
    /// same namespace.
    pub source: DiskSnapshotSource,
    /// VolumeSnapshotClass (or VolumeGroupSnapshotClass for a VM) to use. Empty: the livedisk
    /// default class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "schema::optional_object_name")]
    pub snapshot_class_name: Option<String>,
    /// Guest filesystem freeze around a VirtualMachine snapshot: `Auto` freezes when a guest agent
    /// answers, `Required` fails the snapshot if it cannot freeze, `Never` takes a crash-consistent
    /// snapshot. The guest is always thawed afterwards. Ignored for a PVC source.
    #[serde(default)]
    pub freeze: FreezePolicy,
    /// What happens to the underlying snapshot when this object is deleted: `Delete` merges the
    /// layer away and reclaims space; `Retain` keeps the VolumeSnapshotContent.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

/// Exactly one source.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("has(self.persistentVolumeClaimName) != has(self.virtualMachineName)").message("exactly one of persistentVolumeClaimName or virtualMachineName must be set")
)]
pub struct DiskSnapshotSource {
    /// Name of a PersistentVolumeClaim of the livedisk StorageClass in the same namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "schema::optional_object_name")]
    pub persistent_volume_claim_name: Option<String>,
    /// Name of a KubeVirt VirtualMachine in the same namespace: all its livedisk volumes are
    /// snapshotted as one consistent group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "schema::optional_object_name")]
    pub virtual_machine_name: Option<String>,
}

/// Guest freeze behaviour for VirtualMachine snapshots.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema,
)]
pub enum FreezePolicy {
    #[default]
    Auto,
    Required,
    Never,
}

/// Fate of the underlying snapshot when the DiskSnapshot is deleted.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema,
)]
pub enum DeletionPolicy {
    #[default]
    Delete,
    Retain,
}

/// Observed state of a DiskSnapshot.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DiskSnapshotStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Pending, Running (being taken), Ready, Failed or Deleting (its layer is being merged
    /// away; `progress` says how far).
    #[serde(default)]
    pub phase: Phase,
    /// The source, as `PersistentVolumeClaim/<name>` or `VirtualMachine/<name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// PersistentVolumeClaim source: the standard VolumeSnapshot that carries this snapshot (a
    /// VirtualMachine source lists its groups in `volumeGroupSnapshotNames`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_snapshot_name: Option<String>,
    /// Size of a volume restored from this snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_size: Option<String>,
    /// When the point in time was captured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_time: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    /// The VolumeSnapshotContent bound to the VolumeSnapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_snapshot_content_name: Option<String>,
    /// The CSI snapshot ID (`snap-<uuid>`): what GetMetadataDelta and backup tools name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_handle: Option<String>,
    /// Space the snapshot holds in its node's pool: the allocated bytes of its sealed layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocated_bytes: Option<i64>,
    /// While `Deleting`: how far the merge that removes the snapshot's layer is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// VirtualMachine source: the VolumeGroupSnapshots that carry the snapshot, one per node
    /// that holds some of the VM's livedisk volumes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volume_group_snapshot_names: Vec<String>,
    /// VirtualMachine source: each volume of the VM, with its member VolumeSnapshot or the reason
    /// it was left out.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VirtualMachineVolumeSnapshot>,
    /// VirtualMachine source: the state of the VM when the snapshot was taken, in KubeVirt's
    /// vocabulary (`Online`, `GuestAgent`, `NoGuestAgent`, `QuiesceTimeout`, `Paused`,
    /// `PartialSnapshot`), each with a message.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub indications: Vec<SnapshotIndication>,
    /// VirtualMachine source: the guest filesystem freeze around the snapshot, when one was made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_freeze: Option<GuestFreeze>,
    /// VirtualMachine source: how many times the group was started. An attempt interrupted
    /// while the guest was frozen (an operator restart) is discarded and taken again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub attempt: Option<i32>,
    /// Ready, Reconciling and Stalled, per the Kubernetes API conventions.
    #[serde(default)]
    #[schemars(schema_with = "schema::conditions")]
    pub conditions: Vec<Condition>,
}

/// One volume of a VirtualMachine and what its snapshot is.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineVolumeSnapshot {
    /// The volume's name in the VM's `spec.template.spec.volumes`.
    pub name: String,
    /// The claim behind it (a DataVolume's claim has the DataVolume's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim_name: Option<String>,
    /// The node that holds the volume, whose group took it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// The member VolumeSnapshot made by the group: restore the volume from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_snapshot_name: Option<String>,
    /// Size of a volume restored from the member snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_size: Option<String>,
    /// Set when the volume was left out: why (not a claim, or a claim of another driver).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
}

/// A fact about the VM at the snapshot, named as KubeVirt's VirtualMachineSnapshot names it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotIndication {
    /// The indication, in KubeVirt's words.
    pub indication: String,
    /// What it means for this snapshot.
    pub message: String,
}

/// The guest freeze of a VirtualMachine snapshot.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GuestFreeze {
    /// `Freezing` (asked), `Frozen` (the guest answered), `Thawed` (unfrozen after the cut) or
    /// `Failed` (the freeze was refused; the message says why).
    pub state: GuestFreezeState,
    /// When the freeze was asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_at: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    /// How long the guest stayed frozen, at most: from the freeze request to the unfreeze answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub frozen_milliseconds: Option<i64>,
    /// What the freeze or unfreeze answered when it did not succeed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema,
)]
pub enum GuestFreezeState {
    #[default]
    Freezing,
    Frozen,
    Thawed,
    Failed,
}
