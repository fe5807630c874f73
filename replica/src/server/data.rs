//! The data-protocol server (engine → replica block I/O, `ironhorn_proto::frame`).
//!
//! One OS thread accepts connections; each connection gets one OS thread that does
//! everything for its requests with no hand-off (DESIGN.md §8): it reads bytes into a
//! buffer, decodes every complete request with [`RequestCodec`], runs the store call
//! inline, encodes the answer into a write buffer, and — once no complete request is left
//! in the read buffer — sends all the answers with one `write`. Pipelined requests are so
//! answered in batches, in order of arrival (the protocol allows any order).
//!
//! Flushes are the exception: a flush (fdatasync of the head) can take as long as the
//! page cache's dirty data needs, so it is handed to the connection's flusher thread, which
//! answers it when the fdatasync returns (coalescing flushes that arrive meanwhile into one)
//! while the connection thread goes on with the requests behind it. Answers are written
//! whole under one lock, so the two threads never interleave bytes on the socket. A flush
//! covers every write answered before it arrived: those ran on this thread (or another
//! connection's) before the flush was read.
//!
//! Read answers are built in place: the header slot, then the data read by the store
//! straight into the write buffer, then the crc over it, computed once. Write payloads are
//! split off the read buffer without copying. Buffers are reused across requests.
//!
//! Bad input never reaches the store: a malformed frame (bad magic, unknown op, oversized
//! length, …) closes the connection after the answers already due are sent, with a warning
//! naming the peer and the reason; a payload with a bad crc is answered
//! [`ErrorCode::BadCrc`] and the connection goes on; a range the store refuses is answered
//! [`ErrorCode::InvalidArgument`].
//!
//! Each connection belongs to the store's data session of the moment it was accepted; once a
//! rebuild has begun ([`Store::begin_rebuild`](crate::store::Store::begin_rebuild)), a
//! connection of an earlier session is closed at its next request, unanswered.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::BytesMut;
use ironhorn_proto::frame::{
    CrcMismatch, ErrorCode, FrameError, MAX_PAYLOAD, Op, RESPONSE_HEADER_LEN, Request,
    RequestCodec, Response, ResponseHeader,
};
use tokio_util::codec::Decoder;

use crate::StoreError;
use crate::store::{SECTOR_SIZE, Store};

/// Default for [`DataServerConfig::max_connections`].
pub const DEFAULT_MAX_DATA_CONNECTIONS: usize = 256;

/// A connection whose peer does not take its answers for this long is closed.
pub const DATA_WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// Smallest and largest amount asked of one `read` call; the size adapts in between.
const MIN_READ: usize = 16 << 10;
const MAX_READ: usize = 1 << 20;
/// Answers are sent early once this many bytes are waiting, even if requests remain.
const FLUSH_THRESHOLD: usize = 256 << 10;
/// A connection buffer grown past this (by a large request) is freed once empty.
const SHRINK_ABOVE: usize = 4 << 20;
/// How long `shutdown` waits to wake the accept thread with a connection to itself.
const WAKE_TIMEOUT: Duration = Duration::from_secs(1);
/// Pause after `accept` fails (e.g. out of file descriptors) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Settings of a [`DataServer`].
#[derive(Debug, Clone)]
pub struct DataServerConfig {
    /// Most connections served at once; more are refused (closed at once, with a warning).
    /// Default [`DEFAULT_MAX_DATA_CONNECTIONS`].
    pub max_connections: usize,
    /// Replica directory, for log spans.
    pub dir: PathBuf,
}

/// A running data-protocol server; [`shutdown`](Self::shutdown) (or drop) stops it.
pub struct DataServer {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    accept_thread: Option<JoinHandle<()>>,
}

/// State shared by the accept thread, the connection threads and the handle.
struct Shared {
    store: Arc<Store>,
    config: DataServerConfig,
    /// Connections being served, to close them at shutdown.
    conns: Mutex<Registry>,
    next_id: AtomicU64,
}

#[derive(Default)]
struct Registry {
    /// Set (under the lock) when shutdown begins; no connection is registered after.
    stopping: bool,
    conns: HashMap<u64, ConnEntry>,
}

struct ConnEntry {
    /// A clone of the connection's socket, to shut it down from outside.
    stream: TcpStream,
    thread: Option<JoinHandle<()>>,
}

