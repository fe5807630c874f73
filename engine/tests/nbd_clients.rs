//! The NBD frontend against real clients run as child processes: nbdinfo, nbdcopy (libnbd),
//! qemu-io, qemu-img and fio's nbd engine, over TCP and a unix socket, plus hand-made bad
//! input over a raw socket.
//!
//! The server runs the way the engine runs it: on its own thread with a current-thread
//! tokio runtime. It serves [`MemDevice`], an in-memory volume that tracks which 4 KiB
//! blocks were written so block status can report holes. Each client run is bounded by a
//! timeout and killed when it overruns. A test whose client is not installed says so on
//! stderr and passes.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ironhorn_engine::device::{BlockDevice, DeviceError, DeviceResult, Extent};
use ironhorn_engine::nbd::{NbdExport, serve_tcp, serve_unix};
use tokio_util::sync::CancellationToken;

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 4096;
/// Longest a client may run before it is killed and the test fails.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------
// The test device.

struct State {
    data: Vec<u8>,
    /// 4 KiB blocks that hold data; every other block is a hole (reads as zeroes).
    allocated: BTreeSet<u64>,
}

/// An in-memory volume with hole tracking, good enough to test a frontend.
struct MemDevice {
    size: u64,
    state: Mutex<State>,
}

impl MemDevice {
    fn new(size: u64) -> Arc<MemDevice> {
        Arc::new(MemDevice {
            size,
            state: Mutex::new(State {
                data: vec![0; size as usize],
                allocated: BTreeSet::new(),
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn range(&self, offset: u64, len: u64) -> DeviceResult<std::ops::Range<usize>> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(offset as usize..end as usize),
            _ => Err(DeviceError::EINVAL),
        }
    }

    /// Zeroes a range; whole blocks inside it become holes.
    fn zero(&self, offset: u64, len: u64) -> DeviceResult<()> {
        let r = self.range(offset, len)?;
        let mut st = self.lock();
        st.data[r].fill(0);
        let first = offset.div_ceil(BLOCK);
        let end = (offset + len) / BLOCK;
        for b in first..end {
            st.allocated.remove(&b);
        }
        Ok(())
    }

    fn contents(&self, offset: u64, len: u64) -> Vec<u8> {
        self.lock().data[offset as usize..(offset + len) as usize].to_vec()
    }
}

impl BlockDevice for MemDevice {
    fn size(&self) -> u64 {
        self.size
    }

    async fn read(&self, offset: u64, len: u32) -> DeviceResult<Bytes> {
        let r = self.range(offset, u64::from(len))?;
        Ok(Bytes::copy_from_slice(&self.lock().data[r]))
    }

    async fn write(&self, offset: u64, data: Bytes, _fua: bool) -> DeviceResult<()> {
        let r = self.range(offset, data.len() as u64)?;
        let mut st = self.lock();
        st.data[r].copy_from_slice(&data);
        let end = offset + data.len() as u64;
        for b in offset / BLOCK..end.div_ceil(BLOCK) {
            st.allocated.insert(b);
        }
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u64, _fua: bool) -> DeviceResult<()> {
        self.zero(offset, len)
    }

    async fn trim(&self, offset: u64, len: u64, _fua: bool) -> DeviceResult<()> {
        self.zero(offset, len)
    }

    async fn flush(&self) -> DeviceResult<()> {
        Ok(())
    }

    async fn block_status(&self, offset: u64, len: u64) -> DeviceResult<Vec<Extent>> {
        let r = self.range(offset, len)?;
        let st = self.lock();
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = r.start as u64;
        let end = r.end as u64;
        while pos < end {
            let block = pos / BLOCK;
            let next = ((block + 1) * BLOCK).min(end);
            let hole = !st.allocated.contains(&block);
            match out.last_mut() {
                Some(last) if last.hole == hole => last.length += next - pos,
                _ => out.push(Extent {
                    length: next - pos,
                    hole,
                    zero: hole,
                }),
            }
            pos = next;
        }
        Ok(out)
    }
}

// ---------------------------------------------------------------------------------------
// The server, on its own thread and current-thread runtime.

enum Listen {
    Tcp,
    Unix(PathBuf),
}

struct Server {
    port: u16,
    dev: Arc<MemDevice>,
    shutdown: CancellationToken,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    fn start(name: &str, size: u64, read_only: bool, listen: Listen) -> Server {
        let dev = MemDevice::new(size);
        let export = Arc::new(NbdExport {
            name: name.to_owned(),
            device: dev.clone(),
            read_only,
        });
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let mut port = 0;
        enum Std {
            Tcp(std::net::TcpListener),
            Unix(std::os::unix::net::UnixListener),
        }
        let std_listener = match listen {
            Listen::Tcp => {
                let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind tcp");
                port = l.local_addr().expect("local addr").port();
                l.set_nonblocking(true).expect("nonblocking");
                Std::Tcp(l)
            }
            Listen::Unix(path) => {
                let l = std::os::unix::net::UnixListener::bind(path).expect("bind unix");
                l.set_nonblocking(true).expect("nonblocking");
                Std::Unix(l)
            }
        };
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                match std_listener {
                    Std::Tcp(l) => {
                        let l = tokio::net::TcpListener::from_std(l).expect("tokio listener");
                        serve_tcp(l, export, token).await
                    }
                    Std::Unix(l) => {
                        let l = tokio::net::UnixListener::from_std(l).expect("tokio listener");
                        serve_unix(l, export, token).await
                    }
                }
            });
        });
        Server {
            port,
            dev,
            shutdown,
            thread: Some(thread),
        }
    }

    fn tcp(name: &str, size: u64) -> Server {
        Server::start(name, size, false, Listen::Tcp)
    }

    fn uri(&self, name: &str) -> String {
        format!("nbd://127.0.0.1:{}/{name}", self.port)
    }

    /// Stops the server and waits (bounded) for its thread.
    fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.thread.take() {
            let deadline = Instant::now() + Duration::from_secs(20);
            while !t.is_finished() {
                assert!(Instant::now() < deadline, "server did not stop");
                std::thread::sleep(Duration::from_millis(10));
            }
            t.join().expect("server thread panicked");
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.thread.take()
            && !std::thread::panicking()
        {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------------------
// Running clients.

/// Whether `tool` is installed. A missing client fails the test (`.ci/run` installs them all),
/// unless `IRONHORN_ALLOW_MISSING_TOOLS=1` asks to skip it, for a quick local run.
fn have(tool: &str) -> bool {
    let ok = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var_os("IRONHORN_ALLOW_MISSING_TOOLS").is_some_and(|v| v == "1"),
            "{tool} is not installed (run .ci/run, or set IRONHORN_ALLOW_MISSING_TOOLS=1 to skip)"
        );
        eprintln!("SKIPPED: {tool} is not installed");
    }
    ok
}

