//! `ironhorn csi`: the CSI driver (Identity + Controller and/or Node) on a unix socket.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, ValueEnum};
use ironhorn_csi::controller::backend::ManagerApi;
use ironhorn_csi::controller::manager::ManagerClient;
use ironhorn_csi::device::SchemeKind;
use ironhorn_csi::node::NodeConfig;
use ironhorn_csi::{DriverConfig, Mode, socket_path};
use tokio_util::sync::CancellationToken;

use super::replica::spawn_signal_handler;

/// Where attach schemes keep their per-volume state unless told otherwise.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/ironhorn/csi";

/// Which CSI services to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// Identity + Controller (talks to the manager).
    Controller,
    /// Identity + Node (attaches, formats and mounts volumes on this node).
    Node,
    /// All three.
    All,
}

/// How the node attaches a volume's NBD export as a block device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SchemeArg {
    /// nbdfuse + a loop device (no kernel nbd needed; volumes grow offline only).
    Nbdfuse,
    /// The kernel's nbd driver (/dev/nbdN).
    KernelNbd,
}

/// `ironhorn csi` arguments.
#[derive(Debug, Args)]
pub struct CsiArgs {
    /// Unix socket to serve CSI on: `unix:///PATH`.
    #[arg(long, env = "CSI_ENDPOINT")]
    endpoint: String,
    /// This node's id (the manager's node name).
    #[arg(long, env = "IRONHORN_NODE_ID")]
    node_id: String,
    /// Which services to run.
    #[arg(long, value_enum, default_value_t = ModeArg::All)]
    mode: ModeArg,
    /// Manager REST API base URL (controller service), e.g. `http://127.0.0.1:9500`.
    #[arg(long, env = "IRONHORN_MANAGER")]
    manager: Option<String>,
    /// Bearer token for the manager's API.
    #[arg(long, env = "IRONHORN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// How the node service attaches volumes.
    #[arg(long, value_enum, default_value_t = SchemeArg::Nbdfuse)]
    attach_scheme: SchemeArg,
    /// Directory for the attach scheme's per-volume state (FUSE mount points, pid files).
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// Zone of this node, reported as `topology.kubernetes.io/zone`.
    #[arg(long, env = "IRONHORN_ZONE")]
    zone: Option<String>,
    /// Most volumes the CO may put on this node (0 = no limit).
    #[arg(long, default_value_t = 0)]
    max_volumes: i64,
}

impl CsiArgs {
    /// Runs the driver until SIGINT/SIGTERM.
    pub async fn run(self) -> anyhow::Result<()> {
        let mode = match self.mode {
            ModeArg::Controller => Mode::Controller,
            ModeArg::Node => Mode::Node,
            ModeArg::All => Mode::All,
        };
        let manager: Option<Arc<dyn ManagerApi>> = match (&self.manager, mode.controller()) {
            (Some(url), true) => {
                let token = self.token.as_deref().unwrap_or_default();
                let client = ManagerClient::new(url, token)
                    .map_err(|e| anyhow::anyhow!("manager client for {url}: {e}"))?;
                Some(Arc::new(client))
            }
            (None, true) => anyhow::bail!("--manager URL is needed to run the controller service"),
            (_, false) => None,
        };
        let config = DriverConfig {
            socket: socket_path(&self.endpoint)?,
            mode,
            node: NodeConfig {
                node_id: self.node_id,
                zone: self.zone,
                max_volumes: self.max_volumes,
            },
            attach_scheme: match self.attach_scheme {
                SchemeArg::Nbdfuse => SchemeKind::Nbdfuse,
                SchemeArg::KernelNbd => SchemeKind::KernelNbd,
            },
            state_dir: self.state_dir,
            manager,
        };
        let shutdown = CancellationToken::new();
        spawn_signal_handler(shutdown.clone())?;
        ironhorn_csi::serve(config, shutdown)
            .await
            .context("csi driver")
    }
}
