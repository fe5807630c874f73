//! The node agent (DESIGN.md §1): one per node. It reports the node, its disks and its
//! engine and replica processes to the manager on a period, and converges those processes
//! to the set the manager answers with (level-triggered, so a lost report or a manager
//! restart costs nothing but one period).
//!
//! - [`disks`]: `--disk PATH[:tag,tag]`, capacity, free space and health.
//! - [`instances`]: the processes: start in their own process group, watch, restart with
//!   back-off, stop, re-adopt after an agent restart.
//! - [`service`]: the manager's side of the gRPC service: records reports in the store
//!   and answers with the node's desired instances.
//!
//! While the manager cannot be reached, the agent keeps every instance running (and
//! restarts those that crash); it only stops an instance that a successful answer no longer
//! lists.

pub mod disks;
pub mod instances;
pub mod service;

use std::time::{Duration, Instant};

use ironhorn_proto::agent::agent_manager_client::AgentManagerClient;
use ironhorn_proto::agent::{NodeDesired, NodeReport};
use tokio_util::sync::CancellationToken;
use tonic::transport::Endpoint;
use tracing::{info, warn};

pub use disks::DiskConfig;
pub use instances::{Supervisor, SupervisorConfig};

/// Report period until the manager says otherwise.
pub const DEFAULT_REPORT_INTERVAL: Duration = Duration::from_secs(1);
/// Time one report may take.
pub const REPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// Metadata key of the bearer token on agent calls.
pub const AUTHORIZATION: &str = "authorization";

/// Errors of the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The manager URL does not parse.
    #[error("bad manager URL {url:?}: {source}")]
    ManagerUrl {
        /// The URL.
        url: String,
        /// Why.
        source: tonic::transport::Error,
    },
    /// The token cannot travel in a header.
    #[error("the token holds characters that cannot go in a header")]
    Token,
    /// The supervisor could not open its state.
    #[error(transparent)]
    Instances(#[from] instances::InstanceError),
}

/// What one agent runs with.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Node name.
    pub node: String,
    /// Failure zone of the node (may be empty).
    pub zone: String,
    /// Disks of the node.
    pub disks: Vec<DiskConfig>,
    /// gRPC URL of the manager's agent service (`http://HOST:PORT`).
    pub manager: String,
    /// Bearer token for the manager, if it wants one.
    pub token: Option<String>,
    /// How processes are run.
    pub supervisor: SupervisorConfig,
    /// On exit, stop the instances (otherwise they keep serving).
    pub stop_instances_on_exit: bool,
}

/// Runs the agent until `shutdown`; `drain` (optional) asks it to stop its engines and no
/// longer start anything (the first step of an orderly stop of a whole cluster).
pub async fn run(
    cfg: AgentConfig,
    shutdown: CancellationToken,
    drain: CancellationToken,
) -> Result<(), AgentError> {
    let started_ms = jiff::Timestamp::now().as_millisecond();
    let channel = Endpoint::from_shared(cfg.manager.clone())
        .map_err(|source| AgentError::ManagerUrl {
            url: cfg.manager.clone(),
            source,
        })?
        .connect_timeout(Duration::from_secs(2))
        .timeout(REPORT_TIMEOUT)
        .connect_lazy();
    let token = match &cfg.token {
        Some(t) => Some(
            format!("Bearer {t}")
                .parse::<tonic::metadata::MetadataValue<_>>()
                .map_err(|_| AgentError::Token)?,
        ),
        None => None,
    };
    let mut client = AgentManagerClient::new(channel);
    let mut sup = Supervisor::open(cfg.supervisor.clone())?;
    info!(node = %cfg.node, manager = %cfg.manager, instances = sup.names().len(), "agent running");
    let mut interval = DEFAULT_REPORT_INTERVAL;
    let mut manager_down_since: Option<Instant> = None;
    let mut drained = false;
    loop {
        if drain.is_cancelled() && !drained {
            info!("draining: stopping engines");
            sup.stop_all(true).await;
            drained = true;
        }
        sup.poll().await;
        let report = NodeReport {
            node: cfg.node.clone(),
            zone: cfg.zone.clone(),
            address: cfg.supervisor.host.clone(),
            disks: cfg.disks.iter().map(DiskConfig::measure).collect(),
            instances: sup.reports(),
            agent_started_unix_ms: started_ms,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            replica_dirs: disks::replica_dirs(&cfg.disks),
            ublk: instances::ublk_usable(&cfg.supervisor),
        };
        let mut req = tonic::Request::new(report);
        if let Some(t) = &token {
            req.metadata_mut().insert(AUTHORIZATION, t.clone());
        }
        match client.report(req).await {
            Ok(answer) => {
                if let Some(since) = manager_down_since.take() {
                    info!(after = ?since.elapsed(), "manager reachable again");
                }
                let desired = answer.into_inner();
                if !drained {
                    apply(&cfg, &mut sup, &desired);
                }
                if desired.report_interval_ms > 0 {
                    interval = Duration::from_millis(u64::from(desired.report_interval_ms))
                        .clamp(Duration::from_millis(100), Duration::from_secs(60));
                }
            }
            Err(status) => {
                if manager_down_since.is_none() {
                    warn!(code = ?status.code(), error = %status.message(), "cannot report to the manager; instances keep running");
                    manager_down_since = Some(Instant::now());
                }
                if !drained {
                    sup.restart_failed();
                }
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = drain.cancelled(), if !drained => {}
            () = tokio::time::sleep(interval) => {}
        }
    }
    if cfg.stop_instances_on_exit {
        info!("stopping engines, then replicas");
        sup.stop_all(true).await;
        sup.stop_all(false).await;
    } else {
        info!(
            instances = sup.names().len(),
            "agent exits; its instances keep running"
        );
        sup.detach();
    }
    Ok(())
}

/// Converges the processes and removes the replica directories the manager gave up.
fn apply(cfg: &AgentConfig, sup: &mut Supervisor, desired: &NodeDesired) {
    sup.converge(&desired.instances);
    let in_use = sup.dirs_in_use();
    for dir in &desired.remove_dirs {
        let path = std::path::Path::new(dir);
        if !disks::is_replica_dir(&cfg.disks, path) {
            warn!(
                dir,
                "refusing to remove a directory outside the disks' replicas directories"
            );
            continue;
        }
        if in_use.iter().any(|d| d == path) || !path.exists() {
            continue;
        }
        match std::fs::remove_dir_all(path) {
            Ok(()) => info!(dir, "removed the data of a deleted replica"),
            Err(e) => warn!(dir, error = %e, "cannot remove a deleted replica's data"),
        }
    }
}
