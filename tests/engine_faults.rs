//! Faults injected into a 3-replica volume while fio writes and verifies through the
//! engine's NBD frontend (DESIGN.md §3 invariants 1–6, §7 "Faults on purpose").
//!
//! Every scenario runs fio's nbd engine with `verify=crc32c`, `verify_fatal=1` against the
//! real binary (replicas and engine as separate processes, see `tests/common`), injects one
//! fault while the write phase runs (SIGKILL or SIGSTOP of a replica, a full disk, SIGKILL of
//! the engine, all replicas gone, bad bytes on the ports), and then checks:
//!
//! - fio exits 0 and read back everything it wrote (nothing acknowledged was lost);
//! - the engine reports the right modes and robustness (`engine ctl --json info`);
//! - once the failed replica is added back and rebuilt (WO, then RW), a verify-only fio pass
//!   over the same regions succeeds and every replica holds the same bytes (each replica is
//!   read alone through its own engine by [`Cluster::assert_replicas_identical`]).
//!
//! Write phases are rate-limited so that they last a few seconds and the fault lands in the
//! middle of them. Replica timeouts are 2 s to keep the hung-replica cases short.
//!
//! Scenarios: a replica SIGKILLed, SIGSTOPped, or out of disk space mid-write; the engine
//! SIGKILLed mid-write and restarted; a stale replica facing a restarted engine; every
//! replica killed or hung; bad bytes on every port; the engine or the target killed
//! mid-rebuild. Regression tests for bugs these found: a rebuild whose source hangs, a large
//! write-zeroes over a snapshot, writes of a connection from before a rebuild, a fencing
//! failure. One ignored repro documents a known gap (a stale replica alone at restart).

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::{Cluster, ClusterOptions, CmdOutput, modes, random_bytes, run_with_timeout};
use serde_json::Value;

const MIB: u64 = 1 << 20;
/// Volume size of every scenario.
const SIZE: u64 = 64 * MIB;
/// `--replica-timeout` of every scenario.
const REPLICA_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest a fio run may take before it is killed (and the test fails).
const FIO_SECS: u64 = 60;
/// Longest a qemu-io run may take.
const QEMU_IO_SECS: u64 = 30;
/// How long to wait for a mode change or a rebuild.
const MODE_WAIT: Duration = Duration::from_secs(30);
/// How long a write phase runs before the fault is injected.
const BEFORE_FAULT: Duration = Duration::from_millis(1200);

fn cluster() -> Cluster {
    Cluster::start_with(
        3,
        SIZE,
        ClusterOptions {
            replica_timeout: Some(REPLICA_TIMEOUT),
            ..ClusterOptions::default()
        },
    )
}

// ---------------------------------------------------------------------------------------
// fio

/// One fio job over a region of the volume (random writes of 4–64 KiB at queue depth 16,
/// crc32c verification). The same job with `--verify_only` re-reads what it wrote.
#[derive(Debug, Clone)]
struct Fio {
    name: &'static str,
    rw: &'static str,
    bs: &'static str,
    iodepth: u32,
    offset: u64,
    size: u64,
    seed: u64,
    /// `--rate` (write bandwidth), so that the write phase lasts long enough for a fault.
    rate: Option<&'static str>,
    extra: Vec<String>,
}

/// What fio reported (from `--output-format=json`).
#[derive(Debug)]
struct FioResult {
    out: CmdOutput,
    error: i64,
    written: u64,
    read: u64,
    /// Longest write completion latency.
    max_write_latency: Duration,
}

impl FioResult {
    /// fio exited 0, reported no error, and (unless `verify_only`) wrote `size` bytes and read
    /// all of them back for verification.
    #[track_caller]
    fn assert_verified(&self, job: &Fio) {
        assert!(
            self.out.success() && self.error == 0,
            "fio {} failed (error {}): {}",
            job.name,
            self.error,
            self.out
        );
        let text = self.out.all_output().to_lowercase();
        assert!(
            !text.contains("verify: bad") && !text.contains("crc32c: verify failed"),
            "fio {} reported a verify error: {}",
            job.name,
            self.out
        );
        if job.extra.iter().any(|a| a == "--verify_only") {
            assert_eq!(self.read, job.size, "fio {} verified too little", job.name);
        } else {
            assert_eq!(self.written, job.size, "fio {} wrote too little", job.name);
            assert_eq!(
                self.read, self.written,
                "fio {} did not verify it all",
                job.name
            );
        }
    }
}

impl Fio {
    /// Random writes of 4–64 KiB over `[offset, offset + size)`, verified after the write phase.
    fn region(name: &'static str, offset: u64, size: u64, seed: u64) -> Fio {
        Fio {
            name,
            rw: "randwrite",
            bs: "4k-64k",
            iodepth: 16,
            offset,
            size,
            seed,
            rate: None,
            extra: Vec::new(),
        }
    }

    fn rate(mut self, rate: &'static str) -> Fio {
        self.rate = Some(rate);
        self
    }

    fn arg(mut self, a: &str) -> Fio {
        self.extra.push(a.to_owned());
        self
    }

    /// The same job reading back and checking what the write phase left.
    fn verify_only(&self) -> Fio {
        let mut v = self.clone();
        v.rate = None;
        v.extra.retain(|a| a != "--do_verify=0");
        v.extra.push("--verify_only".to_owned());
        v
    }

    fn command(&self, uri: &str, dir: &Path) -> Command {
        let mut c = Command::new("fio");
        c.current_dir(dir)
            .arg(format!("--name={}", self.name))
            .arg("--ioengine=nbd")
            .arg(format!("--uri={uri}"))
            .arg(format!("--rw={}", self.rw))
            .arg(format!("--bsrange={}", self.bs))
            .arg(format!("--iodepth={}", self.iodepth))
            .arg(format!("--offset={}", self.offset))
            .arg(format!("--size={}", self.size))
            .arg(format!("--randseed={}", self.seed))
            .arg("--verify=crc32c")
            .arg("--do_verify=1")
            .arg("--verify_fatal=1")
            .arg("--verify_state_save=0")
            .arg("--output-format=json");
        if let Some(r) = self.rate {
            c.arg(format!("--rate={r}"));
        }
        c.args(&self.extra);
        c
    }

    fn run(&self, uri: &str, dir: &Path) -> FioResult {
        let r = self.run_for(uri, dir, FIO_SECS);
        assert!(!r.out.timed_out, "fio {} hung: {}", self.name, r.out);
        r
    }

