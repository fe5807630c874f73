//! The CSI Identity and Node services of `ironhorn csi --mode node`, driven by a gRPC
//! client over the unix socket, against a real engine and replicas (tests/common) and the
//! real host tools: nbdfuse + loop devices, mkfs.ext4/mkfs.xfs, mount, resize2fs.
//!
//! Covered (the csi-sanity cases for these capabilities, and more):
//! - `identity_and_node_info`: plugin name/version, capabilities (no controller in node
//!   mode, offline expansion with nbdfuse, topology), probe, node capabilities, node info
//!   with topology and zone.
//! - `node_argument_checks`: missing ids/paths/capabilities, unsupported access modes and
//!   filesystems, bad export URIs (INVALID_ARGUMENT); publish before stage
//!   (FAILED_PRECONDITION); stats/expand of missing paths or unattached volumes
//!   (NOT_FOUND); unstage/unpublish of unknown volumes succeed (idempotent).
//! - `ext4_stage_publish_stats_expand`: the full node path — stage (attach through
//!   nbdfuse + loop, mkfs.ext4, mount) twice, publish read-write and read-only (twice
//!   each), write files, stats, grow the volume in the engine, online NodeExpandVolume
//!   refused with nbdfuse, unpublish/unstage, stage again (the device shows the new size),
//!   NodeExpandVolume (resize2fs), files intact, clean up; nothing left on the host.
//! - `raw_block_then_xfs`: a raw block volume published as a device file (write/read it
//!   back through the engine), then the same volume staged as xfs with mkfs options.
//! - `driver_restart_keeps_volumes`: a driver killed and started again finds the volume's
//!   device (no second attach), publishes and unstages it (stopping the nbdfuse it did not
//!   start); a dead nbdfuse shows as an abnormal volume condition; a driver killed with
//!   volumes staged leaves state the test cleanup removes.
//! - `concurrent_stages_of_one_volume`: parallel stages of one volume succeed or get
//!   ABORTED (the per-volume guard), and leave one device and one mount.
//! - `failed_stage_undoes_attach`: mkfs failing, and a filesystem other than the one
//!   asked, both leave no attachment behind; a later stage works.

mod common;
mod csi_support;

use std::collections::HashMap;
use std::process::Command;

use common::*;
use csi_support::*;
use ironhorn_csi::pb;
use ironhorn_csi::pb::volume_capability::access_mode::Mode;
use ironhorn_csi::pb::volume_capability::{AccessType, MountVolume};
use tonic::Code;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;
/// mkfs.xfs wants at least 300 MB.
const XFS_SIZE: u64 = 320 * MIB;

fn publish_context(uri: &str) -> HashMap<String, String> {
    HashMap::from([("nbdUri".to_owned(), uri.to_owned())])
}

fn stage_req(
    volume: &str,
    uri: &str,
    staging: &std::path::Path,
    cap: pb::VolumeCapability,
) -> pb::NodeStageVolumeRequest {
    pb::NodeStageVolumeRequest {
        volume_id: volume.to_owned(),
        publish_context: publish_context(uri),
        staging_target_path: staging.to_string_lossy().into_owned(),
        volume_capability: Some(cap),
        ..Default::default()
    }
}

fn publish_req(
    volume: &str,
    staging: &std::path::Path,
    target: &std::path::Path,
    cap: pb::VolumeCapability,
    readonly: bool,
) -> pb::NodePublishVolumeRequest {
    pb::NodePublishVolumeRequest {
        volume_id: volume.to_owned(),
        staging_target_path: staging.to_string_lossy().into_owned(),
        target_path: target.to_string_lossy().into_owned(),
        volume_capability: Some(cap),
        readonly,
        ..Default::default()
    }
}

fn unstage(csi: &Csi, volume: &str, staging: &std::path::Path) {
    csi.block_on(
        csi.node()
            .node_unstage_volume(pb::NodeUnstageVolumeRequest {
                volume_id: volume.to_owned(),
                staging_target_path: staging.to_string_lossy().into_owned(),
            }),
    )
    .expect("unstage");
}

fn unpublish(csi: &Csi, volume: &str, target: &std::path::Path) {
    csi.block_on(
        csi.node()
            .node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
                volume_id: volume.to_owned(),
                target_path: target.to_string_lossy().into_owned(),
            }),
    )
    .expect("unpublish");
}

