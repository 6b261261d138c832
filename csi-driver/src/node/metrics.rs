//! The node plugin's own metrics, beside the gRPC call metrics every CSI server has:
//!
//! * counted by the agent as it works: storage operations in flight and finished, by kind (and
//!   code);
//! * read at scrape time, on the endpoint's blocking thread and never on the I/O path: the bytes
//!   the engine's jobs moved (its own totals, from QEMU's job progress), the pool's space
//!   (statvfs) and the volumes and snapshots its records hold.

use std::future::Future;
use std::sync::{Arc, OnceLock};

use livedisk_engine::{Engine, EngineError, VolumeInfo};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::{Registry, Unit};

use super::mounts::{self, StatVfs};

/// The storage operations the node agent performs with its engine. Exhaustive: a new one needs
/// its label here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OperationKind {
    CreateVolume,
    /// A new volume with a snapshot's content.
    RestoreVolume,
    /// A new volume with another volume's content.
    CloneVolume,
    ExpandVolume,
    DeleteVolume,
    CreateSnapshot,
    /// Deleting a snapshot merges its layer away.
    DeleteSnapshot,
    /// An in-place revert of a volume to one of its snapshots (a DiskRestore).
    RevertVolume,
}

impl OperationKind {
    pub fn label(self) -> &'static str {
        match self {
            OperationKind::CreateVolume => "create_volume",
            OperationKind::RestoreVolume => "restore_volume",
            OperationKind::CloneVolume => "clone_volume",
            OperationKind::ExpandVolume => "expand_volume",
            OperationKind::DeleteVolume => "delete_volume",
            OperationKind::CreateSnapshot => "create_snapshot",
            OperationKind::DeleteSnapshot => "delete_snapshot",
            OperationKind::RevertVolume => "revert_volume",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabels {
    kind: &'static str,
    /// `OK`, or the error's code in livedisk's vocabulary (`NotFound`, `Unavailable`, ...).
    code: &'static str,
}

/// Pure: the code label of an operation's outcome.
pub fn outcome_code<T>(result: &Result<T, EngineError>) -> &'static str {
    match result {
        Ok(_) => "OK",
        Err(error) => error.code().reason(),
    }
}

/// The agent's operation metrics.
pub struct NodeMetrics {
    in_flight: Family<KindLabels, Gauge>,
    operations: Family<OperationLabels, Counter>,
}

impl NodeMetrics {
    /// Registers the node's metrics, and the scrape-time collector over the engine put in
    /// `engine` once it is open (until then it reports nothing: the endpoint already answers
    /// probes while the engine recovers its pool).
    pub fn register(registry: &mut Registry, engine: EngineSlot) -> Arc<Self> {
        let metrics = Self {
            in_flight: Family::default(),
            operations: Family::default(),
        };
        registry.register(
            "livedisk_node_operations_in_flight",
            "Storage operations the node agent is performing now, by kind",
            metrics.in_flight.clone(),
        );
        registry.register(
            "livedisk_node_operations",
            "Storage operations the node agent finished, by kind and code",
            metrics.operations.clone(),
        );
        registry.register_collector(Box::new(EngineCollector { engine }));
        Arc::new(metrics)
    }

    /// Runs one engine operation, counted in flight while it runs and by its outcome after.
    pub async fn track<T>(
        &self,
        kind: OperationKind,
        operation: impl Future<Output = Result<T, EngineError>>,
    ) -> Result<T, EngineError> {
        let _running = Running::start(
            self.in_flight
                .get_or_create_owned(&KindLabels { kind: kind.label() }),
        );
        let result = operation.await;
        self.operations
            .get_or_create(&OperationLabels {
                kind: kind.label(),
                code: outcome_code(&result),
            })
            .inc();
        result
    }
}

/// One operation in its kind's in-flight gauge, until dropped: however the operation ends, a
/// dropped (cancelled) future included.
struct Running(Gauge);

impl Running {
    fn start(gauge: Gauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Pure: what the pool's statvfs says, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolSpace {
    pub size: u64,
    pub used: u64,
    /// Available to new volumes (what the agent checks before it creates one).
    pub free: u64,
}

pub fn pool_space(stat: &StatVfs) -> PoolSpace {
    PoolSpace {
        size: stat.f_blocks.saturating_mul(stat.f_frsize),
        used: stat
            .f_blocks
            .saturating_sub(stat.f_bfree)
            .saturating_mul(stat.f_frsize),
        free: stat.f_bavail.saturating_mul(stat.f_frsize),
    }
}

/// Pure: the volumes (not deleted) and the snapshots (of every volume, deleted ones included,
/// since snapshots outlive their volume) the records hold.
pub fn inventory(volumes: &[VolumeInfo]) -> (u64, u64) {
    let live = volumes.iter().filter(|v| !v.deleted).count() as u64;
    let snapshots = volumes.iter().map(|v| v.snapshots as u64).sum();
    (live, snapshots)
}

/// The node plugin's engine, once it is open.
pub type EngineSlot = Arc<OnceLock<Arc<Engine>>>;

/// Reads the engine's totals, its pool and its records at each scrape.
struct EngineCollector {
    engine: EngineSlot,
}

impl std::fmt::Debug for EngineCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EngineCollector")
    }
}

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    value: u64,
) -> Result<(), std::fmt::Error> {
    let metric = ConstCounter::new(value);
    metric.encode(encoder.encode_descriptor(name, help, unit, metric.metric_type())?)
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    value: u64,
) -> Result<(), std::fmt::Error> {
    let metric = ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX));
    metric.encode(encoder.encode_descriptor(name, help, unit, metric.metric_type())?)
}

