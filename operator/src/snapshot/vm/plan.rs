//! Decision stage of a DiskSnapshot of a VirtualMachine (pure): which of the VM's volumes are
//! taken and by which node's group, whether the guest is frozen around the cut, and what the
//! status says about it.

use std::collections::BTreeMap;

use livedisk_api::snapshot::{FreezePolicy, SnapshotIndication, VirtualMachineVolumeSnapshot};

use crate::decide::Refusal;

/// A volume of the VM's `spec.template.spec.volumes`, by what backs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmVolume {
    pub name: String,
    pub source: VolumeSource,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VolumeSource {
    /// `persistentVolumeClaim.claimName`, or a DataVolume (whose claim has its name).
    Claim { claim: String },
    /// Anything else (containerDisk, cloudInitNoCloud, ...): the kind of source.
    Other(String),
}

/// What the cluster says about one claim of the VM.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClaimFacts {
    pub exists: bool,
    /// The CSI volume handle of its bound PersistentVolume.
    pub volume_handle: Option<String>,
    /// The CSI driver of its bound PersistentVolume (none while unbound).
    pub driver: Option<String>,
    /// For a livedisk volume: the node that holds it (its LivediskVolume).
    pub node: Option<String>,
}

/// What the cluster says about the VM's instance (`None`: no VirtualMachineInstance, the VM is
/// stopped).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InstanceFacts {
    pub running: bool,
    pub paused: bool,
    pub agent_connected: bool,
}

/// The volumes taken, grouped by the node that holds them, and the status lines of all volumes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Members {
    pub volumes: Vec<VirtualMachineVolumeSnapshot>,
    /// Node name → claims, both sorted: group `n` is the `n`th node.
    pub groups: BTreeMap<String, Vec<String>>,
    /// Claim → CSI volume handle, for the claims taken.
    pub handles: BTreeMap<String, String>,
    /// Some claim-backed volume was left out (another driver's claim).
    pub partial: bool,
}

/// Why a DiskSnapshot of a VM cannot be taken (yet).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmRefusal {
    ClaimMissing(String),
    ClaimUnbound(String),
    VolumeNodeUnknown(String),
    NoLivediskVolume { vm: String },
    FreezeRequired(String),
    SeveralNodesWithoutFreeze { nodes: Vec<String>, why: String },
    GroupSnapshotsNotServed,
}

impl std::fmt::Display for VmRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmRefusal::ClaimMissing(c) => {
                write!(
                    f,
                    "waiting for PersistentVolumeClaim {c} of the VirtualMachine to exist"
                )
            }
            VmRefusal::ClaimUnbound(c) => {
                write!(f, "waiting for PersistentVolumeClaim {c} to be bound")
            }
            VmRefusal::VolumeNodeUnknown(c) => write!(
                f,
                "waiting for the node that holds the volume of PersistentVolumeClaim {c} to be known"
            ),
            VmRefusal::NoLivediskVolume { vm } => write!(
                f,
                "VirtualMachine {vm} has no volume of the livedisk driver: nothing to snapshot"
            ),
            VmRefusal::FreezeRequired(why) => {
                write!(f, "freeze: Required, but the guest cannot be frozen: {why}")
            }
            VmRefusal::SeveralNodesWithoutFreeze { nodes, why } => write!(
                f,
                "the VM's volumes are held by {} nodes ({}): each node takes its volumes at one instant, \
                 so the instants of different nodes agree only inside a guest freeze, and {why}; \
                 move the volumes to one node (DiskMigration) or allow a freeze",
                nodes.len(),
                nodes.join(", ")
            ),
            VmRefusal::GroupSnapshotsNotServed => write!(
                f,
                "the cluster does not serve VolumeGroupSnapshots (groupsnapshot.storage.k8s.io/v1): \
                 install the group-snapshot CRDs and run snapshot-controller and csi-snapshotter \
                 with CSIVolumeGroupSnapshot=true (chart value groupSnapshot.enabled)"
            ),
        }
    }
}

impl Refusal for VmRefusal {
    fn reason(&self) -> &'static str {
        match self {
            VmRefusal::ClaimMissing(_) => "ReferenceNotFound",
            VmRefusal::ClaimUnbound(_) => "ClaimNotBound",
            VmRefusal::VolumeNodeUnknown(_) => "VolumeNotPlaced",
            VmRefusal::NoLivediskVolume { .. } => "NoLivediskVolume",
            VmRefusal::FreezeRequired(_) => "FreezeImpossible",
            VmRefusal::SeveralNodesWithoutFreeze { .. } => "VolumesOnSeveralNodes",
            VmRefusal::GroupSnapshotsNotServed => "GroupSnapshotsNotServed",
        }
    }

    fn may_resolve(&self) -> bool {
        matches!(
            self,
            VmRefusal::ClaimMissing(_)
                | VmRefusal::ClaimUnbound(_)
                | VmRefusal::VolumeNodeUnknown(_)
                | VmRefusal::GroupSnapshotsNotServed
        )
    }
}