fn stats(csi: &Csi, volume: &str, path: &std::path::Path) -> pb::NodeGetVolumeStatsResponse {
    csi.block_on(
        csi.node()
            .node_get_volume_stats(pb::NodeGetVolumeStatsRequest {
                volume_id: volume.to_owned(),
                volume_path: path.to_string_lossy().into_owned(),
                staging_target_path: String::new(),
            }),
    )
    .expect("stats")
    .into_inner()
}

fn bytes_usage(s: &pb::NodeGetVolumeStatsResponse) -> &pb::VolumeUsage {
    s.usage
        .iter()
        .find(|u| u.unit == pb::volume_usage::Unit::Bytes as i32)
        .expect("a bytes usage")
}

fn mount_source(path: &std::path::Path) -> Option<ironhorn_csi::mount::MountEntry> {
    ironhorn_csi::mount::mounted_at(path).expect("mount table")
}

#[test]
fn identity_and_node_info() {
    let csi = Csi::start(
        "node",
        "node-a",
        &["--zone", "zone-1", "--max-volumes", "7"],
    );
    let info = csi
        .block_on(csi.identity().get_plugin_info(pb::GetPluginInfoRequest {}))
        .expect("plugin info")
        .into_inner();
    assert_eq!(info.name, "driver.ironhorn.io");
    assert!(!info.vendor_version.is_empty());

    let caps = csi
        .block_on(
            csi.identity()
                .get_plugin_capabilities(pb::GetPluginCapabilitiesRequest {}),
        )
        .expect("plugin capabilities")
        .into_inner()
        .capabilities;
    use pb::plugin_capability::{Type, service, volume_expansion};
    let services: Vec<i32> = caps
        .iter()
        .filter_map(|c| match &c.r#type {
            Some(Type::Service(s)) => Some(s.r#type),
            _ => None,
        })
        .collect();
    assert_eq!(
        services,
        [service::Type::VolumeAccessibilityConstraints as i32],
        "node mode serves no controller"
    );
    let expansion: Vec<i32> = caps
        .iter()
        .filter_map(|c| match &c.r#type {
            Some(Type::VolumeExpansion(e)) => Some(e.r#type),
            _ => None,
        })
        .collect();
    assert_eq!(expansion, [volume_expansion::Type::Offline as i32]);

    let probe = csi
        .block_on(csi.identity().probe(pb::ProbeRequest {}))
        .expect("probe")
        .into_inner();
    assert_eq!(probe.ready, Some(true));

    let node_caps = csi
        .block_on(
            csi.node()
                .node_get_capabilities(pb::NodeGetCapabilitiesRequest {}),
        )
        .expect("node capabilities")
        .into_inner()
        .capabilities;
    use pb::node_service_capability::rpc::Type as Rpc;
    let rpcs: Vec<i32> = node_caps
        .iter()
        .filter_map(|c| {
            c.r#type.as_ref().map(|t| match t {
                pb::node_service_capability::Type::Rpc(r) => r.r#type,
            })
        })
        .collect();
    for want in [
        Rpc::StageUnstageVolume,
        Rpc::GetVolumeStats,
        Rpc::ExpandVolume,
    ] {
        assert!(
            rpcs.contains(&(want as i32)),
            "{want:?} missing from {rpcs:?}"
        );
    }

    let node = csi
        .block_on(csi.node().node_get_info(pb::NodeGetInfoRequest {}))
        .expect("node info")
        .into_inner();
    assert_eq!(node.node_id, "node-a");
    assert_eq!(node.max_volumes_per_node, 7);
    let segments = node.accessible_topology.expect("topology").segments;
    assert_eq!(segments["topology.ironhorn.io/node"], "node-a");
    assert_eq!(segments["topology.kubernetes.io/zone"], "zone-1");

    // The controller service is not served in node mode.
    expect_code(
        csi.block_on(
            csi.controller()
                .controller_get_capabilities(pb::ControllerGetCapabilitiesRequest {}),
        ),
        Code::Unimplemented,
    );
    drop(csi);
}

