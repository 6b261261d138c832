//! Dereference stage of a DiskEvacuation: the livedisk nodes and their pool space, the volumes
//! the node holds (its LivediskVolumes, selected on the server by `spec.nodeName`), the
//! evacuation's DiskMigrations (by the label with its UID), and, only for volumes it has not
//! listed yet, the PersistentVolumes that name them and the claims bound to those. Reads go
//! straight to the API server: an evacuation is reconciled when one of its migrations changes,
//! and each pass must see what the previous one created.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::PersistentVolume;
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};
use livedisk_api::internal::{LivediskNode, LivediskVolume};
use livedisk_api::{ClaimReference, DiskMigration, EvacuationVolume};

use super::plan::{Binding, Child, Lookup, NodeSpace, NodeVolume};
use super::{LABEL_UID, LABEL_VOLUME};
use crate::error::Error;
use crate::merge::lookup::observe_error;

/// Looks up what one pass of the evacuation of `node` (UID `uid`) needs. `listed`: the volumes
/// its status lists already.
pub async fn lookup(
    client: &Client,
    node: &str,
    uid: &str,
    listed: &[EvacuationVolume],
) -> Result<Lookup, Error> {
    let nodes: Api<LivediskNode> = Api::all(client.clone());
    let nodes = nodes
        .list(&ListParams::default())
        .await
        .map_err(observe_error("LivediskNodes".into()))?
        .items
        .into_iter()
        .map(|n| NodeSpace {
            name: n.name_any(),
            available_bytes: n.status.and_then(|s| s.pool_available_bytes),
        })
        .collect();
    let volumes: Api<LivediskVolume> = Api::all(client.clone());
    let volumes: Vec<NodeVolume> = volumes
        .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
        .await
        .map_err(observe_error(format!("LivediskVolumes of node {node}")))?
        .items
        .into_iter()
        // A volume being deleted is not moved.
        .filter(|v| v.metadata.deletion_timestamp.is_none())
        .map(|v| NodeVolume {
            id: v.name_any(),
            capacity_bytes: v.spec.capacity_bytes,
        })
        .collect();
    let migrations: Api<DiskMigration> = Api::all(client.clone());
    let children: Vec<Child> = migrations
        .list(&ListParams::default().labels(&format!("{LABEL_UID}={uid}")))
        .await
        .map_err(observe_error("the evacuation's DiskMigrations".into()))?
        .items
        .into_iter()
        .filter_map(|m| {
            Some(Child {
                namespace: m.namespace()?,
                name: m.name_any(),
                volume_id: m.labels().get(LABEL_VOLUME)?.clone(),
                spec: m.spec,
                status: m.status,
            })
        })
        .collect();
    // A volume skipped for want of a bound claim is looked at again: its PersistentVolume may
    // have been created and bound since (the inventory object comes first).
    let known: BTreeSet<&str> = listed
        .iter()
        .filter(|v| !super::plan::waits_for_a_claim(v))
        .map(|v| v.volume_id.as_str())
        .chain(children.iter().map(|c| c.volume_id.as_str()))
        .collect();
    let unknown: BTreeSet<String> = volumes
        .iter()
        .map(|v| v.id.clone())
        .filter(|id| !known.contains(id.as_str()))
        .collect();
    // The PersistentVolumes are listed only when the node holds a volume not seen before.
    let bindings = if unknown.is_empty() {
        BTreeMap::new()
    } else {
        let pvs: Api<PersistentVolume> = Api::all(client.clone());
        let pvs = pvs
            .list(&ListParams::default())
            .await
            .map_err(observe_error("PersistentVolumes".into()))?
            .items;
        bindings(&pvs, &unknown)
    };
    Ok(Lookup {
        nodes,
        volumes,
        bindings,
        children,
    })
}

