//! Helpers of the backup library tests: an in-memory snapshot source and restore sink, and
//! a real S3 server (moto) on 127.0.0.1.

#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::ops::Range;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ironhorn_backup::{RestoreSink, SnapshotId, SnapshotSource};

/// Page size the in-memory source tracks changes in.
pub const PAGE: usize = 4096;

/// `len` pseudo-random bytes from `seed` (xorshift64*).
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

/// A volume in memory with a history of snapshots: each snapshot is a full copy, and
/// `changed_since` compares pages, as a replica's layers would tell.
pub struct MemSource {
    pub id: SnapshotId,
    pub data: Arc<Vec<u8>>,
    pub history: Vec<(SnapshotId, Arc<Vec<u8>>)>,
}

impl MemSource {
    pub fn new(
        name: &str,
        created: i64,
        data: Vec<u8>,
        history: Vec<(SnapshotId, Arc<Vec<u8>>)>,
    ) -> MemSource {
        MemSource {
            id: SnapshotId {
                name: name.into(),
                created_unix_ms: created,
            },
            data: Arc::new(data),
            history,
        }
    }

    fn pages(&self, pred: impl Fn(usize) -> bool) -> Vec<Range<u64>> {
        let mut out: Vec<Range<u64>> = Vec::new();
        for p in 0..self.data.len().div_ceil(PAGE) {
            if pred(p) {
                let (s, e) = (
                    (p * PAGE) as u64,
                    ((p + 1) * PAGE).min(self.data.len()) as u64,
                );
                match out.last_mut() {
                    Some(l) if l.end == s => l.end = e,
                    _ => out.push(s..e),
                }
            }
        }
        out
    }
}

impl SnapshotSource for MemSource {
    fn id(&self) -> SnapshotId {
        self.id.clone()
    }
    fn size(&self) -> u64 {
        self.data.len() as u64
    }
    fn allocated(&self) -> std::io::Result<Vec<Range<u64>>> {
        let d = &self.data;
        Ok(self.pages(|p| {
            d[p * PAGE..((p + 1) * PAGE).min(d.len())]
                .iter()
                .any(|b| *b != 0)
        }))
    }
    fn changed_since(&self, base: &SnapshotId) -> std::io::Result<Option<Vec<Range<u64>>>> {
        let Some((_, old)) = self.history.iter().find(|(id, _)| id == base) else {
            return Ok(None);
        };
        let d = &self.data;
        Ok(Some(self.pages(|p| {
            let r = p * PAGE..((p + 1) * PAGE).min(d.len());
            old.get(r.clone()) != Some(&d[r])
        })))
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let o = offset as usize;
        buf.copy_from_slice(&self.data[o..o + buf.len()]);
        Ok(())
    }
}

/// A restore destination in memory that records whether it was committed or aborted.
#[derive(Default)]
pub struct MemSink {
    pub data: Mutex<Vec<u8>>,
    pub state: Mutex<Option<&'static str>>,
}

impl MemSink {
    pub fn new(size: u64) -> Arc<MemSink> {
        Arc::new(MemSink {
            data: Mutex::new(vec![0; size as usize]),
            state: Mutex::new(None),
        })
    }
}

/// Shares one [`MemSink`] with the test.
pub struct SinkRef(pub Arc<MemSink>);

impl RestoreSink for SinkRef {
    fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let mut d = self.0.data.lock().unwrap();
        d[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn commit(&self, _snapshot: &str, _labels: &BTreeMap<String, String>) -> std::io::Result<()> {
        *self.0.state.lock().unwrap() = Some("committed");
        Ok(())
    }
    fn abort(&self) {
        *self.0.state.lock().unwrap() = Some("aborted");
    }
}

/// moto's S3 server on 127.0.0.1, killed on drop.
pub struct Moto {
    child: Child,
    pub port: u16,
}

impl Moto {
    /// Starts moto's server (installed by .ci/run) on a free port and waits until it answers.
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
            let _ = m.child.kill();
        }
        panic!("moto_server did not start");
    }

    /// The endpoint URL.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Creates a bucket (moto accepts an unsigned request for that).
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

    /// A target URL for `bucket/prefix` on this server.
    pub fn url(&self, bucket: &str, prefix: &str) -> String {
        format!(
            "s3://{bucket}/{prefix}?endpoint={}&region=us-east-1",
            self.endpoint()
        )
    }
}

/// Target options with the credentials moto accepts.
pub fn moto_options() -> ironhorn_backup::TargetOptions {
    ironhorn_backup::TargetOptions {
        credentials: Some(ironhorn_backup::target::Credentials {
            access_key_id: "testing".into(),
            secret_access_key: "testing".into(),
        }),
        ..Default::default()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
