//! The guest freeze of a DiskSnapshot of a VirtualMachine, through the real API server's
//! aggregation layer to a stand-in for KubeVirt's virt-api (`subresources.kubevirt.io`), which
//! `hack/cluster.sh` registers as an APIService: KubeVirt's node agent, which would freeze the
//! guest, cannot run here. The stand-in answers as virt-api does (409 unless the instance is
//! Running, the caller authorized by a SubjectAccessReview) and records each call with its time;
//! the tests read that record.
//!
//! * A running VM with its agent and disks on two nodes: the freeze comes before both groups'
//!   cut and the unfreeze after it, under the operator's own ServiceAccount; the status reports
//!   how long the guest was frozen and says "per-node crash-consistent inside a guest freeze".
//! * A group that fails inside the freeze: the guest is thawed, the groups deleted, the claims
//!   unlabelled; a freeze the guest agent refuses (Auto, one node) leaves a crash-consistent
//!   snapshot that says so.
//! * The operator killed while the guest is frozen: the next operator thaws it, discards the
//!   attempt and takes the snapshot again.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use k8s_openapi::api::events::v1::Event;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use livedisk_api::DiskSnapshot;
use livedisk_api::snapshot::{DiskSnapshotStatus, GuestFreezeState};
use livedisk_e2e::disks::{claim_bound_on, must};
use livedisk_e2e::operator::Operator;
use livedisk_e2e::vm::{
    disk_snapshot, group_snapshot_contents, group_snapshots, instance, instances, member_content,
    virtual_machine, wait_for_phase,
};
use livedisk_e2e::vm_standin::{Call, calls_for};
use livedisk_e2e::{TestNamespace, client, eventually};
use serde_json::json;

const NODE: &str = "node-a";
const OTHER: &str = "node-b";
const OPERATOR_USER: &str = "system:serviceaccount:livedisk-system:livedisk-operator";

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn ops(calls: &[Call]) -> Vec<&str> {
    calls.iter().map(|c| c.op.as_str()).collect()
}

async fn ready_message(snapshot: &DiskSnapshot) -> Result<String> {
    Ok(snapshot
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
        .context("Ready condition")?
        .message
        .clone())
}

async fn no_labelled_claims(client: &Client, ns: &str) -> Result<()> {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
    for claim in claims.list(&ListParams::default()).await?.items {
        ensure!(
            !claim
                .labels()
                .keys()
                .any(|k| k.starts_with("livedisk.io/dsnap-")),
            "claim {} still labelled",
            claim.name_any()
        );
    }
    Ok(())
}

/// The cut of each member snapshot of a Ready DiskSnapshot, by volume: the creation time the
/// CSI sidecar recorded on its VolumeSnapshotContent (nanoseconds since the epoch; the driver
/// returns the cut to the microsecond). A group's own creation time has whole seconds only.
async fn member_cuts(
    client: &Client,
    ns: &str,
    status: &DiskSnapshotStatus,
) -> Result<Vec<(String, i64)>> {
    let mut cuts = Vec::new();
    for volume in status.volumes.iter().filter(|v| v.skipped.is_none()) {
        let member = volume
            .volume_snapshot_name
            .clone()
            .context("no member snapshot")?;
        let cut = member_content(client, ns, &member).await?.data["status"]["creationTime"]
            .as_i64()
            .context("member content without creationTime")?;
        cuts.push((volume.name.clone(), cut));
    }
    Ok(cuts)
}

