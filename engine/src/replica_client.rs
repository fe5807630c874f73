//! Client side of the data protocol: pipelined requests to one replica over one or more TCP
//! connections, answers matched by id, every request bounded by a timeout.
//!
//! Each connection has a writer task that drains every queued request into one vectored
//! write (header and shared payload `Bytes`, no copy) and a reader task that completes the
//! waiting request of each answer. A connection that fails fails every request on it and
//! stays failed: the volume then drops the replica (it never retries a write silently).

use std::collections::HashMap;
use std::io::IoSlice;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use ironhorn_proto::frame::{Checksummed, ErrorCode, Request, Response, ResponseCodec};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::FramedRead;
use tracing::{debug, warn};

/// A flush may take this many replica timeouts (it writes out whatever the replica's page
/// cache still holds) before the replica counts as failed.
pub const FLUSH_TIMEOUT_FACTOR: u32 = 8;
/// Why a request to a replica failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ReplicaIoError {
    /// The replica answered with an error status.
    #[error("replica answered {0}")]
    Status(ErrorCode),
    /// No answer within the timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The connection is closed or broke.
    #[error("connection lost: {0}")]
    Disconnected(String),
    /// Connecting failed.
    #[error("connect to {addr}: {reason}")]
    Connect {
        /// Data address.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// The request could not be built (range or size).
    #[error("bad request: {0}")]
    BadRequest(String),
}

impl ReplicaIoError {
    /// Whether the error says the request itself was wrong rather than the replica broken.
    pub fn is_request_error(&self) -> bool {
        matches!(
            self,
            ReplicaIoError::BadRequest(_) | ReplicaIoError::Status(ErrorCode::InvalidArgument)
        )
    }
}

type Pending = Mutex<HashMap<u64, oneshot::Sender<Response>>>;

struct Conn {
    tx: mpsc::UnboundedSender<Request>,
    pending: Arc<Pending>,
    broken: Arc<AtomicBool>,
}

/// A data-protocol client of one replica.
pub struct ReplicaDataClient {
    addr: SocketAddr,
    conns: Vec<Conn>,
    next: AtomicUsize,
    ids: AtomicU64,
    timeout: Duration,
}

impl std::fmt::Debug for ReplicaDataClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaDataClient")
            .field("addr", &self.addr)
            .finish()
    }
}

fn fail_all(pending: &Pending) {
    // Dropping the senders wakes every waiter with an error.
    pending.lock().unwrap_or_else(|p| p.into_inner()).clear();
}

