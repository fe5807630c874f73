//! The kernel nbd driver's generic-netlink interface (family `nbd`, linux/nbd-netlink.h):
//! connect sockets to a device, replace a dead one (reconfigure), disconnect. Messages are
//! built and parsed here; the socket is a plain `AF_NETLINK`/`NETLINK_GENERIC` one.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, send,
    setsockopt, socket, sockopt,
};
use nix::sys::time::TimeVal;

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const NLA_F_NESTED: u16 = 1 << 15;
const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | (1 << 14));

const NBD_GENL_VERSION: u8 = 1;
const NBD_CMD_CONNECT: u8 = 1;
const NBD_CMD_DISCONNECT: u8 = 2;
const NBD_CMD_RECONFIGURE: u8 = 3;
const NBD_ATTR_INDEX: u16 = 1;
const NBD_ATTR_SIZE_BYTES: u16 = 2;
const NBD_ATTR_BLOCK_SIZE_BYTES: u16 = 3;
const NBD_ATTR_TIMEOUT: u16 = 4;
const NBD_ATTR_SERVER_FLAGS: u16 = 5;
const NBD_ATTR_CLIENT_FLAGS: u16 = 6;
const NBD_ATTR_SOCKETS: u16 = 7;
const NBD_ATTR_DEAD_CONN_TIMEOUT: u16 = 8;
const NBD_ATTR_BACKEND_IDENTIFIER: u16 = 10;
const NBD_SOCK_ITEM: u16 = 1;
const NBD_SOCK_FD: u16 = 1;

/// How long one netlink request may take before it is an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A failed netlink request.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// Socket-level failure (or the request timed out).
    #[error("netlink {what}: {errno}")]
    Socket {
        /// What was being done.
        what: &'static str,
        /// The error.
        errno: Errno,
    },
    /// The kernel has no `nbd` generic-netlink family: the nbd module is not loaded.
    #[error("the kernel has no nbd netlink interface (is the nbd module loaded? `modprobe nbd`)")]
    NoFamily,
    /// The kernel refused the request.
    #[error("kernel refused nbd {cmd}: {errno}")]
    Refused {
        /// The command.
        cmd: &'static str,
        /// The kernel's errno.
        errno: Errno,
    },
    /// A reply this code cannot read.
    #[error("malformed netlink reply: {0}")]
    Malformed(&'static str),
}

/// Parameters of `NBD_CMD_CONNECT`.
#[derive(Debug, Clone)]
pub struct ConnectRequest {
    /// Device index, or `None` for any free device (the kernel picks or creates one).
    pub index: Option<u32>,
    /// Export size in bytes.
    pub size: u64,
    /// Logical block size (512..=4096, a power of two).
    pub block_size: u64,
    /// Seconds before an unanswered request is retried on another (or a reconnected)
    /// socket.
    pub timeout_secs: u64,
    /// Seconds the kernel waits for a reconfigure after every socket died, before failing
    /// I/O.
    pub dead_conn_timeout_secs: u64,
    /// The server's transmission flags.
    pub server_flags: u64,
    /// Identifies what the device is attached to (shown in /sys/block/nbdN/backend).
    pub backend: String,
}

/// A generic-netlink socket bound to the nbd family.
#[derive(Debug)]
pub struct NbdNetlink {
    fd: OwnedFd,
    family: u16,
    seq: u32,
}

