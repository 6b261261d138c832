//! Pure: validates a DiskEvacuation, decides which volumes it moves, where to and when, and
//! what its DiskMigrations must change to follow it.
//!
//! The volumes are what the node holds (its LivediskVolumes), each looked up through the
//! PersistentVolume whose volume handle it is to the claim bound to it. The status is the
//! evacuation's record: a volume once listed stays listed (after its move the node no longer
//! holds it), and one found later on the node is added while the evacuation runs. Each volume
//! with a claim gets one DiskMigration in the claim's namespace, at most
//! `maxConcurrentMigrations` at a time, named after the evacuation and, by a hash, its UID and
//! the volume.

use std::collections::BTreeMap;

use livedisk_api::{
    ClaimReference, DiskEvacuationSpec, DiskMigrationSpec, DiskMigrationStatus, EvacuationVolume,
    EvacuationVolumePhase, Phase, Progress,
};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use crate::decide;

/// A livedisk node and the pool space its node plugin reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeSpace {
    pub name: String,
    /// `status.poolAvailableBytes`; `None` before the node plugin reported it.
    pub available_bytes: Option<i64>,
}

/// A volume the node holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeVolume {
    pub id: String,
    pub capacity_bytes: i64,
}

/// What a volume is bound to, from its PersistentVolume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Binding {
    Claim(ClaimReference),
    /// Why no claim can be moved with it.
    Unbound(String),
}

/// A DiskMigration of this evacuation (labelled with its UID).
#[derive(Clone, Debug, PartialEq)]
pub struct Child {
    pub namespace: String,
    pub name: String,
    /// Its volume, from its label.
    pub volume_id: String,
    pub spec: DiskMigrationSpec,
    pub status: Option<DiskMigrationStatus>,
}

/// Everything looked up for one pass.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Lookup {
    /// Every livedisk node (its LivediskNode).
    pub nodes: Vec<NodeSpace>,
    /// The volumes the node holds now.
    pub volumes: Vec<NodeVolume>,
    /// The bindings of the volumes the evacuation has not listed yet.
    pub bindings: BTreeMap<String, Binding>,
    /// Its DiskMigrations.
    pub children: Vec<Child>,
}

/// The evacuation as the plan needs it.
#[derive(Clone, Copy, Debug)]
pub struct Evacuation<'a> {
    pub name: &'a str,
    pub uid: &'a str,
    pub spec: &'a DiskEvacuationSpec,
}

/// Why a DiskEvacuation cannot start. Each variant is a condition reason; none of them changed
/// anything, and none goes away without a new DiskEvacuation (the node and the target are
/// immutable), so each fails it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "node {0:?} does not run the livedisk node plugin (it has no LivediskNode); nothing was moved"
    )]
    NodeNotFound(String),
    #[error(
        "target node {0:?} does not run the livedisk node plugin (it has no LivediskNode); nothing was moved"
    )]
    TargetNotFound(String),
    #[error("the target node is the node to empty ({0}); nothing was moved")]
    SameNode(String),
    #[error(
        "no livedisk node other than {0} reports pool space to take its volumes; nothing was moved"
    )]
    NoTarget(String),
    #[error(
        "bandwidthLimit {0:?} is not a quantity livedisk understands (a number with one of the suffixes Ki, Mi, Gi, Ti, k, M, G, T); nothing was moved"
    )]
    InvalidBandwidth(String),
}

impl decide::Refusal for Refusal {
    fn reason(&self) -> &'static str {
        match self {
            Refusal::NodeNotFound(_) => "NodeNotFound",
            Refusal::TargetNotFound(_) => "TargetNotFound",
            Refusal::SameNode(_) => "SameNode",
            Refusal::NoTarget(_) => "NoTargetNode",
            Refusal::InvalidBandwidth(_) => "InvalidBandwidth",
        }
    }

    fn may_resolve(&self) -> bool {
        match self {
            Refusal::NodeNotFound(_)
            | Refusal::TargetNotFound(_)
            | Refusal::SameNode(_)
            | Refusal::NoTarget(_)
            | Refusal::InvalidBandwidth(_) => false,
        }
    }
}

/// A DiskMigration to create.
#[derive(Clone, Debug, PartialEq)]
pub struct NewMigration {
    pub volume_id: String,
    pub namespace: String,
    pub name: String,
    pub spec: DiskMigrationSpec,
}

/// A merge patch of an existing DiskMigration.
#[derive(Clone, Debug, PartialEq)]
pub struct ChildPatch {
    pub namespace: String,
    pub name: String,
    pub patch: Value,
}

