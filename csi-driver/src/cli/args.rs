//! Command-line shape (clap derive). Every flag has an environment fallback
//! so that a node's admin shell can set the pool once.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use livedisk_engine::{SnapshotId, VolumeId};

use super::size::parse_size;
use livedisk_csi::run::EngineDaemon;

#[derive(Debug, Parser)]
#[command(name = "livedisk-csi", version, about = "livedisk node binary")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Inspect and repair the volumes of this host's pool.
    Admin(AdminArgs),
    /// Serve the CSI Identity and Controller services (cluster side).
    Controller(livedisk_csi::run::ControllerArgs),
    /// Serve the CSI Identity and Node services and run this node's agent (host side).
    Node(livedisk_csi::run::NodeArgs),
    /// Serve the engine pod's front ends: runs nbdfuse for each attached volume, beside the
    /// engine daemon, so that node plugin restarts keep consumers' I/O.
    Frontends(livedisk_csi::run::FrontEndsArgs),
    /// Back up a snapshot export over HTTPS (full or incremental), or restore backups onto a
    /// block device or file.
    Backup(super::backup::args::BackupArgs),
}

#[derive(Debug, Args)]
pub struct AdminArgs {
    /// Pool directory (one sub-directory per volume).
    #[arg(long, env = "LIVEDISK_POOL", default_value = "/var/lib/livedisk/pool")]
    pub pool: PathBuf,
    /// Runtime directory of the host's engine daemon (QMP/NBD sockets).
    #[arg(long, env = "LIVEDISK_RUNTIME_DIR", default_value = "/run/livedisk")]
    pub runtime_dir: PathBuf,
    /// Whether a command that finds no engine daemon starts one (`start`) or fails (`attach`:
    /// inside the chart's node plugin container, whose daemon the engine pod owns).
    #[arg(long, env = "LIVEDISK_ENGINE_DAEMON", value_enum, default_value_t = EngineDaemon::Start)]
    pub engine_daemon: EngineDaemon,
    /// Print JSON instead of tables.
    #[arg(long, global = true, env = "LIVEDISK_JSON")]
    pub json: bool,
    #[command(subcommand)]
    pub cmd: AdminCmd,
}

fn vol(s: &str) -> Result<VolumeId, String> {
    VolumeId::parse(s).map_err(|e| e.to_string())
}

fn snap(s: &str) -> Result<SnapshotId, String> {
    SnapshotId::parse(s).map_err(|e| e.to_string())
}

#[derive(Debug, Args, Clone, Copy)]
pub struct PageArgs {
    /// Resume at this byte offset.
    #[arg(long, default_value_t = 0)]
    pub start: u64,
    /// At most this many extents (0: all).
    #[arg(long, default_value_t = 0)]
    pub max: usize,
}

#[derive(Debug, Subcommand)]
pub enum AdminCmd {
    /// Pool path, engine daemon pid and QEMU version.
    #[command(alias = "pools")]
    Info,
    /// Starts the engine daemon (or re-attaches to it) and brings it in line
    /// with the records: re-adds volumes and exports, finishes merges.
    Start,
    /// Stops the engine daemon (refused while volumes are exported).
    Stop {
        /// Stop even though consumers or snapshot readers are attached.
        #[arg(long)]
        force: bool,
    },
    /// Volumes of the pool with size, chain length and snapshot count.
    Volumes,
    /// The qcow2 layers of a volume, base first.
    Chain {
        #[arg(value_parser = vol)]
        volume: VolumeId,
    },
    /// The volume's record file, pretty-printed.
    Record {
        #[arg(value_parser = vol)]
        volume: VolumeId,
    },
    /// Snapshots of a volume.
    Snapshots {
        #[arg(value_parser = vol)]
        volume: VolumeId,
    },
    /// Block jobs (merges) of the daemon with progress.
    Jobs,
    /// NBD exports of the daemon.
    Exports,
    /// Creates an empty volume.
    CreateVolume {
        /// Virtual size, e.g. 1GiB, 512MiB, 4096.
        #[arg(long, value_parser = parse_size)]
        size: u64,
        /// Volume ID (default: a new one).
        #[arg(long, value_parser = vol)]
        id: Option<VolumeId>,
    },
    /// Snapshots one or more volumes atomically (one transaction).
    Snapshot {
        #[arg(required = true, value_parser = vol)]
        volumes: Vec<VolumeId>,
        /// Snapshot ID (only with one volume; default: a new one).
        #[arg(long, value_parser = snap)]
        id: Option<SnapshotId>,
    },
    /// Deletes a snapshot by merging its layer away live.
    DeleteSnapshot {
        #[arg(value_parser = snap)]
        snapshot: SnapshotId,
        /// Merge rate limit in bytes/s (suffixes allowed; 0: unlimited).
        #[arg(long, value_parser = parse_size)]
        speed: Option<u64>,
        /// Wait for the merge to finish (otherwise return once it runs).
        #[arg(long)]
        wait: bool,
    },
    /// Changes the rate limit of a running merge job.
    SetSpeed {
        job: String,
        #[arg(value_parser = parse_size)]
        speed: u64,
    },
    /// Cancels a running merge job (the snapshot stays `deleting`).
    Cancel { job: String },
    /// Deletes a volume; its snapshots live on.
    DeleteVolume {
        #[arg(value_parser = vol)]
        volume: VolumeId,
    },
    /// Reverts a detached volume to any of its snapshots; every snapshot is
    /// kept (writes since the latest snapshot are discarded).
    Revert {
        #[arg(value_parser = vol)]
        volume: VolumeId,
        #[arg(value_parser = snap)]
        snapshot: SnapshotId,
    },
    /// Allocated extents of a snapshot (from the records; no data read).
    Allocated {
        #[arg(value_parser = snap)]
        snapshot: SnapshotId,
        #[command(flatten)]
        page: PageArgs,
    },
    /// Extents changed after BASE up to TARGET.
    Delta {
        #[arg(value_parser = snap)]
        base: SnapshotId,
        #[arg(value_parser = snap)]
        target: SnapshotId,
        #[command(flatten)]
        page: PageArgs,
    },
    /// Starts a read-only NBD export of a snapshot and prints its URI.
    Export {
        #[arg(value_parser = snap)]
        snapshot: SnapshotId,
        /// Also publish the clusters changed since this older snapshot of the
        /// same volume as the NBD metadata context
        /// `qemu:dirty-bitmap:changed-since-BASE` (for incremental backup).
        #[arg(long, value_name = "BASE", value_parser = snap)]
        changed_since: Option<SnapshotId>,
    },
    /// Stops a snapshot's export.
    Unexport {
        #[arg(value_parser = snap)]
        snapshot: SnapshotId,
    },
    /// Starts the volume's writable consumer export and prints its URI.
    Attach {
        #[arg(value_parser = vol)]
        volume: VolumeId,
    },
    /// Stops the volume's consumer export.
    Detach {
        #[arg(value_parser = vol)]
        volume: VolumeId,
    },
}
