//! A replica's side of backups: reading one frozen snapshot of a replica directory as an
//! [`ironhorn_backup::SnapshotSource`], and restoring a backup into a new replica directory
//! as an [`ironhorn_backup::RestoreSink`].
//!
//! [`ReplicaSnapshot`] opens the layer files of the snapshot's chain itself (it does not go
//! through [`Store`]), so it works on a stopped replica and beside a running one: frozen
//! layers are only changed by a purge, which merges a removed snapshot into its child
//! without changing what any remaining snapshot reads, and a file deleted meanwhile stays
//! readable through the descriptor opened here.

use std::collections::BTreeMap;
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use ironhorn_backup::{RestoreSink, SnapshotId, SnapshotSource};
use rangemap::{RangeMap, RangeSet};

use crate::layer_file::LayerFile;
use crate::meta::{self, LayerId, Meta};
use crate::store::{BLOCK_SIZE, Store};

/// Label put on the snapshot of a restored replica: the backup it came from.
pub const RESTORED_FROM_LABEL: &str = "ironhorn.io/restored-from";

fn other(msg: String) -> io::Error {
    io::Error::other(msg)
}

/// One frozen snapshot of a replica directory, readable as the snapshot sees the volume.
pub struct ReplicaSnapshot {
    id: SnapshotId,
    size: u64,
    /// Layers of the chain, root first, ending with the snapshot.
    chain: Vec<(LayerId, String, i64, RangeSet<u64>)>,
    files: Vec<LayerFile>,
    /// Block range -> index into `chain` of the newest layer holding it.
    map: RangeMap<u64, usize>,
}

impl std::fmt::Debug for ReplicaSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaSnapshot")
            .field("id", &self.id)
            .finish()
    }
}

impl ReplicaSnapshot {
    /// Opens snapshot `name` of the replica in `dir`.
    pub fn open(dir: &Path, name: &str) -> io::Result<ReplicaSnapshot> {
        let meta = Meta::load(dir)
            .map_err(|e| other(e.to_string()))?
            .ok_or_else(|| other(format!("{} holds no replica", dir.display())))?;
        let layer = meta
            .by_name(name)
            .ok_or_else(|| other(format!("snapshot {name:?} not found in {}", dir.display())))?;
        if layer.id == meta.head {
            return Err(other(format!(
                "{name:?} is the volume head, not a snapshot"
            )));
        }
        if meta.rebuilding {
            return Err(other(format!(
                "replica {} is being rebuilt; back up from a healthy replica",
                dir.display()
            )));
        }
        let id = SnapshotId {
            name: name.to_owned(),
            created_unix_ms: layer.created_unix_ms,
        };
        let mut chain = Vec::new();
        let mut files = Vec::new();
        let mut map = RangeMap::new();
        for (pos, lid) in meta.chain_to(layer.id).into_iter().enumerate() {
            let l = meta
                .layer(lid)
                .ok_or_else(|| other(format!("layer {lid} missing from metadata")))?;
            let f =
                LayerFile::open(&meta::layer_path(dir, lid)).map_err(|e| other(e.to_string()))?;
            let mut set = RangeSet::new();
            f.for_each_extent(|s, e| {
                let r = s / BLOCK_SIZE..e.div_ceil(BLOCK_SIZE);
                if !r.is_empty() {
                    set.insert(r);
                }
            })
            .map_err(|e| other(e.to_string()))?;
            for r in set.iter() {
                map.insert(r.clone(), pos);
            }
            chain.push((lid, l.name.clone(), l.created_unix_ms, set));
            files.push(f);
        }
        Ok(ReplicaSnapshot {
            id,
            size: meta.size,
            chain,
            files,
            map,
        })
    }

    fn to_bytes(&self, set: &RangeSet<u64>) -> Vec<Range<u64>> {
        set.iter()
            .map(|r| (r.start * BLOCK_SIZE).min(self.size)..(r.end * BLOCK_SIZE).min(self.size))
            .filter(|r| !r.is_empty())
            .collect()
    }
}