#[test]
fn node_argument_checks() {
    let csi = Csi::start("node", "node-a", &[]);
    let staging = csi.path("staging");
    let target = csi.path("target");
    let uri = "nbd://127.0.0.1:1/vol";
    let node = || csi.node();
    let stage = |req: pb::NodeStageVolumeRequest| csi.block_on(node().node_stage_volume(req));

    // Stage: every required field, supported modes and filesystems, a usable URI.
    let mut r = stage_req("", uri, &staging, mount_cap("ext4"));
    expect_code(stage(r.clone()), Code::InvalidArgument);
    r.volume_id = "v1".into();
    r.staging_target_path.clear();
    expect_code(stage(r), Code::InvalidArgument);
    let mut r = stage_req("v1", uri, &staging, mount_cap("ext4"));
    r.volume_capability = None;
    expect_code(stage(r), Code::InvalidArgument);
    let mut r = stage_req("v1", uri, &staging, mount_cap("ext4"));
    r.publish_context.clear();
    let msg = expect_code(stage(r), Code::InvalidArgument);
    assert!(msg.contains("nbdUri"), "{msg}");
    let multi = cap(
        AccessType::Mount(MountVolume::default()),
        Mode::MultiNodeMultiWriter,
    );
    expect_code(
        stage(stage_req("v1", uri, &staging, multi)),
        Code::InvalidArgument,
    );
    expect_code(
        stage(stage_req("v1", uri, &staging, mount_cap("ntfs"))),
        Code::InvalidArgument,
    );
    let mut r = stage_req("v1", uri, &staging, mount_cap(""));
    r.volume_context.insert("fsType".into(), "btrfs".into());
    expect_code(stage(r), Code::InvalidArgument);
    expect_code(
        stage(stage_req("v1", "http://x/y", &staging, mount_cap("ext4"))),
        Code::InvalidArgument,
    );

    // Publish: required fields; a volume that is not staged.
    let publish = |req| csi.block_on(node().node_publish_volume(req));
    let mut r = publish_req("v1", &staging, &target, mount_cap("ext4"), false);
    r.target_path.clear();
    expect_code(publish(r), Code::InvalidArgument);
    let mut r = publish_req("v1", &staging, &target, mount_cap("ext4"), false);
    r.staging_target_path.clear();
    expect_code(publish(r), Code::InvalidArgument);
    let mut r = publish_req("v1", &staging, &target, mount_cap("ext4"), false);
    r.volume_capability = None;
    expect_code(publish(r), Code::InvalidArgument);
    expect_code(
        publish(publish_req(
            "v1",
            &staging,
            &target,
            mount_cap("ext4"),
            false,
        )),
        Code::FailedPrecondition,
    );
    expect_code(
        publish(publish_req("v1", &staging, &target, block_cap(), false)),
        Code::FailedPrecondition,
    );
    assert!(!target.exists(), "a refused publish created the target");

    // Unpublish and unstage of what is not there succeed; missing fields do not.
    unpublish(&csi, "v1", &target);
    unstage(&csi, "v1", &staging);
    expect_code(
        csi.block_on(
            node().node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
                volume_id: "v1".into(),
                target_path: String::new(),
            }),
        ),
        Code::InvalidArgument,
    );
    expect_code(
        csi.block_on(node().node_unstage_volume(pb::NodeUnstageVolumeRequest {
            volume_id: String::new(),
            staging_target_path: staging.to_string_lossy().into_owned(),
        })),
        Code::InvalidArgument,
    );

    // Stats and expand: missing path, path that holds no volume, unattached volume.
    let stats_of = |v: &str, p: &str| {
        csi.block_on(node().node_get_volume_stats(pb::NodeGetVolumeStatsRequest {
            volume_id: v.into(),
            volume_path: p.into(),
            staging_target_path: String::new(),
        }))
    };
    expect_code(stats_of("v1", ""), Code::InvalidArgument);
    expect_code(stats_of("", "/tmp"), Code::InvalidArgument);
    expect_code(stats_of("v1", "/nonexistent/path"), Code::NotFound);
    std::fs::create_dir_all(csi.path("plain")).expect("dir");
    expect_code(
        stats_of("v1", &csi.path("plain").to_string_lossy()),
        Code::NotFound,
    );
    let expand = |v: &str, p: &str| {
        csi.block_on(node().node_expand_volume(pb::NodeExpandVolumeRequest {
            volume_id: v.into(),
            volume_path: p.into(),
            capacity_range: Some(pb::CapacityRange {
                required_bytes: (2 * SIZE) as i64,
                limit_bytes: 0,
            }),
            ..Default::default()
        }))
    };
    expect_code(expand("", "/tmp"), Code::InvalidArgument);
    expect_code(expand("v1", ""), Code::InvalidArgument);
    expect_code(expand("v1", "/nonexistent/path"), Code::NotFound);
    expect_code(
        expand("v1", &csi.path("plain").to_string_lossy()),
        Code::NotFound,
    );
    csi.assert_host_clean();
}