/// Which volumes are taken, and by which node's group. Volumes not backed by a claim, and claims
/// of other drivers, are listed as skipped.
pub fn members(
    vm: &str,
    volumes: &[VmVolume],
    claims: &BTreeMap<String, ClaimFacts>,
    driver: &str,
) -> Result<Members, VmRefusal> {
    let mut lines = Vec::new();
    let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut handles = BTreeMap::new();
    let mut partial = false;
    for volume in volumes {
        let mut line = VirtualMachineVolumeSnapshot {
            name: volume.name.clone(),
            ..Default::default()
        };
        match &volume.source {
            VolumeSource::Other(kind) => {
                line.skipped = Some(format!("a {kind} volume, not a claim"));
            }
            VolumeSource::Claim { claim, .. } => {
                line.claim_name = Some(claim.clone());
                let facts = claims.get(claim).cloned().unwrap_or_default();
                if !facts.exists {
                    return Err(VmRefusal::ClaimMissing(claim.clone()));
                }
                match facts.driver.as_deref() {
                    None => return Err(VmRefusal::ClaimUnbound(claim.clone())),
                    Some(d) if d != driver => {
                        partial = true;
                        line.skipped = Some(format!("a volume of CSI driver {d}, not {driver}"));
                    }
                    Some(_) => {
                        let node = facts
                            .node
                            .clone()
                            .ok_or_else(|| VmRefusal::VolumeNodeUnknown(claim.clone()))?;
                        line.node_name = Some(node.clone());
                        if let Some(handle) = &facts.volume_handle {
                            handles.insert(claim.clone(), handle.clone());
                        }
                        let group = groups.entry(node).or_default();
                        if !group.contains(claim) {
                            group.push(claim.clone());
                            group.sort();
                        }
                    }
                }
            }
        }
        lines.push(line);
    }
    if groups.is_empty() {
        return Err(VmRefusal::NoLivediskVolume { vm: vm.into() });
    }
    Ok(Members {
        volumes: lines,
        groups,
        handles,
        partial,
    })
}

/// Whether the guest is frozen around the cut, and what KubeVirt would say about the VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FreezePlan {
    pub freeze: bool,
    pub indications: Vec<SnapshotIndication>,
}

fn indication(indication: &str, message: &str) -> SnapshotIndication {
    SnapshotIndication {
        indication: indication.into(),
        message: message.into(),
    }
}

/// Decides the freeze from the policy, the instance and the number of nodes involved.
///
/// A stopped or paused VM writes nothing, so its volumes agree across nodes without a freeze.
/// A running VM on several nodes must be frozen: without a freeze that request is refused.
pub fn freeze_plan(
    policy: FreezePolicy,
    instance: Option<&InstanceFacts>,
    nodes: &[String],
    partial: bool,
) -> Result<FreezePlan, VmRefusal> {
    let mut indications = Vec::new();
    let running = instance.filter(|i| i.running);
    let freeze = match running {
        // Stopped: its disks are not written, so there is nothing to freeze (even when the
        // policy is Required: the disks are as the guest left them at shutdown).
        None => false,
        Some(i) => {
            indications.push(indication(
                "Online",
                "the VM was running during the snapshot",
            ));
            if i.paused {
                indications.push(indication(
                    "Paused",
                    "the VM was paused: its disks were not written during the snapshot",
                ));
            }
            if i.agent_connected {
                indications.push(indication(
                    "GuestAgent",
                    "the guest agent was connected: the guest filesystems were frozen",
                ));
            } else {
                indications.push(indication(
                    "NoGuestAgent",
                    "no guest agent: the snapshot is crash-consistent",
                ));
            }
            match (policy, i.agent_connected, i.paused) {
                (FreezePolicy::Never, _, _) => false,
                (_, true, false) => true,
                (FreezePolicy::Required, false, _) => {
                    return Err(VmRefusal::FreezeRequired(
                        "no guest agent is connected to the VirtualMachineInstance".into(),
                    ));
                }
                (FreezePolicy::Required, true, true) => {
                    return Err(VmRefusal::FreezeRequired("the VM is paused".into()));
                }
                _ => false,
            }
        }
    };
    if let Some(i) = running
        && !freeze
        && !i.paused
        && nodes.len() > 1
    {
        let why = if policy == FreezePolicy::Never {
            "freeze is Never".to_string()
        } else {
            "no guest agent is connected".to_string()
        };
        return Err(VmRefusal::SeveralNodesWithoutFreeze {
            nodes: nodes.to_vec(),
            why,
        });
    }
    if freeze {
        // Said once the freeze happened; `GuestAgent` here is the plan.
        indications.retain(|i| i.indication != "NoGuestAgent");
    } else if running.is_some_and(|i| i.agent_connected) {
        // Connected but not frozen (Never, or paused): say so instead of claiming a freeze.
        for i in &mut indications {
            if i.indication == "GuestAgent" {
                i.message = "the guest agent was connected, but the guest was not frozen".into();
            }
        }
    }
    if partial {
        indications.push(indication(
            "PartialSnapshot",
            "some claims of the VM belong to another driver and were left out",
        ));
    }
    Ok(FreezePlan {
        freeze,
        indications,
    })
}

