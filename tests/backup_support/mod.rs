//! Helpers of the backup integration tests: a real S3 server (moto) on 127.0.0.1, replica
//! directories with known contents, and the `ironhorn backup` command.

#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use ironhorn_replica::Store;
use serde_json::Value;

use crate::common::{CmdOutput, bin, run_with_timeout};

/// Seconds one `ironhorn backup` command may run.
pub const BACKUP_TIMEOUT_SECS: u64 = 180;

/// moto's S3 server: the backup library tests' copy, so there is one.
#[path = "../../backup/tests/common/moto.rs"]
mod moto;
pub use moto::Moto;

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
