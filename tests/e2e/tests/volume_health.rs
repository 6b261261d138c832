//! Volume health and the volume list, against the two-node driver of the processes layout
//! (`hack/driver.sh start`): the health RPCs of CSI 1.13 (ControllerGetVolumeHealth,
//! ControllerListVolumeHealth, NodeGetVolumeHealth, NodeGetStorageHealth) report a volume whose
//! engine daemon is gone or whose attach path is gone, and healthy ones as healthy; ListVolumes
//! pages by name, so a volume deleted or created between two pages neither repeats nor shifts
//! entries.

use std::collections::BTreeSet;

use anyhow::{Context, Result, ensure};
use livedisk_csi_proto::csi::v1::*;
use livedisk_e2e::csi::{
    attach_block, controller, create_block_volume, delete_volume, detach_block, in_node,
    kill_engine_daemon, node,
};
use livedisk_e2e::disks::host_device;
use livedisk_e2e::eventually;

const NODE: &str = "node-a";

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn reasons(health: Option<VolumeHealth>) -> Vec<String> {
    health
        .map(|h| h.health_statuses.into_iter().map(|e| e.reason).collect())
        .unwrap_or_default()
}

async fn node_health(volume: &str) -> Result<Vec<String>> {
    Ok(reasons(
        node(NODE)
            .await?
            .node_get_volume_health(NodeGetVolumeHealthRequest {
                volume_id: volume.into(),
                ..Default::default()
            })
            .await?
            .into_inner()
            .volume_health,
    ))
}

async fn cluster_health(volume: &str) -> Result<Vec<String>> {
    Ok(reasons(
        controller()
            .await?
            .controller_get_volume_health(ControllerGetVolumeHealthRequest {
                volume_id: volume.into(),
                ..Default::default()
            })
            .await?
            .into_inner()
            .volume_health,
    ))
}

#[tokio::test]
async fn the_volume_list_pages_by_name_through_creations_and_deletions() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let mut ours = Vec::new();
    for i in 0..4 {
        ours.push(create_block_volume(&format!("list-{i}-{suffix}"), NODE).await?);
    }
    let mut client = controller().await?;
    // Page by one. At the first page whose entry is one of this test's volumes, that volume
    // (the last entry of the page) is deleted and a new one created before walking on.
    let mut seen: Vec<String> = Vec::new();
    let mut token = String::new();
    let mut late: Option<(String, String)> = None;
    loop {
        let page = client
            .list_volumes(ListVolumesRequest {
                max_entries: 1,
                starting_token: token.clone(),
            })
            .await?
            .into_inner();
        ensure!(page.entries.len() <= 1, "{page:?}");
        for entry in &page.entries {
            let volume = entry.volume.as_ref().context("no volume")?;
            ensure!(volume.capacity_bytes > 0, "{volume:?}");
            seen.push(volume.volume_id.clone());
        }
        token = page.next_token;
        if token.is_empty() {
            break;
        }
        let last = seen.last().cloned().unwrap_or_default();
        if late.is_none()
            && let Some(i) = ours.iter().position(|v| *v == last)
        {
            delete_volume(&ours.remove(i)).await?;
            let created = create_block_volume(&format!("list-late-{suffix}"), NODE).await?;
            late = Some((created, token.clone()));
        }
    }
    let (late, at) = late.context("no page ended with one of this test's volumes")?;
    let unique: BTreeSet<&String> = seen.iter().collect();
    ensure!(unique.len() == seen.len(), "an entry repeated: {seen:?}");
    for volume in &ours {
        ensure!(
            seen.contains(volume),
            "{volume} missing from the walk {seen:?}"
        );
    }
    // A volume created mid-walk is listed exactly when its ID comes after the page it was
    // created at.
    ensure!(
        seen.contains(&late) == (late > at),
        "{late} created at token {at}: listed {}",
        seen.contains(&late)
    );
    ours.push(late);
    let bad = client
        .list_volumes(ListVolumesRequest {
            starting_token: "not-a-token".into(),
            ..Default::default()
        })
        .await
        .expect_err("a token this driver never issued");
    ensure!(bad.code() == tonic::Code::Aborted, "{bad:?}");
    // ControllerGetVolume answers one of them with its node's topology.
    let got = client
        .controller_get_volume(ControllerGetVolumeRequest {
            volume_id: ours[0].clone(),
        })
        .await?
        .into_inner()
        .volume
        .context("no volume")?;
    ensure!(got.volume_id == ours[0] && got.accessible_topology.len() == 1);
    for volume in &ours {
        delete_volume(volume).await?;
    }
    Ok(())
}

#[tokio::test]
async fn health_reports_a_dead_engine_daemon_and_a_lost_attach_path() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let volume = create_block_volume(&format!("health-{suffix}"), NODE).await?;
    let tag = format!("health-{suffix}");
    let target = attach_block(NODE, &volume, &tag).await?;
    ensure!(
        node_health(&volume).await?.is_empty(),
        "a fresh volume is unhealthy"
    );
    ensure!(cluster_health(&volume).await?.is_empty());
    let storage = node(NODE)
        .await?
        .node_get_storage_health(NodeGetStorageHealthRequest::default())
        .await?
        .into_inner();
    ensure!(storage.backend_health.is_empty(), "{storage:?}");

    // The attach path: the loop device under the volume's front end is detached behind the
    // plugin's back.
    let device = host_device(NODE, &target)?;
    let output = in_node(NODE, &["losetup", "-d", &device])?;
    ensure!(output.status.success(), "losetup -d {device}: {output:?}");
    let lost = eventually(30, "the lost attach path reported", || async {
        let found = node_health(&volume).await?;
        Ok(found.iter().any(|r| r == "AttachPathGone").then_some(found))
    })
    .await?;
    eprintln!("after losetup -d: {lost:?}");
    detach_block(NODE, &volume, &tag).await?;
    ensure!(
        node_health(&volume).await?.is_empty(),
        "unstaged, the volume is still reported"
    );

    // The engine daemon: killed; both the node and (from the node's report, every 20 s) the
    // cluster say so until the node plugin has a daemon again.
    let pid = kill_engine_daemon(NODE).await?;
    eprintln!("killed engine daemon {pid}");
    eventually(15, "the node reporting its dead engine", || async {
        Ok(node_health(&volume)
            .await
            .ok()
            .filter(|r| r.iter().any(|r| r == "EngineDown")))
    })
    .await?;
    let storage = eventually(15, "the node's storage unreachable", || async {
        let health = node(NODE)
            .await?
            .node_get_storage_health(NodeGetStorageHealthRequest::default())
            .await?
            .into_inner();
        Ok((!health.backend_health.is_empty()).then_some(health))
    })
    .await?;
    ensure!(
        storage.backend_health[0].reason == "EngineDown",
        "{storage:?}"
    );
    eventually(30, "the cluster reporting the dead engine", || async {
        Ok(cluster_health(&volume)
            .await?
            .iter()
            .any(|r| r == "EngineDown")
            .then_some(()))
    })
    .await?;
    // The node plugin gives the daemon up after its bound and comes back with a new one.
    eventually(180, "the volume healthy again", || async {
        let (on_node, in_cluster) =
            match (node_health(&volume).await, cluster_health(&volume).await) {
                (Ok(a), Ok(b)) => (a, b),
                _ => return Ok(None),
            };
        Ok((on_node.is_empty() && in_cluster.is_empty()).then_some(()))
    })
    .await?;
    delete_volume(&volume).await?;
    Ok(())
}
