//! Bad input to every CSI RPC, through the real binaries' sockets: each answers the spec's code
//! and nothing is created.

use anyhow::Result;
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use livedisk_api::internal::{LivediskSnapshot, LivediskVolume};
use livedisk_common::names;
use livedisk_csi_proto::csi::v1::volume_capability::{
    AccessMode, AccessType, BlockVolume, access_mode::Mode,
};
use livedisk_csi_proto::csi::v1::volume_content_source::{
    SnapshotSource, Type as SourceType, VolumeSource,
};
use livedisk_csi_proto::csi::v1::*;
use livedisk_e2e::client;
use livedisk_e2e::csi::{controller, node};
use tonic::Code;

const UNKNOWN_VOLUME: &str = "vol-00000000-0000-4000-8000-000000000000";
const UNKNOWN_SNAPSHOT: &str = "snap-00000000-0000-4000-8000-000000000000";
/// Every CreateVolume name the test sends (the IDs a wrongly accepted request would create).
const VOLUME_NAMES: [&str; 8] = [
    "",
    "bad-no-caps",
    "bad-multi",
    "bad-parameter",
    "bad-range",
    "bad-source-path",
    "bad-source-volume",
    "bad-too-big",
];
/// The CreateSnapshot name the test sends (besides none).
const SNAPSHOT_NAME: &str = "bad-snap";
const SNAPSHOT_NAMES: [&str; 2] = ["", SNAPSHOT_NAME];

fn capability(mode: Mode) -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode { mode: mode as i32 }),
        access_type: Some(AccessType::Block(BlockVolume {})),
    }
}

fn create(name: &str) -> CreateVolumeRequest {
    assert!(
        VOLUME_NAMES.contains(&name),
        "{name:?} is missing from VOLUME_NAMES, so the final check would not look for it"
    );
    CreateVolumeRequest {
        name: name.into(),
        volume_capabilities: vec![capability(Mode::SingleNodeWriter)],
        ..Default::default()
    }
}

/// Asserts the result is an error with `code`; `case` names the row in the failure message.
fn expect<T: std::fmt::Debug>(
    case: &str,
    result: Result<tonic::Response<T>, tonic::Status>,
    code: Code,
) {
    match result {
        Ok(response) => panic!("{case}: expected {code:?}, got success {response:?}"),
        Err(status) => {
            assert_eq!(status.code(), code, "{case}: {}", status.message());
            assert!(
                !status.message().is_empty(),
                "{case}: the error has no message"
            );
        }
    }
}

