//! End-to-end tests of `ironhorn replica serve`: the real binary on 127.0.0.1, driven
//! through the data protocol (the proto crate's codec as client) and the generated gRPC
//! client.
//!
//! The binary is started with port 0 for both servers and the test reads the bound
//! addresses from its "replica serving" log line on stderr (no port races). A guard kills
//! the child on drop; every socket has timeouts, so a stuck server fails a test instead of
//! hanging it.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use ironhorn_proto::frame::{
    ErrorCode, Flags, Op, REQUEST_HEADER_LEN, Request, RequestCodec, RequestHeader, Response,
    ResponseCodec,
};
use ironhorn_proto::replica as pb;
use ironhorn_proto::replica::replica_control_client::ReplicaControlClient;
use tokio_util::codec::{Decoder, Encoder};

/// Volume size the tests create.
const SIZE: u64 = 64 << 20;
/// Socket timeout for every test connection.
const IO_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the binary gets to start or stop.
const PROCESS_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------
// Process guard

/// A running `ironhorn replica serve`; killed on drop.
struct Replica {
    child: Child,
    control: SocketAddr,
    data: SocketAddr,
}

impl Replica {
    /// Starts the binary on `dir` (creating a volume of `size` if given) and waits until it
    /// logs its addresses.
    fn start(dir: &Path, size: Option<u64>, extra: &[&str]) -> Replica {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ironhorn"));
        cmd.args(["replica", "serve", "--dir"])
            .arg(dir)
            .args(["--listen", "127.0.0.1:0", "--data-listen", "127.0.0.1:0"])
            .args(extra)
            .env("RUST_LOG", "info")
            .env_remove("IRONHORN_REPLICA_SIZE")
            .env_remove("IRONHORN_REPLICA_MAX_DATA_CONNECTIONS")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(size) = size {
            cmd.args(["--size", &size.to_string()]);
        }
        let mut child = cmd.spawn().expect("start ironhorn");
        let stderr = child.stderr.take().expect("stderr piped");
        let (tx, rx) = mpsc::channel();
        // Forward the child's log to the test output and pick up the addresses.
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("[replica] {line}");
                if line.contains("replica serving") {
                    let field = |name: &str| {
                        line.split_whitespace()
                            .find_map(|t| t.strip_prefix(name))
                            .and_then(|v| v.parse::<SocketAddr>().ok())
                    };
                    if let (Some(c), Some(d)) = (field("control="), field("data=")) {
                        let _ = tx.send((c, d));
                    }
                }
            }
        });
        let mut guard = Replica {
            child,
            control: "0.0.0.0:0".parse().unwrap(),
            data: "0.0.0.0:0".parse().unwrap(),
        };
        let deadline = Instant::now() + PROCESS_TIMEOUT;
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok((control, data)) => {
                    guard.control = control;
                    guard.data = data;
                    return guard;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    panic!("replica exited before serving: {:?}", guard.child.wait())
                }
            }
            if let Some(status) = guard.child.try_wait().unwrap() {
                panic!("replica exited before serving: {status}");
            }
            assert!(Instant::now() < deadline, "replica did not start in time");
        }
    }

    /// Runs `ironhorn` with `args` to completion (for CLI error cases).
    fn run_to_end(args: &[&str]) -> (ExitStatus, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_ironhorn"))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (
            out.status,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap());
        nix::sys::signal::kill(pid, sig).unwrap();
    }

    /// Waits for the child to exit, killing it if it takes too long.
    fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + PROCESS_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("replica did not exit in time");
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn conn(&self) -> DataConn {
        DataConn::connect(self.data)
    }

    async fn grpc(&self) -> ReplicaControlClient<tonic::transport::Channel> {
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", self.control))
            .unwrap()
            .connect_timeout(IO_TIMEOUT)
            .timeout(IO_TIMEOUT);
        ReplicaControlClient::new(endpoint.connect().await.unwrap())
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------
// Data-protocol client

/// A blocking data-protocol connection using the proto crate's codecs.
struct DataConn {
    stream: TcpStream,
    rbuf: BytesMut,
    codec: ResponseCodec,
}

impl DataConn {
    fn connect(addr: SocketAddr) -> DataConn {
        let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT).unwrap();
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.set_nodelay(true).unwrap();
        DataConn {
            stream,
            rbuf: BytesMut::new(),
            codec: ResponseCodec::new(),
        }
    }

    fn send(&mut self, req: &Request) {
        let mut buf = BytesMut::new();
        RequestCodec::new().encode(req, &mut buf).unwrap();
        self.stream.write_all(&buf).unwrap();
    }

    fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// The next response, or `None` when the server closed the connection.
    fn recv(&mut self) -> Option<Response> {
        loop {
            if let Some(item) = self.codec.decode(&mut self.rbuf).unwrap() {
                return Some(item.expect("response crc"));
            }
            let mut chunk = [0u8; 64 << 10];
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    assert!(self.rbuf.is_empty(), "server closed mid-frame");
                    return None;
                }
                Ok(n) => self.rbuf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
                Err(e) => panic!("data connection read: {e}"),
            }
        }
    }

    fn call(&mut self, req: &Request) -> Response {
        self.send(req);
        let resp = self.recv().expect("server closed the connection");
        assert_eq!(resp.id(), req.id());
        resp
    }

    fn write(&mut self, id: u64, offset: u64, data: &[u8]) {
        let req = Request::write(id, offset, Bytes::copy_from_slice(data), false).unwrap();
        assert_eq!(self.call(&req).status(), Ok(()), "write at {offset}");
    }

    fn read(&mut self, id: u64, offset: u64, len: u32) -> Bytes {
        let resp = self.call(&Request::read(id, offset, len).unwrap());
        let data = resp
            .into_result()
            .unwrap_or_else(|e| panic!("read at {offset}: {e}"));
        assert_eq!(data.len(), len as usize);
        data
    }

    fn flush(&mut self, id: u64) {
        assert_eq!(self.call(&Request::flush(id)).status(), Ok(()));
    }

    /// Asserts that the server closes the connection (after any answers already due).
    fn expect_closed(&mut self) {
        let _ = self.stream.shutdown(Shutdown::Write);
        if let Some(resp) = self.recv() {
            panic!("expected the connection to close, got {resp:?}");
        }
    }
}

