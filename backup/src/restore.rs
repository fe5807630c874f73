//! Restoring a backup into a [`RestoreSink`], and verifying a backup's blocks; both check
//! every block completely (crc32 of the stored bytes, length, content hash).

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use crate::codec::{BlockHash, decode_block};
use crate::error::{BackupError, Result};
use crate::manifest::Manifest;
use crate::progress::{Pacer, Phase, Progress, ProgressSnapshot};
use crate::source::RestoreSink;
use crate::target::{Target, layout};

/// What a finished restore did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RestoreReport {
    /// The backup restored.
    pub id: String,
    /// Volume size.
    pub size: u64,
    /// Final counters.
    pub progress: ProgressSnapshot,
}

/// One bad block found by [`Target::verify_backup`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BadBlock {
    /// The block's name.
    pub hash: String,
    /// Volume offsets that use it.
    pub offsets: Vec<u64>,
    /// What is wrong.
    pub problem: String,
}

/// Result of verifying one backup.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VerifyReport {
    /// The backup verified.
    pub id: String,
    /// Distinct blocks read and checked.
    pub blocks_checked: u64,
    /// Blocks that are missing or damaged.
    pub bad: Vec<BadBlock>,
}

impl VerifyReport {
    /// Whether every block was good.
    pub fn ok(&self) -> bool {
        self.bad.is_empty()
    }
}

async fn fetch_checked(
    target: &Target,
    hash: BlockHash,
    len: usize,
) -> std::result::Result<(Vec<u8>, u64), String> {
    let key = layout::block(&hash);
    let obj = match target.get(&key).await {
        Ok(b) => b,
        Err(BackupError::Store {
            error: object_store::Error::NotFound { .. },
            ..
        }) => return Err("missing".into()),
        Err(e) => return Err(e.to_string()),
    };
    let n = obj.len() as u64;
    let data = tokio::task::spawn_blocking(move || decode_block(&obj, &hash, len))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    Ok((data, n))
}

impl Target {
    /// Restores backup `id` through `sink`: every block is checked before it is written;
    /// on any failure the sink is aborted and the first problem returned. `open_sink` gets
    /// the manifest (size, snapshot) and makes the sink.
    pub async fn restore_backup<S, F>(
        &self,
        id: &str,
        open_sink: F,
        progress: Arc<Progress>,
        limit_rate: Option<u64>,
        cancel: CancellationToken,
    ) -> Result<RestoreReport>
    where
        S: RestoreSink,
        F: FnOnce(&Manifest) -> std::io::Result<S>,
    {
        let span = info_span!("backup_restore", id, target = %self.url());
        async move {
            let manifest = self.read_manifest(id).await?;
            let sink = Arc::new(
                open_sink(&manifest).map_err(|e| BackupError::io("open restore destination", e))?,
            );
            match self
                .restore_into(&manifest, sink.clone(), &progress, limit_rate, &cancel)
                .await
            {
                Ok(()) => {
                    progress.set_phase(Phase::Committing);
                    let s = sink.clone();
                    let m = manifest.clone();
                    let committed =
                        tokio::task::spawn_blocking(move || s.commit(&m.snapshot, &m.labels))
                            .await?;
                    if let Err(e) = committed {
                        let s = sink.clone();
                        let _ = tokio::task::spawn_blocking(move || s.abort()).await;
                        return Err(BackupError::io("commit restored volume", e));
                    }
                    progress.set_phase(Phase::Done);
                    info!(size = manifest.size, "restore complete");
                    Ok(RestoreReport {
                        id: manifest.id.clone(),
                        size: manifest.size,
                        progress: progress.snapshot(),
                    })
                }
                Err(e) => {
                    warn!(error = %e, "restore failed; removing what was written");
                    let s = sink.clone();
                    let _ = tokio::task::spawn_blocking(move || s.abort()).await;
                    Err(e)
                }
            }
        }
        .instrument(span)
        .await
    }

    async fn restore_into<S: RestoreSink>(
        &self,
        m: &Manifest,
        sink: Arc<S>,
        progress: &Arc<Progress>,
        limit_rate: Option<u64>,
        cancel: &CancellationToken,
    ) -> Result<()> {
        progress.set_total(m.blocks.len() as u64, m.stored_volume_bytes());
        progress.set_phase(Phase::Transferring);
        let pacer = Arc::new(Pacer::new(limit_rate));
        futures::stream::iter(m.blocks.iter().copied())
            .map(|b| {
                let sink = sink.clone();
                let pacer = pacer.clone();
                let progress = progress.clone();
                let len = m.block_len(b.0);
                let offset = b.0 * m.block_size;
                async move {
                    if cancel.is_cancelled() {
                        return Err(BackupError::Cancelled);
                    }
                    pacer.admit(len).await;
                    let (data, n) =
                        fetch_checked(self, b.1, len as usize)
                            .await
                            .map_err(|reason| BackupError::BadBlock {
                                hash: b.1.to_hex(),
                                offset,
                                reason,
                            })?;
                    progress.transferred(n);
                    tokio::task::spawn_blocking(move || sink.write_at(offset, &data))
                        .await?
                        .map_err(|e| {
                            BackupError::io(format!("write restored volume at {offset}"), e)
                        })?;
                    progress.block_done(len);
                    Ok(())
                }
            })
            .buffer_unordered(self.concurrency())
            .try_collect::<()>()
            .await
    }

    /// Reads every distinct block of backup `id` and checks it; reports each bad one with
    /// the volume offsets that use it. Fails only when the manifest cannot be read.
    pub async fn verify_backup(&self, id: &str, progress: Arc<Progress>) -> Result<VerifyReport> {
        let m = self.read_manifest(id).await?;
        let mut uses: BTreeMap<BlockHash, (usize, Vec<u64>)> = BTreeMap::new();
        for b in &m.blocks {
            let e = uses
                .entry(b.1)
                .or_insert((m.block_len(b.0) as usize, Vec::new()));
            e.1.push(b.0 * m.block_size);
        }
        progress.set_total(uses.len() as u64, m.stored_volume_bytes());
        progress.set_phase(Phase::Transferring);
        let bad: Vec<BadBlock> = futures::stream::iter(uses)
            .map(|(hash, (len, offsets))| {
                let progress = progress.clone();
                async move {
                    let r = fetch_checked(self, hash, len).await;
                    let volume_bytes = len as u64 * offsets.len() as u64;
                    progress.block_done(volume_bytes);
                    match r {
                        Ok((_, n)) => {
                            progress.transferred(n);
                            None
                        }
                        Err(problem) => Some(BadBlock {
                            hash: hash.to_hex(),
                            offsets,
                            problem,
                        }),
                    }
                }
            })
            .buffer_unordered(self.concurrency())
            .filter_map(|x| async move { x })
            .collect()
            .await;
        progress.set_phase(Phase::Done);
        let checked = progress.snapshot().done_blocks;
        Ok(VerifyReport {
            id: m.id,
            blocks_checked: checked,
            bad,
        })
    }
}
