//! The transmission phase: requests in, device calls, replies out, for one connection.
//!
//! # Shape (DESIGN.md §8)
//!
//! One task per connection drives everything from a single hand-written poll loop, so no
//! request ever crosses a channel or another task on its way through:
//!
//! - **read**: the socket is read into one [`BytesMut`] in large chunks; every complete
//!   request in it is parsed at once. A write's payload is split off that buffer and frozen
//!   into [`Bytes`] — the bytes read from the socket are the bytes the device gets, no copy.
//! - **dispatch**: each request becomes one future (`execute`) in a [`FuturesUnordered`]; it
//!   is polled right away in the same pass, so a device that answers without waiting costs
//!   no extra wake-up, and a slow request never holds back the ones behind it. Replies leave
//!   in completion order.
//! - **write**: finished replies are queued as (small inline header, payload [`Bytes`]) and
//!   every pass writes all of them with one vectored write: a batch of replies is one
//!   `writev`, and read payloads go from the device's buffer to the socket uncopied.
//!
//! Reading pauses while [`MAX_IN_FLIGHT`] requests are running or [`MAX_QUEUED_REPLY_BYTES`]
//! wait to be written (a client that does not read its replies cannot grow our memory).
//! Per request the only allocations are the payload buffers and the `FuturesUnordered` task
//! node (one small allocation; a spawned task would cost the same plus a scheduler hop).
//!
//! # Ending
//!
//! `NBD_CMD_DISC`, end of input, a protocol error or shutdown all stop reading; the requests
//! already running still finish and their replies are still sent (as far as the socket
//! allows), then the socket is shut down. Device futures are never dropped half-way, except
//! when shutdown's grace period ([`SHUTDOWN_GRACE`]) runs out.

use std::collections::VecDeque;
use std::future::{Future, poll_fn};
use std::io::IoSlice;
use std::pin::{Pin, pin};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::time::Sleep;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tracing::{debug, error};

use super::NbdExport;
use super::error::NbdConnError;
use super::handshake::Negotiated;
use super::proto::*;
use crate::device::{BlockDevice, Extent};

/// Most requests of one connection running at once; reading pauses beyond it.
pub const MAX_IN_FLIGHT: usize = 512;
/// Most reply bytes waiting for the socket before reading pauses.
pub const MAX_QUEUED_REPLY_BYTES: usize = 64 << 20;
/// Size of each read buffer allocation (many requests are read per `read`).
pub const READ_BUFFER: usize = 256 << 10;
/// How long running requests get to finish after shutdown before the connection is dropped.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Reserve a new read buffer when less than this is free in the current one.
const MIN_READ_SPACE: usize = 16 << 10;
/// Most iovecs per `writev` (Linux allows 1024).
const MAX_IOVECS: usize = 256;
/// Passes of the poll loop before yielding to other tasks.
const MAX_PASSES: usize = 32;
/// Longest inline reply header: structured header (20) + offset (8).
const HEAD_CAP: usize = STRUCTURED_HEADER_LEN + 8;

/// What every request of a connection needs to know about the negotiation.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ctx {
    structured: bool,
    base_allocation: bool,
    read_only: bool,
}

/// One parsed request with its payload (empty unless a write).
#[derive(Debug)]
pub(crate) struct Request {
    header: RequestHeader,
    payload: Bytes,
}

/// One reply ready to be written: an inline header and a payload that is sent as is.
#[derive(Debug)]
pub(crate) struct Reply {
    head: [u8; HEAD_CAP],
    head_len: u8,
    body: Bytes,
}

impl Reply {
    fn len(&self) -> usize {
        usize::from(self.head_len) + self.body.len()
    }

    fn head(&self) -> &[u8] {
        &self.head[..usize::from(self.head_len)]
    }

