//! The CSI driver in `--mode all` against a real ironhorn control plane (manager + one agent,
//! [`csi_support::cluster::ControlPlane`]): the Controller service's cases csi-sanity covers for its
//! capabilities, and the full path CreateVolume → ControllerPublish → NodeStage (mkfs.ext4
//! and mount through nbdfuse + loop) → NodePublish → write files → NodeGetVolumeStats →
//! expand → unpublish/unstage → DeleteVolume, leaving no mount, loop device or process.

mod common;
mod csi_support;

use std::collections::HashMap;
use std::time::Duration;

use csi_support::*;
use ironhorn_csi::pb;
use ironhorn_csi::pb::volume_capability::access_mode::Mode;
use ironhorn_csi::pb::volume_capability::{AccessType, MountVolume};
use tonic::Code;

const MIB: i64 = 1 << 20;

fn range(bytes: i64) -> Option<pb::CapacityRange> {
    Some(pb::CapacityRange {
        required_bytes: bytes,
        limit_bytes: 0,
    })
}

fn create_req(name: &str, bytes: i64) -> pb::CreateVolumeRequest {
    pb::CreateVolumeRequest {
        name: name.to_owned(),
        capacity_range: range(bytes),
        volume_capabilities: vec![mount_cap("ext4")],
        parameters: HashMap::from([
            ("numberOfReplicas".to_owned(), "1".to_owned()),
            ("staleReplicaTimeout".to_owned(), "30".to_owned()),
        ]),
        ..Default::default()
    }
}

