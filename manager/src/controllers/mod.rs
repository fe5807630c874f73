//! Controllers (DESIGN.md §4): level-triggered reconcilers that move the cluster from what
//! the agents and engines report towards what the resources ask for. Each pass reads the
//! whole state ([`world::World`]), so a lost event or a manager restart costs nothing but
//! one pass; every action is idempotent, and a controller that fails is retried with
//! back-off. Behaviour, as Given/When/Then, is in `controllers/README.md`.
//!
//! - [`node`]: node readiness from agent reports; disk space promised and schedulable.
//! - [`volume`]: replicas per `numberOfReplicas` (through [`crate::scheduler`]), healing,
//!   attach/detach (the engine), expand, revert, robustness, deletion and orphan cleanup.
//! - [`snapshot`]: snapshots taken and removed through the engine.
//! - [`stats`]: volume I/O rates from the engine's counters (used by [`volume`]).
//! - [`backup`]: backups taken through the engine to the backup target, removed from it.
//! - [`restore`]: replicas of a volume created from a backup filled before they start.
//! - [`recurring`]: recurring jobs (snapshots, backups) on a [`cron`] schedule, retention.
//!
//! [`Registry`] holds the controllers a manager runs; more (backups, recurring jobs) are
//! added with [`Registry::register`].

pub mod backup;
pub mod cron;
pub mod engine_client;
pub mod liveness;
pub mod node;
pub mod patch;
pub mod recurring;
pub mod replica_client;
pub mod restore;
pub mod settings;
pub mod snapshot;
pub mod stats;
pub mod volume;
pub mod world;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info_span, warn};

use crate::store::Store;
pub use engine_client::Engines;
pub use liveness::Liveness;

/// Time between two passes when nothing changes.
pub const RESYNC_PERIOD: Duration = Duration::from_secs(1);
/// Longest back-off of a controller that keeps failing.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Errors of a reconcile pass.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    /// The store refused or failed.
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
    /// An engine call failed.
    #[error(transparent)]
    Engine(#[from] engine_client::EngineCallError),
}

/// What every controller gets.
#[derive(Debug, Clone)]
pub struct Context {
    /// The store.
    pub store: Store,
    /// Agent reports.
    pub liveness: Liveness,
    /// Engine clients.
    pub engines: Engines,
    /// Last I/O counters of each attached volume.
    pub stats: Arc<stats::Sampler>,
}

/// One reconciler. A pass looks at the whole cluster and does what is due; it must be
/// idempotent (the next pass may repeat it).
#[async_trait::async_trait]
pub trait Controller: Send + Sync {
    /// Name, for logs.
    fn name(&self) -> &'static str;
    /// One pass over the cluster.
    async fn reconcile(&self, ctx: &Context, world: &world::World) -> Result<(), ControllerError>;
}

/// The controllers a manager runs, in order.
#[derive(Clone, Default)]
pub struct Registry {
    controllers: Vec<Arc<dyn Controller>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.controllers.iter().map(|c| c.name()))
            .finish()
    }
}

impl Registry {
    /// The built-in controllers: node, volume, snapshot, backup, restore, recurring job.
    pub fn builtin() -> Self {
        let mut r = Registry::default();
        r.register(Arc::new(node::NodeController));
        r.register(Arc::new(volume::VolumeController));
        r.register(Arc::new(snapshot::SnapshotController));
        r.register(Arc::new(backup::BackupController::default()));
        r.register(Arc::new(restore::RestoreController::default()));
        r.register(Arc::new(recurring::RecurringJobController));
        r
    }

    /// Adds a controller (backup, restore and recurring-job controllers go here).
    pub fn register(&mut self, c: Arc<dyn Controller>) {
        self.controllers.push(c);
    }

    /// Runs every controller on a period (and sooner when the store changes) until
    /// `shutdown`. A controller that fails waits with doubling back-off.
    pub async fn run(self, ctx: Context, shutdown: CancellationToken) {
        let mut backoff: Vec<(Duration, Option<Instant>)> =
            vec![(RESYNC_PERIOD, None); self.controllers.len()];
        let changed = Arc::new(tokio::sync::Notify::new());
        let watcher = tokio::spawn(watch_changes(ctx.store.clone(), changed.clone()));
        loop {
            match world::World::load(&ctx.store).await {
                Ok(world) => {
                    for (i, c) in self.controllers.iter().enumerate() {
                        if backoff[i].1.is_some_and(|t| Instant::now() < t) {
                            continue;
                        }
                        let span = info_span!("reconcile", controller = c.name());
                        match c.reconcile(&ctx, &world).instrument(span).await {
                            Ok(()) => backoff[i] = (RESYNC_PERIOD, None),
                            Err(e) => {
                                let (d, _) = backoff[i];
                                warn!(controller = c.name(), error = %e, retry_in = ?d, "reconcile failed");
                                backoff[i] = ((d * 2).min(MAX_BACKOFF), Some(Instant::now() + d));
                            }
                        }
                    }
                }
                Err(e) => warn!(error = %e, "cannot read the store"),
            }
            tokio::select! {
                () = shutdown.cancelled() => {
                    watcher.abort();
                    return;
                }
                () = tokio::time::sleep(RESYNC_PERIOD) => {}
                () = changed.notified() => {
                    // Let a burst of changes settle into one pass.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// Wakes the controllers on every change in the store (the periodic pass covers any
/// change a broken watch missed).
async fn watch_changes(store: Store, changed: Arc<tokio::sync::Notify>) {
    use futures::StreamExt;
    loop {
        match store.watch_all(false).await {
            Ok(mut events) => {
                while let Some(e) = events.next().await {
                    if e.is_err() {
                        break;
                    }
                    changed.notify_one();
                }
            }
            Err(e) => warn!(error = %e, "cannot watch the store"),
        }
        tokio::time::sleep(RESYNC_PERIOD).await;
    }
}

/// Runs the control plane's background half until `shutdown`: the agent service on
/// `agent_listener` and the controllers of `registry`. The REST API runs beside it.
pub async fn run_control_plane(
    store: Store,
    token: Option<String>,
    agent_listener: tokio::net::TcpListener,
    registry: Registry,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let liveness = Liveness::default();
    let ctx = Context {
        store: store.clone(),
        liveness: liveness.clone(),
        engines: Engines::default(),
        stats: Arc::default(),
    };
    let addr = agent_listener.local_addr().ok();
    tracing::info!(address = ?addr, controllers = ?registry, "agent service listening");
    let controllers = tokio::spawn(registry.run(ctx, shutdown.clone()));
    let res = crate::agent::service::AgentService::new(store, liveness, token)
        .serve(agent_listener, shutdown.clone())
        .await;
    shutdown.cancel();
    let _ = controllers.await;
    res
}
