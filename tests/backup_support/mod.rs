//! Helpers of the backup integration tests: a real S3 server (moto) on 127.0.0.1, replica
//! directories with known contents, and the `ironhorn backup` command.

#![allow(dead_code, clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ironhorn_replica::Store;
use serde_json::Value;

use crate::common::{CmdOutput, bin, run_with_timeout};

/// Seconds one `ironhorn backup` command may run.
pub const BACKUP_TIMEOUT_SECS: u64 = 180;

/// moto's S3 server on 127.0.0.1 (installed by .ci/run), killed on drop.
pub struct Moto {
    child: Child,
    /// Its port.
    pub port: u16,
}

impl Moto {
    /// Starts moto's server on a free port and waits until it accepts connections.
    pub fn start() -> Moto {
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            // `python3 -m moto.server` works whether or not the `moto_server` script is
            // on PATH (pyenv shims).
            let child = Command::new("python3")
                .args([
                    "-m",
                    "moto.server",
                    "-H",
                    "127.0.0.1",
                    "-p",
                    &port.to_string(),
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("python3 not found (moto: pip install 'moto[server]', .ci/run does)");
            let mut m = Moto { child, port };
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = m.child.try_wait() {
                    break;
                }
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return m;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        panic!("moto_server did not start");
    }

    /// Creates `bucket` (moto takes an unsigned request for that).
    pub fn create_bucket(&self, bucket: &str) {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "PUT /{bucket} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.port
        )
        .unwrap();
        let mut resp = String::new();
        let _ = s.read_to_string(&mut resp);
        assert!(resp.starts_with("HTTP/1.1 200"), "create bucket: {resp}");
    }

    /// Target URL of `bucket/prefix` on this server.
    pub fn url(&self, bucket: &str, prefix: &str) -> String {
        format!(
            "s3://{bucket}/{prefix}?endpoint=http://127.0.0.1:{}&region=us-east-1",
            self.port
        )
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `ironhorn backup ARGS --target URL`, with the credentials moto accepts.
pub fn backup_cmd(target: &str, args: &[&str]) -> Command {
    let mut c = Command::new(bin());
    c.arg("backup").args(args).args(["--target", target]);
    c.env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env_remove("IRONHORN_BACKUP_TARGET")
        .env("RUST_LOG", "warn");
    c
}

/// Runs `ironhorn backup ARGS --json`, bounded in time.
pub fn backup(target: &str, args: &[&str]) -> CmdOutput {
    let mut a = args.to_vec();
    a.push("--json");
    run_with_timeout(&mut backup_cmd(target, &a), BACKUP_TIMEOUT_SECS)
}

/// [`backup`], expecting success, parsing the JSON it prints.
#[track_caller]
pub fn backup_json(target: &str, args: &[&str]) -> Value {
    let out = backup(target, args);
    out.assert_success();
    serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", out.all_output()))
}

/// Writes `data` at `offset` of the replica in `dir` (whole 4 KiB blocks).
pub fn write(store: &Store, offset: u64, data: &[u8]) {
    store.write(offset, data).unwrap();
}

/// Reads the whole volume of the replica in `dir` through its head.
pub fn read_replica(dir: &Path) -> Vec<u8> {
    let s = Store::open(dir).unwrap();
    let mut buf = vec![0u8; s.size() as usize];
    s.read(0, &mut buf).unwrap();
    buf
}

/// Files under `dir` (recursively) whose name ends with `suffix`.
pub fn files_ending(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_ending(&p, suffix));
        } else if p.to_string_lossy().ends_with(suffix) {
            out.push(p);
        }
    }
    out
}