    /// Runs for at most `secs`, then kills fio (its result then says `timed_out`).
    fn run_for(&self, uri: &str, dir: &Path, secs: u64) -> FioResult {
        parse_fio(run_with_timeout(&mut self.command(uri, dir), secs))
    }

    /// Runs and asserts [`FioResult::assert_verified`].
    #[track_caller]
    fn run_ok(&self, uri: &str, dir: &Path) -> FioResult {
        let r = self.run(uri, dir);
        r.assert_verified(self);
        r
    }

    /// Runs on a thread; join the handle for the result.
    fn spawn(&self, uri: &str, dir: &Path) -> JoinHandle<FioResult> {
        let (job, uri, dir) = (self.clone(), uri.to_owned(), dir.to_owned());
        thread::spawn(move || job.run(&uri, &dir))
    }
}

fn parse_fio(out: CmdOutput) -> FioResult {
    let json: Option<Value> = out
        .stdout
        .find('{')
        .and_then(|at| serde_json::from_str(&out.stdout[at..]).ok());
    let job = json.as_ref().map(|j| &j["jobs"][0]);
    let field = |path: &[&str]| {
        let mut v = job?;
        for p in path {
            v = v.get(*p)?;
        }
        v.as_u64().or_else(|| v.as_i64().map(|i| i as u64))
    };
    FioResult {
        error: job
            .and_then(|j| j["error"].as_i64())
            .unwrap_or(if out.success() { 0 } else { -1 }),
        written: field(&["write", "io_bytes"]).unwrap_or(0),
        read: field(&["read", "io_bytes"]).unwrap_or(0),
        max_write_latency: Duration::from_nanos(field(&["write", "clat_ns", "max"]).unwrap_or(0)),
        out,
    }
}

// ---------------------------------------------------------------------------------------
// Engine state

fn info_replica<'a>(info: &'a Value, address: &str) -> &'a Value {
    info["replicas"]
        .as_array()
        .and_then(|rs| rs.iter().find(|r| r["address"] == address))
        .unwrap_or_else(|| panic!("{address} is not in info: {info}"))
}

/// Asserts that `down` (addresses) are ERR, every other replica is RW, and robustness.
#[track_caller]
fn assert_modes(info: &Value, down: &[&str], robustness: &str) {
    for (address, mode) in modes(info) {
        let want = if down.contains(&address.as_str()) {
            "ERR"
        } else {
            "RW"
        };
        assert_eq!(mode, want, "mode of {address}: {info}");
    }
    assert_eq!(info["robustness"], robustness, "robustness: {info}");
}

/// Adds `address` back (`engine ctl replica add`), checks that it joins WO, polls `info`
/// while it is rebuilt, and waits until it is RW. Returns the highest rebuild progress
/// (done, total) seen while it was WO.
#[track_caller]
fn add_and_rebuild(c: &Cluster, address: &str) -> (u64, u64) {
    let added = c.ctl_json(&["replica", "add", address]);
    let me = added
        .as_array()
        .and_then(|rs| rs.iter().find(|r| r["address"] == address))
        .unwrap_or_else(|| panic!("added replica missing from the answer: {added}"));
    assert_eq!(me["mode"], "WO", "a replica joins WO: {added}");
    let mut progress = (0, 0);
    let deadline = Instant::now() + MODE_WAIT;
    loop {
        let info = c.ctl_json(&["info"]);
        let r = info_replica(&info, address);
        match r["mode"].as_str() {
            Some("WO") => {
                let done = r["rebuild_done_bytes"].as_u64().unwrap_or(0);
                let total = r["rebuild_total_bytes"].as_u64().unwrap_or(0);
                assert!(done <= total, "rebuild progress past its total: {info}");
                progress = progress.max((done, total));
            }
            Some("RW") => break,
            _ => panic!("{address} left the rebuild: {info}"),
        }
        assert!(Instant::now() < deadline, "rebuild did not finish: {info}");
    }
    eprintln!("rebuild of {address}: progress seen while WO {progress:?}");
    progress
}

// ---------------------------------------------------------------------------------------
// qemu-io

fn qemu_io(uri: &str, cmds: &[&str]) -> CmdOutput {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw", uri]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    run_with_timeout(&mut c, QEMU_IO_SECS)
}

/// qemu-io ran to the end and printed no error.
#[track_caller]
fn assert_qemu_io_ok(out: &CmdOutput) {
    let text = out.all_output();
    assert!(
        out.success() && !text.contains("failed") && !text.contains("Pattern verification"),
        "qemu-io failed: {out}"
    );
}

// ---------------------------------------------------------------------------------------
// Raw NBD client (for acknowledged-write bookkeeping and bad input)

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const NBD_REQUEST_MAGIC: u32 = 0x2560_9513;
const NBD_SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const NBD_OPT_GO: u32 = 7;
const NBD_CMD_READ: u16 = 0;
const NBD_CMD_WRITE: u16 = 1;
const NBD_CMD_FLUSH: u16 = 3;
const NBD_CMD_FLAG_FUA: u16 = 1;
const NBD_EINVAL: u32 = 22;
const NBD_ENOSPC: u32 = 28;

/// A minimal NBD client: fixed newstyle handshake with `NBD_OPT_GO`, simple replies, one
/// request at a time. Every method returns an error instead of panicking, so that it can
/// be used across an engine crash.
struct RawNbd(TcpStream);

type IoResult<T> = std::io::Result<T>;

impl RawNbd {
    fn connect(port: u16) -> IoResult<RawNbd> {
        let s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        s.set_write_timeout(Some(Duration::from_secs(20)))?;
        s.set_nodelay(true)?;
        Ok(RawNbd(s))
    }

    /// Connects and negotiates `export` up to transmission.
    fn open(port: u16, export: &str) -> IoResult<RawNbd> {
        let mut c = RawNbd::connect(port)?;
        let g = c.read_n(18)?;
        if g[0..8] != NBDMAGIC.to_be_bytes() || g[8..16] != IHAVEOPT.to_be_bytes() {
            return Err(std::io::Error::other("not an NBD newstyle server"));
        }
        c.send(&3u32.to_be_bytes())?;
        let mut o = Vec::new();
        o.extend_from_slice(&IHAVEOPT.to_be_bytes());
        o.extend_from_slice(&NBD_OPT_GO.to_be_bytes());
        o.extend_from_slice(&(4 + export.len() as u32 + 2).to_be_bytes());
        o.extend_from_slice(&(export.len() as u32).to_be_bytes());
        o.extend_from_slice(export.as_bytes());
        o.extend_from_slice(&0u16.to_be_bytes());
        c.send(&o)?;
        loop {
            let h = c.read_n(20)?;
            let kind = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
            let len = u32::from_be_bytes([h[16], h[17], h[18], h[19]]) as usize;
            c.read_n(len)?;
            match kind {
                1 => return Ok(c),
                3 => continue,
                other => {
                    return Err(std::io::Error::other(format!(
                        "NBD_OPT_GO answered {other:#x}"
                    )));
                }
            }
        }
    }

