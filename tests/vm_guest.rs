//! The kernel data paths in a guest kernel: boots a stock Debian kernel (nbd.ko, ublk_drv.ko)
//! under qemu (tests/vm/run.sh) and runs the guest scripts of tests/vm/guest/ against this
//! build's `ironhorn` binary: kernel NBD attach, ext4, engine SIGKILL and restart under the
//! mounted file system, fsck, detach, fio verify; the same through the ublk frontend; the
//! CSI node service staging, publishing and unstaging a volume through /dev/nbdN; and the
//! whole control plane (manager, agents, CSI controller and nodes) choosing ublk on a node
//! whose kernel has it and kernel NBD on one that does not.
//!
//! Needs qemu-system-x86 and the unpacked kernel that tests/vm/setup.sh installs (.ci/run
//! runs it); without them the test fails and says so.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Guest scripts run, in order, in one boot.
const SCRIPTS: &[&str] = &["nbd", "ublk", "csi", "cluster"];

/// Every check the scripts must report as passed: a script that stops early cannot pass.
const EXPECTED: &[&str] = &[
    "nbd-attach-idempotent",
    "nbd-discard-write-zeroes",
    "nbd-engine-restart-under-mount",
    "nbd-supervisor-restart-adopts",
    "nbd-fsck-clean",
    "nbd-detach",
    "nbd-fio-verify",
    "nbd-grow-online",
    "ublk-discard-write-zeroes",
    "ublk-engine-restart-under-mount",
    "ublk-fsck-clean",
    "ublk-clean-removal",
    "ublk-fio-verify",
    "csi-stage-kernel-nbd",
    "csi-publish-unstage-detaches",
    "csi-data-survives-restage",
    "csi-expand-online-kernel-nbd",
    "cluster-auto-picks-ublk",
    "cluster-stage-publish-ublk",
    "cluster-engine-kill-ublk-recovers",
    "cluster-unpublish-removes-ublk",
    "cluster-auto-picks-nbd-without-ublk",
    "cluster-delete",
];

/// The whole guest run (boot, every script) must end within this; run.sh kills qemu earlier.
const LIMIT: Duration = Duration::from_secs(900);

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

/// A mounted ext4 volume for one node writer: the capability both guest CSI tests use.
fn ext4_single_writer() -> ironhorn_csi::pb::VolumeCapability {
    use ironhorn_csi::pb::volume_capability::access_mode::Mode;
    use ironhorn_csi::pb::volume_capability::{AccessMode, AccessType, MountVolume};
    ironhorn_csi::pb::VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: "ext4".into(),
            ..Default::default()
        })),
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
    }
}

/// What is mounted at `path`, if anything.
fn mount_source(path: &str) -> Option<String> {
    ironhorn_csi::mount::mount_table()
        .expect("mount table")
        .into_iter()
        .find(|m| m.mount_point == std::path::Path::new(path))
        .map(|m| m.source)
}