#[tokio::test]
async fn a_running_vm_on_two_nodes_is_cut_inside_one_guest_freeze() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let client = client().await?;
    let operator = Operator::start()?;
    let namespace = TestNamespace::create(&client, "vm-freeze").await?;
    let ns = namespace.name.clone();
    let result = async {
        claim_bound_on(&client, &ns, "a", NODE).await?;
        claim_bound_on(&client, &ns, "b", OTHER).await?;
        must(&client, &ns, virtual_machine("db", &["a", "b"], false)).await?;
        instance(&client, &ns, "db", &["a", "b"], "Running", true).await?;
        must(&client, &ns, disk_snapshot("frozen", "db", "Auto", None)).await?;
        let snapshots: Api<DiskSnapshot> = Api::namespaced(client.clone(), &ns);
        let snapshot = wait_for_phase(&snapshots, "frozen", "Ready", 240).await?;
        let status = snapshot.status.clone().context("status")?;
        eprintln!("status: {}", serde_json::to_string_pretty(&status)?);

        // The stand-in saw one freeze and one unfreeze, from the operator's ServiceAccount.
        let calls = calls_for(&ns, "db")?;
        ensure!(ops(&calls) == vec!["freeze", "unfreeze"], "calls {calls:?}");
        ensure!(
            calls
                .iter()
                .all(|c| c.user.as_deref() == Some(OPERATOR_USER)),
            "calls {calls:?}"
        );
        ensure!(calls.iter().all(|c| c.code == Some(200)), "calls {calls:?}");
        ensure!(
            calls[0].unfreeze_timeout.as_deref() == Some("60s"),
            "{calls:?}"
        );

        // Both nodes' cuts fall between them.
        ensure!(status.volume_group_snapshot_names.len() == 2);
        let frozen = calls[0].nanos()?;
        let thawed = calls[1].nanos()?;
        let cuts = member_cuts(&client, &ns, &status).await?;
        ensure!(cuts.len() == 2, "{cuts:?}");
        for (volume, cut) in &cuts {
            eprintln!(
                "{volume}: cut {} ms after the freeze, {} ms before the unfreeze",
                (cut - frozen) / 1_000_000,
                (thawed - cut) / 1_000_000
            );
            ensure!(
                frozen < *cut && *cut < thawed,
                "{volume}: cut outside the freeze"
            );
        }

        // The status says how long, and what the instants mean.
        let freeze = status.guest_freeze.clone().context("no guestFreeze")?;
        ensure!(freeze.state == GuestFreezeState::Thawed, "{freeze:?}");
        let reported = freeze
            .frozen_milliseconds
            .context("no frozenMilliseconds")?;
        let seen = (thawed - frozen) / 1_000_000;
        eprintln!("guest frozen {reported} ms (the stand-in saw {seen} ms between the calls)");
        ensure!(
            reported >= seen && reported < 30_000,
            "reported {reported} ms, seen {seen} ms"
        );
        let indications: Vec<&str> = status
            .indications
            .iter()
            .map(|i| i.indication.as_str())
            .collect();
        ensure!(
            indications == vec!["Online", "GuestAgent"],
            "{indications:?}"
        );
        let message = ready_message(&snapshot).await?;
        ensure!(
            message.contains("per-node crash-consistent inside a guest freeze"),
            "{message}"
        );
        // The stand-in's view of the guest, as virt-handler would report it: thawed.
        let vmi = instances(&client, &ns).get("db").await?;
        ensure!(
            vmi.data["status"]["fsFreezeStatus"].as_str().unwrap_or("") != "frozen",
            "the instance still reports frozen"
        );
        let events: Api<Event> = Api::namespaced(client.clone(), &ns);
        let thaw_event = events
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("GuestThawed"))
            .context("no GuestThawed Event")?;
        eprintln!("Event: {:?}", thaw_event.note);
        no_labelled_claims(&client, &ns).await
    }
    .await;
    if result.is_err() {
        eprintln!("operator log:\n{}", operator.log());
    }
    namespace.delete().await?;
    result
}

