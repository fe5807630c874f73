//! What a backup reads from and what a restore writes to: implemented by the replica crate
//! for a replica's snapshot and a new replica directory, and by tests for plain buffers.

use std::collections::BTreeMap;
use std::io;
use std::ops::Range;

/// Which snapshot a backup was taken from: its name and creation time on the replica (a
/// snapshot deleted and created again under the same name is another snapshot).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotId {
    /// Snapshot name.
    pub name: String,
    /// Creation time, ms since the Unix epoch.
    pub created_unix_ms: i64,
}

/// A frozen snapshot of a volume to back up. Methods are called from blocking threads,
/// several `read_at` at once.
pub trait SnapshotSource: Send + Sync + 'static {
    /// The snapshot.
    fn id(&self) -> SnapshotId;
    /// Volume size in bytes.
    fn size(&self) -> u64;
    /// Byte ranges that may hold data; everything else reads as zeros.
    fn allocated(&self) -> io::Result<Vec<Range<u64>>>;
    /// Byte ranges that may differ between snapshot `base` and this one, when `base` is an
    /// ancestor of this snapshot (or this snapshot itself) still known to the source;
    /// `None` otherwise (then the backup reads everything allocated).
    fn changed_since(&self, base: &SnapshotId) -> io::Result<Option<Vec<Range<u64>>>>;
    /// Reads `buf.len()` bytes at `offset` as the snapshot sees them.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
}

/// Where a restore writes: created for one backup, written block by block (several
/// `write_at` at once, on distinct ranges), then committed or aborted. Until `commit`
/// returns, what it wrote must not look like a usable volume.
pub trait RestoreSink: Send + Sync + 'static {
    /// Writes `data` at volume offset `offset`. Ranges never written read as zeros.
    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Makes the restored volume durable and visible (called once, after every write).
    fn commit(&self, snapshot: &str, labels: &BTreeMap<String, String>) -> io::Result<()>;
    /// Removes whatever was written (called once, instead of `commit`).
    fn abort(&self);
}
