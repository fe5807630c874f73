//! The replica's metadata file: volume size, epoch, and the layer tree.
//!
//! The file is JSON followed by a line `#crc32=XXXXXXXX` over the JSON bytes. It is replaced
//! atomically (write a temp file, fsync it, rename it over the old one, fsync the directory),
//! so a crash leaves either the old or the new version, never a torn one.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Result, StoreError};

/// Name of the metadata file inside a replica directory.
pub const META_FILE: &str = "replica.json";
/// Format version written into the metadata; a newer one is refused.
pub const META_FORMAT: u32 = 1;
/// Name the head layer is shown with.
pub const HEAD_NAME: &str = "volume-head";
/// Marker of the checksum line that ends the metadata file.
const CRC_TRAILER: &[u8] = b"#crc32=";

/// Numeric id of a layer; its data lives in `layer-<id>.img`.
pub type LayerId = u64;

/// One layer: a frozen snapshot or the writable head.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerMeta {
    /// File id.
    pub id: LayerId,
    /// User-visible name (`volume-head` for the head).
    pub name: String,
    /// Parent layer, `None` for a root.
    pub parent: Option<LayerId>,
    /// Creation time in milliseconds since the Unix epoch.
    pub created_unix_ms: i64,
    /// User labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Marked removed; merged into its child by the next purge.
    #[serde(default)]
    pub removed: bool,
}

/// The whole metadata of a replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// Format version ([`META_FORMAT`]).
    pub format: u32,
    /// Volume size in bytes.
    pub size: u64,
    /// Block size in bytes.
    pub block_size: u64,
    /// Fencing generation; only ever raised.
    pub epoch: u64,
    /// The writable layer.
    pub head: LayerId,
    /// Next unused layer id.
    pub next_id: LayerId,
    /// Every layer, the head included.
    pub layers: Vec<LayerMeta>,
    /// Set while a rebuild fills this replica's snapshot chain; such a replica must not be
    /// trusted for reads.
    #[serde(default)]
    pub rebuilding: bool,
}

impl Meta {
    /// The layer with this id.
    pub fn layer(&self, id: LayerId) -> Option<&LayerMeta> {
        self.layers.iter().find(|l| l.id == id)
    }

    /// The layer with this id, mutable.
    pub fn layer_mut(&mut self, id: LayerId) -> Option<&mut LayerMeta> {
        self.layers.iter_mut().find(|l| l.id == id)
    }

    /// The layer with this user-visible name.
    pub fn by_name(&self, name: &str) -> Option<&LayerMeta> {
        self.layers.iter().find(|l| l.name == name)
    }

    /// Ids of the layers whose parent is `id`.
    pub fn children(&self, id: LayerId) -> Vec<LayerId> {
        self.layers
            .iter()
            .filter(|l| l.parent == Some(id))
            .map(|l| l.id)
            .collect()
    }

    /// Ids from the root of the tree down to `id` (inclusive).
    pub fn chain_to(&self, id: LayerId) -> Vec<LayerId> {
        let mut chain = Vec::new();
        let mut cur = Some(id);
        while let Some(c) = cur {
            chain.push(c);
            cur = self.layer(c).and_then(|l| l.parent);
            if chain.len() > self.layers.len() {
                break; // a cycle; validate() refuses those
            }
        }
        chain.reverse();
        chain
    }