#[tokio::test]
async fn every_rpc_answers_bad_input_with_the_spec_code_and_changes_nothing() -> Result<()> {
    let kube = client().await?;
    let volumes: Api<LivediskVolume> = Api::all(kube.clone());
    let snapshots: Api<LivediskSnapshot> = Api::all(kube.clone());
    // The internal objects that exist. Other binaries on the same cluster may still create or
    // delete objects while this runs (a leftover VolumeSnapshot's content being cut as its
    // namespace goes), so "nothing changed" is checked for the objects this test's requests
    // could have made: the IDs derived from the names it sends (every other request names an
    // unknown or malformed ID, which no object can carry).
    let names = || async {
        let mut names = std::collections::BTreeSet::new();
        for volume in volumes.list(&ListParams::default()).await?.items {
            names.insert(volume.name_any());
        }
        for snapshot in snapshots.list(&ListParams::default()).await?.items {
            names.insert(snapshot.name_any());
        }
        Ok::<_, anyhow::Error>(names)
    };
    let ours = VOLUME_NAMES
        .iter()
        .map(|name| names::volume_id_for(name).to_string())
        .chain(
            SNAPSHOT_NAMES
                .iter()
                .map(|name| names::snapshot_id_for(name).to_string()),
        )
        .collect::<std::collections::BTreeSet<_>>();
    let before = names().await?;
    let already = before.intersection(&ours).cloned().collect::<Vec<_>>();
    anyhow::ensure!(
        already.is_empty(),
        "objects named like this test's requests exist before it runs: {already:?}"
    );
    let mut c = controller().await?;

    expect(
        "CreateVolume without a name",
        c.create_volume(create("")).await,
        Code::InvalidArgument,
    );
    let mut no_caps = create("bad-no-caps");
    no_caps.volume_capabilities.clear();
    expect(
        "CreateVolume without capabilities",
        c.create_volume(no_caps).await,
        Code::InvalidArgument,
    );
    let mut multi = create("bad-multi");
    multi.volume_capabilities = vec![VolumeCapability {
        access_type: Some(AccessType::Mount(Default::default())),
        ..capability(Mode::MultiNodeMultiWriter)
    }];
    expect(
        "CreateVolume multi-node writer of a filesystem",
        c.create_volume(multi).await,
        Code::InvalidArgument,
    );
    let mut unknown = create("bad-parameter");
    unknown
        .parameters
        .insert("mergeBandwidthLimt".into(), "1Mi".into());
    expect(
        "CreateVolume with an unknown parameter",
        c.create_volume(unknown).await,
        Code::InvalidArgument,
    );
    let mut range = create("bad-range");
    range.capacity_range = Some(CapacityRange {
        required_bytes: 10 << 20,
        limit_bytes: 1 << 20,
    });
    expect(
        "CreateVolume required > limit",
        c.create_volume(range).await,
        Code::InvalidArgument,
    );
    let mut from_path = create("bad-source-path");
    from_path.volume_content_source = Some(VolumeContentSource {
        r#type: Some(SourceType::Snapshot(SnapshotSource {
            snapshot_id: "../../etc/passwd".into(),
        })),
    });
    expect(
        "CreateVolume from a path-like snapshot ID",
        c.create_volume(from_path).await,
        Code::NotFound,
    );
    let mut from_missing = create("bad-source-volume");
    from_missing.volume_content_source = Some(VolumeContentSource {
        r#type: Some(SourceType::Volume(VolumeSource {
            volume_id: UNKNOWN_VOLUME.into(),
        })),
    });
    expect(
        "CreateVolume from an unknown volume",
        c.create_volume(from_missing).await,
        Code::NotFound,
    );
    let mut too_big = create("bad-too-big");
    too_big.capacity_range = Some(CapacityRange {
        required_bytes: 1 << 60,
        limit_bytes: 0,
    });
    too_big.accessibility_requirements = Some(TopologyRequirement {
        requisite: vec![],
        preferred: vec![Topology {
            segments: [(
                livedisk_common::TOPOLOGY_NODE_KEY.to_string(),
                "node-a".to_string(),
            )]
            .into(),
        }],
    });
    expect(
        "CreateVolume larger than the pool",
        c.create_volume(too_big).await,
        Code::ResourceExhausted,
    );

    expect(
        "DeleteVolume without an ID",
        c.delete_volume(DeleteVolumeRequest {
            volume_id: String::new(),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
    );
    let path_delete = c
        .delete_volume(DeleteVolumeRequest {
            volume_id: "../../etc".into(),
            ..Default::default()
        })
        .await;
    assert!(
        path_delete.is_ok(),
        "DeleteVolume of an ID no volume can have is a successful no-op"
    );

    expect(
        "ControllerExpandVolume without an ID",
        c.controller_expand_volume(ControllerExpandVolumeRequest {
            capacity_range: Some(CapacityRange {
                required_bytes: 1 << 30,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
    );
    expect(
        "ControllerExpandVolume without a range",
        c.controller_expand_volume(ControllerExpandVolumeRequest {
            volume_id: UNKNOWN_VOLUME.into(),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
    );
    expect(
        "ControllerExpandVolume of an unknown volume",
        c.controller_expand_volume(ControllerExpandVolumeRequest {
            volume_id: UNKNOWN_VOLUME.into(),
            capacity_range: Some(CapacityRange {
                required_bytes: 1 << 30,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await,
        Code::NotFound,
    );

    expect(
        "CreateSnapshot without a name",
        c.create_snapshot(CreateSnapshotRequest {
            source_volume_id: UNKNOWN_VOLUME.into(),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
    );
    expect(
        "CreateSnapshot without a source",
        c.create_snapshot(CreateSnapshotRequest {
            name: SNAPSHOT_NAME.into(),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
    );
    expect(
        "CreateSnapshot of an unknown volume",
        c.create_snapshot(CreateSnapshotRequest {
            name: SNAPSHOT_NAME.into(),
            source_volume_id: UNKNOWN_VOLUME.into(),
            ..Default::default()
        })
        .await,
        Code::NotFound,
    );
    expect(
        "CreateSnapshot of a path-like volume ID",
        c.create_snapshot(CreateSnapshotRequest {
            name: SNAPSHOT_NAME.into(),
            source_volume_id: "vol-../../x".into(),
            ..Default::default()
        })
        .await,
        Code::NotFound,
    );
    for (what, parameters) in [
        (
            "CreateSnapshot with an unknown parameter",
            [("mergeBandwidthLimt", "1Mi")],
        ),
        (
            "CreateSnapshot with a zero merge limit",
            [("mergeBandwidthLimit", "0")],
        ),
        (
            "CreateSnapshot with a merge limit that is no quantity",
            [("mergeBandwidthLimit", "fast")],
        ),
    ] {
        expect(
            what,
            c.create_snapshot(CreateSnapshotRequest {
                name: SNAPSHOT_NAME.into(),
                source_volume_id: UNKNOWN_VOLUME.into(),
                parameters: parameters
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                ..Default::default()
            })
            .await,
            Code::InvalidArgument,
        );
    }
    expect(
        "DeleteSnapshot without an ID",
        c.delete_snapshot(DeleteSnapshotRequest::default()).await,
        Code::InvalidArgument,
    );
    expect(
        "ListSnapshots with a bad token",
        c.list_snapshots(ListSnapshotsRequest {
            starting_token: "not-a-token".into(),
            ..Default::default()
        })
        .await,
        Code::Aborted,
    );
    expect(
        "ListSnapshots with negative max",
        c.list_snapshots(ListSnapshotsRequest {
            max_entries: -1,
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
    );
    expect(
        "GetSnapshot without an ID",
        c.get_snapshot(GetSnapshotRequest::default()).await,
        Code::InvalidArgument,
    );
    expect(
        "GetSnapshot unknown",
        c.get_snapshot(GetSnapshotRequest {
            snapshot_id: UNKNOWN_SNAPSHOT.into(),
            ..Default::default()
        })
        .await,
        Code::NotFound,
    );
    expect(
        "ValidateVolumeCapabilities without an ID",
        c.validate_volume_capabilities(ValidateVolumeCapabilitiesRequest {
            volume_capabilities: vec![capability(Mode::SingleNodeWriter)],
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
    );
    expect(
        "ValidateVolumeCapabilities without capabilities",
        c.validate_volume_capabilities(ValidateVolumeCapabilitiesRequest {
            volume_id: UNKNOWN_VOLUME.into(),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
    );
    expect(
        "ValidateVolumeCapabilities unknown volume",
        c.validate_volume_capabilities(ValidateVolumeCapabilitiesRequest {
            volume_id: UNKNOWN_VOLUME.into(),
            volume_capabilities: vec![capability(Mode::SingleNodeWriter)],
            ..Default::default()
        })
        .await,
        Code::NotFound,
    );
    expect(
        "ControllerPublishVolume (not offered)",
        c.controller_publish_volume(ControllerPublishVolumeRequest::default())
            .await,
        Code::Unimplemented,
    );
    expect(
        "GetCapacity with an unsupported capability",
        c.get_capacity(GetCapacityRequest {
            volume_capabilities: vec![capability(Mode::MultiNodeSingleWriter)],
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
    );

    let mut n = node("node-a").await?;
    let staging = std::env::temp_dir()
        .join("livedisk-bad-input-staging")
        .display()
        .to_string();
    let stage = |volume_id: &str| NodeStageVolumeRequest {
        volume_id: volume_id.into(),
        staging_target_path: staging.clone(),
        volume_capability: Some(capability(Mode::SingleNodeWriter)),
        ..Default::default()
    };
    expect(
        "NodeStageVolume without an ID",
        n.node_stage_volume(stage("")).await,
        Code::InvalidArgument,
    );
    expect(
        "NodeStageVolume unknown volume",
        n.node_stage_volume(stage(UNKNOWN_VOLUME)).await,
        Code::NotFound,
    );
    expect(
        "NodeStageVolume path-like ID",
        n.node_stage_volume(stage("../../../etc")).await,
        Code::NotFound,
    );
    let mut no_path = stage(UNKNOWN_VOLUME);
    no_path.staging_target_path.clear();
    expect(
        "NodeStageVolume without a staging path",
        n.node_stage_volume(no_path).await,
        Code::InvalidArgument,
    );
    let mut no_cap = stage(UNKNOWN_VOLUME);
    no_cap.volume_capability = None;
    expect(
        "NodeStageVolume without a capability",
        n.node_stage_volume(no_cap).await,
        Code::InvalidArgument,
    );
    expect(
        "NodeUnstageVolume without an ID",
        n.node_unstage_volume(NodeUnstageVolumeRequest {
            staging_target_path: staging.clone(),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
    );
    expect(
        "NodePublishVolume without a target",
        n.node_publish_volume(NodePublishVolumeRequest {
            volume_id: UNKNOWN_VOLUME.into(),
            staging_target_path: staging.clone(),
            volume_capability: Some(capability(Mode::SingleNodeWriter)),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
    );
    expect(
        "NodePublishVolume unknown volume",
        n.node_publish_volume(NodePublishVolumeRequest {
            volume_id: UNKNOWN_VOLUME.into(),
            staging_target_path: staging.clone(),
            target_path: format!("{staging}-target"),
            volume_capability: Some(capability(Mode::SingleNodeWriter)),
            ..Default::default()
        })
        .await,
        Code::NotFound,
    );
    expect(
        "NodeUnpublishVolume without an ID",
        n.node_unpublish_volume(NodeUnpublishVolumeRequest {
            target_path: staging.clone(),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
    );
    expect(
        "NodeUnpublishVolume without a target",
        n.node_unpublish_volume(NodeUnpublishVolumeRequest {
            volume_id: UNKNOWN_VOLUME.into(),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
    );
    expect(
        "NodeGetVolumeStats without a path",
        n.node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: UNKNOWN_VOLUME.into(),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
    );
    expect(
        "NodeGetVolumeStats unknown volume",
        n.node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: UNKNOWN_VOLUME.into(),
            volume_path: "/".into(),
            ..Default::default()
        })
        .await,
        Code::NotFound,
    );
    expect(
        "NodeExpandVolume unknown volume",
        n.node_expand_volume(NodeExpandVolumeRequest {
            volume_id: UNKNOWN_VOLUME.into(),
            volume_path: "/".into(),
            ..Default::default()
        })
        .await,
        Code::NotFound,
    );
    expect(
        "NodeExpandVolume without a path",
        n.node_expand_volume(NodeExpandVolumeRequest {
            volume_id: UNKNOWN_VOLUME.into(),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
    );

    // The ResourceExhausted volume was removed again; nothing else was ever created.
    let settled = async {
        let mut made = Vec::new();
        for _ in 0..100 {
            let now = names().await?;
            made = now.intersection(&ours).cloned().collect::<Vec<_>>();
            if made.is_empty() {
                let others = now.difference(&before).collect::<Vec<_>>();
                if !others.is_empty() {
                    eprintln!("objects of other tests appeared meanwhile (not ours): {others:?}");
                }
                return Ok(());
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        anyhow::bail!("bad input left internal objects behind: {made:?}")
    };
    settled.await
}