/// Runs a client with a timeout, collecting its output; kills it when it overruns.
fn run(cmd: &mut Command) -> Output {
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {desc}: {e}"));
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            v
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("stdout")));
    let err = drain(Box::new(child.stderr.take().expect("stderr")));
    let deadline = Instant::now() + CLIENT_TIMEOUT;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{desc} did not finish within {CLIENT_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: out.join().expect("stdout reader"),
        stderr: err.join().expect("stderr reader"),
    }
}

/// Runs a client that must succeed; returns its stdout.
fn run_ok(cmd: &mut Command) -> String {
    let desc = format!("{cmd:?}");
    let o = run(cmd);
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "{desc} failed ({}):\nstdout:\n{stdout}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    stdout
}

fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw", uri]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = run_ok(&mut c);
    assert!(
        !out.contains("failed"),
        "qemu-io reported a failure:\n{out}"
    );
    out
}

/// Deterministic pseudo-random bytes (xorshift64*).
fn random_bytes(len: usize, mut seed: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        seed ^= seed >> 12;
        seed ^= seed << 25;
        seed ^= seed >> 27;
        v.extend_from_slice(&seed.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    v.truncate(len);
    v
}

// ---------------------------------------------------------------------------------------
// Real clients.

#[test]
fn nbdinfo_reports_the_export() {
    if !have("nbdinfo") {
        return;
    }
    let srv = Server::tcp("vol1", 8 * MIB);
    let out = run_ok(Command::new("nbdinfo").args(["--json", &srv.uri("vol1")]));
    let v: serde_json::Value = serde_json::from_str(&out).expect("nbdinfo json");
    assert_eq!(v["protocol"], "newstyle-fixed");
    assert_eq!(v["structured"], true);
    let e = &v["exports"][0];
    assert_eq!(e["export-name"], "vol1");
    assert_eq!(e["export-size"], 8 * MIB);
    assert_eq!(e["is_read_only"], false);
    for cap in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_multi_conn",
        "can_df",
    ] {
        assert_eq!(e[cap], true, "{cap} in {out}");
    }
    assert_eq!(e["contexts"][0], "base:allocation");
    assert_eq!(e["block_size_minimum"], 512, "{out}");
    assert_eq!(e["block_size_preferred"], 4096);
    assert_eq!(e["block_size_maximum"], 32 * MIB);

    // The default (empty) export name reaches the same volume; --list uses NBD_OPT_LIST.
    let out = run_ok(Command::new("nbdinfo").args(["--size", &srv.uri("")]));
    assert_eq!(out.trim(), (8 * MIB).to_string());
    let out = run_ok(Command::new("nbdinfo").args([
        "--list",
        "--json",
        &format!("nbd://127.0.0.1:{}", srv.port),
    ]));
    let v: serde_json::Value = serde_json::from_str(&out).expect("nbdinfo --list json");
    assert_eq!(v["exports"][0]["export-name"], "vol1", "{out}");
}

