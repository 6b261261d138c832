use std::collections::HashMap;

use prost::Message;

use crate::csi::v1::{
    CapacityRange, CreateSnapshotRequest, CreateVolumeRequest, GetMetadataAllocatedResponse,
    GetMetadataDeltaRequest, ProbeResponse, TopologyRequirement, VolumeCapability,
    VolumeContentSource, volume_capability, volume_content_source,
};
use crate::{FILE_DESCRIPTOR_SET, SERVICE_NAMES};

fn mount_capability() -> VolumeCapability {
    VolumeCapability {
        access_type: Some(volume_capability::AccessType::Mount(
            volume_capability::MountVolume {
                fs_type: "ext4".into(),
                mount_flags: vec!["noatime".into()],
                volume_mount_group: String::new(),
            },
        )),
        access_mode: Some(volume_capability::AccessMode {
            mode: volume_capability::access_mode::Mode::SingleNodeWriter as i32,
        }),
    }
}

#[test]
fn create_volume_request_round_trips() {
    let request = CreateVolumeRequest {
        name: "pvc-1234".into(),
        capacity_range: Some(CapacityRange {
            required_bytes: 1 << 30,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![
            mount_capability(),
            VolumeCapability {
                access_type: Some(volume_capability::AccessType::Block(
                    volume_capability::BlockVolume {},
                )),
                access_mode: None,
            },
        ],
        parameters: HashMap::from([
            ("pool".to_string(), "fast".to_string()),
            ("fsType".to_string(), "xfs".to_string()),
        ]),
        secrets: HashMap::from([("token".to_string(), "s3cr3t".to_string())]),
        volume_content_source: Some(VolumeContentSource {
            r#type: Some(volume_content_source::Type::Snapshot(
                volume_content_source::SnapshotSource {
                    snapshot_id: "snap-1".into(),
                },
            )),
        }),
        accessibility_requirements: Some(TopologyRequirement::default()),
        mutable_parameters: HashMap::new(),
    };

    let bytes = request.encode_to_vec();
    let decoded = CreateVolumeRequest::decode(bytes.as_slice()).expect("decode");
    assert_eq!(decoded, request);
    assert_eq!(decoded.parameters["pool"], "fast");
    assert_eq!(
        decoded.volume_capabilities[0]
            .access_mode
            .as_ref()
            .map(|m| m.mode()),
        Some(volume_capability::access_mode::Mode::SingleNodeWriter)
    );
}

/// Appends a length-delimited field (wire type 2).
fn put_bytes(buf: &mut Vec<u8>, field: u8, data: &[u8]) {
    assert!(
        field < 16 && data.len() < 128,
        "test helper keeps to one-byte varints"
    );
    buf.push((field << 3) | 2);
    buf.push(data.len() as u8);
    buf.extend_from_slice(data);
}

#[test]
fn create_snapshot_request_decodes_spec_field_numbers() {
    // source_volume_id = 1, name = 2, secrets = 3 (map), parameters = 4 (map).
    let mut entry = Vec::new();
    put_bytes(&mut entry, 1, b"k");
    put_bytes(&mut entry, 2, b"v");

    let mut bytes = Vec::new();
    put_bytes(&mut bytes, 1, b"vol-1");
    put_bytes(&mut bytes, 2, b"snap-a");
    put_bytes(&mut bytes, 3, &entry);
    put_bytes(&mut bytes, 4, &entry);

    let request = CreateSnapshotRequest::decode(bytes.as_slice()).expect("decode");
    assert_eq!(request.source_volume_id, "vol-1");
    assert_eq!(request.name, "snap-a");
    assert_eq!(request.secrets.get("k").map(String::as_str), Some("v"));
    assert_eq!(request.parameters.get("k").map(String::as_str), Some("v"));
    assert!(request.accessibility_requirements.is_none());
}