impl Shared {
    fn registry(&self) -> MutexGuard<'_, Registry> {
        // A connection thread that panicked while holding the lock leaves the map usable.
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl DataServer {
    /// Binds `addr` (port 0 picks one) and starts accepting connections for `store`.
    pub fn bind(
        addr: SocketAddr,
        store: Arc<Store>,
        config: DataServerConfig,
    ) -> io::Result<DataServer> {
        let listener = TcpListener::bind(addr)?;
        let local_addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            store,
            config,
            conns: Mutex::new(Registry::default()),
            next_id: AtomicU64::new(0),
        });
        let accept_shared = Arc::clone(&shared);
        let accept_thread = std::thread::Builder::new()
            .name("data-accept".into())
            .spawn(move || accept_loop(&listener, &accept_shared))?;
        Ok(DataServer {
            local_addr,
            shared,
            accept_thread: Some(accept_thread),
        })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Number of connections being served.
    pub fn connection_count(&self) -> usize {
        self.shared.registry().conns.len()
    }

    /// Stops accepting, closes every connection and waits for their threads, so that no
    /// store call runs once this returns. Answers not yet sent are lost. Idempotent.
    pub fn shutdown(&mut self) {
        let Some(accept_thread) = self.accept_thread.take() else {
            return;
        };
        // From here on no connection is registered.
        self.shared.registry().stopping = true;
        // Wake the accept thread, blocked in accept(), with a connection to itself, and
        // wait for it: a connection it was registering then has its thread handle set.
        let wake_ip = match self.local_addr.ip() {
            ip if !ip.is_unspecified() => ip,
            std::net::IpAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::IpAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        };
        match TcpStream::connect_timeout(
            &SocketAddr::new(wake_ip, self.local_addr.port()),
            WAKE_TIMEOUT,
        ) {
            Ok(_) => {
                if accept_thread.join().is_err() {
                    tracing::error!("data accept thread panicked");
                }
            }
            Err(e) => tracing::warn!(
                addr = %self.local_addr,
                error = %e,
                "cannot wake the data accept thread; leaving it behind"
            ),
        }
        let conns = std::mem::take(&mut self.shared.registry().conns);
        let count = conns.len();
        for entry in conns.values() {
            let _ = entry.stream.shutdown(Shutdown::Both);
        }
        for (_, entry) in conns {
            if let Some(thread) = entry.thread
                && thread.join().is_err()
            {
                tracing::error!("data connection thread panicked");
            }
        }
        tracing::info!(addr = %self.local_addr, closed = count, "data server stopped");
    }
}

impl Drop for DataServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Accepts connections until shutdown, one thread each.
fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    loop {
        let (stream, peer) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(e) => {
                if shared.registry().stopping {
                    return;
                }
                tracing::warn!(error = %e, "data accept failed");
                std::thread::sleep(ACCEPT_BACKOFF);
                continue;
            }
        };
        // The session the connection belongs to: from the moment it was accepted.
        let session = shared.store.session();
        let mut reg = shared.registry();
        if reg.stopping {
            return;
        }
        if reg.conns.len() >= shared.config.max_connections {
            drop(reg);
            tracing::warn!(
                %peer,
                max = shared.config.max_connections,
                "refusing data connection: connection limit reached"
            );
            continue;
        }
        let clone = match stream.try_clone() {
            Ok(clone) => clone,
            Err(e) => {
                drop(reg);
                tracing::warn!(%peer, error = %e, "refusing data connection: cannot clone its socket");
                continue;
            }
        };
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        reg.conns.insert(
            id,
            ConnEntry {
                stream: clone,
                thread: None,
            },
        );
        drop(reg);
        let conn_shared = Arc::clone(shared);
        let spawned = std::thread::Builder::new()
            .name(format!("data-conn-{id}"))
            .spawn(move || {
                serve_connection(stream, peer, session, &conn_shared);
                conn_shared.registry().conns.remove(&id);
            });
        let mut reg = shared.registry();
        match spawned {
            Ok(thread) => {
                // The thread may already have finished and removed its entry.
                if let Some(entry) = reg.conns.get_mut(&id) {
                    entry.thread = Some(thread);
                }
            }
            Err(e) => {
                reg.conns.remove(&id);
                drop(reg);
                tracing::warn!(%peer, error = %e, "refusing data connection: cannot start its thread");
            }
        }
    }
}