#[test]
fn nbdinfo_map_shows_holes_and_data() {
    if !have("nbdinfo") || !have("qemu-io") {
        return;
    }
    let srv = Server::tcp("vol", 4 * MIB);
    let uri = srv.uri("vol");
    let out = run_ok(Command::new("nbdinfo").args(["--map", &uri]));
    let rows: Vec<Vec<String>> = out
        .lines()
        .map(|l| l.split_whitespace().map(str::to_owned).collect())
        .collect();
    assert_eq!(rows.len(), 1, "{out}");
    assert_eq!(rows[0][..3], ["0", &(4 * MIB).to_string(), "3"]);

    qemu_io(&uri, &["write -P 0x5a 1M 64k"]);
    let out = run_ok(Command::new("nbdinfo").args(["--map", &uri]));
    let rows: Vec<(u64, u64, u32)> = out
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].parse().expect("start"),
                f[1].parse().expect("length"),
                f[2].parse().expect("type"),
            )
        })
        .collect();
    assert_eq!(
        rows,
        vec![
            (0, MIB, 3),
            (MIB, 64 << 10, 0),
            (MIB + (64 << 10), 3 * MIB - (64 << 10), 3)
        ],
        "{out}"
    );
}

#[test]
fn qemu_io_writes_and_reads_patterns() {
    if !have("qemu-io") {
        return;
    }
    let srv = Server::tcp("vol", 16 * MIB);
    let uri = srv.uri("vol");
    qemu_io(
        &uri,
        &[
            "write -P 0xab 0 64k",
            "read -P 0xab 0 64k",
            // 512-byte aligned, smaller than a 4 KiB block.
            "write -P 0x11 512 1536",
            "read -P 0xab 0 512",
            "read -P 0x11 512 1536",
            "read -P 0xab 2048 63488",
            // FUA write, write zeroes, discard, flush.
            "write -f -P 0x22 1M 128k",
            "read -P 0x22 1M 128k",
            "write -z 1M 4k",
            "read -P 0 1M 4k",
            "read -P 0x22 1052672 4096",
            "discard 2M 1M",
            "read -P 0 2M 1M",
            "flush",
            // Parallel requests on one connection.
            "aio_write -P 0x33 4M 64k",
            "aio_write -P 0x44 5M 64k",
            "aio_write -P 0x55 6M 64k",
            "aio_flush",
            "read -P 0x33 4M 64k",
            "read -P 0x44 5M 64k",
            "read -P 0x55 6M 64k",
            // Biggest single request the export allows.
            "write -P 0x66 8M 8M",
            "read -P 0x66 8M 8M",
        ],
    );
    // What qemu wrote is what the device holds.
    let d = srv.dev.contents(0, 4096);
    assert!(d[..512].iter().all(|b| *b == 0xab));
    assert!(d[512..2048].iter().all(|b| *b == 0x11));
    assert!(d[2048..].iter().all(|b| *b == 0xab));
    assert!(
        srv.dev
            .contents(5 * MIB, 64 << 10)
            .iter()
            .all(|b| *b == 0x44)
    );
}