/// The runtime of a guest CSI client. libtest prints "test NAME ... " without a newline
/// first: a newline here starts the markers on a line of their own.
fn guest_runtime() -> tokio::runtime::Runtime {
    println!();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
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
    use std::collections::HashMap;
    use std::path::Path;

    let socket = std::env::var("IRONHORN_GUEST_CSI_SOCKET").expect(
        "only runs inside the guest (tests/vm/guest/csi.sh sets IRONHORN_GUEST_CSI_SOCKET)",
    );
    let uri = std::env::var("IRONHORN_GUEST_NBD_URI").expect("IRONHORN_GUEST_NBD_URI");
    let volume = "pvc-guest";
    let staging = "/tmp/csi/staging";
    let target = "/tmp/csi/pods/p1/volume";
    let cap = ext4_single_writer();
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
    let attached = || {
        ironhorn_csi::device::kernel_nbd::list()
            .expect("nbd devices")
            .into_iter()
            .filter(|d| d.backend.starts_with("ironhorn-csi:pvc-guest "))
            .count()
    };
    let rt = guest_runtime();
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
        println!("@@PASS csi-data-survives-restage");

        // Online expansion: the engine grows the volume (128 → 192 MiB), then
        // NodeExpandVolume grows /dev/nbdN through netlink and ext4 while mounted.
        let fs_bytes = |p: &str| {
            let st = nix::sys::statvfs::statvfs(p).expect("statvfs");
            st.blocks() as u64 * st.fragment_size() as u64
        };
        let before = fs_bytes(target);
        let engine = std::env::var("IRONHORN_GUEST_ENGINE_CTL").expect("IRONHORN_GUEST_ENGINE_CTL");
        let st = std::process::Command::new("ironhorn")
            .args(["engine", "ctl", "--engine", &engine, "expand", "192MiB"])
            .status()
            .expect("run ironhorn engine ctl expand");
        assert!(st.success(), "engine expand failed");
        let grown = node
            .node_expand_volume(pb::NodeExpandVolumeRequest {
                volume_id: volume.into(),
                volume_path: target.into(),
                capacity_range: Some(pb::CapacityRange {
                    required_bytes: 192 << 20,
                    limit_bytes: 0,
                }),
                staging_target_path: staging.into(),
                volume_capability: publish_req.volume_capability.clone(),
                ..Default::default()
            })
            .await
            .expect("expand the staged volume online")
            .into_inner();
        assert_eq!(
            grown.capacity_bytes,
            192 << 20,
            "device size after expansion"
        );
        let after = fs_bytes(target);
        assert!(
            after > before + (48 << 20),
            "ext4 did not grow online: {before} -> {after} bytes"
        );
        assert_eq!(
            std::fs::read(&file).expect("read the file after growing"),
            b"through the CSI node and /dev/nbd"
        );
        println!("@@INFO csi ext4 grew online from {before} to {after} bytes");
        println!("@@PASS csi-expand-online-kernel-nbd");
        node.node_unpublish_volume(unpublish_req)
            .await
            .expect("unpublish");
        node.node_unstage_volume(unstage_req)
            .await
            .expect("unstage");
        assert_eq!(attached(), 0, "nbd device still attached at the end");
    });
}

/// Process ids of the running `ironhorn engine serve --volume VOLUME` processes (read from
/// /proc; only meaningful inside the guest).
fn engine_pids(volume: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
            args.windows(2)
                .any(|w| w == [&b"engine"[..], &b"serve"[..]])
                && args
                    .windows(2)
                    .any(|w| w[0] == b"--volume" && w[1] == volume.as_bytes())
        })
        .collect()
}

/// What the CO does when a pod on `node` is gone: NodeUnpublish (when `target` is given),
/// NodeUnstage, ControllerUnpublish.
async fn release(
    ctl: &mut ironhorn_csi::pb::controller_client::ControllerClient<tonic::transport::Channel>,
    node_client: &mut ironhorn_csi::pb::node_client::NodeClient<tonic::transport::Channel>,
    volume: &str,
    node: &str,
    staging: &str,
    target: Option<&str>,
) {
    use ironhorn_csi::pb;
    if let Some(target) = target {
        node_client
            .node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
                volume_id: volume.into(),
                target_path: target.into(),
            })
            .await
            .expect("node unpublish");
    }
    node_client
        .node_unstage_volume(pb::NodeUnstageVolumeRequest {
            volume_id: volume.into(),
            staging_target_path: staging.into(),
        })
        .await
        .expect("node unstage");
    ctl.controller_unpublish_volume(pb::ControllerUnpublishVolumeRequest {
        volume_id: volume.into(),
        node_id: node.into(),
        ..Default::default()
    })
    .await
    .expect("controller unpublish");
}