/// Serves one connection until it closes; logs why it closed.
fn serve_connection(stream: TcpStream, peer: SocketAddr, session: u64, shared: &Shared) {
    let dir = shared.config.dir.display().to_string();
    let span = tracing::info_span!("data_conn", %peer, dir = %dir);
    let _entered = span.enter();
    if let Err(e) = stream
        .set_nodelay(true)
        .and_then(|()| stream.set_write_timeout(Some(DATA_WRITE_TIMEOUT)))
    {
        tracing::warn!(error = %e, "cannot set data socket options; closing");
        return;
    }
    tracing::debug!("data connection open");
    let writer = match stream.try_clone() {
        Ok(w) => Arc::new(Mutex::new(w)),
        Err(e) => {
            tracing::warn!(error = %e, "cannot share the data socket; closing");
            return;
        }
    };
    let (flushes, flush_queue) = mpsc::channel::<u64>();
    let store = &shared.store;
    let result = std::thread::scope(|scope| {
        let flusher_writer = Arc::clone(&writer);
        let flusher = std::thread::Builder::new()
            .name("data-flush".into())
            .spawn_scoped(scope, move || {
                flusher(store, session, &flush_queue, &flusher_writer)
            });
        if let Err(e) = flusher {
            tracing::warn!(error = %e, "cannot start the connection's flusher thread; closing");
            return None;
        }
        let mut conn = Connection {
            stream,
            writer,
            flushes,
            store,
            codec: RequestCodec::new(),
            rbuf: BytesMut::with_capacity(MIN_READ * 4),
            wbuf: BytesMut::with_capacity(MIN_READ),
            read_size: MIN_READ * 4,
            errors: ErrorLog::default(),
            session,
            stale: false,
        };
        let result = conn.run();
        conn.errors.summary();
        // Dropping the connection closes the flusher's queue: it answers what it holds and
        // ends, and the scope waits for it.
        Some(result)
    });
    let Some(result) = result else { return };
    match result {
        Ok(()) => tracing::debug!("data connection closed by peer"),
        Err(Close::Protocol(e)) => {
            tracing::warn!(reason = %e, "closing data connection: bad frame");
        }
        Err(Close::StaleSession) => {
            tracing::warn!("closing data connection: it was opened before the replica's rebuild");
        }
        Err(Close::Io(e)) => match e.kind() {
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::NotConnected => {
                tracing::info!(error = %e, "data connection lost");
            }
            _ => tracing::warn!(error = %e, "closing data connection: socket error"),
        },
    }
}

/// Why a connection loop ended (a clean close by the peer is `Ok`).
enum Close {
    /// The byte stream cannot be trusted any more.
    Protocol(FrameError),
    /// The connection belongs to a data session that a rebuild ended.
    StaleSession,
    /// Reading or writing the socket failed.
    Io(io::Error),
}

impl From<io::Error> for Close {
    fn from(e: io::Error) -> Self {
        Close::Io(e)
    }
}

/// The connection's flusher: runs the flushes the connection thread hands over, one
/// fdatasync for all that are waiting, and writes their answers. Ends when the queue is
/// closed (the connection ended) or the socket fails. If a rebuild ended the connection's
/// data session, it answers nothing and shuts the socket, as the connection thread would.
fn flusher(store: &Store, session: u64, queue: &mpsc::Receiver<u64>, writer: &Mutex<TcpStream>) {
    let mut out = BytesMut::new();
    let mut errors = ErrorLog::default();
    while let Ok(first) = queue.recv() {
        let mut ids = vec![first];
        ids.extend(queue.try_iter());
        let Some(_session) = store.enter_session(session) else {
            let w = writer.lock().unwrap_or_else(|p| p.into_inner());
            let _ = w.shutdown(Shutdown::Both);
            return;
        };
        let result = store.flush();
        out.clear();
        for id in &ids {
            let resp = match &result {
                Ok(()) => Response::ok(*id),
                Err(e) => {
                    errors.record(ErrorCode::Io, || {
                        tracing::warn!(id, error = %e, answer = %ErrorCode::Io, "flush failed");
                    });
                    Response::error(*id, ErrorCode::Io)
                }
            };
            out.extend_from_slice(&resp.encode_header());
            out.extend_from_slice(resp.payload());
        }
        let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = w.write_all(&out) {
            tracing::debug!(error = %e, "cannot answer flushes; the connection is going away");
            return;
        }
    }
    errors.summary();
}