/// A deterministic, position-dependent pattern so misplaced data is detected.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            let x = (i as u64 / 8).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seed;
            (x >> ((i % 8) * 8)) as u8 ^ (seed as u8)
        })
        .collect()
}

fn raw_header(op: Op, id: u64, offset: u64, length: u32, crc: u32) -> [u8; REQUEST_HEADER_LEN] {
    RequestHeader {
        op,
        flags: Flags::NONE,
        id,
        offset,
        length,
        payload_crc: crc,
    }
    .encode()
}

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("ironhorn-replica-test-")
        .tempdir()
        .unwrap()
}

fn vol(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("vol")
}

// ---------------------------------------------------------------------------------------
// Data protocol

#[test]
fn write_read_roundtrip_with_partial_sectors() {
    let tmp = tempdir();
    let replica = Replica::start(&vol(&tmp), Some(SIZE), &[]);
    let mut c = replica.conn();

    // Fresh volume reads zeroes.
    assert!(c.read(1, 0, 8192).iter().all(|&b| b == 0));

    let a = pattern(1, 8192);
    c.write(2, 4096, &a);
    assert_eq!(c.read(3, 4096, 8192), a);

    // 512-byte aligned partial write inside a block: read-modify-write.
    let p = pattern(2, 1024);
    c.write(4, 4096 + 1536, &p);
    let mut expect = a.clone();
    expect[1536..2560].copy_from_slice(&p);
    assert_eq!(c.read(5, 4096, 8192), expect);
    // Partial reads.
    assert_eq!(c.read(6, 4096 + 1536, 512), p[..512]);
    assert_eq!(c.read(7, 4096 + 512, 1536), expect[512..2048]);

    // Write straddling blocks, FUA.
    let s = pattern(3, 4096);
    let req = Request::write(8, 4096 * 3 - 512, Bytes::from(s.clone()), true).unwrap();
    assert_eq!(c.call(&req).status(), Ok(()));
    assert_eq!(c.read(9, 4096 * 3 - 512, 4096), s);

    // Write zeroes and discard.
    let z = Request::write_zeroes(10, 4096, 1024, false).unwrap();
    assert_eq!(c.call(&z).status(), Ok(()));
    expect[..1024].fill(0);
    assert_eq!(c.read(11, 4096, 4096), expect[..4096]);
    let d = Request::discard(12, 4096 * 20, 4096, true).unwrap();
    c.write(13, 4096 * 20, &pattern(4, 4096));
    assert_eq!(c.call(&d).status(), Ok(()));
    assert!(c.read(14, 4096 * 20, 4096).iter().all(|&b| b == 0));

    // Flush, ping, a zero-length read, the very end of the volume.
    c.flush(15);
    assert_eq!(c.call(&Request::ping(16)).status(), Ok(()));
    assert_eq!(c.read(17, 0, 0).len(), 0);
    let tail = pattern(5, 4096);
    c.write(18, SIZE - 4096, &tail);
    assert_eq!(c.read(19, SIZE - 4096, 4096), tail);

    // A big write and read (8 MiB).
    let big = pattern(6, 8 << 20);
    c.write(20, 16 << 20, &big);
    assert_eq!(c.read(21, 16 << 20, 8 << 20), big);
}

