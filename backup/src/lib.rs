//! ironhorn backup store (DESIGN.md §5): snapshots of volumes cut into fixed blocks, named by
//! content hash (deduplicated across backups and volumes), compressed, with a crc32 of the
//! stored bytes, in S3-compatible object storage or a directory; one manifest per backup,
//! written last. Layout and lock protocol: `backup/README.md`.
//!
//! - [`target`]: open a target from a URL; the object layout.
//! - [`codec`]: block objects (hash, compression, crc).
//! - [`manifest`]: what one backup holds; its checked encoding.
//! - [`create`]: incremental backup of a [`SnapshotSource`].
//! - [`restore`]: restore into a [`RestoreSink`]; verify.
//! - [`catalog`]: list, inspect, delete, garbage collection.
//! - [`lock`]: the leases that keep garbage collection and backups apart.
//! - [`progress`]: live counters of a running operation.
//!
//! Every operation is an `async fn` on [`Target`] (tokio; futures are `Send`), takes an
//! `Arc<Progress>` where it is long, and a `CancellationToken` where it holds a lease.

pub mod catalog;
pub mod codec;
pub mod create;
pub mod error;
pub mod lock;
pub mod manifest;
pub mod progress;
pub mod restore;
pub mod source;
pub mod target;

pub use catalog::{BackupSummary, DeleteReport, GcReport};
pub use codec::{BlockHash, Compression, DEFAULT_BLOCK_SIZE};
pub use create::{CreateReport, CreateRequest};
pub use error::{BackupError, Result};
pub use lock::LeaseOptions;
pub use manifest::Manifest;
pub use progress::{Phase, Progress, ProgressSnapshot};
pub use restore::{BadBlock, RestoreReport, VerifyReport};
pub use source::{RestoreSink, SnapshotId, SnapshotSource};
pub use target::{Target, TargetOptions};

/// Now, in ms since the Unix epoch.
pub(crate) fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// A new backup id, `bk-YYYYMMDDTHHMMSSmmm-XXXXXXXX` (UTC time, then 8 random hex digits):
/// sorting ids sorts backups by time.
pub(crate) fn new_backup_id() -> String {
    let ms = unix_ms();
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86400);
    let rem = secs.rem_euclid(86400);
    let (y, m, d) = civil_from_days(days);
    let rand = uuid::Uuid::new_v4().simple().to_string();
    format!(
        "bk-{y:04}{m:02}{d:02}T{:02}{:02}{:02}{:03}-{}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        ms.rem_euclid(1000),
        &rand[..8]
    )
}

/// Gregorian (year, month, day) of a day count since 1970-01-01 (Howard Hinnant's
/// algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        let id = new_backup_id();
        assert!(manifest::check_name("id", &id).is_ok(), "{id}");
        assert_eq!(id.len(), "bk-20260101T000000000-01234567".len());
    }
}