    /// A simple reply; `body` is read data (only for a successful simple read).
    fn simple(cookie: u64, error: u32, body: Bytes) -> Reply {
        let mut head = [0u8; HEAD_CAP];
        head[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        head[4..8].copy_from_slice(&error.to_be_bytes());
        head[8..16].copy_from_slice(&cookie.to_be_bytes());
        Reply {
            head,
            head_len: SIMPLE_REPLY_LEN as u8,
            body,
        }
    }

    /// A structured chunk whose payload is `extra` (inline, at most 8 bytes) then `body`.
    fn chunk(flags: u16, kind: u16, cookie: u64, extra: &[u8], body: Bytes) -> Reply {
        let mut head = [0u8; HEAD_CAP];
        let extra_len = extra.len().min(HEAD_CAP - STRUCTURED_HEADER_LEN);
        // Payloads are at most MAX_PAYLOAD + 8 bytes, far below u32::MAX.
        let len = u32::try_from(extra_len + body.len()).unwrap_or(u32::MAX);
        head[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        head[4..6].copy_from_slice(&flags.to_be_bytes());
        head[6..8].copy_from_slice(&kind.to_be_bytes());
        head[8..16].copy_from_slice(&cookie.to_be_bytes());
        head[16..20].copy_from_slice(&len.to_be_bytes());
        head[20..20 + extra_len].copy_from_slice(&extra[..extra_len]);
        Reply {
            head,
            head_len: (STRUCTURED_HEADER_LEN + extra_len) as u8,
            body,
        }
    }

    /// An error: a structured `NBD_REPLY_TYPE_ERROR` chunk with a message when structured
    /// replies are on (required for reads), else a simple reply.
    fn error(ctx: Ctx, cookie: u64, errno: u32, msg: &'static str) -> Reply {
        if ctx.structured {
            let mut extra = [0u8; 6];
            extra[0..4].copy_from_slice(&errno.to_be_bytes());
            // Messages are short static strings.
            extra[4..6].copy_from_slice(&(msg.len().min(u16::MAX as usize) as u16).to_be_bytes());
            Reply::chunk(
                REPLY_FLAG_DONE,
                REPLY_TYPE_ERROR,
                cookie,
                &extra,
                Bytes::from_static(msg.as_bytes()),
            )
        } else {
            Reply::simple(cookie, errno, Bytes::new())
        }
    }

    /// Success without data (a simple reply is allowed even with structured replies on).
    fn ok(cookie: u64) -> Reply {
        Reply::simple(cookie, 0, Bytes::new())
    }

    /// Successful read.
    fn data(ctx: Ctx, cookie: u64, offset: u64, data: Bytes) -> Reply {
        if ctx.structured {
            Reply::chunk(
                REPLY_FLAG_DONE,
                REPLY_TYPE_OFFSET_DATA,
                cookie,
                &offset.to_be_bytes(),
                data,
            )
        } else {
            Reply::simple(cookie, 0, data)
        }
    }
}

/// Encodes a `base:allocation` block-status payload for `[.., len)` from the device's extents:
/// clamped to `len`, empty extents dropped, equal neighbours merged, one descriptor with
/// `REQ_ONE`, and never empty (status 0 — "allocated, contents unknown" — is always true).
fn block_status_payload(extents: &[Extent], len: u32, req_one: bool) -> Bytes {
    let mut out = Vec::with_capacity(4 + 8 * extents.len().clamp(1, 64));
    out.extend_from_slice(&META_BASE_ALLOCATION_ID.to_be_bytes());
    let mut left = u64::from(len);
    let mut last: Option<(u32, u32)> = None;
    let push = |out: &mut Vec<u8>, (l, s): (u32, u32)| {
        out.extend_from_slice(&l.to_be_bytes());
        out.extend_from_slice(&s.to_be_bytes());
    };
    for e in extents {
        if left == 0 {
            break;
        }
        let l = e.length.min(left);
        if l == 0 {
            continue;
        }
        left -= l;
        let status =
            if e.hole { STATE_HOLE } else { 0 } | if e.zero || e.hole { STATE_ZERO } else { 0 };
        // `l <= len <= u32::MAX`.
        let l = l as u32;
        last = match last {
            Some((pl, ps)) if ps == status => Some((pl + l, ps)),
            Some(prev) => {
                push(&mut out, prev);
                if req_one {
                    return Bytes::from(out);
                }
                Some((l, status))
            }
            None => Some((l, status)),
        };
    }
    push(&mut out, last.unwrap_or((len, 0)));
    Bytes::from(out)
}

/// Checks a request against negotiation, flags, alignment and the device's current size.
fn check<D: BlockDevice>(dev: &D, ctx: Ctx, h: &RequestHeader) -> Result<(), (u32, &'static str)> {
    let allowed = match h.kind {
        CMD_READ if ctx.structured => CMD_FLAG_FUA | CMD_FLAG_DF,
        CMD_READ | CMD_WRITE | CMD_FLUSH | CMD_TRIM => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
        CMD_BLOCK_STATUS => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
        _ => return Err((NBD_EINVAL, "unknown command")),
    };
    if h.flags & !allowed != 0 {
        return Err((NBD_EINVAL, "command flags not supported for this command"));
    }
    if h.kind == CMD_FLUSH {
        return Ok(());
    }
    if h.kind == CMD_BLOCK_STATUS && !(ctx.structured && ctx.base_allocation) {
        return Err((NBD_EINVAL, "block status needs the base:allocation context"));
    }
    let writes = matches!(h.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && ctx.read_only {
        return Err((NBD_EPERM, "export is read-only"));
    }
    if h.length == 0 {
        return Err((NBD_EINVAL, "zero length"));
    }
    if h.kind == CMD_READ && h.length > MAX_PAYLOAD {
        return Err((NBD_EINVAL, "read larger than the maximum block size"));
    }
    let align = u64::from(MIN_BLOCK_SIZE);
    if !h.offset.is_multiple_of(align) || !u64::from(h.length).is_multiple_of(align) {
        return Err((NBD_EINVAL, "offset or length not 512-byte aligned"));
    }
    match h.offset.checked_add(u64::from(h.length)) {
        Some(end) if end <= dev.size() => Ok(()),
        // ENOSPC for data that cannot be stored (the spec's advice for writes); a trim or
        // read past the end is just an invalid range.
        _ if matches!(h.kind, CMD_WRITE | CMD_WRITE_ZEROES) => {
            Err((NBD_ENOSPC, "beyond the end of the device"))
        }
        _ => Err((NBD_EINVAL, "beyond the end of the device")),
    }
}

/// Runs one request against the device and builds its reply.
pub(crate) async fn execute<D: BlockDevice>(dev: &D, ctx: Ctx, req: Request) -> Reply {
    let h = req.header;
    if let Err((errno, msg)) = check(dev, ctx, &h) {
        debug!(
            kind = h.kind,
            offset = h.offset,
            length = h.length,
            errno,
            msg,
            "request refused"
        );
        return Reply::error(ctx, h.cookie, errno, msg);
    }
    let fua = h.flags & CMD_FLAG_FUA != 0;
    let done = |r: crate::device::DeviceResult<()>, what: &'static str| match r {
        Ok(()) => Reply::ok(h.cookie),
        Err(e) => {
            debug!(offset = h.offset, length = h.length, errno = e.0, "{what}");
            Reply::error(ctx, h.cookie, nbd_errno(e.0), what)
        }
    };
    match h.kind {
        CMD_READ => match dev.read(h.offset, h.length).await {
            Ok(data) if data.len() == h.length as usize => {
                Reply::data(ctx, h.cookie, h.offset, data)
            }
            Ok(data) => {
                error!(
                    offset = h.offset,
                    length = h.length,
                    got = data.len(),
                    "device returned a read of the wrong length"
                );
                Reply::error(
                    ctx,
                    h.cookie,
                    NBD_EIO,
                    "read failed: wrong length from device",
                )
            }
            Err(e) => {
                debug!(
                    offset = h.offset,
                    length = h.length,
                    errno = e.0,
                    "read failed"
                );
                Reply::error(ctx, h.cookie, nbd_errno(e.0), "read failed")
            }
        },
        CMD_WRITE => done(dev.write(h.offset, req.payload, fua).await, "write failed"),
        CMD_FLUSH => done(dev.flush().await, "flush failed"),
        CMD_TRIM => done(
            dev.trim(h.offset, u64::from(h.length), fua).await,
            "trim failed",
        ),
        CMD_WRITE_ZEROES => done(
            dev.write_zeroes(h.offset, u64::from(h.length), fua).await,
            "write zeroes failed",
        ),
        CMD_BLOCK_STATUS => match dev.block_status(h.offset, u64::from(h.length)).await {
            Ok(extents) => Reply::chunk(
                REPLY_FLAG_DONE,
                REPLY_TYPE_BLOCK_STATUS,
                h.cookie,
                &[],
                block_status_payload(&extents, h.length, h.flags & CMD_FLAG_REQ_ONE != 0),
            ),
            Err(e) => {
                debug!(
                    offset = h.offset,
                    length = h.length,
                    errno = e.0,
                    "block status failed"
                );
                Reply::error(ctx, h.cookie, nbd_errno(e.0), "block status failed")
            }
        },
        // `check` refused every other kind.
        _ => Reply::error(ctx, h.cookie, NBD_EINVAL, "unknown command"),
    }
}

/// Runs the transmission phase of one connection until it ends; returns how many requests
/// were served.
pub(crate) async fn transmission<S, D>(
    stream: S,
    export: &NbdExport<D>,
    neg: Negotiated,
    shutdown: &CancellationToken,
) -> Result<u64, NbdConnError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    D: BlockDevice,
{
    let device: &D = &export.device;
    let ctx = Ctx {
        structured: neg.structured,
        base_allocation: neg.base_allocation,
        read_only: export.read_only,
    };
    let mut conn = Conn {
        stream,
        start: move |req| execute(device, ctx, req),
        rbuf: BytesMut::with_capacity(READ_BUFFER),
        need: REQUEST_LEN,
        inflight: FuturesUnordered::new(),
        out: VecDeque::with_capacity(64),
        out_written: 0,
        out_bytes: 0,
        needs_flush: false,
        reading: true,
        write_failed: false,
        result: Ok(()),
        cancel: Box::pin(shutdown.clone().cancelled_owned()),
        drain_deadline: None,
        requests: 0,
    };
    poll_fn(|cx| conn.poll_run(cx)).await
}

/// State of one connection in transmission. `start` turns a request into its future `F`
/// (a closure, so the opaque future type of `execute` need not be named).
struct Conn<S, F, M> {
    stream: S,
    start: M,
    /// Bytes read and not yet parsed.
    rbuf: BytesMut,
    /// Bytes the next message needs in `rbuf` (header, or header + write payload).
    need: usize,
    inflight: FuturesUnordered<F>,
    /// Replies waiting for the socket; the first one may be partly written.
    out: VecDeque<Reply>,
    /// Bytes of `out[0]` already written.
    out_written: usize,
    /// Bytes of `out` not yet written.
    out_bytes: usize,
    /// Something was written since the last flush.
    needs_flush: bool,
    /// Still reading requests.
    reading: bool,
    /// The socket failed for writing: replies are dropped.
    write_failed: bool,
    /// First error that ended (or will end) the connection.
    result: Result<(), NbdConnError>,
    cancel: Pin<Box<WaitForCancellationFutureOwned>>,
    drain_deadline: Option<Pin<Box<Sleep>>>,
    requests: u64,
}

impl<S, F, M> Conn<S, F, M>
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: Future<Output = Reply>,
    M: FnMut(Request) -> F,
{
    fn poll_run(&mut self, cx: &mut Context<'_>) -> Poll<Result<u64, NbdConnError>> {
        for _ in 0..MAX_PASSES {
            let mut progress = false;
            if self.reading && self.cancel.as_mut().poll(cx).is_ready() {
                debug!("shutdown: no more requests are read");
                self.reading = false;
                self.drain_deadline = Some(Box::pin(tokio::time::sleep(SHUTDOWN_GRACE)));
            }
            if self.reading {
                progress |= self.poll_requests(cx);
            }
            progress |= self.poll_inflight(cx);
            if !self.out.is_empty() {
                progress |= self.poll_write(cx);
            }
            if self.needs_flush && self.out.is_empty() {
                match Pin::new(&mut self.stream).poll_flush(cx) {
                    Poll::Ready(Ok(())) => self.needs_flush = false,
                    Poll::Ready(Err(e)) => {
                        self.write_error(e);
                        progress = true;
                    }
                    Poll::Pending => {}
                }
            }
            let drained = !self.reading && self.inflight.is_empty() && self.out.is_empty();
            if drained && (!self.needs_flush || self.write_failed) {
                // Half-close so the client sees end of stream; errors no longer matter.
                if !self.write_failed && Pin::new(&mut self.stream).poll_shutdown(cx).is_pending() {
                    return Poll::Pending;
                }
                let result = std::mem::replace(&mut self.result, Ok(()));
                return Poll::Ready(result.map(|()| self.requests));
            }
            if let Some(deadline) = self.drain_deadline.as_mut()
                && deadline.as_mut().poll(cx).is_ready()
            {
                return Poll::Ready(Err(NbdConnError::DrainTimeout(SHUTDOWN_GRACE)));
            }
            if !progress {
                return Poll::Pending;
            }
        }
        // Still busy: let other connections run, then continue.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Records the first error and stops reading.
    fn fail(&mut self, e: NbdConnError) {
        if self.result.is_ok() {
            self.result = Err(e);
        }
        self.reading = false;
    }

    fn write_error(&mut self, e: std::io::Error) {
        self.fail(NbdConnError::Io {
            op: "write replies",
            source: e,
        });
        self.write_failed = true;
        self.out.clear();
        self.out_bytes = 0;
        self.out_written = 0;
    }

    fn has_room(&self) -> bool {
        self.inflight.len() < MAX_IN_FLIGHT && self.out_bytes < MAX_QUEUED_REPLY_BYTES
    }

    /// Parses and dispatches buffered requests, reading more while there is room.
    fn poll_requests(&mut self, cx: &mut Context<'_>) -> bool {
        let mut progress = false;
        loop {
            while self.reading && self.has_room() {
                match self.parse_one() {
                    Ok(Some(req)) => self.dispatch(req),
                    Ok(None) => break,
                    Err(e) => self.fail(e),
                }
                progress = true;
            }
            if !self.reading || !self.has_room() {
                return progress;
            }
            let want = self
                .need
                .saturating_sub(self.rbuf.len())
                .max(MIN_READ_SPACE);
            if self.rbuf.capacity() - self.rbuf.len() < want {
                self.rbuf.reserve(want.max(READ_BUFFER));
            }
            let read = pin!(self.stream.read_buf(&mut self.rbuf)).poll(cx);
            match read {
                Poll::Pending => return progress,
                Poll::Ready(Ok(0)) => {
                    if self.rbuf.is_empty() {
                        debug!("client closed its side of the connection");
                        self.reading = false;
                    } else {
                        self.fail(NbdConnError::TruncatedRequest(self.rbuf.len()));
                    }
                    return true;
                }
                Poll::Ready(Ok(_)) => progress = true,
                Poll::Ready(Err(e)) => {
                    self.fail(NbdConnError::Io {
                        op: "read requests",
                        source: e,
                    });
                    return true;
                }
            }
        }
    }

    /// Takes one complete request off the read buffer, if there is one.
    fn parse_one(&mut self) -> Result<Option<Request>, NbdConnError> {
        let Some(Ok(raw)) = self
            .rbuf
            .get(..REQUEST_LEN)
            .map(<&[u8; REQUEST_LEN]>::try_from)
        else {
            self.need = REQUEST_LEN;
            return Ok(None);
        };
        let header = RequestHeader::parse(raw);
        if header.magic != REQUEST_MAGIC {
            return Err(NbdConnError::BadRequestMagic(header.magic));
        }
        let payload_len = if header.kind == CMD_WRITE {
            if header.length > MAX_PAYLOAD {
                return Err(NbdConnError::OversizedWrite {
                    len: header.length,
                    max: MAX_PAYLOAD,
                });
            }
            header.length as usize
        } else {
            0
        };
        if self.rbuf.len() < REQUEST_LEN + payload_len {
            self.need = REQUEST_LEN + payload_len;
            return Ok(None);
        }
        self.rbuf.advance(REQUEST_LEN);
        let payload = if payload_len > 0 {
            self.rbuf.split_to(payload_len).freeze()
        } else {
            Bytes::new()
        };
        self.need = REQUEST_LEN;
        Ok(Some(Request { header, payload }))
    }

    fn dispatch(&mut self, req: Request) {
        if req.header.kind == CMD_DISC {
            debug!("client sent NBD_CMD_DISC");
            self.reading = false;
            return;
        }
        self.requests += 1;
        self.inflight.push((self.start)(req));
    }

    /// Collects finished requests' replies.
    fn poll_inflight(&mut self, cx: &mut Context<'_>) -> bool {
        let mut progress = false;
        while let Poll::Ready(Some(reply)) = self.inflight.poll_next_unpin(cx) {
            progress = true;
            if !self.write_failed {
                self.out_bytes += reply.len();
                self.out.push_back(reply);
            }
        }
        progress
    }

    /// Writes as much of the queued replies as the socket takes, in one vectored write.
    fn poll_write(&mut self, cx: &mut Context<'_>) -> bool {
        let mut iov = [IoSlice::new(&[]); MAX_IOVECS];
        let mut n = 0;
        let mut skip = self.out_written;
        for reply in &self.out {
            if n + 2 > MAX_IOVECS {
                break;
            }
            let head = reply.head();
            if skip < head.len() {
                iov[n] = IoSlice::new(&head[skip..]);
                n += 1;
                if !reply.body.is_empty() {
                    iov[n] = IoSlice::new(&reply.body);
                    n += 1;
                }
            } else {
                iov[n] = IoSlice::new(&reply.body[skip - head.len()..]);
                n += 1;
            }
            skip = 0;
        }
        match Pin::new(&mut self.stream).poll_write_vectored(cx, &iov[..n]) {
            Poll::Pending => false,
            Poll::Ready(Ok(0)) => {
                self.write_error(std::io::ErrorKind::WriteZero.into());
                true
            }
            Poll::Ready(Ok(written)) => {
                self.needs_flush = true;
                self.consume_out(written);
                true
            }
            Poll::Ready(Err(e)) => {
                self.write_error(e);
                true
            }
        }
    }

    /// Drops `written` bytes off the front of the reply queue.
    fn consume_out(&mut self, mut written: usize) {
        self.out_bytes = self.out_bytes.saturating_sub(written);
        while written > 0 {
            let Some(front) = self.out.front() else {
                break;
            };
            let left = front.len() - self.out_written;
            if written >= left {
                written -= left;
                self.out.pop_front();
                self.out_written = 0;
            } else {
                self.out_written += written;
                written = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(length: u64, hole: bool, zero: bool) -> Extent {
        Extent { length, hole, zero }
    }

    fn descriptors(b: &Bytes) -> Vec<(u32, u32)> {
        assert_eq!(&b[0..4], &META_BASE_ALLOCATION_ID.to_be_bytes());
        b[4..]
            .chunks(8)
            .map(|c| {
                (
                    u32::from_be_bytes([c[0], c[1], c[2], c[3]]),
                    u32::from_be_bytes([c[4], c[5], c[6], c[7]]),
                )
            })
            .collect()
    }

    #[test]
    fn block_status_merges_clamps_and_never_is_empty() {
        let e = [
            ext(4096, false, false),
            ext(4096, false, false),
            ext(8192, true, true),
            ext(0, false, false),
            ext(1 << 20, false, true),
        ];
        let b = block_status_payload(&e, 20480, false);
        assert_eq!(
            descriptors(&b),
            vec![
                (8192, 0),
                (8192, STATE_HOLE | STATE_ZERO),
                (4096, STATE_ZERO)
            ]
        );
        let b = block_status_payload(&e, 20480, true);
        assert_eq!(descriptors(&b), vec![(8192, 0)]);
        let b = block_status_payload(&[], 512, false);
        assert_eq!(descriptors(&b), vec![(512, 0)]);
        let b = block_status_payload(&[ext(512, true, false)], 512, false);
        assert_eq!(descriptors(&b), vec![(512, STATE_HOLE | STATE_ZERO)]);
    }

    #[test]
    fn replies_encode_headers() {
        let ctx = Ctx {
            structured: true,
            base_allocation: false,
            read_only: false,
        };
        let r = Reply::data(ctx, 7, 4096, Bytes::from_static(b"abcd"));
        assert_eq!(r.head_len as usize, 28);
        assert_eq!(&r.head()[0..4], &STRUCTURED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&r.head()[16..20], &12u32.to_be_bytes());
        assert_eq!(&r.head()[20..28], &4096u64.to_be_bytes());
        assert_eq!(r.len(), 32);
        let e = Reply::error(ctx, 7, NBD_EINVAL, "bad");
        assert_eq!(&e.head()[6..8], &REPLY_TYPE_ERROR.to_be_bytes());
        assert_eq!(&e.head()[16..20], &9u32.to_be_bytes());
        assert_eq!(&e.head()[20..24], &NBD_EINVAL.to_be_bytes());
        assert_eq!(&e.head()[24..26], &3u16.to_be_bytes());
        let simple = Reply::error(
            Ctx {
                structured: false,
                ..ctx
            },
            9,
            NBD_EIO,
            "x",
        );
        assert_eq!(simple.len(), 16);
        assert_eq!(&simple.head()[4..8], &NBD_EIO.to_be_bytes());
    }
}
