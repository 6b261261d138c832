//! Dereference stage of a DiskMigration: the claim's volume and the node that holds it (shared
//! with DiskMerge and DiskRestore), whether the target runs the livedisk node plugin (its
//! LivediskNode) and the other migrations of the volume that have not ended. Reads go straight
//! to the API server: a DiskMigration is looked up a handful of times before its node work
//! exists, and never after.

use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};
use livedisk_api::DiskMigrationSpec;
use livedisk_api::internal::{LivediskMigration, LivediskNode};

use super::plan::{self, Lookup};
use super::{LABEL_NAME, LABEL_NAMESPACE};
use crate::error::Error;
use crate::merge::lookup::{claim, node_of, observe_error};

/// Looks up what a DiskMigration names. `own_work`: the name its node work would have, which
/// is no other migration.
pub async fn lookup(
    client: &Client,
    namespace: &str,
    spec: &DiskMigrationSpec,
    own_work: &str,
) -> Result<Lookup, Error> {
    let claim = claim(client, namespace, &spec.persistent_volume_claim_name).await?;
    // Only a livedisk volume is looked up further: the plan refuses anything else first.
    let volume = plan::volume_of(&spec.persistent_volume_claim_name, &claim).ok();
    let (source, busy) = match &volume {
        Some(volume) => (
            node_of(client, &claim).await?,
            others(client, volume, own_work).await?,
        ),
        None => (None, Vec::new()),
    };
    let nodes: Api<LivediskNode> = Api::all(client.clone());
    let target = &spec.target_node_name;
    let target_known = nodes
        .get_opt(target)
        .await
        .map_err(observe_error(format!("LivediskNode {target}")))?
        .is_some();
    Ok(Lookup {
        claim,
        source,
        target_known,
        busy,
    })
}

/// The migrations of `volume` other than `own_work` that have not ended (selected on the
/// server by the node work's selectable `spec.volumeId`).
async fn others(client: &Client, volume: &str, own_work: &str) -> Result<Vec<String>, Error> {
    let works: Api<LivediskMigration> = Api::all(client.clone());
    let listed = works
        .list(&ListParams::default().fields(&format!("spec.volumeId={volume}")))
        .await
        .map_err(observe_error(format!(
            "LivediskMigrations of volume {volume}"
        )))?;
    Ok(unfinished(&listed.items, own_work))
}

/// Pure: the node work among `works` other than `own_work` that has not ended, each named by
/// its DiskMigration where its labels say which.
fn unfinished(works: &[LivediskMigration], own_work: &str) -> Vec<String> {
    works
        .iter()
        .filter(|w| w.name_any() != own_work)
        .filter(|w| !w.status.as_ref().is_some_and(|s| s.phase.is_terminal()))
        .map(|w| {
            let labels = w.labels();
            match (labels.get(LABEL_NAMESPACE), labels.get(LABEL_NAME)) {
                (Some(namespace), Some(name)) => format!("DiskMigration {namespace}/{name}"),
                _ => format!("LivediskMigration {}", w.name_any()),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use livedisk_api::internal::{LivediskMigrationSpec, LivediskMigrationStatus, MigrationPhase};
    use std::collections::BTreeMap;

    fn work(
        name: &str,
        owner: Option<(&str, &str)>,
        phase: Option<MigrationPhase>,
    ) -> LivediskMigration {
        let mut work = LivediskMigration::new(
            name,
            LivediskMigrationSpec {
                node_name: "node-a".into(),
                target_node_name: "node-b".into(),
                volume_id: "vol-00000000-0000-4000-8000-000000000001".into(),
                bandwidth_bytes_per_second: None,
                verify: true,
                cancel: false,
                hold_cutover: false,
            },
        );
        work.metadata.labels = owner.map(|(namespace, name)| {
            BTreeMap::from([
                (LABEL_NAMESPACE.to_string(), namespace.to_string()),
                (LABEL_NAME.to_string(), name.to_string()),
            ])
        });
        work.status = phase.map(|phase| LivediskMigrationStatus {
            phase,
            ..Default::default()
        });
        work
    }

    #[test]
    fn only_other_migrations_that_have_not_ended_hold_the_volume() {
        let works = [
            work("migrate-own", Some(("ns", "me")), None),
            work(
                "migrate-1",
                Some(("ns", "first")),
                Some(MigrationPhase::Running),
            ),
            work("migrate-2", None, None),
            work(
                "migrate-3",
                Some(("ns", "done")),
                Some(MigrationPhase::Completed),
            ),
            work(
                "migrate-4",
                Some(("ns", "failed")),
                Some(MigrationPhase::Failed),
            ),
            work(
                "migrate-5",
                Some(("ns", "stopped")),
                Some(MigrationPhase::Cancelled),
            ),
        ];
        assert_eq!(
            unfinished(&works, "migrate-own"),
            ["DiskMigration ns/first", "LivediskMigration migrate-2"]
        );
    }
}
