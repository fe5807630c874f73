//! Errors of the engine's control operations.

/// What failed in an engine operation, and with which input.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// An address did not parse.
    #[error("bad address {0:?}: {1}")]
    BadAddress(String, String),
    /// Connecting to a replica failed.
    #[error("connect to {0}: {1}")]
    Connect(String, String),
    /// A replica did not answer in time.
    #[error("replica {0} did not answer {1} in time")]
    Timeout(String, &'static str),
    /// A replica refused or failed a control request.
    #[error("replica {address}: {op}: {message}")]
    Replica {
        /// Control address.
        address: String,
        /// The operation.
        op: &'static str,
        /// The gRPC code it answered.
        code: tonic::Code,
        /// Its message.
        message: String,
    },
    /// A replica is not connected.
    #[error("replica {0} is not connected")]
    ReplicaUnavailable(String),
    /// No replica can serve.
    #[error("no healthy replica: {0}")]
    NoHealthyReplica(String),
    /// The request is invalid.
    #[error("{0}")]
    Invalid(String),
    /// Something named does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// Something named exists already.
    #[error("{0} exists already")]
    Exists(String),
    /// The engine is busy with an operation that excludes this one.
    #[error("busy: {0}")]
    Busy(&'static str),
}

impl From<EngineError> for tonic::Status {
    fn from(e: EngineError) -> Self {
        use tonic::Code;
        let code = match &e {
            EngineError::BadAddress(..) | EngineError::Invalid(_) => Code::InvalidArgument,
            EngineError::NotFound(_) => Code::NotFound,
            EngineError::Exists(_) => Code::AlreadyExists,
            EngineError::Busy(_) => Code::FailedPrecondition,
            EngineError::Replica { code, .. }
                if matches!(
                    code,
                    Code::InvalidArgument
                        | Code::NotFound
                        | Code::AlreadyExists
                        | Code::FailedPrecondition
                ) =>
            {
                *code
            }
            EngineError::Connect(..)
            | EngineError::Timeout(..)
            | EngineError::ReplicaUnavailable(_)
            | EngineError::NoHealthyReplica(_) => Code::Unavailable,
            EngineError::Replica { .. } => Code::Internal,
        };
        tonic::Status::new(code, e.to_string())
    }
}
