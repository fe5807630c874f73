//! Errors of the replica store.

use std::path::PathBuf;

/// What went wrong in a store operation, and with which input.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// An I/O range is not 512-byte aligned, or runs past the end of the volume.
    #[error("invalid range: offset {offset} length {length} (volume size {size}, alignment 512)")]
    InvalidRange {
        /// Requested offset in bytes.
        offset: u64,
        /// Requested length in bytes.
        length: u64,
        /// Volume size in bytes.
        size: u64,
    },
    /// A size (create or expand) is not usable.
    #[error("invalid size {size}: {reason}")]
    InvalidSize {
        /// The size that was asked for.
        size: u64,
        /// Why it was refused.
        reason: &'static str,
    },
    /// A snapshot name is not usable.
    #[error("invalid snapshot name {name:?}: {reason}")]
    InvalidName {
        /// The name that was given.
        name: String,
        /// Why it was refused.
        reason: &'static str,
    },
    /// No layer of that name.
    #[error("snapshot {0:?} not found")]
    SnapshotNotFound(String),
    /// A snapshot of that name exists already.
    #[error("snapshot {0:?} already exists")]
    SnapshotExists(String),
    /// The operation does not apply to the layer in its current state.
    #[error("snapshot {name:?}: {reason}")]
    SnapshotState {
        /// The layer's name.
        name: String,
        /// Why the operation was refused.
        reason: String,
    },
    /// The epoch can only be raised.
    #[error("epoch {requested} is lower than the current epoch {current}")]
    EpochLowered {
        /// Epoch that was asked for.
        requested: u64,
        /// Epoch the replica holds.
        current: u64,
    },
    /// The directory holds no replica (no metadata file) and no size was given.
    #[error("{dir}: no replica here and no size given to create one")]
    NotAReplica {
        /// The directory.
        dir: PathBuf,
    },
    /// The metadata file is unreadable or fails its checksum.
    #[error("{path}: corrupt metadata: {reason}")]
    CorruptMetadata {
        /// The metadata file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A rebuild is in progress or required; the operation has to wait for it.
    #[error("replica is rebuilding: {0}")]
    Rebuilding(&'static str),
    /// The disk under the replica is full.
    #[error("no space left on device while {op} {path}")]
    NoSpace {
        /// What the store was doing.
        op: &'static str,
        /// The file it was doing it to.
        path: PathBuf,
    },
    /// Any other I/O error from the file system.
    #[error("{op} {path}: {source}")]
    Io {
        /// What the store was doing.
        op: &'static str,
        /// The file it was doing it to.
        path: PathBuf,
        /// The error from the OS.
        #[source]
        source: std::io::Error,
    },
}

impl StoreError {
    /// Wraps an OS error with what was being done and to which file.
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        if source.raw_os_error() == Some(libc::ENOSPC) {
            StoreError::NoSpace { op, path }
        } else {
            StoreError::Io { op, path, source }
        }
    }

    /// The errno that best describes this error on the data path.
    pub fn errno(&self) -> i32 {
        match self {
            StoreError::InvalidRange { .. }
            | StoreError::InvalidSize { .. }
            | StoreError::InvalidName { .. }
            | StoreError::EpochLowered { .. } => libc::EINVAL,
            StoreError::SnapshotNotFound(_) | StoreError::NotAReplica { .. } => libc::ENOENT,
            StoreError::SnapshotExists(_) => libc::EEXIST,
            StoreError::SnapshotState { .. } | StoreError::Rebuilding(_) => libc::EBUSY,
            StoreError::NoSpace { .. } => libc::ENOSPC,
            StoreError::CorruptMetadata { .. } => libc::EUCLEAN,
            StoreError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
        }
    }
}

/// Result of a store operation.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;
