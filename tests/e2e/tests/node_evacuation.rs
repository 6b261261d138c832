//! DiskEvacuation on the two-node local cluster (processes layout: each node's engine and node
//! plugin in their own namespaces, so every move is real I/O over TLS NBD between them), driven
//! as an administrator drives it: one DiskEvacuation of a node, reconciled by the operator under
//! the chart's account.
//!
//! * Two claims' volumes on node-a, one staged with a consumer (as kubelet would) and both
//!   written with checksummed blocks: one DiskEvacuation of node-a, no target named, ends
//!   Completed; both volumes' inventory names node-b; every acknowledged write reads back on
//!   node-b; the status counts them and names their DiskMigrations, which exist in the claims'
//!   namespace, owned by the evacuation (and go with it); its Events tell the story.
//! * A cancel, one migration at a time at 1 MiB/s: the running migration (which took a new rate
//!   on the way) gets the cancel, the second never starts, the evacuation ends Cancelled, and
//!   each volume is where its status says, with its data.
//! * Bad input changes nothing: an unknown node or target is refused (Failed, Stalled with the
//!   reason, a Warning Event) with no DiskMigration created and the volume where it was; a
//!   target equal to the node and a change of the node are refused by the API server.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use livedisk_api::conditions::{READY, STALLED, find};
use livedisk_api::internal::{LivediskNode, LivediskVolume};
use livedisk_api::{
    DiskEvacuation, DiskEvacuationStatus, DiskMigration, EvacuationVolumePhase, Phase,
};
use livedisk_e2e::csi::{attach_block, detach_block};
use livedisk_e2e::disks::{ScratchDir, host_device, must};
use livedisk_e2e::operator::Operator;
use livedisk_e2e::phases::{verify, write_phase};
use livedisk_e2e::{TestNamespace, apply, client, error_message, eventually, kubectl};
use serde_json::json;

const SOURCE: &str = "node-a";
const TARGET: &str = "node-b";
const BLOCKS: u64 = 1024;
/// The label with the evacuation's UID on each of its DiskMigrations.
const LABEL_UID: &str = "livedisk.io/diskevacuation-uid";
const LABEL_VOLUME: &str = "livedisk.io/diskevacuation-volume";

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The operator, once both nodes are registered with their pool space and their export fronts'
/// certificates (a migration needs both; right after the driver started they may not be yet).
async fn operator_and_nodes(client: &Client) -> Result<Operator> {
    let operator = Operator::start()?;
    let nodes: Api<LivediskNode> = Api::all(client.clone());
    for name in [SOURCE, TARGET] {
        eventually(
            120,
            &format!("{name}'s pool space and front certificate"),
            || async {
                let Some(node) = nodes.get_opt(name).await? else {
                    return Ok(None);
                };
                let status = node.status.unwrap_or_default();
                let certified = status.export_front.and_then(|f| f.certificate).is_some();
                Ok((certified && status.pool_available_bytes.is_some()).then_some(()))
            },
        )
        .await?;
    }
    Ok(operator)
}

/// A block PVC bound on the source node (its consumer pod pinned there; no kubelet runs it in
/// this layout, the test stages the volume itself as kubelet would).
async fn volume_on_source(client: &Client, ns: &str, claim: &str) -> Result<String> {
    livedisk_e2e::disks::claim_bound_on(client, ns, claim, SOURCE).await
}

async fn stage_as_kubelet(node: &str, volume: &str, tag: &str) -> Result<String> {
    livedisk_e2e::csi::attach_block_as_kubelet(node, volume, tag).await
}

/// Moves what earlier tests left on node-a off it, so that this test's evacuation finds only its
/// own volumes there (and those of namespaces being deleted, which it skips): their DiskExports
/// and other livedisk objects are removed first (an exported snapshot pins its volume), then an
/// unlimited evacuation of node-a runs to its end, whatever that end, and is deleted.
async fn clear_source_node(client: &Client) -> Result<()> {
    livedisk_e2e::remove_livedisk_objects(client, None).await?;
    let name = unique("clear-a");
    evacuation(
        client,
        &name,
        json!({ "nodeName": SOURCE, "targetNodeName": TARGET }),
    )
    .await?;
    let evacuations: Api<DiskEvacuation> = Api::all(client.clone());
    let ended = eventually(300, "node-a cleared of earlier tests' volumes", || async {
        let status = evacuations.get(&name).await?.status.unwrap_or_default();
        Ok(matches!(
            status.phase,
            Phase::Completed | Phase::Failed | Phase::Cancelled
        )
        .then_some(status))
    })
    .await?;
    if let Some(counts) = &ended.counts {
        println!("cleared node-a before the test: {counts:?}");
    }
    livedisk_e2e::remove_livedisk_objects(client, None).await
}

