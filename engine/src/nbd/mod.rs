//! NBD frontend: serves one volume ([`BlockDevice`]) to NBD clients over TCP or a unix socket
//! (DESIGN.md §3 "Frontends").
//!
//! - Handshake ([`handshake`]): fixed newstyle, `NBD_FLAG_NO_ZEROES`; options `GO`, `INFO`
//!   (export, name, block size 512 / 4096 / 32 MiB), `LIST`, `ABORT`, `EXPORT_NAME`,
//!   `STRUCTURED_REPLY`, `LIST_META_CONTEXT` / `SET_META_CONTEXT` for `base:allocation`.
//!   The export is found by its name; the empty name is the default export. No TLS.
//! - Transmission ([`transmission`]): `READ`, `WRITE`, `DISC`, `FLUSH`, `TRIM`,
//!   `WRITE_ZEROES`, `BLOCK_STATUS`, flags `FUA`, `NO_HOLE`, `DF`, `REQ_ONE`; structured
//!   replies when negotiated; many requests in flight, replies out of order; multi-conn.
//!   Requests are checked per request against the device's current size and 512-byte
//!   alignment (`EINVAL`; `ENOSPC` for writes past the end; `EPERM` on a read-only export).
//!   Malformed input (bad magic, a write larger than 32 MiB, a truncated request) closes the
//!   connection with one logged reason; other connections go on.
//! - Serving ([`serve_tcp`], [`serve_unix`], [`serve`]): an accept loop limited to
//!   [`MAX_CONNECTIONS`], one task per connection with a span (`conn`, `peer`, `export`),
//!   `TCP_NODELAY`, graceful shutdown through a [`CancellationToken`].
//! - Addresses ([`parse_nbd_url`]): `tcp://HOST:PORT` and `unix:///PATH`.
//!
//! Built for a dedicated current-thread tokio runtime (DESIGN.md §8): one task per
//! connection does all reading, device calls and writing, with no channels in between (see
//! [`transmission`]). The runtime needs the I/O and time drivers enabled.

pub mod error;
pub mod handshake;
pub mod proto;
pub mod transmission;
pub mod url;

use std::fmt;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::device::BlockDevice;
use handshake::Handshake;

pub use error::{NbdConnError, NbdListenError, ParseNbdUrlError};
pub use url::{NbdListen, NbdListener, parse_nbd_url};

/// Most connections served at once per listener; further clients wait in the accept backlog.
pub const MAX_CONNECTIONS: usize = 256;
/// Time a client gets to finish the handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause after a failed `accept` (e.g. out of file descriptors) before trying again.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// One export: a named volume served over NBD.
pub struct NbdExport<D> {
    /// Export name clients ask for (the volume name); the empty name also selects it.
    pub name: String,
    /// The volume.
    pub device: Arc<D>,
    /// Refuse writes, trims and write-zeroes (`EPERM`) and advertise `NBD_FLAG_READ_ONLY`.
    pub read_only: bool,
}

impl<D> fmt::Debug for NbdExport<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NbdExport")
            .field("name", &self.name)
            .field("read_only", &self.read_only)
            .finish_non_exhaustive()
    }
}

/// Serves one already-accepted connection: handshake, then transmission until the client
/// disconnects, a protocol error, or `shutdown`. Returns why it ended abnormally; the caller
/// logs it.
pub async fn serve_connection<S, D>(
    mut stream: S,
    export: &NbdExport<D>,
    shutdown: &CancellationToken,
) -> Result<(), NbdConnError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    D: BlockDevice,
{
    let outcome = tokio::select! {
        r = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake::handshake(&mut stream, export)) => {
            r.map_err(|_| NbdConnError::HandshakeTimeout(HANDSHAKE_TIMEOUT))??
        }
        () = shutdown.cancelled() => return Ok(()),
    };
    let Handshake::Transmission(neg) = outcome else {
        return Ok(());
    };
    debug!(
        structured = neg.structured,
        base_allocation = neg.base_allocation,
        "transmission started"
    );
    let requests = transmission::transmission(stream, export, neg, shutdown).await?;
    debug!(requests, "transmission ended");
    Ok(())
}