/// The indications after a freeze that failed on a single node (the snapshot goes on,
/// crash-consistent): `GuestAgent` becomes `NoGuestAgent` with the guest's answer.
pub fn freeze_failed(indications: &[SnapshotIndication], answer: &str) -> Vec<SnapshotIndication> {
    indications
        .iter()
        .map(|i| {
            if i.indication == "GuestAgent" {
                indication(
                    "NoGuestAgent",
                    &format!("the guest agent did not freeze ({answer}): the snapshot is crash-consistent"),
                )
            } else {
                i.clone()
            }
        })
        .collect()
}

/// The name of the group of the `n`th node in attempt `attempt` of the DiskSnapshot `name`:
/// short enough for any DiskSnapshot name.
pub fn group_name(name: &str, attempt: i32, n: usize) -> String {
    let suffix = format!("-{attempt}-{n}");
    let keep = 253usize.saturating_sub(suffix.len());
    let base: String = name.chars().take(keep).collect();
    format!("{}{suffix}", base.trim_end_matches(['-', '.']))
}

/// The label that selects the claims of one group: unique to the request (its UID), so that
/// concurrent snapshots of one VM never select each other's claims. The value names the group.
pub fn selector_label(uid: &str) -> String {
    format!("livedisk.io/dsnap-{uid}")
}

pub fn selector_value(attempt: i32, n: usize) -> String {
    format!("{attempt}-{n}")
}

/// How far one group is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GroupFacts {
    pub exists: bool,
    /// The cut is taken (the group or its content has a creation time).
    pub cut: bool,
    pub ready: bool,
    pub creation_time: Option<String>,
    pub error: Option<String>,
    /// The volume handles its content was made of (once the snapshot-controller made it).
    pub volume_handles: Option<Vec<String>>,
}

/// Whether a group that has its content took other volumes than its claims': the
/// snapshot-controller selected the claims from a cache that had not seen every label yet.
pub fn incomplete(expected: &[String], group: &GroupFacts) -> bool {
    match &group.volume_handles {
        None => false,
        Some(actual) => {
            let mut actual = actual.clone();
            actual.sort();
            let mut expected = expected.to_vec();
            expected.sort();
            actual != expected
        }
    }
}

/// The volume handles each group must hold, in group order.
pub fn expected_handles(members: &Members) -> Vec<Vec<String>> {
    members
        .groups
        .values()
        .map(|claims| {
            claims
                .iter()
                .filter_map(|c| members.handles.get(c).cloned())
                .collect()
        })
        .collect()
}

/// Where the groups of an attempt are, all together.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GroupsState {
    /// Some group reports an error (the first one's message).
    Failed(String),
    /// Every group is ready to use.
    Ready,
    /// Every group has its cut; some are not ready yet.
    Cut,
    /// Some group has no cut yet.
    Taking,
}

/// Pure: whether a group's error is one the snapshot-controller gets past by itself on its next
/// pass. An optimistic-concurrency conflict on one of its own updates ("the object has been
/// modified; please apply your changes to the latest version and try again") is shown in the
/// group's status until that pass, which then goes on (seen: a DiskSnapshot failed on one).
pub fn transient_group_error(message: &str) -> bool {
    message.contains("the object has been modified")
}

pub fn groups_state(groups: &[GroupFacts]) -> GroupsState {
    if let Some(error) = groups
        .iter()
        .filter_map(|g| g.error.clone())
        .find(|e| !transient_group_error(e))
    {
        return GroupsState::Failed(error);
    }
    if groups.iter().all(|g| g.ready) {
        GroupsState::Ready
    } else if groups.iter().all(|g| g.cut || g.ready) {
        GroupsState::Cut
    } else {
        GroupsState::Taking
    }
}