    fn read_n(&mut self, n: usize) -> IoResult<Vec<u8>> {
        let mut b = vec![0u8; n];
        self.0.read_exact(&mut b)?;
        Ok(b)
    }

    fn send(&mut self, b: &[u8]) -> IoResult<()> {
        self.0.write_all(b)
    }

    fn request(
        &mut self,
        kind: u16,
        flags: u16,
        cookie: u64,
        offset: u64,
        len: u32,
    ) -> IoResult<()> {
        let mut r = Vec::with_capacity(28);
        r.extend_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
        r.extend_from_slice(&flags.to_be_bytes());
        r.extend_from_slice(&kind.to_be_bytes());
        r.extend_from_slice(&cookie.to_be_bytes());
        r.extend_from_slice(&offset.to_be_bytes());
        r.extend_from_slice(&len.to_be_bytes());
        self.send(&r)
    }

    /// (error, cookie) of a simple reply.
    fn simple_reply(&mut self) -> IoResult<(u32, u64)> {
        let h = self.read_n(16)?;
        if h[0..4] != NBD_SIMPLE_REPLY_MAGIC.to_be_bytes() {
            return Err(std::io::Error::other("bad reply magic"));
        }
        Ok((
            u32::from_be_bytes([h[4], h[5], h[6], h[7]]),
            u64::from_be_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]),
        ))
    }

    /// Writes `data` at `offset`; `Ok(errno)` is the server's answer (0 = acknowledged).
    fn write(&mut self, cookie: u64, offset: u64, data: &[u8], fua: bool) -> IoResult<u32> {
        let flags = if fua { NBD_CMD_FLAG_FUA } else { 0 };
        self.request(NBD_CMD_WRITE, flags, cookie, offset, data.len() as u32)?;
        self.send(data)?;
        self.checked_reply(cookie)
    }

    fn flush(&mut self, cookie: u64) -> IoResult<u32> {
        self.request(NBD_CMD_FLUSH, 0, cookie, 0, 0)?;
        self.checked_reply(cookie)
    }

    fn read(&mut self, cookie: u64, offset: u64, len: u32) -> IoResult<Result<Vec<u8>, u32>> {
        self.request(NBD_CMD_READ, 0, cookie, offset, len)?;
        match self.checked_reply(cookie)? {
            0 => Ok(Ok(self.read_n(len as usize)?)),
            e => Ok(Err(e)),
        }
    }

    fn checked_reply(&mut self, cookie: u64) -> IoResult<u32> {
        let (err, got) = self.simple_reply()?;
        if got != cookie {
            return Err(std::io::Error::other(format!(
                "reply to cookie {got}, expected {cookie}"
            )));
        }
        Ok(err)
    }
}

/// Reads until the peer closes (true) or 10 s pass without that (false).
fn closed_by_peer(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut b = [0u8; 4096];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
                ) =>
            {
                return true;
            }
            Err(_) => return false,
        }
    }
}

// ---------------------------------------------------------------------------------------
// tmpfs

/// A tmpfs mounted on a directory; lazily unmounted on drop (also while a process still
/// has files open in it, and when the test panics).
struct Tmpfs(PathBuf);

impl Tmpfs {
    #[track_caller]
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let out = run_with_timeout(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(dir),
            30,
        );
        assert!(out.success(), "mount tmpfs: {out}");
        Tmpfs(dir.to_owned())
    }

    #[track_caller]
    fn resize(&self, size: &str) {
        let out = run_with_timeout(
            Command::new("mount")
                .args(["-o", &format!("remount,size={size}")])
                .arg(&self.0),
            30,
        );
        assert!(out.success(), "remount tmpfs: {out}");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let out = run_with_timeout(Command::new("umount").arg("-l").arg(&self.0), 30);
        if !out.success() {
            eprintln!("cannot unmount {}: {out}", self.0.display());
        }
    }
}

// ---------------------------------------------------------------------------------------
// Scenarios

/// 1. A replica SIGKILLed mid-write: it becomes ERR, fio goes on and verifies; the replica
///    restarted on its directory and added back is rebuilt (WO, then RW) while fio writes;
///    afterwards all three replicas hold the same bytes.
#[test]
fn replica_killed_mid_write_is_dropped_and_rebuilt() {
    let mut c = cluster();
    let dir = c.dir().to_owned();
    let victim = c.replicas[1].address();

    let a = Fio::region("a", 0, 32 * MIB, 11).rate("8m");
    let fio = a.spawn(&c.uri(), &dir);
    thread::sleep(BEFORE_FAULT);
    c.replicas[1].kill9();
    fio.join().unwrap().assert_verified(&a);

    let info = c.ctl_json(&["info"]);
    assert_modes(&info, &[&victim], "degraded");
    assert!(
        info_replica(&info, &victim)["message"]
            .as_str()
            .unwrap()
            .contains("connection"),
        "ERR message names the lost connection: {info}"
    );

    // Restart it on the same directory and rebuild it while fio writes another region.
    c.replicas[1].restart();
    let b = Fio::region("b", 32 * MIB, 32 * MIB, 12).rate("8m");
    let fio = b.spawn(&c.uri(), &dir);
    thread::sleep(Duration::from_millis(300));
    add_and_rebuild(&c, &victim);
    assert_modes(&c.ctl_json(&["info"]), &[], "healthy");
    fio.join().unwrap().assert_verified(&b);

    a.verify_only().run_ok(&c.uri(), &dir);
    b.verify_only().run_ok(&c.uri(), &dir);
    c.assert_replicas_identical(&[0, 1, 2]);
}

