//! Creating a backup: read the snapshot's changed blocks, upload those the target lacks,
//! write the manifest last.

use std::collections::{BTreeMap, HashSet};
use std::ops::Range;
use std::sync::{Arc, Mutex};

use futures::{StreamExt, TryStreamExt};
use object_store::PutMode;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span};

use crate::codec::{
    BlockHash, Compression, DEFAULT_BLOCK_SIZE, check_block_size, encode_block, is_zero,
};
use crate::error::{BackupError, Result};
use crate::lock::{Lease, LockKind};
use crate::manifest::{
    BlockRef, MANIFEST_FORMAT, Manifest, ManifestStats, check_label, check_name,
};
use crate::progress::{Pacer, Phase, Progress, ProgressSnapshot};
use crate::source::SnapshotSource;
use crate::target::{Target, layout};
use crate::{new_backup_id, unix_ms};

/// What to back up and how.
#[derive(Debug, Clone)]
pub struct CreateRequest {
    /// Backup volume name: backups of one volume are incremental on each other.
    pub volume: String,
    /// User labels stored in the manifest.
    pub labels: BTreeMap<String, String>,
    /// Block size for a new backup volume (default 2 MiB); must match an existing one's.
    pub block_size: Option<u64>,
    /// Compression of new blocks.
    pub compression: Compression,
    /// Read only what changed since the newest earlier backup of this volume whose snapshot
    /// is an ancestor of this one (default); `false` reads everything allocated (blocks the
    /// target has are still not uploaded again).
    pub incremental: bool,
    /// At most this many volume bytes per second (none by default).
    pub limit_rate: Option<u64>,
}

impl CreateRequest {
    /// A request with the defaults for `volume`.
    pub fn new(volume: impl Into<String>) -> CreateRequest {
        CreateRequest {
            volume: volume.into(),
            labels: BTreeMap::new(),
            block_size: None,
            compression: Compression::Zstd,
            incremental: true,
            limit_rate: None,
        }
    }
}

/// Settings of a backup volume, `volumes/<volume>/volume.json`, fixed at its first backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeConfig {
    /// Block size of every backup of the volume.
    pub block_size: u64,
}

/// What a finished backup did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateReport {
    /// The new backup's id.
    pub id: String,
    /// Its volume.
    pub volume: String,
    /// The backup it was incremental on.
    pub base: Option<String>,
    /// Final counters.
    pub progress: ProgressSnapshot,
    /// Blocks in the manifest.
    pub blocks: u64,
}

enum Outcome {
    Zero,
    Stored(BlockHash),
}

async fn volume_config(target: &Target, volume: &str, asked: Option<u64>) -> Result<VolumeConfig> {
    let key = layout::volume_config(volume);
    let bad =
        |reason: String| BackupError::invalid("block size", asked.unwrap_or(0).to_string(), reason);
    for _ in 0..3 {
        match target.get(&key).await {
            Ok(b) => {
                let cfg: VolumeConfig =
                    serde_json::from_slice(&b).map_err(|e| BackupError::CorruptManifest {
                        key: key.to_string(),
                        reason: e.to_string(),
                    })?;
                check_block_size(cfg.block_size).map_err(|e| BackupError::CorruptManifest {
                    key: key.to_string(),
                    reason: e,
                })?;
                if let Some(a) = asked
                    && a != cfg.block_size
                {
                    return Err(bad(format!(
                        "backups of volume {volume:?} use block size {}",
                        cfg.block_size
                    )));
                }
                return Ok(cfg);
            }
            Err(BackupError::Store {
                error: object_store::Error::NotFound { .. },
                ..
            }) => {
                let cfg = VolumeConfig {
                    block_size: asked.unwrap_or(DEFAULT_BLOCK_SIZE),
                };
                check_block_size(cfg.block_size).map_err(bad)?;
                let body = serde_json::to_vec(&cfg).unwrap_or_default();
                match target.put(&key, body.into(), PutMode::Create).await {
                    Ok(_) => return Ok(cfg),
                    // Another backup created it first: read theirs.
                    Err(BackupError::Store {
                        error: object_store::Error::AlreadyExists { .. },
                        ..
                    }) => continue,
                    Err(e) => return Err(e),
                }
            }
            Err(e) => return Err(e),
        }
    }
    Err(BackupError::CorruptManifest {
        key: key.to_string(),
        reason: "cannot be read or created".into(),
    })
}

/// Block indices touched by byte `ranges`, sorted and unique.
fn blocks_touched(ranges: &[Range<u64>], block_size: u64, count: u64) -> Vec<u64> {
    let mut out: Vec<u64> = Vec::new();
    for r in ranges {
        if r.is_empty() {
            continue;
        }
        let first = r.start / block_size;
        let last = (r.end - 1) / block_size;
        out.extend(first..=last.min(count.saturating_sub(1)));
    }
    out.sort_unstable();
    out.dedup();
    out
}