#[test]
fn qemu_img_map_shows_holes() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let srv = Server::tcp("vol", 4 * MIB);
    let uri = srv.uri("vol");
    qemu_io(&uri, &["write -P 1 0 64k", "write -P 2 2M 4k"]);
    let out = run_ok(Command::new("qemu-img").args(["map", "--output=json", "-f", "raw", &uri]));
    let v: serde_json::Value = serde_json::from_str(&out).expect("qemu-img map json");
    let got: Vec<(u64, u64, bool, bool)> = v
        .as_array()
        .expect("array")
        .iter()
        .map(|e| {
            (
                e["start"].as_u64().expect("start"),
                e["length"].as_u64().expect("length"),
                e["data"].as_bool().expect("data"),
                e["zero"].as_bool().expect("zero"),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (0, 64 << 10, true, false),
            (64 << 10, 2 * MIB - (64 << 10), false, true),
            (2 * MIB, 4096, true, false),
            (2 * MIB + 4096, 2 * MIB - 4096, false, true),
        ],
        "{out}"
    );
}

#[test]
fn nbdcopy_round_trips_random_data() {
    if !have("nbdcopy") {
        return;
    }
    let size = 24 * MIB;
    let srv = Server::tcp("vol", size);
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("rand");
    let back = dir.path().join("back");
    let mut data = random_bytes(size as usize, 0x1234_5678_9abc_def1);
    // A zero stretch in the middle, so nbdcopy's zero detection and write-zeroes run too.
    data[(4 * MIB) as usize..(6 * MIB) as usize].fill(0);
    std::fs::write(&src, &data).expect("write source");
    let uri = srv.uri("vol");
    run_ok(Command::new("nbdcopy").args([
        src.to_str().expect("utf-8"),
        &uri,
        "--requests=32",
        "--connections=4",
    ]));
    assert!(
        srv.dev.contents(0, size) == data,
        "device differs from source"
    );
    std::fs::File::create(&back).expect("create target");
    run_ok(Command::new("nbdcopy").args([&uri, back.to_str().expect("utf-8")]));
    let got = std::fs::read(&back).expect("read back");
    assert!(got == data, "copied-back data differs from source");
}

#[test]
fn fio_randwrite_verifies() {
    if !have("fio") {
        return;
    }
    let srv = Server::tcp("vol", 16 * MIB);
    // fio writes state files into its working directory: keep them out of the tree.
    let dir = tempfile::tempdir().expect("tempdir");
    let out = run_ok(Command::new("fio").current_dir(dir.path()).args([
        "--name=verify",
        "--ioengine=nbd",
        &format!("--uri={}", srv.uri("vol")),
        "--rw=randwrite",
        "--bs=4k",
        "--size=8m",
        "--iodepth=32",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--verify_state_save=0",
        "--output-format=json",
    ]));
    let start = out.find('{').expect("fio json");
    let v: serde_json::Value = serde_json::from_str(&out[start..]).expect("fio json");
    let job = &v["jobs"][0];
    assert_eq!(job["error"], 0, "{out}");
    assert_eq!(job["write"]["io_bytes"], 8 * MIB, "{out}");
    assert_eq!(job["read"]["io_bytes"], 8 * MIB, "verify reads: {out}");
}

#[test]
fn unix_socket_export() {
    if !have("qemu-io") || !have("nbdinfo") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("nbd.sock");
    let srv = Server::start("uvol", 4 * MIB, false, Listen::Unix(sock.clone()));
    let uri = format!("nbd+unix:///uvol?socket={}", sock.display());
    qemu_io(&uri, &["write -P 0x77 0 1M", "read -P 0x77 0 1M"]);
    let out = run_ok(Command::new("nbdinfo").args(["--size", &uri]));
    assert_eq!(out.trim(), (4 * MIB).to_string());
    assert!(srv.dev.contents(0, MIB).iter().all(|b| *b == 0x77));
}

