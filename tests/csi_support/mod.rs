//! The CSI driver under test: `ironhorn csi` started on a unix socket in a temporary
//! directory, typed gRPC clients, and host cleanup.
//!
//! [`Csi::start`] runs the real binary (`--state-dir` inside its temporary directory) and
//! waits until Probe answers. Dropping a [`Csi`] undoes everything left on the host under
//! that directory — mounts (lazy unmount, deepest first), loop devices whose backing file
//! lies there, nbdfuse processes serving there — then kills the driver, so a failing test
//! leaves nothing behind. [`Csi::assert_host_clean`] checks that nothing is left without
//! that help (the driver must have cleaned up itself). [`cluster::ControlPlane`] runs a
//! manager and one agent for the controller tests.

#![allow(dead_code)]

pub mod cluster;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ironhorn_csi::pb;
use ironhorn_csi::pb::controller_client::ControllerClient;
use ironhorn_csi::pb::identity_client::IdentityClient;
use ironhorn_csi::pb::node_client::NodeClient;
use ironhorn_csi::pb::volume_capability::access_mode::Mode;
use ironhorn_csi::pb::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use tempfile::TempDir;
use tonic::transport::Channel;

/// How long the driver gets to answer Probe after it starts.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A running `ironhorn csi`, its temporary directory and clients.
pub struct Csi {
    child: Option<Child>,
    dir: TempDir,
    /// Runtime the gRPC clients run on.
    pub rt: tokio::runtime::Runtime,
    channel: Option<Channel>,
    args: Vec<String>,
}

impl Csi {
    /// Starts `ironhorn csi --mode MODE --node-id NODE_ID EXTRA…` and waits until it answers.
    #[track_caller]
    pub fn start(mode: &str, node_id: &str, extra: &[&str]) -> Csi {
        let dir = tempfile::Builder::new()
            .prefix("ironhorn-csi-test-")
            .tempdir()
            .expect("temporary directory");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let mut args: Vec<String> = vec![
            "--mode".into(),
            mode.into(),
            "--node-id".into(),
            node_id.into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut csi = Csi {
            child: None,
            channel: None,
            dir,
            rt,
            args,
        };
        csi.spawn();
        csi
    }

    /// Kills the driver and starts it again with the same arguments and state directory.
    #[track_caller]
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    #[track_caller]
    fn spawn(&mut self) {
        let socket = self.dir.path().join("csi.sock");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("csi.log"))
            .expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_ironhorn"))
            .arg("csi")
            .arg("--endpoint")
            .arg(format!("unix://{}", socket.display()))
            .arg("--state-dir")
            .arg(self.dir.path().join("state"))
            .args(&self.args)
            .env("RUST_LOG", "info,ironhorn_csi=debug")
            .env_remove("CSI_ENDPOINT")
            .env_remove("IRONHORN_NODE_ID")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start ironhorn csi");
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!("ironhorn csi exited ({status}):\n{}", self.log());
            }
            if socket.exists() {
                let attempt = self.rt.block_on(async {
                    let ch = ironhorn_csi::client::connect(&socket).await.ok()?;
                    IdentityClient::new(ch.clone())
                        .probe(pb::ProbeRequest {})
                        .await
                        .ok()?;
                    Some(ch)
                });
                if let Some(ch) = attempt {
                    self.channel = Some(ch);
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "ironhorn csi did not answer within {START_TIMEOUT:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The driver's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("csi.log")).unwrap_or_default()
    }

    /// The temporary directory (state, sockets, staging and target paths go inside).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A path inside the temporary directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn channel(&self) -> Channel {
        self.channel.clone().expect("connected in start")
    }

    /// Identity client.
    pub fn identity(&self) -> IdentityClient<Channel> {
        IdentityClient::new(self.channel())
    }

    /// Node client.
    pub fn node(&self) -> NodeClient<Channel> {
        NodeClient::new(self.channel())
    }

    /// Controller client.
    pub fn controller(&self) -> ControllerClient<Channel> {
        ControllerClient::new(self.channel())
    }

