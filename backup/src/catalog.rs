//! Listing, inspecting and deleting backups, and garbage collection of blocks no manifest
//! references (under the exclusive lease, see [`crate::lock`]).

use std::collections::{BTreeMap, HashSet};

use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span};

use crate::codec::{BlockHash, Compression};
use crate::error::{BackupError, Result};
use crate::lock::{Lease, LockKind};
use crate::manifest::{Manifest, check_name};
use crate::target::{Target, layout};

/// One backup as listed: the manifest without its block list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupSummary {
    /// Backup id.
    pub id: String,
    /// Backup volume.
    pub volume: String,
    /// Snapshot it was taken from.
    pub snapshot: String,
    /// Completion time (ms since the Unix epoch).
    pub created_unix_ms: i64,
    /// Volume size.
    pub size: u64,
    /// Block size.
    pub block_size: u64,
    /// Compression of new blocks.
    pub compression: Compression,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// The backup it was incremental on.
    pub base: Option<String>,
    /// Number of stored blocks.
    pub blocks: u64,
    /// Volume bytes those blocks cover.
    pub stored_volume_bytes: u64,
    /// Bytes this backup uploaded when it was made.
    pub uploaded_bytes: u64,
}

impl From<&Manifest> for BackupSummary {
    fn from(m: &Manifest) -> Self {
        BackupSummary {
            id: m.id.clone(),
            volume: m.volume.clone(),
            snapshot: m.snapshot.clone(),
            created_unix_ms: m.created_unix_ms,
            size: m.size,
            block_size: m.block_size,
            compression: m.compression,
            labels: m.labels.clone(),
            base: m.base.clone(),
            blocks: m.blocks.len() as u64,
            stored_volume_bytes: m.stored_volume_bytes(),
            uploaded_bytes: m.stats.bytes_uploaded,
        }
    }
}

/// What a garbage collection did.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GcReport {
    /// Manifests found.
    pub manifests: u64,
    /// Blocks referenced by them (kept).
    pub blocks_kept: u64,
    /// Unreferenced blocks deleted.
    pub blocks_deleted: u64,
    /// Their stored bytes.
    pub bytes_freed: u64,
    /// Files of interrupted writes removed (file:// targets).
    pub staged_removed: u64,
}

/// What deleting a backup did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeleteReport {
    /// The deleted backup.
    pub id: String,
    /// The garbage collection that followed.
    pub gc: GcReport,
}

impl Target {
    /// Reads and checks the manifest at `key`.
    pub(crate) async fn read_manifest_at(&self, key: &Path) -> Result<Manifest> {
        let bytes = self.get(key).await?;
        let m = Manifest::decode(&bytes).map_err(|reason| BackupError::CorruptManifest {
            key: key.to_string(),
            reason,
        })?;
        if layout::parse_manifest(key).is_none_or(|(v, id)| v != m.volume || id != m.id) {
            return Err(BackupError::CorruptManifest {
                key: key.to_string(),
                reason: format!("holds backup {}/{}", m.volume, m.id),
            });
        }
        Ok(m)
    }

    /// Every manifest key, with its (volume, id).
    async fn manifest_keys(&self) -> Result<Vec<(Path, String, String)>> {
        Ok(self
            .list(layout::VOLUMES)
            .await?
            .into_iter()
            .filter_map(|m| layout::parse_manifest(&m.location).map(|(v, id)| (m.location, v, id)))
            .collect())
    }

    async fn manifest_key(&self, id: &str) -> Result<Path> {
        check_name("backup id", id).map_err(|e| BackupError::invalid("backup id", id, e))?;
        self.manifest_keys()
            .await?
            .into_iter()
            .find(|(_, _, i)| i == id)
            .map(|(k, _, _)| k)
            .ok_or_else(|| BackupError::BackupNotFound(id.to_owned()))
    }

    /// The full manifest of backup `id`.
    pub async fn read_manifest(&self, id: &str) -> Result<Manifest> {
        let key = self.manifest_key(id).await?;
        match self.read_manifest_at(&key).await {
            Err(BackupError::Store {
                error: object_store::Error::NotFound { .. },
                ..
            }) => Err(BackupError::BackupNotFound(id.to_owned())),
            other => other,
        }
    }