/// What one pass does and reports.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    /// Every volume, in a stable order (by claim, then ID; the skipped ones last).
    pub volumes: Vec<EvacuationVolume>,
    pub creates: Vec<NewMigration>,
    pub patches: Vec<ChildPatch>,
    /// The sum over the migrations that reported progress.
    pub progress: Option<Progress>,
}

/// The DiskMigration of `volume` for the evacuation `name` (UID `uid`): `evac-<name>-<hash>`,
/// at most 63 characters, because its name also becomes a label value of its node work. The
/// hash covers the UID, so a new evacuation of the same name gets new migrations.
pub fn child_name(name: &str, uid: &str, volume: &str) -> String {
    const PREFIX: &str = "evac-";
    const HASH: usize = 10;
    let digest = Sha256::digest(format!("{uid}/{volume}").as_bytes());
    let hash: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    let room = 63 - PREFIX.len() - 1 - HASH;
    let base: String = name.chars().take(room).collect();
    let base = base.trim_end_matches(['-', '.']);
    format!("{PREFIX}{base}-{}", &hash[..HASH])
}

/// The bandwidth limit in bytes per second (`None`: unlimited), or the refusal of it.
fn bandwidth(spec: &DiskEvacuationSpec) -> Result<Option<i64>, Refusal> {
    match spec.bandwidth_limit.as_deref().map(str::trim) {
        None | Some("") => Ok(None),
        Some(quantity) => livedisk_common::quantity::bytes(quantity)
            .map(Some)
            .ok_or_else(|| Refusal::InvalidBandwidth(quantity.into())),
    }
}

/// Validates what has to hold before anything is created. Once migrations exist, the
/// evacuation follows them whatever it would find now.
fn validate(spec: &DiskEvacuationSpec, lookup: &Lookup) -> Result<(), Refusal> {
    bandwidth(spec)?;
    let known = |name: &str| lookup.nodes.iter().any(|n| n.name == name);
    if !known(&spec.node_name) {
        return Err(Refusal::NodeNotFound(spec.node_name.clone()));
    }
    if let Some(target) = &spec.target_node_name {
        // The API server refuses it too (CEL); an object from before that rule is refused here.
        if *target == spec.node_name {
            return Err(Refusal::SameNode(target.clone()));
        }
        if !known(target) {
            return Err(Refusal::TargetNotFound(target.clone()));
        }
    }
    Ok(())
}

/// Pure: whether a listed volume was skipped only because no bound claim named it yet (looked
/// at again on every pass: the provisioner creates and binds its PersistentVolume after the
/// inventory object).
pub fn waits_for_a_claim(volume: &EvacuationVolume) -> bool {
    volume.phase == EvacuationVolumePhase::Skipped
        && volume.persistent_volume_claim.is_none()
        && volume.migration_name.is_none()
}

