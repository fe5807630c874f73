//! Errors of the backup store: what failed, and on which object or input.

/// Result of a backup-store operation.
pub type Result<T, E = BackupError> = std::result::Result<T, E>;

/// Why a backup-store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The target URL or one of its options is not usable.
    #[error("invalid target {url:?}: {reason}")]
    InvalidTarget {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An argument (name, label, block size…) is not acceptable.
    #[error("invalid {what} {value:?}: {reason}")]
    InvalidArgument {
        /// Which argument.
        what: &'static str,
        /// Its value.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An object store request failed.
    #[error("{op} {key}: {error}")]
    Store {
        /// The operation (`put`, `get`, `list`…).
        op: &'static str,
        /// The object key or prefix, relative to the target.
        key: String,
        /// What the store said (in the message, not a separate cause: the store's own
        /// messages already repeat their causes).
        error: object_store::Error,
    },
    /// No backup with this id exists in the target.
    #[error("backup {0:?} not found")]
    BackupNotFound(String),
    /// A manifest could not be parsed or is inconsistent.
    #[error("manifest {key}: {reason}")]
    CorruptManifest {
        /// Object key of the manifest.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A stored block is missing or does not match its name, crc or size.
    #[error("block {hash} (volume offset {offset}): {reason}")]
    BadBlock {
        /// The block's content hash (its name).
        hash: String,
        /// Offset of the first volume block that uses it.
        offset: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// Reading the snapshot or writing the restored volume failed.
    #[error("{op}: {error}")]
    Io {
        /// What was being done.
        op: String,
        /// The I/O error.
        error: std::io::Error,
    },
    /// The target's lock could not be taken in time.
    #[error("target busy: {0}")]
    LockTimeout(String),
    /// Our lease on the target expired or was removed while we held it.
    #[error("lease {0} lost (expired or removed); the operation was abandoned")]
    LeaseLost(String),
    /// The operation was cancelled.
    #[error("cancelled")]
    Cancelled,
    /// A worker task panicked.
    #[error("worker task failed: {0}")]
    Task(String),
}

impl BackupError {
    pub(crate) fn store(
        op: &'static str,
        key: impl Into<String>,
        error: object_store::Error,
    ) -> Self {
        BackupError::Store {
            op,
            key: key.into(),
            error,
        }
    }

    pub(crate) fn io(op: impl Into<String>, error: std::io::Error) -> Self {
        BackupError::Io {
            op: op.into(),
            error,
        }
    }

    pub(crate) fn invalid(
        what: &'static str,
        value: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        BackupError::InvalidArgument {
            what,
            value: value.into(),
            reason: reason.into(),
        }
    }
}

impl From<tokio::task::JoinError> for BackupError {
    fn from(e: tokio::task::JoinError) -> Self {
        BackupError::Task(e.to_string())
    }
}