/// A unique name for a cluster-scoped evacuation of this run.
fn unique(prefix: &str) -> String {
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}-{}", &suffix[..8])
}

async fn evacuation(client: &Client, name: &str, spec: serde_json::Value) -> Result<()> {
    must(
        client,
        "",
        json!({ "apiVersion": "livedisk.io/v1alpha1", "kind": "DiskEvacuation",
                "metadata": { "name": name }, "spec": spec }),
    )
    .await
}

/// The DiskMigrations of an evacuation, in every namespace.
async fn children(client: &Client, uid: &str) -> Result<Vec<DiskMigration>> {
    let all: Api<DiskMigration> = Api::all(client.clone());
    Ok(all
        .list(&ListParams::default().labels(&format!("{LABEL_UID}={uid}")))
        .await?
        .items)
}

/// The Events published about the evacuation `name` (cluster-scoped: in `default`).
async fn events(client: &Client, name: &str) -> Result<Vec<Event>> {
    let api: Api<Event> = Api::namespaced(client.clone(), "default");
    Ok(api
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|e| {
            e.regarding.as_ref().is_some_and(|r| {
                r.kind.as_deref() == Some("DiskEvacuation") && r.name.as_deref() == Some(name)
            })
        })
        .collect())
}

/// Waits until the evacuation `name` reports `phase`; fails at once on another ended phase.
async fn ended(
    api: &Api<DiskEvacuation>,
    name: &str,
    phase: Phase,
    seconds: u64,
) -> Result<DiskEvacuationStatus> {
    eventually(
        seconds,
        &format!("DiskEvacuation {name} {phase:?}"),
        || async {
            let status = api.get(name).await?.status.unwrap_or_default();
            let over = matches!(
                status.phase,
                Phase::Completed | Phase::Failed | Phase::Cancelled
            );
            ensure!(
                !over || status.phase == phase,
                "DiskEvacuation {name} ended {:?}, not {phase:?}: {:?}\nvolumes: {:#?}",
                status.phase,
                status.conditions,
                status.volumes
            );
            Ok((status.phase == phase).then_some(status))
        },
    )
    .await
}