async fn write_batch(w: &mut OwnedWriteHalf, batch: &[Request]) -> std::io::Result<()> {
    let headers: Vec<[u8; 32]> = batch.iter().map(|r| r.encode_header()).collect();
    let mut parts: Vec<&[u8]> = Vec::with_capacity(batch.len() * 2);
    for (h, r) in headers.iter().zip(batch) {
        parts.push(h);
        if !r.payload().is_empty() {
            parts.push(r.payload());
        }
    }
    let mut idx = 0;
    let mut off = 0;
    while idx < parts.len() {
        let slices: Vec<IoSlice<'_>> = std::iter::once(IoSlice::new(&parts[idx][off..]))
            .chain(parts[idx + 1..].iter().take(63).map(|p| IoSlice::new(p)))
            .collect();
        let mut n = w.write_vectored(&slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while n > 0 && idx < parts.len() {
            let left = parts[idx].len() - off;
            if n >= left {
                n -= left;
                idx += 1;
                off = 0;
            } else {
                off += n;
                n = 0;
            }
        }
    }
    Ok(())
}

impl ReplicaDataClient {
    /// Opens `conns` connections to the replica's data address.
    pub async fn connect(
        addr: SocketAddr,
        conns: usize,
        timeout: Duration,
    ) -> Result<ReplicaDataClient, ReplicaIoError> {
        let mut out = Vec::with_capacity(conns.max(1));
        for _ in 0..conns.max(1) {
            let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
                .await
                .map_err(|_| ReplicaIoError::Connect {
                    addr,
                    reason: format!("timed out after {timeout:?}"),
                })?
                .map_err(|e| ReplicaIoError::Connect {
                    addr,
                    reason: e.to_string(),
                })?;
            let _ = stream.set_nodelay(true);
            let (r, mut w) = stream.into_split();
            let (tx, mut rx) = mpsc::unbounded_channel::<Request>();
            let pending: Arc<Pending> = Arc::new(Mutex::new(HashMap::new()));
            let broken = Arc::new(AtomicBool::new(false));
            {
                let (pending, broken) = (pending.clone(), broken.clone());
                tokio::spawn(async move {
                    let mut batch = Vec::with_capacity(64);
                    while rx.recv_many(&mut batch, 256).await > 0 {
                        if let Err(e) = write_batch(&mut w, &batch).await {
                            debug!(%addr, error = %e, "replica data connection write failed");
                            break;
                        }
                        batch.clear();
                    }
                    broken.store(true, Ordering::Release);
                    fail_all(&pending);
                    let _ = w.shutdown().await;
                });
            }
            {
                let (pending, broken) = (pending.clone(), broken.clone());
                tokio::spawn(async move {
                    let mut frames = FramedRead::with_capacity(r, ResponseCodec::new(), 64 * 1024);
                    let reason = loop {
                        match frames.next().await {
                            Some(Ok(Ok(resp))) => {
                                let waiter = pending
                                    .lock()
                                    .unwrap_or_else(|p| p.into_inner())
                                    .remove(&resp.id());
                                match waiter {
                                    Some(w) => {
                                        let _ = w.send(resp);
                                    }
                                    None => break format!("answer to unknown id {}", resp.id()),
                                }
                            }
                            Some(Ok(Err(crc))) => break format!("bad payload crc: {crc}"),
                            Some(Err(e)) => break format!("malformed answer: {e}"),
                            None => break "closed by replica".to_string(),
                        }
                    };
                    warn!(%addr, %reason, "replica data connection failed");
                    broken.store(true, Ordering::Release);
                    fail_all(&pending);
                });
            }
            out.push(Conn {
                tx,
                pending,
                broken,
            });
        }
        Ok(ReplicaDataClient {
            addr,
            conns: out,
            next: AtomicUsize::new(0),
            ids: AtomicU64::new(1),
            timeout,
        })
    }

    /// The replica's data address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Whether any connection has failed.
    pub fn is_broken(&self) -> bool {
        self.conns.iter().any(|c| c.broken.load(Ordering::Acquire))
    }

    async fn call(&self, req: Request) -> Result<Response, ReplicaIoError> {
        self.call_within(req, self.timeout).await
    }

    async fn call_within(
        &self,
        req: Request,
        timeout: Duration,
    ) -> Result<Response, ReplicaIoError> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.conns.len();
        let conn = &self.conns[i];
        if conn.broken.load(Ordering::Acquire) {
            return Err(ReplicaIoError::Disconnected(
                "connection failed earlier".into(),
            ));
        }
        let id = req.id();
        let (tx, rx) = oneshot::channel();
        conn.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, tx);
        if conn.tx.send(req).is_err() {
            conn.pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
            return Err(ReplicaIoError::Disconnected("writer stopped".into()));
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(_)) => Err(ReplicaIoError::Disconnected(
                "connection failed with the request in flight".into(),
            )),
            Err(_) => {
                conn.pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
                Err(ReplicaIoError::Timeout(timeout))
            }
        }
    }

    fn id(&self) -> u64 {
        self.ids.fetch_add(1, Ordering::Relaxed)
    }

    /// Reads `len` bytes at `offset`.
    pub async fn read(&self, offset: u64, len: u32) -> Result<Bytes, ReplicaIoError> {
        let req = Request::read(self.id(), offset, len)
            .map_err(|e| ReplicaIoError::BadRequest(e.to_string()))?;
        self.call(req)
            .await?
            .into_result()
            .map_err(ReplicaIoError::Status)
    }

    /// Writes `data` (shared, not copied; its crc computed once by the caller) at `offset`.
    pub async fn write(
        &self,
        offset: u64,
        data: &Checksummed,
        fua: bool,
    ) -> Result<(), ReplicaIoError> {
        let req = Request::write_checksummed(self.id(), offset, data, fua)
            .map_err(|e| ReplicaIoError::BadRequest(e.to_string()))?;
        self.call(req)
            .await?
            .status()
            .map_err(ReplicaIoError::Status)
    }

    /// Zeroes `[offset, offset+len)`; `discard` frees space where it can.
    pub async fn zero(
        &self,
        offset: u64,
        len: u32,
        discard: bool,
        fua: bool,
    ) -> Result<(), ReplicaIoError> {
        let req = if discard {
            Request::discard(self.id(), offset, len, fua)
        } else {
            Request::write_zeroes(self.id(), offset, len, fua)
        }
        .map_err(|e| ReplicaIoError::BadRequest(e.to_string()))?;
        self.call(req)
            .await?
            .status()
            .map_err(ReplicaIoError::Status)
    }

    /// Makes every write this replica acknowledged durable.
    pub async fn flush(&self) -> Result<(), ReplicaIoError> {
        // A flush on one connection covers writes acknowledged on any of them: the replica
        // fdatasyncs the head file they all write to.
        let req = Request::flush(self.id());
        // A flush takes as long as the dirty data the replica has to write: a slow one is
        // not a dead replica. Writes keep the short timeout.
        self.call_within(req, self.timeout * FLUSH_TIMEOUT_FACTOR)
            .await?
            .status()
            .map_err(ReplicaIoError::Status)
    }

    /// Round trip without I/O.
    pub async fn ping(&self) -> Result<(), ReplicaIoError> {
        let req = Request::ping(self.id());
        self.call(req)
            .await?
            .status()
            .map_err(ReplicaIoError::Status)
    }
}