#[test]
fn ext4_stage_publish_stats_expand() {
    let c = Cluster::start(2, SIZE);
    let csi = Csi::start("node", "node-a", &[]);
    let volume = "pvc-ext4";
    let staging = csi.path("staging");
    let target = csi.path("pods/p1/volume");
    let target_ro = csi.path("pods/p2/volume");
    let node = || csi.node();

    // Stage twice: the second is a no-op.
    let mut req = stage_req(volume, &c.uri(), &staging, mount_cap("ext4"));
    req.volume_context
        .insert("mkfsParams".into(), "-L ihtest".into());
    csi.block_on(node().node_stage_volume(req.clone()))
        .expect("stage");
    let staged = mount_source(&staging).expect("staging path mounted");
    assert_eq!(staged.fs_type, "ext4");
    assert!(staged.source.starts_with("/dev/loop"), "{staged:?}");
    let label = run_ok(
        Command::new("blkid").args(["-o", "value", "-s", "LABEL", &staged.source]),
        30,
    );
    assert_eq!(label.stdout.trim(), "ihtest", "mkfsParams were not used");
    csi.block_on(node().node_stage_volume(req.clone()))
        .expect("stage again");
    assert_eq!(
        ironhorn_csi::mount::mount_table()
            .expect("table")
            .iter()
            .filter(|m| m.mount_point == staged.mount_point)
            .count(),
        1,
        "a second stage mounted again"
    );
    // The same staging path with another volume's export is refused.
    expect_code(
        csi.block_on(node().node_stage_volume(stage_req(
            "other",
            &c.uri(),
            &staging,
            mount_cap("ext4"),
        ))),
        Code::AlreadyExists,
    );

    // Publish read-write and read-only, each twice.
    let rw = publish_req(volume, &staging, &target, mount_cap("ext4"), false);
    let ro = publish_req(volume, &staging, &target_ro, mount_cap("ext4"), true);
    for r in [&rw, &rw, &ro, &ro] {
        csi.block_on(node().node_publish_volume(r.clone()))
            .expect("publish");
    }
    // The read-write target again, now asking read-only: a conflict.
    expect_code(
        csi.block_on(node().node_publish_volume(publish_req(
            volume,
            &staging,
            &target,
            mount_cap("ext4"),
            true,
        ))),
        Code::AlreadyExists,
    );
    assert!(mount_source(&target_ro).expect("ro mounted").read_only());
    assert!(!mount_source(&target).expect("rw mounted").read_only());

    // Write files through the read-write target; they show in the read-only one.
    let data = random_bytes(5 * MIB as usize, 7);
    std::fs::create_dir_all(target.join("dir")).expect("mkdir");
    std::fs::write(target.join("dir/data.bin"), &data).expect("write");
    std::fs::write(target.join("small.txt"), b"hello ironhorn").expect("write");
    run_ok(Command::new("sync").arg("-f").arg(&target), 60);
    assert!(
        std::fs::read(target_ro.join("dir/data.bin")).expect("read ro") == data,
        "the read-only target shows other bytes"
    );
    assert!(
        std::fs::write(target_ro.join("nope"), b"x").is_err(),
        "the read-only target took a write"
    );

    // Stats: bytes and inodes of the filesystem.
    let s = stats(&csi, volume, &target);
    let b = bytes_usage(&s);
    assert!(
        b.total > (SIZE / 2) as i64 && b.total <= SIZE as i64,
        "{s:?}"
    );
    assert!(b.used >= 5 * MIB as i64, "{s:?}");
    assert!(b.available > 0 && b.available < b.total, "{s:?}");
    assert!(
        s.usage
            .iter()
            .any(|u| u.unit == pb::volume_usage::Unit::Inodes as i32 && u.used > 0)
    );
    let total_before = b.total;
    assert!(!s.volume_condition.as_ref().expect("condition").abnormal);

    // Grow the volume in the engine. nbdfuse cannot grow an attached device: online
    // expansion is refused with FAILED_PRECONDITION (the plugin reports OFFLINE expansion).
    let new_size = 2 * SIZE;
    c.ctl_json(&["expand", &new_size.to_string()]);
    let expand_req = pb::NodeExpandVolumeRequest {
        volume_id: volume.into(),
        volume_path: target.to_string_lossy().into_owned(),
        capacity_range: Some(pb::CapacityRange {
            required_bytes: new_size as i64,
            limit_bytes: 0,
        }),
        volume_capability: Some(mount_cap("ext4")),
        ..Default::default()
    };
    let msg = expect_code(
        csi.block_on(node().node_expand_volume(expand_req.clone())),
        Code::FailedPrecondition,
    );
    assert!(msg.contains("unstage"), "{msg}");

    // Unpublish and unstage (twice each), then stage again: the device is the new size.
    for t in [&target, &target, &target_ro] {
        unpublish(&csi, volume, t);
    }
    assert!(
        !target.exists() && !target_ro.exists(),
        "targets not removed"
    );
    unstage(&csi, volume, &staging);
    unstage(&csi, volume, &staging);
    csi.assert_host_clean();

    csi.block_on(node().node_stage_volume(req.clone()))
        .expect("stage after expand");
    csi.block_on(node().node_publish_volume(rw.clone()))
        .expect("publish after expand");
    let grown = csi
        .block_on(node().node_expand_volume(expand_req))
        .expect("expand")
        .into_inner();
    assert_eq!(grown.capacity_bytes, new_size as i64);
    let s = stats(&csi, volume, &target);
    assert!(
        bytes_usage(&s).total > total_before + (SIZE / 2) as i64,
        "filesystem did not grow: {total_before} -> {s:?}"
    );
    assert!(
        std::fs::read(target.join("dir/data.bin")).expect("read after expand") == data,
        "data changed across the expansion"
    );
    assert_eq!(
        std::fs::read(target.join("small.txt")).expect("read"),
        b"hello ironhorn"
    );
    // Writes after the growth land beyond the old end.
    std::fs::write(target.join("more.bin"), random_bytes(40 * MIB as usize, 8))
        .expect("write more");

    unpublish(&csi, volume, &target);
    unstage(&csi, volume, &staging);
    csi.assert_host_clean();

    // What was written is on the replicas: fsck through a fresh attach is clean.
    let dev_check = csi.path("check");
    csi.block_on(node().node_stage_volume(stage_req(volume, &c.uri(), &dev_check, block_cap())))
        .expect("stage block for fsck");
    let att_dev = ironhorn_csi::device::nbdfuse::Nbdfuse::new(&csi.path("state"));
    let dev = ironhorn_csi::device::AttachScheme::find(&att_dev, volume)
        .expect("find")
        .expect("attached")
        .device;
    let fsck = run_with_timeout(Command::new("fsck.ext4").arg("-fn").arg(&dev), 120);
    assert_eq!(fsck.code(), Some(0), "fsck found problems: {fsck}");
    unstage(&csi, volume, &dev_check);
    csi.assert_host_clean();
}

