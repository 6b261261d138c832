//! `DiskEvacuation`: move every livedisk volume off a node, one `DiskMigration` per volume.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::common::{Phase, Progress};
use crate::migration::MigrationStage;
use crate::schema;

/// A node evacuation: every livedisk volume the node holds is moved to another node by a
/// `DiskMigration` of its claim, which the evacuation creates, owns and follows.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "livedisk.io",
    version = "v1alpha1",
    kind = "DiskEvacuation",
    doc = "Moves every livedisk volume off a node (one DiskMigration per volume).",
    status = "DiskEvacuationStatus",
    shortname = "devac",
    category = "livedisk",
    printcolumn = r#"{"name":"Node","type":"string","jsonPath":".spec.nodeName","description":"Node being emptied"}"#,
    printcolumn = r#"{"name":"Target","type":"string","jsonPath":".spec.targetNodeName","description":"Node the volumes go to; empty: chosen per volume"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Done","type":"integer","jsonPath":".status.counts.completed","description":"Volumes moved"}"#,
    printcolumn = r#"{"name":"Total","type":"integer","jsonPath":".status.counts.total","description":"Volumes found on the node"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    validation = Rule::new("self.spec.nodeName == oldSelf.spec.nodeName && has(self.spec.targetNodeName) == has(oldSelf.spec.targetNodeName) && (!has(self.spec.targetNodeName) || self.spec.targetNodeName == oldSelf.spec.targetNodeName) && self.spec.verify == oldSelf.spec.verify").message("nodeName, targetNodeName and verify are immutable; only bandwidthLimit, maxConcurrentMigrations and cancel may change").reason(Reason::FieldValueForbidden),
    validation = Rule::new("!oldSelf.spec.cancel || self.spec.cancel").message("spec.cancel cannot be set back to false").reason(Reason::FieldValueForbidden),
    validation = Rule::new("!has(self.spec.targetNodeName) || self.spec.targetNodeName != self.spec.nodeName").message("targetNodeName must be another node than nodeName").reason(Reason::FieldValueInvalid)
)]
#[serde(rename_all = "camelCase")]
pub struct DiskEvacuationSpec {
    /// The node to empty: every livedisk volume it holds (its LivediskVolumes) is moved off it.
    #[schemars(schema_with = "schema::object_name")]
    pub node_name: String,
    /// The node every volume goes to. Empty: for each volume, the livedisk node other than
    /// `nodeName` with the most available pool space (as its node plugin reports it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "schema::optional_object_name")]
    pub target_node_name: Option<String>,
    /// Maximum copy speed of each migration in bytes per second, e.g. `500Mi` (so at most
    /// `maxConcurrentMigrations` times this in all). Empty: unlimited. May be changed while the
    /// evacuation runs; the running migrations follow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "schema::bandwidth")]
    pub bandwidth_limit: Option<String>,
    /// How many volumes are moved at the same time; the next one starts when one ends. May be
    /// changed while the evacuation runs.
    #[serde(default = "default_concurrency")]
    #[schemars(range(min = 1, max = 64))]
    pub max_concurrent_migrations: i32,
    /// Compare source and target of each volume after its cutover, before the source is
    /// released (`DiskMigration` `spec.verify`).
    #[serde(default = "default_true")]
    pub verify: bool,
    /// Set to true to stop: no further migration starts, and the running ones are cancelled
    /// (one past its cutover completes). Moved volumes stay where they went.
    #[serde(default)]
    pub cancel: bool,
}

fn default_true() -> bool {
    true
}

/// Two at a time: a node's volumes move without one copy starving every other.
pub const DEFAULT_CONCURRENT_MIGRATIONS: i32 = 2;

fn default_concurrency() -> i32 {
    DEFAULT_CONCURRENT_MIGRATIONS
}

