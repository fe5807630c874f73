//! Test cluster builder shared by the integration tests (`mod common;` in a test file).
//!
//! It runs the real `ironhorn` binary (`CARGO_BIN_EXE_ironhorn`) as separate processes on
//! 127.0.0.1, each cluster in its own temporary directory, and hands out typed handles:
//!
//! - [`Cluster::start`]`(n, size)`: `n` replicas ([`Replica`]) and one engine ([`Engine`])
//!   serving volume [`VOLUME`] over NBD on TCP and on a unix socket.
//! - [`Replica`]: directory, control and data addresses, pid; `kill9`, `stop`/`cont`
//!   (SIGSTOP/SIGCONT), `terminate` (SIGTERM), `restart` (same directory, same addresses).
//! - [`Engine`]: NBD URIs ([`Engine::uri`], [`Engine::unix_uri`]), control address,
//!   `ctl`/`ctl_json` (runs `ironhorn engine ctl`), `kill9`, `stop`/`cont`, `terminate`,
//!   `restart` (same NBD port, socket and control address).
//! - [`wait_for`] / [`wait_until`]: poll a condition with a deadline;
//!   [`Engine::wait_all_rw`]: wait until every replica is RW.
//! - [`run_with_timeout`]: run any external command (qemu-io, nbdcopy, fio, mount, ...)
//!   with a deadline; it is killed (with its process group) when the deadline passes.
//! - [`Cluster::assert_replicas_identical`]: stop the engine, read every replica back through
//!   a single-replica engine, and compare the images byte for byte.
//!
//! Ports: every process is started with port 0 and the test reads the bound addresses from
//! its start-up log line ("replica serving" / "engine serving"), so tests running in
//! parallel never race for ports. A restart re-binds the same ports (the engine knows its
//! replicas by control address; clients keep their URI), retrying while the port is busy.
//!
//! Cleanup: dropping a handle sends SIGCONT (in case it was stopped) and SIGKILL to its
//! process and waits for it, with a bound; dropping the [`Cluster`] kills the engine first,
//! then the replicas, then removes the temporary directory. Every wait has a timeout, so a
//! stuck process fails a test instead of hanging the run.
//!
//! Each process's log (stderr; `RUST_LOG` as set, default `info`) is forwarded, prefixed with its
//! name, to the test's output (shown when a test fails) and kept for [`Process::logs`].

#![allow(dead_code)]

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use tempfile::TempDir;

/// Name of the volume (and NBD export) a [`Cluster`] serves unless told otherwise.
pub const VOLUME: &str = "vol";
/// How long a process gets to log that it is serving.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a process gets to exit after SIGTERM before it is killed.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a killed process gets to be reaped.
const REAP_TIMEOUT: Duration = Duration::from_secs(10);
/// Seconds an `engine ctl` command may run.
pub const CTL_TIMEOUT_SECS: u64 = 60;
/// Seconds an `nbdcopy` of a whole test volume may run.
pub const COPY_TIMEOUT_SECS: u64 = 120;
/// Log lines kept per process for [`Process::logs`].
const LOG_LINES_KEPT: usize = 20_000;
/// Poll interval of [`wait_for`].
const POLL: Duration = Duration::from_millis(50);

/// Path of the `ironhorn` binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_ironhorn")
}

// ---------------------------------------------------------------------------------------
// External commands

/// What a command run by [`run_with_timeout`] produced.
#[derive(Debug, Clone)]
pub struct CmdOutput {
    /// The command line, for messages.
    pub command: String,
    /// Exit status; `None` when it was killed because the deadline passed.
    pub status: Option<ExitStatus>,
    /// Standard output (lossy UTF-8).
    pub stdout: String,
    /// Standard error (lossy UTF-8).
    pub stderr: String,
    /// Whether the deadline passed and the command was killed.
    pub timed_out: bool,
    /// How long it ran.
    pub elapsed: Duration,
}

impl CmdOutput {
    /// Exited on its own with status 0.
    pub fn success(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }

    /// Exit code, if it exited normally.
    pub fn code(&self) -> Option<i32> {
        self.status.and_then(|s| s.code())
    }

    /// Panics with the command, status and both outputs unless it succeeded.
    #[track_caller]
    pub fn assert_success(&self) -> &Self {
        assert!(self.success(), "command failed: {self}");
        self
    }

    /// Panics unless it ran to completion and failed (nonzero exit status).
    #[track_caller]
    pub fn assert_failure(&self) -> &Self {
        assert!(
            !self.timed_out && self.status.is_some_and(|s| !s.success()),
            "command should have failed: {self}"
        );
        self
    }