/// 2. A replica SIGSTOPped (hung) mid-write: after the replica timeout it is ERR and I/O goes
///    on (one stall of about the timeout); SIGCONT lets it answer late, which must change
///    nothing; added back, it is rebuilt and equal to the others.
#[test]
fn hung_replica_times_out_and_is_rebuilt() {
    let mut c = cluster();
    let dir = c.dir().to_owned();
    let victim = c.replicas[2].address();

    let a = Fio::region("a", 0, 32 * MIB, 21).rate("8m");
    let fio = a.spawn(&c.uri(), &dir);
    thread::sleep(BEFORE_FAULT);
    c.replicas[2].stop();
    let stopped = Instant::now();
    let result = fio.join().unwrap();
    result.assert_verified(&a);
    eprintln!(
        "hung replica: longest write {:?}, fio ended {:?} after the stop",
        result.max_write_latency,
        stopped.elapsed()
    );
    assert!(
        result.max_write_latency < REPLICA_TIMEOUT * 2 + Duration::from_secs(1),
        "I/O stalled for {:?} with a {REPLICA_TIMEOUT:?} replica timeout",
        result.max_write_latency
    );

    let info = c.ctl_json(&["info"]);
    assert_modes(&info, &[&victim], "degraded");
    assert!(
        info_replica(&info, &victim)["message"]
            .as_str()
            .unwrap()
            .contains("no answer"),
        "ERR message names the timeout: {info}"
    );

    // Let it run again: whatever it still answers must not disturb the volume.
    c.replicas[2].cont();
    let b = Fio::region("b", 32 * MIB, 32 * MIB, 22).rate("16m");
    let fio = b.spawn(&c.uri(), &dir);
    thread::sleep(Duration::from_millis(500));
    assert_modes(&c.ctl_json(&["info"]), &[&victim], "degraded");
    add_and_rebuild(&c, &victim);
    assert_modes(&c.ctl_json(&["info"]), &[], "healthy");
    fio.join().unwrap().assert_verified(&b);

    a.verify_only().run_ok(&c.uri(), &dir);
    b.verify_only().run_ok(&c.uri(), &dir);
    c.assert_replicas_identical(&[0, 1, 2]);
}

/// 3. A replica whose disk fills up (its directory on a 24 MiB tmpfs under a 64 MiB volume)
///    fails with ENOSPC and becomes ERR; the others go on and fio verifies. Given room again,
///    it is rebuilt and equal to the others.
#[test]
fn replica_with_full_disk_is_dropped() {
    let mut c = cluster();
    let dir = c.dir().to_owned();
    let victim = c.replicas[2].address();

    // Move replica2 onto a small tmpfs: take it out of the volume, recreate it there, and
    // add it back (an empty volume rebuilds at once).
    c.ctl_json(&["replica", "rm", &victim]);
    c.replicas[2].kill9();
    let rdir = c.replicas[2].dir.clone();
    std::fs::remove_dir_all(&rdir).unwrap();
    let tmpfs = Tmpfs::mount(&rdir, "24m");
    c.replicas[2].restart();
    add_and_rebuild(&c, &victim);

    // 48 MiB of random writes: more than the tmpfs holds.
    let a = Fio::region("a", 0, 48 * MIB, 31);
    a.run_ok(&c.uri(), &dir);
    let info = c.ctl_json(&["info"]);
    assert_modes(&info, &[&victim], "degraded");
    let msg = info_replica(&info, &victim)["message"].as_str().unwrap();
    assert!(msg.contains("no space"), "ERR message names ENOSPC: {info}");
    assert!(
        c.replicas[2].is_running(),
        "a full disk must not crash the replica"
    );

    // Room again: rebuild it.
    tmpfs.resize("256m");
    add_and_rebuild(&c, &victim);
    assert_modes(&c.ctl_json(&["info"]), &[], "healthy");
    a.verify_only().run_ok(&c.uri(), &dir);
    c.assert_replicas_identical(&[0, 1, 2]);
}

/// 4. The engine SIGKILLed mid-write and restarted on the same replicas: it reconciles them
///    (all RW, identical), everything flushed before the kill reads back (fio region A,
///    `end_fsync`), and so does every write a client got acknowledged during the kill's
///    write phase (a raw NBD client keeps the list).
#[test]
fn engine_killed_mid_write_restarts_and_reconciles() {
    let mut c = cluster();
    let dir = c.dir().to_owned();
    let epoch_before = c.ctl_json(&["info"])["epoch"].as_u64().unwrap();

    let a = Fio::region("a", 0, 32 * MIB, 41).arg("--end_fsync=1");
    a.run_ok(&c.uri(), &dir);

    // Second write phase: fio on [32, 48) MiB, and a client writing 4 KiB blocks one at a
    // time (every other one FUA, a flush every 16) on [48, 64) MiB, noting what was acked.
    let b = Fio::region("b", 32 * MIB, 16 * MIB, 42)
        .rate("4m")
        .arg("--do_verify=0");
    // fio's nbd engine may spin forever (ignoring SIGTERM) once its server is gone: it is
    // only load here, so it gets a deadline and SIGKILL.
    let fio = {
        let (b, uri, dir) = (b.clone(), c.uri(), dir.clone());
        thread::spawn(move || b.run_for(&uri, &dir, 10))
    };
    let acked = Arc::new(Mutex::new(Vec::<u64>::new()));
    let writer = {
        let (port, acked) = (c.engine.nbd_port, acked.clone());
        thread::spawn(move || {
            let mut n = RawNbd::open(port, "vol").unwrap();
            for i in 0..(16 * MIB / 4096) {
                let data = random_bytes(4096, 1000 + i);
                match n.write(i, 48 * MIB + i * 4096, &data, i % 2 == 0) {
                    Ok(0) => acked.lock().unwrap().push(i),
                    _ => return,
                }
                if i % 16 == 15 && !matches!(n.flush(i), Ok(0)) {
                    return;
                }
                thread::sleep(Duration::from_millis(2));
            }
        })
    };
    thread::sleep(BEFORE_FAULT);
    c.engine.kill9();
    writer.join().unwrap();
    let b_result = fio.join().unwrap();
    assert!(
        !b_result.out.success(),
        "fio b cannot succeed: its engine died"
    );
    let acked = acked.lock().unwrap().clone();
    assert!(
        !acked.is_empty(),
        "no write was acknowledged before the kill"
    );

    c.engine.restart();
    c.engine.wait_all_rw(MODE_WAIT);
    let info = c.ctl_json(&["info"]);
    assert_modes(&info, &[], "healthy");
    assert!(
        info["epoch"].as_u64().unwrap() > epoch_before,
        "a restarted engine raises the epoch: {info}"
    );

    a.verify_only().run_ok(&c.uri(), &dir);
    let mut n = RawNbd::open(c.engine.nbd_port, "vol").unwrap();
    let region = n.read(1, 48 * MIB, (16 * MIB) as u32).unwrap().unwrap();
    for &i in &acked {
        let at = (i * 4096) as usize;
        assert!(
            region[at..at + 4096] == random_bytes(4096, 1000 + i)[..],
            "acknowledged block {i} of {} lost across the engine kill",
            acked.len()
        );
    }
    drop(n);
    eprintln!("engine kill: {} acknowledged blocks intact", acked.len());
    c.assert_replicas_identical(&[0, 1, 2]);
}

