//! The kernel data paths in a guest kernel: boots a stock Debian kernel (nbd.ko, ublk_drv.ko)
//! under qemu (tests/vm/run.sh) and runs the guest scripts of tests/vm/guest/ against this
//! build's `ironhorn` binary: kernel NBD attach, ext4, engine SIGKILL and restart under the
//! mounted file system, fsck, detach, fio verify; the same through the ublk frontend; the
//! CSI node service staging, publishing and unstaging a volume through /dev/nbdN.
//!
//! Needs qemu-system-x86 and the unpacked kernel that tests/vm/setup.sh installs (.ci/run
//! runs it); without them the test fails and says so.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Guest scripts run, in order, in one boot.
const SCRIPTS: &[&str] = &["nbd", "ublk", "csi"];

/// Every check the scripts must report as passed: a script that stops early cannot pass.
const EXPECTED: &[&str] = &[
    "nbd-attach-idempotent",
    "nbd-discard-write-zeroes",
    "nbd-engine-restart-under-mount",
    "nbd-supervisor-restart-adopts",
    "nbd-fsck-clean",
    "nbd-detach",
    "nbd-fio-verify",
    "ublk-discard-write-zeroes",
    "ublk-engine-restart-under-mount",
    "ublk-fsck-clean",
    "ublk-clean-removal",
    "ublk-fio-verify",
    "csi-stage-kernel-nbd",
    "csi-publish-unstage-detaches",
    "csi-data-survives-restage",
];

/// The whole guest run (boot, every script) must end within this; run.sh kills qemu earlier.
const LIMIT: Duration = Duration::from_secs(600);

#[test]
fn guest_kernel_data_paths() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vm/run.sh");
    let started = Instant::now();
    let mut child = Command::new(script)
        .args(SCRIPTS)
        .env("IRONHORN_BIN", env!("CARGO_BIN_EXE_ironhorn"))
        // This test binary goes into the guest too: its csi_node_in_guest is the CSI client.
        .env(
            "IRONHORN_VM_TEST_BIN",
            std::env::current_exe().expect("path of this test binary"),
        )
        .env("VM_TIMEOUT", (LIMIT.as_secs() - 60).to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tests/vm/run.sh");
    let mut out = String::new();
    let mut err = String::new();
    let mut so = child.stdout.take().expect("stdout");
    let mut se = child.stderr.take().expect("stderr");
    let errs = std::thread::spawn(move || {
        let _ = se.read_to_string(&mut err);
        err
    });
    let _ = so.read_to_string(&mut out);
    let err = errs.join().expect("stderr reader");
    let status = child.wait().expect("wait for run.sh");
    println!("{out}");
    eprintln!("{err}");
    println!("guest run took {:.1} s", started.elapsed().as_secs_f64());
    assert!(
        status.success(),
        "guest run failed ({status}); see the console log above. If qemu or the kernel is \
         missing, run tests/vm/setup.sh (.ci/run does)"
    );
    for name in EXPECTED {
        assert!(
            out.lines().any(|l| l.trim() == format!("@@PASS {name}")),
            "guest check {name} did not report a pass"
        );
    }
    assert!(started.elapsed() < LIMIT, "guest run exceeded {LIMIT:?}");
}