#[tokio::test]
async fn a_group_that_fails_inside_the_freeze_is_thawed_and_a_refused_freeze_is_said() -> Result<()>
{
    let _serial = SERIAL.lock().await;
    let client = client().await?;
    let operator = Operator::start()?;
    let namespace = TestNamespace::create(&client, "vm-freeze-fail").await?;
    let ns = namespace.name.clone();
    let class = format!("broken-{ns}");
    let classes: Api<DynamicObject> = Api::all_with(
        client.clone(),
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(
                "groupsnapshot.storage.k8s.io",
                "v1",
                "VolumeGroupSnapshotClass",
            ),
            "volumegroupsnapshotclasses",
        ),
    );
    let result = async {
        // A class whose parameter the driver refuses: the group fails inside the freeze.
        must(
            &client,
            "",
            json!({"apiVersion": "groupsnapshot.storage.k8s.io/v1",
                   "kind": "VolumeGroupSnapshotClass", "metadata": {"name": class},
                   "driver": "csi.livedisk.io", "deletionPolicy": "Delete",
                   "parameters": {"mergeBandwidthLimit": "fast"}}),
        )
        .await?;
        claim_bound_on(&client, &ns, "a", NODE).await?;
        must(&client, &ns, virtual_machine("db", &["a"], false)).await?;
        instance(&client, &ns, "db", &["a"], "Running", true).await?;
        must(
            &client,
            &ns,
            disk_snapshot("broken", "db", "Auto", Some(&class)),
        )
        .await?;
        let snapshots: Api<DiskSnapshot> = Api::namespaced(client.clone(), &ns);
        let snapshot = wait_for_phase(&snapshots, "broken", "Failed", 180).await?;
        let status = snapshot.status.clone().context("status")?;
        let message = ready_message(&snapshot).await?;
        eprintln!("Failed: {message}");
        ensure!(message.contains("mergeBandwidthLimit"), "{message}");
        let calls = calls_for(&ns, "db")?;
        ensure!(ops(&calls) == vec!["freeze", "unfreeze"], "calls {calls:?}");
        ensure!(
            status
                .guest_freeze
                .as_ref()
                .is_some_and(|f| f.state == GuestFreezeState::Thawed),
            "{:?}",
            status.guest_freeze
        );
        // The operator deletes the failed attempt's groups; when that deletion races the
        // snapshot-controller's own status update of the group, the controller finishes it only
        // at its next retry (seen: 111 s later), so what is asserted is the deletion asked for.
        eventually(60, "the failed attempt's groups deleted", || async {
            let undeleted = group_snapshots(&client, &ns)
                .list(&ListParams::default())
                .await?
                .items
                .iter()
                .filter(|g| g.metadata.deletion_timestamp.is_none())
                .count();
            Ok((undeleted == 0).then_some(()))
        })
        .await?;
        no_labelled_claims(&client, &ns).await?;

        // The guest agent refuses the freeze: Auto on one node goes on crash-consistent, and
        // says so in KubeVirt's words.
        instances(&client, &ns)
            .patch(
                "db",
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"annotations": {
                    "livedisk.io/standin-freeze-error": "fsfreeze: device or resource busy"}}})),
            )
            .await?;
        must(&client, &ns, disk_snapshot("unfrozen", "db", "Auto", None)).await?;
        let snapshot = wait_for_phase(&snapshots, "unfrozen", "Ready", 180).await?;
        let status = snapshot.status.clone().context("status")?;
        let freeze = status.guest_freeze.clone().context("no guestFreeze")?;
        ensure!(freeze.state == GuestFreezeState::Failed, "{freeze:?}");
        let no_agent = status
            .indications
            .iter()
            .find(|i| i.indication == "NoGuestAgent")
            .context("no NoGuestAgent indication")?;
        ensure!(
            no_agent.message.contains("device or resource busy"),
            "{no_agent:?}"
        );
        let message = ready_message(&snapshot).await?;
        ensure!(message.contains("not frozen"), "{message}");
        // A refused freeze is followed by an unfreeze all the same (one may have half-happened).
        let calls = calls_for(&ns, "db")?;
        ensure!(
            ops(&calls) == vec!["freeze", "unfreeze", "freeze", "unfreeze"],
            "calls {calls:?}"
        );
        ensure!(calls[2].code == Some(500), "calls {calls:?}");
        Ok(())
    }
    .await;
    if result.is_err() {
        eprintln!("operator log:\n{}", operator.log());
    }
    namespace.delete().await?;
    // The class goes once no group content of it is left: csi-snapshotter reads it to delete one.
    let contents = group_snapshot_contents(&client);
    // (up to the snapshot-controller's retry after a conflict: see above)
    let drained = eventually(300, "the broken class's group contents gone", || async {
        let left = contents
            .list(&ListParams::default())
            .await?
            .items
            .iter()
            .filter(|c| c.data["spec"]["volumeGroupSnapshotClassName"] == json!(class))
            .count();
        Ok((left == 0).then_some(()))
    })
    .await;
    let _ = classes.delete(&class, &Default::default()).await;
    result.and(drained)
}