/// 5. A replica killed, then the engine restarted before it is added back: although the
///    replica process runs again, the new engine does not trust it (ERR, stale epoch) and
///    serves from the others; added back, it is rebuilt and equal to the others.
#[test]
fn restarted_engine_does_not_trust_a_stale_replica() {
    let mut c = cluster();
    let dir = c.dir().to_owned();
    // The first replica: were it trusted, it would be the one the others are reconciled to.
    let victim = c.replicas[0].address();

    let a = Fio::region("a", 0, 32 * MIB, 51).rate("8m");
    let fio = a.spawn(&c.uri(), &dir);
    thread::sleep(BEFORE_FAULT);
    c.replicas[0].kill9();
    fio.join().unwrap().assert_verified(&a);
    assert_modes(&c.ctl_json(&["info"]), &[&victim], "degraded");

    c.replicas[0].restart();
    c.engine.terminate();
    c.engine.restart();
    let info = c.ctl_json(&["info"]);
    assert_modes(&info, &[&victim], "degraded");
    let msg = info_replica(&info, &victim)["message"].as_str().unwrap();
    assert!(
        msg.contains("stale") && msg.contains("epoch"),
        "the restarted engine says why it does not trust {victim}: {info}"
    );
    // Reads come from the up-to-date replicas only.
    a.verify_only().run_ok(&c.uri(), &dir);

    add_and_rebuild(&c, &victim);
    assert_modes(&c.ctl_json(&["info"]), &[], "healthy");
    a.verify_only().run_ok(&c.uri(), &dir);
    c.assert_replicas_identical(&[0, 1, 2]);
}

/// 6a. Every replica killed: requests fail with EIO at once (never hang), the engine stays
///     up and says "faulted". With the replicas back and the engine restarted, the data
///     written before is all there.
#[test]
fn all_replicas_killed_fail_io_without_hanging() {
    let mut c = cluster();
    let uri = c.uri();
    assert_qemu_io_ok(&qemu_io(&uri, &["write -P 0x5a 1M 1M", "flush"]));
    for r in &mut c.replicas {
        r.kill9();
    }
    let limit = REPLICA_TIMEOUT * 2 + Duration::from_secs(2);
    for cmd in ["read 0 4k", "write -P 1 0 4k", "flush"] {
        let out = qemu_io(&uri, &[cmd]);
        assert!(
            !out.timed_out && out.elapsed < limit,
            "`{cmd}` took {:?}: {out}",
            out.elapsed
        );
        // qemu-io prints no message for a failed flush, only its exit status says so.
        assert!(
            !out.success() && (cmd == "flush" || out.all_output().contains("Input/output error")),
            "`{cmd}` with no replica must fail with EIO: {out}"
        );
    }
    assert!(c.engine.is_running(), "the engine must stay up");
    let info = c.ctl_json(&["info"]);
    assert_eq!(info["robustness"], "faulted", "{info}");
    assert!(modes(&info).iter().all(|(_, m)| m == "ERR"), "{info}");

    for r in &mut c.replicas {
        r.restart();
    }
    c.engine.restart();
    c.engine.wait_all_rw(MODE_WAIT);
    assert_qemu_io_ok(&qemu_io(&uri, &["read -P 0x5a 1M 1M"]));
}

/// 6b. Every replica hung (SIGSTOP): requests fail with EIO within about twice the replica
///     timeout (a timeout, then fencing the others times out too), never hang; the engine
///     stays up and says "faulted".
#[test]
fn all_replicas_hung_fail_io_within_the_timeout() {
    let mut c = cluster();
    let uri = c.uri();
    assert_qemu_io_ok(&qemu_io(&uri, &["write -P 0x5a 0 1M"]));
    for r in &mut c.replicas {
        r.stop();
    }
    let limit = REPLICA_TIMEOUT * 2 + Duration::from_secs(2);
    for cmd in ["read 0 4k", "write -P 1 0 4k"] {
        let out = qemu_io(&uri, &[cmd]);
        eprintln!("all replicas hung: `{cmd}` failed after {:?}", out.elapsed);
        assert!(
            !out.timed_out && out.elapsed < limit,
            "`{cmd}` took {:?} (limit {limit:?}): {out}",
            out.elapsed
        );
        assert!(
            out.all_output().contains("Input/output error"),
            "`{cmd}` with every replica hung must fail with EIO: {out}"
        );
    }
    assert!(c.engine.is_running(), "the engine must stay up");
    let info = c.ctl_json(&["info"]);
    assert_eq!(info["robustness"], "faulted", "{info}");
    for r in &mut c.replicas {
        r.cont();
    }
}

