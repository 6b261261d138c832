//! The public `livedisk.io/v1alpha1` API: the custom resources users apply, their status shape,
//! and the pure helpers every controller uses to report on them.
//!
//! The CRD YAML in `crds/generated/` and `charts/livedisk/crds/` is generated from these types by
//! the `crdgen` binary (`make generate`); CI fails when the committed YAML drifts from the types.

pub mod common;
pub mod conditions;
pub mod evacuation;
pub mod export;
pub mod internal;
pub mod kube_error;
pub mod merge;
pub mod migration;
pub mod restore;
pub mod schema;
pub mod snapshot;

pub use common::{Phase, Progress};
pub use evacuation::{
    ClaimReference, DiskEvacuation, DiskEvacuationSpec, DiskEvacuationStatus, EvacuationCounts,
    EvacuationVolume, EvacuationVolumePhase,
};
pub use export::{DiskExport, DiskExportSpec, DiskExportStatus, ExportProtocol};
pub use kube_error::{kube_error_code, kube_error_message};
pub use merge::{DiskMerge, DiskMergeSpec, DiskMergeStatus, MergeMode};
pub use migration::{
    DiskMigration, DiskMigrationSpec, DiskMigrationStatus, MigrationStage, MigrationVerification,
};
pub use restore::{DiskRestore, DiskRestoreSpec, DiskRestoreStatus};
pub use snapshot::{DiskSnapshot, DiskSnapshotSource, DiskSnapshotSpec, DiskSnapshotStatus};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// The API group of every livedisk resource.
pub const GROUP: &str = "livedisk.io";
/// The served and stored version of the public API.
pub const VERSION: &str = "v1alpha1";
/// The `kubectl get <category>` name that lists every livedisk resource.
pub const CATEGORY: &str = "livedisk";

/// The internal CRDs shared by the CSI controller and the node plugins.
pub fn internal_crds() -> Vec<CustomResourceDefinition> {
    vec![
        internal::LivediskVolume::crd(),
        internal::LivediskSnapshot::crd(),
        internal::LivediskNode::crd(),
        internal::LivediskMerge::crd(),
        internal::LivediskRestore::crd(),
        internal::LivediskExport::crd(),
        internal::LivediskAttachment::crd(),
        internal::LivediskMigration::crd(),
    ]
}

/// Every public CRD, in a stable order (the order `crdgen` writes them in). All are namespaced
/// but `DiskEvacuation`, which names a node and moves volumes of every namespace.
pub fn public_crds() -> Vec<CustomResourceDefinition> {
    vec![
        DiskSnapshot::crd(),
        DiskMerge::crd(),
        DiskMigration::crd(),
        DiskExport::crd(),
        DiskRestore::crd(),
        DiskEvacuation::crd(),
    ]
}