#[tokio::test]
async fn one_request_moves_every_volume_of_a_node_with_its_data() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let client = client().await?;
    let operator = operator_and_nodes(&client).await?;
    clear_source_node(&client).await?;
    let namespace = TestNamespace::create(&client, "evacuate").await?;
    let ns = namespace.name.clone();
    let dir = ScratchDir::new("node-evacuation")?;
    let name = unique("drain-a");
    // Staging paths of this run (a failed run's leftovers are not in the way).
    let tag = |what: &str| format!("{name}-{what}");
    let staged: Staged<'_> = std::sync::Mutex::new(Vec::new());
    let evacuations: Api<DiskEvacuation> = Api::all(client.clone());
    let result = async {
        // Two volumes on node-a, both written through their consumer path; the first stays
        // staged (its consumer keeps it during the move), the second is not in use.
        let live = volume_on_source(&client, &ns, "disk-1").await?;
        let idle = volume_on_source(&client, &ns, "disk-2").await?;
        let live_target = attach_block(SOURCE, &live, &tag("live")).await?;
        remember(&staged, SOURCE, &live, &tag("live"));
        let live_device = host_device(SOURCE, &live_target)?;
        let live_log = dir.0.join("live.log");
        write_phase(&live_device, 1, BLOCKS, &live_log)?;
        let idle_target = attach_block(SOURCE, &idle, &tag("idle")).await?;
        remember(&staged, SOURCE, &idle, &tag("idle"));
        let idle_log = dir.0.join("idle.log");
        write_phase(&host_device(SOURCE, &idle_target)?, 2, BLOCKS, &idle_log)?;
        detach_block(SOURCE, &idle, &tag("idle")).await?;
        forget(&staged, &idle);

        // One request; the operator picks the target (node-b: the only other livedisk node).
        let started = std::time::Instant::now();
        evacuation(
            &client,
            &name,
            json!({ "nodeName": SOURCE, "bandwidthLimit": "400Mi" }),
        )
        .await?;
        let done = ended(&evacuations, &name, Phase::Completed, 300)
            .await
            .with_context(|| operator.log())?;
        println!(
            "evacuated in {:.1} s: counts {:?}, progress {:?}",
            started.elapsed().as_secs_f64(),
            done.counts,
            done.progress
        );
        let counts = done.counts.clone().context("no counts")?;
        // Only this test's volumes live on node-a here; a leftover volume of another test with
        // no claim would be listed as skipped, never as failed.
        ensure!(
            counts.completed == 2 && counts.total == 2 + counts.skipped,
            "counts {counts:?}"
        );
        ensure!(
            counts.failed == 0 && counts.cancelled == 0,
            "counts {counts:?}"
        );
        let ready = find(&done.conditions, READY).context("no Ready condition")?;
        ensure!(
            ready.status == "True" && ready.reason == "EvacuationCompleted",
            "{ready:?}"
        );
        ensure!(done.progress.as_ref().is_some_and(|p| p.percent == 100));

        // Both volumes now live on node-b; the status says so, with their migrations.
        let volumes: Api<LivediskVolume> = Api::all(client.clone());
        let object = evacuations.get(&name).await?;
        let uid = object.uid().context("no uid")?;
        let migrations: Vec<DiskMigration> = children(&client, &uid)
            .await?
            .into_iter()
            .filter(|m| {
                m.labels()
                    .get(LABEL_VOLUME)
                    .is_some_and(|v| *v == live || *v == idle)
            })
            .collect();
        ensure!(migrations.len() == 2, "DiskMigrations: {migrations:?}");
        for (volume, claim) in [(&live, "disk-1"), (&idle, "disk-2")] {
            ensure!(
                volumes.get(volume).await?.spec.node_name == TARGET,
                "{volume} is not on {TARGET}"
            );
            let entry = done
                .volumes
                .iter()
                .find(|v| &v.volume_id == volume)
                .with_context(|| format!("{volume} is not in the status"))?;
            ensure!(entry.phase == EvacuationVolumePhase::Completed, "{entry:?}");
            ensure!(
                entry.target_node_name.as_deref() == Some(TARGET),
                "{entry:?}"
            );
            let reference = entry.persistent_volume_claim.as_ref().context("no claim")?;
            ensure!(
                reference.namespace == ns && reference.name == claim,
                "{entry:?}"
            );
            // Its DiskMigration: in the claim's namespace, of that claim, owned by the
            // evacuation, with the evacuation's rate limit.
            let migration_name = entry.migration_name.as_deref().context("no migration")?;
            let migration = migrations
                .iter()
                .find(|m| m.name_any() == migration_name)
                .with_context(|| format!("no DiskMigration {migration_name}"))?;
            ensure!(migration.namespace().as_deref() == Some(ns.as_str()));
            ensure!(migration.spec.persistent_volume_claim_name == claim);
            ensure!(migration.spec.target_node_name == TARGET);
            ensure!(migration.spec.bandwidth_limit.as_deref() == Some("400Mi"));
            ensure!(migration.spec.verify);
            let owner = migration
                .owner_references()
                .first()
                .context("no owner")?
                .clone();
            ensure!(
                owner.kind == "DiskEvacuation"
                    && owner.name == name
                    && owner.uid == uid
                    && owner.controller == Some(true),
                "{owner:?}"
            );
            let status = migration.status.clone().unwrap_or_default();
            println!(
                "{migration_name}: {:?}, progress {:?}, pause {:?} ms, verification {:?}",
                status.phase,
                status.progress,
                status.cutover_pause_milliseconds,
                status.verification
            );
            ensure!(status.phase == Phase::Completed, "{status:?}");
            ensure!(
                status
                    .verification
                    .is_some_and(|v| v.first_difference_offset.is_none()),
                "{migration_name} was not verified"
            );
        }

        // Every acknowledged write is there: the live volume through its consumer on node-a
        // (served by node-b now), then both on node-b.
        verify(&live_device, 1, &live_log)?;
        detach_block(SOURCE, &live, &tag("live")).await?;
        forget(&staged, &live);
        let moved = host_device(
            TARGET,
            &stage_as_kubelet(TARGET, &live, &tag("live-b")).await?,
        )?;
        remember(&staged, TARGET, &live, &tag("live-b"));
        verify(&moved, 1, &live_log)?;
        detach_block(TARGET, &live, &tag("live-b")).await?;
        forget(&staged, &live);
        let moved = host_device(
            TARGET,
            &stage_as_kubelet(TARGET, &idle, &tag("idle-b")).await?,
        )?;
        remember(&staged, TARGET, &idle, &tag("idle-b"));
        verify(&moved, 2, &idle_log)?;
        detach_block(TARGET, &idle, &tag("idle-b")).await?;
        forget(&staged, &idle);

        // The story, in Events on the evacuation: each moved volume's names its DiskMigration.
        let names: Vec<String> = migrations.iter().map(|m| m.name_any()).collect();
        let told = eventually(30, "the evacuation's Events", || async {
            let events = events(&client, &name).await?;
            let reasons: Vec<String> = events.iter().filter_map(|e| e.reason.clone()).collect();
            let mut moved: Vec<String> = events
                .iter()
                .filter(|e| e.reason.as_deref() == Some("VolumeMoved"))
                .filter_map(|e| e.related.as_ref()?.name.clone())
                .collect();
            moved.sort();
            let mut expected = names.clone();
            expected.sort();
            let all = reasons.iter().any(|r| r == "Started")
                && reasons.iter().any(|r| r == "Completed")
                && moved == expected;
            Ok(all.then_some(reasons))
        })
        .await?;
        println!("events: {told:?}");

        // What `kubectl get devac` shows.
        let output = kubectl().args(["get", "devac", &name]).output()?;
        let listing = String::from_utf8_lossy(&output.stdout);
        for expected in [
            "NODE",
            "TARGET",
            "PHASE",
            "DONE",
            "TOTAL",
            "Completed",
            SOURCE,
        ] {
            ensure!(
                listing.contains(expected),
                "kubectl get devac lacks {expected}:\n{listing}"
            );
        }

        // Its migrations go with it (the garbage collector follows their owner reference).
        evacuations
            .delete(&name, &DeleteParams::background())
            .await?;
        eventually(120, "the evacuation's DiskMigrations deleted", || async {
            Ok(children(&client, &uid).await?.is_empty().then_some(()))
        })
        .await?;
        // The volumes stay where they went.
        for volume in [&live, &idle] {
            ensure!(volumes.get(volume).await?.spec.node_name == TARGET);
        }
        Ok(())
    }
    .await;
    // A failed run leaves nothing staged behind.
    let left = staged.lock().map(|s| s.clone()).unwrap_or_default();
    for (node, volume, tag) in left {
        let _ = detach_block(node, &volume, &tag).await;
    }
    let _ = evacuations.delete(&name, &DeleteParams::default()).await;
    drop(operator);
    namespace.delete().await?;
    result
}