/// Pure: the binding of each of `volumes`, from the livedisk PersistentVolumes among `pvs`.
pub fn bindings(pvs: &[PersistentVolume], volumes: &BTreeSet<String>) -> BTreeMap<String, Binding> {
    let mut found: BTreeMap<String, Binding> = BTreeMap::new();
    for pv in pvs {
        let Some(csi) = pv.spec.as_ref().and_then(|s| s.csi.as_ref()) else {
            continue;
        };
        if csi.driver != livedisk_common::DRIVER_NAME || !volumes.contains(&csi.volume_handle) {
            continue;
        }
        found.insert(csi.volume_handle.clone(), binding(pv));
    }
    for volume in volumes {
        found.entry(volume.clone()).or_insert_with(|| {
            Binding::Unbound("no PersistentVolume has it as its volume handle".into())
        });
    }
    found
}

/// Pure: what one livedisk PersistentVolume is bound to.
fn binding(pv: &PersistentVolume) -> Binding {
    let name = pv.name_any();
    if pv.metadata.deletion_timestamp.is_some() {
        return Binding::Unbound(format!("its PersistentVolume {name} is being deleted"));
    }
    let phase = pv
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Pending");
    let claim = pv.spec.as_ref().and_then(|s| s.claim_ref.as_ref());
    match (phase, claim) {
        ("Bound", Some(claim)) => match (&claim.namespace, &claim.name) {
            (Some(namespace), Some(claim)) => Binding::Claim(ClaimReference {
                namespace: namespace.clone(),
                name: claim.clone(),
            }),
            _ => Binding::Unbound(format!(
                "its PersistentVolume {name} names no claim by namespace and name"
            )),
        },
        (phase, _) => Binding::Unbound(format!(
            "its PersistentVolume {name} is {phase}, not bound to a claim"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const A: &str = "vol-00000000-0000-4000-8000-00000000000a";

    fn pv(
        name: &str,
        driver: &str,
        handle: &str,
        phase: &str,
        claim: Option<(&str, &str)>,
    ) -> PersistentVolume {
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": name},
            "spec": {
                "csi": {"driver": driver, "volumeHandle": handle},
                "claimRef": claim.map(|(ns, n)| json!({"namespace": ns, "name": n})),
            },
            "status": {"phase": phase}
        }))
        .expect("a PersistentVolume")
    }

    #[test]
    fn a_bound_livedisk_volume_names_its_claim_and_anything_else_says_why_not() {
        let b = "vol-00000000-0000-4000-8000-00000000000b";
        let c = "vol-00000000-0000-4000-8000-00000000000c";
        let d = "vol-00000000-0000-4000-8000-00000000000d";
        let pvs = [
            pv(
                "pvc-1",
                livedisk_common::DRIVER_NAME,
                A,
                "Bound",
                Some(("ns", "disk")),
            ),
            pv(
                "pvc-2",
                livedisk_common::DRIVER_NAME,
                b,
                "Released",
                Some(("ns", "gone")),
            ),
            // Another driver's volume with the same handle is not this volume.
            pv(
                "other",
                "hostpath.csi.k8s.io",
                c,
                "Bound",
                Some(("ns", "x")),
            ),
            pv(
                "pvc-9",
                livedisk_common::DRIVER_NAME,
                "vol-elsewhere",
                "Bound",
                Some(("ns", "y")),
            ),
        ];
        let wanted: BTreeSet<String> = [A, b, c, d].iter().map(|s| s.to_string()).collect();
        let found = bindings(&pvs, &wanted);
        assert_eq!(found.len(), 4);
        assert_eq!(
            found[A],
            Binding::Claim(ClaimReference {
                namespace: "ns".into(),
                name: "disk".into()
            })
        );
        assert_eq!(
            found[b],
            Binding::Unbound("its PersistentVolume pvc-2 is Released, not bound to a claim".into())
        );
        for missing in [c, d] {
            assert_eq!(
                found[missing],
                Binding::Unbound("no PersistentVolume has it as its volume handle".into())
            );
        }
    }
}
