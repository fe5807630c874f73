//! `ironhorn agent`: the node agent. Registers the node and its disks with the manager,
//! runs the engine and replica processes the manager wants on this node, reports them.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;
use ironhorn_manager::agent::{AgentConfig, DiskConfig, SupervisorConfig};
use tokio_util::sync::CancellationToken;

/// Default port range of the instances an agent runs (two ports each).
pub const DEFAULT_PORTS: &str = "10000-10999";

/// Arguments of `ironhorn agent`.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Name of this node.
    #[arg(long, env = "IRONHORN_NODE")]
    node: String,

    /// A disk for replicas: a directory, optionally with tags (`/data/d1:ssd,fast`).
    /// Repeat for several disks.
    #[arg(long = "disk", required = true)]
    disks: Vec<String>,

    /// gRPC URL of the manager's agent service.
    #[arg(
        long,
        env = "IRONHORN_AGENT_MANAGER",
        default_value = "http://127.0.0.1:9501"
    )]
    manager: String,

    /// Bearer token of the manager.
    #[arg(long, env = "IRONHORN_TOKEN", hide_env_values = true)]
    token: Option<String>,

    /// Failure zone of this node.
    #[arg(long, env = "IRONHORN_ZONE", default_value = "")]
    zone: String,

    /// Host or IP the engines and replicas listen on and are reached at.
    #[arg(long, env = "IRONHORN_NODE_ADDRESS", default_value = "127.0.0.1")]
    address: String,

    /// Ports for the engines and replicas, FIRST-LAST (two per instance).
    #[arg(long, env = "IRONHORN_AGENT_PORTS", default_value = DEFAULT_PORTS)]
    ports: String,

    /// Directory for the agent's records, the instances' logs and NBD sockets.
    /// Default: `.agent` under the first disk.
    #[arg(long, env = "IRONHORN_AGENT_STATE_DIR")]
    state_dir: Option<PathBuf>,

    /// Stop the engines and replicas when the agent exits (by default they keep serving,
    /// and a restarted agent adopts them).
    #[arg(long)]
    stop_instances_on_exit: bool,

    /// Never expose volumes as ublk devices on this node, even when the kernel has the
    /// ublk driver (volumes with frontend `auto` then use NBD here).
    #[arg(long, env = "IRONHORN_NO_UBLK")]
    no_ublk: bool,
}

/// Parses `FIRST-LAST`.
pub fn parse_ports(s: &str) -> anyhow::Result<std::ops::RangeInclusive<u16>> {
    let (a, b) = s
        .split_once('-')
        .with_context(|| format!("bad port range {s:?}: expected FIRST-LAST"))?;
    let a: u16 = a
        .trim()
        .parse()
        .with_context(|| format!("bad port {a:?}"))?;
    let b: u16 = b
        .trim()
        .parse()
        .with_context(|| format!("bad port {b:?}"))?;
    if a == 0 || b <= a {
        bail!("bad port range {s:?}: FIRST must be at least 1 and below LAST");
    }
    Ok(a..=b)
}

impl AgentArgs {
    /// Runs the agent until SIGINT/SIGTERM; SIGUSR1 drains it (stops its engines).
    pub async fn run(self) -> anyhow::Result<()> {
        if self.node.is_empty()
            || !self
                .node
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        {
            bail!(
                "bad --node {:?}: use letters, digits, '-' and '.'",
                self.node
            );
        }
        let disks = self
            .disks
            .iter()
            .map(|d| DiskConfig::parse(d))
            .collect::<Result<Vec<_>, _>>()?;
        let state_dir = match self.state_dir {
            Some(d) => std::path::absolute(d)?,
            None => disks[0].path.join(".agent"),
        };
        let cfg = AgentConfig {
            node: self.node,
            zone: self.zone,
            disks,
            manager: self.manager,
            token: self.token,
            supervisor: SupervisorConfig {
                exe: std::env::current_exe().context("cannot find the ironhorn executable")?,
                state_dir,
                host: self.address,
                ports: parse_ports(&self.ports)?,
                ublk: !self.no_ublk,
            },
            stop_instances_on_exit: self.stop_instances_on_exit,
        };
        let shutdown = CancellationToken::new();
        let drain = CancellationToken::new();
        super::replica::spawn_signal_handler(shutdown.clone())?;
        {
            let drain = drain.clone();
            let mut usr1 =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())
                    .context("cannot watch SIGUSR1")?;
            tokio::spawn(async move {
                if usr1.recv().await.is_some() {
                    drain.cancel();
                }
            });
        }
        ironhorn_manager::agent::run(cfg, shutdown, drain).await?;
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges() {
        assert_eq!(parse_ports("10000-10999").unwrap(), 10000..=10999);
        assert!(parse_ports("10").is_err());
        assert!(parse_ports("9-3").is_err());
        assert!(parse_ports("0-3").is_err());
        assert!(parse_ports("a-3").is_err());
    }
}