/// 7. Bad input on the NBD port (garbage, garbage after a valid handshake, an oversized
///    write, reads and writes past the end) and on a replica's data port (garbage, huge
///    lengths) and control port: only that connection is closed or gets an error; the
///    engine and the replicas stay up, every replica stays RW, and the volume still serves.
#[test]
fn bad_input_on_nbd_and_replica_ports_changes_nothing() {
    let mut c = cluster();
    let uri = c.uri();
    let port = c.engine.nbd_port;
    assert_qemu_io_ok(&qemu_io(&uri, &["write -P 0x11 0 1M"]));

    // NBD: garbage instead of the client flags.
    let mut s = RawNbd::connect(port).unwrap();
    s.read_n(18).unwrap();
    s.send(&random_bytes(4096, 7)).unwrap();
    assert!(closed_by_peer(&mut s.0), "NBD garbage before the handshake");
    // NBD: a valid handshake, then garbage.
    let mut s = RawNbd::open(port, "vol").unwrap();
    let _ = s.send(&random_bytes(4096, 8));
    assert!(closed_by_peer(&mut s.0), "NBD garbage after the handshake");
    // NBD: a request with a bad magic after a good one.
    let mut s = RawNbd::open(port, "vol").unwrap();
    assert_eq!(s.read(1, 0, 4096).unwrap().unwrap(), vec![0x11; 4096]);
    let mut bad = 0xdead_beef_u32.to_be_bytes().to_vec();
    bad.extend_from_slice(&[0; 24]);
    s.send(&bad).unwrap();
    assert!(closed_by_peer(&mut s.0), "NBD request with a bad magic");
    // NBD: a write announcing more than the largest payload.
    let mut s = RawNbd::open(port, "vol").unwrap();
    s.request(NBD_CMD_WRITE, 0, 1, 0, u32::MAX - 511).unwrap();
    let _ = s.send(&[0xee; 4096]);
    assert!(closed_by_peer(&mut s.0), "NBD oversized write");
    // NBD: out of range: error replies, and the connection goes on.
    let mut s = RawNbd::open(port, "vol").unwrap();
    assert_eq!(
        s.read(1, SIZE, 4096).unwrap(),
        Err(NBD_EINVAL),
        "read past the end"
    );
    assert_eq!(
        s.read(2, SIZE - 4096, 8192).unwrap(),
        Err(NBD_EINVAL),
        "read across the end"
    );
    assert_eq!(
        s.write(3, SIZE, &[0xee; 4096], false).unwrap(),
        NBD_ENOSPC,
        "write past the end"
    );
    assert_eq!(
        s.write(4, u64::MAX - 4095, &[0xee; 4096], false).unwrap(),
        NBD_ENOSPC,
        "write wrapping around"
    );
    assert_eq!(s.read(5, 0, 4096).unwrap().unwrap(), vec![0x11; 4096]);
    drop(s);

    // Replica data ports: garbage, a write and a read announcing huge lengths, a cut-off
    // header. Each goes to a replica the engine is using.
    for (i, r) in c.replicas.iter().enumerate() {
        let data: SocketAddr = r.data;
        let mut s = TcpStream::connect(data).unwrap();
        s.write_all(&random_bytes(8192, 100 + i as u64)).unwrap();
        assert!(closed_by_peer(&mut s), "garbage on {}'s data port", r.name);

        for (op, len) in [(2u8, u32::MAX), (1u8, u32::MAX), (2u8, 64 << 20)] {
            let mut h = Vec::with_capacity(32);
            h.extend_from_slice(&0x4952_4851u32.to_le_bytes());
            h.extend_from_slice(&[op, 0, 0, 0]);
            h.extend_from_slice(&1u64.to_le_bytes());
            h.extend_from_slice(&0u64.to_le_bytes());
            h.extend_from_slice(&len.to_le_bytes());
            h.extend_from_slice(&0u32.to_le_bytes());
            let mut s = TcpStream::connect(data).unwrap();
            s.write_all(&h).unwrap();
            let _ = s.write_all(&[0x77; 4096]);
            assert!(
                closed_by_peer(&mut s),
                "op {op} of length {len} on {}'s data port",
                r.name
            );
        }
        let mut s = TcpStream::connect(data).unwrap();
        s.write_all(&0x4952_4851u32.to_le_bytes()).unwrap();
        drop(s);

        // The control (gRPC) port: not HTTP/2 at all.
        let mut s = TcpStream::connect(r.control).unwrap();
        let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        let _ = s.write_all(&random_bytes(4096, 200 + i as u64));
        assert!(
            closed_by_peer(&mut s),
            "garbage on {}'s control port",
            r.name
        );
    }

    // The engine's control (gRPC) port.
    let mut s = TcpStream::connect(c.engine.control).unwrap();
    let _ = s.write_all(&random_bytes(4096, 300));
    assert!(
        closed_by_peer(&mut s),
        "garbage on the engine's control port"
    );

    // Nothing changed: processes up, every replica RW, data intact, I/O works.
    assert!(c.engine.is_running());
    for r in &mut c.replicas {
        assert!(r.is_running(), "{} died of bad input", r.name);
    }
    assert_modes(&c.ctl_json(&["info"]), &[], "healthy");
    assert_qemu_io_ok(&qemu_io(
        &uri,
        &[
            "read -P 0x11 0 1M",
            "write -P 0x22 1M 1M",
            "read -P 0x22 1M 1M",
            "flush",
        ],
    ));
    let dir = c.dir().to_owned();
    Fio::region("after", 8 * MIB, 16 * MIB, 71).run_ok(&uri, &dir);
    assert_modes(&c.ctl_json(&["info"]), &[], "healthy");
    c.assert_replicas_identical(&[0, 1, 2]);
}

/// Regression: a rebuild whose source hangs mid-copy. The engine drops the hung source
/// (live writes time out) and must then give up the rebuild (target ERR) instead of waiting
/// for the hung replica forever while holding the rebuild lock (every snapshot and `add`
/// refused as busy). Added back later, both replicas rebuild from the one left.
#[test]
fn rebuild_gives_up_when_its_source_hangs() {
    let mut c = cluster();
    let dir = c.dir().to_owned();
    let uri = c.uri();
    // Data for the rebuild to copy: the whole volume.
    let mut fill = Fio::region("fill", 0, SIZE, 81);
    fill.rw = "write";
    fill.bs = "1m-1m";
    fill.iodepth = 8;
    fill.run_ok(&uri, &dir);

    let target = c.replicas[2].address();
    c.ctl_json(&["replica", "rm", &target]);
    // Live writes during the rebuild, so that a hung replica is noticed.
    let a = Fio::region("a", 0, 16 * MIB, 82).rate("4m");
    let fio = a.spawn(&uri, &dir);
    thread::sleep(Duration::from_millis(300));

    let added = c.ctl_json(&["replica", "add", &target]);
    let me = added
        .as_array()
        .and_then(|rs| rs.iter().find(|r| r["address"] == target.as_str()))
        .unwrap_or_else(|| panic!("added replica missing: {added}"));
    let source = me["message"]
        .as_str()
        .and_then(|m| m.strip_prefix("rebuilding from "))
        .unwrap_or_else(|| panic!("no source in {added}"))
        .to_owned();
    let s = c
        .replicas
        .iter()
        .position(|r| r.address() == source)
        .unwrap();
    c.replicas[s].stop();

    // The source is dropped after the replica timeout; the rebuild must end soon after.
    let deadline = Instant::now() + REPLICA_TIMEOUT * 3 + Duration::from_secs(5);
    let info = loop {
        let info = c.ctl_json(&["info"]);
        let done = info_replica(&info, &source)["mode"] == "ERR"
            && info_replica(&info, &target)["mode"] != "WO";
        if done {
            break info;
        }
        assert!(
            Instant::now() < deadline,
            "the rebuild still waits for its hung source: {info}"
        );
        thread::sleep(Duration::from_millis(100));
    };
    let t = info_replica(&info, &target);
    eprintln!("rebuild with a hung source ended: {t}");
    if t["mode"] == "ERR" {
        let msg = t["message"].as_str().unwrap();
        assert!(
            msg.contains("rebuild failed") && msg.contains(&source),
            "the target says why its rebuild failed: {info}"
        );
    }
    // The rebuild lock is free again.
    c.ctl_json(&["snapshot", "create", "after-hung-rebuild"]);
    fio.join().unwrap().assert_verified(&a);

    c.replicas[s].cont();
    if t["mode"] == "ERR" {
        add_and_rebuild(&c, &target);
    }
    add_and_rebuild(&c, &source);
    assert_modes(&c.ctl_json(&["info"]), &[], "healthy");
    a.verify_only().run_ok(&uri, &dir);
    c.assert_replicas_identical(&[0, 1, 2]);
}

