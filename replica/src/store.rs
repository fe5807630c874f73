//! The layered sparse-file block store of one replica (DESIGN.md §3 "Replica store").
//!
//! A replica directory holds `replica.json` (see [`crate::meta`]) and one sparse file per
//! layer. Layers form a tree of frozen snapshots with one writable head. Reads go, block by
//! block, to the newest layer on the head's chain that holds the block, through the extent
//! [`Index`] built at open time from the files' allocated extents.
//!
//! Locking: `inner` (a `RwLock`) guards the layer structure; I/O holds it shared, structural
//! changes (snapshot, revert, purge steps, expand) hold it exclusive, so they happen between
//! whole requests. The index inside has its own short mutex. `rmw` serialises the
//! read-modify-write of partial blocks; `ctl` serialises control operations with each other.
//! `session` numbers data sessions (see [`Store::enter_session`]); it is taken before the
//! others.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use rangemap::RangeSet;
use tracing::{debug, info, warn};

use crate::checksum::{self, ChunkSums};
use crate::error::{Result, StoreError};
use crate::index::{Index, IndexStats, Segment};
use crate::layer_file::LayerFile;
use crate::meta::{self, HEAD_NAME, LayerId, LayerMeta, META_FORMAT, Meta};

/// Unit of allocation and of the index, in bytes.
pub const BLOCK_SIZE: u64 = 4096;
/// Alignment every I/O must have, in bytes.
pub const SECTOR_SIZE: u64 = 512;
/// Unit of checksums and of rebuild transfers, in bytes.
pub const CHUNK_SIZE: u64 = 1 << 20;
/// Largest volume the store accepts (the host file system may allow less: ext4 files end at
/// 16 TiB − 4 KiB).
pub const MAX_VOLUME_SIZE: u64 = 1 << 50;
/// Longest snapshot name.
pub const MAX_NAME_LEN: usize = 128;

static ZEROS: [u8; CHUNK_SIZE as usize] = [0; CHUNK_SIZE as usize];

/// A layer as shown to users: a snapshot, or the head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerInfo {
    /// Snapshot name, or `volume-head`.
    pub name: String,
    /// Parent snapshot.
    pub parent: Option<String>,
    /// Children (snapshots, or the head).
    pub children: Vec<String>,
    /// Whether this is the writable head.
    pub is_head: bool,
    /// Marked removed, waiting for a purge.
    pub removed: bool,
    /// Creation (freeze) time, ms since the Unix epoch.
    pub created_unix_ms: i64,
    /// User labels.
    pub labels: BTreeMap<String, String>,
    /// Bytes of data this layer holds.
    pub allocated_bytes: u64,
}

struct Inner {
    meta: Meta,
    files: HashMap<LayerId, Arc<LayerFile>>,
    head: Arc<LayerFile>,
    index: Mutex<Index>,
    /// While a rebuild fills the chain below the head (from `begin_rebuild` to
    /// `finish_sync`), partial-block writes cannot read the rest of their block from below:
    /// the head keeps only the written sectors, remembered here (block -> sector mask), and
    /// `finish_sync` completes those blocks from the finished chain. The map itself is
    /// `Store::partial_map`.
    partial_active: bool,
}

impl Inner {
    fn head_id(&self) -> LayerId {
        self.meta.head
    }

    fn index(&self) -> MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn file(&self, id: LayerId) -> Result<&Arc<LayerFile>> {
        self.files
            .get(&id)
            .ok_or_else(|| StoreError::SnapshotState {
                name: format!("layer {id}"),
                reason: "layer file is not open".into(),
            })
    }
}