/// One data connection: its socket, buffers and codec.
struct Connection<'a> {
    /// For reading; answers go through `writer` (shared with the flusher).
    stream: TcpStream,
    /// The socket for answers, written whole under the lock.
    writer: Arc<Mutex<TcpStream>>,
    /// Flush request ids for the flusher thread.
    flushes: mpsc::Sender<u64>,
    store: &'a Store,
    codec: RequestCodec,
    /// Bytes received and not yet decoded.
    rbuf: BytesMut,
    /// Encoded answers not yet sent.
    wbuf: BytesMut,
    /// How much the next `read` asks for (adapts between `MIN_READ` and `MAX_READ`).
    read_size: usize,
    errors: ErrorLog,
    /// The store's data session when the connection was accepted.
    session: u64,
    /// A request found the session ended: nothing more is served.
    stale: bool,
}

impl Connection<'_> {
    /// Serves requests until the peer closes (`Ok`) or something breaks.
    fn run(&mut self) -> Result<(), Close> {
        loop {
            loop {
                match self.codec.decode(&mut self.rbuf) {
                    Ok(Some(item)) => {
                        self.handle(item);
                        if self.stale {
                            // Answer what ran before; drop the rest unanswered.
                            let _ = self.send();
                            return Err(Close::StaleSession);
                        }
                        if self.wbuf.len() >= FLUSH_THRESHOLD {
                            self.send()?;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        // Answer what was valid before the bad frame, then close.
                        let _ = self.send();
                        return Err(Close::Protocol(e));
                    }
                }
            }
            self.send()?;
            if self.rbuf.is_empty() && self.rbuf.capacity() > SHRINK_ABOVE {
                self.rbuf = BytesMut::with_capacity(MIN_READ * 4);
            }
            if self.fill()? == 0 {
                return match self.codec.decode_eof(&mut self.rbuf) {
                    Ok(None) => Ok(()),
                    Ok(Some(item)) => {
                        // Cannot happen (decode already returned None), but answer it.
                        self.handle(item);
                        self.send()?;
                        Ok(())
                    }
                    Err(e) => Err(Close::Protocol(e)),
                };
            }
        }
    }

    /// Reads what the socket has into `rbuf`; returns 0 at end of stream.
    fn fill(&mut self) -> io::Result<usize> {
        let start = self.rbuf.len();
        let want = self.read_size;
        self.rbuf.resize(start + want, 0);
        let result = loop {
            match self.stream.read(&mut self.rbuf[start..]) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other,
            }
        };
        let n = *result.as_ref().unwrap_or(&0);
        self.rbuf.truncate(start + n);
        if n == want {
            self.read_size = (want * 2).min(MAX_READ);
        } else if n < want / 4 {
            self.read_size = (want / 2).max(MIN_READ);
        }
        result
    }

    /// Sends every pending answer.
    fn send(&mut self) -> io::Result<()> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        let result = self
            .writer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .write_all(&self.wbuf);
        self.wbuf.clear();
        if self.wbuf.capacity() > SHRINK_ABOVE {
            self.wbuf = BytesMut::with_capacity(MIN_READ);
        }
        result
    }

    /// Runs one decoded request and queues its answer.
    fn handle(&mut self, item: Result<Request, CrcMismatch>) {
        let req = match item {
            Ok(req) => req,
            Err(bad) => {
                self.errors.record(ErrorCode::BadCrc, || {
                    tracing::warn!(id = bad.id, reason = %bad, "request payload failed its crc");
                });
                self.queue(&Response::error(bad.id, ErrorCode::BadCrc));
                return;
            }
        };
        let store = self.store;
        let Some(_session) = store.enter_session(self.session) else {
            self.stale = true;
            return;
        };
        let (offset, length) = (req.offset(), u64::from(req.length()));
        let result = match req.op() {
            Op::Read => return self.read(&req),
            Op::Write => store.write(offset, req.payload()),
            Op::WriteZeroes => store.write_zeroes(offset, length),
            Op::Discard => store.discard(offset, length),
            Op::Flush => {
                // A plain flush goes to the flusher, which answers it when it is done.
                // (With FUA, below, the write's own answer waits for its flush.)
                if !req.fua() && self.flushes.send(req.id()).is_ok() {
                    return;
                }
                store.flush()
            }
            Op::Ping => Ok(()),
        };
        let result = match result {
            Ok(()) if req.fua() => store.flush(),
            other => other,
        };
        match result {
            Ok(()) => self.queue(&Response::ok(req.id())),
            Err(e) => self.fail(&req, &e),
        }
    }

    /// Reads straight into the write buffer: header slot, data, then the header.
    fn read(&mut self, req: &Request) {
        let (offset, length) = (req.offset(), req.length());
        // Refuse what the store would refuse before growing any buffer for it.
        let in_range = length <= MAX_PAYLOAD
            && offset.is_multiple_of(SECTOR_SIZE)
            && u64::from(length).is_multiple_of(SECTOR_SIZE)
            && offset
                .checked_add(u64::from(length))
                .is_some_and(|end| end <= self.store.size());
        if !in_range {
            let e = StoreError::InvalidRange {
                offset,
                length: u64::from(length),
                size: self.store.size(),
            };
            self.fail(req, &e);
            return;
        }
        let start = self.wbuf.len();
        let data_start = start + RESPONSE_HEADER_LEN;
        self.wbuf.resize(data_start + length as usize, 0);
        if let Err(e) = self.store.read(offset, &mut self.wbuf[data_start..]) {
            self.wbuf.truncate(start);
            self.fail(req, &e);
            return;
        }
        let payload = &self.wbuf[data_start..];
        let header = ResponseHeader {
            status: Ok(()),
            id: req.id(),
            length,
            payload_crc: if payload.is_empty() {
                0
            } else {
                crc32fast::hash(payload)
            },
        };
        self.wbuf[start..data_start].copy_from_slice(&header.encode());
    }

    /// Queues the error answer for a failed store call and logs it.
    fn fail(&mut self, req: &Request, err: &StoreError) {
        let code = match err {
            StoreError::InvalidRange { .. } => ErrorCode::InvalidArgument,
            StoreError::NoSpace { .. } => ErrorCode::NoSpace,
            _ => ErrorCode::Io,
        };
        self.errors.record(code, || {
            tracing::warn!(
                id = req.id(),
                op = ?req.op(),
                offset = req.offset(),
                length = req.length(),
                error = %err,
                answer = %code,
                "data request failed"
            );
        });
        self.queue(&Response::error(req.id(), code));
    }

    /// Appends an answer (header and payload) to the write buffer.
    fn queue(&mut self, resp: &Response) {
        self.wbuf.extend_from_slice(&resp.encode_header());
        self.wbuf.extend_from_slice(resp.payload());
    }
}