/// Regression: one large NBD WRITE_ZEROES (or TRIM) over data held by a snapshot. Each
/// replica has to write zeros over all of it (older data must not show through), which
/// takes time in proportion to the length; sent as one replica request, it outlasted the
/// replica timeout on every replica at once and faulted the volume. The engine now cuts
/// such requests into bounded pieces.
#[test]
fn large_write_zeroes_over_a_snapshot_keeps_the_replicas() {
    const BIG: u64 = 128 * MIB;
    let mut c = Cluster::start_with(
        3,
        BIG,
        ClusterOptions {
            replica_timeout: Some(Duration::from_millis(500)),
            ..ClusterOptions::default()
        },
    );
    let dir = c.dir().to_owned();
    let uri = c.uri();
    let mut fill = Fio::region("fill", 0, BIG, 91);
    fill.rw = "write";
    fill.bs = "1m-1m";
    fill.iodepth = 4;
    fill.run_ok(&uri, &dir);
    c.ctl_json(&["snapshot", "create", "below"]);

    const NBD_CMD_WRITE_ZEROES: u16 = 6;
    const NBD_CMD_TRIM: u16 = 4;
    let mut n = RawNbd::open(c.engine.nbd_port, "vol").unwrap();
    let started = Instant::now();
    n.request(NBD_CMD_WRITE_ZEROES, 0, 1, 0, (BIG - 32 * MIB) as u32)
        .unwrap();
    assert_eq!(n.checked_reply(1).unwrap(), 0, "write zeroes failed");
    n.request(NBD_CMD_TRIM, 0, 2, BIG - 32 * MIB, (32 * MIB) as u32)
        .unwrap();
    assert_eq!(n.checked_reply(2).unwrap(), 0, "trim failed");
    eprintln!(
        "zeroed {BIG} bytes over a snapshot in {:?}",
        started.elapsed()
    );
    assert_modes(&c.ctl_json(&["info"]), &[], "healthy");
    for at in [0, BIG / 2, BIG - 4096] {
        assert_eq!(
            n.read(3, at, 4096).unwrap().unwrap(),
            vec![0; 4096],
            "zeroed block at {at} reads back"
        );
    }
    drop(n);
    c.assert_replicas_identical(&[0, 1, 2]);
}

/// One data-protocol request to a replica over `s` (little-endian header, crc32 payload);
/// returns the answer's status, or `None` if the replica closed the connection instead.
fn replica_request(s: &mut TcpStream, op: u8, id: u64, offset: u64, payload: &[u8]) -> Option<u32> {
    let mut h = Vec::with_capacity(32 + payload.len());
    h.extend_from_slice(&0x4952_4851u32.to_le_bytes());
    h.extend_from_slice(&[op, 0, 0, 0]);
    h.extend_from_slice(&id.to_le_bytes());
    h.extend_from_slice(&offset.to_le_bytes());
    h.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    let crc = if payload.is_empty() {
        0
    } else {
        crc32fast::hash(payload)
    };
    h.extend_from_slice(&crc.to_le_bytes());
    h.extend_from_slice(payload);
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&h).ok()?;
    let mut r = [0u8; 24];
    s.read_exact(&mut r).ok()?;
    assert_eq!(u64::from_le_bytes(r[8..16].try_into().unwrap()), id);
    Some(u32::from_le_bytes(r[4..8].try_into().unwrap()))
}

/// Regression: requests still queued on a replica's data connection from before it was
/// rebuilt (a hung replica resuming, an old engine) must not reach it after the rebuild:
/// a write landing in the new head would shadow the newer data the rebuild copied into the
/// snapshot below, and the rebuild's verification (snapshots only) would not notice.
#[test]
fn writes_from_before_a_rebuild_do_not_reach_the_rebuilt_replica() {
    let mut c = cluster();
    let uri = c.uri();
    assert_qemu_io_ok(&qemu_io(&uri, &["write -P 0x11 0 1M"]));
    let target = c.replicas[2].address();
    c.ctl_json(&["replica", "rm", &target]);

    // A connection of the old session, alive and answered.
    const OP_WRITE: u8 = 2;
    const OP_PING: u8 = 6;
    let mut old = TcpStream::connect(c.replicas[2].data).unwrap();
    assert_eq!(replica_request(&mut old, OP_PING, 1, 0, &[]), Some(0));

    assert_qemu_io_ok(&qemu_io(&uri, &["write -P 0x22 0 1M"]));
    add_and_rebuild(&c, &target);
    assert_modes(&c.ctl_json(&["info"]), &[], "healthy");

    // The old session writes what it still had queued: the old data.
    let answer = replica_request(&mut old, OP_WRITE, 2, 0, &[0x11; 4096]);
    assert!(
        answer.is_none_or(|status| status != 0),
        "a write from before the rebuild was accepted by the rebuilt replica"
    );
    for _ in 0..3 {
        assert_qemu_io_ok(&qemu_io(&uri, &["read -P 0x22 0 1M"]));
    }
    c.assert_replicas_identical(&[0, 1, 2]);
}

/// Fills the whole volume (sequential 1 MiB writes, verified), so that a rebuild has
/// 64 MiB to copy and lasts long enough to be interrupted.
fn fill_volume(c: &Cluster, seed: u64) {
    let mut fill = Fio::region("fill", 0, SIZE, seed);
    fill.rw = "write";
    fill.bs = "1m-1m";
    fill.iodepth = 8;
    fill.run_ok(&c.uri(), c.dir());
}

/// Takes replica `i` out of the volume, writes `region` while it is out, and adds it back;
/// returns as soon as `replica add` answered (the rebuild runs).
fn start_rebuild(c: &Cluster, i: usize, region: &Fio) {
    let target = c.replicas[i].address();
    c.ctl_json(&["replica", "rm", &target]);
    region.run_ok(&c.uri(), c.dir());
    let added = c.ctl_json(&["replica", "add", &target]);
    assert!(
        added
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["address"] == target.as_str() && r["mode"] == "WO"),
        "{target} joins WO: {added}"
    );
}