#[test]
fn controller_and_full_path() {
    let cp = csi_support::cluster::ControlPlane::start();
    let csi = Csi::start(
        "all",
        "node-1",
        &["--manager", &cp.url, "--token", &cp.token],
    );
    let ctl = || csi.controller();
    let node = || csi.node();

    // Capabilities.
    let caps = csi
        .block_on(ctl().controller_get_capabilities(pb::ControllerGetCapabilitiesRequest {}))
        .expect("capabilities")
        .into_inner()
        .capabilities;
    use pb::controller_service_capability::rpc::Type as Rpc;
    let rpcs: Vec<i32> = caps
        .iter()
        .filter_map(|c| {
            c.r#type.as_ref().map(|t| match t {
                pb::controller_service_capability::Type::Rpc(r) => r.r#type,
            })
        })
        .collect();
    for want in [
        Rpc::CreateDeleteVolume,
        Rpc::PublishUnpublishVolume,
        Rpc::ListVolumes,
        Rpc::GetCapacity,
        Rpc::CreateDeleteSnapshot,
        Rpc::ListSnapshots,
        Rpc::ExpandVolume,
    ] {
        assert!(rpcs.contains(&(want as i32)), "{want:?} missing");
    }

    // CreateVolume: argument checks.
    let create = |r: pb::CreateVolumeRequest| csi.block_on(ctl().create_volume(r));
    expect_code(create(create_req("", 64 * MIB)), Code::InvalidArgument);
    let mut r = create_req("v-bad", 64 * MIB);
    r.volume_capabilities.clear();
    expect_code(create(r), Code::InvalidArgument);
    let mut r = create_req("v-bad", 64 * MIB);
    r.volume_capabilities = vec![cap(
        AccessType::Mount(MountVolume::default()),
        Mode::MultiNodeMultiWriter,
    )];
    expect_code(create(r), Code::InvalidArgument);
    let mut r = create_req("v-bad", 64 * MIB);
    r.parameters.insert("replicas".into(), "3".into());
    expect_code(create(r), Code::InvalidArgument);
    let mut r = create_req("v-bad", 64 * MIB);
    r.capacity_range = Some(pb::CapacityRange {
        required_bytes: 64 * MIB,
        limit_bytes: 32 * MIB,
    });
    expect_code(create(r), Code::OutOfRange);
    let mut r = create_req("v-bad", 64 * MIB);
    r.volume_content_source = Some(pb::VolumeContentSource {
        r#type: Some(pb::volume_content_source::Type::Volume(
            pb::volume_content_source::VolumeSource {
                volume_id: "x".into(),
            },
        )),
    });
    expect_code(create(r), Code::InvalidArgument);

    // Replicas only on disks tagged `nvme`, and no disk has that tag: the scheduler cannot
    // place them, the volume is removed again, RESOURCE_EXHAUSTED.
    let mut r = create_req("no-such-disk", 32 * MIB);
    r.parameters.insert("diskSelector".into(), "nvme".into());
    let msg = expect_code(create(r), Code::ResourceExhausted);
    assert!(msg.contains("no-such-disk"), "{msg}");
    // More replicas than nodes is refused by the manager outright.
    let mut r = create_req("too-many-replicas", 32 * MIB);
    r.parameters.insert("numberOfReplicas".into(), "3".into());
    expect_code(create(r), Code::InvalidArgument);

    // CreateVolume: idempotent by name; another size under the same name is refused.
    let name = "Sanity Volume 1";
    let v1 = create(create_req(name, 64 * MIB))
        .expect("create")
        .into_inner()
        .volume
        .expect("volume");
    assert_eq!(v1.capacity_bytes, 64 * MIB);
    let again = create(create_req(name, 64 * MIB))
        .expect("create again")
        .into_inner()
        .volume
        .expect("volume");
    assert_eq!(again.volume_id, v1.volume_id);
    expect_code(create(create_req(name, 256 * MIB)), Code::AlreadyExists);
    let vol = v1.volume_id.clone();
    assert!(vol.starts_with("csi-"), "{vol}");

    // ValidateVolumeCapabilities.
    let validate = |id: &str, caps: Vec<pb::VolumeCapability>| {
        csi.block_on(
            ctl().validate_volume_capabilities(pb::ValidateVolumeCapabilitiesRequest {
                volume_id: id.into(),
                volume_capabilities: caps,
                ..Default::default()
            }),
        )
    };
    expect_code(validate("nope", vec![mount_cap("")]), Code::NotFound);
    expect_code(validate(&vol, vec![]), Code::InvalidArgument);
    assert!(
        validate(&vol, vec![mount_cap("ext4"), block_cap()])
            .expect("validate")
            .into_inner()
            .confirmed
            .is_some()
    );
    let multi = cap(
        AccessType::Block(Default::default()),
        Mode::MultiNodeMultiWriter,
    );
    assert!(
        validate(&vol, vec![multi])
            .expect("validate")
            .into_inner()
            .confirmed
            .is_none()
    );

    // ListVolumes with pages; GetCapacity.
    let v2 = create(create_req("sanity-volume-2", 32 * MIB))
        .expect("create second")
        .into_inner()
        .volume
        .expect("volume")
        .volume_id;
    let list = |max: i32, token: &str| {
        csi.block_on(ctl().list_volumes(pb::ListVolumesRequest {
            max_entries: max,
            starting_token: token.into(),
        }))
    };
    let first = list(1, "").expect("list").into_inner();
    assert_eq!(first.entries.len(), 1);
    assert!(!first.next_token.is_empty());
    let rest = list(0, &first.next_token).expect("list rest").into_inner();
    let mut ids: Vec<String> = first
        .entries
        .iter()
        .chain(rest.entries.iter())
        .filter_map(|e| e.volume.as_ref().map(|v| v.volume_id.clone()))
        .collect();
    ids.sort();
    let mut want = vec![vol.clone(), v2.clone()];
    want.sort();
    assert_eq!(ids, want);
    expect_code(list(1, "not-a-token"), Code::Aborted);
    let capacity = csi
        .block_on(ctl().get_capacity(pb::GetCapacityRequest::default()))
        .expect("capacity")
        .into_inner();
    assert!(capacity.available_capacity > 0, "{capacity:?}");

    // ControllerPublishVolume.
    let publish = |id: &str, node_id: &str| {
        csi.block_on(
            ctl().controller_publish_volume(pb::ControllerPublishVolumeRequest {
                volume_id: id.into(),
                node_id: node_id.into(),
                volume_capability: Some(mount_cap("ext4")),
                ..Default::default()
            }),
        )
    };
    expect_code(publish("", "node-1"), Code::InvalidArgument);
    expect_code(publish(&vol, ""), Code::InvalidArgument);
    expect_code(publish("nope", "node-1"), Code::NotFound);
    expect_code(publish(&vol, "node-9"), Code::NotFound);
    let ctx = publish(&vol, "node-1")
        .expect("publish")
        .into_inner()
        .publish_context;
    let uri = ctx["nbdUri"].clone();
    assert!(uri.starts_with("nbd://"), "{uri}");
    assert_eq!(
        publish(&vol, "node-1")
            .expect("publish again")
            .into_inner()
            .publish_context,
        ctx
    );

    // The node: stage (mkfs.ext4 + mount through nbdfuse + loop), publish, write, stats.
    let staging = csi.path("staging");
    let target = csi.path("pods/p1/volume");
    let stage = pb::NodeStageVolumeRequest {
        volume_id: vol.clone(),
        publish_context: ctx.clone(),
        staging_target_path: staging.to_string_lossy().into_owned(),
        volume_capability: Some(mount_cap("ext4")),
        volume_context: v1.volume_context.clone(),
        ..Default::default()
    };
    let node_publish = pb::NodePublishVolumeRequest {
        volume_id: vol.clone(),
        publish_context: ctx.clone(),
        staging_target_path: staging.to_string_lossy().into_owned(),
        target_path: target.to_string_lossy().into_owned(),
        volume_capability: Some(mount_cap("ext4")),
        ..Default::default()
    };
    csi.block_on(node().node_stage_volume(stage.clone()))
        .expect("stage");
    csi.block_on(node().node_publish_volume(node_publish.clone()))
        .expect("node publish");
    let data = common::random_bytes(3 << 20, 11);
    std::fs::write(target.join("data.bin"), &data).expect("write");
    std::fs::write(target.join("hello.txt"), b"through the manager").expect("write");
    let stats = |path: &std::path::Path| {
        csi.block_on(node().node_get_volume_stats(pb::NodeGetVolumeStatsRequest {
            volume_id: vol.clone(),
            volume_path: path.to_string_lossy().into_owned(),
            staging_target_path: String::new(),
        }))
        .expect("stats")
        .into_inner()
    };
    let bytes = |s: &pb::NodeGetVolumeStatsResponse| {
        s.usage
            .iter()
            .find(|u| u.unit == pb::volume_usage::Unit::Bytes as i32)
            .map(|u| (u.total, u.used))
            .expect("bytes")
    };
    let (total_before, used) = bytes(&stats(&target));
    assert!(total_before > 32 * MIB && total_before <= 64 * MIB);
    assert!(used >= 3 * MIB);

    // Snapshots: create (idempotent), list by id and by volume, name clash, delete.
    let snap_req = |volume: &str| pb::CreateSnapshotRequest {
        source_volume_id: volume.into(),
        name: "Sanity Snapshot".into(),
        parameters: HashMap::from([("type".to_owned(), "snap".to_owned())]),
        ..Default::default()
    };
    expect_code(
        csi.block_on(ctl().create_snapshot(pb::CreateSnapshotRequest {
            source_volume_id: vol.clone(),
            ..Default::default()
        })),
        Code::InvalidArgument,
    );
    expect_code(
        csi.block_on(ctl().create_snapshot(snap_req("nope"))),
        Code::NotFound,
    );
    let snap = csi
        .block_on(ctl().create_snapshot(snap_req(&vol)))
        .expect("snapshot")
        .into_inner()
        .snapshot
        .expect("snapshot");
    assert_eq!(snap.source_volume_id, vol);
    assert!(
        snap.snapshot_id.starts_with(&format!("snap/{vol}/")),
        "{snap:?}"
    );
    let snap_again = csi
        .block_on(ctl().create_snapshot(snap_req(&vol)))
        .expect("snapshot again")
        .into_inner()
        .snapshot
        .expect("snapshot");
    assert_eq!(snap_again.snapshot_id, snap.snapshot_id);
    expect_code(
        csi.block_on(ctl().create_snapshot(snap_req(&v2))),
        Code::AlreadyExists,
    );
    common::wait_until(Duration::from_secs(60), "snapshot ready", || {
        csi.block_on(ctl().list_snapshots(pb::ListSnapshotsRequest {
            snapshot_id: snap.snapshot_id.clone(),
            ..Default::default()
        }))
        .is_ok_and(|r| {
            let e = r.into_inner().entries;
            e.len() == 1 && e[0].snapshot.as_ref().is_some_and(|s| s.ready_to_use)
        })
    });
    let by_volume = csi
        .block_on(ctl().list_snapshots(pb::ListSnapshotsRequest {
            source_volume_id: vol.clone(),
            ..Default::default()
        }))
        .expect("list by volume")
        .into_inner()
        .entries;
    assert!(by_volume.iter().any(|e| {
        e.snapshot
            .as_ref()
            .is_some_and(|s| s.snapshot_id == snap.snapshot_id)
    }));
    let none = csi
        .block_on(ctl().list_snapshots(pb::ListSnapshotsRequest {
            snapshot_id: "snap/nope/nope".into(),
            ..Default::default()
        }))
        .expect("list unknown")
        .into_inner()
        .entries;
    assert!(none.is_empty());
    for _ in 0..2 {
        csi.block_on(ctl().delete_snapshot(pb::DeleteSnapshotRequest {
            snapshot_id: snap.snapshot_id.clone(),
            ..Default::default()
        }))
        .expect("delete snapshot");
    }

    // Expansion: the controller grows the volume; nbdfuse cannot grow the attached device
    // (FAILED_PRECONDITION), so unpublish, unstage, detach, attach and stage again: the
    // filesystem grows at stage, NodeExpandVolume confirms the size.
    let expand = |bytes: i64| {
        csi.block_on(
            ctl().controller_expand_volume(pb::ControllerExpandVolumeRequest {
                volume_id: vol.clone(),
                capacity_range: range(bytes),
                volume_capability: Some(mount_cap("ext4")),
                ..Default::default()
            }),
        )
    };
    expect_code(
        csi.block_on(
            ctl().controller_expand_volume(pb::ControllerExpandVolumeRequest {
                volume_id: "nope".into(),
                capacity_range: range(128 * MIB),
                ..Default::default()
            }),
        ),
        Code::NotFound,
    );
    let grown = expand(128 * MIB).expect("expand").into_inner();
    assert_eq!(grown.capacity_bytes, 128 * MIB);
    assert!(grown.node_expansion_required);
    assert_eq!(
        expand(128 * MIB)
            .expect("expand again")
            .into_inner()
            .capacity_bytes,
        128 * MIB
    );
    let node_expand = pb::NodeExpandVolumeRequest {
        volume_id: vol.clone(),
        volume_path: target.to_string_lossy().into_owned(),
        capacity_range: range(128 * MIB),
        volume_capability: Some(mount_cap("ext4")),
        ..Default::default()
    };
    expect_code(
        csi.block_on(node().node_expand_volume(node_expand.clone())),
        Code::FailedPrecondition,
    );
    let unpublish_all = || {
        csi.block_on(
            node().node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
                volume_id: vol.clone(),
                target_path: target.to_string_lossy().into_owned(),
            }),
        )
        .expect("node unpublish");
        csi.block_on(node().node_unstage_volume(pb::NodeUnstageVolumeRequest {
            volume_id: vol.clone(),
            staging_target_path: staging.to_string_lossy().into_owned(),
        }))
        .expect("node unstage");
        for _ in 0..2 {
            csi.block_on(
                ctl().controller_unpublish_volume(pb::ControllerUnpublishVolumeRequest {
                    volume_id: vol.clone(),
                    node_id: "node-1".into(),
                    ..Default::default()
                }),
            )
            .expect("controller unpublish");
        }
    };
    // A published volume cannot be deleted.
    expect_code(
        csi.block_on(ctl().delete_volume(pb::DeleteVolumeRequest {
            volume_id: vol.clone(),
            ..Default::default()
        })),
        Code::FailedPrecondition,
    );
    unpublish_all();
    let ctx = publish(&vol, "node-1")
        .expect("publish after expand")
        .into_inner()
        .publish_context;
    let mut stage = stage;
    stage.publish_context = ctx.clone();
    let mut node_publish = node_publish;
    node_publish.publish_context = ctx;
    csi.block_on(node().node_stage_volume(stage))
        .expect("stage after expand");
    csi.block_on(node().node_publish_volume(node_publish))
        .expect("node publish after expand");
    let expanded = csi
        .block_on(node().node_expand_volume(node_expand))
        .expect("node expand")
        .into_inner();
    assert_eq!(expanded.capacity_bytes, 128 * MIB);
    let (total_after, _) = bytes(&stats(&target));
    assert!(
        total_after > total_before + 32 * MIB,
        "{total_before} -> {total_after}"
    );
    assert!(std::fs::read(target.join("data.bin")).expect("read") == data);
    assert_eq!(
        std::fs::read(target.join("hello.txt")).expect("read"),
        b"through the manager"
    );

    // Tear down: unpublish everywhere, delete both volumes (twice: idempotent).
    unpublish_all();
    csi.assert_host_clean();
    for id in [&vol, &v2, &vol] {
        csi.block_on(ctl().delete_volume(pb::DeleteVolumeRequest {
            volume_id: id.to_string(),
            ..Default::default()
        }))
        .expect("delete volume");
    }
    common::wait_until(Duration::from_secs(60), "volumes gone", || {
        csi.block_on(ctl().list_volumes(pb::ListVolumesRequest::default()))
            .is_ok_and(|r| r.into_inner().entries.is_empty())
    });
    csi.assert_host_clean();
}