#[test]
fn snapshot_metadata_messages_use_spec_field_numbers() {
    // GetMetadataDeltaRequest: base = 1, target = 2, starting_offset = 3 (varint),
    // max_results = 4 (varint).
    let mut bytes = Vec::new();
    put_bytes(&mut bytes, 1, b"base");
    put_bytes(&mut bytes, 2, b"target");
    bytes.extend_from_slice(&[3 << 3, 0x80, 0x20]); // 4096
    bytes.extend_from_slice(&[4 << 3, 7]);
    let request = GetMetadataDeltaRequest::decode(bytes.as_slice()).expect("decode");
    assert_eq!(request.base_snapshot_id, "base");
    assert_eq!(request.target_snapshot_id, "target");
    assert_eq!(request.starting_offset, 4096);
    assert_eq!(request.max_results, 7);

    // GetMetadataAllocatedResponse: type = 1 (enum), capacity = 2,
    // block_metadata = 3 {byte_offset = 1, size_bytes = 2}.
    let response = GetMetadataAllocatedResponse {
        block_metadata_type: crate::csi::v1::BlockMetadataType::VariableLength as i32,
        volume_capacity_bytes: 100,
        block_metadata: vec![crate::csi::v1::BlockMetadata {
            byte_offset: 8,
            size_bytes: 16,
        }],
    };
    assert_eq!(
        response.encode_to_vec(),
        [0x08, 2, 0x10, 100, 0x1a, 4, 0x08, 8, 0x10, 16]
    );
}

#[test]
fn probe_ready_is_a_bool_wrapper() {
    // ready = 1 holds a google.protobuf.BoolValue {value = 1}.
    let bytes = [0x0a, 2, 0x08, 1];
    let response = ProbeResponse::decode(bytes.as_slice()).expect("decode");
    assert_eq!(response.ready, Some(true));
    assert_eq!(ProbeResponse::default().encode_to_vec(), Vec::<u8>::new());
}

#[test]
fn descriptor_set_has_all_services_and_methods() {
    let set = prost_types::FileDescriptorSet::decode(FILE_DESCRIPTOR_SET).expect("decode set");
    let csi = set
        .file
        .iter()
        .find(|f| f.package() == "csi.v1")
        .expect("csi.v1 file in the set");
    for import in &csi.dependency {
        assert!(
            set.file.iter().any(|f| f.name() == import),
            "import {import} missing from the set"
        );
    }

    let expected: [(&str, &[&str]); 5] = [
        (
            "Identity",
            &["GetPluginInfo", "GetPluginCapabilities", "Probe"],
        ),
        (
            "Controller",
            &[
                "CreateVolume",
                "DeleteVolume",
                "ControllerPublishVolume",
                "ControllerUnpublishVolume",
                "ValidateVolumeCapabilities",
                "ListVolumes",
                "ControllerListVolumeHealth",
                "ControllerGetVolumeHealth",
                "GetCapacity",
                "ControllerGetCapabilities",
                "CreateSnapshot",
                "DeleteSnapshot",
                "ListSnapshots",
                "GetSnapshot",
                "ControllerExpandVolume",
                "ControllerGetVolume",
                "ControllerModifyVolume",
            ],
        ),
        (
            "GroupController",
            &[
                "GroupControllerGetCapabilities",
                "CreateVolumeGroupSnapshot",
                "DeleteVolumeGroupSnapshot",
                "GetVolumeGroupSnapshot",
            ],
        ),
        (
            "Node",
            &[
                "NodeStageVolume",
                "NodeUnstageVolume",
                "NodePublishVolume",
                "NodeUnpublishVolume",
                "NodeGetVolumeStats",
                "NodeGetVolumeHealth",
                "NodeGetStorageHealth",
                "NodeExpandVolume",
                "NodeGetCapabilities",
                "NodeGetInfo",
            ],
        ),
        (
            "SnapshotMetadata",
            &["GetMetadataAllocated", "GetMetadataDelta"],
        ),
    ];

    assert_eq!(csi.service.len(), expected.len());
    for (service, methods) in expected {
        assert!(SERVICE_NAMES.contains(&format!("csi.v1.{service}").as_str()));
        let found = csi
            .service
            .iter()
            .find(|s| s.name() == service)
            .unwrap_or_else(|| panic!("service {service} missing"));
        let names: Vec<&str> = found.method.iter().map(|m| m.name()).collect();
        assert_eq!(names, methods, "methods of {service}");
        for method in &found.method {
            // Only the SnapshotMetadata RPCs stream, and only server-side.
            assert!(!method.client_streaming());
            assert_eq!(method.server_streaming(), service == "SnapshotMetadata");
        }
    }
}