    /// Backups in the target (of one volume, or all), oldest first.
    pub async fn list_backups(&self, volume: Option<&str>) -> Result<Vec<BackupSummary>> {
        let prefix = match volume {
            Some(v) => {
                check_name("volume", v).map_err(|e| BackupError::invalid("volume", v, e))?;
                layout::manifests_of(v)
            }
            None => layout::VOLUMES.to_owned(),
        };
        let keys: Vec<Path> = self
            .list(&prefix)
            .await?
            .into_iter()
            .filter(|m| layout::parse_manifest(&m.location).is_some())
            .map(|m| m.location)
            .collect();
        let mut out: Vec<BackupSummary> = futures::stream::iter(keys)
            .map(|k| async move {
                match self.read_manifest_at(&k).await {
                    Ok(m) => Ok(Some(BackupSummary::from(&m))),
                    // Deleted since the listing.
                    Err(BackupError::Store {
                        error: object_store::Error::NotFound { .. },
                        ..
                    }) => Ok(None),
                    Err(e) => Err(e),
                }
            })
            .buffer_unordered(self.concurrency())
            .try_filter_map(|x| async move { Ok(x) })
            .try_collect()
            .await?;
        out.sort_by(|a, b| (a.created_unix_ms, &a.id).cmp(&(b.created_unix_ms, &b.id)));
        Ok(out)
    }

    /// Every stored block's hash.
    pub async fn list_blocks(&self) -> Result<Vec<BlockHash>> {
        Ok(self
            .list(layout::BLOCKS)
            .await?
            .iter()
            .filter_map(|m| layout::block_hash(&m.location))
            .collect())
    }

    /// Deletes backup `id`, then removes the blocks no remaining backup references.
    pub async fn delete_backup(&self, id: &str, cancel: CancellationToken) -> Result<DeleteReport> {
        let span = info_span!("backup_delete", id, target = %self.url());
        async move {
            let key = self.manifest_key(id).await?;
            let lease =
                Lease::acquire(self, LockKind::Gc, &format!("delete {id}"), &cancel).await?;
            let r = async {
                lease.check()?;
                self.delete(&key).await?;
                self.gc_locked(&lease).await
            }
            .await;
            lease.release().await;
            let gc = r?;
            info!(deleted_blocks = gc.blocks_deleted, "backup deleted");
            Ok(DeleteReport {
                id: id.to_owned(),
                gc,
            })
        }
        .instrument(span)
        .await
    }

    /// Removes every block no manifest references (and leftovers of interrupted writes).
    pub async fn gc(&self, cancel: CancellationToken) -> Result<GcReport> {
        let lease = Lease::acquire(self, LockKind::Gc, "gc", &cancel).await?;
        let r = self.gc_locked(&lease).await;
        lease.release().await;
        r
    }

    async fn gc_locked(&self, lease: &Lease) -> Result<GcReport> {
        let mut report = GcReport::default();
        let keys = self.manifest_keys().await?;
        report.manifests = keys.len() as u64;
        // Any manifest we cannot read might reference anything: then delete nothing.
        let referenced: HashSet<BlockHash> = futures::stream::iter(keys)
            .map(|(k, _, _)| async move { self.read_manifest_at(&k).await })
            .buffer_unordered(self.concurrency())
            .try_fold(HashSet::new(), |mut set, m| async move {
                set.extend(m.blocks.iter().map(|b| b.1));
                Ok(set)
            })
            .await?;
        report.blocks_kept = referenced.len() as u64;
        let garbage: Vec<(Path, u64)> = self
            .list(layout::BLOCKS)
            .await?
            .into_iter()
            .filter(|m| layout::block_hash(&m.location).is_none_or(|h| !referenced.contains(&h)))
            .map(|m| (m.location, m.size))
            .collect();
        for chunk in garbage.chunks(256) {
            lease.check()?;
            futures::stream::iter(chunk.iter().cloned())
                .map(|(k, _)| async move { self.delete(&k).await })
                .buffer_unordered(self.concurrency())
                .try_collect::<()>()
                .await?;
            report.blocks_deleted += chunk.len() as u64;
            report.bytes_freed += chunk.iter().map(|(_, n)| n).sum::<u64>();
        }
        lease.check()?;
        report.staged_removed = self.remove_staged_files(layout::BLOCKS);
        Ok(report)
    }
}
