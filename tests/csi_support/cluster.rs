//! A one-node ironhorn control plane for the CSI controller tests: `ironhorn manager`
//! (embedded store) and one `ironhorn agent` (node `node-1`, one disk), in a temporary
//! directory, on 127.0.0.1 ports picked free; the minimum free-space percentage is set
//! to 0 so the host disk's fill level does not decide scheduling.
//!
//! Dropping it stops the agent with SIGTERM (it runs with `--stop-instances-on-exit`, so
//! its engines and replicas stop too), kills whatever process still names the directory,
//! then stops the manager.

use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tempfile::TempDir;

use super::processes_under;
use crate::common::{Process, bin, wait_for};

/// Name of the cluster's node.
pub const NODE: &str = "node-1";
/// Ports the agent may give its engines and replicas.
const AGENT_PORTS: u16 = 40;

/// A port nothing listens on now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

/// `n` consecutive free ports below the ephemeral range.
fn free_range(n: u16) -> u16 {
    let mut x = (u64::from(std::process::id()) << 20)
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() as u64)
            .unwrap_or(7)
        | 1;
    for _ in 0..500 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let base = 20000 + (x % 12000) as u16;
        if (base..base + n).all(|p| TcpListener::bind(("127.0.0.1", p)).is_ok()) {
            return base;
        }
    }
    panic!("no free range of {n} ports");
}

/// A manager and one agent.
pub struct ControlPlane {
    /// `http://127.0.0.1:PORT` of the REST API.
    pub url: String,
    /// The API's bearer token.
    pub token: String,
    agent: Option<Process>,
    manager: Option<Process>,
    dir: TempDir,
}

impl ControlPlane {
    /// Starts the manager and the agent and waits until the node has a schedulable disk.
    #[track_caller]
    pub fn start() -> ControlPlane {
        let dir = tempfile::Builder::new()
            .prefix("ironhorn-csi-cp-")
            .tempdir()
            .expect("temporary directory");
        let api = format!("127.0.0.1:{}", free_port());
        let agent_listen = format!("127.0.0.1:{}", free_port());
        let mdir = dir.path().join("manager");
        let mut cmd = Command::new(bin());
        cmd.arg("manager")
            .arg("--data-dir")
            .arg(&mdir)
            .args(["--listen", &api, "--agent-listen", &agent_listen])
            .env_remove("IRONHORN_TOKEN");
        let (manager, ()) = Process::spawn("manager", &mut cmd, |line| {
            line.contains("agent service listening").then_some(())
        })
        .unwrap_or_else(|e| panic!("{}", e.message));
        let mut cp = ControlPlane {
            url: format!("http://{api}"),
            token: String::new(),
            agent: None,
            manager: Some(manager),
            dir,
        };
        cp.token = wait_for(Duration::from_secs(30), "the manager's token", || {
            std::fs::read_to_string(mdir.join("token")).map(|t| t.trim().to_owned())
        });
        let base = free_range(AGENT_PORTS);
        let node_dir = cp.dir.path().join(NODE);
        let mut cmd = Command::new(bin());
        cmd.args(["agent", "--node", NODE])
            .arg("--disk")
            .arg(node_dir.join("disk"))
            .arg("--manager")
            .arg(format!("http://{agent_listen}"))
            .arg("--ports")
            .arg(format!("{base}-{}", base + AGENT_PORTS - 1))
            .arg("--state-dir")
            .arg(node_dir.join("agent"))
            .arg("--stop-instances-on-exit")
            .env("IRONHORN_TOKEN", &cp.token)
            .env_remove("IRONHORN_MANAGER")
            .env_remove("IRONHORN_NODE");
        let (agent, ()) = Process::spawn(NODE, &mut cmd, |line| {
            line.contains("agent running").then_some(())
        })
        .unwrap_or_else(|e| panic!("{}", e.message));
        cp.agent = Some(agent);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let client =
            ironhorn_manager::client::Client::new(&cp.url, cp.token.clone()).expect("client");
        wait_for(
            Duration::from_secs(30),
            "node-1 with a schedulable disk",
            || {
                let node = rt
                    .block_on(client.get_node(NODE))
                    .map_err(|e| e.to_string())?;
                let ok = node
                    .status
                    .as_ref()
                    .is_some_and(|s| s.disks.values().any(|d| d.schedulable));
                if ok {
                    Ok(())
                } else {
                    Err(format!("{:?}", node.status))
                }
            },
        );
        // The tests' volumes are small and sparse: do not let the free space left on the
        // machine's disk (shared with everything else) decide whether they can be placed.
        rt.block_on(client.set_setting("storage-minimal-available-percentage", "0"))
            .expect("set storage-minimal-available-percentage");
        cp
    }

    /// The control plane's directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if let Some(mut a) = self.agent.take() {
            a.terminate();
        }
        for pid in processes_under(self.dir.path()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        if let Some(mut m) = self.manager.take() {
            m.terminate();
        }
    }
}