impl SnapshotSource for ReplicaSnapshot {
    fn id(&self) -> SnapshotId {
        self.id.clone()
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn allocated(&self) -> io::Result<Vec<Range<u64>>> {
        let mut all = RangeSet::new();
        for r in self.map.iter().map(|(r, _)| r.clone()) {
            all.insert(r);
        }
        Ok(self.to_bytes(&all))
    }

    fn changed_since(&self, base: &SnapshotId) -> io::Result<Option<Vec<Range<u64>>>> {
        let Some(pos) = self.chain.iter().position(|(_, name, created, _)| {
            *name == base.name && *created == base.created_unix_ms
        }) else {
            return Ok(None);
        };
        let mut changed = RangeSet::new();
        for (_, _, _, set) in &self.chain[pos + 1..] {
            for r in set.iter() {
                changed.insert(r.clone());
            }
        }
        Ok(Some(self.to_bytes(&changed)))
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let end = offset + buf.len() as u64;
        if end > self.size {
            return Err(other(format!(
                "read {offset}+{} beyond the volume size {}",
                buf.len(),
                self.size
            )));
        }
        buf.fill(0);
        let blocks = offset / BLOCK_SIZE..end.div_ceil(BLOCK_SIZE);
        for (r, pos) in self.map.overlapping(&blocks) {
            let s = (r.start * BLOCK_SIZE).max(offset);
            let e = (r.end * BLOCK_SIZE).min(end);
            if s >= e {
                continue;
            }
            let dst = &mut buf[(s - offset) as usize..(e - offset) as usize];
            self.files[*pos]
                .read_at(dst, s)
                .map_err(|e| other(e.to_string()))?;
        }
        Ok(())
    }
}

/// A new replica directory being filled by a restore.
///
/// The replica is built in a hidden sibling directory (`.<name>.restoring`) and renamed to
/// its final name only when complete, with the backup's snapshot taken; a restore that
/// fails or is killed leaves no replica at the destination (a leftover `.restoring`
/// directory is removed by the next restore to the same place).
pub struct ReplicaRestore {
    dest: PathBuf,
    tmp: PathBuf,
    /// Taken away (write lock) at commit or abort; writes share the read lock.
    store: RwLock<Option<Store>>,
    backup_id: String,
}

impl std::fmt::Debug for ReplicaRestore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaRestore")
            .field("dest", &self.dest)
            .finish()
    }
}

impl ReplicaRestore {
    /// Prepares a restore of a `size`-byte volume (backup `backup_id`) into `dest`, which
    /// must not exist or be an empty directory.
    pub fn create(dest: &Path, size: u64, backup_id: &str) -> io::Result<ReplicaRestore> {
        if let Ok(mut rd) = std::fs::read_dir(dest)
            && rd.next().is_some()
        {
            return Err(other(format!(
                "{} exists and is not empty; restore into a new directory",
                dest.display()
            )));
        }
        if dest.exists() && !dest.is_dir() {
            return Err(other(format!(
                "{} exists and is not a directory",
                dest.display()
            )));
        }
        let name = dest
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| other(format!("{} has no directory name", dest.display())))?;
        let parent = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent)?;
        let tmp = parent.join(format!(".{name}.restoring"));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        let store = Store::create(&tmp, size).map_err(|e| other(e.to_string()))?;
        Ok(ReplicaRestore {
            dest: dest.to_owned(),
            tmp,
            store: RwLock::new(Some(store)),
            backup_id: backup_id.to_owned(),
        })
    }
}