#[test]
fn pipelined_requests_are_all_answered() {
    let tmp = tempdir();
    let replica = Replica::start(&vol(&tmp), Some(SIZE), &[]);
    let c = replica.conn();
    const N: u64 = 600;
    let mut writer = c.stream.try_clone().unwrap();
    // Phase 1: hundreds of writes in flight, sent by another thread while this one takes
    // the answers (matched by id; any order is allowed). Pipelined requests may run in any
    // order, so phase 2 only reads blocks whose writes were already answered.
    let sender = thread::spawn(move || {
        let mut buf = BytesMut::new();
        let mut codec = RequestCodec::new();
        for i in 0..N {
            let data = Bytes::from(pattern(i, 4096));
            let req = Request::write(i, i * 4096, data, false).unwrap();
            codec.encode(&req, &mut buf).unwrap();
            if buf.len() > 64 << 10 {
                writer.write_all(&buf).unwrap();
                buf.clear();
            }
        }
        writer.write_all(&buf).unwrap();
    });
    let mut c = c;
    let mut seen = vec![false; N as usize];
    for _ in 0..N {
        let resp = c.recv().expect("answer");
        assert_eq!(resp.status(), Ok(()), "id {}", resp.id());
        let id = resp.id() as usize;
        assert!(!seen[id], "id {id} answered twice");
        seen[id] = true;
    }
    sender.join().unwrap();
    assert!(seen.iter().all(|&s| s));

    // Now hundreds of reads in flight at once, sent in one burst.
    let mut buf = BytesMut::new();
    let mut codec = RequestCodec::new();
    for i in 0..N {
        codec
            .encode(Request::read(1000 + i, i * 4096, 4096).unwrap(), &mut buf)
            .unwrap();
    }
    let mut writer = c.stream.try_clone().unwrap();
    let sender = thread::spawn(move || writer.write_all(&buf).unwrap());
    let mut got = 0;
    for _ in 0..N {
        let resp = c.recv().expect("answer");
        let i = resp.id() - 1000;
        assert!(i < N);
        assert_eq!(resp.into_result().unwrap(), pattern(i, 4096), "block {i}");
        got += 1;
    }
    sender.join().unwrap();
    assert_eq!(got, N);
}