/// Pure: one pass of the evacuation. `previous`: the volumes its status lists.
pub fn plan(
    evacuation: Evacuation<'_>,
    previous: &[EvacuationVolume],
    lookup: &Lookup,
) -> Result<Plan, Refusal> {
    let spec = evacuation.spec;
    let started = !previous.is_empty() || !lookup.children.is_empty();
    if !started {
        validate(spec, lookup)?;
    }
    let mut volumes: BTreeMap<String, EvacuationVolume> = previous
        .iter()
        .map(|v| (v.volume_id.clone(), v.clone()))
        .collect();
    // Migrations the status does not list yet (its write was lost): the migration says which.
    for child in &lookup.children {
        volumes
            .entry(child.volume_id.clone())
            .or_insert_with(|| EvacuationVolume {
                volume_id: child.volume_id.clone(),
                persistent_volume_claim: Some(ClaimReference {
                    namespace: child.namespace.clone(),
                    name: child.spec.persistent_volume_claim_name.clone(),
                }),
                target_node_name: Some(child.spec.target_node_name.clone()),
                migration_name: Some(child.name.clone()),
                phase: EvacuationVolumePhase::Pending,
                stage: None,
                percent: None,
                message: None,
            });
    }
    // Volumes found on the node: new ones join while the evacuation runs.
    if !spec.cancel {
        for volume in &lookup.volumes {
            if let Some(listed) = volumes.get_mut(&volume.id) {
                // Skipped for want of a bound claim: joins once its claim is bound.
                if waits_for_a_claim(listed)
                    && let Some(Binding::Claim(claim)) = lookup.bindings.get(&volume.id)
                {
                    listed.persistent_volume_claim = Some(claim.clone());
                    listed.phase = EvacuationVolumePhase::Pending;
                    listed.message = None;
                }
                continue;
            }
            let (claim, phase, message) = match lookup.bindings.get(&volume.id) {
                Some(Binding::Claim(claim)) => {
                    (Some(claim.clone()), EvacuationVolumePhase::Pending, None)
                }
                Some(Binding::Unbound(why)) => {
                    (None, EvacuationVolumePhase::Skipped, Some(why.clone()))
                }
                None => (
                    None,
                    EvacuationVolumePhase::Skipped,
                    Some("no PersistentVolume of livedisk names it".to_string()),
                ),
            };
            volumes.insert(
                volume.id.clone(),
                EvacuationVolume {
                    volume_id: volume.id.clone(),
                    persistent_volume_claim: claim,
                    target_node_name: None,
                    migration_name: None,
                    phase,
                    stage: None,
                    percent: None,
                    message,
                },
            );
        }
    }
    let waiting = |v: &EvacuationVolume| {
        v.phase == EvacuationVolumePhase::Pending
            && v.migration_name.is_none()
            && v.persistent_volume_claim.is_some()
    };
    let candidates = targets(spec, &lookup.nodes);
    if !started
        && spec.target_node_name.is_none()
        && candidates.is_empty()
        && volumes.values().any(waiting)
    {
        return Err(Refusal::NoTarget(spec.node_name.clone()));
    }

    // Follow the migrations.
    let children: BTreeMap<&str, &Child> = lookup
        .children
        .iter()
        .map(|c| (c.volume_id.as_str(), c))
        .collect();
    let on_node: std::collections::BTreeSet<&str> =
        lookup.volumes.iter().map(|v| v.id.as_str()).collect();
    let mut patches = Vec::new();
    let mut sums: Option<(i64, i64, i64)> = None;
    for volume in volumes.values_mut() {
        match children.get(volume.volume_id.as_str()) {
            Some(child) if left_unstarted(child, on_node.contains(child.volume_id.as_str())) => {
                follow_child(volume, child);
                volume.phase = EvacuationVolumePhase::Skipped;
                volume.message = Some(format!(
                    "the volume left node {} before its migration started (deleted, or moved by another migration); its DiskMigration said: {}",
                    spec.node_name,
                    volume.message.as_deref().unwrap_or("nothing")
                ));
                // Should what it waits for come back, it moves nothing.
                if !child.spec.cancel && !ended(child) {
                    patches.push(ChildPatch {
                        namespace: child.namespace.clone(),
                        name: child.name.clone(),
                        patch: json!({ "spec": { "cancel": true } }),
                    });
                }
            }
            Some(child) => {
                follow_child(volume, child);
                if let Some(patch) = follow(spec, child) {
                    patches.push(patch);
                }
                if let Some(progress) = child.status.as_ref().and_then(|s| s.progress.as_ref()) {
                    let (done, total, rate) = sums.get_or_insert((0, 0, 0));
                    *done += progress.bytes_done;
                    *total += progress.bytes_total;
                    if volume.phase == EvacuationVolumePhase::Running {
                        *rate += progress.bytes_per_second.unwrap_or(0);
                    }
                }
            }
            None if volume.migration_name.is_some() && !volume.phase.is_terminal() => {
                let claim = claim_text(volume);
                volume.phase = EvacuationVolumePhase::Failed;
                volume.stage = None;
                volume.message = Some(format!(
                    "its DiskMigration {} was deleted before it ended",
                    match (&volume.persistent_volume_claim, &volume.migration_name) {
                        (Some(c), Some(m)) => format!("{}/{m}", c.namespace),
                        _ => claim,
                    }
                ));
            }
            None if spec.cancel && waiting(volume) => {
                volume.phase = EvacuationVolumePhase::Cancelled;
                volume.message = Some("not started: the evacuation was cancelled".into());
            }
            None => {}
        }
    }

    // Start what the limit allows.
    let mut creates = Vec::new();
    if !spec.cancel {
        let capacity: BTreeMap<&str, i64> = lookup
            .volumes
            .iter()
            .map(|v| (v.id.as_str(), v.capacity_bytes))
            .collect();
        let active = volumes
            .values()
            .filter(|v| v.migration_name.is_some() && !v.phase.is_terminal())
            .count();
        let mut slots = usize::try_from(spec.max_concurrent_migrations.max(1))
            .unwrap_or(1)
            .saturating_sub(active);
        let mut planned: BTreeMap<String, i64> = BTreeMap::new();
        let mut order: Vec<&mut EvacuationVolume> =
            volumes.values_mut().filter(|v| waiting(v)).collect();
        order.sort_by(|a, b| {
            (&a.persistent_volume_claim, &a.volume_id)
                .cmp(&(&b.persistent_volume_claim, &b.volume_id))
        });
        for volume in order {
            if slots == 0 {
                break;
            }
            let size = capacity
                .get(volume.volume_id.as_str())
                .copied()
                .unwrap_or(0);
            let target = match &spec.target_node_name {
                Some(target) => target.clone(),
                None => match pick(&candidates, &planned) {
                    Some(target) => target,
                    None => {
                        volume.phase = EvacuationVolumePhase::Failed;
                        volume.message = Some(format!(
                            "no livedisk node other than {} reports pool space to take it",
                            spec.node_name
                        ));
                        continue;
                    }
                },
            };
            *planned.entry(target.clone()).or_default() += size;
            let Some(claim) = volume.persistent_volume_claim.clone() else {
                continue;
            };
            let name = child_name(evacuation.name, evacuation.uid, &volume.volume_id);
            volume.migration_name = Some(name.clone());
            volume.target_node_name = Some(target.clone());
            volume.message = Some(format!(
                "DiskMigration {}/{name} created to move it to node {target}",
                claim.namespace
            ));
            creates.push(NewMigration {
                volume_id: volume.volume_id.clone(),
                namespace: claim.namespace,
                name,
                spec: DiskMigrationSpec {
                    persistent_volume_claim_name: claim.name,
                    target_node_name: target,
                    bandwidth_limit: spec.bandwidth_limit.clone(),
                    verify: spec.verify,
                    cancel: false,
                    hold_cutover: false,
                },
            });
            slots -= 1;
        }
    }

    let mut volumes: Vec<EvacuationVolume> = volumes.into_values().collect();
    volumes.sort_by(|a, b| {
        (
            a.persistent_volume_claim.is_none(),
            &a.persistent_volume_claim,
            &a.volume_id,
        )
            .cmp(&(
                b.persistent_volume_claim.is_none(),
                &b.persistent_volume_claim,
                &b.volume_id,
            ))
    });
    Ok(Plan {
        volumes,
        creates,
        patches,
        progress: sums.map(|(done, total, rate)| Progress::new(done, total, Some(rate))),
    })
}

