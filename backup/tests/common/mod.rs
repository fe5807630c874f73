//! Helpers of the backup library tests: an in-memory snapshot source and restore sink, and
//! a real S3 server (moto) on 127.0.0.1.

#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use ironhorn_backup::{RestoreSink, SnapshotId, SnapshotSource};

mod moto;
pub use moto::Moto;

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