/// One replica's store. Share it as `Arc<Store>`; every method takes `&self`.
pub struct Store {
    dir: PathBuf,
    inner: RwLock<Inner>,
    rmw: Mutex<()>,
    ctl: Mutex<()>,
    sums: Mutex<HashMap<LayerId, Arc<ChunkSums>>>,
    partial_map: Mutex<HashMap<u64, u8>>,
    /// Current data session; [`Store::begin_rebuild`] starts a new one.
    session: RwLock<u64>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("dir", &self.dir).finish()
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Checks a snapshot name: 1..=128 characters of `[A-Za-z0-9._-]`, not the head's name.
pub fn validate_name(name: &str) -> Result<()> {
    let bad = |reason| {
        Err(StoreError::InvalidName {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > MAX_NAME_LEN {
        return bad("longer than 128 characters");
    }
    if name == HEAD_NAME {
        return bad("reserved for the head");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        return bad("only letters, digits, '-', '_' and '.' are allowed");
    }
    Ok(())
}

fn validate_size(size: u64) -> Result<()> {
    let bad = |reason| Err(StoreError::InvalidSize { size, reason });
    if size == 0 {
        return bad("must be greater than zero");
    }
    if !size.is_multiple_of(BLOCK_SIZE) {
        return bad("must be a multiple of 4096");
    }
    if size > MAX_VOLUME_SIZE {
        return bad("larger than 1 PiB");
    }
    Ok(())
}

fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
    {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

/// Block range covering the byte range `[offset, offset + len)`.
fn blocks_of(offset: u64, len: u64) -> Range<u64> {
    offset / BLOCK_SIZE..(offset + len).div_ceil(BLOCK_SIZE)
}

impl Store {
    /// Opens the replica in `dir`, or creates it with `size` bytes when `dir` holds none.
    pub fn open_or_create(dir: &Path, size: Option<u64>) -> Result<Store> {
        match (Meta::load(dir)?, size) {
            (Some(meta), _) => Self::open_meta(dir, meta),
            (None, Some(size)) => Self::create(dir, size),
            (None, None) => Err(StoreError::NotAReplica {
                dir: dir.to_owned(),
            }),
        }
    }

    /// Opens an existing replica.
    pub fn open(dir: &Path) -> Result<Store> {
        Self::open_or_create(dir, None)
    }

    /// Creates a new, empty replica of `size` bytes in `dir` (created if missing).
    pub fn create(dir: &Path, size: u64) -> Result<Store> {
        validate_size(size)?;
        std::fs::create_dir_all(dir).map_err(|e| StoreError::io("create directory", dir, e))?;
        if Meta::load(dir)?.is_some() {
            return Err(StoreError::SnapshotState {
                name: dir.display().to_string(),
                reason: "a replica exists here already".into(),
            });
        }
        let head = 1;
        // A leftover file from an interrupted create is not data of any replica.
        let _ = crate::layer_file::remove_layer_files(&meta::layer_path(dir, head));
        LayerFile::create(&meta::layer_path(dir, head))?;
        let meta = Meta {
            format: META_FORMAT,
            size,
            block_size: BLOCK_SIZE,
            epoch: 0,
            head,
            next_id: head + 1,
            layers: vec![LayerMeta {
                id: head,
                name: HEAD_NAME.into(),
                parent: None,
                created_unix_ms: now_ms(),
                labels: BTreeMap::new(),
                removed: false,
            }],
            rebuilding: false,
        };
        meta::sync_dir(dir)?;
        meta.save(dir)?;
        info!(dir = %dir.display(), size, "created replica");
        Self::open_meta(dir, meta)
    }

    fn open_meta(dir: &Path, meta: Meta) -> Result<Store> {
        raise_fd_limit();
        Self::remove_leftovers(dir, &meta)?;
        let mut files = HashMap::new();
        let mut index = Index::default();
        for l in &meta.layers {
            let f = LayerFile::open(&meta::layer_path(dir, l.id))?;
            let mut set = RangeSet::new();
            f.for_each_extent(|s, e| {
                let r = s / BLOCK_SIZE..e.div_ceil(BLOCK_SIZE);
                if !r.is_empty() {
                    set.insert(r);
                }
            })?;
            index.layers.insert(l.id, set);
            files.insert(l.id, Arc::new(f));
        }
        index.rebuild_chain(meta.chain_to(meta.head));
        let head = files
            .get(&meta.head)
            .cloned()
            .ok_or_else(|| StoreError::CorruptMetadata {
                path: dir.join(meta::META_FILE),
                reason: "head layer has no file".into(),
            })?;
        debug!(dir = %dir.display(), layers = meta.layers.len(), "opened replica");
        Ok(Store {
            dir: dir.to_owned(),
            inner: RwLock::new(Inner {
                meta,
                files,
                head,
                index: Mutex::new(index),
                partial_active: false,
            }),
            rmw: Mutex::new(()),
            ctl: Mutex::new(()),
            sums: Mutex::new(HashMap::new()),
            partial_map: Mutex::new(HashMap::new()),
            session: RwLock::new(0),
        })
    }

    /// Deletes files an interrupted operation left behind: temp files, and layer or checksum
    /// files that the metadata does not list.
    fn remove_leftovers(dir: &Path, meta: &Meta) -> Result<()> {
        let entries =
            std::fs::read_dir(dir).map_err(|e| StoreError::io("list directory", dir, e))?;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let id = name
                .strip_prefix("layer-")
                .and_then(|r| r.split('.').next())
                .and_then(|n| n.parse::<LayerId>().ok());
            let stale =
                name.ends_with(".tmp") || matches!(id, Some(id) if meta.layer(id).is_none());
            if stale {
                warn!(file = name, "removing leftover of an interrupted operation");
                let p = entry.path();
                std::fs::remove_file(&p).map_err(|e| StoreError::io("remove leftover", &p, e))?;
            }
        }
        Ok(())
    }

    fn read_inner(&self) -> RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_inner(&self) -> RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The current data session. A data connection notes it when it opens and runs each
    /// request inside it with [`Store::enter_session`].
    pub fn session(&self) -> u64 {
        *self.session.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Enters data session `session` for one request: while the guard lives,
    /// [`Store::begin_rebuild`] waits. `None` when a rebuild has begun since that session
    /// started: what a connection of an earlier session still sends (requests queued by an
    /// engine that since dropped this replica) must not reach the rebuilt layers, where an
    /// old write would shadow the newer data the rebuild copies below it.
    pub fn enter_session(&self, session: u64) -> Option<RwLockReadGuard<'_, u64>> {
        let guard = self.session.read().unwrap_or_else(|p| p.into_inner());
        (*guard == session).then_some(guard)
    }

    /// The replica's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Volume size in bytes.
    pub fn size(&self) -> u64 {
        self.read_inner().meta.size
    }

    /// The persisted fencing epoch.
    pub fn epoch(&self) -> u64 {
        self.read_inner().meta.epoch
    }

    /// Whether a rebuild is filling this replica's chain.
    pub fn is_rebuilding(&self) -> bool {
        self.read_inner().meta.rebuilding
    }

    /// Name of the head layer.
    pub fn head_name(&self) -> String {
        HEAD_NAME.to_owned()
    }

    /// Number of snapshots (layers other than the head).
    pub fn snapshot_count(&self) -> usize {
        self.read_inner().meta.layers.len() - 1
    }

    /// Bytes of data held by all layers.
    pub fn allocated_bytes(&self) -> u64 {
        let inner = self.read_inner();
        let idx = inner.index();
        idx.layers
            .values()
            .flat_map(|s| s.iter())
            .map(|r| (r.end - r.start) * BLOCK_SIZE)
            .sum()
    }

    /// Size figures of the in-memory index.
    pub fn index_stats(&self) -> IndexStats {
        self.read_inner().index().stats()
    }

    fn check_range(&self, inner: &Inner, offset: u64, length: u64) -> Result<()> {
        let size = inner.meta.size;
        let ok = offset.is_multiple_of(SECTOR_SIZE)
            && length.is_multiple_of(SECTOR_SIZE)
            && offset.checked_add(length).is_some_and(|end| end <= size);
        if ok {
            Ok(())
        } else {
            Err(StoreError::InvalidRange {
                offset,
                length,
                size,
            })
        }
    }

    /// Reads `buf.len()` bytes at `offset` through the head's chain.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let inner = self.read_inner();
        self.check_range(&inner, offset, buf.len() as u64)?;
        Self::read_chain(&inner, offset, buf)
    }

    fn read_chain(inner: &Inner, offset: u64, buf: &mut [u8]) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let mut segs: Vec<Segment> = Vec::with_capacity(4);
        inner
            .index()
            .lookup(blocks_of(offset, buf.len() as u64), &mut segs);
        let end = offset + buf.len() as u64;
        for (blocks, layer) in segs {
            let s = (blocks.start * BLOCK_SIZE).max(offset);
            let e = (blocks.end * BLOCK_SIZE).min(end);
            let dst = &mut buf[(s - offset) as usize..(e - offset) as usize];
            match layer {
                None => dst.fill(0),
                Some(id) => inner.file(id)?.read_at(dst, s)?,
            }
        }
        Ok(())
    }

    /// Writes `data` at `offset` into the head.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        let inner = self.read_inner();
        self.check_range(&inner, offset, data.len() as u64)?;
        self.write_locked(&inner, offset, data)
    }

    fn write_locked(&self, inner: &Inner, offset: u64, data: &[u8]) -> Result<()> {
        let end = offset + data.len() as u64;
        let mut pos = offset;
        while pos < end {
            let block = pos / BLOCK_SIZE;
            let block_end = (block + 1) * BLOCK_SIZE;
            let slice = |s: u64, e: u64| &data[(s - offset) as usize..(e - offset) as usize];
            if !pos.is_multiple_of(BLOCK_SIZE) || end < block_end {
                // A partial block.
                let e = end.min(block_end);
                self.write_partial(inner, block, pos, slice(pos, e))?;
                pos = e;
            } else {
                // A run of whole blocks.
                let e = end - end % BLOCK_SIZE;
                inner.head.write_at(slice(pos, e), pos)?;
                let blocks = pos / BLOCK_SIZE..e / BLOCK_SIZE;
                if inner.partial_active {
                    self.clear_partial(blocks.clone());
                }
                let mut idx = inner.index();
                if !idx.layer_has_all(inner.head_id(), blocks.clone()) {
                    idx.head_written(inner.head_id(), blocks);
                }
                pos = e;
            }
        }
        Ok(())
    }

    /// Writes part of one block. If the head lacks the block, the rest of it comes from the
    /// older layers (read-modify-write), so that the head always holds whole blocks.
    fn write_partial(&self, inner: &Inner, block: u64, pos: u64, data: &[u8]) -> Result<()> {
        let head = inner.head_id();
        let one = block..block + 1;
        if inner.partial_active {
            return self.write_partial_rebuilding(inner, block, pos, data);
        }
        if inner.index().layer_has_all(head, one.clone()) {
            return inner.head.write_at(data, pos);
        }
        let _rmw = lock(&self.rmw);
        if inner.index().layer_has_all(head, one.clone()) {
            return inner.head.write_at(data, pos);
        }
        let mut buf = [0u8; BLOCK_SIZE as usize];
        let start = block * BLOCK_SIZE;
        Self::read_chain(inner, start, &mut buf)?;
        let at = (pos - start) as usize;
        buf[at..at + data.len()].copy_from_slice(data);
        inner.head.write_at(&buf, start)?;
        inner.index().head_written(head, one);
        Ok(())
    }

    fn write_partial_rebuilding(
        &self,
        inner: &Inner,
        block: u64,
        pos: u64,
        data: &[u8],
    ) -> Result<()> {
        let _rmw = lock(&self.rmw);
        let start = block * BLOCK_SIZE;
        let first = ((pos - start) / SECTOR_SIZE) as u32;
        let count = (data.len() as u64 / SECTOR_SIZE) as u32;
        let mask = (((1u32 << count) - 1) << first) as u8;
        let has = inner
            .index()
            .layer_has_all(inner.head_id(), block..block + 1);
        inner.head.write_at(data, pos)?;
        let mut map = lock(&self.partial_map);
        if has {
            if let Some(m) = map.get_mut(&block) {
                *m |= mask;
            }
        } else {
            map.insert(block, mask);
            inner
                .index()
                .head_written(inner.head_id(), block..block + 1);
        }
        Ok(())
    }

    fn clear_partial(&self, blocks: Range<u64>) {
        let mut map = lock(&self.partial_map);
        if map.is_empty() {
            return;
        }
        if (blocks.end - blocks.start) as usize > map.len() {
            map.retain(|b, _| !blocks.contains(b));
        } else {
            for b in blocks {
                map.remove(&b);
            }
        }
    }

    /// Makes `[offset, offset + len)` read as zeros. Blocks that an older layer holds get
    /// zeros written into the head (so that older data never shows through); elsewhere the
    /// head's blocks are deallocated.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let inner = self.read_inner();
        self.check_range(&inner, offset, len)?;
        let end = offset + len;
        let a_start = offset.next_multiple_of(BLOCK_SIZE).min(end);
        let a_end = (end - end % BLOCK_SIZE).max(a_start);
        if offset < a_start {
            self.write_locked(&inner, offset, &ZEROS[..(a_start - offset) as usize])?;
        }
        if a_end < end {
            self.write_locked(&inner, a_end, &ZEROS[..(end - a_end) as usize])?;
        }
        if a_start >= a_end {
            return Ok(());
        }
        let head = inner.head_id();
        let whole = a_start / BLOCK_SIZE..a_end / BLOCK_SIZE;
        let runs = if inner.partial_active {
            // The chain below is incomplete: older data may still arrive there, so zeros
            // are written, never holes.
            self.clear_partial(whole.clone());
            vec![(whole, true)]
        } else {
            inner.index().split_by_lower(whole)
        };
        for (blocks, lower_has) in runs {
            if lower_has {
                let mut b = blocks.start;
                while b < blocks.end {
                    let e = blocks.end.min(b + CHUNK_SIZE / BLOCK_SIZE);
                    inner
                        .head
                        .write_at(&ZEROS[..((e - b) * BLOCK_SIZE) as usize], b * BLOCK_SIZE)?;
                    inner.index().head_written(head, b..e);
                    b = e;
                }
            } else {
                inner.head.punch(
                    blocks.start * BLOCK_SIZE,
                    (blocks.end - blocks.start) * BLOCK_SIZE,
                )?;
                inner.index().head_punched(head, blocks);
            }
        }
        Ok(())
    }