/// Whether a freeze that lasted `frozen_ms` outlived its unfreeze timeout: the guest may have
/// thawed by itself before the cut (KubeVirt's `QuiesceTimeout`).
pub fn quiesce_timed_out(frozen_ms: i64, unfreeze_timeout_ms: i64) -> bool {
    frozen_ms >= unfreeze_timeout_ms
}

#[cfg(test)]
mod tests {
    use super::*;

    const DRIVER: &str = "csi.livedisk.io";

    fn claim(name: &str) -> VmVolume {
        VmVolume {
            name: format!("v-{name}"),
            source: VolumeSource::Claim { claim: name.into() },
        }
    }

    fn on(node: &str) -> ClaimFacts {
        ClaimFacts {
            exists: true,
            volume_handle: Some(format!("vol-{node}")),
            driver: Some(DRIVER.into()),
            node: Some(node.into()),
        }
    }

    fn running(agent: bool) -> InstanceFacts {
        InstanceFacts {
            running: true,
            paused: false,
            agent_connected: agent,
        }
    }

    fn names(plan: &FreezePlan) -> Vec<&str> {
        plan.indications
            .iter()
            .map(|i| i.indication.as_str())
            .collect()
    }

    #[test]
    fn volumes_are_grouped_by_node_and_others_are_skipped() {
        let volumes = vec![
            claim("b"),
            claim("a"),
            claim("c"),
            VmVolume {
                name: "cloudinit".into(),
                source: VolumeSource::Other("cloudInitNoCloud".into()),
            },
            claim("nfs"),
        ];
        let mut claims = BTreeMap::new();
        claims.insert("a".to_string(), on("node-a"));
        claims.insert("b".to_string(), on("node-a"));
        claims.insert("c".to_string(), on("node-b"));
        claims.insert(
            "nfs".to_string(),
            ClaimFacts {
                exists: true,
                driver: Some("nfs.csi.k8s.io".into()),
                ..Default::default()
            },
        );
        let members = members("vm", &volumes, &claims, DRIVER).expect("members");
        assert_eq!(members.groups["node-a"], vec!["a", "b"]);
        assert_eq!(members.groups["node-b"], vec!["c"]);
        assert!(members.partial);
        assert_eq!(members.volumes.len(), 5);
        assert!(
            members.volumes[3]
                .skipped
                .as_deref()
                .unwrap_or("")
                .contains("cloudInit")
        );
        assert!(
            members.volumes[4]
                .skipped
                .as_deref()
                .unwrap_or("")
                .contains("nfs.csi.k8s.io")
        );
    }

    #[test]
    fn missing_unbound_and_foreign_only_volumes_are_refused() {
        let volumes = vec![claim("a")];
        let none = BTreeMap::new();
        assert_eq!(
            members("vm", &volumes, &none, DRIVER),
            Err(VmRefusal::ClaimMissing("a".into()))
        );
        let mut unbound = BTreeMap::new();
        unbound.insert(
            "a".to_string(),
            ClaimFacts {
                exists: true,
                ..Default::default()
            },
        );
        let refused = members("vm", &volumes, &unbound, DRIVER).expect_err("unbound");
        assert!(refused.may_resolve());
        let mut foreign = BTreeMap::new();
        foreign.insert(
            "a".to_string(),
            ClaimFacts {
                exists: true,
                driver: Some("other".into()),
                ..Default::default()
            },
        );
        let refused = members("vm", &volumes, &foreign, DRIVER).expect_err("foreign only");
        assert_eq!(refused.reason(), "NoLivediskVolume");
        assert!(!refused.may_resolve());
    }

    #[test]
    fn a_running_vm_with_an_agent_is_frozen_unless_never() {
        let one = vec!["node-a".to_string()];
        let plan =
            freeze_plan(FreezePolicy::Auto, Some(&running(true)), &one, false).expect("auto");
        assert!(plan.freeze);
        assert_eq!(names(&plan), vec!["Online", "GuestAgent"]);
        let plan =
            freeze_plan(FreezePolicy::Never, Some(&running(true)), &one, false).expect("never");
        assert!(!plan.freeze);
        assert!(plan.indications[1].message.contains("not frozen"));
    }