#[test]
fn many_concurrent_connections() {
    let tmp = tempdir();
    let replica = Replica::start(&vol(&tmp), Some(SIZE), &[]);
    let addr = replica.data;
    let threads: Vec<_> = (0..16u64)
        .map(|t| {
            thread::spawn(move || {
                let mut c = DataConn::connect(addr);
                let base = t * (1 << 20);
                for i in 0..64u64 {
                    c.write(i, base + i * 4096, &pattern(t * 1000 + i, 4096));
                }
                for i in 0..64u64 {
                    assert_eq!(
                        c.read(100 + i, base + i * 4096, 4096),
                        pattern(t * 1000 + i, 4096)
                    );
                }
                c.flush(999);
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    // A fresh connection sees every thread's data.
    let mut c = replica.conn();
    for t in 0..16u64 {
        let data = c.read(t, t * (1 << 20), 64 * 4096);
        for i in 0..64usize {
            assert_eq!(
                data[i * 4096..(i + 1) * 4096],
                pattern(t * 1000 + i as u64, 4096)
            );
        }
    }
}

/// Writes a known pattern to the first 64 KiB and returns it.
fn seed_reference(replica: &Replica) -> Vec<u8> {
    let reference = pattern(42, 64 << 10);
    let mut c = replica.conn();
    c.write(1, 0, &reference);
    c.flush(2);
    reference
}

/// A fresh connection still reads `reference` and answers a ping.
fn assert_unchanged(replica: &mut Replica, reference: &[u8], case: &str) {
    assert!(replica.alive(), "replica died after {case}");
    let mut c = replica.conn();
    assert_eq!(
        c.call(&Request::ping(7)).status(),
        Ok(()),
        "ping after {case}"
    );
    assert_eq!(
        c.read(8, 0, reference.len() as u32),
        reference,
        "data changed after {case}"
    );
}

#[test]
fn malformed_frames_close_only_that_connection() {
    let tmp = tempdir();
    let mut replica = Replica::start(&vol(&tmp), Some(SIZE), &[]);
    let reference = seed_reference(&replica);

    let good_write = {
        let mut buf = BytesMut::new();
        let req = Request::write(77, 0, Bytes::from(vec![0xEE; 4096]), false).unwrap();
        RequestCodec::new().encode(&req, &mut buf).unwrap();
        buf.to_vec()
    };

    let mut bad_magic = good_write.clone();
    bad_magic[..4].copy_from_slice(b"GET ");
    let mut unknown_op = good_write.clone();
    unknown_op[4] = 99;
    let mut bad_flags = good_write.clone();
    bad_flags[5] = 0x80;
    let mut nonzero_reserved = good_write.clone();
    nonzero_reserved[6] = 1;

    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "garbage",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\0\xff\xfe garbage".to_vec(),
        ),
        ("zeroes", vec![0u8; 4096]),
        ("bad magic", bad_magic),
        ("unknown op", unknown_op),
        ("bad flags", bad_flags),
        ("non-zero reserved", nonzero_reserved),
        (
            // 4 GiB - 1 write: refused from the header, never allocated or waited for.
            "huge write length",
            raw_header(Op::Write, 5, 0, u32::MAX, 0).to_vec(),
        ),
        (
            "huge read length",
            raw_header(Op::Read, 5, 0, u32::MAX, 0).to_vec(),
        ),
        (
            "flush with a range",
            raw_header(Op::Flush, 5, 4096, 4096, 0).to_vec(),
        ),
        (
            "read with a payload crc",
            raw_header(Op::Read, 5, 0, 4096, 0x1234).to_vec(),
        ),
        (
            "offset overflow",
            raw_header(Op::Discard, 5, u64::MAX - 511, 4096, 0).to_vec(),
        ),
    ];
    for (case, bytes) in cases {
        let started = Instant::now();
        let mut c = replica.conn();
        // A valid request first: it is answered before the connection closes.
        c.send(&Request::ping(1));
        c.send_raw(&bytes);
        let resp = c
            .recv()
            .unwrap_or_else(|| panic!("{case}: ping not answered"));
        assert_eq!((resp.id(), resp.status()), (1, Ok(())), "{case}");
        c.expect_closed();
        assert!(
            started.elapsed() < IO_TIMEOUT,
            "{case}: close took too long"
        );
        assert_unchanged(&mut replica, &reference, case);
    }
}

#[test]
fn bad_crc_and_bad_ranges_get_error_answers() {
    let tmp = tempdir();
    let mut replica = Replica::start(&vol(&tmp), Some(SIZE), &[]);
    let reference = seed_reference(&replica);
    let mut c = replica.conn();

    // Bad crc: answered BadCrc, nothing written, the connection goes on.
    let payload = vec![0xAB; 4096];
    let good_crc = crc32fast::hash(&payload);
    let mut frame = raw_header(Op::Write, 10, 0, 4096, good_crc ^ 1).to_vec();
    frame.extend_from_slice(&payload);
    c.send_raw(&frame);
    let resp = c.recv().expect("BadCrc answer");
    assert_eq!((resp.id(), resp.status()), (10, Err(ErrorCode::BadCrc)));
    assert_eq!(c.call(&Request::ping(11)).status(), Ok(()));

    let invalid = |c: &mut DataConn, req: Request, what: &str| {
        let resp = c.call(&req);
        assert_eq!(
            resp.status(),
            Err(ErrorCode::InvalidArgument),
            "{what}: {resp:?}"
        );
    };
    invalid(
        &mut c,
        Request::read(20, SIZE, 4096).unwrap(),
        "read past end",
    );
    invalid(
        &mut c,
        Request::read(21, SIZE - 4096, 8192).unwrap(),
        "read across end",
    );
    invalid(
        &mut c,
        Request::read(22, u64::MAX - (32 << 20), 32 << 20).unwrap(),
        "read far past end",
    );
    invalid(
        &mut c,
        Request::read(23, 100, 512).unwrap(),
        "misaligned read offset",
    );
    invalid(
        &mut c,
        Request::read(24, 0, 100).unwrap(),
        "misaligned read length",
    );
    invalid(
        &mut c,
        Request::write(25, SIZE, Bytes::from(vec![1; 4096]), false).unwrap(),
        "write past end",
    );
    invalid(
        &mut c,
        Request::write(26, 100, Bytes::from(vec![1; 512]), false).unwrap(),
        "misaligned write offset",
    );
    invalid(
        &mut c,
        Request::write(27, 0, Bytes::from(vec![1; 100]), false).unwrap(),
        "misaligned write length",
    );
    invalid(
        &mut c,
        Request::write_zeroes(28, SIZE - 512, 1024, false).unwrap(),
        "write zeroes past end",
    );
    invalid(
        &mut c,
        Request::discard(29, 1, 4096, false).unwrap(),
        "misaligned discard",
    );
    // The connection is still good.
    assert_eq!(c.read(30, 0, 64 << 10), reference);
    assert_unchanged(&mut replica, &reference, "error answers");
}

#[test]
fn truncated_frames_then_close() {
    let tmp = tempdir();
    let mut replica = Replica::start(&vol(&tmp), Some(SIZE), &[]);
    let reference = seed_reference(&replica);

    let mut full = BytesMut::new();
    let req = Request::write(5, 0, Bytes::from(vec![0x55; 8192]), true).unwrap();
    RequestCodec::new().encode(&req, &mut full).unwrap();
    for cut in [
        1,
        16,
        REQUEST_HEADER_LEN,
        REQUEST_HEADER_LEN + 100,
        full.len() - 1,
    ] {
        let mut c = replica.conn();
        c.send_raw(&full[..cut]);
        c.expect_closed();
        assert_unchanged(&mut replica, &reference, &format!("truncated at {cut}"));
    }

    // A 32 MiB write announced, a few bytes sent, then a reset (drop without reading).
    {
        let mut c = replica.conn();
        c.send_raw(&raw_header(Op::Write, 6, 0, 32 << 20, 1));
        c.send_raw(&[0u8; 1000]);
    }
    assert_unchanged(&mut replica, &reference, "abandoned large write");
}

#[test]
fn connection_limit_refuses_extra_connections() {
    let tmp = tempdir();
    let mut replica = Replica::start(&vol(&tmp), Some(SIZE), &["--max-data-connections", "2"]);
    let mut a = replica.conn();
    let mut b = replica.conn();
    assert_eq!(a.call(&Request::ping(1)).status(), Ok(()));
    assert_eq!(b.call(&Request::ping(1)).status(), Ok(()));
    let mut extra = replica.conn();
    extra.expect_closed();
    drop(a);
    // The slot frees up once the server notices the close.
    let deadline = Instant::now() + IO_TIMEOUT;
    loop {
        let mut c = replica.conn();
        c.send(&Request::ping(2));
        if let Some(resp) = c.recv() {
            assert_eq!(resp.status(), Ok(()));
            break;
        }
        assert!(Instant::now() < deadline, "slot never freed");
        thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(b.call(&Request::ping(3)).status(), Ok(()));
    assert!(replica.alive());
}

// ---------------------------------------------------------------------------------------
// Process lifecycle

#[test]
fn data_persists_across_kill_and_restart() {
    let tmp = tempdir();
    let dir = vol(&tmp);
    let data = pattern(9, 256 << 10);
    {
        let replica = Replica::start(&dir, Some(SIZE), &[]);
        let mut c = replica.conn();
        c.write(1, 1 << 20, &data);
        c.flush(2);
        replica.signal(nix::sys::signal::Signal::SIGKILL);
    }
    // Reopen without --size: the directory holds the replica.
    let replica = Replica::start(&dir, None, &[]);
    let mut c = replica.conn();
    assert_eq!(c.read(1, 1 << 20, 256 << 10), data);
}

#[test]
fn sigterm_stops_cleanly_and_closes_connections() {
    let tmp = tempdir();
    let dir = vol(&tmp);
    let mut replica = Replica::start(&dir, Some(SIZE), &[]);
    let mut c = replica.conn();
    c.write(1, 0, &pattern(3, 4096));
    // Unflushed: a graceful stop flushes.
    replica.signal(nix::sys::signal::Signal::SIGTERM);
    let status = replica.wait();
    assert!(status.success(), "exit status {status}");
    c.expect_closed();
    let replica = Replica::start(&dir, None, &[]);
    assert_eq!(replica.conn().read(1, 0, 4096), pattern(3, 4096));
}

#[test]
fn cli_errors_are_clear() {
    let tmp = tempdir();
    let (status, err) = Replica::run_to_end(&[
        "replica",
        "serve",
        "--dir",
        tmp.path().join("none").to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--size",
        "10XB",
    ]);
    assert!(!status.success());
    assert!(err.contains("unknown unit"), "{err}");

    let (status, err) = Replica::run_to_end(&[
        "replica",
        "serve",
        "--dir",
        tmp.path().join("none").to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ]);
    assert!(!status.success());
    assert!(err.contains("no replica here"), "{err}");

    let (status, err) = Replica::run_to_end(&[
        "replica",
        "serve",
        "--dir",
        tmp.path().join("none").to_str().unwrap(),
        "--listen",
        "not-an-address",
        "--size",
        "1MiB",
    ]);
    assert!(!status.success());
    assert!(err.contains("--listen"), "{err}");
}

// ---------------------------------------------------------------------------------------
// gRPC control

fn code<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>) -> tonic::Code {
    r.expect_err("expected an error").code()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_snapshots_revert_expand_epoch() {
    let tmp = tempdir();
    let dir = vol(&tmp);
    let replica = Replica::start(&dir, Some(SIZE), &[]);
    let mut ctl = replica.grpc().await;
    let data_addr = replica.data;
    // Data-protocol calls are blocking: run them off the runtime's workers.
    let io = move |f: Box<dyn FnOnce(&mut DataConn) -> Bytes + Send>| {
        tokio::task::spawn_blocking(move || f(&mut DataConn::connect(data_addr)))
    };

    let info = ctl.info(pb::InfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.size, SIZE);
    assert_eq!(info.block_size, 4096);
    assert_eq!(info.data_address, replica.data.to_string());
    assert_eq!(info.dir, dir.display().to_string());
    assert_eq!(info.snapshot_count, 0);
    assert!(!info.rebuilding);

    // v1 -> snapshot s1 -> v2 -> snapshot s2 -> v3
    for (v, snap) in [(1u8, Some("s1")), (2, Some("s2")), (3, None)] {
        io(Box::new(move |c| {
            c.write(1, 0, &[v; 4096]);
            Bytes::new()
        }))
        .await
        .unwrap();
        if let Some(name) = snap {
            let layer = ctl
                .create_snapshot(pb::CreateSnapshotRequest {
                    name: name.into(),
                    labels: [("k".to_string(), format!("v{v}"))].into(),
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(layer.name, name);
            assert!(!layer.is_head);
            assert_eq!(layer.labels.get("k"), Some(&format!("v{v}")));
        }
    }
    let generated = ctl
        .create_snapshot(pb::CreateSnapshotRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(generated.name.starts_with("snap-"), "{}", generated.name);

    let list = ctl
        .list_layers(pb::ListLayersRequest {})
        .await
        .unwrap()
        .into_inner();
    let names: Vec<_> = list.layers.iter().map(|l| l.name.as_str()).collect();
    for n in ["s1", "s2", generated.name.as_str()] {
        assert!(names.contains(&n), "{names:?}");
    }
    assert_eq!(list.layers.iter().filter(|l| l.is_head).count(), 1);
    assert_eq!(list.head_chain.len(), 4, "{:?}", list.head_chain);
    assert_eq!(list.head_chain[0], "s1");
    let s2 = list.layers.iter().find(|l| l.name == "s2").unwrap();
    assert_eq!(s2.parent, "s1");
    assert!(s2.allocated_bytes >= 4096);

    // Bad requests.
    let bad_name = pb::CreateSnapshotRequest {
        name: "a/b".into(),
        ..Default::default()
    };
    assert_eq!(
        code(ctl.create_snapshot(bad_name).await),
        tonic::Code::InvalidArgument
    );
    let dup = pb::CreateSnapshotRequest {
        name: "s1".into(),
        ..Default::default()
    };
    assert_eq!(
        code(ctl.create_snapshot(dup).await),
        tonic::Code::AlreadyExists
    );
    let missing = || pb::RemoveSnapshotRequest {
        name: "nope".into(),
    };
    assert_eq!(
        code(ctl.remove_snapshot(missing()).await),
        tonic::Code::NotFound
    );
    assert_eq!(
        code(
            ctl.revert(pb::RevertRequest {
                name: "nope".into()
            })
            .await
        ),
        tonic::Code::NotFound
    );
    assert_eq!(
        code(
            ctl.remove_snapshot(pb::RemoveSnapshotRequest { name: "".into() })
                .await
        ),
        tonic::Code::InvalidArgument
    );
    assert_eq!(
        code(ctl.expand(pb::ExpandRequest { size: SIZE / 2 }).await),
        tonic::Code::InvalidArgument
    );
    assert_eq!(
        code(ctl.expand(pb::ExpandRequest { size: SIZE + 1 }).await),
        tonic::Code::InvalidArgument
    );

    // Checksums and layer data of s2.
    let mut sums = ctl
        .layer_checksums(pb::LayerChecksumsRequest { layer: "s2".into() })
        .await
        .unwrap()
        .into_inner();
    let mut chunks = Vec::new();
    while let Some(batch) = sums.message().await.unwrap() {
        assert_eq!(batch.chunk_size, 1 << 20);
        chunks.extend(batch.chunks);
    }
    assert_eq!(chunks.len(), 1, "{chunks:?}");
    assert_eq!(chunks[0].index, 0);
    let mut data = ctl
        .read_layer(pb::ReadLayerRequest {
            layer: "s2".into(),
            chunks: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    let mut msgs = Vec::new();
    while let Some(m) = data.message().await.unwrap() {
        msgs.push(m);
    }
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    assert_eq!((msgs[0].offset, msgs[0].chunk), (0, Some(0)));
    assert_eq!(msgs[0].data, vec![2u8; 4096]);
    // An explicitly requested empty chunk is announced with no data.
    let mut data = ctl
        .read_layer(pb::ReadLayerRequest {
            layer: "s2".into(),
            chunks: vec![5],
        })
        .await
        .unwrap()
        .into_inner();
    let m = data.message().await.unwrap().unwrap();
    assert_eq!((m.chunk, m.data.len()), (Some(5), 0));
    assert!(data.message().await.unwrap().is_none());
    assert_eq!(
        code(
            ctl.layer_checksums(pb::LayerChecksumsRequest {
                layer: "nope".into()
            })
            .await
        ),
        tonic::Code::NotFound
    );
    assert_eq!(
        code(
            ctl.read_layer(pb::ReadLayerRequest {
                layer: "s2".into(),
                chunks: vec![SIZE >> 20],
            })
            .await
        ),
        tonic::Code::InvalidArgument
    );

    // Remove + purge s1: its data merges into s2; reads are unchanged.
    ctl.remove_snapshot(pb::RemoveSnapshotRequest { name: "s1".into() })
        .await
        .unwrap();
    let purged = ctl
        .purge(pb::PurgeRequest {})
        .await
        .unwrap()
        .into_inner()
        .purged;
    assert_eq!(purged, vec!["s1".to_string()]);
    let list = ctl
        .list_layers(pb::ListLayersRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(list.layers.iter().all(|l| l.name != "s1"));
    let read0 = |c: &mut DataConn| c.read(1, 0, 4096);
    assert_eq!(io(Box::new(read0)).await.unwrap(), vec![3u8; 4096]);

    // Revert to s2: the head's v3 is gone.
    let info = ctl
        .revert(pb::RevertRequest { name: "s2".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.size, SIZE);
    assert_eq!(io(Box::new(read0)).await.unwrap(), vec![2u8; 4096]);

    // Expand: the new end is readable and writable.
    let info = ctl
        .expand(pb::ExpandRequest { size: SIZE * 2 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.size, SIZE * 2);
    let tail = io(Box::new(|c| {
        c.write(1, SIZE * 2 - 4096, &[9; 4096]);
        c.read(2, SIZE * 2 - 4096, 4096)
    }))
    .await
    .unwrap();
    assert_eq!(tail, vec![9u8; 4096]);

    // Epoch: raised, persisted, never lowered.
    let info = ctl
        .set_epoch(pb::SetEpochRequest { epoch: 5 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.epoch, 5);
    assert_eq!(
        code(ctl.set_epoch(pb::SetEpochRequest { epoch: 3 }).await),
        tonic::Code::InvalidArgument
    );
    let info = ctl.info(pb::InfoRequest {}).await.unwrap().into_inner();
    assert_eq!((info.epoch, info.size), (5, SIZE * 2));

    // Restart: epoch, size and snapshots persist.
    drop(ctl);
    drop(replica);
    let replica = Replica::start(&dir, None, &[]);
    let mut ctl = replica.grpc().await;
    let info = ctl.info(pb::InfoRequest {}).await.unwrap().into_inner();
    assert_eq!((info.epoch, info.size), (5, SIZE * 2));
    let list = ctl
        .list_layers(pb::ListLayersRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(list.layers.iter().any(|l| l.name == "s2"));
}
