//! One layer's sparse data: positional I/O, hole punching, and the scan of its allocated
//! extents (SEEK_DATA / SEEK_HOLE) that the index is built from at open time.
//!
//! A layer is stored as segment files of [`SEGMENT_SIZE`] bytes: `layer-N.img` holds the first
//! 8 TiB, `layer-N.img.1` the next, and so on, each created on first write. ext4 ends a file at
//! 16 TiB − 4 KiB, so without segments a 16 TiB volume could not hold its last block.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use nix::fcntl::{FallocateFlags, fallocate};
use nix::unistd::{Whence, lseek};

use crate::error::{Result, StoreError};

/// Bytes of the volume each segment file holds.
pub const SEGMENT_SIZE: u64 = 1 << 43;
/// Most segments a layer can have (volumes up to 1 PiB).
pub const MAX_SEGMENTS: usize = 128;
/// Bytes written to a layer between two starts of its writeback ([`crate::writeback`]).
pub const WRITEBACK_EVERY: u64 = 8 << 20;

/// An open layer.
#[derive(Debug)]
pub struct LayerFile {
    path: PathBuf,
    segs: Box<[OnceLock<File>]>,
    create: Mutex<()>,
    /// Bytes written since writeback was last started (or the layer synced).
    unsynced: AtomicU64,
}

/// Path of segment `k` of the layer whose first segment is `path`.
fn segment_path(path: &Path, k: usize) -> PathBuf {
    if k == 0 {
        path.to_owned()
    } else {
        let mut p = path.as_os_str().to_owned();
        p.push(format!(".{k}"));
        PathBuf::from(p)
    }
}

/// Removes every segment file of the layer whose first segment is `path`.
pub fn remove_layer_files(path: &Path) -> Result<()> {
    for k in 0..MAX_SEGMENTS {
        let p = segment_path(path, k);
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if k == 0 {
                    continue;
                }
            }
            Err(e) => return Err(StoreError::io("remove layer", &p, e)),
        }
    }
    Ok(())
}

/// Splits `[offset, offset + len)` at segment boundaries: (segment, offset in it, offset
/// in the request, length).
fn pieces(offset: u64, len: u64) -> impl Iterator<Item = (usize, u64, usize, usize)> {
    let end = offset + len;
    let mut pos = offset;
    std::iter::from_fn(move || {
        if pos >= end {
            return None;
        }
        let seg = pos / SEGMENT_SIZE;
        let seg_end = ((seg + 1) * SEGMENT_SIZE).min(end);
        let item = (
            seg as usize,
            pos - seg * SEGMENT_SIZE,
            (pos - offset) as usize,
            (seg_end - pos) as usize,
        );
        pos = seg_end;
        Some(item)
    })
}

fn open_rw(path: &Path, create_new: bool) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(create_new)
        .open(path)
}

impl LayerFile {
    fn with_first(path: &Path, first: File) -> LayerFile {
        let segs: Box<[OnceLock<File>]> = (0..MAX_SEGMENTS).map(|_| OnceLock::new()).collect();
        let _ = segs[0].set(first);
        LayerFile {
            path: path.to_owned(),
            segs,
            create: Mutex::new(()),
            unsynced: AtomicU64::new(0),
        }
    }

    /// Creates a new, empty layer (fails if its first file exists).
    pub fn create(path: &Path) -> Result<LayerFile> {
        let file = open_rw(path, true).map_err(|e| StoreError::io("create layer", path, e))?;
        Ok(Self::with_first(path, file))
    }

    /// Opens an existing layer and whichever of its segment files exist.
    pub fn open(path: &Path) -> Result<LayerFile> {
        let file = open_rw(path, false).map_err(|e| StoreError::io("open layer", path, e))?;
        let layer = Self::with_first(path, file);
        for k in 1..MAX_SEGMENTS {
            let p = segment_path(path, k);
            match open_rw(&p, false) {
                Ok(f) => {
                    let _ = layer.segs[k].set(f);
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(StoreError::io("open layer segment", &p, e)),
            }
        }
        Ok(layer)
    }

    /// The first file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn segment(&self, k: usize) -> Result<Option<&File>> {
        self.segs.get(k).map(|s| s.get()).ok_or_else(|| {
            StoreError::io(
                "address layer",
                &self.path,
                std::io::Error::from_raw_os_error(libc::EFBIG),
            )
        })
    }