/// What a test has staged (node, volume, tag), to undo when it fails midway.
type Staged<'a> = std::sync::Mutex<Vec<(&'a str, String, String)>>;

fn remember<'a>(staged: &Staged<'a>, node: &'a str, volume: &str, tag: &str) {
    if let Ok(mut s) = staged.lock() {
        s.push((node, volume.to_string(), tag.to_string()));
    }
}

fn forget(staged: &Staged<'_>, volume: &str) {
    if let Ok(mut s) = staged.lock() {
        s.retain(|(_, v, _)| v != volume);
    }
}

#[tokio::test]
async fn a_cancel_stops_the_running_migration_and_starts_no_other() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let client = client().await?;
    let operator = operator_and_nodes(&client).await?;
    clear_source_node(&client).await?;
    let namespace = TestNamespace::create(&client, "evacuate-cancel").await?;
    let ns = namespace.name.clone();
    let dir = ScratchDir::new("node-evacuation-cancel")?;
    let name = unique("drain-cancel");
    let evacuations: Api<DiskEvacuation> = Api::all(client.clone());
    let result = async {
        // Two volumes with 16 MiB written each, moved one at a time at 1 MiB/s (then 512 KiB/s):
        // the second waits for its turn.
        let mut logs = Vec::new();
        let mut ids = Vec::new();
        for (tag, claim) in [(1u64, "disk-1"), (2, "disk-2")] {
            let volume = volume_on_source(&client, &ns, claim).await?;
            let path = attach_block(SOURCE, &volume, &format!("{name}-{claim}")).await?;
            let log = dir.0.join(format!("{claim}.log"));
            let written = write_phase(&host_device(SOURCE, &path)?, tag, 4096, &log);
            detach_block(SOURCE, &volume, &format!("{name}-{claim}")).await?;
            written?;
            logs.push((tag, log));
            ids.push(volume);
        }
        evacuation(
            &client,
            &name,
            json!({ "nodeName": SOURCE, "targetNodeName": TARGET, "bandwidthLimit": "1Mi",
                    "maxConcurrentMigrations": 1 }),
        )
        .await?;
        let uid = evacuations.get(&name).await?.uid().context("no uid")?;
        // This test's volumes' migrations (a volume of an earlier test that could not be moved
        // off node-a before may get one too, and fail).
        let own = |all: Vec<DiskMigration>| -> Vec<DiskMigration> {
            all.into_iter()
                .filter(|m| {
                    m.labels()
                        .get(LABEL_VOLUME)
                        .is_some_and(|v| ids.contains(v))
                })
                .collect()
        };
        let first = eventually(120, "the first migration running", || async {
            Ok(own(children(&client, &uid).await?)
                .into_iter()
                .find(|m| m.status.as_ref().is_some_and(|s| s.phase == Phase::Running)))
        })
        .await
        .with_context(|| operator.log())?;
        let unended = children(&client, &uid)
            .await?
            .into_iter()
            .filter(|m| {
                !m.status.as_ref().is_some_and(|s| {
                    matches!(s.phase, Phase::Completed | Phase::Failed | Phase::Cancelled)
                })
            })
            .count();
        ensure!(
            unended == 1 && own(children(&client, &uid).await?).len() == 1,
            "more than maxConcurrentMigrations started"
        );
        // A new rate reaches the running migration.
        evacuations
            .patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({ "spec": { "bandwidthLimit": "512Ki" } })),
            )
            .await?;
        let migrations: Api<DiskMigration> = Api::namespaced(client.clone(), &ns);
        eventually(30, "the new rate on the migration", || async {
            let spec = migrations.get(&first.name_any()).await?.spec;
            Ok((spec.bandwidth_limit.as_deref() == Some("512Ki")).then_some(()))
        })
        .await?;
        evacuations
            .patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({ "spec": { "cancel": true } })),
            )
            .await?;
        let status = ended(&evacuations, &name, Phase::Cancelled, 120)
            .await
            .with_context(|| operator.log())?;
        println!(
            "cancelled: {:?}, {:?}",
            status.counts,
            find(&status.conditions, STALLED)
        );
        // The second migration was never created. The running one got the cancel: it stopped
        // before its cutover (Cancelled, its volume on node-a) or, had it passed its cutover
        // already, completed (its volume on node-b).
        let counts = status.counts.clone().context("no counts")?;
        let made = own(children(&client, &uid).await?);
        ensure!(made.len() == 1, "{} DiskMigrations", made.len());
        ensure!(
            made[0].spec.cancel,
            "the cancel did not reach {}",
            made[0].name_any()
        );
        let stopped = made[0].status.clone().unwrap_or_default();
        let first_moved = match stopped.phase {
            Phase::Cancelled => false,
            Phase::Completed => true,
            other => anyhow::bail!("the running migration ended {other:?}"),
        };
        println!("the running migration ended {:?}", stopped.phase);
        let moved = i32::from(first_moved);
        // Volumes of earlier tests' namespaces being deleted are counted too: skipped, or
        // cancelled while they waited for their turn. The counts add up, and this test's two
        // volumes are among them (each checked below).
        ensure!(
            counts.total == counts.completed + counts.failed + counts.cancelled + counts.skipped
                && counts.completed >= moved
                && counts.cancelled >= 2 - moved,
            "counts {counts:?}"
        );
        // Every volume is where the status says, with its data.
        let volumes: Api<LivediskVolume> = Api::all(client.clone());
        for (volume, (tag, log)) in ids.iter().zip(&logs) {
            let entry = status
                .volumes
                .iter()
                .find(|v| &v.volume_id == volume)
                .context("a volume missing in the status")?;
            let node = match entry.phase {
                EvacuationVolumePhase::Completed => TARGET,
                EvacuationVolumePhase::Cancelled => SOURCE,
                other => anyhow::bail!("{volume}: {other:?}"),
            };
            ensure!(
                volumes.get(volume).await?.spec.node_name == node,
                "{volume}"
            );
            let tag_name = format!("{name}-check-{tag}");
            let path = stage_as_kubelet(node, volume, &tag_name).await?;
            let checked = verify(host_device(node, &path)?, *tag, log);
            detach_block(node, volume, &tag_name).await?;
            checked?;
        }
        Ok(())
    }
    .await;
    let _ = evacuations.delete(&name, &DeleteParams::default()).await;
    drop(operator);
    namespace.delete().await?;
    result
}