impl NbdNetlink {
    /// Opens the socket and resolves the `nbd` family.
    pub fn open() -> Result<NbdNetlink, NetlinkError> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkGeneric,
        )
        .map_err(|errno| NetlinkError::Socket {
            what: "socket",
            errno,
        })?;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0)).map_err(|errno| NetlinkError::Socket {
            what: "bind",
            errno,
        })?;
        let tv = TimeVal::new(
            REQUEST_TIMEOUT.as_secs() as _,
            REQUEST_TIMEOUT.subsec_micros() as _,
        );
        setsockopt(&fd, sockopt::ReceiveTimeout, &tv).map_err(|errno| NetlinkError::Socket {
            what: "SO_RCVTIMEO",
            errno,
        })?;
        let mut nl = NbdNetlink {
            fd,
            family: 0,
            seq: 0,
        };
        let mut attrs = Vec::new();
        put_attr(&mut attrs, CTRL_ATTR_FAMILY_NAME, b"nbd\0");
        let replies = match nl.request(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 1, &attrs, "getfamily") {
            Err(NetlinkError::Refused {
                errno: Errno::ENOENT,
                ..
            }) => {
                return Err(NetlinkError::NoFamily);
            }
            r => r?,
        };
        let family = replies
            .iter()
            .find_map(|attrs| find_attr(attrs, CTRL_ATTR_FAMILY_ID))
            .and_then(|v| v.get(0..2).map(|b| u16::from_ne_bytes([b[0], b[1]])))
            .ok_or(NetlinkError::Malformed("no family id"))?;
        nl.family = family;
        Ok(nl)
    }

    /// Connects `sockets` (already through the NBD handshake) to a device; returns its
    /// index.
    pub fn connect(
        &mut self,
        req: &ConnectRequest,
        sockets: &[RawFd],
    ) -> Result<u32, NetlinkError> {
        let mut a = Vec::new();
        if let Some(i) = req.index {
            put_attr(&mut a, NBD_ATTR_INDEX, &i.to_ne_bytes());
        }
        put_attr(&mut a, NBD_ATTR_SIZE_BYTES, &req.size.to_ne_bytes());
        put_attr(
            &mut a,
            NBD_ATTR_BLOCK_SIZE_BYTES,
            &req.block_size.to_ne_bytes(),
        );
        put_attr(&mut a, NBD_ATTR_TIMEOUT, &req.timeout_secs.to_ne_bytes());
        put_attr(
            &mut a,
            NBD_ATTR_DEAD_CONN_TIMEOUT,
            &req.dead_conn_timeout_secs.to_ne_bytes(),
        );
        put_attr(
            &mut a,
            NBD_ATTR_SERVER_FLAGS,
            &req.server_flags.to_ne_bytes(),
        );
        // No client flags: the device stays when disconnected and when we exit.
        put_attr(&mut a, NBD_ATTR_CLIENT_FLAGS, &0u64.to_ne_bytes());
        put_attr(&mut a, NBD_ATTR_BACKEND_IDENTIFIER, &cstr(&req.backend));
        put_sockets(&mut a, sockets);
        let replies = self.request(
            self.family,
            NBD_CMD_CONNECT,
            NBD_GENL_VERSION,
            &a,
            "connect",
        )?;
        replies
            .iter()
            .find_map(|attrs| find_attr(attrs, NBD_ATTR_INDEX))
            .and_then(|v| {
                v.get(0..4)
                    .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
            })
            .ok_or(NetlinkError::Malformed("connect reply without an index"))
    }

    /// Hands `socket` to device `index` in place of a dead one. `ENOSPC` means no socket of
    /// the device is marked dead (yet).
    pub fn reconfigure(
        &mut self,
        index: u32,
        backend: &str,
        socket: RawFd,
    ) -> Result<(), NetlinkError> {
        let mut a = Vec::new();
        put_attr(&mut a, NBD_ATTR_INDEX, &index.to_ne_bytes());
        put_attr(&mut a, NBD_ATTR_BACKEND_IDENTIFIER, &cstr(backend));
        put_sockets(&mut a, &[socket]);
        self.request(
            self.family,
            NBD_CMD_RECONFIGURE,
            NBD_GENL_VERSION,
            &a,
            "reconfigure",
        )
        .map(|_| ())
    }

    /// Sets the size of connected device `index` (known by `backend`) to `size` bytes
    /// while it stays attached (`NBD_CMD_RECONFIGURE` with `NBD_ATTR_SIZE_BYTES`, Linux
    /// 5.3+); the block layer sees the new capacity at once.
    pub fn resize(&mut self, index: u32, backend: &str, size: u64) -> Result<(), NetlinkError> {
        let mut a = Vec::new();
        put_attr(&mut a, NBD_ATTR_INDEX, &index.to_ne_bytes());
        put_attr(&mut a, NBD_ATTR_BACKEND_IDENTIFIER, &cstr(backend));
        put_attr(&mut a, NBD_ATTR_SIZE_BYTES, &size.to_ne_bytes());
        self.request(
            self.family,
            NBD_CMD_RECONFIGURE,
            NBD_GENL_VERSION,
            &a,
            "resize",
        )
        .map(|_| ())
    }

    /// Disconnects device `index` (the kernel sends `NBD_CMD_DISC` and drops the sockets).
    pub fn disconnect(&mut self, index: u32) -> Result<(), NetlinkError> {
        let mut a = Vec::new();
        put_attr(&mut a, NBD_ATTR_INDEX, &index.to_ne_bytes());
        self.request(
            self.family,
            NBD_CMD_DISCONNECT,
            NBD_GENL_VERSION,
            &a,
            "disconnect",
        )
        .map(|_| ())
    }

    /// Sends one request with `NLM_F_ACK` and returns the attributes of every reply before
    /// the acknowledgement.
    fn request(
        &mut self,
        family: u16,
        cmd: u8,
        version: u8,
        attrs: &[u8],
        name: &'static str,
    ) -> Result<Vec<Vec<u8>>, NetlinkError> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let len = 16 + 4 + attrs.len();
        let mut msg = Vec::with_capacity(len);
        msg.extend_from_slice(&(len as u32).to_ne_bytes());
        msg.extend_from_slice(&family.to_ne_bytes());
        msg.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        msg.extend_from_slice(&seq.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(&[cmd, version, 0, 0]);
        msg.extend_from_slice(attrs);
        send(self.fd.as_raw_fd(), &msg, MsgFlags::empty()).map_err(|errno| {
            NetlinkError::Socket {
                what: "send",
                errno,
            }
        })?;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::empty()).map_err(|errno| {
                NetlinkError::Socket {
                    what: "recv",
                    errno,
                }
            })?;
            let mut rest = &buf[..n];
            while rest.len() >= 16 {
                let mlen = u32::from_ne_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
                let mtype = u16::from_ne_bytes([rest[4], rest[5]]);
                let mseq = u32::from_ne_bytes(rest[8..12].try_into().expect("4 bytes"));
                if mlen < 16 || mlen > rest.len() {
                    return Err(NetlinkError::Malformed("message length"));
                }
                let body = &rest[16..mlen];
                rest = &rest[align4(mlen).min(rest.len())..];
                if mseq != seq {
                    continue;
                }
                match mtype {
                    NLMSG_ERROR => {
                        let code = body
                            .get(0..4)
                            .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                            .ok_or(NetlinkError::Malformed("short error message"))?;
                        if code == 0 {
                            return Ok(out);
                        }
                        return Err(NetlinkError::Refused {
                            cmd: name,
                            errno: Errno::from_raw(-code),
                        });
                    }
                    NLMSG_DONE => return Ok(out),
                    t if t == family && body.len() >= 4 => out.push(body[4..].to_vec()),
                    _ => {}
                }
            }
        }
    }
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

