//! Errors of the NBD frontend: why a connection ended, why a listener could not be set up,
//! and why a listen URL was refused.

use std::io;

/// Why one NBD connection ended abnormally. The server logs it once, in the connection's
/// span, and goes on serving other connections.
#[derive(Debug, thiserror::Error)]
pub enum NbdConnError {
    /// A socket read or write failed.
    #[error("{op}: {source}")]
    Io {
        /// What was being done (`read option header`, `write replies`, ...).
        op: &'static str,
        /// The socket error.
        #[source]
        source: io::Error,
    },
    /// The client did not finish the handshake in time.
    #[error("handshake not finished within {0:?}")]
    HandshakeTimeout(std::time::Duration),
    /// The client set handshake flags this server does not know.
    #[error("unknown client flags {0:#x}")]
    UnknownClientFlags(u32),
    /// An option did not start with `IHAVEOPT`.
    #[error("bad option magic {0:#018x}")]
    BadOptionMagic(u64),
    /// An option's data was longer than this server accepts.
    #[error("option {option} has {len} bytes of data, more than the {max} accepted")]
    OptionTooLong {
        /// The option code.
        option: u32,
        /// Its announced data length.
        len: u32,
        /// The limit.
        max: u32,
    },
    /// `NBD_OPT_EXPORT_NAME` named an export that does not exist (the protocol has no error
    /// reply for it, so the connection is closed).
    #[error("unknown export {0:?} asked for by NBD_OPT_EXPORT_NAME")]
    UnknownExport(String),
    /// A transmission request did not start with the request magic.
    #[error("bad request magic {0:#010x}")]
    BadRequestMagic(u32),
    /// A write announced a payload larger than the maximum; its payload cannot be skipped
    /// safely, so the connection is closed.
    #[error("write of {len} bytes exceeds the maximum payload of {max} bytes")]
    OversizedWrite {
        /// The announced length.
        len: u32,
        /// The limit.
        max: u32,
    },
    /// The client closed the connection in the middle of a request.
    #[error("connection closed in the middle of a request ({0} bytes of it received)")]
    TruncatedRequest(usize),
    /// In-flight requests did not finish within the grace period after shutdown.
    #[error("in-flight requests not finished within {0:?} after shutdown")]
    DrainTimeout(std::time::Duration),
}

impl NbdConnError {
    pub(crate) fn io(op: &'static str) -> impl FnOnce(io::Error) -> NbdConnError {
        move |source| NbdConnError::Io { op, source }
    }
}

/// Why a listen URL given to [`parse_nbd_url`](super::parse_nbd_url) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseNbdUrlError {
    /// The scheme is neither `tcp://` nor `unix://`.
    #[error("NBD listen URL {0:?}: expected tcp://HOST:PORT or unix:///PATH")]
    UnsupportedScheme(String),
    /// `tcp://` without a host.
    #[error("NBD listen URL {0:?}: missing host (expected tcp://HOST:PORT)")]
    MissingHost(String),
    /// `tcp://` without `:PORT`.
    #[error("NBD listen URL {0:?}: missing port (expected tcp://HOST:PORT)")]
    MissingPort(String),
    /// The port is not a number in 0..=65535.
    #[error("NBD listen URL {0:?}: invalid port")]
    InvalidPort(String),
    /// `tcp://` followed by a path, query or user part.
    #[error("NBD listen URL {0:?}: unexpected path, query or user part after HOST:PORT")]
    TrailingParts(String),
    /// `unix://` with a path that is empty or not absolute.
    #[error("NBD listen URL {0:?}: unix socket path must be absolute (unix:///PATH)")]
    RelativeUnixPath(String),
}

/// Why an NBD listener could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum NbdListenError {
    /// Binding the socket failed.
    #[error("listen for NBD on {addr}: {source}")]
    Bind {
        /// The address or socket path.
        addr: String,
        /// The bind error.
        #[source]
        source: io::Error,
    },
}