    /// stdout and stderr together.
    pub fn all_output(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

impl std::fmt::Display for CmdOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let status = match (self.timed_out, self.status) {
            (true, _) => "killed after its timeout".to_owned(),
            (false, Some(s)) => s.to_string(),
            (false, None) => "unknown".to_owned(),
        };
        write!(
            f,
            "`{}` ({status}, {:.1?})\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.command, self.elapsed, self.stdout, self.stderr
        )
    }
}

/// A [`Command`] for `program` with `args`.
pub fn cmd<S: AsRef<std::ffi::OsStr>>(program: &str, args: &[S]) -> Command {
    let mut c = Command::new(program);
    c.args(args);
    c
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd` (stdin from /dev/null, stdout and stderr captured) for at most `secs`
/// seconds. On expiry the command and everything in its process group get SIGKILL and the
/// result says `timed_out`. Panics only if the command cannot be started.
pub fn run_with_timeout(cmd: &mut Command, secs: u64) -> CmdOutput {
    let command = describe(cmd);
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so that a timeout kills whatever it forked too.
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start `{command}`: {e}"));
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());
    let deadline = start + Duration::from_secs(secs);
    let mut timed_out = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) => {}
            Err(e) => panic!("wait for `{command}`: {e}"),
        }
        if Instant::now() >= deadline {
            timed_out = true;
            let pgid = Pid::from_raw(child.id() as i32);
            let _ = signal::killpg(pgid, Signal::SIGKILL);
            let _ = child.kill();
            break wait_bounded(&mut child, REAP_TIMEOUT);
        }
        thread::sleep(Duration::from_millis(10));
    };
    // A grandchild that left the group may hold the pipes open: do not wait forever.
    let stdout = out.recv_timeout(Duration::from_secs(5)).unwrap_or_default();
    let stderr = err.recv_timeout(Duration::from_secs(5)).unwrap_or_default();
    CmdOutput {
        command,
        status: if timed_out { None } else { status },
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
        timed_out,
        elapsed: start.elapsed(),
    }
}

/// [`run_with_timeout`], panicking with the whole output unless the command succeeded.
#[track_caller]
pub fn run_ok(cmd: &mut Command, secs: u64) -> CmdOutput {
    let out = run_with_timeout(cmd, secs);
    out.assert_success();
    out
}

/// [`run_with_timeout`] on a thread, for I/O that must run while the test injects faults;
/// `join()` the handle for the output.
pub fn run_in_background(mut cmd: Command, secs: u64) -> thread::JoinHandle<CmdOutput> {
    thread::spawn(move || run_with_timeout(&mut cmd, secs))
}

/// Reads a pipe to its end on a thread; the bytes arrive on the returned channel.
fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_end(&mut buf);
        }
        let _ = tx.send(buf);
    });
    rx
}

/// Polls `child` until it exits or `timeout` passes (`None`).
fn wait_bounded(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return Some(s),
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
            _ => return None,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Waiting

/// Calls `f` every 50 ms until it returns `Some`, and returns that; panics with `what` (and
/// the last value seen by `f`, if it reported one through `Err`) once `timeout` has passed.
#[track_caller]
pub fn wait_for<T, E: std::fmt::Debug>(
    timeout: Duration,
    what: &str,
    mut f: impl FnMut() -> Result<T, E>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(v) => return v,
            Err(last) if Instant::now() >= deadline => {
                panic!("timed out after {timeout:?} waiting for {what}; last: {last:?}")
            }
            Err(_) => thread::sleep(POLL),
        }
    }
}

/// Calls `pred` every 50 ms until it is true; panics with `what` after `timeout`.
#[track_caller]
pub fn wait_until(timeout: Duration, what: &str, mut pred: impl FnMut() -> bool) {
    wait_for(timeout, what, || if pred() { Ok(()) } else { Err(()) })
}

// ---------------------------------------------------------------------------------------
// Data helpers

/// `len` pseudo-random bytes from `seed` (xorshift64*; fast, reproducible).
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Index of the first byte where `a` and `b` differ (a length difference counts at the end
/// of the shorter one), or `None` when they are equal. Compares 64 KiB slices at a time
/// (memcmp), so it is fast in debug builds too.
pub fn first_difference_in(a: &[u8], b: &[u8]) -> Option<usize> {
    const CHUNK: usize = 64 << 10;
    let n = a.len().min(b.len());
    let mut at = 0;
    while at < n {
        let end = (at + CHUNK).min(n);
        if a[at..end] != b[at..end] {
            let i = a[at..end].iter().zip(&b[at..end]).position(|(x, y)| x != y);
            return i.map(|i| at + i);
        }
        at = end;
    }
    (a.len() != b.len()).then_some(n)
}

/// Offset of the first byte where the files differ (a length difference counts at the end
/// of the shorter one), or `None` when they are equal. Panics if one cannot be read.
pub fn first_difference(a: &Path, b: &Path) -> Option<u64> {
    let open = |p: &Path| {
        BufReader::with_capacity(
            1 << 20,
            File::open(p).unwrap_or_else(|e| panic!("open {}: {e}", p.display())),
        )
    };
    let (mut fa, mut fb) = (open(a), open(b));
    let mut offset = 0u64;
    loop {
        let (ba, bb) = (
            fa.fill_buf().expect("read a"),
            fb.fill_buf().expect("read b"),
        );
        if ba.is_empty() || bb.is_empty() {
            return if ba.is_empty() && bb.is_empty() {
                None
            } else {
                Some(offset)
            };
        }
        let n = ba.len().min(bb.len());
        if let Some(i) = first_difference_in(&ba[..n], &bb[..n]) {
            return Some(offset + i as u64);
        }
        fa.consume(n);
        fb.consume(n);
        offset += n as u64;
    }
}

/// Copies the whole export at NBD `uri` into the file `dst` with `nbdcopy`.
#[track_caller]
pub fn nbd_export_to_file(uri: &str, dst: &Path) {
    run_ok(
        Command::new("nbdcopy").arg("--").arg(uri).arg(dst),
        COPY_TIMEOUT_SECS,
    );
}

// ---------------------------------------------------------------------------------------
// Processes

/// Why a process did not come up.
#[derive(Debug)]
pub struct StartError {
    /// What happened, with the process's log.
    pub message: String,
    /// It exited because an address it was told to bind was in use (worth a retry).
    pub addr_in_use: bool,
}

/// A running child process of the test (a replica or an engine). Dropping it kills it.
pub struct Process {
    name: String,
    child: Child,
    stopped: bool,
    exit: Option<ExitStatus>,
    logs: Arc<Mutex<VecDeque<String>>>,
}

impl Process {
    /// Starts `cmd` and waits (up to [`START_TIMEOUT`]) until a line of its stderr makes
    /// `ready` return `Some`. Its stderr keeps being forwarded to the test output.
    pub fn spawn<T>(
        name: &str,
        cmd: &mut Command,
        mut ready: impl FnMut(&str) -> Option<T>,
    ) -> Result<(Process, T), StartError> {
        // The start-up lines are logged at info; keep them whatever RUST_LOG says.
        let base = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned());
        cmd.env(
            "RUST_LOG",
            format!("{base},ironhorn::cli::engine=info,ironhorn_replica::server=info"),
        );
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| StartError {
                message: format!("cannot start {name} ({}): {e}", describe(cmd)),
                addr_in_use: false,
            })?;
        let stderr = child.stderr.take().expect("stderr is piped");
        let logs = Arc::new(Mutex::new(VecDeque::new()));
        let (tx, rx) = mpsc::channel::<String>();
        {
            let logs = logs.clone();
            let name = name.to_owned();
            thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    eprintln!("[{name}] {line}");
                    let _ = tx.send(line.clone());
                    let mut l = logs.lock().unwrap_or_else(|p| p.into_inner());
                    if l.len() >= LOG_LINES_KEPT {
                        l.pop_front();
                    }
                    l.push_back(line);
                }
            });
        }
        let mut process = Process {
            name: name.to_owned(),
            child,
            stopped: false,
            exit: None,
            logs,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => {
                    if let Some(v) = ready(&line) {
                        return Ok((process, v));
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if Instant::now() >= deadline {
                        process.kill9();
                        return Err(StartError {
                            message: format!(
                                "{name} did not start within {START_TIMEOUT:?}; log:\n{}",
                                process.logs().join("\n")
                            ),
                            addr_in_use: false,
                        });
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    // stderr closed: it exited.
                    let status = wait_bounded(&mut process.child, REAP_TIMEOUT);
                    process.exit = status;
                    let log = process.logs().join("\n");
                    return Err(StartError {
                        addr_in_use: log.contains("Address already in use")
                            || log.contains("os error 98"),
                        message: format!("{name} exited before serving ({status:?}); log:\n{log}"),
                    });
                }
            }
        }
    }

    /// Name used in its log prefix.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn nix_pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    /// Whether it has not exited yet (a stopped process is running).
    pub fn is_running(&mut self) -> bool {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().ok().flatten();
        }
        self.exit.is_none()
    }

    /// Its exit status once it has exited.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.is_running();
        self.exit
    }

    /// Sends `sig` if it is still running.
    pub fn signal(&mut self, sig: Signal) {
        if self.is_running() {
            let _ = signal::kill(self.nix_pid(), sig);
        }
    }

    /// SIGSTOP: freezes it (sockets stay open, nothing is answered).
    pub fn stop(&mut self) {
        self.signal(Signal::SIGSTOP);
        self.stopped = true;
    }

    /// SIGCONT after [`Process::stop`].
    pub fn cont(&mut self) {
        self.signal(Signal::SIGCONT);
        self.stopped = false;
    }

    /// SIGKILL, then waits for it (bounded). Returns its exit status.
    pub fn kill9(&mut self) -> Option<ExitStatus> {
        if self.is_running() {
            let _ = signal::kill(self.nix_pid(), Signal::SIGKILL);
            // SIGKILL works on a stopped process too; SIGCONT only keeps ps tidy.
            let _ = signal::kill(self.nix_pid(), Signal::SIGCONT);
            self.exit = wait_bounded(&mut self.child, REAP_TIMEOUT);
        }
        self.stopped = false;
        self.exit
    }

    /// SIGTERM (after SIGCONT if stopped), waits up to [`STOP_TIMEOUT`] for a clean exit,
    /// then SIGKILL. Returns the exit status; `None` means it had to be killed.
    pub fn terminate(&mut self) -> Option<ExitStatus> {
        if !self.is_running() {
            return self.exit;
        }
        if self.stopped {
            self.cont();
        }
        let _ = signal::kill(self.nix_pid(), Signal::SIGTERM);
        if let Some(s) = wait_bounded(&mut self.child, STOP_TIMEOUT) {
            self.exit = Some(s);
            return Some(s);
        }
        eprintln!(
            "[{}] did not exit within {STOP_TIMEOUT:?} of SIGTERM; killing",
            self.name
        );
        self.kill9();
        None
    }

    /// Waits up to `timeout` for it to exit on its own.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.is_running() {
            self.exit = wait_bounded(&mut self.child, timeout);
        }
        self.exit
    }

    /// The log lines kept so far (the last [`LOG_LINES_KEPT`]).
    pub fn logs(&self) -> Vec<String> {
        self.logs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    /// Whether some kept log line contains `needle`.
    pub fn log_contains(&self, needle: &str) -> bool {
        self.logs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|l| l.contains(needle))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.stopped {
            self.cont();
        }
        self.kill9();
    }
}

/// The value of `key=` in a tracing log line (`key=value` up to the next space).
fn log_field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let pat = format!("{key}=");
    line.split_whitespace()
        .find_map(|t| t.strip_prefix(pat.as_str()))
}

/// Runs `start` until it succeeds, retrying (until [`START_TIMEOUT`]) while it fails only
/// because a fixed address is still in use.
fn start_retrying<T>(mut start: impl FnMut() -> Result<T, StartError>) -> Result<T, StartError> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        match start() {
            Err(e) if e.addr_in_use && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(200));
            }
            r => return r,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Replica

/// One `ironhorn replica serve` process and its directory.
pub struct Replica {
    /// Name in logs (`replica0`, ...).
    pub name: String,
    /// Replica directory.
    pub dir: PathBuf,
    /// Control (gRPC) address; the engine names the replica by it.
    pub control: SocketAddr,
    /// Data-protocol address.
    pub data: SocketAddr,
    /// Size given at creation (ignored by the binary once the directory holds a replica).
    pub size: u64,
    process: Option<Process>,
}

impl Replica {
    /// Starts a replica in `dir` (created with `size` if empty) on free ports.
    #[track_caller]
    pub fn start(name: &str, dir: &Path, size: u64) -> Replica {
        std::fs::create_dir_all(dir).expect("create replica dir");
        let unbound: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        let (process, (control, data)) = Self::spawn(name, dir, size, unbound, unbound)
            .unwrap_or_else(|e| panic!("{}", e.message));
        Replica {
            name: name.to_owned(),
            dir: dir.to_owned(),
            control,
            data,
            size,
            process: Some(process),
        }
    }

    fn spawn(
        name: &str,
        dir: &Path,
        size: u64,
        control: SocketAddr,
        data: SocketAddr,
    ) -> Result<(Process, (SocketAddr, SocketAddr)), StartError> {
        let mut cmd = Command::new(bin());
        cmd.args(["replica", "serve", "--dir"])
            .arg(dir)
            .args(["--size", &size.to_string()])
            .args(["--listen", &control.to_string()])
            .args(["--data-listen", &data.to_string()])
            .env_remove("IRONHORN_REPLICA_MAX_DATA_CONNECTIONS");
        Process::spawn(name, &mut cmd, |line| {
            if !line.contains("replica serving") {
                return None;
            }
            let c = log_field(line, "control")?.parse().ok()?;
            let d = log_field(line, "data")?.parse().ok()?;
            Some((c, d))
        })
    }

    /// The control address as `HOST:PORT`, as given to the engine.
    pub fn address(&self) -> String {
        self.control.to_string()
    }

    /// Process id, while a process exists.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(Process::pid)
    }

    /// The process, while one exists (also after it exited, until restarted).
    pub fn process(&mut self) -> Option<&mut Process> {
        self.process.as_mut()
    }

    /// Whether the process is alive (stopped counts as alive).
    pub fn is_running(&mut self) -> bool {
        self.process.as_mut().is_some_and(Process::is_running)
    }

    /// SIGKILL and wait.
    pub fn kill9(&mut self) {
        if let Some(p) = self.process.as_mut() {
            p.kill9();
        }
    }

    /// SIGSTOP.
    pub fn stop(&mut self) {
        if let Some(p) = self.process.as_mut() {
            p.stop();
        }
    }

    /// SIGCONT.
    pub fn cont(&mut self) {
        if let Some(p) = self.process.as_mut() {
            p.cont();
        }
    }

    /// SIGTERM (clean shutdown, flushes), wait; SIGKILL if it takes too long.
    pub fn terminate(&mut self) -> Option<ExitStatus> {
        self.process.as_mut().and_then(Process::terminate)
    }

    /// Starts the replica again on the same directory and the same control and data
    /// addresses (killing the old process first if it still runs), retrying while the ports
    /// are still busy. Panics if it does not come up.
    #[track_caller]
    pub fn restart(&mut self) {
        self.try_restart().unwrap_or_else(|e| panic!("{e}"));
    }

    /// [`Replica::restart`] returning the failure (e.g. the directory no longer opens).
    pub fn try_restart(&mut self) -> Result<(), String> {
        if let Some(mut p) = self.process.take() {
            p.kill9();
        }
        let (process, (c, d)) = start_retrying(|| {
            Self::spawn(&self.name, &self.dir, self.size, self.control, self.data)
        })
        .map_err(|e| e.message)?;
        assert_eq!((c, d), (self.control, self.data), "restart moved addresses");
        self.process = Some(process);
        Ok(())
    }

    /// The kept log lines of the current process.
    pub fn logs(&self) -> Vec<String> {
        self.process.as_ref().map(Process::logs).unwrap_or_default()
    }
}

// ---------------------------------------------------------------------------------------
// Engine

/// How to start an engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Name in logs.
    pub name: String,
    /// Volume (export) name.
    pub volume: String,
    /// Volume size in bytes.
    pub size: u64,
    /// Control addresses of the replicas.
    pub replicas: Vec<String>,
    /// `--replica-timeout` (None: the binary's default).
    pub replica_timeout: Option<Duration>,
    /// Unix socket of the NBD frontend (None: TCP only).
    pub socket: Option<PathBuf>,
    /// More arguments for `engine serve`.
    pub extra_args: Vec<String>,
}

impl EngineConfig {
    /// An engine for `volume` of `size` on `replicas`, TCP only, default timeouts.
    pub fn new(volume: &str, size: u64, replicas: Vec<String>) -> EngineConfig {
        EngineConfig {
            name: "engine".to_owned(),
            volume: volume.to_owned(),
            size,
            replicas,
            replica_timeout: None,
            socket: None,
            extra_args: Vec::new(),
        }
    }
}

/// One `ironhorn engine serve` process.
pub struct Engine {
    /// How it was started (the size follows `expand`s seen through [`Engine::ctl_json`]).
    pub config: EngineConfig,
    /// Control (gRPC) address.
    pub control: SocketAddr,
    /// TCP port of the NBD frontend on 127.0.0.1.
    pub nbd_port: u16,
    size: AtomicU64,
    process: Option<Process>,
}

impl Engine {
    /// Starts an engine on free ports; panics if it does not serve.
    #[track_caller]
    pub fn start(config: EngineConfig) -> Engine {
        Self::try_start(config).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts an engine on free ports; the error carries its log (e.g. no healthy replica).
    pub fn try_start(config: EngineConfig) -> Result<Engine, String> {
        let (process, (control, nbd_port)) =
            Self::spawn(&config, config.size, 0, 0).map_err(|e| e.message)?;
        Ok(Engine {
            size: AtomicU64::new(config.size),
            config,
            control,
            nbd_port,
            process: Some(process),
        })
    }

    fn spawn(
        config: &EngineConfig,
        size: u64,
        control_port: u16,
        nbd_port: u16,
    ) -> Result<(Process, (SocketAddr, u16)), StartError> {
        let mut cmd = Command::new(bin());
        cmd.args(["engine", "serve", "--volume", &config.volume])
            .args(["--size", &size.to_string()])
            .args(["--listen", &format!("127.0.0.1:{control_port}")])
            .args(["--nbd", &format!("tcp://127.0.0.1:{nbd_port}")]);
        if let Some(s) = &config.socket {
            cmd.arg("--nbd").arg(format!("unix://{}", s.display()));
        }
        for r in &config.replicas {
            cmd.args(["--replica", r]);
        }
        if let Some(t) = config.replica_timeout {
            cmd.args(["--replica-timeout", &format!("{}ms", t.as_millis())]);
        }
        cmd.args(&config.extra_args)
            .env_remove("IRONHORN_REPLICA_TIMEOUT")
            .env_remove("IRONHORN_CONNS_PER_REPLICA");
        let prefix = "nbd://127.0.0.1:";
        Process::spawn(&config.name, &mut cmd, |line| {
            if !line.contains("engine serving") {
                return None;
            }
            let control: SocketAddr = log_field(line, "control")?.parse().ok()?;
            let at = line.find(prefix)? + prefix.len();
            let digits: String = line[at..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            Some((control, digits.parse().ok()?))
        })
    }

    /// `nbd://127.0.0.1:PORT/VOLUME`.
    pub fn uri(&self) -> String {
        format!("nbd://127.0.0.1:{}/{}", self.nbd_port, self.config.volume)
    }

    /// `nbd+unix:///VOLUME?socket=PATH`; panics if the engine has no unix socket.
    pub fn unix_uri(&self) -> String {
        format!(
            "nbd+unix:///{}?socket={}",
            self.config.volume,
            self.socket().display()
        )
    }

    /// Path of the NBD unix socket; panics if the engine has none.
    pub fn socket(&self) -> &Path {
        self.config
            .socket
            .as_deref()
            .expect("engine started without a unix socket")
    }

    /// Control address as `HOST:PORT`.
    pub fn address(&self) -> String {
        self.control.to_string()
    }

    /// Volume size as last known (start size, or the last size `ctl_json` reported).
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }

    /// Process id, while a process exists.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(Process::pid)
    }

    /// The process, while one exists.
    pub fn process(&mut self) -> Option<&mut Process> {
        self.process.as_mut()
    }

    /// Whether the process is alive.
    pub fn is_running(&mut self) -> bool {
        self.process.as_mut().is_some_and(Process::is_running)
    }

    /// Runs `ironhorn engine ctl --engine ADDR ARGS...` (text output), with a timeout.
    pub fn ctl(&self, args: &[&str]) -> CmdOutput {
        run_with_timeout(
            Command::new(bin())
                .args(["engine", "ctl", "--engine", &self.address()])
                .args(args)
                .env_remove("IRONHORN_ENGINE"),
            CTL_TIMEOUT_SECS,
        )
    }

    /// Runs `engine ctl --json ARGS...` and parses its output; the error is the command's
    /// whole output (its stderr says why).
    pub fn try_ctl_json(&self, args: &[&str]) -> Result<Value, CmdOutput> {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.ctl(&all);
        if !out.success() {
            return Err(out);
        }
        let v: Value = serde_json::from_str(out.stdout.trim())
            .unwrap_or_else(|e| panic!("ctl printed no JSON ({e}): {out}"));
        if let (Some(_), Some(size)) = (v.get("volume"), v.get("size").and_then(Value::as_u64)) {
            self.size.store(size, Ordering::Relaxed);
        }
        Ok(v)
    }

    /// Runs `engine ctl --json ARGS...`; panics with the output unless it succeeds.
    #[track_caller]
    pub fn ctl_json(&self, args: &[&str]) -> Value {
        self.try_ctl_json(args)
            .unwrap_or_else(|out| panic!("engine ctl failed: {out}"))
    }

    /// `engine ctl --json info`.
    #[track_caller]
    pub fn info(&self) -> Value {
        self.ctl_json(&["info"])
    }

    /// `(address, mode)` of every replica, from `info`.
    #[track_caller]
    pub fn replica_modes(&self) -> Vec<(String, String)> {
        modes(&self.info())
    }

    /// Waits until every replica the engine lists is RW (and robustness is "healthy").
    #[track_caller]
    pub fn wait_all_rw(&self, timeout: Duration) {
        wait_for(timeout, "every replica RW", || {
            let info = self.try_ctl_json(&["info"]).map_err(|o| o.stderr)?;
            let m = modes(&info);
            if !m.is_empty() && m.iter().all(|(_, mode)| mode == "RW") {
                Ok(())
            } else {
                Err(format!("{m:?}"))
            }
        })
    }

    /// Waits until replica `address` has mode `mode` ("RW", "WO", "ERR").
    #[track_caller]
    pub fn wait_mode(&self, address: &str, mode: &str, timeout: Duration) {
        wait_for(timeout, &format!("replica {address} {mode}"), || {
            let info = self.try_ctl_json(&["info"]).map_err(|o| o.stderr)?;
            let m = modes(&info);
            if m.iter().any(|(a, md)| a == address && md == mode) {
                Ok(())
            } else {
                Err(format!("{m:?}"))
            }
        })
    }

    /// SIGKILL and wait.
    pub fn kill9(&mut self) {
        if let Some(p) = self.process.as_mut() {
            p.kill9();
        }
    }

    /// SIGSTOP.
    pub fn stop(&mut self) {
        if let Some(p) = self.process.as_mut() {
            p.stop();
        }
    }

    /// SIGCONT.
    pub fn cont(&mut self) {
        if let Some(p) = self.process.as_mut() {
            p.cont();
        }
    }

    /// SIGTERM (the engine flushes its replicas and exits), wait; SIGKILL if it hangs.
    pub fn terminate(&mut self) -> Option<ExitStatus> {
        self.process.as_mut().and_then(Process::terminate)
    }

    /// Starts the engine again (killing the old process first if it still runs) with the
    /// same replicas, NBD port, unix socket and control address, and the last known size;
    /// retries while the ports are still busy. Panics if it does not serve.
    #[track_caller]
    pub fn restart(&mut self) {
        self.try_restart().unwrap_or_else(|e| panic!("{e}"));
    }

    /// [`Engine::restart`] returning the failure (e.g. no replica can be trusted).
    pub fn try_restart(&mut self) -> Result<(), String> {
        if let Some(mut p) = self.process.take() {
            p.kill9();
        }
        let size = self.size();
        let (process, (control, port)) =
            start_retrying(|| Self::spawn(&self.config, size, self.control.port(), self.nbd_port))
                .map_err(|e| e.message)?;
        assert_eq!(
            (control, port),
            (self.control, self.nbd_port),
            "restart moved addresses"
        );
        self.process = Some(process);
        Ok(())
    }

    /// The kept log lines of the current process.
    pub fn logs(&self) -> Vec<String> {
        self.process.as_ref().map(Process::logs).unwrap_or_default()
    }
}