    fn segment_for_write(&self, k: usize) -> Result<&File> {
        if let Some(f) = self.segment(k)? {
            return Ok(f);
        }
        let _g = self.create.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = self.segs[k].get() {
            return Ok(f);
        }
        let p = segment_path(&self.path, k);
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&p)
            .map_err(|e| StoreError::io("create layer segment", &p, e))?;
        if let Some(dir) = self.path.parent() {
            crate::meta::sync_dir(dir)?;
        }
        Ok(self.segs[k].get_or_init(|| f))
    }

    /// Reads exactly `buf.len()` bytes at `offset`; bytes never written read as zeros.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        for (seg, off, at, len) in pieces(offset, buf.len() as u64) {
            let dst = &mut buf[at..at + len];
            let Some(file) = self.segment(seg)? else {
                dst.fill(0);
                continue;
            };
            let mut done = 0;
            while done < dst.len() {
                match file.read_at(&mut dst[done..], off + done as u64) {
                    Ok(0) => {
                        dst[done..].fill(0);
                        break;
                    }
                    Ok(n) => done += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(StoreError::io("read layer", &self.path, e)),
                }
            }
        }
        Ok(())
    }

    /// Writes all of `data` at `offset`.
    pub fn write_at(&self, data: &[u8], offset: u64) -> Result<()> {
        crate::failpoint!("layer::write");
        for (seg, off, at, len) in pieces(offset, data.len() as u64) {
            self.segment_for_write(seg)?
                .write_all_at(&data[at..at + len], off)
                .map_err(|e| StoreError::io("write layer", &self.path, e))?;
        }
        self.written(data.len() as u64);
        Ok(())
    }

    /// Counts `len` bytes written; every [`WRITEBACK_EVERY`] bytes, starts the writeback of
    /// the layer's dirty pages (without waiting for it), so that a later flush is short.
    fn written(&self, len: u64) {
        let before = self.unsynced.fetch_add(len, Ordering::Relaxed);
        if before + len < WRITEBACK_EVERY || before >= WRITEBACK_EVERY {
            // Below the mark, or another writer crossed it and is starting writeback.
            return;
        }
        for f in self.segs.iter().filter_map(|s| s.get()) {
            if let Err(e) = crate::writeback::start(f) {
                tracing::debug!(path = %self.path.display(), error = %e, "cannot start writeback");
            }
        }
        self.unsynced.store(0, Ordering::Relaxed);
    }

    /// Deallocates `[offset, offset + len)`; it reads as zeros and is a hole for SEEK_DATA.
    pub fn punch(&self, offset: u64, len: u64) -> Result<()> {
        for (seg, off, _, l) in pieces(offset, len) {
            let Some(file) = self.segment(seg)? else {
                continue;
            };
            let (Ok(o), Ok(l)) = (i64::try_from(off), i64::try_from(l)) else {
                return Err(StoreError::io(
                    "punch layer",
                    &self.path,
                    std::io::Error::from_raw_os_error(libc::EFBIG),
                ));
            };
            fallocate(
                file,
                FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
                o,
                l,
            )
            .map_err(|e| StoreError::io("punch layer", &self.path, std::io::Error::from(e)))?;
        }
        Ok(())
    }

    /// fdatasync of every segment: makes every write so far durable.
    pub fn sync_data(&self) -> Result<()> {
        crate::failpoint!("layer::sync");
        self.unsynced.store(0, Ordering::Relaxed);
        for f in self.segs.iter().filter_map(|s| s.get()) {
            f.sync_data()
                .map_err(|e| StoreError::io("fdatasync layer", &self.path, e))?;
        }
        Ok(())
    }

    /// Bytes the file system has allocated for this layer.
    pub fn allocated_bytes(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        self.segs
            .iter()
            .filter_map(|s| s.get())
            .map(|f| f.metadata().map(|m| m.blocks() * 512).unwrap_or(0))
            .sum()
    }

    /// Calls `f(start, end)` for every allocated extent of the layer, in bytes, in order.
    pub fn for_each_extent(&self, mut f: impl FnMut(u64, u64)) -> Result<()> {
        for (k, file) in self
            .segs
            .iter()
            .enumerate()
            .filter_map(|(k, s)| s.get().map(|f| (k, f)))
        {
            let base = k as u64 * SEGMENT_SIZE;
            let len = file
                .metadata()
                .map_err(|e| StoreError::io("stat layer", &self.path, e))?
                .len();
            let len = i64::try_from(len).unwrap_or(i64::MAX);
            let mut pos: i64 = 0;
            while pos < len {
                let start = match lseek(file, pos, Whence::SeekData) {
                    Ok(s) => s,
                    Err(nix::errno::Errno::ENXIO) => break,
                    Err(e) => {
                        return Err(StoreError::io(
                            "seek data in layer",
                            &self.path,
                            std::io::Error::from(e),
                        ));
                    }
                };
                let end = lseek(file, start, Whence::SeekHole).map_err(|e| {
                    StoreError::io("seek hole in layer", &self.path, std::io::Error::from(e))
                })?;
                if end <= start {
                    break;
                }
                f(base + start as u64, base + end as u64);
                pos = end;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn pieces_split_at_segment_boundaries() {
        let v: Vec<_> = pieces(SEGMENT_SIZE - 4096, 8192).collect();
        assert_eq!(
            v,
            vec![(0, SEGMENT_SIZE - 4096, 0, 4096), (1, 0, 4096, 4096)]
        );
    }

    #[test]
    fn data_past_the_first_segment_round_trips_and_is_found_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("layer-000001.img");
        let l = LayerFile::create(&path).unwrap();
        // The last block of a 16 TiB volume, across no boundary, and one across a boundary.
        let last = (16u64 << 40) - 4096;
        l.write_at(&[7u8; 4096], last).unwrap();
        l.write_at(&[9u8; 8192], SEGMENT_SIZE - 4096).unwrap();
        drop(l);
        let l = LayerFile::open(&path).unwrap();
        let mut b = [0u8; 4096];
        l.read_at(&mut b, last).unwrap();
        assert_eq!(b, [7u8; 4096]);
        let mut extents = Vec::new();
        l.for_each_extent(|s, e| extents.push((s, e))).unwrap();
        assert_eq!(
            extents,
            vec![
                (SEGMENT_SIZE - 4096, SEGMENT_SIZE),
                (SEGMENT_SIZE, SEGMENT_SIZE + 4096),
                (last, last + 4096)
            ]
        );
        l.punch(SEGMENT_SIZE - 4096, 8192).unwrap();
        l.read_at(&mut b, SEGMENT_SIZE).unwrap();
        assert_eq!(b, [0u8; 4096]);
        drop(l);
        remove_layer_files(&path).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