impl Collector for EngineCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(engine) = self.engine.get() else {
            return Ok(());
        };
        let stats = engine.job_stats();
        counter(
            &mut encoder,
            "livedisk_node_merged",
            "Progress of the merge jobs that deleted snapshots, summed when each concluded.",
            Some(&Unit::Bytes),
            stats.merged_bytes(),
        )?;
        counter(
            &mut encoder,
            "livedisk_node_merge_restarts",
            "Merge jobs stopped for a snapshot of their volume and started again after it.",
            None,
            stats.merge_restarts(),
        )?;
        counter(
            &mut encoder,
            "livedisk_node_merge_copied_again",
            "What merge jobs stopped for a snapshot had copied, and copied again when started again.",
            Some(&Unit::Bytes),
            stats.merge_copied_again_bytes(),
        )?;
        counter(
            &mut encoder,
            "livedisk_node_copied",
            "Progress of the flatten jobs of restored and cloned volumes, summed when each concluded.",
            Some(&Unit::Bytes),
            stats.copied_bytes(),
        )?;
        match mounts::statvfs(engine.pool()) {
            Ok(stat) => {
                let space = pool_space(&stat);
                let bytes = Some(&Unit::Bytes);
                gauge(
                    &mut encoder,
                    "livedisk_node_pool_size",
                    "Size of the pool's filesystem.",
                    bytes,
                    space.size,
                )?;
                gauge(
                    &mut encoder,
                    "livedisk_node_pool_used",
                    "Bytes used on the pool's filesystem.",
                    bytes,
                    space.used,
                )?;
                gauge(
                    &mut encoder,
                    "livedisk_node_pool_free",
                    "Bytes free on the pool's filesystem (statvfs f_bavail); new volumes and snapshots are checked against this less what existing volumes were promised and have not written.",
                    bytes,
                    space.free,
                )?;
            }
            Err(error) => tracing::debug!(%error, "metrics: the pool's statvfs failed"),
        }
        match engine.list_volumes() {
            Ok(volumes) => {
                let (live, snapshots) = inventory(&volumes);
                gauge(
                    &mut encoder,
                    "livedisk_node_volumes",
                    "Volumes on this node (not deleted).",
                    None,
                    live,
                )?;
                gauge(
                    &mut encoder,
                    "livedisk_node_snapshots",
                    "Snapshots on this node, of live and deleted volumes.",
                    None,
                    snapshots,
                )?;
            }
            Err(error) => tracing::debug!(%error, "metrics: listing the volumes failed"),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use livedisk_engine::VolumeId;

    #[test]
    fn every_kind_has_its_own_label() {
        let kinds = [
            OperationKind::CreateVolume,
            OperationKind::RestoreVolume,
            OperationKind::CloneVolume,
            OperationKind::ExpandVolume,
            OperationKind::DeleteVolume,
            OperationKind::CreateSnapshot,
            OperationKind::DeleteSnapshot,
            OperationKind::RevertVolume,
        ];
        let labels: std::collections::HashSet<_> = kinds.iter().map(|k| k.label()).collect();
        assert_eq!(labels.len(), kinds.len());
    }

    #[test]
    fn outcomes_are_ok_or_the_error_code() {
        assert_eq!(outcome_code::<()>(&Ok(())), "OK");
        let busy = EngineError::NotFound("snapshot".into());
        assert_eq!(outcome_code::<()>(&Err(busy)), "NotFound");
    }

    #[test]
    fn pool_space_in_bytes() {
        let stat = StatVfs {
            f_frsize: 4096,
            f_blocks: 100,
            f_bfree: 40,
            f_bavail: 30,
            f_files: 0,
            f_ffree: 0,
            f_favail: 0,
        };
        assert_eq!(
            pool_space(&stat),
            PoolSpace {
                size: 409_600,
                used: 245_760,
                free: 122_880
            }
        );
    }

    #[test]
    fn deleted_volumes_count_only_by_their_snapshots() {
        let volume = |deleted, snapshots| VolumeInfo {
            id: VolumeId::generate(),
            size: 1,
            deleted,
            layers: snapshots + 1,
            snapshots,
        };
        assert_eq!(
            inventory(&[volume(false, 2), volume(true, 1), volume(false, 0)]),
            (2, 3)
        );
        assert_eq!(inventory(&[]), (0, 0));
    }
}