    /// Discards `[offset, offset + len)`: the range reads as zeros afterwards and its space is
    /// freed where no older layer holds data (same effect as [`Store::write_zeroes`]).
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(offset, len)
    }

    /// Allocation of `[offset, offset + len)` through the head's chain: consecutive
    /// (length, hole) pieces, at most 1024 of them (so possibly covering less than `len`).
    pub fn block_status(&self, offset: u64, len: u64) -> Result<Vec<(u64, bool)>> {
        let inner = self.read_inner();
        self.check_range(&inner, offset, len)?;
        let mut segs = Vec::new();
        inner.index().lookup(blocks_of(offset, len), &mut segs);
        let end = offset + len;
        let mut out: Vec<(u64, bool)> = Vec::new();
        for (blocks, layer) in segs {
            let s = (blocks.start * BLOCK_SIZE).max(offset);
            let e = (blocks.end * BLOCK_SIZE).min(end);
            let hole = layer.is_none();
            if let Some((l, h)) = out.last_mut()
                && *h == hole
            {
                *l += e - s;
            } else if out.len() == 1024 {
                break;
            } else {
                out.push((e - s, hole));
            }
        }
        Ok(out)
    }

    /// Makes every write acknowledged so far durable (fdatasync of the head).
    pub fn flush(&self) -> Result<()> {
        let head = self.read_inner().head.clone();
        head.sync_data()
    }

    /// Flushes the head and freezes it as snapshot `name`; a new empty head takes writes.
    pub fn snapshot(&self, name: &str, labels: BTreeMap<String, String>) -> Result<LayerInfo> {
        validate_name(name)?;
        let mut inner = self.write_inner();
        if inner.meta.by_name(name).is_some() {
            return Err(StoreError::SnapshotExists(name.to_owned()));
        }
        inner.head.sync_data()?;
        let old = inner.head_id();
        let new = inner.meta.next_id;
        let path = meta::layer_path(&self.dir, new);
        let file = Arc::new(LayerFile::create(&path)?);
        crate::failpoint!("snapshot::after_create_file");
        let mut m = inner.meta.clone();
        let now = now_ms();
        if let Some(l) = m.layer_mut(old) {
            l.name = name.to_owned();
            l.labels = labels;
            l.created_unix_ms = now;
        }
        m.layers.push(LayerMeta {
            id: new,
            name: HEAD_NAME.into(),
            parent: Some(old),
            created_unix_ms: now,
            labels: BTreeMap::new(),
            removed: false,
        });
        m.head = new;
        m.next_id = new + 1;
        if let Err(e) = meta::sync_dir(&self.dir).and_then(|()| m.save(&self.dir)) {
            let _ = crate::layer_file::remove_layer_files(&path);
            return Err(e);
        }
        inner.meta = m;
        inner.files.insert(new, file.clone());
        inner.head = file;
        {
            let mut idx = inner.index();
            let mut chain = idx.chain.clone();
            chain.push(new);
            let old_set = idx.layers.get(&old).cloned().unwrap_or_default();
            for r in old_set.iter() {
                idx.lower.insert(r.clone());
            }
            idx.layers.insert(new, RangeSet::new());
            idx.chain = chain;
        }
        debug!(snapshot = name, "snapshot created");
        Ok(Self::info_of(&inner, old))
    }

    fn info_of(inner: &Inner, id: LayerId) -> LayerInfo {
        let m = &inner.meta;
        let name_of = |id: LayerId| m.layer(id).map(|l| l.name.clone()).unwrap_or_default();
        let l = m.layer(id);
        let allocated_bytes = inner
            .index()
            .layers
            .get(&id)
            .map(|s| s.iter().map(|r| (r.end - r.start) * BLOCK_SIZE).sum())
            .unwrap_or(0);
        LayerInfo {
            name: name_of(id),
            parent: l.and_then(|l| l.parent).map(name_of),
            children: m.children(id).into_iter().map(name_of).collect(),
            is_head: id == m.head,
            removed: l.is_some_and(|l| l.removed),
            created_unix_ms: l.map(|l| l.created_unix_ms).unwrap_or(0),
            labels: l.map(|l| l.labels.clone()).unwrap_or_default(),
            allocated_bytes,
        }
    }

    /// Every layer (snapshots and the head), in creation order.
    pub fn layers(&self) -> Vec<LayerInfo> {
        let inner = self.read_inner();
        let mut ids: Vec<LayerId> = inner.meta.layers.iter().map(|l| l.id).collect();
        ids.sort_unstable();
        ids.into_iter()
            .map(|id| Self::info_of(&inner, id))
            .collect()
    }

    /// Names of the layers a read looks through, root first, head last.
    pub fn head_chain(&self) -> Vec<String> {
        let inner = self.read_inner();
        let m = &inner.meta;
        m.chain_to(m.head)
            .into_iter()
            .filter_map(|id| m.layer(id).map(|l| l.name.clone()))
            .collect()
    }

    fn snapshot_id(inner: &Inner, name: &str) -> Result<LayerId> {
        match inner.meta.by_name(name) {
            Some(l) if l.id == inner.meta.head => Err(StoreError::SnapshotState {
                name: name.into(),
                reason: "that is the volume head, not a snapshot".into(),
            }),
            Some(l) => Ok(l.id),
            None => Err(StoreError::SnapshotNotFound(name.into())),
        }
    }

    /// Marks snapshot `name` removed. Its data stays in use until [`Store::purge`] merges it
    /// into its child. Removing a removed snapshot again is not an error.
    pub fn remove_snapshot(&self, name: &str) -> Result<()> {
        let _ctl = lock(&self.ctl);
        let mut inner = self.write_inner();
        let id = Self::snapshot_id(&inner, name)?;
        if inner.meta.layer(id).is_some_and(|l| l.removed) {
            return Ok(());
        }
        let mut m = inner.meta.clone();
        if let Some(l) = m.layer_mut(id) {
            l.removed = true;
        }
        m.save(&self.dir)?;
        inner.meta = m;
        Ok(())
    }

    /// Merges every removed snapshot into its only child (or deletes it when it has none).
    /// Snapshots with several children stay until only one is left. Writes continue while
    /// data is copied; each copied chunk briefly excludes I/O. Returns the purged names.
    pub fn purge(&self) -> Result<Vec<String>> {
        let _ctl = lock(&self.ctl);
        let mut purged = Vec::new();
        loop {
            let next = {
                let inner = self.read_inner();
                inner
                    .meta
                    .layers
                    .iter()
                    .filter(|l| l.removed && l.id != inner.meta.head)
                    .map(|l| (l.id, l.name.clone(), inner.meta.children(l.id)))
                    .find(|(_, _, c)| c.len() <= 1)
            };
            let Some((id, name, children)) = next else {
                break;
            };
            match children.first() {
                None => self.delete_leaf(id)?,
                Some(&child) => self.merge_into_child(id, child)?,
            }
            purged.push(name);
        }
        Ok(purged)
    }

    fn forget_sums(&self, id: LayerId) {
        lock(&self.sums).remove(&id);
        let _ = std::fs::remove_file(meta::checksum_path(&self.dir, id));
    }

    fn delete_leaf(&self, id: LayerId) -> Result<()> {
        let mut inner = self.write_inner();
        let mut m = inner.meta.clone();
        m.layers.retain(|l| l.id != id);
        m.save(&self.dir)?;
        inner.meta = m;
        inner.files.remove(&id);
        inner.index().layers.remove(&id);
        drop(inner);
        self.forget_sums(id);
        let p = meta::layer_path(&self.dir, id);
        crate::layer_file::remove_layer_files(&p)
    }

    /// One step of a merge: copies into `child` the blocks of `blocks` (all held by `parent`)
    /// that `child` lacks. The caller holds `inner` exclusively.
    fn copy_missing(
        inner: &Inner,
        parent: LayerId,
        child: LayerId,
        blocks: Range<u64>,
        buf: &mut [u8],
    ) -> Result<()> {
        let (src, dst) = (inner.file(parent)?, inner.file(child)?);
        let missing: Vec<Range<u64>> = {
            let idx = inner.index();
            match idx.layers.get(&child) {
                Some(set) => set.gaps(&blocks).collect(),
                None => std::iter::once(blocks).collect(),
            }
        };
        for m in missing {
            let len = ((m.end - m.start) * BLOCK_SIZE) as usize;
            src.read_at(&mut buf[..len], m.start * BLOCK_SIZE)?;
            dst.write_at(&buf[..len], m.start * BLOCK_SIZE)?;
            let mut idx = inner.index();
            idx.layers.entry(child).or_default().insert(m.clone());
            // Reads of these blocks went to the parent. They must go to the child from now
            // on: the child holds them, so a write into it (when it is the head) no longer
            // updates the read map, and would stay unseen until the merge commits.
            let to_child: Vec<Range<u64>> = idx
                .merged
                .overlapping(&m)
                .filter(|(_, l)| **l == parent)
                .map(|(r, _)| r.start.max(m.start)..r.end.min(m.end))
                .collect();
            for r in to_child {
                idx.merged.insert(r, child);
            }
        }
        Ok(())
    }

    fn merge_into_child(&self, id: LayerId, child: LayerId) -> Result<()> {
        // The child's content changes: its cached checksums go first.
        self.forget_sums(child);
        let parent_set = self
            .read_inner()
            .index()
            .layers
            .get(&id)
            .cloned()
            .unwrap_or_default();
        let per_chunk = CHUNK_SIZE / BLOCK_SIZE;
        let mut buf = vec![0u8; CHUNK_SIZE as usize];
        for run in parent_set.iter() {
            let mut b = run.start;
            while b < run.end {
                let e = run.end.min((b / per_chunk + 1) * per_chunk);
                // Exclusive: no write to the child can interleave with this copy.
                let inner = self.write_inner();
                Self::copy_missing(&inner, id, child, b..e, &mut buf)?;
                drop(inner);
                b = e;
            }
        }
        let dst = self.read_inner().file(child)?.clone();
        dst.sync_data()?;
        crate::failpoint!("purge::after_copy");
        let mut inner = self.write_inner();
        let mut m = inner.meta.clone();
        let grandparent = m.layer(id).and_then(|l| l.parent);
        if let Some(c) = m.layer_mut(child) {
            c.parent = grandparent;
        }
        m.layers.retain(|l| l.id != id);
        m.save(&self.dir)?;
        inner.meta = m;
        inner.files.remove(&id);
        let chain = inner.meta.chain_to(inner.meta.head);
        {
            let mut idx = inner.index();
            idx.layers.remove(&id);
            idx.rebuild_chain(chain);
        }
        drop(inner);
        self.forget_sums(id);
        let p = meta::layer_path(&self.dir, id);
        crate::layer_file::remove_layer_files(&p)?;
        crate::failpoint!("purge::after_commit");
        Ok(())
    }

    /// Discards the head: a new empty head on `parent` (metadata saved first; on failure
    /// nothing changes), optionally marking the replica rebuilding. Returns the old head's
    /// id, whose files the caller removes after releasing `inner`.
    fn replace_head(
        &self,
        inner: &mut Inner,
        parent: Option<LayerId>,
        rebuilding: bool,
        failpoint: &'static str,
    ) -> Result<LayerId> {
        let _ = failpoint;
        let old = inner.head_id();
        let new = inner.meta.next_id;
        let path = meta::layer_path(&self.dir, new);
        let file = Arc::new(LayerFile::create(&path)?);
        let mut m = inner.meta.clone();
        m.layers.retain(|l| l.id != old);
        m.layers.push(LayerMeta {
            id: new,
            name: HEAD_NAME.into(),
            parent,
            created_unix_ms: now_ms(),
            labels: BTreeMap::new(),
            removed: false,
        });
        m.head = new;
        m.next_id = new + 1;
        m.rebuilding |= rebuilding;
        crate::failpoint!(failpoint);
        if let Err(e) = meta::sync_dir(&self.dir).and_then(|()| m.save(&self.dir)) {
            let _ = crate::layer_file::remove_layer_files(&path);
            return Err(e);
        }
        inner.meta = m;
        inner.files.remove(&old);
        inner.files.insert(new, file.clone());
        inner.head = file;
        let chain = inner.meta.chain_to(new);
        let mut idx = inner.index();
        idx.layers.remove(&old);
        idx.layers.insert(new, RangeSet::new());
        idx.rebuild_chain(chain);
        Ok(old)
    }

    /// Starts a new empty head on snapshot `name`. The old head's data is discarded; the
    /// snapshots after `name` stay as a branch of the tree.
    pub fn revert(&self, name: &str) -> Result<()> {
        let _ctl = lock(&self.ctl);
        let mut inner = self.write_inner();
        let target = Self::snapshot_id(&inner, name)?;
        if inner.meta.layer(target).is_some_and(|l| l.removed) {
            return Err(StoreError::SnapshotState {
                name: name.into(),
                reason: "snapshot is removed".into(),
            });
        }
        let old = self.replace_head(&mut inner, Some(target), false, "revert::before_save")?;
        drop(inner);
        crate::layer_file::remove_layer_files(&meta::layer_path(&self.dir, old))?;
        info!(snapshot = name, "reverted");
        Ok(())
    }

    /// Grows the volume to `size` bytes. The same size is a no-op; a smaller one is refused.
    pub fn expand(&self, size: u64) -> Result<()> {
        validate_size(size)?;
        let _ctl = lock(&self.ctl);
        let mut inner = self.write_inner();
        if size < inner.meta.size {
            return Err(StoreError::InvalidSize {
                size,
                reason: "smaller than the current size; volumes do not shrink",
            });
        }
        if size == inner.meta.size {
            return Ok(());
        }
        let mut m = inner.meta.clone();
        m.size = size;
        crate::failpoint!("expand::before_save");
        m.save(&self.dir)?;
        inner.meta = m;
        info!(size, "expanded");
        Ok(())
    }

    /// Raises the persisted epoch. Equal is a no-op; lower is refused.
    pub fn set_epoch(&self, epoch: u64) -> Result<()> {
        let _ctl = lock(&self.ctl);
        let mut inner = self.write_inner();
        let current = inner.meta.epoch;
        if epoch < current {
            return Err(StoreError::EpochLowered {
                requested: epoch,
                current,
            });
        }
        if epoch == current {
            return Ok(());
        }
        let mut m = inner.meta.clone();
        m.epoch = epoch;
        m.save(&self.dir)?;
        inner.meta = m;
        Ok(())
    }

    fn layer_id(inner: &Inner, name: &str) -> Result<LayerId> {
        inner
            .meta
            .by_name(name)
            .map(|l| l.id)
            .ok_or_else(|| StoreError::SnapshotNotFound(name.into()))
    }

    /// crc32 per chunk of layer `layer` (see [`crate::checksum`]). For a frozen layer they are
    /// computed on first use, then cached in memory and in `layer-N.crc`; for the head they
    /// are computed on every call.
    pub fn checksums(&self, layer: &str) -> Result<Arc<ChunkSums>> {
        let _ctl = lock(&self.ctl);
        let (id, file, set) = {
            let inner = self.read_inner();
            let id = Self::layer_id(&inner, layer)?;
            let set = inner.index().layers.get(&id).cloned().unwrap_or_default();
            if id == inner.meta.head {
                // The head changes with every write: its sums are computed, never cached.
                return Ok(Arc::new(checksum::compute(inner.file(id)?, &set)?));
            }
            (id, inner.file(id)?.clone(), set)
        };
        if let Some(s) = lock(&self.sums).get(&id) {
            return Ok(s.clone());
        }
        let path = meta::checksum_path(&self.dir, id);
        let sums = match checksum::load(&path) {
            Some(s) => s,
            None => {
                let s = checksum::compute(&file, &set)?;
                checksum::save(&path, &s)?;
                s
            }
        };
        let sums = Arc::new(sums);
        lock(&self.sums).insert(id, sums.clone());
        Ok(sums)
    }

    /// The runs of blocks that layer `layer` holds inside chunk `chunk`: (byte offset, data).
    pub fn read_chunk(&self, layer: &str, chunk: u64) -> Result<Vec<(u64, Bytes)>> {
        let inner = self.read_inner();
        let id = Self::layer_id(&inner, layer)?;
        let per_chunk = CHUNK_SIZE / BLOCK_SIZE;
        let range = chunk * per_chunk..(chunk + 1) * per_chunk;
        let runs: Vec<Range<u64>> = inner
            .index()
            .layers
            .get(&id)
            .map(|s| {
                s.overlapping(&range)
                    .map(|r| r.start.max(range.start)..r.end.min(range.end))
                    .collect()
            })
            .unwrap_or_default();
        let file = inner.file(id)?;
        runs.into_iter()
            .map(|r| {
                let mut buf = vec![0u8; ((r.end - r.start) * BLOCK_SIZE) as usize];
                file.read_at(&mut buf, r.start * BLOCK_SIZE)?;
                Ok((r.start * BLOCK_SIZE, Bytes::from(buf)))
            })
            .collect()
    }

    /// Starts a rebuild: the head is replaced by a new empty one with no parent (its data is
    /// stale), the replica is marked rebuilding, and partial-block writes are tracked until
    /// [`Store::finish_sync`]. Existing snapshots stay, detached, so a sync can reuse them.
    /// A new data session starts: data connections opened before are refused from now on.
    pub fn begin_rebuild(&self) -> Result<()> {
        let mut session = self.session.write().unwrap_or_else(|p| p.into_inner());
        *session += 1;
        let _ctl = lock(&self.ctl);
        let mut inner = self.write_inner();
        let old = self.replace_head(&mut inner, None, true, "begin_rebuild::before_save")?;
        inner.partial_active = true;
        lock(&self.partial_map).clear();
        drop(inner);
        crate::layer_file::remove_layer_files(&meta::layer_path(&self.dir, old))?;
        info!(dir = %self.dir.display(), "rebuild started: head discarded");
        Ok(())
    }

    /// Makes sure a frozen layer called `name` exists (creating it empty and detached when it
    /// does not) and sets its creation time and labels. Used by a sync.
    pub fn prepare_layer(
        &self,
        name: &str,
        created_unix_ms: i64,
        labels: BTreeMap<String, String>,
    ) -> Result<()> {
        validate_name(name)?;
        let _ctl = lock(&self.ctl);
        let mut inner = self.write_inner();
        let mut m = inner.meta.clone();
        let mut new_file = None;
        match m.layers.iter_mut().find(|l| l.name == name) {
            Some(l) if l.id == m.head => {
                return Err(StoreError::SnapshotState {
                    name: name.into(),
                    reason: "is the head".into(),
                });
            }
            Some(l) => {
                if l.created_unix_ms == created_unix_ms && l.labels == labels {
                    return Ok(());
                }
                l.created_unix_ms = created_unix_ms;
                l.labels = labels;
            }
            None => {
                let id = m.next_id;
                let path = meta::layer_path(&self.dir, id);
                new_file = Some((id, Arc::new(LayerFile::create(&path)?)));
                m.next_id += 1;
                m.layers.push(LayerMeta {
                    id,
                    name: name.into(),
                    parent: None,
                    created_unix_ms,
                    labels,
                    removed: false,
                });
                meta::sync_dir(&self.dir)?;
            }
        }
        m.save(&self.dir)?;
        inner.meta = m;
        if let Some((id, f)) = new_file {
            inner.files.insert(id, f);
            inner.index().layers.insert(id, RangeSet::new());
        }
        Ok(())
    }

    /// Replaces what layer `name` holds inside chunk `chunk` with `runs` (byte offset, data;
    /// whole blocks inside the chunk): blocks not covered are deallocated. Used by a sync.
    pub fn import_chunk(&self, name: &str, chunk: u64, runs: &[(u64, Bytes)]) -> Result<()> {
        let per_chunk = CHUNK_SIZE / BLOCK_SIZE;
        let range = chunk * per_chunk..(chunk + 1) * per_chunk;
        // Serialised with checksums(), which must not cache sums of a half-imported chunk.
        let _ctl = lock(&self.ctl);
        let inner = self.write_inner();
        let id = Self::layer_id(&inner, name)?;
        let file = inner.file(id)?.clone();
        let mut keep = RangeSet::new();
        for (off, data) in runs {
            let len = data.len() as u64;
            let blocks = blocks_of(*off, len);
            if !off.is_multiple_of(BLOCK_SIZE)
                || !len.is_multiple_of(BLOCK_SIZE)
                || blocks.start < range.start
                || blocks.end > range.end
            {
                return Err(StoreError::InvalidRange {
                    offset: *off,
                    length: len,
                    size: inner.meta.size,
                });
            }
            file.write_at(data, *off)?;
            if !blocks.is_empty() {
                keep.insert(blocks);
            }
        }
        let mut idx = inner.index();
        let set = idx.layers.entry(id).or_default();
        let gone: Vec<Range<u64>> = set
            .overlapping(&range)
            .map(|r| r.start.max(range.start)..r.end.min(range.end))
            .flat_map(|r| keep.gaps(&r).collect::<Vec<_>>())
            .collect();
        for g in gone {
            file.punch(g.start * BLOCK_SIZE, (g.end - g.start) * BLOCK_SIZE)?;
            set.remove(g);
        }
        for k in keep.iter() {
            set.insert(k.clone());
        }
        drop(idx);
        drop(inner);
        if id != self.read_inner().meta.head {
            self.forget_sums(id);
        }
        Ok(())
    }

    /// Ends a sync: gives the layers the peer's tree (`tree`: name, parent, removed), deletes
    /// local snapshots the peer does not have, puts the head on `head_parent`, fsyncs what
    /// was imported, and completes the blocks that partial writes left in the head.
    pub fn finish_sync(
        &self,
        tree: &[(String, Option<String>, bool)],
        head_parent: Option<&str>,
    ) -> Result<()> {
        let _ctl = lock(&self.ctl);
        let mut inner = self.write_inner();
        let mut m = inner.meta.clone();
        let id_of = |m: &Meta, n: &str| {
            m.by_name(n)
                .map(|l| l.id)
                .ok_or_else(|| StoreError::SnapshotNotFound(n.into()))
        };
        let mut ids = Vec::with_capacity(tree.len());
        for (name, parent, removed) in tree {
            let id = id_of(&m, name)?;
            let parent = parent.as_deref().map(|p| id_of(&m, p)).transpose()?;
            if let Some(l) = m.layer_mut(id) {
                l.parent = parent;
                l.removed = *removed;
            }
            ids.push(id);
        }
        let head = m.head;
        let head_parent = head_parent.map(|p| id_of(&m, p)).transpose()?;
        if let Some(h) = m.layer_mut(head) {
            h.parent = head_parent;
        }
        let stale: Vec<LayerId> = m
            .layers
            .iter()
            .map(|l| l.id)
            .filter(|id| *id != head && !ids.contains(id))
            .collect();
        m.layers.retain(|l| !stale.contains(&l.id));
        m.validate().map_err(|reason| StoreError::SnapshotState {
            name: "sync".into(),
            reason,
        })?;
        for id in ids.iter().chain(std::iter::once(&head)) {
            inner.file(*id)?.sync_data()?;
        }
        m.save(&self.dir)?;
        inner.meta = m;
        for id in &stale {
            inner.files.remove(id);
            inner.index().layers.remove(id);
        }
        let chain = inner.meta.chain_to(head);
        inner.index().rebuild_chain(chain.clone());
        if inner.partial_active {
            let partial: Vec<(u64, u8)> = lock(&self.partial_map).drain().collect();
            let below = &chain[..chain.len() - 1];
            for (block, mask) in partial {
                let start = block * BLOCK_SIZE;
                let mut base = [0u8; BLOCK_SIZE as usize];
                let holder = {
                    let idx = inner.index();
                    below
                        .iter()
                        .rev()
                        .find(|id| idx.layer_has_all(**id, block..block + 1))
                        .copied()
                };
                if let Some(h) = holder {
                    inner.file(h)?.read_at(&mut base, start)?;
                }
                let mut mine = [0u8; BLOCK_SIZE as usize];
                inner.head.read_at(&mut mine, start)?;
                for sector in 0..(BLOCK_SIZE / SECTOR_SIZE) as usize {
                    if mask & (1 << sector) != 0 {
                        let r = sector * SECTOR_SIZE as usize..(sector + 1) * SECTOR_SIZE as usize;
                        base[r.clone()].copy_from_slice(&mine[r]);
                    }
                }
                inner.head.write_at(&base, start)?;
            }
            inner.head.sync_data()?;
            inner.partial_active = false;
        }
        drop(inner);
        for id in stale {
            self.forget_sums(id);
            let p = meta::layer_path(&self.dir, id);
            crate::layer_file::remove_layer_files(&p)?;
        }
        Ok(())
    }

    /// Ends a rebuild: the replica is no longer marked rebuilding.
    pub fn finish_rebuild(&self) -> Result<()> {
        let _ctl = lock(&self.ctl);
        let mut inner = self.write_inner();
        if inner.partial_active {
            return Err(StoreError::Rebuilding("the chain has not been synced yet"));
        }
        if !inner.meta.rebuilding {
            return Ok(());
        }
        let mut m = inner.meta.clone();
        m.rebuilding = false;
        m.save(&self.dir)?;
        inner.meta = m;
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_16_tib_volume_holds_its_last_block_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let size = 16u64 << 40;
        let s = Store::create(dir.path(), size).unwrap();
        s.write(0, &[1u8; 4096]).unwrap();
        s.write(size - 4096, &[2u8; 4096]).unwrap();
        s.write(size - 512, &[3u8; 512]).unwrap();
        s.snapshot("s1", BTreeMap::new()).unwrap();
        s.write(size - 1024, &[4u8; 512]).unwrap();
        s.flush().unwrap();
        drop(s);
        let s = Store::open(dir.path()).unwrap();
        let mut b = vec![0u8; 4096];
        s.read(size - 4096, &mut b).unwrap();
        assert_eq!(&b[..3072], &[2u8; 3072][..]);
        assert_eq!(&b[3072..3584], &[4u8; 512][..]);
        assert_eq!(&b[3584..], &[3u8; 512][..]);
        s.read(0, &mut b).unwrap();
        assert_eq!(b, vec![1u8; 4096]);
        assert!(s.read(size, &mut b).is_err());
    }

    #[test]
    fn a_write_into_the_head_reads_back_while_a_purge_merges_below_it() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::create(dir.path(), 4 << 20).unwrap();
        s.write(0, &[1u8; 8192]).unwrap();
        s.snapshot("base", BTreeMap::new()).unwrap();
        // The first step of merging "base" into the head, as a purge does it chunk by chunk
        // while writes go on between the steps.
        {
            let inner = s.write_inner();
            let base = inner.meta.by_name("base").unwrap().id;
            let mut buf = vec![0u8; CHUNK_SIZE as usize];
            Store::copy_missing(&inner, base, inner.head_id(), 0..2, &mut buf).unwrap();
        }
        s.write(0, &[2u8; 4096]).unwrap();
        s.write(4096, &[3u8; 512]).unwrap();
        let mut b = vec![0u8; 8192];
        s.read(0, &mut b).unwrap();
        assert_eq!(&b[..4096], &[2u8; 4096][..]);
        assert_eq!(&b[4096..4608], &[3u8; 512][..]);
        assert_eq!(&b[4608..], &[1u8; 3584][..]);
        s.remove_snapshot("base").unwrap();
        assert_eq!(s.purge().unwrap(), vec!["base".to_owned()]);
        let mut after = vec![0u8; 8192];
        s.read(0, &mut after).unwrap();
        assert_eq!(after, b);
    }

    #[test]
    fn a_rebuild_ends_the_data_session() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::create(dir.path(), 1 << 20).unwrap();
        let old = s.session();
        assert!(s.enter_session(old).is_some());
        s.begin_rebuild().unwrap();
        assert!(s.enter_session(old).is_none(), "the old session is over");
        assert!(s.enter_session(s.session()).is_some());
    }
}
