//! Protocol tests of the NBD server through an in-memory pipe and a hand-written client:
//! option haggling, out-of-order replies, draining on disconnect and shutdown, bad input.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::proto::*;
use super::*;
use crate::device::{DeviceError, DeviceResult};

const SIZE: u64 = 1 << 20;
const T: Duration = Duration::from_secs(5);

/// A plain in-memory device whose reads at [`GATED`] wait for `gate`.
struct Mem {
    data: Mutex<Vec<u8>>,
    gate: Notify,
}

const GATED: u64 = 0;

impl Mem {
    fn new() -> Arc<Mem> {
        Arc::new(Mem {
            data: Mutex::new(vec![0; SIZE as usize]),
            gate: Notify::new(),
        })
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.data.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl BlockDevice for Mem {
    fn size(&self) -> u64 {
        SIZE
    }
    async fn read(&self, offset: u64, len: u32) -> DeviceResult<Bytes> {
        if offset == GATED {
            self.gate.notified().await;
        }
        let d = self.lock();
        Ok(Bytes::copy_from_slice(
            &d[offset as usize..offset as usize + len as usize],
        ))
    }
    async fn write(&self, offset: u64, data: Bytes, _fua: bool) -> DeviceResult<()> {
        self.lock()[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
        Ok(())
    }
    async fn write_zeroes(&self, offset: u64, len: u64, _fua: bool) -> DeviceResult<()> {
        self.lock()[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
    async fn trim(&self, _offset: u64, _len: u64, _fua: bool) -> DeviceResult<()> {
        Err(DeviceError::EOPNOTSUPP)
    }
    async fn flush(&self) -> DeviceResult<()> {
        Ok(())
    }
}

struct Harness {
    client: DuplexStream,
    server: JoinHandle<Result<(), NbdConnError>>,
    shutdown: CancellationToken,
    dev: Arc<Mem>,
}

fn start(name: &str, read_only: bool) -> Harness {
    let dev = Mem::new();
    let export = Arc::new(NbdExport {
        name: name.to_owned(),
        device: dev.clone(),
        read_only,
    });
    let (client, server_end) = duplex(4 << 20);
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    let server = tokio::spawn(async move { serve_connection(server_end, &export, &token).await });
    Harness {
        client,
        server,
        shutdown,
        dev,
    }
}

async fn within<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(T, f).await.expect("timed out")
}

impl Harness {
    /// Reads the greeting and sends client flags.
    async fn hello(&mut self, client_flags: u32) {
        let mut g = [0u8; 18];
        within(self.client.read_exact(&mut g))
            .await
            .expect("greeting");
        assert_eq!(&g[0..8], &NBD_MAGIC.to_be_bytes());
        assert_eq!(&g[8..16], &IHAVEOPT.to_be_bytes());
        assert_eq!(
            &g[16..18],
            &(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes()
        );
        self.client.write_u32(client_flags).await.expect("flags");
    }

    async fn option(&mut self, option: u32, data: &[u8]) {
        let mut b = Vec::new();
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.client.write_all(&b).await.expect("send option");
    }

    /// Reads one option reply: (type, data).
    async fn opt_reply(&mut self, option: u32) -> (u32, Vec<u8>) {
        let mut h = [0u8; 20];
        within(self.client.read_exact(&mut h))
            .await
            .expect("option reply");
        assert_eq!(&h[0..8], &OPTION_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&h[8..12], &option.to_be_bytes());
        let kind = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
        let len = u32::from_be_bytes([h[16], h[17], h[18], h[19]]) as usize;
        let mut d = vec![0u8; len];
        within(self.client.read_exact(&mut d))
            .await
            .expect("option reply data");
        (kind, d)
    }

    /// Handshake up to transmission with `NBD_OPT_GO`; returns the transmission flags.
    async fn go(&mut self, name: &str, structured: bool, meta: bool) -> u16 {
        self.hello(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
        if structured {
            self.option(OPT_STRUCTURED_REPLY, &[]).await;
            assert_eq!(self.opt_reply(OPT_STRUCTURED_REPLY).await.0, REP_ACK);
        }
        if meta {
            self.option(OPT_SET_META_CONTEXT, &meta_data(name, &["base:allocation"]))
                .await;
            let (k, d) = self.opt_reply(OPT_SET_META_CONTEXT).await;
            assert_eq!(k, REP_META_CONTEXT);
            assert_eq!(&d[0..4], &META_BASE_ALLOCATION_ID.to_be_bytes());
            assert_eq!(&d[4..], b"base:allocation");
            assert_eq!(self.opt_reply(OPT_SET_META_CONTEXT).await.0, REP_ACK);
        }
        self.option(OPT_GO, &info_data(name, &[])).await;
        let mut flags = None;
        loop {
            let (k, d) = self.opt_reply(OPT_GO).await;
            match k {
                REP_INFO if d[0..2] == INFO_EXPORT.to_be_bytes() => {
                    assert_eq!(&d[2..10], &SIZE.to_be_bytes());
                    flags = Some(u16::from_be_bytes([d[10], d[11]]));
                }
                REP_INFO => {}
                REP_ACK => break,
                other => panic!("unexpected reply {other:#x} to NBD_OPT_GO"),
            }
        }
        flags.expect("NBD_INFO_EXPORT sent")
    }

    async fn request(&mut self, kind: u16, flags: u16, cookie: u64, offset: u64, len: u32) {
        let h = RequestHeader {
            magic: REQUEST_MAGIC,
            flags,
            kind,
            cookie,
            offset,
            length: len,
        };
        self.client
            .write_all(&h.encode())
            .await
            .expect("send request");
    }

    async fn write(&mut self, cookie: u64, offset: u64, data: &[u8]) {
        self.request(CMD_WRITE, 0, cookie, offset, data.len() as u32)
            .await;
        self.client.write_all(data).await.expect("send payload");
    }

    /// Reads a simple reply header: (error, cookie).
    async fn simple(&mut self) -> (u32, u64) {
        let mut h = [0u8; 16];
        within(self.client.read_exact(&mut h))
            .await
            .expect("simple reply");
        assert_eq!(&h[0..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
        (
            u32::from_be_bytes([h[4], h[5], h[6], h[7]]),
            u64::from_be_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]),
        )
    }

    /// Reads any reply: Ok((cookie, magic, flags, type/error, payload)). Simple replies to
    /// reads are not read through this (their length is implicit).
    async fn any_reply(&mut self) -> (u64, u32, u16, u32, Vec<u8>) {
        let mut m = [0u8; 4];
        within(self.client.read_exact(&mut m))
            .await
            .expect("reply magic");
        let magic = u32::from_be_bytes(m);
        if magic == SIMPLE_REPLY_MAGIC {
            let mut h = [0u8; 12];
            within(self.client.read_exact(&mut h))
                .await
                .expect("simple reply");
            let err = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
            let cookie = u64::from_be_bytes([h[4], h[5], h[6], h[7], h[8], h[9], h[10], h[11]]);
            return (cookie, magic, 0, err, Vec::new());
        }
        assert_eq!(magic, STRUCTURED_REPLY_MAGIC);
        let mut h = [0u8; 16];
        within(self.client.read_exact(&mut h)).await.expect("chunk");
        let flags = u16::from_be_bytes([h[0], h[1]]);
        let kind = u16::from_be_bytes([h[2], h[3]]);
        let cookie = u64::from_be_bytes([h[4], h[5], h[6], h[7], h[8], h[9], h[10], h[11]]);
        let len = u32::from_be_bytes([h[12], h[13], h[14], h[15]]) as usize;
        let mut d = vec![0u8; len];
        within(self.client.read_exact(&mut d))
            .await
            .expect("chunk payload");
        (cookie, magic, flags, u32::from(kind), d)
    }

    /// Asserts that the server closed the connection.
    async fn closed(&mut self) {
        let mut b = [0u8; 1];
        let n = within(self.client.read(&mut b)).await.unwrap_or(0);
        assert_eq!(n, 0, "connection still open");
    }

    async fn result(self) -> Result<(), NbdConnError> {
        within(self.server).await.expect("server task")
    }
}

fn info_data(name: &str, items: &[u16]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(items.len() as u16).to_be_bytes());
    for i in items {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

#[tokio::test]
async fn info_reports_export_name_and_block_size() {
    let mut h = start("vol", false);
    h.hello(FLAG_C_FIXED_NEWSTYLE).await;
    h.option(OPT_INFO, &info_data("vol", &[INFO_NAME, INFO_BLOCK_SIZE]))
        .await;
    let (k, d) = h.opt_reply(OPT_INFO).await;
    assert_eq!(k, REP_INFO);
    assert_eq!(&d[0..2], &INFO_EXPORT.to_be_bytes());
    assert_eq!(&d[2..10], &SIZE.to_be_bytes());
    let flags = u16::from_be_bytes([d[10], d[11]]);
    let want = FLAG_HAS_FLAGS
        | FLAG_SEND_FLUSH
        | FLAG_SEND_FUA
        | FLAG_SEND_TRIM
        | FLAG_SEND_WRITE_ZEROES
        | FLAG_CAN_MULTI_CONN;
    assert_eq!(flags, want);
    let (k, d) = h.opt_reply(OPT_INFO).await;
    assert_eq!(k, REP_INFO);
    assert_eq!(&d[0..2], &INFO_NAME.to_be_bytes());
    assert_eq!(&d[2..], b"vol");
    let (k, d) = h.opt_reply(OPT_INFO).await;
    assert_eq!(k, REP_INFO);
    let mut want_bs = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    want_bs.extend_from_slice(&512u32.to_be_bytes());
    want_bs.extend_from_slice(&4096u32.to_be_bytes());
    want_bs.extend_from_slice(&(32u32 << 20).to_be_bytes());
    assert_eq!(d, want_bs);
    assert_eq!(h.opt_reply(OPT_INFO).await.0, REP_ACK);
    // Still haggling: the default (empty) name works too, and GO enters transmission.
    h.option(OPT_STRUCTURED_REPLY, &[]).await;
    assert_eq!(h.opt_reply(OPT_STRUCTURED_REPLY).await.0, REP_ACK);
    h.option(OPT_GO, &info_data("", &[])).await;
    let (k, d) = h.opt_reply(OPT_GO).await;
    assert_eq!(k, REP_INFO);
    assert_eq!(u16::from_be_bytes([d[10], d[11]]), want | FLAG_SEND_DF);
    assert_eq!(h.opt_reply(OPT_GO).await.0, REP_INFO);
    assert_eq!(h.opt_reply(OPT_GO).await.0, REP_ACK);
    h.request(CMD_DISC, 0, 1, 0, 0).await;
    h.closed().await;
    h.result().await.expect("clean end");
}

#[tokio::test]
async fn option_errors_keep_haggling_and_abort_acks() {
    let mut h = start("vol", false);
    h.hello(FLAG_C_FIXED_NEWSTYLE).await;
    h.option(OPT_GO, &info_data("other", &[])).await;
    assert_eq!(h.opt_reply(OPT_GO).await.0, REP_ERR_UNKNOWN);
    h.option(OPT_GO, &[0, 0, 0, 9, b'x']).await;
    assert_eq!(h.opt_reply(OPT_GO).await.0, REP_ERR_INVALID);
    h.option(OPT_STARTTLS, &[]).await;
    assert_eq!(h.opt_reply(OPT_STARTTLS).await.0, REP_ERR_UNSUP);
    h.option(4242, b"whatever").await;
    assert_eq!(h.opt_reply(4242).await.0, REP_ERR_UNSUP);
    h.option(OPT_LIST, b"x").await;
    assert_eq!(h.opt_reply(OPT_LIST).await.0, REP_ERR_INVALID);
    // Metadata contexts need structured replies first.
    h.option(
        OPT_SET_META_CONTEXT,
        &meta_data("vol", &["base:allocation"]),
    )
    .await;
    assert_eq!(h.opt_reply(OPT_SET_META_CONTEXT).await.0, REP_ERR_INVALID);
    h.option(OPT_STRUCTURED_REPLY, &[]).await;
    assert_eq!(h.opt_reply(OPT_STRUCTURED_REPLY).await.0, REP_ACK);
    h.option(OPT_LIST_META_CONTEXT, &meta_data("vol", &[]))
        .await;
    let (k, d) = h.opt_reply(OPT_LIST_META_CONTEXT).await;
    assert_eq!(k, REP_META_CONTEXT);
    assert_eq!(&d[4..], b"base:allocation");
    assert_eq!(h.opt_reply(OPT_LIST_META_CONTEXT).await.0, REP_ACK);
    h.option(
        OPT_SET_META_CONTEXT,
        &meta_data("vol", &["qemu:dirty-bitmap:x"]),
    )
    .await;
    assert_eq!(h.opt_reply(OPT_SET_META_CONTEXT).await.0, REP_ACK);
    h.option(
        OPT_SET_META_CONTEXT,
        &meta_data("nope", &["base:allocation"]),
    )
    .await;
    assert_eq!(h.opt_reply(OPT_SET_META_CONTEXT).await.0, REP_ERR_UNKNOWN);
    h.option(OPT_LIST, &[]).await;
    let (k, d) = h.opt_reply(OPT_LIST).await;
    assert_eq!(k, REP_SERVER);
    assert_eq!(&d[0..4], &3u32.to_be_bytes());
    assert_eq!(&d[4..], b"vol");
    assert_eq!(h.opt_reply(OPT_LIST).await.0, REP_ACK);
    h.option(OPT_ABORT, &[]).await;
    assert_eq!(h.opt_reply(OPT_ABORT).await.0, REP_ACK);
    h.closed().await;
    h.result().await.expect("abort is a clean end");
}

#[tokio::test]
async fn export_name_option_honours_no_zeroes() {
    for no_zeroes in [false, true] {
        let mut h = start("vol", true);
        let flags = FLAG_C_FIXED_NEWSTYLE | if no_zeroes { FLAG_C_NO_ZEROES } else { 0 };
        h.hello(flags).await;
        h.option(OPT_EXPORT_NAME, b"vol").await;
        let mut r = vec![0u8; if no_zeroes { 10 } else { 134 }];
        within(h.client.read_exact(&mut r))
            .await
            .expect("export reply");
        assert_eq!(&r[0..8], &SIZE.to_be_bytes());
        let tflags = u16::from_be_bytes([r[8], r[9]]);
        assert_ne!(tflags & FLAG_READ_ONLY, 0);
        assert!(r[10..].iter().all(|b| *b == 0));
        // Transmission starts right after: a write to a read-only export is refused.
        h.write(5, 0, &[1u8; 512]).await;
        assert_eq!(h.simple().await, (NBD_EPERM, 5));
        h.request(CMD_DISC, 0, 6, 0, 0).await;
        h.closed().await;
        h.result().await.expect("clean end");
    }
}

#[tokio::test]
async fn export_name_option_with_unknown_name_closes() {
    let mut h = start("vol", false);
    h.hello(FLAG_C_FIXED_NEWSTYLE).await;
    h.option(OPT_EXPORT_NAME, b"nope").await;
    h.closed().await;
    assert!(matches!(
        h.result().await,
        Err(NbdConnError::UnknownExport(n)) if n == "nope"
    ));
}

#[tokio::test]
async fn unknown_client_flags_close() {
    let mut h = start("vol", false);
    h.hello(1 << 7).await;
    h.closed().await;
    assert!(matches!(
        h.result().await,
        Err(NbdConnError::UnknownClientFlags(0x80))
    ));
}

#[tokio::test]
async fn replies_go_out_of_order_and_reading_never_waits() {
    let mut h = start("vol", false);
    h.go("vol", true, false).await;
    // Cookie 1 blocks in the device; cookie 2 and 3 must still be read and answered.
    h.request(CMD_READ, 0, 1, GATED, 4096).await;
    h.write(2, 4096, &[0xab; 4096]).await;
    h.request(CMD_READ, 0, 3, 4096, 4096).await;
    let (cookie, magic, _, err, _) = h.any_reply().await;
    assert_eq!((cookie, magic, err), (2, SIMPLE_REPLY_MAGIC, 0));
    let (cookie, _, flags, kind, d) = h.any_reply().await;
    assert_eq!(
        (cookie, flags, kind),
        (3, REPLY_FLAG_DONE, u32::from(REPLY_TYPE_OFFSET_DATA))
    );
    assert_eq!(&d[0..8], &4096u64.to_be_bytes());
    assert!(d[8..].iter().all(|b| *b == 0xab));
    h.dev.gate.notify_one();
    let (cookie, _, _, kind, d) = h.any_reply().await;
    assert_eq!((cookie, kind), (1, u32::from(REPLY_TYPE_OFFSET_DATA)));
    assert_eq!(d.len(), 8 + 4096);
    h.request(CMD_DISC, 0, 9, 0, 0).await;
    h.closed().await;
    h.result().await.expect("clean end");
}

#[tokio::test]
async fn bad_requests_get_errors_and_the_connection_goes_on() {
    let mut h = start("vol", false);
    h.go("vol", false, false).await;
    // Unaligned, out of range, oversized read, unknown command, unknown flag, zero length,
    // block status without negotiation, unsupported trim (device error).
    h.request(CMD_READ, 0, 1, 100, 512).await;
    assert_eq!(h.simple().await, (NBD_EINVAL, 1));
    h.request(CMD_READ, 0, 2, SIZE, 512).await;
    assert_eq!(h.simple().await, (NBD_EINVAL, 2));
    h.request(CMD_READ, 0, 3, u64::MAX - 511, 512).await;
    assert_eq!(h.simple().await, (NBD_EINVAL, 3));
    h.request(CMD_READ, 0, 4, 0, (32 << 20) + 512).await;
    assert_eq!(h.simple().await, (NBD_EINVAL, 4));
    h.request(77, 0, 5, 0, 0).await;
    assert_eq!(h.simple().await, (NBD_EINVAL, 5));
    h.request(CMD_FLUSH, 1 << 9, 6, 0, 0).await;
    assert_eq!(h.simple().await, (NBD_EINVAL, 6));
    h.request(CMD_READ, CMD_FLAG_DF, 7, 0, 512).await;
    assert_eq!(h.simple().await, (NBD_EINVAL, 7));
    h.request(CMD_WRITE_ZEROES, 0, 8, 0, 0).await;
    assert_eq!(h.simple().await, (NBD_EINVAL, 8));
    h.request(CMD_BLOCK_STATUS, 0, 9, 0, 512).await;
    assert_eq!(h.simple().await, (NBD_EINVAL, 9));
    h.request(CMD_TRIM, 0, 10, 0, 512).await;
    assert_eq!(h.simple().await, (NBD_ENOTSUP, 10));
    h.write(11, SIZE - 512, &[7u8; 1024]).await;
    assert_eq!(h.simple().await, (NBD_ENOSPC, 11));
    // Still serving: a good write and read.
    h.write(12, 512, &[9u8; 512]).await;
    assert_eq!(h.simple().await, (0, 12));
    h.request(
        CMD_WRITE_ZEROES,
        CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
        13,
        1024,
        512,
    )
    .await;
    assert_eq!(h.simple().await, (0, 13));
    h.request(CMD_FLUSH, CMD_FLAG_FUA, 14, 0, 0).await;
    assert_eq!(h.simple().await, (0, 14));
    h.request(CMD_READ, CMD_FLAG_FUA, 15, 512, 1024).await;
    assert_eq!(h.simple().await, (0, 15));
    let mut d = vec![0u8; 1024];
    within(h.client.read_exact(&mut d))
        .await
        .expect("read data");
    assert!(d[..512].iter().all(|b| *b == 9));
    assert!(d[512..].iter().all(|b| *b == 0));
    h.request(CMD_DISC, 0, 16, 0, 0).await;
    h.closed().await;
    h.result().await.expect("clean end");
}

#[tokio::test]
async fn structured_errors_carry_a_message() {
    let mut h = start("vol", false);
    h.go("vol", true, true).await;
    h.request(CMD_READ, 0, 1, 3, 512).await;
    let (cookie, _, flags, kind, d) = h.any_reply().await;
    assert_eq!(
        (cookie, flags, kind),
        (1, REPLY_FLAG_DONE, u32::from(REPLY_TYPE_ERROR))
    );
    assert_eq!(&d[0..4], &NBD_EINVAL.to_be_bytes());
    let mlen = u16::from_be_bytes([d[4], d[5]]) as usize;
    assert_eq!(d.len(), 6 + mlen);
    assert!(
        std::str::from_utf8(&d[6..])
            .expect("utf-8")
            .contains("aligned")
    );
    h.request(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 2, 0, 8192)
        .await;
    let (cookie, _, _, kind, d) = h.any_reply().await;
    assert_eq!((cookie, kind), (2, u32::from(REPLY_TYPE_BLOCK_STATUS)));
    // Default block status: all data, one descriptor.
    assert_eq!(d.len(), 12);
    assert_eq!(&d[4..8], &8192u32.to_be_bytes());
    assert_eq!(&d[8..12], &0u32.to_be_bytes());
    h.request(CMD_DISC, 0, 3, 0, 0).await;
    h.closed().await;
    h.result().await.expect("clean end");
}

#[tokio::test]
async fn bad_magic_closes_after_answering_earlier_requests() {
    let mut h = start("vol", false);
    h.go("vol", false, false).await;
    h.write(1, 0, &[1u8; 512]).await;
    h.client.write_all(&[0xee; 28]).await.expect("send garbage");
    assert_eq!(h.simple().await, (0, 1));
    h.closed().await;
    assert!(matches!(
        h.result().await,
        Err(NbdConnError::BadRequestMagic(0xeeee_eeee))
    ));
}

#[tokio::test]
async fn oversized_write_closes() {
    let mut h = start("vol", false);
    h.go("vol", true, false).await;
    h.request(CMD_WRITE, 0, 1, 0, (32 << 20) + 512).await;
    h.closed().await;
    assert!(matches!(
        h.result().await,
        Err(NbdConnError::OversizedWrite { .. })
    ));
}

#[tokio::test]
async fn truncated_request_is_reported() {
    let mut h = start("vol", false);
    h.go("vol", false, false).await;
    h.request(CMD_WRITE, 0, 1, 0, 4096).await;
    h.client
        .write_all(&[0u8; 100])
        .await
        .expect("partial payload");
    h.client.shutdown().await.expect("half-close");
    h.closed().await;
    assert!(matches!(
        h.result().await,
        Err(NbdConnError::TruncatedRequest(128))
    ));
}

#[tokio::test]
async fn disconnect_waits_for_running_requests() {
    let mut h = start("vol", false);
    h.go("vol", false, false).await;
    h.request(CMD_READ, 0, 1, GATED, 512).await;
    h.request(CMD_DISC, 0, 2, 0, 0).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    h.dev.gate.notify_one();
    assert_eq!(h.simple().await, (0, 1));
    let mut d = [0u8; 512];
    within(h.client.read_exact(&mut d))
        .await
        .expect("read data");
    h.closed().await;
    h.result().await.expect("clean end");
}

#[tokio::test]
async fn shutdown_drains_then_closes() {
    let mut h = start("vol", false);
    h.go("vol", false, false).await;
    h.request(CMD_READ, 0, 1, GATED, 512).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    h.shutdown.cancel();
    tokio::time::sleep(Duration::from_millis(50)).await;
    // Requests sent after shutdown are not read any more.
    h.request(CMD_READ, 0, 2, 512, 512).await;
    h.dev.gate.notify_one();
    assert_eq!(h.simple().await, (0, 1));
    let mut d = [0u8; 512];
    within(h.client.read_exact(&mut d))
        .await
        .expect("read data");
    h.closed().await;
    h.result().await.expect("clean end");
}

#[tokio::test]
async fn shutdown_during_handshake_closes() {
    let mut h = start("vol", false);
    h.hello(FLAG_C_FIXED_NEWSTYLE).await;
    h.shutdown.cancel();
    h.result().await.expect("clean end");
}

#[tokio::test]
async fn many_pipelined_writes_and_reads_round_trip() {
    let mut h = start("vol", false);
    h.go("vol", true, false).await;
    // Far more requests than fit in one read buffer or the in-flight limit, sent in one go.
    let n = 2000u64;
    let mut batch = Vec::new();
    for i in 0..n {
        let off = (i % 256) * 4096;
        let hd = RequestHeader {
            magic: REQUEST_MAGIC,
            flags: 0,
            kind: CMD_WRITE,
            cookie: i,
            offset: off,
            length: 4096,
        };
        batch.extend_from_slice(&hd.encode());
        batch.extend(std::iter::repeat_n((i % 251) as u8, 4096));
    }
    let (mut rd, mut wr) = tokio::io::split(h.client);
    let sender = tokio::spawn(async move {
        wr.write_all(&batch).await.expect("send batch");
        wr
    });
    let mut seen = vec![false; n as usize];
    for _ in 0..n {
        let mut r = [0u8; 16];
        within(rd.read_exact(&mut r)).await.expect("reply");
        assert_eq!(&r[0..8], &[0x67, 0x44, 0x66, 0x98, 0, 0, 0, 0]);
        let cookie = u64::from_be_bytes([r[8], r[9], r[10], r[11], r[12], r[13], r[14], r[15]]);
        assert!(!std::mem::replace(&mut seen[cookie as usize], true));
    }
    let wr = within(sender).await.expect("sender");
    h.client = rd.unsplit(wr);
    // The last write to each block wins (same connection, completed in order here).
    let d = h.dev.lock();
    for blk in 0..256u64 {
        let last = (n - 256..n).find(|i| i % 256 == blk).expect("some write");
        assert!(
            d[(blk * 4096) as usize..((blk + 1) * 4096) as usize]
                .iter()
                .all(|b| *b == (last % 251) as u8)
        );
    }
}
