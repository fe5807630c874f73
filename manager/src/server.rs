//! Running the manager: the store file and token under the data directory, the API on a
//! TCP listener, and a hook for what else runs beside it (controllers, the agent service,
//! the UI routes).
//!
//! ```ignore
//! let manager = Manager::open(&ManagerConfig { data_dir, listen, token: None }).await?;
//! // spawn controllers on manager.store().clone() ...
//! manager.serve(api::ui::router(), shutdown).await?;
//! ```

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::api::{self, ApiState};
use crate::store::{Store, StoreError};

/// File under the data directory that holds the store.
pub const STORE_FILE: &str = "manager.redb";
/// File under the data directory that holds the API token (mode 0600).
pub const TOKEN_FILE: &str = "token";
/// Default listen address of the API.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9500";

/// How to run the manager.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// Directory for the store file and the token (created if missing).
    pub data_dir: PathBuf,
    /// Address of the API (port 0 picks a free one; see [`Manager::local_addr`]).
    pub listen: SocketAddr,
    /// Token to require; none = the one in `DATA_DIR/token`, generated at first start.
    pub token: Option<String>,
}

/// Why the manager could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The data directory or token file could not be used.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Which file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The store could not be opened.
    #[error("cannot open the store: {0}")]
    Store(#[from] StoreError),
    /// The token given is unusable.
    #[error("bad token: {0}")]
    BadToken(String),
    /// Binding or serving failed.
    #[error("API server on {addr}: {source}")]
    Serve {
        /// Listen address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
}

/// The API token: the one given, else the stored one, else a new random one (stored with
/// mode 0600). Returns it and whether it was just generated (print it then).
pub fn load_or_create_token(
    data_dir: &Path,
    given: Option<&str>,
) -> Result<(String, bool), ServerError> {
    if let Some(t) = given {
        let t = t.trim();
        if t.len() < 16 || !t.chars().all(|c| c.is_ascii_graphic()) {
            return Err(ServerError::BadToken(
                "a token must be at least 16 printable ASCII characters without spaces".into(),
            ));
        }
        return Ok((t.to_owned(), false));
    }
    let path = data_dir.join(TOKEN_FILE);
    match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => return Ok((t.trim().to_owned(), false)),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(ServerError::Io {
                what: "reading",
                path,
                source,
            });
        }
    }
    let mut bytes = [0u8; 24];
    let io = |what, source| ServerError::Io {
        what,
        path: PathBuf::from("/dev/urandom"),
        source,
    };
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .map_err(|e| io("reading", e))?;
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let tmp = data_dir.join(format!("{TOKEN_FILE}.tmp"));
    let write = || -> std::io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(token.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(data_dir)?.sync_all()
    };
    write().map_err(|source| ServerError::Io {
        what: "writing",
        path: path.clone(),
        source,
    })?;
    Ok((token, true))
}

/// A manager with its store open, token known and listener bound, ready to serve.
#[derive(Debug)]
pub struct Manager {
    store: Store,
    token: String,
    token_created: bool,
    listener: TcpListener,
    addr: SocketAddr,
}

impl Manager {
    /// Creates the data directory, opens the store, loads or makes the token, binds.
    pub async fn open(config: &ManagerConfig) -> Result<Manager, ServerError> {
        std::fs::create_dir_all(&config.data_dir).map_err(|source| ServerError::Io {
            what: "creating",
            path: config.data_dir.clone(),
            source,
        })?;
        let store = Store::open_embedded(config.data_dir.join(STORE_FILE))?;
        let (token, token_created) =
            load_or_create_token(&config.data_dir, config.token.as_deref())?;
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| ServerError::Serve {
                    addr: config.listen,
                    source,
                })?;
        let addr = listener.local_addr().map_err(|source| ServerError::Serve {
            addr: config.listen,
            source,
        })?;
        Ok(Manager {
            store,
            token,
            token_created,
            listener,
            addr,
        })
    }

    /// A manager on a store opened elsewhere (the Kubernetes backend) with a token already
    /// known: no data directory. Binds `listen`.
    pub async fn with_store(
        store: Store,
        token: String,
        listen: SocketAddr,
    ) -> Result<Manager, ServerError> {
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|source| ServerError::Serve {
                addr: listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| ServerError::Serve {
            addr: listen,
            source,
        })?;
        Ok(Manager {
            store,
            token,
            token_created: false,
            listener,
            addr,
        })
    }

    /// The store (hand clones to controllers).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The API token.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// Whether the token was generated by this start (print it once).
    pub fn token_created(&self) -> bool {
        self.token_created
    }

    /// Where the API listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The API router of this manager, without extra routes.
    pub fn router(&self) -> Router {
        api::router(ApiState {
            store: self.store.clone(),
            token: Arc::from(self.token.as_str()),
        })
    }

    /// Serves the API plus `extra` routes (no auth on them; e.g. [`api::ui::router`]) until
    /// `shutdown` is cancelled.
    pub async fn serve(
        self,
        extra: Router,
        shutdown: CancellationToken,
    ) -> Result<(), ServerError> {
        let app = self.router().merge(extra);
        let addr = self.addr;
        tracing::info!(%addr, "manager API listening");
        axum::serve(self.listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await
            .map_err(|source| ServerError::Serve { addr, source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn token_is_generated_once_with_mode_0600_and_reused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (t1, new1) = load_or_create_token(dir.path(), None).expect("create");
        assert!(new1);
        assert_eq!(t1.len(), 48);
        let mode = std::fs::metadata(dir.path().join(TOKEN_FILE))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let (t2, new2) = load_or_create_token(dir.path(), None).expect("reuse");
        assert_eq!((t2.as_str(), new2), (t1.as_str(), false));
        assert!(load_or_create_token(dir.path(), Some("short")).is_err());
        let (t3, _) =
            load_or_create_token(dir.path(), Some("a-given-token-0123456789")).expect("given");
        assert_eq!(t3, "a-given-token-0123456789");
    }
}
