//! Where the NBD server listens: `tcp://HOST:PORT` or `unix:///PATH`, parsed by
//! [`parse_nbd_url`], bound by [`NbdListen::bind`].

use std::fmt;
use std::path::PathBuf;

use tokio::net::{TcpListener, UnixListener};

use super::error::{NbdListenError, ParseNbdUrlError};

/// An NBD listen address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdListen {
    /// A TCP socket; `host` is an IP address or a name, without brackets for IPv6.
    Tcp {
        /// Host to bind (`127.0.0.1`, `::`, `localhost`).
        host: String,
        /// Port (0 picks a free one).
        port: u16,
    },
    /// A unix socket at an absolute path.
    Unix {
        /// Socket path.
        path: PathBuf,
    },
}

/// A bound NBD listener, ready for [`serve`](super::serve).
#[derive(Debug)]
pub enum NbdListener {
    /// TCP.
    Tcp(TcpListener),
    /// Unix socket.
    Unix(UnixListener),
}

/// Parses `tcp://HOST:PORT` (IPv6 as `tcp://[::1]:10809`) or `unix:///PATH`.
pub fn parse_nbd_url(url: &str) -> Result<NbdListen, ParseNbdUrlError> {
    if let Some(rest) = url.strip_prefix("tcp://") {
        if rest.contains(['/', '?', '#', '@']) {
            return Err(ParseNbdUrlError::TrailingParts(url.to_owned()));
        }
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| ParseNbdUrlError::MissingPort(url.to_owned()))?;
            let port = after
                .strip_prefix(':')
                .ok_or_else(|| ParseNbdUrlError::MissingPort(url.to_owned()))?;
            (host, port)
        } else {
            let (host, port) = rest
                .rsplit_once(':')
                .ok_or_else(|| ParseNbdUrlError::MissingPort(url.to_owned()))?;
            if host.contains(':') {
                // An unbracketed IPv6 address: the port is ambiguous.
                return Err(ParseNbdUrlError::MissingPort(url.to_owned()));
            }
            (host, port)
        };
        if host.is_empty() {
            return Err(ParseNbdUrlError::MissingHost(url.to_owned()));
        }
        if port.is_empty() {
            return Err(ParseNbdUrlError::MissingPort(url.to_owned()));
        }
        let port: u16 = port
            .parse()
            .map_err(|_| ParseNbdUrlError::InvalidPort(url.to_owned()))?;
        Ok(NbdListen::Tcp {
            host: host.to_owned(),
            port,
        })
    } else if let Some(path) = url.strip_prefix("unix://") {
        if !path.starts_with('/') || path.len() < 2 {
            return Err(ParseNbdUrlError::RelativeUnixPath(url.to_owned()));
        }
        Ok(NbdListen::Unix {
            path: PathBuf::from(path),
        })
    } else {
        Err(ParseNbdUrlError::UnsupportedScheme(url.to_owned()))
    }
}

impl std::str::FromStr for NbdListen {
    type Err = ParseNbdUrlError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_nbd_url(s)
    }
}

impl fmt::Display for NbdListen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NbdListen::Tcp { host, port } if host.contains(':') => {
                write!(f, "tcp://[{host}]:{port}")
            }
            NbdListen::Tcp { host, port } => write!(f, "tcp://{host}:{port}"),
            NbdListen::Unix { path } => write!(f, "unix://{}", path.display()),
        }
    }
}

impl NbdListen {
    /// Binds the listener. A leftover socket file at a unix path is removed first (only if
    /// it is a socket).
    pub async fn bind(&self) -> Result<NbdListener, NbdListenError> {
        let bind_err = |source| NbdListenError::Bind {
            addr: self.to_string(),
            source,
        };
        match self {
            NbdListen::Tcp { host, port } => TcpListener::bind((host.as_str(), *port))
                .await
                .map(NbdListener::Tcp)
                .map_err(bind_err),
            NbdListen::Unix { path } => {
                use std::os::unix::fs::FileTypeExt;
                if let Ok(meta) = std::fs::symlink_metadata(path)
                    && meta.file_type().is_socket()
                {
                    std::fs::remove_file(path).map_err(bind_err)?;
                }
                UnixListener::bind(path)
                    .map(NbdListener::Unix)
                    .map_err(bind_err)
            }
        }
    }

    /// The URI a libnbd/qemu client uses to reach `export` here: `nbd://HOST:PORT/NAME` or
    /// `nbd+unix:///NAME?socket=PATH`. (The port is the configured one; with port 0 ask the
    /// bound listener for the real one.)
    pub fn client_uri(&self, export: &str) -> String {
        match self {
            NbdListen::Tcp { host, port } if host.contains(':') => {
                format!("nbd://[{host}]:{port}/{export}")
            }
            NbdListen::Tcp { host, port } => format!("nbd://{host}:{port}/{export}"),
            NbdListen::Unix { path } => {
                format!("nbd+unix:///{export}?socket={}", path.display())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tcp_and_unix() {
        assert_eq!(
            parse_nbd_url("tcp://127.0.0.1:10809"),
            Ok(NbdListen::Tcp {
                host: "127.0.0.1".into(),
                port: 10809
            })
        );
        assert_eq!(
            parse_nbd_url("tcp://[::1]:0"),
            Ok(NbdListen::Tcp {
                host: "::1".into(),
                port: 0
            })
        );
        assert_eq!(
            parse_nbd_url("tcp://localhost:1"),
            Ok(NbdListen::Tcp {
                host: "localhost".into(),
                port: 1
            })
        );
        assert_eq!(
            parse_nbd_url("unix:///run/ironhorn/vol.sock"),
            Ok(NbdListen::Unix {
                path: "/run/ironhorn/vol.sock".into()
            })
        );
    }

    #[test]
    fn refuses_bad_urls_with_a_reason() {
        use ParseNbdUrlError::*;
        type Case = (&'static str, fn(String) -> ParseNbdUrlError);
        let cases: &[Case] = &[
            ("nbd://127.0.0.1:10809", UnsupportedScheme),
            ("127.0.0.1:10809", UnsupportedScheme),
            ("tcp://127.0.0.1", MissingPort),
            ("tcp://127.0.0.1:", MissingPort),
            ("tcp://::1:10809", MissingPort),
            ("tcp://:10809", MissingHost),
            ("tcp://h:70000", InvalidPort),
            ("tcp://h:x", InvalidPort),
            ("tcp://h:1/export", TrailingParts),
            ("unix://relative/path", RelativeUnixPath),
            ("unix://", RelativeUnixPath),
            ("unix:///", RelativeUnixPath),
        ];
        for (url, want) in cases {
            assert_eq!(parse_nbd_url(url), Err(want(url.to_string())), "{url}");
        }
    }

    #[test]
    fn display_and_client_uri() {
        let tcp = parse_nbd_url("tcp://[::1]:5").expect("valid");
        assert_eq!(tcp.to_string(), "tcp://[::1]:5");
        assert_eq!(tcp.client_uri("vol"), "nbd://[::1]:5/vol");
        let unix = parse_nbd_url("unix:///tmp/s").expect("valid");
        assert_eq!(unix.to_string(), "unix:///tmp/s");
        assert_eq!(unix.client_uri("vol"), "nbd+unix:///vol?socket=/tmp/s");
    }
}