    /// Runs a future on the test's runtime.
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// Panics unless nothing is left on the host under the temporary directory: no mount,
    /// no loop device backed by a file there, no nbdfuse (or other) process serving there.
    #[track_caller]
    pub fn assert_host_clean(&self) {
        let dir = self.dir.path();
        let mounts = mounts_under(dir);
        assert!(mounts.is_empty(), "mounts left: {mounts:?}\n{}", self.log());
        let loops = loops_under(dir);
        assert!(
            loops.is_empty(),
            "loop devices left: {loops:?}\n{}",
            self.log()
        );
        let own = self.child.as_ref().map(Child::id);
        let procs: Vec<u32> = processes_under(dir)
            .into_iter()
            .filter(|p| Some(*p) != own)
            .collect();
        assert!(
            procs.is_empty(),
            "processes left: {procs:?}\n{}",
            self.log()
        );
    }

    /// Kills the driver (SIGKILL), leaving what it set up on the host.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Csi {
    fn drop(&mut self) {
        self.cleanup_host();
        self.kill();
    }
}

impl Csi {
    /// Undoes whatever is left on the host under the temporary directory (what a failing
    /// test or a killed driver leaves): loop devices, mounts, processes other than the
    /// driver. Bounded; errors are ignored.
    pub fn cleanup_host(&mut self) {
        let dir = self.dir.path().to_owned();
        // Loop devices first: once the FUSE mount under them is gone their backing file no
        // longer shows a path under `dir`.
        let loops = loops_under(&dir);
        let mut mounts = mounts_under(&dir);
        // Deepest first.
        mounts.sort_by_key(|m| std::cmp::Reverse(m.as_os_str().len()));
        for m in mounts {
            let _ = Command::new("umount").arg("-l").arg(&m).status();
        }
        for dev in loops {
            let _ = Command::new("losetup").arg("-d").arg(&dev).status();
        }
        let own = self.child.as_ref().map(Child::id);
        for pid in processes_under(&dir) {
            if Some(pid) != own {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// Mount points under `dir` (from /proc/self/mountinfo).
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let dir = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_owned());
    ironhorn_csi::mount::mount_table()
        .unwrap_or_default()
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|p| p.starts_with(&dir))
        .collect()
}

/// Loop devices whose backing file lies under `dir`.
pub fn loops_under(dir: &Path) -> Vec<PathBuf> {
    let dir = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_owned());
    let Ok(entries) = fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("loop"))
        .filter(|e| {
            fs::read_to_string(e.path().join("loop/backing_file"))
                .is_ok_and(|b| Path::new(b.trim_end()).starts_with(&dir))
        })
        .map(|e| Path::new("/dev").join(e.file_name()))
        .collect()
}

/// Processes whose command line names a path under `dir`.
pub fn processes_under(dir: &Path) -> Vec<u32> {
    let dir = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_owned());
    let needle = dir.as_os_str().as_encoded_bytes().to_vec();
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                c.split(|b| *b == 0)
                    .any(|arg| arg.windows(needle.len()).any(|w| w == needle.as_slice()))
            })
        })
        .collect()
}

/// A mount capability (`fs_type` may be empty) in SINGLE_NODE_WRITER mode.
pub fn mount_cap(fs_type: &str) -> pb::VolumeCapability {
    cap(
        AccessType::Mount(MountVolume {
            fs_type: fs_type.to_owned(),
            ..Default::default()
        }),
        Mode::SingleNodeWriter,
    )
}

/// A raw block capability in SINGLE_NODE_WRITER mode.
pub fn block_cap() -> pb::VolumeCapability {
    cap(AccessType::Block(BlockVolume {}), Mode::SingleNodeWriter)
}

/// A capability of `access` and `mode`.
pub fn cap(access: AccessType, mode: Mode) -> pb::VolumeCapability {
    pb::VolumeCapability {
        access_type: Some(access),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    }
}

/// Panics unless `result` is an error with `code`; returns its message.
#[track_caller]
pub fn expect_code<T: std::fmt::Debug>(
    result: Result<T, tonic::Status>,
    code: tonic::Code,
) -> String {
    match result {
        Ok(v) => panic!("expected {code:?}, got success: {v:?}"),
        Err(s) => {
            assert_eq!(s.code(), code, "wrong code; message: {}", s.message());
            s.message().to_owned()
        }
    }
}
