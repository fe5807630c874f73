//! The replica process's servers: the data protocol ([`data`]) and the gRPC control
//! service ([`control`]) over one [`Store`], and [`serve`], which runs both.
//!
//! The data path runs apart from the control runtime (DESIGN.md §8): data connections are
//! served by plain OS threads that call the store inline, while gRPC runs on the shared
//! tokio runtime and hands store calls to its blocking pool.

pub mod backup;
pub mod control;
pub mod data;
pub mod sync;

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

pub use control::ControlService;
pub use data::{DEFAULT_MAX_DATA_CONNECTIONS, DataServer, DataServerConfig};

use crate::StoreError;
use crate::store::Store;

/// How long in-flight gRPC calls get to finish after shutdown is asked for.
pub const CONTROL_SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// What [`serve`] needs to run a replica.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Directory of the replica.
    pub dir: PathBuf,
    /// Volume size in bytes when the directory holds no replica yet; `None` requires one.
    pub size: Option<u64>,
    /// Address of the gRPC control service (port 0 picks a free port).
    pub control_listen: SocketAddr,
    /// Address of the data protocol (port 0 picks a free port).
    pub data_listen: SocketAddr,
    /// Most data connections served at once; default [`DEFAULT_MAX_DATA_CONNECTIONS`].
    pub max_data_connections: usize,
}

/// Why a replica could not be served.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Opening or creating the store failed.
    #[error("open replica {dir}: {source}")]
    OpenStore {
        /// The replica directory.
        dir: PathBuf,
        /// What the store said.
        #[source]
        source: StoreError,
    },
    /// A listening socket could not be bound.
    #[error("listen for {what} on {addr}: {source}")]
    Bind {
        /// Which server (`data` or `control`).
        what: &'static str,
        /// The address asked for.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The gRPC server stopped with an error.
    #[error("control server: {0}")]
    Control(#[from] tonic::transport::Error),
    /// A blocking task panicked or was cancelled.
    #[error("{what}: {source}")]
    Task {
        /// What the task was doing.
        what: &'static str,
        /// The join error.
        #[source]
        source: tokio::task::JoinError,
    },
}

/// A replica whose store is open and whose sockets are bound, ready to [`run`](Self::run).
///
/// Binding before running lets callers (tests, the agent) learn the real addresses when
/// they asked for port 0.
pub struct ReplicaServer {
    config: ServeConfig,
    store: Arc<Store>,
    data: DataServer,
    control_listener: tokio::net::TcpListener,
    control_addr: SocketAddr,
}

impl ReplicaServer {
    /// Opens (or creates) the store and binds both listeners. The data server starts
    /// accepting at once; the control server starts in [`run`](Self::run).
    pub async fn bind(config: ServeConfig) -> Result<ReplicaServer, ServeError> {
        let dir = config.dir.clone();
        let size = config.size;
        let store = tokio::task::spawn_blocking(move || Store::open_or_create(&dir, size))
            .await
            .map_err(|source| ServeError::Task {
                what: "open store",
                source,
            })?
            .map_err(|source| ServeError::OpenStore {
                dir: config.dir.clone(),
                source,
            })?;
        let store = Arc::new(store);
        let control_listener = tokio::net::TcpListener::bind(config.control_listen)
            .await
            .map_err(|source| ServeError::Bind {
                what: "control",
                addr: config.control_listen,
                source,
            })?;
        let control_addr = control_listener
            .local_addr()
            .map_err(|source| ServeError::Bind {
                what: "control",
                addr: config.control_listen,
                source,
            })?;
        let data_config = DataServerConfig {
            max_connections: config.max_data_connections,
            dir: config.dir.clone(),
        };
        let data = DataServer::bind(config.data_listen, Arc::clone(&store), data_config).map_err(
            |source| ServeError::Bind {
                what: "data",
                addr: config.data_listen,
                source,
            },
        )?;
        Ok(ReplicaServer {
            config,
            store,
            data,
            control_listener,
            control_addr,
        })
    }

    /// Address the gRPC control service listens on.
    pub fn control_addr(&self) -> SocketAddr {
        self.control_addr
    }

    /// Address the data protocol listens on.
    pub fn data_addr(&self) -> SocketAddr {
        self.data.local_addr()
    }

    /// The open store.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Serves gRPC and data until `shutdown` is cancelled, then stops both servers (data
    /// connections are closed, gRPC calls get [`CONTROL_SHUTDOWN_GRACE`]) and flushes the
    /// store.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), ServeError> {
        let ReplicaServer {
            config,
            store,
            mut data,
            control_listener,
            control_addr,
        } = self;
        tracing::info!(
            dir = %config.dir.display(),
            size = store.size(),
            control = %control_addr,
            data = %data.local_addr(),
            "replica serving"
        );
        let service =
            ControlService::new(Arc::clone(&store), config.dir.clone(), data.local_addr());
        let incoming =
            tonic::transport::server::TcpIncoming::from(control_listener).with_nodelay(Some(true));
        let grpc_shutdown = shutdown.clone();
        let sync = sync::SyncService::new(Arc::clone(&store), service.clone());
        let backup = backup::BackupService::new(config.dir.clone());
        let grpc = tonic::transport::Server::builder()
            .add_service(service.into_server())
            .add_service(sync.into_server())
            .add_service(backup.into_server());
        let grpc = grpc.serve_with_incoming_shutdown(incoming, grpc_shutdown.cancelled_owned());
        tokio::pin!(grpc);
        let result = tokio::select! {
            r = &mut grpc => r.map_err(ServeError::from),
            () = shutdown.cancelled() => {
                match tokio::time::timeout(CONTROL_SHUTDOWN_GRACE, &mut grpc).await {
                    Ok(r) => r.map_err(ServeError::from),
                    Err(_) => {
                        tracing::warn!("gRPC calls still running after the grace period; dropping them");
                        Ok(())
                    }
                }
            }
        };
        if let Err(e) = &result {
            tracing::error!(error = %e, "control server failed; stopping the replica");
        }
        let flushed = tokio::task::spawn_blocking(move || {
            data.shutdown();
            store.flush()
        })
        .await
        .map_err(|source| ServeError::Task {
            what: "stop data server",
            source,
        })?;
        match flushed {
            Ok(()) => tracing::info!("replica stopped"),
            Err(e) => tracing::error!(error = %e, "flush at shutdown failed"),
        }
        result
    }
}

/// Opens the replica in `config.dir`, serves its data protocol and control service, and
/// stops both when `shutdown` is cancelled. Logs "replica serving" with the addresses.
pub async fn serve(config: ServeConfig, shutdown: CancellationToken) -> Result<(), ServeError> {
    ReplicaServer::bind(config).await?.run(shutdown).await
}
