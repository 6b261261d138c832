//! Internal, cluster-scoped kinds shared by the CSI controller and the node plugins.
//!
//! They are the volume and snapshot inventory *and* the node work items (in the TopoLVM
//! `LogicalVolume` spirit): the controller declares a volume or snapshot with `spec.nodeName`, the
//! node plugin of that node (watching with a field selector on the selectable `spec.nodeName`)
//! makes it real with its engine and reports in `status`, including a typed error the controller
//! turns into the right gRPC code. Users do not create these objects.

pub mod attachment;
pub mod export;
pub mod merge;
pub mod migration;
pub mod node;
pub mod restore;
pub mod snapshot;
pub mod volume;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use attachment::{
    AttachmentPhase, LivediskAttachment, LivediskAttachmentSpec, LivediskAttachmentStatus,
    attachment_name, restore_source_name,
};
pub use export::{ExportPhase, LivediskExport, LivediskExportSpec, LivediskExportStatus};
pub use merge::{LivediskMerge, LivediskMergeSpec, LivediskMergeStatus, MergePhase};
pub use migration::{
    LivediskMigration, LivediskMigrationSpec, LivediskMigrationStatus, MigrationLayer,
    MigrationPhase, MigrationSource, MigrationStage, MigrationTarget, MigrationVerification,
};
pub use node::{ExportFront, LivediskNode, LivediskNodeSpec, LivediskNodeStatus};
pub use restore::{
    LivediskRestore, LivediskRestoreSpec, LivediskRestoreStatus, RestorePhase, RestoreWait,
};
pub use snapshot::{
    GROUP_SNAPSHOT_LABEL, GroupMember, LivediskSnapshot, LivediskSnapshotSpec,
    LivediskSnapshotStatus, SnapshotGroup, VolumeSnapshotReference,
};
pub use volume::{ContentSource, LivediskVolume, LivediskVolumeSpec, LivediskVolumeStatus};

pub use livedisk_common::ids::{SNAPSHOT_ID_PATTERN, VOLUME_ID_PATTERN};

/// CEL: a LivediskVolume is named by its volume ID.
const VOLUME_NAME_RULE: &str = concat!(
    "self.metadata.name.matches('",
    livedisk_common::volume_id_regex!(),
    "')"
);
/// CEL: a LivediskSnapshot is named by its snapshot ID.
const SNAPSHOT_NAME_RULE: &str = concat!(
    "self.metadata.name.matches('",
    livedisk_common::snapshot_id_regex!(),
    "')"
);

/// Where a node-side object is in its life.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
pub enum NodePhase {
    /// Declared; the node has not acted on it yet.
    #[default]
    Pending,
    /// The node is creating it (for example copying or flattening data).
    Creating,
    /// It exists on the node and can be used.
    Ready,
    /// The node could not create it; `status.error` says why. The controller deletes it.
    Failed,
    /// The node is removing it (a finalizer holds the object until it is gone).
    Deleting,
}

/// A typed error from the node, as the CSI code the controller must answer with.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeError {
    /// The gRPC status code the CSI controller returns for this failure.
    pub code: ErrorCode,
    /// The whole error chain, for people.
    pub message: String,
}

/// The code of a node failure: the one error-code vocabulary of livedisk.
pub use livedisk_common::ErrorCode;

/// Finalizer the node plugin puts on objects it has storage for, so deletion waits for cleanup.
pub const NODE_FINALIZER: &str = "livedisk.io/node-storage";
