//! Progress of a long operation, shared between the task doing it and whoever reports it.

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// Stage of an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Waiting for the target lock.
    Locking,
    /// Finding what to read (previous backup, changed extents).
    Scanning,
    /// Moving blocks.
    Transferring,
    /// Writing the manifest, or committing the restored replica.
    Committing,
    /// Finished.
    Done,
}

impl Phase {
    fn from_u8(v: u8) -> Phase {
        match v {
            0 => Phase::Locking,
            1 => Phase::Scanning,
            2 => Phase::Transferring,
            3 => Phase::Committing,
            _ => Phase::Done,
        }
    }
}

/// Live counters of an operation. Share it as `Arc<Progress>`; read it with
/// [`Progress::snapshot`] from any thread while the operation runs.
#[derive(Debug, Default)]
pub struct Progress {
    phase: AtomicU8,
    total_bytes: AtomicU64,
    done_bytes: AtomicU64,
    total_blocks: AtomicU64,
    done_blocks: AtomicU64,
    uploaded_blocks: AtomicU64,
    uploaded_bytes: AtomicU64,
    skipped_blocks: AtomicU64,
    zero_blocks: AtomicU64,
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgressSnapshot {
    /// Stage.
    pub phase: Option<Phase>,
    /// Volume bytes this operation has to read or write.
    pub total_bytes: u64,
    /// Volume bytes read or written so far.
    pub done_bytes: u64,
    /// Blocks to process.
    pub total_blocks: u64,
    /// Blocks processed.
    pub done_blocks: u64,
    /// Blocks uploaded (backup) or downloaded (restore, verify).
    pub transferred_blocks: u64,
    /// Stored (compressed) bytes uploaded or downloaded.
    pub transferred_bytes: u64,
    /// Blocks the target already had (backup).
    pub skipped_blocks: u64,
    /// Blocks that were all zeros and are not stored (backup).
    pub zero_blocks: u64,
}

impl Progress {
    /// New counters at zero, phase `Locking`.
    pub fn new() -> Progress {
        Progress::default()
    }

    /// Current counters.
    pub fn snapshot(&self) -> ProgressSnapshot {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ProgressSnapshot {
            phase: Some(Phase::from_u8(self.phase.load(Ordering::Relaxed))),
            total_bytes: l(&self.total_bytes),
            done_bytes: l(&self.done_bytes),
            total_blocks: l(&self.total_blocks),
            done_blocks: l(&self.done_blocks),
            transferred_blocks: l(&self.uploaded_blocks),
            transferred_bytes: l(&self.uploaded_bytes),
            skipped_blocks: l(&self.skipped_blocks),
            zero_blocks: l(&self.zero_blocks),
        }
    }

    pub(crate) fn set_phase(&self, p: Phase) {
        self.phase.store(p as u8, Ordering::Relaxed);
    }

    pub(crate) fn set_total(&self, blocks: u64, bytes: u64) {
        self.total_blocks.store(blocks, Ordering::Relaxed);
        self.total_bytes.store(bytes, Ordering::Relaxed);
    }

    pub(crate) fn block_done(&self, volume_bytes: u64) {
        self.done_blocks.fetch_add(1, Ordering::Relaxed);
        self.done_bytes.fetch_add(volume_bytes, Ordering::Relaxed);
    }

    pub(crate) fn transferred(&self, stored_bytes: u64) {
        self.uploaded_blocks.fetch_add(1, Ordering::Relaxed);
        self.uploaded_bytes
            .fetch_add(stored_bytes, Ordering::Relaxed);
    }

    pub(crate) fn skipped(&self) {
        self.skipped_blocks.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn zero(&self) {
        self.zero_blocks.fetch_add(1, Ordering::Relaxed);
    }
}

/// Paces an operation to at most `rate` volume bytes per second.
#[derive(Debug)]
pub(crate) struct Pacer {
    rate: Option<u64>,
    start: tokio::time::Instant,
    admitted: AtomicU64,
}

impl Pacer {
    pub(crate) fn new(rate: Option<u64>) -> Pacer {
        Pacer {
            rate: rate.filter(|r| *r > 0),
            start: tokio::time::Instant::now(),
            admitted: AtomicU64::new(0),
        }
    }

    /// Waits until `bytes` more may go.
    pub(crate) async fn admit(&self, bytes: u64) {
        let Some(rate) = self.rate else { return };
        let before = self.admitted.fetch_add(bytes, Ordering::Relaxed);
        let at = std::time::Duration::from_secs_f64(before as f64 / rate as f64);
        tokio::time::sleep_until(self.start + at).await;
    }
}