#[test]
fn raw_block_then_xfs() {
    let c = Cluster::start(2, XFS_SIZE);
    let csi = Csi::start("node", "node-a", &[]);
    let volume = "pvc-block";
    let staging = csi.path("staging");
    let target = csi.path("pods/p1/dev/vol");
    let node = || csi.node();

    csi.block_on(node().node_stage_volume(stage_req(volume, &c.uri(), &staging, block_cap())))
        .expect("stage block");
    assert!(
        mount_source(&staging).is_none(),
        "a block stage mounts nothing"
    );
    let publish = publish_req(volume, &staging, &target, block_cap(), false);
    csi.block_on(node().node_publish_volume(publish.clone()))
        .expect("publish block");
    csi.block_on(node().node_publish_volume(publish))
        .expect("publish block again");
    // Write through the published device file, read it back through the engine.
    let data = random_bytes(MIB as usize, 3);
    let src = csi.path("data.bin");
    std::fs::write(&src, &data).expect("write source");
    run_ok(
        Command::new("dd")
            .arg(format!("if={}", src.display()))
            .arg(format!("of={}", target.display()))
            .args(["bs=1M", "seek=2", "oflag=direct", "conv=fsync,notrunc"]),
        60,
    );
    let image = csi.path("image.bin");
    nbd_export_to_file(&c.uri(), &image);
    let image = std::fs::read(&image).expect("read image");
    let back = &image[2 * MIB as usize..3 * MIB as usize];
    assert!(
        back == data.as_slice(),
        "the engine holds other bytes at 2 MiB (first difference at {:?})",
        first_difference_in(back, &data)
    );
    let s = stats(&csi, volume, &target);
    assert_eq!(bytes_usage(&s).total, XFS_SIZE as i64);
    unpublish(&csi, volume, &target);
    assert!(!target.exists());
    unstage(&csi, volume, &staging);
    csi.assert_host_clean();

    // The same volume as xfs, filesystem type from the StorageClass, with mkfs options.
    let mut req = stage_req(volume, &c.uri(), &staging, mount_cap(""));
    req.volume_context.insert("fsType".into(), "xfs".into());
    req.volume_context
        .insert("mkfsParams".into(), "-L ihxfs".into());
    csi.block_on(node().node_stage_volume(req))
        .expect("stage xfs");
    let m = mount_source(&staging).expect("mounted");
    assert_eq!(m.fs_type, "xfs");
    let label = run_ok(
        Command::new("blkid").args(["-o", "value", "-s", "LABEL", &m.source]),
        30,
    );
    assert_eq!(label.stdout.trim(), "ihxfs");
    let target = csi.path("pods/p2/volume");
    csi.block_on(node().node_publish_volume(publish_req(
        volume,
        &staging,
        &target,
        mount_cap("xfs"),
        false,
    )))
    .expect("publish xfs");
    std::fs::write(target.join("f"), random_bytes(MIB as usize, 4)).expect("write");
    let s = stats(&csi, volume, &target);
    assert!(bytes_usage(&s).used >= MIB as i64, "{s:?}");
    unpublish(&csi, volume, &target);
    unstage(&csi, volume, &staging);
    csi.assert_host_clean();
}