impl Target {
    /// Backs up `source` into volume `req.volume`. Progress is published in `progress`;
    /// cancelling `cancel` stops it (no manifest is written; uploaded blocks stay until the
    /// next garbage collection).
    pub async fn create_backup(
        &self,
        source: Arc<dyn SnapshotSource>,
        req: CreateRequest,
        progress: Arc<Progress>,
        cancel: CancellationToken,
    ) -> Result<CreateReport> {
        let snap = source.id();
        let span = info_span!("backup_create", volume = %req.volume, snapshot = %snap.name, target = %self.url());
        self.create_inner(source, req, progress, cancel)
            .instrument(span)
            .await
    }

    async fn create_inner(
        &self,
        source: Arc<dyn SnapshotSource>,
        req: CreateRequest,
        progress: Arc<Progress>,
        cancel: CancellationToken,
    ) -> Result<CreateReport> {
        check_name("volume", &req.volume)
            .map_err(|e| BackupError::invalid("volume", &req.volume, e))?;
        for (k, v) in &req.labels {
            check_label(k, v).map_err(|e| BackupError::invalid("label", format!("{k}={v}"), e))?;
        }
        let snap = source.id();
        check_name("snapshot", &snap.name)
            .map_err(|e| BackupError::invalid("snapshot", &snap.name, e))?;
        let size = source.size();
        progress.set_phase(Phase::Locking);
        let cfg = volume_config(self, &req.volume, req.block_size).await?;
        let block_size = cfg.block_size;
        let lease = Lease::acquire(
            self,
            LockKind::Backup,
            &format!("backup of {}", req.volume),
            &cancel,
        )
        .await?;
        let result = self
            .create_locked(
                &lease,
                source,
                &req,
                block_size,
                size,
                progress.clone(),
                &cancel,
            )
            .await;
        lease.release().await;
        let report = result?;
        progress.set_phase(Phase::Done);
        info!(id = %report.id, uploaded = report.progress.transferred_blocks, skipped = report.progress.skipped_blocks, "backup created");
        Ok(report)
    }

    /// Newest backup of `volume` whose snapshot the source can diff against.
    async fn find_base(
        &self,
        source: &Arc<dyn SnapshotSource>,
        volume: &str,
        block_size: u64,
    ) -> Result<Option<(Manifest, Vec<Range<u64>>)>> {
        let mut keys = self.list(&layout::manifests_of(volume)).await?;
        // Ids start with their UTC creation time: newest first.
        keys.sort_by(|a, b| b.location.as_ref().cmp(a.location.as_ref()));
        for meta in keys.into_iter().take(64) {
            let Some((_, id)) = layout::parse_manifest(&meta.location) else {
                continue;
            };
            let m = match self.read_manifest_at(&meta.location).await {
                Ok(m) => m,
                Err(e) => {
                    debug!(id, error = %e, "skipping unreadable manifest as a base");
                    continue;
                }
            };
            if m.block_size != block_size {
                continue;
            }
            let base = crate::source::SnapshotId {
                name: m.snapshot.clone(),
                created_unix_ms: m.snapshot_created_unix_ms,
            };
            let src = source.clone();
            let changed = tokio::task::spawn_blocking(move || src.changed_since(&base))
                .await?
                .map_err(|e| BackupError::io("find changed extents", e))?;
            if let Some(c) = changed {
                return Ok(Some((m, c)));
            }
        }
        Ok(None)
    }