#[tokio::test]
async fn an_operator_killed_while_the_guest_is_frozen_is_followed_by_a_thaw_and_a_new_attempt()
-> Result<()> {
    let _serial = SERIAL.lock().await;
    let client = client().await?;
    let mut operator = Operator::start()?;
    let namespace = TestNamespace::create(&client, "vm-freeze-kill").await?;
    let ns = namespace.name.clone();
    let result = async {
        claim_bound_on(&client, &ns, "a", NODE).await?;
        claim_bound_on(&client, &ns, "b", NODE).await?;
        must(&client, &ns, virtual_machine("db", &["a", "b"], false)).await?;
        instance(&client, &ns, "db", &["a", "b"], "Running", true).await?;
        // The stand-in holds its freeze answer: the guest is frozen, the operator still waits.
        instances(&client, &ns)
            .patch(
                "db",
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"annotations": {
                    "livedisk.io/standin-freeze-delay": "20"}}})),
            )
            .await?;
        must(&client, &ns, disk_snapshot("killed", "db", "Auto", None)).await?;
        eventually(120, "the freeze received", || async {
            Ok((!calls_for(&ns, "db")?.is_empty()).then_some(()))
        })
        .await?;
        let snapshots: Api<DiskSnapshot> = Api::namespaced(client.clone(), &ns);
        let before = snapshots.get("killed").await?.status.unwrap_or_default();
        ensure!(
            before
                .guest_freeze
                .as_ref()
                .is_some_and(|f| f.state == GuestFreezeState::Freezing),
            "{:?}",
            before.guest_freeze
        );
        operator.signal(libc::SIGKILL)?;
        let _ = operator.child.wait();
        eprintln!("operator killed while the guest was frozen");
        instances(&client, &ns)
            .patch(
                "db",
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"annotations": {
                    "livedisk.io/standin-freeze-delay": null}}})),
            )
            .await?;
        operator = Operator::start()?;
        let snapshot = wait_for_phase(&snapshots, "killed", "Ready", 240).await?;
        let status = snapshot.status.clone().context("status")?;
        ensure!(status.attempt == Some(1), "attempt {:?}", status.attempt);
        let calls = calls_for(&ns, "db")?;
        ensure!(
            ops(&calls) == vec!["freeze", "unfreeze", "freeze", "unfreeze"],
            "calls {calls:?}"
        );
        let events: Api<Event> = Api::namespaced(client.clone(), &ns);
        ensure!(
            events
                .list(&ListParams::default())
                .await?
                .items
                .iter()
                .any(|e| e.reason.as_deref() == Some("FreezeInterrupted")),
            "no FreezeInterrupted Event"
        );
        // The snapshot is of the second attempt only, and inside its freeze.
        ensure!(
            status.volume_group_snapshot_names == vec!["killed-1-0".to_string()],
            "{:?}",
            status.volume_group_snapshot_names
        );
        for (volume, cut) in member_cuts(&client, &ns, &status).await? {
            ensure!(
                calls[2].nanos()? < cut && cut < calls[3].nanos()?,
                "{volume}: cut outside the second freeze"
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        no_labelled_claims(&client, &ns).await
    }
    .await;
    if result.is_err() {
        eprintln!("operator log:\n{}", operator.log());
    }
    namespace.delete().await?;
    result
}