impl RestoreSink for ReplicaRestore {
    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let guard = self.store.read().unwrap_or_else(|p| p.into_inner());
        let store = guard
            .as_ref()
            .ok_or_else(|| other("restore already finished".into()))?;
        store.write(offset, data).map_err(|e| other(e.to_string()))
    }

    fn commit(&self, snapshot: &str, labels: &BTreeMap<String, String>) -> io::Result<()> {
        let store = self
            .store
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .ok_or_else(|| other("restore already finished".into()))?;
        let mut labels = labels.clone();
        labels.insert(RESTORED_FROM_LABEL.into(), self.backup_id.clone());
        store
            .snapshot(snapshot, labels)
            .map_err(|e| other(e.to_string()))?;
        store.flush().map_err(|e| other(e.to_string()))?;
        drop(store);
        if self.dest.exists() {
            // An empty directory: rename(2) replaces it.
            std::fs::remove_dir(&self.dest)?;
        }
        std::fs::rename(&self.tmp, &self.dest)?;
        if let Some(parent) = self.dest.parent() {
            let p = if parent.as_os_str().is_empty() {
                Path::new(".")
            } else {
                parent
            };
            std::fs::File::open(p)?.sync_all()?;
        }
        Ok(())
    }

    fn abort(&self) {
        self.store.write().unwrap_or_else(|p| p.into_inner()).take();
        let _ = std::fs::remove_dir_all(&self.tmp);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    #[test]
    fn snapshot_source_reads_the_snapshot_and_its_changes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::create(dir.path(), 4 << 20).unwrap();
        store.write(0, &pattern(8192, 1)).unwrap();
        store.write(1 << 20, &pattern(4096, 2)).unwrap();
        store.snapshot("s1", BTreeMap::new()).unwrap();
        store.write(4096, &pattern(4096, 3)).unwrap();
        store.write(3 << 20, &pattern(8192, 4)).unwrap();
        store.snapshot("s2", BTreeMap::new()).unwrap();
        // Written after s2: not part of it.
        store.write(0, &pattern(4096, 5)).unwrap();

        let s2 = ReplicaSnapshot::open(dir.path(), "s2").unwrap();
        assert_eq!(s2.size(), 4 << 20);
        assert_eq!(
            s2.allocated().unwrap(),
            vec![
                0..8192,
                (1 << 20)..(1 << 20) + 4096,
                (3 << 20)..(3 << 20) + 8192
            ]
        );
        let s1_id = ReplicaSnapshot::open(dir.path(), "s1").unwrap().id();
        assert_eq!(
            s2.changed_since(&s1_id).unwrap(),
            Some(vec![4096..8192, (3 << 20)..(3 << 20) + 8192])
        );
        let other = SnapshotId {
            name: "s1".into(),
            created_unix_ms: s1_id.created_unix_ms + 1,
        };
        assert_eq!(
            s2.changed_since(&other).unwrap(),
            None,
            "same name, other snapshot"
        );
        let mut buf = vec![0u8; 8192];
        s2.read_at(0, &mut buf).unwrap();
        assert_eq!(&buf[..4096], &pattern(8192, 1)[..4096]);
        assert_eq!(&buf[4096..], &pattern(4096, 3)[..]);
        let mut hole = vec![1u8; 4096];
        s2.read_at(2 << 20, &mut hole).unwrap();
        assert!(hole.iter().all(|b| *b == 0));
        assert!(ReplicaSnapshot::open(dir.path(), "volume-head").is_err());
        assert!(ReplicaSnapshot::open(dir.path(), "nope").is_err());

        // s1 removed and purged into s2: s2 reads the same, but no longer diffs against s1.
        store.remove_snapshot("s1").unwrap();
        store.purge().unwrap();
        let again = ReplicaSnapshot::open(dir.path(), "s2").unwrap();
        assert_eq!(again.changed_since(&s1_id).unwrap(), None);
        let mut after = vec![0u8; 8192];
        again.read_at(0, &mut after).unwrap();
        assert_eq!(after, buf);
    }

    #[test]
    fn restore_is_invisible_until_committed() {
        let parent = tempfile::tempdir().unwrap();
        let dest = parent.path().join("r");
        let r = ReplicaRestore::create(&dest, 1 << 20, "bk-1").unwrap();
        r.write_at(4096, &pattern(4096, 9)).unwrap();
        assert!(!dest.exists());
        r.abort();
        assert!(!dest.exists());
        assert!(!parent.path().join(".r.restoring").exists());

        let r = ReplicaRestore::create(&dest, 1 << 20, "bk-2").unwrap();
        r.write_at(4096, &pattern(4096, 9)).unwrap();
        r.commit("snap", &BTreeMap::new()).unwrap();
        let s = Store::open(&dest).unwrap();
        let snap = s.layers().into_iter().find(|l| l.name == "snap").unwrap();
        assert_eq!(
            snap.labels.get(RESTORED_FROM_LABEL).map(String::as_str),
            Some("bk-2")
        );
        let mut buf = vec![0u8; 8192];
        s.read(0, &mut buf).unwrap();
        assert!(buf[..4096].iter().all(|b| *b == 0));
        assert_eq!(&buf[4096..], &pattern(4096, 9)[..]);
        // A non-empty destination is refused.
        assert!(ReplicaRestore::create(&dest, 1 << 20, "bk-3").is_err());
    }
}