/// The nodes a volume may go to when no target is named: every livedisk node but the source
/// that reported its pool space, with that space.
fn targets(spec: &DiskEvacuationSpec, nodes: &[NodeSpace]) -> Vec<(String, i64)> {
    nodes
        .iter()
        .filter(|n| n.name != spec.node_name)
        .filter_map(|n| Some((n.name.clone(), n.available_bytes?)))
        .collect()
}

/// The node with the most space left once the volumes planned in this pass are counted (ties:
/// the first name).
fn pick(candidates: &[(String, i64)], planned: &BTreeMap<String, i64>) -> Option<String> {
    candidates
        .iter()
        .map(|(name, space)| {
            let left = space.saturating_sub(planned.get(name).copied().unwrap_or(0));
            (name, left)
        })
        .max_by(|(a, left_a), (b, left_b)| left_a.cmp(left_b).then_with(|| b.cmp(a)))
        .map(|(name, _)| name.clone())
}

/// A volume's state from its DiskMigration.
fn follow_child(volume: &mut EvacuationVolume, child: &Child) {
    volume.migration_name = Some(child.name.clone());
    volume.target_node_name = Some(child.spec.target_node_name.clone());
    volume.persistent_volume_claim = Some(ClaimReference {
        namespace: child.namespace.clone(),
        name: child.spec.persistent_volume_claim_name.clone(),
    });
    let status = child.status.clone().unwrap_or_default();
    volume.phase = match status.phase {
        Phase::Pending => EvacuationVolumePhase::Pending,
        Phase::Running | Phase::Ready | Phase::Deleting => EvacuationVolumePhase::Running,
        Phase::Completed => EvacuationVolumePhase::Completed,
        Phase::Failed => EvacuationVolumePhase::Failed,
        Phase::Cancelled => EvacuationVolumePhase::Cancelled,
    };
    volume.stage = status
        .stage
        .filter(|_| volume.phase == EvacuationVolumePhase::Running);
    volume.percent = status.progress.as_ref().map(|p| p.percent);
    if let Some(ready) =
        livedisk_api::conditions::find(&status.conditions, livedisk_api::conditions::READY)
    {
        volume.message = Some(ready.message.clone());
    }
}

/// Whether a DiskMigration has ended.
fn ended(child: &Child) -> bool {
    child
        .status
        .as_ref()
        .is_some_and(|s| matches!(s.phase, Phase::Completed | Phase::Failed | Phase::Cancelled))
}

/// Whether a DiskMigration never started (no node work declared: no `sourceNodeName`; waiting
/// on a refusal, or cancelled before) while its volume is no longer on the node: deleted with
/// its claim, or moved by another migration it waited for. Waiting on would never end.
fn left_unstarted(child: &Child, on_node: bool) -> bool {
    let status = child.status.clone().unwrap_or_default();
    !on_node
        && status.source_node_name.is_none()
        && matches!(status.phase, Phase::Pending | Phase::Cancelled)
}