/// Pseudo-random bytes (xorshift), so a file's content is known without storing it.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The frontend chosen through the whole control plane, inside the guest only:
/// tests/vm/guest/cluster.sh starts the manager, agents `node-1` (the kernel has ublk) and
/// `node-2` (`--no-ublk`), the CSI driver (controller + node) for node-1 and a CSI node for
/// node-2, then runs this test binary with `--ignored`. A volume created with the default
/// StorageClass frontend (`auto`) and published to node-1 must come as the engine's
/// `/dev/ublkbN`; it is staged, written, its engine SIGKILLed under the mounted filesystem
/// (the agent restarts it with the same ublk id and it recovers the device), the data
/// checked, and unpublishing removes the device. The same kind of volume published to
/// node-2 must come through kernel NBD instead.
#[test]
#[ignore = "runs inside the guest kernel, started by tests/vm/guest/cluster.sh"]
fn csi_cluster_in_guest() {
    use ironhorn_csi::pb;
    use ironhorn_csi::pb::controller_client::ControllerClient;
    use ironhorn_csi::pb::node_client::NodeClient;
    use std::collections::HashMap;
    use std::io::Write;
    use std::path::Path;

    let sock_a = std::env::var("IRONHORN_GUEST_CSI_A")
        .expect("only runs inside the guest (tests/vm/guest/cluster.sh sets IRONHORN_GUEST_CSI_A)");
    let sock_b = std::env::var("IRONHORN_GUEST_CSI_B").expect("IRONHORN_GUEST_CSI_B");
    let cap = ext4_single_writer();
    let create = |name: &str| pb::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(pb::CapacityRange {
            required_bytes: 64 << 20,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![cap.clone()],
        parameters: HashMap::from([("numberOfReplicas".to_owned(), "2".to_owned())]),
        ..Default::default()
    };
    let publish = |volume: &str, node: &str| pb::ControllerPublishVolumeRequest {
        volume_id: volume.into(),
        node_id: node.into(),
        volume_capability: Some(cap.clone()),
        ..Default::default()
    };
    let stage =
        |volume: &str, ctx: &HashMap<String, String>, staging: &str| pb::NodeStageVolumeRequest {
            volume_id: volume.into(),
            publish_context: ctx.clone(),
            staging_target_path: staging.into(),
            volume_capability: Some(cap.clone()),
            ..Default::default()
        };
    let node_publish = |volume: &str, staging: &str, target: &str| pb::NodePublishVolumeRequest {
        volume_id: volume.into(),
        staging_target_path: staging.into(),
        target_path: target.into(),
        volume_capability: Some(cap.clone()),
        ..Default::default()
    };
    let write_synced = |path: &Path, data: &[u8]| {
        let mut f = std::fs::File::create(path).expect("create a file on the volume");
        f.write_all(data).expect("write");
        f.sync_all().expect("fsync");
    };
    let rt = guest_runtime();
    rt.block_on(async {
        let ch_a = ironhorn_csi::client::connect(Path::new(&sock_a))
            .await
            .expect("connect to node-1's CSI socket");
        let ch_b = ironhorn_csi::client::connect(Path::new(&sock_b))
            .await
            .expect("connect to node-2's CSI socket");
        let mut ctl = ControllerClient::new(ch_a.clone());
        let mut node_a = NodeClient::new(ch_a);
        let mut node_b = NodeClient::new(ch_b);

        // node-1 has ublk: the default frontend (auto) serves the volume as /dev/ublkbN.
        let v1 = ctl
            .create_volume(create("pvc-ublk"))
            .await
            .expect("create volume 1")
            .into_inner()
            .volume
            .expect("a volume")
            .volume_id;
        let t = Instant::now();
        let ctx = ctl
            .controller_publish_volume(publish(&v1, "node-1"))
            .await
            .expect("publish volume 1 to node-1")
            .into_inner()
            .publish_context;
        println!(
            "@@INFO cluster publish to node-1 took {:.1} s: {ctx:?}",
            t.elapsed().as_secs_f64()
        );
        let dev = ctx
            .get("ublkDevice")
            .cloned()
            .expect("publish context names a ublk device on a node with ublk");
        assert!(dev.starts_with("/dev/ublkb"), "{dev}");
        assert!(ctx.contains_key("nbdUri"), "the NBD export is there too");
        println!("@@PASS cluster-auto-picks-ublk");

        let (staging, target) = ("/tmp/csi-a/staging/v1", "/tmp/csi-a/pods/p1/vol");
        node_a
            .node_stage_volume(stage(&v1, &ctx, staging))
            .await
            .expect("stage volume 1");
        node_a
            .node_stage_volume(stage(&v1, &ctx, staging))
            .await
            .expect("stage volume 1 again (idempotent)");
        assert_eq!(mount_source(staging).as_deref(), Some(dev.as_str()));
        node_a
            .node_publish_volume(node_publish(&v1, staging, target))
            .await
            .expect("publish volume 1 on node-1");
        let f1 = Path::new(target).join("before-kill");
        let data1 = pattern(1, 4 << 20);
        write_synced(&f1, &data1);
        println!("@@PASS cluster-stage-publish-ublk");

        // SIGKILL the engine under the mounted filesystem, and write while it is dead: the
        // kernel holds the I/O, the agent restarts the engine with the same ublk id, and
        // the restarted engine recovers the device and completes it.
        let before = engine_pids(&v1);
        assert_eq!(before.len(), 1, "one engine for volume 1: {before:?}");
        let killed = Instant::now();
        let st = std::process::Command::new("kill")
            .args(["-9", &before[0].to_string()])
            .status()
            .expect("run kill");
        assert!(st.success(), "kill -9 {}", before[0]);
        let f2 = Path::new(target).join("during-restart");
        let data2 = pattern(2, 2 << 20);
        let writer = {
            let (f2, data2) = (f2.clone(), data2.clone());
            std::thread::spawn(move || {
                let mut f = std::fs::File::create(&f2)?;
                f.write_all(&data2)?;
                f.sync_all()?;
                Ok::<_, std::io::Error>(killed.elapsed())
            })
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        let restarted = loop {
            let now = engine_pids(&v1);
            if let Some(p) = now.iter().find(|p| !before.contains(p)) {
                break *p;
            }
            assert!(Instant::now() < deadline, "the engine was not restarted");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        println!(
            "@@INFO cluster engine restarted as pid {restarted} {:.1} s after the kill",
            killed.elapsed().as_secs_f64()
        );
        while !writer.is_finished() {
            assert!(
                Instant::now() < deadline,
                "the write did not complete after the engine restart"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let took = writer
            .join()
            .expect("writer thread")
            .expect("write + fsync while the engine restarted");
        println!(
            "@@INFO cluster write during the engine restart completed {:.1} s after the kill",
            took.as_secs_f64()
        );
        assert_eq!(std::fs::read(&f1).expect("read file 1"), data1);
        assert_eq!(std::fs::read(&f2).expect("read file 2"), data2);
        assert_eq!(mount_source(staging).as_deref(), Some(dev.as_str()));
        println!("@@PASS cluster-engine-kill-ublk-recovers");

        release(&mut ctl, &mut node_a, &v1, "node-1", staging, Some(target)).await;
        let deadline = Instant::now() + Duration::from_secs(60);
        while Path::new(&dev).exists() {
            assert!(
                Instant::now() < deadline,
                "{dev} still there after unpublish"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        println!("@@PASS cluster-unpublish-removes-ublk");

        // node-2's agent runs with --no-ublk: the same default frontend gives kernel NBD.
        let v2 = ctl
            .create_volume(create("pvc-nbd"))
            .await
            .expect("create volume 2")
            .into_inner()
            .volume
            .expect("a volume")
            .volume_id;
        let ctx2 = ctl
            .controller_publish_volume(publish(&v2, "node-2"))
            .await
            .expect("publish volume 2 to node-2")
            .into_inner()
            .publish_context;
        assert!(
            !ctx2.contains_key("ublkDevice"),
            "no ublk device on a node without ublk: {ctx2:?}"
        );
        let staging2 = "/tmp/csi-b/staging/v2";
        node_b
            .node_stage_volume(stage(&v2, &ctx2, staging2))
            .await
            .expect("stage volume 2 on node-2");
        let src = mount_source(staging2).expect("volume 2 staged");
        assert!(src.starts_with("/dev/nbd"), "volume 2 staged from {src}");
        let f3 = Path::new(staging2).join("on-nbd");
        write_synced(&f3, b"node-2 has no ublk: kernel nbd");
        assert_eq!(
            std::fs::read(&f3).expect("read back"),
            b"node-2 has no ublk: kernel nbd"
        );
        release(&mut ctl, &mut node_b, &v2, "node-2", staging2, None).await;
        println!("@@INFO cluster volume 2 staged from {src}");
        println!("@@PASS cluster-auto-picks-nbd-without-ublk");

        for v in [&v1, &v2] {
            ctl.delete_volume(pb::DeleteVolumeRequest {
                volume_id: v.clone(),
                ..Default::default()
            })
            .await
            .expect("delete a volume");
        }
        println!("@@PASS cluster-delete");
    });
}
