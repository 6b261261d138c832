//! The livedisk node engine: owns the volumes of one pool on this host by driving the host's
//! qemu-storage-daemon over QMP. It imports no Kubernetes and no gRPC crate; the CSI node plugin
//! and the admin CLI are its callers.
//!
//! Layout, bottom up:
//!
//! * [`qsd`]: the daemon process, QMP sessions, an NBD client — shared by every backend;
//! * [`error`], [`extents`], [`lock`], [`failpoint`], [`stats`]: backend-neutral vocabulary (the
//!   one error type, changed-extent lists, per-volume locks, test fault injection, totals of the
//!   bytes jobs moved);
//! * [`pool_space`]: the full-pool rule (what a volume or snapshot needs of the pool's free space);
//! * [`qcow2`]: the qcow2 chain backend, today the only one — records, plans, and one file per
//!   operation (snapshot, merge, clone, revert, export, recovery).
//!
//! The seam for the host-filesystem (btrfs) and storage-system (LVM thin) backends is the
//! boundary between `qcow2` and the rest: callers use only what this file re-exports, never a
//! qcow2 type, so a second backend plugs in beside `qcow2` and the trait is designed then,
//! against two implementations (decision 10; see docs/adr/0001-engine-crate-and-backend-seam.md).

pub mod error;
pub mod extents;
pub mod failpoint;
pub mod lock;
pub mod pool_space;
pub mod qcow2;
pub mod qsd;
pub mod stats;

pub use error::EngineError;
pub use extents::Extent;
pub use livedisk_common::{ErrorCode, SnapshotId, VolumeId, ids};
pub use qcow2::clone::FlattenProgress;
pub use qcow2::record::MergeMode;
pub use qcow2::{
    Engine, EngineConfig, ExportInfo, ExtentList, ExtentPage, MergeOptions, Recovery, SnapshotInfo,
    SnapshotTimings, VolumeInfo, hidden_base_id,
};
pub use qsd::daemon::{Daemon, DaemonError, DaemonPolicy, Monitor, Origin, RuntimeDir};
pub use qsd::qmp::{JobInfo, SessionState};
pub use stats::JobStats;
// Modules the admin CLI and the tests reach into by path.
pub use qcow2::{bitmap, clone, plan, qemu_img, record, recover};
pub use qsd::{daemon, nbd_client, qmp};
