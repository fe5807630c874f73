//! The driver's errors and their gRPC codes (one `From<CsiError> for Status`).

use tonic::{Code, Status};

use crate::device::DeviceError;
use crate::exec::ExecError;
use crate::mount::MountError;

/// Every error a CSI call can end with; the variant decides the gRPC code.
#[derive(Debug, thiserror::Error)]
pub enum CsiError {
    /// A field is missing or malformed (INVALID_ARGUMENT).
    #[error("{0}")]
    InvalidArgument(String),
    /// The volume, snapshot or node does not exist (NOT_FOUND).
    #[error("{0}")]
    NotFound(String),
    /// It exists already with other properties (ALREADY_EXISTS).
    #[error("{0}")]
    AlreadyExists(String),
    /// The call is valid but the state does not allow it now (FAILED_PRECONDITION).
    #[error("{0}")]
    FailedPrecondition(String),
    /// Not enough space or too many volumes (RESOURCE_EXHAUSTED).
    #[error("{0}")]
    ResourceExhausted(String),
    /// The capacity asked cannot be met (OUT_OF_RANGE).
    #[error("{0}")]
    OutOfRange(String),
    /// Another operation on the same volume is under way (ABORTED); the CO retries.
    #[error("{0}")]
    Aborted(String),
    /// A wait (attach, detach, expansion) ran out of time (DEADLINE_EXCEEDED); the CO
    /// retries.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// The manager could not be reached (UNAVAILABLE).
    #[error("{0}")]
    Unavailable(String),
    /// This driver does not do that (UNIMPLEMENTED).
    #[error("{0}")]
    Unimplemented(String),
    /// Anything else (INTERNAL).
    #[error("{0}")]
    Internal(String),
    /// The device layer failed.
    #[error("{context}: {source}")]
    Device {
        /// What the driver was doing.
        context: String,
        /// The device layer's error.
        source: Box<DeviceError>,
    },
    /// A system tool failed.
    #[error("{context}: {source}")]
    Exec {
        /// What the driver was doing.
        context: String,
        /// The tool's failure.
        source: Box<ExecError>,
    },
    /// Mounting or reading the mount table failed.
    #[error("{context}: {source}")]
    Mount {
        /// What the driver was doing.
        context: String,
        /// The failure.
        source: Box<MountError>,
    },
}

impl CsiError {
    /// A [`CsiError::Device`] with context.
    pub fn device(context: impl Into<String>, source: DeviceError) -> CsiError {
        CsiError::Device {
            context: context.into(),
            source: Box::new(source),
        }
    }

    /// A [`CsiError::Exec`] with context.
    pub fn exec(context: impl Into<String>, source: ExecError) -> CsiError {
        CsiError::Exec {
            context: context.into(),
            source: Box::new(source),
        }
    }

    /// A [`CsiError::Mount`] with context.
    pub fn mount(context: impl Into<String>, source: MountError) -> CsiError {
        CsiError::Mount {
            context: context.into(),
            source: Box::new(source),
        }
    }

    /// The gRPC code of this error.
    pub fn code(&self) -> Code {
        match self {
            CsiError::InvalidArgument(_) => Code::InvalidArgument,
            CsiError::NotFound(_) => Code::NotFound,
            CsiError::AlreadyExists(_) => Code::AlreadyExists,
            CsiError::FailedPrecondition(_) => Code::FailedPrecondition,
            CsiError::ResourceExhausted(_) => Code::ResourceExhausted,
            CsiError::OutOfRange(_) => Code::OutOfRange,
            CsiError::Aborted(_) => Code::Aborted,
            CsiError::DeadlineExceeded(_) => Code::DeadlineExceeded,
            CsiError::Unavailable(_) => Code::Unavailable,
            CsiError::Unimplemented(_) => Code::Unimplemented,
            CsiError::Internal(_) | CsiError::Exec { .. } | CsiError::Mount { .. } => {
                Code::Internal
            }
            CsiError::Device { source, .. } => match source.as_ref() {
                DeviceError::BadExport { .. } => Code::InvalidArgument,
                DeviceError::Busy { .. } | DeviceError::Unsupported { .. } => {
                    Code::FailedPrecondition
                }
                _ => Code::Internal,
            },
        }
    }
}

impl From<CsiError> for Status {
    fn from(e: CsiError) -> Status {
        Status::new(e.code(), e.to_string())
    }
}

/// Shorthand for an INVALID_ARGUMENT error.
pub fn invalid(msg: impl Into<String>) -> CsiError {
    CsiError::InvalidArgument(msg.into())
}