/// `(address, mode)` of each replica in an `info --json` value.
pub fn modes(info: &Value) -> Vec<(String, String)> {
    info["replicas"]
        .as_array()
        .map(|rs| {
            rs.iter()
                .map(|r| {
                    (
                        r["address"].as_str().unwrap_or_default().to_owned(),
                        r["mode"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------
// Cluster

/// Options of [`Cluster::start_with`].
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Volume name (default [`VOLUME`]).
    pub volume: String,
    /// Engine `--replica-timeout` (default: the binary's, 4 s).
    pub replica_timeout: Option<Duration>,
    /// More arguments for `engine serve`.
    pub engine_args: Vec<String>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            volume: VOLUME.to_owned(),
            replica_timeout: None,
            engine_args: Vec::new(),
        }
    }
}

/// Replicas and an engine of one volume, in a temporary directory; all killed on drop.
pub struct Cluster {
    /// The engine serving the volume on TCP and on a unix socket.
    pub engine: Engine,
    /// The replicas, in the order given to the engine (`replica0`, `replica1`, ...).
    pub replicas: Vec<Replica>,
    dir: TempDir,
}

impl Cluster {
    /// Starts `n_replicas` replicas of a new volume of `size` bytes and an engine over
    /// them, and waits until every replica is RW.
    #[track_caller]
    pub fn start(n_replicas: usize, size: u64) -> Cluster {
        Self::start_with(n_replicas, size, ClusterOptions::default())
    }

    /// [`Cluster::start`] with options.
    #[track_caller]
    pub fn start_with(n_replicas: usize, size: u64, options: ClusterOptions) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("ironhorn-test-")
            .tempdir()
            .expect("create temporary directory");
        let replicas: Vec<Replica> = (0..n_replicas)
            .map(|i| {
                Replica::start(
                    &format!("replica{i}"),
                    &dir.path().join(format!("r{i}")),
                    size,
                )
            })
            .collect();
        let mut config = EngineConfig::new(
            &options.volume,
            size,
            replicas.iter().map(Replica::address).collect(),
        );
        config.replica_timeout = options.replica_timeout;
        config.socket = Some(dir.path().join("engine.sock"));
        config.extra_args = options.engine_args;
        let engine = Engine::start(config);
        let cluster = Cluster {
            engine,
            replicas,
            dir,
        };
        cluster.engine.wait_all_rw(START_TIMEOUT);
        cluster
    }

    /// The cluster's temporary directory (removed on drop).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A path inside the temporary directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The engine's `nbd://127.0.0.1:PORT/VOLUME`.
    pub fn uri(&self) -> String {
        self.engine.uri()
    }

    /// The engine's `nbd+unix:///VOLUME?socket=PATH`.
    pub fn unix_uri(&self) -> String {
        self.engine.unix_uri()
    }

    /// Control addresses of all replicas, in order.
    pub fn replica_addresses(&self) -> Vec<String> {
        self.replicas.iter().map(Replica::address).collect()
    }

    /// `engine ctl --json ARGS...` against the cluster's engine.
    #[track_caller]
    pub fn ctl_json(&self, args: &[&str]) -> Value {
        self.engine.ctl_json(args)
    }

    /// Starts one more replica process (not yet part of the volume; `engine ctl replica add`
    /// it), of the volume's current size, and returns its index in `replicas`.
    #[track_caller]
    pub fn start_spare_replica(&mut self) -> usize {
        let i = self.replicas.len();
        let r = Replica::start(
            &format!("replica{i}"),
            &self.path(&format!("r{i}")),
            self.engine.size(),
        );
        self.replicas.push(r);
        i
    }

    /// Stops the engine (SIGTERM; it flushes), then reads each replica in `which` back
    /// through its own single-replica engine and writes its image to a file in the
    /// temporary directory; returns the paths, in the order of `which`.
    ///
    /// Afterwards the cluster's engine is stopped, and each replica read has had its epoch
    /// raised once by its single-replica engine: if all the replicas that were equal before
    /// were read, they are still equal to each other and [`Engine::restart`] trusts them
    /// all again.
    #[track_caller]
    pub fn replica_images(&mut self, which: &[usize]) -> Vec<PathBuf> {
        let size = match self.engine.try_ctl_json(&["info"]) {
            Ok(info) => info["size"].as_u64().expect("info has a size"),
            Err(_) => self.engine.size(),
        };
        self.engine.terminate();
        let mut images = Vec::new();
        for &i in which {
            let r = &mut self.replicas[i];
            assert!(r.is_running(), "{} is not running", r.name);
            let mut config = EngineConfig::new(&self.engine.config.volume, size, vec![r.address()]);
            config.name = format!("check-engine-{i}");
            let mut e = Engine::start(config);
            let modes = e.replica_modes();
            assert!(
                modes.iter().all(|(_, m)| m == "RW"),
                "{} is not RW alone: {modes:?}",
                r.name
            );
            let img = self.dir.path().join(format!("image-r{i}.img"));
            nbd_export_to_file(&e.uri(), &img);
            e.terminate();
            let len = std::fs::metadata(&img).expect("image").len();
            assert_eq!(len, size, "image of {} has the wrong length", r.name);
            images.push(img);
        }
        images
    }

    /// [`Cluster::replica_images`] of `which`, then panics unless all the images are equal
    /// byte for byte (the message gives the first differing offset). Returns the image
    /// of the first.
    #[track_caller]
    pub fn assert_replicas_identical(&mut self, which: &[usize]) -> PathBuf {
        let images = self.replica_images(which);
        for (k, img) in images.iter().enumerate().skip(1) {
            if let Some(off) = first_difference(&images[0], img) {
                panic!(
                    "replica{} and replica{} differ at byte {off} (block {})",
                    which[0],
                    which[k],
                    off / 4096
                );
            }
        }
        images.into_iter().next().expect("at least one replica")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // The engine first (so that it does not log a storm of replica failures), then the
        // replicas; the temporary directory goes last, with the fields.
        self.engine.kill9();
        for r in &mut self.replicas {
            r.cont();
            r.kill9();
        }
    }
}