#[test]
fn read_only_export_refuses_writes() {
    if !have("nbdinfo") || !have("qemu-io") {
        return;
    }
    let srv = Server::start("ro", 4 * MIB, true, Listen::Tcp);
    let uri = srv.uri("ro");
    let out = run_ok(Command::new("nbdinfo").args(["--json", &uri]));
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["exports"][0]["is_read_only"], true);
    // qemu opens it read-only and reads; asking it to write fails.
    run_ok(Command::new("qemu-io").args(["-r", "-f", "raw", &uri, "-c", "read -P 0 0 64k"]));
    let o = run(Command::new("qemu-io").args(["-f", "raw", &uri, "-c", "write 0 4k"]));
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    // qemu sees NBD_FLAG_READ_ONLY and refuses to open the export for writing.
    assert!(!o.status.success(), "{all}");
    assert!(all.contains("Permission denied"), "{all}");
    assert!(srv.dev.contents(0, 4096).iter().all(|b| *b == 0));
}

#[test]
fn wrong_export_name_is_refused() {
    if !have("nbdinfo") {
        return;
    }
    let srv = Server::tcp("right", MIB);
    let o = run(Command::new("nbdinfo").arg(srv.uri("wrong")));
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    // libnbd reports NBD_REP_ERR_UNKNOWN to NBD_OPT_GO as ENOENT.
    assert!(err.contains("No such file or directory"), "{err}");
    assert!(err.contains("wrong"), "{err}");
    run_ok(Command::new("nbdinfo").arg(srv.uri("right")));
}

#[test]
fn shutdown_stops_accepting_and_returns() {
    if !have("nbdinfo") {
        return;
    }
    let mut srv = Server::tcp("vol", MIB);
    // One idle client mid-transmission, which shutdown must close.
    let mut idle = RawClient::connect(srv.port);
    idle.go("vol");
    run_ok(Command::new("nbdinfo").arg(srv.uri("vol")));
    srv.stop();
    assert!(idle.eof(), "idle connection still open after shutdown");
    assert!(TcpStream::connect(("127.0.0.1", srv.port)).is_err());
}

// ---------------------------------------------------------------------------------------
// Bad input over a raw socket.

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const OPT_GO: u32 = 7;

struct RawClient(TcpStream);

impl RawClient {
    fn connect(port: u16) -> RawClient {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        RawClient(s)
    }

    fn read_n(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.0.read_exact(&mut b).expect("read from server");
        b
    }

    fn send(&mut self, b: &[u8]) {
        self.0.write_all(b).expect("send to server");
    }

    /// Fixed newstyle handshake to transmission via NBD_OPT_GO, simple replies only.
    fn go(&mut self, name: &str) {
        let g = self.read_n(18);
        assert_eq!(&g[0..8], &NBDMAGIC.to_be_bytes());
        assert_eq!(&g[8..16], &IHAVEOPT.to_be_bytes());
        self.send(&3u32.to_be_bytes());
        let mut o = Vec::new();
        o.extend_from_slice(&IHAVEOPT.to_be_bytes());
        o.extend_from_slice(&OPT_GO.to_be_bytes());
        o.extend_from_slice(&(4 + name.len() as u32 + 2).to_be_bytes());
        o.extend_from_slice(&(name.len() as u32).to_be_bytes());
        o.extend_from_slice(name.as_bytes());
        o.extend_from_slice(&0u16.to_be_bytes());
        self.send(&o);
        loop {
            let h = self.read_n(20);
            let kind = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
            let len = u32::from_be_bytes([h[16], h[17], h[18], h[19]]) as usize;
            self.read_n(len);
            match kind {
                1 => return,
                3 => continue,
                other => panic!("NBD_OPT_GO answered {other:#x}"),
            }
        }
    }

    fn request(&mut self, kind: u16, cookie: u64, offset: u64, len: u32) {
        let mut r = Vec::with_capacity(28);
        r.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        r.extend_from_slice(&0u16.to_be_bytes());
        r.extend_from_slice(&kind.to_be_bytes());
        r.extend_from_slice(&cookie.to_be_bytes());
        r.extend_from_slice(&offset.to_be_bytes());
        r.extend_from_slice(&len.to_be_bytes());
        self.send(&r);
    }

    /// (error, cookie) of a simple reply.
    fn simple_reply(&mut self) -> (u32, u64) {
        let h = self.read_n(16);
        assert_eq!(&h[0..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
        (
            u32::from_be_bytes([h[4], h[5], h[6], h[7]]),
            u64::from_be_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]),
        )
    }

