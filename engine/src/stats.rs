//! Cumulative I/O counters of a volume, counted where the engine answers a frontend request
//! (so NBD and ublk both count). Relaxed atomics: a few `fetch_add`s per request, no locks,
//! no allocation; readers get a slightly torn but monotonic view, which rates tolerate.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Kind of a frontend request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoKind {
    /// A read.
    Read,
    /// A write.
    Write,
    /// Write-zeroes or discard.
    Unmap,
    /// A flush.
    Flush,
}

/// The counters (see [`IoCounters`] for what each holds).
#[derive(Debug, Default)]
pub struct IoStats {
    read_ops: AtomicU64,
    read_bytes: AtomicU64,
    read_latency_us: AtomicU64,
    write_ops: AtomicU64,
    write_bytes: AtomicU64,
    write_latency_us: AtomicU64,
    unmap_ops: AtomicU64,
    unmap_bytes: AtomicU64,
    flush_ops: AtomicU64,
    errors: AtomicU64,
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoCounters {
    /// Read requests completed (with or without error).
    pub read_ops: u64,
    /// Bytes returned by successful reads.
    pub read_bytes: u64,
    /// Summed latency of the reads, µs.
    pub read_latency_us: u64,
    /// Write requests completed.
    pub write_ops: u64,
    /// Bytes of successful writes.
    pub write_bytes: u64,
    /// Summed latency of the writes, µs.
    pub write_latency_us: u64,
    /// Write-zeroes and discard requests completed.
    pub unmap_ops: u64,
    /// Bytes they covered, when successful.
    pub unmap_bytes: u64,
    /// Flush requests completed.
    pub flush_ops: u64,
    /// Requests of any kind answered with an error.
    pub errors: u64,
}

impl IoStats {
    /// Counts one request of `kind` over `bytes`, started at `started`, that succeeded if `ok`.
    pub fn record(&self, kind: IoKind, bytes: u64, started: Instant, ok: bool) {
        let us = started.elapsed().as_micros().min(u128::from(u64::MAX)) as u64;
        let bytes = if ok { bytes } else { 0 };
        if !ok {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        let r = Ordering::Relaxed;
        match kind {
            IoKind::Read => {
                self.read_ops.fetch_add(1, r);
                self.read_bytes.fetch_add(bytes, r);
                self.read_latency_us.fetch_add(us, r);
            }
            IoKind::Write => {
                self.write_ops.fetch_add(1, r);
                self.write_bytes.fetch_add(bytes, r);
                self.write_latency_us.fetch_add(us, r);
            }
            IoKind::Unmap => {
                self.unmap_ops.fetch_add(1, r);
                self.unmap_bytes.fetch_add(bytes, r);
            }
            IoKind::Flush => {
                self.flush_ops.fetch_add(1, r);
            }
        }
    }

    /// The counters now.
    pub fn snapshot(&self) -> IoCounters {
        let r = Ordering::Relaxed;
        IoCounters {
            read_ops: self.read_ops.load(r),
            read_bytes: self.read_bytes.load(r),
            read_latency_us: self.read_latency_us.load(r),
            write_ops: self.write_ops.load(r),
            write_bytes: self.write_bytes.load(r),
            write_latency_us: self.write_latency_us.load(r),
            unmap_ops: self.unmap_ops.load(r),
            unmap_bytes: self.unmap_bytes.load(r),
            flush_ops: self.flush_ops.load(r),
            errors: self.errors.load(r),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_each_kind_and_errors() {
        let s = IoStats::default();
        let t = Instant::now() - std::time::Duration::from_millis(2);
        s.record(IoKind::Read, 4096, t, true);
        s.record(IoKind::Read, 4096, t, false);
        s.record(IoKind::Write, 8192, t, true);
        s.record(IoKind::Unmap, 1 << 20, t, true);
        s.record(IoKind::Flush, 0, t, true);
        let c = s.snapshot();
        assert_eq!((c.read_ops, c.read_bytes), (2, 4096));
        assert!(c.read_latency_us >= 2 * 2000, "{c:?}");
        assert_eq!((c.write_ops, c.write_bytes), (1, 8192));
        assert!(c.write_latency_us >= 2000, "{c:?}");
        assert_eq!((c.unmap_ops, c.unmap_bytes, c.flush_ops), (1, 1 << 20, 1));
        assert_eq!(c.errors, 1);
    }
}
