//! What each livedisk kind refers to, as data the pipeline can check.

use livedisk_api::{
    DiskEvacuation, DiskExport, DiskMerge, DiskMigration, DiskRestore, DiskSnapshot,
};

/// An object a livedisk resource names and needs before any work can start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reference {
    PersistentVolumeClaim(String),
    VirtualMachine(String),
    DiskSnapshot(String),
}

impl std::fmt::Display for Reference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reference::PersistentVolumeClaim(n) => write!(f, "PersistentVolumeClaim \"{n}\""),
            Reference::VirtualMachine(n) => write!(f, "VirtualMachine \"{n}\""),
            Reference::DiskSnapshot(n) => write!(f, "DiskSnapshot \"{n}\""),
        }
    }
}

/// The livedisk kinds share one reconcile pipeline; this says what differs between them.
pub trait LivediskKind {
    /// Objects that must exist before the work can start.
    fn references(&self) -> Vec<Reference>;
    /// A one-line description of the source for `status.source`, where the kind has one.
    fn source_description(&self) -> Option<String> {
        None
    }
}

impl LivediskKind for DiskSnapshot {
    fn references(&self) -> Vec<Reference> {
        let source = &self.spec.source;
        let pvc = source
            .persistent_volume_claim_name
            .clone()
            .map(Reference::PersistentVolumeClaim);
        let vm = source
            .virtual_machine_name
            .clone()
            .map(Reference::VirtualMachine);
        pvc.into_iter().chain(vm).collect()
    }

    fn source_description(&self) -> Option<String> {
        let source = &self.spec.source;
        source
            .persistent_volume_claim_name
            .as_ref()
            .map(|n| format!("PersistentVolumeClaim/{n}"))
            .or_else(|| {
                source
                    .virtual_machine_name
                    .as_ref()
                    .map(|n| format!("VirtualMachine/{n}"))
            })
    }
}

impl LivediskKind for DiskMerge {
    fn references(&self) -> Vec<Reference> {
        let spec = &self.spec;
        std::iter::once(Reference::PersistentVolumeClaim(
            spec.persistent_volume_claim_name.clone(),
        ))
        .chain(spec.base_snapshot_name.clone().map(Reference::DiskSnapshot))
        .chain(spec.top_snapshot_name.clone().map(Reference::DiskSnapshot))
        .collect()
    }
}

/// Its target is a node running the livedisk node plugin: the migration's lookup checks the
/// node's LivediskNode (`crate::migration::lookup`), not the Kubernetes Node.
impl LivediskKind for DiskMigration {
    fn references(&self) -> Vec<Reference> {
        vec![Reference::PersistentVolumeClaim(
            self.spec.persistent_volume_claim_name.clone(),
        )]
    }
}

impl LivediskKind for DiskExport {
    fn references(&self) -> Vec<Reference> {
        std::iter::once(Reference::DiskSnapshot(self.spec.snapshot_name.clone()))
            .chain(
                self.spec
                    .base_snapshot_name
                    .clone()
                    .map(Reference::DiskSnapshot),
            )
            .collect()
    }
}

impl LivediskKind for DiskRestore {
    fn references(&self) -> Vec<Reference> {
        vec![
            Reference::PersistentVolumeClaim(self.spec.persistent_volume_claim_name.clone()),
            Reference::DiskSnapshot(self.spec.snapshot_name.clone()),
        ]
    }
}

/// It names a node, not an object of a namespace: the evacuation's lookup checks the node's
/// LivediskNode and finds the claims of its volumes (`crate::evacuation::lookup`).
impl LivediskKind for DiskEvacuation {
    fn references(&self) -> Vec<Reference> {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use livedisk_api::{DiskSnapshotSource, DiskSnapshotSpec};

    #[test]
    fn snapshot_of_a_pvc_refers_to_the_pvc_only() {
        let snapshot = DiskSnapshot::new(
            "s",
            DiskSnapshotSpec {
                source: DiskSnapshotSource {
                    persistent_volume_claim_name: Some("disk".into()),
                    virtual_machine_name: None,
                },
                snapshot_class_name: None,
                freeze: Default::default(),
                deletion_policy: Default::default(),
            },
        );
        assert_eq!(
            snapshot.references(),
            vec![Reference::PersistentVolumeClaim("disk".into())]
        );
        assert_eq!(
            snapshot.source_description().as_deref(),
            Some("PersistentVolumeClaim/disk")
        );
    }
}