    /// Whether the server closed the connection (reads until end of stream).
    fn eof(&mut self) -> bool {
        let mut b = [0u8; 4096];
        loop {
            match self.0.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }
}

/// After every kind of abuse, a real client still gets served.
fn still_serves(srv: &Server) {
    if have("nbdinfo") {
        run_ok(Command::new("nbdinfo").arg(srv.uri("vol")));
    } else {
        RawClient::connect(srv.port).go("vol");
    }
}

#[test]
fn garbage_before_the_handshake_closes_only_that_connection() {
    let srv = Server::tcp("vol", MIB);
    // Client flags with unknown bits.
    let mut c = RawClient::connect(srv.port);
    c.read_n(18);
    c.send(&[0xde; 64]);
    assert!(c.eof());
    // Valid flags, then an option without IHAVEOPT.
    let mut c = RawClient::connect(srv.port);
    c.read_n(18);
    c.send(&1u32.to_be_bytes());
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(c.eof());
    // An option announcing 1 GiB of data.
    let mut c = RawClient::connect(srv.port);
    c.read_n(18);
    c.send(&1u32.to_be_bytes());
    let mut o = IHAVEOPT.to_be_bytes().to_vec();
    o.extend_from_slice(&OPT_GO.to_be_bytes());
    o.extend_from_slice(&(1u32 << 30).to_be_bytes());
    c.send(&o);
    assert!(c.eof());
    // Hanging up mid-handshake.
    let mut c = RawClient::connect(srv.port);
    c.read_n(18);
    c.send(&[0, 0]);
    drop(c);
    still_serves(&srv);
}

#[test]
fn garbage_after_the_handshake_closes_only_that_connection() {
    let srv = Server::tcp("vol", MIB);
    let mut c = RawClient::connect(srv.port);
    c.go("vol");
    c.send(&[0x5a; 200]);
    assert!(c.eof());

    let mut c = RawClient::connect(srv.port);
    c.go("vol");
    c.request(0, 1, 0, 512);
    assert_eq!(c.simple_reply(), (0, 1));
    c.read_n(512);
    let mut bad = 0xdead_beef_u32.to_be_bytes().to_vec();
    bad.extend_from_slice(&[0; 24]);
    c.send(&bad);
    assert!(c.eof());
    still_serves(&srv);
}

#[test]
fn oversized_write_closes_the_connection() {
    let srv = Server::tcp("vol", 64 * MIB);
    let mut c = RawClient::connect(srv.port);
    c.go("vol");
    c.request(1, 1, 0, (32 << 20) + 4096);
    assert!(c.eof());
    still_serves(&srv);
}

#[test]
fn out_of_range_and_unaligned_requests_get_errors() {
    let srv = Server::tcp("vol", MIB);
    let mut c = RawClient::connect(srv.port);
    c.go("vol");
    c.request(0, 1, MIB, 512);
    assert_eq!(c.simple_reply(), (22, 1), "read past the end");
    c.request(0, 2, MIB - 512, 1024);
    assert_eq!(c.simple_reply(), (22, 2), "read across the end");
    c.request(0, 3, 1, 512);
    assert_eq!(c.simple_reply(), (22, 3), "unaligned read");
    c.request(0, 4, 0, 64 << 20);
    assert_eq!(c.simple_reply(), (22, 4), "oversized read");
    c.request(1, 5, MIB, 512);
    c.send(&[0u8; 512]);
    assert_eq!(c.simple_reply(), (28, 5), "write past the end");
    c.request(4, 6, u64::MAX - 4095, 4096);
    assert_eq!(c.simple_reply(), (22, 6), "trim wrapping around");
    c.request(99, 7, 0, 0);
    assert_eq!(c.simple_reply(), (22, 7), "unknown command");
    // The same connection still works.
    c.request(1, 8, 4096, 512);
    c.send(&[0x42u8; 512]);
    assert_eq!(c.simple_reply(), (0, 8));
    c.request(0, 9, 4096, 512);
    assert_eq!(c.simple_reply(), (0, 9));
    assert!(c.read_n(512).iter().all(|b| *b == 0x42));
    c.request(2, 10, 0, 0);
    assert!(c.eof());
    still_serves(&srv);
}