#[test]
fn failed_stage_undoes_attach() {
    let c = Cluster::start(1, SIZE);
    let csi = Csi::start("node", "node-a", &[]);
    let volume = "pvc-fail";
    let staging = csi.path("staging");
    let node = || csi.node();

    // mkfs fails on an option it does not know: the attach is undone.
    let mut bad = stage_req(volume, &c.uri(), &staging, mount_cap("ext4"));
    bad.volume_context
        .insert("mkfsParams".into(), "--no-such-mkfs-option".into());
    let msg = expect_code(csi.block_on(node().node_stage_volume(bad)), Code::Internal);
    assert!(msg.contains("mkfs.ext4"), "{msg}");
    csi.assert_host_clean();

    // A good stage creates ext4; unstage.
    let good = stage_req(volume, &c.uri(), &staging, mount_cap("ext4"));
    csi.block_on(node().node_stage_volume(good.clone()))
        .expect("stage");
    unstage(&csi, volume, &staging);

    // Asking for xfs on a device that holds ext4 is refused, the data left alone, and the
    // attach undone.
    let msg = expect_code(
        csi.block_on(node().node_stage_volume(stage_req(
            volume,
            &c.uri(),
            &staging,
            mount_cap("xfs"),
        ))),
        Code::FailedPrecondition,
    );
    assert!(msg.contains("ext4"), "{msg}");
    csi.assert_host_clean();

    // An export nobody serves: the attach fails and leaves nothing.
    let dead = stage_req(
        "pvc-dead",
        "nbd://127.0.0.1:1/none",
        &staging,
        mount_cap("ext4"),
    );
    expect_code(csi.block_on(node().node_stage_volume(dead)), Code::Internal);
    csi.assert_host_clean();

    // The ext4 is still there and stages fine.
    csi.block_on(node().node_stage_volume(good))
        .expect("stage again");
    assert_eq!(mount_source(&staging).expect("mounted").fs_type, "ext4");
    unstage(&csi, volume, &staging);
    csi.assert_host_clean();
}