fn put_attr(buf: &mut Vec<u8>, typ: u16, payload: &[u8]) {
    let len = 4 + payload.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&typ.to_ne_bytes());
    buf.extend_from_slice(payload);
    buf.resize(align4(buf.len()), 0);
}

fn put_sockets(buf: &mut Vec<u8>, fds: &[RawFd]) {
    let mut items = Vec::new();
    for &fd in fds {
        let mut item = Vec::new();
        put_attr(&mut item, NBD_SOCK_FD, &(fd as u32).to_ne_bytes());
        put_attr(&mut items, NBD_SOCK_ITEM | NLA_F_NESTED, &item);
    }
    put_attr(buf, NBD_ATTR_SOCKETS | NLA_F_NESTED, &items);
}

/// The payload of the first attribute of type `typ` in `attrs`.
fn find_attr(mut attrs: &[u8], typ: u16) -> Option<&[u8]> {
    while attrs.len() >= 4 {
        let len = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
        let t = u16::from_ne_bytes([attrs[2], attrs[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > attrs.len() {
            return None;
        }
        if t == typ {
            return Some(&attrs[4..len]);
        }
        attrs = &attrs[align4(len).min(attrs.len())..];
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_round_trip_with_padding() {
        let mut b = Vec::new();
        put_attr(&mut b, 2, b"nbd\0");
        put_attr(&mut b, 7, &[1, 2, 3]);
        put_attr(&mut b, 1, &5u32.to_ne_bytes());
        assert_eq!(b.len() % 4, 0);
        assert_eq!(find_attr(&b, 7), Some(&[1u8, 2, 3][..]));
        assert_eq!(find_attr(&b, 1), Some(&5u32.to_ne_bytes()[..]));
        assert_eq!(find_attr(&b, 9), None);
        // a truncated attribute is not read past the buffer
        assert_eq!(find_attr(&b[..6], 7), None);
    }

    /// Attribute parsing of arbitrary bytes (what a reply could hold) never panics.
    #[test]
    fn attribute_parsing_of_garbage_never_panics() {
        let mut x: u32 = 0x1234_5678;
        for len in 0..300usize {
            let buf: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect();
            for t in 0..12 {
                let _ = find_attr(&buf, t);
            }
        }
    }

    #[test]
    fn sockets_are_nested_items() {
        let mut b = Vec::new();
        put_sockets(&mut b, &[7, 9]);
        let items = find_attr(&b, NBD_ATTR_SOCKETS).expect("sockets attr");
        let first = find_attr(items, NBD_SOCK_ITEM).expect("item");
        assert_eq!(find_attr(first, NBD_SOCK_FD), Some(&7u32.to_ne_bytes()[..]));
    }
}