/// The CSI node service through the kernel's nbd driver, inside the guest only:
/// tests/vm/guest/csi.sh starts `ironhorn csi --mode node --attach-scheme kernel-nbd` and an
/// engine, then runs this test binary (copied into the guest by run.sh) with `--ignored`.
/// Stage (attach /dev/nbdN, mkfs.ext4, mount) twice, publish, write through the pod's path,
/// unpublish, unstage (detached), stage again: the file is still there; unstage.
#[test]
#[ignore = "runs inside the guest kernel, started by tests/vm/guest/csi.sh"]
fn csi_node_in_guest() {
    use ironhorn_csi::pb;
    use ironhorn_csi::pb::node_client::NodeClient;
    use ironhorn_csi::pb::volume_capability::access_mode::Mode;
    use ironhorn_csi::pb::volume_capability::{AccessMode, AccessType, MountVolume};
    use std::collections::HashMap;
    use std::path::Path;

    let socket = std::env::var("IRONHORN_GUEST_CSI_SOCKET").expect(
        "only runs inside the guest (tests/vm/guest/csi.sh sets IRONHORN_GUEST_CSI_SOCKET)",
    );
    let uri = std::env::var("IRONHORN_GUEST_NBD_URI").expect("IRONHORN_GUEST_NBD_URI");
    let volume = "pvc-guest";
    let staging = "/tmp/csi/staging";
    let target = "/tmp/csi/pods/p1/volume";
    let cap = pb::VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: "ext4".into(),
            ..Default::default()
        })),
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
    };
    let stage_req = pb::NodeStageVolumeRequest {
        volume_id: volume.into(),
        publish_context: HashMap::from([("nbdUri".to_owned(), uri.clone())]),
        staging_target_path: staging.into(),
        volume_capability: Some(cap.clone()),
        ..Default::default()
    };
    let publish_req = pb::NodePublishVolumeRequest {
        volume_id: volume.into(),
        staging_target_path: staging.into(),
        target_path: target.into(),
        volume_capability: Some(cap),
        ..Default::default()
    };
    let unpublish_req = pb::NodeUnpublishVolumeRequest {
        volume_id: volume.into(),
        target_path: target.into(),
    };
    let unstage_req = pb::NodeUnstageVolumeRequest {
        volume_id: volume.into(),
        staging_target_path: staging.into(),
    };
    let mount_source = |path: &str| {
        ironhorn_csi::mount::mount_table()
            .expect("mount table")
            .into_iter()
            .find(|m| m.mount_point == Path::new(path))
            .map(|m| m.source)
    };
    let attached = || {
        ironhorn_csi::device::kernel_nbd::list()
            .expect("nbd devices")
            .into_iter()
            .filter(|d| d.backend.starts_with("ironhorn-csi:pvc-guest "))
            .count()
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let ch = ironhorn_csi::client::connect(Path::new(&socket))
            .await
            .expect("connect to the CSI socket");
        let mut node = NodeClient::new(ch);
        node.node_stage_volume(stage_req.clone())
            .await
            .expect("stage");
        node.node_stage_volume(stage_req.clone())
            .await
            .expect("stage again (idempotent)");
        let src = mount_source(staging).expect("staging path mounted");
        assert!(
            src.starts_with("/dev/nbd"),
            "staged from {src}, not /dev/nbdN"
        );
        assert_eq!(attached(), 1, "one kernel nbd attachment");
        println!("@@INFO csi staged from {src}");
        println!("@@PASS csi-stage-kernel-nbd");

        node.node_publish_volume(publish_req.clone())
            .await
            .expect("publish");
        let file = Path::new(target).join("hello");
        std::fs::write(&file, b"through the CSI node and /dev/nbd").expect("write in the pod path");
        std::fs::File::open(&file)
            .and_then(|f| f.sync_all())
            .expect("fsync");
        node.node_unpublish_volume(unpublish_req.clone())
            .await
            .expect("unpublish");
        node.node_unstage_volume(unstage_req.clone())
            .await
            .expect("unstage");
        assert!(mount_source(staging).is_none(), "staging still mounted");
        assert_eq!(attached(), 0, "nbd device still attached after unstage");
        println!("@@PASS csi-publish-unstage-detaches");

        node.node_stage_volume(stage_req.clone())
            .await
            .expect("stage after unstage");
        node.node_publish_volume(publish_req.clone())
            .await
            .expect("publish again");
        let back = std::fs::read(&file).expect("read the file back");
        assert_eq!(back, b"through the CSI node and /dev/nbd");
        node.node_unpublish_volume(unpublish_req)
            .await
            .expect("unpublish");
        node.node_unstage_volume(unstage_req)
            .await
            .expect("unstage");
        assert_eq!(attached(), 0, "nbd device still attached at the end");
        println!("@@PASS csi-data-survives-restage");
    });
}