/// Logs the first failure of each kind on a connection as a warning and later ones at
/// debug level, so that a failing disk or a confused client does not flood the log.
#[derive(Default)]
struct ErrorLog {
    seen: [bool; 8],
    repeated: u64,
}

impl ErrorLog {
    /// Logs with `warn` on the first `code` of this connection, else counts it.
    fn record(&mut self, code: ErrorCode, warn: impl FnOnce()) {
        let slot = (code.code() as usize).min(self.seen.len() - 1);
        if self.seen[slot] {
            self.repeated += 1;
            tracing::debug!(answer = %code, "data request failed again");
        } else {
            self.seen[slot] = true;
            warn();
        }
    }

    /// Logs how many failures were not logged as warnings.
    fn summary(&self) {
        if self.repeated > 0 {
            tracing::warn!(
                count = self.repeated,
                "further failed data requests on this connection (logged at debug level)"
            );
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::io::{Read, Write};
    use std::time::Instant;

    use bytes::Bytes;
    use ironhorn_proto::frame::{RequestCodec, ResponseCodec};
    use tokio_util::codec::Encoder;

    use super::*;

    fn start(addr: &str, max_connections: usize) -> (tempfile::TempDir, DataServer) {
        let tmp = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open_or_create(tmp.path(), Some(1 << 20)).unwrap());
        let config = DataServerConfig {
            max_connections,
            dir: tmp.path().to_owned(),
        };
        let server = DataServer::bind(addr.parse().unwrap(), store, config).unwrap();
        (tmp, server)
    }

    fn connect(server: &DataServer) -> TcpStream {
        let port = server.local_addr().port();
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    }

    fn call(s: &mut TcpStream, req: Request) -> Response {
        let mut buf = BytesMut::new();
        RequestCodec::new().encode(req, &mut buf).unwrap();
        s.write_all(&buf).unwrap();
        let mut rbuf = BytesMut::new();
        let mut codec = ResponseCodec::new();
        loop {
            if let Some(item) = codec.decode(&mut rbuf).unwrap() {
                return item.unwrap();
            }
            let mut chunk = [0u8; 8192];
            let n = s.read(&mut chunk).unwrap();
            assert!(n > 0, "closed");
            rbuf.extend_from_slice(&chunk[..n]);
        }
    }

    fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn shutdown_closes_connections_and_is_idempotent() {
        // Bound to the unspecified address: shutdown wakes accept through loopback.
        let (_tmp, mut server) = start("0.0.0.0:0", 8);
        let mut a = connect(&server);
        let mut b = connect(&server);
        let data = Bytes::from(vec![3u8; 4096]);
        let resp = call(&mut a, Request::write(1, 0, data.clone(), true).unwrap());
        assert_eq!(resp.status(), Ok(()));
        let resp = call(&mut b, Request::read(2, 0, 4096).unwrap());
        assert_eq!(resp.into_result().unwrap(), data);
        assert_eq!(server.connection_count(), 2);

        let started = Instant::now();
        server.shutdown();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(server.connection_count(), 0);
        for s in [&mut a, &mut b] {
            let mut byte = [0u8; 1];
            assert!(matches!(s.read(&mut byte), Ok(0) | Err(_)));
        }
        // No longer accepting.
        let port = server.local_addr().port();
        assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
        server.shutdown();
    }

    #[test]
    fn connections_leave_the_registry_when_closed() {
        let (_tmp, server) = start("127.0.0.1:0", 1);
        let mut a = connect(&server);
        assert_eq!(call(&mut a, Request::ping(1)).status(), Ok(()));
        // The limit is 1: a second connection is closed at once.
        let mut refused = connect(&server);
        let mut byte = [0u8; 1];
        assert!(matches!(refused.read(&mut byte), Ok(0) | Err(_)));
        drop(a);
        wait_for("the closed connection to leave", || {
            server.connection_count() == 0
        });
        let mut c = connect(&server);
        assert_eq!(call(&mut c, Request::ping(2)).status(), Ok(()));
    }

    /// Pipelined writes and flushes on one connection: the flushes go to the flusher
    /// thread (several may be answered by one fdatasync), every request gets exactly one
    /// answer, and the data is there.
    #[test]
    fn pipelined_flushes_are_each_answered_once() {
        let (_tmp, server) = start("127.0.0.1:0", 8);
        let mut s = connect(&server);
        let mut buf = BytesMut::new();
        let mut codec = RequestCodec::new();
        let mut want = std::collections::BTreeSet::new();
        for i in 0..40u64 {
            let req = if i % 3 == 2 {
                Request::flush(i)
            } else {
                Request::write(i, (i % 16) * 4096, Bytes::from(vec![i as u8; 4096]), false).unwrap()
            };
            codec.encode(req, &mut buf).unwrap();
            want.insert(i);
        }
        s.write_all(&buf).unwrap();
        let mut rbuf = BytesMut::new();
        let mut responses = ResponseCodec::new();
        let mut got = std::collections::BTreeSet::new();
        while got.len() < want.len() {
            if let Some(item) = responses.decode(&mut rbuf).unwrap() {
                let resp = item.unwrap();
                assert_eq!(resp.status(), Ok(()), "request {}", resp.id());
                assert!(
                    got.insert(resp.id()),
                    "request {} answered twice",
                    resp.id()
                );
                continue;
            }
            let mut chunk = [0u8; 8192];
            let n = s.read(&mut chunk).unwrap();
            assert!(n > 0, "closed with {} of {} answers", got.len(), want.len());
            rbuf.extend_from_slice(&chunk[..n]);
        }
        assert_eq!(got, want);
        // Block 0 was written by requests 0 and 16 (32 is a flush): 16's data is there.
        let resp = call(&mut s, Request::read(100, 0, 4096).unwrap());
        assert_eq!(resp.into_result().unwrap(), Bytes::from(vec![16u8; 4096]));
    }

    #[test]
    fn error_log_warns_once_per_code() {
        let mut log = ErrorLog::default();
        let mut warned = 0;
        for _ in 0..3 {
            log.record(ErrorCode::Io, || warned += 1);
        }
        log.record(ErrorCode::InvalidArgument, || warned += 1);
        assert_eq!((warned, log.repeated), (2, 2));
    }
}
