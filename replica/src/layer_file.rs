//! One layer's sparse data file: positional I/O, hole punching, and the scan of its
//! allocated extents (SEEK_DATA / SEEK_HOLE) that the index is built from at open time.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{FallocateFlags, fallocate};
use nix::unistd::{Whence, lseek};

use crate::error::{Result, StoreError};

/// An open layer file.
#[derive(Debug)]
pub struct LayerFile {
    path: PathBuf,
    file: File,
}

impl LayerFile {
    /// Creates a new, empty layer file (fails if it exists).
    pub fn create(path: &Path) -> Result<LayerFile> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| StoreError::io("create layer", path, e))?;
        Ok(LayerFile {
            path: path.to_owned(),
            file,
        })
    }

    /// Opens an existing layer file for reading and writing.
    pub fn open(path: &Path) -> Result<LayerFile> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| StoreError::io("open layer", path, e))?;
        Ok(LayerFile {
            path: path.to_owned(),
            file,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads exactly `buf.len()` bytes at `offset`; bytes past the end of the file read as
    /// zeros (layer files grow only as far as they were written).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    return Ok(());
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(StoreError::io("read layer", &self.path, e)),
            }
        }
        Ok(())
    }

    /// Writes all of `data` at `offset`.
    pub fn write_at(&self, data: &[u8], offset: u64) -> Result<()> {
        crate::failpoint!("layer::write");
        self.file
            .write_all_at(data, offset)
            .map_err(|e| StoreError::io("write layer", &self.path, e))
    }

    /// Deallocates `[offset, offset + len)`; it reads as zeros and is a hole for SEEK_DATA.
    pub fn punch(&self, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let (Ok(off), Ok(l)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(StoreError::io(
                "punch layer",
                &self.path,
                std::io::Error::from_raw_os_error(libc::EFBIG),
            ));
        };
        fallocate(
            &self.file,
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
            off,
            l,
        )
        .map_err(|e| StoreError::io("punch layer", &self.path, std::io::Error::from(e)))
    }

    /// fdatasync: makes every write so far durable.
    pub fn sync_data(&self) -> Result<()> {
        crate::failpoint!("layer::sync");
        self.file
            .sync_data()
            .map_err(|e| StoreError::io("fdatasync layer", &self.path, e))
    }

    /// Bytes the file system has allocated for this file.
    pub fn allocated_bytes(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        self.file.metadata().map(|m| m.blocks() * 512).unwrap_or(0)
    }

    /// Calls `f(start, end)` for every allocated extent of the file, in bytes, in order.
    pub fn for_each_extent(&self, mut f: impl FnMut(u64, u64)) -> Result<()> {
        let fd = &self.file;
        let len = self
            .file
            .metadata()
            .map_err(|e| StoreError::io("stat layer", &self.path, e))?
            .len();
        let len = i64::try_from(len).unwrap_or(i64::MAX);
        let mut pos: i64 = 0;
        while pos < len {
            let start = match lseek(fd, pos, Whence::SeekData) {
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
            let end = match lseek(fd, start, Whence::SeekHole) {
                Ok(e) => e,
                Err(e) => {
                    return Err(StoreError::io(
                        "seek hole in layer",
                        &self.path,
                        std::io::Error::from(e),
                    ));
                }
            };
            if end <= start {
                break;
            }
            f(start as u64, end as u64);
            pos = end;
        }
        Ok(())
    }
}