#[test]
fn driver_restart_keeps_volumes() {
    let c = Cluster::start(1, SIZE);
    let mut csi = Csi::start("node", "node-a", &[]);
    let volume = "pvc-restart";
    let staging = csi.path("staging");
    let target = csi.path("pods/p1/volume");
    let stage = stage_req(volume, &c.uri(), &staging, mount_cap("ext4"));
    let publish = publish_req(volume, &staging, &target, mount_cap("ext4"), false);
    csi.block_on(csi.node().node_stage_volume(stage.clone()))
        .expect("stage");
    csi.block_on(csi.node().node_publish_volume(publish.clone()))
        .expect("publish");
    std::fs::write(target.join("kept.txt"), b"across restarts").expect("write");
    let loops = loops_under(csi.dir());
    assert_eq!(loops.len(), 1, "{loops:?}");

    // Killed and started again: the volume stays mounted, and the new driver finds it.
    csi.restart();
    csi.block_on(csi.node().node_stage_volume(stage.clone()))
        .expect("stage after restart");
    csi.block_on(csi.node().node_publish_volume(publish.clone()))
        .expect("publish after restart");
    assert_eq!(loops_under(csi.dir()), loops, "a second attach was made");
    assert_eq!(
        std::fs::read(target.join("kept.txt")).expect("read"),
        b"across restarts"
    );
    unpublish(&csi, volume, &target);
    unstage(&csi, volume, &staging);
    csi.assert_host_clean();

    // Killed with the volume staged and published: the test's cleanup removes it all.
    csi.block_on(csi.node().node_stage_volume(stage))
        .expect("stage");
    csi.block_on(csi.node().node_publish_volume(publish))
        .expect("publish");
    assert!(
        !stats(&csi, volume, &target)
            .volume_condition
            .expect("condition")
            .abnormal
    );
    // nbdfuse dies: the volume condition says so.
    let pidfile = csi.path(&format!("state/nbdfuse/{volume}/nbdfuse.pid"));
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .expect("pid file")
        .trim()
        .parse()
        .expect("pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill nbdfuse");
    wait_until(std::time::Duration::from_secs(10), "nbdfuse gone", || {
        !std::path::Path::new(&format!("/proc/{pid}/cmdline")).exists()
            || std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.is_empty())
    });
    let condition = stats(&csi, volume, &target)
        .volume_condition
        .expect("condition");
    assert!(condition.abnormal, "{condition:?}");
    assert!(condition.message.contains("nbdfuse"), "{condition:?}");
    csi.kill();
    assert!(!mounts_under(csi.dir()).is_empty());
    csi.cleanup_host();
    csi.assert_host_clean();
}

#[test]
fn concurrent_stages_of_one_volume() {
    let c = Cluster::start(1, SIZE);
    let csi = Csi::start("node", "node-a", &[]);
    let volume = "pvc-race";
    let staging = csi.path("staging");
    let req = stage_req(volume, &c.uri(), &staging, mount_cap("ext4"));
    // Four stages of the same volume at once: each either succeeds or is told to retry
    // (ABORTED) while another holds the volume; one device, one mount in the end.
    let results = csi.block_on(async {
        let calls: Vec<_> = (0..4)
            .map(|_| {
                let mut node = csi.node();
                let req = req.clone();
                tokio::spawn(async move { node.node_stage_volume(req).await })
            })
            .collect();
        let mut results = Vec::new();
        for c in calls {
            results.push(c.await.expect("task"));
        }
        results
    });
    let mut ok = 0;
    for r in &results {
        match r {
            Ok(_) => ok += 1,
            Err(s) => assert_eq!(s.code(), Code::Aborted, "{s:?}"),
        }
    }
    assert!(ok >= 1, "{results:?}");
    // Whatever was refused succeeds on retry.
    csi.block_on(csi.node().node_stage_volume(req))
        .expect("stage again");
    assert_eq!(loops_under(csi.dir()).len(), 1);
    assert_eq!(
        ironhorn_csi::mount::mount_table()
            .expect("table")
            .iter()
            .filter(|m| m.mount_point == staging)
            .count(),
        1
    );
    unstage(&csi, volume, &staging);
    csi.assert_host_clean();
}