/// The patch that makes a DiskMigration that has not ended follow the evacuation's rate limit
/// and cancel (its other fields are immutable, and a cancel is never taken back).
fn follow(spec: &DiskEvacuationSpec, child: &Child) -> Option<ChildPatch> {
    if ended(child) {
        return None;
    }
    let mut changes = Map::new();
    if child.spec.bandwidth_limit != spec.bandwidth_limit {
        changes.insert("bandwidthLimit".into(), json!(spec.bandwidth_limit));
    }
    if spec.cancel && !child.spec.cancel {
        changes.insert("cancel".into(), Value::Bool(true));
    }
    (!changes.is_empty()).then(|| ChildPatch {
        namespace: child.namespace.clone(),
        name: child.name.clone(),
        patch: json!({ "spec": changes }),
    })
}

/// `namespace/claim (volume)`, or the volume alone.
pub fn claim_text(volume: &EvacuationVolume) -> String {
    match &volume.persistent_volume_claim {
        Some(c) => format!("{}/{} ({})", c.namespace, c.name, volume.volume_id),
        None => volume.volume_id.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::Refusal as _;
    use livedisk_api::conditions::{ConditionUpdate, READY, Status, set_condition};

    const A: &str = "vol-00000000-0000-4000-8000-00000000000a";
    const B: &str = "vol-00000000-0000-4000-8000-00000000000b";
    const C: &str = "vol-00000000-0000-4000-8000-00000000000c";

    fn spec() -> DiskEvacuationSpec {
        DiskEvacuationSpec {
            node_name: "node-a".into(),
            target_node_name: None,
            bandwidth_limit: None,
            max_concurrent_migrations: 2,
            verify: true,
            cancel: false,
        }
    }

    fn evacuation(spec: &DiskEvacuationSpec) -> Evacuation<'_> {
        Evacuation {
            name: "drain",
            uid: "u1",
            spec,
        }
    }

    fn claim(namespace: &str, name: &str) -> ClaimReference {
        ClaimReference {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    fn node(name: &str, available: Option<i64>) -> NodeSpace {
        NodeSpace {
            name: name.into(),
            available_bytes: available,
        }
    }

    /// node-a holds A and B (claims ns/a and ns/b) and C (no claim); node-b and node-c can take
    /// them.
    fn lookup() -> Lookup {
        Lookup {
            nodes: vec![
                node("node-a", Some(100)),
                node("node-b", Some(1000)),
                node("node-c", Some(900)),
            ],
            volumes: [A, B, C]
                .iter()
                .map(|id| NodeVolume {
                    id: id.to_string(),
                    capacity_bytes: 200,
                })
                .collect(),
            bindings: BTreeMap::from([
                (A.to_string(), Binding::Claim(claim("ns", "a"))),
                (B.to_string(), Binding::Claim(claim("ns", "b"))),
                (
                    C.to_string(),
                    Binding::Unbound("no claim is bound to its PersistentVolume".into()),
                ),
            ]),
            children: vec![],
        }
    }

    fn child(created: &NewMigration, phase: Option<Phase>) -> Child {
        Child {
            namespace: created.namespace.clone(),
            name: created.name.clone(),
            volume_id: created.volume_id.clone(),
            spec: created.spec.clone(),
            status: phase.map(|phase| DiskMigrationStatus {
                phase,
                ..Default::default()
            }),
        }
    }

    #[test]
    fn child_names_are_short_valid_and_differ_per_volume_and_evacuation() {
        let a = child_name("drain", "u1", A);
        assert!(a.starts_with("evac-drain-"), "{a}");
        assert_eq!(a.len(), "evac-drain-".len() + 10);
        assert_eq!(a, child_name("drain", "u1", A), "deterministic");
        assert_ne!(a, child_name("drain", "u1", B));
        assert_ne!(
            a,
            child_name("drain", "u2", A),
            "a new evacuation of the same name"
        );
        // A long name is cut to 63 characters without ending a DNS label on '-' or '.'.
        let long = format!("{}.-{}", "x".repeat(46), "y".repeat(200));
        let name = child_name(&long, "u1", A);
        assert!(name.len() <= 63, "{} characters", name.len());
        let pattern = |s: &str| {
            s.split('.').all(|label| {
                !label.is_empty()
                    && label
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            })
        };
        assert!(pattern(&name), "{name}");
        assert!(pattern(&child_name("a", "u", A)));
    }

    #[test]
    fn bad_input_fails_before_anything_is_created() {
        let refuse =
            |s: &DiskEvacuationSpec, l: &Lookup| plan(evacuation(s), &[], l).expect_err("refused");
        let unknown = DiskEvacuationSpec {
            node_name: "node-x".into(),
            ..spec()
        };
        let r = refuse(&unknown, &lookup());
        assert_eq!(r.reason(), "NodeNotFound");
        assert!(!r.may_resolve());
        assert!(
            r.to_string().contains("\"node-x\"") && r.to_string().contains("nothing was moved")
        );

        let same = DiskEvacuationSpec {
            target_node_name: Some("node-a".into()),
            ..spec()
        };
        assert_eq!(refuse(&same, &lookup()).reason(), "SameNode");
        let missing = DiskEvacuationSpec {
            target_node_name: Some("node-z".into()),
            ..spec()
        };
        assert_eq!(refuse(&missing, &lookup()).reason(), "TargetNotFound");
        let odd = DiskEvacuationSpec {
            bandwidth_limit: Some("1e3".into()),
            ..spec()
        };
        assert_eq!(refuse(&odd, &lookup()).reason(), "InvalidBandwidth");

        // No other node reports its space: nowhere to go.
        let mut alone = lookup();
        alone.nodes = vec![node("node-a", Some(1)), node("node-b", None)];
        assert_eq!(refuse(&spec(), &alone).reason(), "NoTargetNode");
        // ...which does not matter for a node with nothing to move.
        alone.volumes.clear();
        let empty = plan(evacuation(&spec()), &[], &alone).expect("nothing to move");
        assert!(empty.volumes.is_empty() && empty.creates.is_empty());
    }

    #[test]
    fn a_volume_skipped_for_want_of_a_claim_joins_once_its_claim_is_bound() {
        let first = plan(evacuation(&spec()), &[], &lookup()).expect("plan");
        let c = first
            .volumes
            .iter()
            .find(|v| v.volume_id == C)
            .expect("C listed");
        assert!(waits_for_a_claim(c), "{c:?}");
        // The provisioner bound its claim since: the next pass plans its migration.
        let mut bound = lookup();
        bound
            .bindings
            .insert(C.to_string(), Binding::Claim(claim("ns", "c")));
        let next = plan(evacuation(&spec()), &first.volumes, &bound).expect("plan");
        let c = next
            .volumes
            .iter()
            .find(|v| v.volume_id == C)
            .expect("C listed");
        assert!(!waits_for_a_claim(c), "{c:?}");
        assert_eq!(c.persistent_volume_claim, Some(claim("ns", "c")));
        // Still unbound: still skipped, and looked at again.
        let again = plan(evacuation(&spec()), &first.volumes, &lookup()).expect("plan");
        let c = again
            .volumes
            .iter()
            .find(|v| v.volume_id == C)
            .expect("C listed");
        assert!(waits_for_a_claim(c));
    }

    #[test]
    fn each_claimed_volume_gets_a_migration_to_the_roomiest_node_and_the_rest_is_skipped() {
        let first = plan(evacuation(&spec()), &[], &lookup()).expect("plan");
        assert_eq!(first.creates.len(), 2);
        let a = &first.creates[0];
        assert_eq!(a.volume_id, A);
        assert_eq!(a.namespace, "ns");
        assert_eq!(a.name, child_name("drain", "u1", A));
        assert_eq!(
            a.spec,
            DiskMigrationSpec {
                persistent_volume_claim_name: "a".into(),
                target_node_name: "node-b".into(),
                bandwidth_limit: None,
                verify: true,
                cancel: false,
                hold_cutover: false,
            }
        );
        // node-b has 1000, then 800 once A is planned there: B goes to node-c (900).
        assert_eq!(first.creates[1].spec.target_node_name, "node-c");
        assert_eq!(first.volumes.len(), 3);
        let skipped = &first.volumes[2];
        assert_eq!(skipped.volume_id, C, "skipped volumes come last");
        assert_eq!(skipped.phase, EvacuationVolumePhase::Skipped);
        assert!(
            skipped
                .message
                .as_deref()
                .unwrap_or("")
                .contains("no claim")
        );
        assert_eq!(
            first.volumes[0].migration_name.as_deref(),
            Some(a.name.as_str())
        );
        assert_eq!(first.volumes[0].target_node_name.as_deref(), Some("node-b"));
        assert!(first.patches.is_empty());
        assert_eq!(first.progress, None);

        // A named target takes every volume.
        let named = DiskEvacuationSpec {
            target_node_name: Some("node-c".into()),
            bandwidth_limit: Some("10Mi".into()),
            verify: false,
            ..spec()
        };
        let to_c = plan(evacuation(&named), &[], &lookup()).expect("plan");
        assert!(
            to_c.creates
                .iter()
                .all(|c| c.spec.target_node_name == "node-c"
                    && c.spec.bandwidth_limit.as_deref() == Some("10Mi")
                    && !c.spec.verify)
        );
    }

    #[test]
    fn at_most_the_limit_runs_and_the_next_starts_when_one_ends() {
        let one = DiskEvacuationSpec {
            max_concurrent_migrations: 1,
            ..spec()
        };
        let first = plan(evacuation(&one), &[], &lookup()).expect("plan");
        assert_eq!(first.creates.len(), 1);
        assert_eq!(first.creates[0].volume_id, A);
        let b = first
            .volumes
            .iter()
            .find(|v| v.volume_id == B)
            .expect("B listed");
        assert_eq!(
            (b.phase, b.migration_name.as_ref()),
            (EvacuationVolumePhase::Pending, None)
        );

        // A runs: nothing new starts; its progress is reported.
        let mut running = lookup();
        let mut a = child(&first.creates[0], Some(Phase::Running));
        if let Some(status) = a.status.as_mut() {
            status.progress = Some(Progress::new(50, 200, Some(10)));
            status.stage = Some(livedisk_api::MigrationStage::Copying);
        }
        running.children = vec![a.clone()];
        let second = plan(evacuation(&one), &first.volumes, &running).expect("plan");
        assert!(second.creates.is_empty());
        let a_entry = &second.volumes[0];
        assert_eq!(a_entry.phase, EvacuationVolumePhase::Running);
        assert_eq!(a_entry.percent, Some(25));
        assert_eq!(a_entry.stage, Some(livedisk_api::MigrationStage::Copying));
        assert_eq!(second.progress, Some(Progress::new(50, 200, Some(10))));

        // A completed (and left the node): B starts.
        let mut moved = running.clone();
        moved.volumes.retain(|v| v.id != A);
        moved.children = vec![child(&first.creates[0], Some(Phase::Completed))];
        let third = plan(evacuation(&one), &second.volumes, &moved).expect("plan");
        assert_eq!(third.creates.len(), 1);
        assert_eq!(third.creates[0].volume_id, B);
        assert_eq!(third.volumes[0].phase, EvacuationVolumePhase::Completed);
        assert_eq!(third.volumes.len(), 3, "a moved volume stays listed");
    }

    #[test]
    fn a_lost_status_write_creates_nothing_twice() {
        let first = plan(evacuation(&spec()), &[], &lookup()).expect("plan");
        let mut again = lookup();
        again.children = first.creates.iter().map(|c| child(c, None)).collect();
        let second = plan(evacuation(&spec()), &[], &again).expect("plan");
        assert!(second.creates.is_empty());
        assert_eq!(second.volumes.len(), 3);
        assert!(
            second.volumes[..2]
                .iter()
                .all(|v| v.migration_name.is_some() && v.phase == EvacuationVolumePhase::Pending)
        );
    }

    #[test]
    fn a_volume_found_later_joins_and_one_whose_migration_vanished_fails() {
        let first = plan(evacuation(&spec()), &[], &lookup()).expect("plan");
        let mut later = lookup();
        let d = "vol-00000000-0000-4000-8000-00000000000d";
        later.volumes.push(NodeVolume {
            id: d.into(),
            capacity_bytes: 1,
        });
        later.bindings = BTreeMap::from([(d.to_string(), Binding::Claim(claim("other", "d")))]);
        // A's migration runs, B's was deleted by someone.
        later.children = vec![child(&first.creates[0], Some(Phase::Running))];
        let second = plan(evacuation(&spec()), &first.volumes, &later).expect("plan");
        let by_id = |id: &str| {
            second
                .volumes
                .iter()
                .find(|v| v.volume_id == id)
                .cloned()
                .expect("listed")
        };
        let b = by_id(B);
        assert_eq!(b.phase, EvacuationVolumePhase::Failed);
        assert!(
            b.message
                .unwrap_or_default()
                .contains("was deleted before it ended")
        );
        // One slot is free (A runs, B ended): D starts.
        assert_eq!(second.creates.len(), 1);
        assert_eq!(second.creates[0].volume_id, d);
        assert_eq!(second.creates[0].namespace, "other");
    }

    #[test]
    fn the_migrations_follow_the_rate_limit_and_a_cancel() {
        let first = plan(evacuation(&spec()), &[], &lookup()).expect("plan");
        let mut running = lookup();
        running.children = vec![
            child(&first.creates[0], Some(Phase::Running)),
            child(&first.creates[1], Some(Phase::Completed)),
        ];
        let limited = DiskEvacuationSpec {
            bandwidth_limit: Some("1Mi".into()),
            ..spec()
        };
        let second = plan(evacuation(&limited), &first.volumes, &running).expect("plan");
        assert_eq!(
            second.patches,
            vec![ChildPatch {
                namespace: "ns".into(),
                name: first.creates[0].name.clone(),
                patch: json!({"spec": {"bandwidthLimit": "1Mi"}}),
            }],
            "an ended migration is left alone"
        );

        let cancelled = DiskEvacuationSpec {
            cancel: true,
            ..spec()
        };
        let mut extra = running.clone();
        let d = "vol-00000000-0000-4000-8000-00000000000d";
        extra.volumes.push(NodeVolume {
            id: d.into(),
            capacity_bytes: 1,
        });
        let third = plan(evacuation(&cancelled), &first.volumes, &extra).expect("plan");
        assert_eq!(third.patches[0].patch, json!({"spec": {"cancel": true}}));
        assert!(third.creates.is_empty());
        assert!(
            third.volumes.iter().all(|v| v.volume_id != d),
            "nothing joins a cancelled evacuation"
        );
    }

    #[test]
    fn a_cancel_before_a_volume_started_leaves_it_cancelled() {
        let one = DiskEvacuationSpec {
            max_concurrent_migrations: 1,
            ..spec()
        };
        let first = plan(evacuation(&one), &[], &lookup()).expect("plan");
        let mut running = lookup();
        running.children = vec![child(&first.creates[0], Some(Phase::Running))];
        let cancelled = DiskEvacuationSpec {
            cancel: true,
            ..one
        };
        let second = plan(evacuation(&cancelled), &first.volumes, &running).expect("plan");
        let b = second.volumes.iter().find(|v| v.volume_id == B).expect("B");
        assert_eq!(b.phase, EvacuationVolumePhase::Cancelled);
        assert!(b.migration_name.is_none());
    }

    #[test]
    fn a_volume_that_left_the_node_before_its_migration_started_is_skipped() {
        let first = plan(evacuation(&spec()), &[], &lookup()).expect("plan");
        let mut gone = lookup();
        // A's claim was deleted with its volume; its migration waits for the claim.
        gone.volumes.retain(|v| v.id != A);
        let mut waiting = child(&first.creates[0], Some(Phase::Pending));
        if let Some(status) = waiting.status.as_mut() {
            set_condition(
                &mut status.conditions,
                ConditionUpdate::new(READY, Status::False, "ClaimNotFound", "no claim \"a\""),
                Some(1),
                k8s_openapi::jiff::Timestamp::from_second(1).expect("time"),
            );
        }
        gone.children = vec![
            waiting.clone(),
            child(&first.creates[1], Some(Phase::Running)),
        ];
        let second = plan(evacuation(&spec()), &first.volumes, &gone).expect("plan");
        let a = &second.volumes[0];
        assert_eq!(a.phase, EvacuationVolumePhase::Skipped);
        let message = a.message.clone().unwrap_or_default();
        assert!(
            message.contains("left node node-a") && message.contains("no claim"),
            "{message}"
        );
        assert_eq!(
            second.patches,
            vec![ChildPatch {
                namespace: "ns".into(),
                name: first.creates[0].name.clone(),
                patch: json!({"spec": {"cancel": true}}),
            }]
        );
        // Still on the node, or started (its node work names the source): followed as usual.
        let mut started = waiting.clone();
        if let Some(status) = started.status.as_mut() {
            status.source_node_name = Some("node-a".into());
        }
        gone.children[0] = started;
        let third = plan(evacuation(&spec()), &first.volumes, &gone).expect("plan");
        assert_eq!(third.volumes[0].phase, EvacuationVolumePhase::Pending);
        assert!(third.patches.is_empty());
    }

    #[test]
    fn a_volume_reports_what_its_migration_says() {
        let first = plan(evacuation(&spec()), &[], &lookup()).expect("plan");
        let mut failed = child(&first.creates[0], Some(Phase::Failed));
        if let Some(status) = failed.status.as_mut() {
            set_condition(
                &mut status.conditions,
                ConditionUpdate::new(READY, Status::False, "Unavailable", "the target is gone"),
                Some(1),
                k8s_openapi::jiff::Timestamp::from_second(1).expect("time"),
            );
        }
        let mut l = lookup();
        l.children = vec![failed];
        let second = plan(evacuation(&spec()), &first.volumes, &l).expect("plan");
        let a = &second.volumes[0];
        assert_eq!(a.phase, EvacuationVolumePhase::Failed);
        assert_eq!(a.message.as_deref(), Some("the target is gone"));
        assert_eq!(claim_text(a), format!("ns/a ({A})"));
    }
}