/// The engine SIGKILLed while it rebuilds a replica: the restarted engine does not trust
/// the half-rebuilt replica (ERR), serves from the others, and rebuilds it when it is
/// added again.
#[test]
fn engine_killed_mid_rebuild_distrusts_the_half_rebuilt_replica() {
    let mut c = cluster();
    let dir = c.dir().to_owned();
    fill_volume(&c, 101);
    let a = Fio::region("a", 0, 16 * MIB, 102);
    start_rebuild(&c, 1, &a);
    c.engine.kill9();
    c.engine.restart();

    let target = c.replicas[1].address();
    let info = c.ctl_json(&["info"]);
    let t = info_replica(&info, &target);
    eprintln!("after an engine kill mid-rebuild: {t}");
    if t["mode"] == "RW" {
        // The rebuild won the race against the kill; nothing to distrust.
        assert_modes(&info, &[], "healthy");
    } else {
        assert_modes(&info, &[&target], "degraded");
        let msg = t["message"].as_str().unwrap();
        assert!(
            msg.contains("rebuilt") || msg.contains("stale"),
            "the engine says why it does not trust {target}: {info}"
        );
        a.verify_only().run_ok(&c.uri(), &dir);
        add_and_rebuild(&c, &target);
        assert_modes(&c.ctl_json(&["info"]), &[], "healthy");
    }
    a.verify_only().run_ok(&c.uri(), &dir);
    c.assert_replicas_identical(&[0, 1, 2]);
}

/// The replica being rebuilt SIGKILLed mid-rebuild: the rebuild fails (ERR), the volume goes
/// on; restarted on its half-rebuilt directory and added again, it is rebuilt and equal.
#[test]
fn replica_killed_mid_rebuild_is_rebuilt_again() {
    let mut c = cluster();
    let dir = c.dir().to_owned();
    fill_volume(&c, 111);
    let a = Fio::region("a", 0, 16 * MIB, 112);
    start_rebuild(&c, 2, &a);
    let target = c.replicas[2].address();
    c.replicas[2].kill9();
    // Writes notice the dead WO replica (if the rebuild had not failed on its own already).
    let b = Fio::region("b", 32 * MIB, 8 * MIB, 113);
    b.run_ok(&c.uri(), &dir);
    c.engine.wait_mode(&target, "ERR", MODE_WAIT);
    assert_modes(&c.ctl_json(&["info"]), &[&target], "degraded");

    c.replicas[2].restart();
    add_and_rebuild(&c, &target);
    assert_modes(&c.ctl_json(&["info"]), &[], "healthy");
    a.verify_only().run_ok(&c.uri(), &dir);
    b.verify_only().run_ok(&c.uri(), &dir);
    c.assert_replicas_identical(&[0, 1, 2]);
}

/// Known gap (invariant 4), kept as an ignored repro: a replica dropped earlier is trusted by
/// a restarted engine when the replicas holding the newer epoch are unreachable at that
/// moment. The engine trusts the highest epoch among the replicas it can reach, and a
/// replica's metadata records only its epoch, not the membership that went with it, so the
/// engine cannot tell that newer replicas exist: it serves the stale replica and writes
/// acknowledged after the drop are lost. Fixing it needs the membership recorded with each
/// epoch (SetEpoch carrying the members, Info returning them) and a restart rule such as
/// "every member recorded at the highest reachable epoch must be reachable", plus an
/// explicit override for salvage.
#[test]
#[ignore = "known gap: stale replica trusted when the up-to-date ones are unreachable"]
fn restarted_engine_does_not_trust_a_stale_replica_alone() {
    let mut c = cluster();
    let uri = c.uri();
    assert_qemu_io_ok(&qemu_io(&uri, &["write -P 0x11 0 1M"]));
    c.replicas[0].kill9();
    // Acknowledged by replicas 1 and 2 only; replica 0 is dropped and fenced out.
    assert_qemu_io_ok(&qemu_io(&uri, &["write -P 0x22 0 1M", "flush"]));
    let victim = c.replicas[0].address();
    assert_modes(&c.ctl_json(&["info"]), &[&victim], "degraded");

    // Everything stops; only the stale replica comes back before the engine does.
    c.engine.kill9();
    c.replicas[1].kill9();
    c.replicas[2].kill9();
    c.replicas[0].restart();
    match c.engine.try_restart() {
        Err(e) => eprintln!("the engine refused to start on the stale replica alone: {e}"),
        Ok(()) => {
            let out = qemu_io(&uri, &["read -P 0x22 0 1M"]);
            assert!(
                out.success() && !out.all_output().contains("Pattern verification failed")
                    || !out.success() && out.all_output().contains("Input/output error"),
                "a restarted engine served the stale replica: acknowledged writes lost: {out}"
            );
        }
    }
}

/// A replica that does not answer the epoch raise of a membership change (hung) is dropped,
/// and the epoch is then raised once more on the replicas left: had the hung replica taken
/// the first raise late, it still ends up behind, and a restarted engine distrusts it.
#[test]
fn fencing_failure_raises_the_epoch_again() {
    let mut c = cluster();
    let uri = c.uri();
    assert_qemu_io_ok(&qemu_io(&uri, &["write -P 0x11 0 1M"]));
    let before = c.ctl_json(&["info"])["epoch"].as_u64().unwrap();
    let (gone, hung, kept) = (
        c.replicas[0].address(),
        c.replicas[1].address(),
        c.replicas[2].address(),
    );
    c.replicas[1].stop();
    // Removing a RW replica records the new membership on the others; one of them hangs.
    c.ctl_json(&["replica", "rm", &gone]);
    c.replicas[1].cont();
    let info = c.ctl_json(&["info"]);
    let h = info_replica(&info, &hung);
    assert_eq!(h["mode"], "ERR", "{info}");
    assert!(
        h["message"].as_str().unwrap().contains("fencing failed"),
        "{info}"
    );
    let epoch = info["epoch"].as_u64().unwrap();
    assert_eq!(
        epoch,
        before + 2,
        "one raise for the removal, one after the failure: {info}"
    );
    assert_eq!(
        info_replica(&info, &kept)["epoch"].as_u64(),
        Some(epoch),
        "{info}"
    );

    assert_qemu_io_ok(&qemu_io(&uri, &["write -P 0x22 0 1M", "flush"]));
    c.engine.terminate();
    c.engine.restart();
    let info = c.ctl_json(&["info"]);
    assert_eq!(info_replica(&info, &hung)["mode"], "ERR", "{info}");
    assert_qemu_io_ok(&qemu_io(&uri, &["read -P 0x22 0 1M"]));
}
