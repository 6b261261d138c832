//! Pure decisions for recovery: given what the daemon and the files show
//! after an interruption, which state is the truth. No I/O here.

/// What is known about an interrupted snapshot (a `PendingSnapshot`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotEvidence {
    /// The daemon still holds the volume's active node, so it did not
    /// restart; `overlay_backed` says whether the overlay node exists and
    /// has a backing node, i.e. whether the transaction ran.
    DaemonHasVolume { overlay_backed: Option<bool> },
    /// The daemon restarted: only the files are left.
    FilesOnly { overlay_valid: bool },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotResolution {
    /// Keep the snapshot: seal the old active layer, the overlay is active.
    RollForward,
    /// Forget it: delete the overlay node and file.
    RollBack,
}

/// Rolling forward is always safe when the daemon restarted: the old active
/// layer then holds every write acknowledged before the transaction, the
/// overlay every write after it (or nothing), and the chain "old ← overlay"
/// shows both. Only a live daemon that never switched must roll back, since
/// its writes still go to the old active layer.
pub fn resolve_snapshot(ev: SnapshotEvidence) -> SnapshotResolution {
    match ev {
        SnapshotEvidence::DaemonHasVolume {
            overlay_backed: Some(true),
        } => SnapshotResolution::RollForward,
        SnapshotEvidence::DaemonHasVolume { .. } => SnapshotResolution::RollBack,
        SnapshotEvidence::FilesOnly {
            overlay_valid: true,
        } => SnapshotResolution::RollForward,
        SnapshotEvidence::FilesOnly {
            overlay_valid: false,
        } => SnapshotResolution::RollBack,
    }
}

/// What is known about an active commit interrupted after `job-complete`
/// may have been sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompletingEvidence {
    /// The daemon still has the job: follow its status.
    JobInDaemon,
    /// The daemon restarted; `views_equal` says whether the chain read
    /// through the top layer equals the chain read from the base layer.
    DaemonLost { views_equal: bool },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompletingResolution {
    /// Follow (or restart) the job; the top layer is still the truth.
    Resume,
    /// Treat the merge as done: the base layer is the truth.
    Finished,
}

/// With the daemon gone, the switch of writes to the base may or may not
/// have happened. If both views are equal the choice loses nothing, so the
/// merge is finished. If they differ the top layer is kept: QEMU switches
/// only once the base is fully in sync, so a difference means either writes
/// not yet copied (top is right) or writes after the switch (base is right)
/// and nothing on disk tells them apart. The engine runs active commits
/// only on deleted volumes (nobody writes there); on a live volume the
/// active layer is sealed internally first and merged by a non-active
/// commit, so no write target ever switches unseen.
pub fn resolve_completing(ev: CompletingEvidence) -> CompletingResolution {
    match ev {
        CompletingEvidence::JobInDaemon => CompletingResolution::Resume,
        CompletingEvidence::DaemonLost { views_equal: true } => CompletingResolution::Finished,
        CompletingEvidence::DaemonLost { views_equal: false } => CompletingResolution::Resume,
    }
}

/// What is known about an interrupted revert (a `PendingRevert`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RevertEvidence {
    /// The record says the new layer was complete and on disk.
    pub built: bool,
    /// The new layer's file opens as a qcow2 image.
    pub layer_valid: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevertResolution {
    /// Switch to the new layer: the volume shows the snapshot's view.
    RollForward,
    /// Drop the new layer: the volume keeps its content from before.
    RollBack,
}

/// A revert never switches a write target before the record says `built`
/// (the volume is detached, nobody writes, and the old active layer stays
/// until the record stops naming it), so until then rolling back loses
/// nothing and keeps the pre-revert content. Once built, the new layer is
/// complete and synced: rolling forward finishes what the caller asked
/// for. A built layer that no longer opens (a lost disk write, which the
/// sync rules out) is rolled back: the old layers are all still there.
pub fn resolve_revert(ev: RevertEvidence) -> RevertResolution {
    match ev {
        RevertEvidence {
            built: true,
            layer_valid: true,
        } => RevertResolution::RollForward,
        _ => RevertResolution::RollBack,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revert_rolls_forward_only_once_built() {
        use RevertResolution::*;
        for (built, layer_valid, want) in [
            (true, true, RollForward),
            (true, false, RollBack),
            (false, true, RollBack),
            (false, false, RollBack),
        ] {
            assert_eq!(
                resolve_revert(RevertEvidence { built, layer_valid }),
                want,
                "built={built} valid={layer_valid}"
            );
        }
    }

    #[test]
    fn snapshot_rolls_forward_only_when_writes_may_have_switched() {
        use SnapshotEvidence::*;
        use SnapshotResolution::*;
        let cases = [
            (
                DaemonHasVolume {
                    overlay_backed: Some(true),
                },
                RollForward,
            ),
            (
                DaemonHasVolume {
                    overlay_backed: Some(false),
                },
                RollBack,
            ),
            (
                DaemonHasVolume {
                    overlay_backed: None,
                },
                RollBack,
            ),
            (
                FilesOnly {
                    overlay_valid: true,
                },
                RollForward,
            ),
            (
                FilesOnly {
                    overlay_valid: false,
                },
                RollBack,
            ),
        ];
        for (ev, want) in cases {
            assert_eq!(resolve_snapshot(ev), want, "{ev:?}");
        }
    }

    #[test]
    fn completing_finishes_only_when_both_views_agree() {
        use CompletingEvidence::*;
        use CompletingResolution::*;
        assert_eq!(resolve_completing(JobInDaemon), Resume);
        assert_eq!(
            resolve_completing(DaemonLost { views_equal: true }),
            Finished
        );
        assert_eq!(
            resolve_completing(DaemonLost { views_equal: false }),
            Resume
        );
    }
}