    #[allow(clippy::too_many_arguments)]
    async fn create_locked(
        &self,
        lease: &Lease,
        source: Arc<dyn SnapshotSource>,
        req: &CreateRequest,
        block_size: u64,
        size: u64,
        progress: Arc<Progress>,
        cancel: &CancellationToken,
    ) -> Result<CreateReport> {
        progress.set_phase(Phase::Scanning);
        let count = size.div_ceil(block_size);
        let base = if req.incremental {
            self.find_base(&source, &req.volume, block_size).await?
        } else {
            None
        };
        let mut map: BTreeMap<u64, BlockHash> = BTreeMap::new();
        let mut known: HashSet<BlockHash> = HashSet::new();
        let (work, base_id) = match base {
            Some((m, changed)) => {
                let mut work = blocks_touched(&changed, block_size, count);
                for b in &m.blocks {
                    known.insert(b.1);
                    if b.0 < count {
                        map.insert(b.0, b.1);
                    }
                }
                if m.size != size && m.size % block_size != 0 {
                    // The old last block was short; it is a different block now.
                    let last = m.size / block_size;
                    if last < count && !work.contains(&last) {
                        work.push(last);
                        work.sort_unstable();
                    }
                }
                debug!(base = %m.id, changed_blocks = work.len(), "incremental backup");
                (work, Some(m.id))
            }
            None => {
                let src = source.clone();
                let alloc = tokio::task::spawn_blocking(move || src.allocated())
                    .await?
                    .map_err(|e| BackupError::io("list allocated extents", e))?;
                (blocks_touched(&alloc, block_size, count), None)
            }
        };
        let len_of = |i: u64| block_size.min(size - i * block_size);
        let total_bytes: u64 = work.iter().map(|i| len_of(*i)).sum();
        progress.set_total(work.len() as u64, total_bytes);
        progress.set_phase(Phase::Transferring);

        let known = Arc::new(known);
        let in_flight: Arc<Mutex<HashSet<BlockHash>>> = Arc::default();
        let pacer = Arc::new(Pacer::new(req.limit_rate));
        let compression = req.compression;
        let stats = Arc::new(Mutex::new(ManifestStats::default()));
        let results: Vec<(u64, Outcome)> = futures::stream::iter(work)
            .map(|index| {
                let source = source.clone();
                let known = known.clone();
                let in_flight = in_flight.clone();
                let progress = progress.clone();
                let pacer = pacer.clone();
                let stats = stats.clone();
                let cancel = cancel.clone();
                let target = self.clone();
                async move {
                    if cancel.is_cancelled() {
                        return Err(BackupError::Cancelled);
                    }
                    let len = len_of(index);
                    pacer.admit(len).await;
                    let offset = index * block_size;
                    let (data, hash) = tokio::task::spawn_blocking(move || {
                        let mut buf = vec![0u8; len as usize];
                        source.read_at(offset, &mut buf).map_err(|e| {
                            BackupError::io(format!("read snapshot at {offset}"), e)
                        })?;
                        if is_zero(&buf) {
                            return Ok::<_, BackupError>((buf, None));
                        }
                        let h = BlockHash::of(&buf);
                        Ok((buf, Some(h)))
                    })
                    .await??;
                    let Some(hash) = hash else {
                        progress.zero();
                        progress.block_done(len);
                        return Ok((index, Outcome::Zero));
                    };
                    let fresh = !known.contains(&hash)
                        && in_flight
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(hash);
                    let key = layout::block(&hash);
                    if fresh && !target.exists(&key).await? {
                        let encoded =
                            tokio::task::spawn_blocking(move || encode_block(&data, compression))
                                .await?;
                        let n = encoded.len() as u64;
                        // Content-addressed: replacing an equal object changes nothing.
                        target.put(&key, encoded, PutMode::Overwrite).await?;
                        progress.transferred(n);
                        let mut s = stats.lock().unwrap_or_else(|p| p.into_inner());
                        s.blocks_uploaded += 1;
                        s.bytes_uploaded += n;
                    } else {
                        progress.skipped();
                        stats
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .blocks_skipped += 1;
                    }
                    progress.block_done(len);
                    Ok((index, Outcome::Stored(hash)))
                }
            })
            .buffer_unordered(self.concurrency())
            .try_collect()
            .await?;
        for (index, outcome) in results {
            match outcome {
                Outcome::Zero => {
                    map.remove(&index);
                }
                Outcome::Stored(h) => {
                    map.insert(index, h);
                }
            }
        }
        progress.set_phase(Phase::Committing);
        if cancel.is_cancelled() {
            return Err(BackupError::Cancelled);
        }
        let snap = source.id();
        let mut stats = stats.lock().unwrap_or_else(|p| p.into_inner()).clone();
        stats.bytes_read = total_bytes;
        let manifest = Manifest {
            format: MANIFEST_FORMAT,
            id: new_backup_id(),
            volume: req.volume.clone(),
            snapshot: snap.name,
            snapshot_created_unix_ms: snap.created_unix_ms,
            size,
            block_size,
            compression: req.compression,
            created_unix_ms: unix_ms(),
            labels: req.labels.clone(),
            base: base_id.clone(),
            stats,
            blocks: map.into_iter().map(|(i, h)| BlockRef(i, h)).collect(),
        };
        manifest
            .validate()
            .map_err(|reason| BackupError::CorruptManifest {
                key: manifest.id.clone(),
                reason,
            })?;
        // Every block the manifest names is stored and no collector can have run since we
        // took the lease, unless we lost it.
        lease.check()?;
        let key = layout::manifest(&req.volume, &manifest.id);
        self.put(&key, manifest.encode().into(), PutMode::Create)
            .await?;
        Ok(CreateReport {
            id: manifest.id.clone(),
            volume: req.volume.clone(),
            base: base_id,
            progress: progress.snapshot(),
            blocks: manifest.blocks.len() as u64,
        })
    }
}

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;

    #[test]
    fn touched_blocks() {
        let bs = 1 << 20;
        assert_eq!(blocks_touched(&[0..1], bs, 4), vec![0]);
        assert_eq!(blocks_touched(&[(bs - 1)..(bs + 1)], bs, 4), vec![0, 1]);
        assert_eq!(
            blocks_touched(&[(3 * bs)..(3 * bs + 4096), 0..4096, 10..20], bs, 4),
            vec![0, 3]
        );
        assert_eq!(
            blocks_touched(&[(2 * bs)..(2 * bs)], bs, 4),
            Vec::<u64>::new()
        );
        assert_eq!(blocks_touched(&[0..(10 * bs)], bs, 4), vec![0, 1, 2, 3]);
    }
}
