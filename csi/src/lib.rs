//! ironhorn CSI driver: the Container Storage Interface (spec v1) over a unix socket.
//!
//! - [`identity`]: plugin name ([`identity::DRIVER_NAME`]), capabilities, probe.
//! - [`node`]: stage/publish on the node — attaches the volume's NBD export through the
//!   [`device`] layer, formats it if blank, mounts it; stats and expansion.
//! - [`controller`]: create/delete/publish/expand volumes and snapshots through the
//!   manager ([`controller::backend::ManagerApi`]).
//! - [`capability`]: the volume capabilities ironhorn supports.
//! - [`serve`]: runs the services chosen by [`Mode`] on a unix socket until cancelled.
//! - [`client`]: a gRPC channel over the unix socket (tests, tools).
//!
//! The generated protobuf types are in [`pb`] (package `csi.v1`, from `proto/csi.proto`).

pub mod capability;
pub mod client;
pub mod controller;
pub mod device;
pub mod error;
pub mod exec;
pub mod filesystem;
pub mod guard;
pub mod identity;
pub mod mount;
pub mod node;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_util::sync::CancellationToken;

/// CSI v1 messages and services, generated from `proto/csi.proto`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("csi.v1");
}

/// Which CSI services this process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Identity + Controller (one per cluster, beside the sidecars).
    Controller,
    /// Identity + Node (one per node).
    Node,
    /// All three (single machine, tests).
    All,
}

impl Mode {
    /// Whether the Controller service runs.
    pub fn controller(self) -> bool {
        matches!(self, Mode::Controller | Mode::All)
    }

    /// Whether the Node service runs.
    pub fn node(self) -> bool {
        matches!(self, Mode::Node | Mode::All)
    }
}

/// Everything the driver needs to start.
#[derive(Debug, Clone)]
pub struct DriverConfig {
    /// Path of the unix socket to serve on.
    pub socket: PathBuf,
    /// Which services to run.
    pub mode: Mode,
    /// Node settings (id, zone, volume limit).
    pub node: node::NodeConfig,
    /// How volumes are attached on this node.
    pub attach_scheme: device::SchemeKind,
    /// Where attach schemes keep their per-volume state.
    pub state_dir: PathBuf,
    /// The manager, for the Controller service (needed when `mode` runs it).
    pub manager: Option<Arc<dyn controller::backend::ManagerApi>>,
}

/// Why the driver could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The endpoint is not a `unix://` path.
    #[error("bad endpoint {endpoint:?}: {reason}")]
    BadEndpoint {
        /// The endpoint given.
        endpoint: String,
        /// Why.
        reason: String,
    },
    /// The socket could not be created.
    #[error("cannot listen on {path}: {source}")]
    Listen {
        /// Socket path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The attach scheme could not be opened.
    #[error("attach scheme: {0}")]
    Scheme(#[from] device::DeviceError),
    /// The configuration asks for something this build cannot do.
    #[error("{0}")]
    Config(String),
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Server(#[from] tonic::transport::Error),
}

/// The socket path of a CSI endpoint: `unix:///PATH`, `unix:/PATH` or a plain `/PATH`.
pub fn socket_path(endpoint: &str) -> Result<PathBuf, ServeError> {
    let path = endpoint
        .strip_prefix("unix://")
        .or_else(|| endpoint.strip_prefix("unix:"))
        .unwrap_or(endpoint);
    if !path.starts_with('/') {
        return Err(ServeError::BadEndpoint {
            endpoint: endpoint.to_owned(),
            reason: "expected unix:///ABSOLUTE/PATH".into(),
        });
    }
    Ok(PathBuf::from(path))
}

/// Binds the unix socket at `path`, replacing a stale socket file left by an earlier run.
fn listen(path: &Path) -> Result<UnixListener, ServeError> {
    let err = |source| ServeError::Listen {
        path: path.to_owned(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(err)?;
    }
    if std::fs::symlink_metadata(path).is_ok() {
        std::fs::remove_file(path).map_err(err)?;
    }
    UnixListener::bind(path).map_err(err)
}

/// Runs the driver on its unix socket until `shutdown` is cancelled.
pub async fn serve(config: DriverConfig, shutdown: CancellationToken) -> Result<(), ServeError> {
    let controller = match (config.mode.controller(), &config.manager) {
        (false, _) => None,
        (true, Some(api)) => Some(controller::ControllerService::new(api.clone())),
        (true, None) => {
            return Err(ServeError::Config(
                "the Controller service needs the manager (--manager URL)".into(),
            ));
        }
    };
    let online_expansion = matches!(config.attach_scheme, device::SchemeKind::KernelNbd);
    let identity = identity::IdentityService {
        controller: config.mode.controller(),
        online_expansion,
    };
    let mut router = tonic::transport::Server::builder()
        .add_service(pb::identity_server::IdentityServer::new(identity));
    if let Some(c) = controller {
        router = router.add_service(pb::controller_server::ControllerServer::new(c));
    }
    if config.mode.node() {
        let scheme = device::open_scheme(config.attach_scheme, &config.state_dir)?;
        let ops = Arc::new(node::NodeOps::new(config.node.clone(), scheme));
        router = router.add_service(pb::node_server::NodeServer::new(node::NodeService::new(
            ops,
        )));
    }
    let listener = listen(&config.socket)?;
    tracing::info!(
        endpoint = %format!("unix://{}", config.socket.display()),
        mode = ?config.mode,
        node_id = %config.node.node_id,
        scheme = %config.attach_scheme,
        "csi serving"
    );
    let result = router
        .serve_with_incoming_shutdown(
            UnixListenerStream::new(listener),
            shutdown.cancelled_owned(),
        )
        .await;
    let _ = std::fs::remove_file(&config.socket);
    result?;
    tracing::info!("csi stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(
            socket_path("unix:///run/csi/csi.sock").expect("ok"),
            PathBuf::from("/run/csi/csi.sock")
        );
        assert_eq!(
            socket_path("unix:/csi/csi.sock").expect("ok"),
            PathBuf::from("/csi/csi.sock")
        );
        assert!(socket_path("tcp://127.0.0.1:1").is_err());
        assert!(socket_path("unix://relative").is_err());
    }
}
