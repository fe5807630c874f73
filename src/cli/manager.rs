//! `ironhorn manager`: the control plane — the embedded store under a data directory, the
//! REST API (and web UI), the agent service and the controllers.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, ValueEnum};
use ironhorn_manager::controllers::{Registry, run_control_plane};
use ironhorn_manager::server::{DEFAULT_LISTEN, Manager, ManagerConfig};
use tokio_util::sync::CancellationToken;

/// Default address of the agent service.
pub const DEFAULT_AGENT_LISTEN: &str = "127.0.0.1:9501";

/// Where the manager keeps the resources.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StoreKind {
    /// A redb file under `--data-dir`.
    Embedded,
    /// CustomResources in the Kubernetes cluster (in-cluster service account, else the
    /// kubeconfig), with leader election on a Lease; the token comes from a Secret.
    Kubernetes,
}

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

    /// Where the resources live.
    #[arg(long, value_enum, env = "IRONHORN_STORE", default_value_t = StoreKind::Embedded)]
    store: StoreKind,

    /// Kubernetes store: namespace of the resources, the Lease and the token Secret
    /// (default: the kubeconfig's or the service account's).
    #[arg(long, env = "POD_NAMESPACE")]
    namespace: Option<String>,

    /// Kubernetes store: this manager's identity in the leader Lease (default: the host
    /// name, which is the pod name in a pod).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
}

impl ManagerArgs {
    /// Runs the manager until SIGINT/SIGTERM.
    pub async fn run(self) -> anyhow::Result<()> {
        if self.store == StoreKind::Kubernetes {
            return self.run_kubernetes().await;
        }
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

    /// `--store kubernetes`: see `ironhorn_manager::store::kubernetes_manager`.
    async fn run_kubernetes(self) -> anyhow::Result<()> {
        use ironhorn_manager::store::kubernetes_manager::{KubernetesManagerConfig, run};
        let identity = match self.identity.filter(|i| !i.is_empty()) {
            Some(i) => i,
            None => std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_default(),
        };
        anyhow::ensure!(!identity.is_empty(), "no --identity and no host name");
        let shutdown = CancellationToken::new();
        super::replica::spawn_signal_handler(shutdown.clone())?;
        run(
            KubernetesManagerConfig {
                namespace: self.namespace,
                listen: self.listen,
                agent_listen: self.agent_listen,
                token: self.token,
                identity,
            },
            shutdown,
        )
        .await
        .context("manager on the Kubernetes store")
    }
}