    /// Checks the structural rules: unique ids and names, parents exist, no cycles, the head
    /// exists, ids below `next_id`.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.format > META_FORMAT {
            return Err(format!(
                "format {} is newer than {}",
                self.format, META_FORMAT
            ));
        }
        if self.block_size != crate::store::BLOCK_SIZE {
            return Err(format!("block size {} unsupported", self.block_size));
        }
        let mut ids = std::collections::HashSet::new();
        let mut names = std::collections::HashSet::new();
        for l in &self.layers {
            if !ids.insert(l.id) {
                return Err(format!("duplicate layer id {}", l.id));
            }
            if !names.insert(l.name.as_str()) {
                return Err(format!("duplicate layer name {:?}", l.name));
            }
            if l.id >= self.next_id {
                return Err(format!(
                    "layer id {} not below next_id {}",
                    l.id, self.next_id
                ));
            }
        }
        for l in &self.layers {
            if let Some(p) = l.parent
                && !ids.contains(&p)
            {
                return Err(format!("layer {} has missing parent {}", l.id, p));
            }
            let chain = self.chain_to(l.id);
            if chain.len() > self.layers.len()
                || chain
                    .first()
                    .and_then(|r| self.layer(*r))
                    .is_some_and(|r| r.parent.is_some())
            {
                return Err(format!("layer {} is in a parent cycle", l.id));
            }
        }
        if self.layer(self.head).is_none() {
            return Err(format!("head layer {} missing", self.head));
        }
        if !self.children(self.head).is_empty() {
            return Err("head layer has children".into());
        }
        Ok(())
    }

    /// Reads and checks the metadata file of `dir`. `Ok(None)` when there is none.
    pub fn load(dir: &Path) -> Result<Option<Meta>> {
        let path = dir.join(META_FILE);
        let text = match fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StoreError::io("read metadata", path, e)),
        };
        let corrupt = |reason: String| StoreError::CorruptMetadata {
            path: path.clone(),
            reason,
        };
        let split = text
            .windows(CRC_TRAILER.len())
            .rposition(|w| w == CRC_TRAILER)
            .ok_or_else(|| corrupt("no #crc32= trailer".into()))?;
        let (body, trailer) = text.split_at(split);
        let trailer = std::str::from_utf8(&trailer[CRC_TRAILER.len()..])
            .map_err(|_| corrupt("trailer is not UTF-8".into()))?
            .trim();
        let want = u32::from_str_radix(trailer, 16)
            .map_err(|_| corrupt(format!("bad crc trailer {trailer:?}")))?;
        let got = crc32fast::hash(body);
        if want != got {
            return Err(corrupt(format!("crc32 {got:08x} != recorded {want:08x}")));
        }
        let meta: Meta =
            serde_json::from_slice(body).map_err(|e| corrupt(format!("bad JSON: {e}")))?;
        meta.validate().map_err(corrupt)?;
        Ok(Some(meta))
    }

    /// Writes the metadata atomically into `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        crate::failpoint!("meta::save::before");
        let mut body =
            serde_json::to_vec_pretty(self).map_err(|e| StoreError::CorruptMetadata {
                path: dir.join(META_FILE),
                reason: format!("cannot serialise: {e}"),
            })?;
        body.push(b'\n');
        let crc = crc32fast::hash(&body);
        body.extend_from_slice(CRC_TRAILER);
        body.extend_from_slice(format!("{crc:08x}\n").as_bytes());
        let tmp = dir.join(format!("{META_FILE}.tmp"));
        let path = dir.join(META_FILE);
        write_file_synced(&tmp, &body)?;
        crate::failpoint!("meta::save::before_rename");
        fs::rename(&tmp, &path).map_err(|e| StoreError::io("rename metadata", &path, e))?;
        sync_dir(dir)?;
        crate::failpoint!("meta::save::after");
        Ok(())
    }
}

/// Writes `data` to a new file at `path` and fsyncs it.
pub fn write_file_synced(path: &Path, data: &[u8]) -> Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|e| StoreError::io("create", path, e))?;
    f.write_all(data)
        .map_err(|e| StoreError::io("write", path, e))?;
    f.sync_all().map_err(|e| StoreError::io("fsync", path, e))
}

/// fsyncs a directory so that renames and creations inside it are durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::io("fsync directory", dir, e))
}

/// Path of a layer's data file.
pub fn layer_path(dir: &Path, id: LayerId) -> PathBuf {
    dir.join(format!("layer-{id:06}.img"))
}

/// Path of a layer's cached chunk checksums.
pub fn checksum_path(dir: &Path, id: LayerId) -> PathBuf {
    dir.join(format!("layer-{id:06}.crc"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Meta {
        Meta {
            format: META_FORMAT,
            size: 1 << 20,
            block_size: crate::store::BLOCK_SIZE,
            epoch: 3,
            head: 1,
            next_id: 2,
            layers: vec![LayerMeta {
                id: 1,
                name: HEAD_NAME.into(),
                parent: None,
                created_unix_ms: 0,
                labels: BTreeMap::new(),
                removed: false,
            }],
            rebuilding: false,
        }
    }

    #[test]
    fn save_then_load_round_trips() {
        let dir = tempfile::tempdir().expect("tempdir");
        let m = sample();
        m.save(dir.path()).expect("save");
        let back = Meta::load(dir.path()).expect("load").expect("present");
        assert_eq!(back, m);
        assert!(!dir.path().join(format!("{META_FILE}.tmp")).exists());
    }

    #[test]
    fn load_refuses_a_flipped_byte() {
        let dir = tempfile::tempdir().expect("tempdir");
        sample().save(dir.path()).expect("save");
        let path = dir.path().join(META_FILE);
        let mut data = fs::read(&path).expect("read");
        let at = data
            .windows(5)
            .position(|w| w == b"epoch")
            .expect("epoch field");
        data[at] = b'E';
        fs::write(&path, &data).expect("write");
        assert!(matches!(
            Meta::load(dir.path()),
            Err(StoreError::CorruptMetadata { .. })
        ));
    }
}
