//! `ironhorn manager`: the control plane — the embedded store under a data directory, the
//! REST API (and web UI), the agent service and the controllers.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use ironhorn_manager::controllers::{Registry, run_control_plane};
use ironhorn_manager::server::{DEFAULT_LISTEN, Manager, ManagerConfig};
use tokio_util::sync::CancellationToken;

/// Default address of the agent service.
pub const DEFAULT_AGENT_LISTEN: &str = "127.0.0.1:9501";

/// Arguments of `ironhorn manager`.
#[derive(Debug, Args)]
pub struct ManagerArgs {
    /// Directory of the store file and the API token.
    #[arg(
        long,
        env = "IRONHORN_MANAGER_DATA_DIR",
        default_value = "ironhorn-data/manager"
    )]
    data_dir: PathBuf,

    /// Address of the REST API and web UI.
    #[arg(long, env = "IRONHORN_MANAGER_LISTEN", default_value = DEFAULT_LISTEN)]
    listen: SocketAddr,

    /// Address of the agent service (gRPC) the node agents report to.
    #[arg(long, env = "IRONHORN_AGENT_LISTEN", default_value = DEFAULT_AGENT_LISTEN)]
    agent_listen: SocketAddr,

    /// API token to require (default: the one in DATA_DIR/token, generated at first start).
    #[arg(long, env = "IRONHORN_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

impl ManagerArgs {
    /// Runs the manager until SIGINT/SIGTERM.
    pub async fn run(self) -> anyhow::Result<()> {
        let manager = Manager::open(&ManagerConfig {
            data_dir: self.data_dir.clone(),
            listen: self.listen,
            token: self.token.clone(),
        })
        .await?;
        if manager.token_created() {
            println!(
                "API token (also in {}/token): {}",
                self.data_dir.display(),
                manager.token()
            );
        }
        let agents = tokio::net::TcpListener::bind(self.agent_listen)
            .await
            .with_context(|| format!("bind the agent service on {}", self.agent_listen))?;
        let shutdown = CancellationToken::new();
        super::replica::spawn_signal_handler(shutdown.clone())?;
        let control = tokio::spawn(run_control_plane(
            manager.store().clone(),
            Some(manager.token().to_owned()),
            agents,
            Registry::builtin(),
            shutdown.clone(),
        ));
        let served = manager
            .serve(ironhorn_manager::api::ui::router(), shutdown.clone())
            .await;
        shutdown.cancel();
        match control.await {
            Ok(Err(e)) => tracing::warn!(error = %e, "agent service"),
            Err(e) => tracing::warn!(error = %e, "control plane task"),
            Ok(Ok(())) => {}
        }
        served?;
        Ok(())
    }
}