/// Serves `export` on a TCP listener until `shutdown` is cancelled; then stops accepting,
/// lets every connection finish its running requests, and returns.
pub async fn serve_tcp<D: BlockDevice>(
    listener: TcpListener,
    export: Arc<NbdExport<D>>,
    shutdown: CancellationToken,
) {
    match listener.local_addr() {
        Ok(addr) => info!(%addr, export = %export.name, "NBD server listening on TCP"),
        Err(e) => warn!(error = %e, "NBD TCP listener has no local address"),
    }
    accept_loop(export, shutdown, || async {
        let (stream, peer) = listener.accept().await?;
        if let Err(e) = stream.set_nodelay(true) {
            warn!(%peer, error = %e, "set TCP_NODELAY");
        }
        Ok((stream, peer.to_string()))
    })
    .await;
}

/// Serves `export` on a unix-socket listener until `shutdown` is cancelled (see
/// [`serve_tcp`]).
pub async fn serve_unix<D: BlockDevice>(
    listener: UnixListener,
    export: Arc<NbdExport<D>>,
    shutdown: CancellationToken,
) {
    match listener.local_addr() {
        Ok(addr) => {
            info!(addr = ?addr, export = %export.name, "NBD server listening on unix socket")
        }
        Err(e) => warn!(error = %e, "NBD unix listener has no local address"),
    }
    accept_loop(export, shutdown, || async {
        let (stream, peer) = listener.accept().await?;
        let peer = peer
            .as_pathname()
            .map_or_else(|| "unix".to_owned(), |p| p.display().to_string());
        Ok((stream, peer))
    })
    .await;
}

/// Serves `export` on either kind of listener (see [`serve_tcp`]).
pub async fn serve<D: BlockDevice>(
    listener: NbdListener,
    export: Arc<NbdExport<D>>,
    shutdown: CancellationToken,
) {
    match listener {
        NbdListener::Tcp(l) => serve_tcp(l, export, shutdown).await,
        NbdListener::Unix(l) => serve_unix(l, export, shutdown).await,
    }
}

/// The accept loop shared by TCP and unix sockets: a semaphore bounds the connections, each
/// runs in its own task and span, and shutdown waits for all of them.
async fn accept_loop<D, S, A, Fut>(
    export: Arc<NbdExport<D>>,
    shutdown: CancellationToken,
    mut accept: A,
) where
    D: BlockDevice,
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    A: FnMut() -> Fut,
    Fut: Future<Output = io::Result<(S, String)>>,
{
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut conns = JoinSet::new();
    let mut next_id: u64 = 0;
    loop {
        while let Some(done) = conns.try_join_next() {
            log_join(done);
        }
        let permit = tokio::select! {
            () = shutdown.cancelled() => break,
            p = limit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            r = accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                error!(error = %e, "accept NBD connection");
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(ACCEPT_ERROR_BACKOFF) => continue,
                }
            }
        };
        next_id += 1;
        let span = info_span!("nbd", conn = next_id, peer = %peer, export = %export.name);
        let export = export.clone();
        let shutdown = shutdown.clone();
        conns.spawn(
            async move {
                let _permit = permit;
                debug!("connection accepted");
                match serve_connection(stream, &export, &shutdown).await {
                    Ok(()) => debug!("connection closed"),
                    Err(e) => warn!(error = %e, "connection closed"),
                }
            }
            .instrument(span),
        );
    }
    debug!(connections = conns.len(), "NBD server stopping");
    while let Some(done) = conns.join_next().await {
        log_join(done);
    }
    info!(export = %export.name, "NBD server stopped");
}

fn log_join(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done {
        error!(error = %e, "NBD connection task failed");
    }
}

#[cfg(test)]
mod tests;
