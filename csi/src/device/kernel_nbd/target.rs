//! Where an NBD export is: `nbd://HOST[:PORT]/EXPORT` or `nbd+unix:///EXPORT?socket=PATH`
//! (the NBD URI forms), parsed by [`NbdTarget::parse`].

use std::fmt;
use std::io;
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

/// Default NBD port.
pub const DEFAULT_PORT: u16 = 10809;

/// An NBD export to connect to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdTarget {
    /// Where the server listens.
    pub endpoint: Endpoint,
    /// Export name.
    pub export: String,
}

/// The server's socket address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// TCP host (name or address, IPv6 without brackets) and port.
    Tcp(String, u16),
    /// A unix socket path.
    Unix(PathBuf),
}

/// An NBD URI that could not be parsed.
#[derive(Debug, thiserror::Error)]
#[error("bad NBD URI {uri:?}: {reason}")]
pub struct ParseTargetError {
    uri: String,
    reason: &'static str,
}

impl NbdTarget {
    /// Parses `nbd://HOST[:PORT]/EXPORT` or `nbd+unix:///EXPORT?socket=PATH`.
    pub fn parse(uri: &str) -> Result<NbdTarget, ParseTargetError> {
        let err = |reason| ParseTargetError {
            uri: uri.to_owned(),
            reason,
        };
        if let Some(rest) = uri.strip_prefix("nbd+unix://") {
            let (path, query) = rest
                .split_once('?')
                .ok_or_else(|| err("nbd+unix needs ?socket=PATH"))?;
            let export = path
                .strip_prefix('/')
                .ok_or_else(|| err("nbd+unix:/// must have an empty host"))?;
            let socket = query
                .strip_prefix("socket=")
                .ok_or_else(|| err("nbd+unix needs ?socket=PATH"))?;
            if !socket.starts_with('/') {
                return Err(err("the socket path must be absolute"));
            }
            return Ok(NbdTarget {
                endpoint: Endpoint::Unix(PathBuf::from(socket)),
                export: export.to_owned(),
            });
        }
        let rest = uri
            .strip_prefix("nbd://")
            .ok_or_else(|| err("expected nbd:// or nbd+unix://"))?;
        let (authority, export) = rest.split_once('/').unwrap_or((rest, ""));
        if export.contains(['?', '#']) {
            return Err(err("query and fragment are not supported"));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or_else(|| err("unclosed '['"))?;
            (host, after.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) if !h.contains(':') => (h, Some(p)),
                Some(_) => return Err(err("IPv6 addresses need brackets")),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(err("missing host"));
        }
        let port = match port {
            None => DEFAULT_PORT,
            Some(p) => p.parse().map_err(|_| err("bad port"))?,
        };
        Ok(NbdTarget {
            endpoint: Endpoint::Tcp(host.to_owned(), port),
            export: export.to_owned(),
        })
    }

    /// Opens a socket to the server, giving up after `timeout`.
    pub(crate) fn connect(&self, timeout: Duration) -> io::Result<Conn> {
        match &self.endpoint {
            Endpoint::Tcp(host, port) => {
                let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
                for addr in (host.as_str(), *port).to_socket_addrs()? {
                    match TcpStream::connect_timeout(&addr, timeout) {
                        Ok(s) => {
                            s.set_nodelay(true)?;
                            s.set_read_timeout(Some(timeout))?;
                            s.set_write_timeout(Some(timeout))?;
                            return Ok(Conn::Tcp(s));
                        }
                        Err(e) => last = e,
                    }
                }
                Err(last)
            }
            Endpoint::Unix(path) => {
                let s = UnixStream::connect(path)?;
                s.set_read_timeout(Some(timeout))?;
                s.set_write_timeout(Some(timeout))?;
                Ok(Conn::Unix(s))
            }
        }
    }
}

impl fmt::Display for NbdTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.endpoint {
            Endpoint::Tcp(h, p) if h.contains(':') => write!(f, "nbd://[{h}]:{p}/{}", self.export),
            Endpoint::Tcp(h, p) => write!(f, "nbd://{h}:{p}/{}", self.export),
            Endpoint::Unix(path) => {
                write!(f, "nbd+unix:///{}?socket={}", self.export, path.display())
            }
        }
    }
}

/// A connected stream socket to an NBD server.
#[derive(Debug)]
pub(crate) enum Conn {
    /// TCP.
    Tcp(TcpStream),
    /// Unix socket.
    Unix(UnixStream),
}

impl Conn {
    /// Clears the handshake timeouts: the kernel sets its own on the socket.
    pub(crate) fn clear_timeouts(&self) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => {
                s.set_read_timeout(None)?;
                s.set_write_timeout(None)
            }
            Conn::Unix(s) => {
                s.set_read_timeout(None)?;
                s.set_write_timeout(None)
            }
        }
    }

    /// The socket as a file descriptor (handed to the kernel, then watched).
    pub(crate) fn into_fd(self) -> OwnedFd {
        match self {
            Conn::Tcp(s) => s.into(),
            Conn::Unix(s) => s.into(),
        }
    }
}

impl io::Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.read(buf),
            Conn::Unix(s) => s.read(buf),
        }
    }
}

impl io::Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.write(buf),
            Conn::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tcp_and_unix_uris() {
        let t = NbdTarget::parse("nbd://127.0.0.1:10810/vol1").expect("tcp");
        assert_eq!(t.endpoint, Endpoint::Tcp("127.0.0.1".into(), 10810));
        assert_eq!(t.export, "vol1");
        assert_eq!(t.to_string(), "nbd://127.0.0.1:10810/vol1");
        let t = NbdTarget::parse("nbd://[::1]/v").expect("v6");
        assert_eq!(t.endpoint, Endpoint::Tcp("::1".into(), DEFAULT_PORT));
        let t = NbdTarget::parse("nbd+unix:///v?socket=/run/x.sock").expect("unix");
        assert_eq!(t.endpoint, Endpoint::Unix("/run/x.sock".into()));
        assert_eq!(t.to_string(), "nbd+unix:///v?socket=/run/x.sock");
    }

    #[test]
    fn rejects_bad_uris() {
        for bad in [
            "tcp://h:1/v",
            "nbd://:1/v",
            "nbd://h:x/v",
            "nbd://::1/v",
            "nbd://h/v?tls=1",
            "nbd+unix:///v",
            "nbd+unix:///v?socket=rel",
            "nbd+unix://host/v?socket=/s",
        ] {
            assert!(NbdTarget::parse(bad).is_err(), "{bad} parsed");
        }
    }
}