/// Observed state of a DiskEvacuation.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DiskEvacuationStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Pending, Running (while any migration has not ended), Completed, Failed (a volume's
    /// migration failed; the others ran to their end) or Cancelled.
    #[serde(default)]
    pub phase: Phase,
    /// Every volume found on the node, with its migration.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<EvacuationVolume>,
    /// How many volumes are in which state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counts: Option<EvacuationCounts>,
    /// Bytes copied by the migrations started so far, of how many, at what rate (the volumes not
    /// started yet are not in it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// Ready, Reconciling and Stalled, per the Kubernetes API conventions.
    #[serde(default)]
    #[schemars(schema_with = "schema::conditions")]
    pub conditions: Vec<Condition>,
}

/// One volume of the node and what became of it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EvacuationVolume {
    /// The volume's ID (its LivediskVolume, the PersistentVolume's `spec.csi.volumeHandle`).
    pub volume_id: String,
    /// The claim bound to the volume; absent for a volume no claim is bound to (skipped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent_volume_claim: Option<ClaimReference>,
    /// The node the volume is moved to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_node_name: Option<String>,
    /// The DiskMigration that moves it, in the claim's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration_name: Option<String>,
    /// Pending (not started, or its migration waits), Running, Completed, Failed, Cancelled, or
    /// Skipped (not moved: `message` says why).
    pub phase: EvacuationVolumePhase,
    /// While its migration runs: Copying, Synchronized, CuttingOver or Verifying.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<MigrationStage>,
    /// Percent copied by its migration (0-100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub percent: Option<i32>,
    /// What its migration says (its Ready condition's message), or why it was skipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// A claim, by namespace and name.
#[derive(
    Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub struct ClaimReference {
    /// The claim's namespace (the DiskMigration is created there).
    pub namespace: String,
    /// The claim's name.
    pub name: String,
}

/// Where one volume of an evacuation is.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum EvacuationVolumePhase {
    /// Not started yet (waiting for a free slot), or its migration has not started moving.
    Pending,
    /// Its migration is moving it.
    Running,
    /// It is on its target node.
    Completed,
    /// Its migration failed; its message says on which side of the cutover.
    Failed,
    /// Its migration was cancelled (or never started) because the evacuation was cancelled; it
    /// stays on the node.
    Cancelled,
    /// Not moved: no claim is bound to it, its claim's namespace is being deleted, or it left
    /// the node before its migration started.
    Skipped,
}

impl EvacuationVolumePhase {
    /// Whether nothing more happens to the volume in this evacuation.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Completed | Self::Failed | Self::Cancelled | Self::Skipped
        )
    }
}

/// How many volumes of an evacuation are in which state.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EvacuationCounts {
    /// Volumes found on the node (skipped ones included).
    #[schemars(range(min = 0))]
    pub total: i32,
    /// Volumes moved.
    #[schemars(range(min = 0))]
    pub completed: i32,
    /// Volumes whose migration failed.
    #[schemars(range(min = 0))]
    pub failed: i32,
    /// Volumes left on the node because the evacuation was cancelled.
    #[schemars(range(min = 0))]
    pub cancelled: i32,
    /// Volumes not moved by this evacuation (no claim bound, its namespace being deleted, or
    /// gone from the node before their migration started).
    #[schemars(range(min = 0))]
    pub skipped: i32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minimal_evacuation_verifies_and_moves_two_volumes_at_a_time() {
        let spec: DiskEvacuationSpec =
            serde_json::from_value(serde_json::json!({"nodeName": "node-a"})).expect("spec");
        assert_eq!(spec.target_node_name, None);
        assert_eq!(spec.bandwidth_limit, None);
        assert_eq!(
            spec.max_concurrent_migrations,
            DEFAULT_CONCURRENT_MIGRATIONS
        );
        assert!(spec.verify);
        assert!(!spec.cancel);
    }

    #[test]
    fn only_a_volume_that_may_still_move_is_not_terminal() {
        use EvacuationVolumePhase::*;
        for (phase, terminal) in [
            (Pending, false),
            (Running, false),
            (Completed, true),
            (Failed, true),
            (Cancelled, true),
            (Skipped, true),
        ] {
            assert_eq!(phase.is_terminal(), terminal, "{phase:?}");
        }
    }
}