    #[test]
    fn without_an_agent_auto_is_crash_consistent_and_required_is_refused() {
        let one = vec!["node-a".to_string()];
        let plan =
            freeze_plan(FreezePolicy::Auto, Some(&running(false)), &one, true).expect("auto");
        assert!(!plan.freeze);
        assert_eq!(
            names(&plan),
            vec!["Online", "NoGuestAgent", "PartialSnapshot"]
        );
        let refused = freeze_plan(FreezePolicy::Required, Some(&running(false)), &one, false)
            .expect_err("required");
        assert_eq!(refused.reason(), "FreezeImpossible");
        assert!(!refused.may_resolve());
        let stopped = freeze_plan(FreezePolicy::Required, None, &one, false).expect("stopped");
        assert!(!stopped.freeze);
    }

    #[test]
    fn several_nodes_need_a_freeze_unless_nothing_writes() {
        let two = vec!["node-a".to_string(), "node-b".to_string()];
        let refused = freeze_plan(FreezePolicy::Auto, Some(&running(false)), &two, false)
            .expect_err("no agent");
        assert_eq!(refused.reason(), "VolumesOnSeveralNodes");
        assert!(refused.to_string().contains("node-a, node-b"));
        let refused =
            freeze_plan(FreezePolicy::Never, Some(&running(true)), &two, false).expect_err("never");
        assert!(refused.to_string().contains("freeze is Never"));
        assert!(
            freeze_plan(FreezePolicy::Auto, Some(&running(true)), &two, false)
                .expect("frozen")
                .freeze
        );
        let stopped = freeze_plan(FreezePolicy::Never, None, &two, false).expect("stopped");
        assert!(!stopped.freeze && stopped.indications.is_empty());
        let paused = InstanceFacts {
            paused: true,
            ..running(true)
        };
        let plan = freeze_plan(FreezePolicy::Auto, Some(&paused), &two, false).expect("paused");
        assert!(!plan.freeze);
        assert!(names(&plan).contains(&"Paused"));
    }

    #[test]
    fn a_failed_freeze_turns_guest_agent_into_no_guest_agent() {
        let plan = freeze_plan(
            FreezePolicy::Auto,
            Some(&running(true)),
            &["n".to_string()],
            false,
        )
        .expect("plan");
        let after = freeze_failed(&plan.indications, "500: agent error");
        assert_eq!(after[1].indication, "NoGuestAgent");
        assert!(after[1].message.contains("agent error"));
    }

    #[test]
    fn group_names_and_labels_stay_within_limits() {
        let long = "a".repeat(253);
        assert!(group_name(&long, 12, 3).len() <= 253);
        assert_eq!(group_name("snap", 0, 1), "snap-0-1");
        let label = selector_label("0d3c8c9e-1d1e-4a7f-9a57-0e4f8e0b1c2d");
        let name_part = label.split('/').nth(1).unwrap_or_default();
        assert!(name_part.len() <= 63);
    }

    #[test]
    fn groups_are_ready_only_when_all_are() {
        let cut = GroupFacts {
            exists: true,
            cut: true,
            ..Default::default()
        };
        let ready = GroupFacts {
            ready: true,
            ..cut.clone()
        };
        let taking = GroupFacts {
            exists: true,
            ..Default::default()
        };
        assert_eq!(
            groups_state(&[ready.clone(), ready.clone()]),
            GroupsState::Ready
        );
        assert_eq!(
            groups_state(&[ready.clone(), cut.clone()]),
            GroupsState::Cut
        );
        assert_eq!(groups_state(&[cut, taking.clone()]), GroupsState::Taking);
        let failed = GroupFacts {
            error: Some("boom".into()),
            ..taking
        };
        assert_eq!(
            groups_state(&[ready.clone(), failed]),
            GroupsState::Failed("boom".into())
        );
        // A conflict on the controller's own update is waited out: the group is still taking.
        let conflicted = GroupFacts {
            error: Some(
                "snapshot controller failed to update groupsnapcontent-1 on API server: \
                 Operation cannot be fulfilled on volumegroupsnapshotcontents: the object has \
                 been modified; please apply your changes to the latest version and try again"
                    .into(),
            ),
            ..GroupFacts::default()
        };
        assert_eq!(groups_state(&[ready, conflicted]), GroupsState::Taking);
        assert!(quiesce_timed_out(60_000, 60_000));
        let taken = GroupFacts {
            volume_handles: Some(vec!["v2".into(), "v1".into()]),
            ..Default::default()
        };
        assert!(!incomplete(&["v1".into(), "v2".into()], &taken));
        assert!(incomplete(&["v1".into(), "v2".into(), "v3".into()], &taken));
        assert!(!incomplete(&["v1".into()], &GroupFacts::default()));
        assert!(!quiesce_timed_out(150, 60_000));
    }
}