#[tokio::test]
async fn bad_input_is_refused_and_changes_nothing() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let client = client().await?;
    let operator = operator_and_nodes(&client).await?;
    let namespace = TestNamespace::create(&client, "evacuate-bad").await?;
    let ns = namespace.name.clone();
    let evacuations: Api<DiskEvacuation> = Api::all(client.clone());
    let unknown_node = unique("drain-nowhere");
    let unknown_target = unique("drain-to-nowhere");
    let result = async {
        // A volume on node-a, which must stay there.
        let volume = volume_on_source(&client, &ns, "disk").await?;

        // The API server refuses a target equal to the node...
        let same = json!({ "apiVersion": "livedisk.io/v1alpha1", "kind": "DiskEvacuation",
            "metadata": { "name": unique("drain-self") },
            "spec": { "nodeName": SOURCE, "targetNodeName": SOURCE } });
        let refused = apply(&client, "", &same)
            .await?
            .err()
            .context("an evacuation of a node to itself was accepted")?;
        ensure!(
            error_message(&refused).contains("targetNodeName must be another node than nodeName"),
            "{}",
            error_message(&refused)
        );

        // ...and the operator an unknown node or target: Failed, Stalled with the reason.
        evacuation(
            &client,
            &unknown_node,
            json!({ "nodeName": "no-such-node" }),
        )
        .await?;
        evacuation(
            &client,
            &unknown_target,
            json!({ "nodeName": SOURCE, "targetNodeName": "no-such-node" }),
        )
        .await?;
        for (name, reason) in [
            (&unknown_node, "NodeNotFound"),
            (&unknown_target, "TargetNotFound"),
        ] {
            let status = ended(&evacuations, name, Phase::Failed, 90)
                .await
                .with_context(|| operator.log())?;
            let stalled = find(&status.conditions, STALLED).context("no Stalled condition")?;
            ensure!(
                stalled.status == "True" && stalled.reason == reason,
                "{name}: {stalled:?}"
            );
            ensure!(
                stalled.message.contains("\"no-such-node\"")
                    && stalled.message.contains("nothing was moved"),
                "{}",
                stalled.message
            );
            ensure!(
                status.volumes.is_empty(),
                "{name} lists {:?}",
                status.volumes
            );
            let uid = evacuations.get(name).await?.uid().context("no uid")?;
            ensure!(
                children(&client, &uid).await?.is_empty(),
                "{name} created DiskMigrations"
            );
            eventually(30, &format!("a {reason} Warning Event"), || async {
                Ok(events(&client, name).await?.into_iter().find(|e| {
                    e.type_.as_deref() == Some("Warning") && e.reason.as_deref() == Some(reason)
                }))
            })
            .await?;
        }
        // Nothing moved, and no DiskMigration exists in the claim's namespace.
        let volumes: Api<LivediskVolume> = Api::all(client.clone());
        ensure!(volumes.get(&volume).await?.spec.node_name == SOURCE);
        let migrations: Api<DiskMigration> = Api::namespaced(client.clone(), &ns);
        ensure!(
            migrations
                .list(&ListParams::default())
                .await?
                .items
                .is_empty()
        );

        // The node is immutable.
        let change = evacuations
            .patch(
                &unknown_target,
                &PatchParams::default(),
                &Patch::Merge(json!({ "spec": { "nodeName": TARGET } })),
            )
            .await
            .err()
            .context("the node of an evacuation was changed")?;
        ensure!(
            error_message(&change).contains("nodeName, targetNodeName and verify are immutable"),
            "{}",
            error_message(&change)
        );
        // Still refused a while later: a failed evacuation never starts.
        tokio::time::sleep(Duration::from_secs(2)).await;
        ensure!(volumes.get(&volume).await?.spec.node_name == SOURCE);
        Ok(volume)
    }
    .await;
    for name in [&unknown_node, &unknown_target] {
        let _ = evacuations.delete(name, &DeleteParams::default()).await;
    }
    drop(operator);
    namespace.delete().await?;
    // The volume goes with its namespace; wait, so that no other evacuation test finds it.
    if let Ok(volume) = &result {
        let volumes: Api<LivediskVolume> = Api::all(client.clone());
        eventually(120, &format!("{volume} deleted with its claim"), || async {
            Ok(volumes.get_opt(volume).await?.is_none().then_some(()))
        })
        .await?;
    }
    result.map(|_| ())
}
